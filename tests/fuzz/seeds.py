#!/usr/bin/env python3
"""Writes the seed inputs of corpus/TARGET/ (the files named seed-*).

    tests/fuzz/seeds.py [TARGET...]

The seeds are well-formed messages, specs and image headers, so that the
fuzzer starts from inputs that get past the magic numbers; the files
libFuzzer adds next to them during a campaign (named by their hash) are
kept when they cover something new.  qemu-img makes the qcow2 headers.
"""
import json
import os
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# ---- NBD codec: 8 bytes of session, then the message ----
def session(structured=True, extended=False, min_shift=9, eflags=0x0ced,
            max_payload=0x80, contexts=2, size_mant=1, size_shift=30):
    b0 = int(structured) | int(extended) << 1 | (min_shift & 15) << 2
    return struct.pack(">BHBBHB", b0, eflags, max_payload, contexts,
                       size_mant, size_shift)


def request(typ, offset, length, flags=0, cookie=1):
    return struct.pack(">IHHQQI", 0x25609513, flags, typ, cookie, offset,
                       length)


def ext_request(typ, offset, length, flags=0, cookie=1):
    return struct.pack(">IHHQQQ", 0x21e41c71, flags, typ, cookie, offset,
                       length)


def nbd_codec():
    s, sx = session(), session(extended=True)
    write("nbd-codec", "read", s + request(0, 0, 4096))
    write("nbd-codec", "write-fua", s + request(1, 4096, 4096, flags=1))
    write("nbd-codec", "trim", s + request(4, 0, 1 << 20))
    write("nbd-codec", "flush", s + request(3, 0, 0))
    write("nbd-codec", "disc", s + request(2, 0, 0))
    write("nbd-codec", "block-status-past-end",
          s + request(7, (1 << 30) - 512, 1 << 20))
    write("nbd-codec", "ext-write",
          sx + ext_request(1, 0, 65536, flags=0x20))
    write("nbd-codec", "ext-block-status",
          sx + ext_request(7, 0, 8 << 30, flags=0x08))
    write("nbd-codec", "ext-zeroes-fast",
          sx + ext_request(6, 1 << 20, 1 << 20, flags=0x12))
    write("nbd-codec", "read-only-write",
          session(eflags=0x0003) + request(1, 0, 512))
    write("nbd-codec", "plain-block-status",
          session(structured=False, contexts=0) + request(7, 0, 512))
    write("nbd-codec", "option-header",
          s + struct.pack(">QII", 0x49484156454F5054, 7, 11))
    go = struct.pack(">I", 3) + b"exp" + struct.pack(">HHH", 2, 3, 1)
    write("nbd-codec", "opt-go", s + go)
    queries = [b"base:allocation", b"qemu:allocation-depth"]
    meta = struct.pack(">I", 3) + b"exp" + struct.pack(">I", len(queries))
    for q in queries:
        meta += struct.pack(">I", len(q)) + q
    write("nbd-codec", "opt-set-meta", s + meta)
    write("nbd-codec", "client-flags", s + struct.pack(">I", 3))
    write("nbd-codec", "utf8-message",
          session(size_mant=0x0010, size_shift=0) +
          "écrit ∑ 😀 hors limites".encode())
    extents = struct.pack(">QQQQQQ", 4096, 3, 5 << 30, 0, 512, 1)
    write("nbd-codec", "extents", s + extents)


# ---- nbd: specs; then backing-remote=nbd: settings; then a backing name ----
def nbd_spec():
    for name, text in {
        "uri": "nbd://golden.example:10810/base",
        "unix-options": "nbd+unix:///e?socket=/run/s.sock&reconnect-delay=0"
                        "&connect-timeout=5",
        "tls-x509": "nbds://[::1]/img?tls-certificates=/etc/pki/c"
                    "&tls-verify-peer=false",
        "tls-psk": "nbds+unix:///e?socket=/s&tls-psk-file=/k.psk"
                   "&tls-username=alice",
        "legacy": "nbd:h:10809:exportname=x%20y",
        "relative-backing": "nbds://h:4000/dir/top?tls-certificates=/c\n"
                            "\nbase",
        "other-server": "nbd://h/top\nevil;h2:99;reconnect-delay=3\n"
                        "nbd://evil/base",
        "local-overlay-tls": "nbd:/x\nh;tls-psk-file=/k;tls-username=u"
                             ";connect-timeout=9\nnbds://h/b",
        "header-options": "nbd:/x\n*;tls-certificates=/c\n"
                          "nbds://h/b?tls-certificates=/etc",
    }.items():
        write("nbd-spec", name, text.encode())


