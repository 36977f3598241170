/* strata — storage backends: move bytes to and from storage.
 *
 * A backend knows nothing of formats.  Every data operation runs in a
 * coroutine on the backend's loop, may yield while the I/O is in flight,
 * and returns 0 (or a byte count where stated) or -errno; none touches
 * errno.  Callers go through the backend_*_co() wrappers below, which check
 * the contract (range, alignment, capability, read-only) before calling
 * the ops table and check the result after it.
 *
 * Fields of struct backend are set by the backend at open time and are
 * read-only for everyone else.
 */
#ifndef STRATA_BACKEND_H
#define STRATA_BACKEND_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

#include "coro.h"
#include "error.h"
#include "iov.h"

struct loop;
struct backend;

/* Flags for writes and zeroing. */
#define BACKEND_FUA      (1u << 0)  /* durable before completion */
#define BACKEND_MAY_TRIM (1u << 1)  /* zero: may deallocate (punch hole) */
#define BACKEND_FAST     (1u << 2)  /* zero: fail with -ENOTSUP if slow */

/* Allocation status from block_status_co(). */
#define BACKEND_STATUS_DATA (1u << 0) /* allocated (or unknown) */
#define BACKEND_STATUS_ZERO (1u << 1) /* reads as zeros */

/* Capabilities. */
#define BACKEND_CAN_ZERO    (1u << 0) /* efficient zeroing (no data writes) */
#define BACKEND_CAN_TRIM    (1u << 1) /* discard frees space */
#define BACKEND_CAN_EXTENTS (1u << 2) /* block_status reports real holes */
#define BACKEND_CAN_RESIZE  (1u << 3)

struct backend_ops {
    const char *name;

    /* Reads exactly the bytes described by iov at off.  Short reads are
     * resubmitted; bytes past the end of the storage read as zeros.
     * Buffers are owned by the caller and must stay valid until return;
     * with direct I/O they are aligned to b->align (offset and lengths
     * too).  May yield. */
    int (*preadv_co)(struct backend *b, struct coro *co,
                     const struct iovec *iov, int iovcnt, uint64_t off);
    /* Writes exactly the bytes described by iov; BACKEND_FUA makes them
     * durable before returning.  Writing past the end grows the storage
     * when the backend can (files do).  May yield. */
    int (*pwritev_co)(struct backend *b, struct coro *co,
                      const struct iovec *iov, int iovcnt, uint64_t off,
                      unsigned flags);
    /* Makes every completed write durable. May yield. */
    int (*flush_co)(struct backend *b, struct coro *co);
    /* Makes [off, off+len) read as zeros.  BACKEND_MAY_TRIM allows
     * deallocation; BACKEND_FAST fails with -ENOTSUP rather than writing
     * zeros; BACKEND_FUA as for writes.  May yield. */
    int (*zero_co)(struct backend *b, struct coro *co, uint64_t off,
                   uint64_t len, unsigned flags);
    /* Advisory deallocation; content afterwards is unspecified (files: reads
     * as zeros).  BACKEND_FUA: whatever it changed is durable on return,
     * as for writes.  May yield. */
    int (*discard_co)(struct backend *b, struct coro *co, uint64_t off,
                      uint64_t len, unsigned flags);
    /* Status of the extent starting at off: *pnum (> 0, <= len) bytes share
     * *status (BACKEND_STATUS_*).  May yield. */
    int (*block_status_co)(struct backend *b, struct coro *co, uint64_t off,
                           uint64_t len, uint64_t *pnum, unsigned *status);
    /* Sets the size (grow or shrink); updates b->size.  May yield. */
    int (*truncate_co)(struct backend *b, struct coro *co, uint64_t size);
    /* Prefetch hint. May yield. */
    int (*cache_co)(struct backend *b, struct coro *co, uint64_t off,
                    uint64_t len);
    /* Switches between read-only and read-write access to the same
     * storage (control path; no operation in flight).  Optional. */
    int (*reopen)(struct backend *b, bool read_only, struct error **errp);
    /* Is other (open, same ops) the very same storage as b?  Answered from
     * the open handles (files: fstat's device and inode), so nothing that
     * happens to the names after the open matters.  Optional: without it
     * the specs are compared (backend_same_storage). */
    bool (*same_open)(struct backend *b, struct backend *other);
    /* Releases everything; no operation may be in flight. */
    void (*close)(struct backend *b);
};

