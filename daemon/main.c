/* strata — stratad: the NBD export server daemon.  The process: log
 * file, --fork and its readiness pipe, signals, the loop, the server, the
 * control socket and the state file, socket activation and the service
 * manager's notifications, captive mode (--run), --exit-with-parent and
 * the metrics endpoint, wired together in main(). */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "captive.h"
#include "control.h"
#include "metrics.h"
#include "notify.h"
#include "options.h"
#include "log.h"
#include "server.h"
#include "state.h"
#include "strata-config.h"
#include "tls.h"

#define LOOP_ENTRIES 1024
#define CORO_STACK (256u << 10)

static int write_pid_file(const char *path)
{
    char tmp[PATH_MAX];
    if (snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= (int)sizeof(tmp))
        return -ENAMETOOLONG;
    FILE *fp = fopen(tmp, "w");
    if (!fp)
        return -errno;
    fprintf(fp, "%d\n", (int)getpid());
    if (fclose(fp) != 0)
        return -errno;
    /* atomic: a reader never sees an empty pid file */
    if (rename(tmp, path) < 0)
        return -errno;
    return 0;
}

/* Readiness pipe for --fork: the parent exits with the child's verdict. */
static int fork_and_wait(int *ready_fd)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0) {
        perror("stratad: pipe");
        return -1;
    }
    pid_t pid = fork();
    if (pid < 0) {
        perror("stratad: fork");
        return -1;
    }
    if (pid > 0) {
        close(p[1]);
        char status = 1;
        ssize_t n = read(p[0], &status, 1);
        if (n != 1) {
            int ws;
            waitpid(pid, &ws, 0);
            exit(1);
        }
        exit(status == 0 ? 0 : 1);
    }
    close(p[0]);
    setsid();
    *ready_fd = p[1];
    return 0;
}

static void signal_ready(int *ready_fd, char status, bool keep_stderr)
{
    if (*ready_fd < 0)
        return;
    if (write(*ready_fd, &status, 1) != 1) {
        /* the parent is gone: nothing to tell */
    }
    close(*ready_fd);
    *ready_fd = -1;
    if (status == 0) {
        int fd = open("/dev/null", O_RDWR);
        if (fd >= 0) {
            /* Detached from the caller's stdio, as `$(stratad --fork)` or a
             * supervisor reading our output must not wait for us to exit;
             * --log-file keeps the log. */
            dup2(fd, 0);
            dup2(fd, 1);
            if (!keep_stderr)
                dup2(fd, 2);
            if (fd > 2)
                close(fd);
        }
    }
}

/* --exit-with-parent: SIGTERM (the graceful shutdown) when the parent
 * dies; and if it died before we asked, shut down now. */
static int exit_with_parent(pid_t parent)
{
    if (prctl(PR_SET_PDEATHSIG, SIGTERM) < 0) {
        perror("stratad: --exit-with-parent: prctl");
        return -1;
    }
    if (getppid() != parent) {
        fprintf(stderr, "stratad: --exit-with-parent: the parent is gone\n");
        return -1;
    }
    return 0;
}

static void notify_stopping(struct server_shutdown_hook *h)
{
    (void)h;
    notify_send("STOPPING=1\nSTATUS=shutting down: draining clients");
}

