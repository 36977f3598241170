/* strata — fuzz target: the NBD codec (proto/nbd-codec.c).
 *
 * Every parser of client bytes, and the builders whose output depends on
 * client-chosen values, run on each input.  Input layout:
 *
 *   bytes 0..7   the session the request is validated against:
 *                  [0] bit 0 structured, bit 1 extended, bits 2..5
 *                      log2 of the minimum block size
 *                  [1..2] transmission flags (big endian)
 *                  [3] maximum payload: 0 = not advertised, else n << 18
 *                  [4] metadata contexts selected (low 2 bits)
 *                  [5..6] export size mantissa, [7] its shift (0xff:
 *                      2^64 - 1)
 *   bytes 8..    the message bytes, given to every parser as they are
 *                (option header, NBD_OPT_GO / NBD_OPT_*_META_CONTEXT
 *                payloads, compact and extended request headers), as a
 *                request whose fields are read without a magic, as an
 *                error message and as block status extents.
 *
 * Beyond "no crash, no read past the input", each parser's contract in
 * nbd-codec.h is checked as a property: what a parser accepts lies inside
 * the buffer, and a request the validator lets through is inside the
 * export, aligned and within the payload limits.
 */
#include <errno.h>
#include <stdbool.h>

#include "fuzz.h"
#include "nbd-codec.h"

#define MAX_QUERIES 4
#define MAX_EXTENTS 64

static struct nbd_session session_of(const uint8_t c[8])
{
    struct nbd_session s = {0};

    s.structured = c[0] & 1;
    s.extended = (c[0] >> 1) & 1;
    s.min_block = UINT32_C(1) << ((c[0] >> 2) & 0x0f);
    s.eflags = be_get16(c + 1);
    s.max_payload = c[3] ? (uint32_t)c[3] << 18 : 0;
    s.n_meta_contexts = c[4] & 3;
    s.export_size = c[7] == 0xff ? UINT64_MAX
                                 : (uint64_t)be_get16(c + 5) << (c[7] & 63);
    return s;
}

static bool inside(const void *p, size_t n, const uint8_t *buf, size_t len)
{
    const uint8_t *q = p;

    return q >= buf && q <= buf + len && n <= (size_t)(buf + len - q);
}

static void check_client_flags(const uint8_t *b, size_t n, uint16_t hflags)
{
    uint32_t cf;
    int r;

    if (n < 4)
        return;
    cf = be_get32(b);
    r = nbd_check_client_flags(cf, hflags);
    FUZZ_CHECK(r == 0 || r == -EPROTO);
    if (r == 0) {
        FUZZ_CHECK((cf & ~UINT32_C(3)) == 0);
        FUZZ_CHECK(!(cf & NBD_FLAG_C_FIXED_NEWSTYLE) ||
                   (hflags & NBD_FLAG_FIXED_NEWSTYLE));
        FUZZ_CHECK(!(cf & NBD_FLAG_C_NO_ZEROES) ||
                   (hflags & NBD_FLAG_NO_ZEROES));
    }
}

static void check_option_header(const uint8_t *b, size_t n)
{
    struct nbd_option_header h;
    int r;

    if (n < NBD_OPTION_HEADER_SIZE)
        return;
    r = nbd_parse_option_header(b, n, &h);
    FUZZ_CHECK(r == (be_get64(b) == NBD_OPT_MAGIC ? 0 : -EPROTO));
    if (r == 0) {
        FUZZ_CHECK(h.option == be_get32(b + 8));
        FUZZ_CHECK(h.length == be_get32(b + 12));
    }
}

static void check_opt_go(const uint8_t *b, size_t n)
{
    struct nbd_opt_go go;
    uint32_t len = n > UINT32_MAX ? UINT32_MAX : (uint32_t)n;
    int r = nbd_parse_opt_go(b, len, &go);

    FUZZ_CHECK(r == 0 || r == -EINVAL);
    if (r != 0)
        return;
    FUZZ_CHECK(go.name_len <= NBD_MAX_STRING);
    FUZZ_CHECK(inside(go.name, go.name_len, b, len));
    /* The info requests end exactly where the payload does. */
    FUZZ_CHECK(go.info + 2 * (size_t)go.n_info == b + len);
    for (uint16_t i = 0; i < go.n_info; i++)
        (void)be_get16(go.info + 2 * i);
}

