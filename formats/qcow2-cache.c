/* strata — qcow2 metadata cache: a bounded LRU of L2 tables or refcount
 * blocks, each entry one cluster in its on-disk format.
 *
 * Every call runs with the image lock held, except the write-back of a
 * flush (qcow2_cache_wb_write_co), which writes copies taken under the
 * lock.  Pinned entries are never evicted; a dirty entry is written back
 * before its slot is reused, and before any entry is written the cache it
 * depends on is durable (L2 tables depend on refcount blocks: see
 * qcow2.h).  That needs no sync of the file: a cache marked write-through
 * (refcount blocks) writes each entry with FUA, so what it wrote is on
 * disk when the write completes.
 *
 * A miss takes the least recently used entry; if that one is dirty, it
 * is written back first, with the lock held.  To keep that write (and the
 * refcount blocks it waits for) from stopping every other request, the
 * request paths make room before they look anything up
 * (qcow2_cache_make_room_locked_co): the dirty entries at the LRU end are
 * written back through copies, like a flush's, with the lock dropped, so
 * that the misses that follow find clean entries to take.
 *
 * An entry under write-back (wb) has a copy of it on its way to disk: it
 * may be read and changed (the copy is what gets written), but it is not
 * evicted, and no other write of it starts, until that write is done — so
 * writes of one table never overtake each other.
 */
#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "qcow2.h"

static unsigned hash_of(const struct qcow2_cache *c, uint64_t off)
{
    uint64_t k = off >> c->s->h.cluster_bits;
    k *= UINT64_C(0x9e3779b97f4a7c15);
    return (unsigned)(k >> 32) & (c->nbuckets - 1);
}

int qcow2_cache_init(struct qcow2_cache *c, struct qcow2 *s, const char *what,
                     unsigned entries)
{
    memset(c, 0, sizeof(*c));
    c->s = s;
    c->what = what;
    c->n = entries < 4 ? 4 : entries;
    c->nbuckets = 16;
    while (c->nbuckets < 2 * c->n)
        c->nbuckets *= 2;
    c->e = calloc(c->n, sizeof(*c->e));
    c->buckets = malloc(sizeof(int) * c->nbuckets);
    if (!c->e || !c->buckets)
        return -ENOMEM;
    for (unsigned i = 0; i < c->nbuckets; i++)
        c->buckets[i] = -1;
    /* Tables are allocated on first use: a small image never pays for a
     * large cache. */
    for (unsigned i = 0; i < c->n; i++) {
        struct qcow2_cache_entry *e = &c->e[i];
        e->hash_next = -1;
        e->lru_prev = c->lru_tail;
        if (c->lru_tail)
            c->lru_tail->lru_next = e;
        else
            c->lru_head = e;
        c->lru_tail = e;
    }
    return 0;
}

void qcow2_cache_destroy(struct qcow2_cache *c)
{
    if (c->e)
        for (unsigned i = 0; i < c->n; i++)
            free(c->e[i].table);
    free(c->e);
    free(c->buckets);
    memset(c, 0, sizeof(*c));
}

bool qcow2_cache_has_dirty(const struct qcow2_cache *c)
{
    for (unsigned i = 0; i < c->n; i++)
        if (c->e[i].dirty)
            return true;
    return false;
}

static void lru_unlink(struct qcow2_cache *c, struct qcow2_cache_entry *e)
{
    if (e->lru_prev)
        e->lru_prev->lru_next = e->lru_next;
    else
        c->lru_head = e->lru_next;
    if (e->lru_next)
        e->lru_next->lru_prev = e->lru_prev;
    else
        c->lru_tail = e->lru_prev;
    e->lru_prev = e->lru_next = NULL;
}

static void lru_push_head(struct qcow2_cache *c, struct qcow2_cache_entry *e)
{
    e->lru_prev = NULL;
    e->lru_next = c->lru_head;
    if (c->lru_head)
        c->lru_head->lru_prev = e;
    else
        c->lru_tail = e;
    c->lru_head = e;
}

