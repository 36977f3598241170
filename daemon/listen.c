/* strata — listening sockets (TCP and unix) and accepting clients into
 * NBD connections (see server.h). */
#include <arpa/inet.h>
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "conn.h"
#include "log.h"
#include "server.h"
#include "util.h"

static void accept_done(struct loop_op *op, int res, uint32_t flags);

static int listener_push(struct server *srv, int fd, const char *desc,
                         const char *unix_path, bool is_tcp,
                         struct error **errp)
{
    void *arr = realloc(srv->listeners,
                        sizeof(*srv->listeners) * (srv->n_listeners + 1));
    if (!arr) {
        close(fd);
        return error_setf(errp, ENOMEM, "out of memory");
    }
    srv->listeners = arr;
    struct listener *l = &srv->listeners[srv->n_listeners++];
    memset(l, 0, sizeof(*l));
    l->srv = srv;
    l->fd = fd;
    l->desc = strdup(desc);
    l->unix_path = unix_path ? strdup(unix_path) : NULL;
    l->is_tcp = is_tcp;
    l->accept_op.done = accept_done;
    l->parked_fd = -1;
    if (!l->desc || (unix_path && !l->unix_path))
        return error_setf(errp, ENOMEM, "out of memory");
    return 0;
}

int server_unix_socket(const char *path, const char *what, int mode,
                       int backlog, struct error **errp)
{
    struct sockaddr_un sun;
    if (strlen(path) >= sizeof(sun.sun_path))
        return error_setf(errp, ENAMETOOLONG, "%s%s: path too long", what, path);
    memset(&sun, 0, sizeof(sun));
    sun.sun_family = AF_UNIX;
    strcpy(sun.sun_path, path);
    struct stat st;
    /* a stale socket of an earlier run is replaced; anything else is not */
    if (lstat(path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode))
            return error_setf(errp, EEXIST, "%s%s exists and is not a socket",
                              what, path);
        unlink(path);
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return error_setf(errp, errno, "socket: %s", strerror(errno));
    /* With a mode, created with it: no window with a looser one.  Start-up
     * is single-threaded, so the process-wide umask may be borrowed. */
    mode_t old = mode >= 0 ? umask(~(mode_t)mode & 0777) : 0;
    int r = bind(fd, (struct sockaddr *)&sun, sizeof(sun));
    int e = errno;
    if (mode >= 0) {
        umask(old);
        if (r == 0 && chmod(path, (mode_t)mode) < 0) {
            r = -1;
            e = errno;
        }
    }
    if (r == 0 && listen(fd, backlog) < 0) {
        r = -1;
        e = errno;
    }
    if (r < 0) {
        close(fd);
        return error_setf(errp, e, "%s%s: %s", what, path, strerror(e));
    }
    return fd;
}

static int listen_unix(struct server *srv, const char *path,
                       struct error **errp)
{
    int fd = server_unix_socket(path, "unix:", -1, SOMAXCONN, errp);
    if (fd < 0)
        return fd;
    char desc[sizeof(((struct sockaddr_un *)0)->sun_path) + 8];
    snprintf(desc, sizeof(desc), "unix:%s", path);
    return listener_push(srv, fd, desc, path, false, errp);
}

