/* strata — the command-line client of stratad's control socket (QMP),
 * and of images on disk.
 *
 * A plain blocking client: connect, read the greeting, negotiate, run one
 * or a few commands, print the result for humans (or raw JSON with
 * --json), exit 0 on success and 1 with the daemon's message on failure
 * (2 for usage errors and an unreachable socket).  create and info FILE
 * need no daemon: they drive the formats library on a loop of their own.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>

#include "backend.h"
#include "format.h"
#include "log.h"
#include "loop.h"
#include "qcow2.h"
#include "strata-config.h"

#define DEFAULT_SOCKET "/run/strata/control.sock"

static bool opt_json;
static const char *sock_path;

struct qmp {
    int fd;
    char *buf;
    size_t len, cap;
    struct json_object **events;   /* received while waiting for a reply */
    size_t n_events, cap_events;
};

static void die(int code, const char *fmt, ...)
    __attribute__((format(printf, 2, 3), noreturn));
static void die(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("strata: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(code);
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* Reads one message (a CRLF-terminated line); NULL on timeout (ms >= 0). */
static struct json_object *qmp_read(struct qmp *q, int timeout_ms)
{
    uint64_t deadline = timeout_ms >= 0 ? now_ms() + (uint64_t)timeout_ms : 0;
    for (;;) {
        char *nl = q->len ? memchr(q->buf, '\n', q->len) : NULL;
        if (nl) {
            size_t n = (size_t)(nl - q->buf) + 1;
            *nl = '\0';
            struct json_object *o = json_tokener_parse(q->buf);
            memmove(q->buf, q->buf + n, q->len - n);
            q->len -= n;
            if (!o)
                die(1, "the daemon sent something that is not JSON");
            return o;
        }
        if (timeout_ms >= 0) {
            uint64_t t = now_ms();
            if (t >= deadline)
                return NULL;
            struct pollfd p = {.fd = q->fd, .events = POLLIN};
            int r = poll(&p, 1, (int)(deadline - t));
            if (r == 0)
                return NULL;
            if (r < 0 && errno != EINTR)
                die(1, "poll: %s", strerror(errno));
            if (r < 0)
                continue;
        }
        if (q->cap - q->len < 65536) {
            q->cap = q->cap ? q->cap * 2 : 131072;
            q->buf = realloc(q->buf, q->cap);
            if (!q->buf)
                die(1, "out of memory");
        }
        ssize_t r = read(q->fd, q->buf + q->len, q->cap - q->len - 1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            die(1, "the daemon closed the control connection%s%s",
                r < 0 ? ": " : "", r < 0 ? strerror(errno) : "");
        q->len += (size_t)r;
    }
}

static void qmp_write(struct qmp *q, struct json_object *msg)
{
    const char *text = json_object_to_json_string_ext(msg, JSON_C_TO_STRING_PLAIN);
    char *line = NULL;
    if (asprintf(&line, "%s\n", text) < 0)
        die(1, "out of memory");
    const char *s = line;
    size_t len = strlen(s);
    while (len) {
        ssize_t w = write(q->fd, s, len);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            die(1, "sending to the daemon: %s", strerror(errno));
        s += w;
        len -= (size_t)w;
    }
    free(line);
}

static void queue_event(struct qmp *q, struct json_object *ev)
{
    if (q->n_events == q->cap_events) {
        q->cap_events = q->cap_events ? q->cap_events * 2 : 16;
        q->events = realloc(q->events, q->cap_events * sizeof(*q->events));
        if (!q->events)
            die(1, "out of memory");
    }
    q->events[q->n_events++] = ev;
}

/* Runs a command; returns its "return" (owned by the caller), or NULL with
 * *err set to the error object (owned by the caller). */
static struct json_object *qmp_try(struct qmp *q, const char *cmd,
                                   struct json_object *args,
                                   struct json_object **err)
{
    static int64_t next_id = 1;
    int64_t id = next_id++;
    struct json_object *m = json_object_new_object();
    json_object_object_add(m, "execute", json_object_new_string(cmd));
    if (args)
        json_object_object_add(m, "arguments", args);
    json_object_object_add(m, "id", json_object_new_int64(id));
    qmp_write(q, m);
    json_object_put(m);
    for (;;) {
        struct json_object *r = qmp_read(q, -1), *v;
        if (json_object_object_get_ex(r, "event", NULL)) {
            queue_event(q, r);
            continue;
        }
        if (!json_object_object_get_ex(r, "id", &v) || json_object_get_int64(v) != id) {
            json_object_put(r);
            continue;
        }
        if (json_object_object_get_ex(r, "return", &v)) {
            json_object_get(v);
            json_object_put(r);
            *err = NULL;
            return v;
        }
        if (json_object_object_get_ex(r, "error", &v))
            json_object_get(v);
        else
            v = json_object_new_object();
        json_object_put(r);
        *err = v;
        return NULL;
    }
}

static const char *error_desc(struct json_object *err)
{
    struct json_object *d;
    if (json_object_object_get_ex(err, "desc", &d))
        return json_object_get_string(d);
    return "unknown error";
}

/* Runs a command; on failure prints the daemon's message and exits 1. */
static struct json_object *qmp_run(struct qmp *q, const char *cmd,
                                   struct json_object *args)
{
    struct json_object *err;
    struct json_object *r = qmp_try(q, cmd, args, &err);
    if (!r) {
        if (opt_json)
            printf("%s\n", json_object_to_json_string_ext(err, JSON_C_TO_STRING_PRETTY));
        die(1, "%s: %s", cmd, error_desc(err));
    }
    return r;
}

static void qmp_connect(struct qmp *q)
{
    struct sockaddr_un sun;
    memset(q, 0, sizeof(*q));
    if (strlen(sock_path) >= sizeof(sun.sun_path))
        die(2, "%s: socket path too long", sock_path);
    memset(&sun, 0, sizeof(sun));
    sun.sun_family = AF_UNIX;
    strcpy(sun.sun_path, sock_path);
    q->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (q->fd < 0)
        die(2, "socket: %s", strerror(errno));
    if (connect(q->fd, (struct sockaddr *)&sun, sizeof(sun)) < 0) {
        int e = errno;
        die(2, "cannot connect to %s: %s%s", sock_path, strerror(e),
            (e == ENOENT || e == ECONNREFUSED)
                ? " (is stratad running with --control? use --socket PATH or "
                  "$STRATA_SOCKET)" : "");
    }
    struct json_object *g = qmp_read(q, 10000);
    if (!g || !json_object_object_get_ex(g, "QMP", NULL))
        die(1, "%s: no QMP greeting: is this a stratad control socket?", sock_path);
    json_object_put(g);
    json_object_put(qmp_run(q, "qmp_capabilities", NULL));
}

/* ---- helpers for output ---- */

static const char *jstr(struct json_object *o, const char *key)
{
    struct json_object *v;
    if (!json_object_object_get_ex(o, key, &v))
        return NULL;
    return json_object_get_string(v);
}

static int64_t jint(struct json_object *o, const char *key)
{
    struct json_object *v;
    return json_object_object_get_ex(o, key, &v) ? json_object_get_int64(v) : 0;
}

static bool jbool(struct json_object *o, const char *key)
{
    struct json_object *v;
    return json_object_object_get_ex(o, key, &v) && json_object_get_boolean(v);
}

static const char *human_size(uint64_t n, char *buf, size_t len)
{
    static const char *const units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
    double v = (double)n;
    unsigned u = 0;
    while (v >= 1024 && u < 5) {
        v /= 1024;
        u++;
    }
    if (u == 0)
        snprintf(buf, len, "%llu B", (unsigned long long)n);
    else
        snprintf(buf, len, "%.1f %s", v, units[u]);
    return buf;
}

static void print_json(struct json_object *o)
{
    printf("%s\n", json_object_to_json_string_ext(o, JSON_C_TO_STRING_PRETTY |
                                                  JSON_C_TO_STRING_NOSLASHESCAPE));
}

/* A path from the working directory made absolute (the daemon has its
 * own); rbd: specs name images, not paths, and stay as they are. */
static char *abs_path(const char *p)
{
    char *r = NULL;
    if (p[0] == '/' || strncmp(p, "rbd:", 4) == 0)
        return strdup(p);
    char cwd[PATH_MAX];
    if (!getcwd(cwd, sizeof(cwd)))
        die(1, "getcwd: %s", strerror(errno));
    if (asprintf(&r, "%s/%s", cwd, p) < 0)
        die(1, "out of memory");
    return r;
}

/* Finds an export by id or NBD name; returns a new reference. */
static struct json_object *find_export(struct qmp *q, const char *key)
{
    struct json_object *list = qmp_run(q, "query-block-exports", NULL);
    struct json_object *found = NULL;
    for (size_t i = 0; i < json_object_array_length(list); i++) {
        struct json_object *e = json_object_array_get_idx(list, i);
        const char *id = jstr(e, "id"), *name = jstr(e, "name");
        if ((id && !strcmp(id, key)) || (!found && name && !strcmp(name, key)))
            found = e;
    }
    if (!found)
        die(1, "no export with id or name '%s'", key);
    json_object_get(found);
    json_object_put(list);
    return found;
}

/* ---- commands ---- */

static int cmd_version(struct qmp *q)
{
    struct json_object *r = qmp_run(q, "query-version", NULL);
    if (opt_json) {
        print_json(r);
    } else {
        printf("strata CLI %s\n", STRATA_VERSION);
        printf("daemon: %s\n", jstr(r, "package"));
    }
    json_object_put(r);
    return 0;
}

static int cmd_exports(struct qmp *q)
{
    struct json_object *r = qmp_run(q, "query-block-exports", NULL);
    if (opt_json) {
        print_json(r);
        json_object_put(r);
        return 0;
    }
    size_t n = json_object_array_length(r);
    if (n == 0) {
        printf("no exports\n");
        json_object_put(r);
        return 0;
    }
    printf("%-16s %-16s %-16s %-6s %10s %-3s %7s  %s\n", "ID", "NAME", "NODE",
           "FORMAT", "SIZE", "RW", "CLIENTS", "TOP FILE");
    for (size_t i = 0; i < n; i++) {
        struct json_object *e = json_object_array_get_idx(r, i);
        char sz[32];
        const char *name = jstr(e, "name");
        printf("%-16s %-16s %-16s %-6s %10s %-3s %7lld  %s\n", jstr(e, "id"),
               name && *name ? name : "(default)", jstr(e, "node-name"),
               jstr(e, "format"), human_size((uint64_t)jint(e, "virtual-size"), sz, sizeof(sz)),
               jbool(e, "writable") ? "rw" : "ro", (long long)jint(e, "clients"),
               jstr(e, "file"));
    }
    json_object_put(r);
    return 0;
}

static int cmd_chain(struct qmp *q, const char *key)
{
    struct json_object *e = find_export(q, key);
    const char *node = jstr(e, "node-name");
    struct json_object *nodes = qmp_run(q, "query-named-block-nodes", NULL);
    struct json_object *chain = json_object_new_array();
    /* the export's node, then its backing nodes by backing-node-name */
    char *want = strdup(node);
    while (want) {
        struct json_object *hit = NULL;
        for (size_t i = 0; i < json_object_array_length(nodes); i++) {
            struct json_object *n = json_object_array_get_idx(nodes, i);
            if (!strcmp(jstr(n, "node-name"), want))
                hit = n;
        }
        free(want);
        want = NULL;
        if (!hit)
            break;
        json_object_array_add(chain, json_object_get(hit));
        const char *b = jstr(hit, "backing-node-name");
        if (b)
            want = strdup(b);
    }
    if (opt_json) {
        print_json(chain);
    } else {
        printf("export %s (%s)\n", jstr(e, "id"), jstr(e, "name"));
        size_t n = json_object_array_length(chain);
        for (size_t i = 0; i < n; i++) {
            struct json_object *x = json_object_array_get_idx(chain, i), *img;
            char sz[32];
            uint64_t size = 0;
            if (json_object_object_get_ex(x, "image", &img))
                size = (uint64_t)jint(img, "virtual-size");
            printf("%*s%s%s  %s, %s, %s%s  %s\n", (int)(i * 3), "",
                   i ? "\u2514\u2500 " : "", jstr(x, "node-name"), jstr(x, "drv"),
                   human_size(size, sz, sizeof(sz)),
                   jbool(x, "ro") ? "read-only" : "read-write",
                   i == 0 ? " (top)" : i + 1 == n ? " (base)" : "",
                   jstr(x, "file"));
        }
    }
    json_object_put(chain);
    json_object_put(nodes);
    json_object_put(e);
    return 0;
}

static void print_job_line(struct json_object *j)
{
    char cur[32], tot[32], spd[32];
    int64_t len = jint(j, "len"), off = jint(j, "offset");
    int pct = len > 0 ? (int)(off * 100 / len) : 0;
    int64_t speed = jint(j, "speed");
    if (speed)
        snprintf(spd, sizeof(spd), "%s/s", human_size((uint64_t)speed, cur, sizeof(cur)));
    else
        snprintf(spd, sizeof(spd), "unlimited");
    printf("%-16s %-8s %-10s %3d%%  %10s / %-10s %-12s %s%s\n", jstr(j, "device"),
           jstr(j, "type"), jstr(j, "status"), pct,
           human_size((uint64_t)off, cur, sizeof(cur)),
           human_size((uint64_t)len, tot, sizeof(tot)), spd,
           jstr(j, "export") ? jstr(j, "export") : "-",
           jstr(j, "error") ? "  error: " : "");
    if (jstr(j, "error"))
        printf("    %s\n", jstr(j, "error"));
}

static int cmd_jobs(struct qmp *q)
{
    struct json_object *r = qmp_run(q, "query-block-jobs", NULL);
    if (opt_json) {
        print_json(r);
    } else if (json_object_array_length(r) == 0) {
        printf("no jobs\n");
    } else {
        printf("%-16s %-8s %-10s %4s  %23s %-12s %s\n", "ID", "TYPE", "STATUS",
               "DONE", "PROGRESS", "SPEED", "EXPORT");
        for (size_t i = 0; i < json_object_array_length(r); i++)
            print_job_line(json_object_array_get_idx(r, i));
    }
    json_object_put(r);
    return 0;
}

static int cmd_job(struct qmp *q, const char *verb, const char *id)
{
    static const char *const verbs[][2] = {
        {"pause", "job-pause"},       {"resume", "job-resume"},
        {"cancel", "job-cancel"},     {"complete", "job-complete"},
        {"dismiss", "job-dismiss"},   {"finalize", "job-finalize"},
    };
    for (size_t i = 0; i < sizeof(verbs) / sizeof(verbs[0]); i++) {
        if (!strcmp(verb, verbs[i][0])) {
            struct json_object *a = json_object_new_object();
            json_object_object_add(a, "id", json_object_new_string(id));
            struct json_object *r = qmp_run(q, verbs[i][1], a);
            if (opt_json)
                print_json(r);
            else
                printf("job %s: %s requested\n", id, verb);
            json_object_put(r);
            return 0;
        }
    }
    die(2, "job: unknown action '%s' (pause, resume, cancel, complete, "
        "dismiss, finalize)", verb);
}

static bool id_ok(const char *s)
{
    if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z')))
        return false;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') ||
              (*s >= '0' && *s <= '9') || *s == '-' || *s == '.' || *s == '_'))
            return false;
    return true;
}

static int cmd_add_export(struct qmp *q, const char *name, const char *file,
                          const char *format, bool readonly, bool direct,
                          const char *desc, const char *id, const char *node)
{
    if (!id) {
        if (!id_ok(name))
            die(2, "add-export: '%s' cannot be an export id: give --id ID", name);
        id = name;
    }
    if (!node)
        node = id;
    char *path = abs_path(file);
    struct json_object *f = json_object_new_object();
    json_object_object_add(f, "driver", json_object_new_string("file"));
    json_object_object_add(f, "filename", json_object_new_string(path));
    struct json_object *a = json_object_new_object();
    json_object_object_add(a, "driver", json_object_new_string(format));
    json_object_object_add(a, "node-name", json_object_new_string(node));
    json_object_object_add(a, "file", f);
    json_object_object_add(a, "read-only", json_object_new_boolean(readonly));
    if (direct) {
        struct json_object *c = json_object_new_object();
        json_object_object_add(c, "direct", json_object_new_boolean(true));
        json_object_object_add(a, "cache", c);
    }
    json_object_put(qmp_run(q, "blockdev-add", a));
    a = json_object_new_object();
    json_object_object_add(a, "type", json_object_new_string("nbd"));
    json_object_object_add(a, "id", json_object_new_string(id));
    json_object_object_add(a, "node-name", json_object_new_string(node));
    json_object_object_add(a, "name", json_object_new_string(name));
    json_object_object_add(a, "writable", json_object_new_boolean(!readonly));
    if (desc)
        json_object_object_add(a, "description", json_object_new_string(desc));
    struct json_object *err;
    struct json_object *r = qmp_try(q, "block-export-add", a, &err);
    if (!r) {
        /* roll the node back: all or nothing */
        struct json_object *d = json_object_new_object();
        json_object_object_add(d, "node-name", json_object_new_string(node));
        struct json_object *e2;
        json_object_put(qmp_try(q, "blockdev-del", d, &e2));
        json_object_put(e2);
        die(1, "block-export-add: %s", error_desc(err));
    }
    json_object_put(r);
    if (opt_json) {
        struct json_object *e = find_export(q, id);
        print_json(e);
        json_object_put(e);
    } else {
        printf("export %s: '%s' serves %s (%s, %s)\n", id, name, path, format,
               readonly ? "read-only" : "read-write");
    }
    free(path);
    return 0;
}

/* Waits for an event matching name (and data.key == val); NULL on timeout. */
static struct json_object *wait_event(struct qmp *q, const char *name,
                                      const char *key, const char *val,
                                      int timeout_ms)
{
    uint64_t deadline = now_ms() + (uint64_t)timeout_ms;
    for (;;) {
        for (size_t i = 0; i < q->n_events; i++) {
            struct json_object *ev = q->events[i], *d;
            if (!strcmp(jstr(ev, "event"), name) &&
                (!key || (json_object_object_get_ex(ev, "data", &d) && jstr(d, key) &&
                          !strcmp(jstr(d, key), val)))) {
                memmove(&q->events[i], &q->events[i + 1],
                        (q->n_events - i - 1) * sizeof(*q->events));
                q->n_events--;
                return ev;
            }
        }
        uint64_t t = now_ms();
        if (t >= deadline)
            return NULL;
        struct json_object *m = qmp_read(q, (int)(deadline - t));
        if (!m)
            return NULL;
        if (json_object_object_get_ex(m, "event", NULL))
            queue_event(q, m);
        else
            json_object_put(m);
    }
}

static int cmd_del_export(struct qmp *q, const char *id, bool hard, bool keep_node)
{
    struct json_object *e = find_export(q, id);
    char *real_id = strdup(jstr(e, "id"));
    char *node = strdup(jstr(e, "node-name"));
    json_object_put(e);
    struct json_object *a = json_object_new_object();
    json_object_object_add(a, "id", json_object_new_string(real_id));
    json_object_object_add(a, "mode", json_object_new_string(hard ? "hard" : "safe"));
    json_object_put(qmp_run(q, "block-export-del", a));
    if (!keep_node) {
        /* the node is free once the export is really gone */
        struct json_object *ev = wait_event(q, "BLOCK_EXPORT_DELETED", "id", real_id, 30000);
        if (!ev)
            die(1, "export %s was deleted but did not go away within 30 s; "
                "node %s is kept", real_id, node);
        json_object_put(ev);
        a = json_object_new_object();
        json_object_object_add(a, "node-name", json_object_new_string(node));
        json_object_put(qmp_run(q, "blockdev-del", a));
    }
    if (opt_json)
        printf("{}\n");
    else
        printf("export %s deleted%s\n", real_id, keep_node ? "" : " (and its node)");
    free(real_id);
    free(node);
    return 0;
}

static int cmd_snapshot(struct qmp *q, const char *exp, const char *file,
                        const char *node, bool relative)
{
    struct json_object *e = find_export(q, exp);
    char *path = abs_path(file);
    struct json_object *a = json_object_new_object();
    json_object_object_add(a, "device", json_object_new_string(jstr(e, "id")));
    json_object_object_add(a, "snapshot-file", json_object_new_string(path));
    json_object_object_add(a, "format", json_object_new_string("qcow2"));
    if (node)
        json_object_object_add(a, "snapshot-node-name", json_object_new_string(node));
    if (relative) /* strata extension */
        json_object_object_add(a, "relative-backing", json_object_new_boolean(true));
    json_object_put(e);
    struct json_object *r = qmp_run(q, "blockdev-snapshot-sync", a);
    if (opt_json)
        print_json(r);
    else
        printf("snapshot taken: %s is the new top of %s (export stalled %.3f ms)\n",
               path, exp, jint(r, "stall-ns") / 1e6);
    json_object_put(r);
    free(path);
    return 0;
}

static void draw_bar(const char *id, const char *status, int64_t off, int64_t len)
{
    if (!isatty(2))
        return;
    char a[32], b[32];
    int width = 30;
    int fill = len > 0 ? (int)(off * width / len) : 0;
    char bar[64];
    for (int i = 0; i < width; i++)
        bar[i] = i < fill ? '#' : '-';
    bar[width] = '\0';
    fprintf(stderr, "\r%s [%s] %3d%%  %s / %s  %-10s", id, bar,
            len > 0 ? (int)(off * 100 / len) : 0,
            human_size((uint64_t)off, a, sizeof(a)),
            human_size((uint64_t)len, b, sizeof(b)), status);
    fflush(stderr);
}

/* Follows a job until it ends: progress bar from query-block-jobs,
 * completion on BLOCK_JOB_READY, result from the final event. */
static int wait_job(struct qmp *q, const char *id)
{
    bool completed = false;
    for (;;) {
        struct json_object *ev;
        while ((ev = wait_event(q, "BLOCK_JOB_READY", "device", id, 0))) {
            json_object_put(ev);
            if (!completed) {
                struct json_object *a = json_object_new_object();
                json_object_object_add(a, "id", json_object_new_string(id));
                json_object_put(qmp_run(q, "job-complete", a));
                completed = true;
            }
        }
        if ((ev = wait_event(q, "BLOCK_JOB_CANCELLED", "device", id, 0))) {
            if (isatty(2))
                fputc('\n', stderr);
            if (opt_json)
                print_json(ev);
            die(1, "job %s was cancelled", id);
        }
        if ((ev = wait_event(q, "BLOCK_JOB_COMPLETED", "device", id, 0))) {
            struct json_object *d;
            if (isatty(2))
                fputc('\n', stderr);
            if (opt_json)
                print_json(ev);
            if (json_object_object_get_ex(ev, "data", &d) && jstr(d, "error"))
                die(1, "job %s failed: %s", id, jstr(d, "error"));
            if (!opt_json)
                printf("job %s completed\n", id);
            json_object_put(ev);
            return 0;
        }
        struct json_object *jobs = qmp_run(q, "query-block-jobs", NULL);
        for (size_t i = 0; i < json_object_array_length(jobs); i++) {
            struct json_object *j = json_object_array_get_idx(jobs, i);
            if (!strcmp(jstr(j, "device"), id))
                draw_bar(id, jstr(j, "status"), jint(j, "offset"), jint(j, "len"));
        }
        json_object_put(jobs);
        /* sleep up to 200 ms, but wake for events */
        struct json_object *m = qmp_read(q, 200);
        if (m) {
            if (json_object_object_get_ex(m, "event", NULL))
                queue_event(q, m);
            else
                json_object_put(m);
        }
    }
}

static int cmd_commit(struct qmp *q, const char *exp, const char *top,
                      const char *base, long long speed, const char *job_id,
                      bool wait)
{
    struct json_object *e = find_export(q, exp);
    char id[160];
    if (job_id)
        snprintf(id, sizeof(id), "%s", job_id);
    else
        snprintf(id, sizeof(id), "commit-%s", jstr(e, "id"));
    struct json_object *a = json_object_new_object();
    json_object_object_add(a, "job-id", json_object_new_string(id));
    json_object_object_add(a, "device", json_object_new_string(jstr(e, "id")));
    json_object_put(e);
    if (top) {
        char *p = abs_path(top);
        json_object_object_add(a, "top", json_object_new_string(p));
        free(p);
    }
    if (base) {
        char *p = abs_path(base);
        json_object_object_add(a, "base", json_object_new_string(p));
        free(p);
    }
    if (speed > 0)
        json_object_object_add(a, "speed", json_object_new_int64(speed));
    json_object_put(qmp_run(q, "block-commit", a));
    if (!wait) {
        if (opt_json)
            printf("{\"job-id\": \"%s\"}\n", id);
        else
            printf("job %s started (follow it with: strata jobs)\n", id);
        return 0;
    }
    return wait_job(q, id);
}

/* ---- stats ---- */

/* Classes shown by `strata stats`: QEMU's BlockDeviceStats prefix, the
 * x_ prefix for strata's own classes, and a label. */
static const struct {
    const char *prefix;            /* rd, wr, flush, unmap, x_zero, ... */
    const char *hist;              /* its latency histogram member */
    const char *label;
} stats_classes[] = {
    {"rd", "rd_latency_histogram", "read"},
    {"wr", "wr_latency_histogram", "write"},
    {"flush", "flush_latency_histogram", "flush"},
    {"unmap", "x_unmap_latency_histogram", "trim"},
    {"x_zero", "x_zero_latency_histogram", "zero"},
    {"x_cache", "x_cache_latency_histogram", "cache"},
    {"x_block_status", "x_block_status_latency_histogram", "blkstatus"},
};

static int64_t stats_field(struct json_object *st, const char *prefix,
                           const char *what)
{
    char key[96];
    if (!strcmp(what, "failed") || !strcmp(what, "invalid")) {
        /* failed_rd_operations, x_failed_zero_operations */
        bool x = !strncmp(prefix, "x_", 2);
        snprintf(key, sizeof(key), "%s%s_%s_operations", x ? "x_" : "", what,
                 x ? prefix + 2 : prefix);
    } else {
        snprintf(key, sizeof(key), "%s_%s", prefix, what);
    }
    return jint(st, key);
}

/* The latency under which a fraction q of the requests finished: the
 * upper bound of the histogram bin where it falls (log2 bins: within a
 * factor of two). */
static uint64_t stats_quantile_ns(struct json_object *hist, double q)
{
    struct json_object *bounds, *bins;
    if (!hist || !json_object_object_get_ex(hist, "boundaries", &bounds) ||
        !json_object_object_get_ex(hist, "bins", &bins))
        return 0;
    size_t nb = json_object_array_length(bins);
    uint64_t total = 0;
    for (size_t i = 0; i < nb; i++)
        total += (uint64_t)json_object_get_int64(json_object_array_get_idx(bins, i));
    if (total == 0)
        return 0;
    uint64_t want = (uint64_t)(q * (double)total + 0.999999), cum = 0;
    size_t nbound = json_object_array_length(bounds);
    for (size_t i = 0; i < nb; i++) {
        cum += (uint64_t)json_object_get_int64(json_object_array_get_idx(bins, i));
        if (cum >= want)
            return i < nbound ? (uint64_t)json_object_get_int64(
                                    json_object_array_get_idx(bounds, i))
                              : UINT64_MAX;
    }
    return UINT64_MAX;
}

static const char *human_ns(uint64_t ns, char *buf, size_t len)
{
    if (ns == UINT64_MAX)
        snprintf(buf, len, "max");
    else if (ns < 1000)
        snprintf(buf, len, "%lluns", (unsigned long long)ns);
    else if (ns < 1000000)
        snprintf(buf, len, "%.1fus", (double)ns / 1e3);
    else if (ns < 1000000000)
        snprintf(buf, len, "%.1fms", (double)ns / 1e6);
    else
        snprintf(buf, len, "%.1fs", (double)ns / 1e9);
    return buf;
}

/* One table of the exports' stats; prev (the previous sample, or NULL)
 * and dt_s give the rates of --watch. */
static void stats_print(struct json_object *r, struct json_object *prev,
                        double dt_s)
{
    size_t n = json_object_array_length(r);
    if (n == 0) {
        printf("no exports\n");
        return;
    }
    for (size_t i = 0; i < n; i++) {
        struct json_object *e = json_object_array_get_idx(r, i), *st, *pst = NULL;
        if (!json_object_object_get_ex(e, "stats", &st))
            continue;
        for (size_t j = 0; prev && j < json_object_array_length(prev); j++) {
            struct json_object *pe = json_object_array_get_idx(prev, j);
            const char *pid = jstr(pe, "device");
            if (pid && !strcmp(pid, jstr(e, "device")))
                json_object_object_get_ex(pe, "stats", &pst);
        }
        const char *name = jstr(e, "x-export-name");
        printf("export %s (name %s, node %s): %lld client%s, %lld in flight\n",
               jstr(e, "device"), name && *name ? name : "(default)",
               jstr(e, "node-name"), (long long)jint(e, "x-clients"),
               jint(e, "x-clients") == 1 ? "" : "s",
               (long long)jint(st, "x_inflight"));
        printf("  %-9s %12s %10s %7s %7s %9s %9s %9s", "OP", "REQUESTS", "BYTES",
               "FAILED", "INVALID", "AVG", "P50<=", "P99<=");
        if (pst)
            printf(" %9s %11s", "REQ/S", "BYTES/S");
        printf("\n");
        for (size_t k = 0; k < sizeof(stats_classes) / sizeof(stats_classes[0]); k++) {
            const char *pf = stats_classes[k].prefix;
            int64_t ops = stats_field(st, pf, "operations");
            int64_t bytes = stats_field(st, pf, "bytes");
            int64_t tot = stats_field(st, pf, "total_time_ns");
            struct json_object *hist = NULL;
            json_object_object_get_ex(st, stats_classes[k].hist, &hist);
            char b1[32], b2[32], b3[32], b4[32], b5[32];
            printf("  %-9s %12lld %10s %7lld %7lld %9s %9s %9s",
                   stats_classes[k].label, (long long)ops,
                   human_size((uint64_t)bytes, b1, sizeof(b1)),
                   (long long)stats_field(st, pf, "failed"),
                   (long long)stats_field(st, pf, "invalid"),
                   ops ? human_ns((uint64_t)(tot / ops), b2, sizeof(b2)) : "-",
                   ops ? human_ns(stats_quantile_ns(hist, 0.5), b3, sizeof(b3)) : "-",
                   ops ? human_ns(stats_quantile_ns(hist, 0.99), b4, sizeof(b4)) : "-");
            if (pst && dt_s > 0) {
                double dops = (double)(ops - stats_field(pst, pf, "operations"));
                double dby = (double)(bytes - stats_field(pst, pf, "bytes"));
                printf(" %9.1f %9s/s", dops / dt_s,
                       human_size((uint64_t)(dby / dt_s), b5, sizeof(b5)));
            }
            printf("\n");
        }
        int64_t idle = jint(st, "idle_time_ns");
        char b[32];
        if (json_object_object_get_ex(st, "idle_time_ns", NULL))
            printf("  idle for %s\n", human_ns((uint64_t)idle, b, sizeof(b)));
    }
}

/* strata stats [EXPORT] [--watch]: query-blockstats, one export or all;
 * --watch samples every second with rates, until interrupted. */
static int cmd_stats(struct qmp *q, const char *exp, bool watch)
{
    struct json_object *prev = NULL;
    uint64_t prev_ms = 0;
    for (;;) {
        struct json_object *all = qmp_run(q, "query-blockstats", NULL);
        uint64_t t = now_ms();
        struct json_object *r = all;
        if (exp) {
            r = json_object_new_array();
            for (size_t i = 0; i < json_object_array_length(all); i++) {
                struct json_object *e = json_object_array_get_idx(all, i);
                const char *nm = jstr(e, "x-export-name");
                if (!strcmp(jstr(e, "device"), exp) || (nm && !strcmp(nm, exp)))
                    json_object_array_add(r, json_object_get(e));
            }
            json_object_put(all);
            if (json_object_array_length(r) == 0) {
                json_object_put(r);
                json_object_put(prev);
                die(1, "export '%s' not found", exp);
            }
        }
        if (opt_json) {
            /* one document per sample, one line each under --watch */
            printf("%s\n", json_object_to_json_string_ext(r, watch
                   ? JSON_C_TO_STRING_PLAIN : JSON_C_TO_STRING_PRETTY));
        } else {
            if (watch && isatty(STDOUT_FILENO))
                printf("\033[H\033[2J");
            stats_print(r, prev, prev ? (double)(t - prev_ms) / 1000.0 : 0);
            if (watch)
                printf("\n");
        }
        fflush(stdout);
        json_object_put(prev);
        prev = r;
        prev_ms = t;
        if (!watch)
            break;
        struct timespec ts = {1, 0};
        nanosleep(&ts, NULL);
    }
    json_object_put(prev);
    return 0;
}

/* ---- images: create and info (the formats library, no daemon) ---- */

#define IMG_LOOP_ENTRIES 64
#define IMG_CORO_STACK (256u << 10)
#define DEFAULT_CLUSTER_SIZE 65536u

static struct loop *img_loop(void)
{
    /* the library's progress notes are the daemon's log, not ours */
    log_set_level(LOG_WARN);
    char *msg = NULL;
    struct loop *l = loop_new(IMG_LOOP_ENTRIES, IMG_CORO_STACK, &msg);
    if (!l)
        die(1, "cannot create an event loop: %s", msg ? msg : "io_uring unavailable");
    return l;
}

/* A size in bytes with an optional K, M, G, T or P suffix (powers of 1024,
 * as qemu-img reads them); 0 on a malformed size. */
static uint64_t parse_size(const char *s)
{
    char *end;
    errno = 0;
    unsigned long long n = strtoull(s, &end, 10);
    unsigned shift = 0;
    if (errno || end == s || s[0] == '-')
        return 0;
    switch (*end) {
    case 'k': case 'K': shift = 10; end++; break;
    case 'm': case 'M': shift = 20; end++; break;
    case 'g': case 'G': shift = 30; end++; break;
    case 't': case 'T': shift = 40; end++; break;
    case 'p': case 'P': shift = 50; end++; break;
    }
    if (*end == 'i' && shift)     /* KiB, MiB... */
        end++;
    if ((*end == 'b' || *end == 'B') && end[1] == '\0')
        end++;
    if (*end || (shift && n > (UINT64_MAX >> shift)))
        return 0;
    return (uint64_t)n << shift;
}

/* Does a local file start with the qcow2 magic?  (rbd: specs: unknown.) */
static bool looks_like_qcow2(const char *path)
{
    unsigned char m[4];
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return false;
    bool yes = pread(fd, m, 4, 0) == 4 && m[0] == 'Q' && m[1] == 'F' &&
               m[2] == 'I' && m[3] == 0xfb;
    close(fd);
    return yes;
}

/* Opens an image read-only with its whole chain; the format is fmt, or
 * qcow2 when the file says so, else raw.  Backing files may be anywhere
 * (the user's own permissions are the limit).  Exits on failure. */
static struct fmt_node *img_open(struct loop *l, const char *spec, const char *fmt)
{
    CLEANUP_ERROR struct error *err = NULL;
    struct fmt_open_opts o = {.read_only = true, .backing_root = "/"};
    if (fmt)
        o.format = fmt;
    else if (backend_spec_is_remote(spec) || looks_like_qcow2(spec))
        o.format = "qcow2";
    else
        o.format = "raw";
    struct fmt_node *n = fmt_open(l, spec, &o, &err);
    if (!n && !fmt && backend_spec_is_remote(spec)) {
        /* an RBD image that is not qcow2: raw */
        error_freep(&err);
        o.format = "raw";
        n = fmt_open(l, spec, &o, &err);
    }
    if (!n)
        die(1, "%s", err ? err->msg : "cannot open the image");
    return n;
}

struct create_job {
    struct loop *loop;
    const char *path, *format, *backing, *backing_fmt;
    uint64_t size;
    uint64_t cluster_size;         /* qcow2 */
    struct error *err;
    int ret;
};

static void create_co(struct coro *co, void *arg)
{
    struct create_job *c = arg;
    if (!strcmp(c->format, "qcow2")) {
        c->ret = qcow2_create_cs_co(c->loop, co, c->path, c->size, c->backing,
                                    c->backing_fmt, c->cluster_size, &c->err);
        return;
    }
    /* raw: a sparse file (or a new RBD image) of the size, synced */
    struct backend_open_opts o = {.create = true, .create_size = c->size};
    struct backend *b = backend_open_co(c->loop, co, c->path, &o, &c->err);
    if (!b) {
        c->ret = -1;
        return;
    }
    c->ret = backend_flush_co(b, co);
    backend_close(b);
    if (c->ret < 0) {
        error_setf(&c->err, -c->ret, "%s: %s", c->path, strerror(-c->ret));
        backend_remove(c->path, NULL);
    }
}

static void fsync_parent(const char *path)
{
    char *copy = strdup(path);
    if (!copy)
        die(1, "out of memory");
    char *slash = strrchr(copy, '/');
    const char *dir = slash ? (slash == copy ? "/" : (*slash = '\0', copy)) : ".";
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0 || fsync(fd) < 0)
        die(1, "%s: syncing the directory: %s", dir, strerror(errno));
    close(fd);
    free(copy);
}

