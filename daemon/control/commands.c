/* strata — the QMP commands of the control socket.
 *
 * Names and arguments follow qemu-storage-daemon's QAPI schema
 * (qapi/block-core.json, block-export.json, job.json) where it has the
 * command; strata-only debugging commands carry QEMU's "x-" prefix.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "chain.h"
#include "control-int.h"
#include "jobs.h"
#include "log.h"
#include "state.h"
#include "tls.h"
#include "util.h"

/* ---- argument checking ---- */

static const char *type_name(enum ctl_arg_type t)
{
    switch (t) {
    case CTL_ARG_STR: return "string";
    case CTL_ARG_BOOL: return "boolean";
    case CTL_ARG_INT: return "integer";
    case CTL_ARG_OBJ: return "object";
    case CTL_ARG_ARRAY: return "array";
    case CTL_ARG_ANY: return "any";
    }
    return "?";
}

static bool type_ok(struct json_object *v, enum ctl_arg_type t)
{
    switch (t) {
    case CTL_ARG_STR: return json_object_is_type(v, json_type_string);
    case CTL_ARG_BOOL: return json_object_is_type(v, json_type_boolean);
    case CTL_ARG_INT: return json_object_is_type(v, json_type_int);
    case CTL_ARG_OBJ: return json_object_is_type(v, json_type_object);
    case CTL_ARG_ARRAY: return json_object_is_type(v, json_type_array);
    case CTL_ARG_ANY: return true;
    }
    return false;
}

int ctl_args_check(struct json_object *args, const struct ctl_arg *spec,
                   const char *prefix, struct error **errp)
{
    if (args) {
        json_object_object_foreach(args, key, val) {
            const struct ctl_arg *a = spec;
            while (a && a->name && strcmp(a->name, key))
                a++;
            if (!a || !a->name)
                return error_setf(errp, EINVAL, "Parameter '%s%.64s' is unexpected",
                                  prefix, key);
            if (!type_ok(val, a->type))
                return error_setf(errp, EINVAL, "Invalid parameter type for '%s%s', "
                                  "expected: %s", prefix, a->name, type_name(a->type));
        }
    }
    for (const struct ctl_arg *a = spec; a && a->name; a++) {
        if (a->required && !(args && json_object_object_get_ex(args, a->name, NULL)))
            return error_setf(errp, EINVAL, "Parameter '%s%s' is missing", prefix,
                              a->name);
    }
    return 0;
}

static const char *arg_str(struct json_object *args, const char *name)
{
    struct json_object *v;
    return json_object_object_get_ex(args, name, &v) ? json_object_get_string(v) : NULL;
}

static bool arg_bool(struct json_object *args, const char *name, bool dflt)
{
    struct json_object *v;
    return json_object_object_get_ex(args, name, &v) ? json_object_get_boolean(v) : dflt;
}

static bool arg_has(struct json_object *args, const char *name)
{
    return json_object_object_get_ex(args, name, NULL);
}

static int64_t arg_int(struct json_object *args, const char *name, int64_t dflt)
{
    struct json_object *v;
    return json_object_object_get_ex(args, name, &v) ? json_object_get_int64(v) : dflt;
}

static struct json_object *ret_empty(void)
{
    return json_object_new_object();
}

/* ---- negotiation and introspection ---- */

static struct json_object *cmd_qmp_capabilities(struct ctl_cmd_ctx *cx,
                                                struct json_object *args,
                                                struct error **errp)
{
    struct json_object *en;
    if (json_object_object_get_ex(args, "enable", &en)) {
        for (size_t i = 0; i < json_object_array_length(en); i++) {
            struct json_object *c = json_object_array_get_idx(en, i);
            error_setf(errp, EINVAL, "Capability '%s' not available",
                       json_object_get_string(c));
            return NULL;
        }
    }
    cx->client->negotiated = true;
    return ret_empty();
}

static struct json_object *cmd_query_version(struct ctl_cmd_ctx *cx,
                                             struct json_object *args,
                                             struct error **errp)
{
    unsigned major = 0, minor = 0, micro = 0;
    sscanf(STRATA_VERSION, "%u.%u.%u", &major, &minor, &micro);
    struct json_object *q = json_object_new_object();
    json_object_object_add(q, "major", json_object_new_int((int)major));
    json_object_object_add(q, "minor", json_object_new_int((int)minor));
    json_object_object_add(q, "micro", json_object_new_int((int)micro));
    struct json_object *r = json_object_new_object();
    json_object_object_add(r, "qemu", q);
    json_object_object_add(r, "package", json_object_new_string("strata " STRATA_VERSION));
    return r;
}

static struct json_object *cmd_query_commands(struct ctl_cmd_ctx *cx,
                                              struct json_object *args,
                                              struct error **errp)
{
    size_t n;
    const struct ctl_cmd *t = ctl_cmd_table(&n);
    struct json_object *r = json_object_new_array();
    for (size_t i = 0; i < n; i++) {
        struct json_object *o = json_object_new_object();
        json_object_object_add(o, "name", json_object_new_string(t[i].name));
        json_object_array_add(r, o);
    }
    return r;
}

/* ---- nodes and exports ---- */

static struct json_object *image_info(struct fmt_node *n)
{
    struct json_object *o = json_object_new_object();
    json_object_object_add(o, "filename", json_object_new_string(n->filename ? n->filename : ""));
    json_object_object_add(o, "format", json_object_new_string(n->ops->name));
    json_object_object_add(o, "virtual-size", json_object_new_int64((int64_t)n->size));
    json_object_object_add(o, "dirty-flag", json_object_new_boolean(false));
    if (n->backing) {
        json_object_object_add(o, "backing-filename",
                               json_object_new_string(n->backing->filename ? n->backing->filename : ""));
        json_object_object_add(o, "backing-filename-format",
                               json_object_new_string(n->backing->ops->name));
        json_object_object_add(o, "backing-image", image_info(n->backing));
    }
    return o;
}

/* The name of a chain member: the node's own for the top, then
 * "NODE.backing", "NODE.backing.backing"... (strata names backing nodes
 * itself; they cannot be addressed by blockdev-add names yet). */
