"""Lease ids: version 4 UUIDs, never handed out twice; the C++ client's short ids beside
them; the probe and the fallback that keep both sides of the original working."""

import contextlib
import secrets
import socket
import struct
import threading
import uuid
from typing import Dict, Iterator, List, Tuple

import protocol
from memlease.ids import SHORT_ID_MAX, ShortIds
from memlease.store import LeaseStore
from memlease_client import LeaseNotFound, MemLeaseClient
from tests.helpers import TIMEOUT, client_for, connect, exchange, server_process, server_thread

# The seed's session as the C++ client sends it, byte for byte (original-wire-format.md),
# with the lease id left out: ours is not 123.
SEED_LEASE = bytes.fromhex("01000000 0800000000000000 20000000 88130000")  # 32 bytes, 5 s
SEED_TEXT = b"this is some text\0"


def seed_set(lease_id: int) -> bytes:
    return bytes.fromhex("03000000 1e00000000000000") + struct.pack("<iq", lease_id, 18) + SEED_TEXT


def seed_get(lease_id: int) -> bytes:
    return bytes.fromhex("04000000 0400000000000000") + struct.pack("<i", lease_id)


def one_request(server: object, frame: bytes, reply_size: int) -> bytes:
    """The C++ client's way: connect, send one request, read its reply's bytes."""
    with connect(server) as sock:
        sock.sendall(frame)
        reply = b""
        while len(reply) < reply_size:
            chunk = sock.recv(reply_size - len(reply))
            assert chunk, "closed after %r" % reply
            reply += chunk
    return reply


def test_ids_of_thousands_of_leases_are_distinct_version_4_uuids():
    store = LeaseStore(1 << 20)
    try:
        ids = [store.lease(32, 60_000) for _ in range(5000)]
        parsed = [uuid.UUID(bytes=lease_id) for lease_id in ids]  # type: ignore[arg-type]
        assert len(set(parsed)) == 5000
        assert all(u.version == 4 and u.variant == uuid.RFC_4122 for u in parsed)
    finally:
        store.close()
    with server_thread(1 << 20) as server, client_for(server) as client:
        pipe = client.pipeline()
        for _ in range(2000):
            pipe.lease(32, 60_000)
        leased = pipe.execute()
        assert len(set(leased)) == 2000 and all(u.version == 4 for u in leased)


def test_a_released_id_is_not_found_and_never_comes_back():
    store = LeaseStore(4 * 32)  # four blocks: every lease reuses a block of a released one
    try:
        first = store.lease(32, 60_000, short_id=True)
        assert isinstance(first, bytes)
        short = store.short_id(first)
        assert 0 < short <= SHORT_ID_MAX
        assert store.release(first) == protocol.OK
        assert store.read(first)[0] == protocol.NOT_FOUND
        assert store.read(protocol.short_form(short))[0] == protocol.NOT_FOUND
        seen_ids, seen_shorts = {first}, {short}
        for _ in range(20_000):
            lease_id = store.lease(32, 60_000, short_id=True)
            assert isinstance(lease_id, bytes)
            assert lease_id not in seen_ids and store.short_id(lease_id) not in seen_shorts
            seen_ids.add(lease_id)
            seen_shorts.add(store.short_id(lease_id))
            assert store.release(lease_id) == protocol.OK
    finally:
        store.close()


def test_short_ids_are_a_permutation_kept_by_its_key_and_count():
    ids = ShortIds()
    first = [ids.next() for _ in range(50_000)]
    assert len(set(first)) == 50_000 and all(0 < n <= SHORT_ID_MAX for n in first)
    resumed = ShortIds(ids.key, 25_000)  # as a warm restart takes them back
    assert [resumed.next() for _ in range(25_000)] == first[25_000:]
    assert ShortIds(ids.key, SHORT_ID_MAX).next() == 0  # all given: none comes back