static int cmd_create(const char *file, const char *size_arg, const char *format,
                      const char *backing, const char *cluster_arg)
{
    if (!format)
        format = "qcow2";
    if (strcmp(format, "qcow2") && strcmp(format, "raw"))
        die(2, "create: --format %s: expected qcow2 or raw", format);
    if (backing && strcmp(format, "qcow2"))
        die(2, "create: --backing needs --format qcow2 (a raw image has no backing file)");
    uint64_t cs = DEFAULT_CLUSTER_SIZE;
    if (cluster_arg) {
        cs = parse_size(cluster_arg);
        if (cs < 512 || cs > (2u << 20) || (cs & (cs - 1)))
            die(2, "create: --cluster-size %s: expected a power of two from 512 "
                "to 2M", cluster_arg);
        if (strcmp(format, "qcow2"))
            die(2, "create: --cluster-size is for qcow2 images");
    }
    if (!backend_spec_is_remote(file) && access(file, F_OK) == 0)
        die(1, "create: %s already exists (strata never overwrites an image)", file);
    struct loop *l = img_loop();
    struct create_job c = {.loop = l, .path = file, .format = format, .backing = backing,
                           .cluster_size = cs};
    char *backing_path = NULL, *backing_fmt = NULL;
    if (backing) {
        /* the name is recorded as given, and read as the chain opener
         * will: relative to the new image's directory */
        CLEANUP_ERROR struct error *err = NULL;
        backing_path = fmt_resolve_backing(file, backing, NULL, &err);
        if (!backing_path)
            die(1, "create: --backing %s: %s", backing, err->msg);
        struct fmt_node *b = img_open(l, backing_path, NULL);
        backing_fmt = strdup(b->ops->name);
        if (!size_arg)
            c.size = b->size;
        fmt_close(b);
        c.backing_fmt = backing_fmt;
    }
    if (size_arg) {
        c.size = parse_size(size_arg);
        if (c.size == 0)
            die(2, "create: SIZE %s: expected a number of bytes, with an optional "
                "K, M, G, T or P suffix (powers of 1024)", size_arg);
    } else if (!backing) {
        die(2, "create: SIZE is required without --backing");
    }
    int r = loop_run_sync(l, create_co, &c);
    if (r < 0 && c.ret == 0)
        c.ret = r;
    if (c.ret < 0)
        die(1, "create: %s", c.err ? c.err->msg : strerror(-c.ret));
    if (!backend_spec_is_remote(file))
        fsync_parent(file);
    error_free(c.err);
    loop_free(l);
    if (opt_json) {
        struct json_object *o = json_object_new_object();
        json_object_object_add(o, "filename", json_object_new_string(file));
        json_object_object_add(o, "format", json_object_new_string(format));
        json_object_object_add(o, "virtual-size", json_object_new_int64((int64_t)c.size));
        if (!strcmp(format, "qcow2"))
            json_object_object_add(o, "cluster-size",
                                   json_object_new_int64((int64_t)c.cluster_size));
        if (backing) {
            json_object_object_add(o, "backing-filename", json_object_new_string(backing));
            json_object_object_add(o, "backing-filename-format",
                                   json_object_new_string(backing_fmt));
        }
        print_json(o);
        json_object_put(o);
    } else {
        char sz[32];
        printf("created %s: %s, %s (%llu bytes)", file, format,
               human_size(c.size, sz, sizeof(sz)), (unsigned long long)c.size);
        if (backing)
            printf(", backing file %s (%s)", backing, backing_fmt);
        printf("\n");
    }
    free(backing_path);
    free(backing_fmt);
    return 0;
}

