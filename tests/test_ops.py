"""Running it as a service: warm restarts, socket activation, metrics and the pool map.

Servers are real: child processes where the test needs signals, restarts or inherited
descriptors, a loop on a thread where the metrics endpoint is timed out on purpose.
Metrics are parsed by prometheus_client, so the format is judged by the ecosystem's code.
"""

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest
from prometheus_client.parser import text_string_to_metric_families

import protocol
from memlease import metrics, systemd
from memlease.listener import MemLeaseServer
from memlease.metrics import MetricsServer, render_service
from memlease.store import LeaseStore
from memlease.units import parse_size
from memlease_client import LeaseNotFound, MemLeaseClient, OutOfMemory
from memlease_server import build_parser
from tests.helpers import SERVER, TIMEOUT, ServerProcess, directory_for_nobody, wait_for

ROOT = Path(__file__).resolve().parent.parent
CONTRIB = ROOT / "contrib"
Samples = Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]


# Helpers.


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A directory for state files: on tmpfs when the host has /dev/shm, as in production."""
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with directory_for_nobody("memlease-ops-", shm) as path:
        yield path


@contextlib.contextmanager
def running(*args: str, env: Optional[Dict[str, str]] = None) -> Iterator[ServerProcess]:
    """A server process on a port from the OS; stopped (SIGTERM) on the way out."""
    server = ServerProcess("0", *args, env=env)
    try:
        yield server.wait_listening()
    finally:
        server.stop()


def stop_gracefully(server: ServerProcess) -> str:
    """SIGTERM, wait for a clean exit, and return everything the server logged."""
    server.proc.terminate()
    assert server.proc.wait(TIMEOUT) == 0, server.output()
    return server.output()


def client(server: ServerProcess) -> MemLeaseClient:
    return MemLeaseClient("127.0.0.1", server.port, timeout=TIMEOUT)


def as_tenant(server: ServerProcess, token: str) -> MemLeaseClient:
    return MemLeaseClient("127.0.0.1", server.port, timeout=TIMEOUT, token=token)


def samples(text: str) -> Samples:
    """Every sample of an exposition, by name and labels, as prometheus_client reads it."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


def http_get(address: Tuple[str, int], request: bytes) -> bytes:
    """Send ``request`` and read the whole response, up to the server's close."""
    with socket.create_connection(address, timeout=TIMEOUT) as sock:
        sock.sendall(request)
        response = bytearray()
        for _ in range(10_000):
            data = sock.recv(65536)
            if not data:
                break
            response += data
    return bytes(response)


