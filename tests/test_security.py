"""Security: dropping root, TLS, protected mode, tenants, and limits on guessing and log floods.

Servers are real (a loop in a thread, or a child process where the test needs root or
the command line); sockets are real, on loopback; certificates come from trustme.
Limits are checked by counting refusals and log lines, never by timing them.
"""

import contextlib
import logging
import os
import pwd
import re
import socket
import ssl
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import ContextManager, Iterator, List, Optional, Tuple

import pytest
import trustme

import protocol
from memlease import security
from memlease.listener import MemLeaseServer
from memlease_client import (
    LeaseNotFound,
    MemLeaseClient,
    MemLeaseError,
    OutOfMemory,
    QuotaExceeded,
    Unauthorized,
    client_tls_context,
)
from tests.helpers import (
    SERVER,
    TIMEOUT,
    UUID_PATTERN,
    ServerProcess,
    closed_by_peer,
    directory_for_nobody,
    exchange,
    read_replies,
    run_cli,
    server_process,
    server_thread,
    wait_for,
)

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the server drops it")


class Minute:
    """A clock the test moves by hand, for the limiters."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def serving(
    ssl_context: Optional[ssl.SSLContext] = None, pool: int = 1 << 20, **service: object
) -> ContextManager[MemLeaseServer]:
    """A server on a loop in a thread, its Service built from ``service``; always stopped."""
    return server_thread(pool, service=service, ssl_context=ssl_context)


def client(server: MemLeaseServer, **options: object) -> MemLeaseClient:
    host, port = server.server_address
    return MemLeaseClient(host, port, timeout=TIMEOUT, **options)  # type: ignore[arg-type]


def raw(server: MemLeaseServer) -> socket.socket:
    return socket.create_connection(server.server_address, timeout=TIMEOUT)


def warnings_with(caplog: pytest.LogCaptureFixture, text: str) -> List[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


# Tenants and their file.


def test_a_tenant_file_names_tenants_with_tokens_and_quotas():
    tenants = security.Tenants.parse(
        "# name token max_bytes\n\nalice a-secret 16M\n  bob b-secret\n", "the file"
    )
    assert len(tenants) == 2
    alice, bob = security.tenant_number("alice"), security.tenant_number("bob")
    assert tenants.authenticate(b"a-secret") == alice
    assert tenants.authenticate(b"b-secret") == bob
    assert tenants.authenticate(b"a-secre") is None and tenants.authenticate(b"") is None
    assert (tenants.quota(alice), tenants.quota(bob)) == (16 << 20, 0)
    assert tenants.name(bob) == "bob"


def test_a_one_line_token_file_is_one_token_spaces_and_all():
    tenants = security.Tenants.parse("correct horse battery staple\n", "f")
    default = security.tenant_number("default")
    assert tenants.authenticate(b"correct horse battery staple") == default
    assert tenants.authenticate(b"horse") is None


@pytest.mark.parametrize(
    "text, error",
    [
        ("", "holds no token"),
        ("# only a comment\n", "holds no token"),
        ("#\nalice a\nbob b\nalice c\n", "'alice' is defined twice"),
        ("#\nalice same\nbob same\n", "'bob' has the token of another tenant"),
        ("#\nalice a 16Q\n", "line 2: '16Q' is not a size"),
        ("#\nalice\n", "line 2: expected NAME TOKEN"),
        ("alice a 1M\nbob b 1M extra\n", "line 2: expected NAME TOKEN"),
    ],
)
def test_a_bad_tenant_file_is_refused_naming_the_line(text, error):
    with pytest.raises(ValueError, match=re.escape(error)):
        security.Tenants.parse(text, "the file")


def test_the_token_comes_from_the_environment_without_a_file():
    assert security.load_tenants(None, {}) is None
    tenants = security.load_tenants(None, {"MEMLEASE_TOKEN": "s3cret-of-16-bytes"})
    assert tenants is not None
    assert tenants.authenticate(b"s3cret-of-16-bytes") == security.tenant_number("default")


@pytest.mark.parametrize(
    "env, tokens, words",
    [
        ({"MEMLEASE_TOKEN": "abc"}, None, "$MEMLEASE_TOKEN: the token is shorter than 16 bytes"),
        ({}, "alice a-long-enough-token\nbob short\n", "the token of bob is shorter than 16"),
        ({}, "fifteen-bytes!!\n", "the token is shorter than 16 bytes"),
    ],
)
def test_a_short_token_is_refused_at_start_in_one_line(tmp_path, env, tokens, words):
    args = [sys.executable, SERVER, "0", "1M", "--bind", "127.0.0.1"]
    if tokens is not None:
        (tmp_path / "tokens").write_text(tokens)
        args += ["--token-file", str(tmp_path / "tokens")]
    environ = {k: v for k, v in os.environ.items() if k != "MEMLEASE_TOKEN"}
    out = subprocess.run(args, capture_output=True, timeout=30, env=dict(environ, **env))
    assert out.returncode == 2 and words.encode() in out.stderr, out
    assert out.stderr.count(b"\n") == 1 and b"short enough to guess" in out.stderr


@contextlib.contextmanager
def alice_and_bob(tenant_file: str) -> Iterator[Tuple[MemLeaseClient, MemLeaseClient]]:
    """Clients of two tenants (tokens a-secret and b-secret) of one server."""
    tenants = security.Tenants.parse(tenant_file, "the file")
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(serving(tenants=tenants))
        alice = stack.enter_context(client(server, token="a-secret"))
        yield alice, stack.enter_context(client(server, token="b-secret"))


def test_two_tenants_never_see_each_others_leases():
    with alice_and_bob("alice a-secret\nbob b-secret\n") as (alice, bob):
        lease_id = alice.lease(64, 60000)
        alice.set(lease_id, b"alice's")
        for attempt in (
            lambda: bob.get(lease_id),
            lambda: bob.set(lease_id, b"bob's"),
            lambda: bob.renew(lease_id, 1000),
            lambda: bob.release(lease_id),
        ):
            with pytest.raises(LeaseNotFound):
                attempt()
        assert alice.get(lease_id, length=7) == b"alice's"
        assert (alice.stats()["tenant_leases"], bob.stats()["tenant_leases"]) == (1, 0)
        # An id nobody holds is answered exactly as another tenant's lease is.
        with pytest.raises(LeaseNotFound):
            bob.get(uuid.uuid4())


def test_a_tenant_quota_holds_and_frees_with_its_leases():
    with alice_and_bob("alice a-secret 64K\nbob b-secret\n") as (alice, bob):
        first = alice.lease(32 << 10, 60000)
        alice.lease(32 << 10, 60000)
        with pytest.raises(OutOfMemory):
            alice.lease(32, 60000)
        assert bob.lease(128 << 10, 60000).version == 4  # bob has no quota; alice's is hers
        alice.release(first)
        assert alice.lease(32 << 10, 60000).version == 4
        assert alice.stats()["tenant_bytes"] == 64 << 10


def test_a_lease_over_the_quota_is_said_to_be_the_quota_with_the_figures(tmp_path: Path):
    tokens = tmp_path / "tenants"
    tokens.write_text("alice alice-secret-0123456789 4K\nbob bob-secret-0123456789\n")
    with server_process("1M", "--token-file", str(tokens)) as server:
        token = "alice-secret-0123456789"
        env = dict(os.environ, MEMLEASE_TOKEN=token)
        with MemLeaseClient("127.0.0.1", server.port, timeout=TIMEOUT, token=token) as alice:
            alice.lease(2048, 60000)
            with pytest.raises(QuotaExceeded) as refused:  # an OutOfMemory, as before
                alice.lease(4096, 60000)
            assert refused.value.status == protocol.OVER_QUOTA == -11
            assert isinstance(refused.value, OutOfMemory)
        out = run_cli("lease", "4K", port=server.port, env=env)
        log = server.output()
    assert out.returncode == 1
    assert out.stdout.decode().splitlines() == [
        "Failed to create lease due to insufficient resources on the server.",
        "reason: over your quota: the quota is 4 KiB, you hold 2 KiB and asked for 4 KiB (-11)",
    ]
    assert "grant 4096 bytes for 5000 ms -> refused (over the quota of tenant alice: " in log
    assert "quota 4 KiB, held 2 KiB, asked 4 KiB)" in log
    assert "no free block" not in log


# Wrong tokens.


def test_a_wrong_token_after_a_right_one_closes_the_connection():
    with serving(token=b"right") as server, raw(server) as sock:
        assert exchange(sock, protocol.Auth(b"right").encode()) == [protocol.DataSet(protocol.OK)]
        assert exchange(sock, protocol.Lease(32, 1000).encode())[0].lease_id > 0
        frames = protocol.Auth(b"wrong").encode() + protocol.Lease(32, 1000).encode()
        assert exchange(sock, frames, 2) == [protocol.DataSet(protocol.UNAUTHORIZED)]
        assert closed_by_peer(sock)


def test_wrong_tokens_are_slowed_while_the_right_one_gets_in_at_once(caplog):
    caplog.set_level(logging.WARNING, logger="memlease")
    free = security.WRONG_TOKENS_FREE
    with serving(token=b"right") as server:
        for _ in range(free + 3):
            with pytest.raises(Unauthorized):
                client(server, token="wrong").stats()
        counters = server.service.counters
        assert counters["auth_failures"] == free + 3
        assert counters["auth_answers_delayed"] == 3  # the later wrong tokens waited
        # From now on this host's wrong tokens wait half a minute for their answer.
        server.service.wrong_tokens = security.Backoff(free=0, first=30.0, most=30.0)
        with raw(server) as guesser, raw(server) as honest:
            guesser.sendall(protocol.Auth(b"wrong again").encode())
            assert wait_for(lambda: counters["auth_answers_delayed"] == 4)
            # The right token from the same host is compared and answered meanwhile.
            frames = protocol.Auth(b"right").encode() + protocol.Stats().encode()
            replies = exchange(honest, frames, 2)
            assert replies[0] == protocol.DataSet(protocol.OK)
            assert isinstance(replies[1], protocol.StatsReply)
            guesser.setblocking(False)
            with pytest.raises(BlockingIOError):  # still held: not a byte of its answer yet
                guesser.recv(1)
    assert len(warnings_with(caplog, "wrong token")) == server.service.warnings.burst


def test_the_delay_for_wrong_tokens_grows_then_the_window_forgets():
    clock = Minute()
    backoff = security.Backoff(free=2, first=0.5, most=4.0, clock=clock)
    assert [backoff.failed("h") for _ in range(7)] == [0.0, 0.0, 0.5, 1.0, 2.0, 4.0, 4.0]
    assert backoff.failed("other host") == 0.0
    clock.now += 60.0
    assert backoff.failed("h") == 0.0
    full = security.Backoff(free=0, first=1.0, max_keys=2, clock=clock)
    assert full.failed("a") == full.failed("b") == 1.0
    assert full.failed("c") == 1.0 and full.failed("d") == 2.0  # past the table: shared
    assert len(full) == 3


def test_wrong_tokens_are_allowed_again_as_the_minute_passes():
    clock = Minute()
    limiter = security.RateLimiter(10, 60.0, clock=clock)
    assert [limiter.take("h") for _ in range(11)] == [True] * 10 + [False]
    assert not limiter.allowed("h") and limiter.allowed("other host")
    clock.now += 6.0  # a tenth of the minute: one more
    assert limiter.take("h") and not limiter.take("h")
    clock.now += 60.0
    assert sum(limiter.take("h") for _ in range(20)) == 10


def test_the_limiter_table_is_bounded_and_extra_sources_share_one_budget():
    clock = Minute()
    limiter = security.RateLimiter(2, 60.0, max_keys=3, clock=clock)
    for host in ("a", "b", "c"):
        assert limiter.take(host)
    assert limiter.take("d") and limiter.take("e")  # the table is full: one shared budget
    assert len(limiter) == 4  # three sources and the shared bucket
    assert not limiter.allowed("f")  # d and e used up the budget f shares
    assert limiter.allowed("a")  # a source in the table keeps its own
    clock.now += 60.0  # every bucket refills: as good as absent, so dropped for new sources
    assert limiter.take("g") and len(limiter) == 1


# Guessing lease ids.


def guesses(first_id: int, count: int, but: int = 0) -> bytes:
    """Gets of ``count`` ids from ``first_id`` on, skipping the lease ``but``."""
    ids = [i for i in range(first_id, first_id + count + 1) if i != but][:count]
    return b"".join(protocol.AccessData(i).encode() for i in ids)


def test_a_connection_that_mostly_guesses_ids_is_closed_then_its_host_waits(caplog):
    caplog.set_level(logging.WARNING, logger="memlease")
    with serving() as server:
        counters = server.service.counters
        for round_ in range(security.GUESSING_CLOSES_PER_MINUTE):
            with raw(server) as sock:
                replies = exchange(sock, guesses(1000 + 200 * round_, 150), 150)
                assert len(replies) == security.GUESS_MIN_MISSES
                assert closed_by_peer(sock)
        assert counters["connections_closed_guessing"] == security.GUESSING_CLOSES_PER_MINUTE
        with raw(server) as sock:  # the host's share is used up: refused unheard
            assert read_replies(sock, 2) == [protocol.Error(protocol.UNAUTHORIZED, 0)]
        assert counters["connections_refused_guessing"] == 1
    # Three lines of the closes, then suppressed; one of the refusal.
    assert len(warnings_with(caplog, "lease ids that do not exist")) == 3 + 1


def test_an_honest_client_that_misses_sometimes_is_not_closed():
    with serving() as server, raw(server) as sock:
        lease_id = exchange(sock, protocol.Lease(32, 60000).encode())[0].lease_id
        # 85% misses, over twice the minimum: an expiring cache, say.
        frames = (guesses(1, 17, lease_id) + protocol.AccessData(lease_id).encode() * 3) * 15
        assert len(exchange(sock, frames, 300)) == 300
        assert exchange(sock, protocol.AccessData(lease_id).encode())[0].data
        assert server.service.counters["connections_closed_guessing"] == 0


def test_guessing_needs_many_misses_that_dominate():
    assert not security.guessing(99, 99)
    assert security.guessing(100, 100) and security.guessing(100, 111)
    assert not security.guessing(100, 112) and not security.guessing(900, 1000)


# Log floods.


def test_bad_frames_log_a_few_lines_then_how_many_were_suppressed(caplog):
    caplog.set_level(logging.WARNING, logger="memlease")
    bad_frame = struct.pack("<iq", protocol.LEASE, -8)  # a negative length: closes
    with serving() as server:
        server.service.warnings.period = 0.3
        for _ in range(30):
            with raw(server) as sock:
                sock.sendall(bad_frame)
                assert closed_by_peer(sock)
        assert len(warnings_with(caplog, "bad frame")) == 3
        time.sleep(0.4)  # the period is over: the next warning reports the count
        with raw(server) as sock:
            sock.sendall(bad_frame)
            assert closed_by_peer(sock)
    assert warnings_with(caplog, "27 more frame warnings from 127.0.0.1 suppressed")
    assert len(warnings_with(caplog, "bad frame")) == 4


def test_the_log_limiter_counts_per_kind_and_source_with_a_bounded_table():
    clock = Minute()
    lines: List[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("test_security.limiter")
    logger.propagate = False
    logger.addHandler(Collect())
    limiter = security.LogLimiter(logger, burst=2, period=60.0, max_keys=2, clock=clock)
    for _ in range(5):
        limiter.warning("frame", "10.0.0.1", "bad from %s", "10.0.0.1")
    limiter.warning("frame", "10.0.0.2", "bad from %s", "10.0.0.2")
    assert lines == ["bad from 10.0.0.1"] * 2 + ["bad from 10.0.0.2"]
    limiter.warning("auth", "10.0.0.3", "wrong token")  # a third key: the oldest is reported
    assert lines[3:] == ["3 more frame warnings from 10.0.0.1 suppressed in 60s", "wrong token"]
    assert limiter.suppressed == 3


# Protected mode.


def test_without_a_token_a_peer_outside_allow_is_refused_and_told_why(caplog):
    caplog.set_level(logging.WARNING, logger="memlease")
    with serving(allow=security.AllowList.parse("10.0.0.0/8")) as server:
        for _ in range(5):
            with raw(server) as sock:
                assert read_replies(sock, 2) == [protocol.Error(protocol.UNAUTHORIZED, 0)]
                assert closed_by_peer(sock)
        assert server.service.counters["connections_refused_protected"] == 5
    logged = warnings_with(caplog, "protected mode")
    assert 1 <= len(logged) <= 3
    assert "set a token" in logged[0] and "widen --allow" in logged[0]


def test_with_a_token_protected_mode_is_off():
    allow = security.AllowList.parse("10.0.0.0/8")
    with serving(token=b"t", allow=allow) as server, client(server, token="t") as c:
        assert c.lease(32).version == 4


@pytest.mark.parametrize(
    "address, allowed",
    [
        (("127.0.0.1", 1), True),
        (("127.9.9.9", 1), True),
        (("::1", 1, 0, 0), True),
        (("::ffff:127.0.0.1", 1, 0, 0), True),
        (("::ffff:10.0.0.1", 1, 0, 0), False),
        (("10.0.0.1", 1), False),
        (("fe80::1%lo", 1, 0, 1), False),
        ("", True),  # a Unix socket: local
    ],
)
def test_the_default_allow_list_is_loopback(address, allowed):
    assert security.AllowList.parse(security.LOOPBACK).allows(address) is allowed


def test_sources_count_hosts_and_ipv6_networks_not_ports():
    assert security.source_of(("127.0.0.1", 5)) == security.source_of(("127.0.0.1", 6))
    assert security.source_of(("::ffff:10.1.2.3", 5, 0, 0)) == "10.1.2.3"
    assert security.source_of(("2001:db8::1", 5, 0, 0)) == "2001:db8::/64"
    assert security.source_of(("2001:db8::ffff", 5, 0, 0)) == "2001:db8::/64"


# TLS.


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_files(authority: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """PEM files: the authority, the server's certificate and key, a client's."""
    where = tmp_path_factory.mktemp("tls")
    server_cert = authority.issue_cert("127.0.0.1", "localhost")
    client_cert = authority.issue_cert("client@example.org")
    files = {
        "ca": where / "ca.pem",
        "cert": where / "server.pem",
        "key": where / "server.key",
        "client": where / "client.pem",
    }
    authority.cert_pem.write_to_path(str(files["ca"]))
    server_cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    server_cert.private_key_pem.write_to_path(str(files["key"]))
    client_cert.private_key_and_cert_chain_pem.write_to_path(str(files["client"]))
    for path in files.values():
        path.chmod(0o644)  # a server started as root reads them before it drops root
    return {name: str(path) for name, path in files.items()}


def test_tls_round_trip(tls_files):
    context = security.server_tls_context(tls_files["cert"], tls_files["key"])
    with serving(context) as server, client(server, tls=client_tls_context(tls_files["ca"])) as c:
        lease_id = c.lease(256 << 10, 60000)
        c.set(lease_id, b"x" * (200 << 10))  # streamed, through TLS
        assert c.get(lease_id, length=200 << 10) == b"x" * (200 << 10)


def test_the_server_context_wants_tls_1_2_and_certificates_only_with_an_authority(tls_files):
    plain = security.server_tls_context(tls_files["cert"], tls_files["key"])
    mutual = security.server_tls_context(tls_files["cert"], tls_files["key"], tls_files["ca"])
    assert plain.minimum_version == mutual.minimum_version == ssl.TLSVersion.TLSv1_2
    assert (plain.verify_mode, mutual.verify_mode) == (ssl.CERT_NONE, ssl.CERT_REQUIRED)


def test_mutual_tls_refuses_a_client_without_a_certificate(tls_files):
    context = security.server_tls_context(tls_files["cert"], tls_files["key"], tls_files["ca"])
    with serving(context) as server:
        with pytest.raises(MemLeaseError):
            client(server, tls=client_tls_context(tls_files["ca"])).stats()
        mutual = client_tls_context(tls_files["ca"], tls_files["client"])
        with client(server, tls=mutual) as c:
            assert c.lease(32).version == 4


def test_a_silent_tls_client_stalls_nobody(tls_files):
    context = security.server_tls_context(tls_files["cert"], tls_files["key"])
    with serving(context) as server:
        silent = [raw(server) for _ in range(3)]  # connected, no ClientHello
        half = raw(server)
        half.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, no more
        try:
            with client(server, tls=client_tls_context(tls_files["ca"])) as c:
                assert c.lease(32).version == 4
            assert wait_for(lambda: len(server.channels) == 4)  # the others still wait
        finally:
            for sock in [*silent, half]:
                sock.close()


def test_a_tls_handshake_must_finish_within_the_frame_timeout(tls_files, caplog):
    caplog.set_level(logging.INFO, logger="memlease")
    context = security.server_tls_context(tls_files["cert"], tls_files["key"])
    with server_thread(ssl_context=context, frame_timeout=0.3) as server:
        with raw(server) as silent:  # connected, and never says hello
            assert closed_by_peer(silent)
        assert wait_for(lambda: not server.channels)
        assert warnings_with(caplog, "closed: TLS handshake incomplete after 0.3s")


def test_a_plain_client_on_a_tls_port_fails_at_once(tls_files):
    context = security.server_tls_context(tls_files["cert"], tls_files["key"])
    with serving(context) as server:
        with raw(server) as sock:
            sock.sendall(protocol.Lease(32, 1000).encode())
            assert closed_by_peer(sock)  # within the socket timeout: no hang
        with pytest.raises(MemLeaseError):
            client(server).lease(32)
        plain = [raw(server) for _ in range(20)]  # their bytes often arrive before the accept
        for sock in plain:
            sock.sendall(protocol.Lease(32, 1000).encode())
        assert all(closed_by_peer(sock) for sock in plain)
        for sock in plain:
            sock.close()
        assert wait_for(lambda: not server.channels)  # none is left behind, half-closed


def test_tls_through_both_command_lines(tls_files):
    server = ServerProcess(
        "0",
        "1M",
        "--bind",
        "127.0.0.1",
        "--tls-cert",
        tls_files["cert"],
        "--tls-key",
        tls_files["key"],
    )
    try:
        server.wait_listening()
        out = run_cli("--tls-ca", tls_files["ca"], "lease", "32", port=server.port)
        assert out.returncode == 0 and b"You have leased 32 bytes" in out.stdout, out
        out = run_cli("lease", "32", port=server.port)
        assert out.returncode == 1 and b"Traceback" not in out.stderr
    finally:
        server.stop()


@pytest.mark.parametrize(
    "args, error",
    [
        (["--tls-key", "k.pem"], "need --tls-cert"),
        (["--tls-cert", "/nonexistent.pem"], "cannot use the TLS files"),
        (["--allow", "10.0.0.0/33"], "is not an address or a network"),
        (["--user", "no-such-user-here"], "no such user"),
        (["--token-file", "/dev/zero"], "the token file /dev/zero is over 1048576 bytes"),
    ],
)
def test_bad_security_options_exit_2_in_one_line(args, error):
    out = subprocess.run(
        [sys.executable, SERVER, "0", "1M", "--bind", "127.0.0.1", *args],
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 2 and error.encode() in out.stderr, out
    assert out.stderr.count(b"\n") == 1  # one line, without argparse's usage block
    assert out.stderr.startswith(b"memlease_server.py: usage error: ")


# Dropping root.


def status_ids(pid: int) -> dict:
    """The Uid, Gid and Groups lines of /proc/PID/status."""
    text = Path("/proc/%d/status" % pid).read_text()
    return {
        key: text.split(key + ":", 1)[1].split("\n", 1)[0].split()
        for key in ("Uid", "Gid", "Groups")
    }


@pytest.fixture
def nobodys_dir() -> Iterator[Path]:
    """A directory nobody may write in, reachable by nobody (pytest's tmp_path is not)."""
    with directory_for_nobody("memlease-security-") as path:
        yield path


@as_root
def test_started_as_root_the_server_serves_the_seed_session_as_nobody(nobodys_dir):
    nobody = pwd.getpwnam("nobody")
    state_dir = nobodys_dir
    server = ServerProcess(
        "0", "2048", "--bind", "127.0.0.1", "--state-file", str(state_dir / "pool")
    )
    try:
        server.wait_listening()
        ids = status_ids(server.proc.pid)
        # Real, effective, saved and file-system ids: none is root, so none can come back.
        assert ids["Uid"] == [str(nobody.pw_uid)] * 4
        assert ids["Gid"] == [str(nobody.pw_gid)] * 4
        assert ids["Groups"] == []  # root's supplementary groups are gone
        out = run_cli("lease", "1024", "5000", port=server.port)
        assert out.returncode == 0, out
        lease_id = re.search(rb"with id (%s)" % UUID_PATTERN, out.stdout).group(1).decode()  # type: ignore[union-attr]
        assert run_cli("set", lease_id, "this is some text", port=server.port).returncode == 0
        out = run_cli("get", lease_id, port=server.port)
        assert out.stdout == b"Data get for lease %s: this is some text\n" % lease_id.encode()
        assert "running as user nobody" in server.output()
        assert server.stop() == 0
        # The lease table was written at the stop, after the drop: by nobody.
        assert (state_dir / "pool.leases").stat().st_uid == nobody.pw_uid
        assert (state_dir / "pool").stat().st_uid == nobody.pw_uid
    finally:
        server.stop()


@as_root
def test_a_state_file_nobody_could_not_save_is_refused_at_start(nobodys_dir):
    root_only = nobodys_dir / "root-only"
    root_only.mkdir(mode=0o700)
    out = subprocess.run(
        [
            sys.executable,
            SERVER,
            "0",
            "1M",
            "--bind",
            "127.0.0.1",
            "--state-file",
            str(root_only / "pool"),
        ],
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert b"user nobody cannot write in %s" % str(root_only).encode() in out.stderr
    assert not (root_only / "pool").exists()


@as_root
def test_user_root_keeps_root_and_says_so():
    server = ServerProcess("0", "1M", "--bind", "127.0.0.1", "--user", "root")
    try:
        server.wait_listening()
        assert status_ids(server.proc.pid)["Uid"] == ["0"] * 4
        assert re.search(r"WARNING running as root", server.output())
    finally:
        server.stop()
