#!/usr/bin/env python3
"""MemoryLease server: lends chunks of its memory to clients for a duration.

The command line.  The parts live in the memlease package, one job each:
``memlease.store`` (the memory, the allocator, the leases and their expiry),
``memlease.connection`` (the protocol of one connection, without sockets),
``memlease.loop`` (file and time events on one thread) and ``memlease.listener`` (the
listener that joins them).

    sudo python3 memlease_server.py 412 2048
"""

import argparse
import functools
import logging
import math
import os
import sys
from typing import Callable, List, NoReturn, Optional, Tuple

import protocol
from memlease import security
from memlease.connection import Service
from memlease.listener import (
    MemLeaseServer,
    ignore_signals_while_stopping,
    install_signal_handlers,
)
from memlease.metrics import MetricsServer, render_service
from memlease.program import how_to_run, program_name, version_line
from memlease.store import TABLE_SUFFIX, LeaseStore
from memlease.systemd import ActivationError, listen_fds
from memlease.units import parse_size
from memlease.unixsocket import DEFAULT_MODE, UnixSocketError

__all__ = ["LeaseStore", "MemLeaseServer", "main", "parse_size"]

log = logging.getLogger("memlease")

MIN_BLOCK = 32
SERVER_NAME = "memlease-server"  # when the program's own name is unknown


def parse_port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError("%r is not a port number (0-65535)" % text)
    return int(text)


def parse_address(text: str) -> Tuple[str, int]:
    """ADDR:PORT, with an IPv6 address in brackets ([::1]:9412); ADDR may be empty (all)."""
    host, colon, port = text.rpartition(":")
    if not colon:
        raise argparse.ArgumentTypeError("%r is not ADDR:PORT" % text)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, parse_port(port)


def parse_mode(text: str) -> int:
    """A file mode in octal, as chmod takes it: 660, 0660 or 0o660."""
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError("%r is not a file mode in octal, such as 660" % text)
    return mode


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


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line, as the client gives them, not after the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, "%s: usage error: %s (see %s --help)\n" % (self.prog, message, self.prog))


def build_parser(prog: str = SERVER_NAME) -> argparse.ArgumentParser:
    run = how_to_run(prog)
    parser = _OneLineParser(
        prog=prog,
        description="Lend chunks of this host's memory to clients for a duration.",
        epilog="examples:\n"
        "  sudo %s 412 2048\n"
        "  %s 4120 16M --bind 127.0.0.1 -q\n"
        "  MEMLEASE_TOKEN=$(openssl rand -hex 16) %s 4120 1G --bind ::\n"
        "  %s 4120 1G --bind 127.0.0.1 --unix /run/memlease/memlease.sock\n" % (run, run, run, run),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version_line(prog))
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
        "--unix",
        metavar="PATH",
        help="also listen on a Unix socket at PATH (served without TLS; its file is removed "
        "at a graceful stop, and a stale one from a crash is replaced)",
    )
    parser.add_argument(
        "--unix-mode",
        type=parse_mode,
        metavar="OCTAL",
        help="the Unix socket file's mode (default %03o: its user and group may connect)"
        % DEFAULT_MODE,
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
        help="require clients to present a token: the one in this file, or one per tenant on "
        "lines 'NAME TOKEN [MAX_BYTES]' (default: $MEMLEASE_TOKEN); tokens of fewer than 16 "
        "bytes are refused",
    )
    parser.add_argument(
        "--no-short-ids",
        action="store_true",
        help="refuse the C++ client's messages (lease, set and get with 32-bit ids), so "
        "every lease has only an unguessable UUID (default: the C++ client is served)",
    )
    parser.add_argument(
        "--allow",
        type=parse_allow,
        default=security.AllowList.parse(security.LOOPBACK),
        metavar="CIDR[,CIDR...]",
        help="without any token, serve only these peers (default: %s)" % security.LOOPBACK,
    )
    parser.add_argument(
        "--user",
        metavar="NAME",
        help="started as root: run as this user once the port is bound and the files are read "
        "(default: nobody; 'root' keeps root)",
    )
    parser.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this PEM certificate")
    parser.add_argument(
        "--tls-key", metavar="FILE", help="PEM private key of --tls-cert (default: in that file)"
    )
    parser.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="require client certificates signed by these PEM authorities (needs --tls-cert)",
    )
    parser.add_argument(
        "--state-file",
        metavar="PATH",
        help="keep the pool in this file (on tmpfs: /dev/shm/...) and the leases beside it "
        "at a graceful stop, so a restart keeps them (default: leases end with the process)",
    )
    parser.add_argument(
        "--metrics",
        type=parse_address,
        metavar="ADDR:PORT",
        help="serve Prometheus metrics at http://ADDR:PORT/metrics, and /health "
        "(e.g. 127.0.0.1:9412)",
    )
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument(
        "-v", "--verbose", action="store_true", help="also log connections opening and closing"
    )
    noise.add_argument(
        "-q", "--quiet", action="store_true", help="log only warnings and errors, not each request"
    )
    return parser


