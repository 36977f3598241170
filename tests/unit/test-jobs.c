/* Unit tests: the job engine's state machine, verbs, events, pause points,
 * cancellation, on-error policy and rate limiter, on a real loop with a
 * fake job driver. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "jobs.h"
#include "loop.h"

/* ---- pure tables and the rate limiter ---- */

static void test_tables(void **state)
{
    (void)state;
    assert_true(job_transition_allowed(JOB_STATUS_UNDEFINED, JOB_STATUS_CREATED));
    assert_true(job_transition_allowed(JOB_STATUS_CREATED, JOB_STATUS_RUNNING));
    assert_true(job_transition_allowed(JOB_STATUS_RUNNING, JOB_STATUS_PAUSED));
    assert_true(job_transition_allowed(JOB_STATUS_PAUSED, JOB_STATUS_RUNNING));
    assert_true(job_transition_allowed(JOB_STATUS_RUNNING, JOB_STATUS_READY));
    assert_true(job_transition_allowed(JOB_STATUS_READY, JOB_STATUS_STANDBY));
    assert_true(job_transition_allowed(JOB_STATUS_PENDING, JOB_STATUS_CONCLUDED));
    assert_true(job_transition_allowed(JOB_STATUS_CONCLUDED, JOB_STATUS_NULL));
    assert_false(job_transition_allowed(JOB_STATUS_PAUSED, JOB_STATUS_READY));
    assert_false(job_transition_allowed(JOB_STATUS_CONCLUDED, JOB_STATUS_RUNNING));
    assert_false(job_transition_allowed(JOB_STATUS_NULL, JOB_STATUS_CREATED));
    assert_false(job_transition_allowed(JOB_STATUS_CREATED, JOB_STATUS_READY));

    assert_true(job_verb_allowed(JOB_STATUS_READY, JOB_VERB_COMPLETE));
    assert_false(job_verb_allowed(JOB_STATUS_RUNNING, JOB_VERB_COMPLETE));
    assert_true(job_verb_allowed(JOB_STATUS_CONCLUDED, JOB_VERB_DISMISS));
    assert_false(job_verb_allowed(JOB_STATUS_RUNNING, JOB_VERB_DISMISS));
    assert_false(job_verb_allowed(JOB_STATUS_CONCLUDED, JOB_VERB_CANCEL));
    assert_true(job_verb_allowed(JOB_STATUS_PENDING, JOB_VERB_FINALIZE));
    assert_true(job_verb_allowed(JOB_STATUS_PAUSED, JOB_VERB_SET_SPEED));

    assert_string_equal(job_status_name(JOB_STATUS_STANDBY), "standby");
    assert_string_equal(job_verb_name(JOB_VERB_SET_SPEED), "set-speed");
    enum job_on_error e;
    assert_true(job_on_error_parse("enospc", &e));
    assert_int_equal(e, JOB_ON_ERROR_ENOSPC);
    assert_false(job_on_error_parse("explode", &e));
}

static void test_ratelimit(void **state)
{
    (void)state;
    struct job_ratelimit rl;
    uint64_t t = 5000000000ull;
    job_ratelimit_set_speed(&rl, 0, t);
    assert_int_equal(job_ratelimit_account(&rl, t, 1u << 30), 0); /* unlimited */

    job_ratelimit_set_speed(&rl, 1000000, t);             /* 1 MB/s */
    assert_int_equal(job_ratelimit_account(&rl, t, 100000), 100000000); /* 100 ms */
    assert_int_equal(job_ratelimit_account(&rl, t, 100000), 200000000);
    /* after sleeping as told, the next chunk waits its own share only */
    t += 200000000;
    assert_int_equal(job_ratelimit_account(&rl, t, 50000), 50000000);
    /* a long idle time earns at most one slice of burst */
    t += 10000000000ull;
    uint64_t burst = JOB_RATELIMIT_SLICE_NS * 1000000 / 1000000000ull; /* bytes */
    assert_int_equal(job_ratelimit_account(&rl, t, burst), 0);
    assert_int_equal(job_ratelimit_account(&rl, t, 1000), 1000000);
    /* long-run rate: 10 MB in chunks, the total delay is 10 s */
    job_ratelimit_set_speed(&rl, 1000000, t);
    uint64_t d = 0;
    for (int i = 0; i < 100; i++)
        d = job_ratelimit_account(&rl, t, 100000);
    assert_int_equal(d, 10000000000ull);
    /* changing the speed starts afresh */
    job_ratelimit_set_speed(&rl, 2000000, t);
    assert_int_equal(job_ratelimit_account(&rl, t, 200000), 100000000);
}

