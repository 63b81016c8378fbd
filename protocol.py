"""MemoryLease wire protocol: message types, encoders and an incremental decoder.

Sans-IO in the manner of h11: nothing here touches a socket.  Bytes go in through
:meth:`Decoder.feed`, whole messages come out of :meth:`Decoder.next_message`, and
every message encodes itself with ``encode()``.  The framing is the C++ original's,
byte for byte, with the byte order fixed to little-endian whatever the host's.

Frame: ``<iq`` message type, payload length N; then N payload bytes.
See docs/protocol.md for every message and status code.
"""

import struct
import uuid
from typing import (
    Any,
    Callable,
    Dict,
    Generator,
    List,
    NamedTuple,
    Optional,
    Tuple,
    Type,
    Union,
)

HEADER = struct.Struct("<iq")
HEADER_SIZE = HEADER.size
INT32_MAX = 2**31 - 1

# Message types.  1-5 are the original's; 6-24 are this implementation's extensions.
LEASE = 1
LEASED = 2
SET_DATA = 3
ACCESS_DATA = 4  # the request, and (same number) the reply carrying the data
DATA_SET = 5  # a status reply
RELEASE = 6
RENEW = 7
WRITE = 8
READ = 9
STATS = 10
STATS_REPLY = 11
AUTH = 12
ERROR = 13
POOL_MAP = 14
POOL_MAP_REPLY = 15
REPLACE = 16
GRANT = 17
GRANTED = 18
TIME_TO_LIVE = 19
TIME_TO_LIVE_REPLY = 20
LIST_LEASES = 21
LEASE_LIST = 22
RENEW_MANY = 23
RENEW_MANY_REPLY = 24

TYPE_NAMES = {
    LEASE: "lease",
    LEASED: "leased",
    SET_DATA: "set",
    ACCESS_DATA: "get",
    DATA_SET: "status",
    RELEASE: "release",
    RENEW: "renew",
    WRITE: "write",
    READ: "read",
    STATS: "stats",
    STATS_REPLY: "stats-reply",
    AUTH: "auth",
    ERROR: "error",
    POOL_MAP: "map",
    POOL_MAP_REPLY: "map-reply",
    REPLACE: "replace",
    GRANT: "grant",
    GRANTED: "granted",
    TIME_TO_LIVE: "ttl",
    TIME_TO_LIVE_REPLY: "ttl-reply",
    LIST_LEASES: "leases",
    LEASE_LIST: "lease-list",
    RENEW_MANY: "renew-many",
    RENEW_MANY_REPLY: "renew-many-reply",
}

# Status codes, carried by DataSet and Error replies, and as a negative id in Leased.
OK = 0
NOT_FOUND = -1  # no such lease, or it expired.  In Leased: no free block (the original's -1).
TOO_LARGE = -2  # data longer than the lease, or a lease larger than the pool
OUT_OF_RANGE = -3  # offset or length outside the lease
INVALID = -4  # size or duration <= 0
UNAUTHORIZED = -5  # the server wants a token first, or the token was wrong
UNKNOWN_TYPE = -6  # the server does not know this message type
MALFORMED = -7  # the payload does not match its message's layout
FRAME_TOO_LARGE = -8  # the length field is negative or above the server's limit
BUSY = -9  # the server is at its connection limit, or its memory for uploads is lent out
SHORT_IDS_OFF = -10  # the original's id-bearing messages, on a server run with --no-short-ids
OVER_QUOTA = -11  # in Leased (and DataSet): the tenant's quota cannot take the lease
NO_MEMORY = NOT_FOUND  # Leased only: the original's refusal, kept for its client

NO_MEMORY_TEXT = "no free block large enough"  # what NO_MEMORY means in Leased

STATUS_TEXT = {
    OK: "ok",
    NOT_FOUND: "no such lease, or it has expired",
    TOO_LARGE: "too large for the lease or the pool",
    OUT_OF_RANGE: "offset or length outside the lease",
    INVALID: "size and duration must be positive",
    UNAUTHORIZED: "unauthorized: a valid token is required",
    UNKNOWN_TYPE: "unknown message type",
    MALFORMED: "malformed message",
    FRAME_TOO_LARGE: "frame length negative or over the server's limit",
    BUSY: "server busy: too many connections, or uploads under way",
    SHORT_IDS_OFF: "short ids are off on this server (--no-short-ids): "
    "use a MemoryLease 2 client",
    OVER_QUOTA: "over the tenant's quota",
}

# Lease ids.  Every lease has a 16-byte id, a random version 4 UUID in RFC 4122 byte
# order; a lease made by the original's Lease message also has a 32-bit short id, which
# the extensions carry as the UUID whose integer it is: 12 zero bytes, then the id
# big-endian.  A version 4 UUID never looks like that (its version nibble is 4).
ID_SIZE = 16
_ZERO_PREFIX = bytes(12)
_SHORT_FORM = struct.Struct(">12xI")
NO_LEASE = bytes(ID_SIZE)  # the short form of id 0, which no lease ever has

