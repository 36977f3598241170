/* strata — unit tests for the NBD codec (proto/nbd-codec.c).
 *
 * Builders are checked byte for byte against arrays written by hand from the
 * NBD specification; parsers are round-tripped and fed every malformed form
 * we know of.  Parsers are always given an exactly-sized heap copy of their
 * input, so that an over-read is caught by AddressSanitizer.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "nbd-codec.h"

#define KiB (UINT64_C(1) << 10)
#define MiB (UINT64_C(1) << 20)
#define GiB (UINT64_C(1) << 30)
#define TiB (UINT64_C(1) << 40)

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* An exactly-sized heap copy: reading one byte past it trips ASan. */
static uint8_t *dup_exact(const void *p, size_t n)
{
    uint8_t *b = malloc(n);

    if (n) {
        assert_non_null(b);
        memcpy(b, p, n);
    }
    return b;
}

/* ======================= handshake ======================= */

static void test_greeting(void **state)
{
    static const uint8_t expected[NBD_GREETING_SIZE] = {
        'N', 'B', 'D', 'M', 'A', 'G', 'I', 'C',     /* 0x4e42444d41474943 */
        'I', 'H', 'A', 'V', 'E', 'O', 'P', 'T',     /* 0x49484156454F5054 */
        0x00, 0x03,                 /* FIXED_NEWSTYLE | NO_ZEROES */
    };
    uint8_t buf[NBD_GREETING_SIZE + 4];

    (void)state;
    memset(buf, 0xaa, sizeof(buf));
    assert_int_equal(nbd_build_greeting(buf, NBD_FLAG_FIXED_NEWSTYLE |
                                             NBD_FLAG_NO_ZEROES), 18);
    assert_memory_equal(buf, expected, sizeof(expected));
    assert_int_equal(buf[18], 0xaa);            /* nothing written past */

    assert_int_equal(nbd_build_greeting(buf, 0x0001), 18);
    assert_int_equal(buf[16], 0x00);
    assert_int_equal(buf[17], 0x01);
}

static void test_client_flags(void **state)
{
    static const struct {
        uint32_t client;
        uint16_t server;
        int ret;
    } t[] = {
        { 0, 0, 0 },
        { 0, 3, 0 },
        { NBD_FLAG_C_FIXED_NEWSTYLE, 3, 0 },
        { NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES, 3, 0 },
        { NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_FIXED_NEWSTYLE, 0 },
        /* NO_ZEROES not offered by the server. */
        { NBD_FLAG_C_NO_ZEROES, NBD_FLAG_FIXED_NEWSTYLE, -EPROTO },
        { NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES,
          NBD_FLAG_FIXED_NEWSTYLE, -EPROTO },
        /* FIXED_NEWSTYLE not offered by the server. */
        { NBD_FLAG_C_FIXED_NEWSTYLE, 0, -EPROTO },
        /* Unknown bits. */
        { 1u << 2, 3, -EPROTO },
        { NBD_FLAG_C_FIXED_NEWSTYLE | (1u << 2), 3, -EPROTO },
        { 1u << 16, 3, -EPROTO },
        { 1u << 31, 3, -EPROTO },
        { UINT32_MAX, UINT16_MAX, -EPROTO },
    };

    (void)state;
    for (size_t i = 0; i < ARRAY_SIZE(t); i++) {
        print_message("client 0x%x server 0x%x\n", t[i].client, t[i].server);
        assert_int_equal(nbd_check_client_flags(t[i].client, t[i].server),
                         t[i].ret);
    }
}

static void test_option_header(void **state)
{
    static const uint8_t good[NBD_OPTION_HEADER_SIZE] = {
        'I', 'H', 'A', 'V', 'E', 'O', 'P', 'T',
        0x00, 0x00, 0x00, 0x07,     /* NBD_OPT_GO */
        0x00, 0x01, 0x02, 0x03,     /* length 0x10203 */
    };
    struct nbd_option_header h = { 0, 0 };
    uint8_t *b;

    (void)state;
    b = dup_exact(good, sizeof(good));
    assert_int_equal(nbd_parse_option_header(b, sizeof(good), &h), 0);
    assert_int_equal(h.option, NBD_OPT_GO);
    assert_int_equal(h.length, 0x10203);
    free(b);

    /* Round trip through the byte helpers with extreme values. */
    {
        uint8_t rt[NBD_OPTION_HEADER_SIZE];

        be_put64(rt, NBD_OPT_MAGIC);
        be_put32(rt + 8, UINT32_MAX);
        be_put32(rt + 12, UINT32_MAX - 1);
        assert_int_equal(nbd_parse_option_header(rt, sizeof(rt), &h), 0);
        assert_int_equal(h.option, UINT32_MAX);
        assert_int_equal(h.length, UINT32_MAX - 1);
    }

    /* Bad magic: last byte flipped, the greeting magic, all zeroes. */
    {
        uint8_t bad[NBD_OPTION_HEADER_SIZE];

        memcpy(bad, good, sizeof(bad));
        bad[7] ^= 1;
        h.option = 99;
        assert_int_equal(nbd_parse_option_header(bad, sizeof(bad), &h),
                         -EPROTO);
        be_put64(bad, NBD_MAGIC);
        assert_int_equal(nbd_parse_option_header(bad, sizeof(bad), &h),
                         -EPROTO);
        memset(bad, 0, sizeof(bad));
        assert_int_equal(nbd_parse_option_header(bad, sizeof(bad), &h),
                         -EPROTO);
        assert_int_equal(h.option, 99);         /* untouched on error */
    }
}

static void test_option_reply(void **state)
{
    static const uint8_t expected_ack[NBD_OPTION_REPLY_SIZE] = {
        0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9,   /* NBD_REP_MAGIC */
        0x00, 0x00, 0x00, 0x07,     /* NBD_OPT_GO */
        0x00, 0x00, 0x00, 0x01,     /* NBD_REP_ACK */
        0x00, 0x00, 0x00, 0x00,     /* no payload */
    };
    static const uint8_t expected_err[NBD_OPTION_REPLY_SIZE] = {
        0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9,
        0x00, 0x00, 0x00, 0x2a,     /* option 42 */
        0x80, 0x00, 0x00, 0x01,     /* NBD_REP_ERR_UNSUP = 2^31 + 1 */
        0x00, 0x00, 0x01, 0x02,     /* 258 bytes of message */
    };
    uint8_t buf[NBD_OPTION_REPLY_SIZE];

    (void)state;
    assert_int_equal(nbd_build_option_reply(buf, NBD_OPT_GO, NBD_REP_ACK, 0),
                     20);
    assert_memory_equal(buf, expected_ack, sizeof(buf));
    assert_int_equal(nbd_build_option_reply(buf, 42, NBD_REP_ERR_UNSUP, 258),
                     20);
    assert_memory_equal(buf, expected_err, sizeof(buf));
}

/* ---- NBD_OPT_INFO / NBD_OPT_GO ---- */

static void test_opt_go_parse(void **state)
{
    static const uint8_t payload[] = {
        0x00, 0x00, 0x00, 0x03, 'a', 'b', 'c',     /* name "abc" */
        0x00, 0x02,                                 /* 2 info requests */
        0x00, 0x03,                                 /* NBD_INFO_BLOCK_SIZE */
        0x00, 0x01,                                 /* NBD_INFO_NAME */
    };
    static const uint8_t empty[] = {
        0x00, 0x00, 0x00, 0x00,     /* default export */
        0x00, 0x00,                 /* no info requests */
    };
    struct nbd_opt_go go;
    uint8_t *b;

    (void)state;
    b = dup_exact(payload, sizeof(payload));
    assert_int_equal(nbd_parse_opt_go(b, sizeof(payload), &go), 0);
    assert_int_equal(go.name_len, 3);
    assert_ptr_equal(go.name, (const char *)b + 4);
    assert_memory_equal(go.name, "abc", 3);
    assert_int_equal(go.n_info, 2);
    assert_ptr_equal(go.info, b + 9);
    assert_int_equal(be_get16(go.info), NBD_INFO_BLOCK_SIZE);
    assert_int_equal(be_get16(go.info + 2), NBD_INFO_NAME);
    free(b);

    b = dup_exact(empty, sizeof(empty));
    assert_int_equal(nbd_parse_opt_go(b, sizeof(empty), &go), 0);
    assert_int_equal(go.name_len, 0);
    assert_int_equal(go.n_info, 0);
    free(b);

    /* A name of exactly NBD_MAX_STRING bytes is fine. */
    {
        uint32_t len = 4 + NBD_MAX_STRING + 2 + 2;
        uint8_t *p = malloc(len);

        assert_non_null(p);
        be_put32(p, NBD_MAX_STRING);
        memset(p + 4, 'x', NBD_MAX_STRING);
        be_put16(p + 4 + NBD_MAX_STRING, 1);
        be_put16(p + 6 + NBD_MAX_STRING, NBD_INFO_EXPORT);
        assert_int_equal(nbd_parse_opt_go(p, len, &go), 0);
        assert_int_equal(go.name_len, NBD_MAX_STRING);
        assert_int_equal(go.n_info, 1);
        assert_int_equal(be_get16(go.info), NBD_INFO_EXPORT);
        free(p);
    }
}

