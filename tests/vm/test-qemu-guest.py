#!/usr/bin/env python3
"""A running VM survives live chain changes (issue 6, second part).

A stock Debian kernel in QEMU (TCG) has /dev/vda = a stratad export that
QEMU's own NBD client reaches over stratad's unix socket (-drive
driver=nbd,server.type=unix; discard=unmap, so the guest's discards arrive
as trims).  The export is the qcow2 chain

    bottom.raw <- base.qcow2 <- top.qcow2      (served as top.qcow2)

served by stratad with --control and --state-file.  bottom.raw and
base.qcow2 hold junk the guest's mkfs overwrites or discards.  The guest
(tests/vm/guest/qemu-guest.sh) makes an ext4 file system, mounts it with
-o discard and writes files without pause: varied sizes, some overwritten
in place, the oldest deleted (but every 8th kept to the end), a sync every
4 files, each file's SHA-256 taken before it reaches the disk.  One boot;
meanwhile, through the control socket, the host lets the guest write for a
phase (PHASE_S seconds and at least STEP files) between the steps:

  1. writes into top.qcow2 (two phases);
  2. blockdev-snapshot-sync to snap.qcow2 (the stall it returns and logs
     is checked): chain bottom.raw <- base.qcow2 <- top.qcow2 <- snap.qcow2,
     named by the export and the state file; a phase of writes into it;
  3. block-commit, active (top = snap.qcow2, the live top) down to
     base.qcow2, at FIRST_PASS_SPEED for a phase (the guest writes ahead of
     and behind the copy), then unthrottled until BLOCK_JOB_READY; a phase
     with the job ready (writes mirrored to base), half a phase paused
     (standby), half a phase resumed; block-job-complete,
     BLOCK_JOB_COMPLETED: base.qcow2 is the top, query-block-exports and
     the state file say so at once;
  4. a phase of writes into base.qcow2, then the host tells the guest
     through a Mailbox (guestfwd) to stop: it syncs, drops its caches,
     checks every file read back through stratad, umounts, e2fsck -fn,
     PASS, powers off.

Then, on the host: stratad exits 0 without a sanitizer report, and QEMU's
connection sent writes, flushes and trims and ended with NBD_CMD_DISC; the
chain of the export's file (qemu-img info --backing-chain) is base.qcow2 <-
bottom.raw; bottom.raw is unchanged; top.qcow2 and snap.qcow2 hold guest
data (what the commit moved) and keep their backing links, detached;
qemu-img check is clean on base, top and snap; the flattened disk passes
the host's e2fsck -fn, every file debugfs dumps matches the guest's SUMS
(whose checksum the guest printed), and files from every phase are among
them; stratad restarted from the state file alone serves the same bytes as
the offline flattened image.

Environment:
  STRATAD                 the daemon (meson sets it)
  STRATA_VM_BOOT_TIMEOUT  seconds for the boot (default 480)
  STRATA_VM_KEEP=1        keep the work dir (images, serial log) and print it
  STRATA_VM_CACHE         cache dir of the guest image

Run alone: STRATAD=build/daemon/stratad /usr/bin/python3 tests/vm/test-qemu-guest.py
"""
import hashlib
import json
import os
import re
import shutil
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "integration"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402
import vmlib  # noqa: E402
import vmtest  # noqa: E402
from vmtest import file_sha, sh, workdir  # noqa: E402

BOOT_TIMEOUT = int(os.environ.get("STRATA_VM_BOOT_TIMEOUT", "480"))

EXPORT = "vm"
SIZE = 256 << 20
BUDGET_KIB = 40 << 10      # the guest deletes its oldest files past this
KEEP_KIB = 64 << 10        # and keeps every 8th file, up to this much
MAILBOX_PORT = 7000
# Each phase lasts at least PHASE_S seconds and STEP files of the guest's
# (a file is ~250 KiB on average, ~1 MiB/s of guest writes under TCG).
PHASE_S = 15
STEP = 8
# The commit's first pass is rate-limited, so that the guest writes both
# ahead of and behind the copy, until the host lifts the limit.
FIRST_PASS_SPEED = 2 << 20
# A snapshot stalls the export for a flush of the old top and a root swap;
# under TCG + ASan on 2 shared cores allow far more than the < 10 ms the
# quiet-chain test asks for.
MAX_STALL_MS = 2000
PROGRESS = r"^strata-vm: wrote file (\d+) \((.*)\)$"