struct backend {
    const struct backend_ops *ops;
    struct loop *loop;     /* the loop whose ring carries this I/O */
    char *name;            /* what the user gave: path or rbd: spec */
    uint64_t size;         /* current size in bytes */
    uint32_t align;        /* required alignment of offsets, lengths and
                              buffers (1 unless direct I/O) */
    unsigned caps;         /* BACKEND_CAN_* */
    bool read_only;
    /* Writes (write, zero, discard, truncate) completed, and how many of
     * them the last successful flush covered: equal, a flush has nothing
     * to make durable and is not sent (backend_flush_co).  Maintained by
     * the wrappers; zero when the driver allocates the backend. */
    uint64_t writes_done, writes_flushed;
};

struct backend_open_opts {
    bool read_only;
    bool direct;           /* O_DIRECT / no host page cache (cache=none) */
    bool create;           /* create the storage if missing (size below) */
    uint64_t create_size;
    /* Local files only: when beneath_path is set, the file opened is
     * beneath_path resolved beneath the directory beneath_dirfd (an O_PATH
     * descriptor) without ever leaving it — no "..", absolute or magic
     * (/proc) symlink may lead out, whatever the file system looks like at
     * the time of the open (openat2 RESOLVE_BENEATH |
     * RESOLVE_NO_MAGICLINKS).  The spec still names the backend (b->name,
     * messages). */
    const char *beneath_path;
    int beneath_dirfd;
};

/* ---- backend drivers: the registry ----
 *
 * A backend driver is one kind of storage: local files, Ceph RBD images.
 * It is found by the prefix of a spec ("rbd:"), the driver with the empty
 * prefix (local files) taking every spec no other driver claims, or by its
 * name (QMP's file-node "driver").  Layers above never name a driver: they
 * ask the registry functions below, which dispatch to the driver of the
 * spec.  All driver ops are control path: called from the loop thread (or
 * an offload thread where stated), never on the data path.  Strings they
 * return are malloc'ed and owned by the caller; on failure they return
 * NULL (or -errno) with *errp set.
 */

#define BACKEND_API_VERSION 1

/* Driver flags. */
#define BACKEND_DRV_LOCAL   (1u << 0) /* specs are paths: resolved against
                                         directories, stat()ed, checked
                                         against an export's backing root */
#define BACKEND_DRV_OFFLOAD (1u << 1) /* open, reopen, close and remove talk
                                         to a server and may block for
                                         seconds: run them on an offload
                                         thread (backend_open_co) */

/* One option of a QMP file node, flattened the way QEMU's keyval syntax
 * does (nested objects and arrays as "server.0.host"); every value is a
 * string. */
struct backend_kv {
    const char *key;
    const char *val;
};

struct backend_driver {
    unsigned api_version;       /* BACKEND_API_VERSION */
    const char *name;           /* "file", "rbd": QMP's file-node driver */
    const char *prefix;         /* spec prefix; "" = the fallback (paths) */
    unsigned flags;             /* BACKEND_DRV_* */

