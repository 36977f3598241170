#!/usr/bin/python3
"""TLS with X.509 certificates: real clients over nbds:// and
nbds+unix://, client certificates, allow lists, and every way a client can
be refused -- each refusal followed by proof that the daemon still serves
a client that was connected all along, and new ones.

One stratad: --tls=require --tls-verify-peer, --tls-allow for alice and
bob, exports "disk" (everyone allowed) and "private" (allow=CN=b*: bob).
Certificates come from certtool (tlscerts.py).

Run:  STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-tls.py
"""
import os
import socket
import ssl
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import check, need, ok  # noqa: E402
import nbdwire as w  # noqa: E402
from nbdwire import Conn  # noqa: E402
import tlscerts  # noqa: E402

need("qemu-img", "qemu-io", "nbdinfo", "nbdcopy", "certtool")
try:
    import nbd
except ImportError:
    harness.skip("python3-libnbd is not installed")

harness.require_built()
harness.report_unexpected_exceptions()
MiB = 1 << 20
certs = tlscerts.Certs()
d = harness.tmpdir()
disk = harness.make_file(os.path.join(d, "disk.img"), 16 * MiB)
private = harness.make_file(os.path.join(d, "private.img"), 4 * MiB, b"P")

allow = f"{certs.dn('alice')};{certs.dn('bob')}"
srv = harness.Daemon(
    [f"name=disk,file={disk}",
     f"name=private,file={private},allow=CN=b*,,O=Example,,C=GB"],
    tcp=True,
    extra=["--tls=require", "--tls-certificates", certs.server,
           "--tls-verify-peer", "--tls-allow", allow,
           "--handshake-timeout", "3", "-v"])


def tls_uri(name, who, tcp=False):
    if tcp:
        return (f"nbds://127.0.0.1:{srv.port}/{name}"
                f"?tls-certificates={certs.path(who)}")
    return (f"nbds+unix:///{name}?socket={srv.sock}"
            f"&tls-certificates={certs.path(who)}")


def libnbd(who, name="disk", tcp=False):
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(certs.path(who))
    h.set_export_name(name)
    if tcp:
        h.connect_tcp("127.0.0.1", str(srv.port))
    else:
        h.connect_unix(srv.sock)
    return h


def run(args, timeout=60):
    # errors="replace": a client may print bytes that are not UTF-8 (seen
    # once in nbdinfo's uri line); the checks look for ASCII words
    return subprocess.run(args, capture_output=True, text=True, errors="replace",
                          timeout=timeout)


# A client connected through all the refusals below.
steady = libnbd("alice")
steady.pwrite(b"S" * 4096, 15 * MiB)
ok("libnbd set_tls(TLS_REQUIRE) with alice's certificate: connected, wrote")


def still_serving(what):
    check(srv.alive(), f"stratad died after {what}:\n" + srv.logtext()[-3000:])
    check(steady.pread(4096, 15 * MiB) == b"S" * 4096,
          f"the steady client's read after {what}")
    r = run(["nbdinfo", "--size", tls_uri("disk", "bob")])
    check(r.returncode == 0 and r.stdout.strip() == str(16 * MiB),
          f"a new client after {what}: {r.stdout}{r.stderr}")


# ---- real clients -----------------------------------------------------------
r = run(["nbdinfo", tls_uri("disk", "alice", tcp=True)])
check(r.returncode == 0 and "with TLS" in r.stdout,
      f"nbdinfo nbds:// (TCP): {r.stdout}{r.stderr}")
ok("nbdinfo nbds://127.0.0.1 with tls-certificates=: served with TLS")

r = run(["nbdinfo", "--list", "--json", tls_uri("", "alice")])
check(r.returncode == 0 and '"disk"' in r.stdout and "private" not in r.stdout,
      f"nbdinfo --list as alice: {r.stdout}{r.stderr}")
ok("nbdinfo --list nbds+unix:// as alice: 'disk' listed, 'private' not")
r = run(["nbdinfo", "--list", "--json", tls_uri("", "bob")])
check(r.returncode == 0 and '"disk"' in r.stdout and '"private"' in r.stdout,
      f"nbdinfo --list as bob: {r.stdout}{r.stderr}")
ok("nbdinfo --list as bob: both exports listed (allow=CN=b* glob)")