static void test_opt_go_malformed(void **state)
{
    /* Each payload is malformed as a whole (len = sizeof). */
    static const uint8_t name_past_end[] = {
        0x00, 0x00, 0x00, 0x0a, 'a', 'b', 'c', 0x00, 0x00,
    };
    static const uint8_t name_huge[] = {            /* wraps a 32-bit sum */
        0xff, 0xff, 0xff, 0xff, 0x00, 0x00,
    };
    static const uint8_t name_eats_count[] = {      /* name_len = len - 5 */
        0x00, 0x00, 0x00, 0x02, 'a', 'b', 0x00,
    };
    static const uint8_t info_short[] = {           /* says 2, has 1 */
        0x00, 0x00, 0x00, 0x01, 'a', 0x00, 0x02, 0x00, 0x03,
    };
    static const uint8_t info_odd[] = {             /* says 1, has 1.5 */
        0x00, 0x00, 0x00, 0x01, 'a', 0x00, 0x01, 0x00, 0x03, 0x00,
    };
    static const uint8_t info_trailing[] = {        /* says 1, has 2 */
        0x00, 0x00, 0x00, 0x01, 'a', 0x00, 0x01, 0x00, 0x03, 0x00, 0x01,
    };
    static const uint8_t info_none_trailing[] = {   /* says 0, has 1 */
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03,
    };
    static const struct {
        const uint8_t *p;
        uint32_t len;
    } t[] = {
        { name_past_end, sizeof(name_past_end) },
        { name_huge, sizeof(name_huge) },
        { name_eats_count, sizeof(name_eats_count) },
        { info_short, sizeof(info_short) },
        { info_odd, sizeof(info_odd) },
        { info_trailing, sizeof(info_trailing) },
        { info_none_trailing, sizeof(info_none_trailing) },
    };
    static const uint8_t good[] = {
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    };
    struct nbd_opt_go go;

    (void)state;
    for (size_t i = 0; i < ARRAY_SIZE(t); i++) {
        uint8_t *b = dup_exact(t[i].p, t[i].len);

        print_message("malformed GO payload #%zu\n", i);
        go.name_len = 77;
        assert_int_equal(nbd_parse_opt_go(b, t[i].len, &go), -EINVAL);
        assert_int_equal(go.name_len, 77);      /* untouched on error */
        free(b);
    }

    /* Truncated: anything shorter than the 6 fixed bytes. */
    for (uint32_t len = 0; len < sizeof(good); len++) {
        uint8_t *b = dup_exact(good, len);

        assert_int_equal(nbd_parse_opt_go(b, len, &go), -EINVAL);
        free(b);
    }

    /* Name longer than NBD_MAX_STRING, even though it fits the payload. */
    {
        uint32_t n = NBD_MAX_STRING + 1, len = 4 + n + 2;
        uint8_t *p = malloc(len);

        assert_non_null(p);
        be_put32(p, n);
        memset(p + 4, 'x', n);
        be_put16(p + 4 + n, 0);
        assert_int_equal(nbd_parse_opt_go(p, len, &go), -EINVAL);
        free(p);
    }
}

/* ---- NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT ---- */

static const uint8_t meta_two[] = {
    0x00, 0x00, 0x00, 0x03, 'e', 'x', 'p',
    0x00, 0x00, 0x00, 0x02,                         /* 2 queries */
    0x00, 0x00, 0x00, 0x0f,
    'b', 'a', 's', 'e', ':', 'a', 'l', 'l', 'o', 'c', 'a', 't', 'i', 'o', 'n',
    0x00, 0x00, 0x00, 0x05, 'q', 'e', 'm', 'u', ':',
};

static void test_opt_meta_parse(void **state)
{
    static const uint8_t none[] = {
        0x00, 0x00, 0x00, 0x00,                     /* empty name */
        0x00, 0x00, 0x00, 0x00,                     /* no queries */
    };
    static const uint8_t empty_query[] = {
        0x00, 0x00, 0x00, 0x01, 'e',
        0x00, 0x00, 0x00, 0x01,
        0x00, 0x00, 0x00, 0x00,                     /* "" */
    };
    struct nbd_opt_meta m;
    struct nbd_meta_query q[4];
    uint8_t *b;

    (void)state;
    b = dup_exact(meta_two, sizeof(meta_two));
    assert_int_equal(nbd_parse_opt_meta(b, sizeof(meta_two), &m, q, 4), 0);
    assert_int_equal(m.name_len, 3);
    assert_ptr_equal(m.name, (const char *)b + 4);
    assert_memory_equal(m.name, "exp", 3);
    assert_int_equal(m.n_queries, 2);
    assert_int_equal(q[0].len, 15);
    assert_ptr_equal(q[0].str, (const char *)b + 15);
    assert_memory_equal(q[0].str, "base:allocation", 15);
    assert_int_equal(q[1].len, 5);
    assert_memory_equal(q[1].str, "qemu:", 5);
    /* Exactly as many slots as queries is enough. */
    assert_int_equal(nbd_parse_opt_meta(b, sizeof(meta_two), &m, q, 2), 0);
    free(b);

    b = dup_exact(none, sizeof(none));
    assert_int_equal(nbd_parse_opt_meta(b, sizeof(none), &m, NULL, 0), 0);
    assert_int_equal(m.name_len, 0);
    assert_int_equal(m.n_queries, 0);
    free(b);

    b = dup_exact(empty_query, sizeof(empty_query));
    assert_int_equal(nbd_parse_opt_meta(b, sizeof(empty_query), &m, q, 4), 0);
    assert_int_equal(m.n_queries, 1);
    assert_int_equal(q[0].len, 0);
    assert_ptr_equal(q[0].str, (const char *)b + 13);
    free(b);
}

static void test_opt_meta_malformed(void **state)
{
    static const uint8_t name_past_end[] = {
        0x00, 0x00, 0x00, 0x09, 'e', 'x', 'p', 0x00, 0x00, 0x00, 0x00,
    };
    static const uint8_t name_no_count[] = {        /* count cut short */
        0x00, 0x00, 0x00, 0x03, 'e', 'x', 'p', 0x00, 0x00, 0x00,
    };
    static const uint8_t query_past_end[] = {
        0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x01,
        0x00, 0x00, 0x00, 0x06, 'b', 'a', 's', 'e', ':',
    };
    static const uint8_t query_len_cut[] = {        /* query length cut */
        0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x01,
        0x00, 0x00, 0x00,
    };
    static const uint8_t query_len_huge[] = {
        0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x01,
        0xff, 0xff, 0xff, 0xff, 'a',
    };
    static const uint8_t count_too_high[] = {       /* says 2, has 1 */
        0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x02,
        0x00, 0x00, 0x00, 0x01, 'a',
        0x00, 0x00,
    };
    static const uint8_t count_huge[] = {
        0x00, 0x00, 0x00, 0x00,
        0xff, 0xff, 0xff, 0xff,
        0x00, 0x00, 0x00, 0x00,
    };
    static const uint8_t trailing[] = {             /* says 1, one byte more */
        0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x01,
        0x00, 0x00, 0x00, 0x01, 'a',
        'z',
    };
    static const uint8_t trailing_no_query[] = {
        0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00,
        0x00,
    };
    static const struct {
        const uint8_t *p;
        uint32_t len;
    } t[] = {
        { name_past_end, sizeof(name_past_end) },
        { name_no_count, sizeof(name_no_count) },
        { query_past_end, sizeof(query_past_end) },
        { query_len_cut, sizeof(query_len_cut) },
        { query_len_huge, sizeof(query_len_huge) },
        { count_too_high, sizeof(count_too_high) },
        { count_huge, sizeof(count_huge) },
        { trailing, sizeof(trailing) },
        { trailing_no_query, sizeof(trailing_no_query) },
    };
    struct nbd_opt_meta m;
    struct nbd_meta_query q[4];

    (void)state;
    for (size_t i = 0; i < ARRAY_SIZE(t); i++) {
        uint8_t *b = dup_exact(t[i].p, t[i].len);

        print_message("malformed META payload #%zu\n", i);
        m.n_queries = 77;
        assert_int_equal(nbd_parse_opt_meta(b, t[i].len, &m, q, 4), -EINVAL);
        assert_int_equal(m.n_queries, 77);      /* untouched on error */
        free(b);
    }

    /* Every truncation of a good payload is malformed. */
    for (uint32_t len = 0; len < sizeof(meta_two); len++) {
        uint8_t *b = dup_exact(meta_two, len);

        assert_int_equal(nbd_parse_opt_meta(b, len, &m, q, 4), -EINVAL);
        free(b);
    }

    /* Name and query strings longer than NBD_MAX_STRING. */
    {
        uint32_t n = NBD_MAX_STRING + 1, len = 4 + n + 4;
        uint8_t *p = calloc(1, len);

        assert_non_null(p);
        be_put32(p, n);
        assert_int_equal(nbd_parse_opt_meta(p, len, &m, q, 4), -EINVAL);
        free(p);

        len = 4 + 4 + 4 + n;
        p = calloc(1, len);
        assert_non_null(p);
        be_put32(p + 4, 1);
        be_put32(p + 8, n);
        assert_int_equal(nbd_parse_opt_meta(p, len, &m, q, 4), -EINVAL);
        /* ... while exactly NBD_MAX_STRING is accepted. */
        be_put32(p + 8, NBD_MAX_STRING);
        assert_int_equal(nbd_parse_opt_meta(p, len - 1, &m, q, 4), 0);
        assert_int_equal(q[0].len, NBD_MAX_STRING);
        free(p);
    }
}

