#!/usr/bin/env python3
"""The nbd: backend over TLS (nbds://, libnbd's TLS) and its connect
timeout, against real TLS servers: nbdkit --tls=require (X.509 with
--tls-verify-peer, and PSK) and qemu-nbd --tls-creds.  Certificates and
keys are made by the test (tlscerts.py: certtool, psktool).

1. The golden image over TLS: a local qcow2 overlay whose header names
   nbd://127.0.0.1:PORT (QEMU's form) over a base nbdkit serves with
   --tls=require --tls-verify-peer: with backing-remote=nbd:127.0.0.1:PORT;
   tls-certificates=DIR it reads the base's bytes (nbdkit refuses
   plaintext and clients without a certificate of its CA, so this is TLS
   with a verified client), takes writes, and qemu-img check passes.
2. A writable raw layer nbds://...?tls-psk-file=&tls-username= on nbdkit
   with --tls-psk: seeded writes, zeroes and trims read back equal through
   stratad and straight from nbdkit; the server killed and restarted:
   EIO while it is gone, the TLS connection made again afterwards.
3. qemu-nbd with tls-creds-x509 (verify-peer=on) as the server, added
   over QMP (file.filename=nbds://...): the bytes equal the base.
4. Refused, each with a message, while the daemon keeps serving a local
   export: another CA's client (cannot verify the server), no client
   certificate, a wrong PSK key, plaintext to a TLS-only server, a server
   that accepts and never answers (connect-timeout=1 ends the wait), and
   the header rules: a backing name with nbds:// for a server the
   operator gave no TLS option for, and one that carries tls- options.

Run: STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-nbd-backend-tls.py
"""
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from harness import QMP, QMPError, check, fail, ok  # noqa: E402
from nbdserver import Server  # noqa: E402

harness.require_built()
harness.report_unexpected_exceptions()
harness.need("nbdkit", "qemu-nbd", "qemu-img", "certtool", "psktool")
harness.nbd_handle()
import nbd  # noqa: E402
import tlscerts  # noqa: E402

MiB = 1 << 20
SIZE = 16 * MiB
D = harness.tmpdir()
certs = tlscerts.Certs()


def run(*args, timeout=60):
    p = subprocess.run(args, capture_output=True, timeout=timeout)
    if p.returncode != 0:
        fail(f"{' '.join(args)}: {p.stderr.decode(errors='replace')}")
    return p.stdout.decode()




def nbdkit_tls(port, *args):
    s = Server(["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1",
                "-p", str(port), "--tls=require", *args], port=port)
    s.start()
    return s


rnd = random.Random(11)
base = os.path.join(D, "base.raw")
base_bytes = bytearray(rnd.randbytes(SIZE))
base_bytes[4 * MiB:6 * MiB] = bytes(2 * MiB)
with open(base, "wb") as f:
    f.write(base_bytes)

alice = certs.path("alice")           # ca-cert.pem client-cert.pem client-key.pem
psk = tlscerts.psk_file(os.path.join(D, "keys.psk"), "alice")
p_x509, p_psk, p_qemu, p_silent = (harness.free_port() for _ in range(4))
kx = nbdkit_tls(p_x509, "--tls-certificates", certs.server,
                "--tls-verify-peer", "-r", "file", base)
psk_disk = os.path.join(D, "psk.raw")
harness.make_file(psk_disk, SIZE)
kp_argv = ["--tls-psk", psk, "file", psk_disk]
kp = nbdkit_tls(p_psk, *kp_argv)
qn = Server(["qemu-nbd", "-t", "-r", "-f", "raw", "-b", "127.0.0.1", "-p",
             str(p_qemu), "-x", "base", "--object",
             f"tls-creds-x509,id=tls0,dir={certs.server},endpoint=server,"
             "verify-peer=on", "--tls-creds", "tls0", base], port=p_qemu)
qn.start()

# a server that accepts and then says nothing
silent = socket.socket()
silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
silent.bind(("127.0.0.1", p_silent))
silent.listen(16)
held = []


