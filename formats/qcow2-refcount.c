/* strata — qcow2 refcounts: lookups and updates through the refcount block
 * cache, cluster allocation, and growth of the refcount structures.
 *
 * Everything here runs with the image lock held (and may drop it where
 * it says so).  Refcount blocks are written through (FUA), and so are the
 * refcount table and the header when they change: durable when the write
 * completes, without a sync of the whole file.
 *
 * A missing refcount block for a range of clusters means they are all
 * free.  When one of them is needed, a new block is placed at the first
 * cluster of its own range, so that it describes itself; when that
 * cluster would lie inside a contiguous run being allocated, the run's
 * missing blocks are placed right after it instead
 * (create_blocks_after_run_co).  When the
 * refcount table is full it is replaced by a larger one, placed together
 * with the blocks that describe it right after the area the old table
 * covers (all free by definition); the new structures are written with
 * FUA before the header points at them, and only then is the old table
 * freed.  A crash at any point leaves the old or the new table in force,
 * at worst with leaked clusters.  Creating a block and growing the table
 * write without the lock (see create_block_co and grow_reftable_co):
 * the allocator then returns having dropped it (s->alloc_unlocked).
 */
#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "byteorder.h"
#include "log.h"
#include "qcow2.h"

#define REFTABLE_OFFSET_MASK UINT64_C(0xfffffffffffffe00)

static uint64_t per_block(const struct qcow2 *s)
{
    return UINT64_C(1) << s->h.refcount_block_bits;
}

static uint64_t reftable_get(const struct qcow2 *s, uint64_t idx)
{
    return be_get64(s->reftable + idx * 8) & REFTABLE_OFFSET_MASK;
}

/* The refcount block of table index idx, pinned, or NULL (*ep) when the
 * block does not exist. */
static int block_get_co(struct qcow2 *s, struct coro *co, uint64_t idx,
                        struct qcow2_cache_entry **ep)
{
    *ep = NULL;
    if (idx >= s->reftable_entries)
        return 0;
    uint64_t off = reftable_get(s, idx);
    if (off == 0)
        return 0;
    if (off & (qcow2_cs(s) - 1))
        return qcow2_corrupt(s, "refcount block %llu at unaligned offset "
                             "%#llx", (unsigned long long)idx,
                             (unsigned long long)off);
    if (off < qcow2_cs(s) || off >= s->node.file->size)
        return qcow2_corrupt(s, "refcount block %llu at %#llx is outside "
                             "the image file", (unsigned long long)idx,
                             (unsigned long long)off);
    return qcow2_cache_get_co(&s->rb_cache, co, off, false, ep);
}

int qcow2_refcount_get_co(struct qcow2 *s, struct coro *co, uint64_t cluster,
                          uint64_t *rc)
{
    assert(co_mutex_held(&s->lock, co));
    struct qcow2_cache_entry *e;
    int r = block_get_co(s, co, cluster >> s->h.refcount_block_bits, &e);
    if (r < 0)
        return r;
    if (!e) {
        *rc = 0;
        return 0;
    }
    *rc = qcow2_refcount_get(e->table, s->h.refcount_order,
                             cluster & (per_block(s) - 1));
    qcow2_cache_put(&s->rb_cache, e);
    return 0;
}

/* Drops the lock, waits for the next wake of rb_create_waiters, takes
 * the lock again. */
static void wait_rb_co(struct qcow2 *s, struct coro *co)
{
    co_mutex_unlock(&s->lock, co);
    co_queue_wait_co(&s->rb_create_waiters, co);
    qcow2_lock_co(s, co);
}

/* Replaces the refcount table by one with at least min_entries entries
 * that also covers the clusters it and its new blocks occupy.  They are
 * placed right after the area the old table covers (free by definition:
 * nothing can count those clusters), planned and built under the lock,
 * and written without it, so that requests that need no new refcount
 * block go on meanwhile (s->rt_growing):
 *
 *   1. under the lock: the layout, the new blocks (counting themselves
 *      and the table) and a copy of the old table's entries plus the new
 *      blocks' entries;
 *   2. without it: the blocks, then the table, each with FUA;
 *   3. without it: the header, naming the new table (FUA), with every
 *      other header writer held off (hdr_writing);
 *   4. under it: the new table in force in memory; the old one freed.
 *
 * No refcount block is created meanwhile (ensure_block_co waits), so the
 * old table's entries stay what the copy holds.  A crash before the
 * header write completes leaves the old table in force (the new
 * structures lie in clusters nothing counts, which qemu-img check does
 * not report); after it, the new table, which holds every entry of the
 * old one: at worst the old table's clusters leak. */
