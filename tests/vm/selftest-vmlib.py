#!/usr/bin/env python3
"""Self-test and example of tests/vm/vmlib.py for tests that run a QEMU guest
on a stratad export (not in the meson suite: one more boot, about 10 s).

The guest's disk /dev/vda is a stratad export reached by QEMU's own NBD
client (vmlib.nbd_drive_args).  The guest writes a pattern with
O_DIRECT + fsync and prints a marker; the host waits for the marker
(VM.wait_line), finds the pattern in the image file, then tells the guest
to go on through a Mailbox behind a guestfwd rule; the guest reads the
pattern back and passes.

Run: STRATAD=build/daemon/stratad /usr/bin/python3 tests/vm/selftest-vmlib.py
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "integration"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402
import vmlib  # noqa: E402
import vmtest  # noqa: E402

SIZE = 64 << 20
MAILBOX_PORT = 7000

INIT = r"""#!/bin/sh
. /lib/strata-vm/common.sh
vm_setup
addr=$(vm_arg strata.mailbox)
vm_expect "disk size" %(size)d blockdev --getsize64 /dev/vda
vm_run "write a pattern at 1 MiB" sh -c \
    'yes strata | head -c 65536 | dd of=/dev/vda bs=65536 seek=16 oflag=direct conv=fsync 2>/dev/null'
vm_log "written"
vm_run "wait for the host" vm_wait_mailbox $addr %(mport)d go 120
vm_run "read it back" sh -c \
    '[ "$(dd if=/dev/vda bs=65536 skip=16 count=1 iflag=direct 2>/dev/null | sha256sum)" = \
       "$(yes strata | head -c 65536 | sha256sum)" ]'
vm_pass
""" % {"size": SIZE, "mport": MAILBOX_PORT}


def main():
    vmtest.begin()
    image = vmlib.guest_image()
    d = H.tmpdir()
    disk = H.make_file(os.path.join(d, "disk.raw"), SIZE)
    daemon = H.Daemon([f"name=disk,file={disk},format=raw"], tcp=True)
    mailbox = vmlib.Mailbox("wait")
    vm = vmlib.VM(image, d, "selftest", INIT,
                  guestfwd=[(MAILBOX_PORT, mailbox.port)],
                  cmdline=f"strata.mailbox={vmlib.guestfwd_addr(0)}",
                  qemu_args=vmlib.nbd_drive_args(daemon.port, "disk"))
    vm.start()
    m = vm.wait_line(r"^strata-vm: written$", 120)
    H.check_hard(m is not None, "the guest never said 'written':\n" + vm.tail())
    with open(disk, "rb") as f:
        f.seek(1 << 20)
        got = f.read(65536)
    want = (b"strata\n" * 10000)[:65536]
    H.check_hard(got == want, "the guest's write is not in the image file")
    H.ok("the guest's write reached the image through QEMU's NBD client")
    mailbox.set("go")
    r = vm.wait(120)
    H.check_hard(r.passed, f"guest: {r.reason}\n{vm.tail()}")
    H.check_hard(mailbox.reads >= 1, "the guest never read the mailbox")
    H.ok(f"guest passed in {r.seconds:.1f}s after {mailbox.reads} mailbox "
         "read(s)")
    daemon.stop()
    print("PASS: vmlib self-test")


if __name__ == "__main__":
    main()
