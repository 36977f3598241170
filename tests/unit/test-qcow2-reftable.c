/* strata — the growth of a qcow2 refcount table does not stop other
 * requests: while its writes are held (the image's backend, wrapped
 * here, keeps the first write at or past the area the old table covers
 * waiting until the test releases it), writes to allocated clusters,
 * reads, discards, flushes and allocating writes into freed clusters
 * (one of them with a new L2 table) all complete.
 * Asserted by what has completed while the growth is still held, never
 * by time.  Then the growth ends, and qemu-img check and qemu-img
 * compare judge the image.
 *
 * 512-byte clusters and 64-bit refcounts: a refcount block counts 64
 * clusters, the first refcount table cluster (64 entries) 2 MiB of file.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "backend.h"
#include "byteorder.h"
#include "format.h"
#include "loop.h"
#include "qcow2.h"
#include "scratch.h"

#define KiB 1024u
#define MiB (1024u * 1024u)
#define CS 512u
#define PER_BLOCK 64u                   /* clusters a refcount block counts */
#define AREA ((uint64_t)64 * PER_BLOCK * CS) /* what one table cluster covers */
#define GUEST (64 * MiB)
#define L2_SPAN (32 * KiB)              /* guest bytes one L2 table maps */


/* ---- the hold: a wrapper around the image's backend ---- */

static struct {
    const struct backend_ops *real;
    struct backend_ops ops;
    bool armed;                /* hold the next write at or past from */
    uint64_t from;
    bool held;                 /* a write is waiting in q */
    uint64_t held_off;
    struct co_queue q;
} hold;

static int hold_pwritev_co(struct backend *b, struct coro *co,
                           const struct iovec *iov, int iovcnt, uint64_t off,
                           unsigned flags)
{
    if (hold.armed && off >= hold.from) {
        hold.armed = false;
        hold.held = true;
        hold.held_off = off;
        co_queue_wait_co(&hold.q, co);
        hold.held = false;
    }
    return hold.real->pwritev_co(b, co, iov, iovcnt, off, flags);
}

static void hold_install(struct fmt_node *n)
{
    hold.real = n->file->ops;
    hold.ops = *hold.real;
    hold.ops.pwritev_co = hold_pwritev_co;
    n->file->ops = &hold.ops;
}

static void hold_remove(struct fmt_node *n)
{
    n->file->ops = hold.real;
}

/* ---- requests, each in a coroutine of its own ---- */

enum kind { R_WRITE, R_READ, R_DISCARD, R_FLUSH, R_GROW };

struct req {
    struct fmt_node *n;
    enum kind kind;
    uint64_t off, len;
    uint8_t *buf;
    int ret;
    bool done;
};

static void req_co(struct coro *co, void *arg)
{
    struct req *q = arg;
    struct iovec v = {q->buf, q->len};
    struct error *e = NULL;
    switch (q->kind) {
    case R_WRITE:
        q->ret = fmt_pwritev_co(q->n, co, &v, 1, q->off, 0);
        break;
    case R_READ:
        q->ret = fmt_preadv_co(q->n, co, &v, 1, q->off);
        break;
    case R_DISCARD:
        q->ret = fmt_discard_co(q->n, co, q->off, q->len, 0);
        break;
    case R_FLUSH:
        q->ret = fmt_flush_co(q->n, co);
        break;
    case R_GROW:
        q->ret = fmt_grow_co(q->n, co, q->off, &e);
        error_free(e);
        break;
    }
    q->done = true;
}

static void start(struct loop *l, struct req *q)
{
    q->done = false;
    struct coro *c = coro_create(loop_coro_pool(l), req_co, q);
    assert_non_null(c);
    coro_wake(c);
}

/* Lets the loop run until *flag is set; false if it never is (a request
 * waiting for the held growth: the loop has nothing left to do).  The
 * bound only keeps a failing test from hanging. */
static bool wait_for(struct loop *l, struct coro *co, const bool *flag)
{
    for (int i = 0; i < 4000 && !*flag; i++) {
        struct loop_sleep s;
        loop_sleep_init(&s);
        loop_sleep_co(l, &s, co, 2000000);
    }
    return *flag;
}

/* ---- the test context ---- */

struct ctx {
    struct loop *loop;
    uint8_t *model;            /* the guest's bytes as they must read */
    char msg[512];
    int ret;
};

#define CHECK(c, cond, ...)                                              \
    do {                                                                 \
        if (!(cond)) {                                                   \
            snprintf((c)->msg, sizeof((c)->msg), __VA_ARGS__);           \
            (c)->ret = -1;                                               \
            goto out;                                                    \
        }                                                                \
    } while (0)

static void fill(uint8_t *p, uint64_t off, uint64_t len, unsigned seed)
{
    for (uint64_t i = 0; i < len; i++)
        p[i] = (uint8_t)(((off + i) >> 9) * 7 + seed * 31 + 1);
}

