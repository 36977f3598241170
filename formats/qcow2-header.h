/* strata — qcow2 header: parse, validate and rewrite the image header, walk
 * its extensions, and decode the small on-disk entries the cluster map and
 * the refcount code are built from.
 *
 * Pure functions over caller-provided buffers: no I/O, no allocation, no
 * global state, never touches errno.  Parsers take (buf, len) and never
 * read past len.  Control-path functions return 0 or -errno and write a
 * one-phrase message into (err, errlen) (err may be NULL); data-path
 * helpers (entry decoding, refcount arithmetic) have no message.
 *
 * "spec" below means ../shared/specs/qcow2.txt.
 *
 * Opening an image takes three steps, in this order:
 *   1. qcow2_header_parse()            fixed header fields, against the file
 *                                      size;
 *   2. qcow2_header_parse_extensions() header extensions and the backing
 *                                      file name, over the first cluster;
 *   3. qcow2_header_check_features()   unknown incompatible features (named
 *                                      from the feature name table) and the
 *                                      corrupt bit against the open mode.
 * Unknown incompatible bits are deliberately not refused in step 1, so
 * that step 3 can name them from the table found in step 2.
 */
#ifndef STRATA_QCOW2_HEADER_H
#define STRATA_QCOW2_HEADER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ======================= header ======================= */

#define QCOW2_MAGIC              0x514649fbu     /* "QFI\xfb" */
#define QCOW2_V2_HEADER_LENGTH   72u             /* spec: v2 is exactly 72 */
#define QCOW2_V3_HEADER_LENGTH   104u            /* spec: v3 at least 104 */
#define QCOW2_COMPRESSION_TYPE_OFFSET 104u       /* first additional field */

#define QCOW2_MIN_CLUSTER_BITS   9               /* spec: at least 512 bytes */
#define QCOW2_MAX_CLUSTER_BITS   21              /* QEMU's 2 MiB limit */
#define QCOW2_EXTL2_MIN_CLUSTER_BITS 14          /* spec: 16 KiB with ext. L2 */

/* Implementation limits (the same as QEMU's, see the notes in the spec). */
#define QCOW2_MAX_SIZE           (UINT64_C(1) << 61)     /* virtual size */
#define QCOW2_MAX_L1_BYTES       (UINT64_C(32) << 20)    /* active L1 table */
#define QCOW2_MAX_REFTABLE_BYTES (UINT64_C(8) << 20)     /* refcount table */
#define QCOW2_MAX_SNAPSHOTS      65536u
#define QCOW2_MAX_BACKING_NAME   1023u           /* spec: backing_file_size */
#define QCOW2_MAX_FORMAT_NAME    15u             /* backing format string */
#define QCOW2_MAX_BITMAPS        65535u          /* spec note: QEMU's limit */
#define QCOW2_MAX_BITMAP_DIR_BYTES (UINT64_C(64) << 20)

/* crypt_method values. */
#define QCOW2_CRYPT_NONE 0u
#define QCOW2_CRYPT_AES  1u
#define QCOW2_CRYPT_LUKS 2u

/* compression_type values. */
#define QCOW2_COMPRESSION_ZLIB 0u
#define QCOW2_COMPRESSION_ZSTD 1u

/* Incompatible feature bits. */
#define QCOW2_INCOMPAT_DIRTY       (UINT64_C(1) << 0)
#define QCOW2_INCOMPAT_CORRUPT     (UINT64_C(1) << 1)
#define QCOW2_INCOMPAT_DATA_FILE   (UINT64_C(1) << 2)
#define QCOW2_INCOMPAT_COMPRESSION (UINT64_C(1) << 3)
#define QCOW2_INCOMPAT_EXTL2       (UINT64_C(1) << 4)
#define QCOW2_INCOMPAT_KNOWN       (UINT64_C(0x1f))

/* Compatible feature bits. */
#define QCOW2_COMPAT_LAZY_REFCOUNTS (UINT64_C(1) << 0)

/* Autoclear feature bits. */
#define QCOW2_AUTOCLEAR_BITMAPS       (UINT64_C(1) << 0)
#define QCOW2_AUTOCLEAR_DATA_FILE_RAW (UINT64_C(1) << 1)

