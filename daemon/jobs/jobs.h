/* strata — the job engine: long-running operations on an export's chain
 * (block-commit, snapshot...) that run beside guest I/O on the export's loop.
 *
 * A job is a coroutine running its driver's run_co() plus a state machine
 * that follows QEMU's (qapi/job.json), so that QMP tools see what they
 * expect from query-jobs and the JOB_STATUS_CHANGE / BLOCK_JOB_* events:
 *
 *   created -> running <-> paused
 *              running -> ready <-> standby
 *              running | ready -> waiting -> pending -> concluded -> null
 *   any live state -> aborting -> concluded -> null
 *
 * The transitions and which verb (cancel, pause, complete, ...) each state
 * accepts are declared as tables in jobs.c (JOB_STATUSES, JOB_VERBS); a
 * forbidden transition is a programmer error (assert), a forbidden verb is
 * a user error ("Job 'x' in state 'y' cannot accept command verb 'z'").
 *
 * Everything runs on one loop: no locks.  Functions ending in _co yield and
 * must be called from the job's own coroutine.
 *
 * How a driver plugs in (sketch of a copy job):
 *
 *   static int copy_run_co(struct job *job, struct coro *co, struct error **errp)
 *   {
 *       job_progress_set_total(job, len);
 *       for (off = 0; off < len; off += n) {
 *           if (job_is_cancelled(job))
 *               return -ECANCELED;
 *           int r = copy_chunk_co(...);
 *           if (r < 0) {
 *               switch (job_handle_error_co(job, co, r, is_read)) {
 *               case JOB_ERROR_REPORT: return error_setf(errp, -r, "...");
 *               case JOB_ERROR_IGNORE: break;       // count it done
 *               case JOB_ERROR_RETRY:  n = 0; continue;
 *               }
 *           }
 *           job_progress_update(job, n);
 *           job_ratelimit_co(job, co, n);   // sleeps for the speed limit,
 *                                           // includes a pause point
 *       }
 *       return 0;
 *   }
 *
 * Jobs that keep running until told (active commit) call
 * job_transition_to_ready() once converged and then loop until
 * job_complete_requested() or cancellation.
 */
#ifndef STRATA_JOBS_H
#define STRATA_JOBS_H

#include <stdbool.h>
#include <stdint.h>

#include "coro.h"
#include "error.h"
#include "loop.h"

struct json_object;
struct job;
struct job_engine;

#define JOB_STATUSES(X)              \
    X(UNDEFINED, "undefined")        \
    X(CREATED, "created")            \
    X(RUNNING, "running")            \
    X(PAUSED, "paused")              \
    X(READY, "ready")                \
    X(STANDBY, "standby")            \
    X(WAITING, "waiting")            \
    X(PENDING, "pending")            \
    X(ABORTING, "aborting")          \
    X(CONCLUDED, "concluded")        \
    X(NULL, "null")

enum job_status {
#define X(s, n) JOB_STATUS_##s,
    JOB_STATUSES(X)
#undef X
    JOB_STATUS__MAX
};

#define JOB_VERBS(X)                 \
    X(CANCEL, "cancel")              \
    X(PAUSE, "pause")                \
    X(RESUME, "resume")              \
    X(SET_SPEED, "set-speed")        \
    X(COMPLETE, "complete")          \
    X(FINALIZE, "finalize")          \
    X(DISMISS, "dismiss")

enum job_verb {
#define X(v, n) JOB_VERB_##v,
    JOB_VERBS(X)
#undef X
    JOB_VERB__MAX
};

/* BlockdevOnError */
enum job_on_error {
    JOB_ON_ERROR_REPORT,
    JOB_ON_ERROR_IGNORE,
    JOB_ON_ERROR_ENOSPC,
    JOB_ON_ERROR_STOP,
    JOB_ON_ERROR_AUTO,         /* = report for the jobs strata has */
};

/* What the copy loop does after job_handle_error_co(). */
enum job_error_action {
    JOB_ERROR_REPORT,          /* fail the job with this error */
    JOB_ERROR_IGNORE,          /* count the range as done, go on */
    JOB_ERROR_RETRY,           /* the job was stopped and resumed: retry */
};

/* QEMU's rule for ids (jobs, nodes, exports): a letter, then letters,
 * digits, '-', '.', '_'; at most 128 characters. */
bool qmp_id_wellformed(const char *id);

