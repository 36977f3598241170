/* strata — qcow2 writes: allocation, copy-on-write, zeroing and discard.
 *
 * A guest write is cut into steps.  Each step takes the image lock, looks
 * at the first cluster it touches, and goes one of two ways:
 *
 *   overwrite in place   the cluster is allocated in this image and only
 *                        referenced here (NORMAL and COPIED): the data goes
 *                        to its host cluster, no metadata changes;
 *   allocate             otherwise, in three steps:
 *     plan               choose the guest clusters (a run inside one L2
 *                        table that all need a new host cluster) and get
 *                        host clusters for them (refcount 1), or keep the
 *                        cluster's own host cluster (extended L2, or a
 *                        preallocated zero cluster);
 *     copy-on-write      without the lock: the untouched head and tail of
 *                        the new clusters are read from the old content
 *                        (backing file, compressed or shared cluster) and
 *                        written together with the guest data;
 *     link               under the lock again: the L2 entries point at the
 *                        new clusters, the old clusters are freed once the
 *                        L2 tables that dropped them are on disk.
 *
 * A planned allocation registers its guest clusters in s->allocs before
 * the lock is dropped; a step whose first cluster is in there waits for it
 * and plans again, because the mapping it looked up is stale.  So does a
 * step whose allocation dropped the lock (a new refcount block, or the
 * growth of the refcount table, are written without it): it gives its
 * clusters back and plans again.  The copy-on-write runs while the
 * clusters are registered, so a concurrent guest write to them cannot be
 * overwritten by stale old content.
 */
#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "byteorder.h"
#include "log.h"
#include "qcow2.h"

/* ====================== in-flight allocations ====================== */

static struct qcow2_alloc *alloc_overlapping_locked(struct qcow2 *s,
                                                    uint64_t gstart,
                                                    uint64_t gend)
{
    assert(co_mutex_locked(&s->lock));
    for (struct qcow2_alloc *a = s->allocs; a; a = a->next)
        if (a->gstart < gend && gstart < a->gend)
            return a;
    return NULL;
}

static void alloc_add_locked(struct qcow2 *s, struct qcow2_alloc *a,
                             uint64_t gstart, uint64_t gend)
{
    assert(co_mutex_locked(&s->lock));
    a->gstart = gstart;
    a->gend = gend;
    a->waiters.head = a->waiters.tail = NULL;
    a->prev = NULL;
    a->next = s->allocs;
    if (s->allocs)
        s->allocs->prev = a;
    s->allocs = a;
}

static void alloc_del_locked(struct qcow2 *s, struct qcow2_alloc *a)
{
    assert(co_mutex_locked(&s->lock));
    if (a->prev)
        a->prev->next = a->next;
    else
        s->allocs = a->next;
    if (a->next)
        a->next->prev = a->prev;
    co_queue_wake_all(&a->waiters);
}

/* Waits (dropping the lock) until no allocation overlaps guest bytes
 * [gstart, gend).  Returns true if it had to wait (the caller must look
 * the mapping up again). */
static bool wait_allocs_locked_co(struct qcow2 *s, struct coro *co,
                                  uint64_t gstart, uint64_t gend)
{
    assert(co_mutex_held(&s->lock, co));
    struct qcow2_alloc *a = alloc_overlapping_locked(s, gstart, gend);
    if (!a)
        return false;
    co_mutex_unlock(&s->lock, co);
    co_queue_wait_co(&a->waiters, co);
    qcow2_lock_co(s, co);
    return true;
}

/* ====================== pending frees ====================== */

int qcow2_defer_free_locked_co(struct qcow2 *s, struct coro *co,
                               const struct qcow2_l2_entry *e)
{
    assert(co_mutex_held(&s->lock, co));
    uint64_t off, len;
    switch (e->type) {
    case QCOW2_CLUSTER_COMPRESSED:
        off = e->host_offset & ~UINT64_C(511);
        len = (uint64_t)e->nb_sectors * 512;
        break;
    case QCOW2_CLUSTER_NORMAL:
    case QCOW2_CLUSTER_ZERO_ALLOC:
    case QCOW2_CLUSTER_UNALLOCATED_ALLOC:
        if (!e->host_offset)
            return 0;
        off = e->host_offset;
        len = qcow2_cs(s);
        break;
    default:
        return 0;
    }
    return qcow2_defer_free_range_locked(s, off, len);
}

