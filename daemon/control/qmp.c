/* strata — the control socket: clients, framing, dispatch (see control.h).
 * The commands themselves are in control-cmds.c. */
#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>

#include "control-int.h"
#include "jobs.h"
#include "log.h"
#include "state.h"
#include "util.h"

static void accept_done(struct loop_op *op, int res, uint32_t flags);
static void client_kick_fn(struct loop_hook *h);
static void stream_received(struct stream *s, int res, bool direct);
static void stream_send_failed(struct stream *s, int res);
static void stream_kick(struct stream *s);

static const struct stream_ops client_stream_ops = {
    .received = stream_received,
    .send_failed = stream_send_failed,
    .kick = stream_kick,
};

/* ---- output ---- */

static void client_abort(struct ctl_client *cl, const char *why)
{
    if (cl->dead)
        return;
    log_debug("control client %llu: closing (%s)", (unsigned long long)cl->id, why);
    cl->dead = true;
    cl->st.dead = true;
    shutdown(cl->fd, SHUT_RDWR);
    loop_defer(cl->ctl->loop, &cl->kick);
}

static void stream_kick(struct stream *s)
{
    struct ctl_client *cl = s->owner;
    loop_defer(cl->ctl->loop, &cl->kick);
}

static void stream_send_failed(struct stream *s, int res)
{
    client_abort(s->owner, res == 0 ? "send made no progress" : strerror(-res));
}

static void ctl_out_done(struct stream_item *si)
{
    free(container_of(si, struct ctl_out, si));
}

/* Queues one message (the text of a json object) plus CRLF. */
static void client_send_text(struct ctl_client *cl, const char *text)
{
    if (cl->dead)
        return;
    size_t len = strlen(text);
    struct ctl_out *o = malloc(sizeof(*o) + len + 2);
    if (!o) {
        client_abort(cl, "out of memory");
        return;
    }
    memcpy(o->data, text, len);
    memcpy(o->data + len, "\r\n", 2);
    o->iov.iov_base = o->data;
    o->iov.iov_len = len + 2;
    o->si.iov = &o->iov;
    o->si.niov = 1;
    o->si.done = ctl_out_done;
    stream_send(&cl->st, &o->si);
    if (cl->st.sq_bytes > CONTROL_MAX_OUT) {
        log_warn("control client %llu: more than %u bytes of replies and "
                 "events unread: dropping it", (unsigned long long)cl->id,
                 CONTROL_MAX_OUT);
        client_abort(cl, "output bound");
    }
}

void ctl_client_send(struct ctl_client *cl, struct json_object *msg)
{
    client_send_text(cl, json_object_to_json_string_ext(
        msg, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE));
    json_object_put(msg);
}

/* ---- replies and events ---- */

static void add_id(struct json_object *msg, struct json_object *id)
{
    if (id)
        json_object_object_add(msg, "id", json_object_get(id));
}

void ctl_reply_return(struct ctl_client *cl, struct json_object *id,
                      struct json_object *ret)
{
    struct json_object *m = json_object_new_object();
    json_object_object_add(m, "return", ret ? ret : json_object_new_object());
    add_id(m, id);
    ctl_client_send(cl, m);
}

void ctl_reply_error(struct ctl_client *cl, struct json_object *id,
                     const char *cls, const char *desc)
{
    struct json_object *m = json_object_new_object();
    struct json_object *e = json_object_new_object();
    json_object_object_add(e, "class", json_object_new_string(cls));
    json_object_object_add(e, "desc", json_object_new_string(desc));
    json_object_object_add(m, "error", e);
    add_id(m, id);
    ctl_client_send(cl, m);
}

void ctl_emit(struct control *ctl, const char *event, struct json_object *data)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct json_object *m = json_object_new_object();
    json_object_object_add(m, "event", json_object_new_string(event));
    if (data)
        json_object_object_add(m, "data", data);
    struct json_object *t = json_object_new_object();
    json_object_object_add(t, "seconds", json_object_new_int64(ts.tv_sec));
    json_object_object_add(t, "microseconds", json_object_new_int64(ts.tv_nsec / 1000));
    json_object_object_add(m, "timestamp", t);
    const char *text = json_object_to_json_string_ext(
        m, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE);
    log_debug("event %s", text);
    for (struct ctl_client *cl = ctl->clients, *next; cl; cl = next) {
        next = cl->next; /* a client may be dropped for its output bound */
        if (cl->negotiated && !cl->dead)
            client_send_text(cl, text);
    }
    json_object_put(m);
}

