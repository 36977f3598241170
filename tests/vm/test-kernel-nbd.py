#!/usr/bin/env python3
"""Kernel nbd client test: a stock Debian kernel in QEMU (TCG) mounts a
stratad export with nbd-client (issue 6).

The export is a qcow2 chain base.raw <- mid.qcow2 <- top.qcow2 served as
file=top.qcow2,format=qcow2, or with STRATA_VM_FORMAT=raw a single raw
file.  Base and mid hold junk patterns that the guest's mkfs overwrites.

  boot 1 (write):  two vCPUs; the host's stratad port must be unreachable
                   at 10.0.2.2 (restrict=on); nbd-client -C 2 -b 4096 (the
                   export must advertise CAN_MULTI_CONN, checked first),
                   mkfs.ext4 -b 4096, mount,
                   copy files with known SHA-256, sync, delete a scratch
                   file, fstrim, re-read after dropping caches, umount,
                   e2fsck -fn, disconnect.
  host:            stratad stopped (exit 0); from its --verbose log: each
                   connection carried >= 20 requests, and the kernel sent
                   WRITE, FUA, FLUSH and TRIM; qemu-img check on every qcow2
                   image; base and mid unchanged; the image flattened and
                   checked with the host's e2fsck -fn and every file read
                   back with debugfs against its checksum.
  boot 2 (verify): stratad restarted with readonly=on and --tls=require
                   --tls-verify-peer (X.509 certificates made by certtool);
                   the guest's nbd-client connects over TLS with a client
                   certificate (-cacertfile -certfile -keyfile
                   -tlshostname: Debian's nbd-client relays the kernel's
                   socket through its own GnuTLS proxy); one connection,
                   the default 1 KiB block size; the device must be
                   read-only; mount -o ro, every checksum, e2fsck -fn, a
                   write refused.
  host:            no WRITE or TRIM reached stratad; the connection took
                   the TLS path (stratad's log); qemu-img check again; the
                   image content unchanged.
  boot 3 (rewrite): like boot 1 over the same export with one connection,
                   1 KiB device blocks and mke2fs's own choice of 1 KiB file
                   system blocks, so stratad gets 1 KiB requests; the host
                   checks of boot 1 again.

stratad listens on 127.0.0.1:<free port> only; the guest reaches it through
QEMU user networking with restrict=on and one guestfwd rule (socat, run per
guest connection).  Every stratad log is checked for sanitizer reports.

Environment:
  STRATAD                 the daemon (meson sets it)
  STRATA_VM_FORMAT        qcow2 (default) | raw; never a silent fallback:
                          if stratad refuses format=qcow2 the test fails
  STRATA_VM_BOOT_TIMEOUT  seconds per boot (default 300)
  STRATA_VM_KEEP=1        keep the work dir (images, serial logs) and print it
  STRATA_VM_CACHE         cache dir of the guest image (default
                          ${XDG_CACHE_HOME:-~/.cache}/strata-vm)

Run alone: STRATAD=build/daemon/stratad /usr/bin/python3 tests/vm/test-kernel-nbd.py
"""
import hashlib
import os
import random
import re
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "integration"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402
import tlscerts  # noqa: E402
import vmlib  # noqa: E402
import vmtest  # noqa: E402
from vmtest import file_sha, sh, workdir  # noqa: E402

FORMAT = os.environ.get("STRATA_VM_FORMAT", "qcow2")
BOOT_TIMEOUT = int(os.environ.get("STRATA_VM_BOOT_TIMEOUT", "300"))

EXPORT = "vm"
SIZE = 256 << 20
GUEST_PORT = 10809
SEED = 6
# Each connection of a boot must carry at least this many requests (with
# nbd-client -C 2 the guest has two CPUs, and both connections get work).
MIN_REQUESTS = 20

# The boots, in order.  mode: write (mkfs and fill) or verify (read-only
# export, every checksum); conns: nbd-client -C; bs: nbd-client -b (the
# device's logical block size); fsbs: mkfs.ext4 -b, None for mke2fs's own
# choice (1 KiB blocks on a device this small: 1 KiB requests to stratad).
BOOTS = [
    dict(name="write", mode="write", conns=2, bs=4096, fsbs=4096),
    dict(name="verify", mode="verify", conns=1, bs=1024, tls=True),
    dict(name="rewrite", mode="write", conns=1, bs=1024, fsbs=None),
]

INIT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                    "guest", "kernel-nbd.sh")