int qcow2_defer_free_range_locked(struct qcow2 *s, uint64_t off,
                                  uint64_t len)
{
    assert(co_mutex_locked(&s->lock));
    if (s->n_frees == s->cap_frees) {
        size_t cap = s->cap_frees ? s->cap_frees * 2 : 64;
        struct qcow2_pending_free *nf = realloc(s->frees, cap * sizeof(*nf));
        if (!nf)
            return -ENOMEM; /* the cluster leaks: harmless */
        s->frees = nf;
        s->cap_frees = cap;
    }
    s->frees[s->n_frees].off = off;
    s->frees[s->n_frees].len = len;
    s->n_frees++;
    return 0;
}

/* Bounds the pending frees: once too many are queued, the request that
 * finds them flushes (without the lock) to release them. */
static int flush_if_frees_full_co(struct qcow2 *s, struct coro *co)
{
    if (s->n_frees < QCOW2_MAX_PENDING_FREES)
        return 0;
    return qcow2_flush_own_co(&s->node, co);
}

/* ====================== copy-on-write source ====================== */

/* Guest-visible content, for guest bytes [off, off + len) inside one
 * cluster whose (old) entry is e, into buf: what a new cluster must hold
 * where the guest does not write.  Without the lock; the old clusters
 * cannot be reused meanwhile (they are only freed by a flush after the
 * new entry is linked). */
static int read_old_content_co(struct qcow2 *s, struct coro *co,
                               const struct qcow2_l2_entry *e, uint64_t raw,
                               uint64_t off, uint64_t len, uint8_t *buf)
{
    const uint64_t cs = qcow2_cs(s);
    const uint64_t unit = s->h.subcluster_size;
    uint64_t end = off + len;
    while (off < end) {
        unsigned sc = s->h.extended_l2
                          ? (unsigned)((off & (cs - 1)) >> s->h.subcluster_bits)
                          : 0;
        enum qcow2_cluster_type t = qcow2_subcluster_type(&s->h, e, sc);
        uint64_t n = ((off | (unit - 1)) + 1) - off;
        /* Merge subclusters of the same kind into one I/O. */
        while (off + n < end && s->h.extended_l2) {
            unsigned sc2 = (unsigned)(((off + n) & (cs - 1)) >>
                                      s->h.subcluster_bits);
            if (qcow2_subcluster_type(&s->h, e, sc2) != t)
                break;
            n += unit;
        }
        if (off + n > end)
            n = end - off;
        int r = 0;
        struct iovec v = {buf, n};
        switch (t) {
        case QCOW2_CLUSTER_NORMAL:
            r = backend_pread_co(s->node.file, co, buf, n,
                                 e->host_offset + (off & (cs - 1)));
            break;
        case QCOW2_CLUSTER_COMPRESSED:
            /* No yield between the load and the copy: see
             * qcow2_load_compressed_co. */
            r = qcow2_load_compressed_co(s, co, e, raw);
            if (r == 0)
                memcpy(buf, s->zbuf + (off & (cs - 1)), n);
            break;
        case QCOW2_CLUSTER_ZERO_PLAIN:
        case QCOW2_CLUSTER_ZERO_ALLOC:
            memset(buf, 0, n);
            break;
        case QCOW2_CLUSTER_UNALLOCATED:
        case QCOW2_CLUSTER_UNALLOCATED_ALLOC:
            r = qcow2_read_backing_co(s, co, &v, 1, off);
            break;
        }
        if (r < 0)
            return r;
        off += n;
        buf += n;
    }
    return 0;
}

/* ====================== step: overwrite in place ====================== */

/* The run m (NORMAL, COPIED) starts at guest offset off: writes up to len
 * bytes of it where they are.  Called with the lock, returns without it:
 * the data I/O runs unlocked, its host range marked busy so that the
 * allocator does not hand it out if a discard frees it meanwhile. */
