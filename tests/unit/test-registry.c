/* strata — unit tests for the driver registries: backends found by spec
 * prefix and by QMP name (backends/backend.c), formats by name and by
 * probe (formats/format.c).  Layers above ask these functions instead of
 * naming drivers, so what they answer is pinned here.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "format.h"
#include "util.h"

static void test_backend_by_prefix(void **state)
{
    (void)state;
    assert_string_equal(backend_driver_of("rbd:p/i")->name, "rbd");
    assert_string_equal(backend_driver_of("/srv/a.qcow2")->name, "file");
    assert_string_equal(backend_driver_of("a.qcow2")->name, "file");
    assert_string_equal(backend_driver_of("rbd")->name, "file");
    assert_string_equal(backend_driver_of("rbdx:p/i")->name, "file");
    assert_true(backend_spec_is_local("/x"));
    assert_false(backend_spec_is_local("rbd:p/i"));
    assert_true(backend_spec_is_remote("rbd:p/i"));
    assert_ptr_equal(backend_find_driver("rbd"), &rbd_driver);
    assert_ptr_equal(backend_find_driver("file"), &file_driver);
    assert_null(backend_find_driver("nfs"));
    assert_string_equal(backend_driver_names(), "'file', 'nbd' and 'rbd'");
    assert_string_equal(backend_driver_of("nbd://h/e")->name, "nbd");
    assert_string_equal(backend_driver_of("nbd+unix:///e?socket=/s")->name,
                        "nbd");
    assert_string_equal(backend_driver_of("nbd:h:10809")->name, "nbd");
    assert_string_equal(backend_driver_of("nbdimage.raw")->name, "file");
    assert_ptr_equal(backend_find_driver("nbd"), &nbd_driver);
    assert_int_equal(file_driver.api_version, BACKEND_API_VERSION);
    assert_int_equal(rbd_driver.api_version, BACKEND_API_VERSION);
    struct error *err = NULL;
    assert_int_equal(backend_validate_spec("/any/path", &err), 0);
    assert_int_equal(backend_validate_spec("rbd:p/i@s:conf=/c", &err), 0);
    assert_null(err);
    assert_true(backend_validate_spec("rbd:p", &err) < 0);
    assert_non_null(strstr(err->msg, "expected rbd:POOL"));
    error_free(err);
}

static char *resolve_ok(const char *overlay, const char *name,
                        const char *remote)
{
    struct error *err = NULL;
    char *p = backend_resolve_backing(overlay, name, remote, &err);
    if (!p)
        fail_msg("%s under %s: %s", name, overlay, err ? err->msg : "?");
    assert_null(err);
    return p;
}

/* Which driver resolves a backing name: a prefix wins, an absolute path
 * is a file, anything else is relative to the overlay in its storage. */
static void test_resolve_dispatch(void **state)
{
    (void)state;
    static const struct {
        const char *overlay, *name, *want;
    } cases[] = {
        {"/d/top.qcow2", "base.qcow2", "/d/base.qcow2"},
        {"/d/top.qcow2", "../e/base.qcow2", "/d/../e/base.qcow2"},
        {"/d/top.qcow2", "/abs/base", "/abs/base"},
        {"top.qcow2", "base.qcow2", "base.qcow2"},
        {"rbd:p/top", "base", "rbd:p/base"},
        {"rbd:p/ns/top", "base@s", "rbd:p/ns/base@s"},
        {"rbd:p/top", "/abs/file", "/abs/file"},
        {"rbd:p/top", "rbd:q/other", "rbd:q/other"},
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        char *p = resolve_ok(cases[i].overlay, cases[i].name, NULL);
        assert_string_equal(p, cases[i].want);
        free(p);
    }
}

/* Remote storage under a local image: only with the export's
 * backing-remote=, whose settings (after the prefix) the driver gets. */
