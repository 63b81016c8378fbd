"""Both commands as scripts run them: their names, versions and help, exit statuses,
output for scripts (--json), durations with units and the client's --token-file.

The installed commands are run through the wrapper pip writes for a console script
(``from memlease_server import main; sys.exit(main())`` in a file named
``memlease-server``), with the project on PYTHONPATH.
"""

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from memlease import __version__
from memlease_client import MemLeaseClient
from tests.helpers import (
    CLIENT,
    ROOT,
    SERVER,
    ServerProcess,
    directory_for_nobody,
    server_process,
)

ENTRY_POINTS = {"memlease-server": "memlease_server:main", "memlease-client": "memlease.cli:main"}


def environment(**extra: str) -> Dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "MEMLEASE_TOKEN"}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


@pytest.fixture
def installed(tmp_path: Path) -> Dict[str, str]:
    """The console scripts ``pip install .`` makes, as files named like the commands."""
    scripts = {}
    for name, target in ENTRY_POINTS.items():
        module, function = target.split(":")
        path = tmp_path / name
        path.write_text(
            "#!%s\nimport sys\nfrom %s import %s\nsys.exit(%s())\n"
            % (sys.executable, module, function, function)
        )
        path.chmod(0o755)
        scripts[name] = str(path)
    return scripts


def run(argv: List[str], stdin: bytes = b"") -> "subprocess.CompletedProcess[bytes]":
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=60, env=environment())


