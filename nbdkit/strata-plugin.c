/* nbdkit strata — strata's formats and backends as an nbdkit plugin.
 *
 *   nbdkit strata file=top.qcow2 [format=qcow2|raw] [backing-root=DIR]
 *                 [backing-remote=PREFIX[SETTINGS]] [readonly=BOOL]
 *                 [cache=writeback|none]
 *
 * One chain, opened once (after nbdkit's fork), served to every connection
 * by one strata loop on a thread of its own (engine.h); nbdkit's worker
 * threads hand each request to it.  The capabilities are those stratad
 * advertises for the same chain, so a client sees the same disk from
 * either server.
 */
#define NBDKIT_API_VERSION 2
#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <nbdkit-plugin.h>

#include "engine.h"
#include "format.h"
#include "log.h"
#include "strata-config.h"
#include "util.h"

/* Largest block the plugin advertises (and stratad's NBD payload limit);
 * nbdkit may pass larger requests, which are split. */
#define PLUGIN_MAX_BLOCK (UINT32_C(32) << 20)
/* Extents gathered per NBD_CMD_BLOCK_STATUS (stratad's limit). */
#define PLUGIN_MAX_EXTENTS 1024

static char *file;
static char *format;
static char *backing_root;
static char *backing_remote;
static bool opt_readonly;
static bool opt_direct;

static struct engine *eng;
static struct fmt_node *root;

static void strata_unload(void)
{
    free(file);
    free(format);
    free(backing_root);
    free(backing_remote);
    file = format = backing_root = backing_remote = NULL;
    /* the tests' proof that the unload path ran to its end */
    nbdkit_debug("strata: unloaded");
}

static int strata_config(const char *key, const char *value)
{
    char **str = NULL;
    if (strcmp(key, "file") == 0) {
        /* a path, or a remote spec (rbd:...) taken as is */
        free(file);
        file = backend_spec_is_remote(value) ? strdup(value)
                                             : nbdkit_realpath(value);
        if (!file) {
            if (errno == ENOMEM)
                nbdkit_error("out of memory");
            return -1;
        }
        return 0;
    }
    if (strcmp(key, "format") == 0) {
        if (!fmt_find_driver(value)) {
            nbdkit_error("format=%s: unknown format (known: %s)", value,
                         fmt_driver_names());
            return -1;
        }
        str = &format;
    } else if (strcmp(key, "backing-root") == 0) {
        free(backing_root);
        backing_root = nbdkit_realpath(value);
        return backing_root ? 0 : -1;
    } else if (strcmp(key, "backing-remote") == 0) {
        struct error *err = NULL;
        if (backend_check_backing_remote(value, &err) < 0) {
            nbdkit_error("backing-remote=%s: %s", value, err->msg);
            error_free(err);
            return -1;
        }
        str = &backing_remote;
    } else if (strcmp(key, "readonly") == 0) {
        int r = nbdkit_parse_bool(value);
        if (r < 0)
            return -1;
        opt_readonly = r;
        return 0;
    } else if (strcmp(key, "cache") == 0) {
        if (strcmp(value, "writeback") == 0) {
            opt_direct = false;
        } else if (strcmp(value, "none") == 0) {
            opt_direct = true;
        } else {
            nbdkit_error("cache=%s: expected writeback or none", value);
            return -1;
        }
        return 0;
    } else {
        nbdkit_error("unknown parameter '%s'", key);
        return -1;
    }
    free(*str);
    *str = strdup(value);
    if (!*str) {
        nbdkit_error("out of memory");
        return -1;
    }
    return 0;
}

static int strata_config_complete(void)
{
    if (!file) {
        nbdkit_error("file parameter is required");
        return -1;
    }
    struct error *err = NULL;
    if (backend_validate_spec(file, &err) < 0) {
        nbdkit_error("file=%s: %s", file, err->msg);
        error_free(err);
        return -1;
    }
    return 0;
}

#define strata_config_help \
    "file=<SPEC>         (required) Top image: a path, or rbd:POOL/IMAGE...\n" \
    "format=qcow2|raw    Format of the top image (default: probed).\n" \
    "backing-root=<DIR>  Local backing files must lie beneath DIR\n" \
    "                    (default: the top image's directory).\n" \
    "backing-remote=<PREFIX[SETTINGS]>\n" \
    "                    Remote storage that backing names may lead to.\n" \
    "readonly=true       Open the whole chain read-only.\n" \
    "cache=writeback|none  Host page cache (default) or direct I/O."

