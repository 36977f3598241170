/* strata — the nbd backend: a layer served by another NBD server (nbdkit,
 * qemu-nbd, another stratad), over libnbd's asynchronous API.
 *
 * Driving libnbd from the ring.  Every libnbd call on a connected handle
 * is made on the backend's loop thread: commands are issued with
 * nbd_aio_pread / pwrite / flush / trim / zero / block_status, each with a
 * completion callback and a free callback, and the socket is watched with
 * io_uring polls that follow nbd_aio_get_direction(): a POLLIN poll while
 * commands are in flight, a POLLOUT poll while libnbd has a request it
 * could not finish sending.  A poll's completion calls
 * nbd_aio_notify_read / notify_write, inside which libnbd calls the
 * callbacks of the commands that finished; so callbacks run on the loop
 * thread, never on another one.  The callback records the server's error;
 * the free callback — which libnbd calls exactly once per command, also
 * for a command it could not issue or aborted — counts the command done
 * and wakes the waiting coroutine.  One request may become several
 * commands (NBD commands carry at most the server's maximum block size or
 * NBDBE_MAX_CHUNK bytes); they are all issued at once and waited for
 * together (struct nbdbe_wait).
 *
 * Quiet at close.  backend_close() may run on another thread
 * (BACKEND_DRV_OFFLOAD), where the ring cannot be touched; so no poll may
 * be left in the ring once no request runs.  The read poll is armed only
 * while commands are in flight, and the request that finds no command in
 * flight when it finishes cancels any poll still armed and waits for it
 * (nbdbe_quiesce_co) before it returns.
 *
 * A server that goes away.  libnbd then fails every command in flight
 * (ENOTCONN), which the requests see as EIO; the handle is dead and the
 * backend DOWN.  Requests that arrive while it is DOWN fail with EIO at
 * once, until reconnect-delay seconds have passed; the next request then
 * connects again — on an offload thread (loop_offload_co), as the first
 * open did, since libnbd's connect blocks — while later requests wait for
 * that attempt.  A server that comes back with another size, or
 * read-only under a writable layer, is refused and the layer stays DOWN.
 * Nothing of this ever blocks the loop.
 *
 * Size.  b->size is the export's size; reads past it read zeros and writes
 * past it fail with ENOSPC (an NBD export cannot grow).
 */
#include <assert.h>
#include <errno.h>
#include <libnbd.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend.h"
#include "log.h"
#include "loop.h"
#include "nbd-spec.h"
#include "util.h"

#define NBDBE_MAX_CHUNK  (32u << 20)   /* data per read or write command */
#define NBDBE_MAX_EFFECT (1u << 30)    /* length of a zero/trim/status */
#define NBDBE_ZERO_BUF   (1u << 20)    /* zeros written when the server
                                          cannot zero */

enum nbdbe_state {
    NBDBE_READY,        /* h is connected */
    NBDBE_CONNECTING,   /* a request is connecting again (offload thread) */
    NBDBE_DOWN,         /* the server went away; h, if any, is dead */
};

/* What one connection offers (read at connect). */
struct nbdbe_info {
    uint64_t size;
    uint64_t max_chunk;         /* bytes per read/write command */
    uint32_t min_block;         /* server's minimum block size, 1 if none */
    bool read_only;
    bool can_flush, can_fua, can_trim, can_zero, can_fast_zero;
    bool can_extents, can_cache;
};

struct nbdbe {
    struct backend b;
    struct nbd_spec spec;
    char *where;                /* canonical URI without options */
    struct nbd_handle *h;       /* NULL only while reconnecting */
    struct nbdbe_info info;
    enum nbdbe_state state;
    uint64_t down_since_ns;
    uint8_t *zeros;             /* NBDBE_ZERO_BUF zero bytes, or NULL */

    /* Loop thread only. */
    unsigned inflight;          /* commands issued and not yet freed */
    struct loop_op rd_op, wr_op, rd_cancel_op, wr_cancel_op;
    bool rd_pending, wr_pending;             /* polls in the ring */
    bool rd_cancel_pending, wr_cancel_pending; /* their removal */
    struct co_queue quiet_q;    /* waiting for the polls to drain */
    struct co_queue connect_q;  /* waiting for a reconnect attempt */
    unsigned outage;            /* connections lost so far */
};

/* The commands of one request. */
struct nbdbe_wait {
    struct nbdbe *n;
    struct coro *co;
    unsigned pending;           /* issued (or being issued), not freed */
    int err;                    /* first error, positive errno */
    bool waiting;               /* co is yielded in nbdbe_wait_co */
};

