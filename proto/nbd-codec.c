/* strata — NBD codec: parse and build NBD messages in memory.
 *
 * See nbd-codec.h for the contract of every function.  Everything here is
 * a pure function over caller-provided buffers: no allocation, no I/O, no
 * global mutable state, errno is never touched.  Parsers never read past the
 * length they are given; builders write exactly the size they return.
 *
 * "spec" below means ../shared/specs/nbd-protocol.md together with its
 * EXTENDED_HEADERS extension (extended requests and replies, PAYLOAD_LEN,
 * BLOCK_STATUS_EXT).
 */
#include <assert.h>
#include <errno.h>
#include <string.h>

#include "nbd-codec.h"

/* Bytes on the wire of a few fixed payloads. */
#define INFO_EXPORT_SIZE     12   /* type, size, eflags */
#define INFO_BLOCK_SIZE_SIZE 14   /* type, min, pref, max */
#define OFFSET_HOLE_SIZE     12   /* offset, hole size */
#define ERROR_PAYLOAD_HEAD   6    /* error, message length */

/* ======================= handshake ======================= */

size_t nbd_build_greeting(void *buf, uint16_t handshake_flags)
{
    uint8_t *b = buf;

    be_put64(b, NBD_MAGIC);
    be_put64(b + 8, NBD_OPT_MAGIC);
    be_put16(b + 16, handshake_flags);
    return NBD_GREETING_SIZE;
}

int nbd_check_client_flags(uint32_t client_flags, uint16_t handshake_flags)
{
    const uint32_t known = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

    /* Spec, "Client flags": the server MUST drop the connection if the
     * client sets an unknown flag, or a flag that does not match something
     * advertised by the server.  The two client bits mirror the two
     * handshake bits (bit 0 FIXED_NEWSTYLE, bit 1 NO_ZEROES). */
    if (client_flags & ~known)
        return -EPROTO;
    if ((client_flags & NBD_FLAG_C_FIXED_NEWSTYLE) &&
        !(handshake_flags & NBD_FLAG_FIXED_NEWSTYLE))
        return -EPROTO;
    if ((client_flags & NBD_FLAG_C_NO_ZEROES) &&
        !(handshake_flags & NBD_FLAG_NO_ZEROES))
        return -EPROTO;
    return 0;
}

int nbd_parse_option_header(const void *buf, size_t len,
                            struct nbd_option_header *out)
{
    const uint8_t *b = buf;

    assert(len >= NBD_OPTION_HEADER_SIZE);
    (void)len;
    if (be_get64(b) != NBD_OPT_MAGIC)
        return -EPROTO;
    out->option = be_get32(b + 8);
    out->length = be_get32(b + 12);
    return 0;
}

size_t nbd_build_option_reply(void *buf, uint32_t option, uint32_t reply_type,
                              uint32_t payload_len)
{
    uint8_t *b = buf;

    be_put64(b, NBD_REP_MAGIC);
    be_put32(b + 8, option);
    be_put32(b + 12, reply_type);
    be_put32(b + 16, payload_len);
    return NBD_OPTION_REPLY_SIZE;
}

int nbd_parse_opt_go(const void *data, uint32_t len, struct nbd_opt_go *out)
{
    const uint8_t *p = data;
    uint32_t name_len, rest;
    uint16_t n_info;

    /* 32-bit name length, name, 16-bit info count, 16-bit info requests. */
    if (len < 6)
        return -EINVAL;
    name_len = be_get32(p);
    if (name_len > NBD_MAX_STRING)
        return -EINVAL;
    /* Spec: the name length "MUST be no larger than the option data
     * length - 6".  len >= 6 here, so the subtraction cannot wrap. */
    if (name_len > len - 6)
        return -EINVAL;
    n_info = be_get16(p + 4 + name_len);
    rest = len - 6 - name_len;
    if (rest != 2u * n_info)
        return -EINVAL;

    out->name = (const char *)(p + 4);
    out->name_len = name_len;
    out->n_info = n_info;
    out->info = p + 6 + name_len;
    return 0;
}

int nbd_parse_opt_meta(const void *data, uint32_t len,
                       struct nbd_opt_meta *out,
                       struct nbd_meta_query *queries, uint32_t max_queries)
{
    const uint8_t *p = data;
    uint32_t name_len, n_queries, pos, i;

