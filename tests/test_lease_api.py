"""The lease API (issue 19): ttl, leases, renew_many and keepalive, on the wire and
through the blocking, asyncio and cluster clients and the command line.

Every server is a real one on a loopback port from the OS (a loop in a thread, or a
process), stopped by the test that started it; waits are bounded and nothing is timed.
"""

import asyncio
import contextlib
import os
import re
import secrets
import select
import signal
import socket
import string
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

import protocol
from memlease import security
from memlease.aio import AsyncMemLeaseClient
from memlease.cluster import LeaseHandle, MemLeaseCluster
from memlease_client import (
    InvalidArgument,
    LeaseLost,
    LeaseNotFound,
    MemLeaseClient,
    MemLeaseConnectionError,
    MemLeaseProtocolError,
)
from tests.helpers import (
    CLIENT,
    TIMEOUT,
    UUID_PATTERN,
    client_for,
    closed_by_peer,
    connect,
    exchange,
    run_cli,
    server_process,
    server_thread,
    wait_for,
)
from tests.test_ids import original_server

ROOT = Path(__file__).resolve().parent.parent


def _short_forms(count: int) -> list:
    return [protocol.short_form(secrets.randbelow(protocol.INT32_MAX) + 1) for _ in range(count)]


# On the wire.


def _frames_of_the_worked_example() -> List[bytes]:
    """The request and reply frames of docs/protocol.md's worked example of the lease API:
    hex words of 8 digits or more, on a request or reply line and the lines that go on."""
    text = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    block = text.split("## Worked example (the lease API)", 1)[1].split("```")[1]
    frames: List[str] = []
    for line in block.splitlines():
        words = line.split()
        if words and words[0] in ("request", "reply"):
            frames.append("")
            words = words[1:]
        for word in words:
            if len(word) < 8 or not set(word) <= set(string.hexdigits):
                break
            frames[-1] += word
    return [bytes.fromhex(frame) for frame in frames]


def test_the_worked_example_of_docs_protocol_md():
    wide = uuid.UUID("0b8e6c1a-5d8f-4e0c-9a47-2f1d3c5b7e90").bytes
    short = protocol.short_form(123)
    messages = [
        protocol.TimeToLive(wide),
        protocol.TimeToLiveReply(4200, 5000, 1024),
        protocol.ListLeases(0, 1000),
        protocol.LeaseList(0, (protocol.LeaseRow(wide, 1024, 4200, 0),)),
        protocol.RenewMany(5000, (wide, short)),
        protocol.RenewManyReply((short,)),
    ]
    frames = _frames_of_the_worked_example()
    assert frames == [message.encode() for message in messages]
    for frame, message, decoder in zip(
        frames, messages, [protocol.request_decoder, protocol.reply_decoder] * 3
    ):
        decoding = decoder()
        decoding.feed(frame)
        assert decoding.next_message() == message


def test_the_three_requests_on_the_wire():
    with server_thread() as server, connect(server) as sock:
        (granted,) = exchange(sock, protocol.Grant(1000, 60000).encode())
        assert isinstance(granted, protocol.Granted)
        lease_id = granted.lease_id
        (ttl,) = exchange(sock, protocol.TimeToLive(lease_id).encode())
        assert isinstance(ttl, protocol.TimeToLiveReply)
        assert (ttl.granted_ms, ttl.size) == (60000, 1000) and 0 < ttl.remaining_ms <= 60000
        unknown = uuid.uuid4().bytes
        request = protocol.RenewMany(5000, (unknown, lease_id, unknown))
        assert exchange(sock, request.encode()) == [protocol.RenewManyReply((unknown, unknown))]
        (ttl,) = exchange(sock, protocol.TimeToLive(lease_id).encode())
        assert isinstance(ttl, protocol.TimeToLiveReply) and ttl.granted_ms == 5000
        (page,) = exchange(sock, protocol.ListLeases(0, 10).encode())
        assert isinstance(page, protocol.LeaseList) and page.next_cursor == 0
        assert [(row.lease_id, row.size, row.short_id) for row in page.rows] == [
            (lease_id, 1000, 0)
        ]
        assert exchange(sock, protocol.Release(lease_id).encode()) == [protocol.DataSet(0)]
        assert exchange(sock, protocol.TimeToLive(lease_id).encode()) == [protocol.DataSet(-1)]
        assert exchange(sock, protocol.ListLeases(0, 10).encode()) == [protocol.LeaseList(0, ())]
        for refused in (
            protocol.ListLeases(-1, 10),
            protocol.ListLeases(0, 0),
            protocol.RenewMany(0, (lease_id,)),
        ):
            assert exchange(sock, refused.encode()) == [protocol.DataSet(protocol.INVALID)]
    counts = server.service.request_counts()
    assert counts[("ttl", protocol.OK)] == 2 and counts[("ttl", protocol.NOT_FOUND)] == 1
    assert counts[("renew-many", protocol.OK)] == 1 and counts[("leases", protocol.OK)] == 2