static void test_opt_meta_too_many(void **state)
{
    static const uint8_t three[] = {
        0x00, 0x00, 0x00, 0x01, 'e',
        0x00, 0x00, 0x00, 0x03,
        0x00, 0x00, 0x00, 0x02, 'a', ':',
        0x00, 0x00, 0x00, 0x02, 'b', ':',
        0x00, 0x00, 0x00, 0x02, 'c', ':',
    };
    static const uint8_t three_bad[] = {            /* 3rd query cut short */
        0x00, 0x00, 0x00, 0x01, 'e',
        0x00, 0x00, 0x00, 0x03,
        0x00, 0x00, 0x00, 0x02, 'a', ':',
        0x00, 0x00, 0x00, 0x02, 'b', ':',
        0x00, 0x00, 0x00, 0x02, 'c',
    };
    struct nbd_opt_meta m;
    struct nbd_meta_query q[3];
    uint8_t *b;

    (void)state;
    b = dup_exact(three, sizeof(three));
    memset(q, 0, sizeof(q));
    assert_int_equal(nbd_parse_opt_meta(b, sizeof(three), &m, q, 2), -E2BIG);
    assert_int_equal(m.n_queries, 3);           /* as sent by the client */
    assert_int_equal(m.name_len, 1);
    assert_int_equal(q[0].len, 2);
    assert_memory_equal(q[0].str, "a:", 2);
    assert_int_equal(q[1].len, 2);
    assert_memory_equal(q[1].str, "b:", 2);
    assert_null(q[2].str);                      /* slot beyond max untouched */
    assert_int_equal(q[2].len, 0);

    assert_int_equal(nbd_parse_opt_meta(b, sizeof(three), &m, NULL, 0),
                     -E2BIG);
    assert_int_equal(m.n_queries, 3);
    assert_int_equal(nbd_parse_opt_meta(b, sizeof(three), &m, q, 3), 0);
    assert_memory_equal(q[2].str, "c:", 2);
    free(b);

    /* Malformed wins over too many: the reply must be INVALID, not TOO_BIG. */
    b = dup_exact(three_bad, sizeof(three_bad));
    assert_int_equal(nbd_parse_opt_meta(b, sizeof(three_bad), &m, q, 2),
                     -EINVAL);
    free(b);
}

/* ---- NBD_REP_INFO, NBD_REP_SERVER, NBD_REP_META_CONTEXT payloads ---- */

static void test_info_builders(void **state)
{
    static const uint8_t export[12] = {
        0x00, 0x00,                                         /* INFO_EXPORT */
        0x00, 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06,     /* size */
        0x04, 0x8d,             /* HAS_FLAGS|SEND_FLUSH|SEND_FUA|SEND_DF|
                                   SEND_CACHE */
    };
    static const uint8_t block_size[14] = {
        0x00, 0x03,                     /* INFO_BLOCK_SIZE */
        0x00, 0x00, 0x02, 0x00,         /* min 512 */
        0x00, 0x00, 0x10, 0x00,         /* pref 4096 */
        0x02, 0x00, 0x00, 0x00,         /* max 32 MiB */
    };
    static const uint8_t name[2 + 4] = { 0x00, 0x01, 'd', 'i', 's', 'k' };
    static const uint8_t desc[2 + 3] = { 0x00, 0x02, 'f', 'o', 'o' };
    static const uint8_t desc_empty[2] = { 0x00, 0x02 };
    uint8_t buf[64];

    (void)state;
    memset(buf, 0xaa, sizeof(buf));
    assert_int_equal(nbd_build_info_export(buf, UINT64_C(0x010203040506),
                                           NBD_FLAG_HAS_FLAGS |
                                           NBD_FLAG_SEND_FLUSH |
                                           NBD_FLAG_SEND_FUA |
                                           NBD_FLAG_SEND_DF |
                                           NBD_FLAG_SEND_CACHE), 12);
    assert_memory_equal(buf, export, sizeof(export));
    assert_int_equal(buf[12], 0xaa);

    memset(buf, 0xaa, sizeof(buf));
    assert_int_equal(nbd_build_info_block_size(buf, 512, 4096, 32 << 20), 14);
    assert_memory_equal(buf, block_size, sizeof(block_size));
    assert_int_equal(buf[14], 0xaa);

    memset(buf, 0xaa, sizeof(buf));
    assert_int_equal(nbd_build_info_string(buf, NBD_INFO_NAME, "disk", 4), 6);
    assert_memory_equal(buf, name, sizeof(name));
    assert_int_equal(buf[6], 0xaa);
    assert_int_equal(nbd_build_info_string(buf, NBD_INFO_DESCRIPTION, "foo",
                                           3), 5);
    assert_memory_equal(buf, desc, sizeof(desc));
    assert_int_equal(nbd_build_info_string(buf, NBD_INFO_DESCRIPTION, NULL,
                                           0), 2);
    assert_memory_equal(buf, desc_empty, sizeof(desc_empty));
}

static void test_rep_builders(void **state)
{
    static const uint8_t server[4 + 3 + 5] = {
        0x00, 0x00, 0x00, 0x03, 'v', 'm', '1', 'f', 'i', 'r', 's', 't',
    };
    static const uint8_t server_nodesc[4 + 3] = {
        0x00, 0x00, 0x00, 0x03, 'v', 'm', '1',
    };
    static const uint8_t server_default[4] = { 0x00, 0x00, 0x00, 0x00 };
    static const uint8_t meta[4 + 15] = {
        0x12, 0x34, 0x56, 0x78,
        'b', 'a', 's', 'e', ':', 'a', 'l', 'l', 'o', 'c', 'a', 't', 'i', 'o',
        'n',
    };
    uint8_t buf[64];

    (void)state;
    memset(buf, 0xaa, sizeof(buf));
    assert_int_equal(nbd_build_rep_server(buf, "vm1", 3, "first", 5), 12);
    assert_memory_equal(buf, server, sizeof(server));
    assert_int_equal(buf[12], 0xaa);

    memset(buf, 0xaa, sizeof(buf));
    assert_int_equal(nbd_build_rep_server(buf, "vm1", 3, NULL, 0), 7);
    assert_memory_equal(buf, server_nodesc, sizeof(server_nodesc));
    assert_int_equal(buf[7], 0xaa);

    assert_int_equal(nbd_build_rep_server(buf, "", 0, NULL, 0), 4);
    assert_memory_equal(buf, server_default, sizeof(server_default));

    memset(buf, 0xaa, sizeof(buf));
    assert_int_equal(nbd_build_rep_meta_context(buf, 0x12345678,
                                                "base:allocation", 15), 19);
    assert_memory_equal(buf, meta, sizeof(meta));
    assert_int_equal(buf[19], 0xaa);
}

/* ======================= transmission ======================= */

/* Encodes a request the way a client does (spec, "Request message"). */
static size_t encode_request(uint8_t *b, bool extended,
                             const struct nbd_request *r)
{
    be_put32(b, extended ? NBD_EXTENDED_REQUEST_MAGIC : NBD_REQUEST_MAGIC);
    be_put16(b + 4, r->flags);
    be_put16(b + 6, r->type);
    be_put64(b + 8, r->cookie);
    be_put64(b + 16, r->offset);
    if (extended) {
        be_put64(b + 24, r->length);
        return 32;
    }
    be_put32(b + 24, (uint32_t)r->length);
    return 28;
}

static void test_request_parse_compact(void **state)
{
    static const uint8_t wire[28] = {
        0x25, 0x60, 0x95, 0x13,                             /* magic */
        0x00, 0x01,                                         /* FUA */
        0x00, 0x01,                                         /* WRITE */
        0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08,     /* cookie */
        0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x02, 0x00,     /* offset */
        0x00, 0x01, 0x00, 0x00,                             /* length */
    };
    struct nbd_request r;
    uint8_t *b;

    (void)state;
    b = dup_exact(wire, sizeof(wire));
    assert_int_equal(nbd_parse_request(b, sizeof(wire), false, &r), 28);
    assert_int_equal(r.flags, NBD_CMD_FLAG_FUA);
    assert_int_equal(r.type, NBD_CMD_WRITE);
    assert_int_equal(r.cookie, UINT64_C(0x0102030405060708));
    assert_int_equal(r.offset, UINT64_C(0x100000200));
    assert_int_equal(r.length, 0x10000);
    free(b);

    /* More bytes than one header: only the header is consumed. */
    {
        uint8_t two[56];

        memcpy(two, wire, 28);
        memset(two + 28, 0xee, 28);
        assert_int_equal(nbd_parse_request(two, sizeof(two), false, &r), 28);
        assert_int_equal(r.length, 0x10000);
    }
}

static void test_request_parse_extended(void **state)
{
    static const uint8_t wire[32] = {
        0x21, 0xe4, 0x1c, 0x71,                             /* magic */
        0x00, 0x20,                                         /* PAYLOAD_LEN */
        0x00, 0x04,                                         /* TRIM */
        0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54, 0x32, 0x10,     /* cookie */
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe, 0x00,     /* offset */
        0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x10, 0x00,     /* 8 GiB + 4 KiB */
    };
    struct nbd_request r;
    uint8_t *b;

    (void)state;
    b = dup_exact(wire, sizeof(wire));
    assert_int_equal(nbd_parse_request(b, sizeof(wire), true, &r), 32);
    assert_int_equal(r.flags, NBD_CMD_FLAG_PAYLOAD_LEN);
    assert_int_equal(r.type, NBD_CMD_TRIM);
    assert_int_equal(r.cookie, UINT64_C(0xfedcba9876543210));
    assert_int_equal(r.offset, UINT64_C(0xfffffffffffffe00));
    assert_int_equal(r.length, 8 * GiB + 4 * KiB);
    free(b);
}