def make_data():
    """Guest files {path: bytes} and their SHA256SUMS (paths relative to the
    mount point)."""
    rng = random.Random(SEED)
    files = {
        "data/readme.txt": b"strata kernel nbd test\n" * 200,
        "data/zeros-1m": bytes(1 << 20),
        "data/rand-1m": rng.randbytes(1 << 20),
        "data/rand-7m-odd": rng.randbytes((7 << 20) + 123),
        "data/rand-16m": rng.randbytes(16 << 20),
    }
    for i in range(48):
        files[f"data/many/f{i:02d}"] = rng.randbytes(rng.randint(1, 40000))
    sums = "".join(f"{hashlib.sha256(v).hexdigest()}  {k}\n"
                   for k, v in sorted(files.items()))
    return files, sums


def qemu_io(fmt, path, *cmds):
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    sh(*(args + [path]))


def make_images(d):
    """The export's image(s): returns (the export's file, [every image of
    the chain]); the list is empty with STRATA_VM_FORMAT=raw."""
    base = os.path.join(d, "base.raw")
    sh("qemu-img", "create", "-q", "-f", "raw", base, str(SIZE))
    # junk the guest's mkfs must overwrite (or never look at)
    qemu_io("raw", base, "write -P 0xa5 0 4M", "write -P 0x5a 100M 8M",
            f"write -P 0xc3 {SIZE - (1 << 20)} 1M")
    if FORMAT == "raw":
        return base, []
    mid = os.path.join(d, "mid.qcow2")
    top = os.path.join(d, "top.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", mid)
    qemu_io("qcow2", mid, "write -P 0x3c 2M 4M", "write -P 0x96 60M 3M")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top)
    return top, [base, mid, top]


def export_spec(path, readonly):
    return (f"name={EXPORT},file={path},format={FORMAT},"
            f"readonly={'on' if readonly else 'off'}")


def flat_sha(path, fmt, d):
    """SHA-256 of the guest-visible content of an image."""
    if fmt == "raw":
        return file_sha(path)
    out = os.path.join(d, "flat-tmp.raw")
    sh("qemu-img", "convert", "-f", fmt, "-O", "raw", path, out)
    s = file_sha(out)
    os.unlink(out)
    return s


def qemu_img_check(images):
    qcow2 = [p for p in images if p.endswith(".qcow2")]
    if not qcow2:
        H.ok("qemu-img check: no qcow2 image (STRATA_VM_FORMAT=raw)")
    for p in qcow2:
        r = sh("qemu-img", "check", "-f", "qcow2", p, check=False)
        H.check_soft(r.returncode == 0,
                     f"qemu-img check {os.path.basename(p)}: exit "
                     f"{r.returncode}:\n{r.stdout.decode(errors='replace')}")
        if r.returncode == 0:
            H.ok(f"qemu-img check {os.path.basename(p)}: clean")


def host_fs_check(export_file, d, files, fsbs):
    """The host's own e2fsck and debugfs on a flat copy of the image: the
    guest's data really is in the image, at the right place."""
    flat = os.path.join(d, "flat.raw")
    sh("qemu-img", "convert", "-f", FORMAT, "-O", "raw", export_file, flat)
    e2fsck = shutil.which("e2fsck") or "/sbin/e2fsck"
    debugfs = shutil.which("debugfs") or "/sbin/debugfs"
    if not os.path.exists(e2fsck) or not os.path.exists(debugfs):
        H.fail("e2fsck/debugfs not found on the host (contrib/deps.sh test "
               "installs e2fsprogs)")
    r = sh(e2fsck, "-fn", flat, check=False)
    H.check_soft(r.returncode == 0,
                 f"host e2fsck -fn: exit {r.returncode}:\n"
                 f"{r.stdout.decode(errors='replace')[-3000:]}")
    want_bs = fsbs or 1024
    m = re.search(rb"^Block size:\s*(\d+)",
                  sh(debugfs, "-R", "stats", flat).stdout, re.M)
    H.check_soft(m and int(m.group(1)) == want_bs,
                 f"file system block size {m and int(m.group(1))}, "
                 f"expected {want_bs}")
    out = os.path.join(d, "dump")
    os.mkdir(out)
    sh(debugfs, "-R", f"rdump /data {out}", flat)
    bad = []
    for k, v in files.items():
        p = os.path.join(out, k)
        if not os.path.exists(p):
            bad.append(f"{k}: missing")
            continue
        with open(p, "rb") as f:
            got = f.read()
        if got != v:
            bad.append(f"{k}: differs at byte {H.first_diff(got, v)}")
    H.check_soft(not bad, "files read back on the host with debugfs:\n  " +
                 "\n  ".join(bad[:20]))
    if r.returncode == 0 and not bad:
        H.ok(f"host: e2fsck -fn clean, {want_bs}-byte blocks, {len(files)} "
             "files read back with debugfs match")
    shutil.rmtree(out)
    s = file_sha(flat)
    os.unlink(flat)
    return s