def test_a_short_id_lease_is_listed_with_its_uuid_and_its_short_id():
    with server_thread() as server, connect(server) as sock:
        (leased,) = exchange(sock, protocol.Lease(32, 60000).encode())
        assert isinstance(leased, protocol.Leased) and leased.lease_id > 0
        (page,) = exchange(sock, protocol.ListLeases(0, 10).encode())
        assert isinstance(page, protocol.LeaseList)
        (row,) = page.rows
        assert row.short_id == leased.lease_id and uuid.UUID(bytes=row.lease_id).version == 4
        (ttl,) = exchange(sock, protocol.TimeToLive(row.lease_id).encode())  # by its UUID
        short = protocol.short_form(row.short_id)
        (by_short,) = exchange(sock, protocol.TimeToLive(short).encode())
        assert isinstance(ttl, protocol.TimeToLiveReply) and ttl.size == by_short.size == 32


def test_short_ids_in_one_renew_many_count_as_that_many_guesses():
    """A thousand guessed short ids in one request cost what a thousand requests would."""
    with server_thread() as server, connect(server) as sock:
        guesses = tuple(_short_forms(150))
        assert exchange(sock, protocol.RenewMany(1000, guesses).encode()) == [
            protocol.RenewManyReply(guesses)
        ]
        assert closed_by_peer(sock)
    assert server.service.counters["connections_closed_guessing"] == 1
    assert security.GUESS_MIN_MISSES <= 150


def test_misses_on_uuids_in_a_renew_many_are_no_guessing():
    with server_thread() as server, connect(server) as sock:
        gone = tuple(uuid.uuid4().bytes for _ in range(1000))
        for _ in range(3):
            assert exchange(sock, protocol.RenewMany(1000, gone).encode()) == [
                protocol.RenewManyReply(gone)
            ]
        (still_open,) = exchange(sock, protocol.Stats().encode())
        assert isinstance(still_open, protocol.StatsReply)
    assert server.service.counters["connections_closed_guessing"] == 0


# The blocking client.


@contextlib.contextmanager
def alice_and_bob() -> Iterator[Tuple[MemLeaseClient, MemLeaseClient]]:
    """Clients of two tenants of one server."""
    tenants = security.Tenants.parse("alice a-secret\nbob b-secret\n", "the file")
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(server_thread(service={"tenants": tenants}))
        alice = stack.enter_context(client_for(server, token="a-secret"))
        yield alice, stack.enter_context(client_for(server, token="b-secret"))


def test_ttl_says_the_time_left_the_last_duration_and_the_size():
    with server_thread() as server, client_for(server) as client:
        lease_id = client.lease(1000, 60000)
        ttl = client.ttl(lease_id)
        assert (ttl.granted_ms, ttl.size) == (60000, 1000) and 0 < ttl.remaining_ms <= 60000
        client.renew(lease_id, 30000)
        assert client.ttl(str(lease_id)).granted_ms == 30000  # its text names it too
        assert client.pipeline().ttl(lease_id).ttl(lease_id).execute()[1].size == 1000
        client.release(lease_id)
        with pytest.raises(LeaseNotFound):
            client.ttl(lease_id)


def test_leases_lists_only_the_callers_living_leases_over_several_pages():
    with alice_and_bob() as (alice, bob):
        mine = {alice.lease(32, 60000) for _ in range(2500)}
        theirs = {bob.lease(64, 60000) for _ in range(30)}
        released = alice.lease(32, 60000)
        alice.release(released)
        ended = alice.lease(32, 20)
        assert wait_for(lambda: _gone(alice, ended))  # it ended: it is not shown
        listed = list(alice.leases())
        assert len(listed) == len(mine) and {info.lease_id for info in listed} == mine
        assert all(info.size == 32 and 0 < info.remaining_ms <= 60000 for info in listed)
        assert {info.lease_id for info in bob.leases(page_size=7)} == theirs
        with pytest.raises(InvalidArgument):
            alice.leases(page_size=1001)


