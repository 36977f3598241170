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

struct json_object *cmd_block_dirty_bitmap_add(struct ctl_cmd_ctx *cx,
                                               struct json_object *args,
                                               struct error **errp)
{
    const char *node = arg_s(args, "node");
    const char *name = arg_s(args, "name");
    if (!name[0]) {
        error_setf(errp, EINVAL, "Bitmap name cannot be empty");
        return NULL;
    }
    struct fmt_node *n = server_find_node(cx->ctl->srv, node, NULL);
    if (!n) {
        error_setf(errp, ENOENT, "Cannot find device='%s' nor node-name='%s'",
                   node, node);
        return NULL;
    }
    uint64_t gran = fmt_bitmap_default_gran(n);
    struct json_object *g;
    if (json_object_object_get_ex(args, "granularity", &g)) {
        int64_t v = json_object_get_int64(g);
        if (v < 0 || v > UINT32_MAX) {
            error_setf(errp, EINVAL, "Parameter 'granularity' expects uint32_t");
            return NULL;
        }
        if ((uint64_t)v < FMT_BITMAP_MIN_GRAN || (v & (v - 1))) {
            error_setf(errp, EINVAL, "Granularity must be power of 2 and at least 512");
            return NULL;
        }
        gran = (uint64_t)v;
    }
    bool persistent = arg_b(args, "persistent", false);
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
            return NULL;
        }
    }
    if (!fmt_bitmap_add_co(n, cx->co, name, gran, persistent,
                           arg_b(args, "disabled", false), errp))
        return NULL;
    log_info("node '%s': dirty bitmap '%s' added (granularity %llu%s%s)", node,
             name, (unsigned long long)gran, persistent ? ", persistent" : "",
             arg_b(args, "disabled", false) ? ", disabled" : "");
    return json_object_new_object();
}

struct json_object *cmd_block_dirty_bitmap_remove(struct ctl_cmd_ctx *cx,
                                                  struct json_object *args,
                                                  struct error **errp)
{
    struct fmt_node *n;
    struct fmt_bitmap *bm = lookup(cx, arg_s(args, "node"), arg_s(args, "name"), &n, errp);
    if (!bm || fmt_bitmap_check(bm, FMT_BITMAP_CHECK_BUSY | FMT_BITMAP_CHECK_RO, errp) < 0 ||
        fmt_bitmap_remove_co(n, cx->co, bm, errp) < 0)
        return NULL;
    log_info("node '%s': dirty bitmap '%s' removed", arg_s(args, "node"),
             arg_s(args, "name"));
    return json_object_new_object();
}

struct json_object *cmd_block_dirty_bitmap_clear(struct ctl_cmd_ctx *cx,
                                                 struct json_object *args,
                                                 struct error **errp)
{
    struct fmt_bitmap *bm = lookup(cx, arg_s(args, "node"), arg_s(args, "name"), NULL, errp);
    if (!bm || fmt_bitmap_check(bm, FMT_BITMAP_CHECK_DEFAULT, errp) < 0)
        return NULL;
    dbitmap_clear_all(&bm->bits);
    return json_object_new_object();
}

static struct json_object *set_recording(struct ctl_cmd_ctx *cx, struct json_object *args,
                                         bool on, struct error **errp)
{
    struct fmt_bitmap *bm = lookup(cx, arg_s(args, "node"), arg_s(args, "name"), NULL, errp);
    if (!bm || fmt_bitmap_check(bm, FMT_BITMAP_CHECK_ALLOW_RO, errp) < 0)
        return NULL;
    bm->recording = on;
    return json_object_new_object();
}

struct json_object *cmd_block_dirty_bitmap_enable(struct ctl_cmd_ctx *cx,
                                                  struct json_object *args,
                                                  struct error **errp)
{
    return set_recording(cx, args, true, errp);
}

struct json_object *cmd_block_dirty_bitmap_disable(struct ctl_cmd_ctx *cx,
                                                   struct json_object *args,
                                                   struct error **errp)
{
    return set_recording(cx, args, false, errp);
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

struct json_object *cmd_block_dirty_bitmap_merge(struct ctl_cmd_ctx *cx,
                                                 struct json_object *args,
                                                 struct error **errp)
{
    struct fmt_node *tn;
    struct fmt_bitmap *dst = lookup(cx, arg_s(args, "node"), arg_s(args, "target"), &tn, errp);
    if (!dst || fmt_bitmap_check(dst, FMT_BITMAP_CHECK_DEFAULT, errp) < 0)
        return NULL;
    struct json_object *list;
    json_object_object_get_ex(args, "bitmaps", &list);
    /* All or nothing: merged into a copy, which replaces the target's
     * bits only when every source merged. */
    struct dbitmap acc;
    if (dbitmap_init(&acc, dst->bits.size, dst->bits.gran) < 0) {
        error_setf(errp, ENOMEM, "out of memory");
        return NULL;
    }
    dbitmap_copy(&acc, &dst->bits);
    for (size_t i = 0; i < json_object_array_length(list); i++) {
        struct fmt_bitmap *src = merge_source(cx, tn, json_object_array_get_idx(list, i), errp);
        if (!src || fmt_bitmap_check(src, FMT_BITMAP_CHECK_ALLOW_RO, errp) < 0)
            goto fail;
        if (src->bits.size != acc.size) {
            error_setf(errp, EINVAL, "Bitmaps are of different sizes (destination "
                       "size is %llu, source size is %llu) and can't be merged",
                       (unsigned long long)acc.size, (unsigned long long)src->bits.size);
            goto fail;
        }
        dbitmap_merge(&acc, &src->bits);
    }
    dbitmap_copy(&dst->bits, &acc);
    dbitmap_destroy(&acc);
    return json_object_new_object();
fail:
    dbitmap_destroy(&acc);
    return NULL;
}