    /* 32-bit name length, name, 32-bit query count, then per query a
     * 32-bit length and the string.  Every length is checked against the
     * bytes that remain before it is used, so nothing is read past len. */
    if (len < 8)
        return -EINVAL;
    name_len = be_get32(p);
    if (name_len > NBD_MAX_STRING || name_len > len - 8)
        return -EINVAL;
    pos = 4 + name_len;
    n_queries = be_get32(p + pos);
    pos += 4;

    /* Each query takes at least 4 bytes: reject absurd counts up front so
     * the loop below is bounded by the payload, not by the client. */
    if (n_queries > (len - pos) / 4)
        return -EINVAL;

    for (i = 0; i < n_queries; i++) {
        uint32_t qlen;

        if (len - pos < 4)
            return -EINVAL;
        qlen = be_get32(p + pos);
        pos += 4;
        if (qlen > NBD_MAX_STRING || qlen > len - pos)
            return -EINVAL;
        if (i < max_queries) {
            queries[i].str = (const char *)(p + pos);
            queries[i].len = qlen;
        }
        pos += qlen;
    }
    if (pos != len)
        return -EINVAL;             /* trailing garbage */

    out->name = (const char *)(p + 4);
    out->name_len = name_len;
    out->n_queries = n_queries;

    /* Only a well-formed payload gets -E2BIG, so the caller can answer
     * NBD_REP_ERR_TOO_BIG rather than NBD_REP_ERR_INVALID; out and the
     * first max_queries entries of queries[] are filled in that case. */
    if (n_queries > max_queries)
        return -E2BIG;
    return 0;
}

size_t nbd_build_info_export(void *buf, uint64_t size, uint16_t eflags)
{
    uint8_t *b = buf;

    be_put16(b, NBD_INFO_EXPORT);
    be_put64(b + 2, size);
    be_put16(b + 10, eflags);
    return INFO_EXPORT_SIZE;
}

size_t nbd_build_info_block_size(void *buf, uint32_t min, uint32_t pref,
                                 uint32_t max)
{
    uint8_t *b = buf;

    be_put16(b, NBD_INFO_BLOCK_SIZE);
    be_put32(b + 2, min);
    be_put32(b + 6, pref);
    be_put32(b + 10, max);
    return INFO_BLOCK_SIZE_SIZE;
}

size_t nbd_build_info_string(void *buf, uint16_t info_type, const char *s,
                             size_t len)
{
    uint8_t *b = buf;

    be_put16(b, info_type);
    if (len)
        memcpy(b + 2, s, len);
    return 2 + len;
}

size_t nbd_build_rep_server(void *buf, const char *name, size_t name_len,
                            const char *desc, size_t desc_len)
{
    uint8_t *b = buf;

    assert(name_len <= UINT32_MAX);
    be_put32(b, (uint32_t)name_len);
    if (name_len)
        memcpy(b + 4, name, name_len);
    if (desc_len)
        memcpy(b + 4 + name_len, desc, desc_len);
    return 4 + name_len + desc_len;
}

size_t nbd_build_rep_meta_context(void *buf, uint32_t ctx_id, const char *name,
                                  size_t len)
{
    uint8_t *b = buf;

    be_put32(b, ctx_id);
    if (len)
        memcpy(b + 4, name, len);
    return 4 + len;
}

/* ======================= transmission ======================= */

ssize_t nbd_parse_request(const void *buf, size_t len, bool extended,
                          struct nbd_request *out)
{
    const uint8_t *b = buf;
    size_t size = nbd_request_size(extended);
    uint32_t magic;

    if (len < size)
        return 0;
    magic = be_get32(b);
    if (magic != (extended ? NBD_EXTENDED_REQUEST_MAGIC : NBD_REQUEST_MAGIC))
        return -EPROTO;
    out->flags = be_get16(b + 4);
    out->type = be_get16(b + 6);
    out->cookie = be_get64(b + 8);
    out->offset = be_get64(b + 16);
    out->length = extended ? be_get64(b + 24) : be_get32(b + 24);
    return (ssize_t)size;
}

