/* strata — the persistent state file (see state.h). */
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <json-c/json.h>

#include "log.h"
#include "state.h"
#include "util.h"

struct state {
    struct server *srv;
    char *path;
    char *tmp_path;
    char *dir;
    struct server_change_hook hook;
    uint64_t gen_wanted;       /* bumped by every change */
    uint64_t gen_saved;        /* the last generation on stable storage */
    int last_error;            /* -errno of the last failed save, or 0 */
    uint64_t gen_failed;       /* generation that save was for */
    bool writer_running;
    bool loading;              /* state_load(): no saves meanwhile */
    struct co_queue waiters;   /* state_sync_co() */
};

static void state_changed(struct server_change_hook *h);
static int state_hook_sync_co(struct server_change_hook *h, struct coro *co);

struct state *state_new(struct server *srv, const char *path)
{
    struct state *st = calloc(1, sizeof(*st));
    if (!st)
        return NULL;
    st->srv = srv;
    st->path = strdup(path);
    char *copy = strdup(path);
    if (!st->path || !copy || asprintf(&st->tmp_path, "%s.tmp", path) < 0) {
        free(copy);
        free(st->path);
        free(st);
        return NULL;
    }
    st->dir = strdup(dirname(copy));
    free(copy);
    if (!st->dir) {
        free(st->tmp_path);
        free(st->path);
        free(st);
        return NULL;
    }
    st->hook.changed = state_changed;
    st->hook.sync_co = state_hook_sync_co;
    return st;
}

void state_free(struct state *st)
{
    if (!st)
        return;
    if (st->srv->change_hook == &st->hook)
        st->srv->change_hook = NULL;
    free(st->path);
    free(st->tmp_path);
    free(st->dir);
    free(st);
}

void state_attach(struct state *st)
{
    st->srv->change_hook = &st->hook;
}

bool state_busy(const struct state *st)
{
    return st->writer_running;
}

/* ---- building and parsing the document ---- */

static struct json_object *state_build(struct server *srv)
{
    struct json_object *root = json_object_new_object();
    json_object_object_add(root, "version", json_object_new_int(1));
    struct json_object *nodes = json_object_new_array();
    for (size_t i = 0; i < srv->n_bdevs; i++) {
        const struct blockdev *b = srv->bdevs[i];
        if (b->transient)
            continue;
        struct json_object *o = json_object_new_object();
        json_object_object_add(o, "node-name", json_object_new_string(b->node_name));
        json_object_object_add(o, "driver", json_object_new_string(b->driver));
        json_object_object_add(o, "filename", json_object_new_string(b->filename));
        json_object_object_add(o, "read-only", json_object_new_boolean(b->read_only));
        json_object_object_add(o, "cache-direct", json_object_new_boolean(b->direct));
        if (b->backing_root)
            json_object_object_add(o, "backing-root",
                                   json_object_new_string(b->backing_root));
        if (b->backing_remote)
            json_object_object_add(o, "backing-remote",
                                   json_object_new_string(b->backing_remote));
        if (b->l2_cache_bytes)
            json_object_object_add(o, "l2-cache-size",
                                   json_object_new_int64((int64_t)b->l2_cache_bytes));
        if (b->refcount_cache_bytes)
            json_object_object_add(o, "refcount-cache-size",
                                   json_object_new_int64((int64_t)b->refcount_cache_bytes));
        json_object_array_add(nodes, o);
    }
    json_object_object_add(root, "nodes", nodes);
    struct json_object *exports = json_object_new_array();
    for (size_t i = 0; i < srv->n_exports; i++) {
        const struct export *e = srv->exports[i];
        if (e->bdev->transient)
            continue;
        struct json_object *o = json_object_new_object();
        json_object_object_add(o, "id", json_object_new_string(e->cfg.id));
        json_object_object_add(o, "node-name", json_object_new_string(e->bdev->node_name));
        json_object_object_add(o, "name", json_object_new_string(e->cfg.name));
        if (e->cfg.description)
            json_object_object_add(o, "description",
                                   json_object_new_string(e->cfg.description));
        json_object_object_add(o, "writable", json_object_new_boolean(e->writable));
        struct json_object *allow = state_allow_to_json(&e->cfg.allow);
        if (allow)
            json_object_object_add(o, "allow", allow);
        if (e->cfg.n_bitmaps) {
            struct json_object *bl = json_object_new_array();
            for (size_t k = 0; k < e->cfg.n_bitmaps; k++) {
                const struct export_bitmap_ref *r = &e->cfg.bitmaps[k];
                if (r->node) {
                    struct json_object *x = json_object_new_object();
                    json_object_object_add(x, "node", json_object_new_string(r->node));
                    json_object_object_add(x, "name", json_object_new_string(r->name));
                    json_object_array_add(bl, x);
                } else {
                    json_object_array_add(bl, json_object_new_string(r->name));
                }
            }
            json_object_object_add(o, "bitmaps", bl);
        }
        json_object_array_add(exports, o);
    }
    json_object_object_add(root, "exports", exports);
    return root;
}

