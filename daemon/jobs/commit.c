/* strata — block-commit: copy the layers from top down to base into base,
 * then take them out of the chain.  See chain.h for the crash-safety order.
 *
 * Intermediate commit (top below the live top): nothing writes to the
 * layers top..base meanwhile, so one pass copies every range allocated
 * above base; then the image above top is re-pointed at base.
 *
 * Active commit (top is the live top): a write notifier marks every guest
 * write, write-zeroes and trim in a dirty bitmap.  After the first pass
 * over the whole disk the notifier also copies the ranges a guest request
 * dirtied before that request completes ("synchronous" mode), so the
 * number of dirty chunks can only shrink, whatever the guest does: the job
 * converges, reports READY and stays there until block-job-complete; then,
 * with the export quiesced, the last dirty chunks are copied and base
 * becomes the export's top; base is flushed and named in the state file
 * after the quiesce, while FLUSH and FUA replies wait for that (see
 * commit_pivot_co).
 *
 * What is copied: the bitmap has one bit per COMMIT_GRAN bytes of the
 * disk; a set bit means "base may differ from the guest-visible content
 * of top here".  A chunk is always copied whole, reading top (the guest's
 * view, through the layers down to base and below) and writing base:
 * where top's view is a zero run, base gets a zero write (zero clusters),
 * else the data.  Copying a range that was not allocated above base
 * rewrites base's own content and changes nothing.
 *
 * Races: a copy takes a range lock on its chunks (copies never overlap),
 * clears their bits, then reads top; the notifier sets the bits after the
 * guest's request reached top.  So a guest write that lands after a copy
 * read the old data always leaves its bit set behind that copy.
 *
 * Parallelism: the job coroutine walks the bitmap and hands runs of up to
 * COMMIT_CHUNK bytes to up to COMMIT_WORKERS copy coroutines, which take
 * their bounce buffers from the job's pool; the speed limit is applied as
 * runs are handed out.  Copies done by guest requests (synchronous mode) are not rate
 * limited: they are part of the guest's write.
 */
#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "chain.h"
#include "log.h"

#define COMMIT_GRAN    (UINT64_C(64) << 10)  /* bitmap granularity */
#define COMMIT_CHUNK   (UINT64_C(1) << 20)   /* largest single copy */
#define COMMIT_WORKERS 4                     /* copies in flight */
#define COMMIT_BUF_ALIGN 4096

/* A bounce buffer of COMMIT_CHUNK bytes, kept for reuse: a fresh one is
 * an mmap whose every page faults in on first use and whose munmap flushes
 * TLBs, which costs more than the copy itself. */
struct commit_buf {
    struct commit_buf *next;
};
#define COMMIT_BUFS_KEPT (COMMIT_WORKERS + 4)

/* A copy in progress: its chunks are locked against other copies. */
struct commit_range {
    uint64_t start, end;
    struct commit_range *next;
};

struct commit {
    struct job *job;
    struct server *srv;
    struct export *e;
    struct blockdev *b;
    struct fmt_node *top;          /* highest layer committed */
    struct fmt_node *base;         /* receives the data */
    struct fmt_node *above;        /* layer whose backing is top (NULL:
                                      active commit) */
    struct fmt_node *last;         /* layer whose backing is base */
    unsigned depth_limit;          /* allocation depths 1..this (seen from
                                      top) are above base */
    bool active;
    char *backing_name;            /* intermediate: recorded in above */
    uint64_t size;                 /* top's virtual size */

    /* dirty bitmap: bit i covers [i * GRAN, (i + 1) * GRAN) */
    uint64_t *bits;
    uint64_t nbits;
    uint64_t ndirty;

    struct commit_buf *bufs;       /* free bounce buffers */
    unsigned nbufs;

    struct commit_range *ranges;   /* copies in progress */
    struct co_queue range_q;       /* copies waiting for an overlap */

    unsigned workers;              /* copy coroutines alive */
    struct co_queue worker_q;      /* the job waiting for one to end */
    int err;                       /* first copy error not yet handled */
    bool err_read;
    uint64_t err_start, err_end;

    bool sync_mode;                /* guest requests copy their chunks */
    bool base_reopened;            /* we made base read-write */
    bool notifier_added;
    bool relinked;                 /* intermediate: above -> base done */
    bool pivoted;                  /* active: base is the export's top */
    struct export_write_notifier wn;
    uint64_t t_start;
};