def hold():
    while True:
        try:
            c, _ = silent.accept()
        except OSError:
            return
        held.append(c)


threading.Thread(target=hold, daemon=True).start()

# 1. the golden image over TLS, named in QEMU's form in the header
top = os.path.join(D, "top.qcow2")
run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b",
    f"nbd://127.0.0.1:{p_x509}", "-F", "raw", top, str(SIZE))
local = os.path.join(D, "local.raw")
harness.make_file(local, MiB, pattern=b"L")
ctl = os.path.join(D, "ctl.sock")
psk_spec = (f"nbds://127.0.0.1:{p_psk}/?tls-psk-file={psk}&"
            "tls-username=alice&reconnect-delay=0")
dm = harness.Daemon([
    f"name=top,file={top},format=qcow2,"
    f"backing-remote=nbd:127.0.0.1:{p_x509};tls-certificates={alice}",
    f"name=psk,file={psk_spec},format=raw",
    f"name=local,file={local},format=raw"], extra=["--control", ctl])
q = QMP(ctl)


def connect(name):
    h = nbd.NBD()
    h.connect_uri(dm.uri(name))
    return h


def local_still_served(after):
    h = connect("local")
    check(h.pread(4096, 0) == b"L" * 4096,
          f"the local export reads wrong after {after}")
    h.shutdown()


h = connect("top")
got = b"".join(h.pread(MiB, o) for o in range(0, SIZE, MiB))
check(got == bytes(base_bytes), "the overlay over the TLS base reads "
      "other bytes than the base")
