/* strata — fuzz target: the control socket's framing, negotiation and
 * dispatcher (daemon/control/) fed fuzzed JSON, one connection per input,
 * on one server kept for the whole process (persistent fuzzing).
 *
 * The `qmp` target runs a whole daemon lifetime per input (start-up,
 * SIGTERM shutdown); this one sets the server up once, on the first input:
 * a loop, a server with one export over in-memory storage ("mem", raw,
 * writable: node and export id "mem"), the control socket, as stratad
 * runs with --control.  Each input is then one new client: it connects to
 * the listening socket (accepted by the server as any client is), sends
 * the input, shuts its write side and reads until the server closes.  The
 * client is nonblocking and lives on the loop's thread: it sends and reads
 * between iterations of the loop (loop_run_once()), so no thread is made
 * per input.
 *
 * With FUZZ_QMP_IMG=1 the set-up also makes a qcow2 image in the tmpfs and
 * adds it (node and export "img") through the control socket, so that
 * snapshots, commits, backups and persistent bitmaps are reached, at
 * several times the cost of an input (the test fuzz-replay-qmp-dispatch-img
 * replays the corpus so).
 *
 * Between inputs the server is brought back to the state it had after the
 * set-up, so that every input meets the same server and replays the same
 * way.  An input that changed nothing leaves nothing to do (checked from
 * the server's structures: nodes, exports, jobs, bitmaps, backups, clients,
 * holds, fault injection, the store's written bytes, img's file, files in
 * the tmpfs; a deleted export of the fixture is seen through the server's
 * change hook, since a new one may have the old one's address).
 * Otherwise a second client undoes what the input did, with the commands
 * a user would use (jobs cancelled, finalized and dismissed, exports and
 * nodes other than "mem" deleted, bitmaps removed, fault injection
 * disarmed), the tmpfs is emptied, the store's written bytes and the
 * export's quiesce statistics (which no command clears) are cleared; then query-named-block-nodes, query-block-exports, query-jobs,
 * query-block-jobs and x-debug-fault-query must answer what they answered
 * after the set-up, and the structures must be as clean as before: state
 * an input leaves behind that the server's own commands cannot remove is
 * a finding.  A fixture export or node that was deleted, replaced or
 * snapshotted is deleted with the rest and added again ("mem" as the
 * set-up adds it, "img" from a new image).  Only after "quit" (the server
 * shut down; its shutdown is checked as `qmp` checks it) is a new server
 * set up for the next input.
 *
 * Commands act on real storage by name, so the target shuts itself in as
 * `qmp` does (qmp-common.h).
 *
 * Properties, for every input:
 *  - no crash, no sanitizer report, no leak (nothing unreachable after an
 *    input; everything freed at exit, where the server is shut down);
 *  - the server greets first; everything it sends on the connection is
 *    CRLF-terminated lines, each a JSON object that is a greeting, a
 *    return, an error (with class and desc) or an event;
 *  - the connection ends once the input has (the server closes it), and
 *    the server frees the client;
 *  - the reset above brings the server back to its initial state.
 *
 * What it does not cover, versus `qmp`: start-up and the SIGTERM shutdown
 * with a client connected (only after "quit"), and what a command does to
 * a server that earlier inputs used (every input meets a fresh state).
 */
#include <dirent.h>
#include <errno.h>
#include <json-c/json.h>
#include <stdbool.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "control-int.h"
#include "exports.h"
#include "format.h"
#include "fault.h"
#include "fuzz.h"
#include "jobs.h"
#include "log.h"
#include "loop.h"
#include "mem-export.h"
#include "qmp-common.h"
#include "server.h"
#include "tls.h"
#include "util.h"

#define EXPORT_BYTES (UINT64_C(1) << 20)
/* The second fixture, with FUZZ_QMP_IMG=1: a qcow2 image in the tmpfs,
 * node and export "img", so that snapshots, commits, backups and
 * persistent bitmaps have an image to work on (and the files they make a
 * directory they may use).  It makes an input several times dearer on
 * average (qcow2 opens, jobs, a new image after each input that changed
 * it), so it is not the default. */