/* ---- the dirty bitmap ---- */

static bool bit_get(const struct commit *c, uint64_t i)
{
    return c->bits[i / 64] & (UINT64_C(1) << (i % 64));
}

/* Marks the chunks touching [off, off + len) dirty. */
static void commit_mark(struct commit *c, uint64_t off, uint64_t len)
{
    if (off >= c->size || len == 0)
        return;
    if (len > c->size - off)
        len = c->size - off;
    uint64_t first = off / COMMIT_GRAN, last = (off + len - 1) / COMMIT_GRAN;
    for (uint64_t i = first; i <= last; i++) {
        if (!bit_get(c, i)) {
            c->bits[i / 64] |= UINT64_C(1) << (i % 64);
            c->ndirty++;
            uint64_t end = (i + 1) * COMMIT_GRAN;
            job_progress_increase_total(c->job, (end < c->size ? end : c->size) -
                                                i * COMMIT_GRAN);
        }
    }
}

/* Clears the chunks of [start, end) (chunk-aligned start). */
static void commit_clear(struct commit *c, uint64_t start, uint64_t end)
{
    for (uint64_t i = start / COMMIT_GRAN; i * COMMIT_GRAN < end; i++) {
        if (bit_get(c, i)) {
            c->bits[i / 64] &= ~(UINT64_C(1) << (i % 64));
            c->ndirty--;
        }
    }
}

/* The first dirty chunk at or after bit from, or nbits. */
static uint64_t next_dirty(const struct commit *c, uint64_t from)
{
    uint64_t i = from;
    while (i < c->nbits) {
        uint64_t w = c->bits[i / 64] >> (i % 64);
        if (w)
            return i + (uint64_t)__builtin_ctzll(w) < c->nbits
                       ? i + (uint64_t)__builtin_ctzll(w) : c->nbits;
        i = (i / 64 + 1) * 64;
    }
    return c->nbits;
}

/* ---- copying ---- */

static void *buf_get(struct commit *c)
{
    struct commit_buf *b = c->bufs;
    if (b) {
        c->bufs = b->next;
        c->nbufs--;
        return b;
    }
    void *p;
    return posix_memalign(&p, COMMIT_BUF_ALIGN, COMMIT_CHUNK) ? NULL : p;
}

static void buf_put(struct commit *c, void *p)
{
    if (!p)
        return;
    if (c->nbufs >= COMMIT_BUFS_KEPT) {
        free(p);
        return;
    }
    struct commit_buf *b = p;
    b->next = c->bufs;
    c->bufs = b;
    c->nbufs++;
}

static bool ranges_overlap(const struct commit *c, uint64_t start, uint64_t end)
{
    for (const struct commit_range *r = c->ranges; r; r = r->next)
        if (r->start < end && start < r->end)
            return true;
    return false;
}

/* Copies the guest-visible content of [start, end) (chunk-aligned start;
 * end chunk-aligned or the disk's end) from top to base, with a bounce
 * buffer from the job's pool when data must move.  On failure the chunks
 * are dirty again. */
static int commit_copy_co(struct commit *c, struct coro *co, uint64_t start,
                          uint64_t end, bool *is_read)
{
    struct commit_range me = {start, end, NULL};
    while (ranges_overlap(c, start, end))
        co_queue_wait_co(&c->range_q, co);
    me.next = c->ranges;
    c->ranges = &me;
    commit_clear(c, start, end);

    void *buf = NULL;
    int r = 0;
    uint64_t pos = start;
    *is_read = false;
    while (pos < end && r == 0) {
        struct fmt_extent ext;
        r = fmt_block_status_co(c->top, co, pos, end - pos, &ext);
        if (r < 0) {
            *is_read = true;
            break;
        }
        uint64_t n = ext.len;
        if (ext.flags & FMT_EXT_ZERO) {
            r = fmt_zero_co(c->base, co, pos, n, FMT_MAY_TRIM);
        } else {
            if (n > COMMIT_CHUNK)
                n = COMMIT_CHUNK;
            if (!buf && !(buf = buf_get(c))) {
                r = -ENOMEM;
                break;
            }
            struct iovec v = {buf, (size_t)n};
            r = fmt_preadv_co(c->top, co, &v, 1, pos);
            if (r < 0)
                *is_read = true;
            else
                r = fmt_pwritev_co(c->base, co, &v, 1, pos, 0);
        }
        if (r == 0) {
            pos += n;
            job_progress_update(c->job, n);
        }
    }
    buf_put(c, buf);
    if (r < 0)
        commit_mark(c, start, end - start);

    for (struct commit_range **pp = &c->ranges; *pp; pp = &(*pp)->next) {
        if (*pp == &me) {
            *pp = me.next;
            break;
        }
    }
    co_queue_wake_all(&c->range_q);
    return r;
}

