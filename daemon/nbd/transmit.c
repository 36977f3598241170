/* strata — NBD transmission phase: requests in, replies out.
 *
 * Each request is validated by nbd_validate_request() (the one validator),
 * runs in its own coroutine against the export's format node, and ends by
 * queueing its reply; replies go out in completion order.
 *
 * The coroutine always runs on the main loop, which owns every chain.  A
 * connection served on a connection loop (--threads) parses, validates and
 * receives on its own loop, posts the request slot to the main loop
 * (dispatch), and gets it back with the reply built (request_back); the
 * slot is touched by one thread at a time, the posts ordering the two.
 */
#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "conn.h"
#include "log.h"
#include "stats.h"
#include "util.h"

/* Block status: extents gathered per request (REQ_ONE: 1). */
#define BS_MAX_EXTENTS 2048

int nbd_slots_init(struct conn *c)
{
    unsigned n = c->srv->cfg.max_inflight;
    c->slots = calloc(n, sizeof(*c->slots));
    if (!c->slots)
        return -ENOMEM;
    for (unsigned i = n; i-- > 0;) {
        c->slots[i].c = c;
        c->slots[i].next_free = c->free_slots;
        c->free_slots = &c->slots[i];
    }
    return 0;
}

void nbd_slots_free(struct conn *c)
{
    if (!c->slots)
        return;
    for (unsigned i = 0; i < c->srv->cfg.max_inflight; i++) {
        free(c->slots[i].buf);
        nbd_budget_sub(c, c->slots[i].buf ? c->slots[i].buf_cap : 0);
    }
    free(c->slots);
    c->slots = NULL;
    c->free_slots = NULL;
}

static struct nbd_req *req_alloc(struct conn *c, const struct nbd_request *hdr)
{
    struct nbd_req *r = c->free_slots;
    assert(r); /* input stops at max_inflight */
    c->free_slots = r->next_free;
    c->inflight++;
    r->hdr = *hdr;
    r->error = 0;
    r->errmsg = NULL;
    r->extra = NULL;
    r->accounted = 0;
    r->remote = false;
    r->reply_ready = false;
    return r;
}

/* Ensures r->buf holds len bytes (aligned for direct I/O). */
static int req_buffer(struct nbd_req *r, uint64_t len)
{
    struct conn *c = r->c;
    if (r->buf && r->buf_cap >= len)
        return 0;
    if (r->buf) {
        /* too small: a kept buffer gives its budget back */
        if (r->buf_kept)
            c->kept -= r->buf_cap;
        free(r->buf);
        nbd_budget_sub(c, r->buf_cap);
        r->buf = NULL;
        r->buf_cap = 0;
    }
    void *p;
    if (posix_memalign(&p, 4096, len ? (size_t)len : 1) != 0)
        return -ENOMEM;
    r->buf = p;
    r->buf_cap = (size_t)len;
    nbd_budget_add(c, r->buf_cap);
    r->buf_kept = len <= REQ_KEEP_MAX && c->kept + len <= CONN_KEEP_BUDGET;
    if (r->buf_kept)
        c->kept += len;
    return 0;
}

void nbd_req_release(struct nbd_req *r)
{
    struct conn *c = r->c;
    free(r->extra);
    r->extra = NULL;
    if (r->buf && !r->buf_kept) {
        free(r->buf);
        nbd_budget_sub(c, r->buf_cap);
        r->buf = NULL;
        r->buf_cap = 0;
    }
    c->buffered -= r->accounted;
    r->accounted = 0;
    r->next_free = c->free_slots;
    c->free_slots = r;
    c->inflight--;
    conn_kick(c); /* input may have been held back */
}

static void req_sent(struct stream_item *si)
{
    struct nbd_req *r = container_of(si, struct nbd_req, si);
    nbd_req_release(r);
}

/* ---- replies ---- */

static void queue_reply(struct nbd_req *r, int niov)
{
    r->si.iov = r->iov;
    r->si.niov = niov;
    r->si.done = req_sent;
    if (r->remote)
        r->reply_ready = true; /* sent by the connection's loop */
    else
        conn_send(r->c, &r->si);
}

