/* nbdkit --filter=strata-qcow2 — strata's qcow2 driver over the disk of
 * the plugin beneath it.
 *
 *   nbdkit --filter=strata-qcow2 PLUGIN ... [create=on create-size=SIZE]
 *          [cache-size=BYTES]
 *
 * (size= belongs to plugins such as memory, so the filter's keys say
 * create-size.)
 *
 * The plugin's disk holds a qcow2 image; the filter serves the image's
 * guest disk, read-write.  One qcow2 node for every connection, on one
 * strata loop thread (engine.h), over a backend that calls the plugin
 * through a context of its own (nbdkit_next_context_open), not tied to any
 * client connection.  The plugin's disk cannot grow: an image that needs
 * more room than it has fails the write with ENOSPC.
 */
#define NBDKIT_API_VERSION 2

#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <nbdkit-filter.h>

#include "backend.h"
#include "engine.h"
#include "format.h"
#include "log.h"
#include "serve.h"
#include "strata-config.h"
#include "util.h"

/* Bytes of the plugin's disk in one call (nbdkit's calls take 32 bits). */
#define NEXT_MAX_CALL (UINT32_C(1) << 30)

static bool opt_create;
static int64_t opt_size = -1;
static uint64_t opt_cache_size;

static struct serve srv;
static nbdkit_next *lower;        /* the plugin, opened for the filter */
static bool lower_prepared;

/* ---- a strata backend over the plugin beneath ----
 *
 * Each call into the plugin is made from the loop thread and returns when
 * the plugin has answered: the plugin's own threads do not run it, so the
 * loop waits that long.  For plugins that serve from memory or the page
 * cache (memory, file) that is a memcpy or a pread. */

struct next_backend {
    struct backend b;
    nbdkit_next *next;
    bool can_flush, can_zero, can_trim, can_fua;
};

static int nb_preadv_co(struct backend *b, struct coro *co,
                        const struct iovec *iov, int iovcnt, uint64_t off)
{
    struct next_backend *nb = container_of(b, struct next_backend, b);
    for (int i = 0; i < iovcnt; i++) {
        char *p = iov[i].iov_base;
        uint64_t len = iov[i].iov_len;
        while (len > 0) {
            uint64_t n = MIN(len, (uint64_t)NEXT_MAX_CALL);
            if (off >= b->size) {
                memset(p, 0, len);         /* past the end: zeros */
                n = len;
            } else {
                n = MIN(n, b->size - off);
                int err = 0;
                if (nb->next->pread(nb->next, p, (uint32_t)n, off, 0, &err) < 0)
                    return -(err ? err : EIO);
            }
            p += n;
            off += n;
            len -= n;
        }
    }
    return 0;
}

static int nb_pwritev_co(struct backend *b, struct coro *co,
                         const struct iovec *iov, int iovcnt, uint64_t off,
                         unsigned flags)
{
    struct next_backend *nb = container_of(b, struct next_backend, b);
    uint64_t total = iov_size(iov, iovcnt);
    if (off > b->size || total > b->size - off)
        return -ENOSPC;              /* the plugin's disk cannot grow */
    uint32_t f = (flags & BACKEND_FUA) && nb->can_fua ? NBDKIT_FLAG_FUA : 0;
    for (int i = 0; i < iovcnt; i++) {
        const char *p = iov[i].iov_base;
        uint64_t len = iov[i].iov_len;
        while (len > 0) {
            uint64_t n = MIN(len, (uint64_t)NEXT_MAX_CALL);
            int err = 0;
            if (nb->next->pwrite(nb->next, p, (uint32_t)n, off, f, &err) < 0)
                return -(err ? err : EIO);
            p += n;
            off += n;
            len -= n;
        }
    }
    if ((flags & BACKEND_FUA) && !nb->can_fua && nb->can_flush) {
        int err = 0;
        if (nb->next->flush(nb->next, 0, &err) < 0)
            return -(err ? err : EIO);
    }
    return 0;
}

static int nb_flush_co(struct backend *b, struct coro *co)
{
    struct next_backend *nb = container_of(b, struct next_backend, b);
    if (!nb->can_flush)
        return 0;
    int err = 0;
    if (nb->next->flush(nb->next, 0, &err) < 0)
        return -(err ? err : EIO);
    return 0;
}

