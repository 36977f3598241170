/* strata — qcow2 header: parse, validate and rewrite the image header, walk
 * its extensions, decode L1/L2 entries, refcount block arithmetic.
 *
 * See qcow2-header.h for the contract of every function.  Everything here
 * is a pure function over caller-provided buffers: no allocation, no I/O,
 * no global mutable state, errno is never touched.  Parsers never read past
 * the length they are given.
 *
 * "spec" below means ../shared/specs/qcow2.txt; section names are quoted.
 */
#include <assert.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "byteorder.h"
#include "qcow2-header.h"

/* Header field offsets (spec, "Header"). */
#define OFF_MAGIC                   0
#define OFF_VERSION                 4
#define OFF_BACKING_FILE_OFFSET     8
#define OFF_BACKING_FILE_SIZE       16
#define OFF_CLUSTER_BITS            20
#define OFF_SIZE                    24
#define OFF_CRYPT_METHOD            32
#define OFF_L1_SIZE                 36
#define OFF_L1_TABLE_OFFSET         40
#define OFF_REFCOUNT_TABLE_OFFSET   48
#define OFF_REFCOUNT_TABLE_CLUSTERS 56
#define OFF_NB_SNAPSHOTS            60
#define OFF_SNAPSHOTS_OFFSET        64
#define OFF_INCOMPATIBLE_FEATURES   72
#define OFF_COMPATIBLE_FEATURES     80
#define OFF_AUTOCLEAR_FEATURES      88
#define OFF_REFCOUNT_ORDER          96
#define OFF_HEADER_LENGTH           100

#define EXT_HEADER_SIZE             8    /* type, length */
#define BITMAPS_EXT_SIZE            24   /* spec, "Bitmaps extension" */
#define CRYPTO_EXT_SIZE             16   /* offset, length */
#define SNAPSHOT_ENTRY_MIN          40   /* fixed part of a snapshot entry */
#define BITMAP_DIR_ENTRY_MIN        32   /* 24 fixed + >= 1 name byte, padded */
#define MAX_REFCOUNT_ORDER          6

