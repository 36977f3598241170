/* strata — decompression of qcow2 compressed clusters.
 *
 * zlib clusters are raw deflate streams (no zlib header, 4 KiB window as
 * QEMU writes them, any window accepted); zstd clusters are one or more
 * zstd frames.  The stored length is only an upper bound (whole sectors),
 * so trailing bytes after the stream are ignored.  A cluster is valid only
 * if it decompresses to exactly one full cluster.
 */
#include <errno.h>
#include <string.h>
#include <zlib.h>
#include <zstd.h>

#include "qcow2.h"

static int zlib_decompress(const uint8_t *in, size_t inlen, uint8_t *out,
                           size_t outlen)
{
    z_stream z;
    memset(&z, 0, sizeof(z));
    if (inflateInit2(&z, -15) != Z_OK) /* raw deflate, largest window */
        return -ENOMEM;
    z.next_in = (Bytef *)in;
    z.avail_in = (uInt)inlen;
    z.next_out = out;
    z.avail_out = (uInt)outlen;
    int zr = inflate(&z, Z_FINISH);
    int ok = (zr == Z_STREAM_END || zr == Z_BUF_ERROR) && z.avail_out == 0;
    inflateEnd(&z);
    return ok ? 0 : -EIO;
}

static int zstd_decompress(const uint8_t *in, size_t inlen, uint8_t *out,
                           size_t outlen)
{
    ZSTD_DCtx *d = ZSTD_createDCtx();
    if (!d)
        return -ENOMEM;
    ZSTD_inBuffer ib = {in, inlen, 0};
    ZSTD_outBuffer ob = {out, outlen, 0};
    int ret = 0;
    while (ob.pos < ob.size) {
        size_t before_in = ib.pos, before_out = ob.pos;
        size_t zr = ZSTD_decompressStream(d, &ob, &ib);
        if (ZSTD_isError(zr)) {
            ret = -EIO;
            break;
        }
        if (ib.pos == before_in && ob.pos == before_out) {
            ret = -EIO; /* no progress: input exhausted */
            break;
        }
    }
    ZSTD_freeDCtx(d);
    return ret;
}

int qcow2_decompress(unsigned compression_type, const uint8_t *in,
                     size_t inlen, uint8_t *out, size_t outlen)
{
    switch (compression_type) {
    case QCOW2_COMPRESSION_ZLIB:
        return zlib_decompress(in, inlen, out, outlen);
    case QCOW2_COMPRESSION_ZSTD:
        return zstd_decompress(in, inlen, out, outlen);
    default:
        return -ENOTSUP;
    }
}
