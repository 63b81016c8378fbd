#!/usr/bin/env python3
"""MemoryLease client: the Python API and the command line built on it.

from memlease_client import MemLeaseClient
with MemLeaseClient("localhost", 412) as c:
    lease_id = c.lease(1024, 5000)
    c.set(lease_id, b"hello")
    c.get(lease_id, offset=0, length=5)

python3 memlease_client.py localhost 412 lease 1024 5000

Threads may share one MemLeaseClient: it lends each call one of a few connections.
memlease_cluster (several servers as one) and memlease_async (asyncio) reuse its calls,
checks and exceptions.
"""

import argparse
import json
import math
import os
import re
import socket
import ssl
import sys
import threading
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    List,
    NamedTuple,
    NoReturn,
    Optional,
    Sequence,
    TextIO,
    Tuple,
    TypeVar,
    Union,
    cast,
)

import pool_picture
import protocol
from units import format_size, parse_size

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


class Unauthorized(MemLeaseError):
    """The server wants a valid token (MEMLEASE_TOKEN)."""


class ServerBusy(MemLeaseError):
    """The server is at its connection limit."""


class MemLeaseProtocolError(MemLeaseError):
    """The server or the client did not follow the protocol."""


class MemLeaseConnectionError(MemLeaseError):
    """Cannot connect, the connection broke, or the server did not answer in time."""


class _ClosedBeforeReply(MemLeaseConnectionError):
    """A plain connection closed before its first reply: what a TLS port does to it."""


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


def _checked_id(lease_id: object) -> int:
    """An id that can name a lease; any other number names none, so it is not found."""
    value = _whole_number("lease id", lease_id)
    if not 0 < value <= protocol.INT32_MAX:
        raise LeaseNotFound(
            "lease %d: no such lease (ids are 1 to %d)" % (value, protocol.INT32_MAX),
            protocol.NOT_FOUND,
        )
    return value


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


def _lease_id(request: protocol.Request, reply: protocol.Reply) -> int:
    if not isinstance(reply, protocol.Leased):
        raise _unexpected(request, reply)
    if reply.lease_id > 0:
        return reply.lease_id
    if reply.lease_id == protocol.NO_MEMORY:
        raise OutOfMemory("lease refused: " + protocol.NO_MEMORY_TEXT, reply.lease_id)
    raise _status_error(reply.lease_id, "lease refused")


def _done(request: protocol.Request, reply: protocol.Reply) -> None:
    if not isinstance(reply, protocol.DataSet):
        raise _unexpected(request, reply)
    if reply.status != protocol.OK:
        lease_id = getattr(request, "lease_id", None)
        what = protocol.request_name(request) if lease_id is None else "lease %d" % lease_id
        raise _status_error(reply.status, what)


def _data(request: protocol.Request, reply: protocol.Reply) -> bytes:
    lease_id: int = request.lease_id  # type: ignore[union-attr]  # get and read carry one
    if isinstance(reply, protocol.DataSet):  # a refused ranged read
        _done(request, reply)
    if not isinstance(reply, protocol.Data):
        raise _unexpected(request, reply)
    if reply.lease_id != lease_id:
        raise MemLeaseProtocolError("asked for lease %d, got lease %d" % (lease_id, reply.lease_id))
    # The original's get answers an unknown lease with no data; a lease is never empty.
    if not reply.data and isinstance(request, protocol.AccessData):
        raise _status_error(protocol.NOT_FOUND, "lease %d" % lease_id)
    return reply.data


def _stats(request: protocol.Request, reply: protocol.Reply) -> Dict[str, int]:
    if not isinstance(reply, protocol.StatsReply):
        raise _unexpected(request, reply)
    return reply.stats


def _pool_map(request: protocol.Request, reply: protocol.Reply) -> protocol.PoolMapReply:
    if not isinstance(reply, protocol.PoolMapReply):
        raise _unexpected(request, reply)
    return reply


def lease_call(size: int, duration_ms: int) -> Call:
    return Call(protocol.Lease(_checked_size(size), _checked_duration(duration_ms)), _lease_id)