# ---- rbd: specs; after a newline, a backing name ----
def rbd_spec():
    seeds = {
        "pool-image": "rbd:rbd/disk",
        "everything": "rbd:pool/ns1/img@snap-1:conf=/etc/ceph/x.conf"
                      ":id=client.strata:keyring=/k/ring:timeout=5"
                      ":connect_timeout=3",
        "escapes": "rbd:p/a\\:b\\\\c@s\\@t:mon_host=127.0.0.1\\:3300",
        "ceph-options": "rbd:p/i:mon_host=[::1]\\:6789:rbd_cache=false"
                        ":client_mount_timeout=7",
        "relative-backing": "rbd:pool/ns/top:id=admin\nbase@s1",
        "absolute-backing": "rbd:pool/top:timeout=0\n"
                            "rbd:other/base:mon_host=1.2.3.4:log_file=/x",
        "file-backing": "rbd:pool/layer:keyring=/k:admin_socket=/a\n"
                        "/images/base.qcow2",
    }
    for name, text in seeds.items():
        write("rbd-spec", name, text.encode())


# ---- qcow2: 1 byte (log2 of the file size, read-only bit), cluster 0 ----
def qcow2_header():
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "base.raw")
        open(base, "wb").close()
        images = {
            "v3-512": ["-o", "cluster_size=512"],
            "v2": ["-o", "compat=0.10,cluster_size=4096"],
            "v3-backing": ["-o", "cluster_size=4096", "-b", base,
                           "-F", "raw"],
            "v3-extl2-zstd": ["-o", "cluster_size=16384,extended_l2=on,"
                              "compression_type=zstd,lazy_refcounts=on"],
            "v3-refcount1": ["-o", "cluster_size=4096,refcount_bits=1"],
            "v3-data-file": ["-o", "cluster_size=4096,data_file=" +
                             os.path.join(tmp, "data.raw")],
        }
        for name, opts in images.items():
            img = os.path.join(tmp, name + ".qcow2")
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2"] +
                           opts + [img, "64M"], check=True)
            if name == "v3-512":
                subprocess.run(["qemu-img", "bitmap", "--add", img,
                                "b0"], check=True)
            # The first cluster up to its last nonzero byte (the target
            # zero-fills the rest), never shorter than the header.
            data = open(img, "rb").read(4096)
            data = data[:max(len(data.rstrip(b"\0")), 112)]
            write("qcow2-header", name, bytes([20]) + data)
            write("qcow2-header", name + "-ro", bytes([0x40 | 20]) + data)


# ---- qcow2 image: flags, op count, 8 bytes per operation, the image ----
QOP = {"read": 0, "write": 1, "zero": 2, "discard": 3, "status": 4,
       "flush": 5, "cache": 6, "reopen": 7, "grow": 8}


def qop(name, sector, sectors, pattern=0, mod=0):
    """One operation of fuzz-qcow2-image: offset and length in sectors."""
    return struct.pack("<BI", QOP[name], sector)[:4] + \
        struct.pack("<HBB", max(sectors - 1, 0), pattern, mod)