static void test_request_roundtrip(void **state)
{
    static const struct nbd_request t[] = {
        { 0, NBD_CMD_READ, 0, 0, 0 },
        { NBD_CMD_FLAG_DF, NBD_CMD_READ, 1, 4096, 65536 },
        { 0xffff, 0xffff, UINT64_MAX, UINT64_MAX, UINT32_MAX },
        { NBD_CMD_FLAG_REQ_ONE, NBD_CMD_BLOCK_STATUS, 0x8000000000000000u,
          1, 0x80000000u },
        { NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_WRITE_ZEROES,
          42, TiB, 512 },
    };
    uint8_t wire[32];
    struct nbd_request r;

    (void)state;
    for (size_t i = 0; i < ARRAY_SIZE(t); i++) {
        for (int ext = 0; ext <= 1; ext++) {
            struct nbd_request in = t[i];
            size_t n;

            if (ext)        /* extended headers carry 64-bit lengths */
                in.length |= UINT64_C(0x123456700000000);
            n = encode_request(wire, ext, &in);
            memset(&r, 0x5a, sizeof(r));
            assert_int_equal(nbd_parse_request(wire, n, ext, &r), (ssize_t)n);
            assert_int_equal(r.flags, in.flags);
            assert_int_equal(r.type, in.type);
            assert_int_equal(r.cookie, in.cookie);
            assert_int_equal(r.offset, in.offset);
            assert_int_equal(r.length, in.length);
        }
    }
}

static void test_request_parse_truncated(void **state)
{
    struct nbd_request in = { 0, NBD_CMD_READ, 7, 0, 512 }, r;
    uint8_t wire[32];

    (void)state;
    for (int ext = 0; ext <= 1; ext++) {
        size_t n = encode_request(wire, ext, &in);

        for (size_t len = 0; len < n; len++) {
            uint8_t *b = dup_exact(wire, len);

            r.cookie = 99;
            assert_int_equal(nbd_parse_request(b, len, ext, &r), 0);
            assert_int_equal(r.cookie, 99);     /* untouched */
            free(b);
        }
    }
    /* A whole compact request is still a truncated extended one. */
    encode_request(wire, false, &in);
    assert_int_equal(nbd_parse_request(wire, 28, true, &r), 0);
}

static void test_request_parse_bad_magic(void **state)
{
    struct nbd_request in = { 0, NBD_CMD_READ, 7, 0, 512 }, r;
    uint8_t wire[32];

    (void)state;
    /* Compact magic while extended headers were negotiated, and back. */
    encode_request(wire, false, &in);
    memset(wire + 28, 0, 4);
    assert_int_equal(nbd_parse_request(wire, 32, true, &r), -EPROTO);
    encode_request(wire, true, &in);
    assert_int_equal(nbd_parse_request(wire, 32, false, &r), -EPROTO);

    /* Reply magics, the historic request magic, one flipped bit, zero. */
    {
        static const uint32_t bad[] = {
            NBD_SIMPLE_REPLY_MAGIC, NBD_STRUCTURED_REPLY_MAGIC,
            NBD_EXTENDED_REPLY_MAGIC, 0x12560953, NBD_REQUEST_MAGIC ^ 1,
            NBD_EXTENDED_REQUEST_MAGIC ^ 0x80000000u, 0,
        };

        for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
            for (int ext = 0; ext <= 1; ext++) {
                encode_request(wire, ext, &in);
                be_put32(wire, bad[i]);
                assert_int_equal(nbd_parse_request(wire, 32, ext, &r),
                                 -EPROTO);
            }
        }
    }
}

/* ---- request validation ---- */

#define RW_FLAGS (NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH |                 \
                  NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM |                   \
                  NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_DF |            \
                  NBD_FLAG_SEND_CACHE | NBD_FLAG_SEND_FAST_ZERO)

/* Compact + structured, 1 MiB, 512-byte blocks, one context. */
static const struct nbd_session s_rw = {
    .export_size = MiB, .eflags = RW_FLAGS, .min_block = 512,
    .max_payload = 32 * MiB, .structured = true, .extended = false,
    .n_meta_contexts = 1,
};
/* Extended headers only (structured flag left clear), 1 TiB. */
static const struct nbd_session s_ext = {
    .export_size = TiB, .eflags = RW_FLAGS, .min_block = 512,
    .max_payload = 32 * MiB, .structured = false, .extended = true,
    .n_meta_contexts = 1,
};
static const struct nbd_session s_ro = {
    .export_size = MiB,
    .eflags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY | NBD_FLAG_SEND_FLUSH |
              NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM |
              NBD_FLAG_SEND_WRITE_ZEROES,
    .min_block = 512, .max_payload = 32 * MiB, .structured = true,
    .n_meta_contexts = 1,
};
/* Oldest client: no structured replies, no contexts, defaults (min_block
 * and max_payload 0 = not advertised), only FLUSH offered. */
static const struct nbd_session s_plain = {
    .export_size = GiB, .eflags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH,
};
/* Structured replies, SEND_DF advertised, no contexts, 4 KiB blocks. */
static const struct nbd_session s_noctx = {
    .export_size = MiB, .eflags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_DF,
    .min_block = 4096, .max_payload = MiB, .structured = true,
};
/* SEND_DF in eflags but structured replies not negotiated. */
static const struct nbd_session s_df_nostruct = {
    .export_size = MiB, .eflags = RW_FLAGS, .min_block = 512,
    .max_payload = MiB, .n_meta_contexts = 1,
};
/* Structured, but no DF / FAST_ZERO / FUA advertised. */
static const struct nbd_session s_few = {
    .export_size = MiB,
    .eflags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_WRITE_ZEROES,
    .min_block = 1, .max_payload = MiB, .structured = true,
    .n_meta_contexts = 1,
};
static const struct nbd_session s_small_max = {
    .export_size = GiB, .eflags = RW_FLAGS, .min_block = 512,
    .max_payload = MiB, .structured = true, .n_meta_contexts = 1,
};
static const struct nbd_session s_big_max = {
    .export_size = GiB, .eflags = RW_FLAGS, .min_block = 512,
    .max_payload = 64 * MiB, .structured = true, .n_meta_contexts = 1,
};
static const struct nbd_session s_empty = {
    .export_size = 0, .eflags = RW_FLAGS, .min_block = 512,
    .max_payload = 32 * MiB, .structured = true, .n_meta_contexts = 1,
};
/* Largest 512-aligned size: offset + length can wrap past 2^64. */
#define HUGE_SIZE UINT64_C(0xfffffffffffffe00)
static const struct nbd_session s_huge = {
    .export_size = HUGE_SIZE, .eflags = RW_FLAGS, .min_block = 512,
    .max_payload = 32 * MiB, .structured = true, .n_meta_contexts = 1,
};
static const struct nbd_session s_huge_ext = {
    .export_size = HUGE_SIZE, .eflags = RW_FLAGS, .min_block = 512,
    .max_payload = 32 * MiB, .extended = true, .n_meta_contexts = 1,
};

#define OK   NBD_VERDICT_OK
#define ERR  NBD_VERDICT_ERROR
#define DROP NBD_VERDICT_DISCONNECT
#define DISC NBD_VERDICT_DISC

#define FUA   NBD_CMD_FLAG_FUA
#define NOH   NBD_CMD_FLAG_NO_HOLE
#define DF    NBD_CMD_FLAG_DF
#define ONE   NBD_CMD_FLAG_REQ_ONE
#define FZ    NBD_CMD_FLAG_FAST_ZERO
#define PLEN  NBD_CMD_FLAG_PAYLOAD_LEN

#define READ  NBD_CMD_READ
#define WRITE NBD_CMD_WRITE
#define FLUSH NBD_CMD_FLUSH
#define TRIM  NBD_CMD_TRIM
#define CACHE NBD_CMD_CACHE
#define WZ    NBD_CMD_WRITE_ZEROES
#define BS    NBD_CMD_BLOCK_STATUS

struct validate_case {
    const char *name;
    const struct nbd_session *s;
    uint16_t type, flags;
    uint64_t offset, length;
    enum nbd_verdict verdict;
    uint32_t error;
    uint64_t payload;
};

