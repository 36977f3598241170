/* strata — Ceph RBD backend over librbd's asynchronous API.
 *
 * Completions.  Data operations use rbd_aio_readv / writev / flush /
 * discard / write_zeroes with completions created without a callback: no
 * strata code ever runs on a librbd thread.  The image is told to signal an
 * eventfd when a completion is ready (rbd_set_image_notification,
 * EVENT_TYPE_EVENTFD); the owning loop keeps one io_uring read of that
 * eventfd in its ring while anything is in flight.  When the read completes
 * (which also resets the eventfd counter: one read drains it whatever the
 * number of signals), rbd_harvest() takes every ready completion with
 * rbd_poll_io_events() — each completion is handed out by librbd exactly
 * once — records its result in the waiting request and wakes the request's
 * coroutine.  A signal that arrives after the read but for a completion
 * already harvested costs one empty harvest, never a lost or double
 * completion.  (rbd_aio_compare_and_write is not used: on librbd 16 its
 * completions never reach the eventfd.)
 *
 * Synchronous calls.  librbd has no asynchronous resize or diff-iterate,
 * and both may wait for the cluster (up to the operation timeout when an
 * OSD is down).  So they run on one helper thread per image, which takes
 * jobs from a queue and posts each finished job back through the same
 * eventfd: a stuck cluster never stalls the loop and the other exports it
 * serves.  Opening, creating, reopening and closing are synchronous calls
 * here, bounded by the connect and operation timeouts; their callers run
 * them on an offload thread (backend_open_co, backend_reopen_co,
 * fmt_close_co), so they do not stall the loop either.  Images with the
 * same connection settings share one rados_t (see "shared cluster
 * connections" below).
 *
 * Size.  b->size is the logical end, as for files: the size at open, then
 * grown by writes and zeroing past it, or set by truncate.  An RBD image
 * has a fixed size and librbd silently shortens a write that crosses it,
 * so a write past the image's end first grows the image — in steps of at
 * least RBD_GROW_STEP and 1/8 of its size, so that a qcow2 image appending
 * clusters resizes rarely.  image_size (>= b->size) is the RBD size; the
 * slack past b->size reads as zeros and is cut off again at close
 * (truncate sets both exactly).  After a crash the image may keep the
 * slack: trailing zeros, which qcow2 ignores.
 *
 * Block status comes from rbd_diff_iterate2 (whole_object: with fast-diff
 * the object map answers without reading every object; the granularity is
 * the object either way).  One call covers a window of up to
 * RBD_BS_WINDOW bytes, kept until the next change of allocation, so a
 * client walking the disk costs one call per window, not per extent.
 *
 * Known librbd 16 behaviour: discards smaller than
 * rbd_discard_granularity_bytes (64 KiB) are skipped, so discard is
 * advisory (content afterwards unspecified); zeroing uses write_zeroes.
 *
 * Durability.  When the writeback of an acknowledged write fails (an
 * operation timeout), librbd's cache forgets the data and reports the next
 * flush as done.  So with a timeout the cache writes through
 * (rbd_cache_max_dirty=0), and with a writeback cache a failed flush makes
 * every later flush fail (flush_failed) until the export is reopened.
 *
 * Loading.  stratad does not link librbd: rbd_connect() first calls
 * rbd_dl_load(), which dlopens librados and librbd, and the librbd and
 * librados calls below go through forwarders of the same names in
 * rbd-dl.c.  So a daemon without an rbd: export never pays librbd's
 * ~18 MiB of RSS.
 */
#include <assert.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <rados/librados.h>
#include <rbd/librbd.h>

#include "backend.h"
#include "log.h"
#include "loop.h"
#include "rbd-dl.h"
#include "rbd-spec.h"
#include "util.h"

#define RBD_MAX_IOV 64                 /* iovecs per librbd request */
#define RBD_HARVEST_BATCH 32           /* completions per rbd_poll_io_events */
#define RBD_GROW_STEP (UINT64_C(64) << 20)
#define RBD_BS_WINDOW (UINT64_C(1) << 30)
#define RBD_ZERO_CHUNK (UINT64_C(1) << 30) /* bytes per write_zeroes request */


/* One librbd aio in flight.  Lives on the waiting coroutine's stack; librbd
 * keeps its address as the completion's argument until rbd_harvest() gets
 * the completion back, sets done and wakes co. */
struct rbd_req {
    struct coro *co;
    ssize_t res;
    bool done;
};

struct rbd_extent {
    uint64_t off, len;
};

enum rbd_job_kind {
    RBD_JOB_RESIZE,     /* rbd_resize(size) */
    RBD_JOB_DIFF,       /* rbd_diff_iterate2 over [off, off + len) */
};

/* A synchronous librbd call run on the helper thread.  Lives on the waiting
 * coroutine's stack.  The helper thread owns it from rbd_job_run_co() until
 * it is on the done list; the loop owns it again from rbd_harvest() on. */
struct rbd_job {
    enum rbd_job_kind kind;
    uint64_t off, len;          /* DIFF: window; RESIZE: off = new size */
    struct rbd_extent *ext;     /* DIFF result: allocated extents (malloc) */
    size_t n_ext, cap_ext;
    int res;                    /* 0 or -errno */
    struct coro *co;
    bool done;
    struct rbd_job *next;
};

struct rbd_backend {
    struct backend b;
    struct rbd_spec spec;
    char *where;                /* "rbd:pool/[ns/]image[@snap]" for messages */
    struct rbd_conn *conn;      /* the shared cluster connection, or NULL */
    rados_t cluster;            /* conn's (or one being set up) */
    rados_ioctx_t ioctx;
    rbd_image_t image;
    uint64_t image_size;        /* the RBD image's size, >= b->size */