static int overwrite_in_place_locked_co(struct qcow2 *s, struct coro *co,
                                        const struct qcow2_map *m,
                                        const struct iovec *iov, int iovcnt,
                                        uint64_t skip, uint64_t len,
                                        unsigned flags, uint64_t *done)
{
    assert(co_mutex_held(&s->lock, co));
    assert(m->type == QCOW2_CLUSTER_NORMAL && m->copied);
    uint64_t n = m->len < len ? m->len : len;
    int r = qcow2_check_meta_overlap_locked(s, m->host, n, "a data cluster");
    if (r < 0) {
        co_mutex_unlock(&s->lock, co);
        return r;
    }
    struct qcow2_busy busy;
    qcow2_busy_add(s, &busy, m->host, n);
    co_mutex_unlock(&s->lock, co);
    struct iov_slice sl;
    r = iov_slice_init(&sl, iov, iovcnt, skip, n);
    if (r == 0) {
        r = backend_pwritev_co(s->node.file, co, sl.v, sl.cnt, m->host,
                               (flags & FMT_FUA) ? BACKEND_FUA : 0);
        iov_slice_free(&sl);
    }
    qcow2_busy_del(s, &busy);
    *done = n;
    return r;
}

/* ====================== step: plan an allocation ====================== */

/* What an allocating write finds in one cluster. */
struct wclass {
    bool in_place;         /* every touched (sub)cluster is NORMAL+copied */
    bool keep_host;        /* allocate in the cluster's own host cluster */
    struct qcow2_l2_entry e;
    uint64_t raw, bitmap;  /* the old entry as on disk: the COW source */
};

/* Classifies the cluster at guest offset coff for a write of its bytes
 * [ws, we) (offsets inside the cluster). */
static int classify_locked_co(struct qcow2 *s, struct coro *co, uint64_t coff,
                              uint64_t ws, uint64_t we, struct wclass *w)
{
    assert(co_mutex_held(&s->lock, co));
    struct qcow2_map m;
    memset(w, 0, sizeof(*w));
    int r = qcow2_map_get_co(s, co, coff, qcow2_cs(s), &m);
    if (r < 0)
        return r;
    w->e = m.e;
    w->raw = m.raw;
    w->bitmap = m.bitmap;
    if (m.type == QCOW2_CLUSTER_UNALLOCATED && m.raw == 0 && m.bitmap == 0) {
        /* No L2 entry at all (maybe no L2 table). */
        memset(&w->e, 0, sizeof(w->e));
        w->e.type = QCOW2_CLUSTER_UNALLOCATED;
        return 0;
    }
    const struct qcow2_l2_entry *e = &m.e;
    if (!s->h.extended_l2) {
        w->in_place = e->type == QCOW2_CLUSTER_NORMAL && e->copied;
        w->keep_host = e->type == QCOW2_CLUSTER_ZERO_ALLOC && e->copied &&
                       e->host_offset;
        return 0;
    }
    if (!e->host_offset || !e->copied || e->type == QCOW2_CLUSTER_COMPRESSED)
        return 0;
    unsigned sa = (unsigned)(ws >> s->h.subcluster_bits);
    unsigned sb = (unsigned)((we - 1) >> s->h.subcluster_bits);
    bool all = true;
    for (unsigned sc = sa; sc <= sb; sc++)
        if (qcow2_subcluster_type(&s->h, e, sc) != QCOW2_CLUSTER_NORMAL)
            all = false;
    w->in_place = all;
    w->keep_host = !all;
    return 0;
}

/* An allocation decided under the lock, carried out without it. */
struct alloc_plan {
    uint64_t c0;            /* guest offset of the first cluster */
    uint64_t nclusters;     /* contiguous, inside one L2 table */
    uint64_t host;          /* host offset of the first new cluster */
    bool keep_host;         /* host is the first cluster's own (one
                               cluster, nothing allocated) */
    struct wclass first, last; /* old content of the first/last cluster */
    uint64_t off, wend;     /* guest bytes of this step's data */
    uint64_t rstart, rend;  /* guest bytes written to the host clusters:
                               data plus copy-on-write, whole clusters or
                               (keep_host with extended L2) subclusters */
};