static char *member_name(const char *top, unsigned depth)
{
    size_t len = strlen(top) + depth * 8 + 1;
    char *s = malloc(len);
    if (!s)
        return NULL;
    strcpy(s, top);
    for (unsigned i = 0; i < depth; i++)
        strcat(s, ".backing");
    return s;
}

/* BlockDeviceInfo for one chain member. */
static struct json_object *node_info(const struct blockdev *b, struct fmt_node *n,
                                     unsigned depth, bool flat)
{
    unsigned below = 0;
    for (struct fmt_node *x = n->backing; x; x = x->backing)
        below++;
    char *name = member_name(b->node_name, depth);
    struct json_object *o = json_object_new_object();
    json_object_object_add(o, "node-name", json_object_new_string(name ? name : ""));
    json_object_object_add(o, "file", json_object_new_string(n->filename ? n->filename : ""));
    json_object_object_add(o, "drv", json_object_new_string(n->ops->name));
    json_object_object_add(o, "ro", json_object_new_boolean(n->read_only));
    json_object_object_add(o, "encrypted", json_object_new_boolean(false));
    json_object_object_add(o, "detect_zeroes", json_object_new_string("off"));
    json_object_object_add(o, "backing_file_depth", json_object_new_int((int)below));
    if (n->backing) {
        json_object_object_add(o, "backing_file",
                               json_object_new_string(n->backing->filename ? n->backing->filename : ""));
        char *bn = member_name(b->node_name, depth + 1);
        /* strata extension: the node name of the backing node */
        json_object_object_add(o, "backing-node-name", json_object_new_string(bn ? bn : ""));
        free(bn);
    }
    struct json_object *cache = json_object_new_object();
    json_object_object_add(cache, "writeback", json_object_new_boolean(true));
    json_object_object_add(cache, "direct", json_object_new_boolean(b->direct));
    json_object_object_add(cache, "no-flush", json_object_new_boolean(false));
    json_object_object_add(o, "cache", cache);
    json_object_object_add(o, "write_threshold", json_object_new_int(0));
    for (const char *k = "bps\0bps_rd\0bps_wr\0iops\0iops_rd\0iops_wr\0"; *k; k += strlen(k) + 1)
        json_object_object_add(o, k, json_object_new_int(0));
    struct json_object *img = flat ? NULL : image_info(n);
    if (flat) {
        img = json_object_new_object();
        json_object_object_add(img, "filename", json_object_new_string(n->filename ? n->filename : ""));
        json_object_object_add(img, "format", json_object_new_string(n->ops->name));
        json_object_object_add(img, "virtual-size", json_object_new_int64((int64_t)n->size));
        json_object_object_add(img, "dirty-flag", json_object_new_boolean(false));
        if (n->backing)
            json_object_object_add(img, "backing-filename",
                                   json_object_new_string(n->backing->filename ? n->backing->filename : ""));
    }
    json_object_object_add(o, "image", img);
    struct json_object *bms = ctl_dirty_bitmaps_json(n);
    if (bms)
        json_object_object_add(o, "dirty-bitmaps", bms);
    if (depth == 0 && b->export) /* strata extension */
        json_object_object_add(o, "export", json_object_new_string(b->export->cfg.id));
    free(name);
    return o;
}

static struct json_object *cmd_query_named_block_nodes(struct ctl_cmd_ctx *cx,
                                                       struct json_object *args,
                                                       struct error **errp)
{
    struct server *srv = cx->ctl->srv;
    bool flat = arg_bool(args, "flat", false);
    struct json_object *r = json_object_new_array();
    for (size_t i = 0; i < srv->n_bdevs; i++) {
        const struct blockdev *b = srv->bdevs[i];
        unsigned depth = 0;
        for (struct fmt_node *n = b->root; n; n = n->backing, depth++)
            json_object_array_add(r, node_info(b, n, depth, flat));
    }
    return r;
}

/* QEMU's query-block lists block backends; strata's are its exports: one
 * BlockInfo each, "device" being the export id and "inserted" the node it
 * serves (with its dirty bitmaps). */
static struct json_object *cmd_query_block(struct ctl_cmd_ctx *cx,
                                           struct json_object *args,
                                           struct error **errp)
{
    struct server *srv = cx->ctl->srv;
    struct json_object *r = json_object_new_array();
    for (size_t i = 0; i < srv->n_exports; i++) {
        const struct export *e = srv->exports[i];
        struct json_object *o = json_object_new_object();
        json_object_object_add(o, "device", json_object_new_string(e->cfg.id));
        json_object_object_add(o, "qdev", json_object_new_string(""));
        json_object_object_add(o, "type", json_object_new_string("unknown"));
        json_object_object_add(o, "removable", json_object_new_boolean(false));
        json_object_object_add(o, "locked", json_object_new_boolean(false));
        json_object_object_add(o, "inserted", node_info(e->bdev, e->bdev->root, 0, false));
        json_object_array_add(r, o);
    }
    return r;
}

/* The NBD URIs (RFC-style, as libnbd and qemu read them) of an export on
 * every listener: a strata extension, so that tools (strata backup start)
 * can print what to read. */
static struct json_object *export_uris(const struct server *srv, const char *name)
{
    char enc[3 * 4096 + 1];
    size_t k = 0;
    for (const unsigned char *p = (const unsigned char *)name; *p && k + 4 < sizeof(enc); p++) {
        if ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
            (*p >= '0' && *p <= '9') || strchr("-._~", *p))
            enc[k++] = (char)*p;
        else
            k += (size_t)snprintf(enc + k, sizeof(enc) - k, "%%%02X", *p);
    }
    enc[k] = 0;
    bool tls = srv->tls && tls_server_mode(srv->tls) == TLS_MODE_REQUIRE;
    struct json_object *a = json_object_new_array();
    for (size_t i = 0; i < srv->n_listeners; i++) {
        const struct listener *l = &srv->listeners[i];
        char *u = NULL;
        if (l->closed || !l->desc)
            continue;
        if (!strncmp(l->desc, "unix:", 5) && l->desc[5] != '@') {
            if (asprintf(&u, "nbd%s+unix:///%s?socket=%s", tls ? "s" : "", enc,
                         l->desc + 5) < 0)
                u = NULL;
        } else if (l->is_tcp) {
            if (asprintf(&u, "nbd%s://%s/%s", tls ? "s" : "", l->desc, enc) < 0)
                u = NULL;
        }
        if (u)
            json_object_array_add(a, json_object_new_string(u));
        free(u);
    }
    return a;
}

