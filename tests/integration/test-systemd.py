#!/usr/bin/python3
"""systemd integration: socket activation and the notify protocol, driven
by systemd's own tools (no systemd as PID 1 is needed).

- systemd-socket-activate holds three sockets (NBD over TCP, NBD over
  unix, the control socket; --fdname=nbd:nbd:control) and starts stratad
  at the first connection; qemu-img reads the qcow2 chain through the
  adopted TCP socket (the same bytes as qemu-img convert of the file),
  nbdinfo through the unix one, QMP works on the adopted control socket;
- a test-owned NOTIFY_SOCKET receives READY=1 (with STATUS=) once
  serving and STOPPING=1 on SIGTERM; the adopted socket files are left
  in place (they are the service manager's);
- a socket with an unknown name is refused with a hint;
- the shipped units pass systemd-analyze verify.

Run:  STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-systemd.py
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import check, ok  # noqa: E402

harness.require_built()
harness.report_unexpected_exceptions()
harness.need("systemd-socket-activate", "qemu-img", "qemu-io", "nbdinfo")

MiB = 1 << 20
d = harness.tmpdir()
S = harness.STRATAD

base = os.path.join(d, "base.qcow2")
top = os.path.join(d, "top.qcow2")
subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "8M"], check=True)
subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5c 1M 2M", base],
               check=True, capture_output=True)
subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2",
                top], check=True)
subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x77 2M 64k", top],
               check=True, capture_output=True)

notify_path = os.path.join(d, "notify.sock")
notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
notify.bind(notify_path)


def recv_notify(want, timeout=30):
    """Datagrams until one has the line `want`; returns all their lines."""
    lines = []
    deadline = time.time() + timeout
    while want not in lines:
        left = deadline - time.time()
        check(left > 0, f"no {want} from stratad within {timeout}s (got {lines})")
        notify.settimeout(left)
        try:
            lines += notify.recv(4096).decode().splitlines()
        except socket.timeout:
            pass
    return lines


def activate(names, sockets, args, log):
    """systemd-socket-activate listening on sockets (named names), then
    exec'ing stratad with args at the first connection."""
    argv = ["systemd-socket-activate"]
    for s in sockets:
        argv += ["-l", s]
    argv += [f"--fdname={':'.join(names)}", "-E", f"NOTIFY_SOCKET={notify_path}"]
    for v in ("ASAN_OPTIONS", "UBSAN_OPTIONS", "LSAN_OPTIONS"):
        if v in os.environ:
            argv += ["-E", v]
    proc = subprocess.Popen(argv + [S, *args], stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=harness._die_with_parent)
    # it says "Listening on ADDR as FD." for each once bound
    deadline = time.time() + 20
    while True:
        check(proc.poll() is None, f"systemd-socket-activate exited with {proc.returncode}")
        log.flush()
        with open(log.name) as f:
            if f.read().count("Listening on ") == len(sockets):
                break
        check(time.time() < deadline, "systemd-socket-activate did not listen")
        time.sleep(0.05)
    return proc


def comm(pid):
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


# ---- 1. activation of NBD (TCP, unix) and control sockets ----
port = harness.free_port()
nbd_sock = os.path.join(d, "nbd.sock")
ctl_sock = os.path.join(d, "ctl.sock")
logf = open(os.path.join(d, "stratad.log"), "w+")
proc = activate(["nbd", "nbd", "control"],
                [f"127.0.0.1:{port}", nbd_sock, ctl_sock],
                ["--export", f"name=disk,file={top},format=qcow2"], logf)
time.sleep(0.2)  # nothing connects: it must still be the activator
check(comm(proc.pid).startswith("systemd-socket"),
      f"something other than the activator runs before any connection: {comm(proc.pid)}")
out = os.path.join(d, "out.raw")
p = subprocess.run(["qemu-img", "convert", "-O", "raw",
                    f"nbd://127.0.0.1:{port}/disk", out],
                   capture_output=True, text=True, timeout=60)
check(p.returncode == 0, f"qemu-img through the activated socket: {p.stderr}")
ref = os.path.join(d, "ref.raw")
subprocess.run(["qemu-img", "convert", "-O", "raw", top, ref], check=True)
got, want = open(out, "rb").read(), open(ref, "rb").read()
check(len(got) == 8 * MiB and harness.first_diff(got, want) is None,
      f"qemu-img's copy through stratad differs at {harness.first_diff(got, want)}")
