/* strata — pull-mode backup over QMP, as libvirt runs it on QEMU 7.2:
 *
 *   blockdev-add      a temporary qcow2 node (the target)
 *   blockdev-backup   {job-id, device, target, sync: "none",
 *                      filter-node-name}, alone or as a transaction
 *                      action beside block-dirty-bitmap-add/-disable:
 *                      inserts a copy-before-write filter (formats/cbw.h)
 *                      between the guest's export and its node, at one
 *                      instant (under the export's quiesce), and starts a
 *                      "backup" job that lasts until cancelled
 *   blockdev-add      {driver: "snapshot-access", file: FILTER}: the
 *                      frozen view, a read-only node
 *   block-export-add  of that node, with "bitmaps" for an incremental
 *   ... the backup tool reads ...
 *   block-export-del, blockdev-del of the view, block-job-cancel (or
 *   job-cancel) of the job, blockdev-del of the target.
 *
 * The filter is a write notifier of the export (exports.h): every guest
 * write, write-zeroes and trim calls cbw_before_write_co before it
 * reaches the chain; a failed copy fails the guest request (QEMU's
 * on-cbw-error=break-guest-write).  While the job lives, the export
 * cannot be deleted and its chain cannot change (snapshot, commit: the
 * job works on the device), and the target cannot be exported or deleted.
 * When the job ends, the filter is removed under a quiesce, the copies
 * and snapshot reads in flight finish, and the view's reads fail with EIO
 * from then on (never stale data).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "cbw.h"
#include "control-int.h"
#include "jobs.h"
#include "log.h"

struct ctl_backup {
    struct control *ctl;
    struct ctl_backup *next;       /* ctl->backups */
    char *job_id;
    char *filter;                  /* filter-node-name, or NULL */
    struct export *e;              /* the guest's export */
    struct blockdev *target;       /* chain_busy while attached */
    struct fmt_node *cbw;          /* a reference */
    struct export_write_notifier wn;
    bool attached;                 /* the notifier is on the export */
    bool listed;                   /* in ctl->backups */
};

static const char *arg_str(struct json_object *args, const char *name)
{
    struct json_object *v;
    return json_object_object_get_ex(args, name, &v) ? json_object_get_string(v) : NULL;
}

static bool arg_has(struct json_object *args, const char *name)
{
    return json_object_object_get_ex(args, name, NULL);
}

static int backup_before_co(struct export_write_notifier *n, struct coro *co,
                            const struct export_write_req *req)
{
    struct ctl_backup *bk = n->opaque;
    return cbw_before_write_co(bk->cbw, co, req->offset, req->length);
}

static void backup_free(struct ctl_backup *bk)
{
    if (!bk)
        return;
    if (bk->cbw)
        cbw_unref(bk->cbw);
    free(bk->job_id);
    free(bk->filter);
    free(bk);
}

struct fmt_node *ctl_backup_filter(struct control *ctl, const char *name)
{
    for (struct ctl_backup *bk = ctl->backups; bk; bk = bk->next)
        if (bk->filter && !strcmp(bk->filter, name))
            return bk->cbw;
    return NULL;
}

static bool name_taken(struct ctl_cmd_ctx *cx, const char *name)
{
    return server_find_node(cx->ctl->srv, name, NULL) ||
           ctl_backup_filter(cx->ctl, name);
}

