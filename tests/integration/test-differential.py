#!/usr/bin/python3
"""Differential test: stratad against qemu-nbd on the same seeded workload.

A 64 MiB raw file with random contents and holes is copied; copy A is
served by qemu-nbd, copy B by stratad (cache=writeback) and copy C by the
same stratad as a second export with cache=none (O_DIRECT).  The cache=none
export advertises a 4 KiB minimum block size, so it runs the same sequence
with every range widened to whole 4 KiB blocks and is checked against its
own model only.  The same seeded sequence of operations (writes of
1 B..1 MiB at random offsets, some with FUA; write zeroes of up to 4 MiB with
and without NO_HOLE; trims; flushes; reads) runs against each, through
python libnbd with up to DEPTH requests in flight.

Determinism: operations are submitted strictly in sequence order, and an
operation is not submitted while any in-flight operation overlaps its byte
range (flushes have no range).  Every outcome is therefore the one of
applying the operations one after another, which an in-memory model of the
disk reproduces.  Each read is checked against the model, and the digests
of the reads of both servers are compared with each other.

Trims: the NBD spec leaves the content of a trimmed range unspecified
(and qemu, for example, keeps data in unaligned heads and tails of a
discard while a punch-hole may zero them).  So every trim is issued as a
triple: TRIM range; READ range, where each byte must be either its old value
or zero; WRITE_ZEROES range.  The model then knows the range is zero, the
"either old or zero" rule is checked on every server, and the final files
stay comparable byte for byte.  (The trim-reads are not compared between the
servers, since both answers may legitimately differ.)

Phase 1: one connection, SEQ_OPS operations.  The servers are stopped and
the files compared with each other (cmp) and with the model.
Phase 2: the servers restarted on the same files; 4 connections at once,
each running its own seeded sequence on a disjoint quarter of the disk
(multi-conn).  Stopped, compared again.

Seed: STRATA_SEED (default 20240601) -- printed, so a failure can be
replayed.  STRATA_OPS overrides the operation count (default 3000).

Run:  STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-differential.py
"""
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import check, need  # noqa: E402

need("qemu-nbd", "cmp")
import workload  # noqa: E402  (skips when python3-libnbd is missing)
from workload import (QemuNbd, compare_files, make_initial,  # noqa: E402
                      phase_many_connections, phase_one_connection)

MiB = 1 << 20
SIZE = 64 * MiB
DEPTH = 16
SEED = int(os.environ.get("STRATA_SEED", "20240601"))
SEQ_OPS = int(os.environ.get("STRATA_OPS", "3000"))
CONNS = 4
workload.configure(SIZE, DEPTH, 270)   # bounds a hang only; meson's timeout is 300


def start_servers(fa, fb, fc):
    q = QemuNbd(fa, "diff", shared=CONNS + 1)
    s = harness.Daemon([f"name=diff,file={fb},format=raw,cache=writeback",
                        f"name=direct,file={fc},format=raw,cache=none"])
    return q, s


def stop_servers(q, s, what):
    rq = q.stop()
    rs = s.stop()
    check(rs == 0, f"{what}: stratad exit status after SIGTERM: expected 0, got {rs}\n"
          + s.logtext()[-2000:])
    if rq != 0:
        print(f"note: qemu-nbd exited with {rq}")


def main():
    print(f"seed: {SEED} (STRATA_SEED={SEED} to replay), ops: {SEQ_OPS}, depth: {DEPTH}",
          flush=True)
    d = harness.tmpdir()
    fa = os.path.join(d, "a.img")       # qemu-nbd
    fb = os.path.join(d, "b.img")       # stratad, cache=writeback
    fc = os.path.join(d, "c.img")       # stratad, cache=none (O_DIRECT), aligned ops
    initial = make_initial(fa, SEED)
    for f in (fb, fc):
        subprocess.run(["cp", "--sparse=always", fa, f], check=True, timeout=60)

    # ---- phase 1: one connection, many requests in flight -----------------
    q, s = start_servers(fa, fb, fc)
    print(f"qemu-nbd aio={q.aio}")
    ra, rb, rc = phase_one_connection(SEED, SEQ_OPS, (q.uri(), s.uri("diff"), s.uri("direct")),
                                      initial)
    stop_servers(q, s, "phase 1")
    compare_files([(fa, "qemu-nbd"), (fb, "stratad")], ra.model, "phase 1")
    compare_files([(fc, "stratad cache=none")], rc.model, "phase 1 (cache=none)")

    # ---- phase 2: 4 connections at once on disjoint regions ---------------
    q, s = start_servers(fa, fb, fc)
    phase_many_connections(SEED, SEQ_OPS, CONNS, (q.uri(), s.uri("diff"), s.uri("direct")),
                           (ra, rb, rc))
    stop_servers(q, s, "phase 2")
    compare_files([(fa, "qemu-nbd"), (fb, "stratad")], ra.model, "phase 2")
    compare_files([(fc, "stratad cache=none")], rc.model, "phase 2 (cache=none)")
    print("PASS")


if __name__ == "__main__":
    main()
