/* strata — captive mode (--run) and the server's URI (see captive.h). */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "captive.h"
#include "log.h"
#include "util.h"

enum uri_part {
    URI_LITERAL,               /* as it is */
    URI_SEGMENT,               /* percent-encode all but unreserved */
    URI_PATH,                  /* the same, '/' kept (a socket path) */
};

/* Appends s to the malloc'ed *out, RFC 3986 percent-encoded as part
 * says; on failure *out is freed and NULL. */
static void uri_append(char **out, size_t *len, size_t *cap, const char *s,
                       enum uri_part part)
{
    if (!*out)
        return;
    static const char hex[] = "0123456789ABCDEF";
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (*len + 4 > *cap) {
            size_t ncap = *cap * 2 + 64;
            char *p = realloc(*out, ncap);
            if (!p) {
                free(*out);
                *out = NULL;
                return;
            }
            *out = p;
            *cap = ncap;
        }
        if ((ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') ||
            (ch >= '0' && ch <= '9') || ch == '-' || ch == '.' || ch == '_' ||
            ch == '~' || part == URI_LITERAL || (part == URI_PATH && ch == '/')) {
            (*out)[(*len)++] = (char)ch;
        } else {
            (*out)[(*len)++] = '%';
            (*out)[(*len)++] = hex[ch >> 4];
            (*out)[(*len)++] = hex[ch & 15];
        }
        (*out)[*len] = '\0';
    }
}

/* Where a client connects: the unix path, or host and port. */
struct server_addr {
    bool is_unix;
    char path[sizeof(((struct sockaddr_un *)0)->sun_path) + 1];
    char host[INET6_ADDRSTRLEN + 2];   /* [v6] in brackets */
    unsigned port;
};

static bool listener_addr(const struct listener *l, struct server_addr *a)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    memset(a, 0, sizeof(*a));
    if (getsockname(l->fd, (struct sockaddr *)&ss, &sl) < 0)
        return false;
    if (ss.ss_family == AF_UNIX) {
        const struct sockaddr_un *sun = (const struct sockaddr_un *)&ss;
        if (!sun->sun_path[0])
            return false; /* abstract: no URI form */
        a->is_unix = true;
        size_t n = strnlen(sun->sun_path, sizeof(sun->sun_path));
        memcpy(a->path, sun->sun_path, n);
        a->path[n] = '\0';
        return true;
    }
    char h[INET6_ADDRSTRLEN];
    if (ss.ss_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)&ss;
        if (sin->sin_addr.s_addr == htonl(INADDR_ANY))
            snprintf(h, sizeof(h), "localhost");
        else
            inet_ntop(AF_INET, &sin->sin_addr, h, sizeof(h));
        snprintf(a->host, sizeof(a->host), "%s", h);
        a->port = ntohs(sin->sin_port);
        return true;
    }
    if (ss.ss_family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)&ss;
        if (IN6_IS_ADDR_UNSPECIFIED(&sin6->sin6_addr))
            snprintf(a->host, sizeof(a->host), "localhost");
        else {
            inet_ntop(AF_INET6, &sin6->sin6_addr, h, sizeof(h));
            snprintf(a->host, sizeof(a->host), "[%s]", h);
        }
        a->port = ntohs(sin6->sin6_port);
        return true;
    }
    return false;
}

/* The listener a local client should use: the first unix one, else the
 * first TCP one. */
static bool server_addr_pick(struct server *srv, struct server_addr *out)
{
    bool have = false;
    for (size_t i = 0; i < srv->n_listeners; i++) {
        struct server_addr a;
        if (!listener_addr(&srv->listeners[i], &a))
            continue;
        if (a.is_unix) {
            *out = a;
            return true;
        }
        if (!have) {
            *out = a;
            have = true;
        }
    }
    return have;
}

static const char *default_export_name(struct server *srv)
{
    return srv->n_exports ? srv->exports[0]->cfg.name : "";
}

char *server_uri(struct server *srv, struct error **errp)
{
    struct server_addr a;
    if (!server_addr_pick(srv, &a)) {
        error_setf(errp, EINVAL, "no listener a URI can name");
        return NULL;
    }
    size_t len = 0, cap = 256;
    char *out = malloc(cap);
    if (!out) {
        error_setf(errp, ENOMEM, "out of memory");
        return NULL;
    }
    out[0] = '\0';
    if (a.is_unix) {
        uri_append(&out, &len, &cap, "nbd+unix:///", URI_LITERAL);
        uri_append(&out, &len, &cap, default_export_name(srv), URI_SEGMENT);
        uri_append(&out, &len, &cap, "?socket=", URI_LITERAL);
        uri_append(&out, &len, &cap, a.path, URI_PATH);
    } else {
        char hp[INET6_ADDRSTRLEN + 32];
        snprintf(hp, sizeof(hp), "nbd://%s:%u/", a.host, a.port);
        uri_append(&out, &len, &cap, hp, URI_LITERAL);
        uri_append(&out, &len, &cap, default_export_name(srv), URI_SEGMENT);
    }
    if (!out)
        error_setf(errp, ENOMEM, "out of memory");
    return out;
}

