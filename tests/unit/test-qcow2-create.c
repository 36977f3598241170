/* strata — qcow2 image creation, overlays on an open chain and backing-link
 * rewrites, judged by qemu-img (check, info, compare).
 *
 * These are the format-level steps of an external snapshot and of
 * block-commit: a new overlay whose backing file is the current top, opened
 * on top of the already open chain, written through, then re-pointed at
 * another backing file.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "format.h"
#include "loop.h"
#include "scratch.h"


struct ctx {
    struct loop *loop;
    int step;
    int ret;
    char msg[512];
};

static void set_fail(struct ctx *c, struct error *e, const char *what)
{
    snprintf(c->msg, sizeof(c->msg), "%s: %s", what, e ? e->msg : "?");
    error_free(e);
    c->ret = -1;
}

/* Step 1: base.raw <- new overlay "top.qcow2" (relative name), opened on
 * the open base; write through it; close. */
static void create_and_write_co(struct coro *co, void *arg)
{
    struct ctx *c = arg;
    struct error *e = NULL;
    struct fmt_open_opts ro = {.format = "raw", .read_only = true};
    struct fmt_node *base = fmt_open_co(c->loop, co, scratch_path("base.raw"), &ro, &e);
    if (!base) {
        set_fail(c, e, "open base");
        return;
    }
    if (qcow2_create_co(c->loop, co, scratch_path("top.qcow2"), base->size, "base.raw",
                        "raw", &e) < 0) {
        set_fail(c, e, "create");
        fmt_close(base);
        return;
    }
    /* Creating over an existing file must fail and leave it alone. */
    if (qcow2_create_co(c->loop, co, scratch_path("top.qcow2"), base->size, "x", "raw",
                        &e) == 0) {
        snprintf(c->msg, sizeof(c->msg), "create over an existing file worked");
        c->ret = -1;
        fmt_close(base);
        return;
    }
    error_free(e);
    e = NULL;
    struct fmt_open_opts rw = {.format = "qcow2"};
    struct fmt_node *top = fmt_open_overlay_co(c->loop, co, scratch_path("top.qcow2"),
                                               base, &rw, &e);
    if (!top) {
        set_fail(c, e, "open overlay");
        fmt_close(base);
        return;
    }
    static uint8_t buf[65536 + 1000];
    memset(buf, 0xab, sizeof(buf));
    struct iovec v = {buf, sizeof(buf)};
    int r = fmt_pwritev_co(top, co, &v, 1, 100000, 0);
    if (r == 0)
        r = fmt_flush_co(top, co);
    if (r < 0) {
        snprintf(c->msg, sizeof(c->msg), "write through overlay: %s",
                 strerror(-r));
        c->ret = -1;
    }
    fmt_close(top); /* and base */
}

/* Step 2: the overlay's backing link moved to base2.raw. */
static void rebase_co(struct coro *co, void *arg)
{
    struct ctx *c = arg;
    struct error *e = NULL;
    struct fmt_open_opts rw = {.format = "qcow2"};
    struct fmt_node *top = fmt_open_co(c->loop, co, scratch_path("top.qcow2"), &rw, &e);
    if (!top) {
        set_fail(c, e, "open chain");
        return;
    }
    if (qcow2_set_backing_co(top, co, "base2.raw", "raw", &e) < 0)
        set_fail(c, e, "set backing");
    fmt_close(top);
}

/* Step 3: block-commit's needs: a backing layer reopened read-write,
 * written, put back read-only; the top grown in place and with its L1
 * table moved (5 TiB needs two L1 clusters at 64 KiB clusters). */
