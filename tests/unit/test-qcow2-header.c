/* strata — unit tests for the qcow2 header layer (formats/qcow2-header.c).
 *
 * Three sources of input:
 *  - real images made by qemu-img in a temporary directory, every parsed
 *    field checked against what the test asked for and against
 *    `qemu-img info --output=json` (skipped when qemu-img is missing);
 *  - a synthetic header built by hand from the spec, patched field by field
 *    into a corpus of hostile headers, each refused with a given errno and
 *    a message containing a given phrase;
 *  - L1/L2 entries and refcount blocks computed by hand from the spec.
 * Parsers are always given an exactly-sized heap copy of their input, so
 * that an over-read is caught by AddressSanitizer.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "byteorder.h"
#include "qcow2-header.h"

#define KiB (UINT64_C(1) << 10)
#define MiB (UINT64_C(1) << 20)
#define GiB (UINT64_C(1) << 30)

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* ---- helpers ---- */

/* An exactly-sized heap copy: reading one byte past it trips ASan. */
static uint8_t *dup_exact(const void *p, size_t n)
{
    uint8_t *b = malloc(n ? n : 1);

    assert_non_null(b);
    if (n)
        memcpy(b, p, n);
    return b;
}

static void assert_header_equal(const struct qcow2_header *a,
                                const struct qcow2_header *b)
{
#define EQ(f) assert_int_equal(a->f, b->f)
    EQ(magic); EQ(version); EQ(backing_file_offset); EQ(backing_file_size);
    EQ(cluster_bits); EQ(size); EQ(crypt_method); EQ(l1_size);
    EQ(l1_table_offset); EQ(refcount_table_offset);
    EQ(refcount_table_clusters); EQ(nb_snapshots); EQ(snapshots_offset);
    EQ(incompatible_features); EQ(compatible_features);
    EQ(autoclear_features); EQ(refcount_order); EQ(header_length);
    EQ(compression_type); EQ(file_size); EQ(cluster_size); EQ(extended_l2);
    EQ(l2_entry_size); EQ(l2_bits); EQ(l2_entries); EQ(l1_size_min);
    EQ(refcount_bits); EQ(refcount_block_bits); EQ(subcluster_bits);
    EQ(subcluster_size); EQ(dirty); EQ(corrupt); EQ(external_data_file);
    EQ(lazy_refcounts);
#undef EQ
}

/* ======================= synthetic header ======================= */

/* A valid v3 image, written down from the spec: 64 KiB clusters, 1 GiB
 * virtual size (L1: 1 GiB / (64 KiB * 8192) = 2 entries), refcount table
 * at cluster 1 (one cluster), a refcount block at cluster 2, the L1 table
 * at cluster 3; header_length 112 (compression_type byte + padding); the
 * end-of-extensions marker right after it.  File: 4 clusters. */
#define SYN_CLUSTER     (64 * KiB)
#define SYN_FILE_SIZE   (4 * SYN_CLUSTER)
#define SYN_L1_OFFSET   (3 * SYN_CLUSTER)
#define SYN_RT_OFFSET   (1 * SYN_CLUSTER)
#define SYN_HDR_LEN     112

static uint8_t *make_header(void)
{
    uint8_t *b = calloc(1, SYN_CLUSTER);

    assert_non_null(b);
    be_put32(b + 0, 0x514649fb);           /* "QFI\xfb" */
    be_put32(b + 4, 3);                    /* version */
    be_put64(b + 8, 0);                    /* backing_file_offset */
    be_put32(b + 16, 0);                   /* backing_file_size */
    be_put32(b + 20, 16);                  /* cluster_bits */
    be_put64(b + 24, GiB);                 /* size */
    be_put32(b + 32, 0);                   /* crypt_method */
    be_put32(b + 36, 2);                   /* l1_size */
    be_put64(b + 40, SYN_L1_OFFSET);
    be_put64(b + 48, SYN_RT_OFFSET);
    be_put32(b + 56, 1);                   /* refcount_table_clusters */
    be_put32(b + 60, 0);                   /* nb_snapshots */
    be_put64(b + 64, 0);                   /* snapshots_offset */
    be_put64(b + 72, 0);                   /* incompatible */
    be_put64(b + 80, 0);                   /* compatible */
    be_put64(b + 88, 0);                   /* autoclear */
    be_put32(b + 96, 4);                   /* refcount_order */
    be_put32(b + 100, SYN_HDR_LEN);        /* header_length */
    b[104] = 0;                         /* compression_type: zlib */
    /* End of extensions at 112: already zero. */
    return b;
}

/* Parses (exact copy of len bytes), walks extensions, checks features.
 * The copy is kept in *copyp (ext points into it); the caller frees it. */
enum stage { PARSE, EXTENSIONS, FEATURES };

static int open_image(const uint8_t *c0, size_t len, uint64_t file_size,
                      bool read_only, struct qcow2_header *h,
                      struct qcow2_extensions *ext, enum stage *failed_at,
                      uint8_t **copyp, char *err, size_t errlen)
{
    uint8_t *copy;
    int ret;

    free(*copyp);
    copy = *copyp = dup_exact(c0, len);

    err[0] = '\0';
    *failed_at = PARSE;
    ret = qcow2_header_parse(copy, len, file_size, h, err, errlen);
    if (ret == 0) {
        *failed_at = EXTENSIONS;
        ret = qcow2_header_parse_extensions(copy, len, h, ext, err, errlen);
    }
    if (ret == 0) {
        *failed_at = FEATURES;
        ret = qcow2_header_check_features(h, ext, read_only, err, errlen);
    }
    return ret;
}

static void test_synthetic_valid(void **state)
{
    uint8_t *b = make_header();
    struct qcow2_header h;
    struct qcow2_extensions ext;
    enum stage st;
    uint8_t *keep = NULL;
    char err[128];

    (void)state;
    assert_int_equal(open_image(b, SYN_CLUSTER, SYN_FILE_SIZE, false, &h,
                                &ext, &st, &keep, err, sizeof(err)), 0);
    assert_int_equal(h.magic, 0x514649fb);
    assert_int_equal(h.version, 3);
    assert_int_equal(h.cluster_bits, 16);
    assert_int_equal(h.cluster_size, 65536);
    assert_int_equal(h.size, GiB);
    assert_int_equal(h.l1_size, 2);
    assert_int_equal(h.l1_size_min, 2);
    assert_int_equal(h.l1_table_offset, SYN_L1_OFFSET);
    assert_int_equal(h.refcount_table_offset, SYN_RT_OFFSET);
    assert_int_equal(h.refcount_table_clusters, 1);
    assert_int_equal(h.refcount_order, 4);
    assert_int_equal(h.refcount_bits, 16);
    /* 65536 * 8 / 16 = 32768 = 2^15 refcounts per block. */
    assert_int_equal(h.refcount_block_bits, 15);
    assert_int_equal(h.header_length, 112);
    assert_int_equal(h.compression_type, 0);
    assert_int_equal(h.l2_entry_size, 8);
    assert_int_equal(h.l2_bits, 13);
    assert_int_equal(h.l2_entries, 8192);
    assert_int_equal(h.subcluster_bits, 16);
    assert_int_equal(h.subcluster_size, 65536);
    assert_false(h.extended_l2);
    assert_false(h.dirty);
    assert_false(h.corrupt);
    assert_false(h.lazy_refcounts);
    assert_int_equal(h.file_size, SYN_FILE_SIZE);

    assert_int_equal(ext.start, 112);
    assert_int_equal(ext.end, 112);
    assert_int_equal(ext.limit, 65536);
    assert_false(ext.has_backing_file);
    assert_false(ext.has_backing_format);
    assert_null(ext.feature_table);
    assert_int_equal(ext.n_unknown, 0);

    /* Index helpers (spec, "Cluster mapping", "Host cluster management"):
     * guest offset 600 MiB -> L1 index 1 (512 MiB per L2 table), L2 index
     * (600 MiB - 512 MiB) / 64 KiB = 1408. */
    assert_int_equal(qcow2_l1_index(&h, 600 * MiB), 1);
    assert_int_equal(qcow2_l2_index(&h, 600 * MiB), 1408);
    /* Host offset 3 GiB -> cluster 49152 -> table 1, block 16384. */
    assert_int_equal(qcow2_refcount_table_index(&h, 3 * GiB), 1);
    assert_int_equal(qcow2_refcount_block_index(&h, 3 * GiB), 16384);
    free(b);
    free(keep);
}

/* A version 2 header ends at byte 72: what follows is extension area, never
 * features, whatever bytes are there. */
static void test_synthetic_v2(void **state)
{
    uint8_t *b = make_header();
    struct qcow2_header h;
    struct qcow2_extensions ext;
    enum stage st;
    uint8_t *keep = NULL;
    char err[128];
    uint8_t out[128];

    (void)state;
    be_put32(b + 4, 2);
    memset(b + 72, 0, 40);              /* end marker at 72 */
    assert_int_equal(open_image(b, SYN_CLUSTER, SYN_FILE_SIZE, false, &h,
                                &ext, &st, &keep, err, sizeof(err)), 0);
    assert_int_equal(h.version, 2);
    assert_int_equal(h.header_length, 72);
    assert_int_equal(h.refcount_order, 4);
    assert_int_equal(h.incompatible_features, 0);
    assert_int_equal(ext.start, 72);
    assert_int_equal(ext.end, 72);

    /* Parse needs only 72 bytes for v2. */
    {
        uint8_t *c = dup_exact(b, 72);

        assert_int_equal(qcow2_header_parse(c, 72, SYN_FILE_SIZE, &h, err,
                                            sizeof(err)), 0);
        free(c);
    }
    assert_int_equal(qcow2_header_serialized_size(&h), 72);
    memset(out, 0xaa, sizeof(out));
    assert_int_equal(qcow2_header_serialize(&h, out, sizeof(out)), 72);
    assert_memory_equal(out, b, 72);
    assert_int_equal(out[72], 0xaa);
    free(b);
    free(keep);
}

/* ---- hostile headers ---- */

struct patch {
    uint16_t off;
    uint8_t width;          /* 1, 4 or 8; 0 = unused */
    uint64_t value;
};

struct hostile {
    const char *what;
    struct patch p[4];
    size_t len;             /* 0: the whole cluster; LEN_EMPTY: 0 bytes */
    uint64_t file_size;     /* 0: SYN_FILE_SIZE */
    bool read_only;
    enum stage stage;
    int ret;
    const char *phrase;
};

#define LEN_EMPTY SIZE_MAX

