#!/usr/bin/python3
"""TLS and access-control options: what the command line refuses; --tls=on
(TLS offered, plaintext still served, allow-listed exports invisible
without an identity); block-export-add's "allow" (a strata extension) and
its survival in the state file across a restart; --control-group; the
kTLS path each connection logs; the cipher a client gets (its own first
choice by default; the one --tls-priority allows).

Run:  STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-tls-options.py
"""
import grp
import os
import stat
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import QMP, STRATAD, check, need, ok  # noqa: E402
import nbdwire as w  # noqa: E402
from nbdwire import Conn  # noqa: E402
import tlscerts  # noqa: E402

need("nbdinfo", "certtool")
harness.require_built()
harness.report_unexpected_exceptions()
MiB = 1 << 20
d = harness.tmpdir()
disk = harness.make_file(os.path.join(d, "disk.img"), MiB)
certs = tlscerts.Certs()

# ---- the command line -------------------------------------------------------
for args, what in (
        (["--tls=on"], "--tls=on without credentials"),
        (["--tls=maybe", "--tls-certificates", certs.server], "--tls=maybe"),
        (["--tls-certificates", certs.server], "--tls-certificates without --tls"),
        (["--tls=on", "--tls-certificates", certs.server, "--tls-psk", "x"],
         "both --tls-certificates and --tls-psk"),
        (["--tls=on", "--tls-psk", disk, "--tls-verify-peer"],
         "--tls-verify-peer with PSK"),
        (["--tls=on", "--tls-certificates", certs.server, "--tls-allow", "x"],
         "--tls-allow without --tls=require (plaintext has no identity)"),
        (["--tls=on", "--tls-certificates", certs.server, "--tls-ktls=maybe"],
         "--tls-ktls=maybe"),
        (["--control-group", "no-such-group-here", "--control", "/nonexistent/x"],
         "an unknown --control-group")):
    r = subprocess.run([STRATAD, "--export", f"file={disk}", *args],
                       capture_output=True, text=True, timeout=30)
    check(r.returncode == 2 and r.stderr, f"{what}: exit {r.returncode}, "
          f"stderr {r.stderr!r}")
ok("refused at start with exit 2: bad --tls combinations, unknown group")
r = subprocess.run([STRATAD, "--export", f"file={disk}", "--tls=on",
                    "--tls-certificates", d, "--listen", "127.0.0.1:1"],
                   capture_output=True, text=True, timeout=30)
check(r.returncode == 1 and "ca-cert.pem" in r.stderr,
      f"a directory without certificates: {r.returncode} {r.stderr!r}")
ok("a --tls-certificates directory without ca-cert.pem: exit 1, named")

# ---- --tls=on, block-export-add allow, state file ---------------------------
ctl = os.path.join(d, "ctl.sock")
state = os.path.join(d, "state.json")
extra = ["--tls=on", "--tls-certificates", certs.server, "--control", ctl,
         "--state-file", state, "--control-group", "users"]
srv = harness.Daemon([f"name=open,file={disk}"], extra=extra)
st = os.stat(ctl)
check(stat.S_IMODE(st.st_mode) == 0o660 and
      st.st_gid == grp.getgrnam("users").gr_gid,
      f"control socket mode {oct(st.st_mode)} gid {st.st_gid}")
ok("--control-group users: the control socket is 0660, group users")

q = QMP(ctl)
sec = harness.make_file(os.path.join(d, "sec.img"), MiB, b"x")
q.cmd("blockdev-add", driver="raw", node_name="secnode",
      file={"driver": "file", "filename": sec})
q.cmd("block-export-add", type="nbd", id="sec", node_name="secnode",
      name="secret", allow=[certs.dn("alice")])
cls, desc = q.error("block-export-add", type="nbd", id="bad", node_name="secnode",
                    name="x", allow="CN=alice")
check("allow" in desc, f"allow as a string: {desc}")
ok("block-export-add with allow=[DN]; a non-array allow refused")


def tls_uri(name, who):
    return (f"nbds+unix:///{name}?socket={srv.sock}"
            f"&tls-certificates={certs.path(who)}")


def plaintext_view():
    c = Conn(srv.sock)
    c.start()
    reps = c.option(w.OPT_LIST)
    names = [r[1][4:].decode() for r in reps if r[0] == w.REP_SERVER]
    info = c.option(w.OPT_INFO, Conn.info_payload("secret"))
    c.close()
    return names, info[-1][0]


