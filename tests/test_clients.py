"""The clients against real servers: several servers as one, threads, asyncio, misuse.

Every server is a `memlease_server.py` process on a loopback port the OS chose, stopped
by the fixture that started it.
"""

import asyncio
import contextlib
import random
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import pytest

from memlease.aio import AsyncMemLeaseClient
from memlease.cluster import (
    LeaseHandle,
    MemLeaseCluster,
    parse_handle,
    parse_server,
    parse_servers,
)
from memlease_client import (
    InvalidArgument,
    LeaseNotFound,
    MemLeaseClient,
    MemLeaseConnectionError,
    MemLeaseError,
    OutOfMemory,
    OutOfRange,
    TooLarge,
    client_tls_context,
)

SERVER = str(Path(__file__).resolve().parent.parent / "memlease_server.py")
TIMEOUT = 5.0


class Server:
    """A server process; ``port`` is read from its first line of output."""

    def __init__(self, pool: str, port: int = 0) -> None:
        self.pool = pool
        self.port = port
        # The server writes it; we read it through its name, with a file position of our
        # own: seeking the server's own descriptor would move where its next line goes.
        self.log = tempfile.NamedTemporaryFile()  # noqa: SIM115  # closed by stop()
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> "Server":
        """Start the process; one that does not come up is stopped, never left behind."""
        self.proc = subprocess.Popen(
            [sys.executable, SERVER, str(self.port), self.pool, "--bind", "127.0.0.1", "-q"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        try:
            assert wait_until(self._started, 10), "the server did not start"
            first = self._first_line().decode()
            assert first.startswith("starting server on port"), first
        except BaseException:
            self.stop()
            raise
        self.port = int(first.split()[-1])
        return self

    def _started(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, "the server exited"
        return self._first_line().endswith(b"\n")

    def _first_line(self) -> bytes:
        with open(self.log.name, "rb") as log:
            return log.readline()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(TIMEOUT)
        self.log.close()

    @property
    def name(self) -> str:
        return "127.0.0.1:%d" % self.port

    def client(self, **options: Any) -> MemLeaseClient:
        return MemLeaseClient("127.0.0.1", self.port, timeout=TIMEOUT, **options)


@contextlib.contextmanager
def servers(count: int, pool: str = "1M") -> Iterator[List[Server]]:
    started: List[Server] = []
    try:
        for _ in range(count):
            started.append(Server(pool).start())
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def server() -> Iterator[Server]:
    with servers(1) as (one,):
        yield one


def wait_until(condition: Callable[[], bool], seconds: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# The cluster.


def test_leases_spread_over_three_servers_and_read_back_through_each_server():
    with servers(3) as three, MemLeaseCluster([s.name for s in three], timeout=TIMEOUT) as c:
        handles = [c.lease(1000, 60000) for _ in range(30)]
        for n, handle in enumerate(handles):
            c.set(handle, b"lease %d" % n)
        placed = {s.name: [h for h in handles if h.server == s.name] for s in three}
        assert all(placed.values()), {name: len(h) for name, h in placed.items()}
        for s in three:
            with s.client() as direct:
                for handle in placed[s.name]:
                    n = handles.index(handle)
                    assert direct.get(handle.lease_id, 0, 16) == (b"lease %d" % n).ljust(16, b"\0")
        stats = c.stats()
        assert stats.total["live_leases"] == 30 and stats.down == {}
        assert sum(each["live_leases"] for each in stats.servers.values()) == 30
        assert stats.total["pool_bytes"] == 3 << 20


def test_handles_as_text_and_the_cluster_pipeline():
    with servers(2) as two, MemLeaseCluster([s.name for s in two], timeout=TIMEOUT) as c:
        handle = c.lease(64, 60000)
        text = str(handle)
        assert text == "%s/%s" % (handle.server, handle.lease_id)
        assert handle.lease_id.version == 4
        assert parse_handle(text) == handle
        c.set(text, b"by text")
        assert c.get(handle, 0, 7) == b"by text"
        pipe = c.pipeline()
        for _ in range(6):
            pipe.lease(32, 60000)
        pipe.get(text, 0, 2).release(handle)
        results = pipe.execute()
        assert all(isinstance(h, LeaseHandle) for h in results[:6])
        assert results[6:] == [b"by", None]
        with pytest.raises(LeaseNotFound):
            c.get(handle)
        results = c.pipeline().get(handle).renew(results[0], 1000).execute(raise_on_error=False)
        assert isinstance(results[0], LeaseNotFound) and results[1] is None


def test_a_stopped_server_fails_fast_and_takes_leases_again_after_restart():
    with servers(3) as three, MemLeaseCluster(
        [s.name for s in three], timeout=TIMEOUT, dead_timeout=0.5, stats_interval=0
    ) as c:
        victim = three[0]
        leases = [c.lease(64, 60000) for _ in range(30)]
        on_victim = next(h for h in leases if h.server == victim.name)
        victim.stop()
        with pytest.raises(MemLeaseConnectionError):
            c.get(on_victim)
        started = time.monotonic()
        with pytest.raises(MemLeaseConnectionError, match="marked down"):
            c.get(on_victim)
        assert time.monotonic() - started < 1.0  # no connection attempt at all
        later = [c.lease(64, 60000) for _ in range(20)]
        assert {h.server for h in later} == {three[1].name, three[2].name}
        assert victim.name in c.stats().down
        three[0] = Server("1M", victim.port).start()  # the same port; the fixture stops it
        assert wait_until(
            lambda: any(c.lease(64, 60000).server == victim.name for _ in range(10)), 10
        )
        assert three[0].client().stats()["live_leases"] > 0


def test_no_live_server_can_hold_the_lease():
    with servers(2, "64K") as two, MemLeaseCluster([s.name for s in two], timeout=TIMEOUT) as c:
        c.lease(40000, 60000)
        c.lease(40000, 60000)
        with pytest.raises(OutOfMemory):
            c.lease(40000, 60000)
        two[0].stop()
        two[1].stop()
        with pytest.raises(MemLeaseConnectionError):
            c.lease(32)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a", ["a:412"]),
        ("a:413,b", ["a:413", "b:412"]),
        ("[::1]:5,::1", ["[::1]:5", "[::1]:412"]),
    ],
)
def test_parse_servers(text, expected):
    assert parse_servers(text) == expected


@pytest.mark.parametrize("text", ["", "a:0", "a:x", "a:70000", "[::1", "a,a:412", ":412"])
def test_parse_servers_refuses_bad_lists(text):
    with pytest.raises(InvalidArgument):
        parse_servers(text)


@pytest.mark.parametrize("text", ["a:412", "a:412/", "a:412/0", "a:412/x", "/5", "a:412/-3"])
def test_parse_handle_refuses_bad_handles(text):
    with pytest.raises(InvalidArgument):
        parse_handle(text)


def test_a_handle_for_another_server_is_refused(server):
    with MemLeaseCluster([server.name], timeout=TIMEOUT) as c:
        with pytest.raises(InvalidArgument, match="not one of this cluster's"):
            c.get("other:412/5")
        with pytest.raises(TypeError):
            c.get(5)  # type: ignore[arg-type]
    assert parse_server("[::1]") == ("::1", 412)


# Threads.


def test_eight_threads_share_one_client(server):
    errors: List[BaseException] = []
    calls = [0] * 8
    together = threading.Barrier(8, timeout=TIMEOUT)
    with server.client(max_connections=4) as client:

        def worker(n: int) -> None:
            rng = random.Random(n)
            try:
                together.wait()
                lease_id = client.lease(256, 60000)
                for _ in range(200):
                    data = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 256)))
                    client.set(lease_id, data)
                    assert client.get(lease_id, 0, len(data)) == data
                    calls[n] += 2
                client.release(lease_id)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in threads)
        assert errors == [] and calls == [400] * 8
        stats = client.stats()
    assert stats["sets"] == 1600 and stats["live_leases"] == 0
    assert 1 < stats["connections"] <= 4


