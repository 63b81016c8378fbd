"""The Unix socket: every client through it, and the life of its file (its mode, a stale
one replaced, a live one or another file refused, removed at a graceful stop).

Servers are child processes (the command line, dropping root when run as root) or loops
in a thread; their socket files live in fresh directories that the server's user may
write in, and every server a test starts is stopped by it.
"""

import asyncio
import os
import pwd
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List

import pytest
import trustme

from memlease import security
from memlease.aio import AsyncMemLeaseClient
from memlease.cluster import MemLeaseCluster
from memlease.listener import MemLeaseServer
from memlease.store import LeaseStore
from memlease_client import InvalidArgument, MemLeaseClient, MemLeaseConnectionError
from tests.helpers import (
    CLIENT,
    SERVER,
    TIMEOUT,
    ServerProcess,
    directory_for_nobody,
    server_thread,
)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory (a socket's path has a length limit) the server's user may use."""
    with directory_for_nobody("memlease-unix-") as path:
        yield path


def unix_server(path: Path, *options: str) -> ServerProcess:
    return ServerProcess(
        "0", "1M", "--bind", "127.0.0.1", "--unix", str(path), *options
    ).wait_listening()


def run(*argv: str) -> "subprocess.CompletedProcess[bytes]":
    env = {key: value for key, value in os.environ.items() if key != "MEMLEASE_TOKEN"}
    return subprocess.run([sys.executable, *argv], capture_output=True, timeout=30, env=env)


def start_refused(*argv: str) -> "subprocess.CompletedProcess[bytes]":
    return run(SERVER, "0", "1M", "--bind", "127.0.0.1", *argv)


def async_round_trip(host: str) -> bytes:
    async def main() -> bytes:
        async with AsyncMemLeaseClient(host, timeout=TIMEOUT) as client:
            lease_id = await client.lease(16, 60000)
            await client.set(lease_id, b"by asyncio")
            return await client.get(lease_id, length=10)

    return asyncio.run(main())


def test_every_client_is_served_on_the_unix_socket_and_its_file_goes_at_the_stop(
    socket_dir: Path,
) -> None:
    path = socket_dir / "memlease.sock"
    host = "unix:%s" % path
    server = unix_server(path, "--unix-mode", "606")
    try:
        info = path.stat()
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o606
        if os.geteuid() == 0:  # given to the user the server runs as, who removes it
            assert info.st_uid == pwd.getpwnam("nobody").pw_uid
        with MemLeaseClient(host, timeout=TIMEOUT) as client:
            lease_id = client.lease(32, 60000)
            client.set(lease_id, b"through the file")
            assert client.get(lease_id, length=16) == b"through the file"
        assert async_round_trip(host) == b"by asyncio"
        out = run(CLIENT, host, "set", str(lease_id), "from the command line")
        said = b"Data set for lease %s\n" % str(lease_id).encode()
        assert (out.returncode, out.stdout) == (0, said)
        out = run(CLIENT, host, "get", "%s/%s" % (host, lease_id))  # a handle naming it
        assert out.stdout == b"Data get for lease %s/%s: from the command line\n" % (
            host.encode(),
            str(lease_id).encode(),
        )
        both = "%s,127.0.0.1:%d" % (host, server.port)  # one server, reached both ways
        with MemLeaseCluster(both.split(","), timeout=TIMEOUT) as cluster:
            assert cluster.get("%s/%s" % (host, lease_id), length=4) == b"from"
        log = server.output()
        assert "INFO listening on the Unix socket %s too (mode 606)" % path in log
        assert "local uid %d write %s-..." % (os.getuid(), str(lease_id)[:8]) in log
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(10) == 0
    finally:
        server.stop()
    assert not path.exists()
    out = run(CLIENT, host, "stats")
    assert out.returncode == 1
    assert out.stderr == (
        b"memlease_client.py: cannot connect to %s: No such file or directory\n" % host.encode()
    )


def test_a_crashed_servers_socket_is_replaced_and_a_live_one_or_a_file_is_refused(
    socket_dir: Path,
) -> None:
    path = socket_dir / "memlease.sock"
    crashed = unix_server(path)
    crashed.proc.send_signal(signal.SIGKILL)
    crashed.stop()
    assert stat.S_ISSOCK(path.lstat().st_mode)  # left behind, and nobody listens on it
    server = unix_server(path)
    try:
        assert "listening on the Unix socket %s too (mode 660)" % path in server.output()
        taken = start_refused("--unix", str(path))
        assert (taken.returncode, taken.stdout) == (1, b"")
        assert taken.stderr == (
            b"memlease_server.py: a server already listens on the Unix socket %s\n" % bytes(path)
        )
        with MemLeaseClient("unix:%s" % path, timeout=TIMEOUT) as client:
            assert client.stats()["live_leases"] == 0  # the live server was left alone
    finally:
        server.stop()
    other = socket_dir / "notes.txt"
    other.write_text("not a socket\n")
    out = start_refused("--unix", str(other))
    assert (out.returncode, out.stdout) == (1, b"")
    assert out.stderr == (
        b"memlease_server.py: %s exists and is not a socket: remove it or choose another "
        b"path for --unix\n" % bytes(other)
    )
    assert other.read_text() == "not a socket\n"


@pytest.mark.parametrize(
    "options, message",
    [
        (["--unix", "/tmp/x.sock", "--unix-mode", "889"], b"'889' is not a file mode in octal"),
        (["--unix-mode", "600"], b"--unix-mode needs --unix"),
        (
            ["--unix", "/tmp/x.sock", "--tls-cert", "c.pem", "--tls-ca", "ca.pem"],
            b"--tls-ca asks every client for a certificate, which the Unix socket",
        ),
    ],
)
def test_unix_options_that_cannot_work_are_usage_errors(options: List[str], message: bytes) -> None:
    out = start_refused(*options)
    assert out.returncode == 2
    assert out.stderr.startswith(b"memlease_server.py: usage error: ")
    assert message in out.stderr and out.stderr.count(b"\n") == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the server drops it")
def test_a_socket_its_user_could_not_remove_at_the_stop_is_refused_at_start(
    socket_dir: Path,
) -> None:
    root_only = socket_dir / "root-only"
    root_only.mkdir(mode=0o700)
    out = start_refused("--unix", str(root_only / "memlease.sock"))
    assert out.returncode == 2
    assert (
        b"user nobody cannot write in %s, where the Unix socket is made" % bytes(root_only)
        in out.stderr
    )
    assert list(root_only.iterdir()) == []


def test_a_unix_peer_is_local_and_served_without_tls(tmp_path: Path) -> None:
    """Protected mode lets it in (TCP from loopback is refused here); a TLS server's Unix
    socket speaks plain, and the clients will not try TLS on one."""
    cert = tmp_path / "server.pem"
    trustme.CA().issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert))
    context = security.server_tls_context(str(cert), None, None)
    path = tmp_path / "s"
    service = {"allow": security.AllowList.parse("192.0.2.0/24")}
    with server_thread(service=service, ssl_context=context, unix=str(path)) as server:
        assert server.server_address[0] == "127.0.0.1" and server.is_loopback
        with MemLeaseClient("unix:%s" % path, timeout=TIMEOUT) as local:
            assert local.lease(64, 60000).version == 4
        with pytest.raises(MemLeaseConnectionError):
            MemLeaseClient(*server.server_address, timeout=TIMEOUT, tls=False).stats()
        with pytest.raises(InvalidArgument, match="is served without TLS"):
            MemLeaseClient("unix:%s" % path, tls=True)
        assert server.stats()["connections_refused_protected"] == 1
    assert not path.exists()
    with pytest.raises(InvalidArgument, match="names no socket file"):
        MemLeaseClient("unix:")
    out = run(CLIENT, "unix:%s" % path, "stats", "--tls")
    assert out.returncode == 2 and b"is served without TLS" in out.stderr


def test_a_server_on_a_unix_socket_alone_has_no_tcp_address(tmp_path: Path) -> None:
    path = tmp_path / "alone.sock"
    server = MemLeaseServer(None, LeaseStore(1 << 16), unix=str(path))
    try:
        assert (server.server_address, server.is_loopback) == (("", 0), True)
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        assert [s.family for s in server.listeners] == [socket.AF_UNIX]
    finally:
        server.close()
    assert not path.exists()