int main(int argc, char **argv)
{
    pid_t parent = getppid();
    struct stratad_options opts;
    switch (stratad_options_parse(argc, argv, &opts)) {
    case OPTS_OK:
        break;
    case OPTS_EXIT:
        return 0;
    case OPTS_ERROR:
        return 2;
    }
    const char *log_file = opts.log_file, *pid_file = opts.pid_file;
    const char *control_path = opts.control_path;
    const char *state_path = opts.state_path;
    struct server_config cfg = opts.cfg;
    const char **listens = opts.listens, **exports = opts.exports;
    size_t n_listens = opts.n_listens, n_exports = opts.n_exports;
    bool do_fork = opts.do_fork;
    unsigned control_mode = opts.control_mode;

    if (log_file) {
        int fd = open(log_file, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
        if (fd < 0) {
            fprintf(stderr, "stratad: --log-file %s: %s\n", log_file,
                    strerror(errno));
            return 1;
        }
        dup2(fd, 2);
        close(fd);
        setvbuf(stderr, NULL, _IOLBF, 0);
    }

    int ready_fd = -1;
    if (do_fork && fork_and_wait(&ready_fd) < 0)
        return 1;

    /* Signals arrive through a signalfd read on the ring. */
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    signal(SIGPIPE, SIG_IGN);
    if (opts.exit_with_parent && exit_with_parent(parent) < 0) {
        stratad_options_free(&opts);
        return 1;
    }
    int sig_fd = signalfd(-1, &mask, SFD_CLOEXEC);
    if (sig_fd < 0) {
        perror("stratad: signalfd");
        signal_ready(&ready_fd, 1, true);
        return 1;
    }

    char *errmsg = NULL;
    struct loop *loop = loop_new(LOOP_ENTRIES, CORO_STACK, &errmsg);
    if (!loop) {
        fprintf(stderr, "stratad: %s\n", errmsg ? errmsg : "cannot create the loop");
        free(errmsg);
        signal_ready(&ready_fd, 1, true);
        return 1;
    }
    struct server *srv = server_new(loop, &cfg);
    if (!srv) {
        fprintf(stderr, "stratad: out of memory\n");
        signal_ready(&ready_fd, 1, true);
        return 1;
    }
    int rc = 0;
    CLEANUP_ERROR struct error *err = NULL;
    int control_fd = -1;
    int n_activated = server_adopt_activated(srv, &control_fd, &err);
    if (n_activated < 0) {
        fprintf(stderr, "stratad: %s\n", err->msg);
        rc = 1;
    }
    srv->allow_no_exports = control_path || state_path || control_fd >= 0;
    struct tls_server *tls = NULL;
    if (tls_server_new(&opts.tls, &tls, &err) < 0) {
        fprintf(stderr, "stratad: %s\n", err->msg);
        rc = 1;
    } else if (opts.tls.mode != TLS_MODE_OFF) {
        const char *why;
        bool kernel = tls_server_ktls(tls, &why);
        log_info("TLS %s (%s)%s", opts.tls.mode == TLS_MODE_REQUIRE ? "required"
                 : "offered", opts.tls.psk_file ? "PSK" : "X.509",
                 opts.tls.allow ? ", --tls-allow" : "");
        if (kernel)
            log_debug("kernel TLS: the tls ULP is available: after each "
                      "handshake the kernel seals and opens the records of "
                      "TLS 1.2/1.3 AES-GCM and ChaCha20-Poly1305 sessions");
        else
            log_debug("kernel TLS: %s; records are sealed and opened by "
                      "GnuTLS in userspace over the io_uring stream", why);
    }
    srv->tls = tls;
    struct state *state = NULL;
    bool state_loaded = false;
    if (state_path && rc == 0) {
        state = state_new(srv, state_path);
        if (!state) {
            fprintf(stderr, "stratad: out of memory\n");
            rc = 1;
        } else if (state_load(state, &state_loaded, &err) < 0) {
            fprintf(stderr, "stratad: %s\n", err->msg);
            rc = 1;
        }
    }
    for (size_t i = 0; i < n_exports && rc == 0; i++) {
        struct export_config ec;
        if (export_config_parse(exports[i], &ec, &err) < 0) {
            fprintf(stderr, "stratad: --export %s: %s\n", exports[i], err->msg);
            rc = 1;
            break;
        }
        char *id = export_config_id(&ec);
        if (id && state_loaded && server_find_export_id(srv, id)) {
            /* the state file knows the chain as it is now */
            log_info("--export %s: export '%s' is restored from the state file",
                     exports[i], id);
            free(id);
            export_config_clear(&ec);
            continue;
        }
        free(id);
        if (server_add_export(srv, &ec, &err) < 0) {
            fprintf(stderr, "stratad: --export %s: %s\n", exports[i], err->msg);
            export_config_clear(&ec);
            rc = 1;
        }
    }
    /* Without --listen: the activated sockets, or with --run a private
     * unix socket, or the NBD port on loopback. */
    char *private_dir = NULL, *private_sock = NULL, *private_listen = NULL;
    const char *default_listen = "127.0.0.1:10809";
    if (rc == 0 && n_listens == 0 && n_activated == 0 && control_fd < 0 &&
        opts.run_cmd) {
        int r = captive_private_socket(&private_dir, &private_sock);
        if (r < 0 || asprintf(&private_listen, "unix:%s", private_sock) < 0) {
            fprintf(stderr, "stratad: --run: a private socket directory: %s\n",
                    strerror(r < 0 ? -r : ENOMEM));
            rc = 1;
        }
        default_listen = private_listen;
    }
    if (rc == 0 && n_listens == 0 && n_activated == 0 && control_fd < 0) {
        listens[0] = default_listen; /* room for argc + 1 entries */
        n_listens = 1;
    }
    for (size_t i = 0; i < n_listens && rc == 0; i++) {
        if (server_add_listener(srv, listens[i], &err) < 0) {
            fprintf(stderr, "stratad: --listen %s: %s\n", listens[i], err->msg);
            rc = 1;
        }
    }
    struct control *control = NULL;
    if (rc == 0 && control_fd >= 0) {
        if (control_path)
            log_warn("--control %s: using the control socket of socket "
                     "activation instead", control_path);
        control = control_new_fd(srv, control_fd, "the activated socket",
                                 state, &err);
        if (!control) {
            fprintf(stderr, "stratad: %s\n", err->msg);
            rc = 1;
        }
    } else if (rc == 0 && control_path) {
        control = control_new(srv, control_path, control_mode,
                              opts.control_gid, state, &err);
        if (!control) {
            fprintf(stderr, "stratad: %s\n", err->msg);
            rc = 1;
        }
    } else if (rc == 0 && state) {
        state_attach(state);
    }
    struct metrics *metrics = NULL;
    if (rc == 0 && opts.metrics_addr) {
        metrics = metrics_new(srv, control ? control_jobs(control) : NULL,
                              opts.metrics_addr, &err);
        if (!metrics) {
            fprintf(stderr, "stratad: %s\n", err->msg);
            rc = 1;
        }
    }
    /* the connection loops, before anyone can connect */
    if (rc == 0 && server_workers_start(srv, LOOP_ENTRIES, CORO_STACK,
                                        &err) < 0) {
        fprintf(stderr, "stratad: %s\n", err->msg);
        rc = 1;
    }
    struct server_shutdown_hook stopping_hook = {.fn = notify_stopping};
    if (rc == 0)
        server_add_shutdown_hook(srv, &stopping_hook);
    if (rc == 0 && server_start(srv, sig_fd, &err) < 0) {
        fprintf(stderr, "stratad: %s\n", err->msg);
        rc = 1;
    }
    if (rc == 0 && pid_file) {
        int r = write_pid_file(pid_file);
        if (r < 0) {
            fprintf(stderr, "stratad: --pid-file %s: %s\n", pid_file, strerror(-r));
            rc = 1;
        }
    }
    if (rc == 0 && opts.print_uri) {
        char *uri = server_uri(srv, &err);
        if (!uri) {
            fprintf(stderr, "stratad: --print-uri: %s\n", err->msg);
            rc = 1;
        } else {
            printf("%s\n", uri);
            fflush(stdout);
            free(uri);
        }
    }
    struct captive cap = {0};
    if (rc == 0 && opts.run_cmd && captive_start(&cap, srv, opts.run_cmd, &err) < 0) {
        fprintf(stderr, "stratad: %s\n", err->msg);
        rc = 1;
    }
    if (rc != 0) {
        signal_ready(&ready_fd, 1, true);
        server_workers_stop(srv);
        metrics_free(metrics);
        control_free(control);
        state_free(state);
        server_free(srv);
        tls_server_free(tls);
        loop_free(loop);
        close(sig_fd);
        if (private_dir)
            rmdir(private_dir);
        free(private_dir);
        free(private_sock);
        free(private_listen);
        stratad_options_free(&opts);
        return rc;
    }
    if (state)
        server_changed(srv); /* record the exports of the command line */
    signal_ready(&ready_fd, 0, log_file != NULL);
    notify_sendf("READY=1\nSTATUS=serving %zu export%s on %zu socket%s",
                 srv->n_exports, srv->n_exports == 1 ? "" : "s",
                 srv->n_listeners, srv->n_listeners == 1 ? "" : "s");

    int r = loop_run(loop);
    if (r < 0) {
        log_error("event loop failed: %s", strerror(-r));
        rc = 1;
    } else {
        rc = srv->exit_code;
    }
    metrics_free(metrics);
    captive_finish(&cap);
    if (rc == 0 && cap.exited)
        rc = cap.exit_status; /* captive mode: the command's verdict */
    server_workers_stop(srv); /* no connection is left on them */
    if (srv->n_conns || srv->holds) {
        /* only after a fatal loop error: sockets close with the process */
        log_warn("exiting with clients or jobs still active");
    } else {
        control_free(control);
        state_free(state);
        server_free(srv);
        tls_server_free(tls);
    }
    loop_free(loop);
    if (pid_file)
        unlink(pid_file);
    if (private_dir) {
        unlink(private_sock); /* when the server could not be freed */
        rmdir(private_dir);
    }
    free(private_dir);
    free(private_sock);
    free(private_listen);
    close(sig_fd);
    stratad_options_free(&opts);
    log_info("stopped");
    return rc;
}