struct open_call {
    struct fmt_open_opts opts;
    struct fmt_node *node;
    struct error *err;
};

static void open_co(struct coro *co, void *opaque)
{
    struct open_call *oc = opaque;
    oc->node = fmt_open_co(engine_loop(eng), co, file, &oc->opts, &oc->err);
}

static int open_chain(void)
{
    struct open_call oc = {
        .opts = {
            .format = format,
            .read_only = opt_readonly,
            .direct = opt_direct,
            .backing_root = backing_root,
            .backing_remote = backing_remote,
        },
    };
    int r = engine_run_sync(eng, open_co, &oc);
    if (r < 0 || !oc.node) {
        nbdkit_error("%s", oc.err ? oc.err->msg : strerror(-r));
        error_free(oc.err);
        return -1;
    }
    root = oc.node;
    return 0;
}

/* Does any layer sit on storage that starts threads of its own (a Ceph
 * client)?  Those must not be opened before nbdkit forks. */
static bool chain_has_threads(void)
{
    for (struct fmt_node *n = root; n; n = n->backing)
        if (n->file && backend_needs_offload(n->file))
            return true;
    return false;
}

/* The chain is opened before nbdkit forks, so that a chain that cannot be
 * opened (a missing backing file, a format to name) stops nbdkit's start
 * with the error.  A chain with layers whose client library runs threads
 * is closed again here and reopened after the fork. */
static int strata_get_ready(void)
{
    if (log_get_level() > LOG_WARN)
        log_set_level(LOG_WARN);
    char *msg = NULL;
    eng = engine_new(&msg);
    if (!eng) {
        nbdkit_error("strata: %s", msg ? msg : "out of memory");
        free(msg);
        return -1;
    }
    if (open_chain() < 0)
        return -1;
    if (chain_has_threads()) {
        fmt_close(root);
        root = NULL;
    }
    return 0;
}

/* The loop thread: after nbdkit's fork, so that it runs in the serving
 * process. */
static int strata_after_fork(void)
{
    if (!root && open_chain() < 0)
        return -1;
    int r = engine_start(eng);
    if (r < 0) {
        nbdkit_error("strata: starting the loop thread: %s", strerror(-r));
        return -1;
    }
    nbdkit_debug("strata: %s: %s, %" PRIu64 " bytes%s", file, root->ops->name,
                 root->size, root->read_only ? ", read-only" : "");
    return 0;
}

static void close_co(struct coro *co, void *opaque)
{
    (void)opaque;
    /* Whatever is still volatile becomes durable; the images are closed
     * clean (qcow2: the dirty bit cleared). */
    if (!root->read_only) {
        int r = fmt_flush_co(root, co);
        if (r < 0)
            log_error("%s: final flush: %s", file, strerror(-r));
    }
    fmt_close_co(root, engine_loop(eng), co);
    root = NULL;
}

/* After the last connection: the chain is closed on the loop, then the
 * loop thread is joined, and only then is the loop freed — before nbdkit
 * unloads the plugin's code. */
static void strata_cleanup(void)
{
    if (!eng)
        return;
    if (root) {
        if (engine_running(eng))
            engine_call(eng, close_co, NULL);
        else
            engine_run_sync(eng, close_co, NULL);
    }
    engine_stop(eng);
    engine_free(eng);
    eng = NULL;
}

static void *strata_open(int readonly)
{
    /* Every connection shares the one chain; the handle says whether this
     * one may write. */
    return readonly ? (void *)2 : (void *)1;
}

static int64_t strata_get_size(void *handle)
{
    return (int64_t)root->size;
}

static int strata_can_write(void *handle)
{
    return !root->read_only;
}

static int strata_can_flush(void *handle)
{
    return 1;
}

static int strata_can_trim(void *handle)
{
    return !root->read_only;
}

static int strata_can_zero(void *handle)
{
    return !root->read_only;
}

static int strata_can_fast_zero(void *handle)
{
    /* Advertised like stratad: a zero the format cannot do cheaply fails
     * fast with ENOTSUP (FMT_FAST) instead of writing zeros. */
    return !root->read_only;
}

static int strata_can_fua(void *handle)
{
    return root->read_only ? NBDKIT_FUA_NONE : NBDKIT_FUA_NATIVE;
}

