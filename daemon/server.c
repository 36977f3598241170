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
#include "jobs.h"
#include "server.h"
#include "util.h"

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
    free(cfg->backing_remote);
    free(cfg->id);
    free(cfg->node_name);
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
        else if (!strcmp(key, "backing-remote"))
            str = &cfg->backing_remote;
        else if (!strcmp(key, "id"))
            str = &cfg->id;
        else if (!strcmp(key, "node-name"))
            str = &cfg->node_name;
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
                             "id, node-name, backing-root, backing-remote, "
                             "l2-cache-size, "
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

struct export *server_find_export_id(struct server *srv, const char *id)
{
    for (size_t i = 0; i < srv->n_exports; i++)
        if (!strcmp(srv->exports[i]->cfg.id, id))
            return srv->exports[i];
    return NULL;
}

struct blockdev *server_find_blockdev(struct server *srv, const char *node_name)
{
    for (size_t i = 0; i < srv->n_bdevs; i++)
        if (!strcmp(srv->bdevs[i]->node_name, node_name))
            return srv->bdevs[i];
    return NULL;
}

void server_changed(struct server *srv)
{
    if (srv->change_hook && srv->change_hook->changed)
        srv->change_hook->changed(srv->change_hook);
}

int server_sync_co(struct server *srv, struct coro *co)
{
    server_changed(srv);
    if (srv->change_hook && srv->change_hook->sync_co)
        return srv->change_hook->sync_co(srv->change_hook, co);
    return 0;
}

/* The state file must not depend on the daemon's working directory.
 * Protocol specs (rbd:...) are no paths: kept as they are. */
char *server_absolute_path(const char *path)
{
    if (path[0] == '/' || backend_spec_is_remote(path))
        return strdup(path);
    char *cwd = getcwd(NULL, 0);
    char *abs = NULL;
    if (cwd && asprintf(&abs, "%s/%s", cwd, path) < 0)
        abs = NULL;
    free(cwd);
    return abs;
}

/* co: close the chain without blocking the loop (see fmt_close_co). */
static void blockdev_free(struct server *srv, struct blockdev *b,
                          struct coro *co)
{
    if (co)
        fmt_close_co(b->root, srv->loop, co);
    else
        fmt_close(b->root);
    free(b->node_name);
    free(b->driver);
    free(b->filename);
    free(b->backing_root);
    free(b->backing_remote);
    free(b);
}

static struct blockdev *blockdev_add(struct server *srv,
                                     const struct blockdev_config *cfg,
                                     struct coro *co, struct error **errp);

struct blockdev *server_blockdev_add(struct server *srv,
                                     const struct blockdev_config *cfg,
                                     struct error **errp)
{
    return blockdev_add(srv, cfg, NULL, errp);
}

struct blockdev *server_blockdev_add_co(struct server *srv,
                                        const struct blockdev_config *cfg,
                                        struct coro *co, struct error **errp)
{
    return blockdev_add(srv, cfg, co, errp);
}

static struct blockdev *blockdev_add(struct server *srv,
                                     const struct blockdev_config *cfg,
                                     struct coro *co, struct error **errp)
{
    if (!qmp_id_wellformed(cfg->node_name)) {
        error_setf(errp, EINVAL, "Invalid node-name: '%s'", cfg->node_name);
        return NULL;
    }
    if (server_find_blockdev(srv, cfg->node_name)) {
        error_setf(errp, EEXIST, "Duplicate nodes with node-name='%s'",
                   cfg->node_name);
        return NULL;
    }
    struct fmt_open_opts fo = {
        .format = cfg->driver,
        .read_only = cfg->read_only,
        .direct = cfg->direct,
        .l2_cache_bytes = cfg->l2_cache_bytes,
        .refcount_cache_bytes = cfg->refcount_cache_bytes,
        .backing_root = cfg->backing_root,
        .backing_remote = cfg->backing_remote,
    };
    /* fmt_open() drives the loop itself: only before it runs */
    struct fmt_node *root = co ? fmt_open_co(srv->loop, co, cfg->filename, &fo, errp)
                               : fmt_open(srv->loop, cfg->filename, &fo, errp);
    if (!root)
        return NULL;
    struct blockdev *b = calloc(1, sizeof(*b));
    void *arr = realloc(srv->bdevs, sizeof(*srv->bdevs) * (srv->n_bdevs + 1));
    if (arr)
        srv->bdevs = arr;
    if (b) {
        b->node_name = strdup(cfg->node_name);
        b->driver = strdup(root->ops->name);
        b->filename = server_absolute_path(cfg->filename);
    }
    if (!b || !arr || !b->node_name || !b->driver || !b->filename) {
        if (b) {
            b->root = root;
            blockdev_free(srv, b, NULL); /* out of memory: no time to lose */
        } else {
            fmt_close(root);
        }
        error_setf(errp, ENOMEM, "out of memory");
        return NULL;
    }
    b->root = root;
    b->read_only = root->read_only;
    b->direct = cfg->direct;
    b->l2_cache_bytes = cfg->l2_cache_bytes;
    b->refcount_cache_bytes = cfg->refcount_cache_bytes;
    if (cfg->backing_root && !(b->backing_root = strdup(cfg->backing_root)))
        log_warn("node '%s': out of memory recording backing-root",
                 b->node_name);
    if (cfg->backing_remote &&
        !(b->backing_remote = strdup(cfg->backing_remote)))
        log_warn("node '%s': out of memory recording backing-remote",
                 b->node_name);
    srv->bdevs[srv->n_bdevs++] = b;
    log_info("node '%s': %s (%s, %llu bytes%s%s)", b->node_name, b->filename,
             b->driver, (unsigned long long)root->size,
             b->read_only ? ", read-only" : "", b->direct ? ", cache=none" : "");
    server_changed(srv);
    return b;
}

