"""MemoryLease tests: real servers on loopback ports from the OS, real sockets, real clients.

A server is either a child process (``memlease_server.py 0 ...``, as a user runs it)
or a MemLeaseServer on a thread of this process when a test must look inside the
store.  Every loop is bounded, every socket has a timeout, every server is stopped.
"""

import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator, List

import pytest

import protocol
from buddy import Block, BuddyAllocator
from memlease_client import (
    InvalidArgument,
    LeaseNotFound,
    MemLeaseClient,
    MemLeaseConnectionError,
    MemLeaseProtocolError,
    OutOfMemory,
    OutOfRange,
    ServerBusy,
    TooLarge,
    Unauthorized,
)
from tests.helpers import (
    CLIENT,
    SERVER,
    TIMEOUT,
    UUID_PATTERN,
    ServerProcess,
    client_for,
    closed_by_peer,
    connect,
    exchange,
    free_port,
    random_bytes,
    read_replies,
    run_cli,
    server_process,
    server_thread,
    wait_for,
)


def b(value: object) -> bytes:
    return str(value).encode()

# Protocol: golden bytes from original-wire-format.md, and the incremental decoder.

GOLDEN_LEASE = bytes.fromhex("01000000 0800000000000000 00040000 88130000")
GOLDEN_LEASED = bytes.fromhex("02000000 0400000000000000 7b000000")
GOLDEN_SET = bytes.fromhex(
    "03000000 1e00000000000000 7b000000 12000000000000007468697320697320736f6d65207465787400"
)
GOLDEN_DATA_SET = bytes.fromhex("05000000 0400000000000000 00000000")
GOLDEN_GET = bytes.fromhex("04000000 0400000000000000 7b000000")
GOLDEN_GET_REPLY = (
    bytes.fromhex("04000000 2c00000000000000 7b000000 2000000000000000")
    + b"this is some text\0"
    + bytes(14)
)


def test_encoders_match_the_original_bytes():
    assert protocol.Lease(1024, 5000).encode() == GOLDEN_LEASE
    assert protocol.Leased(123).encode() == GOLDEN_LEASED
    assert protocol.SetData(123, b"this is some text\0").encode() == GOLDEN_SET
    assert protocol.DataSet(0).encode() == GOLDEN_DATA_SET
    assert protocol.AccessData(123).encode() == GOLDEN_GET
    assert protocol.Data(123, b"this is some text\0" + bytes(14)).encode() == GOLDEN_GET_REPLY


def test_decoders_read_the_original_bytes():
    requests = protocol.request_decoder(1 << 20)
    requests.feed(GOLDEN_LEASE + GOLDEN_SET + GOLDEN_GET)
    assert requests.next_message() == protocol.Lease(1024, 5000)
    assert requests.next_message() == protocol.SetData(123, b"this is some text\0")
    assert requests.next_message() == protocol.AccessData(123)
    assert requests.next_message() is None
    replies = protocol.reply_decoder()
    replies.feed(GOLDEN_LEASED + GOLDEN_DATA_SET + GOLDEN_GET_REPLY)
    assert replies.next_message() == protocol.Leased(123)
    assert replies.next_message() == protocol.DataSet(0)
    assert replies.next_message() == protocol.Data(123, b"this is some text\0" + bytes(14))
    assert replies.next_message() is None


SOME_UUID = bytes.fromhex("0b8e6c1a5d8f4e0c9a472f1d3c5b7e90")
ALL_REQUESTS = [
    protocol.Lease(1024, 5000),
    protocol.SetData(7, b"\x00\xffdata"),
    protocol.AccessData(7),
    protocol.Release(protocol.short_form(7)),
    protocol.Renew(SOME_UUID, 60000),
    protocol.Write(SOME_UUID, 5, b"xyz"),
    protocol.Read(protocol.short_form(7), 2, -1),
    protocol.Replace(SOME_UUID, b"abc"),
    protocol.Grant(1024, 5000),
    protocol.Stats(),
    protocol.Auth(b"s3cret"),
    protocol.TimeToLive(SOME_UUID),
    protocol.ListLeases(0, 1000),
    protocol.RenewMany(5000, (SOME_UUID, protocol.short_form(7))),
    protocol.RenewMany(5000, ()),
]
ALL_REPLIES = [
    protocol.Leased(-1),
    protocol.Granted(SOME_UUID),
    protocol.Data(7, b"abc\x00"),
    protocol.Data(7, b""),
    protocol.DataSet(protocol.OUT_OF_RANGE),
    protocol.StatsReply({"pool_bytes": 2048, "free_bytes": 0}),
    protocol.Error(protocol.UNKNOWN_TYPE, 99),
    protocol.TimeToLiveReply(4200, 5000, 1024),
    protocol.LeaseList(1 << 61, (protocol.LeaseRow(SOME_UUID, 1024, 4200, 7),) * 3),
    protocol.LeaseList(0, ()),
    protocol.RenewManyReply((SOME_UUID,)),
]


@pytest.mark.parametrize(
    "decoder, messages",
    [
        (lambda: protocol.request_decoder(1 << 20), ALL_REQUESTS),
        (protocol.reply_decoder, ALL_REPLIES),
    ],
)
def test_decoder_accepts_any_split(decoder, messages):
    stream = b"".join(m.encode() for m in messages)
    rng = random.Random(412)
    splits = [[1] * len(stream)] + [
        [rng.randint(1, 40) for _ in range(len(stream))] for _ in range(20)
    ]
    for sizes in splits:
        d = decoder()
        out = []
        pos = 0
        for size in sizes:
            if pos >= len(stream):
                break
            d.feed(stream[pos : pos + size])
            pos += size
            for _ in range(len(messages) + 1):
                message = d.next_message()
                if message is None:
                    break
                out.append(message)
        assert out == messages
        assert not d.in_frame


