"""One client connection as a state machine: bytes in, replies out, no socket in sight.

The server's event loop moves bytes between a socket and a :class:`Connection`; all
the protocol logic is here, so it can be driven and tested without a socket:

- ``receive(data)`` takes bytes; every whole request is answered into the output.
- A large write streams: ``receive_buffer()`` names where the next bytes of its data go
  (so the socket can ``recv_into`` it) and ``received_into(n)`` counts them.
- ``outgoing()`` lists what is to be sent and ``sent(n)`` drops what went out.  A large
  read is sent straight from the pool (its block is pinned until then), not copied.
- Past ``HIGH_WATER`` unsent bytes no more requests are answered and ``wants_input``
  turns false, so a client that does not read its replies cannot grow our memory.
- A write to a lease whose bytes another connection is still sending from the pool waits,
  in order, until they have gone (``wake`` tells the loop when it can go on), so every
  reply shows the lease at one moment.
- A stats request in a storm of expiries waits, in order, for a census that counts the
  ended leases over a few turns (``Service.count_more``), so no turn stalls for long.
"""

import collections
import logging
import mmap
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple, Union

import protocol
from memlease import security
from memlease.census import Census
from memlease.store import EXPIRY_SLICE, LeaseStore, Pin
from memlease.units import format_size

log = logging.getLogger("memlease")

HIGH_WATER = 256 * 1024  # unsent bytes past which requests wait in the decoder
# Requests answered for one connection before the others get a turn: a client that
# pipelines thousands of requests in one read must not hold up everyone else.
TURN_BUDGET = 128
MAX_MAP_CELLS = 4096  # a map's cost grows with its cells: more are not drawn
CENSUS_STEP = 4096  # table positions a census looks at per turn (about 0.5 ms)
Buffer = Union[bytes, bytearray, memoryview]
StatsAnswer = Callable[[Dict[str, int]], None]