/* ---- a fake driver on a real loop ---- */

struct fixture {
    struct loop *loop;
    struct job_engine *eng;
    char log[4096];              /* events, "EVENT:detail " */
    unsigned holds;
    const char *stop_on;         /* loop_stop when this status is reached */
    bool shutdown_on_ready;      /* job_engine_shutdown() at READY */
    /* driver behaviour */
    unsigned chunks;
    uint64_t chunk_size;
    int fail_first;              /* -errno returned by chunk 0 once */
    bool failed_once;
    bool needs_complete;         /* READY, then wait for complete */
    unsigned chunks_done;
    unsigned errors_seen;
    bool cleaned;
};

static void fx_emit(void *opaque, const char *event, struct json_object *data)
{
    struct fixture *fx = opaque;
    char item[256];
    struct json_object *v;
    if (!strcmp(event, "JOB_STATUS_CHANGE")) {
        json_object_object_get_ex(data, "status", &v);
        snprintf(item, sizeof(item), "%s ", json_object_get_string(v));
        if (fx->stop_on && !strcmp(fx->stop_on, json_object_get_string(v)))
            loop_stop(fx->loop);
        if (fx->shutdown_on_ready && !strcmp("ready", json_object_get_string(v)))
            job_engine_shutdown(fx->eng);
    } else if (!strcmp(event, "BLOCK_JOB_ERROR")) {
        json_object_object_get_ex(data, "action", &v);
        snprintf(item, sizeof(item), "ERROR:%s ", json_object_get_string(v));
    } else {
        snprintf(item, sizeof(item), "%s%s ", event,
                 json_object_object_get_ex(data, "error", NULL) ? ":err" : "");
    }
    strncat(fx->log, item, sizeof(fx->log) - strlen(fx->log) - 1);
    json_object_put(data);
}

static void fx_hold(void *opaque) { ((struct fixture *)opaque)->holds++; }
static void fx_release(void *opaque) { ((struct fixture *)opaque)->holds--; }

static int fake_run_co(struct job *job, struct coro *co, struct error **errp)
{
    struct fixture *fx = job->opaque;
    job_progress_set_total(job, fx->chunks * fx->chunk_size);
    for (unsigned i = 0; i < fx->chunks;) {
        if (job_is_cancelled(job))
            return -ECANCELED;
        if (i == 0 && fx->fail_first && !fx->failed_once) {
            fx->failed_once = true;
            fx->errors_seen++;
            switch (job_handle_error_co(job, co, fx->fail_first, false)) {
            case JOB_ERROR_REPORT:
                return error_setf(errp, -fx->fail_first, "chunk %u: %s", i,
                                  strerror(-fx->fail_first));
            case JOB_ERROR_IGNORE:
                break;
            case JOB_ERROR_RETRY:
                continue;
            }
        }
        fx->chunks_done++;
        job_progress_update(job, fx->chunk_size);
        job_ratelimit_co(job, co, fx->chunk_size);
        i++;
    }
    if (fx->needs_complete) {
        job_transition_to_ready(job);
        while (!job_complete_requested(job) && !job_cancel_requested(job))
            job_sleep_co(job, co, 10ull * 1000000000u);
    }
    return 0;
}

static int fake_complete(struct job *job, struct error **errp)
{
    (void)job;
    (void)errp;
    return 0;
}

static void fake_clean_co(struct job *job, struct coro *co)
{
    (void)co;
    ((struct fixture *)job->opaque)->cleaned = true;
}

static const struct job_driver fake_driver = {
    .type = "commit",
    .run_co = fake_run_co,
    .complete = fake_complete,
    .clean_co = fake_clean_co,
};

static int setup(void **state)
{
    struct fixture *fx = calloc(1, sizeof(*fx));
    char *err = NULL;
    fx->loop = loop_new(64, 64 << 10, &err);
    assert_non_null(fx->loop);
    struct job_engine_ops ops = {.emit = fx_emit, .hold = fx_hold, .release = fx_release};
    fx->eng = job_engine_new(fx->loop, &ops, fx);
    fx->chunks = 4;
    fx->chunk_size = 65536;
    *state = fx;
    return 0;
}