    /* Completion path (loop thread only, except efd which librbd and the
     * helper thread write). */
    int efd;
    struct loop_op efd_op;
    uint64_t efd_count;         /* the read's buffer */
    bool efd_armed;             /* a read of efd is in the ring */
    unsigned inflight;          /* aio requests and jobs not yet harvested */
    bool said_blocklisted;      /* logged once */

    /* librbd's cache may hold acknowledged writes (rbd_cache on and
     * rbd_cache_max_dirty > 0).  After a failed flush librbd forgets the
     * data it could not write back, and the next flush succeeds at once
     * though that data may never reach the OSDs: so then every later flush
     * fails (flush_failed) until the export is opened again. */
    bool writeback;
    bool flush_failed;

    /* Held (by a coroutine of this loop) while resizing and updating
     * image_size; never across anything but the resize job. */
    struct co_mutex resize_lock;

    /* Helper thread.  jobs_lock protects todo_*, done_head and stop; it is
     * a leaf lock (nothing else is taken while holding it). */
    pthread_t thread;
    bool thread_started;
    pthread_mutex_t jobs_lock;
    pthread_cond_t jobs_cond;   /* todo non-empty or stop */
    struct rbd_job *todo_head, *todo_tail;
    struct rbd_job *done_head;
    bool stop;

    /* Block status window (loop thread only). */
    uint64_t gen;               /* bumped around every allocation change */
    bool bs_valid;
    uint64_t bs_gen, bs_start, bs_end;
    struct rbd_extent *bs_ext;
    size_t bs_n;
};

static struct rbd_backend *rb(struct backend *b)
{
    return (struct rbd_backend *)b;
}

/* ---- the completion path ---- */

static void rbd_efd_done(struct loop_op *op, int res, uint32_t flags);

static void rbd_efd_arm(struct rbd_backend *r)
{
    if (r->efd_armed)
        return;
    struct io_uring_sqe *sqe = loop_get_sqe(r->b.loop, &r->efd_op);
    io_uring_prep_read(sqe, r->efd, &r->efd_count, sizeof(r->efd_count), 0);
    r->efd_armed = true;
}

/* Delivers every finished aio and job to its waiter, exactly once. */
static void rbd_harvest(struct rbd_backend *r)
{
    rbd_completion_t comps[RBD_HARVEST_BATCH];
    for (;;) {
        int n = rbd_poll_io_events(r->image, comps, RBD_HARVEST_BATCH);
        if (n <= 0)
            break;
        for (int i = 0; i < n; i++) {
            struct rbd_req *q = rbd_aio_get_arg(comps[i]);
            q->res = rbd_aio_get_return_value(comps[i]);
            rbd_aio_release(comps[i]);
            assert(!q->done && r->inflight > 0);
            q->done = true;
            r->inflight--;
            coro_wake(q->co);
        }
        if (n < RBD_HARVEST_BATCH)
            break;
    }
    pthread_mutex_lock(&r->jobs_lock);
    struct rbd_job *j = r->done_head;
    r->done_head = NULL;
    pthread_mutex_unlock(&r->jobs_lock);
    while (j) {
        struct rbd_job *next = j->next;
        assert(!j->done && r->inflight > 0);
        j->done = true;
        r->inflight--;
        coro_wake(j->co);
        j = next;
    }
}

static void rbd_efd_done(struct loop_op *op, int res, uint32_t flags)
{
    struct rbd_backend *r = container_of(op, struct rbd_backend, efd_op);
    (void)flags;
    r->efd_armed = false;
    if (res < 0 && res != -EINTR && res != -EAGAIN)
        log_error("%s: reading the completion eventfd: %s", r->where,
                  strerror(-res));
    rbd_harvest(r);
    /* Armed only while something is in flight, so that close() never has
     * to cancel a read: inflight == 0 implies no read in the ring. */
    if (r->inflight > 0)
        rbd_efd_arm(r);
}

/* librbd's errors as the layers above should see them. */
static ssize_t rbd_result(struct rbd_backend *r, ssize_t res)
{
    if (res == -ESHUTDOWN) {
        /* EBLOCKLISTED: another client broke our exclusive lock; this
         * handle stays fenced off.  Not NBD_ESHUTDOWN: the server is not
         * shutting down, the I/O failed. */
        if (!r->said_blocklisted)
            log_error("%s: the cluster has blocklisted this client (another "
                      "client broke its exclusive lock): I/O fails until the "
                      "export is opened again", r->where);
        r->said_blocklisted = true;
        return -EIO;
    }
    return res;
}

static int rbd_req_start(struct rbd_req *q, struct coro *co,
                         rbd_completion_t *c)
{
    q->co = co;
    q->res = 0;
    q->done = false;
    return rbd_aio_create_completion(q, NULL, c);
}

/* Takes the result of the rbd_aio_* call that was given c; waits for the
 * completion if it was submitted.  Returns the completion's result. */
static ssize_t rbd_req_wait_co(struct rbd_backend *r, struct rbd_req *q,
                               rbd_completion_t c, int submitted)
{
    if (submitted < 0) {
        rbd_aio_release(c);
        return submitted;
    }
    r->inflight++;
    rbd_efd_arm(r);
    while (!q->done)
        coro_yield(q->co);
    return rbd_result(r, q->res);
}

/* ---- the helper thread ---- */

static int rbd_diff_cb(uint64_t off, size_t len, int exists, void *arg)
{
    struct rbd_job *j = arg;
    if (!exists || len == 0)
        return 0;
    if (j->n_ext && j->ext[j->n_ext - 1].off + j->ext[j->n_ext - 1].len == off) {
        j->ext[j->n_ext - 1].len += len;
        return 0;
    }
    if (j->n_ext == j->cap_ext) {
        size_t cap = j->cap_ext ? j->cap_ext * 2 : 64;
        void *p = realloc(j->ext, cap * sizeof(*j->ext));
        if (!p)
            return -ENOMEM;
        j->ext = p;
        j->cap_ext = cap;
    }
    j->ext[j->n_ext++] = (struct rbd_extent){.off = off, .len = len};
    return 0;
}