def _gone(client: MemLeaseClient, lease_id: object) -> bool:
    try:
        client.ttl(lease_id)  # type: ignore[arg-type]
    except LeaseNotFound:
        return True
    return False


def test_leases_takes_more_than_one_page_and_a_request_a_page():
    with server_thread() as server, client_for(server) as client:
        leased = {client.lease(32, 60000) for _ in range(2500)}
        assert {info.lease_id for info in client.leases()} == leased
        pages = server.service.request_counts()[("leases", protocol.OK)]
        assert 3 <= pages <= 2500 // 1000 + 1 + len(server.store._index) // 4096
        assert {info.lease_id for info in client.leases(page_size=1)} == leased


def test_renew_many_renews_the_living_and_returns_the_others_as_given():
    with server_thread() as server, client_for(server) as client:
        first, second, gone = (client.lease(32, 60000) for _ in range(3))
        client.release(gone)
        unknown = uuid.uuid4()
        missed = client.renew_many([first, str(second), gone, unknown, 12345], 90000)
        assert missed == [gone, unknown, 12345]
        assert client.ttl(first).granted_ms == client.ttl(second).granted_ms == 90000
        assert client.renew_many([], 1000) == []
        with pytest.raises(InvalidArgument):
            client.renew_many([first], 0)
        # More ids than one request takes go in several, in one round trip.
        assert client.renew_many([first, second] * 1250, 70000) == []
        assert client.ttl(second).granted_ms == 70000
    counts = server.service.request_counts()
    assert counts[("renew-many", protocol.OK)] == 1 + 3


def _keepalive_threads() -> int:
    return sum(thread.name.startswith("keepalive") for thread in threading.enumerate())


def test_keepalive_keeps_a_600_ms_lease_for_seconds_and_raises_lease_lost_when_released():
    with server_thread() as server, client_for(server) as client, client_for(server) as other:
        lease_id = client.lease(64, 600)
        with client.keepalive(lease_id) as keeper:
            time.sleep(2.0)  # more than three times its duration
            assert client.get(lease_id, 0, 1) == b"\0" and not keeper.lost
        assert client.ttl(lease_id).granted_ms == 600  # left to itself, not released
        assert server.stats()["leases_renewed"] >= 6 and _keepalive_threads() == 0
        with pytest.raises(LeaseLost) as raised, client.keepalive(lease_id) as keeper:
            other.release(lease_id)
            assert keeper.wait_lost(5.0) and keeper.lost
            assert isinstance(keeper.reason, LeaseNotFound)
        assert isinstance(raised.value.__cause__, LeaseNotFound)
        assert "was lost: it no longer exists" in str(raised.value)
        assert _keepalive_threads() == 0


def test_keepalive_releases_on_exit_when_asked_and_lets_the_blocks_error_through():
    with server_thread() as server, client_for(server) as client:
        released, kept = client.lease(64, 600), client.lease(64, 600)
        with client.keepalive(released, release=True) as keeper:
            assert not keeper.lost
        with pytest.raises(LeaseNotFound):
            client.ttl(released)
        with pytest.raises(ZeroDivisionError), client.keepalive(kept, release=False):
            1 / 0  # noqa: B018
        assert client.ttl(kept).size == 64 and _keepalive_threads() == 0
        with pytest.raises(LeaseNotFound):  # nothing to keep: no thread is started
            client.keepalive(released).__enter__()
        assert _keepalive_threads() == 0 and server.stats()["live_leases"] == 1


def test_keepalive_tries_again_through_a_dead_server_then_calls_the_lease_lost():
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(server_process("1M"))
        client = stack.enter_context(MemLeaseClient("127.0.0.1", server.port, timeout=1.0))
        lease_id = client.lease(64, 600)
        with pytest.raises(LeaseLost) as raised, client.keepalive(lease_id) as keeper:
            server.stop()
            assert keeper.wait_lost(5.0)
            assert isinstance(keeper.reason, MemLeaseConnectionError)
    assert "no renewal got through before it surely ended" in str(raised.value)
    assert _keepalive_threads() == 0


