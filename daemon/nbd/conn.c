/* strata — NBD connection: socket input/output, lifetime (see conn.h). */
#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "conn.h"
#include "log.h"
#include "tls.h"
#include "util.h"

#define CONN_RBUF_SIZE (128u << 10)

const char *conn_state_name(enum conn_state s)
{
    static const char *const names[] = {
#define X(st) #st,
        CONN_STATES(X)
#undef X
    };
    return (unsigned)s < sizeof(names) / sizeof(names[0]) ? names[s] : "?";
}

static void kick_fn(struct loop_hook *h);
static void drain_done(struct loop_op *op, int res, uint32_t flags);
static void linger_cancel_done(struct loop_op *op, int res, uint32_t flags);
static void stream_received(struct stream *s, int res, bool direct);
static void stream_send_failed(struct stream *s, int res);
static void stream_kick(struct stream *s);
static void stream_tls_done(struct stream *s, int res);
static int stream_tls_to_kernel(struct stream *s, bool rx);

static const struct stream_ops conn_stream_ops = {
    .received = stream_received,
    .send_failed = stream_send_failed,
    .kick = stream_kick,
    .tls_done = stream_tls_done,
    .tls_offload = stream_tls_to_kernel,
};

struct conn *conn_new(struct server *srv, int fd, bool is_tcp)
{
    struct conn *c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    c->rbuf = malloc(CONN_RBUF_SIZE);
    if (!c->rbuf) {
        free(c);
        return NULL;
    }
    c->srv = srv;
    c->loop = srv->loop;
    c->budget = &srv->budget;
    c->id = ++srv->next_conn_id;
    c->fd = fd;
    c->is_tcp = is_tcp;
    stream_init(&c->st, srv->loop, fd, c->rbuf, CONN_RBUF_SIZE,
                &conn_stream_ops, c);
    c->kick.fn = kick_fn;
    c->drain_op.done = drain_done;
    c->linger_cancel_op.done = linger_cancel_done;
    c->state = CONN_HS_FLAGS;
    c->deadline_ns = loop_now_ns() +
                     (uint64_t)srv->cfg.handshake_timeout_s * 1000000000u;
    nbd_handshake_start(c);
    conn_kick(c);
    return c;
}

void conn_kick(struct conn *c)
{
    loop_defer(c->loop, &c->kick);
}

static void stream_kick(struct stream *s)
{
    conn_kick(s->owner);
}

static void stream_tls_done(struct stream *s, int res)
{
    struct conn *c = s->owner;
    if (c->state == CONN_TLS_HANDSHAKE)
        nbd_handshake_tls_done(c, res);
}

/* Which path a connection's records take, for the log. */
static const char *tls_path_name(unsigned offloaded)
{
    return offloaded == 3 ? "kTLS tx+rx" : offloaded == 1 ? "kTLS tx"
         : offloaded == 2 ? "kTLS rx" : "GnuTLS";
}

static int stream_tls_to_kernel(struct stream *s, bool rx)
{
    struct conn *c = s->owner;
    char why[160];
    int r = tls_session_ktls_install(stream_tls_session(s), c->fd, rx, why,
                                     sizeof(why));
    unsigned now = stream_tls_offloaded(s) | (r == 0 ? (rx ? 2u : 1u) : 0u);
    if (r == 0)
        log_debug("conn %llu: TLS path %s", (unsigned long long)c->id,
                  tls_path_name(now));
    else
        log_debug("conn %llu: TLS path %s (the kernel's TLS refused the %s "
                  "side: %s)", (unsigned long long)c->id, tls_path_name(now),
                  rx ? "receive" : "send", why);
    return r;
}

/* ---- output ---- */

void conn_send(struct conn *c, struct stream_item *si)
{
    stream_send(&c->st, si); /* discards it once the connection is dead */
}

int conn_send_copy(struct conn *c, const void *buf, size_t len)
{
    return stream_send_copy(&c->st, buf, len);
}

