/* strata — fuzz target: the qcow2 header parser (formats/qcow2-header.c).
 *
 * An image header is written by whoever made the image: every byte of it
 * is untrusted.  Input layout:
 *
 *   byte 0      bits 0..5: log2 of the image file's size (62 and 63:
 *               2^64 - 1); bit 6: open read-only
 *   bytes 1..   the first cluster of the image (zero-filled up to the
 *               cluster size when shorter, as a short file reads)
 *
 * The three opening steps run in order, as the qcow2 driver runs them;
 * then the entry decoders and the bitmap directory parser run over the
 * same bytes as L1/L2 entries and as a directory.
 *
 * Properties: a header that parses serializes back to the same bytes;
 * what the extension walk returns lies inside the first cluster; a header
 * that passes the feature check has no unknown incompatible bit and is not
 * corrupt unless read-only; decoded entries respect the alignment the
 * decoders promise.
 */
#include <errno.h>
#include <stdbool.h>

#include "byteorder.h"
#include "fuzz.h"
#include "qcow2-header.h"

#define MAX_WORDS 64

static bool inside(const void *p, size_t n, const uint8_t *buf, size_t len)
{
    const uint8_t *q = p;

    return q >= buf && q <= buf + len && n <= (size_t)(buf + len - q);
}

static void check_message(int r, const char *err)
{
    FUZZ_CHECK(r < 0);
    FUZZ_CHECK(memchr(err, '\0', 256) != NULL && err[0] != '\0');
}

static void check_serialize(const struct qcow2_header *h, const uint8_t *b,
                            size_t n)
{
    uint8_t *copy = fuzz_dup(b, n);
    size_t want = qcow2_header_serialized_size(h), w;
    struct qcow2_header h2;
    char err[256];

    FUZZ_CHECK(want <= n);
    /* Over a zeroed copy the fields are written back... */
    memset(copy, 0, want);
    w = qcow2_header_serialize(h, copy, n);
    FUZZ_CHECK(w == want);
    /* ...to exactly the bytes they were read from. */
    FUZZ_CHECK(memcmp(copy, b, n) == 0);
    FUZZ_CHECK(qcow2_header_serialize(h, copy, want - 1) == 0);
    FUZZ_CHECK(qcow2_header_parse(copy, n, h->file_size, &h2, err,
                                  sizeof(err)) == 0);
    FUZZ_CHECK(h2.cluster_size == h->cluster_size &&
               h2.l2_entries == h->l2_entries &&
               h2.l1_size_min == h->l1_size_min &&
               h2.refcount_block_bits == h->refcount_block_bits);
    free(copy);
}