class Service:
    """What all connections share: the store, the limits, the tokens and the counters."""

    def __init__(
        self,
        store: LeaseStore,
        *,
        max_data: int = protocol.INT32_MAX,
        token: Optional[bytes] = None,
        tenants: Optional[security.Tenants] = None,
        allow: Optional[security.AllowList] = None,
        short_ids: bool = True,
    ) -> None:
        self.store = store
        # Whether the original's id-bearing messages are served (see --no-short-ids).
        self.short_ids = short_ids
        self.max_data = max_data  # larger writes are read, dropped and answered TOO_LARGE
        # Who may connect: the tenants' tokens; with none, the peers in ``allow``.
        if tenants is None and token is not None:
            tenants = security.Tenants.single(token)
        self.tenants = tenants
        self.allow = allow or security.AllowList.parse(security.LOOPBACK)
        self.wrong_tokens = security.Backoff()
        self.guessers = security.RateLimiter(security.GUESSING_CLOSES_PER_MINUTE)
        self.warnings = security.LogLimiter(log)
        self.log_requests = log.isEnabledFor(logging.INFO)
        # (message type, status) -> requests answered so (see request_counts).
        self.requests: Dict[Tuple[int, int], int] = collections.defaultdict(int)
        # message type -> small requests answered OK in one pass (LeaseStore.serve).
        self.served = [0] * (max(protocol.SMALL_REQUESTS) + 1)
        self.counters = dict.fromkeys(
            (
                "total_connections",
                "connections_refused",
                "bytes_received",
                "bytes_sent",
                "auth_failures",
                "auth_answers_delayed",  # wrong tokens answered late: the source kept guessing
                "connections_closed_guessing",
                "connections_refused_guessing",
                "connections_refused_protected",
            ),
            0,
        )
        self.connections: Callable[[], int] = lambda: 0  # the server tells how many are open
        self.expiry_lag = 0.0  # seconds the last expiry pass ran after its time
        # Unfinished uploads may hold as much as the pool, and 64 MiB at least.
        self.staging = StagingBuffers(max(store.capacity, 64 << 20))
        # lease id -> connections whose write waits until that lease's stream has gone
        self.waiting: Dict[bytes, List[Connection]] = {}
        self._started = time.monotonic()
        self._census: Optional[Census] = None  # under way, over more than one turn
        self._counted_for: List[Tuple[Optional[int], StatsAnswer]] = []  # its askers
        self._to_count: List[Tuple[Optional[int], StatsAnswer]] = []  # asked since it began
        self.census_begun: Callable[[], None] = _nothing  # the loop's: call count_more soon

    def stats(self, tenant: Optional[int]) -> Dict[str, int]:
        """The counters a Stats request gets: the store's (the tenant's own use) and ours,
        counted now in one go (see ``figures`` for the way that never stalls a turn)."""
        return self._with_ours(self.store.stats(tenant), tenant)

    def figures(self, tenant: Optional[int], answer: StatsAnswer) -> None:
        """Call ``answer`` with ``stats(tenant)`` of a moment after this call: at once,
        or, when more ended leases wait for the reaper than a turn may count (a storm of
        expiries), once a census has counted them over the next turns (``count_more``)."""
        self._to_count.append((tenant, answer))
        if self._census is None:
            self._begin_census()

    def count_more(self) -> bool:
        """Count a step of the census under way, answering its askers once it is done;
        True while a census is still under way (then call again on the next turn)."""
        census = self._census
        if census is None:
            return False
        try:
            done = census.step(CENSUS_STEP)
        except BaseException:  # not stuck on it: the next asker begins a census, for them too
            self._census = None
            self._to_count[:0] = self._counted_for
            raise
        if done:
            self._census = None
            self._answer_census(census, self._counted_for)
            if self._to_count and self._census is None:
                self._begin_census()
        return self._census is not None

    def _begin_census(self) -> None:
        """A census of this moment for everyone who has asked since the last one began."""
        census = self.store.census()
        askers, self._to_count = self._to_count, []
        if census.step(CENSUS_STEP):
            self._answer_census(census, askers)
            return
        self._census, self._counted_for = census, askers
        self.census_begun()

    def _answer_census(
        self, census: Census, askers: List[Tuple[Optional[int], StatsAnswer]]
    ) -> None:
        """Give each asker its figures; one whose answer fails costs only itself (its
        connection then waits for its timeout), never the askers after it."""
        for tenant, answer in askers:
            try:
                answer(self._with_ours(census.stats(tenant), tenant))
            except Exception:
                log.error("answering a stats request failed", exc_info=True)

    def _with_ours(self, stats: Dict[str, int], tenant: Optional[int]) -> Dict[str, int]:
        """The store's figures, with the service's own beside them."""
        stats["tenant_quota"] = 0 if tenant is None else self.quota(tenant)
        stats["connections"] = self.connections()
        stats.update(self.counters)
        stats["log_lines_suppressed"] = self.warnings.suppressed
        stats["uptime"] = int(time.monotonic() - self._started)
        return stats

    def request_counts(self) -> Dict[Tuple[str, int], int]:
        """Requests answered so far, by command name and status, for the metrics."""
        counts = collections.Counter(self.requests)
        for msg_type, count in enumerate(self.served):
            if count:
                counts[msg_type, protocol.OK] += count
        return {
            (protocol.TYPE_NAMES[msg_type], status): count
            for (msg_type, status), count in counts.items()
        }

    def authenticate(self, token: Optional[bytes]) -> Optional[int]:
        """The tenant a connection presenting ``token`` acts as, or None when refused.

        With no token configured every connection is tenant 0 without presenting one.
        """
        if self.tenants is None:
            return 0
        return None if token is None else self.tenants.authenticate(token)

    def tenant_name(self, tenant: int) -> str:
        return "default" if self.tenants is None else self.tenants.name(tenant)

    def quota(self, tenant: int) -> int:
        """The most block bytes ``tenant`` may hold at once; 0 means no limit."""
        return 0 if self.tenants is None else self.tenants.quota(tenant)

    def refusal(self, address: object) -> Optional[Tuple[str, str]]:
        """Why a new connection from ``address`` is turned away unheard (the counter, the
        reason), or None."""
        if self.tenants is None and not self.allow.allows(address):
            return "connections_refused_protected", (
                "no token is set, so only %s may connect (protected mode); to serve it, set "
                "a token (--token-file or $MEMLEASE_TOKEN) or widen --allow" % self.allow
            )
        # An empty limiter (no host has guessed yet) has nothing to look up.
        if self.guessers and not self.guessers.allowed(security.source_of(address)):
            return "connections_refused_guessing", (
                "its connections kept asking for lease ids that do not exist; it may try "
                "again in a minute"
            )
        return None

    def warn(self, kind: str, peer: object, message: str, *args: object) -> None:
        """Log a warning, unless ``peer``'s host already had its share of this kind."""
        self.warnings.warning(kind, security.source_of(peer), message, *args)

    def stream_sent(self, lease_id: bytes) -> None:
        """A reply streamed from ``lease_id``'s block has gone: once none is left, the
        writes waiting for it go on, in the order they came."""
        waiters = self.waiting.get(lease_id)
        if waiters is None or self.store.streaming(lease_id):
            return
        del self.waiting[lease_id]
        for conn in waiters:
            conn.stream_done()

    def stop_waiting(self, lease_id: bytes, conn: "Connection") -> None:
        waiters = self.waiting.get(lease_id, [])
        if conn in waiters:
            waiters.remove(conn)
        if not waiters:
            self.waiting.pop(lease_id, None)