static int teardown(void **state)
{
    struct fixture *fx = *state;
    assert_int_equal(job_engine_running(fx->eng), 0);
    assert_int_equal(fx->holds, 0);
    job_engine_free(fx->eng);
    loop_free(fx->loop);
    free(fx);
    return 0;
}

/* A coroutine on the loop that drives the job like a QMP client would. */
struct script {
    struct fixture *fx;
    struct job *job;
    void (*fn)(struct script *s, struct coro *co);
};

static void script_co(struct coro *co, void *arg)
{
    struct script *s = arg;
    s->fn(s, co);
}

static void sleep_ms(struct fixture *fx, struct coro *co, unsigned ms)
{
    struct loop_sleep sl;
    loop_sleep_init(&sl);
    loop_sleep_co(fx->loop, &sl, co, ms * 1000000ull);
}

static void run_script(struct fixture *fx, struct script *s)
{
    struct coro *co = coro_create(loop_coro_pool(fx->loop), script_co, s);
    assert_non_null(co);
    coro_wake(co);
}

static struct job *mk_job(struct fixture *fx, const char *id, uint64_t speed,
                          enum job_on_error oe, bool manual_dismiss)
{
    struct job_create_opts o = {.speed = speed, .on_error = oe,
                                .manual_dismiss = manual_dismiss};
    struct error *err = NULL;
    struct job *j = job_create(fx->eng, &fake_driver, id, "disk", fx, &o, &err);
    assert_null(err);
    assert_non_null(j);
    return j;
}

static void test_success(void **state)
{
    struct fixture *fx = *state;
    struct job *j = mk_job(fx, "j1", 0, JOB_ON_ERROR_REPORT, false);
    assert_int_equal(j->status, JOB_STATUS_CREATED);
    /* duplicate ids and bad ids are refused */
    struct error *err = NULL;
    struct job_create_opts o = {0};
    assert_null(job_create(fx->eng, &fake_driver, "j1", NULL, fx, &o, &err));
    assert_string_equal(err->msg, "Job ID 'j1' already in use");
    error_freep(&err);
    assert_null(job_create(fx->eng, &fake_driver, "1bad", NULL, fx, &o, &err));
    error_freep(&err);
    assert_ptr_equal(job_find_by_device(fx->eng, "disk"), j);

    fx->stop_on = "null";
    job_start(j);
    assert_int_equal(loop_run(fx->loop), 0);
    assert_string_equal(fx->log, "created running waiting pending "
                        "BLOCK_JOB_COMPLETED concluded null ");
    assert_int_equal(fx->chunks_done, 4);
    assert_true(fx->cleaned);
    assert_null(job_first(fx->eng)); /* auto-dismissed */
}

static void pause_script(struct script *s, struct coro *co)
{
    struct fixture *fx = s->fx;
    struct error *err = NULL;
    assert_int_equal(job_user_resume(s->job, &err), -EINVAL); /* not paused */
    assert_string_equal(err->msg, "Can't resume a job that was not paused");
    error_freep(&err);
    assert_int_equal(job_user_pause(s->job, &err), 0);
    assert_int_equal(job_user_pause(s->job, &err), -EBUSY); /* twice */
    error_freep(&err);
    sleep_ms(fx, co, 30);
    assert_int_equal(s->job->status, JOB_STATUS_PAUSED);
    unsigned done = fx->chunks_done;
    sleep_ms(fx, co, 30);
    assert_int_equal(fx->chunks_done, done); /* no progress while paused */
    assert_int_equal(job_set_speed(s->job, 0, &err), 0); /* allowed in paused */
    assert_int_equal(job_user_complete(s->job, &err), -EBUSY); /* not ready */
    assert_non_null(strstr(err->msg, "cannot accept command verb 'complete'"));
    error_freep(&err);
    assert_int_equal(job_user_resume(s->job, &err), 0);
}