#define IMG_FILE "img.qcow2"
#define IMG_PATH FUZZ_QMP_WORK "/" IMG_FILE
#define MAX_OUT (UINT64_C(16) << 20)
/* Bounds the reset: rounds of queries while jobs wind down. */
#define RESET_ROUNDS 2000

int LLVMFuzzerInitialize(int *argc, char ***argv);

static const char *ctl_path;
static const char *ctl_name;   /* its name in FUZZ_QMP_WORK */
static bool verbose;
static bool with_img;          /* FUZZ_QMP_IMG=1: the fixture "img" too */

/* The server, kept from one input to the next. */
static struct {
    struct loop *l;
    struct server *srv;
    struct tls_server *tls;
    struct control *ctl;
    struct mem_store store;
    uint8_t *zeros;
    /* the fixture, as set up */
    struct blockdev *bd;
    struct fmt_node *root;
    struct export *exp;
    struct blockdev *img_bd;
    struct fmt_node *img_root;
    struct export *img_exp;
    struct timespec img_mtime; /* of its file, as made */
    off_t img_size;
    /* The control socket's change hook, and ours in front of it: an
     * export of the fixture deleted (and maybe made again, at the same
     * address) is seen here, not from pointers. */
    struct server_change_hook *ctl_hook, hook;
    bool mem_deleted, img_deleted;
    /* the answers of the queries after set-up */
    char *initial;
    off_t tmpfs_size;          /* of FUZZ_QMP_WORK after set-up */
    unsigned long inputs, resets, rebuilds;
    /* the clients' receive buffers, kept from one input to the next */
    struct {
        char *buf;
        size_t cap;
    } bufs[2];
} g;

/* ---- the client: nonblocking, driven between loop iterations ---- */

struct client {
    int fd;
    int slot;                  /* of g.bufs: 0 the input's, 1 the reset's */
    const uint8_t *in;         /* what is left to send */
    size_t in_len;
    bool wr_shut;
    bool eof;
    char *out;                 /* what the server sent, NUL-terminated */
    size_t out_len, out_cap;
    size_t line_pos;           /* start of the first line not consumed */
};