# The probe: AccessData for id 0.  The original answers Data with no bytes; this server
# answers with its protocol version's text, so a client learns which it talks to.
PROBE_ID = 0
PROTOCOL_VERSION = 2
PROBE_TEXT = b"memlease %d" % PROTOCOL_VERSION


def short_form(short_id: int) -> bytes:
    """The 16 bytes that name the lease of ``short_id``; an id no lease can have names none."""
    return _SHORT_FORM.pack(short_id) if 0 < short_id <= INT32_MAX else NO_LEASE


def short_id_in(lease_id: bytes) -> Optional[int]:
    """The short id a 16-byte id stands for, or None when it is a UUID's own."""
    if lease_id[:12] == _ZERO_PREFIX:
        short_id: int = _SHORT_FORM.unpack(lease_id)[0]
        return short_id
    return None


def is_lease_id(data: Union[bytes, bytearray], at: int = 0) -> bool:
    """Whether the 16 bytes at ``at`` can name a lease: a version 4 UUID, or a short
    id's form."""
    if data[at + 6] >> 4 == 4 and data[at + 8] >> 6 == 2:
        return True
    return data[at : at + 12] == _ZERO_PREFIX


def id_text(lease_id: Union[int, bytes]) -> str:
    """An id as people read it: a short id's number, or a UUID's canonical text."""
    if isinstance(lease_id, int):
        return str(lease_id)
    short_id = short_id_in(lease_id)
    return str(uuid.UUID(bytes=lease_id)) if short_id is None else str(short_id)

_I = struct.Struct("<i")
_II = struct.Struct("<ii")
_IQ = struct.Struct("<iq")
_U = struct.Struct("<16s")
_UI = struct.Struct("<16si")
_UQ = struct.Struct("<16sq")
_UQQ = struct.Struct("<16sqq")
_QI = struct.Struct("<qi")
_QQQ = struct.Struct("<qqq")
# Whole frames with a fixed layout, packed in one call on the hot path.
_FRAME_I = struct.Struct("<iqi")
_FRAME_II = struct.Struct("<iqii")
_FRAME_IQ = struct.Struct("<iqiq")
_FRAME_U = struct.Struct("<iq16s")
_FRAME_UI = struct.Struct("<iq16si")
_FRAME_UQ = struct.Struct("<iq16sq")
_FRAME_UQQ = struct.Struct("<iq16sqq")
_FRAME_QI = struct.Struct("<iqqi")
_FRAME_QQQ = struct.Struct("<iqqqq")


class Lease(NamedTuple):
    """Ask for ``size`` bytes for ``duration_ms`` milliseconds."""

    size: int
    duration_ms: int

    def encode(self) -> bytes:
        return _FRAME_II.pack(LEASE, _II.size, self.size, self.duration_ms)


class Leased(NamedTuple):
    """The answer to Lease: the new id, or a negative status when refused."""

    lease_id: int

    def encode(self) -> bytes:
        return _FRAME_I.pack(LEASED, _I.size, self.lease_id)


class SetData(NamedTuple):
    """Write ``data`` at the start of the lease (the original's set)."""

    lease_id: int
    data: bytes

    def head(self) -> bytes:
        """The frame's bytes before its data, so large data can be sent without a copy."""
        n = len(self.data)
        return _FRAME_IQ.pack(SET_DATA, _IQ.size + n, self.lease_id, n)

    def encode(self) -> bytes:
        return self.head() + self.data


class AccessData(NamedTuple):
    """Read the whole lease (the original's get)."""

    lease_id: int

    def encode(self) -> bytes:
        return _FRAME_I.pack(ACCESS_DATA, _I.size, self.lease_id)


DATA_HEAD_SIZE = _FRAME_IQ.size
DATA_HEAD = _FRAME_IQ  # a Data reply's head: type, payload length, id, data length


def data_head(lease_id: int, length: int) -> bytes:
    """The bytes of a Data reply before its ``length`` data bytes, which may be sent apart."""
    return _FRAME_IQ.pack(ACCESS_DATA, _IQ.size + length, lease_id, length)


class Data(NamedTuple):
    """The answer to AccessData and Read; empty data means no such lease."""

    lease_id: int
    data: bytes

    def encode(self) -> bytes:
        return data_head(self.lease_id, len(self.data)) + self.data


class DataSet(NamedTuple):
    """A status reply: OK or a negative status code."""

    status: int

    def encode(self) -> bytes:
        return _FRAME_I.pack(DATA_SET, _I.size, self.status)


# Every status reply, encoded once: most requests are answered with one.
STATUS_REPLIES = {status: DataSet(status).encode() for status in STATUS_TEXT}


