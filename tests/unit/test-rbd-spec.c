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

/* rbd_spec_format() reads back as the same spec: a round trip through
 * every escape and every option. */
static void test_format_round_trip(void **state)
{
    (void)state;
    const char *specs[] = {
        "rbd:rbd/disk",
        "rbd:p/ns/i@snap",
        "rbd:p\\/x/i\\:j\\@k@s\\:t",
        ("rbd:p/i:conf=/etc/ceph/c\\:d.conf:id=u:keyring=/k:timeout=0"
         ":connect_timeout=3:mon_host=127.0.0.1\\:3300:rbd_cache=false"),
        "rbd:p/a\\\\b",
    };
    for (size_t i = 0; i < ARRAY_SIZE(specs); i++) {
        struct rbd_spec a, b;
        parse_ok(specs[i], &a);
        char *text = rbd_spec_format(&a);
        assert_non_null(text);
        parse_ok(text, &b);
        assert_string_equal(a.pool, b.pool);
        assert_str(b.ns, a.ns);
        assert_string_equal(a.image, b.image);
        assert_str(b.snap, a.snap);
        assert_str(b.conf, a.conf);
        assert_str(b.id, a.id);
        assert_str(b.keyring, a.keyring);
        assert_int_equal(a.timeout, b.timeout);
        assert_int_equal(a.connect_timeout, b.connect_timeout);
        assert_int_equal(a.timeout_set, b.timeout_set);
        assert_int_equal(a.n_opts, b.n_opts);
        for (size_t j = 0; j < a.n_opts; j++) {
            assert_string_equal(a.opts[j].key, b.opts[j].key);
            assert_string_equal(a.opts[j].val, b.opts[j].val);
        }
        free(text);
        rbd_spec_clear(&a);
        rbd_spec_clear(&b);
    }
    /* a plain spec formats to itself */
    struct rbd_spec s;
    parse_ok("rbd:p/ns/i@s:conf=/c:id=u", &s);
    char *text = rbd_spec_format(&s);
    assert_string_equal(text, "rbd:p/ns/i@s:conf=/c:id=u");
    free(text);
    rbd_spec_clear(&s);
}

/* ---- round trip as a property: format(spec) parses back to spec ---- */

static uint64_t rng_state = 0x9e3779b97f4a7c15u;

static uint32_t rng(uint32_t n)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state % n);
}

/* A non-empty string that leans on what the syntax gives meaning to. */
static char *gen_str(const char *alphabet)
{
    static const char *const pieces[] = {"client.", "client", ":", "/", "@",
                                         "\\", "=", "\\:", "."};
    size_t cap = 64, n = 0;
    char *p = malloc(cap);
    unsigned parts = 1 + rng(4);
    for (unsigned i = 0; i < parts; i++) {
        const char *add;
        char one[2] = {0, 0};
        if (rng(3) == 0) {
            add = pieces[rng(ARRAY_SIZE(pieces))];
        } else {
            one[0] = alphabet[rng((uint32_t)strlen(alphabet))];
            add = one;
        }
        size_t len = strlen(add);
        if (n + len + 1 > cap)
            p = realloc(p, cap *= 2);
        memcpy(p + n, add, len);
        n += len;
    }
    p[n] = '\0';
    return p;
}

static char *maybe(const char *alphabet)
{
    return rng(2) ? gen_str(alphabet) : NULL;
}

/* A Ceph option name: no key the parser takes for itself. */
static char *gen_key(void)
{
    static const char *const keys[] = {"mon_host", "mon host", "rbd_cache",
                                       "log-file", "client_mount_timeout",
                                       "x", "ID", "Conf"};
    return strdup(keys[rng(ARRAY_SIZE(keys))]);
}

