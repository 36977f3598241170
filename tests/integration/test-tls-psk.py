#!/usr/bin/python3
"""TLS with pre-shared keys (psktool's username:hexkey file): qemu-img and
qemu-io with tls-creds-psk, nbdinfo and nbdcopy with tls-psk-file= and
the URI's username, libnbd; a wrong key and a username outside --tls-allow are
refused while a connected client goes on being served; an export with
allow= is invisible to other usernames.

Run:  STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-tls-psk.py
"""
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import check, need, ok  # noqa: E402
import tlscerts  # noqa: E402

need("qemu-img", "qemu-io", "nbdinfo", "nbdcopy", "psktool")
try:
    import nbd
except ImportError:
    harness.skip("python3-libnbd is not installed")

harness.require_built()
harness.report_unexpected_exceptions()
MiB = 1 << 20
d = harness.tmpdir()
keys = tlscerts.psk_file(os.path.join(d, "keys.psk"), "alice", "bob", "carol")
key = tlscerts.psk_keys(keys)
# QEMU's tls-creds-psk reads DIR/keys.psk
qdir = os.path.join(d, "qemu")
os.mkdir(qdir)
with open(os.path.join(qdir, "keys.psk"), "w") as f:
    f.write(f"alice:{key['alice']}\n")
wrong = os.path.join(d, "wrong.psk")
with open(wrong, "w") as f:
    f.write("alice:" + "00" * 32 + "\n")
disk = harness.make_file(os.path.join(d, "disk.img"), 8 * MiB)
private = harness.make_file(os.path.join(d, "private.img"), MiB, b"B")
srv = harness.Daemon([f"name=disk,file={disk}",
                      f"name=private,file={private},allow=bob"],
                     tcp=True,
                     extra=["--tls=require", "--tls-psk", keys,
                            "--tls-allow", "alice;bob", "-v"])


def uri(name, user, psk=keys, tcp=False):
    # libnbd takes the PSK username from the URI's user part
    q = f"tls-psk-file={psk}"
    if tcp:
        return f"nbds://{user}@127.0.0.1:{srv.port}/{name}?{q}"
    return f"nbds+unix://{user}@/{name}?socket={srv.sock}&{q}"


def run(args, timeout=60):
    # errors="replace": a client may print bytes that are not UTF-8 (seen
    # once in nbdinfo's uri line); the checks look for ASCII words
    return subprocess.run(args, capture_output=True, text=True, errors="replace",
                          timeout=timeout)


def libnbd(user, name="disk", psk=keys):
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_psk_file(psk)
    h.set_tls_username(user)
    h.set_export_name(name)
    h.connect_unix(srv.sock)
    return h


steady = libnbd("alice")
steady.pwrite(b"s" * 4096, 7 * MiB)
ok("libnbd with set_tls_psk_file/set_tls_username: connected, wrote")


def still_serving(what):
    check(srv.alive(), f"stratad died after {what}")
    check(steady.pread(4096, 7 * MiB) == b"s" * 4096,
          f"the steady client after {what}")


psk = f"tls-creds-psk,id=tls0,dir={qdir},username=alice,endpoint=client"
src = os.path.join(d, "src.img")
with open(src, "wb") as f:
    f.write(os.urandom(4 * MiB))
r = run(["qemu-img", "convert", "-n", "-f", "raw", src, "--object", psk,
         "--target-image-opts",
         f"driver=nbd,host=127.0.0.1,port={srv.port},export=disk,tls-creds=tls0"])
check(r.returncode == 0, f"qemu-img convert with tls-creds-psk: {r.stderr}")
ok("qemu-img convert --object tls-creds-psk (TCP): 4 MiB written")
r = run(["qemu-io", "--object", psk, "--image-opts",
         f"driver=nbd,path={srv.sock},export=disk,tls-creds=tls0",
         "-c", "write -P 0x33 4M 1M", "-c", "read -P 0x33 4M 1M"])
check(r.returncode == 0 and "Pattern verification failed" not in r.stdout,
      f"qemu-io with tls-creds-psk: {r.stdout}{r.stderr}")
ok("qemu-io --object tls-creds-psk (unix): write + pattern read")
out = os.path.join(d, "out.img")
r = run(["nbdcopy", uri("disk", "alice", tcp=True), out])
check(r.returncode == 0, f"nbdcopy nbds:// with PSK: {r.stderr}")
with open(out, "rb") as f, open(src, "rb") as g:
    got = f.read()
    check(got[:4 * MiB] == g.read() and got[4 * MiB:5 * MiB] == b"\x33" * MiB,
          "nbdcopy read back other bytes than were written")
ok("nbdcopy nbds://alice@...?tls-psk-file=: read back what was written")

r = run(["nbdinfo", "--list", "--json", uri("", "alice")])
check(r.returncode == 0 and '"disk"' in r.stdout and "private" not in r.stdout,
      f"nbdinfo --list as alice: {r.stdout}{r.stderr}")
r = run(["nbdinfo", "--list", "--json", uri("", "bob")])
check(r.returncode == 0 and '"private"' in r.stdout,
      f"nbdinfo --list as bob: {r.stdout}{r.stderr}")
r = run(["nbdinfo", "--size", uri("private", "alice")])
check(r.returncode != 0, "alice opened 'private'")
h = libnbd("bob", "private")
check(h.pread(4096, 0) == b"B" * 4096, "bob reading 'private'")
h.shutdown()
ok("allow=bob: listed for and opened by bob only")

r = run(["nbdinfo", "--size", uri("disk", "alice", psk=wrong)])
check(r.returncode != 0, "a wrong PSK key was accepted")
ok("refused: a wrong key for alice")
still_serving("the wrong key")
r = run(["nbdinfo", "--size", uri("disk", "carol")])
check(r.returncode != 0, "carol (outside --tls-allow) was served")
check("'carol' is not in --tls-allow" in srv.logtext(), "no refusal logged")
ok("refused: carol, outside --tls-allow")
still_serving("carol")
r = run(["nbdinfo", "--size", uri("disk", "mallory")])
check(r.returncode != 0, "an unknown username was served")
ok("refused: a username the key file does not have")
still_serving("mallory")

steady.shutdown()
check(srv.stop() == 0, "stratad exit status after SIGTERM")
print("PASS")
