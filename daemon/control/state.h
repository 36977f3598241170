/* strata — the persistent state file (--state-file PATH).
 *
 * Records every block node (node name, format, top image file, read-only,
 * cache) and every export (id, node, NBD name, description, writable), as
 * JSON:
 *
 *   {"version": 1,
 *    "nodes":   [{"node-name", "driver", "filename", "read-only",
 *                 "cache-direct"}],
 *    "exports": [{"id", "node-name", "name", "description", "writable"}]}
 *
 * Saved whenever exports or chains change (server_changed()): written to
 * PATH.tmp through the ring, fsync'ed, renamed over PATH, and the directory
 * fsync'ed — so at every instant PATH is either the old or the new state.
 * A chain change (snapshot, commit) makes its new chain durable in its
 * files first, then calls server_changed() and waits for state_sync_co()
 * before telling the user it is done.
 *
 * At start-up state_load() re-creates the nodes and exports it records,
 * before the --export options are applied: an --export whose id (id=,
 * else derived from its name) the state file already defines is skipped,
 * because the state knows the chain's current top (after snapshots) and
 * the command line does not.
 */
#ifndef STRATA_STATE_H
#define STRATA_STATE_H

#include <stdbool.h>

#include "coro.h"
#include "error.h"
#include "server.h"

struct state;

struct state *state_new(struct server *srv, const char *path);
void state_free(struct state *st);

/* Start-up, before the loop runs (blocking reads are fine there).
 * A missing file is not an error (*loaded = false). */
int state_load(struct state *st, bool *loaded, struct error **errp);

/* Becomes the server's change hook: every server_changed() schedules a
 * save.  (With a control socket, the control's hook forwards to
 * state_notify_changed() / state_sync_co() instead.) */
void state_attach(struct state *st);
/* Schedules a save of the current exports and chains. */
void state_notify_changed(struct state *st);

/* Waits until everything changed before this call is on stable storage;
 * returns 0 or the -errno of the failed save. */
int state_sync_co(struct state *st, struct coro *co);

/* An export's allow list as JSON (an array of strings; QMP
 * block-export-add's "allow" and the state file): parse into *out (absent
 * stays absent when v is NULL), and build (NULL when absent). */
struct json_object;
int state_allow_from_json(struct json_object *v, struct tls_allow *out,
                          struct error **errp);
struct json_object *state_allow_to_json(const struct tls_allow *a);

/* Saves scheduled or running (shutdown waits for them via server_hold). */
bool state_busy(const struct state *st);

#endif