/* Frees the clusters of a plan that will not be linked. */
static void plan_release_locked_co(struct qcow2 *s, struct coro *co,
                                   const struct alloc_plan *p)
{
    assert(co_mutex_held(&s->lock, co));
    if (!p->keep_host)
        qcow2_refcount_update_co(s, co, p->host, p->nclusters * qcow2_cs(s),
                                 -1);
}

/* Plans the allocation for guest bytes [off, off + len), whose first
 * cluster is not writable in place.  Sets *waited instead when that
 * cluster is being allocated by another request (it was waited for) or
 * the allocator dropped the lock: the caller looks again. */
static int plan_alloc_locked_co(struct qcow2 *s, struct coro *co, uint64_t off,
                                uint64_t len, struct alloc_plan *p,
                                bool *waited)
{
    assert(co_mutex_held(&s->lock, co));
    const uint64_t cs = qcow2_cs(s);
    const uint64_t table_span = cs << s->h.l2_bits;
    const uint64_t end = off + len;
    int r;

    memset(p, 0, sizeof(*p));
    p->off = off;
    p->c0 = qcow2_start_of_cluster(s, off);
    r = classify_locked_co(s, co, p->c0, off - p->c0,
                           (end < p->c0 + cs ? end : p->c0 + cs) - p->c0,
                           &p->first);
    if (r < 0)
        return r;
    *waited = wait_allocs_locked_co(s, co, p->c0, p->c0 + cs);
    if (*waited)
        return 0;

    /* The clusters this allocation covers: all need a new host cluster,
     * none is being allocated by someone else, one L2 table. */
    uint64_t table_end = (p->c0 & ~(table_span - 1)) + table_span;
    p->nclusters = 1;
    p->last = p->first;
    p->keep_host = p->first.keep_host;
    if (!p->keep_host) {
        while (p->c0 + p->nclusters * cs < end &&
               p->c0 + p->nclusters * cs < table_end) {
            uint64_t c = p->c0 + p->nclusters * cs;
            struct wclass wc;
            uint64_t we = end < c + cs ? end - c : cs;
            r = classify_locked_co(s, co, c, 0, we, &wc);
            if (r < 0)
                return r;
            if (wc.in_place || wc.keep_host ||
                alloc_overlapping_locked(s, c, c + cs))
                break;
            p->last = wc;
            p->nclusters++;
        }
    }

    if (p->keep_host) {
        p->host = p->first.e.host_offset;
    } else {
        uint64_t got;
        uint64_t gen = s->alloc_unlocked;
        r = qcow2_alloc_clusters_co(s, co, p->nclusters, &p->host, &got);
        if (r < 0)
            return r;
        if (gen != s->alloc_unlocked) {
            /* The allocator dropped the lock (it created a refcount block
             * or grew the refcount table): the mapping looked up above
             * may be stale, another request may be allocating the same
             * clusters.  Give these back and plan again. */
            qcow2_refcount_update_co(s, co, p->host, got * cs, -1);
            *waited = true;
            return 0;
        }
        if (got < p->nclusters) {
            p->nclusters = got;
            /* The last cluster's old entry is needed for the tail COW. */
            uint64_t c = p->c0 + (p->nclusters - 1) * cs;
            uint64_t we = end < c + cs ? end - c : cs;
            r = classify_locked_co(s, co, c, 0, we, &p->last);
            if (r < 0) {
                plan_release_locked_co(s, co, p);
                return r;
            }
        }
        r = qcow2_check_meta_overlap_locked(s, p->host, p->nclusters * cs,
                                            "a data cluster");
        if (r < 0)
            return r;
    }

    uint64_t gend = p->c0 + p->nclusters * cs;
    p->wend = end < gend ? end : gend;
    uint64_t unit = p->keep_host && s->h.extended_l2 ? s->h.subcluster_size
                                                     : cs;
    p->rstart = off & ~(unit - 1);
    p->rend = (p->wend + unit - 1) & ~(unit - 1);
    if (p->rend > gend)
        p->rend = gend;
    return 0;
}