static void check_extensions(const struct qcow2_header *h, const uint8_t *b,
                             size_t n, bool read_only)
{
    struct qcow2_extensions ext;
    size_t cs = h->cluster_size, name_len;
    uint8_t *c0 = calloc(1, cs);
    char err[256];
    int r;

    if (!c0)
        abort();
    memcpy(c0, b, n < cs ? n : cs);

    FUZZ_CHECK(qcow2_header_parse_extensions(c0, cs - 1, h, &ext, err,
                                             sizeof(err)) == -EINVAL);
    r = qcow2_header_parse_extensions(c0, cs, h, &ext, err, sizeof(err));
    if (r < 0) {
        FUZZ_CHECK(r == -EINVAL);
        check_message(r, err);
        free(c0);
        return;
    }
    FUZZ_CHECK(ext.start == h->header_length);
    FUZZ_CHECK(ext.start <= ext.limit && ext.limit <= cs);
    FUZZ_CHECK(ext.end <= ext.limit);
    if (ext.has_backing_file) {
        FUZZ_CHECK(ext.backing_file_len <= QCOW2_MAX_BACKING_NAME);
        FUZZ_CHECK(strlen(ext.backing_file) == ext.backing_file_len);
    }
    if (ext.has_backing_format) {
        size_t fl = strlen(ext.backing_format);

        FUZZ_CHECK(fl >= 1 && fl <= QCOW2_MAX_FORMAT_NAME);
        for (size_t i = 0; i < fl; i++)
            FUZZ_CHECK(ext.backing_format[i] >= 0x20 &&
                       ext.backing_format[i] < 0x7f);
    }
    if (ext.feature_table)
        FUZZ_CHECK(inside(ext.feature_table,
                          (size_t)ext.n_features * QCOW2_FEATURE_ENTRY_SIZE,
                          c0, ext.limit));
    if (ext.data_file)
        FUZZ_CHECK(inside(ext.data_file, ext.data_file_len, c0, ext.limit));
    if (ext.bitmaps_consistent)
        FUZZ_CHECK(ext.has_bitmaps && ext.nb_bitmaps >= 1 &&
                   ext.nb_bitmaps <= QCOW2_MAX_BITMAPS &&
                   ext.bitmap_directory_offset % cs == 0);
    for (uint32_t i = 0; i < ext.n_unknown && i < QCOW2_MAX_UNKNOWN_EXT; i++)
        FUZZ_CHECK(ext.unknown[i].offset >= ext.start &&
                   (uint64_t)ext.unknown[i].offset + 8 +
                   ext.unknown[i].length <= ext.limit);

    for (unsigned type = 0; type <= 3; type++)
        for (unsigned bit = 0; bit < 64; bit++) {
            const char *name = qcow2_feature_name(&ext, type, bit, &name_len);

            if (name)
                FUZZ_CHECK(name_len <= QCOW2_FEATURE_NAME_SIZE &&
                           inside(name, name_len, c0, ext.limit));
        }

    r = qcow2_header_check_features(h, &ext, read_only, err, sizeof(err));
    if (r == 0) {
        FUZZ_CHECK(!(h->incompatible_features & ~QCOW2_INCOMPAT_KNOWN));
        FUZZ_CHECK(!h->corrupt || read_only);
    } else {
        FUZZ_CHECK(r == -ENOTSUP || r == -EACCES);
        check_message(r, err);
    }
    free(c0);
}

static void check_entries(const struct qcow2_header *h, const uint8_t *b,
                          size_t n)
{
    size_t words = n / 8 < MAX_WORDS ? n / 8 : MAX_WORDS;

    for (size_t i = 0; i < words; i++) {
        uint64_t entry = be_get64(b + 8 * i);
        uint64_t bitmap = i + 1 < words ? be_get64(b + 8 * (i + 1)) : 0;
        struct qcow2_l1_entry l1;
        struct qcow2_l2_entry l2;

        if (qcow2_l1_entry_decode(h, entry, &l1) == 0)
            FUZZ_CHECK(l1.l2_offset % h->cluster_size == 0);
        if (qcow2_l2_entry_decode(h, entry, bitmap, &l2) != 0)
            continue;
        switch (l2.type) {
        case QCOW2_CLUSTER_NORMAL:
        case QCOW2_CLUSTER_ZERO_ALLOC:
            /* Offset 0 is a cluster like any other in an external data
             * file (spec: there, bit 63 tells it from unallocated). */
            FUZZ_CHECK(l2.host_offset % h->cluster_size == 0);
            FUZZ_CHECK(l2.host_offset != 0 || h->external_data_file);
            break;
        case QCOW2_CLUSTER_COMPRESSED:
            FUZZ_CHECK(l2.nb_sectors >= 1);
            FUZZ_CHECK(l2.host_offset < (UINT64_C(1) << 56));
            FUZZ_CHECK(l2.compressed_len <= (uint64_t)l2.nb_sectors * 512);
            break;
        case QCOW2_CLUSTER_UNALLOCATED:
        case QCOW2_CLUSTER_ZERO_PLAIN:
        case QCOW2_CLUSTER_UNALLOCATED_ALLOC:
            break;
        default:
            FUZZ_CHECK(!"unknown cluster type");
        }
        if (h->extended_l2) {
            FUZZ_CHECK(!(l2.alloc_bitmap & l2.zero_bitmap));
            for (unsigned sc = 0; sc < QCOW2_SUBCLUSTERS; sc++)
                FUZZ_CHECK(qcow2_subcluster_type(h, &l2, sc) <=
                           QCOW2_CLUSTER_COMPRESSED);
        }
    }
}

