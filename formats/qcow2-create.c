/* strata — creating qcow2 images (overlays for external snapshots) and
 * rewriting an image's backing link (after block-commit).
 *
 * A new image is version 3, 16-bit refcounts, 64 KiB clusters unless the
 * caller asks for another power of two from 512 bytes to 2 MiB, laid out
 * like qemu-img's: header (with the backing format extension and the
 * backing name) in cluster 0, the refcount table from cluster 1, the
 * refcount blocks after it, then the L1 table.  With 64 KiB clusters that
 * is one cluster of refcount table and one refcount block.  It is written
 * in one go and synced (with its directory) before anyone points at it.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "byteorder.h"
#include "log.h"
#include "qcow2.h"

#define NEW_CLUSTER_BITS 16
#define NEW_HEADER_LENGTH 112   /* v3 fields + compression type, padded */

/* Header extension area after the fixed header: the backing format
 * extension, then the end marker.  Returns the bytes written. */
static size_t put_extensions(uint8_t *p, const char *backing_fmt)
{
    size_t n = 0;
    if (backing_fmt) {
        size_t len = strlen(backing_fmt);
        be_put32(p, QCOW2_EXT_BACKING_FORMAT);
        be_put32(p + 4, (uint32_t)len);
        memcpy(p + 8, backing_fmt, len);
        n = 8 + ((len + 7) & ~(size_t)7);
    }
    be_put32(p + n, QCOW2_EXT_END);
    be_put32(p + n + 4, 0);
    return n + 8;
}

static int fsync_dir_of(const char *path)
{
    const char *slash = strrchr(path, '/');
    char *dir = slash ? strndup(path, (size_t)(slash - path) + 1) : strdup(".");
    if (!dir)
        return -ENOMEM;
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    free(dir);
    if (fd < 0)
        return -errno;
    int r = fsync(fd) < 0 ? -errno : 0;
    close(fd);
    return r;
}

/* The metadata of a new empty image (header, refcount table and blocks,
 * L1 table) with CLUSTER_SIZE-byte clusters (0: the default) in *pimg,
 * *ptotal bytes, and the cluster size in *pcs.  0 or -errno with *errp
 * set. */