#define P1(o, w, v) { { (o), (w), (v) } }
#define P2(o1, w1, v1, o2, w2, v2) { { (o1), (w1), (v1) }, { (o2), (w2), (v2) } }
#define P3(o1, w1, v1, o2, w2, v2, o3, w3, v3) \
    { { (o1), (w1), (v1) }, { (o2), (w2), (v2) }, { (o3), (w3), (v3) } }
#define P4(o1, w1, v1, o2, w2, v2, o3, w3, v3, o4, w4, v4) \
    { { (o1), (w1), (v1) }, { (o2), (w2), (v2) }, { (o3), (w3), (v3) }, \
      { (o4), (w4), (v4) } }

static const struct hostile hostile[] = {
    { "bad magic", P1(0, 4, 0x514649fc), 0, 0, false, PARSE, -EINVAL,
      "bad magic" },
    { "version 1", P1(4, 4, 1), 0, 0, false, PARSE, -ENOTSUP,
      "qcow2 version 1 is not supported" },
    { "version 4", P1(4, 4, 4), 0, 0, false, PARSE, -ENOTSUP,
      "qcow2 version 4 is not supported" },
    { "cluster_bits 8", P1(20, 4, 8), 0, 0, false, PARSE, -EINVAL,
      "cluster_bits 8" },
    { "cluster_bits 22", P1(20, 4, 22), 0, 0, false, PARSE, -EINVAL,
      "cluster_bits 22" },
    { "size 2^63", P1(24, 8, UINT64_C(1) << 63), 0, 0, false, PARSE, -EFBIG,
      "virtual size" },
    { "size 2^61 + 1", P1(24, 8, (UINT64_C(1) << 61) + 1), 0, 0, false, PARSE,
      -EFBIG, "virtual size" },
    /* 1 TiB of 64 KiB clusters needs 2048 L1 entries: fine in the limit,
     * but the header has 2. */
    { "size 1 TiB, l1_size 2", P1(24, 8, 1024 * GiB), 0, 0, false, PARSE,
      -EINVAL, "L1 table too small" },
    { "AES", P1(32, 4, 1), 0, 0, false, PARSE, -ENOTSUP,
      "encrypted images are not supported (AES)" },
    { "LUKS", P1(32, 4, 2), 0, 0, false, PARSE, -ENOTSUP,
      "encrypted images are not supported (LUKS)" },
    { "crypt_method 3", P1(32, 4, 3), 0, 0, false, PARSE, -EINVAL,
      "crypt_method 3" },
    { "l1_size 1 for 1 GiB", P1(36, 4, 1), 0, 0, false, PARSE, -EINVAL,
      "L1 table too small" },
    { "l1_size 0 for 1 GiB", P1(36, 4, 0), 0, 0, false, PARSE, -EINVAL,
      "L1 table too small" },
    { "l1_size 2^22 + 1", P1(36, 4, (1u << 22) + 1), 0, 0, false, PARSE,
      -EFBIG, "L1 table too large" },
    { "l1_size 2^32 - 1", P1(36, 4, UINT32_MAX), 0, 0, false, PARSE, -EFBIG,
      "L1 table too large" },
    { "L1 offset unaligned", P1(40, 8, SYN_L1_OFFSET + 512), 0, 0, false,
      PARSE, -EINVAL, "L1 table offset 0x30200 not cluster-aligned" },
    { "L1 offset past EOF", P1(40, 8, 100 * SYN_CLUSTER), 0, 0, false, PARSE,
      -EINVAL, "L1 table at 0x640000 past the end of the file" },
    { "L1 offset near 2^64", P1(40, 8, UINT64_MAX & ~(SYN_CLUSTER - 1)), 0, 0,
      false, PARSE, -EINVAL, "past the end of the file" },
    { "L1 over the header", P1(40, 8, 0), 0, 0, false, PARSE, -EINVAL,
      "L1 table overlaps the header" },
    { "refcount table offset 0", P1(48, 8, 0), 0, 0, false, PARSE, -EINVAL,
      "refcount table offset 0 overlaps the header" },
    { "refcount table unaligned", P1(48, 8, SYN_RT_OFFSET + 8), 0, 0, false,
      PARSE, -EINVAL, "refcount table offset 0x10008 not cluster-aligned" },
    { "refcount table past EOF", P1(48, 8, 8 * SYN_CLUSTER), 0, 0, false,
      PARSE, -EINVAL, "refcount table at 0x80000 past the end of the file" },
    { "refcount table runs past EOF", P2(48, 8, 2 * SYN_CLUSTER, 56, 4, 3),
      0, 0, false, PARSE, -EINVAL, "past the end of the file" },
    { "refcount table over L1", P1(48, 8, SYN_L1_OFFSET), 0, 0, false, PARSE,
      -EINVAL, "refcount table overlaps the L1 table" },
    { "refcount table runs into L1", P1(56, 4, 3), 0, 0, false, PARSE,
      -EINVAL, "refcount table overlaps the L1 table" },
    { "refcount_table_clusters 0", P1(56, 4, 0), 0, 0, false, PARSE, -EINVAL,
      "refcount table has no cluster" },
    { "refcount_table_clusters 129", P1(56, 4, 129), 0, 0, false, PARSE,
      -EFBIG, "refcount table too large" },
    { "refcount_table_clusters 2^32-1", P1(56, 4, UINT32_MAX), 0, 0, false,
      PARSE, -EFBIG, "refcount table too large" },
    { "nb_snapshots 65537", P1(60, 4, 65537), 0, 0, false, PARSE, -EFBIG,
      "too many snapshots" },
    { "nb_snapshots 2^32-1", P1(60, 4, UINT32_MAX), 0, 0, false, PARSE,
      -EFBIG, "too many snapshots" },
    { "snapshots past EOF", P2(60, 4, 1, 64, 8, 100 * SYN_CLUSTER), 0, 0,
      false, PARSE, -EINVAL, "snapshot table at 0x640000 past the end" },
    { "snapshots unaligned", P2(60, 4, 1, 64, 8, SYN_CLUSTER + 8), 0, 0,
      false, PARSE, -EINVAL, "snapshot table offset 0x10008 not" },
    { "snapshots over the header", P2(60, 4, 1, 64, 8, 0), 0, 0, false,
      PARSE, -EINVAL, "snapshot table overlaps the header" },
    { "backing name 2000 bytes", P2(8, 8, 0x200, 16, 4, 2000), 0, 0, false,
      PARSE, -EINVAL, "backing file name too long" },
    { "backing name past the cluster", P2(8, 8, 0x20000, 16, 4, 8), 0, 0,
      false, PARSE, -EINVAL, "backing file name outside the first cluster" },
    { "backing name ends past the cluster", P2(8, 8, 0xfffc, 16, 4, 8), 0, 0,
      false, PARSE, -EINVAL, "backing file name outside the first cluster" },
    { "backing name in the header", P2(8, 8, 0x40, 16, 4, 8), 0, 0, false,
      PARSE, -EINVAL, "backing file name overlaps the header" },
    { "backing name empty", P2(8, 8, 0x200, 16, 4, 0), 0, 0, false, PARSE,
      -EINVAL, "empty backing file name" },
    { "header_length 50", P1(100, 4, 50), 0, 0, false, PARSE, -EINVAL,
      "header_length 50 too short" },
    { "header_length 108", P1(100, 4, 108), 0, 0, false, PARSE, -EINVAL,
      "header_length 108 not a multiple of 8" },
    { "header_length > cluster", P1(100, 4, 0x10008), 0, 0, false, PARSE,
      -EINVAL, "header_length 65544 exceeds the cluster size" },
    { "refcount_order 7", P1(96, 4, 7), 0, 0, false, PARSE, -EINVAL,
      "refcount_order 7" },
    { "compression_type 2", P2(104, 1, 2, 72, 8, 1u << 3), 0, 0, false,
      PARSE, -ENOTSUP, "compression type 2 is not supported" },
    { "compression_type 2 without bit", P1(104, 1, 2), 0, 0, false, PARSE,
      -ENOTSUP, "compression type 2 is not supported" },
    { "zstd without the bit", P1(104, 1, 1), 0, 0, false, PARSE, -EINVAL,
      "without the compression type bit" },
    { "compression bit with zlib", P1(72, 8, 1u << 3), 0, 0, false, PARSE,
      -EINVAL, "compression type bit set with zlib" },
    /* header_length 104: no compression_type field, so the bit is wrong. */
    { "compression bit, no field", P3(72, 8, 1u << 3, 100, 4, 104, 104, 1, 1),
      0, 0, false, PARSE, -EINVAL, "compression type bit set with zlib" },
    /* 4 KiB clusters: fix L1 (1 GiB / (4 KiB * 512) = 512 entries) so
     * that only the extended L2 rule is broken. */
    { "extended L2, 4 KiB clusters",
      P3(20, 4, 12, 72, 8, 1u << 4, 36, 4, 1024), 0, 4 * MiB, false, PARSE,
      -EINVAL, "extended L2 entries need clusters of at least 16 KiB" },
    { "raw data file bit alone", P1(88, 8, 2), 0, 0, false, PARSE, -EINVAL,
      "raw external data bit without an external data file" },
    { "truncated: 71 bytes", P1(0, 0, 0), 71, 0, false, PARSE, -EINVAL,
      "truncated header" },
    { "truncated: v3 in 100 bytes", P1(0, 0, 0), 100, 0, false, PARSE,
      -EINVAL, "truncated header" },
    { "truncated: len < header_length", P1(0, 0, 0), 104, 0, false, PARSE,
      -EINVAL, "truncated header" },
    { "truncated: 0 bytes", P1(0, 0, 0), LEN_EMPTY, 0, false, PARSE, -EINVAL,
      "truncated header" },

    /* ---- extensions ---- */
    { "extension past the cluster", P2(112, 4, 0x12345678, 116, 4, 0x10000),
      0, 0, false, EXTENSIONS, -EINVAL, "runs past the first cluster" },
    { "extension 1 byte too long", P2(112, 4, 0x12345678, 116, 4,
      SYN_CLUSTER - 112 - 8 + 1), 0, 0, false, EXTENSIONS, -EINVAL,
      "runs past the first cluster" },
    { "extension into the backing name",
      P4(8, 8, 0x200, 16, 4, 4, 112, 4, 0x12345678, 116, 4,
         0x200 - 112 - 8 + 8), 0, 0, false,
      EXTENSIONS, -EINVAL, "runs into the backing file name" },
    { "bitmaps bit, no extension", P1(88, 8, 1), 0, 0, false, EXTENSIONS,
      -EINVAL, "bitmaps autoclear bit set without a bitmaps extension" },
    { "backing format length 16", P2(112, 4, 0xe2792aca, 116, 4, 16), 0, 0,
      false, EXTENSIONS, -EINVAL, "backing format name of 16 bytes" },
    { "backing format empty", P2(112, 4, 0xe2792aca, 116, 4, 0), 0, 0, false,
      EXTENSIONS, -EINVAL, "backing format name of 0 bytes" },
    { "backing format not printable",
      P3(112, 4, 0xe2792aca, 116, 4, 3, 120, 4, 0x72000a00), 0, 0, false,
      EXTENSIONS, -EINVAL, "not printable" },
    { "bitmaps extension length 16", P3(88, 8, 1, 112, 4, 0x23852875, 116, 4,
      16), 0, 0, false, EXTENSIONS, -EINVAL, "bitmaps extension of 16 bytes" },
    { "bitmaps extension 0 bitmaps", P3(88, 8, 1, 112, 4, 0x23852875, 116, 4,
      24), 0, 0, false, EXTENSIONS, -EINVAL, "with 0 bitmaps" },
    { "crypto pointer length 8", P2(112, 4, 0x0537be77, 116, 4, 8), 0, 0,
      false, EXTENSIONS, -EINVAL, "encryption header pointer of 8 bytes" },
    { "data file name with NUL", P3(112, 4, 0x44415441, 116, 4, 4, 120, 4,
      0x61006200), 0, 0, false, EXTENSIONS, -EINVAL, "NUL byte" },

    /* ---- features ---- */
    { "unknown incompatible bit 10", P1(72, 8, 1u << 10), 0, 0, false,
      FEATURES, -ENOTSUP, "unknown incompatible feature bit 10" },
    { "unknown incompatible bit 63", P1(72, 8, UINT64_C(1) << 63), 0, 0, true,
      FEATURES, -ENOTSUP, "unknown incompatible feature bit 63" },
    { "corrupt, read-write", P1(72, 8, 2), 0, 0, false, FEATURES, -EACCES,
      "corrupt: open read-only" },
    { "corrupt, read-only", P1(72, 8, 2), 0, 0, true, FEATURES, 0, "" },
    { "dirty", P1(72, 8, 1), 0, 0, false, FEATURES, 0, "" },
    { "unknown compatible bit", P1(80, 8, UINT64_C(1) << 40), 0, 0, false,
      FEATURES, 0, "" },
    { "unknown autoclear bit", P1(88, 8, UINT64_C(1) << 40), 0, 0, false,
      FEATURES, 0, "" },
};

