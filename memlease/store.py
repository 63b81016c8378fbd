"""The lease store: the pool's bytes, its allocator, the leases and their deadlines.

It belongs to one thread, the event loop's, so it has no lock and no thread of its own:
the loop asks ``next_deadline()`` when to wake and calls ``expire_due(limit)`` in slices
between other work, and every access checks the lease's deadline itself, so a lease is
never readable after its time even between slices.  A lease request that finds no free
block first reclaims due leases itself, and the figures count only the living, so an
ended lease is never seen, nor its memory withheld, while the reaper catches up.

A million small leases must stay cheap, so a lease is not an object: its fields live in
parallel arrays (unboxed machine integers), kept in the order of a binary heap on the
deadline, so the table is its own expiry queue and holds exactly the live leases.  A
lease's id is a random version 4 UUID (16 bytes, kept as two 64-bit halves); a lease
made by the original's Lease message also has a short id (see memlease.ids).  An id is
chosen only when its low bits name an empty slot of its index, so an index needs no
probing and doubles by a copy in C.  Deadlines are integer milliseconds since the store
began, on its monotonic clock.  Every method names a lease by its 16 bytes: a UUID's,
or a short id's form (protocol.short_form).

With ``state_file`` the pool is a shared mapping of that file (put it on tmpfs, such as
/dev/shm), and ``save()`` writes the lease table beside it, so a restarted server takes
back every lease that has time left, with its bytes.
"""

import errno
import fcntl
import gc
import mmap
import os
import stat
import struct
import sys
import time
import zlib
from array import array
from collections import Counter, deque
from itertools import chain, compress, islice, repeat
from operator import add, and_, le
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import protocol
from buddy import BuddyAllocator
from memlease import ids
from memlease.census import Census, EndedWalk, living_usage

COUNTERS = (
    "leases_granted",
    "leases_refused",
    "leases_expired",
    "leases_reclaimed",  # of the expired, those a lease request ended to get their memory
    "leases_released",
    "leases_renewed",
    "gets",
    "sets",
)
_EMPTY = memoryview(b"")
# The small requests that serve() answers, as local names for its loop.
_READ, _WRITE, _REPLACE = protocol.READ, protocol.WRITE, protocol.REPLACE
_ACCESS_DATA, _SET_DATA = protocol.ACCESS_DATA, protocol.SET_DATA
_RENEW, _RELEASE = protocol.RENEW, protocol.RELEASE
_GRANT, _LEASE = protocol.GRANT, protocol.LEASE
_BY_UUID = frozenset((_READ, _WRITE, _REPLACE, _RENEW, _RELEASE))  # naming a 16-byte id
_BY_SHORT_ID = frozenset((_ACCESS_DATA, _SET_DATA))  # the original's, naming a short id
_WRITES = frozenset((_WRITE, _SET_DATA, _REPLACE))
_OK_REPLY = protocol.STATUS_REPLIES[protocol.OK]
_PACK_DATA_HEAD = protocol.DATA_HEAD.pack  # a Data reply's head, before its data
_DATA_FIELDS = protocol.DATA_HEAD_SIZE - protocol.HEADER_SIZE  # its payload before the data
_STREAM_MIN = protocol.STREAM_MIN
Bytes = Union[bytes, bytearray, memoryview]
if TYPE_CHECKING:
    Column = array[int]  # a column of machine integers
else:
    Column = array
_FIRST_INDEX_SLOTS = 64
_SHORT_HIGHEST = 0xFFFFFFFF  # a 16-byte id whose halves are 0 and at most this is a short id
# When the tree has grown by this many split nodes (and as many leaves) since its low
# point, the store moves every object the collector tracks into its permanent generation:
# a full collection then walks only what is newer, so it never pauses long over millions
# of nodes still in use.  Growth, not churn, triggers it: a pool that only turns over its
# leases freezes nothing more.  The tree's dropped nodes form no cycles, so freezing them
# never keeps garbage; a cycle elsewhere that is frozen stays until the process ends.
FREEZE_STEP = 25_000
EXPIRY_SLICE = 64  # ended leases expired per turn of the loop at most (about 1.5 ms of work)
_NARROW_DEADLINE_MAX = 2**32 - 1  # the most milliseconds the first deadline column holds
# A nanosecond of slack absorbs float rounding, so a reading at a deadline counts as it.
_SLACK_MS = 1e-6
# A listing's cursor is a bit-reversed slot of the id index, scaled to this many bits (no
# index has more slots), so a cursor stays valid when the index doubles.
CURSOR_BITS = 62
PAGE_SLOTS = 4096  # slots of the id index a page of a listing looks at, at most
RUN_MIN = 64  # the fewest slots a page looks at in one slice (when aligned)
_TAKEN = (-1).__lt__  # whether an index slot holds a position


def _floor_power_of_two(value: int) -> int:
    return 1 << (value.bit_length() - 1)


def _reverse_bits(value: int, bits: int) -> int:
    """``value``'s lowest ``bits`` bits in reverse order."""
    return int(format(value, "0%db" % bits)[::-1], 2) if bits else 0


class PoolMemory:
    """The pool's bytes: a private anonymous mapping, so untouched pages cost nothing.

    Zeroing a run hands its whole pages back to the OS with madvise, which zeroes them
    too; the ragged ends of the run, and everything where madvise fails, get zeros written.
    """

    _ZEROS = memoryview(bytes(max(64 * 1024, mmap.PAGESIZE)))

    def __init__(self, size: int) -> None:
        private = getattr(mmap, "MAP_PRIVATE", None)
        if private is None:
            self.buffer = mmap.mmap(-1, size)
        else:
            self.buffer = mmap.mmap(-1, size, flags=private)
        self._advice: Optional[int] = getattr(mmap, "MADV_DONTNEED", None)

    def zero(self, offset: int, size: int) -> None:
        if size < mmap.PAGESIZE:
            self.buffer[offset : offset + size] = self._ZEROS[:size]
            return
        end = offset + size
        if self._advice is not None:
            first = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
            last = end // mmap.PAGESIZE * mmap.PAGESIZE
            if last > first:
                try:
                    self.buffer.madvise(self._advice, first, last - first)
                except OSError:
                    self._advice = None  # not here: write zeros from now on
                else:
                    self._write_zeros(offset, first)
                    self._write_zeros(last, end)
                    return
        self._write_zeros(offset, end)

    def flush(self) -> None:
        """Make written bytes durable; an anonymous pool has nowhere to keep them."""

    def close(self) -> None:
        """Unmap, or if views of it are still out, leave it to go with the last of them."""
        try:
            self.buffer.close()
        except BufferError:
            pass

    def _write_zeros(self, start: int, end: int) -> None:
        while start < end:
            n = min(end - start, len(self._ZEROS))
            self.buffer[start : start + n] = self._ZEROS[:n]
            start += n


