/* strata — the dirty-bitmap QMP commands: block-dirty-bitmap-add,
 * -remove, -clear, -enable, -disable and -merge, with qemu-storage-
 * daemon's arguments and error messages (qapi/block-core.json,
 * block/monitor/bitmap-qmp-cmds.c), and the BlockDirtyInfo lists that
 * query-block and query-named-block-nodes show.
 *
 * A bitmap lives on one node of a chain (formats/bitmap.h): the block
 * node's own name is the top of its chain, "NODE.backing" the layer below
 * and so on, as query-named-block-nodes lists them.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "control-int.h"
#include "log.h"
#include "server.h"

struct json_object *ctl_dirty_bitmaps_json(struct fmt_node *n)
{
    if (!n->bitmaps)
        return NULL;
    struct json_object *r = json_object_new_array();
    for (struct fmt_bitmap *bm = n->bitmaps; bm; bm = bm->next) {
        struct json_object *o = json_object_new_object();
        json_object_object_add(o, "name", json_object_new_string(bm->name));
        json_object_object_add(o, "recording", json_object_new_boolean(bm->recording));
        json_object_object_add(o, "persistent", json_object_new_boolean(bm->persistent));
        json_object_object_add(o, "busy", json_object_new_boolean(bm->busy > 0));
        json_object_object_add(o, "granularity", json_object_new_int64((int64_t)bm->bits.gran));
        json_object_object_add(o, "count",
                               json_object_new_int64((int64_t)dbitmap_count_bytes(&bm->bits)));
        if (bm->inconsistent)
            json_object_object_add(o, "inconsistent", json_object_new_boolean(true));
        json_object_array_add(r, o);
    }
    return r;
}

static const char *arg_s(struct json_object *args, const char *name)
{
    struct json_object *v;
    return json_object_object_get_ex(args, name, &v) ? json_object_get_string(v) : NULL;
}

static bool arg_b(struct json_object *args, const char *name, bool dflt)
{
    struct json_object *v;
    return json_object_object_get_ex(args, name, &v) ? json_object_get_boolean(v) : dflt;
}

/* QEMU's block_dirty_bitmap_lookup(). */
static struct fmt_bitmap *lookup(struct ctl_cmd_ctx *cx, const char *node,
                                 const char *name, struct fmt_node **np,
                                 struct error **errp)
{
    struct fmt_node *n = server_find_node(cx->ctl->srv, node, NULL);
    if (!n) {
        error_setf(errp, ENOENT, "Node '%s' not found", node);
        return NULL;
    }
    struct fmt_bitmap *bm = fmt_bitmap_find(n, name);
    if (!bm) {
        error_setf(errp, ENOENT, "Dirty bitmap '%s' not found", name);
        return NULL;
    }
    if (np)
        *np = n;
    return bm;
}

/* ---- the actions, each with what undoes it (transaction.c) ---- */

