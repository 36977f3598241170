/* strata — TLS sessions, credentials, identities, allow lists (tls.h). */
#include <errno.h>
#include <fnmatch.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "log.h"
#include "strata-config.h"
#include "tls.h"

#if STRATA_HAVE_TLS
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <linux/tls.h>
#endif

/* ---- allow lists (no GnuTLS needed) ---- */

void tls_allow_clear(struct tls_allow *a)
{
    for (size_t i = 0; i < a->n; i++)
        free(a->entries[i]);
    free(a->entries);
    memset(a, 0, sizeof(*a));
}

static int allow_add(struct tls_allow *a, const char *s, size_t len)
{
    char **n = realloc(a->entries, (a->n + 1) * sizeof(*n));
    if (!n)
        return -ENOMEM;
    a->entries = n;
    a->entries[a->n] = strndup(s, len);
    if (!a->entries[a->n])
        return -ENOMEM;
    a->n++;
    return 0;
}

int tls_allow_parse(const char *list, struct tls_allow *out,
                    struct error **errp)
{
    memset(out, 0, sizeof(*out));
    out->present = true;
    const char *p = list;
    while (*p) {
        const char *end = strchr(p, ';');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        while (len && (*p == ' ' || *p == '\t'))
            p++, len--;
        while (len && (p[len - 1] == ' ' || p[len - 1] == '\t'))
            len--;
        if (len && allow_add(out, p, len) < 0) {
            tls_allow_clear(out);
            return error_setf(errp, ENOMEM, "out of memory");
        }
        if (!end)
            break;
        p = end + 1;
    }
    return 0;
}

int tls_allow_copy(const struct tls_allow *from, struct tls_allow *to)
{
    memset(to, 0, sizeof(*to));
    to->present = from->present;
    for (size_t i = 0; i < from->n; i++) {
        if (allow_add(to, from->entries[i], strlen(from->entries[i])) < 0) {
            tls_allow_clear(to);
            return -ENOMEM;
        }
    }
    return 0;
}

bool tls_allow_match(const struct tls_allow *a, const char *identity)
{
    if (!a || !a->present)
        return true;
    if (!identity)
        return false;
    for (size_t i = 0; i < a->n; i++)
        if (fnmatch(a->entries[i], identity, 0) == 0)
            return true;
    return false;
}

/* ---- kernel TLS ---- */

#ifndef TCP_ULP
#define TCP_ULP 31
#endif

