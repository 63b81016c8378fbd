"""Helpers shared by the tests: real servers on loopback ports from the OS, raw sockets,
the command line as a user runs it, and bounded waiting."""

import contextlib
import os
import pwd
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, List, Optional

import protocol
from memlease.connection import Service
from memlease_client import MemLeaseClient
from memlease_server import LeaseStore, MemLeaseServer

ROOT = Path(__file__).resolve().parent.parent
SERVER = str(ROOT / "memlease_server.py")
CLIENT = str(ROOT / "memlease_client.py")
TIMEOUT = 5.0
UUID_PATTERN = rb"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"


# Helpers: servers, raw sockets and bounded waiting.


def wait_for(predicate, timeout: float = TIMEOUT, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


class ServerProcess:
    """``memlease_server.py`` run as a child process, its output captured in a file."""

    def __init__(self, *args: str, env: Optional[dict] = None) -> None:
        # Kept open for the server's lifetime and closed by stop().
        self.log = tempfile.NamedTemporaryFile(mode="w+", prefix="memlease-", suffix=".log")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, SERVER, *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.port = 0

    def wait_listening(self) -> "ServerProcess":
        match = None

        def started() -> bool:
            nonlocal match
            match = re.search(
                r"starting server on port (\d+)\s+listening for client", self.output()
            )
            return match is not None or self.proc.poll() is not None

        assert wait_for(started, 10), "server did not start: %s" % self.output()
        assert match is not None, "server exited: %s" % self.output()
        self.port = int(match.group(1))
        return self

    def output(self) -> str:
        return Path(self.log.name).read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        return self.proc.returncode


@contextlib.contextmanager
def server_process(
    pool: str = "1M", *args: str, env: Optional[dict] = None
) -> Iterator[ServerProcess]:
    server = ServerProcess("0", pool, "--bind", "127.0.0.1", *args, env=env)
    try:
        yield server.wait_listening()
    finally:
        server.stop()


@contextlib.contextmanager
def server_thread(
    pool: int = 1 << 20,
    host: str = "127.0.0.1",
    service: Optional[dict] = None,
    store: Optional[LeaseStore] = None,
    **options,
) -> Iterator[MemLeaseServer]:
    """A server on a loop in a thread; ``service`` holds the options of its Service."""
    if store is None:
        store = LeaseStore(pool)
    if service is not None:
        options["service"] = Service(store, **service)
    server = MemLeaseServer((host, 0), store, **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join(TIMEOUT)
        server.close()
        assert not thread.is_alive()


@contextlib.contextmanager
def directory_for_nobody(prefix: str, parent: Optional[str] = None) -> Iterator[Path]:
    """A fresh directory that a server started as root, and so run as nobody, can write in."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def client_for(server, **options) -> MemLeaseClient:
    if isinstance(server, MemLeaseServer):
        host, port = server.server_address
    else:
        host, port = "127.0.0.1", server.port
    return MemLeaseClient(host, port, timeout=TIMEOUT, **options)


def connect(server) -> socket.socket:
    port = server.server_address[1] if isinstance(server, MemLeaseServer) else server.port
    host = server.server_address[0] if isinstance(server, MemLeaseServer) else "127.0.0.1"
    sock = socket.create_connection((host, port), timeout=TIMEOUT)
    return sock


def read_replies(sock: socket.socket, count: int) -> List[protocol.Reply]:
    """Read ``count`` replies; fewer if the server closes the connection first."""
    decoder = protocol.reply_decoder()
    replies: List[protocol.Reply] = []
    for _ in range(100_000):
        message = decoder.next_message()
        if message is not None:
            replies.append(message)  # type: ignore[arg-type]
            if len(replies) == count:
                break
            continue
        data = sock.recv(65536)
        if not data:
            break
        decoder.feed(data)
    return replies


def exchange(sock: socket.socket, frames: bytes, count: int = 1) -> List[protocol.Reply]:
    sock.sendall(frames)
    return read_replies(sock, count)


def closed_by_peer(sock: socket.socket) -> bool:
    """True when the server has closed the connection (after any pending replies)."""
    try:
        for _ in range(1000):
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    return False


def run_cli(
    *args: str, port: Optional[int] = None, stdin: bytes = b"", env: Optional[dict] = None
) -> subprocess.CompletedProcess:
    argv = [sys.executable, CLIENT, "127.0.0.1"]
    if port is not None:
        argv.append(str(port))
    return subprocess.run(argv + list(args), input=stdin, capture_output=True, timeout=30, env=env)


def random_bytes(rng: random.Random, n: int) -> bytes:
    """Seeded random bytes (Random.randbytes is 3.9+)."""
    return rng.getrandbits(8 * n).to_bytes(n, "little")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
