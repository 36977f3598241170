/* strata inside nbdkit — the engine: one strata loop on a thread of its
 * own, and the hand-off of nbdkit's requests to it.
 *
 * nbdkit calls a plugin or filter from many worker threads at once;
 * strata's formats and backends run in coroutines on one io_uring loop
 * that owns the chain (its metadata caches, its allocation state, its
 * ring).  engine_call() is the bridge: the calling thread queues a request
 * on a lock-free list, wakes the loop if it may be asleep (an eventfd the
 * loop always has a read armed on; at most one wake-up per batch), and
 * sleeps on a futex until the loop has run fn in a coroutine to its end.
 *
 * Life cycle, all from one control thread (nbdkit's main thread):
 *   engine_new()      the loop, on the calling thread (not yet running);
 *   engine_run_sync() control-path coroutines before the thread starts
 *                     (opening the chain);
 *   engine_start()    the loop thread (after nbdkit's fork);
 *   engine_call()     from any thread but the loop's, while started;
 *   engine_stop()     stops the loop thread and joins it (every caller
 *                     must have returned);
 *   engine_free()     releases the loop.
 */
#ifndef STRATA_NBDKIT_ENGINE_H
#define STRATA_NBDKIT_ENGINE_H

#include <stdbool.h>

#include "coro.h"

struct engine;
struct loop;

struct engine *engine_new(char **errmsg);
void engine_free(struct engine *e);
struct loop *engine_loop(struct engine *e);

/* Runs fn(co, arg) on the loop from the control thread while the loop
 * thread is not running.  Returns 0 or -errno (the ring failed). */
int engine_run_sync(struct engine *e, coro_fn *fn, void *arg);

/* Starts the loop thread.  0 or -errno. */
int engine_start(struct engine *e);
/* Stops and joins the loop thread (a no-op when it is not running). */
void engine_stop(struct engine *e);
bool engine_running(const struct engine *e);

/* Runs fn(co, arg) in a coroutine on the loop thread and returns when it
 * has returned.  Never call it from the loop thread itself. */
void engine_call(struct engine *e, coro_fn *fn, void *arg);

#endif