static void check_refcounts(const struct qcow2_header *h, const uint8_t *b,
                            size_t n)
{
    const unsigned order = h->refcount_order;
    const uint64_t entries = (uint64_t)n * 8 >> order;
    uint8_t *block;

    if (entries == 0)
        return;
    block = fuzz_dup(b, n);
    for (uint64_t i = 0; i < entries && i < MAX_WORDS; i++) {
        uint64_t seed = n >= 8 ? be_get64(b + 8 * (i % (n / 8))) : (uint64_t)i;
        uint64_t idx = (seed + i) % entries;
        uint64_t v = (qcow2_refcount_get(block, order, idx) + i) &
                     qcow2_refcount_max(order);
        uint64_t other = qcow2_refcount_get(block, order, (idx + 1) % entries);

        qcow2_refcount_set(block, order, idx, v);
        FUZZ_CHECK(qcow2_refcount_get(block, order, idx) == v);
        if ((idx + 1) % entries != idx)
            FUZZ_CHECK(qcow2_refcount_get(block, order,
                                          (idx + 1) % entries) == other);
    }
    free(block);
}

static void check_bitmap_directory(const uint8_t *b, size_t n)
{
    uint64_t pos = 0;

    for (int i = 0; i < 256 && pos < n; i++) {
        struct qcow2_bitmap_entry e;

        if (qcow2_bitmap_entry_parse(b, n, pos, &e) != 0)
            break;
        FUZZ_CHECK(e.size >= QCOW2_BITMAP_ENTRY_MIN && e.size <= n - pos);
        FUZZ_CHECK((uint64_t)e.table_size * 8 <= QCOW2_MAX_BITMAP_TABLE_BYTES);
        pos += e.size;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct qcow2_header h;
    char err[256];
    uint64_t file_size;
    bool read_only;
    uint8_t *b;
    size_t n;
    unsigned shift;
    int r;

    if (size < 1)
        return 0;
    shift = data[0] & 63;
    file_size = shift >= 62 ? UINT64_MAX : UINT64_C(1) << shift;
    read_only = data[0] & 64;
    n = size - 1;
    b = fuzz_dup(data + 1, n);

    check_bitmap_directory(b, n);

    memset(err, 0, sizeof(err));
    r = qcow2_header_parse(b, n, file_size, &h, err, sizeof(err));
    if (r < 0) {
        FUZZ_CHECK(r == -EINVAL || r == -ENOTSUP || r == -EFBIG);
        check_message(r, err);
        free(b);
        return 0;
    }
    FUZZ_CHECK(r == 0);
    FUZZ_CHECK(h.version == 2 || h.version == 3);
    FUZZ_CHECK(h.cluster_bits >= QCOW2_MIN_CLUSTER_BITS &&
               h.cluster_bits <= QCOW2_MAX_CLUSTER_BITS);
    FUZZ_CHECK(h.cluster_size == UINT32_C(1) << h.cluster_bits);
    FUZZ_CHECK(h.header_length <= n && h.header_length <= h.cluster_size);
    FUZZ_CHECK(h.size <= QCOW2_MAX_SIZE);
    FUZZ_CHECK(h.refcount_order <= 6);
    FUZZ_CHECK(h.l1_size >= h.l1_size_min);
    FUZZ_CHECK(h.l1_table_offset % h.cluster_size == 0 &&
               h.refcount_table_offset % h.cluster_size == 0);

    check_serialize(&h, b, n);
    check_extensions(&h, b, n, read_only);
    check_entries(&h, b, n);
    check_refcounts(&h, b, n);
    free(b);
    return 0;
}