DISC_LINE = re.compile(
    r"conn (\d+): NBD_CMD_DISC after (\d+) requests: read (\d+), "
    r"write (\d+) \(fua (\d+)\), flush (\d+), trim (\d+), other (\d+)")
COUNTS = ("requests", "read", "write", "fua", "flush", "trim", "other")


def connections(logtext):
    """{conn id: {requests, read, write, fua, flush, trim, other} counted
    up to its NBD_CMD_DISC, or None without one} for the connections that
    chose the export (stratad --verbose log)."""
    conns = {int(m.group(1)): None for m in re.finditer(
        rf"conn (\d+): transmission on export '{EXPORT}'", logtext)}
    for m in DISC_LINE.finditer(logtext):
        if int(m.group(1)) in conns:
            conns[int(m.group(1))] = dict(zip(COUNTS,
                                              map(int, m.groups()[1:])))
    return conns


def probe(daemon, readonly, certs=None):
    """What the export advertises, seen by libnbd on the unix socket (over
    TLS with the client certificate when certs is given)."""
    h = H.nbd_handle()
    if certs:
        import nbd
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(certs.path("alice"))
    h.connect_uri(daemon.uri(EXPORT))
    size = h.get_size()
    mc = h.can_multi_conn()
    ro = h.is_read_only()
    h.shutdown()
    H.check_hard(size == SIZE, f"export size {size}, expected {SIZE}")
    H.check_hard(bool(ro) == readonly, f"export read-only flag {ro}, "
                 f"expected {readonly}")
    return mc


def boot(image, d, daemon, b, files, sums, certs):
    name, conns, bs = b["name"], b["conns"], b["bs"]
    init = open(INIT).read()
    guest_files = {"SHA256SUMS": sums.encode()}
    if b.get("tls"):
        for f in ("ca-cert.pem", "client-cert.pem", "client-key.pem"):
            with open(os.path.join(certs.path("alice"), f), "rb") as fh:
                guest_files["tls/" + f] = fh.read()
    if b["mode"] == "write":
        guest_files.update(files)
        guest_files["scratch"] = random.Random(SEED + 1).randbytes(8 << 20)
    cmdline = (f"strata.mode={b['mode']} strata.conns={conns} strata.bs={bs} "
               f"strata.fsbs={b.get('fsbs') or 'default'} "
               f"strata.export={EXPORT} strata.size={SIZE} "
               f"strata.server={vmlib.guestfwd_addr(0)} "
               f"strata.port={GUEST_PORT} "
               f"strata.tls={1 if b.get('tls') else 0}"
               + (f" strata.hostport={daemon.port}" if b["mode"] == "write"
                  and b["conns"] > 1 else ""))
    before = len(daemon.logtext())
    vm = vmlib.VM(image, d, name, init, files=guest_files,
                  guestfwd=[(GUEST_PORT, daemon.port)], cmdline=cmdline,
                  smp=conns)
    r = vm.run(BOOT_TIMEOUT)
    if not r.passed:
        print(vm.tail(120))
        print("--- stratad log ---\n" + daemon.logtext()[before:][-4000:])
        H.fail(f"boot '{name}': {r.reason} (serial log: {r.log}; "
               "STRATA_VM_KEEP=1 keeps it)")
    H.ok(f"boot '{name}' ({conns} connection(s), block size {bs}"
         f"{', TLS' if b.get('tls') else ''}): guest says PASS in "
         f"{r.seconds:.1f}s")
    return before


