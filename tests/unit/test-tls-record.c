/* Unit tests: TLS 1.3 records of our own (common/tls-record.c) against
 * GnuTLS itself.  A client and a server session (X.509, TLS 1.3, each
 * cipher tls_rec_possible takes) talk through two in-memory pipes; the
 * server's side takes a direction over with tls_rec_take and:
 *   - seals records from iovecs (1 byte to a full 16 KiB record, many
 *     pieces) that the client's gnutls_record_recv must open in order;
 *   - opens records the client's gnutls_record_send made, padded ones
 *     (gnutls_record_send2) included;
 *   - hands a direction back to GnuTLS and takes it again in the middle of
 *     a stream (the sequence numbers carry over both ways);
 *   - follows a client KeyUpdate that asks for the server's: the record is
 *     left to GnuTLS (tls_rec_open reports it as handshake, sequence
 *     number unmoved), the new receive key taken, the server's own
 *     KeyUpdate sent by GnuTLS and the new send key taken;
 *   - refuses a record whose ciphertext was altered. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tls-record.h"

#if STRATA_HAVE_TLS
#include <gnutls/x509.h>
#endif

#if STRATA_HAVE_TLS

struct pipe {
    uint8_t buf[1 << 20];
    size_t start, end;
};

struct end {
    gnutls_session_t s;
    struct pipe *in, *out;
};

static struct pipe c2s, s2c;
static struct end cli, srv;
static gnutls_certificate_credentials_t ccred, scred;
static gnutls_x509_privkey_t key;
static gnutls_x509_crt_t crt;

static ssize_t push_fn(gnutls_transport_ptr_t p, const void *d, size_t n)
{
    struct end *e = p;
    assert_true(e->out->end + n <= sizeof(e->out->buf));
    memcpy(e->out->buf + e->out->end, d, n);
    e->out->end += n;
    return (ssize_t)n;
}

static ssize_t pull_fn(gnutls_transport_ptr_t p, void *d, size_t n)
{
    struct end *e = p;
    size_t avail = e->in->end - e->in->start;
    if (avail == 0) {
        gnutls_transport_set_errno(e->s, EAGAIN);
        return -1;
    }
    n = n < avail ? n : avail;
    memcpy(d, e->in->buf + e->in->start, n);
    e->in->start += n;
    return (ssize_t)n;
}

static int pull_timeout_fn(gnutls_transport_ptr_t p, unsigned ms)
{
    struct end *e = p;
    (void)ms;
    return e->in->end > e->in->start;
}

/* A self-signed ECDSA certificate for the server (the client does not
 * verify it: only the records matter here). */
static void make_cert(void)
{
    assert_int_equal(gnutls_x509_privkey_init(&key), 0);
    assert_int_equal(gnutls_x509_privkey_generate(
                         key, GNUTLS_PK_ECDSA,
                         GNUTLS_CURVE_TO_BITS(GNUTLS_ECC_CURVE_SECP256R1), 0),
                     0);
    assert_int_equal(gnutls_x509_crt_init(&crt), 0);
    assert_int_equal(gnutls_x509_crt_set_version(crt, 3), 0);
    assert_int_equal(gnutls_x509_crt_set_serial(crt, "\x01", 1), 0);
    time_t now = time(NULL);
    assert_int_equal(gnutls_x509_crt_set_activation_time(crt, now - 3600), 0);
    assert_int_equal(gnutls_x509_crt_set_expiration_time(crt, now + 3600), 0);
    assert_int_equal(gnutls_x509_crt_set_dn(crt, "CN=localhost", NULL), 0);
    assert_int_equal(gnutls_x509_crt_set_key(crt, key), 0);
    assert_int_equal(gnutls_x509_crt_sign2(crt, crt, key, GNUTLS_DIG_SHA256, 0),
                     0);
}

static void setup_end(struct end *e, unsigned flags, const char *prio,
                      struct pipe *in, struct pipe *out)
{
    assert_int_equal(gnutls_init(&e->s, flags | GNUTLS_NONBLOCK), 0);
    assert_int_equal(gnutls_priority_set_direct(e->s, prio, NULL), 0);
    assert_int_equal(gnutls_credentials_set(e->s, GNUTLS_CRD_CERTIFICATE,
                                            flags & GNUTLS_SERVER ? scred
                                                                  : ccred),
                     0);
    e->in = in;
    e->out = out;
    gnutls_transport_set_ptr(e->s, e);
    gnutls_transport_set_push_function(e->s, push_fn);
    gnutls_transport_set_pull_function(e->s, pull_fn);
    gnutls_transport_set_pull_timeout_function(e->s, pull_timeout_fn);
}

