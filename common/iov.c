/* strata — iovec helpers (see iov.h). */
#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "iov.h"
#include "util.h"

int iov_slice_init(struct iov_slice *sl, const struct iovec *iov, int iovcnt,
                   uint64_t skip, uint64_t len)
{
    sl->v = iovcnt <= IOV_SLICE_INLINE ? sl->inl
                                       : malloc(sizeof(struct iovec) * (size_t)iovcnt);
    if (!sl->v)
        return -ENOMEM;
    sl->cnt = 0;
    for (int i = 0; i < iovcnt && len > 0; i++) {
        if (skip >= iov[i].iov_len) {
            skip -= iov[i].iov_len;
            continue;
        }
        uint64_t n = MIN(iov[i].iov_len - skip, len);
        sl->v[sl->cnt].iov_base = (uint8_t *)iov[i].iov_base + skip;
        sl->v[sl->cnt].iov_len = n;
        sl->cnt++;
        len -= n;
        skip = 0;
    }
    assert(len == 0);
    return 0;
}

void iov_slice_free(struct iov_slice *sl)
{
    if (sl->v != sl->inl)
        free(sl->v);
    sl->v = NULL;
    sl->cnt = 0;
}

void iov_zero(const struct iovec *iov, int iovcnt)
{
    for (int i = 0; i < iovcnt; i++)
        memset(iov[i].iov_base, 0, iov[i].iov_len);
}

void iov_zero_range(const struct iovec *iov, int iovcnt, uint64_t from,
                    uint64_t n)
{
    for (int i = 0; i < iovcnt && n > 0; i++) {
        if (from >= iov[i].iov_len) {
            from -= iov[i].iov_len;
            continue;
        }
        size_t k = (size_t)MIN(iov[i].iov_len - from, n);
        memset((char *)iov[i].iov_base + from, 0, k);
        n -= k;
        from = 0;
    }
    assert(n == 0);
}

void iov_from_buf(const struct iovec *iov, int iovcnt, const void *buf)
{
    const uint8_t *p = buf;
    for (int i = 0; i < iovcnt; i++) {
        memcpy(iov[i].iov_base, p, iov[i].iov_len);
        p += iov[i].iov_len;
    }
}

void iov_to_buf(const struct iovec *iov, int iovcnt, void *buf)
{
    uint8_t *p = buf;
    for (int i = 0; i < iovcnt; i++) {
        memcpy(p, iov[i].iov_base, iov[i].iov_len);
        p += iov[i].iov_len;
    }
}