def set_call(lease_id: int, data: bytes, offset: int = 0, truncate: bool = False) -> Call:
    lease_id, data = _checked_id(lease_id), _checked_data(data)
    offset = _checked_place("offset", offset)
    if not isinstance(truncate, bool):
        raise TypeError("truncate must be a bool, not %s" % type(truncate).__name__)
    if truncate:
        if offset:
            raise InvalidArgument(
                "truncate zeroes the lease after data written at offset 0, not %d" % offset,
                protocol.INVALID,
            )
        return Call(protocol.Replace(lease_id, data), _done)
    if offset == 0:  # the original's message, so this works against its server too
        return Call(protocol.SetData(lease_id, data), _done)
    return Call(protocol.Write(lease_id, offset, data), _done)


def get_call(lease_id: int, offset: int = 0, length: Optional[int] = None) -> Call:
    lease_id, offset = _checked_id(lease_id), _checked_place("offset", offset)
    if offset == 0 and length is None:
        return Call(protocol.AccessData(lease_id), _data)
    wire_length = -1 if length is None else _checked_place("length", length)
    return Call(protocol.Read(lease_id, offset, wire_length), _data)


def renew_call(lease_id: int, duration_ms: int) -> Call:
    return Call(protocol.Renew(_checked_id(lease_id), _checked_duration(duration_ms)), _done)


def release_call(lease_id: int) -> Call:
    return Call(protocol.Release(_checked_id(lease_id)), _done)


def stats_call() -> Call:
    return Call(protocol.Stats(), _stats)


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
    return Settings(
        host, _checked_port(port), _checked_timeout(timeout), _token_bytes(token), _tls_context(tls)
    )


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
    """``host:port``, with an IPv6 address in brackets: ``[::1]:412``."""
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
        return MemLeaseConnectionError("%s %s failed: %s" % (phase, where, _reason(exc)))
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

    def exchange(self, requests: Sequence[protocol.Request]) -> List[protocol.Reply]:
        """Send the requests and read one reply each, in order, a window at a time."""
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
        """A large Data reply received straight into one buffer, its final home."""
        data = bytearray(frame.length)
        with memoryview(data) as view:
            received = self.decoder.read_payload(view)
            while received < frame.length:
                count = self.sock.recv_into(view[received:])
                if not count:
                    raise ConnectionResetError("the server closed the connection")
                self.decoder.payload_received(count)
                received += count
        # One copy into bytes (about 0.6 ms a MiB), so that get() gives bytes whatever the
        # size: a type that changed at 64 KiB would break hashing and isinstance checks.
        return protocol.Data(frame.lease_id, bytes(data))


class MemLeaseClient:
    """A MemoryLease server's client: safe to share between threads.

    Each call borrows one of up to ``max_connections`` connections for its round trip
    (opened on first need, kept for reuse), so threads never wait on each other's
    replies.  Every failure raises a MemLeaseError subclass.  A connection that fails
    is closed; the next call connects again (a failed call is not retried).
    ``token`` defaults to $MEMLEASE_TOKEN and is presented once per connection.
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

    def __enter__(self) -> "MemLeaseClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the idle connections; those in use close when their call ends."""
        with self._lock:
            idle, self._idle = self._idle, []
            self._generation += 1
        for connection in idle:
            connection.close()

    def lease(self, size: int, duration_ms: int = DEFAULT_DURATION_MS) -> int:
        """Lease ``size`` bytes for ``duration_ms`` milliseconds; returns the lease id."""
        return cast(int, self._one(lease_call(size, duration_ms)))

    def set(self, lease_id: int, data: bytes, offset: int = 0, truncate: bool = False) -> None:
        """Write ``data`` at ``offset`` of the lease, all or nothing.

        ``truncate`` also zeroes the rest of the lease, in the same request (offset 0 only).
        A large ``data`` buffer is sent from where it is: do not change it meanwhile.
        """
        self._one(set_call(lease_id, data, offset, truncate))

    def get(self, lease_id: int, offset: int = 0, length: Optional[int] = None) -> bytes:
        """The lease's bytes: all of them, or ``length`` (default: to the end) from ``offset``."""
        return cast(bytes, self._one(get_call(lease_id, offset, length)))

    def renew(self, lease_id: int, duration_ms: int) -> None:
        """Make the lease last ``duration_ms`` from now."""
        self._one(renew_call(lease_id, duration_ms))

    def release(self, lease_id: int) -> None:
        """End the lease now."""
        self._one(release_call(lease_id))

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
        """Send the calls on a borrowed connection; their results or MemLeaseErrors, in order."""
        self._slots.acquire()
        try:
            with self._lock:
                connection = self._idle.pop() if self._idle else None
                generation = self._generation
            if connection is None:
                connection = self._connect()
            try:
                replies = connection.exchange([call.request for call in calls])
            except BaseException as exc:
                connection.close()  # out of step with the server: never reused
                raise self._exchange_error(connection, exc) from None
            with self._lock:
                if generation == self._generation:
                    self._idle.append(connection)
                    connection = None
            if connection is not None:
                connection.close()
        finally:
            self._slots.release()
        return results_of(calls, replies)

    def _connect(self) -> _Connection:
        """A new connection, through TLS and authenticated when so configured."""
        settings = self._settings
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except BaseException as exc:
            raise connection_error(settings.where, self.timeout, exc, connecting=True) from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
        self: _Queue, lease_id: int, data: bytes, offset: int = 0, truncate: bool = False
    ) -> _Queue:
        self._calls.append(set_call(lease_id, data, offset, truncate))
        return self

    def get(self: _Queue, lease_id: int, offset: int = 0, length: Optional[int] = None) -> _Queue:
        self._calls.append(get_call(lease_id, offset, length))
        return self

    def renew(self: _Queue, lease_id: int, duration_ms: int) -> _Queue:
        self._calls.append(renew_call(lease_id, duration_ms))
        return self

    def release(self: _Queue, lease_id: int) -> _Queue:
        self._calls.append(release_call(lease_id))
        return self

    def stats(self: _Queue) -> _Queue:
        self._calls.append(stats_call())
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