static struct nbdbe *nb(struct backend *b)
{
    return (struct nbdbe *)b;
}

/* ---- connecting (blocking: offload thread or control path) ---- */

static int nbdbe_set_error(const char *where, struct error **errp)
{
    int e = nbd_get_errno();
    const char *msg = nbd_get_error();
    return error_setf(errp, e ? e : EIO, "%s: %s", where,
                      msg ? msg : "connection failed");
}

/* Runs the connection h was told to make (TCP connect, NBD handshake,
 * TLS) until the export is ready, for at most timeout_s seconds (0: no
 * limit).  A server that accepts and then says nothing fails here with
 * ETIMEDOUT instead of holding the layer for ever. */
static int nbdbe_connect_wait(struct nbd_handle *h, unsigned timeout_s,
                              const char *where, struct error **errp)
{
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        if (nbd_aio_is_ready(h) == 1)
            return 0;
        if (nbd_aio_is_dead(h) == 1 || nbd_aio_is_closed(h) == 1)
            return nbdbe_set_error(where, errp);
        int wait_ms = -1;
        if (timeout_s) {
            struct timespec t;
            clock_gettime(CLOCK_MONOTONIC, &t);
            int64_t spent_ms = (t.tv_sec - t0.tv_sec) * 1000 +
                               (t.tv_nsec - t0.tv_nsec) / 1000000;
            int64_t left = (int64_t)timeout_s * 1000 - spent_ms;
            if (left <= 0)
                return error_setf(errp, ETIMEDOUT, "%s: the export was not "
                                  "ready after %u s (connect-timeout): the "
                                  "TCP connect, the NBD handshake or the TLS "
                                  "negotiation did not finish", where,
                                  timeout_s);
            wait_ms = (int)MIN(left, 1000);
        }
        if (nbd_poll(h, wait_ms) < 0 && nbd_aio_is_dead(h) != 1)
            return nbdbe_set_error(where, errp);
    }
}

static struct nbd_handle *nbdbe_connect(const struct nbd_spec *s,
                                        const char *where,
                                        struct nbdbe_info *info,
                                        struct error **errp)
{
    struct nbd_handle *h = nbd_create();
    if (!h) {
        error_setf(errp, ENOMEM, "%s: %s", where, nbd_get_error());
        return NULL;
    }
    int r = nbd_set_export_name(h, s->export);
    if (r == 0)
        r = nbd_add_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION);
    if (r == 0)
        r = nbd_set_pread_initialize(h, false);
    if (r == 0 && s->tls)
        r = nbd_set_tls(h, LIBNBD_TLS_REQUIRE);
    if (r == 0 && s->tls_certificates)
        r = nbd_set_tls_certificates(h, s->tls_certificates);
    if (r == 0 && s->tls_psk_file)
        r = nbd_set_tls_psk_file(h, s->tls_psk_file);
    if (r == 0 && s->tls_username)
        r = nbd_set_tls_username(h, s->tls_username);
    if (r == 0 && s->tls_verify_peer_set)
        r = nbd_set_tls_verify_peer(h, s->tls_verify_peer);
    if (r == 0)
        r = s->socket ? nbd_aio_connect_unix(h, s->socket)
                      : nbd_aio_connect_tcp(h, s->host, s->port);
    if (r == 0)
        r = nbdbe_connect_wait(h, s->connect_timeout, where, errp);
    else
        nbdbe_set_error(where, errp);
    if (r < 0) {
        nbd_close(h);
        return NULL;
    }
    memset(info, 0, sizeof(*info));
    int64_t size = nbd_get_size(h);
    int64_t minb = nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM);
    int64_t maxb = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM);
    if (size < 0) {
        error_setf(errp, EIO, "%s: %s", where, nbd_get_error());
        nbd_close(h);
        return NULL;
    }
    info->size = (uint64_t)size;
    info->min_block = minb > 1 ? (uint32_t)minb : 1;
    info->max_chunk = maxb > 0 && (uint64_t)maxb < NBDBE_MAX_CHUNK
                          ? (uint64_t)maxb : NBDBE_MAX_CHUNK;
    if (info->min_block > 65536 || (info->min_block & (info->min_block - 1))
        || info->max_chunk < info->min_block) {
        error_setf(errp, EINVAL, "%s: the server's block sizes (minimum "
                   "%lld, maximum %lld) are not usable", where,
                   (long long)minb, (long long)maxb);
        nbd_close(h);
        return NULL;
    }
    info->max_chunk -= info->max_chunk % info->min_block;
    info->read_only = nbd_is_read_only(h) == 1;
    info->can_flush = nbd_can_flush(h) == 1;
    info->can_fua = nbd_can_fua(h) == 1;
    info->can_trim = nbd_can_trim(h) == 1;
    info->can_zero = nbd_can_zero(h) == 1;
    info->can_fast_zero = nbd_can_fast_zero(h) == 1;
    info->can_cache = nbd_can_cache(h) == 1;
    info->can_extents =
        nbd_can_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1;
    return h;
}