static struct nbd_validation verdict(enum nbd_verdict v, uint32_t error,
                                     uint64_t payload_len, const char *reason)
{
    struct nbd_validation r = {
        .verdict = v,
        .error = error,
        .payload_len = payload_len,
        .reason = reason,
    };
    return r;
}

static bool is_write_type(uint16_t type)
{
    return type == NBD_CMD_WRITE || type == NBD_CMD_TRIM ||
           type == NBD_CMD_WRITE_ZEROES;
}

/* The advertised maximum payload; 0 means "not advertised", and then the
 * spec's default (2^25) applies. */
static uint64_t effective_max_payload(const struct nbd_session *s)
{
    return s->max_payload ? s->max_payload : NBD_DEFAULT_MAX_PAYLOAD;
}

/* Largest request payload we accept without dropping the connection:
 * the advertised maximum, and never more than 2^25 whatever is advertised
 * (nbd-codec.h: "any payload over 2^25 disconnects"), so the daemon never
 * has to buffer more than 32 MiB for one request. */
static uint64_t payload_limit(const struct nbd_session *s)
{
    uint64_t mp = effective_max_payload(s);

    return mp < NBD_DEFAULT_MAX_PAYLOAD ? mp : NBD_DEFAULT_MAX_PAYLOAD;
}

/* Checks run in this order; the first failure decides the verdict:
 *   DISC; payload length and the disconnect cases; unknown command;
 *   command flags; read-only export; command not offered (FLUSH, TRIM,
 *   WRITE_ZEROES, BLOCK_STATUS); FLUSH arguments; zero length; READ over
 *   the maximum payload; alignment; range. */
