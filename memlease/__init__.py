"""MemoryLease's parts behind the card's top-level modules, one job a module.

store (memory, allocator, leases, deadlines), loop (file and time events on one thread),
connection (one connection's protocol, without sockets), listener (the sockets and
timers that join them), security, metrics, systemd; the clients' cli, aio and cluster;
picture and units.  protocol and buddy stay at the top, as the design card has them.
"""