# The command line.

_EPILOG = """\
commands:
  lease SIZE [MS]      lease SIZE bytes (or 64K, 16M...) for MS milliseconds (default 5000)
  set ID DATA          write the text DATA with a trailing NUL, as the C++ client does
                       (--no-nul: the text alone)
  set ID --file PATH   write the bytes of PATH ('-' reads standard input)
  get ID [--raw]       print the lease as text up to its first NUL, or --raw: its bytes
  renew ID MS          make the lease last MS milliseconds from now
  release ID           end the lease now
  stats                print the server's counters
  map [--json]         draw the pool: what is leased, what is free, how it is split

set writes from the start of the lease (or from --offset N) and leaves the bytes after
what it writes as they were: add --truncate to zero them in the same request.
get takes --offset N and --length N.  Options may come anywhere on the line.

host may name its port, as in localhost:413 or [::1]:413 (IPv6 in brackets), which then
beats the port word.  host may list servers, host:port,host:port,...: they are used as
one cluster, and lease ids then name their server, as in a:412/123; the port word is
the port of every server listed without one.

examples:
  %(prog)s localhost 412 lease 1024 5000
  %(prog)s localhost set 123 "this is some text"
  %(prog)s localhost get 123
  %(prog)s localhost get 123 --raw --offset 16 --length 8 > part.bin
  tar c data | %(prog)s localhost set 123 --file - --truncate
  %(prog)s localhost map

The port defaults to 412.  $MEMLEASE_TOKEN is presented when set.
Exit status: 0 done; 1 refused, not found or cannot connect; 2 usage error;
130 interrupted."""

CLI_NAME = "memlease-client"  # when the program's own name is unknown
DEFAULT_MAP_CELLS = 256
MAX_MAP_CELLS = 1 << 16
_VALUE_OPTIONS = (
    "--timeout",
    "--tls-ca",
    "--tls-cert",
    "--tls-key",
    "--file",
    "--offset",
    "--length",
    "--cells",
)
# A word argparse takes as a value, not an option, though it starts with '-'.
_NEGATIVE_NUMBER = re.compile(r"-\d+|-\d*\.\d+")
_NOT_FOUND_TEXT = "lease %s does not exist: it expired, was released, or never was"


class _UsageError(Exception):
    """A command line that cannot run: reported in one line, exit status 2."""


class _OutputFailed(Exception):
    """Standard output cannot take what we write: full, closed, or its reader gone."""


