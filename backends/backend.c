/* strata — backend contract wrappers and dispatch (see backend.h). */
#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "fault.h"
#include "loop.h"
#include "util.h"

/* The registry: every driver with a prefix first, the local one (empty
 * prefix, takes what no other driver claims) last. */
static const struct backend_driver *const backend_drivers[] = {
    &rbd_driver,
    &nbd_driver,
    &file_driver,
};

const struct backend_driver *backend_driver_of(const char *spec)
{
    for (size_t i = 0; i < ARRAY_SIZE(backend_drivers); i++) {
        const struct backend_driver *d = backend_drivers[i];
        assert(d->api_version == BACKEND_API_VERSION);
        if (d->claims ? d->claims(spec)
                      : !strncmp(spec, d->prefix, strlen(d->prefix)))
            return d;
    }
    assert(!"no local backend driver registered");
    return NULL;
}

const struct backend_driver *backend_find_driver(const char *name)
{
    for (size_t i = 0; i < ARRAY_SIZE(backend_drivers); i++)
        if (!strcmp(backend_drivers[i]->name, name))
            return backend_drivers[i];
    return NULL;
}

const char *backend_driver_names(void)
{
    static char names[128];
    if (!names[0]) {
        size_t len = 0, n = ARRAY_SIZE(backend_drivers);
        for (size_t i = n; i-- > 0;) /* the local driver first */
            len += (size_t)snprintf(names + len, sizeof(names) - len,
                                    "%s'%s'", i == n - 1 ? "" : i ? ", " : " and ",
                                    backend_drivers[i]->name);
    }
    return names;
}

bool backend_spec_is_local(const char *spec)
{
    return backend_driver_of(spec)->flags & BACKEND_DRV_LOCAL;
}

int backend_validate_spec(const char *spec, struct error **errp)
{
    const struct backend_driver *d = backend_driver_of(spec);
    return d->validate ? d->validate(spec, errp) : 0;
}

/* The settings for driver d in an export's backing-remote= option, or
 * NULL when it has none for d. */
static const char *remote_settings(const struct backend_driver *d,
                                   const char *backing_remote)
{
    size_t n = strlen(d->prefix);
    if (!backing_remote || !n || strncmp(backing_remote, d->prefix, n))
        return NULL;
    return backing_remote + n;
}

int backend_check_backing_remote(const char *backing_remote,
                                 struct error **errp)
{
    const struct backend_driver *d = backend_driver_of(backing_remote);
    if (!d->check_settings)
        return error_setf(errp, EINVAL, "backing-remote=%s: expected the "
                          "prefix of remote storage and its settings (such "
                          "as %s:conf=/etc/ceph/ceph.conf)", backing_remote,
                          backend_drivers[0]->name);
    if (d->check_settings(remote_settings(d, backing_remote), errp) < 0) {
        error_prefix(errp, "backing-remote=%s: ", backing_remote);
        return -EINVAL;
    }
    return 0;
}

char *backend_resolve_backing(const char *overlay, const char *name,
                              const char *backing_remote,
                              struct error **errp)
{
    const struct backend_driver *od = backend_driver_of(overlay);
    const struct backend_driver *d = backend_driver_of(name);
    /* A name without a prefix that is no absolute path is relative to the
     * overlay, in the overlay's storage. */
    if ((d->flags & BACKEND_DRV_LOCAL) && name[0] != '/')
        d = od;
    return d->resolve_backing(d == od ? overlay : NULL, name,
                              remote_settings(d, backing_remote), errp);
}

char *backend_backing_name(const char *overlay, const char *layer,
                           bool relative, struct error **errp)
{
    const struct backend_driver *d = backend_driver_of(layer);
    if (!relative)
        return d->backing_name(overlay, layer, errp);
    if (backend_driver_of(overlay) != d || !d->relative_backing_name) {
        error_setf(errp, EINVAL, "%s cannot be named relative to %s", layer,
                   overlay);
        return NULL;
    }
    return d->relative_backing_name(overlay, layer, errp);
}

bool backend_same_storage(const char *a, const char *b)
{
    const struct backend_driver *d = backend_driver_of(a);
    return d == backend_driver_of(b) && d->same_storage(a, b);
}

char *backend_spec_from_options(const char *driver,
                                const struct backend_kv *kv, size_t n,
                                const char *prefix, struct error **errp)
{
    if (!driver) {
        error_setf(errp, EINVAL, "Parameter '%sdriver' is missing", prefix);
        return NULL;
    }
    const struct backend_driver *d = backend_find_driver(driver);
    if (!d || !d->spec_from_options) {
        error_setf(errp, EINVAL, "Parameter '%sdriver' does not accept value "
                   "'%s' (strata supports %s)", prefix, driver,
                   backend_driver_names());
        return NULL;
    }
    return d->spec_from_options(kv, n, prefix, errp);
}

