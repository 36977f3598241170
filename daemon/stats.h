/* strata — per-export I/O statistics: operations, bytes, failures, total
 * and per-request latency (log2 histograms), requests in flight.
 *
 * Counting is on the data path, so it costs a few additions: the counters
 * are plain integers in the export (an export is owned by one loop thread:
 * no atomics, no locks), nothing is allocated, and the only extra work per
 * request is two reads of the monotonic clock (vDSO).  Readers (QMP
 * query-blockstats, the Prometheus endpoint) run on the same loop and read
 * the counters between requests, so every snapshot is consistent.
 *
 * Latency is measured from the moment a request starts running (after its
 * payload was received) until its reply is queued: the time the export
 * took, including a wait while it is quiesced.
 */
#ifndef STRATA_STATS_H
#define STRATA_STATS_H

#include <stdbool.h>
#include <stdint.h>

/* The request classes counted apart.  The first four are QEMU's
 * (BlockDeviceStats: rd_, wr_, flush_, unmap_); the others are strata's. */
#define STATS_OPS(X)                                   \
    X(READ, "read", "rd")                              \
    X(WRITE, "write", "wr")                            \
    X(FLUSH, "flush", "flush")                         \
    X(UNMAP, "trim", "unmap")                          \
    X(ZERO, "write_zeroes", "zero")                    \
    X(CACHE, "cache", "cache")                         \
    X(BLOCK_STATUS, "block_status", "block_status")

enum stats_op {
#define X(e, name, qemu) STATS_OP_##e,
    STATS_OPS(X)
#undef X
    STATS_OP__MAX
};

/* Latency buckets: bucket k < STATS_LAT_BUCKETS - 1 counts the requests
 * that took less than 2^(k + STATS_LAT_MIN_SHIFT) ns (and at least the
 * bound of bucket k - 1); the last bucket counts the rest.  With 10 and
 * 27: bounds from 1.024 us to 34.4 s. */
#define STATS_LAT_MIN_SHIFT 10
#define STATS_LAT_BUCKETS 27

struct stats_op_counters {
    uint64_t ops;              /* completed, success or failure */
    uint64_t bytes;            /* of successful requests */
    uint64_t failed;
    uint64_t invalid;          /* refused by validation (bad range...) */
    uint64_t total_ns;         /* latency of all completed requests */
    uint64_t lat[STATS_LAT_BUCKETS]; /* not cumulative */
};

struct export_stats {
    struct stats_op_counters op[STATS_OP__MAX];
    uint64_t wr_highest_offset;/* end of the furthest successful write */
    unsigned inflight;         /* started, reply not yet queued */
    uint64_t last_done_ns;     /* monotonic; 0 = no request yet */
};

const char *stats_op_name(enum stats_op op);   /* "read", "write"... */
const char *stats_op_qemu(enum stats_op op);   /* "rd", "wr"... */

/* Upper bound in ns of bucket k (k < STATS_LAT_BUCKETS - 1). */
static inline uint64_t stats_lat_bound_ns(unsigned k)
{
    return UINT64_C(1) << (k + STATS_LAT_MIN_SHIFT);
}

static inline unsigned stats_lat_bucket(uint64_t ns)
{
    if (ns < stats_lat_bound_ns(0))
        return 0;
    unsigned log2 = 63u - (unsigned)__builtin_clzll(ns);
    unsigned k = log2 + 1 - STATS_LAT_MIN_SHIFT;
    return k < STATS_LAT_BUCKETS ? k : STATS_LAT_BUCKETS - 1;
}

/* A request starts running: returns the start time to pass to
 * stats_request_done(). */
uint64_t stats_request_start(struct export_stats *s);
/* It ended (reply about to be queued).  ret < 0 is a failure; bytes is
 * the payload length counted for a success. */
void stats_request_done(struct export_stats *s, enum stats_op op,
                        uint64_t start_ns, int ret, uint64_t offset,
                        uint64_t bytes);
/* A request refused before it ran (validation); op STATS_OP__MAX (an
 * unknown command) is not counted.  The one counter a connection loop
 * (--threads) changes itself: atomic, read with __atomic_load_n. */
static inline void stats_request_invalid(struct export_stats *s,
                                         enum stats_op op)
{
    if (op < STATS_OP__MAX)
        __atomic_fetch_add(&s->op[op].invalid, 1, __ATOMIC_RELAXED);
}

struct json_object;
/* QEMU's BlockDeviceStats (qapi/block-core.json) for the counters QEMU
 * has, its latency histograms ({"boundaries", "bins"}, in ns), and the
 * other classes as "x_"-prefixed members.  now_ns: loop_now_ns(). */
struct json_object *stats_to_json(const struct export_stats *s,
                                  uint64_t now_ns);

#endif