/* A write of len bytes at off with pattern seed, waited for; the model
 * follows.  Returns the request's result. */
static int write_sync(struct ctx *c, struct coro *co, struct fmt_node *n,
                      uint64_t off, uint64_t len, unsigned seed)
{
    uint8_t *buf = malloc(len);
    assert_non_null(buf);
    fill(buf, off, len, seed);
    struct iovec v = {buf, len};
    int r = fmt_pwritev_co(n, co, &v, 1, off, 0);
    if (r == 0)
        memcpy(c->model + off, buf, len);
    free(buf);
    return r;
}

static uint64_t file_size(const char *p)
{
    struct stat st;
    assert_int_equal(stat(p, &st), 0);
    return (uint64_t)st.st_size;
}

/* Writes guest data from guest offset *goff on, flushing after each
 * write, until the file ends at most `gap` bytes below the area the
 * first refcount table cluster covers (the clusters the allocator hands
 * out next: it fills the file in order). */
static int fill_to(struct ctx *c, struct coro *co, struct fmt_node *n,
                   const char *file, uint64_t *goff, uint64_t gap)
{
    for (;;) {
        uint64_t end = file_size(file);
        if (end > AREA)
            return -1; /* grew already: the layout is not what we think */
        if (AREA - end <= gap)
            return 0;
        /* 4 KiB steps near the end (8 clusters; a new L2 table every
         * 32 KiB), 32 KiB before */
        uint64_t len = AREA - end > 48 * KiB ? L2_SPAN : 4 * KiB;
        int r = write_sync(c, co, n, *goff, len, 1);
        if (r == 0)
            r = fmt_flush_co(n, co);
        if (r < 0)
            return r;
        *goff += len;
    }
}

/* ---- 1: a guest write grows the table; everything else goes on ---- */

static void growth_by_write_co(struct coro *co, void *arg)
{
    struct ctx *c = arg;
    struct error *e = NULL;
    struct fmt_open_opts rw = {.format = "qcow2"};
    const char *file = scratch_path("w.qcow2");
    struct fmt_node *n = fmt_open_co(c->loop, co, file, &rw, &e);
    if (!n) {
        snprintf(c->msg, sizeof(c->msg), "open: %s", e ? e->msg : "?");
        error_free(e);
        c->ret = -1;
        return;
    }
    struct qcow2 *s = qcow2_of(n);
    bool installed = false;
    static uint8_t gbuf[32 * KiB], obuf[4 * KiB], rbuf[4 * KiB],
        abuf[32 * KiB], a2buf[4 * KiB];
    struct req g = {0}, o = {0}, rd = {0}, d = {0}, f = {0}, a = {0},
               a2 = {0};

    uint64_t goff = 0;
    int r = fill_to(c, co, n, file, &goff, 8 * KiB);
    CHECK(c, r == 0, "filling the image to just below %#llx failed (%d)",
          (unsigned long long)AREA, r);
    CHECK(c, goff > 320 * KiB, "the fill wrote only %llu bytes",
          (unsigned long long)goff);
    CHECK(c, s->reftable_entries == 64 && s->h.refcount_table_clusters == 1,
          "the refcount table has %llu entries before the growth",
          (unsigned long long)s->reftable_entries);

    hold_install(n);
    installed = true;
    hold.from = AREA;
    hold.armed = true;

    /* G: 32 KiB into a new L2 range: the clusters left below the area
     * are too few, the next ones need a refcount block past the table */
    g = (struct req){.n = n, .kind = R_WRITE, .off = 40 * MiB,
                     .len = sizeof(gbuf), .buf = gbuf};
    fill(gbuf, g.off, g.len, 2);
    start(c->loop, &g);
    CHECK(c, wait_for(c->loop, co, &hold.held),
          "the growing write never wrote past %#llx",
          (unsigned long long)AREA);
    CHECK(c, s->rt_growing && !g.done,
          "held at %#llx, but no refcount table growth is in progress",
          (unsigned long long)hold.held_off);

    /* O: an overwrite of allocated clusters */
    o = (struct req){.n = n, .kind = R_WRITE, .off = 64 * KiB,
                     .len = sizeof(obuf), .buf = obuf};
    fill(obuf, o.off, o.len, 3);
    start(c->loop, &o);
    CHECK(c, wait_for(c->loop, co, &o.done) && o.ret == 0,
          "an overwrite of allocated clusters did not complete during the "
          "growth (%d)", o.ret);
    memcpy(c->model + o.off, obuf, o.len);

    /* a read */
    rd = (struct req){.n = n, .kind = R_READ, .off = 128 * KiB,
                      .len = sizeof(rbuf), .buf = rbuf};
    start(c->loop, &rd);
    CHECK(c, wait_for(c->loop, co, &rd.done) && rd.ret == 0 &&
                 memcmp(rbuf, c->model + rd.off, rd.len) == 0,
          "a read did not complete (right) during the growth (%d)", rd.ret);

    /* a discard and a flush: 128 clusters become free below the area */
    d = (struct req){.n = n, .kind = R_DISCARD, .off = 256 * KiB,
                     .len = 64 * KiB};
    start(c->loop, &d);
    CHECK(c, wait_for(c->loop, co, &d.done) && d.ret == 0,
          "a discard did not complete during the growth (%d)", d.ret);
    memset(c->model + d.off, 0, d.len);
    f = (struct req){.n = n, .kind = R_FLUSH};
    start(c->loop, &f);
    CHECK(c, wait_for(c->loop, co, &f.done) && f.ret == 0,
          "a flush did not complete during the growth (%d)", f.ret);

    /* allocating writes into the freed clusters: one where the L2 table
     * exists, one that needs a new table too */
    a = (struct req){.n = n, .kind = R_WRITE, .off = 256 * KiB,
                     .len = sizeof(abuf), .buf = abuf};
    fill(abuf, a.off, a.len, 4);
    start(c->loop, &a);
    CHECK(c, wait_for(c->loop, co, &a.done) && a.ret == 0,
          "an allocating write did not complete during the growth (%d)",
          a.ret);
    memcpy(c->model + a.off, abuf, a.len);
    a2 = (struct req){.n = n, .kind = R_WRITE, .off = 48 * MiB + 4 * KiB,
                      .len = sizeof(a2buf), .buf = a2buf};
    fill(a2buf, a2.off, a2.len, 5);
    start(c->loop, &a2);
    CHECK(c, wait_for(c->loop, co, &a2.done) && a2.ret == 0,
          "an allocating write into a new L2 range did not complete during "
          "the growth (%d)", a2.ret);
    memcpy(c->model + a2.off, a2buf, a2.len);

    CHECK(c, hold.held && !g.done && s->rt_growing,
          "the growth ended before the other requests were done");
    CHECK(c, s->h.refcount_table_offset < AREA,
          "the header names the new table before the growth ended");

    co_queue_wake_all(&hold.q);
    CHECK(c, wait_for(c->loop, co, &g.done) && g.ret == 0,
          "the growing write failed (%d)", g.ret);
    memcpy(c->model + g.off, gbuf, g.len);
    CHECK(c, !s->rt_growing && !s->hdr_writing &&
                 s->h.refcount_table_offset == AREA &&
                 s->reftable_entries > 64,
          "after the growth: table at %#llx, %llu entries",
          (unsigned long long)s->h.refcount_table_offset,
          (unsigned long long)s->reftable_entries);
    r = fmt_flush_co(n, co);
    CHECK(c, r == 0, "the last flush failed (%d)", r);
out:
    if (installed && hold.held) {
        co_queue_wake_all(&hold.q);
        wait_for(c->loop, co, &g.done);
    }
    if (installed)
        hold_remove(n);
    hold.armed = false;
    fmt_close(n);
}