static const struct validate_case validate_cases[] = {
    /* ---- well-formed requests, compact ---- */
    { "read", &s_rw, READ, 0, 0, 4096, OK, 0, 0 },
    { "read to the end", &s_rw, READ, 0, MiB - 4096, 4096, OK, 0, 0 },
    { "read whole export", &s_rw, READ, 0, 0, MiB, OK, 0, 0 },
    { "write", &s_rw, WRITE, 0, 4096, 4096, OK, 0, 4096 },
    { "write fua", &s_rw, WRITE, FUA, 4096, 4096, OK, 0, 4096 },
    { "flush", &s_rw, FLUSH, 0, 0, 0, OK, 0, 0 },
    { "trim", &s_rw, TRIM, 0, 0, MiB, OK, 0, 0 },
    { "trim fua", &s_rw, TRIM, FUA, 512, 512, OK, 0, 0 },
    { "write zeroes", &s_rw, WZ, 0, 0, 512, OK, 0, 0 },
    { "write zeroes all flags", &s_rw, WZ, FUA | NOH | FZ, 0, MiB, OK, 0, 0 },
    { "cache", &s_rw, CACHE, 0, 512, 1024, OK, 0, 0 },
    { "cache zero length", &s_rw, CACHE, 0, 512, 0, OK, 0, 0 },
    { "block status", &s_rw, BS, 0, 0, MiB, OK, 0, 0 },
    { "block status req_one", &s_rw, BS, ONE, 512, 512, OK, 0, 0 },
    { "block status to the end", &s_rw, BS, 0, MiB - 512, 512, OK, 0, 0 },
    { "read df", &s_rw, READ, DF, 0, 65536, OK, 0, 0 },
    /* Spec: FUA is valid on every command once SEND_FUA is negotiated. */
    { "read fua", &s_rw, READ, FUA, 0, 512, OK, 0, 0 },
    { "flush fua", &s_rw, FLUSH, FUA, 0, 0, OK, 0, 0 },
    { "cache fua", &s_rw, CACHE, FUA, 0, 512, OK, 0, 0 },
    { "block status fua", &s_rw, BS, FUA | ONE, 0, 512, OK, 0, 0 },
    { "min_block 1: unaligned read", &s_few, READ, 0, 1, 3, OK, 0, 0 },
    { "defaults: unaligned read", &s_plain, READ, 0, 7, 9, OK, 0, 0 },

    /* ---- disconnect request ---- */
    { "disc", &s_rw, NBD_CMD_DISC, 0, 0, 0, DISC, 0, 0 },
    { "disc with junk", &s_rw, NBD_CMD_DISC, 0xffff, 5, 7, DISC, 0, 0 },
    { "disc extended payload flag", &s_ext, NBD_CMD_DISC, PLEN, 0, 64,
      DISC, 0, 0 },

    /* ---- unknown commands and flags ---- */
    { "command 8", &s_rw, 8, 0, 0, 512, ERR, NBD_EINVAL, 0 },
    { "command 0xffff", &s_rw, 0xffff, 0, 0, 512, ERR, NBD_EINVAL, 0 },
    { "flag bit 6", &s_rw, READ, 1u << 6, 0, 512, ERR, NBD_EINVAL, 0 },
    { "flag bit 15", &s_rw, READ, 1u << 15, 0, 512, ERR, NBD_EINVAL, 0 },
    { "write flag bit 6 consumes", &s_rw, WRITE, 1u << 6, 0, 512,
      ERR, NBD_EINVAL, 512 },

    /* ---- flags on the wrong command / not negotiated ---- */
    { "payload_len compact read", &s_rw, READ, PLEN, 0, 512,
      ERR, NBD_EINVAL, 0 },
    { "payload_len compact write", &s_rw, WRITE, PLEN, 0, 512,
      ERR, NBD_EINVAL, 512 },
    { "no_hole on write", &s_rw, WRITE, NOH, 0, 512, ERR, NBD_EINVAL, 512 },
    { "no_hole on trim", &s_rw, TRIM, NOH, 0, 512, ERR, NBD_EINVAL, 0 },
    { "fast_zero on trim", &s_rw, TRIM, FZ, 0, 512, ERR, NBD_EINVAL, 0 },
    { "fast_zero not offered", &s_few, WZ, FZ, 0, 512, ERR, NBD_EINVAL, 0 },
    { "no_hole without fast_zero offer", &s_few, WZ, NOH, 0, 512, OK, 0, 0 },
    { "df on write", &s_rw, WRITE, DF, 0, 512, ERR, NBD_EINVAL, 512 },
    { "df on block status", &s_rw, BS, DF, 0, 512, ERR, NBD_EINVAL, 0 },
    { "df without structured", &s_df_nostruct, READ, DF, 0, 512,
      ERR, NBD_EINVAL, 0 },
    { "df without any negotiation", &s_plain, READ, DF, 0, 512,
      ERR, NBD_EINVAL, 0 },
    { "df without SEND_DF", &s_few, READ, DF, 0, 512, ERR, NBD_EINVAL, 0 },
    { "req_one on read", &s_rw, READ, ONE, 0, 512, ERR, NBD_EINVAL, 0 },
    { "req_one on write", &s_rw, WRITE, ONE, 0, 512, ERR, NBD_EINVAL, 512 },
    { "fua not offered", &s_plain, WRITE, FUA, 0, 512, ERR, NBD_EINVAL, 512 },
    { "fua not offered on read", &s_plain, READ, FUA, 0, 512,
      ERR, NBD_EINVAL, 0 },

    /* ---- read-only export ---- */
    { "ro write", &s_ro, WRITE, 0, 0, 512, ERR, NBD_EPERM, 512 },
    { "ro trim", &s_ro, TRIM, 0, 0, 512, ERR, NBD_EPERM, 0 },
    { "ro write zeroes", &s_ro, WZ, 0, 0, 512, ERR, NBD_EPERM, 0 },
    { "ro write past end", &s_ro, WRITE, 0, MiB, 512, ERR, NBD_EPERM, 512 },
    { "ro read", &s_ro, READ, 0, 0, 512, OK, 0, 0 },
    { "ro flush", &s_ro, FLUSH, 0, 0, 0, OK, 0, 0 },
    { "ro block status", &s_ro, BS, 0, 0, 512, OK, 0, 0 },

    /* ---- commands not offered in the transmission flags ---- */
    { "trim not offered", &s_plain, TRIM, 0, 0, 512, ERR, NBD_EINVAL, 0 },
    { "write zeroes not offered", &s_plain, WZ, 0, 0, 512,
      ERR, NBD_EINVAL, 0 },
    { "flush not offered", &s_few, FLUSH, 0, 0, 0, ERR, NBD_EINVAL, 0 },
    { "cache not offered is fine", &s_plain, CACHE, 0, 0, 512, OK, 0, 0 },
    { "write needs no flag", &s_plain, WRITE, 0, 0, 512, OK, 0, 512 },

    /* ---- flush ---- */
    { "flush nonzero length", &s_rw, FLUSH, 0, 0, 512, ERR, NBD_EINVAL, 0 },
    { "flush nonzero offset", &s_rw, FLUSH, 0, 512, 0, ERR, NBD_EINVAL, 0 },

    /* ---- block status ---- */
    { "bs without structured", &s_plain, BS, 0, 0, 512, ERR, NBD_EINVAL, 0 },
    { "bs without context", &s_noctx, BS, 0, 0, 4096, ERR, NBD_EINVAL, 0 },
    { "bs zero length", &s_rw, BS, 0, 0, 0, ERR, NBD_EINVAL, 0 },
    { "bs offset at end", &s_rw, BS, 0, MiB, 512, ERR, NBD_EINVAL, 0 },
    { "bs offset past end", &s_rw, BS, 0, 2 * MiB, 512, ERR, NBD_EINVAL, 0 },
    /* Spec, "Size constraints" and NBD_CMD_BLOCK_STATUS: a range that runs
     * past the end is refused like a READ's (docs/nbd-conformance.md). */
    { "bs length past end", &s_rw, BS, 0, MiB - 512, 0xfffffe00u,
      ERR, NBD_EINVAL, 0 },
    { "bs one block past end", &s_rw, BS, 0, MiB - 512, 1024,
      ERR, NBD_EINVAL, 0 },
    { "bs empty export", &s_empty, BS, 0, 0, 512, ERR, NBD_EINVAL, 0 },
    { "bs unaligned", &s_rw, BS, 0, 0, 100, ERR, NBD_EINVAL, 0 },

    /* ---- zero length ---- */
    { "zero read", &s_rw, READ, 0, 0, 0, ERR, NBD_EINVAL, 0 },
    { "zero write", &s_rw, WRITE, 0, 0, 0, ERR, NBD_EINVAL, 0 },
    { "zero trim", &s_rw, TRIM, 0, 0, 0, ERR, NBD_EINVAL, 0 },
    { "zero write zeroes", &s_rw, WZ, 0, 0, 0, ERR, NBD_EINVAL, 0 },

    /* ---- payload and maximum payload ---- */
    { "read over max", &s_small_max, READ, 0, 0, MiB + 512,
      ERR, NBD_EINVAL, 0 },
    { "read at max", &s_small_max, READ, 0, 0, MiB, OK, 0, 0 },
    { "write over max drops", &s_small_max, WRITE, 0, 0, MiB + 512,
      DROP, NBD_EINVAL, 0 },
    { "write at max", &s_small_max, WRITE, 0, 0, MiB, OK, 0, MiB },
    { "trim over max is fine", &s_small_max, TRIM, 0, 0, 64 * MiB, OK, 0, 0 },
    { "zeroes over max is fine", &s_small_max, WZ, 0, 0, GiB, OK, 0, 0 },
    { "default max: write 32M", &s_plain, WRITE, 0, 0, 32 * MiB,
      OK, 0, 32 * MiB },
    { "default max: write 32M+1", &s_plain, WRITE, 0, 0, 32 * MiB + 1,
      DROP, NBD_EINVAL, 0 },
    { "default max: read 32M+1", &s_plain, READ, 0, 0, 32 * MiB + 1,
      ERR, NBD_EINVAL, 0 },
    { "big max: read 48M", &s_big_max, READ, 0, 0, 48 * MiB, OK, 0, 0 },
    { "big max: write 32M", &s_big_max, WRITE, 0, 0, 32 * MiB,
      OK, 0, 32 * MiB },
    { "big max: write 48M drops", &s_big_max, WRITE, 0, 0, 48 * MiB,
      DROP, NBD_EINVAL, 0 },
    { "huge write drops before flags", &s_rw, WRITE, 1u << 6, 0, UINT32_MAX,
      DROP, NBD_EINVAL, 0 },
    { "huge write drops before ro", &s_ro, WRITE, 0, 0, 64 * MiB,
      DROP, NBD_EINVAL, 0 },

    /* ---- alignment ---- */
    { "read unaligned offset", &s_rw, READ, 0, 100, 512, ERR, NBD_EINVAL, 0 },
    { "read unaligned length", &s_rw, READ, 0, 0, 100, ERR, NBD_EINVAL, 0 },
    { "write unaligned", &s_rw, WRITE, 0, 1, 4096, ERR, NBD_EINVAL, 4096 },
    { "trim unaligned", &s_rw, TRIM, 0, 0, 513, ERR, NBD_EINVAL, 0 },
    { "zeroes unaligned", &s_rw, WZ, 0, 256, 512, ERR, NBD_EINVAL, 0 },
    { "cache unaligned", &s_rw, CACHE, 0, 0, 1, ERR, NBD_EINVAL, 0 },
    { "4k blocks: 512 offset", &s_noctx, READ, 0, 512, 4096,
      ERR, NBD_EINVAL, 0 },
    { "4k blocks: aligned", &s_noctx, READ, 0, 4096, 4096, OK, 0, 0 },

    /* ---- range ---- */
    { "read past end", &s_rw, READ, 0, MiB - 512, 1024, ERR, NBD_EINVAL, 0 },
    { "read beyond end", &s_rw, READ, 0, 2 * MiB, 512, ERR, NBD_EINVAL, 0 },
    { "write past end", &s_rw, WRITE, 0, MiB - 512, 1024,
      ERR, NBD_ENOSPC, 1024 },
    { "zeroes past end", &s_rw, WZ, 0, MiB, 512, ERR, NBD_ENOSPC, 0 },
    { "trim past end", &s_rw, TRIM, 0, MiB - 512, 1024, ERR, NBD_EINVAL, 0 },
    { "cache past end", &s_rw, CACHE, 0, MiB, 512, ERR, NBD_EINVAL, 0 },
    { "empty export read", &s_empty, READ, 0, 0, 512, ERR, NBD_EINVAL, 0 },
    { "empty export write", &s_empty, WRITE, 0, 0, 512,
      ERR, NBD_ENOSPC, 512 },
    { "empty export flush", &s_empty, FLUSH, 0, 0, 0, OK, 0, 0 },

    /* ---- overflow: offset + length wraps to exactly 0 ---- */
    { "overflow read", &s_huge, READ, 0, HUGE_SIZE - 512, 1024,
      ERR, NBD_EINVAL, 0 },
    { "overflow write", &s_huge, WRITE, 0, HUGE_SIZE - 512, 1024,
      ERR, NBD_ENOSPC, 1024 },
    { "overflow trim", &s_huge, TRIM, 0, HUGE_SIZE - 512, 1024,
      ERR, NBD_EINVAL, 0 },
    { "offset at 2^64-512", &s_huge, READ, 0, HUGE_SIZE, 512,
      ERR, NBD_EINVAL, 0 },
    { "read last block of 16 EiB", &s_huge, READ, 0, HUGE_SIZE - 512, 512,
      OK, 0, 0 },
    { "ext overflow trim", &s_huge_ext, TRIM, 0, 1024,
      UINT64_C(0xfffffffffffffc00), ERR, NBD_EINVAL, 0 },
    { "ext overflow zeroes", &s_huge_ext, WZ, 0, 1024,
      UINT64_C(0xfffffffffffffc00), ERR, NBD_ENOSPC, 0 },
    { "ext overflow block status", &s_huge_ext, BS, 0, HUGE_SIZE - 512,
      1024, ERR, NBD_EINVAL, 0 },
    { "ext block status to 2^64-512", &s_huge_ext, BS, 0, HUGE_SIZE - 512,
      512, OK, 0, 0 },
    { "ext trim whole 16 EiB", &s_huge_ext, TRIM, 0, 0, HUGE_SIZE,
      OK, 0, 0 },

    /* ---- extended headers ---- */
    { "ext write", &s_ext, WRITE, PLEN, 0, 4096, OK, 0, 4096 },
    { "ext write fua", &s_ext, WRITE, PLEN | FUA, 0, 4096, OK, 0, 4096 },
    { "ext write without payload_len", &s_ext, WRITE, 0, 0, 4096,
      DROP, NBD_EINVAL, 0 },
    { "ext write 32M", &s_ext, WRITE, PLEN, 0, 32 * MiB, OK, 0, 32 * MiB },
    { "ext write over max", &s_ext, WRITE, PLEN, 0, 32 * MiB + 512,
      DROP, NBD_EINVAL, 0 },
    { "ext write 2^32", &s_ext, WRITE, PLEN, 0, 4 * GiB,
      DROP, NBD_EINVAL, 0 },
    { "ext write zero payload", &s_ext, WRITE, PLEN, 0, 0,
      ERR, NBD_EINVAL, 0 },
    { "ext write past end", &s_ext, WRITE, PLEN, TiB, 512,
      ERR, NBD_ENOSPC, 512 },
    { "ext read", &s_ext, READ, 0, 0, 4096, OK, 0, 0 },
    { "ext read over 4G", &s_ext, READ, 0, 0, 8 * GiB, ERR, NBD_EINVAL, 0 },
    { "ext read df (extended implies structured)", &s_ext, READ, DF, 0, 4096,
      OK, 0, 0 },
    { "ext read with payload", &s_ext, READ, PLEN, 0, 16,
      ERR, NBD_EINVAL, 16 },
    { "ext read with huge payload", &s_ext, READ, PLEN, 0, 64 * MiB,
      DROP, NBD_EINVAL, 0 },
    { "ext flush with payload", &s_ext, FLUSH, PLEN, 0, 8,
      ERR, NBD_EINVAL, 8 },
    { "ext block status payload form", &s_ext, BS, PLEN, 0, 12,
      ERR, NBD_EINVAL, 12 },
    { "ext unknown command with payload", &s_ext, 42, PLEN, 0, 100,
      ERR, NBD_EINVAL, 100 },
    { "ext unknown command no payload", &s_ext, 42, 0, 0, 100,
      ERR, NBD_EINVAL, 0 },
    { "ext unknown flag with payload", &s_ext, WRITE, PLEN | (1u << 9), 0,
      512, ERR, NBD_EINVAL, 512 },
    { "ext trim 8G", &s_ext, TRIM, 0, 0, 8 * GiB, OK, 0, 0 },
    { "ext zeroes 8G", &s_ext, WZ, NOH, 4 * GiB, 8 * GiB, OK, 0, 0 },
    { "ext zeroes whole export", &s_ext, WZ, FZ, 0, TiB, OK, 0, 0 },
    { "ext block status 8G", &s_ext, BS, 0, 0, 8 * GiB, OK, 0, 0 },
    { "ext block status past end", &s_ext, BS, ONE, TiB - 512, TiB,
      ERR, NBD_EINVAL, 0 },
    { "ext trim past end", &s_ext, TRIM, 0, TiB - 4 * GiB, 8 * GiB,
      ERR, NBD_EINVAL, 0 },
    { "ext zeroes past end", &s_ext, WZ, 0, TiB - 4 * GiB, 8 * GiB,
      ERR, NBD_ENOSPC, 0 },
    { "ext cache 4G", &s_ext, CACHE, 0, 0, 4 * GiB, OK, 0, 0 },
};

