/* strata — naming the layers of a chain, and the external snapshot
 * (blockdev-snapshot-sync).  See chain.h. */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "chain.h"
#include "log.h"

/* ---- naming layers ---- */

char *chain_layer_path(const struct blockdev *b, const struct fmt_node *n,
                       struct error **errp)
{
    char *path = strdup(b->filename);
    for (struct fmt_node *x = b->root; path && x != n; x = x->backing) {
        const char *name = x->backing ? fmt_backing_name(x) : NULL;
        if (!name) {
            free(path);
            error_setf(errp, ENOENT, "%s: not a layer of node '%s'",
                       n->filename, b->node_name);
            return NULL;
        }
        char *next = fmt_resolve_backing(path, name, NULL, errp);
        free(path);
        path = next;
        if (!path)
            return NULL;
    }
    if (!path)
        error_setf(errp, ENOMEM, "out of memory");
    return path;
}

/* The member name query-named-block-nodes shows for depth. */
static bool member_name_is(const char *top, unsigned depth, const char *name)
{
    size_t tl = strlen(top);
    if (strncmp(name, top, tl))
        return false;
    const char *p = name + tl;
    for (unsigned i = 0; i < depth; i++, p += 8)
        if (strncmp(p, ".backing", 8))
            return false;
    return *p == '\0';
}

struct fmt_node *chain_find(const struct blockdev *b, const char *file,
                            const char *node, unsigned *depth,
                            struct error **errp)
{
    unsigned d = 0;
    for (struct fmt_node *x = b->root; x; x = x->backing, d++) {
        bool match = false;
        if (node) {
            match = member_name_is(b->node_name, d, node);
        } else {
            char *p = chain_layer_path(b, x, NULL);
            match = !strcmp(file, x->filename) || (p && !strcmp(file, p)) ||
                    (p && fmt_same_layer(file, p));
            free(p);
        }
        if (match) {
            if (depth)
                *depth = d;
            return x;
        }
    }
    error_setf(errp, ENOENT, node ? "Cannot find node '%s' in the chain of '%s'"
                                  : "Cannot find '%s' in the chain of '%s'",
               node ? node : file, b->node_name);
    return NULL;
}

static bool path_inside(const char *path, const char *root)
{
    size_t n = strlen(root);
    if (n == 1 && root[0] == '/')
        return true;
    return strncmp(path, root, n) == 0 && (path[n] == '/' || path[n] == 0);
}

/* realpath() of the directory that holds path (which may not exist). */
static int real_dir_of(const char *path, char *out, struct error **errp)
{
    char dir[PATH_MAX];
    const char *slash = strrchr(path, '/');
    if (!slash)
        snprintf(dir, sizeof(dir), ".");
    else if (slash == path)
        snprintf(dir, sizeof(dir), "/");
    else
        snprintf(dir, sizeof(dir), "%.*s", (int)(slash - path), path);
    if (!realpath(dir, out))
        return error_setf(errp, errno, "%s: %s", dir, strerror(errno));
    return 0;
}

int chain_check_backing_root(const struct blockdev *b, struct fmt_node *n,
                             const char *top_path, const char *backing_root,
                             struct error **errp)
{
    char root[PATH_MAX];
    bool no_local = false; /* as the chain opener: see fmt_open_opts */
    if (backing_root) {
        if (!realpath(backing_root, root))
            return error_setf(errp, errno, "backing root %s: %s", backing_root,
                              strerror(errno));
    } else if (!backend_spec_is_local(top_path)) {
        no_local = true;
    } else if (real_dir_of(top_path, root, errp) < 0) {
        return -1;
    }
    for (struct fmt_node *x = n; x; x = x->backing) {
        char *p = chain_layer_path(b, x, errp);
        if (!p)
            return -1;
        char real[PATH_MAX];
        bool local = backend_spec_is_local(p);
        if (local && no_local) {
            error_setf(errp, EACCES, "%s would be a local backing file under "
                       "%s, an image on RBD, so the chain would not open "
                       "again after a restart (set backing-root= on the "
                       "export to allow local backing files)", p, top_path);
            free(p);
            return -1;
        }
        if (local && (!realpath(p, real) || !path_inside(real, root))) {
            error_setf(errp, EACCES, "%s would be outside the backing root %s of "
                       "a chain whose top is %s, so the chain would not open "
                       "again after a restart (keep the images in one "
                       "directory, or set backing-root= on the export)",
                       p, root, top_path);
            free(p);
            return -1;
        }
        free(p);
    }
    return 0;
}

/* ---- blockdev-snapshot-sync ---- */

int snapshot_sync_co(struct server *srv, struct export *e,
                     const struct snapshot_args *a, struct coro *co,
                     struct snapshot_result *res, struct error **errp)
{
    struct blockdev *b = e->bdev;
    struct fmt_node *old = b->root;
    uint64_t t0 = loop_now_ns();
    *res = (struct snapshot_result){0};

    if (b->chain_busy)
        return error_setf(errp, EBUSY, "Node '%s' is busy: its chain is being "
                          "changed", b->node_name);
    if (!a->file[0])
        return error_setf(errp, EINVAL, "snapshot-file must not be empty");
    unsigned layers = 0;
    for (struct fmt_node *x = old; x; x = x->backing)
        layers++;
    if (layers >= FMT_MAX_CHAIN_DEPTH)
        return error_setf(errp, ELOOP, "the chain of '%s' already has %u layers "
                          "(at most %d)", b->node_name, layers, FMT_MAX_CHAIN_DEPTH);

