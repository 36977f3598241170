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
 * TLS (stream_tls_start): once switched, the stream is a TLS record
 * layer over the same ring.  GnuTLS never touches the socket: its push
 * function appends records to a ciphertext output buffer that the stream
 * sends with io_uring, its pull function takes bytes from a ciphertext
 * input buffer that io_uring recvs fill.  The owner sees plaintext exactly
 * as before (rbuf, direct targets, the send queue); a queued item is done
 * once its bytes are sealed into records.  No call blocks.
 *
 * Multishot receive (stream_use_multishot): one recv stays armed on the
 * socket and the kernel fills buffers of a per-stream provided-buffer ring
 * as bytes arrive, one completion each, with no receive to submit per
 * message.  Filled buffers are held, in arrival order, until their bytes
 * were copied to where the owner asked for input (the free tail of rbuf,
 * or a direct target); a buffer goes back to the ring only once all its
 * bytes were taken, so a header or payload spanning buffers is taken
 * piece by piece.  The API is unchanged: the owner asks with
 * stream_start_recv / stream_start_recv_into and hears of input through
 * received().  Back-pressure: while the owner asks for nothing, buffers
 * fill and stay held; with none left the kernel ends the receive
 * (-ENOBUFS) and reads no more from the socket, so at most the ring's
 * bytes (STREAM_MS_BUFS * STREAM_MS_BUFSIZE) wait beyond rbuf.  It is
 * armed again when the owner asks and nothing is held.  While it is not
 * armed, two kinds of input get one plain recv instead: a large direct
 * target (a big write payload lands in its buffer with no copy), and the
 * first input after the ring ran dry (more bytes wait than the ring
 * holds: one recv into the free tail of rbuf takes them all at once).
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
#define STREAM_MS_BUFS 4                   /* provided buffers per stream */
#define STREAM_MS_BUFSIZE (8u << 10)
/* A direct target at least this large (a big write payload) is received
 * with a plain recv straight into it while the multishot receive is not
 * armed, rather than copied out of provided buffers. */
#define STREAM_DIRECT_MIN (64u << 10)

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
    /* The TLS handshake begun by stream_tls_start ended: 0 (records flow
     * from now on) or -EPROTO (GnuTLS said why: stream_tls_error).  Only
     * owners that start TLS set it. */
    void (*tls_done)(struct stream *s, int res);
    /* Kernel TLS (stream_tls_offload): hand the session's keys for one
     * direction (rx: receive, else send) to the socket's tls ULP.  0, and
     * from then on that direction of the socket carries plaintext; -errno
     * and the direction stays with GnuTLS.  The stream calls it only at a
     * record boundary, with nothing of that direction buffered. */
    int (*tls_offload)(struct stream *s, bool rx);
};

struct stream_tls;                         /* stream.c: the record layer */

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

    /* multishot receive (NULL br: one recv per stream_start_recv*) */
    struct loop_bufring *br;
    bool ms_armed;                 /* the multishot recv is in flight */
    bool single_pending;           /* a plain recv is in flight instead */
    bool ms_dry;                   /* input in bulk: plain recvs into rbuf */
    bool ms_got_data;              /* it delivered bytes (it works) */
    bool ms_final_set;             /* end of stream or an error to report */
    int ms_final;                  /* ... once the held bytes were taken */
    uint8_t *want_dst;             /* the owner's direct target */
    size_t want_len;
    struct {                       /* filled buffers, oldest first */
        uint16_t bid;
        uint32_t off, len;         /* bytes [off, len) not yet taken */
    } held[STREAM_MS_BUFS];
    unsigned held_head, held_n;
    struct loop_hook ms_hook;      /* hands held bytes over (deferred) */

    struct stream_tls *tls;        /* NULL: plaintext */
    struct loop_hook tls_hook;     /* decrypts buffered records (deferred:
                                      the owner hears of it as of a recv) */
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

/* Switches input to a multishot receive into provided buffers.  Only on
 * a plaintext stream with no recv in flight.  false: not available (the
 * kernel lacks it, or no memory): input goes on one recv at a time. */
bool stream_use_multishot(struct stream *s);

/* Releases what the stream holds besides the owner's (the TLS session,
 * the provided buffers).  Only when !stream_busy(). */
void stream_fini(struct stream *s);

/* ---- TLS ---- */

/* Switches the stream to TLS with session (a server gnutls_session_t with
 * its credentials and priority set; the stream owns it from now on, even
 * on error).  What is queued already (the reply that accepts the upgrade)
 * still goes out in plaintext, first.  Unparsed input and every byte the
 * socket holds now are discarded: the peer may not send before it has
 * read that reply, so such bytes were injected by someone else and must
 * never reach the protocol above.  Returns the number of bytes discarded,
 * or -errno (the connection cannot go on).  Needs no recv in flight. */
long stream_tls_start(struct stream *s, void *session);
/* The gnutls_session_t, or NULL before stream_tls_start. */
void *stream_tls_session(const struct stream *s);
/* GnuTLS's text for the error that failed the stream, or NULL. */
const char *stream_tls_error(const struct stream *s);
/* The handshake ended and records flow. */
bool stream_tls_established(const struct stream *s);
/* Queues a close_notify alert after the queued output (graceful close). */
void stream_tls_bye(struct stream *s);
/* Once the handshake ended: moves the send direction (and the receive
 * one too if rx) to the kernel's TLS through ops->tls_offload, each at
 * the first point where that is exact: sending once every record GnuTLS
 * sealed (the session tickets) went out; receiving once no ciphertext is
 * buffered in user space.  From then on that direction is plain io_uring
 * sends or recvs and GnuTLS never touches it again; the receive side
 * moves only after the send side did. */
void stream_tls_offload(struct stream *s, bool rx);
/* Which directions the kernel's TLS carries: bit 0 send, bit 1 receive. */
unsigned stream_tls_offloaded(const struct stream *s);

/* No recv and no send in flight.  (With a multishot receive,
 * recv_pending says that the owner asked for input, not that a recv
 * is in flight.) */
static inline bool stream_busy(const struct stream *s)
{
    return (s->br ? s->ms_armed || s->single_pending : s->recv_pending) ||
           s->send_pending;
}
/* Bytes sealed into TLS records and not yet sent. */
size_t stream_tls_backlog(const struct stream *s);
/* Nothing queued and nothing being sent. */
static inline bool stream_output_idle(const struct stream *s)
{
    return !s->sq_head && !s->send_pending &&
           (!s->tls || stream_tls_backlog(s) == 0);
}
/* Unparsed input bytes. */
static inline size_t stream_unparsed(const struct stream *s)
{
    return s->rend - s->rstart;
}

#endif
