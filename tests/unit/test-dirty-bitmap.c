/* Unit tests of common/dirty-bitmap.c against a model: one bool per
 * chunk, the same random sets, resets, merges and resizes. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "dirty-bitmap.h"

static void check_model(const struct dbitmap *b, const bool *m)
{
    uint64_t cnt = 0;
    for (uint64_t i = 0; i < b->nbits; i++) {
        assert_int_equal(dbitmap_get(b, i * b->gran), m[i]);
        cnt += m[i];
    }
    assert_int_equal(b->count, cnt);
    /* runs cover the disk exactly and agree with the model */
    uint64_t off = 0;
    while (off < b->size) {
        bool dirty;
        uint64_t len = dbitmap_run(b, off, b->size - off, &dirty);
        assert_true(len > 0 && off + len <= b->size);
        for (uint64_t x = off; x < off + len; x += b->gran - (x % b->gran))
            assert_int_equal(m[x / b->gran], dirty);
        if (off + len < b->size)
            assert_int_not_equal(m[(off + len) / b->gran], dirty);
        off += len;
    }
}

static void mark(bool *m, uint64_t gran, uint64_t size, uint64_t off,
                 uint64_t len, bool v)
{
    if (!len || off >= size)
        return;
    if (len > size - off)
        len = size - off;
    for (uint64_t i = off / gran; i <= (off + len - 1) / gran; i++)
        m[i] = v;
}

static void test_random_against_model(void **state)
{
    (void)state;
    srand(7);
    for (int round = 0; round < 40; round++) {
        uint64_t gran = UINT64_C(512) << (rand() % 8);
        uint64_t size = (uint64_t)(rand() % 300 + 1) * 512 + (uint64_t)(rand() % 2) * 17;
        struct dbitmap b;
        assert_int_equal(dbitmap_init(&b, size, gran), 0);
        bool *m = calloc(b.nbits + 1, 1);
        for (int k = 0; k < 200; k++) {
            uint64_t off = (uint64_t)rand() % (size + 1000);
            uint64_t len = (uint64_t)rand() % (size / 3 + 2);
            bool set = rand() % 3 != 0;
            if (set)
                dbitmap_set(&b, off, len);
            else
                dbitmap_reset(&b, off, len);
            mark(m, gran, size, off, len, set);
        }
        check_model(&b, m);

        /* serialisation round trip, LSB first */
        size_t nb = (size_t)dbitmap_stream_bytes(&b);
        uint8_t *buf = malloc(nb + 8);
        dbitmap_store_bytes(&b, 0, buf, nb + 8);
        for (uint64_t i = 0; i < b.nbits; i++)
            assert_int_equal((buf[i / 8] >> (i % 8)) & 1, m[i]);
        for (size_t i = nb; i < nb + 8; i++)
            assert_int_equal(buf[i], 0);
        struct dbitmap c;
        assert_int_equal(dbitmap_init(&c, size, gran), 0);
        dbitmap_load_bytes(&c, 0, buf, nb / 2);
        dbitmap_load_bytes(&c, nb / 2, buf + nb / 2, nb - nb / 2);
        check_model(&c, m);
        assert_int_equal(dbitmap_bytes_clear(&c, 0, nb), b.count == 0);

        /* merge into a bitmap of another granularity */
        struct dbitmap d;
        uint64_t g2 = gran * 4;
        assert_int_equal(dbitmap_init(&d, size, g2), 0);
        dbitmap_merge(&d, &b);
        for (uint64_t i = 0; i < b.nbits; i++)
            if (m[i])
                assert_true(dbitmap_get(&d, i * gran));
        dbitmap_destroy(&d);

        /* resize: new bytes clean, the rest kept */
        uint64_t ns = size + (uint64_t)(rand() % 4096);
        assert_int_equal(dbitmap_resize(&c, ns), 0);
        bool *m2 = calloc(c.nbits + 1, 1);
        memcpy(m2, m, b.nbits);
        check_model(&c, m2);
        assert_int_equal(dbitmap_resize(&c, size / 2 + 1), 0);
        check_model(&c, m2);
        free(m2);

        dbitmap_clear_all(&b);
        assert_int_equal(b.count, 0);
        dbitmap_destroy(&b);
        dbitmap_destroy(&c);
        free(buf);
        free(m);
    }
}

static void test_count_is_bytes_per_chunk(void **state)
{
    (void)state;
    struct dbitmap b;
    assert_int_equal(dbitmap_init(&b, (UINT64_C(1) << 20) + 1, 65536), 0);
    dbitmap_set(&b, 4096, 1);                 /* one chunk */
    dbitmap_set(&b, UINT64_C(1) << 20, 1);    /* the partial last chunk */
    assert_int_equal(dbitmap_count_bytes(&b), 2 * 65536);
    bool dirty;
    assert_int_equal(dbitmap_run(&b, 4096, 1 << 20, &dirty), 65536 - 4096);
    assert_true(dirty);
    dbitmap_destroy(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_random_against_model),
        cmocka_unit_test(test_count_is_bytes_per_chunk),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