/* A session pair with cipher (a GnuTLS priority name), handshake done. */
static void pair(const char *cipher)
{
    char prio[256];
    snprintf(prio, sizeof(prio),
             "NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+%s",
             cipher);
    memset(&c2s, 0, sizeof(c2s));
    memset(&s2c, 0, sizeof(s2c));
    assert_int_equal(gnutls_certificate_allocate_credentials(&ccred), 0);
    assert_int_equal(gnutls_certificate_allocate_credentials(&scred), 0);
    assert_int_equal(gnutls_certificate_set_x509_key(scred, &crt, 1, key), 0);
    setup_end(&cli, GNUTLS_CLIENT, prio, &s2c, &c2s);
    setup_end(&srv, GNUTLS_SERVER, prio, &c2s, &s2c);
    int rc = 1, rs = 1;
    for (int i = 0; i < 100 && (rc != 0 || rs != 0); i++) {
        if (rc != 0)
            rc = gnutls_handshake(cli.s);
        if (rs != 0)
            rs = gnutls_handshake(srv.s);
        if (rc != 0 && rc != GNUTLS_E_AGAIN)
            fail_msg("client handshake: %s", gnutls_strerror(rc));
        if (rs != 0 && rs != GNUTLS_E_AGAIN)
            fail_msg("server handshake: %s", gnutls_strerror(rs));
    }
    assert_int_equal(rc, 0);
    assert_int_equal(rs, 0);
    assert_true(tls_rec_possible(srv.s));
}

static void unpair(void)
{
    gnutls_deinit(cli.s);
    gnutls_deinit(srv.s);
    gnutls_certificate_free_credentials(ccred);
    gnutls_certificate_free_credentials(scred);
}

/* The client reads exactly len bytes; they must be want. */
static void client_reads(const uint8_t *want, size_t len)
{
    uint8_t *got = malloc(len + 1);
    size_t n = 0;
    for (int i = 0; n < len && i < 10000; i++) {
        ssize_t r = gnutls_record_recv(cli.s, got + n, len - n);
        if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED)
            continue; /* a session ticket or a KeyUpdate, then more */
        assert_true(r > 0);
        n += (size_t)r;
    }
    assert_int_equal(n, len);
    assert_memory_equal(got, want, len);
    free(got);
}

/* gnutls_record_send seals at most one record per call */
static void send_all(gnutls_session_t sess, const uint8_t *p, size_t len)
{
    while (len > 0) {
        ssize_t r = gnutls_record_send(sess, p, len);
        assert_true(r > 0);
        p += r;
        len -= (size_t)r;
    }
}

static void fill(uint8_t *p, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (uint8_t)(seed + i * 131 + (i >> 7));
}

/* Seals data (cut into pieces of the sizes in cut[], cycled) as records
 * of at most per bytes into s2c. */
static void seal(struct tls_rec_dir *wr, const uint8_t *data, size_t len,
                 size_t per, const size_t *cut, size_t ncut)
{
    size_t off = 0, c = 0;
    while (off < len) {
        size_t rec = len - off < per ? len - off : per;
        struct iovec iov[TLS_REC_IOV - 1];
        int n = 0;
        size_t done = 0;
        while (done < rec) {
            size_t k = cut[c++ % ncut];
            if (k > rec - done || n == TLS_REC_IOV - 2)
                k = rec - done;
            iov[n].iov_base = (void *)(data + off + done);
            iov[n].iov_len = k;
            n++;
            done += k;
        }
        long w = tls_rec_seal(wr, iov, n, rec, s2c.buf + s2c.end);
        assert_true(w == (long)(TLS_REC_HDR + rec + 1 + TLS_REC_TAG));
        s2c.end += (size_t)w;
        off += rec;
    }
}

/* Opens the whole records in c2s into out; returns the content bytes.
 * A record of another type than application data fails the test, or with
 * stop_at_control ends the loop, left in c2s with the sequence number
 * unmoved. */
static size_t open_records(struct tls_rec_dir *rd, uint8_t *out,
                           bool stop_at_control)
{
    size_t total = 0;
    for (;;) {
        size_t avail = c2s.end - c2s.start;
        const uint8_t *p = c2s.buf + c2s.start;
        size_t wire = tls_rec_wire_len(p, avail);
        if (wire == 0 || wire > avail)
            return total;
        assert_true(tls_rec_openable(p, wire));
        size_t plen;
        uint8_t type;
        uint64_t seq = rd->seq;
        assert_int_equal(tls_rec_open(rd, p, wire, out + total, &plen, &type), 0);
        if (type != TLS_CT_APPLICATION_DATA && stop_at_control) {
            assert_true(rd->seq == seq);
            return total;
        }
        assert_int_equal(type, TLS_CT_APPLICATION_DATA);
        assert_true(rd->seq == seq + 1);
        total += plen;
        c2s.start += wire;
    }
}