struct ctl_backup *ctl_backup_prepare(struct ctl_cmd_ctx *cx,
                                      struct json_object *args,
                                      struct error **errp)
{
    const char *sync = arg_str(args, "sync");
    if (strcmp(sync, "none")) {
        if (strcmp(sync, "full") && strcmp(sync, "top") &&
            strcmp(sync, "incremental") && strcmp(sync, "bitmap"))
            error_setf(errp, EINVAL, "Parameter 'sync' does not accept value '%s'",
                       sync);
        else
            error_setf(errp, ENOTSUP, "Parameter 'sync': strata takes pull-mode "
                       "backups only, 'none' (with a snapshot-access node over "
                       "filter-node-name, exported for the backup tool to read)");
        return NULL;
    }
    static const char *const unsupported[] = {"bitmap", "bitmap-mode", "compress",
                                              "x-perf", "discard-source"};
    for (size_t i = 0; i < sizeof(unsupported) / sizeof(unsupported[0]); i++) {
        if (arg_has(args, unsupported[i])) {
            error_setf(errp, ENOTSUP, "Parameter '%s' is not supported with "
                       "sync 'none'", unsupported[i]);
            return NULL;
        }
    }
    const char *dev = arg_str(args, "device");
    const char *jid = arg_str(args, "job-id");
    if (!jid)
        jid = dev;
    if (!qmp_id_wellformed(jid)) {
        error_setf(errp, EINVAL, "Invalid job ID '%s'", jid);
        return NULL;
    }
    if (job_find(cx->ctl->jobs, jid)) {
        error_setf(errp, EEXIST, "Job ID '%s' already in use", jid);
        return NULL;
    }
    for (struct ctl_backup *o = cx->ctl->backups; o; o = o->next) {
        if (!strcmp(o->job_id, jid)) {
            error_setf(errp, EEXIST, "Job ID '%s' already in use", jid);
            return NULL;
        }
    }
    const char *filter = arg_str(args, "filter-node-name");
    if (filter && !qmp_id_wellformed(filter)) {
        error_setf(errp, EINVAL, "Invalid node-name: '%s'", filter);
        return NULL;
    }
    if (filter && name_taken(cx, filter)) {
        error_setf(errp, EEXIST, "Duplicate nodes with node-name='%s'", filter);
        return NULL;
    }
    struct export *e = ctl_job_target(cx, dev, errp);
    if (!e)
        return NULL;
    if (!e->writable) {
        error_setf(errp, EINVAL, "Node '%s' is exported read-only as '%s': "
                   "nothing writes to it, copy-before-write has nothing to do; "
                   "back it up with a read-only export", e->bdev->node_name,
                   e->cfg.id);
        return NULL;
    }
    const char *tname = arg_str(args, "target");
    struct blockdev *t = server_find_blockdev(cx->ctl->srv, tname);
    if (!t) {
        cx->err_class = "DeviceNotFound";
        error_setf(errp, ENOENT, "Cannot find device='%s' nor node-name='%s'",
                   tname, tname);
        return NULL;
    }
    if (t == e->bdev) {
        error_setf(errp, EINVAL, "the backup target must be another node than "
                   "the source");
        return NULL;
    }
    if (t->export || t->chain_busy || t->transient) {
        error_setf(errp, EBUSY, "Node '%s' is busy: %s", tname,
                   t->export ? "it is exported" :
                   t->transient ? "it is a view, not an image" :
                   "it is in use by another job");
        return NULL;
    }
    struct ctl_backup *bk = calloc(1, sizeof(*bk));
    if (!bk || !(bk->job_id = strdup(jid)) ||
        (filter && !(bk->filter = strdup(filter)))) {
        backup_free(bk);
        error_setf(errp, ENOMEM, "out of memory");
        return NULL;
    }
    struct error *err = NULL;
    bk->cbw = cbw_new(export_root(e), t->root, &err);
    if (!bk->cbw) {
        error_setf(errp, err->code, "Cannot back up '%s' into '%s': %s",
                   e->bdev->node_name, tname, err->msg);
        error_free(err);
        backup_free(bk);
        return NULL;
    }
    bk->ctl = cx->ctl;
    bk->e = e;
    bk->target = t;
    bk->wn = (struct export_write_notifier){.before_co = backup_before_co,
                                            .opaque = bk};
    return bk;
}

void ctl_backup_attach(struct ctl_backup *bk)
{
    export_add_write_notifier(bk->e, &bk->wn);
    bk->attached = true;
    bk->target->chain_busy = true;
    bk->next = bk->ctl->backups;
    bk->ctl->backups = bk;
    bk->listed = true;
}

static void backup_unlist(struct ctl_backup *bk)
{
    if (!bk->listed)
        return;
    for (struct ctl_backup **pp = &bk->ctl->backups; *pp; pp = &(*pp)->next) {
        if (*pp == bk) {
            *pp = bk->next;
            break;
        }
    }
    bk->listed = false;
}

void ctl_backup_unattach(struct ctl_backup *bk)
{
    export_remove_write_notifier(bk->e, &bk->wn);
    bk->attached = false;
    bk->target->chain_busy = false;
    backup_unlist(bk);
}

struct export *ctl_backup_export(struct ctl_backup *bk)
{
    return bk->e;
}

bool ctl_backup_same(const struct ctl_backup *a, const struct ctl_backup *b)
{
    return !strcmp(a->job_id, b->job_id) || a->target == b->target ||
           (a->filter && b->filter && !strcmp(a->filter, b->filter));
}

void ctl_backup_discard(struct ctl_backup *bk)
{
    backup_free(bk);
}

