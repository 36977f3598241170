/* strata — format node dispatch and contract wrappers (see format.h). */
#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "format.h"

static const uint8_t qcow2_magic[4] = {'Q', 'F', 'I', 0xfb};

/* Reads the first bytes of a local file without the loop (control path,
 * before the node exists).  Returns the bytes read (0 if unreadable). */
static int peek_magic(const char *path, uint8_t *buf, size_t len)
{
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return 0; /* backend_open reports the real error */
    size_t n = fread(buf, 1, len, fp);
    fclose(fp);
    return (int)n;
}

struct fmt_node *fmt_open(struct loop *loop, const char *spec,
                          const struct fmt_open_opts *opts,
                          struct error **errp)
{
    const char *format = opts->format;
    if (!format) {
        /* No probing into a guest-writable raw image: a qcow2 header
         * written by a guest must never change how the image is read. */
        uint8_t magic[4];
        if (peek_magic(spec, magic, sizeof(magic)) == 4 &&
            memcmp(magic, qcow2_magic, 4) == 0) {
            error_setf(errp, EINVAL, "%s: looks like a qcow2 image: say "
                       "format=qcow2 or format=raw explicitly", spec);
            return NULL;
        }
        format = "raw";
    }
    if (strcmp(format, "raw") != 0) {
        error_setf(errp, EINVAL, "%s: unknown format '%s' (supported: raw)",
                   spec, format);
        return NULL;
    }
    struct backend_open_opts bo = {
        .read_only = opts->read_only,
        .direct = opts->direct,
    };
    struct backend *file = backend_open(loop, spec, &bo, errp);
    if (!file)
        return NULL;
    struct fmt_node *n = raw_open(loop, file, opts, errp);
    if (!n)
        backend_close(file);
    return n;
}

void fmt_close(struct fmt_node *n)
{
    while (n) {
        struct fmt_node *backing = n->backing;
        struct backend *file = n->file;
        n->ops->close(n);
        backend_close(file);
        n = backing;
    }
}

/* Callers validated client input already (nbd_validate_request); a bad
 * range here is a programmer error. */
static void check_range(const struct fmt_node *n, uint64_t off, uint64_t len)
{
    assert(len > 0);
    assert(off + len >= off && off + len <= n->size);
    assert((off & (n->align - 1)) == 0 && (len & (n->align - 1)) == 0);
}

int fmt_preadv_co(struct fmt_node *n, struct coro *co, const struct iovec *iov,
                  int iovcnt, uint64_t off)
{
    check_range(n, off, iov_size(iov, iovcnt));
    int r = n->ops->preadv_co(n, co, iov, iovcnt, off);
    assert(r <= 0);
    return r;
}

int fmt_pwritev_co(struct fmt_node *n, struct coro *co, const struct iovec *iov,
                   int iovcnt, uint64_t off, unsigned flags)
{
    assert(!n->read_only);
    assert(!(flags & ~FMT_FUA));
    check_range(n, off, iov_size(iov, iovcnt));
    int r = n->ops->pwritev_co(n, co, iov, iovcnt, off, flags);
    assert(r <= 0);
    return r;
}

int fmt_flush_co(struct fmt_node *n, struct coro *co)
{
    if (n->read_only)
        return 0;
    return n->ops->flush_co(n, co);
}

int fmt_zero_co(struct fmt_node *n, struct coro *co, uint64_t off,
                uint64_t len, unsigned flags)
{
    assert(!n->read_only);
    assert(!(flags & ~(FMT_FUA | FMT_MAY_TRIM | FMT_FAST)));
    check_range(n, off, len);
    if ((flags & FMT_FAST) && !(n->caps & FMT_CAN_ZERO))
        return -ENOTSUP;
    return n->ops->zero_co(n, co, off, len, flags);
}

int fmt_discard_co(struct fmt_node *n, struct coro *co, uint64_t off,
                   uint64_t len, unsigned flags)
{
    assert(!n->read_only);
    check_range(n, off, len);
    if (!(n->caps & FMT_CAN_TRIM))
        return 0;
    return n->ops->discard_co(n, co, off, len, flags);
}

int fmt_block_status_co(struct fmt_node *n, struct coro *co, uint64_t off,
                        uint64_t len, struct fmt_extent *ext)
{
    assert(len > 0 && off < n->size);
    if (len > n->size - off)
        len = n->size - off;
    int r = n->ops->block_status_co(n, co, off, len, ext);
    assert(r < 0 || (ext->len > 0 && ext->len <= len));
    return r;
}

int fmt_cache_co(struct fmt_node *n, struct coro *co, uint64_t off,
                 uint64_t len)
{
    check_range(n, off, len);
    if (!n->ops->cache_co)
        return 0;
    return n->ops->cache_co(n, co, off, len);
}