/* An error: simple reply, or an ERROR chunk with a message. */
static void reply_error(struct nbd_req *r)
{
    struct conn *c = r->c;
    const struct nbd_request *h = &r->hdr;
    if (!c->structured) {
        size_t n = nbd_build_simple_reply(r->hbuf, h->cookie, r->error);
        r->iov[0] = (struct iovec){r->hbuf, n};
        queue_reply(r, 1);
        return;
    }
    size_t hs = nbd_chunk_header_size(c->extended);
    size_t pl = nbd_build_error_payload(r->hbuf + hs, REQ_HDR_BUF - hs,
                                        r->error, r->errmsg ? r->errmsg : "");
    nbd_build_chunk_header(r->hbuf, c->extended, NBD_REPLY_FLAG_DONE,
                           NBD_REPLY_TYPE_ERROR, h->cookie, h->offset, pl);
    r->iov[0] = (struct iovec){r->hbuf, hs + pl};
    queue_reply(r, 1);
}

/* Success without payload. */
static void reply_ok(struct nbd_req *r)
{
    struct conn *c = r->c;
    const struct nbd_request *h = &r->hdr;
    size_t n;
    if (c->extended)
        n = nbd_build_chunk_header(r->hbuf, true, NBD_REPLY_FLAG_DONE,
                                   NBD_REPLY_TYPE_NONE, h->cookie, h->offset, 0);
    else
        n = nbd_build_simple_reply(r->hbuf, h->cookie, 0);
    r->iov[0] = (struct iovec){r->hbuf, n};
    queue_reply(r, 1);
}

static void reply_read(struct nbd_req *r)
{
    struct conn *c = r->c;
    const struct nbd_request *h = &r->hdr;
    if (!c->structured) {
        size_t n = nbd_build_simple_reply(r->hbuf, h->cookie, 0);
        r->iov[0] = (struct iovec){r->hbuf, n};
        r->iov[1] = (struct iovec){r->buf, (size_t)h->length};
        queue_reply(r, 2);
        return;
    }
    size_t hs = nbd_chunk_header_size(c->extended);
    nbd_build_chunk_header(r->hbuf, c->extended, NBD_REPLY_FLAG_DONE,
                           NBD_REPLY_TYPE_OFFSET_DATA, h->cookie, h->offset,
                           8 + h->length);
    be_put64(r->hbuf + hs, h->offset);
    r->iov[0] = (struct iovec){r->hbuf, hs + 8};
    r->iov[1] = (struct iovec){r->buf, (size_t)h->length};
    queue_reply(r, 2);
}

/* ---- commands ---- */

/* The extents of bitmap bm over [off, end): runs of dirty (NBD state
 * bit 0, QEMU's NBD_STATE_DIRTY) and clean chunks, at most max of them.
 * Bytes past the bitmap's size (its node is smaller than the export's
 * top) read as clean. */
static uint32_t bitmap_extents(const struct fmt_bitmap *bm, uint64_t off,
                               uint64_t end, unsigned max,
                               struct nbd_extent *out)
{
    uint32_t n = 0;
    uint64_t pos = off;
    while (pos < end && n < max) {
        bool dirty = false;
        uint64_t len = end - pos;
        if (pos < bm->bits.size)
            len = dbitmap_run(&bm->bits, pos, end - pos, &dirty);
        uint64_t flags = dirty ? 1 : 0;
        if (n && out[n - 1].flags == flags)
            out[n - 1].length += len;
        else
            out[n++] = (struct nbd_extent){len, flags};
        pos += len;
    }
    return n;
}

