"""The listener: accepts connections and moves bytes between sockets and their state machines.

Everything runs on one :class:`EventLoop` thread, as in Redis: the listening sockets, a
:class:`Channel` per connection (non-blocking socket, read and write interest, idle and
frame timers), and the store's expiry, done in slices so that a storm of expiries
interleaves with requests.  The protocol itself lives in :mod:`connection`.
"""

import functools
import ipaddress
import logging
import signal
import socket
import ssl
import struct
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, cast

import protocol
from memlease.connection import Connection, Service
from memlease.loop import EventLoop, Timer
from memlease.store import EXPIRY_SLICE, LeaseStore
from memlease.unixsocket import DEFAULT_MODE, UnixListener

log = logging.getLogger("memlease")

RECV_SIZE = 256 * 1024
UPLOAD_TURN_BYTES = 8 << 20  # of a large write's data, received in one turn at most
ACCEPT_BATCH = 64  # connections accepted per readable event of a listener
LINGER_SECONDS = 1.0  # how long a closing connection waits for the peer's FIN
SHUTDOWN_SECONDS = 1.5  # how long a stopping server waits for replies to drain
STOP_READ_BYTES = 1 << 20  # what a stop still reads of a connection, to answer it
DESCRIPTOR_RESERVE = 32  # descriptors kept back from --max-connections for files and logs


class Peer:
    """A client's address, formatted only when a log line is actually written."""

    __slots__ = ("address",)

    def __init__(self, address: Any) -> None:
        self.address = address

    def __str__(self) -> str:
        if not isinstance(self.address, tuple):
            return str(self.address) or "local"
        host, port = self.address[:2]
        return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


_CREDENTIALS = struct.Struct("3i")  # pid, uid, gid: what SO_PEERCRED gives