static void reopen_grow_co(struct coro *co, void *arg)
{
    struct ctx *c = arg;
    struct error *e = NULL;
    struct fmt_open_opts rw = {.format = "qcow2"};
    struct fmt_node *top = fmt_open_co(c->loop, co, scratch_path("top.qcow2"), &rw, &e);
    if (!top) {
        set_fail(c, e, "open chain");
        return;
    }
    struct fmt_node *base = top->backing;
    static uint8_t buf[4096];
    memset(buf, 0xcd, sizeof(buf));
    struct iovec v = {buf, sizeof(buf)};
    int r = 0;
    if (!base->read_only || fmt_reopen_co(base, co, false, &e) < 0) {
        set_fail(c, e, "reopen base read-write");
    } else if ((r = fmt_pwritev_co(base, co, &v, 1, 2 << 20, 0)) < 0 ||
               fmt_reopen_co(base, co, true, &e) < 0 || !base->read_only) {
        set_fail(c, e, "write base, reopen read-only");
    } else if (fmt_grow_co(top, co, UINT64_C(3) << 29, &e) < 0 ||
               top->size != UINT64_C(3) << 29) {
        set_fail(c, e, "grow in place");
    } else if (fmt_grow_co(top, co, UINT64_C(5) << 40, &e) < 0 ||
               top->size != UINT64_C(5) << 40) {
        set_fail(c, e, "grow with a new L1 table");
    } else if ((r = fmt_pwritev_co(top, co, &v, 1, UINT64_C(4) << 40, 0)) < 0 ||
               (r = fmt_flush_co(top, co)) < 0) {
        set_fail(c, NULL, "write past the old end");
    }
    fmt_close(top);
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

static void test_snapshot_steps(void **state)
{
    (void)state;
    char *err = NULL;
    struct ctx c = {0};
    c.loop = loop_new(64, 128 << 10, &err);
    assert_non_null(c.loop);

    assert_int_equal(scratch_sh("head -c 4M /dev/urandom > %s", scratch_path("base.raw")), 0);
    run(&c, create_and_write_co);
    assert_int_equal(scratch_sh("qemu-img check -q %s", scratch_path("top.qcow2")), 0);
    assert_int_equal(scratch_sh("qemu-img info %s | grep -q 'backing file: base.raw ('",
                        scratch_path("top.qcow2")), 0);
    assert_int_equal(scratch_sh("qemu-img info %s | grep -q 'backing file format: raw'",
                        scratch_path("top.qcow2")), 0);
    /* expected content: base with the written range */
    assert_int_equal(scratch_sh("cp %s %s && qemu-io -f raw -c 'write -P 0xab 100000 66536' "
                        "%s >/dev/null", scratch_path("base.raw"), scratch_path("want.raw"),
                        scratch_path("want.raw")), 0);
    assert_int_equal(scratch_sh("qemu-img compare -q %s %s", scratch_path("top.qcow2"),
                        scratch_path("want.raw")), 0);

    /* a different backing file, same guest content */
    assert_int_equal(scratch_sh("cp %s %s", scratch_path("base.raw"), scratch_path("base2.raw")), 0);
    run(&c, rebase_co);
    assert_int_equal(scratch_sh("qemu-img check -q %s", scratch_path("top.qcow2")), 0);
    assert_int_equal(scratch_sh("qemu-img info %s | grep -q 'backing file: base2.raw ('",
                        scratch_path("top.qcow2")), 0);
    assert_int_equal(scratch_sh("qemu-img compare -q %s %s", scratch_path("top.qcow2"),
                        scratch_path("want.raw")), 0);
    /* the link really moved: changing base.raw changes nothing */
    assert_int_equal(scratch_sh("dd if=/dev/zero of=%s bs=64k count=1 conv=notrunc "
                        "status=none", scratch_path("base.raw")), 0);
    assert_int_equal(scratch_sh("qemu-img compare -q %s %s", scratch_path("top.qcow2"),
                        scratch_path("want.raw")), 0);

    run(&c, reopen_grow_co);
    assert_int_equal(scratch_sh("qemu-img check -q %s", scratch_path("top.qcow2")), 0);
    assert_int_equal(scratch_sh("qemu-img info %s | grep -q 'virtual size: 5 TiB'",
                        scratch_path("top.qcow2")), 0);
    /* qemu-io says "Pattern verification failed" on a mismatch */
    assert_int_equal(scratch_sh("qemu-io -f qcow2 -c 'read -P 0xcd 4T 4k' -c "
                        "'read -P 0xcd 2M 4k' -c 'read -P 0 5M 64k' %s | "
                        "grep -q -e Pattern -e error", scratch_path("top.qcow2")), 1);
    loop_free(c.loop);
}

int main(void)
{
    static const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_snapshot_steps),
    };
    return SCRATCH_RUN("create", "command -v qemu-img >/dev/null && command -v qemu-io >/dev/null", "qemu-img/qemu-io", tests);
}