static void test_validate_table(void **state)
{
    (void)state;
    for (size_t i = 0; i < ARRAY_SIZE(validate_cases); i++) {
        const struct validate_case *c = &validate_cases[i];
        struct nbd_request r = {
            .flags = c->flags, .type = c->type, .cookie = 0x1234 + i,
            .offset = c->offset, .length = c->length,
        };
        struct nbd_validation v;

        print_message("validate: %s\n", c->name);
        v = nbd_validate_request(&r, c->s);
        assert_int_equal(v.verdict, c->verdict);
        assert_int_equal(v.payload_len, c->payload);
        if (c->verdict == OK || c->verdict == DISC)
            assert_int_equal(v.error, 0);
        else
            assert_int_equal(v.error, c->error);
        assert_non_null(v.reason);
        assert_true(strlen(v.reason) > 0);
    }
}

/* The same request in both modes: compact lengths are 32-bit, so only the
 * extended form can carry a payload flag, and only it needs one. */
static void test_validate_modes(void **state)
{
    struct nbd_session s = s_rw;
    struct nbd_request w = { 0, WRITE, 1, 0, 4096 };
    struct nbd_validation v;

    (void)state;
    v = nbd_validate_request(&w, &s);
    assert_int_equal(v.verdict, OK);
    assert_int_equal(v.payload_len, 4096);

    s.extended = true;
    v = nbd_validate_request(&w, &s);
    assert_int_equal(v.verdict, DROP);
    assert_int_equal(v.payload_len, 0);

    w.flags = PLEN;
    v = nbd_validate_request(&w, &s);
    assert_int_equal(v.verdict, OK);
    assert_int_equal(v.payload_len, 4096);

    s.extended = false;
    v = nbd_validate_request(&w, &s);
    assert_int_equal(v.verdict, ERR);
    assert_int_equal(v.error, NBD_EINVAL);
    assert_int_equal(v.payload_len, 4096);

    /* Reasons differ per rule, so logs say what went wrong. */
    {
        struct nbd_request a = { 0, READ, 1, 0, 0 };
        struct nbd_request b = { 0, READ, 1, 100, 512 };
        struct nbd_validation va = nbd_validate_request(&a, &s_rw);
        struct nbd_validation vb = nbd_validate_request(&b, &s_rw);

        assert_int_equal(va.error, NBD_EINVAL);
        assert_int_equal(vb.error, NBD_EINVAL);
        assert_string_not_equal(va.reason, vb.reason);
    }
}

