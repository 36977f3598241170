#!/usr/bin/python3
"""The control socket: QMP protocol, every command, errors and bounds.

 1. Greeting, capabilities negotiation (CommandNotFound before it), id echo.
 2. Framing errors: not an object, missing/ill-typed members, malformed
    JSON (the connection goes on), an oversized message (error, then the
    connection is closed), an unknown command.
 3. Argument checking: missing, unexpected and ill-typed arguments are
    named in the error.
 4. query-version, query-commands, query-block-exports,
    query-named-block-nodes against what the daemon serves.
 5. blockdev-add / block-export-add at run time, served to a libnbd
    client; every refusal; block-export-del safe (refused with a client)
    and hard (client dropped, BLOCK_EXPORT_DELETED to every negotiated
    client, none to a client still negotiating); blockdev-del.
 6. Job commands without jobs; snapshot and commit refuse bad requests
    clearly (test-jobs-*.py run them for real).
 7. 64 clients at once work; the 65th is refused; a client that never
    reads its replies is dropped while NBD I/O and other control clients
    carry on; the daemon's memory stays bounded.
 8. The socket's mode (0600 default, --control-mode).
 9. quit: graceful stop, exit status 0.

Run:  STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-control.py
"""
import os
import socket
import stat
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import QMP, check, fail, ok  # noqa: E402

harness.require_built()
harness.report_unexpected_exceptions()
harness.nbd_handle()
import nbd  # noqa: E402

MiB = 1 << 20
d = harness.tmpdir()
img1 = harness.make_file(os.path.join(d, "one.img"), 16 * MiB, b"\x11")
img2 = harness.make_file(os.path.join(d, "two.img"), 8 * MiB, b"\x22")
ctl = os.path.join(d, "ctl.sock")
dmn = harness.Daemon([f"name=one,file={img1}"], extra=["--control", ctl])

# ---- 1. greeting, negotiation, id ----
q = QMP(ctl, negotiate=False)
g = q.greeting
check(set(g) == {"QMP"}, f"greeting {g}")
v = g["QMP"]["version"]
check(all(isinstance(v["qemu"][k], int) for k in ("major", "minor", "micro")), f"version {v}")
check(v["package"].startswith("strata"), f"package {v}")
check(g["QMP"]["capabilities"] == [], f"capabilities {g}")
ok("greeting has QEMU's shape")

r = q.execute("query-version", id="early")
check(r.get("error", {}).get("class") == "CommandNotFound" and r.get("id") == "early",
      f"a command before qmp_capabilities: {r}")
check("qmp_capabilities" in r["error"]["desc"], r)
r = q.execute("qmp_capabilities", {"enable": ["oob"]}, id=1)
check(r.get("error", {}).get("class") == "GenericError" and "oob" in r["error"]["desc"], r)
r = q.execute("qmp_capabilities", id={"nested": [1, 2]})
check(r == {"return": {}, "id": {"nested": [1, 2]}}, f"negotiation: {r}")
r = q.execute("qmp_capabilities", id=7)
check(r.get("error", {}).get("class") == "CommandNotFound" and r.get("id") == 7, r)
r = q.execute("query-version", id=42)
check(r["id"] == 42 and r["return"]["package"] == v["package"], r)
r = q.execute("query-version")
check("id" not in r, f"no id, none echoed: {r}")
ok("negotiation: CommandNotFound before and after; ids echoed as given")

# ---- 2. framing ----


def raw(data):
    q.send_raw(data)
    return q.recv()


r = raw(b"[1, 2]\n")
check(r["error"]["desc"] == "QMP input must be a JSON object", r)
r = raw(b'{"arguments": {}, "id": 3}\n')
check("lacks member 'execute'" in r["error"]["desc"] and r["id"] == 3, r)
r = raw(b'{"execute": 5}\n')
check("'execute' must be a string" in r["error"]["desc"], r)
r = raw(b'{"execute": "query-version", "arguments": [1]}\n')
check("'arguments' must be an object" in r["error"]["desc"], r)
r = raw(b'{"execute": "query-version", "bogus": 1}\n')
check("'bogus' is unexpected" in r["error"]["desc"], r)
r = raw(b'{"execute": "no-such-command"}\n')
check(r["error"] == {"class": "CommandNotFound",
                     "desc": "The command no-such-command has not been found"}, r)
