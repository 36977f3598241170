/* strata — fuzz target: the qcow2 driver (formats/qcow2*.c) on a whole
 * image, opened from the fuzzed bytes over an in-memory backend, then used.
 *
 * Input layout:
 *
 *   byte 0      bit 0: open read-only; bit 1: the smallest L2 cache,
 *               bit 2: the smallest refcount cache (four tables each:
 *               evictions and write-backs in the middle of operations)
 *   byte 1      number of operations (at most MAX_OPS are run)
 *   then        8 bytes per operation (below)
 *   the rest    the image file
 *
 * An operation: type, 3 bytes of offset, 2 bytes of length, a pattern
 * byte, a modifier byte.  The offset is in 512-byte units (modifier bit 4:
 * MiB units, to reach far into large disks), wrapped into the disk; the
 * length is in 512-byte units, clipped to the disk (reads and writes at
 * most 128 KiB; modifier bit 5: to the end of the disk for the others).
 * Types: read, write, write-zeroes, discard, block status, flush, cache,
 * reopen (read-only <-> read-write), grow.  Modifier bits 0..2 are
 * FUA, MAY_TRIM and FAST; bit 3 splits a read into two iovecs.
 *
 * Properties:
 *  - no crash, no sanitizer report, no leak; the contract wrappers'
 *    assertions hold (ranges, returns);
 *  - open either fails with an error message or gives a node whose
 *    operations return 0 or -errno;
 *  - a read returns what the last successful write or write-zeroes put
 *    there (a model of the first MODEL_BYTES of the disk, per 512-byte
 *    sector; a failed write, a discard or a failed zeroing makes the sector
 *    unknown again);
 *  - bytes block status calls zero read as zeros;
 *  - the new bytes of a grown disk read as zeros;
 *  - after a successful flush and close of an image that saw no
 *    corruption, the same bytes open again (read-only) and every sector
 *    of the model reads back the same.
 */
#include <errno.h>
#include <stdbool.h>

#include "error.h"
#include "format.h"
#include "fuzz.h"
#include "loop.h"
#include "mem-backend.h"
#include "qcow2.h"

#define MAX_OPS 32
#define OP_BYTES 8
#define SECTOR 512u
#define MODEL_BYTES (UINT64_C(1) << 20)
#define MODEL_SECTORS (MODEL_BYTES / SECTOR)
#define MAX_RW (UINT64_C(128) << 10)
/* Host file: large enough for images that grow, bounded for the fuzzer. */
#define STORE_LIMIT (UINT64_C(64) << 20)
/* Longest stretch of a zero extent read back to check it. */
#define ZERO_CHECK_MAX (UINT64_C(64) << 10)

enum op_type {
    OP_READ,
    OP_WRITE,
    OP_ZERO,
    OP_DISCARD,
    OP_BLOCK_STATUS,
    OP_FLUSH,
    OP_CACHE,
    OP_REOPEN,
    OP_GROW,
    OP_TYPES
};

#define MOD_FUA      (1u << 0)
#define MOD_MAY_TRIM (1u << 1)
#define MOD_FAST     (1u << 2)
#define MOD_FAR      (1u << 4)
#define MOD_TO_END   (1u << 5)

struct model {
    uint8_t data[MODEL_BYTES];
    bool known[MODEL_SECTORS];
};

struct run {
    const uint8_t *ops;
    size_t n_ops;
    const uint8_t *image;
    size_t image_len;
    uint8_t flags;
    struct mem_store *store;
    struct model *model;
    uint8_t *buf;              /* MAX_RW bytes */
};

static struct loop *fuzz_loop(void)
{
    static struct loop *l;
    if (!l) {
        char *err = NULL;
        l = loop_new(8, 256 << 10, &err);
        if (!l) {
            fprintf(stderr, "loop_new: %s\n", err ? err : "?");
            abort();
        }
    }
    return l;
}

