/* strata — the server: the process-wide object of one loop that owns the
 * listeners, the NBD connections and the tables of exports and block nodes
 * (exports.h), and runs the start-up, signals and graceful shutdown.
 *
 * Everything here is owned by exactly one loop thread (the main loop,
 * srv->loop) and touched only from it, so nothing needs a lock.  With
 * --threads N > 1 there are N - 1 connection loops besides (struct
 * worker, workers.c): a connection without TLS moves to one of them when
 * it enters transmission, and from then on its socket, stream and request
 * slots belong to that loop; its requests still run on the main loop,
 * which owns every chain, and the two loops talk only by loop_post()
 * (docs/threads.md).  See conn.h for a connection's internals.
 *
 * Files: server.c (lifecycle: new, start, signals, timer, holds, shutdown),
 * listen.c (listening sockets, accept), exports.c (node and export tables),
 * export-config.c (--export SPEC), quiesce.c (quiesce, write notifiers).
 */
#ifndef STRATA_SERVER_H
#define STRATA_SERVER_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "error.h"
#include "exports.h"
#include "format.h"
#include "loop.h"

struct conn;
struct tls_server;

/* The payload memory budget of one loop's connections (nbd/budget.c).
 * Each loop has its own share of --max-memory, touched by its thread
 * only. */
struct nbd_budget {
    uint64_t max;                  /* this loop's share of max_memory */
    uint64_t payload_mem;          /* payload buffers of its connections */
    uint64_t payload_mem_peak;
    struct conn *mem_wait_head, *mem_wait_tail; /* waiting for memory */
    struct conn **conns;           /* the list of its connections */
};

/* A connection loop (workers.c): a thread, its loop, the connections
 * handed to it.  Fields are its thread's unless marked. */
struct worker {
    struct server *srv;            /* read-only */
    unsigned index;                /* 1.. (the main loop is 0) */
    struct loop *loop;             /* made and run on its thread */
    pthread_t thread;              /* main loop's */
    bool started;                  /* main loop's */
    struct conn *conns;
    struct nbd_budget budget;
    unsigned handed;               /* main loop's: connections handed
                                      here and not yet gone */
    struct loop_timer timer;       /* its shutdown deadline */
    bool draining;
    uint64_t drain_deadline_ns;
    struct loop_msg drain_msg;     /* posted by server_shutdown */
    struct loop_msg stop_msg;      /* posted by server_workers_stop */
    /* start-up: the thread says whether its loop could be made */
    pthread_mutex_t start_lock;
    pthread_cond_t start_cond;
    int start_state;               /* 0 starting, 1 running, -errno */
};

struct server_config {
    unsigned max_connections;      /* accepted at once */
    unsigned max_per_peer;         /* of one address or uid (peers.c) */
    unsigned max_handshakes;       /* handshakes in progress at once */
    unsigned max_handshakes_per_peer;
    unsigned handshake_timeout_s;  /* to reach transmission */
    unsigned max_inflight;         /* requests per connection */
    size_t max_buffered;           /* payload bytes per connection */
    uint64_t max_memory;           /* payload bytes of all connections
                                      (daemon/nbd/budget.c) */
    unsigned shutdown_timeout_s;   /* to drain clients on SIGTERM */
    unsigned threads;              /* loops: the main one + connection
                                      loops (--threads) */
};

struct listener {
    struct server *srv;
    int fd;
    char *desc;                    /* for messages: "127.0.0.1:10809" */
    char *unix_path;               /* unlinked at exit (not when adopted) */
    bool is_tcp;                   /* TCP_NODELAY for its clients */
    bool adopted;                  /* passed by the service manager */
    struct loop_op accept_op;
    struct loop_op cancel_op;      /* cancels accept_op (adopted) */
    bool accept_pending;
    bool closed;
    int parked_fd;                 /* accepted while --max-handshakes were
                                      in progress: started when one ends
                                      (-1: none; the listener is not
                                      re-armed meanwhile) */
};

/* Called when the server starts its graceful shutdown (control socket,
 * job engine).  Hooks run in registration order. */
struct server_shutdown_hook {
    void (*fn)(struct server_shutdown_hook *h);
    struct server_shutdown_hook *next;
};

/* Set by the control socket: told when exports or chains change (it
 * saves the state file) and when a deleted export is finally gone
 * (BLOCK_EXPORT_DELETED). */
struct server_change_hook {
    void (*changed)(struct server_change_hook *h);
    /* waits until every change so far is durable; 0 or -errno */
    int (*sync_co)(struct server_change_hook *h, struct coro *co);
    void (*export_deleted)(struct server_change_hook *h, const char *id);
};

struct server {
    struct loop *loop;
    struct server_config cfg;

    struct export **exports;       /* exports[0] is the default export */
    size_t n_exports;
    struct blockdev **bdevs;       /* every named chain */
    size_t n_bdevs;

    unsigned holds;                /* server_hold(): things besides
                                      connections the shutdown waits for */
    struct server_shutdown_hook *shutdown_hooks;
    struct server_change_hook *change_hook;
    bool allow_no_exports;         /* --control: exports come later */
    struct tls_server *tls;        /* --tls: credentials, mode, --tls-allow
                                      (owned by main; never NULL once
                                      serving) */

    struct listener *listeners;
    size_t n_listeners;