static int do_add_co(struct ctl_cmd_ctx *cx, struct json_object *args,
                     struct ctl_bitmap_undo *u, struct error **errp)
{
    const char *node = arg_s(args, "node");
    const char *name = arg_s(args, "name");
    if (!name[0])
        return error_setf(errp, EINVAL, "Bitmap name cannot be empty");
    struct fmt_node *n = server_find_node(cx->ctl->srv, node, NULL);
    if (!n)
        return error_setf(errp, ENOENT, "Cannot find device='%s' nor node-name='%s'",
                          node, node);
    uint64_t gran = fmt_bitmap_default_gran(n);
    struct json_object *g;
    if (json_object_object_get_ex(args, "granularity", &g)) {
        int64_t v = json_object_get_int64(g);
        if (v < 0 || v > UINT32_MAX)
            return error_setf(errp, EINVAL, "Parameter 'granularity' expects uint32_t");
        if ((uint64_t)v < FMT_BITMAP_MIN_GRAN || (v & (v - 1)))
            return error_setf(errp, EINVAL, "Granularity must be power of 2 and at "
                              "least 512");
        gran = (uint64_t)v;
    }
    bool persistent = arg_b(args, "persistent", false);
    bool disabled = arg_b(args, "disabled", false);
    if (persistent) {
        struct error *err = NULL;
        int r = fmt_bitmap_can_store(n, name, gran, &err);
        if (r < 0) {
            if (r == -ENOTSUP || r == -EROFS)
                error_setf(errp, -r, "Can't store persistent bitmaps to %s: %s",
                           node, err->msg);
            else
                error_setf(errp, -r, "Can't make bitmap '%s' persistent in '%s': %s",
                           name, node, err->msg);
            error_free(err);
            return r;
        }
    }
    struct fmt_bitmap *bm = fmt_bitmap_add_co(n, cx->co, name, gran, persistent,
                                              disabled, errp);
    if (!bm)
        return -EINVAL;
    log_info("node '%s': dirty bitmap '%s' added (granularity %llu%s%s)", node,
             name, (unsigned long long)gran, persistent ? ", persistent" : "",
             disabled ? ", disabled" : "");
    *u = (struct ctl_bitmap_undo){.kind = CTL_BITMAP_ADDED, .n = n, .bm = bm};
    return 0;
}

static int do_remove_co(struct ctl_cmd_ctx *cx, struct json_object *args,
                        struct ctl_bitmap_undo *u, struct error **errp)
{
    struct fmt_node *n;
    struct fmt_bitmap *bm = lookup(cx, arg_s(args, "node"), arg_s(args, "name"), &n, errp);
    if (!bm || fmt_bitmap_check(bm, FMT_BITMAP_CHECK_BUSY | FMT_BITMAP_CHECK_RO, errp) < 0)
        return -EINVAL;
    *u = (struct ctl_bitmap_undo){.kind = CTL_BITMAP_REMOVED, .n = n, .bm = bm};
    fmt_bitmap_detach(n, bm, &u->prev);
    return 0;
}

/* Saves bm's bits into u (clear, merge). */
static int save_bits(struct fmt_node *n, struct fmt_bitmap *bm,
                     struct ctl_bitmap_undo *u, struct error **errp)
{
    *u = (struct ctl_bitmap_undo){.kind = CTL_BITMAP_BITS, .n = n, .bm = bm};
    if (dbitmap_init(&u->saved, bm->bits.size, bm->bits.gran) < 0) {
        u->kind = CTL_BITMAP_NONE;
        return error_setf(errp, ENOMEM, "out of memory");
    }
    dbitmap_copy(&u->saved, &bm->bits);
    return 0;
}

static int do_clear_co(struct ctl_cmd_ctx *cx, struct json_object *args,
                       struct ctl_bitmap_undo *u, struct error **errp)
{
    struct fmt_node *n;
    struct fmt_bitmap *bm = lookup(cx, arg_s(args, "node"), arg_s(args, "name"), &n, errp);
    if (!bm || fmt_bitmap_check(bm, FMT_BITMAP_CHECK_DEFAULT, errp) < 0 ||
        save_bits(n, bm, u, errp) < 0)
        return -EINVAL;
    dbitmap_clear_all(&bm->bits);
    return 0;
}

static int set_recording(struct ctl_cmd_ctx *cx, struct json_object *args, bool on,
                         struct ctl_bitmap_undo *u, struct error **errp)
{
    struct fmt_node *n;
    struct fmt_bitmap *bm = lookup(cx, arg_s(args, "node"), arg_s(args, "name"), &n, errp);
    if (!bm || fmt_bitmap_check(bm, FMT_BITMAP_CHECK_ALLOW_RO, errp) < 0)
        return -EINVAL;
    *u = (struct ctl_bitmap_undo){.kind = CTL_BITMAP_RECORDING, .n = n, .bm = bm,
                                  .recording = bm->recording};
    bm->recording = on;
    return 0;
}

static int do_enable_co(struct ctl_cmd_ctx *cx, struct json_object *args,
                        struct ctl_bitmap_undo *u, struct error **errp)
{
    return set_recording(cx, args, true, u, errp);
}

