/* strata — connection loops (--threads): threads that serve the socket
 * side of connections in transmission, while the main loop keeps every
 * chain (see server.h and docs/threads.md).
 *
 * Who touches what: a worker's conns, budget, timer and draining fields
 * belong to its thread; its handed count and thread handle to the main
 * loop.  Messages between the two are struct loop_msg embedded in what
 * they carry (the connection's move_msg, a request slot's msg, the
 * worker's drain_msg and stop_msg) or malloc'ed for one use
 * (abort_msg).  Each message from one thread to another runs in the order
 * posted, which the hand-over and the export abort rely on. */
#include <assert.h>
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "conn.h"
#include "log.h"
#include "server.h"
#include "util.h"

/* ---- the worker's thread ---- */

static void worker_timer(struct loop_timer *t, uint64_t now)
{
    struct worker *w = container_of(t, struct worker, timer);
    if (!w->draining || now <= w->drain_deadline_ns)
        return;
    for (struct conn *c = w->conns; c; c = c->next) {
        if (c->state != CONN_DEAD) {
            log_warn("conn %llu: did not drain within %u s: dropping",
                     (unsigned long long)c->id,
                     w->srv->cfg.shutdown_timeout_s);
            conn_abort(c, "shutdown timeout");
        }
    }
}

struct worker_start {
    struct worker *w;
    unsigned entries;
    size_t coro_stack;
};

static void start_report(struct worker *w, int state)
{
    pthread_mutex_lock(&w->start_lock);
    w->start_state = state;
    pthread_cond_signal(&w->start_cond);
    pthread_mutex_unlock(&w->start_lock);
}

static void *worker_main(void *opaque)
{
    struct worker_start *ws = opaque;
    struct worker *w = ws->w;
    char *errmsg = NULL;
    /* made here: SINGLE_ISSUER binds a ring to the thread that made it */
    w->loop = loop_new(ws->entries, ws->coro_stack, &errmsg);
    if (!w->loop) {
        log_error("connection loop %u: %s", w->index,
                  errmsg ? errmsg : "cannot create the loop");
        free(errmsg);
        start_report(w, -ENOMEM);
        return NULL;
    }
    w->timer.fn = worker_timer;
    loop_timer_add(w->loop, &w->timer);
    start_report(w, 1); /* ws is gone from here on */
    int r = loop_run(w->loop);
    if (r < 0)
        log_error("connection loop %u failed: %s", w->index, strerror(-r));
    loop_timer_del(w->loop, &w->timer);
    /* the loop is freed by whoever joins this thread: the main loop may
     * still be inside loop_post() to it (its stop message) right now */
    return NULL;
}

static void stop_fn(struct loop_msg *m)
{
    struct worker *w = container_of(m, struct worker, stop_msg);
    loop_stop(w->loop);
}

int server_workers_start(struct server *srv, unsigned entries,
                         size_t coro_stack, struct error **errp)
{
    unsigned n = srv->cfg.threads > 1 ? srv->cfg.threads - 1 : 0;
    if (n == 0)
        return 0;
    srv->workers = calloc(n, sizeof(*srv->workers));
    if (!srv->workers)
        return error_setf(errp, ENOMEM, "out of memory");
    srv->n_workers = n;
    for (unsigned i = 0; i < n; i++) {
        struct worker *w = &srv->workers[i];
        w->srv = srv;
        w->index = i + 1;
        w->budget = srv->budget; /* the same share */
        w->budget.conns = &w->conns;
        w->budget.payload_mem = w->budget.payload_mem_peak = 0;
        w->budget.mem_wait_head = w->budget.mem_wait_tail = NULL;
        w->stop_msg.fn = stop_fn;
        pthread_mutex_init(&w->start_lock, NULL);
        pthread_cond_init(&w->start_cond, NULL);
        struct worker_start ws = {w, entries, coro_stack};
        /* signals go to the main loop's signalfd only */
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        int e = pthread_create(&w->thread, NULL, worker_main, &ws);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (e != 0) {
            server_workers_stop(srv);
            return error_setf(errp, e, "starting connection loop %u: %s",
                              i + 1, strerror(e));
        }
        w->started = true;
        pthread_mutex_lock(&w->start_lock);
        while (w->start_state == 0)
            pthread_cond_wait(&w->start_cond, &w->start_lock);
        int st = w->start_state;
        pthread_mutex_unlock(&w->start_lock);
        if (st < 0) {
            server_workers_stop(srv);
            return error_setf(errp, -st, "cannot start connection loop %u",
                              i + 1);
        }
    }
    log_info("%u loops: the main loop and %u connection loop%s",
             n + 1, n, n == 1 ? "" : "s");
    return 0;
}

