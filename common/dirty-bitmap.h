/* strata — a dirty bitmap: one bit per granularity-sized chunk of a
 * byte range (a disk), set where the bytes changed.
 *
 * A flat array of 64-bit words, bit i of word w covering bytes
 * [(64w + i) * gran, (64w + i + 1) * gran).  Setting a range touches only
 * the words it covers, so marking a guest write costs a few instructions
 * whatever the disk size.  The number of set bits is kept as bits change.
 *
 * Pure data structure: no I/O, no allocation except in init and resize,
 * never yields.  Callers own the locking (a loop's single thread).
 */
#ifndef STRATA_DIRTY_BITMAP_H
#define STRATA_DIRTY_BITMAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct dbitmap {
    uint64_t size;             /* bytes covered */
    uint64_t gran;             /* bytes per bit: a power of two >= 1 */
    unsigned shift;            /* log2(gran) */
    uint64_t nbits;            /* ceil(size / gran) */
    uint64_t *words;           /* ceil(nbits / 64) words; bits past nbits
                                  are always 0 */
    uint64_t count;            /* set bits */
};

/* An empty bitmap over size bytes.  gran must be a power of two.
 * Returns 0 or -ENOMEM. */
int dbitmap_init(struct dbitmap *b, uint64_t size, uint64_t gran);
void dbitmap_destroy(struct dbitmap *b);
/* Changes the size covered: new bits are clear, bits past the new end are
 * dropped.  Returns 0 or -ENOMEM (b unchanged). */
int dbitmap_resize(struct dbitmap *b, uint64_t size);

/* Marks every chunk touching [off, off + len), clipped to the size. */
void dbitmap_set(struct dbitmap *b, uint64_t off, uint64_t len);
/* Clears every chunk touching [off, off + len), clipped to the size. */
void dbitmap_reset(struct dbitmap *b, uint64_t off, uint64_t len);
void dbitmap_clear_all(struct dbitmap *b);
/* Is the chunk holding byte off set (off < size)? */
bool dbitmap_get(const struct dbitmap *b, uint64_t off);
/* Dirty bytes as QEMU counts them: set bits times the granularity. */
static inline uint64_t dbitmap_count_bytes(const struct dbitmap *b)
{
    return b->count << b->shift;
}

/* The length of the run of equal chunks starting at byte off (< size),
 * at most max bytes, clipped to the size; *dirty says whether the run is
 * set.  off need not be aligned: the run starts at off. */
uint64_t dbitmap_run(const struct dbitmap *b, uint64_t off, uint64_t max,
                     bool *dirty);

/* dst |= src for bitmaps of the same size, whatever their granularities:
 * every byte src covers as dirty becomes dirty in dst (rounded out to
 * dst's chunks). */
void dbitmap_merge(struct dbitmap *dst, const struct dbitmap *src);
/* dst = src (same size and granularity).  */
void dbitmap_copy(struct dbitmap *dst, const struct dbitmap *src);

/* Serialisation as QEMU stores bitmap data (qcow2 spec, "Bitmaps"): bit
 * k of the byte stream is chunk k, bytes in order, least significant bit
 * first.  Bytes [byte_off, byte_off + len) of that stream; bits past
 * nbits read as 0 and are ignored when loading. */
void dbitmap_store_bytes(const struct dbitmap *b, uint64_t byte_off,
                         uint8_t *out, size_t len);
void dbitmap_load_bytes(struct dbitmap *b, uint64_t byte_off,
                        const uint8_t *in, size_t len);
/* Is every chunk of the byte stream's [byte_off, byte_off + len) clear?
 * (An all-zero data cluster is not stored.) */
bool dbitmap_bytes_clear(const struct dbitmap *b, uint64_t byte_off,
                         size_t len);
/* Bytes of the serialised stream: ceil(nbits / 8). */
static inline uint64_t dbitmap_stream_bytes(const struct dbitmap *b)
{
    return (b->nbits + 7) / 8;
}

#endif