const char *job_status_name(enum job_status s);
const char *job_verb_name(enum job_verb v);
/* Parses a BlockdevOnError name; false if unknown. */
bool job_on_error_parse(const char *s, enum job_on_error *out);
const char *job_on_error_name(enum job_on_error e);
/* Whether the state machine allows from -> to / verb in state s. */
bool job_transition_allowed(enum job_status from, enum job_status to);
bool job_verb_allowed(enum job_status s, enum job_verb v);

/* ---- the rate limiter (pure: the caller passes the clock) ----
 * A virtual clock advances by bytes / speed per accounted chunk; the delay
 * is how far it runs ahead of now.  A job idle for a while may burst at
 * most one slice (100 ms) worth of bytes. */
#define JOB_RATELIMIT_SLICE_NS 100000000ull

struct job_ratelimit {
    uint64_t speed;            /* bytes per second, 0 = unlimited */
    uint64_t vt_ns;            /* virtual time the accounted bytes reach */
};

void job_ratelimit_set_speed(struct job_ratelimit *rl, uint64_t speed,
                             uint64_t now_ns);
/* Accounts bytes just transferred; returns how long to sleep (ns). */
uint64_t job_ratelimit_account(struct job_ratelimit *rl, uint64_t now_ns,
                               uint64_t bytes);

/* ---- the driver's ops table ---- */

struct job_driver {
    const char *type;          /* JobType: "commit", "snapshot", ... */

    /* Required.  The body, in the job's coroutine.  Returns 0 on success
     * or -errno (with *errp set for the user; -ECANCELED when it stopped
     * because of job_is_cancelled()). */
    int (*run_co)(struct job *job, struct coro *co, struct error **errp);

    /* Optional: block-job-complete on a READY job.  Runs in the caller's
     * context (a QMP command), must not yield; typically sets a flag that
     * run_co() polls (job_complete_requested() is set by the engine
     * before this is called).  Returns 0 or -errno with *errp set.
     * NULL: the job type cannot be completed by the user. */
    int (*complete)(struct job *job, struct error **errp);

    /* Optional finalisation steps, in the job's coroutine, after run_co.
     * prepare_co may still fail (then abort_co runs instead of
     * commit_co); commit_co and abort_co must not fail; clean_co always
     * runs last.  This is where a commit job rewrites backing links and
     * swaps export roots (under export_quiesce_co). */
    int (*prepare_co)(struct job *job, struct coro *co, struct error **errp);
    void (*commit_co)(struct job *job, struct coro *co);
    void (*abort_co)(struct job *job, struct coro *co);
    void (*clean_co)(struct job *job, struct coro *co);

    /* Optional: a pause, resume, cancel or speed change was requested:
     * wake whatever the driver waits on other than job_sleep_co() and
     * job_pause_point_co() (those the engine wakes itself).  No yield. */
    void (*kick)(struct job *job);

    /* Optional: frees the driver's state (job->opaque) when the job is
     * freed (after dismiss). */
    void (*free)(struct job *job);
};

/* How jobs tell the world: the control socket sets these. */
struct job_engine_ops {
    /* Broadcasts an event; takes ownership of data (a json object). */
    void (*emit)(void *opaque, const char *event, struct json_object *data);
    /* Job coroutines hold the server up (graceful shutdown waits). */
    void (*hold)(void *opaque);
    void (*release)(void *opaque);
};

struct job_create_opts {
    uint64_t speed;                /* bytes/s, 0 = unlimited */
    enum job_on_error on_error;
    bool manual_finalize;          /* auto-finalize = false */
    bool manual_dismiss;           /* auto-dismiss = false */
};

struct job {
    struct job_engine *eng;
    struct job *next, *prev;       /* eng->jobs, creation order */
    const struct job_driver *drv;
    void *opaque;                  /* driver state */
    char *id;
    char *device;                  /* the export it works on (may be NULL) */

    enum job_status status;
    uint64_t progress_current;     /* bytes done */
    uint64_t progress_total;       /* bytes to do (may grow) */
    struct job_ratelimit rl;
    enum job_on_error on_error;
    bool auto_finalize, auto_dismiss;

    unsigned pause_count;          /* > 0: pause at the next pause point */
    bool user_paused;              /* block-job-pause (or on-error=stop) */
    bool paused;                   /* sitting in a pause point */
    bool busy;                     /* coroutine doing work (not parked) */
    bool cancel_requested;
    bool force_cancel;             /* cancel even a READY job */
    bool complete_requested;
    bool finalize_requested;
    bool io_error;                 /* io-status: failed */
    bool io_nospace;               /* io-status: nospace */

