"""How the fast path lays packets out: slices at a fixed stride, and the layout a seal expects.

A run's packets sit back to back in one buffer, each `stride` bytes apart (a sealed run's datagrams, an
opened run's plaintexts, a segmented superpacket's slots). Per-packet views are taken with
`map(buffer.__getitem__, strided(...))`, so no bytecode runs per packet; the slices themselves depend
only on the run's shape, which repeats from run to run, so they are built once per shape.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass


@functools.lru_cache(maxsize=1024)
def strided(start: int, stride: int, length: int, count: int) -> tuple[slice, ...]:
    """`count` slices of `length` bytes, the first at `start`, each `stride` after the one before."""
    return tuple(slice(start + i * stride, start + i * stride + length) for i in range(count))


@dataclass(frozen=True, slots=True)
class SealLayout:
    """What code that lays plaintexts out for sealing in place must know of the seal, handed to it by the
    security association so that it need not import the cipher's module: the bytes that follow an inner
    packet of a given length in its plaintext (padding to the cipher's alignment, pad length, next
    header; `next_header` is that last byte), the most bytes sealing adds to an inner packet, and the
    room a datagram keeps before its plaintext (`head`: the ESP header) and after it (`tail`: the ICV)."""

    trailer: Callable[[int], bytes]
    overhead: int
    head: int
    tail: int
    next_header: int
