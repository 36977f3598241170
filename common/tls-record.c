/* strata — TLS 1.3 records sealed and opened outside GnuTLS (tls-record.h). */
#include <string.h>

#include "tls-record.h"

#if STRATA_HAVE_TLS

bool tls_rec_possible(gnutls_session_t sess)
{
    if (gnutls_protocol_get_version(sess) != GNUTLS_TLS1_3)
        return false;
    switch (gnutls_cipher_get(sess)) {
    case GNUTLS_CIPHER_AES_128_GCM:
    case GNUTLS_CIPHER_AES_256_GCM:
    case GNUTLS_CIPHER_CHACHA20_POLY1305:
        return true;
    default:
        return false;
    }
}

int tls_rec_take(struct tls_rec_dir *d, gnutls_session_t sess, bool read)
{
    gnutls_datum_t mac, iv, key;
    unsigned char seq[8];
    int r = gnutls_record_get_state(sess, read ? 1 : 0, &mac, &iv, &key, seq);
    if (r < 0)
        return r;
    gnutls_cipher_algorithm_t alg = gnutls_cipher_get(sess);
    if (iv.size != sizeof(d->iv) || key.size > sizeof(d->key) ||
        gnutls_cipher_get_tag_size(alg) != TLS_REC_TAG)
        return GNUTLS_E_INTERNAL_ERROR;
    uint64_t n = 0;
    for (int i = 0; i < 8; i++)
        n = n << 8 | seq[i];
    /* the same key (only the sequence number moved): keep the handle */
    if (!d->h || d->alg != alg || d->key_len != key.size ||
        memcmp(d->key, key.data, key.size) != 0 ||
        memcmp(d->iv, iv.data, sizeof(d->iv)) != 0) {
        if (d->h)
            gnutls_aead_cipher_deinit(d->h);
        d->h = NULL;
        r = gnutls_aead_cipher_init(&d->h, alg, &key);
        if (r < 0) {
            d->h = NULL;
            return r;
        }
        d->alg = alg;
        memcpy(d->key, key.data, key.size);
        d->key_len = key.size;
        memcpy(d->iv, iv.data, sizeof(d->iv));
    }
    d->read = read;
    d->seq = n;
    d->active = true;
    return 0;
}

int tls_rec_release(struct tls_rec_dir *d, gnutls_session_t sess)
{
    if (!d->active)
        return 0;
    unsigned char seq[8];
    for (int i = 0; i < 8; i++)
        seq[i] = (unsigned char)(d->seq >> (56 - 8 * i));
    d->active = false;
    return gnutls_record_set_state(sess, d->read ? 1 : 0, seq);
}

void tls_rec_fini(struct tls_rec_dir *d)
{
    if (d->h)
        gnutls_aead_cipher_deinit(d->h);
    explicit_bzero(d, sizeof(*d));
}

/* RFC 8446 5.3: the per-record nonce is the IV XORed with the sequence
 * number, left-padded to the IV's length. */
static void make_nonce(const struct tls_rec_dir *d, uint8_t nonce[12])
{
    memcpy(nonce, d->iv, 12);
    for (int i = 0; i < 8; i++)
        nonce[4 + i] ^= (uint8_t)(d->seq >> (56 - 8 * i));
}

long tls_rec_seal(struct tls_rec_dir *d, const struct iovec *iov, int niov,
                  size_t len, uint8_t *out)
{
    if (niov > TLS_REC_IOV - 1 || len > TLS_REC_PLAIN_MAX)
        return GNUTLS_E_INVALID_REQUEST;
    size_t clen = len + 1 + TLS_REC_TAG;  /* content, its type, the tag */
    out[0] = TLS_CT_APPLICATION_DATA;     /* opaque_type */
    out[1] = 3;                           /* legacy_record_version 0x0303 */
    out[2] = 3;
    out[3] = (uint8_t)(clen >> 8);
    out[4] = (uint8_t)clen;
    giovec_t gv[TLS_REC_IOV];
    for (int i = 0; i < niov; i++) {
        gv[i].iov_base = iov[i].iov_base;
        gv[i].iov_len = iov[i].iov_len;
    }
    static uint8_t type = TLS_CT_APPLICATION_DATA;
    gv[niov].iov_base = &type;
    gv[niov].iov_len = 1;
    giovec_t aad = {.iov_base = out, .iov_len = TLS_REC_HDR};
    uint8_t nonce[12];
    make_nonce(d, nonce);
    size_t olen = clen;
    int r = gnutls_aead_cipher_encryptv(d->h, nonce, sizeof(nonce), &aad, 1,
                                        TLS_REC_TAG, gv, niov + 1,
                                        out + TLS_REC_HDR, &olen);
    if (r < 0)
        return r;
    if (olen != clen)
        return GNUTLS_E_INTERNAL_ERROR;
    d->seq++;
    return (long)(TLS_REC_HDR + clen);
}

size_t tls_rec_wire_len(const uint8_t *p, size_t avail)
{
    if (avail < TLS_REC_HDR)
        return 0;
    return TLS_REC_HDR + ((size_t)p[3] << 8 | p[4]);
}

bool tls_rec_openable(const uint8_t *p, size_t wire)
{
    size_t clen = wire - TLS_REC_HDR;
    return p[0] == TLS_CT_APPLICATION_DATA && p[1] == 3 && p[2] == 3 &&
           clen >= 1 + TLS_REC_TAG && clen <= TLS_REC_CIPHER_MAX;
}

int tls_rec_open(struct tls_rec_dir *d, const uint8_t *p, size_t wire,
                 uint8_t *dst, size_t *plen, uint8_t *type)
{
    size_t clen = wire - TLS_REC_HDR;
    uint8_t nonce[12];
    make_nonce(d, nonce);
    size_t n = clen - TLS_REC_TAG;
    int r = gnutls_aead_cipher_decrypt(d->h, nonce, sizeof(nonce), p,
                                       TLS_REC_HDR, TLS_REC_TAG,
                                       p + TLS_REC_HDR, clen, dst, &n);
    if (r < 0)
        return r;
    /* the real type is the last non-zero byte; zeros after it are
     * padding (RFC 8446 5.4) */
    while (n > 0 && dst[n - 1] == 0)
        n--;
    if (n == 0)
        return GNUTLS_E_UNEXPECTED_PACKET;
    *type = dst[n - 1];
    *plen = n - 1;
    if (*type == TLS_CT_APPLICATION_DATA)
        d->seq++;
    return 0;
}

#endif
