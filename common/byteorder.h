/* strata — big-endian loads and stores at any alignment.
 *
 * NBD and qcow2 are both big endian on the wire and on disk; every layer
 * uses these (no layer keeps its own copy).  Pure, no dependencies.
 */
#ifndef STRATA_BYTEORDER_H
#define STRATA_BYTEORDER_H

#include <stdint.h>

static inline uint16_t be_get16(const void *p)
{
    const uint8_t *b = p;
    return (uint16_t)((b[0] << 8) | b[1]);
}
static inline uint32_t be_get32(const void *p)
{
    const uint8_t *b = p;
    return ((uint32_t)b[0] << 24) | ((uint32_t)b[1] << 16) |
           ((uint32_t)b[2] << 8) | b[3];
}
static inline uint64_t be_get64(const void *p)
{
    const uint8_t *b = p;
    return ((uint64_t)be_get32(b) << 32) | be_get32(b + 4);
}
static inline void be_put16(void *p, uint16_t v)
{
    uint8_t *b = p;
    b[0] = (uint8_t)(v >> 8);
    b[1] = (uint8_t)v;
}
static inline void be_put32(void *p, uint32_t v)
{
    uint8_t *b = p;
    b[0] = (uint8_t)(v >> 24);
    b[1] = (uint8_t)(v >> 16);
    b[2] = (uint8_t)(v >> 8);
    b[3] = (uint8_t)v;
}
static inline void be_put64(void *p, uint64_t v)
{
    uint8_t *b = p;
    be_put32(b, (uint32_t)(v >> 32));
    be_put32(b + 4, (uint32_t)v);
}

#endif
