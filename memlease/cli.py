"""MemoryLease client's command line: one command a run, printed in the seed's words.

Run as ``python3 memlease_client.py HOST [PORT] COMMAND ...`` or the installed
``memlease-client``.  It uses the blocking client for one server and the cluster client
for a host list; the API lives in memlease_client.
"""

import argparse
import base64
import json
import math
import os
import re
import signal
import ssl
import sys
from typing import Any, Dict, List, Mapping, NoReturn, Optional, TextIO, Union

import protocol
from memlease import picture
from memlease.cluster import (
    MemLeaseCluster,
    parse_handle,
    parse_lease_id,
    parse_server,
    parse_servers,
    same_server,
)
from memlease.program import program_name, version_line
from memlease.units import format_size, parse_duration_ms, parse_size
from memlease_client import (
    DEFAULT_DURATION_MS,
    DEFAULT_PORT,
    MAX_TIMEOUT,
    InvalidArgument,
    LeaseInfo,
    LeaseLost,
    LeaseNotFound,
    MemLeaseClient,
    MemLeaseConnectionError,
    MemLeaseError,
    MemLeaseProtocolError,
    OutOfMemory,
    OutOfRange,
    QuotaExceeded,
    ServerBusy,
    TooLarge,
    Unauthorized,
    _ClosedBeforeReply,
    _NotTLS,
    address_text,
    client_tls_context,
    unix_path,
)

_EPILOG = """\
commands:
  lease SIZE [MS]      lease SIZE bytes (or 64K, 16M...) for MS milliseconds (default 5000;
                       or with a unit: 500ms, 5s, 2m, 1h)
  set ID DATA          write the text DATA with a trailing NUL, as the C++ client does
                       (--no-nul: the text alone)
  set ID --file PATH   write the bytes of PATH ('-' reads standard input)
  get ID [--raw]       print the lease as text up to its first NUL, or --raw: its bytes
  renew ID MS          make the lease last MS milliseconds from now
  release ID           end the lease now
  ttl ID               print the time the lease has left, its last duration and its size
  leases               list your living leases: ID, size and time left, one a line
  keep ID              renew the lease every third of its duration until Ctrl-C or
                       SIGTERM (exit 0); exit 1 with the reason if it is lost
  stats                print the server's counters
  map                  draw the pool: what is leased, what is free, how it is split

set writes from the start of the lease (or from --offset N) and leaves the bytes after
what it writes as they were: add --truncate to zero them in the same request.
get takes --offset N and --length N.  Options may come anywhere on the line.

--json prints one JSON object instead, on every command: the lease id (a string), what
was done, get's text (UTF-8, up to the first NUL; with --raw, "base64": every byte read),
stats' counters (a cluster: the sums, with "server": null, then one object a line per
server); a failure is {"error": ..., "status": ..., "reason": ...} with the same exit
status.

host may name its port, as in localhost:413 or [::1]:413 (IPv6 in brackets), which then
beats the port word; unix:PATH is the server's Unix socket at PATH (no port, no TLS).
host may list servers, host:port,host:port,...: they are used as one cluster, and lease
ids then name their server, as in a:412/123; the port word is the port of every server
listed without one.

examples:
  %(prog)s localhost 412 lease 1024 5000
  %(prog)s localhost set 123 "this is some text"
  %(prog)s localhost get 123
  %(prog)s localhost get 123 --raw --offset 16 --length 8 > part.bin
  tar c data | %(prog)s localhost set 123 --file - --truncate
  %(prog)s localhost map
  id=$(%(prog)s localhost lease 1K 5s --json | python3 -c \
      'import json,sys; print(json.load(sys.stdin)["lease_id"])')
  %(prog)s unix:/run/memlease/memlease.sock stats

The port defaults to 412.  $MEMLEASE_TOKEN is presented when set (--token-file PATH:
the first line of PATH).
Exit status: 0 done; 1 refused, not found, cannot connect or a cluster's server down;
2 usage error; 130 interrupted.  A pipe's reader that leaves (| head) changes nothing."""

