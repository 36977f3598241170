/* strata — socket byte streams on the loop (see stream.h). */
#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "strata-config.h"
#include "stream.h"
#include "util.h"

/* Compact rbuf when fewer than this many bytes are free at its end. */
#define STREAM_MIN_TAIL 4096

static void recv_done(struct loop_op *op, int res, uint32_t flags);
static void send_done(struct loop_op *op, int res, uint32_t flags);
static void sq_advance(struct stream *s, size_t n);
static void ms_want(struct stream *s);
static bool ms_recv_done(struct stream *s, int res, uint32_t flags);

/* The TLS record layer (at the end of this file). */
static size_t tls_plain_limit(const struct stream *s);
static void tls_plain_sent(struct stream *s, size_t n);
static void tls_start_send(struct stream *s);
static bool tls_send_done(struct stream *s, int res);
static bool tls_established(const struct stream *s);
static void tls_start_raw_recv(struct stream *s);
static bool tls_start_recv(struct stream *s, uint8_t *dst, size_t len,
                           bool direct);
static bool tls_recv_done(struct stream *s, int *res);
static void tls_idle_send(struct stream *s);
static void tls_fini(struct stream *s);

void stream_init(struct stream *s, struct loop *loop, int fd, uint8_t *rbuf,
                 size_t rcap, const struct stream_ops *ops, void *owner)
{
    memset(s, 0, sizeof(*s));
    s->loop = loop;
    s->fd = fd;
    s->ops = ops;
    s->owner = owner;
    s->rbuf = rbuf;
    s->rcap = rcap;
    s->recv_op.done = recv_done;
    s->send_op.done = send_done;
}

/* ---- output ---- */

void stream_send(struct stream *s, struct stream_item *si)
{
    si->next = NULL;
    if (s->dead) {
        si->done(si);
        return;
    }
    si->total = 0;
    for (int i = 0; i < si->niov; i++)
        si->total += si->iov[i].iov_len;
    s->sq_bytes += si->total;
    if (s->sq_tail)
        s->sq_tail->next = si;
    else
        s->sq_head = si;
    s->sq_tail = si;
    s->ops->kick(s);
}

struct copy_item {
    struct stream_item si;
    struct iovec iov;
    uint8_t data[];
};

static void copy_item_done(struct stream_item *si)
{
    free(container_of(si, struct copy_item, si));
}

int stream_send_copy(struct stream *s, const void *buf, size_t len)
{
    struct copy_item *ci = malloc(sizeof(*ci) + len);
    if (!ci)
        return -ENOMEM;
    memcpy(ci->data, buf, len);
    ci->iov.iov_base = ci->data;
    ci->iov.iov_len = len;
    ci->si.iov = &ci->iov;
    ci->si.niov = 1;
    ci->si.done = copy_item_done;
    stream_send(s, &ci->si);
    return 0;
}

void stream_start_send(struct stream *s)
{
    if (s->send_pending || s->dead)
        return;
    size_t limit = SIZE_MAX;       /* plaintext bytes this send may take */
    if (s->tls) {
        limit = tls_plain_limit(s);
        if (limit == 0) {
            tls_start_send(s);
            return;
        }
        if (!s->sq_head)
            tls_idle_send(s); /* kernel TLS: the close_notify */
    }
    if (!s->sq_head)
        return;
    int k = 0;
    size_t skip = s->sq_off;
    for (struct stream_item *si = s->sq_head; si && k < STREAM_SEND_IOV;
         si = si->next) {
        for (int i = 0; i < si->niov && k < STREAM_SEND_IOV; i++) {
            size_t len = si->iov[i].iov_len;
            if (skip >= len) {
                skip -= len;
                continue;
            }
            if (limit == 0)
                break;
            s->siov[k].iov_base = (char *)si->iov[i].iov_base + skip;
            s->siov[k].iov_len = MIN(len - skip, limit);
            limit -= s->siov[k].iov_len;
            skip = 0;
            k++;
        }
    }
    assert(k > 0);
    memset(&s->msg, 0, sizeof(s->msg));
    s->msg.msg_iov = s->siov;
    s->msg.msg_iovlen = (size_t)k;
    struct io_uring_sqe *sqe = loop_get_sqe(s->loop, &s->send_op);
    io_uring_prep_sendmsg(sqe, s->fd, &s->msg, MSG_NOSIGNAL);
    s->send_pending = true;
}

/* n bytes of the queue are gone (sent, or sealed into TLS records): each
 * item wholly gone is done. */
static void sq_advance(struct stream *s, size_t n)
{
    assert(n <= s->sq_bytes);
    s->sq_bytes -= n;
    while (n > 0 && s->sq_head) {
        struct stream_item *si = s->sq_head;
        size_t left = si->total - s->sq_off;
        if (n < left) {
            s->sq_off += n; /* a short send: resumed from here */
            break;
        }
        n -= left;
        s->sq_off = 0;
        s->sq_head = si->next;
        if (!s->sq_head)
            s->sq_tail = NULL;
        si->done(si);
    }
}

static void send_done(struct loop_op *op, int res, uint32_t flags)
{
    struct stream *s = container_of(op, struct stream, send_op);
    (void)flags;
    s->send_pending = false;
    if (s->tls && tls_send_done(s, res))
        return;
    if (res == -EINTR || res == -EAGAIN) {
        s->ops->kick(s);
        return;
    }
    if (res <= 0) {
        s->ops->send_failed(s, res);
        s->ops->kick(s);
        return;
    }
    if (s->tls)
        tls_plain_sent(s, (size_t)res);
    sq_advance(s, (size_t)res);
    s->ops->kick(s);
}

void stream_drop_queue(struct stream *s)
{
    assert(!s->send_pending);
    while (s->sq_head) {
        struct stream_item *si = s->sq_head;
        s->sq_head = si->next;
        si->done(si);
    }
    s->sq_tail = NULL;
    s->sq_off = 0;
    s->sq_bytes = 0;
}

/* ---- input ---- */

bool stream_start_recv(struct stream *s)
{
    if (s->recv_pending)
        return true;
    if (s->tls && !tls_established(s)) {
        tls_start_raw_recv(s);
        return true;
    }
    if (s->rstart == s->rend) {
        s->rstart = s->rend = 0;
    } else if (s->rend == s->rcap || s->rcap - s->rend < STREAM_MIN_TAIL) {
        memmove(s->rbuf, s->rbuf + s->rstart, s->rend - s->rstart);
        s->rend -= s->rstart;
        s->rstart = 0;
    }
    if (s->rend == s->rcap)
        return false; /* full of unparsed data: parsing must catch up */
    if (s->br) {
        s->recv_pending = true;
        s->recv_direct = false;
        ms_want(s);
        return true;
    }
    if (s->tls &&
        tls_start_recv(s, s->rbuf + s->rend, s->rcap - s->rend, false))
        return true;
    struct io_uring_sqe *sqe = loop_get_sqe(s->loop, &s->recv_op);
    io_uring_prep_recv(sqe, s->fd, s->rbuf + s->rend, s->rcap - s->rend, 0);
    s->recv_pending = true;
    s->recv_direct = false;
    return true;
}

