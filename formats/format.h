/* strata — format drivers: turn a virtual disk's byte range into backend
 * operations.
 *
 * A chain is a stack of format nodes; each node sits on one backend and may
 * point at a backing node (qcow2).  The layers above (connections, jobs)
 * use only the fmt_*_co() contract wrappers below, which check range,
 * alignment, capability and read-only before calling the ops table.
 *
 * Every _co operation runs in a coroutine on the node's loop, may yield,
 * and returns 0 or -errno.  Buffers belong to the caller and stay valid
 * until the call returns.
 */
#ifndef STRATA_FORMAT_H
#define STRATA_FORMAT_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

#include "backend.h"
#include "bitmap.h"
#include "coro.h"
#include "error.h"

struct fmt_node;
struct loop;

/* Flags for writes, zeroing and discard. */
#define FMT_FUA      (1u << 0)  /* durable (data and metadata) on return */
#define FMT_MAY_TRIM (1u << 1)  /* zero: deallocation allowed (no NO_HOLE) */
#define FMT_FAST     (1u << 2)  /* zero: -ENOTSUP rather than slow zeroing */

/* Extent flags from block status (base:allocation semantics). */
#define FMT_EXT_HOLE (1u << 0)  /* not allocated anywhere in the chain */
#define FMT_EXT_ZERO (1u << 1)  /* reads as zeros */

/* Capabilities. */
#define FMT_CAN_ZERO      (1u << 0) /* zeroing cheaper than writing zeros */
#define FMT_CAN_TRIM      (1u << 1)

/* One extent of block status. */
struct fmt_extent {
    uint64_t len;      /* > 0 */
    unsigned flags;    /* FMT_EXT_* */
    unsigned depth;    /* qemu:allocation-depth: 0 = unallocated in the
                          whole chain, 1 = this node, 2 = its backing... */
};

/* Largest byte count of one preadv_co / pwritev_co call: the NBD layer's
 * maximum payload (32 MiB, nbd-protocol.h) bounds every client request,
 * and the jobs copy in smaller chunks.  Zero, discard, cache and block
 * status take any length inside the disk. */
#define FMT_MAX_RW (UINT64_C(32) << 20)

/* The per-node operations of a format.  Common to all of them:
 *   - called only through the fmt_*_co() contract wrappers below, from a
 *     coroutine on n->loop (connections' request coroutines, job workers);
 *     every one may yield, and several may be in flight on one node at
 *     once (the format serialises what must be: qcow2's metadata lock);
 *   - off and lengths are multiples of n->align, inside [0, n->size), and
 *     lengths are > 0 (checked by the wrapper, a violation is a programmer
 *     error);
 *   - iov buffers belong to the caller, stay valid until return and are
 *     not kept; with direct I/O (n->align > 1) they are aligned to
 *     n->align;
 *   - they return 0 or -errno and never touch errno: -EIO (the storage
 *     failed), -ENOSPC (no room to allocate), -ENOMEM, -ENOTSUP (an
 *     optional behaviour, such as FMT_FAST zeroing, is not available),
 *     -EROFS; whatever they return is what the client sees (mapped to NBD
 *     errors in one place, nbd_errno);
 *   - writing ops are never called on a read-only node. */