CLI_NAME = "memlease-client"  # when the program's own name is unknown
COMMANDS = ("lease", "set", "get", "renew", "release", "ttl", "leases", "keep", "stats", "map")
DEFAULT_MAP_CELLS = 256
MAX_MAP_CELLS = 1 << 16
TOKEN_LINE_LIMIT = 1 << 16  # bytes read of a token file's line: /dev/zero must not fill memory
_VALUE_OPTIONS = (
    "--timeout",
    "--token-file",
    "--tls-ca",
    "--tls-cert",
    "--tls-key",
    "--file",
    "--offset",
    "--length",
    "--cells",
)
# A word argparse takes as a value, not an option, though it starts with '-'.
_NEGATIVE_NUMBER = re.compile(r"-\d+|-\d*\.\d+")
_NOT_FOUND_TEXT = "lease %s does not exist: it expired, was released, or never was"


class _UsageError(Exception):
    """A command line that cannot run: reported in one line, exit status 2."""


class _OutputFailed(Exception):
    """Standard output cannot take what we write: full, closed, or its reader gone."""


class _NotText(Exception):
    """A lease's text that JSON cannot carry as text: its bytes are not UTF-8."""


class _Parser(argparse.ArgumentParser):
    """An argument parser that raises its errors, so that main() reports them in one line,
    and writes its help as every other output is written."""

    command = ""  # the sub-command this parser reads, named in its errors

    def error(self, message: str) -> NoReturn:
        raise _UsageError("%s: %s" % (self.command, message) if self.command else message)

    def _print_message(self, message: str, file: object = None) -> None:
        if message:
            _emit(message.rstrip("\n"))


def _number_arg(text: str, what: str) -> int:
    """A whole number from the command line; argparse turns the error into a usage line."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a whole number of %s" % (text, what)) from None


def _at_most_int32(value: int, text: str) -> int:
    if value > protocol.INT32_MAX:
        raise argparse.ArgumentTypeError(
            "%s is over the largest lease, %d bytes (2 GiB - 1)" % (text, protocol.INT32_MAX)
        )
    return value


def _lease_size(text: str) -> int:
    size = parse_size(text)
    if size < 1:
        raise argparse.ArgumentTypeError("a lease holds at least 1 byte, not %r" % text)
    return _at_most_int32(size, "%d bytes" % size)


def _duration(text: str) -> int:
    value = parse_duration_ms(text)
    if not 0 < value <= protocol.INT32_MAX:
        raise argparse.ArgumentTypeError(
            "a duration is 1 to %d milliseconds, not %r" % (protocol.INT32_MAX, text)
        )
    return value


def _position(text: str) -> int:
    value = _number_arg(text, "bytes")
    if value < 0:
        raise argparse.ArgumentTypeError("%r must not be negative" % text)
    return _at_most_int32(value, "%d bytes" % value)


def _cells(text: str) -> int:
    value = _number_arg(text, "cells")
    if not 0 < value <= MAX_MAP_CELLS:
        raise argparse.ArgumentTypeError(
            "the map has 1 to %d cells, not %r" % (MAX_MAP_CELLS, text)
        )
    return value


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError("%r is not a port number (1-65535)" % text)
    return int(text)


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(
            "%r is not a positive number of seconds, at most %d (a year)" % (text, MAX_TIMEOUT)
        )
    return value


def _host(text: str) -> str:
    """A host name the resolver can take (or a list of them, for a cluster), or a Unix
    socket's ``unix:PATH``."""
    try:
        text.encode("utf-8" if "," in text or unix_path(text) is not None else "idna")
    except UnicodeError:
        raise argparse.ArgumentTypeError("%r is not a host name" % text) from None
    return text


def _lease_ref(text: str) -> str:
    """A lease id (a UUID, or a short id's number), or a cluster's server/id handle;
    checked against the host when run."""
    if parse_lease_id(text.rsplit("/", 1)[-1]) is None:
        raise argparse.ArgumentTypeError("%r is not a lease id" % text)
    return text


