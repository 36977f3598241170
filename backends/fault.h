/* strata — fault injection for tests: make the Nth backend operation fail.
 *
 * Only in builds configured with -Dfault_injection=true (CI's sanitizer
 * build); in every other build backend_fault_arm() says -ENOTSUP and the
 * hooks compile to nothing, so the normal data path carries no fake.
 *
 * A plan names the kinds of operations it counts (a mask of
 * BACKEND_FAULT_*), which one of them fails (the nth, counted from 1
 * after arming, across every backend of the process) and how: with an
 * error (-EIO, -ENOSPC, ...), as a short transfer (the backend sees
 * only part of the bytes moved and must resubmit the rest; the operation
 * then succeeds), as a crash (SIGKILL to the process, before the
 * operation), or as a hold (writes and flushes only: the operation waits,
 * its coroutine polling every millisecond, until the plan is replaced by
 * the next backend_fault_arm(), then runs: a slow sync at an exact step,
 * as long as a test needs).  A plan fires once.  The contract wrappers of backend.c
 * (the only way into a backend) run the hook; a short transfer is
 * simulated inside the backend (file.c).
 *
 * The plan is process-wide state: a test facility, touched only from the
 * loop thread (the QMP command and the wrappers).
 */
#ifndef STRATA_BACKEND_FAULT_H
#define STRATA_BACKEND_FAULT_H

#include <stdbool.h>
#include <stdint.h>

#include "strata-config.h"

#define BACKEND_FAULT_READ     (1u << 0)
#define BACKEND_FAULT_WRITE    (1u << 1)   /* pwritev */
#define BACKEND_FAULT_FLUSH    (1u << 2)
#define BACKEND_FAULT_ZERO     (1u << 3)
#define BACKEND_FAULT_DISCARD  (1u << 4)
#define BACKEND_FAULT_TRUNCATE (1u << 5)
#define BACKEND_FAULT_ALL      0x3fu

/* plan.error: instead of failing, the process kills itself (SIGKILL)
 * before the operation runs: a crash at an exact step. */
#define BACKEND_FAULT_KILL 1
/* plan.error: the operation waits until the plan is replaced (the hook
 * returns BACKEND_FAULT_HOLD; the wrapper calls backend_fault_hold_co). */
#define BACKEND_FAULT_HOLD 2

struct backend_fault_plan {
    unsigned ops;              /* BACKEND_FAULT_* counted */
    uint64_t nth;              /* >= 1; 0 disarms */
    int error;                 /* -errno to fail with; 0: short transfer
                                  (reads and writes only);
                                  BACKEND_FAULT_KILL: crash;
                                  BACKEND_FAULT_HOLD: wait (writes and
                                  flushes only) */
};

struct backend_fault_stats {
    uint64_t seen;             /* counted operations since arming */
    bool armed;                /* the plan has not fired yet */
    bool fired;
};

/* Replaces the plan (counting starts again).  -ENOTSUP when the build has
 * no fault injection, -EINVAL for a bad plan. */
int backend_fault_arm(const struct backend_fault_plan *p);
void backend_fault_get_stats(struct backend_fault_stats *st);

struct coro;
struct loop;

#if STRATA_FAULT_INJECTION
/* The wrappers' hook: 0, or the -errno this operation fails with, or
 * BACKEND_FAULT_HOLD when it is to wait (backend_fault_hold_co) first.
 * Sets *short_io when it is to be a short transfer instead. */
int backend_fault_hit(unsigned op, bool *short_io);
/* A held operation's wait: returns once the plan was replaced. */
void backend_fault_hold_co(struct loop *l, struct coro *co);
/* The backend's side of a short transfer: how many of res bytes (> 0) to
 * report, once per armed short fault. */
int backend_fault_shorten(int res);
#else
static inline int backend_fault_hit(unsigned op, bool *short_io)
{
    (void)op;
    *short_io = false;
    return 0;
}
static inline int backend_fault_shorten(int res)
{
    return res;
}
static inline void backend_fault_hold_co(struct loop *l, struct coro *co)
{
    (void)l;
    (void)co;
}
#endif

#endif
