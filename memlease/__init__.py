"""MemoryLease's parts behind the card's top-level modules, one job a module.

store (memory, allocator, leases, deadlines), loop (file and time events on one thread),
connection (one connection's protocol, without sockets), listener (the sockets and
timers that join them), security, metrics, systemd; the clients' cli, aio and cluster;
picture, units and program (what the command lines share).  protocol and buddy stay at
the top, as the design card has them.
"""

# The project's one version, read by pyproject.toml and printed by --version.
# 2.0.0: this round changes the wire format.
__version__ = "2.0.0"
