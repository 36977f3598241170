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
 * Commands act on real storage by name, so the target first shuts itself
 * in (qmp-common.h: read-only file systems but a private tmpfs and
 * libFuzzer's directories, no network): a fuzzed command can neither
 * change a file of the machine nor reach another host.
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
#include <stdbool.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "control.h"
#include "util.h"
#include "fuzz.h"
#include "log.h"
#include "loop.h"
#include "mem-export.h"
#include "qmp-common.h"
#include "server.h"
#include "tls.h"

#define EXPORT_BYTES (UINT64_C(1) << 20)
#define MAX_OUT (UINT64_C(16) << 20)

int LLVMFuzzerInitialize(int *argc, char ***argv);

/* The control socket, in the private tmpfs. */
static const char *ctl_path;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    ctl_path = fuzz_qmp_sandbox(*argc, *argv, "fuzz-qmp");
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
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", ctl_path);
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
    fuzz_qmp_check_output(s.out, s.out_len);
    free(s.out);

    control_free(ctl);
    server_free(srv);
    tls_server_free(tls);
    loop_free(l);
    close(s.done_fd);
    return 0;
}