class StagingBuffers:
    """Receive buffers for large writes, kept for reuse so that their pages stay mapped.

    A fresh mapping costs a page fault per page on first touch, which would halve the
    speed of a large set; up to ``keep_bytes`` of finished buffers are kept instead.
    A kept buffer's old bytes are never read: an upload reads only what it received.
    At most ``limit`` bytes are lent out at once, so unfinished uploads on many
    connections cannot take more memory than that.
    """

    def __init__(self, limit: int, keep_bytes: int = 64 << 20) -> None:
        self.limit = limit
        self.keep_bytes = keep_bytes
        self.lent = 0
        self._free: Dict[int, List[mmap.mmap]] = collections.defaultdict(list)
        self._kept = 0

    def take(self, length: int) -> Optional[mmap.mmap]:
        """A buffer for ``length`` bytes, or None while the lent ones fill the limit."""
        size = 1 << (length - 1).bit_length()
        if self.lent + size > self.limit:
            return None
        self.lent += size
        free = self._free[size]
        if free:
            self._kept -= size
            return free.pop()
        return mmap.mmap(-1, size)

    def give(self, buffer: mmap.mmap) -> None:
        """Take ``buffer`` back: keep it for the next upload, or let it be unmapped."""
        self.lent -= len(buffer)
        if self._kept + len(buffer) <= self.keep_bytes:
            self._free[len(buffer)].append(buffer)
            self._kept += len(buffer)


class _Upload:
    """A large write being received into a staging buffer, applied all at once."""

    __slots__ = ("frame", "buffer", "view", "received")

    def __init__(self, frame: protocol.DataFrame, buffer: mmap.mmap) -> None:
        self.frame = frame
        self.buffer = buffer
        self.view = memoryview(buffer)[: frame.length]
        self.received = 0


