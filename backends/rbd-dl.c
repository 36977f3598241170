/* strata — librbd and librados loaded with dlopen on first use.
 *
 * Linking librbd costs every stratad some 18 MiB of memory (its static
 * initialisers and its dependency tree run at start-up), even one that
 * never serves an rbd: export.  So stratad links neither library: this
 * file defines each librbd and librados function that rbd.c calls, under
 * the library's own name, as a forwarder through a pointer that
 * rbd_dl_load() takes from dlsym.  rbd.c calls librbd as if it were linked.
 * The real headers are included, so the compiler checks every definition
 * against the library's prototype, and each pointer has the type of the
 * function it stands for.
 *
 * RBD_DL_FUNCS names each function once; everything else here is made
 * from it.  A function rbd.c starts to call must be added there (the link
 * fails until it is).  The forwarders are not exported from the
 * executable (nothing at link time asks for them), so librbd never binds
 * to them instead of librados's own functions.
 */
#include <assert.h>
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <string.h>

#include <rados/librados.h>
#include <rbd/librbd.h>

#include "rbd-dl.h"

/* The loading thread's stack (see rbd_dl_load_on_thread_locked). */
#define RBD_DL_STACK (8u << 20)

enum rbd_dl_lib {
    RBD_DL_RADOS,   /* loaded first: librbd needs it */
    RBD_DL_RBD,
    RBD_DL_N_LIBS,
};

static const struct {
    const char *soname;
    const char *package;    /* Debian's and Fedora's name for it */
} rbd_dl_libs[RBD_DL_N_LIBS] = {
    [RBD_DL_RADOS] = {"librados.so.2", "librados2"},
    [RBD_DL_RBD] = {"librbd.so.1", "librbd1"},
};

/* FN(lib, ret, name, params, args) for a function returning ret;
 * PROC(lib, name, params, args) for one returning void. */