/* Every field of the v2 and v3 header, in host byte order, plus values
 * derived from them.  For version 2 the v3 fields hold the values the spec
 * says to assume: no feature bits, refcount_order 4, header_length 72,
 * compression_type 0 (zlib). */
struct qcow2_header {
    /* ---- on disk ---- */
    uint32_t magic;
    uint32_t version;                 /* 2 or 3 */
    uint64_t backing_file_offset;     /* 0: no backing file */
    uint32_t backing_file_size;
    uint32_t cluster_bits;
    uint64_t size;                    /* virtual disk size in bytes */
    uint32_t crypt_method;
    uint32_t l1_size;                 /* entries in the active L1 table */
    uint64_t l1_table_offset;
    uint64_t refcount_table_offset;
    uint32_t refcount_table_clusters;
    uint32_t nb_snapshots;
    uint64_t snapshots_offset;
    uint64_t incompatible_features;   /* v3 */
    uint64_t compatible_features;     /* v3 */
    uint64_t autoclear_features;      /* v3 */
    uint32_t refcount_order;          /* v3; 4 for v2 */
    uint32_t header_length;           /* v3; 72 for v2 */
    uint8_t compression_type;         /* v3 with header_length > 104, or 0 */

    /* ---- derived ---- */
    uint64_t file_size;               /* what the header was checked against */
    uint32_t cluster_size;            /* 1 << cluster_bits */
    bool extended_l2;                 /* incompatible bit 4 */
    uint32_t l2_entry_size;           /* 8, or 16 with extended L2 */
    uint32_t l2_bits;                 /* log2(l2_entries) */
    uint32_t l2_entries;              /* entries per L2 table */
    uint32_t l1_size_min;             /* L1 entries needed to cover size */
    uint32_t refcount_bits;           /* 1 << refcount_order */
    uint32_t refcount_block_bits;     /* log2(entries per refcount block) */
    uint32_t subcluster_bits;         /* cluster_bits - 5 with extended L2,
                                         else cluster_bits */
    uint32_t subcluster_size;         /* cluster_size / 32 with extended L2,
                                         else cluster_size */
    bool dirty;                       /* incompatible bit 0 */
    bool corrupt;                     /* incompatible bit 1 */
    bool external_data_file;          /* incompatible bit 2 */
    bool lazy_refcounts;              /* compatible bit 0 */
};

/* Parses and validates the fixed header at the start of buf (len bytes, at
 * least header_length of them; the first cluster is always enough) against
 * the image file's size.  Checks everything the header alone allows:
 * magic, version, cluster_bits, header_length, size, crypt_method, the
 * position and size of the L1 table, the refcount table and the snapshot
 * table (aligned, inside the file, not over the header cluster nor over
 * each other), the backing file name's place, refcount_order,
 * compression_type and the feature bits that constrain other fields.
 * Unknown incompatible bits are not refused here: see
 * qcow2_header_check_features().
 *
 * Returns 0 and fills *h, or:
 *   -EINVAL   malformed or inconsistent header, truncated buffer;
 *   -ENOTSUP  valid but unsupported: version other than 2 or 3, encryption,
 *             compression type other than zlib or zstd;
 *   -EFBIG    over an implementation limit (virtual size, L1 table,
 *             refcount table, snapshot count). */
int qcow2_header_parse(const void *buf, size_t len, uint64_t file_size,
                       struct qcow2_header *h, char *err, size_t errlen);

/* Number of bytes qcow2_header_serialize() writes for h: 72 for version 2,
 * 104 for version 3, 105 when the header has a compression_type field. */
size_t qcow2_header_serialized_size(const struct qcow2_header *h);

/* Writes the fixed header fields of h (big endian) at the start of buf,
 * for a writer that changed some of them (dirty bit, autoclear bits...).
 * Bytes past the fields it knows (padding, unknown additional fields,
 * extensions) are left untouched, so serialize over the first cluster as
 * read from disk.  Returns the bytes written, or 0 if cap is too small.
 * Setting v3-only fields in a version 2 header is a programmer error
 * (asserted). */
