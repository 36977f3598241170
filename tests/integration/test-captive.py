#!/usr/bin/python3
"""nbdkit's conventions: captive mode (--run), --print-uri and
--exit-with-parent.

- `stratad --run 'qemu-img convert -O raw "$uri" out.raw' --export
  file=top.qcow2,format=qcow2` copies the guest view of a qcow2 chain:
  the same bytes as qemu-img convert of the file itself; the private
  socket directory is gone afterwards;
- the variables ($uri, $nbd, $unixsocket, $port, $exportname) for a unix
  and a TCP listener and an export name that needs percent-encoding, and
  nbdinfo reads through that $uri;
- stratad exits with the command's status (7; 128+9 when killed);
- --print-uri prints a URI nbdinfo can use;
- --exit-with-parent: stratad stops when its parent is killed;
- --fork with --run is refused.

Run:  STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-captive.py
"""
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import check, ok  # noqa: E402

harness.require_built()
harness.report_unexpected_exceptions()
harness.need("qemu-img", "qemu-io", "nbdinfo")

MiB = 1 << 20
d = harness.tmpdir()
S = harness.STRATAD


def run(args, timeout=120, **kw):
    return subprocess.run([S, *args], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=harness._die_with_parent, **kw)


# a chain: base.qcow2 <- top.qcow2, data in both
base = os.path.join(d, "base.qcow2")
top = os.path.join(d, "top.qcow2")
subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "16M"], check=True)
subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 3M",
                "-c", "write -P 0xcd 9M 512k", base], check=True, capture_output=True)
subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2",
                "-F", "qcow2", top], check=True, cwd=d)
subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 2M 2M",
                "-c", "write -z 9M 64k", top], check=True, capture_output=True)

# ---- 1. the example of the documentation ----
p = run(["--run", 'qemu-img convert -O raw "$uri" out.raw',
         "--export", "file=top.qcow2,format=qcow2"], cwd=d)
check(p.returncode == 0, f"exit {p.returncode}: {p.stderr}")
subprocess.run(["qemu-img", "convert", "-O", "raw", top, os.path.join(d, "ref.raw")],
               check=True)
with open(os.path.join(d, "out.raw"), "rb") as a, open(os.path.join(d, "ref.raw"), "rb") as b:
    got, want = a.read(), b.read()
check(len(got) == 16 * MiB, f"out.raw is {len(got)} bytes")
check(harness.first_diff(got, want) is None,
      f"out.raw differs from qemu-img's at byte {harness.first_diff(got, want)}")
ok("--run 'qemu-img convert -O raw \"$uri\" out.raw': the same 16 MiB as qemu-img "
   "convert of top.qcow2")

# ---- 2. the variables, unix socket ----
envf = os.path.join(d, "env.txt")
dump = (f'printf "%s\\n" "uri=$uri" "nbd=$nbd" "unixsocket=$unixsocket" '
        f'"port=${{port-unset}}" "exportname=$exportname" > {envf}; '
        f'{{ [ -z "$unixsocket" ] || [ -S "$unixsocket" ]; }} && '
        f'nbdinfo --size "$uri" >> {envf}')
p = run(["--run", dump, "--export", f"name=my disk/1,file={top},format=qcow2"])
check(p.returncode == 0, f"exit {p.returncode}: {p.stderr}")
env = dict(ln.split("=", 1) for ln in open(envf).read().splitlines() if "=" in ln)
sizes = [ln for ln in open(envf).read().splitlines() if "=" not in ln]
sock = env["unixsocket"]
check(sock.startswith("/") and sock.endswith("/nbd.sock"), env)
check(env["uri"] == f"nbd+unix:///my%20disk%2F1?socket={sock}", env)
check(env["nbd"] == env["uri"] and env["exportname"] == "my disk/1" and
      env["port"] == "unset", env)
check(sizes == [str(16 * MiB)], f"nbdinfo --size through $uri: {sizes}")
check(not os.path.exists(os.path.dirname(sock)),
      f"the private directory {os.path.dirname(sock)} is left behind")
