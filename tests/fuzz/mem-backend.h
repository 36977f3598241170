/* strata — an in-memory backend for the fuzz targets (tests only).
 *
 * The bytes live in a struct mem_store that the caller owns and that
 * outlives the backends opened on it, so a target can close an image and
 * open the same bytes again (the "reopen and check" step).  The backend
 * keeps the contract of backends/backend.h: reads past the end are zeros,
 * writes past the end grow the store (up to its limit: -ENOSPC past it,
 * as a full disk), zero and discard make bytes read as zeros, truncate
 * resizes, reopen switches read-only and read-write.  Nothing yields:
 * every operation completes before it returns.
 */
#ifndef STRATA_FUZZ_MEM_BACKEND_H
#define STRATA_FUZZ_MEM_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "backend.h"

struct mem_store {
    uint8_t *data;
    uint64_t size;             /* bytes of the storage */
    uint64_t cap;              /* allocated bytes of data */
    uint64_t limit;            /* largest size it may grow to */
    uint64_t written_lo, written_hi; /* bytes written since the last
                                        mem_store_clear_written: lo == hi
                                        none */
};

/* A store holding a copy of len bytes, growing up to limit (>= len).
 * Aborts when out of memory. */
void mem_store_init(struct mem_store *m, const void *data, size_t len,
                    uint64_t limit);
/* The same for a store that may hold bytes already (zero-filled before
 * its first use): its allocation is kept when large enough, so that a
 * target reloading it for every input does not map, fault in and unmap
 * fresh memory each time.  Bytes past len read as zeros as before. */
void mem_store_load(struct mem_store *m, const void *data, size_t len,
                    uint64_t limit);
/* Zeroes what was written since the store was made or last cleared (a
 * store made of zeros is all zeros again, without touching the rest). */
void mem_store_clear_written(struct mem_store *m);
void mem_store_fini(struct mem_store *m);

/* A backend on m (which must outlive it), named name; closed with
 * backend_close(), which leaves m as it is. */
struct backend *mem_backend_open(struct loop *loop, struct mem_store *m,
                                 const char *name, bool read_only);

#endif