static void check_opt_meta(const uint8_t *b, size_t n)
{
    struct nbd_opt_meta m;
    struct nbd_meta_query q[MAX_QUERIES + 1];
    uint32_t len = n > UINT32_MAX ? UINT32_MAX : (uint32_t)n;
    int r;

    memset(q, 0, sizeof(q));
    r = nbd_parse_opt_meta(b, len, &m, q, MAX_QUERIES);
    FUZZ_CHECK(r == 0 || r == -EINVAL || r == -E2BIG);
    if (r == -EINVAL)
        return;
    FUZZ_CHECK(m.name_len <= NBD_MAX_STRING);
    FUZZ_CHECK(inside(m.name, m.name_len, b, len));
    FUZZ_CHECK((r == -E2BIG) == (m.n_queries > MAX_QUERIES));
    for (uint32_t i = 0; i < m.n_queries && i < MAX_QUERIES; i++) {
        FUZZ_CHECK(q[i].len <= NBD_MAX_STRING);
        FUZZ_CHECK(inside(q[i].str, q[i].len, b, len));
    }
    /* The slot past max_queries is never written. */
    FUZZ_CHECK(q[MAX_QUERIES].str == NULL && q[MAX_QUERIES].len == 0);
}

static bool is_known_cmd(uint16_t t)
{
    return t <= NBD_CMD_BLOCK_STATUS;
}

static void check_validate(const struct nbd_request *req,
                           const struct nbd_session *s)
{
    struct nbd_validation v = nbd_validate_request(req, s);
    const uint64_t limit = NBD_DEFAULT_MAX_PAYLOAD;
    const uint64_t max_payload = s->max_payload ? s->max_payload : limit;
    const uint32_t min_block = s->min_block > 1 ? s->min_block : 1;
    const uint16_t t = req->type;

    FUZZ_CHECK(v.reason != NULL);
    switch (v.verdict) {
    case NBD_VERDICT_DISC:
        FUZZ_CHECK(t == NBD_CMD_DISC);
        return;
    case NBD_VERDICT_DISCONNECT:
        return;
    case NBD_VERDICT_ERROR:
        FUZZ_CHECK(v.error != NBD_SUCCESS);
        FUZZ_CHECK(v.payload_len <= limit);
        FUZZ_CHECK(v.payload_len <= max_payload);
        return;
    case NBD_VERDICT_OK:
        break;
    default:
        FUZZ_CHECK(!"unknown verdict");
    }

    /* A request let through can run without further checks. */
    FUZZ_CHECK(v.error == NBD_SUCCESS);
    FUZZ_CHECK(is_known_cmd(t) && t != NBD_CMD_DISC);
    FUZZ_CHECK(v.payload_len == (t == NBD_CMD_WRITE ? req->length : 0));
    FUZZ_CHECK(v.payload_len <= limit && v.payload_len <= max_payload);
    if ((s->eflags & NBD_FLAG_READ_ONLY))
        FUZZ_CHECK(t != NBD_CMD_WRITE && t != NBD_CMD_TRIM &&
                   t != NBD_CMD_WRITE_ZEROES);
    if (t == NBD_CMD_FLUSH) {
        FUZZ_CHECK(req->offset == 0 && req->length == 0);
        return;
    }
    if (t == NBD_CMD_BLOCK_STATUS)
        FUZZ_CHECK((s->structured || s->extended) && s->n_meta_contexts > 0);
    if (t == NBD_CMD_READ)
        FUZZ_CHECK(req->length <= max_payload);
    FUZZ_CHECK(req->length > 0 || t == NBD_CMD_CACHE);
    FUZZ_CHECK(req->offset % min_block == 0 && req->length % min_block == 0);
    /* Inside the export, for every command (docs/nbd-conformance.md). */
    FUZZ_CHECK(req->length <= s->export_size &&
               req->offset <= s->export_size - req->length);
}

static void check_requests(const uint8_t *b, size_t n,
                           const struct nbd_session *s)
{
    for (int ext = 0; ext <= 1; ext++) {
        struct nbd_request req;
        struct nbd_session es = *s;
        ssize_t r = nbd_parse_request(b, n, ext, &req);
        size_t size = nbd_request_size(ext);

        if (n < size) {
            FUZZ_CHECK(r == 0);
            continue;
        }
        FUZZ_CHECK(r == (ssize_t)size || r == -EPROTO);
        if (r < 0)
            continue;
        FUZZ_CHECK(ext || req.length <= UINT32_MAX);
        es.extended = ext;
        check_validate(&req, &es);
    }

    /* The same fields without the magic, so the validator sees every
     * combination of type, flags, offset and length. */
    if (n >= 20) {
        struct nbd_request req = {
            .flags = be_get16(b),
            .type = be_get16(b + 2),
            .cookie = 0,
            .offset = be_get64(b + 4),
            .length = be_get64(b + 12),
        };

        if (!s->extended)
            req.length &= UINT32_MAX;
        check_validate(&req, s);
    }
}

