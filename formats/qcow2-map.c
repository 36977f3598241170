/* strata — qcow2 cluster map: guest offset -> L1 entry -> L2 table -> host.
 *
 * Everything here runs with the image lock held.  L2 tables come from the
 * metadata cache; the active L1 table lives in memory.  A new L2 table (or
 * the private copy of a table shared with an internal snapshot) is only
 * created in the cache and linked in the in-memory L1: no write, no
 * sync.  The next flush writes the table, syncs, and only then writes the
 * L1 entry (see qcow2_flush_co), so the L1 table on disk never points at
 * a table that is not durable; a crash before that flush loses the
 * unflushed writes through the table and leaks its cluster at worst.
 */
#include <assert.h>
#include <errno.h>
#include <string.h>

#include "byteorder.h"
#include "log.h"
#include "qcow2.h"

void qcow2_l2_read(const struct qcow2 *s, const uint8_t *l2, unsigned i,
                   uint64_t *entry, uint64_t *bitmap)
{
    const uint8_t *p = l2 + (size_t)i * s->h.l2_entry_size;
    *entry = be_get64(p);
    *bitmap = s->h.extended_l2 ? be_get64(p + 8) : 0;
}

void qcow2_l2_write(const struct qcow2 *s, uint8_t *l2, unsigned i,
                    uint64_t entry, uint64_t bitmap)
{
    uint8_t *p = l2 + (size_t)i * s->h.l2_entry_size;
    be_put64(p, entry);
    if (s->h.extended_l2)
        be_put64(p + 8, bitmap);
}

/* The decoded L1 entry for guest offset off, checked. */
static int l1_lookup(struct qcow2 *s, uint64_t off, uint64_t *l1i,
                     struct qcow2_l1_entry *l1e)
{
    *l1i = qcow2_l1_index(&s->h, off);
    if (*l1i >= s->h.l1_size)
        return qcow2_corrupt(s, "guest offset %#llx beyond the L1 table",
                             (unsigned long long)off);
    uint64_t raw = be_get64(s->l1 + *l1i * 8);
    if (qcow2_l1_entry_decode(&s->h, raw, l1e) < 0)
        return qcow2_corrupt(s, "L1 entry %llu (%#llx) is not aligned",
                             (unsigned long long)*l1i,
                             (unsigned long long)raw);
    /* A new table not written yet may lie past the end of the file: it
     * lives in the cache until its write (which a flush does before the
     * L1 entry goes to disk, and an eviction before it leaves the cache). */
    if (l1e->l2_offset &&
        (l1e->l2_offset < qcow2_cs(s) ||
         (l1e->l2_offset >= s->node.file->size &&
          !qcow2_cache_contains(&s->l2_cache, l1e->l2_offset))))
        return qcow2_corrupt(s, "L2 table %llu at %#llx is outside the "
                             "image file", (unsigned long long)*l1i,
                             (unsigned long long)l1e->l2_offset);
    return 0;
}

static int decode_checked(struct qcow2 *s, uint64_t raw, uint64_t bitmap,
                          uint64_t guest, struct qcow2_l2_entry *e)
{
    if (qcow2_l2_entry_decode(&s->h, raw, bitmap, e) < 0)
        return qcow2_corrupt(s, "invalid L2 entry %#llx/%#llx for guest "
                             "offset %#llx", (unsigned long long)raw,
                             (unsigned long long)bitmap,
                             (unsigned long long)guest);
    if ((e->type == QCOW2_CLUSTER_NORMAL ||
         e->type == QCOW2_CLUSTER_COMPRESSED || e->host_offset) &&
        e->host_offset < qcow2_cs(s))
        return qcow2_corrupt(s, "guest offset %#llx maps into the header "
                             "cluster", (unsigned long long)guest);
    /* A host cluster that starts past the end of the file has refcount 0
     * (the refcount structures only cover the file), so reading it would
     * invent zeros and writing it would let the allocator hand the same
     * cluster out again.  Our own allocating writes link a cluster only
     * after its data is written, so the file always covers its start. */
    if (e->type != QCOW2_CLUSTER_COMPRESSED && e->host_offset &&
        e->host_offset >= s->node.file->size)
        return qcow2_corrupt(s, "guest offset %#llx maps to host offset "
                             "%#llx, past the end of the file",
                             (unsigned long long)guest,
                             (unsigned long long)e->host_offset);
    return 0;
}

