/* strata — persistent dirty bitmaps in qcow2, stored as QEMU stores them
 * (qcow2 spec, "Bitmaps extension" and "Bitmaps"): the bitmaps header
 * extension (guarded by autoclear bit 0) points at a bitmap directory;
 * each entry names a bitmap, its granularity, its flags (in_use, auto)
 * and a bitmap table whose entries point at data clusters (0: all
 * zeros), the bits in QEMU's order (dirty-bitmap.h).
 *
 * The life of a bitmap in an image:
 *   open        the directory is read; each entry becomes a persistent
 *               fmt_bitmap: an in_use one is inconsistent (written by a
 *               process that did not close the image: its bits are not
 *               loaded and cannot be trusted), another has its bits
 *               loaded and records when it has the auto flag.  On a
 *               writable node every entry is then flagged in_use in place
 *               (prepare_write_co), so that a crash while open leaves
 *               them inconsistent, never silently stale.
 *   add/remove  the whole directory is rewritten (every entry in use,
 *               empty tables), so that the image lists what exists.
 *   store       (closing, going read-only): data clusters, tables and a
 *               directory written into new clusters, synced, then the
 *               header switched to them with one write, then the old
 *               ones freed.  A crash before the switch leaves the old
 *               directory (in use: inconsistent), after it the new one;
 *               at worst clusters leak.  Consistent bitmaps are stored
 *               without in_use, with auto when they record.
 *
 * Everything here runs under s->lock (metadata), on the control path.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "byteorder.h"
#include "log.h"
#include "qcow2.h"

#define BME_AUTO        2u
#define BME_EXTRA_COMPAT 4u
#define BME_TYPE_DIRTY  1u
#define BME_TABLE_MASK  UINT64_C(0x00fffffffffffe00)

static uint64_t round_up(uint64_t v, uint64_t a)
{
    return (v + a - 1) / a * a;
}

/* Clusters of bitmap data for a bitmap of this size and granularity. */
static uint64_t table_entries(const struct qcow2 *s, uint64_t gran)
{
    uint64_t bits = (s->h.size + gran - 1) / gran;
    return ((bits + 7) / 8 + qcow2_cs(s) - 1) / qcow2_cs(s);
}

static bool cluster_ok(const struct qcow2 *s, uint64_t off)
{
    return off && (off & (qcow2_cs(s) - 1)) == 0 &&
           off < round_up(s->node.file->size, qcow2_cs(s));
}

/* Reads the directory at off/size into a malloc'ed buffer. */
static int read_dir_co(struct qcow2 *s, struct coro *co, uint64_t off,
                       uint64_t size, uint8_t **out)
{
    uint64_t rsize = round_up(size, s->io_align);
    uint8_t *dir = qcow2_buf_alloc(s, rsize);
    if (!dir)
        return -ENOMEM;
    int r = backend_pread_co(s->node.file, co, dir, rsize, off);
    if (r < 0) {
        free(dir);
        return r;
    }
    *out = dir;
    return 0;
}

/* Reads a bitmap table (n entries at off) into host-order entries. */
static int read_table_co(struct qcow2 *s, struct coro *co, uint64_t off,
                         uint32_t n, uint64_t **out)
{
    uint64_t bytes = round_up((uint64_t)n * 8, s->io_align);
    uint8_t *buf = qcow2_buf_alloc(s, bytes ? bytes : s->io_align);
    uint64_t *t = calloc(n ? n : 1, sizeof(uint64_t));
    if (!buf || !t) {
        free(buf);
        free(t);
        return -ENOMEM;
    }
    int r = n ? backend_pread_co(s->node.file, co, buf, bytes, off) : 0;
    for (uint32_t i = 0; r == 0 && i < n; i++)
        t[i] = be_get64(buf + 8 * (uint64_t)i);
    free(buf);
    if (r < 0) {
        free(t);
        return r;
    }
    *out = t;
    return 0;
}