def check_views(when):
    names, info = plaintext_view()
    check(names == ["open"] and info == w.REP_ERR_UNKNOWN,
          f"{when}: plaintext sees {names}, INFO secret -> {w.rep_name(info)}")
    r = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///open?socket={srv.sock}"],
                       capture_output=True, text=True, timeout=30)
    check(r.returncode == 0, f"{when}: plaintext client on --tls=on: {r.stderr}")
    r = subprocess.run(["nbdinfo", "--list", "--json", tls_uri("", "alice")],
                       capture_output=True, text=True, errors="replace", timeout=30)
    check(r.returncode == 0 and '"secret"' in r.stdout,
          f"{when}: alice over TLS: {r.stdout}{r.stderr}")
    r = subprocess.run(["nbdinfo", "--size", tls_uri("secret", "bob")],
                       capture_output=True, text=True, timeout=30)
    check(r.returncode != 0, f"{when}: bob opened 'secret'")


check_views("after block-export-add")
ok("--tls=on: plaintext served and blind to 'secret'; alice sees it over "
   "TLS, bob cannot open it")
q.close()
check(srv.stop() == 0, "stratad exit status")
srv = harness.Daemon([f"name=open,file={disk}"], extra=extra)
check_views("after a restart from the state file")
ok("the allow list survives a restart (state file)")
check(srv.stop() == 0, "stratad exit status")

# ---- --tls-ktls: the path each connection takes is logged ------------------
# This host may or may not have the kernel's tls module: with auto, each TLS
# connection names one path; with off, always GnuTLS (tests/vm/test-ktls.py
# runs both paths on a kernel that has the module).
for mode in ("auto", "off"):
    srv = harness.Daemon([f"name=open,file={disk}"],
                         extra=["--tls=require", "--tls-certificates",
                                certs.server, f"--tls-ktls={mode}", "-v"])
    for _ in range(2):
        r = subprocess.run(["nbdinfo", "--size", tls_uri("open", "alice")],
                           capture_output=True, text=True, timeout=30)
        check(r.returncode == 0 and r.stdout.strip() == str(MiB),
              f"--tls-ktls={mode}: nbdinfo: {r.stdout}{r.stderr}")
    check(srv.stop() == 0, "stratad exit status")
    log = srv.logtext()
    paths = [m for m in log.splitlines() if "TLS path " in m]
    final = [m for m in paths if "TLS path kTLS tx+rx" in m or
             "TLS path GnuTLS" in m or "(the kernel's TLS refused" in m]
    check(len(final) == 2, f"--tls-ktls={mode}: paths logged: {paths}")
    if mode == "off":
        check(all("TLS path GnuTLS (kernel TLS: --tls-ktls=off)" in m
                  for m in paths), f"--tls-ktls=off: {paths}")
    print(f"  --tls-ktls={mode}: {final[0].split('TLS path ')[1]}")
ok("--tls-ktls=auto and off: each TLS connection's path is logged with -v")

# ---- the cipher: the client's first by default, --tls-priority decides -----
# libnbd (GnuTLS's NORMAL) asks for AES-256-GCM first, and stratad's default
# (NORMAL) lets the client's order decide; a --tls-priority that allows one
# cipher gets that one.  libnbd's debug output names the cipher in use.
def cipher_of(extra):
    srv = harness.Daemon([f"name=open,file={disk}"],
                         extra=["--tls=require", "--tls-certificates",
                                certs.server, *extra])
    try:
        uri = (f"nbds+unix:///open?socket={srv.sock}"
               f"&tls-certificates={certs.path('alice')}")
        r = subprocess.run(["nbdinfo", "--size", uri],
                           capture_output=True, text=True, timeout=30,
                           env=dict(os.environ, LIBNBD_DEBUG="1"))
        check(r.returncode == 0 and r.stdout.strip() == str(MiB),
              f"nbdinfo over TLS ({extra}): {r.stdout}{r.stderr[-2000:]}")
        got = [m.split("cipher ")[1].split()[0] for m in r.stderr.splitlines()
               if "connection is using TLS: cipher " in m]
        check(len(got) == 1, f"libnbd did not name the cipher: {r.stderr[-2000:]}")
        return got[0]
    finally:
        check(srv.stop() == 0, "stratad exit status")


c = cipher_of([])
check(c == "AES-256-GCM", f"default priority: cipher {c} (libnbd's first)")
for cipher in ("CHACHA20-POLY1305", "AES-128-GCM"):
    c = cipher_of(["--tls-priority", f"NORMAL:-CIPHER-ALL:+{cipher}"])
    check(c == cipher, f"--tls-priority NORMAL:-CIPHER-ALL:+{cipher}: cipher {c}")
ok("the client's cipher by default (AES-256-GCM); --tls-priority decides")
print("PASS")