int server_blockdev_del(struct server *srv, const char *node_name,
                        struct coro *co, struct error **errp)
{
    struct blockdev *b = server_find_blockdev(srv, node_name);
    if (!b)
        return error_setf(errp, ENOENT, "Failed to find node with node-name='%s'",
                          node_name);
    if (b->export)
        return error_setf(errp, EBUSY, "Node '%s' is in use by export '%s'%s",
                          node_name, b->export->cfg.id,
                          b->export->deleted ? " (being deleted: its clients "
                                               "are still disconnecting)" : "");
    if (co) {
        /* Writes acknowledged since the last flush must not be lost with
         * the node's metadata cache: flush, and keep the node if that
         * fails. */
        int r = fmt_flush_co(b->root, co);
        if (r < 0)
            return error_setf(errp, -r, "Node '%s': flush before closing: %s",
                              node_name, strerror(-r));
        /* The flush yielded: look again. */
        if (server_find_blockdev(srv, node_name) != b)
            return error_setf(errp, ENOENT, "Failed to find node with "
                              "node-name='%s'", node_name);
        if (b->export)
            return error_setf(errp, EBUSY, "Node '%s' is in use by export '%s'",
                              node_name, b->export->cfg.id);
    }
    size_t i = 0;
    while (srv->bdevs[i] != b)
        i++;
    memmove(&srv->bdevs[i], &srv->bdevs[i + 1],
            sizeof(*srv->bdevs) * (srv->n_bdevs - i - 1));
    srv->n_bdevs--;
    log_info("node '%s' deleted", node_name);
    blockdev_free(srv, b, co);
    server_changed(srv);
    return 0;
}

static int set_str(char **dst, const char *src)
{
    if (!src)
        return 0;
    *dst = strdup(src);
    return *dst ? 0 : -ENOMEM;
}

struct export *server_export_add(struct server *srv,
                                 const struct export_add_config *cfg,
                                 struct error **errp)
{
    if (!qmp_id_wellformed(cfg->id)) {
        error_setf(errp, EINVAL, "Invalid export id: '%s'", cfg->id);
        return NULL;
    }
    if (server_find_export_id(srv, cfg->id)) {
        error_setf(errp, EEXIST, "Block export id '%s' is already in use",
                   cfg->id);
        return NULL;
    }
    struct blockdev *b = server_find_blockdev(srv, cfg->node_name);
    if (!b) {
        error_setf(errp, ENOENT, "Cannot find device=%s nor node-name=%s",
                   cfg->node_name, cfg->node_name);
        return NULL;
    }
    if (b->export) {
        error_setf(errp, EBUSY, "Node '%s' is already exported as '%s' "
                   "(strata exports a node at most once)", b->node_name,
                   b->export->cfg.id);
        return NULL;
    }
    if (cfg->writable && b->read_only) {
        error_setf(errp, EINVAL, "Cannot export read-only node as writable");
        return NULL;
    }
    const char *name = cfg->name ? cfg->name : b->node_name;
    if (strlen(name) > NBD_MAX_STRING ||
        (cfg->description && strlen(cfg->description) > NBD_MAX_STRING)) {
        error_setf(errp, EINVAL, "export name or description longer than %u bytes",
                   NBD_MAX_STRING);
        return NULL;
    }
    /* the empty name is the default export: it may be taken only once */
    for (size_t i = 0; i < srv->n_exports; i++) {
        if (!strcmp(srv->exports[i]->cfg.name, name)) {
            error_setf(errp, EEXIST, "NBD server already has export named '%s'",
                       name);
            return NULL;
        }
    }
    struct export *e = calloc(1, sizeof(*e));
    void *arr = realloc(srv->exports, sizeof(*srv->exports) * (srv->n_exports + 1));
    if (arr)
        srv->exports = arr;
    if (!e || !arr || set_str(&e->cfg.name, name) < 0 ||
        set_str(&e->cfg.id, cfg->id) < 0 ||
        set_str(&e->cfg.node_name, b->node_name) < 0 ||
        set_str(&e->cfg.description, cfg->description) < 0 ||
        set_str(&e->cfg.file, b->filename) < 0 ||
        set_str(&e->cfg.format, b->driver) < 0) {
        if (e)
            export_config_clear(&e->cfg);
        free(e);
        error_setf(errp, ENOMEM, "out of memory");
        return NULL;
    }
    e->cfg.read_only = !cfg->writable;
    e->cfg.direct = b->direct;
    e->srv = srv;
    e->bdev = b;
    e->writable = cfg->writable;
    b->export = e;
    srv->exports[srv->n_exports++] = e;
    log_info("export '%s' (id %s): node '%s'%s", e->cfg.name, e->cfg.id,
             b->node_name, e->writable ? "" : ", read-only");
    server_changed(srv);
    return e;
}