static int rbd_extent_cmp(const void *a, const void *b)
{
    const struct rbd_extent *x = a, *y = b;
    return x->off < y->off ? -1 : x->off > y->off;
}

static void rbd_job_exec(struct rbd_backend *r, struct rbd_job *j)
{
    switch (j->kind) {
    case RBD_JOB_RESIZE:
        j->res = rbd_resize(r->image, j->off);
        break;
    case RBD_JOB_DIFF:
        j->res = rbd_diff_iterate2(r->image, NULL, j->off, j->len,
                                   1 /* include_parent */,
                                   1 /* whole_object */, rbd_diff_cb, j);
        if (j->res >= 0 && j->n_ext > 1) {
            /* sorted and merged, whatever order librbd reported in */
            qsort(j->ext, j->n_ext, sizeof(*j->ext), rbd_extent_cmp);
            size_t w = 0;
            for (size_t i = 1; i < j->n_ext; i++) {
                struct rbd_extent *last = &j->ext[w];
                if (j->ext[i].off <= last->off + last->len) {
                    uint64_t end = MAX(last->off + last->len,
                                       j->ext[i].off + j->ext[i].len);
                    last->len = end - last->off;
                } else {
                    j->ext[++w] = j->ext[i];
                }
            }
            j->n_ext = w + 1;
        }
        break;
    }
    if (j->res > 0)
        j->res = 0;
}

static void *rbd_thread_main(void *arg)
{
    struct rbd_backend *r = arg;
    pthread_mutex_lock(&r->jobs_lock);
    for (;;) {
        while (!r->todo_head && !r->stop)
            pthread_cond_wait(&r->jobs_cond, &r->jobs_lock);
        struct rbd_job *j = r->todo_head;
        if (!j)
            break; /* stopping, nothing left */
        r->todo_head = j->next;
        if (!r->todo_head)
            r->todo_tail = NULL;
        pthread_mutex_unlock(&r->jobs_lock);

        rbd_job_exec(r, j);

        pthread_mutex_lock(&r->jobs_lock);
        j->next = r->done_head;
        r->done_head = j;
        /* j belongs to the loop from here on: not touched again */
        pthread_mutex_unlock(&r->jobs_lock);
        uint64_t one = 1;
        while (write(r->efd, &one, sizeof(one)) < 0 && errno == EINTR)
            ;
        pthread_mutex_lock(&r->jobs_lock);
    }
    pthread_mutex_unlock(&r->jobs_lock);
    return NULL;
}

/* Runs j on the helper thread; yields until it is done. */
static int rbd_job_run_co(struct rbd_backend *r, struct coro *co,
                          struct rbd_job *j)
{
    j->co = co;
    j->done = false;
    j->next = NULL;
    j->res = 0;
    pthread_mutex_lock(&r->jobs_lock);
    if (r->todo_tail)
        r->todo_tail->next = j;
    else
        r->todo_head = j;
    r->todo_tail = j;
    pthread_cond_signal(&r->jobs_cond);
    pthread_mutex_unlock(&r->jobs_lock);
    r->inflight++;
    rbd_efd_arm(r);
    while (!j->done)
        coro_yield(co);
    return (int)rbd_result(r, j->res);
}

static int rbd_resize_co(struct rbd_backend *r, struct coro *co,
                         uint64_t size)
{
    struct rbd_job j = {.kind = RBD_JOB_RESIZE, .off = size};
    return rbd_job_run_co(r, co, &j);
}

/* Grows the image so that it holds at least end bytes. */
static int rbd_ensure_size_co(struct rbd_backend *r, struct coro *co,
                              uint64_t end)
{
    if (end <= r->image_size)
        return 0;
    co_mutex_lock_co(&r->resize_lock, co);
    int ret = 0;
    if (end > r->image_size) {
        uint64_t want = MAX(end, r->image_size + r->image_size / 8);
        if (want > UINT64_MAX - RBD_GROW_STEP) {
            ret = -EFBIG;
        } else {
            want = (want + RBD_GROW_STEP - 1) / RBD_GROW_STEP * RBD_GROW_STEP;
            r->gen++;
            ret = rbd_resize_co(r, co, want);
            if (ret == 0) {
                log_debug("%s: grown to %llu bytes", r->where,
                          (unsigned long long)want);
                r->image_size = want;
            }
        }
    }
    co_mutex_unlock(&r->resize_lock, co);
    return ret;
}

/* ---- data operations ---- */

/* Moves the first len bytes described by iov, at off, in requests of at
 * most RBD_MAX_IOV iovecs. */
static int rbd_rw_co(struct rbd_backend *r, struct coro *co, bool write,
                     const struct iovec *iov, int iovcnt, uint64_t off,
                     uint64_t len)
{
    struct iovec part[RBD_MAX_IOV];
    int i = 0;
    size_t skip = 0; /* bytes of iov[i] already moved */
    while (len > 0) {
        int n = 0;
        uint64_t chunk = 0;
        while (n < RBD_MAX_IOV && i < iovcnt && chunk < len) {
            size_t avail = iov[i].iov_len - skip;
            if (avail == 0) {
                i++;
                skip = 0;
                continue;
            }
            if (avail > len - chunk)
                avail = (size_t)(len - chunk);
            part[n].iov_base = (char *)iov[i].iov_base + skip;
            part[n].iov_len = avail;
            n++;
            chunk += avail;
            skip += avail;
            if (skip == iov[i].iov_len) {
                i++;
                skip = 0;
            }
        }
        assert(chunk > 0);
        struct rbd_req q;
        rbd_completion_t c;
        int e = rbd_req_start(&q, co, &c);
        if (e < 0)
            return e;
        ssize_t res = rbd_req_wait_co(r, &q, c, write
            ? rbd_aio_writev(r->image, part, n, off, c)
            : rbd_aio_readv(r->image, part, n, off, c));
        if (res < 0)
            return (int)res;
        if (!write && (uint64_t)res != chunk)
            return -EIO; /* librbd reads whole ranges inside the image */
        off += chunk;
        len -= chunk;
    }
    return 0;
}

