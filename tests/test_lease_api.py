"""The lease API (issue 19): ttl, leases, renew_many and keepalive, on the wire and
through the blocking, asyncio and cluster clients and the command line.

Every server is a real one on a loopback port from the OS (a loop in a thread, or a
process), stopped by the test that started it; waits are bounded and nothing is timed.
"""

import secrets
import uuid

import protocol
from memlease import security
from tests.helpers import closed_by_peer, connect, exchange, server_thread


def _short_forms(count: int) -> list:
    return [protocol.short_form(secrets.randbelow(protocol.INT32_MAX) + 1) for _ in range(count)]


# On the wire.


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
