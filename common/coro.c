/* strata — stackful coroutines (see coro.h for the rules). */
#include <assert.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "coro.h"

#if defined(__SANITIZE_ADDRESS__)
#define CORO_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CORO_ASAN 1
#endif
#endif

#ifdef CORO_ASAN
#include <sanitizer/asan_interface.h>
#endif

#if defined(__x86_64__)
#define CORO_ASM 1
#else
#include <ucontext.h>
#endif

struct coro_ctx {
#ifdef CORO_ASM
    void *sp;
#else
    ucontext_t uc;
#endif
};

enum coro_state {
    CORO_FREE,      /* in the pool, no function */
    CORO_RUNNING,   /* entered */
    CORO_YIELDED,   /* waiting for a wake */
    CORO_SCHEDULED, /* on the loop's run queue */
};

struct coro {
    struct coro_ctx ctx;        /* this coroutine's saved context */
    struct coro_ctx caller;     /* the loop's context while entered */
    struct coro_pool *pool;
    coro_fn *fn;
    void *arg;
    enum coro_state state;
    bool finished;              /* fn returned; back to the pool on exit */
    struct coro *next;          /* pool free list, run queue or wait queue */
    void *stack;                /* mmap'ed area: guard page + stack */
    size_t stack_size;          /* usable bytes above the guard page */
#ifdef CORO_ASAN
    void *fake_stack;
    const void *caller_stack;
    size_t caller_stack_size;
#endif
};

struct coro_pool {
    size_t stack_size;
    unsigned max_free;
    unsigned n_free;
    struct coro *free_list;
    coro_schedule_fn *schedule;
    void *opaque;
};

#ifdef CORO_ASM
/* void coro_switch(struct coro_ctx *from, struct coro_ctx *to)
 * Saves the callee-saved registers on the current stack, stores the stack
 * pointer in from->sp, loads to->sp and pops the registers saved there. */
void coro_switch(struct coro_ctx *from, struct coro_ctx *to);
void coro_trampoline(void);
__asm__(
    ".text\n"
    ".globl coro_switch\n"
    ".type coro_switch, @function\n"
    "coro_switch:\n"
    "    .cfi_startproc\n"
    "    pushq %rbp\n"
    "    pushq %rbx\n"
    "    pushq %r12\n"
    "    pushq %r13\n"
    "    pushq %r14\n"
    "    pushq %r15\n"
    "    movq %rsp, (%rdi)\n"
    "    movq (%rsi), %rsp\n"
    "    popq %r15\n"
    "    popq %r14\n"
    "    popq %r13\n"
    "    popq %r12\n"
    "    popq %rbx\n"
    "    popq %rbp\n"
    "    ret\n"
    "    .cfi_endproc\n"
    ".size coro_switch, .-coro_switch\n"
    ".globl coro_trampoline\n"
    ".type coro_trampoline, @function\n"
    "coro_trampoline:\n"
    "    movq %r12, %rdi\n"
    "    call coro_main\n"
    "    ud2\n"
    ".size coro_trampoline, .-coro_trampoline\n");
#endif

void coro_main(struct coro *co) __attribute__((noreturn, used));

static void switch_to_coro(struct coro *co)
{
#ifdef CORO_ASAN
    /* the usable stack starts above the guard page */
    void *fake = NULL;
    __sanitizer_start_switch_fiber(&fake,
                                   (char *)co->stack + sysconf(_SC_PAGESIZE),
                                   co->stack_size);
#endif
#ifdef CORO_ASM
    coro_switch(&co->caller, &co->ctx);
#else
    swapcontext(&co->caller.uc, &co->ctx.uc);
#endif
#ifdef CORO_ASAN
    __sanitizer_finish_switch_fiber(fake, NULL, NULL);
#endif
}

static void switch_to_caller(struct coro *co)
{
#ifdef CORO_ASAN
    __sanitizer_start_switch_fiber(&co->fake_stack, co->caller_stack,
                                   co->caller_stack_size);
#endif
#ifdef CORO_ASM
    coro_switch(&co->ctx, &co->caller);
#else
    swapcontext(&co->ctx.uc, &co->caller.uc);
#endif
#ifdef CORO_ASAN
    __sanitizer_finish_switch_fiber(co->fake_stack, &co->caller_stack,
                                    &co->caller_stack_size);
#endif
}

/* First code run on a new stack: runs functions forever, one per use from
 * the pool, switching back to the caller after each. */
void coro_main(struct coro *co)
{
#ifdef CORO_ASAN
    __sanitizer_finish_switch_fiber(NULL, &co->caller_stack,
                                    &co->caller_stack_size);
#endif
    for (;;) {
        co->fn(co, co->arg);
        co->finished = true;
        switch_to_caller(co);
    }
}

#ifndef CORO_ASM
static void coro_uc_entry(unsigned hi, unsigned lo)
{
    struct coro *co = (struct coro *)(((uintptr_t)hi << 32) | lo);
    coro_main(co);
}
#endif

struct coro_pool *coro_pool_new(size_t stack_size, unsigned max_free,
                                coro_schedule_fn *schedule, void *opaque)
{
    struct coro_pool *pool = calloc(1, sizeof(*pool));
    if (!pool)
        return NULL;
    long page = sysconf(_SC_PAGESIZE);
    pool->stack_size = (stack_size + (size_t)page - 1) & ~((size_t)page - 1);
    pool->max_free = max_free;
    pool->schedule = schedule;
    pool->opaque = opaque;
    return pool;
}