struct commit_worker {
    struct commit *c;
    uint64_t start, end;
};

static void commit_worker_co(struct coro *co, void *arg)
{
    struct commit_worker *w = arg;
    struct commit *c = w->c;
    bool is_read = false;
    int r = commit_copy_co(c, co, w->start, w->end, &is_read);
    if (r < 0 && c->err == 0) {
        c->err = r;
        c->err_read = is_read;
        c->err_start = w->start;
        c->err_end = w->end;
    }
    free(w);
    c->workers--;
    co_queue_wake_all(&c->worker_q);
}

/* The longest dirty run starting at bit i (at most COMMIT_CHUNK bytes). */
static uint64_t run_end(const struct commit *c, uint64_t i)
{
    uint64_t j = i;
    while (j < c->nbits && bit_get(c, j) && (j - i) * COMMIT_GRAN < COMMIT_CHUNK)
        j++;
    uint64_t end = j * COMMIT_GRAN;
    return end < c->size ? end : c->size;
}

/* ---- the write notifier (active commit) ---- */

static int commit_after_co(struct export_write_notifier *n, struct coro *co,
                           const struct export_write_req *req, int ret)
{
    struct commit *c = n->opaque;
    commit_mark(c, req->offset, req->length);
    if (!c->sync_mode)
        return ret;
    /* Copy what this request dirtied before it completes, so that the
     * dirty set cannot grow faster than the job copies.  A failure leaves
     * the chunks dirty for the job; the guest's write itself succeeded. */
    uint64_t start = req->offset / COMMIT_GRAN * COMMIT_GRAN;
    uint64_t end = req->offset + req->length;
    end = (end + COMMIT_GRAN - 1) / COMMIT_GRAN * COMMIT_GRAN;
    if (end > c->size)
        end = c->size;
    bool is_read;
    int r = commit_copy_co(c, co, start, end, &is_read);
    if (r < 0)
        log_debug("job '%s': mirroring %llu+%llu failed: %s (left dirty)",
                  c->job->id, (unsigned long long)start,
                  (unsigned long long)(end - start), strerror(-r));
    return ret;
}

/* ---- the job ---- */

static struct commit *commit_of(struct job *job)
{
    return job->opaque;
}

/* Makes base writable and large enough, and (active) installs the
 * notifier.  Under one quiesce: reopening a node needs no request in
 * flight on it, and the notifier must see every request whole. */
static int commit_setup_co(struct commit *c, struct coro *co,
                           struct error **errp)
{
    int r = 0;
    /* The checks before the base takes writes (qcow2: reading all its
     * metadata) run first, while the guest goes on. */
    if (c->base->read_only)
        fmt_prepare_writable_co(c->base, co);
    export_quiesce_co(c->e, co);
    if (c->base->read_only) {
        r = fmt_reopen_co(c->base, co, false, errp);
        if (r == 0)
            c->base_reopened = true;
    }
    if (r == 0 && c->base->size < c->size)
        r = fmt_grow_co(c->base, co, c->size, errp);
    if (r == 0 && c->active) {
        c->wn.after_co = commit_after_co;
        c->wn.opaque = c;
        export_add_write_notifier(c->e, &c->wn);
        c->notifier_added = true;
    }
    uint64_t stall = export_resume(c->e);
    log_debug("job '%s': set up (export stalled %.3f ms)", c->job->id,
              stall / 1e6);
    return r;
}

/* Marks every chunk top may show differently from base: ranges allocated
 * in a layer above base, and everything past the smallest layer from top
 * down to base (a short layer hides whatever lies below it there). */
