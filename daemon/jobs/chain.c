/* strata — naming the layers of a chain, and the external snapshot
 * (blockdev-snapshot-sync).  See chain.h. */
#include <assert.h>
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
        char *next = fmt_resolve_backing(path, name, b->backing_remote, errp);
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
    bool above_local = backend_spec_is_local(top_path);
    for (struct fmt_node *x = n; x; x = x->backing) {
        char *p = chain_layer_path(b, x, errp);
        if (!p)
            return -1;
        char real[PATH_MAX];
        bool local = backend_spec_is_local(p);
        if (above_local && !local && !b->backing_remote) {
            error_setf(errp, EACCES, "%s would be remote storage under a "
                       "local image, so the chain would not open again "
                       "after a restart (set backing-remote= on the export "
                       "to allow it)", p);
            free(p);
            return -1;
        }
        above_local = local;
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

/* Removes an overlay file that a failed snapshot made; a failure to
 * remove it is logged (the file is empty, backed by the old top). */
static void remove_overlay(const char *path)
{
    struct error *rm = NULL;
    if (backend_remove(path, &rm) < 0) {
        log_warn("%s", rm->msg);
        error_free(rm);
    }
}

int snapshot_prepare_co(struct server *srv, struct export *e,
                        const struct snapshot_args *a, struct coro *co,
                        struct snapshot_prep *p, struct error **errp)
{
    struct blockdev *b = e->bdev;
    struct fmt_node *old = b->root;
    *p = (struct snapshot_prep){.srv = srv, .e = e, .old = old,
                                .t0 = loop_now_ns()};

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
    int r = 0;
    if (!path) {
        r = error_setf(errp, ENOMEM, "out of memory");
        goto fail;
    }
    if (!backend_spec_is_local(path)) {
        /* creating remote storage refuses an existing image */
    } else {
        struct stat st;
        if (lstat(path, &st) == 0) {
            r = error_setf(errp, EEXIST, "%s already exists (the snapshot "
                           "creates a new file)", path);
            goto fail;
        }
        char dir[PATH_MAX];
        if (real_dir_of(path, dir, errp) < 0) {
            r = -ENOENT;
            goto fail;
        }
    }
    p->bname = backend_backing_name(path, b->filename, a->relative_backing,
                                    errp);
    if (!p->bname) {
        r = -EINVAL;
        goto fail;
    }
    if (chain_check_backing_root(b, old, path, b->backing_root, errp) < 0) {
        r = -EACCES;
        goto fail;
    }

    b->chain_busy = true;
    p->busy = true;
    export_watch_begin(e);
    p->watching = true;
    /* No flush of the old top here: the guest is still writing into it,
     * and a sync of a file makes the writes to it wait (the file system
     * holds the pages under write-back locked).  The old top is flushed
     * after the switch, while the guest writes into the overlay. */
    p->c0 = loop_now_ns();
    const struct fmt_driver *drv = a->format ? fmt_find_driver(a->format)
                                             : fmt_default_overlay_driver();
    if (!fmt_driver_can_backing(drv)) {
        r = error_setf(errp, EINVAL, "format '%s' cannot be an overlay",
                       a->format);
        goto fail;
    }
    r = fmt_create_co(drv, srv->loop, co, path, old->size, p->bname,
                      old->ops->name, errp);
    if (r < 0)
        goto fail;
    p->created = true;
    struct fmt_open_opts fo = {
        .format = drv->name,
        .read_only = b->read_only,
        .direct = b->direct,
        .l2_cache_bytes = b->l2_cache_bytes,
        .refcount_cache_bytes = b->refcount_cache_bytes,
        .backing_root = b->backing_root,
        .backing_remote = b->backing_remote,
    };
    p->n = fmt_open_overlay_co(srv->loop, co, path, old, &fo, errp);
    if (!p->n) {
        r = -EIO;
        goto fail;
    }
    p->old_filename = b->filename;
    p->old_driver = b->driver;
    b->filename = path;
    b->driver = strdup(drv->name);
    path = NULL; /* b->filename now */
    p->named = true;
    if (!b->driver) {
        r = error_setf(errp, ENOMEM, "out of memory");
        goto fail;
    }

    /* The state file names the overlay before the switch: from now on a
     * restart opens overlay <- old top, whose content is the old top's
     * as long as nothing was written to the overlay; so every instant of
     * what follows is covered, and the quiesce need not wait for it. */
    r = server_sync_co(srv, co);
    if (r < 0) {
        error_setf(errp, -r, "the state file could not be saved: %s",
                   strerror(-r));
        goto fail;
    }
    return 0;

fail:
    if (p->created && !p->named) {
        /* made but never named: the overlay's path is still ours */
        remove_overlay(path);
        p->created = false;
    }
    free(path);
    snapshot_abort_co(p, co);
    return r;
}

void snapshot_switch(struct snapshot_prep *p)
{
    assert(p->n && p->e->quiesce_count > 0);
    p->qs = loop_now_ns();
    export_set_root(p->e, p->n);
    p->n = NULL; /* the chain owns it */
    p->created = false;
    p->switched = true;
}

void snapshot_unswitch(struct snapshot_prep *p)
{
    assert(p->switched && p->e->quiesce_count > 0);
    p->n = p->e->bdev->root;
    export_set_root(p->e, p->old);
    p->created = true;
    p->switched = false;
}

void snapshot_finish_co(struct snapshot_prep *p, struct coro *co,
                        struct snapshot_result *res)
{
    struct blockdev *b = p->e->bdev;
    struct export *e = p->e;
    assert(p->switched);
    log_debug("node '%s': snapshot: checks in %.3f ms, overlay created, "
              "opened and named in the state file in %.3f ms", b->node_name,
              (p->c0 - p->t0) / 1e6, (p->qs - p->c0) / 1e6);
    /* What was acknowledged on the old top is flushed now, while the
     * guest goes on writing into the overlay, another file: until the
     * old top is read-only, a guest FLUSH on the new top flushes it too
     * (a qcow2 node flushes a writable backing node first), so no FLUSH
     * is answered before what it covers is durable; a FUA write on the
     * new top does not wait for it (it needs only the overlay).  Then a
     * second, short quiesce makes the old top read-only (its reopen may
     * not run beside requests that read through it; nothing was written
     * to it since this flush, so its own flush finds nothing to write). */
    uint64_t f0 = loop_now_ns();
    struct error *ferr = NULL;
    int r = fmt_flush_co(p->old, co);
    uint64_t f1 = loop_now_ns();
    if (r == 0) {
        export_quiesce_co(e, co);
        r = fmt_reopen_co(p->old, co, true, &ferr);
        res->stall_ns += export_resume(e);
    } else {
        error_setf(&ferr, -r, "%s: flush: %s", p->old->filename, strerror(-r));
    }
    if (r < 0) {
        /* The snapshot is made: the old top stays writable, and the guest
         * hears of the failure from its next FLUSH (which flushes it). */
        log_error("node '%s': snapshot: the old top stays writable: %s",
                  b->node_name, ferr->msg);
        error_free(ferr);
    }
    res->total_ns = loop_now_ns() - p->t0;
    res->request_stall_ns = export_watch_end(e);
    p->watching = false;
    log_info("node '%s': snapshot: %s is the new top (backing %s), export "
             "'%s' stalled %.3f ms (both quiesces), old top flushed in "
             "%.3f ms meanwhile, longest request %.3f ms", b->node_name,
             b->filename, p->bname, e->cfg.id, res->stall_ns / 1e6,
             (f1 - f0) / 1e6, res->request_stall_ns / 1e6);
    b->chain_busy = false;
    p->busy = false;
    free(p->bname);
    free(p->old_filename);
    free(p->old_driver);
    *p = (struct snapshot_prep){0};
}

void snapshot_abort_co(struct snapshot_prep *p, struct coro *co)
{
    assert(!p->switched);
    struct blockdev *b = p->e ? p->e->bdev : NULL;
    char *path = NULL;
    bool created = p->created;
    if (p->named) {
        /* Nothing was written to the overlay: the old top stays the top. */
        path = b->filename;
        b->filename = p->old_filename;
        free(b->driver);
        b->driver = p->old_driver;
        p->old_filename = p->old_driver = NULL;
        if (server_sync_co(p->srv, co) < 0) {
            /* The state file may still name the overlay: keep the file
             * (empty, backed by the old top, so a restart shows the same
             * data). */
            log_warn("node '%s': the state file may still name %s: keeping it",
                     b->node_name, path);
            created = false;
        }
    }
    if (p->n) {
        p->n->backing = NULL; /* the old chain is not its to close */
        fmt_close(p->n);
    }
    if (created && path)
        remove_overlay(path);
    if (p->watching)
        export_watch_end(p->e);
    if (p->busy)
        b->chain_busy = false;
    free(path);
    free(p->bname);
    free(p->old_filename);
    free(p->old_driver);
    *p = (struct snapshot_prep){0};
}

int snapshot_sync_co(struct server *srv, struct export *e,
                     const struct snapshot_args *a, struct coro *co,
                     struct snapshot_result *res, struct error **errp)
{
    struct snapshot_prep p;
    *res = (struct snapshot_result){0};
    int r = snapshot_prepare_co(srv, e, a, co, &p, errp);
    if (r < 0)
        return r;
    export_quiesce_co(e, co);
    snapshot_switch(&p);
    res->stall_ns = export_resume(e);
    snapshot_finish_co(&p, co, res);
    return 0;
}
