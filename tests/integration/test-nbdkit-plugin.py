#!/usr/bin/python3
"""nbdkit strata: the plugin serves a qcow2 chain exactly as qemu-nbd and
stratad do.

1. Differential: two copies of a 3-layer chain (base.raw <- mid.qcow2 <-
   top.qcow2, as in test-qcow2-differential.py), A served by qemu-nbd, B
   by `nbdkit strata`.  The same seeded writes (some FUA), write zeroes
   (with and without NO_HOLE, FAST_ZERO), trims, flushes and reads run on
   each with up to DEPTH requests in flight, every read checked against
   the model and the two servers' reads compared (phase 1: one
   connection; phase 2: nbdkit restarted, 4 connections at once on
   disjoint quarters).  After each phase, with the servers stopped
   (nbdkit within a bounded time: the plugin's cleanup flushes, closes
   the chain and joins its loop thread): qemu-img compare A and B, both
   equal to the model, qemu-img check on B's top clean, the backing files
   unchanged byte for byte.
2. Capabilities: nbdinfo's view of the plugin equals its view of stratad
   serving the same chain (every can_* flag, read-only, block sizes, size),
   for a writable chain, a read-only one (readonly=true / readonly=on)
   and cache=none; and `nbdinfo --map` (base:allocation: holes and zeroes
   through the chain) is the same from both.
3. Errors: a missing file and an unknown option fail nbdkit's start with
   a clear message; a probed qcow2 without format= is refused (as stratad
   refuses it).

Seed: STRATA_SEED (default 20240601), ops: STRATA_OPS (default 1000).
"""
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import check, fail  # noqa: E402

harness.need("qemu-nbd", "qemu-img", "qemu-io", "nbdinfo")
import nbdkitlib  # noqa: E402
nbdkitlib.need_plugin()
import workload  # noqa: E402
from workload import (QemuNbd, Runner, check_same_reads, compare_files,  # noqa: E402
                      gen_ops, make_initial, ok, run_parallel)

MiB = 1 << 20
SIZE = 64 * MiB
DEPTH = 16
SEED = int(os.environ.get("STRATA_SEED", "20240601"))
SEQ_OPS = int(os.environ.get("STRATA_OPS", "1000"))
CONNS = 4
workload.configure(SIZE, DEPTH, 300)   # bounds a hang only; meson's timeout is 360


def run(*args, timeout=120):
    p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, errors="replace", timeout=timeout)
    return p.returncode, p.stdout


def must(*args):
    rc, out = run(*args)
    check(rc == 0, f"{' '.join(args)}: exit {rc}: {out.strip()}")
    return out


def must_json(*args, timeout=120):
    """Runs args and parses its standard output as JSON (what it says on
    standard error, e.g. a warning, stays out of the parse)."""
    p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, errors="replace", timeout=timeout)
    check(p.returncode == 0,
          f"{' '.join(args)}: exit {p.returncode}: {p.stderr.strip()}")
    try:
        return json.loads(p.stdout)
    except ValueError as e:
        fail(f"{' '.join(args)}: not JSON ({e}): {p.stdout[:500]!r} "
             f"stderr: {p.stderr[:500]!r}")


def make_chain(d):
    os.makedirs(d, exist_ok=True)
    base = os.path.join(d, "base.raw")
    make_initial(base, SEED)
    os.truncate(base, 56 * MiB)
    mid = os.path.join(d, "mid.qcow2")
    must("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
         mid, str(60 * MiB))
    must("qemu-io", "-f", "qcow2",
         "-c", "write -P 0x5a 1M 3M", "-c", "write -P 0xa5 7000 9000",
         "-c", "write -z 8M 2M", "-c", "discard 12M 1M",
         "-c", "write -P 0x33 55M 4M", "-c", "write -P 0x77 30M 64k", mid)
    top = os.path.join(d, "top.qcow2")
    must("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
         top, str(SIZE))
    return top


