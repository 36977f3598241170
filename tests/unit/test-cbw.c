/* Unit tests: the copy-before-write filter and the snapshot-access view
 * (formats/cbw.c, formats/snapshot-access.c) over fake in-memory nodes
 * whose reads can be held, to drive the race between a view read and a
 * guest write deterministically. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "cbw.h"
#include "coro.h"
#include "iov.h"

#define CL (64 * 1024)
#define SIZE (4 * CL)

struct sched {
    struct coro *q[64];
    unsigned head, tail;
};

static void sched_push(void *opaque, struct coro *co)
{
    struct sched *s = opaque;
    assert_true(s->tail - s->head < 64);
    s->q[s->tail++ % 64] = co;
}

static void sched_run(struct sched *s)
{
    while (s->head != s->tail)
        coro_enter(s->q[s->head++ % 64]);
}

/* A fake node: bytes in memory; reads can be held at a gate; writes can
 * be made to fail. */
struct mem {
    struct fmt_node n;
    uint8_t buf[SIZE];
    bool hold_reads;
    struct coro *held;
    int fail_writes;           /* -errno for every write, or 0 */
    unsigned reads, writes;
};

static int mem_preadv_co(struct fmt_node *n, struct coro *co,
                         const struct iovec *iov, int iovcnt, uint64_t off)
{
    struct mem *m = (struct mem *)n;
    m->reads++;
    if (m->hold_reads) {
        m->held = co;
        coro_yield(co);
    }
    iov_from_buf(iov, iovcnt, m->buf + off);
    return 0;
}

static int mem_pwritev_co(struct fmt_node *n, struct coro *co,
                          const struct iovec *iov, int iovcnt, uint64_t off,
                          unsigned flags)
{
    (void)co, (void)flags;
    struct mem *m = (struct mem *)n;
    m->writes++;
    if (m->fail_writes)
        return m->fail_writes;
    iov_to_buf(iov, iovcnt, m->buf + off);
    return 0;
}

static int mem_block_status_co(struct fmt_node *n, struct coro *co,
                               uint64_t off, uint64_t len,
                               struct fmt_extent *ext)
{
    (void)n, (void)co, (void)off;
    *ext = (struct fmt_extent){.len = len, .flags = FMT_EXT_ZERO, .depth = 1};
    return 0;
}

static const struct fmt_ops mem_ops = {
    .name = "mem",
    .preadv_co = mem_preadv_co,
    .pwritev_co = mem_pwritev_co,
    .block_status_co = mem_block_status_co,
};

static void mem_init(struct mem *m, uint8_t fill)
{
    memset(m, 0, sizeof(*m));
    memset(m->buf, fill, SIZE);
    m->n.ops = &mem_ops;
    m->n.size = SIZE;
    m->n.align = 512;
    m->n.filename = "mem";
}

struct env {
    struct sched s;
    struct coro_pool *pool;
    struct mem src, tgt;
    struct fmt_node *cbw, *view;
};

static struct env *env_new(void)
{
    struct env *e = calloc(1, sizeof(*e));
    assert_non_null(e);
    e->pool = coro_pool_new(128 << 10, 4, sched_push, &e->s);
    assert_non_null(e->pool);
    mem_init(&e->src, 'A');
    mem_init(&e->tgt, 0);
    struct error *err = NULL;
    e->cbw = cbw_new(&e->src.n, &e->tgt.n, &err);
    assert_non_null(e->cbw);
    e->view = snapshot_access_new(e->cbw, "cbw", &err);
    assert_non_null(e->view);
    return e;
}

static void env_free(struct env *e)
{
    struct coro_pool *pool = e->pool;
    e->view->ops->close(e->view);
    cbw_unref(e->cbw);
    free(e);
    coro_pool_free(pool);
}

/* A guest write: copy before write, then the write to the source. */
struct gw {
    struct env *e;
    uint64_t off, len;
    uint8_t fill;
    int ret;
    bool done;
};

