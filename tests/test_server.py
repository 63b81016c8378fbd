"""The event-loop server: one thread, bounded memory per connection, streaming, clean stops.

Servers are real: a child process where the test needs signals or the process's
memory, a loop in a thread where it looks inside.  Connection state machines are
also driven directly, without a socket, as the server's loop drives them.
"""

import contextlib
import gc
import os
import re
import signal
import socket
import struct
import threading
import time
from pathlib import Path
from typing import List, Optional

import protocol
from memlease.connection import HIGH_WATER, TURN_BUDGET, Connection, Service, StagingBuffers
from memlease.listener import MemLeaseServer
from memlease.loop import EventLoop
from memlease.store import LeaseStore
from tests.helpers import (
    TIMEOUT,
    client_for,
    closed_by_peer,
    connect,
    exchange,
    read_replies,
    server_process,
    server_thread,
    wait_for,
)


def rss_kib(pid: int) -> int:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/%d/status" % pid).read_text())
    assert match
    return int(match.group(1))


def thread_count(pid: int) -> int:
    match = re.search(r"Threads:\s+(\d+)", Path("/proc/%d/status" % pid).read_text())
    assert match
    return int(match.group(1))


def decode_all(data: bytes) -> List[protocol.Message]:
    decoder = protocol.reply_decoder()
    decoder.feed(data)
    messages = []
    while True:
        message = decoder.next_message()
        if message is None:
            return messages
        messages.append(message)


class Driven:
    """A Connection driven by hand, as the loop would drive it, output collected."""

    def __init__(self, store: LeaseStore, shared: "Optional[Service]" = None, **service: object):
        if shared is None:
            shared = Service(store, **service)  # type: ignore[arg-type]
        self.conn = Connection(shared, "test")

    def send(self, data: bytes) -> List[protocol.Message]:
        self.conn.receive(data)
        return self.flush()

    def flush(self) -> List[protocol.Message]:
        out = bytearray()
        while self.conn.output_size:
            buffers = self.conn.outgoing()
            n = sum(len(b) for b in buffers)
            for b in buffers:
                out += b
            self.conn.sent(n)
        return decode_all(bytes(out))


def test_a_connection_answers_without_a_socket():
    store = LeaseStore(1 << 20)
    try:
        driven = Driven(store)
        (leased,) = driven.send(protocol.Lease(100, 5000).encode())
        lease_id = leased.lease_id
        frames = protocol.SetData(lease_id, b"abc").encode()
        frames += protocol.AccessData(lease_id).encode()
        replies = []
        for byte in frames:  # split anywhere: one byte at a time
            replies += driven.send(bytes([byte]))
        assert replies == [protocol.DataSet(0), protocol.Data(lease_id, b"abc" + bytes(97))]
    finally:
        store.close()


def test_a_large_write_streams_into_a_buffer_and_applies_all_at_once():
    store = LeaseStore(1 << 22)
    try:
        driven = Driven(store)
        (granted,) = driven.send(protocol.Grant(1 << 20, 5000).encode())
        lease_id = granted.lease_id
        data = bytes(range(256)) * 4096
        frame = protocol.Write(lease_id, 0, data).encode()
        assert driven.send(frame[:100]) == []
        conn = driven.conn
        received = 100
        while received < len(frame):
            into = conn.receive_buffer()
            assert into is not None  # the data goes straight into the staging buffer
            n = min(len(into), 50_000)
            into[:n] = frame[received : received + n]
            if received + n < len(frame):  # nothing is written before the last byte
                assert store.read(lease_id, 0, 4)[1].tobytes() == bytes(4)
            conn.received_into(n)
            received += n
        assert driven.flush() == [protocol.DataSet(protocol.OK)]
        assert store.read(lease_id)[1].tobytes() == data
    finally:
        store.close()


def test_unread_replies_stop_the_connection_answering_more():
    store = LeaseStore(1 << 20)
    try:
        driven = Driven(store)
        (leased,) = driven.send(protocol.Lease(60_000, 5000).encode())
        conn = driven.conn
        conn.receive(protocol.AccessData(leased.lease_id).encode() * 100)
        # Each reply is copied (under the streaming size): only a few fit under the mark.
        assert HIGH_WATER <= conn.output_size < HIGH_WATER + 61_000
        assert not conn.wants_input
        assert len(driven.flush()) == 100  # draining lets the rest be answered
    finally:
        store.close()


