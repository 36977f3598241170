/* strata — an allocation of one contiguous run of clusters longer than
 * a refcount block's range: growing an image whose L1 table then needs
 * more clusters in one run than a refcount block counts.  With 512-byte
 * clusters one L1 cluster maps 2 MiB of guest, so 2 GiB needs an L1
 * table of 1024 clusters in one run, while a refcount block counts 64
 * (64-bit refcounts) or 256 (16-bit) clusters.  A refcount block placed
 * at the first cluster of its own range would split every such run: the
 * allocation must place the blocks outside the run instead, not give up
 * (nor call the image corrupt).
 *
 * Each case: qemu-img create, writes, a grow to 2 GiB (with allocating
 * writes in flight beside it), writes at the end, the start and the
 * middle, a grow to 4 GiB, the same again; then qemu-img check finds the
 * image clean (no leak either) and qemu-img compare finds the bytes a raw
 * model holds.
 */
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "coro.h"
#include "format.h"
#include "loop.h"
#include "qcow2.h"
#include "scratch.h"

#define KiB 1024u
#define MiB (1024u * 1024u)
#define GiB (UINT64_C(1024) * MiB)


struct ctx {
    struct loop *loop;
    const char *img;
    int model;                 /* the raw model's descriptor */
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

/* A write of len bytes at off with pattern seed; the model follows. */
static int write_both(struct ctx *c, struct coro *co, struct fmt_node *n,
                      uint64_t off, uint64_t len, unsigned seed)
{
    uint8_t *buf = malloc(len);
    assert_non_null(buf);
    for (uint64_t i = 0; i < len; i++)
        buf[i] = (uint8_t)(((off + i) >> 9) * 7 + seed * 31 + 1);
    struct iovec v = {buf, len};
    int r = fmt_pwritev_co(n, co, &v, 1, off, 0);
    if (r == 0 &&
        pwrite(c->model, buf, len, (off_t)off) != (ssize_t)len)
        r = -1;
    free(buf);
    return r;
}

/* A write in a coroutine of its own, alongside a growth. */
struct req {
    struct ctx *c;
    struct fmt_node *n;
    uint64_t off, len;
    unsigned seed;
    int ret;
    bool done;
};

static void req_co(struct coro *co, void *arg)
{
    struct req *q = arg;
    q->ret = write_both(q->c, co, q->n, q->off, q->len, q->seed);
    q->done = true;
}

/* Lets the loop run until every request is done; false if one never is
 * (the bound only keeps a failing test from hanging). */
static bool wait_all(struct loop *l, struct coro *co, const struct req *q,
                     unsigned nq)
{
    for (int i = 0; i < 4000; i++) {
        unsigned done = 0;
        for (unsigned j = 0; j < nq; j++)
            done += q[j].done;
        if (done == nq)
            return true;
        struct loop_sleep sl;
        loop_sleep_init(&sl);
        loop_sleep_co(l, &sl, co, 2000000);
    }
    return false;
}

static void grow_co(struct coro *co, void *arg)
{
    struct ctx *c = arg;
    struct error *e = NULL;
    struct fmt_open_opts rw = {.format = "qcow2"};
    struct fmt_node *n = fmt_open_co(c->loop, co, c->img, &rw, &e);
    if (!n) {
        snprintf(c->msg, sizeof(c->msg), "open: %s", e ? e->msg : "?");
        error_free(e);
        c->ret = -1;
        return;
    }
    struct qcow2 *s = qcow2_of(n);
    int r;
    /* Data first: refcount blocks exist up to the end of the file. */
    for (unsigned i = 0; i < 16; i++) {
        r = write_both(c, co, n, (uint64_t)i * 4 * MiB, 64 * KiB, i);
        CHECK(c, r == 0, "write %u failed (%d)", i, r);
    }
    r = fmt_flush_co(n, co);
    CHECK(c, r == 0, "flush failed (%d)", r);
    static const uint64_t sizes[] = {2 * GiB, 4 * GiB};
    for (unsigned k = 0; k < 2; k++) {
        uint64_t sz = sizes[k];
        /* Allocating writes (new L2 tables and data clusters, some in
         * new refcount ranges) in flight while the growth allocates. */
        struct req q[8];
        for (unsigned j = 0; j < 8; j++) {
            q[j] = (struct req){.c = c, .n = n,
                                .off = 32 * MiB + (uint64_t)j * 2 * MiB +
                                       k * MiB,
                                .len = 16 * KiB, .seed = 50 + j + 8 * k};
            struct coro *w = coro_create(loop_coro_pool(c->loop), req_co,
                                         &q[j]);
            assert_non_null(w);
            coro_wake(w);
        }
        r = fmt_grow_co(n, co, sz, &e);
        bool all = wait_all(c->loop, co, q, 8);
        CHECK(c, all, "a write beside the growth did not complete");
        for (unsigned j = 0; j < 8; j++)
            CHECK(c, q[j].ret == 0, "a write beside the growth failed (%d)",
                  q[j].ret);
        CHECK(c, r == 0, "growing to %llu failed (%d: %s)",
              (unsigned long long)sz, r, e ? e->msg : "?");
        CHECK(c, !s->broken && n->size == sz, "after the growth to %llu: "
              "broken %d, size %llu", (unsigned long long)sz, s->broken,
              (unsigned long long)n->size);
        CHECK(c, ftruncate(c->model, (off_t)sz) == 0, "ftruncate");
        r = write_both(c, co, n, sz - 64 * KiB, 64 * KiB, 20 + k);
        CHECK(c, r == 0, "write at the end of %llu failed (%d)",
              (unsigned long long)sz, r);
        r = write_both(c, co, n, 4 * KiB, 8 * KiB, 30 + k);
        CHECK(c, r == 0, "write at the start failed (%d)", r);
        r = write_both(c, co, n, sz / 2 + 512, 4 * KiB, 40 + k);
        CHECK(c, r == 0, "write in the middle failed (%d)", r);
        r = fmt_flush_co(n, co);
        CHECK(c, r == 0, "flush failed (%d)", r);
    }
out:
    error_free(e);
    fmt_close(n);
}

static void one_case(unsigned refcount_bits)
{
    struct ctx c = {0};
    char *err = NULL;
    c.loop = loop_new(64, 128 << 10, &err);
    assert_non_null(c.loop);
    char img[512], model[512];
    snprintf(img, sizeof(img), "%s", scratch_path("img.qcow2"));
    snprintf(model, sizeof(model), "%s", scratch_path("model.raw"));
    c.img = img;
    assert_int_equal(scratch_sh("rm -f %s %s && qemu-img create -q -f qcow2 -o "
                        "cluster_size=512,refcount_bits=%u %s 64M", img,
                        model, refcount_bits, img), 0);
    c.model = open(model, O_RDWR | O_CREAT | O_TRUNC, 0644);
    assert_true(c.model >= 0);
    assert_int_equal(ftruncate(c.model, 64 * MiB), 0);
    assert_int_equal(loop_run_sync(c.loop, grow_co, &c), 0);
    loop_free(c.loop);
    if (c.ret)
        fprintf(stderr, "refcount_bits=%u: %s\n", refcount_bits, c.msg);
    assert_int_equal(c.ret, 0);
    assert_int_equal(close(c.model), 0);
    assert_int_equal(scratch_sh("qemu-img check -q %s", img), 0);
    assert_int_equal(scratch_sh("qemu-img compare -q -f raw -F qcow2 %s %s", model,
                        img), 0);
}

static void test_refcount_bits_64(void **state)
{
    (void)state;
    one_case(64);
}

static void test_refcount_bits_16(void **state)
{
    (void)state;
    one_case(16);
}

int main(void)
{
    static const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_refcount_bits_64),
        cmocka_unit_test(test_refcount_bits_16),
    };
    return SCRATCH_RUN("longrun", "command -v qemu-img >/dev/null", "qemu-img", tests);
}