static int rbd_preadv_co(struct backend *b, struct coro *co,
                         const struct iovec *iov, int iovcnt, uint64_t off)
{
    struct rbd_backend *r = rb(b);
    uint64_t len = iov_size(iov, iovcnt);
    uint64_t in = off >= r->image_size ? 0 : MIN(len, r->image_size - off);
    if (in < len)
        iov_zero_range(iov, iovcnt, in, len - in); /* past the end */
    if (in == 0)
        return 0;
    return rbd_rw_co(r, co, false, iov, iovcnt, off, in);
}

static int rbd_flush_co(struct backend *b, struct coro *co)
{
    struct rbd_backend *r = rb(b);
    if (r->flush_failed)
        return -EIO;
    struct rbd_req q;
    rbd_completion_t c;
    int e = rbd_req_start(&q, co, &c);
    if (e < 0)
        return e;
    ssize_t res = rbd_req_wait_co(r, &q, c, rbd_aio_flush(r->image, c));
    if (res < 0 && r->writeback && !r->flush_failed) {
        r->flush_failed = true;
        log_error("%s: a flush failed (%s) with librbd's writeback cache on: "
                  "acknowledged writes may not be on the cluster, so every "
                  "later flush fails too, until the export is opened again",
                  r->where, strerror((int)-res));
    }
    return res < 0 ? (int)res : 0;
}

/* After a write or zeroing up to end that returned ret: the logical end
 * moves past it, and FUA makes it durable. */
static int rbd_written_co(struct backend *b, struct coro *co, int ret,
                          uint64_t end, unsigned flags)
{
    if (ret < 0)
        return ret;
    if (end > b->size)
        b->size = end;
    if (flags & BACKEND_FUA)
        return rbd_flush_co(b, co);
    return 0;
}

static int rbd_pwritev_co(struct backend *b, struct coro *co,
                          const struct iovec *iov, int iovcnt, uint64_t off,
                          unsigned flags)
{
    struct rbd_backend *r = rb(b);
    uint64_t len = iov_size(iov, iovcnt);
    uint64_t end = off + len;
    int ret = rbd_ensure_size_co(r, co, end);
    if (ret < 0)
        return ret;
    r->gen++;
    ret = rbd_rw_co(r, co, true, iov, iovcnt, off, len);
    r->gen++;
    return rbd_written_co(b, co, ret, end, flags);
}

static int rbd_zero_co(struct backend *b, struct coro *co, uint64_t off,
                       uint64_t len, unsigned flags)
{
    struct rbd_backend *r = rb(b);
    /* Without MAY_TRIM the zeros must stay allocated: librbd writes them
     * (thick provisioning), which is not fast. */
    if ((flags & BACKEND_FAST) && !(flags & BACKEND_MAY_TRIM))
        return -ENOTSUP;
    uint64_t end = off + len;
    int ret = rbd_ensure_size_co(r, co, end);
    if (ret < 0)
        return ret;
    int zflags = (flags & BACKEND_MAY_TRIM)
                     ? 0 : RBD_WRITE_ZEROES_FLAG_THICK_PROVISION;
    r->gen++;
    for (uint64_t pos = off; pos < end && ret == 0;) {
        uint64_t n = MIN(end - pos, RBD_ZERO_CHUNK);
        struct rbd_req q;
        rbd_completion_t c;
        ret = rbd_req_start(&q, co, &c);
        if (ret < 0)
            break;
        ssize_t res = rbd_req_wait_co(r, &q, c,
            rbd_aio_write_zeroes(r->image, pos, (size_t)n, c, zflags, 0));
        ret = res < 0 ? (int)res : 0;
        pos += n;
    }
    r->gen++;
    return rbd_written_co(b, co, ret, end, flags);
}

static int rbd_discard_co(struct backend *b, struct coro *co, uint64_t off,
                          uint64_t len, unsigned flags)
{
    struct rbd_backend *r = rb(b);
    if (off >= b->size)
        return 0;
    len = MIN(len, b->size - off);
    struct rbd_req q;
    rbd_completion_t c;
    int e = rbd_req_start(&q, co, &c);
    if (e < 0)
        return e;
    r->gen++;
    ssize_t res = rbd_req_wait_co(r, &q, c,
                                  rbd_aio_discard(r->image, off, len, c));
    r->gen++;
    if (res < 0)
        return (int)res;
    if (flags & BACKEND_FUA)
        return rbd_flush_co(b, co);
    return 0;
}

static int rbd_block_status_co(struct backend *b, struct coro *co,
                               uint64_t off, uint64_t len, uint64_t *pnum,
                               unsigned *status)
{
    struct rbd_backend *r = rb(b);
    if (off >= r->image_size) { /* cannot happen (off < b->size) */
        *pnum = len;
        *status = BACKEND_STATUS_ZERO;
        return 0;
    }
    if (!r->bs_valid || r->bs_gen != r->gen || off < r->bs_start ||
        off >= r->bs_end) {
        struct rbd_job j = {
            .kind = RBD_JOB_DIFF,
            .off = off,
            .len = MIN(RBD_BS_WINDOW, r->image_size - off),
        };
        uint64_t gen = r->gen;
        int ret = rbd_job_run_co(r, co, &j);
        if (ret < 0) {
            free(j.ext);
            return ret;
        }
        free(r->bs_ext);
        r->bs_ext = j.ext;
        r->bs_n = j.n_ext;
        r->bs_start = j.off;
        r->bs_end = j.off + j.len;
        r->bs_gen = gen; /* stale at once if anything changed meanwhile */
        r->bs_valid = true;
    }
    uint64_t end = MIN(off + len, r->bs_end);
    /* first extent ending after off (the window holds few: bsearch is not
     * worth it below a few thousand, and a window has at most 256 objects
     * of the default 4 MiB) */
    size_t i = 0;
    while (i < r->bs_n && r->bs_ext[i].off + r->bs_ext[i].len <= off)
        i++;
    if (i < r->bs_n && r->bs_ext[i].off <= off) {
        *status = BACKEND_STATUS_DATA;
        *pnum = MIN(r->bs_ext[i].off + r->bs_ext[i].len, end) - off;
    } else {
        *status = BACKEND_STATUS_ZERO;
        *pnum = (i < r->bs_n ? MIN(r->bs_ext[i].off, end) : end) - off;
    }
    assert(*pnum > 0 && *pnum <= len);
    return 0;
}

