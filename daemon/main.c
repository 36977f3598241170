/* strata — stratad: the NBD export server daemon. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
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
#include "log.h"
#include "server.h"
#include "state.h"
#include "strata-config.h"

#define LOOP_ENTRIES 1024
#define CORO_STACK (256u << 10)

static void usage(FILE *fp)
{
    fprintf(fp,
"Usage: stratad [OPTION]... --export file=PATH[,KEY=VAL]...\n"
"Serve disk images over NBD.\n"
"\n"
"  -l, --listen ADDR          listen on ADDR: HOST:PORT, [IPV6]:PORT or\n"
"                             unix:PATH (repeatable; default 127.0.0.1:10809)\n"
"  -e, --export SPEC          serve an image (repeatable; the first one is\n"
"                             also the default export, for the empty name)\n"
"      --fork                 go to the background once serving\n"
"      --pid-file FILE        write the daemon's pid to FILE once serving\n"
"      --log-file FILE        append log messages to FILE (with --fork the\n"
"                             daemon otherwise detaches from all output)\n"
"      --max-connections N    clients at once (default 256)\n"
"      --handshake-timeout S  seconds a client may take to choose an export\n"
"                             (default 10)\n"
"      --max-inflight N       requests in flight per client (default 128)\n"
"      --shutdown-timeout S   seconds to drain clients on SIGTERM (default 30)\n"
"      --control PATH         serve the QMP control socket on unix socket PATH\n"
"      --control-mode OCTAL   permissions of the control socket (default 0600)\n"
"      --state-file PATH      record exports and chains in PATH and restore\n"
"                             them at start (see the README)\n"
"  -v, --verbose              log every connection and refused request\n"
"  -h, --help                 show this help\n"
"  -V, --version              show the version\n"
"\n"
"Export SPEC keys (comma separated, ',,' for a literal comma):\n"
"  name=NAME           export name (default: empty)\n"
"  file=PATH           image file or block device (required)\n"
"  format=raw          image format (default raw; a file that looks like\n"
"                      qcow2 must be named explicitly)\n"
"  readonly=on|off     refuse writes (default off)\n"
"  cache=writeback|none  none: O_DIRECT, no host page cache\n"
"  description=TEXT    shown by NBD_OPT_LIST and NBD_INFO_DESCRIPTION\n"
"  id=ID               QMP export id (default: the name, or \"default\")\n"
"  node-name=NAME      QMP node name of its chain (default: the id)\n"
"\n"
"Example:\n"
"  stratad --listen unix:/run/strata.sock --export name=disk,file=disk.img\n"
"  nbdinfo 'nbd+unix:///disk?socket=/run/strata.sock'\n");
}

enum {
    OPT_FORK = 256,
    OPT_PIDFILE,
    OPT_LOGFILE,
    OPT_MAXCONN,
    OPT_HSTIMEOUT,
    OPT_MAXINFLIGHT,
    OPT_SHUTDOWN_TIMEOUT,
    OPT_CONTROL,
    OPT_CONTROL_MODE,
    OPT_STATE_FILE,
};

static int parse_uint(const char *opt, const char *s, unsigned min,
                      unsigned max, unsigned *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || *end || end == s || v < min || v > max) {
        fprintf(stderr, "stratad: %s %s: expected a number from %u to %u\n",
                opt, s, min, max);
        return -1;
    }
    *out = (unsigned)v;
    return 0;
}

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
    static const struct option longopts[] = {
        {"listen", required_argument, NULL, 'l'},
        {"export", required_argument, NULL, 'e'},
        {"fork", no_argument, NULL, OPT_FORK},
        {"pid-file", required_argument, NULL, OPT_PIDFILE},
        {"log-file", required_argument, NULL, OPT_LOGFILE},
        {"max-connections", required_argument, NULL, OPT_MAXCONN},
        {"handshake-timeout", required_argument, NULL, OPT_HSTIMEOUT},
        {"max-inflight", required_argument, NULL, OPT_MAXINFLIGHT},
        {"shutdown-timeout", required_argument, NULL, OPT_SHUTDOWN_TIMEOUT},
        {"control", required_argument, NULL, OPT_CONTROL},
        {"control-mode", required_argument, NULL, OPT_CONTROL_MODE},
        {"state-file", required_argument, NULL, OPT_STATE_FILE},
        {"verbose", no_argument, NULL, 'v'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    const char **listens = calloc((size_t)argc + 1, sizeof(char *));
    const char **exports = calloc((size_t)argc + 1, sizeof(char *));
    if (!listens || !exports) {
        fprintf(stderr, "stratad: out of memory\n");
        return 1;
    }
    size_t n_listens = 0, n_exports = 0;
    bool do_fork = false;
    const char *pid_file = NULL;
    const char *log_file = NULL;
    const char *control_path = NULL;
    const char *state_path = NULL;
    unsigned control_mode = 0600;
    struct server_config cfg;
    server_config_defaults(&cfg);

    int ch;
    while ((ch = getopt_long(argc, argv, "l:e:vhV", longopts, NULL)) != -1) {
        switch (ch) {
        case 'l':
            listens[n_listens++] = optarg;
            break;
        case 'e':
            exports[n_exports++] = optarg;
            break;
        case OPT_FORK:
            do_fork = true;
            break;
        case OPT_PIDFILE:
            pid_file = optarg;
            break;
        case OPT_LOGFILE:
            log_file = optarg;
            break;
        case OPT_MAXCONN:
            if (parse_uint("--max-connections", optarg, 1, 65536,
                           &cfg.max_connections) < 0)
                return 2;
            break;
        case OPT_HSTIMEOUT:
            if (parse_uint("--handshake-timeout", optarg, 1, 3600,
                           &cfg.handshake_timeout_s) < 0)
                return 2;
            break;
        case OPT_MAXINFLIGHT:
            if (parse_uint("--max-inflight", optarg, 1, 4096,
                           &cfg.max_inflight) < 0)
                return 2;
            break;
        case OPT_SHUTDOWN_TIMEOUT:
            if (parse_uint("--shutdown-timeout", optarg, 1, 3600,
                           &cfg.shutdown_timeout_s) < 0)
                return 2;
            break;
        case OPT_CONTROL:
            control_path = optarg;
            break;
        case OPT_CONTROL_MODE: {
            char *end;
            errno = 0;
            unsigned long m = strtoul(optarg, &end, 8);
            if (errno || *end || end == optarg || m > 0777) {
                fprintf(stderr, "stratad: --control-mode %s: expected an octal "
                        "mode such as 0600\n", optarg);
                return 2;
            }
            control_mode = (unsigned)m;
            break;
        }
        case OPT_STATE_FILE:
            state_path = optarg;
            break;
        case 'v':
            log_set_level(LOG_DEBUG);
            break;
        case 'h':
            usage(stdout);
            return 0;
        case 'V':
            printf("stratad %s\n", STRATA_VERSION);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "stratad: unexpected argument '%s'\n", argv[optind]);
        usage(stderr);
        return 2;
    }
    if (n_exports == 0 && !control_path && !state_path) {
        fprintf(stderr, "stratad: no export given (--export file=PATH, or "
                "--control to add exports later)\n");
        usage(stderr);
        return 2;
    }
    if (n_listens == 0)
        listens[n_listens++] = "127.0.0.1:10809";

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
        control = control_new(srv, control_path, control_mode, state, &err);
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
        loop_free(loop);
        close(sig_fd);
        free(listens);
        free(exports);
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
    }
    loop_free(loop);
    if (pid_file)
        unlink(pid_file);
    close(sig_fd);
    free(listens);
    free(exports);
    log_info("stopped");
    return rc;
}
