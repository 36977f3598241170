/* strata — the qcow2 format driver: open, read, write, zero, discard, flush
 * and block status.  See qcow2.h for how the driver is split, the locking
 * rules and the durability order.
 */
#include <assert.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "byteorder.h"
#include "log.h"
#include "qcow2.h"

/* ====================== small helpers ====================== */

int qcow2_corrupt(struct qcow2 *s, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (!s->broken)
        log_error("%s: corrupt qcow2 image: %s; no more writes to it",
                  s->node.filename, msg);
    s->broken = true;
    return -EIO;
}

void *qcow2_buf_alloc(const struct qcow2 *s, size_t len)
{
    void *p = NULL;
    size_t align = s->io_align > 64 ? s->io_align : 64;
    if (len == 0)
        len = 1;
    len = (len + align - 1) & ~(align - 1);
    if (posix_memalign(&p, align, len) != 0)
        return NULL;
    return p;
}

int qcow2_write_meta_co(struct qcow2 *s, struct coro *co, const uint8_t *buf,
                        uint64_t base, uint64_t buflen, uint64_t off,
                        uint64_t len)
{
    uint64_t a = s->io_align;
    uint64_t start = off & ~(a - 1);
    uint64_t end = (off + len + a - 1) & ~(a - 1);
    if (end > buflen)
        end = buflen;
    return backend_pwrite_co(s->node.file, co, buf + start, end - start,
                             base + start, 0);
}

void qcow2_busy_add(struct qcow2 *s, struct qcow2_busy *b, uint64_t hstart,
                    uint64_t len)
{
    b->hstart = hstart;
    b->hend = hstart + len;
    b->prev = NULL;
    b->next = s->busy;
    if (s->busy)
        s->busy->prev = b;
    s->busy = b;
}

void qcow2_busy_del(struct qcow2 *s, struct qcow2_busy *b)
{
    if (b->prev)
        b->prev->next = b->next;
    else
        s->busy = b->next;
    if (b->next)
        b->next->prev = b->prev;
}

bool qcow2_busy_overlaps(const struct qcow2 *s, uint64_t hstart, uint64_t len)
{
    for (const struct qcow2_busy *b = s->busy; b; b = b->next)
        if (b->hstart < hstart + len && hstart < b->hend)
            return true;
    return false;
}

static struct qcow2_alloc *alloc_overlapping(struct qcow2 *s, uint64_t gstart,
                                             uint64_t gend)
{
    for (struct qcow2_alloc *a = s->allocs; a; a = a->next)
        if (a->gstart < gend && gstart < a->gend)
            return a;
    return NULL;
}

static void alloc_add(struct qcow2 *s, struct qcow2_alloc *a, uint64_t gstart,
                      uint64_t gend)
{
    a->gstart = gstart;
    a->gend = gend;
    a->waiters.head = a->waiters.tail = NULL;
    a->prev = NULL;
    a->next = s->allocs;
    if (s->allocs)
        s->allocs->prev = a;
    s->allocs = a;
}