# asyncio.


def test_a_hundred_tasks_share_one_async_client(server):
    async def main() -> int:
        async with AsyncMemLeaseClient("127.0.0.1", server.port, timeout=TIMEOUT) as client:

            async def task(n: int) -> int:
                lease_id = await client.lease(64, 60000)
                for round_ in range(5):
                    data = b"task %d round %d" % (n, round_)
                    await client.set(lease_id, data)
                    assert await client.get(lease_id, 0, len(data)) == data
                await client.release(lease_id)
                return n

            done = await asyncio.gather(*(task(n) for n in range(100)))
            assert done == list(range(100))
            stats = await client.stats()
            return stats["connections"]

    assert asyncio.run(main()) == 1


def test_the_async_pipeline_and_its_errors(server):
    async def main() -> None:
        async with AsyncMemLeaseClient("127.0.0.1", server.port, timeout=TIMEOUT) as client:
            lease_id = await client.lease(64, 60000)
            pipe = client.pipeline()
            for n in range(50):
                pipe.set(lease_id, b"%02d" % n).get(lease_id, 0, 2)
            results = await pipe.execute()
            assert results[1::2] == [b"%02d" % n for n in range(50)]
            results = await client.pipeline().get(999).stats().execute(raise_on_error=False)
            assert isinstance(results[0], LeaseNotFound) and "free_bytes" in results[1]
            with pytest.raises(TooLarge):
                await client.set(lease_id, bytes(65))
            with pytest.raises(TypeError, match="bytes-like"):
                await client.set(lease_id, "text")  # type: ignore[arg-type]
            cancelled = asyncio.ensure_future(client.get(lease_id))
            await asyncio.sleep(0)  # its request is sent; its reply will be read and dropped
            cancelled.cancel()
            assert await client.get(lease_id, 0, 2) == b"49"
            big = bytes(range(256)) * 1024  # 256 KiB: a streamed frame
            large = await client.lease(len(big), 60000)
            await client.set(large, big)
            assert await client.get(large) == big

    asyncio.run(main())