static int do_block_status_co(struct nbd_req *r, struct coro *co)
{
    struct conn *c = r->c;
    struct export *e = c->exp;
    struct fmt_node *n = export_root(e);
    const struct nbd_request *h = &r->hdr;
    bool one = h->flags & NBD_CMD_FLAG_REQ_ONE;
    uint64_t off = h->offset;
    /* nbd_validate_request() refused a range past the end of the export
     * (or one that wraps), as for every other command. */
    uint64_t end = off + h->length;
    unsigned max = one ? 1 : BS_MAX_EXTENTS;

    unsigned ids[META_MAX_ID] = {0}; /* ids 1..META_MAX_ID: nctx <= META_MAX_ID */
    unsigned nctx = 0;
    for (unsigned id = META_BASE_ALLOCATION; id <= META_MAX_ID; id++)
        if (c->meta & (1u << id))
            ids[nctx++] = id;
    struct nbd_extent *out[META_MAX_ID] = {NULL};
    uint32_t nout[META_MAX_ID] = {0};
    int ret = 0;

    /* The chain's block status, when a context needs it. */
    struct fmt_extent *ext = NULL;
    unsigned cnt = 0;
    if (c->meta & ((1u << META_BASE_ALLOCATION) | (1u << META_ALLOCATION_DEPTH))) {
        ext = malloc(sizeof(*ext) * max);
        if (!ext)
            return -ENOMEM;
        uint64_t pos = off;
        while (pos < end && cnt < max) {
            ret = fmt_block_status_co(n, co, pos, end - pos, &ext[cnt]);
            if (ret < 0) {
                free(ext);
                return ret;
            }
            pos += ext[cnt].len;
            cnt++;
        }
    }

    /* Per context, merge neighbours with equal status. */
    size_t total = 0;
    for (unsigned k = 0; k < nctx; k++) {
        out[k] = malloc(sizeof(struct nbd_extent) * (ids[k] >= META_DIRTY_BITMAP ? max : cnt));
        if (!out[k]) {
            ret = -ENOMEM;
            goto out;
        }
        if (ids[k] >= META_DIRTY_BITMAP) {
            nout[k] = bitmap_extents(e->bitmaps[ids[k] - META_DIRTY_BITMAP],
                                     off, end, max, out[k]);
        } else {
            for (unsigned i = 0; i < cnt; i++) {
                uint64_t flags;
                if (ids[k] == META_BASE_ALLOCATION)
                    flags = ((ext[i].flags & FMT_EXT_HOLE) ? NBD_STATE_HOLE : 0) |
                            ((ext[i].flags & FMT_EXT_ZERO) ? NBD_STATE_ZERO : 0);
                else
                    flags = ext[i].depth;
                if (nout[k] && out[k][nout[k] - 1].flags == flags)
                    out[k][nout[k] - 1].length += ext[i].len;
                else
                    out[k][nout[k]++] = (struct nbd_extent){ext[i].len, flags};
            }
        }
        total += nbd_chunk_header_size(c->extended) +
                 nbd_block_status_size(c->extended, nout[k]);
    }

    /* One buffer, [hdr payload][hdr payload]..., sent as one iovec. */
    uint8_t *buf = malloc(total);
    if (!buf) {
        ret = -ENOMEM;
        goto out;
    }
    size_t pos_b = 0;
    size_t hs = nbd_chunk_header_size(c->extended);
    for (unsigned k = 0; k < nctx; k++) {
        uint8_t *hdr = buf + pos_b;
        size_t pl = nbd_build_block_status(hdr + hs, c->extended, ids[k],
                                           out[k], nout[k], c->session.min_block);
        nbd_build_chunk_header(hdr, c->extended,
                               k + 1 == nctx ? NBD_REPLY_FLAG_DONE : 0,
                               c->extended ? NBD_REPLY_TYPE_BLOCK_STATUS_EXT
                                           : NBD_REPLY_TYPE_BLOCK_STATUS,
                               h->cookie, h->offset, pl);
        pos_b += hs + pl;
    }
    r->iov[0] = (struct iovec){buf, pos_b};
    r->extra = buf;
    queue_reply(r, 1);
    ret = 1; /* reply queued */
out:
    for (unsigned k = 0; k < nctx; k++)
        free(out[k]);
    free(ext);
    return ret;
}

/* A guest write, write-zeroes or trim, with the export's write notifiers
 * (jobs) told before and after. */
static int guest_write_co(struct nbd_req *r, struct coro *co,
                          const struct export_write_req *wr)
{
    struct export *e = r->c->exp;
    struct fmt_node *n = export_root(e);
    int ret = e->write_notifiers ? export_notify_before_co(e, co, wr) : 0;
    if (ret == 0) {
        switch (wr->kind) {
        case EXPORT_WRITE:
            ret = fmt_pwritev_co(n, co, wr->iov, wr->iovcnt, wr->offset,
                                 wr->flags);
            break;
        case EXPORT_WRITE_ZEROES:
            ret = fmt_zero_co(n, co, wr->offset, wr->length, wr->flags);
            break;
        case EXPORT_TRIM:
            /* With FUA the node makes the trim durable itself, in its
             * own image (not a writable backing node below). */
            ret = fmt_discard_co(n, co, wr->offset, wr->length,
                                 wr->flags & FMT_FUA);
            break;
        }
    }
    if (e->write_notifiers)
        ret = export_notify_after_co(e, co, wr, ret);
    return ret;
}