static int strata_can_multi_conn(void *handle)
{
    /* One node and one backend for every connection: a flush on any of
     * them covers writes acknowledged on all of them. */
    return 1;
}

static int strata_can_extents(void *handle)
{
    return 1;
}

static int strata_can_cache(void *handle)
{
    return NBDKIT_CACHE_NATIVE;
}

static int strata_is_rotational(void *handle)
{
    return 0;
}

static int strata_block_size(void *handle, uint32_t *minimum,
                             uint32_t *preferred, uint32_t *maximum)
{
    *minimum = root->align;
    *preferred = MAX(root->align, 4096u);
    *maximum = PLUGIN_MAX_BLOCK;
    return 0;
}

/* ---- the data path: one call per request, run on the loop ---- */

enum op_kind { OP_READ, OP_WRITE, OP_FLUSH, OP_TRIM, OP_ZERO, OP_CACHE,
               OP_EXTENTS };

struct op {
    enum op_kind kind;
    void *buf;
    uint64_t count, offset;
    unsigned flags;            /* FMT_* */
    int ret;
    /* OP_EXTENTS */
    struct fmt_extent *ext;
    unsigned max_ext, n_ext;
};

static void op_co(struct coro *co, void *opaque)
{
    struct op *o = opaque;
    struct fmt_node *n = root;
    int r = 0;
    switch (o->kind) {
    case OP_READ:
    case OP_WRITE: {
        /* in pieces of at most FMT_MAX_RW bytes */
        uint64_t done = 0;
        while (r == 0 && done < o->count) {
            uint64_t len = MIN(o->count - done, FMT_MAX_RW);
            struct iovec iov = {(char *)o->buf + done, (size_t)len};
            r = o->kind == OP_READ
                    ? fmt_preadv_co(n, co, &iov, 1, o->offset + done)
                    : fmt_pwritev_co(n, co, &iov, 1, o->offset + done,
                                     o->flags);
            done += len;
        }
        break;
    }
    case OP_FLUSH:
        r = fmt_flush_co(n, co);
        break;
    case OP_TRIM:
        r = fmt_discard_co(n, co, o->offset, o->count, 0);
        if (r == 0 && (o->flags & FMT_FUA))
            r = fmt_flush_co(n, co);
        break;
    case OP_ZERO:
        r = fmt_zero_co(n, co, o->offset, o->count, o->flags);
        break;
    case OP_CACHE:
        r = fmt_cache_co(n, co, o->offset, o->count);
        break;
    case OP_EXTENTS: {
        uint64_t pos = o->offset, end = o->offset + o->count;
        while (r == 0 && pos < end && o->n_ext < o->max_ext) {
            r = fmt_block_status_co(n, co, pos, end - pos, &o->ext[o->n_ext]);
            if (r == 0)
                pos += o->ext[o->n_ext++].len;
        }
        break;
    }
    }
    o->ret = r;
}

/* Checks what the format's contract requires and nbdkit does not (the
 * alignment advertised in block_size), runs the op, sets nbdkit's error. */
static int run(struct op *o, bool aligned_only)
{
    uint64_t a = root->align;
    if (aligned_only && a > 1 && ((o->offset | o->count) & (a - 1))) {
        nbdkit_error("request %" PRIu64 "+%" PRIu64 " is not aligned to "
                     "%" PRIu64 " bytes (the advertised minimum block size)",
                     o->offset, o->count, a);
        nbdkit_set_error(EINVAL);
        return -1;
    }
    if (o->count == 0 && o->kind != OP_FLUSH)
        return 0;
    engine_call(eng, op_co, o);
    if (o->ret < 0) {
        /* FAST_ZERO's ENOTSUP is an answer, not a failure worth a message */
        if (!(o->kind == OP_ZERO && o->ret == -ENOTSUP))
            nbdkit_debug("strata: %s", strerror(-o->ret));
        nbdkit_set_error(-o->ret);
        return -1;
    }
    return 0;
}

static unsigned fmt_flags(uint32_t flags)
{
    return ((flags & NBDKIT_FLAG_FUA) ? FMT_FUA : 0) |
           ((flags & NBDKIT_FLAG_MAY_TRIM) ? FMT_MAY_TRIM : 0) |
           ((flags & NBDKIT_FLAG_FAST_ZERO) ? FMT_FAST : 0);
}