def _add_connection_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """Options taken before or after the command: defaults are set once, at the top."""

    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    def explain(text: str) -> str:
        return text if top else argparse.SUPPRESS  # listed once, in the main --help

    parser.add_argument(
        "--timeout",
        type=_timeout,
        default=default(5.0),
        metavar="S",
        help=explain("seconds to wait for the server (default 5)"),
    )
    parser.add_argument(
        "--token-file",
        default=default(None),
        metavar="PATH",
        help=explain("present the token in this file (its first line; default $MEMLEASE_TOKEN)"),
    )
    parser.add_argument(
        "--tls", action="store_true", default=default(False), help=explain("connect with TLS")
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help=explain("print one JSON object (a failure too): for scripts"),
    )
    for name, what in (
        ("ca", "CA certificates to trust"),
        ("cert", "client certificate"),
        ("key", "client certificate's key"),
    ):
        parser.add_argument(
            "--tls-" + name,
            default=default(None),
            metavar="FILE",
            help=explain("PEM file of the %s (implies --tls)" % what),
        )


def build_parser(prog: str = CLI_NAME) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        usage="%(prog)s host [port] command [leaseid|size] [duration|data] [options]",
        description="Lease, write, read, renew and release memory on a MemoryLease server.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=version_line(prog))
    parser.add_argument("host", type=_host, help="host running the server, e.g. localhost")
    parser.add_argument("port", type=_port, help="the server's port (default %d)" % DEFAULT_PORT)
    _add_connection_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="command", parser_class=_Parser)
    commands.required = True

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            prog="%s host [port] %s" % (prog, name),
            help=summary,
            allow_abbrev=False,
        )
        sub.command = name
        _add_connection_options(sub, top=False)
        return sub

    lease = command("lease", "lease memory")
    lease.add_argument("size", type=_lease_size, help="bytes, or with K, M, G (powers of 1024)")
    lease.add_argument(
        "duration",
        type=_duration,
        nargs="?",
        default=DEFAULT_DURATION_MS,
        help="milliseconds",
    )
    set_ = command("set", "write to a lease")
    set_.add_argument("lease_id", type=_lease_ref)
    set_.add_argument("data", nargs="?", help="text, sent with a trailing NUL")
    set_.add_argument(
        "--file", metavar="PATH", help="write this file's bytes ('-': standard input)"
    )
    set_.add_argument("--no-nul", action="store_true", help="send DATA without the trailing NUL")
    set_.add_argument(
        "--truncate",
        action="store_true",
        help="zero the rest of the lease (without it, bytes after the data are left as they were)",
    )
    set_.add_argument("--offset", type=_position, default=0, help="where to write (default 0)")
    get = command("get", "read a lease")
    get.add_argument("lease_id", type=_lease_ref)
    get.add_argument("--raw", action="store_true", help="write the exact bytes to standard output")
    get.add_argument("--offset", type=_position, default=0, help="where to start (default 0)")
    get.add_argument("--length", type=_position, help="how many bytes (default: to the end)")
    renew = command("renew", "extend a lease")
    renew.add_argument("lease_id", type=_lease_ref)
    renew.add_argument("duration", type=_duration, help="milliseconds from now")
    release = command("release", "end a lease")
    release.add_argument("lease_id", type=_lease_ref)
    ttl = command("ttl", "how long a lease has left")
    ttl.add_argument("lease_id", type=_lease_ref)
    command("leases", "list your leases")
    keep = command("keep", "keep a lease alive until interrupted")
    keep.add_argument("lease_id", type=_lease_ref)
    command("stats", "show the server's counters")
    map_ = command("map", "draw how the pool is used")
    map_.add_argument(
        "--cells",
        type=_cells,
        default=DEFAULT_MAP_CELLS,
        help="slices of the pool to show (default %d)" % DEFAULT_MAP_CELLS,
    )
    return parser


