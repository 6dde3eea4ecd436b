"""Runs: many packets of one flow handled as one object, so Python pays per run, not per packet.

A TCP superpacket from the TUN becomes one `TxRun`, is sealed in place into one `Burst` (one buffer for
UDP GSO sends), and a UDP GRO receive that opens in one piece becomes one `RxRun`, written to the TUN as one
coalesced superpacket. Runs travel in their own lists beside the loose packets of the same batch; a
run's `at` is the number of those loose packets that come before it, so that order is kept without
mixing the two kinds in one list (docs/fastpath.md).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Burst", "RxRun", "TxRun", "interleave"]


@dataclass(slots=True)
class TxRun:
    """Segments of one superpacket, all to `dst` (16 bytes, the inner IPv6 destination), laid out where the
    datagrams that will carry them go (`SealLayout`): plaintext i, an inner packet and its ESP trailer, is
    `buf[i * stride + head:]`, `stride - head - tail` bytes long (`last` for the last one), so that sealing
    is in place and the sealed buffer is one UDP GSO send. `nbytes` counts the inner bytes."""

    dst: bytes
    buf: bytearray | memoryview
    head: int
    tail: int
    stride: int
    count: int
    last: int
    nbytes: int
    at: int = 0

    def plaintexts(self) -> list[memoryview]:
        """Each plaintext as a view of the buffer (for the reference seal and the tests)."""
        mv = memoryview(self.buf)
        st, h, full = self.stride, self.head, self.stride - self.head - self.tail
        return [mv[i * st + h : i * st + h + (full if i < self.count - 1 else self.last)]
                for i in range(self.count)]

    def packets(self) -> list[bytes]:
        """The inner packets without their trailers (for the slow paths: staging before a handshake)."""
        return [bytes(s[: len(s) - 2 - s[-2]]) for s in self.plaintexts()]


@dataclass(slots=True)
class RxRun:
    """Opened packets of one security association from one source: packet i is
    `arena[i * stride : i * stride + lengths[i]]`."""

    arena: bytearray | memoryview
    stride: int
    lengths: list[int]
    at: int = 0

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
    at: int = 0

    def datagrams(self) -> list[bytes]:
        return [bytes(self.buf[o : o + self.size]) for o in range(0, len(self.buf), self.size)]


def interleave(loose: list[bytes], runs: list[RxRun]) -> list[bytes]:
    """Loose packets and runs' packets in their order (by each run's `at`): for slow paths and tests."""
    out: list[bytes] = []
    prev = 0
    for run in runs:
        out += loose[prev : run.at]
        out += run.packets()
        prev = max(prev, run.at)
    out += loose[prev:]
    return out
