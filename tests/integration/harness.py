"""strata integration-test harness.

Starts the real stratad (path in $STRATAD, set by meson) with a pid file and
a unix socket in a private temporary directory, waits until it serves, and
stops it at exit.  Tests are plain scripts: exit 0 = pass, 1 = fail,
77 = skipped (meson reports it as such).  Every test is bounded in time.

Run one by hand:  STRATAD=build/daemon/stratad /usr/bin/python3 tests/integration/test-x.py
"""
import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

SKIP = 77

STRATAD = os.environ.get("STRATAD") or os.path.join(
    os.path.dirname(__file__), "..", "..", "build", "daemon", "stratad")


def skip(why):
    print("SKIP:", why)
    sys.exit(SKIP)


def fail(msg):
    print("FAIL:", msg)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


def need(*programs):
    for p in programs:
        if shutil.which(p) is None:
            skip(f"{p} is not installed")


# ---- checks shared by the tests ----

T0 = time.time()
_LAST = ["start"]
FAILURES = []


def require_built():
    if not os.path.exists(STRATAD):
        skip(f"{STRATAD} is not built")


def ok(msg):
    _LAST[0] = msg
    print(f"ok   {time.time() - T0:5.1f}s  {msg}", flush=True)


def _excepthook(typ, val, tb):
    import traceback
    traceback.print_exception(typ, val, tb)
    print(f"FAIL: unexpected {typ.__name__}: {val} (in the check after: {_LAST[0]!r})")
    sys.stdout.flush()
    # returning lets Python exit with status 1 and run the atexit cleanups


def report_unexpected_exceptions():
    sys.excepthook = _excepthook


def first_diff(a, b):
    """Index of the first differing byte, or None if equal."""
    n = min(len(a), len(b))
    for i in range(0, n, 65536):
        if a[i:i + 65536] != b[i:i + 65536]:
            for j in range(i, min(i + 65536, n)):
                if a[j] != b[j]:
                    return j
    return n if len(a) != len(b) else None


def check_soft(cond, msg):
    """A failed check that does not stop later ones: reported now, and
    finish_soft_checks() fails the test with all of them."""
    if not cond:
        print("FAIL (continuing):", msg)
        FAILURES.append(msg)
    return cond


def check_hard(cond, msg):
    """A failed check that stops the test (with earlier soft failures)."""
    if not cond:
        if FAILURES:
            msg += "\n  earlier failures:\n  " + "\n  ".join(FAILURES)
        fail(msg)


def finish_soft_checks():
    if FAILURES:
        fail(f"{len(FAILURES)} check(s) failed:\n  " + "\n  ".join(FAILURES))


def tmpdir():
    d = tempfile.mkdtemp(prefix="strata-test-")
    atexit.register(shutil.rmtree, d, True)
    return d


def make_file(path, size, pattern=None):
    """Creates a file of `size` bytes: sparse if pattern is None, else
    filled by repeating `pattern` (bytes)."""
    with open(path, "wb") as f:
        if pattern is None:
            f.truncate(size)
        else:
            chunk = (pattern * (1 + (1 << 20) // len(pattern)))[: 1 << 20]
            left = size
            while left > 0:
                n = min(left, len(chunk))
                f.write(chunk[:n])
                left -= n
    return path


def mapped_ceph_libs(pid):
    """The librbd, librados and libceph-common files mapped into process
    pid (from /proc/PID/maps), sorted: stratad loads them only when it
    opens its first rbd: export."""
    names = set()
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split(None, 5)
            if len(fields) == 6:
                name = os.path.basename(fields[5].strip())
                if name.startswith(("librbd.so", "librados.so", "libceph-common.so")):
                    names.add(name)
    return sorted(names)


def _die_with_parent():
    """Runs in the child before exec: SIGKILL it if the test process dies,
    so a killed test never leaves a daemon behind."""
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Daemon:
    """A running stratad.  `exports` is a list of --export strings, e.g.
    ["name=disk,file=/tmp/x.img,format=raw"].  By default it listens on a
    unix socket only; pass tcp=True to also listen on 127.0.0.1:<free port>.
    """

    def __init__(self, exports, tcp=False, extra=(), timeout=10):
        self.dir = tmpdir()
        self.sock = os.path.join(self.dir, "nbd.sock")
        self.pidfile = os.path.join(self.dir, "stratad.pid")
        self.port = free_port() if tcp else None
        args = [STRATAD, "--listen", "unix:" + self.sock,
                "--pid-file", self.pidfile]
        if tcp:
            args += ["--listen", f"127.0.0.1:{self.port}"]
        for e in exports:
            args += ["--export", e]
        args += list(extra)
        # STRATAD_THREADS=N: every daemon of the test runs with --threads N
        # (the suite's "-threads2" variants), unless the test chose itself
        threads = os.environ.get("STRATAD_THREADS")
        if threads and "--threads" not in args:
            args += ["--threads", threads]
        self.log = open(os.path.join(self.dir, "stratad.log"), "w+")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent)
        # atexit runs in reverse order: stop first, then read the log
        atexit.register(self.check_sanitizers)
        atexit.register(self.stop)
        deadline = time.time() + timeout
        while not os.path.exists(self.pidfile):
            if self.proc.poll() is not None:
                fail(f"stratad exited with {self.proc.returncode}:\n{self.logtext()}")
            if time.time() > deadline:
                fail("stratad did not start in time:\n" + self.logtext())
            time.sleep(0.02)

    def uri(self, name="", tcp=False):
        if tcp:
            return f"nbd://127.0.0.1:{self.port}/{name}"
        return f"nbd+unix:///{name}?socket={self.sock}"

    def logtext(self):
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def check_sanitizers(self):
        """Fails the test if the daemon's log holds an ASan/UBSan/LSan
        report (the suite runs under sanitizers; a report is a bug even
        when every client-side check passed)."""
        text = self.logtext()
        for marker in ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer",
                       "runtime error:"):
            if marker in text:
                print(text[-20000:])
                print(f"FAIL: sanitizer report in the stratad log ({marker})")
                os._exit(1)

    def alive(self):
        return self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=30):
        """Stops the daemon; returns its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                fail("stratad did not stop within %ds" % timeout)
        return self.proc.returncode


def start_qsd(ctl, nbd_sock, args=(), program="qemu-storage-daemon", timeout=15):
    """qemu-storage-daemon with a QMP monitor on the unix socket ctl and an
    NBD server on nbd_sock, plus args; killed at exit.  Returns once both
    sockets exist (fails the test if it exits or takes longer)."""
    proc = subprocess.Popen(
        [program, "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
         "--chardev", f"socket,path={ctl},server=on,wait=off,id=mon",
         "--monitor", "chardev=mon", *args],  # --export needs the server first
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_die_with_parent)

    def stop():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    atexit.register(stop)
    deadline = time.time() + timeout
    while not (os.path.exists(ctl) and os.path.exists(nbd_sock)):
        if proc.poll() is not None:
            fail(f"qemu-storage-daemon exited with {proc.returncode}: "
                 f"{proc.stderr.read().decode(errors='replace')}")
        check(time.time() < deadline, "qemu-storage-daemon did not start in time")
        time.sleep(0.05)
    return proc


def rss_kib(pid):
    """Resident set size of a process, in KiB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def nbd_handle():
    """A libnbd handle, or skip when python3-libnbd is missing."""
    try:
        import nbd  # noqa: F401
    except ImportError:
        skip("python3-libnbd is not installed (run with /usr/bin/python3)")
    import nbd
    return nbd.NBD()


