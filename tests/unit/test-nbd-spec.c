/* strata — unit tests for the nbd: spec parser and the header rules of
 * nbd:// backing names (backends/nbd-spec.c, backends/nbd-driver.c).
 *
 * Good specs are checked field by field and by their canonical form; bad
 * ones must fail with a message naming the problem.  Backing names must
 * reach only the overlay's server or the servers backing-remote=nbd:
 * allows.  Every result is freed, so LeakSanitizer catches a leak.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "nbd-spec.h"

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

static void check_parse(const char *text, const char *host, const char *port,
                        const char *sock, const char *export,
                        const char *canonical)
{
    struct nbd_spec s;
    struct error *err = NULL;
    if (nbd_spec_parse(text, &s, &err) < 0)
        fail_msg("%s: %s", text, err ? err->msg : "?");
    if (host)
        assert_string_equal(s.host, host), assert_string_equal(s.port, port);
    else
        assert_null(s.host), assert_null(s.port);
    if (sock)
        assert_string_equal(s.socket, sock);
    else
        assert_null(s.socket);
    assert_string_equal(s.export, export);
    char *c = nbd_spec_format(&s, true);
    assert_string_equal(c, canonical);
    /* the canonical form reads back the same */
    struct nbd_spec t;
    assert_int_equal(nbd_spec_parse(c, &t, NULL), 0);
    assert_true(nbd_spec_same_server(&s, &t));
    assert_string_equal(s.export, t.export);
    assert_int_equal(s.reconnect_delay, t.reconnect_delay);
    assert_int_equal(s.connect_timeout, t.connect_timeout);
    assert_int_equal(s.tls, t.tls);
    assert_int_equal(s.tls_verify_peer, t.tls_verify_peer);
    assert_int_equal(s.tls_verify_peer_set, t.tls_verify_peer_set);
    const char *const so[] = {s.tls_certificates, s.tls_psk_file,
                              s.tls_username};
    const char *const to[] = {t.tls_certificates, t.tls_psk_file,
                              t.tls_username};
    for (size_t i = 0; i < ARRAY_SIZE(so); i++) {
        if (so[i])
            assert_string_equal(so[i], to[i]);
        else
            assert_null(to[i]);
    }
    nbd_spec_clear(&t);
    free(c);
    nbd_spec_clear(&s);
}