static int build_image(const char *path, uint64_t size,
                       const char *backing_name, const char *backing_fmt,
                       uint64_t cluster_size, uint8_t **pimg,
                       uint64_t *ptotal, uint64_t *pcs, struct error **errp)
{
    unsigned bits = NEW_CLUSTER_BITS;
    if (cluster_size) {
        bits = 0;
        while (bits < 63 && (UINT64_C(1) << bits) < cluster_size)
            bits++;
        if ((UINT64_C(1) << bits) != cluster_size ||
            bits < QCOW2_MIN_CLUSTER_BITS || bits > QCOW2_MAX_CLUSTER_BITS)
            return error_setf(errp, EINVAL, "%s: cluster size %llu: expected "
                              "a power of two from %u to %u bytes", path,
                              (unsigned long long)cluster_size,
                              1u << QCOW2_MIN_CLUSTER_BITS,
                              1u << QCOW2_MAX_CLUSTER_BITS);
    }
    const uint64_t cs = UINT64_C(1) << bits;
    const uint64_t l2_entries = cs / 8;
    if (size == 0 || size > QCOW2_MAX_SIZE)
        return error_setf(errp, EINVAL, "%s: invalid virtual size %llu", path,
                          (unsigned long long)size);
    if (backing_name && strlen(backing_name) > QCOW2_MAX_BACKING_NAME)
        return error_setf(errp, ENAMETOOLONG, "%s: backing file name longer "
                          "than %u bytes", path, QCOW2_MAX_BACKING_NAME);
    if (backing_fmt && (strlen(backing_fmt) == 0 ||
                        strlen(backing_fmt) > QCOW2_MAX_FORMAT_NAME))
        return error_setf(errp, EINVAL, "%s: invalid backing format '%s'",
                          path, backing_fmt);
    uint64_t l1_size = (size + cs * l2_entries - 1) / (cs * l2_entries);
    uint64_t l1_clusters = (l1_size * 8 + cs - 1) / cs;
    if (l1_size * 8 > QCOW2_MAX_L1_BYTES)
        return error_setf(errp, EFBIG, "%s: virtual size too large for "
                          "%llu-byte clusters (a larger cluster size takes "
                          "it)", path, (unsigned long long)cs);
    /* Enough refcount blocks (cs / 2 16-bit entries each) for every
     * cluster of the new file, themselves and the table included, and
     * enough table clusters (cs / 8 entries each) for the blocks. */
    const uint64_t rb_entries = cs / 2;
    uint64_t rt_clusters = 1, rb_count = 1, nclusters;
    for (;;) {
        nclusters = 1 + rt_clusters + rb_count + l1_clusters;
        uint64_t rb_need = (nclusters + rb_entries - 1) / rb_entries;
        uint64_t rt_need = (rb_need * 8 + cs - 1) / cs;
        if (rb_need <= rb_count && rt_need <= rt_clusters)
            break;
        rb_count = rb_need > rb_count ? rb_need : rb_count;
        rt_clusters = rt_need > rt_clusters ? rt_need : rt_clusters;
    }
    const uint64_t rt_off = cs, rb_off = (1 + rt_clusters) * cs;
    const uint64_t l1_off = rb_off + rb_count * cs;
    uint64_t total = nclusters * cs;

    uint8_t *img = NULL;
    if (posix_memalign((void **)&img, 4096, total) != 0)
        return error_setf(errp, ENOMEM, "out of memory");
    memset(img, 0, total);

    struct qcow2_header h;
    memset(&h, 0, sizeof(h));
    h.magic = QCOW2_MAGIC;
    h.version = 3;
    h.cluster_bits = bits;
    h.size = size;
    h.l1_size = (uint32_t)l1_size;
    h.l1_table_offset = l1_off;
    h.refcount_table_offset = rt_off;
    h.refcount_table_clusters = (uint32_t)rt_clusters;
    h.refcount_order = 4;
    h.header_length = NEW_HEADER_LENGTH;
    h.compression_type = QCOW2_COMPRESSION_ZLIB;
    size_t need = NEW_HEADER_LENGTH + 8 + 8 +
                  (backing_fmt ? (strlen(backing_fmt) + 7) & ~(size_t)7 : 0) +
                  (backing_name ? strlen(backing_name) : 0);
    if (need > cs) {
        free(img);
        return error_setf(errp, ENAMETOOLONG, "%s: the header and the backing "
                          "name take %zu bytes, more than one %llu-byte "
                          "cluster", path, need, (unsigned long long)cs);
    }
    size_t ext_len = put_extensions(img + NEW_HEADER_LENGTH, backing_fmt);
    if (backing_name) {
        h.backing_file_offset = NEW_HEADER_LENGTH + ext_len;
        h.backing_file_size = (uint32_t)strlen(backing_name);
        memcpy(img + h.backing_file_offset, backing_name,
               h.backing_file_size);
    }
    qcow2_header_serialize(&h, img, cs);
    for (uint64_t i = 0; i < rb_count; i++)      /* the refcount table */
        be_put64(img + rt_off + i * 8, rb_off + i * cs);
    for (uint64_t c = 0; c < nclusters; c++)     /* the refcount blocks */
        qcow2_refcount_set(img + rb_off + (c / rb_entries) * cs, 4,
                           c % rb_entries, 1);

    *pimg = img;
    *ptotal = total;
    *pcs = cs;
    return 0;
}

