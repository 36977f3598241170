/* strata — what the control-socket fuzz targets share (tests only).
 *
 * Commands act on real storage by name (blockdev-add opens a file,
 * blockdev-snapshot-sync creates one, an rbd: name connects to a
 * cluster), so a target that runs them first shuts itself in
 * (fuzz_qmp_sandbox(), from LLVMFuzzerInitialize, before any thread
 * exists): a mount namespace where every file system is read-only except
 * a private tmpfs on FUZZ_QMP_WORK (the control socket, and whatever
 * commands create) and the directories libFuzzer writes to (the first
 * corpus directory, and the one of -artifact_prefix=, which must hold a
 * slash: the working directory stays read-only), and a network namespace
 * with no interface up; the Ceph client libraries read as empty files
 * there, so an rbd: node fails as on a host without librbd.  A fuzzed
 * command can neither change a file of the machine nor reach another
 * host.  As root in a chroot ("/" is no mount point, user namespaces are
 * refused) no sandbox can be built without changing the host's mounts:
 * the process exits 77 (meson: skipped).
 */
#ifndef STRATA_FUZZ_QMP_COMMON_H
#define STRATA_FUZZ_QMP_COMMON_H

#include <stddef.h>

/* The private tmpfs (mounted over it inside the namespace). */
#define FUZZ_QMP_WORK "/dev/shm"

/* Shuts the process in (once; a child of a sandboxed process, as
 * libFuzzer's -merge makes, is inside already) and returns the path for
 * the control socket in the tmpfs.  name: the target, for messages.
 * Exits 1 when no sandbox can be made, 77 in a chroot. */
const char *fuzz_qmp_sandbox(int argc, char **argv, const char *name);

/* Aborts unless out (len bytes: everything the server sent on one
 * connection) is CRLF-terminated lines, each a JSON object: the greeting
 * ({"QMP": ...}) first, then returns, errors with class and desc, and
 * events. */
void fuzz_qmp_check_output(const char *out, size_t len);

#endif