static int commit_scan_co(struct commit *c, struct coro *co)
{
    uint64_t short_end = c->size;
    for (struct fmt_node *x = c->top; x; x = x->backing) {
        if (x->size < short_end)
            short_end = x->size;
        if (x == c->base)
            break;
    }
    uint64_t off = 0;
    unsigned n = 0;
    while (off < short_end) {
        struct fmt_extent ext;
        int r = fmt_block_status_co(c->top, co, off, short_end - off, &ext);
        if (r < 0)
            return r;
        if (ext.depth >= 1 && ext.depth <= c->depth_limit)
            commit_mark(c, off, ext.len);
        off += ext.len;
        if (++n % 1024 == 0) {
            /* let guest requests in; also a pause and cancel point */
            job_sleep_co(c->job, co, 1);
            if (job_is_cancelled(c->job))
                return -ECANCELED;
        }
    }
    if (short_end < c->size)
        commit_mark(c, short_end, c->size - short_end);
    return 0;
}

/* Waits for every copy coroutine to end. */
static void commit_drain_co(struct commit *c, struct coro *co)
{
    while (c->workers > 0)
        co_queue_wait_co(&c->worker_q, co);
}

static int commit_run_co(struct job *job, struct coro *co, struct error **errp)
{
    struct commit *c = commit_of(job);
    int r = commit_setup_co(c, co, errp);
    if (r < 0)
        return r;
    r = commit_scan_co(c, co);
    if (r < 0)
        return r == -ECANCELED ? r : error_setf(errp, -r, "%s: block status: %s",
                                                c->top->filename, strerror(-r));
    log_info("job '%s': %llu bytes to copy from %s into %s", job->id,
             (unsigned long long)(c->ndirty * COMMIT_GRAN), c->top->filename,
             c->base->filename);

    uint64_t cursor = 0;
    for (;;) {
        if (job_is_cancelled(job)) {
            r = -ECANCELED;
            break;
        }
        if (c->err) {
            commit_drain_co(c, co);
            int err = c->err;
            c->err = 0;
            enum job_error_action act = job_handle_error_co(job, co, err, c->err_read);
            if (act == JOB_ERROR_REPORT) {
                r = error_setf(errp, -err, "%s %s: %s", c->err_read ? "reading"
                               : "writing", c->err_read ? c->top->filename
                               : c->base->filename, strerror(-err));
                break;
            }
            if (act == JOB_ERROR_IGNORE)
                commit_clear(c, c->err_start, c->err_end);
            continue;
        }
        if (c->active && job_cancel_requested(job))
            break; /* soft cancel of a ready job: end without the pivot */
        if (c->active && job_complete_requested(job))
            break;
        uint64_t i = next_dirty(c, cursor / COMMIT_GRAN);
        if (i >= c->nbits) {
            if (c->active && !c->sync_mode) {
                c->sync_mode = true; /* first pass done */
                log_debug("job '%s': first pass done, %llu chunks dirty; "
                          "mirroring guest writes from now on", job->id,
                          (unsigned long long)c->ndirty);
            }
            if (c->workers > 0) {
                co_queue_wait_co(&c->worker_q, co);
                continue;
            }
            if (c->ndirty > 0) {
                cursor = 0;
                continue;
            }
            if (!c->active)
                break; /* all copied */
            if (job->status == JOB_STATUS_RUNNING) {
                log_info("job '%s': ready after %.3f s", job->id,
                         (loop_now_ns() - c->t_start) / 1e9);
                job_transition_to_ready(job);
            }
            /* ready: wait for complete or cancel, copying whatever a
             * failed mirror copy left dirty */
            job_sleep_co(job, co, 100000000u);
            continue;
        }
        while (c->workers >= COMMIT_WORKERS)
            co_queue_wait_co(&c->worker_q, co);
        uint64_t start = i * COMMIT_GRAN;
        uint64_t end = run_end(c, i);
        struct commit_worker *w = malloc(sizeof(*w));
        struct coro *wc = w ? coro_create(loop_coro_pool(c->srv->loop),
                                          commit_worker_co, w) : NULL;
        if (!wc) {
            free(w);
            r = error_setf(errp, ENOMEM, "out of memory");
            break;
        }
        *w = (struct commit_worker){c, start, end};
        c->workers++;
        coro_wake(wc);
        cursor = end;
        job_ratelimit_co(job, co, end - start);
    }
    commit_drain_co(c, co);
    if (r == 0 && c->err) {
        r = error_setf(errp, -c->err, "%s: %s", c->err_read ? c->top->filename
                       : c->base->filename, strerror(-c->err));
    }
    return r;
}