    struct conn *conns;            /* every live connection */
    struct peer *peers;            /* who is connected (peers.c) */
    unsigned n_handshaking;        /* connections still in the handshake */
    bool accept_paused;            /* n_handshaking at max_handshakes */
    struct nbd_budget budget;      /* the main loop's connections' */
    unsigned n_conns;              /* every connection, on any loop */
    struct worker *workers;        /* cfg.threads - 1 connection loops */
    unsigned n_workers;
    unsigned local_transmit;       /* connections in transmission on the
                                      main loop (the hand-over's count) */
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

/* Things the graceful shutdown must wait for besides connections (control
 * clients, job coroutines, commands in progress). */
void server_hold(struct server *srv);
void server_release(struct server *srv);
void server_add_shutdown_hook(struct server *srv,
                              struct server_shutdown_hook *h);

/* A listening unix socket at path (a stale socket there is replaced,
 * anything else refused), with mode (or the umask's when mode < 0).
 * Messages start with what+path.  Returns the descriptor or -errno. */
int server_unix_socket(const char *path, const char *what, int mode,
                       int backlog, struct error **errp);

/* Binds "HOST:PORT", "[V6]:PORT" or "unix:PATH". */
int server_add_listener(struct server *srv, const char *addr,
                        struct error **errp);
/* Socket activation (sd_listen_fds(3)): adopts the listening sockets a
 * service manager passed (LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES; the
 * variables are then removed from the environment).  Sockets named "nbd"
 * (or unnamed: "unknown") become NBD listeners; the one named "control"
 * is returned in *control_fd (-1 if none) for the control socket; any
 * other name is refused.  Returns the number of NBD listeners adopted
 * (0 when the process was not socket-activated), or -errno. */
int server_adopt_activated(struct server *srv, int *control_fd,
                           struct error **errp);

/* Admits the client connected on fd (a socket: accepted by a listener,
 * or any other connected stream socket) and starts its NBD handshake, as
 * a listener does with what it accepts: the connection and peer limits
 * apply (a refused client's fd is closed).  desc names where it came
 * from, for messages.  Returns the connection, or NULL when refused. */
struct conn *server_start_client(struct server *srv, int fd, bool tcp,
                                 const char *desc);
/* Arms every listener's accept that is not armed (start, and again after
 * a failed accept such as EMFILE). */
void server_listeners_rearm(struct server *srv);
/* Stops accepting (shutdown): pending accepts end, descriptors stay open
 * until server_listeners_free. */
void server_listeners_stop(struct server *srv);
/* Closes the listeners and unlinks their unix sockets. */
void server_listeners_free(struct server *srv);
/* ---- admission (peers.c) ---- */
struct peer;
enum admit_verdict {
    ADMIT_OK,
    ADMIT_PEER_FULL,           /* max_per_peer reached */
    ADMIT_PEER_HANDSHAKES,     /* max_handshakes_per_peer reached */
    ADMIT_NOMEM,
};
/* Counts a new client on fd as a connection and a handshake of its peer,
 * or says why it may not come in (then nothing is counted).  *out is the
 * peer either way (NULL for a refused first connection of a peer). */
enum admit_verdict peer_admit(struct server *srv, int fd, bool tcp,
                              struct peer **out);
const char *admit_verdict_str(enum admit_verdict v);
/* The peer's connection reached transmission. */
void peer_handshake_done(struct server *srv, struct peer *p);
/* The peer's connection is gone (in_handshake: before transmission). */
void peer_release(struct server *srv, struct peer *p, bool in_handshake);
/* "127.0.0.1", "::1", "uid 1000". */
const char *peer_desc(const struct peer *p);
void peers_free(struct server *srv);

/* Frees every export and block node (no connection may remain). */
void server_tables_free(struct server *srv);

/* Starts accepting and watching signals; call before loop_run(). */
int server_start(struct server *srv, int sig_fd, struct error **errp);

/* Graceful stop: no new clients, in-flight requests finish, replies are
 * sent, exports flushed, then the loop stops. */
void server_shutdown(struct server *srv);

/* Called by connections. */
void server_conn_gone(struct server *srv, struct conn *c);
void server_check_idle(struct server *srv);

/* ---- connection loops (workers.c) ---- */
/* Starts cfg.threads - 1 connection loops, each on a thread of its own
 * (entries and coro_stack as the main loop's).  0 or -errno (errp set);
 * on failure none is left running. */
int server_workers_start(struct server *srv, unsigned entries,
                         size_t coro_stack, struct error **errp);
/* Stops and joins them (after the main loop stopped: no connection is
 * left on any of them). */
void server_workers_stop(struct server *srv);
/* Connection c (main loop, plaintext) just entered transmission: the loop
 * it should be served on, or NULL for the main loop. */
struct worker *server_pick_worker(struct server *srv);
/* Hands c over to w (main loop; c is off srv->conns, nothing of it in
 * flight on the main loop's ring). */
void server_hand_over(struct server *srv, struct conn *c, struct worker *w);
/* c, served on a connection loop, was freed there except for what the
 * main loop owns: the main loop's side (export, peer, counts; frees c). */
void server_remote_conn_gone(struct conn *c);
/* Aborts the connections of export e on every connection loop. */
void server_workers_abort_export(struct server *srv, struct export *e);
/* Server shutdown: every connection loop drains its connections. */
void server_workers_drain(struct server *srv);

#endif