def _in_order(argv: List[str]) -> List[str]:
    """The words as argparse takes them: host, port (the default when the word after the
    host is not a number), command, every option with its value, the command's words.

    argparse takes a command's options only after the command, and would take
    ``set ID --no-nul DATA`` as a set without DATA: in this order both work.
    Everything from ``--`` on stays last, as it is.
    """
    cut = argv.index("--") if "--" in argv else len(argv)
    words: List[str] = []
    options: List[str] = []
    takes_value = False
    for word in argv[:cut]:
        is_option = len(word) > 1 and word.startswith("-") and " " not in word
        if takes_value or (is_option and not _NEGATIVE_NUMBER.fullmatch(word)):
            options.append(word)
            takes_value = not takes_value and word in _VALUE_OPTIONS
        else:
            words.append(word)
    helping = "-h" in options or "--help" in options
    if not words:
        if helping or "--version" in options:
            return options
        raise _UsageError("a host and a command are required")
    if helping and words[0] in COMMANDS:  # `map --help`: the command's help needs no host
        return ["localhost", str(DEFAULT_PORT), words[0], "--help"]
    if len(words) == 1 or not words[1].isdigit():
        words.insert(1, str(DEFAULT_PORT))
    return words[:3] + options + words[3:] + argv[cut:]


def _payload(args: argparse.Namespace) -> bytes:
    """The bytes ``set`` sends: the text as the shell passed it, or a file's bytes."""
    if (args.data is None) == (args.file is None):
        raise _UsageError("set: give DATA or --file PATH (one of them)")
    if args.no_nul and args.file is not None:
        raise _UsageError("set: --no-nul is for DATA; --file sends the file's bytes as they are")
    if args.truncate and args.offset:
        raise _UsageError("set: --truncate writes from the start of the lease, without --offset")
    if args.file is None:
        return os.fsencode(args.data) + (b"" if args.no_nul else b"\0")
    name = "standard input" if args.file == "-" else args.file
    size = 0
    try:
        if args.file != "-":
            with open(args.file, "rb") as file:
                size = os.fstat(file.fileno()).st_size  # a regular file tells at once
                data = b"" if size > protocol.INT32_MAX else file.read(protocol.INT32_MAX + 1)
        elif sys.stdin is None:
            raise OSError("it is closed")
        else:
            data = sys.stdin.buffer.read(protocol.INT32_MAX + 1)
    except OSError as exc:
        raise _UsageError("set: cannot read %s: %s" % (name, exc.strerror or exc)) from None
    if len(data) > protocol.INT32_MAX or size > protocol.INT32_MAX:  # or /dev/zero, say
        raise _UsageError(
            "set: %s holds more than the largest lease, %d bytes" % (name, protocol.INT32_MAX)
        )
    return data


class _Reader:
    """Whether the reader of our output has gone (``cmd | head -1``): then nothing more is
    written, and the run ends with the command's own status, the same every time, whether
    the reader left before or after the last write."""

    gone = False


def _emit(line: Union[str, bytes, bytearray, memoryview], end: bytes = b"\n") -> None:
    """Write a line to standard output now: bytes as they are, text escaped if need be.
    The end is written apart, so that a large value is not copied to append it."""
    if _Reader.gone:
        return
    stream = sys.stdout
    try:
        if stream is None:
            raise OSError("standard output is closed")
        stream.buffer.write(_encode(line, stream.encoding) if isinstance(line, str) else line)
        stream.buffer.write(end)
        stream.buffer.flush()
    except BrokenPipeError:
        _Reader.gone = True
        _silence(stream)
    except OSError as exc:
        raise _OutputFailed(exc) from None


def _complain(line: str) -> None:
    """One line to standard error; if that fails too, there is nobody left to tell."""
    stream = sys.stderr
    if stream is None:
        return
    try:
        stream.buffer.write(_encode(line, stream.encoding) + b"\n")
        stream.buffer.flush()
    except OSError:
        _silence(stream)


def _encode(text: str, encoding: Optional[str]) -> bytes:
    """The text in the stream's encoding; what it cannot show, as backslash escapes."""
    return text.encode(encoding or "utf-8", "backslashreplace")


def _silence(stream: Optional[TextIO]) -> None:
    """Point a failed stream at /dev/null, so that its flush at exit cannot fail again."""
    if stream is not None:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        except (OSError, ValueError):
            pass


def _tls_from_args(args: argparse.Namespace) -> Optional[ssl.SSLContext]:
    """The TLS context the options ask for; any of them means TLS."""
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key):
        return None
    if args.tls_key and not args.tls_cert:
        raise _UsageError("--tls-key needs --tls-cert")
    try:
        return client_tls_context(args.tls_ca, args.tls_cert, args.tls_key)
    except InvalidArgument as exc:
        raise _UsageError(str(exc)) from None