static void alloc_del(struct qcow2 *s, struct qcow2_alloc *a)
{
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
static bool wait_allocs_co(struct qcow2 *s, struct coro *co, uint64_t gstart,
                           uint64_t gend)
{
    struct qcow2_alloc *a = alloc_overlapping(s, gstart, gend);
    if (!a)
        return false;
    co_mutex_unlock(&s->lock, co);
    co_queue_wait_co(&a->waiters, co);
    co_mutex_lock_co(&s->lock, co);
    return true;
}

/* Host range [off, off+len) must not hit the header or the active L1 or
 * refcount tables: a data write there would destroy the image. */
static int check_data_overlap(struct qcow2 *s, uint64_t off, uint64_t len)
{
    const uint64_t cs = qcow2_cs(s);
    struct {
        uint64_t start, len;
        const char *what;
    } meta[] = {
        {0, cs, "the header"},
        {s->h.l1_table_offset, s->l1_bytes, "the L1 table"},
        {s->h.refcount_table_offset,
         (uint64_t)s->h.refcount_table_clusters * cs, "the refcount table"},
    };
    for (size_t i = 0; i < sizeof(meta) / sizeof(meta[0]); i++)
        if (meta[i].len && off < meta[i].start + meta[i].len &&
            meta[i].start < off + len)
            return qcow2_corrupt(s, "a data cluster at %#llx overlaps %s",
                                 (unsigned long long)off, meta[i].what);
    return 0;
}

/* ====================== pending frees ====================== */

/* Clusters that stop being referenced (COW of a shared or compressed
 * cluster, discard, zeroing with deallocation) keep their refcount until
 * the L2 tables that dropped them are on disk: otherwise a crash could
 * leave an old L2 entry pointing at a cluster with too low a refcount.
 * They are released by metadata_flush_co(). */
struct pending_free {
    uint64_t off, len;
};

struct qcow2_priv {
    struct pending_free *frees;
    size_t n_frees, cap_frees;
    uint8_t *zbuf;           /* last decompressed cluster */
    uint8_t *zeros;          /* one cluster of zeros, for write_zeros_co */
    uint64_t zkey;           /* its raw L2 entry; 0 = none */
    uint64_t l2_cache_bytes, rb_cache_bytes;
};

/* struct qcow2 is followed by its private part. */
struct qcow2_full {
    struct qcow2 s;
    struct qcow2_priv p;
};

static struct qcow2_priv *priv(struct qcow2 *s)
{
    return &((struct qcow2_full *)s)->p;
}

#define MAX_PENDING_FREES 4096

static int metadata_flush_co(struct qcow2 *s, struct coro *co);

static int defer_free_co(struct qcow2 *s, struct coro *co,
                         const struct qcow2_l2_entry *e)
{
    struct qcow2_priv *p = priv(s);
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
    if (p->n_frees == p->cap_frees) {
        size_t cap = p->cap_frees ? p->cap_frees * 2 : 64;
        struct pending_free *nf = realloc(p->frees, cap * sizeof(*nf));
        if (!nf)
            return -ENOMEM; /* the cluster leaks: harmless */
        p->frees = nf;
        p->cap_frees = cap;
    }
    p->frees[p->n_frees].off = off;
    p->frees[p->n_frees].len = len;
    p->n_frees++;
    if (p->n_frees >= MAX_PENDING_FREES)
        return metadata_flush_co(s, co);
    return 0;
}

/* Writes every dirty table back in the safe order and releases the
 * pending frees.  Lock held.  The caller syncs the file afterwards. */
static int metadata_flush_co(struct qcow2 *s, struct coro *co)
{
    struct qcow2_priv *p = priv(s);
    int r = qcow2_cache_flush_co(&s->l2_cache, co);
    if (r < 0)
        return r;
    if (p->n_frees) {
        r = backend_flush_co(s->node.file, co);
        if (r < 0)
            return r;
        /* The L2 tables no longer point at these clusters, on disk. */
        size_t n = p->n_frees;
        p->n_frees = 0;
        for (size_t i = 0; i < n; i++) {
            r = qcow2_refcount_update_co(s, co, p->frees[i].off,
                                         p->frees[i].len, -1);
            if (r < 0)
                return r;
        }
    }
    return qcow2_cache_flush_co(&s->rb_cache, co);
}

/* ====================== read ====================== */

/* Reads guest bytes of the backing chain (zeros where there is none). */
static int read_backing_co(struct qcow2 *s, struct coro *co,
                           const struct iovec *iov, int iovcnt, uint64_t off)
{
    uint64_t len = iov_size(iov, iovcnt);
    struct fmt_node *b = s->node.backing;
    if (!b || off >= b->size) {
        iov_zero(iov, iovcnt);
        return 0;
    }
    uint64_t n = b->size - off < len ? b->size - off : len;
    struct iov_slice in, rest;
    int r = iov_slice_init(&in, iov, iovcnt, 0, n);
    if (r < 0)
        return r;
    r = fmt_preadv_co(b, co, in.v, in.cnt, off);
    iov_slice_free(&in);
    if (r < 0 || n == len)
        return r;
    r = iov_slice_init(&rest, iov, iovcnt, n, len - n);
    if (r < 0)
        return r;
    iov_zero(rest.v, rest.cnt);
    iov_slice_free(&rest);
    return 0;
}

/* Decompresses the compressed cluster of entry e into the private buffer
 * (kept: the next read of the same cluster is free).  The buffer is shared
 * by all requests without a lock: the only yield is the read of the
 * compressed bytes into a buffer of its own, and between that and the
 * caller's copy out of p->zbuf nothing yields, so no other request can
 * rewrite p->zbuf in between. */
static int load_compressed_co(struct qcow2 *s, struct coro *co,
                              const struct qcow2_l2_entry *e, uint64_t raw)
{
    struct qcow2_priv *p = priv(s);
    const uint64_t cs = qcow2_cs(s);
    if (p->zkey == raw && p->zbuf)
        return 0;
    if (!p->zbuf) {
        p->zbuf = qcow2_buf_alloc(s, cs);
        if (!p->zbuf)
            return -ENOMEM;
    }
    uint64_t fsize = s->node.file->size;
    uint64_t hoff = e->host_offset;
    uint64_t clen = e->compressed_len;
    if (hoff >= fsize)
        return qcow2_corrupt(s, "compressed cluster at %#llx beyond the end "
                             "of the file", (unsigned long long)hoff);
    if (clen > fsize - hoff)
        clen = fsize - hoff;
    uint64_t a = s->io_align;
    uint64_t start = hoff & ~(a - 1);
    uint64_t end = (hoff + clen + a - 1) & ~(a - 1);
    uint8_t *in = qcow2_buf_alloc(s, end - start);
    if (!in)
        return -ENOMEM;
    int r = backend_pread_co(s->node.file, co, in, end - start, start);
    if (r == 0) {
        p->zkey = 0; /* the buffer is being rewritten */
        r = qcow2_decompress(s->h.compression_type, in + (hoff - start), clen,
                             p->zbuf, cs);
        if (r == -EIO)
            r = qcow2_corrupt(s, "compressed cluster at %#llx does not "
                              "decompress", (unsigned long long)hoff);
        else if (r == 0)
            p->zkey = raw;
    }
    free(in);
    return r;
}

/* Guest-visible content, for guest bytes [off, off + len) inside one
 * cluster whose (old) entry is e, into buf.  Used for reads of compressed
 * clusters and for the copy-on-write of a cluster being reallocated. */
static int read_cluster_old_co(struct qcow2 *s, struct coro *co,
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
            r = load_compressed_co(s, co, e, raw);
            if (r == 0)
                memcpy(buf, priv(s)->zbuf + (off & (cs - 1)), n);
            break;
        case QCOW2_CLUSTER_ZERO_PLAIN:
        case QCOW2_CLUSTER_ZERO_ALLOC:
            memset(buf, 0, n);
            break;
        case QCOW2_CLUSTER_UNALLOCATED:
        case QCOW2_CLUSTER_UNALLOCATED_ALLOC:
            r = read_backing_co(s, co, &v, 1, off);
            break;
        }
        if (r < 0)
            return r;
        off += n;
        buf += n;
    }
    return 0;
}

