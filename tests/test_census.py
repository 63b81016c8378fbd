"""Counting the living leases in a storm of expiries without stalling a turn of the loop.

A census (memlease.census) walks the ended leases in steps, over copies of the table
once it stops; a stats request waits for it in order, and so does a scrape of /metrics.
A pool map reclaims the ended leases a reaper's slice a turn before it answers.
"""

import random
import socket
import time
from typing import List, Tuple

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocol
from memlease import connection
from memlease.connection import CENSUS_STEP, Connection, Service
from memlease.listener import MemLeaseServer
from memlease.store import EXPIRY_SLICE, LeaseStore
from memlease_client import MemLeaseClient
from tests.helpers import TIMEOUT
from tests.test_ops import scrape, with_metrics
from tests.test_server import Driven
from tests.test_store import FakeClock

TENANTS = (0, 3, 300)


def _filled(clock: FakeClock, rng: random.Random, count: int) -> Tuple[LeaseStore, List[bytes]]:
    """A store with ``count`` leases of several sizes, tenants and durations."""
    store = LeaseStore(1 << 20, clock=clock)
    ids = []
    for _ in range(count):
        size, duration_ms = rng.choice((32, 40, 100, 700)), rng.randint(1, 60)
        lease_id = store.lease(size, duration_ms, rng.choice(TENANTS))
        assert isinstance(lease_id, bytes)
        ids.append(lease_id)
    return store, ids


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    count=st.integers(0, 300),
    elapsed_ms=st.integers(0, 70),
    budget=st.integers(1, 40),
)
def test_a_census_in_steps_counts_the_moment_it_began_whatever_changes_meanwhile(
    seed: int, count: int, elapsed_ms: int, budget: int
) -> None:
    rng = random.Random(seed)
    clock = FakeClock()
    store, ids = _filled(clock, rng, count)
    try:
        clock.now += elapsed_ms / 1000
        expected = {tenant: store.stats(tenant) for tenant in TENANTS}
        census = store.census()
        steps = 0
        while not census.step(budget):
            steps += 1
            assert steps <= count + 1
            # The table changes between steps, as other requests and the reaper run.
            store.expire_due(rng.randint(0, 5))
            victim = rng.choice(ids)
            for tenant in TENANTS:
                store.release(victim, tenant)
            store.lease(32, 1000, rng.choice(TENANTS))
            clock.now += 0.003
        for tenant in TENANTS:
            assert census.stats(tenant) == expected[tenant]
    finally:
        store.close()


def _storm(clock: FakeClock, ended: int) -> Tuple[LeaseStore, bytes]:
    """A store where ``ended`` leases have just ended together, beside one living lease."""
    store = LeaseStore((ended + 1) * 32 * 2, clock=clock)
    for _ in range(ended):
        store.lease(32, 100)
    living = store.lease(32, 60_000)
    assert isinstance(living, bytes)
    clock.now += 0.100
    return store, living


def test_stats_in_a_storm_wait_for_the_census_in_order_and_count_only_the_living() -> None:
    clock = FakeClock()
    store, living = _storm(clock, 3 * CENSUS_STEP)
    try:
        service = Service(store)
        turns: List[str] = []
        service.census_begun = lambda: turns.append("begun")
        first, second = Driven(store, service), Driven(store, service)
        read = protocol.Read(living, 0, 4).encode()
        # The stats request waits for the census, and so does the request behind it.
        assert first.send(protocol.Stats().encode() + read) == []
        assert turns == ["begun"] and not first.conn.wants_input
        store.release(living)  # after the census began: the second asker must see it
        assert second.send(protocol.Stats().encode()) == []
        answered, rounds = [], 0
        while service.count_more():
            rounds += 1
            assert rounds <= 10
            answered += first.flush()
        first.conn.resume()  # as the loop does once woken: the requests behind go on
        answered += first.flush()
        stats, data = answered
        assert isinstance(stats, protocol.StatsReply) and stats.stats["live_leases"] == 1
        assert stats.stats["free_bytes"] == store.capacity - 32
        assert data == protocol.DataSet(protocol.NOT_FOUND)  # released meanwhile
        (later,) = second.flush()
        assert isinstance(later, protocol.StatsReply) and later.stats["live_leases"] == 0
        assert rounds >= 2 and first.conn.wants_input
    finally:
        store.close()


def test_a_pool_map_in_a_storm_reclaims_a_slice_a_turn_then_shows_every_block_free() -> None:
    clock = FakeClock()
    store, living = _storm(clock, 4 * EXPIRY_SLICE)
    try:
        driven = Driven(store)
        store.release(living)
        assert driven.send(protocol.PoolMap(4).encode()) == []
        turns = 0
        while driven.conn.has_backlog:
            turns += 1
            assert turns <= 10
            driven.conn.resume()
        (reply,) = driven.flush()
        assert isinstance(reply, protocol.PoolMapReply)
        assert reply.free_bytes == reply.pool_bytes and reply.used == (0, 0, 0, 0)
        assert turns >= 3 and store.stats()["leases_reclaimed"] == 4 * EXPIRY_SLICE
    finally:
        store.close()


