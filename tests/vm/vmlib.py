"""strata VM test library: a stock Debian kernel under TCG, a tiny initramfs.

Tests that need a real Linux kernel as the NBD client (the kernel nbd
driver, a QEMU guest on a stratad export) boot one here, on a host whose own
kernel may have no nbd driver.  This module

  * builds, and caches between runs, the guest image: vmlinuz and the
    modules from the linux-image package that linux-image-amd64 currently
    depends on, busybox from busybox-static, nbd-client and e2fsprogs with
    their shared libraries and /etc/mke2fs.conf.  Packages are fetched with
    `apt-get download` and unpacked with `dpkg-deb -x`; nothing is installed
    on the host.  Cache: $STRATA_VM_CACHE, else
    ${XDG_CACHE_HOME:-~/.cache}/strata-vm, keyed by the package versions and
    this file's contents.
  * boots it in qemu-system-x86_64 under TCG (KVM hangs a stock kernel on
    these machines), with user networking restricted to `guestfwd` rules
    whose commands dial 127.0.0.1:PORT on the host, and only when the guest
    connects (QEMU runs the command per guest connection);
  * gives each boot its own /init: a shell script that sources
    /lib/strata-vm/common.sh (tests/vm/guest/common.sh) and ends with
    exactly one line `STRATA-VM: PASS` or `STRATA-VM: FAIL <reason>` on the
    serial console, then powers off.  The host parses the serial log and
    kills QEMU at a deadline, so a boot always ends.

Typical use (see test-kernel-nbd.py):

    image = vmlib.guest_image()                  # cached build
    vm = vmlib.VM(image, workdir, "write", init=open("guest/x.sh").read(),
                  files={"/data/a": b"..."},
                  guestfwd=[(10809, stratad_port)], cmdline="strata.x=1")
    result = vm.run(timeout=300)                 # -> BootResult
    if not result.passed: ...

A test that wants the guest to see a disk through QEMU's own NBD client
passes qemu_args=nbd_drive_args(port, export) (the guest sees /dev/vda;
virtio_blk is in the image).  VM.start() / VM.wait_line() / VM.wait() let
the host act while the guest runs (e.g. start a job when the guest prints a
marker), and a Mailbox behind a second guestfwd rule tells the guest when
the host is done.  tests/vm/selftest-vmlib.py shows both.
"""
import atexit
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
GUEST_DIR = os.path.join(HERE, "guest")

QEMU = "qemu-system-x86_64"

# Address and port the guest dials; each guestfwd rule takes the next address.
GUESTFWD_NET = "10.0.2.%d"
GUESTFWD_FIRST_HOST = 100

# Packages unpacked into the image besides the kernel.  The libraries that
# nbd-client and e2fsprogs link against come from these packages when listed
# here, else from the host (glibc, gnutls, ... : qemu-system-x86 needs them).
USER_PACKAGES = [
    "busybox-static",
    "nbd-client", "libnl-3-200", "libnl-genl-3-200",
    "e2fsprogs", "libext2fs2", "libcom-err2",
]

# Binaries copied from the unpacked packages (path inside the package).
BINARIES = [
    "sbin/nbd-client",
    "sbin/mke2fs", "sbin/mkfs.ext4", "sbin/e2fsck", "sbin/fsck.ext4",
    "sbin/debugfs", "sbin/dumpe2fs", "sbin/tune2fs",
]

# Kernel modules the guest loads at boot, with their dependencies, in
# dependency order.  crc32c_generic is not a link-time dependency of ext4
# (ext4 asks the crypto API for "crc32c" at mount time), so it is listed.
MODULES = [
    "crc32c_generic", "ext4", "nbd",
    "virtio_pci", "virtio_net", "virtio_blk",
]

# Modules shipped in the image but loaded only by the tests that want them,
# from lib/modules/strata/extra/ in the order of its file `order`: the
# kernel's TLS (the tls ULP) and the AEADs it asks the crypto API for, the
# generic ones and the x86 ones (test-ktls.py; an x86 one may fail to load
# where the virtual CPU lacks its instructions).
EXTRA_MODULES = [
    "tls", "gcm", "ctr", "ghash_generic", "chacha20poly1305",
    "chacha_generic", "poly1305_generic", "aesni_intel", "ghash_clmulni_intel",
]

