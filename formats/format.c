/* strata — format node dispatch and contract wrappers (see format.h). */
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sys/stat.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "format.h"
#include "log.h"
#include "loop.h"
#include "util.h"

/* What the chain opener remembers of the layers opened so far. */
struct chain_ctx {
    struct loop *loop;
    struct coro *co;
    const struct fmt_open_opts *opts;
    char root[PATH_MAX];          /* backing root (real path) */
    int root_fd;                  /* O_PATH descriptor of root, opened for
                                     the first local backing file; -1 */
    bool no_local;                /* no local backing files (top on
                                     remote storage, no backing root) */
    struct backend *seen[FMT_MAX_CHAIN_DEPTH]; /* the storage of every layer
                                     opened so far (alive while the opener
                                     runs: owned by nodes up the stack) */
    unsigned depth;
};

/* ---- the registry ---- */

/* In order of preference: the first that can have a backing file makes
 * new overlays; the last is the fallback of probing (raw). */
static const struct fmt_driver *const fmt_drivers[] = {
    &qcow2_driver,
    &raw_driver,
};

const struct fmt_driver *fmt_find_driver(const char *name)
{
    for (size_t i = 0; i < ARRAY_SIZE(fmt_drivers); i++) {
        assert(fmt_drivers[i]->api_version == FMT_API_VERSION);
        if (!strcmp(fmt_drivers[i]->name, name))
            return fmt_drivers[i];
    }
    return NULL;
}

const char *fmt_driver_names(void)
{
    static char names[128];
    if (!names[0]) {
        size_t len = 0;
        for (size_t i = ARRAY_SIZE(fmt_drivers); i-- > 0;)
            len += (size_t)snprintf(names + len, sizeof(names) - len, "%s%s",
                                    len ? ", " : "", fmt_drivers[i]->name);
    }
    return names;
}

const struct fmt_driver *fmt_default_overlay_driver(void)
{
    for (size_t i = 0; i < ARRAY_SIZE(fmt_drivers); i++)
        if (fmt_driver_can_backing(fmt_drivers[i]))
            return fmt_drivers[i];
    assert(!"no format driver can have a backing file");
    return NULL;
}

bool fmt_driver_can_backing(const struct fmt_driver *d)
{
    return d && (d->caps & FMT_DRV_BACKING);
}

/* The driver that probes best for the first bytes of a file; the last
 * (fallback) driver when none recognises them. */
static const struct fmt_driver *fmt_probe(const uint8_t *buf, size_t len)
{
    const struct fmt_driver *best = fmt_drivers[ARRAY_SIZE(fmt_drivers) - 1];
    int best_score = 0;
    for (size_t i = 0; i < ARRAY_SIZE(fmt_drivers); i++) {
        int score = fmt_drivers[i]->probe ? fmt_drivers[i]->probe(buf, len) : 0;
        if (score > best_score) {
            best = fmt_drivers[i];
            best_score = score;
        }
    }
    return best;
}

const char *fmt_backing_name(struct fmt_node *n)
{
    return fmt_driver_can_backing(n->drv) ? n->drv->backing_name(n) : NULL;
}

const char *fmt_backing_format(struct fmt_node *n)
{
    return fmt_driver_can_backing(n->drv) ? n->drv->backing_format(n) : NULL;
}

int fmt_set_backing_co(struct fmt_node *n, struct coro *co,
                       const char *backing_name, const char *backing_fmt,
                       struct error **errp)
{
    if (!fmt_driver_can_backing(n->drv))
        return error_setf(errp, ENOTSUP, "%s: a %s image has no backing file",
                          n->filename, n->ops->name);
    assert(!n->read_only);
    return n->drv->set_backing_co(n, co, backing_name, backing_fmt, errp);
}

int fmt_create_co(const struct fmt_driver *d, struct loop *loop,
                  struct coro *co, const char *path, uint64_t size,
                  const char *backing_name, const char *backing_fmt,
                  struct error **errp)
{
    if (!fmt_driver_can_backing(d))
        return error_setf(errp, ENOTSUP, "%s: strata cannot create %s images",
                          path, d->name);
    return d->create_co(loop, co, path, size, backing_name, backing_fmt,
                        errp);
}

