/* strata — block nodes and exports: what a chain is to the daemon, how a
 * client reaches it, and how jobs pause and observe its requests.
 *
 * A block node (struct blockdev) owns a chain of format nodes; an export
 * serves one block node under an NBD name.  The tables of both hang off
 * the server (server.h) and, like everything of a loop, are touched only
 * from its thread.
 */
#ifndef STRATA_EXPORTS_H
#define STRATA_EXPORTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "coro.h"
#include "error.h"
#include "format.h"
#include "tls.h"
#include "stats.h"

struct server;

/* A dirty bitmap an export offers as the meta context
 * "qemu:dirty-bitmap:NAME" (QEMU's block-export-add "bitmaps"). */
struct export_bitmap_ref {
    char *node;                /* the node holding it; NULL: the first
                                  member of the export's chain, top down,
                                  that has a bitmap of that name */
    char *name;
};
/* Bitmaps one export may offer (the meta context mask of a connection). */
#define EXPORT_MAX_BITMAPS 16

struct export_config {
    char *name;                /* NBD export name; "" is allowed */
    char *file;
    char *format;              /* NULL: raw (refused if it looks like qcow2) */
    char *description;         /* NULL: none */
    char *id;                  /* QMP export id (NULL: derived from name) */
    char *node_name;           /* QMP node name (NULL: same as id) */
    bool read_only;
    bool direct;               /* cache=none */
    char *backing_root;        /* NULL: the top image's directory */
    char *backing_remote;      /* remote storage local overlays may name as
                                  backing, PREFIX[SETTINGS]; NULL: none */
    uint64_t l2_cache_bytes;   /* 0: default */
    uint64_t refcount_cache_bytes;
    struct tls_allow allow;    /* allow=: the TLS identities that may see
                                  and open it (absent: everyone) */
    struct export_bitmap_ref *bitmaps; /* bitmap=NAME (repeatable) */
    size_t n_bitmaps;
};

/* A named chain (QMP: a block node added by blockdev-add, or implicitly by
 * --export).  It owns the chain; an export serves it. */
struct blockdev {
    char *node_name;
    char *driver;              /* the top's format driver (registry name) */
    char *filename;            /* image file of the top node */
    bool read_only;
    bool direct;               /* cache=none */
    char *backing_root;        /* as configured, or NULL */
    char *backing_remote;      /* as configured, or NULL */
    uint64_t l2_cache_bytes;   /* as configured, 0 = default */
    uint64_t refcount_cache_bytes;
    struct fmt_node *root;     /* chain top: where guest I/O goes.  Change
                                  it only with export_set_root() while the
                                  export is quiesced. */
    struct export *export;     /* serving it (at most one), or NULL */
    bool chain_busy;           /* a snapshot or commit is changing the
                                  chain (chain.h): no other may start, and
                                  the node and its export stay */
    bool transient;            /* a view that lives only in this process
                                  (snapshot-access of a backup): not
                                  recorded in the state file */
};

/* What a write notifier sees: a guest write, write-zeroes or trim. */
enum export_write_kind {
    EXPORT_WRITE,
    EXPORT_WRITE_ZEROES,
    EXPORT_TRIM,
};

struct export_write_req {
    enum export_write_kind kind;
    uint64_t offset;
    uint64_t length;
    const struct iovec *iov;   /* the data (EXPORT_WRITE only), else NULL */
    int iovcnt;
    unsigned flags;            /* FMT_* flags of the request */
};

/* A job's view of guest writes on an export (active commit: dirty bitmap
 * and write-blocking mirroring).  Both hooks are optional and run in the
 * request's coroutine:
 *   before_co: before the request reaches the chain; may yield (wait for
 *              an overlapping copy); a -errno fails the request with that
 *              error and skips it (after_co still runs, with that ret);
 *   after_co:  after it, with its result; may yield (copy the data to the
 *              mirror target); a -errno turns a success into that error.
 * Add and remove notifiers only while the export is quiesced, so every
 * request sees either both hooks of a notifier or none. */
struct export_write_notifier {
    int (*before_co)(struct export_write_notifier *n, struct coro *co,
                     const struct export_write_req *req);
    int (*after_co)(struct export_write_notifier *n, struct coro *co,
                    const struct export_write_req *req, int ret);
    void *opaque;
    struct export_write_notifier *next;
};

struct export {
    struct export_config cfg;  /* name, description, id as created; the
                                  file keys describe the node as given */
    struct server *srv;
    struct blockdev *bdev;     /* the chain it serves */
    bool writable;
    unsigned n_conns;          /* connections in transmission on it */
    bool deleted;              /* removed from srv->exports; freed when
                                  the last connection is gone */

    /* Quiesce (export_quiesce_co / export_resume). */
    unsigned inflight;         /* requests between enter and leave */
    unsigned quiesce_count;    /* > 0: new requests wait */
    struct co_queue resume_q;  /* requests waiting for export_resume */
    struct co_queue drained_q; /* quiescers waiting for inflight == 0 */
    uint64_t quiesce_start_ns;
    uint64_t last_stall_ns;    /* quiesce start .. resume, last time */
    uint64_t max_stall_ns;
    uint64_t n_quiesces;

