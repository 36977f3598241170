/* strata — dirty bitmaps (see dirty-bitmap.h). */
#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "dirty-bitmap.h"

static uint64_t nwords(uint64_t nbits)
{
    return (nbits + 63) / 64;
}

static uint64_t bits_for(uint64_t size, unsigned shift)
{
    return (size >> shift) + ((size & ((UINT64_C(1) << shift) - 1)) != 0);
}

int dbitmap_init(struct dbitmap *b, uint64_t size, uint64_t gran)
{
    assert(gran && (gran & (gran - 1)) == 0);
    memset(b, 0, sizeof(*b));
    b->size = size;
    b->gran = gran;
    b->shift = (unsigned)__builtin_ctzll(gran);
    b->nbits = bits_for(size, b->shift);
    b->words = calloc(nwords(b->nbits) ? nwords(b->nbits) : 1, sizeof(uint64_t));
    return b->words ? 0 : -ENOMEM;
}

void dbitmap_destroy(struct dbitmap *b)
{
    free(b->words);
    b->words = NULL;
}

/* Clears the bits at and past nbits in the last word, keeping count. */
static void trim_tail(struct dbitmap *b)
{
    uint64_t nw = nwords(b->nbits);
    if (b->nbits % 64 && nw) {
        uint64_t keep = (UINT64_C(1) << (b->nbits % 64)) - 1;
        uint64_t gone = b->words[nw - 1] & ~keep;
        b->count -= (uint64_t)__builtin_popcountll(gone);
        b->words[nw - 1] &= keep;
    }
}

int dbitmap_resize(struct dbitmap *b, uint64_t size)
{
    uint64_t nbits = bits_for(size, b->shift);
    uint64_t oldw = nwords(b->nbits), neww = nwords(nbits);
    if (neww > oldw) {
        uint64_t *w = realloc(b->words, neww * sizeof(uint64_t));
        if (!w)
            return -ENOMEM;
        memset(w + oldw, 0, (neww - oldw) * sizeof(uint64_t));
        b->words = w;
    } else {
        for (uint64_t i = neww; i < oldw; i++)
            b->count -= (uint64_t)__builtin_popcountll(b->words[i]);
    }
    b->nbits = nbits;
    b->size = size;
    trim_tail(b);
    return 0;
}

/* The chunks touching [off, off + len) clipped to the size: [*first,
 * *end).  Returns false when empty. */
static bool chunk_range(const struct dbitmap *b, uint64_t off, uint64_t len,
                        uint64_t *first, uint64_t *end)
{
    if (len == 0 || off >= b->size)
        return false;
    if (len > b->size - off)
        len = b->size - off;
    *first = off >> b->shift;
    *end = ((off + len - 1) >> b->shift) + 1;
    return true;
}

/* Sets (set) or clears the bits [first, end). */
static void change_bits(struct dbitmap *b, uint64_t first, uint64_t end,
                        bool set)
{
    while (first < end) {
        uint64_t w = first / 64;
        unsigned lo = (unsigned)(first % 64);
        uint64_t n = end - first < 64 - lo ? end - first : 64 - lo;
        uint64_t mask = (n == 64 ? ~UINT64_C(0) : ((UINT64_C(1) << n) - 1)) << lo;
        uint64_t old = b->words[w];
        uint64_t nw = set ? old | mask : old & ~mask;
        if (set)
            b->count += (uint64_t)__builtin_popcountll(nw & ~old);
        else
            b->count -= (uint64_t)__builtin_popcountll(old & ~nw);
        b->words[w] = nw;
        first += n;
    }
}

void dbitmap_set(struct dbitmap *b, uint64_t off, uint64_t len)
{
    uint64_t first, end;
    if (chunk_range(b, off, len, &first, &end))
        change_bits(b, first, end, true);
}

void dbitmap_reset(struct dbitmap *b, uint64_t off, uint64_t len)
{
    uint64_t first, end;
    if (chunk_range(b, off, len, &first, &end))
        change_bits(b, first, end, false);
}

void dbitmap_clear_all(struct dbitmap *b)
{
    memset(b->words, 0, nwords(b->nbits) * sizeof(uint64_t));
    b->count = 0;
}