static void test_resolve_backing_remote(void **state)
{
    (void)state;
    char *p = resolve_ok("/d/top.qcow2", "rbd:p/i", "rbd:");
    assert_string_equal(p, "rbd:p/i");
    free(p);
    p = resolve_ok("/d/top.qcow2", "rbd:p/i@s", "rbd:conf=/c:id=u");
    assert_string_equal(p, "rbd:p/i@s:conf=/c:id=u");
    free(p);
    /* under an RBD overlay the overlay's cluster, not backing-remote= */
    p = resolve_ok("rbd:p/top:conf=/t", "base", "rbd:conf=/c");
    assert_string_equal(p, "rbd:p/base:conf=/t");
    free(p);
    /* a local name is not touched by backing-remote= */
    p = resolve_ok("/d/top.qcow2", "base", "rbd:conf=/c");
    assert_string_equal(p, "/d/base");
    free(p);

    struct error *err = NULL;
    assert_null(backend_resolve_backing("/d/top", "rbd:p/i", NULL, &err));
    assert_int_equal(err->code, EACCES);
    error_free(err);
    err = NULL;
    assert_null(backend_resolve_backing("/d/top", "rbd:p/i:conf=/etc/passwd",
                                        "rbd:", &err));
    assert_int_equal(err->code, EPERM);
    assert_non_null(strstr(err->msg, "sets 'conf'"));
    error_free(err);

    err = NULL;
    assert_int_equal(backend_check_backing_remote("rbd:", &err), 0);
    assert_int_equal(backend_check_backing_remote("rbd:conf=/c:mon_host=a\\:1",
                                                  &err), 0);
    assert_null(err);
    assert_true(backend_check_backing_remote("/srv", &err) < 0);
    assert_non_null(strstr(err->msg, "prefix of remote storage"));
    error_free(err);
    err = NULL;
    assert_true(backend_check_backing_remote("rbd:=x", &err) < 0);
    error_free(err);
}

static void test_same_storage(void **state)
{
    (void)state;
    assert_true(backend_same_storage("rbd:p/i", "rbd:p/i:conf=/x"));
    assert_false(backend_same_storage("rbd:p/i", "rbd:p/j"));
    assert_false(backend_same_storage("rbd:p/i", "/p/i"));
    assert_false(backend_same_storage("/nonexistent/a", "/nonexistent/a"));
    char tmpl[] = "/tmp/strata-registry-XXXXXX";
    int fd = mkstemp(tmpl);
    assert_true(fd >= 0);
    close(fd);
    char other[PATH_MAX];
    snprintf(other, sizeof(other), "/tmp/./%s", tmpl + 5);
    assert_true(backend_same_storage(tmpl, other));
    unlink(tmpl);
}

static char *spec_of(const char *driver, const struct backend_kv *kv,
                     size_t n, struct error **err)
{
    return backend_spec_from_options(driver, kv, n, "file.", err);
}

