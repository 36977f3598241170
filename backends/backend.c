/* strata — backend contract wrappers and dispatch (see backend.h). */
#include <assert.h>
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "loop.h"
#include "strata-config.h"

struct backend *backend_open(struct loop *loop, const char *spec,
                             const struct backend_open_opts *opts,
                             struct error **errp)
{
    if (backend_spec_is_remote(spec)) {
#if STRATA_HAVE_RBD
        return rbd_backend_open(loop, spec, opts, errp);
#else
        error_setf(errp, ENOTSUP, "%s: rbd: exports are unavailable: stratad "
                   "was built without librbd (install librbd-dev and "
                   "librados-dev, then meson setup -Drbd=enabled)", spec);
        return NULL;
#endif
    }
    return file_backend_open(loop, spec, opts, errp);
}

struct open_call {
    struct loop *loop;
    const char *spec;
    const struct backend_open_opts *opts;
    struct error **errp;
    struct backend *result;
};

static void open_call(void *arg)
{
    struct open_call *c = arg;
    c->result = backend_open(c->loop, c->spec, c->opts, c->errp);
}

struct backend *backend_open_co(struct loop *loop, struct coro *co,
                                const char *spec,
                                const struct backend_open_opts *opts,
                                struct error **errp)
{
    if (!backend_spec_is_remote(spec))
        return backend_open(loop, spec, opts, errp); /* open(2): quick */
    struct open_call c = {loop, spec, opts, errp, NULL};
    loop_offload_co(loop, co, open_call, &c);
    return c.result;
}

int backend_remove(const char *spec, struct error **errp)
{
    if (backend_spec_is_remote(spec)) {
#if STRATA_HAVE_RBD
        return rbd_backend_remove(spec, errp);
#else
        return error_setf(errp, ENOTSUP, "%s: stratad was built without "
                          "librbd", spec);
#endif
    }
    if (unlink(spec) < 0)
        return error_setf(errp, errno, "%s: cannot remove it: %s", spec,
                          strerror(errno));
    return 0;
}

void backend_close(struct backend *b)
{
    if (b)
        b->ops->close(b);
}

static inline bool aligned(const struct backend *b, uint64_t v)
{
    return (v & (b->align - 1)) == 0;
}

/* The callers (formats) are trusted code: a violated contract is a
 * programmer error, hence assertions.  Client input never reaches here
 * unchecked: nbd_validate_request() ran first. */
static void check_range(const struct backend *b, uint64_t off, uint64_t len)
{
    assert(len > 0);
    assert(off + len >= off);
    assert(aligned(b, off) && aligned(b, len));
}

int backend_preadv_co(struct backend *b, struct coro *co,
                      const struct iovec *iov, int iovcnt, uint64_t off)
{
    check_range(b, off, iov_size(iov, iovcnt));
    int r = b->ops->preadv_co(b, co, iov, iovcnt, off);
    assert(r <= 0);
    return r;
}

int backend_pwritev_co(struct backend *b, struct coro *co,
                       const struct iovec *iov, int iovcnt, uint64_t off,
                       unsigned flags)
{
    assert(!b->read_only);
    assert(!(flags & ~BACKEND_FUA));
    check_range(b, off, iov_size(iov, iovcnt));
    int r = b->ops->pwritev_co(b, co, iov, iovcnt, off, flags);
    assert(r <= 0);
    return r;
}

int backend_pread_co(struct backend *b, struct coro *co, void *buf,
                     uint64_t len, uint64_t off)
{
    struct iovec iov = {.iov_base = buf, .iov_len = len};
    return backend_preadv_co(b, co, &iov, 1, off);
}

int backend_pwrite_co(struct backend *b, struct coro *co, const void *buf,
                      uint64_t len, uint64_t off, unsigned flags)
{
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
    return backend_pwritev_co(b, co, &iov, 1, off, flags);
}

int backend_flush_co(struct backend *b, struct coro *co)
{
    if (b->read_only)
        return 0;
    return b->ops->flush_co(b, co);
}

int backend_zero_co(struct backend *b, struct coro *co, uint64_t off,
                    uint64_t len, unsigned flags)
{
    assert(!b->read_only);
    assert(!(flags & ~(BACKEND_FUA | BACKEND_MAY_TRIM | BACKEND_FAST)));
    check_range(b, off, len);
    return b->ops->zero_co(b, co, off, len, flags);
}

int backend_discard_co(struct backend *b, struct coro *co, uint64_t off,
                       uint64_t len, unsigned flags)
{
    assert(!b->read_only);
    check_range(b, off, len);
    if (!(b->caps & BACKEND_CAN_TRIM))
        return 0;
    return b->ops->discard_co(b, co, off, len, flags);
}

int backend_block_status_co(struct backend *b, struct coro *co, uint64_t off,
                            uint64_t len, uint64_t *pnum, unsigned *status)
{
    assert(len > 0);
    if (!(b->caps & BACKEND_CAN_EXTENTS) || off >= b->size) {
        *pnum = len;
        *status = off >= b->size ? BACKEND_STATUS_ZERO : BACKEND_STATUS_DATA;
        return 0;
    }
    int r = b->ops->block_status_co(b, co, off, len, pnum, status);
    assert(r < 0 || (*pnum > 0 && *pnum <= len));
    return r;
}

int backend_reopen(struct backend *b, bool read_only, struct error **errp)
{
    if (b->read_only == read_only)
        return 0;
    if (!b->ops->reopen)
        return error_setf(errp, ENOTSUP, "%s: cannot switch to %s access",
                          b->name, read_only ? "read-only" : "read-write");
    return b->ops->reopen(b, read_only, errp);
}

struct reopen_call {
    struct backend *b;
    bool read_only;
    struct error **errp;
    int result;
};

static void reopen_call(void *arg)
{
    struct reopen_call *c = arg;
    c->result = c->b->ops->reopen(c->b, c->read_only, c->errp);
}

int backend_reopen_co(struct backend *b, struct coro *co, bool read_only,
                      struct error **errp)
{
    if (b->read_only == read_only || !b->ops->reopen ||
        !backend_spec_is_remote(b->name))
        return backend_reopen(b, read_only, errp);
    struct reopen_call c = {b, read_only, errp, 0};
    loop_offload_co(b->loop, co, reopen_call, &c);
    return c.result;
}

int backend_truncate_co(struct backend *b, struct coro *co, uint64_t size)
{
    assert(!b->read_only);
    if (!(b->caps & BACKEND_CAN_RESIZE))
        return -ENOTSUP;
    return b->ops->truncate_co(b, co, size);
}

int backend_cache_co(struct backend *b, struct coro *co, uint64_t off,
                     uint64_t len)
{
    if (!b->ops->cache_co)
        return 0;
    return b->ops->cache_co(b, co, off, len);
}
