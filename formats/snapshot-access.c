/* strata — snapshot-access: the point-in-time view a copy-before-write
 * node keeps (QEMU's driver of that name), read-only.  Copied clusters
 * are read from the cbw's target, the others from its source, under the
 * cbw's range lock (cbw.h: no guest write can change a cluster not yet
 * copied while it is being read). */
#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "cbw-int.h"
#include "iov.h"
#include "log.h"

struct snap {
    struct fmt_node n;         /* first */
    struct fmt_node *cbw;      /* a reference */
};

static void lock_range(struct cbw *s, uint64_t off, uint64_t len,
                       uint64_t *a, uint64_t *b)
{
    *a = off & ~(s->cluster - 1);
    *b = (off + len + s->cluster - 1) & ~(s->cluster - 1);
    if (*b > s->n.size)
        *b = s->n.size;
}

static int snap_preadv_co(struct fmt_node *n, struct coro *co,
                          const struct iovec *iov, int iovcnt, uint64_t off)
{
    struct cbw *s = cbw_of(((struct snap *)n)->cbw);
    uint64_t len = iov_size(iov, iovcnt);
    if (!s->attached)
        return -EIO;
    uint64_t a, b;
    lock_range(s, off, len, &a, &b);
    struct cbw_range lk;
    cbw_lock_co(s, &lk, co, a, b);
    int r = 0;
    for (uint64_t done = 0; done < len && r == 0;) {
        if (!s->attached) {
            r = -EIO;
            break;
        }
        bool copied;
        uint64_t run = dbitmap_run(&s->copied, off + done, len - done, &copied);
        struct iov_slice sl;
        r = iov_slice_init(&sl, iov, iovcnt, done, run);
        if (r < 0)
            break;
        r = fmt_preadv_co(copied ? s->target : s->source, co, sl.v, sl.cnt,
                          off + done);
        iov_slice_free(&sl);
        done += run;
    }
    cbw_unlock(s, &lk);
    return r;
}

static int snap_block_status_co(struct fmt_node *n, struct coro *co,
                                uint64_t off, uint64_t len,
                                struct fmt_extent *ext)
{
    struct cbw *s = cbw_of(((struct snap *)n)->cbw);
    if (!s->attached)
        return -EIO;
    bool copied;
    uint64_t run = dbitmap_run(&s->copied, off, len, &copied);
    if (copied) {
        /* the frozen data is in the target: data */
        *ext = (struct fmt_extent){.len = run, .flags = 0, .depth = 1};
        return 0;
    }
    uint64_t a, b;
    lock_range(s, off, run, &a, &b);
    struct cbw_range lk;
    cbw_lock_co(s, &lk, co, a, b);
    int r = -EIO;
    if (s->attached) {
        /* look again: a copy may have run while this waited */
        run = dbitmap_run(&s->copied, off, run, &copied);
        if (copied)
            *ext = (struct fmt_extent){.len = run, .flags = 0, .depth = 1};
        r = copied ? 0 : fmt_block_status_co(s->source, co, off, run, ext);
        if (r == 0 && ext->len > run)
            ext->len = run;
        if (r == 0 && ext->depth > 1)
            ext->depth = 1; /* one node: the view is its own */
    }
    cbw_unlock(s, &lk);
    return r;
}

static int snap_flush_co(struct fmt_node *n, struct coro *co)
{
    (void)n;
    (void)co;
    return 0;
}

static int snap_no_write_co(struct fmt_node *n, struct coro *co,
                            const struct iovec *iov, int iovcnt, uint64_t off,
                            unsigned flags)
{
    (void)n, (void)co, (void)iov, (void)iovcnt, (void)off, (void)flags;
    return -EROFS;
}

static int snap_no_zero_co(struct fmt_node *n, struct coro *co, uint64_t off,
                           uint64_t len, unsigned flags)
{
    (void)n, (void)co, (void)off, (void)len, (void)flags;
    return -EROFS;
}

static void snap_close(struct fmt_node *n)
{
    struct snap *sn = (struct snap *)n;
    cbw_unref(sn->cbw);
    free(n->filename);
    free(sn);
}

static const struct fmt_ops snap_ops = {
    .name = "snapshot-access",
    .preadv_co = snap_preadv_co,
    .pwritev_co = snap_no_write_co,
    .flush_co = snap_flush_co,
    .zero_co = snap_no_zero_co,
    .discard_co = snap_no_zero_co,
    .block_status_co = snap_block_status_co,
    .close = snap_close,
};

struct fmt_node *snapshot_access_new(struct fmt_node *cbw, const char *name,
                                     struct error **errp)
{
    struct cbw *s = cbw_of(cbw);
    if (!s->attached) {
        error_setf(errp, EINVAL, "the copy-before-write filter is detached "
                   "(its backup job ended)");
        return NULL;
    }
    struct snap *sn = calloc(1, sizeof(*sn));
    if (!sn || !(sn->n.filename = strdup(name))) {
        free(sn);
        error_setf(errp, ENOMEM, "out of memory");
        return NULL;
    }
    sn->n.ops = &snap_ops;
    sn->n.loop = s->n.loop;
    sn->n.size = s->n.size;
    sn->n.align = s->n.align;
    sn->n.read_only = true;
    sn->cbw = cbw;
    cbw_ref(cbw);
    return &sn->n;
}