# ---- QMP (the control socket) ----

class QMPError(Exception):
    def __init__(self, err):
        super().__init__(f"{err.get('class')}: {err.get('desc')}")
        self.cls = err.get("class")
        self.desc = err.get("desc")


class QMP:
    """A minimal QMP client speaking the protocol as QEMU's qtest/iotests
    do: read the greeting, negotiate, then one command at a time, keeping
    the events that arrive meanwhile in self.events."""

    def __init__(self, path, negotiate=True, timeout=30):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        self.events = []
        self.greeting = self.recv()
        if negotiate:
            self.cmd("qmp_capabilities")

    def send_raw(self, data):
        self.sock.sendall(data)

    def recv(self):
        """The next message (dict); raises EOFError when the daemon closed."""
        import json
        while b"\n" not in self.buf:
            d = self.sock.recv(65536)
            if not d:
                raise EOFError("control connection closed")
            self.buf += d
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, name, args=None, id=None):
        """Sends a command; returns the whole reply message."""
        import json
        m = {"execute": name}
        if args is not None:
            m["arguments"] = args
        if id is not None:
            m["id"] = id
        self.send_raw(json.dumps(m).encode() + b"\n")
        while True:
            r = self.recv()
            if "event" in r:
                self.events.append(r)
                continue
            return r

    def cmd(self, name, /, **args):
        """Runs a command (keyword arguments with '_' for '-'); returns its
        'return' or raises QMPError."""
        a = {k.replace("_", "-"): v for k, v in args.items()}
        r = self.execute(name, a if a else None)
        if "error" in r:
            raise QMPError(r["error"])
        return r["return"]

    def error(self, name, /, **args):
        """Runs a command that must fail; returns (class, desc)."""
        try:
            self.cmd(name, **args)
        except QMPError as e:
            return e.cls, e.desc
        fail(f"{name} {args} succeeded but should have failed")

    def wait_event(self, name, timeout=10, match=None):
        deadline = time.time() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev["event"] == name and (match is None or match(ev.get("data", {}))):
                    return self.events.pop(i)
            left = deadline - time.time()
            if left <= 0:
                fail(f"no {name} event within {timeout}s (have {[e['event'] for e in self.events]})")
            self.sock.settimeout(left)
            try:
                r = self.recv()
            except socket.timeout:
                continue
            finally:
                self.sock.settimeout(30)
            if "event" in r:
                self.events.append(r)

    def close(self):
        self.sock.close()


def daemon_uring_disabled(disable, exports, **kw):
    """A Daemon started with STRATA_URING_DISABLE=disable (io_uring extras
    the loop must not use; empty or None: all of them on).  The variable
    is set for the start only, not for later daemons."""
    if disable:
        os.environ["STRATA_URING_DISABLE"] = disable
    else:
        os.environ.pop("STRATA_URING_DISABLE", None)
    try:
        return Daemon(exports, **kw)
    finally:
        os.environ.pop("STRATA_URING_DISABLE", None)
