/* strata — the raw format: the virtual disk is the backend's bytes. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "format.h"

static int raw_preadv_co(struct fmt_node *n, struct coro *co,
                         const struct iovec *iov, int iovcnt, uint64_t off)
{
    return backend_preadv_co(n->file, co, iov, iovcnt, off);
}

static int raw_pwritev_co(struct fmt_node *n, struct coro *co,
                          const struct iovec *iov, int iovcnt, uint64_t off,
                          unsigned flags)
{
    return backend_pwritev_co(n->file, co, iov, iovcnt, off,
                              (flags & FMT_FUA) ? BACKEND_FUA : 0);
}

static int raw_flush_co(struct fmt_node *n, struct coro *co)
{
    return backend_flush_co(n->file, co);
}

static unsigned backend_flags(unsigned flags)
{
    return ((flags & FMT_FUA) ? BACKEND_FUA : 0) |
           ((flags & FMT_MAY_TRIM) ? BACKEND_MAY_TRIM : 0) |
           ((flags & FMT_FAST) ? BACKEND_FAST : 0);
}

static int raw_zero_co(struct fmt_node *n, struct coro *co, uint64_t off,
                       uint64_t len, unsigned flags)
{
    return backend_zero_co(n->file, co, off, len, backend_flags(flags));
}

static int raw_discard_co(struct fmt_node *n, struct coro *co, uint64_t off,
                          uint64_t len, unsigned flags)
{
    return backend_discard_co(n->file, co, off, len, backend_flags(flags));
}

/* Holes of the file are reported as holes that read as zeros; raw has no
 * backing file, so everything is allocated at depth 1 (as QEMU reports). */
static int raw_block_status_co(struct fmt_node *n, struct coro *co,
                               uint64_t off, uint64_t len,
                               struct fmt_extent *ext)
{
    uint64_t pnum;
    unsigned st;
    int r = backend_block_status_co(n->file, co, off, len, &pnum, &st);
    if (r < 0)
        return r;
    ext->len = pnum;
    ext->depth = 1;
    ext->flags = 0;
    if (st & BACKEND_STATUS_ZERO)
        ext->flags |= FMT_EXT_ZERO;
    if (!(st & BACKEND_STATUS_DATA))
        ext->flags |= FMT_EXT_HOLE;
    return 0;
}

static int raw_cache_co(struct fmt_node *n, struct coro *co, uint64_t off,
                        uint64_t len)
{
    return backend_cache_co(n->file, co, off, len);
}

static int raw_reopen_co(struct fmt_node *n, struct coro *co, bool read_only,
                         struct error **errp)
{
    if (read_only) {
        int r = backend_flush_co(n->file, co);
        if (r < 0)
            return error_setf(errp, -r, "%s: flush: %s", n->filename,
                              strerror(-r));
    }
    int r = backend_reopen_co(n->file, co, read_only, errp);
    if (r < 0)
        return r;
    n->read_only = read_only;
    return 0;
}

static int raw_grow_co(struct fmt_node *n, struct coro *co, uint64_t size,
                       struct error **errp)
{
    int r = 0;
    if (n->file->size < size)
        r = backend_truncate_co(n->file, co, size);
    if (r < 0)
        return error_setf(errp, -r, "%s: growing to %llu bytes: %s",
                          n->filename, (unsigned long long)size, strerror(-r));
    n->size = size;
    return 0;
}

static void raw_close(struct fmt_node *n)
{
    free(n->filename);
    free(n);
}

static const struct fmt_ops raw_ops = {
    .name = "raw",
    .preadv_co = raw_preadv_co,
    .pwritev_co = raw_pwritev_co,
    .flush_co = raw_flush_co,
    .zero_co = raw_zero_co,
    .discard_co = raw_discard_co,
    .block_status_co = raw_block_status_co,
    .cache_co = raw_cache_co,
    .reopen_co = raw_reopen_co,
    .grow_co = raw_grow_co,
    .close = raw_close,
};

struct fmt_node *raw_open_co(struct loop *loop, struct coro *co,
                             struct backend *file,
                             const struct fmt_open_opts *opts,
                             struct error **errp)
{
    (void)co;
    struct fmt_node *n = calloc(1, sizeof(*n));
    char *name = strdup(file->name);
    if (!n || !name) {
        free(n);
        free(name);
        error_setf(errp, ENOMEM, "out of memory");
        return NULL;
    }
    n->ops = &raw_ops;
    n->loop = loop;
    n->file = file;
    n->filename = name;
    n->size = file->size;
    n->align = file->align;
    n->read_only = opts->read_only || file->read_only;
    n->caps = ((file->caps & BACKEND_CAN_ZERO) ? FMT_CAN_ZERO : 0) |
              ((file->caps & BACKEND_CAN_TRIM) ? FMT_CAN_TRIM : 0);
    return n;
}

/* The fallback of probing: no probe, no backing file. */
FMT_REGISTER_DRIVER(raw_driver,
    .name = "raw",
    .caps = 0,
    .max_rw = FMT_MAX_RW,
    .open_co = raw_open_co,
);