struct nbd_validation nbd_validate_request(const struct nbd_request *req,
                                           const struct nbd_session *s)
{
    const uint16_t known_flags = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE |
                                 NBD_CMD_FLAG_DF | NBD_CMD_FLAG_REQ_ONE |
                                 NBD_CMD_FLAG_FAST_ZERO |
                                 NBD_CMD_FLAG_PAYLOAD_LEN;
    /* Structured replies are implied by extended headers (spec,
     * NBD_OPT_EXTENDED_HEADERS: "this option takes precedence over
     * structured replies"), whichever flag the session set. */
    const bool reply_payloads = s->structured || s->extended;
    const uint16_t type = req->type, flags = req->flags;
    const uint64_t off = req->offset, len = req->length;
    const uint32_t min_block = s->min_block > 1 ? s->min_block : 1;
    uint64_t payload;

    /* NBD_CMD_DISC has no reply, so there is nothing to report an error
     * with: whatever its flags, finish in-flight requests and close. */
    if (type == NBD_CMD_DISC)
        return verdict(NBD_VERDICT_DISC, NBD_SUCCESS, 0, "client disconnect");

    /* 1. How many payload bytes follow the header.  This is decided first:
     * if we get it wrong, every later byte of the stream is misread.
     * Compact: only NBD_CMD_WRITE has a payload, of `length` bytes.
     * Extended: a payload of `length` bytes follows iff PAYLOAD_LEN is set,
     * whatever the command (spec, "Request message"). */
    if (s->extended) {
        payload = (flags & NBD_CMD_FLAG_PAYLOAD_LEN) ? len : 0;
        /* Spec: with extended headers NBD_CMD_WRITE MUST set PAYLOAD_LEN.
         * Without it we cannot tell whether the client is about to send
         * `length` bytes of data (a client that forgot the flag) or none
         * (a client that treats length as an effect length); guessing
         * wrong desynchronises the stream and could make us execute data
         * as request headers.  So: hard disconnect. */
        if (type == NBD_CMD_WRITE && !(flags & NBD_CMD_FLAG_PAYLOAD_LEN))
            return verdict(NBD_VERDICT_DISCONNECT, NBD_EINVAL, 0,
                           "extended write without payload length");
    } else {
        payload = type == NBD_CMD_WRITE ? len : 0;
    }
    /* Spec: a server SHOULD initiate hard disconnect if PAYLOAD_LEN carries
     * a length larger than the advertised or default maximum payload; a
     * compact WRITE over the limit is the same situation (we are not going
     * to buffer it). */
    if (payload > payload_limit(s))
        return verdict(NBD_VERDICT_DISCONNECT, NBD_EINVAL, 0,
                       "payload too large");

    /* From here on the payload can be consumed: every error is a reply. */

    /* 2. Known command (spec, "Error values": EINVAL for an unknown one). */
    switch (type) {
    case NBD_CMD_READ:
    case NBD_CMD_WRITE:
    case NBD_CMD_FLUSH:
    case NBD_CMD_TRIM:
    case NBD_CMD_CACHE:
    case NBD_CMD_WRITE_ZEROES:
    case NBD_CMD_BLOCK_STATUS:
        break;
    default:
        return verdict(NBD_VERDICT_ERROR, NBD_EINVAL, payload,
                       "unknown command");
    }

    /* 3. Command flags (spec, "Command flags"; EINVAL for an unknown flag
     * or one not documented for the command). */
    if (flags & ~known_flags)
        return verdict(NBD_VERDICT_ERROR, NBD_EINVAL, payload,
                       "unknown command flag");
    if (flags & NBD_CMD_FLAG_PAYLOAD_LEN) {
        /* Only valid with extended headers.  Its only other legal use, the
         * BLOCK_STATUS payload form, is not implemented: the spec says to
         * consume the payload and fail with EINVAL. */
        if (!s->extended)
            return verdict(NBD_VERDICT_ERROR, NBD_EINVAL, payload,
                           "payload flag without extended headers");
        if (type != NBD_CMD_WRITE)
            return verdict(NBD_VERDICT_ERROR, NBD_EINVAL, payload,
                           "unexpected payload for command");
    }
    /* FUA is "valid for all commands, provided NBD_FLAG_SEND_FUA has been
     * negotiated, in which case the server MUST accept all commands with
     * this bit set (even by ignoring the bit)"; so it is checked against
     * the transmission flag only, not against the command. */
    if ((flags & NBD_CMD_FLAG_FUA) && !(s->eflags & NBD_FLAG_SEND_FUA))
        return verdict(NBD_VERDICT_ERROR, NBD_EINVAL, payload,
                       "FUA not negotiated");
    if ((flags & NBD_CMD_FLAG_NO_HOLE) && type != NBD_CMD_WRITE_ZEROES)
        return verdict(NBD_VERDICT_ERROR, NBD_EINVAL, payload,
                       "NO_HOLE needs WRITE_ZEROES");
    if (flags & NBD_CMD_FLAG_FAST_ZERO) {
        if (type != NBD_CMD_WRITE_ZEROES)
            return verdict(NBD_VERDICT_ERROR, NBD_EINVAL, payload,
                           "FAST_ZERO needs WRITE_ZEROES");
        if (!(s->eflags & NBD_FLAG_SEND_FAST_ZERO))
            return verdict(NBD_VERDICT_ERROR, NBD_EINVAL, payload,
                           "FAST_ZERO not negotiated");
    }
    if (flags & NBD_CMD_FLAG_DF) {
        if (type != NBD_CMD_READ)
            return verdict(NBD_VERDICT_ERROR, NBD_EINVAL, payload,
                           "DF needs READ");
        /* NBD_FLAG_SEND_DF MUST be clear without structured replies, and
         * clients MUST NOT send DF unless it was set. */
        if (!reply_payloads || !(s->eflags & NBD_FLAG_SEND_DF))
            return verdict(NBD_VERDICT_ERROR, NBD_EINVAL, payload,
                           "DF not negotiated");
    }
    if ((flags & NBD_CMD_FLAG_REQ_ONE) && type != NBD_CMD_BLOCK_STATUS)
        return verdict(NBD_VERDICT_ERROR, NBD_EINVAL, payload,
                       "REQ_ONE needs BLOCK_STATUS");

    /* 4. Writes on a read-only export: spec, "Error values": EPERM for a
     * write or trim request on a read-only export (and for write zeroes,
     * see NBD_CMD_WRITE_ZEROES).  Checked before "not advertised" since a
     * read-only export usually does not advertise TRIM / WRITE_ZEROES. */
    if ((s->eflags & NBD_FLAG_READ_ONLY) && is_write_type(type))
        return verdict(NBD_VERDICT_ERROR, NBD_EPERM, payload,
                       "export is read-only");

    /* 5. Commands the server did not offer.  Clients MUST NOT send FLUSH,
     * TRIM or WRITE_ZEROES unless the matching transmission flag was set,
     * and the server MUST NOT set a flag for a feature it does not support;
     * refusing here keeps unsupported operations away from the backend.
     * CACHE is not checked: the spec notes that clients send it without
     * NBD_FLAG_SEND_CACHE, and it has no semantics to violate. */
    if (type == NBD_CMD_FLUSH && !(s->eflags & NBD_FLAG_SEND_FLUSH))
        return verdict(NBD_VERDICT_ERROR, NBD_EINVAL, payload,
                       "FLUSH not advertised");
    if (type == NBD_CMD_TRIM && !(s->eflags & NBD_FLAG_SEND_TRIM))
        return verdict(NBD_VERDICT_ERROR, NBD_EINVAL, payload,
                       "TRIM not advertised");
    if (type == NBD_CMD_WRITE_ZEROES &&
        !(s->eflags & NBD_FLAG_SEND_WRITE_ZEROES))
        return verdict(NBD_VERDICT_ERROR, NBD_EINVAL, payload,
                       "WRITE_ZEROES not advertised");
    /* BLOCK_STATUS needs structured (or extended) replies and at least one
     * context selected by SET_META_CONTEXT (spec, NBD_CMD_BLOCK_STATUS). */
    if (type == NBD_CMD_BLOCK_STATUS && !reply_payloads)
        return verdict(NBD_VERDICT_ERROR, NBD_EINVAL, payload,
                       "BLOCK_STATUS without structured replies");
    if (type == NBD_CMD_BLOCK_STATUS && s->n_meta_contexts == 0)
        return verdict(NBD_VERDICT_ERROR, NBD_EINVAL, payload,
                       "BLOCK_STATUS without metadata context");

    /* 6. FLUSH: "length and offset are reserved, and MUST be set to
     * all-zero"; nothing else applies to it. */
    if (type == NBD_CMD_FLUSH) {
        if (off != 0 || len != 0)
            return verdict(NBD_VERDICT_ERROR, NBD_EINVAL, payload,
                           "FLUSH with nonzero offset or length");
        return verdict(NBD_VERDICT_OK, NBD_SUCCESS, payload, "ok");
    }

    /* 7. Length.  Zero-length requests are unspecified by the spec ("SHOULD
     * NOT disconnect"): refuse them.  CACHE of nothing is a harmless no-op
     * and is let through. */
    if (len == 0 && type != NBD_CMD_CACHE)
        return verdict(NBD_VERDICT_ERROR, NBD_EINVAL, payload,
                       "zero length");
    /* READ builds a payload of `length` bytes: it must respect the
     * advertised maximum payload.  (A WRITE over it was refused above.)
     * TRIM / WRITE_ZEROES / BLOCK_STATUS have effect lengths, which may
     * legitimately exceed it, and 4 GiB in extended mode. */
    if (type == NBD_CMD_READ && len > effective_max_payload(s))
        return verdict(NBD_VERDICT_ERROR, NBD_EINVAL, payload,
                       "read larger than maximum payload");

    /* 8. Alignment (spec, "Size constraints": offset and length MUST be
     * multiples of the minimum block size; EINVAL otherwise). */
    if (off % min_block != 0 || len % min_block != 0)
        return verdict(NBD_VERDICT_ERROR, NBD_EINVAL, payload,
                       "request not aligned to minimum block size");

    /* 9. Range, the same rule for every command with one (spec, "Size
     * constraints": a client MUST NOT send a length which, added to the
     * offset, exceeds the export size, and the server SHOULD report
     * NBD_EINVAL; NBD_CMD_BLOCK_STATUS repeats it: "SHOULD return
     * NBD_EINVAL if it receives a request including one or more sectors
     * beyond the size of the device").  Written to never overflow: offset
     * + length wrapping past 2^64 is out of range too, so callers may
     * compute offset + length without checking. */
    if (len > s->export_size || off > s->export_size - len) {
        /* Spec, "Error values": ENOSPC for a write (and write zeroes)
         * beyond the end; EINVAL for anything else beyond it. */
        bool enospc = type == NBD_CMD_WRITE || type == NBD_CMD_WRITE_ZEROES;

        return verdict(NBD_VERDICT_ERROR, enospc ? NBD_ENOSPC : NBD_EINVAL,
                       payload, "request beyond end of export");
    }

    return verdict(NBD_VERDICT_OK, NBD_SUCCESS, payload, "ok");
}