def test_decoder_refuses_a_huge_length_from_the_header_alone():
    d = protocol.request_decoder(1000)
    d.feed(struct.pack("<iq", protocol.SET_DATA, 2**60))
    with pytest.raises(protocol.BadFrame) as info:
        d.next_message()
    assert info.value.status == protocol.FRAME_TOO_LARGE
    with pytest.raises(protocol.BadFrame):  # the stream stays refused
        d.next_message()


def test_decoder_refuses_a_negative_length():
    d = protocol.request_decoder(1000)
    d.feed(struct.pack("<iq", protocol.LEASE, -8))
    with pytest.raises(protocol.BadFrame):
        d.next_message()


@pytest.mark.parametrize(
    "frame, status",
    [
        (struct.pack("<iq", 99, 0), protocol.UNKNOWN_TYPE),
        (struct.pack("<iq", -3, 4) + bytes(4), protocol.UNKNOWN_TYPE),
        (struct.pack("<iqi", protocol.LEASE, 4, 1024), protocol.MALFORMED),
        (struct.pack("<iqiii", protocol.LEASE, 12, 1024, 5, 6), protocol.MALFORMED),
        (struct.pack("<iqiq", protocol.SET_DATA, 12 + 3, 1, 5) + b"abc", protocol.MALFORMED),
        (struct.pack("<iqiq", protocol.SET_DATA, 12 + 3, 1, -1) + b"abc", protocol.MALFORMED),
        (struct.pack("<iqi", protocol.SET_DATA, 4, 1), protocol.MALFORMED),
        # Lists whose count disagrees with their length, or is over 1000 ids.
        (struct.pack("<iqii", protocol.RENEW_MANY, 8, 5000, 1), protocol.MALFORMED),
        (struct.pack("<iqii", protocol.RENEW_MANY, 24, 5000, 0) + SOME_UUID, protocol.MALFORMED),
        (struct.pack("<iqii", protocol.RENEW_MANY, 8, 5000, -1), protocol.MALFORMED),
        (struct.pack("<iqii", protocol.RENEW_MANY, 8, 5000, 1001), protocol.MALFORMED),
        (struct.pack("<iqi", protocol.RENEW_MANY, 4, 5000), protocol.MALFORMED),
        (struct.pack("<iqi12x", protocol.TIME_TO_LIVE, 16, 5), protocol.MALFORMED),  # a 1.x id
    ],
)
def test_decoder_rejects_bad_messages_and_stays_in_step(frame, status):
    d = protocol.request_decoder(1000)
    d.feed(frame + protocol.AccessData(5).encode())
    with pytest.raises(protocol.BadMessage) as info:
        d.next_message()
    assert info.value.status == status
    assert d.next_message() == protocol.AccessData(5)


# The buddy allocator.


def test_a_pool_that_is_not_a_power_of_two_is_fully_usable():
    allocator = BuddyAllocator(3000)
    blocks = [allocator.alloc(size) for size in (2048, 512, 256, 128, 32)]
    assert all(block is not None for block in blocks)
    assert allocator.alloc(32) is None
    assert allocator.free_bytes == 0


def test_requests_round_up_to_a_power_of_two_of_at_least_32():
    allocator = BuddyAllocator(4096)
    sizes = {allocator.alloc(n).size for n in (1, 31, 32, 33, 1000)}
    assert sizes == {32, 64, 1024}
    assert allocator.free_bytes == 4096 - 32 * 3 - 64 - 1024


def test_freeing_twice_is_refused():
    allocator = BuddyAllocator(1024)
    block = allocator.alloc(100)
    allocator.free(block)
    with pytest.raises(ValueError):
        allocator.free(block)


def _tree_blocks(root: Block) -> Iterator[Block]:
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        assert (node.left is None) == (node.right is None)
        if node.left is not None and node.right is not None:
            assert node.left.parent is node and node.right.parent is node
            assert node.right.offset == node.left.offset ^ node.left.size
            stack += [node.left, node.right]