static void hash_del(struct qcow2_cache *c, struct qcow2_cache_entry *e)
{
    int idx = (int)(e - c->e);
    int *pp = &c->buckets[hash_of(c, e->offset)];
    while (*pp != -1) {
        if (*pp == idx) {
            *pp = e->hash_next;
            e->hash_next = -1;
            return;
        }
        pp = &c->e[*pp].hash_next;
    }
    assert(!"cache entry not in its bucket");
}

static void hash_add(struct qcow2_cache *c, struct qcow2_cache_entry *e)
{
    unsigned b = hash_of(c, e->offset);
    e->hash_next = c->buckets[b];
    c->buckets[b] = (int)(e - c->e);
}

static struct qcow2_cache_entry *find(struct qcow2_cache *c, uint64_t off)
{
    for (int i = c->buckets[hash_of(c, off)]; i != -1; i = c->e[i].hash_next)
        if (c->e[i].offset == off)
            return &c->e[i];
    return NULL;
}

bool qcow2_cache_contains(const struct qcow2_cache *c, uint64_t off)
{
    return find((struct qcow2_cache *)c, off) != NULL;
}

/* Waits (lock held) until the write-back of e is done.  That write needs
 * no lock to finish. */
static void wait_wb_co(struct qcow2_cache *c, struct coro *co,
                       struct qcow2_cache_entry *e)
{
    while (e->wb)
        co_queue_wait_co(&c->wb_waiters, co);
}

/* Makes everything this cache depends on durable: the dependency's dirty
 * entries written (with FUA) and its write-backs finished. */
static int flush_dependency_co(struct qcow2_cache *c, struct coro *co)
{
    struct qcow2_cache *d = c->depends;
    if (!d)
        return 0;
    assert(d->write_through);
    for (unsigned i = 0; i < d->n; i++)
        wait_wb_co(d, co, &d->e[i]);
    return qcow2_cache_flush_co(d, co);
}

static int write_entry_co(struct qcow2_cache *c, struct coro *co,
                          struct qcow2_cache_entry *e, bool fua)
{
    wait_wb_co(c, co, e);
    if (!e->dirty)
        return 0;
    int r = flush_dependency_co(c, co);
    if (r < 0)
        return r;
    /* The flush may have yielded only for I/O; the lock is still ours and
     * nobody else touched this entry. */
    r = backend_pwrite_co(c->s->node.file, co, e->table, qcow2_cs(c->s),
                          e->offset,
                          (fua || c->write_through) ? BACKEND_FUA : 0);
    if (r < 0) {
        log_error("%s: writing %s at %#llx: %s", c->s->node.filename,
                  c->what, (unsigned long long)e->offset, strerror(-r));
        return r;
    }
    e->dirty = false;
    return 0;
}

int qcow2_cache_flush_co(struct qcow2_cache *c, struct coro *co)
{
    assert(co_mutex_held(&c->s->lock, co));
    int ret = 0;
    for (unsigned i = 0; i < c->n; i++) {
        int r = write_entry_co(c, co, &c->e[i], false);
        if (r < 0 && ret == 0)
            ret = r;
    }
    return ret;
}

int qcow2_cache_write_now_co(struct qcow2_cache *c, struct coro *co,
                             struct qcow2_cache_entry *e)
{
    assert(co_mutex_held(&c->s->lock, co));
    return write_entry_co(c, co, e, true);
}

int qcow2_cache_wb_begin_locked(struct qcow2_cache *c, struct coro *co,
                                struct qcow2_cache_wb *wb)
{
    assert(co_mutex_held(&c->s->lock, co));
    assert(c->n_wb == 0);
    const uint64_t cs = qcow2_cs(c->s);
    memset(wb, 0, sizeof(*wb));
    unsigned n = 0;
    for (unsigned i = 0; i < c->n; i++)
        if (c->e[i].dirty)
            n++;
    if (n == 0)
        return 0;
    wb->items = calloc(n, sizeof(*wb->items));
    if (!wb->items)
        return -ENOMEM;
    for (unsigned i = 0; i < c->n && wb->n < n; i++) {
        struct qcow2_cache_entry *e = &c->e[i];
        if (!e->dirty)
            continue;
        uint8_t *copy = qcow2_buf_alloc(c->s, cs);
        if (!copy) {
            qcow2_cache_wb_abort(c, wb);
            return -ENOMEM;
        }
        memcpy(copy, e->table, cs);
        wb->items[wb->n].e = e;
        wb->items[wb->n].copy = copy;
        wb->items[wb->n].offset = e->offset;
        wb->n++;
        e->dirty = false;
        e->wb = true;
        c->n_wb++;
    }
    return 0;
}