size_t nbd_build_simple_reply(void *buf, uint64_t cookie, uint32_t error)
{
    uint8_t *b = buf;

    be_put32(b, NBD_SIMPLE_REPLY_MAGIC);
    be_put32(b + 4, error);
    be_put64(b + 8, cookie);
    return NBD_SIMPLE_REPLY_SIZE;
}

size_t nbd_build_chunk_header(void *buf, bool extended, uint16_t flags,
                              uint16_t type, uint64_t cookie, uint64_t offset,
                              uint64_t payload_len)
{
    uint8_t *b = buf;

    be_put32(b + 0, extended ? NBD_EXTENDED_REPLY_MAGIC
                              : NBD_STRUCTURED_REPLY_MAGIC);
    be_put16(b + 4, flags);
    be_put16(b + 6, type);
    be_put64(b + 8, cookie);
    if (extended) {
        be_put64(b + 16, offset);
        be_put64(b + 24, payload_len);
        return NBD_EXTENDED_REPLY_SIZE;
    }
    /* Structured replies have a 32-bit length; payloads never exceed the
     * maximum payload (< 4 GiB) plus a small fixed overhead. */
    assert(payload_len <= UINT32_MAX);
    be_put32(b + 16, (uint32_t)payload_len);
    return NBD_STRUCTURED_REPLY_SIZE;
}