static void client_open(struct client *c, int slot)
{
    memset(c, 0, sizeof(*c));
    c->slot = slot;
    c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", ctl_path);
    /* A unix socket connects at once while the listener's backlog has
     * room; the server accepts in its loop. */
    if (c->fd < 0 || connect(c->fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        perror("fuzz-qmp-dispatch: connect");
        abort();
    }
    if (!g.bufs[slot].buf) {
        g.bufs[slot].cap = 128 << 10;
        if (!(g.bufs[slot].buf = malloc(g.bufs[slot].cap)))
            abort();
    }
    c->out = g.bufs[slot].buf;
    c->out_cap = g.bufs[slot].cap;
    c->out[0] = '\0';
}

static void client_close(struct client *c)
{
    close(c->fd);
    g.bufs[c->slot].buf = c->out; /* grown, maybe */
    g.bufs[c->slot].cap = c->out_cap;
}

/* Sends what the socket takes and reads what has arrived, without
 * blocking.  Bytes past MAX_OUT are not read (the check fails on them). */
static void client_pump(struct client *c)
{
    while (c->in_len) {
        ssize_t w = send(c->fd, c->in, c->in_len, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && errno == EAGAIN)
            break;
        if (w <= 0) {
            /* The server may close before it read everything (quit, a
             * message over the limit): the sending ends, not the test. */
            c->in_len = 0;
            break;
        }
        c->in += w;
        c->in_len -= (size_t)w;
    }
    if (!c->in_len && !c->wr_shut) {
        shutdown(c->fd, SHUT_WR);
        c->wr_shut = true;
    }
    while (!c->eof && c->out_len <= MAX_OUT) {
        if (c->out_cap - c->out_len < 65536) {
            c->out_cap = c->out_cap * 2 + 65536;
            c->out = realloc(c->out, c->out_cap);
            if (!c->out)
                abort();
        }
        ssize_t r = recv(c->fd, c->out + c->out_len,
                         c->out_cap - c->out_len - 1, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && errno == EAGAIN)
            break;
        if (r <= 0) {
            c->eof = true;
            break;
        }
        c->out_len += (size_t)r;
        c->out[c->out_len] = '\0';
    }
}

/* Runs the loop until the server closed c (or stopped: "quit"). */
static void client_run_to_end(struct client *c)
{
    for (;;) {
        client_pump(c);
        if (c->eof || c->out_len > MAX_OUT || loop_stopping(g.l))
            return;
        FUZZ_CHECK(loop_run_once(g.l) == 0);
    }
}

/* The next complete line from the server (CRLF cut off), or NULL. */
static char *client_line(struct client *c)
{
    char *start = c->out + c->line_pos;
    char *nl = strchr(start, '\n');
    if (!nl)
        return NULL;
    c->line_pos = (size_t)(nl + 1 - c->out);
    FUZZ_CHECK(nl > start && nl[-1] == '\r');
    nl[-1] = '\0';
    return start;
}

/* ---- the reset's client: one command at a time ---- */

/* Runs cmd on c and returns its reply ({"return": ...} or {"error": ...};
 * events are skipped). */
static struct json_object *call(struct client *c, struct json_object *cmd)
{
    const char *text = json_object_to_json_string_ext(cmd,
                                                      JSON_C_TO_STRING_PLAIN);
    size_t len = strlen(text);
    FUZZ_CHECK(send(c->fd, text, len, MSG_NOSIGNAL) == (ssize_t)len);
    json_object_put(cmd);
    for (;;) {
        char *line;
        while ((line = client_line(c)) != NULL) {
            struct json_object *o = json_tokener_parse(line);
            FUZZ_CHECK(o && json_object_is_type(o, json_type_object));
            struct json_object *v;
            if (json_object_object_get_ex(o, "return", &v) ||
                json_object_object_get_ex(o, "error", &v))
                return o;
            json_object_put(o); /* greeting, events */
        }
        FUZZ_CHECK(!c->eof && !loop_stopping(g.l));
        FUZZ_CHECK(loop_run_once(g.l) == 0);
        client_pump(c);
    }
}

static struct json_object *command(const char *name, struct json_object *args)
{
    struct json_object *m = json_object_new_object();
    json_object_object_add(m, "execute", json_object_new_string(name));
    if (args)
        json_object_object_add(m, "arguments", args);
    return m;
}

/* {name: value} */
static struct json_object *arg1(const char *name, const char *value)
{
    struct json_object *a = json_object_new_object();
    json_object_object_add(a, name, json_object_new_string(value));
    return a;
}

/* The "return" of name, checked to be one; the caller puts *reply. */
static struct json_object *query(struct client *c, const char *name,
                                 struct json_object *args,
                                 struct json_object **reply)
{
    *reply = call(c, command(name, args));
    struct json_object *v;
    if (!json_object_object_get_ex(*reply, "return", &v)) {
        fprintf(stderr, "fuzz-qmp-dispatch: %s: %s\n", name,
                json_object_to_json_string(*reply));
        FUZZ_CHECK(!"a query failed");
    }
    return v;
}

/* A command whose failure is allowed (the state may not allow it). */
static void try(struct client *c, const char *name, struct json_object *args)
{
    struct json_object *r = call(c, command(name, args));
    if (verbose)
        fprintf(stderr, "reset: %s: %s\n", name,
                json_object_to_json_string(r));
    json_object_put(r);
}

static void admin_open(struct client *c)
{
    client_open(c, 1);
    c->wr_shut = true; /* the client sends more than one batch */
    struct json_object *r = call(c, command("qmp_capabilities", NULL));
    FUZZ_CHECK(json_object_object_get_ex(r, "return", NULL));
    json_object_put(r);
}

/* Closes the client and waits until the server has freed it. */
static void admin_close(struct client *c)
{
    shutdown(c->fd, SHUT_WR);
    client_run_to_end(c);
    FUZZ_CHECK(c->eof);
    while (g.ctl->clients && !loop_stopping(g.l))
        FUZZ_CHECK(loop_run_once(g.l) == 0);
    client_close(c);
}

/* What the state queries answer: one string to compare. */
static char *snapshot_state(struct client *c)
{
    static const char *const queries[] = {
        "query-named-block-nodes", "query-block-exports", "query-jobs",
        "query-block-jobs",
    };
    struct json_object *all = json_object_new_object();
    for (size_t i = 0; i < sizeof(queries) / sizeof(queries[0]); i++) {
        struct json_object *reply;
        struct json_object *v = query(c, queries[i], NULL, &reply);
        json_object_object_add(all, queries[i], json_object_get(v));
        json_object_put(reply);
    }
    /* Fault injection: whether a plan is armed ("seen" counts every
     * backend operation; a build without it answers an error). */
    struct json_object *reply = call(c, command("x-debug-fault-query", NULL));
    struct json_object *v, *armed;
    if (json_object_object_get_ex(reply, "return", &v) &&
        json_object_object_get_ex(v, "armed", &armed))
        json_object_object_add(all, "fault-armed", json_object_get(armed));
    else
        FUZZ_CHECK(json_object_object_get_ex(reply, "error", NULL));
    json_object_put(reply);
    char *s = strdup(json_object_to_json_string_ext(all,
                                                   JSON_C_TO_STRING_PLAIN));
    json_object_put(all);
    if (!s)
        abort();
    return s;
}

/* ---- set-up and tear-down ---- */

static void setup_co(struct coro *co, void *arg)
{
    (void)arg;
    mem_export_add_co(g.srv, co, &g.store, "mem", "mem", true, NULL);
}

static void img_create_co(struct coro *co, void *arg)
{
    (void)arg;
    struct error *err = NULL;
    if (qcow2_create_co(g.l, co, IMG_PATH, EXPORT_BYTES, NULL, NULL,
                        &err) < 0) {
        fprintf(stderr, "qcow2_create_co: %s\n", err ? err->msg : "?");
        abort();
    }
}

/* Makes the image and adds node and export "img" through c, as a user
 * would. */
static void img_add(struct client *c)
{
    if (loop_run_sync(g.l, img_create_co, NULL) < 0)
        abort();
    struct json_object *file = json_object_new_object();
    json_object_object_add(file, "driver", json_object_new_string("file"));
    json_object_object_add(file, "filename", json_object_new_string(IMG_PATH));
    struct json_object *a = arg1("driver", "qcow2");
    json_object_object_add(a, "node-name", json_object_new_string("img"));
    json_object_object_add(a, "file", file);
    struct json_object *reply;
    query(c, "blockdev-add", a, &reply);
    json_object_put(reply);
    a = arg1("type", "nbd");
    json_object_object_add(a, "id", json_object_new_string("img"));
    json_object_object_add(a, "node-name", json_object_new_string("img"));
    json_object_object_add(a, "name", json_object_new_string("img"));
    json_object_object_add(a, "writable", json_object_new_boolean(1));
    query(c, "block-export-add", a, &reply);
    json_object_put(reply);
    FUZZ_CHECK(g.srv->n_bdevs == 2 && g.srv->n_exports == 2);
    g.img_bd = g.srv->bdevs[1];
    g.img_root = g.img_bd->root;
    g.img_exp = g.srv->exports[1];
    FUZZ_CHECK(!strcmp(g.img_bd->node_name, "img") &&
               g.img_exp->bdev == g.img_bd);
    struct stat st;
    FUZZ_CHECK(stat(IMG_PATH, &st) == 0);
    g.img_mtime = st.st_mtim;
    g.img_size = st.st_size;
}

/* Node and export "mem" over the store, as stratad's start-up adds its
 * exports. */
static void mem_add(void)
{
    if (loop_run_sync(g.l, setup_co, NULL) < 0)
        abort();
    FUZZ_CHECK(g.srv->n_bdevs == 1 && g.srv->n_exports == 1);
    g.bd = g.srv->bdevs[0];
    g.root = g.bd->root;
    g.exp = g.srv->exports[0];
}

static void hook_changed(struct server_change_hook *h)
{
    (void)h;
    g.ctl_hook->changed(g.ctl_hook);
}

static int hook_sync_co(struct server_change_hook *h, struct coro *co)
{
    (void)h;
    return g.ctl_hook->sync_co(g.ctl_hook, co);
}

static void hook_export_deleted(struct server_change_hook *h, const char *id)
{
    (void)h;
    g.mem_deleted |= !strcmp(id, "mem");
    g.img_deleted |= !strcmp(id, "img");
    g.ctl_hook->export_deleted(g.ctl_hook, id);
}

static void setup(void)
{
    if (!g.zeros && !(g.zeros = calloc(1, EXPORT_BYTES)))
        abort();
    mem_store_load(&g.store, g.zeros, EXPORT_BYTES, EXPORT_BYTES);
    char *msg = NULL;
    g.l = loop_new(64, 256 << 10, &msg);
    if (!g.l) {
        fprintf(stderr, "loop_new: %s\n", msg ? msg : "?");
        abort();
    }
    struct server_config cfg;
    server_config_defaults(&cfg);
    g.srv = server_new(g.l, &cfg);
    struct tls_options to = {.mode = TLS_MODE_OFF};
    struct error *err = NULL;
    if (!g.srv || tls_server_new(&to, &g.tls, &err) < 0)
        abort();
    g.srv->tls = g.tls;
    g.srv->allow_no_exports = true;
    g.ctl = control_new(g.srv, ctl_path, 0600, (gid_t)-1, NULL, &err);
    if (!g.ctl) {
        fprintf(stderr, "control_new: %s\n", err ? err->msg : "?");
        abort();
    }
    g.ctl_hook = g.srv->change_hook;
    g.hook.changed = hook_changed;
    g.hook.sync_co = hook_sync_co;
    g.hook.export_deleted = hook_export_deleted;
    g.srv->change_hook = &g.hook;
    g.mem_deleted = g.img_deleted = false;
    mem_add();
    struct client c;
    admin_open(&c);
    if (with_img)
        img_add(&c);
    char *s = snapshot_state(&c);
    admin_close(&c);
    struct stat st;
    FUZZ_CHECK(stat(FUZZ_QMP_WORK, &st) == 0);
    g.tmpfs_size = st.st_size;
    if (!g.initial)
        g.initial = s;
    else {
        /* a rebuilt server answers as the first one did */
        FUZZ_CHECK(!strcmp(s, g.initial));
        free(s);
    }
}

/* Shuts the server down as on SIGTERM ("quit" may have begun it) and
 * frees it. */
static void teardown(void)
{
    if (!g.srv)
        return;
    server_shutdown(g.srv);
    while (!loop_stopping(g.l))
        FUZZ_CHECK(loop_run_once(g.l) == 0);
    FUZZ_CHECK(g.srv->conns == NULL && g.srv->holds == 0);
    g.srv->change_hook = g.ctl_hook;
    control_free(g.ctl);
    server_free(g.srv);
    tls_server_free(g.tls);
    loop_free(g.l);
    g.ctl = NULL;
    g.srv = NULL;
    g.tls = NULL;
    g.l = NULL;
}

static void teardown_at_exit(void)
{
    teardown();
    mem_store_fini(&g.store);
    free(g.zeros);
    free(g.initial);
    free(g.bufs[0].buf);
    free(g.bufs[1].buf);
    if (verbose)
        fprintf(stderr, "fuzz-qmp-dispatch: %lu inputs, %lu resets, %lu "
                "rebuilds\n", g.inputs, g.resets, g.rebuilds);
}

/* ---- the state between inputs ---- */

/* Files in the tmpfs besides the control socket and (unless all) the
 * image: unlinked if rm. */
static bool tmpfs_extra(bool rm, bool all)
{
    /* The size of a tmpfs directory grows with each entry: unchanged
     * since the set-up, no file was made (commands make files; none
     * removes one), so there is nothing to look for, whether or not the
     * fixture's image counts (it is there after the set-up when it is
     * made; without it, a file of that name would change the size). */
    struct stat st;
    if (!rm && stat(FUZZ_QMP_WORK, &st) == 0 && st.st_size == g.tmpfs_size)
        return false;
    DIR *d = opendir(FUZZ_QMP_WORK);
    FUZZ_CHECK(d != NULL);
    bool found = false;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..") ||
            !strcmp(de->d_name, ctl_name))
            continue;
        /* other processes' sockets (-merge, a fork), and libFuzzer's
         * temporary files, are theirs */
        if ((!strncmp(de->d_name, "ctl-", 4) && de->d_type == DT_SOCK) ||
            !strncmp(de->d_name, "libFuzzerTemp", 13))
            continue;
        if (!all && !strcmp(de->d_name, IMG_FILE))
            continue;
        found = true;
        if (rm)
            FUZZ_CHECK(unlinkat(dirfd(d), de->d_name, 0) == 0 ||
                       (errno == EISDIR &&
                        unlinkat(dirfd(d), de->d_name, AT_REMOVEDIR) == 0));
    }
    closedir(d);
    return found;
}

