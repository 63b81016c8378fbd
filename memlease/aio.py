"""MemoryLease client for asyncio: one connection, requests pipelined, replies in order.

async with AsyncMemLeaseClient("localhost", 412) as c:
    lease_id = await c.lease(1024, 5000)
    await c.set(lease_id, b"hello")
    data = await c.get(lease_id)

Any number of tasks may share one client.  Each call writes its requests at once and
waits for its replies; the server answers in order, so one reader task hands replies to
the waiting calls first in, first out.  The calls, their checks, their results and
their exceptions are the blocking client's (memlease_client), shared, not copied.
"""

import asyncio
import socket
import ssl
from collections import deque
from typing import Any, Deque, Dict, List, NamedTuple, Optional, Sequence, Union, cast

import protocol
from memlease_client import (
    DEFAULT_DURATION_MS,
    DEFAULT_PORT,
    RECV_SIZE,
    Call,
    CallQueue,
    MemLeaseError,
    Settings,
    auth_call,
    client_settings,
    connection_error,
    frame_parts,
    get_call,
    lease_call,
    pool_map_call,
    raise_first_error,
    release_call,
    renew_call,
    results_of,
    set_call,
    stats_call,
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

    async def exchange(self, requests: Sequence[protocol.Request]) -> List[protocol.Reply]:
        """Send the requests, then wait for their replies (a timeout breaks the link)."""
        if self.failure is not None:
            raise self.failure
        future: asyncio.Future[List[protocol.Reply]] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_mark_retrieved)
        self._waiters.append(_Waiter(len(requests), [], future))
        for request in requests:  # no await in between: one call's frames stay together
            for part in frame_parts(request):
                self._writer.write(part)
        try:
            return await asyncio.wait_for(self._replies(future), self._settings.timeout)
        except asyncio.TimeoutError:
            self.fail(socket.timeout())
            raise cast(BaseException, self.failure) from None

    async def _replies(
        self, future: "asyncio.Future[List[protocol.Reply]]"
    ) -> List[protocol.Reply]:
        try:
            await self._writer.drain()
        except (OSError, RuntimeError) as exc:  # RuntimeError: the transport was closed
            self.fail(exc)
        # A cancelled caller leaves its waiter in line: its replies are read and dropped.
        return await asyncio.shield(future)

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

    async def __aenter__(self) -> "AsyncMemLeaseClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            await link.close(ConnectionAbortedError("the client was closed"))

    async def lease(self, size: int, duration_ms: int = DEFAULT_DURATION_MS) -> int:
        """Lease ``size`` bytes for ``duration_ms`` milliseconds; returns the lease id."""
        return cast(int, await self._one(lease_call(size, duration_ms)))

    async def set(
        self, lease_id: int, data: bytes, offset: int = 0, truncate: bool = False
    ) -> None:
        """Write ``data`` at ``offset``, all or nothing; ``truncate`` zeroes the rest."""
        await self._one(set_call(lease_id, data, offset, truncate))

    async def get(self, lease_id: int, offset: int = 0, length: Optional[int] = None) -> bytes:
        """The lease's bytes: all of them, or ``length`` (default: to the end) from ``offset``."""
        return cast(bytes, await self._one(get_call(lease_id, offset, length)))

    async def renew(self, lease_id: int, duration_ms: int) -> None:
        """Make the lease last ``duration_ms`` from now."""
        await self._one(renew_call(lease_id, duration_ms))

    async def release(self, lease_id: int) -> None:
        """End the lease now."""
        await self._one(release_call(lease_id))

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

    async def _request(self, calls: Sequence[Call]) -> List[Any]:
        """Send the calls; their results or MemLeaseErrors, in order."""
        link = await self._open_link()
        replies = await link.exchange([call.request for call in calls])
        return results_of(calls, replies)

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
