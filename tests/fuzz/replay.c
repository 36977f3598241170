/* strata — runs a fuzz target over files without libFuzzer.
 *
 *   fuzz-TARGET-replay FILE|DIR...
 *
 * Feeds every file named, and every regular file in every directory named
 * (not recursively, in name order), to LLVMFuzzerTestOneInput() once.  A
 * property that does not hold aborts; a file that cannot be read fails the
 * run; so does a directory with no file in it (a corpus that went missing
 * must not pass as "nothing to replay").  Prints how many inputs ran.
 */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fuzz.h"

static int replay_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    uint8_t *buf = NULL;
    size_t len = 0, cap = 0;

    if (!f) {
        fprintf(stderr, "%s: %s\n", path, strerror(errno));
        return -1;
    }
    for (;;) {
        if (len == cap) {
            uint8_t *nb;

            cap = cap ? 2 * cap : 4096;
            nb = realloc(buf, cap);
            if (!nb) {
                fprintf(stderr, "%s: out of memory\n", path);
                free(buf);
                fclose(f);
                return -1;
            }
            buf = nb;
        }
        size_t n = fread(buf + len, 1, cap - len, f);
        if (n == 0)
            break;
        len += n;
    }
    if (ferror(f)) {
        fprintf(stderr, "%s: read error\n", path);
        free(buf);
        fclose(f);
        return -1;
    }
    fclose(f);

    /* The exact size, like libFuzzer: a read past the input trips ASan. */
    uint8_t *in = fuzz_dup(buf, len);
    free(buf);
    LLVMFuzzerTestOneInput(in, len);
    free(in);
    return 0;
}

static int name_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int replay_dir(const char *path, unsigned long *count)
{
    DIR *d = opendir(path);
    struct dirent *de;
    char **names = NULL;
    size_t n = 0, cap = 0, i;
    int rc = 0;

    if (!d) {
        fprintf(stderr, "%s: %s\n", path, strerror(errno));
        return -1;
    }
    while ((de = readdir(d)) != NULL) {
        char *full;
        struct stat st;

        if (de->d_name[0] == '.')
            continue;
        if (asprintf(&full, "%s/%s", path, de->d_name) < 0)
            abort();
        if (stat(full, &st) < 0 || !S_ISREG(st.st_mode)) {
            free(full);
            continue;
        }
        if (n == cap) {
            cap = cap ? 2 * cap : 64;
            names = realloc(names, cap * sizeof(*names));
            if (!names)
                abort();
        }
        names[n++] = full;
    }
    closedir(d);
    if (n == 0) {
        fprintf(stderr, "%s: no input files\n", path);
        free(names);
        return -1;
    }
    qsort(names, n, sizeof(*names), name_cmp);
    for (i = 0; i < n; i++) {
        if (replay_file(names[i]) < 0)
            rc = -1;
        else
            (*count)++;
        free(names[i]);
    }
    free(names);
    return rc;
}

/* As libFuzzer does: a target may set itself up before the first input
 * (fuzz-qmp shuts itself in). */
int LLVMFuzzerInitialize(int *argc, char ***argv) __attribute__((weak));

int main(int argc, char **argv)
{
    unsigned long count = 0;
    int rc = 0, i;

    if (LLVMFuzzerInitialize)
        LLVMFuzzerInitialize(&argc, &argv);

    if (argc < 2) {
        fprintf(stderr, "usage: %s FILE|DIR...\n", argv[0]);
        return 2;
    }
    for (i = 1; i < argc; i++) {
        struct stat st;

        if (stat(argv[i], &st) < 0) {
            fprintf(stderr, "%s: %s\n", argv[i], strerror(errno));
            rc = 1;
        } else if (S_ISDIR(st.st_mode)) {
            if (replay_dir(argv[i], &count) < 0)
                rc = 1;
        } else if (replay_file(argv[i]) < 0) {
            rc = 1;
        } else {
            count++;
        }
    }
    printf("%lu inputs replayed\n", count);
    return rc;
}
