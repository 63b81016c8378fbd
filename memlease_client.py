#!/usr/bin/env python3
"""MemoryLease client: the blocking Python API (the command line is memlease/cli.py).

from memlease_client import MemLeaseClient
with MemLeaseClient("localhost", 412) as c:
    lease_id = c.lease(1024, 5000)  # a uuid.UUID (an int from the C++ server)
    c.set(lease_id, b"hello")
    c.get(lease_id, offset=0, length=5)

python3 memlease_client.py localhost 412 lease 1024 5000

Threads may share one MemLeaseClient: it lends each call one of a few connections.
memlease.cluster (several servers as one) and memlease.aio (asyncio) reuse its calls,
checks and exceptions.
"""

import functools
import io
import os
import socket
import ssl
import sys
import threading
import time
import uuid
from typing import (
    Any,
    Callable,
    Dict,
    Generator,
    Iterable,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Type,
    TypeVar,
    Union,
    cast,
)

import protocol
from memlease import __version__ as __version__  # the project's one version

DEFAULT_PORT = 412
DEFAULT_DURATION_MS = 5000
DEFAULT_MAX_CONNECTIONS = 8
RECV_SIZE = 256 * 1024
# Requests are sent in windows of this many bytes, each window's replies read before
# the next is sent, so neither side can fill both socket buffers and stall the other.
PIPELINE_WINDOW = 64 * 1024
# A large value is sent in slices of this size, so the timeout bounds each slice, not
# the whole value (sendall's timeout covers everything it is given).
SEND_SLICE = 1 << 20
ORIGINAL_VERSION = 1  # what the probe makes of the C++ server: no extension is answered

# What names a lease in the API: the uuid.UUID lease() returned, its text, or a short id.
LeaseId = Union[uuid.UUID, str, int]

# A host written unix:PATH is the server's Unix socket at PATH, on this host.
UNIX_PREFIX = "unix:"