/* An export as made: idle, never quiesced. */
static bool export_clean(const struct export *e, const struct blockdev *bd)
{
    return e->bdev == bd && e->quiesce_count == 0 && e->inflight == 0 &&
           e->watching == 0 && e->n_quiesces == 0 && e->max_stall_ns == 0 &&
           e->max_request_stall_ns == 0;
}

/* "img" as made: its node (the same chain, no bitmap), its export, its
 * file unchanged. */
static bool img_intact(void)
{
    bool bd = false, exp = false;
    for (size_t i = 0; i < g.srv->n_bdevs; i++)
        bd |= g.srv->bdevs[i] == g.img_bd;
    for (size_t i = 0; i < g.srv->n_exports; i++)
        exp |= g.srv->exports[i] == g.img_exp;
    struct stat st;
    return bd && exp && !g.img_deleted && g.img_root &&
           g.img_bd->root == g.img_root &&
           !g.img_root->bitmaps && export_clean(g.img_exp, g.img_bd) &&
           stat(IMG_PATH, &st) == 0 && st.st_size == g.img_size &&
           st.st_mtim.tv_sec == g.img_mtime.tv_sec &&
           st.st_mtim.tv_nsec == g.img_mtime.tv_nsec;
}

/* The server is as the set-up left it (read from its structures). */
static bool state_clean(void)
{
    struct backend_fault_stats fs;
    backend_fault_get_stats(&fs);
    size_t n = with_img ? 2 : 1;
    return !g.srv->shutting_down && g.srv->n_bdevs == n &&
           !g.mem_deleted && g.srv->bdevs[0] == g.bd &&
           g.bd->root == g.root &&
           !g.root->bitmaps && g.srv->n_exports == n &&
           g.srv->exports[0] == g.exp && export_clean(g.exp, g.bd) &&
           (!with_img || (g.srv->bdevs[1] == g.img_bd &&
                          g.srv->exports[1] == g.img_exp && img_intact())) &&
           !job_first(control_jobs(g.ctl)) && !g.ctl->backups &&
           !g.ctl->clients && !g.srv->conns && g.srv->holds == 0 &&
           !fs.armed && g.store.written_lo == g.store.written_hi &&
           !tmpfs_extra(false, !with_img);
}

