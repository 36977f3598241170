/* strata — what the control-socket fuzz targets (fuzz-qmp.c,
 * fuzz-qmp-dispatch.c) share: the sandbox they run in, and the check of
 * what the server sent. */
#include <errno.h>
#include <fcntl.h>
#include <json-c/json.h>
#include <limits.h>
#include <sched.h>
#include <stdbool.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "fuzz.h"
#include "qmp-common.h"

/* ---- the sandbox ---- */

#ifndef MOUNT_ATTR_RDONLY
#define MOUNT_ATTR_RDONLY 0x00000001
#endif
#ifndef AT_RECURSIVE
#define AT_RECURSIVE 0x8000
#endif
struct fuzz_mount_attr {
    uint64_t attr_set, attr_clr, propagation, userns_fd;
};

static int set_mount_attr(const char *path, unsigned flags, uint64_t set)
{
#ifdef SYS_mount_setattr
    struct fuzz_mount_attr a = {.attr_set = set};
    return (int)syscall(SYS_mount_setattr, AT_FDCWD, path, flags, &a,
                        sizeof(a));
#else
    errno = ENOSYS;
    return -1;
#endif
}

static const char *prog = "fuzz-qmp";

static void sandbox_fail(const char *what)
{
    fprintf(stderr, "%s: cannot shut the target in (%s: %s): it "
            "needs user or mount namespaces (root, or "
            "kernel.unprivileged_userns_clone=1)\n", prog, what, strerror(errno));
    exit(1);
}

static void write_file(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text))
        sandbox_fail(path);
    close(fd);
}

/* Directories that stay writable: libFuzzer's (the first corpus
 * directory receives new inputs; -artifact_prefix= the findings). */
static size_t writable_dirs(int argc, char **argv, char **out, size_t max)
{
    size_t n = 0;
    bool corpus_seen = false;
    for (int i = 1; i < argc && n < max; i++) {
        const char *a = argv[i];
        char dir[PATH_MAX];
        if (!strncmp(a, "-artifact_prefix=", 17)) {
            snprintf(dir, sizeof(dir), "%s", a + 17);
            char *slash = strrchr(dir, '/');
            if (!slash)
                continue; /* the working directory: stays read-only */
            slash[1] = '\0';
        } else if (a[0] != '-' && !corpus_seen) {
            struct stat st;
            if (stat(a, &st) < 0 || !S_ISDIR(st.st_mode))
                continue;
            corpus_seen = true;
            snprintf(dir, sizeof(dir), "%s", a);
        } else {
            continue;
        }
        char *real = realpath(dir, NULL);
        if (real)
            out[n++] = real;
    }
    return n;
}

static int by_length(const void *a, const void *b)
{
    size_t la = strlen(*(char *const *)a), lb = strlen(*(char *const *)b);
    return la < lb ? -1 : la > lb;
}

