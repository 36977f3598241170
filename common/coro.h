/* strata — stackful coroutines for request code.
 *
 * Request code in formats/ (and later jobs) is written as straight-line code
 * that yields while a backend operation is in flight.  A coroutine runs on a
 * pooled stack (guard page below it) and is switched to with a few
 * instructions of assembly on x86-64 (ucontext elsewhere).
 *
 * Rules:
 *  - Only the event loop enters coroutines (coro_enter() from loop context,
 *    never from inside a coroutine): there is no nesting, so a coroutine
 *    that wakes another one schedules it (coro_wake()) instead of entering.
 *  - A coroutine is owned by one loop and never migrates.
 *  - Functions that may yield carry the suffix _co and take the running
 *    coroutine explicitly as a parameter (no hidden "current coroutine").
 */
#ifndef STRATA_CORO_H
#define STRATA_CORO_H

#include <stdbool.h>
#include <stddef.h>

struct coro;
struct coro_pool;

typedef void coro_fn(struct coro *self, void *arg);

/* Called when a coroutine has to be resumed later by the loop (coro_wake). */
typedef void coro_schedule_fn(void *opaque, struct coro *co);

struct coro_pool *coro_pool_new(size_t stack_size, unsigned max_free,
                                coro_schedule_fn *schedule, void *opaque);
void coro_pool_free(struct coro_pool *pool);

/* Takes a coroutine from the pool (or creates one); returns NULL only when
 * memory for a new stack cannot be had. */
struct coro *coro_create(struct coro_pool *pool, coro_fn *fn, void *arg);

/* Switches into co until it yields or returns.  A coroutine that returned
 * goes back to the pool by itself.  Loop context only. */
void coro_enter(struct coro *co);

/* Gives control back to whoever entered self. */
void coro_yield(struct coro *self);

/* Asks the loop to enter co soon (from a completion handler or from another
 * coroutine).  co must be yielded and not already scheduled, or freshly
 * created by coro_create() and never entered (a coroutine starting another
 * one: it may not coro_enter() it). */
void coro_wake(struct coro *co);

/* Next-pointer for the loop's run queue and for wait queues. */
struct coro **coro_link(struct coro *co);

/* ---- wait queues and a mutex for coroutines (same loop only) ---- */

struct co_queue {
    struct coro *head, *tail;
};

/* Waits until woken by co_queue_wake_*(). */
void co_queue_wait_co(struct co_queue *q, struct coro *self);
/* Schedules the first / every waiter; returns whether anyone was waiting. */
bool co_queue_wake_one(struct co_queue *q);
bool co_queue_wake_all(struct co_queue *q);
static inline bool co_queue_empty(const struct co_queue *q)
{
    return q->head == NULL;
}

/* A cooperative mutex: lock may yield; unlock hands the lock to the first
 * waiter (fair, no barging). */
struct co_mutex {
    struct coro *owner;
    struct co_queue waiters;
};
void co_mutex_lock_co(struct co_mutex *m, struct coro *self);
void co_mutex_unlock(struct co_mutex *m, struct coro *self);
/* Whether self holds m: for assertions in functions that need the lock. */
static inline bool co_mutex_held(const struct co_mutex *m,
                                 const struct coro *self)
{
    return m->owner == self;
}
/* Whether anyone holds m: for assertions where the caller is not known. */
static inline bool co_mutex_locked(const struct co_mutex *m)
{
    return m->owner != NULL;
}

#endif