static void test_parse_good(void **state)
{
    (void)state;
    check_parse("nbd://h", "h", "10809", NULL, "", "nbd://h:10809");
    check_parse("nbd://h:4000/golden", "h", "4000", NULL, "golden",
                "nbd://h:4000/golden");
    check_parse("nbd+tcp://127.0.0.1/a/b", "127.0.0.1", "10809", NULL, "a/b",
                "nbd://127.0.0.1:10809/a/b");
    check_parse("nbd://[::1]:10810/x%20y", "::1", "10810", NULL, "x y",
                "nbd://[::1]:10810/x%20y");
    check_parse("nbd+unix:///e?socket=/run/s.sock", NULL, NULL,
                "/run/s.sock", "e", "nbd+unix:///e?socket=/run/s.sock");
    check_parse("nbd+unix://?socket=/s", NULL, NULL, "/s", "",
                "nbd+unix:///?socket=/s");
    check_parse("nbd+unix:///?socket=/s&reconnect-delay=0", NULL, NULL, "/s",
                "", "nbd+unix:///?socket=/s&reconnect-delay=0");
    check_parse("nbd://h/e?reconnect-delay=7", "h", "10809", NULL, "e",
                "nbd://h:10809/e?reconnect-delay=7");
    /* QEMU's older syntax */
    check_parse("nbd:localhost:10809", "localhost", "10809", NULL, "",
                "nbd://localhost:10809");
    check_parse("nbd:h:99:exportname=base", "h", "99", NULL, "base",
                "nbd://h:99/base");
    check_parse("nbd:unix:/tmp/a:b.sock:exportname=e", NULL, NULL,
                "/tmp/a:b.sock", "e", "nbd+unix:///e?socket=/tmp/a:b.sock");
    /* TLS and the other options */
    check_parse("nbds://h/e", "h", "10809", NULL, "e", "nbds://h:10809/e");
    check_parse("nbds+tcp://h/e?tls-certificates=/etc/pki/a%20b", "h",
                "10809", NULL, "e",
                "nbds://h:10809/e?tls-certificates=/etc/pki/a%20b");
    check_parse("nbds+unix:///e?tls-psk-file=/k.psk&socket=/s&"
                "tls-username=alice", NULL, NULL, "/s", "e",
                "nbds+unix:///e?socket=/s&tls-psk-file=/k.psk&"
                "tls-username=alice");
    check_parse("nbds://h/e?tls-verify-peer=false&connect-timeout=5", "h",
                "10809", NULL, "e",
                "nbds://h:10809/e?connect-timeout=5&tls-verify-peer=false");
    check_parse("nbd://h/e?connect-timeout=0&reconnect-delay=3", "h",
                "10809", NULL, "e",
                "nbd://h:10809/e?reconnect-delay=3&connect-timeout=0");
    struct nbd_spec s;
    assert_int_equal(nbd_spec_parse("nbd://h", &s, NULL), 0);
    assert_int_equal(s.reconnect_delay, NBD_SPEC_DEFAULT_RECONNECT_DELAY);
    assert_false(s.reconnect_delay_set);
    assert_int_equal(s.connect_timeout, NBD_SPEC_DEFAULT_CONNECT_TIMEOUT);
    assert_false(s.tls);
    assert_false(s.tls_verify_peer_set);
    assert_false(nbd_spec_has_options(&s));
    nbd_spec_clear(&s);
    assert_int_equal(nbd_spec_parse("nbds://h?tls-verify-peer=on", &s, NULL),
                     0);
    assert_true(s.tls);
    assert_true(s.tls_verify_peer && s.tls_verify_peer_set);
    assert_true(nbd_spec_has_options(&s));
    nbd_spec_clear(&s);
}

static void test_parse_bad(void **state)
{
    (void)state;
    static const struct {
        const char *spec, *msg;
        int code;
    } bad[] = {
        {"nbd://h/e?tls-certificates=/d", "need TLS: write nbds://", EINVAL},
        {"nbd+unix:///e?socket=/s&tls-psk-file=/k", "need TLS", EINVAL},
        {"nbds://h/e?tls-certificates=/d&tls-psk-file=/k",
         "exclude each other", EINVAL},
        {"nbds://h/e?tls-username=u", "needs tls-psk-file=", EINVAL},
        {"nbds://h/e?tls-certificates=pki", "absolute path", EINVAL},
        {"nbds://h/e?tls-psk-file=", "is empty", EINVAL},
        {"nbds://h/e?tls-verify-peer=maybe", "true or false", EINVAL},
        {"nbds://h/e?connect-timeout=-1", "whole seconds", EINVAL},
        {"nbds:h:10809", "expected nbd[s]://", EINVAL},
        {"nbdsx://h/e", "expected nbd[s]://", EINVAL},
        {"nbd+unix:///e", "needs ?socket=PATH", EINVAL},
        {"nbd+unix://h/e?socket=/s", "takes no host", EINVAL},
        {"nbd://h/e?socket=/s", "socket= is for nbd+unix", EINVAL},
        {"nbd://h:0/e", "invalid port", EINVAL},
        {"nbd://h:65536", "invalid port", EINVAL},
        {"nbd://h:x", "invalid port", EINVAL},
        {"nbd:///e", "no host", EINVAL},
        {"nbd://::1/e", "brackets", EINVAL},
        {"nbd://[::1/e", "without ']'", EINVAL},
        {"nbd://a&b/e", "invalid character '&' in the host", EINVAL},
        {"nbd://a%20b/e", "invalid character '%' in the host", EINVAL},
        {"nbd://[a b]/e", "invalid byte 0x20 in the host", EINVAL},
        {"nbd://\xc3\xa9t\xc3\xa9/e", "invalid byte 0xc3", EINVAL},
        {"nbd://h/e?colour=red", "unknown option 'colour'", EINVAL},
        {"nbd://h/e?reconnect-delay=x", "whole seconds", EINVAL},
        {"nbd://h/e?reconnect-delay=99999", "whole seconds", EINVAL},
        {"nbd://h/e%2", "percent-encoding", EINVAL},
        {"nbd://h/e%00", "percent-encoding", EINVAL},
        {"nbd://h/e#frag", "fragment", EINVAL},
        {"nbd:h", "expected nbd:HOST:PORT", EINVAL},
        {"nbd:unix:", "expected nbd:unix:PATH", EINVAL},
        {"nbd+vsock://1/e", "expected nbd[s]://", EINVAL},
    };
    for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
        struct nbd_spec s;
        struct error *err = NULL;
        int r = nbd_spec_parse(bad[i].spec, &s, &err);
        if (r >= 0)
            fail_msg("%s: parsed", bad[i].spec);
        assert_int_equal(r, -bad[i].code);
        assert_non_null(err);
        if (!strstr(err->msg, bad[i].msg))
            fail_msg("%s: '%s' lacks '%s'", bad[i].spec, err->msg,
                     bad[i].msg);
        assert_null(s.host);
        assert_null(s.export);
        error_free(err);
    }
}