/* ---- commands: framing and dispatch ---- */

struct cmd_run {
    struct ctl_client *cl;
    const struct ctl_cmd *cmd;
    struct json_object *args;  /* owned */
    struct json_object *id;    /* owned */
};

static void cmd_co(struct coro *co, void *arg)
{
    struct cmd_run *run = arg;
    struct ctl_client *cl = run->cl;
    struct control *ctl = cl->ctl;
    struct ctl_cmd_ctx cx = {
        .ctl = ctl,
        .client = cl,
        .co = co,
        .err_class = "GenericError",
    };
    struct error *err = NULL;
    struct json_object *ret = run->cmd->fn(&cx, run->args, &err);
    if (err || !ret) {
        json_object_put(ret);
        ctl_reply_error(cl, run->id, cx.err_class, err ? err->msg : "out of memory");
        log_debug("control client %llu: %s: %s", (unsigned long long)cl->id,
                  run->cmd->name, err ? err->msg : "out of memory");
        error_free(err);
    } else {
        ctl_reply_return(cl, run->id, ret);
    }
    if (cx.after_reply)
        cx.after_reply(&cx);
    json_object_put(run->args);
    json_object_put(run->id);
    free(run);
    cl->cmd_running = false;
    loop_defer(ctl->loop, &cl->kick);
    server_release(ctl->srv);
}

/* One complete JSON value from the client.  Takes ownership of msg. */
static void client_handle(struct ctl_client *cl, struct json_object *msg)
{
    struct control *ctl = cl->ctl;
    struct json_object *id = NULL, *exec = NULL, *args = NULL;
    if (!json_object_is_type(msg, json_type_object)) {
        ctl_reply_error(cl, NULL, "GenericError", "QMP input must be a JSON object");
        json_object_put(msg);
        return;
    }
    json_object_object_get_ex(msg, "id", &id);
    char desc[256];
    json_object_object_foreach(msg, key, val) {
        (void)val;
        if (strcmp(key, "execute") && strcmp(key, "arguments") && strcmp(key, "id")) {
            snprintf(desc, sizeof(desc), "QMP input member '%.64s' is unexpected", key);
            ctl_reply_error(cl, id, "GenericError", desc);
            json_object_put(msg);
            return;
        }
    }
    if (!json_object_object_get_ex(msg, "execute", &exec)) {
        ctl_reply_error(cl, id, "GenericError", "QMP input lacks member 'execute'");
        json_object_put(msg);
        return;
    }
    if (!json_object_is_type(exec, json_type_string)) {
        ctl_reply_error(cl, id, "GenericError", "QMP input member 'execute' must be a string");
        json_object_put(msg);
        return;
    }
    if (json_object_object_get_ex(msg, "arguments", &args) &&
        !json_object_is_type(args, json_type_object)) {
        ctl_reply_error(cl, id, "GenericError", "QMP input member 'arguments' must be an object");
        json_object_put(msg);
        return;
    }
    const char *name = json_object_get_string(exec);
    bool is_caps = !strcmp(name, "qmp_capabilities");
    if (!cl->negotiated && !is_caps) {
        ctl_reply_error(cl, id, "CommandNotFound",
                        "Expecting capabilities negotiation with 'qmp_capabilities'");
        json_object_put(msg);
        return;
    }
    if (cl->negotiated && is_caps) {
        ctl_reply_error(cl, id, "CommandNotFound",
                        "Capabilities negotiation is already complete, command ignored");
        json_object_put(msg);
        return;
    }
    const struct ctl_cmd *cmd = ctl_cmd_find(name);
    if (!cmd) {
        snprintf(desc, sizeof(desc), "The command %.128s has not been found", name);
        ctl_reply_error(cl, id, "CommandNotFound", desc);
        json_object_put(msg);
        return;
    }
    struct error *err = NULL;
    if (ctl_args_check(args, cmd->args, "", &err) < 0) {
        ctl_reply_error(cl, id, "GenericError", err ? err->msg : "out of memory");
        error_free(err);
        json_object_put(msg);
        return;
    }
    struct cmd_run *run = calloc(1, sizeof(*run));
    struct coro *co = run ? coro_create(loop_coro_pool(ctl->loop), cmd_co, run) : NULL;
    if (!co) {
        free(run);
        ctl_reply_error(cl, id, "GenericError", "out of memory");
        json_object_put(msg);
        return;
    }
    run->cl = cl;
    run->cmd = cmd;
    run->args = args ? json_object_get(args) : json_object_new_object();
    run->id = id ? json_object_get(id) : NULL;
    json_object_put(msg);
    cl->cmd_running = true;
    server_hold(ctl->srv);
    coro_enter(co); /* loop context: the client's kick hook */
}