class _Parser(argparse.ArgumentParser):
    """An argument parser that raises its errors, so that main() reports them in one line,
    and writes its help as every other output is written."""

    command = ""  # the sub-command this parser reads, named in its errors

    def error(self, message: str) -> NoReturn:
        raise _UsageError("%s: %s" % (self.command, message) if self.command else message)

    def _print_message(self, message: str, file: object = None) -> None:
        if message:
            _emit(message.rstrip("\n"))


def _number_arg(text: str, what: str) -> int:
    """A whole number from the command line; argparse turns the error into a usage line."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a whole number of %s" % (text, what)) from None


def _at_most_int32(value: int, text: str) -> int:
    if value > protocol.INT32_MAX:
        raise argparse.ArgumentTypeError(
            "%s is over the largest lease, %d bytes (2 GiB - 1)" % (text, protocol.INT32_MAX)
        )
    return value


def _lease_size(text: str) -> int:
    size = parse_size(text)
    if size < 1:
        raise argparse.ArgumentTypeError("a lease holds at least 1 byte, not %r" % text)
    return _at_most_int32(size, "%d bytes" % size)


def _duration(text: str) -> int:
    value = _number_arg(text, "milliseconds")
    if not 0 < value <= protocol.INT32_MAX:
        raise argparse.ArgumentTypeError(
            "a duration is 1 to %d milliseconds, not %r" % (protocol.INT32_MAX, text)
        )
    return value


def _position(text: str) -> int:
    value = _number_arg(text, "bytes")
    if value < 0:
        raise argparse.ArgumentTypeError("%r must not be negative" % text)
    return _at_most_int32(value, "%d bytes" % value)


def _cells(text: str) -> int:
    value = _number_arg(text, "cells")
    if not 0 < value <= MAX_MAP_CELLS:
        raise argparse.ArgumentTypeError(
            "the map has 1 to %d cells, not %r" % (MAX_MAP_CELLS, text)
        )
    return value


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError("%r is not a port number (1-65535)" % text)
    return int(text)


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(
            "%r is not a positive number of seconds, at most %d (a year)" % (text, MAX_TIMEOUT)
        )
    return value


def _host(text: str) -> str:
    """A host name the resolver can take (or a list of them, for a cluster)."""
    try:
        text.encode("utf-8" if "," in text else "idna")
    except UnicodeError:
        raise argparse.ArgumentTypeError("%r is not a host name" % text) from None
    return text


def _lease_ref(text: str) -> str:
    """A lease id, or a cluster's server/id handle; checked against the host when run."""
    number = text.rsplit("/", 1)[-1]
    if not number.isdigit() or not 0 < int(number) <= protocol.INT32_MAX:
        raise argparse.ArgumentTypeError("%r is not a lease id" % text)
    return text


def _add_connection_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """Options taken before or after the command: defaults are set once, at the top."""

    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    def explain(text: str) -> str:
        return text if top else argparse.SUPPRESS  # listed once, in the main --help

    parser.add_argument(
        "--timeout",
        type=_timeout,
        default=default(5.0),
        metavar="S",
        help=explain("seconds to wait for the server (default 5)"),
    )
    parser.add_argument(
        "--tls", action="store_true", default=default(False), help=explain("connect with TLS")
    )
    for name, what in (
        ("ca", "CA certificates to trust"),
        ("cert", "client certificate"),
        ("key", "client certificate's key"),
    ):
        parser.add_argument(
            "--tls-" + name,
            default=default(None),
            metavar="FILE",
            help=explain("PEM file of the %s (implies --tls)" % what),
        )