static int rbd_truncate_co(struct backend *b, struct coro *co, uint64_t size)
{
    struct rbd_backend *r = rb(b);
    co_mutex_lock_co(&r->resize_lock, co);
    r->gen++;
    int ret = rbd_resize_co(r, co, size);
    if (ret == 0) {
        r->image_size = size;
        b->size = size;
    }
    r->gen++;
    co_mutex_unlock(&r->resize_lock, co);
    return ret;
}

/* ---- open and close ---- */

static unsigned rbd_caps(bool read_only)
{
    return read_only ? BACKEND_CAN_EXTENTS
                     : BACKEND_CAN_ZERO | BACKEND_CAN_TRIM |
                       BACKEND_CAN_EXTENTS | BACKEND_CAN_RESIZE;
}

/* Read-only <-> read-write (block-commit writes into its base): a new
 * image handle on the same io context, then the old one is closed.  The
 * old handle's cache is flushed first, and a failure leaves everything as
 * it was.  Control path: synchronous, bounded by the operation timeout. */
static int rbd_backend_reopen(struct backend *b, bool read_only,
                              struct error **errp)
{
    struct rbd_backend *r = rb(b);
    assert(r->inflight == 0 && !r->efd_armed);
    if (!read_only && r->spec.snap)
        return error_setf(errp, EROFS, "%s: a snapshot is read-only",
                          r->where);
    if (b->read_only == read_only)
        return 0;
    int e;
    if (!b->read_only) {
        if (r->flush_failed)
            return error_setf(errp, EIO, "%s: a flush failed earlier: writes "
                              "may be lost", r->where);
        if (r->image_size > b->size && rbd_resize(r->image, b->size) == 0)
            r->image_size = b->size; /* the growth slack, as at close */
        e = rbd_flush(r->image);
        if (e < 0)
            return error_setf(errp, -e, "%s: flush before reopening: %s",
                              r->where, strerror(-e));
    }
    rbd_image_t img;
    e = read_only ? rbd_open_read_only(r->ioctx, r->spec.image, &img, NULL)
                  : rbd_open(r->ioctx, r->spec.image, &img, NULL);
    if (e < 0)
        return error_setf(errp, -e, "%s: reopening %s: %s", r->where,
                          read_only ? "read-only" : "read-write",
                          strerror(-e));
    uint64_t size;
    e = rbd_get_size(img, &size);
    if (e == 0)
        e = rbd_set_image_notification(img, r->efd, EVENT_TYPE_EVENTFD);
    if (e < 0) {
        rbd_close(img);
        return error_setf(errp, -e, "%s: reopening: %s", r->where,
                          strerror(-e));
    }
    rbd_image_t old = r->image;
    r->image = img; /* the helper thread is idle: nothing in flight */
    e = rbd_close(old);
    if (e < 0)
        log_warn("%s: closing the previous handle: %s", r->where,
                 strerror(-e));
    r->image_size = size;
    b->size = size;
    b->read_only = read_only;
    b->caps = rbd_caps(read_only);
    r->bs_valid = false;
    return 0;
}


/* ---- shared cluster connections ----
 *
 * Images opened with the same connection settings (user, configuration,
 * keyring, timeouts, Ceph options, cache mode) share one rados_t: one set
 * of messenger and timer threads and one monitor session, not one per
 * image (about 16 threads and 2 MiB each, measured), and opening a second
 * image skips the connect.  Like the kernel's rbd client (and unlike
 * QEMU's, which connects per drive).  The registry is process-wide, as
 * librados' own state is: opens and closes run on offload threads. */
struct rbd_conn {
    char *key;
    rados_t cluster;
    bool writeback;
    unsigned refs;
    struct rbd_conn *next;
};

static pthread_mutex_t rbd_conns_lock = PTHREAD_MUTEX_INITIALIZER;
static struct rbd_conn *rbd_conns;

/* Everything of the spec that shapes the connection, as one string. */
static char *rbd_conn_key(const struct rbd_spec *s, bool direct)
{
    struct rbd_spec k = *s; /* shallow: only formatted */
    k.pool = k.image = (char *)"";
    k.ns = k.snap = NULL;
    k.timeout_set = k.connect_timeout_set = true;
    char *text = rbd_spec_format(&k), *key = NULL;
    if (text && asprintf(&key, "%s|direct=%d", text, direct) < 0)
        key = NULL;
    free(text);
    return key;
}

static struct rbd_conn *rbd_conn_find_locked(const char *key)
{
    for (struct rbd_conn *c = rbd_conns; c; c = c->next)
        if (!strcmp(c->key, key)) {
            c->refs++;
            return c;
        }
    return NULL;
}

static struct rbd_conn *rbd_conn_find(const char *key)
{
    pthread_mutex_lock(&rbd_conns_lock);
    struct rbd_conn *c = rbd_conn_find_locked(key);
    pthread_mutex_unlock(&rbd_conns_lock);
    return c;
}

/* Registers a new connection (takes key and cluster), unless another open
 * registered one with the same key meanwhile: then that one is used and
 * cluster shut down.  NULL when out of memory (cluster shut down). */