static void check_error_payload(const uint8_t *b, size_t n, size_t cap)
{
    char *msg = fuzz_strdup(b, n);
    size_t full = strlen(msg), written, mlen;
    uint8_t *buf = malloc(cap ? cap : 1);

    if (!buf)
        abort();
    written = nbd_build_error_payload(buf, cap, NBD_EIO, msg);
    FUZZ_CHECK(written <= cap);
    if (cap < 6) {
        FUZZ_CHECK(written == 0);
    } else {
        mlen = be_get16(buf + 4);
        FUZZ_CHECK(written == 6 + mlen);
        FUZZ_CHECK(be_get32(buf) == NBD_EIO);
        FUZZ_CHECK(mlen <= NBD_MAX_STRING && mlen <= full);
        FUZZ_CHECK(memcmp(buf + 6, msg, mlen) == 0);
        /* A cut never leaves a UTF-8 sequence without its lead byte. */
        if (mlen < full && mlen > 0)
            FUZZ_CHECK(((unsigned char)msg[mlen] & 0xc0) != 0x80);
        /* Nothing is cut when it fits. */
        if (full <= cap - 6 && full <= NBD_MAX_STRING)
            FUZZ_CHECK(mlen == full);
    }
    free(buf);
    free(msg);
}

static void check_block_status(const uint8_t *b, size_t n,
                               const struct nbd_session *s)
{
    struct nbd_extent e[MAX_EXTENTS];
    uint32_t cnt = 0;
    const uint32_t min_block = s->min_block;
    const uint64_t unit = min_block > 512 ? min_block : 512;

    while (cnt < MAX_EXTENTS && n >= 16 * (size_t)(cnt + 1)) {
        e[cnt].length = be_get64(b + 16 * cnt);
        e[cnt].flags = be_get64(b + 16 * cnt + 8);
        if (e[cnt].length == 0)
            e[cnt].length = 1;
        cnt++;
    }
    if (cnt == 0)
        return;

    for (int ext = 0; ext <= 1; ext++) {
        size_t size = nbd_block_status_size(ext, cnt);
        uint8_t *buf = malloc(size);
        size_t w;
        uint32_t i, got;

        if (!buf)
            abort();
        w = nbd_build_block_status(buf, ext, 7, e, cnt, min_block);
        FUZZ_CHECK(w <= size);
        FUZZ_CHECK(be_get32(buf) == 7);
        if (ext) {
            FUZZ_CHECK(w == size && be_get32(buf + 4) == cnt);
            for (i = 0; i < cnt; i++) {
                FUZZ_CHECK(be_get64(buf + 8 + 16 * i) == e[i].length);
                FUZZ_CHECK(be_get64(buf + 16 + 16 * i) == e[i].flags);
            }
        } else {
            FUZZ_CHECK(w >= 12 && (w - 4) % 8 == 0);
            got = (uint32_t)((w - 4) / 8);
            FUZZ_CHECK(got >= 1 && got <= cnt);
            for (i = 0; i < got; i++) {
                uint32_t len = be_get32(buf + 4 + 8 * i);

                FUZZ_CHECK(len > 0);
                FUZZ_CHECK(be_get32(buf + 8 + 8 * i) == (uint32_t)e[i].flags);
                if (e[i].length <= UINT32_MAX) {
                    FUZZ_CHECK(len == e[i].length);
                } else {
                    /* Clipped to a unit multiple, and the list ends. */
                    FUZZ_CHECK(len % unit == 0);
                    FUZZ_CHECK(UINT32_MAX - len < unit);
                    FUZZ_CHECK(i + 1 == got);
                }
            }
            FUZZ_CHECK(got == cnt || e[got - 1].length > UINT32_MAX);
        }
        free(buf);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t cfg[8] = {0};
    struct nbd_session s;
    const uint8_t *msg = data;
    size_t n = size;
    uint8_t *b;

    if (size >= sizeof(cfg)) {
        memcpy(cfg, data, sizeof(cfg));
        msg = data + sizeof(cfg);
        n = size - sizeof(cfg);
    }
    s = session_of(cfg);
    b = fuzz_dup(msg, n);

    check_client_flags(b, n, cfg[1] & 3);
    check_option_header(b, n);
    check_opt_go(b, n);
    check_opt_meta(b, n);
    check_requests(b, n, &s);
    check_error_payload(b, n, (size_t)be_get16(cfg + 5) % 5000);
    check_block_status(b, n, &s);

    if (n >= 4) {
        uint32_t e = nbd_errno_to_nbd((int)be_get32(b));

        FUZZ_CHECK(e == NBD_EPERM || e == NBD_EIO || e == NBD_ENOMEM ||
                   e == NBD_EINVAL || e == NBD_ENOSPC ||
                   e == NBD_EOVERFLOW || e == NBD_ENOTSUP ||
                   e == NBD_ESHUTDOWN);
        FUZZ_CHECK(nbd_cmd_name(be_get16(b)) != NULL);
        FUZZ_CHECK(nbd_opt_name(be_get32(b)) != NULL);
    }
    free(b);
    return 0;
}