static void export_free(struct server *srv, struct export *e)
{
    assert(e->n_conns == 0 && e->inflight == 0 && e->quiesce_count == 0);
    if (e->bdev && e->bdev->export == e)
        e->bdev->export = NULL;
    char *id = e->cfg.id;
    e->cfg.id = NULL;
    export_config_clear(&e->cfg);
    free(e);
    if (id && srv->change_hook && srv->change_hook->export_deleted)
        srv->change_hook->export_deleted(srv->change_hook, id);
    free(id);
}

int server_export_del(struct server *srv, const char *id,
                      enum export_del_mode mode, struct error **errp)
{
    size_t i;
    for (i = 0; i < srv->n_exports; i++)
        if (!strcmp(srv->exports[i]->cfg.id, id))
            break;
    if (i == srv->n_exports)
        return error_setf(errp, ENOENT, "Export '%s' is not found", id);
    struct export *e = srv->exports[i];
    if (mode == EXPORT_DEL_SAFE && e->n_conns > 0)
        return error_setf(errp, EBUSY, "export '%s' still in use (%u client%s "
                          "connected; mode=hard disconnects them)", id,
                          e->n_conns, e->n_conns == 1 ? "" : "s");
    memmove(&srv->exports[i], &srv->exports[i + 1],
            sizeof(*srv->exports) * (srv->n_exports - i - 1));
    srv->n_exports--;
    e->deleted = true;
    for (struct conn *c = srv->conns; c; c = c->next) {
        if (c->meta_export == e)
            c->meta_export = NULL;
        if (c->exp == e)
            conn_abort(c, "export deleted");
    }
    log_info("export '%s' (id %s) deleted%s", e->cfg.name, id,
             e->n_conns ? ": disconnecting its clients" : "");
    server_changed(srv);
    if (e->n_conns == 0)
        export_free(srv, e);
    return 0;
}

void server_export_conn_gone(struct server *srv, struct export *e)
{
    assert(e->n_conns > 0);
    if (--e->n_conns == 0 && e->deleted)
        export_free(srv, e);
}

char *export_config_id(const struct export_config *cfg)
{
    if (cfg->id)
        return strdup(cfg->id);
    if (!cfg->name[0])
        return strdup("default");
    if (qmp_id_wellformed(cfg->name))
        return strdup(cfg->name);
    /* a name QMP ids cannot spell: a stable id derived from it (FNV-1a),
     * so that the same --export gets the same id on every start */
    uint32_t h = 2166136261u;
    for (const unsigned char *p = (const unsigned char *)cfg->name; *p; p++)
        h = (h ^ *p) * 16777619u;
    char *id = NULL;
    if (asprintf(&id, "export-%08x", h) < 0)
        return NULL;
    return id;
}

