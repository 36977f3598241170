/* strata — the copy-before-write filter (see cbw.h for the races and the
 * rule that defeats them). */
#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "cbw.h"
#include "cbw-int.h"
#include "dirty-bitmap.h"
#include "iov.h"
#include "log.h"

static const struct fmt_ops cbw_ops;

struct cbw *cbw_of(struct fmt_node *n)
{
    assert(n->ops == &cbw_ops);
    return (struct cbw *)n;
}

bool cbw_is(const struct fmt_node *n)
{
    return n && n->ops == &cbw_ops;
}

/* ---- the range lock ---- */

void cbw_lock_co(struct cbw *s, struct cbw_range *r, struct coro *co,
                 uint64_t start, uint64_t end)
{
    r->start = start;
    r->end = end;
    r->waiters = (struct co_queue){0};
    for (;;) {
        struct cbw_range *o = s->locks;
        while (o && (o->end <= start || o->start >= end))
            o = o->next;
        if (!o)
            break;
        co_queue_wait_co(&o->waiters, co);
    }
    r->next = s->locks;
    s->locks = r;
}

void cbw_unlock(struct cbw *s, struct cbw_range *r)
{
    for (struct cbw_range **pp = &s->locks; *pp; pp = &(*pp)->next) {
        if (*pp == r) {
            *pp = r->next;
            break;
        }
    }
    co_queue_wake_all(&r->waiters);
    if (!s->locks)
        co_queue_wake_all(&s->idle);
}

/* ---- copying ---- */

/* Copies [off, off + len) (cluster-aligned, clipped to the size) from the
 * source to the target, under the lock of that range. */
static int cbw_copy_co(struct cbw *s, struct coro *co, uint64_t off,
                       uint64_t len)
{
    size_t bl = len < CBW_MAX_COPY ? (size_t)len : (size_t)CBW_MAX_COPY;
    void *buf = NULL;
    if (posix_memalign(&buf, 4096, bl) != 0)
        return -ENOMEM;
    int r = 0;
    while (len > 0) {
        uint64_t n = len < bl ? len : bl;
        struct iovec iov = {buf, (size_t)n};
        r = fmt_preadv_co(s->source, co, &iov, 1, off);
        if (r == 0)
            r = fmt_pwritev_co(s->target, co, &iov, 1, off, 0);
        if (r < 0) {
            log_error("copy-before-write: copying %llu bytes at %llu to the "
                      "backup's target: %s", (unsigned long long)n,
                      (unsigned long long)off, strerror(-r));
            break;
        }
        dbitmap_set(&s->copied, off, n);
        off += n;
        len -= n;
    }
    free(buf);
    return r;
}

int cbw_before_write_co(struct fmt_node *n, struct coro *co, uint64_t off,
                        uint64_t len)
{
    struct cbw *s = cbw_of(n);
    if (!s->attached || len == 0)
        return 0;
    uint64_t size = s->n.size;
    if (off >= size)
        return 0;
    uint64_t end = off + len > size ? size : off + len;
    uint64_t a = off & ~(s->cluster - 1);
    uint64_t b = (end + s->cluster - 1) & ~(s->cluster - 1);
    if (b > size)
        b = size;
    bool dirty;
    if (dbitmap_run(&s->copied, a, b - a, &dirty) == b - a && dirty)
        return 0; /* all copied already */
    struct cbw_range lk;
    cbw_lock_co(s, &lk, co, a, b);
    int r = 0;
    for (uint64_t p = a; p < b && s->attached;) {
        uint64_t run = dbitmap_run(&s->copied, p, b - p, &dirty);
        if (!dirty) {
            r = cbw_copy_co(s, co, p, run);
            if (r < 0)
                break;
        }
        p += run;
    }
    cbw_unlock(s, &lk);
    return r;
}

uint64_t cbw_copied_bytes(const struct fmt_node *n)
{
    const struct cbw *s = (const struct cbw *)n;
    uint64_t c = dbitmap_count_bytes(&s->copied);
    return c > s->n.size ? s->n.size : c;
}

void cbw_detach_co(struct fmt_node *n, struct coro *co)
{
    struct cbw *s = cbw_of(n);
    s->attached = false;
    while (s->locks)
        co_queue_wait_co(&s->idle, co);
    s->source = NULL;
    s->target = NULL;
}

void cbw_ref(struct fmt_node *n)
{
    cbw_of(n)->refs++;
}