static int grow_reftable_co(struct qcow2 *s, struct coro *co,
                            uint64_t min_entries)
{
    assert(!s->rt_growing && !s->rb_creating);
    const uint64_t cs = qcow2_cs(s);
    const uint64_t per = per_block(s);
    const uint64_t epc = cs / 8;
    const uint64_t old = s->reftable_entries;
    const uint64_t area = old * per; /* first cluster nothing describes */
    uint64_t tclusters = 0, blocks = 0, entries = 0;

    for (int round = 0;; round++) {
        uint64_t end = area + tclusters + blocks;
        uint64_t need = (end + per - 1) / per;
        if (need < min_entries)
            need = min_entries;
        if (need < old + 1)
            need = old + 1;
        /* Room to grow: half as much again, in whole clusters. */
        uint64_t want = need + need / 2;
        want = (want + epc - 1) / epc * epc;
        if (want < entries)
            want = entries;
        uint64_t nb = end > area ? (end + per - 1) / per - old : 0;
        if (want == entries && want / epc == tclusters && nb == blocks)
            break;
        entries = want;
        tclusters = want / epc;
        if (nb > blocks)
            blocks = nb;
        if (round > 64) {
            /* Not corruption: a layout this code cannot plan. */
            log_error("%s: the refcount table growth to %llu entries "
                      "does not converge", s->node.filename,
                      (unsigned long long)min_entries);
            return -EFBIG;
        }
    }
    if (entries * 8 > QCOW2_MAX_REFTABLE_BYTES) {
        log_error("%s: the refcount table would exceed %llu bytes",
                  s->node.filename,
                  (unsigned long long)QCOW2_MAX_REFTABLE_BYTES);
        return -EFBIG;
    }
    if ((area + tclusters + blocks) * cs >> 56) /* L2 offsets end at bit 55 */
        return -EFBIG;

    const uint64_t toff = area * cs;
    uint8_t *table = qcow2_buf_alloc(s, tclusters * cs);
    uint8_t *bl = qcow2_buf_alloc(s, blocks * cs);
    uint8_t *nh = qcow2_buf_alloc(s, cs);
    if (!table || !bl || !nh) {
        free(table);
        free(bl);
        free(nh);
        return -ENOMEM;
    }
    memset(table, 0, tclusters * cs);
    memset(bl, 0, blocks * cs);
    memcpy(table, s->reftable, old * 8);
    for (uint64_t j = 0; j < blocks; j++)
        be_put64(table + (old + j) * 8, (area + tclusters + j) * cs);
    for (uint64_t x = area; x < area + tclusters + blocks; x++) {
        uint64_t j = x / per - old;
        qcow2_refcount_set(bl + j * cs, s->h.refcount_order, x % per, 1);
    }

    /* 1-2: the new blocks and table, durable before the header names
     * them, written without the lock. */
    s->rt_growing = true;
    co_mutex_unlock(&s->lock, co);
    int r = backend_pwrite_co(s->node.file, co, bl, blocks * cs,
                              (area + tclusters) * cs, BACKEND_FUA);
    if (r == 0)
        r = backend_pwrite_co(s->node.file, co, table, tclusters * cs, toff,
                              BACKEND_FUA);
    free(bl);
    qcow2_lock_co(s, co);

    /* 3: the header, built from what is in memory now (the old table's
     * entries cannot have changed: no block was created meanwhile);
     * every other header writer waits (they write it under the lock). */
    uint64_t old_off = s->h.refcount_table_offset;
    uint64_t old_clusters = s->h.refcount_table_clusters;
    struct qcow2_header h = s->h;
    bool header_tried = false;
    if (r == 0) {
        assert(memcmp(table, s->reftable, old * 8) == 0);
        h.refcount_table_offset = toff;
        h.refcount_table_clusters = (uint32_t)tclusters;
        memcpy(nh, s->hdr, cs);
        qcow2_header_serialize(&h, nh, cs);
        s->hdr_writing = true;
        co_mutex_unlock(&s->lock, co);
        header_tried = true;
        r = qcow2_write_meta_co(s, co, nh, 0, cs, 0,
                                qcow2_header_serialized_size(&h),
                                BACKEND_FUA);
        qcow2_lock_co(s, co);
        s->hdr_writing = false;
        co_queue_wake_all(&s->hdr_waiters);
    }

    /* 4 */
    s->rt_growing = false;
    co_queue_wake_all(&s->rb_create_waiters);
    if (r < 0) {
        log_error("%s: growing the refcount table: %s", s->node.filename,
                  strerror(-r));
        /* Unknown whether the header reached the disk: the old and the
         * new table are both valid there, but which one is in force is
         * not known; stop writing. */
        if (header_tried)
            s->broken = true;
        free(table);
        free(nh);
        return r;
    }
    memcpy(s->hdr, nh, cs);
    free(nh);
    s->h.refcount_table_offset = toff;
    s->h.refcount_table_clusters = (uint32_t)tclusters;
    free(s->reftable);
    s->reftable = table;
    s->reftable_entries = entries;
    if (s->reftable_used < old + blocks)
        s->reftable_used = old + blocks;
    log_debug("%s: refcount table grown to %llu entries at %#llx",
              s->node.filename, (unsigned long long)entries,
              (unsigned long long)toff);
    return qcow2_refcount_update_co(s, co, old_off, old_clusters * cs, -1);
}

/* Creates refcount block idx (absent) at the first cluster of its range,
 * describing itself.  The block and then its refcount table entry are
 * written with FUA without the lock: meanwhile the table in memory still
 * has no entry for it, so nothing is allocated in its range, and
 * rb_creating keeps other creations and the table's growth out (the
 * entry's neighbours, written along with it, do not change). */
static int create_block_co(struct qcow2 *s, struct coro *co, uint64_t idx)
{
    const uint64_t cs = qcow2_cs(s);
    uint64_t x0 = idx * per_block(s);
    if (x0 == 0)
        return qcow2_corrupt(s, "no refcount block for the header cluster");
    /* The refcount table entry's aligned neighbourhood, as it will be. */
    uint64_t a = s->io_align;
    uint64_t tbytes = (uint64_t)s->h.refcount_table_clusters * cs;
    uint64_t tstart = (idx * 8) & ~(a - 1);
    uint64_t tend = (idx * 8 + 8 + a - 1) & ~(a - 1);
    if (tend > tbytes)
        tend = tbytes;
    uint64_t toff = s->h.refcount_table_offset;
    uint8_t *blk = qcow2_buf_alloc(s, cs);
    uint8_t *tcopy = qcow2_buf_alloc(s, tend - tstart);
    if (!blk || !tcopy) {
        free(blk);
        free(tcopy);
        return -ENOMEM;
    }
    memset(blk, 0, cs);
    qcow2_refcount_set(blk, s->h.refcount_order, 0, 1);
    memcpy(tcopy, s->reftable + tstart, tend - tstart);
    be_put64(tcopy + idx * 8 - tstart, x0 * cs);
    s->rb_creating = true;
    co_mutex_unlock(&s->lock, co);

    int r = backend_pwrite_co(s->node.file, co, blk, cs, x0 * cs,
                              BACKEND_FUA);
    if (r == 0)
        r = backend_pwrite_co(s->node.file, co, tcopy, tend - tstart,
                              toff + tstart, BACKEND_FUA);
    if (r < 0)
        log_error("%s: creating refcount block %llu: %s", s->node.filename,
                  (unsigned long long)idx, strerror(-r));
    free(blk);
    free(tcopy);

    qcow2_lock_co(s, co);
    s->rb_creating = false;
    co_queue_wake_all(&s->rb_create_waiters);
    if (r < 0)
        return r;
    be_put64(s->reftable + idx * 8, x0 * cs);
    if (s->reftable_used < idx + 1)
        s->reftable_used = idx + 1;
    if (s->free_cluster_index == x0)
        s->free_cluster_index = x0 + 1;
    return 1;
}

