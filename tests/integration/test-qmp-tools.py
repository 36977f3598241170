#!/usr/bin/python3
"""stratad's control socket against real QMP software.

 1. A third-party QMP client: Debian's golang-github-digitalocean-go-qemu-dev
    (package qmp) — built here into a small program (qmp-go/main.go) that
    connects (greeting, qmp_capabilities), queries, adds and deletes an
    export, sees an unknown command refused and receives the
    BLOCK_EXPORT_DELETED event.  (Debian 12 packages no Python QMP client
    and no qmp-shell; PyPI is out of reach.)  Skipped when Go or the
    package is missing.
 2. The same QMP conversation with qemu-storage-daemon 7.2 and with
    stratad: greeting shape, negotiation errors, argument errors, unknown
    commands, job commands without jobs, blockdev-add + block-export-add,
    query-block-exports, block-export-del + BLOCK_EXPORT_DELETED,
    blockdev-del.  Error classes (and messages where both are QEMU's
    wording) must match.  Then the same NBD writes go to both exports on
    copies of one image, and the two files must end byte-identical.

Run:  STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-qmp-tools.py
"""
import os
import random
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import QMP, QMPError, check, check_soft, ok  # noqa: E402

harness.require_built()
harness.report_unexpected_exceptions()
harness.nbd_handle()
import nbd  # noqa: E402

MiB = 1 << 20
d = harness.tmpdir()
ran = 0

# ---- 1. the Go QMP library ----
GOSRC = "/usr/share/gocode/src/github.com/digitalocean/go-qemu/qmp"
if shutil.which("go") and os.path.isdir(GOSRC):
    gobin = os.path.join(d, "qmp-go")
    env = dict(os.environ, GO111MODULE="off", GOPATH="/usr/share/gocode",
               GOCACHE=os.path.join(d, "gocache"), GOFLAGS="")
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qmp-go", "main.go")
    p = subprocess.run(["go", "build", "-o", gobin, src], env=env, capture_output=True,
                       text=True, timeout=300)
    check(p.returncode == 0, f"building the Go QMP client failed:\n{p.stderr}")
    img = harness.make_file(os.path.join(d, "go.img"), 4 * MiB)
    ctl = os.path.join(d, "go-ctl.sock")
    dmn = harness.Daemon([], extra=["--control", ctl])
    p = subprocess.run([gobin, ctl, img], capture_output=True, text=True, timeout=60)
    print(p.stdout, end="")
    check(p.returncode == 0 and "PASS" in p.stdout,
          f"the go-qemu QMP client failed (exit {p.returncode}):\n{p.stdout}{p.stderr}")
    check(dmn.stop() == 0, "stop")
    ok("go-qemu's QMP client drives stratad: connect, commands, errors, events")
    ran += 1
else:
    print("note: go or golang-github-digitalocean-go-qemu-dev missing: Go client part skipped")

# ---- 2. the same conversation with qemu-storage-daemon ----
QSD = shutil.which("qemu-storage-daemon")
if not QSD:
    if ran == 0:
        harness.skip("neither the Go QMP library nor qemu-storage-daemon is installed")
    print("PASS (qemu-storage-daemon missing: comparison skipped)")
    sys.exit(0)