static void stream_send_failed(struct stream *s, int res)
{
    struct conn *c = s->owner;
    if ((res == -EPIPE || res == -ECONNRESET) && !s->tls &&
        (c->state == CONN_TRANSMIT || c->state == CONN_DRAINING)) {
        /* The client stopped reading (it closed, or shut its side down)
         * but what it sent before is still to be taken: its writes up to
         * its NBD_CMD_DISC are applied, as if it had waited for the
         * replies.  Replies are dropped from now on; the connection ends
         * at its DISC or at the end of its input.  How much input came in
         * before the first reply must not decide that. */
        if (!s->dead)
            log_debug("conn %llu: the client reads no more replies (%s): "
                      "taking its input to the end",
                      (unsigned long long)c->id, strerror(-res));
        s->dead = true;
        stream_drop_queue(s);
        return;
    }
    conn_abort(c, res == 0 ? "send made no progress" : strerror(-res));
}

/* ---- input ---- */

static bool wants_input(const struct conn *c)
{
    if (c->move_to)
        return false; /* moving: what arrives is read on the new loop */
    switch (c->state) {
    case CONN_HS_FLAGS:
    case CONN_HS_OPTION:
        /* a client that sends options without reading the replies */
        return c->st.sq_bytes <= CONN_SEND_BACKLOG_MAX;
    case CONN_TLS_HANDSHAKE:
        return true;
    case CONN_TRANSMIT:
    case CONN_DRAINING:
        if (c->payload_req || c->discard_left)
            return true;
        return c->inflight < c->srv->cfg.max_inflight &&
               c->buffered < c->srv->cfg.max_buffered;
    case CONN_LINGER:
        return true;
    case CONN_CLOSING:
    case CONN_DEAD:
        return false;
    }
    return false;
}

static void start_recv(struct conn *c)
{
    if (c->st.recv_pending || !wants_input(c))
        return;
    /* Transmission without TLS: one multishot receive for the whole
     * phase instead of a recv (and a poll armed on the socket) per
     * request.  The handshake and TLS streams receive one recv at a
     * time. */
    if (!c->ms_tried && c->state == CONN_TRANSMIT && !c->st.tls) {
        c->ms_tried = true;
        if (stream_use_multishot(&c->st))
            log_debug("conn %llu: multishot receive",
                      (unsigned long long)c->id);
    }
    if (c->payload_req && stream_unparsed(&c->st) == 0) {
        /* straight into the request's buffer: no copy */
        struct nbd_req *r = c->payload_req;
        stream_start_recv_into(&c->st, (uint8_t *)r->buf + c->payload_got,
                               (size_t)(r->hdr.length - c->payload_got));
        return;
    }
    /* false: full of unparsed data, parsing must catch up first */
    (void)stream_start_recv(&c->st);
}

static void stream_received(struct stream *s, int res, bool direct)
{
    struct conn *c = s->owner;
    if (c->state == CONN_DEAD || c->state == CONN_CLOSING)
        return;
    if (c->state == CONN_LINGER) {
        if (res <= 0) {
            c->state = CONN_DEAD; /* the client closed (or reset): done */
            shutdown(c->fd, SHUT_RDWR);
            if (c->drain_timer_pending && !c->linger_cancel_pending) {
                struct io_uring_sqe *sqe =
                    loop_get_sqe(c->loop, &c->linger_cancel_op);
                io_uring_prep_timeout_remove(
                    sqe, (uint64_t)(uintptr_t)&c->drain_op, 0);
                c->linger_cancel_pending = true;
            }
        }
        return; /* what it sent is dropped by process_input */
    }
    if (res <= 0) {
        if (res == 0 && c->state == CONN_TRANSMIT && !c->payload_req &&
            stream_unparsed(s) == 0 && !c->discard_left)
            log_debug("conn %llu: client closed the connection",
                      (unsigned long long)c->id);
        else if (res == 0)
            log_info("conn %llu: client went away in state %s%s",
                     (unsigned long long)c->id, conn_state_name(c->state),
                     c->payload_req ? " (in the middle of a write payload)" : "");
        if (res < 0 && stream_tls_error(s))
            log_info("conn %llu: TLS: %s", (unsigned long long)c->id,
                     stream_tls_error(s));
        conn_abort(c, res == 0 ? "end of stream" : strerror(-res));
        return;
    }
    if (direct) {
        assert(c->payload_req);
        c->payload_got += (uint64_t)res;
        if (c->payload_got == c->payload_req->hdr.length)
            nbd_payload_complete(c);
    }
}