/* Bytes a local file occupies on disk; -1 when unknown (RBD). */
static int64_t allocated_bytes(const char *spec)
{
    struct stat st;
    if (!spec || backend_spec_is_remote(spec) || stat(spec, &st) < 0)
        return -1;
    return (int64_t)st.st_blocks * 512;
}

/* qemu-img's layer description (info --output=json), for a node opened
 * here.  backing-filename is the name the image records. */
static struct json_object *layer_json(struct fmt_node *n)
{
    struct json_object *o = json_object_new_object();
    json_object_object_add(o, "filename", json_object_new_string(n->filename));
    json_object_object_add(o, "format", json_object_new_string(n->ops->name));
    json_object_object_add(o, "virtual-size", json_object_new_int64((int64_t)n->size));
    int64_t alloc = allocated_bytes(n->filename);
    if (alloc >= 0)
        json_object_object_add(o, "actual-size", json_object_new_int64(alloc));
    if (strcmp(n->ops->name, "qcow2"))
        return o;
    const struct qcow2_header *h = &qcow2_of(n)->h;
    json_object_object_add(o, "cluster-size", json_object_new_int64(h->cluster_size));
    json_object_object_add(o, "dirty-flag", json_object_new_boolean(h->dirty));
    if (qcow2_backing_name(n)) {
        json_object_object_add(o, "backing-filename",
                               json_object_new_string(qcow2_backing_name(n)));
        if (n->backing)
            json_object_object_add(o, "full-backing-filename",
                                   json_object_new_string(n->backing->filename));
        json_object_object_add(o, "backing-filename-format",
                               json_object_new_string(qcow2_backing_format(n)
                                                      ? qcow2_backing_format(n)
                                                      : n->backing->ops->name));
    }
    struct json_object *d = json_object_new_object();
    json_object_object_add(d, "compat", json_object_new_string(h->version >= 3 ? "1.1" : "0.10"));
    json_object_object_add(d, "compression-type", json_object_new_string(
        h->compression_type == QCOW2_COMPRESSION_ZSTD ? "zstd" : "zlib"));
    json_object_object_add(d, "lazy-refcounts", json_object_new_boolean(h->lazy_refcounts));
    json_object_object_add(d, "refcount-bits", json_object_new_int((int)h->refcount_bits));
    json_object_object_add(d, "corrupt", json_object_new_boolean(h->corrupt));
    json_object_object_add(d, "extended-l2", json_object_new_boolean(h->extended_l2));
    json_object_object_add(d, "internal-snapshots", json_object_new_int((int)h->nb_snapshots));
    struct json_object *fs = json_object_new_object();
    json_object_object_add(fs, "type", json_object_new_string("qcow2"));
    json_object_object_add(fs, "data", d);
    json_object_object_add(o, "format-specific", fs);
    return o;
}

