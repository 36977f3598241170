/* strata — named dirty bitmaps on format nodes (see bitmap.h). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "format.h"
#include "log.h"

struct fmt_bitmap *fmt_bitmap_find(struct fmt_node *n, const char *name)
{
    for (struct fmt_bitmap *bm = n->bitmaps; bm; bm = bm->next)
        if (!strcmp(bm->name, name))
            return bm;
    return NULL;
}

uint64_t fmt_bitmap_default_gran(const struct fmt_node *n)
{
    uint64_t g = n->cluster_size ? n->cluster_size : UINT64_C(65536);
    if (g < 4096)
        g = 4096;
    if (g > 65536)
        g = 65536;
    return g;
}

int fmt_bitmap_check(const struct fmt_bitmap *bm, unsigned flags,
                     struct error **errp)
{
    if ((flags & FMT_BITMAP_CHECK_BUSY) && bm->busy)
        return error_setf(errp, EBUSY, "Bitmap '%s' is currently in use by "
                          "another operation and cannot be used", bm->name);
    if ((flags & FMT_BITMAP_CHECK_RO) && bm->readonly)
        return error_setf(errp, EROFS, "Bitmap '%s' is readonly and cannot be "
                          "modified", bm->name);
    if ((flags & FMT_BITMAP_CHECK_INCONSISTENT) && bm->inconsistent)
        return error_setf(errp, EINVAL, "Bitmap '%s' is inconsistent and cannot "
                          "be used\nTry block-dirty-bitmap-remove to delete "
                          "this bitmap from disk", bm->name);
    return 0;
}

static void bitmap_free(struct fmt_bitmap *bm)
{
    dbitmap_destroy(&bm->bits);
    free(bm->name);
    free(bm);
}

static void unlink_bitmap(struct fmt_node *n, struct fmt_bitmap *bm)
{
    for (struct fmt_bitmap **p = &n->bitmaps; *p; p = &(*p)->next) {
        if (*p == bm) {
            *p = bm->next;
            return;
        }
    }
}

int fmt_bitmap_can_store(struct fmt_node *n, const char *name, uint64_t gran,
                         struct error **errp)
{
    if (!n->ops->bitmap_can_store || !n->ops->bitmaps_write_co)
        return error_setf(errp, ENOTSUP, "Operation not supported");
    if (n->read_only)
        return error_setf(errp, EROFS, "the node is read-only");
    return n->ops->bitmap_can_store(n, name, gran, errp);
}

struct fmt_bitmap *fmt_bitmap_add_co(struct fmt_node *n, struct coro *co,
                                     const char *name, uint64_t gran,
                                     bool persistent, bool disabled,
                                     struct error **errp)
{
    if (fmt_bitmap_find(n, name)) {
        error_setf(errp, EEXIST, "Bitmap already exists: %s", name);
        return NULL;
    }
    if (strlen(name) > FMT_BITMAP_MAX_NAME) {
        error_setf(errp, EINVAL, "Bitmap name too long: %s", name);
        return NULL;
    }
    if (fmt_bitmap_bytes(n->size, gran) > FMT_BITMAP_MAX_BYTES) {
        error_setf(errp, EFBIG, "a bitmap of granularity %llu would take more "
                   "than %llu MiB for this disk: use a larger granularity",
                   (unsigned long long)gran,
                   (unsigned long long)(FMT_BITMAP_MAX_BYTES >> 20));
        return NULL;
    }
    if (persistent && fmt_bitmap_can_store(n, name, gran, errp) < 0)
        return NULL;
    struct fmt_bitmap *bm = calloc(1, sizeof(*bm));
    if (!bm || !(bm->name = strdup(name)) ||
        dbitmap_init(&bm->bits, n->size, gran) < 0) {
        if (bm)
            free(bm->name);
        free(bm);
        error_setf(errp, ENOMEM, "out of memory");
        return NULL;
    }
    bm->recording = !disabled;
    bm->persistent = persistent;
    bm->next = n->bitmaps;
    n->bitmaps = bm;
    if (persistent) {
        /* In the image at once, in use: a crash leaves it inconsistent,
         * never missing from a directory that claims to be complete. */
        int r = n->ops->bitmaps_write_co(n, co, false, errp);
        if (r < 0) {
            unlink_bitmap(n, bm);
            bitmap_free(bm);
            return NULL;
        }
    }
    return bm;
}

int fmt_bitmap_remove_co(struct fmt_node *n, struct coro *co,
                         struct fmt_bitmap *bm, struct error **errp)
{
    if (bm->busy)
        return fmt_bitmap_check(bm, FMT_BITMAP_CHECK_BUSY, errp);
    unlink_bitmap(n, bm);
    if (bm->stored) {
        int r = n->ops->bitmaps_write_co(n, co, false, errp);
        if (r < 0) {
            bm->next = n->bitmaps;   /* still in the image: keep it */
            n->bitmaps = bm;
            return r;
        }
    }
    bitmap_free(bm);
    return 0;
}

void fmt_bitmap_detach(struct fmt_node *n, struct fmt_bitmap *bm,
                       struct fmt_bitmap **prev)
{
    *prev = NULL;
    for (struct fmt_bitmap *x = n->bitmaps; x && x != bm; x = x->next)
        *prev = x;
    unlink_bitmap(n, bm);
    bm->next = NULL;
}

void fmt_bitmap_reattach(struct fmt_node *n, struct fmt_bitmap *bm,
                         struct fmt_bitmap *prev)
{
    struct fmt_bitmap **at = prev ? &prev->next : &n->bitmaps;
    bm->next = *at;
    *at = bm;
}

int fmt_bitmap_drop_co(struct fmt_node *n, struct coro *co,
                       struct fmt_bitmap *bm, struct error **errp)
{
    int r = 0;
    if (bm->stored)
        r = n->ops->bitmaps_write_co(n, co, false, errp);
    bitmap_free(bm);
    return r;
}

void fmt_bitmaps_free(struct fmt_node *n)
{
    while (n->bitmaps) {
        struct fmt_bitmap *bm = n->bitmaps;
        n->bitmaps = bm->next;
        bitmap_free(bm);
    }
}

int fmt_bitmaps_resize(struct fmt_node *n, uint64_t size)
{
    for (struct fmt_bitmap *bm = n->bitmaps; bm; bm = bm->next)
        if (dbitmap_resize(&bm->bits, size) < 0)
            return -ENOMEM;
    return 0;
}

int fmt_bitmaps_store_co(struct fmt_node *n, struct coro *co,
                         struct error **errp)
{
    if (n->read_only || !n->ops->bitmaps_write_co)
        return 0;
    bool any = false;
    for (struct fmt_bitmap *bm = n->bitmaps; bm; bm = bm->next)
        any |= bm->persistent || bm->stored;
    if (!any)
        return 0;
    return n->ops->bitmaps_write_co(n, co, true, errp);
}