static void resolve(const char *overlay, const char *settings,
                    const char *name, const char *want, int want_err)
{
    char *out = NULL;
    struct error *err = NULL;
    int r = nbd_spec_resolve_backing(overlay, settings, name, &out, &err);
    if (want) {
        if (r < 0)
            fail_msg("%s under %s [%s]: %s", name, overlay ? overlay : "-",
                     settings ? settings : "-", err ? err->msg : "?");
        assert_string_equal(out, want);
        free(out);
    } else {
        if (r >= 0)
            fail_msg("%s under %s [%s]: resolved to %s", name,
                     overlay ? overlay : "-", settings ? settings : "-", out);
        assert_int_equal(r, -want_err);
        assert_null(out);
        error_free(err);
    }
}

static void test_resolve_backing(void **state)
{
    (void)state;
    const char *ov = "nbd://h:4000/dir/top?reconnect-delay=9";
    /* same server as the overlay: allowed, with the overlay's options */
    resolve(ov, NULL, "nbd://h:4000/base", "nbd://h:4000/base?reconnect-delay=9",
            0);
    resolve(ov, NULL, "nbd:H:4000:exportname=b", "nbd://H:4000/b?reconnect-delay=9",
            0);
    /* relative names: another export on the same server */
    resolve(ov, NULL, "base", "nbd://h:4000/dir/base?reconnect-delay=9", 0);
    resolve("nbd+unix:///top?socket=/s", NULL, "base",
            "nbd+unix:///base?socket=/s", 0);
    /* another server: only when allowed */
    resolve(ov, NULL, "nbd://evil/base", NULL, EACCES);
    resolve(ov, "h2", "nbd://evil/base", NULL, EACCES);
    resolve(ov, "evil", "nbd://evil/base", "nbd://evil:10809/base", 0);
    resolve(ov, "evil:10809", "nbd://evil:4000/base", NULL, EACCES);
    /* under a local (or RBD) overlay: never without backing-remote */
    resolve(NULL, NULL, "nbd://h/base", NULL, EACCES);
    resolve(NULL, NULL, "nbd+unix:///?socket=/etc/x", NULL, EACCES);
    resolve(NULL, "*", "nbd://anything:1/x", "nbd://anything:1/x", 0);
    resolve(NULL, "h;unix:/run/nbd/", "nbd+unix:///e?socket=/run/nbd/g.sock",
            "nbd+unix:///e?socket=/run/nbd/g.sock", 0);
    resolve(NULL, "unix:/run/nbd/", "nbd+unix:///e?socket=/run/nbd/../x",
            NULL, EACCES);
    resolve(NULL, "unix:/run/nbd/g.sock", "nbd+unix:///e?socket=/run/nbd/h",
            NULL, EACCES);
    resolve(NULL, "[::1]:4000;reconnect-delay=0", "nbd://[::1]:4000/e",
            "nbd://[::1]:4000/e?reconnect-delay=0", 0);
    resolve(NULL, "[::1]:4000", "nbd://[::2]:4000/e", NULL, EACCES);
    /* a header never sets options */
    resolve(ov, NULL, "nbd://h:4000/b?reconnect-delay=0", NULL, EPERM);
    resolve(NULL, "*", "nbd://h/b?reconnect-delay=0", NULL, EPERM);
    /* TLS: the operator's, never the header's */
    const char *ovt = "nbds://h:4000/dir/top?tls-certificates=/c";
    resolve(ovt, NULL, "nbd://h:4000/base",
            "nbds://h:4000/base?tls-certificates=/c", 0);
    resolve(ovt, NULL, "base", "nbds://h:4000/dir/base?tls-certificates=/c",
            0);
    resolve(ov, NULL, "nbds://h:4000/base", NULL, EACCES);
    resolve(NULL, "h", "nbds://h/b", NULL, EACCES);
    resolve(NULL, "h;tls-certificates=/c", "nbd://h/b",
            "nbds://h:10809/b?tls-certificates=/c", 0);
    resolve(NULL, "h;tls-psk-file=/k;tls-username=u;connect-timeout=5",
            "nbds://h/b",
            "nbds://h:10809/b?connect-timeout=5&tls-psk-file=/k&"
            "tls-username=u", 0);
    resolve(NULL, "*;tls-certificates=/c", "nbds://h/b?tls-certificates=/etc",
            NULL, EPERM);
    resolve(ovt, NULL, "nbds://h:4000/b?connect-timeout=1", NULL, EPERM);
    resolve(NULL, "h;tls-username=u", "nbds://h/b", NULL, EINVAL);
    resolve(NULL, "h;tls-certificates=rel", "nbds://h/b", NULL, EINVAL);
    /* bad settings */
    resolve(NULL, "reconnect-delay=1", "nbd://h/b", NULL, EINVAL);
    resolve(NULL, "unix:relative", "nbd://h/b", NULL, EINVAL);
    resolve(NULL, "", "nbd://h/b", NULL, EINVAL);
}

