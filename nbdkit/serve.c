/* strata inside nbdkit — requests on the loop (see serve.h). */
#define NBDKIT_API_VERSION 2

#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <nbdkit-plugin.h>

#include "engine.h"
#include "format.h"
#include "serve.h"
#include "util.h"

/* Extents gathered per NBD_CMD_BLOCK_STATUS (stratad's limit). */
#define SERVE_MAX_EXTENTS 1024

enum op_kind { OP_READ, OP_WRITE, OP_FLUSH, OP_TRIM, OP_ZERO, OP_CACHE,
               OP_EXTENTS };

struct op {
    struct fmt_node *n;
    enum op_kind kind;
    void *buf;
    uint64_t count, offset;
    unsigned flags;            /* FMT_* */
    int ret;
    /* OP_EXTENTS */
    struct fmt_extent *ext;
    unsigned max_ext, n_ext;
};

static void op_co(struct coro *co, void *opaque)
{
    struct op *o = opaque;
    struct fmt_node *n = o->n;
    int r = 0;
    switch (o->kind) {
    case OP_READ:
    case OP_WRITE: {
        /* in pieces of at most FMT_MAX_RW bytes */
        uint64_t done = 0;
        while (r == 0 && done < o->count) {
            uint64_t len = MIN(o->count - done, FMT_MAX_RW);
            struct iovec iov = {(char *)o->buf + done, (size_t)len};
            r = o->kind == OP_READ
                    ? fmt_preadv_co(n, co, &iov, 1, o->offset + done)
                    : fmt_pwritev_co(n, co, &iov, 1, o->offset + done,
                                     o->flags);
            done += len;
        }
        break;
    }
    case OP_FLUSH:
        r = fmt_flush_co(n, co);
        break;
    case OP_TRIM:
        r = fmt_discard_co(n, co, o->offset, o->count, 0);
        if (r == 0 && (o->flags & FMT_FUA))
            r = fmt_flush_co(n, co);
        break;
    case OP_ZERO:
        r = fmt_zero_co(n, co, o->offset, o->count, o->flags);
        break;
    case OP_CACHE:
        r = fmt_cache_co(n, co, o->offset, o->count);
        break;
    case OP_EXTENTS: {
        uint64_t pos = o->offset, end = o->offset + o->count;
        while (r == 0 && pos < end && o->n_ext < o->max_ext) {
            r = fmt_block_status_co(n, co, pos, end - pos, &o->ext[o->n_ext]);
            if (r == 0)
                pos += o->ext[o->n_ext++].len;
        }
        break;
    }
    }
    o->ret = r;
}

/* A plugin reports errno through nbdkit_set_error, a filter through *err. */
static int fail(int e, int *err)
{
    if (err)
        *err = e;
    else
        nbdkit_set_error(e);
    return -1;
}

/* Checks what the format's contract requires and nbdkit does not (the
 * alignment advertised in block_size, a range inside the disk), runs the
 * op on the loop, sets the error. */
static int run(struct serve *s, struct op *o, bool aligned_only, int *err)
{
    struct fmt_node *n = s->root;
    uint64_t a = n->align;
    o->n = n;
    if (aligned_only && a > 1 && ((o->offset | o->count) & (a - 1))) {
        nbdkit_error("request %" PRIu64 "+%" PRIu64 " is not aligned to "
                     "%" PRIu64 " bytes (the advertised minimum block size)",
                     o->offset, o->count, a);
        return fail(EINVAL, err);
    }
    if (o->kind != OP_FLUSH &&
        (o->offset > n->size || o->count > n->size - o->offset))
        return fail(ENOSPC, err);
    if (o->count == 0 && o->kind != OP_FLUSH)
        return 0;
    engine_call(s->eng, op_co, o);
    if (o->ret < 0) {
        /* FAST_ZERO's ENOTSUP is an answer, not a failure worth a message */
        if (!(o->kind == OP_ZERO && o->ret == -ENOTSUP))
            nbdkit_debug("strata: %s at %" PRIu64 "+%" PRIu64 ": %s",
                         o->kind == OP_READ ? "read" : "request", o->offset,
                         o->count, strerror(-o->ret));
        return fail(-o->ret, err);
    }
    return 0;
}

