"""Several MemoryLease servers used as one, placed from the client side.

cluster = MemLeaseCluster(["a:412", "b:412", "c:412"])
handle = cluster.lease(1024, 5000)      # LeaseHandle; str(handle) == "b:412/<the UUID>"
cluster.set(handle, b"hello")
cluster.get(str(handle))                # a handle or its text (b:412/123 for a short id)
for info in cluster.leases():           # every server's; info.lease_id is a LeaseHandle
    ...

The server chooses lease ids, so no key can be hashed to a server: each new lease is
placed (two random live servers, the one with more free bytes) and its handle carries
the server.  A server that fails is marked down for ``dead_timeout`` seconds: new leases
go elsewhere and calls on its leases fail at once, then it is tried again.
docs/scaling.md explains the choices.
"""

import functools
import os
import random
import socket
import ssl
import threading
import time
import uuid
from typing import (
    Any,
    Dict,
    FrozenSet,
    Iterable,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
    cast,
)

import protocol
from memlease_client import (
    DEFAULT_DURATION_MS,
    DEFAULT_PORT,
    Call,
    InvalidArgument,
    KeepAlive,
    LeaseInfo,
    LeaseTTL,
    MemLeaseClient,
    MemLeaseConnectionError,
    MemLeaseError,
    OutOfMemory,
    QuotaExceeded,
    TooLarge,
    address_text,
    checked_page_size,
    get_call,
    lease_call,
    listing,
    raise_first_error,
    release_call,
    renew_call,
    renew_many_calls,
    set_call,
    stats_call,
    ttl_call,
    unix_path,
)

DEFAULT_DEAD_TIMEOUT = 10.0
DEFAULT_STATS_INTERVAL = 1.0
# Figures whose cluster value is the largest server's, not the sum: a lease fits in one
# server's block, and the cluster has run as long as its oldest server.
_LARGEST_NOT_SUM = frozenset({"uptime", "largest_free_block"})


class LeaseHandle(NamedTuple):
    """A lease and the server that holds it; its text is ``host:port/id``: the id's UUID
    text, or a short id's number."""

    server: str
    lease_id: Union[uuid.UUID, int]

    def __str__(self) -> str:
        return "%s/%s" % (self.server, self.lease_id)


Handle = Union[LeaseHandle, str]


def parse_server(text: str, default_port: int = DEFAULT_PORT) -> Tuple[str, int]:
    """``host[:port]`` (IPv6 in brackets, ``[::1]:412``); without a port, ``default_port``,
    as a bare IPv6 address takes.  ``unix:PATH`` is a Unix socket, with no port of its own."""
    text = text.strip()
    path = unix_path(text)
    if path is not None:
        if not path:
            raise InvalidArgument("server %r names no socket file: write unix:PATH" % text)
        return text, default_port
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise InvalidArgument("server %r: an IPv6 address is written [::1]:412" % text)
        port_text = rest[1:] if rest else ""
    elif text.count(":") > 1:
        host, port_text = text, ""
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise InvalidArgument("server %r has no host" % text)
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InvalidArgument("server %r: the port must be a number from 1 to 65535" % text)
    return host, int(port_text)


def parse_servers(text: str, default_port: int = DEFAULT_PORT) -> List[str]:
    """A comma-separated ``host[:port]`` list as server names: "a,b:413" -> ["a:412", "b:413"]."""
    names = [address_text(*parse_server(item, default_port)) for item in text.split(",")]
    if len(set(names)) != len(names):
        raise InvalidArgument("a server is listed twice in %r" % text)
    return names


def parse_handle(text: str) -> LeaseHandle:
    """``host:port/id`` back into a LeaseHandle."""
    server, slash, id_text = text.strip().rpartition("/")
    lease_id = parse_lease_id(id_text) if slash else None
    if lease_id is None:
        raise InvalidArgument(
            "lease handle %r is not host:port/ID, e.g. a:412/%s or a:412/123" % (text, _EXAMPLE_ID)
        )
    return LeaseHandle(address_text(*parse_server(server)), lease_id)


_EXAMPLE_ID = "0b8e6c1a-5d8f-4e0c-9a47-2f1d3c5b7e90"


def parse_lease_id(text: str) -> Optional[Union[uuid.UUID, int]]:
    """A lease id's text: a UUID, or a short id's number; None when it is neither."""
    if text.isdigit():
        return int(text) if 0 < int(text) <= protocol.INT32_MAX else None
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


@functools.lru_cache(maxsize=256)
def _addresses(server: str) -> FrozenSet[Tuple[str, int]]:
    """The addresses a ``host:port`` name reaches; none if it does not resolve.  A Unix
    socket's is its file's real path."""
    host, port = parse_server(server)
    path = unix_path(host)
    if path is not None:
        return frozenset({(os.path.realpath(path), 0)})
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return frozenset()
    return frozenset((str(info[4][0]), int(info[4][1])) for info in found)