static struct json_object *cmd_query_block_exports(struct ctl_cmd_ctx *cx,
                                                   struct json_object *args,
                                                   struct error **errp)
{
    struct server *srv = cx->ctl->srv;
    struct json_object *r = json_object_new_array();
    for (size_t i = 0; i < srv->n_exports; i++) {
        const struct export *e = srv->exports[i];
        struct json_object *o = json_object_new_object();
        json_object_object_add(o, "id", json_object_new_string(e->cfg.id));
        json_object_object_add(o, "type", json_object_new_string("nbd"));
        json_object_object_add(o, "node-name", json_object_new_string(e->bdev->node_name));
        json_object_object_add(o, "shutting-down", json_object_new_boolean(srv->shutting_down));
        /* strata extensions */
        json_object_object_add(o, "name", json_object_new_string(e->cfg.name));
        if (e->cfg.description)
            json_object_object_add(o, "description", json_object_new_string(e->cfg.description));
        json_object_object_add(o, "writable", json_object_new_boolean(e->writable));
        json_object_object_add(o, "x-uris", export_uris(srv, e->cfg.name));
        json_object_object_add(o, "clients", json_object_new_int((int)e->n_conns));
        json_object_object_add(o, "virtual-size", json_object_new_int64((int64_t)export_root(e)->size));
        json_object_object_add(o, "file", json_object_new_string(e->bdev->filename));
        json_object_object_add(o, "format", json_object_new_string(e->bdev->driver));
        json_object_object_add(o, "quiesce-count", json_object_new_int64((int64_t)e->n_quiesces));
        json_object_object_add(o, "last-quiesce-stall-ns", json_object_new_int64((int64_t)e->last_stall_ns));
        json_object_object_add(o, "max-quiesce-stall-ns", json_object_new_int64((int64_t)e->max_stall_ns));
        /* the longest a request took during the last / any snapshot or
         * pivot: the stall as the guest sees it */
        json_object_object_add(o, "last-request-stall-ns", json_object_new_int64((int64_t)e->last_request_stall_ns));
        json_object_object_add(o, "max-request-stall-ns", json_object_new_int64((int64_t)e->max_request_stall_ns));
        json_object_array_add(r, o);
    }
    return r;
}

/* QEMU's query-blockstats, one BlockStats per export: "device" is the
 * export id, "node-name" its chain's node, "stats" its counters
 * (stats.h); "x-export-name", "x-clients" are strata's. */
static struct json_object *cmd_query_blockstats(struct ctl_cmd_ctx *cx,
                                                struct json_object *args,
                                                struct error **errp)
{
    struct server *srv = cx->ctl->srv;
    uint64_t now = loop_now_ns();
    struct json_object *r = json_object_new_array();
    for (size_t i = 0; i < srv->n_exports; i++) {
        const struct export *e = srv->exports[i];
        struct json_object *o = json_object_new_object();
        json_object_object_add(o, "device", json_object_new_string(e->cfg.id));
        json_object_object_add(o, "node-name", json_object_new_string(e->bdev->node_name));
        json_object_object_add(o, "x-export-name", json_object_new_string(e->cfg.name));
        json_object_object_add(o, "x-clients", json_object_new_int64(e->n_conns));
        json_object_object_add(o, "stats", stats_to_json(&e->stats, now));
        json_object_array_add(r, o);
    }
    return r;
}

/* After a change the user is told about only once it is durable. */
static struct json_object *synced(struct ctl_cmd_ctx *cx, struct json_object *ret,
                                  struct error **errp)
{
    int r = server_sync_co(cx->ctl->srv, cx->co);
    if (r < 0) {
        json_object_put(ret);
        error_setf(errp, -r, "done, but the state file could not be saved: %s "
                   "(the change may not survive a restart)", strerror(-r));
        return NULL;
    }
    return ret;
}

/* The options of a file node, flattened as QEMU's keyval syntax writes
 * them ("server.0.host"), for the backend drivers
 * (backend_spec_from_options).  Every leaf must be a string; an empty
 * object or array is one key with a NULL value. */
struct file_opts {
    struct backend_kv kv[64];
    char *keys[64];
    size_t n;
};

static void file_opts_clear(struct file_opts *fo)
{
    for (size_t i = 0; i < fo->n; i++)
        free(fo->keys[i]);
    fo->n = 0;
}

static int file_opts_add(struct file_opts *fo, const char *key,
                         struct json_object *v, const char *prefix,
                         struct error **errp)
{
    bool obj = json_object_is_type(v, json_type_object);
    bool arr = json_object_is_type(v, json_type_array);
    if ((obj && json_object_object_length(v) > 0) ||
        (arr && json_object_array_length(v) > 0)) {
        if (obj) {
            json_object_object_foreach(v, k, sub) {
                char *sk = NULL;
                if (asprintf(&sk, "%s.%s", key, k) < 0)
                    return error_setf(errp, ENOMEM, "out of memory");
                int r = file_opts_add(fo, sk, sub, prefix, errp);
                free(sk);
                if (r < 0)
                    return r;
            }
        } else {
            for (size_t i = 0; i < json_object_array_length(v); i++) {
                char *sk = NULL;
                if (asprintf(&sk, "%s.%zu", key, i) < 0)
                    return error_setf(errp, ENOMEM, "out of memory");
                int r = file_opts_add(fo, sk, json_object_array_get_idx(v, i),
                                      prefix, errp);
                free(sk);
                if (r < 0)
                    return r;
            }
        }
        return 0;
    }
    if (!obj && !arr && !json_object_is_type(v, json_type_string))
        return error_setf(errp, EINVAL, "Invalid parameter type for '%s%.64s', "
                          "expected: string", prefix, key);
    if (fo->n == ARRAY_SIZE(fo->kv))
        return error_setf(errp, EINVAL, "Parameter '%s': too many options",
                          prefix);
    fo->keys[fo->n] = strdup(key);
    if (!fo->keys[fo->n])
        return error_setf(errp, ENOMEM, "out of memory");
    fo->kv[fo->n].key = fo->keys[fo->n];
    fo->kv[fo->n].val = obj || arr ? NULL : json_object_get_string(v);
    fo->n++;
    return 0;
}