check(comm(proc.pid) == "stratad", f"pid {proc.pid} is {comm(proc.pid)}")
ok("first connection on the TCP socket started stratad; qemu-img convert of the "
   "chain through it = qemu-img convert of the file")

lines = recv_notify("READY=1")
check(any(ln.startswith("STATUS=serving 1 export on 2 sockets") for ln in lines), lines)
ok(f"READY=1 on the test's NOTIFY_SOCKET, with {[ln for ln in lines if ln.startswith('STATUS=')]}")

p = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///disk?socket={nbd_sock}"],
                   capture_output=True, text=True, timeout=30)
check(p.stdout.strip() == str(8 * MiB), p.stdout + p.stderr)
q = harness.QMP(ctl_sock)
check(q.cmd("query-version")["package"].startswith("strata"), "query-version")
exps = q.cmd("query-block-exports")
check([e["name"] for e in exps] == ["disk"], exps)
q.close()
logf.flush()
log = open(logf.name).read()
for want in (f"listening on 127.0.0.1:{port}", f"listening on unix:{nbd_sock}",
             "control socket on the activated socket"):
    check(want in log, f"log lacks {want!r}:\n{log}")
ok("nbdinfo on the adopted unix socket, QMP on the adopted control socket")

proc.send_signal(signal.SIGTERM)
lines = recv_notify("STOPPING=1")
check(proc.wait(30) == 0, f"stratad exited with {proc.returncode}:\n{open(logf.name).read()}")
check(os.path.exists(nbd_sock) and os.path.exists(ctl_sock),
      "stratad removed socket files that belong to the service manager")
ok("SIGTERM: STOPPING=1, exit 0, the activated socket files left alone")
for ln in open(logf.name).read().splitlines():
    check("ERROR: AddressSanitizer" not in ln and "runtime error:" not in ln, ln)

# ---- 2. a socket with a name stratad does not know ----
port2 = harness.free_port()
logf2 = open(os.path.join(d, "stratad2.log"), "w+")
proc = activate(["bogus"], [f"127.0.0.1:{port2}"],
                ["--export", f"file={top},format=qcow2"], logf2)
c = socket.create_connection(("127.0.0.1", port2), timeout=10)
rc = proc.wait(30)
c.close()
log = open(logf2.name, errors="replace").read()
check(rc == 1 and "named 'bogus'" in log and "FileDescriptorName=nbd" in log,
      f"exit {rc}:\n{log}")
ok("a socket named 'bogus' is refused: exit 1 with a FileDescriptorName hint")

# ---- 3. the shipped units ----
unit_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                        "contrib", "systemd")
if shutil.which("systemd-analyze") and os.path.exists(os.path.join(unit_dir, "stratad.service.in")):
    ud = os.path.join(d, "units")
    os.mkdir(ud)
    with open(os.path.join(unit_dir, "stratad.service.in")) as f:
        text = f.read().replace("@sbindir@/stratad", os.path.abspath(S))
    with open(os.path.join(ud, "stratad.service"), "w") as f:
        f.write(text)
    for u in ("stratad.socket", "stratad-control.socket"):
        shutil.copy(os.path.join(unit_dir, u), ud)
    p = subprocess.run(["systemd-analyze", "verify", "--man=no", "stratad.service",
                        "stratad.socket", "stratad-control.socket"], cwd=ud,
                       capture_output=True, text=True, timeout=60)
    complaints = [ln for ln in (p.stdout + p.stderr).splitlines() if "stratad" in ln]
    check(p.returncode == 0 and not complaints,
          f"systemd-analyze verify: {p.returncode}\n{p.stdout}{p.stderr}")
    ok("systemd-analyze verify accepts stratad.service, stratad.socket, "
       "stratad-control.socket (no unknown or bad keys)")

# ---- 4. NOTIFY_SOCKET in the abstract namespace ("@name") ----
abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
aname = f"strata-test-notify-{os.getpid()}"
abstract.bind("\0" + aname)
abstract.settimeout(30)
p = subprocess.run([S, "--run", "true", "--export", f"file={top},format=qcow2"],
                   env=dict(os.environ, NOTIFY_SOCKET="@" + aname),
                   capture_output=True, text=True, timeout=60,
                   preexec_fn=harness._die_with_parent)
check(p.returncode == 0, p.stderr)
got = [abstract.recv(4096).decode().splitlines()[0] for _ in range(2)]
check(got == ["READY=1", "STOPPING=1"], got)
ok("NOTIFY_SOCKET=@name (abstract): READY=1, then STOPPING=1 when --run's command ends")