class Release(NamedTuple):
    """End a lease now; its memory returns to the pool, zeroed."""

    lease_id: bytes

    def encode(self) -> bytes:
        return _FRAME_U.pack(RELEASE, _U.size, self.lease_id)


class Renew(NamedTuple):
    """Give a live lease a new duration counted from now."""

    lease_id: bytes
    duration_ms: int

    def encode(self) -> bytes:
        return _FRAME_UI.pack(RENEW, _UI.size, self.lease_id, self.duration_ms)


class Write(NamedTuple):
    """Write ``data`` at ``offset`` inside the lease, all or nothing."""

    lease_id: bytes
    offset: int
    data: bytes

    def head(self) -> bytes:
        """The frame's bytes before its data, so large data can be sent without a copy."""
        n = len(self.data)
        return _FRAME_UQQ.pack(WRITE, _UQQ.size + n, self.lease_id, self.offset, n)

    def encode(self) -> bytes:
        return self.head() + self.data


class Read(NamedTuple):
    """Read ``length`` bytes at ``offset``; a length of -1 reads to the end."""

    lease_id: bytes
    offset: int
    length: int

    def encode(self) -> bytes:
        return _FRAME_UQQ.pack(READ, _UQQ.size, self.lease_id, self.offset, self.length)


class Stats(NamedTuple):
    """Ask for the server's counters."""

    def encode(self) -> bytes:
        return HEADER.pack(STATS, 0)


class StatsReply(NamedTuple):
    """The server's counters, sent as ``name value`` lines of ASCII text."""

    stats: Dict[str, int]

    def encode(self) -> bytes:
        text = "".join("%s %d\n" % item for item in self.stats.items()).encode("ascii")
        return HEADER.pack(STATS_REPLY, len(text)) + text


class Auth(NamedTuple):
    """Present the shared token; the whole payload is the token."""

    token: bytes

    def encode(self) -> bytes:
        return HEADER.pack(AUTH, len(self.token)) + self.token


class Error(NamedTuple):
    """The answer to a frame the server could not serve at all."""

    status: int
    request_type: int

    def encode(self) -> bytes:
        return _FRAME_II.pack(ERROR, _II.size, self.status, self.request_type)


class Replace(NamedTuple):
    """Write ``data`` at the start of the lease and zero the rest, in one request."""

    lease_id: bytes
    data: bytes

    def head(self) -> bytes:
        """The frame's bytes before its data, so large data can be sent without a copy."""
        n = len(self.data)
        return _FRAME_UQ.pack(REPLACE, _UQ.size + n, self.lease_id, n)

    def encode(self) -> bytes:
        return self.head() + self.data


class Grant(NamedTuple):
    """Ask for ``size`` bytes for ``duration_ms`` milliseconds, under a 16-byte id."""

    size: int
    duration_ms: int

    def encode(self) -> bytes:
        return _FRAME_II.pack(GRANT, _II.size, self.size, self.duration_ms)


class Granted(NamedTuple):
    """The answer to Grant: the new lease's 16-byte id (a refusal is a DataSet)."""

    lease_id: bytes

    def encode(self) -> bytes:
        return _FRAME_U.pack(GRANTED, _U.size, self.lease_id)


class TimeToLive(NamedTuple):
    """Ask how long a live lease has left, the duration it was last given, and its size."""

    lease_id: bytes

    def encode(self) -> bytes:
        return _FRAME_U.pack(TIME_TO_LIVE, _U.size, self.lease_id)


class TimeToLiveReply(NamedTuple):
    """The answer to TimeToLive (an ended or unknown lease is answered DataSet -1)."""

    remaining_ms: int
    granted_ms: int  # the duration of the last grant or renew
    size: int

    def encode(self) -> bytes:
        return _FRAME_QQQ.pack(TIME_TO_LIVE_REPLY, _QQQ.size, *self)


class ListLeases(NamedTuple):
    """Ask for a page of at most ``limit`` of the caller's living leases, from ``cursor``:
    0 for the first page, then the ``next_cursor`` of the page before."""

    cursor: int
    limit: int

    def encode(self) -> bytes:
        return _FRAME_QI.pack(LIST_LEASES, _QI.size, self.cursor, self.limit)


class LeaseRow(NamedTuple):
    """One lease of a LeaseList."""

    lease_id: bytes  # its UUID, also for a lease that has a short id
    size: int
    remaining_ms: int
    short_id: int  # 0 when it has none


class LeaseList(NamedTuple):
    """A page of leases; ``next_cursor`` asks for the next page, 0 when there is none."""

    next_cursor: int
    rows: Tuple[LeaseRow, ...]

    def encode(self) -> bytes:
        rows = [_LEASE_ROW.pack(*row) for row in self.rows]
        return _counted_frame(LEASE_LIST, _QI, (self.next_cursor,), rows)


