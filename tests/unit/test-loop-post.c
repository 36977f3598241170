/* Unit tests: loop_post(), messages from other threads to a loop — many
 * posters, the order of each, a loop woken from its sleep, coroutines of
 * two loops on two threads waking each other only through messages. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

#include "coro.h"
#include "loop.h"
#include "util.h"

#define CORO_STACK (64u << 10)

static struct loop *new_loop(void)
{
    char *err = NULL;
    struct loop *l = loop_new(64, CORO_STACK, &err);
    if (!l)
        fail_msg("loop_new: %s", err ? err : "?");
    return l;
}

/* ---- many posters, one loop ---- */

#define POSTERS 4
#define PER_POSTER 20000

struct pmsg {
    struct loop_msg m;
    struct posters *p;
    unsigned who, seq;
};

struct posters {
    struct loop *l;
    pthread_t loop_thread;
    struct pmsg *msgs;              /* POSTERS * PER_POSTER */
    unsigned next_seq[POSTERS];     /* loop thread only */
    unsigned delivered;             /* loop thread only */
    unsigned out_of_order, wrong_thread;
};

static void pmsg_fn(struct loop_msg *m)
{
    struct pmsg *pm = container_of(m, struct pmsg, m);
    struct posters *p = pm->p;
    if (!pthread_equal(pthread_self(), p->loop_thread))
        p->wrong_thread++;
    if (pm->seq != p->next_seq[pm->who])
        p->out_of_order++;
    p->next_seq[pm->who] = pm->seq + 1;
    if (++p->delivered == POSTERS * PER_POSTER)
        loop_stop(p->l);
}

struct poster_arg {
    struct posters *p;
    unsigned who;
};

static void *poster_main(void *opaque)
{
    struct poster_arg *a = opaque;
    for (unsigned i = 0; i < PER_POSTER; i++) {
        struct pmsg *pm = &a->p->msgs[a->who * PER_POSTER + i];
        pm->m.fn = pmsg_fn;
        pm->p = a->p;
        pm->who = a->who;
        pm->seq = i;
        loop_post(a->p->l, &pm->m);
        /* now and then let the loop run dry and go to sleep, so both the
         * busy path and the doorbell carry messages */
        if (i % 1000 == 999)
            sched_yield();
    }
    return NULL;
}

static void test_many_posters_each_in_order(void **state)
{
    (void)state;
    struct posters p = {0};
    p.l = new_loop();
    p.loop_thread = pthread_self();
    p.msgs = calloc(POSTERS * PER_POSTER, sizeof(*p.msgs));
    assert_non_null(p.msgs);
    pthread_t t[POSTERS];
    struct poster_arg args[POSTERS];
    for (unsigned i = 0; i < POSTERS; i++) {
        args[i] = (struct poster_arg){&p, i};
        assert_int_equal(pthread_create(&t[i], NULL, poster_main, &args[i]),
                         0);
    }
    assert_int_equal(loop_run(p.l), 0);
    for (unsigned i = 0; i < POSTERS; i++)
        pthread_join(t[i], NULL);
    assert_int_equal(p.delivered, POSTERS * PER_POSTER);
    assert_int_equal(p.out_of_order, 0);
    assert_int_equal(p.wrong_thread, 0);
    for (unsigned i = 0; i < POSTERS; i++)
        assert_int_equal(p.next_seq[i], PER_POSTER);
    loop_free(p.l);
    free(p.msgs);
}

/* ---- two loops, two threads, coroutines answering each other ---- */

#define ROUND_TRIPS 3000

/* A call from a coroutine on loop a to loop b: the request message runs
 * on b and posts the answer back; the answer's handler wakes the caller
 * on a.  The shape of every cross-loop call in docs/threads.md. */
struct call {
    struct loop_msg req, ans;
    struct loop *a, *b;
    pthread_t ta, tb;
    struct coro *caller;
    unsigned value;                 /* written on b, read on a */
    bool answered;
    unsigned wrong_thread;
};

static void call_ans(struct loop_msg *m)
{
    struct call *c = container_of(m, struct call, ans);
    if (!pthread_equal(pthread_self(), c->ta))
        c->wrong_thread++;
    c->answered = true;
    coro_wake(c->caller);
}