INIT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                    "guest", "qemu-guest.sh")


def make_images(d):
    bottom = os.path.join(d, "bottom.raw")
    base = os.path.join(d, "base.qcow2")
    top = os.path.join(d, "top.qcow2")
    sh("qemu-img", "create", "-q", "-f", "raw", bottom, str(SIZE))
    sh("qemu-io", "-f", "raw", "-c", "write -P 0xa5 0 4M",
       "-c", "write -P 0x5a 100M 8M", bottom)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", bottom, "-F", "raw",
       base)
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x3c 2M 4M",
       "-c", "write -P 0x96 60M 3M", base)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2",
       top)
    return bottom, base, top


def chain_files(path):
    r = sh("qemu-img", "info", "-U", "--output=json", "--backing-chain", path)
    return [x["filename"] for x in json.loads(r.stdout)]


def own_data(path):
    """Bytes of guest data allocated in the image itself (not below)."""
    r = sh("qemu-img", "map", "-U", "--output=json", path)
    return sum(e["length"] for e in json.loads(r.stdout)
               if e["depth"] == 0 and e["data"])


class Guest:
    """The VM and the host's view of its progress."""

    def __init__(self, vm):
        self.vm = vm
        self.phases = []    # (what, first file, last file)

    def files(self):
        m = self.vm.last_line(PROGRESS)
        return int(m.group(1)) if m else 0

    def phase(self, what, secs=PHASE_S, files=STEP, timeout=240):
        """Lets the guest write for at least `secs` seconds and `files`
        files; returns the files written meanwhile."""
        t0, n0 = time.time(), self.files()
        time.sleep(secs)
        n = max(self.files(), n0 + files)
        m = self.vm.wait_line(rf"^strata-vm: wrote file {n} ", timeout)
        if m is None:
            print(self.vm.tail(80))
            H.fail(f"{what}: the guest did not write file {n} in "
                   f"{timeout}s (last: {self.files()})")
        n1 = self.files()
        self.phases.append((what, n0 + 1, n1))
        H.ok(f"{what}: the guest wrote files {n0 + 1}..{n1} in "
             f"{time.time() - t0:.1f}s")
        return n1 - n0


