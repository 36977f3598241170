#!/usr/bin/python3
"""A dirty bitmap served as the NBD meta context qemu:dirty-bitmap:NAME,
side by side with qemu-storage-daemon 7.2: the same QMP sequence (bitmaps
added, the same writes, write-zeroes and trims, one bitmap disabled, the
writable export replaced by a read-only one offering the bitmaps) must
give identical `nbdinfo --map=qemu:dirty-bitmap:NAME` output on both, equal
to a model of the writes; qemu-img reads the bitmap with x-dirty-bitmap
(libvirt's documented way) identically from both; the export's bitmap
is busy (cannot be removed, cleared or changed) until the export goes;
block-export-add refuses bitmaps as QEMU does (same messages).

Run:  STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-bitmaps-nbd.py
"""
import json
import os
import random
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import QMP, QMPError, check, ok  # noqa: E402

harness.require_built()
harness.report_unexpected_exceptions()
harness.need("qemu-img", "qemu-storage-daemon", "nbdinfo")
import jobsutil  # noqa: E402
from jobsutil import MiB  # noqa: E402

SIZE = 48 * MiB
GRAN = 65536
d = harness.tmpdir()
ds, dq = os.path.join(d, "strata"), os.path.join(d, "qsd")
for x in (ds, dq):
    os.mkdir(x)
jobsutil.make_base(os.path.join(d, "base.qcow2"), SIZE, seed=3)
for x in (ds, dq):
    shutil.copyfile(os.path.join(d, "base.qcow2"), os.path.join(x, "disk.qcow2"))

s_ctl = os.path.join(d, "s-ctl.sock")
s_dmn = harness.Daemon([f"name=disk,file={ds}/disk.qcow2,format=qcow2"],
                       extra=["--control", s_ctl])
q_ctl = os.path.join(d, "q-ctl.sock")
q_nbd = os.path.join(d, "q-nbd.sock")
harness.start_qsd(q_ctl, q_nbd, [
    "--blockdev", f"driver=file,filename={dq}/disk.qcow2,node-name=disk-file,discard=unmap",
    "--blockdev", "driver=qcow2,file=disk-file,node-name=disk,discard=unmap",
    "--export", "type=nbd,id=disk,node-name=disk,name=disk,writable=on"])
S = QMP(s_ctl)
Q = QMP(q_ctl)


def uri_s(name):
    return s_dmn.uri(name)


def uri_q(name):
    return f"nbd+unix:///{name}?socket={q_nbd}"


hs = jobsutil.nbd.NBD()
hs.connect_uri(uri_s("disk"))
hq = jobsutil.nbd.NBD()
hq.connect_uri(uri_q("disk"))
rng = random.Random(21)
dirty = {"b0": set(), "b1": set()}
recording = set()


