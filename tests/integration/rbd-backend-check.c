/* strata — drives the rbd backend through its ops table on a real image:
 * the parts a qcow2 driver on RBD needs that a raw NBD export never
 * reaches.  Run by test-rbd.py with a spec such as rbd:rbd/grow (an image
 * of a few MiB, any content):
 *
 *  - a write past the end grows the image (in steps) and moves b->size to
 *    the write's end; the gap reads as zeros; reads past b->size too;
 *  - a far write past the end; zeroing past the end grows as well;
 *  - block status reports the written objects as data and the gap as zero;
 *  - truncate shrinks exactly (data beyond is gone, later growth reads
 *    zeros there);
 *  - iovec arrays longer than one librbd request (RBD_MAX_IOV) and
 *    unaligned ranges move the right bytes;
 *  - reopen read-only and back to read-write keeps size and data;
 *  - at close the slack is cut: the test compares `rbd info` with the
 *    "final size" printed here.
 * Exit 0 when every check passed, 1 otherwise.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "coro.h"
#include "loop.h"

#define MiB (UINT64_C(1) << 20)

struct ctx {
    struct loop *loop;
    struct backend *b;
    int failures;
    uint64_t final_size;
};

#define CHECK(c, ...)                                              \
    do {                                                           \
        if (!(c)) {                                                \
            printf("FAIL line %d: ", __LINE__);                    \
            printf(__VA_ARGS__);                                   \
            printf("\n");                                          \
            x->failures++;                                         \
            goto out;                                              \
        }                                                          \
    } while (0)

static void fill(uint8_t *p, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (uint8_t)(seed * 131 + i * 7 + (i >> 9));
}

static bool all_zero(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return false;
    return true;
}

static void check_co(struct coro *co, void *arg)
{
    struct ctx *x = arg;
    struct backend *b = x->b;
    const uint64_t s0 = b->size;
    const size_t n = MiB;
    uint8_t *w = malloc(4 * MiB), *r = malloc(4 * MiB);
    CHECK(w && r, "out of memory");

    /* 1. a write 3 MiB past the end */
    fill(w, n, 1);
    uint64_t off1 = s0 + 3 * MiB;
    int e = backend_pwrite_co(b, co, w, n, off1, BACKEND_FUA);
    CHECK(e == 0, "write past the end: %d", e);
    CHECK(b->size == off1 + n, "size after the write past the end: %llu, "
          "expected %llu", (unsigned long long)b->size,
          (unsigned long long)(off1 + n));
    e = backend_pread_co(b, co, r, n, off1);
    CHECK(e == 0 && memcmp(r, w, n) == 0, "read back past the old end: %d", e);
    e = backend_pread_co(b, co, r, 3 * MiB, s0);
    CHECK(e == 0 && all_zero(r, 3 * MiB), "the gap does not read as zeros");
    /* reads past b->size read zeros (backend contract) */
    e = backend_pread_co(b, co, r, 2 * MiB, b->size - MiB);
    CHECK(e == 0 && memcmp(r, w, n) == 0 && all_zero(r + n, n),
          "read across b->size: %d", e);
    printf("ok write past the end: size %llu -> %llu\n",
           (unsigned long long)s0, (unsigned long long)b->size);

    /* 2. a far write (beyond one growth step) and zeroing past the end */
    uint64_t off2 = b->size + 150 * MiB + 4095;
    fill(w, 3 * MiB, 2);
    e = backend_pwrite_co(b, co, w, 3 * MiB, off2, 0);
    CHECK(e == 0 && b->size == off2 + 3 * MiB, "far write: %d size %llu", e,
          (unsigned long long)b->size);
    e = backend_pread_co(b, co, r, 3 * MiB, off2);
    CHECK(e == 0 && memcmp(r, w, 3 * MiB) == 0, "far write read back");
    uint64_t zoff = b->size;
    e = backend_zero_co(b, co, zoff - 4096, 2 * MiB, BACKEND_MAY_TRIM);
    CHECK(e == 0 && b->size == zoff - 4096 + 2 * MiB, "zero past the end: %d "
          "size %llu", e, (unsigned long long)b->size);
    e = backend_pread_co(b, co, r, 2 * MiB, zoff - 4096);
    CHECK(e == 0 && all_zero(r, 2 * MiB), "zeroed tail reads non-zero");
    e = backend_flush_co(b, co);
    CHECK(e == 0, "flush: %d", e);
    printf("ok far write and zero past the end: size %llu\n",
           (unsigned long long)b->size);

    /* 3. block status: the 1 MiB write is data, the middle of the gap zero */
    uint64_t pnum;
    unsigned st;
    e = backend_block_status_co(b, co, off1, n, &pnum, &st);
    CHECK(e == 0 && (st & BACKEND_STATUS_DATA), "block status of written "
          "data: %d status %u", e, st);
    e = backend_block_status_co(b, co, off1 + 40 * MiB, MiB, &pnum, &st);
    CHECK(e == 0 && st == BACKEND_STATUS_ZERO && pnum == MiB, "block status "
          "of the gap: %d status %u pnum %llu", e, st,
          (unsigned long long)pnum);
    printf("ok block status: data where written, zero in the gap\n");

    /* 4. truncate: shrink exactly into the first write, then grow again */
    uint64_t tsize = off1 + 4096;
    e = backend_truncate_co(b, co, tsize);
    CHECK(e == 0 && b->size == tsize, "truncate: %d", e);
    e = backend_pwrite_co(b, co, "x", 1, tsize + 8192, 0);
    CHECK(e == 0 && b->size == tsize + 8193, "write after truncate: %d", e);
    e = backend_pread_co(b, co, r, 12288, tsize - 4096);
    fill(w, n, 1);
    CHECK(e == 0 && memcmp(r, w, 4096) == 0 && all_zero(r + 4096, 8192),
          "after truncate and regrowth the cut data must read as zeros");
    printf("ok truncate to %llu, regrown to %llu\n", (unsigned long long)tsize,
           (unsigned long long)b->size);

    /* 5. 200 iovecs (more than one librbd request), unaligned */
    enum { NV = 200 };
    struct iovec iov[NV];
    uint64_t total = 0;
    for (int i = 0; i < NV; i++) {
        size_t len = (size_t)(i % 7) * 1000 + (i % 3 ? 1 : 0);
        iov[i].iov_base = w + total;
        iov[i].iov_len = len;
        total += len;
    }
    fill(w, total, 5);
    uint64_t voff = 12345;
    e = backend_pwritev_co(b, co, iov, NV, voff, 0);
    CHECK(e == 0, "pwritev of %d iovecs: %d", NV, e);
    for (int i = 0; i < NV; i++)
        iov[i].iov_base = r + ((uint8_t *)iov[i].iov_base - w);
    memset(r, 0xaa, total);
    e = backend_preadv_co(b, co, iov, NV, voff);
    CHECK(e == 0 && memcmp(r, w, total) == 0, "preadv of %d iovecs", NV);
    printf("ok %d iovecs (%llu bytes) at an odd offset\n", NV,
           (unsigned long long)total);

    /* 6. reopen read-only and read-write again (block-commit's base) */
    uint64_t size_rw = b->size;
    struct error *err = NULL;
    e = backend_reopen(b, true, &err);
    CHECK(e == 0 && b->read_only, "reopen read-only: %s", err ? err->msg : "?");
    CHECK(b->size == size_rw, "size after reopen read-only: %llu, was %llu",
          (unsigned long long)b->size, (unsigned long long)size_rw);
    memset(r, 0, total);
    e = backend_preadv_co(b, co, iov, NV, voff);
    CHECK(e == 0 && memcmp(r, w, total) == 0, "read after reopen read-only");
    e = backend_reopen(b, false, &err);
    CHECK(e == 0 && !b->read_only, "reopen read-write: %s",
          err ? err->msg : "?");
    e = backend_pwrite_co(b, co, "y", 1, b->size, BACKEND_FUA);
    CHECK(e == 0 && b->size == size_rw + 1, "write past the end after "
          "reopen: %d", e);
    printf("ok reopened read-only and read-write; size %llu\n",
           (unsigned long long)b->size);
    error_free(err);
    x->final_size = b->size;
out:
    free(w);
    free(r);
    loop_stop(x->loop);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s rbd:POOL/IMAGE\n", argv[0]);
        return 2;
    }
    char *err = NULL;
    struct ctx x = {0};
    x.loop = loop_new(64, 256 << 10, &err);
    if (!x.loop) {
        fprintf(stderr, "loop: %s\n", err ? err : "?");
        return 1;
    }
    struct error *e = NULL;
    struct backend_open_opts o = {0};
    x.b = backend_open(x.loop, argv[1], &o, &e);
    if (!x.b) {
        fprintf(stderr, "open: %s\n", e ? e->msg : "?");
        error_free(e);
        loop_free(x.loop);
        return 1;
    }
    struct coro *co = coro_create(loop_coro_pool(x.loop), check_co, &x);
    if (!co) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    coro_enter(co);
    if (loop_run(x.loop) < 0)
        x.failures++;
    backend_close(x.b);
    loop_free(x.loop);
    if (x.failures == 0)
        printf("final size %llu\n", (unsigned long long)x.final_size);
    return x.failures ? 1 : 0;
}