/* The connection has just entered transmission on the main loop: where it
 * is served from now on.  Over TLS it stays (the session's record layer
 * is not moved between rings). */
static void choose_loop(struct conn *c)
{
    struct worker *w = c->st.tls ? NULL : server_pick_worker(c->srv);
    if (w) {
        c->move_to = w;
        return;
    }
    c->counted_local = true;
    c->srv->local_transmit++;
}

static void process_input(struct conn *c)
{
    for (;;) {
        if (c->state == CONN_TRANSMIT && !c->worker && !c->counted_local) {
            if (!c->move_to)
                choose_loop(c);
            if (c->move_to)
                return; /* its requests are parsed on its new loop */
        }
        bool progress;
        switch (c->state) {
        case CONN_HS_FLAGS:
        case CONN_HS_OPTION:
            if (c->st.sq_bytes > CONN_SEND_BACKLOG_MAX)
                return; /* resumed by send_done once replies drain */
            progress = nbd_handshake_input(c);
            break;
        case CONN_TRANSMIT:
        case CONN_DRAINING:
            progress = nbd_transmit_input(c);
            break;
        case CONN_LINGER:
            c->st.rstart = c->st.rend = 0; /* nobody answers it any more */
            return;
        default:
            return;
        }
        if (!progress)
            return;
    }
}

/* ---- lifetime ---- */

static void conn_free(struct conn *c)
{
    assert(c->state == CONN_DEAD);
    assert(!stream_busy(&c->st) && c->running == 0);
    stream_drop_queue(&c->st);
    stream_fini(&c->st);
    free(c->tls_identity);
    if (c->payload_req) {
        nbd_req_release(c->payload_req);
        c->payload_req = NULL;
    }
    if (c->discard_req) {
        nbd_req_release(c->discard_req); /* its payload never came */
        c->discard_req = NULL;
    }
    assert(c->inflight == 0);
    nbd_budget_forget(c);
    nbd_slots_free(c);
    close(c->fd);
    loop_undefer(c->loop, &c->kick);
    if (c->worker) {
        /* the main loop's side of it (export, peer, counts) goes there */
        server_remote_conn_gone(c);
        return;
    }
    if (c->counted_local)
        c->srv->local_transmit--;
    if (c->exp)
        server_export_conn_gone(c->srv, c->exp);
    server_conn_gone(c->srv, c);
    free(c->rbuf);
    free(c);
}

void conn_abort(struct conn *c, const char *why)
{
    if (c->state == CONN_DEAD)
        return;
    log_debug("conn %llu: closing (%s)", (unsigned long long)c->id, why);
    c->state = CONN_DEAD;
    c->st.dead = true;
    /* wakes a pending recv or send with an error or end of stream */
    shutdown(c->fd, SHUT_RDWR);
    conn_kick(c);
}

void conn_close_gracefully(struct conn *c)
{
    if (c->state == CONN_DEAD || c->state == CONN_CLOSING)
        return;
    /* From the handshake too: queued option replies (ABORT's ACK) still
     * go out before the socket closes. */
    /* Only reached with no write payload half-received (DISC is parsed
     * only between requests): a recv into a request's buffer must never
     * lose its buffer under it.  conn_free() releases such a request after
     * the recv returned. */
    assert(!c->payload_req);
    stream_tls_bye(&c->st); /* close_notify after the queued replies */
    c->state = CONN_CLOSING;
    shutdown(c->fd, SHUT_RD);
    conn_kick(c);
}

void conn_drain(struct conn *c)
{
    if (c->state != CONN_TRANSMIT) {
        /* Nothing is at stake in the handshake: drop it now rather than
         * wait for a client that may not be reading its option replies. */
        conn_abort(c, "server shutting down");
        return;
    }
    /* Keep reading: the spec asks to finish in-flight requests and to
     * answer later ones with NBD_ESHUTDOWN.  Closing the read side would
     * make the client's next send fail and lose the replies it waits for. */
    c->state = CONN_DRAINING;
    conn_kick(c);
}

