"""The server's numbers for Prometheus: the text format, and a small HTTP endpoint for it.

:func:`render` is a pure function of the figures, so it is tested without a server.
:class:`MetricsServer` answers ``GET /metrics`` and ``GET /health`` on the lease
server's own event loop: non-blocking sockets, a bounded request, a deadline per
connection, so a slow or hostile scraper costs a descriptor and a few bytes, never a
stall of the lease port.  Names follow memcached_exporter's, with a ``memlease_`` prefix.
"""

import logging
import socket
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import protocol
from memlease.connection import Service
from memlease.loop import EventLoop, Timer

log = logging.getLogger("memlease")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST = 8 * 1024  # a request head longer than this is answered 431 and closed
REQUEST_SECONDS = 5.0  # a scrape must be asked and answered within this
MAX_CLIENTS = 64  # scrapes at once; past this the oldest idle one makes room (see _accept)
ACCEPT_BATCH = 16
# Gives the exposition text to the callback it is handed: at once, or a few turns later.
MetricsSource = Callable[[Callable[[str], None]], None]

# A status as a label value; a refused lease (Leased, or Grant's DataSet, -1) has its own word.
STATUS_LABELS = {
    protocol.OK: "ok",
    protocol.NOT_FOUND: "not_found",
    protocol.TOO_LARGE: "too_large",
    protocol.OUT_OF_RANGE: "out_of_range",
    protocol.INVALID: "invalid",
    protocol.UNAUTHORIZED: "unauthorized",
    protocol.UNKNOWN_TYPE: "unknown_type",
    protocol.MALFORMED: "malformed",
    protocol.FRAME_TOO_LARGE: "frame_too_large",
    protocol.BUSY: "busy",
    protocol.SHORT_IDS_OFF: "short_ids_off",
    protocol.OVER_QUOTA: "over_quota",
}

# (metric, type, help, stats key) for each figure taken straight from the stats.
_PLAIN: Tuple[Tuple[str, str, str, str], ...] = (
    ("pool_bytes", "gauge", "Size of the pool lent out in leases.", "pool_bytes"),
    ("free_bytes", "gauge", "Bytes of the pool in free blocks.", "free_bytes"),
    (
        "largest_free_block_bytes",
        "gauge",
        "The largest block a lease could get now.",
        "largest_free_block",
    ),
    ("current_leases", "gauge", "Leases live now.", "live_leases"),
    (
        "metadata_bytes",
        "gauge",
        "Estimated memory of the lease table and the allocator.",
        "metadata_bytes",
    ),
    ("leases_granted_total", "counter", "Leases granted.", "leases_granted"),
    ("leases_refused_total", "counter", "Lease requests refused.", "leases_refused"),
    ("leases_expired_total", "counter", "Leases ended by their deadline.", "leases_expired"),
    (
        "leases_reclaimed_total",
        "counter",
        "Of the expired leases, those a lease request ended at once to get their memory.",
        "leases_reclaimed",
    ),
    ("leases_released_total", "counter", "Leases released by their holder.", "leases_released"),
    ("leases_renewed_total", "counter", "Leases renewed.", "leases_renewed"),
    ("received_bytes_total", "counter", "Bytes received from clients.", "bytes_received"),
    ("sent_bytes_total", "counter", "Bytes sent to clients.", "bytes_sent"),
    ("current_connections", "gauge", "Client connections open now.", "connections"),
    ("connections_total", "counter", "Client connections accepted.", "total_connections"),
    (
        "connections_refused_total",
        "counter",
        "Connections refused at the connection limit.",
        "connections_refused",
    ),
    ("auth_failures_total", "counter", "Wrong tokens presented.", "auth_failures"),
    ("uptime_seconds", "gauge", "Seconds since the server started.", "uptime"),
)


def status_label(command: str, status: int) -> str:
    if command in ("lease", "grant") and status == protocol.NO_MEMORY:
        return "no_memory"
    return STATUS_LABELS.get(status, str(status))