/* Intermediate: base durable, then above's backing link, then the
 * in-memory chain. */
static int commit_relink_co(struct commit *c, struct coro *co,
                            struct error **errp)
{
    const char *fmt = c->base->ops->name;
    int r = fmt_flush_co(c->base, co);
    if (r < 0)
        return error_setf(errp, -r, "%s: flush: %s", c->base->filename,
                          strerror(-r));
    bool live = !c->above->read_only; /* the export's writable top */
    if (live) {
        /* Only cluster 0 changes, under the image lock: guest I/O on the
         * top goes on meanwhile. */
        r = fmt_set_backing_co(c->above, co, c->backing_name, fmt, errp);
        if (r < 0)
            return r;
    } else {
        fmt_prepare_writable_co(c->above, co);
    }
    export_quiesce_co(c->e, co);
    if (!live) {
        r = fmt_reopen_co(c->above, co, false, errp);
        if (r == 0) {
            r = fmt_set_backing_co(c->above, co, c->backing_name, fmt, errp);
            struct error *e2 = NULL;
            if (fmt_reopen_co(c->above, co, true, &e2) < 0) {
                /* the link is durable anyway; the node stays writable */
                log_warn("%s: cannot reopen it read-only: %s",
                         c->above->filename, e2->msg);
            }
            error_free(e2);
        }
    }
    if (r == 0) {
        c->above->backing = c->base;
        c->relinked = true;
        if (c->base_reopened) {
            struct error *e2 = NULL;
            if (fmt_reopen_co(c->base, co, true, &e2) == 0)
                c->base_reopened = false;
            else
                log_warn("job '%s': %s", c->job->id, e2->msg);
            error_free(e2);
        }
    }
    uint64_t stall = export_resume(c->e);
    if (r == 0)
        log_info("job '%s': %s now backs %s (export '%s' stalled %.3f ms)",
                 c->job->id, c->backing_name, c->above->filename, c->e->cfg.id,
                 stall / 1e6);
    return r;
}

/* Active: the pivot.  The guest must not notice it: no request waits for
 * a sync of base.  The order:
 *
 *   1. base flushed while the guest goes on (the bulk of the copies; the
 *      flush holds no lock across its sync, and the guest writes into
 *      top, another file);
 *   2. quiesce: the last dirty chunks copied (write-blocking mirroring
 *      leaves next to none), the notifier removed, base the export's top,
 *      and the export's sync gate closed (export_gate_close); resume.
 *      Nothing here syncs a file: the quiesce is as long as the final
 *      copy;
 *   3. while the guest writes into base: base flushed (all it got since
 *      step 1: the mirroring's copies and the guest's new writes), then
 *      the node's file becomes base's, then the state file is saved
 *      naming it (export_gate_settle_co), then the gate opens.
 *
 * The crash rule: a write acknowledged with FUA or before a completed
 * FLUSH survives a kill -9 at any point, and the state file never names
 * a top that lacks such a write.  Until step 3 saved it, the state file
 * names top, which holds every write acknowledged before the switch (in
 * a flushed state where a FLUSH or FUA covered it); writes since the
 * switch went to base only, and none of them was acknowledged as
 * durable: the replies to FLUSH and FUA requests that ran on base wait
 * at the gate (export_gate_wait_co, after the request ran) until the
 * state file names base.  A kill before that restarts on top, with
 * every durable write; after it, on base, which was flushed before it
 * was named and so holds every write acknowledged before the switch
 * (copied into it before the switch) and every flushed one since.  Plain
 * writes and reads never wait for the gate.  The node's filename stays
 * top's until base is durable, so a state file saved meanwhile for
 * another reason (another export's change) still names top.
 *
 * A failure after the switch cannot be undone (the guest's new writes
 * are in base only): base stays the top, the job fails, and the gate
 * stays closed and failed: each FLUSH or FUA request tries step 3 again
 * and fails while it fails; the node stays busy (no other chain change)
 * until a try succeeds. */
