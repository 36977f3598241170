/* strata — the qcow2 format driver: internal interfaces shared by its parts.
 *
 * The driver is split by concern:
 *   qcow2-header.c    pure parsing/serialising of the header and entries
 *   qcow2-cache.c     bounded LRU cache of metadata tables (L2, refcount)
 *   qcow2-refcount.c  refcounts, cluster allocation, refcount table growth,
 *                     refcount rebuild of a dirty image
 *   qcow2-map.c       cluster map: L1/L2 lookup, L2 allocation and update
 *   qcow2-compress.c  zlib and zstd decompression of compressed clusters
 *   qcow2-bitmap.c    persistent dirty bitmaps: load, store, directory
 *   qcow2-alloc.c     writes in steps (overwrite in place, allocate,
 *                     copy-on-write, link), zeroing, discard, pending frees
 *   qcow2.c           open/close, read, flush, block status, reopen, grow,
 *                     the ops table
 *
 * Locking (one loop thread, cooperative coroutines): s->lock (see struct
 * qcow2) is held while metadata is looked up or changed.  It is never held
 * across guest data I/O.  An allocating write registers its guest clusters
 * in s->allocs before dropping the lock; any request that would change the
 * mapping of those clusters waits for it and retries.  Host ranges with
 * data I/O in flight are registered in s->busy, and the allocator never
 * hands out a busy cluster, so a cluster freed by a concurrent discard
 * cannot be reused while a stale read or write still targets it.
 * Functions that need the lock say so in their name (_locked) or in the
 * section heading below, and assert it.
 *
 * Durability order (crash safety):
 *   refcount block (durable)  before  the L2 entry that points at the cluster
 *   new L2 table (durable)    before  the L1 entry that points at it
 *   new refcount block/table (durable) before the table/header pointing at it
 * enforced by the cache dependency (L2 cache -> refcount cache), by
 * write-through of the refcount table and the header, and by the flush,
 * which alone writes L1 entries that point at new L2 tables: after the
 * sync that made those tables durable.  "Durable" is a write with FUA
 * (RWF_DSYNC semantics): refcount blocks, the refcount table and header
 * switches are written that way, so that no step needs a sync of the
 * whole file — which, with much guest data in the page cache, takes long
 * — while it holds the lock.  An allocating write does no durable write
 * at all unless it creates a refcount block: a new L2 table stays in the
 * cache, its L1 entry in memory (see l1_disk), until the next flush.
 * The lock is never held across a backend flush; see qcow2_flush_co for
 * how a flush keeps the order without it.  Nor across the durable writes
 * of a new refcount block and its refcount table entry (the block's
 * clusters are handed out only once both are done), nor across those of
 * a refcount table growth (its new blocks and table, then the header
 * switch: grow_reftable_co; only requests that need a new refcount block
 * wait for it), nor across the write-back of
 * dirty cache entries that a request needs room for
 * (qcow2_make_room_locked_co).  An allocation that dropped the lock says
 * so (s->alloc_unlocked): its caller looks up again what it had looked
 * up before.  Header writes never overlap (s->hdr_writing).  Still
 * under the lock: a write-back the room could not prevent (a cache whose
 * every entry is pinned or dirty again), and the control path's own
 * header and table writes (resize, backing link, bitmap directory).
 */
#ifndef STRATA_QCOW2_H
#define STRATA_QCOW2_H

#include <stdbool.h>
#include <stdint.h>

#include "coro.h"
#include "format.h"
#include "qcow2-header.h"

struct qcow2;

/* ---------------- metadata cache (s->lock held) ---------------- */

struct qcow2_cache_entry {
    uint64_t offset;              /* host offset of the table; 0 = unused */
    uint8_t *table;               /* cluster_size bytes, on-disk format */
    unsigned pins;
    bool dirty;                   /* differs from what is (being) written */
    bool wb;                      /* a copy is being written by a flush */
    int hash_next;                /* chain in the hash buckets, -1 = end */
    struct qcow2_cache_entry *lru_prev, *lru_next;
};