def build_parser(prog: str = CLI_NAME) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        usage="%(prog)s host [port] command [leaseid|size] [duration|data] [options]",
        description="Lease, write, read, renew and release memory on a MemoryLease server.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("host", type=_host, help="host running the server, e.g. localhost")
    parser.add_argument("port", type=_port, help="the server's port (default %d)" % DEFAULT_PORT)
    _add_connection_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="command", parser_class=_Parser)
    commands.required = True

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            prog="%s host [port] %s" % (prog, name),
            help=summary,
            allow_abbrev=False,
        )
        sub.command = name
        _add_connection_options(sub, top=False)
        return sub

    lease = command("lease", "lease memory")
    lease.add_argument("size", type=_lease_size, help="bytes, or with K, M, G (powers of 1024)")
    lease.add_argument(
        "duration",
        type=_duration,
        nargs="?",
        default=DEFAULT_DURATION_MS,
        help="milliseconds",
    )
    set_ = command("set", "write to a lease")
    set_.add_argument("lease_id", type=_lease_ref)
    set_.add_argument("data", nargs="?", help="text, sent with a trailing NUL")
    set_.add_argument(
        "--file", metavar="PATH", help="write this file's bytes ('-': standard input)"
    )
    set_.add_argument("--no-nul", action="store_true", help="send DATA without the trailing NUL")
    set_.add_argument(
        "--truncate",
        action="store_true",
        help="zero the rest of the lease (without it, bytes after the data are left as they were)",
    )
    set_.add_argument("--offset", type=_position, default=0, help="where to write (default 0)")
    get = command("get", "read a lease")
    get.add_argument("lease_id", type=_lease_ref)
    get.add_argument("--raw", action="store_true", help="write the exact bytes to standard output")
    get.add_argument("--offset", type=_position, default=0, help="where to start (default 0)")
    get.add_argument("--length", type=_position, help="how many bytes (default: to the end)")
    renew = command("renew", "extend a lease")
    renew.add_argument("lease_id", type=_lease_ref)
    renew.add_argument("duration", type=_duration, help="milliseconds from now")
    release = command("release", "end a lease")
    release.add_argument("lease_id", type=_lease_ref)
    command("stats", "show the server's counters")
    map_ = command("map", "draw how the pool is used")
    map_.add_argument("--json", action="store_true", help="the same data as JSON")
    map_.add_argument(
        "--cells",
        type=_cells,
        default=DEFAULT_MAP_CELLS,
        help="slices of the pool to show (default %d)" % DEFAULT_MAP_CELLS,
    )
    return parser


def _in_order(argv: List[str]) -> List[str]:
    """The words as argparse takes them: host, port (the default when the word after the
    host is not a number), command, every option with its value, the command's words.

    argparse takes a command's options only after the command, and would take
    ``set ID --no-nul DATA`` as a set without DATA: in this order both work.
    Everything from ``--`` on stays last, as it is.
    """
    cut = argv.index("--") if "--" in argv else len(argv)
    words: List[str] = []
    options: List[str] = []
    takes_value = False
    for word in argv[:cut]:
        is_option = len(word) > 1 and word.startswith("-") and " " not in word
        if takes_value or (is_option and not _NEGATIVE_NUMBER.fullmatch(word)):
            options.append(word)
            takes_value = not takes_value and word in _VALUE_OPTIONS
        else:
            words.append(word)
    if not words:
        if "-h" in options or "--help" in options:
            return options
        raise _UsageError("a host and a command are required")
    if len(words) == 1 or not words[1].isdigit():
        words.insert(1, str(DEFAULT_PORT))
    return words[:3] + options + words[3:] + argv[cut:]


def _payload(args: argparse.Namespace) -> bytes:
    """The bytes ``set`` sends: the text as the shell passed it, or a file's bytes."""
    if (args.data is None) == (args.file is None):
        raise _UsageError("set: give DATA or --file PATH (one of them)")
    if args.no_nul and args.file is not None:
        raise _UsageError("set: --no-nul is for DATA; --file sends the file's bytes as they are")
    if args.truncate and args.offset:
        raise _UsageError("set: --truncate writes from the start of the lease, without --offset")
    if args.file is None:
        return os.fsencode(args.data) + (b"" if args.no_nul else b"\0")
    name = "standard input" if args.file == "-" else args.file
    size = 0
    try:
        if args.file != "-":
            with open(args.file, "rb") as file:
                size = os.fstat(file.fileno()).st_size  # a regular file tells at once
                data = b"" if size > protocol.INT32_MAX else file.read(protocol.INT32_MAX + 1)
        elif sys.stdin is None:
            raise OSError("it is closed")
        else:
            data = sys.stdin.buffer.read(protocol.INT32_MAX + 1)
    except OSError as exc:
        raise _UsageError("set: cannot read %s: %s" % (name, exc.strerror or exc)) from None
    if len(data) > protocol.INT32_MAX or size > protocol.INT32_MAX:  # or /dev/zero, say
        raise _UsageError(
            "set: %s holds more than the largest lease, %d bytes" % (name, protocol.INT32_MAX)
        )
    return data