def test_a_burst_of_requests_is_answered_a_turns_budget_at_a_time():
    store = LeaseStore(1 << 20)
    try:
        driven = Driven(store)
        driven.conn.receive(protocol.Stats().encode() * (TURN_BUDGET * 2 + 5))
        assert len(driven.flush()) == TURN_BUDGET and driven.conn.has_backlog
        driven.conn.resume()
        assert len(driven.flush()) == TURN_BUDGET and driven.conn.has_backlog
        driven.conn.resume()
        assert len(driven.flush()) == 5 and not driven.conn.has_backlog
    finally:
        store.close()


def test_a_stop_answers_what_is_whole_without_passing_the_high_water():
    store = LeaseStore(1 << 20)
    try:
        driven = Driven(store)
        (leased,) = driven.send(protocol.Lease(60_000, 5000).encode())
        conn = driven.conn
        conn.receive(protocol.AccessData(leased.lease_id).encode() * 200)
        conn.stop()
        assert conn.output_size < HIGH_WATER + 61_000  # not 200 copies at once
        assert not conn.wants_input and not conn.closing
        replies = []
        for _ in range(200):  # as the replies drain, the rest is answered
            replies += driven.flush()
            conn.resume()
            if conn.closing:
                break
        assert len(replies) == 200 and conn.closing
    finally:
        store.close()


def test_unfinished_uploads_cannot_take_more_than_the_staging_limit():
    store = LeaseStore(1 << 22)
    try:
        first, second = Driven(store), Driven(store)
        first.conn.service.staging = second.conn.service.staging = StagingBuffers(1 << 20)
        (leased,) = first.send(protocol.Lease(1 << 20, 5000).encode())
        frame = protocol.SetData(leased.lease_id, bytes(1 << 20)).encode()
        assert first.send(frame[:1000]) == []  # under way, holding 1 MiB
        assert second.send(frame) == [protocol.DataSet(protocol.BUSY)]
        assert first.send(frame[1000:]) == [protocol.DataSet(protocol.OK)]
        assert second.send(frame) == [protocol.DataSet(protocol.OK)]  # lent back
    finally:
        store.close()


def test_a_connection_is_not_read_while_a_streamed_reply_waits():
    store = LeaseStore(1 << 20)
    try:
        driven = Driven(store)
        (leased,) = driven.send(protocol.Lease(1 << 16, 5000).encode())
        conn = driven.conn
        conn.receive(protocol.AccessData(leased.lease_id).encode() * 3)
        assert conn.output_size < HIGH_WATER  # one reply of 64 KiB, the others wait
        assert not conn.wants_input  # so the decoder cannot be filled meanwhile
        assert len(driven.flush()) == 3 and conn.wants_input
    finally:
        store.close()


def test_a_streamed_reply_shows_the_lease_before_a_later_write_on_its_connection():
    with server_thread(1 << 20) as server, client_for(server) as client:
        lease_id = client.lease(1 << 16)
        client.set(lease_id, b"A" * (1 << 16))
        with connect(server) as sock:
            sock.sendall(
                protocol.Read(lease_id.bytes, 0, -1).encode()
                + protocol.Write(lease_id.bytes, 0, b"B" * (1 << 16)).encode()
            )
            replies = read_replies(sock, 2)
        assert replies == [
            protocol.Data(0, b"A" * (1 << 16)),  # a lease without a short id: 0
            protocol.DataSet(protocol.OK),
        ]
        assert client.get(lease_id) == b"B" * (1 << 16)


def test_a_write_waits_until_another_connections_streamed_reply_has_gone():
    store = LeaseStore(1 << 20)
    try:
        reader = Driven(store)
        writer = Driven(store, reader.conn.service)  # one server's connections
        (leased,) = writer.send(protocol.Lease(1 << 16, 5000).encode())
        lease_id = leased.lease_id
        assert writer.send(protocol.SetData(lease_id, b"A" * (1 << 16)).encode()) == [
            protocol.DataSet(protocol.OK)
        ]
        reader.conn.receive(protocol.AccessData(lease_id).encode())  # queued, not yet sent
        writes = protocol.SetData(lease_id, b"B" * (1 << 16)).encode()
        key = protocol.short_form(lease_id)
        writes += protocol.Write(key, 0, b"C").encode() + protocol.Stats().encode()
        assert writer.send(writes) == []  # all three wait, in order, behind the stream
        assert not writer.conn.wants_input
        assert reader.flush() == [protocol.Data(lease_id, b"A" * (1 << 16))]
        replies = writer.flush()
        assert replies[:2] == [protocol.DataSet(protocol.OK)] * 2
        assert bytes(store.read(key)[1]) == b"C" + b"B" * ((1 << 16) - 1)
        assert writer.conn.wants_input and not writer.conn.service.waiting
    finally:
        store.close()