int server_add_export(struct server *srv, struct export_config *cfg,
                      struct error **errp)
{
    char *id = export_config_id(cfg);
    if (!id)
        return error_setf(errp, ENOMEM, "out of memory");
    const char *node_name = cfg->node_name ? cfg->node_name : id;
    struct blockdev_config bc = {
        .node_name = node_name,
        .driver = cfg->format,
        .filename = cfg->file,
        .read_only = cfg->read_only,
        .direct = cfg->direct,
        .backing_root = cfg->backing_root,
        .backing_remote = cfg->backing_remote,
        .l2_cache_bytes = cfg->l2_cache_bytes,
        .refcount_cache_bytes = cfg->refcount_cache_bytes,
    };
    int ret = 0;
    if (server_find_export_id(srv, id))
        ret = error_setf(errp, EEXIST, "export id '%s' is defined twice", id);
    struct blockdev *b = ret ? NULL : server_blockdev_add(srv, &bc, errp);
    if (!b) {
        error_prefix(errp, "export '%s': ", cfg->name);
        free(id);
        return ret ? ret : -EINVAL;
    }
    struct export_add_config ac = {
        .id = id,
        .node_name = node_name,
        .name = cfg->name,
        .description = cfg->description,
        .writable = !cfg->read_only,
    };
    struct export *e = server_export_add(srv, &ac, errp);
    if (!e) {
        error_prefix(errp, "export '%s': ", cfg->name);
        server_blockdev_del(srv, node_name, NULL, NULL);
        free(id);
        return -EINVAL;
    }
    free(id);
    export_config_clear(cfg); /* consumed */
    return 0;
}

/* ---- quiesce ---- */

void export_enter_co(struct export *e, struct coro *co)
{
    while (e->quiesce_count > 0)
        co_queue_wait_co(&e->resume_q, co);
    e->inflight++;
}

void export_leave(struct export *e)
{
    assert(e->inflight > 0);
    if (--e->inflight == 0 && e->quiesce_count > 0)
        co_queue_wake_all(&e->drained_q);
}

void export_quiesce_co(struct export *e, struct coro *co)
{
    if (e->quiesce_count++ == 0)
        e->quiesce_start_ns = loop_now_ns();
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

void export_set_root(struct export *e, struct fmt_node *root)
{
    assert(e->quiesce_count > 0 && e->inflight == 0);
    e->bdev->root = root;
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

int server_unix_socket(const char *path, const char *what, int mode,
                       int backlog, struct error **errp)
{
    struct sockaddr_un sun;
    if (strlen(path) >= sizeof(sun.sun_path))
        return error_setf(errp, ENAMETOOLONG, "%s%s: path too long", what, path);
    memset(&sun, 0, sizeof(sun));
    sun.sun_family = AF_UNIX;
    strcpy(sun.sun_path, path);
    struct stat st;
    /* a stale socket of an earlier run is replaced; anything else is not */
    if (lstat(path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode))
            return error_setf(errp, EEXIST, "%s%s exists and is not a socket",
                              what, path);
        unlink(path);
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return error_setf(errp, errno, "socket: %s", strerror(errno));
    /* With a mode, created with it: no window with a looser one.  Start-up
     * is single-threaded, so the process-wide umask may be borrowed. */
    mode_t old = mode >= 0 ? umask(~(mode_t)mode & 0777) : 0;
    int r = bind(fd, (struct sockaddr *)&sun, sizeof(sun));
    int e = errno;
    if (mode >= 0) {
        umask(old);
        if (r == 0 && chmod(path, (mode_t)mode) < 0) {
            r = -1;
            e = errno;
        }
    }
    if (r == 0 && listen(fd, backlog) < 0) {
        r = -1;
        e = errno;
    }
    if (r < 0) {
        close(fd);
        return error_setf(errp, e, "%s%s: %s", what, path, strerror(e));
    }
    return fd;
}

static int listen_unix(struct server *srv, const char *path,
                       struct error **errp)
{
    int fd = server_unix_socket(path, "unix:", -1, SOMAXCONN, errp);
    if (fd < 0)
        return fd;
    char desc[sizeof(((struct sockaddr_un *)0)->sun_path) + 8];
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
        container_of(op, struct listener, accept_op);
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
    for (size_t i = 0; i < srv->n_listeners; i++) {
        log_info("listening on %s", srv->listeners[i].desc);
        arm_accept(&srv->listeners[i]);
    }
    return 0;
}

static void timer_fn(struct loop_timer *t, uint64_t now)
{
    struct server *srv =
        container_of(t, struct server, timer);
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
    }
    loop_stop(srv->loop);
}

void server_check_idle(struct server *srv)
{
    if (!srv->shutting_down || srv->conns || srv->flushing || srv->holds)
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
        export_config_clear(&srv->exports[i]->cfg);
        free(srv->exports[i]);
    }
    free(srv->exports);
    for (size_t i = 0; i < srv->n_bdevs; i++)
        blockdev_free(srv, srv->bdevs[i], NULL);
    free(srv->bdevs);
    loop_timer_del(srv->loop, &srv->timer);
    free(srv);
}
