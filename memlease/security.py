"""What keeps a server started with sudo safe to expose: tenants, limits, TLS and dropping root.

Each part answers one attack on a server that parses bytes from the network:

- :class:`Tenants` -- who may connect, and as whom: a lease is seen only by its tenant.
- :class:`AllowList` -- with no token at all, only these peers are served (protected mode).
- :class:`RateLimiter` -- so many events a minute per source, in a bounded table:
  guessing short lease ids gets slow.
- :class:`Backoff` -- a growing delay per source: guessing tokens gets slow, while the
  right token from the same source is still answered at once.
- :class:`LogLimiter` -- one peer cannot flood the log: repeats become "N more suppressed".
- :func:`server_tls_context` and :func:`drop_privileges` -- encryption, and no root while serving.
"""

import argparse
import collections
import functools
import hashlib
import hmac
import ipaddress
import logging
import os
import pwd
import ssl
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

from memlease.store import open_state_file
from memlease.units import parse_size

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

LOOPBACK = "127.0.0.0/8,::1"
MIN_TOKEN_BYTES = 16  # shorter tokens can be guessed: the server refuses to start with one
WRONG_TOKENS_FREE = 3  # wrong tokens a source may present in a minute, answered at once
WRONG_TOKEN_FIRST_DELAY = 0.05  # seconds before the answer to the next; each later one doubles
WRONG_TOKEN_MAX_DELAY = 10.0
GUESSING_CLOSES_PER_MINUTE = 10  # connections closed for guessing ids before a source waits
GUESS_MIN_MISSES = 100  # lease-id misses a connection may have before its ratio is judged
GUESS_MISS_PERCENT = 90  # misses above this share of its requests mean it is guessing
LIMITER_KEYS = 4096  # sources a rate limiter tracks; more share one budget


# Tenants.


class Tenant(NamedTuple):
    name: str
    number: int  # the store's tenant number: see tenant_number
    max_bytes: int  # 0: no quota
    digest: bytes  # SHA-256 of the token: equal lengths make the comparison constant-time
    token_length: int


class Tenants:
    """The tokens a server accepts, each naming the tenant whose leases it reaches."""

    def __init__(self, tenants: Sequence[Tuple[str, bytes, int]]) -> None:
        if not tenants:
            raise ValueError("no tenant is defined")
        self._tenants: Dict[int, Tenant] = {}
        digests = set()
        for name, token, max_bytes in tenants:
            digest = _digest(token)
            number = tenant_number(name)
            same = self._tenants.get(number)
            if same is not None and same.name == name:
                raise ValueError("tenant %r is defined twice" % name)
            if same is not None:
                raise ValueError(
                    "tenants %r and %r have the same number: rename one" % (same.name, name)
                )
            if digest in digests:
                raise ValueError("tenant %r has the token of another tenant" % name)
            digests.add(digest)
            self._tenants[number] = Tenant(name, number, max_bytes, digest, len(token))
        self.one_token = False  # True: one token shared by all, not a file of tenants
        self.source = ""  # how they were read, for the log: set by load_tenants

    @classmethod
    def parse(cls, text: str, source: str) -> "Tenants":
        """Lines ``NAME TOKEN [MAX_BYTES]``; or, as before tenants, a lone line: one token.

        ``#`` starts a comment line; blank lines are skipped.  A file of one line is read
        as a token, spaces and all, as it always was; so a file of one tenant needs a
        comment line (or it is one token).  Tenants' tokens hold no whitespace.
        """
        kept = [line.strip() for line in text.splitlines() if line.strip()]
        if len(kept) == 1 and not kept[0].startswith("#"):
            return cls.single(kept[0].encode())
        lines = [
            (number, line.split())
            for number, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")
        ]
        if not lines:
            raise ValueError("%s holds no token" % source)
        tenants = []
        for number, fields in lines:
            if not 2 <= len(fields) <= 3:
                raise ValueError("%s line %d: expected NAME TOKEN [MAX_BYTES]" % (source, number))
            try:
                max_bytes = parse_size(fields[2]) if len(fields) == 3 else 0
            except argparse.ArgumentTypeError as exc:
                raise ValueError("%s line %d: %s" % (source, number, exc)) from None
            tenants.append((fields[0], fields[1].encode(), max_bytes))
        try:
            return cls(tenants)
        except ValueError as exc:
            raise ValueError("%s: %s" % (source, exc)) from None

    @classmethod
    def single(cls, token: bytes) -> "Tenants":
        """The one shared token of a server without a tenant file."""
        tenants = cls([("default", token, 0)])
        tenants.one_token = True
        return tenants

    def authenticate(self, token: bytes) -> Optional[int]:
        """The number of the tenant whose token this is, or None.

        Every tenant's digest is compared, whichever matches, so the time taken tells
        nothing about which tenant (or how much of a token) was close.
        """
        digest = _digest(token)
        found = None
        for tenant in self._tenants.values():
            if hmac.compare_digest(digest, tenant.digest):
                found = tenant.number
        return found

    def token_lengths(self) -> List[Tuple[str, int]]:
        """Each tenant's name and its token's length in bytes."""
        return [(tenant.name, tenant.token_length) for tenant in self._tenants.values()]

    def quota(self, number: int) -> int:
        """The most block bytes tenant ``number`` may hold at once; 0 means no limit."""
        tenant = self._tenants.get(number)
        return 0 if tenant is None else tenant.max_bytes

    def name(self, number: int) -> str:
        tenant = self._tenants.get(number)
        return "-" if tenant is None else tenant.name

    def __len__(self) -> int:
        return len(self._tenants)


