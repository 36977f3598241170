/* strata — fuzz target: the control socket (daemon/control/: framing,
 * negotiation, dispatch, argument checks, the commands) fed a fuzzed
 * stream of JSON from one client.
 *
 * Each input is one whole lifetime of the daemon's server, as stratad
 * runs it with --control: a loop, a server with one export over
 * in-memory storage ("mem", raw, writable: node and export id "mem"), the
 * control socket; a client (a thread, blocking sockets) connects, sends
 * the input, shuts its write side and reads until the server closes; then
 * the server shuts down as on SIGTERM (jobs cancelled, clients closed, the
 * final flush), loop_run() returns, and everything is freed.  A "quit" in the input ends it the same way.
 *
 * Commands act on real storage by name (blockdev-add opens a file,
 * blockdev-snapshot-sync creates one, an rbd: name connects to a
 * cluster), so the target first shuts itself in (LLVMFuzzerInitialize,
 * before any thread exists): a mount namespace where every file system is
 * read-only except a private tmpfs for the control socket and the
 * directories libFuzzer writes to (the first corpus directory, and the one
 * of -artifact_prefix=, which must hold a slash: the working directory
 * stays read-only), and a network namespace with no interface up; the
 * Ceph client libraries read as empty files there, so an rbd: node fails
 * as on a host without librbd.  A fuzzed command can neither change a file
 * of the machine nor reach another host.
 *
 * Properties:
 *  - no crash, no sanitizer report, no leak (over the whole lifetime);
 *  - the server greets first ({"QMP": ...}); everything it sends is
 *    CRLF-terminated lines, each a JSON object that is a greeting, a
 *    return, an error (with class and desc) or an event;
 *  - the connection ends once the client's input has ended, and the
 *    shutdown completes (libFuzzer's -timeout bounds both).
 */
#include <errno.h>
#include <fcntl.h>
#include <json-c/json.h>
#include <limits.h>
#include <sched.h>
#include <stdbool.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include "control.h"
#include "util.h"
#include "fuzz.h"
#include "log.h"
#include "loop.h"
#include "mem-export.h"
#include "server.h"
#include "tls.h"

#define EXPORT_BYTES (UINT64_C(1) << 20)
#define MAX_OUT (UINT64_C(16) << 20)

int LLVMFuzzerInitialize(int *argc, char ***argv);

/* The control socket, in the private tmpfs. */
static char ctl_path[108];

/* ---- the sandbox ---- */

#ifndef MOUNT_ATTR_RDONLY
#define MOUNT_ATTR_RDONLY 0x00000001
#endif
#ifndef AT_RECURSIVE
#define AT_RECURSIVE 0x8000
#endif
struct fuzz_mount_attr {
    uint64_t attr_set, attr_clr, propagation, userns_fd;
};

static int set_mount_attr(const char *path, unsigned flags, uint64_t set)
{
#ifdef SYS_mount_setattr
    struct fuzz_mount_attr a = {.attr_set = set};
    return (int)syscall(SYS_mount_setattr, AT_FDCWD, path, flags, &a,
                        sizeof(a));
#else
    errno = ENOSYS;
    return -1;
#endif
}

static void sandbox_fail(const char *what)
{
    fprintf(stderr, "fuzz-qmp: cannot shut the target in (%s: %s): it "
            "needs user or mount namespaces (root, or "
            "kernel.unprivileged_userns_clone=1)\n", what, strerror(errno));
    exit(1);
}

static void write_file(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text))
        sandbox_fail(path);
    close(fd);
}

/* Directories that stay writable: libFuzzer's (the first corpus
 * directory receives new inputs; -artifact_prefix= the findings). */
