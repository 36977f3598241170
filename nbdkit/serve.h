/* strata inside nbdkit — nbdkit's requests as format operations on one
 * node, run on the engine's loop; shared by the plugin and the filter.
 *
 * Each function is called on an nbdkit worker thread, hands the request
 * to the loop (engine_call) and returns 0, or -1 with the error set for
 * nbdkit (nbdkit_set_error; *err for a filter's caller to pass on). */
#ifndef STRATA_NBDKIT_SERVE_H
#define STRATA_NBDKIT_SERVE_H

#include <stdint.h>

struct engine;
struct fmt_node;
struct nbdkit_extents;

/* Largest block advertised (stratad's NBD payload limit); larger
 * requests from nbdkit are split. */
#define SERVE_MAX_BLOCK (UINT32_C(32) << 20)

struct serve {
    struct engine *eng;
    struct fmt_node *root;
};

/* flags: NBDKIT_FLAG_*; err: where the errno goes (may be NULL). */
int serve_pread(struct serve *s, void *buf, uint32_t count, uint64_t offset,
                int *err);
int serve_pwrite(struct serve *s, const void *buf, uint32_t count,
                 uint64_t offset, uint32_t flags, int *err);
int serve_flush(struct serve *s, int *err);
int serve_trim(struct serve *s, uint32_t count, uint64_t offset,
               uint32_t flags, int *err);
int serve_zero(struct serve *s, uint32_t count, uint64_t offset,
               uint32_t flags, int *err);
int serve_cache(struct serve *s, uint32_t count, uint64_t offset, int *err);
int serve_extents(struct serve *s, uint32_t count, uint64_t offset,
                  uint32_t flags, struct nbdkit_extents *extents, int *err);
void serve_block_size(struct serve *s, uint32_t *minimum, uint32_t *preferred,
                      uint32_t *maximum);

#endif