size_t nbd_build_offset_hole(void *buf, uint64_t offset, uint32_t len)
{
    uint8_t *b = buf;

    be_put64(b, offset);
    be_put32(b + 8, len);
    return OFFSET_HOLE_SIZE;
}

size_t nbd_build_error_payload(void *buf, size_t cap, uint32_t error,
                               const char *msg)
{
    uint8_t *b = buf;
    size_t max, n = 0;

    /* Too small for even the fixed part: write nothing. */
    if (cap < ERROR_PAYLOAD_HEAD)
        return 0;
    max = cap - ERROR_PAYLOAD_HEAD;
    if (max > NBD_MAX_STRING)
        max = NBD_MAX_STRING;   /* spec: message length MUST NOT exceed 4096 */
    if (msg) {
        n = strnlen(msg, max);
        /* Truncated?  Then do not cut a UTF-8 sequence in half (spec:
         * strings are UTF-8): drop the continuation bytes (10xxxxxx) that
         * would be orphaned and the lead byte they belong to.  msg[n] is
         * inside the string because strnlen stopped at max, not at NUL. */
        if (n == max && msg[n] != '\0' &&
            ((unsigned char)msg[n] & 0xc0) == 0x80) {
            while (n > 0 && ((unsigned char)msg[n - 1] & 0xc0) == 0x80)
                n--;
            if (n > 0)
                n--;            /* the lead byte of the cut character */
        }
    }
    be_put32(b, error);
    be_put16(b + 4, (uint16_t)n);
    if (n)
        memcpy(b + ERROR_PAYLOAD_HEAD, msg, n);
    return ERROR_PAYLOAD_HEAD + n;
}

size_t nbd_block_status_size(bool extended, uint32_t n)
{
    return extended ? 8 + 16 * (size_t)n : 4 + 8 * (size_t)n;
}