void stream_start_recv_into(struct stream *s, void *dst, size_t len)
{
    if (s->recv_pending)
        return;
    assert(len > 0);
    if (s->br) {
        s->recv_pending = true;
        s->recv_direct = true;
        s->want_dst = dst;
        s->want_len = len;
        ms_want(s);
        return;
    }
    if (s->tls && tls_start_recv(s, dst, len, true))
        return;
    struct io_uring_sqe *sqe = loop_get_sqe(s->loop, &s->recv_op);
    io_uring_prep_recv(sqe, s->fd, dst, len, 0);
    s->recv_pending = true;
    s->recv_direct = true;
}

static void recv_done(struct loop_op *op, int res, uint32_t flags)
{
    struct stream *s = container_of(op, struct stream, recv_op);
    if (s->br && !s->single_pending && ms_recv_done(s, res, flags))
        return;
    if (s->single_pending && !s->recv_direct) {
        /* Input in bulk (a plain recv into rbuf took at least a provided
         * buffer's worth) goes on with plain recvs, each taking all that
         * waits; sparse input (small requests, one or two per wake-up)
         * arms the multishot receive again. */
        s->ms_dry = res >= (int)STREAM_MS_BUFSIZE;
    }
    s->single_pending = false;
    s->recv_pending = false;
    if (res == -EINTR || res == -EAGAIN) {
        s->ops->kick(s);
        return;
    }
    if (s->tls && tls_recv_done(s, &res))
        return;
    if (res > 0 && !s->recv_direct) {
        assert((size_t)res <= s->rcap - s->rend);
        s->rend += (size_t)res;
    }
    s->ops->received(s, res, s->recv_direct);
    s->ops->kick(s);
}

/* ---- multishot receive into provided buffers ---- */

bool stream_use_multishot(struct stream *s)
{
    if (s->br)
        return true;
    if (s->tls || s->recv_pending ||
        !(loop_features(s->loop) & LOOP_F_RECV_MULTISHOT))
        return false;
    s->br = loop_bufring_new(s->loop, STREAM_MS_BUFS, STREAM_MS_BUFSIZE);
    return s->br != NULL;
}

/* Gives the provided buffers back and goes on one recv at a time (the
 * kernel refused a multishot receive).  Nothing is held then. */
static void ms_stop(struct stream *s)
{
    assert(!s->ms_armed && s->held_n == 0);
    loop_undefer(s->loop, &s->ms_hook);
    loop_bufring_free(s->br);
    s->br = NULL;
}

static void ms_arm(struct stream *s)
{
    struct io_uring_sqe *sqe = loop_get_sqe(s->loop, &s->recv_op);
    io_uring_prep_recv_multishot(sqe, s->fd, NULL, 0, 0);
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = loop_bufring_bgid(s->br);
    s->ms_armed = true;
}

/* Copies held bytes to the owner's target and tells it; or reports the
 * end of the stream once nothing is held.  Only while the owner asks. */
static void ms_deliver(struct stream *s)
{
    if (!s->recv_pending)
        return;
    uint8_t *dst;
    size_t room;
    if (s->recv_direct) {
        dst = s->want_dst;
        room = s->want_len;
    } else {
        dst = s->rbuf + s->rend;
        room = s->rcap - s->rend;
    }
    size_t got = 0;
    while (s->held_n > 0 && got < room) {
        unsigned i = s->held_head;
        uint8_t *src = loop_bufring_buf(s->br, s->held[i].bid);
        size_t n = MIN((size_t)(s->held[i].len - s->held[i].off), room - got);
        memcpy(dst + got, src + s->held[i].off, n);
        got += n;
        s->held[i].off += (uint32_t)n;
        if (s->held[i].off == s->held[i].len) {
            /* every byte taken: the kernel may fill it again */
            loop_bufring_put(s->br, s->held[i].bid);
            s->held_head = (i + 1) % STREAM_MS_BUFS;
            s->held_n--;
        }
    }
    int res;
    if (got > 0)
        res = (int)MIN(got, (size_t)INT32_MAX); /* room <= rcap or a payload */
    else if (s->ms_final_set)
        res = s->ms_final;
    else
        return;
    s->recv_pending = false;
    if (res > 0 && !s->recv_direct)
        s->rend += (size_t)res;
    s->ops->received(s, res, s->recv_direct);
    s->ops->kick(s);
}

static void ms_hook_fn(struct loop_hook *h)
{
    struct stream *s = container_of(h, struct stream, ms_hook);
    ms_deliver(s);
}

/* The owner asks for input (recv_pending is set). */
static void ms_want(struct stream *s)
{
    if (s->held_n > 0 || s->ms_final_set) {
        /* answered from the loop, never from inside the owner's call */
        s->ms_hook.fn = ms_hook_fn;
        loop_defer(s->loop, &s->ms_hook);
        return;
    }
    if (s->ms_armed || s->single_pending)
        return;
    if (s->ms_dry || (s->recv_direct && s->want_len >= STREAM_DIRECT_MIN)) {
        /* Bulk input: a large payload straight into its buffer, or, once
         * the ring ran dry and while input keeps coming in bulk, all that
         * waits into rbuf at once. */
        struct io_uring_sqe *sqe = loop_get_sqe(s->loop, &s->recv_op);
        if (s->recv_direct)
            io_uring_prep_recv(sqe, s->fd, s->want_dst, s->want_len, 0);
        else
            io_uring_prep_recv(sqe, s->fd, s->rbuf + s->rend,
                               s->rcap - s->rend, 0);
        s->single_pending = true;
        return;
    }
    ms_arm(s);
}

/* A completion of the multishot recv: bytes to hold, the ring run dry,
 * the end of the stream (reported once the held bytes were taken), or the
 * kernel refusing multishot receives (the stream goes back to one recv at
 * a time).  Always handled here: returns true. */
static bool ms_recv_done(struct stream *s, int res, uint32_t flags)
{
    if (!(flags & IORING_CQE_F_MORE))
        s->ms_armed = false;
    if (res > 0) {
        assert(flags & IORING_CQE_F_BUFFER);
        assert(s->held_n < STREAM_MS_BUFS);
        unsigned i = (s->held_head + s->held_n) % STREAM_MS_BUFS;
        s->held[i].bid = (uint16_t)(flags >> IORING_CQE_BUFFER_SHIFT);
        s->held[i].off = 0;
        s->held[i].len = (uint32_t)res;
        s->held_n++;
        s->ms_got_data = true;
    } else if (res == -EINVAL && !s->ms_got_data && !s->ms_armed &&
               s->held_n == 0 && !s->ms_final_set) {
        /* a kernel without multishot receive (before 6.0) */
        loop_no_multishot(s->loop);
        ms_stop(s);
        if (s->recv_pending) {
            /* ask again, with a plain recv */
            s->recv_pending = false;
            if (s->recv_direct)
                stream_start_recv_into(s, s->want_dst, s->want_len);
            else
                (void)stream_start_recv(s);
        }
        s->ops->kick(s);
        return true;
    } else if (res == -ENOBUFS) {
        s->ms_dry = true; /* every buffer held: plain recvs (recv_done) */
    } else if (res == -EINTR || res == -EAGAIN) {
        /* interrupted: armed again on demand */
    } else if (!s->ms_final_set) {
        /* end of stream or an error: reported after the held bytes */
        s->ms_final_set = true;
        s->ms_final = res;
    }
    ms_deliver(s);
    if (!s->ms_armed && s->recv_pending && s->held_n == 0 && !s->ms_final_set)
        ms_want(s);
    s->ops->kick(s); /* the owner may be waiting for the recv to end */
    return true;
}