static void gen_spec(struct rbd_spec *s)
{
    static const char any[] = "abcXYZ09_-. :/@\\=,;[]";
    memset(s, 0, sizeof(*s));
    s->pool = gen_str(any);
    s->ns = maybe(any);
    s->image = gen_str(any);
    s->snap = maybe(any);
    s->conf = maybe(any);
    s->keyring = maybe(any);
    switch (rng(5)) {
    case 0: break;
    case 1: s->id = strdup("client."); break;
    case 2: s->id = strdup("client.client.x"); break;
    default: s->id = gen_str(any); break;
    }
    s->timeout = RBD_SPEC_DEFAULT_TIMEOUT;
    s->connect_timeout = RBD_SPEC_DEFAULT_CONNECT_TIMEOUT;
    if (rng(2)) {
        s->timeout = rng(RBD_SPEC_MAX_TIMEOUT + 1);
        s->timeout_set = true;
    }
    if (rng(2)) {
        s->connect_timeout = 1 + rng(RBD_SPEC_MAX_TIMEOUT);
        s->connect_timeout_set = true;
    }
    s->n_opts = rng(4);
    for (size_t i = 0; i < s->n_opts; i++) {
        s->opts[i].key = gen_key();
        s->opts[i].val = gen_str(any);
    }
}

static void assert_same_spec(const struct rbd_spec *a, const struct rbd_spec *b)
{
    assert_string_equal(a->pool, b->pool);
    assert_str(b->ns, a->ns);
    assert_string_equal(a->image, b->image);
    assert_str(b->snap, a->snap);
    assert_str(b->conf, a->conf);
    assert_str(b->id, a->id);
    assert_str(b->keyring, a->keyring);
    assert_int_equal(a->timeout, b->timeout);
    assert_int_equal(a->connect_timeout, b->connect_timeout);
    assert_int_equal(a->timeout_set, b->timeout_set);
    assert_int_equal(a->connect_timeout_set, b->connect_timeout_set);
    assert_int_equal(a->n_opts, b->n_opts);
    for (size_t j = 0; j < a->n_opts; j++) {
        assert_string_equal(a->opts[j].key, b->opts[j].key);
        assert_string_equal(a->opts[j].val, b->opts[j].val);
    }
}

static void test_format_round_trip_generated(void **state)
{
    (void)state;
    for (int i = 0; i < 5000; i++) {
        struct rbd_spec a, b;
        gen_spec(&a);
        char *text = rbd_spec_format(&a);
        assert_non_null(text);
        struct error *err = NULL;
        if (rbd_spec_parse(text, &b, &err) < 0)
            fail_msg("case %d: %s does not parse: %s", i, text, err->msg);
        assert_same_spec(&a, &b);
        /* and formatting is then stable */
        char *again = rbd_spec_format(&b);
        assert_string_equal(text, again);
        free(again);
        free(text);
        rbd_spec_clear(&a);
        rbd_spec_clear(&b);
    }
}

/* The Ceph user: one "client." is stripped when parsing and put back
 * when formatting, so ids that start with "client." survive. */
static void test_format_ceph_user(void **state)
{
    (void)state;
    static const struct {
        const char *spec, *id, *formatted;
    } cases[] = {
        {"rbd:p/i:id=x", "x", "rbd:p/i:id=x"},
        {"rbd:p/i:id=client.x", "x", "rbd:p/i:id=x"},
        {"rbd:p/i:id=client.client.x", "client.x",
         "rbd:p/i:id=client.client.x"},
        {"rbd:p/i:id=client.client.", "client.", "rbd:p/i:id=client.client."},
        {"rbd:p/i:id=client.client.client.y", "client.client.y",
         "rbd:p/i:id=client.client.client.y"},
        {"rbd:p/i:id=clientx", "clientx", "rbd:p/i:id=clientx"},
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct rbd_spec s, t;
        parse_ok(cases[i].spec, &s);
        assert_string_equal(s.id, cases[i].id);
        char *text = rbd_spec_format(&s);
        assert_string_equal(text, cases[i].formatted);
        parse_ok(text, &t);
        assert_string_equal(t.id, cases[i].id);
        free(text);
        rbd_spec_clear(&s);
        rbd_spec_clear(&t);
    }
}

static char *resolve_ok(const char *overlay, const char *settings,
                        const char *name)
{
    char *out = NULL;
    struct error *err = NULL;
    int r = rbd_spec_resolve_backing(overlay, settings, name, &out, &err);
    if (r != 0)
        fail_msg("%s under %s: unexpected error: %s", name,
                 overlay ? overlay : "(local)", err ? err->msg : "?");
    assert_non_null(out);
    return out;
}