class FilePoolMemory(PoolMemory):
    """The pool as a shared mapping of a file, so its bytes outlive the process.

    On tmpfs (/dev/shm) the file is memory; freed pages are punched out of it with
    madvise(MADV_REMOVE), so they go back to the OS as with the anonymous pool.  The file
    is locked while mapped: two servers never share one pool.  Its bytes are left as found;
    the store decides whether to keep them or ``wipe()`` them.
    """

    def __init__(self, path: str, size: int) -> None:  # not the anonymous mapping's setup
        self._fd = open_state_file(path, os.O_RDWR | os.O_CREAT)
        try:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OSError(errno.EBUSY, "another server is using the state file", path) from None
            self.found_size = os.fstat(self._fd).st_size
            if self.found_size != size:
                os.ftruncate(self._fd, 0)  # not this pool's file: nothing in it is kept
                os.ftruncate(self._fd, size)
            self.buffer = mmap.mmap(
                self._fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        except BaseException:
            os.close(self._fd)
            raise
        self._size = size
        self._advice = getattr(mmap, "MADV_REMOVE", None)

    def wipe(self) -> None:
        """Drop every byte of the file: it reads as zeros, and holds no memory."""
        os.ftruncate(self._fd, 0)
        os.ftruncate(self._fd, self._size)

    def flush(self) -> None:
        self.buffer.flush()

    def close(self) -> None:
        super().close()
        os.close(self._fd)


def open_state_file(path: str, flags: int, owner: int = 0) -> int:
    """A descriptor of ``path``, refused unless it is a regular file of one link, owned by
    root, the running user, ``owner`` or the owner of its directory.

    Root opens it in a directory another user may write: a planted symbolic link, hard
    link, FIFO or device must never be truncated, read without end or given away.  The
    directory's owner could replace the file anyway, so trusting its files adds nothing.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise OSError(exc.errno, "refused: %s is a symbolic link" % path) from None
    found = os.fstat(fd)
    owners = (0, os.geteuid(), owner, os.stat(os.path.dirname(os.path.abspath(path))).st_uid)
    problem = None
    if not stat.S_ISREG(found.st_mode):
        problem = "is not a regular file"
    elif found.st_nlink != 1:
        problem = "has %d names (hard links)" % found.st_nlink
    elif found.st_uid not in owners:
        problem = "belongs to uid %d, not to root or the server's user" % found.st_uid
    if problem is not None:
        os.close(fd)
        raise OSError(errno.EPERM, "refused: %s %s" % (path, problem))
    return fd


class _CleanStart(Exception):
    """The saved state is in doubt: the store starts empty, for the reason given."""


# The lease table saved beside the pool file on a graceful stop, all little-endian:
# a header (with the short ids' key and count, so none comes back), then one column per
# field (the UUIDs' halves, short ids, tenants, sizes, offsets, deadlines as wall-clock
# milliseconds, durations), then a CRC-32 of everything before it.  Version 1 had 4-byte
# ids only; version 2, no durations: its leases are taken back with the time they have
# left as their duration, so an upgrade keeps them.
TABLE_SUFFIX = ".leases"
_TABLE_MAGIC = b"MLEASES\n"
_TABLE_VERSION = 3
# magic, version, pool bytes, min block, saved at, n, short ids' key, short ids issued
_TABLE_HEADER = struct.Struct("<8sIQIqQ%dsQ" % ids.KEY_SIZE)
_TABLE_COLUMNS = {2: "QQqqqqq", _TABLE_VERSION: "QQqqqqqq"}  # by the versions read
_TABLE_CRC = struct.Struct("<I")


def _bytes_per_lease(version: int) -> int:
    return sum(array(code).itemsize for code in _TABLE_COLUMNS[version])


def _column_bytes(typecode: str, values: "Iterable[int]") -> bytes:
    column = array(typecode, values)
    if sys.byteorder == "big":
        column.byteswap()
    return column.tobytes()


def _column(typecode: str, data: memoryview) -> Column:
    column = array(typecode)
    column.frombytes(data)
    if sys.byteorder == "big":
        column.byteswap()
    return column


def _appended(column: Column, value: int) -> Column:
    """``column`` with ``value`` appended: in a wider copy if it does not fit.

    Most tenants and sizes are small, so their columns start narrow and widen at most once.
    """
    try:
        column.append(value)
    except OverflowError:
        column = array("q", column)
        column.append(value)
    return column


def _narrowest(typecode: str, values: Column, least: int, most: int) -> Column:
    """A column of ``typecode`` holding a column of 8-byte ``values`` (from ``least`` to
    ``most``), or those values themselves if they do not fit (as _appended widens).

    The narrow column is cut from the wide one's bytes, in C: each value keeps its low
    bytes, which hold it whole once it fits.
    """
    narrow = array(typecode)
    width = narrow.itemsize
    if not _fits(typecode, least, most):
        return array("q", values)
    wide = values.tobytes()
    low = 0 if sys.byteorder == "little" else values.itemsize - width
    cut = bytearray(width * len(values))
    for byte in range(width):
        cut[byte::width] = wide[low + byte :: values.itemsize]
    narrow.frombytes(cut)
    return narrow


def _fits(typecode: str, least: int, most: int) -> bool:
    """Whether every value from ``least`` to ``most`` fits a column of ``typecode``."""
    bits = 8 * array(typecode).itemsize
    if typecode.isupper():  # unsigned
        return least >= 0 and most < 1 << bits
    return -(1 << (bits - 1)) <= least and most < 1 << (bits - 1)


_DEADLINES = 6  # the deadlines' column in the lease table, after ids, tenant, size, offset


def _heap_ordered(keys: Column) -> bool:
    """Whether no key is below its parent's in the binary heap the column is laid out as."""
    parents = chain.from_iterable(zip(keys, keys))  # the parent of i > 0 is (i - 1) // 2
    return all(map(le, parents, islice(keys, 1, None)))


def _index_of(
    keys: "Sequence[int]", positions: "Sequence[int]", most: int
) -> Tuple[Column, int]:
    """An index of ``keys`` (key & mask -> position), at most half full as the store
    keeps its indexes, with a mask that tells the keys apart: no more than ``most``
    slots, more than a saved table's index can have held."""
    slots = _FIRST_INDEX_SLOTS
    while slots < 2 * (len(keys) + 1):
        slots *= 2
    while True:
        index = array("i", [-1]) * slots
        deque(map(index.__setitem__, map(and_, keys, repeat(slots - 1)), positions), maxlen=0)
        if slots - index.count(-1) == len(keys):
            return index, slots - 1
        slots *= 2  # saved ids were apart in a larger index
        if slots > most:
            raise _CleanStart("the lease table holds a lease twice, or ids no index tells apart")


def _discard(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class Pin:
    """A hold on a lease's block while its bytes are being sent."""

    __slots__ = ("offset", "lease_id")

    def __init__(self, offset: int, lease_id: bytes) -> None:
        self.offset = offset
        self.lease_id = lease_id


class LeaseStore:
    """The leases of one pool, each a block of it, for a duration; owned by one thread."""

    # The lease table: one column a field, in heap order of the deadline.
    _highs: Column  # the UUID's first 8 bytes, big-endian
    _lows: Column  # its last 8: random below the variant bits, so they key the index
    _shorts: Column  # the short id, 0 for none
    _tenants: Column
    _sizes: Column  # as asked for; the block is the next power of two
    _offsets: Column
    _deadlines: Column  # milliseconds since the store began
    _durations: Column  # the milliseconds of the last grant or renew
    _index: Column  # low half & _mask -> position of that lease, if its id matches
    _mask: int
    _short_index: Column  # short id & _short_mask -> position, as _index
    _short_mask: int
    _short_count: int  # live leases with a short id
    _tenant_bytes: Dict[int, int]
    _tenant_leases: Dict[int, int]

    def __init__(
        self,
        pool_size: int,
        *,
        min_block: int = 32,
        clock: Callable[[], float] = time.monotonic,
        state_file: Optional[str] = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._pool_size = pool_size
        self._min_block = min_block
        self._clock = clock
        self._wall_clock = wall_clock
        self._epoch = clock()
        self.counters: Dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._pins: Dict[int, int] = {}  # block offset -> holds on it
        self._unpinned_frees: Dict[int, int] = {}  # offset -> order, freed at the last unpin
        self._gc_floor = 0  # split nodes at the last freeze, or fewer since
        self._table_path = None if state_file is None else state_file + TABLE_SUFFIX
        self._table_saved = False
        self._start_empty()
        self.memory: PoolMemory
        self.restore_note: Optional[str] = None
        self.first_start = False  # a state file that did not exist: nothing to restore
        if state_file is None:
            self.memory = PoolMemory(self.capacity)
        else:
            self.memory = FilePoolMemory(state_file, self.capacity)
            self.restore_note = self._restore(state_file)
        self._view = memoryview(self.memory.buffer)

    # The requests.

    def lease(
        self,
        size: int,
        duration_ms: int,
        tenant: int = 0,
        quota: int = 0,
        short_id: bool = False,
    ) -> Union[bytes, int]:
        """A new lease's 16-byte id, or a negative status when refused.

        With ``short_id`` the lease also gets a short id (see ``short_id``), for the
        original's messages.
        """
        status = self._refusal(size, duration_ms, tenant, quota)
        offset = -1
        if status == protocol.OK:
            order = self.allocator.order_for(size)
            offset = self.allocator.take(order)
            if offset < 0:
                offset = self._reclaim_for(order)
        short = 0
        if offset >= 0 and short_id:
            short = self._new_short_id()
            if not short:  # every short id has been given: none may come back
                self.allocator.release(offset, self.allocator.order_for(size))
                offset = -1
        if offset < 0:
            self.counters["leases_refused"] += 1
            return status or protocol.NO_MEMORY
        return self._grant(offset, size, self._now() + duration_ms, duration_ms, tenant, short)

    def _grant(
        self, offset: int, size: int, deadline: int, duration: int, tenant: int, short: int
    ) -> bytes:
        """Make the lease of the block at ``offset``, already taken: its new id."""
        high, low = self._new_id()
        self.memory.zero(offset, self._block(size))
        self._add(high, low, short, tenant, size, offset, deadline, duration)
        self.counters["leases_granted"] += 1
        if self.allocator.split_blocks - self._gc_floor >= FREEZE_STEP:
            self._freeze()
        return ids.HALVES.pack(high, low)

    def short_id(self, lease_id: bytes) -> int:
        """The lease's short id; 0 when it has none, or there is no such lease."""
        pos = self._position(lease_id)
        return self._shorts[pos] if pos >= 0 else 0

    def check_write(self, lease_id: bytes, offset: int, length: int, tenant: int = 0) -> int:
        """The status a write of ``length`` bytes at ``offset`` would get now; changes nothing."""
        pos = self._live_at(lease_id, tenant, self._now())
        if pos < 0:
            return protocol.NOT_FOUND
        return self._write_status(pos, offset, length)

    def write(
        self, lease_id: bytes, offset: int, data: Bytes, tenant: int = 0, zero_rest: bool = False
    ) -> int:
        """Write all of ``data`` at ``offset``, or nothing; returns a status.

        With ``zero_rest`` the lease's bytes after the data become zeros in the same step.
        """
        self.counters["sets"] += 1
        pos = self._live(lease_id, tenant)
        if pos < 0:
            return protocol.NOT_FOUND
        n = len(data)
        status = self._write_status(pos, offset, n)
        if status == protocol.OK:
            start = self._offsets[pos] + offset
            self._view[start : start + n] = data
            if zero_rest:
                end = self._offsets[pos] + self._sizes[pos]
                self.memory.zero(start + n, end - start - n)
        return status

    def read(
        self, lease_id: bytes, offset: int = 0, length: int = -1, tenant: int = 0
    ) -> Tuple[int, memoryview]:
        """A status and a view of the lease's bytes; a length of -1 reads to the end.

        The view is the pool itself, valid until the store next changes unless pinned.
        """
        self.counters["gets"] += 1
        pos = self._live(lease_id, tenant)
        if pos < 0:
            return protocol.NOT_FOUND, _EMPTY
        size = self._sizes[pos]
        if length == -1:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            return protocol.OUT_OF_RANGE, _EMPTY
        start = self._offsets[pos] + offset
        return protocol.OK, self._view[start : start + length]

    def pin(self, lease_id: bytes) -> Pin:
        """Keep the lease's block from being zeroed or reused until ``unpin(token)``.

        Call it right after a successful read, while the reply is still to be sent.
        """
        pos = self._position(lease_id)
        if pos < 0:
            raise KeyError(lease_id)
        offset = self._offsets[pos]
        self._pins[offset] = self._pins.get(offset, 0) + 1
        return Pin(offset, lease_id)

    def streaming(self, lease_id: bytes) -> bool:
        """Whether the live lease's bytes are pinned, being sent: a write must wait for them."""
        if not self._pins:
            return False
        pos = self._position(lease_id)
        return pos >= 0 and self._offsets[pos] in self._pins

    def unpin(self, token: object) -> None:
        """Drop a hold; a block whose lease ended meanwhile is zeroed and freed at the last."""
        if not isinstance(token, Pin) or token.offset < 0:
            raise ValueError("not a live pin")
        offset = token.offset
        token.offset = -1
        holds = self._pins[offset] - 1
        if holds:
            self._pins[offset] = holds
            return
        del self._pins[offset]
        order = self._unpinned_frees.pop(offset, None)
        if order is not None:
            self._free_block(offset, order)

    def renew(self, lease_id: bytes, duration_ms: int, tenant: int = 0) -> int:
        """Give a live lease ``duration_ms`` from now; returns a status."""
        if duration_ms <= 0:
            return protocol.INVALID
        pos = self._live(lease_id, tenant)
        if pos < 0:
            return protocol.NOT_FOUND
        self._renew_at(pos, self._now() + duration_ms, duration_ms)
        return protocol.OK

    def _renew_at(self, pos: int, deadline: int, duration_ms: int) -> None:
        self._table_changed()
        self._widen_deadlines(deadline)
        self._settle(
            pos,
            self._highs[pos],
            self._lows[pos],
            self._shorts[pos],
            self._tenants[pos],
            self._sizes[pos],
            self._offsets[pos],
            deadline,
            duration_ms,
        )
        self.counters["leases_renewed"] += 1

    def release(self, lease_id: bytes, tenant: int = 0) -> int:
        """End a lease now; its memory is zeroed and returned.  Returns a status."""
        pos = self._live(lease_id, tenant)
        if pos < 0:
            return protocol.NOT_FOUND
        self._release_at(pos)
        return protocol.OK

    def _release_at(self, pos: int) -> None:
        self._retire(pos)
        self.counters["leases_released"] += 1

    # The common small requests, answered in one pass.

    def serve(
        self,
        requests: Iterator[protocol.SmallRequest],
        data: bytearray,
        out: bytearray,
        counts: List[int],
        tenant: int,
        quota: int,
        short_ids: bool,
        max_data: int,
        limit: int,
        room: int,
    ) -> int:
        """Answer small requests (protocol.Decoder.small_requests, whose frames are in
        ``data``) into ``out`` as they come, while each succeeds at once; returns how many.

        It stops, before that request has changed anything, at the first whose answer is
        anything else: a refusal, a miss, an ended lease, a value to stream from the pool
        or a write it must wait for, the original's messages without short ids, more than
        ``max_data`` bytes; and after ``limit`` requests or ``room`` bytes of replies.
        Those are left to the request's own method, which answers them as ever.  The
        clock is read once, and a lease found once is found again without a lookup until
        the table changes.  ``counts[type]`` counts the requests answered, by type.
        """
        now = self._now()
        view = self._view
        pins = self._pins
        out_stop = len(out) + room
        by_uuid, by_short_id, writes_types = _BY_UUID, _BY_SHORT_ID, _WRITES
        read, write, replace, access, renew = _READ, _WRITE, _REPLACE, _ACCESS_DATA, _RENEW
        stream_min, pack_head, data_fields = _STREAM_MIN, _PACK_DATA_HEAD, _DATA_FIELDS
        ok = _OK_REPLY
        answered = reads = writes = 0
        last = None  # the id of the lease found last; then its place:
        pos = base = size = short = 0
        for end, frame in requests:  # a frame is consumed when the next one is asked for
            if answered >= limit:
                break
            msg_type = frame[0]
            if msg_type in by_uuid:
                lease_id = frame[2]
            elif msg_type in by_short_id:
                if not short_ids:
                    break
                lease_id = protocol.short_form(frame[2])
            else:  # Grant or Lease
                reply = self._serve_lease(frame, tenant, quota, short_ids, now)
                if reply is None:
                    break
                out += reply
                last = None  # the table changed
                counts[msg_type] += 1
                answered += 1
                continue
            if lease_id != last:
                pos = self._live_at(lease_id, tenant, now)
                if pos < 0:
                    break
                last = lease_id
                base, size, short = self._offsets[pos], self._sizes[pos], self._shorts[pos]
            if msg_type == read:
                offset, length = frame[3], frame[4]
                if length == -1:
                    length = size - offset
                if (
                    offset < 0
                    or length < 0
                    or offset + length > size
                    or length >= stream_min
                    or len(out) >= out_stop  # small replies only: writes' fit a turn's budget
                ):
                    break
                out += pack_head(access, data_fields + length, short, length)
                out += view[base + offset : base + offset + length]
                reads += 1
            elif msg_type in writes_types:
                offset = frame[3] if msg_type == write else 0
                length = frame[-1]
                if base in pins or length > max_data or offset < 0 or offset + length > size:
                    break
                start = base + offset
                view[start : start + length] = data[end - length : end]
                if msg_type == replace:
                    self.memory.zero(start + length, size - length)
                writes += 1
                out += ok
            elif msg_type == access:
                if size >= stream_min or len(out) >= out_stop:
                    break
                out += pack_head(access, data_fields + size, short, size)
                out += view[base : base + size]
                reads += 1
            elif msg_type == renew:
                if frame[3] <= 0:
                    break
                self._renew_at(pos, now + frame[3], frame[3])
                last = None
                out += ok
            else:  # Release
                self._release_at(pos)
                last = None
                out += ok
            counts[msg_type] += 1
            answered += 1
        if reads:
            self.counters["gets"] += reads
        if writes:
            self.counters["sets"] += writes
        return answered

    def _serve_lease(
        self, frame: Tuple[Any, ...], tenant: int, quota: int, short_ids: bool, now: int
    ) -> Optional[bytes]:
        """The reply to a Grant or Lease that a free block serves at once; None for any
        other (a refusal, or a lease that must reclaim ended ones first)."""
        msg_type, _, size, duration_ms = frame
        if self._refusal(size, duration_ms, tenant, quota) != protocol.OK:
            return None
        order = self.allocator.order_for(size)
        if self.allocator.largest_free < 1 << order:
            return None
        if msg_type == _GRANT:
            offset = self.allocator.take(order)
            lease_id = self._grant(offset, size, now + duration_ms, duration_ms, tenant, 0)
            return protocol.Granted(lease_id).encode()
        short = self._new_short_id() if short_ids else 0
        if not short:
            return None
        offset = self.allocator.take(order)
        self._grant(offset, size, now + duration_ms, duration_ms, tenant, short)
        return protocol.Leased(short).encode()

    def ttl(self, lease_id: bytes, tenant: int = 0) -> Optional[protocol.TimeToLiveReply]:
        """The live lease's time left, last duration and size; None when there is none."""
        pos = self._live(lease_id, tenant)
        if pos < 0:
            return None
        remaining = self._deadlines[pos] - self._now()
        return protocol.TimeToLiveReply(remaining, self._durations[pos], self._sizes[pos])

    def leases(self, tenant: int, cursor: int, limit: int) -> Tuple[List[protocol.LeaseRow], int]:
        """A page of at most ``limit`` of the tenant's living leases from ``cursor`` on, and
        the cursor of the next page: 0 once the listing is complete.

        The order is the id index's slots in bit-reversed order, as Redis's SCAN walks its
        table, and a cursor is a position in it scaled to CURSOR_BITS: a slot's leases move
        only to slots later in that order when the index doubles, so a lease that lives
        through the whole listing is listed exactly once.  A page looks at no more than
        PAGE_SLOTS slots, in strided slices taken in C, so it costs about the same however
        many leases there are (it may hold fewer than ``limit``, or none, before the end).
        """
        bits = self._mask.bit_length()
        end = 1 << bits
        at = cursor >> (CURSOR_BITS - bits)
        now = self._now()
        found: List[int] = []  # heap positions, in listing order
        budget = PAGE_SLOTS
        while at < end and budget and len(found) < limit:
            # The next aligned run of reversed positions: one slice of the index, strided.
            # A run of N slots holds N leases at most, so one no longer than the room left
            # (or RUN_MIN) rarely has to be cut, which costs a sort.
            room = limit - len(found)
            span = min(at & -at or end, _floor_power_of_two(min(max(room, RUN_MIN), budget)))
            shift = span.bit_length() - 1
            first = _reverse_bits(at >> shift, bits - shift)
            stride = end // span
            mine = self._listed(first, stride, tenant, now)  # (offset in the run, position)
            if len(mine) > room:  # the page ends inside the run: take its first leases
                order = sorted((_reverse_bits(offset, shift), pos) for offset, pos in mine)
                found.extend(pos for _, pos in order[:room])
                at += order[room - 1][0] + 1
                break
            found.extend(pos for _, pos in mine)
            at += span
            budget -= span
        rows = [
            protocol.LeaseRow(
                ids.HALVES.pack(self._highs[pos], self._lows[pos]),
                self._sizes[pos],
                self._deadlines[pos] - now,
                self._shorts[pos],
            )
            for pos in found
        ]
        return rows, 0 if at >= end else at << (CURSOR_BITS - bits)

    def _listed(self, first: int, stride: int, tenant: int, now: int) -> List[Tuple[int, int]]:
        """The tenant's living leases in the slots ``first``, ``first + stride``...: their
        offsets in that run and their heap positions.  A slot may still hold the position
        of a lease gone (or, after the index doubled, of its twin slot's): only a lease
        whose id maps to the slot counts."""
        run = self._index[first::stride]
        mask, count = self._mask, len(self._lows)
        lows, tenants, deadlines = self._lows, self._tenants, self._deadlines
        return [
            (offset, pos)
            for offset, pos in compress(enumerate(run), map(_TAKEN, run))
            if pos < count
            and lows[pos] & mask == first + offset * stride
            and tenants[pos] == tenant
            and deadlines[pos] > now
        ]

    # Expiry, driven by the loop.

    def next_deadline(self) -> Optional[float]:
        """The clock() time of the earliest deadline, or None without leases."""
        if not self._deadlines:
            return None
        return self._epoch + self._deadlines[0] / 1000.0

    def expire_due(self, limit: int, by: Optional[int] = None) -> int:
        """Expire at most ``limit`` leases whose deadline has passed (by ``by``, a store
        time from ``now_ms``; default now); returns how many."""
        now = self._now() if by is None else by
        deadlines = self._deadlines
        done = 0
        while done < limit and deadlines and deadlines[0] <= now:
            self._retire(0)
            done += 1
        self.counters["leases_expired"] += done
        return done

    def reclaim_due(self, limit: int, by: Optional[int] = None) -> bool:
        """Expire up to ``limit`` leases whose deadline has passed (by ``by``, as in
        ``expire_due``), as a request that must show the free blocks as they are does (the
        pool map); True once none is left.

        Its cost is the reaper's own work for those leases, done sooner; a caller with
        more to do comes back on a later turn, so a storm never stalls a turn for long.
        """
        now = self._now() if by is None else by
        self.counters["leases_reclaimed"] += self.expire_due(limit, now)
        deadlines = self._deadlines
        return not deadlines or deadlines[0] > now

    def now_ms(self) -> int:
        """The store's time now, in the milliseconds its deadlines count."""
        return self._now()

    def _reclaim_for(self, order: int) -> int:
        """Expire due leases from the heap's top until a block of ``order`` is free: its
        offset, or -1 once no due lease is left.

        A lease request does this before it is refused, so memory is back the moment a
        lease ends; the work stops at the first block that fits.
        """
        now = self._now()
        deadlines = self._deadlines
        take = self.allocator.take
        offset = -1
        reclaimed = 0
        while offset < 0 and deadlines and deadlines[0] <= now:
            self._retire(0)
            reclaimed += 1
            offset = take(order)
        self.counters["leases_expired"] += reclaimed
        self.counters["leases_reclaimed"] += reclaimed
        return offset

    # Figures.

    def stats(self, tenant: Optional[int] = None) -> Dict[str, int]:
        """The pool's figures and the counters, counting only living leases."""
        moment = self.census()
        moment.step()
        return moment.stats(tenant)

    def census(self) -> Census:
        """The figures of this moment, the ended leases among them still to be walked
        (Census.step): what a stats request in a storm of expiries counts in slices."""
        largest = self.allocator.largest_free
        # The free lists take an ended lease's block back when it is reclaimed: until
        # then the largest block and fragmentation describe the lists as they are.
        figures = {
            "pool_bytes": self.capacity,
            "free_bytes": self.allocator.free_bytes,
            "largest_free_block": largest,
            "live_leases": len(self._lows),
            "metadata_bytes": self.metadata_bytes(),
            "fragmentation": protocol.fragmentation(self.allocator.free_bytes, largest),
        }
        figures.update(self.counters)
        return Census(figures, self._tenant_bytes, self._tenant_leases, self._walk(), self._block)

    def tenant_usage(self, tenant: int) -> Tuple[int, int]:
        """The block bytes and the number of living leases ``tenant`` holds."""
        walk = self._walk()
        walk.step()
        return living_usage(
            tenant, self._tenant_bytes, self._tenant_leases, walk.ended(), self._block
        )

    def _block(self, size: int) -> int:
        return 1 << self.allocator.order_for(size)

    def _walk(self) -> EndedWalk:
        """A walk of the leases that have ended by now but are still in the table."""
        tenants = self._tenant_leases
        only = next(iter(tenants)) if len(tenants) == 1 else None
        return EndedWalk(self._deadlines, self._sizes, self._tenants, self._now(), only)

    def free_blocks(self) -> Dict[int, int]:
        """Block size -> number of free blocks of that size."""
        return self.allocator.free_block_counts()

    def usage_by_cell(self, cells: int) -> List[int]:
        """Used bytes in each of ``cells`` equal slices of the pool, from the free lists."""
        if cells <= 0:
            raise ValueError("cells must be positive")
        capacity = self.capacity
        bounds = [capacity * i // cells for i in range(cells + 1)]
        used = [bounds[i + 1] - bounds[i] for i in range(cells)]
        for start, size in self.allocator.free_runs():
            end = start + size
            cell = start * cells // capacity
            while cell < cells and bounds[cell] < end:
                used[cell] -= min(end, bounds[cell + 1]) - max(start, bounds[cell])
                cell += 1
        return used

    def metadata_bytes(self) -> int:
        """An estimate of the memory the bookkeeping takes, beside the pool itself."""
        tables = (
            self._highs,
            self._lows,
            self._shorts,
            self._tenants,
            self._sizes,
            self._offsets,
            self._deadlines,
            self._durations,
            self._index,
            self._short_index,
        )
        dicts = (self._tenant_bytes, self._tenant_leases, self._pins, self._unpinned_frees)
        return (
            self.allocator.metadata_bytes()
            + sum(sys.getsizeof(table) for table in tables)
            + sum(sys.getsizeof(d) for d in dicts)
        )

    # Keeping it across a restart.

    def save(self) -> None:
        """With a state file: write the lease table beside the pool (a graceful stop).

        Written to a temporary file, synced and renamed, so a table is whole or absent.
        """
        if self._table_path is None:
            return
        self.memory.flush()  # the bytes first: a table never speaks of unwritten data
        shift = int(self._wall_clock() * 1000) - self._now()  # store time -> wall-clock ms
        parts = [
            _TABLE_HEADER.pack(
                _TABLE_MAGIC,
                _TABLE_VERSION,
                self.capacity,
                self._min_block,
                self._now() + shift,
                len(self._lows),
                self._short_ids.key,
                self._short_ids.issued,
            ),
            _column_bytes("Q", self._highs),
            _column_bytes("Q", self._lows),
            _column_bytes("q", self._shorts),
            _column_bytes("q", self._tenants),
            _column_bytes("q", self._sizes),
            _column_bytes("q", self._offsets),
            _column_bytes("q", (deadline + shift for deadline in self._deadlines)),
            _column_bytes("q", self._durations),
        ]
        crc = 0
        for part in parts:
            crc = zlib.crc32(part, crc)
        parts.append(_TABLE_CRC.pack(crc))
        temporary = self._table_path + ".tmp"
        _discard(temporary)  # created anew, so no link or mode planted there is used
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        with os.fdopen(os.open(temporary, flags, 0o600), "wb") as out:  # ids are credentials
            for part in parts:
                out.write(part)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, self._table_path)
        directory = os.open(os.path.dirname(os.path.abspath(self._table_path)), os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        self._table_saved = True

    def close(self) -> None:
        """Unmap the pool."""
        self._view.release()
        self.memory.close()

    # The lease table: parallel arrays in heap order of the deadline.

    def _now(self) -> int:
        return int((self._clock() - self._epoch) * 1000.0 + _SLACK_MS)

    def _refusal(self, size: int, duration_ms: int, tenant: int, quota: int) -> int:
        if size <= 0 or duration_ms <= 0:
            return protocol.INVALID
        if size > self.capacity:
            return protocol.TOO_LARGE
        block = self._block(size)
        # The table's figure counts leases that ended and wait for the reaper: past the
        # quota by it, the tenant is refused only if its living leases leave no room.
        if (
            quota > 0
            and self._tenant_bytes.get(tenant, 0) + block > quota
            and self.tenant_usage(tenant)[0] + block > quota
        ):
            return protocol.OVER_QUOTA
        return protocol.OK

    def _write_status(self, pos: int, offset: int, length: int) -> int:
        size = self._sizes[pos]
        if length > size:
            return protocol.TOO_LARGE
        if offset < 0 or length < 0 or offset + length > size:
            return protocol.OUT_OF_RANGE
        return protocol.OK

    def _position(self, lease_id: bytes) -> int:
        """The heap position of the lease, or -1."""
        high: int
        low: int
        high, low = ids.HALVES.unpack(lease_id)
        if not high and low <= _SHORT_HIGHEST:
            return self._short_position(low)
        pos = self._index[low & self._mask]
        if 0 <= pos < len(self._lows) and self._lows[pos] == low and self._highs[pos] == high:
            return pos
        return -1

    def _short_position(self, short: int) -> int:
        pos = self._short_index[short & self._short_mask]
        if short and 0 <= pos < len(self._shorts) and self._shorts[pos] == short:
            return pos
        return -1

    def _find(self, lease_id: bytes, tenant: int) -> int:
        """The position of the tenant's lease, or -1: another tenant's lease is not found."""
        pos = self._position(lease_id)
        return pos if pos >= 0 and self._tenants[pos] == tenant else -1

    def _live_at(self, lease_id: bytes, tenant: int, now: int) -> int:
        """Like _find, but -1 also for a lease whose deadline is not after ``now``."""
        pos = self._position(lease_id)
        if pos >= 0 and self._tenants[pos] == tenant and self._deadlines[pos] > now:
            return pos
        return -1

    def _live(self, lease_id: bytes, tenant: int) -> int:
        """Like _find, but a lease whose deadline has passed is expired now and not found."""
        pos = self._find(lease_id, tenant)
        if pos >= 0 and self._deadlines[pos] <= self._now():
            self._retire(pos)
            self.counters["leases_expired"] += 1
            return -1
        return pos

    def _new_id(self) -> Tuple[int, int]:
        """A random UUID whose index slot is free, so ids never share a slot (nor are equal
        to a live lease's)."""
        while 2 * (len(self._lows) + 1) > len(self._index):
            self._grow_index()
        while True:
            high, low = ids.random_uuid()
            if not self._slot_taken(low):
                return high, low

    def _new_short_id(self) -> int:
        """The next short id whose slot is free (the others are skipped for good); 0 when
        none is left."""
        while 2 * (self._short_count + 1) > len(self._short_index):
            self._grow_short_index()
        while True:
            short = self._short_ids.next()
            if not short or not self._short_slot_taken(short):
                return short

    def _slot_taken(self, low: int) -> bool:
        """Whether a live lease's id has the same low bits as ``low``."""
        mask = self._mask
        pos = self._index[low & mask]
        return 0 <= pos < len(self._lows) and self._lows[pos] & mask == low & mask

    def _short_slot_taken(self, short: int) -> bool:
        """Whether a live lease's short id has the same low bits as ``short``."""
        mask = self._short_mask
        pos = self._short_index[short & mask]
        return 0 <= pos < len(self._shorts) and self._shorts[pos] & mask == short & mask

    def _grow_index(self) -> None:
        """Double the index by a copy: each id keeps its slot, and the copy reads as empty."""
        self._index = self._index * 2
        self._mask = 2 * self._mask + 1

    def _grow_short_index(self) -> None:
        """Double the short ids' index, as _grow_index does."""
        self._short_index = self._short_index * 2
        self._short_mask = 2 * self._short_mask + 1

    def _add(
        self,
        high: int,
        low: int,
        short: int,
        tenant: int,
        size: int,
        offset: int,
        deadline: int,
        duration: int,
    ) -> None:
        self._table_changed()
        self._widen_deadlines(deadline)
        self._highs.append(high)
        self._lows.append(low)
        self._shorts = _appended(self._shorts, short)
        self._tenants = _appended(self._tenants, tenant)
        self._sizes = _appended(self._sizes, size)
        self._offsets.append(offset)
        self._deadlines.append(deadline)
        self._durations.append(duration)
        if short:
            self._short_count += 1
        self._settle(
            len(self._lows) - 1, high, low, short, tenant, size, offset, deadline, duration
        )
        block = 1 << self.allocator.order_for(size)
        self._tenant_bytes[tenant] = self._tenant_bytes.get(tenant, 0) + block
        self._tenant_leases[tenant] = self._tenant_leases.get(tenant, 0) + 1

    def _retire(self, pos: int) -> None:
        """Take the lease at ``pos`` out of the table and free its block (unless pinned)."""
        if self._table_saved:
            self._table_changed()
        short = self._shorts[pos]
        tenant = self._tenants[pos]
        size = self._sizes[pos]
        offset = self._offsets[pos]
        self._index[self._lows[pos] & self._mask] = -1
        if short:
            self._short_index[short & self._short_mask] = -1
            self._short_count -= 1
        last = (
            self._highs.pop(),
            self._lows.pop(),
            self._shorts.pop(),
            self._tenants.pop(),
            self._sizes.pop(),
            self._offsets.pop(),
            self._deadlines.pop(),
            self._durations.pop(),
        )
        if pos < len(self._lows):
            self._settle(pos, *last)
        order = self.allocator.order_for(size)
        block = 1 << order
        leases = self._tenant_leases[tenant] - 1
        if leases:
            self._tenant_leases[tenant] = leases
            self._tenant_bytes[tenant] -= block
        else:
            del self._tenant_bytes[tenant], self._tenant_leases[tenant]
        if offset in self._pins:
            self._unpinned_frees[offset] = order
        else:
            self._free_block(offset, order)

    def _widen_deadlines(self, deadline: int) -> None:
        """Give the deadlines 8 bytes each once 4 no longer hold them (after 49 days)."""
        if deadline > _NARROW_DEADLINE_MAX and self._deadlines.typecode != "q":
            self._deadlines = array("q", self._deadlines)

    def _free_block(self, offset: int, order: int) -> None:
        self.memory.zero(offset, 1 << order)
        self.allocator.release(offset, order)
        self._gc_floor = min(self._gc_floor, self.allocator.split_blocks)

    def _settle(
        self,
        pos: int,
        high: int,
        low: int,
        short: int,
        tenant: int,
        size: int,
        offset: int,
        deadline: int,
        duration: int,
    ) -> None:
        """Put a lease into the hole at ``pos``, moving it up or down into heap order."""
        deadlines = self._deadlines
        start = pos
        while pos:
            parent = (pos - 1) >> 1
            if deadlines[parent] <= deadline:
                break
            self._move_row(parent, pos)
            pos = parent
        if pos == start:
            count = len(self._lows)
            while True:
                child = 2 * pos + 1
                if child >= count:
                    break
                if child + 1 < count and deadlines[child + 1] < deadlines[child]:
                    child += 1
                if deadlines[child] >= deadline:
                    break
                self._move_row(child, pos)
                pos = child
        self._highs[pos] = high
        self._lows[pos] = low
        self._shorts[pos] = short
        self._tenants[pos] = tenant
        self._sizes[pos] = size
        self._offsets[pos] = offset
        deadlines[pos] = deadline
        self._durations[pos] = duration
        self._index[low & self._mask] = pos
        if short:
            self._short_index[short & self._short_mask] = pos

    def _move_row(self, source: int, target: int) -> None:
        """Copy the lease at heap position ``source`` to ``target``, and index it there."""
        self._highs[target] = self._highs[source]
        low = self._lows[target] = self._lows[source]
        short = self._shorts[target] = self._shorts[source]
        self._tenants[target] = self._tenants[source]
        self._sizes[target] = self._sizes[source]
        self._offsets[target] = self._offsets[source]
        self._deadlines[target] = self._deadlines[source]
        self._durations[target] = self._durations[source]
        self._index[low & self._mask] = target
        if short:
            self._short_index[short & self._short_mask] = target

    def _table_changed(self) -> None:
        """A saved table no longer matches once the leases change: remove it."""
        if self._table_saved and self._table_path is not None:
            self._table_saved = False
            _discard(self._table_path)

    def _start_empty(self) -> None:
        self.allocator = BuddyAllocator(self._pool_size, self._min_block)
        self.capacity = self.allocator.capacity
        self._highs = array("Q")
        self._lows = array("Q")
        self._shorts = array("b")  # narrow until a value needs more: see _appended
        self._tenants = array("b")
        self._sizes = array("H")
        self._offsets = array("I" if self.capacity < 1 << 32 else "Q")
        self._deadlines = array("I")  # the heap's key; see _widen_deadlines
        self._durations = array("I")  # at most INT32_MAX, as a Lease or Renew carries
        self._index = array("i", [-1]) * _FIRST_INDEX_SLOTS  # id & mask -> position
        self._mask = _FIRST_INDEX_SLOTS - 1
        self._short_index = array("i", [-1]) * _FIRST_INDEX_SLOTS
        self._short_mask = _FIRST_INDEX_SLOTS - 1
        self._short_count = 0
        self._short_ids = ids.ShortIds()  # a new key: a clean start is a new life
        self._tenant_bytes = {}
        self._tenant_leases = {}

    def _restore(self, state_file: str) -> str:
        """Take back the saved leases that have time left; on any doubt start empty.

        Returns the line that says which it was.  The table is removed as it is read, so
        a later crash can never bring back leases that changed after it was written.
        """
        assert isinstance(self.memory, FilePoolMemory) and self._table_path is not None
        if self.memory.found_size == 0 and not os.path.exists(self._table_path):
            self.first_start = True
            return "first start with %s: an empty pool" % state_file
        wall_now = int(self._wall_clock() * 1000)
        try:
            columns, self._short_ids = self._read_table(
                self._table_path, self.memory.found_size, wall_now
            )
            gc.collect(1)  # now, while little is young: what follows leaves no garbage cycle
            expired = self._take_back(columns, wall_now)
        except _CleanStart as doubt:
            self._start_empty()
            self.memory.wipe()
            return "clean start with an empty pool: %s" % doubt
        self._freeze(collected=True)
        return "restored %d leases from %s (%d more had expired while it was stopped)" % (
            len(self._lows),
            state_file,
            expired,
        )

    def _read_table(
        self, path: str, pool_file_size: int, wall_now: int
    ) -> "Tuple[List[array[int]], ids.ShortIds]":
        most = (
            _TABLE_HEADER.size
            + self.capacity // self._min_block * _bytes_per_lease(_TABLE_VERSION)
            + _TABLE_CRC.size
        )  # the table of a pool full of the smallest leases
        try:
            with os.fdopen(open_state_file(path, os.O_RDONLY), "rb") as saved:
                data = saved.read(most + 1)
        except FileNotFoundError:
            raise _CleanStart(
                "no saved lease table (a first start, or the server did not stop cleanly)"
            ) from None
        except OSError as exc:
            raise _CleanStart("cannot read the lease table: %s" % exc.strerror) from None
        try:
            os.unlink(path)
        except OSError as exc:
            raise _CleanStart("cannot remove the lease table: %s" % exc.strerror) from None
        if len(data) > most:
            raise _CleanStart("the lease table is larger than any table of this pool")
        if len(data) < _TABLE_HEADER.size + _TABLE_CRC.size or data[:8] != _TABLE_MAGIC:
            raise _CleanStart("the lease table is not one (too short, or a wrong magic number)")
        version = _TABLE_HEADER.unpack_from(data)[1]
        if version not in _TABLE_COLUMNS:
            raise _CleanStart(
                "the lease table has version %d, this server reads versions %s"
                % (version, " and ".join(map(str, sorted(_TABLE_COLUMNS))))
            )
        _, _, pool, min_block, saved_at, count, key, issued = _TABLE_HEADER.unpack_from(data)
        size = _TABLE_HEADER.size + count * _bytes_per_lease(version) + _TABLE_CRC.size
        if len(data) != size:
            raise _CleanStart("the lease table is %d bytes, not %d" % (len(data), size))
        view = memoryview(data)
        if _TABLE_CRC.unpack_from(data, size - _TABLE_CRC.size)[0] != zlib.crc32(view[:-4]):
            raise _CleanStart("the lease table fails its checksum")
        if (pool, min_block) != (self.capacity, self._min_block):
            raise _CleanStart(
                "the pool changed (saved: %d bytes in blocks of %d, now %d in blocks of %d)"
                % (pool, min_block, self.capacity, self._min_block)
            )
        if pool_file_size != self.capacity:
            raise _CleanStart("the pool file is %d bytes, not %d" % (pool_file_size, self.capacity))
        if saved_at > wall_now:
            raise _CleanStart(
                "the wall clock went backwards (the table was saved %.3f s in the future)"
                % ((saved_at - wall_now) / 1000)
            )
        columns = []
        start = _TABLE_HEADER.size
        for typecode in _TABLE_COLUMNS[version]:
            end = start + count * array(typecode).itemsize
            columns.append(_column(typecode, view[start:end]))
            start = end
        if version == 2:
            columns.append(array("q", bytes(8 * count)))  # durations unknown: see _take_back
        return columns, ids.ShortIds(key, issued)

    def _take_back(self, columns: "List[array[int]]", wall_now: int) -> int:
        """Put each saved lease with time left back in its own block, all at once: the
        columns are filtered, checked, ordered and indexed in bulk, and the allocator is
        built from the leases' blocks in one pass.  Returns how many had expired."""
        saved = len(columns[0])
        alive = list(map(wall_now.__lt__, columns[_DEADLINES]))
        living = sum(alive)
        if living < saved:
            columns = [array(column.typecode, compress(column, alive)) for column in columns]
        if not living:
            return saved
        highs, lows, shorts, tenants, sizes, offsets, deadlines, durations = columns
        if not all(durations):  # a version 2 table: the time left is the duration
            left = (min(end - wall_now, protocol.INT32_MAX) for end in deadlines)
            durations = array("q", (given or now for given, now in zip(durations, left)))
            columns[-1] = durations
        shorts_from, shorts_to = min(shorts), max(shorts)
        sizes_from, sizes_to = min(sizes), max(sizes)
        tenants_from, tenants_to = min(tenants), max(tenants)
        if not (
            ids.all_uuid4(highs, lows)
            and 0 <= shorts_from <= shorts_to <= ids.SHORT_ID_MAX
            and 0 < sizes_from <= sizes_to <= self.capacity
            and 0 < min(durations) <= max(durations) <= protocol.INT32_MAX
        ):
            raise _CleanStart("the lease table holds an impossible lease")
        order_of = {size: self.allocator.order_for(size) for size in set(sizes)}
        self._rebuild_allocator(sizes, offsets, order_of)
        if living < saved or not _heap_ordered(deadlines):
            order = sorted(range(living), key=deadlines.__getitem__)  # sorted: a heap
            columns = [array(column.typecode, map(column.__getitem__, order)) for column in columns]
            highs, lows, shorts, tenants, sizes, offsets, deadlines, durations = columns
        self._highs, self._lows = highs, lows
        self._shorts = _narrowest("b", shorts, shorts_from, shorts_to)
        self._tenants = _narrowest("b", tenants, tenants_from, tenants_to)
        self._sizes = _narrowest("H", sizes, sizes_from, sizes_to)
        self._offsets = _narrowest(self._offsets.typecode, offsets, 0, self.capacity)
        self._durations = array("I", durations)
        shift = self._now() - wall_now  # wall-clock milliseconds -> the store's
        restored = array("q", map(add, deadlines, repeat(shift)))
        self._deadlines = _narrowest("I", restored, restored[0], max(restored))  # a heap
        most = max(4 * self.capacity // self._min_block, _FIRST_INDEX_SLOTS)
        self._index, self._mask = _index_of(lows, range(living), most)
        given = list(compress(shorts, shorts))  # the short ids there are, and where
        positions = list(compress(range(living), shorts))
        self._short_index, self._short_mask = _index_of(given, positions, most)
        self._short_count = len(given)
        if tenants_from == tenants_to and len(order_of) == 1:  # one tenant, one size
            usage = Counter({(tenants[0], sizes[0]): living})
        else:
            usage = Counter(zip(tenants, sizes))
        self._tenant_bytes, self._tenant_leases = {}, {}
        for (tenant, size), count in usage.items():
            self._tenant_leases[tenant] = self._tenant_leases.get(tenant, 0) + count
            block_bytes = count << order_of[size]
            self._tenant_bytes[tenant] = self._tenant_bytes.get(tenant, 0) + block_bytes
        return saved - living

    def _rebuild_allocator(
        self, sizes: Column, offsets: Column, order_of: Dict[int, int]
    ) -> None:
        """The allocator with exactly the leases' blocks taken, from their places in the
        order of the pool; and the free blocks zeroed, so no byte of a lease that ended
        while the server was stopped survives.  A lease's own block needs nothing: it was
        zeroed whole when it was granted, and no write passes the lease's size."""
        starts = sorted(offsets)
        if len(order_of) == 1:  # leases of one size, the usual case: no lookup per lease
            orders = [next(iter(order_of.values()))] * len(starts)
        else:
            order_at = dict(zip(offsets, map(order_of.__getitem__, sizes)))
            orders = list(map(order_at.__getitem__, starts))
        try:
            self.allocator.take_blocks(starts, orders)
        except ValueError:
            raise _CleanStart("saved leases overlap, or lie outside the pool") from None
        for offset, free in self.allocator.free_runs():
            self.memory.zero(offset, free)

    def _freeze(self, collected: bool = False) -> None:
        if not collected:
            gc.collect(1)  # young garbage first, so no garbage cycle is frozen with the rest
        gc.freeze()
        self._gc_floor = self.allocator.split_blocks