class Connection:
    """The protocol side of one connection; see the module's docstring."""

    def __init__(self, service: Service, peer: object) -> None:
        self.service = service
        self.store = service.store
        self.peer = peer
        self.tenant = service.authenticate(None)
        self._quota = 0 if self.tenant is None else service.quota(self.tenant)
        self.closing = False  # nothing more is read or answered; close once flushed
        self.input_done = False  # nothing more is read; close once all is answered
        self.output_size = 0
        self.answered = 0  # requests answered so far
        self.misses = 0  # of them, for short lease ids that do not exist (or not this tenant's)
        self.held_until = 0.0  # time.monotonic() before which no reply may be sent
        self._decoder = protocol.request_decoder()
        self._out: Deque[Tuple[Buffer, Optional[Pin]]] = collections.deque()
        self._small = bytearray()  # small replies, joined until they are sent
        self._upload: Optional[_Upload] = None
        self.uploading = False  # a large write's data is being received: see receive_buffer
        self._paused = False  # requests wait in the decoder until the output drains
        self._views_queued = 0  # replies queued as views of the pool, not yet sent
        self._yielded = False  # requests wait in the decoder for the next turn
        self._waiting_on: Optional[bytes] = None  # a write waits for this lease's stream
        self._held: Any = None  # the small write that waits (a large one is self._upload)
        self._counting = False  # a stats request waits for its census (Service.figures)
        self._count_waited = False  # ... and it could not be answered in its own turn
        self._map_by: Optional[int] = None  # a held pool map reclaims leases ended by then
        self._closed = False
        self.wake: Callable[[], None] = _nothing  # the loop's: come back to this connection

    # Input.

    @property
    def wants_input(self) -> bool:
        """Whether to read more: not while replies or whole requests are backed up."""
        return (
            not (self.closing or self.input_done or self._yielded or self._paused)
            and self._waiting_on is None
            and not self._counting
            and self.output_size < HIGH_WATER
        )

    @property
    def in_frame(self) -> bool:
        """Whether a request has begun to arrive and is not whole yet."""
        return self._decoder.in_frame

    def receive(self, data: bytes) -> None:
        """Bytes from the peer; answers every whole request they complete."""
        self._decoder.feed(data)
        self._process()

    def receive_buffer(self) -> Optional[memoryview]:
        """Where the next bytes of a large write go, or None: then use ``receive``."""
        upload = self._upload
        if upload is None or self._decoder.buffered:
            return None
        start = upload.received
        return upload.view[start : start + self._decoder.payload_left]

    def received_into(self, n: int) -> None:
        """Count ``n`` bytes received into ``receive_buffer()``."""
        assert self._upload is not None
        self._decoder.payload_received(n)
        self._upload.received += n
        self._process()

    def end_of_input(self) -> None:
        """The peer will send nothing more: answer what is whole, then close."""
        self.stop()

    def stop(self) -> None:
        """Take no more input; answer every request already whole, then close.

        The answering keeps to the high water and the turn's budget as ever: the rest
        of the requests are answered as the replies drain (see ``sent`` and ``resume``).
        """
        if self.input_done:
            return
        self.input_done = True
        if self._waiting_on is None:
            self._drop_upload()  # not whole: it will never be (a whole one waits to land)
        self._process()

    # Output.

    def outgoing(self) -> List[Buffer]:
        """The buffers to send next, in order (a prefix of the output)."""
        if self._small:
            if not self._out:
                return [self._small]
            self._out.append((self._small, None))
            self._small = bytearray()
        return [entry[0] for entry in _first(self._out, 64)]

    def sent(self, n: int) -> None:
        """Drop the first ``n`` bytes of the output; they reached the socket."""
        self.output_size -= n
        out = self._out
        if not out:
            del self._small[:n]
        while n and out:
            buffer, pin = out[0]
            if n < len(buffer):
                out[0] = (memoryview(buffer)[n:], pin)
                break
            n -= len(buffer)
            out.popleft()
            if pin is not None:
                self._views_queued -= 1
                self._let_go(pin)
        if self._paused and self.output_size < HIGH_WATER and not self._views_queued:
            self._process()

    def close(self) -> None:
        """Let go of everything held for this connection: pinned blocks, a partial write,
        and the loop's callback (so the channel goes as soon as it is dropped)."""
        self.closing = self._closed = True
        self.wake = _nothing
        if self._waiting_on is not None:
            self.service.stop_waiting(self._waiting_on, self)
            self._waiting_on = None
        self._held = None
        self._drop_upload()
        pins = [pin for _, pin in self._out if pin is not None]
        self._out.clear()
        for pin in pins:
            self._let_go(pin)
        self._views_queued = 0
        self._small = bytearray()
        self.output_size = 0

    # Requests.

    @property
    def has_backlog(self) -> bool:
        """Whether whole requests wait for the next turn (see ``resume``)."""
        return self._yielded and not self.closing

    def resume(self) -> None:
        """Answer more of the requests left waiting when a turn's budget ran out."""
        if self._yielded and not self._paused:
            self._process()

    def stream_done(self) -> None:
        """The stream this connection's write waited for has gone: land it, go on."""
        self._waiting_on = None
        if not self.closing:
            self._process()
        self.wake()

    def _process(self) -> None:
        next_message = self._decoder.next_message
        self._paused = self._yielded = False
        budget_end = self.answered + TURN_BUDGET
        one_pass = True  # the common small requests first: again after each other request
        while not self.closing:
            # A reply sent from the pool must be out before a later request can change
            # the lease: replies on one connection show the lease in request order.
            if self.output_size >= HIGH_WATER or self._views_queued:
                self._paused = True  # sent() resumes once the output drains
                return
            if self.answered >= budget_end or self._yielded:
                self._yielded = True  # the loop calls resume() on its next turn
                return
            if self._waiting_on is not None:
                return  # stream_done() goes on
            if self._counting:
                return  # _stats_counted() goes on
            held = self._held
            if held is not None:
                self._held = None
                _ANSWERS[type(held)](self, held)
                one_pass = True
                continue
            if self._upload is not None:
                if not self._continue_upload():
                    return
                one_pass = True
            if one_pass:
                one_pass = False
                if self.tenant is not None and not self.service.log_requests:
                    self._answer_small(budget_end)
                    if not self._decoder.buffered:  # all answered: nothing waits
                        if self.input_done:
                            self.closing = True
                        return
                    continue  # it stopped at the limits, or at a request it leaves below
            try:
                message = next_message()
            except protocol.BadFrame as exc:
                self.service.warn("frame", self.peer, "%s bad frame, closing: %s", self.peer, exc)
                self._reply(protocol.Error(exc.status, exc.msg_type).encode())
                self.closing = True
                return
            except protocol.BadMessage as exc:
                self.service.warn("message", self.peer, "%s bad message: %s", self.peer, exc)
                self._reply(protocol.Error(exc.status, exc.msg_type).encode())
                one_pass = True
                continue
            if message is None:
                if self.input_done:
                    self.closing = True  # all that was whole is answered
                return
            kind = type(message)
            if self.tenant is None and kind is not protocol.Auth:
                self._refuse_unauthenticated(message)
            else:
                _ANSWERS[kind](self, message)
            one_pass = True

    def _answer_small(self, budget_end: int) -> None:
        """Answer the common small requests at the head of the input in one pass, straight
        from the store, up to the first that needs more than that (LeaseStore.serve says
        which), the turn's budget or the high water.

        Each is answered and counted as its own method would, but with no message object:
        the methods below handle everything else.  It is not used while requests are
        logged, nor before a connection that needs a token has presented one.
        """
        service = self.service
        out = self._small
        before = len(out)
        decoder = self._decoder
        requests = decoder.small_requests()
        try:
            answered = self.store.serve(
                requests,
                decoder.buffer,
                out,
                service.served,
                self.tenant or 0,
                self._quota,
                service.short_ids,
                service.max_data,
                budget_end - self.answered,
                HIGH_WATER - self.output_size,
            )
        finally:
            requests.close()  # the pass is over: the decoder records what it consumed
        self.output_size += len(out) - before
        self.answered += answered

    def _refuse_unauthenticated(self, request: Any) -> None:
        """Answer a request made before authenticating with Error UNAUTHORIZED."""
        if type(request) is protocol.DataFrame:
            self._decoder.skip_payload()  # the large write's data follows: drop it unread
        status = protocol.UNAUTHORIZED
        msg_type = _type_of(request)
        self._finish(msg_type, request, protocol.Error(status, msg_type), status)

    def _finish(self, msg_type: int, request: object, reply: protocol.Reply, status: int) -> None:
        """Queue ``reply``, count the request by its type and ``status``, and log it."""
        self._reply(reply.encode())
        self._account(msg_type, request, status, reply)

    def _status(self, msg_type: int, request: object, status: int) -> None:
        """Answer with a status reply (DataSet), already encoded: most requests get one."""
        reply = protocol.STATUS_REPLIES[status]
        self._small += reply
        self.output_size += len(reply)
        self._account(msg_type, request, status, None)

    def _account(self, msg_type: int, request: object, status: int, reply: object) -> None:
        """Count a request answered, by type and status, and log it; ``reply`` describes
        the answer in the log (None: the status says it all)."""
        self.answered += 1
        self.service.requests[msg_type, status] += 1
        if status == protocol.NOT_FOUND and _names_short_id(request):
            self.misses += 1
            if security.guessing(self.misses, self.answered):
                self._close_guessing()
        if self.service.log_requests:
            log.info(
                "%s %s -> %s",
                self.peer,
                _describe_request(msg_type, request),
                _describe(reply, status),
            )

    def _reply(self, data: Buffer) -> None:
        self._small += data
        self.output_size += len(data)

    def _reply_view(self, view: memoryview, pin: Pin) -> None:
        """Queue ``view`` of the pool as it is; ``pin`` is let go once it is sent."""
        if self._small:
            self._out.append((self._small, None))
            self._small = bytearray()
        self._out.append((view, pin))
        self._views_queued += 1
        self.output_size += len(view)

    def _lease(self, message: protocol.Lease) -> None:
        if not self.service.short_ids:
            self._refuse_short(message, protocol.Leased(protocol.SHORT_IDS_OFF))
            return
        tenant = self.tenant or 0
        granted = self.store.lease(
            message.size, message.duration_ms, tenant, self.service.quota(tenant), short_id=True
        )
        if granted == protocol.OVER_QUOTA:
            self._refuse_quota(protocol.LEASE, message, protocol.Leased(granted).encode())
        elif isinstance(granted, int):
            self._finish(protocol.LEASE, message, protocol.Leased(granted), granted)
        else:
            reply = protocol.Leased(self.store.short_id(granted))
            self._finish(protocol.LEASE, message, reply, protocol.OK)

    def _grant(self, message: protocol.Grant) -> None:
        tenant = self.tenant or 0
        granted = self.store.lease(
            message.size, message.duration_ms, tenant, self.service.quota(tenant)
        )
        if granted == protocol.OVER_QUOTA:
            self._refuse_quota(protocol.GRANT, message, protocol.STATUS_REPLIES[granted])
        elif isinstance(granted, int):
            self._status(protocol.GRANT, message, granted)
        else:
            self._finish(protocol.GRANT, message, protocol.Granted(granted), protocol.OK)

    def _refuse_quota(self, msg_type: int, message: Any, reply: bytes) -> None:
        """Answer a lease over the tenant's quota, logged with the figures it needs."""
        tenant = self.tenant or 0
        self._reply(reply)
        self._account(
            msg_type,
            message,
            protocol.OVER_QUOTA,
            "refused (over the quota of tenant %s: quota %s, held %s, asked %s)"
            % (
                self.service.tenant_name(tenant),
                format_size(self.service.quota(tenant)),
                format_size(self.store.tenant_usage(tenant)[0]),
                format_size(message.size),
            ),
        )

    def _refuse_short(self, request: Any, reply: protocol.Reply) -> None:
        """Answer one of the original's id-bearing messages on a server without short ids."""
        self.service.warn(
            "short-ids",
            self.peer,
            "%s sent a C++ client's %s: refused, the server runs with --no-short-ids",
            self.peer,
            protocol.TYPE_NAMES[_type_of(request)],
        )
        self._finish(_type_of(request), request, reply, protocol.SHORT_IDS_OFF)

    def _set(self, message: protocol.SetData) -> None:
        if not self.service.short_ids:
            self._refuse_short(message, protocol.DataSet(protocol.SHORT_IDS_OFF))
            return
        key = protocol.short_form(message.lease_id)
        if self._must_wait(key):
            self._held = message
            return
        status = self._write_data(key, 0, message.data, zero_rest=False)
        self._status(protocol.SET_DATA, message, status)

    def _replace(self, message: protocol.Replace) -> None:
        if self._must_wait(message.lease_id):
            self._held = message
            return
        status = self._write_data(message.lease_id, 0, message.data, zero_rest=True)
        self._status(protocol.REPLACE, message, status)

    def _write(self, message: protocol.Write) -> None:
        if self._must_wait(message.lease_id):
            self._held = message
            return
        status = self._write_data(message.lease_id, message.offset, message.data, zero_rest=False)
        self._status(protocol.WRITE, message, status)

    def _must_wait(self, lease_id: bytes) -> bool:
        """Whether a write to the lease must wait: its bytes are being sent from the pool
        (to another connection: this one sends a stream before it reads on).  If so, the
        connection waits, in order, until Service.stream_sent calls stream_done."""
        if not self.store.streaming(lease_id):
            return False
        self._waiting_on = lease_id
        self.service.waiting.setdefault(lease_id, []).append(self)
        return True

    def _let_go(self, pin: Pin) -> None:
        """Unpin a streamed reply's block, and let the writes waiting for it go on."""
        self.store.unpin(pin)
        self.service.stream_sent(pin.lease_id)

    def _write_data(self, lease_id: bytes, offset: int, data: Buffer, zero_rest: bool) -> int:
        if len(data) > self.service.max_data:
            return protocol.TOO_LARGE
        return self.store.write(lease_id, offset, data, self.tenant or 0, zero_rest)

    def _access(self, message: protocol.AccessData) -> None:
        if message.lease_id == protocol.PROBE_ID:  # a client asks which server this is
            reply = protocol.Data(protocol.PROBE_ID, protocol.PROBE_TEXT)
            self._finish(protocol.ACCESS_DATA, message, reply, protocol.OK)
            return
        if not self.service.short_ids:
            error = protocol.Error(protocol.SHORT_IDS_OFF, protocol.ACCESS_DATA)
            self._refuse_short(message, error)
            return
        key = protocol.short_form(message.lease_id)
        status, view = self.store.read(key, 0, -1, self.tenant or 0)
        if status != protocol.OK:  # the original answers an unknown lease with no data
            reply = protocol.Data(message.lease_id, b"")
            self._finish(protocol.ACCESS_DATA, message, reply, protocol.NOT_FOUND)
            return
        self._send_data(protocol.ACCESS_DATA, message, message.lease_id, key, view)

    def _read(self, message: protocol.Read) -> None:
        key = message.lease_id
        status, view = self.store.read(key, message.offset, message.length, self.tenant or 0)
        if status != protocol.OK:
            self._status(protocol.READ, message, status)
            return
        self._send_data(protocol.READ, message, self.store.short_id(key), key, view)

    def _send_data(
        self, msg_type: int, request: object, reply_id: int, key: bytes, view: memoryview
    ) -> None:
        """Answer with a Data reply carrying ``reply_id``: small data copied into the
        output, large data sent from the pool, whose block (the lease ``key``) stays
        pinned until then."""
        length = len(view)
        self._small += protocol.data_head(reply_id, length)
        self.output_size += protocol.DATA_HEAD_SIZE
        if length < protocol.STREAM_MIN:
            self._small += view
            self.output_size += length
        else:
            self._reply_view(view, self.store.pin(key))
        self._account(msg_type, request, protocol.OK, view)

    def _renew(self, message: protocol.Renew) -> None:
        status = self.store.renew(message.lease_id, message.duration_ms, self.tenant or 0)
        self._status(protocol.RENEW, message, status)

    def _release(self, message: protocol.Release) -> None:
        status = self.store.release(message.lease_id, self.tenant or 0)
        self._status(protocol.RELEASE, message, status)

    def _ttl(self, message: protocol.TimeToLive) -> None:
        reply = self.store.ttl(message.lease_id, self.tenant or 0)
        if reply is None:
            self._status(protocol.TIME_TO_LIVE, message, protocol.NOT_FOUND)
        else:
            self._finish(protocol.TIME_TO_LIVE, message, reply, protocol.OK)

    def _list_leases(self, message: protocol.ListLeases) -> None:
        if message.cursor < 0 or message.limit <= 0:
            self._status(protocol.LIST_LEASES, message, protocol.INVALID)
            return
        limit = min(message.limit, protocol.MAX_ROWS)
        rows, cursor = self.store.leases(self.tenant or 0, message.cursor, limit)
        self._finish(
            protocol.LIST_LEASES, message, protocol.LeaseList(cursor, tuple(rows)), protocol.OK
        )

    def _renew_many(self, message: protocol.RenewMany) -> None:
        """Renew each lease named; the reply lists those that are not (or not any more).

        Each short id among them weighs as a request of its own against guessing: one
        RenewMany must not try a thousand guesses for the price of one.
        """
        if message.duration_ms <= 0:
            self._status(protocol.RENEW_MANY, message, protocol.INVALID)
            return
        renew, tenant = self.store.renew, self.tenant or 0
        missed = tuple(
            lease_id
            for lease_id in message.lease_ids
            if renew(lease_id, message.duration_ms, tenant) != protocol.OK
        )
        reply = protocol.RenewManyReply(missed)
        self._finish(protocol.RENEW_MANY, message, reply, protocol.OK)
        short_misses = sum(protocol.short_id_in(lease_id) is not None for lease_id in missed)
        if short_misses:
            self.answered += sum(protocol.short_id_in(i) is not None for i in message.lease_ids)
            self.misses += short_misses
            if security.guessing(self.misses, self.answered):
                self._close_guessing()

    def _stats(self, message: protocol.Stats) -> None:
        self._counting = True
        self.service.figures(self.tenant, lambda stats: self._stats_counted(message, stats))
        self._count_waited = self._counting  # not answered yet: answered on a later turn

    def _stats_counted(self, message: protocol.Stats, stats: Dict[str, int]) -> None:
        """The census has counted: answer, and go on if the requests behind waited."""
        if self._closed:  # nobody to answer
            return
        waited, self._counting, self._count_waited = self._count_waited, False, False
        self._finish(protocol.STATS, message, protocol.StatsReply(stats), protocol.OK)
        if waited:
            # The requests behind go on at the loop's next turn (resume), not in here: this
            # runs inside Service.count_more, where they could ask for figures again and
            # where a failure would strand every other asker instead of closing this one.
            self._yielded = True
            self.wake()

    def _pool_map(self, message: protocol.PoolMap) -> None:
        # The map shows free blocks: ended leases' must be among them.  They are reclaimed
        # a reaper's slice a turn, the request waiting in order until none is left.
        # Only those ended by the moment it was asked: leases that keep ending faster than a
        # slice a turn must not hold it for as long as they do.
        if self._map_by is None:
            self._map_by = self.store.now_ms()
        if not self.store.reclaim_due(EXPIRY_SLICE, self._map_by):
            self._held = message
            self._yielded = True  # the loop calls resume() on its next turn
            return
        self._map_by = None
        cells = min(max(message.cells, 1), MAX_MAP_CELLS)
        # The free lists as they are, as the cells and free blocks show them (stats would
        # count the leases that ended since as free too).
        allocator = self.store.allocator
        free, largest = allocator.free_bytes, allocator.largest_free
        reply = protocol.PoolMapReply(
            self.store.capacity,
            free,
            largest,
            protocol.fragmentation(free, largest),
            tuple(self.store.usage_by_cell(cells)),
            tuple(sorted(self.store.free_blocks().items())),
        )
        self._finish(protocol.POOL_MAP, message, reply, protocol.OK)

    def _auth(self, message: protocol.Auth) -> None:
        service = self.service
        tenant = service.authenticate(message.token)  # always compared: the right one gets in
        if tenant is None:
            delay = service.wrong_tokens.failed(security.source_of(self.peer))
            if delay:  # its host keeps guessing: the answer waits, and this connection with it
                service.counters["auth_answers_delayed"] += 1
                self.held_until = time.monotonic() + delay
            service.warn(
                "auth",
                self.peer,
                "%s presented a wrong token; closing%s",
                self.peer,
                " after %.2fs" % delay if delay else "",
            )
            service.counters["auth_failures"] += 1
            self._status(protocol.AUTH, message, protocol.UNAUTHORIZED)
            self.tenant = None
            self.closing = True
            return
        self.tenant = tenant
        self._quota = service.quota(tenant)
        if service.tenants is not None:
            log.debug("%s authenticated as tenant %s", self.peer, service.tenants.name(tenant))
        self._status(protocol.AUTH, message, protocol.OK)

    def _close_guessing(self) -> None:
        """Most of what this connection asks for does not exist: it is guessing lease ids.

        It is closed after this reply, and its host may open only so many such connections
        a minute (see Service.refusal), so guessing ids costs a reconnection per
        GUESS_MIN_MISSES guesses and then waits.
        """
        service = self.service
        service.counters["connections_closed_guessing"] += 1
        service.guessers.take(security.source_of(self.peer))
        service.warn(
            "guessing",
            self.peer,
            "%s asked for %d lease ids that do not exist in %d requests; closing",
            self.peer,
            self.misses,
            self.answered,
        )
        self.closing = True

    # Large writes.

    def _begin_upload(self, frame: protocol.DataFrame) -> None:
        """A large write's fixed fields are here: stage its data, or skip it and answer."""
        buffer = None
        if isinstance(frame.lease_id, int) and not self.service.short_ids:
            self._decoder.skip_payload()
            self._refuse_short(frame, protocol.DataSet(protocol.SHORT_IDS_OFF))
            return
        if frame.length > self.service.max_data:
            status = protocol.TOO_LARGE
        else:
            status = self.store.check_write(
                _key(frame.lease_id), frame.offset, frame.length, self.tenant or 0
            )
        if status == protocol.OK:
            buffer = self.service.staging.take(frame.length)
            if buffer is None:  # uploads under way hold all the staging memory allowed
                status = protocol.BUSY
                self.service.warn(
                    "staging", self.peer, "%s write refused: too many uploads under way", self.peer
                )
        if buffer is None:
            self._decoder.skip_payload()
            self._status(frame.msg_type, frame, status)
            return
        self._upload = _Upload(frame, buffer)
        self.uploading = True

    def _continue_upload(self) -> bool:
        """Take buffered bytes of the write; True once it is whole and answered."""
        upload = self._upload
        assert upload is not None
        upload.received += self._decoder.read_payload(upload.view[upload.received :])
        if self._decoder.payload_left:
            return False
        frame = upload.frame
        if self._must_wait(_key(frame.lease_id)):
            return False  # whole: it lands from here once the stream has gone
        status = self.store.write(
            _key(frame.lease_id),
            frame.offset,
            upload.view,
            self.tenant or 0,
            zero_rest=frame.msg_type == protocol.REPLACE,
        )
        self._drop_upload()
        self._status(frame.msg_type, frame, status)
        return True

    def _drop_upload(self) -> None:
        if self._upload is not None:
            self.service.staging.give(self._upload.buffer)
            self._upload = None
            self.uploading = False