size_t nbd_build_block_status(void *buf, bool extended, uint32_t ctx_id,
                              const struct nbd_extent *e, uint32_t n,
                              uint32_t min_block)
{
    uint8_t *b = buf;
    uint32_t i;

    /* Spec: a status chunk holds at least one descriptor, and every
     * descriptor length is nonzero. */
    assert(n > 0);

    be_put32(b, ctx_id);
    if (extended) {
        /* BLOCK_STATUS_EXT: ctx id, descriptor count, 64/64 pairs. */
        be_put32(b + 4, n);
        for (i = 0; i < n; i++) {
            assert(e[i].length > 0);
            be_put64(b + 8 + 16 * (size_t)i, e[i].length);
            be_put64(b + 16 + 16 * (size_t)i, e[i].flags);
        }
        return nbd_block_status_size(true, n);
    }

    /* BLOCK_STATUS: 32/32 pairs.  An extent of 4 GiB or more does not fit:
     * clip it to the largest multiple of the clip unit that does.  The
     * unit is min_block, raised to 512 when smaller: descriptor lengths
     * MUST be multiples of the minimum block size and SHOULD be multiples
     * of 512 (spec, NBD_CMD_BLOCK_STATUS); min_block is a power of 2, so a
     * multiple of max(min_block, 512) is both.  Descriptors describe
     * consecutive ranges, so after a clipped extent the following ones
     * would be reported at the wrong offsets: the list stops there and the
     * client asks again from where the reply ended. */
    {
        const uint64_t unit = min_block > 512 ? min_block : 512;
        const uint32_t clip = (uint32_t)(UINT32_MAX / unit * unit);

        for (i = 0; i < n; i++) {
            uint64_t len = e[i].length;
            bool clipped = len > UINT32_MAX;

            assert(len > 0);
            if (clipped)
                len = clip;
            be_put32(b + 4 + 8 * (size_t)i, (uint32_t)len);
            /* base: contexts have 32-bit flags; a 64-bit status context is
             * never selected without extended headers. */
            be_put32(b + 8 + 8 * (size_t)i, (uint32_t)e[i].flags);
            if (clipped)
                return nbd_block_status_size(false, i + 1);
        }
    }
    return nbd_block_status_size(false, n);
}

/* ======================= errors ======================= */

uint32_t nbd_errno_to_nbd(int err)
{
    switch (err) {
    case EPERM:
    case EROFS:
        return NBD_EPERM;
    case EIO:
        return NBD_EIO;
    case ENOMEM:
        return NBD_ENOMEM;
    case EINVAL:
    case ERANGE:
        return NBD_EINVAL;
    case ENOSPC:
    case EFBIG:     /* spec: map EDQUOT and EFBIG to NBD_ENOSPC */
    case EDQUOT:
        return NBD_ENOSPC;
    case EOVERFLOW:
        return NBD_EOVERFLOW;
    case ENOTSUP:
#if EOPNOTSUPP != ENOTSUP
    case EOPNOTSUPP:
#endif
        return NBD_ENOTSUP;
    case ESHUTDOWN:
        return NBD_ESHUTDOWN;
    default:
        /* Everything else, including 0 (an error reply must never read as
         * success) and negative values, is an I/O error. */
        return NBD_EIO;
    }
}

const char *nbd_cmd_name(uint16_t type)
{
    switch (type) {
    case NBD_CMD_READ:         return "NBD_CMD_READ";
    case NBD_CMD_WRITE:        return "NBD_CMD_WRITE";
    case NBD_CMD_DISC:         return "NBD_CMD_DISC";
    case NBD_CMD_FLUSH:        return "NBD_CMD_FLUSH";
    case NBD_CMD_TRIM:         return "NBD_CMD_TRIM";
    case NBD_CMD_CACHE:        return "NBD_CMD_CACHE";
    case NBD_CMD_WRITE_ZEROES: return "NBD_CMD_WRITE_ZEROES";
    case NBD_CMD_BLOCK_STATUS: return "NBD_CMD_BLOCK_STATUS";
    default:                   return "unknown";
    }
}

const char *nbd_opt_name(uint32_t opt)
{
    switch (opt) {
    case NBD_OPT_EXPORT_NAME:       return "NBD_OPT_EXPORT_NAME";
    case NBD_OPT_ABORT:             return "NBD_OPT_ABORT";
    case NBD_OPT_LIST:              return "NBD_OPT_LIST";
    case NBD_OPT_PEEK_EXPORT:       return "NBD_OPT_PEEK_EXPORT";
    case NBD_OPT_STARTTLS:          return "NBD_OPT_STARTTLS";
    case NBD_OPT_INFO:              return "NBD_OPT_INFO";
    case NBD_OPT_GO:                return "NBD_OPT_GO";
    case NBD_OPT_STRUCTURED_REPLY:  return "NBD_OPT_STRUCTURED_REPLY";
    case NBD_OPT_LIST_META_CONTEXT: return "NBD_OPT_LIST_META_CONTEXT";
    case NBD_OPT_SET_META_CONTEXT:  return "NBD_OPT_SET_META_CONTEXT";
    case NBD_OPT_EXTENDED_HEADERS:  return "NBD_OPT_EXTENDED_HEADERS";
    default:                        return "unknown";
    }
}