/* One line of options for a layer: cluster size and qcow2 features, or
 * the node's settings as the daemon reports them. */
static void print_layer(struct json_object *x, size_t depth, size_t n)
{
    char vs[32], as[32];
    int64_t alloc = json_object_object_get_ex(x, "actual-size", NULL)
                        ? jint(x, "actual-size") : -1;
    printf("%*s%s%s\n", (int)(depth ? depth * 3 - 3 : 0), "",
           depth ? "\u2514\u2500 " : "", jstr(x, "filename"));
    int ind = (int)(depth * 3 + 4);
    printf("%*sformat: %s%s\n", ind, "", jstr(x, "format"),
           depth == 0 ? " (top)" : depth + 1 == n ? " (base)" : "");
    printf("%*svirtual size: %s (%lld bytes)\n", ind, "",
           human_size((uint64_t)jint(x, "virtual-size"), vs, sizeof(vs)),
           (long long)jint(x, "virtual-size"));
    if (alloc >= 0)
        printf("%*sallocated: %s\n", ind, "", human_size((uint64_t)alloc, as, sizeof(as)));
    if (jstr(x, "backing-filename"))
        printf("%*sbacking file: %s (format %s)\n", ind, "", jstr(x, "backing-filename"),
               jstr(x, "backing-filename-format") ? jstr(x, "backing-filename-format") : "?");
    struct json_object *fs, *d;
    if (json_object_object_get_ex(x, "format-specific", &fs) &&
        json_object_object_get_ex(fs, "data", &d))
        printf("%*soptions: cluster size %lld, compat %s, refcount bits %lld, "
               "compression %s, lazy refcounts %s, extended L2 %s%s%s\n", ind, "",
               (long long)jint(x, "cluster-size"), jstr(d, "compat"),
               (long long)jint(d, "refcount-bits"), jstr(d, "compression-type"),
               jbool(d, "lazy-refcounts") ? "on" : "off",
               jbool(d, "extended-l2") ? "on" : "off",
               jbool(d, "corrupt") ? ", CORRUPT" : "",
               jbool(x, "dirty-flag") ? ", dirty" : "");
    if (json_object_object_get_ex(x, "node-name", NULL))
        printf("%*snode: %s, %s%s\n", ind, "", jstr(x, "node-name"),
               jbool(x, "read-only") ? "read-only" : "read-write",
               jbool(x, "cache-direct") ? ", cache=none" : "");
}