/* Whether block idx may not be created now: another creation is in
 * flight, or a growth of the table (which copied the old table's entries
 * and must not miss one). */
static bool must_wait_for_block(const struct qcow2 *s)
{
    return s->rb_creating || s->rt_growing;
}

/* Makes sure refcount block idx exists.  Returns 1 if it had to be created
 * (clusters were used for it) or the lock was dropped (anything may have
 * changed: search again), 0 if it was there, or -errno. */
static int ensure_block_co(struct qcow2 *s, struct coro *co, uint64_t idx)
{
    if (idx < s->reftable_entries && reftable_get(s, idx) != 0)
        return 0;
    s->alloc_unlocked++; /* whatever follows drops the lock */
    if (must_wait_for_block(s)) {
        /* Until what kept it out is over, not at every wake. */
        do
            wait_rb_co(s, co);
        while (must_wait_for_block(s));
        return 1;
    }
    if (idx >= s->reftable_entries) {
        int r = grow_reftable_co(s, co, idx + 1);
        if (r < 0)
            return r;
        return 1;
    }
    return create_block_co(s, co, idx);
}

int qcow2_refcount_update_co(struct qcow2 *s, struct coro *co, uint64_t off,
                             uint64_t len, int addend)
{
    assert(co_mutex_held(&s->lock, co));
    if (len == 0)
        return 0;
    const unsigned cb = s->h.cluster_bits;
    const uint64_t max = qcow2_refcount_max(s->h.refcount_order);
    uint64_t first = off >> cb, last = (off + len - 1) >> cb;
    struct qcow2_cache_entry *e = NULL;
    uint64_t e_idx = UINT64_MAX;
    int r = 0;

    for (uint64_t c = first; c <= last; c++) {
        uint64_t idx = c >> s->h.refcount_block_bits;
        if (idx != e_idx) {
            if (e)
                qcow2_cache_put(&s->rb_cache, e);
            e = NULL;
            e_idx = UINT64_MAX;
            if (addend > 0) {
                r = ensure_block_co(s, co, idx);
                if (r < 0)
                    break;
            }
            r = block_get_co(s, co, idx, &e);
            if (r < 0)
                break;
            if (!e) {
                r = qcow2_corrupt(s, "freeing cluster %#llx that has no "
                                  "refcount block",
                                  (unsigned long long)(c << cb));
                break;
            }
            e_idx = idx;
        }
        uint64_t i = c & (per_block(s) - 1);
        uint64_t v = qcow2_refcount_get(e->table, s->h.refcount_order, i);
        if ((addend < 0 && v == 0) || (addend > 0 && v == max)) {
            r = qcow2_corrupt(s, "refcount of cluster %#llx would %s",
                              (unsigned long long)(c << cb),
                              addend < 0 ? "drop below zero" : "overflow");
            break;
        }
        v = addend < 0 ? v - 1 : v + 1;
        qcow2_refcount_set(e->table, s->h.refcount_order, i, v);
        qcow2_cache_mark_dirty(&s->rb_cache, e);
        if (v == 0 && c < s->free_cluster_index)
            s->free_cluster_index = c;
    }
    if (e)
        qcow2_cache_put(&s->rb_cache, e);
    return r < 0 ? r : 0;
}

int qcow2_check_meta_overlap_locked(struct qcow2 *s, uint64_t off,
                                    uint64_t len, const char *what)
{
    assert(co_mutex_locked(&s->lock));
    const uint64_t cs = qcow2_cs(s);
    const uint64_t end = off + len;
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
            meta[i].start < end)
            return qcow2_corrupt(s, "%s at %#llx overlaps %s", what,
                                 (unsigned long long)off, meta[i].what);
    /* Refcount blocks and active L2 tables: one cluster each, aligned
     * (entries that are not were refused when read, or never are).  This
     * runs on every data write: only the refcount table's used part. */
    for (uint64_t i = 0; i < s->reftable_used; i++) {
        uint64_t b = reftable_get(s, i);
        if (b && off < b + cs && b < end)
            return qcow2_corrupt(s, "%s at %#llx overlaps refcount block "
                                 "%llu", what, (unsigned long long)off,
                                 (unsigned long long)i);
    }
    for (uint64_t i = 0; i < s->h.l1_size; i++) {
        uint64_t t = be_get64(s->l1 + i * 8) & QCOW2_L1E_OFFSET_MASK;
        if (t && off < t + cs && t < end)
            return qcow2_corrupt(s, "%s at %#llx overlaps L2 table %llu",
                                 what, (unsigned long long)off,
                                 (unsigned long long)i);
    }
    return 0;
}

/* Finds a run of free, not busy clusters from the hint: at most want of
 * them, exactly want with exact. */
static int find_free_co(struct qcow2 *s, struct coro *co, uint64_t want,
                        bool exact, uint64_t *start, uint64_t *got)
{
    const uint64_t cs = qcow2_cs(s);
    uint64_t c = s->free_cluster_index;
    uint64_t first_busy = UINT64_MAX;
    for (;;) {
        uint64_t rc;
        int r = qcow2_refcount_get_co(s, co, c, &rc);
        if (r < 0)
            return r;
        if (rc != 0 || qcow2_busy_overlaps(s, c * cs, cs)) {
            if (rc == 0 && first_busy == UINT64_MAX)
                first_busy = c;
            c++;
            continue;
        }
        uint64_t n = 1;
        while (n < want) {
            r = qcow2_refcount_get_co(s, co, c + n, &rc);
            if (r < 0)
                return r;
            if (rc != 0 || qcow2_busy_overlaps(s, (c + n) * cs, cs))
                break;
            n++;
        }
        if (exact && n < want) {
            if (first_busy == UINT64_MAX)
                first_busy = c; /* free, only too short a run */
            c += n;
            continue;
        }
        if (((c + n) * cs) >> 56)
            return -ENOSPC;
        *start = c;
        *got = n;
        /* Below the run, only used clusters and those skipped. */
        s->free_cluster_index = first_busy != UINT64_MAX ? first_busy : c;
        return 0;
    }
}

