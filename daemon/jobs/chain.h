/* strata — the chain jobs: external snapshot (blockdev-snapshot-sync) and
 * block-commit (intermediate and active), plus the helpers both use to
 * name and find the layers of an export's chain.
 *
 * Crash safety, the order every chain change follows:
 *   1. new files durable (qcow2_create_co syncs the file and its directory;
 *      data copied into a base is flushed),
 *   2. backing links durable (qcow2_set_backing_co syncs before and after),
 *   3. the state file names the new top (server_sync_co) — and, when guest
 *      writes go to a different file from now on, no write on it is
 *      acknowledged as durable (FLUSH, FUA) before the state file reaches
 *      it: a snapshot names its overlay before the switch; the active
 *      commit's pivot switches first and holds FLUSH and FUA replies at
 *      the export's sync gate until base is flushed and named (see
 *      commit_pivot_co),
 *   4. only then are old layers closed (never deleted: the user owns them).
 * A kill -9 at any instant leaves a state file naming a valid chain whose
 * content is what was acknowledged.
 *
 * Everything runs on the export's loop; functions ending in _co yield.
 */
#ifndef STRATA_CHAIN_H
#define STRATA_CHAIN_H

#include <stdbool.h>
#include <stdint.h>

#include "coro.h"
#include "error.h"
#include "jobs.h"
#include "server.h"

/* ---- naming layers ---- */

/* The absolute path of layer n of b's chain: b->filename for the top,
 * then each recorded backing name resolved against the path of the layer
 * above (as fmt_open_co does), so it never depends on the daemon's
 * working directory.  malloc'ed; NULL (with *errp) when n is not in the
 * chain or out of memory. */
char *chain_layer_path(const struct blockdev *b, const struct fmt_node *n,
                       struct error **errp);

/* The layer of b's chain named by file (a path: the same file as the
 * layer's, by device and inode, or the same string as its name) or by
 * node (the member name query-named-block-nodes reports: "NODE",
 * "NODE.backing", ...).  Exactly one of file and node is non-NULL.
 * *depth (may be NULL) is 0 for the top. */
struct fmt_node *chain_find(const struct blockdev *b, const char *file,
                            const char *node, unsigned *depth,
                            struct error **errp);

/* Checks that the layers from n down would be accepted again by
 * fmt_open_co() as backing layers of a top at top_path: every local one
 * inside backing_root, or, when that is NULL, inside top_path's directory;
 * remote storage under a local image only when b has backing-remote=. */
int chain_check_backing_root(const struct blockdev *b, struct fmt_node *n,
                             const char *top_path, const char *backing_root,
                             struct error **errp);

/* ---- blockdev-snapshot-sync ---- */

struct snapshot_args {
    const char *file;          /* snapshot-file (relative: to the cwd) */
    bool relative_backing;     /* strata: record the backing name relative
                                  to the overlay's directory */
    const char *format;        /* of the overlay; NULL: the formats layer's
                                  default (fmt_default_overlay_driver) */
};

struct snapshot_result {
    uint64_t stall_ns;         /* quiesce start .. resume (both quiesces:
                                  the switch, the old top read-only) */
    uint64_t total_ns;         /* the whole command */
    uint64_t request_stall_ns; /* longest request in flight meanwhile (so
                                  far: see export_watch_end) */
};

/* Creates a qcow2 overlay at a->file backed by e's current top and makes
 * it the top, atomically for the export's clients.  All or nothing: on
 * failure the chain is unchanged and the new file is removed.  The same
 * as snapshot_prepare_co, then snapshot_switch inside a quiesce of the
 * export, then snapshot_finish_co. */
int snapshot_sync_co(struct server *srv, struct export *e,
                     const struct snapshot_args *a, struct coro *co,
                     struct snapshot_result *res, struct error **errp);

/* A snapshot in three steps, for a transaction that switches several
 * exports (and changes bitmaps) at one instant. */
struct snapshot_prep {
    struct server *srv;
    struct export *e;
    struct fmt_node *old;      /* the top before */
    struct fmt_node *n;        /* the overlay, until the switch */
    char *bname;               /* backing name recorded in the overlay */
    char *old_filename, *old_driver; /* the node's, until finished */
    bool created;              /* the overlay file exists (removed on
                                  abort) */
    bool named;                /* b->filename names the overlay */
    bool busy, watching, switched;
    uint64_t t0, c0, qs;
};
/* Checks, creates and opens the overlay and records it in the state
 * file; the export keeps running on the old top, which is not flushed
 * here (see snapshot_finish_co).  On failure everything is undone. */
int snapshot_prepare_co(struct server *srv, struct export *e,
                        const struct snapshot_args *a, struct coro *co,
                        struct snapshot_prep *p, struct error **errp);
/* The switch: the overlay becomes the top.  The export is quiesced (by
 * the caller); cannot fail, does not yield. */
void snapshot_switch(struct snapshot_prep *p);
/* Undoes the switch (still quiesced, nothing written to the overlay),
 * for snapshot_abort_co. */
void snapshot_unswitch(struct snapshot_prep *p);
/* After the export resumed: the old top flushed (the guest writing into
 * the overlay meanwhile) and made read-only; fills res's total and
 * request stall (res->stall_ns: the caller's quiesce, to which the second
 * one is added). */
void snapshot_finish_co(struct snapshot_prep *p, struct coro *co,
                        struct snapshot_result *res);
/* Undoes a prepared snapshot that was not switched (the overlay closed
 * and removed, the state file back to the old top). */
void snapshot_abort_co(struct snapshot_prep *p, struct coro *co);

/* ---- block-commit ---- */

struct commit_args {
    const char *job_id;
    const char *top, *top_node;    /* at most one; none: the live top */
    const char *base, *base_node;  /* at most one; none: the bottom */
    const char *backing_file;      /* intermediate only */
    struct job_create_opts opts;
};

/* Checks the arguments, creates the job and starts it. */
struct job *commit_start(struct job_engine *eng, struct server *srv,
                         struct export *e, const struct commit_args *a,
                         struct error **errp);

#endif