static void guest_write_co(struct coro *co, void *opaque)
{
    struct gw *g = opaque;
    g->ret = cbw_before_write_co(g->e->cbw, co, g->off, g->len);
    if (g->ret == 0) {
        uint8_t *b = malloc(g->len);
        memset(b, g->fill, g->len);
        struct iovec iov = {b, g->len};
        g->ret = fmt_pwritev_co(&g->e->src.n, co, &iov, 1, g->off, 0);
        free(b);
    }
    g->done = true;
}

struct vr {
    struct env *e;
    uint64_t off, len;
    uint8_t buf[SIZE];
    int ret;
    bool done;
};

static void view_read_co(struct coro *co, void *opaque)
{
    struct vr *r = opaque;
    struct iovec iov = {r->buf, r->len};
    r->ret = fmt_preadv_co(r->e->view, co, &iov, 1, r->off);
    r->done = true;
}

static bool all(const uint8_t *b, size_t n, uint8_t v)
{
    for (size_t i = 0; i < n; i++)
        if (b[i] != v)
            return false;
    return true;
}

/* A view read of a cluster not copied yet holds the source; a guest
 * write to it waits, then copies the old data first: the read returns
 * the old data, and so does every read afterwards. */
static void test_read_races_write(void **state)
{
    (void)state;
    struct env *e = env_new();
    e->src.hold_reads = true;
    struct vr r = {.e = e, .off = 0, .len = CL};
    coro_enter(coro_create(e->pool, view_read_co, &r));
    assert_false(r.done);
    assert_non_null(e->src.held);
    struct gw g = {.e = e, .off = 4096, .len = 4096, .fill = 'B'};
    coro_enter(coro_create(e->pool, guest_write_co, &g));
    sched_run(&e->s);
    assert_false(g.done);                   /* waits for the read's lock */
    assert_true(all(e->src.buf, SIZE, 'A'));
    assert_int_equal(e->tgt.writes, 0);
    e->src.hold_reads = false;
    coro_wake(e->src.held);
    sched_run(&e->s);
    assert_true(r.done && g.done);
    assert_int_equal(r.ret, 0);
    assert_int_equal(g.ret, 0);
    assert_true(all(r.buf, CL, 'A'));
    assert_true(all(e->tgt.buf, CL, 'A'));  /* the old cluster, copied */
    assert_true(all(e->src.buf + 4096, 4096, 'B'));
    assert_int_equal(cbw_copied_bytes(e->cbw), CL);
    struct vr r2 = {.e = e, .off = 0, .len = SIZE};
    coro_enter(coro_create(e->pool, view_read_co, &r2));
    sched_run(&e->s);
    assert_int_equal(r2.ret, 0);
    assert_true(all(r2.buf, SIZE, 'A'));
    env_free(e);
}

/* A second write to a copied cluster copies nothing; a write across a
 * cluster boundary copies both clusters. */
static void test_copy_once(void **state)
{
    (void)state;
    struct env *e = env_new();
    struct gw g1 = {.e = e, .off = CL - 4096, .len = 8192, .fill = 'C'};
    coro_enter(coro_create(e->pool, guest_write_co, &g1));
    sched_run(&e->s);
    assert_int_equal(g1.ret, 0);
    assert_int_equal(cbw_copied_bytes(e->cbw), 2 * CL);
    unsigned writes = e->tgt.writes;
    struct gw g2 = {.e = e, .off = CL, .len = 512, .fill = 'D'};
    coro_enter(coro_create(e->pool, guest_write_co, &g2));
    sched_run(&e->s);
    assert_int_equal(e->tgt.writes, writes);
    struct vr r = {.e = e, .off = 0, .len = SIZE};
    coro_enter(coro_create(e->pool, view_read_co, &r));
    sched_run(&e->s);
    assert_true(all(r.buf, SIZE, 'A'));
    env_free(e);
}

/* A failed copy fails the guest write before it reaches the source, and
 * leaves the cluster not copied: the view still reads the old data. */