/* Fills bm's bits from its table. */
static int load_data_co(struct qcow2 *s, struct coro *co,
                        struct fmt_bitmap *bm, const uint64_t *t, uint32_t n)
{
    const uint64_t cs = qcow2_cs(s);
    uint8_t *buf = qcow2_buf_alloc(s, cs);
    if (!buf)
        return -ENOMEM;
    uint64_t total = dbitmap_stream_bytes(&bm->bits);
    int r = 0;
    for (uint32_t i = 0; i < n && r == 0; i++) {
        uint64_t at = (uint64_t)i * cs;
        size_t len = (size_t)(total - at < cs ? total - at : cs);
        uint64_t host = t[i] & BME_TABLE_MASK;
        if (host == 0) {
            if (t[i] & 1) {
                memset(buf, 0xff, len);
                dbitmap_load_bytes(&bm->bits, at, buf, len);
            }
            continue;
        }
        r = backend_pread_co(s->node.file, co, buf, cs, host);
        if (r == 0)
            dbitmap_load_bytes(&bm->bits, at, buf, len);
    }
    free(buf);
    return r;
}

int qcow2_bitmaps_load_co(struct qcow2 *s, struct coro *co,
                          const struct qcow2_extensions *ext,
                          struct error **errp)
{
    struct fmt_node *n = &s->node;
    if (!ext->has_bitmaps || !ext->bitmaps_consistent)
        return 0; /* no extension, or one a program unaware of it voided */
    uint8_t *dir = NULL;
    int r = read_dir_co(s, co, ext->bitmap_directory_offset,
                        ext->bitmap_directory_size, &dir);
    if (r < 0)
        return error_setf(errp, -r, "%s: reading the bitmap directory: %s",
                          n->filename, strerror(-r));
    uint64_t pos = 0;
    struct fmt_bitmap *tail = NULL;
    for (uint32_t i = 0; i < ext->nb_bitmaps; i++) {
        struct qcow2_bitmap_entry be;
        if (qcow2_bitmap_entry_parse(dir, ext->bitmap_directory_size, pos,
                                     &be) < 0) {
            r = error_setf(errp, EINVAL, "%s: malformed bitmap directory",
                           n->filename);
            break;
        }
        const uint8_t *p = dir + pos;
        unsigned type = p[16], gbits = p[17];
        uint16_t name_size = be_get16(p + 18);
        uint32_t extra = be_get32(p + 20);
        char name[FMT_BITMAP_MAX_NAME + 1];
        if (name_size == 0 || name_size > FMT_BITMAP_MAX_NAME) {
            r = error_setf(errp, EINVAL, "%s: bitmap %u: bad name length %u",
                           n->filename, i, name_size);
            break;
        }
        memcpy(name, p + QCOW2_BITMAP_ENTRY_MIN + extra, name_size);
        name[name_size] = '\0';
        if (type != BME_TYPE_DIRTY || gbits < 9 || gbits > 31 ||
            (be.flags & ~(QCOW2_BITMAP_IN_USE | BME_AUTO | BME_EXTRA_COMPAT)) ||
            (extra && !(be.flags & BME_EXTRA_COMPAT))) {
            r = error_setf(errp, ENOTSUP, "%s: bitmap '%s' is of a kind strata "
                           "does not support (type %u, granularity bits %u, "
                           "flags 0x%x, extra data %u)", n->filename, name,
                           type, gbits, be.flags, extra);
            break;
        }
        if (strlen(name) != name_size || fmt_bitmap_find(n, name)) {
            r = error_setf(errp, EINVAL, "%s: bitmap directory: bad or "
                           "duplicate name '%s'", n->filename, name);
            break;
        }
        uint64_t gran = UINT64_C(1) << gbits;
        if (fmt_bitmap_bytes(n->size, gran) > FMT_BITMAP_MAX_BYTES) {
            r = error_setf(errp, EFBIG, "%s: bitmap '%s' would take more than "
                           "%llu MiB of memory", n->filename, name,
                           (unsigned long long)(FMT_BITMAP_MAX_BYTES >> 20));
            break;
        }
        if (be.table_size != table_entries(s, gran) ||
            !cluster_ok(s, be.table_offset)) {
            r = error_setf(errp, EINVAL, "%s: bitmap '%s': bad bitmap table "
                           "(%u entries at %llu)", n->filename, name,
                           be.table_size, (unsigned long long)be.table_offset);
            break;
        }
        struct fmt_bitmap *bm = calloc(1, sizeof(*bm));
        if (!bm || !(bm->name = strdup(name)) ||
            dbitmap_init(&bm->bits, n->size, gran) < 0) {
            if (bm)
                free(bm->name);
            free(bm);
            r = error_setf(errp, ENOMEM, "out of memory");
            break;
        }
        bm->persistent = true;
        bm->stored = true;
        bm->readonly = n->read_only;
        bm->inconsistent = be.flags & QCOW2_BITMAP_IN_USE;
        bm->recording = !bm->inconsistent && (be.flags & BME_AUTO);
        /* directory order, as QEMU lists them after loading */
        if (tail)
            tail->next = bm;
        else
            n->bitmaps = bm;
        tail = bm;
        if (!bm->inconsistent) {
            uint64_t *t = NULL;
            r = read_table_co(s, co, be.table_offset, be.table_size, &t);
            for (uint32_t k = 0; r == 0 && k < be.table_size; k++) {
                uint64_t host = t[k] & BME_TABLE_MASK;
                if ((t[k] & ~BME_TABLE_MASK & ~UINT64_C(1)) ||
                    (host && ((t[k] & 1) || !cluster_ok(s, host))))
                    r = -EINVAL;
            }
            if (r == 0)
                r = load_data_co(s, co, bm, t, be.table_size);
            free(t);
            if (r < 0) {
                error_setf(errp, -r, "%s: bitmap '%s': %s", n->filename, name,
                           r == -EINVAL ? "bad bitmap table entry"
                                        : strerror(-r));
                break;
            }
        }
        pos += be.size;
    }
    free(dir);
    if (r < 0) {
        fmt_bitmaps_free(n);
        return r;
    }
    s->bm_dir_offset = ext->bitmap_directory_offset;
    s->bm_dir_size = ext->bitmap_directory_size;
    s->bm_nb = ext->nb_bitmaps;
    return 0;
}