static void test_settings(void **state)
{
    (void)state;
    assert_int_equal(nbd_spec_check_settings("h", NULL), 0);
    assert_int_equal(nbd_spec_check_settings("*;reconnect-delay=3", NULL), 0);
    assert_int_equal(nbd_spec_check_settings("a:1;[::1];unix:/r/", NULL), 0);
    assert_int_equal(nbd_spec_check_settings("h;tls-certificates=/c;"
                                             "connect-timeout=9", NULL), 0);
    struct error *e2 = NULL;
    assert_int_equal(nbd_spec_check_settings("h;colour=red", &e2), -EINVAL);
    assert_non_null(strstr(e2->msg, "unknown option"));
    error_free(e2);
    e2 = NULL;
    assert_int_equal(nbd_spec_check_settings("h;tls-certificates=/c;"
                                             "tls-psk-file=/k", &e2), -EINVAL);
    assert_non_null(strstr(e2->msg, "exclude each other"));
    error_free(e2);
    struct error *err = NULL;
    assert_int_equal(nbd_spec_check_settings(NULL, &err), -EINVAL);
    assert_non_null(strstr(err->msg, "no server allowed"));
    error_free(err);
    err = NULL;
    assert_int_equal(backend_check_backing_remote("nbd:h:0", &err), -EINVAL);
    assert_non_null(strstr(err->msg, "backing-remote=nbd:h:0"));
    error_free(err);
    assert_int_equal(backend_check_backing_remote("nbd:h;unix:/s", NULL), 0);
}