static size_t writable_dirs(int argc, char **argv, char **out, size_t max)
{
    size_t n = 0;
    bool corpus_seen = false;
    for (int i = 1; i < argc && n < max; i++) {
        const char *a = argv[i];
        char dir[PATH_MAX];
        if (!strncmp(a, "-artifact_prefix=", 17)) {
            snprintf(dir, sizeof(dir), "%s", a + 17);
            char *slash = strrchr(dir, '/');
            if (!slash)
                continue; /* the working directory: stays read-only */
            slash[1] = '\0';
        } else if (a[0] != '-' && !corpus_seen) {
            struct stat st;
            if (stat(a, &st) < 0 || !S_ISDIR(st.st_mode))
                continue;
            corpus_seen = true;
            snprintf(dir, sizeof(dir), "%s", a);
        } else {
            continue;
        }
        char *real = realpath(dir, NULL);
        if (real)
            out[n++] = real;
    }
    return n;
}

static int by_length(const void *a, const void *b)
{
    size_t la = strlen(*(char *const *)a), lb = strlen(*(char *const *)b);
    return la < lb ? -1 : la > lb;
}

static void sandbox(int argc, char **argv)
{
    /* A child of a sandboxed process (libFuzzer's -merge runs the target
     * in one) is inside already: namespaces are inherited. */
    const char *sandboxed = getenv("STRATA_FUZZ_QMP_SANDBOX");
    if (sandboxed) {
        snprintf(ctl_path, sizeof(ctl_path), "%s/ctl-%d.sock", sandboxed,
                 (int)getpid());
        return;
    }
    char *keep[8];
    size_t n_keep = writable_dirs(argc, argv, keep, 8);
    /* Parents first; a directory inside one already kept is covered. */
    qsort(keep, n_keep, sizeof(*keep), by_length);
    size_t k = 0;
    for (size_t i = 0; i < n_keep; i++) {
        bool inside = false;
        for (size_t j = 0; j < k; j++) {
            size_t l = strlen(keep[j]);
            inside |= !strncmp(keep[i], keep[j], l) &&
                      (keep[i][l] == '/' || keep[i][l] == '\0');
        }
        if (inside)
            free(keep[i]);
        else
            keep[k++] = keep[i];
    }
    n_keep = k;
    /* Mounted over /dev/shm in the namespace: nothing is left behind. */
    const char *work = "/dev/shm";

    uid_t uid = geteuid();
    gid_t gid = getegid();
    int flags = CLONE_NEWNS | CLONE_NEWNET;
    if (uid != 0)
        flags |= CLONE_NEWUSER;
    if (unshare(flags) < 0)
        sandbox_fail("unshare");
    if (uid != 0) {
        char map[64];
        write_file("/proc/self/setgroups", "deny");
        snprintf(map, sizeof(map), "0 %u 1", (unsigned)uid);
        write_file("/proc/self/uid_map", map);
        snprintf(map, sizeof(map), "0 %u 1", (unsigned)gid);
        write_file("/proc/self/gid_map", map);
    }
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) {
        if (errno == EINVAL && uid == 0) {
            /* "/" is no mount point: a chroot (where user namespaces are
             * refused too).  Every mount made here would propagate to the
             * host's namespace through the mount the chroot lives on, so
             * there is no sandbox to be had: skipped, not run bare. */
            fprintf(stderr, "fuzz-qmp: skipped: / is not a mount point (a "
                    "chroot?), so the target cannot be shut in without "
                    "changing the host's mounts; run it outside the "
                    "chroot\n");
            exit(77);
        }
        sandbox_fail("mount --make-rprivate /");
    }
    for (size_t i = 0; i < n_keep; i++)
        if (mount(keep[i], keep[i], NULL, MS_BIND, NULL) < 0)
            sandbox_fail(keep[i]);
    /* No Ceph client either: an rbd: node fails as on a host without
     * librbd (the daemon loads it with dlopen), rather than talk to DNS
     * and monitors (there is no network) with C++ exceptions and resolver
     * state that the sanitizers of a C program do not follow. */
    static const char *const libdirs[] = {
        "/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64",
        "/usr/lib64", "/lib", "/usr/lib",
    };
    static const char *const cephlibs[] = {"librados.so.2", "librbd.so.1"};
    for (size_t d = 0; d < sizeof(libdirs) / sizeof(libdirs[0]); d++)
        for (size_t i = 0; i < 2; i++) {
            char path[PATH_MAX], *real;
            snprintf(path, sizeof(path), "%s/%s", libdirs[d], cephlibs[i]);
            if (!(real = realpath(path, NULL)))
                continue;
            /* several names may lead to one file: once is enough */
            if (mount("/dev/null", real, NULL, MS_BIND, NULL) < 0 &&
                errno != EBUSY)
                sandbox_fail(real);
            free(real);
        }
    if (set_mount_attr("/", AT_RECURSIVE, MOUNT_ATTR_RDONLY) < 0)
        sandbox_fail("read-only /");
    for (size_t i = 0; i < n_keep; i++) {
        if (mount(NULL, keep[i], NULL, MS_REMOUNT | MS_BIND, NULL) < 0)
            sandbox_fail(keep[i]);
        free(keep[i]);
    }
    if (mount("strata-fuzz", work, "tmpfs", 0, "size=64m,mode=0700") < 0)
        sandbox_fail("tmpfs");
    snprintf(ctl_path, sizeof(ctl_path), "%s/ctl-%d.sock", work,
             (int)getpid());
    /* libFuzzer's own temporary files (-merge) go to the tmpfs too. */
    setenv("STRATA_FUZZ_QMP_SANDBOX", work, 1);
    setenv("TMPDIR", work, 1);
    /* Checked, not assumed: nothing outside may be written. */
    if (mkdir("/tmp/strata-fuzz-qmp-escape", 0700) == 0 || errno != EROFS ||
        strlen(ctl_path) + 1 > sizeof(ctl_path))
        sandbox_fail("the read-only check");
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    sandbox(*argc, *argv);
    log_set_level(LOG_ERROR); /* a client's every mistake is logged */
    return 0;
}