def check_token_lengths(tenants: Tenants, source: str) -> None:
    """Refuse tokens shorter than MIN_TOKEN_BYTES: a token is the only secret a client
    needs, and a short one falls to guessing (raises ValueError, fit for one line)."""
    short = [name for name, length in tenants.token_lengths() if length < MIN_TOKEN_BYTES]
    if short and tenants.one_token:
        raise ValueError(
            "%s: the token is shorter than %d bytes, short enough to guess: use a long "
            "random token, e.g. from 'openssl rand -hex 16'" % (source, MIN_TOKEN_BYTES)
        )
    if short:
        raise ValueError(
            "%s: the token%s of %s %s shorter than %d bytes, short enough to guess: "
            "use long random tokens, e.g. from 'openssl rand -hex 16'"
            % (
                source,
                "s" if len(short) > 1 else "",
                ", ".join(short),
                "are" if len(short) > 1 else "is",
                MIN_TOKEN_BYTES,
            )
        )


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def tenant_number(name: str) -> int:
    """The store's number for tenant ``name``: 63 bits of its SHA-256, never 0 (no tenant).

    Taken from the name, not the line, so leases kept across a restart stay with their
    tenant however the token file is reordered, and a removed tenant's reach nobody.
    """
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 1 or 1


TOKEN_FILE_LIMIT = 1 << 20  # bytes: room for thousands of tenants


def load_tenants(path: Optional[str], environ: Dict[str, str]) -> Optional[Tenants]:
    """The tenants of ``--token-file``, else the one token of $MEMLEASE_TOKEN, else None.

    Raises OSError or ValueError with a message fit for one line.
    """
    if path is None:
        token = environ.get("MEMLEASE_TOKEN", "")
        if not token:
            return None
        tenants = Tenants.single(token.encode())
        tenants.source = "token: one, from $MEMLEASE_TOKEN"
        check_token_lengths(tenants, "$MEMLEASE_TOKEN")
        return tenants
    with open(path, "rb") as file:
        data = file.read(TOKEN_FILE_LIMIT + 1)  # /dev/zero, say, must not fill the memory
    if len(data) > TOKEN_FILE_LIMIT:
        raise ValueError("the token file %s is over %d bytes" % (path, TOKEN_FILE_LIMIT))
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise ValueError("the token file %s is not UTF-8 text" % path) from None
    tenants = Tenants.parse(text, "the token file %s" % path)
    tenants.source = "token file %s read as %s" % (
        path,
        "one token (a single line; a file of one tenant needs a comment line)"
        if tenants.one_token
        else "%d tenant%s" % (len(tenants), "" if len(tenants) == 1 else "s"),
    )
    check_token_lengths(tenants, "the token file %s" % path)
    return tenants