src = os.path.join(d, "src.img")
with open(src, "wb") as f:
    f.write(os.urandom(8 * MiB))
x509 = f"tls-creds-x509,id=tls0,dir={certs.path('alice')},endpoint=client"
r = run(["qemu-img", "convert", "-n", "-f", "raw", src, "--object", x509,
         "--target-image-opts",
         f"driver=nbd,host=127.0.0.1,port={srv.port},export=disk,tls-creds=tls0"])
check(r.returncode == 0, f"qemu-img convert to nbd over TLS: {r.stderr}")
ok("qemu-img convert --object tls-creds-x509 (TCP): 8 MiB written")
r = run(["qemu-io", "--object", x509, "--image-opts",
         f"driver=nbd,path={srv.sock},export=disk,tls-creds=tls0,"
         "tls-hostname=localhost",
         "-c", "write -P 0x5a 8M 1M", "-c", "read -P 0x5a 8M 1M"])
check(r.returncode == 0 and "Pattern verification failed" not in r.stdout,
      f"qemu-io over TLS (unix): {r.stdout}{r.stderr}")
ok("qemu-io --object tls-creds-x509 over unix: write + pattern read")
out = os.path.join(d, "out.img")
r = run(["nbdcopy", tls_uri("disk", "bob"), out])
check(r.returncode == 0, f"nbdcopy nbds+unix: {r.stderr}")
with open(out, "rb") as f, open(src, "rb") as g:
    got = f.read()
    check(got[:8 * MiB] == g.read(), "nbdcopy: the first 8 MiB differ from "
          "what qemu-img wrote")
    check(got[8 * MiB:9 * MiB] == b"\x5a" * MiB, "nbdcopy: qemu-io's MiB")
ok("nbdcopy nbds+unix:// read back what qemu-img and qemu-io wrote")

h = libnbd("bob", "private", tcp=True)
check(h.pread(4096, 0) == b"P" * 4096, "bob reading 'private'")
h.shutdown()
ok("libnbd as bob opens 'private' (TCP)")
try:
    libnbd("alice", "private")
    check(False, "alice opened 'private'")
except nbd.Error as e:
    check("unknown" in str(e).lower() or "no export" in str(e).lower()
          or "not found" in str(e).lower(), f"alice on 'private': {e}")
ok("libnbd as alice: 'private' refused as an unknown export")
still_serving("the clients")

# ---- refused peers -----------------------------------------------------------
for who, why, logmark in (
        ("stranger", "a certificate from another CA (which trusts another CA)",
         None),
        # GnuTLS clients do not even offer a certificate whose issuer the
        # server did not name: the handshake fails on the server's side
        ("foreign", "a client certificate signed by another CA",
         "TLS handshake failed"),
        ("expired", "an expired client certificate", "chain uses expired"),
        ("revoked", "a client certificate revoked in ca-crl.pem",
         "chain is revoked"),
        ("nocert", "no client certificate under --tls-verify-peer", None),
        ("carol", "an identity outside --tls-allow", "not in --tls-allow")):
    r = run(["nbdinfo", "--size", tls_uri("disk", who)])
    check(r.returncode != 0, f"{why}: nbdinfo succeeded: {r.stdout}")
    if logmark:
        check(logmark in srv.logtext(), f"{why}: no '{logmark}' in the log")
    ok(f"refused: {why}")
    still_serving(why)
r = run(["qemu-img", "info", "--object",
         f"tls-creds-x509,id=tls0,dir={certs.path('carol')},endpoint=client",
         "--image-opts",
         f"driver=nbd,host=127.0.0.1,port={srv.port},export=disk,tls-creds=tls0"])
check(r.returncode != 0, "qemu-img as carol succeeded")
ok("refused: qemu-img as carol (outside --tls-allow)")


# ---- a plaintext client on a --tls=require server ----------------------------
c = Conn(srv.sock)
c.start()
for opt, data in ((w.OPT_LIST, b""), (w.OPT_INFO, Conn.info_payload("disk")),
                  (w.OPT_GO, Conn.info_payload("disk")),
                  (w.OPT_STRUCTURED_REPLY, b"")):
    reps = c.option(opt, data)
    check(len(reps) == 1 and reps[0][0] == w.REP_ERR_TLS_REQD,
          f"plaintext option {opt}: {reps}")
    check(b"disk" not in reps[0][1] and b"private" not in reps[0][1],
          f"plaintext option {opt} disclosed an export name: {reps[0][1]!r}")
