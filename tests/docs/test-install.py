#!/usr/bin/python3
"""meson install: the daemon, the CLI, the man pages, the systemd units and
(when built) the nbdkit plugin and filter, nothing else, and nothing
written into the source tree.

Installs the build into a temporary DESTDIR (meson install --no-rebuild
--destdir) and checks the exact list of files, that each binary runs
(--version, --help) and each man page is the one built, and that no file
of the source tree (build directories aside) appeared or changed.

Run:  MESON=meson STRATA_BUILD_ROOT=build STRATA_SOURCE_ROOT=. \
      /usr/bin/python3 tests/docs/test-install.py
"""
import os
import shutil
import subprocess
import sys
import tempfile

SRC = os.path.realpath(os.environ["STRATA_SOURCE_ROOT"])
BUILD = os.path.realpath(os.environ["STRATA_BUILD_ROOT"])
MESON = os.environ.get("MESON") or "meson"
UNITS = {"lib/systemd/system/stratad.service",
         "lib/systemd/system/stratad.socket",
         "lib/systemd/system/stratad-control.socket"}
WANT_NO_DOCS = {"bin/strata", "sbin/stratad"} | UNITS
WANT = WANT_NO_DOCS | {"share/man/man8/stratad.8", "share/man/man1/strata.1",
                       "share/man/man7/strata-qmp.7"}


def fail(msg):
    print("FAIL:", msg, flush=True)
    sys.exit(1)


def tree(root):
    """(path, size, mtime) of every file of the source tree, build
    directories, the git directory and bytecode caches left out."""
    out = set()
    for d, dirs, files in os.walk(root):
        if d == root:
            dirs[:] = [x for x in dirs if not x.startswith("build") and x != ".git"]
        dirs[:] = [x for x in dirs if x != "__pycache__" and
                   os.path.realpath(os.path.join(d, x)) != BUILD]
        for f in files:
            p = os.path.join(d, f)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            out.add((os.path.relpath(p, root), st.st_size, st.st_mtime_ns))
    return out


before = tree(SRC)
dest = tempfile.mkdtemp(prefix="strata-install.")
try:
    argv = MESON.split() + ["install", "--no-rebuild", "--quiet", "-C", BUILD,
                            "--destdir", dest]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        fail(f"{' '.join(argv)}: exit {p.returncode}\n{p.stdout}{p.stderr}")
    files = set()
    for d, _, fs in os.walk(dest):
        for f in fs:
            files.add(os.path.relpath(os.path.join(d, f), dest))
    prefixes = {f.split("/bin/")[0] if "/bin/" in f else f.split("/sbin/")[0]
                for f in files if "/bin/" in f or "/sbin/" in f}
    if len(prefixes) != 1:
        fail(f"installed files: {sorted(files)}")
    prefix = prefixes.pop()
    got = {os.path.relpath(f, prefix) for f in files}
    have_docs = os.path.exists(os.path.join(BUILD, "docs", "stratad.8"))
    want = WANT if have_docs else WANT_NO_DOCS
    # the nbdkit plugin and filter (built with nbdkit-plugin-dev), in
    # nbdkit's plugin and filter directories under the prefix
    if os.path.exists(os.path.join(BUILD, "nbdkit", "nbdkit-strata-plugin.so")):
        p = subprocess.run(["pkg-config", "--variable=plugindir",
                            "--define-variable=prefix=/" + prefix, "nbdkit"],
                           capture_output=True, text=True, timeout=30)
        q = subprocess.run(["pkg-config", "--variable=filterdir",
                            "--define-variable=prefix=/" + prefix, "nbdkit"],
                           capture_output=True, text=True, timeout=30)
        want = want | {
            os.path.relpath(p.stdout.strip(), "/" + prefix) + "/nbdkit-strata-plugin.so",
            os.path.relpath(q.stdout.strip(), "/" + prefix) + "/nbdkit-strata-qcow2-filter.so"}
        if have_docs:
            want |= {"share/man/man1/nbdkit-strata-plugin.1",
                     "share/man/man1/nbdkit-strata-qcow2-filter.1"}
    if got != want:
        fail(f"installed under /{prefix}: {sorted(got)}, wanted {sorted(want)}")
    print(f"ok   installed under /{prefix}: {' '.join(sorted(got))}", flush=True)
    root = os.path.join(dest, prefix)
    env = dict(os.environ, ASAN_OPTIONS=os.environ.get("ASAN_OPTIONS", "") + ":detect_leaks=0")
    p = subprocess.run([os.path.join(root, "sbin/stratad"), "--version"],
                       capture_output=True, text=True, timeout=30, env=env)
    if p.returncode != 0 or not p.stdout.startswith("stratad "):
        fail(f"installed stratad --version: {p.returncode} {p.stdout}{p.stderr}")
    p = subprocess.run([os.path.join(root, "bin/strata"), "--help"],
                       capture_output=True, text=True, timeout=30, env=env)
    if p.returncode != 0 or "Usage: strata" not in p.stdout:
        fail(f"installed strata --help: {p.returncode} {p.stdout}{p.stderr}")
    for f in got:
        if f.startswith("share/man/"):
            built = os.path.join(BUILD, "docs", os.path.basename(f))
            with open(built, "rb") as a, open(os.path.join(root, f), "rb") as b:
                if a.read() != b.read():
                    fail(f"{f} is not the page built in {built}")
    print("ok   the installed binaries run; the man pages are the ones built", flush=True)
    with open(os.path.join(root, "lib/systemd/system/stratad.service")) as f:
        unit = f.read()
    execs = [l for l in unit.splitlines() if l.startswith("ExecStart=")]
    want_exec = "ExecStart=/" + prefix + "/sbin/stratad "
    if len(execs) != 1 or not execs[0].startswith(want_exec):
        fail(f"stratad.service: {execs}, wanted one line starting {want_exec!r}")
    for u in ("stratad.socket", "stratad-control.socket"):
        with open(os.path.join(root, "lib/systemd/system", u)) as f:
            if "[Socket]" not in f.read():
                fail(f"{u} has no [Socket] section")
    print("ok   stratad.service starts the installed stratad; the socket units are whole", flush=True)
finally:
    shutil.rmtree(dest, ignore_errors=True)
after = tree(SRC)
changed = sorted({x[0] for x in after ^ before})
if changed:
    fail(f"the source tree changed during the install: {changed[:20]}")
print("ok   nothing written into the source tree", flush=True)
