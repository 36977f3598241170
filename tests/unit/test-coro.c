/* Unit tests: coroutines, wait queues, the mutex, and the loop driving a
 * coroutine through real io_uring file I/O. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "backend.h"
#include "coro.h"
#include "loop.h"

/* A minimal scheduler standing in for the loop: a FIFO of woken coros. */
struct sched {
    struct coro *q[64];
    unsigned head, tail;
};

static void sched_push(void *opaque, struct coro *co)
{
    struct sched *s = opaque;
    assert_true(s->tail - s->head < 64);
    s->q[s->tail++ % 64] = co;
}

static void sched_run(struct sched *s)
{
    while (s->head != s->tail)
        coro_enter(s->q[s->head++ % 64]);
}

struct trace {
    char log[64];
    unsigned n;
};

static void trace_add(struct trace *t, char c)
{
    t->log[t->n++] = c;
    t->log[t->n] = '\0';
}

struct yielder {
    struct trace *t;
    char name;
    struct coro *self;
};

static void yield_twice(struct coro *co, void *opaque)
{
    struct yielder *y = opaque;
    y->self = co;
    trace_add(y->t, y->name);
    coro_yield(co);
    trace_add(y->t, y->name);
    coro_yield(co);
    trace_add(y->t, (char)(y->name - 'a' + 'A'));
}

static void test_yield_and_wake(void **state)
{
    (void)state;
    struct sched s = {0};
    struct coro_pool *pool = coro_pool_new(64 << 10, 4, sched_push, &s);
    assert_non_null(pool);
    struct trace t = {0};
    struct yielder a = {&t, 'a', NULL}, b = {&t, 'b', NULL};
    coro_enter(coro_create(pool, yield_twice, &a));
    coro_enter(coro_create(pool, yield_twice, &b));
    assert_string_equal(t.log, "ab");
    coro_wake(b.self);
    coro_wake(a.self);
    sched_run(&s);
    assert_string_equal(t.log, "abba");
    coro_wake(a.self);
    coro_wake(b.self);
    sched_run(&s);
    assert_string_equal(t.log, "abbaAB");
    coro_pool_free(pool);
}

static void record_self(struct coro *co, void *opaque)
{
    *(struct coro **)opaque = co;
}

static void test_pool_reuses_stacks(void **state)
{
    (void)state;
    struct sched s = {0};
    struct coro_pool *pool = coro_pool_new(64 << 10, 4, sched_push, &s);
    struct coro *first = NULL, *second = NULL;
    coro_enter(coro_create(pool, record_self, &first));
    coro_enter(coro_create(pool, record_self, &second));
    assert_non_null(first);
    /* a finished coroutine went back to the pool and is handed out again */
    assert_ptr_equal(first, second);
    coro_pool_free(pool);
}

struct locker {
    struct co_mutex *m;
    struct trace *t;
    char name;
    struct coro *self;
    struct co_queue *gate;
};

static void lock_hold_unlock(struct coro *co, void *opaque)
{
    struct locker *l = opaque;
    l->self = co;
    co_mutex_lock_co(l->m, co);
    trace_add(l->t, l->name);
    co_queue_wait_co(l->gate, co); /* hold the lock across a yield */
    trace_add(l->t, (char)(l->name - 'a' + 'A'));
    co_mutex_unlock(l->m, co);
}

static void test_mutex_is_exclusive_and_fair(void **state)
{
    (void)state;
    struct sched s = {0};
    struct coro_pool *pool = coro_pool_new(64 << 10, 8, sched_push, &s);
    struct co_mutex m = {0};
    struct co_queue gate = {0};
    struct trace t = {0};
    struct locker l[3] = {{&m, &t, 'a', NULL, &gate},
                          {&m, &t, 'b', NULL, &gate},
                          {&m, &t, 'c', NULL, &gate}};
    for (int i = 0; i < 3; i++)
        coro_enter(coro_create(pool, lock_hold_unlock, &l[i]));
    /* only a got in; b and c wait in order */
    assert_string_equal(t.log, "a");
    for (int round = 0; round < 3; round++) {
        assert_true(co_queue_wake_all(&gate));
        sched_run(&s);
    }
    assert_string_equal(t.log, "aAbBcC");
    assert_null(m.owner);
    assert_true(co_queue_empty(&m.waiters));
    coro_pool_free(pool);
}

static void deep(struct coro *co, void *opaque)
{
    /* uses most of a 64 KiB stack: the guard page is below it */
    volatile char buf[48 << 10];
    memset((char *)buf, 0x5a, sizeof(buf));
    *(int *)opaque = buf[100] + buf[sizeof(buf) - 1];
    (void)co;
}

static void test_stack_is_usable(void **state)
{
    (void)state;
    struct sched s = {0};
    struct coro_pool *pool = coro_pool_new(64 << 10, 1, sched_push, &s);
    int sum = 0;
    coro_enter(coro_create(pool, deep, &sum));
    assert_int_equal(sum, 0x5a * 2);
    coro_pool_free(pool);
}

/* ---- the loop with a real file backend ---- */

struct file_io {
    struct backend *b;
    struct loop *loop;
    int result;
    char data[8192];
};

