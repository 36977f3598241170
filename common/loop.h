/* strata — the io_uring event loop.
 *
 * One loop per thread.  Sockets (accept, recv, send) and file I/O share one
 * ring; submission is batched (SQEs are queued while handlers run and sent
 * with one io_uring_enter per iteration); completions are reaped in exactly
 * one place, loop_run(), which calls the handler of each one.
 *
 * Every SQE carries a pointer to a struct loop_op embedded in its owner
 * (a connection, a request, a listener); the owner guarantees the op stays
 * alive until its completion has been delivered.  Everything the loop needs
 * hangs off struct loop: there is no global mutable state.  Another thread
 * reaches a loop only through loop_post() (docs/threads.md).
 */
#ifndef STRATA_LOOP_H
#define STRATA_LOOP_H

#include <liburing.h>
#include <stdbool.h>
#include <stdint.h>

#include "coro.h"

struct loop;
struct loop_op;

/* res is the CQE result (>= 0, or -errno); flags the CQE flags. */
typedef void loop_op_fn(struct loop_op *op, int res, uint32_t flags);

struct loop_op {
    loop_op_fn *done;
};

/* Called once per loop iteration, after completions were handled and
 * before submitting: used to batch work (kick sends, accept). */
struct loop_hook {
    void (*fn)(struct loop_hook *h);
    struct loop_hook *next;
    bool queued;
};

/* Called every tick (about once a second) with the monotonic time in ns. */
struct loop_timer {
    void (*fn)(struct loop_timer *t, uint64_t now_ns);
    struct loop_timer *next, *prev;
};

/* Ring features, probed once in loop_new() and fallen back from one by
 * one when the kernel lacks them (docs/io_uring.md says which kernel gives
 * what).  STRATA_URING_DISABLE (a comma-separated list of the names below,
 * or "all") turns features off, to test the fallbacks on a kernel that has
 * them all. */
enum {
    LOOP_F_SINGLE_ISSUER = 1u << 0,  /* IORING_SETUP_SINGLE_ISSUER */
    LOOP_F_DEFER_TASKRUN = 1u << 1,  /* completions run only when we wait */
    LOOP_F_COOP_TASKRUN = 1u << 2,   /* no IPI to interrupt the loop */
    LOOP_F_RING_FD = 1u << 3,        /* the ring fd is registered */
    LOOP_F_BUF_RING = 1u << 4,       /* provided-buffer rings */
    LOOP_F_RECV_MULTISHOT = 1u << 5, /* one recv armed for many messages */
};

/* The features that tie a ring to the thread that made it: a loop made on
 * one thread and run on another (nbdkit's plugin) goes without them. */
#define LOOP_F_THREAD_BOUND \
    (LOOP_F_SINGLE_ISSUER | LOOP_F_DEFER_TASKRUN | LOOP_F_RING_FD)

struct loop *loop_new(unsigned entries, size_t coro_stack, char **errmsg);
/* loop_new() without the features in disable (LOOP_F_* bits). */
struct loop *loop_new_without(unsigned entries, size_t coro_stack,
                              unsigned disable, char **errmsg);
void loop_free(struct loop *l);

/* LOOP_F_* in use.  LOOP_F_RECV_MULTISHOT is an optimistic guess until a
 * receive proved otherwise (loop_no_multishot). */
unsigned loop_features(const struct loop *l);
/* A multishot receive was refused (-EINVAL): the kernel lacks it. */
void loop_no_multishot(struct loop *l);
/* "single_issuer,defer_taskrun,..." for the log. */
const char *loop_feature_names(unsigned features, char *buf, size_t len);

/* A ring of provided buffers (IORING_REGISTER_PBUF_RING) that one
 * multishot receive picks from: nbufs (a power of two) buffers of bufsize
 * bytes each, in buffer group loop_bufring_bgid().  A buffer the kernel
 * filled belongs to the caller until loop_bufring_put() gives it back. */
struct loop_bufring;
/* NULL when the kernel lacks buffer rings or memory is short. */
struct loop_bufring *loop_bufring_new(struct loop *l, unsigned nbufs,
                                      size_t bufsize);
/* Unregisters it: no receive may be in flight on its group. */
void loop_bufring_free(struct loop_bufring *br);
uint16_t loop_bufring_bgid(const struct loop_bufring *br);
uint8_t *loop_bufring_buf(const struct loop_bufring *br, unsigned bid);
unsigned loop_bufring_count(const struct loop_bufring *br);
void loop_bufring_put(struct loop_bufring *br, unsigned bid);

/* Runs until loop_stop(); returns 0 or -errno for a fatal ring error. */
int loop_run(struct loop *l);
/* One iteration of loop_run(): runs what is ready, then waits for at least
 * one completion (the tick's, about a second, at the latest), delivers
 * what has arrived and runs what that made ready.  For a caller that drives the other side of a socket
 * between iterations (a test's client on the same thread).  Returns at
 * once after loop_stop(). */
