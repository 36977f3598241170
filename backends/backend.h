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
     * as zeros).  May yield. */
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
};

struct backend_open_opts {
    bool read_only;
    bool direct;           /* O_DIRECT / no host page cache (cache=none) */
    bool create;           /* create the storage if missing (size below) */
    uint64_t create_size;
};

/* Does spec name remote storage (an rbd: image) rather than a local path?
 * Such specs are not resolved against directories, stat()ed or unlinked. */
static inline bool backend_spec_is_remote(const char *spec)
{
    return spec[0] == 'r' && spec[1] == 'b' && spec[2] == 'd' && spec[3] == ':';
}

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

/* Constructors of the concrete backends (used by backend_open). */
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

#endif
