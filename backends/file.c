/* strata — local file / block device backend over io_uring.
 *
 * Reads, writes, fdatasync, fallocate and fadvise go through the loop's
 * ring.  Two calls stay synchronous because io_uring has no opcode for them
 * on the kernels we support: lseek(SEEK_DATA/SEEK_HOLE) for block status
 * (metadata only, answered from the inode's extent map) and ftruncate when
 * a format grows its file (rare, between allocations).
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <limits.h>
#include <linux/fs.h>
#include <linux/openat2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "backend.h"
#include "fault.h"
#include "log.h"
#include "loop.h"

#define FILE_MAX_IOV 64             /* iovecs per request (bounded copy) */
#define FILE_ZERO_BUF (1u << 20)    /* fallback zeroing chunk */
/* Transfers at least this large are punted to io_uring's kernel workers
 * (IOSQE_ASYNC): the page-cache copy then runs on another core instead of
 * inline on the loop thread. */
#define FILE_ASYNC_MIN (256u << 10)
/* A read or write that takes this long (submission to completion) is
 * logged (debug): what requests wait for when they wait in the kernel. */
#define FILE_SLOW_LOG_NS 5000000

struct file_backend {
    struct backend b;
    int fd;
    bool is_blockdev;
    bool direct;                    /* opened with O_DIRECT */
    bool has_punch;                 /* PUNCH_HOLE worked (or untested) */
    bool has_zero_range;            /* ZERO_RANGE worked (or untested) */
    void *zero_buf;                 /* lazily allocated, aligned zeros */
};

static struct file_backend *fb(struct backend *b)
{
    return (struct file_backend *)b;
}

/* Submits one read or write for the remaining iovecs and retries until
 * all bytes moved: short transfers are resubmitted, EINTR/EAGAIN retried. */
static int file_rw_co(struct file_backend *f, struct coro *co, bool write,
                      const struct iovec *iov_in, int iovcnt, uint64_t off,
                      int rw_flags)
{
    struct iovec local[FILE_MAX_IOV];
    struct iovec *iov = local;
    if (iovcnt > FILE_MAX_IOV) {
        iov = malloc(sizeof(*iov) * (size_t)iovcnt);
        if (!iov)
            return -ENOMEM;
    }
    memcpy(iov, iov_in, sizeof(*iov) * (size_t)iovcnt);
    struct iovec *cur = iov;
    int n = iovcnt;
    int ret = 0;
    uint64_t total = iov_size(iov, iovcnt);

    while (n > 0) {
        struct loop_wait w;
        uint64_t t0 = loop_now_ns();
        loop_wait_init(&w, co);
        struct io_uring_sqe *sqe = loop_get_sqe(f->b.loop, &w.op);
        /* One buffer: READ/WRITE, which spare the kernel the iovec copy. */
        bool one = n == 1 && cur->iov_len <= INT_MAX;
        if (write && one)
            io_uring_prep_write(sqe, f->fd, cur->iov_base,
                                (unsigned)cur->iov_len, off);
        else if (write)
            io_uring_prep_writev(sqe, f->fd, cur, (unsigned)n, off);
        else if (one)
            io_uring_prep_read(sqe, f->fd, cur->iov_base,
                               (unsigned)cur->iov_len, off);
        else
            io_uring_prep_readv(sqe, f->fd, cur, (unsigned)n, off);
        sqe->rw_flags = rw_flags;
        if (total >= FILE_ASYNC_MIN)
            sqe->flags |= IOSQE_ASYNC;
        int r = loop_wait_co(&w);
        uint64_t took = loop_now_ns() - t0;
        if (took >= FILE_SLOW_LOG_NS)
            log_debug("%s: a %s of %llu bytes at %#llx took %.3f ms",
                      f->b.name, write ? "write" : "read",
                      (unsigned long long)iov_size(cur, n),
                      (unsigned long long)off, took / 1e6);
        if (r == -EINTR || r == -EAGAIN)
            continue;
        if (r > 0)
            r = backend_fault_shorten(r); /* tests: a short transfer */
        if (r < 0) {
            ret = r;
            break;
        }
        if (r == 0) {
            if (write) {
                ret = -EIO; /* no progress: do not spin */
                break;
            }
            /* end of file: the rest reads as zeros */
            for (int i = 0; i < n; i++)
                memset(cur[i].iov_base, 0, cur[i].iov_len);
            break;
        }
        off += (uint64_t)r;
        size_t done = (size_t)r;
        while (n > 0 && done >= cur->iov_len) {
            done -= cur->iov_len;
            cur++;
            n--;
        }
        if (n > 0 && done) {
            cur->iov_base = (char *)cur->iov_base + done;
            cur->iov_len -= done;
        }
    }
    if (iov != local)
        free(iov);
    return ret;
}

