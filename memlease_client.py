#!/usr/bin/env python3
"""MemoryLease client: the Python API and the command line built on it.

from memlease_client import MemLeaseClient
with MemLeaseClient("localhost", 412) as c:
    lease_id = c.lease(1024, 5000)
    c.set(lease_id, b"hello")
    c.get(lease_id, offset=0, length=5)

python3 memlease_client.py localhost 412 lease 1024 5000
"""

import argparse
import math
import os
import socket
import struct
import sys
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Union, cast

import protocol

DEFAULT_PORT = 412
DEFAULT_DURATION_MS = 5000
RECV_SIZE = 256 * 1024
# Requests are sent in windows of this many bytes, each window's replies read before
# the next is sent, so neither side can fill both socket buffers and stall the other.
PIPELINE_WINDOW = 64 * 1024


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


class _Call(NamedTuple):
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
        raise LeaseNotFound(
            "lease %d: %s" % (lease_id, protocol.STATUS_TEXT[protocol.NOT_FOUND]),
            protocol.NOT_FOUND,
        )
    return reply.data


def _stats(request: protocol.Request, reply: protocol.Reply) -> Dict[str, int]:
    if not isinstance(reply, protocol.StatsReply):
        raise _unexpected(request, reply)
    return reply.stats


def _lease(size: int, duration_ms: int) -> _Call:
    return _Call(protocol.Lease(size, duration_ms), _lease_id)


def _set(lease_id: int, data: bytes, offset: int) -> _Call:
    if offset == 0:  # the original's message, so this works against its server too
        return _Call(protocol.SetData(lease_id, bytes(data)), _done)
    return _Call(protocol.Write(lease_id, offset, bytes(data)), _done)


def _get(lease_id: int, offset: int, length: Optional[int]) -> _Call:
    if offset == 0 and length is None:
        return _Call(protocol.AccessData(lease_id), _data)
    return _Call(protocol.Read(lease_id, offset, -1 if length is None else length), _data)


def _renew(lease_id: int, duration_ms: int) -> _Call:
    return _Call(protocol.Renew(lease_id, duration_ms), _done)


def _release(lease_id: int) -> _Call:
    return _Call(protocol.Release(lease_id), _done)