/* Whether the run [start, start + n) holds the first cluster of a range
 * whose refcount block does not exist: create_block_co would place the
 * block there, inside the run, and the run would never be found whole
 * (a run of a whole range or more always holds one). */
static bool run_holds_block_home(const struct qcow2 *s, uint64_t start,
                                 uint64_t n)
{
    const unsigned rbb = s->h.refcount_block_bits;
    for (uint64_t b = (start + per_block(s) - 1) >> rbb;
         b <= (start + n - 1) >> rbb; b++)
        if (b >= s->reftable_entries || reftable_get(s, b) == 0)
            return true;
    return false;
}

/* The number of missing refcount blocks for clusters [start, end), where
 * every index is below reftable_entries. */
static uint64_t missing_blocks(const struct qcow2 *s, uint64_t start,
                               uint64_t end)
{
    uint64_t m = 0;
    for (uint64_t b = start >> s->h.refcount_block_bits;
         b <= (end - 1) >> s->h.refcount_block_bits; b++)
        m += reftable_get(s, b) == 0;
    return m;
}

/* For an exact run of n clusters that a self-describing block would
 * split: finds a free area of n + m clusters, m the number of refcount
 * blocks missing for it, and creates those blocks in its last m clusters,
 * after the run, each counting the new blocks in its own range (growing
 * the refcount table first if the area lies past it).  As create_block_co:
 * the blocks, then their table entries, written with FUA without the lock,
 * the area marked busy meanwhile and rb_creating set.  Returns 1 (the lock
 * was dropped: search again) or -errno. */
static int create_blocks_after_run_co(struct qcow2 *s, struct coro *co,
                                      uint64_t n)
{
    const uint64_t cs = qcow2_cs(s);
    const unsigned rbb = s->h.refcount_block_bits;
    s->alloc_unlocked++; /* whatever follows drops the lock */
    if (must_wait_for_block(s)) {
        do
            wait_rb_co(s, co);
        while (must_wait_for_block(s));
        return 1;
    }
    uint64_t m = 0, start = 0, got, mm = 0;
    for (int round = 0;; round++) {
        int r = find_free_co(s, co, n + m, true, &start, &got);
        if (r < 0)
            return r;
        uint64_t last = (start + n + m - 1) >> rbb;
        if (last >= s->reftable_entries) {
            r = grow_reftable_co(s, co, last + 1);
            return r < 0 ? r : 1;
        }
        mm = missing_blocks(s, start, start + n + m);
        if (mm <= m)
            break;
        m = mm;
        if (round > 64) {
            log_error("%s: no layout found for %llu contiguous clusters "
                      "and their refcount blocks", s->node.filename,
                      (unsigned long long)n);
            return -ENOSPC;
        }
    }
    /* Blocks for every range [start, start + n + m) touches that has none
     * (mm of them), at [start + n, start + n + mm): each in a range that
     * has a block or gets one. */
    const uint64_t i0 = start >> rbb, i1 = (start + n + m - 1) >> rbb;
    const uint64_t p0 = start + n;
    uint64_t a = s->io_align;
    uint64_t tbytes = (uint64_t)s->h.refcount_table_clusters * cs;
    uint64_t tstart = (i0 * 8) & ~(a - 1);
    uint64_t tend = (i1 * 8 + 8 + a - 1) & ~(a - 1);
    if (tend > tbytes)
        tend = tbytes;
    uint8_t *bl = qcow2_buf_alloc(s, mm * cs);
    uint8_t *tcopy = qcow2_buf_alloc(s, tend - tstart);
    uint64_t *idx = calloc(mm, sizeof(*idx));
    if (!bl || !tcopy || !idx) {
        free(bl);
        free(tcopy);
        free(idx);
        return -ENOMEM;
    }
    memset(bl, 0, mm * cs);
    memcpy(tcopy, s->reftable + tstart, tend - tstart);
    uint64_t j = 0;
    for (uint64_t b = i0; b <= i1; b++) {
        if (reftable_get(s, b) != 0)
            continue;
        idx[j] = b;
        be_put64(tcopy + b * 8 - tstart, (p0 + j) * cs);
        j++;
    }
    assert(j == mm);
    /* A new block in a range that already has a block: that block must
     * count it durably before the table names it. */
    bool old_counts = false;
    for (uint64_t x = p0; x < p0 + mm; x++) {
        uint64_t b = x >> rbb;
        uint64_t k = 0;
        while (k < mm && idx[k] != b)
            k++;
        if (k < mm)
            qcow2_refcount_set(bl + k * cs, s->h.refcount_order,
                               x & (per_block(s) - 1), 1);
        else
            old_counts = true;
    }
    int r = 0;
    if (old_counts) {
        /* Only ranges whose block exists: nothing is created here. */
        for (uint64_t x = p0; x < p0 + mm && r == 0; x++)
            if (reftable_get(s, x >> rbb) != 0)
                r = qcow2_refcount_update_co(s, co, x * cs, cs, +1);
        if (r == 0)
            r = qcow2_cache_flush_co(&s->rb_cache, co);
        if (r < 0) {
            free(bl);
            free(tcopy);
            free(idx);
            return r;
        }
    }

    struct qcow2_busy busy;
    qcow2_busy_add(s, &busy, start * cs, (n + mm) * cs);
    s->rb_creating = true;
    co_mutex_unlock(&s->lock, co);
    r = backend_pwrite_co(s->node.file, co, bl, mm * cs, p0 * cs,
                          BACKEND_FUA);
    if (r == 0)
        r = backend_pwrite_co(s->node.file, co, tcopy, tend - tstart,
                              s->h.refcount_table_offset + tstart,
                              BACKEND_FUA);
    if (r < 0)
        log_error("%s: creating %llu refcount blocks from %llu: %s",
                  s->node.filename, (unsigned long long)mm,
                  (unsigned long long)i0, strerror(-r));
    free(bl);
    free(tcopy);
    qcow2_lock_co(s, co);
    qcow2_busy_del(s, &busy);
    s->rb_creating = false;
    co_queue_wake_all(&s->rb_create_waiters);
    if (r == 0) {
        for (j = 0; j < mm; j++) {
            be_put64(s->reftable + idx[j] * 8, (p0 + j) * cs);
            if (s->reftable_used < idx[j] + 1)
                s->reftable_used = idx[j] + 1;
        }
        log_debug("%s: %llu refcount blocks at %#llx for a run of %llu "
                  "clusters at %#llx", s->node.filename,
                  (unsigned long long)mm, (unsigned long long)(p0 * cs),
                  (unsigned long long)n, (unsigned long long)(start * cs));
    }
    /* On failure, existing blocks may count new-block clusters nothing
     * uses: a leak, not corruption. */
    free(idx);
    return r < 0 ? r : 1;
}

