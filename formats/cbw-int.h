/* strata — the state shared by the copy-before-write filter (cbw.c) and
 * the snapshot-access node (snapshot-access.c). */
#ifndef STRATA_CBW_INT_H
#define STRATA_CBW_INT_H

#include "cbw.h"
#include "coro.h"
#include "dirty-bitmap.h"

/* A locked cluster-aligned range [start, end): a copy in progress or a
 * snapshot read.  Lives in the frame of the coroutine holding it. */
struct cbw_range {
    uint64_t start, end;
    struct co_queue waiters;   /* wait for it to be unlocked */
    struct cbw_range *next;
};

struct cbw {
    struct fmt_node n;         /* first: a cbw is a node */
    struct fmt_node *source;   /* the guest's node (not owned); NULL once
                                  detached */
    struct fmt_node *target;   /* the temporary image (not owned) */
    uint64_t cluster;          /* copy granularity (power of two) */
    struct dbitmap copied;     /* set: the cluster's old data is in the
                                  target (read there by snapshot-access) */
    bool attached;             /* copying before writes */
    unsigned refs;             /* the attacher's and every snapshot-access
                                  node's */
    /* Every range locked (copies and snapshot reads); protects the
     * source's clusters not yet copied from changing under a snapshot
     * read.  No other lock nests inside it. */
    struct cbw_range *locks;
    struct co_queue idle;      /* cbw_detach_co waits for locks == NULL */
};

struct cbw *cbw_of(struct fmt_node *n);
/* Waits until no locked range overlaps [start, end), then locks it. */
void cbw_lock_co(struct cbw *s, struct cbw_range *r, struct coro *co,
                 uint64_t start, uint64_t end);
void cbw_unlock(struct cbw *s, struct cbw_range *r);

#endif