# Sources and the allow list.


def source_of(peer: object) -> str:
    """The key limits count by: the host of a peer (an IPv6 /64), without its port.

    A peer is an accepted socket's address, or an object with an ``address`` attribute
    holding one (the server's Peer); anything else counts by its text.
    """
    address = getattr(peer, "address", peer)
    if not isinstance(address, tuple):
        return str(address)
    return _source_of_host(address[0])


@functools.lru_cache(maxsize=LIMITER_KEYS)
def _source_of_host(host: str) -> str:
    """source_of for an IP host; cached, as parsing an address costs more than a request."""
    ip = _ip(host)
    if ip is None:
        return host
    if ip.version == 6:
        return str(ipaddress.ip_network("%s/64" % ip, strict=False))
    return str(ip)


def _ip(host: str) -> Optional[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]]:
    """The address of ``host``; an IPv4-mapped IPv6 address as the IPv4 address it is."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class AllowList:
    """The networks a server without a token serves (protected mode)."""

    def __init__(self, networks: Sequence[IPNetwork]) -> None:
        self.networks = tuple(networks)
        # Parsing an address costs more than a request: a verdict per host is kept.
        self._allows_host = functools.lru_cache(maxsize=LIMITER_KEYS)(self._judge_host)

    @classmethod
    def parse(cls, text: str) -> "AllowList":
        """``CIDR[,CIDR...]``; raises ValueError naming the part that is not a network."""
        networks = []
        for part in text.split(","):
            try:
                networks.append(ipaddress.ip_network(part.strip(), strict=False))
            except ValueError:
                raise ValueError("%r is not an address or a network (CIDR)" % part) from None
        return cls(networks)

    def allows(self, address: object) -> bool:
        """Whether the peer at ``address`` (from accept) may be served; local sockets may."""
        if not isinstance(address, tuple):
            return True
        return self._allows_host(address[0])

    def _judge_host(self, host: str) -> bool:
        ip = _ip(host)
        return ip is not None and any(ip in network for network in self.networks)

    def __str__(self) -> str:
        return ",".join(str(network) for network in self.networks)


# Rate limits.


class RateLimiter:
    """``limit`` events per ``period`` seconds per key, as a token bucket per key.

    The table holds at most ``max_keys`` keys; a full bucket is as good as no entry and is
    dropped to make room.  If the table is still full, new keys share one bucket, so an
    attacker with many addresses is limited as a whole instead of growing our memory.
    """

    SHARED = "(others)"

    def __init__(
        self,
        limit: int,
        period: float = 60.0,
        *,
        max_keys: int = LIMITER_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.rate = limit / period
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: Dict[str, Tuple[float, float]] = {}  # key -> (tokens, as of when)

    def allowed(self, key: str) -> bool:
        """Whether one more event from ``key`` is within its limit (nothing is used up)."""
        if not self._buckets:  # nothing counted yet: the usual case, decided at once
            return True
        return self._tokens(self._key(key), self.clock()) >= 1.0

    def take(self, key: str) -> bool:
        """Count one event from ``key``; False when it was over the limit."""
        key = self._key(key)
        now = self.clock()
        tokens = self._tokens(key, now)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return True
        self._buckets[key] = (tokens, now)
        return False

    def _tokens(self, key: str, now: float) -> float:
        entry = self._buckets.get(key)
        if entry is None:
            return float(self.limit)
        tokens, when = entry
        return min(self.limit, tokens + (now - when) * self.rate)

    def _key(self, key: str) -> str:
        buckets = self._buckets
        if key in buckets or len(buckets) < self.max_keys:
            return key
        now = self.clock()
        for old in [k for k in buckets if self._tokens(k, now) >= self.limit]:
            del buckets[old]
        return key if len(buckets) < self.max_keys else self.SHARED

    def __len__(self) -> int:
        return len(self._buckets)


class Backoff:
    """A delay per key that grows with its failures in a window of ``period`` seconds.

    The first ``free`` failures cost nothing, then each waits twice as long as the one
    before, from ``first`` up to ``most`` seconds.  The table holds at most ``max_keys``
    keys (a finished window is as good as no entry); past that, new keys share one entry.
    """

    SHARED = RateLimiter.SHARED

    def __init__(
        self,
        free: int = WRONG_TOKENS_FREE,
        first: float = WRONG_TOKEN_FIRST_DELAY,
        most: float = WRONG_TOKEN_MAX_DELAY,
        period: float = 60.0,
        *,
        max_keys: int = LIMITER_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.free = free
        self.first = first
        self.most = most
        self.period = period
        self.max_keys = max_keys
        self.clock = clock
        self._windows: Dict[str, Tuple[float, int]] = {}  # key -> (window start, failures)

    def failed(self, key: str) -> float:
        """Count a failure of ``key``; the seconds its answer is to wait."""
        now = self.clock()
        key = self._key(key, now)
        start, failures = self._windows.get(key, (now, 0))
        if now - start >= self.period:
            start, failures = now, 0
        failures += 1
        self._windows[key] = (start, failures)
        if failures <= self.free:
            return 0.0
        return min(self.first * 2.0 ** min(failures - self.free - 1, 64), self.most)

    def _key(self, key: str, now: float) -> str:
        windows = self._windows
        if key in windows or len(windows) < self.max_keys:
            return key
        for old in [k for k, (start, _) in windows.items() if now - start >= self.period]:
            del windows[old]
        return key if len(windows) < self.max_keys else self.SHARED

    def __len__(self) -> int:
        return len(self._windows)


def guessing(misses: int, requests: int) -> bool:
    """Whether a connection's lease-id misses dominate its traffic: it is guessing ids.

    An honest client misses too (its lease expired), so only a run of misses that is
    most of what the connection does counts.
    """
    return misses >= GUESS_MIN_MISSES and misses * 100 > requests * GUESS_MISS_PERCENT


class LogLimiter:
    """At most ``burst`` warnings of one kind from one source per ``period`` seconds.

    What is held back is counted and reported as one "N more suppressed" line: with the
    next warning of that kind and source after its period, or by ``flush()`` with any
    warning once the period is over.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = 3,
        period: float = 60.0,
        max_keys: int = LIMITER_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.burst = burst
        self.period = period
        self.max_keys = max_keys
        self.clock = clock
        # (kind, source) -> [window start, lines logged, lines suppressed], oldest first.
        self._windows: collections.OrderedDict[Tuple[str, str], List[float]] = (
            collections.OrderedDict()
        )
        self.suppressed = 0  # in all: stats show it as log_lines_suppressed

    def warning(self, kind: str, source: str, message: str, *args: object) -> bool:
        """Log ``message % args`` unless over the limit; True if it was logged."""
        now = self.clock()
        self.flush(now)
        key = (kind, source)
        window = self._windows.get(key)
        if window is None:
            if len(self._windows) >= self.max_keys:
                self._report(*self._windows.popitem(last=False))
            window = self._windows[key] = [now, 0, 0]
        if window[1] >= self.burst:
            window[2] += 1
            self.suppressed += 1
            return False
        window[1] += 1
        self.logger.warning(message, *args)
        return True

    def flush(self, now: Optional[float] = None) -> None:
        """Report and forget the windows whose period is over."""
        if now is None:
            now = self.clock()
        windows = self._windows
        while windows:
            key, window = next(iter(windows.items()))
            if now - window[0] < self.period:
                break
            del windows[key]
            self._report(key, window)

    def _report(self, key: Tuple[str, str], window: List[float]) -> None:
        if window[2]:
            source = " from %s" % key[1] if key[1] else ""
            self.logger.warning(
                "%d more %s warnings%s suppressed in %gs", window[2], key[0], source, self.period
            )