/* ---- the socket on the ring ---- */

static void nbdbe_rd_done(struct loop_op *op, int res, uint32_t flags);
static void nbdbe_wr_done(struct loop_op *op, int res, uint32_t flags);
static void nbdbe_rd_cancel_done(struct loop_op *op, int res, uint32_t flags);
static void nbdbe_wr_cancel_done(struct loop_op *op, int res, uint32_t flags);

static void nbdbe_cancel_polls(struct nbdbe *n)
{
    if (n->rd_pending && !n->rd_cancel_pending) {
        struct io_uring_sqe *sqe = loop_get_sqe(n->b.loop, &n->rd_cancel_op);
        io_uring_prep_poll_remove(sqe, (uint64_t)(uintptr_t)&n->rd_op);
        n->rd_cancel_pending = true;
    }
    if (n->wr_pending && !n->wr_cancel_pending) {
        struct io_uring_sqe *sqe = loop_get_sqe(n->b.loop, &n->wr_cancel_op);
        io_uring_prep_poll_remove(sqe, (uint64_t)(uintptr_t)&n->wr_op);
        n->wr_cancel_pending = true;
    }
}

static bool nbdbe_polls_quiet(const struct nbdbe *n)
{
    return !n->rd_pending && !n->wr_pending && !n->rd_cancel_pending &&
           !n->wr_cancel_pending;
}

static void nbdbe_conn_lost(struct nbdbe *n)
{
    assert(n->state == NBDBE_READY);
    n->state = NBDBE_DOWN;
    n->down_since_ns = loop_now_ns();
    n->outage++;
    const char *why = nbd_get_error();
    log_error("%s: the NBD server went away (%s): requests fail with EIO; "
              "connecting again after %u s", n->where,
              why ? why : "connection closed", n->spec.reconnect_delay);
    nbdbe_cancel_polls(n);
}

/* After any libnbd call on h: notices a dead connection, and keeps the
 * polls the state machine wants in the ring. */
static void nbdbe_after_io(struct nbdbe *n)
{
    if (n->state != NBDBE_READY)
        return;
    if (nbd_aio_is_dead(n->h) == 1 || nbd_aio_is_closed(n->h) == 1) {
        nbdbe_conn_lost(n);
        return;
    }
    int fd = nbd_aio_get_fd(n->h);
    if (fd < 0)
        return;
    unsigned dir = nbd_aio_get_direction(n->h);
    if ((dir & LIBNBD_AIO_DIRECTION_READ) && n->inflight > 0 &&
        !n->rd_pending) {
        io_uring_prep_poll_add(loop_get_sqe(n->b.loop, &n->rd_op), fd,
                               POLLIN);
        n->rd_pending = true;
    }
    if ((dir & LIBNBD_AIO_DIRECTION_WRITE) && !n->wr_pending) {
        io_uring_prep_poll_add(loop_get_sqe(n->b.loop, &n->wr_op), fd,
                               POLLOUT);
        n->wr_pending = true;
    }
}

static void nbdbe_notify(struct nbdbe *n, int res, unsigned want)
{
    if (res == -ECANCELED || n->state != NBDBE_READY)
        return;
    if (res < 0 && res != -EINTR && res != -EAGAIN)
        log_warn("%s: polling the socket: %s", n->where, strerror(-res));
    if (!(nbd_aio_get_direction(n->h) & want))
        return;
    int r = want == LIBNBD_AIO_DIRECTION_READ ? nbd_aio_notify_read(n->h)
                                              : nbd_aio_notify_write(n->h);
    if (r < 0 && nbd_aio_is_dead(n->h) != 1 && nbd_aio_is_closed(n->h) != 1)
        log_warn("%s: %s", n->where, nbd_get_error());
}