/* ---- replies ---- */

static void test_simple_reply(void **state)
{
    static const uint8_t expected[16] = {
        0x67, 0x44, 0x66, 0x98,                             /* magic */
        0x00, 0x00, 0x00, 0x1c,                             /* NBD_ENOSPC */
        0xde, 0xad, 0xbe, 0xef, 0x00, 0x00, 0x00, 0x01,     /* cookie */
    };
    uint8_t buf[20];

    (void)state;
    memset(buf, 0xaa, sizeof(buf));
    assert_int_equal(nbd_build_simple_reply(buf, UINT64_C(0xdeadbeef00000001),
                                            NBD_ENOSPC), 16);
    assert_memory_equal(buf, expected, sizeof(expected));
    assert_int_equal(buf[16], 0xaa);
}

static void test_chunk_header(void **state)
{
    static const uint8_t structured[20] = {
        0x66, 0x8e, 0x33, 0xef,                             /* magic */
        0x00, 0x01,                                         /* DONE */
        0x00, 0x01,                                         /* OFFSET_DATA */
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x2a,     /* cookie */
        0x00, 0x00, 0x10, 0x08,                             /* length */
    };
    static const uint8_t extended[32] = {
        0x6e, 0x8a, 0x27, 0x8c,                             /* magic */
        0x00, 0x00,                                         /* flags */
        0x80, 0x01,                                         /* ERROR */
        0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08,     /* cookie */
        0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x02, 0x00,     /* offset */
        0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x06,     /* length */
    };
    uint8_t buf[40];

    (void)state;
    assert_int_equal(nbd_chunk_header_size(false), 20);
    assert_int_equal(nbd_chunk_header_size(true), 32);

    memset(buf, 0xaa, sizeof(buf));
    assert_int_equal(nbd_build_chunk_header(buf, false, NBD_REPLY_FLAG_DONE,
                                            NBD_REPLY_TYPE_OFFSET_DATA, 42,
                                            UINT64_C(0x999), 4096 + 8), 20);
    assert_memory_equal(buf, structured, sizeof(structured));
    assert_int_equal(buf[20], 0xaa);            /* offset not written */

    memset(buf, 0xaa, sizeof(buf));
    assert_int_equal(nbd_build_chunk_header(buf, true, 0,
                                            NBD_REPLY_TYPE_ERROR,
                                            UINT64_C(0x0102030405060708),
                                            UINT64_C(0x10000000200),
                                            UINT64_C(0x100000006)), 32);
    assert_memory_equal(buf, extended, sizeof(extended));
    assert_int_equal(buf[32], 0xaa);
}

static void test_offset_hole(void **state)
{
    static const uint8_t expected[12] = {
        0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00,     /* offset 1 MiB */
        0x00, 0x01, 0x00, 0x00,                             /* 64 KiB */
    };
    uint8_t buf[16];

    (void)state;
    memset(buf, 0xaa, sizeof(buf));
    assert_int_equal(nbd_build_offset_hole(buf, MiB, 65536), 12);
    assert_memory_equal(buf, expected, sizeof(expected));
    assert_int_equal(buf[12], 0xaa);
}

static void test_error_payload(void **state)
{
    static const uint8_t expected[6 + 9] = {
        0x00, 0x00, 0x00, 0x16,         /* NBD_EINVAL */
        0x00, 0x09,                     /* message length */
        'b', 'a', 'd', ' ', 'r', 'a', 'n', 'g', 'e',
    };
    static const uint8_t no_msg[6] = { 0x00, 0x00, 0x00, 0x05, 0x00, 0x00 };
    uint8_t buf[6 + NBD_MAX_STRING + 16];

    (void)state;
    memset(buf, 0xaa, sizeof(buf));
    assert_int_equal(nbd_build_error_payload(buf, sizeof(buf), NBD_EINVAL,
                                             "bad range"), 15);
    assert_memory_equal(buf, expected, sizeof(expected));
    assert_int_equal(buf[15], 0xaa);

    /* No message, empty message. */
    assert_int_equal(nbd_build_error_payload(buf, sizeof(buf), NBD_EIO, NULL),
                     6);
    assert_memory_equal(buf, no_msg, sizeof(no_msg));
    assert_int_equal(nbd_build_error_payload(buf, sizeof(buf), NBD_EIO, ""),
                     6);
    assert_memory_equal(buf, no_msg, sizeof(no_msg));

    /* Truncated to fit cap exactly; nothing written past cap. */
    memset(buf, 0xaa, sizeof(buf));
    assert_int_equal(nbd_build_error_payload(buf, 6 + 3, NBD_EINVAL,
                                             "bad range"), 9);
    assert_int_equal(be_get16(buf + 4), 3);
    assert_memory_equal(buf + 6, "bad", 3);
    assert_int_equal(buf[9], 0xaa);

    /* Room for the header only; less than that writes nothing. */
    memset(buf, 0xaa, sizeof(buf));
    assert_int_equal(nbd_build_error_payload(buf, 6, NBD_EPERM, "x"), 6);
    assert_int_equal(be_get32(buf), NBD_EPERM);
    assert_int_equal(be_get16(buf + 4), 0);
    assert_int_equal(buf[6], 0xaa);
    memset(buf, 0xaa, sizeof(buf));
    assert_int_equal(nbd_build_error_payload(buf, 5, NBD_EPERM, "x"), 0);
    assert_int_equal(buf[0], 0xaa);

    /* Never longer than NBD_MAX_STRING, whatever cap allows. */
    {
        char *big = malloc(NBD_MAX_STRING + 101);

        assert_non_null(big);
        memset(big, 'm', NBD_MAX_STRING + 100);
        big[NBD_MAX_STRING + 100] = '\0';
        memset(buf, 0xaa, sizeof(buf));
        assert_int_equal(nbd_build_error_payload(buf, sizeof(buf), NBD_EIO,
                                                 big), 6 + NBD_MAX_STRING);
        assert_int_equal(be_get16(buf + 4), NBD_MAX_STRING);
        assert_int_equal(buf[6 + NBD_MAX_STRING - 1], 'm');
        assert_int_equal(buf[6 + NBD_MAX_STRING], 0xaa);
        free(big);
    }

    /* A cut never splits a UTF-8 sequence: "é" is c3 a9, "€" e2 82 ac. */
    assert_int_equal(nbd_build_error_payload(buf, 6 + 2, NBD_EIO, "a\xc3\xa9"),
                     7);
    assert_int_equal(be_get16(buf + 4), 1);
    assert_int_equal(buf[6], 'a');
    assert_int_equal(nbd_build_error_payload(buf, 6 + 3, NBD_EIO, "a\xc3\xa9"),
                     9);
    assert_memory_equal(buf + 6, "a\xc3\xa9", 3);
    assert_int_equal(nbd_build_error_payload(buf, 6 + 2, NBD_EIO,
                                             "\xe2\x82\xac!"), 6);
    assert_int_equal(nbd_build_error_payload(buf, 6 + 3, NBD_EIO,
                                             "\xe2\x82\xac!"), 9);
    assert_memory_equal(buf + 6, "\xe2\x82\xac", 3);
}

/* ---- block status ---- */

static void test_block_status_size(void **state)
{
    (void)state;
    assert_int_equal(nbd_block_status_size(false, 1), 12);
    assert_int_equal(nbd_block_status_size(false, 3), 28);
    assert_int_equal(nbd_block_status_size(true, 1), 24);
    assert_int_equal(nbd_block_status_size(true, 3), 56);
    /* The largest count does not wrap size_t. */
    assert_int_equal(nbd_block_status_size(true, UINT32_MAX),
                     8 + 16 * (uint64_t)UINT32_MAX);
}

static void test_block_status_compact(void **state)
{
    static const struct nbd_extent e[3] = {
        { 65536, NBD_STATE_HOLE | NBD_STATE_ZERO },
        { 512, 0 },
        { 4096, UINT64_C(0xabcd000000000002) },     /* high bits dropped */
    };
    static const uint8_t expected[4 + 3 * 8] = {
        0x00, 0x00, 0x00, 0x01,                             /* ctx id */
        0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03,
        0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x02,
    };
    uint8_t buf[64];

    (void)state;
    memset(buf, 0xaa, sizeof(buf));
    assert_int_equal(nbd_build_block_status(buf, false, 1, e, 3, 512), 28);
    assert_memory_equal(buf, expected, sizeof(expected));
    assert_int_equal(buf[28], 0xaa);
}

