"""Sizes in bytes as people type and read them: ``2048``, ``64K``, ``16M``, ``2G``.

Shared by the server's and the client's command lines, so that a size the server
takes for its pool is taken by the client for a lease too.
"""

import argparse
import re

_SIZE = re.compile(r"^(\d+)([KMGT]?)$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_NAMES = (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))
_DURATION = re.compile(r"^(\d+)(ms|s|m|h)?$", re.IGNORECASE)
_MS_PER = {"": 1, "ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}


def parse_size(text: str) -> int:
    """Bytes from ``2048``, ``64K``, ``16M`` or ``2G`` (powers of 1024).

    Raises argparse.ArgumentTypeError, so that it serves as an argparse ``type``.
    """
    match = _SIZE.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(
            "%r is not a size: use bytes, or a number with K, M, G or T" % text
        )
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def parse_duration_ms(text: str) -> int:
    """Milliseconds from ``500ms``, ``5s``, ``2m`` or ``1h``; a bare number is milliseconds,
    as the seed has it.  Raises argparse.ArgumentTypeError, to serve as an argparse type."""
    match = _DURATION.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(
            "%r is not a duration: use milliseconds, or a number with ms, s, m or h" % text
        )
    return int(match.group(1)) * _MS_PER[(match.group(2) or "").lower()]


def format_size(size: int) -> str:
    """``2048 bytes``, or ``16 MiB`` when the size is a whole number of a unit."""
    for name, unit in _NAMES:
        if size >= unit and size % unit == 0:
            return "%d %s" % (size // unit, name)
    return "%d byte%s" % (size, "" if size == 1 else "s")
