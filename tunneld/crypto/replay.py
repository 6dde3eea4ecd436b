"""Anti-replay window for ESP with 64-bit extended sequence numbers.

The window is the RFC 6479 bitmap: a ring of 64-bit blocks indexed by `seq >> 6`, so sliding the
window clears whole blocks instead of shifting a bit string (RFC 4303 §3.4.3 only asks for >= 32;
we keep 8128, as WireGuard does, so reordering by GRO/GSO batches and multi-queue NICs is harmless).

The check is split in two on purpose (RFC 4303 §3.4.3, §3.4.4): `check` is a cheap look before the
ICV is verified, `commit` marks the bit and slides the window only after it verified. A window
that slid on an unauthenticated packet would let one forged high sequence number blind the receiver.

With ESN only the low 32 bits travel; `infer` recovers the high half (RFC 4303 Appendix A2).
"""

from __future__ import annotations

from typing import Final

BLOCK_BITS: Final = 64
DEFAULT_BLOCKS: Final = 128  # power of two; window = (blocks - 1) * 64 = 8128 packets
_M32: Final = 0xFFFFFFFF
_M64: Final = 0xFFFFFFFFFFFFFFFF


class ReplayWindow:
    """Receive-side window of one SA. Sequence number 0 is never valid (the first packet is 1)."""

    __slots__ = ("_blocks", "_mask", "esn", "limit", "top", "window")

    def __init__(self, esn: bool = True, blocks: int = DEFAULT_BLOCKS) -> None:
        if blocks < 2 or blocks & (blocks - 1):
            raise ValueError("blocks must be a power of two >= 2")
        self._blocks = [0] * blocks
        self._mask = blocks - 1
        self.window = (blocks - 1) * BLOCK_BITS
        self.esn = esn
        # The highest sequence number a sender may use: the counter never cycles (RFC 4303 §3.3.3).
        self.limit = _M64 if esn else _M32
        self.top = 0  # highest authenticated sequence number; 0 = none yet

    def infer(self, seq_lo: int) -> int:
        """The full sequence number for the 32 bits on the wire (RFC 4303 Appendix A2)."""
        if not self.esn:
            return seq_lo
        top = self.top
        tl = top & _M32
        th = top >> 32
        w = self.window
        if tl >= w - 1:
            # Case A: the window lies inside one 2^32 subspace; a low number below it is the next subspace.
            return ((th + 1) << 32 | seq_lo) if seq_lo < tl - w + 1 else (th << 32 | seq_lo)
        # Case B: the window spans the boundary; a high number at or above its bottom is the previous
        # subspace. In subspace 0 there is no previous one, so such a packet is far ahead instead.
        if seq_lo >= (tl - w + 1) & _M32 and th > 0:
            return (th - 1) << 32 | seq_lo
        return th << 32 | seq_lo

    def check(self, seq: int) -> bool:
        """Would `seq` be accepted? Changes nothing; call before spending a decryption on it."""
        top = self.top
        if seq > top:
            return seq <= self.limit
        if seq == 0 or top - seq >= self.window:
            return False
        return not (self._blocks[(seq >> 6) & self._mask] >> (seq & 63)) & 1

    def commit(self, seq: int) -> bool:
        """Mark an authenticated `seq`; returns False (and changes nothing) if it is not acceptable."""
        top = self.top
        blocks = self._blocks
        mask = self._mask
        if seq > top:
            if seq > self.limit:
                return False
            cur = top >> 6
            new = seq >> 6
            # Clear the blocks the window slides over, at most the whole ring.
            for i in range(cur + 1, min(new, cur + mask + 1) + 1):
                blocks[i & mask] = 0
            self.top = seq
        elif seq == 0 or top - seq >= self.window:
            return False
        idx = (seq >> 6) & mask
        bit = 1 << (seq & 63)
        b = blocks[idx]
        if b & bit:
            return False
        blocks[idx] = b | bit
        return True

    def commit_run(self, first: int, count: int) -> None:
        """Mark the authenticated numbers `first` .. `first + count - 1`, all above `top`, in one pass
        per 64-bit block instead of one `commit` per packet (the in-order fast path of a GRO batch).

        The caller has checked that `first > top` and that the run stays within `limit`; a run longer
        than the window would wrap the ring onto itself, so it is refused."""
        if count <= 0 or count > self.window or first <= self.top or first + count - 1 > self.limit:
            raise ValueError("commit_run: not a run of fresh sequence numbers above the window")
        last = first + count - 1
        blocks = self._blocks
        mask = self._mask
        cur = self.top >> 6
        for i in range(cur + 1, min(last >> 6, cur + mask + 1) + 1):
            blocks[i & mask] = 0
        self.top = last
        s = first
        while s <= last:
            e = min(last, s | 63)  # the end of s's block, or of the run
            blocks[(s >> 6) & mask] |= ((1 << (e - s + 1)) - 1) << (s & 63)
            s = e + 1

    def snapshot(self) -> tuple[int, tuple[int, ...]]:
        """The whole state, for tests that assert a rejected packet left the window unchanged."""
        return self.top, tuple(self._blocks)