/* An export's "bitmaps" as saved: names, or {"node", "name"}. */
static int state_bitmaps_from_json(struct json_object *v, struct export_config *cfg,
                                   struct error **errp)
{
    if (!json_object_is_type(v, json_type_array))
        return error_setf(errp, EINVAL, "'bitmaps' is not an array");
    for (size_t i = 0; i < json_object_array_length(v); i++) {
        struct json_object *x = json_object_array_get_idx(v, i), *nd, *nm;
        int r;
        if (json_object_is_type(x, json_type_string))
            r = export_config_add_bitmap(cfg, NULL, json_object_get_string(x), errp);
        else if (json_object_is_type(x, json_type_object) &&
                 json_object_object_get_ex(x, "node", &nd) &&
                 json_object_object_get_ex(x, "name", &nm) &&
                 json_object_is_type(nd, json_type_string) &&
                 json_object_is_type(nm, json_type_string))
            r = export_config_add_bitmap(cfg, json_object_get_string(nd),
                                         json_object_get_string(nm), errp);
        else
            r = error_setf(errp, EINVAL, "'bitmaps' entry %zu is malformed", i);
        if (r < 0) {
            export_config_clear(cfg);
            return r;
        }
    }
    return 0;
}

int state_allow_from_json(struct json_object *v, struct tls_allow *out,
                          struct error **errp)
{
    memset(out, 0, sizeof(*out));
    if (!v)
        return 0;
    if (!json_object_is_type(v, json_type_array))
        return error_setf(errp, EINVAL, "'allow' must be an array of strings");
    size_t n = json_object_array_length(v);
    out->present = true;
    out->entries = calloc(n ? n : 1, sizeof(char *));
    if (!out->entries)
        return error_setf(errp, ENOMEM, "out of memory");
    for (size_t i = 0; i < n; i++) {
        struct json_object *s = json_object_array_get_idx(v, i);
        if (!json_object_is_type(s, json_type_string)) {
            tls_allow_clear(out);
            return error_setf(errp, EINVAL,
                              "'allow' must be an array of strings");
        }
        out->entries[i] = strdup(json_object_get_string(s));
        if (!out->entries[i]) {
            tls_allow_clear(out);
            return error_setf(errp, ENOMEM, "out of memory");
        }
        out->n++;
    }
    return 0;
}

struct json_object *state_allow_to_json(const struct tls_allow *a)
{
    if (!a->present)
        return NULL;
    struct json_object *arr = json_object_new_array();
    for (size_t i = 0; i < a->n; i++)
        json_object_array_add(arr, json_object_new_string(a->entries[i]));
    return arr;
}

static const char *get_str(struct json_object *o, const char *key)
{
    struct json_object *v;
    if (!json_object_object_get_ex(o, key, &v) || !json_object_is_type(v, json_type_string))
        return NULL;
    return json_object_get_string(v);
}

static bool get_bool(struct json_object *o, const char *key, bool *out)
{
    struct json_object *v;
    if (!json_object_object_get_ex(o, key, &v) || !json_object_is_type(v, json_type_boolean))
        return false;
    *out = json_object_get_boolean(v);
    return true;
}