def test_against_the_original_the_lease_api_fails_at_once_instead_of_waiting():
    with original_server() as original:
        with MemLeaseClient("127.0.0.1", original.port, timeout=TIMEOUT) as client:
            lease_id = client.lease(32)
            assert client.server_version == 1  # the probe went in front, and told
            with pytest.raises(MemLeaseProtocolError, match="ttl: the C\\+\\+"):
                client.ttl(lease_id)
            with pytest.raises(MemLeaseProtocolError, match="renew-many: the C\\+\\+"):
                client.renew_many([lease_id], 1000)
            with pytest.raises(MemLeaseProtocolError, match="renew: the C\\+\\+"):
                client.renew(lease_id, 1000)
        # Nothing the original never answers was sent, to wait for.
        assert [msg_type for msg_type, _ in original.seen] == [protocol.ACCESS_DATA, 1]


# The asyncio client.


def _async_client(server: object) -> AsyncMemLeaseClient:
    host, port = server.server_address  # type: ignore[attr-defined]
    return AsyncMemLeaseClient(host, port, timeout=TIMEOUT)


def test_the_async_client_has_ttl_leases_and_renew_many():
    async def main(client: AsyncMemLeaseClient) -> None:
        async with client:
            leased = [await client.lease(32, 60000) for _ in range(1200)]
            assert (await client.ttl(leased[0])).granted_ms == 60000
            listed = [info.lease_id async for info in client.leases(page_size=500)]
            assert sorted(listed) == sorted(leased)
            await client.release(leased[0])
            assert await client.renew_many(leased[:3], 90000) == [leased[0]]
            assert (await client.ttl(leased[1])).granted_ms == 90000
            with pytest.raises(LeaseNotFound):
                await client.ttl(leased[0])

    with server_thread() as server:
        asyncio.run(main(_async_client(server)))
    assert server.service.request_counts()[("leases", protocol.OK)] >= 3


def _keepalive_tasks() -> int:
    tasks = asyncio.all_tasks()
    return sum(task.get_coro().__qualname__ == "AsyncKeepAlive._run" for task in tasks)


def test_async_keepalive_keeps_a_600_ms_lease_and_raises_lease_lost_when_released():
    async def main(client: AsyncMemLeaseClient, other: AsyncMemLeaseClient) -> None:
        async with client, other:
            lease_id = await client.lease(64, 600)
            async with client.keepalive(lease_id) as keeper:
                assert _keepalive_tasks() == 1
                await asyncio.sleep(2.0)  # more than three times its duration
                assert await client.get(lease_id, 0, 1) == b"\0" and not keeper.lost
            assert (await client.ttl(lease_id)).granted_ms == 600
            with pytest.raises(LeaseLost) as raised:
                async with client.keepalive(lease_id) as keeper:
                    await other.release(lease_id)
                    for _ in range(500):  # bounded: 5 s at most
                        if keeper.lost:
                            break
                        await asyncio.sleep(0.01)
                    assert keeper.lost and isinstance(keeper.reason, LeaseNotFound)
            assert isinstance(raised.value.__cause__, LeaseNotFound)
            kept = await client.lease(64, 600)
            async with client.keepalive(kept, release=True):
                pass
            with pytest.raises(LeaseNotFound):
                await client.ttl(kept)
            assert _keepalive_tasks() == 0

    with server_thread() as server:
        asyncio.run(main(_async_client(server), _async_client(server)))
    assert server.stats()["leases_renewed"] >= 6


def test_the_async_client_probes_the_original_and_speaks_its_messages():
    async def main(client: AsyncMemLeaseClient) -> None:
        async with client:
            lease_id = await client.lease(32, 5000)
            assert type(lease_id) is int and client.server_version == 1
            await client.set(lease_id, b"this is some text\0")
            assert (await client.get(lease_id)).startswith(b"this is some text\0")
            with pytest.raises(MemLeaseProtocolError, match="ttl: the C"):
                await client.ttl(lease_id)

    with original_server() as original:
        asyncio.run(main(AsyncMemLeaseClient("127.0.0.1", original.port, timeout=TIMEOUT)))
    assert original.seen[0] == (protocol.ACCESS_DATA, b"\0\0\0\0")  # the probe first
    assert [msg_type for msg_type, _ in original.seen[1:]] == [1, 3, 4]
    assert len(original.connections) == len(original.seen)  # one request a connection


