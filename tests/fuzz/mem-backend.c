/* strata — an in-memory backend for the fuzz targets (see mem-backend.h). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "mem-backend.h"

struct mem_backend {
    struct backend b;
    struct mem_store *m;
};

static struct mem_store *store(struct backend *b)
{
    return ((struct mem_backend *)b)->m;
}

void mem_store_init(struct mem_store *m, const void *data, size_t len,
                    uint64_t limit)
{
    m->cap = len ? len : 1;
    m->data = malloc(m->cap);
    if (!m->data)
        abort();
    if (len)
        memcpy(m->data, data, len);
    m->size = len;
    m->limit = limit > len ? limit : len;
    m->written_lo = m->written_hi = 0;
}

void mem_store_load(struct mem_store *m, const void *data, size_t len,
                    uint64_t limit)
{
    if (!m->data || m->cap < len) {
        mem_store_fini(m);
        mem_store_init(m, data, len, limit);
        return;
    }
    if (len)
        memcpy(m->data, data, len);
    m->size = len;
    m->limit = limit > len ? limit : len;
    m->written_lo = m->written_hi = 0;
}

void mem_store_clear_written(struct mem_store *m)
{
    uint64_t hi = m->written_hi < m->size ? m->written_hi : m->size;
    if (m->written_lo < hi)
        memset(m->data + m->written_lo, 0, hi - m->written_lo);
    m->written_lo = m->written_hi = 0;
}

void mem_store_fini(struct mem_store *m)
{
    free(m->data);
    memset(m, 0, sizeof(*m));
}

/* Makes the store at least end bytes long (new bytes read as zeros). */
static int mem_grow(struct mem_store *m, uint64_t end)
{
    if (end <= m->size)
        return 0;
    if (end > m->limit)
        return -ENOSPC;
    if (end > m->cap) {
        uint64_t cap = m->cap * 2 > end ? m->cap * 2 : end;
        if (cap > m->limit)
            cap = m->limit;
        uint8_t *d = realloc(m->data, cap);
        if (!d)
            return -ENOMEM;
        m->data = d;
        m->cap = cap;
    }
    memset(m->data + m->size, 0, end - m->size);
    m->size = end;
    return 0;
}

static int mem_preadv_co(struct backend *b, struct coro *co,
                         const struct iovec *iov, int iovcnt, uint64_t off)
{
    struct mem_store *m = store(b);
    (void)co;
    for (int i = 0; i < iovcnt; i++) {
        uint64_t len = iov[i].iov_len, have = 0;
        if (off < m->size)
            have = m->size - off < len ? m->size - off : len;
        if (have)
            memcpy(iov[i].iov_base, m->data + off, have);
        memset((uint8_t *)iov[i].iov_base + have, 0, len - have);
        off += len;
    }
    return 0;
}

static int mem_pwritev_co(struct backend *b, struct coro *co,
                          const struct iovec *iov, int iovcnt, uint64_t off,
                          unsigned flags)
{
    struct mem_store *m = store(b);
    uint64_t total = iov_size(iov, iovcnt);
    (void)co;
    (void)flags;
    if (off > UINT64_MAX - total)
        return -EFBIG;
    int r = mem_grow(m, off + total);
    if (r < 0)
        return r;
    if (total) {
        if (m->written_lo == m->written_hi) {
            m->written_lo = off;
            m->written_hi = off + total;
        } else {
            if (off < m->written_lo)
                m->written_lo = off;
            if (off + total > m->written_hi)
                m->written_hi = off + total;
        }
    }
    for (int i = 0; i < iovcnt; i++) {
        memcpy(m->data + off, iov[i].iov_base, iov[i].iov_len);
        off += iov[i].iov_len;
    }
    b->size = m->size;
    return 0;
}

static int mem_flush_co(struct backend *b, struct coro *co)
{
    (void)b;
    (void)co;
    return 0;
}

/* Zeroes what exists of [off, off+len): bytes past the end already read
 * as zeros, so nothing grows. */
static void mem_clear(struct mem_store *m, uint64_t off, uint64_t len)
{
    if (off >= m->size)
        return;
    if (len > m->size - off)
        len = m->size - off;
    memset(m->data + off, 0, len);
}

static int mem_zero_co(struct backend *b, struct coro *co, uint64_t off,
                       uint64_t len, unsigned flags)
{
    (void)co;
    (void)flags;
    mem_clear(store(b), off, len);
    return 0;
}

static int mem_discard_co(struct backend *b, struct coro *co, uint64_t off,
                          uint64_t len, unsigned flags)
{
    (void)co;
    (void)flags;
    mem_clear(store(b), off, len);
    return 0;
}

static int mem_block_status_co(struct backend *b, struct coro *co,
                               uint64_t off, uint64_t len, uint64_t *pnum,
                               unsigned *status)
{
    (void)b;
    (void)co;
    (void)off;
    *pnum = len;
    *status = BACKEND_STATUS_DATA;
    return 0;
}

static int mem_truncate_co(struct backend *b, struct coro *co, uint64_t size)
{
    struct mem_store *m = store(b);
    (void)co;
    if (size < m->size) {
        m->size = size;
    } else {
        int r = mem_grow(m, size);
        if (r < 0)
            return r;
    }
    b->size = m->size;
    return 0;
}

static int mem_reopen(struct backend *b, bool read_only, struct error **errp)
{
    (void)errp;
    b->read_only = read_only;
    return 0;
}

static void mem_close(struct backend *b)
{
    free(b->name);
    free(b);
}

static const struct backend_ops mem_ops = {
    .name = "memory",
    .preadv_co = mem_preadv_co,
    .pwritev_co = mem_pwritev_co,
    .flush_co = mem_flush_co,
    .zero_co = mem_zero_co,
    .discard_co = mem_discard_co,
    .block_status_co = mem_block_status_co,
    .truncate_co = mem_truncate_co,
    .reopen = mem_reopen,
    .close = mem_close,
};

struct backend *mem_backend_open(struct loop *loop, struct mem_store *m,
                                 const char *name, bool read_only)
{
    struct mem_backend *mb = calloc(1, sizeof(*mb));
    if (!mb)
        abort();
    mb->m = m;
    mb->b.ops = &mem_ops;
    mb->b.loop = loop;
    mb->b.name = strdup(name);
    if (!mb->b.name)
        abort();
    mb->b.size = m->size;
    mb->b.align = 1;
    mb->b.caps = BACKEND_CAN_ZERO | BACKEND_CAN_TRIM | BACKEND_CAN_RESIZE;
    mb->b.read_only = read_only;
    return &mb->b;
}
