/* strata — one NBD client connection (internal to daemon/).
 *
 * The connection is an explicit state machine driven by socket completions;
 * its states are declared once below (CONN_STATES).  Each transmission
 * request runs in its own coroutine and ends by queueing its reply.
 *
 * Socket I/O is a struct stream (common/stream.h): one receive buffer,
 * request headers parsed from it, a write payload that is not yet in it
 * received directly into the request's buffer; a send queue gathered into
 * one sendmsg at a time (short sends resumed).  Bounds: at most cfg.max_inflight requests
 * and about cfg.max_buffered payload bytes per connection — past either,
 * the connection stops reading (back-pressure).
 *
 * TLS: NBD_OPT_STARTTLS switches the stream to TLS (stream_tls_start);
 * the handshake is the state TLS_HANDSHAKE, bounded by the same deadline
 * as the rest of the handshake.  With --tls=require every option but
 * STARTTLS and ABORT is refused before it; an export with an allow list
 * is invisible (not listed, NBD_REP_ERR_UNKNOWN) to every other client.
 *
 * Lifetime: the connection is freed only when no recv, no send and no
 * request coroutine is outstanding (conn_maybe_free).
 */
#ifndef STRATA_CONN_H
#define STRATA_CONN_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

#include "loop.h"
#include "nbd-codec.h"
#include "server.h"
#include "stream.h"

#define CONN_STATES(X)                                                       \
    X(HS_FLAGS)   /* greeting sent; waiting for the client's flags */        \
    X(HS_OPTION)  /* option haggling */                                      \
    X(TLS_HANDSHAKE) /* STARTTLS accepted: the TLS handshake runs, then  */  \
                  /* the peer is judged (tls.h), then option haggling */  \
    X(TRANSMIT)   /* reading and serving requests */                         \
    X(DRAINING)   /* server stopping: in-flight requests finish and are  */  \
                  /* answered, new ones get NBD_ESHUTDOWN; then close    */  \
    X(CLOSING)    /* no more input; finish in-flight, send, then close */    \
    X(LINGER)     /* drained: FIN sent; input read and dropped until the */  \
                  /* client closes or DRAIN_LINGER_MS passes             */  \
    X(DEAD)       /* socket shut; waiting for outstanding work to return */

enum conn_state {
#define X(s) CONN_##s,
    CONN_STATES(X)
#undef X
};

const char *conn_state_name(enum conn_state s);

#define DRAIN_QUIET_MS 250
/* After a drain, how long the client may take to read its last replies
 * and close: requests it sends meanwhile are read and dropped, so its
 * sends do not fail (a client such as libnbd that fails to send gives up
 * the replies it has not read yet, to writes that were done). */
#define DRAIN_LINGER_MS 2000
/* Handshake input is not read while more than this many reply bytes wait
 * to be sent: a client that sends options without reading the replies
 * cannot grow the send queue without bound.  (In transmission the request
 * slots bound it.) */
#define CONN_SEND_BACKLOG_MAX (1u << 20)
#define REQ_INLINE_IOV 6
#define REQ_HDR_BUF 192          /* reply headers, hole and error payloads */
/* Request slots keep their payload buffer between requests (fresh large
 * buffers cost page faults on every use) when it is at most REQ_KEEP_MAX
 * bytes and the connection keeps at most CONN_KEEP_BUDGET bytes in all. */
#define REQ_KEEP_MAX (4u << 20)
#define CONN_KEEP_BUDGET (16u << 20)

/* Meta contexts: fixed ids. */
#define META_BASE_ALLOCATION 1u
#define META_ALLOCATION_DEPTH 2u
/* qemu:dirty-bitmap:NAME of the export's bitmap i: META_DIRTY_BITMAP + i
 * (i < EXPORT_MAX_BITMAPS, so every id fits the mask). */
#define META_DIRTY_BITMAP 3u
#define META_MAX_ID (META_DIRTY_BITMAP + EXPORT_MAX_BITMAPS - 1)

/* One transmission request; preallocated per connection (a slot). */
struct nbd_req {
    struct conn *c;
    struct nbd_request hdr;
    struct stream_item si;
    struct iovec iov[REQ_INLINE_IOV];
    uint8_t hbuf[REQ_HDR_BUF];
    void *buf;                 /* payload buffer (slot-kept if small) */
    size_t buf_cap;
    bool buf_kept;             /* buf belongs to the slot, reused */
    uint64_t accounted;        /* bytes counted in c->buffered */
    uint32_t error;            /* NBD_E* to report, 0 = success */
    const char *errmsg;        /* static text for error chunks */
    void *extra;               /* block status payload (malloc) */
    struct nbd_req *next_free;
    /* A connection on a connection loop: the request runs on the main
     * loop (remote), which builds its reply (reply_ready) and posts it
     * back (msg) for the connection's loop to send. */
    struct loop_msg msg;
    bool remote;
    bool reply_ready;
};