void stream_fini(struct stream *s)
{
    assert(!stream_busy(s));
    if (s->br) {
        loop_undefer(s->loop, &s->ms_hook);
        loop_bufring_free(s->br);
        s->br = NULL;
        s->held_n = 0;
    }
    tls_fini(s);
}

/* ---- TLS ----
 *
 * Input: io_uring recvs fill tls->in with ciphertext; the pull function
 * hands it to GnuTLS, which decrypts into the owner's target (the free
 * tail of rbuf, or a direct target).  A recv the owner starts while whole
 * records are still buffered is answered from a deferred hook, so the
 * owner always hears of input from the loop, never from inside its own
 * call.  Output: queued items are sealed into records (corked, so a reply
 * header and its payload share records) and the push function appends
 * them to tls->out, which one send at a time drains; sealing stops while
 * TLS_OUT_HIGH bytes wait, which bounds the buffer.
 *
 * Kernel TLS (stream_tls_offload): a direction the kernel's tls ULP
 * carries is the plaintext path above (io_uring sends from the queue,
 * recvs into the owner's targets); the kernel seals and opens its records.
 * Sending moves once tls->out is empty (no record GnuTLS sealed is still
 * unsent, so the sequence number handed over is the next one on the
 * wire); receiving moves only when tls->in is empty and GnuTLS holds no
 * decrypted bytes (GnuTLS reads a record's header, then exactly its body:
 * with tls->in empty the socket's next byte starts a record).  A record
 * the kernel cannot give as data (an alert, a post-handshake message)
 * makes the recv fail with EIO; it is then read with its record type and
 * judged (ktls_control_record).
 */

#if STRATA_HAVE_TLS
#include <gnutls/gnutls.h>
#include <linux/tls.h>

#include "log.h"
#include "tls-record.h"

#ifndef SOL_TLS
#define SOL_TLS 282
#endif
#define TLS_HS_KEY_UPDATE 24

#define TLS_IN_SIZE (256u << 10)
#define TLS_IN_MIN_TAIL (17u << 10)   /* one whole record fits */
#define TLS_OUT_HIGH (256u << 10)
#define TLS_SEAL_CHUNK (64u << 10)    /* plaintext per corked record_send */
#define TLS_RECORD_PLAIN (16u << 10)  /* plaintext of a full record */

enum tls_phase {
    TLS_HANDSHAKE,                 /* records are handshake messages */
    TLS_ON,                        /* application data */
    TLS_FAILED,                    /* GnuTLS reported a fatal error */
};

struct stream_tls {
    gnutls_session_t sess;
    enum tls_phase phase;
    size_t plain_left;             /* queued bytes still sent in plaintext */
    const char *err;               /* gnutls_strerror text */

    uint8_t *in;                   /* ciphertext received: [in_start, in_end) */
    size_t in_start, in_end;
    bool in_eof;                   /* the peer closed its side */
    bool eof_seen;                 /* close_notify: report end of stream */

    uint8_t *out;                  /* sealed, to send: [out_start, out_end) */
    size_t out_cap, out_start, out_end;
    bool out_sending;              /* the send in flight is from out */
    bool bye_wanted, bye_done;

    uint8_t *dst;                  /* the owner's plaintext target */
    size_t dst_len;

    bool ktls_tx_wanted, ktls_rx_wanted; /* stream_tls_offload asked */
    bool ktls_tx, ktls_rx;         /* the kernel carries the direction */
    char errbuf[128];              /* err, when it is ours */

    /* Records of our own (tls-record.h): application data sealed and
     * opened here, everything else by GnuTLS. */
    bool rec_ok;                   /* TLS 1.3 with an AEAD we take */
    struct tls_rec_dir wr, rd;     /* active: the direction is ours now */
    size_t plain_max;              /* content bytes per record we seal */
    bool ku_wanted;                /* the peer asked for our KeyUpdate */
    uint8_t *scratch;              /* a record opened, not all delivered: */
    size_t sc_off, sc_len;         /* its content [sc_off, sc_off + sc_len) */
    bool pull_limited;             /* GnuTLS may pull only pull_left more */
    size_t pull_left;
    /* Where GnuTLS is in the record it pulls (GnuTLS 3.7 has no call to
     * ask): header bytes pulled (0: at a record boundary), the header,
     * and body bytes still to pull. */
    unsigned g_hdr_have;
    uint8_t g_hdr[TLS_REC_HDR];
    size_t g_body_left;
};

/* Follows the record framing of the bytes GnuTLS pulls. */
static void pull_track(struct stream_tls *t, const uint8_t *p, size_t n)
{
    while (n > 0) {
        if (t->g_hdr_have < TLS_REC_HDR) {
            size_t k = MIN(n, TLS_REC_HDR - t->g_hdr_have);
            memcpy(t->g_hdr + t->g_hdr_have, p, k);
            t->g_hdr_have += (unsigned)k;
            p += k;
            n -= k;
            if (t->g_hdr_have == TLS_REC_HDR) {
                t->g_body_left = (size_t)t->g_hdr[3] << 8 | t->g_hdr[4];
                if (t->g_body_left == 0)
                    t->g_hdr_have = 0;
            }
            continue;
        }
        size_t k = MIN(n, t->g_body_left);
        t->g_body_left -= k;
        p += k;
        n -= k;
        if (t->g_body_left == 0)
            t->g_hdr_have = 0;
    }
}

static int own_hook(gnutls_session_t sess, unsigned htype, unsigned when,
                    unsigned incoming, const gnutls_datum_t *msg);
static void tls_fail(struct stream *s, int gerr);

static ssize_t tls_push(gnutls_transport_ptr_t p, const void *data, size_t len)
{
    struct stream *s = p;
    struct stream_tls *t = s->tls;
    if (t->ktls_tx) {
        /* The kernel holds the send key and sequence number: a record from
         * GnuTLS now would be out of sequence.  Nothing makes GnuTLS send
         * once the handshake ended but an answer to a peer's request (a
         * key update): refuse it, the connection fails. */
        if (!t->err)
            t->err = "GnuTLS had a record to send after the kernel took the "
                     "send direction";
        gnutls_transport_set_errno(t->sess, EIO);
        return -1;
    }
    if (t->out_cap - t->out_end < len && t->out_start > 0 && !t->out_sending) {
        memmove(t->out, t->out + t->out_start, t->out_end - t->out_start);
        t->out_end -= t->out_start;
        t->out_start = 0;
    }
    if (t->out_cap - t->out_end < len) {
        /* a send in flight points into out: it may move only when idle */
        size_t cap = MAX(t->out_cap * 2, t->out_end + len);
        uint8_t *n = t->out_sending ? NULL : realloc(t->out, cap);
        if (!n) {
            gnutls_transport_set_errno(t->sess, t->out_sending ? EAGAIN : ENOMEM);
            return -1;
        }
        t->out = n;
        t->out_cap = cap;
    }
    memcpy(t->out + t->out_end, data, len);
    t->out_end += len;
    return (ssize_t)len;
}

