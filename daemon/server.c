/* strata — the server's lifecycle: creation, start, signals, the
 * handshake/shutdown timer, holds and hooks, graceful shutdown, and the
 * final flush (see server.h). */
#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/socket.h>

#include "conn.h"
#include "log.h"
#include "jobs.h"
#include "server.h"
#include "util.h"

void server_config_defaults(struct server_config *cfg)
{
    cfg->max_connections = 256;
    cfg->max_per_peer = 128;
    cfg->max_handshakes = 128;
    cfg->max_handshakes_per_peer = 16;
    cfg->handshake_timeout_s = 10;
    cfg->max_inflight = 128;
    cfg->max_buffered = 64u << 20;
    cfg->max_memory = 256u << 20;
    cfg->shutdown_timeout_s = 30;
    cfg->threads = 1;
}

static void timer_fn(struct loop_timer *t, uint64_t now);

struct server *server_new(struct loop *loop, const struct server_config *cfg)
{
    struct server *srv = calloc(1, sizeof(*srv));
    if (!srv)
        return NULL;
    srv->loop = loop;
    srv->cfg = *cfg;
    if (srv->cfg.threads == 0)
        srv->cfg.threads = 1;
    /* each loop's connections get an equal share (nbd/budget.c) */
    srv->budget.max = srv->cfg.max_memory / srv->cfg.threads;
    srv->budget.conns = &srv->conns;
    srv->sig_fd = -1;
    srv->timer.fn = timer_fn;
    loop_timer_add(loop, &srv->timer);
    return srv;
}

/* ---- holds and hooks ---- */

void server_hold(struct server *srv)
{
    srv->holds++;
}

void server_release(struct server *srv)
{
    assert(srv->holds > 0);
    srv->holds--;
    server_check_idle(srv);
}

void server_add_shutdown_hook(struct server *srv, struct server_shutdown_hook *h)
{
    struct server_shutdown_hook **pp = &srv->shutdown_hooks;
    while (*pp)
        pp = &(*pp)->next;
    h->next = NULL;
    *pp = h;
}

/* ---- signals, timer, shutdown ---- */

static void sig_done(struct loop_op *op, int res, uint32_t flags);

static void arm_signal(struct server *srv)
{
    struct io_uring_sqe *sqe = loop_get_sqe(srv->loop, &srv->sig_op);
    io_uring_prep_read(sqe, srv->sig_fd, srv->sig_buf,
                       sizeof(struct signalfd_siginfo), 0);
}

static void sig_done(struct loop_op *op, int res, uint32_t flags)
{
    struct server *srv =
        container_of(op, struct server, sig_op);
    (void)flags;
    if (res == (int)sizeof(struct signalfd_siginfo)) {
        struct signalfd_siginfo si;
        memcpy(&si, srv->sig_buf, sizeof(si));
        log_info("%s: shutting down", strsignal((int)si.ssi_signo));
        server_shutdown(srv);
        return; /* a second signal while draining is not watched for */
    }
    if (res == -EINTR || res == -EAGAIN)
        arm_signal(srv);
}

int server_start(struct server *srv, int sig_fd, struct error **errp)
{
    if (srv->n_exports == 0 && !srv->allow_no_exports)
        return error_setf(errp, EINVAL, "no export given (--export file=...)");
    if (srv->n_listeners == 0)
        return error_setf(errp, EINVAL, "no listening address");
    srv->sig_fd = sig_fd;
    srv->sig_op.done = sig_done;
    if (sig_fd >= 0)
        arm_signal(srv);
    for (size_t i = 0; i < srv->n_listeners; i++)
        log_info("listening on %s", srv->listeners[i].desc);
    server_listeners_rearm(srv);
    return 0;
}

static void timer_fn(struct loop_timer *t, uint64_t now)
{
    struct server *srv =
        container_of(t, struct server, timer);
    for (struct conn *c = srv->conns; c; c = c->next) {
        if ((c->state == CONN_HS_FLAGS || c->state == CONN_HS_OPTION ||
             c->state == CONN_TLS_HANDSHAKE) &&
            now > c->deadline_ns) {
            log_info("conn %llu: no export chosen within %u s: dropping",
                     (unsigned long long)c->id, srv->cfg.handshake_timeout_s);
            conn_abort(c, "handshake timeout");
        }
        if (srv->shutting_down && now > srv->shutdown_deadline_ns &&
            c->state != CONN_DEAD) {
            log_warn("conn %llu: did not drain within %u s: dropping",
                     (unsigned long long)c->id, srv->cfg.shutdown_timeout_s);
            conn_abort(c, "shutdown timeout");
        }
    }
    if (!srv->shutting_down)
        server_listeners_rearm(srv); /* after EMFILE and the like */
}


static void final_flush_co(struct coro *co, void *opaque)
{
    struct server *srv = opaque;
    for (size_t i = 0; i < srv->n_bdevs; i++) {
        struct blockdev *b = srv->bdevs[i];
        if (b->read_only)
            continue;
        int r = fmt_flush_co(b->root, co);
        if (r < 0) {
            log_error("node '%s': final flush failed: %s", b->node_name,
                      strerror(-r));
            srv->exit_code = 1;
        }
        /* after the flush: a failed store leaves bitmaps marked in use,
         * which is safe, and says so in the log */
        fmt_store_bitmaps_co(b->root, co);
    }
    loop_stop(srv->loop);
}

void server_check_idle(struct server *srv)
{
    if (!srv->shutting_down || srv->n_conns || srv->flushing || srv->holds)
        return;
    srv->flushing = true;
    struct coro *co = coro_create(loop_coro_pool(srv->loop), final_flush_co, srv);
    if (!co) {
        log_error("out of memory for the final flush");
        srv->exit_code = 1;
        loop_stop(srv->loop);
        return;
    }
    coro_enter(co);
}

void server_shutdown(struct server *srv)
{
    if (srv->shutting_down)
        return;
    srv->shutting_down = true;
    srv->shutdown_deadline_ns =
        loop_now_ns() + (uint64_t)srv->cfg.shutdown_timeout_s * 1000000000u;
    server_listeners_stop(srv);
    for (struct conn *c = srv->conns; c; c = c->next)
        conn_drain(c);
    server_workers_drain(srv);
    for (struct server_shutdown_hook *h = srv->shutdown_hooks; h; h = h->next)
        h->fn(h);
    server_check_idle(srv);
}

void server_conn_gone(struct server *srv, struct conn *c)
{
    if (c->prev)
        c->prev->next = c->next;
    else
        srv->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    srv->n_conns--;
    if (c->peer) {
        peer_release(srv, c->peer, c->in_handshake);
        c->peer = NULL;
        c->in_handshake = false;
    }
    server_check_idle(srv);
}

void server_free(struct server *srv)
{
    if (!srv)
        return;
    assert(!srv->conns && !srv->workers);
    server_listeners_free(srv);
    server_tables_free(srv);
    peers_free(srv);
    loop_timer_del(srv->loop, &srv->timer);
    free(srv);
}