int captive_private_socket(char **dir, char **sock)
{
    const char *tmp = getenv("TMPDIR");
    char *d = NULL;
    if (asprintf(&d, "%s/stratad-XXXXXX", tmp && *tmp ? tmp : "/tmp") < 0)
        return -ENOMEM;
    if (!mkdtemp(d)) {
        int e = errno;
        free(d);
        return -e;
    }
    char *s = NULL;
    if (asprintf(&s, "%s/nbd.sock", d) < 0) {
        rmdir(d);
        free(d);
        return -ENOMEM;
    }
    *dir = d;
    *sock = s;
    return 0;
}

static void exit_done(struct loop_op *op, int res, uint32_t flags)
{
    struct captive *cap = container_of(op, struct captive, exit_op);
    (void)flags;
    int ws;
    pid_t r = waitpid(cap->pid, &ws, WNOHANG);
    if (r != cap->pid) {
        if (res < 0 && res != -EINTR && res != -EAGAIN) {
            log_error("--run: watching the command: %s", strerror(-res));
            return;
        }
        /* woken without an exit: watch again */
        io_uring_prep_poll_add(loop_get_sqe(cap->srv->loop, &cap->exit_op),
                               cap->pidfd, POLLIN);
        return;
    }
    cap->exited = true;
    if (WIFEXITED(ws))
        cap->exit_status = WEXITSTATUS(ws);
    else if (WIFSIGNALED(ws))
        cap->exit_status = 128 + WTERMSIG(ws);
    else
        cap->exit_status = 1;
    log_info("--run: the command exited with status %d: shutting down",
             cap->exit_status);
    server_shutdown(cap->srv);
}

static void set_env(const char *k, const char *v)
{
    if (setenv(k, v, 1) < 0)
        _exit(127);
}

int captive_start(struct captive *cap, struct server *srv, const char *cmd,
                  struct error **errp)
{
    memset(cap, 0, sizeof(*cap));
    cap->srv = srv;
    cap->pidfd = -1;
    struct server_addr a;
    if (!server_addr_pick(srv, &a))
        return error_setf(errp, EINVAL, "--run: no listener to tell the command");
    char *uri = server_uri(srv, errp);
    if (!uri)
        return -ENOMEM;
    char port[16];
    snprintf(port, sizeof(port), "%u", a.port);
    pid_t pid = fork();
    if (pid < 0) {
        int e = errno;
        free(uri);
        return error_setf(errp, e, "--run: fork: %s", strerror(e));
    }
    if (pid == 0) {
        /* the child: a clean signal state, the variables, then the shell */
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGPIPE, SIG_DFL);
        unsetenv("NOTIFY_SOCKET"); /* the daemon's, not the command's */
        set_env("uri", uri);
        set_env("nbd", uri);
        set_env("exportname", default_export_name(srv));
        if (a.is_unix) {
            set_env("unixsocket", a.path);
            unsetenv("port");
        } else {
            set_env("port", port);
            unsetenv("unixsocket");
        }
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    free(uri);
    cap->pid = pid;
    cap->pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (cap->pidfd < 0) {
        int e = errno;
        kill(pid, SIGTERM);
        waitpid(pid, NULL, 0);
        cap->pid = 0;
        return error_setf(errp, e, "--run: pidfd_open: %s", strerror(e));
    }
    cap->exit_op.done = exit_done;
    io_uring_prep_poll_add(loop_get_sqe(srv->loop, &cap->exit_op), cap->pidfd,
                           POLLIN);
    log_info("--run: started the command (pid %d)", (int)pid);
    return 0;
}

void captive_finish(struct captive *cap)
{
    if (!cap->pid)
        return;
    if (!cap->exited) {
        int ws;
        if (waitpid(cap->pid, &ws, WNOHANG) == cap->pid) {
            cap->exited = true;
            cap->exit_status = WIFEXITED(ws) ? WEXITSTATUS(ws)
                                             : 128 + WTERMSIG(ws);
        } else {
            log_warn("--run: stopping while the command (pid %d) still runs",
                     (int)cap->pid);
        }
    }
    if (cap->pidfd >= 0)
        close(cap->pidfd);
    cap->pidfd = -1;
}