def render(
    stats: Mapping[str, int],
    requests: Mapping[Tuple[str, int], int],
    free_blocks: Mapping[int, int],
    expiry_lag: float,
) -> str:
    """The exposition text (format 0.0.4) of the figures a Service and its store keep."""
    lines: List[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        lines.append("# HELP memlease_%s %s" % (name, help_text))
        lines.append("# TYPE memlease_%s %s" % (name, kind))

    for name, kind, help_text, key in _PLAIN:
        family(name, kind, help_text)
        lines.append("memlease_%s %d" % (name, stats[key]))
    family("fragmentation_ratio", "gauge", "1 - largest free block / free bytes.")
    lines.append("memlease_fragmentation_ratio %s" % (stats["fragmentation"] / 1000))
    family("expiry_lag_seconds", "gauge", "How late the last expiry pass ran.")
    lines.append("memlease_expiry_lag_seconds %s" % float(expiry_lag))
    family("free_blocks", "gauge", "Free blocks of the pool, by block size.")
    for size, count in sorted(free_blocks.items()):
        lines.append('memlease_free_blocks{size_bytes="%d"} %d' % (size, count))
    family("requests_total", "counter", "Requests answered, by command and status.")
    labelled = sorted(
        ((command, status_label(command, status)), count)
        for (command, status), count in requests.items()
    )
    for (command, status_text), count in labelled:
        lines.append(
            'memlease_requests_total{command="%s",status="%s"} %d' % (command, status_text, count)
        )
    return "\n".join(lines) + "\n"


def render_service(service: Service, answer: Callable[[str], None]) -> None:
    """Give ``answer`` the exposition text of a running server, once its Service has
    counted the figures of this moment (Service.figures: later, in a storm of expiries)."""

    def counted(stats: Dict[str, int]) -> None:
        free_blocks = service.store.free_blocks()
        answer(render(stats, service.request_counts(), free_blocks, service.expiry_lag))

    service.figures(None, counted)


def respond(head: bytes, metrics: MetricsSource, send: Callable[[bytes], None]) -> None:
    """Give ``send`` the whole HTTP response to a request whose head (up to the blank
    line) is ``head``: at once, or for /metrics once ``metrics`` has the text."""
    request_line = head.split(b"\n", 1)[0].strip()
    parts = request_line.split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        send(_response(400, "Bad Request", "bad request\n"))
        return
    method, target = parts[0], parts[1].split(b"?", 1)[0]
    head_only = method == b"HEAD"  # what some health checkers send: the headers alone
    if target not in (b"/metrics", b"/health"):
        send(_response(404, "Not Found", "not found: try /metrics or /health\n"))
    elif method != b"GET" and not head_only:
        send(_response(405, "Method Not Allowed", "only GET or HEAD\n", [("Allow", "GET, HEAD")]))
    elif target == b"/health":
        send(_response(200, "OK", "ok\n", head_only=head_only))
    else:
        metrics(
            lambda text: send(
                _response(200, "OK", text, content_type=CONTENT_TYPE, head_only=head_only)
            )
        )


def _response(
    code: int,
    reason: str,
    body: str,
    headers: Optional[List[Tuple[str, str]]] = None,
    content_type: str = "text/plain; charset=utf-8",
    head_only: bool = False,
) -> bytes:
    """The whole response; with ``head_only`` (a HEAD request) its headers alone, the
    length still the body's."""
    data = body.encode()
    lines = [
        "HTTP/1.1 %d %s" % (code, reason),
        "Content-Type: %s" % content_type,
        "Content-Length: %d" % len(data),
        "Connection: close",
    ]
    lines += ["%s: %s" % pair for pair in headers or ()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + (b"" if head_only else data)


class _Scrape:
    """One HTTP connection: read a bounded request head, write the response, close.

    After the response it waits for the client's FIN, dropping what else it sends, so
    the close does not reset the connection and lose the response on its way.
    """

    def __init__(self, server: "MetricsServer", sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.head = bytearray()
        self.out = memoryview(b"")
        self.timer: Timer = server.loop.call_later(server.request_seconds, self._too_slow)
        server.loop.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        try:
            data = self.sock.recv(MAX_REQUEST + 1 - len(self.head))
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()
            return
        self.head += data
        whole = b"\r\n\r\n" in self.head or b"\n\n" in self.head
        if not whole and len(self.head) <= MAX_REQUEST:
            return
        self.server.loop.remove_reader(self.fd)  # nothing more is read: the answer follows
        if whole:
            respond(bytes(self.head), self.server.metrics, self._answer)
        else:
            self._answer(_response(431, "Request Header Fields Too Large", "too large\n"))

    def _answer(self, response: bytes) -> None:
        if self.fd < 0:  # closed while the figures were counted
            return
        self.out = memoryview(response)
        self.server.loop.add_writer(self.fd, self._writable)

    def _writable(self) -> None:
        try:
            n = self.sock.send(self.out)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        self.out = self.out[n:]
        if not self.out:
            self._linger()

    def _linger(self) -> None:
        loop = self.server.loop
        loop.remove_writer(self.fd)
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()
            return
        loop.add_reader(self.fd, self._drain)

    def _drain(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()

    def _too_slow(self) -> Optional[float]:
        self.close()
        return None

    def close(self) -> None:
        if self.fd < 0:
            return
        loop = self.server.loop
        loop.forget(self.fd)
        loop.cancel(self.timer)
        self.sock.close()
        self.fd = -1
        self.server.scrapes.pop(self, None)


class MetricsServer:
    """Serves /metrics and /health on ``loop``, beside the lease server, on its own socket."""

    def __init__(
        self,
        loop: EventLoop,
        address: Tuple[str, int],
        metrics: MetricsSource,
        request_seconds: float = REQUEST_SECONDS,
    ) -> None:
        self.loop = loop
        self.metrics = metrics
        self.request_seconds = request_seconds
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.listener = socket.create_server(address, family=family)
        self.listener.setblocking(False)
        self.address: Tuple[str, int] = self.listener.getsockname()[:2]
        self.scrapes: Dict[_Scrape, None] = {}  # oldest first
        loop.add_reader(self.listener.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, say: pause instead of spinning
                log.warning("metrics: accept failed: %s", exc)
                self._pause_accepting()
                return
            if len(self.scrapes) >= MAX_CLIENTS and not self._make_room():
                sock.close()
                continue
            sock.setblocking(False)
            self.scrapes[_Scrape(self, sock)] = None

    def _make_room(self) -> bool:
        """Close the oldest scrape that is not sending a response, so that connections
        which send nothing (or never read their end) cannot keep /health from answering;
        False if every one is sending."""
        for scrape in self.scrapes:
            if not scrape.out:
                scrape.close()
                return True
        return False

    @property
    def url(self) -> str:
        host, port = self.address
        return "http://%s:%d/metrics" % ("[%s]" % host if ":" in host else host, port)

    def _pause_accepting(self) -> None:
        fd = self.listener.fileno()
        self.loop.remove_reader(fd)

        def resume() -> Optional[float]:
            if self.listener.fileno() >= 0:
                self.loop.add_reader(fd, self._accept)
            return None

        self.loop.call_later(0.1, resume)

    def close(self) -> None:
        for scrape in list(self.scrapes):
            scrape.close()
        self.loop.forget(self.listener.fileno())
        self.listener.close()
