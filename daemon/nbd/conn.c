/* strata — NBD connection: socket input/output, lifetime (see conn.h). */
#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "conn.h"
#include "log.h"
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

static void recv_done(struct loop_op *op, int res, uint32_t flags);
static void send_done(struct loop_op *op, int res, uint32_t flags);
static void kick_fn(struct loop_hook *h);
static void drain_done(struct loop_op *op, int res, uint32_t flags);

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
    c->id = ++srv->next_conn_id;
    c->fd = fd;
    c->is_tcp = is_tcp;
    c->rcap = CONN_RBUF_SIZE;
    c->recv_op.done = recv_done;
    c->send_op.done = send_done;
    c->kick.fn = kick_fn;
    c->drain_op.done = drain_done;
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

/* ---- output ---- */

void conn_send(struct conn *c, struct send_item *si)
{
    si->next = NULL;
    if (c->state == CONN_DEAD) {
        si->done(si);
        return;
    }
    si->total = 0;
    for (int i = 0; i < si->niov; i++)
        si->total += si->iov[i].iov_len;
    c->sq_bytes += si->total;
    if (c->sq_tail)
        c->sq_tail->next = si;
    else
        c->sq_head = si;
    c->sq_tail = si;
    conn_kick(c);
}

struct copy_item {
    struct send_item si;
    struct iovec iov;
    uint8_t data[];
};

static void copy_item_done(struct send_item *si)
{
    free(si);
}

int conn_send_copy(struct conn *c, const void *buf, size_t len)
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
    conn_send(c, &ci->si);
    return 0;
}

/* Gathers queued items into one sendmsg (up to 64 iovecs). */
static void start_send(struct conn *c)
{
    if (c->send_pending || !c->sq_head || c->state == CONN_DEAD)
        return;
    int k = 0;
    size_t skip = c->sq_off;
    for (struct send_item *si = c->sq_head; si && k < 64; si = si->next) {
        for (int i = 0; i < si->niov && k < 64; i++) {
            size_t len = si->iov[i].iov_len;
            if (skip >= len) {
                skip -= len;
                continue;
            }
            c->siov[k].iov_base = (char *)si->iov[i].iov_base + skip;
            c->siov[k].iov_len = len - skip;
            skip = 0;
            k++;
        }
    }
    assert(k > 0);
    memset(&c->msg, 0, sizeof(c->msg));
    c->msg.msg_iov = c->siov;
    c->msg.msg_iovlen = (size_t)k;
    struct io_uring_sqe *sqe = loop_get_sqe(c->loop, &c->send_op);
    io_uring_prep_sendmsg(sqe, c->fd, &c->msg, MSG_NOSIGNAL);
    c->send_pending = true;
}

static void send_done(struct loop_op *op, int res, uint32_t flags)
{
    struct conn *c = container_of(op, struct conn, send_op);
    (void)flags;
    c->send_pending = false;
    if (res == -EINTR || res == -EAGAIN) {
        conn_kick(c);
        return;
    }
    if (res <= 0) {
        conn_abort(c, res == 0 ? "send made no progress" : strerror(-res));
        return;
    }
    size_t n = (size_t)res;
    c->sq_bytes -= n;
    while (n > 0 && c->sq_head) {
        struct send_item *si = c->sq_head;
        size_t left = si->total - c->sq_off;
        if (n < left) {
            c->sq_off += n;
            break;
        }
        n -= left;
        c->sq_off = 0;
        c->sq_head = si->next;
        if (!c->sq_head)
            c->sq_tail = NULL;
        si->done(si);
    }
    conn_kick(c);
}

static void drop_send_queue(struct conn *c)
{
    assert(!c->send_pending);
    while (c->sq_head) {
        struct send_item *si = c->sq_head;
        c->sq_head = si->next;
        si->done(si);
    }
    c->sq_tail = NULL;
    c->sq_off = 0;
    c->sq_bytes = 0;
}

/* ---- input ---- */

static bool wants_input(const struct conn *c)
{
    switch (c->state) {
    case CONN_HS_FLAGS:
    case CONN_HS_OPTION:
        /* a client that sends options without reading the replies */
        return c->sq_bytes <= CONN_SEND_BACKLOG_MAX;
    case CONN_TRANSMIT:
    case CONN_DRAINING:
        if (c->payload_req || c->discard_left)
            return true;
        return c->inflight < c->srv->cfg.max_inflight &&
               c->buffered < c->srv->cfg.max_buffered;
    case CONN_CLOSING:
    case CONN_DEAD:
        return false;
    }
    return false;
}

