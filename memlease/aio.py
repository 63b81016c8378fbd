"""MemoryLease client for asyncio: one connection, requests pipelined, replies in order.

async with AsyncMemLeaseClient("localhost", 412) as c:
    lease_id = await c.lease(1024, 5000)
    await c.set(lease_id, b"hello")
    data = await c.get(lease_id)

Any number of tasks may share one client.  Each call writes its requests at once and
waits for its replies; the server answers in order, so one reader task hands replies to
the waiting calls first in, first out.  The calls, their checks, their results and
their exceptions are the blocking client's (memlease_client), shared, not copied; so
are the probe of which server it is and the C++ server's messages (RequestPath), and
the keepalive's schedule.
"""

import asyncio
import functools
import socket
import ssl
import time
import uuid
from collections import deque
from typing import (
    Any,
    AsyncIterator,
    Awaitable,
    Callable,
    Deque,
    Dict,
    Iterable,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Union,
    cast,
)

import protocol
from memlease_client import (
    DEFAULT_DURATION_MS,
    DEFAULT_PORT,
    RECV_SIZE,
    Call,
    CallQueue,
    Exchange,
    KeepAliveSchedule,
    KeptLease,
    LeaseId,
    LeaseInfo,
    LeasePage,
    LeaseTTL,
    MemLeaseError,
    RequestPath,
    Settings,
    auth_call,
    checked_id_text,
    checked_page_size,
    client_settings,
    connection_error,
    frame_parts,
    get_call,
    lease_call,
    next_page_call,
    page_call,
    pool_map_call,
    raise_first_error,
    release_call,
    renew_call,
    renew_many_calls,
    results_of,
    set_call,
    stats_call,
    ttl_call,
    unix_path,
)


class _Waiter(NamedTuple):
    """A call waiting for ``expected`` replies, gathered in ``replies``."""

    expected: int
    replies: List[protocol.Reply]
    future: "asyncio.Future[List[protocol.Reply]]"


def _mark_retrieved(future: "asyncio.Future[List[protocol.Reply]]") -> None:
    """Take a finished call's exception, so one whose caller gave up is not logged."""
    if not future.cancelled():
        future.exception()