static size_t open_all(struct tls_rec_dir *rd, uint8_t *out)
{
    return open_records(rd, out, false);
}

static const char *const ciphers[] = {"AES-128-GCM", "AES-256-GCM",
                                      "CHACHA20-POLY1305"};

static void test_seal_to_gnutls(void **state)
{
    (void)state;
    static uint8_t data[200000];
    fill(data, sizeof(data), 7);
    static const size_t cuts[] = {16, 4096, 1, 12, 28, 4096, 3, 7000};
    for (size_t c = 0; c < 3; c++) {
        pair(ciphers[c]);
        struct tls_rec_dir wr = {0};
        assert_int_equal(tls_rec_take(&wr, srv.s, false), 0);
        seal(&wr, data, 1, TLS_REC_PLAIN_MAX, cuts, 1);
        seal(&wr, data + 1, 4124, TLS_REC_PLAIN_MAX, cuts, 2);
        seal(&wr, data + 4125, 100000, TLS_REC_PLAIN_MAX, cuts, 8);
        seal(&wr, data + 104125, 95875, 1000, cuts + 2, 6);
        client_reads(data, sizeof(data));
        tls_rec_fini(&wr);
        unpair();
    }
}

static void test_open_from_gnutls(void **state)
{
    (void)state;
    static uint8_t data[100000], got[100000 + TLS_REC_CIPHER_MAX];
    fill(data, sizeof(data), 11);
    for (size_t c = 0; c < 3; c++) {
        pair(ciphers[c]);
        size_t off = 0;
        size_t sizes[] = {28, 4124, 16384, 1, 30000};
        for (size_t i = 0; i < 5; i++) {
            send_all(cli.s, data + off, sizes[i]);
            off += sizes[i];
        }
        /* padded: zeros after the content type */
        assert_int_equal(gnutls_record_send2(cli.s, data + off, 100, 200, 0), 100);
        off += 100;
        struct tls_rec_dir rd = {0};
        assert_int_equal(tls_rec_take(&rd, srv.s, true), 0);
        assert_int_equal(open_all(&rd, got), off);
        assert_memory_equal(got, data, off);
        tls_rec_fini(&rd);
        unpair();
    }
}

/* Both directions go back and forth between GnuTLS and us. */
static void test_hand_back(void **state)
{
    (void)state;
    static uint8_t data[60000], got[60000 + TLS_REC_CIPHER_MAX];
    fill(data, sizeof(data), 3);
    static const size_t cuts[] = {5000};
    pair("AES-256-GCM");
    struct tls_rec_dir wr = {0}, rd = {0};
    for (int round = 0; round < 3; round++) {
        assert_int_equal(tls_rec_take(&wr, srv.s, false), 0);
        seal(&wr, data, 20000, TLS_REC_PLAIN_MAX, cuts, 1);
        assert_int_equal(tls_rec_release(&wr, srv.s), 0);
        send_all(srv.s, data + 20000, 20000);
        assert_int_equal(tls_rec_take(&wr, srv.s, false), 0);
        seal(&wr, data + 40000, 20000, 3000, cuts, 1);
        assert_int_equal(tls_rec_release(&wr, srv.s), 0);
        client_reads(data, sizeof(data));

        send_all(cli.s, data, 30000);
        assert_int_equal(tls_rec_take(&rd, srv.s, true), 0);
        assert_int_equal(open_all(&rd, got), 30000);
        assert_int_equal(tls_rec_release(&rd, srv.s), 0);
        send_all(cli.s, data + 30000, 30000);
        size_t n = 0;
        while (n < 30000) {
            ssize_t r = gnutls_record_recv(srv.s, got + 30000 + n, 30000 - n);
            assert_true(r > 0);
            n += (size_t)r;
        }
        assert_memory_equal(got, data, sizeof(data));
    }
    tls_rec_fini(&wr);
    tls_rec_fini(&rd);
    unpair();
}

