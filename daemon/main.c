/* strata — stratad: the NBD export server daemon.  The process: log
 * file, --fork and its readiness pipe, signals, the loop, the server, the
 * control socket and the state file, wired together in main(). */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "control.h"
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

int main(int argc, char **argv)
{
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
    srv->allow_no_exports = control_path || state_path;
    int rc = 0;
    CLEANUP_ERROR struct error *err = NULL;
    struct tls_server *tls = NULL;
    if (tls_server_new(&opts.tls, &tls, &err) < 0) {
        fprintf(stderr, "stratad: %s\n", err->msg);
        rc = 1;
    } else if (opts.tls.mode != TLS_MODE_OFF) {
        char why[128];
        bool kernel = tls_kernel_offload_available(why, sizeof(why));
        log_info("TLS %s (%s)%s", opts.tls.mode == TLS_MODE_REQUIRE ? "required"
                 : "offered", opts.tls.psk_file ? "PSK" : "X.509",
                 opts.tls.allow ? ", --tls-allow" : "");
        log_debug("kernel TLS: %s; records are sealed and opened by GnuTLS in "
                  "userspace over the io_uring stream", kernel ? "the tls ULP "
                  "is available but not used" : why);
    }
    srv->tls = tls;
    struct state *state = NULL;
    bool state_loaded = false;
    if (state_path) {
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
    for (size_t i = 0; i < n_listens && rc == 0; i++) {
        if (server_add_listener(srv, listens[i], &err) < 0) {
            fprintf(stderr, "stratad: --listen %s: %s\n", listens[i], err->msg);
            rc = 1;
        }
    }
    struct control *control = NULL;
    if (rc == 0 && control_path) {
        control = control_new(srv, control_path, control_mode,
                              opts.control_gid, state, &err);
        if (!control) {
            fprintf(stderr, "stratad: %s\n", err->msg);
            rc = 1;
        }
    } else if (rc == 0 && state) {
        state_attach(state);
    }
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
    if (rc != 0) {
        signal_ready(&ready_fd, 1, true);
        control_free(control);
        state_free(state);
        server_free(srv);
        tls_server_free(tls);
        loop_free(loop);
        close(sig_fd);
        stratad_options_free(&opts);
        return rc;
    }
    if (state)
        server_changed(srv); /* record the exports of the command line */
    signal_ready(&ready_fd, 0, log_file != NULL);

    int r = loop_run(loop);
    if (r < 0) {
        log_error("event loop failed: %s", strerror(-r));
        rc = 1;
    } else {
        rc = srv->exit_code;
    }
    if (srv->conns || srv->holds) {
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
    close(sig_fd);
    stratad_options_free(&opts);
    log_info("stopped");
    return rc;
}