def test_a_slow_streamed_get_is_all_old_and_the_rewrite_then_lands():
    size = 16 << 20  # more than the kernel's buffers hold, so the race is real
    with server_thread(32 << 20) as server, client_for(server) as client:
        lease_id = client.lease(size, 60_000)
        client.set(lease_id, b"A" * size)
        with connect(server) as reader, connect(server) as writer:
            reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            reader.sendall(protocol.Read(lease_id.bytes, 0, -1).encode())
            head = b""
            while len(head) < protocol.DATA_HEAD_SIZE:
                head += reader.recv(protocol.DATA_HEAD_SIZE - len(head))
            received = server.service.counters["bytes_received"]
            rewrite = protocol.Write(lease_id.bytes, 0, b"B" * size).encode()
            writer.sendall(rewrite)  # the whole rewrite reaches the server mid-stream
            assert wait_for(
                lambda: server.service.counters["bytes_received"] >= received + len(rewrite)
            )
            data = bytearray()
            while len(data) < size:
                chunk = reader.recv(1 << 20)
                assert chunk
                data += chunk
            assert read_replies(writer, 1) == [protocol.DataSet(protocol.OK)]
        assert head == protocol.data_head(0, size)  # a lease with no short id
        assert data.count(b"A") == size  # bytes of one moment: all old
        assert client.get(lease_id) == b"B" * size  # and the write landed
        assert not server.service.waiting


def test_the_server_is_one_thread_with_hundreds_of_connections():
    with server_process("1M") as server, client_for(server) as client:
        sockets = []
        try:
            for _ in range(300):
                sock = connect(server)
                sockets.append(sock)
            for sock in sockets[::50]:
                assert exchange(sock, protocol.Stats().encode())[0].stats["connections"] > 0
            assert wait_for(lambda: client.stats()["connections"] == 301)
            assert thread_count(server.proc.pid) == 1
        finally:
            for sock in sockets:
                sock.close()


def test_an_oversized_set_is_answered_too_large_and_the_connection_goes_on():
    with server_process("4M", "--max-frame", "1M") as server, client_for(server) as client:
        lease_id = client.lease(2 << 20)
        with connect(server) as sock:
            replies = exchange(sock, protocol.Write(lease_id.bytes, 0, bytes(1 << 21)).encode())
            assert replies == [protocol.DataSet(protocol.TOO_LARGE)]
            replies = exchange(sock, protocol.Write(lease_id.bytes, 0, b"next").encode())
            assert replies == [protocol.DataSet(protocol.OK)]
        # A set larger than the lease, past the streaming size, is refused the same way.
        with connect(server) as sock:
            small = client.lease(100_000)
            replies = exchange(sock, protocol.Replace(small.bytes, bytes(200_000)).encode())
            assert replies == [protocol.DataSet(protocol.TOO_LARGE)]
            assert exchange(sock, protocol.Stats().encode())[0].stats["live_leases"] == 2