class MemLeaseClient:
    """A connection to a MemoryLease server, opened on first use and reused.

    Every failure raises a MemLeaseError subclass.  After a connection error the
    socket is closed; the next call connects again (a failed call is not retried).
    ``token`` defaults to $MEMLEASE_TOKEN and is presented once per connection.
    """

    def __init__(
        self,
        host: str = "localhost",
        port: int = DEFAULT_PORT,
        timeout: Optional[float] = 5.0,
        token: Optional[Union[str, bytes]] = None,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        if token is None:
            token = os.environ.get("MEMLEASE_TOKEN") or None
        self.token = token.encode() if isinstance(token, str) else token
        self._sock: Optional[socket.socket] = None
        self._decoder = protocol.reply_decoder()

    def __enter__(self) -> "MemLeaseClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def lease(self, size: int, duration_ms: int = DEFAULT_DURATION_MS) -> int:
        """Lease ``size`` bytes for ``duration_ms`` milliseconds; returns the lease id."""
        return cast(int, self._one(_lease(size, duration_ms)))

    def set(self, lease_id: int, data: bytes, offset: int = 0) -> None:
        """Write ``data`` at ``offset`` of the lease, all or nothing."""
        self._one(_set(lease_id, data, offset))

    def get(self, lease_id: int, offset: int = 0, length: Optional[int] = None) -> bytes:
        """The lease's bytes: all of them, or ``length`` (default: to the end) from ``offset``."""
        return cast(bytes, self._one(_get(lease_id, offset, length)))

    def renew(self, lease_id: int, duration_ms: int) -> None:
        """Make the lease last ``duration_ms`` from now."""
        self._one(_renew(lease_id, duration_ms))

    def release(self, lease_id: int) -> None:
        """End the lease now."""
        self._one(_release(lease_id))

    def stats(self) -> Dict[str, int]:
        """The server's counters."""
        return cast(Dict[str, int], self._one(_Call(protocol.Stats(), _stats)))

    def pipeline(self) -> "Pipeline":
        """A batch of calls sent together and answered in one round trip."""
        return Pipeline(self)

    def _one(self, call: _Call) -> Any:
        result = self._request([call])[0]
        if isinstance(result, MemLeaseError):
            raise result
        return result

    def _request(self, calls: Sequence[_Call]) -> List[Any]:
        """Send the calls, read their replies in order; results or MemLeaseErrors."""
        try:
            frames = [call.request.encode() for call in calls]
        except struct.error as exc:
            raise InvalidArgument(
                "a value does not fit the wire format: %s" % exc, protocol.INVALID
            ) from None
        sock = self._sock or self._connect()
        replies: List[protocol.Reply] = []
        try:
            start = 0
            while start < len(frames):
                end, size = start, 0
                while end < len(frames) and (size < PIPELINE_WINDOW or end == start):
                    size += len(frames[end])
                    end += 1
                sock.sendall(b"".join(frames[start:end]))
                replies.extend(self._receive(sock, end - start))
                start = end
        except socket.timeout:
            self.close()
            raise MemLeaseConnectionError(
                "%s:%d did not answer within %ss" % (self.host, self.port, self.timeout)
            ) from None
        except OSError as exc:
            self.close()
            raise MemLeaseConnectionError(
                "connection to %s:%d lost: %s" % (self.host, self.port, exc)
            ) from None
        except protocol.ProtocolError as exc:
            self.close()
            raise MemLeaseProtocolError(
                "bad reply from %s:%d: %s" % (self.host, self.port, exc)
            ) from None
        results: List[Any] = []
        for call, reply in zip(calls, replies):
            try:
                results.append(call.result(call.request, reply))
            except MemLeaseError as exc:
                results.append(exc)
        return results

    def _receive(self, sock: socket.socket, count: int) -> List[protocol.Reply]:
        replies: List[protocol.Reply] = []
        while len(replies) < count:
            reply = self._decoder.next_message()
            if reply is not None:
                replies.append(reply)  # type: ignore[arg-type]  # a reply decoder yields replies
                continue
            data = sock.recv(RECV_SIZE)
            if not data:
                raise ConnectionResetError("the server closed the connection")
            self._decoder.feed(data)
        return replies

    def _connect(self) -> socket.socket:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as exc:
            raise MemLeaseConnectionError(
                "cannot connect to %s:%d: %s" % (self.host, self.port, exc.strerror or exc)
            ) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._decoder = protocol.reply_decoder()
        if self.token is not None:
            try:
                self._one(_Call(protocol.Auth(self.token), _done))
            except MemLeaseError:
                self.close()
                raise
        return sock


class Pipeline:
    """Calls queued on a client and sent together by ``execute()``.

    ``execute()`` returns one result per call in order; a failed call's result is its
    MemLeaseError, or, with ``raise_on_error``, the first one is raised once every
    reply has been read (so the connection stays in step).
    """

    def __init__(self, client: MemLeaseClient) -> None:
        self._client = client
        self._calls: List[_Call] = []

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._calls.clear()

    def __len__(self) -> int:
        return len(self._calls)

    def lease(self, size: int, duration_ms: int = DEFAULT_DURATION_MS) -> "Pipeline":
        self._calls.append(_lease(size, duration_ms))
        return self

    def set(self, lease_id: int, data: bytes, offset: int = 0) -> "Pipeline":
        self._calls.append(_set(lease_id, data, offset))
        return self

    def get(self, lease_id: int, offset: int = 0, length: Optional[int] = None) -> "Pipeline":
        self._calls.append(_get(lease_id, offset, length))
        return self

    def renew(self, lease_id: int, duration_ms: int) -> "Pipeline":
        self._calls.append(_renew(lease_id, duration_ms))
        return self

    def release(self, lease_id: int) -> "Pipeline":
        self._calls.append(_release(lease_id))
        return self

    def execute(self, raise_on_error: bool = True) -> List[Any]:
        calls, self._calls = self._calls, []
        results = self._client._request(calls) if calls else []
        if raise_on_error:
            for result in results:
                if isinstance(result, MemLeaseError):
                    raise result
        return results


# The command line.

_EPILOG = """\
commands:
  lease SIZE [MS]        lease SIZE bytes for MS milliseconds (default 5000)
  set ID DATA            write DATA (text, sent with a trailing NUL like the C++ client)
  set ID --file PATH     write the bytes of PATH ('-' reads standard input)
  get ID [--raw]         print the lease as text up to its first NUL, or --raw bytes
  renew ID MS            make the lease last MS milliseconds from now
  release ID             end the lease now
  stats                  print the server's counters
  set and get take --offset N; get takes --length N.

examples:
  memlease_client.py localhost 412 lease 1024 5000
  memlease_client.py localhost set 123 "this is some text"
  memlease_client.py localhost get 123
  memlease_client.py localhost get 123 --raw --offset 16 --length 8 > part.bin
  tar c data | memlease_client.py localhost set 123 --file -

The port defaults to 412.  $MEMLEASE_TOKEN is presented when set.
Exit status: 0 done, 1 refused, not found or no connection, 2 usage error."""


def _int32(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a whole number" % text) from None
    if not -(2**31) <= value <= protocol.INT32_MAX:
        raise argparse.ArgumentTypeError("%r does not fit in 32 bits" % text)
    return value


def _offset(text: str) -> int:
    value = _int32(text)
    if value < 0:
        raise argparse.ArgumentTypeError("%r must not be negative" % text)
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds to wait for the server (default 5)",
    )
    parser = argparse.ArgumentParser(
        prog="memlease_client.py",
        usage="%(prog)s host [port] command [leaseid|size] [duration|data] [options]",
        description="Lease, write, read, renew and release memory on a MemoryLease server.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("host", help="host running the server, e.g. localhost")
    parser.add_argument("port", type=int, help="the server's port (default %d)" % DEFAULT_PORT)
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    lease = commands.add_parser("lease", parents=[common], help="lease memory")
    lease.add_argument("size", type=_int32)
    lease.add_argument(
        "duration", type=_int32, nargs="?", default=DEFAULT_DURATION_MS, help="milliseconds"
    )
    set_ = commands.add_parser("set", parents=[common], help="write to a lease")
    set_.add_argument("lease_id", type=_int32)
    set_.add_argument("data", nargs="?")
    set_.add_argument(
        "--file", metavar="PATH", help="write this file's bytes ('-': standard input)"
    )
    set_.add_argument("--offset", type=_offset, default=0)
    get = commands.add_parser("get", parents=[common], help="read a lease")
    get.add_argument("lease_id", type=_int32)
    get.add_argument("--raw", action="store_true", help="write the exact bytes to standard output")
    get.add_argument("--offset", type=_offset, default=0)
    get.add_argument("--length", type=_offset)
    renew = commands.add_parser("renew", parents=[common], help="extend a lease")
    renew.add_argument("lease_id", type=_int32)
    renew.add_argument("duration", type=_int32, help="milliseconds from now")
    release = commands.add_parser("release", parents=[common], help="end a lease")
    release.add_argument("lease_id", type=_int32)
    commands.add_parser("stats", parents=[common], help="show the server's counters")
    return parser


def _with_default_port(argv: List[str]) -> List[str]:
    """Insert the default port when the word after the host is not a number."""
    if argv and not argv[0].startswith("-") and (len(argv) < 2 or not argv[1].isdigit()):
        return [argv[0], str(DEFAULT_PORT)] + argv[1:]
    return argv


def _payload(parser: argparse.ArgumentParser, args: argparse.Namespace) -> bytes:
    if args.data is None and args.file is None:
        parser.error("set needs DATA or --file PATH")
    if args.data is not None and args.file is not None:
        parser.error("set takes DATA or --file PATH, not both")
    if args.file is None:
        return cast(str, args.data).encode() + b"\0"
    try:
        if args.file == "-":
            return sys.stdin.buffer.read()
        with open(args.file, "rb") as file:
            return file.read()
    except OSError as exc:
        parser.error("cannot read %s: %s" % (args.file, exc.strerror or exc))


def _run(client: MemLeaseClient, args: argparse.Namespace, payload: bytes) -> None:
    command = args.command
    if command == "lease":
        lease_id = client.lease(args.size, args.duration)
        print(
            "You have leased %d bytes for %d MS with id %d" % (args.size, args.duration, lease_id)
        )
    elif command == "set":
        client.set(args.lease_id, payload, args.offset)
        print("Data set for lease %d" % args.lease_id)
    elif command == "get":
        data = client.get(args.lease_id, args.offset, args.length)
        if args.raw:
            sys.stdout.buffer.write(data)
        else:
            text = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            print("Data get for lease %d: %s" % (args.lease_id, text))
    elif command == "renew":
        client.renew(args.lease_id, args.duration)
        print("Lease %d renewed for %d MS" % (args.lease_id, args.duration))
    elif command == "release":
        client.release(args.lease_id)
        print("Lease %d released" % args.lease_id)
    else:
        for name, value in client.stats().items():
            print("%s %d" % (name, value))


def _refusal(args: argparse.Namespace, error: MemLeaseError) -> str:
    """The message for a refused command; the original's wording where it has one."""
    reason = (
        protocol.STATUS_TEXT.get(error.status, str(error))
        if error.status is not None
        else str(error)
    )
    if args.command == "lease":
        if isinstance(error, OutOfMemory):
            return "Failed to create lease due to insufficient resources on the server."
        return "Failed to create lease: %s (%s)" % (reason, error.status)
    if args.command == "set":
        return "Error: unable set for lease %d (%s): %s" % (args.lease_id, error.status, reason)
    if args.command == "get" and isinstance(error, LeaseNotFound):
        return "Data not found for %d." % args.lease_id
    return "Error: %s" % error


def main(argv: Optional[List[str]] = None) -> int:
    """The command line: returns the exit status."""
    try:
        status = _main(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()  # here, so that a closed pipe is handled below
        return status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # whoever read our output has gone: say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _main(argv: List[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(_with_default_port(argv))
    if not 0 < args.port < 65536:
        parser.error("port %d is not between 1 and 65535" % args.port)
    if not 0 < args.timeout < math.inf:
        parser.error("--timeout must be a positive number of seconds")
    payload = _payload(parser, args) if args.command == "set" else b""
    try:
        with MemLeaseClient(args.host, args.port, timeout=args.timeout) as client:
            _run(client, args, payload)
    except (MemLeaseConnectionError, MemLeaseProtocolError, Unauthorized, ServerBusy) as exc:
        print("memlease_client: %s" % exc, file=sys.stderr)
        return 1
    except MemLeaseError as exc:
        print(_refusal(args, exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