class RenewMany(NamedTuple):
    """Give each live lease of ``lease_ids`` (at most MAX_ROWS) ``duration_ms`` from now."""

    duration_ms: int
    lease_ids: Tuple[bytes, ...]

    def encode(self) -> bytes:
        ids = [_U.pack(lease_id) for lease_id in self.lease_ids]
        return _counted_frame(RENEW_MANY, _II, (self.duration_ms,), ids)


class RenewManyReply(NamedTuple):
    """The answer to RenewMany: the ids it could not renew, in the request's order."""

    lease_ids: Tuple[bytes, ...]

    def encode(self) -> bytes:
        ids = [_U.pack(lease_id) for lease_id in self.lease_ids]
        return _counted_frame(RENEW_MANY_REPLY, _I, (), ids)


# Lists (a page of leases, the ids of RenewMany) are fixed fields whose last counts the
# rows that follow, each already packed.  A list has at most MAX_ROWS rows.
MAX_ROWS = 1000
_LEASE_ROW = struct.Struct("<16sqqi")


def _counted_frame(
    msg_type: int, head: struct.Struct, fields: Tuple[int, ...], rows: List[bytes]
) -> bytes:
    payload = b"".join([head.pack(*fields, len(rows))] + rows)
    return HEADER.pack(msg_type, len(payload)) + payload


class PoolMap(NamedTuple):
    """Ask how the pool is used, cut into ``cells`` equal slices."""

    cells: int

    def encode(self) -> bytes:
        return _FRAME_I.pack(POOL_MAP, _I.size, self.cells)


_MAP_HEAD = struct.Struct("<qqqiii")
_Q = struct.Struct("<q")
_QQ = struct.Struct("<qq")


class PoolMapReply(NamedTuple):
    """The pool's picture: used bytes per slice, and the free blocks by size.

    ``fragmentation`` is 1 - largest free block / free bytes, in per mille.
    """

    pool_bytes: int
    free_bytes: int
    largest_free: int
    fragmentation: int
    used: Tuple[int, ...]
    free_blocks: Tuple[Tuple[int, int], ...]  # (block size, how many are free)

    def encode(self) -> bytes:
        head = _MAP_HEAD.pack(
            self.pool_bytes,
            self.free_bytes,
            self.largest_free,
            self.fragmentation,
            len(self.used),
            len(self.free_blocks),
        )
        cells = struct.pack("<%dq" % len(self.used), *self.used)
        sizes = b"".join(_QQ.pack(size, count) for size, count in self.free_blocks)
        payload = head + cells + sizes
        return HEADER.pack(POOL_MAP_REPLY, len(payload)) + payload


class DataFrame(NamedTuple):
    """The fixed fields of a large data frame whose bytes follow, to be streamed.

    The decoder yields this instead of the whole message when the data is at least its
    ``stream_min`` or over its limit; then ``length`` data bytes are owed to the caller,
    taken with :meth:`Decoder.read_payload`, :meth:`Decoder.payload_received` or
    :meth:`Decoder.skip_payload`.
    """

    msg_type: int
    lease_id: Union[int, bytes]  # SetData and Data carry a short id; Write and Replace 16 bytes
    offset: int  # 0 for SetData, Replace and Data
    length: int


REQUEST_TYPES = {
    Lease: LEASE,
    Replace: REPLACE,
    PoolMap: POOL_MAP,
    SetData: SET_DATA,
    AccessData: ACCESS_DATA,
    Release: RELEASE,
    Renew: RENEW,
    Write: WRITE,
    Read: READ,
    Stats: STATS,
    Auth: AUTH,
    Grant: GRANT,
    TimeToLive: TIME_TO_LIVE,
    ListLeases: LIST_LEASES,
    RenewMany: RENEW_MANY,
}


def fragmentation(free_bytes: int, largest_free: int) -> int:
    """1 - largest free block / free bytes, in per mille, as Stats and PoolMapReply carry it."""
    return 1000 * (free_bytes - largest_free) // free_bytes if free_bytes else 0


def request_name(request: object) -> str:
    """The command a request message stands for, as the logs and errors name it."""
    return TYPE_NAMES[REQUEST_TYPES[type(request)]]


Request = Union[
    Lease,
    SetData,
    AccessData,
    Release,
    Renew,
    Write,
    Read,
    Stats,
    Auth,
    Replace,
    PoolMap,
    Grant,
    TimeToLive,
    ListLeases,
    RenewMany,
]
Reply = Union[
    Leased,
    Data,
    DataSet,
    StatsReply,
    Error,
    PoolMapReply,
    Granted,
    TimeToLiveReply,
    LeaseList,
    RenewManyReply,
]
Message = Union[Request, Reply, DataFrame]