static void apply(uint8_t *b, const struct patch *p)
{
    switch (p->width) {
    case 1: b[p->off] = (uint8_t)p->value; break;
    case 4: be_put32(b + p->off, (uint32_t)p->value); break;
    case 8: be_put64(b + p->off, p->value); break;
    default: break;
    }
}

static void test_hostile_corpus(void **state)
{
    (void)state;
    for (size_t i = 0; i < ARRAY_SIZE(hostile); i++) {
        const struct hostile *t = &hostile[i];
        uint8_t *b = make_header();
        struct qcow2_header h;
        struct qcow2_extensions ext;
        enum stage st;
        uint8_t *keep = NULL;
        char err[160];
        size_t len = t->len == LEN_EMPTY ? 0 : t->len ? t->len : SYN_CLUSTER;
        int ret;

        for (size_t j = 0; j < ARRAY_SIZE(t->p); j++)
            apply(b, &t->p[j]);
        ret = open_image(b, len, t->file_size ? t->file_size : SYN_FILE_SIZE,
                         t->read_only, &h, &ext, &st, &keep, err, sizeof(err));
        print_message("%-40s -> %d (stage %d) \"%s\"\n", t->what, ret,
                      (int)st, err);
        assert_int_equal(ret, t->ret);
        assert_int_equal(st, t->stage);
        assert_non_null(strstr(err, t->phrase));
        free(keep);
        free(b);
    }
}

/* Writes a feature name table extension at off. */
struct feature {
    uint8_t type, bit;
    const char *name;
};

static size_t put_feature_table(uint8_t *b, size_t off,
                                const struct feature *f, size_t n)
{
    be_put32(b + off, 0x6803f857);
    be_put32(b + off + 4, (uint32_t)(n * 48));
    for (size_t i = 0; i < n; i++) {
        uint8_t *e = b + off + 8 + i * 48;

        e[0] = f[i].type;
        e[1] = f[i].bit;
        memcpy(e + 2, f[i].name, strnlen(f[i].name, 46));
    }
    return off + 8 + n * 48;
}

