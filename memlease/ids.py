"""Lease ids: random version 4 UUIDs, and the 32-bit short ids of the original's leases.

A UUID is 122 random bits, so it is a capability: nobody finds one by guessing, and two
never meet in practice (the store still checks against the live leases).  A short id
is only 31 bits, so randomness alone would hand one out again after its lease ended,
and a stale holder would reach somebody else's lease.  Short ids are therefore a
counter run through a keyed permutation of 1..2^31-1: distinct for every count, hard to
predict without the key.  The key and the counter are kept across warm restarts, so an
id never comes back in a server's life; after 2^31-1 of them, there are no more.
"""

import hashlib
import secrets
import struct
import sys
from array import array
from typing import Optional, Tuple

SHORT_ID_MAX = 2**31 - 1
KEY_SIZE = 16
HALVES = struct.Struct(">QQ")  # a UUID's bytes as two big-endian 64-bit numbers
_VERSION_MASK = 0xF000  # the version nibble, in the first half
_VERSION_4 = 0x4000
_VARIANT_SHIFT = 62  # the variant's two bits, at the top of the second half
_RFC_4122_VARIANT = 0b10
_ROUNDS = 4
_HALF_BITS = 16
_HALF_MASK = (1 << _HALF_BITS) - 1


def random_uuid() -> Tuple[int, int]:
    """A random version 4 UUID, as the two halves of its bytes."""
    high, low = HALVES.unpack(secrets.token_bytes(16))
    high = (high & ~_VERSION_MASK) | _VERSION_4
    low = (low & ((1 << _VARIANT_SHIFT) - 1)) | (_RFC_4122_VARIANT << _VARIANT_SHIFT)
    return high, low


# The byte of a half, as a column of 8-byte numbers holds it, that carries the version
# nibble (of the first half) or the variant bits (of the second), by the host's order.
_VERSION_BYTE, _VARIANT_BYTE = (1, 7) if sys.byteorder == "little" else (6, 0)
_VERSION_4_BYTES = bytes(range(0x40, 0x50))  # 0100 xxxx
_RFC_4122_BYTES = bytes(range(0x80, 0xC0))  # 10xx xxxx


def all_uuid4(highs: "array[int]", lows: "array[int]") -> bool:
    """Whether every pair of halves (two columns of 8-byte numbers) is a version 4 UUID
    of RFC 4122's variant: checked a byte of each half at a time, in C."""
    versions = highs.tobytes()[_VERSION_BYTE::8]
    variants = lows.tobytes()[_VARIANT_BYTE::8]
    return not versions.translate(None, _VERSION_4_BYTES) and not variants.translate(
        None, _RFC_4122_BYTES
    )


class ShortIds:
    """Short ids that never repeat: a Feistel permutation of the 32-bit numbers, keyed at
    random, applied to a counter, walking the cycle until it lands in 1..2^31-1 (which
    keeps it a permutation of that range)."""

    def __init__(self, key: Optional[bytes] = None, issued: int = 0) -> None:
        self.key = secrets.token_bytes(KEY_SIZE) if key is None else key
        self.issued = issued  # how many counts have been used

    def next(self) -> int:
        """A short id never given before, or 0 once all 2^31-1 have been given."""
        if self.issued >= SHORT_ID_MAX:
            return 0
        self.issued += 1
        value = self.issued
        while True:
            value = self._permute(value)
            if 0 < value <= SHORT_ID_MAX:
                return value

    def _permute(self, value: int) -> int:
        left, right = value >> _HALF_BITS, value & _HALF_MASK
        for round_number in range(_ROUNDS):
            left, right = right, left ^ self._round(round_number, right)
        return (left << _HALF_BITS) | right

    def _round(self, round_number: int, half: int) -> int:
        digest = hashlib.blake2b(
            bytes((round_number, half >> 8, half & 0xFF)), key=self.key, digest_size=2
        ).digest()
        return int.from_bytes(digest, "big")