    /* Parses and checks spec (which carries the driver's prefix) without
     * touching storage.  Returns 0 or -errno with *errp set.  Optional:
     * NULL accepts every spec. */
    int (*validate)(const char *spec, struct error **errp);
    /* Opens the storage named by spec.  May block (BACKEND_DRV_OFFLOAD:
     * for seconds, and is then called on an offload thread). */
    struct backend *(*open)(struct loop *loop, const char *spec,
                            const struct backend_open_opts *opts,
                            struct error **errp);
    /* Deletes the storage named by spec (undoing a create). */
    int (*remove)(const char *spec, struct error **errp);
    /* The spec of the layer that a backing name recorded in an image
     * header leads to.  overlay: the spec of the image whose header holds
     * name when it is storage of this driver, else NULL.  settings: what
     * the operator configured on the export for backing layers of this
     * driver (the part of the export's backing-remote= option after the
     * prefix), or NULL.  A header is not trusted like the command line:
     * the driver takes from name only what says which image it is, and
     * refuses a name that tries to choose anything else (paths, hosts,
     * credentials, client options). */
    char *(*resolve_backing)(const char *overlay, const char *name,
                             const char *settings, struct error **errp);
    /* The backing name to record in the header of overlay (any spec) so
     * that it leads to layer (a spec of this driver) again. */
    char *(*backing_name)(const char *overlay, const char *layer,
                          struct error **errp);
    /* The same relative to overlay (a spec of this driver like layer): a
     * path from the overlay's directory, an image in the overlay's pool. */
    char *(*relative_backing_name)(const char *overlay, const char *layer,
                                   struct error **errp);
    /* Do specs a and b (both of this driver) name the same storage?  Specs
     * that do not parse are never the same. */
    bool (*same_storage)(const char *a, const char *b);
    /* A spec from the options of a QMP file node (kv[0..n), the "driver"
     * key left out).  Errors name the keys with prefix before them
     * ("file.") in QMP's words ("Parameter 'file.pool' is missing"). */
    char *(*spec_from_options)(const struct backend_kv *kv, size_t n,
                               const char *prefix, struct error **errp);
    /* Checks the settings an export gives for backing layers of this
     * driver under local overlays (backing-remote=PREFIX[SETTINGS]; NULL
     * when the option is just the prefix).  NULL op: the driver takes no
     * such settings (local files). */
    int (*check_settings)(const char *settings, struct error **errp);
    /* Is spec one of this driver's?  Optional: without it the specs that
     * start with prefix are (a driver whose specs have several prefixes,
     * nbd:// and nbd+unix://, says so here; prefix is then the one an
     * export's backing-remote= option names it by). */
    bool (*claims)(const char *spec);
};

/* Stamps the API version on a driver's table:
 *   BACKEND_REGISTER_DRIVER(file_driver, .name = "file", ...);
 * and lists it in the registry (backend.c). */
#define BACKEND_REGISTER_DRIVER(ident, ...)                                 \
    const struct backend_driver ident = {                                   \
        .api_version = BACKEND_API_VERSION, __VA_ARGS__}

/* The driver of spec (never NULL: paths fall to the local driver). */
const struct backend_driver *backend_driver_of(const char *spec);
/* The driver called name (QMP's file-node driver), or NULL. */
const struct backend_driver *backend_find_driver(const char *name);
/* "'file', 'rbd'": the driver names for messages. */
const char *backend_driver_names(void);
/* Does spec name a local path (resolved against directories, stat()ed,
 * checked against a backing root) rather than remote storage? */
bool backend_spec_is_local(const char *spec);
static inline bool backend_spec_is_remote(const char *spec)
{
    return !backend_spec_is_local(spec);
}
/* Are the two open backends the same storage (see the same_open op)? */
bool backend_same_open(struct backend *a, struct backend *b);
/* Must open, reopen, close and remove of b run on an offload thread? */
bool backend_needs_offload(const struct backend *b);
/* Checks spec with its driver's validate op. */
int backend_validate_spec(const char *spec, struct error **errp);
/* Resolves a backing name recorded in the image overlay (both specs as the
 * chain opener has them): a name with a driver's prefix goes to that
 * driver; an absolute path is a local file; any other name is relative to
 * the overlay, in the overlay's own storage.  backing_remote: the
 * export's backing-remote= option (PREFIX[SETTINGS]) or NULL; a driver
 * gets the settings after its own prefix.  malloc'ed; NULL with *errp. */
char *backend_resolve_backing(const char *overlay, const char *name,
                              const char *backing_remote,
                              struct error **errp);
/* Checks an export's backing-remote= option: PREFIX[SETTINGS] of a
 * remote driver. */
int backend_check_backing_remote(const char *backing_remote,
                                 struct error **errp);
/* The backing name to record in overlay's header for layer (see the
 * backing_name op); relative: as relative_backing_name (both specs of one
 * driver). */
char *backend_backing_name(const char *overlay, const char *layer,
                           bool relative, struct error **errp);
/* Do the two specs name the same storage (same driver, same_storage)? */
bool backend_same_storage(const char *a, const char *b);
/* A spec from a QMP file node's options (driver: its "driver" member, NULL
 * when absent). */