# TLS.


def server_tls_context(
    cert_file: str, key_file: Optional[str] = None, ca_file: Optional[str] = None
) -> ssl.SSLContext:
    """A server context: TLS 1.2 at least; with ``ca_file``, clients must show a certificate.

    Raises ValueError with a one-line message when a file cannot be used.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
        if ca_file is not None:
            context.load_verify_locations(cafile=ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ValueError("cannot use the TLS files: %s" % (exc.strerror or exc)) from None
    return context


# Privileges.


def resolve_user(name: Optional[str]) -> Optional[pwd.struct_passwd]:
    """The account to run as: ``--user NAME``, or ``nobody`` when started as root.

    None when there is nothing to switch to (not root, and no --user).  Raises ValueError
    naming an account that does not exist.
    """
    if name is None and os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(name or "nobody")
    except KeyError:
        raise ValueError("no such user: %r (choose one with --user)" % (name or "nobody")) from None


def _switching(account: Optional[pwd.struct_passwd]) -> bool:
    return account is not None and os.geteuid() == 0 and account.pw_uid != 0


def check_writable(
    account: Optional[pwd.struct_passwd], path: str, purpose: str = "where the state is saved"
) -> None:
    """Make sure ``account`` will be able to replace or remove ``path`` after the drop (a
    state file saved at stop, a socket file removed), so a misconfiguration is refused at
    start, not found at the stop; ``purpose`` says what the directory is for.

    Checked as the account for a moment (effective ids; root's are restored); raises
    PermissionError.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            "the directory %s, %s, does not exist: create it first" % (directory, purpose)
        )
    if account is None or not _switching(account):
        return
    os.setgroups([])  # dropped for good later anyway
    os.setegid(account.pw_gid)
    os.seteuid(account.pw_uid)
    try:
        allowed = os.access(directory, os.W_OK | os.X_OK, effective_ids=True)
    finally:
        os.seteuid(0)
        os.setegid(0)
    if not allowed:
        raise PermissionError(
            "user %s cannot write in %s, %s: give it the directory, or choose --user"
            % (account.pw_name, directory, purpose)
        )


