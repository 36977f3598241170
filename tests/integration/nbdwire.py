"""nbdwire: a tiny raw-socket NBD client for strata's wire-level tests.

It speaks just enough of the protocol (fixed newstyle handshake, options,
compact / structured / extended transmission) to drive a server byte by
byte, including on purpose the things a well-behaved client never sends.
Everything is big endian.  Constants mirror proto/nbd-protocol.h.
"""
import errno
import select
import socket
import struct
import time

NBD_MAGIC = 0x4e42444d41474943          # "NBDMAGIC"
NBD_OPT_MAGIC = 0x49484156454F5054      # "IHAVEOPT"
NBD_REP_MAGIC = 0x0003e889045565a9

NBD_REQUEST_MAGIC = 0x25609513
NBD_EXTENDED_REQUEST_MAGIC = 0x21e41c71
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef
NBD_EXTENDED_REPLY_MAGIC = 0x6e8a278c

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11
FLAG_BLOCK_STATUS_PAYLOAD = 1 << 12

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9
REP_ERR_EXT_HEADER_REQD = REP_FLAG_ERROR | 10

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4
CMD_FLAG_PAYLOAD_LEN = 1 << 5

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_BLOCK_STATUS_EXT = 6
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

REP_NAMES = {
    REP_ACK: "ACK", REP_SERVER: "SERVER", REP_INFO: "INFO",
    REP_META_CONTEXT: "META_CONTEXT", REP_ERR_UNSUP: "ERR_UNSUP",
    REP_ERR_POLICY: "ERR_POLICY", REP_ERR_INVALID: "ERR_INVALID",
    REP_ERR_PLATFORM: "ERR_PLATFORM", REP_ERR_TLS_REQD: "ERR_TLS_REQD",
    REP_ERR_UNKNOWN: "ERR_UNKNOWN", REP_ERR_SHUTDOWN: "ERR_SHUTDOWN",
    REP_ERR_BLOCK_SIZE_REQD: "ERR_BLOCK_SIZE_REQD",
    REP_ERR_TOO_BIG: "ERR_TOO_BIG",
    REP_ERR_EXT_HEADER_REQD: "ERR_EXT_HEADER_REQD",
}


def rep_name(t):
    return REP_NAMES.get(t, "0x%08x" % t)


class Closed(Exception):
    """The server closed the connection (EOF or reset)."""


class ProtocolError(Exception):
    """The server sent something this client cannot make sense of."""


class Reply:
    """One reply message: a simple reply or one structured/extended chunk.

    kind     "simple", "structured" or "extended"
    cookie   64-bit cookie echoed by the server
    error    NBD error (simple replies; for error chunks, the chunk's error)
    flags    chunk flags (DONE = 1); simple replies count as DONE
    type     chunk type (simple: None)
    offset   extended header offset field (else None)
    length   payload length from the header (simple: len(payload))
    payload  bytes after the header (simple read reply: the data)
    """

    def __init__(self, kind, cookie, error=0, flags=REPLY_FLAG_DONE,
                 type=None, offset=None, length=0, payload=b""):
        self.kind = kind
        self.cookie = cookie
        self.error = error
        self.flags = flags
        self.type = type
        self.offset = offset
        self.length = length
        self.payload = payload

    @property
    def done(self):
        return bool(self.flags & REPLY_FLAG_DONE)

    @property
    def is_error(self):
        if self.kind == "simple":
            return self.error != 0
        return bool(self.type & (1 << 15))

    def __repr__(self):
        s = f"<{self.kind} cookie=0x{self.cookie:x}"
        if self.kind == "simple":
            s += f" error={self.error}"
        else:
            s += f" flags={self.flags} type={self.type}"
            if self.offset is not None:
                s += f" offset={self.offset}"
            s += f" length={self.length}"
            if self.is_error:
                s += f" error={self.error}"
        return s + f" payload={len(self.payload)}B>"