static void coro_destroy(struct coro *co)
{
    long page = sysconf(_SC_PAGESIZE);
    munmap(co->stack, co->stack_size + (size_t)page);
    free(co);
}

void coro_pool_free(struct coro_pool *pool)
{
    if (!pool)
        return;
    while (pool->free_list) {
        struct coro *co = pool->free_list;
        pool->free_list = co->next;
        coro_destroy(co);
    }
    free(pool);
}

static struct coro *coro_new(struct coro_pool *pool)
{
    long page = sysconf(_SC_PAGESIZE);
    struct coro *co = calloc(1, sizeof(*co));
    if (!co)
        return NULL;
    size_t total = pool->stack_size + (size_t)page;
    void *mem = mmap(NULL, total, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (mem == MAP_FAILED) {
        free(co);
        return NULL;
    }
    /* Guard page at the low end: a stack overflow faults instead of
     * silently corrupting the neighbour. */
    if (mprotect(mem, (size_t)page, PROT_NONE) != 0) {
        munmap(mem, total);
        free(co);
        return NULL;
    }
    co->pool = pool;
    co->stack = mem;                 /* mapping start, guard page included */
    co->stack_size = pool->stack_size; /* usable bytes above the guard */
    char *base = (char *)mem + page;
#ifdef CORO_ASM
    uintptr_t top = ((uintptr_t)(base + pool->stack_size)) & ~(uintptr_t)15;
    uint64_t *sp = (uint64_t *)(top - 72);
    memset(sp, 0, 72);
    sp[3] = (uint64_t)(uintptr_t)co;                 /* r12 */
    sp[6] = (uint64_t)(uintptr_t)coro_trampoline;    /* return address */
    co->ctx.sp = sp;
#else
    getcontext(&co->ctx.uc);
    co->ctx.uc.uc_stack.ss_sp = base;
    co->ctx.uc.uc_stack.ss_size = pool->stack_size;
    co->ctx.uc.uc_link = NULL;
    uintptr_t p = (uintptr_t)co;
    makecontext(&co->ctx.uc, (void (*)(void))coro_uc_entry, 2,
                (unsigned)(p >> 32), (unsigned)p);
#endif
    return co;
}

struct coro *coro_create(struct coro_pool *pool, coro_fn *fn, void *arg)
{
    struct coro *co = pool->free_list;
    if (co) {
        pool->free_list = co->next;
        pool->n_free--;
    } else {
        co = coro_new(pool);
        if (!co)
            return NULL;
    }
    assert(co->state == CORO_FREE);
    co->fn = fn;
    co->arg = arg;
    co->finished = false;
    co->next = NULL;
    return co;
}

static void coro_release(struct coro *co)
{
    struct coro_pool *pool = co->pool;
    co->state = CORO_FREE;
    co->fn = NULL;
    co->arg = NULL;
    if (pool->n_free >= pool->max_free) {
        coro_destroy(co);
        return;
    }
    co->next = pool->free_list;
    pool->free_list = co;
    pool->n_free++;
}

void coro_enter(struct coro *co)
{
    assert(co->state == CORO_FREE || co->state == CORO_SCHEDULED ||
           co->state == CORO_YIELDED);
    co->state = CORO_RUNNING;
    switch_to_coro(co);
    if (co->finished)
        coro_release(co);
}

void coro_yield(struct coro *self)
{
    assert(self->state == CORO_RUNNING);
    self->state = CORO_YIELDED;
    switch_to_caller(self);
    assert(self->state == CORO_RUNNING);
}

void coro_wake(struct coro *co)
{
    /* a just-created coroutine (fn set, never entered) may be scheduled
     * too: that is how a coroutine starts another one */
    assert(co->state == CORO_YIELDED || (co->state == CORO_FREE && co->fn));
    co->state = CORO_SCHEDULED;
    co->pool->schedule(co->pool->opaque, co);
}

struct coro **coro_link(struct coro *co)
{
    return &co->next;
}

/* ---- wait queues ---- */

void co_queue_wait_co(struct co_queue *q, struct coro *self)
{
    self->next = NULL;
    if (q->tail)
        q->tail->next = self;
    else
        q->head = self;
    q->tail = self;
    coro_yield(self);
}

bool co_queue_wake_one(struct co_queue *q)
{
    struct coro *co = q->head;
    if (!co)
        return false;
    q->head = co->next;
    if (!q->head)
        q->tail = NULL;
    co->next = NULL;
    coro_wake(co);
    return true;
}

bool co_queue_wake_all(struct co_queue *q)
{
    bool any = false;
    while (co_queue_wake_one(q))
        any = true;
    return any;
}

void co_mutex_lock_co(struct co_mutex *m, struct coro *self)
{
    if (!m->owner) {
        m->owner = self;
        return;
    }
    assert(m->owner != self);
    co_queue_wait_co(&m->waiters, self);
    /* unlock handed the mutex to us */
    assert(m->owner == self);
}

void co_mutex_unlock(struct co_mutex *m, struct coro *self)
{
    assert(m->owner == self);
    struct coro *next = m->waiters.head;
    m->owner = next;
    if (next)
        co_queue_wake_one(&m->waiters);
}