static int commit_pivot_co(struct commit *c, struct coro *co,
                           struct error **errp)
{
    char *path = chain_layer_path(c->b, c->base, errp);
    char *driver = strdup(c->base->ops->name);
    if (!path || !driver) {
        free(path);
        free(driver);
        return error_setf(errp, ENOMEM, "out of memory");
    }
    export_watch_begin(c->e);
    uint64_t t0 = loop_now_ns();
    int r = fmt_flush_co(c->base, co);
    if (r < 0) {
        export_watch_end(c->e);
        free(path);
        free(driver);
        return error_setf(errp, -r, "%s: flush: %s", c->base->filename,
                          strerror(-r));
    }
    uint64_t t1 = loop_now_ns();
    export_quiesce_co(c->e, co);
    uint64_t tq = loop_now_ns();
    bool is_read = false;
    for (uint64_t i = next_dirty(c, 0); r == 0 && i < c->nbits;
         i = next_dirty(c, i)) {
        r = commit_copy_co(c, co, i * COMMIT_GRAN, run_end(c, i), &is_read);
    }
    uint64_t tc = loop_now_ns();
    if (r < 0) {
        error_setf(errp, -r, "final copy: %s", strerror(-r));
        export_resume(c->e);
        export_watch_end(c->e);
        free(path);
        free(driver);
        return r;
    }
    export_remove_write_notifier(c->e, &c->wn);
    c->notifier_added = false;
    export_set_root(c->e, c->base);
    export_gate_close(c->e, path, driver);
    c->pivoted = true;
    c->base_reopened = false; /* base stays writable: the top now */
    uint64_t stall = export_resume(c->e);

    uint64_t ts = loop_now_ns();
    r = export_gate_settle_co(c->e, co);
    uint64_t te = loop_now_ns();
    uint64_t request_stall = export_watch_end(c->e);
    log_debug("job '%s': pivot: base flushed in %.3f ms before the quiesce; "
              "quiesce %.3f ms (drain %.3f ms, final copy %.3f ms); base "
              "flushed and named in the state file in %.3f ms after it",
              c->job->id, (t1 - t0) / 1e6, stall / 1e6, (tq - t1) / 1e6,
              (tc - tq) / 1e6, (te - ts) / 1e6);
    if (r < 0)
        return error_setf(errp, -r, "%s is the top of '%s' now, but it could "
                          "not be made durable and named in the state file: "
                          "%s (FLUSH requests try again)", c->base->filename,
                          c->b->node_name, strerror(-r));
    log_info("job '%s': %s is the top of '%s' now (export '%s' stalled "
             "%.3f ms, longest request %.3f ms; base flushed and named in "
             "%.3f ms meanwhile)", c->job->id, c->b->filename,
             c->b->node_name, c->e->cfg.id, stall / 1e6,
             request_stall / 1e6, (te - ts) / 1e6);
    return 0;
}

static int commit_prepare_co(struct job *job, struct coro *co,
                             struct error **errp)
{
    struct commit *c = commit_of(job);
    if (!c->active)
        return commit_relink_co(c, co, errp);
    if (job_cancel_requested(job))
        return 0; /* soft cancel of a ready job: no pivot */
    return commit_pivot_co(c, co, errp);
}

static void commit_clean_co(struct job *job, struct coro *co)
{
    struct commit *c = commit_of(job);
    commit_drain_co(c, co);
    if (c->notifier_added || c->base_reopened) {
        export_quiesce_co(c->e, co);
        if (c->notifier_added) {
            export_remove_write_notifier(c->e, &c->wn);
            c->notifier_added = false;
        }
        if (c->base_reopened) {
            struct error *e2 = NULL;
            if (fmt_reopen_co(c->base, co, true, &e2) < 0)
                log_warn("job '%s': %s", job->id, e2->msg);
            error_free(e2);
            c->base_reopened = false;
        }
        export_resume(c->e);
    }
    if (c->relinked || c->pivoted) {
        /* The committed layers are out of the chain (on disk and in the
         * state file): close them.  Their files stay. */
        c->last->backing = NULL;
        for (struct fmt_node *x = c->top; x; x = x->backing) {
            int r = fmt_flush_co(x, co); /* the old live top has unflushed
                                            metadata; keep its file whole */
            if (r < 0)
                log_warn("%s: flush: %s", x->filename, strerror(-r));
        }
        fmt_close_co(c->top, c->srv->loop, co);
    }
    if (c->e->gate_closed)
        c->e->gate_busy = true; /* cleared when the gate opens */
    else
        c->b->chain_busy = false;
    log_info("job '%s': %s after %.3f s", job->id,
             c->relinked || c->pivoted ? "chain changed" : "chain unchanged",
             (loop_now_ns() - c->t_start) / 1e9);
}

