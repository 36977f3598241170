#!/usr/bin/python3
"""The qcow2 interop set through `nbdkit strata`.

The images of test-qcow2-interop.py (made by qemu-img with one set of
options each, given content by qemu-io, most over a backing file), served
by the nbdkit plugin: for each case, a copy is served by the plugin and
compared with qemu-nbd -r -A on the original (the whole disk byte for
byte, and the base:allocation map, merged extents, with the same
tolerance for QEMU's extra ZERO hints as there); then the seeded write
sequence runs on the plugin's copy and on a second copy behind qemu-nbd.
After a clean stop: qemu-img check of the plugin's copy exits 0, qemu-img
compare finds both copies identical, QEMU reads the plugin's copy as the
model says.

The default cases cover every kind of image in the set (the smallest and
largest clusters, 1-bit refcounts, compat=0.10, zstd over a backing file,
extended L2, lazy refcounts, an internal snapshot, a bitmap);
STRATA_CASES=all runs all of them, STRATA_CASES=a,b the named ones.
Seed: STRATA_SEED (default 20240917); STRATA_OPS (default 200) per case.
"""
import importlib.util
import os
import random
import shutil
import subprocess
import sys
import time

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
import harness  # noqa: E402
import nbdkitlib  # noqa: E402

nbdkitlib.need_plugin()
spec = importlib.util.spec_from_file_location("interop",
                                              os.path.join(here, "test-qcow2-interop.py"))
interop = importlib.util.module_from_spec(spec)
spec.loader.exec_module(interop)
import qcow2lib  # noqa: E402
import workload  # noqa: E402
from harness import check_soft, fail, ok  # noqa: E402

DEFAULT = ("cs512", "cs2M", "rc1", "compat010", "zstd-backing", "extl2-64k", "lazy",
           "snapshot", "bitmap")


def one_case(c, path, d):
    a = shutil.copyfile(path, os.path.join(d, c.name + "-p.qcow2"))
    b = shutil.copyfile(path, os.path.join(d, c.name + "-q.qcow2"))
    n = nbdkitlib.Nbdkit([nbdkitlib.PLUGIN, f"file={a}", "format=qcow2",
                          f"backing-root={d}"], label=f"nbdkit strata ({c.name})")
    q = workload.QemuNbd(path, c.name, 1, fmt="qcow2", extra=("-r", "-A"))
    want = qcow2lib.read_all(q.uri(), c.size)
    got = qcow2lib.read_all(n.uri(), c.size)
    same = check_soft(got == want, f"{c.name}: read: the plugin and qemu-nbd differ at byte "
                      f"{harness.first_diff(got, want)}")
    if same:
        qm = qcow2lib.maps_of(q.uri(), c.size, [interop.ALLOC])[interop.ALLOC]
        pm = qcow2lib.maps_of(n.uri(), c.size, [interop.ALLOC])[interop.ALLOC]
        diffs = [x for x in qcow2lib.map_diffs(pm, qm, limit=0)
                 if not interop.zero_hint_only(x)]
        same = check_soft(not diffs, f"{c.name}: base:allocation differs from qemu-nbd -A: "
                          + interop.fmt_diffs(diffs[:6]))
    q.stop()

    initial = qcow2lib.read_raw(path)
    ops = workload.gen_ops(interop.case_seed(c, 1), interop.WRITE_OPS, 0, c.size,
                           max_write=c.size // 4, max_zero=c.size // 2)
    q = workload.QemuNbd(b, c.name, 1, fmt="qcow2")
    runners = []
    for who, uri, depth in (("qemu-nbd", q.uri(), 1), ("nbdkit strata", n.uri(), 8)):
        workload.configure(size=c.size, depth=depth, seconds=150)  # bounds a hang
        r = workload.Runner(f"{c.name} on {who}", uri, bytearray(initial), ops)
        r.run()
        check_soft(r.error is None, str(r.error))
        runners.append(r)
    q.stop()
    rc = n.stop()
    check_soft(rc == 0, f"{c.name}: nbdkit exit status {rc}\n" + n.errors()[-2000:])
    if any(r.error for r in runners):
        return
    check_soft(sorted(runners[0].digests) == sorted(runners[1].digests),
               f"{c.name}: reads differ between qemu-nbd and the plugin")
    code, out = qcow2lib.qemu_img_check(a)
    if not check_soft(code == 0, f"{c.name}: qemu-img check of the plugin's copy: exit "
                      f"{code}\n" + out[-2000:]):
        return
    p = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", a, b],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=60)
    if not check_soft(p.returncode == 0, f"{c.name}: qemu-img compare: {p.stdout.strip()}"):
        return
    got = qcow2lib.read_raw(a)
    if check_soft(got == bytes(runners[1].model),
                  f"{c.name}: QEMU reads the plugin's copy differently from the model"):
        ok(f"{c.name}: read{' and map' if same else ''} identical to qemu-nbd -A; "
           f"{interop.WRITE_OPS} ops; qemu-img check clean, copies identical")


def main():
    print(f"seed: {interop.SEED} (STRATA_SEED={interop.SEED} to replay)", flush=True)
    only = os.environ.get("STRATA_CASES")
    names = None if only == "all" else (only.split(",") if only else DEFAULT)
    cases = [c for c in interop.CASES if names is None or c.name in names]
    if not cases:
        fail(f"STRATA_CASES={only}: no such case")
    d = harness.tmpdir()
    t0 = time.time()
    paths = {c.name: interop.make_image(d, c, random.Random(interop.case_seed(c)))
             for c in cases}
    ok(f"{len(cases)} images made by qemu-img/qemu-io in {time.time() - t0:.1f}s")
    for c in cases:
        one_case(c, paths[c.name], d)
    harness.finish_soft_checks()
    print("PASS")


if __name__ == "__main__":
    main()