static int nb_zero_co(struct backend *b, struct coro *co, uint64_t off,
                      uint64_t len, unsigned flags)
{
    struct next_backend *nb = container_of(b, struct next_backend, b);
    if (off > b->size || len > b->size - off)
        return -ENOSPC;
    if (!nb->can_zero)
        return -ENOTSUP;
    uint32_t f = ((flags & BACKEND_MAY_TRIM) ? NBDKIT_FLAG_MAY_TRIM : 0) |
                 ((flags & BACKEND_FAST) ? NBDKIT_FLAG_FAST_ZERO : 0) |
                 ((flags & BACKEND_FUA) && nb->can_fua ? NBDKIT_FLAG_FUA : 0);
    while (len > 0) {
        uint64_t n = MIN(len, (uint64_t)NEXT_MAX_CALL);
        int err = 0;
        if (nb->next->zero(nb->next, (uint32_t)n, off, f, &err) < 0)
            return -(err ? err : EIO);
        off += n;
        len -= n;
    }
    return 0;
}

static int nb_discard_co(struct backend *b, struct coro *co, uint64_t off,
                         uint64_t len, unsigned flags)
{
    struct next_backend *nb = container_of(b, struct next_backend, b);
    if (!nb->can_trim || off >= b->size)
        return 0;
    len = MIN(len, b->size - off);
    while (len > 0) {
        uint64_t n = MIN(len, (uint64_t)NEXT_MAX_CALL);
        int err = 0;
        if (nb->next->trim(nb->next, (uint32_t)n, off, 0, &err) < 0)
            return -(err ? err : EIO);
        off += n;
        len -= n;
    }
    return 0;
}

static int nb_block_status_co(struct backend *b, struct coro *co,
                              uint64_t off, uint64_t len, uint64_t *pnum,
                              unsigned *status)
{
    *pnum = len;
    *status = BACKEND_STATUS_DATA;
    return 0;
}

static int nb_truncate_co(struct backend *b, struct coro *co, uint64_t size)
{
    return -ENOTSUP;
}

static int nb_cache_co(struct backend *b, struct coro *co, uint64_t off,
                       uint64_t len)
{
    return 0;
}

static void nb_close(struct backend *b)
{
    struct next_backend *nb = container_of(b, struct next_backend, b);
    free(b->name);
    free(nb);
}

static const struct backend_ops next_backend_ops = {
    .name = "nbdkit-next",
    .preadv_co = nb_preadv_co,
    .pwritev_co = nb_pwritev_co,
    .flush_co = nb_flush_co,
    .zero_co = nb_zero_co,
    .discard_co = nb_discard_co,
    .block_status_co = nb_block_status_co,
    .truncate_co = nb_truncate_co,
    .cache_co = nb_cache_co,
    .close = nb_close,
};

static struct backend *next_backend_new(struct loop *loop, nbdkit_next *next,
                                        struct error **errp)
{
    struct next_backend *nb = calloc(1, sizeof(*nb));
    int64_t size = next->get_size(next);
    if (!nb || size < 0) {
        free(nb);
        error_setf(errp, size < 0 ? EIO : ENOMEM, "%s",
                   size < 0 ? "the plugin's disk has no size"
                            : "out of memory");
        return NULL;
    }
    nb->next = next;
    nb->b.ops = &next_backend_ops;
    nb->b.loop = loop;
    nb->b.name = strdup("the plugin's disk");
    nb->b.size = (uint64_t)size;
    nb->b.align = 1;
    nb->b.read_only = next->can_write(next) != 1;
    nb->can_flush = next->can_flush(next) == 1;
    nb->can_zero = next->can_zero(next) > NBDKIT_ZERO_NONE;
    nb->can_trim = next->can_trim(next) == 1;
    nb->can_fua = next->can_fua(next) == NBDKIT_FUA_NATIVE;
    /* efficient only when the plugin zeroes natively (not by nbdkit
     * writing zeros for it) */
    nb->b.caps = (next->can_zero(next) == NBDKIT_ZERO_NATIVE
                      ? BACKEND_CAN_ZERO : 0) |
                 (nb->can_trim ? BACKEND_CAN_TRIM : 0);
    if (!nb->b.name) {
        free(nb);
        error_setf(errp, ENOMEM, "out of memory");
        return NULL;
    }
    return &nb->b;
}