static int listen_inet(struct server *srv, const char *addr,
                       struct error **errp)
{
    char host[256];
    const char *port;
    if (addr[0] == '[') {
        const char *end = strchr(addr, ']');
        if (!end || end[1] != ':' || (size_t)(end - addr - 1) >= sizeof(host))
            return error_setf(errp, EINVAL, "'%s': expected [IPV6]:PORT", addr);
        memcpy(host, addr + 1, (size_t)(end - addr - 1));
        host[end - addr - 1] = '\0';
        port = end + 2;
    } else {
        const char *colon = strrchr(addr, ':');
        if (!colon || (size_t)(colon - addr) >= sizeof(host))
            return error_setf(errp, EINVAL,
                              "'%s': expected HOST:PORT, [IPV6]:PORT or unix:PATH",
                              addr);
        memcpy(host, addr, (size_t)(colon - addr));
        host[colon - addr] = '\0';
        port = colon + 1;
    }
    if (!*port)
        return error_setf(errp, EINVAL, "'%s': missing port", addr);
    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    struct addrinfo *res = NULL;
    int gai = getaddrinfo(host[0] ? host : NULL, port, &hints, &res);
    if (gai != 0)
        return error_setf(errp, EINVAL, "'%s': %s", addr, gai_strerror(gai));
    int ret = error_setf(errp, EADDRNOTAVAIL, "'%s': no usable address", addr);
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC,
                        ai->ai_protocol);
        if (fd < 0)
            continue;
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (ai->ai_family == AF_INET6)
            setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 ||
            listen(fd, SOMAXCONN) < 0) {
            int e = errno;
            close(fd);
            if (errp && *errp) {
                error_free(*errp);
                *errp = NULL;
            }
            ret = error_setf(errp, e, "%s: %s", addr, strerror(e));
            continue;
        }
        if (errp && *errp) {
            error_free(*errp);
            *errp = NULL;
        }
        ret = listener_push(srv, fd, addr, NULL, true, errp);
        break;
    }
    freeaddrinfo(res);
    return ret;
}

int server_add_listener(struct server *srv, const char *addr,
                        struct error **errp)
{
    if (strncmp(addr, "unix:", 5) == 0)
        return listen_unix(srv, addr + 5, errp);
    return listen_inet(srv, addr, errp);
}

static void start_client(struct listener *l, int fd);

/* ---- socket activation ---- */

#define LISTEN_FDS_START 3

/* "unix:PATH", "HOST:PORT" or "[V6]:PORT" of a bound socket; *is_tcp. */
static void socket_desc(int fd, char *buf, size_t len, bool *is_tcp)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    char host[INET6_ADDRSTRLEN];
    *is_tcp = false;
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) < 0) {
        snprintf(buf, len, "fd %d", fd);
        return;
    }
    if (ss.ss_family == AF_UNIX) {
        struct sockaddr_un *sun = (struct sockaddr_un *)&ss;
        if (sl > offsetof(struct sockaddr_un, sun_path) && sun->sun_path[0])
            snprintf(buf, len, "unix:%.*s",
                     (int)(sl - offsetof(struct sockaddr_un, sun_path)),
                     sun->sun_path);
        else
            snprintf(buf, len, "unix:@%.*s",
                     (int)(sl - offsetof(struct sockaddr_un, sun_path) - 1),
                     sun->sun_path + 1);
    } else if (ss.ss_family == AF_INET) {
        struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
        inet_ntop(AF_INET, &sin->sin_addr, host, sizeof(host));
        snprintf(buf, len, "%s:%u", host, ntohs(sin->sin_port));
        *is_tcp = true;
    } else if (ss.ss_family == AF_INET6) {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;
        inet_ntop(AF_INET6, &sin6->sin6_addr, host, sizeof(host));
        snprintf(buf, len, "[%s]:%u", host, ntohs(sin6->sin6_port));
        *is_tcp = true;
    } else {
        snprintf(buf, len, "fd %d (family %d)", fd, ss.ss_family);
    }
}

