"""Helpers shared by the qcow2 tests (interop, crash, hostile): qemu-img and
qemu-io wrappers, whole-disk reads, block-status maps through libnbd and
their comparison, and starting a stratad that is expected to refuse.
"""
import os
import subprocess
import time

import harness
from harness import fail

MiB = 1 << 20
KiB = 1 << 10


def block_status_map(h, size, context, max_req=64 * MiB):
    """[(start, length, flags)] for the whole disk in one meta context,
    adjacent extents with the same flags merged."""
    out = []
    off = 0
    while off < size:
        got = []

        def cb(metacontext, offset, entries, err, got=got):
            if metacontext == context:
                got.extend(entries)
            return 0
        h.block_status(min(max_req, size - off), off, cb)
        if not got:
            fail(f"block status at {off}: no {context} extent")
        pos = off
        for i in range(0, len(got), 2):
            ln, fl = got[i], got[i + 1]
            ln = min(ln, size - pos)
            if ln <= 0:
                break
            if out and out[-1][2] == fl and out[-1][0] + out[-1][1] == pos:
                out[-1] = (out[-1][0], out[-1][1] + ln, fl)
            else:
                out.append((pos, ln, fl))
            pos += ln
        off = pos
    return out


def maps_of(uri, size, contexts):
    """{context: block_status_map} read over one connection."""
    import nbd
    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    h.connect_uri(uri)
    try:
        res = {}
        for c in contexts:
            if not h.can_meta_context(c):
                fail(f"{uri}: meta context {c} not negotiated")
            res[c] = block_status_map(h, size, c)
        return res
    finally:
        h.shutdown()


def map_diffs(a, b, limit=5):
    """Ranges where two merged maps disagree: [(start, len, flags_a, flags_b)]."""
    diffs = []
    i = j = 0
    pos = 0
    while i < len(a) and j < len(b):
        ea, eb = a[i], b[j]
        end = min(ea[0] + ea[1], eb[0] + eb[1])
        if ea[2] != eb[2]:
            if diffs and diffs[-1][0] + diffs[-1][1] == pos and \
                    diffs[-1][2:] == (ea[2], eb[2]):
                d = diffs[-1]
                diffs[-1] = (d[0], end - d[0], d[2], d[3])
            else:
                diffs.append((pos, end - pos, ea[2], eb[2]))
        pos = end
        if ea[0] + ea[1] == end:
            i += 1
        if eb[0] + eb[1] == end:
            j += 1
    return diffs[:limit] if limit else diffs


# ---------------------------------------------------------------------------
# qemu-img

def run(args, timeout=120, ok_codes=(0,)):
    """Runs a command; fails the test unless its exit code is in ok_codes.
    Returns the CompletedProcess (text output)."""
    p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=timeout)
    if p.returncode not in ok_codes:
        fail(f"{' '.join(args)}: exit {p.returncode}\n{p.stdout[-3000:]}")
    return p


def qemu_img_check(path, fmt="qcow2"):
    """(exit code, output) of qemu-img check."""
    p = subprocess.run(["qemu-img", "check", "-f", fmt, path], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=120)
    return p.returncode, p.stdout


def read_raw(path, fmt="qcow2", tmp=None):
    """The guest-visible content of an image (its chain) as QEMU reads it."""
    out = (tmp or path) + ".raw"
    run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", path, out])
    with open(out, "rb") as f:
        data = f.read()
    os.unlink(out)
    return data


def qemu_io(path, cmds, fmt="qcow2", batch=40):
    """Runs qemu-io commands on an image, `batch` per process; fails the test
    if qemu-io reports an error."""
    for i in range(0, len(cmds), batch):
        args = ["qemu-io", "-f", fmt]
        for c in cmds[i:i + batch]:
            args += ["-c", c]
        args.append(path)
        p = run(args)
        low = p.stdout.lower()
        if "error" in low or "failed" in low:
            fail(f"qemu-io on {path}: {p.stdout[-2000:]}")


def read_all(uri, size, chunk=8 * MiB):
    """The whole disk read over NBD."""
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        out = bytearray()
        off = 0
        while off < size:
            n = min(chunk, size - off)
            out += h.pread(n, off)
            off += n
        return bytes(out)
    finally:
        h.shutdown()


def stratad_refuses(exports, timeout=20, extra=()):
    """Runs stratad with the given --export specs, expecting it to refuse to
    start.  Returns (exit status, log text); fails the test if it serves,
    hangs, crashes on a signal or prints a sanitizer report."""
    d = harness.tmpdir()
    sock = os.path.join(d, "nbd.sock")
    args = [harness.STRATAD, "--listen", "unix:" + sock,
            "--pid-file", os.path.join(d, "pid")]
    for e in exports:
        args += ["--export", e]
    args += list(extra)
    t0 = time.time()
    try:
        p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=timeout, preexec_fn=harness._die_with_parent)
    except subprocess.TimeoutExpired as e:
        fail(f"stratad did not refuse within {timeout}s (served or hung): {exports}\n"
             f"{(e.output or b'')[-2000:]}")
    out = p.stdout
    for marker in ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:"):
        if marker in out:
            fail(f"sanitizer report when refusing {exports}:\n{out[-6000:]}")
    if p.returncode < 0:
        fail(f"stratad died on signal {-p.returncode} with {exports}:\n{out[-3000:]}")
    if p.returncode == 0:
        fail(f"stratad exited 0 with {exports}, expected a refusal:\n{out[-2000:]}")
    if time.time() - t0 > timeout / 2:
        print(f"note: refusal took {time.time() - t0:.1f}s")
    return p.returncode, out
