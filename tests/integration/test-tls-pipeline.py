#!/usr/bin/python3
"""Many small requests pipelined over TLS, and TLS 1.3 KeyUpdates in the
middle of them, on both of stratad's record paths: its own records (the
default: application data sealed and opened with the session's keys,
common/tls-record.c) and GnuTLS's record layer (STRATA_TLS_RECORDS=gnutls).

- libnbd (python3-libnbd, TLS required, a client certificate) keeps 64
  requests in flight: reads and writes of 1 byte to 12 KiB at random
  offsets, so one server record carries many replies and a reply spans
  records; every read is checked against a model, and the export is read
  back whole at the end.
- A GnuTLS client of the test's own (ctypes on libgnutls, the NBD
  messages from nbdwire.py) sends KeyUpdates between pipelined requests:
  ones that ask for the server's key to change too (GNUTLS_KU_PEER) and
  ones that do not.  Every reply must still open (the server's sequence
  numbers and keys stay right across the update), the client's receive
  key must have changed after each KU_PEER (the server sent its own
  KeyUpdate), and with its own records the daemon logs each one.

Run:  STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-tls-pipeline.py
"""
import ctypes
import ctypes.util
import os
import random
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import check, need, ok, skip  # noqa: E402
import nbdwire as w  # noqa: E402
from nbdwire import Conn  # noqa: E402
import tlscerts  # noqa: E402

need("certtool")
try:
    import nbd
except ImportError:
    skip("python3-libnbd is not installed")
harness.require_built()
harness.report_unexpected_exceptions()

KiB, MiB = 1 << 10, 1 << 20
SIZE = 16 * MiB
SLOT = 16 * KiB                 # requests of a batch never share a slot
DEPTH = 64
certs = tlscerts.Certs()
rng = random.Random(int(os.environ.get("STRATA_SEED", "20261203")))

# ---- a GnuTLS client through ctypes -------------------------------------
_lib = ctypes.util.find_library("gnutls")
if not _lib:
    skip("libgnutls is not found")
G = ctypes.CDLL(_lib)
G.gnutls_strerror.restype = ctypes.c_char_p
G.gnutls_record_send.restype = ctypes.c_ssize_t
G.gnutls_record_send.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
G.gnutls_record_recv.restype = ctypes.c_ssize_t
G.gnutls_record_recv.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
for fn in ("gnutls_handshake", "gnutls_session_key_update",
           "gnutls_protocol_get_version", "gnutls_set_default_priority",
           "gnutls_error_is_fatal", "gnutls_bye"):
    getattr(G, fn).restype = ctypes.c_int