def parse_error_payload(p):
    """(error, message, offset-or-None) from an ERROR / ERROR_OFFSET chunk."""
    if len(p) < 6:
        raise ProtocolError(f"error chunk payload too short ({len(p)} bytes)")
    err, mlen = struct.unpack(">IH", p[:6])
    if 6 + mlen > len(p):
        raise ProtocolError(f"error message length {mlen} beyond payload {len(p)}")
    msg = p[6:6 + mlen]
    rest = p[6 + mlen:]
    off = struct.unpack(">Q", rest)[0] if len(rest) == 8 else None
    return err, msg, off


class Conn:
    """One client connection.  `addr` is a unix socket path or (host, port)."""

    def __init__(self, addr, timeout=10.0, source=None):
        """source: a local IP address to connect from (TCP only), e.g.
        another 127.0.0.0/8 address to look like a different client."""
        fam = socket.AF_UNIX if isinstance(addr, str) else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        if source is not None:
            self.sock.bind((source, 0))
        self.sock.connect(addr)
        self.timeout = timeout
        self.structured = False
        self.extended = False
        self.read_lengths = {}   # cookie -> length, for simple read replies
        self.stash = []          # replies read while waiting for another cookie
        self.export_size = None
        self.export_flags = None
        self.contexts = {}       # name -> id (from SET_META_CONTEXT)

    # --- raw bytes -----------------------------------------------------
    def send(self, data):
        self.sock.sendall(data)

    def recv_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            except ConnectionResetError:
                raise Closed(f"connection reset after {len(buf)}/{n} bytes")
            except socket.timeout:
                raise socket.timeout(
                    f"timed out after {len(buf)}/{n} bytes")
            if not chunk:
                raise Closed(f"EOF after {len(buf)}/{n} bytes")
            buf += chunk
        return bytes(buf)

    def pending(self, wait=0.2):
        """Bytes the server sent within `wait` seconds (b'' if none);
        raises Closed on EOF."""
        r, _, _ = select.select([self.sock], [], [], wait)
        if not r:
            return b""
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            raise Closed("connection reset")
        if not data:
            raise Closed("EOF")
        return data

    def wait_closed(self, timeout=5.0):
        """Waits until the server closes the connection.  Returns
        (closed, extra_bytes, seconds)."""
        t0 = time.time()
        extra = b""
        while True:
            left = timeout - (time.time() - t0)
            if left <= 0:
                return False, extra, time.time() - t0
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                continue
            try:
                data = self.sock.recv(1 << 20)
            except ConnectionResetError:
                return True, extra, time.time() - t0
            if not data:
                return True, extra, time.time() - t0
            extra += data

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    # --- handshake -------------------------------------------------------
    def greeting(self):
        """Reads the 18-byte greeting; returns the raw bytes."""
        return self.recv_exact(18)

    def read_greeting(self):
        g = self.greeting()
        magic, optmagic, hflags = struct.unpack(">QQH", g)
        if magic != NBD_MAGIC or optmagic != NBD_OPT_MAGIC:
            raise ProtocolError(f"bad greeting {g!r}")
        return hflags

    def send_client_flags(self, flags):
        self.send(struct.pack(">I", flags))

    def start(self, client_flags=FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
        hflags = self.read_greeting()
        self.send_client_flags(client_flags)
        self.no_zeroes = bool(client_flags & FLAG_C_NO_ZEROES)
        return hflags

    def send_option(self, opt, data=b"", magic=NBD_OPT_MAGIC, length=None):
        if length is None:
            length = len(data)
        self.send(struct.pack(">QII", magic, opt, length) + data)

    def recv_option_reply(self):
        hdr = self.recv_exact(20)
        magic, opt, rtype, length = struct.unpack(">QIII", hdr)
        if magic != NBD_REP_MAGIC:
            raise ProtocolError(f"bad option reply magic 0x{magic:x}")
        data = self.recv_exact(length) if length else b""
        return opt, rtype, data

    def option(self, opt, data=b""):
        """Sends one option and collects its replies up to the final one
        (ACK or an error).  Returns a list of (rtype, data); checks that
        every reply echoes the option number."""
        self.send_option(opt, data)
        out = []
        while True:
            ropt, rtype, rdata = self.recv_option_reply()
            if ropt != opt:
                raise ProtocolError(
                    f"reply for option {ropt}, expected {opt}")
            out.append((rtype, rdata))
            if rtype == REP_ACK or rtype & REP_FLAG_ERROR:
                return out

    @staticmethod
    def info_payload(name, infos=()):
        n = name.encode()
        return (struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos))
                + b"".join(struct.pack(">H", i) for i in infos))

    @staticmethod
    def parse_infos(replies):
        """dict of info type -> parsed value from INFO/GO replies."""
        infos = {}
        for rtype, data in replies:
            if rtype != REP_INFO:
                continue
            if len(data) < 2:
                raise ProtocolError(f"short NBD_REP_INFO ({len(data)} bytes)")
            it = struct.unpack(">H", data[:2])[0]
            body = data[2:]
            if it == INFO_EXPORT:
                if len(body) != 10:
                    raise ProtocolError(f"INFO_EXPORT of {len(data)} bytes, expected 12")
                infos[it] = struct.unpack(">QH", body)
            elif it == INFO_BLOCK_SIZE:
                if len(body) != 12:
                    raise ProtocolError(f"INFO_BLOCK_SIZE of {len(data)} bytes, expected 14")
                infos[it] = struct.unpack(">III", body)
            else:
                infos[it] = body
        return infos

    @staticmethod
    def meta_payload(name, queries):
        n = name.encode()
        out = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
        for q in queries:
            qb = q.encode()
            out += struct.pack(">I", len(qb)) + qb
        return out

    def set_meta_context(self, name, queries):
        reps = self.option(OPT_SET_META_CONTEXT, self.meta_payload(name, queries))
        ctx = {}
        for rtype, data in reps:
            if rtype == REP_META_CONTEXT:
                cid = struct.unpack(">I", data[:4])[0]
                ctx[data[4:].decode()] = cid
        return reps, ctx

    def go(self, name="", infos=(INFO_BLOCK_SIZE,)):
        """Sends GO; on success records size/flags and returns the info
        dict; on error raises ProtocolError with the reply type."""
        reps = self.option(OPT_GO, self.info_payload(name, infos))
        last = reps[-1][0]
        if last != REP_ACK:
            raise ProtocolError(f"GO failed: {rep_name(last)}")
        info = self.parse_infos(reps)
        if INFO_EXPORT not in info:
            raise ProtocolError("GO succeeded without NBD_INFO_EXPORT")
        self.export_size, self.export_flags = info[INFO_EXPORT]
        return info

    def handshake(self, name="", structured=False, extended=False,
                  contexts=()):
        """Full fixed-newstyle handshake ending in GO."""
        self.start()
        if extended:
            r = self.option(OPT_EXTENDED_HEADERS)
            if r[-1][0] != REP_ACK:
                raise ProtocolError(f"EXTENDED_HEADERS: {rep_name(r[-1][0])}")
            self.extended = True
            self.structured = True
        elif structured:
            r = self.option(OPT_STRUCTURED_REPLY)
            if r[-1][0] != REP_ACK:
                raise ProtocolError(f"STRUCTURED_REPLY: {rep_name(r[-1][0])}")
            self.structured = True
        if contexts:
            r, self.contexts = self.set_meta_context(name, list(contexts))
            if r[-1][0] != REP_ACK:
                raise ProtocolError(f"SET_META_CONTEXT: {rep_name(r[-1][0])}")
        return self.go(name)

    # --- transmission ----------------------------------------------------
    def request(self, cmd, cookie, offset=0, length=0, flags=0, payload=b"",
                magic=None, extended=None):
        """Sends one request (compact or extended according to negotiation
        unless `extended` is given).  For extended writes pass
        flags |= CMD_FLAG_PAYLOAD_LEN and length = len(payload)."""
        ext = self.extended if extended is None else extended
        if ext:
            m = NBD_EXTENDED_REQUEST_MAGIC if magic is None else magic
            hdr = struct.pack(">IHHQQQ", m, flags, cmd, cookie, offset, length)
        else:
            m = NBD_REQUEST_MAGIC if magic is None else magic
            hdr = struct.pack(">IHHQQI", m, flags, cmd, cookie, offset, length)
        if cmd == CMD_READ:
            self.read_lengths[cookie] = length
        self.send(hdr + payload)

    def header(self, cmd, cookie, offset=0, length=0, flags=0, magic=None):
        """The header bytes request() would send, without sending them."""
        if self.extended:
            m = NBD_EXTENDED_REQUEST_MAGIC if magic is None else magic
            return struct.pack(">IHHQQQ", m, flags, cmd, cookie, offset, length)
        m = NBD_REQUEST_MAGIC if magic is None else magic
        return struct.pack(">IHHQQI", m, flags, cmd, cookie, offset, length)

    def write(self, cookie, offset, data, flags=0):
        if self.extended:
            flags |= CMD_FLAG_PAYLOAD_LEN
        self.request(CMD_WRITE, cookie, offset, len(data), flags, data)

    def recv_reply(self):
        """Reads exactly one reply message (simple reply or one chunk)."""
        if self.stash:
            return self.stash.pop(0)
        return self._recv_reply()

    def _recv_reply(self):
        magic = struct.unpack(">I", self.recv_exact(4))[0]
        if magic == NBD_SIMPLE_REPLY_MAGIC:
            err, cookie = struct.unpack(">IQ", self.recv_exact(12))
            n = self.read_lengths.pop(cookie, 0)
            data = self.recv_exact(n) if (err == 0 and n) else b""
            return Reply("simple", cookie, error=err, length=len(data),
                         payload=data)
        if magic == NBD_STRUCTURED_REPLY_MAGIC:
            flags, typ, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
            payload = self.recv_exact(length) if length else b""
            r = Reply("structured", cookie, flags=flags, type=typ,
                      length=length, payload=payload)
        elif magic == NBD_EXTENDED_REPLY_MAGIC:
            flags, typ, cookie, offset, length = struct.unpack(
                ">HHQQQ", self.recv_exact(28))
            if length > (64 << 20):
                raise ProtocolError(f"extended reply length {length} is absurd")
            payload = self.recv_exact(length) if length else b""
            r = Reply("extended", cookie, flags=flags, type=typ,
                      offset=offset, length=length, payload=payload)
        else:
            raise ProtocolError(f"bad reply magic 0x{magic:08x}")
        if r.is_error:
            r.error = parse_error_payload(r.payload)[0]
        if r.done:
            self.read_lengths.pop(cookie, None)
        return r

    def reply_for(self, cookie):
        """All reply messages for `cookie`, up to and including the one
        with DONE (simple replies are complete by themselves).  Replies
        for other cookies are kept for later."""
        out = []
        while True:
            for i, r in enumerate(self.stash):
                if r.cookie == cookie:
                    self.stash.pop(i)
                    break
            else:
                r = self._recv_reply()
                if r.cookie != cookie:
                    self.stash.append(r)
                    continue
            out.append(r)
            if r.done:
                return out

    def read_data(self, chunks, offset, length):
        """Reassembles a read reply (list of Reply) into bytes; returns
        (data, error) where error is the first error code (0 if none)."""
        buf = bytearray(length)
        covered = 0
        for r in chunks:
            if r.kind == "simple":
                if r.error:
                    return None, r.error
                return r.payload, 0
            if r.is_error:
                return None, r.error
            if r.type == REPLY_TYPE_OFFSET_DATA:
                o = struct.unpack(">Q", r.payload[:8])[0]
                d = r.payload[8:]
                if o < offset or o + len(d) > offset + length:
                    raise ProtocolError(
                        f"OFFSET_DATA {o}+{len(d)} outside request {offset}+{length}")
                buf[o - offset:o - offset + len(d)] = d
                covered += len(d)
            elif r.type == REPLY_TYPE_OFFSET_HOLE:
                o, n = struct.unpack(">QI", r.payload)
                if o < offset or o + n > offset + length:
                    raise ProtocolError(
                        f"OFFSET_HOLE {o}+{n} outside request {offset}+{length}")
                buf[o - offset:o - offset + n] = bytes(n)
                covered += n
            elif r.type == REPLY_TYPE_NONE:
                pass
            else:
                raise ProtocolError(f"unexpected chunk type {r.type} in read reply")
        if covered != length:
            raise ProtocolError(f"read reply covered {covered} of {length} bytes")
        return bytes(buf), 0

    def read(self, cookie, offset, length, flags=0):
        self.request(CMD_READ, cookie, offset, length, flags)
        return self.read_data(self.reply_for(cookie), offset, length)

    def simple_cmd(self, cmd, cookie, offset=0, length=0, flags=0, payload=b""):
        """Sends one command and returns its error code (0 on success)."""
        if cmd == CMD_WRITE:
            self.write(cookie, offset, payload, flags)
        else:
            self.request(cmd, cookie, offset, length, flags, payload)
        reps = self.reply_for(cookie)
        for r in reps:
            if r.is_error:
                return r.error
        return 0

    def disc(self, cookie=0):
        self.request(CMD_DISC, cookie)


