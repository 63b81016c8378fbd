"""The client's command line, run as a user runs it, against real server processes.

One test per numbered item of the newcomer's report (issue 14), and the features the
command line gained with it: each asserts the exact lines and the exit status.  Servers
listen on loopback ports from the OS; every one a test starts is stopped by it.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import pytest

import protocol
from memlease import picture
from memlease_client import MemLeaseClient
from tests.helpers import UUID_PATTERN, ServerProcess, server_process, server_thread

ROOT = Path(__file__).resolve().parent.parent
SERVER = str(ROOT / "memlease_server.py")
CLIENT = str(ROOT / "memlease_client.py")
TIMEOUT = 5.0
NOT_FOUND = b"reason: lease %d does not exist: it expired, was released, or never was (-1)\n"
USAGE_HINT = b" (see memlease_client.py --help)\n"

Arg = Union[str, bytes]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    """A 1 MiB pool shared by the tests that lease little from it."""
    with server_process("1M") as started:
        yield started


def environment(**extra: str) -> Dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "MEMLEASE_TOKEN"}
    env.update(extra)
    return env


def cli(
    *args: Arg,
    port: Optional[int] = None,
    host: Arg = "127.0.0.1",
    stdin: bytes = b"",
    env: Optional[Dict[str, str]] = None,
    stdout: Any = subprocess.PIPE,
) -> "subprocess.CompletedProcess[bytes]":
    argv: List[Arg] = [sys.executable, CLIENT, host]
    if port is not None:
        argv.append(str(port))
    return subprocess.run(
        argv + list(args),
        input=stdin,
        stdout=stdout,
        stderr=subprocess.PIPE,
        timeout=30,
        env=env or environment(),
    )


def lease(server: ServerProcess, size: int, duration_ms: int = 60000) -> "uuid.UUID | int":
    with MemLeaseClient("127.0.0.1", server.port, timeout=TIMEOUT) as client:
        return client.lease(size, duration_ms)


def read(server: ServerProcess, lease_id: object) -> bytes:
    with MemLeaseClient("127.0.0.1", server.port, timeout=TIMEOUT) as client:
        return bytes(client.get(lease_id))


def b(value: object) -> bytes:
    """A lease id as the command line prints it."""
    return str(value).encode()


def outcome(out: "subprocess.CompletedProcess[bytes]") -> Tuple[int, Optional[bytes], bytes]:
    return out.returncode, out.stdout, out.stderr


# 1. No traceback, whatever the bytes, the locale or the output device.


def test_1_bytes_locale_and_full_device_never_give_a_traceback(server: ServerProcess) -> None:
    lease_id = lease(server, 32)
    out = cli("set", str(lease_id), b"\xff\xfeab", port=server.port)  # not UTF-8
    assert outcome(out) == (0, b"Data set for lease %s\n" % b(lease_id), b"")
    assert read(server, lease_id) == b"\xff\xfeab\0" + bytes(27)  # the shell's bytes
    out = cli("get", str(lease_id), port=server.port, env=environment(PYTHONIOENCODING="ascii"))
    assert outcome(out) == (0, b"Data get for lease %s: \xff\xfeab\n" % b(lease_id), b"")

    text = "h\u00e9llo"
    assert cli("set", str(lease_id), text, port=server.port).returncode == 0
    ascii_c = environment(PYTHONIOENCODING="ascii", LANG="C", LC_ALL="C")
    out = cli("get", str(lease_id), port=server.port, env=ascii_c)
    assert outcome(out) == (0, b"Data get for lease %s: h\xc3\xa9llo\n" % b(lease_id), b"")
    out = cli("set", "5", "--file", "/nonexistent/f\u00efle", port=server.port, env=ascii_c)
    assert outcome(out) == (
        2,
        b"",
        b"memlease_client.py: usage error: set: cannot read /nonexistent/f\\xefle: "
        b"No such file or directory" + USAGE_HINT,
    )

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    for command in (["get", str(lease_id)], ["get", str(lease_id), "--raw"], ["stats"]):
        with open("/dev/full", "wb") as full:
            out = cli(*command, port=server.port, stdout=full)
        assert outcome(out) == (
            1,
            None,
            b"memlease_client.py: cannot write the output: No space left on device\n",
        )


def test_1_closed_streams_are_one_line_or_quiet(server: ServerProcess) -> None:
    def with_closed(redirection: str, *args: str) -> "subprocess.CompletedProcess[bytes]":
        return subprocess.run(
            ["sh", "-c", 'exec "$@" ' + redirection, "sh", sys.executable, CLIENT, "127.0.0.1"]
            + [str(server.port), *args],
            capture_output=True,
            timeout=30,
            env=environment(),
        )

    assert outcome(with_closed(">&-", "stats")) == (
        1,
        b"",
        b"memlease_client.py: cannot write the output: standard output is closed\n",
    )
    assert outcome(with_closed("<&-", "set", "5", "--file", "-")) == (
        2,
        b"",
        b"memlease_client.py: usage error: set: cannot read standard input: it is closed"
        + USAGE_HINT,
    )
    read_end, write_end = os.pipe()
    os.close(read_end)  # a reader that has gone: quiet, as `cmd | head` expects
    try:
        out = cli("stats", port=server.port, stdout=write_end)
    finally:
        os.close(write_end)
    assert (out.returncode, out.stderr) == (0, b"")  # the command's status: stats worked


# 2. The README's Python examples run: see test_readme.py, which runs every one of them.


# 3. Refusals keep the seed's words, with the reason on a second line.


def test_3_refusals_keep_the_seed_words_and_give_the_reason() -> None:
    with server_process("2048") as small:
        out = cli("lease", "4096", port=small.port)
        assert outcome(out) == (
            1,
            b"Failed to create lease due to insufficient resources on the server.\n"
            b"reason: 4 KiB is more than the server's whole pool (2 KiB) (-2)\n",
            b"",
        )
        lease_id = lease(small, 1024)
        out = cli("lease", "2048", port=small.port)
        assert outcome(out) == (
            1,
            b"Failed to create lease due to insufficient resources on the server.\n"
            b"reason: no free block can hold 2 KiB now; the largest free block is 1 KiB (-1)\n",
            b"",
        )
        out = cli("set", str(lease_id), "--file", "-", port=small.port, stdin=bytes(10 << 20))
        assert outcome(out) == (
            1,
            b"Error: unable set for lease %s (-2)\n"
            b"reason: 10 MiB do not fit in the lease's 1 KiB (-2)\n" % b(lease_id),
            b"",
        )


# 4. One condition, one voice: not found is said the same way by every command.


def test_4_not_found_is_said_one_way_and_tokens_are_told_apart(server: ServerProcess) -> None:
    lease_id = 999
    for command, first in (
        (["get", "999"], b"Data not found for 999.\n"),
        (["set", "999", "text"], b"Error: unable set for lease 999 (-1)\n"),
        (["renew", "999", "1000"], b"Error: unable renew for lease 999 (-1)\n"),
        (["release", "999"], b"Error: unable release for lease 999 (-1)\n"),
    ):
        out = cli(*command, port=server.port)
        assert outcome(out) == (1, first + NOT_FOUND % lease_id, b""), command

    with server_process("1M", env=environment(MEMLEASE_TOKEN="the-right-token-16+")) as guarded:
        out = cli("stats", port=guarded.port)
        assert outcome(out) == (
            1,
            b"",
            b"memlease_client.py: the server wants a token: set MEMLEASE_TOKEN "
            b"or give --token-file\n",
        )
        out = cli("stats", port=guarded.port, env=environment(MEMLEASE_TOKEN="wrong"))
        assert outcome(out) == (
            1,
            b"",
            b"memlease_client.py: the server refused the token in MEMLEASE_TOKEN\n",
        )
        out = cli("stats", port=guarded.port, env=environment(MEMLEASE_TOKEN="the-right-token-16+"))
        assert out.returncode == 0 and b"pool_bytes 1048576\n" in out.stdout


# 5. The trailing NUL the C++ client sends is named when it is what does not fit.


def test_5_the_trailing_nul_is_named_with_the_sizes(server: ServerProcess) -> None:
    lease_id = lease(server, 16)
    out = cli("set", str(lease_id), "exactly16bytes!!", port=server.port)
    assert outcome(out) == (
        1,
        b"Error: unable set for lease %s (-2)\n"
        b"reason: 17 bytes with the trailing NUL the C++ client sends; the lease holds 16: "
        b"use --file or --no-nul (-2)\n" % b(lease_id),
        b"",
    )
    out = cli("set", str(lease_id), "exactly16bytes!!", "--no-nul", port=server.port)
    assert outcome(out) == (0, b"Data set for lease %s\n" % b(lease_id), b"")
    assert read(server, lease_id) == b"exactly16bytes!!"
    out = cli("set", str(lease_id), "twenty-one bytes long", port=server.port)
    assert out.stdout.endswith(
        b"reason: 22 bytes (with the trailing NUL) do not fit in the lease's 16 bytes (-2)\n"
    )


# 6. A zero-length read is an empty answer, not a failure.


def test_6_a_zero_length_read_prints_nothing_and_succeeds(server: ServerProcess) -> None:
    lease_id = lease(server, 32)
    out = cli("get", str(lease_id), "--raw", "--offset", "32", "--length", "0", port=server.port)
    assert outcome(out) == (0, b"", b"")


# 7. Command-line rough edges.


def test_7_usage_errors_are_one_line_without_the_usage_block() -> None:
    for args, message in (
        ([], b"a host and a command are required"),
        (["127.0.0.1"], b"the following arguments are required: command"),
        (
            ["127.0.0.1", "lease", "abc"],
            b"lease: argument size: 'abc' is not a size: use bytes, or a number with K, M, G or T",
        ),
        (
            ["127.0.0.1", "lease", "2147483648"],
            b"lease: argument size: 2147483648 bytes is "
            b"over the largest lease, 2147483647 bytes (2 GiB - 1)",
        ),
        (
            ["127.0.0.1", "lease", "0"],
            b"lease: argument size: a lease holds at least 1 byte, not '0'",
        ),
        (["127.0.0.1", "set", "5"], b"set: give DATA or --file PATH (one of them)"),
        (
            ["127.0.0.1", "get", "5", "--length", "-3"],
            b"get: argument --length: '-3' must not be negative",
        ),
        (
            ["127.0.0.1", "stats", "--timeout", "nan"],
            b"stats: argument --timeout: 'nan' is not a positive number of seconds,"
            b" at most 31536000 (a year)",
        ),
    ):
        out = subprocess.run(
            [sys.executable, CLIENT, *args], capture_output=True, timeout=30, env=environment()
        )
        assert outcome(out) == (2, b"", b"memlease_client.py: usage error: " + message + USAGE_HINT)


def test_7_options_anywhere_units_and_the_program_name(
    server: ServerProcess, tmp_path: Path
) -> None:
    for args in (
        ["--timeout", "2", "stats"],
        ["stats", "--timeout", "2"],
    ):
        out = cli(*args, port=server.port)
        assert out.returncode == 0 and b"pool_bytes 1048576\n" in out.stdout, args
    out = subprocess.run(
        [sys.executable, CLIENT, "--timeout", "2", "127.0.0.1", str(server.port), "stats"],
        capture_output=True,
        timeout=30,
        env=environment(),
    )
    assert out.returncode == 0 and b"pool_bytes 1048576\n" in out.stdout
    out = cli("lease", "16K", "60000", port=server.port)
    assert out.returncode == 0
    leased = rb"You have leased 16384 bytes for 60000 MS with id %s\n" % UUID_PATTERN
    assert re.fullmatch(leased, out.stdout)

    installed = tmp_path / "memlease-client"  # as pip installs the command
    installed.write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom memlease.cli import main\n"
        "sys.exit(main())\n" % str(ROOT)
    )
    out = subprocess.run(
        [sys.executable, str(installed), "--help"], capture_output=True, timeout=30
    )
    assert out.returncode == 0
    assert out.stdout.startswith(b"usage: memlease-client host [port] command")
    assert b"memlease_client.py" not in out.stdout


# 8. set leaves the old tail unless asked to truncate, and says so.


def test_8_set_file_keeps_the_tail_and_truncate_zeroes_it(
    server: ServerProcess, tmp_path: Path
) -> None:
    lease_id = lease(server, 16)
    path = tmp_path / "value"
    path.write_bytes(b"hello world")
    assert cli("set", str(lease_id), "--file", str(path), port=server.port).returncode == 0
    path.write_bytes(b"hi")
    out = cli("set", str(lease_id), "--file", str(path), port=server.port)
    assert outcome(out) == (0, b"Data set for lease %s\n" % b(lease_id), b"")
    assert read(server, lease_id) == b"hillo world" + bytes(5)
    out = cli("set", str(lease_id), "--file", str(path), "--truncate", port=server.port)
    assert outcome(out) == (0, b"Data set for lease %s\n" % b(lease_id), b"")
    assert read(server, lease_id) == b"hi" + bytes(14)
    help_text = subprocess.run(
        [sys.executable, CLIENT, "--help"], capture_output=True, timeout=30
    ).stdout
    assert b"leaves the bytes after\nwhat it writes as they were: add --truncate" in help_text


# Features the command line gained: clusters, TLS, the map of the pool.


def test_a_host_list_is_a_cluster_whose_ids_name_their_server() -> None:
    with server_process("1M") as first, server_process("1M") as second:
        hosts = "127.0.0.1:%d,127.0.0.1:%d" % (first.port, second.port)
        out = cli("lease", "1024", "5000", host=hosts)
        match = re.fullmatch(
            rb"You have leased 1024 bytes for 5000 MS with id (127\.0\.0\.1:(\d+)/(%s))\n"
            % UUID_PATTERN,
            out.stdout,
        )
        assert out.returncode == 0 and match, out
        handle = match.group(1).decode()
        assert int(match.group(2)) in (first.port, second.port)
        out = cli("set", handle, "this is some text", host=hosts)
        assert outcome(out) == (0, b"Data set for lease %s\n" % handle.encode(), b"")
        out = cli("get", handle, host=hosts)
        assert outcome(out) == (
            0,
            b"Data get for lease %s: this is some text\n" % handle.encode(),
            b"",
        )
        holder = first if int(match.group(2)) == first.port else second
        assert read(holder, match.group(3).decode()).startswith(b"this is some text\0")
        out = cli("get", "123", host=hosts)
        assert outcome(out) == (
            2,
            b"",
            b"memlease_client.py: usage error: lease handle '123' is not host:port/ID, "
            b"e.g. a:412/0b8e6c1a-5d8f-4e0c-9a47-2f1d3c5b7e90 or a:412/123" + USAGE_HINT,
        )


def test_a_handle_is_served_by_any_spelling_of_its_server(server: ServerProcess) -> None:
    lease_id = lease(server, 64)
    handle = "127.0.0.1:%d/%s" % (server.port, lease_id)
    for host in ("127.0.0.1:%d" % server.port, "localhost:%d" % server.port):
        out = cli("renew", handle, "60000", host=host)  # one server, named in the handle
        assert outcome(out) == (0, b"Lease %s renewed for 60000 MS\n" % handle.encode(), b"")
    with server_process("1M", "-q") as other:
        hosts = "localhost:%d,127.0.0.1:%d" % (server.port, other.port)
        out = cli("renew", handle, "60000", host=hosts)  # the list spells it localhost
        assert outcome(out) == (0, b"Lease %s renewed for 60000 MS\n" % handle.encode(), b"")
        out = cli("renew", "127.0.0.1:%d/%s" % (other.port, lease_id), "1", host="127.0.0.1")
        assert out.returncode == 2
        assert b"names the server 127.0.0.1:%d, not 127.0.0.1:412" % other.port in out.stderr


def test_a_host_may_name_its_port_and_the_port_word_is_every_servers_default(
    server: ServerProcess,
) -> None:
    lease_id = lease(server, 64)
    named = cli("renew", str(lease_id), "60000", host="127.0.0.1:%d" % server.port)
    assert outcome(named) == (0, b"Lease %s renewed for 60000 MS\n" % b(lease_id), b"")
    beaten = cli("stats", host="127.0.0.1:%d" % server.port, port=1)  # the host's port wins
    assert beaten.returncode == 0 and b"live_leases" in beaten.stdout, beaten
    for hosts in ("127.0.0.1,localhost", "127.0.0.1:%d,localhost" % server.port):
        listed = cli("stats", host=hosts, port=server.port)  # a cluster of two names for it
        assert listed.returncode == 0 and b"live_leases" in listed.stdout, listed


def test_an_ipv6_host_is_written_in_brackets_with_its_port() -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with server_thread(host="::1") as ipv6:
        port = ipv6.server_address[1]
        out = cli("lease", "64", "5000", host="[::1]:%d" % port)
        assert out.returncode == 0 and out.stdout.startswith(b"You have leased 64 bytes"), out
        out = cli("lease", "64", "5000", host="::1", port=port)
        assert out.returncode == 0 and out.stdout.startswith(b"You have leased 64 bytes"), out


def test_tls_files_that_cannot_be_used_are_a_usage_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    for options in (["--tls-ca", missing], ["--tls-cert", missing]):
        out = cli("stats", *options, port=9)
        assert out.returncode == 2 and out.stdout == b"", options
        assert out.stderr.startswith(b"memlease_client.py: usage error: cannot use "), options
        assert missing.encode() in out.stderr and out.stderr.count(b"\n") == 1, options
    out = cli("stats", "--tls-key", missing, port=9)
    assert outcome(out) == (
        2,
        b"",
        b"memlease_client.py: usage error: --tls-key needs --tls-cert" + USAGE_HINT,
    )


def test_tls_options_reach_a_tls_server(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    server_help = subprocess.run(
        [sys.executable, SERVER, "--help"], capture_output=True, timeout=30
    ).stdout
    if b"--tls-cert" not in server_help:
        pytest.skip("the server has no TLS yet (issue 11)")
    authority = trustme.CA()
    ca_file, cert_file = tmp_path / "ca.pem", tmp_path / "server.pem"
    authority.cert_pem.write_to_path(str(ca_file))
    authority.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    tls = ("--tls-cert", str(cert_file), "--tls-key", str(cert_file))
    with server_process("1M", *tls) as secure:
        out = cli("stats", "--tls-ca", str(ca_file), port=secure.port)
        assert out.returncode == 0 and b"pool_bytes 1048576\n" in out.stdout
        out = cli("stats", "--tls", port=secure.port)  # the system's authorities: refused
        assert out.returncode == 1 and out.stdout == b""
        assert out.stderr.startswith(b"memlease_client.py: TLS handshake with 127.0.0.1:")
        assert out.stderr.count(b"\n") == 1
    client_file = tmp_path / "client.pem"
    authority.issue_cert("client").private_key_and_cert_chain_pem.write_to_path(str(client_file))
    with server_process("1M", *tls, "--tls-ca", str(ca_file)) as mutual:
        trusting = ("--tls-ca", str(ca_file))
        out = cli("stats", *trusting, "--tls-cert", str(client_file), port=mutual.port)
        assert out.returncode == 0 and b"pool_bytes 1048576\n" in out.stdout
        out = cli("stats", *trusting, port=mutual.port)  # no client certificate: refused
        assert out.returncode == 1 and out.stdout == b"" and out.stderr.count(b"\n") == 1


def test_the_picture_shows_each_cell_by_how_much_of_it_is_used() -> None:
    cell = 1024
    used = [cell] * 64 + [cell // 2] * 32 + [cell // 10] * 16 + [cell * 9 // 10] * 16
    used += [0] * 128
    free = 256 * cell - sum(used)
    drawn = picture.render(
        protocol.PoolMapReply(256 * cell, free, 64 * cell, 375, tuple(used), ((65536, 2),))
    )
    assert drawn.splitlines() == [
        "pool of 256 KiB in 256 cells of 1 KiB, 64 a line:",
        "      0 " + "█" * 64,
        " 64 KiB " + "▒" * 32 + "░" * 16 + "▓" * 16,
        "128 KiB " + "·" * 64,
        "192 KiB " + "·" * 64,
        "█ used  ▓ over 2/3 used  ▒ 1/3 to 2/3  ░ under 1/3  · free",
        "used 98288 bytes of 256 KiB (37%), free 163856 bytes",
        "fragmentation 37.5%: the largest free block is 64 KiB",
        "free blocks: 2 of 64 KiB",
    ]
    ascii_only = picture.render(
        protocol.PoolMapReply(6, 3, 2, 0, (0, 1, 2), ((2, 1),)), picture.ASCII
    )
    assert ascii_only.splitlines()[1:3] == [
        "0 .+#",
        "# used  * over 2/3 used  + 1/3 to 2/3  - under 1/3  . free",
    ]


def test_map_draws_a_real_pool_with_a_known_pattern() -> None:
    with server_process("64K") as small, MemLeaseClient("127.0.0.1", small.port) as client:
        try:
            client.pool_map(64)
        except Exception as exc:  # noqa: BLE001
            pytest.skip("the server has no pool map yet: %s" % exc)
        for _ in range(2):
            client.lease(16384, 60000)  # half the pool, in its first two quarters
        out = cli("map", "--cells", "64", port=small.port)
        assert out.returncode == 0, out
        lines = out.stdout.decode().splitlines()
        assert lines[1] == "0 " + "█" * 32 + "·" * 32
        assert lines[-3:] == [
            "used 32 KiB of 64 KiB (50%), free 32 KiB",
            "fragmentation 0%: the largest free block is 32 KiB",
            "free blocks: 1 of 32 KiB",
        ]
        out = cli("map", "--json", "--cells", "4", port=small.port)
        assert out.returncode == 0
        assert json.loads(out.stdout) == {
            "pool_bytes": 65536,
            "free_bytes": 32768,
            "largest_free": 32768,
            "fragmentation": 0,
            "used": [16384, 16384, 0, 0],
            "free_blocks": [[32768, 1]],
        }


# Every other way a run can end: no answer in time, and Ctrl-C.


def test_no_answer_and_ctrl_c_end_in_one_line_or_quietly() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # connects, never answers
        silent.settimeout(TIMEOUT)
        port = silent.getsockname()[1]
        out = cli("stats", "--timeout", "1", port=port)
        assert outcome(out) == (
            1,
            b"",
            b"memlease_client.py: 127.0.0.1:%d did not answer within 1.0s\n" % port,
        )
        silent.accept()[0].close()
        waiting = subprocess.Popen(
            [sys.executable, CLIENT, "127.0.0.1", str(port), "stats", "--timeout", "60"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environment(),
        )
        try:
            with silent.accept()[0]:  # the client is waiting for its reply now
                waiting.send_signal(signal.SIGINT)
                stdout, stderr = waiting.communicate(timeout=30)
        finally:
            if waiting.poll() is None:
                waiting.kill()
                waiting.wait(5)
    assert (waiting.returncode, stdout, stderr) == (130, b"", b"")


# Values of 64 KiB and more, options anywhere, and the reasons that name the right limit.


def test_a_large_lease_is_printed_whole_with_and_without_raw(server: ServerProcess) -> None:
    value = bytes(range(1, 256)) * 400 + b"\0tail"  # 102005 bytes: streamed to the client
    lease_id = lease(server, len(value))
    with MemLeaseClient("127.0.0.1", server.port, timeout=TIMEOUT) as client:
        client.set(lease_id, value)
        assert type(client.get(lease_id)) is bytes  # not the buffer it was received into
    out = cli("get", str(lease_id), "--raw", port=server.port)
    assert outcome(out) == (0, value, b"")
    out = cli("get", str(lease_id), port=server.port)
    text = value.split(b"\0", 1)[0]
    assert outcome(out) == (0, b"Data get for lease %s: %s\n" % (b(lease_id), text), b"")


def test_set_takes_its_options_before_and_after_the_data(server: ServerProcess) -> None:
    lease_id = lease(server, 8)
    ident = str(lease_id)
    for args, after in (
        (["set", ident, "abcdefgh", "--no-nul"], b"abcdefgh"),
        (["set", ident, "--no-nul", "DATA"], b"DATAefgh"),
        (["set", ident, "--truncate", "hi"], b"hi\0" + bytes(5)),
        (["set", ident, "--offset", "1", "yo"], b"hyo\0" + bytes(4)),
        (["--no-nul", "set", ident, "DATA"], b"DATA\0" + bytes(3)),
        (["set", "--offset", "4", ident, "--no-nul", "--", "-x"], b"DATA-x" + bytes(2)),
    ):
        out = cli(*args, port=server.port)
        assert outcome(out) == (0, b"Data set for lease %s\n" % b(lease_id), b""), args
        assert read(server, lease_id) == after, args
    out = subprocess.run(
        [sys.executable, CLIENT, "--no-nul", "127.0.0.1", str(server.port), "set", ident, "Z"],
        capture_output=True,
        timeout=30,
        env=environment(),
    )
    assert outcome(out) == (0, b"Data set for lease %s\n" % b(lease_id), b"")
    assert read(server, lease_id) == b"ZATA-x" + bytes(2)


def test_a_value_over_the_frame_limit_is_not_blamed_on_the_lease(tmp_path: Path) -> None:
    path = tmp_path / "value"
    path.write_bytes(bytes(100_000))
    with server_process("1M", "--max-frame", "64K") as limited:
        roomy, small = lease(limited, 128 << 10), lease(limited, 1000)
        out = cli("set", str(roomy), "--file", str(path), port=limited.port)
        assert outcome(out) == (
            1,
            b"Error: unable set for lease %s (-2)\n"
            b"reason: the server refuses a value of 100000 bytes: "
            b"over its --max-frame limit (-2)\n" % b(roomy),
            b"",
        )
        out = cli("set", str(small), "--file", str(path), port=limited.port)
        assert out.stdout.endswith(
            b"reason: 100000 bytes do not fit in the lease's 1000 bytes (-2)\n"
        )


def test_a_plain_client_at_a_tls_port_is_told_to_try_tls(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    cert_file = tmp_path / "server.pem"
    trustme.CA().issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(cert_file)
    )
    with server_process("1M", "--tls-cert", str(cert_file), "--tls-key", str(cert_file)) as tls:
        out = cli("stats", port=tls.port)
    assert outcome(out) == (
        1,
        b"",
        b"memlease_client.py: connection to 127.0.0.1:%d lost before any reply: "
        b"Connection reset by peer (is it a MemoryLease port? a TLS one needs --tls)\n" % tls.port,
    )


def test_hostile_arguments_end_in_one_line(server: ServerProcess, tmp_path: Path) -> None:
    out = cli("stats", "--timeout", "1e308", port=server.port)  # past what sockets can wait
    assert out.returncode == 2 and out.stderr.count(b"\n") == 1, out.stderr
    assert b"at most 31536000 (a year)" in out.stderr
    # A token of bytes that are not UTF-8 goes out as those bytes.
    out = cli("lease", "32", port=server.port, env=environment(MEMLEASE_TOKEN="\udcff"))
    assert out.returncode == 0 and b"You have leased 32 bytes" in out.stdout, out.stderr
    # A file larger than any lease is refused before it fills the memory.
    big = tmp_path / "big"
    with open(big, "wb") as file:
        file.truncate(protocol.INT32_MAX + 1)  # sparse: it costs no disk
    out = cli("set", str(lease(server, 32)), "--file", str(big), port=server.port)
    assert outcome(out) == (
        2,
        b"",
        b"memlease_client.py: usage error: set: %s holds more than the largest lease, "
        b"2147483647 bytes" % str(big).encode() + USAGE_HINT,
    )