static int do_disable_co(struct ctl_cmd_ctx *cx, struct json_object *args,
                         struct ctl_bitmap_undo *u, struct error **errp)
{
    return set_recording(cx, args, false, u, errp);
}

/* The sources of a merge: names of bitmaps on the target's node, or
 * {"node", "name"} anywhere (BlockDirtyBitmapOrStr). */
static struct fmt_bitmap *merge_source(struct ctl_cmd_ctx *cx, struct fmt_node *tn,
                                       struct json_object *v, struct error **errp)
{
    if (json_object_is_type(v, json_type_string)) {
        const char *name = json_object_get_string(v);
        struct fmt_bitmap *bm = fmt_bitmap_find(tn, name);
        if (!bm)
            error_setf(errp, ENOENT, "Dirty bitmap '%s' not found", name);
        return bm;
    }
    static const struct ctl_arg spec[] = {
        {"node", CTL_ARG_STR, true}, {"name", CTL_ARG_STR, true}, {NULL, 0, false}};
    if (!json_object_is_type(v, json_type_object)) {
        error_setf(errp, EINVAL, "Invalid parameter type for 'bitmaps[]', "
                   "expected: string or object");
        return NULL;
    }
    if (ctl_args_check(v, spec, "bitmaps[].", errp) < 0)
        return NULL;
    return lookup(cx, arg_s(v, "node"), arg_s(v, "name"), NULL, errp);
}

static int do_merge_co(struct ctl_cmd_ctx *cx, struct json_object *args,
                       struct ctl_bitmap_undo *u, struct error **errp)
{
    struct fmt_node *tn;
    struct fmt_bitmap *dst = lookup(cx, arg_s(args, "node"), arg_s(args, "target"), &tn, errp);
    if (!dst || fmt_bitmap_check(dst, FMT_BITMAP_CHECK_DEFAULT, errp) < 0)
        return -EINVAL;
    struct json_object *list;
    json_object_object_get_ex(args, "bitmaps", &list);
    /* All or nothing: every source is checked before the target changes. */
    size_t cnt = json_object_array_length(list);
    for (size_t i = 0; i < cnt; i++) {
        struct fmt_bitmap *src = merge_source(cx, tn, json_object_array_get_idx(list, i), errp);
        if (!src || fmt_bitmap_check(src, FMT_BITMAP_CHECK_ALLOW_RO, errp) < 0)
            return -EINVAL;
        if (src->bits.size != dst->bits.size)
            return error_setf(errp, EINVAL, "Bitmaps are of different sizes "
                              "(destination size is %llu, source size is %llu) "
                              "and can't be merged",
                              (unsigned long long)dst->bits.size,
                              (unsigned long long)src->bits.size);
    }
    if (save_bits(tn, dst, u, errp) < 0)
        return -ENOMEM;
    for (size_t i = 0; i < cnt; i++)
        dbitmap_merge(&dst->bits, &merge_source(cx, tn, json_object_array_get_idx(list, i),
                                                NULL)->bits);
    return 0;
}

static const struct {
    const char *type;
    int (*fn)(struct ctl_cmd_ctx *cx, struct json_object *args,
              struct ctl_bitmap_undo *u, struct error **errp);
} actions[] = {
    {"block-dirty-bitmap-add", do_add_co},
    {"block-dirty-bitmap-remove", do_remove_co},
    {"block-dirty-bitmap-clear", do_clear_co},
    {"block-dirty-bitmap-enable", do_enable_co},
    {"block-dirty-bitmap-disable", do_disable_co},
    {"block-dirty-bitmap-merge", do_merge_co},
};

bool ctl_bitmap_action_known(const char *type)
{
    for (size_t i = 0; i < sizeof(actions) / sizeof(actions[0]); i++)
        if (!strcmp(actions[i].type, type))
            return true;
    return false;
}