static int alloc_co(struct qcow2 *s, struct coro *co, uint64_t want,
                    bool exact, uint64_t *host, uint64_t *got)
{
    assert(co_mutex_held(&s->lock, co));
    const uint64_t cs = qcow2_cs(s);
    /* The allocator trusts refcount 0 to mean free: before it hands out
     * its first cluster, make sure no cluster in use says so (writes
     * audit first too; this covers allocations without a guest write). */
    if (!s->refcounts_audited) {
        int r = qcow2_audit_refcounts_co(s, co);
        if (r < 0)
            return r;
    }
    for (int tries = 0; tries < 64; tries++) {
        uint64_t start, n;
        int r = find_free_co(s, co, want, exact, &start, &n);
        if (r < 0)
            return r;
        /* An exact run a self-describing block would split: its blocks
         * go after it instead. */
        if (exact && n > 1 && run_holds_block_home(s, start, n)) {
            r = create_blocks_after_run_co(s, co, n);
            if (r < 0)
                return r;
            continue;
        }
        /* The blocks that will count the run must exist; creating one
         * takes a cluster, so search again if anything changed. */
        bool changed = false;
        uint64_t b0 = start >> s->h.refcount_block_bits;
        uint64_t b1 = (start + n - 1) >> s->h.refcount_block_bits;
        for (uint64_t b = b0; b <= b1; b++) {
            r = ensure_block_co(s, co, b);
            if (r < 0)
                return r;
            if (r > 0)
                changed = true;
        }
        if (changed)
            continue;
        /* A free cluster that holds metadata: the refcounts lie. */
        r = qcow2_check_meta_overlap_locked(s, start * cs, n * cs,
                                            "a free cluster");
        if (r < 0)
            return r;
        r = qcow2_refcount_update_co(s, co, start * cs, n * cs, +1);
        if (r < 0)
            return r;
        if (s->free_cluster_index == start)
            s->free_cluster_index = start + n;
        *host = start * cs;
        *got = n;
        return 0;
    }
    /* Not corruption: concurrent allocations kept taking the clusters
     * found (or a layout this code cannot plan). */
    log_error("%s: no run of %llu free clusters could be allocated",
              s->node.filename, (unsigned long long)want);
    return -ENOSPC;
}

int qcow2_alloc_clusters_co(struct qcow2 *s, struct coro *co, uint64_t want,
                            uint64_t *host, uint64_t *got)
{
    return alloc_co(s, co, want, false, host, got);
}

int qcow2_alloc_exact_co(struct qcow2 *s, struct coro *co, uint64_t n,
                         uint64_t *host)
{
    uint64_t got;
    return alloc_co(s, co, n, true, host, &got);
}

/* ---- rebuilding refcounts (dirty image) ---- */

/* A walk over all metadata and every cluster it references.  It either
 * gathers reference counts (counts, for a rebuild) or, with audit, checks
 * them against the refcounts (qcow2_audit_refcounts_co): marks holds, per
 * cluster of the file, the references seen (low 7 bits, saturating) and
 * whether one of them claims the cluster alone (AUDIT_EXCL: metadata, or
 * an entry with the COPIED flag, whose cluster a write changes in place). */
struct recount {
    struct qcow2 *s;
    struct coro *co;
    struct error **errp;
    uint32_t *counts;
    uint64_t nclusters;
    uint8_t *l2buf;
    bool audit;
    bool excl;                    /* the next range is claimed alone */
    uint8_t *marks;               /* audit; NULL: too large a file */
    bool io_failed;               /* a read failed: nothing was proven */
    bool unlocked;                /* the caller does not hold the lock:
                                     each cache lookup takes it alone */
};

/* The refcount of cluster c, through the refcount block cache (under the
 * lock: held by the caller, or taken for this lookup only). */
static int rc_refcount_get(struct recount *rc, uint64_t c, uint64_t *ref)
{
    if (!rc->unlocked)
        return qcow2_refcount_get_co(rc->s, rc->co, c, ref);
    co_mutex_lock_co(&rc->s->lock, rc->co);
    int r = qcow2_refcount_get_co(rc->s, rc->co, c, ref);
    co_mutex_unlock(&rc->s->lock, rc->co);
    return r;
}

/* Copies the L2 table at off out of the L2 cache if it is there (it may
 * be ahead of the file): 1 if copied, 0 if not cached, or -errno. */
static int rc_l2_cached(struct recount *rc, uint64_t off)
{
    struct qcow2 *s = rc->s;
    if (rc->unlocked)
        co_mutex_lock_co(&s->lock, rc->co);
    int r = 0;
    if (qcow2_cache_contains(&s->l2_cache, off)) {
        struct qcow2_cache_entry *ce;
        r = qcow2_cache_get_co(&s->l2_cache, rc->co, off, false, &ce);
        if (r == 0) {
            memcpy(rc->l2buf, ce->table, qcow2_cs(s));
            qcow2_cache_put(&s->l2_cache, ce);
            r = 1;
        }
    }
    if (rc->unlocked)
        co_mutex_unlock(&s->lock, rc->co);
    return r;
}

#define AUDIT_EXCL 0x80
#define AUDIT_MAX_CLUSTERS (UINT64_C(1) << 26)
#define AUDIT_COUNT_MAX 0x7f

/* Audit: every cluster of host bytes [off, off + len), used as what,
 * must have a refcount, and must not be shared with another user if
 * either claims it alone. */