/* ---- the job: lasts until cancelled ---- */

static int backup_run_co(struct job *job, struct coro *co, struct error **errp)
{
    struct ctl_backup *bk = job->opaque;
    job_progress_set_total(job, bk->cbw->size);
    uint64_t reported = 0;
    while (!job_is_cancelled(job)) {
        uint64_t c = cbw_copied_bytes(bk->cbw);
        if (c > reported) {
            job_progress_update(job, c - reported);
            reported = c;
        }
        job_sleep_co(job, co, 100000000ull);
    }
    return -ECANCELED;
}

static void backup_clean_co(struct job *job, struct coro *co)
{
    struct ctl_backup *bk = job->opaque;
    if (bk->attached) {
        export_quiesce_co(bk->e, co);
        export_remove_write_notifier(bk->e, &bk->wn);
        export_resume(bk->e);
        bk->attached = false;
    }
    backup_unlist(bk);
    cbw_detach_co(bk->cbw, co);
    bk->target->chain_busy = false;
    log_info("backup job '%s' of node '%s' ended (%llu bytes copied before "
             "writes)", bk->job_id, bk->e->bdev->node_name,
             (unsigned long long)cbw_copied_bytes(bk->cbw));
}

static void backup_job_free(struct job *job)
{
    backup_free(job->opaque);
}

static const struct job_driver backup_driver = {
    .type = "backup",
    .run_co = backup_run_co,
    .clean_co = backup_clean_co,
    .free = backup_job_free,
};

int ctl_backup_start(struct ctl_backup *bk, struct json_object *args,
                     struct error **errp)
{
    struct json_object *v;
    struct job_create_opts o = {
        .on_error = JOB_ON_ERROR_REPORT,
        .manual_finalize = json_object_object_get_ex(args, "auto-finalize", &v) &&
                           !json_object_get_boolean(v),
        .manual_dismiss = json_object_object_get_ex(args, "auto-dismiss", &v) &&
                          !json_object_get_boolean(v),
    };
    struct job *job = job_create(bk->ctl->jobs, &backup_driver, bk->job_id,
                                 bk->e->cfg.id, bk, &o, errp);
    if (!job)
        return -EINVAL;
    log_info("backup job '%s': node '%s' frozen for pull-mode backup into "
             "'%s'%s%s", bk->job_id, bk->e->bdev->node_name,
             bk->target->node_name, bk->filter ? ", filter " : "",
             bk->filter ? bk->filter : "");
    job_start(job);
    return 0;
}

struct json_object *cmd_blockdev_backup(struct ctl_cmd_ctx *cx,
                                        struct json_object *args,
                                        struct error **errp)
{
    struct ctl_backup *bk = ctl_backup_prepare(cx, args, errp);
    if (!bk)
        return NULL;
    export_quiesce_co(bk->e, cx->co);
    ctl_backup_attach(bk);
    export_resume(bk->e);
    if (ctl_backup_start(bk, args, errp) < 0) {
        export_quiesce_co(bk->e, cx->co);
        ctl_backup_unattach(bk);
        export_resume(bk->e);
        cbw_detach_co(bk->cbw, cx->co);
        backup_free(bk);
        return NULL;
    }
    return json_object_new_object();
}

struct fmt_node *ctl_snapshot_access_open(struct ctl_cmd_ctx *cx,
                                          struct json_object *file,
                                          const char *node_name,
                                          struct error **errp)
{
    if (!json_object_is_type(file, json_type_string)) {
        error_setf(errp, EINVAL, "Parameter 'file': snapshot-access takes the "
                   "node-name of a copy-before-write filter (blockdev-backup's "
                   "filter-node-name)");
        return NULL;
    }
    const char *ref = json_object_get_string(file);
    struct fmt_node *cbw = ctl_backup_filter(cx->ctl, ref);
    if (!cbw) {
        if (server_find_node(cx->ctl->srv, ref, NULL))
            error_setf(errp, EINVAL, "Node '%s' is not a copy-before-write "
                       "filter: snapshot-access reads the view of a running "
                       "backup (blockdev-backup sync=none filter-node-name)", ref);
        else
            error_setf(errp, ENOENT, "Cannot find device='%s' nor node-name='%s'",
                       ref, ref);
        return NULL;
    }
    if (name_taken(cx, node_name)) {
        error_setf(errp, EEXIST, "Duplicate nodes with node-name='%s'", node_name);
        return NULL;
    }
    return snapshot_access_new(cbw, ref, errp);
}
