#!/usr/bin/python3
"""The strata CLI: outputs and exit codes against a real stratad.

version, exports, add-export (+ libnbd reads what it serves), chain,
--json output parsed, jobs, job verbs on a missing job (exit 1 with the
daemon's message), snapshot and commit refused
(exit 1 with the daemon's message; test-jobs-live.py runs them for real), del-export (refused with a client unless --hard), usage errors
and a missing socket (exit 2 with a hint), quit.

create and info, judged by qemu-img: images strata creates (raw, qcow2,
qcow2 on a backing file with and without a size, qcow2 with 512-byte, 4 KiB
and 2 MiB clusters, written through stratad and compared with QEMU's
writes into an image of the same cluster size) are what
`qemu-img info --output=json` says they are (format, virtual size,
backing file and its format) and pass `qemu-img check`, also after QEMU
wrote to them; `strata info FILE` agrees with `qemu-img info
--backing-chain` layer by layer, options included, on images qemu-img
made with other options; `strata info EXPORT` (the daemon's view) names
the same chain; refusals (an existing file is never overwritten, an
a cluster size that is no power of two or too small
for the size or the backing name, a raw image with a backing file, bad sizes)
exit 2 or 1 with a message and leave nothing behind.

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
harness.need("qemu-img", "qemu-io")
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

# ---- create and info, against qemu-img ----
imgs = os.path.join(d, "imgs")
os.mkdir(imgs)


def at(name):
    return os.path.join(imgs, name)


def qinfo(path, chain=False):
    argv = ["qemu-img", "info", "--output=json", "-U"] + (["--backing-chain"] if chain else []) + [path]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    check(p.returncode == 0, f"qemu-img info {path}: {p.stderr}")
    return json.loads(p.stdout)


def qcheck(path):
    p = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True, timeout=60)
    check(p.returncode == 0 and "No errors were found" in p.stdout,
          f"qemu-img check {path}: exit {p.returncode}\n{p.stdout}{p.stderr}")


p = strata("create", at("base.raw"), "8M", "--format", "raw")
check(p.stdout.strip() == f"created {at('base.raw')}: raw, 8.0 MiB (8388608 bytes)", p.stdout)
q = qinfo(at("base.raw"))
check(q["format"] == "raw" and q["virtual-size"] == 8 * MiB, q)
check(os.stat(at("base.raw")).st_blocks == 0, "a new raw image is sparse")
# no SIZE: the backing file's; the backing name recorded as given
c = json.loads(strata("--json", "create", at("mid.qcow2"), "--backing", "base.raw").stdout)
check(c["format"] == "qcow2" and c["virtual-size"] == 8 * MiB and
      c["backing-filename"] == "base.raw" and c["backing-filename-format"] == "raw", c)
strata("create", at("top.qcow2"), "16777216", "--backing", at("mid.qcow2"),
       "--cluster-size", "64K")
strata("create", at("plain.qcow2"), "1G")
for name, size, bf, bfmt in (("mid.qcow2", 8 * MiB, "base.raw", "raw"),
                             ("top.qcow2", 16 * MiB, at("mid.qcow2"), "qcow2"),
                             ("plain.qcow2", 1024 * MiB, None, None)):
    q = qinfo(at(name))
    check(q["format"] == "qcow2" and q["virtual-size"] == size and
          q.get("backing-filename") == bf and q.get("backing-filename-format") == bfmt and
          q["cluster-size"] == 65536 and q["format-specific"]["data"]["compat"] == "1.1", q)
    qcheck(at(name))
ok("create: raw, qcow2, qcow2 on a backing file (size given or the backing's): "
   "qemu-img info agrees, qemu-img check clean")

# QEMU writes through the chain; the images stay clean and read back
for cmd, img_ in (("write -P 0x11 0 1M", "base.raw"), ("write -P 0x22 1M 1M", "mid.qcow2"),
                  ("write -P 0x33 2M 64k", "top.qcow2"), ("write -z 8M 4M", "top.qcow2")):
    fmt = "raw" if img_.endswith(".raw") else "qcow2"
    p = subprocess.run(["qemu-io", "-f", fmt, "-c", cmd, at(img_)],
                       capture_output=True, text=True, timeout=60)
    check(p.returncode == 0 and "error" not in p.stdout.lower(), f"qemu-io {cmd}: {p.stdout}{p.stderr}")
for name in ("mid.qcow2", "top.qcow2"):
    qcheck(at(name))
p = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 1M 1M",
                    "-c", "read -P 0x33 2M 64k", "-c", "read -P 0 8M 8M", at("top.qcow2")],
                   capture_output=True, text=True, timeout=60)
check(p.returncode == 0 and "fail" not in p.stdout.lower(), p.stdout + p.stderr)
ok("QEMU writes into each layer and reads the chain back; qemu-img check clean")

# other cluster sizes: qemu-img agrees, and stratad allocates in them
# (small clusters take several refcount blocks and more as the image
# grows) with the same bytes as QEMU writing an image of the same cluster
# size (a 4k discard inside a 2 MiB cluster is QEMU's no-op too)
io_cmds = ["write -P 0x41 0 1M", "write -P 0x42 3M 4k", "write -P 0x43 17M 65k",
           "write -z 20M 1M", "write -P 0x44 31M 1M", "discard 3M 4k"]


def qemu_io(target, fmt):
    p = subprocess.run(["qemu-io", "-f", fmt] + [a for c in io_cmds for a in ("-c", c)] +
                       [target], capture_output=True, text=True, timeout=120)
    check(p.returncode == 0 and "error" not in p.stdout.lower(),
          f"qemu-io on {target}: {p.stdout}{p.stderr}")


for cs, name in ((512, "c512.qcow2"), (4096, "c4k.qcow2"), (2 * MiB, "c2m.qcow2")):
    strata("create", at(name), "32M", "--cluster-size", str(cs))
    q = qinfo(at(name))
    check(q["cluster-size"] == cs and q["virtual-size"] == 32 * MiB, q)
    qcheck(at(name))
    ref = at("ref-" + name)
    p = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}",
                        ref, "32M"], capture_output=True, text=True, timeout=60)
    check(p.returncode == 0, p.stderr)
    qemu_io(ref, "qcow2")
    strata("add-export", name, at(name), "--format", "qcow2")
    qemu_io(dmn.uri(name), "raw")
    strata("del-export", name)
    qcheck(at(name))
    p = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", at(name), ref],
                       capture_output=True, text=True, timeout=60)
    check(p.returncode == 0, f"{name} against QEMU's: {p.stdout}{p.stderr}")
    os.unlink(ref)
# a 1 GiB image in 512-byte clusters starts with an L1 table of 512
# clusters, counted by more than one refcount block
strata("create", at("c512big.qcow2"), "1G", "--cluster-size", "512")
check(qinfo(at("c512big.qcow2"))["cluster-size"] == 512, "c512big")
qcheck(at("c512big.qcow2"))
# on a backing file, with the backing name in the one 512-byte header cluster
strata("create", at("c512top.qcow2"), "--backing", "c512.qcow2", "--cluster-size", "512")
q = qinfo(at("c512top.qcow2"))
check(q["cluster-size"] == 512 and q["backing-filename"] == "c512.qcow2", q)
qcheck(at("c512top.qcow2"))
ok("create --cluster-size 512, 4k, 2M: qemu-img agrees; stratad's writes into them "
   "match QEMU's and pass qemu-img check")


def same_layers(mine, theirs, where):
    check(len(mine) == len(theirs), f"{where}: {len(mine)} layers, qemu-img {len(theirs)}")
    for m, t in zip(mine, theirs):
        check(os.path.realpath(m["filename"]) == os.path.realpath(t["filename"]) and
              m["format"] == t["format"] and m["virtual-size"] == t["virtual-size"] and
              m.get("backing-filename") == t.get("backing-filename") and
              m.get("backing-filename-format") == t.get("backing-filename-format"),
              f"{where}: strata {m}\nqemu-img {t}")


info = json.loads(strata("--json", "info", at("top.qcow2")).stdout)
theirs = qinfo(at("top.qcow2"), chain=True)
same_layers(info["chain"], theirs, "info FILE")
for m, t in zip(info["chain"], theirs):
    check(m.get("cluster-size") == t.get("cluster-size") and
          m.get("actual-size") == t.get("actual-size"), f"sizes: {m} {t}")
    if t["format"] == "qcow2":
        td, md = t["format-specific"]["data"], m["format-specific"]["data"]
        for k in ("compat", "lazy-refcounts", "refcount-bits", "corrupt", "extended-l2",
                  "compression-type"):
            check(md[k] == td[k], f"{k}: strata {md[k]}, qemu-img {td[k]}")
# images made by qemu-img with other options
variants = [("small.qcow2", ["-o", "cluster_size=4096,refcount_bits=64,lazy_refcounts=on"]),
            ("ext.qcow2", ["-o", "extended_l2=on,compression_type=zstd"]),
            ("old.qcow2", ["-o", "compat=0.10"]),
            ("over.qcow2", ["-b", "top.qcow2", "-F", "qcow2"])]
for name, opts in variants:
    p = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2"] + opts + [at(name), "32M"],
                       capture_output=True, text=True, timeout=60)
    check(p.returncode == 0, p.stderr)
    info = json.loads(strata("--json", "info", at(name)).stdout)
    theirs = qinfo(at(name), chain=True)
    same_layers(info["chain"], theirs, name)
    td, md = theirs[0]["format-specific"]["data"], info["chain"][0]["format-specific"]["data"]
    check(info["chain"][0]["cluster-size"] == theirs[0]["cluster-size"], name)
    for k in td:
        if k in md:
            check(md[k] == td[k], f"{name} {k}: strata {md[k]}, qemu-img {td[k]}")
p = strata("info", at("over.qcow2"))
for want in (at("over.qcow2"), "format: qcow2 (top)", "virtual size: 32.0 MiB (33554432 bytes)",
             "backing file: top.qcow2 (format qcow2)", "backing file: base.raw (format raw)",
             "format: raw (base)", "cluster size 65536, compat 1.1"):
    check(want in p.stdout, f"{want!r} not in:\n{p.stdout}")
ok("info FILE: the chain, sizes and options as qemu-img info --backing-chain "
   "gives them (5 images, 4 layouts), human and --json")

# the daemon's view of an export of that chain
strata("add-export", "layered", at("top.qcow2"), "--format", "qcow2", "--readonly")
info = json.loads(strata("--json", "info", "layered").stdout)
check(info["export"]["id"] == "layered" and not info["export"]["writable"], info["export"])
layers = info["chain"]
check([os.path.realpath(x["filename"]) for x in layers] ==
      [os.path.realpath(t["filename"]) for t in qinfo(at("top.qcow2"), chain=True)] and
      [x["format"] for x in layers] == ["qcow2", "qcow2", "raw"] and
      [x["virtual-size"] for x in layers] == [16 * MiB, 8 * MiB, 8 * MiB] and
      all(x["read-only"] for x in layers), layers)
check(layers[0]["backing-filename-format"] == "qcow2" and
      layers[1]["backing-filename-format"] == "raw", layers)
p = strata("info", "layered")
check("export layered: NBD name 'layered', read-only" in p.stdout and
      "node: layered.backing.backing, read-only" in p.stdout, p.stdout)
strata("del-export", "layered")
p = strata("info", "nothere", rc=1)
check("no export with id or name 'nothere'" in p.stderr, p.stderr)
ok("info EXPORT: the daemon's chain of the export, human and --json")

before = open(at("mid.qcow2"), "rb").read()
p = strata("create", at("mid.qcow2"), "1M", rc=1)
check("already exists" in p.stderr and open(at("mid.qcow2"), "rb").read() == before, p.stderr)
p = strata("create", at("cs.qcow2"), "4T", "--cluster-size", "512", rc=1)
check("too large for 512-byte clusters" in p.stderr, p.stderr)
p = strata("create", at("cs.qcow2"), "1M", "--cluster-size", "512", "--backing",
           "b" * 400 + ".raw", rc=1)
p = strata("create", at("cs.qcow2"), "1M", "--cluster-size", "3000", rc=2)
check("power of two" in p.stderr, p.stderr)
p = strata("create", at("cs.raw"), "1M", "--format", "raw", "--backing", "base.raw", rc=2)
p = strata("create", at("cs.qcow2"), "12X", rc=2)
check("SIZE 12X" in p.stderr, p.stderr)
p = strata("create", at("cs.qcow2"), rc=2)
check("SIZE is required" in p.stderr, p.stderr)
p = strata("create", at("cs.qcow2"), "--backing", "missing.raw", rc=1)
p = strata("create", at("cs.qcow2"), "1M", "--format", "vmdk", rc=2)
p = strata("create", os.path.join(d, "nodir", "x.qcow2"), "1M", rc=1)
check(not any(n.startswith("cs.") for n in os.listdir(imgs)), os.listdir(imgs))
ok("create refusals: exit 1 or 2 with a message, nothing overwritten or left behind")

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