#define RBD_DL_FUNCS(FN, PROC)                                                \
    FN(RBD_DL_RADOS, int, rados_conf_get,                                     \
       (rados_t cluster, const char *option, char *buf, size_t len),          \
       (cluster, option, buf, len))                                           \
    FN(RBD_DL_RADOS, int, rados_conf_parse_env,                               \
       (rados_t cluster, const char *var), (cluster, var))                    \
    FN(RBD_DL_RADOS, int, rados_conf_read_file,                               \
       (rados_t cluster, const char *path), (cluster, path))                  \
    FN(RBD_DL_RADOS, int, rados_conf_set,                                     \
       (rados_t cluster, const char *option, const char *value),              \
       (cluster, option, value))                                              \
    FN(RBD_DL_RADOS, int, rados_connect, (rados_t cluster), (cluster))        \
    FN(RBD_DL_RADOS, int, rados_create,                                       \
       (rados_t *cluster, const char *const id), (cluster, id))               \
    FN(RBD_DL_RADOS, int, rados_ioctx_create,                                 \
       (rados_t cluster, const char *pool_name, rados_ioctx_t *ioctx),        \
       (cluster, pool_name, ioctx))                                           \
    PROC(RBD_DL_RADOS, rados_ioctx_destroy, (rados_ioctx_t io), (io))         \
    PROC(RBD_DL_RADOS, rados_ioctx_set_namespace,                             \
         (rados_ioctx_t io, const char *nspace), (io, nspace))                \
    PROC(RBD_DL_RADOS, rados_shutdown, (rados_t cluster), (cluster))          \
    FN(RBD_DL_RBD, int, rbd_aio_create_completion,                            \
       (void *cb_arg, rbd_callback_t complete_cb, rbd_completion_t *c),       \
       (cb_arg, complete_cb, c))                                              \
    FN(RBD_DL_RBD, int, rbd_aio_discard,                                      \
       (rbd_image_t image, uint64_t off, uint64_t len, rbd_completion_t c),   \
       (image, off, len, c))                                                  \
    FN(RBD_DL_RBD, int, rbd_aio_flush,                                        \
       (rbd_image_t image, rbd_completion_t c), (image, c))                   \
    FN(RBD_DL_RBD, void *, rbd_aio_get_arg, (rbd_completion_t c), (c))        \
    FN(RBD_DL_RBD, ssize_t, rbd_aio_get_return_value,                         \
       (rbd_completion_t c), (c))                                             \
    FN(RBD_DL_RBD, int, rbd_aio_readv,                                        \
       (rbd_image_t image, const struct iovec *iov, int iovcnt, uint64_t off, \
        rbd_completion_t c),                                                  \
       (image, iov, iovcnt, off, c))                                          \
    PROC(RBD_DL_RBD, rbd_aio_release, (rbd_completion_t c), (c))              \
    FN(RBD_DL_RBD, int, rbd_aio_write_zeroes,                                 \
       (rbd_image_t image, uint64_t off, size_t len, rbd_completion_t c,      \
        int zero_flags, int op_flags),                                        \
       (image, off, len, c, zero_flags, op_flags))                            \
    FN(RBD_DL_RBD, int, rbd_aio_writev,                                       \
       (rbd_image_t image, const struct iovec *iov, int iovcnt, uint64_t off, \
        rbd_completion_t c),                                                  \
       (image, iov, iovcnt, off, c))                                          \
    FN(RBD_DL_RBD, int, rbd_close, (rbd_image_t image), (image))              \
    FN(RBD_DL_RBD, int, rbd_create,                                           \
       (rados_ioctx_t io, const char *name, uint64_t size, int *order),       \
       (io, name, size, order))                                               \
    FN(RBD_DL_RBD, int, rbd_diff_iterate2,                                    \
       (rbd_image_t image, const char *fromsnapname, uint64_t ofs,            \
        uint64_t len, uint8_t include_parent, uint8_t whole_object,           \
        int (*cb)(uint64_t, size_t, int, void *), void *arg),                 \
       (image, fromsnapname, ofs, len, include_parent, whole_object, cb, arg))\
    FN(RBD_DL_RBD, int, rbd_flush, (rbd_image_t image), (image))              \
    FN(RBD_DL_RBD, int, rbd_get_size,                                         \
       (rbd_image_t image, uint64_t *size), (image, size))                    \
    FN(RBD_DL_RBD, int, rbd_open,                                             \
       (rados_ioctx_t io, const char *name, rbd_image_t *image,               \
        const char *snap_name),                                               \
       (io, name, image, snap_name))                                          \
    FN(RBD_DL_RBD, int, rbd_open_read_only,                                   \
       (rados_ioctx_t io, const char *name, rbd_image_t *image,               \
        const char *snap_name),                                               \
       (io, name, image, snap_name))                                          \
    FN(RBD_DL_RBD, int, rbd_poll_io_events,                                   \
       (rbd_image_t image, rbd_completion_t *comps, int numcomp),             \
       (image, comps, numcomp))                                               \
    FN(RBD_DL_RBD, int, rbd_remove,                                           \
       (rados_ioctx_t io, const char *name), (io, name))                      \
    FN(RBD_DL_RBD, int, rbd_resize,                                           \
       (rbd_image_t image, uint64_t size), (image, size))                     \
    FN(RBD_DL_RBD, int, rbd_set_image_notification,                           \
       (rbd_image_t image, int fd, int type), (image, fd, type))              \
    FN(RBD_DL_RBD, int, rbd_stat,                                             \
       (rbd_image_t image, rbd_image_info_t *info, size_t infosize),          \
       (image, info, infosize))

/* One pointer per function, of the function's own type. */
#define RBD_DL_PTR(lib, ret, name, params, args) __typeof__(name) *name;
#define RBD_DL_PTR_PROC(lib, name, params, args) __typeof__(name) *name;
struct rbd_dl_fns {
    RBD_DL_FUNCS(RBD_DL_PTR, RBD_DL_PTR_PROC)
};

/* rbd_dl_lock protects rbd_dl_loaded and the writing of rbd_dl (a leaf
 * lock, held by rbd_dl_load() while the loading thread works for it).  rbd_dl is written once, before
 * rbd_dl_loaded is set, and never again; the forwarders read it without
 * the lock: their callers hold an image, cluster or completion that exists
 * only because an rbd_dl_load() returned 0 before, on their thread or on
 * one that handed the object over to them (which orders the write first). */
static pthread_mutex_t rbd_dl_lock = PTHREAD_MUTEX_INITIALIZER;
static bool rbd_dl_loaded;
static struct rbd_dl_fns rbd_dl;