int qcow2_bitmap_can_store(struct fmt_node *n, const char *name,
                           uint64_t gran, struct error **errp)
{
    struct qcow2 *s = qcow2_of(n);
    if (s->h.version < 3)
        return error_setf(errp, ENOTSUP, "Cannot store dirty bitmaps in qcow2 "
                          "v2 files");
    (void)gran;
    unsigned nb = 0;
    uint64_t dir = 0;
    for (struct fmt_bitmap *bm = n->bitmaps; bm; bm = bm->next) {
        if (!bm->persistent)
            continue;
        nb++;
        dir += round_up(QCOW2_BITMAP_ENTRY_MIN + strlen(bm->name), 8);
        if (!strcmp(bm->name, name))
            return error_setf(errp, EEXIST, "Bitmap with the same name is "
                              "already stored");
    }
    if (nb + 1 > QCOW2_MAX_BITMAPS)
        return error_setf(errp, ENOSPC, "Maximum number of persistent bitmaps "
                          "is already reached");
    if (dir + round_up(QCOW2_BITMAP_ENTRY_MIN + strlen(name), 8) >
        QCOW2_MAX_BITMAP_DIR_BYTES)
        return error_setf(errp, ENOSPC, "Not enough space in the bitmap "
                          "directory");
    return 0;
}

/* Host clusters a directory refers to: itself, the tables, their data.
 * Appended to *list (pairs of offset, length). */
struct ranges {
    uint64_t (*r)[2];
    size_t n, cap;
};

