"""Tests of the buddy allocator and the lease store, against simple models of both.

The store is driven with a fake clock, so every expiry is exact and nothing is timed.
"""

import gc
import os
import struct
import uuid
import zlib
from typing import Dict, Iterator, List, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import memlease.store
import protocol
from buddy import Block, BuddyAllocator, FreeBlock, SplitBlock
from memlease.store import LeaseStore, PoolMemory

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


class FakeClock:
    """A clock that moves only when told."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _nodes(allocator: BuddyAllocator) -> Iterator[Block]:
    stack = list(allocator.roots)
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, SplitBlock):
            assert node.left.parent is node and node.right.parent is node
            stack += [node.left, node.right]


# The allocator against a model: a list of the blocks handed out.


class AllocatorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.allocator = BuddyAllocator(4096 + 1024 + 64)
        self.live: List[Tuple[int, int]] = []  # (offset, order)

    @rule(size=st.integers(1, 4096))
    def alloc(self, size: int) -> None:
        order = self.allocator.order_for(size)
        largest = self.allocator.largest_free
        offset = self.allocator.take(order)
        if offset < 0:
            assert largest < 1 << order
            return
        assert offset % (1 << order) == 0 and offset + (1 << order) <= self.allocator.capacity
        self.live.append((offset, order))

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        offset, order = self.live.pop(data.draw(st.integers(0, len(self.live) - 1)))
        self.allocator.release(offset, order)

    @rule(offset=st.integers(0, 5200).map(lambda n: n & ~31), size=st.integers(1, 2048))
    def claim(self, offset: int, size: int) -> None:
        order = self.allocator.order_for(size)
        end = offset + (1 << order)
        fits = offset % (1 << order) == 0 and end <= self.allocator.capacity
        overlaps = any(o < end and offset < o + (1 << k) for o, k in self.live)
        # Non-power-of-two pools have roots: a block may not straddle two of them.
        straddles = offset < 4096 < end or offset < 5120 < end
        claimed = self.allocator.claim(offset, order)
        assert claimed == (fits and not overlaps and not straddles)
        if claimed:
            self.live.append((offset, order))

    @invariant()
    def blocks_are_sound(self) -> None:
        spans = sorted((o, o + (1 << k)) for o, k in self.live)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "blocks overlap"
        used = sum(1 << k for _, k in self.live)
        assert self.allocator.free_bytes == self.allocator.capacity - used
        free_runs = sorted(self.allocator.free_runs())
        assert sum(size for _, size in free_runs) == self.allocator.free_bytes
        leaves = {n.place() for n in _nodes(self.allocator) if n.allocated}
        assert leaves == set(self.live)

    def teardown(self) -> None:
        for offset, order in self.live:
            self.allocator.release(offset, order)
        assert self.allocator.free_bytes == self.allocator.capacity
        for root in self.allocator.roots:
            assert isinstance(root, FreeBlock) and root.left is None
        assert self.allocator.split_blocks == 0


TestAllocatorModel = AllocatorMachine.TestCase
TestAllocatorModel.settings = PROPERTY


def test_a_released_block_merges_and_its_old_node_refuses_a_second_free():
    allocator = BuddyAllocator(1024)
    block = allocator.alloc(100)
    assert block is not None and block.size == 128 and block.parent is not None
    allocator.free(block)
    with pytest.raises(ValueError):
        allocator.free(block)
    with pytest.raises(ValueError):
        allocator.release(0, allocator.order_for(100))
    assert allocator.roots[0].size == 1024 and allocator.split_blocks == 0


def test_dropped_nodes_leave_no_cycles_for_the_collector():
    store = LeaseStore(1 << 16)
    gc.collect()  # other tests' dropped stores
    gc.disable()
    try:
        kept = store.lease(32, 60_000)
        for _ in range(500):
            store.release(store.lease(32, 60_000))
        blocks = [o for o in gc.get_objects() if isinstance(o, Block)]
        in_tree = list(_nodes(store.allocator))
        assert len(blocks) == len(in_tree) == 2 * 11 + 1  # a path of 11 splits down to 32 bytes
        del blocks, in_tree
        store.release(kept)
        assert [o for o in gc.get_objects() if isinstance(o, Block)] == store.allocator.roots
    finally:
        gc.enable()
        store.close()


def test_growth_moves_the_tree_out_of_the_collectors_way_and_churn_does_not(monkeypatch):
    monkeypatch.setattr(memlease.store, "FREEZE_STEP", 200)
    store = LeaseStore(1 << 20)
    try:
        gc.collect()
        for _ in range(5000):
            store.lease(32, 60_000)
        assert store.allocator.split_blocks > 4000
        watched = sum(1 for o in gc.get_objects() if isinstance(o, Block))  # frozen ones are not
        assert watched <= 4 * 200 + 40
        frozen = gc.get_freeze_count()
        for _ in range(2000):
            store.release(store.lease(32, 60_000))
        assert gc.get_freeze_count() <= frozen  # turnover alone freezes nothing more
    finally:
        gc.unfreeze()
        store.close()


# The store against a model: a dict of the live leases and their bytes.


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.store = LeaseStore(8192, clock=self.clock)
        self.leases: Dict[int, Tuple[int, int, int, bytearray]] = {}  # id: tenant, size, ms
        self.granted: Dict[int, int] = {}  # id: the ms of its last grant or renew
        self.started = self.clock.now
        self.gone: List[int] = []

    def now_ms(self) -> int:
        return round((self.clock.now - self.started) * 1000)

    def expire_model(self) -> None:
        for lease_id, (_, _, deadline, _) in list(self.leases.items()):
            if deadline <= self.now_ms():
                del self.leases[lease_id]
                self.gone.append(lease_id)

    @rule(size=st.integers(1, 3000), ms=st.integers(1, 50), tenant=st.integers(0, 2))
    def lease(self, size: int, ms: int, tenant: int) -> None:
        self.expire_model()
        lease_id = self.store.lease(size, ms, tenant)
        if isinstance(lease_id, int):
            assert lease_id == protocol.NO_MEMORY
            # Refused only once every ended lease has given its block back, and none fits.
            assert self.store.allocator.largest_free < size
            assert self.store.allocator.free_bytes == self.store.stats()["free_bytes"]
            return
        assert uuid.UUID(bytes=lease_id).version == 4 and lease_id not in self.leases
        self.leases[lease_id] = (tenant, size, self.now_ms() + ms, bytearray(size))
        self.granted[lease_id] = ms

    @precondition(lambda self: self.leases)
    @rule(data=st.data(), payload=st.binary(min_size=1, max_size=64))
    def write(self, data: st.DataObject, payload: bytes) -> None:
        lease_id = data.draw(st.sampled_from(list(self.leases)))
        tenant, size, deadline, content = self.leases[lease_id]
        offset = data.draw(st.integers(0, size))
        status = self.store.write(lease_id, offset, payload, tenant)
        if deadline <= self.now_ms():
            assert status == protocol.NOT_FOUND
        elif offset + len(payload) <= size:
            assert status == protocol.OK
            content[offset : offset + len(payload)] = payload
        else:
            assert status in (protocol.OUT_OF_RANGE, protocol.TOO_LARGE)

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        lease_id = data.draw(st.sampled_from(list(self.leases)))
        tenant, _, deadline, content = self.leases[lease_id]
        assert self.store.read(lease_id, 0, -1, tenant + 1)[0] == protocol.NOT_FOUND
        status, view = self.store.read(lease_id, 0, -1, tenant)
        if deadline <= self.now_ms():
            assert status == protocol.NOT_FOUND
        else:
            assert status == protocol.OK and bytes(view) == bytes(content)

    @precondition(lambda self: self.leases)
    @rule(data=st.data(), ms=st.integers(1, 50))
    def renew(self, data: st.DataObject, ms: int) -> None:
        lease_id = data.draw(st.sampled_from(list(self.leases)))
        tenant, size, deadline, content = self.leases[lease_id]
        status = self.store.renew(lease_id, ms, tenant)
        if deadline <= self.now_ms():
            assert status == protocol.NOT_FOUND
        else:
            assert status == protocol.OK
            self.leases[lease_id] = (tenant, size, self.now_ms() + ms, content)
            self.granted[lease_id] = ms

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def ttl(self, data: st.DataObject) -> None:
        lease_id = data.draw(st.sampled_from(list(self.leases)))
        tenant, size, deadline, _ = self.leases[lease_id]
        assert self.store.ttl(lease_id, tenant + 1) is None
        found = self.store.ttl(lease_id, tenant)
        if deadline <= self.now_ms():
            assert found is None
        else:
            assert found == (deadline - self.now_ms(), self.granted[lease_id], size)

    @rule(tenant=st.integers(0, 2), limit=st.integers(1, 5))
    def list_leases(self, tenant: int, limit: int) -> None:
        listed: List[protocol.LeaseRow] = []
        cursor = 0
        for _ in range(10_000):
            rows, cursor = self.store.leases(tenant, cursor, limit)
            assert len(rows) <= limit
            listed += rows
            if not cursor:
                break
        now = self.now_ms()
        living = [
            (lease_id, size, deadline - now, 0)
            for lease_id, (owner, size, deadline, _) in self.leases.items()
            if owner == tenant and deadline > now
        ]
        assert sorted(listed) == sorted(living)

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        lease_id = data.draw(st.sampled_from(list(self.leases)))
        tenant, _, deadline, _ = self.leases.pop(lease_id)
        expected = protocol.NOT_FOUND if deadline <= self.now_ms() else protocol.OK
        assert self.store.release(lease_id, tenant) == expected
        self.gone.append(lease_id)

    @rule(ms=st.integers(0, 30))
    def advance(self, ms: int) -> None:
        self.clock.now = self.started + (self.now_ms() + ms) / 1000

    @rule(limit=st.integers(1, 4))
    def expire(self, limit: int) -> None:
        due = sum(1 for _, _, deadline, _ in self.leases.values() if deadline <= self.now_ms())
        assert self.store.expire_due(limit) <= min(limit, due)
        self.expire_model()

    @invariant()
    def books_balance(self) -> None:
        store = self.store
        for lease_id in self.gone[-5:]:
            if lease_id not in self.leases:
                assert store.read(lease_id)[0] == protocol.NOT_FOUND
        self.expire_model()
        live = store.stats()  # before any reaping: ended leases are not counted
        assert live["live_leases"] == len(self.leases)
        used = sum(1 << store.allocator.order_for(s) for _, s, _, _ in self.leases.values())
        assert live["free_bytes"] == store.capacity - used
        for tenant in range(3):
            mine = [s for t, s, _, _ in self.leases.values() if t == tenant]
            blocks = sum(1 << store.allocator.order_for(s) for s in mine)
            assert store.tenant_usage(tenant) == (blocks, len(mine))
            assert store.stats(tenant)["tenant_bytes"] == blocks
        while store.expire_due(1000):
            pass
        assert store.stats()["live_leases"] == len(self.leases)
        assert store.allocator.free_bytes == store.capacity - used
        next_deadline = store.next_deadline()
        if self.leases:
            earliest = min(d for _, _, d, _ in self.leases.values())
            assert next_deadline == pytest.approx(self.started + earliest / 1000)
        else:
            assert next_deadline is None

    def teardown(self) -> None:
        self.store.close()


TestStoreModel = StoreMachine.TestCase
TestStoreModel.settings = PROPERTY


# The lease API: time to live, and the listing.


def test_ttl_tells_the_time_left_the_last_duration_and_the_size():
    clock = FakeClock()
    store = LeaseStore(1 << 12, clock=clock)
    try:
        lease_id = store.lease(100, 5000, tenant=2)
        clock.now += 1.0
        assert store.ttl(lease_id, tenant=2) == (4000, 5000, 100)
        assert store.ttl(lease_id) is None  # another tenant's: not found
        assert store.renew(lease_id, 2000, tenant=2) == protocol.OK
        assert store.ttl(lease_id, tenant=2) == (2000, 2000, 100)
        clock.now += 2.0
        assert store.ttl(lease_id, tenant=2) is None
        assert store.stats()["live_leases"] == 0
    finally:
        store.close()


def _listing(store: LeaseStore, tenant: int, limit: int, between=lambda: None) -> List[bytes]:
    """Every id a listing in pages of ``limit`` gives, calling ``between`` after each page."""
    listed: List[bytes] = []
    cursor = 0
    for _ in range(100_000):
        rows, cursor = store.leases(tenant, cursor, limit)
        assert len(rows) <= limit
        listed += [row.lease_id for row in rows]
        between()
        if not cursor:
            return listed
    raise AssertionError("the listing did not end")


def test_a_listing_gives_each_lease_that_lives_through_it_once_while_the_index_grows():
    clock = FakeClock()
    store = LeaseStore(1 << 20, clock=clock)
    try:
        mine = [store.lease(32, 60_000) for _ in range(3000)]
        theirs = {store.lease(32, 60_000, tenant=1) for _ in range(200)}
        ending = {store.lease(32, 500) for _ in range(100)}
        slots = len(store._index)  # the id index, which doubles as leases are added
        added: List[bytes] = []
        clock.now += 1.0  # the 100 short leases have ended, unreaped

        def grant_more() -> None:
            added.extend(store.lease(32, 60_000) for _ in range(150))

        listed = _listing(store, 0, 97, grant_more)
        assert len(store._index) >= 4 * slots
        assert len(listed) == len(set(listed))
        assert set(mine) <= set(listed) <= set(mine) | set(added)
        assert not set(listed) & (theirs | ending)
        assert set(_listing(store, 1, 1000)) == theirs
    finally:
        store.close()


def test_a_page_costs_a_bounded_scan_however_few_leases_are_the_callers():
    store = LeaseStore(1 << 20)
    try:
        for _ in range(20_000):
            store.lease(32, 60_000, tenant=1)
        rows, cursor = store.leases(0, 0, 1000)
        assert rows == [] and cursor > 0  # a page looked at its share of slots, and stopped
        pages = 0
        while cursor:
            rows, cursor = store.leases(0, cursor, 1000)
            assert rows == []
            pages += 1
        assert pages + 1 == len(store._index) // memlease.store.PAGE_SLOTS
        assert store.leases(0, 1 << 62, 1000) == ([], 0)  # a cursor past the end: done
    finally:
        store.close()


# Deadlines.


def test_expiry_is_exact_to_the_millisecond_without_any_reaping():
    clock = FakeClock(5000.0)
    store = LeaseStore(1 << 12, clock=clock)
    try:
        lease_id = store.lease(10, 1000)
        clock.now = 5000.999
        assert store.read(lease_id)[0] == protocol.OK
        assert store.check_write(lease_id, 0, 1) == protocol.OK
        clock.now = 5001.000
        assert store.check_write(lease_id, 0, 1) == protocol.NOT_FOUND
        assert store.read(lease_id)[0] == protocol.NOT_FOUND
        assert store.stats()["leases_expired"] == 1 and store.next_deadline() is None
    finally:
        store.close()


def test_next_deadline_is_never_after_the_expiry():
    clock = FakeClock(77.0)
    store = LeaseStore(1 << 12, clock=clock)
    try:
        store.lease(10, 250)
        deadline = store.next_deadline()
        assert deadline is not None and deadline <= 77.25
        clock.now = deadline
        assert store.expire_due(10) == 1
    finally:
        store.close()


def test_a_hundred_thousand_renews_of_one_lease_leave_the_deadlines_as_they_were():
    clock = FakeClock()
    store = LeaseStore(1 << 12, clock=clock)
    try:
        lease_id = store.lease(10, 1000)
        before = store.stats()["metadata_bytes"]
        for step in range(100_000):
            clock.now += 0.0001
            assert store.renew(lease_id, 1000 + step % 7) == protocol.OK
        stats = store.stats()
        assert stats["metadata_bytes"] == before and stats["live_leases"] == 1
        assert len(store._deadlines) == 1  # the one entry, not one a renew
        assert stats["leases_renewed"] == 100_000
    finally:
        store.close()


def test_fifty_thousand_expiries_at_once_are_reaped_in_slices():
    clock = FakeClock()
    store = LeaseStore(50_000 * 32, clock=clock)
    try:
        ids = [store.lease(32, 500) for _ in range(50_000)]
        assert len(set(ids)) == 50_000 and all(isinstance(lease_id, bytes) for lease_id in ids)
        clock.now += 0.5
        calls = []
        while True:
            done = store.expire_due(1000)
            if not done:
                break
            calls.append(done)
        assert len(calls) == 50 and max(calls) == 1000
        assert store.stats()["leases_expired"] == 50_000
        assert store.allocator.free_bytes == store.capacity
    finally:
        store.close()


def test_a_lease_past_its_deadline_is_gone_before_the_reaper_comes():
    clock = FakeClock()
    store = LeaseStore(1 << 12, clock=clock)
    try:
        lease_id = store.lease(32, 10)
        store.write(lease_id, 0, b"secret")
        clock.now += 0.010
        assert store.read(lease_id) == (protocol.NOT_FOUND, memoryview(b""))
        assert store.write(lease_id, 0, b"x") == protocol.NOT_FOUND
        assert store.renew(lease_id, 1000) == protocol.NOT_FOUND
        assert store.expire_due(10) == 0
    finally:
        store.close()


def test_a_lease_request_takes_back_the_memory_of_ended_leases_at_once():
    clock = FakeClock()
    store = LeaseStore(1 << 16, clock=clock)
    try:
        small = [store.lease(32, 100) for _ in range(2048)]
        assert all(isinstance(lease_id, bytes) for lease_id in small)
        assert store.lease(32, 100) == protocol.NO_MEMORY
        clock.now += 0.1
        assert store.stats()["live_leases"] == 0  # ended: not counted, though not reaped
        assert store.stats()["free_bytes"] == 1 << 16
        assert isinstance(store.lease(1 << 15, 60_000), bytes)
        stats = store.stats()
        reclaimed = stats["leases_reclaimed"]
        assert 1024 <= reclaimed < 2048  # it stops at the first block that fits
        assert stats["leases_expired"] == reclaimed  # reclaimed leases are expired ones
        assert stats["live_leases"] == 1 and stats["leases_refused"] == 1
        assert store.expire_due(4096) == 2048 - reclaimed
        assert store.stats()["leases_expired"] == 2048
    finally:
        store.close()


def test_a_lease_is_refused_only_when_no_ended_lease_is_left_to_take_back():
    clock = FakeClock()
    store = LeaseStore(1 << 12, clock=clock)
    try:
        forever = store.lease(1 << 11, 60_000)
        ending = [store.lease(32, 10 + n) for n in range(64)]
        assert all(isinstance(lease_id, bytes) for lease_id in [forever, *ending])
        clock.now += 0.030  # 21 of them have ended
        assert store.lease(1 << 11, 60_000) == protocol.NO_MEMORY
        stats = store.stats()
        assert stats["leases_reclaimed"] == 21 and stats["live_leases"] == 1 + 64 - 21
    finally:
        store.close()


def test_the_pool_map_reclaims_ended_leases_so_it_shows_only_the_living():
    clock = FakeClock()
    store = LeaseStore(1 << 12, clock=clock)
    try:
        store.lease(1 << 11, 60_000)
        store.lease(1 << 11, 10)
        clock.now += 0.010
        assert store.reclaim_due(1) and store.stats()["leases_expired"] == 1
        assert store.usage_by_cell(2) == [1 << 11, 0]
        assert store.stats()["leases_reclaimed"] == 1
    finally:
        store.close()


# Requests, tenants and quotas.


def test_refusals_carry_the_protocol_status():
    store = LeaseStore(3000)
    try:
        assert store.lease(0, 100) == protocol.INVALID
        assert store.lease(10, 0) == protocol.INVALID
        assert store.lease(4096, 100) == protocol.TOO_LARGE
        assert isinstance(store.lease(2048, 100), bytes)
        assert store.lease(2048, 100) == protocol.NO_MEMORY
        assert store.stats()["leases_refused"] == 4
        assert store.renew(uuid.uuid4().bytes, 100) == protocol.NOT_FOUND
        assert store.release(protocol.short_form(5)) == protocol.NOT_FOUND
    finally:
        store.close()


def test_writes_and_reads_check_their_range():
    store = LeaseStore(1 << 12)
    try:
        lease_id = store.lease(10, 60_000)
        assert store.write(lease_id, 0, b"x" * 11) == protocol.TOO_LARGE
        assert store.check_write(lease_id, 0, 11) == protocol.TOO_LARGE
        assert store.write(lease_id, 5, b"123456") == protocol.OUT_OF_RANGE
        assert store.write(lease_id, -1, b"1") == protocol.OUT_OF_RANGE
        assert store.write(lease_id, 4, memoryview(b"abcdef")) == protocol.OK
        assert store.write(lease_id, 0, bytearray(b"wxyz")) == protocol.OK
        assert bytes(store.read(lease_id, 2, 4)[1]) == b"yzab"
        assert store.read(lease_id, 8, 3)[0] == protocol.OUT_OF_RANGE
        assert store.read(lease_id, 11)[0] == protocol.OUT_OF_RANGE
        assert bytes(store.read(lease_id, 10)[1]) == b""
        counters = store.stats()
        assert counters["sets"] == 5 and counters["gets"] == 4
    finally:
        store.close()


def test_a_quota_counts_only_living_leases_before_the_reaper_comes():
    clock = FakeClock()
    store = LeaseStore(1 << 12, clock=clock)
    try:
        ending = store.lease(100, 10, tenant=7, quota=256)
        staying = store.lease(100, 60_000, tenant=7, quota=256)
        assert isinstance(ending, bytes) and isinstance(staying, bytes)
        assert store.lease(100, 60_000, tenant=7, quota=256) == protocol.OVER_QUOTA
        clock.now += 0.010  # the first has ended; no reaper has run
        assert store.tenant_usage(7) == (128, 1)
        assert store.lease(200, 60_000, tenant=7, quota=256) == protocol.OVER_QUOTA  # 128 + 256
        again = store.lease(100, 60_000, tenant=7, quota=256)  # 128 + 128: within the quota
        assert isinstance(again, bytes) and store.tenant_usage(7) == (256, 2)
        assert store.lease(1, 60_000, tenant=7, quota=256) == protocol.OVER_QUOTA
    finally:
        store.close()


def test_another_tenants_lease_is_not_found_and_quotas_count_blocks():
    store = LeaseStore(1 << 12)
    try:
        mine = store.lease(100, 60_000, tenant=7, quota=256)
        assert isinstance(mine, bytes)
        assert isinstance(store.lease(100, 60_000, tenant=7, quota=256), bytes)
        assert store.lease(1, 60_000, tenant=7, quota=256) == protocol.OVER_QUOTA
        assert isinstance(store.lease(1, 60_000, tenant=8, quota=256), bytes)
        for other in (0, 8):
            assert store.read(mine, tenant=other)[0] == protocol.NOT_FOUND
            assert store.write(mine, 0, b"x", tenant=other) == protocol.NOT_FOUND
            assert store.renew(mine, 10, tenant=other) == protocol.NOT_FOUND
            assert store.release(mine, tenant=other) == protocol.NOT_FOUND
        assert store.tenant_usage(7) == (256, 2)
        stats = store.stats(tenant=7)
        assert stats["tenant_bytes"] == 256 and stats["tenant_leases"] == 2
        assert store.release(mine, tenant=7) == protocol.OK
        assert store.tenant_usage(7) == (128, 1)
        wide = store.lease(1, 60_000, tenant=70_000)  # a wide tenant number widens its column
        assert isinstance(wide, bytes)
        assert store.tenant_usage(70_000) == (32, 1)
    finally:
        store.close()


def test_granted_memory_is_zeroed_and_ids_are_unique():
    store = LeaseStore(1 << 14)
    try:
        ids = set()
        for _ in range(3):
            batch = [store.lease(64, 60_000) for _ in range(256)]
            for lease_id in batch:
                assert bytes(store.read(lease_id)[1]) == bytes(64)
                store.write(lease_id, 0, b"\xff" * 64)
            ids.update(batch)
            for lease_id in batch:
                store.release(lease_id)
        assert len(ids) > 700
    finally:
        store.close()


def test_a_pinned_block_is_kept_until_the_last_unpin():
    store = LeaseStore(64)  # room for two blocks of 32
    try:
        first = store.lease(32, 60_000)
        store.write(first, 0, b"A" * 32)
        status, view = store.read(first)
        pins = [store.pin(first), store.pin(first)]
        assert store.release(first) == protocol.OK
        assert store.read(first)[0] == protocol.NOT_FOUND
        second = store.lease(32, 60_000)
        assert store.lease(32, 60_000) == protocol.NO_MEMORY  # the pinned block is not reused
        store.write(second, 0, b"B" * 32)
        assert bytes(view) == b"A" * 32  # neither zeroed nor overwritten while pinned
        store.unpin(pins[0])
        assert bytes(view) == b"A" * 32 and store.stats()["free_bytes"] == 0
        store.unpin(pins[1])
        assert bytes(view) == bytes(32)  # zeroed and freed at the last unpin
        with pytest.raises(ValueError):
            store.unpin(pins[1])
        third = store.lease(32, 60_000)
        assert isinstance(third, bytes) and bytes(store.read(third)[1]) == bytes(32)
    finally:
        store.close()


def test_pool_figures_follow_the_free_lists():
    store = LeaseStore(1 << 12)
    try:
        assert store.usage_by_cell(4) == [0, 0, 0, 0]
        assert store.stats()["fragmentation"] == 0
        first = store.lease(1024, 60_000)
        store.lease(1024, 60_000)
        store.release(first)
        assert store.usage_by_cell(4) == [0, 1024, 0, 0]
        assert store.usage_by_cell(8) == [0, 0, 512, 512, 0, 0, 0, 0]
        assert store.free_blocks() == {1024: 1, 2048: 1}
        # 3072 bytes free, the largest block 2048: a third of the free space is not in it.
        assert store.stats()["fragmentation"] == 333
        store.lease(4096 - 2048, 60_000)
        store.lease(1024, 60_000)
        assert store.usage_by_cell(3) == [1365, 1365, 1366]
        assert store.stats()["fragmentation"] == 0 and store.stats()["free_bytes"] == 0
    finally:
        store.close()


# Warm restart.


def _store(path: str, clock: FakeClock, wall: FakeClock, pool: int = 1 << 16) -> LeaseStore:
    return LeaseStore(pool, clock=clock, wall_clock=wall, state_file=path)


@pytest.fixture
def state(tmp_path):
    return str(tmp_path / "pool")


def _untouched(path: str) -> Tuple[bytes, int, int, int]:
    found = os.stat(path)
    with open(path, "rb") as file:
        return file.read(), found.st_uid, found.st_gid, found.st_mode


def test_a_linked_pool_file_is_refused_and_what_it_leads_to_untouched(state, tmp_path):
    target = str(tmp_path / "precious")
    with open(target, "wb") as file:
        file.write(b"root:secret\n")
    before = _untouched(target)
    os.symlink(target, state)
    with pytest.raises(OSError, match="is a symbolic link"):
        LeaseStore(1 << 12, state_file=state)
    os.unlink(state)
    os.link(target, state)  # a second name of it: a hard link
    with pytest.raises(OSError, match="has 2 names"):
        LeaseStore(1 << 12, state_file=state)
    assert _untouched(target) == before
    os.unlink(state)
    os.mkfifo(state)
    with pytest.raises(OSError, match="is not a regular file"):
        LeaseStore(1 << 12, state_file=state)


def test_a_linked_lease_table_is_not_read_and_a_saved_one_is_private(state, tmp_path):
    target = str(tmp_path / "precious")
    with open(target, "wb") as file:
        file.write(b"root:secret\n")
    before = _untouched(target)
    os.symlink(target, state + ".leases")
    store = _store(state, FakeClock(), FakeClock(1.7e9))
    try:
        assert store.restore_note is not None and "symbolic link" in store.restore_note
        store.lease(100, 60_000)
        store.save()
    finally:
        store.close()
    assert _untouched(target) == before
    assert not os.path.islink(state + ".leases")
    assert os.stat(state + ".leases").st_mode & 0o777 == 0o600


def test_a_fifo_for_a_lease_table_starts_clean_without_waiting(state):
    os.mkfifo(state + ".leases")
    store = _store(state, FakeClock(), FakeClock(1.7e9))
    try:
        assert store.restore_note is not None and "not a regular file" in store.restore_note
    finally:
        store.close()


def test_a_saved_pool_comes_back_with_its_ids_bytes_and_less_time(state):
    clock, wall = FakeClock(), FakeClock(1.7e9)
    store = _store(state, clock, wall)
    kept = store.lease(100, 60_000, tenant=3)
    store.write(kept, 0, b"kept bytes", tenant=3)
    short = store.lease(100, 5_000)
    gone = store.lease(100, 60_000)
    store.write(gone, 0, b"released before the stop")
    store.release(gone)
    clock.now += 1.0
    store.save()
    store.close()
    assert os.path.exists(state + ".leases")
    wall.now += 10.0  # ten seconds down: the short lease's time ran out meanwhile
    again = _store(state, FakeClock(50.0), wall)
    try:
        assert again.restore_note is not None and again.restore_note.startswith("restored 1 ")
        assert not os.path.exists(state + ".leases")
        assert bytes(again.read(kept, 0, 10, tenant=3)[1]) == b"kept bytes"
        assert again.read(kept)[0] == protocol.NOT_FOUND  # still tenant 3's
        assert again.read(short)[0] == protocol.NOT_FOUND
        assert again.next_deadline() == pytest.approx(50.0 + 49.0)
        assert again.tenant_usage(3) == (128, 1)
        assert again.memory.buffer.find(b"released") == -1
        assert again.stats()["free_bytes"] == again.capacity - 128
        fresh = again.lease(100, 1000)
        assert isinstance(fresh, bytes) and fresh != kept
    finally:
        again.close()


def _saved(state: str, leases: int = 2) -> None:
    clock, wall = FakeClock(), FakeClock(1.7e9)
    store = _store(state, clock, wall)
    for _ in range(leases):
        lease_id = store.lease(100, 60_000)
        store.write(lease_id, 0, b"doubtful")
    store.save()
    store.close()


def _table(version: int = 2, pool: int = 1 << 16, saved_at: int = 1_700_000_000_000, leases=()):
    """A lease table in the saved format, for cases a real store never writes."""
    count = len(leases)
    key = bytes(16)
    body = struct.pack("<8sIQIqQ16sQ", b"MLEASES\n", version, pool, 32, saved_at, count, key, 0)
    for column, code in enumerate("QQqqqqq"):
        body += struct.pack("<%d%s" % (count, code), *(lease[column] for lease in leases))
    return body + struct.pack("<I", zlib.crc32(body))


def _corrupt(path: str) -> None:
    with open(path, "r+b") as table:
        table.seek(60)
        byte = table.read(1)
        table.seek(60)
        table.write(bytes([byte[0] ^ 1]))


def _truncate(path: str) -> None:
    with open(path, "r+b") as table:
        table.truncate(30)


def _replace(content: bytes):
    def write(path: str) -> None:
        with open(path, "wb") as table:
            table.write(content)

    return write


def _no_table(path: str) -> None:
    os.unlink(path)


UUID_A = struct.unpack(">QQ", uuid.uuid4().bytes)
UUID_B = struct.unpack(">QQ", uuid.uuid4().bytes)
OVERLAP = _table(
    leases=[
        (*UUID_A, 0, 0, 100, 0, 1_700_000_100_000),
        (*UUID_B, 0, 0, 32, 64, 1_700_000_100_000),
    ]
)


@pytest.mark.parametrize(
    "damage, pool, wall_shift, reason",
    [
        (_no_table, 1 << 16, 0, "did not stop cleanly"),
        (None, 1 << 17, 0, "the pool changed"),
        (_replace(_table(version=1)), 1 << 16, 0, "version 1, this server reads versions 2 and 3"),
        (_truncate, 1 << 16, 0, "not one"),
        (_corrupt, 1 << 16, 0, "checksum"),
        (None, 1 << 16, -5.0, "clock went backwards"),
        (_replace(OVERLAP), 1 << 16, 0, "overlap"),
    ],
)
def test_any_doubt_means_a_clean_empty_pool(state, damage, pool, wall_shift, reason):
    _saved(state)
    if damage is not None:
        damage(state + ".leases")
    wall = FakeClock(1.7e9 + wall_shift)
    store = _store(state, FakeClock(), wall, pool)
    try:
        assert store.restore_note is not None and reason in store.restore_note
        assert store.restore_note.startswith("clean start")
        stats = store.stats()
        assert stats["live_leases"] == 0 and stats["free_bytes"] == store.capacity
        assert store.memory.buffer.find(b"doubtful") == -1
        assert not os.path.exists(state + ".leases")
    finally:
        store.close()


def test_a_crash_after_a_restore_cannot_bring_the_old_table_back(state):
    _saved(state)
    store = _store(state, FakeClock(), FakeClock(1.7e9 + 1))
    assert store.restore_note is not None and store.restore_note.startswith("restored 2")
    store.close()  # as after SIGKILL: no save
    again = _store(state, FakeClock(), FakeClock(1.7e9 + 2))
    try:
        assert again.restore_note is not None and "did not stop cleanly" in again.restore_note
        assert again.memory.buffer.find(b"doubtful") == -1
    finally:
        again.close()


def test_a_change_after_saving_withdraws_the_saved_table(state):
    store = _store(state, FakeClock(), FakeClock(1.7e9))
    try:
        lease_id = store.lease(10, 60_000)
        store.save()
        assert os.path.exists(state + ".leases")
        store.release(lease_id)
        assert not os.path.exists(state + ".leases")
    finally:
        store.close()


def test_a_state_file_serves_one_server_at_a_time(state):
    store = _store(state, FakeClock(), FakeClock(1.7e9))
    try:
        with pytest.raises(OSError, match="another server"):
            _store(state, FakeClock(), FakeClock(1.7e9))
    finally:
        store.close()


def test_without_a_state_file_nothing_is_saved(tmp_path):
    store = LeaseStore(1 << 12)
    try:
        store.lease(10, 1000)
        store.save()
        assert store.restore_note is None and os.listdir(str(tmp_path)) == []
    finally:
        store.close()


def test_zeroing_gives_whole_pages_back_and_writes_the_ragged_ends():
    memory = PoolMemory(1 << 16)
    try:
        memory.buffer[:] = b"\xff" * (1 << 16)
        memory.zero(100, 3 * 4096)
        data = memory.buffer[:]
        assert data[:100] == b"\xff" * 100
        assert data[100 : 100 + 3 * 4096] == bytes(3 * 4096)
        assert data[100 + 3 * 4096 :] == b"\xff" * (len(data) - 100 - 3 * 4096)
    finally:
        memory.close()


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no tmpfs at /dev/shm")
def test_a_freed_block_of_a_pool_file_goes_back_to_the_os(tmp_path):
    path = "/dev/shm/memlease-test-%d-%s" % (os.getpid(), tmp_path.name)
    store = LeaseStore(4 << 20, state_file=path)
    try:
        lease_id = store.lease(1 << 20, 60_000)
        store.write(lease_id, 0, b"\x01" * (1 << 20))
        assert os.stat(path).st_blocks * 512 >= 1 << 20
        store.release(lease_id)
        assert os.stat(path).st_blocks * 512 < 64 << 10  # punched out, not zeros written
    finally:
        store.close()
        for leftover in (path, path + ".leases"):
            if os.path.exists(leftover):
                os.unlink(leftover)


def test_deadlines_past_the_narrow_columns_range_keep_their_order():
    clock = FakeClock()
    store = LeaseStore(1 << 12, clock=clock)
    try:
        early = store.lease(10, 2_000_000_000)
        clock.now += 1_900_000
        assert store.renew(early, 2_000_000_000) == protocol.OK  # 3.9e9 ms: 32 bits hold it
        clock.now += 1_900_000  # 44 days on: the next deadline needs more than 32 bits
        late = store.lease(10, 2_000_000_000)
        assert store.next_deadline() == pytest.approx(1000.0 + 3_900_000)
        assert store.renew(early, 1_000) == protocol.OK
        assert store.next_deadline() == pytest.approx(clock.now + 1.0)
        clock.now += 2
        assert store.expire_due(10) == 1 and store.read(late)[0] == protocol.OK
    finally:
        store.close()


def test_a_restart_keeps_each_leases_last_duration(state):
    clock, wall = FakeClock(), FakeClock(1.7e9)
    store = _store(state, clock, wall)
    lease_id = store.lease(100, 60_000)
    assert store.renew(lease_id, 30_000) == protocol.OK
    store.save()
    store.close()
    wall.now += 10.0
    again = _store(state, FakeClock(), wall)
    try:
        assert again.ttl(lease_id) == (20_000, 30_000, 100)
    finally:
        again.close()


def test_a_version_2_table_is_taken_back_with_the_time_left_as_the_duration(state):
    _saved(state)
    lease = (*UUID_A, 0, 0, 100, 0, 1_700_000_100_000)  # 100 s after the table was saved
    _replace(_table(version=2, leases=[lease]))(state + ".leases")
    store = _store(state, FakeClock(), FakeClock(1.7e9 + 10))
    try:
        assert store.restore_note is not None and store.restore_note.startswith("restored 1 ")
        lease_id = struct.pack(">QQ", *UUID_A)
        assert store.ttl(lease_id) == (90_000, 90_000, 100)
        assert store.renew(lease_id, 1000) == protocol.OK
        assert store.ttl(lease_id) == (1000, 1000, 100)
    finally:
        store.close()


def test_a_restart_keeps_short_ids_and_goes_on_issuing_new_ones(state):
    clock, wall = FakeClock(), FakeClock(1.7e9)
    store = _store(state, clock, wall)
    wide = store.lease(32, 60_000)
    short_lease = store.lease(32, 60_000, short_id=True)
    short = store.short_id(short_lease)
    before = [store.short_id(store.lease(32, 60_000, short_id=True)) for _ in range(50)]
    store.save()
    store.close()
    again = _store(state, FakeClock(), wall)
    try:
        assert again.restore_note is not None and again.restore_note.startswith("restored 52 ")
        assert again.read(wide)[0] == protocol.OK and again.short_id(wide) == 0
        assert again.short_id(protocol.short_form(short)) == short
        assert again.read(short_lease)[0] == protocol.OK  # by its UUID too
        after = [again.short_id(again.lease(32, 60_000, short_id=True)) for _ in range(200)]
        assert not set(after) & set(before + [short]) and 0 not in after
    finally:
        again.close()


# A warm restart in bulk: the allocator built from its blocks in one pass, the table
# read in columns.


def _shape(allocator: BuddyAllocator) -> object:
    """The tree as nested tuples of leaf kinds, its links checked on the way."""

    def walk(node: Block, parent: object) -> object:
        assert node.parent is parent
        if isinstance(node, SplitBlock):
            return (walk(node.left, node), walk(node.right, node))
        return type(node).__name__

    return [walk(slot.child, slot) for slot in allocator._slots]


def _state_of(allocator: BuddyAllocator) -> object:
    return (
        _shape(allocator),
        [sorted(free) for free in allocator._free],
        allocator.split_blocks,
        allocator.free_bytes,
        allocator.largest_free,
    )


@st.composite
def _allocated_blocks(draw) -> Tuple[int, List[Tuple[int, int]]]:
    """A pool and the blocks that a run of allocations and frees left allocated in it."""
    pool = draw(st.sampled_from([32, 4096, 3000, 5000 + 64, 1 << 14, 12345]))
    allocator = BuddyAllocator(pool)
    live: List[Block] = []
    steps = draw(st.lists(st.tuples(st.integers(1, 5000), st.booleans()), max_size=80))
    for size, free in steps:
        if free and live:
            allocator.free(live.pop(size % len(live)))
        else:
            block = allocator.alloc(size)
            if block is not None:
                live.append(block)
    return pool, sorted(block.place() for block in live)


@PROPERTY
@given(_allocated_blocks())
def test_an_allocator_built_from_its_blocks_is_the_one_their_claims_build(case):
    pool, blocks = case
    claimed = BuddyAllocator(pool)
    for offset, order in blocks:
        assert claimed.claim(offset, order)
    built = BuddyAllocator(pool)
    built.take_blocks([offset for offset, _ in blocks], [order for _, order in blocks])
    assert _state_of(built) == _state_of(claimed)
    for offset, order in blocks:  # and it goes on as that one would
        built.release(offset, order)
    assert _state_of(built) == _state_of(BuddyAllocator(pool))


@pytest.mark.parametrize(
    "offsets, orders, reason",
    [
        ([0, 32], [6, 5], "overlap"),
        ([32, 0], [5, 5], "order"),
        ([0, 32], [5, 5], None),  # two halves of one 64-byte block: fine
        ([0, 0], [5, 5], "overlap"),
        ([48], [5], "misaligned"),
        ([0], [4], "smaller"),
        ([0, 96], [7, 5], "overlap"),  # a block at the offset a split node takes
        ([2048], [10], "outside"),  # 3000 bytes: no 1 KiB root at 2048
        ([4096], [5], "outside"),
        ([0], [12], "larger"),
        ([-32], [5], "misaligned"),
    ],
)
def test_blocks_that_no_allocator_can_hold_are_refused(offsets, orders, reason):
    allocator = BuddyAllocator(3000)
    if reason is None:
        allocator.take_blocks(offsets, orders)
        assert allocator.free_bytes == 2976 - 64
        return
    with pytest.raises(ValueError, match=reason):
        allocator.take_blocks(offsets, orders)


def test_blocks_are_taken_in_bulk_only_by_an_allocator_with_none_taken():
    allocator = BuddyAllocator(4096)
    allocator.take(5)
    with pytest.raises(ValueError, match="allocated already"):
        allocator.take_blocks([64], [5])


def test_a_warm_restart_brings_back_every_lease_as_it_was(state):
    """Many leases of mixed sizes, tenants and kinds of id, some ended by the restart:
    the restored store is the saved one, lease for lease and byte for byte."""
    clock, wall = FakeClock(), FakeClock(1.7e9)
    store = _store(state, clock, wall, pool=1 << 19)
    leases = {}
    for n in range(600):
        size = (7, 32, 100, 1000, 333)[n % 5] if n else 70_000  # one past 16-bit sizes
        tenant = (0, 3, 300)[n % 3]
        lease_id = store.lease(size, 1000 + 37 * n, tenant, short_id=n % 4 == 0)
        assert isinstance(lease_id, bytes)
        data = bytes([n % 251 + 1]) * min(size, 5)
        assert store.write(lease_id, size - len(data), data, tenant) == protocol.OK
        leases[lease_id] = (tenant, size, 1000 + 37 * n, store.short_id(lease_id), data)
    for lease_id in list(leases)[1::7]:
        assert store.release(lease_id, leases.pop(lease_id)[0]) == protocol.OK
    before = {tenant: store.tenant_usage(tenant) for tenant in (0, 3, 300)}
    store.save()
    store.close()
    wall.now += 5.0  # leases of 5 s or less end while it is stopped
    later = FakeClock(2000.0)
    again = _store(state, later, wall, pool=1 << 19)
    try:
        kept = {i: lease for i, lease in leases.items() if lease[2] > 5000}
        ended = len(leases) - len(kept)
        assert again.restore_note.startswith("restored %d leases" % len(kept))
        assert "(%d more had expired" % ended in again.restore_note
        for lease_id, (tenant, size, _, short, data) in leases.items():
            status, view = again.read(lease_id, size - len(data), len(data), tenant)
            if lease_id in kept:
                assert (status, bytes(view), again.short_id(lease_id)) == (0, data, short)
                if short:
                    assert again.read(protocol.short_form(short), 0, 1, tenant)[0] == 0
            else:
                assert status == protocol.NOT_FOUND
        for tenant in (0, 3, 300):
            theirs = [size for owner, size, *_ in kept.values() if owner == tenant]
            blocks = sum(1 << again.allocator.order_for(size) for size in theirs)
            assert again.tenant_usage(tenant) == (blocks, len(theirs))
            assert before[tenant][1] >= len(theirs)
        replayed = BuddyAllocator(1 << 19)
        for lease_id, (_, size, *_) in kept.items():
            offset = again._offsets[again._position(lease_id)]
            assert replayed.claim(offset, replayed.order_for(size))
        assert _state_of(again.allocator) == _state_of(replayed)
        pool = bytes(again.memory.buffer)
        shown = sum(len(data) for *_, data in kept.values())
        assert len(pool) - pool.count(0) <= shown  # nothing but the leases' bytes is left
        # The leases end in the order of their deadlines, each when its time comes.
        for duration in sorted(duration for _, _, duration, _, _ in kept.values()):
            later.now = 2000.0 + (duration - 5000) / 1000.0 - 0.0005
            assert again.expire_due(len(kept)) == 0
            later.now += 0.0005
            assert again.expire_due(len(kept)) == 1
        assert again.stats()["live_leases"] == 0
        fresh = again.lease(32, 1000, short_id=True)
        assert isinstance(fresh, bytes) and fresh not in leases
        assert again.short_id(fresh) not in {short for _, _, _, short, _ in leases.values()}
    finally:
        again.close()


def test_a_table_with_a_lease_twice_starts_clean(state):
    _saved(state)
    lease = (*UUID_A, 0, 0, 100, 0, 1_700_000_100_000)
    twice = _table(leases=[lease, lease[:5] + (128,) + lease[6:]])
    _replace(twice)(state + ".leases")
    store = _store(state, FakeClock(), FakeClock(1.7e9))
    try:
        assert "twice" in store.restore_note and store.stats()["live_leases"] == 0
    finally:
        store.close()


def test_a_table_out_of_deadline_order_comes_back_in_it(state):
    _saved(state)
    later = (*UUID_A, 0, 0, 100, 0, 1_700_000_100_000)
    sooner = (*UUID_B, 0, 0, 32, 128, 1_700_000_050_000)
    _replace(_table(leases=[later, sooner]))(state + ".leases")  # not a heap: sooner is 2nd
    store = _store(state, FakeClock(), FakeClock(1.7e9))
    try:
        assert store.restore_note.startswith("restored 2 leases")
        assert store.next_deadline() == pytest.approx(1000.0 + 50_000 / 1000)
        sooner_id = struct.pack(">QQ", *UUID_B)
        assert store.read(sooner_id)[0] == protocol.OK
    finally:
        store.close()
