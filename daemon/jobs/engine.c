/* strata — the job engine (see jobs.h). */
#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "jobs.h"
#include "log.h"

struct job_engine {
    struct loop *loop;
    struct job_engine_ops ops;
    void *opaque;
    struct job *head, *tail;       /* every job, creation order */
    unsigned running;              /* coroutines alive */
    bool shutting_down;
};

/* ---- names and tables ---- */

static const char *const status_names[] = {
#define X(s, n) n,
    JOB_STATUSES(X)
#undef X
};

static const char *const verb_names[] = {
#define X(v, n) n,
    JOB_VERBS(X)
#undef X
};

const char *job_status_name(enum job_status s)
{
    return (unsigned)s < JOB_STATUS__MAX ? status_names[s] : "?";
}

const char *job_verb_name(enum job_verb v)
{
    return (unsigned)v < JOB_VERB__MAX ? verb_names[v] : "?";
}

#define U JOB_STATUS_UNDEFINED
#define C JOB_STATUS_CREATED
#define R JOB_STATUS_RUNNING
#define P JOB_STATUS_PAUSED
#define Y JOB_STATUS_READY
#define S JOB_STATUS_STANDBY
#define W JOB_STATUS_WAITING
#define D JOB_STATUS_PENDING
#define A JOB_STATUS_ABORTING
#define E JOB_STATUS_CONCLUDED
#define N JOB_STATUS_NULL
#define BIT(s) (1u << (s))

/* For each state, the states it may move to (QEMU's job state machine). */
static const unsigned transitions[JOB_STATUS__MAX] = {
    [U] = BIT(C),
    [C] = BIT(R) | BIT(A),
    [R] = BIT(P) | BIT(Y) | BIT(W) | BIT(A),
    [P] = BIT(R),
    [Y] = BIT(S) | BIT(W) | BIT(A),
    [S] = BIT(Y),
    [W] = BIT(D) | BIT(A),
    [D] = BIT(E) | BIT(A),
    [A] = BIT(E),
    [E] = BIT(N),
    [N] = 0,
};

/* For each verb, the states that accept it. */
static const unsigned verbs[JOB_VERB__MAX] = {
    [JOB_VERB_CANCEL] = BIT(C) | BIT(R) | BIT(P) | BIT(Y) | BIT(S) | BIT(W) | BIT(D),
    [JOB_VERB_PAUSE] = BIT(C) | BIT(R) | BIT(P) | BIT(Y) | BIT(S),
    [JOB_VERB_RESUME] = BIT(C) | BIT(R) | BIT(P) | BIT(Y) | BIT(S),
    [JOB_VERB_SET_SPEED] = BIT(C) | BIT(R) | BIT(P) | BIT(Y) | BIT(S),
    [JOB_VERB_COMPLETE] = BIT(Y),
    [JOB_VERB_FINALIZE] = BIT(D),
    [JOB_VERB_DISMISS] = BIT(E),
};

#undef U
#undef C
#undef R
#undef P
#undef Y
#undef S
#undef W
#undef D
#undef A
#undef E
#undef N

bool job_transition_allowed(enum job_status from, enum job_status to)
{
    if ((unsigned)from >= JOB_STATUS__MAX || (unsigned)to >= JOB_STATUS__MAX)
        return false;
    return transitions[from] & BIT(to);
}

bool job_verb_allowed(enum job_status s, enum job_verb v)
{
    if ((unsigned)s >= JOB_STATUS__MAX || (unsigned)v >= JOB_VERB__MAX)
        return false;
    return verbs[v] & BIT(s);
}

static const char *const on_error_names[] = {
    [JOB_ON_ERROR_REPORT] = "report",
    [JOB_ON_ERROR_IGNORE] = "ignore",
    [JOB_ON_ERROR_ENOSPC] = "enospc",
    [JOB_ON_ERROR_STOP] = "stop",
    [JOB_ON_ERROR_AUTO] = "auto",
};

bool job_on_error_parse(const char *s, enum job_on_error *out)
{
    for (unsigned i = 0; i < sizeof(on_error_names) / sizeof(on_error_names[0]); i++) {
        if (!strcmp(s, on_error_names[i])) {
            *out = (enum job_on_error)i;
            return true;
        }
    }
    return false;
}