int qcow2_format_backend_co(struct backend *file, struct coro *co,
                            uint64_t size, struct error **errp)
{
    uint8_t *img;
    uint64_t total, cs;
    int r = build_image(file->name, size, NULL, NULL, 0, &img, &total, &cs,
                        errp);
    if (r < 0)
        return r;
    if (total > file->size) {
        free(img);
        return error_setf(errp, ENOSPC, "%s: %llu bytes of storage cannot "
                          "hold a new image's %llu bytes of metadata",
                          file->name, (unsigned long long)file->size,
                          (unsigned long long)total);
    }
    r = backend_pwrite_co(file, co, img, total, 0, 0);
    if (r == 0)
        r = backend_flush_co(file, co);
    free(img);
    if (r < 0)
        return error_setf(errp, -r, "%s: writing the new image: %s",
                          file->name, strerror(-r));
    log_info("%s: formatted (qcow2, %llu bytes)", file->name,
             (unsigned long long)size);
    return 0;
}

int qcow2_create_co(struct loop *loop, struct coro *co, const char *path,
                    uint64_t size, const char *backing_name,
                    const char *backing_fmt, struct error **errp)
{
    return qcow2_create_cs_co(loop, co, path, size, backing_name, backing_fmt,
                              0, errp);
}

int qcow2_create_cs_co(struct loop *loop, struct coro *co, const char *path,
                       uint64_t size, const char *backing_name,
                       const char *backing_fmt, uint64_t cluster_size,
                       struct error **errp)
{
    uint8_t *img;
    uint64_t total, cs;
    int r0 = build_image(path, size, backing_name, backing_fmt, cluster_size,
                         &img, &total, &cs, errp);
    if (r0 < 0)
        return r0;

    /* An RBD image is made at its final size (writing past its end would
     * resize it); a file grows with the write. */
    bool local = backend_spec_is_local(path);
    struct backend_open_opts bo = {.create = true,
                                   .create_size = local ? 0 : total};
    struct backend *file = backend_open_co(loop, co, path, &bo, errp);
    if (!file) {
        free(img);
        return errp && *errp ? -(*errp)->code : -EIO;
    }
    int r = backend_pwrite_co(file, co, img, total, 0, 0);
    if (r == 0)
        r = backend_flush_co(file, co);
    backend_close(file);
    free(img);
    if (r == 0 && local)
        r = fsync_dir_of(path);
    if (r < 0) {
        error_setf(errp, -r, "%s: writing the new image: %s", path,
                   strerror(-r));
        struct error *rm = NULL;
        if (backend_remove(path, &rm) < 0) {
            log_warn("%s", rm->msg);
            error_free(rm);
        }
        return r;
    }
    log_info("%s: created (qcow2, %llu bytes, %llu-byte clusters%s%s)", path,
             (unsigned long long)size, (unsigned long long)cs,
             backing_name ? ", backing " : "",
             backing_name ? backing_name : "");
    return 0;
}

int qcow2_set_backing_co(struct fmt_node *n, struct coro *co,
                         const char *backing_name, const char *backing_fmt,
                         struct error **errp)
{
    struct qcow2 *s = qcow2_of(n);
    const uint64_t cs = qcow2_cs(s);
    if (n->read_only)
        return error_setf(errp, EROFS, "%s: read-only", n->filename);
    if (strlen(backing_name) > QCOW2_MAX_BACKING_NAME ||
        (backing_fmt && strlen(backing_fmt) > QCOW2_MAX_FORMAT_NAME))
        return error_setf(errp, ENAMETOOLONG, "%s: backing name or format "
                          "too long", n->filename);

