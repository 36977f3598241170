#!/usr/bin/python3
"""The strata CLI: outputs and exit codes against a real stratad.

version, exports, add-export (+ libnbd reads what it serves), chain,
--json output parsed, jobs, job verbs on a missing job (exit 1 with the
daemon's message), snapshot and commit refused
(exit 1 with the daemon's message; test-jobs-live.py runs them for real), del-export (refused with a client unless --hard), usage errors
and a missing socket (exit 2 with a hint), quit.

Run:  STRATAD=build/daemon/stratad STRATA_CLI=build/contrib/strata \
      /usr/bin/python3 tests/integration/test-cli.py
"""
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import check, ok  # noqa: E402

harness.require_built()
harness.report_unexpected_exceptions()
harness.nbd_handle()
import nbd  # noqa: E402

CLI = os.environ.get("STRATA_CLI") or os.path.join(
    os.path.dirname(harness.STRATAD), "..", "contrib", "strata")
if not os.path.exists(CLI):
    harness.skip(f"{CLI} is not built")

MiB = 1 << 20
d = harness.tmpdir()
img = harness.make_file(os.path.join(d, "disk.img"), 8 * MiB, b"\x01")
img2 = harness.make_file(os.path.join(d, "more.img"), 2 * MiB, b"\x02")
ctl = os.path.join(d, "ctl.sock")
dmn = harness.Daemon([f"name=disk,file={img}"], extra=["--control", ctl])


def strata(*args, rc=0, env_socket=False):
    env = dict(os.environ)
    argv = [CLI] + ([] if env_socket else ["--socket", ctl]) + list(args)
    if env_socket:
        env["STRATA_SOCKET"] = ctl
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    check(p.returncode == rc, f"strata {' '.join(args)}: exit {p.returncode}, "
          f"wanted {rc}\nstdout: {p.stdout}\nstderr: {p.stderr}")
    return p


p = strata("--help")
check("Usage: strata" in p.stdout and "commit EXPORT" in p.stdout, p.stdout)
p = strata("version")
check("daemon: strata " in p.stdout, p.stdout)
v = json.loads(strata("--json", "version").stdout)
check(v["package"].startswith("strata"), v)
p = strata("exports", env_socket=True)
lines = p.stdout.splitlines()
check(lines[0].split()[:3] == ["ID", "NAME", "NODE"] and "disk" in lines[1] and
      "8.0 MiB" in lines[1] and " rw " in lines[1] and img in lines[1], p.stdout)
ok("--help, version, exports (human and --json; $STRATA_SOCKET)")

p = strata("add-export", "more", img2, "--description", "more data", "--readonly")
check("export more" in p.stdout and "read-only" in p.stdout, p.stdout)
h = nbd.NBD()
h.connect_uri(dmn.uri("more"))
check(h.is_read_only() and h.pread(4096, 0) == b"\x02" * 4096, "served read-only")
exps = json.loads(strata("--json", "exports").stdout)
more = [e for e in exps if e["id"] == "more"][0]
check(more["description"] == "more data" and not more["writable"] and more["clients"] == 1, more)
p = strata("add-export", "more", img2, rc=1)
check("strata: blockdev-add: Duplicate nodes" in p.stderr, p.stderr)
p = strata("add-export", "x", img2, "--node-name", "xn", "--id", "disk", rc=1)
check("block-export-add: Block export id 'disk' is already in use" in p.stderr, p.stderr)
check("xn" not in strata("--json", "chain", "disk").stdout, "rolled back")
nodes = json.loads(subprocess.run([CLI, "--socket", ctl, "--json", "exports"],
                                  capture_output=True, text=True).stdout)
check(len(nodes) == 2, "the failed add-export left no export")
p = strata("add-export", "bad/name", img2, rc=2)
check("--id" in p.stderr, p.stderr)
ok("add-export: served; refusals exit 1 with the daemon's message; rolled back")

p = strata("chain", "more")
check("more" in p.stdout and "raw" in p.stdout and "read-only" in p.stdout and
      img2 in p.stdout, p.stdout)
chain = json.loads(strata("--json", "chain", "disk").stdout)
check(len(chain) == 1 and chain[0]["file"] == img and chain[0]["drv"] == "raw", chain)
p = strata("chain", "nothere", rc=1)
check("no export with id or name 'nothere'" in p.stderr, p.stderr)
ok("chain: human and --json; unknown export exit 1")

check(strata("jobs").stdout.strip() == "no jobs", "jobs")
check(json.loads(strata("--json", "jobs").stdout) == [], "jobs --json")
for verb in ("pause", "resume", "cancel", "complete", "dismiss"):
    p = strata("job", verb, "nojob", rc=1)
    check("Job not found" in p.stderr, p.stderr)
p = strata("job", "explode", "nojob", rc=2)
p = strata("commit", "disk", "--speed", "1000000", "--wait", rc=1)
check("block-commit: cannot commit an image into itself" in p.stderr, p.stderr)
p = strata("snapshot", "disk", os.path.join(d, "nodir", "s1.qcow2"), rc=1)
check("No such file or directory" in p.stderr, p.stderr)
check(not os.path.exists(os.path.join(d, "nodir")), "no file left behind")
ok("jobs, job verbs, commit and snapshot: exit 1 with the daemon's message")

p = strata("del-export", "more", rc=1)
check("still in use" in p.stderr, p.stderr)
p = strata("del-export", "more", "--hard")
check("export more deleted (and its node)" in p.stdout, p.stdout)
check([e["id"] for e in json.loads(strata("--json", "exports").stdout)] == ["disk"], "gone")
del h
ok("del-export: refused with a client, --hard drops it and removes the node")

p = strata(rc=2)
p = strata("frobnicate", rc=2)
check("unknown command 'frobnicate'" in p.stderr, p.stderr)
p = strata("chain", rc=2)
p = subprocess.run([CLI, "--socket", os.path.join(d, "nope.sock"), "exports"],
                   capture_output=True, text=True, timeout=30)
check(p.returncode == 2 and "cannot connect" in p.stderr and "--control" in p.stderr,
      p.stderr)
ok("usage errors and a missing socket: exit 2 with a hint")

p = strata("quit")
check("shutting down" in p.stdout, p.stdout)
dmn.proc.wait(15)
check(dmn.proc.returncode == 0, "exit status after quit")
ok("quit")
print("PASS")