/* Is the fixture itself ("mem": its node, chain and export) as set up?
 * If not, only a new server brings it back. */
static bool fixture_intact(void)
{
    bool bd = false;
    for (size_t i = 0; i < g.srv->n_bdevs; i++)
        bd |= g.srv->bdevs[i] == g.bd;
    bool exp = false;
    for (size_t i = 0; i < g.srv->n_exports; i++)
        exp |= g.srv->exports[i] == g.exp;
    return !g.srv->shutting_down && !loop_stopping(g.l) && bd && exp &&
           !g.mem_deleted &&
           g.bd->root == g.root && g.exp->bdev == g.bd;
}

static const char *str_member(struct json_object *o, const char *key)
{
    struct json_object *v;
    return json_object_object_get_ex(o, key, &v) ? json_object_get_string(v)
                                                 : NULL;
}

/* Ends every job: cancelled, finalized, dismissed.  Returns once none is
 * left (bounded: a job that never ends is a finding). */
static void reset_jobs(struct client *c)
{
    for (unsigned round = 0;; round++) {
        struct json_object *reply;
        struct json_object *jobs = query(c, "query-jobs", NULL, &reply);
        size_t n = json_object_array_length(jobs);
        if (n == 0) {
            json_object_put(reply);
            return;
        }
        if (round >= RESET_ROUNDS) {
            fprintf(stderr, "fuzz-qmp-dispatch: jobs do not end: %s\n",
                    json_object_to_json_string(jobs));
            FUZZ_CHECK(!"every job ends once cancelled");
        }
        for (size_t i = 0; i < n; i++) {
            struct json_object *j = json_object_array_get_idx(jobs, i);
            const char *id = str_member(j, "id");
            const char *st = str_member(j, "status");
            if (!id || !st)
                FUZZ_CHECK(!"query-jobs names each job and its status");
            if (!strcmp(st, "concluded"))
                try(c, "job-dismiss", arg1("id", id));
            else if (!strcmp(st, "pending"))
                try(c, "job-finalize", arg1("id", id));
            else if (strcmp(st, "aborting") && strcmp(st, "waiting")) {
                struct json_object *a = arg1("device", id);
                json_object_object_add(a, "force", json_object_new_boolean(1));
                try(c, "block-job-cancel", a);
            }
        }
        json_object_put(reply);
        /* let them move */
        FUZZ_CHECK(loop_run_once(g.l) == 0);
        client_pump(c);
    }
}