G.gnutls_handshake.argtypes = [ctypes.c_void_p]
G.gnutls_session_key_update.argtypes = [ctypes.c_void_p, ctypes.c_uint]
G.gnutls_protocol_get_version.argtypes = [ctypes.c_void_p]
G.gnutls_set_default_priority.argtypes = [ctypes.c_void_p]
G.gnutls_bye.argtypes = [ctypes.c_void_p, ctypes.c_int]
G.gnutls_credentials_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
G.gnutls_transport_set_int2.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
G.gnutls_deinit.argtypes = [ctypes.c_void_p]
G.gnutls_certificate_set_x509_trust_file.argtypes = [
    ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
G.gnutls_certificate_set_x509_key_file.argtypes = [
    ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]


class Datum(ctypes.Structure):
    _fields_ = [("data", ctypes.POINTER(ctypes.c_ubyte)), ("size", ctypes.c_uint)]


G.gnutls_record_get_state.argtypes = [
    ctypes.c_void_p, ctypes.c_uint, ctypes.POINTER(Datum), ctypes.POINTER(Datum),
    ctypes.POINTER(Datum), ctypes.c_char_p]
GNUTLS_CLIENT, GNUTLS_CRD_CERTIFICATE, GNUTLS_X509_FMT_PEM = 2, 1, 1
GNUTLS_KU_PEER, GNUTLS_TLS1_3, GNUTLS_E_AGAIN, GNUTLS_E_INTERRUPTED = 1, 5, -28, -52
check(G.gnutls_global_init() == 0, "gnutls_global_init")


def gerr(r):
    return G.gnutls_strerror(r).decode()


class GnuTLSSock:
    """A client session over a connected socket (blocking), standing in
    for Conn.sock: sendall, recv, settimeout."""

    def __init__(self, sock, who="alice"):
        self.sock = sock
        self.cred = ctypes.c_void_p()
        check(G.gnutls_certificate_allocate_credentials(ctypes.byref(self.cred)) == 0,
              "credentials")
        d = certs.path(who)
        check(G.gnutls_certificate_set_x509_trust_file(
            self.cred, os.path.join(d, "ca-cert.pem").encode(), GNUTLS_X509_FMT_PEM) > 0,
            "trust file")
        check(G.gnutls_certificate_set_x509_key_file(
            self.cred, os.path.join(d, "client-cert.pem").encode(),
            os.path.join(d, "client-key.pem").encode(), GNUTLS_X509_FMT_PEM) == 0,
            "key file")
        self.sess = ctypes.c_void_p()
        check(G.gnutls_init(ctypes.byref(self.sess), GNUTLS_CLIENT) == 0, "gnutls_init")
        check(G.gnutls_set_default_priority(self.sess) == 0, "priority")
        check(G.gnutls_credentials_set(self.sess, GNUTLS_CRD_CERTIFICATE, self.cred) == 0,
              "credentials_set")
        G.gnutls_transport_set_int2(self.sess, sock.fileno(), sock.fileno())
        sock.settimeout(None)   # GnuTLS reads and writes the fd itself
        while True:
            r = G.gnutls_handshake(self.sess)
            if r == 0:
                break
            check(r in (GNUTLS_E_AGAIN, GNUTLS_E_INTERRUPTED) or
                  not G.gnutls_error_is_fatal(r), f"handshake: {gerr(r)}")
        check(G.gnutls_protocol_get_version(self.sess) == GNUTLS_TLS1_3,
              "TLS 1.3 was negotiated")
        self.buf = ctypes.create_string_buffer(1 << 20)

    def settimeout(self, t):
        pass

    def sendall(self, data):
        while data:
            r = G.gnutls_record_send(self.sess, data, len(data))
            if r in (GNUTLS_E_AGAIN, GNUTLS_E_INTERRUPTED):
                continue
            check(r > 0, f"record_send: {gerr(r)}")
            data = data[r:]

    def recv(self, n):
        while True:
            r = G.gnutls_record_recv(self.sess, self.buf, min(n, len(self.buf)))
            if r in (GNUTLS_E_AGAIN, GNUTLS_E_INTERRUPTED):
                continue
            check(r >= 0, f"record_recv: {gerr(r)}")
            return self.buf.raw[:r]

    def key_update(self, peer):
        r = G.gnutls_session_key_update(self.sess, GNUTLS_KU_PEER if peer else 0)
        check(r == 0, f"key_update: {gerr(r)}")

    def read_key(self):
        """The key the client opens the server's records with now."""
        key = Datum()
        check(G.gnutls_record_get_state(self.sess, 1, None, None,
                                        ctypes.byref(key), None) == 0,
              "record_get_state")
        return bytes(key.data[:key.size])

    def bye(self):
        G.gnutls_bye(self.sess, 1)      # GNUTLS_SHUT_WR
        G.gnutls_deinit(self.sess)


def make_daemon(path, mode):
    if mode == "gnutls":
        os.environ["STRATA_TLS_RECORDS"] = "gnutls"
    try:
        return harness.Daemon(
            [f"name=disk,file={path},format=raw,cache=writeback"], tcp=True,
            extra=["--tls=require", "--tls-certificates", certs.server,
                   "--tls-verify-peer", "-v"])
    finally:
        os.environ.pop("STRATA_TLS_RECORDS", None)


def libnbd_pipeline(srv, model, what):
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(certs.path("alice"))
    h.set_export_name("disk")
    h.connect_tcp("127.0.0.1", str(srv.port))
    slots = list(range(SIZE // SLOT))
    sizes = [1, 7, 16, 512, 4096, 4096, 4096, 4100, 8192, 12288]
    nops = reads = 0
    for batch in range(40):
        rng.shuffle(slots)
        pending = []
        for k in range(DEPTH):
            n = rng.choice(sizes)
            off = slots[k] * SLOT + rng.randrange(0, SLOT - n + 1)
            if rng.random() < 0.4:
                data = rng.randbytes(n)
                model[off:off + n] = data
                buf = nbd.Buffer.from_bytearray(bytearray(data))
                pending.append((h.aio_pwrite(buf, off), None, buf, off, n))
            else:
                buf = nbd.Buffer(n)
                pending.append((h.aio_pread(buf, off), bytes(model[off:off + n]),
                                buf, off, n))
            nops += 1
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for cookie, expect, buf, off, n in pending:
            check(h.aio_command_completed(cookie),
                  f"{what}: request {cookie} ({n} bytes at {off}) completed")
            if expect is not None:
                reads += 1
                got = bytes(buf.to_bytearray())
                check(got == expect,
                      f"{what}: {n} bytes read at {off} differ at "
                      f"{harness.first_diff(got, expect)}")
    for off in range(0, SIZE, MiB):
        check(h.pread(MiB, off) == bytes(model[off:off + MiB]),
              f"{what}: read back at {off}")
    h.shutdown()
    return nops, reads


def keyupdate_session(srv, model, what):
    c = Conn(("127.0.0.1", srv.port), timeout=30)
    c.start()
    check(c.option(w.OPT_STARTTLS) == [(w.REP_ACK, b"")], "STARTTLS")
    t = GnuTLSSock(c.sock)
    c.sock = t
    c.go("disk")
    check(c.export_size == SIZE, f"export size {c.export_size}")
    cookie = 1
    peer_updates = 0
    for rnd in range(6):   # GnuTLS takes at most 8 KeyUpdates a second
        key0 = t.read_key()
        peer = rnd % 3 != 2
        batch = []
        offs = rng.sample(range(SIZE // 4096), 32)   # no two share a block
        for k in range(32):
            off = offs[k] * 4096
            if k % 4 == 0:
                data = rng.randbytes(4096)
                model[off:off + 4096] = data
                batch.append((cookie, None, off))
                c.write(cookie, off, data)
            else:
                batch.append((cookie, bytes(model[off:off + 4096]), off))
                c.request(w.CMD_READ, cookie, off, 4096)
            cookie += 1
            if k == 10:
                # replies to the requests before it are sealed under the
                # old key, the ones after it under the new one
                t.key_update(peer)
        for ck, expect, off in batch:
            reps = c.reply_for(ck)
            check(all(not r.is_error for r in reps), f"{what}: cookie {ck}: {reps}")
            if expect is not None:
                data, err = c.read_data(reps, off, 4096)
                check(err == 0 and data == expect, f"{what}: read at {off}")
        if peer:
            peer_updates += 1
            check(t.read_key() != key0,
                  f"{what}: round {rnd}: the server's key did not change after "
                  "a KeyUpdate asking for it")
        else:
            check(t.read_key() == key0,
                  f"{what}: round {rnd}: the server changed its key unasked")
    for base in range(0, SIZE, MiB):
        data, err = c.read(cookie, base, MiB)
        cookie += 1
        check(err == 0 and data == bytes(model[base:base + MiB]),
              f"{what}: read back at {base} after the KeyUpdates")
    c.request(w.CMD_DISC, cookie)
    t.bye()
    c.sock = t.sock
    c.close()
    return peer_updates


for mode in ("own", "gnutls"):
    d = harness.tmpdir()
    path = os.path.join(d, "disk.img")
    initial = rng.randbytes(SIZE)
    with open(path, "wb") as f:
        f.write(initial)
    model = bytearray(initial)
    srv = make_daemon(path, mode)
    nops, reads = libnbd_pipeline(srv, model, f"{mode} records")
    ok(f"{mode} records: {nops} requests (1 byte to 12 KiB) pipelined "
       f"{DEPTH} deep through libnbd over TLS, {reads} reads checked, the "
       "export read back")
    n = keyupdate_session(srv, model, f"{mode} records")
    ok(f"{mode} records: 6 rounds of 32 pipelined requests with a KeyUpdate "
       f"in the middle ({n} asking for the server's): every reply opened, "
       "the server's key changed exactly when asked")
    check(srv.alive(), f"{mode}: stratad died:\n" + srv.logtext()[-3000:])
    check(srv.stop() == 0, f"{mode}: stratad exit status after SIGTERM")
    with open(path, "rb") as f:
        check(f.read() == bytes(model), f"{mode}: the file differs from the model")
    log = srv.logtext()
    sent = len(re.findall(r"TLS: KeyUpdate sent", log))
    check(sent == n, f"{mode} records: the daemon logged {sent} KeyUpdates "
          f"of its own, expected {n}:\n{log[-3000:]}")
    ok(f"{mode} records: the file holds every write; the daemon stopped cleanly")
print("PASS")