model = bytearray(base_bytes)
for i in range(40):
    off = rnd.randrange(0, SIZE // 4096) * 4096
    data = rnd.randbytes(4096 * rnd.randint(1, 16))
    data = data[:SIZE - off]
    h.pwrite(data, off)
    model[off:off + len(data)] = data
h.flush()
got = b"".join(h.pread(MiB, o) for o in range(0, SIZE, MiB))
check(got == bytes(model), "writes over the TLS base read back wrong")
h.shutdown()
chk = subprocess.run(
    ["qemu-img", "check", json.dumps(
        {"driver": "qcow2", "backing": None,
         "file": {"driver": "file", "filename": top}}).join(["json:", ""])],
    capture_output=True, timeout=60)
check(chk.returncode == 0, f"qemu-img check of the overlay: "
      f"{chk.stdout.decode()}{chk.stderr.decode()}")
ok("a local overlay reads and writes over an X.509 TLS base (client "
   "certificate verified by nbdkit), qemu-img check clean")

# 2. a writable raw layer over PSK TLS, and a server that goes away
h = connect("psk")
pm = bytearray(SIZE)
for i in range(60):
    op = rnd.random()
    off = rnd.randrange(0, SIZE // 4096) * 4096
    ln = min(4096 * rnd.randint(1, 64), SIZE - off)
    if op < 0.6:
        data = rnd.randbytes(ln)
        h.pwrite(data, off, flags=nbd.CMD_FLAG_FUA if i % 5 == 0 else 0)
        pm[off:off + ln] = data
    elif op < 0.8:
        h.zero(ln, off)
        pm[off:off + ln] = bytes(ln)
    else:
        h.trim(ln, off)
        pm[off:off + ln] = bytes(ln)     # nbdkit's file plugin punches holes
h.flush()
got = b"".join(h.pread(MiB, o) for o in range(0, SIZE, MiB))
check(got == bytes(pm), "the PSK layer reads back other bytes than written")
direct = nbd.NBD()
direct.set_tls(nbd.TLS_REQUIRE)
direct.set_tls_psk_file(psk)
direct.set_tls_username("alice")
direct.connect_tcp("127.0.0.1", str(p_psk))
got = b"".join(direct.pread(MiB, o) for o in range(0, SIZE, MiB))
direct.shutdown()
check(got == bytes(pm), "nbdkit holds other bytes than stratad wrote")
kp.kill()
try:
    h.pread(4096, 0)
    fail("a read succeeded while the PSK server was gone")
except nbd.Error as e:
    check(e.errno in (5, None) or "Input/output" in str(e),
          f"a read while the server is gone: {e}")
local_still_served("the PSK server went away")
kp.start()
deadline = time.time() + 30
while True:
    try:
        got = h.pread(MiB, 0)
        break
    except nbd.Error:
        check(time.time() < deadline, "no reconnection over TLS in 30 s")
        time.sleep(0.2)
check(got == bytes(pm[:MiB]), "after the reconnection the layer reads "
      "other bytes")
h.shutdown()
ok("a raw layer over PSK TLS: writes, zeroes, trims equal nbdkit's copy; "
   "EIO while the server is gone, TLS reconnection after its restart")

# 3. qemu-nbd as the TLS server, added over QMP
q.cmd("blockdev-add", driver="raw", node_name="qn", read_only=True,
      file={"driver": "file", "filename":
            f"nbds://127.0.0.1:{p_qemu}/base?tls-certificates={alice}"})
q.cmd("block-export-add", type="nbd", id="qn", node_name="qn")
h = connect("qn")
got = b"".join(h.pread(MiB, o) for o in range(0, SIZE, MiB))
h.shutdown()
check(got == bytes(base_bytes), "qemu-nbd's TLS export reads other bytes")
ok("qemu-nbd with tls-creds-x509 verify-peer=on as the base's server")

# 4. refusals
bad_psk = os.path.join(D, "bad.psk")
with open(bad_psk, "w") as f:
    f.write("alice:" + "00" * 32 + "\n")


def refused(what, filename, *words, backing_remote=None):
    args = dict(driver="raw", node_name="bad", read_only=True,
                file={"driver": "file", "filename": filename})
    if backing_remote:
        args.update(driver="qcow2", backing_remote=backing_remote)
    t0 = time.time()
    try:
        q.cmd("blockdev-add", **args)
    except QMPError as e:
        print(f"  {what}: {e.desc}")
        low = e.desc.lower()
        for w in words:
            check(w.lower() in low, f"{what}: the error '{e.desc}' does not "
                  f"say '{w}'")
        local_still_served(what)
        return time.time() - t0
    fail(f"{what}: blockdev-add succeeded")


refused("another CA", f"nbds://127.0.0.1:{p_x509}/?tls-certificates="
        f"{certs.path('stranger')}", "certificate verification")
refused("no client certificate", f"nbds://127.0.0.1:{p_x509}/?"
        f"tls-certificates={certs.path('nocert')}", "127.0.0.1")
refused("a wrong PSK key", f"nbds://127.0.0.1:{p_psk}/?tls-psk-file="
        f"{bad_psk}&tls-username=alice", "127.0.0.1")
refused("plaintext to a TLS-only server", f"nbd://127.0.0.1:{p_x509}/",
        "TLS")
refused("a server that never answers", f"nbd://127.0.0.1:{p_silent}/?"
        "connect-timeout=1", "connect-timeout")
check(held, "the silent server saw no connection")
# header rules
hdr1 = os.path.join(D, "hdr-nbds.qcow2")
run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b",
    f"nbds://127.0.0.1:{p_x509}/", "-F", "raw", hdr1, str(SIZE))
refused("nbds:// in a header without the operator's TLS", hdr1,
        "asks for TLS", backing_remote=f"nbd:127.0.0.1:{p_x509}")
hdr2 = os.path.join(D, "hdr-opts.qcow2")
run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b",
    f"nbds://127.0.0.1:{p_x509}/?tls-certificates=/etc/ssl", "-F", "raw",
    hdr2, str(SIZE))
refused("tls- options in a header", hdr2, "sets options",
        backing_remote=f"nbd:127.0.0.1:{p_x509};tls-certificates={alice}")
ok("refused with a message, the local export served after each: another "
   "CA, no client certificate, a wrong PSK key, plaintext to a TLS-only "
   "server, a silent server (connect-timeout), nbds:// or tls- options "
   "in a header")

check(dm.stop() == 0, "stratad did not exit 0 on SIGTERM")
silent.close()
ok("nbd backend over TLS")
