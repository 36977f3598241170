#!/usr/bin/python3
"""Statistics: QMP query-blockstats, `strata stats` and the Prometheus
endpoint (--metrics) count exactly what a real client did.

qemu-io sends a known set of requests (writes of known sizes, reads,
trims, write-zeroes, flushes, one out-of-range read); then query-blockstats
(QEMU's field names), `strata stats --json` and a curl scrape of /metrics
must give the same exact counts and bytes; `promtool check metrics`
accepts the page; the histograms are consistent (cumulative buckets,
+Inf = _count = requests); a scrape during a qemu-img convert sees the
counters grow and the client connected; a running block-commit shows its
progress; idle and half-open HTTP clients beyond the connection limit do
not stall NBD clients nor later scrapes; malformed requests (wrong
methods, paths outside /metrics, oversized lines and headers, garbage,
bad versions and lengths) and 100 seeded random mutations of a valid
request each get an error status or a close, and the daemon serves on.

Run:  STRATAD=build/daemon/stratad STRATA_CLI=build/contrib/strata \
      /usr/bin/python3 tests/integration/test-metrics.py
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import check, ok  # noqa: E402

harness.require_built()
harness.report_unexpected_exceptions()
harness.need("qemu-io", "qemu-img", "curl")

CLI = os.environ.get("STRATA_CLI") or os.path.join(
    os.path.dirname(harness.STRATAD), "..", "contrib", "strata")

MiB = 1 << 20
d = harness.tmpdir()
img = harness.make_file(os.path.join(d, "disk.img"), 64 * MiB)
ctl = os.path.join(d, "ctl.sock")
mport = harness.free_port()
probe = subprocess.run([harness.STRATAD, "--metrics", f"127.0.0.1:{mport}", "--run", "true",
                        "--export", f"file={img}"], capture_output=True, text=True,
                       timeout=60)
if "built without libmicrohttpd" in probe.stderr:
    harness.skip("stratad was built without libmicrohttpd")
dmn = harness.Daemon([f"name=disk,file={img},id=disk"],
                     extra=["--control", ctl, "--metrics", f"127.0.0.1:{mport}"])
q = harness.QMP(ctl)
URL = f"http://127.0.0.1:{mport}/metrics"


def scrape(url=URL):
    p = subprocess.run(["curl", "-sS", "--max-time", "10", "-D", "-", url],
                       capture_output=True, text=True, timeout=20)
    check(p.returncode == 0, f"curl {url}: {p.returncode} {p.stderr}")
    # text mode turned the CRLFs into LFs
    head, _, body = p.stdout.partition("\n\n")
    return head, body


def samples(body):
    """{(name, frozenset(labels)): value}"""
    out = {}
    for line in body.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$', line)
        check(m, f"unparsable sample line {line!r}")
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def val(s, name, **labels):
    key = (name, frozenset(labels.items()))
    check(key in s, f"no sample {name}{labels}")
    return s[key]


def blockstats():
    r = q.cmd("query-blockstats")
    check(len(r) == 1 and r[0]["device"] == "disk" and r[0]["node-name"] == "disk", r)
    return r[0]["stats"]


uri = dmn.uri("disk")

# ---- 1. nothing yet: zero everywhere ----
st = blockstats()
for k in ("rd_operations", "wr_operations", "flush_operations", "unmap_operations",
          "rd_bytes", "wr_bytes", "unmap_bytes", "failed_rd_operations",
          "failed_wr_operations", "failed_flush_operations",
          "failed_unmap_operations", "rd_total_time_ns", "wr_total_time_ns"):
    check(st[k] == 0, f"{k} = {st[k]} before any request")
check("idle_time_ns" not in st, "idle_time_ns before any request")
ok("query-blockstats: every counter 0 before the first request")

# ---- 2. a known workload ----
writes = [(0, 4096), (1 * MiB, 65536), (2 * MiB, 512), (3 * MiB, 1 * MiB),
          (8 * MiB, 131072)]
reads = [(0, 4096), (1 * MiB, 1 * MiB), (5 * MiB, 12288)]
cmds = []
for off, ln in writes:
    cmds += ["-c", f"write -P 0x5a {off} {ln}"]
for off, ln in reads:
    cmds += ["-c", f"read {off} {ln}"]
cmds += ["-c", f"discard {10 * MiB} {2 * MiB}", "-c", f"write -z {20 * MiB} {MiB}",
         "-c", "flush", "-c", "flush"]
p = subprocess.run(["qemu-io", "-f", "raw", *cmds, uri], capture_output=True,
                   text=True, timeout=60)
check(p.returncode == 0 and "error" not in p.stdout.lower(), p.stdout + p.stderr)
# one request the server refuses: a read past the end (libnbd sends it
# with strict checks off)
nbd = harness.nbd_handle()
nbd.set_strict_mode(0)
nbd.connect_uri(uri)
try:
    nbd.pread(4096, 64 * MiB)
    check(False, "a read past the end succeeded")
except Exception:
    pass
nbd.shutdown()

st = blockstats()
exp_wr_ops, exp_wr_bytes = len(writes), sum(n for _, n in writes)
exp_rd_ops, exp_rd_bytes = len(reads), sum(n for _, n in reads)
check(st["wr_operations"] == exp_wr_ops and st["wr_bytes"] == exp_wr_bytes,
      f"writes: {st['wr_operations']} ops {st['wr_bytes']} bytes, wanted "
      f"{exp_wr_ops} / {exp_wr_bytes}")
check(st["rd_operations"] == exp_rd_ops and st["rd_bytes"] == exp_rd_bytes,
      f"reads: {st['rd_operations']} ops {st['rd_bytes']} bytes, wanted "
      f"{exp_rd_ops} / {exp_rd_bytes}")
check(st["unmap_operations"] == 1 and st["unmap_bytes"] == 2 * MiB, st)
check(st["x_zero_operations"] == 1 and st["x_zero_bytes"] == MiB, st)
# qemu-io may flush when it closes the image: at least the two asked for
check(st["flush_operations"] >= 2, st)
check(st["invalid_rd_operations"] == 1 and st["failed_rd_operations"] == 0, st)
check(st["wr_highest_offset"] == 8 * MiB + 131072, st)
check(st["wr_total_time_ns"] > 0 and st["rd_total_time_ns"] > 0, st)
check("idle_time_ns" in st and st["idle_time_ns"] >= 0, st)
for h in ("rd_latency_histogram", "wr_latency_histogram", "flush_latency_histogram"):
    hist = st[h]
    check(len(hist["bins"]) == len(hist["boundaries"]) + 1, hist)
    check(hist["boundaries"] == sorted(hist["boundaries"]), hist)
check(sum(st["wr_latency_histogram"]["bins"]) == exp_wr_ops, st["wr_latency_histogram"])
check(sum(st["rd_latency_histogram"]["bins"]) == exp_rd_ops, st["rd_latency_histogram"])
ok(f"query-blockstats: {exp_wr_ops} writes / {exp_wr_bytes} bytes, {exp_rd_ops} reads / "
   f"{exp_rd_bytes} bytes, trim, zero, flushes, 1 invalid read: exact")

# ---- 3. strata stats ----
if os.path.exists(CLI):
    p = subprocess.run([CLI, "--socket", ctl, "--json", "stats", "disk"],
                       capture_output=True, text=True, timeout=30)
    check(p.returncode == 0, p.stderr)
    cli = json.loads(p.stdout)
    check(cli[0]["stats"]["wr_operations"] == exp_wr_ops and
          cli[0]["stats"]["wr_bytes"] == exp_wr_bytes, cli)
    p = subprocess.run([CLI, "--socket", ctl, "stats"], capture_output=True,
                       text=True, timeout=30)
    check(p.returncode == 0, p.stderr)
    rows = {ln.split()[0]: ln.split() for ln in p.stdout.splitlines()[2:] if ln.strip()}
    check(rows["write"][1] == str(exp_wr_ops) and rows["read"][1] == str(exp_rd_ops)
          and rows["read"][5] == "1", p.stdout)
    p = subprocess.run([CLI, "--socket", ctl, "stats", "nosuch"], capture_output=True,
                       text=True, timeout=30)
    check(p.returncode == 1 and "not found" in p.stderr, p.stderr)
    # --watch: a sample a second until interrupted
    w = subprocess.Popen([CLI, "--socket", ctl, "--json", "stats", "--watch"],
                         stdout=subprocess.PIPE, text=True)
    lines = [w.stdout.readline() for _ in range(2)]
    w.terminate()
    w.wait(10)
    check(all(json.loads(ln)[0]["device"] == "disk" for ln in lines), lines)
    ok("strata stats: the same counts (table and --json), unknown export "
       "exit 1, --watch samples")

# ---- 4. the Prometheus page ----
head, body = scrape()
check(head.startswith("HTTP/1.1 200"), head)
check(re.search(r"(?im)^content-type: text/plain; version=0\.0\.4", head), head)
s = samples(body)
check(val(s, "strata_requests_total", export="disk", op="write") == exp_wr_ops, body)
check(val(s, "strata_request_bytes_total", export="disk", op="write") == exp_wr_bytes, body)
check(val(s, "strata_requests_total", export="disk", op="read") == exp_rd_ops, body)
check(val(s, "strata_request_bytes_total", export="disk", op="read") == exp_rd_bytes, body)
check(val(s, "strata_requests_total", export="disk", op="trim") == 1, body)
check(val(s, "strata_request_bytes_total", export="disk", op="trim") == 2 * MiB, body)
check(val(s, "strata_request_invalid_total", export="disk", op="read") == 1, body)
check(val(s, "strata_request_errors_total", export="disk", op="write") == 0, body)
check(val(s, "strata_requests_in_flight", export="disk") == 0, body)
check(val(s, "strata_clients_connected") == 0, body)
for op in ("read", "write", "flush", "trim", "write_zeroes", "cache", "block_status"):
    buckets = sorted(((float("inf") if dict(k[1])["le"] == "+Inf" else float(dict(k[1])["le"])), v)
                     for k, v in s.items()
                     if k[0] == "strata_request_duration_seconds_bucket"
                     and dict(k[1])["op"] == op and dict(k[1])["export"] == "disk")
    check(len(buckets) > 10 and buckets[-1][0] == float("inf"), buckets)
    check(all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:])),
          f"{op}: buckets not cumulative: {buckets}")
    count = val(s, "strata_request_duration_seconds_count", export="disk", op=op)
    check(buckets[-1][1] == count == val(s, "strata_requests_total", export="disk", op=op),
          f"{op}: +Inf bucket {buckets[-1][1]}, _count {count}")
check(abs(val(s, "strata_request_duration_seconds_sum", export="disk", op="write")
          - st["wr_total_time_ns"] / 1e9) < 1e-6, body)
ok("/metrics: the same exact counts; histograms cumulative, +Inf = _count = requests")

if shutil.which("promtool"):
    p = subprocess.run(["promtool", "check", "metrics"], input=body,
                       capture_output=True, text=True, timeout=60)
    check(p.returncode == 0, f"promtool check metrics: {p.stdout}{p.stderr}")
    ok("promtool check metrics accepts the page")
else:
    print("note: promtool not installed (Debian package prometheus): not checked")

head, _ = scrape(f"http://127.0.0.1:{mport}/other")
check(head.startswith("HTTP/1.1 404"), head)
p = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                    "--max-time", "10", URL], capture_output=True, text=True, timeout=20)
check(p.stdout == "405", p.stdout)
ok("other paths 404, other methods 405")

# ---- 5. scrapes while a client works ----
src = harness.make_file(os.path.join(d, "src.raw"), 48 * MiB, b"\x33")
conv = subprocess.Popen(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw",
                         src, uri],
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
seen_client = False
last = val(s, "strata_request_bytes_total", export="disk", op="write")
grew = 0
deadline = time.time() + 60
while conv.poll() is None and time.time() < deadline:
    s2 = samples(scrape()[1])
    now_b = val(s2, "strata_request_bytes_total", export="disk", op="write")
    check(now_b >= last, "a counter went backwards")
    grew += now_b > last
    last = now_b
    seen_client |= val(s2, "strata_export_clients", export="disk") >= 1
    time.sleep(0.05)
check(conv.wait(60) == 0, conv.stderr.read().decode())
st2 = blockstats()
s2 = samples(scrape()[1])
check(val(s2, "strata_request_bytes_total", export="disk", op="write") == st2["wr_bytes"]
      and st2["wr_bytes"] >= exp_wr_bytes + 48 * MiB, st2)
check(val(s2, "strata_export_clients", export="disk") == 0, "client still counted")
ok(f"scrapes during qemu-img convert: counters monotonic, grew in {grew} scrapes, "
   f"client seen={seen_client}; final page = query-blockstats")

# ---- 6. HTTP clients that hang do not stall the loop ----
idle = []
for _ in range(20):
    c = socket.create_connection(("127.0.0.1", mport), timeout=5)
    idle.append(c)
half = socket.create_connection(("127.0.0.1", mport), timeout=5)
half.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
t0 = time.time()
p = subprocess.run(["qemu-io", "-f", "raw", "-c", "read 0 4096", uri],
                   capture_output=True, text=True, timeout=30)
check(p.returncode == 0, p.stdout + p.stderr)
for c in idle:
    c.close()
half.close()
# the server dropped or answered them; a new scrape works
deadline = time.time() + 30
while True:
    p = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                        "--max-time", "5", URL], capture_output=True, text=True, timeout=20)
    if p.stdout == "200":
        break
    check(time.time() < deadline, f"no scrape after idle clients left: {p.stdout} {p.stderr}")
    time.sleep(0.2)
ok("21 idle or half-open HTTP clients: NBD reads still served, scrapes work after")


# ---- 6b. hostile HTTP: malformed requests get an error or a close ----
def raw_http(data, timeout=10):
    """Sends DATA, half-closes, returns everything the server answers
    (b"" when it only closes)."""
    c = socket.create_connection(("127.0.0.1", mport), timeout=timeout)
    try:
        try:
            c.sendall(data)
            c.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server closed first (a request it refused early)
        out = b""
        while True:
            try:
                b = c.recv(65536)
            except (OSError, socket.timeout):
                break
            if not b:
                break
            out += b
        return out
    finally:
        c.close()


def status(resp):
    line = resp.split(b"\r\n", 1)[0]
    return int(line.split()[1]) if line.startswith(b"HTTP/1.") and len(line.split()) > 1 else None


cases = [
    (b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", {405}),
    (b"DELETE /metrics HTTP/1.1\r\nHost: x\r\n\r\n", {405}),
    (b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", {404}),
    (b"GET /metrics?x=" + b"A" * 100000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", {None, 414, 400, 431}),
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"B" * 200000 + b"\r\n\r\n",
     {None, 400, 413, 431}),
    (b"GET /metrics HTTP/1.1\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(5000)) + b"\r\n",
     {None, 400, 413, 431}),
    (b"\x00\xff\x16\x03\x01garbage\r\n\r\n", {None, 400}),
    (b"GET /metrics HTTP/9.9\r\n\r\n", {None, 400, 505}),
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", {None, 400, 200}),
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", {None, 400}),
    (b"\r\n" * 5000, {None, 400}),
]
for data, want in cases:
    got = status(raw_http(data))
    check(got in want, f"{data[:60]!r}...: status {got}, wanted one of {want}")
    check(dmn.proc.poll() is None, f"stratad exited after {data[:60]!r}")
# seeded random mutations of a valid request, bounded in number
import random  # noqa: E402
rng = random.Random(20261203)
valid = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n"
for i in range(100):
    b = bytearray(valid)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(3)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and len(b) > 1:
            del b[min(pos, len(b) - 1)]
        elif op == 1:
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        else:
            b[min(pos, len(b) - 1)] = rng.randrange(256)
    got = status(raw_http(bytes(b), timeout=5))
    check(got in (None, 200, 400, 404, 405, 413, 414, 431, 501, 505),
          f"mutation {i} {bytes(b)!r}: status {got}")
check(dmn.proc.poll() is None, "stratad exited during the mutated requests")
p = subprocess.run(["qemu-io", "-f", "raw", "-c", "read 0 4096", uri],
                   capture_output=True, text=True, timeout=30)
check(p.returncode == 0, p.stdout + p.stderr)
head, body = scrape()
check(head.startswith("HTTP/1.1 200") and "strata_request_bytes_total" in body,
      f"scrape after hostile requests: {head}")
ok(f"{len(cases)} malformed HTTP requests and 100 seeded mutations: each answered "
   "with an error status or closed; NBD and scrapes still served")

# ---- 7. a job's progress ----
base = os.path.join(d, "base.qcow2")
top = os.path.join(d, "top.qcow2")
subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "32M"], check=True)
subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 16M", base], check=True,
               capture_output=True)
subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2",
                top], check=True)
subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 8 0 8M", top], check=True,
               capture_output=True)
q.cmd("blockdev-add", driver="qcow2", node_name="chain",
      file={"driver": "file", "filename": top})
q.cmd("block-export-add", type="nbd", id="chainexp", node_name="chain", writable=True)
q.cmd("block-commit", device="chainexp", job_id="cj", speed=1 * MiB)
deadline = time.time() + 30
while True:
    s3 = samples(scrape()[1])
    keys = [k for k in s3 if k[0] == "strata_job_progress_bytes"]
    if keys:
        labels = dict(keys[0][1])
        check(labels["job"] == "cj" and labels["type"] == "commit", labels)
        tot = val(s3, "strata_job_total_bytes", job="cj", type="commit")
        cur = val(s3, "strata_job_progress_bytes", job="cj", type="commit")
        if tot > 0:
            break
    check(time.time() < deadline, "no job progress in the metrics")
    time.sleep(0.1)
jobs = {j["id"]: j for j in q.cmd("query-jobs")}
check(jobs["cj"]["total-progress"] >= tot and cur <= tot, (jobs, cur, tot))
check(any(k[0] == "strata_job_status" and dict(k[1]).get("job") == "cj" for k in s3), s3)
check(("strata_requests_total", frozenset({("export", "chainexp"), ("op", "read")})) in s3,
      "the new export has no series")
q.cmd("block-job-cancel", device="cj", force=True)
q.wait_event("BLOCK_JOB_CANCELLED", timeout=30)
ok(f"a running block-commit: progress {int(cur)}/{int(tot)} bytes, status, "
   f"and the new export's series")

code = dmn.stop()
check(code == 0, f"stratad exited with {code}")
ok("stratad stopped cleanly")