static void print_info(struct json_object *info)
{
    struct json_object *chain, *e;
    json_object_object_get_ex(info, "chain", &chain);
    if (json_object_object_get_ex(info, "export", &e)) {
        const char *name = jstr(e, "name"), *desc = jstr(e, "description");
        printf("export %s: NBD name '%s', %s, %lld client%s%s%s\n", jstr(e, "id"),
               name ? name : "", jbool(e, "writable") ? "read-write" : "read-only",
               (long long)jint(e, "clients"), jint(e, "clients") == 1 ? "" : "s",
               desc ? ", " : "", desc ? desc : "");
    }
    size_t n = json_object_array_length(chain);
    for (size_t i = 0; i < n; i++)
        print_layer(json_object_array_get_idx(chain, i), i, n);
}

static int cmd_info_file(const char *file, const char *format)
{
    struct loop *l = img_loop();
    struct fmt_node *top = img_open(l, file, format);
    struct json_object *chain = json_object_new_array();
    for (struct fmt_node *n = top; n; n = n->backing)
        json_object_array_add(chain, layer_json(n));
    fmt_close(top);
    loop_free(l);
    struct json_object *info = json_object_new_object();
    json_object_object_add(info, "chain", chain);
    if (opt_json)
        print_json(info);
    else
        print_info(info);
    json_object_put(info);
    return 0;
}