/* ====================== step: copy-on-write ====================== */

/* Writes the step's guest data into the planned host clusters together
 * with the old content of the head [rstart, off) and tail [wend, rend)
 * that the guest does not write, in one write.  Without the lock. */
static int cow_write_co(struct qcow2 *s, struct coro *co,
                        const struct alloc_plan *p, const struct iovec *iov,
                        int iovcnt, uint64_t skip)
{
    uint64_t head = p->off - p->rstart, tail = p->rend - p->wend;
    bool head_needed = head > 0, tail_needed = tail > 0;
    if (p->keep_host && s->h.extended_l2) {
        /* Subclusters already holding data are not copied over. */
        unsigned sa = (unsigned)((p->rstart - p->c0) >> s->h.subcluster_bits);
        unsigned sb = (unsigned)((p->rend - 1 - p->c0) >>
                                 s->h.subcluster_bits);
        head_needed = head_needed &&
                      qcow2_subcluster_type(&s->h, &p->first.e, sa) !=
                          QCOW2_CLUSTER_NORMAL;
        tail_needed = tail_needed &&
                      qcow2_subcluster_type(&s->h, &p->first.e, sb) !=
                          QCOW2_CLUSTER_NORMAL;
    }
    uint8_t *hbuf = NULL, *tbuf = NULL;
    struct iov_slice data = {0};
    struct iovec *v = NULL;
    int r = iov_slice_init(&data, iov, iovcnt, skip, p->wend - p->off);
    if (r == 0 && head_needed) {
        hbuf = qcow2_buf_alloc(s, head);
        r = hbuf ? read_old_content_co(s, co, &p->first.e, p->first.raw,
                                       p->rstart, head, hbuf)
                 : -ENOMEM;
    }
    if (r == 0 && tail_needed) {
        tbuf = qcow2_buf_alloc(s, tail);
        r = tbuf ? read_old_content_co(s, co, &p->last.e, p->last.raw,
                                       p->wend, tail, tbuf)
                 : -ENOMEM;
    }
    if (r == 0) {
        v = malloc(sizeof(*v) * (data.cnt + 2));
        if (!v)
            r = -ENOMEM;
    }
    if (r == 0) {
        int cnt = 0;
        uint64_t wstart = p->host + (p->rstart - p->c0);
        if (head_needed)
            v[cnt++] = (struct iovec){hbuf, head};
        else
            wstart += head;
        for (int i = 0; i < data.cnt; i++)
            v[cnt++] = data.v[i];
        if (tail_needed)
            v[cnt++] = (struct iovec){tbuf, tail};
        r = backend_pwritev_co(s->node.file, co, v, cnt, wstart, 0);
    }
    free(v);
    free(hbuf);
    free(tbuf);
    iov_slice_free(&data);
    return r;
}

/* ====================== step: link ====================== */

/* Points the plan's L2 entries at its host clusters.  All old entries are
 * checked before the first is replaced, so that this happens completely
 * or not at all.  The old clusters are freed once the L2 table is on disk
 * (pending frees). */