static void test_driver(void **state)
{
    (void)state;
    /* what a header records: QEMU's form, no strata options */
    char *p = backend_backing_name("/x/top.qcow2",
                                   "nbd://h/base?reconnect-delay=3", false,
                                   NULL);
    assert_string_equal(p, "nbd://h:10809/base");
    free(p);
    p = backend_backing_name("/x/top.qcow2",
                             "nbds://h/base?tls-psk-file=/k&connect-timeout=1",
                             false, NULL);
    assert_string_equal(p, "nbds://h:10809/base");
    free(p);
    p = backend_backing_name("nbd://h/d/top", "nbd://h:10809/d/base", true,
                             NULL);
    assert_string_equal(p, "base");
    free(p);
    struct error *err = NULL;
    assert_null(backend_backing_name("nbd://h/top", "nbd://g/base", true,
                                     &err));
    error_free(err);
    assert_true(backend_same_storage("nbd://h/e", "nbd:h:10809:exportname=e"));
    assert_false(backend_same_storage("nbd://h/e", "nbd://h/f"));
    assert_false(backend_same_storage("nbd://h/e", "nbd://h:1/e"));
    /* an absolute path under an NBD overlay is a local file, relative
     * names stay on the server; local overlays need backing-remote */
    p = backend_resolve_backing("nbd://h/top", "/srv/base.raw", NULL, NULL);
    assert_string_equal(p, "/srv/base.raw");
    free(p);
    err = NULL;
    assert_null(backend_resolve_backing("/srv/top.qcow2", "nbd://h/b", NULL,
                                        &err));
    assert_int_equal(err->code, EACCES);
    error_free(err);
    p = backend_resolve_backing("/srv/top.qcow2", "nbd://h/b", "nbd:h", NULL);
    assert_string_equal(p, "nbd://h:10809/b");
    free(p);
    /* backing-remote= for rbd: allows no NBD server */
    err = NULL;
    assert_null(backend_resolve_backing("/srv/top.qcow2", "nbd://h/b",
                                        "rbd:", &err));
    assert_int_equal(err->code, EACCES);
    error_free(err);

    static const struct {
        struct backend_kv kv[4];
        size_t n;
        const char *spec, *msg;
    } qmp[] = {
        {{{"server.type", "inet"}, {"server.host", "h"},
          {"server.port", "4000"}, {"export", "e"}}, 4,
         "nbd://h:4000/e", NULL},
        {{{"server.type", "unix"}, {"server.path", "/s"},
          {"reconnect-delay", "1"}}, 3,
         "nbd+unix:///?socket=/s&reconnect-delay=1", NULL},
        {{{"server.type", "inet"}, {"server.host", "h"}}, 2, NULL,
         "Parameter 'file.server.port' is missing"},
        {{{"server.type", "vsock"}}, 1, NULL, "does not accept value"},
        {{{"server.type", "unix"}, {"server.path", "/s"},
          {"tls-creds", "t"}}, 3, NULL, "'file.tls-creds' is not supported"},
        {{{"server.type", "inet"}, {"server.host", "h"},
          {"server.port", "0"}}, 3, NULL, "invalid port"},
    };
    for (size_t i = 0; i < ARRAY_SIZE(qmp); i++) {
        err = NULL;
        p = backend_spec_from_options("nbd", qmp[i].kv, qmp[i].n, "file.",
                                      &err);
        if (qmp[i].spec) {
            if (!p)
                fail_msg("qmp[%zu]: %s", i, err ? err->msg : "?");
            assert_string_equal(p, qmp[i].spec);
            free(p);
        } else {
            assert_null(p);
            if (!strstr(err->msg, qmp[i].msg))
                fail_msg("qmp[%zu]: '%s' lacks '%s'", i, err->msg,
                         qmp[i].msg);
            error_free(err);
        }
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_good),
        cmocka_unit_test(test_parse_bad),
        cmocka_unit_test(test_resolve_backing),
        cmocka_unit_test(test_settings),
        cmocka_unit_test(test_driver),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