struct fmt_ops {
    const char *name;
    /* Fills iov (at most FMT_MAX_RW bytes) with the guest-visible bytes at
     * off: this node's data, else its backing node's, else zeros. */
    int (*preadv_co)(struct fmt_node *n, struct coro *co,
                     const struct iovec *iov, int iovcnt, uint64_t off);
    /* Writes iov (at most FMT_MAX_RW bytes) at off, allocating as needed.
     * flags: FMT_FUA only; with it, the data and the metadata that leads
     * to it are durable on return.  Without it, durable at the next
     * flush_co. */
    int (*pwritev_co)(struct fmt_node *n, struct coro *co,
                      const struct iovec *iov, int iovcnt, uint64_t off,
                      unsigned flags);
    /* Makes every write completed before the call durable (data, then the
     * metadata that refers to it, then the backend's flush).  Not called
     * on read-only nodes (the wrapper answers 0). */
    int (*flush_co)(struct fmt_node *n, struct coro *co);
    /* Makes [off, off+len) read as zeros; any length inside the disk.
     * flags: FMT_FUA, FMT_MAY_TRIM (may deallocate), FMT_FAST (the wrapper
     * answers -ENOTSUP itself unless n->caps has FMT_CAN_ZERO; the op may
     * still fail with -ENOTSUP rather than writing zeros). */
    int (*zero_co)(struct fmt_node *n, struct coro *co, uint64_t off,
                   uint64_t len, unsigned flags);
    /* Advisory: [off, off+len) may be deallocated; content afterwards is
     * unspecified (reads may see old data, zeros or the backing node).
     * Only called when n->caps has FMT_CAN_TRIM.  flags: FMT_FUA only;
     * with it, the deallocation (the metadata that records it) is
     * durable on return, in this node's image (as for a FUA write). */
    int (*discard_co)(struct fmt_node *n, struct coro *co, uint64_t off,
                      uint64_t len, unsigned flags);
    /* Describes the extent starting at off (0 < ext->len <= len; len is
     * clipped to the disk by the wrapper; off need not be aligned). */
    int (*block_status_co)(struct fmt_node *n, struct coro *co, uint64_t off,
                           uint64_t len, struct fmt_extent *ext);
    /* Prefetch hint for [off, off+len) (NBD_CMD_CACHE); optional, the
     * wrapper answers 0 without it.  Never changes content. */
    int (*cache_co)(struct fmt_node *n, struct coro *co, uint64_t off,
                    uint64_t len);
    /* Optional, control path, with requests in flight (reads only: the
     * node is read-only or not yet served): the checks a node runs
     * before it takes writes, done ahead so that the reopen that makes
     * it writable, under a quiesce, finds them done (qcow2: the refcount
     * audit).  What they find is logged and handled by the node (a
     * corrupt image refuses writes); they do not fail. */
    void (*prepare_writable_co)(struct fmt_node *n, struct coro *co);
    /* Control path, no request in flight on the node (both optional). */
    /* Switches between read-only and read-write; going read-only flushes
     * first.  Errors in *errp as well. */
    int (*reopen_co)(struct fmt_node *n, struct coro *co, bool read_only,
                     struct error **errp);
    /* Grows the virtual size to size (> n->size); the node is writable. */
    int (*grow_co)(struct fmt_node *n, struct coro *co, uint64_t size,
                   struct error **errp);
    /* Releases the node (not its backing node, not its backend).  Must not
     * yield; nothing is in flight.  The bitmaps (n->bitmaps) are freed by
     * the caller afterwards. */
    void (*close)(struct fmt_node *n);

    /* Persistent dirty bitmaps (bitmap.h); both optional: without them
     * the node has no persistent bitmaps.  Control path. */
    /* Can the image keep one more bitmap called name of granularity gran?
     * Returns 0, or -errno with the reason in *errp (a phrase, no
     * prefix). */
    int (*bitmap_can_store)(struct fmt_node *n, const char *name,
                            uint64_t gran, struct error **errp);
    /* Makes the image's bitmap directory list exactly the persistent
     * bitmaps of n->bitmaps (setting each one's stored flag).  With
     * store_data, their content is written too and each consistent one is
     * marked not in use (closing, or going read-only); without it, each is
     * marked in use (the node keeps writing).  Atomic: the image lists
     * the old directory or the new one.  The node is writable. */
    int (*bitmaps_write_co)(struct fmt_node *n, struct coro *co,
                            bool store_data, struct error **errp);
};

struct fmt_driver;

struct fmt_node {
    const struct fmt_ops *ops;
    const struct fmt_driver *drv; /* the driver that opened it (set by the
                                     opener, fmt_open_co) */
    struct loop *loop;
    struct backend *file;      /* this node's storage (owned) */
    struct fmt_node *backing;  /* next layer down (owned), or NULL */
    char *filename;            /* as the user or the overlay named it */
    uint64_t size;             /* virtual disk size */
    uint32_t align;            /* request alignment (power of 2) */
    unsigned caps;             /* FMT_CAN_* */
    bool read_only;
    uint64_t cluster_size;     /* allocation unit of the format; 0: none
                                  (default bitmap granularity) */
    struct fmt_bitmap *bitmaps;/* named dirty bitmaps, newest first
                                  (bitmap.h); owned */
};