static struct fmt_node *open_image(struct run *rn, struct coro *co,
                                   bool read_only)
{
    /* Small caches (the defaults cost more to set up than a small image
     * does to use); bits 1 and 2 make them the smallest there is. */
    struct fmt_open_opts o = {.format = "qcow2", .read_only = read_only,
                              .l2_cache_bytes = 256 << 10,
                              .refcount_cache_bytes = 256 << 10};
    struct error *err = NULL;
    if (rn->flags & 2)
        o.l2_cache_bytes = 1; /* rounded up by the driver to its minimum */
    if (rn->flags & 4)
        o.refcount_cache_bytes = 1;
    struct backend *b = mem_backend_open(fuzz_loop(), rn->store, "fuzz.qcow2",
                                         read_only);
    struct fmt_node *n = qcow2_open_co(fuzz_loop(), co, b, &o, &err);
    if (!n) {
        FUZZ_CHECK(err && err->code > 0 && err->msg[0]);
        error_free(err);
        backend_close(b);
        return NULL;
    }
    FUZZ_CHECK(!err);
    n->drv = &qcow2_driver;
    FUZZ_CHECK(n->align >= 1 && (n->align & (n->align - 1)) == 0);
    return n;
}

/* Every sector of [off, off+len) in the model window becomes unknown, or
 * known with the bytes of data (NULL: zeros). */
static void model_set(struct model *m, uint64_t off, uint64_t len,
                      const uint8_t *data, bool known)
{
    for (uint64_t s = off / SECTOR; s * SECTOR < off + len && s < MODEL_SECTORS;
         s++) {
        uint64_t a = s * SECTOR > off ? s * SECTOR : off;
        uint64_t e = (s + 1) * SECTOR < off + len ? (s + 1) * SECTOR : off + len;
        if (!known || a != s * SECTOR || e != (s + 1) * SECTOR) {
            /* partly covered (the end of a disk whose size is not a
             * multiple of 512): the rest of the sector is not modelled */
            m->known[s] = false;
            continue;
        }
        if (data)
            memcpy(m->data + a, data + (a - off), SECTOR);
        else
            memset(m->data + a, 0, SECTOR);
        m->known[s] = true;
    }
}

/* What was read at off must agree with every known sector. */
static void model_check(const struct model *m, uint64_t off, uint64_t len,
                        const uint8_t *got)
{
    for (uint64_t s = off / SECTOR; s * SECTOR < off + len && s < MODEL_SECTORS;
         s++) {
        if (!m->known[s] || s * SECTOR < off || (s + 1) * SECTOR > off + len)
            continue;
        if (memcmp(got + (s * SECTOR - off), m->data + s * SECTOR, SECTOR)) {
            fprintf(stderr, "sector %llu reads other bytes than were "
                    "written\n", (unsigned long long)s);
            FUZZ_CHECK(!"a read returns what was written");
        }
    }
}

FUZZ_NO_COVERAGE static bool all_zero(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return false;
    return true;
}

FUZZ_NO_COVERAGE static void fill(uint8_t *buf, uint64_t off, uint64_t len,
                                  unsigned op, uint8_t pattern)
{
    /* Different in every sector and every operation: a write that lands in
     * the wrong place does not match by chance. */
    for (uint64_t i = 0; i < len; i++)
        buf[i] = (uint8_t)(pattern + op * 37 + ((off + i) / SECTOR) * 13 + i);
}

/* FUZZ_VERBOSE=1 in the environment: each operation and its result on
 * stderr (to read what a failing input does). */
static bool verbose(void)
{
    static int v = -1;
    if (v < 0)
        v = getenv("FUZZ_VERBOSE") != NULL;
    return v;
}

static const char *const op_names[] = {
    "read", "write", "zero", "discard", "block-status", "flush", "cache",
    "reopen", "grow",
};

static uint64_t rd24(const uint8_t *p)
{
    return (uint64_t)p[0] | (uint64_t)p[1] << 8 | (uint64_t)p[2] << 16;
}

