"""Slices of a buffer laid out at a fixed stride: how the fast path addresses the packets of a run.

A run's packets sit back to back in one buffer, each `stride` bytes apart (a sealed run's datagrams, an
opened run's plaintexts, a segmented superpacket's slots). Per-packet views are taken with
`map(buffer.__getitem__, strided(...))`, so no bytecode runs per packet; the slices themselves depend
only on the run's shape, which repeats from run to run, so they are built once per shape.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1024)
def strided(start: int, stride: int, length: int, count: int) -> tuple[slice, ...]:
    """`count` slices of `length` bytes, the first at `start`, each `stride` after the one before."""
    return tuple(slice(start + i * stride, start + i * stride + length) for i in range(count))