def _nothing() -> None:
    """Nothing to wake: a connection driven by hand."""


def _key(lease_id: Union[int, bytes]) -> bytes:
    """The 16 bytes that name a lease, from a request's id of either size."""
    return protocol.short_form(lease_id) if isinstance(lease_id, int) else lease_id


def _names_short_id(request: object) -> bool:
    """Whether a request names a lease by a short id, which can be guessed: a miss on a
    version 4 UUID is somebody's lease that ended, never a guess that came close."""
    lease_id = getattr(request, "lease_id", None)
    if isinstance(lease_id, bytes):
        return protocol.short_id_in(lease_id) is not None
    return lease_id is not None


def _first(items: Deque[Tuple[Buffer, Optional[Pin]]], n: int) -> List[Tuple[Buffer, Any]]:
    out = []
    for item in items:
        out.append(item)
        if len(out) == n:
            break
    return out


def _type_of(request: Any) -> int:
    """The message type of a request, or of the large write a DataFrame begins."""
    if type(request) is protocol.DataFrame:
        return int(request.msg_type)
    return protocol.REQUEST_TYPES[type(request)]


def _describe_request(msg_type: int, request: Any) -> str:
    """A request in words for the log: its command and what it asks."""
    name = protocol.TYPE_NAMES[msg_type]
    if isinstance(request, (protocol.Lease, protocol.Grant)):
        return "%s %d bytes for %d ms" % (name, request.size, request.duration_ms)
    if isinstance(request, protocol.DataFrame):
        return _span(name, request.lease_id, request.length, request.offset)
    if isinstance(request, (protocol.SetData, protocol.Replace, protocol.Write)):
        return _span(name, request.lease_id, len(request.data), getattr(request, "offset", 0))
    if isinstance(request, protocol.Read):
        return _span(name, request.lease_id, request.length, request.offset)
    if isinstance(request, protocol.Renew):
        return "%s %s for %d ms" % (name, _logged_id(request.lease_id), request.duration_ms)
    if isinstance(request, protocol.RenewMany):
        return "%s %d leases for %d ms" % (name, len(request.lease_ids), request.duration_ms)
    if isinstance(request, protocol.ListLeases):
        return "%s (a page of %d at most)" % (name, request.limit)
    lease_id = getattr(request, "lease_id", None)
    return name if lease_id is None else "%s %s" % (name, _logged_id(lease_id))