def test_the_async_client_fails_cleanly_when_its_server_stops():
    async def main(one: Server) -> None:
        async with AsyncMemLeaseClient("127.0.0.1", one.port, timeout=TIMEOUT) as client:
            lease_id = await client.lease(64, 60000)
            one.stop()
            with pytest.raises(MemLeaseConnectionError):
                await client.get(lease_id)
            with pytest.raises(MemLeaseConnectionError, match="cannot connect"):
                await client.get(lease_id)

    with servers(1) as (one,):
        asyncio.run(main(one))


# TLS against a server that does not speak it.


def test_tls_against_a_plain_server_fails_cleanly(server):
    started = time.monotonic()
    client = server.client(tls=True)
    with client, pytest.raises(MemLeaseConnectionError, match="TLS handshake") as info:
        client.lease(32)
    assert "\n" not in str(info.value) and time.monotonic() - started < TIMEOUT + 2

    async def main() -> None:
        async with AsyncMemLeaseClient("127.0.0.1", server.port, tls=True) as client:
            with pytest.raises(MemLeaseConnectionError, match="TLS handshake"):
                await client.lease(32)

    asyncio.run(main())


def test_a_silent_server_times_out():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        client = MemLeaseClient("127.0.0.1", port, timeout=0.5, tls=True)
        with client, pytest.raises(MemLeaseConnectionError, match="no answer within 0.5s"):
            client.lease(32)

        async def main() -> None:
            async with AsyncMemLeaseClient("127.0.0.1", port, timeout=0.5) as client:
                with pytest.raises(MemLeaseConnectionError, match="did not answer within 0.5s"):
                    await client.lease(32)

        asyncio.run(main())


def test_client_tls_context():
    context = client_tls_context()
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    with pytest.raises(InvalidArgument, match="no-such-file"):
        client_tls_context(ca_file="/no-such-file.pem")