def same_server(one: str, other: str) -> bool:
    """Whether two ``host:port`` names reach the same server: spelled alike, or resolving
    to a shared address (``localhost:412`` and ``127.0.0.1:412``)."""
    if one == other:
        return True
    return bool(_addresses(one) & _addresses(other))


class ClusterStats(NamedTuple):
    """Counters summed over the servers that answered, each one's, and those down."""

    total: Dict[str, int]
    servers: Dict[str, Dict[str, int]]
    down: Dict[str, str]  # server: why


def _cluster_totals(each: Iterable[Dict[str, int]]) -> Dict[str, int]:
    """The servers' figures as one pool's: sums, the largest where a sum means nothing,
    and the fragmentation (per mille) of the summed free bytes outside the largest block."""
    total: Dict[str, int] = {}
    for counters in each:
        for name, value in counters.items():
            combine = max if name in _LARGEST_NOT_SUM else int.__add__
            total[name] = combine(total[name], value) if name in total else value
    if "fragmentation" in total:
        free, largest = total.get("free_bytes", 0), total.get("largest_free_block", 0)
        total["fragmentation"] = protocol.fragmentation(free, largest)
    return total


class _Server:
    """One server: its client, whether it is down, and its free bytes as last seen."""

    def __init__(self, name: str, client: MemLeaseClient) -> None:
        self.name = name
        self.client = client
        self.down_until = 0.0
        self.down_reason = ""
        self.free_bytes = 0
        self.stats_at = -float("inf")


