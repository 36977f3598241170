/* strata — quiescing an export and the write notifiers jobs hook into
 * its requests (see exports.h). */
#include <assert.h>
#include <stdlib.h>
#include <string.h>

#include "exports.h"
#include "log.h"
#include "loop.h"

/* A request that waits this long for a quiesce is logged (debug). */
#define QUIESCE_WAIT_LOG_NS 5000000

uint64_t export_enter_co(struct export *e, struct coro *co)
{
    uint64_t t0 = loop_now_ns();
    if (e->quiesce_count > 0) {
        while (e->quiesce_count > 0)
            co_queue_wait_co(&e->resume_q, co);
        uint64_t waited = loop_now_ns() - t0;
        if (waited >= QUIESCE_WAIT_LOG_NS)
            log_debug("export '%s': a request waited %.3f ms for a quiesce",
                      e->cfg.name, waited / 1e6);
    }
    e->inflight++;
    return t0;
}

void export_leave(struct export *e, uint64_t start_ns, bool synced)
{
    assert(e->inflight > 0);
    if (!synced && (e->watching || start_ns <= e->watch_end_ns)) {
        uint64_t now = loop_now_ns();
        if (now >= e->watch_start_ns) {
            uint64_t t = now - start_ns;
            if (t > e->last_request_stall_ns)
                e->last_request_stall_ns = t;
            if (t > e->max_request_stall_ns)
                e->max_request_stall_ns = t;
        }
    }
    if (--e->inflight == 0 && e->quiesce_count > 0)
        co_queue_wake_all(&e->drained_q);
}

void export_quiesce_co(struct export *e, struct coro *co)
{
    if (e->quiesce_count++ == 0) {
        e->quiesce_start_ns = loop_now_ns();
        log_debug("export '%s': quiescing", e->cfg.name);
    }
    while (e->inflight > 0)
        co_queue_wait_co(&e->drained_q, co);
}

uint64_t export_resume(struct export *e)
{
    assert(e->quiesce_count > 0);
    if (--e->quiesce_count > 0)
        return 0;
    uint64_t stall = loop_now_ns() - e->quiesce_start_ns;
    e->last_stall_ns = stall;
    if (stall > e->max_stall_ns)
        e->max_stall_ns = stall;
    e->n_quiesces++;
    log_debug("export '%s': quiesced for %.3f ms", e->cfg.name, stall / 1e6);
    co_queue_wake_all(&e->resume_q);
    return stall;
}

void export_watch_begin(struct export *e)
{
    if (e->watching++ == 0) {
        e->watch_start_ns = loop_now_ns();
        e->last_request_stall_ns = 0;
    }
}

uint64_t export_watch_end(struct export *e)
{
    assert(e->watching > 0);
    if (--e->watching == 0)
        e->watch_end_ns = loop_now_ns();
    return e->last_request_stall_ns;
}

void export_set_root(struct export *e, struct fmt_node *root)
{
    assert(e->quiesce_count > 0 && e->inflight == 0);
    e->bdev->root = root;
}

/* ---- the sync gate ---- */

void export_gate_close(struct export *e, char *filename, char *driver)
{
    assert(e->quiesce_count > 0 && !e->gate_closed);
    e->gate_closed = true;
    e->gate_failed = false;
    e->gate_filename = filename;
    e->gate_driver = driver;
}

int export_gate_settle_co(struct export *e, struct coro *co)
{
    while (e->gate_settling)
        co_queue_wait_co(&e->gate_q, co);
    if (!e->gate_closed)
        return 0;
    e->gate_settling = true;
    struct blockdev *b = e->bdev;
    /* The top holds the copies of every write acknowledged before the
     * switch and whatever was written since: durable first ... */
    int r = fmt_flush_co(export_root(e), co);
    if (r == 0 && e->gate_filename) {
        /* ... then named: a state file saved from now on, by anyone,
         * names the new top, which lacks no acknowledged FLUSH or FUA */
        free(b->filename);
        free(b->driver);
        b->filename = e->gate_filename;
        b->driver = e->gate_driver;
        e->gate_filename = e->gate_driver = NULL;
    }
    if (r == 0)
        r = server_sync_co(e->srv, co);
    e->gate_settling = false;
    if (r == 0) {
        e->gate_closed = false;
        e->gate_failed = false;
        if (e->gate_busy) {
            e->gate_busy = false;
            b->chain_busy = false;
        }
    } else {
        e->gate_failed = true;
        log_error("export '%s': the new top of node '%s' is not durable yet "
                  "(%s): FLUSH and FUA requests try again and fail until it "
                  "is", e->cfg.name, b->node_name, strerror(-r));
    }
    co_queue_wake_all(&e->gate_q);
    return r;
}

int export_gate_wait_co(struct export *e, struct coro *co)
{
    while (e->gate_closed) {
        if (e->gate_settling || !e->gate_failed) {
            co_queue_wait_co(&e->gate_q, co);
            continue;
        }
        return export_gate_settle_co(e, co);
    }
    return 0;
}

void export_gate_clear(struct export *e)
{
    free(e->gate_filename);
    free(e->gate_driver);
    e->gate_filename = e->gate_driver = NULL;
}

void export_add_write_notifier(struct export *e, struct export_write_notifier *n)
{
    assert(e->quiesce_count > 0 && e->inflight == 0);
    n->next = e->write_notifiers;
    e->write_notifiers = n;
}

void export_remove_write_notifier(struct export *e,
                                  struct export_write_notifier *n)
{
    assert(e->quiesce_count > 0 && e->inflight == 0);
    for (struct export_write_notifier **pp = &e->write_notifiers; *pp;
         pp = &(*pp)->next) {
        if (*pp == n) {
            *pp = n->next;
            n->next = NULL;
            return;
        }
    }
}

int export_notify_before_co(struct export *e, struct coro *co,
                            const struct export_write_req *req)
{
    for (struct export_write_notifier *n = e->write_notifiers; n; n = n->next) {
        if (n->before_co) {
            int r = n->before_co(n, co, req);
            if (r < 0)
                return r;
        }
    }
    return 0;
}

int export_notify_after_co(struct export *e, struct coro *co,
                           const struct export_write_req *req, int ret)
{
    for (struct export_write_notifier *n = e->write_notifiers; n; n = n->next) {
        if (n->after_co) {
            int r = n->after_co(n, co, req, ret);
            if (r < 0 && ret >= 0)
                ret = r;
        }
    }
    return ret;
}