r = raw(b'{"execute": "query-version",, }\n')
check(r["error"]["class"] == "GenericError" and "JSON parse error" in r["error"]["desc"], r)
r = raw(b'{"execute": "query-version", "id": "after"}\n')
check(r.get("id") == "after" and "return" in r, f"connection usable after a parse error: {r}")
# two messages in one write, and one message split over several writes
q.send_raw(b'{"execute": "query-version", "id": 1}{"execute": "query-version", "id": 2}\n')
check(q.recv()["id"] == 1 and q.recv()["id"] == 2, "two messages in one write")
for piece in (b'{"exec', b'ute": "query-', b'version", "id": ', b'"split"}'):
    q.send_raw(piece)
    time.sleep(0.01)
check(q.recv().get("id") == "split", "a message split over writes")
ok("framing errors answered; the stream goes on; split and joined messages work")

big = QMP(ctl)
big.send_raw(b'{"execute": "query-version", "id": "' + b"x" * (1 << 20) + b'"}')
r = big.recv()
check(r["error"]["class"] == "GenericError" and "exceeds" in r["error"]["desc"], r)
try:
    big.recv()
    fail("the connection stays open after an oversized message")
except (EOFError, ConnectionResetError):
    pass
big.close()
# a large message under the bound is fine
r = q.execute("query-version", id="y" * (512 * 1024))
check(r["id"] == "y" * (512 * 1024), "a 512 KiB message")
ok("a message over 1 MiB: error, then closed; 512 KiB is fine")

# ---- 3. arguments ----
cls, desc = q.error("block-export-add", type="nbd", id="x")
check(desc == "Parameter 'node-name' is missing", desc)
cls, desc = q.error("query-version", extra=1)
check(desc == "Parameter 'extra' is unexpected", desc)
cls, desc = q.error("block-export-add", type="nbd", id="x", node_name="one", writable="yes")
check(desc == "Invalid parameter type for 'writable', expected: boolean", desc)
cls, desc = q.error("block-job-set-speed", device="j", speed="fast")
check(desc == "Invalid parameter type for 'speed', expected: integer", desc)
cls, desc = q.error("blockdev-add", driver="raw", node_name="n",
                    file={"driver": "file"})
check(desc == "Parameter 'file.filename' is missing", desc)
cls, desc = q.error("blockdev-add", driver="raw", node_name="n",
                    file={"driver": "file", "filename": img2, "colour": "red"})
check(desc == "Parameter 'file.colour' is unexpected", desc)
ok("argument errors name the argument and the expected type")

# ---- 4. queries ----
names = {c["name"] for c in q.cmd("query-commands")}
for c in ("qmp_capabilities", "query-version", "query-commands", "query-block-exports",
          "query-named-block-nodes", "blockdev-add", "blockdev-del", "block-export-add",
          "block-export-del", "blockdev-snapshot-sync", "block-commit", "query-jobs",
          "query-block-jobs", "block-job-set-speed", "block-job-pause", "block-job-resume",
          "block-job-cancel", "block-job-complete", "job-dismiss", "quit"):
    check(c in names, f"query-commands lacks {c}")
exps = q.cmd("query-block-exports")
check(len(exps) == 1, exps)
e = exps[0]
check(e["id"] == "one" and e["type"] == "nbd" and e["node-name"] == "one" and
      e["shutting-down"] is False and e["name"] == "one" and e["writable"] is True and
      e["virtual-size"] == 16 * MiB and e["file"] == img1 and e["format"] == "raw", e)
nodes = q.cmd("query-named-block-nodes")
check(len(nodes) == 1, nodes)
n = nodes[0]
check(n["node-name"] == "one" and n["file"] == img1 and n["drv"] == "raw" and
      n["ro"] is False and n["backing_file_depth"] == 0 and
      n["image"]["virtual-size"] == 16 * MiB and n["image"]["format"] == "raw" and
      "backing_file" not in n, n)