/* The backend spec of a file node: {"driver": "file", "filename": ...},
 * or the options of another backend driver. */
static char *spec_of_file_node(struct json_object *file, struct error **errp)
{
    struct file_opts fo = {.n = 0};
    const char *driver = NULL;
    char *spec = NULL;
    json_object_object_foreach(file, key, val) {
        if (!strcmp(key, "driver")) {
            if (!json_object_is_type(val, json_type_string)) {
                error_setf(errp, EINVAL, "Invalid parameter type for "
                           "'file.driver', expected: string");
                goto out;
            }
            driver = json_object_get_string(val);
        } else if (file_opts_add(&fo, key, val, "file.", errp) < 0) {
            goto out;
        }
    }
    spec = backend_spec_from_options(driver, fo.kv, fo.n, "file.", errp);
out:
    file_opts_clear(&fo);
    return spec;
}

static const struct ctl_arg cache_args[] = {
    {"direct", CTL_ARG_BOOL, false},
    {"no-flush", CTL_ARG_BOOL, false},
    {NULL, 0, false},
};

static struct json_object *cmd_blockdev_add(struct ctl_cmd_ctx *cx,
                                            struct json_object *args,
                                            struct error **errp)
{
    const char *driver = arg_str(args, "driver");
    struct json_object *file;
    json_object_object_get_ex(args, "file", &file);
    if (!strcmp(driver, "snapshot-access")) {
        json_object_object_foreach(args, key, val) {
            (void)val;
            if (strcmp(key, "driver") && strcmp(key, "node-name") &&
                strcmp(key, "file") && strcmp(key, "read-only")) {
                error_setf(errp, EINVAL, "Parameter '%.64s' is unexpected", key);
                return NULL;
            }
        }
        const char *nn = arg_str(args, "node-name");
        struct fmt_node *sa = ctl_snapshot_access_open(cx, file, nn, errp);
        if (!sa)
            return NULL;
        char desc[256];
        snprintf(desc, sizeof(desc), "snapshot-access:%s", json_object_get_string(file));
        if (!server_blockdev_add_node(cx->ctl->srv, nn, sa, desc, errp)) {
            fmt_close(sa);
            return NULL;
        }
        return ret_empty();
    }
    if (!strcmp(driver, "copy-before-write")) {
        error_setf(errp, ENOTSUP, "Parameter 'driver': strata inserts the "
                   "copy-before-write filter with blockdev-backup (sync 'none', "
                   "filter-node-name), as libvirt does on QEMU; a filter added "
                   "with blockdev-add would not see the writes of the node's "
                   "export");
        return NULL;
    }
    if (arg_has(args, "target")) {
        error_setf(errp, EINVAL, "Parameter 'target' is unexpected");
        return NULL;
    }
    if (!fmt_find_driver(driver)) {
        error_setf(errp, EINVAL, "Parameter 'driver' does not accept value '%s' "
                   "(strata supports %s nodes over a file)", driver,
                   fmt_driver_names());
        return NULL;
    }
    if (json_object_is_type(file, json_type_string)) {
        error_setf(errp, EINVAL, "Parameter 'file': references to other nodes are "
                   "not supported; give {\"driver\": \"file\", \"filename\": PATH}");
        return NULL;
    }
    if (!json_object_is_type(file, json_type_object)) {
        error_setf(errp, EINVAL, "Invalid parameter type for 'file', expected: object");
        return NULL;
    }
    char *spec = spec_of_file_node(file, errp);
    if (!spec)
        return NULL;
    bool direct = false;
    struct json_object *cache;
    if (json_object_object_get_ex(args, "cache", &cache)) {
        if (ctl_args_check(cache, cache_args, "cache.", errp) < 0) {
            free(spec);
            return NULL;
        }
        direct = arg_bool(cache, "direct", false);
        if (arg_bool(cache, "no-flush", false)) {
            error_setf(errp, EINVAL, "Parameter 'cache.no-flush' must be false: "
                       "strata never ignores flushes");
            free(spec);
            return NULL;
        }
    }
    if (arg_has(args, "backing") || arg_has(args, "discard") ||
        arg_has(args, "detect-zeroes") || arg_has(args, "auto-read-only")) {
        /* accepted by the schema below only to say this clearly */
        error_setf(errp, EINVAL, "Parameters 'backing', 'discard', 'detect-zeroes' and "
                   "'auto-read-only' are not supported by strata");
        free(spec);
        return NULL;
    }
    struct blockdev_config bc = {
        .node_name = arg_str(args, "node-name"),
        .driver = driver,
        .filename = spec,
        .read_only = arg_bool(args, "read-only", false),
        .direct = direct,
        .backing_root = arg_str(args, "backing-root"),
        .backing_remote = arg_str(args, "backing-remote"),
    };
    if (bc.backing_root && bc.backing_root[0] != '/') {
        error_setf(errp, EINVAL, "Parameter 'backing-root' must be an absolute "
                   "directory path");
        free(spec);
        return NULL;
    }
    bool added = server_blockdev_add_co(cx->ctl->srv, &bc, cx->co, errp);
    free(spec);
    if (!added)
        return NULL;
    return synced(cx, ret_empty(), errp);
}

static struct json_object *cmd_blockdev_del(struct ctl_cmd_ctx *cx,
                                            struct json_object *args,
                                            struct error **errp)
{
    const char *name = arg_str(args, "node-name");
    struct blockdev *b = server_find_blockdev(cx->ctl->srv, name);
    if (b && (b->chain_busy ||
              (b->export && job_find_by_device(cx->ctl->jobs, b->export->cfg.id)))) {
        error_setf(errp, EBUSY, "Node '%s' is busy: a job works on it", name);
        return NULL;
    }
    if (server_blockdev_del(cx->ctl->srv, name, cx->co, errp) < 0)
        return NULL;
    return synced(cx, ret_empty(), errp);
}