def _emit(line: Union[str, bytes, bytearray, memoryview], end: bytes = b"\n") -> None:
    """Write a line to standard output now: bytes as they are, text escaped if need be.
    The end is written apart, so that a large value is not copied to append it."""
    stream = sys.stdout
    try:
        if stream is None:
            raise OSError("standard output is closed")
        stream.buffer.write(_encode(line, stream.encoding) if isinstance(line, str) else line)
        stream.buffer.write(end)
        stream.buffer.flush()
    except OSError as exc:
        raise _OutputFailed(exc) from None


def _complain(line: str) -> None:
    """One line to standard error; if that fails too, there is nobody left to tell."""
    stream = sys.stderr
    if stream is None:
        return
    try:
        stream.buffer.write(_encode(line, stream.encoding) + b"\n")
        stream.buffer.flush()
    except OSError:
        _silence(stream)


def _encode(text: str, encoding: Optional[str]) -> bytes:
    """The text in the stream's encoding; what it cannot show, as backslash escapes."""
    return text.encode(encoding or "utf-8", "backslashreplace")


def _silence(stream: Optional[TextIO]) -> None:
    """Point a failed stream at /dev/null, so that its flush at exit cannot fail again."""
    if stream is not None:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        except (OSError, ValueError):
            pass


def _tls_from_args(args: argparse.Namespace) -> Optional[ssl.SSLContext]:
    """The TLS context the options ask for; any of them means TLS."""
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key):
        return None
    if args.tls_key and not args.tls_cert:
        raise _UsageError("--tls-key needs --tls-cert")
    try:
        return client_tls_context(args.tls_ca, args.tls_cert, args.tls_key)
    except InvalidArgument as exc:
        raise _UsageError(str(exc)) from None


if TYPE_CHECKING:  # imported where it is used: memlease_cluster imports this module
    from memlease_cluster import MemLeaseCluster

Leases = Union[MemLeaseClient, "MemLeaseCluster"]
# A server's lease id (int), or a cluster's handle text (str): each client takes its own.
LeaseKey = Any


def _open(args: argparse.Namespace) -> Leases:
    """A client for the host, or for the cluster when the host lists several servers."""
    tls = _tls_from_args(args)
    import memlease_cluster

    try:
        if "," not in args.host:  # a port in the host (a:413, [::1]:413) beats the port word
            host, port = memlease_cluster.parse_server(args.host, args.port)
            return MemLeaseClient(host, port, timeout=args.timeout, tls=tls)
        servers = memlease_cluster.parse_servers(args.host, args.port)
        return memlease_cluster.MemLeaseCluster(servers, timeout=args.timeout, tls=tls)
    except InvalidArgument as exc:
        raise _UsageError(str(exc)) from None


def _lease_key(client: Leases, text: str) -> LeaseKey:
    """The id as the client takes it: a number for one server, the handle for a cluster."""
    if not isinstance(client, MemLeaseClient):
        return text
    if "/" in text:
        raise _UsageError("%s names a cluster's server: give the cluster's host list" % text)
    return int(text)


def _run(client: Leases, args: argparse.Namespace, payload: bytes) -> None:
    """The command, and its line in the seed's words."""
    command = args.command
    if command == "lease":
        lease_id = client.lease(args.size, args.duration)
        _emit(
            "You have leased %d bytes for %d MS with id %s" % (args.size, args.duration, lease_id)
        )
        return
    if command == "stats":
        _print_stats(client)
        return
    if command == "map":
        _draw_map(client, args)
        return
    key = _lease_key(client, args.lease_id)
    if command == "set":
        if args.truncate:
            client.set(key, payload, truncate=True)
        else:
            client.set(key, payload, args.offset)
        _emit("Data set for lease %s" % args.lease_id)
    elif command == "get":
        data = client.get(key, args.offset, args.length)
        if args.raw:
            _emit(data, end=b"")
        else:
            text = data.split(b"\0", 1)[0]
            _emit(b"Data get for lease %s: %s" % (os.fsencode(args.lease_id), text))
    elif command == "renew":
        client.renew(key, args.duration)
        _emit("Lease %s renewed for %d MS" % (args.lease_id, args.duration))
    else:
        client.release(key)
        _emit("Lease %s released" % args.lease_id)