    /* What the guest sees of a snapshot or pivot (export_watch_begin /
     * export_watch_end): the longest time one request took (from
     * export_enter_co to export_leave) among those in flight at any time
     * while one ran — waits for the quiesce, for the metadata lock, for
     * anything the event made requests wait for.  Requests that make
     * data durable (FLUSH, FUA) do not count: they wait for their own
     * sync, which takes as long as the dirty data it writes. */
    unsigned watching;             /* > 0: an event is running */
    uint64_t watch_start_ns, watch_end_ns;
    uint64_t last_request_stall_ns; /* during the last event */
    uint64_t max_request_stall_ns;  /* during any */

    struct export_write_notifier *write_notifiers;

    /* The sync gate (export_gate_*): after a switch to a top that the
     * state file does not name yet, the replies to FLUSH and FUA
     * requests wait until it does. */
    bool gate_closed;
    bool gate_failed;          /* the last attempt to make the new top
                                  durable and named failed: each waiting
                                  FLUSH or FUA request tries again */
    bool gate_settling;        /* an attempt is running */
    bool gate_busy;            /* the chain's chain_busy is the gate's to
                                  clear when it opens */
    char *gate_filename;       /* the new top's file and driver, for
                                  bdev's filename and driver once the top */
    char *gate_driver;         /* is durable (NULL once they are) */
    struct co_queue gate_q;    /* requests waiting for the gate */

    /* The bitmaps it offers, cfg.n_bitmaps of them, in cfg.bitmaps'
     * order (context ids META_DIRTY_BITMAP + i): each held busy (it
     * cannot change or go) until the export is freed. */
    struct fmt_bitmap *bitmaps[EXPORT_MAX_BITMAPS];

    struct export_stats stats; /* counted by nbd/transmit.c (stats.h) */
};

/* The chain top an export serves. */
static inline struct fmt_node *export_root(const struct export *e)
{
    return e->bdev->root;
}

/* Parses "name=...,file=...,format=...,readonly=on,cache=none,
 * description=...,id=...,node-name=..." (",," is a literal comma). */
int export_config_parse(const char *spec, struct export_config *cfg,
                        struct error **errp);
void export_config_clear(struct export_config *cfg);
/* Appends a bitmap reference (node may be NULL); copies the strings. */
int export_config_add_bitmap(struct export_config *cfg, const char *node,
                             const char *name, struct error **errp);
/* The QMP id an --export gets: id=, else its name when that is a valid id,
 * "default" for the empty name, else "export-" and a hash of the name.
 * malloc'ed (NULL: out of memory). */
char *export_config_id(const struct export_config *cfg);
/* --export: opens the chain as a block node (named node-name=, else like
 * the id) and exports it; takes ownership of cfg's strings. */
int server_add_export(struct server *srv, struct export_config *cfg,
                      struct error **errp);
/* By NBD export name (len 0: the default export). */
struct export *server_find_export(struct server *srv, const char *name,
                                  size_t len);
struct export *server_find_export_id(struct server *srv, const char *id);

/* ---- block nodes (QMP blockdev-add / blockdev-del) ---- */
struct blockdev_config {
    const char *node_name;
    const char *driver;        /* a format driver's registry name */
    const char *filename;
    bool read_only;
    bool direct;
    const char *backing_root;  /* qcow2: NULL = the top's directory */
    const char *backing_remote; /* NULL: no remote backing under local
                                   images (fmt_open_opts) */
    uint64_t l2_cache_bytes;   /* qcow2: 0 = default */
    uint64_t refcount_cache_bytes;
};
/* Before the loop runs (start-up, state file). */
struct blockdev *server_blockdev_add(struct server *srv,
                                     const struct blockdev_config *cfg,
                                     struct error **errp);
/* From a coroutine on the running loop (QMP blockdev-add). */
struct blockdev *server_blockdev_add_co(struct server *srv,
                                        const struct blockdev_config *cfg,
                                        struct coro *co, struct error **errp);
/* Adds a node made by the caller (a filter view such as snapshot-access,
 * no image file of its own) under node_name; desc names it for messages
 * and query-named-block-nodes' "file".  Takes root on success.  Transient:
 * not recorded in the state file. */
struct blockdev *server_blockdev_add_node(struct server *srv,
                                          const char *node_name,
                                          struct fmt_node *root,
                                          const char *desc,
                                          struct error **errp);
/* Closes a node that no export uses.  With co (a running QMP command),
 * its chain is flushed first, and a failed flush keeps the node; co NULL
 * only for a node nothing was written to. */
int server_blockdev_del(struct server *srv, const char *node_name,
                        struct coro *co, struct error **errp);
/* path made absolute against the working directory (malloc'ed); rbd:
 * specs and absolute paths as they are.  NULL when out of memory. */
char *server_absolute_path(const char *path);
struct blockdev *server_find_blockdev(struct server *srv,
                                      const char *node_name);