static struct rbd_conn *rbd_conn_add(char *key, rados_t cluster,
                                     bool writeback)
{
    pthread_mutex_lock(&rbd_conns_lock);
    struct rbd_conn *c = rbd_conn_find_locked(key);
    if (!c && (c = calloc(1, sizeof(*c)))) {
        c->key = key;
        c->cluster = cluster;
        c->writeback = writeback;
        c->refs = 1;
        c->next = rbd_conns;
        rbd_conns = c;
        key = NULL;
        cluster = NULL;
    }
    pthread_mutex_unlock(&rbd_conns_lock);
    free(key);
    if (cluster)
        rados_shutdown(cluster);
    return c;
}

static void rbd_conn_release(struct rbd_conn *c)
{
    pthread_mutex_lock(&rbd_conns_lock);
    bool last = --c->refs == 0;
    if (last) {
        struct rbd_conn **pp = &rbd_conns;
        while (*pp != c)
            pp = &(*pp)->next;
        *pp = c->next;
    }
    pthread_mutex_unlock(&rbd_conns_lock);
    if (last) {
        rados_shutdown(c->cluster);
        free(c->key);
        free(c);
    }
}

static void rbd_backend_close(struct backend *b)
{
    struct rbd_backend *r = rb(b);
    /* The contract: nothing in flight (hence no eventfd read in the ring). */
    assert(r->inflight == 0 && !r->efd_armed);
    if (r->inflight || r->efd_armed) {
        /* Only a caller's bug gets here (asserts compiled out): the ring
         * and librbd still point into r, so leak it rather than free it. */
        log_error("%s: closed with %u operations in flight; not released",
                  r->where, r->inflight);
        return;
    }
    if (r->thread_started) {
        pthread_mutex_lock(&r->jobs_lock);
        r->stop = true;
        pthread_cond_signal(&r->jobs_cond);
        pthread_mutex_unlock(&r->jobs_lock);
        pthread_join(r->thread, NULL);
    }
    if (r->image) {
        if (!b->read_only && r->image_size > b->size) {
            /* give back the growth slack: the image ends where its data do */
            int e = rbd_resize(r->image, b->size);
            if (e < 0)
                log_warn("%s: shrinking to %llu bytes at close: %s", r->where,
                         (unsigned long long)b->size, strerror(-e));
        }
        int e = rbd_close(r->image);
        if (e < 0)
            log_warn("%s: close: %s", r->where, strerror(-e));
    }
    if (r->ioctx)
        rados_ioctx_destroy(r->ioctx);
    if (r->conn)
        rbd_conn_release(r->conn);
    else if (r->cluster)
        rados_shutdown(r->cluster);
    if (r->efd >= 0)
        close(r->efd);
    pthread_cond_destroy(&r->jobs_cond);
    pthread_mutex_destroy(&r->jobs_lock);
    free(r->bs_ext);
    rbd_spec_clear(&r->spec);
    free(r->where);
    free(b->name);
    free(r);
}

static int rbd_conf_set(struct rbd_backend *r, const char *key, const char *val,
                   struct error **errp)
{
    int e = rados_conf_set(r->cluster, key, val);
    if (e == -ENOENT)
        return error_setf(errp, EINVAL, "%s: '%s' is not a Ceph option",
                          r->where, key);
    if (e < 0)
        return error_setf(errp, -e, "%s: Ceph option %s=%s: %s", r->where,
                          key, val, strerror(-e));
    return 0;
}

static int rbd_set_uint(struct rbd_backend *r, const char *key, unsigned v,
                        struct error **errp)
{
    char buf[24];
    snprintf(buf, sizeof(buf), "%u", v);
    return rbd_conf_set(r, key, buf, errp);
}

/* Sets up and connects a new cluster handle in r->cluster (and
 * r->writeback). */
static int rbd_cluster_connect(struct rbd_backend *r,
                               const struct backend_open_opts *opts,
                               struct error **errp)
{
    const struct rbd_spec *s = &r->spec;
    const char *user = s->id ? s->id : "admin";
    int e = rados_create(&r->cluster, s->id);
    if (e < 0) {
        r->cluster = NULL;
        return error_setf(errp, -e, "%s: cannot create a Ceph client: %s",
                          r->where, strerror(-e));
    }
    if (s->conf) {
        e = rados_conf_read_file(r->cluster, s->conf);
        if (e < 0)
            return error_setf(errp, -e, "%s: cannot read the Ceph "
                              "configuration %s: %s", r->where, s->conf,
                              strerror(-e));
    } else {
        /* $CEPH_CONF or Ceph's search path; mon_host may come from the
         * spec instead, so a missing file is no error here */
        (void)rados_conf_read_file(r->cluster, NULL);
    }
    (void)rados_conf_parse_env(r->cluster, NULL); /* $CEPH_ARGS */
    if (s->keyring && rbd_conf_set(r, "keyring", s->keyring, errp) < 0)
        return -EINVAL;
    if (rbd_set_uint(r, "client_mount_timeout", s->connect_timeout, errp) < 0)
        return -EINVAL;
    if (s->timeout &&
        (rbd_set_uint(r, "rados_osd_op_timeout", s->timeout, errp) < 0 ||
         rbd_set_uint(r, "rados_mon_op_timeout", s->timeout, errp) < 0))
        return -EINVAL;
    /* cache=none: no librbd cache, as QEMU does */
    if (opts->direct && rbd_conf_set(r, "rbd_cache", "false", errp) < 0)
        return -EINVAL;
    /* With operation timeouts, librbd's writeback cache can drop writes it
     * acknowledged when their writeback times out.  So the cache only
     * writes through (it still serves reads): a write completes once the
     * OSDs have it, or fails.  (A Ceph option in the spec, applied next,
     * can say otherwise.) */
    if (s->timeout && rbd_conf_set(r, "rbd_cache_max_dirty", "0", errp) < 0)
        return -EINVAL;
    for (size_t i = 0; i < s->n_opts; i++)
        if (rbd_conf_set(r, s->opts[i].key, s->opts[i].val, errp) < 0)
            return -EINVAL;
    char cache[16] = "", dirty[32] = "";
    if (rados_conf_get(r->cluster, "rbd_cache", cache, sizeof(cache)) == 0 &&
        rados_conf_get(r->cluster, "rbd_cache_max_dirty", dirty,
                       sizeof(dirty)) == 0)
        r->writeback = strcmp(cache, "true") == 0 && strcmp(dirty, "0") != 0;
    else
        r->writeback = true; /* cannot tell: assume the worst */
    /* Zero-copy writes: librbd sends straight from the request's buffer
     * instead of copying it first.  That is safe here, unlike for a guest
     * whose pages may change under an in-flight write: the buffer is the
     * NBD request's, untouched until the write completes, and librbd holds
     * the completion until it has let go of the buffer.  Not with a
     * writeback cache, which would keep the buffer (and so the request)
     * until its writeback.  rbd_disable_zero_copy_writes in the spec
     * wins. */
    bool zc_given = false;
    for (size_t i = 0; i < s->n_opts; i++)
        zc_given |= strcmp(s->opts[i].key, "rbd_disable_zero_copy_writes") == 0;
    if (!r->writeback && !zc_given &&
        rbd_conf_set(r, "rbd_disable_zero_copy_writes", "false", errp) < 0)
        return -EINVAL;