static int file_preadv_co(struct backend *b, struct coro *co,
                          const struct iovec *iov, int iovcnt, uint64_t off)
{
    return file_rw_co(fb(b), co, false, iov, iovcnt, off, 0);
}

/* fdatasync of host bytes [off, off + len) (len 0: the whole file): the
 * range's data and whatever metadata reading it back needs. */
static int file_sync_range_co(struct file_backend *f, struct coro *co,
                              uint64_t off, uint64_t len)
{
    struct loop_wait w;
    loop_wait_init(&w, co);
    struct io_uring_sqe *sqe = loop_get_sqe(f->b.loop, &w.op);
    io_uring_prep_fsync(sqe, f->fd, IORING_FSYNC_DATASYNC);
    if (len && len <= UINT32_MAX) {
        sqe->off = off;
        sqe->len = (uint32_t)len;
    }
    return loop_wait_co(&w);
}

/* A FUA write to a regular file through the page cache is a plain write
 * followed by an fdatasync of its range, which is what RWF_DSYNC does in
 * the kernel, but in two requests: io_uring runs the buffered writes to
 * one file one after another on a single worker, so a write carrying
 * RWF_DSYNC would hold every later write to the file behind its sync (a
 * device cache flush, long while other files are written back).  The
 * sync runs on a worker of its own.  With O_DIRECT (and on block
 * devices) RWF_DSYNC stays: the device gets the write with FUA and
 * nothing is serialised. */
static int file_pwritev_co(struct backend *b, struct coro *co,
                           const struct iovec *iov, int iovcnt, uint64_t off,
                           unsigned flags)
{
    struct file_backend *f = fb(b);
    bool fua = flags & BACKEND_FUA;
    bool split = fua && !f->direct && !f->is_blockdev;
    uint64_t len = iov_size(iov, iovcnt);
    int r = file_rw_co(f, co, true, iov, iovcnt, off,
                       fua && !split ? RWF_DSYNC : 0);
    if (r == 0) {
        uint64_t end = off + len;
        if (end > b->size && !f->is_blockdev)
            b->size = end;
    }
    if (r == 0 && split)
        r = file_sync_range_co(f, co, off, len);
    return r;
}

static int file_flush_co(struct backend *b, struct coro *co)
{
    return file_sync_range_co(fb(b), co, 0, 0);
}

static int file_fallocate_co(struct file_backend *f, struct coro *co, int mode,
                             uint64_t off, uint64_t len)
{
    struct loop_wait w;
    loop_wait_init(&w, co);
    struct io_uring_sqe *sqe = loop_get_sqe(f->b.loop, &w.op);
    io_uring_prep_fallocate(sqe, f->fd, mode, off, len);
    return loop_wait_co(&w);
}

static bool unsupported(int r)
{
    return r == -EOPNOTSUPP || r == -ENOTSUP || r == -ENOSYS ||
           r == -EINVAL;
}

/* Writes zeros the slow way, in FILE_ZERO_BUF chunks. */
static int file_write_zeros_co(struct file_backend *f, struct coro *co,
                               uint64_t off, uint64_t len, unsigned flags)
{
    if (!f->zero_buf) {
        if (posix_memalign(&f->zero_buf, 4096, FILE_ZERO_BUF) != 0) {
            f->zero_buf = NULL;
            return -ENOMEM;
        }
        memset(f->zero_buf, 0, FILE_ZERO_BUF);
    }
    while (len > 0) {
        uint64_t n = len < FILE_ZERO_BUF ? len : FILE_ZERO_BUF;
        struct iovec iov = {.iov_base = f->zero_buf, .iov_len = n};
        int r = file_pwritev_co(&f->b, co, &iov, 1, off, flags);
        if (r < 0)
            return r;
        off += n;
        len -= n;
    }
    return 0;
}