void server_workers_stop(struct server *srv)
{
    for (unsigned i = 0; i < srv->n_workers; i++) {
        struct worker *w = &srv->workers[i];
        if (!w->started)
            continue;
        if (w->start_state > 0)
            loop_post(w->loop, &w->stop_msg);
        pthread_join(w->thread, NULL);
        w->started = false;
        if (w->conns)
            log_warn("connection loop %u: stopped with clients still active",
                     w->index); /* their sockets close with the process */
        else
            loop_free(w->loop);
        w->loop = NULL;
    }
    for (unsigned i = 0; i < srv->n_workers; i++) {
        pthread_mutex_destroy(&srv->workers[i].start_lock);
        pthread_cond_destroy(&srv->workers[i].start_cond);
    }
    free(srv->workers);
    srv->workers = NULL;
    srv->n_workers = 0;
}

/* ---- the hand-over ---- */

struct worker *server_pick_worker(struct server *srv)
{
    /* the fewest connections; a tie goes to the lowest loop, so a single
     * client stays on the main loop and pays for no hand-over */
    struct worker *best = NULL;
    unsigned least = srv->local_transmit;
    for (unsigned i = 0; i < srv->n_workers; i++) {
        if (srv->workers[i].handed < least) {
            least = srv->workers[i].handed;
            best = &srv->workers[i];
        }
    }
    return best;
}

/* Connection loop: c arrives. */
static void arrive_fn(struct loop_msg *m)
{
    struct conn *c = container_of(m, struct conn, move_msg);
    struct worker *w = c->worker;
    c->prev = NULL;
    c->next = w->conns;
    if (w->conns)
        w->conns->prev = c;
    w->conns = c;
    log_debug("conn %llu: served on connection loop %u",
              (unsigned long long)c->id, w->index);
    if (w->draining)
        conn_drain(c);
    conn_kick(c);
}

void server_hand_over(struct server *srv, struct conn *c, struct worker *w)
{
    assert(c->state == CONN_TRANSMIT && !stream_busy(&c->st) &&
           !c->st.tls && !c->st.br && c->inflight == 0 && c->running == 0 &&
           c->kept == 0 && !c->mem_waiting && !c->drain_timer_pending);
    loop_undefer(srv->loop, &c->kick);
    if (c->prev)
        c->prev->next = c->next;
    else
        srv->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    c->next = c->prev = NULL;
    c->move_to = NULL;
    c->worker = w;
    c->loop = w->loop;
    c->st.loop = w->loop;
    c->budget = &w->budget;
    w->handed++;
    c->move_msg.fn = arrive_fn;
    loop_post(w->loop, &c->move_msg);
}

/* Main loop: the rest of c's end. */
static void gone_fn(struct loop_msg *m)
{
    struct conn *c = container_of(m, struct conn, move_msg);
    struct server *srv = c->srv;
    assert(c->worker->handed > 0);
    c->worker->handed--;
    if (c->exp)
        server_export_conn_gone(srv, c->exp);
    srv->n_conns--;
    if (c->peer)
        peer_release(srv, c->peer, c->in_handshake);
    free(c->rbuf);
    free(c);
    server_check_idle(srv);
}

void server_remote_conn_gone(struct conn *c)
{
    struct worker *w = c->worker;
    if (c->prev)
        c->prev->next = c->next;
    else
        w->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    c->move_msg.fn = gone_fn;
    loop_post(c->srv->loop, &c->move_msg);
}

/* ---- the main loop's requests to every connection loop ---- */

struct abort_msg {
    struct loop_msg m;
    struct worker *w;
    const struct export *e;    /* compared, never dereferenced */
};

static void abort_fn(struct loop_msg *m)
{
    struct abort_msg *am = container_of(m, struct abort_msg, m);
    for (struct conn *c = am->w->conns; c; c = c->next) {
        if (c->meta_export == am->e)
            c->meta_export = NULL;
        if (c->exp == am->e)
            conn_abort(c, "export deleted");
    }
    free(am);
}

void server_workers_abort_export(struct server *srv, struct export *e)
{
    /* e lives until its last connection is gone (a message back to the
     * main loop), and any later export at the same address is handed its
     * connections after this message: FIFO per poster */
    for (unsigned i = 0; i < srv->n_workers; i++) {
        struct worker *w = &srv->workers[i];
        if (!w->handed)
            continue;
        struct abort_msg *am = calloc(1, sizeof(*am));
        if (!am) {
            log_error("out of memory: the clients of a deleted export on "
                      "connection loop %u stay connected", w->index);
            continue;
        }
        am->m.fn = abort_fn;
        am->w = w;
        am->e = e;
        loop_post(w->loop, &am->m);
    }
}

static void drain_fn(struct loop_msg *m)
{
    struct worker *w = container_of(m, struct worker, drain_msg);
    w->draining = true;
    w->drain_deadline_ns = loop_now_ns() +
        (uint64_t)w->srv->cfg.shutdown_timeout_s * 1000000000u;
    for (struct conn *c = w->conns; c; c = c->next)
        conn_drain(c);
}

void server_workers_drain(struct server *srv)
{
    for (unsigned i = 0; i < srv->n_workers; i++) {
        struct worker *w = &srv->workers[i];
        w->drain_msg.fn = drain_fn;
        loop_post(w->loop, &w->drain_msg);
    }
}