    e = rados_connect(r->cluster);
    if (e == -ETIMEDOUT)
        return error_setf(errp, ETIMEDOUT, "%s: no answer from the Ceph "
                          "monitors within %u s (check mon_host in the Ceph "
                          "configuration)", r->where, s->connect_timeout);
    if (e == -EACCES || e == -EPERM)
        return error_setf(errp, EACCES, "%s: the Ceph cluster refused "
                          "client.%s: bad key or no such user (check the "
                          "keyring)", r->where, user);
    if (e == -ENOENT)
        return error_setf(errp, ENOENT, "%s: cannot connect as client.%s: no "
                          "monitor address or no keyring with its key (check "
                          "conf=, keyring= and id=)", r->where, user);
    if (e < 0)
        return error_setf(errp, -e, "%s: cannot connect to the Ceph cluster "
                          "as client.%s: %s", r->where, user, strerror(-e));
    return 0;
}

/* A connection for r (shared when one with the same settings is open), and
 * an I/O context on its pool and namespace. */
static int rbd_connect(struct rbd_backend *r, const struct backend_open_opts *opts,
                       struct error **errp)
{
    const struct rbd_spec *s = &r->spec;
    int e = rbd_dl_load(errp); /* the first rbd: export loads librbd */
    if (e < 0)
        return e;
    char *key = rbd_conn_key(s, opts->direct);
    if (!key)
        return error_setf(errp, ENOMEM, "out of memory");
    r->conn = rbd_conn_find(key);
    if (r->conn) {
        free(key);
    } else {
        e = rbd_cluster_connect(r, opts, errp);
        if (e < 0) {
            free(key);
            return e;
        }
        r->conn = rbd_conn_add(key, r->cluster, r->writeback);
        if (!r->conn) {
            r->cluster = NULL; /* shut down by rbd_conn_add */
            return error_setf(errp, ENOMEM, "out of memory");
        }
    }
    r->cluster = r->conn->cluster;
    r->writeback = r->conn->writeback;

    e = rados_ioctx_create(r->cluster, s->pool, &r->ioctx);
    if (e < 0) {
        r->ioctx = NULL;
        if (e == -ENOENT)
            return error_setf(errp, ENOENT, "%s: pool '%s' does not exist",
                              r->where, s->pool);
        return error_setf(errp, -e, "%s: pool '%s': %s", r->where, s->pool,
                          strerror(-e));
    }
    if (s->ns)
        rados_ioctx_set_namespace(r->ioctx, s->ns);

    return 0;
}

/* Creates the image (opts->create): format 2 with the cluster's default
 * features and object size, of opts->create_size bytes.  An existing image
 * is an error, never reused. */
static int rbd_create_image(struct rbd_backend *r,
                            const struct backend_open_opts *opts,
                            struct error **errp)
{
    const struct rbd_spec *s = &r->spec;
    if (s->snap)
        return error_setf(errp, EINVAL, "%s: cannot create a snapshot "
                          "(name an image without @SNAP)", r->where);
    int order = 0; /* the cluster's default object size */
    int e = rbd_create(r->ioctx, s->image, opts->create_size, &order);
    if (e == -EEXIST)
        return error_setf(errp, EEXIST, "%s: image '%s' already exists in "
                          "pool '%s'", r->where, s->image, s->pool);
    if (e == -EACCES || e == -EPERM)
        return error_setf(errp, EACCES, "%s: client.%s may not create images "
                          "in pool '%s' (its caps)", r->where,
                          s->id ? s->id : "admin", s->pool);
    if (e < 0)
        return error_setf(errp, -e, "%s: cannot create the image: %s",
                          r->where, strerror(-e));
    log_info("%s: created (%llu bytes)", r->where,
             (unsigned long long)opts->create_size);
    return 0;
}