SERIAL_RESULT = re.compile(r"STRATA-VM: (PASS|FAIL)(?: (.*))?$")


class VMError(Exception):
    """The image could not be built or the VM could not be started."""


def log(msg):
    print(f"vm: {msg}", flush=True)


def available():
    """None when VMs can run here, else why not (for a skip message)."""
    if shutil.which(QEMU) is None:
        return (f"{QEMU} is not installed (Debian: qemu-system-x86; "
                "contrib/deps.sh test installs it)")
    return None


# ---------------------------------------------------------------- packages

def _run(args, **kw):
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("timeout", 600)
    r = subprocess.run(args, text=True, **kw)
    if r.returncode != 0:
        raise VMError(f"{' '.join(args)}: exit {r.returncode}: "
                      f"{(r.stderr or '').strip()[-2000:]}")
    return r.stdout


def kernel_package():
    """The linux-image-* package that linux-image-amd64 depends on now."""
    out = _run(["apt-cache", "depends", "linux-image-amd64"])
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if m:
            return m.group(1)
    raise VMError("apt-cache depends linux-image-amd64 names no linux-image "
                  "package (run apt-get update)")


def candidate_versions(pkgs):
    """{package: candidate version} from one apt-cache call."""
    out = _run(["apt-cache", "policy"] + list(pkgs))
    vers, cur = {}, None
    for line in out.splitlines():
        m = re.match(r"^(\S+):$", line)
        if m:
            cur = m.group(1)
            continue
        m = re.match(r"^\s+Candidate:\s*(\S+)", line)
        if m and cur:
            vers[cur] = m.group(1)
    for p in pkgs:
        if vers.get(p, "(none)") == "(none)":
            raise VMError(f"no candidate version of {p} (run apt-get update)")
    return vers


def resolve_packages():
    """[(package, version)]: the kernel package first, then USER_PACKAGES.
    If apt's lists do not know them, update the lists once (as root)."""
    for attempt in (1, 2):
        try:
            kpkg = kernel_package()
            names = [kpkg] + USER_PACKAGES
            vers = candidate_versions(names)
            return [(p, vers[p]) for p in names]
        except VMError:
            if attempt == 2 or not _apt_update():
                raise


def _apt_update():
    if os.geteuid() == 0:
        log("apt-get update (apt does not know a package, or the mirror lost it)")
        _run(["apt-get", "update", "-qq"], timeout=600)
        return True
    return False


def download(pkgs, debdir):
    """apt-get download each (pkg, version) into debdir unless present;
    returns their paths.  Downloaded files of other versions are removed."""
    os.makedirs(debdir, exist_ok=True)
    want = {}
    for pkg, ver in pkgs:
        want[(pkg, ver)] = None
        for f in os.listdir(debdir):
            if f.startswith(pkg + "_") and f.endswith(".deb"):
                if f.split("_")[1] == ver.replace(":", "%3a"):
                    want[(pkg, ver)] = os.path.join(debdir, f)
    missing = [k for k, v in want.items() if v is None]
    if missing:
        log("downloading " + " ".join(f"{p}={v}" for p, v in missing))
        args = ["apt-get", "download", "-q"]
        if os.geteuid() == 0:   # else apt warns it cannot drop to _apt
            args += ["-o", "APT::Sandbox::User=root"]
        args += [f"{p}={v}" for p, v in missing]
        _run(args, cwd=debdir)
        for (pkg, ver) in missing:
            for f in os.listdir(debdir):
                if (f.startswith(pkg + "_") and f.endswith(".deb") and
                        f.split("_")[1] == ver.replace(":", "%3a")):
                    want[(pkg, ver)] = os.path.join(debdir, f)
            if want[(pkg, ver)] is None:
                raise VMError(f"apt-get download {pkg}={ver} left no .deb")
    keep = set(want.values())
    for f in os.listdir(debdir):
        p = os.path.join(debdir, f)
        if p not in keep and f.endswith(".deb"):
            os.unlink(p)
    return [want[k] for k in want]