class MemLeaseCluster:
    """Several servers used as one; shared by threads as safely as MemLeaseClient.

    Every method takes a LeaseHandle or its text.  ``lease`` raises OutOfMemory when no
    live server can hold the lease, MemLeaseConnectionError when none is reachable.
    """

    def __init__(
        self,
        servers: Sequence[str],
        *,
        timeout: Optional[float] = 5.0,
        token: Optional[Union[str, bytes]] = None,
        tls: Union[bool, ssl.SSLContext, None] = None,
        dead_timeout: float = DEFAULT_DEAD_TIMEOUT,
        stats_interval: float = DEFAULT_STATS_INTERVAL,
    ) -> None:
        if isinstance(servers, str):
            raise TypeError("servers must be a sequence of 'host:port'; see parse_servers()")
        names = parse_servers(",".join(servers))
        for name, value in (("dead_timeout", dead_timeout), ("stats_interval", stats_interval)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise InvalidArgument("%s must be a number of seconds >= 0" % name)
        self._servers: Dict[str, _Server] = {}
        for name in names:
            host, port = parse_server(name)
            client = MemLeaseClient(host, port, timeout=timeout, token=token, tls=tls)
            self._servers[name] = _Server(name, client)
        self.dead_timeout = dead_timeout
        self.stats_interval = stats_interval
        self._random = random.Random()
        self._lock = threading.Lock()  # guards the free-bytes estimates and down marks

    def __enter__(self) -> "MemLeaseCluster":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        for server in self._servers.values():
            server.client.close()

    @property
    def servers(self) -> List[str]:
        return list(self._servers)

    def lease(self, size: int, duration_ms: int = DEFAULT_DURATION_MS) -> LeaseHandle:
        """Lease ``size`` bytes on the best of two live servers, else on any that can."""
        call = lease_call(size, duration_ms)
        refusal: Optional[MemLeaseError] = None
        for server in self._placement():
            try:
                result = self._on(server, [call])[0]
            except MemLeaseConnectionError:
                continue
            if isinstance(result, (OutOfMemory, TooLarge)):
                refusal = result
                continue
            if isinstance(result, MemLeaseError):
                raise result
            self._note_leased(server, size)
            return LeaseHandle(server.name, result)
        if refusal is None:
            raise MemLeaseConnectionError("no server is up: %s" % self._down_text())
        # Every server refused: by quota if the last did, so the caller is told the cause.
        refused = QuotaExceeded if isinstance(refusal, QuotaExceeded) else OutOfMemory
        raise refused(
            "no live server can hold a lease of %d bytes (last refusal: %s)" % (size, refusal),
            refusal.status,
        )

    def set(self, handle: Handle, data: bytes, offset: int = 0, truncate: bool = False) -> None:
        """Write ``data`` at ``offset`` of the lease; see MemLeaseClient.set."""
        server, lease_id = self._locate(handle)
        self._one(server, set_call(lease_id, data, offset, truncate))

    def get(self, handle: Handle, offset: int = 0, length: Optional[int] = None) -> bytes:
        """The lease's bytes; see MemLeaseClient.get."""
        server, lease_id = self._locate(handle)
        return cast(bytes, self._one(server, get_call(lease_id, offset, length)))

    def renew(self, handle: Handle, duration_ms: int) -> None:
        server, lease_id = self._locate(handle)
        self._one(server, renew_call(lease_id, duration_ms))

    def release(self, handle: Handle) -> None:
        server, lease_id = self._locate(handle)
        self._one(server, release_call(lease_id))

    def ttl(self, handle: Handle) -> LeaseTTL:
        """The lease's time left, last duration and size; see MemLeaseClient.ttl."""
        server, lease_id = self._locate(handle)
        return cast(LeaseTTL, self._one(server, ttl_call(lease_id)))

    def renew_many(self, handles: Iterable[Handle], duration_ms: int) -> List[Handle]:
        """Renew the leases, one round trip to each server that holds some; returns the
        handles it could not renew, as given and in their order: ended leases, and every
        lease of a server that could not be reached."""
        given = list(handles)
        by_server: Dict[str, Tuple[_Server, List[Tuple[int, Union[uuid.UUID, int]]]]] = {}
        for index, handle in enumerate(given):
            server, lease_id = self._locate(handle)
            by_server.setdefault(server.name, (server, []))[1].append((index, lease_id))
        missed: List[int] = []
        for server, named in by_server.values():
            calls = renew_many_calls(named, duration_ms)
            try:
                results = self._on(server, calls)
            except MemLeaseConnectionError:
                missed.extend(index for index, _ in named)
                continue
            raise_first_error(results)
            missed.extend(index for indexes in results for index in indexes)
        return [given[index] for index in sorted(missed)]

    def leases(self, page_size: int = protocol.MAX_ROWS) -> Iterator[LeaseInfo]:
        """Your living leases on every server, a server after the other; each one's
        ``lease_id`` is its LeaseHandle.  A server that cannot be reached raises
        MemLeaseConnectionError when the listing comes to it."""
        return self._listing(checked_page_size(page_size))

    def keepalive(self, handle: Handle, release: bool = False) -> KeepAlive:
        """The lease renewed by a thread while a ``with`` block runs; see
        MemLeaseClient.keepalive."""
        server, lease_id = self._locate(handle)
        return KeepAlive(
            "lease " + str(LeaseHandle(server.name, lease_id)),
            functools.partial(self.ttl, handle),
            functools.partial(self.renew, handle),
            functools.partial(self.release, handle) if release else None,
        )

    def stats(self) -> ClusterStats:
        """Every live server's counters, and their sums; a server that fails is marked down."""
        each: Dict[str, Dict[str, int]] = {}
        for server in self._servers.values():
            try:
                each[server.name] = self._refresh(server)
            except MemLeaseConnectionError:
                continue
        down = {s.name: s.down_reason for s in self._servers.values() if s.name not in each}
        return ClusterStats(_cluster_totals(each.values()), each, down)

    def pipeline(self) -> "ClusterPipeline":
        """Calls sent together, one batch per server; results in call order."""
        return ClusterPipeline(self)

    def _listing(self, page_size: int) -> Iterator[LeaseInfo]:
        for server in self._servers.values():
            for info in listing(functools.partial(self._one, server), page_size):
                yield info._replace(lease_id=LeaseHandle(server.name, info.lease_id))

    def _locate(self, handle: Handle) -> Tuple[_Server, Union[uuid.UUID, int]]:
        if isinstance(handle, str):
            handle = parse_handle(handle)
        elif not isinstance(handle, LeaseHandle):
            raise TypeError(
                "a lease is named by a LeaseHandle or its text 'host:port/ID', not %s"
                % type(handle).__name__
            )
        server = self._servers.get(handle.server) or next(
            (s for name, s in self._servers.items() if same_server(name, handle.server)), None
        )
        if server is None:
            raise InvalidArgument(
                "lease %s is on %s, which is not one of this cluster's servers (%s)"
                % (handle, handle.server, ", ".join(self._servers))
            )
        return server, handle.lease_id

    def _one(self, server: _Server, call: Call) -> Any:
        result = self._on(server, [call])[0]
        if isinstance(result, MemLeaseError):
            raise result
        return result

    def _on(self, server: _Server, calls: Sequence[Call]) -> List[Any]:
        """The calls' results from one server; fails at once while it is marked down."""
        now = time.monotonic()
        if now < server.down_until:
            raise MemLeaseConnectionError(
                "%s is marked down for %.1fs more: %s"
                % (server.name, server.down_until - now, server.down_reason)
            )
        try:
            return server.client._request(calls)
        except MemLeaseConnectionError as exc:
            with self._lock:
                server.down_until = time.monotonic() + self.dead_timeout
                server.down_reason = str(exc)
            raise

    def _live(self) -> List[_Server]:
        now = time.monotonic()
        return [server for server in self._servers.values() if now >= server.down_until]

    def _placement(self) -> Iterator[_Server]:
        """Servers to try for a new lease: the better of two random ones, the other, the rest
        by free bytes.  Free bytes come from stats at most ``stats_interval`` old."""
        live = self._live()
        pair = [s for s in self._random.sample(live, min(2, len(live))) if self._stats_fresh(s)]
        pair.sort(key=lambda server: server.free_bytes, reverse=True)
        rest = sorted(
            (server for server in live if server not in pair),
            key=lambda server: server.free_bytes,
            reverse=True,
        )
        for server in pair + rest:
            if time.monotonic() >= server.down_until:
                yield server

    def _stats_fresh(self, server: _Server) -> bool:
        """Refresh the server's stats if stale; False if it failed to answer."""
        if time.monotonic() - server.stats_at >= self.stats_interval:
            try:
                self._refresh(server)
            except MemLeaseConnectionError:
                return False
        return True

    def _refresh(self, server: _Server) -> Dict[str, int]:
        stats = cast(Dict[str, int], self._one(server, stats_call()))
        with self._lock:
            server.free_bytes = stats.get("free_bytes", 0)
            server.stats_at = time.monotonic()
        return stats

    def _note_leased(self, server: _Server, size: int) -> None:
        """Count a new lease against the server's free bytes until its next stats."""
        with self._lock:
            server.free_bytes -= size

    def _down_text(self) -> str:
        return "; ".join(
            "%s (%s)" % (server.name, server.down_reason) for server in self._servers.values()
        )


class ClusterPipeline:
    """Cluster calls sent by ``execute()`` as one pipeline per server.

    A lease is placed on the better of two servers when ``execute()`` runs; a refusal is
    its result (there is no second try inside a pipeline).  Results come in call order: a
    failed call's is its MemLeaseError, or with ``raise_on_error`` the first one is raised
    once every server has answered.
    """

    def __init__(self, cluster: MemLeaseCluster) -> None:
        self._cluster = cluster
        self._queued: List[Tuple[Optional[_Server], Call]] = []  # None: a lease, not placed yet

    def __enter__(self) -> "ClusterPipeline":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._queued.clear()

    def __len__(self) -> int:
        return len(self._queued)

    def lease(self, size: int, duration_ms: int = DEFAULT_DURATION_MS) -> "ClusterPipeline":
        self._queued.append((None, lease_call(size, duration_ms)))
        return self

    def set(
        self, handle: Handle, data: bytes, offset: int = 0, truncate: bool = False
    ) -> "ClusterPipeline":
        server, lease_id = self._cluster._locate(handle)
        self._queued.append((server, set_call(lease_id, data, offset, truncate)))
        return self

    def get(
        self, handle: Handle, offset: int = 0, length: Optional[int] = None
    ) -> "ClusterPipeline":
        server, lease_id = self._cluster._locate(handle)
        self._queued.append((server, get_call(lease_id, offset, length)))
        return self

    def renew(self, handle: Handle, duration_ms: int) -> "ClusterPipeline":
        server, lease_id = self._cluster._locate(handle)
        self._queued.append((server, renew_call(lease_id, duration_ms)))
        return self

    def release(self, handle: Handle) -> "ClusterPipeline":
        server, lease_id = self._cluster._locate(handle)
        self._queued.append((server, release_call(lease_id)))
        return self

    def ttl(self, handle: Handle) -> "ClusterPipeline":
        server, lease_id = self._cluster._locate(handle)
        self._queued.append((server, ttl_call(lease_id)))
        return self

    def execute(self, raise_on_error: bool = True) -> List[Any]:
        queued, self._queued = self._queued, []
        cluster = self._cluster
        batches: Dict[str, List[int]] = {}
        placed: List[_Server] = []
        for index, (server, call) in enumerate(queued):
            if server is None:
                server = next(cluster._placement(), None)
                if server is None:
                    raise MemLeaseConnectionError("no server is up: %s" % cluster._down_text())
                cluster._note_leased(server, call.request.size)  # type: ignore[union-attr]
            placed.append(server)
            batches.setdefault(server.name, []).append(index)
        results: List[Any] = [None] * len(queued)
        for indexes in batches.values():
            server = placed[indexes[0]]
            try:
                answers = cluster._on(server, [queued[index][1] for index in indexes])
            except MemLeaseConnectionError as exc:
                answers = [exc] * len(indexes)
            for index, answer in zip(indexes, answers):
                leased = queued[index][0] is None and not isinstance(answer, MemLeaseError)
                results[index] = LeaseHandle(server.name, answer) if leased else answer
        if raise_on_error:
            raise_first_error(results)
        return results