@contextlib.contextmanager
def _answering_the_probe_with(reply: bytes) -> Iterator[int]:
    """A server that answers the first bytes of each connection with ``reply``, then
    waits for the connection to close: its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)

    def serve() -> None:
        for _ in range(2):
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(TIMEOUT)
                conn.recv(4096)
                conn.sendall(reply)
                with contextlib.suppress(OSError):
                    while conn.recv(4096):
                        pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(3 * TIMEOUT)


def test_a_probe_answered_with_nonsense_fails_the_call_and_drops_the_connection():
    async def main(client: AsyncMemLeaseClient) -> None:
        async with client:
            with pytest.raises(MemLeaseProtocolError, match="answered the probe with"):
                await client.lease(32)
            assert client._link is not None and client._link.failure is not None

    nonsense = protocol.DataSet(protocol.OK).encode()
    with _answering_the_probe_with(nonsense) as port:
        client = MemLeaseClient("127.0.0.1", port, timeout=TIMEOUT)
        with client, pytest.raises(MemLeaseProtocolError, match="answered the probe with"):
            client.lease(32)
        asyncio.run(main(AsyncMemLeaseClient("127.0.0.1", port, timeout=TIMEOUT)))


def test_the_async_probe_rides_with_the_first_lease_against_our_server():
    async def main(client: AsyncMemLeaseClient) -> None:
        async with client:
            assert isinstance(await client.lease(32), uuid.UUID)
            assert isinstance(await client.lease(32), uuid.UUID)
            assert client.server_version == protocol.PROTOCOL_VERSION

    with server_thread() as server:
        asyncio.run(main(_async_client(server)))
    counts = server.service.request_counts()
    assert counts[("get", protocol.OK)] == 1 and counts[("grant", protocol.OK)] == 2
    assert server.stats()["total_connections"] == 1


# The cluster client.


@contextlib.contextmanager
def two_servers() -> Iterator[MemLeaseCluster]:
    with contextlib.ExitStack() as stack:
        names = []
        for _ in range(2):
            server = stack.enter_context(server_thread())
            names.append("127.0.0.1:%d" % server.server_address[1])
        yield stack.enter_context(MemLeaseCluster(names, timeout=TIMEOUT))


def test_the_cluster_lists_every_servers_leases_as_handles_and_renews_them_in_groups():
    with two_servers() as cluster:
        handles = [cluster.lease(32, 60000) for _ in range(40)]
        assert {handle.server for handle in handles} == set(cluster.servers)
        listed = list(cluster.leases(page_size=7))
        assert sorted(info.lease_id for info in listed) == sorted(handles)
        assert all(isinstance(info.lease_id, LeaseHandle) for info in listed)
        first, gone = handles[0], handles[1]
        cluster.release(gone)
        unknown = LeaseHandle(handles[2].server, uuid.uuid4())
        asked = [str(first), gone, unknown] + handles[2:]
        assert cluster.renew_many(asked, 90000) == [gone, unknown]
        assert cluster.ttl(str(first)).granted_ms == cluster.ttl(handles[-1]).granted_ms == 90000
        assert cluster.pipeline().ttl(first).execute()[0].size == 32


def test_the_cluster_keeps_a_handles_lease_alive():
    with two_servers() as cluster, contextlib.ExitStack() as stack:
        handle = cluster.lease(64, 600)
        keeper = stack.enter_context(cluster.keepalive(handle))
        time.sleep(2.0)  # more than three times its duration
        assert cluster.get(handle, 0, 1) == b"\0" and not keeper.lost
        cluster.release(handle)
        assert keeper.wait_lost(5.0)
        with pytest.raises(LeaseLost, match=re.escape("lease %s was lost" % (handle,))):
            stack.close()


# The command line.


def _environment() -> dict:
    return {key: value for key, value in os.environ.items() if key != "MEMLEASE_TOKEN"}


def _cli(port: int, *args: str) -> "subprocess.CompletedProcess[bytes]":
    return run_cli(*args, port=port, env=_environment())


def test_cli_ttl_and_leases():
    with server_thread() as server:
        port = server.server_address[1]
        with client_for(server) as client:
            big, small = client.lease(1000, 60000), client.lease(10, 30000)
        out = _cli(port, "ttl", str(big))
        assert (out.returncode, out.stderr) == (0, b"")
        assert re.fullmatch(
            rb"Lease %s has \d+ MS left of 60000 MS, 1000 bytes\n" % str(big).encode(), out.stdout
        )
        out = _cli(port, "leases")
        assert (out.returncode, out.stderr) == (0, b"")
        lines = sorted(out.stdout.decode().splitlines())
        assert len(lines) == 2
        for line, (lease_id, size) in zip(lines, sorted([(str(big), 1000), (str(small), 10)])):
            assert re.fullmatch(r"%s %d bytes, \d+ MS left" % (lease_id, size), line), line
        out = _cli(port, "ttl", str(uuid.uuid4()))
        assert out.returncode == 1 and out.stdout.startswith(b"Error: unable ttl for lease ")
        assert out.stdout.endswith(b"it expired, was released, or never was (-1)\n")


def test_cli_leases_of_a_host_list_names_each_leases_server():
    with two_servers() as cluster:
        handles = {str(cluster.lease(32, 60000)) for _ in range(6)}
        hosts = ",".join(cluster.servers)
        out = subprocess.run(
            [sys.executable, CLIENT, hosts, "leases"], capture_output=True, timeout=30,
            env=_environment(),
        )  # fmt: skip
        assert (out.returncode, out.stderr) == (0, b"")
        assert {line.split(" ", 1)[0] for line in out.stdout.decode().splitlines()} == handles


@contextlib.contextmanager
def _keeping(port: int, lease_id: object) -> Iterator["subprocess.Popen[bytes]"]:
    """``keep ID`` running, once it has said it keeps the lease; stopped if still running."""
    proc = subprocess.Popen(
        [sys.executable, CLIENT, "127.0.0.1", str(port), "keep", str(lease_id)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_environment(),
    )
    try:
        assert proc.stdout is not None
        assert select.select([proc.stdout], [], [], 30)[0], "keep said nothing"
        first = proc.stdout.readline()
        assert re.fullmatch(
            rb"Keeping lease %s alive: renewed for 600 MS every 200 MS until interrupted\n"
            % str(lease_id).encode(),
            first,
        ), first
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_cli_keep_renews_until_interrupted_and_exits_0_with_a_line(stop):
    with server_thread() as server, client_for(server) as client:
        lease_id = client.lease(64, 600)
        with _keeping(server.server_address[1], lease_id) as keeping:
            time.sleep(2.0)  # more than three times its duration
            assert client.ttl(lease_id).granted_ms == 600  # still there
            keeping.send_signal(stop)
            stdout, stderr = keeping.communicate(timeout=30)
        assert (keeping.returncode, stderr) == (0, b"")
        assert stdout == (
            b"Lease %s no longer kept alive: it ends within 600 MS unless renewed\n"
            % str(lease_id).encode()
        )
        assert client.ttl(lease_id).size == 64  # stopping keeps it: it ends in its own time


def test_cli_keep_exits_1_with_a_line_when_the_lease_is_lost():
    with server_thread() as server, client_for(server) as client:
        lease_id = client.lease(64, 600)
        with _keeping(server.server_address[1], lease_id) as keeping:
            client.release(lease_id)
            stdout, stderr = keeping.communicate(timeout=30)
        text = str(lease_id).encode()
        assert (keeping.returncode, stderr) == (1, b"")
        assert stdout == (
            b"Error: unable keep for lease %s (-1)\n"
            b"reason: lease %s was lost: it no longer exists (released, or ended) (-1)\n"
            % (text, text)
        )


def test_a_set_refused_for_length_learns_the_size_from_one_ttl_and_reads_nothing():
    with server_thread() as server:
        port = server.server_address[1]
        with client_for(server) as client:
            lease_id = str(client.lease(16, 60000))
        out = _cli(port, "set", lease_id, "exactly16bytes!!")
        assert out.returncode == 1 and out.stdout.endswith(
            b"reason: 17 bytes with the trailing NUL the C++ client sends; the lease holds 16: "
            b"use --file or --no-nul (-2)\n"
        )
        out = _cli(port, "get", lease_id, "--offset", "10", "--length", "10")
        assert out.returncode == 1 and out.stdout.endswith(
            b"reason: offset 10 + length 10 = 20 is outside the lease's 16 bytes (-3)\n"
        )
        counts = server.service.request_counts()
        assert counts[("ttl", protocol.OK)] == 2  # one a refusal
        assert {name for name, _ in counts} == {"grant", "get", "write", "read", "ttl"}
        assert counts[("read", protocol.OUT_OF_RANGE)] == 1  # the user's own, and no other
        assert counts[("get", protocol.OK)] == 1  # the probe the first lease carried
        assert server.stats()["gets"] == 1  # the store's reads: that one again
    assert re.fullmatch(UUID_PATTERN, lease_id.encode())
