/* strata — NBD codec: parse and build NBD messages in memory.
 *
 * Pure functions over caller-provided buffers: no sockets, no allocation,
 * no global state, never touches errno.  Parsers take (buf, len) and never
 * read past len; builders write into a buffer the caller sized with the
 * documented size (or return the size needed when given a capacity).
 *
 * Two rules from ../shared/STYLE.md live here:
 *  - every transmission request is validated by exactly one function,
 *    nbd_validate_request();
 *  - errno values are mapped to NBD errors by exactly one function,
 *    nbd_errno_to_nbd().
 */
#ifndef STRATA_NBD_CODEC_H
#define STRATA_NBD_CODEC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "byteorder.h"
#include "nbd-protocol.h"

/* ======================= handshake ======================= */

/* Writes the 18-byte server greeting: NBDMAGIC, IHAVEOPT, handshake flags. */
size_t nbd_build_greeting(void *buf, uint16_t handshake_flags);

/* Checks the client's 32-bit flags against what the server offered.
 * Returns 0, or -EPROTO for unknown bits or bits the server did not offer
 * (the spec says: drop the connection). */
int nbd_check_client_flags(uint32_t client_flags, uint16_t handshake_flags);

struct nbd_option_header {
    uint32_t option;
    uint32_t length;   /* payload bytes that follow */
};

/* Parses a 16-byte option header.  Returns 0, or -EPROTO on bad magic.
 * The caller must have NBD_OPTION_HEADER_SIZE bytes (asserted: the
 * connection checks before calling). */
int nbd_parse_option_header(const void *buf, size_t len,
                            struct nbd_option_header *out);

/* Writes a 20-byte option reply header (magic, option, type, length). */
size_t nbd_build_option_reply(void *buf, uint32_t option, uint32_t reply_type,
                              uint32_t payload_len);

/* Payload of NBD_OPT_INFO / NBD_OPT_GO.  Pointers point into the caller's
 * buffer.  The info requests are kept raw (big-endian 16-bit values):
 * use be_get16(info + 2 * i). */
struct nbd_opt_go {
    const char *name;        /* not NUL-terminated */
    uint32_t name_len;
    uint16_t n_info;
    const uint8_t *info;     /* n_info * 2 bytes */
};

/* Returns 0, or -EINVAL when the payload is malformed (name length past the
 * payload, name longer than NBD_MAX_STRING, info count not matching the
 * remaining bytes exactly). */
int nbd_parse_opt_go(const void *data, uint32_t len, struct nbd_opt_go *out);

/* Payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT. */
struct nbd_meta_query {
    const char *str;         /* not NUL-terminated */
    uint32_t len;
};
struct nbd_opt_meta {
    const char *name;
    uint32_t name_len;
    uint32_t n_queries;      /* as sent by the client */
};

/* Parses the payload; fills at most max_queries entries of queries[].
 * Returns 0; -EINVAL when malformed (a length past the payload, strings
 * longer than NBD_MAX_STRING, trailing garbage, a query count that does not
 * match); -E2BIG when the client sent more than max_queries queries. */
int nbd_parse_opt_meta(const void *data, uint32_t len, struct nbd_opt_meta *out,
                       struct nbd_meta_query *queries, uint32_t max_queries);

/* NBD_REP_INFO payloads.  Each returns the payload size written. */
size_t nbd_build_info_export(void *buf, uint64_t size, uint16_t eflags);   /* 12 */
size_t nbd_build_info_block_size(void *buf, uint32_t min, uint32_t pref,
                                 uint32_t max);                             /* 14 */
/* NBD_INFO_NAME / NBD_INFO_DESCRIPTION: 2 + len bytes; buf must hold that. */
size_t nbd_build_info_string(void *buf, uint16_t info_type, const char *s,
                             size_t len);
/* NBD_REP_SERVER payload: 4 + name_len + desc_len. */
size_t nbd_build_rep_server(void *buf, const char *name, size_t name_len,
                            const char *desc, size_t desc_len);
/* NBD_REP_META_CONTEXT payload: 4 + len. */
size_t nbd_build_rep_meta_context(void *buf, uint32_t ctx_id, const char *name,
                                  size_t len);

/* ======================= transmission ======================= */

/* A parsed request header.  `length` is the 32-bit length (compact) or the
 * 64-bit length (extended); whether it counts payload bytes or effect bytes
 * is decided by nbd_validate_request(). */
struct nbd_request {
    uint16_t flags;
    uint16_t type;
    uint64_t cookie;
    uint64_t offset;
    uint64_t length;
};

/* Size of one request header in the negotiated mode (28 or 32). */
static inline size_t nbd_request_size(bool extended)
{
    return extended ? NBD_EXTENDED_REQUEST_SIZE : NBD_REQUEST_SIZE;
}

/* Parses one request header.  Returns the header size consumed (28 or 32),
 * 0 if len is too short, or -EPROTO when the magic is not the one expected
 * for the mode (the stream cannot be resynchronised: disconnect). */