size_t qcow2_header_serialize(const struct qcow2_header *h, void *buf,
                              size_t cap);

/* Autoclear bits this implementation knows (bitmaps, raw external data).
 * Spec: a writer must clear every other autoclear bit before writing. */
uint64_t qcow2_autoclear_known_mask(void);

/* ======================= extensions ======================= */

#define QCOW2_EXT_END            0x00000000u
#define QCOW2_EXT_BACKING_FORMAT 0xe2792acau
#define QCOW2_EXT_FEATURE_TABLE  0x6803f857u
#define QCOW2_EXT_BITMAPS        0x23852875u
#define QCOW2_EXT_CRYPTO_HEADER  0x0537be77u
#define QCOW2_EXT_DATA_FILE      0x44415441u

#define QCOW2_FEATURE_ENTRY_SIZE 48u             /* type, bit, 46-byte name */
#define QCOW2_FEATURE_NAME_SIZE  46u
#define QCOW2_FEATURE_INCOMPAT   0u
#define QCOW2_FEATURE_COMPAT     1u
#define QCOW2_FEATURE_AUTOCLEAR  2u

#define QCOW2_MAX_UNKNOWN_EXT    16u

/* An extension this implementation does not know, to be copied verbatim by
 * a writer that rewrites the extension area. */
struct qcow2_ext_unknown {
    uint32_t type;
    uint32_t offset;      /* of its 8-byte extension header in cluster 0 */
    uint32_t length;      /* data bytes, without the padding to 8 */
};

/* What the extension area and the backing file name hold.  Pointers point
 * into the caller's cluster-0 buffer and live as long as it does; names
 * that are copied are NUL-terminated. */
struct qcow2_extensions {
    uint32_t start;               /* header_length: first extension */
    uint32_t end;                 /* offset of the end marker, or where the
                                     area ends if there is none */
    uint32_t limit;               /* end of the area: backing_file_offset or
                                     the cluster size */

    bool has_backing_file;
    uint32_t backing_file_len;
    char backing_file[QCOW2_MAX_BACKING_NAME + 1];

    bool has_backing_format;
    char backing_format[QCOW2_MAX_FORMAT_NAME + 1];

    const uint8_t *feature_table; /* n_features entries of 48 bytes */
    uint32_t n_features;

    bool has_bitmaps;
    bool bitmaps_consistent;      /* extension present and autoclear bit 0 */
    uint32_t nb_bitmaps;
    uint64_t bitmap_directory_size;
    uint64_t bitmap_directory_offset;

    bool has_crypto_header;
    uint64_t crypto_header_offset;
    uint64_t crypto_header_length;

    const char *data_file;        /* not NUL-terminated */
    uint32_t data_file_len;

    uint32_t n_unknown;           /* all unknown extensions seen; only the
                                     first QCOW2_MAX_UNKNOWN_EXT are listed
                                     (a writer must not rewrite the area
                                     when n_unknown is larger) */
    struct qcow2_ext_unknown unknown[QCOW2_MAX_UNKNOWN_EXT];
};

/* Walks the header extensions of an image whose header h was parsed by
 * qcow2_header_parse(): from header_length to the end marker, the backing
 * file name (at backing_file_offset) or the end of the first cluster,
 * whichever comes first; and extracts the backing file name.  cluster0
 * holds the first cluster (len >= cluster_size).
 *
 * Checks: every extension (8-byte header and data) fits the area; the
 * known ones appear at most once and have the right length; the backing
 * format is 1..15 printable characters; the backing file name has no NUL
 * byte; the bitmaps extension (when its autoclear bit says it is
 * consistent) has 1..65535 bitmaps and a cluster-aligned directory inside
 * the file; autoclear bit 0 is not set without it.
 *
 * Returns 0 and fills *ext, or -EINVAL with a message. */
int qcow2_header_parse_extensions(const void *cluster0, size_t len,
                                  const struct qcow2_header *h,
                                  struct qcow2_extensions *ext,
                                  char *err, size_t errlen);

/* Looks up the name of feature (type, bit) in the feature name table.
 * Returns a pointer into the table and sets *name_len (at most 46; the name
 * is not NUL-terminated at full length), or NULL if the table does not
 * name it. */