/* Writes the message (if the caller wants one) and returns ret. */
__attribute__((format(printf, 4, 5)))
static int fail(char *err, size_t errlen, int ret, const char *fmt, ...)
{
    va_list ap;

    if (err && errlen) {
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return ret;
}

/* Highest byte offset a table may reach: the file size rounded up to a
 * whole cluster.  QEMU writes a table that ends the file only as far as it
 * is used (a fresh image ends 8 bytes into its L1 cluster), so the last
 * cluster may be partial. */
static uint64_t file_limit(uint64_t file_size, uint32_t cluster_size)
{
    uint64_t mask = (uint64_t)cluster_size - 1;

    if (file_size > UINT64_MAX - mask)
        return UINT64_MAX & ~mask;
    return (file_size + mask) & ~mask;
}

/* Does [offset, offset + bytes) lie inside the file?  No overflow. */
static bool range_in_file(const struct qcow2_header *h, uint64_t offset,
                          uint64_t bytes)
{
    uint64_t limit = file_limit(h->file_size, h->cluster_size);

    return offset <= limit && bytes <= limit - offset;
}

/* Do two byte ranges overlap?  Both are known to be inside the file, so
 * offset + bytes does not wrap. */
static bool ranges_overlap(uint64_t a, uint64_t alen, uint64_t b,
                           uint64_t blen)
{
    return alen && blen && a < b + blen && b < a + alen;
}

static uint64_t round_up(uint64_t v, uint64_t align)
{
    return (v + align - 1) & ~(align - 1);
}

/* ======================= header ======================= */

/* Reads the fields of the fixed header.  len >= 72, and >= 104 for v3. */
static void read_fields(const uint8_t *b, struct qcow2_header *h)
{
    h->magic = be_get32(b + OFF_MAGIC);
    h->version = be_get32(b + OFF_VERSION);
    h->backing_file_offset = be_get64(b + OFF_BACKING_FILE_OFFSET);
    h->backing_file_size = be_get32(b + OFF_BACKING_FILE_SIZE);
    h->cluster_bits = be_get32(b + OFF_CLUSTER_BITS);
    h->size = be_get64(b + OFF_SIZE);
    h->crypt_method = be_get32(b + OFF_CRYPT_METHOD);
    h->l1_size = be_get32(b + OFF_L1_SIZE);
    h->l1_table_offset = be_get64(b + OFF_L1_TABLE_OFFSET);
    h->refcount_table_offset = be_get64(b + OFF_REFCOUNT_TABLE_OFFSET);
    h->refcount_table_clusters = be_get32(b + OFF_REFCOUNT_TABLE_CLUSTERS);
    h->nb_snapshots = be_get32(b + OFF_NB_SNAPSHOTS);
    h->snapshots_offset = be_get64(b + OFF_SNAPSHOTS_OFFSET);
}

/* Version-dependent fields: header_length, features, refcount_order,
 * compression_type. */
static int parse_version_fields(const uint8_t *b, size_t len,
                                struct qcow2_header *h, char *err,
                                size_t errlen)
{
    if (h->version == 2) {
        /* Spec: "For version 2, the header is exactly 72 bytes", the
         * refcount order "is always assumed to be 4", and "all additional
         * fields are not present". */
        h->header_length = QCOW2_V2_HEADER_LENGTH;
        h->refcount_order = 4;
        return 0;
    }

    if (len < QCOW2_V3_HEADER_LENGTH)
        return fail(err, errlen, -EINVAL,
                    "truncated header: %zu bytes, version 3 needs %u",
                    len, QCOW2_V3_HEADER_LENGTH);
    h->incompatible_features = be_get64(b + OFF_INCOMPATIBLE_FEATURES);
    h->compatible_features = be_get64(b + OFF_COMPATIBLE_FEATURES);
    h->autoclear_features = be_get64(b + OFF_AUTOCLEAR_FEATURES);
    h->refcount_order = be_get32(b + OFF_REFCOUNT_ORDER);
    h->header_length = be_get32(b + OFF_HEADER_LENGTH);

    /* Spec: "For version 3 it's at least 104 bytes and must be a multiple
     * of 8"; it lives in the first cluster with the extensions. */
    if (h->header_length < QCOW2_V3_HEADER_LENGTH)
        return fail(err, errlen, -EINVAL,
                    "header_length %u too short for version 3",
                    h->header_length);
    if (h->header_length % 8)
        return fail(err, errlen, -EINVAL,
                    "header_length %u not a multiple of 8", h->header_length);
    if (h->header_length > h->cluster_size)
        return fail(err, errlen, -EINVAL,
                    "header_length %u exceeds the cluster size",
                    h->header_length);
    if (len < h->header_length)
        return fail(err, errlen, -EINVAL,
                    "truncated header: %zu bytes of header_length %u",
                    len, h->header_length);

    /* Spec: "This value may not exceed 6". */
    if (h->refcount_order > MAX_REFCOUNT_ORDER)
        return fail(err, errlen, -EINVAL, "refcount_order %u over 6",
                    h->refcount_order);

    /* Spec, "Additional fields": a field is present only when
     * header_length is greater than its offset. */
    if (h->header_length > QCOW2_COMPRESSION_TYPE_OFFSET)
        h->compression_type = b[QCOW2_COMPRESSION_TYPE_OFFSET];
    return 0;
}

/* Feature bits that constrain other fields (unknown bits are left to
 * qcow2_header_check_features()). */
static int check_feature_fields(struct qcow2_header *h, char *err,
                                size_t errlen)
{
    bool ct_bit = h->incompatible_features & QCOW2_INCOMPAT_COMPRESSION;

    /* Spec, compression_type: 0 zlib, 1 zstd. */
    if (h->compression_type > QCOW2_COMPRESSION_ZSTD)
        return fail(err, errlen, -ENOTSUP,
                    "compression type %u is not supported",
                    h->compression_type);
    /* Spec: with the compression type bit "the field must be present and
     * non-zero"; without it "must not be present or must be zero". */
    if (ct_bit && h->compression_type == QCOW2_COMPRESSION_ZLIB)
        return fail(err, errlen, -EINVAL,
                    "compression type bit set with zlib compression");
    if (!ct_bit && h->compression_type != QCOW2_COMPRESSION_ZLIB)
        return fail(err, errlen, -EINVAL,
                    "compression type %u without the compression type bit",
                    h->compression_type);

    /* Spec, cluster_bits: "if the image has Extended L2 Entries then
     * cluster_bits must be at least 14" (32 subclusters of >= 512 bytes). */
    if ((h->incompatible_features & QCOW2_INCOMPAT_EXTL2) &&
        h->cluster_bits < QCOW2_EXTL2_MIN_CLUSTER_BITS)
        return fail(err, errlen, -EINVAL,
                    "extended L2 entries need clusters of at least 16 KiB, "
                    "not %u bytes", h->cluster_size);

    /* Spec, autoclear bit 1: "may only be set if the External Data File
     * bit ... is also set", and it "conflicts with backing files". */
    if (h->autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW) {
        if (!(h->incompatible_features & QCOW2_INCOMPAT_DATA_FILE))
            return fail(err, errlen, -EINVAL,
                        "raw external data bit without an external data "
                        "file");
        if (h->backing_file_offset)
            return fail(err, errlen, -EINVAL,
                        "raw external data file with a backing file");
    }

    h->dirty = h->incompatible_features & QCOW2_INCOMPAT_DIRTY;
    h->corrupt = h->incompatible_features & QCOW2_INCOMPAT_CORRUPT;
    h->external_data_file = h->incompatible_features &
                            QCOW2_INCOMPAT_DATA_FILE;
    h->extended_l2 = h->incompatible_features & QCOW2_INCOMPAT_EXTL2;
    h->lazy_refcounts = h->compatible_features &
                        QCOW2_COMPAT_LAZY_REFCOUNTS;
    return 0;
}

static void derive(struct qcow2_header *h)
{
    /* Spec, "Cluster mapping" and "Extended L2 Entries": 8-byte entries,
     * or 16-byte entries and 32 subclusters per cluster. */
    h->l2_entry_size = h->extended_l2 ? 16 : 8;
    h->l2_bits = h->cluster_bits - (h->extended_l2 ? 4 : 3);
    h->l2_entries = UINT32_C(1) << h->l2_bits;
    h->subcluster_bits = h->cluster_bits - (h->extended_l2 ? 5 : 0);
    h->subcluster_size = UINT32_C(1) << h->subcluster_bits;
    /* Spec, "Host cluster management": refcount_block_entries =
     * cluster_size * 8 / refcount_bits. */
    h->refcount_bits = UINT32_C(1) << h->refcount_order;
    h->refcount_block_bits = h->cluster_bits + 3 - h->refcount_order;
}

/* Virtual size and the active L1 table. */
static int check_l1(struct qcow2_header *h, char *err, size_t errlen)
{
    const uint64_t max_entries = QCOW2_MAX_L1_BYTES / 8;
    unsigned shift = h->cluster_bits + h->l2_bits;   /* <= 39 */
    uint64_t l1_min, bytes;

    /* Spec, size: QEMU cannot populate a virtual cluster beyond 2 EB (61
     * bits) with its 32 MiB L1 limit; refusing larger sizes also keeps
     * every computation below from overflowing. */
    if (h->size > QCOW2_MAX_SIZE)
        return fail(err, errlen, -EFBIG,
                    "virtual size %llu too large (over 2^61)",
                    (unsigned long long)h->size);
    l1_min = (h->size + (UINT64_C(1) << shift) - 1) >> shift;
    if (l1_min > max_entries)
        return fail(err, errlen, -EFBIG,
                    "virtual size too large for %u-byte clusters "
                    "(L1 table over 32 MiB)", h->cluster_size);
    h->l1_size_min = (uint32_t)l1_min;

    if (h->l1_size > max_entries)
        return fail(err, errlen, -EFBIG,
                    "L1 table too large: %u entries (over 32 MiB)",
                    h->l1_size);
    if (h->l1_size < l1_min)
        return fail(err, errlen, -EINVAL,
                    "L1 table too small for the virtual size: %u entries, "
                    "%llu needed", h->l1_size, (unsigned long long)l1_min);

    /* Spec: l1_table_offset "Must be aligned to a cluster boundary".
     * QEMU writes offset 0 for an empty table (virtual size 0). */
    if (h->l1_table_offset & (h->cluster_size - 1))
        return fail(err, errlen, -EINVAL,
                    "L1 table offset 0x%llx not cluster-aligned",
                    (unsigned long long)h->l1_table_offset);
    if (h->l1_size == 0)
        return 0;
    if (h->l1_table_offset == 0)
        return fail(err, errlen, -EINVAL, "L1 table overlaps the header");
    bytes = (uint64_t)h->l1_size * 8;
    if (!range_in_file(h, h->l1_table_offset, bytes))
        return fail(err, errlen, -EINVAL,
                    "L1 table at 0x%llx past the end of the file",
                    (unsigned long long)h->l1_table_offset);
    return 0;
}

static int check_refcount_table(const struct qcow2_header *h, char *err,
                                size_t errlen)
{
    uint64_t bytes = (uint64_t)h->refcount_table_clusters << h->cluster_bits;
    uint64_t l1_bytes = round_up((uint64_t)h->l1_size * 8, h->cluster_size);

    /* Spec: refcount_table_offset "Must be aligned to a cluster boundary";
     * there is always a refcount table (the header cluster itself has a
     * refcount), and it cannot sit over the header. */
    if (h->refcount_table_offset & (h->cluster_size - 1))
        return fail(err, errlen, -EINVAL,
                    "refcount table offset 0x%llx not cluster-aligned",
                    (unsigned long long)h->refcount_table_offset);
    if (h->refcount_table_offset == 0)
        return fail(err, errlen, -EINVAL,
                    "refcount table offset 0 overlaps the header");
    if (h->refcount_table_clusters == 0)
        return fail(err, errlen, -EINVAL, "refcount table has no cluster");
    /* Spec note: "qemu has an implementation limit of 8 MB as the maximum
     * refcount table size". */
    if (bytes > QCOW2_MAX_REFTABLE_BYTES)
        return fail(err, errlen, -EFBIG,
                    "refcount table too large: %u clusters (over 8 MiB)",
                    h->refcount_table_clusters);
    if (!range_in_file(h, h->refcount_table_offset, bytes))
        return fail(err, errlen, -EINVAL,
                    "refcount table at 0x%llx past the end of the file",
                    (unsigned long long)h->refcount_table_offset);
    if (ranges_overlap(h->refcount_table_offset, bytes,
                       h->l1_table_offset, l1_bytes))
        return fail(err, errlen, -EINVAL,
                    "refcount table overlaps the L1 table");
    return 0;
}

static int check_snapshots(const struct qcow2_header *h, char *err,
                           size_t errlen)
{
    /* QEMU's limit of 65536 snapshots bounds the table walk later. */
    if (h->nb_snapshots > QCOW2_MAX_SNAPSHOTS)
        return fail(err, errlen, -EFBIG, "too many snapshots: %u",
                    h->nb_snapshots);
    /* Spec: snapshots_offset "Must be aligned to a cluster boundary". */
    if (h->snapshots_offset & (h->cluster_size - 1))
        return fail(err, errlen, -EINVAL,
                    "snapshot table offset 0x%llx not cluster-aligned",
                    (unsigned long long)h->snapshots_offset);
    if (h->nb_snapshots == 0)
        return 0;
    if (h->snapshots_offset == 0)
        return fail(err, errlen, -EINVAL,
                    "snapshot table overlaps the header");
    /* Entries have a variable length of at least 40 bytes. */
    if (h->snapshots_offset >= h->file_size ||
        !range_in_file(h, h->snapshots_offset,
                       (uint64_t)h->nb_snapshots * SNAPSHOT_ENTRY_MIN))
        return fail(err, errlen, -EINVAL,
                    "snapshot table at 0x%llx past the end of the file",
                    (unsigned long long)h->snapshots_offset);
    return 0;
}

static int check_backing(const struct qcow2_header *h, char *err,
                         size_t errlen)
{
    if (h->backing_file_offset == 0)
        return 0;
    /* Spec, backing_file_size: "Must not be longer than 1023 bytes"; the
     * name lives in the first cluster, after the header and the
     * extensions ("Header extensions"). */
    if (h->backing_file_size > QCOW2_MAX_BACKING_NAME)
        return fail(err, errlen, -EINVAL,
                    "backing file name too long: %u bytes (over 1023)",
                    h->backing_file_size);
    if (h->backing_file_size == 0)
        return fail(err, errlen, -EINVAL, "empty backing file name");
    if (h->backing_file_offset < h->header_length)
        return fail(err, errlen, -EINVAL,
                    "backing file name overlaps the header");
    if (h->backing_file_offset > h->cluster_size ||
        h->backing_file_size > h->cluster_size - h->backing_file_offset)
        return fail(err, errlen, -EINVAL,
                    "backing file name outside the first cluster");
    return 0;
}

int qcow2_header_parse(const void *buf, size_t len, uint64_t file_size,
                       struct qcow2_header *h, char *err, size_t errlen)
{
    const uint8_t *b = buf;
    struct qcow2_header t;
    int ret;

    memset(&t, 0, sizeof(t));
    if (len < QCOW2_V2_HEADER_LENGTH)
        return fail(err, errlen, -EINVAL,
                    "truncated header: %zu bytes, at least %u needed",
                    len, QCOW2_V2_HEADER_LENGTH);
    read_fields(b, &t);
    t.file_size = file_size;

    if (t.magic != QCOW2_MAGIC)
        return fail(err, errlen, -EINVAL, "not a qcow2 image (bad magic)");
    /* Spec: "Version number (valid values are 2 and 3)". */
    if (t.version != 2 && t.version != 3)
        return fail(err, errlen, -ENOTSUP,
                    "qcow2 version %u is not supported", t.version);
    /* Spec: cluster_bits "Must not be less than 9"; QEMU cannot open
     * clusters over 2 MB. */
    if (t.cluster_bits < QCOW2_MIN_CLUSTER_BITS ||
        t.cluster_bits > QCOW2_MAX_CLUSTER_BITS)
        return fail(err, errlen, -EINVAL,
                    "invalid cluster_bits %u (must be 9..21)",
                    t.cluster_bits);
    t.cluster_size = UINT32_C(1) << t.cluster_bits;

    ret = parse_version_fields(b, len, &t, err, errlen);
    if (ret < 0)
        return ret;

    /* Spec, crypt_method: 0 none, 1 AES, 2 LUKS. */
    if (t.crypt_method == QCOW2_CRYPT_AES || t.crypt_method == QCOW2_CRYPT_LUKS)
        return fail(err, errlen, -ENOTSUP,
                    "encrypted images are not supported (%s)",
                    t.crypt_method == QCOW2_CRYPT_AES ? "AES" : "LUKS");
    if (t.crypt_method != QCOW2_CRYPT_NONE)
        return fail(err, errlen, -EINVAL, "invalid crypt_method %u",
                    t.crypt_method);

    ret = check_feature_fields(&t, err, errlen);
    if (ret < 0)
        return ret;
    derive(&t);

    ret = check_l1(&t, err, errlen);
    if (ret == 0)
        ret = check_refcount_table(&t, err, errlen);
    if (ret == 0)
        ret = check_snapshots(&t, err, errlen);
    if (ret == 0)
        ret = check_backing(&t, err, errlen);
    if (ret < 0)
        return ret;

    *h = t;
    return 0;
}

size_t qcow2_header_serialized_size(const struct qcow2_header *h)
{
    if (h->version == 2)
        return QCOW2_V2_HEADER_LENGTH;
    return h->header_length > QCOW2_COMPRESSION_TYPE_OFFSET ?
           QCOW2_COMPRESSION_TYPE_OFFSET + 1 : QCOW2_V3_HEADER_LENGTH;
}

size_t qcow2_header_serialize(const struct qcow2_header *h, void *buf,
                              size_t cap)
{
    size_t n = qcow2_header_serialized_size(h);
    uint8_t *b = buf;

    if (cap < n)
        return 0;
    be_put32(b + OFF_MAGIC, h->magic);
    be_put32(b + OFF_VERSION, h->version);
    be_put64(b + OFF_BACKING_FILE_OFFSET, h->backing_file_offset);
    be_put32(b + OFF_BACKING_FILE_SIZE, h->backing_file_size);
    be_put32(b + OFF_CLUSTER_BITS, h->cluster_bits);
    be_put64(b + OFF_SIZE, h->size);
    be_put32(b + OFF_CRYPT_METHOD, h->crypt_method);
    be_put32(b + OFF_L1_SIZE, h->l1_size);
    be_put64(b + OFF_L1_TABLE_OFFSET, h->l1_table_offset);
    be_put64(b + OFF_REFCOUNT_TABLE_OFFSET, h->refcount_table_offset);
    be_put32(b + OFF_REFCOUNT_TABLE_CLUSTERS, h->refcount_table_clusters);
    be_put32(b + OFF_NB_SNAPSHOTS, h->nb_snapshots);
    be_put64(b + OFF_SNAPSHOTS_OFFSET, h->snapshots_offset);
    if (h->version == 2) {
        /* A version 2 header has no room for these (spec, "Header"). */
        assert(h->incompatible_features == 0);
        assert(h->compatible_features == 0);
        assert(h->autoclear_features == 0);
        assert(h->refcount_order == 4);
        assert(h->compression_type == 0);
        return n;
    }
    be_put64(b + OFF_INCOMPATIBLE_FEATURES, h->incompatible_features);
    be_put64(b + OFF_COMPATIBLE_FEATURES, h->compatible_features);
    be_put64(b + OFF_AUTOCLEAR_FEATURES, h->autoclear_features);
    be_put32(b + OFF_REFCOUNT_ORDER, h->refcount_order);
    be_put32(b + OFF_HEADER_LENGTH, h->header_length);
    if (n > QCOW2_COMPRESSION_TYPE_OFFSET)
        b[QCOW2_COMPRESSION_TYPE_OFFSET] = h->compression_type;
    else
        assert(h->compression_type == 0);
    return n;
}

uint64_t qcow2_autoclear_known_mask(void)
{
    return QCOW2_AUTOCLEAR_BITMAPS | QCOW2_AUTOCLEAR_DATA_FILE_RAW;
}

/* ======================= extensions ======================= */

/* Bits for "seen once" of the known extension types. */
enum {
    SEEN_BACKING_FORMAT = 1u << 0,
    SEEN_FEATURE_TABLE  = 1u << 1,
    SEEN_BITMAPS        = 1u << 2,
    SEEN_CRYPTO_HEADER  = 1u << 3,
    SEEN_DATA_FILE      = 1u << 4,
};

static unsigned seen_bit(uint32_t type)
{
    switch (type) {
    case QCOW2_EXT_BACKING_FORMAT: return SEEN_BACKING_FORMAT;
    case QCOW2_EXT_FEATURE_TABLE:  return SEEN_FEATURE_TABLE;
    case QCOW2_EXT_BITMAPS:        return SEEN_BITMAPS;
    case QCOW2_EXT_CRYPTO_HEADER:  return SEEN_CRYPTO_HEADER;
    case QCOW2_EXT_DATA_FILE:      return SEEN_DATA_FILE;
    default:                       return 0;
    }
}

static int ext_backing_format(const uint8_t *d, uint32_t n,
                              struct qcow2_extensions *ext, char *err,
                              size_t errlen)
{
    /* Spec, "String header extensions": the length is the string length,
     * no NUL.  A format name is a short word ("raw", "qcow2"). */
    if (n == 0 || n > QCOW2_MAX_FORMAT_NAME)
        return fail(err, errlen, -EINVAL,
                    "backing format name of %u bytes (must be 1..%u)",
                    n, QCOW2_MAX_FORMAT_NAME);
    for (uint32_t i = 0; i < n; i++) {
        if (d[i] < 0x21 || d[i] > 0x7e)
            return fail(err, errlen, -EINVAL,
                        "backing format name not printable");
    }
    memcpy(ext->backing_format, d, n);
    ext->backing_format[n] = '\0';
    ext->has_backing_format = true;
    return 0;
}

static int ext_bitmaps(const uint8_t *d, uint32_t n,
                       const struct qcow2_header *h,
                       struct qcow2_extensions *ext, char *err,
                       size_t errlen)
{
    uint32_t reserved;

    if (n != BITMAPS_EXT_SIZE)
        return fail(err, errlen, -EINVAL,
                    "bitmaps extension of %u bytes, not %u", n,
                    BITMAPS_EXT_SIZE);
    ext->has_bitmaps = true;
    ext->nb_bitmaps = be_get32(d);
    reserved = be_get32(d + 4);
    ext->bitmap_directory_size = be_get64(d + 8);
    ext->bitmap_directory_offset = be_get64(d + 16);

    /* Spec, autoclear bit 0: without it "the bitmaps extension data must
     * be considered inconsistent" -- it is not used, so not checked. */
    if (!(h->autoclear_features & QCOW2_AUTOCLEAR_BITMAPS))
        return 0;
    ext->bitmaps_consistent = true;

    if (reserved)
        return fail(err, errlen, -EINVAL,
                    "bitmaps extension reserved field not zero");
    /* Spec: nb_bitmaps "Must be greater than or equal to 1"; QEMU
     * supports up to 65535. */
    if (ext->nb_bitmaps == 0 || ext->nb_bitmaps > QCOW2_MAX_BITMAPS)
        return fail(err, errlen, -EINVAL,
                    "bitmaps extension with %u bitmaps (must be 1..%u)",
                    ext->nb_bitmaps, QCOW2_MAX_BITMAPS);
    /* Every directory entry is at least 32 bytes (24 fixed, a non-empty
     * name, padding to 8). */
    if (ext->bitmap_directory_size <
            (uint64_t)ext->nb_bitmaps * BITMAP_DIR_ENTRY_MIN ||
        ext->bitmap_directory_size > QCOW2_MAX_BITMAP_DIR_BYTES)
        return fail(err, errlen, -EINVAL,
                    "bitmap directory size %llu invalid for %u bitmaps",
                    (unsigned long long)ext->bitmap_directory_size,
                    ext->nb_bitmaps);
    /* Spec: bitmap_directory_offset "Must be aligned to a cluster
     * boundary". */
    if (ext->bitmap_directory_offset & (h->cluster_size - 1) ||
        ext->bitmap_directory_offset == 0)
        return fail(err, errlen, -EINVAL,
                    "bitmap directory offset 0x%llx invalid",
                    (unsigned long long)ext->bitmap_directory_offset);
    if (!range_in_file(h, ext->bitmap_directory_offset,
                       ext->bitmap_directory_size))
        return fail(err, errlen, -EINVAL,
                    "bitmap directory past the end of the file");
    return 0;
}

static int parse_one_ext(uint32_t type, const uint8_t *d, uint32_t n,
                         uint32_t offset, const struct qcow2_header *h,
                         struct qcow2_extensions *ext, char *err,
                         size_t errlen)
{
    switch (type) {
    case QCOW2_EXT_BACKING_FORMAT:
        return ext_backing_format(d, n, ext, err, errlen);

    case QCOW2_EXT_FEATURE_TABLE:
        /* Spec, "Feature name table": the number of entries "is determined
         * by the length"; a partial trailing entry is ignored. */
        ext->feature_table = d;
        ext->n_features = n / QCOW2_FEATURE_ENTRY_SIZE;
        return 0;

    case QCOW2_EXT_BITMAPS:
        return ext_bitmaps(d, n, h, ext, err, errlen);

    case QCOW2_EXT_CRYPTO_HEADER:
        /* Spec, "Full disk encryption header pointer": offset, length. */
        if (n != CRYPTO_EXT_SIZE)
            return fail(err, errlen, -EINVAL,
                        "encryption header pointer of %u bytes, not %u",
                        n, CRYPTO_EXT_SIZE);
        ext->has_crypto_header = true;
        ext->crypto_header_offset = be_get64(d);
        ext->crypto_header_length = be_get64(d + 8);
        return 0;

    case QCOW2_EXT_DATA_FILE:
        if (memchr(d, '\0', n))
            return fail(err, errlen, -EINVAL,
                        "external data file name contains a NUL byte");
        ext->data_file = (const char *)d;
        ext->data_file_len = n;
        return 0;

    default:
        /* Spec: "Unknown header extension, can be safely ignored" -- but
         * kept, so a writer can preserve it. */
        if (ext->n_unknown < QCOW2_MAX_UNKNOWN_EXT) {
            ext->unknown[ext->n_unknown].type = type;
            ext->unknown[ext->n_unknown].offset = offset;
            ext->unknown[ext->n_unknown].length = n;
        }
        ext->n_unknown++;
        return 0;
    }
}

static int parse_backing_name(const uint8_t *b, const struct qcow2_header *h,
                              struct qcow2_extensions *ext, char *err,
                              size_t errlen)
{
    const uint8_t *name = b + h->backing_file_offset;
    uint32_t n = h->backing_file_size;

    /* Spec, backing_file_offset: "The string is not null terminated" --
     * and a NUL inside it cannot name a file. */
    if (memchr(name, '\0', n))
        return fail(err, errlen, -EINVAL,
                    "backing file name contains a NUL byte");
    memcpy(ext->backing_file, name, n);
    ext->backing_file[n] = '\0';
    ext->backing_file_len = n;
    ext->has_backing_file = true;
    return 0;
}

int qcow2_header_parse_extensions(const void *cluster0, size_t len,
                                  const struct qcow2_header *h,
                                  struct qcow2_extensions *ext,
                                  char *err, size_t errlen)
{
    const uint8_t *b = cluster0;
    uint64_t off, limit;
    unsigned seen = 0;
    bool ended = false;
    int ret;

    memset(ext, 0, sizeof(*ext));
    if (len < h->cluster_size)
        return fail(err, errlen, -EINVAL,
                    "first cluster truncated: %zu of %u bytes", len,
                    h->cluster_size);
    /* qcow2_header_parse() checked that the name lies in the first
     * cluster, after the header. */
    assert(h->header_length <= h->cluster_size);
    assert(h->backing_file_offset == 0 ||
           (h->backing_file_offset >= h->header_length &&
            h->backing_file_offset + h->backing_file_size <= h->cluster_size));

    /* Spec, "Header extensions": they follow the header; the backing file
     * name, if any, is stored after them in the first cluster. */
    limit = h->backing_file_offset ? h->backing_file_offset : h->cluster_size;
    ext->start = h->header_length;
    ext->limit = (uint32_t)limit;

    /* The padding of the last extension may run past a backing file name
     * that is not 8-aligned: off can pass limit, so test both. */
    off = h->header_length;
    while (off < limit && limit - off >= EXT_HEADER_SIZE) {
        uint32_t type = be_get32(b + off);
        uint32_t n = be_get32(b + off + 4);
        unsigned bit = seen_bit(type);

        if (type == QCOW2_EXT_END) {
            ended = true;
            break;
        }
        if (n > limit - off - EXT_HEADER_SIZE)
            return fail(err, errlen, -EINVAL,
                        "header extension 0x%08x of %u bytes runs %s", type,
                        n, h->backing_file_offset ? "into the backing file name"
                                                  : "past the first cluster");
        /* Spec: "each header extension type shall appear at most once". */
        if (bit & seen)
            return fail(err, errlen, -EINVAL,
                        "header extension 0x%08x appears twice", type);
        seen |= bit;
        ret = parse_one_ext(type, b + off + EXT_HEADER_SIZE, n,
                            (uint32_t)off, h, ext, err, errlen);
        if (ret < 0)
            return ret;
        /* "Padding to round up the header extension size to the next
         * multiple of 8"; the padding of the last one may be cut short. */
        off += EXT_HEADER_SIZE + round_up(n, 8);
    }
    ext->end = (uint32_t)(ended || off < limit ? off : limit);

    /* Spec, autoclear bit 0: "It is an error if this bit is set without
     * the bitmaps extension present." */
    if ((h->autoclear_features & QCOW2_AUTOCLEAR_BITMAPS) && !ext->has_bitmaps)
        return fail(err, errlen, -EINVAL,
                    "bitmaps autoclear bit set without a bitmaps extension");

    if (h->backing_file_offset)
        return parse_backing_name(b, h, ext, err, errlen);
    return 0;
}

const char *qcow2_feature_name(const struct qcow2_extensions *ext,
                               unsigned type, unsigned bit, size_t *name_len)
{
    if (!ext || !ext->feature_table)
        return NULL;
    for (uint32_t i = 0; i < ext->n_features; i++) {
        const uint8_t *e = ext->feature_table + i * QCOW2_FEATURE_ENTRY_SIZE;
        const char *name = (const char *)(e + 2);
        size_t n;

        if (e[0] != type || e[1] != bit)
            continue;
        n = strnlen(name, QCOW2_FEATURE_NAME_SIZE);
        if (n == 0)
            continue;
        *name_len = n;
        return name;
    }
    return NULL;
}

int qcow2_header_check_features(const struct qcow2_header *h,
                                const struct qcow2_extensions *ext,
                                bool read_only, char *err, size_t errlen)
{
    uint64_t unknown = h->incompatible_features & ~QCOW2_INCOMPAT_KNOWN;

    /* Spec, incompatible_features: "An implementation must fail to open an
     * image if an unknown bit is set"; the feature name table exists to
     * "display a useful error message". */
    if (unknown) {
        unsigned bit = (unsigned)__builtin_ctzll(unknown);
        size_t n = 0;
        const char *name = qcow2_feature_name(ext, QCOW2_FEATURE_INCOMPAT,
                                              bit, &n);
        char clean[QCOW2_FEATURE_NAME_SIZE + 1];

        if (!name)
            return fail(err, errlen, -ENOTSUP,
                        "unknown incompatible feature bit %u", bit);
        /* The name comes from the image: keep only printable bytes. */
        for (size_t i = 0; i < n; i++)
            clean[i] = name[i] >= 0x20 && name[i] < 0x7f ? name[i] : '?';
        clean[n] = '\0';
        return fail(err, errlen, -ENOTSUP,
                    "unsupported incompatible feature '%s' (bit %u)",
                    clean, bit);
    }

    /* Spec, bit 1: "the image must not be written to (unless for regaining
     * consistency)". */
    if (h->corrupt && !read_only)
        return fail(err, errlen, -EACCES,
                    "image is marked corrupt: open read-only");
    return 0;
}

/* ======================= L1 / L2 entries ======================= */

int qcow2_l1_entry_decode(const struct qcow2_header *h, uint64_t entry,
                          struct qcow2_l1_entry *out)
{
    /* Spec, "L1 table entry": bits 9-55 offset, 63 COPIED, rest reserved. */
    out->l2_offset = entry & QCOW2_L1E_OFFSET_MASK;
    out->copied = entry & QCOW2_OFLAG_COPIED;
    out->reserved_set = entry & QCOW2_L1E_RESERVED_MASK;
    /* "Must be aligned to a cluster boundary." */
    if (out->l2_offset & (h->cluster_size - 1))
        return -EINVAL;
    return 0;
}

static int decode_compressed(const struct qcow2_header *h, uint64_t entry,
                             uint64_t bitmap, struct qcow2_l2_entry *out)
{
    unsigned x = qcow2_csize_shift(h->cluster_bits);
    uint64_t sectors_mask = (UINT64_C(1) << (h->cluster_bits - 8)) - 1;

    /* Spec, "Compressed Clusters Descriptor": bits 0..x-1 host offset,
     * x..61 "Number of additional 512-byte sectors". */
    out->type = QCOW2_CLUSTER_COMPRESSED;
    out->host_offset = entry & ((UINT64_C(1) << x) - 1);
    out->nb_sectors = (uint32_t)((entry >> x) & sectors_mask) + 1;
    out->compressed_len = out->nb_sectors * 512 -
                          (uint32_t)(out->host_offset & 511);
    /* Bit 63 is 0 for compressed clusters; the extended L2 bitmap is
     * reserved for them. */
    out->reserved_set = out->copied || (h->extended_l2 && bitmap);
    /* "If cluster_bits is small enough that this field includes bits
     * beyond 55, those upper bits must be set to 0." */
    if (out->host_offset >> 56)
        return -EINVAL;
    return 0;
}

int qcow2_l2_entry_decode(const struct qcow2_header *h, uint64_t entry,
                          uint64_t bitmap, struct qcow2_l2_entry *out)
{
    bool zero = false;
    bool allocated;

    memset(out, 0, sizeof(*out));
    out->copied = entry & QCOW2_OFLAG_COPIED;
    if (entry & QCOW2_OFLAG_COMPRESSED)
        return decode_compressed(h, entry, bitmap, out);

    /* Spec, "Standard Cluster Descriptor". */
    out->host_offset = entry & QCOW2_L2E_OFFSET_MASK;
    out->reserved_set = entry & QCOW2_L2E_STD_RESERVED_MASK;
    /* Bit 0: "With version 2 or with extended L2 entries, this is always
     * 0" -- reserved there. */
    if (h->version >= 3 && !h->extended_l2)
        zero = entry & QCOW2_OFLAG_ZERO;
    else if (entry & QCOW2_OFLAG_ZERO)
        out->reserved_set = true;
    if (out->host_offset & (h->cluster_size - 1))
        return -EINVAL;             /* "Must be aligned to a cluster" */

    /* "If the offset is 0 and bit 63 is clear, the cluster is unallocated.
     * The offset may only be 0 with bit 63 set ... when an external data
     * file is used." */
    allocated = out->host_offset != 0;
    if (!allocated && out->copied) {
        if (!h->external_data_file)
            return -EINVAL;
        allocated = true;
    }

    if (h->extended_l2) {
        /* Spec, "Subcluster Allocation Bitmap": bits 0-31 allocated,
         * 32-63 reads as zeros; "the allocation status bit must be unset"
         * for a zero subcluster, and allocated subclusters need a host
         * cluster. */
        out->alloc_bitmap = (uint32_t)bitmap;
        out->zero_bitmap = (uint32_t)(bitmap >> 32);
        if (out->alloc_bitmap & out->zero_bitmap)
            return -EINVAL;
        if (out->alloc_bitmap && !allocated)
            return -EINVAL;
        out->type = allocated ? QCOW2_CLUSTER_NORMAL
                              : QCOW2_CLUSTER_UNALLOCATED;
        return 0;
    }

    if (zero)
        out->type = allocated ? QCOW2_CLUSTER_ZERO_ALLOC
                              : QCOW2_CLUSTER_ZERO_PLAIN;
    else
        out->type = allocated ? QCOW2_CLUSTER_NORMAL
                              : QCOW2_CLUSTER_UNALLOCATED;
    return 0;
}

enum qcow2_cluster_type qcow2_subcluster_type(const struct qcow2_header *h,
                                              const struct qcow2_l2_entry *e,
                                              unsigned sc)
{
    bool host = e->type == QCOW2_CLUSTER_NORMAL;

    if (!h->extended_l2 || e->type == QCOW2_CLUSTER_COMPRESSED)
        return e->type;
    assert(sc < QCOW2_SUBCLUSTERS);
    /* "Bits are assigned starting from the least significant one". */
    if (e->alloc_bitmap & (UINT32_C(1) << sc))
        return QCOW2_CLUSTER_NORMAL;
    if (e->zero_bitmap & (UINT32_C(1) << sc))
        return host ? QCOW2_CLUSTER_ZERO_ALLOC : QCOW2_CLUSTER_ZERO_PLAIN;
    return host ? QCOW2_CLUSTER_UNALLOCATED_ALLOC : QCOW2_CLUSTER_UNALLOCATED;
}

uint64_t qcow2_l2_entry_compressed(unsigned cluster_bits, uint64_t host_offset,
                                   uint32_t nb_sectors)
{
    unsigned x = qcow2_csize_shift(cluster_bits);

    assert(cluster_bits >= QCOW2_MIN_CLUSTER_BITS &&
           cluster_bits <= QCOW2_MAX_CLUSTER_BITS);
    assert(host_offset < (UINT64_C(1) << x) && !(host_offset >> 56));
    assert(nb_sectors >= 1 &&
           nb_sectors - 1 < (UINT64_C(1) << (cluster_bits - 8)));
    return QCOW2_OFLAG_COMPRESSED | ((uint64_t)(nb_sectors - 1) << x) |
           host_offset;
}

/* ======================= refcounts ======================= */

uint64_t qcow2_refcount_max(unsigned refcount_order)
{
    assert(refcount_order <= MAX_REFCOUNT_ORDER);
    if (refcount_order == MAX_REFCOUNT_ORDER)
        return UINT64_MAX;
    return (UINT64_C(1) << (1u << refcount_order)) - 1;
}

/* Spec, "Refcount block entry": "If refcount_bits implies a sub-byte
 * width, note that bit 0 means the least significant bit" -- entry i of a
 * 1-, 2- or 4-bit block sits in byte i / (8 / bits), starting at bit
 * (i % (8 / bits)) * bits.  Wider entries are big-endian integers. */
uint64_t qcow2_refcount_get(const void *block, unsigned refcount_order,
                            uint64_t index)
{
    const uint8_t *b = block;

    switch (refcount_order) {
    case 0:
    case 1:
    case 2: {
        unsigned bits = 1u << refcount_order;
        unsigned shift = (unsigned)(index & ((8u >> refcount_order) - 1)) *
                         bits;

        return (b[index >> (3 - refcount_order)] >> shift) &
               ((1u << bits) - 1);
    }
    case 3:
        return b[index];
    case 4:
        return be_get16(b + index * 2);
    case 5:
        return be_get32(b + index * 4);
    case 6:
        return be_get64(b + index * 8);
    default:
        assert(!"refcount_order over 6");
        return 0;
    }
}

void qcow2_refcount_set(void *block, unsigned refcount_order, uint64_t index,
                        uint64_t value)
{
    uint8_t *b = block;

    assert(value <= qcow2_refcount_max(refcount_order));
    switch (refcount_order) {
    case 0:
    case 1:
    case 2: {
        unsigned bits = 1u << refcount_order;
        unsigned shift = (unsigned)(index & ((8u >> refcount_order) - 1)) *
                         bits;
        unsigned mask = ((1u << bits) - 1) << shift;
        uint8_t *p = &b[index >> (3 - refcount_order)];

        *p = (uint8_t)((*p & ~mask) | ((unsigned)value << shift));
        break;
    }
    case 3:
        b[index] = (uint8_t)value;
        break;
    case 4:
        be_put16(b + index * 2, (uint16_t)value);
        break;
    case 5:
        be_put32(b + index * 4, (uint32_t)value);
        break;
    case 6:
        be_put64(b + index * 8, value);
        break;
    default:
        assert(!"refcount_order over 6");
    }
}

int qcow2_bitmap_entry_parse(const uint8_t *dir, uint64_t size, uint64_t pos,
                             struct qcow2_bitmap_entry *e)
{
    if (pos > size || size - pos < QCOW2_BITMAP_ENTRY_MIN)
        return -EINVAL;
    const uint8_t *p = dir + pos;
    e->table_offset = be_get64(p);
    e->table_size = be_get32(p + 8);
    e->flags = be_get32(p + QCOW2_BITMAP_FLAGS_OFFSET);
    uint16_t name_size = be_get16(p + 18);
    uint32_t extra = be_get32(p + 20);
    e->size = (QCOW2_BITMAP_ENTRY_MIN + (uint64_t)extra + name_size + 7) &
              ~UINT64_C(7);
    if (e->size > size - pos ||
        (uint64_t)e->table_size * 8 > QCOW2_MAX_BITMAP_TABLE_BYTES)
        return -EINVAL;
    return 0;
}
