/* strata — the tables of block nodes (named chains) and of exports:
 * blockdev-add/-del, block-export-add/-del, --export (see exports.h). */
#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "conn.h"
#include "exports.h"
#include "jobs.h"
#include "log.h"
#include "server.h"
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

struct fmt_node *server_find_node(struct server *srv, const char *name,
                                  struct blockdev **bp)
{
    for (size_t i = 0; i < srv->n_bdevs; i++) {
        struct blockdev *b = srv->bdevs[i];
        size_t tl = strlen(b->node_name);
        if (strncmp(name, b->node_name, tl))
            continue;
        const char *p = name + tl;
        struct fmt_node *n = b->root;
        while (n && *p && !strncmp(p, ".backing", 8)) {
            p += 8;
            n = n->backing;
        }
        if (n && !*p) {
            if (bp)
                *bp = b;
            return n;
        }
    }
    return NULL;
}

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

struct blockdev *server_blockdev_add_node(struct server *srv,
                                          const char *node_name,
                                          struct fmt_node *root,
                                          const char *desc,
                                          struct error **errp)
{
    if (!qmp_id_wellformed(node_name)) {
        error_setf(errp, EINVAL, "Invalid node-name: '%s'", node_name);
        return NULL;
    }
    if (server_find_blockdev(srv, node_name)) {
        error_setf(errp, EEXIST, "Duplicate nodes with node-name='%s'",
                   node_name);
        return NULL;
    }
    struct blockdev *b = calloc(1, sizeof(*b));
    void *arr = realloc(srv->bdevs, sizeof(*srv->bdevs) * (srv->n_bdevs + 1));
    if (arr)
        srv->bdevs = arr;
    if (b) {
        b->node_name = strdup(node_name);
        b->driver = strdup(root->ops->name);
        b->filename = strdup(desc);
    }
    if (!b || !arr || !b->node_name || !b->driver || !b->filename) {
        if (b) {
            free(b->node_name);
            free(b->driver);
            free(b->filename);
            free(b);
        }
        error_setf(errp, ENOMEM, "out of memory");
        return NULL;
    }
    b->root = root;
    b->read_only = root->read_only;
    b->transient = true;
    srv->bdevs[srv->n_bdevs++] = b;
    log_info("node '%s': %s (%s, %llu bytes%s)", b->node_name, b->filename,
             b->driver, (unsigned long long)root->size,
             b->read_only ? ", read-only" : "");
    return b;
}

/* Does an export (of this node or another) offer a bitmap of b's chain? */
static bool chain_bitmap_busy(const struct blockdev *b, struct error **errp)
{
    for (struct fmt_node *n = b->root; n; n = n->backing) {
        for (struct fmt_bitmap *bm = n->bitmaps; bm; bm = bm->next) {
            if (bm->busy) {
                error_setf(errp, EBUSY, "Node '%s' is in use: its dirty bitmap "
                           "'%s' is exported", b->node_name, bm->name);
                return true;
            }
        }
    }
    return false;
}