class ProtocolError(Exception):
    """Bytes that are not a valid message; ``status`` is the code to answer with."""

    def __init__(self, status: int, msg_type: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.msg_type = msg_type


class BadMessage(ProtocolError):
    """A whole frame whose content is wrong; the stream is still in step."""


class BadFrame(ProtocolError):
    """A frame header that cannot be honoured; nothing after it can be trusted."""


Parser = Callable[[bytearray, int, int], Message]


_SMALL_COPY = 4096  # below this, two copies through a slice cost less than a view's setup


def _copy(buf: bytearray, start: int, end: int) -> bytes:
    """A copy of ``buf[start:end]``; one copy (through a view) when it is large."""
    if end - start < _SMALL_COPY:
        return bytes(buf[start:end])
    with memoryview(buf) as view:
        return view[start:end].tobytes()


def _type_at(buf: bytearray, payload_start: int) -> int:
    """The message type in the header before the payload at ``payload_start``."""
    msg_type: int = HEADER.unpack_from(buf, payload_start - HEADER_SIZE)[0]
    return msg_type


def _fixed(layout: struct.Struct, make: "Type[Message]") -> Parser:
    """A parser for a payload of exactly ``layout.size`` bytes."""

    def parse(buf: bytearray, start: int, length: int) -> Message:
        if length != layout.size:
            raise BadMessage(
                MALFORMED,
                _type_at(buf, start),
                "payload is %d bytes, expected %d" % (length, layout.size),
            )
        # tuple.__new__ skips the NamedTuple's Python-level __new__; the layout fits its fields.
        return tuple.__new__(make, layout.unpack_from(buf, start))

    return parse


def _with_data(layout: struct.Struct, make: "Type[Message]") -> Parser:
    """A parser for fixed fields whose last one counts the data bytes that follow."""

    fixed = layout.size

    def parse(buf: bytearray, start: int, length: int) -> Message:
        if length < fixed:
            raise BadMessage(
                MALFORMED, _type_at(buf, start), "payload too short: %d bytes" % length
            )
        fields = layout.unpack_from(buf, start)
        if fields[-1] != length - fixed:
            raise BadMessage(
                MALFORMED,
                _type_at(buf, start),
                "data length %d disagrees with the frame's %d" % (fields[-1], length - fixed),
            )
        data = _copy(buf, start + fixed, start + length)
        return tuple.__new__(make, fields[:-1] + (data,))

    return parse


def _naming(parse: Parser) -> Parser:
    """``parse``, for a request whose first field is a 16-byte lease id, checked.

    A 1.x client's 4-byte id, read as 16 bytes, is never a version 4 UUID nor a short
    id's form, so its request is refused as malformed instead of reaching some lease.
    """

    def parse_named(buf: bytearray, start: int, length: int) -> Message:
        message = parse(buf, start, length)  # checks the length first
        if not is_lease_id(buf, start):
            raise _not_an_id(_type_at(buf, start))
        return message

    return parse_named


def _not_an_id(msg_type: int) -> BadMessage:
    return BadMessage(
        MALFORMED,
        msg_type,
        "the lease id is neither a version 4 UUID nor a short id (a 1.x client's 4-byte id?)",
    )


def _whole(make: Callable[[bytes], Message]) -> Parser:
    """A parser whose message is the whole payload."""

    def parse(buf: bytearray, start: int, length: int) -> Message:
        return make(_copy(buf, start, start + length))

    return parse


def _empty(make: "Type[Message]") -> Parser:
    return _fixed(struct.Struct(""), make)


def _parse_stats(text: bytes) -> StatsReply:
    try:
        pairs = (line.split(" ") for line in text.decode("ascii").splitlines())
        return StatsReply({name: int(value) for name, value in pairs})
    except ValueError as exc:
        raise BadMessage(MALFORMED, STATS_REPLY, "bad stats text: %s" % exc) from None


def _parse_pool_map(buf: bytearray, start: int, length: int) -> PoolMapReply:
    end = start + length
    if length < _MAP_HEAD.size:
        raise BadMessage(MALFORMED, POOL_MAP_REPLY, "map reply too short: %d bytes" % length)
    pool_bytes, free_bytes, largest, fragmentation, cells, classes = _MAP_HEAD.unpack_from(
        buf, start
    )
    expected = _MAP_HEAD.size + cells * _Q.size + classes * _QQ.size
    if cells < 0 or classes < 0 or length != expected:
        raise BadMessage(MALFORMED, POOL_MAP_REPLY, "inconsistent map reply: %d bytes" % length)
    at = start + _MAP_HEAD.size
    used = struct.unpack_from("<%dq" % cells, buf, at)
    at += cells * _Q.size
    free_blocks = tuple(_QQ.unpack_from(buf, offset) for offset in range(at, end, _QQ.size))
    return PoolMapReply(pool_bytes, free_bytes, largest, fragmentation, used, free_blocks)


def _counted(
    head: struct.Struct, row: struct.Struct, make: Callable[[Tuple[Any, ...], List[Any]], Message]
) -> Parser:
    """A parser for fixed fields whose last counts the rows of ``row`` that follow;
    ``make`` builds the message from the other fields and the rows."""

    def parse(buf: bytearray, start: int, length: int) -> Message:
        msg_type = _type_at(buf, start)
        if length < head.size:
            raise BadMessage(MALFORMED, msg_type, "payload too short: %d bytes" % length)
        *fields, count = head.unpack_from(buf, start)
        if not 0 <= count <= MAX_ROWS or length != head.size + count * row.size:
            raise BadMessage(
                MALFORMED,
                msg_type,
                "%d rows (at most %d) in a payload of %d bytes" % (count, MAX_ROWS, length),
            )
        at = start + head.size
        rows = [row.unpack_from(buf, at + n * row.size) for n in range(count)]
        return make(tuple(fields), rows)

    return parse


def _lease_list(fields: Tuple[Any, ...], rows: List[Any]) -> LeaseList:
    return LeaseList(fields[0], tuple(LeaseRow(*row) for row in rows))


def _renew_many(fields: Tuple[Any, ...], rows: List[Any]) -> RenewMany:
    return RenewMany(fields[0], tuple(lease_id for (lease_id,) in rows))


def _renew_many_reply(fields: Tuple[Any, ...], rows: List[Any]) -> RenewManyReply:
    return RenewManyReply(tuple(lease_id for (lease_id,) in rows))


REQUEST_PARSERS: Dict[int, Parser] = {
    LEASE: _fixed(_II, Lease),
    SET_DATA: _with_data(_IQ, SetData),
    ACCESS_DATA: _fixed(_I, AccessData),
    RELEASE: _naming(_fixed(_U, Release)),
    RENEW: _naming(_fixed(_UI, Renew)),
    WRITE: _naming(_with_data(_UQQ, Write)),
    READ: _naming(_fixed(_UQQ, Read)),
    STATS: _empty(Stats),
    AUTH: _whole(Auth),
    REPLACE: _naming(_with_data(_UQ, Replace)),
    POOL_MAP: _fixed(_I, PoolMap),
    GRANT: _fixed(_II, Grant),
    TIME_TO_LIVE: _naming(_fixed(_U, TimeToLive)),
    LIST_LEASES: _fixed(_QI, ListLeases),
    RENEW_MANY: _counted(_II, _U, _renew_many),
}

REPLY_PARSERS: Dict[int, Parser] = {
    LEASED: _fixed(_I, Leased),
    ACCESS_DATA: _with_data(_IQ, Data),
    DATA_SET: _fixed(_I, DataSet),
    STATS_REPLY: _whole(_parse_stats),
    ERROR: _fixed(_II, Error),
    POOL_MAP_REPLY: _parse_pool_map,
    GRANTED: _fixed(_U, Granted),
    TIME_TO_LIVE_REPLY: _fixed(_QQQ, TimeToLiveReply),
    LEASE_LIST: _counted(_QI, _LEASE_ROW, _lease_list),
    RENEW_MANY_REPLY: _counted(_I, _U, _renew_many_reply),
}

# The largest reply a client may meet: a whole lease of the largest size.
MAX_REPLY_PAYLOAD = _IQ.size + INT32_MAX
# Bytes a data-carrying request adds to its data.
WRITE_OVERHEAD = _UQQ.size
# Data frames at least this large are streamed: their bytes bypass the decoder's buffer.
STREAM_MIN = 64 * 1024
# The largest frame a server buffers whole: any request that is not streamed.
MAX_BUFFERED_REQUEST = STREAM_MIN + WRITE_OVERHEAD

# The fixed fields (their last one counts the data bytes) of frames that may be streamed.
_STREAMED_REQUESTS = {SET_DATA: _IQ, WRITE: _UQQ, REPLACE: _UQ}
_STREAMED_REPLIES = {ACCESS_DATA: _IQ}

# The common small requests, which a server may answer in one pass over its buffer
# (Decoder.small_requests): type -> the unpacker of a frame's header and fixed fields,
# the fields' size, and whether data bytes follow them (then the last field counts them).
# Their types are below 256, so the first byte of a frame finds its shape.
SmallShape = Tuple[Callable[[bytearray, int], Tuple[Any, ...]], int, bool]


def _small(layout: struct.Struct, carries_data: bool) -> SmallShape:
    """The unpacker of a whole frame's header and fixed fields, the fields' size, and
    whether data follow them."""
    return struct.Struct("<iq" + layout.format[1:]).unpack_from, layout.size, carries_data


SMALL_REQUESTS: Dict[int, SmallShape] = {
    READ: _small(_UQQ, False),
    WRITE: _small(_UQQ, True),
    ACCESS_DATA: _small(_I, False),
    SET_DATA: _small(_IQ, True),
    RENEW: _small(_UI, False),
    RELEASE: _small(_U, False),
    REPLACE: _small(_UQ, True),
    GRANT: _small(_II, False),
    LEASE: _small(_II, False),
}
# What Decoder.small_requests yields: where the frame ends in the decoder's buffer (a
# data frame's data are the last bytes before it), and its header's and fixed fields'
# values: (type, payload length, field, ...).
SmallRequest = Tuple[int, Tuple[Any, ...]]


# A small shape as the one pass reads it: the unpacker, the bytes a whole header and the
# fixed fields take, the fields' size, whether data follow, and the type it belongs to.
ByteShapes = Tuple[Optional[Tuple[Any, ...]], ...]


def shapes_by_first_byte(small: Dict[int, SmallShape]) -> ByteShapes:
    """The small shapes by a frame's first byte (None: it starts no small request)."""
    by_byte: List[Optional[Tuple[Any, ...]]] = [None] * 256
    for msg_type, (unpack, fixed, carries_data) in small.items():
        by_byte[msg_type] = (unpack, HEADER_SIZE + fixed, fixed, carries_data, msg_type)
    return tuple(by_byte)


_SMALL_REQUESTS_BY_BYTE = shapes_by_first_byte(SMALL_REQUESTS)  # made once, not per connection
_NO_SMALL_SHAPES: ByteShapes = (None,) * 256  # a decoder without a one pass


class Decoder:
    """Turns a byte stream, split anywhere, into whole messages.

    A frame's length is checked against ``max_payload`` as soon as its header is
    complete, before the payload is waited for, so a hostile length costs nothing.
    A data frame whose data reaches ``stream_min``, or exceeds ``max_payload`` while
    still fitting a lease, comes out as a :class:`DataFrame` as soon as its fixed fields
    have arrived; its data is then the caller's to take, so it is never buffered here.
    """

    def __init__(
        self,
        parsers: Dict[int, Parser],
        max_payload: int,
        streamed: Optional[Dict[int, struct.Struct]] = None,
        stream_min: int = STREAM_MIN,
        small: Optional[ByteShapes] = None,
    ) -> None:
        self._parsers = parsers
        self._small_by_byte = small or _NO_SMALL_SHAPES
        self._max_payload = max_payload
        self._streamed = streamed or {}
        self._stream_min = stream_min
        # Frames no longer than this are always whole messages: no stream, no refusal.
        self._whole_max = min(max_payload, stream_min - 1) if streamed else max_payload
        self.buffer = bytearray()  # the bytes received: small_requests' frames are read here
        self._start = 0
        self._broken: Optional[BadFrame] = None
        self.payload_left = 0  # data bytes of the last DataFrame not yet taken
        self._discard_left = 0  # data bytes to drop as they arrive

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        if self._discard_left and self._start == len(self.buffer):
            dropped = min(self._discard_left, len(data))
            self._discard_left -= dropped
            data = data[dropped:]
        self.buffer += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet consumed."""
        return len(self.buffer) - self._start

    @property
    def in_frame(self) -> bool:
        """Whether part of a frame is waiting for the rest."""
        return bool(len(self.buffer) > self._start or self.payload_left or self._discard_left)

    def read_payload(self, into: memoryview) -> int:
        """Move buffered data bytes of the current DataFrame into ``into``; returns how many."""
        n = min(len(into), self.payload_left, self.buffered)
        into[:n] = memoryview(self.buffer)[self._start : self._start + n]
        self._start += n
        self.payload_left -= n
        return n

    def payload_received(self, n: int) -> None:
        """Count ``n`` data bytes that the caller received itself, past the buffer."""
        if self.buffered or n > self.payload_left:
            raise ValueError("%d data bytes received out of turn" % n)
        self.payload_left -= n

    def skip_payload(self) -> None:
        """Drop the rest of the current DataFrame's data, buffered or still to come."""
        self._discard_left += self.payload_left
        self.payload_left = 0
        self._drop_discarded()

    def next_message(self) -> Optional[Message]:
        """The next whole message (or DataFrame), or None until more bytes are fed.

        Raises BadMessage for a frame that was consumed but is not valid (decoding
        may go on), and BadFrame when the stream is beyond repair.  While a
        DataFrame's data is owed to the caller, there is no next message.
        """
        if self._broken is not None:
            raise self._broken
        if self.payload_left or (self._discard_left and not self._drop_discarded()):
            return None
        buf = self.buffer
        start = self._start
        available = len(buf) - start
        if available < HEADER_SIZE:
            self._compact()
            return None
        msg_type, length = HEADER.unpack_from(buf, start)
        if not 0 <= length <= self._whole_max:  # a frame to stream, or one to refuse
            fixed = self._streamed.get(msg_type)
            if (
                fixed is not None
                and length >= fixed.size
                and (length - fixed.size >= self._stream_min or length > self._max_payload)
            ):
                return self._data_frame(msg_type, length, fixed)
            if length < 0 or length > self._max_payload:
                self._broken = BadFrame(
                    FRAME_TOO_LARGE,
                    msg_type,
                    "frame length %d outside 0..%d" % (length, self._max_payload),
                )
                raise self._broken
        if available < HEADER_SIZE + length:
            self._compact()
            return None
        self._start = start + HEADER_SIZE + length
        parser = self._parsers.get(msg_type)
        if parser is None:
            raise BadMessage(UNKNOWN_TYPE, msg_type, "unknown message type %d" % msg_type)
        return parser(buf, start + HEADER_SIZE, length)

    def small_requests(self) -> Generator[SmallRequest, None, None]:
        """The whole frames buffered, in order, while each is a small request of a fixed
        layout that fits it (the ``small`` shapes, by message type): see SmallRequest.

        One pass, with no message object: the server answers the common requests straight
        from here.  A frame is consumed only when the next one is asked for, or when the
        frames run out; a caller that stops at a frame leaves it to ``next_message``, which
        decodes or refuses it as ever.  The pass must be over (run out, or closed) before
        the decoder is used again: it records what it consumed then.  Any frame this does
        not yield (a large, malformed or unknown one) ends it, so it is seen there too;
        when it ends with every byte consumed, ``buffered`` is 0.
        """
        if self._broken is not None or self.payload_left or self._discard_left:
            return
        buf = self.buffer
        shapes = self._small_by_byte
        whole_max = self._whole_max
        start = self._start
        end = len(buf)
        try:
            while start < end:
                shape = shapes[buf[start]]  # the type's low byte; the whole type is checked below
                if shape is None:
                    return
                unpack, whole_fixed, fixed, carries_data, msg_type = shape
                if end - start < whole_fixed:
                    return
                frame = unpack(buf, start)
                length = frame[1]
                frame_end = start + HEADER_SIZE + length
                if frame[0] != msg_type or frame_end > end:
                    return
                if carries_data:
                    if not fixed <= length <= whole_max or frame[-1] != length - fixed:
                        return
                elif length != fixed:
                    return
                yield frame_end, frame
                start = frame_end
        finally:
            self._start = start  # up to the frame the caller stopped at, if it did
        self._compact()  # every byte is consumed: none need be kept

    def _data_frame(self, msg_type: int, length: int, fixed: struct.Struct) -> Optional[DataFrame]:
        data_length = length - fixed.size
        if data_length > INT32_MAX:
            self._broken = BadFrame(
                FRAME_TOO_LARGE, msg_type, "data length %d is over any lease" % data_length
            )
            raise self._broken
        if self.buffered < HEADER_SIZE + fixed.size:
            self._compact()
            return None
        *fields, count = fixed.unpack_from(self.buffer, self._start + HEADER_SIZE)
        self._start += HEADER_SIZE + fixed.size
        if count != data_length:
            self._discard_left = data_length
            self._drop_discarded()
            raise BadMessage(
                MALFORMED,
                msg_type,
                "data length %d disagrees with the frame's %d" % (count, data_length),
            )
        if isinstance(fields[0], bytes) and not is_lease_id(fields[0]):
            self._discard_left = data_length
            self._drop_discarded()
            raise _not_an_id(msg_type)
        self.payload_left = data_length
        offset = fields[1] if len(fields) > 1 else 0
        return DataFrame(msg_type, fields[0], offset, data_length)

    def _drop_discarded(self) -> bool:
        """Drop buffered bytes owed to the discard; True once nothing more is owed."""
        dropped = min(self._discard_left, self.buffered)
        self._start += dropped
        self._discard_left -= dropped
        self._compact()
        return not self._discard_left

    def _compact(self) -> None:
        if self._start:
            del self.buffer[: self._start]
            self._start = 0


def request_decoder(max_payload: int = MAX_BUFFERED_REQUEST) -> Decoder:
    """A decoder for the server's side: large writes come out as DataFrames."""
    return Decoder(
        REQUEST_PARSERS, max_payload, _STREAMED_REQUESTS, small=_SMALL_REQUESTS_BY_BYTE
    )


def reply_decoder(
    max_payload: int = MAX_REPLY_PAYLOAD, stream_min: Optional[int] = None
) -> Decoder:
    """A decoder for the client's side; with ``stream_min``, large Data replies stream."""
    if stream_min is None:
        return Decoder(REPLY_PARSERS, max_payload)
    return Decoder(REPLY_PARSERS, max_payload, _STREAMED_REPLIES, stream_min)
