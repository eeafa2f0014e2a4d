#!/usr/bin/env python3
"""A small client of the llm-engine wire protocol (engine/protocol.h).

For tests and the benchmark; the layouts here mirror protocol.h exactly
(little-endian, 16-byte header, u16-length strings).

    from llm_proto import Client
    c = Client("unix:/run/ngx_llm/engine.sock")
    info = c.hello()
    res = c.generate([1, 2, 3], max_tokens=16)    # greedy
    print(res.tokens, res.finish, res.usage)

Command line:

    llm_proto.py ADDR hello
    llm_proto.py ADDR stats
    llm_proto.py ADDR generate 1,2,3 [--max-tokens N] [--temperature T]
                 [--adapter NAME]
    llm_proto.py ADDR adapters
    llm_proto.py ADDR load NAME [DIR]
    llm_proto.py ADDR unload NAME
"""

import argparse
import socket
import struct
import sys
import time

MAGIC = 0x504D4C4C          # bytes b"LLMP"
VERSION = 1
HEADER = struct.Struct("<IHHII")
HEADER_SIZE = 16
MAX_PAYLOAD = 4 << 20

HELLO, HELLO_OK, SUBMIT, CANCEL, TOKENS, DONE, ERROR = 1, 2, 3, 4, 5, 6, 7
STATS_REQ, STATS, PING, PONG = 8, 9, 10, 11
ADAPTER_LOAD, ADAPTER_UNLOAD, ADAPTER_OK = 16, 17, 18
ADAPTER_LIST, ADAPTERS = 19, 20

TYPE_NAMES = {
    1: "HELLO", 2: "HELLO_OK", 3: "SUBMIT", 4: "CANCEL", 5: "TOKENS",
    6: "DONE", 7: "ERROR", 8: "STATS_REQ", 9: "STATS", 10: "PING",
    11: "PONG", 16: "ADAPTER_LOAD", 17: "ADAPTER_UNLOAD", 18: "ADAPTER_OK",
    19: "ADAPTER_LIST", 20: "ADAPTERS",
}

# ADAPTERS entry flags
A_LOADED, A_RESIDENT = 1, 2

# ERROR codes
E_BAD_REQUEST, E_CONTEXT, E_OVERLOADED, E_DRAINING, E_INTERNAL = 1, 2, 3, 4, 5
E_NOT_FOUND, E_VERSION, E_PROTOCOL, E_DUPLICATE, E_UNSUPPORTED = 6, 7, 8, 9, 10

# DONE finish reasons
FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED, FINISH_ERROR = 1, 2, 3, 4
FINISH_NAMES = {1: "stop", 2: "length", 3: "cancelled", 4: "error"}

# SUBMIT flags
F_HAS_SEED, F_IGNORE_EOS, F_LOGPROBS = 1, 2, 4
# TOKENS flags
T_LOGPROBS = 1

STATS_FIELDS = (
    "waiting", "running", "kv_blocks_total", "kv_blocks_used", "block_size",
    "connections", "max_seqs", "last_batch_tokens", "last_batch_seqs",
    "draining", "steps", "tokens_prefilled", "tokens_generated",
    "preemptions", "requests_total", "requests_rejected", "uptime_ms",
)
# the part added with adapters (absent from older engines)
STATS_ADAPTER_FIELDS = (
    "adapters_registered", "adapters_loaded", "adapters_resident",
    "_reserved", "adapter_host_bytes", "adapter_device_bytes",
    "adapter_loads", "adapter_uploads", "adapter_host_evictions",
    "adapter_device_evictions",
)
STATS_PREFIX_FIELDS = (
    "prefix_blocks_cached", "prefix_blocks_reusable", "prefix_lookups",
    "prefix_hit_tokens", "prefix_tier_hit_tokens", "prefix_evictions",
    "tier_connected", "tier_enabled", "tier_puts", "tier_put_bytes",
    "tier_puts_dropped", "tier_lookups", "tier_blocks_hit",
    "tier_blocks_missed", "tier_corrupt", "tier_errors",
    "prefix_bytes_cached", "tier_stored_bytes",
)


class ProtocolError(Exception):
    pass


class EngineError(Exception):
    """An ERROR frame: .code (E_*), .message, .req_id."""

    def __init__(self, code, message, req_id=0):
        super().__init__("engine error %d: %s" % (code, message))
        self.code = code
        self.message = message
        self.req_id = req_id


# ---- encoding ----------------------------------------------------------

def frame(ftype, req_id, payload=b"", version=VERSION):
    return HEADER.pack(MAGIC, version, ftype, len(payload), req_id) + payload