static bool bit(const struct dbitmap *b, uint64_t i)
{
    return (b->words[i / 64] >> (i % 64)) & 1;
}

bool dbitmap_get(const struct dbitmap *b, uint64_t off)
{
    assert(off < b->size);
    return bit(b, off >> b->shift);
}

/* The first index in [i, end) whose bit equals want, or end. */
static uint64_t find_bit(const struct dbitmap *b, uint64_t i, uint64_t end,
                         bool want)
{
    while (i < end) {
        uint64_t w = b->words[i / 64];
        if (!want)
            w = ~w;
        w &= ~UINT64_C(0) << (i % 64);
        if (w) {
            uint64_t j = (i & ~UINT64_C(63)) + (uint64_t)__builtin_ctzll(w);
            return j < end ? j : end;
        }
        i = (i & ~UINT64_C(63)) + 64;
    }
    return end;
}

uint64_t dbitmap_run(const struct dbitmap *b, uint64_t off, uint64_t max,
                     bool *dirty)
{
    assert(off < b->size && max > 0);
    if (max > b->size - off)
        max = b->size - off;
    uint64_t i = off >> b->shift;
    uint64_t last = ((off + max - 1) >> b->shift) + 1;
    *dirty = bit(b, i);
    uint64_t j = find_bit(b, i + 1, last, !*dirty);
    uint64_t run_end = j << b->shift;
    if (j == last || run_end > off + max)
        run_end = off + max;
    return run_end - off;
}

void dbitmap_merge(struct dbitmap *dst, const struct dbitmap *src)
{
    assert(dst->size == src->size);
    if (dst->shift == src->shift) {
        uint64_t nw = nwords(dst->nbits);
        dst->count = 0;
        for (uint64_t i = 0; i < nw; i++) {
            dst->words[i] |= src->words[i];
            dst->count += (uint64_t)__builtin_popcountll(dst->words[i]);
        }
        return;
    }
    uint64_t i = 0;
    while (i < src->nbits) {
        uint64_t s = find_bit(src, i, src->nbits, true);
        if (s == src->nbits)
            break;
        uint64_t e = find_bit(src, s, src->nbits, false);
        dbitmap_set(dst, s << src->shift, (e - s) << src->shift);
        i = e;
    }
}

void dbitmap_copy(struct dbitmap *dst, const struct dbitmap *src)
{
    assert(dst->size == src->size && dst->shift == src->shift);
    memcpy(dst->words, src->words, nwords(src->nbits) * sizeof(uint64_t));
    dst->count = src->count;
}

void dbitmap_store_bytes(const struct dbitmap *b, uint64_t byte_off,
                         uint8_t *out, size_t len)
{
    uint64_t nw = nwords(b->nbits);
    for (size_t k = 0; k < len; k++) {
        uint64_t byte = byte_off + k;
        uint64_t w = byte / 8;
        out[k] = w < nw ? (uint8_t)(b->words[w] >> ((byte % 8) * 8)) : 0;
    }
}

void dbitmap_load_bytes(struct dbitmap *b, uint64_t byte_off,
                        const uint8_t *in, size_t len)
{
    uint64_t nw = nwords(b->nbits);
    for (size_t k = 0; k < len; k++) {
        uint64_t byte = byte_off + k;
        uint64_t w = byte / 8;
        if (w >= nw)
            break;
        unsigned sh = (unsigned)(byte % 8) * 8;
        uint64_t old = b->words[w];
        uint64_t nv = (old & ~(UINT64_C(0xff) << sh)) | ((uint64_t)in[k] << sh);
        b->count -= (uint64_t)__builtin_popcountll(old);
        b->count += (uint64_t)__builtin_popcountll(nv);
        b->words[w] = nv;
    }
    trim_tail(b);
}

bool dbitmap_bytes_clear(const struct dbitmap *b, uint64_t byte_off,
                         size_t len)
{
    uint64_t first = byte_off * 8, end = (byte_off + len) * 8;
    if (first >= b->nbits)
        return true;
    if (end > b->nbits)
        end = b->nbits;
    return find_bit(b, first, end, true) == end;
}