static void test_pause_resume(void **state)
{
    struct fixture *fx = *state;
    /* 64 KiB chunks at 1 MiB/s: ~60 ms per chunk, long enough to pause */
    struct job *j = mk_job(fx, "j2", 1 << 20, JOB_ON_ERROR_REPORT, true);
    fx->stop_on = "concluded";
    job_start(j);
    struct script s = {fx, j, pause_script};
    run_script(fx, &s);
    assert_int_equal(loop_run(fx->loop), 0);
    assert_non_null(strstr(fx->log, "running paused running"));
    assert_non_null(strstr(fx->log, "BLOCK_JOB_COMPLETED concluded"));
    assert_int_equal(j->status, JOB_STATUS_CONCLUDED);
    assert_int_equal(j->progress_current, j->progress_total);
    /* manual dismiss */
    struct error *err = NULL;
    assert_int_equal(job_user_pause(j, &err), -EBUSY);
    error_freep(&err);
    assert_int_equal(job_dismiss(j, &err), 0);
    assert_null(job_first(fx->eng));
}

static void cancel_script(struct script *s, struct coro *co)
{
    sleep_ms(s->fx, co, 20);
    assert_int_equal(s->job->status, JOB_STATUS_RUNNING);
    assert_int_equal(job_user_cancel(s->job, false, NULL), 0);
}

static void test_cancel_in_ratelimit_sleep(void **state)
{
    struct fixture *fx = *state;
    /* 1 KiB/s: the first chunk's sleep would last a minute */
    struct job *j = mk_job(fx, "j3", 1024, JOB_ON_ERROR_REPORT, false);
    fx->stop_on = "null";
    job_start(j);
    struct script s = {fx, j, cancel_script};
    run_script(fx, &s);
    uint64_t t0 = loop_now_ns();
    assert_int_equal(loop_run(fx->loop), 0);
    assert_true(loop_now_ns() - t0 < 2000000000ull);
    assert_string_equal(fx->log, "created running aborting BLOCK_JOB_CANCELLED "
                        "concluded null ");
    assert_int_equal(fx->chunks_done, 1);
    assert_true(fx->cleaned);
}

static void test_cancel_before_start(void **state)
{
    struct fixture *fx = *state;
    struct job *j = mk_job(fx, "j4", 0, JOB_ON_ERROR_REPORT, false);
    assert_int_equal(job_user_cancel(j, false, NULL), 0);
    assert_string_equal(fx->log, "created aborting BLOCK_JOB_CANCELLED concluded null ");
    assert_null(job_first(fx->eng));
    assert_int_equal(fx->chunks_done, 0);
}

static void stop_script(struct script *s, struct coro *co)
{
    sleep_ms(s->fx, co, 30);
    assert_int_equal(s->job->status, JOB_STATUS_PAUSED);
    assert_true(s->job->user_paused);
    assert_true(s->job->io_error);
    struct json_object *info = block_job_info_json(s->job), *v;
    json_object_object_get_ex(info, "io-status", &v);
    assert_string_equal(json_object_get_string(v), "failed");
    json_object_put(info);
    assert_int_equal(job_user_resume(s->job, NULL), 0);
}

static void test_on_error_stop(void **state)
{
    struct fixture *fx = *state;
    struct job *j = mk_job(fx, "j5", 0, JOB_ON_ERROR_STOP, false);
    fx->fail_first = -EIO;
    fx->stop_on = "null";
    job_start(j);
    struct script s = {fx, j, stop_script};
    run_script(fx, &s);
    assert_int_equal(loop_run(fx->loop), 0);
    assert_string_equal(fx->log, "created running ERROR:stop paused running waiting "
                        "pending BLOCK_JOB_COMPLETED concluded null ");
    assert_int_equal(fx->chunks_done, 4); /* retried, then all done */
}

static void test_on_error_report_and_enospc(void **state)
{
    struct fixture *fx = *state;
    /* enospc with another error: report, and the job fails */
    struct job *j = mk_job(fx, "j6", 0, JOB_ON_ERROR_ENOSPC, true);
    fx->fail_first = -EIO;
    fx->stop_on = "concluded";
    job_start(j);
    assert_int_equal(loop_run(fx->loop), 0);
    assert_string_equal(fx->log, "created running ERROR:report aborting "
                        "BLOCK_JOB_COMPLETED:err concluded ");
    assert_int_equal(j->ret, -EIO);
    assert_string_equal(j->error, "chunk 0: Input/output error");
    struct json_object *info = job_info_json(j), *v;
    json_object_object_get_ex(info, "error", &v);
    assert_string_equal(json_object_get_string(v), "chunk 0: Input/output error");
    json_object_put(info);
    assert_int_equal(job_dismiss(j, NULL), 0);
}

