/* strata inside nbdkit — the engine (see engine.h). */
#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "engine.h"
#include "loop.h"
#include "util.h"

/* The daemon's sizes: a ring deep enough for every worker's request and
 * the I/O each fans out into; coroutine stacks as large as stratad's. */
#define ENGINE_RING_ENTRIES 1024
#define ENGINE_CORO_STACK   (256u << 10)

/* One call handed to the loop; lives on the caller's stack. */
struct ereq {
    struct ereq *next;
    coro_fn *fn;
    void *arg;
    _Atomic uint32_t done;     /* futex word: 0 running, 1 done */
};

struct engine {
    struct loop *loop;
    pthread_t thread;
    bool started;
    int efd;                          /* the callers' doorbell */
    struct loop_op kick_op;           /* the read armed on efd */
    uint64_t kick_val;
    bool kick_armed;
    _Atomic(struct ereq *) pending;   /* pushed by callers, LIFO */
    atomic_bool kick_pending;         /* a doorbell write is on its way */
};

static long futex(_Atomic uint32_t *addr, int op, uint32_t val)
{
    return syscall(SYS_futex, (uint32_t *)addr, op, val, NULL, NULL, 0);
}

static void call_co(struct coro *co, void *opaque)
{
    struct ereq *r = opaque;
    r->fn(co, r->arg);
    atomic_store_explicit(&r->done, 1, memory_order_release);
    /* r may be gone once done is seen; the wake only needs the address */
    futex(&r->done, FUTEX_WAKE_PRIVATE, 1);
}

static void kick_arm(struct engine *e);

/* The doorbell rang (or its read was cut short): start every queued call. */
static void kick_done(struct loop_op *op, int res, uint32_t flags)
{
    struct engine *e = container_of(op, struct engine, kick_op);
    (void)res;
    (void)flags;
    e->kick_armed = false;
    /* Cleared before the list is taken: a caller that finds it still set
     * pushed before this take, so its call is in the list below. */
    atomic_store(&e->kick_pending, false);
    struct ereq *list = atomic_exchange(&e->pending, NULL);
    struct ereq *fifo = NULL;
    while (list) {
        struct ereq *next = list->next;
        list->next = fifo;
        fifo = list;
        list = next;
    }
    while (fifo) {
        struct ereq *r = fifo;
        fifo = r->next;
        struct coro *co = coro_create(loop_coro_pool(e->loop), call_co, r);
        if (co) {
            coro_enter(co);
        } else {
            /* No memory for a stack: put it back and try again on the next
             * ring of the doorbell, which we ring ourselves. */
            do {
                r->next = atomic_load(&e->pending);
            } while (!atomic_compare_exchange_weak(&e->pending, &r->next, r));
            if (!atomic_exchange(&e->kick_pending, true)) {
                uint64_t one = 1;
                while (write(e->efd, &one, sizeof(one)) < 0 && errno == EINTR)
                    ;
            }
        }
    }
    if (!loop_stopping(e->loop))
        kick_arm(e);
}

static void kick_arm(struct engine *e)
{
    if (e->kick_armed)
        return;
    struct io_uring_sqe *sqe = loop_get_sqe(e->loop, &e->kick_op);
    io_uring_prep_read(sqe, e->efd, &e->kick_val, sizeof(e->kick_val), 0);
    e->kick_armed = true;
}

struct engine *engine_new(char **errmsg)
{
    struct engine *e = calloc(1, sizeof(*e));
    if (!e) {
        *errmsg = strdup("out of memory");
        return NULL;
    }
    e->efd = eventfd(0, EFD_CLOEXEC);
    if (e->efd < 0) {
        if (asprintf(errmsg, "eventfd: %s", strerror(errno)) < 0)
            *errmsg = NULL;
        free(e);
        return NULL;
    }
    /* made here, run first here (the chain opens before nbdkit forks)
     * and then on the loop thread: no feature that binds the ring to
     * one thread */
    e->loop = loop_new_without(ENGINE_RING_ENTRIES, ENGINE_CORO_STACK,
                               LOOP_F_THREAD_BOUND, errmsg);
    if (!e->loop) {
        close(e->efd);
        free(e);
        return NULL;
    }
    e->kick_op.done = kick_done;
    return e;
}

void engine_free(struct engine *e)
{
    if (!e)
        return;
    engine_stop(e);
    /* the ring goes first: it may still hold the doorbell's read */
    loop_free(e->loop);
    close(e->efd);
    free(e);
}

struct loop *engine_loop(struct engine *e)
{
    return e->loop;
}

int engine_run_sync(struct engine *e, coro_fn *fn, void *arg)
{
    return loop_run_sync(e->loop, fn, arg);
}

static void *engine_main(void *opaque)
{
    struct engine *e = opaque;
    kick_arm(e);
    int r = loop_run(e->loop);
    if (r < 0) {
        /* The ring failed: nothing can be served any more.  Callers are
         * stuck on their futex; there is no way to go on safely. */
        static const char msg[] = "strata: io_uring loop failed; aborting\n";
        if (write(2, msg, sizeof(msg) - 1) < 0)
            abort();
        abort();
    }
    return NULL;
}

int engine_start(struct engine *e)
{
    if (e->started)
        return 0;
    /* The loop thread takes no signal: nbdkit's threads handle them. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int r = pthread_create(&e->thread, NULL, engine_main, e);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (r != 0)
        return -r;
    e->started = true;
    return 0;
}

bool engine_running(const struct engine *e)
{
    return e && e->started;
}

static void stop_co(struct coro *co, void *opaque)
{
    (void)co;
    loop_stop(opaque);
}

void engine_stop(struct engine *e)
{
    if (!e->started)
        return;
    engine_call(e, stop_co, e->loop);
    pthread_join(e->thread, NULL);
    e->started = false;
}

void engine_call(struct engine *e, coro_fn *fn, void *arg)
{
    struct ereq r = {.fn = fn, .arg = arg};
    atomic_init(&r.done, 0);
    r.next = atomic_load(&e->pending);
    while (!atomic_compare_exchange_weak(&e->pending, &r.next, &r))
        ;
    if (!atomic_exchange(&e->kick_pending, true)) {
        uint64_t one = 1;
        while (write(e->efd, &one, sizeof(one)) < 0 && errno == EINTR)
            ;
    }
    while (atomic_load_explicit(&r.done, memory_order_acquire) == 0)
        futex(&r.done, FUTEX_WAIT_PRIVATE, 0);
}