def digest(path):
    import hashlib
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def plugin(top, *extra, label="nbdkit strata"):
    return nbdkitlib.Nbdkit([nbdkitlib.PLUGIN, f"file={top}", "format=qcow2", *extra],
                            label=label)


def stop_nbdkit(n, what):
    rc = n.stop()
    check(rc == 0, f"{what}: nbdkit exit status after SIGTERM: {rc}\n" + n.errors()[-3000:])


def verify(what, ta, tb, model, backing):
    tmp = harness.tmpdir()
    for top, label in ((tb, "nbdkit strata"), (ta, "qemu-nbd")):
        raw = os.path.join(tmp, "guest.raw")
        must("qemu-img", "convert", "-O", "raw", top, raw)
        compare_files([(raw, label)], model, what)
        os.unlink(raw)
    rc, out = run("qemu-img", "compare", ta, tb)
    check(rc == 0, f"{what}: qemu-img compare: {out.strip()}")
    rc, out = run("qemu-img", "check", tb)
    check(rc == 0, f"{what}: qemu-img check {tb}: exit {rc}:\n{out}")
    d = os.path.dirname(tb)
    for name, dg in backing.items():
        check(digest(os.path.join(d, name)) == dg, f"{what}: backing file {name} was modified")
    ok(f"{what}: qemu-img compare: qemu-nbd's and the plugin's chains are identical and "
       f"equal to the model; qemu-img check clean; backing files unchanged")