def _str(s):
    b = s.encode() if isinstance(s, str) else bytes(s or b"")
    return struct.pack("<H", len(b)) + b


def _ids(ids, count_fmt):
    ids = list(ids)
    return struct.pack("<" + count_fmt, len(ids)) + \
        struct.pack("<%di" % len(ids), *ids)


def encode_hello(client_name="llm_proto.py", min_version=1,
                 max_version=VERSION):
    return frame(HELLO, 0, struct.pack("<HHI", min_version, max_version, 0)
                 + _str(client_name), version=1)


def encode_submit(req_id, prompt, max_tokens=16, temperature=0.0, top_k=0,
                  top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                  frequency_penalty=0.0, presence_penalty=0.0, seed=None,
                  ignore_eos=False, logprobs=False, top_logprobs=0,
                  priority=0, weight=0, queue_timeout_ms=0, tenant="",
                  adapter="", cache_namespace="", stop_ids=(),
                  cache_shared_namespace="", cache_shared_tokens=0):
    flags = 0
    if seed is not None:
        flags |= F_HAS_SEED
    if ignore_eos:
        flags |= F_IGNORE_EOS
    if logprobs or top_logprobs:
        flags |= F_LOGPROBS
    p = struct.pack("<IfifffffQHBBHHI", max_tokens, temperature, top_k,
                    top_p, min_p, repetition_penalty, frequency_penalty,
                    presence_penalty, seed or 0, flags, top_logprobs,
                    priority, weight, 0, queue_timeout_ms)
    p += _str(tenant) + _str(adapter) + _str(cache_namespace)
    p += _ids(stop_ids, "H") + _ids(prompt, "I")
    p += _str(cache_shared_namespace)
    p += struct.pack("<I", cache_shared_tokens)
    return frame(SUBMIT, req_id, p)


# ---- decoding ----------------------------------------------------------

class Reader:
    def __init__(self, data):
        self.d = data
        self.o = 0

    def take(self, n):
        if self.o + n > len(self.d):
            raise ProtocolError("truncated payload")
        b = self.d[self.o:self.o + n]
        self.o += n
        return b

    def unpack(self, fmt):
        s = struct.Struct("<" + fmt)
        return s.unpack(self.take(s.size))

    def str(self):
        (n,) = self.unpack("H")
        return self.take(n).decode(errors="replace")

    def end(self):
        if self.o != len(self.d):
            raise ProtocolError("%d trailing bytes" % (len(self.d) - self.o))


def decode_hello_ok(p):
    r = Reader(p)
    (version, _, flags, n_ctx, n_vocab, block_size, max_seqs, kv_total,
     bos, eos) = r.unpack("HHIIIIIIii")
    fp = r.take(32)
    name, arch, server = r.str(), r.str(), r.str()
    (n_eog,) = r.unpack("H")
    eog = list(r.unpack("%di" % n_eog))
    r.end()
    return dict(version=version, flags=flags, n_ctx=n_ctx, n_vocab=n_vocab,
                block_size=block_size, max_seqs=max_seqs,
                kv_blocks_total=kv_total, bos_id=bos, eos_id=eos,
                fingerprint=fp.hex(), model_name=name, arch=arch,
                server_name=server, eog_ids=eog)


def decode_tokens(p):
    """[(id, logprob or None, [(top_id, top_logprob), ...]), ...]"""
    r = Reader(p)
    n, flags, _ = r.unpack("HBB")
    out = []
    for _ in range(n):
        (tid,) = r.unpack("i")
        lp, top = None, []
        if flags & T_LOGPROBS:
            lp, n_top = r.unpack("fB")
            for _ in range(n_top):
                top.append(r.unpack("if"))
        out.append((tid, lp, top))
    r.end()
    return out


def decode_done(p):
    r = Reader(p)
    finish, _, _, _ = r.unpack("BBBB")
    vals = r.unpack("IIIIIII")
    msg = r.str()
    r.end()
    keys = ("prompt_tokens", "completion_tokens", "cached_tokens",
            "queue_ms", "ttft_ms", "total_ms", "preemptions")
    d = dict(zip(keys, vals))
    d["finish"] = FINISH_NAMES.get(finish, str(finish))
    d["message"] = msg
    return d


def decode_error(p):
    r = Reader(p)
    code, _ = r.unpack("HH")
    msg = r.str()
    r.end()
    return code, msg


def decode_stats(p):
    r = Reader(p)
    d = dict(zip(STATS_FIELDS, r.unpack("10I7Q")))
    if r.o < len(r.d):
        d.update(zip(STATS_ADAPTER_FIELDS, r.unpack("4I6Q")))
        del d["_reserved"]
    if r.o < len(r.d):
        d.update(zip(STATS_PREFIX_FIELDS, r.unpack("2I4Q2I10Q")))
    r.end()
    return d