def _span(name: str, lease_id: Union[int, bytes], length: int, offset: int) -> str:
    where = " at %d" % offset if offset else ""
    amount = "to the end" if length < 0 else "%d bytes" % length  # a Read's -1
    return "%s %s (%s%s)" % (name, _logged_id(lease_id), amount, where)


def _logged_id(lease_id: Union[int, bytes]) -> str:
    """An id as the log shows it: a UUID only by its first 8 digits, since whoever holds
    the whole of it holds the lease, and logs are read by more people than leases are."""
    text = protocol.id_text(lease_id)
    return text if len(text) < 36 else text[:8] + "-..."


def _describe(reply: object, status: int) -> str:
    """The result of a request, in words for the log; a memoryview is data sent, a str
    the words already."""
    if isinstance(reply, str):
        return reply
    if isinstance(reply, protocol.Granted):
        return "id %s" % _logged_id(reply.lease_id)
    if isinstance(reply, protocol.Leased):
        if reply.lease_id > 0:
            return "id %d" % reply.lease_id
        if reply.lease_id == protocol.NO_MEMORY:
            return "refused (%s)" % protocol.NO_MEMORY_TEXT
        return "refused (%s)" % protocol.STATUS_TEXT.get(reply.lease_id, str(reply.lease_id))
    if isinstance(reply, memoryview):
        if len(reply) >= protocol.STREAM_MIN:
            return "%d bytes, sent from the pool" % len(reply)
        return "%d bytes" % len(reply)
    if isinstance(reply, protocol.Data):  # a Data reply with lease data is described by its view
        return "%d bytes" % len(reply.data) if reply.data else "not found"
    if isinstance(reply, protocol.StatsReply):
        return "%d counters" % len(reply.stats)
    if isinstance(reply, protocol.PoolMapReply):
        return "%d cells" % len(reply.used)
    if isinstance(reply, protocol.TimeToLiveReply):
        return "%d ms left of %d, %d bytes" % reply
    if isinstance(reply, protocol.LeaseList):
        return "%d leases%s" % (len(reply.rows), ", more to come" if reply.next_cursor else "")
    if isinstance(reply, protocol.RenewManyReply):
        return "%d not renewed" % len(reply.lease_ids)
    return protocol.STATUS_TEXT.get(status, str(status))


_ANSWERS: Dict[type, Callable[[Connection, Any], None]] = {
    protocol.Lease: Connection._lease,
    protocol.SetData: Connection._set,
    protocol.Replace: Connection._replace,
    protocol.AccessData: Connection._access,
    protocol.Release: Connection._release,
    protocol.Renew: Connection._renew,
    protocol.Write: Connection._write,
    protocol.Read: Connection._read,
    protocol.Stats: Connection._stats,
    protocol.PoolMap: Connection._pool_map,
    protocol.Auth: Connection._auth,
    protocol.DataFrame: Connection._begin_upload,
    protocol.Grant: Connection._grant,
    protocol.TimeToLive: Connection._ttl,
    protocol.ListLeases: Connection._list_leases,
    protocol.RenewMany: Connection._renew_many,
}