static int file_zero_co(struct backend *b, struct coro *co, uint64_t off,
                        uint64_t len, unsigned flags)
{
    struct file_backend *f = fb(b);
    int r = -EOPNOTSUPP;
    /* Never change the size here: zeroing is within the image. */
    uint64_t in_len = len;
    if (!f->is_blockdev && off + len > b->size)
        in_len = off < b->size ? b->size - off : 0;

    if (in_len == 0) {
        r = 0;
    } else if ((flags & BACKEND_MAY_TRIM) && f->has_punch) {
        r = file_fallocate_co(f, co, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                              off, in_len);
        if (unsupported(r))
            f->has_punch = false;
    }
    if (r != 0 && in_len && f->has_zero_range) {
        r = file_fallocate_co(f, co, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                              off, in_len);
        if (unsupported(r))
            f->has_zero_range = false;
    }
    if (r != 0 && in_len && !f->is_blockdev && f->has_punch &&
        !(flags & BACKEND_MAY_TRIM)) {
        /* No ZERO_RANGE (e.g. tmpfs): punch, then allocate the range again
         * so NO_HOLE still holds. */
        r = file_fallocate_co(f, co, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                              off, in_len);
        if (r == 0)
            r = file_fallocate_co(f, co, FALLOC_FL_KEEP_SIZE, off, in_len);
        else if (unsupported(r))
            f->has_punch = false;
    }
    if (r != 0 && !unsupported(r))
        return r;
    if (r != 0) {
        if (flags & BACKEND_FAST)
            return -ENOTSUP;
        r = file_write_zeros_co(f, co, off, in_len, flags & BACKEND_FUA);
        if (r < 0)
            return r;
        flags &= ~BACKEND_FUA;
    }
    /* The part past the end of a regular file: extend by writing. */
    if (in_len < len) {
        r = file_write_zeros_co(f, co, off + in_len, len - in_len, 0);
        if (r < 0)
            return r;
    }
    if (flags & BACKEND_FUA)
        return file_flush_co(b, co);
    return 0;
}

static int file_discard_co(struct backend *b, struct coro *co, uint64_t off,
                           uint64_t len, unsigned flags)
{
    struct file_backend *f = fb(b);
    if (!f->has_punch)
        return 0;
    if (!f->is_blockdev) {
        if (off >= b->size)
            return 0;
        if (off + len > b->size)
            len = b->size - off;
    }
    int r = file_fallocate_co(f, co, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                              off, len);
    if (unsupported(r)) {
        f->has_punch = false;
        return 0; /* discard is advisory */
    }
    if (r == 0 && (flags & BACKEND_FUA))
        r = file_flush_co(b, co);
    return r;
}

static int file_block_status_co(struct backend *b, struct coro *co,
                                uint64_t off, uint64_t len, uint64_t *pnum,
                                unsigned *status)
{
    struct file_backend *f = fb(b);
    (void)co;
    uint64_t end = off + len;
    if (end > b->size)
        end = b->size;
    off_t data = lseek(f->fd, (off_t)off, SEEK_DATA);
    if (data < 0) {
        if (errno == ENXIO) {
            /* only a hole up to the end of the file */
            *pnum = len;
            *status = BACKEND_STATUS_ZERO;
            return 0;
        }
        /* not supported here: report data */
        *pnum = len;
        *status = BACKEND_STATUS_DATA;
        return 0;
    }
    if ((uint64_t)data > off) {
        uint64_t n = (uint64_t)data - off;
        *pnum = n < len ? n : len;
        *status = BACKEND_STATUS_ZERO;
        return 0;
    }
    off_t hole = lseek(f->fd, (off_t)off, SEEK_HOLE);
    uint64_t n;
    if (hole < 0 || (uint64_t)hole <= off)
        n = end - off; /* cannot tell: data */
    else
        n = (uint64_t)hole - off;
    *pnum = n < len ? n : len;
    if (*pnum == 0)
        *pnum = len;
    *status = BACKEND_STATUS_DATA;
    return 0;
}

