/* strata — listeners, exports, accept, signals, shutdown (see server.h). */
#include <arpa/inet.h>
#include <assert.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "conn.h"
#include "log.h"
#include "server.h"

void server_config_defaults(struct server_config *cfg)
{
    cfg->max_connections = 256;
    cfg->handshake_timeout_s = 10;
    cfg->max_inflight = 128;
    cfg->max_buffered = 64u << 20;
    cfg->shutdown_timeout_s = 30;
}

static void timer_fn(struct loop_timer *t, uint64_t now);

struct server *server_new(struct loop *loop, const struct server_config *cfg)
{
    struct server *srv = calloc(1, sizeof(*srv));
    if (!srv)
        return NULL;
    srv->loop = loop;
    srv->cfg = *cfg;
    srv->sig_fd = -1;
    srv->timer.fn = timer_fn;
    loop_timer_add(loop, &srv->timer);
    return srv;
}

/* ---- exports ---- */

void export_config_clear(struct export_config *cfg)
{
    free(cfg->name);
    free(cfg->file);
    free(cfg->format);
    free(cfg->description);
    free(cfg->backing_root);
    memset(cfg, 0, sizeof(*cfg));
}

static int parse_bool(const char *key, const char *v, bool *out,
                      struct error **errp)
{
    if (!strcmp(v, "on") || !strcmp(v, "yes") || !strcmp(v, "true") ||
        !strcmp(v, "1")) {
        *out = true;
        return 0;
    }
    if (!strcmp(v, "off") || !strcmp(v, "no") || !strcmp(v, "false") ||
        !strcmp(v, "0")) {
        *out = false;
        return 0;
    }
    return error_setf(errp, EINVAL, "%s=%s: expected on or off", key, v);
}

/* A byte count with an optional K, M or G suffix (binary units). */
static int parse_size(const char *key, const char *v, uint64_t *out,
                      struct error **errp)
{
    char *end;
    errno = 0;
    unsigned long long n = strtoull(v, &end, 10);
    unsigned shift = 0;
    if (*end == 'K' || *end == 'k')
        shift = 10, end++;
    else if (*end == 'M' || *end == 'm')
        shift = 20, end++;
    else if (*end == 'G' || *end == 'g')
        shift = 30, end++;
    if (errno || end == v || *end || v[0] == '-' || n == 0 ||
        n > (UINT64_C(1) << 40) >> shift)
        return error_setf(errp, EINVAL, "%s=%s: expected a size in bytes "
                          "(with an optional K, M or G suffix)", key, v);
    *out = (uint64_t)n << shift;
    return 0;
}

/* Splits "k=v,k=v" with ",," standing for a literal comma. */
int export_config_parse(const char *spec, struct export_config *cfg,
                        struct error **errp)
{
    memset(cfg, 0, sizeof(*cfg));
    size_t len = strlen(spec);
    char *item = malloc(len + 1);
    if (!item)
        return error_setf(errp, ENOMEM, "out of memory");
    const char *p = spec;
    int ret = 0;
    while (*p && ret == 0) {
        size_t n = 0;
        while (*p) {
            if (*p == ',' && p[1] == ',') {
                item[n++] = ',';
                p += 2;
            } else if (*p == ',') {
                p++;
                break;
            } else {
                item[n++] = *p++;
            }
        }
        item[n] = '\0';
        if (n == 0)
            continue;
        char *eq = strchr(item, '=');
        if (!eq) {
            ret = error_setf(errp, EINVAL, "'%s': expected KEY=VALUE", item);
            break;
        }
        *eq = '\0';
        const char *key = item, *val = eq + 1;
        char **str = NULL;
        if (!strcmp(key, "name"))
            str = &cfg->name;
        else if (!strcmp(key, "file"))
            str = &cfg->file;
        else if (!strcmp(key, "format"))
            str = &cfg->format;
        else if (!strcmp(key, "description"))
            str = &cfg->description;
        else if (!strcmp(key, "backing-root"))
            str = &cfg->backing_root;
        if (str) {
            free(*str);
            *str = strdup(val);
            if (!*str)
                ret = error_setf(errp, ENOMEM, "out of memory");
        } else if (!strcmp(key, "readonly")) {
            ret = parse_bool(key, val, &cfg->read_only, errp);
        } else if (!strcmp(key, "cache")) {
            if (!strcmp(val, "none"))
                cfg->direct = true;
            else if (!strcmp(val, "writeback"))
                cfg->direct = false;
            else
                ret = error_setf(errp, EINVAL,
                                 "cache=%s: expected none or writeback", val);
        } else if (!strcmp(key, "l2-cache-size")) {
            ret = parse_size(key, val, &cfg->l2_cache_bytes, errp);
        } else if (!strcmp(key, "refcount-cache-size")) {
            ret = parse_size(key, val, &cfg->refcount_cache_bytes, errp);
        } else {
            ret = error_setf(errp, EINVAL, "unknown export key '%s' (known: "
                             "name, file, format, readonly, cache, description, "
                             "backing-root, l2-cache-size, "
                             "refcount-cache-size)", key);
        }
    }
    free(item);
    if (ret == 0 && !cfg->file)
        ret = error_setf(errp, EINVAL, "file= is required");
    if (ret == 0 && !cfg->name) {
        cfg->name = strdup("");
        if (!cfg->name)
            ret = error_setf(errp, ENOMEM, "out of memory");
    }
    if (ret == 0 && strlen(cfg->name) > NBD_MAX_STRING)
        ret = error_setf(errp, EINVAL, "export name longer than %u bytes",
                         NBD_MAX_STRING);
    if (ret < 0)
        export_config_clear(cfg);
    return ret;
}