def check_connections(daemon, b, before):
    """After stratad stopped: the boot's connections, each with its share
    of the requests and a clean NBD_CMD_DISC; what the kernel sent."""
    log = daemon.logtext()[before:]
    seen = connections(log)
    name = b["name"]
    tls = set(int(m.group(1)) for m in re.finditer(
        r"conn (\d+): TLS path", log))
    if b.get("tls"):
        H.check_soft(seen and set(seen) <= tls, f"boot '{name}': connections "
                     f"{sorted(set(seen) - tls)} did not take the TLS path")
    else:
        H.check_soft(not tls, f"boot '{name}': TLS on a plaintext boot")
    H.check_soft(len(seen) == b["conns"], f"boot '{name}': stratad saw "
                 f"{len(seen)} connection(s) on '{EXPORT}', expected "
                 f"{b['conns']}")
    total = dict.fromkeys(COUNTS, 0)
    for cid, n in seen.items():
        if not H.check_soft(n is not None, f"boot '{name}': connection "
                            f"{cid} ended without NBD_CMD_DISC"):
            continue
        H.check_soft(n["requests"] >= MIN_REQUESTS,
                     f"boot '{name}': connection {cid} carried "
                     f"{n['requests']} requests, fewer than {MIN_REQUESTS}")
        for k in COUNTS:
            total[k] += n[k]
    if b["mode"] == "write":
        for k in ("write", "fua", "flush", "trim"):
            H.check_soft(total[k] > 0, f"boot '{name}': the kernel sent no "
                         f"{k.upper()} request")
    else:
        H.check_soft(total["write"] == 0 and total["trim"] == 0,
                     f"boot '{name}': write or trim requests on a read-only "
                     f"export: {total}")
    H.ok(f"boot '{name}': requests per connection: " + ", ".join(
        str(n and n["requests"]) for n in seen.values()) + "; in all: " +
        ", ".join(f"{k} {total[k]}" for k in COUNTS[1:]))


def start_daemon(export_file, readonly, certs=None):
    tls = (["--tls=require", "--tls-certificates", certs.server,
            "--tls-verify-peer"] if certs else [])
    return H.Daemon([export_spec(export_file, readonly)], tcp=True,
                    extra=["--verbose", *tls])


def stop_daemon(daemon, d, name):
    rc = daemon.stop()
    shutil.copy(daemon.log.name, os.path.join(d, f"stratad-{name}.log"))
    daemon.check_sanitizers()
    if H.check_soft(rc == 0, f"stratad ({name}) exited with {rc}"):
        H.ok("stratad stopped cleanly, no sanitizer report")


def main():
    vmtest.begin("qemu-img", "qemu-io", "socat", "certtool", "psktool")
    if FORMAT not in ("qcow2", "raw"):
        H.fail(f"STRATA_VM_FORMAT={FORMAT}: expected qcow2 or raw")
    H.ok(f"format: {FORMAT} (STRATA_VM_FORMAT)")

    image = vmtest.guest_image()

    d = workdir()
    files, sums = make_data()
    export_file, images = make_images(d)
    lower = [p for p in images if p != export_file]
    lower_before = {p: (file_sha(p) if p.endswith(".raw") else
                        flat_sha(p, "qcow2", d)) for p in lower}
    H.ok("images: " + ", ".join(os.path.basename(p)
                                for p in images or [export_file]))

    certs = tlscerts.Certs()
    written = None
    for b in BOOTS:
        ro = b["mode"] == "verify"
        daemon = start_daemon(export_file, ro, certs if b.get("tls") else None)
        mc = probe(daemon, ro, certs if b.get("tls") else None)
        if b["conns"] > 1:
            H.check_hard(mc, "the export does not advertise CAN_MULTI_CONN; "
                         f"nbd-client -C {b['conns']} needs it")
            H.ok("export advertises CAN_MULTI_CONN")
        before = boot(image, d, daemon, b, files, sums, certs)
        stop_daemon(daemon, d, b["name"])
        check_connections(daemon, b, before)
        qemu_img_check(images)
        for p in lower:
            now = (file_sha(p) if p.endswith(".raw") else
                   flat_sha(p, "qcow2", d))
            H.check_soft(now == lower_before[p], f"{os.path.basename(p)} "
                         "changed: writes must go to the top image")
        if lower:
            H.ok("backing images unchanged")
        if ro:
            H.check_soft(flat_sha(export_file, FORMAT, d) == written,
                         "the image changed during the read-only boot")
            H.ok("image content unchanged by the read-only boot")
        else:
            written = host_fs_check(export_file, d, files, b.get("fsbs"))

    H.finish_soft_checks()
    print(f"PASS: kernel nbd client on a {FORMAT} export "
          f"({len(files)} files, {len(BOOTS)} boots)")


if __name__ == "__main__":
    main()