def parse_allow(text: str) -> security.AllowList:
    try:
        return security.AllowList.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Optional[List[str]] = None) -> int:
    prog = program_name(SERVER_NAME)
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(
        stream=sys.stdout, level=level, format="%(asctime)s %(levelname)s %(message)s"
    )
    if args.max_memory < MIN_BLOCK:
        parser.error("max_memory must be at least %d bytes" % MIN_BLOCK)
    try:
        tenants = security.load_tenants(args.token_file, dict(os.environ))
    except (OSError, ValueError) as exc:
        parser.error("cannot read the token: %s" % exc)
    if (args.tls_key or args.tls_ca) and not args.tls_cert:
        parser.error("--tls-key and --tls-ca need --tls-cert")
    if args.unix_mode is not None and args.unix is None:
        parser.error("--unix-mode needs --unix")
    if args.unix is not None and args.tls_ca:
        parser.error(
            "--tls-ca asks every client for a certificate, which the Unix socket (served "
            "without TLS) cannot check: drop --unix or --tls-ca"
        )
    try:
        tls = None
        if args.tls_cert is not None:
            tls = security.server_tls_context(args.tls_cert, args.tls_key, args.tls_ca)
        account = security.resolve_user(args.user)
        if args.state_file is not None:
            security.check_writable(account, args.state_file)
        if args.unix is not None:  # it is removed at the stop, by the user we become
            security.check_writable(account, args.unix, "where the Unix socket is made")
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    try:
        inherited = listen_fds()
    except ActivationError as exc:
        return _fail(prog, str(exc))
    try:
        store = LeaseStore(args.max_memory, state_file=args.state_file)
    except (OSError, ValueError, OverflowError) as exc:
        where = "" if args.state_file is None else " in %s" % args.state_file
        return _fail(prog, "cannot reserve %d bytes%s: %s" % (args.max_memory, where, exc))
    if store.restore_note is not None:
        log.log(logging.INFO if store.first_start else logging.WARNING, "%s", store.restore_note)
    try:
        server = MemLeaseServer(
            None if inherited else (args.bind, args.port),
            store,
            sockets=inherited,
            max_connections=None if args.max_connections is None else int(args.max_connections),
            idle_timeout=args.idle_timeout,
            frame_timeout=args.frame_timeout,
            service=Service(
                store,
                max_data=protocol.INT32_MAX if args.max_frame is None else args.max_frame,
                tenants=tenants,
                allow=args.allow,
                short_ids=not args.no_short_ids,
            ),
            ssl_context=tls,
            unix=args.unix,
            unix_mode=DEFAULT_MODE if args.unix_mode is None else args.unix_mode,
        )
    except UnixSocketError as exc:
        _keep_leases_and_close(store)
        return _fail(prog, str(exc))
    except PermissionError:
        _keep_leases_and_close(store)
        hint = (
            " (ports below 1024 need root: use sudo or a higher port)" if args.port < 1024 else ""
        )
        return _fail(prog, "not permitted to listen on port %d%s" % (args.port, hint))
    except OSError as exc:
        _keep_leases_and_close(store)
        return _fail(
            prog,
            "cannot listen on %s port %d: %s" % (args.bind or "*", args.port, exc.strerror or exc),
        )
    metrics = None
    if args.metrics is not None:
        try:
            metrics = MetricsServer(
                server.loop, args.metrics, functools.partial(render_service, server.service)
            )
        except OSError as exc:
            store.save()
            server.close()
            return _fail(
                prog,
                "cannot serve metrics on %s port %d: %s"
                % (args.metrics[0] or "*", args.metrics[1], exc.strerror or exc),
            )
    try:  # the sockets are bound and every file is read: root is no longer needed
        if args.unix is not None:
            security.hand_over(account, args.unix)
        security.drop_privileges(account, _state_files(args.state_file), log)
    except OSError as exc:
        store.save()
        server.close()
        return _fail(prog, "cannot switch to user %s: %s" % (args.user, exc))
    install_signal_handlers(server)
    if inherited:
        log.info(
            "serving on %d listening socket(s) from systemd; the port argument is not bound",
            len(inherited),
        )
    print("starting server on port %d" % server.server_address[1], flush=True)
    print("listening for client", flush=True)
    if tenants is None and not server.is_loopback:
        log.warning(
            "no token is set and the server listens on %s: only peers in --allow %s are served "
            "(protected mode); set MEMLEASE_TOKEN or --token-file to serve others",
            server.server_address[0],
            args.allow,
        )
    if args.no_short_ids:
        log.info("short ids are off (--no-short-ids): the C++ client's messages are refused")
    if server.unix is not None:
        log.info(
            "listening on the Unix socket %s too (mode %03o)", server.unix.path, server.unix.mode
        )
    if metrics is not None:
        log.info("metrics at %s", metrics.url)
    if tls is not None:
        log.info("TLS is on%s", ": client certificates are required" if args.tls_ca else "")
    if tenants is not None:
        log.info("%s", tenants.source)
    status = 0
    try:
        server.serve_forever()
        log.info("stopped: requests in flight were answered")
    except Exception:  # a bug: still save what can be saved
        log.critical("the server failed; saving the leases and stopping", exc_info=True)
        status = 1
    ignore_signals_while_stopping()
    if metrics is not None:
        metrics.close()
    try:
        store.save()
        if args.state_file is not None:
            log.info("saved the lease table beside %s for the next start", args.state_file)
        else:
            log.info("not saved: without --state-file the leases end with the server")
    except OSError as exc:
        log.error("cannot save the lease table, so the next start will be empty: %s", exc)
        status = 1
    server.close()
    return status


def _fail(prog: str, reason: str) -> int:
    """A refusal to start: one line on standard error, named as the user ran us; status 1."""
    print("%s: %s" % (prog, reason), file=sys.stderr)
    return 1


def _state_files(state_file: Optional[str]) -> List[str]:
    """The files a server with ``--state-file`` writes after dropping root."""
    return [] if state_file is None else [state_file, state_file + TABLE_SUFFIX]


def _keep_leases_and_close(store: LeaseStore) -> None:
    """A start that fails after taking leases back saves them again for the next start."""
    store.save()
    store.close()


if __name__ == "__main__":
    sys.exit(main())