static int cmd_info_export(struct qmp *q, const char *key)
{
    struct json_object *e = find_export(q, key);
    struct json_object *nodes = qmp_run(q, "query-named-block-nodes", NULL);
    struct json_object *chain = json_object_new_array();
    char *want = strdup(jstr(e, "node-name"));
    while (want) {
        struct json_object *hit = NULL, *img = NULL;
        for (size_t i = 0; i < json_object_array_length(nodes); i++) {
            struct json_object *n = json_object_array_get_idx(nodes, i);
            if (!strcmp(jstr(n, "node-name"), want))
                hit = n;
        }
        free(want);
        want = NULL;
        if (!hit)
            break;
        /* the layer as qemu-img names its fields, and the node's settings */
        struct json_object *x = json_object_new_object();
        json_object_object_add(x, "filename", json_object_new_string(jstr(hit, "file")));
        json_object_object_add(x, "format", json_object_new_string(jstr(hit, "drv")));
        uint64_t size = 0;
        if (json_object_object_get_ex(hit, "image", &img))
            size = (uint64_t)jint(img, "virtual-size");
        json_object_object_add(x, "virtual-size", json_object_new_int64((int64_t)size));
        int64_t alloc = allocated_bytes(jstr(hit, "file"));
        if (alloc >= 0)
            json_object_object_add(x, "actual-size", json_object_new_int64(alloc));
        if (jstr(hit, "backing_file")) {
            json_object_object_add(x, "backing-filename",
                                   json_object_new_string(jstr(hit, "backing_file")));
            if (img && json_object_object_get_ex(img, "backing-filename-format", NULL))
                json_object_object_add(x, "backing-filename-format", json_object_new_string(
                    jstr(img, "backing-filename-format")));
        }
        json_object_object_add(x, "node-name", json_object_new_string(jstr(hit, "node-name")));
        json_object_object_add(x, "read-only", json_object_new_boolean(jbool(hit, "ro")));
        struct json_object *cache;
        bool direct = json_object_object_get_ex(hit, "cache", &cache) && jbool(cache, "direct");
        json_object_object_add(x, "cache-direct", json_object_new_boolean(direct));
        json_object_array_add(chain, x);
        if (jstr(hit, "backing-node-name"))
            want = strdup(jstr(hit, "backing-node-name"));
    }
    struct json_object *info = json_object_new_object();
    json_object_object_add(info, "export", e);
    json_object_object_add(info, "chain", chain);
    if (opt_json)
        print_json(info);
    else
        print_info(info);
    json_object_put(info);
    json_object_put(nodes);
    return 0;
}

/* info's argument is a FILE when it names an existing non-directory or an
 * rbd: spec, else an EXPORT of the daemon. */
static bool is_image_arg(const char *arg)
{
    struct stat st;
    if (backend_spec_is_remote(arg))
        return true;
    return stat(arg, &st) == 0 && !S_ISDIR(st.st_mode);
}

/* ---- backup: QEMU 7.2's pull-mode sequence, as libvirt runs it ----
 *
 * strata backup start EXPORT: a scratch qcow2 next to the image; one
 * transaction adds a new bitmap (what changes from now on), disables the
 * --incremental one (what changed since the backup it started) and
 * inserts the copy-before-write filter; a snapshot-access view of that
 * instant is exported read-only as "backup-ID" with the --incremental
 * bitmap.  What end needs is kept in the export's description.
 * strata backup end EXPORT: the export, view, job and scratch go; the
 * --incremental bitmap is removed (its changes are in this backup), or
 * with --abort the new bitmap is merged back into it and it records
 * again, as if no backup had been taken. */

#define BACKUP_TAG "strata backup;"

static struct json_object *obj(const char *k1, struct json_object *v1)
{
    struct json_object *o = json_object_new_object();
    json_object_object_add(o, k1, v1);
    return o;
}

static struct json_object *jss(const char *s)
{
    return json_object_new_string(s);
}

static struct json_object *bitmap_ref(const char *node, const char *name)
{
    struct json_object *o = json_object_new_object();
    json_object_object_add(o, "node", jss(node));
    json_object_object_add(o, "name", jss(name));
    return o;
}

static struct json_object *action(const char *type, struct json_object *data)
{
    struct json_object *o = json_object_new_object();
    json_object_object_add(o, "type", jss(type));
    json_object_object_add(o, "data", data);
    return o;
}

/* Best effort (undoing a failed start): errors are ignored. */
static void qmp_quiet(struct qmp *q, const char *cmd, struct json_object *args)
{
    struct json_object *err = NULL;
    struct json_object *r = qmp_try(q, cmd, args, &err);
    json_object_put(r);
    json_object_put(err);
}

static void wait_job_gone(struct qmp *q, const char *id)
{
    for (int i = 0; i < 500; i++) {
        struct json_object *jobs = qmp_run(q, "query-block-jobs", NULL);
        bool found = false;
        for (size_t k = 0; k < json_object_array_length(jobs); k++)
            found |= !strcmp(jstr(json_object_array_get_idx(jobs, k), "device"), id);
        json_object_put(jobs);
        if (!found)
            return;
        usleep(20000);
    }
    die(1, "backup job %s did not end", id);
}

static int cmd_backup_start(struct qmp *q, const char *exp, const char *inc,
                            const char *scratch_arg, const char *new_bitmap)
{
    struct json_object *e = find_export(q, exp);
    char *id = strdup(jstr(e, "id")), *node = strdup(jstr(e, "node-name"));
    const char *file = jstr(e, "file"), *format = jstr(e, "format");
    uint64_t size = (uint64_t)jint(e, "virtual-size");
    if (!jbool(e, "writable"))
        die(1, "backup: export %s is read-only: read it directly", exp);
    char base[160], scratch_node[192], cbw[192], view[192], newbm[192];
    snprintf(base, sizeof(base), "backup-%s", id);
    snprintf(scratch_node, sizeof(scratch_node), "%s-scratch", base);
    snprintf(cbw, sizeof(cbw), "%s-cbw", base);
    snprintf(view, sizeof(view), "%s-view", base);
    if (new_bitmap) {
        snprintf(newbm, sizeof(newbm), "%s", new_bitmap);
    } else {
        time_t t = time(NULL);
        struct tm tm;
        gmtime_r(&t, &tm);
        strftime(newbm, sizeof(newbm), "backup-%Y%m%dT%H%M%SZ", &tm);
    }
    char *scratch = NULL;
    if (scratch_arg)
        scratch = abs_path(scratch_arg);
    else if (file && file[0] == '/' && asprintf(&scratch, "%s.%s.qcow2", file, base) < 0)
        die(1, "out of memory");
    if (!scratch)
        die(2, "backup start: the image of %s is not a local file: give --scratch FILE "
            "(a qcow2 image the old data is copied to while the backup runs)", exp);
    if (access(scratch, F_OK) == 0)
        die(1, "backup start: %s exists: a backup of %s is running or was left "
            "behind (strata backup end %s)", scratch, exp, exp);
    struct loop *l = img_loop();
    struct create_job c = {.loop = l, .path = scratch, .format = "qcow2", .size = size};
    int r = loop_run_sync(l, create_co, &c);
    if (r < 0 && c.ret == 0)
        c.ret = r;
    if (c.ret < 0)
        die(1, "backup start: %s", c.err ? c.err->msg : strerror(-c.ret));
    error_free(c.err);
    loop_free(l);

    struct json_object *err = NULL;
    struct json_object *a = json_object_new_object();
    json_object_object_add(a, "driver", jss("qcow2"));
    json_object_object_add(a, "node-name", jss(scratch_node));
    struct json_object *f = obj("driver", jss("file"));
    json_object_object_add(f, "filename", jss(scratch));
    json_object_object_add(a, "file", f);
    struct json_object *res = qmp_try(q, "blockdev-add", a, &err);
    const char *step = "blockdev-add";
    int undo = 0;
    if (res) {
        undo = 1;
        json_object_put(res);
        struct json_object *acts = json_object_new_array();
        struct json_object *add = bitmap_ref(node, newbm);
        json_object_object_add(add, "persistent", json_object_new_boolean(!strcmp(format, "qcow2")));
        json_object_array_add(acts, action("block-dirty-bitmap-add", add));
        if (inc)
            json_object_array_add(acts, action("block-dirty-bitmap-disable", bitmap_ref(node, inc)));
        struct json_object *bk = json_object_new_object();
        json_object_object_add(bk, "job-id", jss(base));
        json_object_object_add(bk, "device", jss(node));
        json_object_object_add(bk, "target", jss(scratch_node));
        json_object_object_add(bk, "sync", jss("none"));
        json_object_object_add(bk, "filter-node-name", jss(cbw));
        json_object_array_add(acts, action("blockdev-backup", bk));
        res = qmp_try(q, "transaction", obj("actions", acts), &err);
        step = "transaction";
    }
    if (res) {
        undo = 2;
        json_object_put(res);
        a = obj("driver", jss("snapshot-access"));
        json_object_object_add(a, "node-name", jss(view));
        json_object_object_add(a, "file", jss(cbw));
        res = qmp_try(q, "blockdev-add", a, &err);
        step = "blockdev-add snapshot-access";
    }
    if (res) {
        undo = 3;
        json_object_put(res);
        char desc[1024];
        snprintf(desc, sizeof(desc), BACKUP_TAG "export=%s;node=%s;new=%s;inc=%s;scratch=%s",
                 id, node, newbm, inc ? inc : "", scratch);
        a = obj("type", jss("nbd"));
        json_object_object_add(a, "id", jss(base));
        json_object_object_add(a, "node-name", jss(view));
        json_object_object_add(a, "name", jss(base));
        json_object_object_add(a, "description", jss(desc));
        if (inc) {
            struct json_object *bl = json_object_new_array();
            json_object_array_add(bl, bitmap_ref(node, inc));
            json_object_object_add(a, "bitmaps", bl);
        }
        res = qmp_try(q, "block-export-add", a, &err);
        step = "block-export-add";
    }
    if (!res) {
        char msg[1024];
        snprintf(msg, sizeof(msg), "%s", error_desc(err));
        json_object_put(err);
        if (undo >= 3)
            qmp_quiet(q, "blockdev-del", obj("node-name", jss(view)));
        if (undo >= 2) {
            qmp_quiet(q, "block-job-cancel", obj("device", jss(base)));
            wait_job_gone(q, base);
            qmp_quiet(q, "block-dirty-bitmap-remove", bitmap_ref(node, newbm));
            if (inc)
                qmp_quiet(q, "block-dirty-bitmap-enable", bitmap_ref(node, inc));
        }
        if (undo >= 1)
            qmp_quiet(q, "blockdev-del", obj("node-name", jss(scratch_node)));
        unlink(scratch);
        die(1, "backup start: %s: %s", step, msg);
    }
    json_object_put(res);
    struct json_object *list = qmp_run(q, "query-block-exports", NULL), *uris = NULL;
    for (size_t i = 0; i < json_object_array_length(list); i++) {
        struct json_object *x = json_object_array_get_idx(list, i);
        if (!strcmp(jstr(x, "id"), base) && json_object_object_get_ex(x, "x-uris", &uris))
            json_object_get(uris);
    }
    json_object_put(list);
    if (opt_json) {
        struct json_object *o = obj("export", jss(base));
        json_object_object_add(o, "uris", uris ? uris : json_object_new_array());
        json_object_object_add(o, "bitmap", jss(newbm));
        if (inc) {
            char ctx[256];
            snprintf(ctx, sizeof(ctx), "qemu:dirty-bitmap:%s", inc);
            json_object_object_add(o, "incremental", jss(inc));
            json_object_object_add(o, "meta-context", jss(ctx));
        }
        json_object_object_add(o, "scratch", jss(scratch));
        print_json(o);
        json_object_put(o);
    } else {
        printf("backup of %s frozen; read it (read-only export %s) at:\n", exp, base);
        for (size_t i = 0; uris && i < json_object_array_length(uris); i++)
            printf("  %s\n", json_object_get_string(json_object_array_get_idx(uris, i)));
        if (inc)
            printf("changed since the backup that started bitmap %s: meta context "
                   "qemu:dirty-bitmap:%s\n", inc, inc);
        printf("next incremental: strata backup start %s --incremental %s\n", exp, newbm);
        printf("when done: strata backup end %s\n", exp);
        json_object_put(uris);
    }
    json_object_put(e);
    free(scratch);
    free(id);
    free(node);
    return 0;
}