static int link_l2_locked_co(struct qcow2 *s, struct coro *co,
                             const struct alloc_plan *p)
{
    assert(co_mutex_held(&s->lock, co));
    const uint64_t cs = qcow2_cs(s);
    struct qcow2_cache_entry *l2 = NULL;
    unsigned idx;
    int r = qcow2_l2_for_write_co(s, co, p->c0, &l2, &idx);
    for (uint64_t i = 0; r == 0 && i < p->nclusters; i++) {
        uint64_t raw, bitmap;
        struct qcow2_l2_entry old;
        qcow2_l2_read(s, l2->table, idx + (unsigned)i, &raw, &bitmap);
        if (qcow2_l2_entry_decode(&s->h, raw, bitmap, &old) < 0)
            r = qcow2_corrupt(s, "invalid L2 entry %#llx",
                              (unsigned long long)raw);
    }
    for (uint64_t i = 0; r == 0 && i < p->nclusters; i++) {
        uint64_t raw, bitmap;
        struct qcow2_l2_entry old;
        qcow2_l2_read(s, l2->table, idx + (unsigned)i, &raw, &bitmap);
        qcow2_l2_entry_decode(&s->h, raw, bitmap, &old);
        uint64_t nraw = (p->host + i * cs) | QCOW2_OFLAG_COPIED;
        uint64_t nbitmap = 0;
        if (s->h.extended_l2) {
            if (p->keep_host) {
                unsigned sa = (unsigned)((p->rstart - p->c0) >>
                                         s->h.subcluster_bits);
                unsigned sb = (unsigned)((p->rend - p->c0) >>
                                         s->h.subcluster_bits);
                uint32_t bits = (uint32_t)(((UINT64_C(1) << sb) - 1) &
                                           ~((UINT64_C(1) << sa) - 1));
                uint32_t alloc_bits = (uint32_t)bitmap | bits;
                uint32_t zero_bits = (uint32_t)(bitmap >> 32) & ~bits;
                nbitmap = ((uint64_t)zero_bits << 32) | alloc_bits;
            } else {
                nbitmap = UINT32_MAX; /* every subcluster allocated */
            }
        }
        qcow2_l2_write(s, l2->table, idx + (unsigned)i, nraw, nbitmap);
        qcow2_cache_mark_dirty(&s->l2_cache, l2);
        /* A failure here only leaks the old cluster. */
        if (!p->keep_host)
            qcow2_defer_free_locked_co(s, co, &old);
    }
    if (l2)
        qcow2_cache_put(&s->l2_cache, l2);
    return r;
}

/* ====================== the write path ====================== */

/* Writes iov (guest bytes [off, off + len), len > 0) as far as one step
 * goes; *done is set to the bytes written, *meta_changed when clusters
 * were linked. */
static int write_step_co(struct qcow2 *s, struct coro *co,
                         const struct iovec *iov, int iovcnt, uint64_t skip,
                         uint64_t off, uint64_t len, unsigned flags,
                         bool *meta_changed, uint64_t *done)
{
    struct alloc_plan plan;
    int r;

    qcow2_lock_co(s, co);
    for (;;) {
        r = qcow2_make_room_locked_co(s, co, off, true);
        if (r < 0)
            goto out_unlock;
        if (!s->broken && !s->refcounts_audited) {
            r = qcow2_audit_refcounts_co(s, co);
            if (r < 0)
                goto out_unlock;
        }
        if (s->broken) {
            r = -EIO;
            goto out_unlock;
        }
        struct qcow2_map m;
        r = qcow2_map_get_co(s, co, off, len, &m);
        if (r < 0)
            goto out_unlock;
        if (m.type == QCOW2_CLUSTER_NORMAL && m.copied)
            return overwrite_in_place_locked_co(s, co, &m, iov, iovcnt, skip,
                                                len, flags, done);
        bool waited;
        r = plan_alloc_locked_co(s, co, off, len, &plan, &waited);
        if (r < 0)
            goto out_unlock;
        if (!waited)
            break;
        /* Another request allocated our first cluster meanwhile: its
         * mapping changed, look it up again. */
    }

    struct qcow2_alloc alloc;
    alloc_add_locked(s, &alloc, plan.c0,
                     plan.c0 + plan.nclusters * qcow2_cs(s));
    co_mutex_unlock(&s->lock, co);

    r = cow_write_co(s, co, &plan, iov, iovcnt, skip);

    qcow2_lock_co(s, co);
    if (r == 0)
        r = qcow2_make_room_locked_co(s, co, off, true);
    if (r == 0)
        r = link_l2_locked_co(s, co, &plan);
    if (r == 0)
        *meta_changed = true;
    else
        plan_release_locked_co(s, co, &plan); /* nothing points at them */
    alloc_del_locked(s, &alloc);
    *done = plan.wend - off;

out_unlock:
    co_mutex_unlock(&s->lock, co);
    return r;
}