static void test_key_update(void **state)
{
    (void)state;
    static uint8_t data[40000], got[40000 + TLS_REC_CIPHER_MAX];
    fill(data, sizeof(data), 5);
    static const size_t cuts[] = {4124};
    for (size_t c = 0; c < 3; c++) {
        pair(ciphers[c]);
        struct tls_rec_dir wr = {0}, rd = {0};
        assert_int_equal(tls_rec_take(&wr, srv.s, false), 0);
        assert_int_equal(tls_rec_take(&rd, srv.s, true), 0);
        for (int round = 0; round < 4; round++) {
            uint8_t rkey[32], wkey[32];
            memcpy(rkey, rd.key, sizeof(rkey));
            memcpy(wkey, wr.key, sizeof(wkey));
            /* app data, the client's KeyUpdate (asking for ours), more */
            send_all(cli.s, data, 10000);
            assert_int_equal(gnutls_session_key_update(cli.s, GNUTLS_KU_PEER), 0);
            send_all(cli.s, data + 10000, 10000);
            assert_int_equal(open_records(&rd, got, true), 10000);
            /* the KeyUpdate: not application data, sequence unmoved */
            size_t avail = c2s.end - c2s.start;
            const uint8_t *p = c2s.buf + c2s.start;
            size_t wire = tls_rec_wire_len(p, avail);
            assert_true(wire > 0 && wire <= avail && tls_rec_openable(p, wire));
            uint64_t seq = rd.seq;
            size_t plen;
            uint8_t type;
            assert_int_equal(tls_rec_open(&rd, p, wire, got, &plen, &type), 0);
            assert_int_equal(type, TLS_CT_HANDSHAKE);
            assert_true(rd.seq == seq);
            /* GnuTLS reads it, at our sequence number, and nothing more */
            assert_int_equal(tls_rec_release(&rd, srv.s), 0);
            struct pipe rest = c2s;
            c2s.end = c2s.start + wire;
            ssize_t r = gnutls_record_recv(srv.s, got, sizeof(got));
            assert_int_equal(r, GNUTLS_E_AGAIN);
            assert_int_equal(c2s.start, c2s.end);
            c2s.end = rest.end;
            assert_int_equal(tls_rec_take(&rd, srv.s, true), 0);
            assert_memory_not_equal(rd.key, rkey, rd.key_len);
            assert_true(rd.seq == 0);
            assert_int_equal(open_all(&rd, got), 10000);
            assert_memory_equal(got, data + 10000, 10000);
            /* ours, before the next record we seal */
            seal(&wr, data, 5000, TLS_REC_PLAIN_MAX, cuts, 1);
            assert_int_equal(tls_rec_release(&wr, srv.s), 0);
            assert_int_equal(gnutls_session_key_update(srv.s, 0), 0);
            assert_int_equal(tls_rec_take(&wr, srv.s, false), 0);
            assert_memory_not_equal(wr.key, wkey, wr.key_len);
            assert_true(wr.seq == 0);
            seal(&wr, data + 5000, 35000, TLS_REC_PLAIN_MAX, cuts, 1);
            client_reads(data, 40000);
        }
        tls_rec_fini(&wr);
        tls_rec_fini(&rd);
        unpair();
    }
}

static void test_tampered(void **state)
{
    (void)state;
    static uint8_t data[5000], got[5000 + TLS_REC_CIPHER_MAX];
    fill(data, sizeof(data), 9);
    pair("AES-256-GCM");
    send_all(cli.s, data, sizeof(data));
    struct tls_rec_dir rd = {0};
    assert_int_equal(tls_rec_take(&rd, srv.s, true), 0);
    uint8_t *p = c2s.buf + c2s.start;
    size_t wire = tls_rec_wire_len(p, c2s.end - c2s.start);
    for (size_t at = 0; at < wire; at += wire / 7 + 1) {
        p[at] ^= 0x40;
        size_t plen;
        uint8_t type;
        int r = tls_rec_open(&rd, p, wire, got, &plen, &type);
        assert_true(r < 0 || !tls_rec_openable(p, wire));
        p[at] ^= 0x40;
    }
    assert_true(rd.seq == 0);
    size_t plen;
    uint8_t type;
    assert_int_equal(tls_rec_open(&rd, p, wire, got, &plen, &type), 0);
    assert_int_equal(plen, sizeof(data));
    assert_memory_equal(got, data, sizeof(data));
    tls_rec_fini(&rd);
    unpair();
}

int main(void)
{
    assert_int_equal(gnutls_global_init(), 0);
    make_cert();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_seal_to_gnutls),
        cmocka_unit_test(test_open_from_gnutls),
        cmocka_unit_test(test_hand_back),
        cmocka_unit_test(test_key_update),
        cmocka_unit_test(test_tampered),
    };
    int r = cmocka_run_group_tests(tests, NULL, NULL);
    gnutls_x509_crt_deinit(crt);
    gnutls_x509_privkey_deinit(key);
    gnutls_global_deinit();
    return r;
}

#else

int main(void)
{
    return 77; /* skipped: built without GnuTLS */
}

#endif