# ---------------------------------------------------------------- modules

def modinfo(path):
    """The .modinfo section of a kernel module (ELF64 little endian):
    {key: [values]}.  The kernel package ships no modules.dep, and the host
    may have no kmod, so the dependencies are read here."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:6] != b"\x7fELF\x02\x01":
        raise VMError(f"{path}: not an ELF64 little-endian module")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sects = []
    for i in range(shnum):
        name, _typ, _flags, _addr, off, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + i * shentsize)
        sects.append((name, off, size))
    _, stroff, strsize = sects[shstrndx]
    names = data[stroff:stroff + strsize]
    info = {}
    for name, off, size in sects:
        if names[name:names.index(b"\0", name)] != b".modinfo":
            continue
        for item in data[off:off + size].split(b"\0"):
            if b"=" in item:
                k, v = item.split(b"=", 1)
                info.setdefault(k.decode(), []).append(v.decode())
    return info


def module_order(moddir, roots):
    """Paths (relative to moddir) of `roots` and their dependencies, each
    after everything it depends on; built-in modules left out."""
    paths = {}
    for dirpath, _dirs, files in os.walk(os.path.join(moddir, "kernel")):
        for f in files:
            if f.endswith(".ko"):
                paths[f[:-3].replace("-", "_")] = os.path.relpath(
                    os.path.join(dirpath, f), moddir)
    builtin = set()
    bpath = os.path.join(moddir, "modules.builtin")
    if os.path.exists(bpath):
        for line in open(bpath):
            builtin.add(os.path.basename(line.strip())[:-3].replace("-", "_"))
    order, seen = [], set()

    def visit(name, chain):
        if name in seen or name in builtin:
            return
        if name in chain:
            raise VMError(f"module dependency cycle: {chain + [name]}")
        if name not in paths:
            raise VMError(f"module {name} is not in {moddir}")
        deps = ",".join(modinfo(os.path.join(moddir, paths[name]))
                        .get("depends", [""]))
        for d in filter(None, deps.split(",")):
            visit(d.replace("-", "_"), chain + [name])
        seen.add(name)
        order.append(paths[name])

    for r in roots:
        visit(r, [])
    return order


# ---------------------------------------------------------------- cpio

class Cpio:
    """A newc cpio archive, as the kernel unpacks an initramfs.  Parents are
    created before their entries; owners are root, mtimes 0."""

    def __init__(self, path):
        self.f = open(path, "wb")
        self.ino = 1
        self.dirs = set()
        self.names = set()

    def _entry(self, name, mode, data=b"", rdev=(0, 0)):
        name = name.strip("/")
        self._parents(name)
        if name in self.names:
            raise VMError(f"cpio: {name} twice")
        self.names.add(name)
        self._raw(name, mode, data, rdev)

    def _raw(self, name, mode, data, rdev=(0, 0)):
        nb = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0,
                  rdev[0], rdev[1], len(nb), 0]
        self.ino += 1
        hdr = b"070701" + b"".join(b"%08X" % v for v in fields)
        self.f.write(hdr + nb)
        self.f.write(b"\0" * (-(len(hdr) + len(nb)) % 4))
        self.f.write(data)
        self.f.write(b"\0" * (-len(data) % 4))

    def _parents(self, name):
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.dirs:
                self.dir(d)

    def dir(self, name, mode=0o755):
        name = name.strip("/")
        if name in self.dirs:
            return
        self._parents(name)
        self.dirs.add(name)
        self.names.add(name)
        self._raw(name, 0o040000 | mode, b"")

    def file(self, name, data, mode=0o644):
        self._entry(name, 0o100000 | mode, data)

    def copy(self, name, src):
        st = os.stat(src)
        with open(src, "rb") as f:
            self.file(name, f.read(), st.st_mode & 0o777)

    def symlink(self, name, target):
        self._entry(name, 0o120000 | 0o777, target.encode())

    def chardev(self, name, major, minor, mode=0o600):
        self._entry(name, 0o020000 | mode, b"", (major, minor))

    def close(self):
        self._raw("TRAILER!!!", 0, b"")
        self.f.close()


# ---------------------------------------------------------------- image

def cache_root():
    d = os.environ.get("STRATA_VM_CACHE")
    if not d:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        d = os.path.join(base, "strata-vm")
    os.makedirs(d, exist_ok=True)
    return d


class GuestImage:
    def __init__(self, d):
        self.dir = d
        self.vmlinuz = os.path.join(d, "vmlinuz")
        self.initramfs = os.path.join(d, "initramfs.cpio")
        with open(os.path.join(d, "manifest.json")) as f:
            self.manifest = json.load(f)


def _image_key(pkgs):
    h = hashlib.sha256()
    h.update(json.dumps(pkgs).encode())
    with open(os.path.abspath(__file__), "rb") as f:
        h.update(f.read())
    return h.hexdigest()[:16]


def guest_image():
    """The cached kernel + base initramfs, built first if needed."""
    root = cache_root()
    with open(os.path.join(root, "lock"), "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)   # one builder at a time
        for attempt in (1, 2):
            pkgs = resolve_packages()
            key = _image_key(pkgs)
            dest = os.path.join(root, "image-" + key)
            if os.path.exists(os.path.join(dest, "manifest.json")):
                log(f"using cached {dest}")
                return GuestImage(dest)
            t0 = time.time()
            try:
                debs = download(pkgs, os.path.join(root, "debs"))
                break
            except VMError:
                # stale lists name versions the mirror no longer has:
                # update them and resolve the packages again
                if attempt == 2 or not _apt_update():
                    raise
        tmp = tempfile.mkdtemp(prefix="build-", dir=root)
        os.chmod(tmp, 0o755)
        try:
            _build(debs, pkgs, tmp)
            shutil.rmtree(dest, ignore_errors=True)
            os.rename(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for f in os.listdir(root):   # older images: not needed again
            if f.startswith("image-") and f != "image-" + key:
                shutil.rmtree(os.path.join(root, f), ignore_errors=True)
        log(f"built {dest} in {time.time() - t0:.1f}s")
    return GuestImage(dest)


def _ldd(binary, libpath):
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(libpath))
    out = _run(["ldd", binary], env=env)
    libs = []
    for line in out.splitlines():
        line = line.strip()
        if "not found" in line:
            raise VMError(f"{binary}: library {line.split()[0]} not found "
                          "(add its package to vmlib.USER_PACKAGES)")
        m = re.match(r"(?:\S+ => )?(/\S+) \(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


def _in_pkgs(root, rel):
    """The path of rel (e.g. sbin/mke2fs) in the unpacked packages, which
    may have it under usr/ (merged /usr)."""
    for p in (rel, "usr/" + rel):
        if os.path.lexists(os.path.join(root, p)):
            return os.path.join(root, p)
    raise VMError(f"{rel} is in none of the packages")


def _build(debs, pkgs, out):
    root = os.path.join(out, "root")
    for d in debs:
        _run(["dpkg-deb", "-x", d, root])
    kver = os.listdir(_in_pkgs(root, "lib/modules"))
    if len(kver) != 1:
        raise VMError(f"expected one kernel in the package, found {kver}")
    kver = kver[0]
    moddir = os.path.join(_in_pkgs(root, "lib/modules"), kver)
    shutil.copy(os.path.join(root, "boot", "vmlinuz-" + kver),
                os.path.join(out, "vmlinuz"))

    cpio = Cpio(os.path.join(out, "initramfs.cpio"))
    for d in ("proc", "sys", "dev", "mnt", "tmp", "run", "root", "etc",
              "bin", "sbin", "usr/bin", "usr/sbin", "lib/modules/strata",
              "lib/modules/strata/extra"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.symlink("etc/mtab", "/proc/mounts")
    cpio.copy("etc/mke2fs.conf", _in_pkgs(root, "etc/mke2fs.conf"))

    shipped = set()
    libpath = [os.path.join(root, "lib", "x86_64-linux-gnu"),
               os.path.join(root, "usr", "lib", "x86_64-linux-gnu")]
    libs = {}
    guest_libs = []
    for b in BINARIES:
        src = _in_pkgs(root, b)
        cpio.copy(b, src)
        shipped.add(os.path.basename(b))
        for lib in _ldd(src, libpath):
            libs[lib] = True
    for lib in libs:
        # the guest path: where the loader finds it (/lib/x86_64-linux-gnu,
        # /lib64); the content: the file itself, from the packages if there
        name = lib
        for lp in libpath:
            if lib.startswith(lp + "/"):
                name = "/lib/x86_64-linux-gnu/" + lib[len(lp) + 1:]
        if name.startswith("/usr/lib/"):
            name = name[len("/usr"):]
        cpio.file(name, open(os.path.realpath(lib), "rb").read(), 0o755)
        guest_libs.append(name)

    bb = _in_pkgs(root, "bin/busybox")
    cpio.copy("bin/busybox", bb)
    applets = _run([bb, "--list-full"]).split()
    nlinks = 0
    for a in applets:
        base = os.path.basename(a)
        # --list includes busybox itself: never link over the binary; and
        # the real nbd-client / e2fsprogs tools win over busybox's.
        if base == "busybox" or base in shipped or a.strip("/") in cpio.names:
            continue
        cpio.symlink(a, "/bin/busybox")
        nlinks += 1

    order = module_order(moddir, MODULES)
    for rel in order:
        cpio.copy("lib/modules/strata/" + os.path.basename(rel),
                  os.path.join(moddir, rel))
    cpio.file("lib/modules/strata/order",
              "".join(os.path.basename(r) + "\n" for r in order).encode())
    extra = [r for r in module_order(moddir, EXTRA_MODULES) if r not in order]
    for rel in extra:
        cpio.copy("lib/modules/strata/extra/" + os.path.basename(rel),
                  os.path.join(moddir, rel))
    cpio.file("lib/modules/strata/extra/order",
              "".join(os.path.basename(r) + "\n" for r in extra).encode())
    cpio.close()
    shutil.rmtree(root)
    manifest = {"kernel": kver, "packages": pkgs,
                "modules": [os.path.basename(r) for r in order],
                "extra_modules": [os.path.basename(r) for r in extra],
                "binaries": BINARIES, "libraries": sorted(guest_libs),
                "busybox_applets": nlinks}
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


# ---------------------------------------------------------------- booting

class BootResult:
    def __init__(self, name, passed, reason, log_path, seconds):
        self.name = name
        self.passed = passed
        self.reason = reason
        self.log = log_path
        self.seconds = seconds

    def __repr__(self):
        return (f"<boot {self.name}: {'PASS' if self.passed else 'FAIL'} "
                f"{self.reason or ''} ({self.seconds:.1f}s)>")


def guestfwd_addr(i):
    """The guest address of the i-th guestfwd rule (0-based)."""
    return GUESTFWD_NET % (GUESTFWD_FIRST_HOST + i)


class VM:
    """One boot of the guest image.

    init:      the /init script's text (a #!/bin/sh script that sources
               /lib/strata-vm/common.sh and ends in vm_pass / vm_fail);
    files:     {guest path: bytes, or (bytes, mode)} added to the
               initramfs (host_binary_files() for a host program);
    guestfwd:  [(guest port, host port)]: rule i makes guestfwd_addr(i):
               guest port reach 127.0.0.1:host port, dialled per connection;
    hostfwd:   [(host port, guest port)]: 127.0.0.1:host port on the host
               reaches the guest's 10.0.2.15:guest port (a server in the
               guest);
    cmdline:   extra kernel command-line words (the init reads /proc/cmdline);
    qemu_args: extra QEMU arguments (e.g. an NBD drive);
    memory:    guest RAM in MiB;
    smp:       virtual CPUs (the kernel's nbd driver sends a CPU's requests
               on one connection per CPU: with one CPU, nbd-client -C 2
               would use only one of its connections).
    """

    def __init__(self, image, workdir, name, init, files=None, guestfwd=(),
                 cmdline="", qemu_args=(), memory=512, smp=1, hostfwd=()):
        self.image = image
        self.name = name
        self.dir = os.path.join(workdir, "vm-" + name)
        os.makedirs(self.dir, exist_ok=True)
        self.serial = os.path.join(self.dir, "serial.log")
        self.qemu_log = os.path.join(self.dir, "qemu.log")
        self.socat_log = os.path.join(self.dir, "socat.log")
        self.initrd = os.path.join(self.dir, "initrd.cpio")
        self._make_initrd(init, files or {})
        self.args = self._qemu_args(guestfwd, cmdline, qemu_args, memory, smp,
                                    hostfwd)
        self.proc = None
        self.t0 = None

    def _make_initrd(self, init, files):
        extra = os.path.join(self.dir, "boot.cpio")
        c = Cpio(extra)
        c.file("init", init.encode(), 0o755)
        with open(os.path.join(GUEST_DIR, "common.sh"), "rb") as f:
            c.file("lib/strata-vm/common.sh", f.read(), 0o644)
        for path, data in sorted(files.items()):
            if isinstance(data, tuple):
                c.file(path, data[0], data[1])
            else:
                c.file(path, data, 0o644)
        c.close()
        # The kernel unpacks concatenated archives in order.
        with open(self.initrd, "wb") as out:
            for part in (self.image.initramfs, extra):
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        os.unlink(extra)

    def _qemu_args(self, guestfwd, cmdline, qemu_args, memory, smp, hostfwd):
        net = "user,id=n0,restrict=on"
        for hport, gport in hostfwd:
            net += f",hostfwd=tcp:127.0.0.1:{int(hport)}-:{int(gport)}"
        for i, (gport, hport) in enumerate(guestfwd):
            # QEMU runs the command each time the guest connects; so the
            # server sees a connection only when the guest makes one.  The
            # command's stderr is the guest's stream too: socat must log to
            # a file, or a message of it would reach the guest as data.
            if "," in self.socat_log or " " in self.socat_log:
                raise VMError(f"no ',' or ' ' in a VM dir: {self.dir}")
            net += (f",guestfwd=tcp:{guestfwd_addr(i)}:{int(gport)}"
                    f"-cmd:socat -d -d -lu -lp socat-{i} -lf {self.socat_log}"
                    f" - TCP:127.0.0.1:{int(hport)}")
        append = ("console=ttyS0 panic=-1 edd=off mitigations=off "
                  "loglevel=4 random.trust_cpu=on " + cmdline).strip()
        return [QEMU, "-accel", "tcg", "-machine", "pc", "-cpu", "max",
                "-smp", str(int(smp)), "-m", str(memory),
                "-nodefaults", "-no-user-config", "-display", "none",
                "-no-reboot", "-monitor", "none",
                "-serial", "file:" + self.serial,
                "-kernel", self.image.vmlinuz, "-initrd", self.initrd,
                "-append", append,
                "-netdev", net,
                "-device", "virtio-net-pci,netdev=n0,romfile="] + list(qemu_args)

    def start(self):
        if guestfwd_needs_socat(self.args) and shutil.which("socat") is None:
            raise VMError("socat is not installed (contrib/deps.sh test "
                          "installs it)")
        open(self.serial, "w").close()
        self.t0 = time.time()
        self.qlog = open(self.qemu_log, "w")
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL,
                                     stdout=self.qlog, stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent)
        atexit.register(self.kill)
        log(f"{self.name}: booting (serial log {self.serial})")
        return self

    def serial_text(self):
        with open(self.serial, "rb") as f:
            return f.read().decode("utf-8", "replace").replace("\r", "")

    def wait_line(self, pattern, timeout):
        """Waits for a serial line matching the regex; returns the match, or
        None if QEMU exited or the time ran out first."""
        rx = re.compile(pattern)
        deadline = time.time() + timeout
        while True:
            for line in self.serial_text().splitlines():
                m = rx.search(line)
                if m:
                    return m
            if self.proc.poll() is not None or time.time() > deadline:
                return None
            time.sleep(0.2)

    def last_line(self, pattern):
        """The last serial line so far that matches the regex (its match),
        or None: e.g. the latest of a guest's progress counters."""
        rx = re.compile(pattern)
        last = None
        for line in self.serial_text().splitlines():
            m = rx.search(line)
            if m:
                last = m
        return last

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def wait(self, timeout):
        """Waits until QEMU exits (killing it at the deadline) and returns
        the BootResult read from the serial log."""
        timed_out = False
        try:
            self.proc.wait(max(0, self.t0 + timeout - time.time()))
        except subprocess.TimeoutExpired:
            timed_out = True
            self.kill()
        self.qlog.close()
        secs = time.time() - self.t0
        results = []
        for line in self.serial_text().splitlines():
            m = SERIAL_RESULT.search(line)
            if m:
                results.append(m)
        if timed_out:
            r = BootResult(self.name, False, f"timeout after {timeout}s",
                           self.serial, secs)
        elif len(results) != 1:
            r = BootResult(self.name, False,
                           f"{len(results)} result lines on the serial "
                           f"console (QEMU exit {self.proc.returncode})",
                           self.serial, secs)
        else:
            m = results[0]
            r = BootResult(self.name, m.group(1) == "PASS",
                           m.group(2) or "", self.serial, secs)
            if r.passed and self.proc.returncode != 0:
                r = BootResult(self.name, False,
                               f"QEMU exit {self.proc.returncode}",
                               self.serial, secs)
        log(f"{self.name}: {'PASS' if r.passed else 'FAIL'} "
            f"{r.reason} in {secs:.1f}s")
        return r

    def run(self, timeout):
        self.start()
        return self.wait(timeout)

    def tail(self, n=60):
        """The end of the serial log, QEMU's output and socat's log."""
        out = "\n".join(self.serial_text().splitlines()[-n:])
        for what, path in (("qemu output", self.qemu_log),
                           ("socat log (guestfwd)", self.socat_log)):
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    text = f.read().strip()
                if text:
                    out += f"\n--- {what} ---\n" + text[-6000:]
        return out


