/* strata — unit tests for opening a local file beneath a directory
 * (backend_open_opts.beneath_path, openat2 RESOLVE_BENEATH): what the
 * chain opener uses for backing files.
 *
 * The state of the file system at the moment of the open is all that
 * counts: each case below is what a symlink swapped in after the chain
 * opener's realpath() check would look like, and the open must refuse it.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backend.h"

static char top[64], root[128];

static void put(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static int setup(void **state)
{
    (void)state;
    snprintf(top, sizeof(top), "/tmp/strata-beneath-XXXXXX");
    assert_non_null(mkdtemp(top));
    char p[PATH_MAX + 32];
    snprintf(root, sizeof(root), "%s/root", top);
    assert_int_equal(mkdir(root, 0755), 0);
    snprintf(p, sizeof(p), "%s/sub", root);
    assert_int_equal(mkdir(p, 0755), 0);
    snprintf(p, sizeof(p), "%s/inside", root);
    put(p, "inside");
    snprintf(p, sizeof(p), "%s/outside", top);
    put(p, "outside");
    /* symlinks as an attacker would swap them in */
    snprintf(p, sizeof(p), "%s/abs-out", root);
    char target[PATH_MAX + 16];
    snprintf(target, sizeof(target), "%s/outside", top);
    assert_int_equal(symlink(target, p), 0);
    snprintf(p, sizeof(p), "%s/rel-out", root);
    assert_int_equal(symlink("../outside", p), 0);
    snprintf(p, sizeof(p), "%s/sub/deep-out", root);
    assert_int_equal(symlink("../../outside", p), 0);
    snprintf(p, sizeof(p), "%s/rel-in", root);
    assert_int_equal(symlink("sub/../inside", p), 0);
    snprintf(p, sizeof(p), "%s/magic", root);
    assert_int_equal(symlink("/proc/self/root/etc/passwd", p), 0);
    snprintf(p, sizeof(p), "%s/dir-out", root);
    assert_int_equal(symlink("..", p), 0);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[PATH_MAX + 16];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", top);
    return system(cmd) == 0 ? 0 : -1;
}

static struct backend *open_beneath(const char *rel, struct error **err)
{
    int dfd = open(root, O_PATH | O_DIRECTORY | O_CLOEXEC);
    assert_true(dfd >= 0);
    struct backend_open_opts o = {
        .read_only = true,
        .beneath_path = rel,
        .beneath_dirfd = dfd,
    };
    char spec[PATH_MAX + 64];
    snprintf(spec, sizeof(spec), "%s/%s", root, rel);
    struct backend *b = file_backend_open(NULL, spec, &o, err);
    close(dfd);
    return b;
}

static void test_inside_opens(void **state)
{
    (void)state;
    static const char *const ok[] = {"inside", "rel-in", "sub/../inside"};
    for (size_t i = 0; i < sizeof(ok) / sizeof(*ok); i++) {
        struct error *err = NULL;
        struct backend *b = open_beneath(ok[i], &err);
        if (!b)
            fail_msg("%s: %s", ok[i], err ? err->msg : "?");
        assert_int_equal(b->size, 6);
        backend_close(b);
    }
}

static void test_escapes_refused(void **state)
{
    (void)state;
    static const char *const bad[] = {"abs-out", "rel-out", "sub/deep-out",
                                      "../outside", "dir-out/outside",
                                      "magic"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(*bad); i++) {
        struct error *err = NULL;
        struct backend *b = open_beneath(bad[i], &err);
        if (b)
            fail_msg("%s: opened a file outside the root", bad[i]);
        assert_non_null(err);
        assert_int_equal(err->code, EACCES);
        assert_non_null(strstr(err->msg, "leads out of the backing root"));
        error_free(err);
    }
}

/* The identity of an open file is that of its descriptor: replacing the
 * name afterwards changes nothing. */
static void test_same_open_by_descriptor(void **state)
{
    (void)state;
    struct error *err = NULL;
    struct backend *a = open_beneath("inside", &err);
    struct backend *b = open_beneath("rel-in", &err);
    assert_non_null(a);
    assert_non_null(b);
    assert_true(backend_same_open(a, b));
    char p[PATH_MAX + 32], q[PATH_MAX + 32];
    snprintf(p, sizeof(p), "%s/inside", root);
    snprintf(q, sizeof(q), "%s/inside.moved", root);
    assert_int_equal(rename(p, q), 0);
    put(p, "another");
    struct backend *c = open_beneath("inside", &err);
    assert_non_null(c);
    assert_true(backend_same_open(a, b));
    assert_false(backend_same_open(a, c));
    backend_close(a);
    backend_close(b);
    backend_close(c);
    assert_int_equal(rename(q, p), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_inside_opens),
        cmocka_unit_test(test_escapes_refused),
        cmocka_unit_test(test_same_open_by_descriptor),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