static int ranges_add(struct ranges *rs, uint64_t off, uint64_t len)
{
    if (rs->n == rs->cap) {
        size_t cap = rs->cap ? rs->cap * 2 : 64;
        void *p = realloc(rs->r, cap * sizeof(*rs->r));
        if (!p)
            return -ENOMEM;
        rs->r = p;
        rs->cap = cap;
    }
    rs->r[rs->n][0] = off;
    rs->r[rs->n][1] = len;
    rs->n++;
    return 0;
}

static int old_clusters_co(struct qcow2 *s, struct coro *co, struct ranges *rs)
{
    if (!s->bm_nb)
        return 0;
    const uint64_t cs = qcow2_cs(s);
    uint8_t *dir = NULL;
    int r = read_dir_co(s, co, s->bm_dir_offset, s->bm_dir_size, &dir);
    if (r < 0)
        return r;
    r = ranges_add(rs, s->bm_dir_offset, round_up(s->bm_dir_size, cs));
    uint64_t pos = 0;
    for (uint32_t i = 0; r == 0 && i < s->bm_nb; i++) {
        struct qcow2_bitmap_entry be;
        if (qcow2_bitmap_entry_parse(dir, s->bm_dir_size, pos, &be) < 0) {
            r = -EINVAL;
            break;
        }
        uint64_t *t = NULL;
        r = read_table_co(s, co, be.table_offset, be.table_size, &t);
        if (r < 0)
            break;
        r = ranges_add(rs, be.table_offset, round_up((uint64_t)be.table_size * 8, cs));
        for (uint32_t k = 0; r == 0 && k < be.table_size; k++)
            if (t[k] & BME_TABLE_MASK)
                r = ranges_add(rs, t[k] & BME_TABLE_MASK, cs);
        free(t);
        pos += be.size;
    }
    free(dir);
    return r;
}

/* Drops one reference to every range, durably (the node may be closed
 * right after, with no flush of its own). */
static void free_ranges_co(struct qcow2 *s, struct coro *co,
                           const struct ranges *rs)
{
    int r = 0;
    for (size_t i = 0; i < rs->n && r == 0; i++)
        r = qcow2_refcount_update_co(s, co, rs->r[i][0], rs->r[i][1], -1);
    if (r == 0)
        r = qcow2_cache_flush_co(&s->rb_cache, co);
    if (r < 0)
        log_warn("%s: freeing old bitmap clusters: %s (they may leak)",
                 s->node.filename, strerror(-r));
}

/* Allocates n contiguous clusters and writes buf (n clusters) there. */
static int write_new_co(struct qcow2 *s, struct coro *co, const uint8_t *buf,
                        uint64_t n, struct ranges *fresh, uint64_t *host)
{
    int r = qcow2_alloc_exact_co(s, co, n, host);
    if (r < 0)
        return r;
    r = ranges_add(fresh, *host, n * qcow2_cs(s));
    if (r < 0) {
        qcow2_refcount_update_co(s, co, *host, n * qcow2_cs(s), -1);
        return r;
    }
    return backend_pwrite_co(s->node.file, co, buf, n * qcow2_cs(s), *host, 0);
}

/* Rewrites cluster 0's extension area with the bitmaps extension (nb > 0)
 * or without it, and autoclear bit 0 to match; durable on return. */