int loop_run_once(struct loop *l);
/* The loop's own thread only; another thread posts a message that calls
 * it (loop_post). */
void loop_stop(struct loop *l);

/* Control path outside loop_run() (start-up): runs fn(co, arg) in a
 * coroutine on l and iterates the loop until it returns.  Returns 0, or
 * -errno if the coroutine could not be created or the ring failed.  Never
 * call it from inside the loop (a handler or a coroutine). */
int loop_run_sync(struct loop *l, coro_fn *fn, void *arg);
bool loop_stopping(const struct loop *l);

/* An SQE whose user_data is op.  Never returns NULL: when the submission
 * queue is full it is submitted first (and completions that cannot be
 * delivered yet are kept in the loop's backlog). */
struct io_uring_sqe *loop_get_sqe(struct loop *l, struct loop_op *op);

/* Queues h to run at the end of this iteration (once, however often asked). */
void loop_defer(struct loop *l, struct loop_hook *h);
/* Removes h from the queue (before freeing its owner). */
void loop_undefer(struct loop *l, struct loop_hook *h);

void loop_timer_add(struct loop *l, struct loop_timer *t);
void loop_timer_del(struct loop *l, struct loop_timer *t);
uint64_t loop_now_ns(void);

struct coro_pool *loop_coro_pool(struct loop *l);

/* ---- messages from other threads ----
 *
 * The one way another thread (another loop, a library's callback thread,
 * nbdkit's workers) reaches a loop: loop_post() queues m on the loop's
 * lock-free list and, if the loop may be asleep, rings its doorbell (an
 * eventfd whose read the loop keeps armed in its ring); the loop runs
 * m->fn(m) on its own thread, in loop context (no coroutine: fn may
 * coro_wake() the loop's coroutines, queue SQEs, loop_defer()), within
 * its next iteration.  Messages from one thread run in the order that
 * thread posted them.  The hand-over is a release/acquire pair: what the
 * poster wrote before loop_post() is visible to fn.  m must stay alive
 * until fn has run and belongs to the loop meanwhile.  A message posted
 * to a loop that is never run again is never run (loop_free drops it). */
struct loop_msg {
    void (*fn)(struct loop_msg *m);
    struct loop_msg *next;         /* the loop's list; not for the poster */
};

/* Any thread, the loop's own included; never blocks (one write() to an
 * eventfd at most).  The loop may run m before loop_post() returns, so
 * loop_free() must wait until no other thread can still be inside
 * loop_post() on it (join the posters first). */
void loop_post(struct loop *l, struct loop_msg *m);

/* ---- coroutine-side helpers ---- */

/* A completion that resumes a coroutine: embed on the coroutine's stack,
 * prepare an SQE with loop_get_sqe(l, &w.op), then loop_wait_co(). */
struct loop_wait {
    struct loop_op op;
    struct coro *co;
    int res;
    bool done;
};

void loop_wait_init(struct loop_wait *w, struct coro *co);
/* Yields until the completion arrives; returns its result. */
int loop_wait_co(struct loop_wait *w);

/* Runs fn(arg) on a thread of its own while the coroutine co waits, so
 * that a blocking library call (connecting to a Ceph cluster, creating an
 * image) stalls only co, not everything else on the loop.  fn must not
 * touch the loop or anything its coroutines use.  The thread blocks every
 * signal.  Returns when fn has returned (if no thread can be started, fn
 * runs right here, blocking). */
void loop_offload_co(struct loop *l, struct coro *co, void (*fn)(void *),
                     void *arg);

/* A fine-grained sleep (an io_uring timeout, not the 1 s tick) that another
 * party can cut short.  Embed it where both the sleeper and the waker can
 * reach it (a job), loop_sleep_init() once, then:
 *   sleeper:  loop_sleep_co(l, s, co, ns)  returns 0 after ns, or -ECANCELED
 *             when woken early by loop_sleep_wake();
 *   waker:    loop_sleep_wake(l, s)        no-op when nobody sleeps.
 * loop_sleep_co() returns only once every SQE it caused has completed, so
 * the struct may be freed right after it returns. */
struct loop_sleep {
    struct loop_op op;         /* the timeout */
    struct loop_op cancel_op;  /* its removal (loop_sleep_wake) */
    struct __kernel_timespec ts;
    struct coro *co;
    bool sleeping;             /* timeout armed, completion not yet seen */
    bool cancel_pending;       /* removal submitted, completion not seen */
    bool woken_early;          /* loop_sleep_wake() cut this sleep short */
};

void loop_sleep_init(struct loop_sleep *s);
int loop_sleep_co(struct loop *l, struct loop_sleep *s, struct coro *co,
                  uint64_t ns);
void loop_sleep_wake(struct loop *l, struct loop_sleep *s);

#endif