def test_a_server_in_a_storm_answers_stats_and_metrics_with_the_living_only() -> None:
    storm = 3 * CENSUS_STEP  # ended leases: the census takes several turns to count them
    # With the reaper held back the storm stays whole, as when it is far behind.
    with with_metrics(pool=1 << 22, reaper=False) as (server, endpoint):
        client = MemLeaseClient(*server.server_address, timeout=TIMEOUT)
        with client, socket.create_connection(server.server_address, timeout=TIMEOUT) as sock:
            client.lease(32, 600_000)
            sock.sendall(protocol.Grant(32, 100).encode() * storm)
            expected = storm * len(protocol.Granted(bytes(16)).encode())
            received = 0
            while received < expected:
                chunk = sock.recv(1 << 20)
                assert chunk, "the server closed the connection"
                received += len(chunk)
            time.sleep(0.15)  # every lease of the storm has ended
            stats = client.stats()
            samples = scrape(endpoint.address)
    assert stats["live_leases"] == 1 and stats["free_bytes"] == (1 << 22) - 32
    assert stats["leases_expired"] == 0  # they were all still in the table
    assert samples["memlease_current_leases", ()] == 1


def _manual_server(store: LeaseStore) -> "MemLeaseServer":
    """A server whose loop the test turns itself, the reaper held back (the storm stays)."""
    server = MemLeaseServer(("127.0.0.1", 0), store)
    server.loop.before_wait = None
    return server


def _turn_until_answered(server: "MemLeaseServer", driven: Driven) -> List[protocol.Message]:
    """Turn the server's loop until ``driven`` has replies (40 turns at most): its replies."""
    replies: List[protocol.Message] = []
    for _ in range(40):
        server.loop.run_once(timeout=0)
        replies += driven.flush()
        if replies:
            break
    return replies


def test_a_census_begun_after_another_is_stepped_once_a_turn() -> None:
    clock = FakeClock()
    store, _ = _storm(clock, 3 * CENSUS_STEP)
    server = _manual_server(store)
    try:
        service = server.service
        steps_in_turn: List[int] = []
        count_more = service.count_more

        def counted() -> bool:
            steps_in_turn.append(server.loop.turns)
            return count_more()

        service.count_more = counted  # type: ignore[method-assign]
        first, second = Driven(store, service), Driven(store, service)
        assert first.send(protocol.Stats().encode()) == []  # census 1 begins
        assert second.send(protocol.Stats().encode()) == []  # waits for census 2
        answered = _turn_until_answered(server, second)
        assert [type(reply) for reply in answered] == [protocol.StatsReply]
        per_turn = {turn: steps_in_turn.count(turn) for turn in steps_in_turn}
        assert max(per_turn.values()) == 1, per_turn  # not one step more per census chained
    finally:
        server.close()


def test_a_failing_answer_does_not_strand_the_other_stats_requests(monkeypatch) -> None:
    clock = FakeClock()
    store, living = _storm(clock, 3 * CENSUS_STEP)
    server = _manual_server(store)

    def broken(conn: Connection, message: object) -> None:
        raise RuntimeError("a bug in one request's answer")

    monkeypatch.setitem(connection._ANSWERS, protocol.TimeToLive, broken)
    try:
        service = server.service
        first, culprit, other = (Driven(store, service) for _ in range(3))
        assert first.send(protocol.Stats().encode()) == []  # census 1 begins
        # Both wait for census 2; the culprit's request behind its stats fails.
        culprit_frames = protocol.Stats().encode() + protocol.TimeToLive(living).encode()
        assert culprit.send(culprit_frames) == []
        assert other.send(protocol.Stats().encode()) == []
        replies: List[protocol.Message] = []
        for _ in range(40):
            try:
                server.loop.run_once(timeout=0)
            except RuntimeError:  # the culprit's own loop turn may fail: not the others'
                pass
            replies += other.flush()
            if replies:
                break
        assert [type(reply) for reply in replies] == [protocol.StatsReply]
    finally:
        server.close()


def test_a_pool_map_answers_while_leases_keep_ending_faster_than_a_slice_a_turn() -> None:
    clock = FakeClock()
    store = LeaseStore(1 << 22, clock=clock)
    try:
        per_ms = 2 * EXPIRY_SLICE  # leases that end each millisecond, for 100 ms
        for i in range(100 * per_ms):
            store.lease(32, 1 + i // per_ms)
        clock.now += 0.001
        driven = Driven(store)
        assert driven.send(protocol.PoolMap(4).encode()) == []
        turns = 0
        while driven.conn.has_backlog and turns < 20:
            turns += 1
            clock.now += 0.001  # a turn of the loop: more leases have ended meanwhile
            driven.conn.resume()
        replies = driven.flush()
        assert [type(reply) for reply in replies] == [protocol.PoolMapReply], turns
        (reply,) = replies
        # The map is coherent: the bytes called free are the free blocks it lists.
        assert reply.free_bytes == sum(size * n for size, n in reply.free_blocks)
    finally:
        store.close()


def test_a_census_step_that_fails_does_not_leave_every_later_stats_request_waiting(
    monkeypatch,
) -> None:
    clock = FakeClock()
    store, _ = _storm(clock, 3 * CENSUS_STEP)
    server = _manual_server(store)
    try:
        service = server.service
        first, later = Driven(store, service), Driven(store, service)
        assert first.send(protocol.Stats().encode()) == []  # a census begins
        census = service._census
        assert census is not None
        monkeypatch.setattr(census, "step", lambda budget=None: 1 // 0)
        server.loop.run_once(timeout=0)  # its step fails: logged, and the loop goes on
        assert later.send(protocol.Stats().encode()) == []
        replies = _turn_until_answered(server, later)
        assert [type(reply) for reply in replies] == [protocol.StatsReply]
        assert [type(reply) for reply in first.flush()] == [protocol.StatsReply]
    finally:
        server.close()