const char *job_on_error_name(enum job_on_error e)
{
    return (unsigned)e < sizeof(on_error_names) / sizeof(on_error_names[0])
               ? on_error_names[e] : "?";
}

/* ---- rate limiter ---- */

void job_ratelimit_set_speed(struct job_ratelimit *rl, uint64_t speed,
                             uint64_t now_ns)
{
    rl->speed = speed;
    rl->vt_ns = now_ns;
}

uint64_t job_ratelimit_account(struct job_ratelimit *rl, uint64_t now_ns,
                               uint64_t bytes)
{
    if (rl->speed == 0)
        return 0;
    /* idle time earns at most one slice of burst */
    if (rl->vt_ns + JOB_RATELIMIT_SLICE_NS < now_ns)
        rl->vt_ns = now_ns - JOB_RATELIMIT_SLICE_NS;
    unsigned __int128 cost = (unsigned __int128)bytes * 1000000000u / rl->speed;
    if (cost > UINT64_MAX / 2)
        cost = UINT64_MAX / 2;
    rl->vt_ns += (uint64_t)cost;
    return rl->vt_ns > now_ns ? rl->vt_ns - now_ns : 0;
}

/* ---- engine ---- */

struct job_engine *job_engine_new(struct loop *loop,
                                  const struct job_engine_ops *ops,
                                  void *opaque)
{
    struct job_engine *eng = calloc(1, sizeof(*eng));
    if (!eng)
        return NULL;
    eng->loop = loop;
    eng->ops = *ops;
    eng->opaque = opaque;
    return eng;
}

static void job_free(struct job *job)
{
    struct job_engine *eng = job->eng;
    assert(!job->co);
    if (job->prev)
        job->prev->next = job->next;
    else
        eng->head = job->next;
    if (job->next)
        job->next->prev = job->prev;
    else
        eng->tail = job->prev;
    if (job->drv->free)
        job->drv->free(job);
    free(job->id);
    free(job->device);
    free(job->error);
    free(job);
}

void job_engine_free(struct job_engine *eng)
{
    if (!eng)
        return;
    assert(eng->running == 0);
    while (eng->head)
        job_free(eng->head);
    free(eng);
}

unsigned job_engine_running(const struct job_engine *eng)
{
    return eng->running;
}

struct job *job_first(struct job_engine *eng)
{
    return eng->head;
}

struct job *job_next(struct job *job)
{
    return job->next;
}

struct job *job_find(struct job_engine *eng, const char *id)
{
    for (struct job *j = eng->head; j; j = j->next)
        if (!strcmp(j->id, id))
            return j;
    return NULL;
}

struct job *job_find_by_device(struct job_engine *eng, const char *device)
{
    for (struct job *j = eng->head; j; j = j->next)
        if (j->device && !strcmp(j->device, device) &&
            j->status != JOB_STATUS_CONCLUDED && j->status != JOB_STATUS_NULL)
            return j;
    return NULL;
}

static void emit(struct job_engine *eng, const char *event,
                 struct json_object *data)
{
    if (eng->ops.emit)
        eng->ops.emit(eng->opaque, event, data);
    else
        json_object_put(data);
}

static void job_set_status(struct job *job, enum job_status to)
{
    assert(job_transition_allowed(job->status, to));
    log_debug("job '%s': %s -> %s", job->id, job_status_name(job->status),
              job_status_name(to));
    job->status = to;
    struct json_object *d = json_object_new_object();
    json_object_object_add(d, "id", json_object_new_string(job->id));
    json_object_object_add(d, "status", json_object_new_string(job_status_name(to)));
    emit(job->eng, "JOB_STATUS_CHANGE", d);
}

/* type, device, len, offset, speed: the common part of BLOCK_JOB_* data */
static struct json_object *block_job_event_data(const struct job *job)
{
    struct json_object *d = json_object_new_object();
    json_object_object_add(d, "type", json_object_new_string(job->drv->type));
    json_object_object_add(d, "device", json_object_new_string(job->id));
    json_object_object_add(d, "len", json_object_new_int64((int64_t)job->progress_total));
    json_object_object_add(d, "offset", json_object_new_int64((int64_t)job->progress_current));
    json_object_object_add(d, "speed", json_object_new_int64((int64_t)job->rl.speed));
    return d;
}