static int audit_range(struct recount *rc, uint64_t off, uint64_t len,
                       const char *what)
{
    const unsigned cb = rc->s->h.cluster_bits;
    uint64_t first = off >> cb, last = (off + len - 1) >> cb;
    /* Past the end of the file: once a write grows the file there, the
     * entry would name what the allocator placed there. */
    if (first >= rc->nclusters)
        return error_setf(rc->errp, EIO, "%s at %#llx lies past the end of "
                          "the file; repair the image with 'qemu-img check "
                          "-r all'", what, (unsigned long long)off);
    for (uint64_t c = first; c <= last; c++) {
        uint8_t m = rc->marks && c < rc->nclusters ? rc->marks[c] : 0;
        if ((m & AUDIT_COUNT_MAX) && (rc->excl || (m & AUDIT_EXCL)))
            return error_setf(rc->errp, EIO, "%s at %#llx uses cluster "
                              "%#llx, which something else uses too, and "
                              "one of the two holds it alone (a write to "
                              "one would change the other); repair the "
                              "image with 'qemu-img check -r all'", what,
                              (unsigned long long)off,
                              (unsigned long long)(c << cb));
        if (rc->marks && c < rc->nclusters) {
            if ((m & AUDIT_COUNT_MAX) < AUDIT_COUNT_MAX)
                m++;
            rc->marks[c] = m | (rc->excl ? AUDIT_EXCL : 0);
            if ((m & AUDIT_COUNT_MAX) > 1)
                continue; /* the refcount was seen at the first one */
        }
        uint64_t ref;
        int r = rc_refcount_get(rc, c, &ref);
        if (r < 0) {
            rc->io_failed = r != -ENOMEM;
            return error_setf(rc->errp, -r, "reading the refcount of "
                              "cluster %#llx: %s", (unsigned long long)(c << cb),
                              strerror(-r));
        }
        if (ref == 0)
            return error_setf(rc->errp, EIO, "%s at %#llx is in use but "
                              "cluster %#llx has refcount 0 (it would be "
                              "handed out again and shared); repair the "
                              "image with 'qemu-img check -r all'", what,
                              (unsigned long long)off,
                              (unsigned long long)(c << cb));
    }
    return 0;
}

static int recount_range(struct recount *rc, uint64_t off, uint64_t len,
                         const char *what)
{
    if (len == 0)
        return 0;
    if (rc->audit)
        return audit_range(rc, off, len, what);
    const unsigned cb = rc->s->h.cluster_bits;
    uint64_t first = off >> cb, last = (off + len - 1) >> cb;
    if (last >= rc->nclusters)
        return error_setf(rc->errp, EINVAL, "%s: %s at %#llx reaches past "
                          "the end of the file", rc->s->node.filename, what,
                          (unsigned long long)off);
    for (uint64_t c = first; c <= last; c++) {
        if (rc->counts[c] == UINT32_MAX)
            return error_setf(rc->errp, EINVAL, "%s: cluster %#llx has too "
                              "many references", rc->s->node.filename,
                              (unsigned long long)(c << cb));
        rc->counts[c]++;
    }
    return 0;
}

/* Counts one L1 table (active or a snapshot's): its L2 tables and every
 * cluster they reference. */
static int recount_l1(struct recount *rc, uint64_t l1_off, uint32_t l1_size)
{
    struct qcow2 *s = rc->s;
    const uint64_t cs = qcow2_cs(s);
    if (l1_size == 0)
        return 0;
    if ((uint64_t)l1_size * 8 > QCOW2_MAX_L1_BYTES || (l1_off & (cs - 1)))
        return error_setf(rc->errp, EINVAL, "%s: invalid L1 table at %#llx",
                          s->node.filename, (unsigned long long)l1_off);
    int r = recount_range(rc, l1_off, (uint64_t)l1_size * 8, "an L1 table");
    if (r < 0)
        return r;
    uint8_t *l1 = NULL;
    if (rc->audit && l1_off == s->h.l1_table_offset &&
        l1_size <= s->h.l1_size) {
        /* The active table: as in memory (ahead of the file). */
        l1 = s->l1;
    } else {
        uint64_t a = s->io_align;
        uint64_t l1len = ((uint64_t)l1_size * 8 + a - 1) & ~(a - 1);
        l1 = qcow2_buf_alloc(s, l1len);
        if (!l1)
            return error_setf(rc->errp, ENOMEM, "out of memory");
        r = backend_pread_co(s->node.file, rc->co, l1, l1len, l1_off);
        rc->io_failed |= r < 0;
    }
    for (uint32_t i = 0; r == 0 && i < l1_size; i++) {
        struct qcow2_l1_entry l1e;
        if (qcow2_l1_entry_decode(&s->h, be_get64(l1 + (uint64_t)i * 8),
                                  &l1e) < 0) {
            r = error_setf(rc->errp, EINVAL, "%s: unaligned L2 table offset "
                           "in L1 entry %u", s->node.filename, i);
            break;
        }
        if (!l1e.l2_offset)
            continue;
        rc->excl = l1e.copied;
        r = recount_range(rc, l1e.l2_offset, cs, "an L2 table");
        rc->excl = true;
        if (r == 0 && rc->audit) {
            /* Cached tables may be ahead of the file. */
            r = rc_l2_cached(rc, l1e.l2_offset);
            if (r < 0 && r != -ENOMEM)
                rc->io_failed = true; /* the cache could not read it */
            else if (r == 1)
                r = 0;
            else if (r == 0)
                r = 1; /* not cached: read below */
        } else if (r == 0) {
            r = 1;
        }
        if (r == 1) {
            r = backend_pread_co(s->node.file, rc->co, rc->l2buf, cs,
                                 l1e.l2_offset);
            rc->io_failed |= r < 0;
        }
        for (uint32_t j = 0; r == 0 && j < s->h.l2_entries; j++) {
            uint64_t raw, bitmap;
            struct qcow2_l2_entry e;
            qcow2_l2_read(s, rc->l2buf, j, &raw, &bitmap);
            if (qcow2_l2_entry_decode(&s->h, raw, bitmap, &e) < 0) {
                r = error_setf(rc->errp, EINVAL, "%s: invalid L2 entry %#llx",
                               s->node.filename, (unsigned long long)raw);
                break;
            }
            rc->excl = e.type != QCOW2_CLUSTER_COMPRESSED && e.copied;
            if (e.type == QCOW2_CLUSTER_COMPRESSED)
                r = recount_range(rc, e.host_offset & ~UINT64_C(511),
                                  (uint64_t)e.nb_sectors * 512,
                                  "a compressed cluster");
            else if (e.host_offset)
                r = recount_range(rc, e.host_offset, cs, "a data cluster");
            rc->excl = true;
        }
    }
    if (l1 != s->l1)
        free(l1);
    if (r < 0 && !*rc->errp)
        error_setf(rc->errp, -r, "%s: reading metadata: %s", s->node.filename,
                   strerror(-r));
    return r;
}