static struct json_object *cmd_block_export_add(struct ctl_cmd_ctx *cx,
                                                struct json_object *args,
                                                struct error **errp)
{
    const char *type = arg_str(args, "type");
    if (strcmp(type, "nbd")) {
        error_setf(errp, EINVAL, "Parameter 'type' does not accept value '%s' "
                   "(strata serves 'nbd')", type);
        return NULL;
    }
    if (arg_bool(args, "writethrough", false)) {
        error_setf(errp, EINVAL, "Parameter 'writethrough' must be false: clients "
                   "ask for durability with FUA and FLUSH");
        return NULL;
    }
    struct blockdev *tb = server_find_blockdev(cx->ctl->srv, arg_str(args, "node-name"));
    if (tb && tb->chain_busy) {
        error_setf(errp, EBUSY, "Node '%s' is busy: a job works on it (a backup "
                   "writes the old data of the guest's disk into it)", tb->node_name);
        return NULL;
    }
    /* "allow" (a strata extension): the TLS identities that may see and
     * open the export, as --export's allow= */
    struct json_object *av = NULL;
    struct tls_allow allow;
    json_object_object_get_ex(args, "allow", &av);
    if (state_allow_from_json(av, &allow, errp) < 0)
        return NULL;
    /* "bitmaps": names in the node's chain, or {"node", "name"} */
    struct export_config bl = {0};
    struct json_object *bv = NULL;
    json_object_object_get_ex(args, "bitmaps", &bv);
    for (size_t i = 0; bv && i < json_object_array_length(bv); i++) {
        struct json_object *x = json_object_array_get_idx(bv, i);
        static const struct ctl_arg ref_args[] = {{"node", CTL_ARG_STR, true},
                                                  {"name", CTL_ARG_STR, true},
                                                  {NULL, 0, false}};
        int r;
        if (json_object_is_type(x, json_type_string))
            r = export_config_add_bitmap(&bl, NULL, json_object_get_string(x), errp);
        else if (json_object_is_type(x, json_type_object))
            r = ctl_args_check(x, ref_args, "bitmaps[].", errp) < 0 ? -EINVAL :
                export_config_add_bitmap(&bl, arg_str(x, "node"), arg_str(x, "name"), errp);
        else
            r = error_setf(errp, EINVAL, "Invalid parameter type for 'bitmaps[]', "
                           "expected: string or object");
        if (r < 0) {
            export_config_clear(&bl);
            tls_allow_clear(&allow);
            return NULL;
        }
    }
    struct export_add_config ac = {
        .id = arg_str(args, "id"),
        .node_name = arg_str(args, "node-name"),
        .name = arg_str(args, "name"),
        .description = arg_str(args, "description"),
        .writable = arg_bool(args, "writable", false),
        .allow = allow.present ? &allow : NULL,
        .bitmaps = bl.bitmaps,
        .n_bitmaps = bl.n_bitmaps,
    };
    struct export *added = server_export_add(cx->ctl->srv, &ac, errp);
    export_config_clear(&bl);
    tls_allow_clear(&allow);
    if (!added)
        return NULL;
    return synced(cx, ret_empty(), errp);
}

static struct json_object *cmd_block_export_del(struct ctl_cmd_ctx *cx,
                                                struct json_object *args,
                                                struct error **errp)
{
    const char *id = arg_str(args, "id");
    const char *mode = arg_str(args, "mode");
    enum export_del_mode m = EXPORT_DEL_SAFE;
    if (mode && !strcmp(mode, "hard")) {
        m = EXPORT_DEL_HARD;
    } else if (mode && strcmp(mode, "safe")) {
        error_setf(errp, EINVAL, "Parameter 'mode' does not accept value '%s' "
                   "(safe or hard)", mode);
        return NULL;
    }
    struct export *de = server_find_export_id(cx->ctl->srv, id);
    if (job_find_by_device(cx->ctl->jobs, id) || (de && de->bdev->chain_busy)) {
        error_setf(errp, EBUSY, "export '%s' is busy: a job works on it", id);
        return NULL;
    }
    if (server_export_del(cx->ctl->srv, id, m, errp) < 0)
        return NULL;
    return synced(cx, ret_empty(), errp);
}

/* x-debug-quiesce: quiesces an export for duration-ms and resumes it;
 * returns the measured stall.  A debugging aid (tests), like QEMU's x-
 * commands: not a stable interface. */
static struct json_object *cmd_x_debug_quiesce(struct ctl_cmd_ctx *cx,
                                               struct json_object *args,
                                               struct error **errp)
{
    const char *id = arg_str(args, "id");
    int64_t ms = arg_int(args, "duration-ms", 0);
    if (ms < 0 || ms > 10000) {
        error_setf(errp, EINVAL, "Parameter 'duration-ms' must be from 0 to 10000");
        return NULL;
    }
    struct export *e = server_find_export_id(cx->ctl->srv, id);
    if (!e) {
        error_setf(errp, ENOENT, "Export '%s' is not found", id);
        return NULL;
    }
    uint64_t t0 = loop_now_ns();
    export_quiesce_co(e, cx->co);
    uint64_t drained = loop_now_ns() - t0;
    unsigned inflight = e->inflight;
    if (ms > 0) {
        struct loop_sleep s;
        loop_sleep_init(&s);
        loop_sleep_co(cx->ctl->loop, &s, cx->co, (uint64_t)ms * 1000000u);
    }
    uint64_t stall = export_resume(e);
    struct json_object *r = json_object_new_object();
    json_object_object_add(r, "drain-ns", json_object_new_int64((int64_t)drained));
    json_object_object_add(r, "stall-ns", json_object_new_int64((int64_t)stall));
    json_object_object_add(r, "inflight-at-drain", json_object_new_int((int)inflight));
    return r;
}

/* ---- jobs ---- */

static struct job *find_job(struct ctl_cmd_ctx *cx, const char *id, bool block_cmd,
                            struct error **errp)
{
    struct job *j = job_find(cx->ctl->jobs, id);
    if (!j) {
        if (block_cmd) {
            cx->err_class = "DeviceNotActive";
            error_setf(errp, ENOENT, "Block job '%s' not found", id);
        } else {
            error_setf(errp, ENOENT, "Job not found");
        }
    }
    return j;
}

static struct json_object *cmd_query_jobs(struct ctl_cmd_ctx *cx,
                                          struct json_object *args,
                                          struct error **errp)
{
    struct json_object *r = json_object_new_array();
    for (struct job *j = job_first(cx->ctl->jobs); j; j = job_next(j))
        json_object_array_add(r, job_info_json(j));
    return r;
}

