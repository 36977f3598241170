/* strata — control socket internals shared by control.c (clients,
 * framing, dispatch) and control-cmds.c (the command table). */
#ifndef STRATA_CONTROL_INT_H
#define STRATA_CONTROL_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "control.h"
#include "dirty-bitmap.h"
#include "loop.h"
#include "stream.h"
#include "strata-config.h"

struct json_object;
struct json_tokener;

#define CTL_RBUF_SIZE (64u << 10)

/* One queued message: its text and CRLF, in one allocation. */
struct ctl_out {
    struct stream_item si;
    struct iovec iov;
    char data[];
};

struct ctl_client {
    struct control *ctl;
    struct ctl_client *next, *prev;
    uint64_t id;
    int fd;
    bool negotiated;           /* qmp_capabilities done: commands, events */
    bool closing;              /* no more input; send what is queued, close */
    bool dead;                 /* socket shut; freed once nothing pending */
    bool cmd_running;          /* a command coroutine works for it */

    struct json_tokener *tok;  /* incremental parser, one message at a time */
    size_t msg_bytes;          /* bytes of the message being parsed */
    /* socket I/O; st.sq_bytes (queued, unsent) is bounded by
     * CONTROL_MAX_OUT */
    struct stream st;

    struct loop_hook kick;

    /* Last, and not cleared when a client is made: only what a read put
     * there is ever looked at. */
    uint8_t rbuf[CTL_RBUF_SIZE];
};

struct control {
    struct server *srv;
    struct loop *loop;
    struct state *state;           /* may be NULL */
    struct job_engine *jobs;
    char *path;
    int fd;
    bool adopted;                  /* fd from socket activation: the
                                      service manager owns the path */
    struct loop_op accept_op;
    struct loop_op cancel_op;      /* cancels accept_op (adopted) */
    bool accept_pending;
    bool closed;                   /* shutting down */
    uint64_t close_deadline_ns;
    struct ctl_client *clients;
    unsigned n_clients;
    uint64_t next_client_id;
    struct loop_timer timer;
    struct server_shutdown_hook shutdown_hook;
    struct server_change_hook change_hook;
    /* Events that must follow the reply of the command that caused them
     * (BLOCK_EXPORT_DELETED, as QEMU emits it from a bottom half): sent
     * at the end of the loop iteration. */
    struct ctl_event *deferred_head, *deferred_tail;
    struct loop_hook deferred_hook;
    struct ctl_backup *backups;    /* pull-mode backups attached
                                      (backup-cmds.c) */
};

struct ctl_event {
    struct ctl_event *next;
    char *name;
    struct json_object *data;
};

/* The context of one command run. */
struct ctl_cmd_ctx {
    struct control *ctl;
    struct ctl_client *client;
    struct coro *co;               /* the command's coroutine */
    const char *err_class;         /* QMP error class when failing */
    /* runs after the reply was queued (quit: then shut down) */
    void (*after_reply)(struct ctl_cmd_ctx *cx);
};

/* Argument types, checked before the handler runs. */
enum ctl_arg_type {
    CTL_ARG_STR,
    CTL_ARG_BOOL,
    CTL_ARG_INT,
    CTL_ARG_OBJ,
    CTL_ARG_ARRAY,
    CTL_ARG_ANY,
};

struct ctl_arg {
    const char *name;
    enum ctl_arg_type type;
    bool required;
};

/* Returns the "return" value (a new object; {} for none), or NULL with
 * *errp set (and cx->err_class if not GenericError).  Runs in its own
 * coroutine (cx->co) and may yield. */
typedef struct json_object *ctl_cmd_fn(struct ctl_cmd_ctx *cx,
                                       struct json_object *args,
                                       struct error **errp);

struct ctl_cmd {
    const char *name;
    ctl_cmd_fn *fn;
    const struct ctl_arg *args;    /* terminated by a NULL name */
};

const struct ctl_cmd *ctl_cmd_find(const char *name);

/* bitmap-cmds.c */
ctl_cmd_fn cmd_block_dirty_bitmap_add, cmd_block_dirty_bitmap_remove,
    cmd_block_dirty_bitmap_clear, cmd_block_dirty_bitmap_enable,
    cmd_block_dirty_bitmap_disable, cmd_block_dirty_bitmap_merge;
struct blockdev;
struct fmt_node;
/* BlockDirtyInfo of every bitmap of n (a new array), or NULL if it has
 * none (the member is then left out, as QEMU does). */
struct json_object *ctl_dirty_bitmaps_json(struct fmt_node *n);

