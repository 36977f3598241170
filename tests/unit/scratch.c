/* strata — the unit tests' scratch directory (scratch.h). */
#include "scratch.h"

#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>

static char dir[256];

int scratch_sh(const char *fmt, ...)
{
    char cmd[2048];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(cmd, sizeof(cmd), fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof(cmd)) {
        fprintf(stderr, "scratch_sh: command too long: %.80s...\n", cmd);
        return -1;
    }
    int r = system(cmd);
    return WIFEXITED(r) ? WEXITSTATUS(r) : -1;
}

char *scratch_path(const char *name)
{
    static char buf[4][512];
    static int i;
    i = (i + 1) % 4;
    snprintf(buf[i], sizeof(buf[i]), "%s/%s", dir, name);
    return buf[i];
}

int scratch_run(const char *tag, const char *needs, const char *needs_what,
                const struct CMUnitTest *tests, size_t n)
{
    if (needs && scratch_sh("%s", needs) != 0) {
        printf("1..0 # SKIP %s not installed\n", needs_what);
        return 77;
    }
    snprintf(dir, sizeof(dir), "/tmp/strata-unit-%s-XXXXXX", tag);
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    int r = _cmocka_run_group_tests(tag, tests, n, NULL, NULL);
    if (!getenv("KEEP"))
        scratch_sh("rm -rf %s", dir);
    return r;
}
