#!/usr/bin/env python3
"""Side-by-side benchmark: MemoryLease against memcached, on loopback, stdlib only.

Both servers run on ports from the OS and are driven by the same multi-process load
generator with 100-byte values; each scenario alternates the targets within every
repetition and reports medians, so the ratio is measured under the same machine load.
A third target, the "python floor", frames each request on a selectors loop and answers
it with a canned reply: what a Python server costs before it does any work, a ceiling.
Our server is measured twice, on loopback TCP and on its Unix socket ("memlease unix").
Also: what one request costs in this process without sockets (decoding, the store, the
whole), 64 MiB values through the Python API against a raw loopback socket (and Redis),
10,000 idle connections, clients that never read a 128 MiB reply, the allocator's cost
per operation by pool size, the server's RSS, its descriptor count after 100,000
one-request connections (the original leaked one each), and the store at scale.

    python3 bench/bench_memlease.py            # about 8 minutes
    python3 bench/bench_memlease.py --quick    # about 1.5 minutes
    python3 bench/bench_memlease.py --section large   # one section: servers, request, large,
                                                # idle, slow-readers, allocator, memory,
                                                # descriptors, store
"""

import argparse
import io
import multiprocessing
import os
import random
import re
import selectors
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the program's modules

import protocol
from buddy import BuddyAllocator
from memlease.connection import Connection, Service
from memlease.store import LeaseStore
from memlease_client import MemLeaseClient

from launch import Target, free_port, start_ours, stop

VALUE = bytes(range(100))
BATCH = 100  # requests per pipelined batch


# The two targets, each as a minimal client speaking its own protocol.


def _cpu_seconds(pid: int) -> Tuple[float, float]:
    """User and system CPU time of a process so far, or zeros without /proc."""
    try:
        fields = Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise ConnectionError("server closed the connection")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _wire_id(lease_id: object) -> bytes:
    """The 16 bytes that name a lease the client returned (a UUID)."""
    assert isinstance(lease_id, uuid.UUID), "a MemoryLease 2 server grants UUIDs"
    return lease_id.bytes


def _set_frame(lease_id: bytes) -> bytes:
    """A 100-byte set, as our client sends it for a UUID: Write at offset 0."""
    return protocol.Write(lease_id, 0, VALUE).encode()


def _get_frame(lease_id: bytes) -> bytes:
    """A whole-lease get, as our client sends it for a UUID: Read from 0 to the end."""
    return protocol.Read(lease_id, 0, -1).encode()


