/* strata — copy-before-write and snapshot-access: a point-in-time view of
 * a node that keeps being written (QEMU's block drivers of those names,
 * the pieces of a pull-mode backup).
 *
 * A copy-before-write node (cbw) sits over a source node (the guest's
 * disk) and a target node (a temporary image of the same size).  From the
 * instant it is attached, before any write, write-zeroes or trim reaches
 * a part of the source that has not been copied yet, the old content of
 * the clusters it touches is copied to the same offsets of the target
 * (cbw_before_write_co).  A snapshot-access node over a cbw reads the
 * view of that instant: copied clusters from the target, the others from
 * the source.
 *
 * The race, and the rule that defeats it: a snapshot read of a cluster
 * not yet copied reads the source; a guest write to that cluster could
 * change the source under the read.  So the copy of a cluster and the
 * snapshot read of a cluster both hold a range lock over the clusters
 * they touch (exclusive, per cluster-aligned range): a guest write that
 * must copy waits for the reads of its clusters, and a read waits for a
 * copy in progress; a cluster is marked copied only once its old data is
 * in the target, and a guest write to a copied cluster takes no lock.
 *
 * Everything runs on the source's loop; the functions ending in _co may
 * yield.  The cbw does not own its source or target: the caller keeps
 * both open until cbw_detach_co() returns.
 */
#ifndef STRATA_CBW_H
#define STRATA_CBW_H

#include <stdbool.h>
#include <stdint.h>

#include "format.h"

/* Granularity of the copy when the target has no larger cluster (QEMU's
 * default for backup: 64 KiB). */
#define CBW_MIN_CLUSTER (UINT64_C(64) << 10)
/* Largest copy done in one read and one write. */
#define CBW_MAX_COPY (UINT64_C(1) << 20)

/* A new cbw node over source and target (target->size >= source->size,
 * target writable), attached: from now on cbw_before_write_co copies.
 * One reference, the caller's (cbw_unref).  NULL with *errp on error. */
struct fmt_node *cbw_new(struct fmt_node *source, struct fmt_node *target,
                         struct error **errp);
/* Is n a cbw node? */
bool cbw_is(const struct fmt_node *n);
/* What a guest write, write-zeroes or trim of [off, off + len) of the
 * source must call before it reaches the source: copies the clusters it
 * touches that were not copied yet.  0, or the -errno of the copy (the
 * guest request must then fail: QEMU's on-cbw-error=break-guest-write).
 * 0 at once once detached. */
int cbw_before_write_co(struct fmt_node *cbw, struct coro *co, uint64_t off,
                        uint64_t len);
/* Bytes copied to the target so far (the job's progress). */
uint64_t cbw_copied_bytes(const struct fmt_node *cbw);
/* Stops copying and waits for the copies and snapshot reads in flight;
 * snapshot reads afterwards fail with -EIO (the view is gone).  The
 * source and target may be closed once it returns. */
void cbw_detach_co(struct fmt_node *cbw, struct coro *co);
void cbw_ref(struct fmt_node *cbw);
void cbw_unref(struct fmt_node *cbw);

/* A read-only snapshot-access node over cbw (takes a reference, dropped
 * when the node closes through fmt_close).  NULL with *errp on error. */
struct fmt_node *snapshot_access_new(struct fmt_node *cbw, const char *name,
                                     struct error **errp);

#endif