const char *fuzz_qmp_sandbox(int argc, char **argv, const char *name)
{
    static char ctl_path[108];
    prog = name;
    /* A child of a sandboxed process (libFuzzer's -merge runs the target
     * in one) is inside already: namespaces are inherited. */
    const char *sandboxed = getenv("STRATA_FUZZ_QMP_SANDBOX");
    if (sandboxed) {
        snprintf(ctl_path, sizeof(ctl_path), "%s/ctl-%d.sock", sandboxed,
                 (int)getpid());
        return ctl_path;
    }
    char *keep[8];
    size_t n_keep = writable_dirs(argc, argv, keep, 8);
    /* Parents first; a directory inside one already kept is covered. */
    qsort(keep, n_keep, sizeof(*keep), by_length);
    size_t k = 0;
    for (size_t i = 0; i < n_keep; i++) {
        bool inside = false;
        for (size_t j = 0; j < k; j++) {
            size_t l = strlen(keep[j]);
            inside |= !strncmp(keep[i], keep[j], l) &&
                      (keep[i][l] == '/' || keep[i][l] == '\0');
        }
        if (inside)
            free(keep[i]);
        else
            keep[k++] = keep[i];
    }
    n_keep = k;
    /* Mounted over /dev/shm in the namespace: nothing is left behind. */
    const char *work = FUZZ_QMP_WORK;

    uid_t uid = geteuid();
    gid_t gid = getegid();
    int flags = CLONE_NEWNS | CLONE_NEWNET;
    if (uid != 0)
        flags |= CLONE_NEWUSER;
    if (unshare(flags) < 0)
        sandbox_fail("unshare");
    if (uid != 0) {
        char map[64];
        write_file("/proc/self/setgroups", "deny");
        snprintf(map, sizeof(map), "0 %u 1", (unsigned)uid);
        write_file("/proc/self/uid_map", map);
        snprintf(map, sizeof(map), "0 %u 1", (unsigned)gid);
        write_file("/proc/self/gid_map", map);
    }
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) {
        if (errno == EINVAL && uid == 0) {
            /* "/" is no mount point: a chroot (where user namespaces are
             * refused too).  Every mount made here would propagate to the
             * host's namespace through the mount the chroot lives on, so
             * there is no sandbox to be had: skipped, not run bare. */
            fprintf(stderr, "%s: skipped: / is not a mount point (a "
                    "chroot?), so the target cannot be shut in without "
                    "changing the host's mounts; run it outside the "
                    "chroot\n", prog);
            exit(77);
        }
        sandbox_fail("mount --make-rprivate /");
    }
    for (size_t i = 0; i < n_keep; i++)
        if (mount(keep[i], keep[i], NULL, MS_BIND, NULL) < 0)
            sandbox_fail(keep[i]);
    /* No Ceph client either: an rbd: node fails as on a host without
     * librbd (the daemon loads it with dlopen), rather than talk to DNS
     * and monitors (there is no network) with C++ exceptions and resolver
     * state that the sanitizers of a C program do not follow. */
    static const char *const libdirs[] = {
        "/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64",
        "/usr/lib64", "/lib", "/usr/lib",
    };
    static const char *const cephlibs[] = {"librados.so.2", "librbd.so.1"};
    for (size_t d = 0; d < sizeof(libdirs) / sizeof(libdirs[0]); d++)
        for (size_t i = 0; i < 2; i++) {
            char path[PATH_MAX], *real;
            snprintf(path, sizeof(path), "%s/%s", libdirs[d], cephlibs[i]);
            if (!(real = realpath(path, NULL)))
                continue;
            /* several names may lead to one file: once is enough */
            if (mount("/dev/null", real, NULL, MS_BIND, NULL) < 0 &&
                errno != EBUSY)
                sandbox_fail(real);
            free(real);
        }
    if (set_mount_attr("/", AT_RECURSIVE, MOUNT_ATTR_RDONLY) < 0)
        sandbox_fail("read-only /");
    for (size_t i = 0; i < n_keep; i++) {
        if (mount(NULL, keep[i], NULL, MS_REMOUNT | MS_BIND, NULL) < 0)
            sandbox_fail(keep[i]);
        free(keep[i]);
    }
    if (mount("strata-fuzz", work, "tmpfs", 0, "size=64m,mode=0700") < 0)
        sandbox_fail("tmpfs");
    snprintf(ctl_path, sizeof(ctl_path), "%s/ctl-%d.sock", work,
             (int)getpid());
    /* libFuzzer's own temporary files (-merge) go to the tmpfs too. */
    setenv("STRATA_FUZZ_QMP_SANDBOX", work, 1);
    setenv("TMPDIR", work, 1);
    /* Checked, not assumed: nothing outside may be written. */
    if (mkdir("/tmp/strata-fuzz-qmp-escape", 0700) == 0 || errno != EROFS ||
        strlen(ctl_path) + 1 > sizeof(ctl_path))
        sandbox_fail("the read-only check");
    return ctl_path;
}

/* ---- what the server sent ---- */

static bool has_str(struct json_object *o, const char *key)
{
    struct json_object *v;
    return json_object_object_get_ex(o, key, &v) &&
           json_object_is_type(v, json_type_string);
}

/* Every line the server sent is a QMP message. */
void fuzz_qmp_check_output(const char *out, size_t len)
{
    /* One tokener for the process, reset before each line (a line
     * starts from a fresh state either way). */
    static struct json_tokener *tok;
    if (!tok && !(tok = json_tokener_new()))
        abort();
    size_t pos = 0, lines = 0;
    while (pos < len) {
        const char *nl = memchr(out + pos, '\n', len - pos);
        FUZZ_CHECK(nl != NULL);                 /* whole lines only */
        size_t end = (size_t)(nl - out);
        FUZZ_CHECK(end > pos && out[end - 1] == '\r');
        json_tokener_reset(tok);
        struct json_object *o = json_tokener_parse_ex(tok, out + pos,
                                                      (int)(end - 1 - pos));
        FUZZ_CHECK(json_tokener_get_error(tok) == json_tokener_success);
        FUZZ_CHECK(json_object_is_type(o, json_type_object));
        struct json_object *v;
        if (lines == 0) {
            FUZZ_CHECK(json_object_object_get_ex(o, "QMP", &v));
        } else if (json_object_object_get_ex(o, "error", &v)) {
            FUZZ_CHECK(json_object_is_type(v, json_type_object) &&
                       has_str(v, "class") && has_str(v, "desc"));
        } else {
            FUZZ_CHECK(json_object_object_get_ex(o, "return", &v) ||
                       has_str(o, "event"));
        }
        json_object_put(o);
        lines++;
        pos = end + 1;
    }
    FUZZ_CHECK(lines >= 1);
}
