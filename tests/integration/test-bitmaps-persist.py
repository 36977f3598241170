#!/usr/bin/python3
"""Persistent dirty bitmaps in qcow2, exactly as QEMU stores them:

1. stratad keeps three persistent bitmaps (one disabled) and a transient
   one through writes; while it runs `qemu-img info -U` shows them in use;
   after it stops, `qemu-img check` is clean, `qemu-img info` lists them
   (auto flag on the recording ones, no in-use), qemu-nbd -B serves each
   equal to the model of the writes, the transient one is gone.
2. QEMU continues them: qemu-io writes into the image (QEMU loads the auto
   bitmaps and records), `qemu-img bitmap --add/--merge` builds a new bitmap
   from strata's; stratad restarted with --export bitmap=p0 serves the
   union of both sessions' writes, and the merged bitmap equals it.
3. kill -9 while open: the bitmaps are in use on disk; on restart they are
   inconsistent (query), refused for export (block-export-add and
   --export bitmap=), refused for clear, and removable.
4. kill -9 at random instants of the store at shutdown (SIGTERM, then
   SIGKILL 0-40 ms later), 5 rounds: qemu-img check finds no corruption,
   and every bitmap is either in use or a superset of the writes.
5. The state file keeps an export's bitmaps across restarts; when the
   bitmap did not survive (inconsistent after kill -9), the export comes
   back without it.
6. A bitmap qemu-img put in a backing layer is read-only under strata
   until an active commit writes into that layer: it records the commit's
   copies and later guest writes, and QEMU reads it so after the stop.
7. Hostile bitmap directories (unknown type, granularity, flags, an empty
   name, a table of the wrong size or off the cluster grid) stop the
   start with a message naming the problem.

Run:  STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-bitmaps-persist.py
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import QMP, check, ok  # noqa: E402

harness.require_built()
harness.report_unexpected_exceptions()
harness.need("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")
import jobsutil  # noqa: E402
from jobsutil import MiB, qimg  # noqa: E402

SIZE = 64 * MiB
d = harness.tmpdir()
img = os.path.join(d, "disk.qcow2")
check(qimg("create", "-f", "qcow2", img, str(SIZE)).returncode == 0, "qemu-img create")
ctl = os.path.join(d, "ctl.sock")
rng = random.Random(8)


def start(extra_export="", state=None, expect_fail=False):
    args = ["--control", ctl]
    if state:
        args += ["--state-file", state]
    exports = [f"name=disk,file={img},format=qcow2{extra_export}"] if extra_export is not None else []
    if expect_fail:
        p = subprocess.run([harness.STRATAD, "--listen", "unix:" + os.path.join(d, "x.sock"),
                            *[a for e in exports for a in ("--export", e)], *args],
                           capture_output=True, text=True, timeout=30)
        return p
    return harness.Daemon(exports, extra=args)


def writes(h, n, gran_sets):
    """Random writes / zeroes / trims; records the touched chunks of each
    granularity in gran_sets."""
    for _ in range(n):
        off = rng.randrange(SIZE // 4096) * 4096
        ln = min(rng.choice((4096, 8192, 65536, 1 << 20)), SIZE - off)
        p = rng.random()
        if p < 0.75:
            h.pwrite(rng.randbytes(ln), off)
        elif p < 0.9:
            h.zero(ln, off)
        else:
            h.trim(ln, off)
        for g, s in gran_sets.items():
            s.update(range(off // g, (off + ln - 1) // g + 1))
    h.flush()


def info(unsafe=False):
    p = qimg("info", "--output=json", *(["-U"] if unsafe else []), img)
    check(p.returncode == 0, f"qemu-img info: {p.stderr}")
    fs = json.loads(p.stdout).get("format-specific", {}).get("data", {})
    return {b["name"]: b for b in fs.get("bitmaps", [])}


def dirty_chunks(uri, name, gran):
    p = subprocess.run(["nbdinfo", f"--map=qemu:dirty-bitmap:{name}", uri],
                       capture_output=True, text=True, timeout=60)
    check(p.returncode == 0, f"nbdinfo map {name}: {p.stderr}")
    got = set()
    for line in p.stdout.splitlines():
        off, ln, typ = (int(x) for x in line.split()[:3])
        if typ & 1:
            got.update(range(off // gran, (off + ln) // gran))
    return got


def qemu_nbd_chunks(name, gran):
    sock = os.path.join(d, "qn.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    errf = open(os.path.join(d, "qemu-nbd.err"), "w+")
    proc = subprocess.Popen(["qemu-nbd", "-r", "-f", "qcow2", "-B", name, "-k", sock, img],
                            stderr=errf, stdout=subprocess.DEVNULL)
    deadline = time.time() + 10
    while not os.path.exists(sock):
        if proc.poll() is not None:
            errf.seek(0)
            harness.fail(f"qemu-nbd -B {name}: {errf.read()}")
        check(time.time() < deadline, "qemu-nbd did not start")
        time.sleep(0.02)
    try:
        return dirty_chunks(f"nbd+unix:///?socket={sock}", name, gran)
    finally:
        proc.terminate()
        proc.wait()


def check_clean(leaks_ok=False):
    p = qimg("check", img)
    good = p.returncode == 0 or (leaks_ok and p.returncode == 3)
    check(good, f"qemu-img check: rc {p.returncode}\n{p.stdout}{p.stderr}")


# ---- 1. strata keeps bitmaps ----
dm = start()
S = QMP(ctl)
S.cmd("block-dirty-bitmap-add", node="disk", name="p0", persistent=True)
S.cmd("block-dirty-bitmap-add", node="disk", name="p1", persistent=True, granularity=4096)
S.cmd("block-dirty-bitmap-add", node="disk", name="p2", persistent=True, disabled=True)
S.cmd("block-dirty-bitmap-add", node="disk", name="t")
m64, m4 = set(), set()
h = jobsutil.nbd.NBD()
h.connect_uri(dm.uri("disk"))
writes(h, 120, {65536: m64, 4096: m4})
h.shutdown()
live = info(unsafe=True)
check(sorted(live) == ["p0", "p1", "p2"] and all("in-use" in b["flags"] for b in live.values()),
      f"while open: {live}")
S.close()
dm.stop()
check_clean()
st = info()
check(sorted(st) == ["p0", "p1", "p2"], f"stored: {st}")
check(st["p0"]["flags"] == ["auto"] and st["p1"]["flags"] == ["auto"] and st["p2"]["flags"] == [],
      f"flags: {st}")
check(st["p0"]["granularity"] == 65536 and st["p1"]["granularity"] == 4096, f"granularity {st}")
check(qemu_nbd_chunks("p0", 65536) == m64, "p0 as qemu-nbd serves it != the writes")
check(qemu_nbd_chunks("p1", 4096) == m4, "p1 as qemu-nbd serves it != the writes")
check(qemu_nbd_chunks("p2", 65536) == set(), "p2 (disabled) is empty")
ok("stored as QEMU stores them: in use while open; then clean, flags auto/none, "
   "qemu-nbd -B serves the writes exactly")

# ---- 2. QEMU continues them ----
extra = []
for _ in range(10):
    off = rng.randrange(SIZE // 65536) * 65536 + 4096
    p = subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a {off} 8192", img],
                       capture_output=True, text=True, timeout=60)
    check(p.returncode == 0, f"qemu-io: {p.stderr}")
    m64.add(off // 65536)
    m4.update(range(off // 4096, (off + 8191) // 4096 + 1))
check(qimg("bitmap", "--add", "-g", "65536", img, "merged").returncode == 0, "qemu-img bitmap --add")
p = qimg("bitmap", "--merge", "p0", img, "merged")
check(p.returncode == 0, f"qemu-img bitmap --merge: {p.stderr}")
check_clean()
dm = start(",bitmap=p1")
S = QMP(ctl)
bms = {b["name"]: b for b in S.cmd("query-named-block-nodes")[0]["dirty-bitmaps"]}
check(sorted(bms) == ["merged", "p0", "p1", "p2"], f"loaded: {bms}")
check(bms["p0"]["recording"] and bms["p0"]["persistent"] and not bms["p2"]["recording"]
      and bms["p1"]["busy"], f"loaded flags: {bms}")
check(dirty_chunks(dm.uri("disk"), "p1", 4096) == m4, "strata serves p1 = both sessions' writes")
S.close()
dm.stop()
check(qemu_nbd_chunks("merged", 65536) == m64, "qemu-img bitmap --merge of strata's p0")
check(qemu_nbd_chunks("p0", 65536) == m64, "p0 after both")
ok("QEMU continues strata's bitmaps (qemu-io records into them, qemu-img bitmap "
   "--merge reads them), and strata continues QEMU's")

# ---- 3. kill -9 while open ----
dm = start()
h = jobsutil.nbd.NBD()
h.connect_uri(dm.uri("disk"))
writes(h, 30, {65536: m64, 4096: m4})
dm.proc.send_signal(signal.SIGKILL)
dm.proc.wait()
check_clean(leaks_ok=True)
st = info()
check(all("in-use" in b["flags"] for b in st.values()), f"after kill -9: {st}")
p = start(",bitmap=p0,readonly=on", expect_fail=True)
check(p.returncode != 0 and "inconsistent" in p.stderr, f"--export bitmap= of an inconsistent "
      f"bitmap: rc {p.returncode} {p.stderr}")
dm = start()
S = QMP(ctl)
bms = {b["name"]: b for b in S.cmd("query-named-block-nodes")[0]["dirty-bitmaps"]}
check(all(b.get("inconsistent") and not b["recording"] for b in bms.values()),
      f"after kill -9, inconsistent: {bms}")
S.cmd("blockdev-add", driver="raw", node_name="side",
      file={"driver": "file", "filename": harness.make_file(os.path.join(d, "s.raw"), MiB)})
cls, desc = S.error("block-export-add", type="nbd", id="bk", node_name="side", name="bk",
                    bitmaps=[{"node": "disk", "name": "p0"}])
check(desc.startswith("Bitmap 'p0' is inconsistent and cannot be used"), desc)
cls, desc = S.error("block-dirty-bitmap-clear", node="disk", name="p0")
check("inconsistent" in desc, desc)
for b in ("p0", "p1", "p2", "merged"):
    S.cmd("block-dirty-bitmap-remove", node="disk", name=b)
check(info(unsafe=True) == {}, "removed from the image at once")
S.cmd("block-dirty-bitmap-add", node="disk", name="p0", persistent=True)
S.close()
dm.stop()
check_clean(leaks_ok=True)
ok("kill -9 while open: inconsistent on restart, refused for export and clear, "
   "removable; qemu-img check finds no corruption")

# ---- 4. kill -9 during the store ----
seen = {"stored": 0, "in use": 0}
for rnd in range(5):
    dm = start()
    S = QMP(ctl)
    names = [b["name"] for b in S.cmd("query-named-block-nodes")[0].get("dirty-bitmaps", [])]
    for b in names:
        S.cmd("block-dirty-bitmap-remove", node="disk", name=b)
    S.cmd("block-dirty-bitmap-add", node="disk", name="k0", persistent=True, granularity=512)
    S.cmd("block-dirty-bitmap-add", node="disk", name="k1", persistent=True)
    c512, c64 = set(), set()
    h = jobsutil.nbd.NBD()
    h.connect_uri(dm.uri("disk"))
    writes(h, 40, {512: c512, 65536: c64})
    h.shutdown()
    S.close()
    dm.proc.send_signal(signal.SIGTERM)
    time.sleep(rng.uniform(0, 0.04))
    dm.proc.send_signal(signal.SIGKILL)
    dm.proc.wait()
    check_clean(leaks_ok=True)
    st = info()
    for name, gran, model in (("k0", 512, c512), ("k1", 65536, c64)):
        if name not in st or "in-use" in st[name]["flags"]:
            seen["in use"] += 1
            continue
        seen["stored"] += 1
        got = qemu_nbd_chunks(name, gran)
        check(model <= got, f"round {rnd}: {name} stored consistent but misses writes")
ok("kill -9 at random instants of the store (5 rounds): no corruption, every "
   f"bitmap in use or complete ({seen})")

# ---- 5. the state file keeps exports' bitmaps ----
state = os.path.join(d, "state.json")
if os.path.exists(state):
    os.unlink(state)
dm = start(None, state=state)
S = QMP(ctl)
S.cmd("blockdev-add", driver="qcow2", node_name="disk",
      file={"driver": "file", "filename": img})
for b in [b["name"] for b in S.cmd("query-named-block-nodes")[0].get("dirty-bitmaps", [])]:
    S.cmd("block-dirty-bitmap-remove", node="disk", name=b)
S.cmd("block-dirty-bitmap-add", node="disk", name="s0", persistent=True)
S.cmd("block-export-add", type="nbd", id="disk", node_name="disk", name="disk",
      writable=True, bitmaps=["s0"])
S.close()
dm.stop()
dm = start(None, state=state)
S = QMP(ctl)
p = subprocess.run(["nbdinfo", "--json", dm.uri("disk")], capture_output=True, text=True,
                   errors="replace", timeout=30)
check("qemu:dirty-bitmap:s0" in json.loads(p.stdout)["exports"][0]["contexts"],
      f"after restart the export offers s0: {p.stdout}")
S.close()
dm.proc.send_signal(signal.SIGKILL)
dm.proc.wait()
dm = start(None, state=state)
p = subprocess.run(["nbdinfo", "--json", dm.uri("disk")], capture_output=True, text=True,
                   errors="replace", timeout=30)
check("qemu:dirty-bitmap:s0" not in json.loads(p.stdout)["exports"][0]["contexts"]
      and "restored without its dirty bitmaps" in dm.logtext(),
      "after kill -9 the export comes back without the inconsistent bitmap")
dm.stop()
check_clean(leaks_ok=True)
ok("the state file keeps an export's bitmaps; an inconsistent one is dropped, loudly")

# ---- 6. a persistent bitmap of a backing layer, and an active commit ----
base = os.path.join(d, "base.qcow2")
top = os.path.join(d, "top.qcow2")
check(qimg("create", "-f", "qcow2", base, str(SIZE)).returncode == 0, "create base")
check(qimg("bitmap", "--add", base, "bb").returncode == 0, "qemu-img bitmap --add bb")
check(qimg("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top).returncode == 0, "top")
dm = harness.Daemon([f"name=vm,file={top},format=qcow2"], extra=["--control", ctl])
S = QMP(ctl)
nodes = {n["node-name"]: n for n in S.cmd("query-named-block-nodes", flat=True)}
bb = nodes["vm.backing"]["dirty-bitmaps"][0]
check(bb["name"] == "bb" and bb["persistent"] and "dirty-bitmaps" not in nodes["vm"],
      f"the backing layer's bitmap: {nodes}")
cls, desc = S.error("block-dirty-bitmap-clear", node="vm.backing", name="bb")
check(desc == "Bitmap 'bb' is readonly and cannot be modified", desc)
h = jobsutil.nbd.NBD()
h.connect_uri(dm.uri("vm"))
h.pwrite(b"c" * 65536, 3 * MiB)          # into top, then committed into base
h.flush()
S.cmd("block-commit", device="vm", job_id="ac")
S.wait_event("BLOCK_JOB_READY", timeout=60)
S.cmd("block-job-complete", device="ac")
S.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
h.pwrite(b"d" * 4096, 9 * MiB)            # into base, now the top
h.flush()
h.shutdown()
nodes = {n["node-name"]: n for n in S.cmd("query-named-block-nodes", flat=True)}
bb = nodes["vm"]["dirty-bitmaps"][0]
check(bb["name"] == "bb" and bb["recording"] and bb["count"] == 2 * 65536,
      f"after the commit, base's bitmap recorded the commit's and the guest's writes: {bb}")
S.close()
dm.stop()
check(qimg("check", base).returncode == 0, "qemu-img check base")
img = base
check(qemu_nbd_chunks("bb", 65536) == {3 * MiB // 65536, 9 * MiB // 65536},
      "bb as QEMU reads it after the commit")
ok("a backing layer's persistent bitmap is read-only until a commit writes into "
   "it; it records the commit's copies and is stored consistent")

# ---- 7. hostile bitmap directories are refused with a clear message ----
import shutil  # noqa: E402
import struct  # noqa: E402
import qcow2lib  # noqa: E402

good = os.path.join(d, "h.qcow2")
check(qimg("create", "-f", "qcow2", good, str(SIZE)).returncode == 0, "create h")
check(qimg("bitmap", "--add", good, "hb").returncode == 0, "bitmap --add hb")


def dir_offset(path):
    """Offset of the bitmap directory (from the bitmaps header extension)."""
    with open(path, "rb") as f:
        hdr = f.read(65536)
    pos = struct.unpack(">I", hdr[100:104])[0]
    while pos + 8 <= len(hdr):
        typ, ln = struct.unpack(">II", hdr[pos:pos + 8])
        if typ == 0x23852875:
            return struct.unpack(">Q", hdr[pos + 24:pos + 32])[0]
        if typ == 0:
            break
        pos += 8 + (ln + 7) // 8 * 8
    harness.fail("no bitmaps extension")


for what, at, val, expect in (
        ("unknown type", 16, b"\x07", "does not support"),
        ("granularity bits 40", 17, b"\x28", "does not support"),
        ("unknown flag", 12, b"\x00\x00\x01\x02", "does not support"),
        ("empty name", 18, b"\x00\x00", "bad name length"),
        ("table of the wrong size", 8, b"\x00\x00\x10\x00", "bad bitmap table"),
        ("table off the cluster grid", 0, b"\x00\x00\x00\x00\x00\x00\x10\x01", "bad bitmap table")):
    bad = os.path.join(d, "bad.qcow2")
    shutil.copyfile(good, bad)
    off = dir_offset(bad)
    with open(bad, "r+b") as f:
        f.seek(off + at)
        f.write(val)
    rc, log = qcow2lib.stratad_refuses([f"name=x,file={bad},format=qcow2,readonly=on"])
    check(rc != 0 and expect in log, f"{what}: {log[-600:]}")
ok("hostile bitmap directories (type, granularity, flags, name, table) are "
   "refused at start with a message naming the problem")