check(q.cmd("query-named-block-nodes", flat=True)[0]["node-name"] == "one", "flat")
ok("query-commands, query-block-exports, query-named-block-nodes")

# ---- 5. exports at run time ----
q2 = QMP(ctl)           # another negotiated client: must see events too
q3 = QMP(ctl, negotiate=False)  # not negotiated: must not
q.cmd("blockdev-add", driver="raw", node_name="two-node",
      file={"driver": "file", "filename": img2})
cls, desc = q.error("blockdev-add", driver="raw", node_name="two-node",
                    file={"driver": "file", "filename": img2})
check("Duplicate nodes with node-name='two-node'" in desc, desc)
cls, desc = q.error("blockdev-add", driver="raw", node_name="bad name",
                    file={"driver": "file", "filename": img2})
check("Invalid node-name" in desc, desc)
cls, desc = q.error("blockdev-add", driver="vmdk", node_name="v",
                    file={"driver": "file", "filename": img2})
check("'driver' does not accept value 'vmdk'" in desc, desc)
cls, desc = q.error("blockdev-add", driver="raw", node_name="m",
                    file={"driver": "file", "filename": os.path.join(d, "missing.img")})
check("missing.img" in desc, f"a missing file is named: {desc}")
cls, desc = q.error("blockdev-add", driver="raw", node_name="m", file="two-node")
check("references to other nodes are not supported" in desc, desc)
cls, desc = q.error("block-export-add", type="vhost-user-blk", id="t", node_name="two-node")
check("'type' does not accept value" in desc, desc)
cls, desc = q.error("block-export-add", type="nbd", id="t", node_name="nope")
check("nor node-name=nope" in desc, desc)
cls, desc = q.error("block-export-add", type="nbd", id="one", node_name="two-node")
check("Block export id 'one' is already in use" in desc, desc)
cls, desc = q.error("block-export-add", type="nbd", id="t", node_name="two-node", name="one")
check("already has export named 'one'" in desc, desc)
cls, desc = q.error("block-export-add", type="nbd", id="t", node_name="one")
check("already exported" in desc, desc)
q.cmd("blockdev-add", driver="raw", node_name="ro-node", read_only=True,
      file={"driver": "file", "filename": img2})
cls, desc = q.error("block-export-add", type="nbd", id="t", node_name="ro-node", writable=True)
check(desc == "Cannot export read-only node as writable", desc)
q.cmd("blockdev-del", node_name="ro-node")

q.cmd("block-export-add", type="nbd", id="two", node_name="two-node", name="second",
      description="the second disk", writable=True)
h = nbd.NBD()
h.set_export_name("second")
h.connect_uri(f"nbd+unix:///second?socket={dmn.sock}")
check(h.get_size() == 8 * MiB, "size of the new export")
check(h.pread(4096, 0) == b"\x22" * 4096, "data of the new export")
h.pwrite(b"\x99" * 4096, 65536)
h.flush()
with open(img2, "rb") as f:
    f.seek(65536)
    check(f.read(4096) == b"\x99" * 4096, "a write through the new export reached the file")
e2 = [x for x in q.cmd("query-block-exports") if x["id"] == "two"][0]
check(e2["clients"] == 1 and e2["description"] == "the second disk", e2)
ok("blockdev-add + block-export-add: served to libnbd; refusals are clear")

cls, desc = q.error("block-export-del", id="two")
check("still in use" in desc and "mode=hard" in desc, desc)
cls, desc = q.error("block-export-del", id="two", mode="gentle")
check("'mode' does not accept value 'gentle'" in desc, desc)
cls, desc = q.error("block-export-del", id="zzz")
check("Export 'zzz' is not found" in desc, desc)
check(h.pread(512, 0) == b"\x22" * 512, "the client still works after a refused delete")
q.cmd("block-export-del", id="two", mode="hard")
ev = q.wait_event("BLOCK_EXPORT_DELETED")
check(ev["data"] == {"id": "two"} and set(ev["timestamp"]) == {"seconds", "microseconds"}
      and abs(ev["timestamp"]["seconds"] - time.time()) < 60, ev)