int server_adopt_activated(struct server *srv, int *control_fd,
                           struct error **errp)
{
    *control_fd = -1;
    const char *pid_s = getenv("LISTEN_PID");
    const char *fds_s = getenv("LISTEN_FDS");
    if (!pid_s || !fds_s)
        return 0;
    char *end;
    errno = 0;
    unsigned long pid = strtoul(pid_s, &end, 10);
    if (errno || *end || pid != (unsigned long)getpid())
        return 0; /* meant for another process (our parent) */
    errno = 0;
    unsigned long n = strtoul(fds_s, &end, 10);
    if (errno || *end || n > 1024)
        return error_setf(errp, EINVAL, "LISTEN_FDS=%s: not a count of sockets",
                          fds_s);
    /* colon-separated, one name per descriptor (sd_listen_fds(3)) */
    char *names = strdup(getenv("LISTEN_FDNAMES") ? getenv("LISTEN_FDNAMES") : "");
    unsetenv("LISTEN_PID");
    unsetenv("LISTEN_FDS");
    unsetenv("LISTEN_FDNAMES");
    if (!names)
        return error_setf(errp, ENOMEM, "out of memory");
    int adopted = 0;
    char *save = NULL;
    char *name = names[0] ? strtok_r(names, ":", &save) : NULL;
    for (unsigned long i = 0; i < n; i++, name = name ? strtok_r(NULL, ":", &save) : NULL) {
        int fd = LISTEN_FDS_START + (int)i;
        const char *nm = name ? name : "unknown";
        int acc = 0, type = 0;
        socklen_t ol = sizeof(acc);
        if (fcntl(fd, F_SETFD, FD_CLOEXEC) < 0 ||
            getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &acc, &ol) < 0 ||
            (ol = sizeof(type),
             getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &ol) < 0) ||
            !acc || type != SOCK_STREAM) {
            int r = error_setf(errp, EINVAL, "socket activation: descriptor "
                               "%d ('%s') is not a listening stream socket "
                               "(ListenStream= in the .socket unit)", fd, nm);
            free(names);
            return r;
        }
        if (!strcmp(nm, "control")) {
            if (*control_fd >= 0) {
                free(names);
                return error_setf(errp, EINVAL, "socket activation: more "
                                  "than one socket named 'control'");
            }
            *control_fd = fd;
            continue;
        }
        if (strcmp(nm, "nbd") && strcmp(nm, "unknown")) {
            int r = error_setf(errp, EINVAL, "socket activation: descriptor "
                               "%d is named '%s': expected "
                               "FileDescriptorName=nbd or control", fd, nm);
            free(names);
            return r;
        }
        char desc[sizeof(((struct sockaddr_un *)0)->sun_path) + 64];
        bool tcp;
        socket_desc(fd, desc, sizeof(desc), &tcp);
        if (listener_push(srv, fd, desc, NULL, tcp, errp) < 0) {
            free(names);
            return -ENOMEM;
        }
        srv->listeners[srv->n_listeners - 1].adopted = true;
        adopted++;
    }
    free(names);
    return adopted;
}

static void arm_accept(struct listener *l)
{
    struct server *srv = l->srv;
    if (l->accept_pending || l->closed || srv->shutting_down)
        return;
    if (l->parked_fd >= 0 && srv->n_handshaking < srv->cfg.max_handshakes) {
        int fd = l->parked_fd;
        l->parked_fd = -1;
        start_client(l, fd);
    }
    if (l->parked_fd >= 0)
        return;
    if (srv->n_handshaking >= srv->cfg.max_handshakes) {
        /* finish the handshakes under way before starting new ones */
        if (!srv->accept_paused)
            log_info("%u handshakes in progress (--max-handshakes): new "
                     "clients wait until one finishes", srv->n_handshaking);
        srv->accept_paused = true;
        return;
    }
    if (srv->accept_paused) {
        srv->accept_paused = false;
        log_info("accepting new clients again");
    }
    struct io_uring_sqe *sqe = loop_get_sqe(l->srv->loop, &l->accept_op);
    io_uring_prep_accept(sqe, l->fd, NULL, NULL, SOCK_CLOEXEC);
    l->accept_pending = true;
}