struct backend *backend_open(struct loop *loop, const char *spec,
                             const struct backend_open_opts *opts,
                             struct error **errp)
{
    const struct backend_driver *d = backend_driver_of(spec);
    if (opts->beneath_path && !(d->flags & BACKEND_DRV_LOCAL)) {
        error_setf(errp, EINVAL, "%s: not a local file", spec);
        return NULL;
    }
    return backend_driver_of(spec)->open(loop, spec, opts, errp);
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
    if (!(backend_driver_of(spec)->flags & BACKEND_DRV_OFFLOAD))
        return backend_open(loop, spec, opts, errp); /* open(2): quick */
    struct open_call c = {loop, spec, opts, errp, NULL};
    loop_offload_co(loop, co, open_call, &c);
    return c.result;
}

int backend_remove(const char *spec, struct error **errp)
{
    return backend_driver_of(spec)->remove(spec, errp);
}

bool backend_same_open(struct backend *a, struct backend *b)
{
    if (a->ops != b->ops)
        return false;
    if (a->ops->same_open)
        return a->ops->same_open(a, b);
    return backend_same_storage(a->name, b->name);
}

bool backend_needs_offload(const struct backend *b)
{
    return backend_driver_of(b->name)->flags & BACKEND_DRV_OFFLOAD;
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
    bool short_io;
    int r = backend_fault_hit(BACKEND_FAULT_READ, &short_io);
    if (r < 0)
        return r;
    r = b->ops->preadv_co(b, co, iov, iovcnt, off);
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
    bool short_io;
    int r = backend_fault_hit(BACKEND_FAULT_WRITE, &short_io);
    if (r < 0)
        return r;
    if (r == BACKEND_FAULT_HOLD)
        backend_fault_hold_co(b->loop, co);
    r = b->ops->pwritev_co(b, co, iov, iovcnt, off, flags);
    assert(r <= 0);
    b->writes_done++; /* even failed: part of it may have changed */
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
    /* Nothing completed since the last flush: nothing to make durable
     * (a sync of the file would still cost a device cache flush, and
     * whoever waits for it, for nothing).  Writes in flight are not
     * covered by a flush anyway. */
    if (b->writes_done == b->writes_flushed)
        return 0;
    uint64_t covers = b->writes_done;
    bool short_io;
    int r = backend_fault_hit(BACKEND_FAULT_FLUSH, &short_io);
    if (r < 0)
        return r;
    if (r == BACKEND_FAULT_HOLD)
        backend_fault_hold_co(b->loop, co);
    r = b->ops->flush_co(b, co);
    if (r == 0 && covers > b->writes_flushed)
        b->writes_flushed = covers;
    return r;
}

int backend_zero_co(struct backend *b, struct coro *co, uint64_t off,
                    uint64_t len, unsigned flags)
{
    assert(!b->read_only);
    assert(!(flags & ~(BACKEND_FUA | BACKEND_MAY_TRIM | BACKEND_FAST)));
    check_range(b, off, len);
    bool short_io;
    int r = backend_fault_hit(BACKEND_FAULT_ZERO, &short_io);
    if (r < 0)
        return r;
    r = b->ops->zero_co(b, co, off, len, flags);
    b->writes_done++;
    return r;
}

int backend_discard_co(struct backend *b, struct coro *co, uint64_t off,
                       uint64_t len, unsigned flags)
{
    assert(!b->read_only);
    assert(!(flags & ~BACKEND_FUA));
    check_range(b, off, len);
    if (!(b->caps & BACKEND_CAN_TRIM))
        return 0;
    bool short_io;
    int r = backend_fault_hit(BACKEND_FAULT_DISCARD, &short_io);
    if (r < 0)
        return r;
    r = b->ops->discard_co(b, co, off, len, flags);
    b->writes_done++;
    return r;
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
        !backend_needs_offload(b))
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
    bool short_io;
    int r = backend_fault_hit(BACKEND_FAULT_TRUNCATE, &short_io);
    if (r < 0)
        return r;
    r = b->ops->truncate_co(b, co, size);
    b->writes_done++;
    return r;
}

int backend_cache_co(struct backend *b, struct coro *co, uint64_t off,
                     uint64_t len)
{
    if (!b->ops->cache_co)
        return 0;
    return b->ops->cache_co(b, co, off, len);
}
