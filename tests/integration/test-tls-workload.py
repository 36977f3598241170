#!/usr/bin/python3
"""Data over TLS: the differential workload (workload.py, as in
test-differential.py) with stratad behind --tls=require and its clients on
nbds+unix:// URIs, against qemu-nbd in plaintext; then a qcow2 backing
chain served over TLS, written by qemu-io with tls-creds-x509, checked by
qemu-img check and compared with the same writes applied by qemu-io to a
local copy of the chain.

Seed: STRATA_SEED (default 20240601); STRATA_OPS (default 1500).

Run:  STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-tls-workload.py
"""
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import check, need, ok  # noqa: E402

need("qemu-nbd", "qemu-img", "qemu-io", "cmp", "certtool")
import workload  # noqa: E402  (skips when python3-libnbd is missing)
from workload import (QemuNbd, compare_files, make_initial,  # noqa: E402
                      phase_many_connections, phase_one_connection)
import tlscerts  # noqa: E402

harness.require_built()
harness.report_unexpected_exceptions()


class _NBD(workload.nbd.NBD):
    """workload.py's handles, allowed to read the tls-certificates= of a
    URI (libnbd refuses local files named in URIs unless told)."""

    def __init__(self):
        super().__init__()
        self.set_uri_allow_local_file(True)


workload.nbd.NBD = _NBD
MiB = 1 << 20
SIZE = 32 * MiB
DEPTH = 16
SEED = int(os.environ.get("STRATA_SEED", "20240601"))
SEQ_OPS = int(os.environ.get("STRATA_OPS", "1500"))
CONNS = 4
workload.configure(SIZE, DEPTH, 200)
certs = tlscerts.Certs()
TLS = ["--tls=require", "--tls-certificates", certs.server, "--tls-verify-peer"]


def tls_uri(s, name):
    return (f"nbds+unix:///{name}?socket={s.sock}"
            f"&tls-certificates={certs.path('alice')}")


def start_servers(fa, fb, fc):
    q = QemuNbd(fa, "diff", shared=CONNS + 1)
    s = harness.Daemon([f"name=diff,file={fb},format=raw,cache=writeback",
                        f"name=direct,file={fc},format=raw,cache=none"],
                       extra=TLS)
    return q, s, (q.uri(), tls_uri(s, "diff"), tls_uri(s, "direct"))


def stop_servers(q, s, what):
    q.stop()
    rs = s.stop()
    check(rs == 0, f"{what}: stratad exit status {rs}\n" + s.logtext()[-2000:])


def differential():
    print(f"seed: {SEED}, ops: {SEQ_OPS}, depth: {DEPTH}", flush=True)
    d = harness.tmpdir()
    fa, fb, fc = (os.path.join(d, n) for n in ("a.img", "b.img", "c.img"))
    initial = make_initial(fa, SEED)
    for f in (fb, fc):
        subprocess.run(["cp", "--sparse=always", fa, f], check=True, timeout=60)
    q, s, uris = start_servers(fa, fb, fc)
    ra, rb, rc = phase_one_connection(SEED, SEQ_OPS, uris, initial)
    stop_servers(q, s, "phase 1")
    compare_files([(fa, "qemu-nbd"), (fb, "stratad over TLS")], ra.model, "phase 1")
    compare_files([(fc, "stratad cache=none over TLS")], rc.model, "phase 1")
    q, s, uris = start_servers(fa, fb, fc)
    phase_many_connections(SEED, SEQ_OPS, CONNS, uris, (ra, rb, rc))
    stop_servers(q, s, "phase 2")
    compare_files([(fa, "qemu-nbd"), (fb, "stratad over TLS")], ra.model, "phase 2")
    compare_files([(fc, "stratad cache=none over TLS")], rc.model, "phase 2")
    ok("differential workload over TLS: files equal to qemu-nbd's and the model")


def run(args):
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    check(r.returncode == 0 and "Pattern verification failed" not in r.stdout,
          f"{' '.join(args)}:\n{r.stdout}{r.stderr}")
    return r.stdout


def qcow2_chain():
    d = harness.tmpdir()
    chain = {}
    for tag in ("served", "local"):
        base = os.path.join(d, f"{tag}-base.qcow2")
        top = os.path.join(d, f"{tag}-top.qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", base, "16M"])
        run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 8M", base])
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2",
             top])
        chain[tag] = top
    writes = ["write -P 0x22 1M 64k", "write -P 0x33 3M 2M", "write -z 5M 1M",
              "write -P 0x44 7M 1536k", "write -P 0x55 12M 4k",
              "discard 6M 64k"]
    s = harness.Daemon([f"name=chain,file={chain['served']},format=qcow2"],
                       extra=TLS)
    x509 = f"tls-creds-x509,id=tls0,dir={certs.path('alice')},endpoint=client"
    opts = f"driver=nbd,path={s.sock},export=chain,tls-creds=tls0,tls-hostname=localhost"
    args = ["qemu-io", "--object", x509, "--image-opts", opts]
    for cmd in writes:
        args += ["-c", cmd]
    args += ["-c", "read -P 0x33 3M 2M", "-c", "read -P 0x11 0 1M",
             "-c", "read -P 0 9M 1M"]
    run(args)
    check(s.stop() == 0, "stratad exit status")
    local = ["qemu-io", "-f", "qcow2"]
    for cmd in writes:
        local += ["-c", cmd]
    local.append(chain["local"])
    run(local)
    run(["qemu-img", "check", chain["served"]])
    out = run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2",
               chain["served"], chain["local"]])
    check("identical" in out, f"qemu-img compare: {out}")
    ok("qcow2 chain over TLS: qemu-io's writes landed as on a local copy; "
       "qemu-img check clean")


differential()
qcow2_chain()
print("PASS")
