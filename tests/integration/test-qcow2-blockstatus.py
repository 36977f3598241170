#!/usr/bin/python3
"""Block status of a large sparse qcow2 chain: fast, and the same as QEMU's.

The chain: base.raw (64 MiB, data at the start) <- mid.qcow2 (1 TiB: a few
MiB of data here and there, a zeroed range, a discarded range) <- top.qcow2
(1 TiB: a little data, a zeroed range).  Both `base:allocation` and
`qemu:allocation-depth` maps of the whole 1 TiB disk are read from stratad
and from `qemu-nbd -A`, merged, and must agree byte for byte.  Reading
stratad's maps must take at most 10 times as long as reading qemu-nbd's,
measured right after in the same run (unallocated L2 tables are skipped in
one step, as QEMU does; walking cluster by cluster would take minutes,
hundreds of times longer); a pair over the ratio is measured again, up to
three times, so that one burst of load on a shared machine does not decide.  REQ_ONE must return exactly one
extent, the first of the full answer.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import check, need, ok  # noqa: E402

need("qemu-img", "qemu-io", "qemu-nbd")
harness.nbd_handle()
import nbd  # noqa: E402
import qcow2lib  # noqa: E402
from qcow2lib import map_diffs, maps_of  # noqa: E402
from workload import QemuNbd  # noqa: E402

MiB = 1 << 20
TiB = 1 << 40
CONTEXTS = ("base:allocation", "qemu:allocation-depth")


def main():
    d = harness.tmpdir()
    base = os.path.join(d, "base.raw")
    with open(base, "wb") as f:
        f.truncate(64 * MiB)
        f.write(os.urandom(8 * MiB))
    mid = os.path.join(d, "mid.qcow2")
    top = os.path.join(d, "top.qcow2")
    qcow2lib.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
                  mid, str(TiB)])
    qcow2lib.qemu_io(mid, ["write -P 1 4M 8M", "write -P 2 100G 3M", "write -z 200G 1G",
                           "discard 2M 1M", "write -P 3 1023G 64k"])
    qcow2lib.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
                  top, str(TiB)])
    qcow2lib.qemu_io(top, ["write -P 4 6M 1M", "write -z 100G 1M", "write -P 5 512G 128k"])

    s = harness.Daemon([f"name=big,file={top},format=qcow2,readonly=on"])
    q = QemuNbd(top, "big", shared=2, fmt="qcow2", extra=["-r", "-A"])
    # The same maps from both servers, one right after the other, so that a
    # busy machine slows both alike.
    for attempt in range(1, 4):
        t0 = time.monotonic()
        ours = maps_of(s.uri("big"), TiB, CONTEXTS)
        took = time.monotonic() - t0
        t0 = time.monotonic()
        theirs = maps_of(q.uri(), TiB, CONTEXTS)
        qtook = time.monotonic() - t0
        if took <= 10 * qtook:
            break
    q.stop()
    for c in CONTEXTS:
        diffs = map_diffs(ours[c], theirs[c])
        check(not diffs, f"{c}: stratad and qemu-nbd disagree (start, len, stratad, "
                         f"qemu-nbd): {diffs}")
        ok(f"{c}: {len(ours[c])} merged extents over 1 TiB, identical to qemu-nbd's")
    check(took <= 10 * qtook, f"stratad took {took:.2f} s for the maps of a 1 TiB sparse "
          f"chain, more than 10 times qemu-nbd's {qtook:.2f} s, three times: does it walk "
          f"unallocated L2 tables cluster by cluster?")
    ok(f"both maps of 1 TiB in {took:.3f} s, {took / qtook:.1f} times qemu-nbd's "
       f"{qtook:.3f} s (measurement {attempt})")

    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(s.uri("big"))
    got = []
    h.block_status(1 << 31, 0, lambda ctx, off, ents, err: got.extend(ents) or 0,
                   nbd.CMD_FLAG_REQ_ONE)
    h.shutdown()
    first = ours["base:allocation"][0]
    check(len(got) == 2, f"REQ_ONE: expected one extent, got {len(got) // 2}")
    check(got[1] == first[2] and 0 < got[0] <= first[1],
          f"REQ_ONE: extent {got} does not start the full map {first}")
    ok("REQ_ONE returns one extent, the first of the full map")
    check(s.stop() == 0, "stratad exit status")
    print("PASS")


if __name__ == "__main__":
    main()
