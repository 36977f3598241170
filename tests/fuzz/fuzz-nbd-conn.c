/* strata — fuzz target: an NBD connection (daemon/nbd/: conn.c,
 * handshake.c, transmit.c, and common/stream.c under them) fed a whole
 * client byte stream: the handshake's options, then transmission requests.
 *
 * The server is the daemon's own (struct server, the io_uring loop), made
 * once, with three exports over in-memory storage (mem-backend.c; raw
 * format): "exp" (the default export, writable), "ro" (read-only) and
 * "secret" (allow list: only a TLS peer called "fuzz" sees it).  For each
 * input, a socketpair: the server's end is admitted as a client
 * (server_start_client, as a listener does with what it accepts), the
 * other end is the client, which sends the input and then shuts its write
 * side, and reads whatever the server answers until the server closes.
 * Nothing goes to the network.
 *
 * Input layout:
 *
 *   byte 0      bits 0..1: the server's TLS mode (0 and 3: off, 1: on,
 *               2: require; PSK credentials); bit 2: at most 2 requests
 *               in flight and 8 KiB buffered per connection (the
 *               back-pressure paths)
 *   the rest    what the client sends
 *
 * Properties:
 *  - no crash, no sanitizer report, no leak;
 *  - the server answers with the greeting first ("NBDMAGIC" "IHAVEOPT");
 *  - the connection ends once the client's input has ended (no hang: a
 *    bounded number of loop iterations), and everything it held is given
 *    back: no connection, handshake or peer counted, no payload memory
 *    held (the server-wide budget is back to 0), no client counted on
 *    any export.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <sys/socket.h>
#include <unistd.h>

#include "conn.h"
#include "error.h"
#include "exports.h"
#include "format.h"
#include "fuzz.h"
#include "log.h"
#include "loop.h"
#include "mem-export.h"
#include "server.h"
#include "tls.h"

#define EXPORT_BYTES (UINT64_C(1) << 20)
#define MAX_SETTLE 100000      /* loop iterations after the client's EOF */

enum { N_EXPORTS = 3 };

struct fixture {
    struct loop *loop;
    struct server *srv;
    struct tls_server *tls[3];         /* off, on, require */
    struct mem_store store[N_EXPORTS];
    struct server_config cfg;
};

static struct fixture fx;

static void die(const char *what, struct error *err)
{
    fprintf(stderr, "fuzz-nbd-conn: %s: %s\n", what, err ? err->msg : "?");
    abort();
}

static void setup_co(struct coro *co, void *arg)
{
    (void)arg;
    mem_export_add_co(fx.srv, co, &fx.store[0], "exp", "exp", true, NULL);
    mem_export_add_co(fx.srv, co, &fx.store[1], "ro", "ro", false, NULL);
    mem_export_add_co(fx.srv, co, &fx.store[2], "secret", "secret", true,
                      "fuzz");
}

static void setup(void)
{
    char *msg = NULL;
    struct error *err = NULL;
    log_set_level(LOG_ERROR); /* a client's every mistake is logged */
    fx.loop = loop_new(64, 256 << 10, &msg);
    if (!fx.loop)
        die("loop_new", NULL);
    server_config_defaults(&fx.cfg);
    fx.srv = server_new(fx.loop, &fx.cfg);
    if (!fx.srv)
        abort();

    /* PSK credentials, so that STARTTLS can be accepted (the fuzzed
     * stream cannot finish a TLS handshake, but GnuTLS reads its first
     * record and the connection must survive what follows). */
    char psk[] = "/tmp/strata-fuzz-psk-XXXXXX";
    int fd = mkstemp(psk);
    static const char line[] = "fuzz:00112233445566778899aabbccddeeff\n";
    if (fd < 0 || write(fd, line, sizeof(line) - 1) != sizeof(line) - 1)
        abort();
    close(fd);
    for (unsigned m = 0; m < 3; m++) {
        struct tls_options to = {.mode = (enum tls_mode)m, .psk_file = psk};
        if (tls_server_new(&to, &fx.tls[m], &err) < 0) {
            /* built without GnuTLS: TLS stays off */
            error_freep(&err);
            to.mode = TLS_MODE_OFF;
            if (tls_server_new(&to, &fx.tls[m], &err) < 0)
                die("tls_server_new", err);
        }
    }
    unlink(psk);

    uint8_t *zeros = calloc(1, EXPORT_BYTES);
    if (!zeros)
        abort();
    for (unsigned i = 0; i < N_EXPORTS; i++)
        mem_store_init(&fx.store[i], zeros, EXPORT_BYTES, EXPORT_BYTES);
    free(zeros);
    if (loop_run_sync(fx.loop, setup_co, &err) < 0)
        die("loop_run_sync", err);
}

