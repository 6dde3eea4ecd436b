"""Runs: many packets of one flow handled as one object on the offload fast path (issue 6).

A TCP superpacket from the TUN becomes one `TxRun` (its segments, each already followed by its ESP
trailer, laid out in one buffer), is sealed by `SecurityAssociation.seal_run` into a `Burst` (one
buffer for UDP GSO sends), and a UDP GRO receive that opens in one piece
(`SecurityAssociation.open_run`) becomes one `RxRun` that the TUN writes as one coalesced superpacket.
Everything per packet happens inside C-level `map` calls and NumPy column operations, so Python pays
per run, not per packet. Anything that does not fit a run takes the per-packet path, which stays the
reference for behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class TxRun:
    """Segments of one superpacket, all to `dst` (16 bytes, the inner IPv6 destination): each slot is an
    inner packet followed by its ESP trailer (`crypto.esp.trailer`). `nbytes` counts the inner bytes."""

    dst: bytes
    slots: list[memoryview | bytes]
    nbytes: int

    def packets(self) -> list[bytes]:
        """The inner packets without their trailers (for the slow paths: staging before a handshake)."""
        return [bytes(s[: len(s) - 2 - s[-2]]) for s in self.slots]


@dataclass(slots=True)
class RxRun:
    """Opened packets of one security association from one source: packet i is
    `arena[i * stride : i * stride + lengths[i]]`."""

    arena: bytearray | memoryview
    stride: int
    lengths: list[int]

    def packets(self) -> list[bytes]:
        return [bytes(v) for v in self.views()]

    def views(self) -> list[memoryview]:
        """The packets as views of the arena (no copy), for writing them out one by one."""
        mv = memoryview(self.arena)
        st = self.stride
        return [mv[i * st : i * st + n] for i, n in enumerate(self.lengths)]


@dataclass(slots=True)
class Burst:
    """Datagrams back to back in one buffer, each `size` bytes but the last, which may be shorter: what
    one UDP GSO `sendmsg` takes as a single iovec (or several, split every 64 KB)."""

    buf: memoryview
    size: int

    def datagrams(self) -> list[bytes]:
        return [bytes(self.buf[o : o + self.size]) for o in range(0, len(self.buf), self.size)]
