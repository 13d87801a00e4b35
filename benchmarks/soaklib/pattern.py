"""Deterministic test data: the byte at stream position `i` is a function of `i` alone.

Both ends of a stream (a soak client and a soak backend) can produce or check any stretch of
it without keeping what was sent, so a lost, duplicated, reordered or altered byte shows up.
"""

from __future__ import annotations

# A prime period, so that the pattern never lines up with power-of-two chunk or buffer sizes
# (a dropped 64 KiB chunk does not look like the data after it).
PERIOD = 65521
MAX_SLICE = 256 * 1024
_BASE = bytes((i * 7 + (i >> 8) + ((i * i) >> 13)) & 0xFF for i in range(PERIOD))
# Long enough that any slice of up to MAX_SLICE bytes starting inside one period is one copy.
_TILE = _BASE * (2 + MAX_SLICE // PERIOD)


def start_offset(seed: int) -> int:
    """Where a stream with this seed starts in the pattern (streams differ from one another)."""
    return (seed * 40503) % PERIOD


def pattern(offset: int, n: int) -> bytes:
    """`n` bytes of the pattern from stream position `offset`."""
    if n <= MAX_SLICE:
        start = offset % PERIOD
        return _TILE[start : start + n]
    parts = []
    while n > 0:
        take = min(n, MAX_SLICE)
        start = offset % PERIOD
        parts.append(_TILE[start : start + take])
        offset += take
        n -= take
    return b"".join(parts)


def mismatched(data: bytes, offset: int) -> int:
    """How many bytes of `data` differ from the pattern at `offset` (0 when all match)."""
    expected = pattern(offset, len(data))
    if data == expected:
        return 0
    return sum(1 for a, b in zip(data, expected, strict=True) if a != b)