static void nbdbe_rd_done(struct loop_op *op, int res, uint32_t flags)
{
    struct nbdbe *n = container_of(op, struct nbdbe, rd_op);
    (void)flags;
    n->rd_pending = false;
    nbdbe_notify(n, res, LIBNBD_AIO_DIRECTION_READ);
    nbdbe_after_io(n);
    co_queue_wake_all(&n->quiet_q);
}

static void nbdbe_wr_done(struct loop_op *op, int res, uint32_t flags)
{
    struct nbdbe *n = container_of(op, struct nbdbe, wr_op);
    (void)flags;
    n->wr_pending = false;
    nbdbe_notify(n, res, LIBNBD_AIO_DIRECTION_WRITE);
    nbdbe_after_io(n);
    co_queue_wake_all(&n->quiet_q);
}

static void nbdbe_rd_cancel_done(struct loop_op *op, int res, uint32_t flags)
{
    struct nbdbe *n = container_of(op, struct nbdbe, rd_cancel_op);
    (void)res;
    (void)flags;
    n->rd_cancel_pending = false;
    co_queue_wake_all(&n->quiet_q);
}

static void nbdbe_wr_cancel_done(struct loop_op *op, int res, uint32_t flags)
{
    struct nbdbe *n = container_of(op, struct nbdbe, wr_cancel_op);
    (void)res;
    (void)flags;
    n->wr_cancel_pending = false;
    co_queue_wake_all(&n->quiet_q);
}

/* When no command is in flight, leaves nothing of n in the ring. */
static void nbdbe_quiesce_co(struct nbdbe *n, struct coro *co)
{
    while (n->inflight == 0 && !nbdbe_polls_quiet(n)) {
        nbdbe_cancel_polls(n);
        co_queue_wait_co(&n->quiet_q, co);
    }
}

/* ---- reconnecting ---- */

struct nbdbe_connect_call {
    const struct nbd_spec *spec;
    const char *where;
    struct nbdbe_info info;
    struct nbd_handle *h;
    struct error *err;
};

static void nbdbe_connect_call(void *arg)
{
    struct nbdbe_connect_call *c = arg;
    c->h = nbdbe_connect(c->spec, c->where, &c->info, &c->err);
}

static int nbdbe_reconnect_co(struct nbdbe *n, struct coro *co)
{
    n->state = NBDBE_CONNECTING;
    nbdbe_cancel_polls(n);
    while (!nbdbe_polls_quiet(n))
        co_queue_wait_co(&n->quiet_q, co);
    if (n->h) {
        nbd_close(n->h);       /* dead: closes the socket, nothing more */
        n->h = NULL;
    }
    struct nbdbe_connect_call c = {.spec = &n->spec, .where = n->where};
    loop_offload_co(n->b.loop, co, nbdbe_connect_call, &c);
    const char *refused = NULL;
    if (c.h && c.info.size != n->info.size)
        refused = "its size changed";
    else if (c.h && c.info.read_only && !n->b.read_only)
        refused = "it is read-only now";
    else if (c.h && c.info.min_block > n->b.align)
        refused = "its minimum block size grew";
    if (c.h && !refused) {
        n->h = c.h;
        n->info = c.info;
        n->state = NBDBE_READY;
        log_info("%s: connected to the NBD server again", n->where);
    } else {
        if (refused) {
            log_error("%s: the NBD server is back but %s: the layer stays "
                      "unavailable", n->where, refused);
            nbd_close(c.h);
        } else {
            log_warn("%s: connecting again: %s", n->where,
                     c.err ? c.err->msg : "failed");
        }
        n->state = NBDBE_DOWN;
        n->down_since_ns = loop_now_ns();
    }
    error_free(c.err);
    co_queue_wake_all(&n->connect_q);
    return n->state == NBDBE_READY ? 0 : -EIO;
}

/* 0 when commands can be issued on n->h, else -EIO. */
static int nbdbe_ready_co(struct nbdbe *n, struct coro *co)
{
    for (;;) {
        switch (n->state) {
        case NBDBE_READY:
            return 0;
        case NBDBE_CONNECTING:
            co_queue_wait_co(&n->connect_q, co);
            continue;
        case NBDBE_DOWN:
            if (loop_now_ns() - n->down_since_ns <
                (uint64_t)n->spec.reconnect_delay * 1000000000u)
                return -EIO;
            return nbdbe_reconnect_co(n, co);
        }
    }
}

/* ---- commands ---- */

static int nbdbe_cb_done(void *user_data, int *error)
{
    struct nbdbe_wait *w = user_data;
    if (*error && !w->err)
        w->err = *error;
    return 1; /* retire the command */
}