bool tls_kernel_offload_available(char *why, size_t len)
{
    /* The ULP attaches only to a connected TCP socket: try a loopback
     * pair of our own, never a client's socket. */
    int l = -1, c = -1, a = -1;
    bool ok = false;
    struct sockaddr_in sin = {.sin_family = AF_INET,
                              .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof(sin);
    l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (l < 0 || c < 0 || bind(l, (struct sockaddr *)&sin, sizeof(sin)) < 0 ||
        listen(l, 1) < 0 || getsockname(l, (struct sockaddr *)&sin, &sl) < 0 ||
        connect(c, (struct sockaddr *)&sin, sizeof(sin)) < 0 ||
        (a = accept4(l, NULL, NULL, SOCK_CLOEXEC)) < 0) {
        snprintf(why, len, "probe socket: %s", strerror(errno));
        goto out;
    }
    if (setsockopt(a, IPPROTO_TCP, TCP_ULP, "tls", sizeof("tls")) < 0) {
        snprintf(why, len, "%s", errno == ENOENT ?
                 "the kernel's tls module is not loaded" : strerror(errno));
        goto out;
    }
    ok = true;
    snprintf(why, len, "available");
out:
    if (a >= 0)
        close(a);
    if (c >= 0)
        close(c);
    if (l >= 0)
        close(l);
    return ok;
}

#if STRATA_HAVE_TLS

#define DEFAULT_PRIORITY_X509 "NORMAL"
#define DEFAULT_PRIORITY_PSK "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK"

struct tls_server {
    enum tls_mode mode;
    bool verify_peer;
    bool psk;
    gnutls_certificate_credentials_t x509;
    gnutls_psk_server_credentials_t pskc;
    gnutls_priority_t prio;
    struct tls_allow allow;
    bool ktls;                     /* --tls-ktls=auto and the ULP is there */
    char ktls_why[128];            /* if not, why */
};

static bool file_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

static int load_x509(struct tls_server *ts, const char *dir,
                     struct error **errp)
{
    char ca[PATH_MAX], cert[PATH_MAX], key[PATH_MAX], crl[PATH_MAX];
    if (snprintf(ca, sizeof(ca), "%s/ca-cert.pem", dir) >= (int)sizeof(ca) ||
        snprintf(cert, sizeof(cert), "%s/server-cert.pem", dir) >=
            (int)sizeof(cert) ||
        snprintf(key, sizeof(key), "%s/server-key.pem", dir) >= (int)sizeof(key) ||
        snprintf(crl, sizeof(crl), "%s/ca-crl.pem", dir) >= (int)sizeof(crl))
        return error_setf(errp, ENAMETOOLONG, "--tls-certificates: path too long");
    int r = gnutls_certificate_allocate_credentials(&ts->x509);
    if (r < 0)
        return error_setf(errp, ENOMEM, "gnutls: %s", gnutls_strerror(r));
    r = gnutls_certificate_set_x509_trust_file(ts->x509, ca,
                                               GNUTLS_X509_FMT_PEM);
    if (r < 0)
        return error_setf(errp, EINVAL, "%s: %s", ca, gnutls_strerror(r));
    if (r == 0)
        return error_setf(errp, EINVAL, "%s: no CA certificate in it", ca);
    if (file_exists(crl)) {
        r = gnutls_certificate_set_x509_crl_file(ts->x509, crl,
                                                 GNUTLS_X509_FMT_PEM);
        if (r < 0)
            return error_setf(errp, EINVAL, "%s: %s", crl, gnutls_strerror(r));
    }
    r = gnutls_certificate_set_x509_key_file(ts->x509, cert, key,
                                             GNUTLS_X509_FMT_PEM);
    if (r < 0)
        return error_setf(errp, EINVAL, "%s, %s: %s", cert, key,
                          gnutls_strerror(r));
    return 0;
}

int tls_server_new(const struct tls_options *o, struct tls_server **out,
                   struct error **errp)
{
    *out = NULL;
    struct tls_server *ts = calloc(1, sizeof(*ts));
    if (!ts)
        return error_setf(errp, ENOMEM, "out of memory");
    ts->mode = o->mode;
    ts->verify_peer = o->verify_peer;
    int ret = 0;
    if (o->allow)
        ret = tls_allow_parse(o->allow, &ts->allow, errp);
    if (ret == 0 && o->mode != TLS_MODE_OFF) {
        int r = gnutls_global_init();
        if (r < 0)
            ret = error_setf(errp, EIO, "gnutls: %s", gnutls_strerror(r));
    }
    if (ret == 0 && o->mode != TLS_MODE_OFF) {
        if (o->psk_file) {
            ts->psk = true;
            int r = gnutls_psk_allocate_server_credentials(&ts->pskc);
            if (r >= 0)
                r = access(o->psk_file, R_OK) == 0
                        ? gnutls_psk_set_server_credentials_file(ts->pskc,
                                                                 o->psk_file)
                        : GNUTLS_E_FILE_ERROR;
            if (r < 0)
                ret = error_setf(errp, EINVAL, "--tls-psk %s: %s", o->psk_file,
                                 r == GNUTLS_E_FILE_ERROR ? strerror(errno)
                                                          : gnutls_strerror(r));
        } else {
            ret = load_x509(ts, o->certificates, errp);
        }
    }
    if (ret == 0 && o->mode != TLS_MODE_OFF) {
        const char *prio = o->priority ? o->priority
                         : ts->psk ? DEFAULT_PRIORITY_PSK
                                   : DEFAULT_PRIORITY_X509;
        const char *where = NULL;
        int r = gnutls_priority_init(&ts->prio, prio, &where);
        if (r < 0)
            ret = error_setf(errp, EINVAL, "--tls-priority '%s': %s%s%s", prio,
                             gnutls_strerror(r), where ? " at " : "",
                             where ? where : "");
    }
    if (ret < 0) {
        tls_server_free(ts);
        return ret;
    }
    if (o->mode != TLS_MODE_OFF && o->ktls == TLS_KTLS_AUTO)
        ts->ktls = tls_kernel_offload_available(ts->ktls_why,
                                                sizeof(ts->ktls_why));
    else
        snprintf(ts->ktls_why, sizeof(ts->ktls_why), "--tls-ktls=off");
    *out = ts;
    return 0;
}

bool tls_server_ktls(const struct tls_server *ts, const char **why)
{
    *why = ts->ktls_why;
    return ts->ktls;
}

bool tls_session_ktls_possible(struct tls_server *ts, void *session,
                               char *why, size_t len)
{
    gnutls_session_t sess = session;
    if (!ts->ktls) {
        snprintf(why, len, "%s", ts->ktls_why);
        return false;
    }
    gnutls_protocol_t v = gnutls_protocol_get_version(sess);
    gnutls_cipher_algorithm_t c = gnutls_cipher_get(sess);
    if (v != GNUTLS_TLS1_2 && v != GNUTLS_TLS1_3) {
        snprintf(why, len, "the kernel takes TLS 1.2 and 1.3 only");
        return false;
    }
    if (c != GNUTLS_CIPHER_AES_128_GCM && c != GNUTLS_CIPHER_AES_256_GCM &&
        c != GNUTLS_CIPHER_CHACHA20_POLY1305) {
        snprintf(why, len, "the kernel does not take cipher %s",
                 gnutls_cipher_get_name(c) ? gnutls_cipher_get_name(c) : "?");
        return false;
    }
    return true;
}

bool tls_session_ktls_rx(void *session, char *why, size_t len)
{
    gnutls_session_t sess = session;
    if (gnutls_protocol_get_version(sess) == GNUTLS_TLS1_2)
        return true;
    snprintf(why, len, "TLS 1.3: the kernel's TLS cannot take the new key of "
             "a peer's KeyUpdate");
    return false;
}

/* Fills one of linux/tls.h's crypto_info structures from the session's
 * state for a direction.  The kernel wants the AEAD nonce base split as
 * RFC 5288 and RFC 8446 build it: AES-GCM in TLS 1.3 has a 12-byte IV,
 * its first 4 bytes the salt and the other 8 the iv field; AES-GCM in
 * TLS 1.2 has only the 4-byte implicit salt, and the iv field is the
 * first explicit nonce the records carry (GnuTLS uses the sequence number
 * for it; the kernel counts on from there); CHACHA20-POLY1305 has no
 * salt and the whole 12-byte IV in both versions (RFC 7905). */
static int ktls_fill(bool tls13, const gnutls_datum_t *key,
                     const gnutls_datum_t *iv, const unsigned char seq[8],
                     uint8_t *k, size_t klen, uint8_t *salt, size_t saltlen,
                     uint8_t *ivf, size_t ivlen, uint8_t *rec_seq)
{
    if (key->size != klen)
        return -EINVAL;
    if (saltlen == 0) {
        if (iv->size != ivlen)
            return -EINVAL;
        memcpy(ivf, iv->data, ivlen);
    } else if (tls13) {
        if (iv->size != saltlen + ivlen)
            return -EINVAL;
        memcpy(salt, iv->data, saltlen);
        memcpy(ivf, iv->data + saltlen, ivlen);
    } else {
        if (iv->size < saltlen || ivlen != 8)
            return -EINVAL;
        memcpy(salt, iv->data, saltlen);
        memcpy(ivf, seq, ivlen);
    }
    memcpy(k, key->data, klen);
    memcpy(rec_seq, seq, 8);
    return 0;
}

/* Once the kernel sends: a KeyUpdate from the peer asking for ours (its
 * last byte, request_update, is 1) would need GnuTLS to send a record
 * under a new key; refusing it fails the session, and the connection
 * closes with this reason in the log. */
static int ktls_key_update_hook(gnutls_session_t sess, unsigned htype,
                                unsigned when, unsigned incoming,
                                const gnutls_datum_t *msg)
{
    (void)sess;
    (void)when;
    if (htype != GNUTLS_HANDSHAKE_KEY_UPDATE || !incoming)
        return 0;
    if (msg && msg->size >= 1 && msg->data[msg->size - 1] == 0)
        return 0; /* only the peer's key changes: GnuTLS receives */
    log_info("TLS 1.3 KeyUpdate from the peer asks for a new send key, but "
             "the kernel's TLS holds it: closing the connection");
    return GNUTLS_E_UNIMPLEMENTED_FEATURE;
}

int tls_session_ktls_install(void *session, int fd, bool rx, char *why,
                             size_t len)
{
    gnutls_session_t sess = session;
    bool tls13 = gnutls_protocol_get_version(sess) == GNUTLS_TLS1_3;
    gnutls_cipher_algorithm_t c = gnutls_cipher_get(sess);
    if (setsockopt(fd, IPPROTO_TCP, TCP_ULP, "tls", sizeof("tls")) < 0 &&
        errno != EEXIST) {
        int e = errno;
        snprintf(why, len, "TCP_ULP tls: %s", strerror(e));
        return -e;
    }
    gnutls_datum_t mac, iv, key;
    unsigned char seq[8];
    int r = gnutls_record_get_state(sess, rx ? 1 : 0, &mac, &iv, &key, seq);
    if (r < 0) {
        snprintf(why, len, "gnutls_record_get_state: %s", gnutls_strerror(r));
        return -EINVAL;
    }
    union {
        struct tls12_crypto_info_aes_gcm_128 g128;
        struct tls12_crypto_info_aes_gcm_256 g256;
        struct tls12_crypto_info_chacha20_poly1305 cc;
    } ci;
    memset(&ci, 0, sizeof(ci));
    struct tls_crypto_info *info = &ci.g128.info;
    size_t size;
    switch (c) {
    case GNUTLS_CIPHER_AES_128_GCM:
        info->cipher_type = TLS_CIPHER_AES_GCM_128;
        size = sizeof(ci.g128);
        r = ktls_fill(tls13, &key, &iv, seq, ci.g128.key, sizeof(ci.g128.key),
                      ci.g128.salt, sizeof(ci.g128.salt), ci.g128.iv,
                      sizeof(ci.g128.iv), ci.g128.rec_seq);
        break;
    case GNUTLS_CIPHER_AES_256_GCM:
        info->cipher_type = TLS_CIPHER_AES_GCM_256;
        size = sizeof(ci.g256);
        r = ktls_fill(tls13, &key, &iv, seq, ci.g256.key, sizeof(ci.g256.key),
                      ci.g256.salt, sizeof(ci.g256.salt), ci.g256.iv,
                      sizeof(ci.g256.iv), ci.g256.rec_seq);
        break;
    case GNUTLS_CIPHER_CHACHA20_POLY1305:
        info->cipher_type = TLS_CIPHER_CHACHA20_POLY1305;
        size = sizeof(ci.cc);
        r = ktls_fill(tls13, &key, &iv, seq, ci.cc.key, sizeof(ci.cc.key),
                      NULL, 0, ci.cc.iv, sizeof(ci.cc.iv), ci.cc.rec_seq);
        break;
    default:
        r = -EINVAL;
        size = 0;
    }
    if (r < 0) {
        explicit_bzero(&ci, sizeof(ci));
        snprintf(why, len, "unexpected key or IV size for %s",
                 gnutls_cipher_get_name(c) ? gnutls_cipher_get_name(c) : "?");
        return r;
    }
    info->version = tls13 ? TLS_1_3_VERSION : TLS_1_2_VERSION;
    r = setsockopt(fd, SOL_TLS, rx ? TLS_RX : TLS_TX, &ci, (socklen_t)size);
    int e = errno;
    explicit_bzero(&ci, sizeof(ci));
    if (r < 0) {
        snprintf(why, len, "SOL_TLS %s: %s", rx ? "TLS_RX" : "TLS_TX",
                 strerror(e));
        return -e;
    }
    if (!rx && tls13)
        gnutls_handshake_set_hook_function(sess, GNUTLS_HANDSHAKE_KEY_UPDATE,
                                           GNUTLS_HOOK_PRE,
                                           ktls_key_update_hook);
    return 0;
}

void tls_server_free(struct tls_server *ts)
{
    if (!ts)
        return;
    if (ts->prio)
        gnutls_priority_deinit(ts->prio);
    if (ts->x509)
        gnutls_certificate_free_credentials(ts->x509);
    if (ts->pskc)
        gnutls_psk_free_server_credentials(ts->pskc);
    tls_allow_clear(&ts->allow);
    if (ts->mode != TLS_MODE_OFF)
        gnutls_global_deinit();
    free(ts);
}

void *tls_session_new(struct tls_server *ts, struct error **errp)
{
    gnutls_session_t sess;
    int r = gnutls_init(&sess, GNUTLS_SERVER | GNUTLS_NONBLOCK);
    if (r < 0) {
        error_setf(errp, ENOMEM, "gnutls_init: %s", gnutls_strerror(r));
        return NULL;
    }
    r = gnutls_priority_set(sess, ts->prio);
    if (r >= 0 && ts->psk)
        r = gnutls_credentials_set(sess, GNUTLS_CRD_PSK, ts->pskc);
    else if (r >= 0)
        r = gnutls_credentials_set(sess, GNUTLS_CRD_CERTIFICATE, ts->x509);
    if (r < 0) {
        gnutls_deinit(sess);
        error_setf(errp, EINVAL, "gnutls: %s", gnutls_strerror(r));
        return NULL;
    }
    if (!ts->psk)
        /* Asked for even without --tls-verify-peer: a certificate that
         * verifies gives an identity for the allow lists. */
        gnutls_certificate_server_set_request(
            sess, ts->verify_peer ? GNUTLS_CERT_REQUIRE : GNUTLS_CERT_REQUEST);
    return sess;
}

static int x509_identity(struct tls_server *ts, gnutls_session_t sess,
                         char **identity, struct error **errp)
{
    unsigned n = 0;
    const gnutls_datum_t *certs = gnutls_certificate_get_peers(sess, &n);
    if (!certs || n == 0) {
        if (ts->verify_peer)
            return error_setf(errp, EACCES, "no client certificate");
        return 0;
    }
    unsigned status = 0;
    int r = gnutls_certificate_verify_peers2(sess, &status);
    if (r < 0 || status != 0) {
        char text[256] = "";
        gnutls_datum_t out = {0};
        if (r >= 0 && gnutls_certificate_verification_status_print(
                          status, GNUTLS_CRT_X509, &out, 0) >= 0) {
            snprintf(text, sizeof(text), "%s", (const char *)out.data);
            gnutls_free(out.data);
        }
        if (ts->verify_peer)
            return error_setf(errp, EACCES, "client certificate: %s",
                              r < 0 ? gnutls_strerror(r) : text);
        log_debug("client certificate ignored: %s",
                  r < 0 ? gnutls_strerror(r) : text);
        return 0; /* unverified: no identity, refused by any allow list */
    }
    gnutls_x509_crt_t crt;
    if (gnutls_x509_crt_init(&crt) < 0)
        return error_setf(errp, ENOMEM, "out of memory");
    gnutls_datum_t dn = {0};
    r = gnutls_x509_crt_import(crt, &certs[0], GNUTLS_X509_FMT_DER);
    if (r >= 0)
        r = gnutls_x509_crt_get_dn3(crt, &dn, 0); /* RFC 4514 */
    gnutls_x509_crt_deinit(crt);
    if (r < 0)
        return error_setf(errp, EACCES, "client certificate: %s",
                          gnutls_strerror(r));
    *identity = strndup((const char *)dn.data, dn.size);
    gnutls_free(dn.data);
    return *identity ? 0 : error_setf(errp, ENOMEM, "out of memory");
}

int tls_session_identity(struct tls_server *ts, void *session,
                         char **identity, struct error **errp)
{
    gnutls_session_t sess = session;
    *identity = NULL;
    if (ts->psk) {
        const char *user = gnutls_psk_server_get_username(sess);
        if (!user)
            return error_setf(errp, EACCES, "no PSK username");
        *identity = strdup(user);
        return *identity ? 0 : error_setf(errp, ENOMEM, "out of memory");
    }
    return x509_identity(ts, sess, identity, errp);
}

void tls_session_describe(void *session, char *buf, size_t len)
{
    gnutls_session_t sess = session;
    const char *v = gnutls_protocol_get_name(gnutls_protocol_get_version(sess));
    const char *c = gnutls_cipher_get_name(gnutls_cipher_get(sess));
    snprintf(buf, len, "%s %s", v ? v : "?", c ? c : "?");
}

#else /* !STRATA_HAVE_TLS */

struct tls_server {
    struct tls_allow allow;
};

int tls_server_new(const struct tls_options *o, struct tls_server **out,
                   struct error **errp)
{
    *out = NULL;
    if (o->mode != TLS_MODE_OFF)
        return error_setf(errp, ENOTSUP, "--tls: this stratad was built "
                          "without GnuTLS (meson -Dtls=enabled)");
    struct tls_server *ts = calloc(1, sizeof(*ts));
    if (!ts)
        return error_setf(errp, ENOMEM, "out of memory");
    if (o->allow && tls_allow_parse(o->allow, &ts->allow, errp) < 0) {
        free(ts);
        return -EINVAL;
    }
    *out = ts;
    return 0;
}

void tls_server_free(struct tls_server *ts)
{
    if (!ts)
        return;
    tls_allow_clear(&ts->allow);
    free(ts);
}

void *tls_session_new(struct tls_server *ts, struct error **errp)
{
    (void)ts;
    error_setf(errp, ENOTSUP, "built without TLS");
    return NULL;
}

int tls_session_identity(struct tls_server *ts, void *session,
                         char **identity, struct error **errp)
{
    (void)ts;
    (void)session;
    *identity = NULL;
    return error_setf(errp, ENOTSUP, "built without TLS");
}

void tls_session_describe(void *session, char *buf, size_t len)
{
    (void)session;
    snprintf(buf, len, "none");
}

bool tls_server_ktls(const struct tls_server *ts, const char **why)
{
    (void)ts;
    *why = "built without TLS";
    return false;
}

bool tls_session_ktls_possible(struct tls_server *ts, void *session,
                               char *why, size_t len)
{
    (void)ts;
    (void)session;
    snprintf(why, len, "built without TLS");
    return false;
}

bool tls_session_ktls_rx(void *session, char *why, size_t len)
{
    (void)session;
    snprintf(why, len, "built without TLS");
    return false;
}

int tls_session_ktls_install(void *session, int fd, bool rx, char *why,
                             size_t len)
{
    (void)session;
    (void)fd;
    (void)rx;
    snprintf(why, len, "built without TLS");
    return -ENOTSUP;
}

#endif

enum tls_mode tls_server_mode(const struct tls_server *ts)
{
#if STRATA_HAVE_TLS
    return ts ? ts->mode : TLS_MODE_OFF;
#else
    (void)ts;
    return TLS_MODE_OFF;
#endif
}

const struct tls_allow *tls_server_allow(const struct tls_server *ts)
{
    return ts && ts->allow.present ? &ts->allow : NULL;
}
