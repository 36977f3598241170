/* strata — NBD fixed-newstyle handshake: greeting and option haggling. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conn.h"
#include "log.h"
#include "tls.h"

#define MAX_META_QUERIES 64
#define MAX_PAYLOAD (32u << 20)

void nbd_handshake_start(struct conn *c)
{
    uint8_t g[NBD_GREETING_SIZE];
    nbd_build_greeting(g, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    if (conn_send_copy(c, g, sizeof(g)) < 0)
        conn_abort(c, "out of memory");
}

/* Sends one option reply: header + payload. */
static void reply(struct conn *c, uint32_t type, const void *payload,
                  size_t len)
{
    uint8_t stackbuf[256];
    uint8_t *buf = stackbuf;
    if (NBD_OPTION_REPLY_SIZE + len > sizeof(stackbuf)) {
        buf = malloc(NBD_OPTION_REPLY_SIZE + len);
        if (!buf) {
            conn_abort(c, "out of memory");
            return;
        }
    }
    nbd_build_option_reply(buf, c->opt.option, type, (uint32_t)len);
    if (len)
        memcpy(buf + NBD_OPTION_REPLY_SIZE, payload, len);
    if (conn_send_copy(c, buf, NBD_OPTION_REPLY_SIZE + len) < 0)
        conn_abort(c, "out of memory");
    if (buf != stackbuf)
        free(buf);
}