static ssize_t tls_pull(gnutls_transport_ptr_t p, void *data, size_t len)
{
    struct stream *s = p;
    struct stream_tls *t = s->tls;
    size_t avail = t->in_end - t->in_start;
    if (t->pull_limited) {
        avail = MIN(avail, t->pull_left);
        if (avail == 0) {
            gnutls_transport_set_errno(t->sess, EAGAIN); /* one record */
            return -1;
        }
    }
    if (avail == 0) {
        if (t->in_eof)
            return 0;
        gnutls_transport_set_errno(t->sess, EAGAIN);
        return -1;
    }
    size_t n = MIN(avail, len);
    memcpy(data, t->in + t->in_start, n);
    pull_track(t, t->in + t->in_start, n);
    t->in_start += n;
    if (t->pull_limited)
        t->pull_left -= n;
    if (t->in_start == t->in_end)
        t->in_start = t->in_end = 0;
    return (ssize_t)n;
}

static int tls_pull_timeout(gnutls_transport_ptr_t p, unsigned ms)
{
    struct stream *s = p;
    const struct stream_tls *t = s->tls;
    (void)ms;
    /* never waits: the loop brings more */
    if (t->pull_limited)
        return t->pull_left > 0 && t->in_end > t->in_start ? 1 : 0;
    return t->in_end > t->in_start || t->in_eof ? 1 : 0;
}

long stream_tls_start(struct stream *s, void *session)
{
    gnutls_session_t sess = session;
    if (s->tls || s->recv_pending) {
        gnutls_deinit(sess);
        return -EBUSY;
    }
    struct stream_tls *t = calloc(1, sizeof(*t));
    if (t) {
        t->in = malloc(TLS_IN_SIZE);
        t->out_cap = 64u << 10;
        t->out = malloc(t->out_cap);
        t->scratch = malloc(TLS_REC_CIPHER_MAX);
    }
    if (!t || !t->in || !t->out || !t->scratch) {
        if (t) {
            free(t->in);
            free(t->out);
            free(t->scratch);
        }
        free(t);
        gnutls_deinit(sess);
        return -ENOMEM;
    }
    t->sess = sess;
    t->phase = TLS_HANDSHAKE;
    gnutls_transport_set_ptr(sess, s);
    gnutls_transport_set_push_function(sess, tls_push);
    gnutls_transport_set_pull_function(sess, tls_pull);
    gnutls_transport_set_pull_timeout_function(sess, tls_pull_timeout);
    gnutls_handshake_set_timeout(sess, 0); /* the owner's deadline rules */
    /* Records of our own after the handshake, unless the environment
     * asks for GnuTLS's record layer (STRATA_TLS_RECORDS=gnutls: tests
     * and benchmarks compare the two). */
    const char *rec = getenv("STRATA_TLS_RECORDS");
    t->rec_ok = !rec || strcmp(rec, "gnutls") != 0;
    t->plain_max = TLS_REC_PLAIN_MAX;
    gnutls_handshake_set_hook_function(sess, GNUTLS_HANDSHAKE_ANY,
                                       GNUTLS_HOOK_PRE, own_hook);

    /* Discard what the peer sent before it could have read the reply
     * accepting the upgrade: unparsed input, and what the socket holds now
     * (a non-blocking recv: nothing waits).  The reply is sent only after
     * this, by the loop. */
    long dropped = (long)(s->rend - s->rstart);
    s->rstart = s->rend = 0;
    for (;;) {
        ssize_t n = recv(s->fd, t->in, TLS_IN_SIZE, MSG_DONTWAIT);
        if (n > 0) {
            dropped += n;
            continue;
        }
        if (n == 0)
            t->in_eof = true;
        break; /* EAGAIN: the socket is empty; other errors show up later */
    }
    t->plain_left = s->sq_bytes;
    s->tls = t;
    return dropped;
}

void *stream_tls_session(const struct stream *s)
{
    return s->tls ? s->tls->sess : NULL;
}

const char *stream_tls_error(const struct stream *s)
{
    return s->tls ? s->tls->err : NULL;
}

bool stream_tls_established(const struct stream *s)
{
    return s->tls && s->tls->phase == TLS_ON;
}

static bool tls_established(const struct stream *s)
{
    return stream_tls_established(s);
}

size_t stream_tls_backlog(const struct stream *s)
{
    const struct stream_tls *t = s->tls;
    if (!t)
        return 0;
    return t->out_end - t->out_start + (t->bye_wanted && !t->bye_done);
}

void stream_tls_bye(struct stream *s)
{
    if (s->tls && s->tls->phase == TLS_ON)
        s->tls->bye_wanted = true;
}

static void tls_fail(struct stream *s, int gerr)
{
    struct stream_tls *t = s->tls;
    t->phase = TLS_FAILED;
    if (!t->err)
        t->err = gnutls_strerror(gerr);
}

void stream_tls_offload(struct stream *s, bool rx)
{
    struct stream_tls *t = s->tls;
    if (!t || t->phase != TLS_ON || !s->ops->tls_offload)
        return;
    t->ktls_tx_wanted = true;
    t->ktls_rx_wanted = rx;
}

unsigned stream_tls_offloaded(const struct stream *s)
{
    const struct stream_tls *t = s->tls;
    return t ? (t->ktls_tx ? 1u : 0u) | (t->ktls_rx ? 2u : 0u) : 0u;
}

/* No queued item and no send in flight: with the kernel sending, the
 * close_notify alert stream_tls_bye asked for goes out as a record of its
 * own type (a control message), without waiting: two bytes into a socket
 * whose queue drained.  Should it not fit, the peer sees the close
 * without it, as after any abrupt close. */
static void tls_idle_send(struct stream *s)
{
    struct stream_tls *t = s->tls;
    if (!t->ktls_tx || !t->bye_wanted || t->bye_done)
        return;
    t->bye_done = true;
    uint8_t alert[2] = {1, 0}; /* warning, close_notify */
    union {
        char buf[CMSG_SPACE(sizeof(uint8_t))];
        struct cmsghdr align;
    } cm;
    memset(&cm, 0, sizeof(cm));
    struct iovec iov = {.iov_base = alert, .iov_len = sizeof(alert)};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1,
                       .msg_control = cm.buf, .msg_controllen = sizeof(cm.buf)};
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_TLS;
    c->cmsg_type = TLS_SET_RECORD_TYPE;
    c->cmsg_len = CMSG_LEN(sizeof(uint8_t));
    *CMSG_DATA(c) = TLS_CT_ALERT;
    if (sendmsg(s->fd, &m, MSG_DONTWAIT | MSG_NOSIGNAL) != (ssize_t)sizeof(alert))
        log_debug("kernel TLS: close_notify not sent: %s", strerror(errno));
}