struct export *server_find_export(struct server *srv, const char *name,
                                  size_t len)
{
    if (len == 0)
        return srv->n_exports ? srv->exports[0] : NULL;
    for (size_t i = 0; i < srv->n_exports; i++) {
        const char *en = srv->exports[i]->cfg.name;
        if (strlen(en) == len && memcmp(en, name, len) == 0)
            return srv->exports[i];
    }
    return NULL;
}

int server_add_export(struct server *srv, struct export_config *cfg,
                      struct error **errp)
{
    if (cfg->name[0] && server_find_export(srv, cfg->name, strlen(cfg->name)))
        return error_setf(errp, EEXIST, "export '%s' is defined twice",
                          cfg->name);
    struct fmt_open_opts fo = {
        .format = cfg->format,
        .read_only = cfg->read_only,
        .direct = cfg->direct,
        .l2_cache_bytes = cfg->l2_cache_bytes,
        .refcount_cache_bytes = cfg->refcount_cache_bytes,
        .backing_root = cfg->backing_root,
    };
    struct fmt_node *root = fmt_open(srv->loop, cfg->file, &fo, errp);
    if (!root) {
        error_prefix(errp, "export '%s': ", cfg->name);
        return -EINVAL;
    }
    struct export *e = calloc(1, sizeof(*e));
    void *arr = realloc(srv->exports, sizeof(*srv->exports) * (srv->n_exports + 1));
    if (!e || !arr) {
        free(e);
        if (arr)
            srv->exports = arr;
        fmt_close(root);
        return error_setf(errp, ENOMEM, "out of memory");
    }
    srv->exports = arr;
    e->cfg = *cfg;
    memset(cfg, 0, sizeof(*cfg)); /* consumed */
    e->root = root;
    srv->exports[srv->n_exports++] = e;
    log_info("export '%s': %s (%s, %llu bytes%s%s)", e->cfg.name,
             e->cfg.file, root->ops->name, (unsigned long long)root->size,
             root->read_only ? ", read-only" : "",
             e->cfg.direct ? ", cache=none" : "");
    return 0;
}

/* ---- listeners ---- */

static void accept_done(struct loop_op *op, int res, uint32_t flags);

static int listener_push(struct server *srv, int fd, const char *desc,
                         const char *unix_path, struct error **errp)
{
    void *arr = realloc(srv->listeners,
                        sizeof(*srv->listeners) * (srv->n_listeners + 1));
    if (!arr) {
        close(fd);
        return error_setf(errp, ENOMEM, "out of memory");
    }
    srv->listeners = arr;
    struct listener *l = &srv->listeners[srv->n_listeners++];
    memset(l, 0, sizeof(*l));
    l->srv = srv;
    l->fd = fd;
    l->desc = strdup(desc);
    l->unix_path = unix_path ? strdup(unix_path) : NULL;
    l->accept_op.done = accept_done;
    return 0;
}