/* Reads len bytes at off into a new buffer (rounded to the alignment). */
static uint8_t *read_meta(struct recount *rc, uint64_t off, uint64_t len)
{
    uint64_t a = rc->s->io_align;
    uint64_t rl = (len + a - 1) & ~(a - 1);
    uint8_t *buf = qcow2_buf_alloc(rc->s, rl ? rl : a);
    if (!buf) {
        error_setf(rc->errp, ENOMEM, "out of memory");
        return NULL;
    }
    int r = backend_pread_co(rc->s->node.file, rc->co, buf, rl, off);
    if (r < 0) {
        rc->io_failed = true;
        error_setf(rc->errp, -r, "%s: reading metadata: %s",
                   rc->s->node.filename, strerror(-r));
        free(buf);
        return NULL;
    }
    return buf;
}

static int recount_snapshots(struct recount *rc)
{
    struct qcow2 *s = rc->s;
    uint32_t n = s->h.nb_snapshots;
    if (n == 0)
        return 0;
    /* The table's size is only known by walking it; headers are small. */
    uint64_t cap = (uint64_t)n * 1024 + 4096;
    uint64_t avail = s->node.file->size - s->h.snapshots_offset;
    if (cap > avail)
        cap = avail;
    uint8_t *t = read_meta(rc, s->h.snapshots_offset, cap);
    if (!t)
        return -EIO;
    uint64_t pos = 0;
    int r = 0;
    for (uint32_t i = 0; i < n && r == 0; i++) {
        if (pos + 40 > cap) {
            r = error_setf(rc->errp, EINVAL, "%s: snapshot table truncated",
                           s->node.filename);
            break;
        }
        uint64_t l1_off = be_get64(t + pos);
        uint32_t l1_size = be_get32(t + pos + 8);
        uint16_t id_len = be_get16(t + pos + 12);
        uint16_t name_len = be_get16(t + pos + 14);
        uint32_t extra = be_get32(t + pos + 36);
        uint64_t len = 40 + (uint64_t)extra + id_len + name_len;
        len = (len + 7) & ~UINT64_C(7);
        if (extra > 1024 || pos + len > cap) {
            r = error_setf(rc->errp, EINVAL, "%s: malformed snapshot table",
                           s->node.filename);
            break;
        }
        r = recount_l1(rc, l1_off, l1_size);
        pos += len;
    }
    if (r == 0)
        r = recount_range(rc, s->h.snapshots_offset, pos, "the snapshot table");
    free(t);
    return r;
}

static int recount_bitmaps(struct recount *rc,
                           const struct qcow2_extensions *ext)
{
    struct qcow2 *s = rc->s;
    if (!ext->has_bitmaps || !ext->bitmaps_consistent)
        return 0;
    uint64_t size = ext->bitmap_directory_size;
    uint8_t *dir = read_meta(rc, ext->bitmap_directory_offset, size);
    if (!dir)
        return -EIO;
    int r = recount_range(rc, ext->bitmap_directory_offset, size,
                          "the bitmap directory");
    uint64_t pos = 0;
    for (uint32_t i = 0; r == 0 && i < ext->nb_bitmaps; i++) {
        struct qcow2_bitmap_entry be;
        if (qcow2_bitmap_entry_parse(dir, size, pos, &be) < 0) {
            r = error_setf(rc->errp, EINVAL, "%s: malformed bitmap directory",
                           s->node.filename);
            break;
        }
        uint64_t toff = be.table_offset;
        uint32_t tsize = be.table_size;
        r = recount_range(rc, toff, (uint64_t)tsize * 8, "a bitmap table");
        uint8_t *tbl = r == 0 && tsize ? read_meta(rc, toff,
                                                   (uint64_t)tsize * 8)
                                       : NULL;
        if (r == 0 && tsize && !tbl)
            r = -EIO;
        for (uint32_t j = 0; r == 0 && j < tsize; j++) {
            uint64_t e = be_get64(tbl + (uint64_t)j * 8) &
                         UINT64_C(0x00fffffffffffe00);
            if (e)
                r = recount_range(rc, e, qcow2_cs(s), "a bitmap cluster");
        }
        free(tbl);
        pos += be.size;
    }
    free(dir);
    return r;
}

/* Walks every piece of metadata and every cluster it references: the
 * header, L1/L2 tables and data, the refcount table and blocks, snapshots
 * and bitmaps (the rebuild counts them, the audit checks them). */
static int recount_all(struct recount *rc,
                       const struct qcow2_extensions *ext)
{
    struct qcow2 *s = rc->s;
    const uint64_t cs = qcow2_cs(s);
    int r = recount_range(rc, 0, cs, "the header");
    if (r == 0)
        r = recount_l1(rc, s->h.l1_table_offset, s->h.l1_size);
    if (r == 0)
        r = recount_range(rc, s->h.refcount_table_offset,
                          (uint64_t)s->h.refcount_table_clusters * cs,
                          "the refcount table");
    for (uint64_t i = 0; r == 0 && i < s->reftable_entries; i++) {
        uint64_t off = reftable_get(s, i);
        if (off)
            r = recount_range(rc, off, cs, "a refcount block");
    }
    if (r == 0)
        r = recount_snapshots(rc);
    if (r == 0)
        r = recount_bitmaps(rc, ext);
    return r;
}