/* Metadata cache sizes per qcow2 node (bytes) when not configured. */
#define FMT_DEFAULT_L2_CACHE       (UINT64_C(4) << 20)
#define FMT_DEFAULT_REFCOUNT_CACHE (UINT64_C(1) << 20)
/* Longest backing chain opened (layers, the top included). */
#define FMT_MAX_CHAIN_DEPTH        64

struct fmt_open_opts {
    const char *format;        /* a driver's name (fmt_find_driver); NULL:
                                  probed, and refused when a driver other
                                  than the fallback recognises the file */
    bool read_only;            /* the top; backing layers always are */
    bool direct;               /* cache=none */
    uint64_t l2_cache_bytes;   /* qcow2: L2 table cache per node; 0 =
                                  FMT_DEFAULT_L2_CACHE */
    uint64_t refcount_cache_bytes; /* 0 = FMT_DEFAULT_REFCOUNT_CACHE */
    const char *backing_root;  /* backing files must resolve inside this
                                  directory; NULL: the top image's own
                                  directory, and no local backing files at
                                  all under a top on remote storage */
    const char *backing_remote; /* the export's backing-remote= option:
                                  which remote storage local overlays may
                                  name as backing, and its settings
                                  (backend_resolve_backing); NULL: none */
};

/* Opens a node and, when its format has backing files, its whole backing
 * chain: backing names resolved by fmt_resolve_backing, the backing
 * format from the header (probed only when absent), every backing layer
 * read-only, at most FMT_MAX_CHAIN_DEPTH layers, no loops, every local
 * file inside the backing root.  Runs in a coroutine on loop. */
struct fmt_node *fmt_open_co(struct loop *loop, struct coro *co,
                             const char *spec,
                             const struct fmt_open_opts *opts,
                             struct error **errp);
/* The same from outside the loop (start-up): drives the loop until done. */
struct fmt_node *fmt_open(struct loop *loop, const char *spec,
                          const struct fmt_open_opts *opts,
                          struct error **errp);
/* Opens path as an image of format opts->format (a driver that can have
 * a backing file) on top of an already open chain (its recorded backing
 * name is not followed): the new top of an external snapshot.  backing
 * must stay open as long as the new node. */
struct fmt_node *fmt_open_overlay_co(struct loop *loop, struct coro *co,
                                     const char *path,
                                     struct fmt_node *backing,
                                     const struct fmt_open_opts *opts,
                                     struct error **errp);
/* Resolves a backing name recorded in an overlay named overlay, as the
 * chain opener does (backend_resolve_backing: the backend drivers decide;
 * a name with a storage prefix goes to that storage, an absolute path is a
 * local file, anything else is relative to the overlay in its own
 * storage).  backing_remote: the export's backing-remote= option, or NULL.
 * malloc'ed; NULL with *errp set on error. */
char *fmt_resolve_backing(const char *overlay, const char *name,
                          const char *backing_remote, struct error **errp);
/* The backing name to record in overlay's header so that it leads to the
 * layer layer (both specs as the chain opener resolved them; see the
 * backing_name op of backend drivers).  malloc'ed; NULL with *errp set on
 * error. */
char *fmt_backing_name_for(const char *overlay, const char *layer,
                           struct error **errp);
/* Do the two specs name the same storage (backend_same_storage)? */
bool fmt_same_layer(const char *a, const char *b);
/* Closes a node, its backing chain and their backends. */
void fmt_close(struct fmt_node *n);
/* Stores the persistent dirty bitmaps of every writable node of a chain
 * in their images (fmt_bitmaps_store_co), logging failures (such bitmaps
 * stay marked in use, hence inconsistent).  Nothing may write to those
 * nodes afterwards.  Returns 0 or the last -errno. */
int fmt_store_bitmaps_co(struct fmt_node *top, struct coro *co);
/* The same from a coroutine on loop: a chain with RBD layers is closed on
 * a thread of its own (closing an image talks to the cluster), so the loop
 * keeps serving meanwhile.  Nothing may use the chain any more.  Persistent
 * bitmaps are stored first (fmt_store_bitmaps_co). */