char *backend_spec_from_options(const char *driver,
                                const struct backend_kv *kv, size_t n,
                                const char *prefix, struct error **errp);

/* Opens a backend from a user spec: a path for local files, or
 * rbd:POOL/[NAMESPACE/]IMAGE[@SNAP][:KEY=VALUE]... for a Ceph RBD image
 * (syntax in rbd-spec.h).  Control path: may block briefly (open, fstat);
 * an rbd: open connects to the cluster and may block up to its
 * connect_timeout (default 10 s) plus one operation timeout. */
struct backend *backend_open(struct loop *loop, const char *spec,
                             const struct backend_open_opts *opts,
                             struct error **errp);
/* The same from a coroutine on loop: what may block long (connecting to
 * a Ceph cluster, creating an RBD image) runs on a thread of its own
 * (loop_offload_co), so the loop keeps serving everyone else meanwhile. */
struct backend *backend_open_co(struct loop *loop, struct coro *co,
                                const char *spec,
                                const struct backend_open_opts *opts,
                                struct error **errp);
void backend_close(struct backend *b);
/* Deletes the storage named by spec (a file, or an RBD image): undoes a
 * create whose result must not stay.  Control path, like backend_open. */
int backend_remove(const char *spec, struct error **errp);
/* Read-only <-> read-write on the same storage (block-commit opens its base
 * for writing).  No I/O may be in flight.  -ENOTSUP if the backend cannot. */
int backend_reopen(struct backend *b, bool read_only, struct error **errp);
/* The same from a coroutine on b's loop: an RBD reopen (which opens a new
 * image handle on the cluster) runs on a thread of its own. */
int backend_reopen_co(struct backend *b, struct coro *co, bool read_only,
                      struct error **errp);

/* Contract wrappers: the only way the layers above call a backend. */
int backend_preadv_co(struct backend *b, struct coro *co,
                      const struct iovec *iov, int iovcnt, uint64_t off);
int backend_pwritev_co(struct backend *b, struct coro *co,
                       const struct iovec *iov, int iovcnt, uint64_t off,
                       unsigned flags);
int backend_pread_co(struct backend *b, struct coro *co, void *buf,
                     uint64_t len, uint64_t off);
int backend_pwrite_co(struct backend *b, struct coro *co, const void *buf,
                      uint64_t len, uint64_t off, unsigned flags);
int backend_flush_co(struct backend *b, struct coro *co);
int backend_zero_co(struct backend *b, struct coro *co, uint64_t off,
                    uint64_t len, unsigned flags);
int backend_discard_co(struct backend *b, struct coro *co, uint64_t off,
                       uint64_t len, unsigned flags);
int backend_block_status_co(struct backend *b, struct coro *co, uint64_t off,
                            uint64_t len, uint64_t *pnum, unsigned *status);
int backend_truncate_co(struct backend *b, struct coro *co, uint64_t size);
int backend_cache_co(struct backend *b, struct coro *co, uint64_t off,
                     uint64_t len);

/* The registered drivers (listed in backend.c). */
extern const struct backend_driver file_driver;
extern const struct backend_driver rbd_driver;
extern const struct backend_driver nbd_driver;

/* Constructors of the concrete backends, for their drivers. */
struct backend *file_backend_open(struct loop *loop, const char *path,
                                  const struct backend_open_opts *opts,
                                  struct error **errp);
/* Only when built with librbd's headers (STRATA_HAVE_RBD in strata-config.h;
 * librbd itself is loaded on first use, see rbd-dl.h).
 * opts->direct turns librbd's cache off (rbd_cache=false); create makes a
 * new image of create_size bytes with the cluster's default features (an
 * existing image is an error). */
struct backend *rbd_backend_open(struct loop *loop, const char *spec,
                                 const struct backend_open_opts *opts,
                                 struct error **errp);
int rbd_backend_remove(const char *spec, struct error **errp);
/* Only when built with libnbd (STRATA_HAVE_NBD): a layer served by another
 * NBD server (syntax in nbd-spec.h).  create needs a writable export. */
struct backend *nbd_backend_open(struct loop *loop, const char *spec,
                                 const struct backend_open_opts *opts,
                                 struct error **errp);

#endif