int qcow2_rebuild_refcounts_co(struct qcow2 *s, struct coro *co,
                               const struct qcow2_extensions *ext,
                               struct error **errp)
{
    assert(co_mutex_held(&s->lock, co));
    const uint64_t cs = qcow2_cs(s);
    struct recount rc = {.s = s, .co = co, .errp = errp};
    rc.nclusters = (s->node.file->size + cs - 1) / cs;
    if (rc.nclusters > (UINT64_C(1) << 28))
        return error_setf(errp, EFBIG, "%s: the image is marked dirty and "
                          "too large to rebuild its refcounts here; repair "
                          "it with 'qemu-img check -r all'", s->node.filename);
    log_warn("%s: the image is marked dirty (not closed cleanly with lazy "
             "refcounts): rebuilding its refcounts", s->node.filename);
    rc.counts = calloc(rc.nclusters ? rc.nclusters : 1, sizeof(uint32_t));
    rc.l2buf = qcow2_buf_alloc(s, cs);
    int r = 0;
    if (!rc.counts || !rc.l2buf)
        r = error_setf(errp, ENOMEM, "out of memory");
    if (r == 0)
        r = recount_all(&rc, ext);

    /* Every counted cluster must have a refcount block; then fix the
     * values that differ. */
    const uint64_t per = per_block(s);
    const uint64_t max = qcow2_refcount_max(s->h.refcount_order);
    uint64_t fixed = 0;
    for (uint64_t c = 0; r == 0 && c < rc.nclusters; c++) {
        uint64_t idx = c / per;
        if (rc.counts[c] && (idx >= s->reftable_entries ||
                             reftable_get(s, idx) == 0))
            r = error_setf(errp, EINVAL, "%s: cluster %#llx is in use but "
                           "has no refcount block; repair the image with "
                           "'qemu-img check -r all'", s->node.filename,
                           (unsigned long long)(c * cs));
        if (rc.counts[c] > max)
            r = error_setf(errp, EINVAL, "%s: cluster %#llx has more "
                           "references than its refcount can hold",
                           s->node.filename, (unsigned long long)(c * cs));
    }
    for (uint64_t idx = 0; r == 0 && idx < s->reftable_entries; idx++) {
        if (!reftable_get(s, idx))
            continue;
        struct qcow2_cache_entry *e;
        r = block_get_co(s, co, idx, &e);
        if (r < 0) {
            error_setf(errp, -r, "%s: reading a refcount block: %s",
                       s->node.filename, strerror(-r));
            break;
        }
        for (uint64_t j = 0; j < per; j++) {
            uint64_t c = idx * per + j;
            uint64_t want = c < rc.nclusters ? rc.counts[c] : 0;
            if (qcow2_refcount_get(e->table, s->h.refcount_order, j) != want) {
                qcow2_refcount_set(e->table, s->h.refcount_order, j, want);
                qcow2_cache_mark_dirty(&s->rb_cache, e);
                fixed++;
            }
        }
        qcow2_cache_put(&s->rb_cache, e);
    }
    if (r == 0) {
        r = qcow2_cache_flush_co(&s->rb_cache, co); /* written through */
        if (r < 0)
            error_setf(errp, -r, "%s: writing refcounts: %s",
                       s->node.filename, strerror(-r));
    }
    if (r == 0)
        log_warn("%s: refcounts rebuilt (%llu corrected)", s->node.filename,
                 (unsigned long long)fixed);
    free(rc.counts);
    free(rc.l2buf);
    s->free_cluster_index = 0;
    return r < 0 ? r : 0;
}

static int audit_co(struct qcow2 *s, struct coro *co, bool unlocked)
{
    const uint64_t cs = qcow2_cs(s);
    CLEANUP_ERROR struct error *err = NULL;
    struct recount rc = {.s = s, .co = co, .errp = &err, .audit = true,
                         .excl = true, .unlocked = unlocked};
    struct qcow2_extensions ext = {
        .has_bitmaps = s->bm_nb > 0,
        .bitmaps_consistent = s->bm_nb > 0,
        .nb_bitmaps = s->bm_nb,
        .bitmap_directory_offset = s->bm_dir_offset,
        .bitmap_directory_size = s->bm_dir_size,
    };
    rc.l2buf = qcow2_buf_alloc(s, cs);
    if (!rc.l2buf)
        return -ENOMEM; /* not audited: the next write tries again */
    /* One byte per cluster of the file; past AUDIT_MAX_CLUSTERS only the
     * refcount of each reference is checked (not sharing). */
    rc.nclusters = (s->node.file->size + cs - 1) / cs;
    if (rc.nclusters <= AUDIT_MAX_CLUSTERS)
        rc.marks = calloc(rc.nclusters ? rc.nclusters : 1, 1);
    int r = recount_all(&rc, &ext);
    /* More references than the refcount: freeing one of them would make
     * the cluster free while the others use it. */
    for (uint64_t c = 0; r == 0 && rc.marks && c < rc.nclusters; c++) {
        uint64_t refs = rc.marks[c] & AUDIT_COUNT_MAX, ref;
        if (refs < 2)
            continue;
        r = rc_refcount_get(&rc, c, &ref);
        if (r < 0) {
            rc.io_failed = r != -ENOMEM;
            error_setf(&err, -r, "reading the refcount of cluster %#llx: %s",
                       (unsigned long long)(c * cs), strerror(-r));
        }
        else if (ref < refs)
            r = error_setf(&err, EIO, "cluster %#llx is used %llu times but "
                           "its refcount is %llu (freeing one use would "
                           "free it for the others); repair the image "
                           "with 'qemu-img check -r all'",
                           (unsigned long long)(c * cs),
                           (unsigned long long)refs, (unsigned long long)ref);
    }
    free(rc.marks);
    free(rc.l2buf);
    if (r == -ENOMEM)
        return r;
    if (r < 0 && rc.io_failed) {
        /* A failed read proves nothing about the image: the request that
         * met it fails, and the next write audits again. */
        log_error("%s: checking the refcounts before the first write: %s",
                  s->node.filename, err ? err->msg : strerror(-r));
        return r;
    }
    s->refcounts_audited = true;
    if (r < 0)
        return qcow2_corrupt(s, "%s", err ? err->msg : strerror(-r));
    log_debug("%s: refcounts checked", s->node.filename);
    return 0;
}

int qcow2_audit_refcounts_co(struct qcow2 *s, struct coro *co)
{
    assert(co_mutex_held(&s->lock, co));
    return audit_co(s, co, false);
}

int qcow2_audit_refcounts_unlocked_co(struct qcow2 *s, struct coro *co)
{
    assert(!co_mutex_held(&s->lock, co));
    return audit_co(s, co, true);
}
