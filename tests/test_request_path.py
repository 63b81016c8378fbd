"""The request path: the common small requests are answered in one pass over what a read
delivered, straight from the store, and everything else as each request's own method
answers it.  The one pass must be indistinguishable from the methods, reply for reply,
counter for counter; these tests drive connections without sockets, as the loop does.
"""

import random
import struct
from typing import Any, Dict, List, Tuple

import pytest

import protocol
from memlease import security
from memlease.connection import TURN_BUDGET, Connection, Service
from memlease.store import LeaseStore
from tests.test_server import Driven, decode_all
from tests.test_store import FakeClock

TOKENS = {"alpha": b"alpha-token-0123456789", "beta": b"beta-token-0123456789"}
ALPHA_QUOTA = 4096
_NOBODYS_UUID = struct.Struct(">QQ")  # the halves of a version 4 UUID that no lease has


class Side:
    """One server (a store and its service) with a connection per tenant; ``one_pass``
    False takes every request through its own method, as the request log does."""

    def __init__(self, clock: FakeClock, one_pass: bool, short_ids: bool) -> None:
        self.store = LeaseStore(1 << 14, clock=clock)
        tenants = security.Tenants(
            [("alpha", TOKENS["alpha"], ALPHA_QUOTA), ("beta", TOKENS["beta"], 0)]
        )
        self.service = Service(self.store, tenants=tenants, short_ids=short_ids)
        self.service.log_requests = not one_pass
        self.ids: List[bytes] = []  # every lease granted, in order: its 16-byte id
        self.shorts: List[int] = []  # the short id of each, 0 for none
        self.conns: Dict[str, Connection] = {}
        for name, token in TOKENS.items():
            self.conns[name] = Connection(self.service, name)
            assert self.feed(name, protocol.Auth(token).encode(), [5]) == [protocol.DataSet(0)]

    def feed(self, name: str, data: bytes, cuts: List[int]) -> List[Any]:
        """Send ``data`` in pieces cut at ``cuts``; the replies, with ids made comparable."""
        conn = self.conns[name]
        out = bytearray()
        start = 0
        for cut in sorted(cuts) + [len(data)]:
            if conn.closing:
                break
            conn.receive(data[start:cut])
            start = max(start, cut)
            for _ in range(100):  # bounded: each turn answers a budget's worth
                while conn.output_size:
                    buffers = conn.outgoing()
                    for buffer in buffers:
                        out += buffer
                    conn.sent(sum(len(buffer) for buffer in buffers))
                if not conn.has_backlog:
                    break
                conn.resume()
        return [self._comparable(reply) for reply in decode_all(bytes(out))]

    def _comparable(self, reply: Any) -> Any:
        """A reply with new ids replaced by their place in the order of grants."""
        if isinstance(reply, protocol.Granted):
            self.ids.append(reply.lease_id)
            self.shorts.append(0)
            return ("granted", len(self.ids) - 1)
        if isinstance(reply, protocol.Leased) and reply.lease_id > 0:
            self.ids.append(protocol.short_form(reply.lease_id))
            self.shorts.append(reply.lease_id)
            return ("leased", len(self.ids) - 1)
        named = isinstance(reply, protocol.Data) and reply.lease_id > 0
        if named and reply.lease_id in self.shorts:
            return ("data", self.shorts.index(reply.lease_id), reply.data)
        return reply

    def lease_id(self, which: int) -> bytes:
        """The id of the ``which``th lease granted; a negative one is an id no lease has."""
        return self.ids[which] if which >= 0 else _NOBODYS_UUID.pack(0x4000, 2 << 62 | -which)

    def short(self, which: int) -> int:
        return self.shorts[which] if which >= 0 else 7_000_000 - which

    def figures(self) -> Tuple[Dict[str, int], Dict[Tuple[str, int], int]]:
        stats = self.service.stats(None)
        del stats["uptime"]
        return stats, self.service.request_counts()


def _frame(side: Side, step: Tuple[Any, ...]) -> bytes:
    """The bytes of one abstract request, for this side's ids."""
    kind = step[0]
    if kind == "grant":
        return protocol.Grant(step[1], step[2]).encode()
    if kind == "lease":
        return protocol.Lease(step[1], step[2]).encode()
    if kind == "write":
        return protocol.Write(side.lease_id(step[1]), step[2], step[3]).encode()
    if kind == "read":
        return protocol.Read(side.lease_id(step[1]), step[2], step[3]).encode()
    if kind == "replace":
        return protocol.Replace(side.lease_id(step[1]), step[2]).encode()
    if kind == "set":
        return protocol.SetData(side.short(step[1]), step[2]).encode()
    if kind == "get":
        return protocol.AccessData(side.short(step[1])).encode()
    if kind == "renew":
        return protocol.Renew(side.lease_id(step[1]), step[2]).encode()
    if kind == "release":
        return protocol.Release(side.lease_id(step[1])).encode()
    if kind == "probe":
        return protocol.AccessData(protocol.PROBE_ID).encode()
    if kind == "stats":
        return protocol.Stats().encode()
    if kind == "old-id":  # a 1.x client's 4-byte id: malformed
        return protocol.HEADER.pack(protocol.READ, 20) + bytes(20)
    if kind == "unknown":
        return protocol.HEADER.pack(99, 4) + bytes(4)
    raise AssertionError(kind)