@pytest.mark.parametrize("pool", [1 << 16, 100_000, 3000])
def test_random_alloc_and_free_keep_the_tree_sound(pool):
    rng = random.Random(pool)
    allocator = BuddyAllocator(pool)
    live: List[Block] = []
    for step in range(5000):
        if live and (rng.random() < 0.45 or allocator.free_bytes < 64):
            allocator.free(live.pop(rng.randrange(len(live))))
        else:
            size = rng.choice([1, 32, 33, 100, 500, 4096, rng.randint(1, pool // 4)])
            block = allocator.alloc(size)
            if block is None:
                assert allocator.largest_free < size or allocator.largest_free == 0
                continue
            assert block.size >= size and block.offset % block.size == 0
            assert block.offset >= 0 and block.offset + block.size <= allocator.capacity
            live.append(block)
        if step % 500 == 0:
            spans = sorted((b.offset, b.offset + b.size) for b in live)
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "blocks overlap"
            assert allocator.free_bytes == allocator.capacity - sum(b.size for b in live)
    for block in live:
        allocator.free(block)
    assert allocator.free_bytes == allocator.capacity
    assert allocator.largest_free == allocator.roots[0].size
    for root in allocator.roots:
        assert root.left is None and root.right is None and not root.allocated
    if pool & (pool - 1) == 0:
        assert allocator.capacity == pool


def test_the_tree_has_parent_links_while_split():
    allocator = BuddyAllocator(1 << 12)
    blocks = [allocator.alloc(32) for _ in range(5)]
    nodes = list(_tree_blocks(allocator.roots[0]))
    assert all(block in nodes for block in blocks)
    assert blocks[0].parent is not None and blocks[0].parent.parent is not None


def test_a_huge_pool_costs_no_memory_and_allocates():
    allocator = BuddyAllocator(16 << 30)
    block = allocator.alloc(100)
    assert block is not None and block.size == 128
    assert allocator.largest_free == 8 << 30
    allocator.free(block)
    assert allocator.free_bytes == 16 << 30


# The seed's session through the command line, against a server process.


def test_the_seed_session_through_the_cli():
    with server_process("2048") as server:
        out = run_cli("lease", "1024", "5000", port=server.port)
        assert out.returncode == 0, out
        match = re.fullmatch(
            rb"You have leased 1024 bytes for 5000 MS with id (%s)\n" % UUID_PATTERN, out.stdout
        )
        assert match, out.stdout
        lease_id = match.group(1).decode()
        out = run_cli("set", lease_id, "this is some text", port=server.port)
        assert (out.returncode, out.stdout) == (0, b"Data set for lease %s\n" % lease_id.encode())
        out = run_cli("get", lease_id, port=server.port)
        assert out.returncode == 0
        assert out.stdout == b"Data get for lease %s: this is some text\n" % lease_id.encode()
        log = server.output()
        logged = lease_id[:8] + r"-\.\.\."  # the log shows a UUID by its first 8 digits
        for command, result in (
            ("grant 1024 bytes for 5000 ms", "id " + logged),
            (r"write %s \(18 bytes\)" % logged, "ok"),
            (r"read %s \(to the end\)" % logged, "1024 bytes"),
        ):
            assert re.search(r"INFO 127\.0\.0\.1:\d+ %s -> %s\n" % (command, result), log), log


def test_log_lines_name_the_peer():
    from memlease.listener import Peer

    assert str(Peer(("127.0.0.1", 4120))) == "127.0.0.1:4120"
    assert str(Peer(("::1", 4120, 0, 0))) == "[::1]:4120"


def test_cli_sends_the_text_with_its_nul_like_the_original():
    with server_process() as server, client_for(server) as client:
        lease_id = client.lease(32)
        assert run_cli("set", str(lease_id), "this is some text", port=server.port).returncode == 0
        assert client.get(lease_id) == b"this is some text\0" + bytes(14)


def test_cli_port_defaults_to_412():
    # A name that never resolves (RFC 2606): the error names the port the client chose,
    # whatever listens on 127.0.0.1:412 (a quick start's server, say).
    out = subprocess.run(
        [sys.executable, CLIENT, "nosuchhost.invalid", "stats"], capture_output=True, timeout=60
    )
    assert out.returncode == 1
    assert b"nosuchhost.invalid:412" in out.stderr and b"Traceback" not in out.stderr


def test_cli_refusals_and_not_found_exit_1():
    with server_process("2048") as server:
        out = run_cli("lease", "4096", port=server.port)
        assert out.returncode == 1 and out.stdout.startswith(b"Failed to create lease")
        out = run_cli("lease", "2048", "60000", port=server.port)
        assert out.returncode == 0
        out = run_cli("lease", "32", port=server.port)
        assert out.returncode == 1
        assert out.stdout.startswith(
            b"Failed to create lease due to insufficient resources on the server.\nreason: "
        )
        out = run_cli("get", "123", port=server.port)
        assert out.returncode == 1 and out.stdout.startswith(b"Data not found for 123.\nreason: ")
        out = run_cli("set", "123", "text", port=server.port)
        assert out.returncode == 1
        assert out.stdout.startswith(b"Error: unable set for lease 123 (-1)\nreason: lease 123 ")


def test_cli_too_long_set_reports_the_status():
    with server_process() as server, client_for(server) as client:
        lease_id = client.lease(8)
        out = run_cli("set", str(lease_id), "much more than eight bytes", port=server.port)
        assert out.returncode == 1
        assert out.stdout.startswith(b"Error: unable set for lease %s (-2)\nreason: " % b(lease_id))


@pytest.mark.parametrize(
    "args",
    [
        ["frobnicate"],
        ["lease", "abc"],
        ["lease"],
        ["get", "x1"],
        ["set", "5"],
        ["lease", "99999999999"],
        ["stats", "--timeout", "-1"],
        ["stats", "--timeout", "nan"],
        ["set", "5", "text", "--file", "/nonexistent"],
        ["get", "5", "--length", "-3"],
        [],
    ],
)
def test_cli_usage_errors_exit_2(args):
    out = run_cli(*args, port=free_port())
    assert out.returncode == 2, out
    assert b"usage" in out.stderr and b"Traceback" not in out.stderr


def test_cli_cannot_connect_exits_1():
    out = run_cli("get", "5", port=free_port())
    assert out.returncode == 1
    assert out.stderr.startswith(b"memlease_client.py: cannot connect")


def test_cli_help_documents_commands_with_examples():
    out = subprocess.run([sys.executable, CLIENT, "--help"], capture_output=True, timeout=30)
    assert out.returncode == 0
    for word in (
        b"lease",
        b"set",
        b"get",
        b"renew",
        b"release",
        b"stats",
        b"--raw",
        b"--file",
        b"examples",
    ):
        assert word in out.stdout


def test_cli_binary_file_raw_get_ranges_renew_release_stats(tmp_path):
    blob = bytes(range(256)) * 2
    path = tmp_path / "blob.bin"
    path.write_bytes(blob)
    with server_process() as server:
        lease_id = (
            re.search(
                rb"id (%s)" % UUID_PATTERN,
                run_cli("lease", "512", "60000", port=server.port).stdout,
            )
            .group(1)
            .decode()
        )
        assert run_cli("set", lease_id, "--file", str(path), port=server.port).returncode == 0
        out = run_cli("get", lease_id, "--raw", port=server.port)
        assert (out.returncode, out.stdout) == (0, blob)
        out = run_cli(
            "set", lease_id, "--file", "-", "--offset", "10", port=server.port, stdin=b"\xff\xfe"
        )
        assert out.returncode == 0
        out = run_cli("get", lease_id, "--raw", "--offset", "9", "--length", "4", port=server.port)
        assert out.stdout == bytes([9, 0xFF, 0xFE, 12])
        out = run_cli(
            "get", lease_id, "--raw", "--offset", "500", "--length", "40", port=server.port
        )
        assert out.returncode == 1 and b"outside the lease" in out.stdout
        assert run_cli("renew", lease_id, "90000", port=server.port).returncode == 0
        out = run_cli("stats", port=server.port)
        assert out.returncode == 0 and b"live_leases 1\n" in out.stdout
        assert run_cli("release", lease_id, port=server.port).returncode == 0
        assert run_cli("release", lease_id, port=server.port).returncode == 1


def test_cli_output_into_a_closed_pipe_is_quiet():
    with server_process() as server:
        # A reader that left changes nothing: stats succeeds (0), get of no lease fails (1).
        for command, status in ((["stats"], 0), (["get", "5"], 1)):
            read_end, write_end = os.pipe()
            os.close(read_end)  # nobody will read: every write fails with EPIPE
            try:
                out = subprocess.run(
                    [sys.executable, CLIENT, "127.0.0.1", str(server.port), *command],
                    stdout=write_end,
                    stderr=subprocess.PIPE,
                    timeout=30,
                )
            finally:
                os.close(write_end)
            assert out.returncode == status and out.stderr == b"", out.stderr


# The server's command line.


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["412"],
        ["notaport", "2048"],
        ["412", "lots"],
        ["412", "16"],
        ["70000", "1M"],
        ["412", "1M", "--idle-timeout", "nan"],
        ["412", "1M", "--frame-timeout", "inf"],
        ["412", "1M", "--max-connections", "0"],
        ["412", "1M", "--token-file", "/nonexistent"],
    ],
)
def test_server_bad_arguments_exit_2(args):
    out = subprocess.run([sys.executable, SERVER, *args], capture_output=True, timeout=30)
    assert out.returncode == 2
    assert b"usage" in out.stderr and b"Traceback" not in out.stderr


def test_server_port_in_use_exits_1_with_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, SERVER, str(port), "1M", "--bind", "127.0.0.1"],
            capture_output=True,
            timeout=30,
        )
    assert out.returncode == 1
    assert out.stderr.count(b"\n") == 1 and b"cannot listen" in out.stderr


