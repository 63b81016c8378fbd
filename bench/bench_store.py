#!/usr/bin/env python3
"""The lease store at scale, measured through a real server: the figures of issue 10.

Each case starts its own server process, loads it from this process with requests
pipelined BATCH at a time (a busy client), and times another client's round trips from a
second process meanwhile, so the load generator's own pauses never count as the server's.
Memory is the server's RSS.  One case runs the store alone in this process, to show its
own share of a pause: the longest garbage collection and the longest lease() call.

    flock /tmp/memlease-bench.lock python3 bench/bench_store.py [--quick]
"""

import argparse
import contextlib
import gc
import multiprocessing
import os
import re
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, List, NamedTuple, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the program's modules

import protocol

from launch import start_ours, stop

BATCH = 2000  # requests sent before their replies are read
MIB = 1 << 20
HOUR_MS = 3_600_000


class Scale(NamedTuple):
    leases: int  # of 32 bytes, filling a pool of leases * 32 bytes
    big_storm: int
    small_storm: int
    renews: int
    pairs: int
    restored: int  # leases saved and restored by a warm restart


FULL = Scale(1 << 20, 200_000, 50_000, 300_000, 100_000, 1_000_000)
QUICK = Scale(1 << 16, 20_000, 5_000, 30_000, 10_000, 100_000)


class Pipe:
    """A connection that sends requests in batches and reads all their replies."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = protocol.reply_decoder()

    def exchange(self, frames: Sequence[bytes]) -> List[object]:
        self.sock.sendall(b"".join(frames))
        replies: List[object] = []
        while len(replies) < len(frames):
            message = self.decoder.next_message()
            if message is not None:
                replies.append(message)
                continue
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("the server closed the connection")
            self.decoder.feed(data)
        return replies

    def lease_ids(self, frames: Sequence[bytes]) -> List[bytes]:
        """The ids of the leases that Grant ``frames`` asked for."""
        replies = self.exchange(frames)
        refused = [reply for reply in replies if not isinstance(reply, protocol.Granted)]
        if refused:
            raise RuntimeError("the server refused a lease: %r" % (refused[0],))
        return [reply.lease_id for reply in replies]  # type: ignore[attr-defined]

    def stats(self) -> "dict[str, int]":
        return self.exchange([protocol.Stats().encode()])[0].stats  # type: ignore[attr-defined,no-any-return]

    def close(self) -> None:
        self.sock.close()


def _batches(total: int) -> Iterator[int]:
    while total > 0:
        yield min(BATCH, total)
        total -= BATCH


def _rss(pid: int) -> int:
    status = Path("/proc/%d/status" % pid).read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    if match is None:
        raise RuntimeError("no VmRSS for process %d" % pid)
    return int(match.group(1)) * 1024


def _probe(port: int, request: bytes, stop: "multiprocessing.synchronize.Event", out) -> None:  # type: ignore[no-untyped-def]
    """Time one small request after another until told to stop; send back (start, rtt)s."""
    pipe = Pipe(port)
    samples = []
    while not stop.is_set():
        began = time.perf_counter()
        pipe.exchange([request])
        samples.append((began, time.perf_counter() - began))
        time.sleep(0.001)
    pipe.close()
    out.send(samples)


class Prober:
    """Another client's round trips, timed in a process of their own."""

    def __init__(self, port: int, request: bytes) -> None:
        self._stop = multiprocessing.Event()
        self._receive, send = multiprocessing.Pipe(duplex=False)
        self._process = multiprocessing.Process(
            target=_probe, args=(port, request, self._stop, send), daemon=True
        )
        self._process.start()

    def finish(self) -> List[Tuple[float, float]]:
        self._stop.set()
        if not self._receive.poll(30):
            raise RuntimeError("the probing client failed")
        samples: List[Tuple[float, float]] = self._receive.recv()
        self._process.join(10)
        return samples


class Server(NamedTuple):
    """A running memlease_server.py process."""

    pid: int
    port: int

    def rss(self) -> int:
        return _rss(self.pid)


@contextlib.contextmanager
def running_server(pool: int) -> Iterator[Server]:
    """A server process on a port of the OS's choosing, stopped on the way out."""
    with tempfile.NamedTemporaryFile(mode="w+") as log:
        process, target = start_ours(str(pool), log)
        try:
            yield Server(process.pid, target.port)
        finally:
            stop(process)


def _window(samples: List[Tuple[float, float]], since: float = 0.0) -> List[float]:
    """The round trips begun from ``since`` on, shortest first."""
    return sorted(rtt for began, rtt in samples if began >= since)