static int commit_complete(struct job *job, struct error **errp)
{
    (void)errp;
    (void)job;
    return 0; /* run_co polls job_complete_requested() */
}

static void commit_free(struct job *job)
{
    struct commit *c = commit_of(job);
    if (!c)
        return;
    while (c->bufs) {
        struct commit_buf *b = c->bufs;
        c->bufs = b->next;
        free(b);
    }
    free(c->bits);
    free(c->backing_name);
    free(c);
}

static const struct job_driver commit_driver = {
    .type = "commit",
    .run_co = commit_run_co,
    .prepare_co = commit_prepare_co,
    .clean_co = commit_clean_co,
    .free = commit_free,
};

static const struct job_driver active_commit_driver = {
    .type = "commit",
    .run_co = commit_run_co,
    .complete = commit_complete,
    .prepare_co = commit_prepare_co,
    .clean_co = commit_clean_co,
    .free = commit_free,
};

/* Is the file of node n also a layer of another node's chain? */
static const struct blockdev *shared_with(struct server *srv,
                                          const struct blockdev *b,
                                          struct fmt_node *n)
{
    char *p = chain_layer_path(b, n, NULL);
    if (!p)
        return NULL;
    const struct blockdev *found = NULL;
    for (size_t i = 0; i < srv->n_bdevs && !found; i++) {
        const struct blockdev *o = srv->bdevs[i];
        if (o == b)
            continue;
        for (struct fmt_node *x = o->root; x && !found; x = x->backing) {
            char *q = chain_layer_path(o, x, NULL);
            if (q && fmt_same_layer(p, q))
                found = o;
            free(q);
        }
    }
    free(p);
    return found;
}

struct job *commit_start(struct job_engine *eng, struct server *srv,
                         struct export *e, const struct commit_args *a,
                         struct error **errp)
{
    struct blockdev *b = e->bdev;
    if (b->chain_busy) {
        error_setf(errp, EBUSY, "Node '%s' is busy: its chain is being changed",
                   b->node_name);
        return NULL;
    }
    if (b->read_only) {
        error_setf(errp, EROFS, "Node '%s' is read-only: block-commit writes "
                   "into base and rewrites backing links", b->node_name);
        return NULL;
    }
    unsigned tdepth = 0, bdepth = 0;
    struct fmt_node *top = b->root;
    if (a->top || a->top_node) {
        top = chain_find(b, a->top, a->top_node, &tdepth, errp);
        if (!top)
            return NULL;
    }
    struct fmt_node *base = NULL;
    if (a->base || a->base_node) {
        base = chain_find(b, a->base, a->base_node, &bdepth, errp);
        if (!base)
            return NULL;
    } else {
        for (struct fmt_node *x = b->root; x; x = x->backing, bdepth++)
            base = x;
        bdepth--;
    }
    if (top == base) {
        error_setf(errp, EINVAL, "cannot commit an image into itself");
        return NULL;
    }
    if (bdepth < tdepth) {
        error_setf(errp, EINVAL, "'%s' is not in the backing chain of '%s' "
                   "(base must be below top)", base->filename, top->filename);
        return NULL;
    }
    bool active = top == b->root;
    if (active && a->backing_file) {
        error_setf(errp, EINVAL, "'backing-file' specified, but 'top' is the "
                   "active layer");
        return NULL;
    }
    const struct blockdev *other = shared_with(srv, b, base);
    if (other) {
        error_setf(errp, EBUSY, "%s is also in the chain of node '%s': "
                   "committing into it would change that disk", base->filename,
                   other->node_name);
        return NULL;
    }
    if (base->size < top->size && base->backing &&
        base->backing->size > base->size) {
        error_setf(errp, ENOTSUP, "%s would have to grow over its own larger "
                   "backing file, whose data would show through: not supported",
                   base->filename);
        return NULL;
    }
    /* The nodes from top down to base go away with their bitmaps: not
     * while an export offers one. */
    for (struct fmt_node *x = top; x && x != base; x = x->backing) {
        for (struct fmt_bitmap *bm = x->bitmaps; bm; bm = bm->next) {
            if (bm->busy) {
                error_setf(errp, EBUSY, "%s: its dirty bitmap '%s' is in use "
                           "by an export, and the commit would drop it",
                           x->filename, bm->name);
                return NULL;
            }
        }
    }
    struct fmt_node *above = NULL, *last = NULL;
    for (struct fmt_node *x = b->root; x; x = x->backing) {
        if (x->backing == top)
            above = x;
        if (x->backing == base)
            last = x;
    }
    if (!active && !fmt_driver_can_backing(above->drv)) {
        error_setf(errp, ENOTSUP, "%s: a %s image cannot be re-pointed at "
                   "base", above->filename, above->ops->name);
        return NULL;
    }