static struct json_object *cmd_query_block_jobs(struct ctl_cmd_ctx *cx,
                                                struct json_object *args,
                                                struct error **errp)
{
    struct json_object *r = json_object_new_array();
    for (struct job *j = job_first(cx->ctl->jobs); j; j = job_next(j))
        json_object_array_add(r, block_job_info_json(j));
    return r;
}

#define JOB_CMD(fname, key, block, call)                                     \
    static struct json_object *fname(struct ctl_cmd_ctx *cx,                 \
                                     struct json_object *args,               \
                                     struct error **errp)                    \
    {                                                                        \
        struct job *job = find_job(cx, arg_str(args, key), block, errp);     \
        if (!job || (call) < 0)                                              \
            return NULL;                                                     \
        return ret_empty();                                                  \
    }

JOB_CMD(cmd_block_job_set_speed, "device", true,
        job_set_speed(job, arg_int(args, "speed", 0), errp))
JOB_CMD(cmd_block_job_pause, "device", true, job_user_pause(job, errp))
JOB_CMD(cmd_block_job_resume, "device", true, job_user_resume(job, errp))
JOB_CMD(cmd_block_job_cancel, "device", true,
        job_user_cancel(job, arg_bool(args, "force", false), errp))
JOB_CMD(cmd_block_job_complete, "device", true, job_user_complete(job, errp))
JOB_CMD(cmd_block_job_finalize, "id", true, job_user_finalize(job, errp))
JOB_CMD(cmd_block_job_dismiss, "id", true, job_dismiss(job, errp))
JOB_CMD(cmd_job_pause, "id", false, job_user_pause(job, errp))
JOB_CMD(cmd_job_resume, "id", false, job_user_resume(job, errp))
JOB_CMD(cmd_job_cancel, "id", false, job_user_cancel(job, true, errp))
JOB_CMD(cmd_job_complete, "id", false, job_user_complete(job, errp))
JOB_CMD(cmd_job_finalize, "id", false, job_user_finalize(job, errp))
JOB_CMD(cmd_job_dismiss, "id", false, job_dismiss(job, errp))

/* ---- the chain jobs (chain.h) ---- */

/* The export a chain command acts on: by export id or by node name. */
struct export *ctl_job_target(struct ctl_cmd_ctx *cx, const char *device,
                              struct error **errp)
{
    struct export *e = server_find_export_id(cx->ctl->srv, device);
    if (!e) {
        struct blockdev *b = server_find_blockdev(cx->ctl->srv, device);
        e = b ? b->export : NULL;
    }
    if (!e) {
        cx->err_class = "DeviceNotFound";
        error_setf(errp, ENOENT, "Cannot find device=%s nor node-name=%s", device, device);
        return NULL;
    }
    if (job_find_by_device(cx->ctl->jobs, e->cfg.id) || e->bdev->chain_busy) {
        error_setf(errp, EBUSY, "Node '%s' is busy: block device is in use by block job",
                   e->bdev->node_name);
        return NULL;
    }
    return e;
}

struct export *ctl_snapshot_args(struct ctl_cmd_ctx *cx, struct json_object *args,
                                 struct snapshot_args *sa, struct error **errp)
{
    const char *dev = arg_str(args, "device");
    const char *node = arg_str(args, "node-name");
    if (!dev && !node) {
        error_setf(errp, EINVAL, "Parameter 'device' or 'node-name' is required");
        return NULL;
    }
    const char *mode = arg_str(args, "mode");
    if (mode && strcmp(mode, "absolute-paths") && strcmp(mode, "existing")) {
        error_setf(errp, EINVAL, "Parameter 'mode' does not accept value '%s'", mode);
        return NULL;
    }
    if (mode && !strcmp(mode, "existing")) {
        error_setf(errp, ENOTSUP, "mode 'existing' is not supported: strata "
                   "creates the overlay itself (mode 'absolute-paths')");
        return NULL;
    }
    const char *fmt = arg_str(args, "format");
    if (fmt && !fmt_driver_can_backing(fmt_find_driver(fmt))) {
        error_setf(errp, EINVAL, "Parameter 'format' does not accept value '%s' "
                   "(overlays are %s)", fmt, fmt_default_overlay_driver()->name);
        return NULL;
    }
    const char *snode = arg_str(args, "snapshot-node-name");
    if (snode && server_find_blockdev(cx->ctl->srv, snode)) {
        error_setf(errp, EEXIST, "Duplicate nodes with node-name='%s'", snode);
        return NULL;
    }
    struct export *e = ctl_job_target(cx, dev ? dev : node, errp);
    if (!e)
        return NULL;
    *sa = (struct snapshot_args){
        .file = arg_str(args, "snapshot-file"),
        .relative_backing = arg_bool(args, "relative-backing", false),
        .format = fmt,
    };
    return e;
}

static struct json_object *cmd_blockdev_snapshot_sync(struct ctl_cmd_ctx *cx,
                                                      struct json_object *args,
                                                      struct error **errp)
{
    struct snapshot_args sa;
    struct export *e = ctl_snapshot_args(cx, args, &sa, errp);
    if (!e)
        return NULL;
    struct snapshot_result res;
    if (snapshot_sync_co(cx->ctl->srv, e, &sa, cx->co, &res, errp) < 0)
        return NULL;
    /* QEMU returns {}; the measured stall is a strata extension */
    struct json_object *r = json_object_new_object();
    json_object_object_add(r, "stall-ns", json_object_new_int64((int64_t)res.stall_ns));
    json_object_object_add(r, "request-stall-ns", json_object_new_int64((int64_t)res.request_stall_ns));
    json_object_object_add(r, "duration-ns", json_object_new_int64((int64_t)res.total_ns));
    return r;
}