/* The kernel's recv said EIO: the next record is not application data.
 * Reads it with its type: a close_notify is the end of the stream; any
 * other alert, a key update (this kernel interface takes no new receive
 * key) or anything else fails the stream with a reason. */
static int ktls_control_record(struct stream *s)
{
    struct stream_tls *t = s->tls;
    uint8_t buf[256];
    union {
        char buf[CMSG_SPACE(sizeof(uint8_t))];
        struct cmsghdr align;
    } cm;
    struct iovec iov = {.iov_base = buf, .iov_len = sizeof(buf)};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1,
                       .msg_control = cm.buf, .msg_controllen = sizeof(cm.buf)};
    ssize_t n = recvmsg(s->fd, &m, MSG_DONTWAIT);
    if (n < 0) {
        snprintf(t->errbuf, sizeof(t->errbuf), "kernel TLS: %s",
                 strerror(errno));
        t->err = t->errbuf;
        return -EPROTO;
    }
    if (n == 0)
        return 0;
    unsigned type = TLS_CT_APPLICATION_DATA;
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    if (c && c->cmsg_level == SOL_TLS && c->cmsg_type == TLS_GET_RECORD_TYPE)
        type = *CMSG_DATA(c);
    if (type == TLS_CT_ALERT && n >= 2 && buf[1] == 0) {
        t->eof_seen = true;
        return 0; /* close_notify */
    }
    if (type == TLS_CT_ALERT && n >= 2)
        snprintf(t->errbuf, sizeof(t->errbuf), "the peer sent TLS alert %u",
                 buf[1]);
    else if (type == TLS_CT_HANDSHAKE && buf[0] == TLS_HS_KEY_UPDATE)
        snprintf(t->errbuf, sizeof(t->errbuf), "the peer sent a TLS 1.3 "
                 "KeyUpdate: the kernel's TLS cannot take a new receive key, "
                 "closing");
    else
        snprintf(t->errbuf, sizeof(t->errbuf), "kernel TLS: unexpected record "
                 "of type %u from the peer", type);
    t->err = t->errbuf;
    return -EPROTO;
}

/* ---- records of our own (tls-record.h) ----
 *
 * After the handshake of a TLS 1.3 session with an AEAD cipher, sealing
 * and opening application data is done here, with GnuTLS's traffic keys:
 * a record is sealed straight from the queued iovecs into tls->out (up to
 * 16 KiB of replies, headers and payloads together, per record, with no
 * copy through GnuTLS's buffers), and opened straight from tls->in into
 * the owner's target.  GnuTLS keeps everything else.  Whenever GnuTLS is
 * to work on a direction (a record that is not application data, a
 * KeyUpdate or close_notify of ours, kernel TLS taking over), that
 * direction's sequence number is handed back first (tls_rec_release) and
 * taken again afterwards with whatever keys GnuTLS then holds
 * (tls_rec_take), so the two never disagree on the wire.
 *
 * KeyUpdate: a peer's is opened by GnuTLS (it is not application data),
 * which installs the peer's new key; when it asks for ours too (the
 * session's handshake hook sees request_update = 1), ours is sent by
 * gnutls_session_key_update before the next record we seal, as RFC 8446
 * 4.6.3 asks; ours is also updated every TLS_REC_KEY_LIMIT records.
 */

/* The handshake hook: the peer's record size limits (ClientHello) and
 * KeyUpdates that ask for ours. */
static int own_ext_cb(void *ctx, unsigned tls_id, const unsigned char *data,
                      unsigned size)
{
    struct stream_tls *t = ctx;
    if (tls_id == 28 && size == 2) {       /* record_size_limit, RFC 8449 */
        size_t lim = (size_t)data[0] << 8 | data[1];
        /* TLS 1.3: the limit counts the content type byte */
        t->plain_max = lim >= 2 ? MIN(t->plain_max, lim - 1) : 0;
    } else if (tls_id == 1 && size == 1) { /* max_fragment_length */
        t->plain_max = data[0] >= 1 && data[0] <= 4
                           ? MIN(t->plain_max, (size_t)1 << (8 + data[0]))
                           : 0;
    }
    return 0;
}

static int own_hook(gnutls_session_t sess, unsigned htype, unsigned when,
                    unsigned incoming, const gnutls_datum_t *msg)
{
    struct stream *s = gnutls_transport_get_ptr(sess);
    struct stream_tls *t = s->tls;
    (void)when;
    if (!incoming || !msg)
        return 0;
    if (htype == GNUTLS_HANDSHAKE_CLIENT_HELLO)
        (void)gnutls_ext_raw_parse(t, own_ext_cb, msg,
                                   GNUTLS_EXT_RAW_FLAG_TLS_CLIENT_HELLO);
    else if (htype == GNUTLS_HANDSHAKE_KEY_UPDATE && msg->size >= 1 &&
             msg->data[msg->size - 1] == 1)
        t->ku_wanted = true;               /* update_requested */
    return 0;
}

/* Sending: ours unless the kernel has it (or is about to) or the session
 * is ending. */
static bool own_tx_usable(const struct stream_tls *t)
{
    return t->rec_ok && t->phase == TLS_ON && !t->ktls_tx &&
           !t->ktls_tx_wanted && !t->bye_done;
}

/* Receiving: ours unless the kernel has it (or is about to); taken (again)
 * only where GnuTLS holds nothing received. */
static bool own_rx_usable(struct stream *s)
{
    struct stream_tls *t = s->tls;
    if (!t->rec_ok || t->phase != TLS_ON || t->ktls_rx || t->ktls_rx_wanted)
        return false;
    if (t->rd.active)
        return true;
    if (gnutls_record_check_pending(t->sess) > 0 || t->g_hdr_have > 0)
        return false;           /* GnuTLS first reads what it began */
    int r = tls_rec_take(&t->rd, t->sess, true);
    if (r < 0) {
        log_debug("TLS: receiving stays with GnuTLS's record layer: %s",
                  gnutls_strerror(r));
        t->rec_ok = false;
        return false;
    }
    return true;
}

enum room { ROOM_OK, ROOM_BUSY, ROOM_NOMEM };

/* Makes room for need more bytes at the end of out.  ROOM_BUSY: not now,
 * a send in flight keeps the buffer from moving. */
static enum room out_room(struct stream_tls *t, size_t need)
{
    if (t->out_cap - t->out_end >= need)
        return ROOM_OK;
    if (t->out_sending)
        return ROOM_BUSY;
    if (t->out_start > 0) {
        memmove(t->out, t->out + t->out_start, t->out_end - t->out_start);
        t->out_end -= t->out_start;
        t->out_start = 0;
        if (t->out_cap - t->out_end >= need)
            return ROOM_OK;
    }
    size_t cap = MAX(t->out_cap * 2, t->out_end + need);
    uint8_t *n = realloc(t->out, cap);
    if (!n)
        return ROOM_NOMEM;
    t->out = n;
    t->out_cap = cap;
    return ROOM_OK;
}