/* An error reply with a human-readable message (the spec allows one). */
static void reply_err(struct conn *c, uint32_t type, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void reply_err(struct conn *c, uint32_t type, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if ((size_t)n >= sizeof(msg))
        n = sizeof(msg) - 1;
    log_debug("conn %llu: %s: %s", (unsigned long long)c->id,
              nbd_opt_name(c->opt.option), msg);
    reply(c, type, msg, (size_t)n);
}

uint16_t nbd_export_eflags(const struct conn *c, const struct export *e)
{
    uint16_t f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_CACHE;
    /* Every connection to an export shares one node and one backend, and
     * FLUSH is fdatasync of the shared descriptor: it covers writes
     * acknowledged on any connection. */
    f |= NBD_FLAG_CAN_MULTI_CONN;
    if (!e->writable || export_root(e)->read_only)
        f |= NBD_FLAG_READ_ONLY;
    else
        f |= NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM |
             NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
    if (c->structured)
        f |= NBD_FLAG_SEND_DF;
    return f;
}

static void block_sizes(const struct export *e, uint32_t *min, uint32_t *pref,
                        uint32_t *max)
{
    *min = export_root(e)->align;
    *pref = *min > 4096 ? *min : 4096;
    *max = MAX_PAYLOAD;
}

/* An export this client may see: one with an allow list only to an
 * identity in it.  The others are, to it, exports that do not exist. */
static bool export_visible(const struct conn *c, const struct export *e)
{
    return tls_allow_match(&e->cfg.allow, c->tls_identity);
}

static struct export *find_export(struct conn *c, const char *name,
                                  size_t len)
{
    struct export *e = server_find_export(c->srv, name, len);
    return e && export_visible(c, e) ? e : NULL;
}

static unsigned popcount(unsigned v)
{
    return (unsigned)__builtin_popcount(v);
}

static void enter_transmission(struct conn *c, struct export *e)
{
    if (nbd_slots_init(c) < 0) {
        conn_abort(c, "out of memory");
        return;
    }
    c->exp = e;
    e->n_conns++;
    if (c->meta_export != e)
        c->meta = 0;
    uint32_t min, pref, max;
    block_sizes(e, &min, &pref, &max);
    c->session = (struct nbd_session){
        .export_size = export_root(e)->size,
        .eflags = nbd_export_eflags(c, e),
        .min_block = min,
        .max_payload = max,
        .structured = c->structured,
        .extended = c->extended,
        .n_meta_contexts = popcount(c->meta),
    };
    c->state = CONN_TRANSMIT;
    if (c->in_handshake) {
        c->in_handshake = false;
        peer_handshake_done(c->srv, c->peer);
    }
    log_debug("conn %llu: transmission on export '%s'%s%s",
              (unsigned long long)c->id, e->cfg.name,
              c->structured ? ", structured replies" : "",
              c->extended ? ", extended headers" : "");
}

static void opt_export_name(struct conn *c, const uint8_t *data, uint32_t len)
{
    if (c->extended) {
        conn_abort(c, "NBD_OPT_EXPORT_NAME after extended headers");
        return;
    }
    struct export *e = find_export(c, (const char *)data, len);
    if (!e) {
        /* this option has no way to report an error: disconnect */
        log_info("conn %llu: NBD_OPT_EXPORT_NAME: no export '%.*s'",
                 (unsigned long long)c->id, (int)(len > 256 ? 256 : len),
                 (const char *)data);
        conn_abort(c, "unknown export");
        return;
    }
    uint8_t buf[10 + 124];
    be_put64(buf, export_root(e)->size);
    be_put16(buf + 8, nbd_export_eflags(c, e));
    size_t n = 10;
    if (!(c->client_flags & NBD_FLAG_C_NO_ZEROES)) {
        memset(buf + 10, 0, 124);
        n += 124;
    }
    if (conn_send_copy(c, buf, n) < 0) {
        conn_abort(c, "out of memory");
        return;
    }
    enter_transmission(c, e);
}

static void opt_list(struct conn *c, uint32_t len)
{
    if (len) {
        reply_err(c, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
        return;
    }
    for (size_t i = 0; i < c->srv->n_exports; i++) {
        const struct export *e = c->srv->exports[i];
        if (!export_visible(c, e))
            continue;
        size_t nl = strlen(e->cfg.name);
        size_t dl = e->cfg.description ? strlen(e->cfg.description) : 0;
        uint8_t *p = malloc(4 + nl + dl);
        if (!p) {
            conn_abort(c, "out of memory");
            return;
        }
        size_t n = nbd_build_rep_server(p, e->cfg.name, nl,
                                        e->cfg.description, dl);
        reply(c, NBD_REP_SERVER, p, n);
        free(p);
    }
    reply(c, NBD_REP_ACK, NULL, 0);
}

static void opt_info_go(struct conn *c, const uint8_t *data, uint32_t len)
{
    struct nbd_opt_go go;
    if (nbd_parse_opt_go(data, len, &go) < 0) {
        reply_err(c, NBD_REP_ERR_INVALID, "malformed %s payload",
                  nbd_opt_name(c->opt.option));
        return;
    }
    struct export *e = find_export(c, go.name, go.name_len);
    if (!e) {
        reply_err(c, NBD_REP_ERR_UNKNOWN, "no export named '%.*s'",
                  (int)(go.name_len > 256 ? 256 : go.name_len), go.name);
        return;
    }
    uint8_t buf[2 + 4096 + 16];
    size_t n = nbd_build_info_export(buf, export_root(e)->size, nbd_export_eflags(c, e));
    reply(c, NBD_REP_INFO, buf, n);

    for (uint16_t i = 0; i < go.n_info; i++) {
        uint16_t t = be_get16(go.info + 2 * i);
        if (t == NBD_INFO_NAME) {
            size_t nl = strlen(e->cfg.name);
            n = nbd_build_info_string(buf, NBD_INFO_NAME, e->cfg.name,
                                      nl > 4096 ? 4096 : nl);
            reply(c, NBD_REP_INFO, buf, n);
        } else if (t == NBD_INFO_DESCRIPTION && e->cfg.description) {
            size_t dl = strlen(e->cfg.description);
            n = nbd_build_info_string(buf, NBD_INFO_DESCRIPTION,
                                      e->cfg.description, dl > 4096 ? 4096 : dl);
            reply(c, NBD_REP_INFO, buf, n);
        }
    }
    /* BLOCK_SIZE always: the client learns our limits either way. */
    uint32_t min, pref, max;
    block_sizes(e, &min, &pref, &max);
    n = nbd_build_info_block_size(buf, min, pref, max);
    reply(c, NBD_REP_INFO, buf, n);
    reply(c, NBD_REP_ACK, NULL, 0);
    if (c->opt.option == NBD_OPT_GO)
        enter_transmission(c, e);
}

#define DIRTY_BITMAP_PREFIX "qemu:dirty-bitmap:"

/* The contexts a query selects (SET: exact names; LIST: also the
 * namespace alone, and "qemu:dirty-bitmap:" for every bitmap). */
static unsigned match_meta(const struct export *e,
                           const struct nbd_meta_query *q, bool listing)
{
    static const char base[] = "base:allocation";
    static const char depth[] = "qemu:allocation-depth";
    static const char bmp[] = DIRTY_BITMAP_PREFIX;
    unsigned all_bitmaps = 0;
    for (size_t i = 0; i < e->cfg.n_bitmaps; i++)
        all_bitmaps |= 1u << (META_DIRTY_BITMAP + i);
    if (q->len == sizeof(base) - 1 && memcmp(q->str, base, q->len) == 0)
        return 1u << META_BASE_ALLOCATION;
    if (q->len == sizeof(depth) - 1 && memcmp(q->str, depth, q->len) == 0)
        return 1u << META_ALLOCATION_DEPTH;
    if (q->len > sizeof(bmp) - 1 && memcmp(q->str, bmp, sizeof(bmp) - 1) == 0) {
        const char *name = (const char *)q->str + sizeof(bmp) - 1;
        size_t nlen = q->len - (sizeof(bmp) - 1);
        for (size_t i = 0; i < e->cfg.n_bitmaps; i++) {
            const char *bn = e->bitmaps[i]->name;
            if (strlen(bn) == nlen && memcmp(bn, name, nlen) == 0)
                return 1u << (META_DIRTY_BITMAP + i);
        }
        return 0;
    }
    if (listing && q->len == sizeof(bmp) - 1 && memcmp(q->str, bmp, q->len) == 0)
        return all_bitmaps;
    if (listing && q->len == 5 && memcmp(q->str, "base:", 5) == 0)
        return 1u << META_BASE_ALLOCATION;
    if (listing && q->len == 5 && memcmp(q->str, "qemu:", 5) == 0)
        return (1u << META_ALLOCATION_DEPTH) | all_bitmaps;
    return 0; /* unknown namespaces and leaves are ignored (spec) */
}

/* The name of context id of export e, in buf (at least NBD_MAX_STRING +
 * 1 bytes). */
static const char *meta_name(const struct export *e, unsigned id, char *buf,
                             size_t cap)
{
    if (id == META_BASE_ALLOCATION)
        return "base:allocation";
    if (id == META_ALLOCATION_DEPTH)
        return "qemu:allocation-depth";
    snprintf(buf, cap, DIRTY_BITMAP_PREFIX "%s",
             e->bitmaps[id - META_DIRTY_BITMAP]->name);
    return buf;
}

static void opt_meta(struct conn *c, const uint8_t *data, uint32_t len)
{
    bool listing = c->opt.option == NBD_OPT_LIST_META_CONTEXT;
    if (!listing) {
        /* SET replaces the selection even when it fails */
        c->meta = 0;
        c->meta_export = NULL;
        if (!c->structured) {
            reply_err(c, NBD_REP_ERR_INVALID,
                      "negotiate structured replies first");
            return;
        }
    }
    struct nbd_opt_meta m;
    struct nbd_meta_query q[MAX_META_QUERIES];
    int r = nbd_parse_opt_meta(data, len, &m, q, MAX_META_QUERIES);
    if (r == -E2BIG) {
        reply_err(c, NBD_REP_ERR_TOO_BIG, "more than %d queries",
                  MAX_META_QUERIES);
        return;
    }
    if (r < 0) {
        reply_err(c, NBD_REP_ERR_INVALID, "malformed %s payload",
                  nbd_opt_name(c->opt.option));
        return;
    }
    struct export *e = find_export(c, m.name, m.name_len);
    if (!e) {
        reply_err(c, NBD_REP_ERR_UNKNOWN, "no export named '%.*s'",
                  (int)(m.name_len > 256 ? 256 : m.name_len), m.name);
        return;
    }
    unsigned mask = 0;
    if (m.n_queries == 0 && listing) {
        mask = (1u << META_BASE_ALLOCATION) | (1u << META_ALLOCATION_DEPTH);
        for (size_t i = 0; i < e->cfg.n_bitmaps; i++)
            mask |= 1u << (META_DIRTY_BITMAP + i);
    }
    for (uint32_t i = 0; i < m.n_queries; i++)
        mask |= match_meta(e, &q[i], listing);

    /* a bitmap name is at most FMT_BITMAP_MAX_NAME bytes */
    char name_buf[sizeof(DIRTY_BITMAP_PREFIX) + FMT_BITMAP_MAX_NAME];
    uint8_t buf[4 + sizeof(name_buf)];
    for (unsigned id = META_BASE_ALLOCATION; id <= META_MAX_ID; id++) {
        if (!(mask & (1u << id)))
            continue;
        const char *name = meta_name(e, id, name_buf, sizeof(name_buf));
        size_t n = nbd_build_rep_meta_context(buf, listing ? 0 : id, name,
                                              strlen(name));
        reply(c, NBD_REP_META_CONTEXT, buf, n);
    }
    reply(c, NBD_REP_ACK, NULL, 0);
    if (!listing) {
        c->meta = mask;
        c->meta_export = e;
    }
}

/* NBD_OPT_STARTTLS: the ACK goes out in plaintext, then TLS (the NBD
 * spec's "TLS support" section, /work/shared/specs/nbd-protocol.md). */
static void opt_starttls(struct conn *c, uint32_t len)
{
    if (len) {
        reply_err(c, NBD_REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
        return;
    }
    if (tls_server_mode(c->srv->tls) == TLS_MODE_OFF) {
        reply_err(c, NBD_REP_ERR_UNSUP, "TLS is not enabled (--tls)");
        return;
    }
    if (c->tls) {
        reply_err(c, NBD_REP_ERR_INVALID, "TLS is already in use");
        return;
    }
    struct error *err = NULL;
    void *sess = tls_session_new(c->srv->tls, &err);
    if (!sess) {
        log_warn("conn %llu: %s", (unsigned long long)c->id, err->msg);
        error_free(err);
        reply_err(c, NBD_REP_ERR_PLATFORM, "TLS is not available");
        return;
    }
    reply(c, NBD_REP_ACK, NULL, 0);
    /* Bytes after STARTTLS and before the handshake are dropped, never
     * parsed as options: whoever sent them did not wait for the ACK. */
    long dropped = stream_tls_start(&c->st, sess);
    if (dropped < 0) {
        conn_abort(c, strerror((int)-dropped));
        return;
    }
    if (dropped > 0)
        log_info("conn %llu: %ld byte(s) sent after NBD_OPT_STARTTLS before "
                 "the TLS handshake discarded", (unsigned long long)c->id,
                 dropped);
    /* What was negotiated in plaintext does not carry over. */
    c->structured = false;
    c->extended = false;
    c->meta = 0;
    c->meta_export = NULL;
    c->state = CONN_TLS_HANDSHAKE;
}

void nbd_handshake_tls_done(struct conn *c, int res)
{
    if (res < 0) {
        const char *why = stream_tls_error(&c->st);
        log_info("conn %llu: TLS handshake failed: %s",
                 (unsigned long long)c->id, why ? why : strerror(-res));
        conn_abort(c, "TLS handshake failed");
        return;
    }
    char desc[128];
    tls_session_describe(stream_tls_session(&c->st), desc, sizeof(desc));
    struct error *err = NULL;
    char *id = NULL;
    if (tls_session_identity(c->srv->tls, stream_tls_session(&c->st), &id,
                             &err) < 0) {
        log_info("conn %llu: TLS peer refused: %s", (unsigned long long)c->id,
                 err->msg);
        error_free(err);
        conn_abort(c, "TLS peer refused");
        return;
    }
    if (!tls_allow_match(tls_server_allow(c->srv->tls), id)) {
        log_info("conn %llu: TLS peer '%s' is not in --tls-allow: refused",
                 (unsigned long long)c->id, id ? id : "(no identity)");
        free(id);
        conn_abort(c, "TLS peer not allowed");
        return;
    }
    c->tls = true;
    c->tls_identity = id;
    c->state = CONN_HS_OPTION;
    log_debug("conn %llu: TLS established (%s), peer '%s'",
              (unsigned long long)c->id, desc, id ? id : "(no identity)");
    char why[160];
    void *sess = stream_tls_session(&c->st);
    if (tls_session_ktls_possible(c->srv->tls, sess, why, sizeof(why))) {
        /* the stream moves each side at its first record boundary; the
         * path is logged as it changes */
        bool rx = tls_session_ktls_rx(sess, why, sizeof(why));
        if (!rx)
            log_debug("conn %llu: receiving stays with GnuTLS (%s)",
                      (unsigned long long)c->id, why);
        stream_tls_offload(&c->st, rx);
    } else
        log_debug("conn %llu: TLS path GnuTLS (kernel TLS: %s)",
                  (unsigned long long)c->id, why);
}

static void handle_option(struct conn *c, const uint8_t *data, uint32_t len)
{
    log_debug("conn %llu: option %s (%u bytes)", (unsigned long long)c->id,
              nbd_opt_name(c->opt.option), len);
    if (!c->tls && tls_server_mode(c->srv->tls) == TLS_MODE_REQUIRE &&
        c->opt.option != NBD_OPT_STARTTLS && c->opt.option != NBD_OPT_ABORT) {
        if (c->opt.option == NBD_OPT_EXPORT_NAME) {
            /* this option has no way to report an error: disconnect */
            log_info("conn %llu: NBD_OPT_EXPORT_NAME without TLS: refused",
                     (unsigned long long)c->id);
            conn_abort(c, "TLS required");
            return;
        }
        reply_err(c, NBD_REP_ERR_TLS_REQD, "TLS is required (NBD_OPT_STARTTLS)");
        return;
    }
    switch (c->opt.option) {
    case NBD_OPT_EXPORT_NAME:
        opt_export_name(c, data, len);
        break;
    case NBD_OPT_ABORT:
        reply(c, NBD_REP_ACK, NULL, 0);
        conn_close_gracefully(c);
        break;
    case NBD_OPT_LIST:
        opt_list(c, len);
        break;
    case NBD_OPT_STARTTLS:
        opt_starttls(c, len);
        break;
    case NBD_OPT_INFO:
    case NBD_OPT_GO:
        opt_info_go(c, data, len);
        break;
    case NBD_OPT_STRUCTURED_REPLY:
        if (len) {
            reply_err(c, NBD_REP_ERR_INVALID,
                      "NBD_OPT_STRUCTURED_REPLY takes no data");
        } else if (c->extended) {
            reply_err(c, NBD_REP_ERR_EXT_HEADER_REQD,
                      "extended headers are already in use");
        } else {
            c->structured = true;
            reply(c, NBD_REP_ACK, NULL, 0);
        }
        break;
    case NBD_OPT_LIST_META_CONTEXT:
    case NBD_OPT_SET_META_CONTEXT:
        opt_meta(c, data, len);
        break;
    case NBD_OPT_EXTENDED_HEADERS:
        if (len) {
            reply_err(c, NBD_REP_ERR_INVALID,
                      "NBD_OPT_EXTENDED_HEADERS takes no data");
        } else {
            c->extended = true;
            c->structured = true; /* extended replies carry chunks */
            reply(c, NBD_REP_ACK, NULL, 0);
        }
        break;
    default:
        reply_err(c, NBD_REP_ERR_UNSUP, "option %u is not supported",
                  c->opt.option);
        break;
    }
}

bool nbd_handshake_input(struct conn *c)
{
    const uint8_t *p = c->st.rbuf + c->st.rstart;
    size_t avail = c->st.rend - c->st.rstart;

    if (c->state == CONN_HS_FLAGS) {
        if (avail < 4)
            return false;
        uint32_t flags = be_get32(p);
        c->st.rstart += 4;
        if (nbd_check_client_flags(flags, NBD_FLAG_FIXED_NEWSTYLE |
                                              NBD_FLAG_NO_ZEROES) < 0) {
            log_info("conn %llu: bad client flags 0x%x",
                     (unsigned long long)c->id, flags);
            conn_abort(c, "bad client flags");
            return false;
        }
        c->client_flags = flags;
        c->state = CONN_HS_OPTION;
        return true;
    }

    if (avail < NBD_OPTION_HEADER_SIZE)
        return false;
    if (nbd_parse_option_header(p, avail, &c->opt) < 0) {
        log_info("conn %llu: bad option magic", (unsigned long long)c->id);
        conn_abort(c, "bad option magic");
        return false;
    }
    if (c->opt.length > NBD_MAX_OPTION_LEN) {
        log_info("conn %llu: option %s of %u bytes is over the %u byte limit",
                 (unsigned long long)c->id, nbd_opt_name(c->opt.option),
                 c->opt.length, NBD_MAX_OPTION_LEN);
        conn_abort(c, "option too large");
        return false;
    }
    if (avail < NBD_OPTION_HEADER_SIZE + c->opt.length)
        return false;
    c->st.rstart += NBD_OPTION_HEADER_SIZE + c->opt.length;
    handle_option(c, p + NBD_OPTION_HEADER_SIZE, c->opt.length);
    return c->state == CONN_HS_OPTION || c->state == CONN_TRANSMIT;
}