# Misuse of the API: our exceptions and our words.


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda c: c.lease(2**31), InvalidArgument, "size 2147483648 is over the largest lease"),
        (lambda c: c.lease(0), InvalidArgument, "size 0 must be positive"),
        (lambda c: c.lease(64, 2**31), InvalidArgument, "duration 2147483648 ms"),
        (lambda c: c.lease("64"), TypeError, "size must be an int, not str"),
        (lambda c: c.lease(64.0), TypeError, "size must be an int, not float"),
        (lambda c: c.lease(True), TypeError, "size must be an int, not bool"),
        (lambda c: c.set(1, "text"), TypeError, "encode it, e.g. 'text'.encode()"),
        (lambda c: c.set(1, 5), TypeError, "data must be bytes-like"),
        (lambda c: c.set(1, b"x", -1), OutOfRange, "offset -1 is outside any lease"),
        (lambda c: c.set(1, b"x", 2**40), OutOfRange, "offset 1099511627776"),
        (lambda c: c.set(1, b"x", 4, truncate=True), InvalidArgument, "truncate"),
        (lambda c: c.set(1, b"x", truncate=1), TypeError, "truncate must be a bool"),
        (lambda c: c.get(1, 0, -1), OutOfRange, "length -1"),
        (lambda c: c.get(1.5), TypeError, "lease id must be a uuid.UUID, its text or an int"),
        (lambda c: c.get("1"), InvalidArgument, "lease id '1' is not a UUID"),
        (lambda c: c.get(2**31), LeaseNotFound, "short ids are 1 to 2147483647"),
        (lambda c: c.get(uuid.UUID(int=1 << 100)), LeaseNotFound, "ids are version 4 UUIDs"),
        (lambda c: c.release(0), LeaseNotFound, "lease 0"),
        (lambda c: c.renew(1, -5), InvalidArgument, "duration -5 ms"),
        (lambda c: c.pool_map(0), InvalidArgument, "cells 0"),
        (lambda c: c.pipeline().set(1, "text"), TypeError, "bytes-like"),
    ],
)
def test_api_misuse_gets_our_exceptions(server, call, error, words):
    with server.client() as client:
        with pytest.raises(error, match=re.escape(words)) as info:
            call(client)
        stats = client.stats()
    assert stats["leases_granted"] + stats["leases_refused"] + stats["sets"] + stats["gets"] == 0
    if issubclass(error, MemLeaseError):
        assert info.value.status is not None and info.value.status < 0


@pytest.mark.parametrize(
    "options, error",
    [
        (dict(port=0), InvalidArgument),
        (dict(port="412"), TypeError),
        (dict(timeout=0), InvalidArgument),
        (dict(timeout="5"), TypeError),
        (dict(tls="yes"), TypeError),
        (dict(token=5), TypeError),
        (dict(max_connections=0), InvalidArgument),
    ],
)
def test_constructor_misuse(options, error):
    arguments = dict(host="127.0.0.1", port=412)
    arguments.update(options)
    with pytest.raises(error):
        MemLeaseClient(**arguments)


# Large values and new messages.


def test_a_large_value_round_trips_from_a_memoryview(server):
    data = bytes(range(256)) * 1200
    with server.client() as client:
        lease_id = client.lease(len(data), 60000)
        client.set(lease_id, memoryview(bytearray(data)))
        assert client.get(lease_id) == data
        assert client.get(lease_id, 100_000, 100_000) == data[100_000:200_000]


def test_set_with_truncate_zeroes_the_rest(server):
    with server.client() as client:
        lease_id = client.lease(16, 60000)
        client.set(lease_id, b"hello world")
        client.set(lease_id, b"hi", truncate=True)
        assert client.get(lease_id) == b"hi".ljust(16, b"\0")
        pool = client.pool_map(4)
        assert pool.pool_bytes == 1 << 20 and len(pool.used) == 4


def test_cluster_stats_take_the_largest_where_a_sum_means_nothing():
    with servers(2) as (split, whole), MemLeaseCluster([split.name, whole.name]) as c:
        with split.client() as direct:
            direct.lease(256 << 10, 60000)  # free: blocks of 256 KiB and 512 KiB
        # Both up a second or more, so that a sum of their uptimes is not their largest.
        assert wait_until(lambda: min(s["uptime"] for s in c.stats().servers.values()) >= 1)
        stats = c.stats()
    each = [stats.servers[split.name], stats.servers[whole.name]]
    assert [s["free_bytes"] for s in each] == [768 << 10, 1 << 20]
    assert [s["largest_free_block"] for s in each] == [512 << 10, 1 << 20]
    assert stats.total["free_bytes"] == 1792 << 10
    assert stats.total["largest_free_block"] == 1 << 20  # a lease fits in one server
    assert stats.total["fragmentation"] == 1000 * (768 << 10) // (1792 << 10) == 428
    assert stats.total["uptime"] == max(s["uptime"] for s in each)
    for additive in ("pool_bytes", "live_leases", "metadata_bytes", "tenant_bytes"):
        assert stats.total[additive] == sum(s[additive] for s in each), additive


def test_cluster_fragmentation_is_zero_when_nothing_is_free():
    with servers(2, "4K") as two, MemLeaseCluster([s.name for s in two]) as c:
        for s in two:
            with s.client() as direct:
                direct.lease(4096, 60000)
        stats = c.stats()
    assert stats.total["free_bytes"] == 0 and stats.total["fragmentation"] == 0