struct qcow2_cache {
    struct qcow2 *s;
    const char *what;             /* "L2 table", "refcount block" */
    unsigned n;                   /* entries */
    struct qcow2_cache_entry *e;
    int *buckets;                 /* hash of offset -> entry index */
    unsigned nbuckets;            /* power of two */
    struct qcow2_cache_entry *lru_head, *lru_tail; /* head = most recent */
    struct qcow2_cache *depends;  /* durable before any write here */
    bool write_through;           /* every write with FUA (durable when
                                     done): refcount blocks */
    unsigned n_wb;                /* entries under write-back */
    struct co_queue wb_waiters;   /* wait for a write-back to end */
    uint64_t hits, misses;
};

/* The write-back of a flush: copies of the dirty entries taken under the
 * lock, written without it. */
struct qcow2_cache_wb {
    struct {
        struct qcow2_cache_entry *e;
        uint8_t *copy;
        uint64_t offset;
    } *items;
    unsigned n;
};

int qcow2_cache_init(struct qcow2_cache *c, struct qcow2 *s, const char *what,
                     unsigned entries);
void qcow2_cache_destroy(struct qcow2_cache *c);
/* Pins the table at host offset off and returns it.  With fresh, the
 * table is not read but zero-filled (a newly allocated cluster). */
int qcow2_cache_get_co(struct qcow2_cache *c, struct coro *co, uint64_t off,
                       bool fresh, struct qcow2_cache_entry **ep);
void qcow2_cache_put(struct qcow2_cache *c, struct qcow2_cache_entry *e);
void qcow2_cache_mark_dirty(struct qcow2_cache *c, struct qcow2_cache_entry *e);
/* Writes back every dirty table (after the dependency). */
int qcow2_cache_flush_co(struct qcow2_cache *c, struct coro *co);
/* Writes back one pinned table now (after the dependency), with FUA:
 * durable on return. */
int qcow2_cache_write_now_co(struct qcow2_cache *c, struct coro *co,
                             struct qcow2_cache_entry *e);
/* Starts the write-back of every dirty entry: copies them into wb and
 * marks them clean and under write-back.  No write-back may be running
 * (qcow2_cache_wait_wb_locked_co).  Does not yield. */
int qcow2_cache_wb_begin_locked(struct qcow2_cache *c, struct coro *co,
                                struct qcow2_cache_wb *wb);
/* Writes the copies (FUA for a write-through cache) and ends the
 * write-back: an entry whose write failed is dirty again.  Without the
 * lock.  Frees what wb holds. */
int qcow2_cache_wb_write_co(struct qcow2_cache *c, struct coro *co,
                            struct qcow2_cache_wb *wb);
/* Ends a write-back that will not be written (the entries stay dirty). */
void qcow2_cache_wb_abort(struct qcow2_cache *c, struct qcow2_cache_wb *wb);
/* If a write-back is running, waits (dropping the lock) for one to end and
 * returns 1 (the caller looks again); 0 if none is running. */
int qcow2_cache_wait_wb_locked_co(struct qcow2_cache *c, struct coro *co);
/* Makes sure the next want misses (at most 8) find a clean entry to
 * take instead of one they would have to write back under the lock: the
 * dirty ones at the LRU end are written back with the lock dropped
 * (after the dependency, as any write-back).  Returns 0 if it kept the
 * lock throughout, 1 if it dropped it (whatever the caller looked up
 * before must be looked up again), or -errno.  Best effort: entries
 * pinned or changed meanwhile are left to the miss. */
int qcow2_cache_make_room_locked_co(struct qcow2_cache *c, struct coro *co,
                                    unsigned want);
bool qcow2_cache_has_dirty(const struct qcow2_cache *c);
/* Whether the table at host offset off is in the cache. */
bool qcow2_cache_contains(const struct qcow2_cache *c, uint64_t off);
/* Forgets a pinned table (pinned once) without writing it: the cluster is
 * being freed after a failed allocation. */