def io(count):
    for _ in range(count):
        off = rng.randrange(SIZE // 4096) * 4096
        n = min(rng.choice((4096, 65536, 300 * 1024, 2 * MiB)), SIZE - off)
        p = rng.random()
        if p < 0.7:
            data = rng.randbytes(n)
            hs.pwrite(data, off)
            hq.pwrite(data, off)
        elif p < 0.85:
            hs.zero(n, off)
            hq.zero(n, off)
        else:
            hs.trim(n, off)
            hq.trim(n, off)
        for b in recording:
            dirty[b].update(range(off // GRAN, (off + n - 1) // GRAN + 1))
    hs.flush()
    hq.flush()


def both(cmd, /, **args):
    out = []
    for qmp in (S, Q):
        try:
            out.append(("ok", qmp.cmd(cmd, **args)))
        except QMPError as e:
            out.append(("error", e.desc))
    check(out[0] == out[1] or (out[0][0] == out[1][0] == "ok"),
          f"{cmd} {args}: strata {out[0]}, qemu-storage-daemon {out[1]}")
    return out[0]


def nbdinfo_map(uri, ctx):
    p = subprocess.run(["nbdinfo", f"--map={ctx}", uri], capture_output=True,
                       text=True, timeout=60)
    check(p.returncode == 0, f"nbdinfo --map={ctx} {uri}: {p.stderr}")
    return p.stdout


def model_map(chunks):
    """nbdinfo's lines for a set of dirty chunks."""
    lines, pos = [], 0
    nchunks = SIZE // GRAN
    i = 0
    while i < nchunks:
        d0 = i in chunks
        j = i
        while j < nchunks and (j in chunks) == d0:
            j += 1
        lines.append("%10d  %10d  %2d  %s" % (i * GRAN, (j - i) * GRAN, 1 if d0 else 0,
                                            "dirty" if d0 else "clean"))
        i = j
    return lines


def parse_map(text):
    return [" ".join(line.split()) for line in text.strip().splitlines()]


both("block-dirty-bitmap-add", node="disk", name="b0")
recording.add("b0")
io(80)
both("block-dirty-bitmap-add", node="disk", name="b1", granularity=GRAN)
recording.add("b1")
io(80)
both("block-dirty-bitmap-disable", node="disk", name="b0")
recording.discard("b0")
io(40)
ok("bitmaps b0 (then disabled) and b1 recorded the same writes on both")

# a read-only export cannot offer a recording bitmap; unknown ones refused
hs.shutdown()
hq.shutdown()
both("block-export-del", id="disk")
for bl, what in ((["b1"], "recording bitmap on a read-only export"),
                 (["zz"], "unknown bitmap"),
                 ([{"node": "disk", "name": "zz"}], "unknown bitmap on a node"),
                 ([{"node": "nope", "name": "b0"}], "unknown node")):
    r = both("block-export-add", type="nbd", id="bk", node_name="disk", name="backup",
             bitmaps=bl)
    check(r[0] == "error", f"{what}: refused")
both("block-dirty-bitmap-disable", node="disk", name="b1")
both("block-export-add", type="nbd", id="bk", node_name="disk", name="backup",
     bitmaps=["b0", {"node": "disk", "name": "b1"}])
ok("block-export-add with bitmaps: same refusals, then accepted on both")

for b in ("b0", "b1"):
    ms = nbdinfo_map(uri_s("backup"), f"qemu:dirty-bitmap:{b}")
    mq = nbdinfo_map(uri_q("backup"), f"qemu:dirty-bitmap:{b}")
    check(ms == mq, f"nbdinfo --map {b}:\nstrata:\n{ms}\nqsd:\n{mq}")
    check(parse_map(ms) == [" ".join(x.split()) for x in model_map(dirty[b])],
          f"{b}: the map is not the model of the writes:\n{ms}")
ok("nbdinfo --map=qemu:dirty-bitmap:b0 / b1: identical to qemu-storage-daemon's "
   "and to the model of the writes")

# the context list
p = subprocess.run(["nbdinfo", "--json", uri_s("backup")], capture_output=True,
                   text=True, errors="replace", timeout=30)
ctxs = json.loads(p.stdout)["exports"][0]["contexts"]
check("qemu:dirty-bitmap:b0" in ctxs and "qemu:dirty-bitmap:b1" in ctxs, f"contexts {ctxs}")
ok("NBD_OPT_LIST_META_CONTEXT lists both bitmaps")

# qemu-img with x-dirty-bitmap (libvirt's kbase "incremental backup")
maps = []
for sock in (s_dmn.sock, q_nbd):
    p = subprocess.run(["qemu-img", "map", "--output=json", "--image-opts",
                        f"driver=nbd,export=backup,server.type=unix,server.path={sock},"
                        "x-dirty-bitmap=qemu:dirty-bitmap:b0"],
                       capture_output=True, text=True, timeout=60)
    check(p.returncode == 0, f"qemu-img map x-dirty-bitmap: {p.stderr}")
    maps.append([(e["start"], e["length"], e["data"]) for e in json.loads(p.stdout)])
check(maps[0] == maps[1], f"qemu-img map x-dirty-bitmap: strata {maps[0]}\nqsd {maps[1]}")
got = set()
for start, length, data in maps[0]:
    if not data:   # x-dirty-bitmap: dirty areas read as holes
        got.update(range(start // GRAN, (start + length) // GRAN))
check(got == dirty["b0"], "qemu-img map x-dirty-bitmap: dirty areas differ from the model")
ok("qemu-img map with x-dirty-bitmap reads the same bitmap from both")

# busy while exported
for cmd in ("remove", "clear", "enable"):
    r = both(f"block-dirty-bitmap-{cmd}", node="disk", name="b0")
    check(r[0] == "error" and "in use" in r[1], f"{cmd} of an exported bitmap: {r}")
r = both("block-dirty-bitmap-merge", node="disk", target="b0", bitmaps=["b1"])
check(r[0] == "error", "merge into an exported bitmap is refused")
st = [b for b in S.cmd("query-named-block-nodes", flat=True)[0]["dirty-bitmaps"]]
check(all(b["busy"] for b in st), f"busy in queries: {st}")
r = S.error("blockdev-del", node_name="disk")
check("in use" in r[1], f"blockdev-del with an exported bitmap: {r}")
both("block-export-del", id="bk")
both("block-dirty-bitmap-remove", node="disk", name="b0")
ok("an exported bitmap is busy: no remove, clear, enable or merge until the export goes")

# a raw node over a file, and the request boundaries of BLOCK_STATUS
harness.make_file(os.path.join(ds, "r.raw"), 5 * MiB + 4096)
S.cmd("blockdev-add", driver="raw", node_name="raw",
      file={"driver": "file", "filename": f"{ds}/r.raw"})
S.cmd("block-dirty-bitmap-add", node="raw", name="r", granularity=4096)
S.cmd("block-export-add", type="nbd", id="rw", node_name="raw", name="rw",
      writable=True, bitmaps=["r"])
h = jobsutil.nbd.NBD()
h.add_meta_context("qemu:dirty-bitmap:r")
h.connect_uri(uri_s("rw"))
h.pwrite(b"x" * 4096, 8192)
h.zero(3 * 4096, 5 * MiB - 8192)
seen = []
h.block_status(5 * MiB + 4096, 0,
               lambda ctx, off, ents, err: seen.append((ctx, list(ents))))
check(seen == [("qemu:dirty-bitmap:r",
                [8192, 0, 4096, 1, 5 * MiB - 8192 - 12288, 0, 12288, 1])],
      f"block status of a writable export's recording bitmap: {seen}")
seen = []
h.block_status(4096, 4096 * 2, lambda ctx, off, ents, err: seen.append(list(ents)))
check(seen == [[4096, 1]], f"a request inside a dirty chunk: {seen}")
h.shutdown()
ok("a raw node: a recording bitmap on a writable export follows the writes live")