static void start_recv(struct conn *c)
{
    if (c->recv_pending || !wants_input(c))
        return;
    void *dst;
    size_t len;
    c->recv_direct = c->payload_req && c->rstart == c->rend;
    if (c->recv_direct) {
        /* straight into the request's buffer: no copy */
        struct nbd_req *r = c->payload_req;
        dst = (uint8_t *)r->buf + c->payload_got;
        len = (size_t)(r->hdr.length - c->payload_got);
    } else {
        if (c->rstart == c->rend) {
            c->rstart = c->rend = 0;
        } else if (c->rend == c->rcap || c->rcap - c->rend < 4096) {
            memmove(c->rbuf, c->rbuf + c->rstart, c->rend - c->rstart);
            c->rend -= c->rstart;
            c->rstart = 0;
        }
        if (c->rend == c->rcap)
            return; /* full of unparsed data: parsing must catch up first */
        dst = c->rbuf + c->rend;
        len = c->rcap - c->rend;
    }
    struct io_uring_sqe *sqe = loop_get_sqe(c->loop, &c->recv_op);
    io_uring_prep_recv(sqe, c->fd, dst, len, 0);
    c->recv_pending = true;
}

static void recv_done(struct loop_op *op, int res, uint32_t flags)
{
    struct conn *c = container_of(op, struct conn, recv_op);
    (void)flags;
    c->recv_pending = false;
    if (c->state == CONN_DEAD || c->state == CONN_CLOSING) {
        conn_kick(c);
        return;
    }
    if (res == -EINTR || res == -EAGAIN) {
        conn_kick(c);
        return;
    }
    if (res <= 0) {
        if (res == 0 && c->state == CONN_TRANSMIT && !c->payload_req &&
            c->rstart == c->rend && !c->discard_left)
            log_debug("conn %llu: client closed the connection",
                      (unsigned long long)c->id);
        else if (res == 0)
            log_info("conn %llu: client went away in state %s%s",
                     (unsigned long long)c->id, conn_state_name(c->state),
                     c->payload_req ? " (in the middle of a write payload)" : "");
        conn_abort(c, res == 0 ? "end of stream" : strerror(-res));
        return;
    }
    if (c->recv_direct) {
        assert(c->payload_req);
        c->payload_got += (uint64_t)res;
        if (c->payload_got == c->payload_req->hdr.length)
            nbd_payload_complete(c);
    } else {
        c->rend += (size_t)res;
    }
    conn_kick(c);
}

static void process_input(struct conn *c)
{
    for (;;) {
        bool progress;
        switch (c->state) {
        case CONN_HS_FLAGS:
        case CONN_HS_OPTION:
            if (c->sq_bytes > CONN_SEND_BACKLOG_MAX)
                return; /* resumed by send_done once replies drain */
            progress = nbd_handshake_input(c);
            break;
        case CONN_TRANSMIT:
        case CONN_DRAINING:
            progress = nbd_transmit_input(c);
            break;
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
    assert(!c->recv_pending && !c->send_pending && c->running == 0);
    drop_send_queue(c);
    if (c->payload_req) {
        nbd_req_release(c->payload_req);
        c->payload_req = NULL;
    }
    assert(c->inflight == 0);
    nbd_slots_free(c);
    close(c->fd);
    if (c->exp)
        server_export_conn_gone(c->srv, c->exp);
    loop_undefer(c->loop, &c->kick);
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
    return c->running == 0 && !c->sq_head && !c->send_pending &&
           !c->payload_req;
}

static void drain_done(struct loop_op *op, int res, uint32_t flags)
{
    struct conn *c = container_of(op, struct conn, drain_op);
    (void)res;
    (void)flags;
    c->drain_timer_pending = false;
    if (c->state == CONN_DRAINING && conn_idle(c) &&
        c->requests_seen == c->drain_mark) {
        c->state = CONN_DEAD; /* quiet for DRAIN_QUIET_MS: close */
        shutdown(c->fd, SHUT_RDWR);
    }
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
    if (c->state != CONN_DEAD) {
        process_input(c);
        start_recv(c);
        start_send(c);
    }
    if (c->state == CONN_CLOSING && conn_idle(c)) {
        c->state = CONN_DEAD;
        shutdown(c->fd, SHUT_RDWR);
    }
    if (c->state == CONN_DRAINING && conn_idle(c))
        arm_drain_timer(c);
    if (c->state == CONN_DEAD && !c->recv_pending && !c->send_pending &&
        !c->drain_timer_pending && c->running == 0)
        conn_free(c);
}