Leases = Union[MemLeaseClient, MemLeaseCluster]
# A server's lease id (int), or a cluster's handle text (str): each client takes its own.
LeaseKey = Any


def _open(args: argparse.Namespace) -> Leases:
    """A client for the host, or for the cluster when the host lists several servers."""
    tls = _tls_from_args(args)
    token = _token_from_file(args.token_file)
    try:
        if "," not in args.host:  # a port in the host (a:413, [::1]:413) beats the port word
            host, port = parse_server(args.host, args.port)
            return MemLeaseClient(host, port, timeout=args.timeout, token=token, tls=tls)
        servers = parse_servers(args.host, args.port)
        return MemLeaseCluster(servers, timeout=args.timeout, token=token, tls=tls)
    except InvalidArgument as exc:
        raise _UsageError(str(exc)) from None


def _token_from_file(path: Optional[str]) -> Optional[bytes]:
    """The token of ``--token-file``: its first line, without the line's end."""
    if path is None:
        return None
    try:
        with open(path, "rb") as file:
            token = file.readline(TOKEN_LINE_LIMIT).rstrip(b"\r\n")
    except OSError as exc:
        raise _UsageError(
            "cannot read the token file %s: %s" % (path, exc.strerror or exc)
        ) from None
    if not token:
        raise _UsageError("the token file %s holds no token" % path)
    return token


def _lease_key(client: Leases, text: str) -> LeaseKey:
    """The id as the client takes it: a number for one server, the handle for a cluster."""
    if not isinstance(client, MemLeaseClient):
        return text
    if "/" not in text:
        return parse_lease_id(text)
    try:
        handle = parse_handle(text)
    except InvalidArgument as exc:
        raise _UsageError(str(exc)) from None
    here = address_text(client.host, client.port)
    if not same_server(handle.server, here):
        raise _UsageError("%s names the server %s, not %s" % (text, handle.server, here))
    return handle.lease_id


def _run(client: Leases, args: argparse.Namespace, payload: bytes) -> int:
    """The command, and its line in the seed's words (or its JSON object); the exit status."""
    command = args.command
    if command == "lease":
        lease_id = client.lease(args.size, args.duration)
        _say(
            args,
            "You have leased %d bytes for %d MS with id %s" % (args.size, args.duration, lease_id),
            {"lease_id": str(lease_id), "size": args.size, "duration_ms": args.duration},
        )
        return 0
    if command == "stats":
        return _print_stats(client, args)
    if command == "map":
        _draw_map(client, args)
        return 0
    if command == "leases":  # with --json, one object a line
        for info in client.leases():
            short = " (short id %d)" % info.short_id if info.short_id else ""
            left = "%d bytes, %d MS left" % (info.size, info.remaining_ms)
            _say(args, "%s %s%s" % (info.lease_id, left, short), _listed(info))
        return 0
    key = _lease_key(client, args.lease_id)
    done = {"lease_id": str(args.lease_id)}
    if command == "set":
        if args.truncate:
            client.set(key, payload, truncate=True)
        else:
            client.set(key, payload, args.offset)
        written = {"written": len(payload), "offset": args.offset, "truncate": args.truncate}
        _say(args, "Data set for lease %s" % args.lease_id, dict(done, **written))
    elif command == "get":
        data = client.get(key, args.offset, args.length)
        if args.json:
            _emit(_as_json(dict(done, **_read(args, data))))
        elif args.raw:
            _emit(data, end=b"")
        else:
            text = data.split(b"\0", 1)[0]
            _emit(b"Data get for lease %s: %s" % (os.fsencode(args.lease_id), text))
    elif command == "renew":
        client.renew(key, args.duration)
        renewed = dict(done, duration_ms=args.duration)
        _say(args, "Lease %s renewed for %d MS" % (args.lease_id, args.duration), renewed)
    elif command == "ttl":
        ttl = client.ttl(key)
        line = "Lease %s has %d MS left of %d MS, %d bytes" % (
            args.lease_id,
            ttl.remaining_ms,
            ttl.granted_ms,
            ttl.size,
        )
        _say(args, line, dict(done, **ttl._asdict()))
    elif command == "keep":
        _keep(client, key, args)
    else:
        client.release(key)
        _say(args, "Lease %s released" % args.lease_id, done)
    return 0