static bool verb_check(struct job *job, enum job_verb v, struct error **errp)
{
    if (job_verb_allowed(job->status, v))
        return true;
    error_setf(errp, EBUSY, "Job '%s' in state '%s' cannot accept command verb '%s'",
               job->id, job_status_name(job->status), job_verb_name(v));
    return false;
}

bool qmp_id_wellformed(const char *id)
{
    if (!((id[0] >= 'a' && id[0] <= 'z') || (id[0] >= 'A' && id[0] <= 'Z')))
        return false;
    for (const char *p = id; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
              (*p >= '0' && *p <= '9') || *p == '-' || *p == '.' || *p == '_'))
            return false;
    return strlen(id) <= 128;
}

struct job *job_create(struct job_engine *eng, const struct job_driver *drv,
                       const char *id, const char *device, void *opaque,
                       const struct job_create_opts *opts,
                       struct error **errp)
{
    assert(drv && drv->run_co && drv->type);
    if (eng->shutting_down) {
        error_setf(errp, ESHUTDOWN, "the server is shutting down");
        return NULL;
    }
    if (!qmp_id_wellformed(id)) {
        error_setf(errp, EINVAL, "Invalid job ID '%s'", id);
        return NULL;
    }
    if (job_find(eng, id)) {
        error_setf(errp, EEXIST, "Job ID '%s' already in use", id);
        return NULL;
    }
    struct job *job = calloc(1, sizeof(*job));
    if (!job || !(job->id = strdup(id)) ||
        (device && !(job->device = strdup(device)))) {
        if (job)
            free(job->id);
        free(job);
        error_setf(errp, ENOMEM, "out of memory");
        return NULL;
    }
    job->eng = eng;
    job->drv = drv;
    job->opaque = opaque;
    job->on_error = opts->on_error;
    job->auto_finalize = !opts->manual_finalize;
    job->auto_dismiss = !opts->manual_dismiss;
    job_ratelimit_set_speed(&job->rl, opts->speed, loop_now_ns());
    loop_sleep_init(&job->sleep);
    job->prev = eng->tail;
    if (eng->tail)
        eng->tail->next = job;
    else
        eng->head = job;
    eng->tail = job;
    job->status = JOB_STATUS_UNDEFINED;
    job_set_status(job, JOB_STATUS_CREATED);
    return job;
}

/* Parks the job's coroutine until job_wake(). */
static void job_park_co(struct job *job, struct coro *co)
{
    assert(!job->parked);
    job->parked = co;
    job->busy = false;
    coro_yield(co);
    job->busy = true;
}

/* Gets the job's coroutine going again wherever it waits. */
static void job_wake(struct job *job)
{
    if (job->parked) {
        struct coro *co = job->parked;
        job->parked = NULL;
        coro_wake(co);
    }
    loop_sleep_wake(job->eng->loop, &job->sleep);
    if (job->drv->kick && job->co)
        job->drv->kick(job);
}

static void job_finish_co(struct job *job, struct coro *co, int ret,
                          struct error *err)
{
    bool cancelled = job_is_cancelled(job);
    if (ret == 0 && cancelled)
        ret = -ECANCELED;
    if (ret == 0) {
        job_set_status(job, JOB_STATUS_WAITING);
        job_set_status(job, JOB_STATUS_PENDING);
        if (!job->auto_finalize) {
            struct json_object *d = json_object_new_object();
            json_object_object_add(d, "type", json_object_new_string(job->drv->type));
            json_object_object_add(d, "id", json_object_new_string(job->id));
            emit(job->eng, "BLOCK_JOB_PENDING", d);
            while (!job->finalize_requested && !job_is_cancelled(job))
                job_park_co(job, co);
            if (job_is_cancelled(job)) {
                ret = -ECANCELED;
                cancelled = true;
            }
        }
        if (ret == 0 && job->drv->prepare_co)
            ret = job->drv->prepare_co(job, co, &err);
    }
    if (ret == 0) {
        if (job->drv->commit_co)
            job->drv->commit_co(job, co);
    } else {
        job_set_status(job, JOB_STATUS_ABORTING);
        if (job->drv->abort_co)
            job->drv->abort_co(job, co);
    }
    if (job->drv->clean_co)
        job->drv->clean_co(job, co);