def differential(root):
    ta = make_chain(os.path.join(root, "a"))
    tb = make_chain(os.path.join(root, "b"))
    backing = {n: digest(os.path.join(root, "b", n)) for n in ("base.raw", "mid.qcow2")}
    tmp = harness.tmpdir()
    raw = os.path.join(tmp, "initial.raw")
    must("qemu-img", "convert", "-O", "raw", ta, raw)
    with open(raw, "rb") as f:
        initial = bytearray(f.read())
    os.unlink(raw)

    # phase 1: one connection each
    q = QemuNbd(ta, "diff", shared=CONNS + 1, fmt="qcow2")
    n = plugin(tb)
    ops = gen_ops(SEED, SEQ_OPS, 0, SIZE)
    ra = Runner("qemu-nbd", q.uri(), bytearray(initial), ops)
    ra.depth = 1
    rb = Runner("nbdkit strata", n.uri(), bytearray(initial), ops)
    run_parallel([ra])
    run_parallel([rb])
    check_same_reads("phase 1", sorted(ra.digests), rb)
    ok(f"phase 1: {len(ops)} ops ({sorted(rb.counts.items())}), {len(rb.digests)} reads "
       f"matched the model and qemu-nbd's")
    q.stop()
    stop_nbdkit(n, "phase 1")
    verify("phase 1", ta, tb, ra.model, backing)

    # phase 2: 4 connections at once to the plugin (multi-conn)
    q = QemuNbd(ta, "diff", shared=CONNS + 1, fmt="qcow2")
    n = plugin(tb)
    span = SIZE // CONNS
    per = max(1, SEQ_OPS // CONNS)
    allops = [gen_ops(SEED * 1000 + k + 1, per, k * span, span) for k in range(CONNS)]
    ras = [Runner(f"qemu-nbd#{k}", q.uri(), ra.model, allops[k]) for k in range(CONNS)]
    for r in ras:
        r.depth = 1
        run_parallel([r])
    rbs = [Runner(f"nbdkit strata#{k}", n.uri(), rb.model, allops[k]) for k in range(CONNS)]
    run_parallel(rbs)
    for k in range(CONNS):
        check_same_reads(f"phase 2, connection {k}", sorted(ras[k].digests), rbs[k])
    ok(f"phase 2: {CONNS} connections x {per} ops at once, reads matched the model and "
       f"qemu-nbd's")
    q.stop()
    stop_nbdkit(n, "phase 2")
    verify("phase 2", ta, tb, ra.model, backing)


CAP_KEYS = ("is_rotational", "is_read_only", "can_cache", "can_df", "can_fast_zero",
            "can_flush", "can_fua", "can_multi_conn", "can_trim", "can_zero",
            "block_size_minimum", "block_size_preferred", "block_size_maximum",
            "export-size")


def info(uri):
    e = must_json("nbdinfo", "--json", uri)["exports"][0]
    return {k: e.get(k) for k in CAP_KEYS}


def extent_map(uri):
    m = must_json("nbdinfo", "--map", "--json", uri)
    # neighbours of equal type merged: servers may split extents differently
    merged = []
    for x in m:
        if merged and merged[-1]["type"] == x["type"]:
            merged[-1]["length"] += x["length"]
        else:
            merged.append({"offset": x["offset"], "length": x["length"], "type": x["type"]})
    return merged


def capabilities(root):
    d = os.path.join(root, "caps")
    top = make_chain(d)
    # something in the top too: data, a zeroed range, a discarded range
    must("qemu-io", "-f", "qcow2", "-c", "write -P 0x44 20M 2M", "-c", "write -z 40M 1M",
         "-c", "write -P 0x45 44M 1M", "-c", "discard 44M 1M", top)
    for label, sopts, popts in (
            ("writable", "cache=writeback", ()),
            ("read-only", "cache=writeback,readonly=on", ("readonly=true",)),
            ("cache=none", "cache=none", ("cache=none",))):
        s = harness.Daemon([f"name=caps,file={top},format=qcow2,backing-root={d},{sopts}"])
        want = info(s.uri("caps"))
        want_map = extent_map(s.uri("caps"))
        check(s.stop() == 0, f"{label}: stratad exit status\n" + s.logtext()[-2000:])
        n = plugin(top, f"backing-root={d}", *popts, label=f"nbdkit strata ({label})")
        got = info(n.uri())
        got_map = extent_map(n.uri())
        stop_nbdkit(n, label)
        diff = {k: (want[k], got[k]) for k in CAP_KEYS if want[k] != got[k]}
        check(not diff, f"{label}: nbdinfo differs (stratad, plugin): {diff}")
        check(got_map == want_map,
              f"{label}: nbdinfo --map differs:\n stratad {want_map}\n plugin  {got_map}")
        kinds = {x["type"] for x in got_map}
        check(len(kinds) >= 2 and len(got_map) > 10, f"{label}: map too uniform to prove anything: {got_map}")
        ok(f"{label}: nbdinfo sees the same capabilities from the plugin as from stratad "
           f"({', '.join(f'{k}={v}' for k, v in got.items() if k.startswith(('is_', 'block')))}"
           f"), and the same map ({len(got_map)} extents, types {sorted(kinds)})")
    rc, out = run("qemu-img", "check", top)
    check(rc == 0, f"capabilities: qemu-img check: {out}")


def start_fails(args, want):
    rc, out = nbdkitlib.run_failing(["-f", "-U", "-", nbdkitlib.PLUGIN, *args,
                                     "--run", "true"])
    check(rc != 0 and want in out, f"nbdkit strata {' '.join(args)}: exit {rc}, wanted a "
          f"failure saying {want!r}:\n{out}")


def errors(root):
    top = make_chain(os.path.join(root, "err"))
    start_fails([f"file={root}/nonexistent.qcow2"], "nonexistent.qcow2")
    start_fails([f"file={top}", "colour=blue"], "unknown parameter 'colour'")
    start_fails([f"file={top}", "format=vmdk"], "format=vmdk")
    start_fails([f"file={top}", "cache=sometimes"], "cache=sometimes")
    start_fails([f"file={top}"], "format=qcow2")
    ok("a missing file, an unknown option, format or cache mode, and a probed qcow2 "
       "without format= each stop nbdkit's start with a message that names them")


def main():
    print(f"seed: {SEED} (STRATA_SEED={SEED} to replay), ops: {SEQ_OPS}, depth: {DEPTH}",
          flush=True)
    root = harness.tmpdir()
    differential(root)
    capabilities(root)
    errors(root)
    shutil.rmtree(root, ignore_errors=True)
    print("PASS")


if __name__ == "__main__":
    main()