/* ---- naming layers ---- */

char *fmt_resolve_backing(const char *overlay, const char *name,
                          const char *backing_remote, struct error **errp)
{
    return backend_resolve_backing(overlay, name, backing_remote, errp);
}

char *fmt_backing_name_for(const char *overlay, const char *layer,
                           struct error **errp)
{
    return backend_backing_name(overlay, layer, false, errp);
}

bool fmt_same_layer(const char *a, const char *b)
{
    return backend_same_storage(a, b);
}

static bool path_inside(const char *path, const char *root)
{
    size_t n = strlen(root);
    if (n == 1 && root[0] == '/')
        return true;
    return strncmp(path, root, n) == 0 && (path[n] == '/' || path[n] == 0);
}

/* Where a local backing file is opened: beneath the backing root.
 *
 * realpath() below only names the file for the checks and the messages
 * (and finds the path relative to the root); it does not decide what is
 * opened.  The open is one openat2() from the root's O_PATH descriptor
 * with RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS (file_backend_open): the
 * kernel resolves every component of the relative path itself and fails
 * the open if any step — "..", an absolute symlink, a /proc magic link —
 * would leave the root.  So a symlink swapped into the path between the
 * check and the open (or during it) can make the open fail, never reach a
 * file outside the root: there is no window to race.  What the loop check
 * compares is then the opened file itself (fstat of its descriptor,
 * backend_same_open), not whatever the name points at later. */
