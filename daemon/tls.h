/* strata — TLS for NBD connections (GnuTLS): the server's credentials and
 * priority, a session per connection, who the peer is once the handshake
 * ended, and allow lists.
 *
 * The record layer itself is the stream's (common/stream.h); this file
 * only sets sessions up and judges them.  Credentials are loaded once at
 * start (blocking file reads, before the loop runs); everything else runs
 * on the loop and never blocks.
 *
 * Identities: an X.509 client certificate's distinguished name, RFC 4514
 * ("CN=alice,O=Example"), once it verified against the CA; a PSK username.
 * Allow list entries are matched with fnmatch(3), so an entry is either
 * exact or a glob ("CN=*,O=Example").
 */
#ifndef STRATA_TLS_H
#define STRATA_TLS_H

#include <stdbool.h>
#include <stddef.h>

#include "error.h"

enum tls_mode {
    TLS_MODE_OFF,                  /* NBD_OPT_STARTTLS is refused */
    TLS_MODE_ON,                   /* offered; plaintext clients go on */
    TLS_MODE_REQUIRE,              /* every option but STARTTLS and ABORT
                                      answers NBD_REP_ERR_TLS_REQD first */
};

/* A list of identity patterns.  An absent list (NULL) allows everyone; a
 * present one allows only the identities that match an entry. */
struct tls_allow {
    bool present;
    char **entries;
    size_t n;
};

enum tls_ktls {
    TLS_KTLS_AUTO,                 /* the kernel's TLS where it can */
    TLS_KTLS_OFF,                  /* GnuTLS in user space only */
};

struct tls_options {
    enum tls_mode mode;
    enum tls_ktls ktls;            /* --tls-ktls */
    const char *certificates;      /* --tls-certificates DIR */
    const char *psk_file;          /* --tls-psk FILE */
    bool verify_peer;              /* --tls-verify-peer */
    const char *priority;          /* --tls-priority, or NULL */
    const char *allow;             /* --tls-allow LIST, or NULL */
};

struct tls_server;

/* Loads the credentials (reads files: call before the loop runs). */
int tls_server_new(const struct tls_options *o, struct tls_server **out,
                   struct error **errp);
void tls_server_free(struct tls_server *ts);
enum tls_mode tls_server_mode(const struct tls_server *ts);
/* --tls-allow, or NULL. */
const struct tls_allow *tls_server_allow(const struct tls_server *ts);

/* A server session (gnutls_session_t) ready for its handshake, or NULL. */
void *tls_session_new(struct tls_server *ts, struct error **errp);

/* After the handshake: checks the peer and sets *identity (malloc'ed; NULL
 * when the peer showed none, e.g. no client certificate without
 * --tls-verify-peer).  -EACCES when the peer must be refused (a client
 * certificate missing under --tls-verify-peer, or one that does not
 * verify: unknown CA, expired, revoked). */
int tls_session_identity(struct tls_server *ts, void *session,
                         char **identity, struct error **errp);
/* "TLS1.3 AES-256-GCM" and the like, for the log (static storage). */
void tls_session_describe(void *session, char *buf, size_t len);

/* Kernel TLS: whether this kernel lets sockets take the "tls" ULP, and
 * if not why (for the log). */
bool tls_kernel_offload_available(char *why, size_t len);
/* Whether --tls-ktls=auto found the ULP at start; if not, why. */
bool tls_server_ktls(const struct tls_server *ts, const char **why);
/* Whether this session's records may go to the kernel's TLS: --tls-ktls
 * is auto, the ULP was there at start, and the session negotiated TLS 1.2
 * or 1.3 with AES-128-GCM, AES-256-GCM or CHACHA20-POLY1305.  If not, why
 * (for the log). */
bool tls_session_ktls_possible(struct tls_server *ts, void *session,
                               char *why, size_t len);
/* Whether the receive side may go to the kernel too, once the send side
 * did; if not, why.  TLS 1.2: yes.  TLS 1.3: no, the peer may update its
 * key (GnuTLS does on its own after 2^24 records, which a busy client
 * reaches in hours of small requests), and the kernel's receive side
 * cannot take a new key: the connection would have to close. */
bool tls_session_ktls_rx(void *session, char *why, size_t len);
/* Attaches the tls ULP to fd (once) and hands it the session's key, IV
 * and next record sequence number for one direction (rx: receiving,
 * else sending): SOL_TLS TLS_RX or TLS_TX.  Call only at a record
 * boundary of that direction.  Once sending is the kernel's, a TLS 1.3
 * KeyUpdate from the peer that asks for ours fails the session (GnuTLS
 * could not send it).  0, or -errno with why. */
int tls_session_ktls_install(void *session, int fd, bool rx, char *why,
                             size_t len);

/* LIST: entries separated by ';' (a DN has commas).  Empty entries are
 * skipped; an empty LIST gives an empty list (nobody). */
int tls_allow_parse(const char *list, struct tls_allow *out,
                    struct error **errp);
/* A copy. */
int tls_allow_copy(const struct tls_allow *from, struct tls_allow *to);
void tls_allow_clear(struct tls_allow *a);
/* An absent list allows everyone, NULL identities included; a present one
 * only identities matching an entry. */
bool tls_allow_match(const struct tls_allow *a, const char *identity);

#endif