const char *qcow2_feature_name(const struct qcow2_extensions *ext,
                               unsigned type, unsigned bit, size_t *name_len);

/* The last step of opening: refuses unknown incompatible feature bits
 * (-ENOTSUP, naming the lowest one from the feature name table when it is
 * there, else "unknown incompatible feature bit N"), and an image marked
 * corrupt unless read_only (-EACCES, "corrupt: open read-only").
 * Returns 0 otherwise. */
int qcow2_header_check_features(const struct qcow2_header *h,
                                const struct qcow2_extensions *ext,
                                bool read_only, char *err, size_t errlen);

/* ======================= bitmap directory ======================= */

#define QCOW2_BITMAP_ENTRY_MIN    24u   /* fixed part of a directory entry */
#define QCOW2_BITMAP_FLAGS_OFFSET 12u   /* of the flags field in an entry */
#define QCOW2_BITMAP_IN_USE       1u    /* flags bit 0 */
#define QCOW2_MAX_BITMAP_TABLE_BYTES (UINT64_C(64) << 20)

/* One entry of the bitmap directory (spec, "Bitmap directory"). */
struct qcow2_bitmap_entry {
    uint64_t table_offset;    /* the bitmap table */
    uint32_t table_size;      /* its entries (8 bytes each) */
    uint32_t flags;
    uint64_t size;            /* bytes of the entry, padding included */
};

/* Parses the entry at pos of a directory of size bytes: it must fit, and
 * its table must stay under QCOW2_MAX_BITMAP_TABLE_BYTES.  Returns 0, or
 * -EINVAL for a malformed directory. */
int qcow2_bitmap_entry_parse(const uint8_t *dir, uint64_t size, uint64_t pos,
                             struct qcow2_bitmap_entry *e);

/* ======================= L1 / L2 entries ======================= */

#define QCOW2_OFLAG_COPIED      (UINT64_C(1) << 63)
#define QCOW2_OFLAG_COMPRESSED  (UINT64_C(1) << 62)
#define QCOW2_OFLAG_ZERO        (UINT64_C(1) << 0)
#define QCOW2_L1E_OFFSET_MASK   UINT64_C(0x00fffffffffffe00)   /* bits 9-55 */
#define QCOW2_L2E_OFFSET_MASK   UINT64_C(0x00fffffffffffe00)   /* bits 9-55 */
#define QCOW2_L1E_RESERVED_MASK UINT64_C(0x7f000000000001ff)   /* 0-8, 56-62 */
#define QCOW2_L2E_STD_RESERVED_MASK UINT64_C(0x3f000000000001fe) /* 1-8, 56-61 */

#define QCOW2_SUBCLUSTERS       32u   /* per cluster with extended L2 */

/* A decoded L1 entry. */
struct qcow2_l1_entry {
    uint64_t l2_offset;       /* 0: the L2 table is unallocated */
    bool copied;              /* bit 63: refcount exactly one */
    bool reserved_set;        /* reserved bits set (harmless, but a checker
                                 would report them) */
};

/* Decodes an L1 entry.  Returns 0, or -EINVAL when the L2 offset is not
 * cluster-aligned (the image is corrupt). */
int qcow2_l1_entry_decode(const struct qcow2_header *h, uint64_t entry,
                          struct qcow2_l1_entry *out);

/* What a guest cluster or subcluster reads as. */
enum qcow2_cluster_type {
    QCOW2_CLUSTER_UNALLOCATED,        /* backing file, else zeros */
    QCOW2_CLUSTER_UNALLOCATED_ALLOC,  /* subcluster only: like UNALLOCATED,
                                         but the host cluster exists */
    QCOW2_CLUSTER_ZERO_PLAIN,         /* zeros, no host cluster */
    QCOW2_CLUSTER_ZERO_ALLOC,         /* zeros, host cluster preallocated */
    QCOW2_CLUSTER_NORMAL,             /* data at host_offset */
    QCOW2_CLUSTER_COMPRESSED,         /* compressed data at host_offset */
};