def qcow2_image():
    ops_rw = [qop("write", 0, 8, 1), qop("read", 0, 16),
              qop("write", 100, 300, 2, mod=1), qop("status", 0, 2048),
              qop("zero", 8, 64, mod=2), qop("read", 0, 256),
              qop("discard", 100, 50), qop("status", 90, 100),
              qop("flush", 0, 0), qop("write", 1500, 40, 3),
              qop("zero", 0, 2048, mod=4), qop("read", 1490, 60),
              qop("cache", 0, 2048)]
    ops_grow = [qop("write", 2040, 8, 4), qop("grow", 0, 4096),
                qop("read", 2040, 256), qop("write", 4000, 16, 5),
                qop("reopen", 0, 0), qop("read", 4000, 16),
                qop("reopen", 0, 0), qop("zero", 0, 0, mod=0x22),
                qop("status", 0, 8192)]
    ops_ro = [qop("read", 0, 256), qop("status", 0, 0, mod=0x20),
              qop("read", 0x300, 256, mod=0x10), qop("cache", 0, 2048)]
    with tempfile.TemporaryDirectory() as tmp:
        def qi(*args):
            subprocess.run(["qemu-img"] + list(args), check=True,
                           stdout=subprocess.DEVNULL)

        def qio(img, *cmds):
            args = ["qemu-io", "-f", "qcow2"]
            for c in cmds:
                args += ["-c", c]
            subprocess.run(args + [img], check=True,
                           stdout=subprocess.DEVNULL)

        def img(name, opts, size="1M"):
            path = os.path.join(tmp, name + ".qcow2")
            qi("create", "-q", "-f", "qcow2", "-o", opts, path, size)
            return path

        images = {}
        p = img("c512", "cluster_size=512")
        qio(p, "write -P 0x11 0 4k", "write -z 8k 4k", "write -P 0x22 64k 1k")
        images["c512"] = p
        p = img("c16k-extl2", "cluster_size=16384,extended_l2=on")
        qio(p, "write -P 0x33 0 6k", "write -z 16k 2k", "discard 2k 1k")
        images["c16k-extl2"] = p
        p = img("c512-rc1", "cluster_size=512,refcount_bits=1")
        qio(p, "write -P 0x44 1k 3k")
        images["c512-rc1"] = p
        p = img("c512-rc64", "cluster_size=512,refcount_bits=64")
        qio(p, "write -P 0x45 0 2k")
        images["c512-rc64"] = p
        p = img("c512-snap", "cluster_size=512")
        qio(p, "write -P 0x55 0 8k")
        qi("snapshot", "-c", "s1", p)
        qio(p, "write -P 0x66 2k 2k")
        images["c512-snap"] = p
        p = img("v2", "compat=0.10,cluster_size=512")
        qio(p, "write -P 0x77 0 4k", "write -z 4k 1k")
        images["v2"] = p
        p = img("lazy-dirty", "cluster_size=512,lazy_refcounts=on")
        # killed with the image open: the dirty bit stays set
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x88 0 4k",
                        "-c", "sigraise 9", p],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        images["lazy-dirty"] = p
        raw = os.path.join(tmp, "data.raw")
        with open(raw, "wb") as f:
            f.write(bytes(range(256)) * 64 + b"\0" * 16384 +
                    b"compressible " * 1000)
        for ctype in ("zlib", "zstd"):
            p = os.path.join(tmp, "z-" + ctype + ".qcow2")
            qi("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
               "cluster_size=4096,compression_type=" + ctype, raw, p)
            images["compressed-" + ctype] = p
        base = os.path.join(tmp, "base.qcow2")
        qi("create", "-q", "-f", "qcow2", base, "1M")
        p = os.path.join(tmp, "overlay.qcow2")
        qi("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-b",
           base, "-F", "qcow2", p)
        qio(p, "write -P 0x99 4k 4k")
        images["overlay"] = p
        p = img("bitmap", "cluster_size=4096")
        qi("bitmap", "--add", p, "b0")
        qio(p, "write -P 0xaa 0 8k")
        images["bitmap"] = p

        for name, path in images.items():
            # bytes past the end of the file read as zeros
            data = open(path, "rb").read().rstrip(b"\0")
            assert len(data) <= 120000, (name, len(data))
            for tag, flags, ops in (("rw", 0, ops_rw), ("grow", 6, ops_grow),
                                    ("ro", 1, ops_ro)):
                write("qcow2-image", name + "-" + tag,
                      bytes([flags, len(ops)]) + b"".join(ops) + data)


# ---- NBD connection: 1 byte of server config, then the client's bytes ----
IHAVEOPT = 0x49484156454F5054
OPT = {"export_name": 1, "abort": 2, "list": 3, "starttls": 5, "info": 6,
       "go": 7, "structured": 8, "list_meta": 9, "set_meta": 10,
       "extended": 11}
CMD = {"read": 0, "write": 1, "disc": 2, "flush": 3, "trim": 4, "cache": 5,
       "zeroes": 6, "block_status": 7}