static int file_truncate_co(struct backend *b, struct coro *co, uint64_t size)
{
    (void)co;
    if (ftruncate(fb(b)->fd, (off_t)size) < 0)
        return -errno;
    b->size = size;
    return 0;
}

static int file_cache_co(struct backend *b, struct coro *co, uint64_t off,
                         uint64_t len)
{
    struct loop_wait w;
    loop_wait_init(&w, co);
    struct io_uring_sqe *sqe = loop_get_sqe(b->loop, &w.op);
    io_uring_prep_fadvise(sqe, fb(b)->fd, off,
                          len > UINT32_MAX ? 0 : (off_t)len,
                          POSIX_FADV_WILLNEED);
    int r = loop_wait_co(&w);
    return r == -EINVAL || r == -ESPIPE ? 0 : r;
}

static void file_close(struct backend *b)
{
    struct file_backend *f = fb(b);
    close(f->fd);
    free(f->zero_buf);
    free(b->name);
    free(f);
}

/* Reopens the same inode with the other access mode, on the same
 * descriptor number (dup3), so nothing that holds the number changes. */
static int file_reopen(struct backend *b, bool read_only, struct error **errp)
{
    struct file_backend *f = fb(b);
    int flags = O_CLOEXEC | (read_only ? O_RDONLY : O_RDWR) |
                (f->direct ? O_DIRECT : 0);
    /* Through our own descriptor, not the name: the same inode whatever
     * became of the path since the open. */
    char self[64];
    snprintf(self, sizeof(self), "/proc/self/fd/%d", f->fd);
    int fd = open(self, flags);
    if (fd < 0)
        return error_setf(errp, errno, "%s: reopening %s: %s", b->name,
                          read_only ? "read-only" : "read-write",
                          strerror(errno));
    struct stat a, n;
    if (fstat(f->fd, &a) < 0 || fstat(fd, &n) < 0 || a.st_dev != n.st_dev ||
        a.st_ino != n.st_ino) {
        close(fd);
        return error_setf(errp, ESTALE, "%s: the file was replaced since it "
                          "was opened", b->name);
    }
    if (dup3(fd, f->fd, O_CLOEXEC) < 0) {
        int e = errno;
        close(fd);
        return error_setf(errp, e, "%s: dup3: %s", b->name, strerror(e));
    }
    close(fd);
    b->read_only = read_only;
    return 0;
}