/* Ends the write-back of item i: the entry is dirty again if its copy did
 * not reach the disk.  Needs no lock (no yield). */
static void wb_end(struct qcow2_cache *c, struct qcow2_cache_wb *wb,
                   unsigned i, bool written)
{
    struct qcow2_cache_entry *e = wb->items[i].e;
    assert(e->wb && c->n_wb > 0);
    if (!written && e->offset == wb->items[i].offset)
        e->dirty = true; /* (not if the entry was dropped meanwhile) */
    e->wb = false;
    c->n_wb--;
    free(wb->items[i].copy);
    wb->items[i].copy = NULL;
    co_queue_wake_all(&c->wb_waiters);
}

void qcow2_cache_wb_abort(struct qcow2_cache *c, struct qcow2_cache_wb *wb)
{
    for (unsigned i = 0; i < wb->n; i++)
        if (wb->items[i].copy)
            wb_end(c, wb, i, false);
    free(wb->items);
    memset(wb, 0, sizeof(*wb));
}

int qcow2_cache_wb_write_co(struct qcow2_cache *c, struct coro *co,
                            struct qcow2_cache_wb *wb)
{
    int ret = 0;
    for (unsigned i = 0; i < wb->n; i++) {
        int r = ret;
        if (r == 0) {
            r = backend_pwrite_co(c->s->node.file, co, wb->items[i].copy,
                                  qcow2_cs(c->s), wb->items[i].offset,
                                  c->write_through ? BACKEND_FUA : 0);
            if (r < 0) {
                log_error("%s: writing %s at %#llx: %s", c->s->node.filename,
                          c->what, (unsigned long long)wb->items[i].offset,
                          strerror(-r));
                ret = r;
            }
        }
        wb_end(c, wb, i, r == 0);
    }
    free(wb->items);
    memset(wb, 0, sizeof(*wb));
    return ret;
}

#define ROOM_MAX 8

int qcow2_cache_make_room_locked_co(struct qcow2_cache *c, struct coro *co,
                                    unsigned want)
{
    struct qcow2 *s = c->s;
    assert(co_mutex_held(&s->lock, co));
    if (want > ROOM_MAX)
        want = ROOM_MAX;
    /* From the LRU end: the entries a miss would take next. */
    struct qcow2_cache_entry *dirty[ROOM_MAX];
    unsigned clean = 0, ndirty = 0;
    for (struct qcow2_cache_entry *e = c->lru_tail;
         e && clean + ndirty < want; e = e->lru_prev) {
        if (e->pins || e->wb)
            continue;
        if (e->dirty)
            dirty[ndirty++] = e;
        else
            clean++;
    }
    if (ndirty == 0)
        return 0;
    /* The tables depend on every dirty entry of the dependency (durable
     * first): its write-backs in progress end, then it is written. */
    struct qcow2_cache *d = c->depends;
    if (d && d->n_wb)
        return qcow2_cache_wait_wb_locked_co(d, co);
    struct qcow2_cache_wb dwb = {0}, wb = {0};
    int r = d ? qcow2_cache_wb_begin_locked(d, co, &dwb) : 0;
    if (r < 0)
        return r;
    const uint64_t cs = qcow2_cs(s);
    wb.items = calloc(ndirty, sizeof(*wb.items));
    if (!wb.items) {
        if (d)
            qcow2_cache_wb_abort(d, &dwb);
        return -ENOMEM;
    }
    for (unsigned i = 0; i < ndirty; i++) {
        struct qcow2_cache_entry *e = dirty[i];
        uint8_t *copy = qcow2_buf_alloc(s, cs);
        if (!copy)
            break; /* fewer: the rest stays dirty */
        memcpy(copy, e->table, cs);
        wb.items[wb.n].e = e;
        wb.items[wb.n].copy = copy;
        wb.items[wb.n].offset = e->offset;
        wb.n++;
        e->dirty = false;
        e->wb = true;
        c->n_wb++;
    }
    co_mutex_unlock(&s->lock, co);
    r = d ? qcow2_cache_wb_write_co(d, co, &dwb) : 0;
    if (r == 0)
        r = qcow2_cache_wb_write_co(c, co, &wb);
    else
        qcow2_cache_wb_abort(c, &wb);
    qcow2_lock_co(s, co);
    return r < 0 ? r : 1;
}