static unsigned fmt_flags(uint32_t flags)
{
    return ((flags & NBDKIT_FLAG_FUA) ? FMT_FUA : 0) |
           ((flags & NBDKIT_FLAG_MAY_TRIM) ? FMT_MAY_TRIM : 0) |
           ((flags & NBDKIT_FLAG_FAST_ZERO) ? FMT_FAST : 0);
}

int serve_pread(struct serve *s, void *buf, uint32_t count, uint64_t offset,
                int *err)
{
    struct op o = {.kind = OP_READ, .buf = buf, .count = count,
                   .offset = offset};
    return run(s, &o, true, err);
}

int serve_pwrite(struct serve *s, const void *buf, uint32_t count,
                 uint64_t offset, uint32_t flags, int *err)
{
    struct op o = {.kind = OP_WRITE, .buf = (void *)buf, .count = count,
                   .offset = offset, .flags = fmt_flags(flags) & FMT_FUA};
    return run(s, &o, true, err);
}

int serve_flush(struct serve *s, int *err)
{
    struct op o = {.kind = OP_FLUSH};
    return run(s, &o, false, err);
}

int serve_trim(struct serve *s, uint32_t count, uint64_t offset,
               uint32_t flags, int *err)
{
    struct op o = {.kind = OP_TRIM, .count = count, .offset = offset,
                   .flags = fmt_flags(flags) & FMT_FUA};
    return run(s, &o, true, err);
}

int serve_zero(struct serve *s, uint32_t count, uint64_t offset,
               uint32_t flags, int *err)
{
    struct op o = {.kind = OP_ZERO, .count = count, .offset = offset,
                   .flags = fmt_flags(flags)};
    return run(s, &o, true, err);
}

int serve_cache(struct serve *s, uint32_t count, uint64_t offset, int *err)
{
    uint64_t size = s->root->size;
    if (offset >= size)
        return 0;
    struct op o = {.kind = OP_CACHE, .count = MIN((uint64_t)count,
                                                  size - offset),
                   .offset = offset};
    return run(s, &o, false, err);
}

int serve_extents(struct serve *s, uint32_t count, uint64_t offset,
                  uint32_t flags, struct nbdkit_extents *extents, int *err)
{
    unsigned max = (flags & NBDKIT_FLAG_REQ_ONE) ? 1 : SERVE_MAX_EXTENTS;
    struct fmt_extent *ext = malloc(sizeof(*ext) * max);
    if (!ext) {
        nbdkit_error("out of memory");
        return fail(ENOMEM, err);
    }
    struct op o = {.kind = OP_EXTENTS, .count = count, .offset = offset,
                   .ext = ext, .max_ext = max};
    int r = run(s, &o, false, err);
    uint64_t pos = offset;
    for (unsigned i = 0; r == 0 && i < o.n_ext; i++) {
        uint32_t type =
            ((ext[i].flags & FMT_EXT_HOLE) ? NBDKIT_EXTENT_HOLE : 0) |
            ((ext[i].flags & FMT_EXT_ZERO) ? NBDKIT_EXTENT_ZERO : 0);
        r = nbdkit_add_extent(extents, pos, ext[i].len, type);
        if (r < 0 && err)
            *err = errno;
        pos += ext[i].len;
    }
    free(ext);
    return r;
}

void serve_block_size(struct serve *s, uint32_t *minimum, uint32_t *preferred,
                      uint32_t *maximum)
{
    *minimum = s->root->align;
    *preferred = MAX(s->root->align, 4096u);
    *maximum = SERVE_MAX_BLOCK;
}
