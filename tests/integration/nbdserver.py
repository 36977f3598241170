"""Another NBD server (nbdkit, qemu-nbd) in the foreground for the nbd
backend's tests: ready once its unix socket exists or its TCP port on
127.0.0.1 accepts; killed at exit; start() again after kill()."""
import os
import socket
import subprocess
import time

import harness
from harness import check, fail


class Server:
    """argv in the foreground; ready_path or port tells when it serves."""

    def __init__(self, argv, ready_path=None, port=None):
        self.argv, self.ready_path, self.port = argv, ready_path, port
        self.proc = None
        harness.atexit.register(self.kill)

    def start(self, timeout=20):
        if self.ready_path and os.path.exists(self.ready_path):
            os.unlink(self.ready_path)
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE,
                                     preexec_fn=harness._die_with_parent)
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                fail(f"{self.argv[0]} exited: "
                     f"{self.proc.stderr.read().decode(errors='replace')}")
            if self.ready_path and os.path.exists(self.ready_path):
                break
            if self.port:
                s = socket.socket()
                try:
                    s.connect(("127.0.0.1", self.port))
                    break
                except OSError:
                    pass
                finally:
                    s.close()
            check(time.time() < deadline, f"{self.argv[0]} did not start")
            time.sleep(0.05)

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