void qcow2_cache_drop(struct qcow2_cache *c, struct qcow2_cache_entry *e);

/* ---------------- in-flight lists ---------------- */

struct qcow2_alloc {               /* an allocating write in progress */
    uint64_t gstart, gend;         /* guest bytes, cluster-aligned */
    struct co_queue waiters;
    struct qcow2_alloc *next, *prev;
};

struct qcow2_busy {                /* data I/O in flight on host bytes */
    uint64_t hstart, hend;
    struct qcow2_busy *next, *prev;
};

/* A host range that stops being referenced (COW of a shared or compressed
 * cluster, discard, zeroing with deallocation).  It keeps its refcount
 * until the L2 tables that dropped it are on disk: otherwise a crash
 * could leave an old L2 entry pointing at a cluster with too low a
 * refcount.  Released by the flush. */
struct qcow2_pending_free {
    uint64_t off, len;
};

#define QCOW2_MAX_PENDING_FREES 4096

/* ---------------- the image ---------------- */

struct qcow2 {
    struct fmt_node node;          /* first member: node <-> image */
    struct qcow2_header h;
    uint8_t *hdr;                  /* first cluster as on disk */

    uint8_t *l1;                   /* active L1, on-disk format, rounded up
                                      to whole clusters */
    uint64_t l1_bytes;             /* allocated bytes of s->l1 */
    /* The active L1 as the file holds it, or will once the write of a
     * flush in progress ends (same size as l1).  An entry that points at
     * a new L2 table differs between the two until a flush has made the
     * table durable and written the entry: every L1 write goes out of
     * l1_disk (also the neighbours a rounded write takes along). */
    uint8_t *l1_disk;
    uint64_t l1_dirty_lo, l1_dirty_hi; /* l1 entries [lo, hi) may differ
                                          from l1_disk; lo == hi: none */
    bool l1_wb;                    /* a flush is writing l1_disk */
    struct co_queue l1_wb_waiters;
    uint8_t *reftable;             /* refcount table, on-disk format */
    uint64_t reftable_entries;
    uint64_t reftable_used;        /* entries at or past this are 0 (an
                                      upper bound: the overlap check
                                      scans only below it) */

    struct qcow2_cache l2_cache;
    struct qcow2_cache rb_cache;

    /* The image's metadata lock.  Protects: both caches (entries, pins,
     * dirty flags, LRU), the in-memory L1 and refcount tables, the header
     * fields that change while the image is open (s->h, s->hdr: table
     * offsets and sizes, the virtual size), the lists allocs and
     * pending frees, free_cluster_index and broken.  busy is added to
     * under it and removed from without it (no yield in between).
     * Not protected: guest data I/O (never done under it) and the
     * decompression buffer zbuf (see qcow2_load_compressed_co).
     * Lock order: a leaf.  A coroutine holds at most one image's lock and
     * takes no other lock while holding it (reads of the backing chain
     * happen without it); it is held across metadata I/O only. */
    struct co_mutex lock;

    struct qcow2_alloc *allocs;
    struct qcow2_busy *busy;
    struct qcow2_pending_free *frees;
    size_t n_frees, cap_frees;

    /* A refcount block is being created, its writes in flight without
     * the lock (ensure_block_co): nobody else creates one or grows the
     * refcount table meanwhile; they wait here and search again. */
    bool rb_creating;
    struct co_queue rb_create_waiters;
    /* The refcount table is being replaced (grow_reftable_co), its new
     * blocks, table and header in flight without the lock: nobody creates
     * a refcount block or grows the table meanwhile; they wait on
     * rb_create_waiters and search again.  Allocations that need no new
     * block go on. */
    bool rt_growing;
    /* Times the allocator dropped the lock (a refcount block created, the
     * refcount table grown, or a wait for either): a caller compares it
     * around an allocation to know whether what it looked up before may
     * have changed. */
    uint64_t alloc_unlocked;
    /* The header is being written without the lock (the switch of a
     * refcount table growth).  Every other header write is built from
     * s->h / s->hdr under the lock and waits here first
     * (qcow2_header_wait_locked_co), so that header writes never
     * overlap and none puts back what another changed. */
    bool hdr_writing;
    struct co_queue hdr_waiters;