enum ku { KU_DONE, KU_LATER, KU_FAILED };

/* Our KeyUpdate, when the peer asked for it or our key sealed enough:
 * GnuTLS sends it (at our sequence number) and moves to the new key,
 * which we take.  KU_DONE also when none is due; KU_LATER: no room in
 * out now; KU_FAILED: tls_fail done. */
static enum ku own_key_update(struct stream *s)
{
    struct stream_tls *t = s->tls;
    if (!t->ku_wanted && t->wr.seq < TLS_REC_KEY_LIMIT)
        return KU_DONE;
    enum room room = out_room(t, 256); /* the KeyUpdate record: 27 bytes */
    if (room == ROOM_BUSY)
        return KU_LATER;
    if (room == ROOM_NOMEM) {
        tls_fail(s, GNUTLS_E_MEMORY_ERROR);
        return KU_FAILED;
    }
    int r = tls_rec_release(&t->wr, t->sess);
    if (r >= 0) {
        do
            r = gnutls_session_key_update(t->sess, 0);
        while (r == GNUTLS_E_INTERRUPTED);
    }
    if (r >= 0)
        r = tls_rec_take(&t->wr, t->sess, false);
    if (r < 0) {
        tls_fail(s, r);
        return KU_FAILED;
    }
    t->ku_wanted = false;
    log_debug("TLS: KeyUpdate sent, sending under a new key");
    return KU_DONE;
}

/* Seals queued items into records of our own until the queue is empty or
 * enough ciphertext waits: each record takes up to plain_max bytes of
 * whatever is queued (many small replies share one, a large payload
 * fills records from its buffer), sealed straight into out.  false:
 * failed (tls_fail done). */
static bool tls_seal_own(struct stream *s)
{
    struct stream_tls *t = s->tls;
    if (!t->wr.active) {
        int r = tls_rec_take(&t->wr, t->sess, false);
        if (r < 0) {
            tls_fail(s, r);
            return false;
        }
    }
    size_t sealed = 0;
    while (s->sq_head && sealed < TLS_OUT_HIGH &&
           t->out_end - t->out_start < TLS_OUT_HIGH) {
        enum ku k = own_key_update(s);
        if (k != KU_DONE)
            return k == KU_LATER;  /* later: once the send in flight is done */
        enum room room = out_room(t, TLS_REC_WIRE_MAX);
        if (room == ROOM_NOMEM) {
            tls_fail(s, GNUTLS_E_MEMORY_ERROR);
            return false;
        }
        if (room == ROOM_BUSY)
            break;                 /* once the send in flight is done */
        struct iovec iov[TLS_REC_IOV - 1];
        int n = 0;
        size_t len = 0, skip = s->sq_off;
        for (struct stream_item *si = s->sq_head;
             si && n < TLS_REC_IOV - 1 && len < t->plain_max; si = si->next) {
            for (int i = 0; i < si->niov && n < TLS_REC_IOV - 1 &&
                            len < t->plain_max; i++) {
                size_t l = si->iov[i].iov_len;
                if (skip >= l) {
                    skip -= l;
                    continue;
                }
                iov[n].iov_base = (uint8_t *)si->iov[i].iov_base + skip;
                iov[n].iov_len = MIN(l - skip, t->plain_max - len);
                len += iov[n].iov_len;
                skip = 0;
                n++;
            }
        }
        if (len == 0) {            /* items of zero bytes */
            struct stream_item *si = s->sq_head;
            s->sq_head = si->next;
            if (!s->sq_head)
                s->sq_tail = NULL;
            s->sq_off = 0;
            si->done(si);
            continue;
        }
        long w = tls_rec_seal(&t->wr, iov, n, len, t->out + t->out_end);
        if (w < 0) {
            tls_fail(s, (int)w);
            return false;
        }
        t->out_end += (size_t)w;
        sealed += len;
        sq_advance(s, len);
    }
    return true;
}

/* Opens the next records at in_start into dst (room bytes).  OWN_DATA:
 * *n > 0 bytes delivered; OWN_MORE: no whole record buffered; OWN_GNUTLS:
 * the next record is for GnuTLS (pull_left set to it, the direction
 * handed back); OWN_ERR: *err. */
enum own_res { OWN_DATA, OWN_MORE, OWN_GNUTLS, OWN_ERR };

static enum own_res own_open(struct stream *s, uint8_t *dst, size_t room,
                             size_t *n, int *err)
{
    struct stream_tls *t = s->tls;
    for (;;) {
        size_t avail = t->in_end - t->in_start;
        const uint8_t *p = t->in + t->in_start;
        size_t wire = tls_rec_wire_len(p, avail);
        if (wire == 0)
            return OWN_MORE;
        bool openable = tls_rec_openable(p, wire);
        if (openable && avail < wire)
            return OWN_MORE;
        uint8_t type = 0;
        size_t plen = 0;
        bool direct = false;
        if (openable) {
            /* straight into dst when the whole inner plaintext fits */
            direct = room >= wire - TLS_REC_HDR - TLS_REC_TAG;
            int r = tls_rec_open(&t->rd, p, wire, direct ? dst : t->scratch,
                                 &plen, &type);
            if (r < 0) {
                *err = r;
                return OWN_ERR;
            }
        }
        if (!openable || type != TLS_CT_APPLICATION_DATA) {
            /* an alert, a KeyUpdate, or something GnuTLS must judge: it
             * reads this record (at its sequence number) and no further */
            int r = tls_rec_release(&t->rd, t->sess);
            if (r >= 0)
                r = tls_rec_release(&t->wr, t->sess);
            if (r < 0) {
                *err = r;
                return OWN_ERR;
            }
            t->pull_limited = true;
            t->pull_left = MIN(wire, avail);
            return OWN_GNUTLS;
        }
        t->in_start += wire;
        if (t->in_start == t->in_end)
            t->in_start = t->in_end = 0;
        if (plen == 0)
            continue;              /* an empty record */
        if (direct) {
            *n = plen;
            return OWN_DATA;
        }
        *n = MIN(room, plen);
        memcpy(dst, t->scratch, *n);
        t->sc_off = *n;
        t->sc_len = plen - *n;
        return OWN_DATA;
    }
}

static size_t tls_plain_limit(const struct stream *s)
{
    return s->tls->ktls_tx ? SIZE_MAX : s->tls->plain_left;
}

static void tls_plain_sent(struct stream *s, size_t n)
{
    if (s->tls->ktls_tx)
        return;
    assert(n <= s->tls->plain_left);
    s->tls->plain_left -= n;
}

static bool tls_uncork(struct stream *s)
{
    for (;;) {
        int r = gnutls_record_uncork(s->tls->sess, 0);
        if (r >= 0)
            return true;
        if (r != GNUTLS_E_INTERRUPTED) {
            tls_fail(s, r); /* push never says EAGAIN while no send is from out */
            return false;
        }
    }
}