def opt(name, data=b""):
    return struct.pack(">QII", IHAVEOPT, OPT[name], len(data)) + data


def name_infos(name, infos=()):
    return (struct.pack(">I", len(name)) + name +
            struct.pack(">H", len(infos)) +
            b"".join(struct.pack(">H", i) for i in infos))


def meta(name, queries):
    d = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    for q in queries:
        d += struct.pack(">I", len(q)) + q
    return d


def nbd_conn():
    hello = struct.pack(">I", 3)  # FIXED_NEWSTYLE | NO_ZEROES
    ctx = [b"base:allocation", b"qemu:allocation-depth"]
    ops = [request(CMD["write"], 0, 4096, cookie=1) + bytes([0x5a]) * 4096,
           request(CMD["read"], 0, 8192, cookie=2),
           request(CMD["block_status"], 0, 1 << 20, cookie=3),
           request(CMD["zeroes"], 4096, 65536, flags=2, cookie=4),
           request(CMD["trim"], 65536, 65536, cookie=5),
           request(CMD["cache"], 0, 4096, cookie=6),
           request(CMD["write"], 8192, 512, flags=1, cookie=7) +
           bytes(range(256)) * 2,
           request(CMD["read"], 8192, 1024, flags=4, cookie=8),
           request(CMD["block_status"], 0, 4096, flags=8, cookie=9),
           request(CMD["flush"], 0, 0, cookie=10)]
    disc = request(CMD["disc"], 0, 0, cookie=11)
    sessions = {
        "structured-go": hello + opt("structured") +
        opt("set_meta", meta(b"exp", ctx)) +
        opt("go", name_infos(b"exp", [3, 2, 1])) + b"".join(ops) + disc,
        "list-info-abort": hello + opt("list") +
        opt("info", name_infos(b"ro", [0, 1, 2, 3])) +
        opt("info", name_infos(b"secret")) +
        opt("info", name_infos(b"nosuch", [3])) +
        opt("list_meta", meta(b"exp", [b"base:", b"qemu:"])) +
        opt("list_meta", meta(b"", [])) + opt("abort"),
        "export-name-ro": struct.pack(">I", 1) + opt("export_name", b"ro") +
        request(CMD["read"], 0, 4096) +
        request(CMD["write"], 0, 512) + bytes(512) + disc,
        "simple-replies": hello + opt("go", name_infos(b"")) +
        b"".join(ops) + request(CMD["read"], (1 << 20) - 512, 1024) +
        request(CMD["write"], 1, 511) + bytes(511) + disc,
        "bad-magic": hello + opt("go", name_infos(b"exp")) +
        request(CMD["read"], 0, 512) + b"\xde\xad\xbe\xef" * 7,
        "unknown-option-then-go": hello + opt("structured") +
        struct.pack(">QII", IHAVEOPT, 42, 3) + b"xyz" +
        opt("structured", b"x") + opt("go", name_infos(b"exp")) + disc,
        "eof-in-payload": hello + opt("go", name_infos(b"exp")) +
        request(CMD["write"], 0, 65536) + bytes(1000),
    }
    ext_ops = [ext_request(CMD["write"], 0, 4096, flags=0x20, cookie=1) +
               bytes([0xa5]) * 4096,
               ext_request(CMD["read"], 0, 4096, cookie=2),
               ext_request(CMD["block_status"], 0, 1 << 20, cookie=3),
               ext_request(CMD["block_status"], 0, 1 << 20, flags=0x20,
                           cookie=4) + struct.pack(">QI", 1 << 20, 1),
               ext_request(CMD["zeroes"], 0, 1 << 20, flags=0x12, cookie=5),
               ext_request(CMD["trim"], 0, 8 << 30, cookie=6)]
    sessions["extended"] = (hello + opt("extended") +
                            opt("set_meta", meta(b"exp", ctx)) +
                            opt("go", name_infos(b"exp", [3])) +
                            b"".join(ext_ops) + ext_request(CMD["disc"], 0, 0))
    for name, data in sessions.items():
        write("nbd-conn", name, bytes([0]) + data)
    # Back-pressure: 2 requests in flight, 8 KiB buffered per connection.
    many = b"".join(request(CMD["write"], i * 4096, 4096, cookie=i) +
                    bytes([i]) * 4096 for i in range(3))
    many += b"".join(request(CMD["read"], 0, 65536, cookie=100 + i)
                     for i in range(8))
    write("nbd-conn", "back-pressure",
          bytes([4]) + hello + opt("structured") +
          opt("go", name_infos(b"exp")) + many + disc)
    # TLS on: STARTTLS accepted, then bytes that are not a TLS handshake;
    # TLS required: options refused until STARTTLS.
    write("nbd-conn", "starttls-garbage",
          bytes([1]) + hello + opt("starttls") +
          b"\x16\x03\x01\x00\x40\x01\x00\x00\x3c\x03\x03" + bytes(60))
    write("nbd-conn", "tls-required",
          bytes([2]) + hello + opt("list") +
          opt("go", name_infos(b"exp")) + opt("starttls", b"x") +
          opt("abort"))
    write("nbd-conn", "starttls-off",
          bytes([0]) + hello + opt("starttls") + opt("go", name_infos(b"")) +
          disc)