@pytest.mark.parametrize(
    "size, expected", [("2048", 2048), ("64K", 65536), ("16m", 16 << 20), ("2G", 2 << 30)]
)
def test_server_sizes_take_units(size, expected):
    from memlease_server import parse_size

    assert parse_size(size) == expected


def test_sigterm_and_sigint_stop_the_server_with_exit_0():
    for signum in (signal.SIGTERM, signal.SIGINT):
        server = ServerProcess("0", "1M", "--bind", "127.0.0.1").wait_listening()
        try:
            idle = connect(server)
            with client_for(server) as client:
                client.lease(64)
            server.proc.send_signal(signum)
            assert server.proc.wait(2) == 0
            assert closed_by_peer(idle)
            idle.close()
            assert "Traceback" not in server.output()
        finally:
            server.stop()


def test_a_second_stop_signal_while_stopping_still_exits_0_without_a_traceback():
    for gap in (0.0, 0.002, 0.005, 0.01, 0.05):
        server = ServerProcess("0", "1M", "--bind", "127.0.0.1").wait_listening()
        try:
            server.proc.send_signal(signal.SIGINT)
            time.sleep(gap)
            if server.proc.poll() is None:
                server.proc.send_signal(signal.SIGINT)
            assert server.proc.wait(5) == 0, (gap, server.output())
            output = server.output()
            assert "Traceback" not in output and "Exception ignored" not in output
        finally:
            server.stop()


def test_warns_without_a_token_on_a_public_address():
    with server_process() as quiet:
        assert "no token" not in quiet.output()
    server = ServerProcess("0", "1M", "--bind", "0.0.0.0").wait_listening()
    try:
        # Logged just after the "listening" lines the start is recognised by: wait for it.
        assert wait_for(lambda: "WARNING no token is set" in server.output(), 10), server.output()
    finally:
        server.stop()


# Leases: the store's semantics through the Python API.


def test_lease_ids_are_positive_and_unique():
    with server_thread(1 << 16) as server, client_for(server) as client:
        ids = [client.lease(32, 60000) for _ in range(200)]
        assert len(set(ids)) == 200 and all(lease_id.version == 4 for lease_id in ids)


@pytest.mark.parametrize(
    "size, duration, error",
    [
        (0, 1000, InvalidArgument),
        (-5, 1000, InvalidArgument),
        (64, 0, InvalidArgument),
        (64, -1, InvalidArgument),
        ((1 << 16) + 1, 1000, TooLarge),
        (2**40, 1000, InvalidArgument),
    ],
)
def test_bad_lease_requests_are_refused_with_a_status(size, duration, error):
    with server_thread(1 << 16) as server, client_for(server) as client:
        with pytest.raises(error) as info:
            client.lease(size, duration)
        assert info.value.status is not None and info.value.status < 0
        assert server.store.stats()["leases_granted"] == 0


