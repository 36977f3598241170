#!/usr/bin/env python3
"""Writes the seed inputs of corpus/TARGET/ (the files named seed-*).

    tests/fuzz/seeds.py

The seeds are well-formed messages, specs and image headers, so that the
fuzzer starts from inputs that get past the magic numbers; the files
libFuzzer adds next to them during a campaign (named by their hash) are
kept when they cover something new.  qemu-img makes the qcow2 headers.
"""
import os
import struct
import subprocess
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


if __name__ == "__main__":
    nbd_codec()
    rbd_spec()
    qcow2_header()