def unix_peer(sock: socket.socket) -> str:
    """A Unix socket's peer, named for the log and the limits by the user it runs as
    (where the system tells: Linux), else ``local``."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return "local"
    try:
        _, uid, _ = _CREDENTIALS.unpack(
            sock.getsockopt(socket.SOL_SOCKET, option, _CREDENTIALS.size)
        )
    except (OSError, struct.error):
        return "local"
    return "local uid %d" % uid


def default_max_connections() -> int:
    """What the descriptor limit allows, raised to its hard limit first (as memcached does)."""
    try:
        import resource
    except ImportError:  # not a Unix
        return 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(soft - DESCRIPTOR_RESERVE, 1)


class Channel:
    """One accepted socket, wired to its Connection on the loop."""

    __slots__ = (
        "server",
        "loop",
        "sock",
        "fd",
        "conn",
        "reading",
        "writing",
        "peer_done",
        "lingering",
        "last_active",
        "frame_since",
        "frame_mark",
        "tls",
        "handshaking",
        "timer",
        "closed",
        "resuming",
        "hold_timer",
    )

    def __init__(self, server: "MemLeaseServer", sock: socket.socket, peer: Peer) -> None:
        self.server = server
        self.loop = server.loop
        self.sock = sock
        self.fd = sock.fileno()
        self.conn = Connection(server.service, peer)
        self.reading = False
        self.writing = False
        self.peer_done = False  # the peer sent its FIN
        self.lingering = False  # we sent ours and wait for the peer's
        self.last_active = self.loop.now
        self.frame_since: Optional[float] = None
        self.frame_mark = 0
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.handshaking = self.tls
        self.closed = False
        self.resuming = False  # a resume() of the connection is due on the next turn
        self.hold_timer: Optional[Timer] = None  # ends the connection's held_until
        self.timer: Timer = self.loop.call_later(server.idle_timeout, self._check_timeouts)
        self.conn.wake = self._come_back

    def start(self) -> None:
        """Begin: the TLS handshake, or reading."""
        if self.handshaking:  # a handshake must finish as fast as a frame must arrive
            self.frame_since = self.last_active
            self._wake_by(self.last_active + self.server.frame_timeout)
            self.on_writable()
        else:
            self._set_reading(True)
            # Most clients send a request at once: read it now rather than a turn later.
            self.on_readable()

    # Events.

    def on_readable(self) -> None:
        try:
            self._read()
        except Exception:  # a bug must cost one connection, not the server
            self._internal_error()

    def on_writable(self) -> None:
        try:
            if self.handshaking:
                self._handshake()
            else:
                self.update()
        except Exception:
            self._internal_error()

    def _internal_error(self) -> None:
        log.error("%s internal error, closing", self.conn.peer, exc_info=True)
        self.close()

    def _read(self, at_least: int = 0) -> None:
        """Receive and answer: one read, or (when stopping) reads until ``at_least`` bytes
        or until the kernel holds no more."""
        if self.handshaking:
            self._handshake()
            return
        conn = self.conn
        sock = self.sock
        received = 0
        try:
            while True:
                into = conn.receive_buffer() if conn.uploading else None
                if into is not None:
                    n = sock.recv_into(into)
                    if n:
                        conn.received_into(n)
                else:
                    data = sock.recv(RECV_SIZE)
                    n = len(data)
                    if n:
                        conn.receive(data)
                received += n
                if not n:
                    self.peer_done = True
                    if conn.in_frame:
                        log.info("%s disconnected in the middle of a frame", conn.peer)
                    conn.end_of_input()
                    break
                # TLS may hold decrypted bytes that no readiness event will announce, and
                # a large write's data goes on arriving: take what the socket has of it, up
                # to a turn's share, rather than a loop turn a chunk.
                if (
                    received >= at_least
                    and not (self.tls and _pending(sock) and conn.wants_input)
                    and not (conn.uploading and received < UPLOAD_TURN_BYTES)
                ):
                    break
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        except (OSError, ssl.SSLError) as exc:
            log.info("%s connection lost: %s", conn.peer, exc)
            self.close()
            return
        now = self.loop.now
        self.last_active = now
        self.server.service.counters["bytes_received"] += received
        if conn.in_frame:
            if self.frame_since is None or conn.answered != self.frame_mark:
                self.frame_since = now
                self.frame_mark = conn.answered
                self._wake_by(now + self.server.frame_timeout)
        else:
            self.frame_since = None
        self.update()

    def update(self) -> None:
        """Send what can be sent, then wait for what this connection needs next."""
        conn = self.conn
        if conn.held_until and self._held():
            return
        if conn.output_size and not self._flush():
            return
        if self.closed or self.lingering:  # lingering: only _linger reads, nothing is sent
            return
        reading = conn.wants_input and not self.peer_done
        if reading != self.reading:
            self._set_reading(reading)
        if reading and self.tls and _pending(self.sock):
            self.loop.call_soon(self.on_readable)  # decrypted bytes wait: no event will tell
        writing = bool(conn.output_size)
        if writing != self.writing:
            self._set_writing(writing)
        if conn.has_backlog:
            self._come_back()
        if conn.closing and not conn.output_size and not self.lingering:
            self._finish()

    def _come_back(self) -> None:
        """Resume the connection and update the channel on the loop's next turn."""
        if not (self.resuming or self.closed):
            self.resuming = True
            self.loop.call_soon(self._resume)

    def _held(self) -> bool:
        """Whether the replies must wait (a wrong token's answer is slowed): then nothing is
        read or sent until a timer of the loop, never a sleep, ends the hold."""
        if self.closed or self.conn.held_until <= self.loop.clock():
            self.conn.held_until = 0.0
            return False
        self._set_reading(False)
        self._set_writing(False)
        if self.hold_timer is None:
            self.hold_timer = self.loop.call_at(self.conn.held_until, self._end_hold)
        return True

    def _end_hold(self) -> Optional[float]:
        self.hold_timer = None
        if not self.closed:
            self.update()
        return None

    def _resume(self) -> None:
        self.resuming = False
        if self.closed:
            return
        try:
            self.conn.resume()
            self.update()
        except Exception:
            self._internal_error()

    def stop(self) -> None:
        """Answer every request the peer has fully sent by now, then close after the replies."""
        if not (self.closed or self.handshaking or self.lingering or self.peer_done):
            self._read(at_least=STOP_READ_BYTES)
        if not self.closed:
            self.conn.stop()
            self.update()

    # Timers.

    def _check_timeouts(self) -> Optional[float]:
        try:
            return self._timeouts()
        except Exception:  # a bug must cost one connection, not the server
            self._internal_error()
            return None

    def _timeouts(self) -> Optional[float]:
        """Close the connection if a deadline has passed; otherwise, the time to the next."""
        if self.closed:
            return None
        now = self.loop.clock()
        server = self.server
        if self.lingering:
            deadline = self.last_active + LINGER_SECONDS
            reason = None
        elif self.frame_since is not None:
            deadline = min(
                self.frame_since + server.frame_timeout, self.last_active + server.idle_timeout
            )
            reason = "%s incomplete after %gs" % (
                "TLS handshake" if self.handshaking else "frame",
                server.frame_timeout,
            )
        else:
            deadline = self.last_active + server.idle_timeout
            reason = "idle for %gs" % server.idle_timeout
        if now < deadline:
            return deadline - now
        if reason is not None:
            log.info("%s closed: %s", self.conn.peer, reason)
        self.close()
        return None

    def _wake_by(self, deadline: float) -> None:
        """Make the timeout check run no later than ``deadline``."""
        if self.timer.when > deadline:
            self.loop.cancel(self.timer)
            self.timer = self.loop.call_at(deadline, self._check_timeouts)

    # Closing.

    def _finish(self) -> None:
        """Every reply is out: close with a FIN, after the peer's if it has not sent it."""
        if self.peer_done:
            self.close()
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()
            return
        self.lingering = True
        self.last_active = self.loop.clock()
        self.loop.add_reader(self.fd, self._linger)
        self.reading = True
        self._wake_by(self.last_active + LINGER_SECONDS)

    def _linger(self) -> None:
        """Read and drop what the peer still sends until its FIN, so close() sends no reset."""
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, ssl.SSLWantReadError):
            return
        except (OSError, ssl.SSLError):
            data = b""
        if not data:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.forget(self.fd)
        self.loop.cancel(self.timer)
        if self.hold_timer is not None:
            self.loop.cancel(self.hold_timer)
        self.sock.close()
        self.conn.close()
        self.server.channel_closed(self)

    # Helpers.

    def _flush(self) -> bool:
        """Send until the socket is full or the output empty; False if the channel closed."""
        conn = self.conn
        sock = self.sock
        sent_total = 0
        try:
            while conn.output_size:
                buffers = conn.outgoing()
                if len(buffers) == 1 or self.tls:  # SSLSocket has no sendmsg
                    n = sock.send(buffers[0])
                    full = n < len(buffers[0])
                else:
                    n = sock.sendmsg(buffers)
                    full = n < sum(len(b) for b in buffers)
                sent_total += n
                conn.sent(n)
                if full:
                    break
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            pass
        except (OSError, ssl.SSLError) as exc:
            log.info("%s connection lost: %s", conn.peer, exc)
            self.close()
            return False
        if sent_total:
            self.server.service.counters["bytes_sent"] += sent_total
            self.last_active = self.loop.now
        return True

    def _handshake(self) -> None:
        sock = self.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._set_reading(True)
            self._set_writing(False)
            return
        except ssl.SSLWantWriteError:
            self._set_reading(False)
            self._set_writing(True)
            return
        except (OSError, ssl.SSLError) as exc:
            self.server.service.warn(
                "tls", self.conn.peer, "%s TLS handshake failed: %s", self.conn.peer, exc
            )
            self.close()
            return
        self.handshaking = False
        self._set_writing(False)
        self._set_reading(True)
        self._read()

    def _set_reading(self, on: bool) -> None:
        if on != self.reading:
            self.reading = on
            if on:
                self.loop.add_reader(self.fd, self.on_readable)
            else:
                self.loop.remove_reader(self.fd)

    def _set_writing(self, on: bool) -> None:
        if on != self.writing:
            self.writing = on
            if on:
                self.loop.add_writer(self.fd, self.on_writable)
            else:
                self.loop.remove_writer(self.fd)