/* A member of a chain by the name query-named-block-nodes shows: "NODE"
 * (the top), "NODE.backing", "NODE.backing.backing"...; *bp (when not
 * NULL) is the block node whose chain holds it.  NULL if none. */
struct fmt_node *server_find_node(struct server *srv, const char *name,
                                  struct blockdev **bp);

/* ---- exports at run time (QMP block-export-add / block-export-del) ---- */
struct export_add_config {
    const char *id;
    const char *node_name;
    const char *name;          /* NULL: the node name, as QSD does */
    const char *description;   /* NULL: none */
    bool writable;
    const struct tls_allow *allow; /* NULL: everyone (copied) */
    const struct export_bitmap_ref *bitmaps; /* offered (copied) */
    size_t n_bitmaps;
};
struct export *server_export_add(struct server *srv,
                                 const struct export_add_config *cfg,
                                 struct error **errp);
enum export_del_mode {
    EXPORT_DEL_SAFE,           /* refuse while clients are connected */
    EXPORT_DEL_HARD,           /* disconnect them */
};
/* Removes the export from the table at once (no new client can choose
 * it); it is freed, and change_hook->export_deleted called, once its last
 * connection is gone (at once when there is none). */
int server_export_del(struct server *srv, const char *id,
                      enum export_del_mode mode, struct error **errp);
/* A connection on a deleted export went away (conn.c). */
void server_export_conn_gone(struct server *srv, struct export *e);

/* Calls the change hook (state file): schedules a save. */
void server_changed(struct server *srv);
/* server_changed(), then waits until the state file is durable (0 at once
 * without a state file).  What a job calls after a chain change. */
int server_sync_co(struct server *srv, struct coro *co);

/* ---- quiesce: what snapshot and the active-commit pivot use ----
 *
 * export_quiesce_co(): from now on, new requests on the export's
 * connections wait (queued, not failed: they hold their request slots, so
 * the per-client bounds still apply); returns once the requests already
 * running on the chain have finished.  Nests (a count).
 * export_resume(): when the count drops to 0, the waiting requests go on,
 * each on whatever export_root() is by then.  The stall (quiesce start to
 * resume) is logged at -v and kept in last_stall_ns / max_stall_ns.
 * Returns the stall of this quiesce in ns (0 when still nested). */
void export_quiesce_co(struct export *e, struct coro *co);
uint64_t export_resume(struct export *e);
/* Swaps the chain top (quiesced only: asserted). */
void export_set_root(struct export *e, struct fmt_node *root);

/* Requests call these around their work on the chain (nbd-transmit.c). */
/* Returns the request's start time, for export_leave; synced: the
 * request made data durable (FLUSH, FUA), which export_watch_end does not
 * count. */
uint64_t export_enter_co(struct export *e, struct coro *co);
void export_leave(struct export *e, uint64_t start_ns, bool synced);
/* Brackets a snapshot or pivot whose guest-visible stall is measured
 * (see struct export).  export_watch_end returns the longest request time
 * seen so far; requests still in flight update last_request_stall_ns
 * when they leave. */
void export_watch_begin(struct export *e);
uint64_t export_watch_end(struct export *e);

/* ---- the sync gate: a switch that the state file follows later ----
 *
 * The active commit's pivot switches the export to base inside a short
 * quiesce and makes base durable afterwards, while the guest writes into
 * it.  Until base is durable and the state file names it, a restart
 * would open the old top, which lacks every write made since the switch:
 * no FLUSH or FUA reply may say they are durable.  So:
 *
 * export_gate_close(): at the switch (quiesced: asserted).  filename and
 * driver (taken over) are what bdev's filename and driver become once
 * the new top is durable: until then the state file, whoever saves it,
 * still names the old top.
 * export_gate_settle_co(): flushes the chain top, then renames bdev,
 * then saves the state file (server_sync_co); on success the gate opens
 * and every waiting reply goes; on failure it stays closed, failed.
 * export_gate_wait_co(): what a FLUSH or FUA request calls after it ran,
 * before its reply (nbd-transmit.c): 0 at once while the gate is open;
 * else waits until it opens; finding it failed, it tries once itself
 * (export_gate_settle_co) and returns that result.  Ordinary reads and
 * writes never wait for the gate.
 * export_gate_clear(): frees what a gate that never opened holds (the
 * export goes away). */
void export_gate_close(struct export *e, char *filename, char *driver);
int export_gate_settle_co(struct export *e, struct coro *co);
int export_gate_wait_co(struct export *e, struct coro *co);
void export_gate_clear(struct export *e);

void export_add_write_notifier(struct export *e,
                               struct export_write_notifier *n);
void export_remove_write_notifier(struct export *e,
                                  struct export_write_notifier *n);
/* Runs the notifiers' hooks (nbd-transmit.c). */
int export_notify_before_co(struct export *e, struct coro *co,
                            const struct export_write_req *req);
int export_notify_after_co(struct export *e, struct coro *co,
                           const struct export_write_req *req, int ret);

#endif
