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

struct fmt_ops {
    const char *name;
    /* Fills iov with the guest-visible bytes at off. */
    int (*preadv_co)(struct fmt_node *n, struct coro *co,
                     const struct iovec *iov, int iovcnt, uint64_t off);
    int (*pwritev_co)(struct fmt_node *n, struct coro *co,
                      const struct iovec *iov, int iovcnt, uint64_t off,
                      unsigned flags);
    int (*flush_co)(struct fmt_node *n, struct coro *co);
    int (*zero_co)(struct fmt_node *n, struct coro *co, uint64_t off,
                   uint64_t len, unsigned flags);
    int (*discard_co)(struct fmt_node *n, struct coro *co, uint64_t off,
                      uint64_t len, unsigned flags);
    /* Describes the extent starting at off (ext->len <= len). */
    int (*block_status_co)(struct fmt_node *n, struct coro *co, uint64_t off,
                           uint64_t len, struct fmt_extent *ext);
    int (*cache_co)(struct fmt_node *n, struct coro *co, uint64_t off,
                    uint64_t len);
    /* Control path, no request in flight on the node (both optional). */
    /* Switches between read-only and read-write. */
    int (*reopen_co)(struct fmt_node *n, struct coro *co, bool read_only,
                     struct error **errp);
    /* Grows the virtual size to size (> n->size). */
    int (*grow_co)(struct fmt_node *n, struct coro *co, uint64_t size,
                   struct error **errp);
    /* Releases the node (not its backing node, not its backend). */
    void (*close)(struct fmt_node *n);
};

struct fmt_node {
    const struct fmt_ops *ops;
    struct loop *loop;
    struct backend *file;      /* this node's storage (owned) */
    struct fmt_node *backing;  /* next layer down (owned), or NULL */
    char *filename;            /* as the user or the overlay named it */
    uint64_t size;             /* virtual disk size */
    uint32_t align;            /* request alignment (power of 2) */
    unsigned caps;             /* FMT_CAN_* */
    bool read_only;
};

/* Metadata cache sizes per qcow2 node (bytes) when not configured. */
#define FMT_DEFAULT_L2_CACHE       (UINT64_C(4) << 20)
#define FMT_DEFAULT_REFCOUNT_CACHE (UINT64_C(1) << 20)
/* Longest backing chain opened (layers, the top included). */
#define FMT_MAX_CHAIN_DEPTH        64

struct fmt_open_opts {
    const char *format;        /* "raw" or "qcow2"; NULL: raw, refused if
                                  the file looks like qcow2 */
    bool read_only;            /* the top; backing layers always are */
    bool direct;               /* cache=none */
    uint64_t l2_cache_bytes;   /* qcow2: L2 table cache per node; 0 =
                                  FMT_DEFAULT_L2_CACHE */
    uint64_t refcount_cache_bytes; /* 0 = FMT_DEFAULT_REFCOUNT_CACHE */
    const char *backing_root;  /* backing files must resolve inside this
                                  directory; NULL: the top image's own
                                  directory, and no local backing files at
                                  all under a top on RBD */
};

/* Opens a node and, for qcow2, its whole backing chain: backing names
 * relative to the overlay's directory or absolute, or rbd: specs (see
 * fmt_resolve_backing), the backing format from the header (probed only
 * when absent), every backing layer read-only, at most
 * FMT_MAX_CHAIN_DEPTH layers, no loops, every local file inside the
 * backing root.  Runs in a coroutine on loop. */
struct fmt_node *fmt_open_co(struct loop *loop, struct coro *co,
                             const char *spec,
                             const struct fmt_open_opts *opts,
                             struct error **errp);
/* The same from outside the loop (start-up): drives the loop until done. */
struct fmt_node *fmt_open(struct loop *loop, const char *spec,
                          const struct fmt_open_opts *opts,
                          struct error **errp);
/* Opens path as a qcow2 image on top of an already open chain (its
 * recorded backing name is not followed): the new top of an external
 * snapshot.  backing must stay open as long as the new node. */
struct fmt_node *fmt_open_overlay_co(struct loop *loop, struct coro *co,
                                     const char *path,
                                     struct fmt_node *backing,
                                     const struct fmt_open_opts *opts,
                                     struct error **errp);
/* Resolves a backing name recorded in an overlay named overlay, as the
 * chain opener does.  Under a local overlay: absolute paths as they are,
 * relative ones from the overlay's directory, rbd: specs checked
 * (rbd_spec_resolve_backing: a header may not set Ceph options).  Under an
 * RBD overlay: absolute paths are local files; rbd: specs and relative
 * names IMAGE[@SNAP] (the overlay's pool) are RBD images opened with what
 * the overlay's spec says of the cluster.  malloc'ed; NULL with *errp
 * set on error. */
char *fmt_resolve_backing(const char *overlay, const char *name,
                          struct error **errp);
/* The backing name to record in overlay's header so that it leads to the
 * layer layer (both specs as the chain opener resolved them): local files
 * by their path, RBD images by rbd_spec_backing_name().  malloc'ed; NULL
 * with *errp set on error. */
char *fmt_backing_name_for(const char *overlay, const char *layer,
                           struct error **errp);
/* Do the two specs name the same storage?  Local files by device and
 * inode (both must exist), RBD images by pool, namespace, image and
 * snapshot. */
bool fmt_same_layer(const char *a, const char *b);
/* Closes a node, its backing chain and their backends. */
void fmt_close(struct fmt_node *n);
/* The same from a coroutine on loop: a chain with RBD layers is closed on
 * a thread of its own (closing an image talks to the cluster), so the loop
 * keeps serving meanwhile.  Nothing may use the chain any more. */
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
int fmt_zero_co(struct fmt_node *n, struct coro *co, uint64_t off,
                uint64_t len, unsigned flags);
int fmt_discard_co(struct fmt_node *n, struct coro *co, uint64_t off,
                   uint64_t len, unsigned flags);
int fmt_block_status_co(struct fmt_node *n, struct coro *co, uint64_t off,
                        uint64_t len, struct fmt_extent *ext);
int fmt_cache_co(struct fmt_node *n, struct coro *co, uint64_t off,
                 uint64_t len);

/* Constructors of the concrete formats (used by fmt_open). */
struct fmt_node *raw_open(struct loop *loop, struct backend *file,
                          const struct fmt_open_opts *opts,
                          struct error **errp);
struct fmt_node *qcow2_open_co(struct loop *loop, struct coro *co,
                               struct backend *file,
                               const struct fmt_open_opts *opts,
                               struct error **errp);
/* The backing file name and format recorded in a qcow2 node (NULL when
 * there is none). */
const char *qcow2_backing_name(struct fmt_node *n);
const char *qcow2_backing_format(struct fmt_node *n);
/* Creates a new qcow2 image (fails if path exists): 64 KiB clusters,
 * version 3, backing_name/backing_fmt recorded when not NULL.  path is a
 * file or an rbd: spec (a new RBD image).  The image (and a file's
 * directory) is synced before this returns; on failure nothing is left
 * behind. */
int qcow2_create_co(struct loop *loop, struct coro *co, const char *path,
                    uint64_t size, const char *backing_name,
                    const char *backing_fmt, struct error **errp);
/* Rewrites the backing link recorded in a qcow2 node's header (one write
 * of the header cluster, synced before and after).  Other extensions are
 * kept.  The node's backing pointer is the caller's business. */
int qcow2_set_backing_co(struct fmt_node *n, struct coro *co,
                         const char *backing_name, const char *backing_fmt,
                         struct error **errp);

#endif