static void test_unknown_feature_named(void **state)
{
    static const struct feature table[] = {
        { 0, 0, "dirty bit" },
        { 1, 10, "compatible frobnicator" },  /* same bit, other type */
        { 0, 10, "frobnicator" },
        { 0, 11, "" },                        /* empty name: not named */
        /* 46 bytes, no NUL: a full-length name. */
        { 0, 12, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRST" },
    };
    uint8_t *b = make_header();
    struct qcow2_header h;
    struct qcow2_extensions ext;
    enum stage st;
    uint8_t *keep = NULL;
    char err[160];
    const char *name;
    size_t n = 0;

    (void)state;
    put_feature_table(b, 112, table, ARRAY_SIZE(table));
    be_put64(b + 72, (1u << 10) | (1u << 12));
    assert_int_equal(open_image(b, SYN_CLUSTER, SYN_FILE_SIZE, true, &h, &ext,
                                &st, &keep, err, sizeof(err)), -ENOTSUP);
    assert_int_equal(st, FEATURES);
    assert_string_equal(err,
                        "unsupported incompatible feature 'frobnicator' "
                        "(bit 10)");
    assert_int_equal(ext.n_features, 5);
    assert_int_equal(ext.end, 112 + 8 + 5 * 48);

    name = qcow2_feature_name(&ext, QCOW2_FEATURE_INCOMPAT, 0, &n);
    assert_non_null(name);
    assert_int_equal(n, 9);
    assert_memory_equal(name, "dirty bit", 9);
    name = qcow2_feature_name(&ext, QCOW2_FEATURE_COMPAT, 10, &n);
    assert_int_equal(n, 22);
    assert_memory_equal(name, "compatible frobnicator", 22);
    assert_null(qcow2_feature_name(&ext, QCOW2_FEATURE_INCOMPAT, 11, &n));
    assert_null(qcow2_feature_name(&ext, QCOW2_FEATURE_AUTOCLEAR, 0, &n));
    assert_null(qcow2_feature_name(NULL, QCOW2_FEATURE_INCOMPAT, 0, &n));
    name = qcow2_feature_name(&ext, QCOW2_FEATURE_INCOMPAT, 12, &n);
    assert_int_equal(n, 46);
    assert_memory_equal(name, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRST",
                        46);

    /* Only bit 12: its full-length name is reported. */
    be_put64(b + 72, 1u << 12);
    assert_int_equal(open_image(b, SYN_CLUSTER, SYN_FILE_SIZE, true, &h, &ext,
                                &st, &keep, err, sizeof(err)), -ENOTSUP);
    assert_non_null(strstr(err,
                    "'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRST' (bit 12)"));

    /* Only bit 11, whose name is empty: reported by number. */
    be_put64(b + 72, 1u << 11);
    assert_int_equal(open_image(b, SYN_CLUSTER, SYN_FILE_SIZE, true, &h, &ext,
                                &st, &keep, err, sizeof(err)), -ENOTSUP);
    assert_string_equal(err, "unknown incompatible feature bit 11");

    /* A NULL message buffer is fine. */
    assert_int_equal(qcow2_header_check_features(&h, &ext, true, NULL, 0),
                     -ENOTSUP);
    free(b);
    free(keep);
}

/* Every kind of extension at once, plus unknown ones and a backing file
 * name right after the end marker. */
static void test_extensions_walk(void **state)
{
    uint8_t *b = make_header();
    struct qcow2_header h;
    struct qcow2_extensions ext;
    enum stage st;
    uint8_t *keep = NULL;
    char err[160];
    size_t off = 112;

    (void)state;
    /* Backing format "qcow2" (5 bytes, padded to 8). */
    be_put32(b + off, 0xe2792aca);
    be_put32(b + off + 4, 5);
    memcpy(b + off + 8, "qcow2", 5);
    off += 16;
    /* Unknown extension, 3 bytes of data. */
    be_put32(b + off, 0x11111111);
    be_put32(b + off + 4, 3);
    memcpy(b + off + 8, "xyz", 3);
    off += 16;
    /* Bitmaps: 2 bitmaps, 64-byte directory at cluster 3... pick cluster 2
     * (the file has 4 clusters). */
    be_put32(b + off, 0x23852875);
    be_put32(b + off + 4, 24);
    be_put32(b + off + 8, 2);
    be_put32(b + off + 12, 0);
    be_put64(b + off + 16, 64);
    be_put64(b + off + 24, 2 * SYN_CLUSTER);
    off += 32;
    /* Full disk encryption header pointer: recorded only. */
    be_put32(b + off, 0x0537be77);
    be_put32(b + off + 4, 16);
    be_put64(b + off + 8, 0x50000);
    be_put64(b + off + 16, 0x1234);
    off += 24;
    /* External data file name "data.raw" (8 bytes, no padding). */
    be_put32(b + off, 0x44415441);
    be_put32(b + off + 4, 8);
    memcpy(b + off + 8, "data.raw", 8);
    off += 16;
    /* Unknown extension with no data. */
    be_put32(b + off, 0x22222222);
    be_put32(b + off + 4, 0);
    off += 8;
    /* End marker (zero) at off, backing name right after it. */
    assert_int_equal(off, 112 + 16 + 16 + 32 + 24 + 16 + 8);
    be_put64(b + 8, off + 8);
    be_put32(b + 16, 11);
    memcpy(b + off + 8, "base.qcow2x", 11);
    be_put64(b + 88, 1);               /* bitmaps autoclear bit */

    assert_int_equal(open_image(b, SYN_CLUSTER, SYN_FILE_SIZE, false, &h,
                                &ext, &st, &keep, err, sizeof(err)), 0);
    assert_int_equal(ext.start, 112);
    assert_int_equal(ext.end, off);
    assert_int_equal(ext.limit, off + 8);
    assert_true(ext.has_backing_format);
    assert_string_equal(ext.backing_format, "qcow2");
    assert_true(ext.has_backing_file);
    assert_int_equal(ext.backing_file_len, 11);
    assert_string_equal(ext.backing_file, "base.qcow2x");
    assert_true(ext.has_bitmaps);
    assert_true(ext.bitmaps_consistent);
    assert_int_equal(ext.nb_bitmaps, 2);
    assert_int_equal(ext.bitmap_directory_size, 64);
    assert_int_equal(ext.bitmap_directory_offset, 2 * SYN_CLUSTER);
    assert_true(ext.has_crypto_header);
    assert_int_equal(ext.crypto_header_offset, 0x50000);
    assert_int_equal(ext.crypto_header_length, 0x1234);
    assert_int_equal(ext.data_file_len, 8);
    assert_memory_equal(ext.data_file, "data.raw", 8);
    assert_int_equal(ext.n_unknown, 2);
    assert_int_equal(ext.unknown[0].type, 0x11111111);
    assert_int_equal(ext.unknown[0].offset, 128);
    assert_int_equal(ext.unknown[0].length, 3);
    assert_int_equal(ext.unknown[1].type, 0x22222222);
    assert_int_equal(ext.unknown[1].offset, off - 8);
    assert_int_equal(ext.unknown[1].length, 0);

    /* Bitmaps present but the autoclear bit clear: inconsistent, not
     * checked (even with a bad directory offset). */
    be_put64(b + 88, 0);
    be_put64(b + 152 + 16, 0x123);
    assert_int_equal(open_image(b, SYN_CLUSTER, SYN_FILE_SIZE, false, &h,
                                &ext, &st, &keep, err, sizeof(err)), 0);
    assert_true(ext.has_bitmaps);
    assert_false(ext.bitmaps_consistent);
    /* ... but with the bit, the offset is checked. */
    be_put64(b + 88, 1);
    assert_int_equal(open_image(b, SYN_CLUSTER, SYN_FILE_SIZE, false, &h,
                                &ext, &st, &keep, err, sizeof(err)),
                     -EINVAL);
    assert_non_null(strstr(err, "bitmap directory offset 0x123 invalid"));
    /* Directory past the end of the file. */
    be_put64(b + 152 + 16, 8 * SYN_CLUSTER);
    assert_int_equal(open_image(b, SYN_CLUSTER, SYN_FILE_SIZE, false, &h,
                                &ext, &st, &keep, err, sizeof(err)),
                     -EINVAL);
    assert_non_null(strstr(err, "bitmap directory past the end of the file"));
    be_put64(b + 152 + 16, 2 * SYN_CLUSTER);

    /* A second backing format extension replacing the unknown one. */
    be_put32(b + 128, 0xe2792aca);
    memcpy(b + 136, "raw", 3);
    assert_int_equal(open_image(b, SYN_CLUSTER, SYN_FILE_SIZE, false, &h,
                                &ext, &st, &keep, err, sizeof(err)),
                     -EINVAL);
    assert_string_equal(err, "header extension 0xe2792aca appears twice");
    be_put32(b + 128, 0x11111111);

    /* A NUL in the backing file name. */
    b[off + 8 + 4] = '\0';
    assert_int_equal(open_image(b, SYN_CLUSTER, SYN_FILE_SIZE, false, &h,
                                &ext, &st, &keep, err, sizeof(err)),
                     -EINVAL);
    assert_int_equal(st, EXTENSIONS);
    assert_string_equal(err, "backing file name contains a NUL byte");
    free(b);
    free(keep);
}

/* A backing file name that is not 8-aligned, right after an extension
 * whose padding would run over it: the walk stops at the name and does not
 * read what lies past it as an extension. */
static void test_extensions_unaligned_backing(void **state)
{
    struct qcow2_header h;
    struct qcow2_extensions ext;
    char err[160];

    (void)state;
    for (int big = 0; big <= 1; big++) {
        /* 512-byte clusters, so that reading past the name would also read
         * past the buffer; and 64 KiB with garbage after the name. */
        uint8_t *b = make_header();
        size_t cs = big ? SYN_CLUSTER : 512;
        uint8_t *c;

        if (!big) {
            be_put32(b + 20, 9);
            be_put64(b + 24, 32 * MiB);            /* 32 MiB / 32 KiB: 1024 */
            be_put32(b + 36, 1024);
            be_put64(b + 40, 0x600);
            be_put64(b + 48, 0x200);
        }
        be_put64(b + 8, 509);                      /* name "abc" at 509..511 */
        be_put32(b + 16, 3);
        memcpy(b + 509, "abc", 3);
        be_put32(b + 112, 0x55555555);             /* data 120..508 */
        be_put32(b + 116, 509 - 120);
        be_put32(b + 512, 0x66666666);             /* never an extension */
        be_put32(b + 516, UINT32_MAX);
        c = dup_exact(b, cs);
        assert_int_equal(qcow2_header_parse(c, cs, 64 * MiB, &h, err,
                                            sizeof(err)), 0);
        assert_int_equal(qcow2_header_parse_extensions(c, cs, &h, &ext, err,
                                                       sizeof(err)), 0);
        assert_int_equal(ext.limit, 509);
        assert_int_equal(ext.end, 509);
        assert_int_equal(ext.n_unknown, 1);
        assert_int_equal(ext.unknown[0].length, 389);
        assert_string_equal(ext.backing_file, "abc");
        free(c);
        free(b);
    }
}

/* More unknown extensions than the struct lists: all are counted. */
static void test_extensions_many_unknown(void **state)
{
    uint8_t *b = make_header();
    struct qcow2_header h;
    struct qcow2_extensions ext;
    enum stage st;
    uint8_t *keep = NULL;
    char err[160];
    size_t off = 112;

    (void)state;
    for (uint32_t i = 0; i < 40; i++, off += 16) {
        be_put32(b + off, 0x70000000 + i);
        be_put32(b + off + 4, 8);
        be_put64(b + off + 8, i);
    }
    assert_int_equal(open_image(b, SYN_CLUSTER, SYN_FILE_SIZE, false, &h,
                                &ext, &st, &keep, err, sizeof(err)), 0);
    assert_int_equal(ext.n_unknown, 40);
    assert_int_equal(ext.unknown[QCOW2_MAX_UNKNOWN_EXT - 1].type,
                     0x70000000 + QCOW2_MAX_UNKNOWN_EXT - 1);
    assert_int_equal(ext.unknown[QCOW2_MAX_UNKNOWN_EXT - 1].offset,
                     112 + 16 * (QCOW2_MAX_UNKNOWN_EXT - 1));
    assert_int_equal(ext.end, off);

    /* An extension filling the cluster exactly, no end marker: fine. */
    memset(b + 112, 0, 40 * 16);
    be_put32(b + 112, 0x12345678);
    be_put32(b + 116, SYN_CLUSTER - 112 - 8);
    assert_int_equal(open_image(b, SYN_CLUSTER, SYN_FILE_SIZE, false, &h,
                                &ext, &st, &keep, err, sizeof(err)), 0);
    assert_int_equal(ext.end, SYN_CLUSTER);
    assert_int_equal(ext.n_unknown, 1);

    /* The extension walk needs the whole first cluster. */
    {
        uint8_t *c = dup_exact(b, SYN_CLUSTER - 1);

        assert_int_equal(qcow2_header_parse_extensions(c, SYN_CLUSTER - 1, &h,
                                                       &ext, err,
                                                       sizeof(err)),
                         -EINVAL);
        assert_non_null(strstr(err, "first cluster truncated"));
        free(c);
    }
    free(b);
    free(keep);
}

/* Boundaries that must be accepted. */
static void test_synthetic_limits(void **state)
{
    uint8_t *b = make_header();
    struct qcow2_header h;
    struct qcow2_extensions ext;
    enum stage st;
    uint8_t *keep = NULL;
    char err[160];

    (void)state;
    /* Virtual size 0: QEMU writes l1_size 0 and L1 offset 0. */
    be_put64(b + 24, 0);
    be_put32(b + 36, 0);
    be_put64(b + 40, 0);
    assert_int_equal(open_image(b, SYN_CLUSTER, SYN_FILE_SIZE, false, &h,
                                &ext, &st, &keep, err, sizeof(err)), 0);
    assert_int_equal(h.l1_size_min, 0);

    /* 2^61 with 2 MiB clusters: 2^61 / 2^39 = 2^22 L1 entries = 32 MiB,
     * exactly the limit.  The file is made large enough for the table. */
    free(b);
    b = make_header();
    be_put32(b + 20, 21);
    be_put64(b + 24, UINT64_C(1) << 61);
    be_put32(b + 36, 1u << 22);
    be_put64(b + 40, 2 * MiB * 2);
    be_put64(b + 48, 2 * MiB);
    assert_int_equal(open_image(b, SYN_CLUSTER, 2 * MiB * 2 + 32 * MiB, false,
                                &h, &ext, &st, &keep, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "first cluster truncated")); /* 64 KiB buf */
    {
        uint8_t *big = calloc(1, 2 * MiB);

        assert_non_null(big);
        memcpy(big, b, SYN_CLUSTER);
        assert_int_equal(open_image(big, 2 * MiB, 2 * MiB * 2 + 32 * MiB,
                                    false, &h, &ext, &st, &keep, err, sizeof(err)),
                         0);
        assert_int_equal(h.l1_size_min, 1u << 22);
        assert_int_equal(h.l2_entries, 262144);
        /* One byte short of the file for the L1 table: the last cluster
         * may be partial, a whole missing cluster may not. */
        assert_int_equal(open_image(big, 2 * MiB, 2 * MiB * 2 + 32 * MiB - 1,
                                    false, &h, &ext, &st, &keep, err, sizeof(err)),
                         0);
        assert_int_equal(open_image(big, 2 * MiB, 2 * MiB * 2 + 30 * MiB,
                                    false, &h, &ext, &st, &keep, err, sizeof(err)),
                         -EINVAL);
        assert_non_null(strstr(err, "L1 table at 0x400000 past the end"));
        /* One more byte of virtual size does not fit the L1 limit. */
        be_put64(big + 24, (UINT64_C(1) << 61) + 1);
        assert_int_equal(open_image(big, 2 * MiB, 2 * MiB * 2 + 32 * MiB,
                                    false, &h, &ext, &st, &keep, err, sizeof(err)),
                         -EFBIG);
        free(big);
    }
    free(b);

    /* 512-byte clusters: a 1 TiB virtual disk needs 2^25 L1 entries, over
     * the 32 MiB limit, whatever l1_size says. */
    b = make_header();
    be_put32(b + 20, 9);
    be_put32(b + 100, 104);
    be_put64(b + 24, 1024 * GiB);
    be_put64(b + 40, 0x600);
    be_put64(b + 48, 0x200);
    {
        uint8_t *c = dup_exact(b, 512);

        assert_int_equal(qcow2_header_parse(c, 512, 64 * MiB, &h, err,
                                            sizeof(err)), -EFBIG);
        assert_string_equal(err, "virtual size too large for 512-byte "
                                 "clusters (L1 table over 32 MiB)");
        free(c);
    }
    /* 128 refcount table clusters of 64 KiB = 8 MiB: the limit. */
    free(b);
    b = make_header();
    be_put64(b + 48, 4 * SYN_CLUSTER);
    be_put32(b + 56, 128);
    assert_int_equal(open_image(b, SYN_CLUSTER, 132 * SYN_CLUSTER, false, &h,
                                &ext, &st, &keep, err, sizeof(err)), 0);
    /* 65536 snapshots is still fine. */
    be_put32(b + 60, 65536);
    be_put64(b + 64, 2 * SYN_CLUSTER);
    assert_int_equal(open_image(b, SYN_CLUSTER, 160 * SYN_CLUSTER, false, &h,
                                &ext, &st, &keep, err, sizeof(err)), 0);
    assert_int_equal(h.nb_snapshots, 65536);
    free(b);

    /* A message buffer of 1 byte, and none at all. */
    b = make_header();
    be_put32(b + 4, 7);
    err[0] = 'x';
    assert_int_equal(qcow2_header_parse(b, SYN_CLUSTER, SYN_FILE_SIZE, &h, err,
                                        1), -ENOTSUP);
    assert_int_equal(err[0], '\0');
    assert_int_equal(qcow2_header_parse(b, SYN_CLUSTER, SYN_FILE_SIZE, &h,
                                        NULL, 0), -ENOTSUP);
    free(b);
    free(keep);
}

/* ---- serialize ---- */

static void test_serialize_roundtrip(void **state)
{
    uint8_t *b = make_header();
    struct qcow2_header h, h2;
    char err[128];
    uint8_t out[SYN_HDR_LEN + 8];

    (void)state;
    /* Make every field non-trivial. */
    be_put64(b + 8, 0x1f0);                /* backing name at 0x1f0, 9 bytes */
    be_put32(b + 16, 9);
    memcpy(b + 0x1f0, "base.qcow", 9);
    be_put32(b + 60, 3);                   /* 3 snapshots at cluster 2 */
    be_put64(b + 64, 2 * SYN_CLUSTER);
    be_put64(b + 72, QCOW2_INCOMPAT_COMPRESSION | QCOW2_INCOMPAT_EXTL2);
    be_put64(b + 80, QCOW2_COMPAT_LAZY_REFCOUNTS | (UINT64_C(1) << 33));
    be_put64(b + 88, UINT64_C(1) << 50);
    be_put32(b + 96, 6);
    b[104] = 1;
    be_put32(b + 36, 4);                   /* ext. L2 halves L2 coverage */

    assert_int_equal(qcow2_header_parse(b, SYN_CLUSTER, SYN_FILE_SIZE, &h, err,
                                        sizeof(err)), 0);
    assert_true(h.extended_l2);
    assert_int_equal(h.l2_entry_size, 16);
    assert_int_equal(h.l2_entries, 4096);
    assert_int_equal(h.l1_size_min, 2 * 2);
    assert_int_equal(h.subcluster_bits, 11);
    assert_int_equal(h.subcluster_size, 2048);
    assert_int_equal(h.refcount_bits, 64);
    assert_int_equal(h.refcount_block_bits, 13);
    assert_int_equal(h.compression_type, QCOW2_COMPRESSION_ZSTD);
    assert_true(h.lazy_refcounts);

    assert_int_equal(qcow2_header_serialized_size(&h), 105);
    memset(out, 0xaa, sizeof(out));
    assert_int_equal(qcow2_header_serialize(&h, out, sizeof(out)), 105);
    assert_memory_equal(out, b, 105);
    assert_int_equal(out[105], 0xaa);   /* padding is not touched */
    /* Padding (or a field unknown here) is the caller's: it came from
     * disk and is preserved as it was. */
    memcpy(out + 105, b + 105, 7);
    assert_int_equal(qcow2_header_parse(out, SYN_HDR_LEN, SYN_FILE_SIZE, &h2,
                                        err, sizeof(err)), 0);
    assert_header_equal(&h, &h2);

    /* Too small a buffer: nothing written. */
    memset(out, 0xaa, sizeof(out));
    assert_int_equal(qcow2_header_serialize(&h, out, 104), 0);
    assert_int_equal(out[0], 0xaa);

    /* A writer marks the image dirty, then clean again; and clears the
     * autoclear bits it does not know (spec, autoclear_features). */
    h.incompatible_features |= QCOW2_INCOMPAT_DIRTY;
    h.autoclear_features &= qcow2_autoclear_known_mask();
    assert_int_equal(qcow2_autoclear_known_mask(), 3);
    memcpy(out, b, SYN_HDR_LEN);
    assert_int_equal(qcow2_header_serialize(&h, out, SYN_HDR_LEN), 105);
    assert_int_equal(out[79], 0x19);    /* bits 0, 3, 4 */
    assert_memory_equal(out + 88, "\0\0\0\0\0\0\0\0", 8);
    assert_int_equal(qcow2_header_parse(out, SYN_HDR_LEN, SYN_FILE_SIZE, &h2,
                                        err, sizeof(err)), 0);
    assert_true(h2.dirty);
    assert_int_equal(h2.autoclear_features, 0);
    h2.incompatible_features &= ~QCOW2_INCOMPAT_DIRTY;
    assert_int_equal(qcow2_header_serialize(&h2, out, SYN_HDR_LEN), 105);
    assert_int_equal(out[79], 0x18);

    /* header_length 104: no compression_type byte is written. */
    free(b);
    b = make_header();
    be_put32(b + 100, 104);
    assert_int_equal(qcow2_header_parse(b, 104, SYN_FILE_SIZE, &h, err,
                                        sizeof(err)), 0);
    assert_int_equal(qcow2_header_serialized_size(&h), 104);
    memset(out, 0xaa, sizeof(out));
    assert_int_equal(qcow2_header_serialize(&h, out, sizeof(out)), 104);
    assert_memory_equal(out, b, 104);
    assert_int_equal(out[104], 0xaa);
    free(b);
}

/* ======================= refcounts ======================= */

static void test_refcount_max(void **state)
{
    (void)state;
    assert_int_equal(qcow2_refcount_max(0), 1);
    assert_int_equal(qcow2_refcount_max(1), 3);
    assert_int_equal(qcow2_refcount_max(2), 15);
    assert_int_equal(qcow2_refcount_max(3), 255);
    assert_int_equal(qcow2_refcount_max(4), 65535);
    assert_int_equal(qcow2_refcount_max(5), UINT32_MAX);
    assert_true(qcow2_refcount_max(6) == UINT64_MAX);
}

/* The exact place of an entry, by hand from the spec: sub-byte entries are
 * packed from the least significant bit, wider ones are big endian. */
static void test_refcount_layout(void **state)
{
    uint8_t blk[64];

    (void)state;
    /* Order 0: entry 5 is bit 5 of byte 0; entry 13 is bit 5 of byte 1. */
    memset(blk, 0, sizeof(blk));
    qcow2_refcount_set(blk, 0, 5, 1);
    assert_int_equal(blk[0], 0x20);
    qcow2_refcount_set(blk, 0, 13, 1);
    assert_int_equal(blk[1], 0x20);
    qcow2_refcount_set(blk, 0, 0, 1);
    assert_int_equal(blk[0], 0x21);
    qcow2_refcount_set(blk, 0, 5, 0);
    assert_int_equal(blk[0], 0x01);
    assert_int_equal(qcow2_refcount_get(blk, 0, 13), 1);
    assert_int_equal(qcow2_refcount_get(blk, 0, 12), 0);

    /* Order 1: entry 5 is bits 2-3 of byte 1. */
    memset(blk, 0, sizeof(blk));
    qcow2_refcount_set(blk, 1, 5, 3);
    assert_int_equal(blk[1], 0x0c);
    qcow2_refcount_set(blk, 1, 7, 2);
    assert_int_equal(blk[1], 0x8c);
    assert_int_equal(qcow2_refcount_get(blk, 1, 7), 2);
    assert_int_equal(qcow2_refcount_get(blk, 1, 6), 0);

    /* Order 2: entry 5 is the high nibble of byte 2. */
    memset(blk, 0, sizeof(blk));
    qcow2_refcount_set(blk, 2, 5, 0xa);
    assert_int_equal(blk[2], 0xa0);
    qcow2_refcount_set(blk, 2, 4, 0x3);
    assert_int_equal(blk[2], 0xa3);
    assert_int_equal(qcow2_refcount_get(blk, 2, 5), 0xa);

    /* Order 3: one byte each. */
    memset(blk, 0, sizeof(blk));
    qcow2_refcount_set(blk, 3, 5, 0xfe);
    assert_int_equal(blk[5], 0xfe);

    /* Order 4: big-endian 16-bit. */
    memset(blk, 0, sizeof(blk));
    qcow2_refcount_set(blk, 4, 5, 0x1234);
    assert_int_equal(blk[10], 0x12);
    assert_int_equal(blk[11], 0x34);

    /* Order 5: big-endian 32-bit. */
    memset(blk, 0, sizeof(blk));
    qcow2_refcount_set(blk, 5, 5, 0x89abcdef);
    assert_memory_equal(blk + 20, "\x89\xab\xcd\xef", 4);

    /* Order 6: big-endian 64-bit. */
    memset(blk, 0, sizeof(blk));
    qcow2_refcount_set(blk, 6, 5, UINT64_C(0x0102030405060708));
    assert_memory_equal(blk + 40, "\x01\x02\x03\x04\x05\x06\x07\x08", 8);
    assert_true(qcow2_refcount_get(blk, 6, 5) ==
                UINT64_C(0x0102030405060708));
    /* Nothing around the entry was touched. */
    for (size_t i = 0; i < sizeof(blk); i++) {
        if (i < 40 || i >= 48)
            assert_int_equal(blk[i], 0);
    }
}

/* A value that depends on the index and fits the entry width. */
static uint64_t pattern(uint64_t i, unsigned order)
{
    uint64_t v = (i + 1) * UINT64_C(0x9e3779b97f4a7c15);

    return (v ^ (v >> 29)) & qcow2_refcount_max(order);
}

static void test_refcount_roundtrip(void **state)
{
    (void)state;
    for (unsigned order = 0; order <= 6; order++) {
        /* A block of a 512-byte cluster: 4096 >> order entries. */
        const size_t bytes = 512;
        const uint64_t entries = bytes * 8 >> order;
        uint8_t *blk = calloc(1, bytes);
        uint8_t *copy;

        assert_non_null(blk);
        for (uint64_t i = 0; i < entries; i++)
            qcow2_refcount_set(blk, order, i, pattern(i, order));
        for (uint64_t i = 0; i < entries; i++)
            assert_true(qcow2_refcount_get(blk, order, i) ==
                        pattern(i, order));

        /* Rewriting single entries (max, 0, 1) leaves the neighbours. */
        copy = dup_exact(blk, bytes);
        for (uint64_t i = 0; i < entries; i += 37) {
            static const int vals[] = { -1, 0, 1 };

            for (size_t k = 0; k < ARRAY_SIZE(vals); k++) {
                uint64_t v = vals[k] < 0 ? qcow2_refcount_max(order)
                                         : (uint64_t)vals[k];

                qcow2_refcount_set(blk, order, i, v);
                assert_true(qcow2_refcount_get(blk, order, i) == v);
                if (i > 0)
                    assert_true(qcow2_refcount_get(blk, order, i - 1) ==
                                pattern(i - 1, order));
                if (i + 1 < entries)
                    assert_true(qcow2_refcount_get(blk, order, i + 1) ==
                                pattern(i + 1, order));
            }
            qcow2_refcount_set(blk, order, i, pattern(i, order));
        }
        assert_memory_equal(blk, copy, bytes);

        /* The last entry is at the very end of the block. */
        memset(blk, 0, bytes);
        qcow2_refcount_set(blk, order, entries - 1, qcow2_refcount_max(order));
        assert_int_not_equal(blk[bytes - 1], 0);
        assert_int_equal(blk[bytes - 1 - (order > 3 ? 1u << (order - 3) : 1)],
                         0);
        free(copy);
        free(blk);
    }
}

/* ======================= L1 / L2 entries ======================= */

/* A parsed synthetic header with the given cluster size and features. */
static struct qcow2_header header_with(unsigned cluster_bits, uint32_t version,
                                       uint64_t incompat)
{
    struct qcow2_header h;

    memset(&h, 0, sizeof(h));
    h.version = version;
    h.cluster_bits = cluster_bits;
    h.cluster_size = 1u << cluster_bits;
    h.incompatible_features = incompat;
    h.extended_l2 = incompat & QCOW2_INCOMPAT_EXTL2;
    h.external_data_file = incompat & QCOW2_INCOMPAT_DATA_FILE;
    return h;
}

static void test_l1_entry(void **state)
{
    struct qcow2_header h = header_with(16, 3, 0);
    struct qcow2_l1_entry e;

    (void)state;
    assert_int_equal(qcow2_l1_entry_decode(&h, UINT64_C(0x8000000000030000),
                                           &e), 0);
    assert_int_equal(e.l2_offset, 0x30000);
    assert_true(e.copied);
    assert_false(e.reserved_set);

    assert_int_equal(qcow2_l1_entry_decode(&h, 0, &e), 0);
    assert_int_equal(e.l2_offset, 0);
    assert_false(e.copied);

    /* Bits 9-55 only: bit 56 and bits 0-8 are reserved. */
    assert_int_equal(qcow2_l1_entry_decode(&h, UINT64_C(0x01ff000000050001),
                                           &e), 0);
    assert_int_equal(e.l2_offset, UINT64_C(0x00ff000000050000));
    assert_true(e.reserved_set);
    assert_false(e.copied);

    /* Not cluster-aligned (bit 9 with 64 KiB clusters). */
    assert_int_equal(qcow2_l1_entry_decode(&h, 0x30200, &e), -EINVAL);
    /* ... but aligned with 512-byte clusters. */
    h = header_with(9, 3, 0);
    assert_int_equal(qcow2_l1_entry_decode(&h, 0x30200, &e), 0);
    assert_int_equal(e.l2_offset, 0x30200);
}

static void test_l2_standard(void **state)
{
    struct qcow2_header h = header_with(16, 3, 0);
    struct qcow2_l2_entry e;

    (void)state;
    /* Normal, COPIED. */
    assert_int_equal(qcow2_l2_entry_decode(&h, UINT64_C(0x8000000000050000),
                                           0, &e), 0);
    assert_int_equal(e.type, QCOW2_CLUSTER_NORMAL);
    assert_int_equal(e.host_offset, 0x50000);
    assert_true(e.copied);
    assert_false(e.reserved_set);
    assert_int_equal(qcow2_subcluster_type(&h, &e, 0), QCOW2_CLUSTER_NORMAL);

    /* Normal, shared (needs COW). */
    assert_int_equal(qcow2_l2_entry_decode(&h, 0x50000, 0, &e), 0);
    assert_int_equal(e.type, QCOW2_CLUSTER_NORMAL);
    assert_false(e.copied);

    /* Unallocated. */
    assert_int_equal(qcow2_l2_entry_decode(&h, 0, 0, &e), 0);
    assert_int_equal(e.type, QCOW2_CLUSTER_UNALLOCATED);
    assert_int_equal(e.host_offset, 0);

    /* Zero, plain and preallocated. */
    assert_int_equal(qcow2_l2_entry_decode(&h, 1, 0, &e), 0);
    assert_int_equal(e.type, QCOW2_CLUSTER_ZERO_PLAIN);
    assert_int_equal(qcow2_l2_entry_decode(&h, UINT64_C(0x8000000000060001),
                                           0, &e), 0);
    assert_int_equal(e.type, QCOW2_CLUSTER_ZERO_ALLOC);
    assert_int_equal(e.host_offset, 0x60000);
    assert_true(e.copied);

    /* Version 2: bit 0 is reserved, not a zero flag. */
    h = header_with(16, 2, 0);
    assert_int_equal(qcow2_l2_entry_decode(&h, 1, 0, &e), 0);
    assert_int_equal(e.type, QCOW2_CLUSTER_UNALLOCATED);
    assert_true(e.reserved_set);
    h = header_with(16, 3, 0);

    /* Reserved bits 1-8 and 56-61. */
    assert_int_equal(qcow2_l2_entry_decode(&h, 0x50002, 0, &e), 0);
    assert_true(e.reserved_set);
    assert_int_equal(qcow2_l2_entry_decode(&h, UINT64_C(0x2000000000050000),
                                           0, &e), 0);
    assert_true(e.reserved_set);
    assert_int_equal(e.host_offset, 0x50000);

    /* Unaligned host offset, also for a preallocated zero cluster. */
    assert_int_equal(qcow2_l2_entry_decode(&h, 0x50200, 0, &e), -EINVAL);
    assert_int_equal(qcow2_l2_entry_decode(&h, 0x58001, 0, &e), -EINVAL);

    /* Offset 0 with COPIED: only with an external data file. */
    assert_int_equal(qcow2_l2_entry_decode(&h, QCOW2_OFLAG_COPIED, 0, &e),
                     -EINVAL);
    h = header_with(16, 3, QCOW2_INCOMPAT_DATA_FILE);
    assert_int_equal(qcow2_l2_entry_decode(&h, QCOW2_OFLAG_COPIED, 0, &e), 0);
    assert_int_equal(e.type, QCOW2_CLUSTER_NORMAL);
    assert_int_equal(e.host_offset, 0);
}

static void test_l2_compressed(void **state)
{
    struct qcow2_header h = header_with(16, 3, 0);
    struct qcow2_l2_entry e;

    (void)state;
    /* 64 KiB clusters: x = 62 - (16 - 8) = 54.  Offset 0x123456789, 3
     * additional sectors: 4 sectors, 4 * 512 - 0x189 = 1655 bytes. */
    assert_int_equal(qcow2_csize_shift(16), 54);
    assert_int_equal(qcow2_l2_entry_decode(&h, (UINT64_C(1) << 62) |
                                               (UINT64_C(3) << 54) |
                                               UINT64_C(0x123456789), 0, &e),
                     0);
    assert_int_equal(e.type, QCOW2_CLUSTER_COMPRESSED);
    assert_int_equal(e.host_offset, 0x123456789);
    assert_int_equal(e.nb_sectors, 4);
    assert_int_equal(e.compressed_len, 1655);
    assert_false(e.copied);
    assert_false(e.reserved_set);
    assert_int_equal(qcow2_subcluster_type(&h, &e, 3),
                     QCOW2_CLUSTER_COMPRESSED);
    assert_true(qcow2_l2_entry_compressed(16, 0x123456789, 4) ==
                ((UINT64_C(1) << 62) | (UINT64_C(3) << 54) |
                 UINT64_C(0x123456789)));

    /* The largest sector count for 64 KiB: 8 bits -> 256 sectors. */
    assert_int_equal(qcow2_l2_entry_decode(&h, UINT64_C(0x7fc0000000000200),
                                           0, &e), 0);
    assert_int_equal(e.host_offset, 0x200);
    assert_int_equal(e.nb_sectors, 256);
    assert_int_equal(e.compressed_len, 256 * 512);

    /* 2 MiB clusters: x = 49, 13 bits of sectors.  Offset 0x1ffffffffffff
     * (49 bits), 8191 additional sectors. */
    h = header_with(21, 3, 0);
    assert_int_equal(qcow2_csize_shift(21), 49);
    assert_int_equal(qcow2_l2_entry_decode(&h, UINT64_C(0x7fffffffffffffff),
                                           0, &e), 0);
    assert_int_equal(e.host_offset, UINT64_C(0x1ffffffffffff));
    assert_int_equal(e.nb_sectors, 8192);
    assert_int_equal(e.compressed_len, 8192 * 512 - 511);
    assert_true(qcow2_l2_entry_compressed(21, UINT64_C(0x1ffffffffffff), 8192)
                == UINT64_C(0x7fffffffffffffff));

    /* 512-byte clusters: x = 61, 1 bit of sectors; the offset field
     * reaches bit 60, but bits 56 and above must be 0. */
    h = header_with(9, 3, 0);
    assert_int_equal(qcow2_csize_shift(9), 61);
    assert_int_equal(qcow2_l2_entry_decode(&h, UINT64_C(0x6000000000001234),
                                           0, &e), 0);
    assert_int_equal(e.host_offset, 0x1234);
    assert_int_equal(e.nb_sectors, 2);
    assert_int_equal(e.compressed_len, 1024 - 0x34);
    assert_int_equal(qcow2_l2_entry_decode(&h, UINT64_C(0x4100000000001234),
                                           0, &e), -EINVAL);

    /* COPIED on a compressed cluster is reserved. */
    h = header_with(16, 3, 0);
    assert_int_equal(qcow2_l2_entry_decode(&h, UINT64_C(0xc000000000001000),
                                           0, &e), 0);
    assert_true(e.copied);
    assert_true(e.reserved_set);
}

static void test_l2_extended(void **state)
{
    struct qcow2_header h = header_with(16, 3, QCOW2_INCOMPAT_EXTL2);
    struct qcow2_l2_entry e;

    (void)state;
    /* Subclusters 0-3 allocated, 4-7 zero, the rest unallocated. */
    assert_int_equal(qcow2_l2_entry_decode(&h, UINT64_C(0x8000000000050000),
                                           UINT64_C(0x000000f00000000f), &e),
                     0);
    assert_int_equal(e.type, QCOW2_CLUSTER_NORMAL);
    assert_int_equal(e.host_offset, 0x50000);
    assert_int_equal(e.alloc_bitmap, 0xf);
    assert_int_equal(e.zero_bitmap, 0xf0);
    for (unsigned sc = 0; sc < 4; sc++)
        assert_int_equal(qcow2_subcluster_type(&h, &e, sc),
                         QCOW2_CLUSTER_NORMAL);
    for (unsigned sc = 4; sc < 8; sc++)
        assert_int_equal(qcow2_subcluster_type(&h, &e, sc),
                         QCOW2_CLUSTER_ZERO_ALLOC);
    for (unsigned sc = 8; sc < 32; sc++)
        assert_int_equal(qcow2_subcluster_type(&h, &e, sc),
                         QCOW2_CLUSTER_UNALLOCATED_ALLOC);

    /* No host cluster: zero and unallocated subclusters only. */
    assert_int_equal(qcow2_l2_entry_decode(&h, 0,
                                           UINT64_C(0x8000000100000000), &e),
                     0);
    assert_int_equal(e.type, QCOW2_CLUSTER_UNALLOCATED);
    assert_int_equal(qcow2_subcluster_type(&h, &e, 0),
                     QCOW2_CLUSTER_ZERO_PLAIN);
    assert_int_equal(qcow2_subcluster_type(&h, &e, 31),
                     QCOW2_CLUSTER_ZERO_PLAIN);
    assert_int_equal(qcow2_subcluster_type(&h, &e, 1),
                     QCOW2_CLUSTER_UNALLOCATED);

    /* Bit 0 is not a zero flag with extended L2. */
    assert_int_equal(qcow2_l2_entry_decode(&h, 1, 0, &e), 0);
    assert_int_equal(e.type, QCOW2_CLUSTER_UNALLOCATED);
    assert_true(e.reserved_set);

    /* Allocated and zero at once; allocated without a host cluster. */
    assert_int_equal(qcow2_l2_entry_decode(&h, 0x50000,
                                           UINT64_C(0x0000000100000001), &e),
                     -EINVAL);
    assert_int_equal(qcow2_l2_entry_decode(&h, 0, 1, &e), -EINVAL);

    /* Compressed: no subclusters, the bitmap is reserved. */
    assert_int_equal(qcow2_l2_entry_decode(&h, (UINT64_C(1) << 62) | 0x1000,
                                           0, &e), 0);
    assert_int_equal(e.type, QCOW2_CLUSTER_COMPRESSED);
    assert_false(e.reserved_set);
    assert_int_equal(qcow2_l2_entry_decode(&h, (UINT64_C(1) << 62) | 0x1000,
                                           1, &e), 0);
    assert_true(e.reserved_set);
}

/* ======================= real images ======================= */

struct tmp {
    char dir[64];
    bool have_qemu_img;
    bool have_qemu_io;
};

static int group_setup(void **state)
{
    struct tmp *t = calloc(1, sizeof(*t));

    if (!t)
        return -1;
    snprintf(t->dir, sizeof(t->dir), "/tmp/strata-q2-XXXXXX");
    if (!mkdtemp(t->dir)) {
        free(t);
        return -1;
    }
    t->have_qemu_img = system("qemu-img --version >/dev/null 2>&1") == 0;
    t->have_qemu_io = system("qemu-io --version >/dev/null 2>&1") == 0;
    *state = t;
    return 0;
}

static int group_teardown(void **state)
{
    struct tmp *t = *state;
    char cmd[128];

    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", t->dir);
    if (system(cmd) != 0)
        return -1;
    free(t);
    return 0;
}

__attribute__((format(printf, 1, 2)))
static void run(const char *fmt, ...)
{
    char cmd[1024];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(cmd, sizeof(cmd), fmt, ap);
    va_end(ap);
    print_message("$ %s\n", cmd);
    assert_int_equal(system(cmd), 0);
}

/* The output of a command, NUL-terminated (malloc'd). */
static char *capture(const char *cmd)
{
    FILE *f = popen(cmd, "r");
    size_t cap = 65536, n = 0;
    char *s = malloc(cap);

    assert_non_null(f);
    assert_non_null(s);
    n = fread(s, 1, cap - 1, f);
    s[n] = '\0';
    assert_int_equal(pclose(f), 0);
    return s;
}

/* The value of "key" in qemu-img's JSON (first occurrence), as text
 * without quotes; false if absent. */
static bool json_get(const char *json, const char *key, char *out,
                     size_t outlen)
{
    char pat[64];
    const char *p;
    size_t n = 0;

    snprintf(pat, sizeof(pat), "\"%s\": ", key);
    p = strstr(json, pat);
    if (!p)
        return false;
    p += strlen(pat);
    if (*p == '"') {
        p++;
        while (p[n] && p[n] != '"')
            n++;
    } else {
        while (p[n] && p[n] != ',' && p[n] != '\n' && p[n] != '}')
            n++;
    }
    assert_true(n < outlen);
    memcpy(out, p, n);
    out[n] = '\0';
    return true;
}

static uint64_t json_u64(const char *json, const char *key)
{
    char v[64];

    assert_true(json_get(json, key, v, sizeof(v)));
    return strtoull(v, NULL, 10);
}

static size_t count(const char *s, const char *needle)
{
    size_t n = 0;

    while ((s = strstr(s, needle))) {
        n++;
        s += strlen(needle);
    }
    return n;
}

/* What a test asks qemu-img for and expects to find. */
struct image {
    const char *name;
    const char *opts;          /* -o ... */
    uint64_t size;
    bool backing;              /* -b base.raw -F raw */
    bool bitmap;               /* qemu-img bitmap --add */
    uint32_t version;
    uint32_t cluster_size;
    uint32_t refcount_bits;
    uint8_t compression_type;
    bool extended_l2;
    bool lazy;
};

static const struct image images[] = {
    { "v2", "compat=0.10", GiB, false, false, 2, 65536, 16, 0, false, false },
    { "v2-backing", "compat=0.10", 4 * MiB, true, false, 2, 65536, 16, 0,
      false, false },
    { "v3", "compat=1.1", GiB, false, false, 3, 65536, 16, 0, false, false },
    { "c512", "cluster_size=512", GiB, false, false, 3, 512, 16, 0, false,
      false },
    { "c4k", "cluster_size=4k", 10 * GiB, false, false, 3, 4096, 16, 0,
      false, false },
    { "c64k", "cluster_size=64k", 100 * GiB, false, false, 3, 65536, 16, 0,
      false, false },
    { "c2M", "cluster_size=2M", 1024 * GiB, false, false, 3, 2 * 1048576, 16,
      0, false, false },
    { "c2M-v2", "cluster_size=2M,compat=0.10", GiB, false, false, 2,
      2 * 1048576, 16, 0, false, false },
    { "r1", "refcount_bits=1", GiB, false, false, 3, 65536, 1, 0, false,
      false },
    { "r2", "refcount_bits=2", GiB, false, false, 3, 65536, 2, 0, false,
      false },
    { "r4", "refcount_bits=4,cluster_size=512", GiB, false, false, 3, 512, 4,
      0, false, false },
    { "r8", "refcount_bits=8", GiB, false, false, 3, 65536, 8, 0, false,
      false },
    { "r16", "refcount_bits=16", GiB, false, false, 3, 65536, 16, 0, false,
      false },
    { "r32", "refcount_bits=32", GiB, false, false, 3, 65536, 32, 0, false,
      false },
    { "r64", "refcount_bits=64", GiB, false, false, 3, 65536, 64, 0, false,
      false },
    { "r64-512", "refcount_bits=64,cluster_size=512", 16 * GiB, false, false,
      3, 512, 64, 0, false, false },
    { "zstd", "compression_type=zstd", GiB, false, false, 3, 65536, 16, 1,
      false, false },
    { "extl2-16k", "extended_l2=on,cluster_size=16k", GiB, false, false, 3,
      16384, 16, 0, true, false },
    { "extl2-64k", "extended_l2=on", GiB, false, false, 3, 65536, 16, 0, true,
      false },
    { "extl2-2M-zstd", "extended_l2=on,cluster_size=2M,compression_type=zstd",
      GiB, false, false, 3, 2 * 1048576, 16, 1, true, false },
    { "lazy", "lazy_refcounts=on", GiB, false, false, 3, 65536, 16, 0, false,
      true },
    { "backing", "compat=1.1", 4 * MiB, true, false, 3, 65536, 16, 0, false,
      false },
    { "bitmap", "compat=1.1", GiB, false, true, 3, 65536, 16, 0, false,
      false },
    { "backing-bitmap-4k", "cluster_size=4k", 4 * MiB, true, true, 3, 4096,
      16, 0, false, false },
    { "empty", "compat=1.1", 0, false, false, 3, 65536, 16, 0, false, false },
};

/* Reads the first cluster of an image (exactly, in a heap buffer of
 * cluster size) and its file size; parses the header on the way. */
static uint8_t *read_image(const char *path, struct qcow2_header *h,
                           char *err, size_t errlen)
{
    struct stat st;
    FILE *f = fopen(path, "rb");
    uint8_t *all, *c0;
    size_t n;

    assert_non_null(f);
    assert_int_equal(fstat(fileno(f), &st), 0);
    all = malloc(2 * MiB);
    assert_non_null(all);
    n = fread(all, 1, 2 * MiB, f);
    fclose(f);
    assert_true(n >= 512);
    assert_int_equal(qcow2_header_parse(all, n, (uint64_t)st.st_size, h, err,
                                        errlen), 0);
    assert_true(n >= h->cluster_size);
    c0 = dup_exact(all, h->cluster_size);
    free(all);
    return c0;
}

static void check_image(const struct tmp *t, const struct image *im)
{
    char path[128], cmd[256], v[256];
    struct qcow2_header h, h2;
    struct qcow2_extensions ext;
    char err[160];
    char *json;
    uint8_t *c0, *out;
    uint64_t l2_cover;

    print_message("image %s: -o %s\n", im->name, im->opts);
    snprintf(path, sizeof(path), "%s/%s.qcow2", t->dir, im->name);
    run("cd '%s' && qemu-img create -q -f qcow2 -o %s %s %s.qcow2 %llu",
        t->dir, im->opts, im->backing ? "-b base.raw -F raw" : "", im->name,
        (unsigned long long)im->size);
    if (im->bitmap)
        run("qemu-img bitmap --add '%s' bm0 && "
            "qemu-img bitmap --add -g 128k '%s' bm1", path, path);

    snprintf(cmd, sizeof(cmd), "qemu-img info --output=json '%s'", path);
    json = capture(cmd);

    c0 = read_image(path, &h, err, sizeof(err));
    assert_int_equal(qcow2_header_parse_extensions(c0, h.cluster_size, &h,
                                                   &ext, err, sizeof(err)), 0);
    assert_int_equal(qcow2_header_check_features(&h, &ext, false, err,
                                                 sizeof(err)), 0);

    /* What the test asked for. */
    assert_int_equal(h.magic, QCOW2_MAGIC);
    assert_int_equal(h.version, im->version);
    assert_int_equal(h.cluster_size, im->cluster_size);
    assert_int_equal(h.size, im->size);
    assert_int_equal(h.refcount_bits, im->refcount_bits);
    assert_int_equal(h.compression_type, im->compression_type);
    assert_int_equal(h.extended_l2, im->extended_l2);
    assert_int_equal(h.lazy_refcounts, im->lazy);
    assert_int_equal(h.crypt_method, 0);
    assert_int_equal(h.nb_snapshots, 0);
    assert_false(h.dirty);
    assert_false(h.corrupt);
    assert_int_equal(h.header_length, im->version == 2 ? 72 : 112);
    assert_int_equal(!!(h.incompatible_features &
                        QCOW2_INCOMPAT_COMPRESSION),
                     im->compression_type != 0);

    /* Derived values, from the spec's formulas. */
    assert_int_equal(h.l2_entries,
                     h.cluster_size / (im->extended_l2 ? 16 : 8));
    assert_int_equal(h.subcluster_size,
                     h.cluster_size / (im->extended_l2 ? 32 : 1));
    assert_int_equal(UINT64_C(1) << h.refcount_block_bits,
                     (uint64_t)h.cluster_size * 8 / h.refcount_bits);
    l2_cover = (uint64_t)h.cluster_size * h.l2_entries;
    assert_int_equal(h.l1_size_min, (im->size + l2_cover - 1) / l2_cover);
    assert_true(h.l1_size >= h.l1_size_min);

    /* What qemu-img says. */
    assert_int_equal(json_u64(json, "cluster-size"), h.cluster_size);
    assert_int_equal(json_u64(json, "virtual-size"), h.size);
    assert_true(json_get(json, "compat", v, sizeof(v)));
    assert_string_equal(v, h.version == 2 ? "0.10" : "1.1");
    assert_int_equal(json_u64(json, "refcount-bits"), h.refcount_bits);
    if (json_get(json, "compression-type", v, sizeof(v)))
        assert_string_equal(v, h.compression_type ? "zstd" : "zlib");
    if (json_get(json, "extended-l2", v, sizeof(v)))
        assert_string_equal(v, h.extended_l2 ? "true" : "false");
    if (json_get(json, "lazy-refcounts", v, sizeof(v)))
        assert_string_equal(v, h.lazy_refcounts ? "true" : "false");
    assert_true(json_get(json, "corrupt", v, sizeof(v)) == (h.version == 3));

    /* Backing file name and format. */
    assert_int_equal(ext.has_backing_file, im->backing);
    if (im->backing) {
        assert_true(json_get(json, "backing-filename", v, sizeof(v)));
        assert_string_equal(ext.backing_file, v);
        assert_string_equal(ext.backing_file, "base.raw");
        assert_int_equal(ext.backing_file_len, 8);
        assert_int_equal(h.backing_file_size, 8);
        assert_true(ext.has_backing_format);
        assert_true(json_get(json, "backing-filename-format", v, sizeof(v)));
        assert_string_equal(ext.backing_format, v);
        assert_string_equal(ext.backing_format, "raw");
        assert_int_equal(ext.limit, h.backing_file_offset);
    } else {
        assert_false(json_get(json, "backing-filename", v, sizeof(v)));
        assert_false(ext.has_backing_format);
        assert_int_equal(ext.limit, h.cluster_size);
    }

    /* Bitmaps: autoclear bit 0 and the extension. */
    assert_int_equal(ext.has_bitmaps, im->bitmap);
    assert_int_equal(ext.bitmaps_consistent, im->bitmap);
    assert_int_equal(!!(h.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS),
                     im->bitmap);
    if (im->bitmap) {
        assert_int_equal(ext.nb_bitmaps, 2);
        assert_int_equal(count(json, "\"granularity\": "), 2);
        assert_int_equal(count(json, "\"name\": \"bm0\""), 1);
        assert_int_equal(count(json, "\"name\": \"bm1\""), 1);
        assert_int_equal(ext.bitmap_directory_offset % h.cluster_size, 0);
        /* Two entries of 24 bytes + a 3-byte name, padded: 2 * 32. */
        assert_int_equal(ext.bitmap_directory_size, 64);
    }

    /* QEMU writes a feature name table in version 3 images with clusters
     * large enough (not with 512 bytes or 4 KiB); it names bit 0 "dirty
     * bit". */
    if (ext.feature_table) {
        size_t n = 0;
        const char *name = qcow2_feature_name(&ext, QCOW2_FEATURE_INCOMPAT,
                                              0, &n);

        assert_non_null(name);
        assert_int_equal(n, 9);
        assert_memory_equal(name, "dirty bit", 9);
        assert_true(ext.n_features >= 5);
    } else {
        assert_true(h.version == 2 || h.cluster_size < 16384);
    }
    assert_int_equal(ext.n_unknown, 0);
    assert_null(ext.data_file);
    assert_false(ext.has_crypto_header);

    /* Serialize round trip: the bytes of the fixed part are the original
     * ones, and parsing them again gives the same header. */
    out = dup_exact(c0, h.cluster_size);
    memset(out, 0xee, qcow2_header_serialized_size(&h));
    assert_int_equal(qcow2_header_serialize(&h, out, h.cluster_size),
                     h.version == 2 ? 72 : 105);
    assert_memory_equal(out, c0, h.cluster_size);
    assert_int_equal(qcow2_header_parse(out, h.cluster_size, h.file_size, &h2,
                                        err, sizeof(err)), 0);
    assert_header_equal(&h, &h2);

    free(out);
    free(c0);
    free(json);
}

static void test_real_images(void **state)
{
    const struct tmp *t = *state;

    if (!t->have_qemu_img) {
        print_message("qemu-img not found: skipped\n");
        skip();
    }
    run("qemu-img create -q -f raw '%s/base.raw' 4M", t->dir);
    for (size_t i = 0; i < ARRAY_SIZE(images); i++)
        check_image(t, &images[i]);
}

/* An image left dirty by a crash (lazy refcounts, qemu-io abort): the
 * dirty bit is reported and does not stop the open. */
static void test_real_dirty_image(void **state)
{
    const struct tmp *t = *state;
    struct qcow2_header h;
    struct qcow2_extensions ext;
    char err[160], path[128];
    uint8_t *c0;

    if (!t->have_qemu_img || !t->have_qemu_io) {
        print_message("qemu-img or qemu-io not found: skipped\n");
        skip();
    }
    snprintf(path, sizeof(path), "%s/dirty.qcow2", t->dir);
    run("qemu-img create -q -f qcow2 -o lazy_refcounts=on '%s' 1M", path);
    /* abort() kills qemu-io: its exit status is not 0. */
    run("sh -c \"qemu-io -c 'write 0 64k' -c abort '%s'\" >/dev/null 2>&1; "
        "true", path);
    c0 = read_image(path, &h, err, sizeof(err));
    assert_true(h.dirty);
    assert_true(h.lazy_refcounts);
    assert_int_equal(h.incompatible_features, QCOW2_INCOMPAT_DIRTY);
    assert_int_equal(qcow2_header_parse_extensions(c0, h.cluster_size, &h,
                                                   &ext, err, sizeof(err)), 0);
    assert_int_equal(qcow2_header_check_features(&h, &ext, false, err,
                                                 sizeof(err)), 0);
    free(c0);
}

/* ======================= errno ======================= */

static void test_errno_untouched(void **state)
{
    uint8_t *b = make_header();
    struct qcow2_header h;
    struct qcow2_extensions ext;
    char err[64];

    (void)state;
    errno = 4242;
    be_put32(b + 4, 9);
    assert_int_equal(qcow2_header_parse(b, SYN_CLUSTER, SYN_FILE_SIZE, &h, err,
                                        sizeof(err)), -ENOTSUP);
    be_put32(b + 4, 3);
    assert_int_equal(qcow2_header_parse(b, SYN_CLUSTER, SYN_FILE_SIZE, &h, err,
                                        sizeof(err)), 0);
    be_put32(b + 112, 0x12345678);
    be_put32(b + 116, UINT32_MAX);
    assert_int_equal(qcow2_header_parse_extensions(b, SYN_CLUSTER, &h, &ext,
                                                   err, sizeof(err)), -EINVAL);
    h.incompatible_features |= UINT64_C(1) << 20;
    assert_int_equal(qcow2_header_check_features(&h, NULL, false, err,
                                                 sizeof(err)), -ENOTSUP);
    assert_int_equal(errno, 4242);
    free(b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_synthetic_valid),
        cmocka_unit_test(test_synthetic_v2),
        cmocka_unit_test(test_hostile_corpus),
        cmocka_unit_test(test_unknown_feature_named),
        cmocka_unit_test(test_extensions_walk),
        cmocka_unit_test(test_extensions_unaligned_backing),
        cmocka_unit_test(test_extensions_many_unknown),
        cmocka_unit_test(test_synthetic_limits),
        cmocka_unit_test(test_serialize_roundtrip),
        cmocka_unit_test(test_refcount_max),
        cmocka_unit_test(test_refcount_layout),
        cmocka_unit_test(test_refcount_roundtrip),
        cmocka_unit_test(test_l1_entry),
        cmocka_unit_test(test_l2_standard),
        cmocka_unit_test(test_l2_compressed),
        cmocka_unit_test(test_l2_extended),
        cmocka_unit_test(test_real_images),
        cmocka_unit_test(test_real_dirty_image),
        cmocka_unit_test(test_errno_untouched),
    };

    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