void cbw_unref(struct fmt_node *n)
{
    struct cbw *s = cbw_of(n);
    assert(s->refs > 0);
    if (--s->refs > 0)
        return;
    assert(!s->locks);
    dbitmap_destroy(&s->copied);
    free(s->n.filename);
    free(s);
}

/* ---- the node's own ops: a filter over the source ---- */

static int cbw_preadv_co(struct fmt_node *n, struct coro *co,
                         const struct iovec *iov, int iovcnt, uint64_t off)
{
    struct cbw *s = cbw_of(n);
    if (!s->source)
        return -EIO;
    return fmt_preadv_co(s->source, co, iov, iovcnt, off);
}

static int cbw_pwritev_co(struct fmt_node *n, struct coro *co,
                          const struct iovec *iov, int iovcnt, uint64_t off,
                          unsigned flags)
{
    struct cbw *s = cbw_of(n);
    if (!s->source)
        return -EIO;
    int r = cbw_before_write_co(n, co, off, iov_size(iov, iovcnt));
    return r < 0 ? r : fmt_pwritev_co(s->source, co, iov, iovcnt, off, flags);
}

static int cbw_flush_co(struct fmt_node *n, struct coro *co)
{
    struct cbw *s = cbw_of(n);
    if (!s->source)
        return -EIO;
    return fmt_flush_co(s->source, co);
}

static int cbw_zero_co(struct fmt_node *n, struct coro *co, uint64_t off,
                       uint64_t len, unsigned flags)
{
    struct cbw *s = cbw_of(n);
    if (!s->source)
        return -EIO;
    int r = cbw_before_write_co(n, co, off, len);
    return r < 0 ? r : fmt_zero_co(s->source, co, off, len, flags);
}

static int cbw_discard_co(struct fmt_node *n, struct coro *co, uint64_t off,
                          uint64_t len, unsigned flags)
{
    struct cbw *s = cbw_of(n);
    if (!s->source)
        return -EIO;
    int r = cbw_before_write_co(n, co, off, len);
    return r < 0 ? r : fmt_discard_co(s->source, co, off, len, flags);
}

static int cbw_block_status_co(struct fmt_node *n, struct coro *co,
                               uint64_t off, uint64_t len,
                               struct fmt_extent *ext)
{
    struct cbw *s = cbw_of(n);
    if (!s->source)
        return -EIO;
    return fmt_block_status_co(s->source, co, off, len, ext);
}

static void cbw_close(struct fmt_node *n)
{
    cbw_unref(n);
}

static const struct fmt_ops cbw_ops = {
    .name = "copy-before-write",
    .preadv_co = cbw_preadv_co,
    .pwritev_co = cbw_pwritev_co,
    .flush_co = cbw_flush_co,
    .zero_co = cbw_zero_co,
    .discard_co = cbw_discard_co,
    .block_status_co = cbw_block_status_co,
    .close = cbw_close,
};

struct fmt_node *cbw_new(struct fmt_node *source, struct fmt_node *target,
                         struct error **errp)
{
    if (target->read_only) {
        error_setf(errp, EROFS, "the target node is read-only");
        return NULL;
    }
    if (target->size < source->size) {
        error_setf(errp, EINVAL, "the target (%llu bytes) is smaller than the "
                   "source (%llu bytes)", (unsigned long long)target->size,
                   (unsigned long long)source->size);
        return NULL;
    }
    struct cbw *s = calloc(1, sizeof(*s));
    if (!s) {
        error_setf(errp, ENOMEM, "out of memory");
        return NULL;
    }
    s->cluster = CBW_MIN_CLUSTER;
    while (s->cluster < target->cluster_size)
        s->cluster <<= 1;
    while (s->cluster < source->align || s->cluster < target->align)
        s->cluster <<= 1;
    s->n.filename = strdup(source->filename ? source->filename : "");
    if (!s->n.filename || dbitmap_init(&s->copied, source->size, s->cluster) < 0) {
        free(s->n.filename);
        free(s);
        error_setf(errp, ENOMEM, "out of memory");
        return NULL;
    }
    s->n.ops = &cbw_ops;
    s->n.loop = source->loop;
    s->n.size = source->size;
    s->n.align = source->align > target->align ? source->align : target->align;
    s->n.caps = source->caps;
    s->n.read_only = source->read_only;
    s->source = source;
    s->target = target;
    s->attached = true;
    s->refs = 1;
    return &s->n;
}