/* Parses complete messages from the receive buffer, one command at a
 * time. */
static void process_input(struct ctl_client *cl)
{
    while (cl->st.rstart < cl->st.rend && !cl->cmd_running && !cl->dead &&
           !cl->closing) {
        size_t avail = cl->st.rend - cl->st.rstart;
        size_t room = CONTROL_MAX_MSG + 1 - cl->msg_bytes;
        size_t feed = avail < room ? avail : room;
        struct json_object *obj =
            json_tokener_parse_ex(cl->tok, (const char *)cl->st.rbuf + cl->st.rstart,
                                  (int)feed);
        enum json_tokener_error jerr = json_tokener_get_error(cl->tok);
        if (obj || jerr == json_tokener_success) {
            size_t used = json_tokener_get_parse_end(cl->tok);
            if (used == 0 || used > feed)
                used = feed;
            cl->st.rstart += used;
            cl->msg_bytes = 0;
            if (!obj) /* a JSON null */
                obj = NULL;
            client_handle(cl, obj);
            continue;
        }
        if (jerr == json_tokener_continue) {
            cl->st.rstart += feed;
            cl->msg_bytes += feed;
            if (cl->msg_bytes > CONTROL_MAX_MSG) {
                char desc[128];
                snprintf(desc, sizeof(desc), "JSON message exceeds the limit of "
                         "%u bytes: closing the connection", CONTROL_MAX_MSG);
                log_info("control client %llu: %s", (unsigned long long)cl->id, desc);
                ctl_reply_error(cl, NULL, "GenericError", desc);
                cl->closing = true;
                shutdown(cl->fd, SHUT_RD);
            }
            continue;
        }
        /* A syntax error: report it, forget this message and whatever
         * else this read brought (the stream cannot be resynchronised
         * reliably inside it), and start afresh with the next read. */
        char desc[256];
        snprintf(desc, sizeof(desc), "JSON parse error, %s",
                 json_tokener_error_desc(jerr));
        ctl_reply_error(cl, NULL, "GenericError", desc);
        json_tokener_reset(cl->tok);
        cl->msg_bytes = 0;
        cl->st.rstart = cl->st.rend;
    }
}

/* ---- input ---- */

static void start_recv(struct ctl_client *cl)
{
    /* one read at a time, and only once it is all parsed */
    if (cl->st.recv_pending || cl->dead || cl->closing || cl->cmd_running ||
        stream_unparsed(&cl->st) > 0)
        return;
    stream_start_recv(&cl->st);
}

static void stream_received(struct stream *s, int res, bool direct)
{
    struct ctl_client *cl = s->owner;
    (void)direct;
    if (res <= 0 && !cl->dead && !cl->closing) {
        /* end of input: finish the command and the output, then close */
        log_debug("control client %llu: %s", (unsigned long long)cl->id,
                  res == 0 ? "disconnected" : strerror(-res));
        if (res == 0)
            cl->closing = true;
        else
            client_abort(cl, strerror(-res));
    }
}

/* ---- lifetime ---- */