int qcow2_map_get_co(struct qcow2 *s, struct coro *co, uint64_t off,
                     uint64_t len, struct qcow2_map *m)
{
    assert(co_mutex_held(&s->lock, co));
    const uint64_t cs = qcow2_cs(s);
    const uint64_t unit = s->h.subcluster_size;
    uint64_t table_span = cs << s->h.l2_bits;
    uint64_t end = off + len;
    uint64_t table_end = (off & ~(table_span - 1)) + table_span;
    if (end > table_end)
        end = table_end;

    memset(m, 0, sizeof(*m));
    uint64_t l1i;
    struct qcow2_l1_entry l1e;
    int r = l1_lookup(s, off, &l1i, &l1e);
    if (r < 0)
        return r;
    if (!l1e.l2_offset) {
        m->type = QCOW2_CLUSTER_UNALLOCATED;
        m->len = end - off;
        return 0;
    }

    struct qcow2_cache_entry *ce;
    r = qcow2_cache_get_co(&s->l2_cache, co, l1e.l2_offset, false, &ce);
    if (r < 0)
        return r;

    uint64_t pos = off;
    unsigned cur = UINT32_MAX;
    struct qcow2_l2_entry e;
    uint64_t raw = 0, bitmap = 0;
    while (pos < end) {
        unsigned i = (unsigned)qcow2_l2_index(&s->h, pos);
        if (i != cur) {
            qcow2_l2_read(s, ce->table, i, &raw, &bitmap);
            r = decode_checked(s, raw, bitmap, pos, &e);
            if (r < 0)
                break;
            cur = i;
        }
        unsigned sc = s->h.extended_l2
                          ? (unsigned)((pos & (cs - 1)) >> s->h.subcluster_bits)
                          : 0;
        enum qcow2_cluster_type t = qcow2_subcluster_type(&s->h, &e, sc);
        uint64_t host = 0;
        if (t == QCOW2_CLUSTER_NORMAL)
            host = e.host_offset + (pos & (cs - 1));
        if (pos == off) {
            m->type = t;
            m->host = t == QCOW2_CLUSTER_COMPRESSED ? e.host_offset : host;
            m->e = e;
            m->raw = raw;
            m->bitmap = bitmap;
            m->copied = e.copied;
        } else if (t != m->type || t == QCOW2_CLUSTER_COMPRESSED ||
                   (t == QCOW2_CLUSTER_NORMAL &&
                    (host != m->host + (pos - off) || e.copied != m->copied))) {
            break;
        }
        uint64_t next = (pos | (unit - 1)) + 1;
        pos = next < end ? next : end;
    }
    qcow2_cache_put(&s->l2_cache, ce);
    if (r < 0)
        return r;
    m->len = pos - off;
    return 0;
}

void qcow2_l1_mark_dirty_locked(struct qcow2 *s, uint64_t i)
{
    assert(co_mutex_locked(&s->lock));
    if (s->l1_dirty_lo == s->l1_dirty_hi) {
        s->l1_dirty_lo = i;
        s->l1_dirty_hi = i + 1;
        return;
    }
    if (i < s->l1_dirty_lo)
        s->l1_dirty_lo = i;
    if (i + 1 > s->l1_dirty_hi)
        s->l1_dirty_hi = i + 1;
}

int qcow2_l2_for_write_co(struct qcow2 *s, struct coro *co, uint64_t off,
                          struct qcow2_cache_entry **l2, unsigned *idx)
{
    assert(co_mutex_held(&s->lock, co));
    const uint64_t cs = qcow2_cs(s);
    uint64_t l1i;
    struct qcow2_l1_entry l1e;
    uint64_t new_off;
    int r;
    for (;;) {
        r = l1_lookup(s, off, &l1i, &l1e);
        if (r < 0)
            return r;
        *idx = (unsigned)qcow2_l2_index(&s->h, off);
        if (l1e.l2_offset && l1e.copied)
            return qcow2_cache_get_co(&s->l2_cache, co, l1e.l2_offset, false,
                                      l2);

        /* A new table, or a private copy of one shared with a snapshot. */
        uint64_t gen = s->alloc_unlocked;
        r = qcow2_alloc_exact_co(s, co, 1, &new_off);
        if (r < 0)
            return r;
        if (gen == s->alloc_unlocked)
            break;
        /* The allocator dropped the lock: another request may have
         * given this range a table meanwhile.  Look again. */
        uint64_t raw = be_get64(s->l1 + l1i * 8);
        struct qcow2_l1_entry now;
        if (qcow2_l1_entry_decode(&s->h, raw, &now) == 0 &&
            now.l2_offset == l1e.l2_offset && now.copied == l1e.copied)
            break;
        r = qcow2_refcount_update_co(s, co, new_off, cs, -1);
        if (r < 0)
            return r;
    }
    struct qcow2_cache_entry *ne;
    r = qcow2_cache_get_co(&s->l2_cache, co, new_off, true, &ne);
    if (r < 0)
        goto free_cluster;
    if (l1e.l2_offset) {
        struct qcow2_cache_entry *oe;
        r = qcow2_cache_get_co(&s->l2_cache, co, l1e.l2_offset, false, &oe);
        if (r < 0)
            goto drop;
        memcpy(ne->table, oe->table, cs);
        qcow2_cache_put(&s->l2_cache, oe);
    }
    /* Written by the next flush (or an eviction) after the refcount
     * blocks, and synced before that flush writes the L1 entry. */
    qcow2_cache_mark_dirty(&s->l2_cache, ne);
    be_put64(s->l1 + l1i * 8, new_off | QCOW2_OFLAG_COPIED);
    qcow2_l1_mark_dirty_locked(s, l1i);
    if (l1e.l2_offset) {
        /* The snapshot keeps the old table; our reference to it goes
         * once the L1 entry on disk no longer names it.  A failure here
         * only leaks it. */
        qcow2_defer_free_range_locked(s, l1e.l2_offset, cs);
    }
    *l2 = ne;
    return 0;

drop:
    qcow2_cache_drop(&s->l2_cache, ne);
free_cluster:
    qcow2_refcount_update_co(s, co, new_off, cs, -1);
    return r;
}