def encode_adapter_load(req_id, name, path=""):
    return frame(ADAPTER_LOAD, req_id, _str(name) + _str(path))


def encode_adapter_unload(req_id, name):
    return frame(ADAPTER_UNLOAD, req_id, _str(name))


def decode_adapter_ok(p):
    r = Reader(p)
    name, version = r.str(), r.str()
    max_rank, nbytes = r.unpack("IQ")
    r.end()
    return dict(name=name, version=version, max_rank=max_rank,
                bytes=nbytes)


def decode_adapters(p):
    """{"total": n_total, "adapters": [{name, version, loaded, resident,
    max_rank, bytes}, ...]}"""
    r = Reader(p)
    total, n = r.unpack("II")
    out = []
    for _ in range(n):
        name, version = r.str(), r.str()
        flags, _, _, _, max_rank, nbytes = r.unpack("BBBBIQ")
        out.append(dict(name=name, version=version,
                        loaded=bool(flags & A_LOADED),
                        resident=bool(flags & A_RESIDENT),
                        max_rank=max_rank, bytes=nbytes))
    r.end()
    return dict(total=total, adapters=out)


# ---- client ------------------------------------------------------------

class Result:
    def __init__(self, req_id):
        self.req_id = req_id
        self.tokens = []
        self.logprobs = []
        self.top = []
        self.done = None        # DONE dict
        self.error = None       # (code, message)
        self.t_submit = time.monotonic()
        self.t_first = None

    @property
    def finished(self):
        return self.done is not None or self.error is not None

    @property
    def finish(self):
        return self.done["finish"] if self.done else None


def parse_addr(addr):
    if addr.startswith("unix:"):
        return socket.AF_UNIX, addr[5:]
    host, _, port = addr.rpartition(":")
    return socket.AF_INET, (host or "127.0.0.1", int(port))