int qcow2_cache_wait_wb_locked_co(struct qcow2_cache *c, struct coro *co)
{
    assert(co_mutex_held(&c->s->lock, co));
    if (c->n_wb == 0)
        return 0;
    co_mutex_unlock(&c->s->lock, co);
    co_queue_wait_co(&c->wb_waiters, co);
    co_mutex_lock_co(&c->s->lock, co);
    return 1;
}

int qcow2_cache_get_co(struct qcow2_cache *c, struct coro *co, uint64_t off,
                       bool fresh, struct qcow2_cache_entry **ep)
{
    struct qcow2 *s = c->s;
    assert(co_mutex_held(&s->lock, co));
    assert(off && (off & (qcow2_cs(s) - 1)) == 0);
    struct qcow2_cache_entry *e = find(c, off);
    if (e) {
        c->hits++;
        if (fresh)
            memset(e->table, 0, qcow2_cs(s));
        e->pins++;
        lru_unlink(c, e);
        lru_push_head(c, e);
        *ep = e;
        return 0;
    }
    c->misses++;

    /* The least recently used entry neither pinned nor under write-back;
     * if only write-backs are in the way, they end soon. */
    for (;;) {
        for (e = c->lru_tail; e && (e->pins || e->wb); e = e->lru_prev)
            ;
        if (e || c->n_wb == 0)
            break;
        co_queue_wait_co(&c->wb_waiters, co); /* lock held: nothing
                                                  else changes here */
    }
    if (!e) {
        log_error("%s: every %s cache entry is in use (cache too small)",
                  s->node.filename, c->what);
        return -ENOMEM;
    }
    e->pins++; /* nobody takes it while we write it back or read */
    int r = write_entry_co(c, co, e, false);
    if (r < 0) {
        e->pins--;
        return r;
    }
    if (e->offset) {
        hash_del(c, e);
        e->offset = 0;
    }
    if (!e->table) {
        e->table = qcow2_buf_alloc(s, qcow2_cs(s));
        if (!e->table) {
            e->pins--;
            return -ENOMEM;
        }
    }
    if (fresh) {
        memset(e->table, 0, qcow2_cs(s));
    } else {
        r = backend_pread_co(s->node.file, co, e->table, qcow2_cs(s), off);
        if (r < 0) {
            e->pins--;
            log_error("%s: reading %s at %#llx: %s", s->node.filename,
                      c->what, (unsigned long long)off, strerror(-r));
            return r;
        }
    }
    e->offset = off;
    hash_add(c, e);
    lru_unlink(c, e);
    lru_push_head(c, e);
    *ep = e;
    return 0;
}

void qcow2_cache_put(struct qcow2_cache *c, struct qcow2_cache_entry *e)
{
    assert(co_mutex_locked(&c->s->lock));
    assert(e->pins > 0);
    e->pins--;
}

void qcow2_cache_mark_dirty(struct qcow2_cache *c, struct qcow2_cache_entry *e)
{
    assert(co_mutex_locked(&c->s->lock));
    assert(e->pins > 0);
    e->dirty = true;
}

void qcow2_cache_drop(struct qcow2_cache *c, struct qcow2_cache_entry *e)
{
    assert(co_mutex_locked(&c->s->lock));
    assert(e->pins == 1);
    e->pins = 0;
    e->dirty = false;
    if (e->offset) {
        hash_del(c, e);
        e->offset = 0;
    }
    lru_unlink(c, e);
    /* Reused first. */
    e->lru_prev = c->lru_tail;
    e->lru_next = NULL;
    if (c->lru_tail)
        c->lru_tail->lru_next = e;
    else
        c->lru_head = e;
    c->lru_tail = e;
}