    char *path = server_absolute_path(a->file);
    char *bname = NULL, *old_filename = NULL, *old_driver = NULL;
    struct fmt_node *n = NULL;
    bool created = false;
    int r = 0;
    if (!path) {
        r = error_setf(errp, ENOMEM, "out of memory");
        goto out;
    }
    if (!backend_spec_is_local(path)) {
        /* creating remote storage refuses an existing image */
    } else {
        struct stat st;
        if (lstat(path, &st) == 0) {
            r = error_setf(errp, EEXIST, "%s already exists (the snapshot "
                           "creates a new file)", path);
            goto out;
        }
        char dir[PATH_MAX];
        if (real_dir_of(path, dir, errp) < 0) {
            r = -ENOENT;
            goto out;
        }
    }
    bname = backend_backing_name(path, b->filename, a->relative_backing,
                                 errp);
    if (!bname) {
        r = -EINVAL;
        goto out;
    }
    if (chain_check_backing_root(b, old, path, b->backing_root, errp) < 0) {
        r = -EACCES;
        goto out;
    }

    b->chain_busy = true;
    /* The bulk of the old top's dirty data goes out before the quiesce
     * (again while a flush still takes long, as under load); what guests
     * write meanwhile is flushed again inside it. */
    for (int i = 0; i < 3; i++) {
        uint64_t f0 = loop_now_ns();
        r = fmt_flush_co(old, co);
        if (r < 0) {
            error_setf(errp, -r, "%s: flush: %s", old->filename, strerror(-r));
            goto out;
        }
        if (loop_now_ns() - f0 < 2000000)
            break;
    }
    const struct fmt_driver *drv = a->format ? fmt_find_driver(a->format)
                                             : fmt_default_overlay_driver();
    if (!fmt_driver_can_backing(drv)) {
        r = error_setf(errp, EINVAL, "format '%s' cannot be an overlay",
                       a->format);
        goto out;
    }
    r = fmt_create_co(drv, srv->loop, co, path, old->size, bname,
                      old->ops->name, errp);
    if (r < 0)
        goto out;
    created = true;
    struct fmt_open_opts fo = {
        .format = drv->name,
        .read_only = b->read_only,
        .direct = b->direct,
        .l2_cache_bytes = b->l2_cache_bytes,
        .refcount_cache_bytes = b->refcount_cache_bytes,
        .backing_root = b->backing_root,
    };
    n = fmt_open_overlay_co(srv->loop, co, path, old, &fo, errp);
    if (!n) {
        r = -EIO;
        goto out;
    }
    old_filename = b->filename;
    old_driver = b->driver;
    b->filename = path;
    b->driver = strdup(drv->name);
    path = NULL; /* b->filename now */
    if (!b->driver) {
        r = error_setf(errp, ENOMEM, "out of memory");
        goto undo;
    }

    /* The state file names the overlay before the switch: from now on a
     * restart opens overlay <- old top, whose content is the old top's
     * as long as nothing was written to the overlay; so every instant of
     * what follows is covered, and the quiesce need not wait for it. */
    r = server_sync_co(srv, co);
    if (r < 0) {
        error_setf(errp, -r, "the state file could not be saved: %s",
                   strerror(-r));
        goto undo;
    }

    /* The switch.  Inside the quiesce only the old top goes read-only
     * (which flushes what was acknowledged on it since the flush above: a
     * guest FLUSH from now on reaches the new top only) and the root
     * moves. */
    uint64_t qs = loop_now_ns();
    export_quiesce_co(e, co);
    uint64_t q0 = loop_now_ns();
    r = fmt_reopen_co(old, co, true, errp);
    uint64_t q1 = loop_now_ns();
    if (r == 0)
        export_set_root(e, n);
    res->stall_ns = export_resume(e);
    if (r < 0)
        goto undo;
    n = NULL; /* the chain owns it */
    created = false;
    res->total_ns = loop_now_ns() - t0;
    log_info("node '%s': snapshot: %s is the new top (backing %s), export "
             "'%s' stalled %.3f ms (drain %.3f ms, old top flush %.3f ms)",
             b->node_name, b->filename, bname, e->cfg.id, res->stall_ns / 1e6,
             (q0 - qs) / 1e6, (q1 - q0) / 1e6);
    goto out;

undo:
    /* Nothing was written to the overlay: the old top stays the top. */
    path = b->filename;
    b->filename = old_filename;
    free(b->driver);
    b->driver = old_driver;
    old_filename = old_driver = NULL;
    if (server_sync_co(srv, co) < 0) {
        /* The state file may still name the overlay: keep the file (empty,
         * backed by the old top, so a restart shows the same data). */
        log_warn("node '%s': the state file may still name %s: keeping it",
                 b->node_name, path);
        created = false;
    }

out:
    if (n) {
        n->backing = NULL; /* the old chain is not its to close */
        fmt_close(n);
    }
    if (created && path) {
        struct error *rm = NULL;
        if (backend_remove(path, &rm) < 0) {
            log_warn("%s", rm->msg);
            error_free(rm);
        }
    }
    b->chain_busy = false;
    free(path);
    free(bname);
    free(old_filename);
    free(old_driver);
    return r;
}