static void client_free(struct ctl_client *cl)
{
    struct control *ctl = cl->ctl;
    assert(!stream_busy(&cl->st) && !cl->cmd_running);
    stream_drop_queue(&cl->st);
    if (cl->prev)
        cl->prev->next = cl->next;
    else
        ctl->clients = cl->next;
    if (cl->next)
        cl->next->prev = cl->prev;
    ctl->n_clients--;
    loop_undefer(ctl->loop, &cl->kick);
    json_tokener_free(cl->tok);
    close(cl->fd);
    log_debug("control client %llu gone", (unsigned long long)cl->id);
    free(cl);
    server_release(ctl->srv);
}

static void client_kick_fn(struct loop_hook *h)
{
    struct ctl_client *cl =
        container_of(h, struct ctl_client, kick);
    if (!cl->dead) {
        process_input(cl);
        start_recv(cl);
        stream_start_send(&cl->st);
        /* closing: everything answered and sent */
        if (cl->closing && !cl->cmd_running && stream_output_idle(&cl->st)) {
            cl->dead = true;
            cl->st.dead = true;
            shutdown(cl->fd, SHUT_RDWR);
        }
    }
    if (cl->dead && !stream_busy(&cl->st) && !cl->cmd_running)
        client_free(cl);
}

static void greet(struct ctl_client *cl)
{
    unsigned major = 0, minor = 0, micro = 0;
    sscanf(STRATA_VERSION, "%u.%u.%u", &major, &minor, &micro);
    struct json_object *v = json_object_new_object();
    struct json_object *q = json_object_new_object();
    json_object_object_add(q, "major", json_object_new_int((int)major));
    json_object_object_add(q, "minor", json_object_new_int((int)minor));
    json_object_object_add(q, "micro", json_object_new_int((int)micro));
    json_object_object_add(v, "qemu", q);
    json_object_object_add(v, "package", json_object_new_string("strata " STRATA_VERSION));
    struct json_object *inner = json_object_new_object();
    json_object_object_add(inner, "version", v);
    json_object_object_add(inner, "capabilities", json_object_new_array());
    struct json_object *m = json_object_new_object();
    json_object_object_add(m, "QMP", inner);
    ctl_client_send(cl, m);
}

static void arm_accept(struct control *ctl)
{
    if (ctl->accept_pending || ctl->closed)
        return;
    struct io_uring_sqe *sqe = loop_get_sqe(ctl->loop, &ctl->accept_op);
    io_uring_prep_accept(sqe, ctl->fd, NULL, NULL, SOCK_CLOEXEC);
    ctl->accept_pending = true;
}

static void accept_done(struct loop_op *op, int res, uint32_t flags)
{
    struct control *ctl =
        container_of(op, struct control, accept_op);
    (void)flags;
    ctl->accept_pending = false;
    if (ctl->closed) {
        if (res >= 0)
            close(res);
        return;
    }
    if (res < 0) {
        if (res == -EMFILE || res == -ENFILE || res == -ENOMEM || res == -ENOBUFS) {
            log_warn("control socket: accept: %s", strerror(-res));
            return; /* retried by the tick */
        }
        arm_accept(ctl);
        return;
    }
    arm_accept(ctl);
    if (ctl->n_clients >= CONTROL_MAX_CLIENTS) {
        log_warn("control socket: refusing a client: %u is the limit",
                 CONTROL_MAX_CLIENTS);
        close(res);
        return;
    }
    /* Everything but the receive buffer is cleared (64 KiB that only
     * reads fill). */
    struct ctl_client *cl = malloc(sizeof(*cl));
    if (cl)
        memset(cl, 0, offsetof(struct ctl_client, rbuf));
    if (!cl || !(cl->tok = json_tokener_new_ex(64))) {
        free(cl);
        close(res);
        log_error("control socket: out of memory for a client");
        return;
    }
    cl->ctl = ctl;
    cl->fd = res;
    cl->id = ++ctl->next_client_id;
    stream_init(&cl->st, ctl->loop, res, cl->rbuf, sizeof(cl->rbuf),
                &client_stream_ops, cl);
    cl->kick.fn = client_kick_fn;
    cl->next = ctl->clients;
    if (ctl->clients)
        ctl->clients->prev = cl;
    ctl->clients = cl;
    ctl->n_clients++;
    server_hold(ctl->srv);
    log_debug("control client %llu connected", (unsigned long long)cl->id);
    greet(cl);
}