ok("variables with a unix socket: $uri percent-encoded, $nbd = $uri, $unixsocket, "
   "$exportname, no $port; nbdinfo reads through $uri; private directory removed")

# ---- 3. the variables, TCP ----
port = harness.free_port()
p = run(["--listen", f"127.0.0.1:{port}", "--run", dump,
         "--export", f"name=tcpdisk,file={top},format=qcow2"])
check(p.returncode == 0, f"exit {p.returncode}: {p.stderr}")
env = dict(ln.split("=", 1) for ln in open(envf).read().splitlines() if "=" in ln)
sizes = [ln for ln in open(envf).read().splitlines() if "=" not in ln]
check(env["uri"] == f"nbd://127.0.0.1:{port}/tcpdisk" and env["port"] == str(port)
      and env["unixsocket"] == "", env)
check(sizes == [str(16 * MiB)], f"nbdinfo --size through $uri: {sizes}")
ok(f"variables with --listen 127.0.0.1:{port}: $uri nbd://, $port, no $unixsocket")

# ---- 4. exit status ----
p = run(["--run", "exit 7", "--export", f"file={top},format=qcow2"])
check(p.returncode == 7, f"exit {p.returncode}, wanted 7: {p.stderr}")
p = run(["--run", "kill -9 $$", "--export", f"file={top},format=qcow2"])
check(p.returncode == 128 + 9, f"exit {p.returncode}, wanted 137: {p.stderr}")
p = run(["--fork", "--run", "true", "--export", f"file={top},format=qcow2"])
check(p.returncode == 2 and "--fork" in p.stderr, p.stderr)
ok("exit status of the command: 7, 137 when killed; --fork with --run refused")

# ---- 5. --print-uri ----
pidf = os.path.join(d, "p.pid")
sockp = os.path.join(d, "pu.sock")
proc = subprocess.Popen([S, "--print-uri", "--pid-file", pidf, "--listen", f"unix:{sockp}",
                         "--export", f"name=pu,file={top},format=qcow2"],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        preexec_fn=harness._die_with_parent)
line = proc.stdout.readline().strip()
check(line == f"nbd+unix:///pu?socket={sockp}", f"--print-uri printed {line!r}")
p = subprocess.run(["nbdinfo", "--size", line], capture_output=True, text=True, timeout=30)
check(p.stdout.strip() == str(16 * MiB), p.stdout + p.stderr)
proc.send_signal(signal.SIGTERM)
check(proc.wait(30) == 0, proc.stderr.read())
ok(f"--print-uri: {line}, nbdinfo reads its size")

# ---- 6. --exit-with-parent ----
sockw = os.path.join(d, "w.sock")
pidw = os.path.join(d, "w.pid")
# the parent: a shell that starts stratad, then becomes `sleep`
parent = subprocess.Popen(
    ["sh", "-c", '"$0" --exit-with-parent --pid-file "$1" --listen "unix:$2" '
     '--export "file=$3,format=qcow2" & exec sleep 600', S, pidw, sockw, top],
    stderr=subprocess.DEVNULL, preexec_fn=harness._die_with_parent)
deadline = time.time() + 20
while not os.path.exists(pidw):
    check(time.time() < deadline, "stratad under a parent did not start")
    time.sleep(0.05)
spid = int(open(pidw).read())
with open(f"/proc/{spid}/stat") as f:
    check(int(f.read().rsplit(")", 1)[1].split()[1]) == parent.pid,
          "stratad's parent is not the shell")
parent.kill()
parent.wait()


def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


deadline = time.time() + 30
while not gone(spid):
    check(time.time() < deadline, "stratad still runs after its parent was killed")
    time.sleep(0.05)
check(not os.path.exists(sockw), "the socket was not removed (no graceful stop)")
ok("--exit-with-parent: parent killed, stratad stopped gracefully (socket removed)")