q2.cmd("query-version")  # collects the event that arrived meanwhile
q2.wait_event("BLOCK_EXPORT_DELETED")
try:
    h.pread(512, 0)
    fail("the client of a hard-deleted export can still read")
except nbd.Error:
    pass
del h
q3.sock.settimeout(0.5)
try:
    m = q3.recv()
    fail(f"a client still negotiating received {m}")
except socket.timeout:
    pass
q3.close()
check(all(x["id"] != "two" for x in q.cmd("query-block-exports")), "export gone")
q.cmd("blockdev-del", node_name="two-node")
cls, desc = q.error("blockdev-del", node_name="two-node")
check("Failed to find node" in desc, desc)
cls, desc = q.error("blockdev-del", node_name="one")
check("in use by export 'one'" in desc, desc)
# a backing layer, listed by query-named-block-nodes, is not the monitor's
ovl = os.path.join(d, "ovl.qcow2")
subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", img2, ovl],
               check=True)
q.cmd("blockdev-add", driver="qcow2", node_name="ovl",
      file={"driver": "file", "filename": ovl})
names = [n["node-name"] for n in q.cmd("query-named-block-nodes")]
check("ovl.backing" in names, f"query-named-block-nodes: no ovl.backing in {names}")
cls, desc = q.error("blockdev-del", node_name="ovl.backing")
check(cls == "GenericError" and "not owned by the monitor" in desc and "'ovl'" in desc,
      f"blockdev-del of a backing layer: {cls}: {desc}")
check("ovl.backing" in [n["node-name"] for n in q.cmd("query-named-block-nodes")],
      "the refused blockdev-del of ovl.backing removed it")
q.cmd("blockdev-del", node_name="ovl")
check(not any(n["node-name"].startswith("ovl") for n in q.cmd("query-named-block-nodes")),
      "blockdev-del ovl left its layers listed")
ok("block-export-del: safe refuses with clients, hard drops them; "
   "BLOCK_EXPORT_DELETED to negotiated clients only; blockdev-del (a backing layer: not owned by the monitor)")

# ---- 6. jobs and the chain jobs ----
check(q.cmd("query-jobs") == [] and q.cmd("query-block-jobs") == [], "no jobs")
for c in ("block-job-pause", "block-job-resume", "block-job-cancel", "block-job-complete"):
    cls, desc = q.error(c, device="nojob")
    check(cls == "DeviceNotActive" and desc == "Block job 'nojob' not found", (c, cls, desc))
cls, desc = q.error("block-job-set-speed", device="nojob", speed=1)
check(cls == "DeviceNotActive", cls)
for c in ("job-pause", "job-resume", "job-cancel", "job-complete", "job-dismiss", "job-finalize"):
    cls, desc = q.error(c, id="nojob")
    check(cls == "GenericError" and desc == "Job not found", (c, cls, desc))
cls, desc = q.error("block-commit", device="one")
check(cls == "GenericError" and "cannot commit an image into itself" in desc, desc)
cls, desc = q.error("block-commit", device="one", on_error="explode")
check("'on-error' does not accept value 'explode'" in desc, desc)
cls, desc = q.error("block-commit", device="nodev")
check(cls == "DeviceNotFound", cls)
cls, desc = q.error("blockdev-snapshot-sync", device="one",
                    snapshot_file=os.path.join(d, "nodir", "s.qcow2"))
check("nodir" in desc and "No such file or directory" in desc, desc)
cls, desc = q.error("blockdev-snapshot-sync", device="one", snapshot_file=img1)
check("already exists" in desc, desc)
cls, desc = q.error("blockdev-snapshot-sync", device="one",
                    snapshot_file=os.path.join(d, "s.qcow2"), mode="existing")
check("'existing' is not supported" in desc, desc)
check(not os.path.exists(os.path.join(d, "s.qcow2")), "a refused snapshot created no file")
cls, desc = q.error("blockdev-snapshot-sync", snapshot_file="x")
check("'device' or 'node-name'" in desc, desc)
ok("job commands without jobs; snapshot and commit refuse bad requests clearly")

