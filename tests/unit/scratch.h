/* strata — a scratch directory for unit tests that run qemu-img and
 * qemu-io on image files: made with mkdtemp, removed at the end unless
 * KEEP is set in the environment. */
#ifndef STRATA_TESTS_UNIT_SCRATCH_H
#define STRATA_TESTS_UNIT_SCRATCH_H

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>

#include <cmocka.h>

/* Runs a shell command (printf-style); its exit status, -1 if it did not
 * exit. */
__attribute__((format(printf, 1, 2)))
int scratch_sh(const char *fmt, ...);

/* NAME inside the scratch directory; each call returns one of four
 * rotating buffers, so up to four results can be used at once. */
char *scratch_path(const char *name);

/* The test program's main: skips (77) when a command in NEEDS (a shell
 * test, e.g. "command -v qemu-img") fails, makes
 * /tmp/strata-unit-TAG-XXXXXX, runs the group, removes the directory. */
int scratch_run(const char *tag, const char *needs, const char *needs_what,
                const struct CMUnitTest *tests, size_t n);

#define SCRATCH_RUN(tag, needs, needs_what, tests)                             \
    scratch_run((tag), (needs), (needs_what), (tests),                         \
                sizeof(tests) / sizeof((tests)[0]))

#endif