/* The value of key in a backup export's description, malloc'ed. */
static char *backup_field(const char *desc, const char *key)
{
    size_t kl = strlen(key);
    for (const char *p = desc; p && *p;) {
        const char *end = strchr(p, ';');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        if (n > kl && !strncmp(p, key, kl) && p[kl] == '=')
            return strndup(p + kl + 1, n - kl - 1);
        p = end ? end + 1 : NULL;
    }
    return NULL;
}

/* No backup export: a backup interrupted by a restart leaves its scratch
 * node (the state file keeps it) and file; remove them. */
static int backup_leftover(struct qmp *q, const char *exp, const char *base)
{
    char scratch_node[192];
    snprintf(scratch_node, sizeof(scratch_node), "%s-scratch", base);
    struct json_object *nodes = qmp_run(q, "query-named-block-nodes", NULL);
    char *file = NULL;
    for (size_t i = 0; i < json_object_array_length(nodes); i++) {
        struct json_object *n = json_object_array_get_idx(nodes, i);
        if (!strcmp(jstr(n, "node-name"), scratch_node) && jstr(n, "file"))
            file = strdup(jstr(n, "file"));
    }
    json_object_put(nodes);
    if (!file)
        die(1, "backup end: no backup of %s is running (no export %s made by "
            "strata backup start)", exp, base);
    json_object_put(qmp_run(q, "blockdev-del", obj("node-name", jss(scratch_node))));
    if (unlink(file) < 0 && errno != ENOENT)
        fprintf(stderr, "strata: backup end: removing %s: %s\n", file, strerror(errno));
    if (opt_json) {
        struct json_object *o = obj("export", jss(base));
        json_object_object_add(o, "leftover", jss(file));
        print_json(o);
        json_object_put(o);
    } else {
        printf("backup %s was interrupted (restart): its scratch image %s is removed; "
               "its bitmaps are gone or inconsistent: remove them and take a full "
               "backup\n", base, file);
    }
    free(file);
    return 0;
}

static int cmd_backup_end(struct qmp *q, const char *exp, bool abort_it, bool hard)
{
    struct json_object *e = find_export(q, exp);
    char base[160];
    snprintf(base, sizeof(base), "backup-%s", jstr(e, "id"));
    json_object_put(e);
    struct json_object *list = qmp_run(q, "query-block-exports", NULL);
    char *desc = NULL;
    for (size_t i = 0; i < json_object_array_length(list); i++) {
        struct json_object *x = json_object_array_get_idx(list, i);
        if (!strcmp(jstr(x, "id"), base) && jstr(x, "description") &&
            !strncmp(jstr(x, "description"), BACKUP_TAG, strlen(BACKUP_TAG)))
            desc = strdup(jstr(x, "description") + strlen(BACKUP_TAG));
    }
    json_object_put(list);
    if (!desc)
        return backup_leftover(q, exp, base);
    char *node = backup_field(desc, "node"), *newbm = backup_field(desc, "new");
    char *inc = backup_field(desc, "inc"), *scratch = backup_field(desc, "scratch");
    if (!node || !newbm || !inc || !scratch)
        die(1, "backup end: export %s: unreadable description", base);
    char view[192], scratch_node[192];
    snprintf(view, sizeof(view), "%s-view", base);
    snprintf(scratch_node, sizeof(scratch_node), "%s-scratch", base);
    struct json_object *a = obj("id", jss(base));
    json_object_object_add(a, "mode", jss(hard ? "hard" : "safe"));
    json_object_put(qmp_run(q, "block-export-del", a));
    /* the node is freed once the export's last client is gone */
    for (int i = 0;; i++) {
        struct json_object *err = NULL;
        struct json_object *r = qmp_try(q, "blockdev-del", obj("node-name", jss(view)), &err);
        if (r) {
            json_object_put(r);
            break;
        }
        if (i == 500)
            die(1, "backup end: blockdev-del %s: %s", view, error_desc(err));
        json_object_put(err);
        usleep(20000);
    }
    json_object_put(qmp_run(q, "block-job-cancel", obj("device", jss(base))));
    wait_job_gone(q, base);
    json_object_put(qmp_run(q, "blockdev-del", obj("node-name", jss(scratch_node))));
    if (unlink(scratch) < 0 && errno != ENOENT)
        fprintf(stderr, "strata: backup end: removing %s: %s\n", scratch, strerror(errno));
    if (*inc && abort_it) {
        struct json_object *srcs = json_object_new_array();
        json_object_array_add(srcs, jss(newbm));
        a = obj("node", jss(node));
        json_object_object_add(a, "target", jss(inc));
        json_object_object_add(a, "bitmaps", srcs);
        struct json_object *acts = json_object_new_array();
        json_object_array_add(acts, action("block-dirty-bitmap-enable", bitmap_ref(node, inc)));
        json_object_array_add(acts, action("block-dirty-bitmap-merge", a));
        json_object_array_add(acts, action("block-dirty-bitmap-remove", bitmap_ref(node, newbm)));
        json_object_put(qmp_run(q, "transaction", obj("actions", acts)));
    } else if (abort_it) {
        json_object_put(qmp_run(q, "block-dirty-bitmap-remove", bitmap_ref(node, newbm)));
    } else if (*inc) {
        json_object_put(qmp_run(q, "block-dirty-bitmap-remove", bitmap_ref(node, inc)));
    }
    if (opt_json) {
        struct json_object *o = obj("export", jss(base));
        json_object_object_add(o, "bitmap", jss(abort_it ? inc : newbm));
        print_json(o);
        json_object_put(o);
    } else if (abort_it) {
        printf("backup %s abandoned%s%s\n", base, *inc ? "; bitmap " : "",
               *inc ? inc : "");
        if (*inc)
            printf("(records again, with the changes since: take the next incremental "
                   "with --incremental %s)\n", inc);
    } else {
        printf("backup %s ended; the next incremental: --incremental %s\n", base, newbm);
    }
    free(desc);
    free(node);
    free(newbm);
    free(inc);
    free(scratch);
    return 0;
}