static int write_header_co(struct qcow2 *s, struct coro *co, uint32_t nb,
                           uint64_t dir_size, uint64_t dir_off)
{
    const uint64_t cs = qcow2_cs(s);
    char err[256];
    /* A refcount table growth writes the header without the lock. */
    qcow2_header_wait_locked_co(s, co);
    struct qcow2_extensions *ext = calloc(1, sizeof(*ext));
    uint8_t *nh = qcow2_buf_alloc(s, cs);
    int r = ext && nh ? 0 : -ENOMEM;
    /* the file grew since the header was checked against its size */
    struct qcow2_header h = s->h;
    if (s->node.file->size > h.file_size)
        h.file_size = s->node.file->size;
    if (r == 0)
        r = qcow2_header_parse_extensions(s->hdr, cs, &h, ext, err, sizeof(err));
    if (r == 0 && ext->n_unknown > QCOW2_MAX_UNKNOWN_EXT)
        r = -ENOTSUP;
    if (r < 0)
        goto out;
    memset(nh, 0, cs);
    memcpy(nh, s->hdr, s->h.header_length);
    size_t pos = s->h.header_length;
    size_t p = ext->start;
    size_t name_len = s->has_backing_name ? strlen(s->backing_name) : 0;
    while (p + 8 <= ext->end) {
        uint32_t type = be_get32(s->hdr + p);
        uint32_t len = be_get32(s->hdr + p + 4);
        size_t total = 8 + (((size_t)len + 7) & ~(size_t)7);
        if (type == QCOW2_EXT_END)
            break;
        if (type != QCOW2_EXT_BITMAPS) {
            if (pos + total + 40 + name_len > cs) {
                r = -ENOSPC;
                goto out;
            }
            memcpy(nh + pos, s->hdr + p, total);
            pos += total;
        }
        p += total;
    }
    if (nb) {
        if (pos + 32 + 8 + name_len > cs) {
            r = -ENOSPC;
            goto out;
        }
        be_put32(nh + pos, QCOW2_EXT_BITMAPS);
        be_put32(nh + pos + 4, 24);
        be_put32(nh + pos + 8, nb);
        be_put32(nh + pos + 12, 0);
        be_put64(nh + pos + 16, dir_size);
        be_put64(nh + pos + 24, dir_off);
        pos += 32;
    }
    be_put32(nh + pos, QCOW2_EXT_END);
    be_put32(nh + pos + 4, 0);
    pos += 8;
    h.backing_file_offset = name_len ? pos : 0;
    h.backing_file_size = (uint32_t)name_len;
    memcpy(nh + pos, s->backing_name, name_len);
    if (nb)
        h.autoclear_features |= QCOW2_AUTOCLEAR_BITMAPS;
    else
        h.autoclear_features &= ~QCOW2_AUTOCLEAR_BITMAPS;
    qcow2_header_serialize(&h, nh, cs);
    r = backend_pwrite_co(s->node.file, co, nh, cs, 0, BACKEND_FUA);
    if (r == 0) {
        memcpy(s->hdr, nh, cs);
        s->h = h;
    }
out:
    free(ext);
    free(nh);
    return r;
}

/* The store itself, s->lock held.  *switched: the header write was
 * tried (after a failure, the header may name the new clusters). */