c.send_option(w.OPT_EXPORT_NAME, b"disk")
closed, extra, _ = c.wait_closed(5)
check(closed and extra == b"", f"EXPORT_NAME without TLS: closed={closed}, "
      f"{len(extra)} bytes (size and flags must not be sent)")
c.close()
ok("plaintext on require: LIST, INFO, GO -> TLS_REQD with no export name; "
   "EXPORT_NAME -> closed, nothing disclosed")
still_serving("the plaintext client")


# ---- raw TLS clients ---------------------------------------------------------
def ssl_ctx(who):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(os.path.join(certs.path(who), "ca-cert.pem"))
    ctx.load_cert_chain(os.path.join(certs.path(who), "client-cert.pem"),
                        os.path.join(certs.path(who), "client-key.pem"))
    return ctx


def starttls_ack(c):
    reps = c.option(w.OPT_STARTTLS)
    check(reps == [(w.REP_ACK, b"")], f"STARTTLS: {reps}")


# Injection: a plaintext option pipelined behind STARTTLS in one write.
c = Conn(srv.sock)
c.start()
hdr = struct.pack(">QII", w.NBD_OPT_MAGIC, w.OPT_STARTTLS, 0)
injected = struct.pack(">QII", w.NBD_OPT_MAGIC, w.OPT_GO, 10) + \
    Conn.info_payload("disk")
c.send(hdr + injected)
opt, rtype, data = c.recv_option_reply()
check((opt, rtype) == (w.OPT_STARTTLS, w.REP_ACK), f"STARTTLS reply {rtype}")
check(c.pending(0.5) == b"", "bytes after the STARTTLS ACK in plaintext "
      "(the injected GO was answered)")
c.sock = ssl_ctx("alice").wrap_socket(c.sock, server_hostname="localhost")
reps = c.option(w.OPT_LIST)     # the first reply over TLS is LIST's own
names = [r[1][4:].decode() for r in reps if r[0] == w.REP_SERVER]
check(reps[-1][0] == w.REP_ACK and "disk" in names, f"LIST over TLS: {reps}")
c.go("disk")                    # GO works: the injected GO did nothing
check(c.export_size == 16 * MiB, f"GO over TLS: size {c.export_size}")
check(c.read(1, 15 * MiB, 4096) == (b"S" * 4096, 0), "a read over raw TLS")
c.close()
check("discarded" in srv.logtext(), "no 'discarded' in the log")
ok(f"injection: a GO pipelined behind STARTTLS ({len(injected)} bytes) was "
   "discarded, never answered; TLS then served LIST and GO normally")
still_serving("the injection")

# Garbage in the middle of the handshake.
c = Conn(srv.sock)
c.start()
starttls_ack(c)
inc, outg = ssl.MemoryBIO(), ssl.MemoryBIO()
obj = ssl_ctx("alice").wrap_bio(inc, outg, server_hostname="localhost")
try:
    obj.do_handshake()
except ssl.SSLWantReadError:
    pass
c.send(outg.read())             # a real ClientHello
first = c.recv_exact(5)         # the server's flight begins
check(first[0] == 0x16, f"server flight starts with {first!r}")
c.send(b"\x16\x03\x03\x00\x40" + os.urandom(64) + os.urandom(4096))
closed, _, _ = c.wait_closed(10)
check(closed, "garbage in the handshake: the connection stayed open")
c.close()
ok("garbage in the middle of the TLS handshake: connection closed")
still_serving("handshake garbage")

# A handshake that never finishes: the handshake timeout (3 s) holds.
c = Conn(srv.sock)
c.start()
starttls_ack(c)
c.send(b"\x16\x03\x01\x02\x00\x01")   # the start of a ClientHello, then silence
closed, _, secs = c.wait_closed(20)
check(closed, "a stalled TLS handshake was not dropped within 20 s")
c.close()
check("no export chosen" in srv.logtext(), "no handshake timeout in the log")
ok("a TLS handshake that never finishes is dropped by --handshake-timeout")
still_serving("the stalled handshake")

steady.shutdown()
check(srv.stop() == 0, "stratad exit status after SIGTERM")
ok("stratad stopped cleanly")
print("PASS")