int qcow2_pwritev_co(struct fmt_node *n, struct coro *co,
                     const struct iovec *iov, int iovcnt, uint64_t off,
                     unsigned flags)
{
    struct qcow2 *s = qcow2_of(n);
    uint64_t total = iov_size(iov, iovcnt), pos = 0;
    bool meta_changed = false;
    while (pos < total) {
        uint64_t done = 0;
        int r = write_step_co(s, co, iov, iovcnt, pos, off + pos, total - pos,
                              flags, &meta_changed, &done);
        if (r == 0)
            r = flush_if_frees_full_co(s, co);
        if (r < 0)
            return r;
        pos += done;
    }
    /* In-place pieces were written with FUA already; new clusters need
     * their metadata on disk too. */
    if ((flags & FMT_FUA) && meta_changed)
        return qcow2_flush_own_co(n, co);
    return 0;
}

/* ====================== zero and discard ====================== */

/* A cluster of zeros, allocated on first use, owned by the image (it is
 * only ever read, by several requests at once). */
static const uint8_t *zero_buffer(struct qcow2 *s)
{
    if (!s->zeros) {
        s->zeros = qcow2_buf_alloc(s, qcow2_cs(s));
        if (s->zeros)
            memset(s->zeros, 0, qcow2_cs(s));
    }
    return s->zeros;
}

static int write_zeros_co(struct qcow2 *s, struct coro *co, uint64_t off,
                          uint64_t len, unsigned flags)
{
    const uint64_t cs = qcow2_cs(s);
    while (len > 0) {
        const uint8_t *z = zero_buffer(s);
        if (!z)
            return -ENOMEM;
        uint64_t n = len < cs ? len : cs;
        struct iovec v = {(void *)z, n};
        int r = qcow2_pwritev_co(&s->node, co, &v, 1, off, flags & FMT_FUA);
        if (r < 0)
            return r;
        off += n;
        len -= n;
    }
    return 0;
}

enum zmode { Z_ZERO, Z_DISCARD };

/* Sets whole clusters [off, off + n*cs) (inside one L2 table) to read as
 * zeros (Z_ZERO) or deallocates them (Z_DISCARD).  Returns -ENOTSUP when
 * the format cannot do it without writing (version 2 with a backing file,
 * or without MAY_TRIM). */
static int zero_clusters_co(struct qcow2 *s, struct coro *co, uint64_t off,
                            uint64_t n, enum zmode mode, unsigned flags)
{
    const uint64_t cs = qcow2_cs(s);
    const bool backing = s->node.backing != NULL;
    int r = 0;
    qcow2_lock_co(s, co);
    r = qcow2_make_room_locked_co(s, co, off, true);
    if (r < 0)
        goto out;
    while (wait_allocs_locked_co(s, co, off, off + n * cs))
        ;
    if (!s->broken && !s->refcounts_audited) {
        r = qcow2_audit_refcounts_co(s, co);
        if (r < 0)
            goto out;
    }
    if (s->broken) {
        r = -EIO;
        goto out;
    }
    /* Version 2 with a backing file: a deallocated cluster would show the
     * backing file's (older) data, and there is no zero flag to hide it.
     * Discard is advisory, so keep the data, as QEMU does. */
    if (mode == Z_DISCARD && backing && !s->has_zero_flag)
        goto out;
    /* Nothing to do where no L2 table exists and nothing shows through. */
    uint64_t l1i = qcow2_l1_index(&s->h, off);
    if (be_get64(s->l1 + l1i * 8) == 0 && !backing)
        goto out;
    if (mode == Z_ZERO && !s->has_zero_flag &&
        (backing || !(flags & FMT_MAY_TRIM))) {
        r = -ENOTSUP;
        goto out;
    }

    struct qcow2_cache_entry *l2;
    unsigned idx;
    r = qcow2_l2_for_write_co(s, co, off, &l2, &idx);
    if (r < 0)
        goto out;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t raw, bitmap;
        qcow2_l2_read(s, l2->table, idx + (unsigned)i, &raw, &bitmap);
        struct qcow2_l2_entry old;
        if (qcow2_l2_entry_decode(&s->h, raw, bitmap, &old) < 0) {
            r = qcow2_corrupt(s, "invalid L2 entry %#llx",
                              (unsigned long long)raw);
            break;
        }
        uint64_t nraw, nbitmap = 0;
        bool keep = false;
        if (mode == Z_ZERO) {
            keep = !(flags & FMT_MAY_TRIM) && old.copied && old.host_offset &&
                   old.type != QCOW2_CLUSTER_COMPRESSED;
            if (s->h.extended_l2) {
                nraw = keep ? old.host_offset | QCOW2_OFLAG_COPIED : 0;
                nbitmap = (uint64_t)UINT32_MAX << 32; /* all zero */
            } else if (s->has_zero_flag) {
                nraw = (keep ? old.host_offset | QCOW2_OFLAG_COPIED : 0) |
                       QCOW2_OFLAG_ZERO;
            } else {
                nraw = 0; /* v2, no backing, may trim */
            }
        } else if (backing && s->has_zero_flag) {
            /* Deallocated, but the backing file must not show through. */
            nraw = s->h.extended_l2 ? 0 : QCOW2_OFLAG_ZERO;
            nbitmap = s->h.extended_l2 ? (uint64_t)UINT32_MAX << 32 : 0;
        } else {
            nraw = 0;
        }
        if (nraw == raw && nbitmap == bitmap)
            continue;
        qcow2_l2_write(s, l2->table, idx + (unsigned)i, nraw, nbitmap);
        qcow2_cache_mark_dirty(&s->l2_cache, l2);
        if (!keep) {
            r = qcow2_defer_free_locked_co(s, co, &old);
            if (r < 0)
                break;
        }
    }
    qcow2_cache_put(&s->l2_cache, l2);