static int write_locked_co(struct qcow2 *s, struct coro *co, bool store_data,
                           struct ranges *fresh, bool *switched)
{
    struct fmt_node *n = &s->node;
    const uint64_t cs = qcow2_cs(s);
    uint32_t nb = 0;
    uint64_t dir_size = 0;
    for (struct fmt_bitmap *bm = n->bitmaps; bm; bm = bm->next) {
        if (bm->persistent) {
            nb++;
            dir_size += round_up(QCOW2_BITMAP_ENTRY_MIN + strlen(bm->name), 8);
        }
    }
    uint8_t *dir = NULL, *data = NULL, *table = NULL;
    uint64_t dir_off = 0;
    int r = 0;
    if (nb) {
        dir = qcow2_buf_alloc(s, round_up(dir_size, cs));
        data = qcow2_buf_alloc(s, cs);
        if (!dir || !data) {
            r = -ENOMEM;
            goto out;
        }
        memset(dir, 0, round_up(dir_size, cs));
    }
    /* The list is newest first; the directory oldest first, as QEMU's
     * (which loads it in that order and lists newest first): entries are
     * filled from the end. */
    uint64_t pos = dir_size;
    for (struct fmt_bitmap *bm = n->bitmaps; bm && r == 0; bm = bm->next) {
        if (!bm->persistent)
            continue;
        uint64_t te = table_entries(s, bm->bits.gran);
        uint64_t tclusters = (te * 8 + cs - 1) / cs;
        if (tclusters == 0)
            tclusters = 1;
        free(table);
        table = qcow2_buf_alloc(s, tclusters * cs);
        if (!table) {
            r = -ENOMEM;
            break;
        }
        memset(table, 0, tclusters * cs);
        bool in_use = !store_data || bm->inconsistent;
        uint64_t total = dbitmap_stream_bytes(&bm->bits);
        for (uint64_t i = 0; !in_use && i < te && r == 0; i++) {
            uint64_t at = i * cs;
            size_t len = (size_t)(total - at < cs ? total - at : cs);
            if (dbitmap_bytes_clear(&bm->bits, at, len))
                continue;
            memset(data, 0, cs);
            dbitmap_store_bytes(&bm->bits, at, data, len);
            uint64_t host;
            r = write_new_co(s, co, data, 1, fresh, &host);
            if (r == 0)
                be_put64(table + 8 * i, host);
        }
        uint64_t toff = 0;
        if (r == 0)
            r = write_new_co(s, co, table, tclusters, fresh, &toff);
        if (r < 0)
            break;
        size_t esize = (size_t)round_up(QCOW2_BITMAP_ENTRY_MIN + strlen(bm->name), 8);
        pos -= esize;
        uint8_t *e = dir + pos;
        be_put64(e, toff);
        be_put32(e + 8, (uint32_t)te);
        be_put32(e + 12, (in_use ? QCOW2_BITMAP_IN_USE : 0) |
                         (bm->recording ? BME_AUTO : 0));
        e[16] = BME_TYPE_DIRTY;
        e[17] = (uint8_t)bm->bits.shift;
        be_put16(e + 18, (uint16_t)strlen(bm->name));
        be_put32(e + 20, 0);
        memcpy(e + QCOW2_BITMAP_ENTRY_MIN, bm->name, strlen(bm->name));
    }
    if (r == 0 && nb)
        r = write_new_co(s, co, dir, round_up(dir_size, cs) / cs, fresh, &dir_off);
    /* everything the new header will point at is on disk first: the
     * refcounts of the new clusters (written through, with FUA), then
     * their content */
    if (r == 0)
        r = qcow2_cache_flush_co(&s->rb_cache, co);
    if (r == 0)
        r = backend_flush_co(n->file, co);
    if (r == 0) {
        *switched = true;
        r = write_header_co(s, co, nb, dir_size, dir_off);
    }
    if (r == 0) {
        s->bm_nb = nb;
        s->bm_dir_offset = dir_off;
        s->bm_dir_size = dir_size;
        for (struct fmt_bitmap *bm = n->bitmaps; bm; bm = bm->next)
            bm->stored = bm->persistent;
    }
out:
    free(dir);
    free(data);
    free(table);
    return r;
}

int qcow2_bitmaps_write_co(struct fmt_node *n, struct coro *co,
                           bool store_data, struct error **errp)
{
    struct qcow2 *s = qcow2_of(n);
    if (n->read_only)
        return error_setf(errp, EROFS, "%s: read-only", n->filename);
    if (s->broken)
        return error_setf(errp, EIO, "%s: the image is marked corrupt",
                          n->filename);
    struct ranges old = {0}, fresh = {0};
    bool switched = false;
    qcow2_lock_co(s, co);
    int r = old_clusters_co(s, co, &old);
    if (r == 0) {
        r = write_locked_co(s, co, store_data, &fresh, &switched);
        if (r == 0)
            free_ranges_co(s, co, &old);   /* the header no longer names them */
        else if (!switched)
            free_ranges_co(s, co, &fresh); /* the header never named them */
        /* else: either may be named on disk; both leak, safely */
    }
    co_mutex_unlock(&s->lock, co);
    free(old.r);
    free(fresh.r);
    if (r < 0)
        return error_setf(errp, -r, "%s: writing the bitmap directory: %s",
                          n->filename, strerror(-r));
    return 0;
}