static void tick_fn(struct loop_timer *t, uint64_t now)
{
    struct control *ctl = container_of(t, struct control, timer);
    if (!ctl->closed) {
        arm_accept(ctl); /* after EMFILE and the like */
        return;
    }
    if (now < ctl->close_deadline_ns)
        return;
    for (struct ctl_client *cl = ctl->clients; cl; cl = cl->next)
        client_abort(cl, "shutdown timeout");
}

static void cancel_done(struct loop_op *op, int res, uint32_t flags)
{
    (void)op;
    (void)res;
    (void)flags;
}

/* Server shutdown: stop accepting; clients get their pending replies, then
 * are closed (after the shutdown timeout at the latest); jobs are
 * cancelled. */
static void shutdown_fn(struct server_shutdown_hook *h)
{
    struct control *ctl =
        container_of(h, struct control, shutdown_hook);
    ctl->closed = true;
    ctl->close_deadline_ns = loop_now_ns() +
        (uint64_t)ctl->srv->cfg.shutdown_timeout_s * 1000000000u;
    if (!ctl->adopted) {
        shutdown(ctl->fd, SHUT_RDWR); /* ends the pending accept */
    } else if (ctl->accept_pending) {
        /* the service manager listens on it again after we exit */
        ctl->cancel_op.done = cancel_done;
        io_uring_prep_cancel(loop_get_sqe(ctl->loop, &ctl->cancel_op),
                             &ctl->accept_op, 0);
    }
    for (struct ctl_client *cl = ctl->clients; cl; cl = cl->next) {
        if (!cl->closing && !cl->dead) {
            cl->closing = true;
            shutdown(cl->fd, SHUT_RD);
        }
        loop_defer(ctl->loop, &cl->kick);
    }
    job_engine_shutdown(ctl->jobs);
}

/* ---- server hooks: state file, BLOCK_EXPORT_DELETED ---- */

static void hook_changed(struct server_change_hook *h)
{
    struct control *ctl = container_of(h, struct control, change_hook);
    if (ctl->state)
        state_notify_changed(ctl->state);
}

static int hook_sync_co(struct server_change_hook *h, struct coro *co)
{
    struct control *ctl = container_of(h, struct control, change_hook);
    return ctl->state ? state_sync_co(ctl->state, co) : 0;
}

static void deferred_fn(struct loop_hook *h)
{
    struct control *ctl = container_of(h, struct control, deferred_hook);
    while (ctl->deferred_head) {
        struct ctl_event *ev = ctl->deferred_head;
        ctl->deferred_head = ev->next;
        if (!ctl->deferred_head)
            ctl->deferred_tail = NULL;
        ctl_emit(ctl, ev->name, ev->data);
        free(ev->name);
        free(ev);
    }
}

static void hook_export_deleted(struct server_change_hook *h, const char *id)
{
    struct control *ctl = container_of(h, struct control, change_hook);
    struct ctl_event *ev = calloc(1, sizeof(*ev));
    if (!ev || !(ev->name = strdup("BLOCK_EXPORT_DELETED"))) {
        free(ev);
        log_error("out of memory for a BLOCK_EXPORT_DELETED event");
        return;
    }
    ev->data = json_object_new_object();
    json_object_object_add(ev->data, "id", json_object_new_string(id));
    if (ctl->deferred_tail)
        ctl->deferred_tail->next = ev;
    else
        ctl->deferred_head = ev;
    ctl->deferred_tail = ev;
    loop_defer(ctl->loop, &ctl->deferred_hook);
}

static void jobs_emit(void *opaque, const char *event, struct json_object *data)
{
    ctl_emit(opaque, event, data);
}

static void jobs_hold(void *opaque)
{
    struct control *ctl = opaque;
    server_hold(ctl->srv);
}