/* Runs one request; returns 1 if it queued its own reply, 0 for a plain
 * success, -errno on failure. */
static int run_request_co(struct nbd_req *r, struct coro *co)
{
    struct fmt_node *n = export_root(r->c->exp);
    const struct nbd_request *h = &r->hdr;
    bool fua = h->flags & NBD_CMD_FLAG_FUA;
    struct iovec iov = {r->buf, (size_t)h->length};

    switch (h->type) {
    case NBD_CMD_READ: {
        int ret = fmt_preadv_co(n, co, &iov, 1, h->offset);
        if (ret < 0)
            return ret;
        reply_read(r);
        return 1;
    }
    case NBD_CMD_WRITE: {
        struct export_write_req wr = {
            .kind = EXPORT_WRITE, .offset = h->offset, .length = h->length,
            .iov = &iov, .iovcnt = 1, .flags = fua ? FMT_FUA : 0,
        };
        return guest_write_co(r, co, &wr);
    }
    case NBD_CMD_FLUSH:
        return fmt_flush_co(n, co);
    case NBD_CMD_TRIM: {
        struct export_write_req wr = {
            .kind = EXPORT_TRIM, .offset = h->offset, .length = h->length,
            .flags = fua ? FMT_FUA : 0,
        };
        return guest_write_co(r, co, &wr);
    }
    case NBD_CMD_WRITE_ZEROES: {
        struct export_write_req wr = {
            .kind = EXPORT_WRITE_ZEROES, .offset = h->offset,
            .length = h->length,
            .flags = (fua ? FMT_FUA : 0) |
                     ((h->flags & NBD_CMD_FLAG_NO_HOLE) ? 0 : FMT_MAY_TRIM) |
                     ((h->flags & NBD_CMD_FLAG_FAST_ZERO) ? FMT_FAST : 0),
        };
        return guest_write_co(r, co, &wr);
    }
    case NBD_CMD_CACHE: {
        if (h->length == 0)
            return 0;
        uint64_t len = h->length;
        if (h->offset + len > n->size)
            len = n->size - h->offset;
        return fmt_cache_co(n, co, h->offset, len);
    }
    case NBD_CMD_BLOCK_STATUS:
        return do_block_status_co(r, co);
    }
    return -EINVAL; /* unreachable: validated */
}

/* The statistics class of a request (STATS_OP__MAX: an unknown command). */
static enum stats_op request_stats_op(const struct nbd_request *h)
{
    switch (h->type) {
    case NBD_CMD_READ: return STATS_OP_READ;
    case NBD_CMD_WRITE: return STATS_OP_WRITE;
    case NBD_CMD_FLUSH: return STATS_OP_FLUSH;
    case NBD_CMD_TRIM: return STATS_OP_UNMAP;
    case NBD_CMD_WRITE_ZEROES: return STATS_OP_ZERO;
    case NBD_CMD_CACHE: return STATS_OP_CACHE;
    case NBD_CMD_BLOCK_STATUS: return STATS_OP_BLOCK_STATUS;
    default: return STATS_OP__MAX;
    }
}