class _Link:
    """One open connection: writes requests, and a reader task matches replies to calls."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, settings: Settings
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._settings = settings
        self._decoder = protocol.reply_decoder()
        self._waiters: Deque[_Waiter] = deque()
        self.failure: Optional[BaseException] = None
        self._reading = asyncio.ensure_future(self._read_replies())

    async def exchange(
        self,
        requests: Sequence[protocol.Request],
        probe: Optional[Callable[[protocol.Reply], bool]] = None,
    ) -> List[protocol.Reply]:
        """Send the requests, then wait for their replies (a timeout breaks the link).

        With ``probe`` the first request is the probe: when ``probe`` finds in its reply
        that the rest will never be answered (the original server), the link is closed
        and only that reply is returned.
        """
        if self.failure is not None:
            raise self.failure
        counts = [1, len(requests) - 1] if probe is not None else [len(requests)]
        futures = [self._expect(count) for count in counts if count]
        for request in requests:  # no await in between: one call's frames stay together
            for part in frame_parts(request):
                self._writer.write(part)
        try:
            return await asyncio.wait_for(self._replies(futures, probe), self._settings.timeout)
        except asyncio.TimeoutError:
            self.fail(socket.timeout())
            raise cast(BaseException, self.failure) from None

    def _expect(self, count: int) -> "asyncio.Future[List[protocol.Reply]]":
        """A future for the next ``count`` replies, in line after those expected before."""
        future: asyncio.Future[List[protocol.Reply]] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_mark_retrieved)
        self._waiters.append(_Waiter(count, [], future))
        return future

    async def _replies(
        self,
        futures: "List[asyncio.Future[List[protocol.Reply]]]",
        probe: Optional[Callable[[protocol.Reply], bool]],
    ) -> List[protocol.Reply]:
        try:
            await self._writer.drain()
        except (OSError, RuntimeError) as exc:  # RuntimeError: the transport was closed
            self.fail(exc)
        # A cancelled caller leaves its waiter in line: its replies are read and dropped.
        replies = list(await asyncio.shield(futures[0]))
        if probe is not None and not self._promises_more(probe, replies[0]):
            self.fail(ConnectionAbortedError("the server reads one request a connection"))
            return replies
        for future in futures[1:]:
            replies += await asyncio.shield(future)
        return replies

    def _promises_more(
        self, probe: Callable[[protocol.Reply], bool], reply: protocol.Reply
    ) -> bool:
        """What ``probe`` makes of its reply; one it cannot make sense of breaks the link,
        as the blocking client drops its connection."""
        try:
            return probe(reply)
        except BaseException as exc:
            self.fail(exc)
            raise

    async def _read_replies(self) -> None:
        try:
            while True:
                data = await self._reader.read(RECV_SIZE)
                if not data:
                    raise ConnectionResetError("the server closed the connection")
                self._decoder.feed(data)
                while (message := self._decoder.next_message()) is not None:
                    self._hand_over(cast(protocol.Reply, message))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.fail(exc)

    def _hand_over(self, reply: protocol.Reply) -> None:
        if not self._waiters:
            raise protocol.BadFrame(protocol.MALFORMED, 0, "a reply to no request")
        waiter = self._waiters[0]
        waiter.replies.append(reply)
        if len(waiter.replies) == waiter.expected:
            self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_result(waiter.replies)

    async def close(self, reason: BaseException) -> None:
        self.fail(reason)
        await asyncio.gather(self._reading, return_exceptions=True)

    def fail(self, exc: BaseException) -> None:
        """Close the link; every call waiting on it, and any later one, gets the error."""
        if self.failure is None:
            settings = self._settings
            self.failure = connection_error(settings.where, settings.timeout, exc)
            self._writer.close()
            self._reading.cancel()
        while self._waiters:
            future = self._waiters.popleft().future
            if not future.done():
                future.set_exception(self.failure)


class AsyncMemLeaseClient:
    """A MemoryLease server's client for asyncio tasks; any number may share it.

    The connection opens on first use; after a connection error it is closed and the
    next call opens a new one (a failed call is not retried).  ``timeout`` bounds each
    call, from its request to its last reply, and the connecting.
    """

    def __init__(
        self,
        host: str = "localhost",
        port: int = DEFAULT_PORT,
        *,
        timeout: Optional[float] = 5.0,
        token: Optional[Union[str, bytes]] = None,
        tls: Union[bool, ssl.SSLContext, None] = None,
    ) -> None:
        self._settings = client_settings(host, port, timeout, token, tls)
        self._link: Optional[_Link] = None
        self._connecting: Optional[asyncio.Lock] = None  # made in the loop that uses it
        self._path = RequestPath()

    async def __aenter__(self) -> "AsyncMemLeaseClient":
        return self

    @property
    def server_version(self) -> Optional[int]:
        """The server's protocol version, once the probe has told it (see MemLeaseClient)."""
        return self._path.server_version

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            await link.close(ConnectionAbortedError("the client was closed"))

    async def lease(
        self, size: int, duration_ms: int = DEFAULT_DURATION_MS
    ) -> Union[uuid.UUID, int]:
        """Lease ``size`` bytes for ``duration_ms`` milliseconds; returns the lease id: a
        uuid.UUID, or an int from the C++ server."""
        return cast(Union[uuid.UUID, int], await self._one(lease_call(size, duration_ms)))

    async def set(
        self, lease_id: LeaseId, data: bytes, offset: int = 0, truncate: bool = False
    ) -> None:
        """Write ``data`` at ``offset``, all or nothing; ``truncate`` zeroes the rest."""
        await self._one(set_call(lease_id, data, offset, truncate))

    async def get(
        self, lease_id: LeaseId, offset: int = 0, length: Optional[int] = None
    ) -> bytes:
        """The lease's bytes: all of them, or ``length`` (default: to the end) from ``offset``."""
        return cast(bytes, await self._one(get_call(lease_id, offset, length)))

    async def renew(self, lease_id: LeaseId, duration_ms: int) -> None:
        """Make the lease last ``duration_ms`` from now."""
        await self._one(renew_call(lease_id, duration_ms))

    async def release(self, lease_id: LeaseId) -> None:
        """End the lease now."""
        await self._one(release_call(lease_id))

    async def ttl(self, lease_id: LeaseId) -> LeaseTTL:
        """How long the lease has left, the duration of its last grant or renew, its size."""
        return cast(LeaseTTL, await self._one(ttl_call(lease_id)))

    def leases(self, page_size: int = protocol.MAX_ROWS) -> AsyncIterator[LeaseInfo]:
        """Your living leases, ``async for``, fetched ``page_size`` at a time (see
        MemLeaseClient.leases)."""
        return self._listing(checked_page_size(page_size))

    async def renew_many(self, lease_ids: Iterable[LeaseId], duration_ms: int) -> List[LeaseId]:
        """Renew the leases in one round trip; returns those it could not, as given."""
        given = list(lease_ids)
        results = await self._request(renew_many_calls(list(zip(given, given)), duration_ms))
        raise_first_error(results)
        return [lease_id for missed in results for lease_id in missed]

    def keepalive(self, lease_id: LeaseId, release: bool = False) -> "AsyncKeepAlive":
        """``async with``: the lease renewed by a task while the block runs; see
        MemLeaseClient.keepalive."""
        return AsyncKeepAlive(
            checked_id_text(lease_id),
            functools.partial(self.ttl, lease_id),
            functools.partial(self.renew, lease_id),
            functools.partial(self.release, lease_id) if release else None,
        )

    async def stats(self) -> Dict[str, int]:
        """The server's counters."""
        return cast(Dict[str, int], await self._one(stats_call()))

    async def pool_map(self, cells: int = 1024) -> protocol.PoolMapReply:
        """How the server's pool is used, cut into ``cells`` slices, and its free blocks."""
        return cast(protocol.PoolMapReply, await self._one(pool_map_call(cells)))

    def pipeline(self) -> "AsyncPipeline":
        """A batch of calls sent together: ``await pipe.execute()``."""
        return AsyncPipeline(self)

    async def _one(self, call: Call) -> Any:
        result = (await self._request([call]))[0]
        if isinstance(result, MemLeaseError):
            raise result
        return result

    async def _listing(self, page_size: int) -> AsyncIterator[LeaseInfo]:
        call: Optional[Call] = page_call(0, page_size)
        while call is not None:
            page: LeasePage = await self._one(call)
            for info in page.leases:
                yield info
            call = next_page_call(page, page_size)

    async def _request(self, calls: Sequence[Call]) -> List[Any]:
        """Send the calls; their results or MemLeaseErrors, in order (the same plan as
        the blocking client's: see RequestPath)."""
        if not calls:
            return []
        plan = self._path.plan(calls)
        try:
            step = next(plan)
            while True:
                step = plan.send(await self._exchange(step))
        except StopIteration as done:
            results: List[Any] = done.value
            return results

    async def _exchange(self, step: Exchange) -> List[protocol.Reply]:
        """The replies to one step of the plan: on the shared link, or on a link of its
        own, closed after it (the original's one request a connection)."""
        if step.reuse:
            link = await self._open_link()
            return await link.exchange(step.requests, step.probe)
        link = await self._connect()
        try:
            return await link.exchange(step.requests, step.probe)
        finally:
            await link.close(ConnectionAbortedError("one request a connection"))

    async def _open_link(self) -> _Link:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._link is None or self._link.failure is not None:
                self._link = await self._connect()
            return self._link

    async def _connect(self) -> _Link:
        settings = self._settings
        path = unix_path(settings.host)
        opening = (
            asyncio.open_connection(
                settings.host,
                settings.port,
                ssl=settings.tls,
                server_hostname=settings.host if settings.tls else None,
            )
            if path is None
            else asyncio.open_unix_connection(path)
        )
        try:
            reader, writer = await asyncio.wait_for(opening, settings.timeout)
        except asyncio.TimeoutError:
            raise connection_error(
                settings.where, settings.timeout, socket.timeout(), connecting=True
            ) from None
        except BaseException as exc:
            raise connection_error(settings.where, settings.timeout, exc, connecting=True) from None
        link = _Link(reader, writer, settings)
        if settings.token is not None:
            call = auth_call(settings.token)
            try:
                raise_first_error(results_of([call], await link.exchange([call.request])))
            except BaseException:
                await link.close(ConnectionAbortedError("authentication failed"))
                raise
        return link