@contextlib.contextmanager
def run_listener() -> Iterator[int]:
    """A port something listens on, for the length of a with block."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_the_installed_server_says_its_own_name(installed: Dict[str, str]) -> None:
    server = installed["memlease-server"]
    out = run([server, "--help"])
    assert out.returncode == 0
    assert out.stdout.startswith(b"usage: memlease-server ")
    assert b"sudo memlease-server 412 2048" in out.stdout
    assert b"memlease_server" not in out.stdout
    out = run([server, "412"])
    assert out.returncode == 2
    assert out.stderr.startswith(b"memlease-server: usage error: ")
    assert out.stderr.endswith(b"(see memlease-server --help)\n")
    with run_listener() as port:  # a port in use: the error after the parser's, same name
        out = run([server, str(port), "1M", "--bind", "127.0.0.1"])
    assert out.returncode == 1
    assert out.stderr.startswith(b"memlease-server: cannot listen on 127.0.0.1 port %d" % port)


def test_the_script_says_its_file_name() -> None:
    out = run([sys.executable, SERVER, "--help"])
    assert b"usage: memlease_server.py " in out.stdout
    assert b"sudo python3 memlease_server.py 412 2048" in out.stdout


def test_both_commands_print_the_projects_one_version(installed: Dict[str, str]) -> None:
    for name, script in installed.items():
        out = run([script, "--version"])
        assert (out.returncode, out.stdout, out.stderr) == (
            0,
            ("%s %s\n" % (name, __version__)).encode(),
            b"",
        )
    for script in (SERVER, CLIENT):
        out = run([sys.executable, script, "--version"])
        assert out.stdout == ("%s %s\n" % (os.path.basename(script), __version__)).encode()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject
    assert 'version = { attr = "memlease.__version__" }' in pyproject


def test_a_commands_help_needs_no_host() -> None:
    out = run([sys.executable, CLIENT, "map", "--help"])
    assert out.returncode == 0
    assert out.stdout.startswith(b"usage: memlease_client.py host [port] map ")
    assert b"--cells" in out.stdout


# Exit statuses: every failure 1, and a reader that leaves changes nothing.


def test_stats_of_a_cluster_exits_1_when_a_server_or_all_are_down() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        down = "127.0.0.1:%d" % closed.getsockname()[1]
        out = run([sys.executable, CLIENT, "%s,localhost:%s" % (down, down.split(":")[1]), "stats"])
        assert out.returncode == 1
        assert out.stdout == b""
        assert out.stderr.startswith(b"memlease_client.py: no server is up: " + down.encode())
        assert out.stderr.count(b"\n") == 1
        with server_process("1M", "-q") as server:
            up = "127.0.0.1:%d" % server.port
            out = run([sys.executable, CLIENT, "%s,%s" % (up, down), "stats"])
    assert out.returncode == 1
    lines = out.stdout.decode().splitlines()
    assert "%s pool_bytes 1048576" % up in lines
    assert [line for line in lines if " down " in line][0].startswith(down + " down ")


def test_a_reader_that_leaves_ends_the_run_the_same_way_every_time() -> None:
    with server_process("1M", "-q") as server:
        pipeline = '"$@" | head -1 >/dev/null; exit "${PIPESTATUS[0]}"'
        argv = ["bash", "-c", pipeline, "bash", sys.executable, CLIENT]
        statuses = [
            run(argv + ["127.0.0.1", str(server.port), "stats"]).returncode for _ in range(10)
        ]
        assert statuses == [0] * 10  # stats worked, whether head left early or late
        with MemLeaseClient("127.0.0.1", server.port, timeout=5.0) as client:
            lines = client.lease(512 << 10, 60000)  # 512 KiB of lines: head leaves mid-way
            client.set(lines, b"line\n" * ((512 << 10) // 5))
            gone = client.lease(16, 60000)
            client.release(gone)
        raw = argv + ["127.0.0.1", str(server.port), "get", str(lines), "--raw"]
        assert [run(raw).returncode for _ in range(10)] == [0] * 10
        missing = argv + ["127.0.0.1", str(server.port), "get", str(gone)]
        assert run(missing).returncode == 1  # a failure is still one


# Errors that point the right way.


def test_a_state_file_in_a_missing_directory_is_said_to_be_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nosuchdir"
    out = run([sys.executable, SERVER, "0", "1M", "--state-file", str(missing / "pool")])
    assert out.returncode == 2
    assert out.stderr == (
        b"memlease_server.py: usage error: the directory %s, where the state is saved, "
        b"does not exist: create it first (see memlease_server.py --help)\n" % bytes(missing)
    )


def test_tls_against_a_plain_port_is_told_to_go_without() -> None:
    with server_process("1M", "-q") as plain:
        out = run([sys.executable, CLIENT, "127.0.0.1", str(plain.port), "stats", "--tls"])
    assert out.returncode == 1
    assert out.stderr.startswith(b"memlease_client.py: TLS handshake with 127.0.0.1:")
    assert out.stderr.endswith(
        b" (the server does not speak TLS on this port: try without --tls)\n"
    )


# What the server's log says about how it runs, and docs that say what it does.


def test_the_log_says_tls_the_token_file_a_first_start_and_the_save(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    cert = tmp_path / "server.pem"
    trustme.CA().issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert))
    tokens = tmp_path / "token"
    tokens.write_text("correct horse battery staple\n")
    with directory_for_nobody("memlease-state-") as state:
        server = ServerProcess(
            "0", "1M", "--bind", "127.0.0.1", "--tls-cert", str(cert), "--token-file",
            str(tokens), "--state-file", str(state / "pool"),
        )  # fmt: skip
        try:
            server.wait_listening()
            server.proc.terminate()
            assert server.proc.wait(10) == 0
            log = server.output()
        finally:
            server.stop()
    assert "INFO first start with %s: an empty pool" % (state / "pool") in log
    assert "WARNING" not in log
    assert "INFO TLS is on\n" in log
    assert "INFO token file %s read as one token (a single line; " % tokens in log
    assert "INFO saved the lease table beside %s for the next start" % (state / "pool") in log


def test_a_server_stop_says_whether_the_leases_were_saved() -> None:
    server = ServerProcess("0", "1M", "--bind", "127.0.0.1")
    try:
        server.wait_listening()
        server.proc.terminate()
        assert server.proc.wait(10) == 0
        log = server.output()
    finally:
        server.stop()
    assert "not saved: without --state-file the leases end with the server" in log


def test_the_docs_name_what_the_programs_do() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    operations = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    assert "poolmap" not in readme and "print usage" not in readme
    assert "as always" not in operations
    assert "`running as user nobody` log line comes before them" in readme


# Durations with units, and the client's --token-file.


def test_durations_take_units_and_a_bare_number_is_milliseconds() -> None:
    with server_process("1M", "-q") as server:
        where = ["127.0.0.1", str(server.port)]
        for given, ms in (("500ms", 500), ("5s", 5000), ("2m", 120000), ("1h", 3600000)):
            out = run([sys.executable, CLIENT, *where, "lease", "1K", given])
            assert out.returncode == 0, out.stderr
            assert out.stdout.startswith(b"You have leased 1024 bytes for %d MS with id " % ms)
        lease_id = out.stdout.split()[-1].decode()
        out = run([sys.executable, CLIENT, *where, "renew", lease_id, "250"])
        assert out.stdout == b"Lease %s renewed for 250 MS\n" % lease_id.encode()
        out = run([sys.executable, CLIENT, *where, "lease", "1K", "5x"])
    assert out.returncode == 2
    assert b"'5x' is not a duration: use milliseconds, or a number with ms, s, m or h" in out.stderr


def test_the_client_presents_the_token_of_its_token_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-of-the-test-0123\n")
    wrong = tmp_path / "wrong"
    wrong.write_text("guess\n")
    env = dict(environment(), MEMLEASE_TOKEN="s3cret-of-the-test-0123")
    with server_process("1M", "-q", env=env) as server:
        where = ["127.0.0.1", str(server.port)]
        out = run([sys.executable, CLIENT, *where, "stats", "--token-file", str(token)])
        assert out.returncode == 0 and b"live_leases 0\n" in out.stdout, out.stderr
        out = run([sys.executable, CLIENT, *where, "--token-file", str(wrong), "stats"])
    assert (out.returncode, out.stdout) == (1, b"")
    assert out.stderr == b"memlease_client.py: the server refused the token in %s\n" % bytes(wrong)