static int qcow2_preadv_co(struct fmt_node *n, struct coro *co,
                           const struct iovec *iov, int iovcnt, uint64_t off)
{
    struct qcow2 *s = qcow2_of(n);
    uint64_t total = iov_size(iov, iovcnt), pos = 0;
    while (pos < total) {
        struct qcow2_map m;
        struct qcow2_busy busy;
        co_mutex_lock_co(&s->lock, co);
        int r = qcow2_map_get_co(s, co, off + pos, total - pos, &m);
        bool is_busy = r == 0 && (m.type == QCOW2_CLUSTER_NORMAL ||
                                  m.type == QCOW2_CLUSTER_COMPRESSED);
        if (is_busy)
            qcow2_busy_add(s, &busy,
                           m.type == QCOW2_CLUSTER_NORMAL ? m.host
                                                          : m.e.host_offset,
                           m.type == QCOW2_CLUSTER_NORMAL
                               ? m.len
                               : (uint64_t)m.e.nb_sectors * 512);
        co_mutex_unlock(&s->lock, co);
        if (r < 0)
            return r;

        struct iov_slice sl;
        r = iov_slice_init(&sl, iov, iovcnt, pos, m.len);
        if (r == 0) {
            switch (m.type) {
            case QCOW2_CLUSTER_NORMAL:
                r = backend_preadv_co(s->node.file, co, sl.v, sl.cnt, m.host);
                break;
            case QCOW2_CLUSTER_ZERO_PLAIN:
            case QCOW2_CLUSTER_ZERO_ALLOC:
                iov_zero(sl.v, sl.cnt);
                break;
            case QCOW2_CLUSTER_UNALLOCATED:
            case QCOW2_CLUSTER_UNALLOCATED_ALLOC:
                r = read_backing_co(s, co, sl.v, sl.cnt, off + pos);
                break;
            case QCOW2_CLUSTER_COMPRESSED:
                /* No yield between the load and the copy (see
                 * load_compressed_co), so the shared buffer needs no
                 * lock. */
                r = load_compressed_co(s, co, &m.e, m.raw);
                if (r == 0)
                    iov_from_buf(sl.v, sl.cnt,
                                 priv(s)->zbuf + ((off + pos) & (qcow2_cs(s) - 1)));
                break;
            }
            iov_slice_free(&sl);
        }
        if (is_busy)
            qcow2_busy_del(s, &busy);
        if (r < 0)
            return r;
        pos += m.len;
    }
    return 0;
}

/* ====================== write ====================== */

/* How a cluster is to be written. */
struct wclass {
    bool in_place;         /* every touched (sub)cluster is NORMAL+copied */
    bool keep_host;        /* allocate in the cluster's own host cluster */
    struct qcow2_l2_entry e;
    uint64_t raw, bitmap;
};

