#!/usr/bin/env python3
"""MemoryLease server: lends chunks of its memory to clients for a duration.

Three parts, in the manner of CPython's socketserver: the LeaseStore (the memory, its
allocator, the leases and their expiry, behind one lock), the ConnectionHandler (one
thread a connection, answering frames in order) and the MemLeaseServer (the listener,
which counts connections and stops gracefully).

    sudo python3 memlease_server.py 412 2048
"""

import argparse
import heapq
import hmac
import ipaddress
import logging
import math
import mmap
import os
import queue
import re
import secrets
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import protocol
from buddy import Block, BuddyAllocator

log = logging.getLogger("memlease")

RECV_SIZE = 256 * 1024
REPLY_BUFFER = 256 * 1024  # replies buffered before they are sent mid-read
MIN_BLOCK = 32
WORKER_IDLE_SECONDS = 60.0  # how long a thread waits for another connection before ending


class PoolMemory:
    """The pool's bytes: a private anonymous mapping, so untouched pages cost nothing.

    Zeroing a page-aligned run uses madvise(MADV_DONTNEED), which also hands the pages
    back to the OS; elsewhere (small blocks, or no madvise) zeros are written.
    """

    _ZEROS = memoryview(bytes(64 * 1024))

    def __init__(self, size: int) -> None:
        private = getattr(mmap, "MAP_PRIVATE", None)
        if private is None:
            self.buffer = mmap.mmap(-1, size)
        else:
            self.buffer = mmap.mmap(-1, size, flags=private)
        self._dontneed = getattr(mmap, "MADV_DONTNEED", None)
        if not hasattr(self.buffer, "madvise"):
            self._dontneed = None

    def zero(self, offset: int, size: int) -> None:
        if self._dontneed is not None and size >= mmap.PAGESIZE:
            self.buffer.madvise(self._dontneed, offset, size)
            return
        end = offset + size
        while offset < end:
            n = min(end - offset, len(self._ZEROS))
            self.buffer[offset : offset + n] = self._ZEROS[:n]
            offset += n

    def close(self) -> None:
        self.buffer.close()


class _Lease:
    __slots__ = ("block", "size", "expires_at")

    def __init__(self, block: Block, size: int, expires_at: float) -> None:
        self.block = block
        self.size = size  # as requested; the block may be larger
        self.expires_at = expires_at