/* ---- one lifetime ---- */

struct session {
    const uint8_t *in;
    size_t len;
    struct server *srv;
    int done_fd;               /* eventfd: the client saw the end */
    struct loop_op done_op;
    uint64_t done_buf;
    struct mem_store *arg_store;
    char *out;                 /* what the server sent */
    size_t out_len, out_cap;
};

/* The client, on a thread of its own with blocking sockets, as a real
 * client is: sends the input, then reads until the server closes. */
static void *client_thread(void *arg)
{
    struct session *s = arg;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    memcpy(sa.sun_path, ctl_path, sizeof(ctl_path));
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
        abort();
    /* The server may close before it read everything (quit, a message
     * over the limit): a failed write ends the sending, not the test. */
    size_t off = 0;
    while (off < s->len) {
        ssize_t w = send(fd, s->in + off, s->len - off, MSG_NOSIGNAL);
        if (w <= 0)
            break;
        off += (size_t)w;
    }
    shutdown(fd, SHUT_WR);
    for (;;) {
        if (s->out_cap - s->out_len < 65536) {
            s->out_cap = s->out_cap * 2 + 65536;
            s->out = realloc(s->out, s->out_cap);
            if (!s->out)
                abort();
        }
        ssize_t r = recv(fd, s->out + s->out_len,
                         s->out_cap - s->out_len - 1, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        s->out_len += (size_t)r;
        if (s->out_len > MAX_OUT)
            break;
    }
    close(fd);
    s->out[s->out_len] = '\0';
    uint64_t one = 1;
    if (write(s->done_fd, &one, sizeof(one)) != sizeof(one))
        abort();
    return NULL;
}

/* The client is done: shut down as on SIGTERM (quit may have begun it). */
static void client_done(struct loop_op *op, int res, uint32_t flags)
{
    struct session *s = container_of(op, struct session, done_op);
    (void)res;
    (void)flags;
    server_shutdown(s->srv);
}

static void setup_co(struct coro *co, void *arg)
{
    struct session *s = arg;
    mem_export_add_co(s->srv, co, s->arg_store, "mem", "mem", true, NULL);
}

static bool has_str(struct json_object *o, const char *key)
{
    struct json_object *v;
    return json_object_object_get_ex(o, key, &v) &&
           json_object_is_type(v, json_type_string);
}

/* Every line the server sent is a QMP message. */
static void check_output(const char *out, size_t len)
{
    size_t pos = 0, lines = 0;
    while (pos < len) {
        const char *nl = memchr(out + pos, '\n', len - pos);
        FUZZ_CHECK(nl != NULL);                 /* whole lines only */
        size_t end = (size_t)(nl - out);
        FUZZ_CHECK(end > pos && out[end - 1] == '\r');
        struct json_tokener *tok = json_tokener_new();
        if (!tok)
            abort();
        struct json_object *o = json_tokener_parse_ex(tok, out + pos,
                                                      (int)(end - 1 - pos));
        FUZZ_CHECK(json_tokener_get_error(tok) == json_tokener_success);
        json_tokener_free(tok);
        FUZZ_CHECK(json_object_is_type(o, json_type_object));
        struct json_object *v;
        if (lines == 0) {
            FUZZ_CHECK(json_object_object_get_ex(o, "QMP", &v));
        } else if (json_object_object_get_ex(o, "error", &v)) {
            FUZZ_CHECK(json_object_is_type(v, json_type_object) &&
                       has_str(v, "class") && has_str(v, "desc"));
        } else {
            FUZZ_CHECK(json_object_object_get_ex(o, "return", &v) ||
                       has_str(o, "event"));
        }
        json_object_put(o);
        lines++;
        pos = end + 1;
    }
    FUZZ_CHECK(lines >= 1);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct mem_store store;
    static uint8_t *zeros;
    if (!zeros && !(zeros = calloc(1, EXPORT_BYTES)))
        abort();
    mem_store_load(&store, zeros, EXPORT_BYTES, EXPORT_BYTES);

    char *msg = NULL;
    struct loop *l = loop_new(64, 256 << 10, &msg);
    if (!l) {
        fprintf(stderr, "loop_new: %s\n", msg ? msg : "?");
        abort();
    }
    struct server_config cfg;
    server_config_defaults(&cfg);
    struct server *srv = server_new(l, &cfg);
    struct tls_server *tls = NULL;
    struct tls_options to = {.mode = TLS_MODE_OFF};
    struct error *err = NULL;
    if (!srv || tls_server_new(&to, &tls, &err) < 0)
        abort();
    srv->tls = tls;
    srv->allow_no_exports = true;

    struct session s = {.in = data, .len = size, .srv = srv,
                        .arg_store = &store};
    if (loop_run_sync(l, setup_co, &s) < 0)
        abort();
    struct control *ctl = control_new(srv, ctl_path, 0600, (gid_t)-1, NULL,
                                      &err);
    if (!ctl) {
        fprintf(stderr, "control_new: %s\n", err ? err->msg : "?");
        abort();
    }
    s.done_fd = eventfd(0, EFD_CLOEXEC);
    if (s.done_fd < 0)
        abort();
    s.done_op.done = client_done;
    io_uring_prep_read(loop_get_sqe(l, &s.done_op), s.done_fd, &s.done_buf,
                       sizeof(s.done_buf), 0);
    pthread_t th;
    if (pthread_create(&th, NULL, client_thread, &s) != 0)
        abort();

    /* The daemon's lifetime: until the shutdown stops the loop. */
    int r = loop_run(l);
    FUZZ_CHECK(r == 0);
    pthread_join(th, NULL);
    FUZZ_CHECK(s.out_len <= MAX_OUT);
    FUZZ_CHECK(srv->conns == NULL && srv->holds == 0);
    if (getenv("FUZZ_VERBOSE")) /* what the server answered */
        fprintf(stderr, "%s", s.out);
    check_output(s.out, s.out_len);
    free(s.out);

    control_free(ctl);
    server_free(srv);
    tls_server_free(tls);
    loop_free(l);
    close(s.done_fd);
    return 0;
}