/* One bitmap action of a transaction, done, and what undoes it. */
enum ctl_bitmap_undo_kind {
    CTL_BITMAP_NONE,
    CTL_BITMAP_ADDED,          /* undo: remove bm */
    CTL_BITMAP_REMOVED,        /* bm detached (after prev); commit: drop */
    CTL_BITMAP_BITS,           /* bm's bits changed; saved holds them */
    CTL_BITMAP_RECORDING,      /* bm->recording changed from recording */
};
struct ctl_bitmap_undo {
    enum ctl_bitmap_undo_kind kind;
    struct fmt_node *n;
    struct fmt_bitmap *bm, *prev;
    struct dbitmap saved;
    bool recording;
};
/* Is type one of the block-dirty-bitmap-* commands? */
bool ctl_bitmap_action_known(const char *type);
/* Runs the command type on args (checked against its table entry) with
 * the command's checks and messages, filling *u.  0 or -errno. */
int ctl_bitmap_action_co(struct ctl_cmd_ctx *cx, const char *type,
                         struct json_object *args, struct ctl_bitmap_undo *u,
                         struct error **errp);
/* Reverses a done action; commits one (a removal deletes the bitmap for
 * good, in the image too). */
void ctl_bitmap_undo_co(struct ctl_cmd_ctx *cx, struct ctl_bitmap_undo *u);
void ctl_bitmap_commit_co(struct ctl_cmd_ctx *cx, struct ctl_bitmap_undo *u);

/* transaction.c */
ctl_cmd_fn cmd_transaction;
struct snapshot_args;
struct export;
/* blockdev-snapshot-sync's arguments checked as the command checks them
 * (commands.c): the export to snapshot and *sa, or NULL with *errp. */
struct export *ctl_snapshot_args(struct ctl_cmd_ctx *cx, struct json_object *args,
                                 struct snapshot_args *sa, struct error **errp);

/* backup-cmds.c */
ctl_cmd_fn cmd_blockdev_backup;
struct ctl_backup;
/* The export a job on device (an export id or a node name) works on:
 * found, and no job or chain change on it; else NULL with *errp
 * (commands.c). */
struct export *ctl_job_target(struct ctl_cmd_ctx *cx, const char *device,
                              struct error **errp);
/* blockdev-backup's arguments checked and its filter made (not attached
 * yet); NULL with *errp. */
struct ctl_backup *ctl_backup_prepare(struct ctl_cmd_ctx *cx,
                                      struct json_object *args,
                                      struct error **errp);
/* With the export quiesced: the filter sees every guest write from now
 * on / no more (undo of a transaction). */
void ctl_backup_attach(struct ctl_backup *bk);
void ctl_backup_unattach(struct ctl_backup *bk);
/* Frees a prepared backup that was never attached, or unattached. */
void ctl_backup_discard(struct ctl_backup *bk);
/* The export a prepared backup works on. */
struct export *ctl_backup_export(struct ctl_backup *bk);
/* Would two prepared backups clash (job id, target, filter name)? */
bool ctl_backup_same(const struct ctl_backup *a, const struct ctl_backup *b);
/* Starts the job of an attached backup (it owns bk from then on). */
int ctl_backup_start(struct ctl_backup *bk, struct json_object *args,
                     struct error **errp);
/* The copy-before-write filter called name, or NULL. */
struct fmt_node *ctl_backup_filter(struct control *ctl, const char *name);
/* blockdev-add driver=snapshot-access: the view over the filter file
 * names; NULL with *errp. */
struct fmt_node *ctl_snapshot_access_open(struct ctl_cmd_ctx *cx,
                                          struct json_object *file,
                                          const char *node_name,
                                          struct error **errp);

/* debug-cmds.c */
ctl_cmd_fn cmd_x_debug_fault_inject, cmd_x_debug_fault_query;
const struct ctl_cmd *ctl_cmd_table(size_t *n);

/* Checks args (an object, or NULL = {}) against spec: every required
 * member present, no unknown member, each of its type.  prefix is put
 * before member names in messages ("file." for nested objects). */
int ctl_args_check(struct json_object *args, const struct ctl_arg *spec,
                   const char *prefix, struct error **errp);

void ctl_client_send(struct ctl_client *cl, struct json_object *msg);
void ctl_reply_return(struct ctl_client *cl, struct json_object *id,
                      struct json_object *ret);
void ctl_reply_error(struct ctl_client *cl, struct json_object *id,
                     const char *cls, const char *desc);
/* Broadcasts an event to every negotiated client; takes data. */
void ctl_emit(struct control *ctl, const char *event, struct json_object *data);

#endif