void fmt_close_co(struct fmt_node *n, struct loop *loop, struct coro *co);

/* Read-only <-> read-write for one node (not its chain): block-commit
 * writes into a backing layer and puts it back afterwards.  Going
 * read-only flushes first.  No request may be in flight on the node. */
int fmt_reopen_co(struct fmt_node *n, struct coro *co, bool read_only,
                  struct error **errp);
/* Grows a node's virtual size (never shrinks; a no-op when already that
 * large).  The node must be writable. */
int fmt_grow_co(struct fmt_node *n, struct coro *co, uint64_t size,
                struct error **errp);

/* Contract wrappers. */
int fmt_preadv_co(struct fmt_node *n, struct coro *co, const struct iovec *iov,
                  int iovcnt, uint64_t off);
int fmt_pwritev_co(struct fmt_node *n, struct coro *co, const struct iovec *iov,
                   int iovcnt, uint64_t off, unsigned flags);
int fmt_flush_co(struct fmt_node *n, struct coro *co);
/* Runs the node's checks before it takes writes (ops.prepare_writable_co)
 * while requests go on; the reopen that makes it writable finds them
 * done. */
void fmt_prepare_writable_co(struct fmt_node *n, struct coro *co);
int fmt_zero_co(struct fmt_node *n, struct coro *co, uint64_t off,
                uint64_t len, unsigned flags);
int fmt_discard_co(struct fmt_node *n, struct coro *co, uint64_t off,
                   uint64_t len, unsigned flags);
int fmt_block_status_co(struct fmt_node *n, struct coro *co, uint64_t off,
                        uint64_t len, struct fmt_extent *ext);
int fmt_cache_co(struct fmt_node *n, struct coro *co, uint64_t off,
                 uint64_t len);

/* ---- format drivers: the registry ----
 *
 * A format driver is one image format.  Layers above find it by name
 * (fmt_find_driver: QMP's "driver", an export's format=) or by probing
 * the first bytes of a file, and ask about it through the functions below;
 * they never name a format.  Driver ops are control path, called from a
 * coroutine on loop unless said otherwise; errors in *errp as well as the
 * -errno return. */

#define FMT_API_VERSION 1

/* Driver capabilities. */
#define FMT_DRV_BACKING (1u << 0) /* records a backing file in its header:
                                     can be an overlay (snapshots) and be
                                     re-pointed (commit); has create_co,
                                     set_backing_co, backing_name and
                                     backing_format */

struct fmt_driver {
    unsigned api_version;     /* FMT_API_VERSION */
    const char *name;         /* "raw", "qcow2": QMP's driver, format= */
    unsigned caps;            /* FMT_DRV_* */
    /* Limits of the nodes it opens: n->align is a power of two >= the
     * backend's alignment (qcow2: the backend's, at least 512 with direct
     * I/O); preadv_co and pwritev_co take at most max_rw bytes. */
    uint64_t max_rw;

    /* How sure the driver is that the first len bytes of a file (len >=
     * FMT_PROBE_BYTES unless the file is shorter) are its format: 0 (no
     * idea) to 100 (magic number).  Pure function, called on the loop.
     * The fallback driver (raw) has no probe. */
    int (*probe)(const uint8_t *buf, size_t len);
    /* Opens a node on file (which the node owns on success, the caller on
     * failure).  Reads metadata, may yield.  Leaves n->filename, n->drv
     * and n->backing to the opener. */
    struct fmt_node *(*open_co)(struct loop *loop, struct coro *co,
                                struct backend *file,
                                const struct fmt_open_opts *opts,
                                struct error **errp);
    /* FMT_DRV_BACKING: creates a new image of size bytes at path (any
     * backend spec; fails if it exists), recording backing_name and
     * backing_fmt when not NULL.  Durable before it returns (the image,
     * and a file's directory); on failure nothing is left behind. */
    int (*create_co)(struct loop *loop, struct coro *co, const char *path,
                     uint64_t size, const char *backing_name,
                     const char *backing_fmt, struct error **errp);
    /* FMT_DRV_BACKING: rewrites the backing link in n's header, durably
     * and atomically (synced before and after); n is writable and may be
     * serving requests (the driver takes its own metadata lock). */
    int (*set_backing_co)(struct fmt_node *n, struct coro *co,
                          const char *backing_name, const char *backing_fmt,
                          struct error **errp);
    /* FMT_DRV_BACKING: the backing name and format recorded in n's header
     * as opened (NULL: none).  Owned by n; no yield. */
    const char *(*backing_name)(struct fmt_node *n);
    const char *(*backing_format)(struct fmt_node *n);
};