static void test_copy_failure(void **state)
{
    (void)state;
    struct env *e = env_new();
    e->tgt.fail_writes = -ENOSPC;
    struct gw g = {.e = e, .off = 2 * CL, .len = 4096, .fill = 'E'};
    coro_enter(coro_create(e->pool, guest_write_co, &g));
    sched_run(&e->s);
    assert_int_equal(g.ret, -ENOSPC);
    assert_true(all(e->src.buf, SIZE, 'A'));
    assert_int_equal(cbw_copied_bytes(e->cbw), 0);
    struct vr r = {.e = e, .off = 2 * CL, .len = CL};
    coro_enter(coro_create(e->pool, view_read_co, &r));
    sched_run(&e->s);
    assert_int_equal(r.ret, 0);
    assert_true(all(r.buf, CL, 'A'));
    env_free(e);
}

/* Block status: copied clusters are data, the others the source's. */
struct bs {
    struct env *e;
    uint64_t off;
    struct fmt_extent ext;
    int ret;
};

static void bs_co(struct coro *co, void *opaque)
{
    struct bs *b = opaque;
    b->ret = fmt_block_status_co(b->e->view, co, b->off, SIZE - b->off, &b->ext);
}

static void test_block_status(void **state)
{
    (void)state;
    struct env *e = env_new();
    struct gw g = {.e = e, .off = CL, .len = 4096, .fill = 'F'};
    coro_enter(coro_create(e->pool, guest_write_co, &g));
    sched_run(&e->s);
    struct bs b0 = {.e = e, .off = 0}, b1 = {.e = e, .off = CL};
    coro_enter(coro_create(e->pool, bs_co, &b0));
    coro_enter(coro_create(e->pool, bs_co, &b1));
    sched_run(&e->s);
    assert_int_equal(b0.ret, 0);
    assert_int_equal(b0.ext.len, CL);       /* stops where the copy starts */
    assert_int_equal(b0.ext.flags, FMT_EXT_ZERO);
    assert_int_equal(b1.ret, 0);
    assert_int_equal(b1.ext.len, CL);
    assert_int_equal(b1.ext.flags, 0);
    env_free(e);
}

/* Once detached, writes copy nothing and the view fails with EIO. */
struct det {
    struct env *e;
    bool done;
};

static void detach_co(struct coro *co, void *opaque)
{
    struct det *d = opaque;
    cbw_detach_co(d->e->cbw, co);
    d->done = true;
}

static void test_detach(void **state)
{
    (void)state;
    struct env *e = env_new();
    /* a view read in flight: detach waits for it */
    e->src.hold_reads = true;
    struct vr r = {.e = e, .off = 0, .len = CL};
    coro_enter(coro_create(e->pool, view_read_co, &r));
    struct det d = {.e = e};
    coro_enter(coro_create(e->pool, detach_co, &d));
    sched_run(&e->s);
    assert_false(d.done);
    e->src.hold_reads = false;
    coro_wake(e->src.held);
    sched_run(&e->s);
    assert_true(r.done && d.done);
    assert_int_equal(r.ret, 0);
    assert_true(all(r.buf, CL, 'A'));
    struct gw g = {.e = e, .off = 0, .len = 4096, .fill = 'G'};
    coro_enter(coro_create(e->pool, guest_write_co, &g));
    sched_run(&e->s);
    assert_int_equal(g.ret, 0);
    assert_int_equal(e->tgt.writes, 0);
    struct vr r2 = {.e = e, .off = 0, .len = CL};
    coro_enter(coro_create(e->pool, view_read_co, &r2));
    sched_run(&e->s);
    assert_int_equal(r2.ret, -EIO);
    env_free(e);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_read_races_write),
        cmocka_unit_test(test_copy_once),
        cmocka_unit_test(test_copy_failure),
        cmocka_unit_test(test_block_status),
        cmocka_unit_test(test_detach),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