static void test_resolve_backing(void **state)
{
    (void)state;
    static const struct {
        const char *overlay, *settings, *name, *want;
    } ok[] = {
        /* under a local overlay: the image from the name, the cluster from
         * the export's backing-remote= ("" = Ceph's defaults) */
        {NULL, "", "rbd:rbd/golden@v1", "rbd:rbd/golden@v1"},
        {NULL, "conf=/etc/ceph/c.conf:id=strata:mon_host=1.2.3.4\\:3300",
         "rbd:rbd/g", "rbd:rbd/g:conf=/etc/ceph/c.conf:id=strata:"
         "mon_host=1.2.3.4\\:3300"},
        {NULL, "timeout=0", "rbd:p/ns/i@s", "rbd:p/ns/i@s:timeout=0"},
        /* relative: the overlay's pool and namespace, and its cluster */
        {"rbd:pool/ns/top:conf=/c:id=u:timeout=5:rbd_cache=false", NULL, "base",
         "rbd:pool/ns/base:conf=/c:id=u:timeout=5:rbd_cache=false"},
        {"rbd:pool/top", NULL, "base@snap", "rbd:pool/base@snap"},
        /* an rbd: name under an RBD overlay: the overlay's cluster, even
         * when the export has backing-remote= (for local overlays) */
        {"rbd:p/top:conf=/c:id=u:keyring=/k:connect_timeout=4:mon_host=a",
         "conf=/other", "rbd:q/base",
         "rbd:q/base:conf=/c:id=u:keyring=/k:connect_timeout=4:mon_host=a"},
    };
    for (size_t i = 0; i < ARRAY_SIZE(ok); i++) {
        char *got = resolve_ok(ok[i].overlay, ok[i].settings, ok[i].name);
        if (strcmp(got, ok[i].want))
            fail_msg("%s under %s: got %s, want %s", ok[i].name,
                     ok[i].overlay ? ok[i].overlay : "(local)", got,
                     ok[i].want);
        free(got);
    }

    /* what a header may not say, and where RBD may not be reached */
    static const struct {
        const char *overlay, *settings, *name, *phrase;
        int code;
    } bad[] = {
        /* a local image naming local files, a host and a timeout */
        {NULL, "", "rbd:pool/img:conf=/dev/null:keyring=/etc/shadow:"
         "mon_host=127.0.0.1\\:1:connect_timeout=1", "sets 'conf'", EPERM},
        {NULL, "", "rbd:p/i:keyring=/etc/shadow", "sets 'keyring'", EPERM},
        {NULL, "", "rbd:p/i:id=client.admin", "sets 'id'", EPERM},
        {NULL, "", "rbd:p/i:timeout=0", "sets 'timeout'", EPERM},
        {NULL, "", "rbd:p/i:connect_timeout=1", "sets 'connect_timeout'",
         EPERM},
        {NULL, "", "rbd:p/i:mon_host=10.0.0.1", "sets the Ceph option "
         "'mon_host'", EPERM},
        {NULL, NULL, "rbd:p/i:log_file=/tmp/x",
         "sets the Ceph option 'log_file'", EPERM},
        {"rbd:p/top", NULL, "rbd:p/i:admin socket=/tmp/s",
         "sets the Ceph option 'admin socket'", EPERM},
        {"rbd:p/top:conf=/c", NULL, "rbd:p/i:conf=/etc/passwd",
         "sets 'conf'", EPERM},
        {"rbd:p/top", NULL, "rbd:p/i:keyring=/etc/shadow",
         "backing-remote=rbd:KEY=VALUE", EPERM},
        /* a local image reaches RBD only where the export allows it */
        {NULL, NULL, "rbd:p/i", "set backing-remote=rbd:", EACCES},
        {NULL, "=x", "rbd:p/i", "not an option name", EINVAL},
        {"rbd:p/top", NULL, "dir/base", "must be IMAGE[@SNAP]", EINVAL},
        {"rbd:p/top", NULL, "base@", "must be IMAGE[@SNAP]", EINVAL},
        {"rbd:p/top", NULL, "@s", "must be IMAGE[@SNAP]", EINVAL},
        {NULL, "", "base", "not an rbd: spec", EINVAL},
        {NULL, "", "rbd:p", "backing name: ", EINVAL},
    };
    for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
        char *out = (char *)"unchanged";
        struct error *err = NULL;
        int r = rbd_spec_resolve_backing(bad[i].overlay, bad[i].settings,
                                         bad[i].name, &out, &err);
        if (r != -bad[i].code || !err)
            fail_msg("%s: expected %d, got %d", bad[i].name, -bad[i].code, r);
        assert_null(out);
        if (!strstr(err->msg, bad[i].phrase))
            fail_msg("%s: message '%s' lacks '%s'", bad[i].name, err->msg,
                     bad[i].phrase);
        error_free(err);
    }
}

