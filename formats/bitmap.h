/* strata — named dirty bitmaps on a format node (QEMU's
 * BdrvDirtyBitmap).
 *
 * Every node keeps a list of named bitmaps, newest first (the order QEMU
 * lists them in).  A recording (enabled) bitmap is marked by every write,
 * write-zeroes and discard that reaches its node through the contract
 * wrappers (format.h), whoever sends it: a guest, a job copying into the
 * node.  A bitmap belongs to the node it was created on: it stays there
 * when a snapshot puts a new node on top, and goes away when a commit
 * drops the node (persistent ones stay in that node's image).
 *
 * Persistent bitmaps live in the image of a driver that can store them
 * (qcow2): loaded when the node opens, written back by fmt_bitmaps_store_co
 * (the node is closing or going read-only), marked "in use" in the image
 * all the while, so that a crash leaves them inconsistent on disk, never
 * silently stale.
 *
 * All of it runs on the node's loop; nothing here yields except the
 * _co functions.
 */
#ifndef STRATA_FMT_BITMAP_H
#define STRATA_FMT_BITMAP_H

#include <stdbool.h>
#include <stdint.h>

#include "coro.h"
#include "dirty-bitmap.h"
#include "error.h"

struct fmt_node;

/* QEMU's limits (BDRV_BITMAP_MAX_NAME_SIZE, granularity bits 9..31). */
#define FMT_BITMAP_MAX_NAME 1023u
#define FMT_BITMAP_MIN_GRAN (UINT64_C(1) << 9)
#define FMT_BITMAP_MAX_GRAN (UINT64_C(1) << 31)
/* Memory one bitmap may take (a 4 TiB disk at 512-byte granularity). */
#define FMT_BITMAP_MAX_BYTES (UINT64_C(1) << 30)

/* Bytes of memory the bits of a bitmap of a disk of size bytes take. */
static inline uint64_t fmt_bitmap_bytes(uint64_t size, uint64_t gran)
{
    return (size / gran + 1 + 7) / 8;
}

struct fmt_bitmap {
    struct fmt_bitmap *next;
    char *name;
    struct dbitmap bits;       /* bits.size follows the node's size */
    bool recording;            /* enabled: writes to the node mark it */
    bool persistent;           /* kept in the image (the driver can) */
    bool inconsistent;         /* found "in use" in the image: its content
                                  is unknown; only removal is allowed */
    bool readonly;             /* loaded from a read-only image: cannot
                                  change until the node becomes writable */
    bool stored;               /* present in the image's bitmap directory */
    unsigned busy;             /* users that need it unchanged (NBD
                                  exports): no change, no removal */
};

/* Why a bitmap cannot be used (QEMU's bdrv_dirty_bitmap_check). */
#define FMT_BITMAP_CHECK_BUSY         (1u << 0)
#define FMT_BITMAP_CHECK_RO           (1u << 1)
#define FMT_BITMAP_CHECK_INCONSISTENT (1u << 2)
#define FMT_BITMAP_CHECK_DEFAULT      (FMT_BITMAP_CHECK_BUSY | \
                                       FMT_BITMAP_CHECK_RO | \
                                       FMT_BITMAP_CHECK_INCONSISTENT)
#define FMT_BITMAP_CHECK_ALLOW_RO     (FMT_BITMAP_CHECK_BUSY | \
                                       FMT_BITMAP_CHECK_INCONSISTENT)

/* The bitmap called name on n, or NULL. */
struct fmt_bitmap *fmt_bitmap_find(struct fmt_node *n, const char *name);
/* QEMU's default granularity: the cluster size within [4 KiB, 64 KiB],
 * 64 KiB for formats without clusters. */
uint64_t fmt_bitmap_default_gran(const struct fmt_node *n);
/* Fails, with QEMU's message, when bm cannot be used for what flags
 * forbid.  Returns 0 or -errno. */
int fmt_bitmap_check(const struct fmt_bitmap *bm, unsigned flags,
                     struct error **errp);

/* Can n keep a persistent bitmap called name of granularity gran?  0, or
 * -ENOTSUP (its format cannot), -EROFS (read-only node) or the driver's
 * reason (a phrase in *errp, no prefix). */
int fmt_bitmap_can_store(struct fmt_node *n, const char *name, uint64_t gran,
                         struct error **errp);
/* Creates an empty bitmap (QMP block-dirty-bitmap-add).  gran is a power
 * of two in [FMT_BITMAP_MIN_GRAN, FMT_BITMAP_MAX_GRAN] (the caller
 * checked).  persistent: fmt_bitmap_can_store must agree; it is written to
 * the image at once (an empty, in-use entry), so that it survives a crash
 * as inconsistent rather than vanishing.  Returns the bitmap or NULL. */
struct fmt_bitmap *fmt_bitmap_add_co(struct fmt_node *n, struct coro *co,
                                     const char *name, uint64_t gran,
                                     bool persistent, bool disabled,
                                     struct error **errp);
/* Deletes bm (not busy): from the image too when stored there. */
int fmt_bitmap_remove_co(struct fmt_node *n, struct coro *co,
                         struct fmt_bitmap *bm, struct error **errp);
/* For transactions: takes bm off n's list (*prev: the bitmap before it,
 * NULL at the head) and puts it back where it was; while detached it is
 * invisible but kept.  fmt_bitmap_drop_co then deletes a detached bitmap
 * for good: from the image too when stored there (on failure it stays
 * there, flagged in use: inconsistent when the image is opened again);
 * bm is freed either way. */
void fmt_bitmap_detach(struct fmt_node *n, struct fmt_bitmap *bm,
                       struct fmt_bitmap **prev);
void fmt_bitmap_reattach(struct fmt_node *n, struct fmt_bitmap *bm,
                         struct fmt_bitmap *prev);
int fmt_bitmap_drop_co(struct fmt_node *n, struct coro *co,
                       struct fmt_bitmap *bm, struct error **errp);
/* Frees every bitmap of n without writing anything (closing). */
void fmt_bitmaps_free(struct fmt_node *n);

/* Marks [off, off + len) in every recording bitmap of n. */
static inline void fmt_bitmaps_mark(struct fmt_bitmap *list, uint64_t off,
                                    uint64_t len)
{
    for (struct fmt_bitmap *bm = list; bm; bm = bm->next)
        if (bm->recording)
            dbitmap_set(&bm->bits, off, len);
}
/* The node grew or shrank: every bitmap follows (new bytes clean). */
int fmt_bitmaps_resize(struct fmt_node *n, uint64_t size);

/* Writes the persistent bitmaps of a writable node to its image, marked
 * consistent (not in use), as QEMU does when it closes an image or makes
 * it read-only.  Nothing may write to the node afterwards (it closes or
 * becomes read-only).  0 without persistent bitmaps. */
int fmt_bitmaps_store_co(struct fmt_node *n, struct coro *co,
                         struct error **errp);

#endif