static struct json_object *cmd_block_commit(struct ctl_cmd_ctx *cx,
                                            struct json_object *args,
                                            struct error **errp)
{
    enum job_on_error oe = JOB_ON_ERROR_REPORT;
    const char *s = arg_str(args, "on-error");
    if (s && !job_on_error_parse(s, &oe)) {
        error_setf(errp, EINVAL, "Parameter 'on-error' does not accept value '%s' "
                   "(report, ignore, enospc, stop, auto)", s);
        return NULL;
    }
    if (oe == JOB_ON_ERROR_AUTO)
        oe = JOB_ON_ERROR_REPORT;
    if (arg_int(args, "speed", 0) < 0) {
        error_setf(errp, EINVAL, "Parameter 'speed' expects a non-negative value");
        return NULL;
    }
    if ((arg_has(args, "base") && arg_has(args, "base-node")) ||
        (arg_has(args, "top") && arg_has(args, "top-node"))) {
        error_setf(errp, EINVAL, "'base' and 'base-node' (or 'top' and 'top-node') "
                   "are mutually exclusive");
        return NULL;
    }
    const char *jid = arg_str(args, "job-id");
    if (jid && job_find(cx->ctl->jobs, jid)) {
        error_setf(errp, EEXIST, "Job ID '%s' already in use", jid);
        return NULL;
    }
    if (arg_has(args, "filter-node-name")) {
        error_setf(errp, ENOTSUP, "Parameter 'filter-node-name' is not supported: "
                   "strata inserts no filter node");
        return NULL;
    }
    struct export *e = ctl_job_target(cx, arg_str(args, "device"), errp);
    if (!e)
        return NULL;
    struct commit_args ca = {
        .job_id = jid ? jid : arg_str(args, "device"),
        .top = arg_str(args, "top"),
        .top_node = arg_str(args, "top-node"),
        .base = arg_str(args, "base"),
        .base_node = arg_str(args, "base-node"),
        .backing_file = arg_str(args, "backing-file"),
        .opts = {
            .speed = (uint64_t)arg_int(args, "speed", 0),
            .on_error = oe,
            .manual_finalize = !arg_bool(args, "auto-finalize", true),
            .manual_dismiss = !arg_bool(args, "auto-dismiss", true),
        },
    };
    if (!commit_start(cx->ctl->jobs, cx->ctl->srv, e, &ca, errp))
        return NULL;
    return ret_empty();
}

static void do_quit(struct ctl_cmd_ctx *cx)
{
    log_info("quit requested on the control socket");
    server_shutdown(cx->ctl->srv);
}

static struct json_object *cmd_quit(struct ctl_cmd_ctx *cx, struct json_object *args,
                                    struct error **errp)
{
    cx->after_reply = do_quit;
    return ret_empty();
}

/* ---- the table ---- */

static const struct ctl_arg no_args[] = {{NULL, 0, false}};
static const struct ctl_arg bitmap_args[] = {{"node", CTL_ARG_STR, true},
                                             {"name", CTL_ARG_STR, true},
                                             {NULL, 0, false}};