class Client:
    """One connection.  Several requests may be in flight; poll() reads
    frames and files them into Result objects by request id."""

    def __init__(self, addr, timeout=60.0, hello=False):
        fam, where = parse_addr(addr)
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(where)
        self.timeout = timeout
        self.buf = b""
        self.results = {}
        self.next_id = 1
        self.info = None
        self.replies = {}       # req_id -> (type, payload) for STATS/PONG
        self.pending = set()    # ids of STATS/PING/ADAPTER_* requests
        self.conn_errors = []
        self.closed = False
        if hello:
            self.hello()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def send(self, data):
        self.sock.sendall(data)

    def recv_frame(self, timeout=None):
        """(type, req_id, payload) or None at EOF."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            if len(self.buf) >= HEADER_SIZE:
                magic, ver, ftype, n, rid = HEADER.unpack_from(self.buf)
                if magic != MAGIC:
                    raise ProtocolError("bad magic from server")
                if n > MAX_PAYLOAD:
                    raise ProtocolError("payload too large")
                if len(self.buf) >= HEADER_SIZE + n:
                    p = self.buf[HEADER_SIZE:HEADER_SIZE + n]
                    self.buf = self.buf[HEADER_SIZE + n:]
                    return ftype, rid, p
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame from the engine")
            self.sock.settimeout(left)
            try:
                d = self.sock.recv(1 << 16)
            except ConnectionResetError:
                d = b""
            if not d:
                self.closed = True
                return None
            self.buf += d

    def hello(self, name="llm_proto.py", min_version=1, max_version=VERSION):
        self.send(encode_hello(name, min_version, max_version))
        fr = self.recv_frame()
        if fr is None:
            raise ProtocolError("connection closed during HELLO")
        ftype, rid, p = fr
        if ftype == ERROR:
            raise EngineError(*decode_error(p), req_id=rid)
        if ftype != HELLO_OK:
            raise ProtocolError("expected HELLO_OK, got %d" % ftype)
        self.info = decode_hello_ok(p)
        return self.info

    def _new_id(self):
        rid = self.next_id
        self.next_id += 1
        return rid

    def submit(self, prompt, req_id=None, **kw):
        rid = req_id if req_id is not None else self._new_id()
        res = Result(rid)
        self.results[rid] = res
        self.send(encode_submit(rid, prompt, **kw))
        return res

    def cancel(self, req_id):
        self.send(frame(CANCEL, req_id))

    def handle(self, fr):
        ftype, rid, p = fr
        if ftype == TOKENS:
            res = self.results.get(rid)
            if res is None:
                raise ProtocolError("TOKENS for unknown request %d" % rid)
            if res.t_first is None:
                res.t_first = time.monotonic()
            for tid, lp, top in decode_tokens(p):
                res.tokens.append(tid)
                res.logprobs.append(lp)
                res.top.append(top)
        elif ftype == DONE:
            res = self.results.get(rid)
            if res is None:
                raise ProtocolError("DONE for unknown request %d" % rid)
            res.done = decode_done(p)
        elif ftype == ERROR:
            code, msg = decode_error(p)
            res = self.results.get(rid) if rid else None
            if res is not None:
                res.error = (code, msg)
            elif rid in self.pending:
                self.replies[rid] = (ftype, p)
            else:
                self.conn_errors.append((code, msg))
        elif ftype in (STATS, PONG, ADAPTER_OK, ADAPTERS):
            self.replies[rid] = (ftype, p)
        else:
            raise ProtocolError("unexpected frame type %d" % ftype)
        return ftype

    def poll(self, timeout=None):
        """Reads and files one frame; returns its type, or None at EOF."""
        fr = self.recv_frame(timeout)
        if fr is None:
            return None
        return self.handle(fr)

    def wait(self, results, timeout=None):
        """Reads until every Result in results is finished."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while not all(r.finished for r in results):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("requests did not finish")
            if self.poll(left) is None:
                raise ConnectionError("engine closed the connection")
        return results

    def generate(self, prompt, **kw):
        timeout = kw.pop("timeout", None)
        res = self.submit(prompt, **kw)
        self.wait([res], timeout)
        return res

    def _request(self, ftype, want, data=None):
        """Sends a request (an empty frame of ftype, or the frame data
        makes for an id) and returns the payload of its answer; an ERROR
        answer raises EngineError."""
        rid = self._new_id()
        self.pending.add(rid)
        try:
            self.send(data(rid) if data else frame(ftype, rid))
            deadline = time.monotonic() + self.timeout
            while rid not in self.replies:
                if self.poll(deadline - time.monotonic()) is None:
                    raise ConnectionError("engine closed the connection")
        finally:
            self.pending.discard(rid)
        t, p = self.replies.pop(rid)
        if t == ERROR:
            raise EngineError(*decode_error(p), req_id=rid)
        if t != want:
            raise ProtocolError("expected type %d, got %d" % (want, t))
        return p

    def adapter_load(self, name, path=""):
        """Registers (or replaces) name from the folder path; returns the
        ADAPTER_OK dict, raises EngineError if refused."""
        return decode_adapter_ok(self._request(
            ADAPTER_LOAD, ADAPTER_OK,
            lambda rid: encode_adapter_load(rid, name, path)))

    def adapter_unload(self, name):
        return decode_adapter_ok(self._request(
            ADAPTER_UNLOAD, ADAPTER_OK,
            lambda rid: encode_adapter_unload(rid, name)))

    def adapters(self):
        return decode_adapters(self._request(ADAPTER_LIST, ADAPTERS))

    def stats(self):
        return decode_stats(self._request(STATS_REQ, STATS))

    def ping(self):
        self._request(PING, PONG)
        return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("addr", help="unix:PATH or HOST:PORT")
    ap.add_argument("cmd", choices=("hello", "stats", "generate", "ping",
                                    "adapters", "load", "unload"))
    ap.add_argument("prompt", nargs="?", default="",
                    help="comma-separated token ids (generate), or the "
                         "adapter name (load, unload)")
    ap.add_argument("path", nargs="?", default="",
                    help="adapter folder (load)")
    ap.add_argument("--adapter", default="")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int)
    a = ap.parse_args(argv)
    with Client(a.addr) as c:
        info = c.hello()
        if a.cmd == "hello":
            print(info)
        elif a.cmd == "stats":
            print(c.stats())
        elif a.cmd == "ping":
            print(c.ping())
        elif a.cmd in ("adapters", "load", "unload"):
            try:
                if a.cmd == "adapters":
                    print(c.adapters())
                elif a.cmd == "load":
                    print(c.adapter_load(a.prompt, a.path))
                else:
                    print(c.adapter_unload(a.prompt))
            except EngineError as e:
                print("error", e.code, e.message)
                return 1
        else:
            ids = [int(x) for x in a.prompt.split(",") if x.strip()]
            r = c.generate(ids, max_tokens=a.max_tokens,
                           temperature=a.temperature, seed=a.seed,
                           adapter=a.adapter)
            if r.error:
                print("error", r.error)
                return 1
            print(" ".join(map(str, r.tokens)))
            print(r.done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