int state_load(struct state *st, bool *loaded, struct error **errp)
{
    *loaded = false;
    FILE *fp = fopen(st->path, "r");
    if (!fp) {
        if (errno == ENOENT)
            return 0;
        return error_setf(errp, errno, "state file %s: %s", st->path, strerror(errno));
    }
    /* a state file never gets large: a few hundred bytes per export */
    char *buf = malloc(16u << 20);
    size_t n = buf ? fread(buf, 1, (16u << 20) - 1, fp) : 0;
    fclose(fp);
    if (!buf)
        return error_setf(errp, ENOMEM, "out of memory");
    buf[n] = '\0';
    enum json_tokener_error jerr;
    struct json_object *root = json_tokener_parse_verbose(buf, &jerr);
    free(buf);
    if (!root)
        return error_setf(errp, EINVAL, "state file %s: not valid JSON (%s)",
                          st->path, json_tokener_error_desc(jerr));
    int ret = 0;
    struct json_object *v, *nodes, *exports;
    if (!json_object_is_type(root, json_type_object) ||
        !json_object_object_get_ex(root, "version", &v) ||
        json_object_get_int(v) != 1 ||
        !json_object_object_get_ex(root, "nodes", &nodes) ||
        !json_object_is_type(nodes, json_type_array) ||
        !json_object_object_get_ex(root, "exports", &exports) ||
        !json_object_is_type(exports, json_type_array)) {
        json_object_put(root);
        return error_setf(errp, EINVAL, "state file %s: not a strata state "
                          "file of version 1", st->path);
    }
    st->loading = true;
    for (size_t i = 0; ret == 0 && i < json_object_array_length(nodes); i++) {
        struct json_object *o = json_object_array_get_idx(nodes, i);
        struct blockdev_config bc = {
            .node_name = get_str(o, "node-name"),
            .driver = get_str(o, "driver"),
            .filename = get_str(o, "filename"),
            .backing_root = get_str(o, "backing-root"),
            .backing_remote = get_str(o, "backing-remote"),
        };
        struct json_object *sz;
        if (json_object_object_get_ex(o, "l2-cache-size", &sz))
            bc.l2_cache_bytes = (uint64_t)json_object_get_int64(sz);
        if (json_object_object_get_ex(o, "refcount-cache-size", &sz))
            bc.refcount_cache_bytes = (uint64_t)json_object_get_int64(sz);
        if (!bc.node_name || !bc.driver || !bc.filename ||
            !get_bool(o, "read-only", &bc.read_only) ||
            !get_bool(o, "cache-direct", &bc.direct)) {
            ret = error_setf(errp, EINVAL, "state file %s: node %zu: a key is "
                             "missing or of the wrong type", st->path, i);
            break;
        }
        if (!server_blockdev_add(st->srv, &bc, errp)) {
            error_prefix(errp, "state file %s: node '%s': ", st->path, bc.node_name);
            ret = -EINVAL;
        }
    }
    for (size_t i = 0; ret == 0 && i < json_object_array_length(exports); i++) {
        struct json_object *o = json_object_array_get_idx(exports, i);
        struct export_add_config ac = {
            .id = get_str(o, "id"),
            .node_name = get_str(o, "node-name"),
            .name = get_str(o, "name"),
            .description = get_str(o, "description"),
        };
        if (!ac.id || !ac.node_name || !ac.name ||
            !get_bool(o, "writable", &ac.writable)) {
            ret = error_setf(errp, EINVAL, "state file %s: export %zu: a key "
                             "is missing or of the wrong type", st->path, i);
            break;
        }
        struct json_object *av = NULL;
        struct tls_allow allow;
        json_object_object_get_ex(o, "allow", &av);
        if (state_allow_from_json(av, &allow, errp) < 0) {
            error_prefix(errp, "state file %s: export '%s': ", st->path, ac.id);
            ret = -EINVAL;
            break;
        }
        ac.allow = allow.present ? &allow : NULL;
        struct export_config bl = {0};
        struct json_object *bv = NULL;
        if (json_object_object_get_ex(o, "bitmaps", &bv) &&
            state_bitmaps_from_json(bv, &bl, errp) < 0) {
            error_prefix(errp, "state file %s: export '%s': ", st->path, ac.id);
            tls_allow_clear(&allow);
            ret = -EINVAL;
            break;
        }
        ac.bitmaps = bl.bitmaps;
        ac.n_bitmaps = bl.n_bitmaps;
        struct error *berr = NULL;
        struct export *ex = server_export_add(st->srv, &ac, &berr);
        if (!ex && ac.n_bitmaps) {
            /* A bitmap that did not survive (not persistent, or left
             * inconsistent by a crash): the export comes back without its
             * bitmaps, never with a wrong one. */
            log_warn("state file %s: export '%s': %s: restored without its "
                     "dirty bitmaps", st->path, ac.id, berr->msg);
            error_free(berr);
            berr = NULL;
            ac.bitmaps = NULL;
            ac.n_bitmaps = 0;
            ex = server_export_add(st->srv, &ac, &berr);
        }
        if (!ex) {
            error_setf(errp, berr->code, "state file %s: export '%s': %s",
                       st->path, ac.id, berr->msg);
            ret = -EINVAL;
        }
        error_free(berr);
        export_config_clear(&bl);
        tls_allow_clear(&allow);
    }
    st->loading = false;
    json_object_put(root);
    if (ret == 0) {
        *loaded = true;
        log_info("state file %s: %zu node(s), %zu export(s) restored", st->path,
                 st->srv->n_bdevs, st->srv->n_exports);
    }
    return ret;
}

/* ---- saving through the ring ---- */

static int ring_call_co(struct loop *l, struct coro *co,
                        void (*prep)(struct io_uring_sqe *sqe, void *arg),
                        void *arg)
{
    struct loop_wait w;
    loop_wait_init(&w, co);
    prep(loop_get_sqe(l, &w.op), arg);
    return loop_wait_co(&w);
}