/* Seals queued items into records until the queue is empty or enough
 * ciphertext waits.  Small pieces (reply headers, short payloads) are
 * corked so that they share records; a large payload is sealed straight
 * from its buffer, one full record at a time (corking it would copy it
 * once more).  false: GnuTLS failed (tls_fail done). */
static bool tls_seal(struct stream *s)
{
    struct stream_tls *t = s->tls;
    bool corked = false;
    size_t sealed = 0;
    if (t->ku_wanted && s->sq_head) {
        /* The peer asked for our KeyUpdate.  GnuTLS would send it before
         * its next record, but gnutls_record_cork forgets that it owes
         * one (GnuTLS 3.7): send it here, before the next record. */
        int r;
        do
            r = gnutls_session_key_update(t->sess, 0);
        while (r == GNUTLS_E_INTERRUPTED);
        if (r < 0) {
            tls_fail(s, r);
            return false;
        }
        t->ku_wanted = false;
        log_debug("TLS: KeyUpdate sent, sending under a new key");
    }
    while (s->sq_head && sealed < TLS_OUT_HIGH &&
           t->out_end - t->out_start < TLS_OUT_HIGH) {
        struct stream_item *si = s->sq_head;
        size_t skip = s->sq_off;
        int i = 0;
        while (i < si->niov && skip >= si->iov[i].iov_len)
            skip -= si->iov[i++].iov_len;
        if (i == si->niov) {           /* an item of zero bytes */
            s->sq_head = si->next;
            if (!s->sq_head)
                s->sq_tail = NULL;
            s->sq_off = 0;
            si->done(si);
            continue;
        }
        size_t len = si->iov[i].iov_len - skip;
        if (len < TLS_RECORD_PLAIN && !corked) {
            gnutls_record_cork(t->sess);
            corked = true;
        } else if (len >= TLS_RECORD_PLAIN && corked) {
            corked = false;
            if (!tls_uncork(s))
                return false;
        }
        len = MIN(len, corked ? TLS_SEAL_CHUNK : TLS_RECORD_PLAIN);
        ssize_t r = gnutls_record_send(t->sess,
                                       (uint8_t *)si->iov[i].iov_base + skip,
                                       len);
        if (r == GNUTLS_E_INTERRUPTED || r == GNUTLS_E_AGAIN)
            break;
        if (r < 0) {
            tls_fail(s, (int)r);
            return false;
        }
        sealed += (size_t)r;
        sq_advance(s, (size_t)r);
    }
    return !corked || tls_uncork(s);
}

static void tls_start_send(struct stream *s)
{
    struct stream_tls *t = s->tls;
    if (t->phase == TLS_ON && t->ktls_tx_wanted && t->out_end == t->out_start) {
        /* every record GnuTLS sealed went out: the kernel goes on from
         * the next sequence number */
        t->ktls_tx_wanted = false;
        (void)tls_rec_release(&t->wr, t->sess); /* GnuTLS's seq is right */
        if (s->ops->tls_offload(s, false) == 0) {
            t->ktls_tx = true;
            stream_start_send(s); /* the queue, in plaintext */
            return;
        }
        t->ktls_rx_wanted = false;
    }
    if (t->phase == TLS_ON) {
        if (!(own_tx_usable(t) ? tls_seal_own(s) : tls_seal(s))) {
            s->ops->send_failed(s, -EPROTO);
            return;
        }
        if (!s->sq_head && t->bye_wanted && !t->bye_done) {
            t->bye_done = true;
            (void)tls_rec_release(&t->wr, t->sess);
            (void)gnutls_bye(t->sess, GNUTLS_SHUT_WR); /* pushes the alert */
        }
    }
    if (t->out_end == t->out_start)
        return;
    struct io_uring_sqe *sqe = loop_get_sqe(s->loop, &s->send_op);
    io_uring_prep_send(sqe, s->fd, t->out + t->out_start,
                       t->out_end - t->out_start, MSG_NOSIGNAL);
    s->send_pending = true;
    t->out_sending = true;
}

/* true: the send was of ciphertext and is handled here. */
static bool tls_send_done(struct stream *s, int res)
{
    struct stream_tls *t = s->tls;
    if (!t->out_sending)
        return false;
    t->out_sending = false;
    if (res == -EINTR || res == -EAGAIN) {
        s->ops->kick(s);
        return true;
    }
    if (res <= 0) {
        s->ops->send_failed(s, res);
        s->ops->kick(s);
        return true;
    }
    assert((size_t)res <= t->out_end - t->out_start);
    t->out_start += (size_t)res;
    if (t->out_start == t->out_end)
        t->out_start = t->out_end = 0;
    s->ops->kick(s);
    return true;
}

static void tls_start_raw_recv(struct stream *s)
{
    struct stream_tls *t = s->tls;
    if (s->recv_pending || t->phase == TLS_FAILED)
        return;
    if (t->in_start > 0 && TLS_IN_SIZE - t->in_end < TLS_IN_MIN_TAIL) {
        memmove(t->in, t->in + t->in_start, t->in_end - t->in_start);
        t->in_end -= t->in_start;
        t->in_start = 0;
    }
    struct io_uring_sqe *sqe = loop_get_sqe(s->loop, &s->recv_op);
    io_uring_prep_recv(sqe, s->fd, t->in + t->in_end, TLS_IN_SIZE - t->in_end,
                       0);
    s->recv_pending = true;
}

/* The recv the owner asked for ends with res (plaintext bytes, 0 = end of
 * stream, -errno). */
static void tls_finish_recv(struct stream *s, int res)
{
    s->recv_pending = false;
    if (res > 0 && !s->recv_direct) {
        assert((size_t)res <= s->rcap - s->rend);
        s->rend += (size_t)res;
    }
    s->ops->received(s, res, s->recv_direct);
    s->ops->kick(s);
}

/* Decrypts buffered records into the owner's target; with none whole,
 * recvs more ciphertext. */