def main():
    vmtest.begin("qemu-img", "qemu-io", "socat")
    e2fsck = shutil.which("e2fsck") or "/sbin/e2fsck"
    debugfs = shutil.which("debugfs") or "/sbin/debugfs"
    H.check_hard(os.path.exists(e2fsck) and os.path.exists(debugfs),
                 "e2fsck/debugfs not found on the host (contrib/deps.sh test "
                 "installs e2fsprogs)")
    image = vmtest.guest_image()

    d = workdir()
    P = lambda name: os.path.join(d, name)  # noqa: E731
    bottom, base, top = make_images(d)
    snap = P("snap.qcow2")
    bottom_sha = file_sha(bottom)
    ctl, state = P("ctl.sock"), P("state.json")
    daemon = H.Daemon([f"name={EXPORT},file={top},format=qcow2"],
                      extra=["--control", ctl, "--state-file", state,
                             "--verbose"])
    q = H.QMP(ctl)
    H.check_hard(chain_files(top) == [top, base, bottom], "initial chain")
    H.ok("export: bottom.raw <- base.qcow2 <- top.qcow2 on a unix socket, "
         "with --control and --state-file")

    mailbox = vmlib.Mailbox("write")
    vm = vmlib.VM(image, d, "guest", open(INIT).read(),
                  guestfwd=[(MAILBOX_PORT, mailbox.port)],
                  cmdline=(f"strata.size={SIZE} "
                           f"strata.mailbox={vmlib.guestfwd_addr(0)} "
                           f"strata.mailport={MAILBOX_PORT} "
                           f"strata.budget={BUDGET_KIB} "
                           f"strata.keep={KEEP_KIB} "
                           f"strata.timeout={BOOT_TIMEOUT}"),
                  qemu_args=vmlib.nbd_drive_args(unix_socket=daemon.sock,
                                                 export=EXPORT,
                                                 discard=True))
    g = Guest(vm)
    vm.start()

    def export_file():
        return [e for e in q.cmd("query-block-exports")
                if e["id"] == EXPORT][0]["file"]

    # 1. writes flowing
    if vm.wait_line(r"^strata-vm: wrote file 1 ", BOOT_TIMEOUT // 2) is None:
        print(vm.tail(80))
        H.fail("the guest never wrote its first file")
    H.ok(f"the guest wrote its first file {time.time() - vm.t0:.1f}s "
         "after QEMU started")
    g.phase("warm-up, into top.qcow2", secs=2 * PHASE_S)

    # 2. live snapshot
    n0 = g.files()
    r = q.cmd("blockdev-snapshot-sync", device=EXPORT, snapshot_file=snap,
              format="qcow2")
    stall_ms = r["stall-ns"] / 1e6
    n1 = g.files()
    H.check_hard(0 < stall_ms < MAX_STALL_MS,
                 f"snapshot stall {stall_ms:.3f} ms")
    m = re.search(r"snapshot: (\S+) is the new top .*stalled ([\d.]+) ms",
                  daemon.logtext())
    H.check_hard(m and m.group(1) == snap, "stratad did not log the snapshot:"
                 "\n" + daemon.logtext()[-3000:])
    H.check_hard(export_file() == snap, f"export file {export_file()}")
    H.check_hard(chain_files(snap) == [snap, top, base, bottom],
                 f"chain after the snapshot: {chain_files(snap)}")
    st = json.load(open(state))
    H.check_hard([n["filename"] for n in st["nodes"]] == [snap],
                 f"state file after the snapshot: {st}")
    H.ok(f"snapshot while the guest wrote files {n0}..{n1}: stall "
         f"{stall_ms:.2f} ms (returned; logged {m.group(2)} ms); chain "
         "bottom.raw <- base.qcow2 <- top.qcow2 <- snap.qcow2; the state "
         "file names snap.qcow2")

    # 3. writes into the overlay
    g.phase("into snap.qcow2")

    # 4. active commit down to base.qcow2, with pivot
    def job():
        js = [j for j in q.cmd("query-block-jobs") if j["device"] == "commit"]
        H.check_hard(len(js) == 1, f"query-block-jobs: {js}")
        return js[0]

    t0 = time.time()
    q.cmd("block-commit", job_id="commit", device=EXPORT, base=base,
          speed=FIRST_PASS_SPEED)
    g.phase(f"commit's first pass at {FIRST_PASS_SPEED >> 20} MiB/s")
    j = job()
    H.check_hard(j["type"] == "commit" and j["status"] == "running" and
                 not j["ready"] and j["offset"] < j["len"],
                 f"the rate-limited first pass should still run: {j}")
    H.ok(f"first pass: {j['offset'] >> 20} of {j['len'] >> 20} MiB copied "
         f"in {time.time() - t0:.1f}s; speed limit lifted")
    q.cmd("block-job-set-speed", device="commit", speed=0)
    ev = q.wait_event("BLOCK_JOB_READY", timeout=240,
                      match=lambda x: x["device"] == "commit")
    H.ok(f"BLOCK_JOB_READY {time.time() - t0:.1f}s after block-commit "
         f"({ev['data']['offset'] >> 20} MiB copied in all)")
    g.phase("job ready (guest writes mirrored to base.qcow2)")
    j = job()
    H.check_hard(j["ready"] and j["status"] == "ready",
                 f"the job should still be ready: {j}")
    # paused when ready (standby), the job must still see every write
    q.cmd("block-job-pause", device="commit")
    q.wait_event("JOB_STATUS_CHANGE", timeout=30, match=lambda x:
                 x["id"] == "commit" and x["status"] == "standby")
    g.phase("job paused in standby", secs=PHASE_S / 2, files=STEP // 2)
    j = job()
    H.check_hard(j["paused"] and j["status"] == "standby", f"standby: {j}")
    q.cmd("block-job-resume", device="commit")
    q.wait_event("JOB_STATUS_CHANGE", timeout=30, match=lambda x:
                 x["id"] == "commit" and x["status"] == "ready")
    g.phase("job resumed, ready again", secs=PHASE_S / 2, files=STEP // 2)
    n4 = g.files()
    q.cmd("block-job-complete", device="commit")
    ev = q.wait_event("BLOCK_JOB_COMPLETED", timeout=120,
                      match=lambda x: x["device"] == "commit")
    H.check_hard("error" not in ev["data"], f"commit failed: {ev}")
    n5 = g.files()
    m = re.search(r"job 'commit': (\S+) is the top of .* stalled ([\d.]+) ms",
                  daemon.logtext())
    H.check_hard(m and m.group(1) == base, "stratad did not log the pivot:\n"
                 + daemon.logtext()[-3000:])
    H.check_hard(export_file() == base, f"export file {export_file()}")
    st = json.load(open(state))
    H.check_hard([n["filename"] for n in st["nodes"]] == [base],
                 f"state file after the pivot: {st}")
    H.check_hard(q.cmd("query-block-jobs") == [], "a job is left")
    H.ok(f"block-job-complete while the guest wrote files {n4}..{n5}: "
         f"BLOCK_JOB_COMPLETED, pivot stall {m.group(2)} ms; base.qcow2 is "
         "the top, the state file names it")

    # 5. writes after the pivot, then stop
    g.phase("into base.qcow2 after the pivot")
    mailbox.set("stop")
    res = vm.wait(BOOT_TIMEOUT)
    if not res.passed:
        print(vm.tail(120))
        print("--- stratad log ---\n" + daemon.logtext()[-4000:])
        H.fail(f"guest: {res.reason} (serial log: {res.log}; "
               "STRATA_VM_KEEP=1 keeps it)")
    serial = vm.serial_text()
    m = re.search(r"strata-vm: (\d+) files match their checksums", serial)
    nfiles = int(m.group(1))
    m = re.search(r"strata-vm: SUMS: (\d+) files, sha256 ([0-9a-f]{64})",
                  serial)
    H.check_hard(m and int(m.group(1)) == nfiles, "the guest's SUMS line")
    sums_sha = m.group(2)
    total = int(re.search(r"writer stopped after (\d+) files",
                          serial).group(1))
    last = vm.last_line(PROGRESS).group(2)
    H.ok(f"guest: PASS in {res.seconds:.1f}s; {total} files written "
         f"(at the end: {last}), the {nfiles} live ones "
         "read back and matched after the pivot, e2fsck -fn clean")

    q.close()
    rc = daemon.stop()
    shutil.copy(daemon.log.name, P("stratad.log"))
    daemon.check_sanitizers()
    H.check_soft(rc == 0, f"stratad exited with {rc}")
    H.ok("stratad stopped cleanly (exit 0), no sanitizer report")
    disc = re.findall(r"conn \d+: NBD_CMD_DISC after (\d+) requests: "
                      r"read (\d+), write (\d+) \(fua \d+\), flush (\d+), "
                      r"trim (\d+)", daemon.logtext())
    H.check_soft(len(disc) == 1, f"{len(disc)} NBD_CMD_DISC lines: QEMU's "
                 "one connection should have ended with NBD_CMD_DISC")
    if disc:
        n = dict(zip(("requests", "read", "write", "flush", "trim"),
                     map(int, disc[0])))
        H.check_soft(all(n[k] > 0 for k in ("write", "flush", "trim")),
                     f"QEMU sent no write, flush or trim: {n}")
        H.ok("QEMU's NBD connection: " +
             ", ".join(f"{k} {v}" for k, v in n.items()))

    # the chain and the images
    H.check_soft(chain_files(base) == [base, bottom],
                 f"final chain: {chain_files(base)}")
    H.check_soft(file_sha(bottom) == bottom_sha, "bottom.raw changed")
    H.check_soft(chain_files(snap) == [snap, top, base, bottom],
                 f"snap.qcow2 detached with its backing kept: "
                 f"{chain_files(snap)}")
    moved = {p: own_data(p) for p in (top, snap)}
    for p, n in moved.items():
        H.check_soft(n > 0, f"{os.path.basename(p)} holds no guest data")
    H.ok("final chain bottom.raw <- base.qcow2 (qemu-img info "
         "--backing-chain); bottom.raw unchanged; the detached top.qcow2 "
         f"and snap.qcow2 keep {moved[top] >> 20} and {moved[snap] >> 20} "
         "MiB of guest data that the commit moved")
    for p in (base, top, snap):
        r = sh("qemu-img", "check", "-f", "qcow2", p, check=False)
        if H.check_soft(r.returncode == 0, f"qemu-img check "
                        f"{os.path.basename(p)}: exit {r.returncode}:\n"
                        f"{r.stdout.decode(errors='replace')}"):
            H.ok(f"qemu-img check {os.path.basename(p)}: clean")

    # the file system, read by the host
    flat = P("flat.raw")
    sh("qemu-img", "convert", "-f", "qcow2", "-O", "raw", base, flat)
    r = sh(e2fsck, "-fn", flat, check=False)
    H.check_soft(r.returncode == 0, f"host e2fsck -fn: exit {r.returncode}:"
                 f"\n{r.stdout.decode(errors='replace')[-3000:]}")
    out = P("dump")
    os.mkdir(out)
    sh(debugfs, "-R", f"rdump /w {out}", flat)
    sh(debugfs, "-R", f"dump /SUMS {out}/SUMS", flat)
    with open(os.path.join(out, "SUMS"), "rb") as f:
        sums = f.read()
    H.check_soft(hashlib.sha256(sums).hexdigest() == sums_sha,
                 "/SUMS on the host differs from the guest's list")
    bad, listed = [], set()
    for line in sums.decode().splitlines():
        want, name = line.split("  ", 1)
        listed.add(os.path.basename(name))
        p = os.path.join(out, name)
        if not os.path.exists(p):
            bad.append(f"{name}: missing")
        elif file_sha(p) != want:
            bad.append(f"{name}: checksum differs")
    extra = set(os.listdir(os.path.join(out, "w"))) - listed
    H.check_soft(not extra, f"files not in SUMS: {sorted(extra)[:10]}")
    H.check_soft(len(listed) == nfiles, f"SUMS lists {len(listed)} files, "
                 f"the guest checked {nfiles}")
    H.check_soft(not bad, "files read on the host with debugfs:\n  " +
                 "\n  ".join(bad[:20]))
    nums = [int(x[1:]) for x in listed]
    per_phase = []
    for what, first, last in g.phases:
        k = sum(first <= x <= last for x in nums)
        H.check_soft(k > 0, f"no file written in phase '{what}' (files "
                     f"{first}..{last}) is left to check")
        per_phase.append(str(k))
    H.ok("files checked per phase: " + ", ".join(per_phase))
    if r.returncode == 0 and not bad:
        H.ok(f"host: e2fsck -fn clean on the flattened disk; the {nfiles} "
             "files debugfs dumps match the guest's SUMS")
    shutil.rmtree(out)
    flat_sha = file_sha(flat)

    # restart from the state file alone: the same chain, the same bytes
    d2 = H.Daemon([], extra=["--state-file", state])
    got = hashlib.sha256()
    h = H.nbd_handle()
    h.connect_uri(d2.uri(EXPORT))
    H.check_soft(h.get_size() == SIZE, f"restarted export size {h.get_size()}")
    for off in range(0, SIZE, 4 << 20):
        got.update(h.pread(4 << 20, off))
    h.shutdown()
    rc = d2.stop()
    d2.check_sanitizers()
    H.check_soft(rc == 0, f"restarted stratad exited with {rc}")
    H.check_soft(got.hexdigest() == flat_sha, "the restarted export serves "
                 "other bytes than the offline flattened base.qcow2")
    H.check_soft("top.qcow2" not in d2.logtext() and
                 "snap.qcow2" not in d2.logtext(), "restart log mentions a "
                 "detached image:\n" + d2.logtext())
    H.ok("stratad restarted from the state file alone serves the flattened "
         "image's bytes")
    os.unlink(flat)

    H.finish_soft_checks()
    print(f"PASS: a QEMU guest wrote {total} files through a live snapshot "
          "and an active commit with pivot")


if __name__ == "__main__":
    main()