    job->ret = ret;
    if (ret < 0 && ret != -ECANCELED) {
        const char *msg = err ? err->msg : strerror(-ret);
        job->error = strdup(msg);
        log_warn("job '%s' failed: %s", job->id, msg);
    }
    error_free(err);
    struct json_object *d = block_job_event_data(job);
    if (ret == -ECANCELED && cancelled) {
        emit(job->eng, "BLOCK_JOB_CANCELLED", d);
    } else {
        if (job->error)
            json_object_object_add(d, "error", json_object_new_string(job->error));
        emit(job->eng, "BLOCK_JOB_COMPLETED", d);
    }
    job_set_status(job, JOB_STATUS_CONCLUDED);
    log_info("job '%s' (%s) concluded: %s", job->id, job->drv->type,
             ret == 0 ? "success" : ret == -ECANCELED ? "cancelled" : job->error);
}

static void job_co(struct coro *co, void *arg)
{
    struct job *job = arg;
    struct job_engine *eng = job->eng;
    job->busy = true;
    int ret;
    struct error *err = NULL;
    if (job_is_cancelled(job)) {
        ret = -ECANCELED; /* cancelled before it ever ran */
    } else {
        job_set_status(job, JOB_STATUS_RUNNING);
        job_pause_point_co(job, co);
        ret = job_is_cancelled(job) ? -ECANCELED : job->drv->run_co(job, co, &err);
    }
    job_finish_co(job, co, ret, err);
    job->busy = false;
    job->co = NULL;
    eng->running--;
    bool dismiss = job->auto_dismiss;
    if (dismiss) {
        job_set_status(job, JOB_STATUS_NULL);
        job_free(job);
    }
    if (eng->ops.release)
        eng->ops.release(eng->opaque);
}

void job_start(struct job *job)
{
    struct job_engine *eng = job->eng;
    assert(job->status == JOB_STATUS_CREATED && !job->co);
    job->co = coro_create(loop_coro_pool(eng->loop), job_co, job);
    if (!job->co) {
        /* Out of memory for a stack: conclude it as failed at once. */
        log_error("job '%s': no memory for its coroutine", job->id);
        job->error = strdup("out of memory");
        job->ret = -ENOMEM;
        job_set_status(job, JOB_STATUS_ABORTING);
        struct json_object *d = block_job_event_data(job);
        json_object_object_add(d, "error", json_object_new_string("out of memory"));
        emit(eng, "BLOCK_JOB_COMPLETED", d);
        job_set_status(job, JOB_STATUS_CONCLUDED);
        return;
    }
    eng->running++;
    if (eng->ops.hold)
        eng->ops.hold(eng->opaque);
    coro_wake(job->co);
}

void job_engine_shutdown(struct job_engine *eng)
{
    eng->shutting_down = true;
    for (struct job *j = eng->head; j; j = j->next)
        if (job_verb_allowed(j->status, JOB_VERB_CANCEL))
            job_user_cancel(j, true, NULL);
}

/* ---- verbs ---- */

int job_user_pause(struct job *job, struct error **errp)
{
    if (!verb_check(job, JOB_VERB_PAUSE, errp))
        return -EBUSY;
    if (job->user_paused)
        return error_setf(errp, EBUSY, "Job '%s' is already paused", job->id);
    job->user_paused = true;
    job->pause_count++;
    job_wake(job); /* cut a rate-limit sleep short: pause promptly */
    return 0;
}

int job_user_resume(struct job *job, struct error **errp)
{
    if (!verb_check(job, JOB_VERB_RESUME, errp))
        return -EBUSY;
    if (!job->user_paused)
        return error_setf(errp, EINVAL, "Can't resume a job that was not paused");
    job->user_paused = false;
    job->io_error = job->io_nospace = false;
    assert(job->pause_count > 0);
    job->pause_count--;
    if (job->pause_count == 0)
        job_wake(job);
    return 0;
}

