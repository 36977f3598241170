/* strata — fault injection for tests (see fault.h). */
#include <errno.h>
#include <signal.h>

#include "fault.h"
#include "log.h"
#include "loop.h"

#if STRATA_FAULT_INJECTION

static struct {
    struct backend_fault_plan plan;
    uint64_t seen;
    bool armed;
    bool fired;
    bool short_pending;        /* the next rw completion is cut short */
    uint64_t generation;       /* plans armed so far: a held operation
                                  waits for the next */
} fault;

int backend_fault_arm(const struct backend_fault_plan *p)
{
    if (p->nth > 0 && (!(p->ops & BACKEND_FAULT_ALL) ||
                       (p->error > 0 && p->error != BACKEND_FAULT_KILL &&
                        p->error != BACKEND_FAULT_HOLD) ||
                       (p->error == BACKEND_FAULT_HOLD &&
                        (p->ops & ~(BACKEND_FAULT_WRITE | BACKEND_FAULT_FLUSH))) ||
                       (p->error == 0 &&
                        (p->ops & ~(BACKEND_FAULT_READ | BACKEND_FAULT_WRITE)))))
        return -EINVAL;
    fault.plan = *p;
    fault.seen = 0;
    fault.armed = p->nth > 0;
    fault.fired = false;
    fault.short_pending = false;
    fault.generation++; /* releases a held operation */
    return 0;
}

void backend_fault_get_stats(struct backend_fault_stats *st)
{
    st->seen = fault.seen;
    st->armed = fault.armed;
    st->fired = fault.fired;
}

int backend_fault_hit(unsigned op, bool *short_io)
{
    *short_io = false;
    if (!(fault.plan.ops & op))
        return 0;
    fault.seen++;
    if (!fault.armed || fault.seen != fault.plan.nth)
        return 0;
    fault.armed = false;
    fault.fired = true;
    if (fault.plan.error == BACKEND_FAULT_KILL) {
        log_info("fault injection: killed at backend operation %llu",
                 (unsigned long long)fault.seen);
        raise(SIGKILL);
    }
    if (fault.plan.error == BACKEND_FAULT_HOLD) {
        log_info("fault injection: backend operation %llu held",
                 (unsigned long long)fault.seen);
        return BACKEND_FAULT_HOLD;
    }
    if (fault.plan.error == 0) {
        log_info("fault injection: backend operation %llu: short transfer",
                 (unsigned long long)fault.seen);
        fault.short_pending = true;
        *short_io = true;
        return 0;
    }
    log_info("fault injection: backend operation %llu fails with errno %d",
             (unsigned long long)fault.seen, -fault.plan.error);
    return fault.plan.error;
}

void backend_fault_hold_co(struct loop *l, struct coro *co)
{
    uint64_t gen = fault.generation;
    struct loop_sleep s;
    loop_sleep_init(&s);
    while (fault.generation == gen)
        loop_sleep_co(l, &s, co, 1000000);
    log_info("fault injection: held operation released");
}

int backend_fault_shorten(int res)
{
    if (!fault.short_pending || res <= 1)
        return res;
    fault.short_pending = false;
    return res / 2;
}

#else

int backend_fault_arm(const struct backend_fault_plan *p)
{
    (void)p;
    return -ENOTSUP;
}

void backend_fault_get_stats(struct backend_fault_stats *st)
{
    st->seen = 0;
    st->armed = false;
    st->fired = false;
}

#endif