class MemLeaseError(Exception):
    """Base of every error this client raises; ``status`` is the server's code, if any."""

    def __init__(self, message: str, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.status = status


class LeaseNotFound(MemLeaseError):
    """No such lease, or it has expired."""


class TooLarge(MemLeaseError):
    """Data longer than the lease, or a lease larger than the server's pool."""


class OutOfRange(MemLeaseError):
    """An offset or length outside the lease."""


class InvalidArgument(MemLeaseError):
    """A size, duration or id that the protocol cannot carry or the server refuses."""


class OutOfMemory(MemLeaseError):
    """The server has no free block large enough right now."""


class QuotaExceeded(OutOfMemory):
    """The lease would take the tenant over its quota (the pool itself may have room)."""


class Unauthorized(MemLeaseError):
    """The server wants a valid token (MEMLEASE_TOKEN)."""


class ServerBusy(MemLeaseError):
    """The server is at its connection limit."""


class MemLeaseProtocolError(MemLeaseError):
    """The server or the client did not follow the protocol."""


class MemLeaseConnectionError(MemLeaseError):
    """Cannot connect, the connection broke, or the server did not answer in time."""


class LeaseLost(MemLeaseError):
    """A kept-alive lease ended: a renewal found it gone, or none got through before its
    time surely ran out.  Its ``__cause__`` is the error that showed it."""


class _ClosedBeforeReply(MemLeaseConnectionError):
    """A plain connection closed before its first reply: what a TLS port does to it."""


class _NotTLS(MemLeaseConnectionError):
    """A TLS handshake answered with bytes that are not TLS: a port without TLS."""


_ERRORS = {
    protocol.NOT_FOUND: LeaseNotFound,
    protocol.TOO_LARGE: TooLarge,
    protocol.OUT_OF_RANGE: OutOfRange,
    protocol.INVALID: InvalidArgument,
    protocol.UNAUTHORIZED: Unauthorized,
    protocol.UNKNOWN_TYPE: MemLeaseProtocolError,
    protocol.MALFORMED: MemLeaseProtocolError,
    protocol.FRAME_TOO_LARGE: MemLeaseProtocolError,
    protocol.BUSY: ServerBusy,
    protocol.OVER_QUOTA: QuotaExceeded,
}


def _status_error(status: int, what: str) -> MemLeaseError:
    reason = protocol.STATUS_TEXT.get(status, "unknown status")
    return _ERRORS.get(status, MemLeaseError)("%s: %s (%d)" % (what, reason, status), status)


# Checks of the arguments, so that misuse gets our words, not a struct.error.


def _whole_number(name: str, value: object) -> int:
    if type(value) is int:  # the usual case, checked first: bool is a subclass of int
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("%s must be an int, not %s" % (name, type(value).__name__))
    return value


def _checked_size(size: object) -> int:
    value = _whole_number("size", size)
    if value > protocol.INT32_MAX:
        raise InvalidArgument(
            "size %d is over the largest lease, %d bytes" % (value, protocol.INT32_MAX),
            protocol.INVALID,
        )
    if value <= 0:
        raise InvalidArgument("size %d must be positive" % value, protocol.INVALID)
    return value


def _checked_duration(duration_ms: object) -> int:
    value = _whole_number("duration_ms", duration_ms)
    if not 0 < value <= protocol.INT32_MAX:
        raise InvalidArgument(
            "duration %d ms is not between 1 and %d ms" % (value, protocol.INT32_MAX),
            protocol.INVALID,
        )
    return value


def _checked_id(lease_id: object) -> Union[int, bytes]:
    """The id as the wire carries it: a short id's number, or a UUID's 16 bytes.

    A uuid.UUID, its text, or an int short id; an id no lease can have is not found.
    """
    if isinstance(lease_id, uuid.UUID):
        wide = lease_id.bytes
    elif isinstance(lease_id, str):
        try:
            wide = uuid.UUID(lease_id).bytes
        except ValueError:
            raise InvalidArgument(
                "lease id %r is not a UUID (nor is it an int short id)" % lease_id,
                protocol.INVALID,
            ) from None
    elif isinstance(lease_id, int) and not isinstance(lease_id, bool):
        return _checked_short_id(lease_id)
    else:
        raise TypeError(
            "lease id must be a uuid.UUID, its text or an int, not %s" % type(lease_id).__name__
        )
    short_id = protocol.short_id_in(wide)
    if short_id is None:
        if not protocol.is_lease_id(wide):
            raise LeaseNotFound(
                "lease %s: no such lease (ids are version 4 UUIDs)" % uuid.UUID(bytes=wide),
                protocol.NOT_FOUND,
            )
        return wide
    return _checked_short_id(short_id)


def _checked_short_id(short_id: int) -> int:
    if not 0 < short_id <= protocol.INT32_MAX:
        raise LeaseNotFound(
            "lease %d: no such lease (short ids are 1 to %d)" % (short_id, protocol.INT32_MAX),
            protocol.NOT_FOUND,
        )
    return short_id


def _wide(lease_id: Union[int, bytes]) -> bytes:
    """The 16 bytes the extensions carry for a checked id."""
    return protocol.short_form(lease_id) if isinstance(lease_id, int) else lease_id


def id_of(lease_id: Union[int, bytes]) -> Union[uuid.UUID, int]:
    """A checked id as the API hands it out: a uuid.UUID, or a short id's int."""
    return lease_id if isinstance(lease_id, int) else uuid.UUID(bytes=lease_id)


def _checked_place(name: str, value: object) -> int:
    """An offset or length: a position inside some lease."""
    number = _whole_number(name, value)
    if not 0 <= number <= protocol.INT32_MAX:
        raise OutOfRange(
            "%s %d is outside any lease (0 to %d)" % (name, number, protocol.INT32_MAX),
            protocol.OUT_OF_RANGE,
        )
    return number


def _checked_data(data: object) -> bytes:
    """The data as bytes; a large buffer is kept as a view of the caller's, not copied."""
    if isinstance(data, bytes):
        view: Union[bytes, memoryview] = data
    elif isinstance(data, str):
        raise TypeError("data must be bytes-like, not str: encode it, e.g. 'text'.encode()")
    else:
        try:
            view = memoryview(cast(Any, data)).cast("B")
        except TypeError:
            raise TypeError(
                "data must be bytes-like (bytes, bytearray, memoryview), not %s"
                % type(data).__name__
            ) from None
        if len(view) < protocol.STREAM_MIN:
            view = view.tobytes()
    if len(view) > protocol.INT32_MAX:
        raise TooLarge(
            "data of %d bytes is over the largest lease, %d bytes"
            % (len(view), protocol.INT32_MAX),
            protocol.TOO_LARGE,
        )
    return cast(bytes, view)  # a view serves every use of bytes the encoders make


class LeaseTTL(NamedTuple):
    """What ttl() tells of a live lease."""

    remaining_ms: int
    granted_ms: int  # the duration of its last grant or renew
    size: int


class LeaseInfo(NamedTuple):
    """One lease that leases() lists."""

    lease_id: Any  # a uuid.UUID; a cluster's LeaseHandle in memlease.cluster
    size: int
    remaining_ms: int
    short_id: int  # the short id the C++ client knows it by; 0 when it has none


class LeasePage(NamedTuple):
    """A page of leases() and the cursor of the next one (0 after the last)."""

    leases: List[LeaseInfo]
    next_cursor: int


# Calls: a request and how its reply becomes a result, shared by every client.


class Call(NamedTuple):
    """A request and how to turn its reply into a result."""

    request: protocol.Request
    result: Callable[[protocol.Request, protocol.Reply], Any]


def _unexpected(request: protocol.Request, reply: protocol.Reply) -> MemLeaseError:
    if isinstance(reply, protocol.Error):
        return _status_error(reply.status, protocol.request_name(request))
    return MemLeaseProtocolError(
        "unexpected reply %r to %r" % (type(reply).__name__, type(request).__name__)
    )


def _lease_refused(status: int) -> MemLeaseError:
    if status == protocol.NO_MEMORY:
        return OutOfMemory("lease refused: " + protocol.NO_MEMORY_TEXT, status)
    return _status_error(status, "lease refused")


def _lease_id(request: protocol.Request, reply: protocol.Reply) -> int:
    if not isinstance(reply, protocol.Leased):
        raise _unexpected(request, reply)
    if reply.lease_id > 0:
        return reply.lease_id
    raise _lease_refused(reply.lease_id)


def _granted_id(request: protocol.Request, reply: protocol.Reply) -> uuid.UUID:
    if isinstance(reply, protocol.Granted):
        return uuid.UUID(bytes=reply.lease_id)
    if isinstance(reply, protocol.DataSet) and reply.status != protocol.OK:
        raise _lease_refused(reply.status)
    raise _unexpected(request, reply)


def _done(request: protocol.Request, reply: protocol.Reply) -> None:
    if not isinstance(reply, protocol.DataSet):
        raise _unexpected(request, reply)
    if reply.status != protocol.OK:
        lease_id = getattr(request, "lease_id", None)
        what = protocol.request_name(request) if lease_id is None else _lease_text(lease_id)
        raise _status_error(reply.status, what)


_Answer = TypeVar("_Answer")


def _answer_as(kind: Type[_Answer], request: protocol.Request, reply: protocol.Reply) -> _Answer:
    """``reply`` as the ``kind`` of answer ``request`` wants; a status reply (DataSet) or
    an Error in its place raises the error it says."""
    if isinstance(reply, protocol.DataSet):
        _done(request, reply)
    if not isinstance(reply, kind):
        raise _unexpected(request, reply)
    return reply


def _lease_text(lease_id: Union[int, bytes]) -> str:
    return "lease " + protocol.id_text(lease_id)


def checked_id_text(lease_id: LeaseId) -> str:
    """``lease <id>`` for an id the API takes, checked as every call checks it."""
    return _lease_text(_checked_id(lease_id))


def _data(request: protocol.Request, reply: protocol.Reply) -> bytes:
    lease_id: Union[int, bytes] = request.lease_id  # type: ignore[union-attr]  # get, read
    reply = _answer_as(protocol.Data, request, reply)  # a DataSet: a refused ranged read
    # The reply names the lease by its short id (0 for none): a UUID cannot be checked.
    short_id = lease_id if isinstance(lease_id, int) else protocol.short_id_in(lease_id)
    if short_id is not None and reply.lease_id != short_id:
        raise MemLeaseProtocolError(
            "asked for lease %d, got lease %d" % (short_id, reply.lease_id)
        )
    # The original's get answers an unknown lease with no data; a lease is never empty.
    if not reply.data and isinstance(request, protocol.AccessData):
        raise _status_error(protocol.NOT_FOUND, _lease_text(lease_id))
    return reply.data


def _server_version(request: protocol.Request, reply: protocol.Reply) -> int:
    """The protocol version a probe's reply shows; the original (1) answers no data."""
    if isinstance(reply, protocol.Error):
        return protocol.PROTOCOL_VERSION  # only this server sends Error
    if isinstance(reply, protocol.Data) and reply.lease_id == protocol.PROBE_ID:
        if not reply.data:
            return ORIGINAL_VERSION
        name, _, version = reply.data.partition(b" ")
        if name == b"memlease" and version.isdigit():
            return int(version)
    raise MemLeaseProtocolError("the server answered the probe with %r" % (reply,))


def speaks_extensions(reply: protocol.Reply) -> bool:
    """Whether the server that gave this reply to the probe answers the extensions."""
    return _server_version(PROBE.request, reply) > ORIGINAL_VERSION


def _ttl(request: protocol.Request, reply: protocol.Reply) -> LeaseTTL:
    # A DataSet: an ended lease, LeaseNotFound.
    return LeaseTTL(*_answer_as(protocol.TimeToLiveReply, request, reply))


def _page(request: protocol.Request, reply: protocol.Reply) -> LeasePage:
    reply = _answer_as(protocol.LeaseList, request, reply)
    leases = [
        LeaseInfo(uuid.UUID(bytes=row.lease_id), row.size, row.remaining_ms, row.short_id)
        for row in reply.rows
    ]
    return LeasePage(leases, reply.next_cursor)


def _not_renewed(
    given: Sequence[Any], request: protocol.Request, reply: protocol.Reply
) -> List[Any]:
    """What the caller gave for each id the reply lists: the reply keeps the request's
    order, so each is matched to the next one asked with its bytes."""
    reply = _answer_as(protocol.RenewManyReply, request, reply)
    asked: Tuple[bytes, ...] = request.lease_ids  # type: ignore[union-attr]  # a RenewMany
    missed = iter(reply.lease_ids)
    wanted = next(missed, None)
    found = []
    for lease_id, what in zip(asked, given):
        if lease_id == wanted:
            found.append(what)
            wanted = next(missed, None)
    if wanted is not None:
        raise MemLeaseProtocolError("the server listed an id not asked to renew")
    return found


def _stats(request: protocol.Request, reply: protocol.Reply) -> Dict[str, int]:
    if not isinstance(reply, protocol.StatsReply):
        raise _unexpected(request, reply)
    return reply.stats


def _pool_map(request: protocol.Request, reply: protocol.Reply) -> protocol.PoolMapReply:
    if not isinstance(reply, protocol.PoolMapReply):
        raise _unexpected(request, reply)
    return reply


# The probe: whether the server is this one (it answers Grant) or the original.
PROBE = Call(protocol.AccessData(protocol.PROBE_ID), _server_version)


def lease_call(size: int, duration_ms: int) -> Call:
    """A lease under a UUID: Grant, which only this server answers (see original_call)."""
    return Call(protocol.Grant(_checked_size(size), _checked_duration(duration_ms)), _granted_id)


def original_call(call: Call) -> Optional[Call]:
    """``call`` as the original server takes it (a lease through its Lease message), or
    None when it has no such request and would never answer."""
    if isinstance(call.request, protocol.Grant):
        return Call(protocol.Lease(*call.request), _lease_id)
    if isinstance(call.request, (protocol.SetData, protocol.AccessData)):
        return call
    return None


def needs_probe(calls: Sequence[Call]) -> bool:
    """Whether the calls differ between the two servers (a lease), so one must be known."""
    return any(isinstance(call.request, protocol.Grant) for call in calls)


class Exchange(NamedTuple):
    """One round trip of a request plan: requests sent together, their replies awaited."""

    requests: List[protocol.Request]
    # With the probe first: whether its reply promises answers to the rest.
    probe: Optional[Callable[[protocol.Reply], bool]] = None
    reuse: bool = True  # whether the connection is kept for later calls


RequestPlan = Generator[Exchange, List[protocol.Reply], List[Any]]


class RequestPath:
    """Which server a client talks to, and the round trips its calls take there.

    Sans-IO, so that the blocking and the asyncio clients take the same steps: the plan
    yields each Exchange, is sent its replies, and returns the calls' results.  The first
    call that needs to know the server goes with the probe in front of it, which costs
    this server no round trip; the original then gets its own messages, one request a
    connection, and a request it has no form of fails at once instead of waiting (before
    the server is known, such a request is sent as it is: only this server answers it).
    """

    def __init__(self) -> None:
        self.server_version: Optional[int] = None

    def plan(self, calls: Sequence[Call]) -> RequestPlan:
        if self.server_version is None and needs_probe(calls):
            requests = [PROBE.request] + [call.request for call in calls]
            replies = yield Exchange(requests, probe=speaks_extensions)
            self.server_version = PROBE.result(PROBE.request, replies[0])
            if len(replies) == len(requests):
                return results_of(calls, replies[1:])
        if self.server_version == ORIGINAL_VERSION:
            results: List[Any] = []
            for call in calls:
                original = original_call(call)
                if original is None:
                    results.append(_not_on_the_original(call.request))
                    continue
                replies = yield Exchange([original.request], reuse=False)
                results.extend(results_of([original], replies))
            return results
        return results_of(calls, (yield Exchange([call.request for call in calls])))


def _not_on_the_original(request: protocol.Request) -> MemLeaseError:
    return MemLeaseProtocolError(
        "%s: the C++ MemoryLease server has no such request" % protocol.request_name(request)
    )


def run_plan(plan: RequestPlan, exchange: Callable[[Exchange], List[protocol.Reply]]) -> List[Any]:
    """Drive a request plan through ``exchange``; the calls' results."""
    try:
        step = next(plan)
        while True:
            step = plan.send(exchange(step))
    except StopIteration as done:
        results: List[Any] = done.value
        return results


def set_call(lease_id: LeaseId, data: bytes, offset: int = 0, truncate: bool = False) -> Call:
    checked_id, data = _checked_id(lease_id), _checked_data(data)
    offset = _checked_place("offset", offset)
    if not isinstance(truncate, bool):
        raise TypeError("truncate must be a bool, not %s" % type(truncate).__name__)
    if truncate:
        if offset:
            raise InvalidArgument(
                "truncate zeroes the lease after data written at offset 0, not %d" % offset,
                protocol.INVALID,
            )
        return Call(protocol.Replace(_wide(checked_id), data), _done)
    if offset == 0 and isinstance(checked_id, int):  # the original's message: its server too
        return Call(protocol.SetData(checked_id, data), _done)
    return Call(protocol.Write(_wide(checked_id), offset, data), _done)


def get_call(lease_id: LeaseId, offset: int = 0, length: Optional[int] = None) -> Call:
    checked_id, offset = _checked_id(lease_id), _checked_place("offset", offset)
    if offset == 0 and length is None and isinstance(checked_id, int):
        return Call(protocol.AccessData(checked_id), _data)  # the original's: its server too
    wire_length = -1 if length is None else _checked_place("length", length)
    return Call(protocol.Read(_wide(checked_id), offset, wire_length), _data)


def renew_call(lease_id: LeaseId, duration_ms: int) -> Call:
    checked_id = _wide(_checked_id(lease_id))
    return Call(protocol.Renew(checked_id, _checked_duration(duration_ms)), _done)


def release_call(lease_id: LeaseId) -> Call:
    return Call(protocol.Release(_wide(_checked_id(lease_id))), _done)


def stats_call() -> Call:
    return Call(protocol.Stats(), _stats)


def ttl_call(lease_id: LeaseId) -> Call:
    return Call(protocol.TimeToLive(_wide(_checked_id(lease_id))), _ttl)


def page_call(cursor: int, page_size: int) -> Call:
    """A page of leases(); ``page_size`` was checked by checked_page_size."""
    return Call(protocol.ListLeases(cursor, page_size), _page)


def checked_page_size(page_size: object) -> int:
    value = _whole_number("page_size", page_size)
    if not 0 < value <= protocol.MAX_ROWS:
        raise InvalidArgument(
            "page_size %d is not between 1 and %d" % (value, protocol.MAX_ROWS), protocol.INVALID
        )
    return value


def renew_many_calls(named: Sequence[Tuple[Any, LeaseId]], duration_ms: int) -> List[Call]:
    """RenewMany requests (MAX_ROWS ids each) for the ``(given, lease id)`` pairs: each
    call's result lists what was given for the leases it could not renew."""
    duration = _checked_duration(duration_ms)
    wide = [_wide(_checked_id(lease_id)) for _, lease_id in named]
    given = [what for what, _ in named]
    return [
        Call(
            protocol.RenewMany(duration, tuple(wide[start : start + protocol.MAX_ROWS])),
            functools.partial(_not_renewed, given[start : start + protocol.MAX_ROWS]),
        )
        for start in range(0, len(named), protocol.MAX_ROWS)
    ]


def pool_map_call(cells: int) -> Call:
    count = _whole_number("cells", cells)
    if not 0 < count <= protocol.INT32_MAX:
        raise InvalidArgument("cells %d must be positive" % count, protocol.INVALID)
    return Call(protocol.PoolMap(count), _pool_map)


def auth_call(token: bytes) -> Call:
    return Call(protocol.Auth(token), _done)


def results_of(calls: Sequence[Call], replies: Sequence[protocol.Reply]) -> List[Any]:
    """Each call's result, or the MemLeaseError its reply means."""
    results: List[Any] = []
    for call, reply in zip(calls, replies):
        try:
            results.append(call.result(call.request, reply))
        except MemLeaseError as exc:
            results.append(exc)
    return results


def raise_first_error(results: Sequence[Any]) -> None:
    for result in results:
        if isinstance(result, MemLeaseError):
            raise result


def frame_parts(request: protocol.Request) -> Tuple[bytes, ...]:
    """The request's bytes; a large value apart from its head, so it is sent without a copy."""
    if isinstance(request, (protocol.SetData, protocol.Write, protocol.Replace)) and (
        len(request.data) >= protocol.STREAM_MIN
    ):
        return request.head(), request.data
    return (request.encode(),)


def listing(fetch: Callable[[Call], Any], page_size: int) -> Iterator[LeaseInfo]:
    """Every lease of the pages ``fetch`` gets, page after page until the last."""
    call: Optional[Call] = page_call(0, page_size)
    while call is not None:
        page: LeasePage = fetch(call)
        yield from page.leases
        call = next_page_call(page, page_size)


def next_page_call(page: LeasePage, page_size: int) -> Optional[Call]:
    """The call for the page after ``page``; None after the last."""
    return page_call(page.next_cursor, page_size) if page.next_cursor else None


# Keeping a lease alive.

_CLOCK_SLACK = 0.002  # seconds: the server counts whole milliseconds
_RETRY_MOST = 1.0  # seconds between tries after a failed renewal, at most


class KeepAliveSchedule:
    """When a kept lease is renewed, and when it is lost: the decisions the thread
    (KeepAlive) and the asyncio task (memlease.aio) share, on the times they are given.

    A renewal asked at A and answered at B moved the server's deadline to between A and B
    plus the duration: the next one is due at a third of the duration after A, and after
    B plus the duration the lease has surely ended.  A renewal that fails for any other
    reason than the lease being gone is tried again until then.
    """

    def __init__(self, name: str, ttl: LeaseTTL, asked: float, answered: float) -> None:
        self.name = name
        self.duration_ms = ttl.granted_ms
        self.lost: Optional[LeaseLost] = None
        self._duration = ttl.granted_ms / 1000
        remaining = ttl.remaining_ms / 1000
        self._next = asked + remaining - 2 * self._duration / 3
        self._gone_after = answered + remaining + _CLOCK_SLACK

    def wait(self, now: float) -> float:
        """Seconds from ``now`` to the next renewal."""
        return max(self._next - now, 0.0)

    def renewed(self, asked: float, answered: float) -> None:
        self._next = asked + self._duration / 3
        self._gone_after = answered + self._duration + _CLOCK_SLACK

    def failed(self, error: BaseException, now: float) -> None:
        """A renewal failed with ``error`` at ``now``: lost, or to be tried again soon."""
        if isinstance(error, LeaseNotFound):
            why = "it no longer exists (released, or ended)"
        elif not isinstance(error, MemLeaseError):
            why = "renewing it failed: %r" % error
        elif now >= self._gone_after:
            why = "no renewal got through before it surely ended (last: %s)" % error
        else:
            self._next = now + min(self._duration / 10, _RETRY_MOST)
            return
        status = error.status if isinstance(error, MemLeaseError) else None
        self.lost = LeaseLost("%s was lost: %s" % (self.name, why), status)
        self.lost.__cause__ = error

    def ending(self, release_error: Optional[MemLeaseError]) -> Optional[MemLeaseError]:
        """What leaving the block raises: LeaseLost once the lease is lost (a release that
        finds it gone finds it lost), else the release's own error, if any."""
        if isinstance(release_error, LeaseNotFound):
            self.failed(release_error, 0.0)
        return self.lost or release_error


class KeptLease:
    """What a keepalive tells of its lease: the thread's (KeepAlive) and the asyncio
    task's alike.  Its schedule is made on entering the block, from the lease's ttl."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._schedule: Optional[KeepAliveSchedule] = None

    @property
    def lost(self) -> bool:
        return self._schedule is not None and self._schedule.lost is not None

    @property
    def reason(self) -> Optional[BaseException]:
        """The error that showed the lease lost (LeaseNotFound, a connection error...)."""
        lost = self._schedule.lost if self._schedule is not None else None
        return None if lost is None else lost.__cause__

    @property
    def duration_ms(self) -> int:
        """The duration each renewal gives: the lease's last, as ttl told it."""
        return 0 if self._schedule is None else self._schedule.duration_ms

    def _begin(self, ttl: LeaseTTL, asked: float) -> KeepAliveSchedule:
        self._schedule = KeepAliveSchedule(self.name, ttl, asked, time.monotonic())
        return self._schedule


class KeepAlive(KeptLease):
    """A lease renewed by a daemon thread while a ``with`` block runs (see
    MemLeaseClient.keepalive); the thread is stopped on leaving, whatever happens.

    If the block raises, its exception goes on: LeaseLost, or the release's failure, is
    raised only on leaving a block that ran through (``lost`` and ``reason`` say it too).
    """

    def __init__(
        self,
        name: str,
        ttl: Callable[[], LeaseTTL],
        renew: Callable[[int], None],
        release: Optional[Callable[[], None]],
    ) -> None:
        super().__init__(name)
        self._ttl, self._renew, self._release = ttl, renew, release
        self._stopping = threading.Event()
        self._lost = threading.Event()
        self._thread = threading.Thread(target=self._run, name="keepalive " + name, daemon=True)

    def wait_lost(self, timeout: Optional[float] = None) -> bool:
        """Block until the lease is lost (True) or ``timeout`` seconds pass (False)."""
        return self._lost.wait(timeout)

    def __enter__(self) -> "KeepAlive":
        asked = time.monotonic()
        self._begin(self._ttl(), asked)
        self._thread.start()
        return self

    def __exit__(self, exc_type: Optional[type], *exc_info: object) -> None:
        self._stopping.set()
        self._thread.join()
        assert self._schedule is not None
        release_error = None
        if self._release is not None and not self.lost:
            try:
                self._release()
            except MemLeaseError as exc:
                release_error = exc
        error = self._schedule.ending(release_error)
        if error is not None and exc_type is None:
            raise error

    def _run(self) -> None:
        schedule = self._schedule
        assert schedule is not None
        while not self._stopping.wait(schedule.wait(time.monotonic())):
            asked = time.monotonic()
            try:
                self._renew(schedule.duration_ms)
            except Exception as exc:  # whatever it is, the lease is not renewed: never silent
                schedule.failed(exc, time.monotonic())
                if schedule.lost is not None:
                    self._lost.set()
                    return
            else:
                schedule.renewed(asked, time.monotonic())


# Connections.


def client_tls_context(
    ca_file: Optional[str] = None,
    cert_file: Optional[str] = None,
    key_file: Optional[str] = None,
) -> ssl.SSLContext:
    """TLS 1.2 or later, the server verified against ``ca_file`` (default: the system's
    authorities); ``cert_file`` (and ``key_file``) are presented for mutual TLS."""
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidArgument(
            "cannot use %s as TLS authorities: %s" % (ca_file, _reason(exc))
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        try:
            context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as exc:
            files = cert_file if key_file is None else "%s and %s" % (cert_file, key_file)
            raise InvalidArgument(
                "cannot use %s as the TLS certificate: %s" % (files, _reason(exc))
            ) from None
    return context


class Settings(NamedTuple):
    """How to reach one server, checked once; the blocking and async clients share it."""

    host: str
    port: int
    timeout: Optional[float]
    token: Optional[bytes]
    tls: Optional[ssl.SSLContext]

    @property
    def where(self) -> str:
        return address_text(self.host, self.port)


def client_settings(
    host: str,
    port: int,
    timeout: Optional[float],
    token: Optional[Union[str, bytes]],
    tls: Union[bool, ssl.SSLContext, None],
) -> Settings:
    """The checked settings; the token defaults to $MEMLEASE_TOKEN."""
    if not isinstance(host, str):
        raise TypeError("host must be a str, not %s" % type(host).__name__)
    path = unix_path(host)
    if path == "":
        raise InvalidArgument("host %r names no socket file: write unix:PATH" % host)
    context = _tls_context(tls)
    if path is not None and context is not None:
        raise InvalidArgument("%s is served without TLS (its peers are on this host)" % host)
    return Settings(
        host, _checked_port(port), _checked_timeout(timeout), _token_bytes(token), context
    )


def unix_path(host: str) -> Optional[str]:
    """The socket file a ``unix:PATH`` host names; None for a network host."""
    return host[len(UNIX_PREFIX) :] if host.startswith(UNIX_PREFIX) else None


def open_socket(settings: Settings) -> socket.socket:
    """A socket connected to the server: TCP without Nagle's delay, or its Unix socket."""
    path = unix_path(settings.host)
    if path is None:
        sock = socket.create_connection((settings.host, settings.port), timeout=settings.timeout)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if path is None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            sock.settimeout(settings.timeout)
            sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


def _tls_context(tls: Union[bool, ssl.SSLContext, None]) -> Optional[ssl.SSLContext]:
    if isinstance(tls, ssl.SSLContext):
        return tls
    if tls is None or isinstance(tls, bool):
        return client_tls_context() if tls else None
    raise TypeError("tls must be a bool or an ssl.SSLContext, not %s" % type(tls).__name__)


def _token_bytes(token: Optional[Union[str, bytes]]) -> Optional[bytes]:
    """The token to present: the argument, else $MEMLEASE_TOKEN, else none."""
    if token is None:
        token = os.environ.get("MEMLEASE_TOKEN") or None
    if token is None or isinstance(token, bytes):
        return token
    if isinstance(token, str):  # surrogates stand for the bytes the environment held
        return token.encode("utf-8", "surrogateescape")
    raise TypeError("token must be str or bytes, not %s" % type(token).__name__)


MAX_TIMEOUT = 365 * 24 * 3600  # seconds: longer ones overflow the platform's timeouts


def _checked_timeout(timeout: Optional[float]) -> Optional[float]:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError("timeout must be a number of seconds, not %s" % type(timeout).__name__)
    if not 0 < timeout <= MAX_TIMEOUT:
        raise InvalidArgument(
            "timeout %r must be a positive number of seconds, at most %d (a year)"
            % (timeout, MAX_TIMEOUT)
        )
    return timeout


def _checked_port(port: int) -> int:
    value = _whole_number("port", port)
    if not 0 < value < 65536:
        raise InvalidArgument("port %d is not between 1 and 65535" % value)
    return value


def address_text(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets: ``[::1]:412``; ``unix:PATH`` as is."""
    if host.startswith(UNIX_PREFIX):
        return host
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def connection_error(
    where: str,
    timeout: Optional[float],
    exc: BaseException,
    connecting: bool = False,
    unanswered_plain: bool = False,
) -> BaseException:
    """The MemLeaseError a failed connect or exchange with ``where`` means; any other
    exception (KeyboardInterrupt, a bug) is passed on as it is.  ``unanswered_plain``:
    the connection is without TLS and has had no reply yet."""
    if isinstance(exc, socket.timeout):
        if connecting:
            return MemLeaseConnectionError(
                "cannot connect to %s: no answer within %ss" % (where, timeout)
            )
        return MemLeaseConnectionError("%s did not answer within %ss" % (where, timeout))
    if isinstance(exc, ssl.SSLError):
        phase = "TLS handshake with" if connecting else "TLS with"
        error = _NotTLS if exc.reason == "WRONG_VERSION_NUMBER" else MemLeaseConnectionError
        return error("%s %s failed: %s" % (phase, where, _reason(exc)))
    if isinstance(exc, ConnectionError) and unanswered_plain:
        return _ClosedBeforeReply(
            "connection to %s lost before any reply: %s" % (where, _reason(exc))
        )
    if isinstance(exc, OSError):
        text = "cannot connect to %s: %s" if connecting else "connection to %s lost: %s"
        return MemLeaseConnectionError(text % (where, _reason(exc)))
    if isinstance(exc, protocol.ProtocolError):
        return MemLeaseProtocolError("bad reply from %s: %s" % (where, exc))
    return exc


def _reason(exc: BaseException) -> str:
    """An OS or TLS error in one line, without the errno prefix."""
    reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
    filename = getattr(exc, "filename", None)
    return "%s: %s" % (filename, reason) if filename else str(reason)


class _Connection:
    """One socket and its reply decoder, used by one thread at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = protocol.reply_decoder(stream_min=protocol.STREAM_MIN)
        self.answered = False  # True once a reply came: the server speaks our protocol

    def close(self) -> None:
        self.sock.close()

    def exchange(
        self,
        requests: Sequence[protocol.Request],
        probe: Optional[Callable[[protocol.Reply], bool]] = None,
    ) -> List[protocol.Reply]:
        """Send the requests and read one reply each, in order, a window at a time.

        With ``probe`` the first request is the probe, sent in front of the rest: when
        ``probe`` finds in its reply that the rest will never be answered (the original
        server reads one request per connection), only that reply is returned.
        """
        replies: List[protocol.Reply] = []
        start = 0
        while start < len(requests):
            parts: List[bytes] = []
            end, size = start, 0
            while end < len(requests) and (size < PIPELINE_WINDOW or end == start):
                frame = frame_parts(requests[end])
                parts.extend(frame)
                size += sum(map(len, frame))
                end += 1
            self._send(parts)
            if probe is not None and start == 0:
                replies.extend(self._receive(1))
                if not probe(replies[0]):
                    return replies
                start += 1
            replies.extend(self._receive(end - start))
            start = end
        return replies

    def _send(self, parts: List[bytes]) -> None:
        small: List[bytes] = []
        for part in parts:
            if len(part) < protocol.STREAM_MIN:
                small.append(part)
                continue
            if small:
                self.sock.sendall(b"".join(small))
                small.clear()
            with memoryview(part) as view:
                for start in range(0, len(view), SEND_SLICE):
                    self.sock.sendall(view[start : start + SEND_SLICE])
        if small:
            self.sock.sendall(b"".join(small))

    def _receive(self, count: int) -> List[protocol.Reply]:
        replies: List[protocol.Reply] = []
        while len(replies) < count:
            message = self.decoder.next_message()
            if message is None:
                data = self.sock.recv(RECV_SIZE)
                if not data:
                    raise ConnectionResetError("the server closed the connection")
                self.decoder.feed(data)
            elif isinstance(message, protocol.DataFrame):
                replies.append(self._streamed_data(message))
            else:
                replies.append(message)  # type: ignore[arg-type]  # a reply decoder yields replies
            self.answered = True
        return replies

    def _streamed_data(self, frame: protocol.DataFrame) -> protocol.Data:
        """A large Data reply received straight into the bytes object get() returns.

        BytesIO.getbuffer() lends a writable view of a fresh, lazily zeroed bytes object
        that getvalue() then hands over without a copy (CPython), so 64 MiB costs one pass
        over the memory instead of three (zeroing a bytearray, receiving, copying to bytes).
        """
        home = io.BytesIO(bytes(frame.length))
        with home.getbuffer() as view:
            received = self.decoder.read_payload(view)
            while received < frame.length:
                count = self.sock.recv_into(view[received:])
                if not count:
                    raise ConnectionResetError("the server closed the connection")
                self.decoder.payload_received(count)
                received += count
        return protocol.Data(cast(int, frame.lease_id), home.getvalue())  # a reply's id is an int


class MemLeaseClient:
    """A MemoryLease server's client: safe to share between threads.

    Each call borrows one of up to ``max_connections`` connections for its round trip
    (opened on first need, kept for reuse), so threads never wait on each other's
    replies.  Every failure raises a MemLeaseError subclass.  A connection that fails
    is closed; the next call connects again (a failed call is not retried).
    ``token`` defaults to $MEMLEASE_TOKEN and is presented once per connection.
    ``host`` may be ``unix:PATH``, the server's Unix socket (``port`` is then unused).
    ``tls``: True verifies the server against the system's authorities; an
    ``ssl.SSLContext`` (see client_tls_context) is used as it is.
    """

    def __init__(
        self,
        host: str = "localhost",
        port: int = DEFAULT_PORT,
        timeout: Optional[float] = 5.0,
        token: Optional[Union[str, bytes]] = None,
        tls: Union[bool, ssl.SSLContext, None] = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self._settings = client_settings(host, port, timeout, token, tls)
        self.host, self.port = host, port
        self.timeout, self.token = timeout, self._settings.token
        if _whole_number("max_connections", max_connections) < 1:
            raise InvalidArgument("max_connections %d must be at least 1" % max_connections)
        self._slots = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Lock()
        self._idle: List[_Connection] = []
        self._generation = 0  # bumped by close(): connections then in use close on return
        self._path = RequestPath()

    def __enter__(self) -> "MemLeaseClient":
        return self

    @property
    def server_version(self) -> Optional[int]:
        """The server's protocol version, from the probe sent with the first lease (None
        until then); the original (ORIGINAL_VERSION) gets its own messages."""
        return self._path.server_version

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the idle connections; those in use close when their call ends."""
        with self._lock:
            idle, self._idle = self._idle, []
            self._generation += 1
        for connection in idle:
            connection.close()

    def lease(self, size: int, duration_ms: int = DEFAULT_DURATION_MS) -> Union[uuid.UUID, int]:
        """Lease ``size`` bytes for ``duration_ms`` milliseconds; returns the lease id: a
        uuid.UUID, or an int from the C++ server."""
        return cast(Union[uuid.UUID, int], self._one(lease_call(size, duration_ms)))

    def set(self, lease_id: LeaseId, data: bytes, offset: int = 0, truncate: bool = False) -> None:
        """Write ``data`` at ``offset`` of the lease, all or nothing.

        ``truncate`` also zeroes the rest of the lease, in the same request (offset 0 only).
        A large ``data`` buffer is sent from where it is: do not change it meanwhile.
        """
        self._one(set_call(lease_id, data, offset, truncate))

    def get(self, lease_id: LeaseId, offset: int = 0, length: Optional[int] = None) -> bytes:
        """The lease's bytes: all of them, or ``length`` (default: to the end) from ``offset``."""
        return cast(bytes, self._one(get_call(lease_id, offset, length)))

    def renew(self, lease_id: LeaseId, duration_ms: int) -> None:
        """Make the lease last ``duration_ms`` from now."""
        self._one(renew_call(lease_id, duration_ms))

    def release(self, lease_id: LeaseId) -> None:
        """End the lease now."""
        self._one(release_call(lease_id))

    def ttl(self, lease_id: LeaseId) -> LeaseTTL:
        """How long the lease has left, the duration of its last grant or renew, its size."""
        return cast(LeaseTTL, self._one(ttl_call(lease_id)))

    def leases(self, page_size: int = protocol.MAX_ROWS) -> Iterator[LeaseInfo]:
        """Your living leases, fetched ``page_size`` at a time as the iteration goes on.

        A lease that lives through the whole listing is listed once; one granted or ended
        meanwhile may be listed or not.
        """
        return listing(self._one, checked_page_size(page_size))

    def renew_many(self, lease_ids: Iterable[LeaseId], duration_ms: int) -> List[LeaseId]:
        """Make each lease last ``duration_ms`` from now, in one round trip; returns those
        it could not renew (ended, or never were), as they were given."""
        given = list(lease_ids)
        results = self._request(renew_many_calls(list(zip(given, given)), duration_ms))
        raise_first_error(results)
        return [lease_id for missed in results for lease_id in missed]

    def keepalive(self, lease_id: LeaseId, release: bool = False) -> "KeepAlive":
        """A context manager that renews the lease from a thread while its block runs.

        Renewals come every third of the lease's duration (ttl's ``granted_ms``).  If one
        finds the lease gone, or none gets through before it has surely ended, ``lost``
        becomes true at once and leaving the block raises LeaseLost.  With ``release`` the
        lease is released on leaving.
        """
        return KeepAlive(
            checked_id_text(lease_id),
            functools.partial(self.ttl, lease_id),
            functools.partial(self.renew, lease_id),
            functools.partial(self.release, lease_id) if release else None,
        )

    def stats(self) -> Dict[str, int]:
        """The server's counters."""
        return cast(Dict[str, int], self._one(stats_call()))

    def pool_map(self, cells: int = 1024) -> protocol.PoolMapReply:
        """How the server's pool is used, cut into ``cells`` slices, and its free blocks."""
        return cast(protocol.PoolMapReply, self._one(pool_map_call(cells)))

    def pipeline(self) -> "Pipeline":
        """A batch of calls sent together and answered in one round trip."""
        return Pipeline(self)

    def _one(self, call: Call) -> Any:
        result = self._request([call])[0]
        if isinstance(result, MemLeaseError):
            raise result
        return result

    def _request(self, calls: Sequence[Call]) -> List[Any]:
        """Send the calls on a borrowed connection; their results or MemLeaseErrors, in
        order (see RequestPath for the probe and the original server)."""
        if not calls:
            return []
        self._slots.acquire()
        try:
            return run_plan(self._path.plan(calls), self._exchange)
        finally:
            self._slots.release()

    def _exchange(self, step: Exchange) -> List[protocol.Reply]:
        """The replies to the step's requests on a borrowed connection (see
        _Connection.exchange), kept for reuse when it may be and every one was answered."""
        with self._lock:
            connection = self._idle.pop() if self._idle and step.reuse else None
            generation = self._generation
        if connection is None:
            connection = self._connect()
        try:
            replies = connection.exchange(step.requests, step.probe)
        except BaseException as exc:
            connection.close()  # out of step with the server: never reused
            raise self._exchange_error(connection, exc) from None
        in_step = step.reuse and len(replies) == len(step.requests)
        with self._lock:
            if in_step and generation == self._generation:
                self._idle.append(connection)
                return replies
        connection.close()
        return replies

    def _connect(self) -> _Connection:
        """A new connection, through TLS and authenticated when so configured."""
        settings = self._settings
        try:
            sock = open_socket(settings)
        except BaseException as exc:
            raise connection_error(settings.where, self.timeout, exc, connecting=True) from None
        try:
            if settings.tls is not None:
                sock = settings.tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException as exc:
            sock.close()
            raise connection_error(settings.where, self.timeout, exc, connecting=True) from None
        connection = _Connection(sock)
        if self.token is not None:
            call = auth_call(self.token)
            try:
                raise_first_error(results_of([call], connection.exchange([call.request])))
            except BaseException as exc:
                connection.close()
                raise self._exchange_error(connection, exc) from None
        return connection

    def _exchange_error(self, connection: _Connection, exc: BaseException) -> BaseException:
        unanswered_plain = self._settings.tls is None and not connection.answered
        return connection_error(self._settings.where, self.timeout, exc, False, unanswered_plain)


_Queue = TypeVar("_Queue", bound="CallQueue")


class CallQueue:
    """Calls queued to be sent together; each method returns the queue, to chain them."""

    def __init__(self) -> None:
        self._calls: List[Call] = []

    def __enter__(self: _Queue) -> _Queue:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._calls.clear()

    def __len__(self) -> int:
        return len(self._calls)

    def lease(self: _Queue, size: int, duration_ms: int = DEFAULT_DURATION_MS) -> _Queue:
        self._calls.append(lease_call(size, duration_ms))
        return self

    def set(
        self: _Queue, lease_id: LeaseId, data: bytes, offset: int = 0, truncate: bool = False
    ) -> _Queue:
        self._calls.append(set_call(lease_id, data, offset, truncate))
        return self

    def get(
        self: _Queue, lease_id: LeaseId, offset: int = 0, length: Optional[int] = None
    ) -> _Queue:
        self._calls.append(get_call(lease_id, offset, length))
        return self

    def renew(self: _Queue, lease_id: LeaseId, duration_ms: int) -> _Queue:
        self._calls.append(renew_call(lease_id, duration_ms))
        return self

    def release(self: _Queue, lease_id: LeaseId) -> _Queue:
        self._calls.append(release_call(lease_id))
        return self

    def stats(self: _Queue) -> _Queue:
        self._calls.append(stats_call())
        return self

    def ttl(self: _Queue, lease_id: LeaseId) -> _Queue:
        self._calls.append(ttl_call(lease_id))
        return self

    def _take(self) -> List[Call]:
        calls, self._calls = self._calls, []
        return calls


class Pipeline(CallQueue):
    """Calls queued on a client and sent together by ``execute()``.

    ``execute()`` returns one result per call in order; a failed call's result is its
    MemLeaseError, or, with ``raise_on_error``, the first one is raised once every
    reply has been read (so the connection stays in step).
    """

    def __init__(self, client: MemLeaseClient) -> None:
        super().__init__()
        self._client = client

    def execute(self, raise_on_error: bool = True) -> List[Any]:
        calls = self._take()
        results = self._client._request(calls) if calls else []
        if raise_on_error:
            raise_first_error(results)
        return results


if __name__ == "__main__":
    # The command line lives in memlease.cli; it imports this file as memlease_client, so
    # the exceptions it catches are the ones the clients raise.
    from memlease.cli import main

    sys.exit(main())
