/* strata — socket byte streams on the loop (see stream.h). */
#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "stream.h"
#include "util.h"

/* Compact rbuf when fewer than this many bytes are free at its end. */
#define STREAM_MIN_TAIL 4096

static void recv_done(struct loop_op *op, int res, uint32_t flags);
static void send_done(struct loop_op *op, int res, uint32_t flags);

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
    if (s->send_pending || !s->sq_head || s->dead)
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
            s->siov[k].iov_base = (char *)si->iov[i].iov_base + skip;
            s->siov[k].iov_len = len - skip;
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

static void send_done(struct loop_op *op, int res, uint32_t flags)
{
    struct stream *s = container_of(op, struct stream, send_op);
    (void)flags;
    s->send_pending = false;
    if (res == -EINTR || res == -EAGAIN) {
        s->ops->kick(s);
        return;
    }
    if (res <= 0) {
        s->ops->send_failed(s, res);
        s->ops->kick(s);
        return;
    }
    size_t n = (size_t)res;
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
    if (s->rstart == s->rend) {
        s->rstart = s->rend = 0;
    } else if (s->rend == s->rcap || s->rcap - s->rend < STREAM_MIN_TAIL) {
        memmove(s->rbuf, s->rbuf + s->rstart, s->rend - s->rstart);
        s->rend -= s->rstart;
        s->rstart = 0;
    }
    if (s->rend == s->rcap)
        return false; /* full of unparsed data: parsing must catch up */
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
    struct io_uring_sqe *sqe = loop_get_sqe(s->loop, &s->recv_op);
    io_uring_prep_recv(sqe, s->fd, dst, len, 0);
    s->recv_pending = true;
    s->recv_direct = true;
}

static void recv_done(struct loop_op *op, int res, uint32_t flags)
{
    struct stream *s = container_of(op, struct stream, recv_op);
    (void)flags;
    s->recv_pending = false;
    if (res == -EINTR || res == -EAGAIN) {
        s->ops->kick(s);
        return;
    }
    if (res > 0 && !s->recv_direct) {
        assert((size_t)res <= s->rcap - s->rend);
        s->rend += (size_t)res;
    }
    s->ops->received(s, res, s->recv_direct);
    s->ops->kick(s);
}