def _longest_ms(window: List[float]) -> Tuple[float, int]:
    return (window[-1] * 1000 if window else float("nan")), len(window)


def _percentile_ms(window: List[float], fraction: float) -> float:
    return window[min(int(len(window) * fraction), len(window) - 1)] * 1000 if window else 0.0


def metadata_and_growth(scale: Scale) -> Tuple[str, str]:
    """Fill a pool with 32-byte leases: RSS beyond the pool per lease, and the probe's worst."""
    pool = scale.leases * 32
    with running_server(pool) as server:
        pipe = Pipe(server.port)
        before = server.rss()
        probe_id = pipe.lease_ids([protocol.Grant(32, HOUR_MS).encode()])[0]  # the first lease
        prober = Prober(server.port, protocol.Read(probe_id, 0, 1).encode())
        began = time.perf_counter()
        for n in _batches(scale.leases - 1):
            pipe.lease_ids([protocol.Grant(32, HOUR_MS).encode()] * n)
        took = time.perf_counter() - began
        samples = prober.finish()
        stats = pipe.stats()
        per_lease = (server.rss() - before - pool) / scale.leases
        pipe.close()
    worst, count = _longest_ms(_window(samples))
    return (
        "| metadata per live lease (%d leases of 32 B in a %d MiB pool; RSS growth minus the "
        "pool, per lease) | %.0f B (the store's own estimate: %.0f B) | <= 150 B |"
        % (scale.leases, pool // MIB, per_lease, stats["metadata_bytes"] / scale.leases),
        "| longest round trip of another client while those leases are created (%.1f s, "
        "%d round trips) | %.1f ms | <= 20 ms |" % (took, count, worst),
    )


def collector_pauses(scale: Scale) -> str:
    """The store alone, in this process: its longest call and the collector's longest pass."""
    from memlease.store import LeaseStore

    store = LeaseStore(scale.leases * 32)
    passes: List[float] = []
    began = [0.0]

    def timed(phase: str, info: "dict[str, int]") -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            passes.append(time.perf_counter() - began[0])

    gc.callbacks.append(timed)
    longest = 0.0
    try:
        for _ in range(scale.leases):
            start = time.perf_counter()
            store.lease(32, HOUR_MS)
            longest = max(longest, time.perf_counter() - start)
    finally:
        gc.callbacks.remove(timed)
        store.close()
    return (
        "| the same %d leases made by the store alone, in this process: longest garbage "
        "collection (%d of them, timed by gc.callbacks), and longest lease() call | %.1f ms, "
        "%.1f ms | <= 20 ms |" % (scale.leases, len(passes), max(passes) * 1000, longest * 1000)
    )


def warm_restart(leases: int, rounds: int = 3) -> str:
    """The store alone, in this process: save ``leases`` leases of 32 bytes to a pool file
    on tmpfs, then restore them (what a warm restart costs, beside what the stop cost);
    ``rounds`` times, each restored store saved again, medians."""
    from memlease.store import LeaseStore

    pool = 1 << (leases * 32 - 1).bit_length()
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
    saves: List[float] = []
    restores: List[float] = []
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        state = os.path.join(scratch, "pool")
        store = LeaseStore(pool, state_file=state)
        for _ in range(leases):
            store.lease(32, HOUR_MS)
        for _ in range(rounds):
            began = time.perf_counter()
            store.save()
            saves.append(time.perf_counter() - began)
            store.close()
            del store  # a restart is a new process: the old tree is not there
            gc.collect()
            began = time.perf_counter()
            store = LeaseStore(pool, state_file=state)
            restores.append(time.perf_counter() - began)
            restored = store.stats()["live_leases"]
            if restored != leases:
                raise RuntimeError("restored %d leases of %d" % (restored, leases))
        store.close()
    save, restore = statistics.median(saves), statistics.median(restores)
    return (
        "| warm restart of %d leases of 32 B in a %d MiB pool file on tmpfs, the store alone "
        "in this process: save (at a stop), restore (at the start), medians of %d | "
        "%.2f s, %.2f s (%.1fx) | restore <= 5x save |"
        % (leases, pool // MIB, rounds, save, restore, restore / save)
    )


def expiry_storm(leases: int, target_ms: int) -> str:
    """Leases timed to expire in one instant; the probe's worst round trip from then on."""
    with running_server(max(2 * leases * 32, 1 << 20)) as server:
        pipe = Pipe(server.port)
        probe_id = pipe.lease_ids([protocol.Grant(32, HOUR_MS).encode()])[0]
        # Each batch's duration ends at the same moment, with time to send them all first.
        instant = time.monotonic() + 2.0 + leases / 20_000
        for n in _batches(leases):
            left_ms = int((instant - time.monotonic()) * 1000)
            if left_ms < 500:
                raise RuntimeError("the leases took too long to create to expire together")
            pipe.lease_ids([protocol.Grant(32, left_ms).encode()] * n)
        prober = Prober(server.port, protocol.Read(probe_id, 0, 1).encode())
        time.sleep(max(0.0, instant - time.monotonic()))
        since = time.perf_counter()
        for _ in range(600):
            if pipe.stats()["leases_expired"] >= leases:
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("the leases did not expire within 30 s")
        reaped = time.perf_counter() - since
        samples = prober.finish()
        pipe.close()
    window = _window(samples, since)
    worst, count = _longest_ms(window)
    return (
        "| %d leases expiring in the same instant: longest round trip of another client "
        "(reaped in %.2f s, %d round trips, 99th percentile %.1f ms) | %.1f ms | <= %d ms |"
        % (leases, reaped, count, _percentile_ms(window, 0.99), worst, target_ms)
    )


def renews_of_one_lease(renews: int) -> str:
    with running_server(1 << 20) as server:
        pipe = Pipe(server.port)
        lease_id = pipe.lease_ids([protocol.Grant(32, HOUR_MS).encode()])[0]
        pipe.exchange([protocol.Renew(lease_id, HOUR_MS).encode()] * BATCH)  # warm up
        before = server.rss()
        for n in _batches(renews):
            pipe.exchange([protocol.Renew(lease_id, HOUR_MS).encode()] * n)
        growth = server.rss() - before
        pipe.close()
    return "| %d renews of one lease: RSS growth | %+.2f MiB | < 1 MiB |" % (renews, growth / MIB)


def lease_release_pairs(pairs: int) -> str:
    with running_server(1 << 20) as server:
        pipe = Pipe(server.port)
        lease = protocol.Grant(32, HOUR_MS).encode()

        def cycle(n: int) -> None:
            ids = pipe.lease_ids([lease] * n)
            pipe.exchange([protocol.Release(lease_id).encode() for lease_id in ids])

        cycle(BATCH)  # warm up
        before = server.rss()
        for n in _batches(pairs):
            cycle(n)
        growth = server.rss() - before
        pipe.close()
    return "| %d lease + release pairs: RSS growth | %+.2f MiB | < 1 MiB |" % (pairs, growth / MIB)


_TABLE_HEAD = ("| case | measured | target |", "|---|---|---|")


def restart_rows(scale: Scale) -> Iterator[str]:
    """The table with the warm restart alone."""
    yield from _TABLE_HEAD
    yield warm_restart(scale.restored)


def storm_rows(scale: Scale) -> Iterator[str]:
    """The table with the expiry storms alone."""
    yield from _TABLE_HEAD
    yield expiry_storm(scale.big_storm, 20)
    yield expiry_storm(scale.small_storm, 10)


def rows(scale: Scale) -> Iterator[str]:
    """The table's lines, each as soon as its case is measured."""
    yield from _TABLE_HEAD
    yield from metadata_and_growth(scale)
    yield collector_pauses(scale)
    yield expiry_storm(scale.big_storm, 20)
    yield expiry_storm(scale.small_storm, 10)
    yield renews_of_one_lease(scale.renews)
    yield lease_release_pairs(scale.pairs)
    yield warm_restart(scale.restored)


def run(quick: bool) -> List[str]:
    """The "store at scale" table, as markdown lines."""
    return list(rows(QUICK if quick else FULL))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the counts")
    only = parser.add_mutually_exclusive_group()
    only.add_argument(
        "--restart-only", action="store_true", help="only the warm restart's save and restore"
    )
    only.add_argument("--storm-only", action="store_true", help="only the expiry storms")
    args = parser.parse_args()
    scale = QUICK if args.quick else FULL
    print("## store at scale\n")
    if args.restart_only:
        lines = restart_rows(scale)
    elif args.storm_only:
        lines = storm_rows(scale)
    else:
        lines = rows(scale)
    for line in lines:
        print(line, flush=True)
    flags = [
        flag
        for flag, given in (
            (" --quick", args.quick),
            (" --restart-only", args.restart_only),
            (" --storm-only", args.storm_only),
        )
        if given
    ]
    print("\n`flock /tmp/memlease-bench.lock python3 bench/bench_store.py%s`" % "".join(flags))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