static void request_co(struct coro *co, void *opaque)
{
    struct nbd_req *r = opaque;
    struct conn *c = r->c;
    struct export_stats *st = &c->exp->stats;
    uint64_t t0 = stats_request_start(st);
    /* Waits here while the export is quiesced (snapshot, pivot): the
     * request then runs on the chain top of that moment. */
    uint64_t entered = export_enter_co(c->exp, co);
    int ret = run_request_co(r, co);
    bool synced = r->hdr.type == NBD_CMD_FLUSH ||
                  (r->hdr.flags & NBD_CMD_FLAG_FUA);
    /* A reply that says "durable" waits while the state file does not
     * name the chain it made durable yet (a pivot in progress). */
    if (synced && ret == 0)
        ret = export_gate_wait_co(c->exp, co);
    export_leave(c->exp, entered, synced);
    enum stats_op sop = request_stats_op(&r->hdr);
    stats_request_done(st, sop, t0, ret, r->hdr.offset,
                       sop == STATS_OP_FLUSH || sop == STATS_OP_BLOCK_STATUS
                           ? 0 : r->hdr.length);
    if (!r->remote)
        c->running--;
    if (ret < 0) {
        r->error = nbd_errno_to_nbd(-ret);
        r->errmsg = strerror(-ret);
        if (ret != -ENOTSUP || !(r->hdr.flags & NBD_CMD_FLAG_FAST_ZERO))
            log_debug("conn %llu: %s at %llu+%llu failed: %s",
                      (unsigned long long)c->id, nbd_cmd_name(r->hdr.type),
                      (unsigned long long)r->hdr.offset,
                      (unsigned long long)r->hdr.length, strerror(-ret));
        reply_error(r);
    } else if (ret == 0) {
        reply_ok(r);
    }
    if (r->remote) {
        /* back to the connection's loop, which sends the reply; nothing
         * of c or r is touched here from now on */
        loop_post(c->loop, &r->msg);
        return;
    }
    /* the reply owns the slot now; conn_send drops it if the conn is dead */
    conn_kick(c);
}

/* Connection loop: a request came back from the main loop, its reply
 * built. */
static void request_back(struct loop_msg *m)
{
    struct nbd_req *r = container_of(m, struct nbd_req, msg);
    struct conn *c = r->c;
    assert(r->reply_ready);
    r->remote = false;
    c->running--;
    /* the reply owns the slot now; conn_send drops it if the conn is dead */
    conn_send(c, &r->si);
    conn_kick(c);
}

/* Main loop: a request of a connection on a connection loop. */
static void request_home(struct loop_msg *m)
{
    struct nbd_req *r = container_of(m, struct nbd_req, msg);
    struct coro *co = coro_create(loop_coro_pool(r->c->srv->loop), request_co,
                                  r);
    if (!co) {
        r->error = NBD_ENOMEM;
        r->errmsg = "out of memory";
        reply_error(r); /* built here, sent there */
        r->msg.fn = request_back;
        loop_post(r->c->loop, &r->msg);
        return;
    }
    r->msg.fn = request_back;
    coro_enter(co);
}

static void dispatch(struct conn *c, struct nbd_req *r)
{
    if (c->worker) {
        c->running++;
        r->remote = true;
        r->msg.fn = request_home;
        loop_post(c->srv->loop, &r->msg);
        return;
    }
    struct coro *co = coro_create(loop_coro_pool(c->loop), request_co, r);
    if (!co) {
        r->error = NBD_ENOMEM;
        r->errmsg = "out of memory";
        reply_error(r);
        return;
    }
    c->running++;
    coro_enter(co);
}

void nbd_payload_complete(struct conn *c)
{
    struct nbd_req *r = c->payload_req;
    c->payload_req = NULL;
    c->payload_got = 0;
    dispatch(c, r);
}

/* Refuses r.  A request with a payload (a write) is answered only after
 * its payload has been read and dropped: the reply must not overtake the
 * client's own send of that request. */
static void refuse(struct conn *c, struct nbd_req *r, uint64_t payload_len)
{
    if (payload_len == 0) {
        reply_error(r);
        return;
    }
    assert(!c->discard_left && !c->discard_req);
    c->discard_left = payload_len;
    c->discard_req = r;
}

/* Parses and starts as many requests as the bounds allow.  Returns true if
 * it made progress and may be called again. */