int server_blockdev_del(struct server *srv, const char *node_name,
                        struct coro *co, struct error **errp)
{
    struct blockdev *b = server_find_blockdev(srv, node_name);
    struct blockdev *owner = NULL;
    if (!b && server_find_node(srv, node_name, &owner))
        /* as QEMU answers for a node it opened itself (a backing file) */
        return error_setf(errp, EPERM, "Node '%s' is not owned by the monitor: "
                          "it is a backing layer of node '%s', closed with it "
                          "(blockdev-del '%s'), or merged away by block-commit",
                          node_name, owner->node_name, owner->node_name);
    if (!b)
        return error_setf(errp, ENOENT, "Failed to find node with node-name='%s'",
                          node_name);
    if (b->export)
        return error_setf(errp, EBUSY, "Node '%s' is in use by export '%s'%s",
                          node_name, b->export->cfg.id,
                          b->export->deleted ? " (being deleted: its clients "
                                               "are still disconnecting)" : "");
    if (chain_bitmap_busy(b, errp))
        return -EBUSY;
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
        if (chain_bitmap_busy(b, errp))
            return -EBUSY;
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

/* The bitmaps an export will offer, checked as QEMU's NBD export checks
 * them (nbd_export_create): found, not busy, not inconsistent, and not
 * recording under a read-only export of a writable node (the client would
 * read a bitmap that changes under it). */
static int export_find_bitmaps(struct server *srv, struct blockdev *b,
                               const struct export_add_config *cfg,
                               struct fmt_bitmap **bms, struct error **errp)
{
    if (cfg->n_bitmaps > EXPORT_MAX_BITMAPS)
        return error_setf(errp, EINVAL, "an export offers at most %u bitmaps",
                          EXPORT_MAX_BITMAPS);
    for (size_t i = 0; i < cfg->n_bitmaps; i++) {
        const struct export_bitmap_ref *r = &cfg->bitmaps[i];
        struct fmt_node *n = NULL;
        struct fmt_bitmap *bm = NULL;
        if (r->node) {
            n = server_find_node(srv, r->node, NULL);
            if (!n)
                return error_setf(errp, ENOENT, "Node '%s' not found", r->node);
            bm = fmt_bitmap_find(n, r->name);
            if (!bm)
                return error_setf(errp, ENOENT, "Dirty bitmap '%s' not found",
                                  r->name);
        } else {
            for (n = b->root; n && !bm; n = bm ? n : n->backing)
                bm = fmt_bitmap_find(n, r->name);
            if (!bm)
                return error_setf(errp, ENOENT, "Bitmap '%s' is not found",
                                  r->name);
        }
        for (size_t j = 0; j < i; j++)
            if (bms[j] == bm)
                return error_setf(errp, EINVAL, "Bitmap '%s' is listed twice",
                                  r->name);
        if (fmt_bitmap_check(bm, FMT_BITMAP_CHECK_ALLOW_RO, errp) < 0)
            return -EINVAL;
        if (!cfg->writable && !n->read_only && bm->recording)
            return error_setf(errp, EINVAL, "Enabled bitmap '%s' incompatible "
                              "with readonly export", r->name);
        bms[i] = bm;
    }
    return 0;
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
    struct fmt_bitmap *bms[EXPORT_MAX_BITMAPS];
    if (export_find_bitmaps(srv, b, cfg, bms, errp) < 0)
        return NULL;
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
        set_str(&e->cfg.format, b->driver) < 0 ||
        (cfg->allow && tls_allow_copy(cfg->allow, &e->cfg.allow) < 0)) {
        if (e)
            export_config_clear(&e->cfg);
        free(e);
        error_setf(errp, ENOMEM, "out of memory");
        return NULL;
    }
    for (size_t i = 0; i < cfg->n_bitmaps; i++) {
        if (export_config_add_bitmap(&e->cfg, cfg->bitmaps[i].node,
                                     cfg->bitmaps[i].name, errp) < 0) {
            export_config_clear(&e->cfg);
            free(e);
            return NULL;
        }
    }
    for (size_t i = 0; i < cfg->n_bitmaps; i++) {
        e->bitmaps[i] = bms[i];
        bms[i]->busy++;
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
    for (size_t i = 0; i < e->cfg.n_bitmaps; i++) {
        assert(e->bitmaps[i]->busy > 0);
        e->bitmaps[i]->busy--;
    }
    if (e->bdev && e->bdev->export == e)
        e->bdev->export = NULL;
    export_gate_clear(e);
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
    if (e->n_conns)
        server_workers_abort_export(srv, e);
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
        .allow = &cfg->allow,
        .bitmaps = cfg->bitmaps,
        .n_bitmaps = cfg->n_bitmaps,
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

void server_tables_free(struct server *srv)
{
    for (size_t i = 0; i < srv->n_exports; i++) {
        export_gate_clear(srv->exports[i]);
        export_config_clear(&srv->exports[i]->cfg);
        free(srv->exports[i]);
    }
    free(srv->exports);
    srv->exports = NULL;
    srv->n_exports = 0;
    for (size_t i = 0; i < srv->n_bdevs; i++)
        blockdev_free(srv, srv->bdevs[i], NULL);
    free(srv->bdevs);
    srv->bdevs = NULL;
    srv->n_bdevs = 0;
}