static void tls_decrypt(struct stream *s)
{
    struct stream_tls *t = s->tls;
    if (t->eof_seen) {
        tls_finish_recv(s, 0);
        return;
    }
    size_t got = 0;
    int err = 0;
    size_t want = MIN(t->dst_len, (size_t)INT32_MAX);
    while (got < want) {
        if (t->sc_len > 0) {
            /* the rest of a record opened into scratch */
            size_t n = MIN(t->sc_len, want - got);
            memcpy(t->dst + got, t->scratch + t->sc_off, n);
            t->sc_off += n;
            t->sc_len -= n;
            got += n;
            continue;
        }
        if (own_rx_usable(s)) {
            size_t n = 0;
            enum own_res o = own_open(s, t->dst + got, want - got, &n, &err);
            if (o == OWN_DATA) {
                got += n;
                continue;
            }
            if (o == OWN_MORE || o == OWN_ERR)
                break;
            /* OWN_GNUTLS: GnuTLS reads the next record */
        }
        ssize_t r = gnutls_record_recv(t->sess, t->dst + got, want - got);
        bool limited = t->pull_limited;
        t->pull_limited = false;
        if (r > 0) {
            got += (size_t)r;
            continue;
        }
        if (r == 0) {
            t->eof_seen = true;
            break;
        }
        if (r == GNUTLS_E_AGAIN && limited && t->pull_left == 0)
            continue; /* that record (a KeyUpdate) is done: on to the next */
        if (r == GNUTLS_E_AGAIN)
            break;
        if (r == GNUTLS_E_INTERRUPTED || !gnutls_error_is_fatal((int)r))
            continue; /* a warning alert, a post-handshake message */
        err = (int)r;
        break;
    }
    if (got > 0) {
        tls_finish_recv(s, (int)got); /* an error or end shows up next time */
        return;
    }
    if (t->eof_seen) {
        tls_finish_recv(s, 0);
        return;
    }
    if (err == GNUTLS_E_PREMATURE_TERMINATION) {
        tls_finish_recv(s, 0); /* the peer closed without close_notify */
        return;
    }
    if (err) {
        tls_fail(s, err);
        tls_finish_recv(s, -EPROTO);
        return;
    }
    if (t->in_eof) {
        tls_finish_recv(s, 0); /* a partial record, then end of stream */
        return;
    }
    s->recv_pending = false;
    tls_start_raw_recv(s);
    if (stream_tls_backlog(s))
        s->ops->kick(s); /* GnuTLS answered something (a key update) */
}

static void tls_hook_fn(struct loop_hook *h)
{
    struct stream *s = container_of(h, struct stream, tls_hook);
    tls_decrypt(s);
}

/* false: the kernel receives, the caller starts a plain recv. */
static bool tls_start_recv(struct stream *s, uint8_t *dst, size_t len,
                           bool direct)
{
    struct stream_tls *t = s->tls;
    if (t->ktls_rx)
        return false;
    if (t->ktls_rx_wanted && t->ktls_tx && t->phase == TLS_ON &&
        t->in_end == t->in_start && !t->in_eof && !t->eof_seen &&
        t->sc_len == 0 && gnutls_record_check_pending(t->sess) == 0) {
        t->ktls_rx_wanted = false;
        (void)tls_rec_release(&t->rd, t->sess); /* GnuTLS's seq is right */
        if (s->ops->tls_offload(s, true) == 0) {
            t->ktls_rx = true;
            return false;
        }
    }
    t->dst = dst;
    t->dst_len = len;
    s->recv_direct = direct;
    s->recv_pending = true;
    if (t->in_end > t->in_start || t->in_eof || t->eof_seen || t->sc_len > 0 ||
        gnutls_record_check_pending(t->sess) > 0) {
        s->tls_hook.fn = tls_hook_fn;
        loop_defer(s->loop, &s->tls_hook);
        return true;
    }
    s->recv_pending = false;
    tls_start_raw_recv(s);
    return true;
}

/* Runs the handshake as far as the buffered records let it. */
static void tls_handshake_step(struct stream *s)
{
    struct stream_tls *t = s->tls;
    for (;;) {
        int r = gnutls_handshake(t->sess);
        if (r == 0) {
            t->phase = TLS_ON;
            t->rec_ok = t->rec_ok && t->plain_max > 0 &&
                        tls_rec_possible(t->sess);
            s->ops->tls_done(s, 0);
            return;
        }
        if (r == GNUTLS_E_AGAIN)
            return; /* the owner's next stream_start_recv brings more */
        if (r == GNUTLS_E_INTERRUPTED || !gnutls_error_is_fatal(r))
            continue;
        tls_fail(s, r);
        s->ops->tls_done(s, -EPROTO);
        return;
    }
}

/* false: the kernel received plaintext (*res may turn an EIO into the
 * end of the stream or -EPROTO): the caller goes on as without TLS. */
static bool tls_recv_done(struct stream *s, int *resp)
{
    struct stream_tls *t = s->tls;
    int res = *resp;
    if (t->ktls_rx) {
        if (res == -EIO) {
            *resp = ktls_control_record(s);
        } else if (res == -EBADMSG) {
            t->err = "a TLS record failed authentication (kernel TLS)";
            *resp = -EPROTO;
        }
        return false;
    }
    if (res > 0) {
        assert((size_t)res <= TLS_IN_SIZE - t->in_end);
        t->in_end += (size_t)res;
    } else if (res == 0) {
        t->in_eof = true;
    }
    if (t->phase == TLS_HANDSHAKE) {
        if (res <= 0)
            s->ops->received(s, res, false);
        else
            tls_handshake_step(s);
        s->ops->kick(s);
        return true;
    }
    if (t->phase == TLS_FAILED) {
        s->ops->received(s, res < 0 ? res : -EPROTO, s->recv_direct);
        s->ops->kick(s);
        return true;
    }
    if (res < 0) {
        s->ops->received(s, res, s->recv_direct);
        s->ops->kick(s);
        return true;
    }
    s->recv_pending = true; /* the owner's recv goes on: decrypt into it */
    tls_decrypt(s);
    return true;
}

static void tls_fini(struct stream *s)
{
    struct stream_tls *t = s->tls;
    if (!t)
        return;
    loop_undefer(s->loop, &s->tls_hook);
    tls_rec_fini(&t->wr);
    tls_rec_fini(&t->rd);
    gnutls_deinit(t->sess);
    free(t->in);
    free(t->out);
    free(t->scratch);
    free(t);
    s->tls = NULL;
}

#else /* !STRATA_HAVE_TLS: s->tls stays NULL, none of these runs */

long stream_tls_start(struct stream *s, void *session)
{
    (void)s;
    (void)session;
    return -ENOTSUP;
}
void *stream_tls_session(const struct stream *s) { (void)s; return NULL; }
const char *stream_tls_error(const struct stream *s) { (void)s; return NULL; }
bool stream_tls_established(const struct stream *s) { (void)s; return false; }
size_t stream_tls_backlog(const struct stream *s) { (void)s; return 0; }
void stream_tls_bye(struct stream *s) { (void)s; }
void stream_tls_offload(struct stream *s, bool rx) { (void)s; (void)rx; }
unsigned stream_tls_offloaded(const struct stream *s) { (void)s; return 0; }
static void tls_fini(struct stream *s) { (void)s; }
static size_t tls_plain_limit(const struct stream *s) { (void)s; return SIZE_MAX; }
static void tls_plain_sent(struct stream *s, size_t n) { (void)s; (void)n; }
static void tls_start_send(struct stream *s) { (void)s; }
static bool tls_send_done(struct stream *s, int res) { (void)s; (void)res; return false; }
static bool tls_established(const struct stream *s) { (void)s; return false; }
static void tls_start_raw_recv(struct stream *s) { (void)s; }
static bool tls_start_recv(struct stream *s, uint8_t *dst, size_t len,
                           bool direct)
{
    (void)s; (void)dst; (void)len; (void)direct;
    return false;
}
static bool tls_recv_done(struct stream *s, int *res)
{
    (void)s; (void)res;
    return false;
}
static void tls_idle_send(struct stream *s) { (void)s; }
#endif