static void test_backing_name(void **state)
{
    (void)state;
    static const struct {
        const char *layer, *overlay, *settings, *want;
    } cases[] = {
        /* only the image: the cluster comes from the export */
        {"rbd:p/base:conf=/c:id=u:rbd_cache=false:mon_host=m", NULL, "",
         "rbd:p/base"},
        {"rbd:p/ns/base@s:conf=/c:id=u:timeout=5", "rbd:p/ns/top:conf=/c:id=u:"
         "timeout=5", NULL, "rbd:p/ns/base@s"},
        {"rbd:p/a\\:b@s\\:t:keyring=/k", "rbd:p/top", NULL, "rbd:p/a\\:b@s\\:t"},
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        char *out = NULL;
        struct error *err = NULL;
        int r = rbd_spec_backing_name(cases[i].layer, cases[i].overlay, &out,
                                      &err);
        if (r != 0)
            fail_msg("%s: %s", cases[i].layer, err ? err->msg : "?");
        if (strcmp(out, cases[i].want))
            fail_msg("%s under %s: got %s, want %s", cases[i].layer,
                     cases[i].overlay ? cases[i].overlay : "(local)", out,
                     cases[i].want);
        /* and it leads back to the layer, and passes the header rule */
        char *back = resolve_ok(cases[i].overlay, cases[i].settings, out);
        assert_true(rbd_spec_same_image(back, cases[i].layer));
        free(back);
        free(out);
    }
}

/* The settings of backing-remote=rbd:SETTINGS. */
static void test_parse_settings(void **state)
{
    (void)state;
    struct rbd_spec s;
    struct error *err = NULL;
    assert_int_equal(rbd_spec_parse_settings("", &s, &err), 0);
    assert_null(s.pool);
    assert_null(s.conf);
    assert_int_equal(s.timeout, RBD_SPEC_DEFAULT_TIMEOUT);
    rbd_spec_clear(&s);
    assert_int_equal(rbd_spec_parse_settings(
        "conf=/e/c\\:d:id=client.s:keyring=/k:timeout=7:mon_host=h\\:1", &s,
        &err), 0);
    assert_string_equal(s.conf, "/e/c:d");
    assert_string_equal(s.id, "s");
    assert_string_equal(s.keyring, "/k");
    assert_int_equal(s.timeout, 7);
    assert_int_equal(s.n_opts, 1);
    assert_string_equal(s.opts[0].val, "h:1");
    rbd_spec_clear(&s);
    assert_true(rbd_spec_parse_settings("conf", &s, &err) < 0);
    assert_non_null(strstr(err->msg, "expected KEY=VALUE"));
    error_free(err);
}

static void test_same_image(void **state)
{
    (void)state;
    assert_true(rbd_spec_same_image("rbd:p/i", "rbd:p/i:conf=/x"));
    assert_true(rbd_spec_same_image("rbd:p/n/i@s", "rbd:p/n/i@s:id=u"));
    assert_false(rbd_spec_same_image("rbd:p/i", "rbd:q/i"));
    assert_false(rbd_spec_same_image("rbd:p/i", "rbd:p/n/i"));
    assert_false(rbd_spec_same_image("rbd:p/i", "rbd:p/i@s"));
    assert_false(rbd_spec_same_image("rbd:p/i", "rbd:p/j"));
    assert_false(rbd_spec_same_image("rbd:p", "rbd:p"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pool_image),
        cmocka_unit_test(test_namespace_snap),
        cmocka_unit_test(test_options),
        cmocka_unit_test(test_escapes),
        cmocka_unit_test(test_bad_specs),
        cmocka_unit_test(test_format_round_trip),
        cmocka_unit_test(test_format_round_trip_generated),
        cmocka_unit_test(test_format_ceph_user),
        cmocka_unit_test(test_resolve_backing),
        cmocka_unit_test(test_parse_settings),
        cmocka_unit_test(test_backing_name),
        cmocka_unit_test(test_same_image),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
