/* strata — TLS 1.3 application-data records sealed and opened with a
 * GnuTLS session's traffic keys, outside GnuTLS's record layer.
 *
 * Why: GnuTLS's record layer costs more per record than the cipher does
 * for small records (a 4 KiB read reply, a 28-byte request): buffers
 * allocated per record, the cork buffer, the push copy.  A direction
 * (sending or receiving) taken here seals records straight from the
 * owner's iovecs into the output buffer, and opens them straight into
 * the owner's target, with one AEAD call each.
 *
 * What stays GnuTLS's: the handshake, and every record that is not
 * application data (alerts, KeyUpdate, anything unexpected).  The owner
 * (common/stream.c) hands such a record to gnutls_record_recv after
 * telling GnuTLS the sequence numbers reached here (tls_rec_release), and
 * takes the direction back afterwards (tls_rec_take: the keys may have
 * changed, a TLS 1.3 KeyUpdate).  The same before GnuTLS sends anything
 * (our KeyUpdate, close_notify).  So GnuTLS's sequence numbers and keys
 * are always right when GnuTLS works, and ours when we do.
 *
 * Only TLS 1.3 with AES-128-GCM, AES-256-GCM or CHACHA20-POLY1305 (a
 * 12-byte IV, a 16-byte tag, the record layout of RFC 8446 5.2);
 * anything else stays wholly GnuTLS's (tls_rec_possible).
 */
#ifndef STRATA_TLS_RECORD_H
#define STRATA_TLS_RECORD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "strata-config.h"

#define TLS_REC_HDR 5
#define TLS_REC_TAG 16
#define TLS_REC_PLAIN_MAX (16u << 10)          /* RFC 8446 5.1 */
/* The largest ciphertext a peer may send (RFC 8446 5.2) */
#define TLS_REC_CIPHER_MAX (TLS_REC_PLAIN_MAX + 256)
/* The most wire bytes one sealed record of ours takes */
#define TLS_REC_WIRE_MAX (TLS_REC_HDR + TLS_REC_PLAIN_MAX + 1 + TLS_REC_TAG)
/* iovecs one sealed record may gather (the content type takes one) */
#define TLS_REC_IOV 64
/* Our records under one key before we update it (RFC 8446 5.5: AES-GCM
 * keys for at most 2^24.5 full records; GnuTLS updates at 2^24 too) */
#define TLS_REC_KEY_LIMIT (1ull << 24)

#define TLS_CT_ALERT 21
#define TLS_CT_HANDSHAKE 22
#define TLS_CT_APPLICATION_DATA 23

#if STRATA_HAVE_TLS
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>

struct tls_rec_dir {
    bool active;                   /* our state is the one in use */
    bool read;
    gnutls_aead_cipher_hd_t h;
    gnutls_cipher_algorithm_t alg;
    uint8_t key[32];
    size_t key_len;
    uint8_t iv[12];
    uint64_t seq;                  /* the next record's sequence number */
};

/* Whether the session's records can be ours (after its handshake). */
bool tls_rec_possible(gnutls_session_t sess);
/* Takes a direction over from GnuTLS at its current keys and sequence
 * number (call only where GnuTLS holds no record of that direction
 * buffered).  0, or a GnuTLS error code. */
int tls_rec_take(struct tls_rec_dir *d, gnutls_session_t sess, bool read);
/* Hands the direction back: GnuTLS's sequence number is set to ours. */
int tls_rec_release(struct tls_rec_dir *d, gnutls_session_t sess);
void tls_rec_fini(struct tls_rec_dir *d);

/* Seals len bytes of plaintext (iov, at most TLS_REC_IOV - 1 pieces,
 * len <= TLS_REC_PLAIN_MAX) as one application-data record at out (room
 * for TLS_REC_HDR + len + 1 + TLS_REC_TAG bytes).  Returns the record's
 * size on the wire, or a GnuTLS error code (< 0). */
long tls_rec_seal(struct tls_rec_dir *d, const struct iovec *iov, int niov,
                  size_t len, uint8_t *out);

/* The length of the record starting at p (avail bytes there): 0 while its
 * header is incomplete, else TLS_REC_HDR + its ciphertext length. */
size_t tls_rec_wire_len(const uint8_t *p, size_t avail);
/* Whether the whole record at p (wire bytes) is one we may open: an
 * encrypted TLS 1.3 record (outer type application data) of a legal
 * length.  Anything else goes to GnuTLS, which judges it. */
bool tls_rec_openable(const uint8_t *p, size_t wire);
/* Opens the record at p (wire bytes, tls_rec_openable) into dst (room
 * for wire - TLS_REC_HDR - TLS_REC_TAG bytes), leaving p unchanged.  On
 * success *plen is the content's length and *type its real type; the
 * sequence number advances only for application data, so that a record
 * of another type can be handed to GnuTLS as it is.  0, or a GnuTLS
 * error code (GNUTLS_E_DECRYPTION_FAILED, GNUTLS_E_UNEXPECTED_PACKET). */
int tls_rec_open(struct tls_rec_dir *d, const uint8_t *p, size_t wire,
                 uint8_t *dst, size_t *plen, uint8_t *type);
#endif

#endif