def scrape(address: Tuple[str, int]) -> Samples:
    response = http_get(address, b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
    assert b"\r\nContent-Type: text/plain; version=0.0.4" in head
    return samples(body.decode())


def requests_of(found: Samples, command: str, status: str) -> float:
    return found.get(("memlease_requests_total", (("command", command), ("status", status))), 0.0)


# Warm restart.


def test_a_graceful_restart_keeps_the_leases_and_counts_the_downtime(state_dir: Path) -> None:
    state = str(state_dir / "pool")
    data = bytes(range(256)) * 4
    with running("1M", "--bind", "127.0.0.1", "--state-file", state) as first:
        assert "INFO first start with " in first.output()
        with client(first) as c:
            kept = c.lease(len(data), 60000)
            c.set(kept, data)
            short = c.lease(100, 1500)
            c.set(short, b"short-lived")
            leased_at = time.monotonic()
        stop_gracefully(first)
        assert os.path.exists(state + ".leases")
    # The short lease's deadline passes while the server is down.
    time.sleep(max(leased_at + 2.0 - time.monotonic(), 0.0))
    with running("1M", "--bind", "127.0.0.1", "--state-file", state) as second:
        assert "restored 1 leases from %s (1 more had expired" % state in second.output()
        with client(second) as c:
            assert c.get(kept) == data
            with pytest.raises(LeaseNotFound):
                c.get(short)
            assert c.stats()["live_leases"] == 1
            c.renew(kept, 60000)  # a restored lease is a lease like any other
            c.set(kept, b"again")
        stop_gracefully(second)
    with running("1M", "--bind", "127.0.0.1", "--state-file", state) as third, client(third) as c:
        assert c.get(kept) == b"again" + data[5:]


def test_a_crash_restarts_clean_with_no_stale_byte(state_dir: Path) -> None:
    state = str(state_dir / "pool")
    secret = b"0123456789abcdef-stale?" * 16
    with running("1M", "--bind", "127.0.0.1", "--state-file", state) as first:
        with client(first) as c:
            restored = c.lease(len(secret), 60000)
            c.set(restored, secret)
        stop_gracefully(first)
    with running("1M", "--bind", "127.0.0.1", "--state-file", state) as second:
        with client(second) as c:
            assert c.get(restored) == secret  # taken back, so the saved table is used up
            crashed = c.lease(len(secret), 60000)
            c.set(crashed, secret[::-1])
        second.proc.kill()
        second.proc.wait(TIMEOUT)
    with running("1M", "--bind", "127.0.0.1", "--state-file", state) as third:
        assert "clean start with an empty pool" in third.output()
        with client(third) as c:
            for lease_id in (restored, crashed):
                with pytest.raises(LeaseNotFound):
                    c.get(lease_id)
            assert c.stats()["free_bytes"] == 1 << 20
            fresh = c.lease(len(secret), 60000)
            assert c.get(fresh) == bytes(len(secret))
        pool = Path(state).read_bytes()
        assert secret not in pool and secret[::-1] not in pool


def test_a_changed_pool_size_starts_clean(state_dir: Path) -> None:
    state = str(state_dir / "pool")
    with running("1M", "--bind", "127.0.0.1", "--state-file", state) as first:
        with client(first) as c:
            lease_id = c.lease(1000, 60000)
            c.set(lease_id, b"kept only for the same pool")
        stop_gracefully(first)
    with running("2M", "--bind", "127.0.0.1", "--state-file", state) as second:
        assert "clean start with an empty pool: the pool changed" in second.output()
        with client(second) as c, pytest.raises(LeaseNotFound):
            c.get(lease_id)
        assert b"kept only" not in Path(state).read_bytes()


def refused_start(state: str) -> "subprocess.CompletedProcess[bytes]":
    """A server started with ``state``, which must refuse it in one line and exit 1."""
    out = subprocess.run(
        [sys.executable, SERVER, "0", "1M", "--bind", "127.0.0.1", "--state-file", state],
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 1, out
    assert out.stderr.count(b"\n") == 1, out.stderr
    return out


def test_a_state_file_in_use_is_refused_in_one_line(state_dir: Path) -> None:
    state = str(state_dir / "pool")
    with running("1M", "--bind", "127.0.0.1", "--state-file", state):
        out = refused_start(state)
    assert out.stderr.startswith(
        b"memlease_server.py: cannot reserve 1048576 bytes in %s: " % (state.encode())
    )
    assert b"another server is using the state file" in out.stderr


def test_a_state_file_that_links_elsewhere_is_refused_and_its_target_untouched(
    state_dir: Path,
) -> None:
    target = state_dir / "precious"  # as /etc/shadow would be: root's, not the pool's size
    target.write_bytes(b"root:secret\n")
    target.chmod(0o640)
    before = target.stat()
    (state_dir / "pool").symlink_to(target)
    state = str(state_dir / "pool")
    out = refused_start(state)
    assert b"refused: %s is a symbolic link" % state.encode() in out.stderr
    after = target.stat()
    assert target.read_bytes() == b"root:secret\n"
    assert (after.st_uid, after.st_gid, after.st_mode) == (
        before.st_uid,
        before.st_gid,
        before.st_mode,
    )


def test_reordered_tenants_keep_their_own_leases_across_a_restart(state_dir: Path) -> None:
    state = str(state_dir / "pool")
    tokens = state_dir / "tokens"
    tokens.write_text("alice a-secret-0123456789\nbob b-secret-0123456789\n")
    args = ("1M", "--bind", "127.0.0.1", "--state-file", state, "--token-file", str(tokens))
    data = b"alice's bytes"
    with running(*args) as first:
        with as_tenant(first, "a-secret-0123456789") as alice:
            kept = alice.lease(len(data), 60000)
            alice.set(kept, data)
        stop_gracefully(first)
    # bob is on alice's line now
    tokens.write_text("bob b-secret-0123456789\nalice a-secret-0123456789\n")
    with running(*args) as second:
        assert "restored 1 leases" in second.output()
        with as_tenant(second, "b-secret-0123456789") as bob, pytest.raises(LeaseNotFound):
            bob.get(kept)
        with as_tenant(second, "a-secret-0123456789") as alice:
            assert alice.get(kept) == data


def test_a_table_that_cannot_be_saved_is_said_and_the_exit_is_1(state_dir: Path) -> None:
    state = str(state_dir / "pool")
    with running("1M", "--bind", "127.0.0.1", "--state-file", state) as server:
        with client(server) as c:
            c.lease(100, 60000)
        state_dir.chmod(0o500)  # no new file can be made there now
        try:
            server.proc.terminate()
            assert server.proc.wait(TIMEOUT) == 1
        finally:
            state_dir.chmod(0o700)
        assert "cannot save the lease table, so the next start will be empty" in server.output()
    assert not os.path.exists(state + ".leases")


# Socket activation.


# What systemd does between fork and exec: the socket becomes descriptor 3, and LISTEN_PID
# names the process itself (exec keeps the pid).
_AS_SYSTEMD = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
os.execv(sys.executable, [sys.executable] + sys.argv[2:])
"""


def as_systemd(fd: int, *args: str) -> List[str]:
    """A command that starts the server with ``fd`` handed over as systemd hands sockets."""
    return [sys.executable, "-c", _AS_SYSTEMD, str(fd), SERVER, *args]


class ActivatedServer(ServerProcess):
    """A server process handed ``sock`` by socket activation."""

    def __init__(self, sock: socket.socket, *args: str) -> None:
        self.log = tempfile.NamedTemporaryFile(mode="w+", prefix="memlease-", suffix=".log")  # noqa: SIM115
        self.proc = subprocess.Popen(
            as_systemd(sock.fileno(), *args),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            pass_fds=(sock.fileno(),),
        )
        self.port = 0


def test_a_socket_from_systemd_is_served_and_the_port_is_not_bound() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        # The port argument is the listener's own: binding it as well would fail.
        server = ActivatedServer(listener, str(port), "1M")
    try:
        server.wait_listening()
        assert server.port == port
        assert "1 listening socket(s) from systemd; the port argument is not bound" in (
            server.output()
        )
        with client(server) as c:
            lease_id = c.lease(64, 60000)
            c.set(lease_id, b"over an inherited socket")
            assert c.get(lease_id).rstrip(b"\0") == b"over an inherited socket"
        assert "stopped: requests in flight were answered" in stop_gracefully(server)
    finally:
        server.stop()


def test_a_descriptor_that_is_no_listening_socket_is_refused_in_one_line() -> None:
    read_end, write_end = os.pipe()
    with open(read_end, "rb") as pipe, open(write_end, "wb"):
        out = subprocess.run(
            as_systemd(pipe.fileno(), "0", "1M"),
            capture_output=True,
            pass_fds=(pipe.fileno(),),
            timeout=30,
        )
    assert out.returncode == 1, out
    assert out.stderr.count(b"\n") == 1
    assert out.stderr.startswith(b"memlease_server.py: descriptor 3 from systemd: "), out.stderr


def test_variables_meant_for_another_process_are_ignored_and_removed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert systemd.listen_fds() == []
    assert "LISTEN_PID" not in os.environ and "LISTEN_FDS" not in os.environ
    assert systemd.listen_fds() == []  # nothing without the variables either


# Metrics.


def test_the_exposition_is_read_by_prometheus_with_every_figure() -> None:
    stats = dict.fromkeys(
        [
            "pool_bytes",
            "free_bytes",
            "largest_free_block",
            "live_leases",
            "metadata_bytes",
            "fragmentation",
            "leases_granted",
            "leases_refused",
            "leases_expired",
            "leases_reclaimed",
            "leases_released",
            "leases_renewed",
            "bytes_received",
            "bytes_sent",
            "connections",
            "total_connections",
            "connections_refused",
            "auth_failures",
            "uptime",
        ],
        0,
    )
    stats.update(pool_bytes=1 << 20, free_bytes=1 << 19, fragmentation=250, leases_refused=3)
    stats.update(leases_expired=9, leases_reclaimed=7)
    requests = {("lease", protocol.OK): 5, ("lease", protocol.NO_MEMORY): 3, ("get", -1): 2}
    text = metrics.render(stats, requests, {4096: 2, 1 << 18: 1}, 0.125)
    found = samples(text)
    assert found["memlease_pool_bytes", ()] == 1 << 20
    assert found["memlease_free_bytes", ()] == 1 << 19
    assert found["memlease_fragmentation_ratio", ()] == 0.25
    assert found["memlease_leases_refused_total", ()] == 3
    assert found["memlease_leases_reclaimed_total", ()] == 7
    assert found["memlease_expiry_lag_seconds", ()] == 0.125
    assert found["memlease_free_blocks", (("size_bytes", "4096"),)] == 2
    assert requests_of(found, "lease", "ok") == 5
    assert requests_of(found, "lease", "no_memory") == 3  # a refused lease is not "not found"
    assert requests_of(found, "get", "not_found") == 2
    for family in text_string_to_metric_families(text):
        assert family.documentation, family.name
        names = {sample.name for sample in family.samples}
        assert family.type == ("counter" if all(n.endswith("_total") for n in names) else "gauge")
    assert len([line for line in text.splitlines() if line.startswith("# TYPE")]) == 22


@contextlib.contextmanager
def with_metrics(
    request_seconds: float = 5.0, pool: int = 1 << 20, reaper: bool = True
) -> Iterator[Tuple[MemLeaseServer, MetricsServer]]:
    """A lease server on a thread, with a metrics endpoint on the same loop; without the
    ``reaper``, ended leases stay in the table (as when it is far behind)."""
    server = MemLeaseServer(("127.0.0.1", 0), LeaseStore(pool))
    if not reaper:
        server.loop.before_wait = None  # what schedules the reaper's turns
    endpoint = MetricsServer(
        server.loop, ("127.0.0.1", 0), partial(render_service, server.service), request_seconds
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, endpoint
    finally:
        server.shutdown()
        thread.join(TIMEOUT)
        endpoint.close()
        server.close()
        assert not thread.is_alive()


def test_counters_move_with_traffic() -> None:
    with with_metrics() as (server, endpoint):
        before = scrape(endpoint.address)
        assert before["memlease_current_leases", ()] == 0
        with MemLeaseClient(*server.server_address, timeout=TIMEOUT) as c:
            lease_id = c.lease(1000, 60000)
            c.set(lease_id, b"x" * 1000)
            assert c.get(lease_id) == b"x" * 1000
            with pytest.raises(LeaseNotFound):
                c.get(uuid.UUID(int=lease_id.int ^ 1))
            with pytest.raises(OutOfMemory):
                c.lease(1 << 20, 60000)  # the pool is split now: no block that large
            during = scrape(endpoint.address)
        after = scrape(endpoint.address)
    assert during["memlease_current_connections", ()] == 1
    assert after["memlease_current_connections", ()] == 0
    for name, moved in (
        ("memlease_current_leases", 1),
        ("memlease_leases_granted_total", 1),
        ("memlease_leases_refused_total", 1),
        ("memlease_connections_total", 1),
        ("memlease_free_bytes", -1024),
    ):
        assert after[name, ()] - before[name, ()] == moved, name
    for command, status in (
        ("get", "ok"),  # the probe the client sends with its first lease
        ("grant", "ok"),
        ("write", "ok"),
        ("read", "ok"),
        ("read", "not_found"),
    ):
        assert requests_of(after, command, status) == 1, (command, status)
    assert requests_of(after, "grant", "no_memory") == 1
    assert after["memlease_received_bytes_total", ()] > 1000  # the set carried 1000 bytes
    assert after["memlease_sent_bytes_total", ()] > 1000  # and the get brought them back


def test_health_and_refusals_answer_and_close() -> None:
    with with_metrics() as (_, endpoint):
        address = endpoint.address
        assert http_get(address, b"GET /health HTTP/1.0\r\n\r\n").endswith(b"\r\n\r\nok\n")
        head = http_get(address, b"HEAD /health HTTP/1.1\r\n\r\n")  # as health checkers ask
        assert head.startswith(b"HTTP/1.1 200")
        assert head.endswith(b"Content-Length: 3\r\nConnection: close\r\n\r\n")
        metrics_head = http_get(address, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert metrics_head.startswith(b"HTTP/1.1 200") and metrics_head.endswith(b"\r\n\r\n")
        for request, status in (
            (b"GET /nowhere HTTP/1.1\r\n\r\n", b"404"),
            (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b"405"),
            (b"nonsense\r\n\r\n", b"400"),
            (b"GET /metrics HTTP/1.1\r\nX: " + b"y" * 9000 + b"\r\n\r\n", b"431"),
        ):
            assert http_get(address, request).startswith(b"HTTP/1.1 " + status), request


def test_a_stalled_scraper_neither_blocks_the_lease_port_nor_stays() -> None:
    with with_metrics(request_seconds=1.0) as (server, endpoint):
        with socket.create_connection(endpoint.address, timeout=TIMEOUT) as stalled:
            stalled.sendall(b"GET /metr")  # and nothing more
            with MemLeaseClient(*server.server_address, timeout=TIMEOUT) as c:
                lease_id = c.lease(10, 60000)
                c.set(lease_id, b"unblocked")
                assert c.get(lease_id) == b"unblocked\0"
            assert scrape(endpoint.address)["memlease_current_leases", ()] == 1
            assert stalled.recv(100) == b""  # closed once its second is up, well within TIMEOUT
        assert wait_for(lambda: not endpoint.scrapes)


def test_silent_connections_filling_every_slot_do_not_keep_health_from_answering() -> None:
    with with_metrics() as (_, endpoint), contextlib.ExitStack() as stack:
        silent = [
            stack.enter_context(socket.create_connection(endpoint.address, timeout=TIMEOUT))
            for _ in range(metrics.MAX_CLIENTS)
        ]
        assert wait_for(lambda: len(endpoint.scrapes) == metrics.MAX_CLIENTS)
        for _ in range(3):  # each answer takes the place of the oldest silent connection
            assert http_get(endpoint.address, b"GET /health HTTP/1.0\r\n\r\n").endswith(b"ok\n")
        assert silent[0].recv(100) == b""  # the oldest was closed to make room
        assert len(endpoint.scrapes) <= metrics.MAX_CLIENTS


def test_the_command_line_serves_metrics_and_refuses_a_bad_address() -> None:
    with running("1M", "--bind", "127.0.0.1", "--metrics", "127.0.0.1:0") as server:
        said = re.compile(r"metrics at http://127\.0\.0\.1:(\d+)/metrics")
        assert wait_for(lambda: said.search(server.output())), server.output()
        match = said.search(server.output())
        assert match
        address = ("127.0.0.1", int(match.group(1)))
        with client(server) as c:
            c.lease(100, 60000)
        assert scrape(address)["memlease_leases_granted_total", ()] == 1
        taken = "127.0.0.1:%d" % address[1]
        out = subprocess.run(
            [sys.executable, SERVER, "0", "1M", "--bind", "127.0.0.1", "--metrics", taken],
            capture_output=True,
            timeout=30,
        )
        assert out.returncode == 1 and out.stderr.count(b"\n") == 1, out
        assert out.stderr.startswith(b"memlease_server.py: cannot serve metrics on 127.0.0.1 port")
    for bad in ("9412", "localhost:http", "[::1]:99999"):
        out = subprocess.run(
            [sys.executable, SERVER, "0", "1M", "--metrics", bad], capture_output=True, timeout=30
        )
        assert out.returncode == 2 and b"--metrics" in out.stderr, out


# The pool map.


def test_the_map_shows_the_share_of_each_cell_that_leases_use() -> None:
    with running("1M", "--bind", "127.0.0.1") as server, client(server) as c:
        half = c.lease(1 << 19, 60000)  # one block of half the pool
        c.lease(1000, 60000)  # one 1 KiB block
        reply = c.pool_map(64)  # cells of 16 KiB
        assert reply.pool_bytes == 1 << 20 and len(reply.used) == 64
        assert sorted(reply.used) == [0] * 31 + [1024] + [1 << 14] * 32
        full = [i for i, used in enumerate(reply.used) if used == 1 << 14]
        assert full in (list(range(32)), list(range(32, 64)))  # one half, whole
        assert reply.free_bytes == (1 << 19) - 1024 == (1 << 20) - sum(reply.used)
        assert dict(reply.free_blocks) == {1 << n: 1 for n in range(10, 19)}
        c.release(half)
        assert sum(c.pool_map(64).used) == 1024


# The unit files.


def unit_settings(name: str) -> Dict[str, str]:
    """key -> value of a unit file (the last of repeated keys), continuation lines joined."""
    text = (CONTRIB / name).read_text().replace("\\\n", " ")
    settings = {}
    for line in text.splitlines():
        key, equals, value = line.partition("=")
        if equals and not line.startswith("#"):
            settings[key.strip()] = value.strip()
    return settings


def test_the_service_runs_the_command_line_with_memory_for_its_pool() -> None:
    service = unit_settings("memlease.service")
    argv = service["ExecStart"].split()[2:]
    args = build_parser().parse_args([arg.replace("%d", "/creds") for arg in argv])
    assert (args.port, args.state_file) == (412, "/run/memlease/pool")
    assert args.state_file.startswith("/run/%s/" % service["RuntimeDirectory"])
    memory_max = parse_size(service["MemoryMax"])
    # Room for the pool and its largest write staged at once, and not much more.
    assert args.max_memory + args.max_frame < memory_max <= args.max_memory * 3 // 2
    assert service["DynamicUser"] == "yes" and "User" not in service
    assert unit_settings("memlease.socket")["ListenStream"] == "412"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_reads_the_unit_files_without_a_complaint(tmp_path: Path) -> None:
    for name in ("memlease.service", "memlease.socket"):
        shutil.copy(CONTRIB / name, tmp_path / name)
    out = subprocess.run(
        ["systemd-analyze", "verify", "memlease.socket", "memlease.service"],
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
    )
    complaints = [line for line in out.stderr.decode().splitlines() if "memlease." in line]
    assert out.returncode == 0 and complaints == [], out.stderr


def test_a_warm_restart_keeps_uuid_and_short_leases(state_dir: Path) -> None:
    state = str(state_dir / "pool")
    args = ("1M", "--bind", "127.0.0.1", "--state-file", state)
    with running(*args) as first:
        with client(first) as c:
            wide = c.lease(32, 60000)
            c.set(wide, b"under a UUID")
        with socket.create_connection(("127.0.0.1", first.port), timeout=TIMEOUT) as sock:
            sock.sendall(protocol.Lease(32, 60000).encode())
            reply = protocol.reply_decoder()
            while True:
                leased = reply.next_message()
                if leased is not None:
                    break
                data = sock.recv(64)
                assert data
                reply.feed(data)
        short = leased.lease_id  # type: ignore[union-attr]
        with client(first) as c:
            c.set(short, b"short")
        stop_gracefully(first)
    with running(*args) as second:
        assert "restored 2 leases" in second.output()
        with client(second) as c:
            assert c.get(wide, 0, 12) == b"under a UUID"
            assert c.get(short, 0, 5) == b"short"