static const struct ctl_cmd commands[] = {
    {"qmp_capabilities", cmd_qmp_capabilities,
     (const struct ctl_arg[]){{"enable", CTL_ARG_ARRAY, false}, {NULL, 0, false}}},
    {"query-version", cmd_query_version, no_args},
    {"query-commands", cmd_query_commands, no_args},
    {"query-block-exports", cmd_query_block_exports, no_args},
    {"query-blockstats", cmd_query_blockstats,
     (const struct ctl_arg[]){{"query-nodes", CTL_ARG_BOOL, false}, {NULL, 0, false}}},
    {"query-block", cmd_query_block, no_args},
    {"query-named-block-nodes", cmd_query_named_block_nodes,
     (const struct ctl_arg[]){{"flat", CTL_ARG_BOOL, false}, {NULL, 0, false}}},
    {"blockdev-add", cmd_blockdev_add,
     (const struct ctl_arg[]){{"driver", CTL_ARG_STR, true},
                              {"node-name", CTL_ARG_STR, true},
                              {"file", CTL_ARG_ANY, true},
                              {"read-only", CTL_ARG_BOOL, false},
                              {"cache", CTL_ARG_OBJ, false},
                              {"backing", CTL_ARG_ANY, false},
                              {"discard", CTL_ARG_STR, false},
                              {"detect-zeroes", CTL_ARG_STR, false},
                              {"auto-read-only", CTL_ARG_BOOL, false},
                              {"backing-root", CTL_ARG_STR, false},
                              {"backing-remote", CTL_ARG_STR, false},
                              /* copy-before-write (refused with a reason) */
                              {"target", CTL_ARG_ANY, false},
                              {NULL, 0, false}}},
    {"blockdev-del", cmd_blockdev_del,
     (const struct ctl_arg[]){{"node-name", CTL_ARG_STR, true}, {NULL, 0, false}}},
    {"block-export-add", cmd_block_export_add,
     (const struct ctl_arg[]){{"type", CTL_ARG_STR, true},
                              {"id", CTL_ARG_STR, true},
                              {"node-name", CTL_ARG_STR, true},
                              {"writable", CTL_ARG_BOOL, false},
                              {"writethrough", CTL_ARG_BOOL, false},
                              {"name", CTL_ARG_STR, false},
                              {"description", CTL_ARG_STR, false},
                              {"allocation-depth", CTL_ARG_BOOL, false},
                              {"bitmaps", CTL_ARG_ARRAY, false},
                              {"allow", CTL_ARG_ARRAY, false},
                              {NULL, 0, false}}},
    {"block-export-del", cmd_block_export_del,
     (const struct ctl_arg[]){{"id", CTL_ARG_STR, true},
                              {"mode", CTL_ARG_STR, false},
                              {NULL, 0, false}}},
    {"blockdev-snapshot-sync", cmd_blockdev_snapshot_sync,
     (const struct ctl_arg[]){{"device", CTL_ARG_STR, false},
                              {"node-name", CTL_ARG_STR, false},
                              {"snapshot-file", CTL_ARG_STR, true},
                              {"snapshot-node-name", CTL_ARG_STR, false},
                              {"format", CTL_ARG_STR, false},
                              {"mode", CTL_ARG_STR, false},
                              /* strata extension */
                              {"relative-backing", CTL_ARG_BOOL, false},
                              {NULL, 0, false}}},
    {"block-commit", cmd_block_commit,
     (const struct ctl_arg[]){{"job-id", CTL_ARG_STR, false},
                              {"device", CTL_ARG_STR, true},
                              {"base-node", CTL_ARG_STR, false},
                              {"base", CTL_ARG_STR, false},
                              {"top-node", CTL_ARG_STR, false},
                              {"top", CTL_ARG_STR, false},
                              {"backing-file", CTL_ARG_STR, false},
                              {"backing-mask-protocol", CTL_ARG_BOOL, false},
                              {"filter-node-name", CTL_ARG_STR, false},
                              {"speed", CTL_ARG_INT, false},
                              {"on-error", CTL_ARG_STR, false},
                              {"auto-finalize", CTL_ARG_BOOL, false},
                              {"auto-dismiss", CTL_ARG_BOOL, false},
                              {NULL, 0, false}}},
    {"blockdev-backup", cmd_blockdev_backup,
     (const struct ctl_arg[]){{"job-id", CTL_ARG_STR, false},
                              {"device", CTL_ARG_STR, true},
                              {"target", CTL_ARG_STR, true},
                              {"sync", CTL_ARG_STR, true},
                              {"speed", CTL_ARG_INT, false},
                              {"bitmap", CTL_ARG_STR, false},
                              {"bitmap-mode", CTL_ARG_STR, false},
                              {"compress", CTL_ARG_BOOL, false},
                              {"on-source-error", CTL_ARG_STR, false},
                              {"on-target-error", CTL_ARG_STR, false},
                              {"auto-finalize", CTL_ARG_BOOL, false},
                              {"auto-dismiss", CTL_ARG_BOOL, false},
                              {"filter-node-name", CTL_ARG_STR, false},
                              {"x-perf", CTL_ARG_OBJ, false},
                              {NULL, 0, false}}},
    {"block-dirty-bitmap-add", cmd_block_dirty_bitmap_add,
     (const struct ctl_arg[]){{"node", CTL_ARG_STR, true},
                              {"name", CTL_ARG_STR, true},
                              {"granularity", CTL_ARG_INT, false},
                              {"persistent", CTL_ARG_BOOL, false},
                              {"disabled", CTL_ARG_BOOL, false},
                              {NULL, 0, false}}},
    {"block-dirty-bitmap-remove", cmd_block_dirty_bitmap_remove, bitmap_args},
    {"block-dirty-bitmap-clear", cmd_block_dirty_bitmap_clear, bitmap_args},
    {"block-dirty-bitmap-enable", cmd_block_dirty_bitmap_enable, bitmap_args},
    {"block-dirty-bitmap-disable", cmd_block_dirty_bitmap_disable, bitmap_args},
    {"block-dirty-bitmap-merge", cmd_block_dirty_bitmap_merge,
     (const struct ctl_arg[]){{"node", CTL_ARG_STR, true},
                              {"target", CTL_ARG_STR, true},
                              {"bitmaps", CTL_ARG_ARRAY, true},
                              {NULL, 0, false}}},
    {"transaction", cmd_transaction,
     (const struct ctl_arg[]){{"actions", CTL_ARG_ARRAY, true},
                              {"properties", CTL_ARG_OBJ, false},
                              {NULL, 0, false}}},
    {"query-jobs", cmd_query_jobs, no_args},
    {"query-block-jobs", cmd_query_block_jobs, no_args},
    {"block-job-set-speed", cmd_block_job_set_speed,
     (const struct ctl_arg[]){{"device", CTL_ARG_STR, true},
                              {"speed", CTL_ARG_INT, true},
                              {NULL, 0, false}}},
    {"block-job-pause", cmd_block_job_pause,
     (const struct ctl_arg[]){{"device", CTL_ARG_STR, true}, {NULL, 0, false}}},
    {"block-job-resume", cmd_block_job_resume,
     (const struct ctl_arg[]){{"device", CTL_ARG_STR, true}, {NULL, 0, false}}},
    {"block-job-cancel", cmd_block_job_cancel,
     (const struct ctl_arg[]){{"device", CTL_ARG_STR, true},
                              {"force", CTL_ARG_BOOL, false},
                              {NULL, 0, false}}},
    {"block-job-complete", cmd_block_job_complete,
     (const struct ctl_arg[]){{"device", CTL_ARG_STR, true}, {NULL, 0, false}}},
    {"block-job-finalize", cmd_block_job_finalize,
     (const struct ctl_arg[]){{"id", CTL_ARG_STR, true}, {NULL, 0, false}}},
    {"block-job-dismiss", cmd_block_job_dismiss,
     (const struct ctl_arg[]){{"id", CTL_ARG_STR, true}, {NULL, 0, false}}},
    {"job-pause", cmd_job_pause,
     (const struct ctl_arg[]){{"id", CTL_ARG_STR, true}, {NULL, 0, false}}},
    {"job-resume", cmd_job_resume,
     (const struct ctl_arg[]){{"id", CTL_ARG_STR, true}, {NULL, 0, false}}},
    {"job-cancel", cmd_job_cancel,
     (const struct ctl_arg[]){{"id", CTL_ARG_STR, true}, {NULL, 0, false}}},
    {"job-complete", cmd_job_complete,
     (const struct ctl_arg[]){{"id", CTL_ARG_STR, true}, {NULL, 0, false}}},
    {"job-finalize", cmd_job_finalize,
     (const struct ctl_arg[]){{"id", CTL_ARG_STR, true}, {NULL, 0, false}}},
    {"job-dismiss", cmd_job_dismiss,
     (const struct ctl_arg[]){{"id", CTL_ARG_STR, true}, {NULL, 0, false}}},
    {"x-debug-quiesce", cmd_x_debug_quiesce,
     (const struct ctl_arg[]){{"id", CTL_ARG_STR, true},
                              {"duration-ms", CTL_ARG_INT, false},
                              {NULL, 0, false}}},
    {"x-debug-fault-inject", cmd_x_debug_fault_inject,
     (const struct ctl_arg[]){{"nth", CTL_ARG_INT, true},
                              {"ops", CTL_ARG_ARRAY, false},
                              {"error", CTL_ARG_STR, false},
                              {NULL, 0, false}}},
    {"x-debug-fault-query", cmd_x_debug_fault_query, no_args},
    {"quit", cmd_quit, no_args},
};

const struct ctl_cmd *ctl_cmd_table(size_t *n)
{
    *n = sizeof(commands) / sizeof(commands[0]);
    return commands;
}

const struct ctl_cmd *ctl_cmd_find(const char *name)
{
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
        if (!strcmp(commands[i].name, name))
            return &commands[i];
    return NULL;
}