static int rbd_open_image(struct rbd_backend *r, struct error **errp)
{
    const struct rbd_spec *s = &r->spec;
    const char *user = s->id ? s->id : "admin";
    int e;
    if (r->b.read_only)
        e = rbd_open_read_only(r->ioctx, s->image, &r->image, s->snap);
    else
        e = rbd_open(r->ioctx, s->image, &r->image, NULL);
    if (e < 0) {
        r->image = NULL;
        if (e == -ENOENT && s->snap)
            return error_setf(errp, ENOENT, "%s: no image '%s' with a "
                              "snapshot '%s' in pool '%s'%s%s", r->where,
                              s->image, s->snap, s->pool,
                              s->ns ? " namespace " : "", s->ns ? s->ns : "");
        if (e == -ENOENT)
            return error_setf(errp, ENOENT, "%s: image '%s' does not exist in "
                              "pool '%s'%s%s", r->where, s->image, s->pool,
                              s->ns ? " namespace " : "", s->ns ? s->ns : "");
        if (e == -EACCES || e == -EPERM)
            return error_setf(errp, EACCES, "%s: client.%s may not open this "
                              "image (its caps)", r->where, user);
        return error_setf(errp, -e, "%s: cannot open the image: %s", r->where,
                          strerror(-e));
    }
    e = rbd_get_size(r->image, &r->image_size);
    if (e < 0)
        return error_setf(errp, -e, "%s: cannot get the image size: %s",
                          r->where, strerror(-e));
    return 0;
}

static const struct backend_ops rbd_ops = {
    .name = "rbd",
    .preadv_co = rbd_preadv_co,
    .pwritev_co = rbd_pwritev_co,
    .flush_co = rbd_flush_co,
    .zero_co = rbd_zero_co,
    .discard_co = rbd_discard_co,
    .block_status_co = rbd_block_status_co,
    .truncate_co = rbd_truncate_co,
    .cache_co = NULL, /* librbd has no prefetch call; its own readahead
                         follows sequential reads */
    .reopen = rbd_backend_reopen,
    .close = rbd_backend_close,
};

struct backend *rbd_backend_open(struct loop *loop, const char *spec,
                                 const struct backend_open_opts *opts,
                                 struct error **errp)
{
    bool created = false; /* by this open: removed again if it fails */
    struct rbd_backend *r = calloc(1, sizeof(*r));
    if (!r) {
        error_setf(errp, ENOMEM, "out of memory");
        return NULL;
    }
    r->efd = -1;
    pthread_mutex_init(&r->jobs_lock, NULL);
    pthread_cond_init(&r->jobs_cond, NULL);
    r->b.loop = loop;
    r->b.align = 1;
    r->efd_op.done = rbd_efd_done;
    if (rbd_spec_parse(spec, &r->spec, errp) < 0)
        goto fail;
    const struct rbd_spec *s = &r->spec;
    r->b.name = strdup(spec);
    if (asprintf(&r->where, "rbd:%s/%s%s%s%s%s", s->pool, s->ns ? s->ns : "",
                 s->ns ? "/" : "", s->image, s->snap ? "@" : "",
                 s->snap ? s->snap : "") < 0)
        r->where = NULL;
    if (!r->b.name || !r->where) {
        error_setf(errp, ENOMEM, "out of memory");
        goto fail;
    }
    r->b.read_only = opts->read_only || s->snap != NULL;

    if (rbd_connect(r, opts, errp) < 0)
        goto fail;
    if (opts->create) {
        if (rbd_create_image(r, opts, errp) < 0)
            goto fail;
        created = true;
    }
    if (rbd_open_image(r, errp) < 0)
        goto fail;

    r->efd = eventfd(0, EFD_CLOEXEC);
    if (r->efd < 0) {
        error_setf(errp, errno, "%s: eventfd: %s", r->where, strerror(errno));
        goto fail;
    }
    int e = rbd_set_image_notification(r->image, r->efd, EVENT_TYPE_EVENTFD);
    if (e < 0) {
        error_setf(errp, -e, "%s: rbd_set_image_notification: %s", r->where,
                   strerror(-e));
        goto fail;
    }

    /* The helper thread takes no signal: they are the loop's business. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    e = pthread_create(&r->thread, NULL, rbd_thread_main, r);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (e != 0) {
        error_setf(errp, e, "%s: cannot start a thread: %s", r->where,
                   strerror(e));
        goto fail;
    }
    r->thread_started = true;

    r->b.ops = &rbd_ops;
    r->b.size = r->image_size;
    r->b.caps = rbd_caps(r->b.read_only);
    return &r->b;

fail:
    if (created) {
        /* nobody has seen the new image: it goes with the failed open */
        if (r->image) {
            rbd_close(r->image);
            r->image = NULL;
        }
        int e2 = rbd_remove(r->ioctx, r->spec.image);
        if (e2 < 0)
            log_warn("%s: removing the image just created: %s", r->where,
                     strerror(-e2));
    }
    rbd_backend_close(&r->b);
    return NULL;
}

int rbd_backend_remove(const char *spec, struct error **errp)
{
    struct rbd_backend *r = calloc(1, sizeof(*r));
    if (!r)
        return error_setf(errp, ENOMEM, "out of memory");
    r->efd = -1;
    pthread_mutex_init(&r->jobs_lock, NULL);
    pthread_cond_init(&r->jobs_cond, NULL);
    r->b.read_only = true;
    int e = rbd_spec_parse(spec, &r->spec, errp);
    if (e == 0 && !(r->b.name = strdup(spec)))
        e = error_setf(errp, ENOMEM, "out of memory");
    if (e == 0 && asprintf(&r->where, "rbd:%s/%s%s%s", r->spec.pool,
                           r->spec.ns ? r->spec.ns : "",
                           r->spec.ns ? "/" : "", r->spec.image) < 0) {
        r->where = NULL;
        e = error_setf(errp, ENOMEM, "out of memory");
    }
    struct backend_open_opts opts = {.read_only = true};
    if (e == 0)
        e = rbd_connect(r, &opts, errp);
    if (e == 0 && r->spec.snap)
        e = error_setf(errp, EINVAL, "%s: names a snapshot, not an image",
                       spec);
    if (e == 0) {
        e = rbd_remove(r->ioctx, r->spec.image);
        if (e < 0)
            error_setf(errp, -e, "%s: cannot remove the image: %s", r->where,
                       strerror(-e));
        else
            log_info("%s: removed", r->where);
    }
    rbd_backend_close(&r->b);
    return e < 0 ? e : 0;
}