def _say(args: argparse.Namespace, line: str, fields: Mapping[str, object]) -> None:
    """A command's result: its line, or with --json its fields as one JSON object."""
    _emit(_as_json(fields) if args.json else line)


def _as_json(fields: Mapping[str, object]) -> str:
    """One JSON object on one line, in ASCII: whatever the locale, it reads back whole."""
    return json.dumps(fields)


def _read(args: argparse.Namespace, data: bytes) -> Dict[str, object]:
    """What get --json says of the bytes read: the text up to the first NUL, or with
    --raw every byte in base64; bytes that are not UTF-8 are no text."""
    fields: Dict[str, object] = {"offset": args.offset, "length": len(data)}
    if args.raw:
        fields["base64"] = base64.b64encode(data).decode("ascii")
        return fields
    try:
        fields["text"] = data.split(b"\0", 1)[0].decode("utf-8")
    except UnicodeDecodeError:
        raise _NotText() from None
    return fields


def _listed(info: LeaseInfo) -> Dict[str, object]:
    """A listed lease's fields for --json: its id (or handle) as text."""
    return dict(info._asdict(), lease_id=str(info.lease_id))


def _keep(client: Leases, key: LeaseKey, args: argparse.Namespace) -> None:
    """Renew the lease until Ctrl-C or SIGTERM, which end the run well; a lost lease
    raises LeaseLost when the block is left."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop as Ctrl-C does
    keeper = client.keepalive(key)
    name = args.lease_id
    try:
        with keeper:
            _say(
                args,
                "Keeping lease %s alive: renewed for %d MS every %d MS until interrupted"
                % (name, keeper.duration_ms, keeper.duration_ms // 3),
                {"lease_id": str(name), "kept": True, "duration_ms": keeper.duration_ms},
            )
            keeper.wait_lost()
    except KeyboardInterrupt:
        if not keeper.duration_ms:  # before the keeping began
            raise
        _say(
            args,
            "Lease %s no longer kept alive: it ends within %d MS unless renewed"
            % (name, keeper.duration_ms),
            {"lease_id": str(name), "kept": False, "duration_ms": keeper.duration_ms},
        )


def _print_stats(client: Leases, args: argparse.Namespace) -> int:
    """``name value`` lines; for a cluster the sums, then ``server name value`` lines, and
    ``server down reason`` lines: a server down makes the status 1, all down an error."""
    if isinstance(client, MemLeaseClient):
        _print_counters(args, address_text(client.host, client.port), client.stats())
        return 0
    stats = client.stats()
    if not stats.servers:
        raise MemLeaseConnectionError(
            "no server is up: "
            + "; ".join("%s (%s)" % (server, why) for server, why in stats.down.items())
        )
    _print_counters(args, None, stats.total)
    for server, counters in stats.servers.items():
        _print_counters(args, server, counters, server + " ")
    for server, reason in stats.down.items():
        down = {"server": server, "error": "down", "status": None, "reason": reason}
        _say(args, "%s down %s" % (server, reason), down)
    return 1 if stats.down else 0


def _print_counters(
    args: argparse.Namespace, server: Optional[str], counters: Dict[str, int], prefix: str = ""
) -> None:
    """One server's counters (``server`` None: a cluster's sums) as ``name value`` lines
    after ``prefix``, or as one JSON object."""
    if args.json:
        _emit(_as_json({"server": server, "stats": counters}))
        return
    for name, value in counters.items():
        _emit("%s%s %d" % (prefix, name, value))


def _draw_map(client: Leases, args: argparse.Namespace) -> None:
    """The picture of the pool, in block characters if standard output can show them."""
    if not isinstance(client, MemLeaseClient):
        raise _UsageError("map: draws one server's pool: give one host")
    pool = client.pool_map(args.cells)
    if args.json:
        _emit(_as_json(pool._asdict()))
        return
    encoding = (sys.stdout.encoding if sys.stdout else None) or "ascii"
    try:
        "".join(picture.BLOCKS).encode(encoding)
        shades = picture.BLOCKS
    except UnicodeEncodeError:
        shades = picture.ASCII
    _emit(picture.render(pool, shades))


def _first_line(args: argparse.Namespace, error: MemLeaseError) -> str:
    """The seed's line for a refused command, and the same form for the newer ones."""
    if args.command == "lease":
        if isinstance(error, (OutOfMemory, TooLarge)):
            return "Failed to create lease due to insufficient resources on the server."
        return "Failed to create lease."
    if args.command == "get" and isinstance(error, LeaseNotFound):
        return "Data not found for %s." % args.lease_id
    note = _status_note(error.status)
    if args.command in ("stats", "map", "leases"):
        return "Error: unable %s%s" % (args.command, note)
    return "Error: unable %s for lease %s%s" % (args.command, args.lease_id, note)