static void test_block_status_clip(void **state)
{
    static const struct {
        uint32_t min_block;
        uint32_t clipped;
    } t[] = {
        { 0, 0xfffffe00u },         /* not advertised: 512-byte multiple */
        { 1, 0xfffffe00u },
        { 512, 0xfffffe00u },
        { 4096, 0xfffff000u },
        { 65536, 0xffff0000u },
    };
    struct nbd_extent e[3] = {
        { 5 * GiB, NBD_STATE_HOLE },
        { 512, 0 },
        { 512, 0 },
    };
    uint8_t buf[64];

    (void)state;
    for (size_t i = 0; i < ARRAY_SIZE(t); i++) {
        memset(buf, 0xaa, sizeof(buf));
        /* The clipped extent ends the list: the next descriptor would
         * otherwise describe the wrong offset. */
        assert_int_equal(nbd_build_block_status(buf, false, 7, e, 3,
                                                t[i].min_block), 12);
        assert_int_equal(be_get32(buf), 7);
        assert_int_equal(be_get32(buf + 4), t[i].clipped);
        assert_int_equal(be_get32(buf + 8), NBD_STATE_HOLE);
        assert_int_equal(buf[12], 0xaa);
    }

    /* Clip in the middle: the extents before it are kept. */
    e[0].length = 512;
    e[1].length = UINT64_C(1) << 32;
    e[1].flags = NBD_STATE_ZERO;
    memset(buf, 0xaa, sizeof(buf));
    assert_int_equal(nbd_build_block_status(buf, false, 7, e, 3, 512), 20);
    assert_int_equal(be_get32(buf + 4), 512);
    assert_int_equal(be_get32(buf + 12), 0xfffffe00u);
    assert_int_equal(be_get32(buf + 16), NBD_STATE_ZERO);
    assert_int_equal(buf[20], 0xaa);

    /* An extent of exactly 2^32 - 1 fits and is kept whole. */
    e[1].length = UINT32_MAX;
    assert_int_equal(nbd_build_block_status(buf, false, 7, e, 3, 1), 28);
    assert_int_equal(be_get32(buf + 12), UINT32_MAX);
    assert_int_equal(be_get32(buf + 20), 512);
}

static void test_block_status_extended(void **state)
{
    static const struct nbd_extent e[2] = {
        { 5 * GiB, NBD_STATE_HOLE | NBD_STATE_ZERO },
        { 512, UINT64_C(0x8000000000000001) },
    };
    static const uint8_t expected[8 + 2 * 16] = {
        0x00, 0x00, 0x00, 0x02,                             /* ctx id */
        0x00, 0x00, 0x00, 0x02,                             /* count */
        0x00, 0x00, 0x00, 0x01, 0x40, 0x00, 0x00, 0x00,     /* 5 GiB */
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00,     /* 512 */
        0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01,
    };
    uint8_t buf[64];

    (void)state;
    memset(buf, 0xaa, sizeof(buf));
    assert_int_equal(nbd_build_block_status(buf, true, 2, e, 2, 512), 40);
    assert_memory_equal(buf, expected, sizeof(expected));
    assert_int_equal(buf[40], 0xaa);
}

/* ======================= errors and names ======================= */

static void test_errno_mapping(void **state)
{
    static const struct {
        int err;
        uint32_t nbd;
    } t[] = {
        { EPERM, NBD_EPERM }, { EROFS, NBD_EPERM },
        { EIO, NBD_EIO },
        { ENOMEM, NBD_ENOMEM },
        { EINVAL, NBD_EINVAL }, { ERANGE, NBD_EINVAL },
        { ENOSPC, NBD_ENOSPC }, { EFBIG, NBD_ENOSPC }, { EDQUOT, NBD_ENOSPC },
        { EOVERFLOW, NBD_EOVERFLOW },
        { ENOTSUP, NBD_ENOTSUP }, { EOPNOTSUPP, NBD_ENOTSUP },
        { ESHUTDOWN, NBD_ESHUTDOWN },
        /* Everything else is an I/O error. */
        { EAGAIN, NBD_EIO }, { ENOENT, NBD_EIO }, { EBADF, NBD_EIO },
        { EPROTO, NBD_EIO }, { E2BIG, NBD_EIO }, { EACCES, NBD_EIO },
        { 0, NBD_EIO }, { -EINVAL, NBD_EIO }, { 4095, NBD_EIO },
    };

    (void)state;
    for (size_t i = 0; i < ARRAY_SIZE(t); i++) {
        print_message("errno %d\n", t[i].err);
        assert_int_equal(nbd_errno_to_nbd(t[i].err), t[i].nbd);
    }
    /* The NBD values are the Linux errno values of the same name. */
    assert_int_equal(NBD_EPERM, 1);
    assert_int_equal(NBD_EIO, 5);
    assert_int_equal(NBD_ENOMEM, 12);
    assert_int_equal(NBD_EINVAL, 22);
    assert_int_equal(NBD_ENOSPC, 28);
    assert_int_equal(NBD_EOVERFLOW, 75);
    assert_int_equal(NBD_ENOTSUP, 95);
    assert_int_equal(NBD_ESHUTDOWN, 108);
}

static void test_names(void **state)
{
    static const char *const cmds[] = {
        "NBD_CMD_READ", "NBD_CMD_WRITE", "NBD_CMD_DISC", "NBD_CMD_FLUSH",
        "NBD_CMD_TRIM", "NBD_CMD_CACHE", "NBD_CMD_WRITE_ZEROES",
        "NBD_CMD_BLOCK_STATUS",
    };
    static const char *const opts[] = {
        NULL, "NBD_OPT_EXPORT_NAME", "NBD_OPT_ABORT", "NBD_OPT_LIST",
        "NBD_OPT_PEEK_EXPORT", "NBD_OPT_STARTTLS", "NBD_OPT_INFO",
        "NBD_OPT_GO", "NBD_OPT_STRUCTURED_REPLY", "NBD_OPT_LIST_META_CONTEXT",
        "NBD_OPT_SET_META_CONTEXT", "NBD_OPT_EXTENDED_HEADERS",
    };

    (void)state;
    for (uint16_t i = 0; i < ARRAY_SIZE(cmds); i++)
        assert_string_equal(nbd_cmd_name(i), cmds[i]);
    assert_string_equal(nbd_cmd_name(8), "unknown");
    assert_string_equal(nbd_cmd_name(0xffff), "unknown");

    for (uint32_t i = 1; i < ARRAY_SIZE(opts); i++)
        assert_string_equal(nbd_opt_name(i), opts[i]);
    assert_string_equal(nbd_opt_name(0), "unknown");
    assert_string_equal(nbd_opt_name(12), "unknown");
    assert_string_equal(nbd_opt_name(UINT32_MAX), "unknown");
}

/* The codec never touches errno, on success or on failure. */
static void test_errno_untouched(void **state)
{
    static const uint8_t junk[40] = { 0xff };
    uint8_t buf[64];
    struct nbd_option_header h;
    struct nbd_opt_go go;
    struct nbd_opt_meta m;
    struct nbd_request r = { 0xffff, 0xffff, 0, UINT64_MAX, UINT64_MAX };
    struct nbd_extent e = { 8 * GiB, 0 };

    (void)state;
    errno = 4242;
    assert_int_equal(nbd_check_client_flags(UINT32_MAX, 0), -EPROTO);
    assert_int_equal(nbd_parse_option_header(junk, 16, &h), -EPROTO);
    assert_int_equal(nbd_parse_opt_go(junk, sizeof(junk), &go), -EINVAL);
    assert_int_equal(nbd_parse_opt_meta(junk, sizeof(junk), &m, NULL, 0),
                     -EINVAL);
    assert_int_equal(nbd_parse_request(junk, sizeof(junk), true, &r), -EPROTO);
    assert_int_equal(nbd_parse_request(junk, 3, false, &r), 0);
    assert_int_equal(nbd_validate_request(&r, &s_rw).verdict, ERR);
    assert_int_equal(nbd_build_error_payload(buf, 2, NBD_EIO, "x"), 0);
    assert_int_equal(nbd_build_block_status(buf, false, 1, &e, 1, 512), 12);
    assert_int_equal(nbd_errno_to_nbd(-1), NBD_EIO);
    assert_int_equal(errno, 4242);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greeting),
        cmocka_unit_test(test_client_flags),
        cmocka_unit_test(test_option_header),
        cmocka_unit_test(test_option_reply),
        cmocka_unit_test(test_opt_go_parse),
        cmocka_unit_test(test_opt_go_malformed),
        cmocka_unit_test(test_opt_meta_parse),
        cmocka_unit_test(test_opt_meta_malformed),
        cmocka_unit_test(test_opt_meta_too_many),
        cmocka_unit_test(test_info_builders),
        cmocka_unit_test(test_rep_builders),
        cmocka_unit_test(test_request_parse_compact),
        cmocka_unit_test(test_request_parse_extended),
        cmocka_unit_test(test_request_roundtrip),
        cmocka_unit_test(test_request_parse_truncated),
        cmocka_unit_test(test_request_parse_bad_magic),
        cmocka_unit_test(test_validate_table),
        cmocka_unit_test(test_validate_modes),
        cmocka_unit_test(test_simple_reply),
        cmocka_unit_test(test_chunk_header),
        cmocka_unit_test(test_offset_hole),
        cmocka_unit_test(test_error_payload),
        cmocka_unit_test(test_block_status_size),
        cmocka_unit_test(test_block_status_compact),
        cmocka_unit_test(test_block_status_clip),
        cmocka_unit_test(test_block_status_extended),
        cmocka_unit_test(test_errno_mapping),
        cmocka_unit_test(test_names),
        cmocka_unit_test(test_errno_untouched),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