int job_user_cancel(struct job *job, bool force, struct error **errp)
{
    if (!verb_check(job, JOB_VERB_CANCEL, errp))
        return -EBUSY;
    job->cancel_requested = true;
    if (force || (job->status != JOB_STATUS_READY &&
                  job->status != JOB_STATUS_STANDBY))
        job->force_cancel = true;
    if (job->status == JOB_STATUS_CREATED && !job->co) {
        /* never started: conclude now */
        job_set_status(job, JOB_STATUS_ABORTING);
        job->ret = -ECANCELED;
        emit(job->eng, "BLOCK_JOB_CANCELLED", block_job_event_data(job));
        job_set_status(job, JOB_STATUS_CONCLUDED);
        if (job->auto_dismiss) {
            job_set_status(job, JOB_STATUS_NULL);
            job_free(job);
        }
        return 0;
    }
    job_wake(job);
    return 0;
}

int job_set_speed(struct job *job, int64_t speed, struct error **errp)
{
    if (!verb_check(job, JOB_VERB_SET_SPEED, errp))
        return -EBUSY;
    if (speed < 0)
        return error_setf(errp, EINVAL,
                          "Parameter 'speed' expects a non-negative value");
    job_ratelimit_set_speed(&job->rl, (uint64_t)speed, loop_now_ns());
    loop_sleep_wake(job->eng->loop, &job->sleep); /* re-evaluate the delay */
    return 0;
}

int job_user_complete(struct job *job, struct error **errp)
{
    if (!verb_check(job, JOB_VERB_COMPLETE, errp))
        return -EBUSY;
    if (!job->drv->complete)
        return error_setf(errp, ENOTSUP, "Job type %s does not support completion",
                          job->drv->type);
    if (job->cancel_requested)
        return error_setf(errp, EBUSY, "Job '%s' has been cancelled", job->id);
    job->complete_requested = true;
    int r = job->drv->complete(job, errp);
    if (r < 0) {
        job->complete_requested = false;
        return r;
    }
    job_wake(job);
    return 0;
}

int job_user_finalize(struct job *job, struct error **errp)
{
    if (!verb_check(job, JOB_VERB_FINALIZE, errp))
        return -EBUSY;
    job->finalize_requested = true;
    job_wake(job);
    return 0;
}

int job_dismiss(struct job *job, struct error **errp)
{
    if (!verb_check(job, JOB_VERB_DISMISS, errp))
        return -EBUSY;
    job_set_status(job, JOB_STATUS_NULL);
    job_free(job);
    return 0;
}

/* ---- driver helpers ---- */

bool job_is_cancelled(const struct job *job)
{
    return job->cancel_requested && job->force_cancel;
}

bool job_cancel_requested(const struct job *job)
{
    return job->cancel_requested;
}

bool job_complete_requested(const struct job *job)
{
    return job->complete_requested;
}

void job_pause_point_co(struct job *job, struct coro *co)
{
    while (job->pause_count > 0 && !job_is_cancelled(job)) {
        enum job_status prev = job->status;
        assert(prev == JOB_STATUS_RUNNING || prev == JOB_STATUS_READY);
        job_set_status(job, prev == JOB_STATUS_READY ? JOB_STATUS_STANDBY
                                                     : JOB_STATUS_PAUSED);
        job->paused = true;
        job_park_co(job, co);
        job->paused = false;
        job_set_status(job, prev);
    }
}

void job_sleep_co(struct job *job, struct coro *co, uint64_t ns)
{
    if (!job_is_cancelled(job) && job->pause_count == 0) {
        job->busy = false;
        loop_sleep_co(job->eng->loop, &job->sleep, co, ns);
        job->busy = true;
    }
    job_pause_point_co(job, co);
}

void job_ratelimit_co(struct job *job, struct coro *co, uint64_t bytes)
{
    uint64_t delay = job_ratelimit_account(&job->rl, loop_now_ns(), bytes);
    job_sleep_co(job, co, delay);
}

void job_progress_set_total(struct job *job, uint64_t total)
{
    job->progress_total = total;
}

void job_progress_increase_total(struct job *job, uint64_t delta)
{
    job->progress_total += delta;
}