static void run(struct ctx *c, coro_fn *fn)
{
    c->ret = 0;
    c->msg[0] = 0;
    assert_int_equal(loop_run_sync(c->loop, fn, c), 0);
    if (c->ret)
        fprintf(stderr, "%s\n", c->msg);
    assert_int_equal(c->ret, 0);
}

/* The image as the model says: qemu-img check finds it clean (no leak
 * either) and qemu-img compare finds the model's bytes. */
static void judge(struct ctx *c, const char *img)
{
    assert_int_equal(scratch_sh("qemu-img check -q %s", img), 0);
    FILE *f = fopen(scratch_path("model.raw"), "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(c->model, 1, GUEST, f), GUEST);
    assert_int_equal(fclose(f), 0);
    assert_int_equal(scratch_sh("qemu-img compare -q -f raw -F qcow2 %s %s",
                        scratch_path("model.raw"), img), 0);
}

static struct ctx *ctx_new(void)
{
    struct ctx *c = calloc(1, sizeof(*c));
    assert_non_null(c);
    char *err = NULL;
    c->loop = loop_new(64, 128 << 10, &err);
    assert_non_null(c->loop);
    c->model = calloc(1, GUEST);
    assert_non_null(c->model);
    return c;
}

static void ctx_free(struct ctx *c)
{
    loop_free(c->loop);
    free(c->model);
    free(c);
}

static void test_growth_by_write(void **state)
{
    (void)state;
    struct ctx *c = ctx_new();
    assert_int_equal(scratch_sh("qemu-img create -q -f qcow2 -o cluster_size=512,"
                        "refcount_bits=64 %s 64M", scratch_path("w.qcow2")), 0);
    run(c, growth_by_write_co);
    judge(c, scratch_path("w.qcow2"));
    ctx_free(c);
}

int main(void)
{
    static const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_growth_by_write),
    };
    return SCRATCH_RUN("reftable", "command -v qemu-img >/dev/null", "qemu-img", tests);
}