static void run_ops(struct run *rn, struct coro *co, struct fmt_node **np)
{
    struct fmt_node *n = *np;
    struct model *m = rn->model;

    for (size_t i = 0; i < rn->n_ops; i++) {
        const uint8_t *op = rn->ops + i * OP_BYTES;
        enum op_type type = (enum op_type)(op[0] % OP_TYPES);
        uint8_t mod = op[7], pattern = op[6];
        uint64_t units = (uint64_t)op[4] | (uint64_t)op[5] << 8;
        uint64_t size = n->size;
        if (size == 0)
            break; /* nothing addressable */
        uint64_t off = rd24(op + 1) * ((mod & MOD_FAR) ? (UINT64_C(1) << 20)
                                                       : SECTOR);
        off %= size;
        off &= ~(uint64_t)(n->align - 1);
        uint64_t len = (units + 1) * SECTOR;
        if (type == OP_READ || type == OP_WRITE) {
            len = ((units % (MAX_RW / SECTOR)) + 1) * SECTOR;
        } else if (mod & MOD_TO_END) {
            len = size - off;
        }
        if (len > size - off)
            len = size - off;
        len &= ~(uint64_t)(n->align - 1);
        int r = 0;

        switch (type) {
        case OP_READ: {
            if (len == 0)
                break;
            struct iovec iov[2] = {{rn->buf, len / 2}, {rn->buf + len / 2,
                                                        len - len / 2}};
            int cnt = len / 2 && (mod & 8) ? 2 : 1;
            if (cnt == 1)
                iov[0].iov_len = len;
            r = fmt_preadv_co(n, co, iov, cnt, off);
            FUZZ_CHECK(r <= 0);
            if (r == 0)
                model_check(m, off, len, rn->buf);
            break;
        }
        case OP_WRITE:
            if (len == 0 || n->read_only)
                break;
            fill(rn->buf, off, len, (unsigned)i, pattern);
            r = fmt_pwritev_co(n, co, &(struct iovec){rn->buf, len}, 1, off,
                               (mod & MOD_FUA) ? FMT_FUA : 0);
            FUZZ_CHECK(r <= 0);
            model_set(m, off, len, rn->buf, r == 0);
            break;
        case OP_ZERO: {
            if (len == 0 || n->read_only)
                break;
            unsigned f = ((mod & MOD_FUA) ? FMT_FUA : 0) |
                         ((mod & MOD_MAY_TRIM) ? FMT_MAY_TRIM : 0) |
                         ((mod & MOD_FAST) ? FMT_FAST : 0);
            r = fmt_zero_co(n, co, off, len, f);
            FUZZ_CHECK(r <= 0);
            model_set(m, off, len, NULL, r == 0);
            break;
        }
        case OP_DISCARD:
            if (len == 0 || n->read_only)
                break;
            r = fmt_discard_co(n, co, off, len, 0);
            FUZZ_CHECK(r <= 0);
            model_set(m, off, len, NULL, false);
            break;
        case OP_BLOCK_STATUS: {
            struct fmt_extent ext;
            if (len == 0)
                len = 1;
            r = fmt_block_status_co(n, co, off, len, &ext);
            FUZZ_CHECK(r <= 0);
            if (r < 0)
                break;
            FUZZ_CHECK(ext.len > 0 && ext.len <= len);
            FUZZ_CHECK(!(ext.flags & ~(FMT_EXT_HOLE | FMT_EXT_ZERO)));
            if (!(ext.flags & FMT_EXT_ZERO))
                break;
            /* a zero extent reads as zeros, and agrees with the model */
            uint64_t clen = ext.len < ZERO_CHECK_MAX ? ext.len : ZERO_CHECK_MAX;
            uint64_t a = n->align;
            uint64_t roff = off & ~(a - 1);
            uint64_t rend = (off + clen + a - 1) & ~(a - 1);
            if (rend > size || rend - roff > MAX_RW || rend == roff)
                break;
            r = fmt_preadv_co(n, co, &(struct iovec){rn->buf, rend - roff}, 1,
                              roff);
            FUZZ_CHECK(r <= 0);
            if (r < 0)
                break;
            if (!all_zero(rn->buf + (off - roff), clen)) {
                fprintf(stderr, "block status says [%llu, +%llu) is zero\n",
                        (unsigned long long)off, (unsigned long long)clen);
                FUZZ_CHECK(!"bytes block status calls zero read as zeros");
            }
            model_check(m, roff, rend - roff, rn->buf);
            break;
        }
        case OP_FLUSH:
            r = fmt_flush_co(n, co);
            FUZZ_CHECK(r <= 0);
            break;
        case OP_CACHE:
            if (len == 0)
                break;
            r = fmt_cache_co(n, co, off, len);
            FUZZ_CHECK(r <= 0);
            break;
        case OP_REOPEN: {
            struct error *err = NULL;
            bool ro = !n->read_only;
            if (!ro && (rn->flags & 1))
                break; /* opened read-only: stays so */
            r = fmt_reopen_co(n, co, ro, &err);
            FUZZ_CHECK(r <= 0);
            FUZZ_CHECK((r == 0) == (err == NULL));
            if (r == 0)
                FUZZ_CHECK(n->read_only == ro);
            error_free(err);
            break;
        }
        case OP_GROW: {
            struct error *err = NULL;
            if (n->read_only)
                break;
            uint64_t want = size + (units + 1) * SECTOR;
            r = fmt_grow_co(n, co, want, &err);
            FUZZ_CHECK(r <= 0);
            FUZZ_CHECK((r == 0) == (err == NULL));
            error_free(err);
            if (r < 0) {
                FUZZ_CHECK(n->size == size);
                break;
            }
            FUZZ_CHECK(n->size == want);
            /* the new bytes read as zeros */
            uint64_t from = (size + SECTOR - 1) / SECTOR * SECTOR;
            if (from < want) {
                uint64_t l = want - from < MAX_RW ? want - from : MAX_RW;
                r = fmt_preadv_co(n, co, &(struct iovec){rn->buf, l}, 1, from);
                FUZZ_CHECK(r <= 0);
                if (r == 0)
                    FUZZ_CHECK(all_zero(rn->buf, l));
                model_set(m, from, want - from, NULL, true);
            }
            break;
        }
        case OP_TYPES:
            break;
        }
        if (verbose())
            fprintf(stderr, "op %zu: %s off %llu len %llu mod %#x: %d%s\n", i,
                    op_names[type], (unsigned long long)off,
                    (unsigned long long)len, mod, r,
                    qcow2_of(n)->broken ? " (broken)" : "");
    }
    *np = n;
}