static void nbdbe_cb_free(void *user_data)
{
    struct nbdbe_wait *w = user_data;
    assert(w->pending > 0 && w->n->inflight > 0);
    w->pending--;
    w->n->inflight--;
    if (w->pending == 0 && w->waiting)
        coro_wake(w->co);
}

static nbd_completion_callback nbdbe_cb(struct nbdbe_wait *w)
{
    return (nbd_completion_callback){.callback = nbdbe_cb_done,
                                     .user_data = w,
                                     .free = nbdbe_cb_free};
}

static void nbdbe_wait_init(struct nbdbe_wait *w, struct nbdbe *n,
                            struct coro *co)
{
    *w = (struct nbdbe_wait){.n = n, .co = co};
}

/* Before each nbd_aio_* call. */
static void nbdbe_issuing(struct nbdbe_wait *w)
{
    w->pending++;
    w->n->inflight++;
}

/* After it: a command libnbd refused is already freed. */
static bool nbdbe_issued(struct nbdbe_wait *w, int64_t cookie)
{
    if (cookie >= 0)
        return true;
    if (!w->err) {
        int e = nbd_get_errno();
        w->err = e ? e : EIO;
    }
    return false;
}

/* Waits for every command of w; the request's result. */
static int nbdbe_wait_co(struct nbdbe_wait *w)
{
    struct nbdbe *n = w->n;
    nbdbe_after_io(n);
    while (w->pending > 0) {
        w->waiting = true;
        coro_yield(w->co);
        w->waiting = false;
    }
    nbdbe_quiesce_co(n, w->co);
    switch (w->err) {
    case 0:
        return 0;
    case ENOTCONN: case ESHUTDOWN: case ECONNRESET: case EPIPE:
    case ETIMEDOUT: case EINVAL:
        /* the connection died, or libnbd refused what the handle's state
         * does not allow (a dead handle) */
        return -EIO;
    default:
        return -w->err;
    }
}

/* The commands a request is split into. */
enum nbdbe_cmd {
    NBDBE_PREAD,
    NBDBE_PWRITE,
    NBDBE_ZERO,
    NBDBE_TRIM,
    NBDBE_CACHE,
};

/* Splits [off, off + len) into commands cmd of at most chunk bytes,
 * issues them all and waits for them: the request's result.  buf is the
 * data of a read or a write, advanced piece by piece unless same_buf (the
 * zeros written for every piece); f the command flags. */
static int nbdbe_run_co(struct nbdbe *n, struct coro *co, enum nbdbe_cmd cmd,
                        uint8_t *buf, bool same_buf, uint64_t off,
                        uint64_t len, uint64_t chunk, uint32_t f)
{
    struct nbdbe_wait w;
    nbdbe_wait_init(&w, n, co);
    for (uint64_t done = 0; done < len;) {
        uint64_t c = MIN(len - done, chunk);
        uint8_t *p = same_buf ? buf : buf + done;
        nbd_completion_callback cb = nbdbe_cb(&w);
        int64_t cookie = -1;
        nbdbe_issuing(&w);
        switch (cmd) {
        case NBDBE_PREAD:
            cookie = nbd_aio_pread(n->h, p, c, off + done, cb, f);
            break;
        case NBDBE_PWRITE:
            cookie = nbd_aio_pwrite(n->h, p, c, off + done, cb, f);
            break;
        case NBDBE_ZERO:
            cookie = nbd_aio_zero(n->h, c, off + done, cb, f);
            break;
        case NBDBE_TRIM:
            cookie = nbd_aio_trim(n->h, c, off + done, cb, f);
            break;
        case NBDBE_CACHE:
            cookie = nbd_aio_cache(n->h, c, off + done, cb, f);
            break;
        }
        if (!nbdbe_issued(&w, cookie))
            break;
        done += c;
    }
    return nbdbe_wait_co(&w);
}

/* The largest piece of an effect command (zero, trim, cache, status):
 * under NBDBE_MAX_EFFECT, a multiple of the minimum block size. */
static uint64_t nbdbe_effect_max(const struct nbdbe *n)
{
    return NBDBE_MAX_EFFECT - NBDBE_MAX_EFFECT % n->info.min_block;
}