static int listen_unix(struct server *srv, const char *path,
                       struct error **errp)
{
    struct sockaddr_un sun;
    if (strlen(path) >= sizeof(sun.sun_path))
        return error_setf(errp, ENAMETOOLONG, "unix:%s: path too long", path);
    memset(&sun, 0, sizeof(sun));
    sun.sun_family = AF_UNIX;
    strcpy(sun.sun_path, path);
    struct stat st;
    /* a stale socket of an earlier run is replaced; anything else is not */
    if (lstat(path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode))
            return error_setf(errp, EEXIST, "unix:%s exists and is not a socket",
                              path);
        unlink(path);
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return error_setf(errp, errno, "socket: %s", strerror(errno));
    if (bind(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0 ||
        listen(fd, SOMAXCONN) < 0) {
        int e = errno;
        close(fd);
        return error_setf(errp, e, "unix:%s: %s", path, strerror(e));
    }
    char desc[sizeof(sun.sun_path) + 8];
    snprintf(desc, sizeof(desc), "unix:%s", path);
    return listener_push(srv, fd, desc, path, errp);
}

static int listen_inet(struct server *srv, const char *addr,
                       struct error **errp)
{
    char host[256];
    const char *port;
    if (addr[0] == '[') {
        const char *end = strchr(addr, ']');
        if (!end || end[1] != ':' || (size_t)(end - addr - 1) >= sizeof(host))
            return error_setf(errp, EINVAL, "'%s': expected [IPV6]:PORT", addr);
        memcpy(host, addr + 1, (size_t)(end - addr - 1));
        host[end - addr - 1] = '\0';
        port = end + 2;
    } else {
        const char *colon = strrchr(addr, ':');
        if (!colon || (size_t)(colon - addr) >= sizeof(host))
            return error_setf(errp, EINVAL,
                              "'%s': expected HOST:PORT, [IPV6]:PORT or unix:PATH",
                              addr);
        memcpy(host, addr, (size_t)(colon - addr));
        host[colon - addr] = '\0';
        port = colon + 1;
    }
    if (!*port)
        return error_setf(errp, EINVAL, "'%s': missing port", addr);
    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    struct addrinfo *res = NULL;
    int gai = getaddrinfo(host[0] ? host : NULL, port, &hints, &res);
    if (gai != 0)
        return error_setf(errp, EINVAL, "'%s': %s", addr, gai_strerror(gai));
    int ret = error_setf(errp, EADDRNOTAVAIL, "'%s': no usable address", addr);
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC,
                        ai->ai_protocol);
        if (fd < 0)
            continue;
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (ai->ai_family == AF_INET6)
            setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 ||
            listen(fd, SOMAXCONN) < 0) {
            int e = errno;
            close(fd);
            if (errp && *errp) {
                error_free(*errp);
                *errp = NULL;
            }
            ret = error_setf(errp, e, "%s: %s", addr, strerror(e));
            continue;
        }
        if (errp && *errp) {
            error_free(*errp);
            *errp = NULL;
        }
        ret = listener_push(srv, fd, addr, NULL, errp);
        break;
    }
    freeaddrinfo(res);
    return ret;
}

int server_add_listener(struct server *srv, const char *addr,
                        struct error **errp)
{
    if (strncmp(addr, "unix:", 5) == 0)
        return listen_unix(srv, addr + 5, errp);
    return listen_inet(srv, addr, errp);
}

static void arm_accept(struct listener *l)
{
    if (l->accept_pending || l->closed || l->srv->shutting_down)
        return;
    struct io_uring_sqe *sqe = loop_get_sqe(l->srv->loop, &l->accept_op);
    io_uring_prep_accept(sqe, l->fd, NULL, NULL, SOCK_CLOEXEC);
    l->accept_pending = true;
}