# ---- QMP: what a client sends on the control socket (the same seeds for
# qmp, a daemon lifetime per input, and qmp-dispatch, a connection per
# input) ----
def qmp(targets=("qmp",)):
    caps = {"execute": "qmp_capabilities"}

    def j(*msgs):
        return "".join(json.dumps(m) + "\r\n" for m in msgs).encode()

    seeds = {
        "queries": j(caps, {"execute": "query-version", "id": 1},
                     {"execute": "query-commands", "id": "two"},
                     {"execute": "query-block-exports"},
                     {"execute": "query-blockstats",
                      "arguments": {"query-nodes": True}},
                     {"execute": "query-named-block-nodes",
                      "arguments": {"flat": True}},
                     {"execute": "query-jobs"},
                     {"execute": "query-block-jobs"}),
        "no-negotiation": j({"execute": "query-version"}, caps, caps),
        "export-del-add": j(caps,
                            {"execute": "block-export-del",
                             "arguments": {"id": "mem", "mode": "hard"}},
                            {"execute": "block-export-add",
                             "arguments": {"type": "nbd", "id": "e2",
                                           "node-name": "mem",
                                           "writable": True, "name": "x",
                                           "description": "d",
                                           "allocation-depth": True,
                                           "allow": ["CN=a", "b"]}},
                            {"execute": "blockdev-del",
                             "arguments": {"node-name": "mem"}},
                            {"execute": "block-export-del",
                             "arguments": {"id": "e2"}},
                            {"execute": "blockdev-del",
                             "arguments": {"node-name": "mem"}}),
        "blockdev-add": j(caps,
                          {"execute": "blockdev-add",
                           "arguments": {"driver": "qcow2",
                                         "node-name": "n1",
                                         "file": {"driver": "file",
                                                  "filename":
                                                  "/dev/shm/none.qcow2"},
                                         "read-only": True,
                                         "cache": {"direct": False,
                                                   "no-flush": False}}},
                          {"execute": "blockdev-add",
                           "arguments": {"driver": "raw", "node-name": "n2",
                                         "file": "mem"}},
                          {"execute": "blockdev-add",
                           "arguments": {"driver": "raw", "node-name": "n3",
                                         "file": {"driver": "rbd",
                                                  "pool": "p",
                                                  "image": "i"}}}),
        "snapshot-commit": j(caps,
                             {"execute": "blockdev-snapshot-sync",
                              "arguments": {"node-name": "mem",
                                            "snapshot-file":
                                            "/dev/shm/s1.qcow2",
                                            "snapshot-node-name": "s1",
                                            "format": "qcow2"}},
                             {"execute": "block-commit",
                              "arguments": {"job-id": "c1", "device": "mem",
                                            "on-error": "report",
                                            "auto-finalize": False}},
                             {"execute": "query-jobs"},
                             {"execute": "job-pause", "arguments":
                              {"id": "c1"}},
                             {"execute": "block-job-set-speed",
                              "arguments": {"device": "c1", "speed": 1}},
                             {"execute": "job-resume", "arguments":
                              {"id": "c1"}},
                             {"execute": "job-complete", "arguments":
                              {"id": "c1"}},
                             {"execute": "job-finalize", "arguments":
                              {"id": "c1"}},
                             {"execute": "job-dismiss", "arguments":
                              {"id": "c1"}}),
        "quiesce-fault": j(caps,
                           {"execute": "x-debug-quiesce",
                            "arguments": {"id": "mem", "duration-ms": 5}},
                           {"execute": "x-debug-fault-query"},
                           {"execute": "x-debug-fault-inject",
                            "arguments": {"nth": 0}}),
        "quit": j(caps, {"execute": "quit"}, {"execute": "query-version"}),
        # What a connection leaves behind: a bitmap on mem, a node, a second
        # export, a backup job (refused: no scratch target), a transaction
        # (qmp-dispatch undoes all of it before the next input)
        "leave-state": j(caps,
                         {"execute": "block-dirty-bitmap-add",
                          "arguments": {"node": "mem", "name": "b1",
                                        "granularity": 65536}},
                         {"execute": "blockdev-add",
                          "arguments": {"driver": "raw", "node-name": "n2",
                                        "file": {"driver": "file",
                                                 "filename": "/etc/hostname"},
                                        "read-only": True}},
                         {"execute": "block-export-add",
                          "arguments": {"type": "nbd", "id": "e2",
                                        "node-name": "n2", "name": "e2"}},
                         {"execute": "blockdev-backup",
                          "arguments": {"job-id": "bk", "device": "mem",
                                        "target": "n2", "sync": "full",
                                        "auto-finalize": False,
                                        "auto-dismiss": False,
                                        "speed": 4096}},
                         {"execute": "transaction",
                          "arguments": {"actions": [
                              {"type": "block-dirty-bitmap-add",
                               "data": {"node": "mem", "name": "b2"}},
                              {"type": "block-dirty-bitmap-clear",
                               "data": {"node": "mem", "name": "b1"}}]}},
                         {"execute": "query-block-jobs"}),
        # qmp-dispatch has a qcow2 image (node and export "img") in its
        # tmpfs: a persistent bitmap, a snapshot, a commit job left running
        # at 1 byte/s, a pull-mode backup into the snapshot's file
        "img-jobs": j(caps,
                      {"execute": "block-dirty-bitmap-add",
                       "arguments": {"node": "img", "name": "b",
                                     "persistent": True}},
                      {"execute": "blockdev-snapshot-sync",
                       "arguments": {"node-name": "img",
                                     "snapshot-file": "/dev/shm/s1.qcow2",
                                     "snapshot-node-name": "s1",
                                     "format": "qcow2"}},
                      {"execute": "block-commit",
                       "arguments": {"job-id": "c1", "device": "img",
                                     "auto-finalize": False,
                                     "auto-dismiss": False, "speed": 1}},
                      {"execute": "query-jobs"},
                      {"execute": "job-pause", "arguments": {"id": "c1"}},
                      {"execute": "query-block-jobs"}),
    }
    bad = {
        "syntax-errors": b'{"execute": "qmp_capabilities"}\r\n{"execute": '
                         b'\r\n[1,2]\r\n"str"\r\nnull\r\n{"execute": 5}'
                         b'\r\n{"execute":"query-version","extra":1}\r\n'
                         b'{"arguments":{}}\r\n{"execute":"nope"}\r\n',
        "bad-args": j(caps, {"execute": "blockdev-del"},
                      {"execute": "blockdev-del", "arguments": []},
                      {"execute": "blockdev-del",
                       "arguments": {"node-name": 7}},
                      {"execute": "query-version",
                       "arguments": {"x": 1}}),
        "unfinished": b'{"execute": "qmp_capabilities"}{"execute": "query-',
    }
    seeds.update(bad)
    for name, data in seeds.items():
        for t in targets:
            write(t, name, data)


TARGETS = {"nbd-codec": nbd_codec, "rbd-spec": rbd_spec,
           "nbd-spec": nbd_spec,
           "qcow2-header": qcow2_header, "qcow2-image": qcow2_image,
           "nbd-conn": nbd_conn, "qmp": qmp,
           "qmp-dispatch": lambda: qmp(("qmp-dispatch",))}

if __name__ == "__main__":
    # The targets named (default: all).  qcow2 seeds hold temporary paths
    # (backing names): regenerate them only when they are meant to change.
    for t in sys.argv[1:] or TARGETS:
        TARGETS[t]()