def test_the_cpp_clients_session_is_byte_exact_and_our_api_takes_its_short_id():
    with server_process("2048") as server:
        leased = one_request(server, SEED_LEASE, 16)
        assert leased[:12] == bytes.fromhex("02000000 0400000000000000")
        (short,) = struct.unpack_from("<i", leased, 12)
        assert 0 < short <= SHORT_ID_MAX
        assert one_request(server, seed_set(short), 16) == bytes.fromhex(
            "05000000 0400000000000000 00000000"
        )
        expected = (
            bytes.fromhex("04000000 2c00000000000000")
            + struct.pack("<iq", short, 32)
            + SEED_TEXT
            + bytes(14)
        )
        assert one_request(server, seed_get(short), len(expected)) == expected
        with client_for(server) as client:
            assert client.get(short, 0, 17) == b"this is some text"
            assert client.get(uuid.UUID(int=short), 0, 4) == b"this"  # its 16-byte form
            client.set(short, b"THIS", offset=0)
            client.renew(short, 60_000)
        assert one_request(server, seed_get(short), len(expected))[24:28] == b"THIS"
        with client_for(server) as client:
            client.release(str(uuid.UUID(int=short)))
            assert client.pipeline().get(short).execute(raise_on_error=False)[0].status == -1
        gone = bytes.fromhex("04000000 0c00000000000000") + struct.pack("<iq", short, 0)
        assert one_request(server, seed_get(short), 24) == gone


def test_the_probe_is_answered_with_the_protocol_version():
    probe = bytes.fromhex("04000000 0400000000000000 00000000")
    assert protocol.AccessData(protocol.PROBE_ID).encode() == probe
    with server_thread() as server:
        reply = one_request(server, probe, 12 + 12 + 10)
    assert reply == bytes.fromhex(
        "04000000 1600000000000000 00000000 0a00000000000000 6d656d6c656173652032"
    )  # Data, id 0, "memlease 2"


def test_grant_answers_an_id_or_a_status():
    with server_thread(2048) as server, connect(server) as sock:
        replies = exchange(
            sock,
            protocol.Grant(2048, 60_000).encode()
            + protocol.Grant(32, 60_000).encode()
            + protocol.Grant(4096, 60_000).encode()
            + protocol.Grant(0, 60_000).encode(),
            4,
        )
        assert isinstance(replies[0], protocol.Granted)
        assert uuid.UUID(bytes=replies[0].lease_id).version == 4
        assert replies[1:] == [
            protocol.DataSet(protocol.NO_MEMORY),
            protocol.DataSet(protocol.TOO_LARGE),
            protocol.DataSet(protocol.INVALID),
        ]
        wide = replies[0].lease_id
        replies = exchange(
            sock,
            protocol.Write(wide, 1, b"xy").encode() + protocol.Read(wide, 0, 4).encode(),
            2,
        )
        assert replies == [protocol.DataSet(protocol.OK), protocol.Data(0, b"\0xy\0")]


def test_a_1x_clients_four_byte_ids_are_refused_as_malformed_and_write_nothing():
    with server_thread() as server, connect(server) as sock:
        (leased,) = exchange(sock, protocol.Lease(64, 60_000).encode())
        short = leased.lease_id
        exchange(sock, protocol.SetData(short, b"K" * 64).encode())
        old_forms = [
            (protocol.RELEASE, struct.pack("<i", short)),
            (protocol.RENEW, struct.pack("<ii", short, 1000)),
            (protocol.WRITE, struct.pack("<iqq", short, 0, 12) + b"W" * 12),
            (protocol.WRITE, struct.pack("<iqq", short, 0, 40) + b"W" * 40),
            (protocol.READ, struct.pack("<iqq", short, 0, 8)),
            (protocol.REPLACE, struct.pack("<iq", short, 30) + b"R" * 30),
            (protocol.REPLACE, struct.pack("<iq", short, 1 << 17) + b"R" * (1 << 17)),
        ]
        for msg_type, payload in old_forms:
            frame = struct.pack("<iq", msg_type, len(payload)) + payload
            assert exchange(sock, frame) == [protocol.Error(protocol.MALFORMED, msg_type)]
        replies = exchange(sock, protocol.AccessData(short).encode())
        assert replies == [protocol.Data(short, b"K" * 64)]  # still there, as it was