/* ---- configuration and life cycle ---- */

static int strata_qcow2_config(nbdkit_next_config *next, nbdkit_backend *nxdata,
                               const char *key, const char *value)
{
    if (strcmp(key, "create") == 0) {
        int r = nbdkit_parse_bool(value);
        if (r < 0)
            return -1;
        opt_create = r;
        return 0;
    }
    if (strcmp(key, "create-size") == 0) {
        opt_size = nbdkit_parse_size(value);
        return opt_size < 0 ? -1 : 0;
    }
    if (strcmp(key, "cache-size") == 0) {
        int64_t v = nbdkit_parse_size(value);
        if (v < 0)
            return -1;
        opt_cache_size = (uint64_t)v;
        return 0;
    }
    return next(nxdata, key, value);
}

static int strata_qcow2_config_complete(nbdkit_next_config_complete *next,
                                        nbdkit_backend *nxdata)
{
    if (opt_create && opt_size <= 0) {
        nbdkit_error("create=on needs create-size=SIZE (the guest disk's size)");
        return -1;
    }
    if (!opt_create && opt_size >= 0) {
        nbdkit_error("create-size= is only for create=on");
        return -1;
    }
    return next(nxdata);
}

#define strata_qcow2_config_help \
    "create=on           Format the plugin's disk as a new image if it is\n" \
    "                    blank (its first 512 bytes are zeros).\n" \
    "create-size=<SIZE>  The new image's guest disk size (create=on).\n" \
    "cache-size=<BYTES>  qcow2 L2 table cache (default 4M)."

struct open_call {
    struct backend *file;
    struct fmt_node *node;
    struct error *err;
};

static bool blank(const uint8_t *buf, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (buf[i])
            return false;
    return true;
}

static void open_co(struct coro *co, void *opaque)
{
    struct open_call *oc = opaque;
    struct loop *loop = engine_loop(srv.eng);
    if (oc->file->size >= FMT_PROBE_BYTES || opt_create) {
        uint8_t probe[FMT_PROBE_BYTES];
        if (oc->file->size < FMT_PROBE_BYTES) {
            memset(probe, 0, sizeof(probe));
        } else if (backend_pread_co(oc->file, co, probe, sizeof(probe), 0) < 0) {
            error_setf(&oc->err, EIO, "reading the plugin's disk failed");
            return;
        }
        if (opt_create && blank(probe, sizeof(probe))) {
            if (oc->file->read_only) {
                error_setf(&oc->err, EROFS, "create=on: the plugin's disk "
                           "is read-only");
                return;
            }
            if (qcow2_format_backend_co(oc->file, co, (uint64_t)opt_size,
                                        &oc->err) < 0)
                return;
        }
    }
    const struct fmt_driver *drv = fmt_find_driver("qcow2");
    struct fmt_open_opts opts = {
        .format = "qcow2",
        .read_only = oc->file->read_only,
        .l2_cache_bytes = opt_cache_size,
    };
    oc->node = drv->open_co(loop, co, oc->file, &opts, &oc->err);
    if (!oc->node)
        return;
    oc->node->drv = drv;
    oc->node->filename = strdup(oc->file->name);
    if (!oc->node->filename) {
        fmt_close(oc->node);
        oc->node = NULL;
        error_setf(&oc->err, ENOMEM, "out of memory");
        return;
    }
    if (fmt_backing_name(oc->node)) {
        error_setf(&oc->err, ENOTSUP, "the image has a backing file (%s); "
                   "the strata-qcow2 filter serves single images",
                   fmt_backing_name(oc->node));
        fmt_close(oc->node);
        oc->node = NULL;
    }
}

static void filter_teardown(void)
{
    if (srv.eng) {
        engine_stop(srv.eng);
        engine_free(srv.eng);
        srv.eng = NULL;
    }
    if (lower) {
        if (lower_prepared)
            lower->finalize(lower);
        nbdkit_next_context_close(lower);
        lower = NULL;
        lower_prepared = false;
    }
}