def _refusal_reason(
    client: Leases, args: argparse.Namespace, payload: bytes, error: MemLeaseError
) -> str:
    """Why the server refused, in the user's terms; asks the server for sizes if need be.
    The status code is not in it: the reason line adds it."""
    status = error.status
    text = protocol.STATUS_TEXT.get(status, str(error)) if status is not None else str(error)
    if isinstance(error, LeaseNotFound):
        text = _NOT_FOUND_TEXT % args.lease_id
    elif isinstance(error, LeaseLost):
        text = str(error)
    elif isinstance(error, QuotaExceeded):
        text = _quota_refusal(client, args.size) or text
    elif args.command == "lease" and isinstance(error, (OutOfMemory, TooLarge)):
        text = _lease_refusal(client, args.size) or text
    elif args.command in ("set", "get") and isinstance(error, (TooLarge, OutOfRange)):
        text = _range_refusal(client, args, payload) or text
    elif isinstance(error, MemLeaseProtocolError) and status == protocol.FRAME_TOO_LARGE:
        text = "%d bytes is more than the server takes in one request" % len(payload)
    return text


def _status_note(status: Optional[int]) -> str:
    """`` (-2)``: the server's status code, as the seed shows it; nothing without one."""
    return "" if status is None else " (%d)" % status


def _lease_refusal(client: Leases, size: int) -> Optional[str]:
    """Whether the lease is larger than a whole pool, or larger than any free block now."""
    try:
        stats = client.stats()
    except MemLeaseError:
        return None
    each = [stats] if isinstance(stats, dict) else list(stats.servers.values())
    if not each:
        return None
    pool = max(counters.get("pool_bytes", 0) for counters in each)
    largest = max(counters.get("largest_free_block", 0) for counters in each)
    if size > pool:
        whole = "the server's whole pool" if isinstance(stats, dict) else "any server's pool"
        return "%s is more than %s (%s)" % (format_size(size), whole, format_size(pool))
    return "no free block can hold %s now; the largest free block is %s" % (
        format_size(size),
        format_size(largest),
    )


def _quota_refusal(client: Leases, size: int) -> Optional[str]:
    """The quota, what the tenant holds and what it asked, from the server's stats."""
    try:
        stats = client.stats()
    except MemLeaseError:
        return None
    mine = stats if isinstance(stats, dict) else stats.total
    return "over your quota: the quota is %s, you hold %s and asked for %s" % (
        format_size(mine.get("tenant_quota", 0)),
        format_size(mine.get("tenant_bytes", 0)),
        format_size(size),
    )


def _range_refusal(client: Leases, args: argparse.Namespace, payload: bytes) -> Optional[str]:
    """What did not fit where, with the lease's size found by asking the server."""
    end = args.offset + (len(payload) if args.command == "set" else args.length or 0)
    try:
        size = client.ttl(_lease_key(client, args.lease_id)).size
    except MemLeaseError:
        return None
    if args.command == "set" and size >= end:  # the lease holds them: the value's size did it
        return "the server refuses a value of %s: over its --max-frame limit" % format_size(
            len(payload)
        )
    if args.command == "get":
        span = "offset %d" % args.offset
        if args.length is not None:
            span += " + length %d = %d" % (args.length, args.offset + args.length)
        return "%s is outside the lease's %s" % (span, format_size(size))
    text_with_nul = args.data is not None and not args.no_nul
    if text_with_nul and args.offset == 0 and size == len(payload) - 1:
        return (
            "%d bytes with the trailing NUL the C++ client sends; the lease holds %d: "
            "use --file or --no-nul" % (len(payload), size)
        )
    where = " at offset %d" % args.offset if args.offset else ""
    nul = " (with the trailing NUL)" if text_with_nul else ""
    return "%s%s%s do not fit in the lease's %s" % (
        format_size(len(payload)),
        nul,
        where,
        format_size(size),
    )