static void accept_done(struct loop_op *op, int res, uint32_t flags)
{
    struct listener *l =
        (struct listener *)((char *)op - offsetof(struct listener, accept_op));
    struct server *srv = l->srv;
    (void)flags;
    l->accept_pending = false;
    if (res < 0) {
        if (srv->shutting_down)
            return;
        if (res == -EMFILE || res == -ENFILE || res == -ENOMEM ||
            res == -ENOBUFS) {
            /* out of resources: retry on the next tick, not in a spin */
            log_warn("%s: accept: %s", l->desc, strerror(-res));
            return;
        }
        arm_accept(l);
        return;
    }
    int fd = res;
    if (srv->shutting_down) {
        close(fd);
        return;
    }
    arm_accept(l);
    if (srv->n_conns >= srv->cfg.max_connections) {
        log_warn("%s: refusing a client: %u connections is the limit",
                 l->desc, srv->cfg.max_connections);
        close(fd);
        return;
    }
    bool tcp = l->unix_path == NULL;
    if (tcp) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }
    struct conn *c = conn_new(srv, fd, tcp);
    if (!c) {
        log_error("out of memory accepting a client");
        close(fd);
        return;
    }
    c->next = srv->conns;
    if (srv->conns)
        srv->conns->prev = c;
    srv->conns = c;
    srv->n_conns++;
    log_debug("%s: client %llu connected", l->desc, (unsigned long long)c->id);
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
        (struct server *)((char *)op - offsetof(struct server, sig_op));
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
    if (srv->n_exports == 0)
        return error_setf(errp, EINVAL, "no export given (--export file=...)");
    if (srv->n_listeners == 0)
        return error_setf(errp, EINVAL, "no listening address");
    srv->sig_fd = sig_fd;
    srv->sig_op.done = sig_done;
    if (sig_fd >= 0)
        arm_signal(srv);
    for (size_t i = 0; i < srv->n_listeners; i++) {
        log_info("listening on %s", srv->listeners[i].desc);
        arm_accept(&srv->listeners[i]);
    }
    return 0;
}

static void timer_fn(struct loop_timer *t, uint64_t now)
{
    struct server *srv =
        (struct server *)((char *)t - offsetof(struct server, timer));
    for (struct conn *c = srv->conns; c; c = c->next) {
        if ((c->state == CONN_HS_FLAGS || c->state == CONN_HS_OPTION) &&
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
        for (size_t i = 0; i < srv->n_listeners; i++)
            arm_accept(&srv->listeners[i]); /* after EMFILE and the like */
}


static void final_flush_co(struct coro *co, void *opaque)
{
    struct server *srv = opaque;
    for (size_t i = 0; i < srv->n_exports; i++) {
        struct export *e = srv->exports[i];
        int r = fmt_flush_co(e->root, co);
        if (r < 0) {
            log_error("export '%s': final flush failed: %s", e->cfg.name,
                      strerror(-r));
            srv->exit_code = 1;
        }
    }
    loop_stop(srv->loop);
}

void server_check_idle(struct server *srv)
{
    if (!srv->shutting_down || srv->conns || srv->flushing)
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
    for (size_t i = 0; i < srv->n_listeners; i++) {
        struct listener *l = &srv->listeners[i];
        /* wakes the pending accept with an error; the fd closes at exit */
        shutdown(l->fd, SHUT_RDWR);
        l->closed = true;
    }
    for (struct conn *c = srv->conns; c; c = c->next)
        conn_drain(c);
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
    server_check_idle(srv);
}

void server_free(struct server *srv)
{
    if (!srv)
        return;
    assert(!srv->conns);
    for (size_t i = 0; i < srv->n_listeners; i++) {
        struct listener *l = &srv->listeners[i];
        close(l->fd);
        if (l->unix_path)
            unlink(l->unix_path);
        free(l->unix_path);
        free(l->desc);
    }
    free(srv->listeners);
    for (size_t i = 0; i < srv->n_exports; i++) {
        fmt_close(srv->exports[i]->root);
        export_config_clear(&srv->exports[i]->cfg);
        free(srv->exports[i]);
    }
    free(srv->exports);
    loop_timer_del(srv->loop, &srv->timer);
    free(srv);
}
