/* strata — the control socket: JSON in the QMP dialect on a unix socket.
 *
 * Protocol (QEMU's docs/interop/qmp-spec): on connect the server sends a
 * greeting {"QMP": {"version": ..., "capabilities": []}}; the client must
 * send qmp_capabilities before anything else (other commands get the class
 * CommandNotFound); then {"execute": NAME, "arguments": {...}, "id": ANY}
 * gets {"return": ..., "id": ANY} or {"error": {"class", "desc"}, "id"};
 * events {"event", "data", "timestamp": {"seconds", "microseconds"}} go to
 * every client past negotiation.  Every message ends with CRLF.
 *
 * Input is a stream of JSON objects, parsed incrementally by json-c's
 * json_tokener.  One command runs at a time per client (in its own
 * coroutine, so commands may wait for I/O); further input waits.
 *
 * Bounds: a message over CONTROL_MAX_MSG bytes gets an error and the client
 * is closed; a client whose unsent output passes CONTROL_MAX_OUT bytes (it
 * does not read its replies or events) is dropped; at most
 * CONTROL_MAX_CLIENTS clients at once.
 *
 * Everything runs on the server's loop; sockets go through the ring.
 */
#ifndef STRATA_CONTROL_H
#define STRATA_CONTROL_H

#include <sys/types.h>

#include "error.h"
#include "server.h"

#define CONTROL_MAX_MSG (1u << 20)
#define CONTROL_MAX_OUT (8u << 20)
#define CONTROL_MAX_CLIENTS 64

struct control;
struct job_engine;
struct state;

/* Binds the socket (mode e.g. 0600, its group gid unless (gid_t)-1);
 * starts accepting at once (the loop must run for anything to happen).
 * state may be NULL (no state file). */
struct control *control_new(struct server *srv, const char *path,
                            unsigned mode, gid_t gid, struct state *state,
                            struct error **errp);
/* The same on a listening socket passed by the service manager (socket
 * activation); desc names it in messages.  The socket file is left alone
 * at exit. */
struct control *control_new_fd(struct server *srv, int fd, const char *desc,
                               struct state *state, struct error **errp);
/* After the loop stopped. */
void control_free(struct control *ctl);

/* The job engine whose jobs the commands act on. */
struct job_engine *control_jobs(struct control *ctl);

#endif