/* After nbdkit's fork (the loop thread, and any thread the plugin starts
 * in its own after_fork, live in the serving process): the plugin's disk
 * opened for the filter, the image opened (formatted first if asked and
 * blank), the loop thread started. */
static int strata_qcow2_after_fork(nbdkit_backend *backend)
{
    if (log_get_level() > LOG_WARN)
        log_set_level(LOG_WARN);
    char *msg = NULL;
    srv.eng = engine_new(&msg);
    if (!srv.eng) {
        nbdkit_error("strata-qcow2: %s", msg ? msg : "out of memory");
        free(msg);
        return -1;
    }
    lower = nbdkit_next_context_open(backend, 0, "", 1);
    if (!lower) {
        nbdkit_error("strata-qcow2: cannot open the plugin's disk");
        filter_teardown();
        return -1;
    }
    if (lower->prepare(lower) < 0) {
        filter_teardown();
        return -1;
    }
    lower_prepared = true;
    struct error *err = NULL;
    struct open_call oc = {.file = next_backend_new(engine_loop(srv.eng),
                                                    lower, &err)};
    if (!oc.file) {
        nbdkit_error("strata-qcow2: %s", err->msg);
        error_free(err);
        filter_teardown();
        return -1;
    }
    int r = engine_run_sync(srv.eng, open_co, &oc);
    if (r < 0 || !oc.node) {
        nbdkit_error("strata-qcow2: %s", oc.err ? oc.err->msg : strerror(-r));
        error_free(oc.err);
        backend_close(oc.file);
        filter_teardown();
        return -1;
    }
    srv.root = oc.node;
    r = engine_start(srv.eng);
    if (r < 0) {
        nbdkit_error("strata-qcow2: starting the loop thread: %s",
                     strerror(-r));
        fmt_close(srv.root);
        srv.root = NULL;
        filter_teardown();
        return -1;
    }
    nbdkit_debug("strata-qcow2: %" PRIu64 " bytes of guest disk%s",
                 srv.root->size, srv.root->read_only ? ", read-only" : "");
    return 0;
}

static void close_co(struct coro *co, void *opaque)
{
    if (!srv.root->read_only) {
        int r = fmt_flush_co(srv.root, co);
        if (r < 0)
            log_error("strata-qcow2: final flush: %s", strerror(-r));
    }
    fmt_close_co(srv.root, engine_loop(srv.eng), co);
    srv.root = NULL;
}

/* After the last connection: the image is flushed and closed on the
 * loop, the loop thread joined, then the plugin's context finalized and
 * closed — all before nbdkit unloads the plugin and the filter. */
static void strata_qcow2_cleanup(nbdkit_backend *backend)
{
    if (srv.root && srv.eng)
        engine_call(srv.eng, close_co, NULL);
    filter_teardown();
}

static void strata_qcow2_unload(void)
{
    nbdkit_debug("strata: unloaded");
}

static void *strata_qcow2_open(nbdkit_next_open *next, nbdkit_context *context,
                               int readonly, const char *exportname,
                               int is_tls)
{
    if (next(context, readonly, exportname) == -1)
        return NULL;
    return NBDKIT_HANDLE_NOT_NEEDED;
}

static int64_t strata_qcow2_get_size(nbdkit_next *next, void *handle)
{
    return (int64_t)srv.root->size;
}

static int strata_qcow2_block_size(nbdkit_next *next, void *handle,
                                   uint32_t *minimum, uint32_t *preferred,
                                   uint32_t *maximum)
{
    serve_block_size(&srv, minimum, preferred, maximum);
    return 0;
}

static int strata_qcow2_can_write(nbdkit_next *next, void *handle)
{
    return !srv.root->read_only;
}

static int strata_qcow2_can_flush(nbdkit_next *next, void *handle)
{
    return 1;
}

static int strata_qcow2_is_rotational(nbdkit_next *next, void *handle)
{
    return 0;
}

static int strata_qcow2_can_trim(nbdkit_next *next, void *handle)
{
    return !srv.root->read_only;
}