class OriginalServer:
    """A stand-in for the C++ server, written from original-wire-format.md: one request a
    connection, types 1 to 5 only; anything else is never answered; nothing is closed."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.leases: Dict[int, bytearray] = {}
        self.seen: List[Tuple[int, bytes]] = []  # each connection's one message
        self.connections: List[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except socket.timeout:
                continue
            sock.settimeout(TIMEOUT)
            self.connections.append(sock)  # the original never closes one
            try:
                msg_type, payload = self._read_one(sock)
            except (OSError, struct.error):
                continue
            self.seen.append((msg_type, payload))
            reply = self._answer(msg_type, payload)
            if reply is not None:
                sock.sendall(reply)

    @staticmethod
    def _read_one(sock: socket.socket) -> Tuple[int, bytes]:
        data = b""
        while len(data) < 12:
            data += sock.recv(12 - len(data))
        msg_type, length = struct.unpack("<iq", data)
        payload = b""
        while len(payload) < length:
            payload += sock.recv(length - len(payload))
        return msg_type, payload

    def _answer(self, msg_type: int, payload: bytes) -> "bytes | None":
        if msg_type == 1:
            size, _ = struct.unpack("<ii", payload)
            lease_id = secrets.randbelow(2**31 - 1) + 1
            self.leases[lease_id] = bytearray(size)
            return struct.pack("<iqi", 2, 4, lease_id)
        if msg_type == 3:
            lease_id, length = struct.unpack_from("<iq", payload)
            lease = self.leases.get(lease_id)
            status = -1 if lease is None else -2 if length > len(lease) else 0
            if status == 0:
                lease[:length] = payload[12:]  # type: ignore[index]
            return struct.pack("<iqi", 5, 4, status)
        if msg_type == 4:
            (lease_id,) = struct.unpack("<i", payload)
            data = bytes(self.leases.get(lease_id, b""))
            return struct.pack("<iqiq", 4, 12 + len(data), lease_id, len(data)) + data
        return None  # not one of its messages: never answered

    def close(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        for sock in self.connections:
            sock.close()
        self.listener.close()


@contextlib.contextmanager
def original_server() -> Iterator[OriginalServer]:
    server = OriginalServer()
    try:
        yield server
    finally:
        server.close()


def test_against_the_original_our_client_probes_then_falls_back_to_its_messages():
    with original_server() as original:
        with MemLeaseClient("127.0.0.1", original.port, timeout=TIMEOUT) as client:
            lease_id = client.lease(32, 5000)
            assert type(lease_id) is int and lease_id in original.leases
            assert client.server_version == 1
            client.set(lease_id, b"this is some text\0")
            assert client.get(lease_id) == b"this is some text\0" + bytes(14)
            pipe = client.pipeline().lease(64).get(lease_id, 0, None)
            second, data = pipe.execute()
            assert type(second) is int and data.startswith(b"this is some text")
            try:
                client.get(second + 1 if second + 1 not in original.leases else second + 2)
            except LeaseNotFound:
                pass
            else:
                raise AssertionError("an unknown lease was found")
        types = [msg_type for msg_type, _ in original.seen]
        # The probe went first, with the Grant behind it, which the original never read.
        assert original.seen[0] == (protocol.ACCESS_DATA, struct.pack("<i", 0))
        assert types[1:] == [1, 3, 4, 1, 4, 4]
        assert protocol.GRANT not in types
        assert len(original.connections) == len(original.seen)  # one request a connection


def test_against_our_server_the_probe_rides_with_the_first_lease_only():
    with server_thread() as server, client_for(server) as client:
        first = client.lease(32)
        second = client.lease(32)
        assert client.server_version == protocol.PROTOCOL_VERSION
        assert {type(first), type(second)} == {uuid.UUID}
        counts = server.service.request_counts()
        assert counts[("get", protocol.OK)] == 1 and counts[("grant", protocol.OK)] == 2
        assert server.stats()["total_connections"] == 1


def test_no_short_ids_refuses_the_originals_messages_and_keeps_ours():
    with server_process("1M", "--no-short-ids") as server:
        assert one_request(server, SEED_LEASE, 16) == struct.pack("<iqi", 2, 4, -10)
        assert one_request(server, seed_set(5), 16) == struct.pack("<iqi", 5, 4, -10)
        assert one_request(server, seed_get(5), 20) == struct.pack("<iqii", 13, 8, -10, 4)
        big = struct.pack("<iqiq", 3, 12 + (1 << 17), 5, 1 << 17) + bytes(1 << 17)
        assert one_request(server, big, 16) == struct.pack("<iqi", 5, 4, -10)  # streamed too
        with client_for(server) as client:  # the probe is still answered, and ours served
            lease_id = client.lease(64, 60_000)
            client.set(lease_id, b"ours")
            assert client.get(lease_id, 0, 4) == b"ours"
            assert client.stats()["live_leases"] == 1
        log = server.output()
        assert "short ids are off" in log and "--no-short-ids" in log
        assert "sent a C++ client's lease: refused" in log


def test_hundreds_of_misses_on_uuids_neither_close_a_connection_nor_refuse_its_host():
    with server_thread() as server, connect(server) as sock:
        (granted,) = exchange(sock, protocol.Grant(32, 60_000).encode())
        frames = b"".join(
            protocol.Read(uuid.uuid4().bytes, 0, -1).encode() for _ in range(500)
        ) + protocol.Read(granted.lease_id, 0, 4).encode()
        replies = exchange(sock, frames, 501)
        assert replies[:500] == [protocol.DataSet(protocol.NOT_FOUND)] * 500
        assert replies[500] == protocol.Data(0, bytes(4))
        for _ in range(3):  # more connections from the host, all of them missing
            with connect(server) as other:
                frames = protocol.Release(uuid.uuid4().bytes).encode() * 300
                assert len(exchange(other, frames, 300)) == 300
        with client_for(server) as client:
            assert client.get(uuid.UUID(bytes=granted.lease_id), 0, 1) == b"\0"
        counters = server.service.counters
        assert counters["connections_closed_guessing"] == 0
        assert counters["connections_refused_guessing"] == 0
    with server_thread() as server, connect(server) as sock:  # short ids keep their defence
        frames = b"".join(
            protocol.Read(protocol.short_form(n), 0, 1).encode() for n in range(1, 150)
        )
        assert len(exchange(sock, frames, 149)) == 100
        assert server.service.counters["connections_closed_guessing"] == 1


def test_the_worked_example_of_docs_protocol_md():
    wide = uuid.UUID("0b8e6c1a-5d8f-4e0c-9a47-2f1d3c5b7e90").bytes
    assert protocol.Grant(1024, 5000).encode() == bytes.fromhex(
        "11000000 0800000000000000 00040000 88130000"
    )
    assert protocol.Granted(wide).encode() == bytes.fromhex(
        "12000000 1000000000000000 0b8e6c1a5d8f4e0c9a472f1d3c5b7e90"
    )
    assert protocol.Write(wide, 0, SEED_TEXT).encode() == bytes.fromhex(
        "08000000 3200000000000000 0b8e6c1a5d8f4e0c9a472f1d3c5b7e90"
        "0000000000000000 1200000000000000"
    ) + SEED_TEXT
    assert protocol.Read(wide, 0, -1).encode() == bytes.fromhex(
        "09000000 2000000000000000 0b8e6c1a5d8f4e0c9a472f1d3c5b7e90"
        "0000000000000000 ffffffffffffffff"
    )
    assert protocol.Release(protocol.short_form(123)).encode() == bytes.fromhex(
        "06000000 1000000000000000 000000000000000000000000 0000007b"
    )