static int nbdbe_preadv_co(struct backend *b, struct coro *co,
                           const struct iovec *iov, int iovcnt, uint64_t off)
{
    struct nbdbe *n = nb(b);
    uint64_t len = iov_size(iov, iovcnt);
    uint64_t avail = off < n->info.size ? MIN(len, n->info.size - off) : 0;
    if (avail < len)
        iov_zero_range(iov, iovcnt, avail, len - avail);
    if (avail == 0)
        return 0;
    int r = nbdbe_ready_co(n, co);
    if (r < 0)
        return r;
    uint8_t *buf = iovcnt == 1 ? iov[0].iov_base : malloc(avail);
    if (!buf)
        return -ENOMEM;
    r = nbdbe_run_co(n, co, NBDBE_PREAD, buf, false, off, avail,
                     n->info.max_chunk, 0);
    if (iovcnt != 1) {
        if (r == 0) {
            struct iov_slice sl;
            r = iov_slice_init(&sl, iov, iovcnt, 0, avail);
            if (r == 0) {
                iov_from_buf(sl.v, sl.cnt, buf);
                iov_slice_free(&sl);
            }
        }
        free(buf);
    }
    return r;
}

static int nbdbe_flush_now_co(struct nbdbe *n, struct coro *co)
{
    if (!n->info.can_flush)
        return 0;
    struct nbdbe_wait w;
    nbdbe_wait_init(&w, n, co);
    nbdbe_issuing(&w);
    nbdbe_issued(&w, nbd_aio_flush(n->h, nbdbe_cb(&w), 0));
    return nbdbe_wait_co(&w);
}

static int nbdbe_past_end(struct nbdbe *n, uint64_t off, uint64_t len)
{
    if (off + len <= n->info.size)
        return 0;
    log_error("%s: a write at %llu+%llu past the export's end (%llu): an "
              "NBD export cannot grow", n->where, (unsigned long long)off,
              (unsigned long long)len, (unsigned long long)n->info.size);
    return -ENOSPC;
}

static int nbdbe_pwritev_co(struct backend *b, struct coro *co,
                            const struct iovec *iov, int iovcnt, uint64_t off,
                            unsigned flags)
{
    struct nbdbe *n = nb(b);
    uint64_t len = iov_size(iov, iovcnt);
    int r = nbdbe_past_end(n, off, len);
    if (r < 0)
        return r;
    r = nbdbe_ready_co(n, co);
    if (r < 0)
        return r;
    uint8_t *buf = iovcnt == 1 ? iov[0].iov_base : malloc(len);
    if (!buf)
        return -ENOMEM;
    if (iovcnt != 1)
        iov_to_buf(iov, iovcnt, buf);
    bool fua = (flags & BACKEND_FUA) && n->info.can_fua;
    r = nbdbe_run_co(n, co, NBDBE_PWRITE, buf, false, off, len,
                     n->info.max_chunk, fua ? LIBNBD_CMD_FLAG_FUA : 0);
    if (iovcnt != 1)
        free(buf);
    if (r == 0 && (flags & BACKEND_FUA) && !fua)
        r = nbdbe_flush_now_co(n, co);
    return r;
}

static int nbdbe_flush_co(struct backend *b, struct coro *co)
{
    struct nbdbe *n = nb(b);
    int r = nbdbe_ready_co(n, co);
    return r < 0 ? r : nbdbe_flush_now_co(n, co);
}

/* Zeros written as data, for a server that cannot zero. */
static int nbdbe_write_zeros_co(struct nbdbe *n, struct coro *co,
                                uint64_t off, uint64_t len)
{
    if (!n->zeros && !(n->zeros = calloc(1, NBDBE_ZERO_BUF)))
        return -ENOMEM;
    return nbdbe_run_co(n, co, NBDBE_PWRITE, n->zeros, true, off, len,
                        MIN(NBDBE_ZERO_BUF, n->info.max_chunk), 0);
}

static int nbdbe_zero_co(struct backend *b, struct coro *co, uint64_t off,
                         uint64_t len, unsigned flags)
{
    struct nbdbe *n = nb(b);
    int r = nbdbe_past_end(n, off, len);
    if (r < 0)
        return r;
    r = nbdbe_ready_co(n, co);
    if (r < 0)
        return r;
    if (!n->info.can_zero || ((flags & BACKEND_FAST) &&
                              !n->info.can_fast_zero)) {
        if (flags & BACKEND_FAST)
            return -ENOTSUP;
        r = nbdbe_write_zeros_co(n, co, off, len);
        if (r == 0 && (flags & BACKEND_FUA))
            r = nbdbe_flush_now_co(n, co);
        return r;
    }
    bool fua = (flags & BACKEND_FUA) && n->info.can_fua;
    uint32_t f = (fua ? LIBNBD_CMD_FLAG_FUA : 0) |
                 (flags & BACKEND_MAY_TRIM ? 0 : LIBNBD_CMD_FLAG_NO_HOLE) |
                 (flags & BACKEND_FAST ? LIBNBD_CMD_FLAG_FAST_ZERO : 0);
    r = nbdbe_run_co(n, co, NBDBE_ZERO, NULL, true, off, len,
                     nbdbe_effect_max(n), f);
    if (r == -ENOTSUP && (flags & BACKEND_FAST))
        return r;
    if (r == 0 && (flags & BACKEND_FUA) && !fua)
        r = nbdbe_flush_now_co(n, co);
    return r;
}

