/* strata — the io_uring event loop (see loop.h). */
#include <assert.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "loop.h"
#include "util.h"

/* A completion reaped while the submission queue had to be flushed in
 * loop_get_sqe(): kept here and delivered by loop_run(). */
struct loop_backlog_entry {
    struct loop_op *op;
    int res;
    uint32_t flags;
};

struct loop {
    struct io_uring ring;
    bool stopping;

    struct coro_pool *pool;
    struct coro *runq_head, *runq_tail; /* coroutines to enter */

    struct loop_hook *hooks;         /* deferred to the end of the iteration */

    struct loop_timer *timers;       /* ticked about once a second */
    struct __kernel_timespec tick_ts;
    struct loop_op tick_op;
    bool tick_armed;
    bool running;                    /* inside loop_run() or loop_run_sync() */

    struct loop_backlog_entry *backlog;
    size_t backlog_len, backlog_cap;

    unsigned features;               /* LOOP_F_* */
    uint16_t *free_bgids;            /* buffer group ids given back */
    size_t n_free_bgids, cap_free_bgids;
    unsigned next_bgid;

    /* Messages from other threads (loop_post).  posted and rung are the
     * only fields another thread touches. */
    _Atomic(struct loop_msg *) posted; /* pushed by posters, newest first */
    atomic_bool rung;                /* the doorbell was written and the
                                        list not taken since */
    int post_efd;                    /* the doorbell */
    struct loop_op post_op;          /* the read armed on it */
    uint64_t post_val;
    bool post_armed;
};

struct loop_bufring {
    struct loop *l;
    struct io_uring_buf_ring *ring;  /* shared with the kernel */
    uint8_t *bufs;                   /* nbufs * bufsize, after the ring */
    unsigned nbufs;
    size_t bufsize;
    uint16_t bgid;
};

uint64_t loop_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void loop_schedule(void *opaque, struct coro *co)
{
    struct loop *l = opaque;
    *coro_link(co) = NULL;
    if (l->runq_tail)
        *coro_link(l->runq_tail) = co;
    else
        l->runq_head = co;
    l->runq_tail = co;
}

static void tick_done(struct loop_op *op, int res, uint32_t flags);
static void post_done(struct loop_op *op, int res, uint32_t flags);

static const char *const feature_names[] = {
    "single_issuer", "defer_taskrun", "coop_taskrun", "ring_fd",
    "buf_ring", "recv_multishot",
};

const char *loop_feature_names(unsigned features, char *buf, size_t len)
{
    size_t off = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < sizeof(feature_names) / sizeof(*feature_names); i++) {
        if (!(features & (1u << i)))
            continue;
        int n = snprintf(buf + off, len - off, "%s%s", off ? "," : "",
                         feature_names[i]);
        if (n < 0 || (size_t)n >= len - off)
            break;
        off += (size_t)n;
    }
    if (off == 0)
        snprintf(buf, len, "none");
    return buf;
}