bool nbd_transmit_input(struct conn *c)
{
    const struct server_config *cfg = &c->srv->cfg;

    /* Payload of a refused request: read and drop, then answer. */
    if (c->discard_left) {
        size_t avail = c->st.rend - c->st.rstart;
        size_t n = avail < c->discard_left ? avail : (size_t)c->discard_left;
        c->st.rstart += n;
        c->discard_left -= n;
        if (c->discard_left == 0 && c->discard_req) {
            struct nbd_req *r = c->discard_req;
            c->discard_req = NULL;
            reply_error(r);
        }
        return c->discard_left == 0 && n > 0;
    }
    if (c->payload_req)
        return false;
    if (c->inflight >= cfg->max_inflight || c->buffered >= cfg->max_buffered)
        return false;

    struct nbd_request h;
    ssize_t n = nbd_parse_request(c->st.rbuf + c->st.rstart, c->st.rend - c->st.rstart,
                                  c->extended, &h);
    if (n == 0)
        return false;
    if (n < 0) {
        log_info("conn %llu: bad request magic: disconnecting",
                 (unsigned long long)c->id);
        conn_abort(c, "bad request magic");
        return false;
    }
    struct nbd_validation v = nbd_validate_request(&h, &c->session);
    if (v.verdict == NBD_VERDICT_OK && c->state == CONN_TRANSMIT &&
        (h.type == NBD_CMD_READ || h.type == NBD_CMD_WRITE)) {
        if (!nbd_budget_admit(c, h.length))
            return false; /* the header stays unread until memory is back */
    } else {
        nbd_budget_forget(c); /* needs no new buffer: not waiting any more */
    }
    c->st.rstart += (size_t)n;
    c->requests_seen++;
    c->cmd_count[h.type <= NBD_CMD_BLOCK_STATUS ? h.type
                                                : NBD_CMD_BLOCK_STATUS + 1]++;
    if (h.type == NBD_CMD_WRITE && (h.flags & NBD_CMD_FLAG_FUA))
        c->fua_writes++;

    switch (v.verdict) {
    case NBD_VERDICT_DISCONNECT:
        log_info("conn %llu: %s: %s: disconnecting", (unsigned long long)c->id,
                 nbd_cmd_name(h.type), v.reason);
        conn_abort(c, v.reason);
        return false;
    case NBD_VERDICT_DISC:
        /* the counts let tests see what a client sent, and how it spread
         * its requests over connections (the kernel's nbd-client -C N) */
        log_debug("conn %llu: NBD_CMD_DISC after %llu requests: read %llu, "
                  "write %llu (fua %llu), flush %llu, trim %llu, other %llu",
                  (unsigned long long)c->id,
                  (unsigned long long)(c->requests_seen - 1),
                  (unsigned long long)c->cmd_count[NBD_CMD_READ],
                  (unsigned long long)c->cmd_count[NBD_CMD_WRITE],
                  (unsigned long long)c->fua_writes,
                  (unsigned long long)c->cmd_count[NBD_CMD_FLUSH],
                  (unsigned long long)c->cmd_count[NBD_CMD_TRIM],
                  (unsigned long long)(c->requests_seen - 1 -
                      c->cmd_count[NBD_CMD_READ] -
                      c->cmd_count[NBD_CMD_WRITE] -
                      c->cmd_count[NBD_CMD_FLUSH] -
                      c->cmd_count[NBD_CMD_TRIM]));
        conn_close_gracefully(c);
        return false;
    case NBD_VERDICT_ERROR: {
        struct nbd_req *r = req_alloc(c, &h);
        stats_request_invalid(&c->exp->stats, request_stats_op(&h));
        r->error = v.error;
        r->errmsg = v.reason;
        log_debug("conn %llu: %s refused: %s", (unsigned long long)c->id,
                  nbd_cmd_name(h.type), v.reason);
        refuse(c, r, v.payload_len);
        return true;
    }
    case NBD_VERDICT_OK:
        if (c->state == CONN_DRAINING) {
            struct nbd_req *r = req_alloc(c, &h);
            r->error = NBD_ESHUTDOWN;
            r->errmsg = "the server is shutting down";
            refuse(c, r, v.payload_len);
            return true;
        }
        break;
    }

    struct nbd_req *r = req_alloc(c, &h);
    uint64_t need = 0;
    if (h.type == NBD_CMD_READ || h.type == NBD_CMD_WRITE)
        need = h.length;
    if (need) {
        if (req_buffer(r, need) < 0) {
            r->error = NBD_ENOMEM;
            r->errmsg = "out of memory";
            refuse(c, r, v.payload_len);
            return true;
        }
        r->accounted = need;
        c->buffered += need;
    }
    if (v.payload_len) {
        size_t avail = c->st.rend - c->st.rstart;
        size_t take = avail < v.payload_len ? avail : (size_t)v.payload_len;
        memcpy(r->buf, c->st.rbuf + c->st.rstart, take);
        c->st.rstart += take;
        if (take < v.payload_len) {
            c->payload_req = r;
            c->payload_got = take;
            return true; /* the rest is received into r->buf */
        }
    }
    dispatch(c, r);
    return true;
}
