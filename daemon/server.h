/* strata — the server: listeners, exports and NBD connections of one loop.
 *
 * Everything here is owned by exactly one loop thread and touched only from
 * it, so nothing needs a lock.  See conn.h for a connection's internals.
 */
#ifndef STRATA_SERVER_H
#define STRATA_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "error.h"
#include "format.h"
#include "loop.h"

struct conn;

struct export_config {
    char *name;                /* "" is allowed */
    char *file;
    char *format;              /* NULL: raw (refused if it looks like qcow2) */
    char *description;         /* NULL: none */
    bool read_only;
    bool direct;               /* cache=none */
    char *backing_root;        /* NULL: the top image's directory */
    uint64_t l2_cache_bytes;   /* 0: default */
    uint64_t refcount_cache_bytes;
};

struct export {
    struct export_config cfg;
    struct fmt_node *root;     /* top of the chain */
    unsigned n_conns;          /* connections in transmission on it */
};

struct server_config {
    unsigned max_connections;      /* accepted at once */
    unsigned handshake_timeout_s;  /* to reach transmission */
    unsigned max_inflight;         /* requests per connection */
    size_t max_buffered;           /* payload bytes per connection */
    unsigned shutdown_timeout_s;   /* to drain clients on SIGTERM */
};

struct listener {
    struct server *srv;
    int fd;
    char *desc;                    /* for messages: "127.0.0.1:10809" */
    char *unix_path;               /* unlinked at exit */
    struct loop_op accept_op;
    bool accept_pending;
    bool closed;
};

struct server {
    struct loop *loop;
    struct server_config cfg;

    struct export **exports;       /* exports[0] is the default export */
    size_t n_exports;

    struct listener *listeners;
    size_t n_listeners;

    struct conn *conns;            /* every live connection */
    unsigned n_conns;
    uint64_t next_conn_id;

    struct loop_timer timer;       /* handshake deadlines, shutdown */
    bool shutting_down;
    uint64_t shutdown_deadline_ns;
    bool flushing;                 /* final flush coroutine running */
    int exit_code;

    int sig_fd;                    /* signalfd: SIGTERM, SIGINT */
    struct loop_op sig_op;
    uint8_t sig_buf[128];          /* struct signalfd_siginfo */
};

void server_config_defaults(struct server_config *cfg);
struct server *server_new(struct loop *loop, const struct server_config *cfg);
void server_free(struct server *srv);

/* Parses "name=...,file=...,format=...,readonly=on,cache=none,
 * description=..." (",," is a literal comma). */
int export_config_parse(const char *spec, struct export_config *cfg,
                        struct error **errp);
void export_config_clear(struct export_config *cfg);
/* Opens the export's chain and adds it; takes ownership of cfg's strings. */
int server_add_export(struct server *srv, struct export_config *cfg,
                      struct error **errp);
struct export *server_find_export(struct server *srv, const char *name,
                                  size_t len);

/* Binds "HOST:PORT", "[V6]:PORT" or "unix:PATH". */
int server_add_listener(struct server *srv, const char *addr,
                        struct error **errp);

/* Starts accepting and watching signals; call before loop_run(). */
int server_start(struct server *srv, int sig_fd, struct error **errp);

/* Graceful stop: no new clients, in-flight requests finish, replies are
 * sent, exports flushed, then the loop stops. */
void server_shutdown(struct server *srv);

/* Called by connections. */
void server_conn_gone(struct server *srv, struct conn *c);
void server_check_idle(struct server *srv);

#endif
