#!/usr/bin/env python3
"""How evenly lease placement fills many servers: a seeded simulation for docs/scaling.md.

python3 sim_placement.py [--servers 100] [--seconds 300] [--loads 0.6,0.85,0.95] [--seed 1]

Leases arrive at random (Poisson), each for a power-of-two size from 1 to 64 MiB and
an exponentially distributed duration, on servers of 1 GiB each.  A server is a free-byte
count (the buddy allocator's fragmentation is left out).  Each placement policy sees
the same traffic; the table shows how far free memory spreads across the servers and
how often the chosen server could not hold the lease.
"""

import argparse
import heapq
import random
import statistics
from typing import Callable, List, NamedTuple, Sequence, Tuple

SERVER_MIB = 1024  # sizes are counted in MiB
SIZES = [1 << k for k in range(7)]  # 1 to 64 MiB
MEAN_DURATION_S = 10.0
WARM_UP_S = 60.0

# A policy picks the server for a lease from the free bytes it believes each one has.
Policy = Callable[[random.Random, Sequence[int]], int]


def random_choice(rng: random.Random, free: Sequence[int]) -> int:
    return rng.randrange(len(free))


def two_choices(rng: random.Random, free: Sequence[int]) -> int:
    a, b = rng.sample(range(len(free)), 2)
    return a if free[a] >= free[b] else b


class Result(NamedTuple):
    policy: str
    mean_free: float  # per cent of a server, averaged over samples
    stdev_free: float  # spread across servers, per cent of a server, averaged
    min_free: float  # the least free memory any server had, per cent
    max_free: float  # the most free memory any server had, per cent
    moved: float  # per cent of leases the first choice could not hold
    refused: float  # per cent of leases no server could hold


def simulate(
    name: str,
    policy: Policy,
    servers: int,
    seconds: float,
    load: float,
    seed: int,
    stats_interval: float,
) -> Result:
    """Run one policy; its belief of free bytes is refreshed every ``stats_interval`` s
    (0: always exact) and lowered by each lease it places, as MemLeaseCluster does."""
    traffic = random.Random(seed)  # the same leases for every policy
    choices = random.Random(seed + 1)
    mean_size = statistics.mean(SIZES)
    rate = load * servers * SERVER_MIB / (mean_size * MEAN_DURATION_S)
    free = [SERVER_MIB] * servers
    belief = list(free)
    ends: List[Tuple[float, int, int]] = []  # (end time, server, size)
    now = next_stats = next_sample = 0.0
    placed = moved = refused = 0
    spreads: List[float] = []
    means: List[float] = []
    lowest, highest = 100.0, 0.0
    while now < seconds:
        now += traffic.expovariate(rate)
        size = traffic.choice(SIZES)
        duration = traffic.expovariate(1 / MEAN_DURATION_S)
        while ends and ends[0][0] <= now:
            _, server, freed = heapq.heappop(ends)
            free[server] += freed
        if stats_interval == 0 or now >= next_stats:
            belief = list(free)
            next_stats = now + stats_interval
        server = policy(choices, belief)
        if free[server] < size:
            moved += 1
            server = max(range(servers), key=free.__getitem__)
            if free[server] < size:
                refused += 1
                continue
        placed += 1
        free[server] -= size
        belief[server] -= size
        heapq.heappush(ends, (now + duration, server, size))
        if now >= WARM_UP_S and now >= next_sample:
            next_sample = now + 1.0
            percent = [100.0 * f / SERVER_MIB for f in free]
            spreads.append(statistics.pstdev(percent))
            means.append(statistics.mean(percent))
            lowest, highest = min(lowest, min(percent)), max(highest, max(percent))
    total = placed + refused
    return Result(
        name,
        statistics.mean(means),
        statistics.mean(spreads),
        lowest,
        highest,
        100.0 * moved / total,
        100.0 * refused / total,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument(
        "--loads",
        type=lambda text: [float(load) for load in text.split(",")],
        default=[0.6, 0.85, 0.95],
        help="offered loads, 0 to 1, comma-separated",
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    runs = [
        ("random", random_choice, 0.0),
        ("two choices, exact", two_choices, 0.0),
        ("two choices, stats 1 s old", two_choices, 1.0),
    ]
    print("%d servers of 1 GiB, %g s simulated, seed %d" % (args.servers, args.seconds, args.seed))
    print()
    columns = "load,placement,mean free,spread (stdev),least free,most free,moved,refused"
    print("| %s |" % columns.replace(",", " | "))
    print("|---" * 8 + "|")
    for load in args.loads:
        for name, policy, interval in runs:
            r = simulate(name, policy, args.servers, args.seconds, load, args.seed, interval)
            print(
                "| %.0f%% | %s | %.1f%% | %.1f%% | %.1f%% | %.1f%% | %.2f%% | %.2f%% |"
                % (
                    100 * load,
                    r.policy,
                    r.mean_free,
                    r.stdev_free,
                    r.min_free,
                    r.max_free,
                    r.moved,
                    r.refused,
                )
            )


if __name__ == "__main__":
    main()