def test_a_failed_upload_changes_no_byte():
    with server_process("4M") as server, client_for(server) as client:
        lease_id = client.lease(1 << 20)
        client.set(lease_id, b"before")
        with connect(server) as sock:
            frame = protocol.Write(lease_id.bytes, 0, b"x" * (1 << 20)).encode()
            sock.sendall(frame[: len(frame) // 2])
        assert wait_for(lambda: client.stats()["connections"] == 1)
        assert client.get(lease_id, 0, 8) == b"before\0\0"


def test_a_slow_reader_cannot_grow_the_servers_memory():
    with server_process("64M") as server, client_for(server) as client:
        lease_id = client.lease(1 << 20)
        client.set(lease_id, b"y" * (1 << 20))
        small = client.lease(60_000)  # copied replies, not streamed ones
        before = rss_kib(server.proc.pid)
        with connect(server) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            requests = protocol.Read(lease_id.bytes, 0, -1).encode() * 400
            requests += protocol.Read(small.bytes, 0, -1).encode() * 400
            sock.settimeout(0.5)
            try:
                sock.sendall(requests)
            except socket.timeout:
                pass  # the server stopped reading: that is the point
            time.sleep(0.5)
            grown = rss_kib(server.proc.pid) - before
            assert grown < 32 * 1024, grown  # 400 copies of 1 MiB would be 400 MiB
            other = client.stats()  # another client is still answered
            assert other["connections"] == 2


def test_a_release_during_a_streamed_get_never_shows_the_next_holders_bytes():
    size = 4 << 20
    with server_thread(8 << 20) as server, client_for(server) as client:
        old = client.lease(size, 60_000)
        client.set(old, b"A" * size)
        with connect(server) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sock.sendall(protocol.Read(old.bytes, 0, -1).encode())
            head = b""
            while len(head) < 24:
                head += sock.recv(24 - len(head))
            client.release(old)
            new = client.lease(size, 60_000)  # the pinned block must not be handed out
            client.set(new, b"B" * size)
            data = bytearray()
            while len(data) < size:
                chunk = sock.recv(1 << 20)
                assert chunk
                data += chunk
        assert head == protocol.data_head(0, size)
        assert data == b"A" * size
        client.release(new)
        assert wait_for(lambda: server.stats()["free_bytes"] == server.stats()["pool_bytes"])


def test_partial_sends_deliver_every_reply_in_order():
    with server_thread(4 << 20) as server, client_for(server) as client:
        leases = [client.lease(3000) for _ in range(50)]
        for n, lease_id in enumerate(leases):
            client.set(lease_id, bytes([n]) * 3000)
        with connect(server) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            requests = b"".join(protocol.Read(i.bytes, 0, -1).encode() for i in leases * 4)
            sock.sendall(requests)
            replies = read_replies(sock, len(leases) * 4)
        expected = [protocol.Data(0, bytes([n % 50]) * 3000) for n in range(len(leases) * 4)]
        assert replies == expected


def test_sigterm_under_pipelined_load_answers_everything_received_and_closes_cleanly():
    with server_process("1M") as server:
        lease_id = client_for(server).lease(64, 60_000)
        batch = protocol.Read(lease_id.bytes, 0, -1).encode() * 2000
        sockets = [connect(server) for _ in range(8)]
        received = [0] * len(sockets)
        failures: List[str] = []

        def pump(n: int) -> None:
            sock = sockets[n]
            decoder = protocol.reply_decoder()
            try:
                sock.sendall(batch)
                while True:
                    data = sock.recv(1 << 16)
                    if not data:
                        break  # a clean FIN
                    decoder.feed(data)
                    while decoder.next_message() is not None:
                        received[n] += 1
            except OSError as exc:
                failures.append("%d: %r" % (n, exc))

        threads = [threading.Thread(target=pump, args=(n,)) for n in range(len(sockets))]
        for thread in threads:
            thread.start()
        time.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(TIMEOUT) == 0
        for thread in threads:
            thread.join(TIMEOUT)
        for sock in sockets:
            sock.close()
        assert not failures  # no reset
        # Every batch was sent whole before the stop could cut it: all of it is answered.
        assert received == [2000] * len(sockets)


def test_a_connection_that_stops_reading_then_closes_gets_no_reset_for_its_replies():
    with server_thread() as server, connect(server) as sock:
        sock.sendall(protocol.Stats().encode())
        sock.shutdown(socket.SHUT_WR)  # the C++ client's way: one request, then done
        assert read_replies(sock, 1)[0].stats["total_connections"] >= 1
        assert closed_by_peer(sock)


def test_expiry_runs_in_slices_between_requests():
    with server_thread(1 << 20) as server, client_for(server) as client:
        with client.pipeline() as pipe:
            for _ in range(5000):
                pipe.lease(32, 200)
            pipe.execute()
        turns = server.loop.turns
        # Ended leases stop counting as live at their deadline; the reaper takes them after.
        assert wait_for(lambda: client.stats()["leases_expired"] == 5000)
        assert client.stats()["live_leases"] == 0
        assert server.loop.turns - turns >= 5000 // 256  # slices of at most 256 a turn


def test_a_pool_of_just_ended_leases_serves_a_large_lease_at_once_and_counts_none():
    pool = 8 << 20
    ahead = [0.0]  # how far the store's clock runs ahead of the loop's
    store = LeaseStore(pool, clock=lambda: time.monotonic() + ahead[0])
    with contextlib.ExitStack() as stack:
        stack.callback(gc.unfreeze)  # so many leases freeze the collector's objects
        server = stack.enter_context(server_thread(store=store))
        client = stack.enter_context(client_for(server))
        for _ in range(pool // 32 // 16384):
            with client.pipeline() as pipe:
                for _ in range(16384):
                    pipe.lease(32, 60_000)
                assert all(lease_id.version == 4 for lease_id in pipe.execute())
        assert client.stats()["free_bytes"] == 0
        # Every lease ends now, for the store, and the reaper's timer is a minute away:
        # the moment right after a deadline, before the reaper has caught up.
        ahead[0] = 61.0
        big = client.lease(1 << 20, 60_000)  # not OutOfMemory: ended leases are reclaimed
        stats = client.stats()
        assert big.version == 4 and stats["leases_refused"] == 0
        assert stats["live_leases"] == 1 and stats["free_bytes"] == pool - (1 << 20)
        assert 0 < stats["leases_reclaimed"] < pool // 32  # only what the lease needed


def test_ten_thousand_connections_are_accepted_on_the_descriptor_limit():
    max_connections = getattr(os, "sysconf", lambda _: 0)("SC_OPEN_MAX")
    assert max_connections >= 1024
    with server_thread(max_connections=None) as server:
        assert server.max_connections >= 1024 - 32


def test_a_lease_expires_on_time_without_other_traffic():
    with server_thread() as server, client_for(server) as client:
        lease_id = client.lease(32, 50)
        assert wait_for(lambda: server.stats()["live_leases"] == 0, 2.0)
        assert server.stats()["leases_expired"] == 1
        assert lease_id.version == 4


def test_bad_length_closes_only_that_connection():
    with server_thread() as server, client_for(server) as client:
        with connect(server) as sock:
            sock.sendall(struct.pack("<iq", protocol.LEASE, -5))
            assert read_replies(sock, 1) == [
                protocol.Error(protocol.FRAME_TOO_LARGE, protocol.LEASE)
            ]
            assert closed_by_peer(sock)
        # Closed on our side too, it is gone once the server reads our FIN.
        assert wait_for(lambda: client.stats()["connections"] == 1)


def test_a_timer_months_away_does_not_break_the_wait():
    loop = EventLoop()
    left, right = socket.socketpair()
    try:
        fired = []
        loop.call_later(1e9, lambda: None)  # beyond what epoll can wait for
        loop.add_reader(left.fileno(), lambda: fired.append(left.recv(1)))
        right.send(b"x")
        loop.run_once()
        assert fired == [b"x"]
    finally:
        loop.close()
        left.close()
        right.close()


def test_a_request_sent_with_the_connection_is_answered_in_the_turn_that_accepts_it():
    server = MemLeaseServer(("127.0.0.1", 0), LeaseStore(1 << 20))
    try:
        with socket.create_connection(server.server_address, timeout=TIMEOUT) as sock:
            sock.sendall(protocol.Lease(64, 60_000).encode())
            server.loop.run_once(timeout=TIMEOUT)  # one wait: the listener is readable
            assert server.loop.turns == 1
            sock.settimeout(0.0)  # the reply is here already, or the test fails
            reply = decode_all(sock.recv(64))
            assert len(reply) == 1 and isinstance(reply[0], protocol.Leased)
            assert reply[0].lease_id > 0
    finally:
        server.close()


def test_a_server_with_an_idle_timeout_of_a_year_serves():
    with server_thread(idle_timeout=365 * 86400.0) as server, client_for(server) as client:
        assert client.lease(32).version == 4


def test_a_closed_connection_is_freed_at_once_without_the_garbage_collector():
    """A server of one-request connections must not leave each one to the collector (its
    cycles would cost a collection's walk per few hundred connections)."""

    def open_channels() -> int:
        return sum(1 for o in gc.get_objects() if type(o).__name__ == "Channel")

    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        with server_thread() as server:
            for _ in range(50):
                with connect(server) as sock:
                    assert exchange(sock, protocol.Stats().encode())
            assert wait_for(lambda: not server.channels)
            assert wait_for(lambda: open_channels() == 0)
    finally:
        if enabled:
            gc.enable()