class Session:
    """One connection's set and get requests, as bytes, with the size of each reply."""

    def __init__(self, target: Target, key: int) -> None:
        self.target = target
        if target.name == "memcached":
            name = b"k%d" % key
            self.set_request = b"set %s 0 0 %d\r\n%s\r\n" % (name, len(VALUE), VALUE)
            self.set_reply = len(b"STORED\r\n")
            self.get_request = b"get %s\r\n" % name
            self.get_reply = len(b"VALUE %s 0 %d\r\n\r\nEND\r\n" % (name, len(VALUE))) + len(VALUE)
        else:
            # The messages our client sends for a lease it got by Grant: Write and Read.
            with our_client(target) as client:
                lease_id = client.lease(len(VALUE), 3_600_000)
            self.set_request = _set_frame(_wire_id(lease_id))
            self.set_reply = len(protocol.DataSet(0).encode())
            self.get_request = _get_frame(_wire_id(lease_id))
            self.get_reply = len(protocol.Data(0, VALUE).encode())
            self.lease_id = lease_id

    def connect(self) -> socket.socket:
        if self.target.unix:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect(self.target.unix)
            return sock
        sock = socket.create_connection(("127.0.0.1", self.target.port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


def our_client(target: Target, timeout: float = 10) -> MemLeaseClient:
    """Our API's client for the target: on its Unix socket, or on loopback TCP."""
    host = "unix:" + target.unix if target.unix else "127.0.0.1"
    return MemLeaseClient(host, target.port, timeout=timeout)


# Load generator: each worker process runs one scenario loop until the shared deadline.


class Result(NamedTuple):
    ops: int
    latencies: List[float]


def _persistent(session: Session, until: float) -> Result:
    sock = session.connect()
    ops, latencies = 0, []
    requests = ((session.set_request, session.set_reply), (session.get_request, session.get_reply))
    clock = time.perf_counter
    while clock() < until:
        for request, reply_size in requests:
            began = clock()
            sock.sendall(request)
            _recv_exact(sock, reply_size)
            latencies.append(clock() - began)
        ops += 2
    sock.close()
    return Result(ops, latencies)


# Closing with a reset leaves no TIME_WAIT behind: a run of one-shot connections would
# otherwise fill the loopback port range, slow every later connect() on the machine and
# make the load generator, not the server, the bottleneck.
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)


def _one_shot(session: Session, until: float) -> Result:
    ops = 0
    requests = ((session.set_request, session.set_reply), (session.get_request, session.get_reply))
    while time.perf_counter() < until:
        for request, reply_size in requests:
            with session.connect() as sock:
                sock.sendall(request)
                _recv_exact(sock, reply_size)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
        ops += 2
    return Result(ops, [])


def _pipelined(session: Session, until: float) -> Result:
    ops = 0
    if session.target.name == "memcached":
        sock = session.connect()
        batch = (session.set_request + session.get_request) * (BATCH // 2)
        reply_size = (session.set_reply + session.get_reply) * (BATCH // 2)
        while time.perf_counter() < until:
            sock.sendall(batch)
            _recv_exact(sock, reply_size)
            ops += BATCH
        sock.close()
        return Result(ops, [])
    # Ours goes through the Python API, as users would pipeline.
    with our_client(session.target) as client:
        while time.perf_counter() < until:
            pipe = client.pipeline()
            for _ in range(BATCH // 2):
                pipe.set(session.lease_id, VALUE).get(session.lease_id)
            results = pipe.execute()
            assert results[-1] == VALUE
            ops += BATCH
    return Result(ops, [])


SCENARIOS: Dict[str, Callable[[Session, float], Result]] = {
    "persistent": _persistent,
    "one-shot": _one_shot,
    "pipelined": _pipelined,
}


def _worker(args: Tuple[str, Target, int, float, float]) -> Result:
    scenario, target, key, start_at, seconds = args
    session = Session(target, key)
    time.sleep(max(0.0, start_at - time.time()))
    return SCENARIOS[scenario](session, time.perf_counter() + seconds)


def run_load(
    pool: "multiprocessing.pool.Pool", scenario: str, target: Target, clients: int, seconds: float
) -> Result:
    start_at = time.time() + 0.3
    jobs = [(scenario, target, key, start_at, seconds) for key in range(clients)]
    results = pool.map(_worker, jobs)
    return Result(sum(r.ops for r in results), [lat for r in results for lat in r.latencies])


# Servers.


def start_memcached() -> Optional[Tuple["subprocess.Popen[bytes]", Target]]:
    binary = shutil.which("memcached")
    if binary is None:
        return None
    port = free_port()
    user = ["-u", "root"] if os.geteuid() == 0 else []
    proc = subprocess.Popen(
        [binary, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "64", *user]
    )
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, Target("memcached", port, proc.pid)
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("memcached did not start")


def _floor_server(port_queue: "multiprocessing.Queue[int]") -> None:
    """The least a Python server on a selectors loop can do: frame each request and answer
    it with a canned reply of its type.  No store, no checks: a ceiling for ours."""
    replies = {
        protocol.ACCESS_DATA: protocol.Data(protocol.PROBE_ID, protocol.PROBE_TEXT).encode(),
        protocol.GRANT: protocol.Granted(uuid.uuid4().bytes).encode(),
        protocol.WRITE: protocol.DataSet(protocol.OK).encode(),
        protocol.READ: protocol.Data(0, VALUE).encode(),
    }
    selector = selectors.DefaultSelector()
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    listener.setblocking(False)
    selector.register(listener, selectors.EVENT_READ)
    port_queue.put(listener.getsockname()[1])
    while True:
        for key, _ in selector.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is listener:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                selector.register(conn, selectors.EVENT_READ, bytearray())
                continue
            try:
                data = sock.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                selector.unregister(sock)
                sock.close()
                continue
            buf, out, at = key.data, bytearray(), 0
            buf += data
            while len(buf) - at >= protocol.HEADER_SIZE:
                msg_type, length = protocol.HEADER.unpack_from(buf, at)
                if len(buf) - at < protocol.HEADER_SIZE + length:
                    break
                at += protocol.HEADER_SIZE + length
                out += replies[msg_type]
            del buf[:at]
            sock.send(out)  # replies to one read fit the socket's buffer on loopback


def start_floor() -> Tuple["multiprocessing.process.BaseProcess", Target]:
    context = multiprocessing.get_context("spawn")
    ports: multiprocessing.Queue[int] = context.Queue()
    process = context.Process(target=_floor_server, args=(ports,), daemon=True)
    process.start()
    return process, Target("python floor", ports.get(timeout=30), process.pid or 0)


# The parts of the report.


def percentile(values: List[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


PLAN = [
    ("persistent", 1), ("persistent", 4), ("persistent", 16),
    ("one-shot", 1), ("one-shot", 4),
    ("pipelined", 1), ("pipelined", 4),
]  # fmt: skip


def bench_servers(
    targets: List[Target], reps: int, seconds: float, plan: List[Tuple[str, int]]
) -> None:
    names = [t.name for t in targets]
    # Each server against memcached, when it is there.
    compared = [n for n in names if n != "memcached"] if "memcached" in names else []
    header = "| scenario | clients | " + " | ".join("%s ops/s" % n for n in names) + " |"
    header += "".join(" %s / memcached |" % n for n in compared)
    floor = "python floor" if "python floor" in names and "memlease" in names else None
    if floor:
        header += " memlease / python floor |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    latency_rows = []
    cpu_rows = []
    with multiprocessing.get_context("spawn").Pool(16) as pool:
        for scenario, clients in plan:
            rates: Dict[str, List[float]] = {n: [] for n in names}
            latencies: Dict[str, List[List[float]]] = {n: [] for n in names}
            # The server's CPU seconds per op, in its own code and in the kernel.
            cpu: Dict[str, List[float]] = {n: [] for n in names}
            kernel: Dict[str, List[float]] = {n: [] for n in names}
            for _ in range(reps):
                for target in targets:
                    user, system = _cpu_seconds(target.pid)
                    result = run_load(pool, scenario, target, clients, seconds)
                    user_after, system_after = _cpu_seconds(target.pid)
                    cpu[target.name].append((user_after - user) / result.ops)
                    kernel[target.name].append((system_after - system) / result.ops)
                    rates[target.name].append(result.ops / seconds)
                    latencies[target.name].append(result.latencies)
            medians = [statistics.median(rates[n]) for n in names]
            cpu_rows.append(
                "| %s | %d | %s |"
                % (
                    scenario,
                    clients,
                    " | ".join(
                        "%.1f + %.1f"
                        % (statistics.median(cpu[n]) * 1e6, statistics.median(kernel[n]) * 1e6)
                        for n in names
                    ),
                )
            )
            row = "| %s | %d | %s |" % (scenario, clients, " | ".join("%.0f" % m for m in medians))
            rate = dict(zip(names, medians))
            row += "".join(" %.2f |" % (rate[n] / rate["memcached"]) for n in compared)
            if floor:
                row += " %.2f |" % (rate["memlease"] / rate[floor])
            print(row, flush=True)
            if scenario == "persistent":
                for n in names:
                    p50 = statistics.median(percentile(lat, 0.50) for lat in latencies[n])
                    p99 = statistics.median(percentile(lat, 0.99) for lat in latencies[n])
                    latency_rows.append(
                        "| %s | %d | %.0f | %.0f |" % (n, clients, p50 * 1e6, p99 * 1e6)
                    )
    print()
    print("| persistent latency | clients | p50 us | p99 us |")
    print("|---|---|---|---|")
    for row in latency_rows:
        print(row)
    print()
    print("| server CPU per op, us: user + kernel | clients | " + " | ".join(names) + " |")
    print("|" + "---|" * (len(names) + 2))
    for row in cpu_rows:
        print(row)


_FRAME_HEAD = struct.Struct("<iq16s")  # a request's header and its lease id


def bench_request(reps: int, batches: int = 200) -> None:
    """What one 100-byte request costs in this process, without sockets: decoding it, the
    store's write or read, and the whole of it through a Connection (SET and GET alike),
    beside the least any Python server does per request: a bare loop that unpacks each
    frame's header and id, looks the id up in a dict, slices 100 bytes and appends them.
    The one pass's framing alone (its checks of each frame, no store) shows how much of
    the bare loop's time the framing takes before any lease is looked at."""
    store = LeaseStore(1 << 20)
    lease_id = store.lease(len(VALUE), 3_600_000, 0, 0)
    assert isinstance(lease_id, bytes)
    batch = (_set_frame(lease_id) + _get_frame(lease_id)) * (BATCH // 2)
    decoder = protocol.request_decoder()
    conn = Connection(Service(store), "bench")
    table = {lease_id: 0}
    pool = bytearray(1 << 20)

    def decode() -> None:
        decoder.feed(batch)
        while decoder.next_message() is not None:
            pass

    def frame_only() -> None:
        decoder.feed(batch)
        for _ in decoder.small_requests():
            pass

    def store_ops() -> None:
        for _ in range(BATCH // 2):
            store.write(lease_id, 0, VALUE)
            store.read(lease_id)

    def whole() -> None:
        conn.receive(batch)
        conn.sent(conn.output_size)

    def bare() -> None:
        out = bytearray()
        at, end, unpack = 0, len(batch), _FRAME_HEAD.unpack_from
        while at < end:
            _, length, key = unpack(batch, at)
            offset = table[key]
            out += pool[offset : offset + 100]
            at += protocol.HEADER_SIZE + length

    print()
    print("| one request, in this process | us (median of %d) |" % reps)
    print("|---|---|")
    parts = (
        ("decode", decode),
        ("store write or read", store_ops),
        ("all of it, through a Connection", whole),
        ("a bare loop: unpack_from + dict lookup + slice + append", bare),
        ("the one pass's framing alone (Decoder.small_requests, no store)", frame_only),
    )
    medians = {}
    for label, action in parts:
        times = []
        for _ in range(reps):
            began = time.perf_counter()
            for _ in range(batches):
                action()
            times.append((time.perf_counter() - began) / (batches * BATCH))
        medians[label] = statistics.median(times)
        print("| %s | %.2f |" % (label, medians[label] * 1e6))
    whole_label, bare_label, framing_label = parts[2][0], parts[3][0], parts[4][0]
    print("| all of it / the bare loop | %.2fx |" % (medians[whole_label] / medians[bare_label]))
    print(
        "| the framing alone / the bare loop | %.2fx |"
        % (medians[framing_label] / medians[bare_label])
    )


def bench_allocator(reps: int, operations: int) -> None:
    print()
    print("| allocator pool | alloc+free per second | cost vs 16 MiB |")
    print("|---|---|---|")
    base = None
    for label, pool_size in (("16 MiB", 16 << 20), ("1 GiB", 1 << 30), ("16 GiB", 16 << 30)):
        rates = []
        for rep in range(reps):
            rng = random.Random(rep)
            allocator = BuddyAllocator(pool_size)
            sizes = [rng.choice((32, 64, 100, 256, 1000, 4096)) for _ in range(operations)]
            live = [allocator.alloc(rng.choice((32, 100, 1000, 4096))) for _ in range(4000)]
            victims = [rng.randrange(4000) for _ in range(operations)]
            began = time.perf_counter()
            for size, victim in zip(sizes, victims):
                allocator.free(live[victim])  # type: ignore[arg-type]
                live[victim] = allocator.alloc(size)
            rates.append(operations / (time.perf_counter() - began))
        rate = statistics.median(rates)
        base = base or rate
        print("| %s | %.0f | %.2fx |" % (label, rate, base / rate))


def bench_memory() -> None:
    with tempfile.NamedTemporaryFile(mode="w+") as log:
        proc, target = start_ours("4G", log)
        try:
            with MemLeaseClient("127.0.0.1", target.port, timeout=10) as client:
                for _ in range(10):
                    lease_id = client.lease(1 << 20, 600_000)
                    client.set(lease_id, b"\xab" * (1 << 20))
            status = Path("/proc/%d/status" % proc.pid).read_text()
            rss_kib = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
        finally:
            stop(proc)
    print()
    print("| memory | server RSS |")
    print("|---|---|")
    print("| 4 GiB pool, 10 MiB leased and written | %.1f MiB |" % (rss_kib / 1024))


def bench_descriptors(connections: int) -> None:
    """One-request connections, the C++ client's way: the server must not keep any."""
    frame = protocol.AccessData(1).encode()
    with tempfile.NamedTemporaryFile(mode="w+") as log:
        proc, target = start_ours("1M", log)
        try:
            fd_dir = "/proc/%d/fd" % proc.pid
            before = len(os.listdir(fd_dir))
            began = time.perf_counter()
            for _ in range(connections):
                with socket.create_connection(("127.0.0.1", target.port), timeout=10) as sock:
                    sock.sendall(frame)
                    _recv_exact(sock, len(protocol.Data(1, b"").encode()))
            seconds = time.perf_counter() - began
            after = len(os.listdir(fd_dir))
            for _ in range(100):  # the last connections may still be closing
                if after <= before:
                    break
                time.sleep(0.05)
                after = len(os.listdir(fd_dir))
        finally:
            stop(proc)
    print()
    print("| descriptors | server's open descriptors |")
    print("|---|---|")
    print(
        "| %d one-request connections in %.1fs | %d before, %d after |"
        % (connections, seconds, before, after)
    )


# Large values: our API against a raw loopback socket and Redis, in the same run.

LARGE = 64 << 20


def _raw_peer(port_queue: "multiprocessing.Queue[int]", size: int) -> None:
    """The far end of a raw socket: takes ``size`` bytes and acks, then sends them back."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port_queue.put(listener.getsockname()[1])
        conn, _ = listener.accept()
        with conn:
            buffer = bytearray(size)
            while True:
                view, got = memoryview(buffer), 0
                while got < size:
                    n = conn.recv_into(view[got:])
                    if not n:
                        return
                    got += n
                conn.sendall(b"k")
                if conn.recv(1) != b"g":
                    return
                conn.sendall(view)


def _recv_into_all(sock: socket.socket, size: int) -> bytes:
    """``size`` bytes received into a fresh bytes object in one pass, as the client's
    get() receives a large value, so that the raw and Redis columns pay what ours does."""
    home = io.BytesIO(bytes(size))
    with home.getbuffer() as view:
        got = 0
        while got < size:
            n = sock.recv_into(view[got:])
            if not n:
                raise ConnectionError("closed")
            got += n
    return home.getvalue()


def _time(action: Callable[[], object]) -> float:
    began = time.perf_counter()
    action()
    return time.perf_counter() - began


def _raw_rates(reps: int) -> Tuple[float, float]:
    ctx = multiprocessing.get_context("spawn")
    ports: multiprocessing.Queue[int] = ctx.Queue()
    peer = ctx.Process(target=_raw_peer, args=(ports, LARGE))
    peer.start()
    data = os.urandom(LARGE)
    sends, receives = [], []
    try:
        with socket.create_connection(("127.0.0.1", ports.get(timeout=10)), timeout=30) as sock:

            def send() -> None:
                sock.sendall(data)
                sock.recv(1)

            def receive() -> None:
                sock.sendall(b"g")
                _recv_into_all(sock, LARGE)

            for _ in range(reps):
                sends.append(_time(send))
                receives.append(_time(receive))
    finally:
        peer.join(10)
        if peer.is_alive():
            peer.kill()
    return LARGE / statistics.median(sends), LARGE / statistics.median(receives)


def _ours_rates(reps: int) -> Tuple[float, float]:
    data = os.urandom(LARGE)
    with tempfile.NamedTemporaryFile(mode="w+") as log:
        proc, target = start_ours("256M", log)
        try:
            with MemLeaseClient("127.0.0.1", target.port, timeout=30) as client:
                lease_id = client.lease(LARGE, 3_600_000)
                sets = [_time(lambda: client.set(lease_id, data)) for _ in range(reps)]
                gets = [_time(lambda: client.get(lease_id)) for _ in range(reps)]
                assert client.get(lease_id) == data
        finally:
            stop(proc)
    return LARGE / statistics.median(sets), LARGE / statistics.median(gets)


def _redis_rates(reps: int) -> Optional[Tuple[float, float]]:
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--protected-mode", "no"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    data = os.urandom(LARGE)
    set_head = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$%d\r\n" % LARGE
    get_request = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
    get_head = b"$%d\r\n" % LARGE
    try:
        for _ in range(200):
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=30)
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError("redis-server did not start")
        with sock:

            def redis_set() -> None:
                sock.sendall(set_head)
                sock.sendall(data)
                sock.sendall(b"\r\n")
                assert _recv_exact(sock, 5) == b"+OK\r\n"

            def redis_get() -> None:
                sock.sendall(get_request)
                assert _recv_exact(sock, len(get_head)) == get_head
                _recv_into_all(sock, LARGE + 2)

            sets = [_time(redis_set) for _ in range(reps)]
            gets = [_time(redis_get) for _ in range(reps)]
    finally:
        stop(proc)
    return LARGE / statistics.median(sets), LARGE / statistics.median(gets)


def bench_large(reps: int) -> None:
    raw = _raw_rates(reps)
    ours = _ours_rates(reps)
    redis = _redis_rates(reps)
    print()
    print("| 64 MiB value | raw loopback socket GB/s | memlease API GB/s | ours/raw |"
          + (" Redis GB/s | Redis/raw |" if redis else ""))  # fmt: skip
    print("|---|---|---|---|" + ("---|---|" if redis else ""))
    for n, name in enumerate(("set", "get")):
        row = "| %s | %.2f | %.2f | %.2f |" % (name, raw[n] / 1e9, ours[n] / 1e9, ours[n] / raw[n])
        if redis:
            row += " %.2f | %.2f |" % (redis[n] / 1e9, redis[n] / raw[n])
        print(row)
    if redis is None:
        print("\nredis-server is not on PATH (Debian package 'redis-server'): column skipped.")


# Many connections and slow readers.


def _rss_kib(pid: int) -> int:
    status = Path("/proc/%d/status" % pid).read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]


def _round_trip(port: int) -> float:
    """Seconds for a new client to connect and get an answer."""
    began = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(protocol.AccessData(1).encode())
        _recv_exact(sock, len(protocol.Data(1, b"").encode()))
    return time.perf_counter() - began


def _raise_descriptor_limit(wanted: int) -> int:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        soft = min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def bench_idle(connections: int) -> None:
    limit = _raise_descriptor_limit(connections + 256)
    connections = min(connections, limit - 256)
    with tempfile.NamedTemporaryFile(mode="w+") as log:
        proc, target = start_ours("1M", log)
        sockets = []
        try:
            quiet = statistics.median(_round_trip(target.port) for _ in range(20))
            before = _rss_kib(proc.pid)
            for _ in range(connections):
                sockets.append(socket.create_connection(("127.0.0.1", target.port), timeout=10))
            with MemLeaseClient("127.0.0.1", target.port, timeout=30) as client:
                for _ in range(200):
                    if client.stats()["connections"] >= connections + 1:
                        break
                    time.sleep(0.05)
                opened = client.stats()["connections"] - 1
            per_connection = (_rss_kib(proc.pid) - before) * 1024 / max(opened, 1)
            busy = statistics.median(_round_trip(target.port) for _ in range(20))
        finally:
            for sock in sockets:
                sock.close()
            stop(proc)
    print()
    print("| idle connections | open | new client round trip, ms (median of 20) | "
          "server RSS per idle connection |")  # fmt: skip
    print("|---|---|---|---|")
    print("| none | 0 | %.2f | |" % (quiet * 1e3))
    print(
        "| %d | %d | %.2f | %.1f KiB |"
        % (connections, opened, busy * 1e3, per_connection / 1024)
    )


def bench_slow_readers(readers: int = 4, size: int = 128 << 20) -> None:
    with tempfile.NamedTemporaryFile(mode="w+") as log:
        proc, target = start_ours("1G", log)
        sockets = []
        try:
            with MemLeaseClient("127.0.0.1", target.port, timeout=30) as client:
                lease_id = client.lease(size, 3_600_000)
                client.set(lease_id, os.urandom(size))
                before = _rss_kib(proc.pid)
                for _ in range(readers):
                    sock = socket.create_connection(("127.0.0.1", target.port), timeout=10)
                    sock.sendall(_get_frame(_wire_id(lease_id)))
                    sockets.append(sock)  # and never read
                worst = 0.0
                deadline = time.perf_counter() + 2.0
                while time.perf_counter() < deadline:
                    began = time.perf_counter()
                    client.stats()
                    worst = max(worst, time.perf_counter() - began)
                grown = _rss_kib(proc.pid) - before
        finally:
            for sock in sockets:
                sock.close()
            stop(proc)
    print()
    print("| %d clients that never read a %d MiB get | server RSS growth | "
          "another client's slowest round trip (2 s of requests) |" % (readers, size >> 20))
    print("|---|---|---|")
    print("| | %.1f MiB | %.2f ms |" % (grown / 1024, worst * 1e3))


def bench_store_section(quick: bool) -> None:
    import bench_store  # imports launch, not this module

    print()
    for line in bench_store.run(quick):
        print(line)


SECTIONS = (
    "servers", "request", "large", "idle", "slow-readers", "allocator", "memory",
    "descriptors", "store",
)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer and shorter runs")
    parser.add_argument("--reps", type=int, help="repetitions per scenario (default 5, quick 3)")
    parser.add_argument("--seconds", type=float, help="seconds per run (default 2, quick 0.6)")
    parser.add_argument(
        "--only",
        metavar="SCENARIO",
        help="run only this server scenario, e.g. 'persistent' or 'one-shot:4'",
    )
    parser.add_argument("--section", choices=SECTIONS, help="run only this section")
    args = parser.parse_args()
    plan = [
        (scenario, clients)
        for scenario, clients in PLAN
        if args.only in (None, scenario, "%s:%d" % (scenario, clients))
    ]
    if not plan:
        parser.error("--only takes one of: " + ", ".join("%s:%d" % step for step in PLAN))
    sections = [args.section] if args.section else ["servers"] if args.only else list(SECTIONS)
    reps = args.reps or (3 if args.quick else 5)
    seconds = args.seconds or (0.6 if args.quick else 2.0)
    print(
        "# %s, Python %s, %d CPUs; %d reps of %.1fs, medians"
        % (time.strftime("%Y-%m-%d"), sys.version.split()[0], os.cpu_count() or 0, reps, seconds)
    )
    print()
    if "servers" in sections:
        with tempfile.NamedTemporaryFile(mode="w+") as log, tempfile.TemporaryDirectory() as run:
            os.chmod(run, 0o1777)  # as /tmp: a server started as root and run as nobody may
            unix = os.path.join(run, "memlease.sock")  # remove its socket there at the stop
            server, tcp_target = start_ours("64M", log, unix=unix)
            floor, floor_target = start_floor()
            memcached = start_memcached()
            try:
                targets = [tcp_target, tcp_target._replace(name="memlease unix", unix=unix)]
                targets.append(floor_target)
                if memcached is None:
                    print("memcached is not on PATH (Debian package 'memcached'): skipped.\n")
                else:
                    targets.append(memcached[1])
                bench_servers(targets, reps, seconds, plan)
            finally:
                stop(server)
                floor.terminate()
                floor.join(5)
                if memcached is not None:
                    stop(memcached[0])
    on_linux = os.path.exists("/proc/self/status")
    if "request" in sections:
        bench_request(reps)
    if "large" in sections:
        bench_large(reps)
    if "idle" in sections and on_linux:
        bench_idle(2_000 if args.quick else 10_000)
    if "slow-readers" in sections and on_linux:
        bench_slow_readers()
    if "allocator" in sections:
        bench_allocator(reps, 20_000 if args.quick else 100_000)
    if "memory" in sections and on_linux:
        bench_memory()
    if "descriptors" in sections and on_linux:
        bench_descriptors(10_000 if args.quick else 100_000)
    if "store" in sections and on_linux:
        bench_store_section(args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