static int local_backing_path(struct chain_ctx *cx, const char *spec,
                              char **rel, struct error **errp)
{
    char real[PATH_MAX]; /* not in open_layer's frame: it recurses */
    if (cx->no_local)
        return error_setf(errp, EACCES, "backing file %s is a local file "
                          "under an image on RBD: set backing-root= on the "
                          "export to allow local backing files", spec);
    if (!realpath(spec, real))
        return error_setf(errp, errno, "%s: %s", spec, strerror(errno));
    if (!path_inside(real, cx->root))
        return error_setf(errp, EACCES, "backing file %s (%s) is outside the "
                          "export's backing root %s (set backing-root= on the "
                          "export to allow it)", spec, real, cx->root);
    if (cx->root_fd < 0) {
        cx->root_fd = open(cx->root, O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (cx->root_fd < 0)
            return error_setf(errp, errno, "backing root %s: %s", cx->root,
                              strerror(errno));
    }
    size_t n = strlen(cx->root);
    const char *r = real + (n == 1 ? 0 : n);
    while (*r == '/')
        r++;
    *rel = strdup(*r ? r : ".");
    if (!*rel)
        return error_setf(errp, ENOMEM, "out of memory");
    return 0;
}

static struct fmt_node *open_layer(struct chain_ctx *cx, const char *spec,
                                   const char *format, bool read_only,
                                   bool backing, struct error **errp)
{
    if (cx->depth >= FMT_MAX_CHAIN_DEPTH) {
        error_setf(errp, ELOOP, "%s: backing chain deeper than %d layers",
                   spec, FMT_MAX_CHAIN_DEPTH);
        return NULL;
    }
    struct backend_open_opts bo = {
        .read_only = read_only,
        .direct = cx->opts->direct,
    };
    char *rel = NULL;
    bool local = backend_spec_is_local(spec);
    if (backing && local) {
        if (local_backing_path(cx, spec, &rel, errp) < 0)
            return NULL;
        bo.beneath_path = rel;
        bo.beneath_dirfd = cx->root_fd;
    }
    struct backend *file = backend_open_co(cx->loop, cx->co, spec, &bo, errp);
    free(rel);
    if (!file)
        return NULL;
    for (unsigned i = 0; i < cx->depth; i++)
        if (backend_same_open(cx->seen[i], file)) {
            error_setf(errp, ELOOP, "%s: the backing chain loops (this %s is "
                       "already in it)", spec, local ? "file" : "image");
            backend_close(file);
            return NULL;
        }
    cx->seen[cx->depth++] = file;

    const struct fmt_driver *drv = format ? fmt_find_driver(format) : NULL;
    if (format && !drv) {
        error_setf(errp, EINVAL, "%s: unknown format '%s' (supported: %s)",
                   spec, format, fmt_driver_names());
        backend_close(file);
        return NULL;
    }
    if (!drv) {
        uint8_t *head = NULL;
        size_t len = file->align > FMT_PROBE_BYTES ? file->align
                                                   : FMT_PROBE_BYTES;
        if (posix_memalign((void **)&head, len > 64 ? len : 64, len) != 0) {
            backend_close(file);
            error_setf(errp, ENOMEM, "out of memory");
            return NULL;
        }
        int r = backend_pread_co(file, cx->co, head, len, 0);
        if (r == 0)
            drv = fmt_probe(head, file->size < len ? (size_t)file->size : len);
        free(head);
        if (r < 0) {
            error_setf(errp, -r, "%s: %s", spec, strerror(-r));
            backend_close(file);
            return NULL;
        }
        if (!backing && drv->probe) {
            /* No probing into a guest-writable raw image: a header
             * written by a guest must never change how it is read. */
            error_setf(errp, EINVAL, "%s: looks like a %s image: say "
                       "format=%s or format=raw explicitly", spec, drv->name,
                       drv->name);
            backend_close(file);
            return NULL;
        }
    }

    struct fmt_open_opts lo = *cx->opts;
    lo.read_only = read_only;
    struct fmt_node *n = drv->open_co(cx->loop, cx->co, file, &lo, errp);
    if (!n) {
        backend_close(file);
        return NULL;
    }
    n->drv = drv;
    free(n->filename);
    n->filename = strdup(spec);
    if (!n->filename) {
        fmt_close(n);
        error_setf(errp, ENOMEM, "out of memory");
        return NULL;
    }

    const char *bname = fmt_backing_name(n);
    if (bname) {
        char *bspec = fmt_resolve_backing(spec, bname, cx->opts->backing_remote,
                                          errp);
        if (!bspec) {
            error_prefix(errp, "%s: backing file: ", spec);
            fmt_close(n);
            return NULL;
        }
        n->backing = open_layer(cx, bspec, fmt_backing_format(n), true, true,
                                errp);
        if (!n->backing) {
            error_prefix(errp, "%s: backing file: ", spec);
            free(bspec);
            fmt_close(n);
            return NULL;
        }
        free(bspec);
    }
    return n;
}

struct fmt_node *fmt_open_co(struct loop *loop, struct coro *co,
                             const char *spec,
                             const struct fmt_open_opts *opts,
                             struct error **errp)
{
    struct chain_ctx *cx = calloc(1, sizeof(*cx));
    if (!cx) {
        error_setf(errp, ENOMEM, "out of memory");
        return NULL;
    }
    cx->loop = loop;
    cx->co = co;
    cx->opts = opts;
    cx->root_fd = -1;
    if (opts->backing_remote &&
        backend_check_backing_remote(opts->backing_remote, errp) < 0) {
        free(cx);
        return NULL;
    }
    const char *root = opts->backing_root;
    char dir[PATH_MAX];
    if (!root && backend_spec_is_local(spec)) {
        /* Default: the top image's own directory. */
        char real[PATH_MAX];
        if (realpath(spec, real)) {
            char *slash = strrchr(real, '/');
            if (slash == real)
                slash[1] = 0;
            else
                *slash = 0;
            snprintf(dir, sizeof(dir), "%s", real);
            root = dir;
        }
    }
    if (root && backend_spec_is_local(root) && !realpath(root, cx->root)) {
        error_setf(errp, errno, "backing root %s: %s", root, strerror(errno));
        free(cx);
        return NULL;
    }
    if (!root) {
        snprintf(cx->root, sizeof(cx->root), "/");
        cx->no_local = !backend_spec_is_local(spec);
    }
    if (!cx->root[0]) /* a root on remote storage: no directory to keep to */
        snprintf(cx->root, sizeof(cx->root), "/");
    struct fmt_node *n = open_layer(cx, spec, opts->format, opts->read_only,
                                    false, errp);
    if (cx->root_fd >= 0)
        close(cx->root_fd);
    free(cx);
    return n;
}

struct fmt_node *fmt_open_overlay_co(struct loop *loop, struct coro *co,
                                     const char *path,
                                     struct fmt_node *backing,
                                     const struct fmt_open_opts *opts,
                                     struct error **errp)
{
    struct backend_open_opts bo = {
        .read_only = opts->read_only,
        .direct = opts->direct,
    };
    const struct fmt_driver *drv = fmt_find_driver(opts->format);
    if (!fmt_driver_can_backing(drv)) {
        error_setf(errp, EINVAL, "%s: format '%s' cannot be an overlay", path,
                   opts->format);
        return NULL;
    }
    struct backend *file = backend_open_co(loop, co, path, &bo, errp);
    if (!file)
        return NULL;
    struct fmt_node *n = drv->open_co(loop, co, file, opts, errp);
    if (!n) {
        backend_close(file);
        return NULL;
    }
    n->drv = drv;
    free(n->filename);
    n->filename = strdup(path);
    if (!n->filename) {
        fmt_close(n);
        error_setf(errp, ENOMEM, "out of memory");
        return NULL;
    }
    n->backing = backing;
    return n;
}

struct sync_open {
    struct loop *loop;
    const char *spec;
    const struct fmt_open_opts *opts;
    struct error **errp;
    struct fmt_node *result;
};

static void sync_open_co(struct coro *co, void *arg)
{
    struct sync_open *so = arg;
    so->result = fmt_open_co(so->loop, co, so->spec, so->opts, so->errp);
}

struct fmt_node *fmt_open(struct loop *loop, const char *spec,
                          const struct fmt_open_opts *opts,
                          struct error **errp)
{
    struct sync_open so = {loop, spec, opts, errp, NULL};
    int r = loop_run_sync(loop, sync_open_co, &so);
    if (r < 0) {
        error_setf(errp, -r, "%s: %s", spec, strerror(-r));
        return NULL;
    }
    return so.result;
}

void fmt_prepare_writable_co(struct fmt_node *n, struct coro *co)
{
    if (n->ops->prepare_writable_co)
        n->ops->prepare_writable_co(n, co);
}

int fmt_reopen_co(struct fmt_node *n, struct coro *co, bool read_only,
                  struct error **errp)
{
    if (n->read_only == read_only)
        return 0;
    if (!n->ops->reopen_co)
        return error_setf(errp, ENOTSUP, "%s: %s cannot be reopened",
                          n->filename, n->ops->name);
    return n->ops->reopen_co(n, co, read_only, errp);
}

int fmt_grow_co(struct fmt_node *n, struct coro *co, uint64_t size,
                struct error **errp)
{
    if (size <= n->size)
        return 0;
    if (n->read_only)
        return error_setf(errp, EROFS, "%s: read-only", n->filename);
    if (!n->ops->grow_co)
        return error_setf(errp, ENOTSUP, "%s: %s cannot grow", n->filename,
                          n->ops->name);
    int r = n->ops->grow_co(n, co, size, errp);
    if (r == 0 && fmt_bitmaps_resize(n, size) < 0) {
        /* bitmaps that cannot follow cannot be trusted */
        for (struct fmt_bitmap *bm = n->bitmaps; bm; bm = bm->next) {
            if (bm->bits.size != size) {
                bm->inconsistent = true;
                bm->recording = false;
            }
        }
        log_warn("%s: out of memory growing dirty bitmaps: marked "
                 "inconsistent", n->filename);
    }
    return r;
}

void fmt_close(struct fmt_node *n)
{
    while (n) {
        struct fmt_node *backing = n->backing;
        struct backend *file = n->file;
        fmt_bitmaps_free(n);
        n->ops->close(n);
        backend_close(file);
        n = backing;
    }
}

static void close_call(void *arg)
{
    fmt_close(arg);
}

int fmt_store_bitmaps_co(struct fmt_node *top, struct coro *co)
{
    int ret = 0;
    for (struct fmt_node *x = top; x; x = x->backing) {
        struct error *err = NULL;
        int r = fmt_bitmaps_store_co(x, co, &err);
        if (r < 0) {
            log_error("%s: storing its persistent dirty bitmaps: %s (they "
                      "stay marked in use: inconsistent)", x->filename,
                      err->msg);
            error_free(err);
            ret = r;
        }
    }
    return ret;
}

void fmt_close_co(struct fmt_node *n, struct loop *loop, struct coro *co)
{
    fmt_store_bitmaps_co(n, co);
    bool offload = false;
    for (struct fmt_node *x = n; x; x = x->backing)
        offload |= x->file && backend_needs_offload(x->file);
    if (offload)
        loop_offload_co(loop, co, close_call, n);
    else
        fmt_close(n);
}

/* Callers validated client input already (nbd_validate_request); a bad
 * range here is a programmer error. */
static void check_range(const struct fmt_node *n, uint64_t off, uint64_t len)
{
    assert(len > 0);
    assert(off + len >= off && off + len <= n->size);
    assert((off & (n->align - 1)) == 0 && (len & (n->align - 1)) == 0);
}

int fmt_preadv_co(struct fmt_node *n, struct coro *co, const struct iovec *iov,
                  int iovcnt, uint64_t off)
{
    check_range(n, off, iov_size(iov, iovcnt));
    assert(!n->drv || iov_size(iov, iovcnt) <= n->drv->max_rw);
    int r = n->ops->preadv_co(n, co, iov, iovcnt, off);
    assert(r <= 0);
    return r;
}

int fmt_pwritev_co(struct fmt_node *n, struct coro *co, const struct iovec *iov,
                   int iovcnt, uint64_t off, unsigned flags)
{
    assert(!n->read_only);
    assert(!(flags & ~FMT_FUA));
    check_range(n, off, iov_size(iov, iovcnt));
    assert(!n->drv || iov_size(iov, iovcnt) <= n->drv->max_rw);
    int r = n->ops->pwritev_co(n, co, iov, iovcnt, off, flags);
    assert(r <= 0);
    /* marked even when it failed: part of it may have changed */
    fmt_bitmaps_mark(n->bitmaps, off, iov_size(iov, iovcnt));
    return r;
}

int fmt_flush_co(struct fmt_node *n, struct coro *co)
{
    if (n->read_only)
        return 0;
    return n->ops->flush_co(n, co);
}

int fmt_zero_co(struct fmt_node *n, struct coro *co, uint64_t off,
                uint64_t len, unsigned flags)
{
    assert(!n->read_only);
    assert(!(flags & ~(FMT_FUA | FMT_MAY_TRIM | FMT_FAST)));
    check_range(n, off, len);
    if ((flags & FMT_FAST) && !(n->caps & FMT_CAN_ZERO))
        return -ENOTSUP;
    int r = n->ops->zero_co(n, co, off, len, flags);
    fmt_bitmaps_mark(n->bitmaps, off, len);
    return r;
}

int fmt_discard_co(struct fmt_node *n, struct coro *co, uint64_t off,
                   uint64_t len, unsigned flags)
{
    assert(!n->read_only);
    assert(!(flags & ~FMT_FUA));
    check_range(n, off, len);
    /* a trim may change what reads return: marked whatever happens */
    fmt_bitmaps_mark(n->bitmaps, off, len);
    if (!(n->caps & FMT_CAN_TRIM))
        return 0;
    return n->ops->discard_co(n, co, off, len, flags);
}

int fmt_block_status_co(struct fmt_node *n, struct coro *co, uint64_t off,
                        uint64_t len, struct fmt_extent *ext)
{
    assert(len > 0 && off < n->size);
    if (len > n->size - off)
        len = n->size - off;
    int r = n->ops->block_status_co(n, co, off, len, ext);
    assert(r < 0 || (ext->len > 0 && ext->len <= len));
    return r;
}

int fmt_cache_co(struct fmt_node *n, struct coro *co, uint64_t off,
                 uint64_t len)
{
    check_range(n, off, len);
    if (!n->ops->cache_co)
        return 0;
    return n->ops->cache_co(n, co, off, len);
}