def host_binary_files(binary, guest_path):
    """{guest path: (bytes, mode)} for a program built on the host and the
    shared libraries it loads (from the host, as ldd finds them), for
    VM(files=...): e.g. stratad, run in the guest."""
    files = {guest_path: (open(binary, "rb").read(), 0o755)}
    for lib in _ldd(binary, []):
        name = lib
        if name.startswith("/usr/lib/"):
            name = name[len("/usr"):]
        files[name] = (open(os.path.realpath(lib), "rb").read(), 0o755)
    return files


def nbd_drive_args(port=None, export="", drive_id="d0", host="127.0.0.1",
                   unix_socket=None, discard=False):
    """QEMU arguments for a virtio-blk disk (/dev/vda in the guest) that
    QEMU's own NBD client serves from host:port/export, or with
    unix_socket=PATH from stratad's unix socket PATH (no guest networking
    involved).  With discard=True the guest's discards (fstrim, mount -o
    discard, mkfs) reach the server as NBD_CMD_TRIM."""
    if unix_socket is not None:
        # a comma in a -drive value is written twice
        server = ("server.type=unix,"
                  f"server.path={unix_socket.replace(',', ',,')}")
    else:
        server = (f"server.type=inet,server.host={host},"
                  f"server.port={int(port)}")
    return ["-drive", f"driver=nbd,{server},export={export},if=none,"
            f"id={drive_id},cache=none,aio=threads"
            + (",discard=unmap" if discard else ""),
            "-device", f"virtio-blk-pci,drive={drive_id}"]


class Mailbox:
    """A host-to-guest signal: each connection that reaches it gets the
    current value as one line and is closed.  Make it reachable with a
    guestfwd rule, [(guest port, mailbox.port)], and read it in the guest
    with `vm_mailbox ADDR PORT` (guest/common.sh)."""

    def __init__(self, value=""):
        self.value = value
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.reads = 0
        self.closed = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        atexit.register(self.close)

    def set(self, value):
        self.value = value

    def _serve(self):
        while not self.closed:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with c:
                c.settimeout(5)
                try:
                    c.sendall(self.value.encode() + b"\n")
                    self.reads += 1
                except OSError:
                    pass

    def close(self):
        if not self.closed:
            self.closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()


def guestfwd_needs_socat(args):
    return any("guestfwd=" in a for a in args)


def _die_with_parent():
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
