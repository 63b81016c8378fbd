"""Both commands as scripts run them: their names, versions and help, exit statuses,
output for scripts (--json), durations with units and the client's --token-file.

The installed commands are run through the wrapper pip writes for a console script
(``from memlease_server import main; sys.exit(main())`` in a file named
``memlease-server``), with the project on PYTHONPATH.
"""

import base64
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import uuid
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


def log_of_a_run(*argv: str) -> str:
    """The whole log of a server started with ``argv`` and stopped at once by SIGTERM,
    which it must take as a graceful stop (exit 0)."""
    server = ServerProcess(*argv)
    try:
        server.wait_listening()
        server.proc.terminate()
        assert server.proc.wait(10) == 0
        return server.output()
    finally:
        server.stop()


def test_the_log_says_tls_the_token_file_a_first_start_and_the_save(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    cert = tmp_path / "server.pem"
    trustme.CA().issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert))
    tokens = tmp_path / "token"
    tokens.write_text("correct horse battery staple\n")
    with directory_for_nobody("memlease-state-") as state:
        log = log_of_a_run(
            "0", "1M", "--bind", "127.0.0.1", "--tls-cert", str(cert), "--token-file",
            str(tokens), "--state-file", str(state / "pool"),
        )  # fmt: skip
    assert "INFO first start with %s: an empty pool" % (state / "pool") in log
    assert "WARNING" not in log
    assert "INFO TLS is on\n" in log
    assert "INFO token file %s read as one token (a single line; " % tokens in log
    assert "INFO saved the lease table beside %s for the next start" % (state / "pool") in log


def test_a_server_stop_says_whether_the_leases_were_saved() -> None:
    log = log_of_a_run("0", "1M", "--bind", "127.0.0.1")
    assert "not saved: without --state-file the leases end with the server" in log


def test_the_docs_name_what_the_programs_do() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    operations = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    assert "poolmap" not in readme and "print usage" not in readme
    assert "as always" not in operations
    assert "started as root, `running as user nobody`; `TLS is on`" in readme
    assert "Then it prints `starting server on port PORT`" in readme


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


# Output for scripts: --json on every command.


def json_run(*argv: str, stdin: bytes = b"") -> "subprocess.CompletedProcess[bytes]":
    return run([sys.executable, CLIENT, *argv, "--json"], stdin=stdin)


def one_object(out: "subprocess.CompletedProcess[bytes]", status: int = 0) -> Dict[str, object]:
    """The one JSON object a run printed, alone on its line, after the status asked for."""
    assert (out.returncode, out.stderr) == (status, b""), out
    assert out.stdout.endswith(b"\n") and out.stdout.count(b"\n") == 1, out.stdout
    parsed = json.loads(out.stdout)
    assert isinstance(parsed, dict)
    return parsed