struct session {
    const uint8_t *in;
    size_t len;
    uint8_t buf[64 << 10];
    uint64_t got;              /* bytes the server sent */
    bool greeted;
};

static void session_co(struct coro *co, void *arg)
{
    struct session *s = arg;
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
        abort();
    /* The whole input fits in the socket's buffer: written at once. */
    int big = 4 << 20;
    setsockopt(sv[1], SOL_SOCKET, SO_SNDBUF, &big, sizeof(big));
    size_t off = 0;
    while (off < s->len) {
        ssize_t w = write(sv[1], s->in + off, s->len - off);
        if (w <= 0)
            abort();
        off += (size_t)w;
    }
    shutdown(sv[1], SHUT_WR);

    struct conn *c = server_start_client(fx.srv, sv[0], false, "fuzz");
    FUZZ_CHECK(c != NULL);

    /* Read the replies until the server closes its end. */
    uint8_t first[16];
    for (;;) {
        struct loop_wait w;
        loop_wait_init(&w, co);
        struct io_uring_sqe *sqe = loop_get_sqe(fx.loop, &w.op);
        io_uring_prep_recv(sqe, sv[1], s->buf, sizeof(s->buf), 0);
        int r = loop_wait_co(&w);
        if (r == -EINTR || r == -EAGAIN)
            continue;
        if (r <= 0)
            break;
        if (s->got < sizeof(first)) {
            size_t n = sizeof(first) - s->got < (size_t)r
                           ? sizeof(first) - s->got : (size_t)r;
            memcpy(first + s->got, s->buf, n);
        }
        s->got += (uint64_t)r;
    }
    FUZZ_CHECK(s->got >= sizeof(first) &&
               !memcmp(first, "NBDMAGICIHAVEOPT", sizeof(first)));

    /* The server's end may still be winding down (request coroutines
     * returning, the deferred kick freeing it). */
    struct loop_sleep sl;
    loop_sleep_init(&sl);
    unsigned i;
    for (i = 0; i < MAX_SETTLE && fx.srv->conns; i++)
        loop_sleep_co(fx.loop, &sl, co, 1000);
    if (fx.srv->conns)
        fprintf(stderr, "the connection is still there in state %s\n",
                conn_state_name(fx.srv->conns->state));
    FUZZ_CHECK(fx.srv->conns == NULL);
    close(sv[1]);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct session *s;
    if (!fx.srv)
        setup();
    if (!s && !(s = malloc(sizeof(*s))))
        abort();
    if (size < 1)
        return 0;
    uint8_t cfg = data[0];
    fx.srv->tls = fx.tls[(cfg & 3) == 3 ? 0 : cfg & 3];
    if (cfg & 4) {
        fx.srv->cfg.max_inflight = 2;
        fx.srv->cfg.max_buffered = 8 << 10;
    } else {
        fx.srv->cfg.max_inflight = fx.cfg.max_inflight;
        fx.srv->cfg.max_buffered = fx.cfg.max_buffered;
    }
    for (unsigned i = 0; i < N_EXPORTS; i++) {
        mem_store_clear_written(&fx.store[i]);
        FUZZ_CHECK(fx.store[i].size == EXPORT_BYTES);
    }
    s->in = data + 1;
    s->len = size - 1;
    s->got = 0;
    int r = loop_run_sync(fx.loop, session_co, s);
    FUZZ_CHECK(r == 0);

    /* Everything the connection held is back. */
    FUZZ_CHECK(fx.srv->n_conns == 0);
    FUZZ_CHECK(fx.srv->n_handshaking == 0);
    FUZZ_CHECK(fx.srv->peers == NULL);
    FUZZ_CHECK(fx.srv->budget.payload_mem == 0);
    FUZZ_CHECK(fx.srv->budget.mem_wait_head == NULL);
    for (size_t i = 0; i < fx.srv->n_exports; i++)
        FUZZ_CHECK(fx.srv->exports[i]->n_conns == 0 &&
                   fx.srv->exports[i]->inflight == 0);
    return 0;
}