static bool file_same_open(struct backend *a, struct backend *b)
{
    struct stat sa, sb;
    return fstat(fb(a)->fd, &sa) == 0 && fstat(fb(b)->fd, &sb) == 0 &&
           sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

static const struct backend_ops file_ops = {
    .name = "file",
    .preadv_co = file_preadv_co,
    .pwritev_co = file_pwritev_co,
    .flush_co = file_flush_co,
    .zero_co = file_zero_co,
    .discard_co = file_discard_co,
    .block_status_co = file_block_status_co,
    .truncate_co = file_truncate_co,
    .cache_co = file_cache_co,
    .reopen = file_reopen,
    .same_open = file_same_open,
    .close = file_close,
};

/* open(2) of path, or of opts->beneath_path beneath opts->beneath_dirfd:
 * one openat2 call resolves every component with RESOLVE_BENEATH, so a
 * symlink swapped in at any time before or during the call cannot lead
 * the open out of the directory (the kernel fails it with EXDEV). */
static int file_open_fd(const char *path, int flags,
                        const struct backend_open_opts *opts)
{
    if (!opts->beneath_path)
        return open(path, flags, 0644);
    struct open_how how = {
        .flags = (uint64_t)flags,
        .resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS,
    };
    return (int)syscall(SYS_openat2, opts->beneath_dirfd, opts->beneath_path,
                        &how, sizeof(how));
}

struct backend *file_backend_open(struct loop *loop, const char *path,
                                  const struct backend_open_opts *opts,
                                  struct error **errp)
{
    int flags = O_CLOEXEC | (opts->read_only ? O_RDONLY : O_RDWR);
    if (opts->direct)
        flags |= O_DIRECT;
    if (opts->create)
        flags |= O_CREAT | O_EXCL;
    int fd = file_open_fd(path, flags, opts);
    if (fd < 0) {
        int e = errno;
        if (e == EXDEV && opts->beneath_path)
            error_setf(errp, EACCES, "%s: leads out of the backing root "
                       "(a symlink or '..' on the way out of it): refused",
                       path);
        else if (e == EINVAL && opts->direct)
            error_setf(errp, e, "%s: the filesystem does not support "
                       "cache=none (O_DIRECT)", path);
        else
            error_setf(errp, e, "%s: %s", path, strerror(e));
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int e = errno;
        close(fd);
        error_setf(errp, e, "%s: %s", path, strerror(e));
        return NULL;
    }
    if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
        close(fd);
        error_setf(errp, EINVAL, "%s: not a regular file or block device", path);
        return NULL;
    }
    struct file_backend *f = calloc(1, sizeof(*f));
    char *name = strdup(path);
    if (!f || !name) {
        free(f);
        free(name);
        close(fd);
        error_setf(errp, ENOMEM, "out of memory");
        return NULL;
    }
    f->fd = fd;
    f->direct = opts->direct;
    f->is_blockdev = S_ISBLK(st.st_mode);
    f->has_punch = true;
    f->has_zero_range = true;
    f->b.ops = &file_ops;
    f->b.loop = loop;
    f->b.name = name;
    f->b.read_only = opts->read_only;
    f->b.align = 1;
    f->b.caps = BACKEND_CAN_ZERO | BACKEND_CAN_TRIM | BACKEND_CAN_EXTENTS |
                (f->is_blockdev ? 0 : BACKEND_CAN_RESIZE);
    if (f->is_blockdev) {
        uint64_t sz = 0;
        if (ioctl(fd, BLKGETSIZE64, &sz) < 0) {
            int e = errno;
            error_setf(errp, e, "%s: BLKGETSIZE64: %s", path, strerror(e));
            file_close(&f->b);
            return NULL;
        }
        f->b.size = sz;
        f->b.caps &= ~BACKEND_CAN_EXTENTS;
    } else {
        f->b.size = (uint64_t)st.st_size;
    }
    if (opts->direct) {
        /* Direct I/O needs the logical block size; 4096 covers every
         * device and filesystem in use today. */
        int lbs = 0;
        if (f->is_blockdev && ioctl(fd, BLKSSZGET, &lbs) == 0 && lbs > 0)
            f->b.align = (uint32_t)lbs < 4096 ? 4096 : (uint32_t)lbs;
        else
            f->b.align = 4096;
    }
    if (opts->create && opts->create_size && !f->is_blockdev) {
        if (ftruncate(fd, (off_t)opts->create_size) < 0) {
            int e = errno;
            error_setf(errp, e, "%s: %s", path, strerror(e));
            file_close(&f->b);
            return NULL;
        }
        f->b.size = opts->create_size;
    }
    return &f->b;
}

/* ---- the driver: specs are paths ---- */

static int file_remove(const char *spec, struct error **errp)
{
    if (unlink(spec) < 0)
        return error_setf(errp, errno, "%s: cannot remove it: %s", spec,
                          strerror(errno));
    return 0;
}

static char *dup_or_fail(const char *s, struct error **errp)
{
    char *p = strdup(s);
    if (!p)
        error_setf(errp, ENOMEM, "out of memory");
    return p;
}

/* Absolute names as they are, relative ones from the overlay's directory
 * (overlay NULL: an overlay on other storage, so name is absolute). */
static char *file_resolve_backing(const char *overlay, const char *name,
                                  const char *settings, struct error **errp)
{
    (void)settings;
    const char *slash = overlay ? strrchr(overlay, '/') : NULL;
    if (name[0] == '/' || !slash)
        return dup_or_fail(name, errp);
    size_t dirlen = (size_t)(slash - overlay) + 1;
    char *p = malloc(dirlen + strlen(name) + 1);
    if (!p) {
        error_setf(errp, ENOMEM, "out of memory");
        return NULL;
    }
    memcpy(p, overlay, dirlen);
    strcpy(p + dirlen, name);
    return p;
}

