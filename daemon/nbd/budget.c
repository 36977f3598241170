/* strata — the server-wide budget of request payload buffers.
 *
 * Every payload buffer of every connection (a write's data, a read's
 * reply, and the buffers request slots keep for reuse) is counted in
 * the budget of the connection's loop (struct nbd_budget; with --threads
 * N each loop's connections share max_memory / N).  A request that needs
 * a new buffer is admitted only while the sum stays within that share;
 * otherwise its connection
 * stops parsing (the header stays unread in its receive buffer, so
 * nothing is failed) and queues for memory.  Fairness: the queue is FIFO,
 * and while anyone waits, nobody else takes new memory ahead of the
 * queue's head; whenever memory is given back the head is woken.
 *
 * So that a few clients who leave large replies unread cannot starve
 * everyone else, a connection that holds no payload at all may always
 * start one request of at most NBD_BUDGET_MIN_GRANT bytes.  The bound on
 * payload memory is therefore max_memory + max_connections *
 * NBD_BUDGET_MIN_GRANT (with the defaults, 256 MiB + 64 MiB).
 *
 * Each budget is touched by its loop's thread only: no locks.
 */
#include <assert.h>
#include <stdlib.h>

#include "conn.h"
#include "log.h"

static void wake_head(struct nbd_budget *b)
{
    if (b->mem_wait_head)
        conn_kick(b->mem_wait_head);
}

void nbd_budget_add(struct conn *c, uint64_t bytes)
{
    struct nbd_budget *b = c->budget;
    b->payload_mem += bytes;
    if (b->payload_mem > b->payload_mem_peak)
        b->payload_mem_peak = b->payload_mem;
}

void nbd_budget_sub(struct conn *c, uint64_t bytes)
{
    struct nbd_budget *b = c->budget;
    assert(b->payload_mem >= bytes);
    b->payload_mem -= bytes;
    if (bytes)
        wake_head(b);
}

static void dequeue(struct conn *c)
{
    struct nbd_budget *b = c->budget;
    struct conn **pp = &b->mem_wait_head;
    struct conn *prev = NULL;
    while (*pp && *pp != c) {
        prev = *pp;
        pp = &(*pp)->mem_wait_next;
    }
    assert(*pp == c);
    *pp = c->mem_wait_next;
    if (b->mem_wait_tail == c)
        b->mem_wait_tail = prev;
    c->mem_wait_next = NULL;
    c->mem_waiting = false;
}

static void enqueue(struct conn *c)
{
    struct nbd_budget *b = c->budget;
    c->mem_wait_next = NULL;
    c->mem_waiting = true;
    if (b->mem_wait_tail)
        b->mem_wait_tail->mem_wait_next = c;
    else
        b->mem_wait_head = c;
    b->mem_wait_tail = c;
}

/* Frees the buffers idle request slots keep for reuse, on every
 * connection: memory that nobody uses right now goes to the waiters. */
static void reclaim_kept(struct nbd_budget *b)
{
    uint64_t freed = 0;
    for (struct conn *c = *b->conns; c; c = c->next)
        for (struct nbd_req *r = c->free_slots; r; r = r->next_free)
            if (r->buf) {
                assert(r->buf_kept);
                c->kept -= r->buf_cap;
                freed += r->buf_cap;
                free(r->buf);
                r->buf = NULL;
                r->buf_cap = 0;
                r->buf_kept = false;
            }
    if (freed) {
        log_debug("payload budget: freed %llu bytes of idle slot buffers",
                  (unsigned long long)freed);
        assert(b->payload_mem >= freed);
        b->payload_mem -= freed;
    }
}

bool nbd_budget_admit(struct conn *c, uint64_t need)
{
    struct nbd_budget *b = c->budget;
    const struct nbd_req *slot = c->free_slots;
    assert(slot);
    /* the slot's kept buffer is already counted; a larger one replaces it */
    uint64_t have = slot->buf ? slot->buf_cap : 0;
    bool my_turn = !b->mem_wait_head || b->mem_wait_head == c;
    bool ok = need <= have ||
              (my_turn && b->payload_mem + (need - have) <= b->max) ||
              (c->buffered == 0 && need <= NBD_BUDGET_MIN_GRANT);
    if (!ok && my_turn) {
        reclaim_kept(b);
        have = slot->buf ? slot->buf_cap : 0;
        ok = need <= have ||
             b->payload_mem + (need - have) <= b->max;
    }
    if (ok) {
        if (c->mem_waiting) {
            dequeue(c);
            wake_head(b); /* the next one may fit as well */
        }
        return true;
    }
    if (!c->mem_waiting) {
        log_debug("conn %llu: waiting for %llu bytes of payload memory "
                  "(%llu of %llu in use)", (unsigned long long)c->id,
                  (unsigned long long)need,
                  (unsigned long long)b->payload_mem,
                  (unsigned long long)b->max);
        enqueue(c);
    }
    return false;
}

void nbd_budget_forget(struct conn *c)
{
    if (c->mem_waiting) {
        bool was_head = c->budget->mem_wait_head == c;
        dequeue(c);
        if (was_head)
            wake_head(c->budget);
    }
}