/* A decoded L2 entry (and, with extended L2, its subcluster bitmap). */
struct qcow2_l2_entry {
    enum qcow2_cluster_type type;     /* of the cluster as a whole; with
                                         extended L2 use
                                         qcow2_subcluster_type() */
    uint64_t host_offset;             /* NORMAL, ZERO_ALLOC and (extended L2)
                                         UNALLOCATED_ALLOC: the host cluster;
                                         COMPRESSED: the byte offset of the
                                         data (not aligned); else 0 */
    uint32_t nb_sectors;              /* COMPRESSED: 512-byte sectors the data
                                         spans, counting the one that holds
                                         host_offset; else 0 */
    uint32_t compressed_len;          /* COMPRESSED: bytes from host_offset
                                         to the end of the last sector (an
                                         upper bound of the data) */
    uint32_t alloc_bitmap;            /* extended L2: subclusters allocated */
    uint32_t zero_bitmap;             /* extended L2: subclusters reading as
                                         zeros */
    bool copied;                      /* bit 63 */
    bool reserved_set;                /* reserved bits set */
};

/* Decodes an L2 entry; bitmap is the second half of an extended L2 entry
 * and is ignored without extended L2.  Returns 0, or -EINVAL when the
 * entry cannot be used (the image is corrupt): a standard cluster offset
 * not aligned to the cluster, a compressed offset above bit 55, a
 * subcluster both allocated and zero, subclusters allocated without a host
 * cluster. */
int qcow2_l2_entry_decode(const struct qcow2_header *h, uint64_t entry,
                          uint64_t bitmap, struct qcow2_l2_entry *out);

/* Type of subcluster sc (0..31) of a decoded entry.  Without extended L2
 * the cluster is a single subcluster and this returns e->type. */
enum qcow2_cluster_type qcow2_subcluster_type(const struct qcow2_header *h,
                                              const struct qcow2_l2_entry *e,
                                              unsigned sc);

/* Compressed cluster descriptor layout (spec: x = 62 - (cluster_bits - 8)):
 * bits 0..x-1 host offset, bits x..61 additional sectors. */
static inline unsigned qcow2_csize_shift(unsigned cluster_bits)
{
    return 62 - (cluster_bits - 8);
}

/* Builds the L2 entry of a compressed cluster of nb_sectors (>= 1) sectors
 * starting at host byte offset host_offset. */
uint64_t qcow2_l2_entry_compressed(unsigned cluster_bits, uint64_t host_offset,
                                   uint32_t nb_sectors);

/* ======================= refcounts ======================= */

/* Largest refcount an entry of 1 << order bits holds. */
uint64_t qcow2_refcount_max(unsigned refcount_order);

/* Entry `index` of a refcount block of (1 << refcount_order)-bit entries,
 * big endian; sub-byte entries are packed from the least significant bit
 * of each byte (spec, "Refcount block entry").  The caller keeps index
 * below the block's entry count; order is 0..6 (asserted). */
uint64_t qcow2_refcount_get(const void *block, unsigned refcount_order,
                            uint64_t index);
/* value <= qcow2_refcount_max(order) (asserted); other entries untouched. */
void qcow2_refcount_set(void *block, unsigned refcount_order, uint64_t index,
                        uint64_t value);

/* Where the refcount of host offset `offset` lives (spec, "Host cluster
 * management"). */
static inline uint64_t qcow2_refcount_table_index(const struct qcow2_header *h,
                                                  uint64_t offset)
{
    return offset >> (h->cluster_bits + h->refcount_block_bits);
}
static inline uint64_t qcow2_refcount_block_index(const struct qcow2_header *h,
                                                  uint64_t offset)
{
    return (offset >> h->cluster_bits) &
           ((UINT64_C(1) << h->refcount_block_bits) - 1);
}

/* Where the mapping of guest offset `offset` lives (spec, "Cluster
 * mapping"). */
static inline uint64_t qcow2_l1_index(const struct qcow2_header *h,
                                      uint64_t offset)
{
    return offset >> (h->cluster_bits + h->l2_bits);
}
static inline uint64_t qcow2_l2_index(const struct qcow2_header *h,
                                      uint64_t offset)
{
    return (offset >> h->cluster_bits) & (h->l2_entries - 1);
}

#endif