/* Deletes every export but "mem", and removes every bitmap. */
/* Is node or export name one the reset keeps? */
static bool kept(const char *name, bool keep_mem, bool keep_img)
{
    return (keep_mem && !strcmp(name, "mem")) ||
           (keep_img && !strcmp(name, "img"));
}

static void reset_exports_bitmaps(struct client *c, bool keep_mem,
                                  bool keep_img)
{
    struct json_object *reply;
    struct json_object *exps = query(c, "query-block-exports", NULL, &reply);
    for (size_t i = 0; i < json_object_array_length(exps); i++) {
        const char *id = str_member(json_object_array_get_idx(exps, i), "id");
        if (id && !kept(id, keep_mem, keep_img)) {
            struct json_object *a = arg1("id", id);
            json_object_object_add(a, "mode", json_object_new_string("hard"));
            try(c, "block-export-del", a);
        }
    }
    json_object_put(reply);
    struct json_object *args = json_object_new_object();
    json_object_object_add(args, "flat", json_object_new_boolean(1));
    struct json_object *nodes = query(c, "query-named-block-nodes", args,
                                      &reply);
    for (size_t i = 0; i < json_object_array_length(nodes); i++) {
        struct json_object *n = json_object_array_get_idx(nodes, i);
        const char *node = str_member(n, "node-name");
        struct json_object *bms;
        if (!node || !json_object_object_get_ex(n, "dirty-bitmaps", &bms))
            continue;
        for (size_t k = 0; k < json_object_array_length(bms); k++) {
            const char *name = str_member(json_object_array_get_idx(bms, k),
                                          "name");
            if (!name)
                continue;
            struct json_object *a = arg1("node", node);
            json_object_object_add(a, "name", json_object_new_string(name));
            try(c, "block-dirty-bitmap-remove", a);
        }
    }
    json_object_put(reply);
}