static int strata_qcow2_can_zero(nbdkit_next *next, void *handle)
{
    return srv.root->read_only ? NBDKIT_ZERO_NONE : NBDKIT_ZERO_NATIVE;
}

static int strata_qcow2_can_fast_zero(nbdkit_next *next, void *handle)
{
    return !srv.root->read_only;
}

static int strata_qcow2_can_extents(nbdkit_next *next, void *handle)
{
    return 1;
}

static int strata_qcow2_can_fua(nbdkit_next *next, void *handle)
{
    return srv.root->read_only ? NBDKIT_FUA_NONE : NBDKIT_FUA_NATIVE;
}

static int strata_qcow2_can_multi_conn(nbdkit_next *next, void *handle)
{
    return 1;
}

static int strata_qcow2_can_cache(nbdkit_next *next, void *handle)
{
    return NBDKIT_CACHE_NATIVE;
}

static int strata_qcow2_pread(nbdkit_next *next, void *handle, void *buf,
                              uint32_t count, uint64_t offset, uint32_t flags,
                              int *err)
{
    return serve_pread(&srv, buf, count, offset, err);
}

static int strata_qcow2_pwrite(nbdkit_next *next, void *handle,
                               const void *buf, uint32_t count,
                               uint64_t offset, uint32_t flags, int *err)
{
    return serve_pwrite(&srv, buf, count, offset, flags, err);
}

static int strata_qcow2_flush(nbdkit_next *next, void *handle, uint32_t flags,
                              int *err)
{
    return serve_flush(&srv, err);
}

static int strata_qcow2_trim(nbdkit_next *next, void *handle, uint32_t count,
                             uint64_t offset, uint32_t flags, int *err)
{
    return serve_trim(&srv, count, offset, flags, err);
}

static int strata_qcow2_zero(nbdkit_next *next, void *handle, uint32_t count,
                             uint64_t offset, uint32_t flags, int *err)
{
    return serve_zero(&srv, count, offset, flags, err);
}

static int strata_qcow2_extents(nbdkit_next *next, void *handle,
                                uint32_t count, uint64_t offset,
                                uint32_t flags, struct nbdkit_extents *extents,
                                int *err)
{
    return serve_extents(&srv, count, offset, flags, extents, err);
}

static int strata_qcow2_cache(nbdkit_next *next, void *handle, uint32_t count,
                              uint64_t offset, uint32_t flags, int *err)
{
    return serve_cache(&srv, count, offset, err);
}

static struct nbdkit_filter filter = {
    .name = "strata-qcow2",
    .longname = "strata: read-write qcow2 over any plugin's disk",
    .unload = strata_qcow2_unload,
    .config = strata_qcow2_config,
    .config_complete = strata_qcow2_config_complete,
    .config_help = strata_qcow2_config_help,
    .after_fork = strata_qcow2_after_fork,
    .cleanup = strata_qcow2_cleanup,
    .open = strata_qcow2_open,
    .get_size = strata_qcow2_get_size,
    .block_size = strata_qcow2_block_size,
    .can_write = strata_qcow2_can_write,
    .can_flush = strata_qcow2_can_flush,
    .is_rotational = strata_qcow2_is_rotational,
    .can_trim = strata_qcow2_can_trim,
    .can_zero = strata_qcow2_can_zero,
    .can_fast_zero = strata_qcow2_can_fast_zero,
    .can_extents = strata_qcow2_can_extents,
    .can_fua = strata_qcow2_can_fua,
    .can_multi_conn = strata_qcow2_can_multi_conn,
    .can_cache = strata_qcow2_can_cache,
    .pread = strata_qcow2_pread,
    .pwrite = strata_qcow2_pwrite,
    .flush = strata_qcow2_flush,
    .trim = strata_qcow2_trim,
    .zero = strata_qcow2_zero,
    .extents = strata_qcow2_extents,
    .cache = strata_qcow2_cache,
};

/* The entry point the macro defines (declared for -Wmissing-prototypes,
 * which clang applies to macros from system headers too). */
struct nbdkit_filter *filter_init(void);
NBDKIT_REGISTER_FILTER(filter)