void job_progress_update(struct job *job, uint64_t done)
{
    job->progress_current += done;
    if (job->progress_current > job->progress_total)
        job->progress_total = job->progress_current;
}

void job_transition_to_ready(struct job *job)
{
    job_set_status(job, JOB_STATUS_READY);
    emit(job->eng, "BLOCK_JOB_READY", block_job_event_data(job));
}

enum job_error_action job_handle_error_co(struct job *job, struct coro *co,
                                          int err, bool is_read)
{
    assert(err < 0);
    enum job_on_error pol = job->on_error;
    const char *action;
    enum job_error_action ret;
    bool stop = pol == JOB_ON_ERROR_STOP ||
                (pol == JOB_ON_ERROR_ENOSPC && err == -ENOSPC);
    if (stop) {
        action = "stop";
        ret = JOB_ERROR_RETRY;
    } else if (pol == JOB_ON_ERROR_IGNORE) {
        action = "ignore";
        ret = JOB_ERROR_IGNORE;
    } else {
        action = "report";
        ret = JOB_ERROR_REPORT;
    }
    struct json_object *d = json_object_new_object();
    json_object_object_add(d, "device", json_object_new_string(job->id));
    json_object_object_add(d, "operation", json_object_new_string(is_read ? "read" : "write"));
    json_object_object_add(d, "action", json_object_new_string(action));
    emit(job->eng, "BLOCK_JOB_ERROR", d);
    if (!stop)
        return ret;
    log_warn("job '%s': %s error (%s): stopped until resumed", job->id,
             is_read ? "read" : "write", strerror(-err));
    if (!job->user_paused) {
        job->user_paused = true;
        job->pause_count++;
    }
    job->io_error = err != -ENOSPC;
    job->io_nospace = err == -ENOSPC;
    job_pause_point_co(job, co);
    return job_is_cancelled(job) ? JOB_ERROR_REPORT : JOB_ERROR_RETRY;
}

/* ---- QMP views ---- */

struct json_object *job_info_json(const struct job *job)
{
    struct json_object *o = json_object_new_object();
    json_object_object_add(o, "id", json_object_new_string(job->id));
    json_object_object_add(o, "type", json_object_new_string(job->drv->type));
    json_object_object_add(o, "status", json_object_new_string(job_status_name(job->status)));
    json_object_object_add(o, "current-progress", json_object_new_int64((int64_t)job->progress_current));
    json_object_object_add(o, "total-progress", json_object_new_int64((int64_t)job->progress_total));
    if (job->error)
        json_object_object_add(o, "error", json_object_new_string(job->error));
    return o;
}

struct json_object *block_job_info_json(const struct job *job)
{
    struct json_object *o = json_object_new_object();
    json_object_object_add(o, "type", json_object_new_string(job->drv->type));
    json_object_object_add(o, "device", json_object_new_string(job->id));
    json_object_object_add(o, "len", json_object_new_int64((int64_t)job->progress_total));
    json_object_object_add(o, "offset", json_object_new_int64((int64_t)job->progress_current));
    json_object_object_add(o, "busy", json_object_new_boolean(job->busy));
    json_object_object_add(o, "paused", json_object_new_boolean(job->pause_count > 0));
    json_object_object_add(o, "speed", json_object_new_int64((int64_t)job->rl.speed));
    json_object_object_add(o, "io-status", json_object_new_string(
        job->io_nospace ? "nospace" : job->io_error ? "failed" : "ok"));
    json_object_object_add(o, "ready", json_object_new_boolean(
        job->status == JOB_STATUS_READY || job->status == JOB_STATUS_STANDBY));
    json_object_object_add(o, "status", json_object_new_string(job_status_name(job->status)));
    json_object_object_add(o, "auto-finalize", json_object_new_boolean(job->auto_finalize));
    json_object_object_add(o, "auto-dismiss", json_object_new_boolean(job->auto_dismiss));
    if (job->error)
        json_object_object_add(o, "error", json_object_new_string(job->error));
    if (job->device) /* strata extension: the export the job works on */
        json_object_object_add(o, "export", json_object_new_string(job->device));
    return o;
}