class LeaseStore:
    """The leased memory and its bookkeeping; every method is safe from any thread.

    Expiry runs on a monotonic clock at millisecond precision: a thread returns each
    lease's block to the allocator when its time is up, and every access checks the
    time too, so an expired lease is gone even between the thread's wake-ups.
    Free memory is kept zeroed, and a block is zeroed again as it is granted.
    """

    def __init__(
        self,
        pool_size: int,
        min_block: int = MIN_BLOCK,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.allocator = BuddyAllocator(pool_size, min_block)
        self.memory = PoolMemory(self.allocator.capacity)
        self._clock = clock
        self._leases: Dict[int, _Lease] = {}
        self._deadlines: List[Tuple[float, int]] = []
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._closed = False
        self.counters = dict.fromkeys(
            (
                "leases_granted",
                "leases_refused",
                "leases_expired",
                "leases_released",
                "leases_renewed",
                "gets",
                "sets",
            ),
            0,
        )
        self._reaper = threading.Thread(
            target=self._expire_forever, name="memlease-expiry", daemon=True
        )
        self._reaper.start()

    def lease(self, size: int, duration_ms: int) -> int:
        """A new lease id, or a negative status when refused."""
        with self._lock:
            refusal = self._refusal(size, duration_ms)
            block = self.allocator.alloc(size) if refusal == protocol.OK else None
            if block is None:
                self.counters["leases_refused"] += 1
                return refusal or protocol.NO_MEMORY
            lease_id = self._new_id()
            self.memory.zero(block.offset, block.size)
            expires_at = self._clock() + duration_ms / 1000
            self._leases[lease_id] = _Lease(block, size, expires_at)
            self._schedule(expires_at, lease_id)
            self.counters["leases_granted"] += 1
            return lease_id

    def write(self, lease_id: int, offset: int, data: bytes) -> int:
        """Write all of ``data`` at ``offset``, or nothing; returns a status."""
        n = len(data)
        with self._lock:
            self.counters["sets"] += 1
            lease = self._live(lease_id)
            if lease is None:
                return protocol.NOT_FOUND
            if n > lease.size:
                return protocol.TOO_LARGE
            if offset < 0 or offset + n > lease.size:
                return protocol.OUT_OF_RANGE
            start = lease.block.offset + offset
            self.memory.buffer[start : start + n] = data
            return protocol.OK

    def read(self, lease_id: int, offset: int = 0, length: int = -1) -> Tuple[int, bytes]:
        """A status and the bytes at ``offset``; a length of -1 reads to the end."""
        with self._lock:
            self.counters["gets"] += 1
            lease = self._live(lease_id)
            if lease is None:
                return protocol.NOT_FOUND, b""
            if length == -1:
                length = lease.size - offset
            if offset < 0 or length < 0 or offset + length > lease.size:
                return protocol.OUT_OF_RANGE, b""
            start = lease.block.offset + offset
            return protocol.OK, self.memory.buffer[start : start + length]

    def renew(self, lease_id: int, duration_ms: int) -> int:
        """Give a live lease ``duration_ms`` from now; returns a status."""
        with self._lock:
            if duration_ms <= 0:
                return protocol.INVALID
            lease = self._live(lease_id)
            if lease is None:
                return protocol.NOT_FOUND
            lease.expires_at = self._clock() + duration_ms / 1000
            self._schedule(lease.expires_at, lease_id)
            self.counters["leases_renewed"] += 1
            return protocol.OK

    def release(self, lease_id: int) -> int:
        """End a lease now; its memory is zeroed and returned.  Returns a status."""
        with self._lock:
            if self._live(lease_id) is None:
                return protocol.NOT_FOUND
            self._retire(lease_id)
            self.counters["leases_released"] += 1
            return protocol.OK

    def stats(self) -> Dict[str, int]:
        with self._lock:
            stats = {
                "pool_bytes": self.allocator.capacity,
                "free_bytes": self.allocator.free_bytes,
                "largest_free_block": self.allocator.largest_free,
                "live_leases": len(self._leases),
            }
            stats.update(self.counters)
            return stats

    def close(self) -> None:
        """Stop the expiry thread and unmap the pool."""
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        self._reaper.join()
        self.memory.close()

    # The helpers below run with the lock held.

    def _refusal(self, size: int, duration_ms: int) -> int:
        if size <= 0 or duration_ms <= 0:
            return protocol.INVALID
        if size > self.allocator.capacity:
            return protocol.TOO_LARGE
        return protocol.OK

    def _new_id(self) -> int:
        while True:
            lease_id = secrets.randbelow(protocol.INT32_MAX) + 1
            if lease_id not in self._leases:
                return lease_id

    def _live(self, lease_id: int) -> Optional[_Lease]:
        lease = self._leases.get(lease_id)
        if lease is not None and lease.expires_at <= self._clock():
            self._expire(lease_id)
            return None
        return lease

    def _retire(self, lease_id: int) -> None:
        block = self._leases.pop(lease_id).block
        self.memory.zero(block.offset, block.size)
        self.allocator.free(block)

    def _expire(self, lease_id: int) -> None:
        self._retire(lease_id)
        self.counters["leases_expired"] += 1

    def _schedule(self, expires_at: float, lease_id: int) -> None:
        heapq.heappush(self._deadlines, (expires_at, lease_id))
        if self._deadlines[0][1] == lease_id:
            self._wakeup.notify()

    def _expire_forever(self) -> None:
        with self._wakeup:
            while not self._closed:
                now = self._clock()
                while self._deadlines and self._deadlines[0][0] <= now:
                    expires_at, lease_id = heapq.heappop(self._deadlines)
                    lease = self._leases.get(lease_id)
                    # A renewed lease left an outdated entry behind; skip it.
                    if lease is not None and lease.expires_at == expires_at:
                        self._expire(lease_id)
                timeout = self._deadlines[0][0] - now if self._deadlines else None
                self._wakeup.wait(timeout)


# A blocking socket whose timeouts the kernel keeps (SO_RCVTIMEO, SO_SNDTIMEO) costs one
# system call a recv or send; Python's own timeouts poll() first and so cost two, each
# a release and re-take of the GIL.  Windows takes these options in milliseconds, not
# as a timeval, so there, and wherever the options are missing, Python's are used.
TIMED_OUT = (socket.timeout, BlockingIOError)
_TIMEVAL = struct.Struct("@ll")
_KERNEL_TIMEOUTS = sys.platform != "win32"


def set_timeout(sock: socket.socket, seconds: float) -> None:
    """Make recv and send on ``sock`` give up after ``seconds``, raising TIMED_OUT."""
    seconds = max(seconds, 0.001)
    if not _KERNEL_TIMEOUTS:
        sock.settimeout(seconds)
        return
    whole = int(seconds)
    timeval = _TIMEVAL.pack(whole, int((seconds - whole) * 1_000_000))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    except (OSError, AttributeError):
        sock.settimeout(seconds)


def configure_connection(sock: socket.socket, idle_timeout: float) -> None:
    """Replies leave at once (no Nagle delay), and an idle connection times out."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    set_timeout(sock, idle_timeout)


def inherits_configuration(sock: socket.socket) -> bool:
    """Whether an accepted socket came configured like its listener, as on Linux."""
    return bool(
        _KERNEL_TIMEOUTS
        and sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        and any(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.size))
    )


def _describe(reply: protocol.Reply) -> str:
    """The result of a request, in words for the log."""
    if isinstance(reply, protocol.Leased):
        if reply.lease_id > 0:
            return "id %d" % reply.lease_id
        if reply.lease_id == protocol.NO_MEMORY:
            return "refused (%s)" % protocol.NO_MEMORY_TEXT
        return "refused (%s)" % protocol.STATUS_TEXT.get(reply.lease_id, str(reply.lease_id))
    if isinstance(reply, protocol.Data):
        return "%d bytes" % len(reply.data) if reply.data else "not found"
    if isinstance(reply, protocol.StatsReply):
        return "%d counters" % len(reply.stats)
    return protocol.STATUS_TEXT.get(reply.status, str(reply.status))


class Peer:
    """A client's address, formatted only when a log line is actually written."""

    __slots__ = ("address",)

    def __init__(self, address: Tuple[Any, ...]) -> None:
        self.address = address

    def __str__(self) -> str:
        host, port = self.address[:2]
        return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


class ConnectionHandler:
    """Serves one connection: decodes frames as they arrive and answers each in order.

    The replies to the frames of one read go back in one send, so pipelined requests
    cost one system call each way; past REPLY_BUFFER bytes they are sent at once, so a
    burst of reads of a large lease cannot pile copies of it up in memory.
    """

    def __init__(self, server: "MemLeaseServer", sock: socket.socket, peer: Peer) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.store = server.store
        self.authenticated = server.token is None
        self._log_requests = log.isEnabledFor(logging.INFO)

    def serve(self) -> None:
        """Run until the peer leaves, misbehaves, idles out, or the server stops."""
        try:
            self._serve()
        except OSError as exc:
            log.info("%s connection lost: %s", self.peer, exc)
        except Exception as exc:  # a bug must cost one connection, not the server
            log.error(
                "%s internal error: %r", self.peer, exc, exc_info=log.isEnabledFor(logging.DEBUG)
            )
        finally:
            self.sock.close()

    def _serve(self) -> None:
        sock = self.sock
        server = self.server
        decoder = protocol.request_decoder(server.max_frame)
        frame_deadline: Optional[float] = None
        while True:
            try:
                data = sock.recv(RECV_SIZE)
            except TIMED_OUT:
                if frame_deadline is None:
                    log.info("%s closed: idle for %gs", self.peer, server.idle_timeout)
                else:
                    log.info(
                        "%s closed: frame incomplete after %gs", self.peer, server.frame_timeout
                    )
                return
            if not data:
                if decoder.in_frame:
                    log.info("%s disconnected in the middle of a frame", self.peer)
                return
            decoder.feed(data)
            answered, keep_open = self._answer_all(decoder)
            if not keep_open:
                return
            if decoder.in_frame:
                now = time.monotonic()
                if frame_deadline is None or answered:
                    frame_deadline = now + server.frame_timeout
                set_timeout(sock, min(frame_deadline - now, server.idle_timeout))
            elif frame_deadline is not None:
                frame_deadline = None
                set_timeout(sock, server.idle_timeout)

    def _answer_all(self, decoder: protocol.Decoder) -> Tuple[bool, bool]:
        """Answer every whole frame received.

        Returns whether any frame was answered, and whether the connection stays open.
        """
        replies: List[bytes] = []
        buffered = 0
        answered = False
        keep_open = True
        while keep_open:
            try:
                message = decoder.next_message()
            except protocol.BadFrame as exc:
                log.warning("%s bad frame, closing: %s", self.peer, exc)
                replies.append(protocol.Error(exc.status, exc.msg_type).encode())
                keep_open = False
                break
            except protocol.BadMessage as exc:
                log.warning("%s bad message: %s", self.peer, exc)
                replies.append(protocol.Error(exc.status, exc.msg_type).encode())
                continue
            if message is None:
                break
            answered = True
            reply, keep_open = self._answer(message)
            replies.append(reply)
            buffered += len(reply)
            if buffered >= REPLY_BUFFER:
                self.sock.sendall(b"".join(replies))
                replies.clear()
                buffered = 0
        if replies:
            self.sock.sendall(b"".join(replies))
        return answered, keep_open

    def _answer(self, message: protocol.Message) -> Tuple[bytes, bool]:
        """One request's encoded reply, and whether the connection stays open."""
        kind = type(message)
        reply: protocol.Reply
        if self.authenticated or kind is protocol.Auth:
            reply = _ANSWERS[kind](self, message)
        else:
            reply = protocol.Error(protocol.UNAUTHORIZED, protocol.REQUEST_TYPES[kind])
        if self._log_requests:
            log.info(
                "%s %s %s -> %s",
                self.peer,
                protocol.request_name(message),
                getattr(message, "lease_id", "-"),
                _describe(reply),
            )
        # A wrong token closes the connection; so does nothing else.
        return reply.encode(), self.authenticated or kind is not protocol.Auth

    # One method a request type, looked up in _ANSWERS below.

    def _lease(self, message: protocol.Lease) -> protocol.Reply:
        return protocol.Leased(self.store.lease(message.size, message.duration_ms))

    def _set(self, message: protocol.SetData) -> protocol.Reply:
        return protocol.DataSet(self.store.write(message.lease_id, 0, message.data))

    def _write(self, message: protocol.Write) -> protocol.Reply:
        return protocol.DataSet(self.store.write(message.lease_id, message.offset, message.data))

    def _access(self, message: protocol.AccessData) -> protocol.Reply:
        # The original answers an unknown lease with no data; read() returns none then.
        return protocol.Data(message.lease_id, self.store.read(message.lease_id)[1])

    def _read(self, message: protocol.Read) -> protocol.Reply:
        status, data = self.store.read(message.lease_id, message.offset, message.length)
        if status != protocol.OK:
            return protocol.DataSet(status)
        return protocol.Data(message.lease_id, data)

    def _renew(self, message: protocol.Renew) -> protocol.Reply:
        return protocol.DataSet(self.store.renew(message.lease_id, message.duration_ms))

    def _release(self, message: protocol.Release) -> protocol.Reply:
        return protocol.DataSet(self.store.release(message.lease_id))

    def _stats(self, message: protocol.Stats) -> protocol.Reply:
        return protocol.StatsReply(self.server.stats())

    def _auth(self, message: protocol.Auth) -> protocol.Reply:
        token = self.server.token
        if token is not None and not hmac.compare_digest(message.token, token):
            log.warning("%s presented a wrong token; closing", self.peer)
            return protocol.DataSet(protocol.UNAUTHORIZED)
        self.authenticated = True
        return protocol.DataSet(protocol.OK)


_ANSWERS: Dict[type, Callable[[ConnectionHandler, Any], protocol.Reply]] = {
    protocol.Lease: ConnectionHandler._lease,
    protocol.SetData: ConnectionHandler._set,
    protocol.AccessData: ConnectionHandler._access,
    protocol.Release: ConnectionHandler._release,
    protocol.Renew: ConnectionHandler._renew,
    protocol.Write: ConnectionHandler._write,
    protocol.Read: ConnectionHandler._read,
    protocol.Stats: ConnectionHandler._stats,
    protocol.Auth: ConnectionHandler._auth,
}


class MemLeaseServer:
    """Listens, gives each connection a thread of its own, stops gracefully.

    A thread whose connection has closed waits a while to be handed the next one, so
    the one-request connections of the original's client do not each pay for starting
    a thread.  ``shutdown()`` may be called from any thread or a signal handler;
    ``serve_forever()`` then returns, and ``close()`` finishes the requests in flight
    and closes everything.
    """

    def __init__(
        self,
        address: Tuple[str, int],
        store: LeaseStore,
        *,
        max_connections: int = 1024,
        idle_timeout: float = 300.0,
        frame_timeout: float = 30.0,
        max_frame: Optional[int] = None,
        token: Optional[bytes] = None,
    ) -> None:
        self.store = store
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.frame_timeout = frame_timeout
        self.max_frame = (
            protocol.frame_limit(store.allocator.capacity) if max_frame is None else max_frame
        )
        self.token = token
        host = address[0]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server(address, family=family, backlog=1024)
        # Configured once here: on Linux every accepted socket inherits it, which saves
        # three system calls a connection.  The first accept tells whether it did.
        configure_connection(self.socket, idle_timeout)
        self.socket.setblocking(False)
        self._inherits_configuration: Optional[bool] = None
        self.server_address: Tuple[str, int] = self.socket.getsockname()[:2]
        self._lock = threading.Lock()  # guards the connection bookkeeping below
        self._handlers: Set[ConnectionHandler] = set()
        self._workers: Set[threading.Thread] = set()
        self._idle_workers = 0  # waiting on _handoff and not yet promised a connection
        self._handoff: queue.SimpleQueue[Optional[ConnectionHandler]] = queue.SimpleQueue()
        self._closing = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._stopping = threading.Event()
        self._started = time.monotonic()
        self.total_connections = 0

    @property
    def is_loopback(self) -> bool:
        return ipaddress.ip_address(self.server_address[0]).is_loopback

    def serve_forever(self) -> None:
        """Accept connections until shutdown() is called."""
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in selector.select():
                    if key.fileobj is self.socket:
                        self._accept()

    def shutdown(self) -> None:
        """Ask serve_forever() to return; safe from signal handlers and other threads."""
        self._stopping.set()
        try:
            self._wake_w.send(b"x")
        except OSError:  # the wake-up is already pending, or the server is closed
            pass

    def close(self, timeout: float = 1.5) -> None:
        """Stop listening, let in-flight requests finish, close every connection."""
        self.socket.close()
        with self._lock:
            self._closing = True
            handlers = list(self._handlers)
            workers = list(self._workers)
            for _ in range(self._idle_workers):
                self._handoff.put(None)
            self._idle_workers = 0
        for handler in handlers:
            try:  # the handler's recv sees end of stream; its replies still go out
                handler.sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for worker in workers:
            worker.join(max(deadline - time.monotonic(), 0))
        self._wake_r.close()
        self._wake_w.close()
        self.store.close()

    def stats(self) -> Dict[str, int]:
        stats = self.store.stats()
        with self._lock:
            stats["connections"] = len(self._handlers)
        stats["total_connections"] = self.total_connections
        stats["uptime"] = int(time.monotonic() - self._started)
        return stats

    def _accept(self) -> None:
        try:
            sock, address = self.socket.accept()
        except BlockingIOError:
            return
        except OSError as exc:  # out of descriptors, say: back off instead of spinning
            log.error("accept failed: %s", exc)
            time.sleep(0.05)
            return
        if self._inherits_configuration is None:
            self._inherits_configuration = inherits_configuration(sock)
        if not self._inherits_configuration:
            configure_connection(sock, self.idle_timeout)
        peer = Peer(address)
        worker = None
        with self._lock:
            busy = len(self._handlers) >= self.max_connections
            if not busy:
                self.total_connections += 1
                handler = ConnectionHandler(self, sock, peer)
                self._handlers.add(handler)
                if self._idle_workers:
                    self._idle_workers -= 1
                    self._handoff.put(handler)
                else:
                    worker = threading.Thread(
                        target=self._work, args=(handler,), name="memlease-worker", daemon=True
                    )
                    self._workers.add(worker)
        if busy:
            log.warning("%s refused: %d connections already open", peer, self.max_connections)
            try:
                sock.send(protocol.Error(protocol.BUSY, 0).encode())
            except OSError:
                pass
            sock.close()
            return
        log.debug("%s connected", peer)
        if worker is not None:
            worker.start()

    def _work(self, handler: Optional[ConnectionHandler]) -> None:
        """A worker thread: serve a connection, then wait to be handed the next one."""
        while handler is not None:
            handler.serve()
            log.debug("%s closed", handler.peer)
            with self._lock:
                self._handlers.discard(handler)
                if self._closing:
                    break
                self._idle_workers += 1
            handler = self._next_handler()
        with self._lock:
            self._workers.discard(threading.current_thread())

    def _next_handler(self) -> Optional[ConnectionHandler]:
        """The next connection to serve, or None when this worker should end."""
        while True:
            try:
                return self._handoff.get(timeout=WORKER_IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    # Waiting workers = unpromised ones (_idle_workers) + one for each
                    # connection already queued.  Leaving is safe only while an
                    # unpromised one exists; otherwise a connection is queued for us.
                    if self._idle_workers:
                        self._idle_workers -= 1
                        return None


_SIZE = re.compile(r"^(\d+)([KMGT]?)$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from ``2048``, ``64K``, ``16M`` or ``2G`` (powers of 1024)."""
    match = _SIZE.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(
            "%r is not a size: use bytes, or a number with K, M, G or T" % text
        )
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def parse_port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError("%r is not a port number (0-65535)" % text)
    return int(text)


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse type: a finite number above zero (NaN and infinity are refused)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not a number" % text) from None
        if not 0 < value < math.inf:
            raise argparse.ArgumentTypeError("%r must be a positive finite number" % text)
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memlease_server.py",
        description="Lend chunks of this host's memory to clients for a duration.",
        epilog="examples:\n"
        "  sudo python3 memlease_server.py 412 2048\n"
        "  python3 memlease_server.py 4120 16M --bind 127.0.0.1 -q\n"
        "  MEMLEASE_TOKEN=secret python3 memlease_server.py 4120 1G --bind ::\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("port", type=parse_port, help="TCP port to listen on (0: any free port)")
    parser.add_argument(
        "max_memory", type=parse_size, help="pool size in bytes, or with K, M, G (powers of 1024)"
    )
    parser.add_argument(
        "--bind",
        default="",
        metavar="ADDR",
        help="address to listen on (default: all IPv4 interfaces; '::' for IPv6)",
    )
    parser.add_argument(
        "--max-connections",
        type=_positive(int),
        default=1024,
        metavar="N",
        help="connections served at once; more are refused (default 1024)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=_positive(float),
        default=300.0,
        metavar="S",
        help="close a connection idle this many seconds (default 300)",
    )
    parser.add_argument(
        "--frame-timeout",
        type=_positive(float),
        default=30.0,
        metavar="S",
        help="close a connection whose frame takes longer than this to arrive (default 30)",
    )
    parser.add_argument(
        "--max-frame",
        type=parse_size,
        metavar="BYTES",
        help="largest payload accepted (default: the pool size plus 20)",
    )
    parser.add_argument(
        "--token-file",
        metavar="PATH",
        help="require clients to present the token in this file (default: $MEMLEASE_TOKEN)",
    )
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument(
        "-v", "--verbose", action="store_true", help="also log connections opening and closing"
    )
    noise.add_argument(
        "-q", "--quiet", action="store_true", help="log only warnings and errors, not each request"
    )
    return parser


def read_token(path: Optional[str]) -> Optional[bytes]:
    """The shared token from --token-file or $MEMLEASE_TOKEN; None when neither is set."""
    if path is None:
        token = os.environ.get("MEMLEASE_TOKEN", "")
        return token.encode() if token else None
    with open(path, "rb") as file:
        token_bytes = file.read().strip()
    if not token_bytes:
        raise ValueError("the token file %s is empty" % path)
    return token_bytes


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(
        stream=sys.stdout, level=level, format="%(asctime)s %(levelname)s %(message)s"
    )
    if args.max_memory < MIN_BLOCK:
        parser.error("max_memory must be at least %d bytes" % MIN_BLOCK)
    try:
        token = read_token(args.token_file)
    except (OSError, ValueError) as exc:
        parser.error("cannot read the token: %s" % exc)
    try:
        store = LeaseStore(args.max_memory)
    except (OSError, ValueError, OverflowError) as exc:
        print(
            "memlease_server: cannot reserve %d bytes: %s" % (args.max_memory, exc), file=sys.stderr
        )
        return 1
    try:
        server = MemLeaseServer(
            (args.bind, args.port),
            store,
            max_connections=int(args.max_connections),
            idle_timeout=args.idle_timeout,
            frame_timeout=args.frame_timeout,
            max_frame=args.max_frame,
            token=token,
        )
    except PermissionError:
        store.close()
        hint = (
            " (ports below 1024 need root: use sudo or a higher port)" if args.port < 1024 else ""
        )
        print(
            "memlease_server: not permitted to listen on port %d%s" % (args.port, hint),
            file=sys.stderr,
        )
        return 1
    except OSError as exc:
        store.close()
        print(
            "memlease_server: cannot listen on %s port %d: %s"
            % (args.bind or "*", args.port, exc.strerror or exc),
            file=sys.stderr,
        )
        return 1
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: server.shutdown())
    print("starting server on port %d" % server.server_address[1], flush=True)
    print("listening for client", flush=True)
    if token is None and not server.is_loopback:
        log.warning(
            "no token is set and the server listens on %s: anyone who can reach it can "
            "read and write its leases (set MEMLEASE_TOKEN or --token-file, or --bind 127.0.0.1)",
            server.server_address[0],
        )
    server.serve_forever()
    log.info("stopping: finishing requests in flight")
    server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