def _print_stats(client: Leases) -> None:
    """``name value`` lines; for a cluster the sums, then ``server name value`` lines."""
    if isinstance(client, MemLeaseClient):
        for name, value in client.stats().items():
            _emit("%s %d" % (name, value))
        return
    stats = client.stats()
    for name, value in stats.total.items():
        _emit("%s %d" % (name, value))
    for server, counters in stats.servers.items():
        for name, value in counters.items():
            _emit("%s %s %d" % (server, name, value))
    for server, reason in stats.down.items():
        _emit("%s down %s" % (server, reason))


def _draw_map(client: Leases, args: argparse.Namespace) -> None:
    """The picture of the pool, in block characters if standard output can show them."""
    if not isinstance(client, MemLeaseClient):
        raise _UsageError("map: draws one server's pool: give one host")
    pool = client.pool_map(args.cells)
    if args.json:
        _emit(json.dumps(pool._asdict()))
        return
    encoding = (sys.stdout.encoding if sys.stdout else None) or "ascii"
    try:
        "".join(pool_picture.BLOCKS).encode(encoding)
        shades = pool_picture.BLOCKS
    except UnicodeEncodeError:
        shades = pool_picture.ASCII
    _emit(pool_picture.render(pool, shades))


def _first_line(args: argparse.Namespace, error: MemLeaseError) -> str:
    """The seed's line for a refused command, and the same form for the newer ones."""
    if args.command == "lease":
        if isinstance(error, (OutOfMemory, TooLarge)):
            return "Failed to create lease due to insufficient resources on the server."
        return "Failed to create lease."
    if args.command == "get" and isinstance(error, LeaseNotFound):
        return "Data not found for %s." % args.lease_id
    if args.command in ("stats", "map"):
        return "Error: unable %s%s" % (args.command, _status_note(error))
    return "Error: unable %s for lease %s%s" % (args.command, args.lease_id, _status_note(error))


def _refusal_reason(
    client: Leases, args: argparse.Namespace, payload: bytes, error: MemLeaseError
) -> str:
    """Why the server refused, in the user's terms; asks the server for sizes if need be."""
    status = error.status
    text = protocol.STATUS_TEXT.get(status, str(error)) if status is not None else str(error)
    if isinstance(error, LeaseNotFound):
        text = _NOT_FOUND_TEXT % args.lease_id
    elif args.command == "lease" and isinstance(error, (OutOfMemory, TooLarge)):
        text = _lease_refusal(client, args.size) or text
    elif args.command in ("set", "get") and isinstance(error, (TooLarge, OutOfRange)):
        text = _range_refusal(client, args, payload) or text
    elif isinstance(error, MemLeaseProtocolError) and status == protocol.FRAME_TOO_LARGE:
        text = "%d bytes is more than the server takes in one request" % len(payload)
    return "reason: %s%s" % (text, _status_note(error))


def _status_note(error: MemLeaseError) -> str:
    """`` (-2)``: the server's status code, as the seed shows it; nothing without one."""
    return "" if error.status is None else " (%d)" % error.status


def _lease_refusal(client: Leases, size: int) -> Optional[str]:
    """Whether the lease is larger than a whole pool, or larger than any free block now."""
    try:
        stats = client.stats()
    except MemLeaseError:
        return None
    each = [stats] if isinstance(stats, dict) else list(stats.servers.values())
    if not each:
        return None
    pool = max(counters.get("pool_bytes", 0) for counters in each)
    largest = max(counters.get("largest_free_block", 0) for counters in each)
    if size > pool:
        whole = "the server's whole pool" if isinstance(stats, dict) else "any server's pool"
        return "%s is more than %s (%s)" % (format_size(size), whole, format_size(pool))
    return "no free block can hold %s now; the largest free block is %s" % (
        format_size(size),
        format_size(largest),
    )