/* Reads every known sector of the model back from n. */
static void check_model(struct run *rn, struct coro *co, struct fmt_node *n)
{
    struct model *m = rn->model;
    for (uint64_t s = 0; s < MODEL_SECTORS && (s + 1) * SECTOR <= n->size;
         s++) {
        if (!m->known[s])
            continue;
        int r = fmt_preadv_co(n, co, &(struct iovec){rn->buf, SECTOR}, 1,
                              s * SECTOR);
        FUZZ_CHECK(r <= 0);
        if (r == 0)
            model_check(m, s * SECTOR, SECTOR, rn->buf);
    }
}

static void fuzz_co(struct coro *co, void *arg)
{
    struct run *rn = arg;
    bool ro = rn->flags & 1;
    struct fmt_node *n = open_image(rn, co, ro);
    if (!n)
        return;
    run_ops(rn, co, &n);

    /* Flush and close; then the same bytes must open again and hold what
     * was written. */
    bool clean = !qcow2_of(n)->broken;
    if (!n->read_only)
        clean = fmt_flush_co(n, co) == 0 && clean;
    clean = clean && !qcow2_of(n)->broken;
    fmt_close(n);
    n = open_image(rn, co, true);
    if (clean)
        FUZZ_CHECK(n != NULL);
    if (n) {
        check_model(rn, co, n);
        fmt_close(n);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct model *model;
    static uint8_t *buf;
    if (size < 2)
        return 0;
    if (!model) {
        model = malloc(sizeof(*model));
        buf = malloc(MAX_RW);
        if (!model || !buf)
            abort();
    }
    struct run rn = {.flags = data[0], .model = model, .buf = buf};
    size_t n_ops = data[1] % (MAX_OPS + 1);
    if (size - 2 < n_ops * OP_BYTES)
        n_ops = (size - 2) / OP_BYTES;
    rn.ops = data + 2;
    rn.n_ops = n_ops;
    rn.image = data + 2 + n_ops * OP_BYTES;
    rn.image_len = size - 2 - n_ops * OP_BYTES;
    memset(model->known, 0, sizeof(model->known));
    /* One store for every input (its memory reused). */
    static struct mem_store store;
    mem_store_load(&store, rn.image, rn.image_len, STORE_LIMIT);
    rn.store = &store;
    int r = loop_run_sync(fuzz_loop(), fuzz_co, &rn);
    FUZZ_CHECK(r == 0);
    return 0;
}