base = harness.make_file(os.path.join(d, "base.img"), 16 * MiB)
with open(base, "r+b") as f:
    rng = random.Random(7)
    for _ in range(64):
        f.seek(rng.randrange(16 * MiB // 4096) * 4096)
        f.write(bytes([rng.randrange(256)]) * 4096)
img_s = os.path.join(d, "strata.img")
img_q = os.path.join(d, "qsd.img")
shutil.copyfile(base, img_s)
shutil.copyfile(base, img_q)

s_ctl = os.path.join(d, "s-ctl.sock")
s_dmn = harness.Daemon([], extra=["--control", s_ctl])
q_ctl = os.path.join(d, "q-ctl.sock")
q_nbd = os.path.join(d, "q-nbd.sock")
q_proc = harness.start_qsd(q_ctl, q_nbd, program=QSD)

S = QMP(s_ctl, negotiate=False)
Q = QMP(q_ctl, negotiate=False)


def both(fn):
    return fn(S, "stratad"), fn(Q, "qsd")


def greet(c, who):
    g = c.greeting["QMP"]
    return sorted(g), sorted(g["version"]), sorted(g["version"]["qemu"]), type(g["capabilities"])


a, b = both(greet)
check(a == b, f"greeting shapes differ: stratad {a}, qsd {b}")


def err_of(c, name, args=None):
    r = c.execute(name, args, id="x")
    check("error" in r and r.get("id") == "x", f"{name} {args} did not fail: {r}")
    return r["error"]["class"], r["error"]["desc"]


def same_error(name, args=None, same_desc=True):
    a = err_of(S, name, args)
    b = err_of(Q, name, args)
    check_soft(a[0] == b[0], f"{name} {args}: class stratad {a[0]!r} vs qsd {b[0]!r}")
    if same_desc:
        check_soft(a[1] == b[1], f"{name} {args}: desc stratad {a[1]!r} vs qsd {b[1]!r}")
    return a, b


same_error("query-version")                         # before negotiation
check(S.execute("qmp_capabilities") == Q.execute("qmp_capabilities") == {"return": {}},
      "qmp_capabilities")
same_error("qmp_capabilities")                      # after negotiation
same_error("no-such-command")
same_error("block-export-del", {})
same_error("query-version", {"bogus": 1})
same_error("blockdev-del", {"node-name": 5})
same_error("block-export-del", {"id": "zzz"})
same_error("block-job-pause", {"device": "nojob"})
same_error("job-dismiss", {"id": "nojob"})
same_error("blockdev-del", {"node-name": "nonode"})
ok("greeting, negotiation, argument and lookup errors: same classes and messages as QSD")

for c, img in ((S, img_s), (Q, img_q)):
    c.cmd("blockdev-add", driver="raw", node_name="disk0",
          file={"driver": "file", "filename": img})
same_error("blockdev-add", {"driver": "raw", "node-name": "disk0",
                            "file": {"driver": "file", "filename": img_s}})
for c in (S, Q):
    c.cmd("block-export-add", type="nbd", id="exp0", node_name="disk0", name="disk",
          writable=True)
same_error("block-export-add", {"type": "nbd", "id": "exp0", "node-name": "disk0"},
           same_desc=False)
es = S.cmd("query-block-exports")
eq = Q.cmd("query-block-exports")
common = ("id", "type", "node-name", "shutting-down")
check([{k: e[k] for k in common} for e in es] == [{k: e[k] for k in common} for e in eq],
      f"query-block-exports: stratad {es} vs qsd {eq}")
ok("blockdev-add + block-export-add: same answers; query-block-exports agrees on QSD's fields")

# the same NBD writes to both
ops = []
rng = random.Random(11)
for _ in range(300):
    off = rng.randrange(16 * MiB // 512) * 512
    n = min(rng.choice((512, 4096, 65536)), 16 * MiB - off)
    # no trims: what a trimmed range reads is unspecified (and QSD's
    # file node ignores discards unless told discard=unmap)
    kind = rng.choice(("w", "w", "w", "z"))
    ops.append((kind, off, n, rng.randrange(256)))
for uri in (f"nbd+unix:///disk?socket={s_dmn.sock}", f"nbd+unix:///disk?socket={q_nbd}"):
    h = nbd.NBD()
    h.connect_uri(uri)
    for kind, off, n, byte in ops:
        if kind == "w":
            h.pwrite(bytes([byte]) * n, off)
        elif kind == "z":
            h.zero(n, off)
        else:
            h.trim(n, off)
    h.flush()
    h.shutdown()
for c in (S, Q):
    c.cmd("block-export-del", id="exp0")
    ev = c.wait_event("BLOCK_EXPORT_DELETED")
    check(ev["data"] == {"id": "exp0"}, ev)
    c.cmd("blockdev-del", node_name="disk0")
harness.finish_soft_checks()
with open(img_s, "rb") as f1, open(img_q, "rb") as f2:
    ds, dq = f1.read(), f2.read()
diff = harness.first_diff(ds, dq)
check(diff is None, f"the disks differ at byte {diff}")
check(ds != open(base, "rb").read(), "the writes did change the disks")
ok("300 NBD writes and write-zeroes through both; block-export-del, BLOCK_EXPORT_DELETED, "
   "blockdev-del on both; the two disks are byte-identical")
S.cmd("quit")
Q.execute("quit")
q_proc.wait(15)
s_dmn.proc.wait(15)
check(s_dmn.proc.returncode == 0, "stratad exit status after quit")
print("PASS")