/* Bytes read from the start of a file for probing. */
#define FMT_PROBE_BYTES 512

/* Stamps the API version on a driver's table:
 *   FMT_REGISTER_DRIVER(qcow2_driver, .name = "qcow2", ...);
 * and lists it in the registry (format.c). */
#define FMT_REGISTER_DRIVER(ident, ...)                                     \
    const struct fmt_driver ident = {.api_version = FMT_API_VERSION,        \
                                     __VA_ARGS__}

/* The driver called name, or NULL. */
const struct fmt_driver *fmt_find_driver(const char *name);
/* "raw, qcow2": the driver names for messages. */
const char *fmt_driver_names(void);
/* The format of new overlays (external snapshots): the first registered
 * driver that can have a backing file. */
const struct fmt_driver *fmt_default_overlay_driver(void);
/* Can driver d have a backing file (be an overlay, be re-pointed)? */
bool fmt_driver_can_backing(const struct fmt_driver *d);
/* The backing name and format recorded in n's header (NULL: none, or a
 * format without backing files). */
const char *fmt_backing_name(struct fmt_node *n);
const char *fmt_backing_format(struct fmt_node *n);
/* Rewrites n's backing link (n's driver must be able to: -ENOTSUP). */
int fmt_set_backing_co(struct fmt_node *n, struct coro *co,
                       const char *backing_name, const char *backing_fmt,
                       struct error **errp);
/* Creates a new image of format d (see the create_co op). */
int fmt_create_co(const struct fmt_driver *d, struct loop *loop,
                  struct coro *co, const char *path, uint64_t size,
                  const char *backing_name, const char *backing_fmt,
                  struct error **errp);

/* The registered drivers (listed in format.c). */
extern const struct fmt_driver raw_driver;
extern const struct fmt_driver qcow2_driver;

/* Constructors and accessors of the concrete formats, for their drivers. */
struct fmt_node *raw_open_co(struct loop *loop, struct coro *co,
                             struct backend *file,
                             const struct fmt_open_opts *opts,
                             struct error **errp);
struct fmt_node *qcow2_open_co(struct loop *loop, struct coro *co,
                               struct backend *file,
                               const struct fmt_open_opts *opts,
                               struct error **errp);
const char *qcow2_backing_name(struct fmt_node *n);
const char *qcow2_backing_format(struct fmt_node *n);
int qcow2_create_co(struct loop *loop, struct coro *co, const char *path,
                    uint64_t size, const char *backing_name,
                    const char *backing_fmt, struct error **errp);
/* The same with CLUSTER_SIZE-byte clusters (a power of two from 512 to
 * 2 MiB; 0 for the default of 64 KiB).  Fails with EINVAL for another
 * size, ENAMETOOLONG when the header and backing name do not fit in one
 * cluster, EFBIG when the L1 table would pass QEMU's limit. */
int qcow2_create_cs_co(struct loop *loop, struct coro *co, const char *path,
                       uint64_t size, const char *backing_name,
                       const char *backing_fmt, uint64_t cluster_size,
                       struct error **errp);
/* Writes a new empty image of size bytes (no backing file) at the start
 * of file, an open blank storage that cannot grow (a disk), and flushes
 * it; -ENOSPC when the storage cannot hold the image's metadata. */
int qcow2_format_backend_co(struct backend *file, struct coro *co,
                            uint64_t size, struct error **errp);
int qcow2_set_backing_co(struct fmt_node *n, struct coro *co,
                         const char *backing_name, const char *backing_fmt,
                         struct error **errp);

#endif