# ---- 7. many clients, and a client that never reads ----
clients = [QMP(ctl) for _ in range(62)]   # + q and q2 = 64
try:
    extra = QMP(ctl, negotiate=False)
    fail(f"a 65th client was served: {extra.greeting}")
except (EOFError, ConnectionResetError):
    pass
errs = []


def hammer(c):
    try:
        for _ in range(20):
            if c.cmd("query-block-exports")[0]["id"] != "one":
                errs.append("wrong answer")
    except Exception as ex:  # noqa: BLE001
        errs.append(repr(ex))


ts = [threading.Thread(target=hammer, args=(c,)) for c in clients]
for t in ts:
    t.start()
for t in ts:
    t.join(60)
check(not errs, f"errors with 64 clients: {errs[:3]}")
for c in clients:
    c.close()
time.sleep(0.3)
c = QMP(ctl)  # room again
c.close()
ok("64 control clients at once; the 65th refused; room again after they left")


rss_kib = harness.rss_kib


rss0 = rss_kib(dmn.proc.pid)
deaf = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
deaf.connect(ctl)
deaf.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
deaf.sendall(b'{"execute": "qmp_capabilities"}\n')
msg = b'{"execute": "query-named-block-nodes"}\n' * 64
h = nbd.NBD()
h.connect_uri(dmn.uri("one"))
dropped = False
deaf.settimeout(5)
t0 = time.time()
sent = 0
while time.time() - t0 < 60:
    try:
        deaf.sendall(msg)
        sent += len(msg)
    except (BrokenPipeError, ConnectionResetError, socket.timeout):
        dropped = True
        break
    if sent % (len(msg) * 50) == 0:
        # NBD and other control clients keep working meanwhile
        h.pwrite(b"\x5a" * 4096, 0)
        check(h.pread(4096, 0) == b"\x5a" * 4096, "NBD I/O while a control client floods")
        check(q.cmd("query-version")["package"].startswith("strata"), "q still answered")
check(dropped, "a control client that never reads was not dropped within 60 s")
rss1 = rss_kib(dmn.proc.pid)
# (under AddressSanitizer freed memory sits in its quarantine, so RSS says
# nothing there; the drop itself is checked above and below)
with open(harness.STRATAD, "rb") as f:
    asan = b"__asan_init" in f.read()
check(asan or rss1 - rss0 < 64 * 1024, f"daemon RSS grew from {rss0} to {rss1} KiB")
deaf.close()
check("more than" in dmn.logtext() and "unread: dropping it" in dmn.logtext(), "drop logged")
h.pwrite(b"\x5b" * 4096, 0)
check(h.pread(4096, 0) == b"\x5b" * 4096, "NBD I/O after the drop")
del h
ok(f"a client that never reads is dropped (after {sent >> 10} KiB of commands); "
   f"RSS {rss0} -> {rss1} KiB; NBD and other clients unaffected")

# ---- 8. socket mode ----
check(stat.S_IMODE(os.stat(ctl).st_mode) == 0o600, oct(os.stat(ctl).st_mode))
ctl2 = os.path.join(d, "ctl2.sock")
d2 = harness.Daemon([], extra=["--control", ctl2, "--control-mode", "0660"])
check(stat.S_IMODE(os.stat(ctl2).st_mode) == 0o660, oct(os.stat(ctl2).st_mode))
qq = QMP(ctl2)
check(qq.cmd("query-block-exports") == [], "a daemon started without exports")
qq.close()
check(d2.stop() == 0, "stop")
ok("control socket mode 0600 by default, --control-mode 0660; no --export needed")

# ---- 9. quit ----
q2.close()
r = q.execute("quit", id="bye")
check(r == {"return": {}, "id": "bye"}, r)
try:
    dmn.proc.wait(15)
except Exception:  # noqa: BLE001
    fail("stratad did not exit after quit")
check(dmn.proc.returncode == 0, f"exit status after quit: {dmn.proc.returncode}")
check(not os.path.exists(ctl), "control socket removed at exit")
ok("quit: exit 0, socket removed")
print("PASS")
