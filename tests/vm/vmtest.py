"""What the VM tests share on the host side: the start of a test (skip
where qemu-system is missing, the build and the host tools present), a
command runner that fails the test with the command's output, and the work
directory (kept with STRATA_VM_KEEP=1)."""
import hashlib
import os
import shutil
import subprocess
import tempfile

import harness as H
import vmlib

KEEP = os.environ.get("STRATA_VM_KEEP", "") not in ("", "0")


def begin(*tools):
    """Skips when no VM can run here; fails when a host tool is missing."""
    H.report_unexpected_exceptions()
    why = vmlib.available()
    if why:
        H.skip(why)
    H.require_built()
    for p in tools:
        H.check_hard(shutil.which(p) is not None,
                     f"{p} is not installed (contrib/deps.sh test installs it)")


def sh(*args, check=True, **kw):
    r = subprocess.run(list(args), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=300, **kw)
    if check and r.returncode != 0:
        H.fail(f"{' '.join(args)}: exit {r.returncode}:\n"
               f"{r.stdout.decode(errors='replace')[-3000:]}")
    return r


def workdir():
    if KEEP:
        d = tempfile.mkdtemp(prefix="strata-vm-")
        print(f"work dir (kept): {d}")
        return d
    return H.tmpdir()


def guest_image():
    """The cached guest kernel + initramfs (built on first use)."""
    try:
        image = vmlib.guest_image()
    except vmlib.VMError as e:
        H.fail(f"guest image: {e}")
    H.ok(f"guest image: kernel {image.manifest['kernel']}")
    return image


def file_sha(path):
    """SHA-256 of a file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