static int strata_pread(void *handle, void *buf, uint32_t count,
                        uint64_t offset, uint32_t flags)
{
    struct op o = {.kind = OP_READ, .buf = buf, .count = count,
                   .offset = offset};
    return run(&o, true);
}

static int strata_pwrite(void *handle, const void *buf, uint32_t count,
                         uint64_t offset, uint32_t flags)
{
    struct op o = {.kind = OP_WRITE, .buf = (void *)buf, .count = count,
                   .offset = offset, .flags = fmt_flags(flags) & FMT_FUA};
    return run(&o, true);
}

static int strata_flush(void *handle, uint32_t flags)
{
    struct op o = {.kind = OP_FLUSH};
    return run(&o, false);
}

static int strata_trim(void *handle, uint32_t count, uint64_t offset,
                       uint32_t flags)
{
    struct op o = {.kind = OP_TRIM, .count = count, .offset = offset,
                   .flags = fmt_flags(flags) & FMT_FUA};
    return run(&o, true);
}

static int strata_zero(void *handle, uint32_t count, uint64_t offset,
                       uint32_t flags)
{
    struct op o = {.kind = OP_ZERO, .count = count, .offset = offset,
                   .flags = fmt_flags(flags)};
    return run(&o, true);
}

static int strata_cache(void *handle, uint32_t count, uint64_t offset,
                        uint32_t flags)
{
    struct op o = {.kind = OP_CACHE, .count = count, .offset = offset};
    if (offset >= root->size)
        return 0;
    o.count = MIN(o.count, root->size - offset);
    return run(&o, false);
}

static int strata_extents(void *handle, uint32_t count, uint64_t offset,
                          uint32_t flags, struct nbdkit_extents *extents)
{
    unsigned max = (flags & NBDKIT_FLAG_REQ_ONE) ? 1 : PLUGIN_MAX_EXTENTS;
    struct fmt_extent *ext = malloc(sizeof(*ext) * max);
    if (!ext) {
        nbdkit_error("out of memory");
        nbdkit_set_error(ENOMEM);
        return -1;
    }
    struct op o = {.kind = OP_EXTENTS, .count = count, .offset = offset,
                   .ext = ext, .max_ext = max};
    int r = run(&o, false);
    uint64_t pos = offset;
    for (unsigned i = 0; r == 0 && i < o.n_ext; i++) {
        uint32_t type = ((ext[i].flags & FMT_EXT_HOLE) ? NBDKIT_EXTENT_HOLE : 0) |
                        ((ext[i].flags & FMT_EXT_ZERO) ? NBDKIT_EXTENT_ZERO : 0);
        r = nbdkit_add_extent(extents, pos, ext[i].len, type);
        pos += ext[i].len;
    }
    free(ext);
    return r;
}

static void strata_dump_plugin(void)
{
    printf("strata_version=%s\n", STRATA_VERSION);
    printf("strata_formats=%s\n", fmt_driver_names());
    printf("strata_backends=%s\n", backend_driver_names());
}

static struct nbdkit_plugin plugin = {
    .name = "strata",
    .longname = "strata: read-write qcow2 chains on io_uring",
    .version = STRATA_VERSION,
    .description = "serves a qcow2 or raw image and its backing chain "
                   "through strata's formats and backends",
    .unload = strata_unload,
    .config = strata_config,
    .config_complete = strata_config_complete,
    .config_help = strata_config_help,
    .magic_config_key = "file",
    .get_ready = strata_get_ready,
    .after_fork = strata_after_fork,
    .cleanup = strata_cleanup,
    .dump_plugin = strata_dump_plugin,
    .open = strata_open,
    .get_size = strata_get_size,
    .block_size = strata_block_size,
    .can_write = strata_can_write,
    .can_flush = strata_can_flush,
    .can_trim = strata_can_trim,
    .can_zero = strata_can_zero,
    .can_fast_zero = strata_can_fast_zero,
    .can_fua = strata_can_fua,
    .can_multi_conn = strata_can_multi_conn,
    .can_extents = strata_can_extents,
    .can_cache = strata_can_cache,
    .is_rotational = strata_is_rotational,
    .pread = strata_pread,
    .pwrite = strata_pwrite,
    .flush = strata_flush,
    .trim = strata_trim,
    .zero = strata_zero,
    .cache = strata_cache,
    .extents = strata_extents,
    .errno_is_preserved = 0,
};

NBDKIT_REGISTER_PLUGIN(plugin)