/* The forwarders: librbd's and librados's names, their prototypes. */
#define RBD_DL_FORWARD(lib, ret, name, params, args)                          \
    ret name params                                                           \
    {                                                                         \
        assert(rbd_dl.name); /* rbd_dl_load() succeeded first */              \
        return rbd_dl.name args;                                              \
    }
#define RBD_DL_FORWARD_PROC(lib, name, params, args)                          \
    void name params                                                          \
    {                                                                         \
        assert(rbd_dl.name);                                                  \
        rbd_dl.name args;                                                     \
    }
RBD_DL_FUNCS(RBD_DL_FORWARD, RBD_DL_FORWARD_PROC)

/* Sets *slot to the address of name in handle, or errp when it has none. */
static int rbd_dl_sym(void *const handles[], enum rbd_dl_lib lib,
                      const char *name, void **slot, struct error **errp)
{
    dlerror();
    *slot = dlsym(handles[lib], name);
    if (*slot)
        return 0;
    const char *why = dlerror();
    return error_setf(errp, ENOTSUP, "rbd: exports are unavailable: %s has "
                      "no function %s (%s): the installed %s is older than "
                      "the Ceph headers stratad was built with",
                      rbd_dl_libs[lib].soname, name,
                      why ? why : "its address is NULL",
                      rbd_dl_libs[lib].package);
}

static int rbd_dl_load_locked(struct error **errp)
{
    /* Never closed: librbd keeps threads and static state for the life of
     * the process, and the forwarders may be called until it ends. */
    void *handles[RBD_DL_N_LIBS];
    for (int i = 0; i < RBD_DL_N_LIBS; i++) {
        handles[i] = dlopen(rbd_dl_libs[i].soname, RTLD_NOW | RTLD_LOCAL);
        if (!handles[i])
            return error_setf(errp, ENOTSUP, "rbd: exports are unavailable: "
                              "cannot load %s (%s): install the %s package",
                              rbd_dl_libs[i].soname, dlerror(),
                              rbd_dl_libs[i].package);
    }

    struct rbd_dl_fns fns;
    int e = 0;
#define RBD_DL_RESOLVE(lib, ret, name, params, args)                          \
    if (e == 0)                                                               \
        e = rbd_dl_sym(handles, lib, #name, (void **)&fns.name, errp);
#define RBD_DL_RESOLVE_PROC(lib, name, params, args)                          \
    RBD_DL_RESOLVE(lib, void, name, params, args)
    RBD_DL_FUNCS(RBD_DL_RESOLVE, RBD_DL_RESOLVE_PROC)
#undef RBD_DL_RESOLVE_PROC
#undef RBD_DL_RESOLVE
    if (e < 0)
        return e;
    rbd_dl = fns;
    rbd_dl_loaded = true;
    return 0;
}

struct rbd_dl_call {
    struct error **errp;
    int res;
};

static void *rbd_dl_thread_main(void *arg)
{
    struct rbd_dl_call *c = arg;
    c->res = rbd_dl_load_locked(c->errp);
    return NULL;
}

/* Loads on a thread of its own, with a full-size stack: dlopen runs the
 * libraries' static initialisers there, and libceph-common's
 * get_global_options() alone takes a 1 MiB frame, which would overflow the
 * coroutine stack that backend opens run on.  The caller holds rbd_dl_lock
 * for the thread and waits for it. */
static int rbd_dl_load_on_thread_locked(struct error **errp)
{
    struct rbd_dl_call c = {.errp = errp};
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, RBD_DL_STACK);
    /* No signals for it: they are the loop's business, and threads that
     * the initialisers may start inherit its mask. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_t t;
    int e = pthread_create(&t, &attr, rbd_dl_thread_main, &c);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    if (e != 0)
        return error_setf(errp, e, "rbd: cannot start a thread to load "
                          "librbd: %s", strerror(e));
    pthread_join(t, NULL);
    return c.res;
}

int rbd_dl_load(struct error **errp)
{
    pthread_mutex_lock(&rbd_dl_lock);
    int e = rbd_dl_loaded ? 0 : rbd_dl_load_on_thread_locked(errp);
    pthread_mutex_unlock(&rbd_dl_lock);
    return e;
}
