/* strata — the qcow2 format driver: open, close, read, flush, block status,
 * reopen and grow, and the ops table.  Writes, zeroing and discard are in
 * qcow2-alloc.c.  See qcow2.h for how the driver is split, the locking
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
#include "loop.h"
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

void qcow2_lock_co(struct qcow2 *s, struct coro *co)
{
    if (!co_mutex_locked(&s->lock)) {
        co_mutex_lock_co(&s->lock, co);
        return;
    }
    uint64_t t0 = loop_now_ns();
    co_mutex_lock_co(&s->lock, co);
    uint64_t waited = loop_now_ns() - t0;
    if (waited >= QCOW2_LOCK_WAIT_LOG_NS)
        log_debug("%s: waited %.3f ms for the image lock", s->node.filename,
                  waited / 1e6);
}

int qcow2_header_wait_locked_co(struct qcow2 *s, struct coro *co)
{
    assert(co_mutex_held(&s->lock, co));
    int waited = 0;
    while (s->hdr_writing) {
        co_mutex_unlock(&s->lock, co);
        co_queue_wait_co(&s->hdr_waiters, co);
        qcow2_lock_co(s, co);
        waited = 1;
    }
    return waited;
}

int qcow2_make_room_locked_co(struct qcow2 *s, struct coro *co, uint64_t off,
                              bool write)
{
    /* Only a request whose L2 table is not cached takes an entry (a read
     * where there is no table needs none): one that hits the cache does
     * not wait for anyone's write-back.  A write may allocate a table
     * and copy a shared one; the refcounts of a run may span two
     * blocks. */
    uint64_t l1i = qcow2_l1_index(&s->h, off);
    uint64_t l2 = l1i < s->h.l1_size
                      ? be_get64(s->l1 + l1i * 8) & QCOW2_L1E_OFFSET_MASK
                      : 0;
    bool miss = l2 ? !qcow2_cache_contains(&s->l2_cache, l2) : write;
    int r = miss ? qcow2_cache_make_room_locked_co(&s->l2_cache, co,
                                                   write ? 3 : 1)
                 : 0;
    if (r >= 0 && write)
        r = qcow2_cache_make_room_locked_co(&s->rb_cache, co, 2);
    return r < 0 ? r : 0;
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
                        uint64_t len, unsigned flags)
{
    uint64_t a = s->io_align;
    uint64_t start = off & ~(a - 1);
    uint64_t end = (off + len + a - 1) & ~(a - 1);
    if (end > buflen)
        end = buflen;
    return backend_pwrite_co(s->node.file, co, buf + start, end - start,
                             base + start, flags);
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

/* ====================== read ====================== */

int qcow2_read_backing_co(struct qcow2 *s, struct coro *co,
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
 * caller's copy out of s->zbuf nothing yields, so no other request can
 * rewrite s->zbuf in between. */
int qcow2_load_compressed_co(struct qcow2 *s, struct coro *co,
                             const struct qcow2_l2_entry *e, uint64_t raw)
{
    const uint64_t cs = qcow2_cs(s);
    if (s->zkey == raw && s->zbuf)
        return 0;
    if (!s->zbuf) {
        s->zbuf = qcow2_buf_alloc(s, cs);
        if (!s->zbuf)
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
        s->zkey = 0; /* the buffer is being rewritten */
        r = qcow2_decompress(s->h.compression_type, in + (hoff - start), clen,
                             s->zbuf, cs);
        if (r == -EIO)
            r = qcow2_corrupt(s, "compressed cluster at %#llx does not "
                              "decompress", (unsigned long long)hoff);
        else if (r == 0)
            s->zkey = raw;
    }
    free(in);
    return r;
}

static int qcow2_preadv_co(struct fmt_node *n, struct coro *co,
                           const struct iovec *iov, int iovcnt, uint64_t off)
{
    struct qcow2 *s = qcow2_of(n);
    uint64_t total = iov_size(iov, iovcnt), pos = 0;
    while (pos < total) {
        struct qcow2_map m = {0}; /* set by qcow2_map_get_co when r == 0 */
        struct qcow2_busy busy;
        qcow2_lock_co(s, co);
        int r = qcow2_make_room_locked_co(s, co, off + pos, false);
        if (r == 0)
            r = qcow2_map_get_co(s, co, off + pos, total - pos, &m);
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
                r = qcow2_read_backing_co(s, co, sl.v, sl.cnt, off + pos);
                break;
            case QCOW2_CLUSTER_COMPRESSED:
                /* No yield between the load and the copy (see
                 * load_compressed_co), so the shared buffer needs no
                 * lock. */
                r = qcow2_load_compressed_co(s, co, &m.e, m.raw);
                if (r == 0)
                    iov_from_buf(sl.v, sl.cnt,
                                 s->zbuf + ((off + pos) & (qcow2_cs(s) - 1)));
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

/* ====================== flush ====================== */

/* A flush makes everything acknowledged before it durable, and nobody
 * waits for its sync of the file but itself:
 *
 *  1. under the lock, without I/O: wait until no earlier flush is still
 *     writing tables back (our sync must cover those writes), then take
 *     copies of every dirty refcount block and L2 table, the L1 entries
 *     that changed (into l1_disk) and the list of pending frees;
 *  2. without the lock: write the refcount blocks (with FUA: durable when
 *     done), then the L2 tables, then sync the file, which also covers
 *     the guest data acknowledged before the flush; then, if L1 entries
 *     changed (new L2 tables), write them with FUA;
 *  3. under the lock: release the pending frees (the L2 tables and the
 *     L1 entries that dropped them are on disk now), and write the
 *     refcount blocks that changed, without the lock again.
 *
 * The crash order holds: every L2 entry in a copy points at clusters whose
 * refcount was raised before the copy was taken, so that refcount is in
 * the refcount copies written first, or was written through already, or
 * is in a write-back that step 1 waited for.  Every L1 entry taken points
 * at a table in the L2 copies or written back (by an eviction) before
 * step 1, so the sync made it durable before the entry is written.
 * Requests that run meanwhile change the cached tables and the in-memory
 * L1, not the copies; a table changed again is dirty again and goes out
 * with the next flush, after this one's write of it (an entry under
 * write-back is neither evicted nor written by anyone else until that
 * write ends). */

/* Puts frees back on the pending list (a flush that failed). */
static void requeue_frees_locked(struct qcow2 *s,
                                 const struct qcow2_pending_free *f, size_t n)
{
    assert(co_mutex_locked(&s->lock));
    if (s->n_frees + n > s->cap_frees) {
        size_t cap = s->n_frees + n;
        struct qcow2_pending_free *nf = realloc(s->frees, cap * sizeof(*nf));
        if (!nf)
            return; /* the clusters leak: harmless */
        s->frees = nf;
        s->cap_frees = cap;
    }
    memcpy(s->frees + s->n_frees, f, n * sizeof(*f));
    s->n_frees += n;
}

/* Step 1 for the L1 table: moves the changed entries into l1_disk (their
 * old values saved in *saved, to put back if the write fails) and marks
 * the write in progress.  [*lo, *hi) empty: nothing to write. */
static int l1_wb_begin_locked(struct qcow2 *s, uint64_t *lo, uint64_t *hi,
                              uint8_t **saved)
{
    assert(co_mutex_locked(&s->lock));
    assert(!s->l1_wb);
    *lo = s->l1_dirty_lo;
    *hi = s->l1_dirty_hi;
    *saved = NULL;
    if (*lo == *hi)
        return 0;
    size_t bytes = (size_t)(*hi - *lo) * 8;
    *saved = malloc(bytes);
    if (!*saved)
        return -ENOMEM;
    memcpy(*saved, s->l1_disk + *lo * 8, bytes);
    memcpy(s->l1_disk + *lo * 8, s->l1 + *lo * 8, bytes);
    s->l1_dirty_lo = s->l1_dirty_hi = 0;
    s->l1_wb = true;
    return 0;
}

/* Ends the L1 write-back: on failure the entries go back to l1_disk's
 * old values and are dirty again.  Needs no lock (no yield). */
static void l1_wb_end(struct qcow2 *s, uint64_t lo, uint64_t hi,
                      uint8_t *saved, bool written)
{
    if (lo == hi)
        return;
    if (!written) {
        memcpy(s->l1_disk + lo * 8, saved, (size_t)(hi - lo) * 8);
        if (s->l1_dirty_lo == s->l1_dirty_hi) {
            s->l1_dirty_lo = lo;
            s->l1_dirty_hi = hi;
        } else {
            if (lo < s->l1_dirty_lo)
                s->l1_dirty_lo = lo;
            if (hi > s->l1_dirty_hi)
                s->l1_dirty_hi = hi;
        }
    }
    free(saved);
    s->l1_wb = false;
    co_queue_wake_all(&s->l1_wb_waiters);
}

int qcow2_flush_co(struct fmt_node *n, struct coro *co)
{
    /* A writable backing node right below holds data that reads through
     * this one show (a snapshot's old top until it is made read-only, a
     * commit's base): a FLUSH here covers it too. */
    if (n->backing && !n->backing->read_only) {
        int r = fmt_flush_co(n->backing, co);
        if (r < 0)
            return r;
    }
    return qcow2_flush_own_co(n, co);
}

int qcow2_flush_own_co(struct fmt_node *n, struct coro *co)
{
    struct qcow2 *s = qcow2_of(n);
    struct qcow2_cache_wb rb = {0}, l2 = {0};
    struct qcow2_pending_free *frees = NULL;
    size_t n_frees = 0;
    uint64_t l1_lo = 0, l1_hi = 0;
    uint8_t *l1_saved = NULL;

    qcow2_lock_co(s, co);
    for (;;) {
        if (qcow2_cache_wait_wb_locked_co(&s->rb_cache, co) ||
            qcow2_cache_wait_wb_locked_co(&s->l2_cache, co))
            continue;
        if (!s->l1_wb)
            break;
        co_mutex_unlock(&s->lock, co);
        co_queue_wait_co(&s->l1_wb_waiters, co);
        qcow2_lock_co(s, co);
    }
    int r = qcow2_cache_wb_begin_locked(&s->rb_cache, co, &rb);
    if (r == 0) {
        r = qcow2_cache_wb_begin_locked(&s->l2_cache, co, &l2);
        if (r < 0)
            qcow2_cache_wb_abort(&s->rb_cache, &rb);
    }
    if (r == 0) {
        r = l1_wb_begin_locked(s, &l1_lo, &l1_hi, &l1_saved);
        if (r < 0) {
            qcow2_cache_wb_abort(&s->rb_cache, &rb);
            qcow2_cache_wb_abort(&s->l2_cache, &l2);
        }
    }
    if (r == 0) {
        frees = s->frees;
        n_frees = s->n_frees;
        s->frees = NULL;
        s->n_frees = s->cap_frees = 0;
    }
    co_mutex_unlock(&s->lock, co);
    if (r < 0)
        return r;

    r = qcow2_cache_wb_write_co(&s->rb_cache, co, &rb);
    if (r == 0)
        r = qcow2_cache_wb_write_co(&s->l2_cache, co, &l2);
    else
        qcow2_cache_wb_abort(&s->l2_cache, &l2);
    if (r == 0)
        r = backend_flush_co(s->node.file, co);
    if (r == 0 && l1_lo != l1_hi) {
        /* The tables these entries point at are durable now. */
        r = qcow2_write_meta_co(s, co, s->l1_disk, s->h.l1_table_offset,
                                s->l1_bytes, l1_lo * 8, (l1_hi - l1_lo) * 8,
                                BACKEND_FUA);
        if (r < 0)
            log_error("%s: writing L1 entries %llu-%llu: %s", n->filename,
                      (unsigned long long)l1_lo,
                      (unsigned long long)(l1_hi - 1), strerror(-r));
    }
    l1_wb_end(s, l1_lo, l1_hi, l1_saved, r == 0);

    if (n_frees) {
        qcow2_lock_co(s, co);
        if (r < 0) {
            requeue_frees_locked(s, frees, n_frees);
        } else {
            for (size_t i = 0; i < n_frees; i++) {
                r = qcow2_refcount_update_co(s, co, frees[i].off,
                                             frees[i].len, -1);
                if (r < 0)
                    break; /* the rest leaks */
            }
        }
        /* The lowered refcounts go out now (with FUA), not with the next
         * flush: a node closed after this flush would leak them. */
        if (r == 0) {
            while (qcow2_cache_wait_wb_locked_co(&s->rb_cache, co))
                ;
            r = qcow2_cache_wb_begin_locked(&s->rb_cache, co, &rb);
        }
        co_mutex_unlock(&s->lock, co);
        if (r == 0)
            r = qcow2_cache_wb_write_co(&s->rb_cache, co, &rb);
    }
    free(frees);
    return r;
}

/* ====================== block status ====================== */

static int qcow2_block_status_co(struct fmt_node *n, struct coro *co,
                                 uint64_t off, uint64_t len,
                                 struct fmt_extent *ext)
{
    struct qcow2 *s = qcow2_of(n);
    struct qcow2_map m;
    qcow2_lock_co(s, co);
    int r = qcow2_make_room_locked_co(s, co, off, false);
    if (r == 0)
        r = qcow2_map_get_co(s, co, off, len, &m);
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
    if (!n->read_only &&
        (qcow2_cache_has_dirty(&s->l2_cache) ||
         qcow2_cache_has_dirty(&s->rb_cache) ||
         s->l1_dirty_lo != s->l1_dirty_hi))
        log_warn("%s: closed with unwritten metadata (writes since the last "
                 "flush are lost; the image stays consistent)", n->filename);
    qcow2_cache_destroy(&s->l2_cache);
    qcow2_cache_destroy(&s->rb_cache);
    free(s->frees);
    free(s->zbuf);
    free(s->zeros);
    free(s->hdr);
    free(s->l1);
    free(s->l1_disk);
    free(s->reftable);
    free(n->filename);
    free(s);
}

static int qcow2_reopen_co(struct fmt_node *n, struct coro *co, bool read_only,
                           struct error **errp);
static void qcow2_prepare_writable_co(struct fmt_node *n, struct coro *co);
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
    .prepare_writable_co = qcow2_prepare_writable_co,
    .reopen_co = qcow2_reopen_co,
    .grow_co = qcow2_grow_co,
    .close = qcow2_close,
    .bitmap_can_store = qcow2_bitmap_can_store,
    .bitmaps_write_co = qcow2_bitmaps_write_co,
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
        qcow2_lock_co(s, co);
        r = qcow2_rebuild_refcounts_co(s, co, ext, errp);
        co_mutex_unlock(&s->lock, co);
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
                                qcow2_header_serialized_size(&s->h), 0);
        if (r == 0)
            r = backend_flush_co(file, co);
        if (r < 0)
            return error_setf(errp, -r, "%s: updating the header: %s",
                              file->name, strerror(-r));
    }
    /* Before any write can come, so that none waits for it. */
    qcow2_prepare_writable_co(&s->node, co);
    return 0;
}

/* The refcount audit, without the lock: the node takes no writes yet
 * (being opened, or read-only), reads go on.  Its findings mark the image
 * corrupt; a failed read leaves it to the first write. */
static void qcow2_prepare_writable_co(struct fmt_node *n, struct coro *co)
{
    struct qcow2 *s = qcow2_of(n);
    if (!s->refcounts_audited && !s->broken)
        (void)qcow2_audit_refcounts_unlocked_co(s, co);
}

/* Switches the node between read-only and read-write (block-commit writes
 * into a backing layer).  Control path, no request in flight on it. */
static int qcow2_reopen_co(struct fmt_node *n, struct coro *co, bool read_only,
                           struct error **errp)
{
    struct qcow2 *s = qcow2_of(n);
    char err[256];
    if (read_only) {
        /* QEMU stores persistent bitmaps when a node goes read-only */
        int rs = fmt_bitmaps_store_co(n, co, errp);
        if (rs < 0)
            return rs;
        for (struct fmt_bitmap *bm = n->bitmaps; bm; bm = bm->next)
            bm->readonly = bm->persistent;
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
    /* flagged in use on disk by prepare_write_co: now they may change */
    for (struct fmt_bitmap *bm = n->bitmaps; bm; bm = bm->next)
        bm->readonly = false;
    return 0;
}

/* Grows the virtual size (block-commit into a smaller base): the L1 table
 * is extended in place when its clusters have room (the new entries
 * zeroed on disk first), else moved to new clusters; then the header.
 * Every step is durable before the next (FUA writes; refcount blocks are
 * written through), so no sync of the whole file runs under the lock. */
/* Growing makes guest bytes [old, size) visible.  Whatever the image
 * maps there (entries of an L2 table past the old end, in the last one or
 * in tables of L1 entries past it, left by corruption or by a tool that
 * shrank the disk without clearing them; data in the rest of the last
 * cluster when the old size is not a multiple of the cluster size) would
 * show up where the new bytes must read as zeros.  Such an image is not
 * grown: -EIO with the reason, nothing changed.  Zeros in the rest of the
 * last cluster (what QEMU writes there) are fine.  Called with the lock. */
static int grow_tail_clean_locked_co(struct qcow2 *s, struct coro *co,
                                     uint64_t old, uint64_t size,
                                     struct error **errp)
{
    const uint64_t cs = qcow2_cs(s);
    const uint64_t span = cs << s->h.l2_bits;
    /* what the current L1 table's entries can map at all */
    uint64_t end = (uint64_t)s->h.l1_size * span;
    if (end > size)
        end = size;
    const uint64_t cend = (old + cs - 1) / cs * cs; /* old last cluster */
    uint64_t off = old;
    int r = 0;
    while (off < end && r == 0) {
        if (off % span == 0 &&
            !(be_get64(s->l1 + off / span * 8) & QCOW2_L1E_OFFSET_MASK)) {
            off += span; /* no L2 table: nothing mapped in this span */
            continue;
        }
        struct qcow2_map m;
        r = qcow2_map_get_co(s, co, off, end - off, &m);
        if (r < 0)
            break;
        uint64_t len = m.len < end - off ? m.len : end - off;
        if (m.type != QCOW2_CLUSTER_NORMAL &&
            m.type != QCOW2_CLUSTER_COMPRESSED) {
            off += len;
            continue;
        }
        if (m.type == QCOW2_CLUSTER_NORMAL && off < cend) {
            /* the old last cluster: its bytes past the end must be zeros */
            uint64_t n = len < cend - off ? len : cend - off;
            uint64_t a = s->io_align;
            uint64_t rs = m.host & ~(a - 1);
            uint64_t re = (m.host + n + a - 1) & ~(a - 1);
            uint8_t *buf = qcow2_buf_alloc(s, re - rs);
            if (!buf) {
                r = -ENOMEM;
                break;
            }
            r = backend_pread_co(s->node.file, co, buf, re - rs, rs);
            bool zero = r == 0;
            for (uint64_t i = 0; zero && i < n; i++)
                zero = buf[m.host - rs + i] == 0;
            free(buf);
            if (r < 0)
                break;
            if (zero) {
                off += n;
                continue;
            }
        }
        error_setf(errp, EIO, "%s: cannot grow: the image maps data at "
                   "guest offset %#llx, past its end (%llu bytes), which "
                   "would show in the new bytes (repair it with qemu-img "
                   "check -r all, or copy it with qemu-img convert)",
                   s->node.filename, (unsigned long long)off,
                   (unsigned long long)old);
        r = -EIO;
    }
    return r;
}

/* Waits (dropping the lock) until no flush is writing l1_disk and no
 * header write is in flight: what growing the image replaces. */
static void grow_wait_locked_co(struct qcow2 *s, struct coro *co)
{
    for (;;) {
        if (qcow2_header_wait_locked_co(s, co))
            continue;
        if (!s->l1_wb)
            return;
        co_mutex_unlock(&s->lock, co);
        co_queue_wait_co(&s->l1_wb_waiters, co);
        qcow2_lock_co(s, co);
    }
}

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
    qcow2_lock_co(s, co);
    grow_wait_locked_co(s, co);
    int r = s->broken ? error_setf(errp, EIO, "%s: the image is corrupt: "
                                   "no more writes to it", n->filename)
                      : grow_tail_clean_locked_co(s, co, n->size, size, errp);
    uint64_t l1_off = s->h.l1_table_offset;
    uint64_t old_off = 0, old_bytes = 0;
    uint8_t *nl1 = NULL, *nl1_disk = NULL;
    if (r == 0 && new_l1 > s->h.l1_size) {
        uint64_t need = (new_l1 * 8 + cs - 1) / cs * cs;
        if (s->h.l1_size && need <= s->l1_bytes) {
            /* Room in the current clusters: zero the new entries on disk. */
            r = qcow2_write_meta_co(s, co, s->l1_disk, s->h.l1_table_offset,
                                    s->l1_bytes, (uint64_t)s->h.l1_size * 8,
                                    (new_l1 - s->h.l1_size) * 8, BACKEND_FUA);
        } else {
            /* The new table on disk holds what the old one holds; entries
             * not written yet stay for the next flush. */
            uint64_t host;
            nl1 = qcow2_buf_alloc(s, need);
            nl1_disk = qcow2_buf_alloc(s, need);
            r = nl1 && nl1_disk ? qcow2_alloc_exact_co(s, co, need / cs, &host)
                                : -ENOMEM;
            if (r == 0) {
                /* The allocator may have dropped the lock (a refcount
                 * table growth): a flush may be writing l1_disk, the
                 * growth the header. */
                grow_wait_locked_co(s, co);
                memset(nl1, 0, need);
                memcpy(nl1, s->l1, (uint64_t)s->h.l1_size * 8);
                memset(nl1_disk, 0, need);
                memcpy(nl1_disk, s->l1_disk, (uint64_t)s->h.l1_size * 8);
                r = backend_pwrite_co(n->file, co, nl1_disk, need, host,
                                      BACKEND_FUA);
                if (r < 0)
                    qcow2_refcount_update_co(s, co, host, need, -1);
                old_off = s->h.l1_table_offset;
                old_bytes = s->h.l1_size ? s->l1_bytes : 0;
                l1_off = host;
            }
        }
        if (r == 0) /* new refcounts durable before the header */
            r = qcow2_cache_flush_co(&s->rb_cache, co);
    }
    /* From s->h as it is now: the refcount table may have moved since
     * the lock was taken. */
    struct qcow2_header h = s->h;
    if (new_l1 > s->h.l1_size) {
        h.l1_table_offset = l1_off;
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
                                    qcow2_header_serialized_size(&h),
                                    BACKEND_FUA);
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
            free(s->l1_disk);
            s->l1 = nl1;
            s->l1_disk = nl1_disk;
            s->l1_bytes = (new_l1 * 8 + cs - 1) / cs * cs;
            nl1 = nl1_disk = NULL;
            /* The disk has grown: a failure to free the old table only
             * leaks its clusters (as QEMU does), it does not undo that. */
            if (old_bytes &&
                qcow2_refcount_update_co(s, co, old_off, old_bytes, -1) < 0)
                log_warn("%s: the old L1 table at %#llx could not be freed "
                         "(%llu bytes leaked)", n->filename,
                         (unsigned long long)old_off,
                         (unsigned long long)old_bytes);
        }
    }
    free(nl1);
    free(nl1_disk);
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
    struct qcow2 *s = calloc(1, sizeof(*s));
    if (!s) {
        error_setf(errp, ENOMEM, "out of memory");
        return NULL;
    }
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
    s->l1_disk = qcow2_buf_alloc(s, s->l1_bytes);
    if (!s->l1_disk)
        goto nomem;
    memcpy(s->l1_disk, s->l1, s->l1_bytes);
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
    for (uint64_t i = s->reftable_entries; i > 0; i--) {
        if (be_get64(s->reftable + (i - 1) * 8)) {
            s->reftable_used = i;
            break;
        }
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
    s->rb_cache.write_through = true;

    n->size = s->h.size;
    n->cluster_size = s->h.cluster_size;
    n->align = s->io_align;
    if (!n->read_only)
        n->caps = FMT_CAN_TRIM | (s->has_zero_flag ? FMT_CAN_ZERO : 0);

    if (qcow2_bitmaps_load_co(s, co, ext, errp) < 0)
        goto fail;
    if (!n->read_only && prepare_write_co(s, co, ext, errp) < 0)
        goto fail;
    free(ext);
    return n;

nomem:
    error_setf(errp, ENOMEM, "%s: out of memory", file->name);
fail:
    free(ext);
    fmt_bitmaps_free(n);
    qcow2_cache_destroy(&s->l2_cache);
    qcow2_cache_destroy(&s->rb_cache);
    free(s->hdr);
    free(s->l1);
    free(s->l1_disk);
    free(s->reftable);
    free(n->filename);
    free(s);
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
