/* strata — the QMP transaction command: several actions at one instant,
 * all or nothing (qapi/transaction.json).
 *
 * Actions: blockdev-snapshot-sync, blockdev-backup (sync 'none': the
 * start of a pull-mode backup, backup-cmds.c) and block-dirty-bitmap-add,
 * -remove, -clear, -enable, -disable, -merge, with the arguments and
 * checks of the commands of those names.  They run in order, each seeing what the
 * ones before it did (after a snapshot of NODE, "NODE" is the new overlay
 * and "NODE.backing" the old top, as query-named-block-nodes shows).
 *
 * How all or nothing holds:
 *   1. every action's arguments are checked against its command's table;
 *   2. the snapshots are prepared (overlay created, opened and recorded
 *      in the state file) while the guests keep running; a failure undoes
 *      the prepared ones;
 *   3. every export whose chain an action touches is quiesced; in order,
 *      each snapshot switches its export's top and each bitmap action is
 *      done, keeping what undoes it; a failing action undoes the ones
 *      before it in reverse order (a switched snapshot is switched back:
 *      nothing was written to its overlay) and the prepared snapshots are
 *      aborted;
 *   4. else the actions are committed (removals deleted for good, backup
 *      jobs started), the exports resume (the guests see every change at
 *      once), and each snapshot makes its old top read-only.
 *
 * A backup's filter is made in step 1 and attached to its export in
 * step 3 (a write notifier: cannot fail), so the instant it freezes is
 * the instant of the bitmap actions beside it.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "chain.h"
#include "control-int.h"
#include "jobs.h"
#include "log.h"
#include "state.h"

#define TX_MAX_ACTIONS 64

struct tx_action {
    const char *type;
    struct json_object *data;
    bool snapshot;
    struct snapshot_args sa;          /* snapshot */
    struct export *e;                 /* snapshot */
    struct snapshot_prep prep;        /* snapshot, once prepared */
    bool prepared;
    struct ctl_bitmap_undo undo;      /* bitmap action, once done */
    struct ctl_backup *backup;        /* blockdev-backup, once prepared */
    bool attached;                    /* backup attached in step 3 */
};

/* Adds e to the set of exports to quiesce (room for every export of the
 * server). */
static void add_export(struct export **set, size_t *n, struct export *e)
{
    if (!e || e->deleted)
        return;
    for (size_t i = 0; i < *n; i++)
        if (set[i] == e)
            return;
    set[(*n)++] = e;
}

/* The export serving the chain that holds the node a bitmap action names
 * (and, for merges, those of its {"node", ...} sources). */
static void bitmap_exports(struct ctl_cmd_ctx *cx, struct json_object *data,
                           struct export **set, size_t *n)
{
    struct json_object *v;
    struct blockdev *b = NULL;
    if (json_object_object_get_ex(data, "node", &v) &&
        server_find_node(cx->ctl->srv, json_object_get_string(v), &b))
        add_export(set, n, b->export);
    if (json_object_object_get_ex(data, "bitmaps", &v) &&
        json_object_is_type(v, json_type_array)) {
        for (size_t i = 0; i < json_object_array_length(v); i++) {
            struct json_object *x = json_object_array_get_idx(v, i), *nd;
            b = NULL;
            if (json_object_is_type(x, json_type_object) &&
                json_object_object_get_ex(x, "node", &nd) &&
                server_find_node(cx->ctl->srv, json_object_get_string(nd), &b))
                add_export(set, n, b->export);
        }
    }
}

struct json_object *cmd_transaction(struct ctl_cmd_ctx *cx, struct json_object *args,
                                    struct error **errp)
{
    struct json_object *list, *props;
    json_object_object_get_ex(args, "actions", &list);
    if (json_object_object_get_ex(args, "properties", &props)) {
        static const struct ctl_arg pspec[] = {{"completion-mode", CTL_ARG_STR, false},
                                               {NULL, 0, false}};
        struct json_object *cm;
        if (ctl_args_check(props, pspec, "properties.", errp) < 0)
            return NULL;
        if (json_object_object_get_ex(props, "completion-mode", &cm) &&
            strcmp(json_object_get_string(cm), "individual")) {
            error_setf(errp, ENOTSUP, "Parameter 'completion-mode' does not accept "
                       "value '%s' (only 'individual': the backup jobs a "
                       "transaction starts never complete together, they run "
                       "until cancelled)", json_object_get_string(cm));
            return NULL;
        }
    }
    size_t n = json_object_array_length(list);
    if (n > TX_MAX_ACTIONS) {
        error_setf(errp, EINVAL, "a transaction has at most %d actions", TX_MAX_ACTIONS);
        return NULL;
    }
    struct tx_action *acts = calloc(n ? n : 1, sizeof(*acts));
    struct export **exps = calloc(cx->ctl->srv->n_exports + 1, sizeof(*exps));
    size_t nexps = 0;
    struct json_object *ret = NULL;
    size_t done = 0;
    bool quiesced = false;
    if (!acts || !exps) {
        error_setf(errp, ENOMEM, "out of memory");
        goto out;
    }