def _step(rng: random.Random, granted: int) -> Tuple[Any, ...]:
    """An abstract request: mostly the common ones, with misses, refusals and oddities."""
    which = rng.randrange(-2, granted) if granted and rng.random() < 0.9 else -1
    size = rng.choice((1, 10, 100, 512, 700, 3000, 20_000))
    data = bytes([rng.randrange(1, 256)]) * rng.choice((0, 1, 5, 100, 600))
    kind = rng.choice(
        ["write", "read", "read", "get", "set", "replace", "renew", "release", "grant", "lease"]
        * 4
        + ["probe", "stats", "old-id", "unknown"]
    )
    if kind in ("grant", "lease"):
        return (kind, size, rng.choice((1, 5, 50, 60_000, 0)))
    if kind == "write":
        return (kind, which, rng.choice((0, 0, 3, 90, -1)), data)
    if kind == "read":
        return (kind, which, rng.choice((0, 0, 2, 90, -1)), rng.choice((-1, -1, 0, 4, 100, 2000)))
    if kind in ("replace", "set"):
        return (kind, which, data)
    if kind in ("get", "release"):
        return (kind, which)
    if kind == "renew":
        return (kind, which, rng.choice((1, 5, 60_000, 0, -3)))
    return (kind,)


@pytest.mark.parametrize("seed", range(12))
def test_the_one_pass_answers_and_counts_as_each_requests_own_method(seed):
    rng = random.Random(seed)
    clock = FakeClock()
    short_ids = seed % 4 != 3
    sides = [Side(clock, one_pass, short_ids) for one_pass in (True, False)]
    try:
        # One lease written and read, so that each common kind meets the one pass.
        for steps in ([("grant", 16, 60_000)], [("write", 0, 0, b"x"), ("read", 0, 0, 1)]):
            frames = [b"".join(_frame(side, step) for step in steps) for side in sides]
            replies = [side.feed("beta", data, []) for side, data in zip(sides, frames)]
            assert replies[0] == replies[1], steps
        for _ in range(40):
            name = rng.choice(sorted(TOKENS))
            steps = [_step(rng, len(sides[0].ids)) for _ in range(rng.randrange(1, 30))]
            frames = [b"".join(_frame(side, step) for step in steps) for side in sides]
            cuts = sorted(rng.randrange(len(frames[0]) + 1) for _ in range(rng.randrange(3)))
            replies = [side.feed(name, data, cuts) for side, data in zip(sides, frames)]
            assert replies[0] == replies[1], steps
            assert sides[0].figures() == sides[1].figures()
            assert bytes(sides[0].store.memory.buffer) == bytes(sides[1].store.memory.buffer)
            clock.now += rng.choice((0, 0, 0.002, 0.01, 0.1))
        # The one pass did answer: the common requests never met their methods.
        served = sides[0].service.served
        assert served[protocol.READ] and served[protocol.WRITE] and served[protocol.GRANT]
        assert not any(sides[1].service.served)
    finally:
        for side in sides:
            side.store.close()


def test_a_pipelined_batch_of_writes_and_reads_is_answered_in_one_pass():
    store = LeaseStore(1 << 20)
    try:
        driven = Driven(store)
        (granted,) = driven.send(protocol.Grant(100, 60_000).encode())
        lease_id = granted.lease_id
        batch = b"".join(
            protocol.Write(lease_id, 0, b"%03d" % n).encode()
            + protocol.Read(lease_id, 0, 3).encode()
            for n in range(50)
        )
        replies = driven.send(batch)
        assert replies[1::2] == [protocol.Data(0, b"%03d" % n) for n in range(50)]
        assert replies[0::2] == [protocol.DataSet(protocol.OK)] * 50
        service = driven.conn.service
        assert service.served[protocol.WRITE] == service.served[protocol.READ] == 50
        counts = service.request_counts()
        assert counts["write", protocol.OK] == counts["read", protocol.OK] == 50
        assert store.counters["sets"] == store.counters["gets"] == 50
    finally:
        store.close()