/* The features STRATA_URING_DISABLE names. */
static unsigned disabled_features(void)
{
    const char *env = getenv("STRATA_URING_DISABLE");
    if (!env || !*env)
        return 0;
    unsigned dis = 0;
    char *copy = strdup(env);
    if (!copy)
        return 0;
    char *save = NULL;
    for (char *t = strtok_r(copy, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        if (strcmp(t, "all") == 0)
            dis = ~0u;
        for (size_t i = 0; i < sizeof(feature_names) / sizeof(*feature_names); i++)
            if (strcmp(t, feature_names[i]) == 0)
                dis |= 1u << i;
    }
    free(copy);
    return dis;
}

/* Creates the ring with the most useful setup flags the kernel accepts:
 * DEFER_TASKRUN (6.1) needs SINGLE_ISSUER (6.0); COOP_TASKRUN is 5.19.
 * Older kernels refuse unknown flags with -EINVAL: try the next set. */
static int ring_setup(struct loop *l, unsigned entries, unsigned dis,
                      struct io_uring_params *p)
{
    static const unsigned tries[] = {
        LOOP_F_SINGLE_ISSUER | LOOP_F_DEFER_TASKRUN,
        LOOP_F_SINGLE_ISSUER | LOOP_F_COOP_TASKRUN,
        LOOP_F_COOP_TASKRUN,
        0,
    };
    int r = -EINVAL;
    for (size_t i = 0; i < sizeof(tries) / sizeof(*tries); i++) {
        unsigned f = tries[i];
        if (f & dis)
            continue;
        memset(p, 0, sizeof(*p));
        /* A large completion queue: requests of many connections complete
         * between two reaps.  The kernel keeps overflowing CQEs anyway
         * (IORING_FEAT_NODROP); this keeps that path cold. */
        p->flags = IORING_SETUP_CQSIZE;
        p->cq_entries = entries * 8;
        if (f & LOOP_F_SINGLE_ISSUER)
            p->flags |= IORING_SETUP_SINGLE_ISSUER;
        if (f & LOOP_F_DEFER_TASKRUN)
            p->flags |= IORING_SETUP_DEFER_TASKRUN;
        if (f & LOOP_F_COOP_TASKRUN)
            p->flags |= IORING_SETUP_COOP_TASKRUN;
        r = io_uring_queue_init_params(entries, &l->ring, p);
        if (r == 0) {
            l->features = f;
            return 0;
        }
        if (r != -EINVAL)
            return r;
    }
    return r;
}

struct loop *loop_new(unsigned entries, size_t coro_stack, char **errmsg)
{
    return loop_new_without(entries, coro_stack, 0, errmsg);
}

struct loop *loop_new_without(unsigned entries, size_t coro_stack,
                              unsigned disable, char **errmsg)
{
    struct loop *l = calloc(1, sizeof(*l));
    if (!l) {
        *errmsg = strdup("out of memory");
        return NULL;
    }
    unsigned dis = disabled_features() | disable;
    l->post_efd = eventfd(0, EFD_CLOEXEC);
    if (l->post_efd < 0) {
        if (asprintf(errmsg, "eventfd: %s", strerror(errno)) < 0)
            *errmsg = NULL;
        free(l);
        return NULL;
    }
    atomic_init(&l->posted, NULL);
    atomic_init(&l->rung, false);
    l->post_op.done = post_done;
    struct io_uring_params p;
    int r = ring_setup(l, entries, dis, &p);
    if (r < 0) {
        if (asprintf(errmsg, "io_uring_queue_init: %s", strerror(-r)) < 0)
            *errmsg = NULL;
        close(l->post_efd);
        free(l);
        return NULL;
    }
    if (!(p.features & IORING_FEAT_NODROP)) {
        *errmsg = strdup("io_uring: kernel lacks IORING_FEAT_NODROP (need Linux >= 5.5)");
        io_uring_queue_exit(&l->ring);
        close(l->post_efd);
        free(l);
        return NULL;
    }
    /* io_uring_enter with a registered index instead of an fd (5.18): no
     * file lookup and reference on every call. */
    if (!(dis & LOOP_F_RING_FD) && io_uring_register_ring_fd(&l->ring) == 1)
        l->features |= LOOP_F_RING_FD;
    /* Buffer rings (5.19): probe with a one-buffer ring. */
    if (!(dis & LOOP_F_BUF_RING)) {
        struct loop_bufring *br = loop_bufring_new(l, 1, 64);
        if (br) {
            loop_bufring_free(br);
            l->features |= LOOP_F_BUF_RING;
            /* Multishot receive came with 6.0, as SINGLE_ISSUER did; with
             * that flag refused or disabled it is a guess that the first
             * receive confirms or refutes. */
            if (!(dis & LOOP_F_RECV_MULTISHOT))
                l->features |= LOOP_F_RECV_MULTISHOT;
        }
    }
    l->pool = coro_pool_new(coro_stack, 256, loop_schedule, l);
    if (!l->pool) {
        *errmsg = strdup("out of memory");
        io_uring_queue_exit(&l->ring);
        close(l->post_efd);
        free(l->free_bgids);
        free(l);
        return NULL;
    }
    l->tick_op.done = tick_done;
    char names[128];
    log_debug("io_uring: %s", loop_feature_names(l->features, names,
                                                  sizeof(names)));
    return l;
}

unsigned loop_features(const struct loop *l)
{
    return l->features;
}

void loop_no_multishot(struct loop *l)
{
    if (!(l->features & LOOP_F_RECV_MULTISHOT))
        return;
    l->features &= ~LOOP_F_RECV_MULTISHOT;
    log_debug("io_uring: the kernel refused a multishot receive: one "
              "receive per message from now on");
}

/* ---- provided-buffer rings ---- */

struct loop_bufring *loop_bufring_new(struct loop *l, unsigned nbufs,
                                      size_t bufsize)
{
    assert(nbufs > 0 && nbufs <= 32768 && (nbufs & (nbufs - 1)) == 0);
    uint16_t bgid;
    if (l->n_free_bgids)
        bgid = l->free_bgids[--l->n_free_bgids];
    else if (l->next_bgid <= UINT16_MAX)
        bgid = (uint16_t)l->next_bgid++;
    else
        return NULL;
    struct loop_bufring *br = calloc(1, sizeof(*br));
    /* One allocation: the ring (page-aligned, as the kernel wants), the
     * buffers right after it. */
    void *ring = NULL;
    size_t ring_size = (sizeof(struct io_uring_buf) * nbufs + 63) & ~(size_t)63;
    if (!br || posix_memalign(&ring, 4096, ring_size + nbufs * bufsize) != 0)
        goto fail;
    memset(ring, 0, ring_size);
    uint8_t *bufs = (uint8_t *)ring + ring_size;
    struct io_uring_buf_reg reg;
    memset(&reg, 0, sizeof(reg));
    reg.ring_addr = (uint64_t)(uintptr_t)ring;
    reg.ring_entries = nbufs;
    reg.bgid = bgid;
    if (io_uring_register_buf_ring(&l->ring, &reg, 0) != 0)
        goto fail;
    br->l = l;
    br->ring = ring;
    br->bufs = bufs;
    br->nbufs = nbufs;
    br->bufsize = bufsize;
    br->bgid = bgid;
    io_uring_buf_ring_init(br->ring);
    int mask = io_uring_buf_ring_mask(nbufs);
    for (unsigned i = 0; i < nbufs; i++)
        io_uring_buf_ring_add(br->ring, br->bufs + i * bufsize,
                              (unsigned)bufsize, (unsigned short)i, mask, (int)i);
    io_uring_buf_ring_advance(br->ring, (int)nbufs);
    return br;
fail:
    free(ring);
    free(br);
    if (l->n_free_bgids < l->cap_free_bgids)
        l->free_bgids[l->n_free_bgids++] = bgid;
    else if (bgid + 1u == l->next_bgid)
        l->next_bgid--;
    return NULL;
}

void loop_bufring_free(struct loop_bufring *br)
{
    if (!br)
        return;
    struct loop *l = br->l;
    (void)io_uring_unregister_buf_ring(&l->ring, br->bgid);
    if (l->n_free_bgids == l->cap_free_bgids) {
        size_t cap = l->cap_free_bgids ? l->cap_free_bgids * 2 : 64;
        uint16_t *n = realloc(l->free_bgids, cap * sizeof(*n));
        if (n) {
            l->free_bgids = n;
            l->cap_free_bgids = cap;
        }
    }
    if (l->n_free_bgids < l->cap_free_bgids)
        l->free_bgids[l->n_free_bgids++] = br->bgid;
    /* else: the id is lost (out of memory), never reused twice */
    free(br->ring); /* the buffers too */
    free(br);
}

uint16_t loop_bufring_bgid(const struct loop_bufring *br)
{
    return br->bgid;
}

uint8_t *loop_bufring_buf(const struct loop_bufring *br, unsigned bid)
{
    assert(bid < br->nbufs);
    return br->bufs + bid * br->bufsize;
}

unsigned loop_bufring_count(const struct loop_bufring *br)
{
    return br->nbufs;
}

void loop_bufring_put(struct loop_bufring *br, unsigned bid)
{
    assert(bid < br->nbufs);
    io_uring_buf_ring_add(br->ring, br->bufs + bid * br->bufsize,
                          (unsigned)br->bufsize, (unsigned short)bid,
                          io_uring_buf_ring_mask(br->nbufs), 0);
    io_uring_buf_ring_advance(br->ring, 1);
}

void loop_free(struct loop *l)
{
    if (!l)
        return;
    /* the ring first: it may hold the doorbell's read */
    io_uring_queue_exit(&l->ring);
    close(l->post_efd);
    coro_pool_free(l->pool);
    free(l->backlog);
    free(l->free_bgids);
    free(l);
}

struct coro_pool *loop_coro_pool(struct loop *l)
{
    return l->pool;
}

void loop_stop(struct loop *l)
{
    l->stopping = true;
}

bool loop_stopping(const struct loop *l)
{
    return l->stopping;
}

static int backlog_push(struct loop *l, struct io_uring_cqe *cqe)
{
    if (l->backlog_len == l->backlog_cap) {
        size_t cap = l->backlog_cap ? l->backlog_cap * 2 : 256;
        void *p = realloc(l->backlog, cap * sizeof(*l->backlog));
        if (!p)
            return -ENOMEM;
        l->backlog = p;
        l->backlog_cap = cap;
    }
    l->backlog[l->backlog_len++] = (struct loop_backlog_entry){
        .op = io_uring_cqe_get_data(cqe), .res = cqe->res, .flags = cqe->flags};
    return 0;
}

/* Moves every available CQE to the backlog (handlers cannot run here: we
 * may be inside one). */
static void reap_to_backlog(struct loop *l)
{
    struct io_uring_cqe *cqe;
    while (io_uring_peek_cqe(&l->ring, &cqe) == 0) {
        if (backlog_push(l, cqe) < 0)
            return; /* leave it in the ring; delivered by loop_run later */
        io_uring_cqe_seen(&l->ring, cqe);
    }
}

struct io_uring_sqe *loop_get_sqe(struct loop *l, struct loop_op *op)
{
    struct io_uring_sqe *sqe;
    while ((sqe = io_uring_get_sqe(&l->ring)) == NULL) {
        int r = io_uring_submit(&l->ring);
        if (r >= 0) {
            continue;
        }
        /* -EBUSY / -EAGAIN: the completion side is full; make room. */
        reap_to_backlog(l);
    }
    io_uring_sqe_set_data(sqe, op);
    return sqe;
}

void loop_defer(struct loop *l, struct loop_hook *h)
{
    if (h->queued)
        return;
    h->queued = true;
    h->next = l->hooks;
    l->hooks = h;
}

void loop_undefer(struct loop *l, struct loop_hook *h)
{
    if (!h->queued)
        return;
    for (struct loop_hook **pp = &l->hooks; *pp; pp = &(*pp)->next) {
        if (*pp == h) {
            *pp = h->next;
            break;
        }
    }
    h->queued = false;
}

void loop_timer_add(struct loop *l, struct loop_timer *t)
{
    t->prev = NULL;
    t->next = l->timers;
    if (l->timers)
        l->timers->prev = t;
    l->timers = t;
}

void loop_timer_del(struct loop *l, struct loop_timer *t)
{
    if (t->prev)
        t->prev->next = t->next;
    else if (l->timers == t)
        l->timers = t->next;
    if (t->next)
        t->next->prev = t->prev;
    t->next = t->prev = NULL;
}

static void tick_arm(struct loop *l)
{
    if (l->tick_armed || l->stopping)
        return;
    l->tick_ts.tv_sec = 1;
    l->tick_ts.tv_nsec = 0;
    struct io_uring_sqe *sqe = loop_get_sqe(l, &l->tick_op);
    io_uring_prep_timeout(sqe, &l->tick_ts, 0, 0);
    l->tick_armed = true;
}

static void tick_done(struct loop_op *op, int res, uint32_t flags)
{
    struct loop *l = container_of(op, struct loop, tick_op);
    (void)res;
    (void)flags;
    l->tick_armed = false;
    uint64_t now = loop_now_ns();
    struct loop_timer *t = l->timers;
    while (t) {
        struct loop_timer *next = t->next; /* fn may delete t */
        t->fn(t, now);
        t = next;
    }
    tick_arm(l);
}

/* ---- messages from other threads ---- */

static void ring_doorbell(struct loop *l)
{
    uint64_t one = 1;
    while (write(l->post_efd, &one, sizeof(one)) < 0 && errno == EINTR)
        ;
    /* EAGAIN cannot happen: the counter would have to reach 2^64 - 1 */
}

void loop_post(struct loop *l, struct loop_msg *m)
{
    assert(m->fn);
    struct loop_msg *head = atomic_load(&l->posted);
    do {
        m->next = head;
    } while (!atomic_compare_exchange_weak(&l->posted, &head, m));
    /* One write per wake-up: a poster that finds the bell already rung
     * needs none, because that ring's read has not completed yet (rung is
     * cleared only when it does), and the loop takes the list in the
     * iteration after that completion, which is after this push. */
    if (!atomic_exchange(&l->rung, true))
        ring_doorbell(l);
}

/* Runs every message posted so far, oldest first.  Returns whether there
 * were any. */
static bool run_posted(struct loop *l)
{
    if (atomic_load_explicit(&l->posted, memory_order_relaxed) == NULL)
        return false;
    struct loop_msg *list = atomic_exchange(&l->posted, NULL);
    struct loop_msg *fifo = NULL;
    while (list) {
        struct loop_msg *next = list->next;
        list->next = fifo;
        fifo = list;
        list = next;
    }
    bool any = fifo != NULL;
    while (fifo) {
        struct loop_msg *m = fifo;
        fifo = m->next;
        m->next = NULL;
        m->fn(m); /* m may be gone after this */
    }
    return any;
}

static void post_arm(struct loop *l)
{
    if (l->post_armed || l->stopping)
        return;
    struct io_uring_sqe *sqe = loop_get_sqe(l, &l->post_op);
    io_uring_prep_read(sqe, l->post_efd, &l->post_val, sizeof(l->post_val),
                       0);
    l->post_armed = true;
}

/* The doorbell rang (the read resets its counter).  The messages run at
 * the start of the next iteration, with everything else that is ready:
 * every message pushed before the write that made this read complete. */
static void post_done(struct loop_op *op, int res, uint32_t flags)
{
    struct loop *l = container_of(op, struct loop, post_op);
    (void)res;
    (void)flags;
    l->post_armed = false;
    /* From here on a poster rings again: its push may come after the
     * next take of the list. */
    atomic_store(&l->rung, false);
}

static void run_coroutines(struct loop *l)
{
    while (l->runq_head) {
        struct coro *co = l->runq_head;
        l->runq_head = *coro_link(co);
        if (!l->runq_head)
            l->runq_tail = NULL;
        *coro_link(co) = NULL;
        coro_enter(co);
    }
}

static void run_hooks(struct loop *l)
{
    /* One at a time from the list head: a hook may queue hooks (itself
     * included) or cancel others (loop_undefer) while we run. */
    struct loop_hook *h;
    while ((h = l->hooks) != NULL) {
        l->hooks = h->next;
        h->queued = false;
        h->fn(h);
        run_coroutines(l);
    }
}

static void deliver(struct loop_op *op, int res, uint32_t flags)
{
    assert(op && op->done);
    op->done(op, res, flags);
}

/* One iteration: run what is ready, submit, wait for and deliver
 * completions.  Returns 0 or -errno for a fatal ring error. */
static int loop_iterate(struct loop *l, const bool *until)
{
    do {
        run_coroutines(l);
        run_hooks(l);
    } while (run_posted(l));
    if (l->stopping || (until && *until))
        return 0;
    /* Before sleeping: a message posted from now on rings the bell (or
     * was taken above), and the bell's read wakes the loop. */
    post_arm(l);

    /* One io_uring_enter: submits what the handlers queued and, with
     * DEFER_TASKRUN, runs the completion work the kernel kept for us.
     * It blocks only when no completion is ready yet.  A send usually
     * completes during the submission itself, so an iteration that sent
     * replies comes straight back for that completion and sleeps in the
     * next one.  The wait is for one completion, with no timeout: a wait
     * for more (past the sends) needs a timer to bound it, and arming and
     * cancelling a timer at every sleep costs more than the extra
     * io_uring_enter (docs/io_uring.md). */
    int r;
    if (io_uring_cq_ready(&l->ring))
        r = io_uring_submit_and_get_events(&l->ring);
    else
        r = io_uring_submit_and_wait(&l->ring, 1);
    if (r < 0 && r != -EINTR && r != -EAGAIN && r != -EBUSY && r != -ETIME)
        return r;

    /* Each CQE is consumed before its handler runs, so a handler that
     * flushes a full SQ (and moves CQEs to the backlog) can never make
     * us deliver one twice.  Backlogged completions go first. */
    for (;;) {
        if (l->backlog_len) {
            for (size_t i = 0; i < l->backlog_len; i++) {
                struct loop_backlog_entry e = l->backlog[i];
                deliver(e.op, e.res, e.flags);
            }
            l->backlog_len = 0;
            continue;
        }
        struct io_uring_cqe *cqe;
        if (io_uring_peek_cqe(&l->ring, &cqe) != 0)
            break;
        struct loop_op *op = io_uring_cqe_get_data(cqe);
        int res = cqe->res;
        uint32_t flags = cqe->flags;
        io_uring_cqe_seen(&l->ring, cqe);
        deliver(op, res, flags);
    }
    return 0;
}

int loop_run(struct loop *l)
{
    assert(!l->running);
    l->running = true;
    tick_arm(l);
    int r = 0;
    while (!l->stopping && r == 0)
        r = loop_iterate(l, NULL);
    l->running = false;
    return r;
}

int loop_run_once(struct loop *l)
{
    assert(!l->running);
    l->running = true;
    tick_arm(l);
    int r = loop_iterate(l, NULL);
    /* What the completions set off (hooks: sends, closes) is done before
     * returning, so the caller sees its effect on the sockets. */
    if (r == 0 && !l->stopping) {
        run_coroutines(l);
        run_hooks(l);
    }
    l->running = false;
    return r;
}

/* Runs fn(co, arg) in a coroutine and iterates the loop until it returns. */
struct sync_call {
    coro_fn *fn;
    void *arg;
    bool done;
};

static void sync_call_entry(struct coro *co, void *opaque)
{
    struct sync_call *sc = opaque;
    sc->fn(co, sc->arg);
    sc->done = true;
}

int loop_run_sync(struct loop *l, coro_fn *fn, void *arg)
{
    assert(!l->running);
    struct sync_call sc = {.fn = fn, .arg = arg};
    struct coro *co = coro_create(l->pool, sync_call_entry, &sc);
    if (!co)
        return -ENOMEM;
    l->running = true;
    coro_enter(co);
    int r = 0;
    while (!sc.done && r == 0)
        r = loop_iterate(l, &sc.done);
    l->running = false;
    return r;
}

/* ---- coroutine helpers ---- */

static void wait_done(struct loop_op *op, int res, uint32_t flags)
{
    struct loop_wait *w = (struct loop_wait *)op;
    (void)flags;
    w->res = res;
    w->done = true;
    coro_wake(w->co);
}

void loop_wait_init(struct loop_wait *w, struct coro *co)
{
    w->op.done = wait_done;
    w->co = co;
    w->res = 0;
    w->done = false;
}

int loop_wait_co(struct loop_wait *w)
{
    while (!w->done)
        coro_yield(w->co);
    return w->res;
}

/* ---- blocking calls on a thread ---- */

struct offload {
    void (*fn)(void *);
    void *arg;
    int efd;
};

static void *offload_main(void *p)
{
    struct offload *o = p;
    o->fn(o->arg);
    uint64_t one = 1;
    while (write(o->efd, &one, sizeof(one)) < 0 && errno == EINTR)
        ;
    return NULL;
}

void loop_offload_co(struct loop *l, struct coro *co, void (*fn)(void *),
                     void *arg)
{
    struct offload o = {fn, arg, eventfd(0, EFD_CLOEXEC)};
    pthread_t t;
    int e = -1;
    if (o.efd >= 0) {
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        e = pthread_create(&t, NULL, offload_main, &o);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    }
    if (e != 0) {
        if (o.efd >= 0)
            close(o.efd);
        fn(arg);
        return;
    }
    uint64_t count;
    for (;;) {
        struct loop_wait w;
        loop_wait_init(&w, co);
        io_uring_prep_read(loop_get_sqe(l, &w.op), o.efd, &count,
                           sizeof(count), 0);
        int r = loop_wait_co(&w);
        if (r == (int)sizeof(count) || (r < 0 && r != -EINTR && r != -EAGAIN))
            break; /* done, or the ring cannot tell: join (blocking) */
        /* a read cut short: wait on (the thread's write is still due) */
    }
    pthread_join(t, NULL);
    close(o.efd);
}

/* ---- interruptible sleep ---- */

static void sleep_done(struct loop_op *op, int res, uint32_t flags)
{
    struct loop_sleep *s = (struct loop_sleep *)op;
    (void)res;
    (void)flags;
    s->sleeping = false;
    if (!s->cancel_pending)
        coro_wake(s->co);
}

static void sleep_cancel_done(struct loop_op *op, int res, uint32_t flags)
{
    struct loop_sleep *s =
        container_of(op, struct loop_sleep, cancel_op);
    (void)res;
    (void)flags;
    s->cancel_pending = false;
    if (!s->sleeping)
        coro_wake(s->co);
}

void loop_sleep_init(struct loop_sleep *s)
{
    memset(s, 0, sizeof(*s));
    s->op.done = sleep_done;
    s->cancel_op.done = sleep_cancel_done;
}

int loop_sleep_co(struct loop *l, struct loop_sleep *s, struct coro *co,
                  uint64_t ns)
{
    assert(!s->sleeping && !s->cancel_pending);
    if (ns == 0)
        return 0;
    s->co = co;
    s->ts.tv_sec = (long long)(ns / 1000000000u);
    s->ts.tv_nsec = (long long)(ns % 1000000000u);
    struct io_uring_sqe *sqe = loop_get_sqe(l, &s->op);
    io_uring_prep_timeout(sqe, &s->ts, 0, 0);
    s->sleeping = true;
    s->woken_early = false;
    /* Both completions (the timeout's, and the removal's if any) must be
     * in before the struct can go away; the later one wakes us. */
    while (s->sleeping || s->cancel_pending)
        coro_yield(co);
    s->co = NULL;
    return s->woken_early ? -ECANCELED : 0;
}

void loop_sleep_wake(struct loop *l, struct loop_sleep *s)
{
    if (!s->sleeping || s->cancel_pending)
        return;
    s->woken_early = true;
    struct io_uring_sqe *sqe = loop_get_sqe(l, &s->cancel_op);
    io_uring_prep_timeout_remove(sqe, (uint64_t)(uintptr_t)&s->op, 0);
    s->cancel_pending = true;
}