def _range_refusal(client: Leases, args: argparse.Namespace, payload: bytes) -> Optional[str]:
    """What did not fit where, with the lease's size found by asking the server."""
    end = args.offset + (len(payload) if args.command == "set" else args.length or 0)
    size = _lease_size_below(client, _lease_key(client, args.lease_id), end + 1)
    if size is None:
        return None
    if args.command == "set" and size >= end:  # the lease holds them: the value's size did it
        return "the server refuses a value of %s: over its --max-frame limit" % format_size(
            len(payload)
        )
    if args.command == "get":
        span = "offset %d" % args.offset
        if args.length is not None:
            span += " + length %d = %d" % (args.length, args.offset + args.length)
        return "%s is outside the lease's %s" % (span, format_size(size))
    text_with_nul = args.data is not None and not args.no_nul
    if text_with_nul and args.offset == 0 and size == len(payload) - 1:
        return (
            "%d bytes with the trailing NUL the C++ client sends; the lease holds %d: "
            "use --file or --no-nul" % (len(payload), size)
        )
    where = " at offset %d" % args.offset if args.offset else ""
    nul = " (with the trailing NUL)" if text_with_nul else ""
    return "%s%s%s do not fit in the lease's %s" % (
        format_size(len(payload)),
        nul,
        where,
        format_size(size),
    )


def _lease_size_below(client: Leases, key: LeaseKey, limit: int) -> Optional[int]:
    """The lease's size, or ``limit - 1`` if it is larger: found by one-byte reads, or None."""
    # A read ending at ``low`` works; one ending at ``high`` does not.
    low, high = 0, limit
    try:
        while high - low > 1:
            middle = (low + high) // 2
            try:
                client.get(key, middle - 1, 1)
                low = middle
            except OutOfRange:
                high = middle
    except MemLeaseError:
        return None
    return low or None


def _unauthorized() -> str:
    """A missing token and a wrong one need different fixes, so they are told apart."""
    if not os.environ.get("MEMLEASE_TOKEN"):
        return "the server wants a token: set MEMLEASE_TOKEN"
    return "the server refused the token in MEMLEASE_TOKEN"


def _program_name() -> str:
    """What the user typed to run us, so that --help and errors speak of it."""
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else CLI_NAME


def main(argv: Optional[List[str]] = None) -> int:
    """The command line: returns the exit status."""
    prog = _program_name()
    try:
        return _main(prog, list(sys.argv[1:] if argv is None else argv))
    except _UsageError as exc:
        _complain("%s: usage error: %s (see %s --help)" % (prog, exc, prog))
        return 2
    except _OutputFailed as exc:
        _silence(sys.stdout)
        lost = exc.args[0]
        if not isinstance(lost, BrokenPipeError):  # a reader that left wants no more
            _complain("%s: cannot write the output: %s" % (prog, lost.strerror or lost))
        return 1
    except KeyboardInterrupt:
        return 130


def _main(prog: str, argv: List[str]) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(_in_order(argv))
    payload = _payload(args) if args.command == "set" else b""
    client = _open(args)
    try:
        _run(client, args, payload)
    except Unauthorized:
        _complain("%s: %s" % (prog, _unauthorized()))
        return 1
    except (MemLeaseConnectionError, MemLeaseProtocolError, ServerBusy) as exc:
        if args.command == "set" and exc.status == protocol.FRAME_TOO_LARGE:
            _refused(client, args, payload, exc)
        else:
            hint = " (is it a TLS port? try --tls)" if isinstance(exc, _ClosedBeforeReply) else ""
            _complain("%s: %s%s" % (prog, exc, hint))
        return 1
    except InvalidArgument as exc:
        if exc.status is not None:  # the server refused
            _refused(client, args, payload, exc)
            return 1
        raise _UsageError(str(exc)) from None
    except MemLeaseError as exc:
        _refused(client, args, payload, exc)
        return 1
    finally:
        client.close()
    return 0


def _refused(
    client: Leases, args: argparse.Namespace, payload: bytes, error: MemLeaseError
) -> None:
    """The seed's line for the refusal, then the reason on a line of its own."""
    _emit(_first_line(args, error))
    _emit(_refusal_reason(client, args, payload, error))


if __name__ == "__main__":
    # Run the importable copy of this module, not __main__, so that the errors the cluster
    # client raises (memlease_cluster imports memlease_client) are the classes main() catches.
    from memlease_client import main as module_main

    sys.exit(module_main())