def test_expiry_needs_no_other_request():
    with server_thread(1 << 16) as server, client_for(server) as client:
        lease_id = client.lease(1024, 500)
        client.set(lease_id, b"short-lived")
        assert server.store.allocator.free_bytes < 1 << 16
        assert wait_for(lambda: server.store.allocator.free_bytes == 1 << 16)
        assert server.store.stats()["leases_expired"] == 1
        with pytest.raises(LeaseNotFound):
            client.get(lease_id)


def test_expiry_is_at_millisecond_precision():
    with server_thread() as server, client_for(server) as client:
        began = time.monotonic()
        lease_id = client.lease(64, 600)
        assert client.get(lease_id) == bytes(64)  # well inside the duration
        # Gone 650 ms after it was asked for: the original, counting whole seconds,
        # would still serve it.
        time.sleep(max(0.0, began + 0.65 - time.monotonic()))
        with pytest.raises(LeaseNotFound):
            client.set(lease_id, b"late")


@pytest.mark.parametrize("size", [32, 4096, 1 << 16])
def test_a_new_lease_never_shows_the_previous_holders_bytes(size):
    with server_thread(1 << 16) as server, client_for(server) as client:
        for end in ("release", "expire"):
            lease_id = client.lease(size, 400 if end == "expire" else 60000)
            client.set(lease_id, b"SECRET" * (size // 6))
            if end == "release":
                client.release(lease_id)
            else:
                assert wait_for(lambda: server.store.stats()["live_leases"] == 0)
            fresh = client.lease(size, 60000)
            assert client.get(fresh) == bytes(size)
            client.release(fresh)


def test_set_writes_at_offset_0_and_keeps_the_rest():
    with server_thread() as server, client_for(server) as client:
        lease_id = client.lease(16)
        client.set(lease_id, b"0123456789abcdef")
        client.set(lease_id, b"XY")
        assert client.get(lease_id) == b"XY23456789abcdef"


def test_get_returns_the_requested_size_not_the_block():
    with server_thread() as server, client_for(server) as client:
        lease_id = client.lease(1000)
        assert len(client.get(lease_id)) == 1000
        with pytest.raises(TooLarge) as info:
            client.set(lease_id, bytes(1001))
        assert info.value.status == -2


def test_unknown_lease_is_not_found():
    with server_thread() as server, client_for(server) as client:
        for call in (
            lambda: client.get(77),
            lambda: client.set(77, b"x"),
            lambda: client.release(77),
            lambda: client.renew(77, 1000),
            lambda: client.get(77, 1, 1),
        ):
            with pytest.raises(LeaseNotFound) as info:
                call()
            assert info.value.status == -1


def test_renew_outlives_the_first_duration():
    with server_thread() as server, client_for(server) as client:
        lease_id = client.lease(64, 1000)
        client.set(lease_id, b"kept")
        client.renew(lease_id, 60000)
        time.sleep(1.2)
        assert client.get(lease_id)[:4] == b"kept"
        with pytest.raises(InvalidArgument):
            client.renew(lease_id, 0)


def test_release_frees_the_memory_now():
    with server_thread(1 << 12) as server, client_for(server) as client:
        before = client.stats()
        lease_id = client.lease(4096, 60000)
        assert client.stats()["free_bytes"] == 0
        with pytest.raises(OutOfMemory):
            client.lease(32)
        client.release(lease_id)
        after = client.stats()
        assert after["free_bytes"] == before["free_bytes"] == 4096
        assert after["leases_released"] == 1 and after["leases_refused"] == 1
        with pytest.raises(LeaseNotFound):
            client.get(lease_id)


def test_ranged_write_and_read():
    with server_thread() as server, client_for(server) as client:
        lease_id = client.lease(100)
        client.set(lease_id, b"hello", offset=10)
        assert client.get(lease_id, offset=10, length=5) == b"hello"
        assert client.get(lease_id, offset=8, length=9) == b"\0\0hello\0\0"
        assert client.get(lease_id, offset=95) == bytes(5)
        assert client.get(lease_id, offset=100, length=0) == b""
        client.set(lease_id, b"end", offset=97)
        for bad in (dict(offset=98, length=3), dict(offset=101), dict(offset=0, length=101)):
            with pytest.raises(OutOfRange) as info:
                client.get(lease_id, **bad)
            assert info.value.status == protocol.OUT_OF_RANGE
        with pytest.raises(OutOfRange):
            client.set(lease_id, b"toolong", offset=95)
        with pytest.raises(TooLarge):
            client.set(lease_id, bytes(101), offset=1)
        data = client.get(lease_id)
        assert data[10:15] == b"hello" and data[97:] == b"end"  # failed writes wrote nothing


def test_stats_has_the_documented_keys():
    with server_thread() as server, client_for(server) as client:
        lease_id = client.lease(100)
        client.set(lease_id, b"x")
        client.get(lease_id)
        stats = client.stats()
        for key in (
            "pool_bytes",
            "free_bytes",
            "largest_free_block",
            "live_leases",
            "connections",
            "uptime",
            "leases_granted",
            "leases_refused",
            "leases_expired",
            "leases_released",
            "gets",
            "sets",
        ):
            assert key in stats
        assert stats["pool_bytes"] == 1 << 20 and stats["free_bytes"] == (1 << 20) - 128
        assert stats["connections"] == 1 and stats["live_leases"] == 1
        assert (stats["gets"], stats["sets"], stats["leases_granted"]) == (1, 1, 1)


def test_client_against_a_closed_port_raises_connection_error():
    client = MemLeaseClient("127.0.0.1", free_port(), timeout=TIMEOUT)
    with pytest.raises(MemLeaseConnectionError):
        client.lease(32)


def test_client_reconnects_after_the_server_closed_the_connection():
    with server_thread(idle_timeout=0.2) as server, client_for(server) as client:
        lease_id = client.lease(64, 60000)
        assert wait_for(lambda: server.stats()["connections"] == 0)
        with pytest.raises(MemLeaseConnectionError):
            client.get(lease_id)
        assert client.get(lease_id) == bytes(64)


# Many clients, persistent connections and pipelining.


def test_sixteen_persistent_clients_in_parallel():
    errors: List[BaseException] = []

    def worker(seed: int, port: int) -> None:
        rng = random.Random(seed)
        try:
            with MemLeaseClient("127.0.0.1", port, timeout=TIMEOUT) as client:
                lease_id = client.lease(512, 60000)
                for _ in range(300):
                    data = random_bytes(rng, rng.randint(1, 512))
                    client.set(lease_id, data)
                    assert client.get(lease_id, 0, len(data)) == data
                client.release(lease_id)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    with server_process("1M", "-q") as server:
        threads = [threading.Thread(target=worker, args=(seed, server.port)) for seed in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in threads)
        assert errors == []
        with client_for(server) as client:
            stats = client.stats()
        assert stats["free_bytes"] == 1 << 20 and stats["sets"] == 16 * 300


def test_a_hundred_pipelined_requests_are_answered_in_order():
    with server_thread() as server, client_for(server) as client:
        ids = [client.lease(32, 60000) for _ in range(50)]
        frames = b"".join(
            protocol.Write(lease_id.bytes, 0, b"n=%d" % n).encode()
            + protocol.Read(lease_id.bytes, 0, -1).encode()
            for n, lease_id in enumerate(ids)
        )
        with connect(server) as sock:
            replies = exchange(sock, frames, 100)
        assert len(replies) == 100
        for n in range(len(ids)):
            assert replies[2 * n] == protocol.DataSet(protocol.OK)
            assert replies[2 * n + 1] == protocol.Data(0, (b"n=%d" % n).ljust(32, b"\0"))


def test_the_api_pipeline_batches_calls():
    with server_thread() as server, client_for(server) as client:
        lease_id = client.lease(64, 60000)
        pipe = client.pipeline()
        for n in range(100):
            pipe.set(lease_id, b"%03d" % n).get(lease_id, 0, 3)
        results = pipe.execute()
        assert results[1::2] == [b"%03d" % n for n in range(100)]
        assert results[0::2] == [None] * 100
        with client.pipeline() as pipe:
            results = pipe.get(lease_id, 0, 1).get(999).lease(32).execute(raise_on_error=False)
        assert results[0] == b"0" and isinstance(results[1], LeaseNotFound)
        assert isinstance(results[2], uuid.UUID)
        with pytest.raises(LeaseNotFound):
            client.pipeline().get(999).execute()


def test_a_large_pipeline_of_large_replies_does_not_stall():
    with server_thread(64 << 20) as server, client_for(server) as client:
        lease_id = client.lease(1 << 20, 60000)
        pipe = client.pipeline()
        for _ in range(40):
            pipe.set(lease_id, bytes(1 << 20)).get(lease_id)
        results = pipe.execute()
        assert len(results) == 80 and all(len(r) == 1 << 20 for r in results[1::2])


def test_a_half_sent_frame_does_not_delay_another_client():
    with server_process() as server, connect(server) as stalled:
        stalled.sendall(protocol.Lease(64, 1000).encode()[:7])
        with MemLeaseClient("127.0.0.1", server.port, timeout=1.0) as client:
            assert isinstance(client.lease(64), uuid.UUID)


def test_one_request_per_connection_like_the_original_client():
    with server_process() as server:
        with connect(server) as sock:
            (leased,) = exchange(sock, protocol.Lease(32, 5000).encode())
        for frame, expected in (
            (protocol.SetData(leased.lease_id, b"abc\0").encode(), protocol.DataSet(0)),
            (
                protocol.AccessData(leased.lease_id).encode(),
                protocol.Data(leased.lease_id, b"abc".ljust(32, b"\0")),
            ),
        ):
            with connect(server) as sock:
                assert exchange(sock, frame) == [expected]
                sock.shutdown(socket.SHUT_WR)
                assert closed_by_peer(sock)


# Hostile input: each class answered or cut off, nobody else disturbed, nothing leaked.


def assert_still_serving(server) -> None:
    with client_for(server) as client:
        lease_id = client.lease(100, 60000)
        client.set(lease_id, b"still fine")
        assert client.get(lease_id, 0, 10) == b"still fine"
        client.release(lease_id)
        stats = client.stats()
    assert stats["free_bytes"] == stats["pool_bytes"]


# Negative, or more data than any lease can hold (2**31 bytes after SetData's 12).
@pytest.mark.parametrize("length", [-1, -(2**63), 2**60, 12 + 2**31])
def test_a_bad_length_gets_an_error_and_the_connection_closes(length):
    with server_process("1M") as server:
        with connect(server) as sock:
            sock.sendall(struct.pack("<iq", protocol.SET_DATA, length))
            assert read_replies(sock, 1) == [
                protocol.Error(protocol.FRAME_TOO_LARGE, protocol.SET_DATA)
            ]
            assert closed_by_peer(sock)
        assert_still_serving(server)
        assert "bad frame" in server.output()


def test_max_frame_option_refuses_larger_values_and_the_connection_goes_on():
    with server_process("1M", "--max-frame", "64") as server, client_for(server) as client:
        lease_id = client.lease(1 << 19)
        with connect(server) as sock:
            for size in (100, 300_000):  # buffered whole, and streamed past the server
                replies = exchange(sock, protocol.Write(lease_id.bytes, 0, bytes(size)).encode())
                assert replies == [protocol.DataSet(protocol.TOO_LARGE)]
            replies = exchange(sock, protocol.Write(lease_id.bytes, 0, b"fits").encode())
            assert replies == [protocol.DataSet(protocol.OK)]


def test_a_length_larger_than_what_arrives_times_out():
    with server_thread(frame_timeout=0.3) as server:
        with connect(server) as sock:
            sock.sendall(struct.pack("<iqi", protocol.SET_DATA, 1000, 1))
            assert closed_by_peer(sock)
        assert_still_serving(server)


def test_an_idle_connection_is_closed():
    with server_thread(idle_timeout=1.0) as server:
        with connect(server) as sock:
            assert exchange(sock, protocol.Stats().encode())[0].stats["connections"] == 1
            assert closed_by_peer(sock)
        assert wait_for(lambda: server.stats()["connections"] == 0)


@pytest.mark.parametrize(
    "frame, status",
    [
        (struct.pack("<iq", 99, 0), protocol.UNKNOWN_TYPE),
        (struct.pack("<iq", -7, 0), protocol.UNKNOWN_TYPE),
        (struct.pack("<iq", protocol.LEASED, 4) + bytes(4), protocol.UNKNOWN_TYPE),
        (struct.pack("<iqi", protocol.LEASE, 4, 64), protocol.MALFORMED),
        (struct.pack("<iqiiI", protocol.LEASE, 12, 64, 1000, 0), protocol.MALFORMED),
        (struct.pack("<iqiq", protocol.SET_DATA, 12 + 4, 1, 400) + b"abcd", protocol.MALFORMED),
        (struct.pack("<iqiqq", protocol.WRITE, 20, 1, 0, 5), protocol.MALFORMED),
        (struct.pack("<iq", protocol.ACCESS_DATA, 0), protocol.MALFORMED),
    ],
)
def test_a_bad_message_gets_an_error_reply_and_the_connection_goes_on(frame, status):
    with server_thread() as server:
        with connect(server) as sock:
            msg_type = struct.unpack_from("<i", frame)[0]
            replies = exchange(sock, frame + protocol.Lease(64, 1000).encode(), 2)
            assert replies[0] == protocol.Error(status, msg_type)
            assert isinstance(replies[1], protocol.Leased) and replies[1].lease_id > 0
            release = protocol.Release(protocol.short_form(replies[1].lease_id))
            assert exchange(sock, release.encode()) == [
                protocol.DataSet(0)
            ]
        assert_still_serving(server)


def test_unknown_type_raises_a_protocol_error_in_the_api():
    with server_thread() as server, connect(server) as sock:
        assert exchange(sock, struct.pack("<iq", 42, 3) + b"abc") == [
            protocol.Error(protocol.UNKNOWN_TYPE, 42)
        ]
    from memlease_client import _status_error

    error = _status_error(protocol.UNKNOWN_TYPE, "stats")
    assert isinstance(error, MemLeaseProtocolError) and error.status == protocol.UNKNOWN_TYPE


def test_failed_writes_change_nothing():
    with server_thread() as server, client_for(server) as client:
        lease_id = client.lease(64, 60000)
        client.set(lease_id, b"A" * 64)
        with connect(server) as sock:
            wide = lease_id.bytes
            frames = [
                protocol.Replace(wide, b"B" * 65).encode(),
                protocol.Write(wide, 60, b"B" * 5).encode(),
                protocol.Write(wide, -1, b"B").encode(),
                struct.pack("<iq16sqq", protocol.WRITE, 32 + 10, wide, 0, 11) + b"B" * 10,
            ]
            replies = exchange(sock, b"".join(frames), 4)
        assert [r.status for r in replies] == [
            protocol.TOO_LARGE,
            protocol.OUT_OF_RANGE,
            protocol.OUT_OF_RANGE,
            protocol.MALFORMED,
        ]
        assert client.get(lease_id) == b"A" * 64


def test_disconnecting_mid_frame_and_mid_reply_harms_nobody():
    with server_thread(64 << 20) as server, client_for(server) as client:
        lease_id = client.lease(32 << 20, 60000)
        for _ in range(5):
            sock = connect(server)
            sock.sendall(protocol.Write(lease_id.bytes, 0, bytes(1000)).encode()[:500])
            sock.close()
            sock = connect(server)
            sock.sendall(protocol.Read(lease_id.bytes, 0, -1).encode() * 3)
            sock.close()  # leaves 96 MiB of replies unread
        assert wait_for(lambda: server.stats()["connections"] == 1)
        client.release(lease_id)
        assert_still_serving(server)


def test_fuzzed_frames_from_several_connections():
    rng = random.Random(20261124)
    valid = [m.encode() for m in ALL_REQUESTS if not isinstance(m, protocol.Auth)]

    def mutated() -> bytes:
        frame = bytearray(rng.choice(valid))
        for _ in range(rng.randint(1, 4)):
            frame[rng.randrange(len(frame))] = rng.randrange(256)
        return bytes(frame)

    with server_thread(1 << 16, frame_timeout=0.2) as server, client_for(server) as client:
        keeper = client.lease(256, 600000)
        client.set(keeper, b"precious")
        for _ in range(60):
            with connect(server) as sock:
                sock.settimeout(2)
                chunks = [
                    mutated() if rng.random() < 0.7 else random_bytes(rng, rng.randint(1, 60))
                    for _ in range(50)
                ]
                try:
                    sock.sendall(b"".join(chunks))
                    sock.shutdown(socket.SHUT_WR)
                    closed_by_peer(sock)
                except (ConnectionResetError, BrokenPipeError, socket.timeout):
                    pass
        assert wait_for(lambda: server.stats()["connections"] == 1)
        assert client.get(keeper, 0, 8) == b"precious"
        client.release(keeper)
        # Fuzzed leases may still be live: the books must agree with the allocator's map.
        picture = client.pool_map(64)
        assert sum(picture.used) == picture.pool_bytes - picture.free_bytes
        assert picture.free_bytes == client.stats()["free_bytes"]


def test_fuzzed_frames_never_crash_the_server_process():
    rng = random.Random(412)
    with server_process("64K", "-q", "--frame-timeout", "0.2") as server:
        for _ in range(30):
            with connect(server) as sock:
                sock.settimeout(2)
                payload = random_bytes(rng, rng.randint(1, 400))
                try:
                    sock.sendall(payload)
                    sock.shutdown(socket.SHUT_WR)
                    closed_by_peer(sock)
                except (ConnectionResetError, BrokenPipeError, socket.timeout):
                    pass
        assert server.proc.poll() is None
        assert_still_serving(server)
        assert "Traceback" not in server.output()


def test_max_connections_refuses_the_excess_at_once():
    with server_thread(max_connections=2) as server:
        first, second = connect(server), connect(server)
        try:
            exchange(first, protocol.Stats().encode())
            exchange(second, protocol.Stats().encode())
            with connect(server) as third:
                assert read_replies(third, 1) == [protocol.Error(protocol.BUSY, 0)]
                assert closed_by_peer(third)
            with pytest.raises(ServerBusy):
                client_for(server).stats()
        finally:
            first.close()
            second.close()
        assert wait_for(lambda: server.stats()["connections"] == 0)
        assert_still_serving(server)


def rss_mib(pid: int) -> float:
    status = Path("/proc/%d/status" % pid).read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_unread_replies_do_not_pile_up_in_the_server():
    with server_process("8M", "-q") as server:
        with client_for(server) as client:
            lease_id = client.lease(1 << 20, 60000)
        baseline = rss_mib(server.proc.pid)
        with connect(server) as greedy:
            whole = protocol.Read(lease_id.bytes, 0, -1).encode()
            greedy.sendall(whole * 400)  # 400 MiB of replies
            peak = baseline
            for _ in range(50):
                peak = max(peak, rss_mib(server.proc.pid))
                time.sleep(0.02)
        assert peak - baseline < 64, (baseline, peak)
        with client_for(server) as client:
            client.release(lease_id)
        assert_still_serving(server)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_one_request_connections_leak_no_descriptors():
    with server_process("1M", "-q") as server:
        fd_dir = "/proc/%d/fd" % server.proc.pid
        before = len(os.listdir(fd_dir))
        for _ in range(3000):
            with connect(server) as sock:
                exchange(sock, protocol.AccessData(1).encode())
        assert wait_for(lambda: len(os.listdir(fd_dir)) == before, 10), (
            before,
            len(os.listdir(fd_dir)),
        )
        assert_still_serving(server)


# Access control.

TOKEN = "correct horse battery staple"


def token_env() -> dict:
    env = dict(os.environ)
    env["MEMLEASE_TOKEN"] = TOKEN
    return env


def test_without_a_token_no_auth_is_needed():
    with server_thread() as server, client_for(server, token=None) as client:
        assert isinstance(client.lease(32), uuid.UUID)


def test_with_a_token_only_the_right_one_gets_in():
    with server_thread(token=TOKEN.encode()) as server:
        with pytest.raises(Unauthorized, match="^auth: unauthorized"):
            client_for(server, token="wrong").lease(32)
        with client_for(server, token=TOKEN) as client:
            lease_id = client.lease(32)
            client.set(lease_id, b"mine")
        assert server.store.stats()["leases_granted"] == 1


def test_unauthenticated_raw_frames_get_unauthorized_and_nothing_else():
    with server_thread(token=TOKEN.encode()) as server:
        with connect(server) as sock:
            frames = [m.encode() for m in ALL_REQUESTS if not isinstance(m, protocol.Auth)]
            replies = exchange(sock, b"".join(frames), len(frames))
            assert replies == [
                protocol.Error(protocol.UNAUTHORIZED, struct.unpack_from("<i", f)[0])
                for f in frames
            ]
        assert server.store.stats()["leases_granted"] == 0 and server.store.stats()["gets"] == 0
        with connect(server) as sock:
            assert exchange(sock, protocol.Auth(b"nope").encode()) == [
                protocol.DataSet(protocol.UNAUTHORIZED)
            ]
            assert closed_by_peer(sock)
        with connect(server) as sock:
            frames = protocol.Auth(TOKEN.encode()).encode() + protocol.Lease(32, 1000).encode()
            ok, leased = exchange(sock, frames, 2)
            assert ok == protocol.DataSet(protocol.OK) and leased.lease_id > 0


def test_token_from_env_and_file_through_the_command_lines(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with server_process("1M", "--token-file", str(token_file)) as server:
        out = run_cli("lease", "32", port=server.port)
        assert out.returncode == 1 and b"wants a token" in out.stderr
        out = run_cli("lease", "32", port=server.port, env=token_env())
        assert out.returncode == 0 and out.stdout.startswith(b"You have leased 32 bytes")
        bad = dict(os.environ, MEMLEASE_TOKEN="guess")
        assert run_cli("stats", port=server.port, env=bad).returncode == 1
        assert wait_for(lambda: "127.0.0.1" in server.output() and "wrong token" in server.output())
    with server_process("1M", env=token_env()) as server:
        assert run_cli("stats", port=server.port).returncode == 1
        assert run_cli("stats", port=server.port, env=token_env()).returncode == 0


def test_ipv6_loopback():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with server_thread(host="::1") as server, client_for(server) as client:
        assert isinstance(client.lease(32), uuid.UUID)