    uint64_t free_cluster_index;   /* no free cluster below this one */
    uint32_t io_align;             /* backend alignment for metadata I/O */
    bool has_zero_flag;            /* version 3 */
    bool broken;                   /* corruption seen: no more writes */
    bool refcounts_audited;        /* the refcount audit ran */

    uint8_t *zbuf;                 /* last decompressed cluster */
    uint64_t zkey;                 /* its raw L2 entry; 0 = none */
    uint8_t *zeros;                /* one cluster of zeros (zeroing) */

    /* The bitmap directory the header names (qcow2-bitmap.c); under the
     * lock.  bm_nb == 0: no bitmaps extension. */
    uint64_t bm_dir_offset, bm_dir_size;
    uint32_t bm_nb;

    char backing_name[QCOW2_MAX_BACKING_NAME + 1];
    char backing_format[QCOW2_MAX_FORMAT_NAME + 1];
    bool has_backing_name, has_backing_format;
};

static inline struct qcow2 *qcow2_of(struct fmt_node *n)
{
    return (struct qcow2 *)n;
}

static inline uint64_t qcow2_cs(const struct qcow2 *s)
{
    return s->h.cluster_size;
}

static inline uint64_t qcow2_start_of_cluster(const struct qcow2 *s,
                                              uint64_t off)
{
    return off & ~(qcow2_cs(s) - 1);
}

/* Takes s->lock.  A wait of QCOW2_LOCK_WAIT_LOG_NS or more is logged
 * (debug): what the requests of an image wait for. */
#define QCOW2_LOCK_WAIT_LOG_NS 5000000
void qcow2_lock_co(struct qcow2 *s, struct coro *co);

/* Room in the caches for the lookups and changes of one request at
 * guest offset off (a write with write), written back without the lock
 * (qcow2_cache_make_room_locked_co).  Called with the lock held before
 * anything is looked up: it may drop it.  Returns 0 or -errno. */
int qcow2_make_room_locked_co(struct qcow2 *s, struct coro *co, uint64_t off,
                              bool write);

/* Called with the lock held by a header writer before it builds the
 * header from s->h / s->hdr: waits (dropping the lock) while another
 * header write is in flight.  Returns 1 if it waited (what the caller
 * looked up before may have changed), 0 if not. */
int qcow2_header_wait_locked_co(struct qcow2 *s, struct coro *co);

/* Reports metadata corruption: logs it, marks the image broken (no more
 * writes) and returns -EIO. */
