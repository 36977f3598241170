/* strata — a byte stream over a connected socket, on the io_uring loop:
 * one receive buffer, a send queue gathered into one sendmsg at a time
 * with short sends resumed, and the bookkeeping of what is in flight.
 *
 * Both the NBD connections and the control clients are streams; each owns
 * the protocol above it (parsing, states, bounds) and tells the stream
 * when to receive and send.  At most one recv and one send are in flight.
 *
 * Ownership and lifetime: the owner embeds struct stream, calls
 * stream_init() once, and may free it only when stream_busy() is false.
 * Queued items belong to the stream until their done callback runs,
 * exactly once: after they were sent in full, or when discarded
 * (stream_drop_queue, or stream_send on a stream marked dead).
 *
 * Everything runs on the owning loop's thread; nothing here yields.
 */
#ifndef STRATA_STREAM_H
#define STRATA_STREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "loop.h"

/* One message (or the iovecs of one reply) waiting to be sent. */
struct stream_item {
    struct stream_item *next;
    struct iovec *iov;
    int niov;
    size_t total;                          /* set by stream_send */
    void (*done)(struct stream_item *si);  /* sent or discarded: release */
};

#define STREAM_SEND_IOV 64                 /* iovecs gathered per sendmsg */

struct stream;

/* What the owner is told.  Each runs on the loop, from the completion. */
struct stream_ops {
    /* A recv completed: res > 0 bytes arrived (already appended to the
     * buffer, or written to the direct target), 0 is end of stream, < 0 an
     * error (-EINTR and -EAGAIN are retried by the stream and not
     * reported).  direct says which target the recv had. */
    void (*received)(struct stream *s, int res, bool direct);
    /* A send failed (res < 0) or made no progress (res == 0). */
    void (*send_failed)(struct stream *s, int res);
    /* Called after every completion (recv or send): the owner re-runs its
     * state machine (usually a deferred kick). */
    void (*kick)(struct stream *s);
};

struct stream {
    struct loop *loop;
    int fd;
    const struct stream_ops *ops;
    void *owner;

    /* input: unparsed bytes are rbuf[rstart, rend) */
    uint8_t *rbuf;
    size_t rcap, rstart, rend;
    struct loop_op recv_op;
    bool recv_pending;
    bool recv_direct;              /* the pending recv targets a caller
                                      buffer, not rbuf */

    /* output */
    struct stream_item *sq_head, *sq_tail;
    size_t sq_off;                 /* bytes of sq_head already sent */
    size_t sq_bytes;               /* queued and not yet sent */
    struct loop_op send_op;
    bool send_pending;
    bool dead;                     /* stream_send discards from now on */
    struct msghdr msg;
    struct iovec siov[STREAM_SEND_IOV];
};

/* rbuf (rcap bytes) is the owner's; it must outlive the stream. */
void stream_init(struct stream *s, struct loop *loop, int fd, uint8_t *rbuf,
                 size_t rcap, const struct stream_ops *ops, void *owner);

/* Queues si (and kicks the owner); on a dead stream si->done runs now. */
void stream_send(struct stream *s, struct stream_item *si);
/* Queues a copy of len bytes (freed once sent).  -ENOMEM. */
int stream_send_copy(struct stream *s, const void *buf, size_t len);
/* Starts a sendmsg of what is queued, unless one is in flight. */
void stream_start_send(struct stream *s);
/* Discards the queue (no send in flight: asserted), running each done. */
void stream_drop_queue(struct stream *s);

/* Starts a recv into the free tail of rbuf (compacting it first when the
 * tail is short), unless one is in flight.  Returns false when rbuf is
 * full of unparsed bytes: the owner must consume some first. */
bool stream_start_recv(struct stream *s);
/* Starts a recv of at most len bytes straight into dst (a write payload:
 * no copy), unless one is in flight.  dst must stay valid until the
 * received callback. */
void stream_start_recv_into(struct stream *s, void *dst, size_t len);

/* No recv and no send in flight. */
static inline bool stream_busy(const struct stream *s)
{
    return s->recv_pending || s->send_pending;
}
/* Nothing queued and nothing being sent. */
static inline bool stream_output_idle(const struct stream *s)
{
    return !s->sq_head && !s->send_pending;
}
/* Unparsed input bytes. */
static inline size_t stream_unparsed(const struct stream *s)
{
    return s->rend - s->rstart;
}

#endif