    /* Rebuild the area after the fixed header: the backing format
     * extension, every other extension as it was, the end marker, the
     * name.  It all lives in cluster 0, rewritten with one write. */
    struct qcow2_extensions *ext = calloc(1, sizeof(*ext));
    uint8_t *nh = qcow2_buf_alloc(s, cs);
    if (!ext || !nh) {
        free(ext);
        free(nh);
        return error_setf(errp, ENOMEM, "out of memory");
    }
    /* Metadata first: nothing written before this may refer to it.
     * Synced before taking the lock, so that guest writes go on. */
    int r = backend_flush_co(n->file, co);
    if (r < 0) {
        free(ext);
        free(nh);
        return error_setf(errp, -r, "%s: flush: %s", n->filename,
                          strerror(-r));
    }
    /* The header is built from s->hdr / s->h under s->lock: a write
     * that grows the refcount table rewrites them (under the lock) while
     * guest I/O goes on, and a copy taken before waiting for the lock
     * would put the old refcount table offset back on disk.  A growth
     * writes the header without the lock: wait for it to end. */
    qcow2_lock_co(s, co);
    qcow2_header_wait_locked_co(s, co);
    char err[256];
    r = qcow2_header_parse_extensions(s->hdr, cs, &s->h, ext, err,
                                          sizeof(err));
    if (r == 0 && ext->n_unknown > QCOW2_MAX_UNKNOWN_EXT)
        r = -ENOTSUP;
    if (r < 0) {
        co_mutex_unlock(&s->lock, co);
        free(ext);
        free(nh);
        return error_setf(errp, -r, "%s: cannot rewrite the header "
                          "extensions: %s", n->filename,
                          r == -ENOTSUP ? "too many unknown extensions" : err);
    }
    memset(nh, 0, cs);
    memcpy(nh, s->hdr, s->h.header_length);
    size_t pos = s->h.header_length;
    if (backing_fmt) {
        size_t len = strlen(backing_fmt);
        be_put32(nh + pos, QCOW2_EXT_BACKING_FORMAT);
        be_put32(nh + pos + 4, (uint32_t)len);
        memcpy(nh + pos + 8, backing_fmt, len);
        pos += 8 + ((len + 7) & ~(size_t)7);
    }
    /* Known extensions other than the backing format, copied verbatim. */
    size_t p = ext->start;
    while (p + 8 <= ext->end) {
        uint32_t type = be_get32(s->hdr + p);
        uint32_t len = be_get32(s->hdr + p + 4);
        size_t total = 8 + (((size_t)len + 7) & ~(size_t)7);
        if (type == QCOW2_EXT_END)
            break;
        if (type != QCOW2_EXT_BACKING_FORMAT) {
            if (pos + total + 8 + strlen(backing_name) > cs) {
                r = -ENOSPC;
                break;
            }
            memcpy(nh + pos, s->hdr + p, total);
            pos += total;
        }
        p += total;
    }
    size_t name_len = strlen(backing_name);
    if (r == 0 && pos + 8 + name_len > cs)
        r = -ENOSPC;
    if (r < 0) {
        co_mutex_unlock(&s->lock, co);
        free(ext);
        free(nh);
        return error_setf(errp, ENOSPC, "%s: the new backing name does not "
                          "fit in the header cluster", n->filename);
    }
    be_put32(nh + pos, QCOW2_EXT_END);
    be_put32(nh + pos + 4, 0);
    pos += 8;
    struct qcow2_header h = s->h;
    h.backing_file_offset = name_len ? pos : 0;
    h.backing_file_size = (uint32_t)name_len;
    memcpy(nh + pos, backing_name, name_len);
    qcow2_header_serialize(&h, nh, cs);
    free(ext);

    /* Durable on return (FUA), without a sync of the whole file under
     * the lock. */
    r = backend_pwrite_co(n->file, co, nh, cs, 0, BACKEND_FUA);
    if (r == 0) {
        memcpy(s->hdr, nh, cs);
        s->h = h;
        snprintf(s->backing_name, sizeof(s->backing_name), "%s",
                 backing_name);
        s->has_backing_name = name_len > 0;
        snprintf(s->backing_format, sizeof(s->backing_format), "%s",
                 backing_fmt ? backing_fmt : "");
        s->has_backing_format = backing_fmt != NULL;
    }
    co_mutex_unlock(&s->lock, co);
    free(nh);
    if (r < 0)
        return error_setf(errp, -r, "%s: writing the header: %s", n->filename,
                          strerror(-r));
    return 0;
}