    int ret;                       /* final result, valid once concluded */
    char *error;                   /* message when ret < 0 (not cancel) */

    struct coro *co;               /* while the coroutine lives */
    struct coro *parked;           /* the coroutine waiting in park() */
    struct loop_sleep sleep;
};

/* ---- the engine ---- */

struct job_engine *job_engine_new(struct loop *loop,
                                  const struct job_engine_ops *ops,
                                  void *opaque);
/* Frees every job (none may still run: call job_engine_shutdown() and let
 * the loop run until they concluded). */
void job_engine_free(struct job_engine *eng);
/* Server stopping: refuses new jobs, force-cancels every live one. */
void job_engine_shutdown(struct job_engine *eng);
/* Number of jobs whose coroutine still runs. */
unsigned job_engine_running(const struct job_engine *eng);

struct job *job_find(struct job_engine *eng, const char *id);
/* The live (not concluded) job working on device, or NULL. */
struct job *job_find_by_device(struct job_engine *eng, const char *device);
struct job *job_first(struct job_engine *eng);
struct job *job_next(struct job *job);

/* Creates a job in state CREATED (JOB_STATUS_CHANGE is emitted).  id must
 * be unique among existing jobs.  opaque is the driver state, owned by the
 * job from now on (drv->free releases it, also when this fails? no: on
 * failure the caller keeps it). */
struct job *job_create(struct job_engine *eng, const struct job_driver *drv,
                       const char *id, const char *device, void *opaque,
                       const struct job_create_opts *opts,
                       struct error **errp);
/* Schedules the job's coroutine: CREATED -> RUNNING on the next loop
 * iteration.  Callable from a coroutine or from loop context. */
void job_start(struct job *job);

/* ---- verbs (QMP commands); each checks the state table first ---- */
int job_user_pause(struct job *job, struct error **errp);
int job_user_resume(struct job *job, struct error **errp);
int job_user_cancel(struct job *job, bool force, struct error **errp);
int job_set_speed(struct job *job, int64_t speed, struct error **errp);
int job_user_complete(struct job *job, struct error **errp);
int job_user_finalize(struct job *job, struct error **errp);
/* CONCLUDED -> NULL: the job is freed. */
int job_dismiss(struct job *job, struct error **errp);

/* ---- for drivers, from the job's coroutine ---- */

/* True once the job must stop: cancelled by force, or cancelled before it
 * became READY.  A soft cancel of a READY job (block-job-cancel without
 * force on a mirror-like job) only sets job_cancel_requested(): the job
 * then finishes without its final switch, as QEMU's mirror does. */
bool job_is_cancelled(const struct job *job);
bool job_cancel_requested(const struct job *job);
bool job_complete_requested(const struct job *job);

/* Parks the coroutine while the job is paused (PAUSED or STANDBY is
 * reported meanwhile); returns at once when not paused or cancelled. */
void job_pause_point_co(struct job *job, struct coro *co);
/* Sleeps ns (less if cancelled, paused or its speed changes), then passes
 * a pause point. */
void job_sleep_co(struct job *job, struct coro *co, uint64_t ns);
/* Accounts bytes against the speed limit and sleeps as long as needed
 * (job_sleep_co, so it is a pause point too). */
void job_ratelimit_co(struct job *job, struct coro *co, uint64_t bytes);

void job_progress_set_total(struct job *job, uint64_t total);
void job_progress_increase_total(struct job *job, uint64_t delta);
void job_progress_update(struct job *job, uint64_t done);

/* RUNNING -> READY, emits BLOCK_JOB_READY. */
void job_transition_to_ready(struct job *job);

/* Applies the on-error policy to an I/O error (err = -errno) hit while
 * reading (is_read) or writing: emits BLOCK_JOB_ERROR, and for stop (or
 * enospc on -ENOSPC) pauses the job as if by block-job-pause and waits in
 * a pause point until resumed (-> JOB_ERROR_RETRY) or cancelled
 * (-> JOB_ERROR_REPORT). */
enum job_error_action job_handle_error_co(struct job *job, struct coro *co,
                                          int err, bool is_read);

/* ---- QMP views (new json objects, caller owns) ---- */
struct json_object *job_info_json(const struct job *job);        /* JobInfo */
struct json_object *block_job_info_json(const struct job *job);  /* BlockJobInfo */

#endif