int qcow2_corrupt(struct qcow2 *s, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Allocates an aligned metadata/data buffer (free with free()). */
void *qcow2_buf_alloc(const struct qcow2 *s, size_t len);

/* Writes bytes [off, off+len) of an in-memory copy of host range
 * [base, base + buflen) (the header, L1 or refcount table), rounded out to
 * the backend's alignment.  flags: 0 or BACKEND_FUA. */
int qcow2_write_meta_co(struct qcow2 *s, struct coro *co, const uint8_t *buf,
                        uint64_t base, uint64_t buflen, uint64_t off,
                        uint64_t len, unsigned flags);

/* ---------------- busy host ranges ---------------- */

void qcow2_busy_add(struct qcow2 *s, struct qcow2_busy *b, uint64_t hstart,
                    uint64_t len);
void qcow2_busy_del(struct qcow2 *s, struct qcow2_busy *b);
bool qcow2_busy_overlaps(const struct qcow2 *s, uint64_t hstart,
                         uint64_t len);

/* ---------------- refcounts (s->lock held) ---------------- */

int qcow2_refcount_get_co(struct qcow2 *s, struct coro *co, uint64_t cluster,
                          uint64_t *rc);
/* Adds addend (+1 or -1) to the refcount of every cluster touching host
 * bytes [off, off+len). */
int qcow2_refcount_update_co(struct qcow2 *s, struct coro *co, uint64_t off,
                             uint64_t len, int addend);
/* Host range [off, off+len) about to be written as what ("a data
 * cluster") must not hit metadata in use: the header, the active L1 and
 * refcount tables, a refcount block or an active L2 table.  Otherwise the
 * image is corrupt (its refcounts or L2 entries lie) and writing would
 * destroy the metadata or the data: qcow2_corrupt.  Checked for data
 * written in place and for every allocated run (a cluster with refcount 0
 * that holds metadata). */
int qcow2_check_meta_overlap_locked(struct qcow2 *s, uint64_t off,
                                    uint64_t len, const char *what);
/* Allocates between 1 and want contiguous free clusters (refcount 1).
 * Returns their host offset in *host and their number in *got. */
int qcow2_alloc_clusters_co(struct qcow2 *s, struct coro *co, uint64_t want,
                            uint64_t *host, uint64_t *got);
/* Allocates exactly n contiguous clusters. */
int qcow2_alloc_exact_co(struct qcow2 *s, struct coro *co, uint64_t n,
                         uint64_t *host);
/* Checks the refcounts against what the metadata uses (header, L1, L2
 * and refcount tables, refcount blocks, data and compressed clusters,
 * snapshots, bitmaps), as 'qemu-img check' does: every cluster in use has
 * a refcount, at least as many as its users, and one that a user holds
 * alone (metadata, an entry with the COPIED flag) has no other user.
 * Otherwise two users would end up sharing a cluster: the allocator hands
 * out clusters whose refcount is 0, a free drops a refcount, a write in
 * place changes what both see.  Runs once per open image, before it takes
 * writes: when it is opened or reopened writable, or before (commit:
 * qcow2_prepare_writable_co, outside the quiesce); what it finds marks
 * the image corrupt (qcow2_corrupt: reads go on, writes fail with EIO).
 * A read that fails leaves it undone (logged): the first write runs it
 * again, under the lock, and fails if it fails.  Reads each L2 table
 * once and holds one byte per cluster of the file meanwhile. */
int qcow2_audit_refcounts_co(struct qcow2 *s, struct coro *co);
/* The same without the lock, for an image that takes no writes until it
 * returns (being opened, or read-only): the lock is taken around each
 * cache lookup only, so requests that read go on meanwhile. */
int qcow2_audit_refcounts_unlocked_co(struct qcow2 *s, struct coro *co);
/* Rebuilds every refcount from the metadata (dirty image, lazy
 * refcounts).  Leaves the image consistent on disk. */
int qcow2_rebuild_refcounts_co(struct qcow2 *s, struct coro *co,
                               const struct qcow2_extensions *ext,
                               struct error **errp);

/* ---------------- cluster map (s->lock held) ---------------- */

/* Guest-visible state of a run of bytes starting at a guest offset. */
struct qcow2_map {
    enum qcow2_cluster_type type;  /* of the first (sub)cluster */
    uint64_t len;                  /* bytes of the run with this type (and,
                                      for NORMAL, contiguous host bytes) */
    uint64_t host;                 /* NORMAL: host offset of the first byte;
                                      COMPRESSED: the entry's data offset */
    struct qcow2_l2_entry e;       /* the entry of the first cluster */
    uint64_t raw, bitmap;          /* the entry as on disk (host order) */
    bool copied;                   /* NORMAL run: every cluster copied */
};

/* Records that active L1 entry i changed in memory (written by the next
 * flush). */
void qcow2_l1_mark_dirty_locked(struct qcow2 *s, uint64_t i);

/* Looks up the run starting at guest offset off, at most len bytes, never
 * crossing an L2 table. */
int qcow2_map_get_co(struct qcow2 *s, struct coro *co, uint64_t off,
                     uint64_t len, struct qcow2_map *m);
/* Pins the L2 table covering guest offset off for modification, allocating
 * it (or copying a shared one) first.  *idx is the entry index. */
int qcow2_l2_for_write_co(struct qcow2 *s, struct coro *co, uint64_t off,
                          struct qcow2_cache_entry **l2, unsigned *idx);
/* Entry i of an L2 table (host order); bitmap is 0 without extended L2. */
void qcow2_l2_read(const struct qcow2 *s, const uint8_t *l2, unsigned i,
                   uint64_t *entry, uint64_t *bitmap);
void qcow2_l2_write(const struct qcow2 *s, uint8_t *l2, unsigned i,
                    uint64_t entry, uint64_t bitmap);

/* ---------------- read (qcow2.c), without the lock ---------------- */

/* Reads guest bytes of the backing chain (zeros where there is none). */
int qcow2_read_backing_co(struct qcow2 *s, struct coro *co,
                          const struct iovec *iov, int iovcnt, uint64_t off);
/* Decompresses the compressed cluster of entry e (raw as on disk) into
 * s->zbuf.  The caller copies out of s->zbuf before it yields again. */
int qcow2_load_compressed_co(struct qcow2 *s, struct coro *co,
                             const struct qcow2_l2_entry *e, uint64_t raw);

/* ---------------- flush (qcow2.c) ---------------- */

/* The ops-table flush: everything acknowledged before it is on disk.
 * Takes the lock only to start and to end, never across I/O. */
int qcow2_flush_co(struct fmt_node *n, struct coro *co);
/* The same for this image alone, not a writable backing node: what a FUA
 * write needs (its data and the metadata that finds it; what it copied
 * from the backing chain is in its own clusters).  A snapshot's old top
 * is flushed for a guest FLUSH only, never for a FUA write on the new
 * top, which would wait for the old top's sync. */
int qcow2_flush_own_co(struct fmt_node *n, struct coro *co);

/* ---------------- writes (qcow2-alloc.c), without the lock ---------------- */

int qcow2_pwritev_co(struct fmt_node *n, struct coro *co,
                     const struct iovec *iov, int iovcnt, uint64_t off,
                     unsigned flags);
int qcow2_zero_co(struct fmt_node *n, struct coro *co, uint64_t off,
                  uint64_t len, unsigned flags);
int qcow2_discard_co(struct fmt_node *n, struct coro *co, uint64_t off,
                     uint64_t len, unsigned flags);
/* Queues the host cluster(s) of an L2 entry that was just replaced, to be
 * freed once the L2 table is on disk (by a flush, which the write path
 * runs when QCOW2_MAX_PENDING_FREES are queued). */
int qcow2_defer_free_locked_co(struct qcow2 *s, struct coro *co,
                               const struct qcow2_l2_entry *e);
/* The same for host bytes [off, off + len) that stop being referenced
 * (an L2 table an L1 entry no longer points at). */
int qcow2_defer_free_range_locked(struct qcow2 *s, uint64_t off,
                                  uint64_t len);

/* ---------------- persistent bitmaps (qcow2-bitmap.c) ---------------- */

/* Opening: the bitmaps of the directory become n->bitmaps (in-use ones
 * inconsistent, the others loaded).  A malformed or unsupported
 * directory fails the open. */
int qcow2_bitmaps_load_co(struct qcow2 *s, struct coro *co,
                          const struct qcow2_extensions *ext,
                          struct error **errp);
/* The ops (format.h: bitmap_can_store, bitmaps_write_co). */
int qcow2_bitmap_can_store(struct fmt_node *n, const char *name,
                           uint64_t gran, struct error **errp);
int qcow2_bitmaps_write_co(struct fmt_node *n, struct coro *co,
                           bool store_data, struct error **errp);

/* ---------------- compression ---------------- */

/* Decompresses one cluster (out: cluster_size bytes) from in/inlen.
 * Returns 0, or -EIO if the data is not a valid compressed cluster. */
int qcow2_decompress(unsigned compression_type, const uint8_t *in,
                     size_t inlen, uint8_t *out, size_t outlen);

#endif
