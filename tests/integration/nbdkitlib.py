"""nbdkit with strata's plugin or filter, for the integration tests.

The plugin and the filter are found through STRATA_NBDKIT_PLUGIN and
STRATA_NBDKIT_FILTER (set by meson to the built modules).  In a sanitizer
build the modules need the sanitizer runtimes, which nbdkit itself does
not link: meson passes them in STRATA_NBDKIT_PRELOAD and they are preloaded.
Every nbdkit runs in the foreground (-f) on a unix socket, dies with the
test (--exit-with-parent, PR_SET_PDEATHSIG), and is stopped with SIGTERM
within a bounded time: a hang at exit fails the test instead of hanging it.
"""
import atexit
import os
import shutil
import signal
import socket
import subprocess
import time

import harness
from harness import fail, skip

PLUGIN = os.environ.get("STRATA_NBDKIT_PLUGIN", "")
FILTER = os.environ.get("STRATA_NBDKIT_FILTER", "")
PRELOAD = os.environ.get("STRATA_NBDKIT_PRELOAD", "")


def need_plugin():
    harness.need("nbdkit")
    if not PLUGIN or not os.path.exists(PLUGIN):
        skip("the nbdkit plugin was not built (nbdkit-plugin-dev missing)")


def need_filter():
    harness.need("nbdkit")
    if not FILTER or not os.path.exists(FILTER):
        skip("the nbdkit filter was not built (nbdkit-plugin-dev missing)")


def run_failing(args, timeout=30):
    """Runs nbdkit ARGS expecting it to refuse to start; returns (exit
    status, output).  Under a preloaded libasan a refused start may stick
    in libc's exit handlers (see Nbdkit.stop): the output is what counts,
    and the process is killed once it has said it."""
    p = subprocess.Popen(["nbdkit", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=env(),
                         preexec_fn=harness._die_with_parent)
    try:
        out, _ = p.communicate(timeout=timeout if not PRELOAD else 10)
    except subprocess.TimeoutExpired:
        if not PRELOAD:
            p.kill()
            p.communicate()
            fail(f"nbdkit {' '.join(args)}: did not exit within {timeout} s")
        p.kill()
        out, _ = p.communicate()
        return 1, out
    return p.returncode, out


def env():
    e = dict(os.environ)
    if PRELOAD:
        e["LD_PRELOAD"] = PRELOAD
        # nbdkit's own allocations are not ours to judge; the plugin's
        # memory errors still abort (ASan), and UBSan still halts.
        e["ASAN_OPTIONS"] = (e.get("ASAN_OPTIONS", "") +
                             ":detect_leaks=0:verify_asan_link_order=0")
    return e


class Nbdkit:
    """nbdkit -f -U SOCK ARGS... (args: [--filter=..., plugin, key=value...])."""

    def __init__(self, args, timeout=30, label="nbdkit"):
        self.dir = harness.tmpdir()
        self.sock = os.path.join(self.dir, "nbdkit.sock")
        self.label = label
        self.args = ["nbdkit", "-f", "-v", "--exit-with-parent", "-U", self.sock, *args]
        self.log = open(os.path.join(self.dir, "nbdkit.log"), "w+")
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env(), preexec_fn=harness._die_with_parent)
        atexit.register(self.check_sanitizers)
        atexit.register(self.kill)
        deadline = time.time() + timeout
        while not self._listening():
            if self.proc.poll() is not None:
                fail(f"{label} exited with {self.proc.returncode}: {' '.join(self.args)}\n"
                     + self.logtext()[-4000:])
            if time.time() > deadline:
                fail(f"{label} did not start in time:\n" + self.logtext()[-4000:])
            time.sleep(0.02)

    def _listening(self):
        if not os.path.exists(self.sock):
            return False
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(self.sock)
            return True
        except OSError:
            return False
        finally:
            s.close()

    def uri(self):
        return f"nbd+unix:///?socket={self.sock}"

    def logtext(self):
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def errors(self):
        """The log without nbdkit's debug lines."""
        return "\n".join(l for l in self.logtext().splitlines()
                         if "debug:" not in l)

    def check_sanitizers(self):
        text = self.logtext()
        for marker in ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer",
                       "runtime error:"):
            if marker in text:
                print(text[-20000:])
                print(f"FAIL: sanitizer report in the {self.label} log ({marker})")
                os._exit(1)

    def _stacks(self):
        """Every thread's stack of the running nbdkit (gdb), for a report."""
        if not shutil.which("gdb"):
            return ""
        try:
            p = subprocess.run(["gdb", "-p", str(self.proc.pid), "-batch", "-ex",
                                "thread apply all bt", "-ex", "p __libc_setlocale_lock"], capture_output=True, text=True,
                               timeout=60)
        except subprocess.TimeoutExpired:
            return "\n(gdb timed out)"
        return "\nthreads:\n" + "\n".join(l for l in p.stdout.splitlines()
                                          if l.startswith(("#", "Thread", "$")))

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout=20):
        """SIGTERM, then at most timeout seconds for a clean exit (the
        plugin's cleanup: final flush, chain closed, loop thread joined).
        Returns the exit status; a hang fails the test."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.time() + timeout
            unloaded_at = None
            while self.proc.poll() is None:
                if PRELOAD and unloaded_at is None and "strata: unloaded" in self.logtext():
                    unloaded_at = time.time()
                if unloaded_at is not None and time.time() > unloaded_at + 2:
                    # The known defect of a preloaded libasan: it leaves
                    # glibc's setlocale lock unbalanced from the start
                    # (nbdkit's memory plugin shows it as well), and
                    # p11-kit's destructor can then block in freelocale at
                    # exit.  The plugin's cleanup and unload ran to their
                    # end (its last debug line), which is what is tested.
                    print(f"note: {self.label}: stuck in libc's exit handlers after the "
                          f"plugin's unload (preloaded libasan); killed", flush=True)
                    self.proc.kill()
                    self.proc.wait()
                    self.check_sanitizers()
                    return 0
                if time.time() > deadline:
                    stacks = self._stacks()
                    self.proc.kill()
                    self.proc.wait()
                    fail(f"{self.label} did not exit within {timeout} s of SIGTERM:\n"
                         + self.logtext()[-4000:] + stacks)
                time.sleep(0.05)
        self.check_sanitizers()
        return self.proc.returncode