    struct commit *c = calloc(1, sizeof(*c));
    if (!c) {
        error_setf(errp, ENOMEM, "out of memory");
        return NULL;
    }
    c->srv = srv;
    c->e = e;
    c->b = b;
    c->top = top;
    c->base = base;
    c->above = above;
    c->last = last;
    c->depth_limit = bdepth - tdepth;
    c->active = active;
    c->size = top->size;
    c->nbits = (c->size + COMMIT_GRAN - 1) / COMMIT_GRAN;
    c->bits = calloc((c->nbits + 63) / 64 + 1, sizeof(uint64_t));
    c->t_start = loop_now_ns();
    if (!c->bits) {
        commit_free(&(struct job){.opaque = c});
        error_setf(errp, ENOMEM, "out of memory");
        return NULL;
    }
    if (active) {
        /* base becomes the top: its chain must open again from its own
         * directory after a restart */
        char *bpath = chain_layer_path(b, base, errp);
        int r = bpath ? chain_check_backing_root(b, base->backing, bpath,
                                                 b->backing_root, errp) : -1;
        free(bpath);
        if (r < 0) {
            commit_free(&(struct job){.opaque = c});
            return NULL;
        }
    } else {
        /* The name recorded in above: as asked (it must lead to base), or
         * base's absolute path. */
        char *apath = chain_layer_path(b, above, errp);
        char *bpath = apath ? chain_layer_path(b, base, errp) : NULL;
        if (!bpath) {
            free(apath);
            commit_free(&(struct job){.opaque = c});
            return NULL;
        }
        if (a->backing_file) {
            char *res = fmt_resolve_backing(apath, a->backing_file, b->backing_remote, NULL);
            bool same = res && fmt_same_layer(res, bpath);
            free(res);
            if (!same) {
                error_setf(errp, EINVAL, "backing-file '%s' (seen from %s) is "
                           "not %s", a->backing_file, apath, bpath);
                free(apath);
                free(bpath);
                commit_free(&(struct job){.opaque = c});
                return NULL;
            }
            c->backing_name = strdup(a->backing_file);
            if (!c->backing_name)
                error_setf(errp, ENOMEM, "out of memory");
        } else {
            c->backing_name = fmt_backing_name_for(apath, bpath, errp);
        }
        free(bpath);
        free(apath);
        if (!c->backing_name) {
            commit_free(&(struct job){.opaque = c});
            return NULL;
        }
    }
    const char *id = a->job_id ? a->job_id : e->cfg.id;
    struct job *job = job_create(eng, active ? &active_commit_driver : &commit_driver,
                                 id, e->cfg.id, c, &a->opts, errp);
    if (!job) {
        commit_free(&(struct job){.opaque = c});
        return NULL;
    }
    c->job = job;
    b->chain_busy = true;
    log_info("job '%s': %s commit of %s (and below) into %s started",
             id, active ? "active" : "intermediate", top->filename,
             base->filename);
    job_start(job);
    if (job->status == JOB_STATUS_CONCLUDED)
        b->chain_busy = false; /* it could not even start */
    return job;
}