def test_the_one_pass_keeps_to_the_turns_budget():
    store = LeaseStore(1 << 20)
    try:
        driven = Driven(store)
        (granted,) = driven.send(protocol.Grant(10, 60_000).encode())
        read = protocol.Read(granted.lease_id, 0, 1).encode()
        driven.conn.receive(read * (TURN_BUDGET + 5))
        assert len(driven.flush()) == TURN_BUDGET and driven.conn.has_backlog
        driven.conn.resume()
        assert len(driven.flush()) == 5 and not driven.conn.has_backlog
    finally:
        store.close()


def test_a_miss_on_a_short_id_still_counts_as_guessing_in_a_pipeline():
    store = LeaseStore(1 << 20)
    try:
        driven = Driven(store)
        (leased,) = driven.send(protocol.Lease(10, 60_000).encode())
        good = protocol.AccessData(leased.lease_id).encode()
        guesses = b"".join(protocol.AccessData(n).encode() for n in range(1000, 1100))
        driven.send((good * 3 + guesses) * 2)
        assert driven.conn.closing  # closed for guessing, as each request's method would
        assert driven.conn.service.counters["connections_closed_guessing"] == 1
    finally:
        store.close()


def _decoder_with(frames: bytes) -> protocol.Decoder:
    decoder = protocol.request_decoder()
    decoder.feed(frames)
    return decoder


def test_small_requests_yields_whole_small_frames_and_leaves_the_rest_to_next_message():
    lease_id = bytes.fromhex("0b8e6c1a5d8f4e0c9a472f1d3c5b7e90")
    read = protocol.Read(lease_id, 0, -1)
    write = protocol.Write(lease_id, 4, b"data")
    stats = protocol.Stats()
    decoder = _decoder_with(read.encode() + write.encode() + stats.encode() + read.encode())
    frames = decoder.small_requests()
    end, frame = next(frames)
    assert frame == (protocol.READ, 32, lease_id, 0, -1)
    end, frame = next(frames)
    assert frame == (protocol.WRITE, 36, lease_id, 4, 4)
    assert bytes(decoder.buffer[end - 4 : end]) == b"data"
    assert list(frames) == []  # Stats is not one of them: it ends the pass
    assert decoder.next_message() == stats
    assert decoder.next_message() == read


def test_a_frame_the_caller_stops_at_is_decoded_by_next_message():
    lease_id = bytes.fromhex("0b8e6c1a5d8f4e0c9a472f1d3c5b7e90")
    renew = protocol.Renew(lease_id, 5000)
    decoder = _decoder_with(renew.encode() * 2)
    for _ in decoder.small_requests():
        break  # the caller leaves the first frame to its method
    assert decoder.next_message() == renew
    frames = [frame for _, frame in decoder.small_requests()]
    assert frames == [(protocol.RENEW, 20, lease_id, 5000)]
    assert decoder.next_message() is None and decoder.buffered == 0


@pytest.mark.parametrize(
    "frame",
    [
        protocol.HEADER.pack(protocol.READ, 20) + bytes(20),  # a 1.x id: the wrong size
        protocol.HEADER.pack(protocol.WRITE, 40) + bytes(16) + bytes(8) + b"\x09" + bytes(15),
        protocol.HEADER.pack(protocol.RELEASE, -16) + bytes(16),
        protocol.HEADER.pack(99, 0),
        protocol.HEADER.pack(protocol.READ + 256, 32) + bytes(32),  # a type past a byte
        protocol.Write(protocol.NO_LEASE, 0, bytes(protocol.STREAM_MIN)).encode()[:100],
        protocol.Read(protocol.NO_LEASE, 0, 1).encode()[:-1],  # not whole yet
    ],
)
def test_any_other_frame_ends_the_pass_unconsumed(frame):
    decoder = _decoder_with(frame)
    assert list(decoder.small_requests()) == []
    assert decoder.buffered == len(frame)


def test_the_request_log_still_names_every_request(caplog):
    store = LeaseStore(1 << 20)
    try:
        with caplog.at_level("INFO", logger="memlease"):
            driven = Driven(store)
            (granted,) = driven.send(protocol.Grant(10, 60_000).encode())
            driven.send(protocol.Read(granted.lease_id, 0, 1).encode() * 3)
        reads = [r for r in caplog.records if " read " in r.getMessage()]
        assert len(reads) == 3 and not any(driven.conn.service.served)
    finally:
        store.close()


def test_a_connection_without_its_token_gets_no_answer_from_the_one_pass():
    store = LeaseStore(1 << 20)
    try:
        owner = Driven(store, token=TOKENS["alpha"])
        owner.send(protocol.Auth(TOKENS["alpha"]).encode())
        (granted,) = owner.send(protocol.Grant(10, 60_000).encode())
        stranger = Driven(store, shared=owner.conn.service)
        replies = stranger.send(protocol.Read(granted.lease_id, 0, 1).encode() * 2)
        refusal = protocol.Error(protocol.UNAUTHORIZED, protocol.READ)
        assert replies == [refusal, refusal]
    finally:
        store.close()
