/* Unit tests: TLS allow lists -- parsing LIST (';'-separated, blanks
 * trimmed, empty entries skipped), absent versus empty lists, exact and
 * fnmatch matching of X.509 DNs and PSK usernames, copies. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "tls.h"

static void test_parse(void **state)
{
    (void)state;
    struct tls_allow a;
    assert_int_equal(tls_allow_parse(" CN=a,O=X,C=GB ; ;CN=b*;psk-user;", &a,
                                     NULL), 0);
    assert_true(a.present);
    assert_int_equal(a.n, 3);
    assert_string_equal(a.entries[0], "CN=a,O=X,C=GB");
    assert_string_equal(a.entries[1], "CN=b*");
    assert_string_equal(a.entries[2], "psk-user");
    tls_allow_clear(&a);
    assert_false(a.present);
    assert_int_equal(a.n, 0);
}

static void test_absent_and_empty(void **state)
{
    (void)state;
    struct tls_allow absent = {0}, empty;
    assert_true(tls_allow_match(NULL, NULL));
    assert_true(tls_allow_match(&absent, NULL));
    assert_true(tls_allow_match(&absent, "CN=anyone"));
    assert_int_equal(tls_allow_parse("", &empty, NULL), 0);
    assert_true(empty.present);
    assert_false(tls_allow_match(&empty, "CN=anyone"));
    assert_false(tls_allow_match(&empty, NULL));
    tls_allow_clear(&empty);
}

static void test_match(void **state)
{
    (void)state;
    struct tls_allow a;
    assert_int_equal(tls_allow_parse("CN=alice,O=Example,C=GB;CN=*,O=Ops,C=GB;"
                                     "backup-?", &a, NULL), 0);
    assert_true(tls_allow_match(&a, "CN=alice,O=Example,C=GB"));
    assert_false(tls_allow_match(&a, "CN=alice,O=Example,C=G"));   /* exact */
    assert_false(tls_allow_match(&a, "CN=alice,O=Example,C=GBX"));
    assert_false(tls_allow_match(&a, "cn=alice,O=Example,C=GB"));  /* case */
    assert_true(tls_allow_match(&a, "CN=bob,O=Ops,C=GB"));         /* glob */
    assert_false(tls_allow_match(&a, "CN=bob,O=Opsx,C=GB"));
    assert_true(tls_allow_match(&a, "backup-1"));
    assert_false(tls_allow_match(&a, "backup-10"));
    assert_false(tls_allow_match(&a, NULL));                       /* no id */
    struct tls_allow b;
    assert_int_equal(tls_allow_copy(&a, &b), 0);
    tls_allow_clear(&a);
    assert_true(b.present);
    assert_true(tls_allow_match(&b, "CN=carol,O=Ops,C=GB"));
    tls_allow_clear(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse),
        cmocka_unit_test(test_absent_and_empty),
        cmocka_unit_test(test_match),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