def _pending(sock: socket.socket) -> int:
    """Decrypted bytes a TLS socket holds, which no readiness event will announce."""
    return cast(ssl.SSLSocket, sock).pending()


class MemLeaseServer:
    """Listens on one or more sockets and serves every connection on one event loop.

    ``serve_forever()`` runs the loop in the calling thread.  ``shutdown()`` may be
    called from any thread or a signal handler: the server stops accepting and
    reading, answers every request already received, flushes, closes each connection
    with a FIN, and then ``serve_forever()`` returns.

    ``unix`` adds a Unix socket at that path (its file made with ``unix_mode``, removed
    at the stop); it is served without TLS, as its peers are on this host.
    """

    def __init__(
        self,
        address: Optional[Tuple[str, int]],
        store: LeaseStore,
        *,
        sockets: Sequence[socket.socket] = (),
        max_connections: Optional[int] = None,
        idle_timeout: float = 300.0,
        frame_timeout: float = 30.0,
        max_frame: Optional[int] = None,
        token: Optional[bytes] = None,
        service: Optional[Service] = None,
        ssl_context: Optional[ssl.SSLContext] = None,
        loop: Optional[EventLoop] = None,
        unix: Optional[str] = None,
        unix_mode: int = DEFAULT_MODE,
    ) -> None:
        self.store = store
        self.loop = loop or EventLoop()
        self.service = service or Service(
            store,
            max_data=protocol.INT32_MAX if max_frame is None else max_frame,
            token=token,
        )
        self.max_connections = (
            default_max_connections() if max_connections is None else max_connections
        )
        self.idle_timeout = idle_timeout
        self.frame_timeout = frame_timeout
        self.ssl_context = ssl_context
        self.listeners: List[socket.socket] = list(sockets)
        if address is not None:
            self.listeners.append(listen(address))
        self.unix: Optional[UnixListener] = None
        if unix is not None:
            try:
                self.unix = UnixListener(unix, unix_mode)
            except OSError:
                for listener in self.listeners[len(sockets) :]:
                    listener.close()
                raise
            self.listeners.append(self.unix.sock)
        for listener in self.listeners:
            listener.setblocking(False)
            self.loop.add_reader(listener.fileno(), self._acceptor(listener))
        # The first TCP listener's address; ("", 0) when there is only a Unix socket.
        self.server_address: Tuple[str, int] = next(
            (tcp.getsockname()[:2] for tcp in self._tcp_listeners()), ("", 0)
        )
        self.channels: Set[Channel] = set()
        self.service.connections = self.channels.__len__
        self._count_due = False  # a step of the census is on the loop's list already
        self.service.census_begun = self._count_soon
        self._stopping = threading.Event()
        self._stopped = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.loop.add_reader(self._wake_r.fileno(), self._woken)
        self._expiry: Optional[Timer] = None
        self.loop.before_wait = self._schedule_expiry
        self._started = time.monotonic()
        self._log_counts: Dict[Tuple[str, str], int] = {}

    # Running and stopping.

    def serve_forever(self) -> None:
        """Serve until shutdown(), then finish the connections gracefully and return."""
        loop = self.loop
        while not self._stopping.is_set():
            loop.run_once()
        self._drain()

    def shutdown(self) -> None:
        """Ask serve_forever() to stop; safe from signal handlers and other threads."""
        self._stopping.set()
        try:
            self._wake_w.send(b"x")
        except OSError:  # a wake-up is already pending, or the server is closed
            pass

    def wakeup_fd(self) -> int:
        """A descriptor to hand to signal.set_wakeup_fd, so a signal ends the wait at once."""
        return self._wake_w.fileno()

    def close(self) -> None:
        """Release the sockets, the loop and the store."""
        for channel in list(self.channels):
            channel.close()
        self._close_listeners()
        self.loop.close()
        self._wake_r.close()
        self._wake_w.close()
        self.store.close()

    def _drain(self) -> None:
        loop = self.loop
        for listener in self.listeners:
            loop.forget(listener.fileno())
        self._close_listeners()
        deadline = time.monotonic() + SHUTDOWN_SECONDS
        for channel in list(self.channels):
            channel.stop()
        while self.channels and time.monotonic() < deadline:
            loop.run_once(timeout=max(deadline - time.monotonic(), 0.0))
        for channel in list(self.channels):
            channel.close()

    def _close_listeners(self) -> None:
        """Close every listening socket, and remove the Unix socket's file."""
        for listener in self.listeners:
            listener.close()
        if self.unix is not None:
            self.unix.close()

    def _tcp_listeners(self) -> List[socket.socket]:
        return [listener for listener in self.listeners if listener.family != socket.AF_UNIX]

    def _woken(self) -> None:
        try:
            self._wake_r.recv(4096)
        except OSError:
            pass

    # Connections.

    def _accept(self, listener: socket.socket, tcp: bool) -> None:
        """Accept what connections are waiting (up to a batch); ``tcp``: not a Unix socket."""
        service = self.service
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, say: pause instead of spinning
                self.service.warn("accept", "", "accept failed: %s", exc)
                self._pause_accepting(listener)
                return
            peer = Peer(address if tcp else unix_peer(sock))
            tls = self.ssl_context if tcp else None
            refusal = service.refusal(peer.address)
            if refusal is not None:  # refused before a byte is read or a handshake is made
                counter, reason = refusal
                service.counters[counter] += 1
                self.service.warn(counter, peer, "%s refused: %s", peer, reason)
                _refuse(sock, None if tls else protocol.UNAUTHORIZED)
                continue
            if len(self.channels) >= self.max_connections:
                service.counters["connections_refused"] += 1
                self.service.warn(
                    "busy", "", "%s refused: %d connections already open", peer, len(self.channels)
                )
                _refuse(sock, protocol.BUSY)
                continue
            sock.setblocking(False)
            if tcp:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                try:
                    sock = tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                except (OSError, ssl.SSLError) as exc:
                    log.info("%s TLS setup failed: %s", peer, exc)
                    sock.close()
                    continue
            service.counters["total_connections"] += 1
            channel = Channel(self, sock, peer)
            self.channels.add(channel)
            log.debug("%s connected", peer)
            channel.start()

    def _acceptor(self, listener: socket.socket) -> Callable[[], None]:
        """The callback that accepts on ``listener`` when it is readable."""
        return functools.partial(self._accept, listener, listener.family != socket.AF_UNIX)

    def _pause_accepting(self, listener: socket.socket) -> None:
        fd = listener.fileno()
        self.loop.remove_reader(fd)

        def resume() -> Optional[float]:
            if not self._stopping.is_set():
                self.loop.add_reader(fd, self._acceptor(listener))
            return None

        self.loop.call_later(0.1, resume)

    def channel_closed(self, channel: Channel) -> None:
        self.channels.discard(channel)
        log.debug("%s closed", channel.conn.peer)

    # Expiry.

    def _schedule_expiry(self) -> None:
        """Make sure the expiry timer fires no later than the store's next deadline."""
        deadline = self.store.next_deadline()
        timer = self._expiry
        if deadline is None:
            return
        if timer is not None and not timer.cancelled and timer.when <= deadline:
            return
        if timer is not None:
            self.loop.cancel(timer)
        self._expiry = self.loop.call_at(deadline, self._expire)

    def _expire(self) -> Optional[float]:
        """Expire a slice of the due leases; come back next turn while more are due."""
        try:
            return self._expire_slice()
        except Exception:  # keep serving; every access still checks its lease's deadline
            log.error("expiry failed; trying again in a second", exc_info=True)
            return 1.0

    def _count_soon(self) -> None:
        """Step the census on the next turn: once, however often a census begins meanwhile
        (count_more may begin the next one, or an answer may ask again)."""
        if not self._count_due:
            self._count_due = True
            self.loop.call_soon(self._count)

    def _count(self) -> None:
        """A step of the census that stats requests wait for; again next turn until done."""
        self._count_due = False
        try:
            more = self.service.count_more()
        except Exception:  # keep serving; its askers are counted by the next census
            log.error("counting the leases for stats failed", exc_info=True)
            return
        if more:
            self._count_soon()

    def _expire_slice(self) -> Optional[float]:
        store = self.store
        if self._expiry is not None:  # how late this pass runs: a sign of an overloaded loop
            self.service.expiry_lag = max(self.loop.clock() - self._expiry.when, 0.0)
        expired = store.expire_due(EXPIRY_SLICE)
        deadline = store.next_deadline()
        if deadline is None:
            self._expiry = None
            return None
        if expired == EXPIRY_SLICE:
            return 0.0
        return max(deadline - self.loop.clock(), 0.0)

    @property
    def is_loopback(self) -> bool:
        """Whether only this host can reach the server: TCP on loopback, or Unix sockets."""
        return all(
            ipaddress.ip_address(tcp.getsockname()[0]).is_loopback for tcp in self._tcp_listeners()
        )

    # Stats.

    def stats(self) -> Dict[str, int]:
        return self.service.stats(None)


def listen(address: Tuple[str, int]) -> socket.socket:
    """A listening TCP socket; an address with a colon is IPv6."""
    host = address[0]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server(address, family=family, backlog=4096)
    return sock


def _refuse(sock: socket.socket, status: Optional[int]) -> None:
    """Tell a connection turned away why (a status; None on a TLS port), and close it."""
    try:
        sock.setblocking(False)
        if status is not None:
            sock.send(protocol.Error(status, 0).encode())
    except OSError:
        pass
    sock.close()


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def install_signal_handlers(server: MemLeaseServer) -> None:
    """SIGINT and SIGTERM stop the server gracefully, waking the loop at once."""
    signal.set_wakeup_fd(server.wakeup_fd())
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda *_: server.shutdown())


def ignore_signals_while_stopping() -> None:
    """Once the loop has stopped: a second stop signal changes nothing (the stop is under
    way: saving, closing), and no signal is written to the wake-up socket about to close.
    Python puts its own handlers back to the default at exit, where one more Ctrl-C would
    end the process with 130 instead of 0; ignored signals stay ignored."""
    signal.set_wakeup_fd(-1)
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)