static bool conn_idle(const struct conn *c)
{
    return c->running == 0 && stream_output_idle(&c->st) && !c->payload_req &&
           !c->discard_left;
}

static void drain_done(struct loop_op *op, int res, uint32_t flags)
{
    struct conn *c = container_of(op, struct conn, drain_op);
    (void)res;
    (void)flags;
    c->drain_timer_pending = false;
    if (c->state == CONN_DRAINING && conn_idle(c) &&
        c->requests_seen == c->drain_mark) {
        /* Quiet for DRAIN_QUIET_MS.  Over TLS: close now.  In plaintext:
         * FIN first, and keep reading what the client still sends until
         * it closes.  Closed at once, a client slow to read (a loaded
         * host) that sends one more request fails that send, and libnbd
         * then fails every command in flight with ENOTCONN, also those
         * whose replies (to writes that were done) it has not read yet. */
        c->st.dead = true;
        if (c->st.tls) {
            c->state = CONN_DEAD;
            shutdown(c->fd, SHUT_RDWR);
        } else {
            c->state = CONN_LINGER;
            shutdown(c->fd, SHUT_WR);
            c->drain_ts.tv_sec = DRAIN_LINGER_MS / 1000;
            c->drain_ts.tv_nsec = (DRAIN_LINGER_MS % 1000) * 1000000LL;
            struct io_uring_sqe *sqe = loop_get_sqe(c->loop, &c->drain_op);
            io_uring_prep_timeout(sqe, &c->drain_ts, 0, 0);
            c->drain_timer_pending = true;
        }
    } else if (c->state == CONN_LINGER) {
        c->state = CONN_DEAD; /* the client did not close in time */
        shutdown(c->fd, SHUT_RDWR);
    }
    conn_kick(c);
}

static void linger_cancel_done(struct loop_op *op, int res, uint32_t flags)
{
    struct conn *c = container_of(op, struct conn, linger_cancel_op);
    (void)res;
    (void)flags;
    c->linger_cancel_pending = false;
    conn_kick(c);
}

static void arm_drain_timer(struct conn *c)
{
    if (c->drain_timer_pending)
        return;
    c->drain_ts.tv_sec = 0;
    c->drain_ts.tv_nsec = DRAIN_QUIET_MS * 1000000LL;
    c->drain_mark = c->requests_seen;
    struct io_uring_sqe *sqe = loop_get_sqe(c->loop, &c->drain_op);
    io_uring_prep_timeout(sqe, &c->drain_ts, 0, 0);
    c->drain_timer_pending = true;
}

static void kick_fn(struct loop_hook *h)
{
    struct conn *c = container_of(h, struct conn, kick);
    if (c->move_to && c->state != CONN_TRANSMIT) {
        /* draining or dead before it could move: it ends here */
        c->move_to = NULL;
        c->counted_local = true;
        c->srv->local_transmit++;
    }
    if (c->move_to) {
        /* the reply to its choice of export goes out first; a recv still
         * in flight (armed during the handshake) completes when the
         * client sends its first request */
        stream_start_send(&c->st);
        if (!stream_busy(&c->st))
            server_hand_over(c->srv, c, c->move_to);
        return;
    }
    if (c->state != CONN_DEAD) {
        process_input(c);
        start_recv(c);
        stream_start_send(&c->st);
    }
    if (c->state == CONN_CLOSING && conn_idle(c)) {
        c->state = CONN_DEAD;
        c->st.dead = true;
        shutdown(c->fd, SHUT_RDWR);
    }
    if (c->state == CONN_DRAINING && conn_idle(c))
        arm_drain_timer(c);
    if (c->state == CONN_DEAD && !stream_busy(&c->st) &&
        !c->drain_timer_pending && !c->linger_cancel_pending &&
        c->running == 0)
        conn_free(c);
}
