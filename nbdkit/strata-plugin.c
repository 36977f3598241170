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
#include "serve.h"
#include "strata-config.h"
#include "util.h"


static char *file;
static char *format;
static char *backing_root;
static char *backing_remote;
static bool opt_readonly;
static bool opt_direct;

/* The loop and the chain; srv.root is NULL when no chain is open. */
static struct serve srv;


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
    oc->node = fmt_open_co(engine_loop(srv.eng), co, file, &oc->opts, &oc->err);
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
    int r = engine_run_sync(srv.eng, open_co, &oc);
    if (r < 0 || !oc.node) {
        nbdkit_error("%s", oc.err ? oc.err->msg : strerror(-r));
        error_free(oc.err);
        return -1;
    }
    srv.root = oc.node;
    return 0;
}

/* Does any layer sit on storage that starts threads of its own (a Ceph
 * client)?  Those must not be opened before nbdkit forks. */
static bool chain_has_threads(void)
{
    for (struct fmt_node *n = srv.root; n; n = n->backing)
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
    srv.eng = engine_new(&msg);
    if (!srv.eng) {
        nbdkit_error("strata: %s", msg ? msg : "out of memory");
        free(msg);
        return -1;
    }
    if (open_chain() < 0) {
        engine_free(srv.eng);
        srv.eng = NULL;
        return -1;
    }
    if (chain_has_threads()) {
        fmt_close(srv.root);
        srv.root = NULL;
    }
    return 0;
}

static void strata_cleanup(void);

/* The loop thread: after nbdkit's fork, so that it runs in the serving
 * process. */
static int strata_after_fork(void)
{
    if (!srv.root && open_chain() < 0)
        return -1;
    int r = engine_start(srv.eng);
    if (r < 0) {
        nbdkit_error("strata: starting the loop thread: %s", strerror(-r));
        strata_cleanup();
        return -1;
    }
    nbdkit_debug("strata: %s: %s, %" PRIu64 " bytes%s", file, srv.root->ops->name,
                 srv.root->size, srv.root->read_only ? ", read-only" : "");
    return 0;
}

static void close_co(struct coro *co, void *opaque)
{
    (void)opaque;
    /* Whatever is still volatile becomes durable; the images are closed
     * clean (qcow2: the dirty bit cleared). */
    if (!srv.root->read_only) {
        int r = fmt_flush_co(srv.root, co);
        if (r < 0)
            log_error("%s: final flush: %s", file, strerror(-r));
    }
    fmt_close_co(srv.root, engine_loop(srv.eng), co);
    srv.root = NULL;
}

/* After the last connection: the chain is closed on the loop, then the
 * loop thread is joined, and only then is the loop freed — before nbdkit
 * unloads the plugin's code. */
static void strata_cleanup(void)
{
    if (!srv.eng)
        return;
    if (srv.root) {
        if (engine_running(srv.eng))
            engine_call(srv.eng, close_co, NULL);
        else
            engine_run_sync(srv.eng, close_co, NULL);
    }
    engine_stop(srv.eng);
    engine_free(srv.eng);
    srv.eng = NULL;
}

static void *strata_open(int readonly)
{
    /* Every connection shares the one chain (nbdkit itself refuses writes
     * on a read-only connection). */
    return NBDKIT_HANDLE_NOT_NEEDED;
}

static int64_t strata_get_size(void *handle)
{
    return (int64_t)srv.root->size;
}

static int strata_can_write(void *handle)
{
    return !srv.root->read_only;
}

static int strata_can_flush(void *handle)
{
    return 1;
}

static int strata_can_trim(void *handle)
{
    return !srv.root->read_only;
}

static int strata_can_zero(void *handle)
{
    return !srv.root->read_only;
}

static int strata_can_fast_zero(void *handle)
{
    /* Advertised like stratad: a zero the format cannot do cheaply fails
     * fast with ENOTSUP (FMT_FAST) instead of writing zeros. */
    return !srv.root->read_only;
}

static int strata_can_fua(void *handle)
{
    return srv.root->read_only ? NBDKIT_FUA_NONE : NBDKIT_FUA_NATIVE;
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
    serve_block_size(&srv, minimum, preferred, maximum);
    return 0;
}

static int strata_pread(void *handle, void *buf, uint32_t count,
                        uint64_t offset, uint32_t flags)
{
    return serve_pread(&srv, buf, count, offset, NULL);
}

static int strata_pwrite(void *handle, const void *buf, uint32_t count,
                         uint64_t offset, uint32_t flags)
{
    return serve_pwrite(&srv, buf, count, offset, flags, NULL);
}

static int strata_flush(void *handle, uint32_t flags)
{
    return serve_flush(&srv, NULL);
}

static int strata_trim(void *handle, uint32_t count, uint64_t offset,
                       uint32_t flags)
{
    return serve_trim(&srv, count, offset, flags, NULL);
}

static int strata_zero(void *handle, uint32_t count, uint64_t offset,
                       uint32_t flags)
{
    return serve_zero(&srv, count, offset, flags, NULL);
}

static int strata_cache(void *handle, uint32_t count, uint64_t offset,
                        uint32_t flags)
{
    return serve_cache(&srv, count, offset, NULL);
}

static int strata_extents(void *handle, uint32_t count, uint64_t offset,
                          uint32_t flags, struct nbdkit_extents *extents)
{
    return serve_extents(&srv, count, offset, flags, extents, NULL);
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

/* The entry point the macro defines (declared for -Wmissing-prototypes,
 * which clang applies to macros from system headers too). */
struct nbdkit_plugin *plugin_init(void);
NBDKIT_REGISTER_PLUGIN(plugin)
