/* strata — unit tests for the rbd: spec parser (backends/rbd-spec.c).
 *
 * Good specs are checked field by field; bad ones must fail with EINVAL and
 * a message naming the problem, and leave the spec empty.  Every parse
 * result is freed, so LeakSanitizer catches a leak on any path.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "rbd-spec.h"

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

static void assert_str(const char *got, const char *want)
{
    if (want == NULL)
        assert_null(got);
    else
        assert_non_null(got), assert_string_equal(got, want);
}

static void parse_ok(const char *text, struct rbd_spec *s)
{
    struct error *err = NULL;
    int r = rbd_spec_parse(text, s, &err);
    if (r != 0)
        fail_msg("%s: unexpected error: %s", text, err ? err->msg : "?");
    assert_null(err);
}

static void test_pool_image(void **state)
{
    (void)state;
    struct rbd_spec s;
    parse_ok("rbd:rbd/disk", &s);
    assert_str(s.pool, "rbd");
    assert_str(s.ns, NULL);
    assert_str(s.image, "disk");
    assert_str(s.snap, NULL);
    assert_str(s.conf, NULL);
    assert_str(s.id, NULL);
    assert_str(s.keyring, NULL);
    assert_int_equal(s.timeout, RBD_SPEC_DEFAULT_TIMEOUT);
    assert_int_equal(s.connect_timeout, RBD_SPEC_DEFAULT_CONNECT_TIMEOUT);
    assert_int_equal(s.n_opts, 0);
    rbd_spec_clear(&s);
    assert_null(s.pool);
}

static void test_namespace_snap(void **state)
{
    (void)state;
    struct rbd_spec s;
    parse_ok("rbd:pool/ns1/img@snap-1", &s);
    assert_str(s.pool, "pool");
    assert_str(s.ns, "ns1");
    assert_str(s.image, "img");
    assert_str(s.snap, "snap-1");
    rbd_spec_clear(&s);

    parse_ok("rbd:pool/img@s", &s);
    assert_str(s.ns, NULL);
    assert_str(s.image, "img");
    assert_str(s.snap, "s");
    rbd_spec_clear(&s);
}

static void test_options(void **state)
{
    (void)state;
    struct rbd_spec s;
    parse_ok("rbd:p/i@s:conf=/etc/ceph/x.conf:id=client.strata"
             ":keyring=/k/ring:timeout=5:connect_timeout=3"
             ":mon_host=127.0.0.1\\:3300:rbd_cache=false", &s);
    assert_str(s.pool, "p");
    assert_str(s.image, "i");
    assert_str(s.snap, "s");
    assert_str(s.conf, "/etc/ceph/x.conf");
    assert_str(s.id, "strata");          /* "client." is dropped */
    assert_str(s.keyring, "/k/ring");
    assert_int_equal(s.timeout, 5);
    assert_int_equal(s.connect_timeout, 3);
    assert_int_equal(s.n_opts, 2);
    assert_str(s.opts[0].key, "mon_host");
    assert_str(s.opts[0].val, "127.0.0.1:3300");
    assert_str(s.opts[1].key, "rbd_cache");
    assert_str(s.opts[1].val, "false");
    rbd_spec_clear(&s);

    /* id without the prefix; timeout 0 = none; a later key wins */
    parse_ok("rbd:p/i:id=admin:timeout=0:id=other", &s);
    assert_str(s.id, "other");
    assert_int_equal(s.timeout, 0);
    rbd_spec_clear(&s);

    /* options straight after the image, no snapshot */
    parse_ok("rbd:p/ns/i:conf=/c", &s);
    assert_str(s.ns, "ns");
    assert_str(s.image, "i");
    assert_str(s.snap, NULL);
    assert_str(s.conf, "/c");
    rbd_spec_clear(&s);
}

static void test_escapes(void **state)
{
    (void)state;
    struct rbd_spec s;
    parse_ok("rbd:p\\/q/im\\@age\\:x@sn\\:ap:conf=/a\\:b", &s);
    assert_str(s.pool, "p/q");
    assert_str(s.image, "im@age:x");
    assert_str(s.snap, "sn:ap");
    assert_str(s.conf, "/a:b");
    rbd_spec_clear(&s);

    /* '@' is literal inside a snapshot name and option values */
    parse_ok("rbd:p/i@a@b:keyring=/x@y", &s);
    assert_str(s.snap, "a@b");
    assert_str(s.keyring, "/x@y");
    rbd_spec_clear(&s);
}

static void test_bad_specs(void **state)
{
    (void)state;
    static const struct {
        const char *spec;
        const char *phrase;   /* the message must contain it */
    } bad[] = {
        {"file:/x", "not an rbd: spec"},
        {"rbd:", "expected rbd:POOL"},
        {"rbd:pool", "expected rbd:POOL"},
        {"rbd:pool@snap", "expected rbd:POOL"},
        {"rbd:pool:conf=/x", "expected rbd:POOL"},
        {"rbd:/img", "empty pool"},
        {"rbd:pool/", "empty pool, namespace or image"},
        {"rbd:pool//img", "empty pool, namespace or image"},
        {"rbd:a/b/c/d", "too many '/'"},
        {"rbd:p/i@", "empty snapshot"},
        {"rbd:p/i@:conf=/x", "empty snapshot"},
        {"rbd:p/i:", "expected KEY=VALUE"},
        {"rbd:p/i:conf", "expected KEY=VALUE"},
        {"rbd:p/i:conf=", "conf= needs a value"},
        {"rbd:p/i:id=client.", "id= needs a value"},
        {"rbd:p/i:timeout=", "expected whole seconds"},
        {"rbd:p/i:timeout=-1", "expected whole seconds"},
        {"rbd:p/i:timeout=1.5", "expected whole seconds"},
        {"rbd:p/i:timeout=86401", "expected whole seconds"},
        {"rbd:p/i:timeout=99999999999999999999", "expected whole seconds"},
        {"rbd:p/i:connect_timeout=0", "expected whole seconds"},
        {"rbd:p/i:=x", "not an option name"},
        {"rbd:p/i:bad.key=1", "not an option name"},
        {"rbd:p/i\\", "backslash at the end"},
        {"rbd:p/i:a=1:b=2:c=3:d=4:e=5:f=6:g=7:h=8:i=9:j=10:k=11:l=12:m=13"
         ":n=14:o=15:p=16:q=17", "more than 16"},
    };
    for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
        struct rbd_spec s;
        struct error *err = NULL;
        int r = rbd_spec_parse(bad[i].spec, &s, &err);
        if (r != -EINVAL || !err)
            fail_msg("%s: expected EINVAL, got %d", bad[i].spec, r);
        assert_int_equal(err->code, EINVAL);
        if (!strstr(err->msg, bad[i].phrase))
            fail_msg("%s: message '%s' lacks '%s'", bad[i].spec, err->msg,
                     bad[i].phrase);
        /* nothing left allocated in the spec */
        assert_null(s.pool);
        assert_null(s.image);
        assert_null(s.snap);
        assert_null(s.conf);
        assert_int_equal(s.n_opts, 0);
        error_free(err);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pool_image),
        cmocka_unit_test(test_namespace_snap),
        cmocka_unit_test(test_options),
        cmocka_unit_test(test_escapes),
        cmocka_unit_test(test_bad_specs),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