static void file_io_co(struct coro *co, void *opaque)
{
    struct file_io *f = opaque;
    char wbuf[8192];
    for (size_t i = 0; i < sizeof(wbuf); i++)
        wbuf[i] = (char)(i * 7);
    int r = backend_pwrite_co(f->b, co, wbuf, sizeof(wbuf), 4096, BACKEND_FUA);
    if (r == 0)
        r = backend_pread_co(f->b, co, f->data, sizeof(f->data), 4096);
    if (r == 0)
        r = backend_zero_co(f->b, co, 4096, 4096, BACKEND_MAY_TRIM);
    uint64_t pnum = 0;
    unsigned st = 0;
    if (r == 0)
        r = backend_block_status_co(f->b, co, 0, 4096, &pnum, &st);
    if (r == 0 && !(pnum == 4096 && (st & BACKEND_STATUS_ZERO)))
        r = -1000; /* the file's first 4 KiB was never written: a hole */
    f->result = r;
    loop_stop(f->loop);
}

static void test_loop_file_io(void **state)
{
    (void)state;
    char path[] = "/tmp/strata-unit-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(ftruncate(fd, 1 << 20), 0);
    close(fd);

    char *err = NULL;
    struct loop *l = loop_new(64, 64 << 10, &err);
    assert_non_null(l);
    struct backend_open_opts o = {0};
    struct error *e = NULL;
    struct backend *b = backend_open(l, path, &o, &e);
    assert_non_null(b);
    assert_int_equal(b->size, 1 << 20);

    struct file_io f = {.b = b, .loop = l, .result = 1};
    coro_enter(coro_create(loop_coro_pool(l), file_io_co, &f));
    assert_int_equal(loop_run(l), 0);
    assert_int_equal(f.result, 0);
    for (size_t i = 0; i < sizeof(f.data); i++)
        assert_int_equal(f.data[i], (char)(i * 7));

    /* the zeroed range reads back as zeros on disk */
    fd = open(path, O_RDONLY);
    char check[4096];
    assert_int_equal(pread(fd, check, sizeof(check), 4096), sizeof(check));
    for (size_t i = 0; i < sizeof(check); i++)
        assert_int_equal(check[i], 0);
    assert_int_equal(pread(fd, check, 16, 8192), 16);
    assert_int_equal(check[1], (char)((4096 + 1) * 7));
    close(fd);

    backend_close(b);
    loop_free(l);
    unlink(path);
}

static void test_open_errors_are_clear(void **state)
{
    (void)state;
    char *err = NULL;
    struct loop *l = loop_new(8, 64 << 10, &err);
    struct backend_open_opts o = {0};
    struct error *e = NULL;
    assert_null(backend_open(l, "/nonexistent/strata.img", &o, &e));
    assert_non_null(e);
    assert_int_equal(e->code, 2 /* ENOENT */);
    assert_non_null(strstr(e->msg, "/nonexistent/strata.img"));
    error_free(e);
    e = NULL;
    o.read_only = true; /* read-write would already fail with EISDIR */
    assert_null(backend_open(l, "/tmp", &o, &e));
    assert_non_null(strstr(e->msg, "not a regular file"));
    error_free(e);
    loop_free(l);
}

/* ---- loop_run_once: a caller drives the other end of a socket ---- */

struct echo {
    struct loop *l;
    int fd;
    char buf[16];
    int got;
    struct loop_op op;
    struct loop_hook hook;     /* deferred by the completion: answers */
};

static void echo_answer(struct loop_hook *h)
{
    struct echo *e = (struct echo *)((char *)h - offsetof(struct echo, hook));
    assert_int_equal(write(e->fd, e->buf, (size_t)e->got), e->got);
}

static void echo_received(struct loop_op *op, int res, uint32_t flags)
{
    struct echo *e = (struct echo *)((char *)op - offsetof(struct echo, op));
    (void)flags;
    e->got = res;
    loop_defer(e->l, &e->hook);
}

static void test_loop_run_once(void **state)
{
    (void)state;
    char *err = NULL;
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv),
                     0);
    struct echo e = {.fd = sv[0]};
    e.l = loop_new(8, 64 << 10, &err);
    assert_non_null(e.l);
    e.op.done = echo_received;
    e.hook.fn = echo_answer;
    io_uring_prep_recv(loop_get_sqe(e.l, &e.op), sv[0], e.buf,
                       sizeof(e.buf), 0);
    /* The client side, on this thread, between iterations. */
    assert_int_equal(write(sv[1], "ping", 4), 4);
    char reply[16];
    ssize_t r = -1;
    for (int i = 0; i < 10 && e.got == 0; i++)
        assert_int_equal(loop_run_once(e.l), 0);
    assert_int_equal(e.got, 4);
    /* What the completion set off (the hook's answer) has run when
     * loop_run_once returns: no further iteration is needed to see it. */
    r = read(sv[1], reply, sizeof(reply));
    assert_int_equal(r, 4);
    assert_memory_equal(reply, "ping", 4);
    /* Stopped: returns at once, without waiting for anything. */
    loop_stop(e.l);
    assert_int_equal(loop_run_once(e.l), 0);
    assert_true(loop_stopping(e.l));
    loop_free(e.l);
    close(sv[0]);
    close(sv[1]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_yield_and_wake),
        cmocka_unit_test(test_pool_reuses_stacks),
        cmocka_unit_test(test_mutex_is_exclusive_and_fair),
        cmocka_unit_test(test_stack_is_usable),
        cmocka_unit_test(test_loop_file_io),
        cmocka_unit_test(test_open_errors_are_clear),
        cmocka_unit_test(test_loop_run_once),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
