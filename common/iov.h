/* strata — iovec helpers: one set for every layer.
 *
 * All of them are pure (no I/O, no yield) and trust their arguments: the
 * ranges they are given lie inside the iovec array (asserted).
 */
#ifndef STRATA_IOV_H
#define STRATA_IOV_H

#include <stdint.h>
#include <sys/uio.h>

/* Total bytes described by an iovec array. */
static inline uint64_t iov_size(const struct iovec *iov, int iovcnt)
{
    uint64_t n = 0;
    for (int i = 0; i < iovcnt; i++)
        n += iov[i].iov_len;
    return n;
}

/* A window [skip, skip + len) of an iovec array, as an iovec array of its
 * own: in a small inline array, or on the heap when the source has more
 * than IOV_SLICE_INLINE elements.  Points into the source's buffers. */
#define IOV_SLICE_INLINE 8
struct iov_slice {
    struct iovec *v;
    int cnt;
    struct iovec inl[IOV_SLICE_INLINE];
};

/* Fills sl with the window; 0 or -ENOMEM.  Release with iov_slice_free. */
int iov_slice_init(struct iov_slice *sl, const struct iovec *iov, int iovcnt,
                   uint64_t skip, uint64_t len);
void iov_slice_free(struct iov_slice *sl);

/* Zeroes every byte described by iov. */
void iov_zero(const struct iovec *iov, int iovcnt);
/* Zeroes bytes [from, from + n) of the data described by iov. */
void iov_zero_range(const struct iovec *iov, int iovcnt, uint64_t from,
                    uint64_t n);
/* Copies iov_size(iov) bytes from buf into the iovec's buffers. */
void iov_from_buf(const struct iovec *iov, int iovcnt, const void *buf);
/* Copies the iovec's bytes into buf (iov_size(iov) bytes). */
void iov_to_buf(const struct iovec *iov, int iovcnt, void *buf);

#endif
