/* strata — what every fuzz target shares.
 *
 * A target is one function, LLVMFuzzerTestOneInput(), built two ways:
 * linked with libFuzzer (clang, -Dfuzzing=enabled) to search for inputs,
 * and linked with replay.c (any compiler, every build) to run the corpus
 * in tests/fuzz/corpus/TARGET/ as a meson test.  A target checks
 * properties with FUZZ_CHECK, which aborts, so that both libFuzzer and the
 * replay test report the input as a failure.
 */
#ifndef STRATA_FUZZ_H
#define STRATA_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* For a target's own helpers that loop over every byte of a buffer
 * (filling a write's pattern, checking bytes are zero): left out of the
 * coverage instrumentation, which would otherwise call into libFuzzer for
 * the comparisons of each byte (-fsanitize=fuzzer traces them) and cost
 * more than the code under test.  Their branches tell libFuzzer nothing
 * (a loop that runs hundreds of times; a mismatch is a finding anyway).
 * Not inlined: the instrumentation of the caller would cover them again.
 * Clang only (gcc builds only the replay, uninstrumented). */
#if defined(__clang__)
#define FUZZ_NO_COVERAGE __attribute__((no_sanitize("coverage"), noinline))
#else
#define FUZZ_NO_COVERAGE
#endif

#define FUZZ_CHECK(cond)                                                    \
    do {                                                                    \
        if (!(cond)) {                                                      \
            fprintf(stderr, "%s:%d: property does not hold: %s\n",          \
                    __FILE__, __LINE__, #cond);                             \
            abort();                                                        \
        }                                                                   \
    } while (0)

/* An exactly-sized heap copy of n bytes (one byte when n is 0): reading
 * past it trips AddressSanitizer, which a slice of a larger buffer would
 * not.  Aborts when out of memory. */
static inline uint8_t *fuzz_dup(const uint8_t *p, size_t n)
{
    uint8_t *b = malloc(n ? n : 1);

    if (!b)
        abort();
    if (n)
        memcpy(b, p, n);
    return b;
}

/* A NUL-terminated copy of n bytes (stops at an embedded NUL, as a C
 * string would). */
static inline char *fuzz_strdup(const uint8_t *p, size_t n)
{
    char *s = malloc(n + 1);

    if (!s)
        abort();
    if (n)
        memcpy(s, p, n);
    s[n] = '\0';
    return s;
}

#endif