    /* 1. arguments */
    static const struct ctl_arg aspec[] = {{"type", CTL_ARG_STR, true},
                                           {"data", CTL_ARG_OBJ, true},
                                           {NULL, 0, false}};
    for (size_t i = 0; i < n; i++) {
        struct json_object *a = json_object_array_get_idx(list, i), *t;
        if (!json_object_is_type(a, json_type_object)) {
            error_setf(errp, EINVAL, "Invalid parameter type for 'actions[%zu]', "
                       "expected: object", i);
            goto out;
        }
        if (ctl_args_check(a, aspec, "actions[].", errp) < 0)
            goto out;
        json_object_object_get_ex(a, "type", &t);
        json_object_object_get_ex(a, "data", &acts[i].data);
        acts[i].type = json_object_get_string(t);
        acts[i].snapshot = !strcmp(acts[i].type, "blockdev-snapshot-sync");
        bool is_backup = !strcmp(acts[i].type, "blockdev-backup");
        if (!acts[i].snapshot && !is_backup &&
            !ctl_bitmap_action_known(acts[i].type)) {
            error_setf(errp, EINVAL, "Parameter 'type' does not accept value '%s' "
                       "(strata's transactions take blockdev-snapshot-sync, "
                       "blockdev-backup and block-dirty-bitmap-add, -remove, "
                       "-clear, -enable, -disable and -merge)", acts[i].type);
            goto out;
        }
        const struct ctl_cmd *c = ctl_cmd_find(acts[i].type);
        if (ctl_args_check(acts[i].data, c->args, "", errp) < 0)
            goto out;
        if (acts[i].snapshot) {
            acts[i].e = ctl_snapshot_args(cx, acts[i].data, &acts[i].sa, errp);
            if (!acts[i].e)
                goto out;
            for (size_t j = 0; j < i; j++) {
                if (acts[j].snapshot && acts[j].e == acts[i].e) {
                    error_setf(errp, EINVAL, "two snapshots of export '%s' in one "
                               "transaction", acts[i].e->cfg.id);
                    goto out;
                }
            }
            add_export(exps, &nexps, acts[i].e);
        } else if (is_backup) {
            acts[i].backup = ctl_backup_prepare(cx, acts[i].data, errp);
            if (!acts[i].backup)
                goto out;
            acts[i].e = ctl_backup_export(acts[i].backup);
            for (size_t j = 0; j < i; j++) {
                if ((acts[j].backup || acts[j].snapshot) && acts[j].e == acts[i].e) {
                    error_setf(errp, EINVAL, "export '%s' is the device of two "
                               "actions that change it in one transaction",
                               acts[i].e->cfg.id);
                    goto out;
                }
                if (acts[j].backup &&
                    ctl_backup_same(acts[j].backup, acts[i].backup)) {
                    error_setf(errp, EINVAL, "two backups in one transaction "
                               "share a job id, a target or a filter name");
                    goto out;
                }
            }
            add_export(exps, &nexps, acts[i].e);
        } else {
            bitmap_exports(cx, acts[i].data, exps, &nexps);
        }
    }

    /* 2. the snapshots, prepared while the guests run */
    for (size_t i = 0; i < n; i++) {
        if (!acts[i].snapshot)
            continue;
        if (snapshot_prepare_co(cx->ctl->srv, acts[i].e, &acts[i].sa, cx->co,
                                &acts[i].prep, errp) < 0)
            goto out;
        acts[i].prepared = true;
    }

    /* 3. one instant: every export touched is quiesced */
    for (size_t i = 0; i < nexps; i++)
        export_quiesce_co(exps[i], cx->co);
    quiesced = true;
    for (done = 0; done < n; done++) {
        struct tx_action *a = &acts[done];
        if (a->snapshot) {
            snapshot_switch(&a->prep);
        } else if (a->backup) {
            ctl_backup_attach(a->backup);
            a->attached = true;
        } else if (ctl_bitmap_action_co(cx, a->type, a->data, &a->undo, errp) < 0) {
            break;
        }
    }
    if (done < n) {
        /* undo, newest first */
        while (done-- > 0) {
            struct tx_action *a = &acts[done];
            if (a->snapshot) {
                snapshot_unswitch(&a->prep);
            } else if (a->backup) {
                ctl_backup_unattach(a->backup);
                a->attached = false;
            } else {
                ctl_bitmap_undo_co(cx, &a->undo);
            }
        }
        goto out;
    }

    /* 4. commit */
    for (size_t i = 0; i < n; i++) {
        if (acts[i].backup) {
            struct error *err = NULL;
            if (ctl_backup_start(acts[i].backup, acts[i].data, &err) < 0) {
                /* only when the server is stopping: the backup is dropped */
                log_error("transaction: backup job not started: %s", err->msg);
                error_free(err);
                ctl_backup_unattach(acts[i].backup);
                ctl_backup_discard(acts[i].backup);
            }
            acts[i].backup = NULL;
        } else if (!acts[i].snapshot) {
            ctl_bitmap_commit_co(cx, &acts[i].undo);
        }
    }
    for (size_t i = 0; i < nexps; i++)
        export_resume(exps[i]);
    quiesced = false;
    for (size_t i = 0; i < n; i++) {
        if (acts[i].snapshot) {
            struct snapshot_result res = {0};
            snapshot_finish_co(&acts[i].prep, cx->co, &res);
            acts[i].prepared = false;
        }
    }
    log_info("transaction of %zu action(s) done", n);
    ret = json_object_new_object();
    int r = server_sync_co(cx->ctl->srv, cx->co);
    if (r < 0) {
        json_object_put(ret);
        ret = NULL;
        error_setf(errp, -r, "done, but the state file could not be saved: %s "
                   "(the change may not survive a restart)", strerror(-r));
    }

out:
    if (quiesced)
        for (size_t i = 0; i < nexps; i++)
            export_resume(exps[i]);
    for (size_t i = 0; acts && i < n; i++) {
        if (acts[i].prepared)
            snapshot_abort_co(&acts[i].prep, cx->co);
        if (acts[i].backup)
            ctl_backup_discard(acts[i].backup);
    }
    free(acts);
    free(exps);
    return ret;
}