def parse_block_status(r):
    """(context id, [(length, flags), ...]) from a BLOCK_STATUS chunk;
    for BLOCK_STATUS_EXT also checks the descriptor count field."""
    p = r.payload
    if r.type == REPLY_TYPE_BLOCK_STATUS:
        if len(p) < 12 or (len(p) - 4) % 8:
            raise ProtocolError(f"BLOCK_STATUS payload of {len(p)} bytes")
        cid = struct.unpack(">I", p[:4])[0]
        ext = [struct.unpack(">II", p[i:i + 8]) for i in range(4, len(p), 8)]
        return cid, ext
    if r.type == REPLY_TYPE_BLOCK_STATUS_EXT:
        if len(p) < 24 or (len(p) - 8) % 16:
            raise ProtocolError(f"BLOCK_STATUS_EXT payload of {len(p)} bytes")
        cid, count = struct.unpack(">II", p[:8])
        ext = [struct.unpack(">QQ", p[i:i + 16]) for i in range(8, len(p), 16)]
        if count != len(ext):
            raise ProtocolError(
                f"BLOCK_STATUS_EXT count field {count} but {len(ext)} descriptors "
                f"(payload {len(p)} bytes)")
        return cid, ext
    raise ProtocolError(f"not a block status chunk: type {r.type}")


def file_layout(path, start=0, end=None):
    """[(offset, length, flags)] of `path` by SEEK_DATA/SEEK_HOLE, flags
    as base:allocation reports them (hole = HOLE|ZERO, data = 0)."""
    import os
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        end = size if end is None else min(end, size)
        off = start
        while off < end:
            try:
                d = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                d = end
            d = min(d, end)
            if d > off:
                out.append((off, d - off, STATE_HOLE | STATE_ZERO))
                off = d
                continue
            h = min(os.lseek(fd, off, os.SEEK_HOLE), end)
            out.append((off, h - off, 0))
            off = h
    finally:
        os.close(fd)
    return out


def merge_extents(exts):
    """Merges adjacent (offset, length, flags) with equal flags."""
    out = []
    for o, n, f in exts:
        if out and out[-1][2] == f and out[-1][0] + out[-1][1] == o:
            out[-1] = (out[-1][0], out[-1][1] + n, f)
        else:
            out.append((o, n, f))
    return out
