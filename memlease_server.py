#!/usr/bin/env python3
"""MemoryLease server: lends chunks of its memory to clients for a duration.

The command line.  The parts live beside it, one job each: ``lease_store`` (the memory,
the allocator, the leases and their expiry), ``connection`` (the protocol of one
connection, without sockets), ``event_loop`` (file and time events on one thread) and
``lease_server`` (the listener that joins them).

    sudo python3 memlease_server.py 412 2048
"""

import argparse
import logging
import math
import os
import sys
from typing import Callable, List, Optional

from lease_store import LeaseStore

from lease_server import MemLeaseServer, install_signal_handlers
from units import parse_size

__all__ = ["LeaseStore", "MemLeaseServer", "main", "parse_size"]

log = logging.getLogger("memlease")

MIN_BLOCK = 32


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
        metavar="N",
        help="connections served at once; more are refused "
        "(default: what the descriptor limit allows)",
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
        help="largest value a set or write may carry; a larger one is read, dropped and "
        "answered 'too large' (default: no limit but the lease's size)",
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
            max_connections=None if args.max_connections is None else int(args.max_connections),
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
    install_signal_handlers(server)
    print("starting server on port %d" % server.server_address[1], flush=True)
    print("listening for client", flush=True)
    if token is None and not server.is_loopback:
        log.warning(
            "no token is set and the server listens on %s: anyone who can reach it can "
            "read and write its leases (set MEMLEASE_TOKEN or --token-file, or --bind 127.0.0.1)",
            server.server_address[0],
        )
    server.serve_forever()
    log.info("stopped: requests in flight were answered")
    server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