static void test_on_error_ignore(void **state)
{
    struct fixture *fx = *state;
    /* ignore: counts the chunk as done and goes on */
    fx->fail_first = -EIO;
    struct job *j = mk_job(fx, "j7", 0, JOB_ON_ERROR_IGNORE, false);
    fx->stop_on = "null";
    job_start(j);
    assert_int_equal(loop_run(fx->loop), 0);
    assert_string_equal(fx->log, "created running ERROR:ignore waiting pending "
                        "BLOCK_JOB_COMPLETED concluded null ");
}

static void ready_script(struct script *s, struct coro *co)
{
    struct error *err = NULL;
    while (s->job->status != JOB_STATUS_READY)
        sleep_ms(s->fx, co, 5);
    /* pause in READY is STANDBY */
    assert_int_equal(job_user_pause(s->job, NULL), 0);
    sleep_ms(s->fx, co, 20);
    assert_int_equal(s->job->status, JOB_STATUS_STANDBY);
    assert_int_equal(job_user_resume(s->job, NULL), 0);
    sleep_ms(s->fx, co, 20);
    assert_int_equal(s->job->status, JOB_STATUS_READY);
    assert_int_equal(job_user_complete(s->job, &err), 0);
}

static void test_ready_complete(void **state)
{
    struct fixture *fx = *state;
    fx->needs_complete = true;
    struct job *j = mk_job(fx, "j8", 0, JOB_ON_ERROR_REPORT, false);
    fx->stop_on = "null";
    job_start(j);
    struct script s = {fx, j, ready_script};
    run_script(fx, &s);
    assert_int_equal(loop_run(fx->loop), 0);
    assert_string_equal(fx->log, "created running ready BLOCK_JOB_READY standby ready "
                        "waiting pending BLOCK_JOB_COMPLETED concluded null ");
}

static void soft_cancel_script(struct script *s, struct coro *co)
{
    while (s->job->status != JOB_STATUS_READY)
        sleep_ms(s->fx, co, 5);
    /* a soft cancel of a READY job ends it without its switch: COMPLETED */
    assert_int_equal(job_user_cancel(s->job, false, NULL), 0);
    assert_true(job_cancel_requested(s->job));
    assert_false(job_is_cancelled(s->job));
}

static void test_ready_soft_cancel(void **state)
{
    struct fixture *fx = *state;
    fx->needs_complete = true;
    struct job *j = mk_job(fx, "j9", 0, JOB_ON_ERROR_REPORT, false);
    fx->stop_on = "null";
    job_start(j);
    struct script s = {fx, j, soft_cancel_script};
    run_script(fx, &s);
    assert_int_equal(loop_run(fx->loop), 0);
    assert_string_equal(fx->log, "created running ready BLOCK_JOB_READY waiting pending "
                        "BLOCK_JOB_COMPLETED concluded null ");
}

static void test_shutdown_cancels(void **state)
{
    struct fixture *fx = *state;
    fx->needs_complete = true;
    struct job *j = mk_job(fx, "j10", 0, JOB_ON_ERROR_REPORT, false);
    fx->shutdown_on_ready = true;
    fx->stop_on = "null";
    job_start(j);
    assert_int_equal(loop_run(fx->loop), 0);
    assert_non_null(strstr(fx->log, "aborting BLOCK_JOB_CANCELLED concluded null"));
    struct error *err = NULL;
    struct job_create_opts o = {0};
    assert_null(job_create(fx->eng, &fake_driver, "late", NULL, fx, &o, &err));
    assert_string_equal(err->msg, "the server is shutting down");
    error_freep(&err);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tables),
        cmocka_unit_test(test_ratelimit),
        cmocka_unit_test_setup_teardown(test_success, setup, teardown),
        cmocka_unit_test_setup_teardown(test_pause_resume, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cancel_in_ratelimit_sleep, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cancel_before_start, setup, teardown),
        cmocka_unit_test_setup_teardown(test_on_error_stop, setup, teardown),
        cmocka_unit_test_setup_teardown(test_on_error_report_and_enospc, setup, teardown),
        cmocka_unit_test_setup_teardown(test_on_error_ignore, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ready_complete, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ready_soft_cancel, setup, teardown),
        cmocka_unit_test_setup_teardown(test_shutdown_cancels, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