struct open_args { const char *path; int flags; mode_t mode; };
static void prep_open(struct io_uring_sqe *sqe, void *arg)
{
    struct open_args *a = arg;
    io_uring_prep_openat(sqe, AT_FDCWD, a->path, a->flags, a->mode);
}

struct write_args { int fd; const char *buf; size_t len; uint64_t off; };
static void prep_write(struct io_uring_sqe *sqe, void *arg)
{
    struct write_args *a = arg;
    io_uring_prep_write(sqe, a->fd, a->buf, (unsigned)a->len, a->off);
}

static void prep_fsync(struct io_uring_sqe *sqe, void *arg)
{
    io_uring_prep_fsync(sqe, *(int *)arg, 0);
}

static void prep_close(struct io_uring_sqe *sqe, void *arg)
{
    io_uring_prep_close(sqe, *(int *)arg);
}

struct rename_args { const char *from, *to; };
static void prep_rename(struct io_uring_sqe *sqe, void *arg)
{
    struct rename_args *a = arg;
    io_uring_prep_renameat(sqe, AT_FDCWD, a->from, AT_FDCWD, a->to, 0);
}

/* Writes text to tmp, fsync, rename over path, fsync the directory. */
static int save_co(struct state *st, struct coro *co, const char *text)
{
    struct loop *l = st->srv->loop;
    struct open_args oa = {st->tmp_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600};
    int fd = ring_call_co(l, co, prep_open, &oa);
    if (fd < 0)
        return fd;
    size_t len = strlen(text), done = 0;
    int r = 0;
    while (done < len) {
        struct write_args wa = {fd, text + done, len - done, done};
        r = ring_call_co(l, co, prep_write, &wa);
        if (r <= 0) {
            r = r == 0 ? -EIO : r;
            break;
        }
        done += (size_t)r;
        r = 0;
    }
    if (r == 0)
        r = ring_call_co(l, co, prep_fsync, &fd);
    int cr = ring_call_co(l, co, prep_close, &fd);
    if (r == 0 && cr < 0)
        r = cr;
    if (r == 0) {
        struct rename_args ra = {st->tmp_path, st->path};
        r = ring_call_co(l, co, prep_rename, &ra);
    }
    if (r == 0) {
        struct open_args da = {st->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0};
        int dfd = ring_call_co(l, co, prep_open, &da);
        if (dfd < 0)
            return dfd;
        r = ring_call_co(l, co, prep_fsync, &dfd);
        ring_call_co(l, co, prep_close, &dfd);
    }
    return r;
}

static void writer_co(struct coro *co, void *arg)
{
    struct state *st = arg;
    while (st->gen_saved < st->gen_wanted) {
        uint64_t gen = st->gen_wanted;
        struct json_object *doc = state_build(st->srv);
        char *text = NULL;
        const char *s = json_object_to_json_string_ext(doc, JSON_C_TO_STRING_PRETTY |
                                                       JSON_C_TO_STRING_NOSLASHESCAPE);
        if (s)
            text = strdup(s);
        json_object_put(doc);
        int r = text ? save_co(st, co, text) : -ENOMEM;
        free(text);
        if (r < 0) {
            log_error("state file %s: cannot save: %s", st->path, strerror(-r));
            st->last_error = r;
            st->gen_failed = gen;
            st->gen_saved = gen; /* do not spin; the next change retries */
        } else {
            st->gen_saved = gen;
            if (st->gen_failed <= gen)
                st->last_error = 0;
            log_debug("state file %s saved", st->path);
        }
        co_queue_wake_all(&st->waiters);
    }
    st->writer_running = false;
    server_release(st->srv);
}

static void state_changed(struct server_change_hook *h)
{
    state_notify_changed(container_of(h, struct state, hook));
}

void state_notify_changed(struct state *st)
{
    if (st->loading)
        return;
    st->gen_wanted++;
    if (st->writer_running)
        return;
    struct coro *co = coro_create(loop_coro_pool(st->srv->loop), writer_co, st);
    if (!co) {
        log_error("state file %s: no memory to save it", st->path);
        st->last_error = -ENOMEM;
        st->gen_failed = st->gen_wanted;
        return;
    }
    st->writer_running = true;
    server_hold(st->srv); /* the shutdown waits for the save */
    coro_wake(co);
}

int state_sync_co(struct state *st, struct coro *co)
{
    uint64_t want = st->gen_wanted;
    while (st->gen_saved < want && st->writer_running)
        co_queue_wait_co(&st->waiters, co);
    if (st->gen_saved < want)
        return st->last_error ? st->last_error : -EIO;
    return st->gen_failed >= want ? st->last_error : 0;
}

static int state_hook_sync_co(struct server_change_hook *h, struct coro *co)
{
    struct state *st = container_of(h, struct state, hook);
    return state_sync_co(st, co);
}