static void test_spec_from_options(void **state)
{
    (void)state;
    struct error *err = NULL;
    const struct backend_kv f[] = {{"filename", "/x/y.qcow2"},
                                   {"aio", "io_uring"}};
    char *s = spec_of("file", f, 2, &err);
    assert_string_equal(s, "/x/y.qcow2");
    free(s);

    const struct backend_kv r[] = {
        {"pool", "p"}, {"image", "i:j"}, {"namespace", "n"},
        {"snapshot", "s"}, {"conf", "/c"}, {"user", "u"},
        {"server.0.host", "10.0.0.1"}, {"server.0.port", "3300"},
        {"server.1.host", "::1"}, {"server.1.port", "6789"},
    };
    s = spec_of("rbd", r, ARRAY_SIZE(r), &err);
    assert_non_null(s);
    assert_string_equal(s, "rbd:p/n/i\\:j@s:conf=/c:id=u:mon_host="
                           "10.0.0.1\\:3300;[\\:\\:1]\\:6789");
    free(s);

    static const struct {
        const char *driver;
        struct backend_kv kv[3];
        size_t n;
        const char *msg;
    } bad[] = {
        {NULL, {{"filename", "/x"}}, 1, "Parameter 'file.driver' is missing"},
        {"nfs", {{"filename", "/x"}}, 1, "Parameter 'file.driver' does not "
         "accept value 'nfs' (strata supports 'file', 'nbd' and 'rbd')"},
        {"file", {{"colour", "red"}}, 1, "Parameter 'file.colour' is unexpected"},
        {"file", {{"aio", "native"}}, 1, "Parameter 'file.filename' is missing"},
        {"rbd", {{"image", "i"}}, 1, "Parameter 'file.pool' is missing"},
        {"rbd", {{"pool", "p"}, {"image", "i"}, {"server", "x"}}, 3,
         "Invalid parameter type for 'file.server', expected: array"},
        {"rbd", {{"pool", "p"}, {"image", "i"}, {"server.0", "x"}}, 3,
         "Invalid parameter type for 'file.server[0]', expected: object"},
        {"rbd", {{"pool", "p"}, {"image", "i"}, {"server.0.host", "h"}}, 3,
         "Parameter 'file.server[].port' is missing"},
        {"rbd", {{"pool", "p"}, {"image", "i"}, {"key-secret", "k"}}, 3,
         "Parameters 'file.key-secret', 'file.auth-client-required' and "
         "'file.encrypt' are not supported by strata"},
    };
    for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
        err = NULL;
        s = spec_of(bad[i].driver, bad[i].kv, bad[i].n, &err);
        assert_null(s);
        assert_non_null(err);
        if (!strstr(err->msg, bad[i].msg))
            fail_msg("case %zu: got '%s', want '%s'", i, err->msg, bad[i].msg);
        assert_int_equal(err->code, EINVAL);
        error_free(err);
    }
}

static void test_relative_names(void **state)
{
    (void)state;
    struct error *err = NULL;
    char *s = backend_backing_name("rbd:p/top", "rbd:p/base@s:conf=/c",
                                   true, &err);
    assert_string_equal(s, "base@s");
    free(s);
    s = backend_backing_name("rbd:p/top", "rbd:q/base", true, &err);
    assert_null(s);
    assert_non_null(err);
    error_free(err);
    err = NULL;
    s = backend_backing_name("/d/top.qcow2", "rbd:q/base", true, &err);
    assert_null(s);
    assert_non_null(err);
    assert_non_null(strstr(err->msg, "cannot be named relative to"));
    error_free(err);
}

static void test_format_registry(void **state)
{
    (void)state;
    assert_ptr_equal(fmt_find_driver("qcow2"), &qcow2_driver);
    assert_ptr_equal(fmt_find_driver("raw"), &raw_driver);
    assert_null(fmt_find_driver("vmdk"));
    assert_string_equal(fmt_driver_names(), "raw, qcow2");
    const struct fmt_driver *d = fmt_default_overlay_driver();
    assert_true(fmt_driver_can_backing(d));
    assert_true(d->create_co && d->set_backing_co && d->backing_name &&
                d->backing_format);
    assert_false(fmt_driver_can_backing(&raw_driver));
    assert_false(fmt_driver_can_backing(NULL));
    assert_int_equal(qcow2_driver.api_version, FMT_API_VERSION);
    assert_int_equal(raw_driver.api_version, FMT_API_VERSION);
    assert_true(qcow2_driver.max_rw >= FMT_MAX_RW);
    assert_true(raw_driver.max_rw >= FMT_MAX_RW);
    uint8_t head[FMT_PROBE_BYTES] = {'Q', 'F', 'I', 0xfb};
    assert_int_equal(qcow2_driver.probe(head, sizeof(head)), 100);
    assert_int_equal(qcow2_driver.probe(head, 3), 0);
    head[3] = 0;
    assert_int_equal(qcow2_driver.probe(head, sizeof(head)), 0);
    assert_null(raw_driver.probe);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_backend_by_prefix),
        cmocka_unit_test(test_resolve_dispatch),
        cmocka_unit_test(test_resolve_backing_remote),
        cmocka_unit_test(test_same_storage),
        cmocka_unit_test(test_spec_from_options),
        cmocka_unit_test(test_relative_names),
        cmocka_unit_test(test_format_registry),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