/* Deletes every node but "mem", users before what they use. */
static void reset_nodes(struct client *c, bool keep_mem, bool keep_img)
{
    for (;;) {
        struct json_object *reply;
        struct json_object *args = json_object_new_object();
        json_object_object_add(args, "flat", json_object_new_boolean(1));
        struct json_object *nodes = query(c, "query-named-block-nodes", args,
                                          &reply);
        size_t before = g.srv->n_bdevs;
        for (size_t i = 0; i < json_object_array_length(nodes); i++) {
            const char *node = str_member(json_object_array_get_idx(nodes, i),
                                          "node-name");
            if (node && !kept(node, keep_mem, keep_img))
                try(c, "blockdev-del", arg1("node-name", node));
        }
        json_object_put(reply);
        if (g.srv->n_bdevs == before)
            return;
    }
}

static void rebuild(void)
{
    g.rebuilds++;
    if (verbose)
        fprintf(stderr, "reset: a new server\n");
    teardown();
    tmpfs_extra(true, true);
    (void)backend_fault_arm(&(struct backend_fault_plan){.nth = 0});
}

/* Brings the server back to its state after set-up (see the top). */
static void reset(void)
{
    if (loop_stopping(g.l) || g.srv->shutting_down) {
        rebuild();
        return;
    }
    if (state_clean())
        return;
    g.resets++;
    struct client c;
    admin_open(&c);
    reset_jobs(&c);
    /* "mem" and "img" untouched (the same node, chain and export, no
     * bitmap; img's file unchanged) are kept; otherwise they are deleted
     * with the rest and made again, in the order of the set-up. */
    bool keep_mem = fixture_intact();
    bool keep_img = with_img && keep_mem && img_intact();
    reset_exports_bitmaps(&c, keep_mem, keep_img);
    reset_nodes(&c, keep_mem, keep_img);
    struct backend_fault_stats fs;
    backend_fault_get_stats(&fs);
    if (fs.armed) {
        struct json_object *a = json_object_new_object();
        json_object_object_add(a, "nth", json_object_new_int(0));
        try(&c, "x-debug-fault-inject", a);
    }
    if (loop_stopping(g.l) || g.srv->shutting_down) {
        admin_close(&c);
        rebuild();
        return;
    }
    if (!keep_mem) {
        /* Everything deleted: what no command removes is a finding. */
        if (g.srv->n_bdevs || g.srv->n_exports)
            fprintf(stderr, "fuzz-qmp-dispatch: %zu nodes, %zu exports left "
                    "(%s)\n", g.srv->n_bdevs, g.srv->n_exports,
                    g.srv->n_bdevs ? g.srv->bdevs[0]->node_name : "");
        FUZZ_CHECK(g.srv->n_bdevs == 0 && g.srv->n_exports == 0);
        mem_store_clear_written(&g.store);
        mem_add();
    }
    tmpfs_extra(true, !keep_img);
    if (with_img && !keep_img)
        img_add(&c);
    g.mem_deleted = g.img_deleted = false;
    /* The export's quiesce statistics (query-block-exports) count what
     * happened to it; no command clears them, and every input must see
     * the same answers. */
    g.exp->n_quiesces = 0;
    g.exp->last_stall_ns = g.exp->max_stall_ns = 0;
    g.exp->last_request_stall_ns = g.exp->max_request_stall_ns = 0;
    char *s = snapshot_state(&c);
    admin_close(&c);
    mem_store_clear_written(&g.store);
    if (strcmp(s, g.initial)) {
        fprintf(stderr, "fuzz-qmp-dispatch: state left after the reset:\n"
                "  %s\ninstead of\n  %s\n", s, g.initial);
        FUZZ_CHECK(!"the reset restores the initial state");
    }
    free(s);
    FUZZ_CHECK(state_clean());
}

/* ---- libFuzzer ---- */

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    ctl_path = fuzz_qmp_sandbox(*argc, *argv, "fuzz-qmp-dispatch");
    ctl_name = strrchr(ctl_path, '/') + 1;
    verbose = getenv("FUZZ_VERBOSE") != NULL;
    with_img = getenv("FUZZ_QMP_IMG") && !strcmp(getenv("FUZZ_QMP_IMG"), "1");
    log_set_level(LOG_ERROR); /* a client's every mistake is logged */
    atexit(teardown_at_exit);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!g.srv)
        setup();
    g.inputs++;
    struct client c;
    client_open(&c, 0);
    c.in = data;
    c.in_len = size;
    client_run_to_end(&c);
    FUZZ_CHECK(c.out_len <= MAX_OUT);
    /* The server closes the connection once the input has ended; it
     * closes it before it stops, after a quit too. */
    FUZZ_CHECK(c.eof);
    while (g.ctl->clients && !loop_stopping(g.l))
        FUZZ_CHECK(loop_run_once(g.l) == 0);
    if (verbose) /* what the server answered */
        fprintf(stderr, "%s", c.out);
    fuzz_qmp_check_output(c.out, c.out_len);
    client_close(&c);
    reset();
    return 0;
}