static void accept_done(struct loop_op *op, int res, uint32_t flags)
{
    struct listener *l =
        container_of(op, struct listener, accept_op);
    struct server *srv = l->srv;
    (void)flags;
    l->accept_pending = false;
    if (res < 0) {
        if (srv->shutting_down)
            return;
        if (res == -EMFILE || res == -ENFILE || res == -ENOMEM ||
            res == -ENOBUFS) {
            /* out of resources: retry on the next tick, not in a spin */
            log_warn("%s: accept: %s", l->desc, strerror(-res));
            return;
        }
        arm_accept(l);
        return;
    }
    int fd = res;
    if (srv->shutting_down) {
        close(fd);
        return;
    }
    if (srv->n_handshaking >= srv->cfg.max_handshakes) {
        /* accepted before the limit was reached: it waits here, like the
         * clients in the kernel's backlog, until a handshake ends */
        assert(l->parked_fd < 0);
        l->parked_fd = fd;
        arm_accept(l); /* logs the pause; arms nothing */
        return;
    }
    start_client(l, fd);
    arm_accept(l); /* after counting: at the limit it pauses */
}

/* Admits (or refuses) the client on fd and starts its handshake. */
static void start_client(struct listener *l, int fd)
{
    server_start_client(l->srv, fd, l->is_tcp, l->desc);
}

struct conn *server_start_client(struct server *srv, int fd, bool tcp,
                                 const char *desc)
{
    if (srv->n_conns >= srv->cfg.max_connections) {
        log_warn("%s: refusing a client: %u connections is the limit",
                 desc, srv->cfg.max_connections);
        close(fd);
        return NULL;
    }
    struct peer *peer = NULL;
    enum admit_verdict v = peer_admit(srv, fd, tcp, &peer);
    if (v != ADMIT_OK) {
        if (v == ADMIT_NOMEM) {
            log_error("out of memory accepting a client");
        } else {
            log_warn("%s: refusing a client from %s: %s", desc,
                     peer_desc(peer), admit_verdict_str(v));
        }
        close(fd);
        return NULL;
    }
    if (tcp) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }
    struct conn *c = conn_new(srv, fd, tcp);
    if (!c) {
        log_error("out of memory accepting a client");
        peer_release(srv, peer, true);
        close(fd);
        return NULL;
    }
    c->peer = peer;
    c->in_handshake = true;
    c->next = srv->conns;
    if (srv->conns)
        srv->conns->prev = c;
    srv->conns = c;
    srv->n_conns++;
    log_debug("%s: client %llu connected from %s", desc,
              (unsigned long long)c->id, peer_desc(peer));
    return c;
}

void server_listeners_rearm(struct server *srv)
{
    for (size_t i = 0; i < srv->n_listeners; i++)
        arm_accept(&srv->listeners[i]);
}

static void cancel_done(struct loop_op *op, int res, uint32_t flags)
{
    (void)op;
    (void)res;
    (void)flags;
}

void server_listeners_stop(struct server *srv)
{
    for (size_t i = 0; i < srv->n_listeners; i++) {
        struct listener *l = &srv->listeners[i];
        if (l->parked_fd >= 0) {
            close(l->parked_fd); /* never started: nothing to drain */
            l->parked_fd = -1;
        }
        if (l->adopted) {
            /* The service manager keeps listening on this socket for the
             * next activation: cancel our accept, leave the socket be. */
            if (l->accept_pending) {
                l->cancel_op.done = cancel_done;
                io_uring_prep_cancel(loop_get_sqe(srv->loop, &l->cancel_op),
                                     &l->accept_op, 0);
            }
        } else {
            /* wakes the pending accept with an error; the fd closes at
             * exit */
            shutdown(l->fd, SHUT_RDWR);
        }
        l->closed = true;
    }
}

void server_listeners_free(struct server *srv)
{
    for (size_t i = 0; i < srv->n_listeners; i++) {
        struct listener *l = &srv->listeners[i];
        if (l->parked_fd >= 0)
            close(l->parked_fd);
        close(l->fd);
        if (l->unix_path)
            unlink(l->unix_path);
        free(l->unix_path);
        free(l->desc);
    }
    free(srv->listeners);
    srv->listeners = NULL;
    srv->n_listeners = 0;
}
