/* strata — qcow2 metadata cache: a bounded LRU of L2 tables or refcount
 * blocks, each entry one cluster in its on-disk format.
 *
 * Every call runs with the image lock held, so an entry is never loaded or
 * written back by two coroutines at once.  Pinned entries are never
 * evicted; a dirty entry is written back before its slot is reused, and
 * before any entry is written the cache it depends on is written back and
 * synced (L2 tables depend on refcount blocks: see qcow2.h).
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

/* Makes everything this cache depends on durable. */
static int flush_dependency_co(struct qcow2_cache *c, struct coro *co)
{
    struct qcow2_cache *d = c->depends;
    if (!d)
        return 0;
    int r = qcow2_cache_flush_co(d, co);
    if (r < 0)
        return r;
    if (d->write_gen != d->synced_gen) {
        uint64_t gen = d->write_gen;
        r = backend_flush_co(c->s->node.file, co);
        if (r < 0)
            return r;
        d->synced_gen = gen;
    }
    return 0;
}

static int write_entry_co(struct qcow2_cache *c, struct coro *co,
                          struct qcow2_cache_entry *e)
{
    if (!e->dirty)
        return 0;
    int r = flush_dependency_co(c, co);
    if (r < 0)
        return r;
    /* The flush may have yielded only for I/O; the lock is still ours and
     * nobody else touched this entry. */
    r = backend_pwrite_co(c->s->node.file, co, e->table, qcow2_cs(c->s),
                          e->offset, 0);
    if (r < 0) {
        log_error("%s: writing %s at %#llx: %s", c->s->node.filename,
                  c->what, (unsigned long long)e->offset, strerror(-r));
        return r;
    }
    e->dirty = false;
    c->write_gen++;
    return 0;
}

int qcow2_cache_flush_co(struct qcow2_cache *c, struct coro *co)
{
    assert(co_mutex_held(&c->s->lock, co));
    int ret = 0;
    for (unsigned i = 0; i < c->n; i++) {
        int r = write_entry_co(c, co, &c->e[i]);
        if (r < 0 && ret == 0)
            ret = r;
    }
    return ret;
}

int qcow2_cache_write_now_co(struct qcow2_cache *c, struct coro *co,
                             struct qcow2_cache_entry *e)
{
    assert(co_mutex_held(&c->s->lock, co));
    return write_entry_co(c, co, e);
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

    /* The least recently used unpinned entry. */
    for (e = c->lru_tail; e && e->pins; e = e->lru_prev)
        ;
    if (!e) {
        log_error("%s: every %s cache entry is in use (cache too small)",
                  s->node.filename, c->what);
        return -ENOMEM;
    }
    e->pins++; /* nobody takes it while we write it back or read */
    int r = write_entry_co(c, co, e);
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