out:
    co_mutex_unlock(&s->lock, co);
    return r;
}

static int zero_or_discard_co(struct qcow2 *s, struct coro *co, uint64_t off,
                              uint64_t len, enum zmode mode, unsigned flags)
{
    const uint64_t cs = qcow2_cs(s);
    const uint64_t table_span = cs << s->h.l2_bits;
    uint64_t end = off + len;
    while (off < end) {
        uint64_t c0 = qcow2_start_of_cluster(s, off);
        uint64_t cend = c0 + cs;
        if (off != c0 || end < cend) {
            /* Part of a cluster (or the image's last, short cluster). */
            uint64_t n = (end < cend ? end : cend) - off;
            if (cend > s->node.size && off == c0 && end == s->node.size) {
                /* The tail cluster of an image whose size is not a
                 * multiple of the cluster: handled as a whole cluster. */
                int r = zero_clusters_co(s, co, c0, 1, mode, flags);
                if (r != -ENOTSUP) {
                    if (r < 0)
                        return r;
                    off += n;
                    continue;
                }
            }
            if (mode == Z_ZERO) {
                if (flags & FMT_FAST)
                    return -ENOTSUP;
                int r = write_zeros_co(s, co, off, n, flags);
                if (r < 0)
                    return r;
            }
            /* discard of part of a cluster: advisory, nothing to do */
            off += n;
            continue;
        }
        uint64_t table_end = (c0 & ~(table_span - 1)) + table_span;
        uint64_t lim = end < table_end ? end : table_end;
        uint64_t n = (lim - c0) / cs;
        int r = zero_clusters_co(s, co, c0, n, mode, flags);
        if (r == -ENOTSUP && mode == Z_ZERO) {
            if (flags & FMT_FAST)
                return r;
            r = write_zeros_co(s, co, c0, n * cs, flags);
        }
        if (r == 0)
            r = flush_if_frees_full_co(s, co);
        if (r < 0)
            return r;
        off = c0 + n * cs;
    }
    if (flags & FMT_FUA)
        return qcow2_flush_own_co(&s->node, co);
    return 0;
}

int qcow2_zero_co(struct fmt_node *n, struct coro *co, uint64_t off,
                  uint64_t len, unsigned flags)
{
    return zero_or_discard_co(qcow2_of(n), co, off, len, Z_ZERO, flags);
}

int qcow2_discard_co(struct fmt_node *n, struct coro *co, uint64_t off,
                     uint64_t len, unsigned flags)
{
    return zero_or_discard_co(qcow2_of(n), co, off, len, Z_DISCARD,
                              flags & FMT_FUA);
}