static int nbdbe_discard_co(struct backend *b, struct coro *co, uint64_t off,
                            uint64_t len, unsigned flags)
{
    struct nbdbe *n = nb(b);
    if (off >= n->info.size)
        return 0;
    len = MIN(len, n->info.size - off);
    int r = nbdbe_ready_co(n, co);
    if (r < 0 || !n->info.can_trim)
        return r;
    bool fua = (flags & BACKEND_FUA) && n->info.can_fua;
    r = nbdbe_run_co(n, co, NBDBE_TRIM, NULL, true, off, len,
                     nbdbe_effect_max(n), fua ? LIBNBD_CMD_FLAG_FUA : 0);
    /* A server without FUA: the trim is made durable by a flush, as a
     * write is. */
    if (r == 0 && (flags & BACKEND_FUA) && !fua)
        r = nbdbe_flush_now_co(n, co);
    return r;
}

/* The first run of extents with one status, from base:allocation. */
struct nbdbe_extents {
    uint64_t len;               /* asked for */
    uint64_t pnum;              /* 0 until the first extent */
    uint32_t flags;             /* LIBNBD_STATE_* of the run */
    bool closed;                /* a different status ended the run */
};

static int nbdbe_extent_cb(void *user_data, const char *metacontext,
                           uint64_t offset, uint32_t *entries,
                           size_t nr_entries, int *error)
{
    struct nbdbe_extents *x = user_data;
    (void)offset;
    (void)error;
    if (strcmp(metacontext, LIBNBD_CONTEXT_BASE_ALLOCATION))
        return 0;
    for (size_t i = 0; i + 1 < nr_entries && !x->closed; i += 2) {
        uint32_t elen = entries[i], eflags = entries[i + 1];
        if (elen == 0)
            continue;
        if (x->pnum && eflags != x->flags) {
            x->closed = true;
            break;
        }
        x->flags = eflags;
        x->pnum = MIN(x->len, x->pnum + elen);
        if (x->pnum == x->len)
            x->closed = true;
    }
    return 0;
}

static int nbdbe_block_status_co(struct backend *b, struct coro *co,
                                 uint64_t off, uint64_t len, uint64_t *pnum,
                                 unsigned *status)
{
    struct nbdbe *n = nb(b);
    len = MIN(len, n->info.size - off);
    int r = nbdbe_ready_co(n, co);
    if (r < 0)
        return r;
    if (!n->info.can_extents) {
        *pnum = len;
        *status = BACKEND_STATUS_DATA;
        return 0;
    }
    struct nbdbe_extents x = {.len = MIN(len, nbdbe_effect_max(n))};
    struct nbdbe_wait w;
    nbdbe_wait_init(&w, n, co);
    nbdbe_issuing(&w);
    nbdbe_issued(&w, nbd_aio_block_status(
        n->h, x.len, off,
        (nbd_extent_callback){.callback = nbdbe_extent_cb, .user_data = &x},
        nbdbe_cb(&w), 0));
    r = nbdbe_wait_co(&w);
    if (r < 0)
        return r;
    if (x.pnum == 0) {
        log_warn("%s: the server sent no base:allocation extent at %llu",
                 n->where, (unsigned long long)off);
        return -EIO;
    }
    *pnum = x.pnum;
    *status = (x.flags & LIBNBD_STATE_HOLE ? 0 : BACKEND_STATUS_DATA) |
              (x.flags & LIBNBD_STATE_ZERO ? BACKEND_STATUS_ZERO : 0);
    return 0;
}

static int nbdbe_truncate_co(struct backend *b, struct coro *co,
                             uint64_t size)
{
    (void)b;
    (void)co;
    (void)size;
    return -ENOTSUP;
}