class AsyncPipeline(CallQueue):
    """Calls queued on an async client and sent together by ``await execute()``.

    Results come in call order; a failed call's result is its MemLeaseError, or with
    ``raise_on_error`` the first one is raised once every reply has been read.
    """

    def __init__(self, client: AsyncMemLeaseClient) -> None:
        super().__init__()
        self._client = client

    async def execute(self, raise_on_error: bool = True) -> List[Any]:
        calls = self._take()
        results = await self._client._request(calls) if calls else []
        if raise_on_error:
            raise_first_error(results)
        return results


class AsyncKeepAlive(KeptLease):
    """A lease renewed by a task while an ``async with`` block runs (see
    MemLeaseClient.keepalive and KeepAlive, whose schedule and rules it shares); the task
    is stopped on leaving, whatever happens."""

    def __init__(
        self,
        name: str,
        ttl: Callable[[], Awaitable[LeaseTTL]],
        renew: Callable[[int], Awaitable[None]],
        release: Optional[Callable[[], Awaitable[None]]],
    ) -> None:
        super().__init__(name)
        self._ttl, self._renew, self._release = ttl, renew, release
        self._task: Optional[asyncio.Future[None]] = None
        self._stopping: Optional[asyncio.Event] = None  # made in the loop that uses it

    async def __aenter__(self) -> "AsyncKeepAlive":
        asked = time.monotonic()
        schedule = self._begin(await self._ttl(), asked)
        self._stopping = asyncio.Event()
        self._task = asyncio.ensure_future(self._run(schedule, self._stopping))
        return self

    async def __aexit__(self, exc_type: Optional[type], *exc_info: object) -> None:
        assert self._schedule is not None and self._stopping and self._task is not None
        self._stopping.set()
        await asyncio.gather(self._task, return_exceptions=True)
        release_error = None
        if self._release is not None and not self.lost:
            try:
                await self._release()
            except MemLeaseError as exc:
                release_error = exc
        error = self._schedule.ending(release_error)
        if error is not None and exc_type is None:
            raise error

    async def _run(self, schedule: KeepAliveSchedule, stopping: asyncio.Event) -> None:
        while True:
            try:
                await asyncio.wait_for(stopping.wait(), schedule.wait(time.monotonic()))
                return
            except asyncio.TimeoutError:
                pass
            asked = time.monotonic()
            try:
                await self._renew(schedule.duration_ms)
            except Exception as exc:  # whatever it is, the lease is not renewed: never silent
                schedule.failed(exc, time.monotonic())
                if schedule.lost is not None:
                    return
            else:
                schedule.renewed(asked, time.monotonic())