ssize_t nbd_parse_request(const void *buf, size_t len, bool extended,
                          struct nbd_request *out);

/* What the connection negotiated and what the export offers. */
struct nbd_session {
    uint64_t export_size;
    uint16_t eflags;            /* transmission flags sent to the client */
    uint32_t min_block;         /* advertised minimum block size (power of 2) */
    uint32_t max_payload;       /* advertised maximum payload */
    bool structured;            /* structured replies negotiated (also set
                                   when extended headers are) */
    bool extended;              /* extended headers negotiated */
    uint32_t n_meta_contexts;   /* contexts selected by SET_META_CONTEXT */
};

enum nbd_verdict {
    NBD_VERDICT_OK,          /* run the command */
    NBD_VERDICT_ERROR,       /* consume payload_len bytes, reply with error */
    NBD_VERDICT_DISCONNECT,  /* the stream cannot be trusted: hard disconnect */
    NBD_VERDICT_DISC,        /* NBD_CMD_DISC: finish in-flight, then close */
};

struct nbd_validation {
    enum nbd_verdict verdict;
    uint32_t error;          /* NBD_E* for NBD_VERDICT_ERROR */
    uint64_t payload_len;    /* bytes that follow the header on the wire */
    const char *reason;      /* static one-phrase text for logs and error chunks */
};

/* The one request validator.  Decides payload length, then checks: known
 * command; flags valid for the command and negotiated (DF only with
 * structured replies and NBD_FLAG_SEND_DF, FAST_ZERO only with the
 * transmission flag, PAYLOAD_LEN only in extended mode and only on WRITE,
 * REQ_ONE only on BLOCK_STATUS, NO_HOLE only on WRITE_ZEROES, FUA on any
 * command once SEND_FUA is advertised, as the spec requires); FLUSH, TRIM
 * and WRITE_ZEROES only when advertised; writes to a read-only export ->
 * EPERM; offset + length overflow or past the export size -> EINVAL for
 * READ, TRIM, CACHE and BLOCK_STATUS, ENOSPC for WRITE and WRITE_ZEROES
 * (docs/nbd-conformance.md); alignment to min_block -> EINVAL;
 * READ/WRITE length over max_payload -> EINVAL (a compact WRITE whose
 * payload exceeds max_payload, or any payload over 2^25, disconnects);
 * BLOCK_STATUS without a context -> EINVAL; zero length READ/WRITE/TRIM/
 * WRITE_ZEROES -> EINVAL.  Unknown commands -> EINVAL, payload consumed
 * when the extended PAYLOAD_LEN flag says there is one. */
struct nbd_validation nbd_validate_request(const struct nbd_request *req,
                                           const struct nbd_session *s);

/* Writes a 16-byte simple reply. */
size_t nbd_build_simple_reply(void *buf, uint64_t cookie, uint32_t error);

/* Writes a structured (20 bytes) or extended (32 bytes) reply chunk header.
 * `offset` is the request's offset; used only in extended mode. */
size_t nbd_build_chunk_header(void *buf, bool extended, uint16_t flags,
                              uint16_t type, uint64_t cookie, uint64_t offset,
                              uint64_t payload_len);
static inline size_t nbd_chunk_header_size(bool extended)
{
    return extended ? NBD_EXTENDED_REPLY_SIZE : NBD_STRUCTURED_REPLY_SIZE;
}

/* NBD_REPLY_TYPE_OFFSET_HOLE payload: 12 bytes. */
size_t nbd_build_offset_hole(void *buf, uint64_t offset, uint32_t len);

/* NBD_REPLY_TYPE_ERROR payload: 4 (error) + 2 (msg len) + msg, msg
 * truncated to fit cap.  Returns bytes written. */
size_t nbd_build_error_payload(void *buf, size_t cap, uint32_t error,
                               const char *msg);

/* One extent of a block status answer. */
struct nbd_extent {
    uint64_t length;
    uint64_t flags;
};

/* Block status payload for one context: BLOCK_STATUS (4 + 8n; an extent
 * longer than 32 bits is clipped to the largest multiple of
 * max(min_block, 512) below 4 GiB, and the extents after it are dropped, as
 * they would be reported at the wrong offset) or BLOCK_STATUS_EXT
 * (8 + 16n).  Returns bytes written (possibly fewer extents than given);
 * the buffer must hold nbd_block_status_size(extended, n). */
size_t nbd_block_status_size(bool extended, uint32_t n);
size_t nbd_build_block_status(void *buf, bool extended, uint32_t ctx_id,
                              const struct nbd_extent *e, uint32_t n,
                              uint32_t min_block);

/* ======================= errors ======================= */

/* The one errno -> NBD error mapping (positive errno in, NBD_E* out). */
uint32_t nbd_errno_to_nbd(int err);

/* Names for logs ("NBD_CMD_READ", "NBD_OPT_GO", ...); never NULL. */
const char *nbd_cmd_name(uint16_t type);
const char *nbd_opt_name(uint32_t opt);

#endif