int ctl_bitmap_action_co(struct ctl_cmd_ctx *cx, const char *type,
                         struct json_object *args, struct ctl_bitmap_undo *u,
                         struct error **errp)
{
    *u = (struct ctl_bitmap_undo){.kind = CTL_BITMAP_NONE};
    for (size_t i = 0; i < sizeof(actions) / sizeof(actions[0]); i++)
        if (!strcmp(actions[i].type, type))
            return actions[i].fn(cx, args, u, errp);
    return error_setf(errp, EINVAL, "unknown bitmap action '%s'", type);
}

void ctl_bitmap_undo_co(struct ctl_cmd_ctx *cx, struct ctl_bitmap_undo *u)
{
    struct error *err = NULL;
    switch (u->kind) {
    case CTL_BITMAP_NONE:
        break;
    case CTL_BITMAP_ADDED:
        if (fmt_bitmap_remove_co(u->n, cx->co, u->bm, &err) < 0) {
            log_warn("undoing the addition of bitmap '%s': %s", u->bm->name, err->msg);
            error_free(err);
        }
        break;
    case CTL_BITMAP_REMOVED:
        fmt_bitmap_reattach(u->n, u->bm, u->prev);
        break;
    case CTL_BITMAP_BITS:
        dbitmap_copy(&u->bm->bits, &u->saved);
        dbitmap_destroy(&u->saved);
        break;
    case CTL_BITMAP_RECORDING:
        u->bm->recording = u->recording;
        break;
    }
    u->kind = CTL_BITMAP_NONE;
}

void ctl_bitmap_commit_co(struct ctl_cmd_ctx *cx, struct ctl_bitmap_undo *u)
{
    struct error *err = NULL;
    if (u->kind == CTL_BITMAP_REMOVED) {
        char *name = strdup(u->bm->name);
        if (fmt_bitmap_drop_co(u->n, cx->co, u->bm, &err) < 0) {
            log_warn("bitmap '%s' removed, but the image still lists it (in use): %s",
                     name ? name : "?", err->msg);
            error_free(err);
        } else {
            log_info("dirty bitmap '%s' removed", name ? name : "?");
        }
        free(name);
    } else if (u->kind == CTL_BITMAP_BITS) {
        dbitmap_destroy(&u->saved);
    }
    u->kind = CTL_BITMAP_NONE;
}

/* ---- the commands: one action, committed ---- */

static struct json_object *run_one(struct ctl_cmd_ctx *cx, const char *type,
                                   struct json_object *args, struct error **errp)
{
    struct ctl_bitmap_undo u;
    if (ctl_bitmap_action_co(cx, type, args, &u, errp) < 0)
        return NULL;
    if (u.kind == CTL_BITMAP_REMOVED && u.bm->stored) {
        /* a removal that cannot reach the image fails, and changes nothing */
        struct fmt_bitmap *bm = u.bm;
        if (u.n->ops->bitmaps_write_co(u.n, cx->co, false, errp) < 0) {
            ctl_bitmap_undo_co(cx, &u);
            return NULL;
        }
        bm->stored = false;
    }
    ctl_bitmap_commit_co(cx, &u);
    return json_object_new_object();
}

#define BITMAP_CMD(fname, type)                                               \
    struct json_object *fname(struct ctl_cmd_ctx *cx, struct json_object *args, \
                              struct error **errp)                            \
    {                                                                         \
        return run_one(cx, type, args, errp);                                 \
    }

BITMAP_CMD(cmd_block_dirty_bitmap_add, "block-dirty-bitmap-add")
BITMAP_CMD(cmd_block_dirty_bitmap_remove, "block-dirty-bitmap-remove")
BITMAP_CMD(cmd_block_dirty_bitmap_clear, "block-dirty-bitmap-clear")
BITMAP_CMD(cmd_block_dirty_bitmap_enable, "block-dirty-bitmap-enable")
BITMAP_CMD(cmd_block_dirty_bitmap_disable, "block-dirty-bitmap-disable")
BITMAP_CMD(cmd_block_dirty_bitmap_merge, "block-dirty-bitmap-merge")