def _unauthorized(token_file: Optional[str]) -> str:
    """A missing token and a wrong one need different fixes, so they are told apart."""
    if token_file is not None:
        return "the server refused the token in %s" % token_file
    if not os.environ.get("MEMLEASE_TOKEN"):
        return "the server wants a token: set MEMLEASE_TOKEN or give --token-file"
    return "the server refused the token in MEMLEASE_TOKEN"


def main(argv: Optional[List[str]] = None) -> int:
    """The command line: returns the exit status."""
    prog = program_name(CLI_NAME)
    _Reader.gone = False
    try:
        return _main(prog, list(sys.argv[1:] if argv is None else argv))
    except _UsageError as exc:
        _complain("%s: usage error: %s (see %s --help)" % (prog, exc, prog))
        return 2
    except _OutputFailed as exc:
        _silence(sys.stdout)
        lost = exc.args[0]
        _complain("%s: cannot write the output: %s" % (prog, lost.strerror or lost))
        return 1
    except KeyboardInterrupt:
        return 130


def _main(prog: str, argv: List[str]) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(_in_order(argv))
    payload = _payload(args) if args.command == "set" else b""
    client = _open(args)
    try:
        return _run(client, args, payload)
    except Unauthorized as exc:
        _failed(prog, args, _unauthorized(args.token_file), exc.status)
        return 1
    except (MemLeaseConnectionError, MemLeaseProtocolError, ServerBusy) as exc:
        if args.command == "set" and exc.status == protocol.FRAME_TOO_LARGE:
            _refused(prog, client, args, payload, exc)
        else:
            _failed(prog, args, "%s%s" % (exc, _port_hint(exc)), exc.status)
        return 1
    except InvalidArgument as exc:
        if exc.status is not None:  # the server refused
            _refused(prog, client, args, payload, exc)
            return 1
        raise _UsageError(str(exc)) from None
    except MemLeaseError as exc:
        _refused(prog, client, args, payload, exc)
        return 1
    except _NotText:
        why = "its bytes before the first NUL are not UTF-8: add --raw for them all in base64"
        _failed(prog, args, "no text in lease %s" % args.lease_id, None, why)
        return 1
    finally:
        client.close()


def _port_hint(error: MemLeaseError) -> str:
    """A plain client at a TLS port (or at no MemoryLease port at all), or a TLS client at a
    plain one, is told which."""
    if isinstance(error, _ClosedBeforeReply):
        return " (is it a MemoryLease port? a TLS one needs --tls)"
    if isinstance(error, _NotTLS):
        return " (the server does not speak TLS on this port: try without --tls)"
    return ""


def _refused(
    prog: str, client: Leases, args: argparse.Namespace, payload: bytes, error: MemLeaseError
) -> None:
    """The seed's line for the refusal, then the reason on a line of its own."""
    reason = _refusal_reason(client, args, payload, error)
    _failed(prog, args, _first_line(args, error), error.status, reason)


def _failed(
    prog: str,
    args: argparse.Namespace,
    error: str,
    status: Optional[int] = None,
    reason: Optional[str] = None,
) -> None:
    """A run that failed.  With --json: one object with the error, the status (the server's
    code, or null) and the reason (null when the error says it all).  Otherwise a refusal
    is the error and ``reason: ...`` on standard output, anything else one line on
    standard error."""
    if args.json:
        _emit(_as_json({"error": error, "status": status, "reason": reason}))
    elif reason is None:
        _complain("%s: %s" % (prog, error))
    else:
        _emit(error)
        _emit("reason: %s%s" % (reason, _status_note(status)))