def test_every_command_prints_one_json_object_and_the_id_needs_no_cutting() -> None:
    with server_process("4K", "-q") as server:
        where = ["127.0.0.1", str(server.port)]
        script = (
            'id=$("$@" lease 1K 5s --json | "$0" -c '
            '\'import json,sys; print(json.load(sys.stdin)["lease_id"])\') && echo "$id"'
        )
        out = run(["bash", "-c", script, sys.executable, sys.executable, CLIENT, *where])
        assert out.returncode == 0 and uuid.UUID(out.stdout.strip().decode()).version == 4, out
        leased = one_object(json_run(*where, "lease", "100", "1m"))
        lease_id = leased["lease_id"]
        assert isinstance(lease_id, str) and uuid.UUID(lease_id).version == 4  # its text
        assert leased == {"lease_id": lease_id, "size": 100, "duration_ms": 60000}
        assert one_object(json_run(*where, "set", lease_id, "h\u00e9llo")) == {
            "lease_id": lease_id,
            "written": 7,
            "offset": 0,
            "truncate": False,
        }
        assert one_object(json_run(*where, "get", lease_id)) == {
            "lease_id": lease_id,
            "offset": 0,
            "length": 100,
            "text": "h\u00e9llo",
        }
        raw = one_object(
            json_run(*where, "get", lease_id, "--raw", "--offset", "1", "--length", "7")
        )
        assert base64.b64decode(str(raw["base64"])) == "\u00e9llo\0".encode() + b"\0"
        assert "text" not in raw and raw["length"] == 7
        renewed = one_object(json_run(*where, "renew", lease_id, "2m"))
        assert renewed == {"lease_id": lease_id, "duration_ms": 120000}
        stats = one_object(json_run(*where, "stats"))
        assert stats["server"] == "127.0.0.1:%d" % server.port
        assert stats["stats"]["live_leases"] == 2 and stats["stats"]["pool_bytes"] == 4096  # type: ignore[index]
        pool = one_object(json_run(*where, "map", "--cells", "2"))
        assert pool["pool_bytes"] == 4096 and len(pool["used"]) == 2  # type: ignore[arg-type]
        ttl = one_object(json_run(*where, "ttl", lease_id))
        assert ttl["lease_id"] == lease_id and ttl["granted_ms"] == 120000
        assert ttl["size"] == 100 and 0 < ttl["remaining_ms"] <= 120000  # type: ignore[operator]
        listed = json_run(*where, "leases")
        assert listed.returncode == 0, listed
        rows = [json.loads(line) for line in listed.stdout.splitlines()]  # one a line
        assert len(rows) == 2 and lease_id in {row["lease_id"] for row in rows}
        assert one_object(json_run(*where, "release", lease_id)) == {"lease_id": lease_id}


def test_a_failure_in_json_gives_the_error_the_status_and_the_reason() -> None:
    with server_process("4K", "-q") as server:
        where = ["127.0.0.1", str(server.port)]
        assert one_object(json_run(*where, "lease", "8K"), 1) == {
            "error": "Failed to create lease due to insufficient resources on the server.",
            "status": -2,
            "reason": "8 KiB is more than the server's whole pool (4 KiB)",
        }
        lease_id = str(one_object(json_run(*where, "lease", "16", "1m"))["lease_id"])
        gone = str(one_object(json_run(*where, "lease", "16", "1m"))["lease_id"])
        one_object(json_run(*where, "release", gone))
        assert one_object(json_run(*where, "get", gone), 1) == {
            "error": "Data not found for %s." % gone,
            "status": -1,
            "reason": "lease %s does not exist: it expired, was released, or never was" % gone,
        }
        one_object(json_run(*where, "set", lease_id, "--file", "-", stdin=b"\xff\xfe"))
        assert one_object(json_run(*where, "get", lease_id), 1) == {
            "error": "no text in lease %s" % lease_id,
            "status": None,
            "reason": "its bytes before the first NUL are not UTF-8: add --raw for them all "
            "in base64",
        }
        raw = one_object(json_run(*where, "get", lease_id, "--raw"))
        assert base64.b64decode(str(raw["base64"])) == b"\xff\xfe" + bytes(14)
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
            down = "127.0.0.1:%d" % closed.getsockname()[1]
            refused = one_object(json_run(down, "stats"), 1)
            assert refused == {
                "error": "cannot connect to %s: Connection refused" % down,
                "status": None,
                "reason": None,
            }
            out = json_run("%s,%s" % (where[0] + ":" + where[1], down), "stats")
    assert (out.returncode, out.stderr) == (1, b"")  # a cluster with a server down
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [line["server"] for line in lines] == [None, "127.0.0.1:%s" % where[1], down]
    assert lines[0]["stats"]["pool_bytes"] == 4096  # the sums over the servers up
    assert lines[2]["error"] == "down" and lines[2]["reason"].startswith("cannot connect to ")


def test_the_api_says_the_projects_one_version() -> None:
    import memlease
    import memlease_client

    assert memlease_client.__version__ == memlease.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", memlease.__version__)