static void usage(FILE *fp)
{
    fprintf(fp,
"Usage: strata [--socket PATH] [--json] COMMAND [ARGS]\n"
"Manage a running stratad through its control socket.\n"
"\n"
"Commands:\n"
"  create FILE [SIZE] [--format qcow2|raw] [--backing FILE] [--cluster-size N]\n"
"                                make a new image (no daemon needed); SIZE in\n"
"                                bytes or with K, M, G, T suffixes; default\n"
"                                qcow2; SIZE defaults to the backing file's\n"
"  info FILE|EXPORT              format, sizes, chain and options of an image\n"
"                                (opened read-only) or of an export (asked of\n"
"                                the daemon)\n"
"  version                       the daemon's version\n"
"  exports                       list the exports\n"
"  chain EXPORT                  show an export's backing chain, top first\n"
"  jobs                          list the jobs and their progress\n"
"  job pause|resume|cancel|complete|dismiss|finalize ID\n"
"  add-export NAME FILE [--format raw|qcow2] [--readonly] [--cache none]\n"
"             [--description TEXT] [--id ID] [--node-name NODE]\n"
"  del-export ID [--hard] [--keep-node]\n"
"                                --hard disconnects the export's clients\n"
"  snapshot EXPORT NEW.qcow2 [--node-name NODE] [--relative]\n"
"                                --relative records the backing file's name\n"
"                                relative to NEW.qcow2's directory\n"
"                                (FILE arguments may be rbd:POOL/IMAGE specs:\n"
"                                a snapshot onto one creates the RBD image)\n"
"  commit EXPORT [--top FILE] [--base FILE] [--speed BYTES/S] [--job-id ID]\n"
"         [--wait]               --wait shows progress until the job ends\n"
"                                (an active commit is completed when ready)\n"
"  backup start EXPORT [--incremental BITMAP] [--scratch FILE] [--bitmap NAME]\n"
"                                freeze EXPORT's disk at this instant for a\n"
"                                pull-mode backup while the guest writes; print\n"
"                                the NBD URIs of the frozen view (export\n"
"                                backup-ID) and, with --incremental, the meta\n"
"                                context of what changed since that bitmap's\n"
"                                backup; a new bitmap (--bitmap, default\n"
"                                backup-DATE) records from the instant on\n"
"  backup end EXPORT [--abort] [--hard]\n"
"                                drop the view and its scratch image; remove\n"
"                                the --incremental bitmap (its changes are\n"
"                                backed up), or with --abort merge the new one\n"
"                                back into it\n"
"  stats [EXPORT] [--watch]      I/O statistics: requests, bytes, failures,\n"
"                                latency (average, p50/p99 bins); --watch\n"
"                                samples every second with rates\n"
"  quit                          stop the daemon gracefully\n"
"\n"
"Options:\n"
"  -s, --socket PATH   control socket (default $STRATA_SOCKET, else\n"
"                      " DEFAULT_SOCKET ")\n"
"  -j, --json          print the daemon's JSON answers instead of tables\n"
"  -h, --help          this help\n"
"\n"
"EXPORT is an export id or NBD name.  Exit status: 0 success, 1 the daemon\n"
"refused or failed (its message is printed), 2 usage or connection error.\n");
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"socket", required_argument, NULL, 's'},
        {"json", no_argument, NULL, 'j'},
        {"help", no_argument, NULL, 'h'},
        {"format", required_argument, NULL, 'f'},
        {"readonly", no_argument, NULL, 'r'},
        {"cache", required_argument, NULL, 'c'},
        {"description", required_argument, NULL, 'd'},
        {"id", required_argument, NULL, 'i'},
        {"node-name", required_argument, NULL, 'n'},
        {"hard", no_argument, NULL, 'H'},
        {"keep-node", no_argument, NULL, 'k'},
        {"top", required_argument, NULL, 't'},
        {"base", required_argument, NULL, 'b'},
        {"speed", required_argument, NULL, 'S'},
        {"job-id", required_argument, NULL, 'J'},
        {"wait", no_argument, NULL, 'w'},
        {"relative", no_argument, NULL, 'R'},
        {"watch", no_argument, NULL, 'W'},
        {"backing", required_argument, NULL, 'B'},
        {"cluster-size", required_argument, NULL, 'C'},
        {"incremental", required_argument, NULL, 'I'},
        {"scratch", required_argument, NULL, 'X'},
        {"bitmap", required_argument, NULL, 'M'},
        {"abort", no_argument, NULL, 'A'},
        {NULL, 0, NULL, 0},
    };
    const char *format = NULL, *desc = NULL, *id = NULL, *node = NULL;
    const char *backing = NULL, *cluster_size = NULL;
    const char *top = NULL, *base = NULL, *job_id = NULL;
    bool readonly = false, direct = false, hard = false, keep_node = false, wait = false;
    bool relative = false, watch = false, abort_it = false;
    const char *incremental = NULL, *scratch = NULL, *new_bitmap = NULL;
    long long speed = 0;
    signal(SIGPIPE, SIG_IGN); /* a closed socket is reported by write() */
    sock_path = getenv("STRATA_SOCKET");
    if (!sock_path || !*sock_path)
        sock_path = DEFAULT_SOCKET;
    int ch;
    /* options may come anywhere (GNU getopt permutes) */
    while ((ch = getopt_long(argc, argv, "s:jh", opts, NULL)) != -1) {
        switch (ch) {
        case 's': sock_path = optarg; break;
        case 'j': opt_json = true; break;
        case 'h': usage(stdout); return 0;
        case 'f': format = optarg; break;
        case 'r': readonly = true; break;
        case 'c':
            if (!strcmp(optarg, "none"))
                direct = true;
            else if (strcmp(optarg, "writeback"))
                die(2, "--cache %s: expected none or writeback", optarg);
            break;
        case 'd': desc = optarg; break;
        case 'i': id = optarg; break;
        case 'n': node = optarg; break;
        case 'H': hard = true; break;
        case 'k': keep_node = true; break;
        case 't': top = optarg; break;
        case 'b': base = optarg; break;
        case 'S': {
            char *end;
            errno = 0;
            speed = strtoll(optarg, &end, 10);
            if (errno || *end || speed < 0)
                die(2, "--speed %s: expected bytes per second", optarg);
            break;
        }
        case 'J': job_id = optarg; break;
        case 'w': wait = true; break;
        case 'R': relative = true; break;
        case 'W': watch = true; break;
        case 'B': backing = optarg; break;
        case 'C': cluster_size = optarg; break;
        case 'I': incremental = optarg; break;
        case 'X': scratch = optarg; break;
        case 'M': new_bitmap = optarg; break;
        case 'A': abort_it = true; break;
        default: usage(stderr); return 2;
        }
    }
    int nargs = argc - optind;
    char **args = argv + optind;
    if (nargs < 1) {
        usage(stderr);
        return 2;
    }
    const char *cmd = args[0];
    struct {
        const char *name;
        int nargs;
    } const table[] = {
        {"version", 1}, {"exports", 1}, {"chain", 2}, {"jobs", 1}, {"job", 3},
        {"add-export", 3}, {"del-export", 2}, {"snapshot", 3}, {"commit", 2},
        {"quit", 1}, {"create", 3}, {"info", 2}, {"backup", 3},
        {"stats", -2},             /* negative: up to that many */
    };
    size_t k;
    for (k = 0; k < sizeof(table) / sizeof(table[0]); k++)
        if (!strcmp(table[k].name, cmd))
            break;
    if (k == sizeof(table) / sizeof(table[0]))
        die(2, "unknown command '%s' (try strata --help)", cmd);
    if (!strcmp(cmd, "create") && nargs == 2)
        return cmd_create(args[1], NULL, format, backing, cluster_size);
    if (!strcmp(cmd, "create") && nargs == 3)
        return cmd_create(args[1], args[2], format, backing, cluster_size);
    if (!strcmp(cmd, "info") && nargs == 2 && is_image_arg(args[1]))
        return cmd_info_file(args[1], format);
    if (!strcmp(cmd, "info") && nargs == 2 && access(sock_path, F_OK) < 0)
        die(2, "info: %s is neither an image file nor, with no daemon at %s, an "
            "export (use --socket PATH or $STRATA_SOCKET)", args[1], sock_path);
    if (table[k].nargs < 0 ? nargs > -table[k].nargs : nargs != table[k].nargs)
        die(2, "%s: expected %s%d argument%s (try strata --help)", cmd,
            table[k].nargs < 0 ? "at most " : "",
            abs(table[k].nargs) - 1, abs(table[k].nargs) == 2 ? "" : "s");

    struct qmp q;
    qmp_connect(&q);
    int rc;
    if (!strcmp(cmd, "version"))
        rc = cmd_version(&q);
    else if (!strcmp(cmd, "exports"))
        rc = cmd_exports(&q);
    else if (!strcmp(cmd, "info"))
        rc = cmd_info_export(&q, args[1]);
    else if (!strcmp(cmd, "chain"))
        rc = cmd_chain(&q, args[1]);
    else if (!strcmp(cmd, "jobs"))
        rc = cmd_jobs(&q);
    else if (!strcmp(cmd, "job"))
        rc = cmd_job(&q, args[1], args[2]);
    else if (!strcmp(cmd, "add-export"))
        rc = cmd_add_export(&q, args[1], args[2], format ? format : "raw", readonly, direct, desc, id, node);
    else if (!strcmp(cmd, "del-export"))
        rc = cmd_del_export(&q, args[1], hard, keep_node);
    else if (!strcmp(cmd, "snapshot"))
        rc = cmd_snapshot(&q, args[1], args[2], node, relative);
    else if (!strcmp(cmd, "commit"))
        rc = cmd_commit(&q, args[1], top, base, speed, job_id, wait);
    else if (!strcmp(cmd, "backup") && !strcmp(args[1], "start"))
        rc = cmd_backup_start(&q, args[2], incremental, scratch, new_bitmap);
    else if (!strcmp(cmd, "backup") && !strcmp(args[1], "end"))
        rc = cmd_backup_end(&q, args[2], abort_it, hard);
    else if (!strcmp(cmd, "backup"))
        die(2, "backup: expected start or end, not '%s'", args[1]);
    else if (!strcmp(cmd, "stats"))
        rc = cmd_stats(&q, nargs > 1 ? args[1] : NULL, watch);
    else {
        json_object_put(qmp_run(&q, "quit", NULL));
        if (opt_json)
            printf("{}\n");
        else
            printf("stratad is shutting down\n");
        rc = 0;
    }
    for (size_t i = 0; i < q.n_events; i++)
        json_object_put(q.events[i]);
    free(q.events);
    free(q.buf);
    close(q.fd);
    return rc;
}