def hand_over(account: Optional[pwd.struct_passwd], path: str) -> None:
    """Give a file made as root (the Unix socket) to the account the server becomes, so its
    mode speaks of that user and group, and the user may remove it at the stop even from a
    sticky directory such as /tmp.  The path itself is changed, never what it may link to."""
    if account is not None and _switching(account):
        os.chown(path, account.pw_uid, account.pw_gid, follow_symlinks=False)


def drop_privileges(
    account: Optional[pwd.struct_passwd], owned: Sequence[str], logger: logging.Logger
) -> None:
    """Become ``account`` for good if running as root: its group, no supplementary groups.

    ``owned`` are files the server keeps writing after the drop: they are given to it,
    through a descriptor checked as the store checks them, never by a path that may lead
    elsewhere.
    """
    if account is None:
        return
    if os.geteuid() != 0:
        if account.pw_uid != os.geteuid():
            logger.warning("not started as root: --user %s ignored", account.pw_name)
        return
    if account.pw_uid == 0:
        logger.warning(
            "running as root (--user %s): a flaw would give away the host", account.pw_name
        )
        return
    for path in owned:
        try:
            fd = open_state_file(path, os.O_RDONLY, account.pw_uid)
        except FileNotFoundError:
            continue
        try:
            os.fchown(fd, account.pw_uid, account.pw_gid)
        finally:
            os.close(fd)
    os.setgroups([])
    os.setgid(account.pw_gid)
    os.setuid(account.pw_uid)
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:  # pragma: no cover - a kernel that lets us back would make the drop worthless
        raise RuntimeError("could not drop root: setuid(0) still works")
    logger.info("running as user %s (uid %d, gid %d)", account.pw_name, os.getuid(), os.getgid())