static void call_req(struct loop_msg *m)
{
    struct call *c = container_of(m, struct call, req);
    if (!pthread_equal(pthread_self(), c->tb))
        c->wrong_thread++;
    c->value = c->value * 3 + 1;
    loop_post(c->a, &c->ans);
}

struct pingpong {
    struct loop *a;
    _Atomic(struct loop *) b;
    pthread_t ta, tb;
    unsigned done, bad_values, wrong_thread;
    struct loop_msg stop_b;
};

static void stop_fn(struct loop_msg *m)
{
    (void)m;
}

static void stop_b_fn(struct loop_msg *m)
{
    struct pingpong *pp = container_of(m, struct pingpong, stop_b);
    loop_stop(atomic_load(&pp->b));
}

static void caller_co(struct coro *co, void *opaque)
{
    struct pingpong *pp = opaque;
    struct loop *b = atomic_load(&pp->b);
    for (unsigned i = 0; i < ROUND_TRIPS; i++) {
        struct call c = {
            .req.fn = call_req, .ans.fn = call_ans, .a = pp->a, .b = b,
            .ta = pp->ta, .tb = pp->tb, .caller = co, .value = i,
        };
        loop_post(b, &c.req);
        while (!c.answered)
            coro_yield(co);
        if (c.value != i * 3 + 1)
            pp->bad_values++;
        pp->wrong_thread += c.wrong_thread;
        pp->done++;
    }
    loop_post(b, &pp->stop_b);
    loop_stop(pp->a);
}

static void *loop_b_main(void *opaque)
{
    struct pingpong *pp = opaque;
    /* made on the thread that runs it: SINGLE_ISSUER binds the ring */
    struct loop *b = new_loop();
    atomic_store(&pp->b, b);
    /* freed by the joiner: the other thread may still be inside its
     * loop_post() of the stop message when this returns */
    return (void *)(intptr_t)loop_run(b);
}

static void test_two_loops_call_each_other(void **state)
{
    (void)state;
    struct pingpong pp = {0};
    pp.a = new_loop();
    pp.ta = pthread_self();
    pp.stop_b.fn = stop_b_fn;
    atomic_init(&pp.b, NULL);
    assert_int_equal(pthread_create(&pp.tb, NULL, loop_b_main, &pp), 0);
    while (atomic_load(&pp.b) == NULL)
        sched_yield();
    struct coro *co = coro_create(loop_coro_pool(pp.a), caller_co, &pp);
    assert_non_null(co);
    coro_wake(co);
    assert_int_equal(loop_run(pp.a), 0);
    void *ret;
    pthread_join(pp.tb, &ret);
    assert_int_equal((int)(intptr_t)ret, 0);
    loop_free(atomic_load(&pp.b));
    assert_int_equal(pp.done, ROUND_TRIPS);
    assert_int_equal(pp.bad_values, 0);
    assert_int_equal(pp.wrong_thread, 0);
    loop_free(pp.a);
}

/* ---- the loop's own thread, handlers posting more ---- */

struct chain_msg {
    struct loop_msg m;
    struct loop *l;
    unsigned left;
    unsigned runs;
};

static void chain_fn(struct loop_msg *m)
{
    struct chain_msg *c = container_of(m, struct chain_msg, m);
    c->runs++;
    if (c->left-- > 0)
        loop_post(c->l, &c->m); /* the same message, again */
    else
        loop_stop(c->l);
}

static void test_post_to_self_from_a_handler(void **state)
{
    (void)state;
    struct loop *l = new_loop();
    struct chain_msg c = {.m.fn = chain_fn, .l = l, .left = 100};
    loop_post(l, &c.m); /* before the loop runs: kept until it does */
    assert_int_equal(loop_run(l), 0);
    assert_int_equal(c.runs, 101);
    loop_free(l);
}

static void test_free_with_messages_never_run(void **state)
{
    (void)state;
    struct loop *l = new_loop();
    struct loop_msg m = {.fn = stop_fn};
    loop_post(l, &m);
    loop_free(l); /* dropped, not run; nothing leaks (ASan) */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_many_posters_each_in_order),
        cmocka_unit_test(test_two_loops_call_each_other),
        cmocka_unit_test(test_post_to_self_from_a_handler),
        cmocka_unit_test(test_free_with_messages_never_run),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
