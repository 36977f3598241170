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
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import check, need  # noqa: E402

need("qemu-nbd", "cmp")
import workload  # noqa: E402  (skips when python3-libnbd is missing)
from workload import (QemuNbd, Runner, aligned, check_same_reads,  # noqa: E402
                      compare_files, gen_ops, make_initial, ok, run_parallel)

MiB = 1 << 20
SIZE = 64 * MiB
DEPTH = 16
SEED = int(os.environ.get("STRATA_SEED", "20240601"))
SEQ_OPS = int(os.environ.get("STRATA_OPS", "3000"))
CONNS = 4
workload.configure(SIZE, DEPTH, 110)   # whole test, leaves room for teardown


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
    ops = gen_ops(SEED, SEQ_OPS, 0, SIZE)
    ra = Runner("qemu-nbd", q.uri(), bytearray(initial), ops)
    rb = Runner("stratad", s.uri("diff"), bytearray(initial), ops)
    rc = Runner("stratad cache=none", s.uri("direct"), bytearray(initial), aligned(ops))
    times = []
    for r in (ra, rb, rc):
        t0 = time.time()
        run_parallel([r])
        times.append(f"{r.label} {time.time() - t0:.1f}s")
    print(f"op mix: {sorted(rb.counts.items())}; qemu-nbd aio={q.aio}; " + ", ".join(times))
    check_same_reads("phase 1", sorted(ra.digests), rb)
    check(ra.model == rb.model, "phase 1: models diverged (test bug)")
    ok(f"phase 1: {len(ops)} ops, {len(rb.digests)} reads matched the model on qemu-nbd and "
       f"stratad, and each other")
    ok(f"phase 1: cache=none export, same ops widened to 4 KiB blocks: "
       f"{len(rc.digests)} reads matched its model")
    stop_servers(q, s, "phase 1")
    compare_files([(fa, "qemu-nbd"), (fb, "stratad")], ra.model, "phase 1")
    compare_files([(fc, "stratad cache=none")], rc.model, "phase 1 (cache=none)")

    # ---- phase 2: 4 connections at once on disjoint regions ---------------
    q, s = start_servers(fa, fb, fc)
    span = SIZE // CONNS
    per = max(1, SEQ_OPS // CONNS)
    allops = [gen_ops(SEED * 1000 + k + 1, per, k * span, span) for k in range(CONNS)]
    groups = []
    for label, uri, model, wide in (("qemu-nbd", q.uri(), ra.model, False),
                                    ("stratad", s.uri("diff"), rb.model, False),
                                    ("stratad cache=none", s.uri("direct"), rc.model, True)):
        rs = [Runner(f"{label}#{k}", uri, model, aligned(allops[k]) if wide else allops[k])
              for k in range(CONNS)]
        run_parallel(rs)
        groups.append(rs)
    for k in range(CONNS):
        check_same_reads(f"phase 2, connection {k}", sorted(groups[0][k].digests), groups[1][k])
    check(ra.model == rb.model, "phase 2: models diverged (test bug)")
    ok(f"phase 2: {CONNS} connections x {per} ops, reads matched the model on qemu-nbd and "
       f"stratad, and each other; cache=none export matched its model")
    stop_servers(q, s, "phase 2")
    compare_files([(fa, "qemu-nbd"), (fb, "stratad")], ra.model, "phase 2")
    compare_files([(fc, "stratad cache=none")], rc.model, "phase 2 (cache=none)")
    print("PASS")


if __name__ == "__main__":
    main()