struct conn {
    struct server *srv;
    struct loop *loop;         /* the main loop's, or its worker's */
    struct worker *worker;     /* the connection loop serving it; NULL:
                                  the main loop */
    struct nbd_budget *budget; /* its loop's payload budget */
    /* The hand-over (main loop): entering transmission without TLS it may
     * move to a connection loop; it waits, reading nothing, until nothing
     * of its stream is in flight on the main loop's ring. */
    struct worker *move_to;
    bool counted_local;        /* in srv->local_transmit */
    struct loop_msg move_msg;  /* the hand-over; later its end, back */
    struct conn *next, *prev;  /* srv->conns */
    uint64_t id;
    int fd;
    bool is_tcp;
    struct peer *peer;         /* its address or uid (peers.c) */
    bool in_handshake;         /* counted in the peer's handshakes */
    enum conn_state state;
    uint64_t deadline_ns;      /* handshake must end before this */

    /* negotiation */
    uint32_t client_flags;
    bool structured;
    bool extended;
    unsigned meta;             /* bitmask of 1 << META_* selected */
    struct export *meta_export;/* export SET_META_CONTEXT referred to */
    struct export *exp;        /* chosen export (transmission) */
    struct nbd_session session;
    struct nbd_option_header opt;
    bool tls;                  /* TLS established and the peer allowed */
    char *tls_identity;        /* its DN or PSK username, or NULL */

    /* socket I/O: receive buffer (rbuf, owned), send queue */
    struct stream st;
    uint8_t *rbuf;
    struct nbd_req *payload_req;   /* receiving a write payload into it */
    uint64_t payload_got;
    uint64_t discard_left;         /* payload bytes of a refused request */
    bool ms_tried;                 /* stream_use_multishot was asked */
    struct nbd_req *discard_req;   /* its error reply, sent once the payload
                                    * is read: a client (libnbd) that gets a
                                    * reply to a write it is still sending
                                    * knows no such cookie and hangs up */

    /* requests */
    struct nbd_req *slots;
    struct nbd_req *free_slots;
    unsigned inflight;             /* slots in use */
    unsigned running;              /* request coroutines not yet returned */
    uint64_t buffered;             /* payload bytes held by requests */
    uint64_t kept;                 /* bytes of slot-kept buffers */

    struct loop_hook kick;         /* deferred: input, output, close */

    /* waiting for payload memory (budget.c): in srv's FIFO */
    bool mem_waiting;
    struct conn *mem_wait_next;

    /* DRAINING: closed after DRAIN_QUIET_MS without a new request, so a
     * client that got NBD_ESHUTDOWN has time to read its replies and send
     * NBD_CMD_DISC (closing at once would fail its next send and make it
     * drop replies already in its receive buffer). */
    struct loop_op drain_op;
    struct __kernel_timespec drain_ts;
    struct loop_op linger_cancel_op; /* LINGER ended early: timer removed */
    bool linger_cancel_pending;
    bool drain_timer_pending;
    uint64_t requests_seen;        /* requests parsed; drain quiet check */
    uint64_t drain_mark;           /* requests_seen when the timer was armed */

    /* requests parsed, by command (unknown types in the last slot), and
     * writes with FUA: logged with --verbose when the client sends
     * NBD_CMD_DISC, so tests can see what a client really sent */
    uint64_t cmd_count[NBD_CMD_BLOCK_STATUS + 2];
    uint64_t fua_writes;
};

/* conn.c */
struct conn *conn_new(struct server *srv, int fd, bool is_tcp);
void conn_kick(struct conn *c);                  /* schedule the hook */
void conn_abort(struct conn *c, const char *why);/* hard disconnect */
void conn_close_gracefully(struct conn *c);      /* CLOSING (after DISC) */
void conn_drain(struct conn *c);                 /* DRAINING (server stop) */
void conn_send(struct conn *c, struct stream_item *si);
/* A send item with its own copy of len bytes; done frees it. */
int conn_send_copy(struct conn *c, const void *buf, size_t len);

/* budget.c: the server-wide payload memory budget. */
/* A connection holding no payload may always start one request this big. */
#define NBD_BUDGET_MIN_GRANT (256u << 10)
/* May c's next request (in the slot c->free_slots) get need payload bytes?
 * false: c is queued and kicked when memory is given back. */
bool nbd_budget_admit(struct conn *c, uint64_t need);
void nbd_budget_add(struct conn *c, uint64_t bytes);
void nbd_budget_sub(struct conn *c, uint64_t bytes);
/* c goes away: leave the queue. */
void nbd_budget_forget(struct conn *c);

/* nbd-handshake.c: consumes handshake input from rbuf; returns false when
 * more bytes are needed. */
bool nbd_handshake_input(struct conn *c);
void nbd_handshake_start(struct conn *c);
/* The TLS handshake ended (res 0) or failed (-EPROTO): judge the peer,
 * then go on with the options or close. */
void nbd_handshake_tls_done(struct conn *c, int res);

/* nbd-transmit.c */
bool nbd_transmit_input(struct conn *c);
void nbd_payload_complete(struct conn *c);
void nbd_req_release(struct nbd_req *r);
void nbd_slots_free(struct conn *c);
int nbd_slots_init(struct conn *c);
uint16_t nbd_export_eflags(const struct conn *c, const struct export *e);

#endif