static char *file_backing_name(const char *overlay, const char *layer,
                               struct error **errp)
{
    (void)overlay;
    return dup_or_fail(layer, errp);
}

/* realpath() of the directory that holds path (which may not exist). */
static int real_dir_of(const char *path, char *out, struct error **errp)
{
    char dir[PATH_MAX];
    const char *slash = strrchr(path, '/');
    if (!slash)
        snprintf(dir, sizeof(dir), ".");
    else if (slash == path)
        snprintf(dir, sizeof(dir), "/");
    else
        snprintf(dir, sizeof(dir), "%.*s", (int)(slash - path), path);
    if (!realpath(dir, out))
        return error_setf(errp, errno, "%s: %s", dir, strerror(errno));
    return 0;
}

/* The path of to (absolute, resolved) as seen from directory from
 * (absolute, resolved): "../x/y.qcow2". */
static char *relative_path(const char *from, const char *to)
{
    /* longest common prefix ending at a component boundary */
    size_t common = 0;
    for (size_t i = 0;; i++) {
        bool fe = from[i] == '\0' || from[i] == '/';
        bool te = to[i] == '/';
        if (fe && te)
            common = i;
        if (from[i] == '\0' || from[i] != to[i])
            break;
    }
    if (strcmp(from, "/") == 0)
        common = 0;
    unsigned ups = 0;
    for (const char *p = from + common; *p; p++)
        if (*p == '/' && p[1] != '\0')
            ups++;
    if (from[common] == '/' && from[common + 1] == '\0')
        ups = 0;
    const char *rest = to + common + 1;
    size_t len = ups * 3 + strlen(rest) + 1;
    char *r = malloc(len);
    if (!r)
        return NULL;
    r[0] = '\0';
    for (unsigned i = 0; i < ups; i++)
        strcat(r, "../");
    strcat(r, rest);
    return r;
}

static char *file_relative_backing_name(const char *overlay,
                                        const char *layer,
                                        struct error **errp)
{
    char dir[PATH_MAX], real[PATH_MAX];
    if (real_dir_of(overlay, dir, errp) < 0)
        return NULL;
    if (!realpath(layer, real)) {
        error_setf(errp, EINVAL, "%s: cannot be named relative to %s", layer,
                   dir);
        return NULL;
    }
    char *name = relative_path(dir, real);
    if (!name)
        error_setf(errp, ENOMEM, "out of memory");
    return name;
}

/* Local files by device and inode (both must exist). */
static bool file_same_storage(const char *a, const char *b)
{
    struct stat sa, sb;
    return stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev &&
           sa.st_ino == sb.st_ino;
}

/* QEMU's BlockdevOptionsFile, as far as strata honours it: filename; aio
 * and locking accepted and ignored. */
static char *file_spec_from_options(const struct backend_kv *kv, size_t n,
                                    const char *prefix, struct error **errp)
{
    const char *filename = NULL;
    for (size_t i = 0; i < n; i++) {
        if (!strcmp(kv[i].key, "filename")) {
            filename = kv[i].val;
        } else if (strcmp(kv[i].key, "aio") && strcmp(kv[i].key, "locking")) {
            error_setf(errp, EINVAL, "Parameter '%s%.64s' is unexpected",
                       prefix, kv[i].key);
            return NULL;
        }
    }
    if (!filename) {
        error_setf(errp, EINVAL, "Parameter '%sfilename' is missing", prefix);
        return NULL;
    }
    return dup_or_fail(filename, errp);
}

BACKEND_REGISTER_DRIVER(file_driver,
    .name = "file",
    .prefix = "",
    .flags = BACKEND_DRV_LOCAL,
    .open = file_backend_open,
    .remove = file_remove,
    .resolve_backing = file_resolve_backing,
    .backing_name = file_backing_name,
    .relative_backing_name = file_relative_backing_name,
    .same_storage = file_same_storage,
    .spec_from_options = file_spec_from_options,
);