static void jobs_release(void *opaque)
{
    struct control *ctl = opaque;
    server_release(ctl->srv);
}

/* path: bind a new socket there (fd < 0), or describe the adopted fd.
 * gid: the group of a bound socket, or (gid_t)-1. */
static struct control *control_create(struct server *srv, const char *path,
                                      int fd, unsigned mode, gid_t gid,
                                      struct state *state, struct error **errp)
{
    struct control *ctl = calloc(1, sizeof(*ctl));
    if (!ctl || !(ctl->path = strdup(path))) {
        free(ctl);
        error_setf(errp, ENOMEM, "out of memory");
        return NULL;
    }
    ctl->srv = srv;
    ctl->loop = srv->loop;
    ctl->state = state;
    struct job_engine_ops jops = {
        .emit = jobs_emit,
        .hold = jobs_hold,
        .release = jobs_release,
    };
    ctl->jobs = job_engine_new(srv->loop, &jops, ctl);
    if (!ctl->jobs) {
        free(ctl->path);
        free(ctl);
        error_setf(errp, ENOMEM, "out of memory");
        return NULL;
    }
    ctl->adopted = fd >= 0;
    if (fd < 0) {
        /* With a group: created 0600, given to the group, then opened to
         * it, so that no other group ever has the socket's group
         * permissions. */
        fd = server_unix_socket(path, "--control ",
                                gid == (gid_t)-1 ? (int)mode : 0600, 16, errp);
        if (fd >= 0 && gid != (gid_t)-1 &&
            (chown(path, (uid_t)-1, gid) < 0 || chmod(path, (mode_t)mode) < 0)) {
            error_setf(errp, errno, "--control-group: %s: %s", path,
                       strerror(errno));
            close(fd);
            unlink(path);
            fd = -1;
        }
    }
    if (fd < 0) {
        job_engine_free(ctl->jobs);
        free(ctl->path);
        free(ctl);
        return NULL;
    }
    ctl->fd = fd;
    ctl->accept_op.done = accept_done;
    ctl->timer.fn = tick_fn;
    loop_timer_add(ctl->loop, &ctl->timer);
    ctl->shutdown_hook.fn = shutdown_fn;
    server_add_shutdown_hook(srv, &ctl->shutdown_hook);
    ctl->change_hook.changed = hook_changed;
    ctl->change_hook.sync_co = hook_sync_co;
    ctl->change_hook.export_deleted = hook_export_deleted;
    ctl->deferred_hook.fn = deferred_fn;
    srv->change_hook = &ctl->change_hook;
    arm_accept(ctl);
    if (ctl->adopted)
        log_info("control socket on %s (from the service manager)", path);
    else
        log_info("control socket on %s (mode %04o)", path, mode);
    return ctl;
}

struct control *control_new(struct server *srv, const char *path,
                            unsigned mode, gid_t gid, struct state *state,
                            struct error **errp)
{
    return control_create(srv, path, -1, mode, gid, state, errp);
}

struct control *control_new_fd(struct server *srv, int fd, const char *desc,
                               struct state *state, struct error **errp)
{
    return control_create(srv, desc, fd, 0, (gid_t)-1, state, errp);
}

struct job_engine *control_jobs(struct control *ctl)
{
    return ctl->jobs;
}

void control_free(struct control *ctl)
{
    if (!ctl)
        return;
    /* The loop has stopped: every client was closed by the shutdown (they
     * hold the server until freed). */
    assert(!ctl->clients);
    if (ctl->srv->change_hook == &ctl->change_hook)
        ctl->srv->change_hook = NULL;
    loop_undefer(ctl->loop, &ctl->deferred_hook);
    while (ctl->deferred_head) {
        struct ctl_event *ev = ctl->deferred_head;
        ctl->deferred_head = ev->next;
        json_object_put(ev->data);
        free(ev->name);
        free(ev);
    }
    job_engine_free(ctl->jobs);
    loop_timer_del(ctl->loop, &ctl->timer);
    close(ctl->fd);
    if (!ctl->adopted)
        unlink(ctl->path);
    free(ctl->path);
    free(ctl);
}