static int nbdbe_cache_co(struct backend *b, struct coro *co, uint64_t off,
                          uint64_t len)
{
    struct nbdbe *n = nb(b);
    if (!n->info.can_cache || n->state != NBDBE_READY || off >= n->info.size)
        return 0;
    len = MIN(len, n->info.size - off);
    nbdbe_run_co(n, co, NBDBE_CACHE, NULL, true, off, len,
                 nbdbe_effect_max(n), 0);
    return 0; /* a hint */
}

static int nbdbe_reopen(struct backend *b, bool read_only,
                        struct error **errp)
{
    struct nbdbe *n = nb(b);
    if (!read_only && n->info.read_only)
        return error_setf(errp, EROFS, "%s: the NBD server exports it "
                          "read-only", n->where);
    b->read_only = read_only;
    return 0;
}

static void nbdbe_close(struct backend *b)
{
    struct nbdbe *n = nb(b);
    if (n->inflight || !nbdbe_polls_quiet(n)) {
        /* A broken promise above (requests must have finished): keep the
         * memory the ring may still write to. */
        log_error("%s: closed with NBD commands or polls outstanding",
                  n->where);
        return;
    }
    if (n->h) {
        if (n->state == NBDBE_READY)
            nbd_aio_disconnect(n->h, 0);
        nbd_close(n->h);
    }
    nbd_spec_clear(&n->spec);
    free(n->zeros);
    free(n->where);
    free(n->b.name);
    free(n);
}

static const struct backend_ops nbdbe_ops = {
    .name = "nbd",
    .preadv_co = nbdbe_preadv_co,
    .pwritev_co = nbdbe_pwritev_co,
    .flush_co = nbdbe_flush_co,
    .zero_co = nbdbe_zero_co,
    .discard_co = nbdbe_discard_co,
    .block_status_co = nbdbe_block_status_co,
    .truncate_co = nbdbe_truncate_co,
    .cache_co = nbdbe_cache_co,
    .reopen = nbdbe_reopen,
    .close = nbdbe_close,
};

struct backend *nbd_backend_open(struct loop *loop, const char *spec,
                                 const struct backend_open_opts *opts,
                                 struct error **errp)
{
    struct nbdbe *n = calloc(1, sizeof(*n));
    if (!n) {
        error_setf(errp, ENOMEM, "out of memory");
        return NULL;
    }
    if (nbd_spec_parse(spec, &n->spec, errp) < 0) {
        free(n);
        return NULL;
    }
    n->where = nbd_spec_format(&n->spec, false);
    n->b.name = strdup(spec);
    if (!n->where || !n->b.name) {
        error_setf(errp, ENOMEM, "out of memory");
        goto fail;
    }
    n->h = nbdbe_connect(&n->spec, n->where, &n->info, errp);
    if (!n->h)
        goto fail;
    bool ro = opts->read_only;
    if ((!ro || opts->create) && n->info.read_only) {
        error_setf(errp, EROFS, "%s: the NBD server exports it read-only",
                   n->where);
        goto fail;
    }
    if (opts->create && opts->create_size > n->info.size) {
        error_setf(errp, ENOSPC, "%s: the export has %llu bytes, fewer than "
                   "the %llu to create", n->where,
                   (unsigned long long)n->info.size,
                   (unsigned long long)opts->create_size);
        goto fail;
    }
    n->b.ops = &nbdbe_ops;
    n->b.loop = loop;
    n->b.size = n->info.size;
    n->b.align = n->info.min_block;
    n->b.read_only = ro;
    n->b.caps = (n->info.can_zero ? BACKEND_CAN_ZERO : 0) |
                (n->info.can_trim ? BACKEND_CAN_TRIM : 0) |
                (n->info.can_extents ? BACKEND_CAN_EXTENTS : 0);
    n->rd_op.done = nbdbe_rd_done;
    n->wr_op.done = nbdbe_wr_done;
    n->rd_cancel_op.done = nbdbe_rd_cancel_done;
    n->wr_cancel_op.done = nbdbe_wr_cancel_done;
    n->state = NBDBE_READY;
    log_debug("%s: %llu bytes, %s%s%s%s%s", n->where,
              (unsigned long long)n->info.size,
              n->info.read_only ? "read-only" : "read-write",
              n->info.can_fua ? ", fua" : "",
              n->info.can_zero ? ", zero" : "",
              n->info.can_trim ? ", trim" : "",
              n->info.can_extents ? ", base:allocation" : "");
    return &n->b;
fail:
    if (n->h)
        nbd_close(n->h);
    nbd_spec_clear(&n->spec);
    free(n->where);
    free(n->b.name);
    free(n);
    return NULL;
}