static int classify_co(struct qcow2 *s, struct coro *co, uint64_t coff,
                       uint64_t ws, uint64_t we, struct wclass *w)
{
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

/* Writes iov (guest bytes [off, off + len), len > 0) as far as one step
 * goes; *done is set to the bytes written. */
static int write_step_co(struct qcow2 *s, struct coro *co,
                         const struct iovec *iov, int iovcnt, uint64_t skip,
                         uint64_t off, uint64_t len, unsigned flags,
                         bool *meta_changed, uint64_t *done)
{
    const uint64_t cs = qcow2_cs(s);
    const uint64_t table_span = cs << s->h.l2_bits;
    int r;

    co_mutex_lock_co(&s->lock, co);
again:
    if (s->broken) {
        co_mutex_unlock(&s->lock, co);
        return -EIO;
    }
    /* Overwrite of the image's own data: no metadata change, and the
     * data I/O runs without the lock. */
    struct qcow2_map m;
    r = qcow2_map_get_co(s, co, off, len, &m);
    if (r < 0)
        goto out_unlock;
    if (m.type == QCOW2_CLUSTER_NORMAL && m.copied) {
        uint64_t n = m.len < len ? m.len : len;
        r = check_data_overlap(s, m.host, n);
        if (r < 0)
            goto out_unlock;
        struct qcow2_busy busy;
        qcow2_busy_add(s, &busy, m.host, n);
        co_mutex_unlock(&s->lock, co);
        struct iov_slice sl;
        r = iov_slice_init(&sl, iov, iovcnt, skip, n);
        if (r == 0) {
            r = backend_pwritev_co(s->node.file, co, sl.v, sl.cnt, m.host,
                                   (flags & FMT_FUA) ? BACKEND_FUA : 0);
            iov_slice_free(&sl);
        }
        qcow2_busy_del(s, &busy);
        *done = n;
        return r;
    }

    uint64_t c0 = qcow2_start_of_cluster(s, off);
    struct wclass w0;
    r = classify_co(s, co, c0, off - c0,
                    (off + len < c0 + cs ? off + len : c0 + cs) - c0, &w0);
    if (r < 0)
        goto out_unlock;

    if (wait_allocs_co(s, co, c0, c0 + cs))
        goto again;

    /* Gather the clusters this allocation covers: all need a new host
     * cluster, none is being allocated by someone else, one L2 table. */
    uint64_t end = off + len;
    uint64_t table_end = (c0 & ~(table_span - 1)) + table_span;
    uint64_t nclusters = 1;
    struct wclass wl = w0;
    if (!w0.keep_host) {
        while (c0 + nclusters * cs < end && c0 + nclusters * cs < table_end) {
            uint64_t c = c0 + nclusters * cs;
            struct wclass wc;
            uint64_t we = end < c + cs ? end - c : cs;
            r = classify_co(s, co, c, 0, we, &wc);
            if (r < 0)
                goto out_unlock;
            if (wc.in_place || wc.keep_host ||
                alloc_overlapping(s, c, c + cs))
                break;
            wl = wc;
            nclusters++;
        }
    }

    uint64_t host;
    if (w0.keep_host) {
        host = w0.e.host_offset;
    } else {
        uint64_t got;
        r = qcow2_alloc_clusters_co(s, co, nclusters, &host, &got);
        if (r < 0)
            goto out_unlock;
        if (got < nclusters) {
            nclusters = got;
            /* The last cluster's old entry is needed for the tail COW. */
            uint64_t c = c0 + (nclusters - 1) * cs;
            uint64_t we = end < c + cs ? end - c : cs;
            r = classify_co(s, co, c, 0, we, &wl);
            if (r < 0) {
                qcow2_refcount_update_co(s, co, host, nclusters * cs, -1);
                goto out_unlock;
            }
        }
        r = check_data_overlap(s, host, nclusters * cs);
        if (r < 0)
            goto out_unlock;
    }
    uint64_t gend = c0 + nclusters * cs;
    uint64_t wend = end < gend ? end : gend;
    struct qcow2_alloc alloc;
    alloc_add(s, &alloc, c0, gend);
    co_mutex_unlock(&s->lock, co);

    /* The region written: whole clusters, or for an extended-L2 cluster
     * kept in place only the touched subclusters. */
    uint64_t unit = w0.keep_host && s->h.extended_l2 ? s->h.subcluster_size
                                                     : cs;
    uint64_t rstart = off & ~(unit - 1);
    uint64_t rend = (wend + unit - 1) & ~(unit - 1);
    if (rend > gend)
        rend = gend;
    uint64_t head = off - rstart, tail = rend - wend;
    bool head_needed = head > 0, tail_needed = tail > 0;
    if (w0.keep_host && s->h.extended_l2) {
        /* Subclusters already holding data are not copied over. */
        unsigned sa = (unsigned)((rstart - c0) >> s->h.subcluster_bits);
        unsigned sb = (unsigned)((rend - 1 - c0) >> s->h.subcluster_bits);
        head_needed = head_needed && qcow2_subcluster_type(&s->h, &w0.e, sa) !=
                                         QCOW2_CLUSTER_NORMAL;
        tail_needed = tail_needed && qcow2_subcluster_type(&s->h, &w0.e, sb) !=
                                         QCOW2_CLUSTER_NORMAL;
    }
    uint8_t *hbuf = NULL, *tbuf = NULL;
    struct iov_slice data = {0};
    struct iovec *v = NULL;
    r = iov_slice_init(&data, iov, iovcnt, skip, wend - off);
    if (r == 0 && head_needed) {
        hbuf = qcow2_buf_alloc(s, head);
        r = hbuf ? read_cluster_old_co(s, co, &w0.e, w0.raw, rstart, head, hbuf)
                 : -ENOMEM;
    }
    if (r == 0 && tail_needed) {
        tbuf = qcow2_buf_alloc(s, tail);
        r = tbuf ? read_cluster_old_co(s, co, &wl.e, wl.raw, wend, tail, tbuf)
                 : -ENOMEM;
    }
    if (r == 0) {
        /* Guest data and its copy-on-write in one write when contiguous. */
        v = malloc(sizeof(*v) * (data.cnt + 2));
        if (!v)
            r = -ENOMEM;
    }
    if (r == 0) {
        int cnt = 0;
        uint64_t wstart = host + (rstart - c0);
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

    co_mutex_lock_co(&s->lock, co);
    if (r == 0) {
        /* Link the clusters into the L2 table.  All old entries are
         * checked before the first is replaced, so that this either
         * happens completely or not at all. */
        struct qcow2_cache_entry *l2 = NULL;
        unsigned idx;
        r = qcow2_l2_for_write_co(s, co, c0, &l2, &idx);
        for (uint64_t i = 0; r == 0 && i < nclusters; i++) {
            uint64_t raw, bitmap;
            struct qcow2_l2_entry old;
            qcow2_l2_read(s, l2->table, idx + (unsigned)i, &raw, &bitmap);
            if (qcow2_l2_entry_decode(&s->h, raw, bitmap, &old) < 0)
                r = qcow2_corrupt(s, "invalid L2 entry %#llx",
                                  (unsigned long long)raw);
        }
        for (uint64_t i = 0; r == 0 && i < nclusters; i++) {
            uint64_t raw, bitmap;
            struct qcow2_l2_entry old;
            qcow2_l2_read(s, l2->table, idx + (unsigned)i, &raw, &bitmap);
            qcow2_l2_entry_decode(&s->h, raw, bitmap, &old);
            uint64_t nraw = (host + i * cs) | QCOW2_OFLAG_COPIED;
            uint64_t nbitmap = 0;
            if (s->h.extended_l2) {
                if (w0.keep_host) {
                    unsigned sa = (unsigned)((rstart - c0) >>
                                             s->h.subcluster_bits);
                    unsigned sb = (unsigned)((rend - c0) >>
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
            if (!w0.keep_host)
                defer_free_co(s, co, &old);
        }
        if (l2)
            qcow2_cache_put(&s->l2_cache, l2);
        if (r == 0)
            *meta_changed = true;
    }
    if (r < 0 && !w0.keep_host) {
        /* Nothing points at the new clusters: give them back. */
        qcow2_refcount_update_co(s, co, host, nclusters * cs, -1);
    }
    alloc_del(s, &alloc);
    *done = wend - off;

out_unlock:
    co_mutex_unlock(&s->lock, co);
    return r;
}

static int qcow2_flush_co(struct fmt_node *n, struct coro *co);

static int qcow2_pwritev_co(struct fmt_node *n, struct coro *co,
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
        if (r < 0)
            return r;
        pos += done;
    }
    /* In-place pieces were written with FUA already; new clusters need
     * their metadata on disk too. */
    if ((flags & FMT_FUA) && meta_changed)
        return qcow2_flush_co(n, co);
    return 0;
}

/* ====================== zero and discard ====================== */

/* A cluster of zeros, allocated on first use, owned by the image (it is
 * only ever read, by several requests at once). */
static const uint8_t *zero_buffer(struct qcow2 *s)
{
    struct qcow2_priv *p = priv(s);
    if (!p->zeros) {
        p->zeros = qcow2_buf_alloc(s, qcow2_cs(s));
        if (p->zeros)
            memset(p->zeros, 0, qcow2_cs(s));
    }
    return p->zeros;
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
    co_mutex_lock_co(&s->lock, co);
    while (wait_allocs_co(s, co, off, off + n * cs))
        ;
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
            r = defer_free_co(s, co, &old);
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
        if (r < 0)
            return r;
        off = c0 + n * cs;
    }
    if (flags & FMT_FUA)
        return qcow2_flush_co(&s->node, co);
    return 0;
}

static int qcow2_zero_co(struct fmt_node *n, struct coro *co, uint64_t off,
                         uint64_t len, unsigned flags)
{
    return zero_or_discard_co(qcow2_of(n), co, off, len, Z_ZERO, flags);
}

static int qcow2_discard_co(struct fmt_node *n, struct coro *co, uint64_t off,
                            uint64_t len, unsigned flags)
{
    return zero_or_discard_co(qcow2_of(n), co, off, len, Z_DISCARD,
                              flags & FMT_FUA);
}

/* ====================== flush ====================== */

static int qcow2_flush_co(struct fmt_node *n, struct coro *co)
{
    struct qcow2 *s = qcow2_of(n);
    co_mutex_lock_co(&s->lock, co);
    int r = metadata_flush_co(s, co);
    co_mutex_unlock(&s->lock, co);
    if (r < 0)
        return r;
    return backend_flush_co(s->node.file, co);
}

/* ====================== block status ====================== */

static int qcow2_block_status_co(struct fmt_node *n, struct coro *co,
                                 uint64_t off, uint64_t len,
                                 struct fmt_extent *ext)
{
    struct qcow2 *s = qcow2_of(n);
    struct qcow2_map m;
    co_mutex_lock_co(&s->lock, co);
    int r = qcow2_map_get_co(s, co, off, len, &m);
    co_mutex_unlock(&s->lock, co);
    if (r < 0)
        return r;
    ext->len = m.len;
    switch (m.type) {
    case QCOW2_CLUSTER_NORMAL:
    case QCOW2_CLUSTER_COMPRESSED:
        ext->flags = 0;
        ext->depth = 1;
        return 0;
    case QCOW2_CLUSTER_ZERO_PLAIN:
    case QCOW2_CLUSTER_ZERO_ALLOC:
        ext->flags = FMT_EXT_ZERO | FMT_EXT_HOLE;
        ext->depth = 1;
        return 0;
    case QCOW2_CLUSTER_UNALLOCATED:
    case QCOW2_CLUSTER_UNALLOCATED_ALLOC:
        break;
    }
    struct fmt_node *b = n->backing;
    if (!b) {
        ext->flags = FMT_EXT_ZERO | FMT_EXT_HOLE;
        ext->depth = 0;
        return 0;
    }
    if (off >= b->size) {
        /* Past the end of a shorter backing file: zeros that the backing
         * layer supplies (QEMU reports them at its depth, too). */
        ext->flags = FMT_EXT_ZERO | FMT_EXT_HOLE;
        ext->depth = 2;
        return 0;
    }
    uint64_t blen = m.len < b->size - off ? m.len : b->size - off;
    r = fmt_block_status_co(b, co, off, blen, ext);
    if (r < 0)
        return r;
    if (ext->depth)
        ext->depth++;
    return 0;
}

/* ====================== open / close ====================== */

static void qcow2_close(struct fmt_node *n)
{
    struct qcow2 *s = qcow2_of(n);
    struct qcow2_priv *p = priv(s);
    if (!n->read_only &&
        (qcow2_cache_has_dirty(&s->l2_cache) ||
         qcow2_cache_has_dirty(&s->rb_cache)))
        log_warn("%s: closed with unwritten metadata (writes since the last "
                 "flush are lost; the image stays consistent)", n->filename);
    qcow2_cache_destroy(&s->l2_cache);
    qcow2_cache_destroy(&s->rb_cache);
    free(p->frees);
    free(p->zbuf);
    free(p->zeros);
    free(s->hdr);
    free(s->l1);
    free(s->reftable);
    free(n->filename);
    free(s);
}

static int qcow2_reopen_co(struct fmt_node *n, struct coro *co, bool read_only,
                           struct error **errp);
static int qcow2_grow_co(struct fmt_node *n, struct coro *co, uint64_t size,
                         struct error **errp);

static const struct fmt_ops qcow2_ops = {
    .name = "qcow2",
    .preadv_co = qcow2_preadv_co,
    .pwritev_co = qcow2_pwritev_co,
    .flush_co = qcow2_flush_co,
    .zero_co = qcow2_zero_co,
    .discard_co = qcow2_discard_co,
    .block_status_co = qcow2_block_status_co,
    .reopen_co = qcow2_reopen_co,
    .grow_co = qcow2_grow_co,
    .close = qcow2_close,
};

/* Marks every persistent bitmap "in use" (inconsistent): strata does not
 * track writes in them, so after it writes they must not be trusted. */
static int mark_bitmaps_in_use_co(struct qcow2 *s, struct coro *co,
                                  const struct qcow2_extensions *ext,
                                  struct error **errp)
{
    uint64_t a = s->io_align;
    uint64_t off = ext->bitmap_directory_offset;
    uint64_t size = ext->bitmap_directory_size;
    uint64_t rsize = (size + a - 1) & ~(a - 1);
    uint8_t *dir = qcow2_buf_alloc(s, rsize);
    if (!dir) {
        error_setf(errp, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    int r = backend_pread_co(s->node.file, co, dir, rsize, off);
    if (r < 0) {
        error_setf(errp, -r, "%s: reading the bitmap directory: %s",
                   s->node.filename, strerror(-r));
        goto out;
    }
    bool changed = false;
    uint64_t pos = 0;
    for (uint32_t i = 0; i < ext->nb_bitmaps; i++) {
        struct qcow2_bitmap_entry be;
        r = qcow2_bitmap_entry_parse(dir, size, pos, &be);
        if (r < 0)
            break;
        if (!(be.flags & QCOW2_BITMAP_IN_USE)) {
            be_put32(dir + pos + QCOW2_BITMAP_FLAGS_OFFSET,
                     be.flags | QCOW2_BITMAP_IN_USE);
            changed = true;
        }
        pos += be.size;
    }
    if (r < 0) {
        error_setf(errp, EINVAL, "%s: malformed bitmap directory",
                   s->node.filename);
        goto out;
    }
    if (changed) {
        r = backend_pwrite_co(s->node.file, co, dir, rsize, off, 0);
        if (r == 0)
            r = backend_flush_co(s->node.file, co);
        if (r < 0)
            error_setf(errp, -r, "%s: writing the bitmap directory: %s",
                       s->node.filename, strerror(-r));
    }
out:
    free(dir);
    return r;
}

/* What opening for writing requires: refcounts of a dirty image rebuilt,
 * autoclear bits we do not maintain cleared (spec: before the first
 * write), persistent bitmaps marked in use. */
static int prepare_write_co(struct qcow2 *s, struct coro *co,
                            const struct qcow2_extensions *ext,
                            struct error **errp)
{
    const uint64_t cs = qcow2_cs(s);
    struct backend *file = s->node.file;
    int r;
    bool hdr_changed = false;
    if (s->h.dirty) {
        r = qcow2_rebuild_refcounts_co(s, co, ext, errp);
        if (r < 0)
            return r;
        s->h.incompatible_features &= ~QCOW2_INCOMPAT_DIRTY;
        s->h.dirty = false;
        hdr_changed = true;
    }
    uint64_t keep = qcow2_autoclear_known_mask();
    if (s->h.autoclear_features & ~keep) {
        s->h.autoclear_features &= keep;
        hdr_changed = true;
    }
    if (ext->has_bitmaps && ext->bitmaps_consistent) {
        r = mark_bitmaps_in_use_co(s, co, ext, errp);
        if (r < 0)
            return r;
    }
    if (hdr_changed) {
        qcow2_header_serialize(&s->h, s->hdr, cs);
        r = qcow2_write_meta_co(s, co, s->hdr, 0, cs, 0,
                                qcow2_header_serialized_size(&s->h));
        if (r == 0)
            r = backend_flush_co(file, co);
        if (r < 0)
            return error_setf(errp, -r, "%s: updating the header: %s",
                              file->name, strerror(-r));
    }
    return 0;
}

/* Switches the node between read-only and read-write (block-commit writes
 * into a backing layer).  Control path, no request in flight on it. */
static int qcow2_reopen_co(struct fmt_node *n, struct coro *co, bool read_only,
                           struct error **errp)
{
    struct qcow2 *s = qcow2_of(n);
    char err[256];
    if (read_only) {
        int r = qcow2_flush_co(n, co);
        if (r < 0)
            return error_setf(errp, -r, "%s: flush: %s", n->filename,
                              strerror(-r));
        r = backend_reopen_co(n->file, co, true, errp);
        if (r < 0)
            return r;
        n->read_only = true;
        n->caps = 0;
        return 0;
    }
    struct qcow2_extensions *ext = calloc(1, sizeof(*ext));
    if (!ext)
        return error_setf(errp, ENOMEM, "out of memory");
    int r = qcow2_header_parse_extensions(s->hdr, qcow2_cs(s), &s->h, ext, err,
                                          sizeof(err));
    if (r == 0)
        r = qcow2_header_check_features(&s->h, ext, false, err, sizeof(err));
    if (r < 0) {
        free(ext);
        return error_setf(errp, -r, "%s: %s", n->filename, err);
    }
    r = backend_reopen_co(n->file, co, false, errp);
    if (r == 0) {
        r = prepare_write_co(s, co, ext, errp);
        if (r < 0)
            backend_reopen_co(n->file, co, true, NULL);
    }
    free(ext);
    if (r < 0)
        return r;
    n->read_only = false;
    n->caps = FMT_CAN_TRIM | (s->has_zero_flag ? FMT_CAN_ZERO : 0);
    return 0;
}

/* Grows the virtual size (block-commit into a smaller base): the L1 table
 * is extended in place when its clusters have room (the new entries
 * zeroed on disk first), else moved to new clusters; then the header,
 * synced. */
static int qcow2_grow_co(struct fmt_node *n, struct coro *co, uint64_t size,
                         struct error **errp)
{
    struct qcow2 *s = qcow2_of(n);
    const uint64_t cs = qcow2_cs(s);
    if (size <= n->size)
        return 0;
    if (size > QCOW2_MAX_SIZE)
        return error_setf(errp, EFBIG, "%s: %llu bytes is over the qcow2 "
                          "limit", n->filename, (unsigned long long)size);
    uint64_t span = cs << s->h.l2_bits;
    uint64_t new_l1 = (size + span - 1) / span;
    if (new_l1 * 8 > QCOW2_MAX_L1_BYTES)
        return error_setf(errp, EFBIG, "%s: the L1 table would be too large",
                          n->filename);
    co_mutex_lock_co(&s->lock, co);
    int r = 0;
    struct qcow2_header h = s->h;
    uint64_t old_off = 0, old_bytes = 0;
    uint8_t *nl1 = NULL;
    if (new_l1 > s->h.l1_size) {
        uint64_t need = (new_l1 * 8 + cs - 1) / cs * cs;
        if (s->h.l1_size && need <= s->l1_bytes) {
            /* Room in the current clusters: zero the new entries on disk. */
            r = qcow2_write_meta_co(s, co, s->l1, s->h.l1_table_offset,
                                    s->l1_bytes, (uint64_t)s->h.l1_size * 8,
                                    (new_l1 - s->h.l1_size) * 8);
        } else {
            uint64_t host;
            nl1 = qcow2_buf_alloc(s, need);
            r = nl1 ? qcow2_alloc_exact_co(s, co, need / cs, &host) : -ENOMEM;
            if (r == 0) {
                memset(nl1, 0, need);
                memcpy(nl1, s->l1, (uint64_t)s->h.l1_size * 8);
                r = backend_pwrite_co(n->file, co, nl1, need, host, 0);
                if (r < 0)
                    qcow2_refcount_update_co(s, co, host, need, -1);
                old_off = s->h.l1_table_offset;
                old_bytes = s->h.l1_size ? s->l1_bytes : 0;
                h.l1_table_offset = host;
            }
        }
        if (r == 0) {
            /* New refcounts and the table durable before the header. */
            r = metadata_flush_co(s, co);
            if (r == 0)
                r = backend_flush_co(n->file, co);
        }
        h.l1_size = (uint32_t)new_l1;
    }
    if (r == 0) {
        h.size = size;
        uint8_t *hdr = qcow2_buf_alloc(s, cs);
        if (!hdr) {
            r = -ENOMEM;
        } else {
            memcpy(hdr, s->hdr, cs);
            qcow2_header_serialize(&h, hdr, cs);
            r = qcow2_write_meta_co(s, co, hdr, 0, cs, 0,
                                    qcow2_header_serialized_size(&h));
            if (r == 0)
                r = backend_flush_co(n->file, co);
            if (r == 0)
                memcpy(s->hdr, hdr, cs);
            free(hdr);
        }
    }
    if (r == 0) {
        s->h = h;
        n->size = size;
        if (nl1) {
            free(s->l1);
            s->l1 = nl1;
            s->l1_bytes = (new_l1 * 8 + cs - 1) / cs * cs;
            nl1 = NULL;
            if (old_bytes)
                r = qcow2_refcount_update_co(s, co, old_off, old_bytes, -1);
        }
    }
    free(nl1);
    co_mutex_unlock(&s->lock, co);
    if (r < 0)
        return error_setf(errp, -r, "%s: growing to %llu bytes: %s",
                          n->filename, (unsigned long long)size, strerror(-r));
    return 0;
}

struct fmt_node *qcow2_open_co(struct loop *loop, struct coro *co,
                               struct backend *file,
                               const struct fmt_open_opts *opts,
                               struct error **errp)
{
    char err[256];
    struct qcow2_full *full = calloc(1, sizeof(*full));
    if (!full) {
        error_setf(errp, ENOMEM, "out of memory");
        return NULL;
    }
    struct qcow2 *s = &full->s;
    struct fmt_node *n = &s->node;
    struct qcow2_extensions *ext = NULL;
    n->ops = &qcow2_ops;
    n->loop = loop;
    n->file = file;
    n->read_only = opts->read_only || file->read_only;
    n->filename = strdup(file->name);
    s->io_align = file->align ? file->align : 1;
    if (!n->filename)
        goto nomem;

    /* The header: first a small read for the cluster size, then the whole
     * first cluster (extensions, backing name). */
    uint64_t probe = 4096 > s->io_align ? 4096 : s->io_align;
    s->hdr = qcow2_buf_alloc(s, probe);
    if (!s->hdr)
        goto nomem;
    int r = backend_pread_co(file, co, s->hdr, probe, 0);
    if (r < 0) {
        error_setf(errp, -r, "%s: reading the header: %s", file->name,
                   strerror(-r));
        goto fail;
    }
    r = qcow2_header_parse(s->hdr, probe, file->size, &s->h, err, sizeof(err));
    if (r < 0) {
        error_setf(errp, -r, "%s: not a usable qcow2 image: %s", file->name,
                   err);
        goto fail;
    }
    const uint64_t cs = s->h.cluster_size;
    if (cs < s->io_align) {
        error_setf(errp, EINVAL, "%s: cluster size %llu is below the %u-byte "
                   "alignment of direct I/O (cache=none): use cache=writeback",
                   file->name, (unsigned long long)cs, s->io_align);
        goto fail;
    }
    free(s->hdr);
    s->hdr = qcow2_buf_alloc(s, cs);
    if (!s->hdr)
        goto nomem;
    r = backend_pread_co(file, co, s->hdr, cs, 0);
    if (r < 0) {
        error_setf(errp, -r, "%s: reading the header: %s", file->name,
                   strerror(-r));
        goto fail;
    }
    ext = calloc(1, sizeof(*ext));
    if (!ext)
        goto nomem;
    r = qcow2_header_parse_extensions(s->hdr, cs, &s->h, ext, err,
                                      sizeof(err));
    if (r == 0)
        r = qcow2_header_check_features(&s->h, ext, n->read_only, err,
                                        sizeof(err));
    if (r < 0) {
        error_setf(errp, -r, "%s: %s", file->name, err);
        goto fail;
    }
    if (s->h.external_data_file) {
        error_setf(errp, ENOTSUP, "%s: images with an external data file are "
                   "not supported", file->name);
        goto fail;
    }
    if (ext->has_crypto_header) {
        error_setf(errp, ENOTSUP, "%s: encrypted images are not supported",
                   file->name);
        goto fail;
    }
    s->has_zero_flag = s->h.version >= 3;
    if (ext->has_backing_file) {
        s->has_backing_name = true;
        memcpy(s->backing_name, ext->backing_file,
               sizeof(s->backing_name));
    }
    if (ext->has_backing_format) {
        s->has_backing_format = true;
        memcpy(s->backing_format, ext->backing_format,
               sizeof(s->backing_format));
    }

    /* The active L1 table and the refcount table, in memory. */
    s->l1_bytes = ((uint64_t)s->h.l1_size * 8 + cs - 1) / cs * cs;
    if (s->l1_bytes == 0)
        s->l1_bytes = cs;
    s->l1 = qcow2_buf_alloc(s, s->l1_bytes);
    if (!s->l1)
        goto nomem;
    memset(s->l1, 0, s->l1_bytes);
    if (s->h.l1_size) {
        uint64_t a = s->io_align;
        uint64_t rl = ((uint64_t)s->h.l1_size * 8 + a - 1) & ~(a - 1);
        r = backend_pread_co(file, co, s->l1, rl, s->h.l1_table_offset);
        if (r < 0) {
            error_setf(errp, -r, "%s: reading the L1 table: %s", file->name,
                       strerror(-r));
            goto fail;
        }
        /* Entries past l1_size (rounding) are not part of the table. */
        memset(s->l1 + (uint64_t)s->h.l1_size * 8, 0,
               s->l1_bytes - (uint64_t)s->h.l1_size * 8);
    }
    uint64_t rt_bytes = (uint64_t)s->h.refcount_table_clusters * cs;
    s->reftable_entries = rt_bytes / 8;
    s->reftable = qcow2_buf_alloc(s, rt_bytes);
    if (!s->reftable)
        goto nomem;
    r = backend_pread_co(file, co, s->reftable, rt_bytes,
                         s->h.refcount_table_offset);
    if (r < 0) {
        error_setf(errp, -r, "%s: reading the refcount table: %s", file->name,
                   strerror(-r));
        goto fail;
    }

    uint64_t l2b = opts->l2_cache_bytes ? opts->l2_cache_bytes
                                        : FMT_DEFAULT_L2_CACHE;
    uint64_t rbb = opts->refcount_cache_bytes ? opts->refcount_cache_bytes
                                              : FMT_DEFAULT_REFCOUNT_CACHE;
    /* Never more entries than the image can have tables. */
    uint64_t l2_max = s->h.l1_size ? s->h.l1_size : 1;
    uint64_t l2n = l2b / cs, rbn = rbb / cs;
    if (l2n > l2_max + 4)
        l2n = l2_max + 4;
    if (l2n > (1u << 20))
        l2n = 1u << 20;
    if (rbn > (1u << 20))
        rbn = 1u << 20;
    if (qcow2_cache_init(&s->l2_cache, s, "L2 table", (unsigned)l2n) < 0 ||
        qcow2_cache_init(&s->rb_cache, s, "refcount block", (unsigned)rbn) < 0)
        goto nomem;
    s->l2_cache.depends = &s->rb_cache;

    n->size = s->h.size;
    n->align = s->io_align;
    if (!n->read_only)
        n->caps = FMT_CAN_TRIM | (s->has_zero_flag ? FMT_CAN_ZERO : 0);

    if (!n->read_only && prepare_write_co(s, co, ext, errp) < 0)
        goto fail;
    free(ext);
    return n;

nomem:
    error_setf(errp, ENOMEM, "%s: out of memory", file->name);
fail:
    free(ext);
    qcow2_cache_destroy(&s->l2_cache);
    qcow2_cache_destroy(&s->rb_cache);
    free(s->hdr);
    free(s->l1);
    free(s->reftable);
    free(n->filename);
    free(full);
    return NULL;
}

/* Accessors for the chain opener. */
const char *qcow2_backing_name(struct fmt_node *n)
{
    struct qcow2 *s = qcow2_of(n);
    return s->has_backing_name ? s->backing_name : NULL;
}

const char *qcow2_backing_format(struct fmt_node *n)
{
    struct qcow2 *s = qcow2_of(n);
    return s->has_backing_format ? s->backing_format : NULL;
}

/* ---- the driver ---- */

static int qcow2_probe(const uint8_t *buf, size_t len)
{
    return len >= 4 && be_get32(buf) == QCOW2_MAGIC ? 100 : 0;
}

FMT_REGISTER_DRIVER(qcow2_driver,
    .name = "qcow2",
    .caps = FMT_DRV_BACKING,
    .max_rw = FMT_MAX_RW,
    .probe = qcow2_probe,
    .open_co = qcow2_open_co,
    .create_co = qcow2_create_co,
    .set_backing_co = qcow2_set_backing_co,
    .backing_name = qcow2_backing_name,
    .backing_format = qcow2_backing_format,
);
