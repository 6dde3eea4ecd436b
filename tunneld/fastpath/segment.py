"""Segmentation: one GSO superpacket read from the TUN becomes MTU-sized, independently valid packets,
as the kernel's ``tcp_gso_segment`` / ``inet_gso_segment`` would make them. `segment` works on anything
and is the reference; `segment_run` is the vectorised form for an IPv6 TCP superpacket, whose segments
it lays out for sealing in place (a `TxRun`)."""

from __future__ import annotations

from typing import Final

import numpy as np

from tunneld.crypto.layout import SealLayout
from tunneld.fastpath.headers import (
    CWR,
    FIN,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    NEEDS_CSUM,
    PSH,
    U16,
    U32,
    VnetHeader,
    csum,
    ones_sum,
    parse_tcp,
    pseudo_sum,
    row_sums,
    segment_sums,
    set_tcp_fields,
)
from tunneld.fastpath.runs import TxRun
from tunneld.proto.errors import ParseError

__all__ = ["NATIVE_TCP6", "complete", "segment", "segment_run"]


def segment(vnet: bytes | bytearray | memoryview, packet: bytes, mss: int | None = None) -> list[bytes]:
    """Turn one packet read from an IFF_VNET_HDR TUN into independently valid packets.

    ``vnet`` is the 10-byte virtio-net header that preceded ``packet``. For ``GSO_TCPV4``/``GSO_TCPV6``
    the TCP payload is split every ``gso_size`` bytes (or ``min(gso_size, mss)`` when ``mss`` is given,
    so a caller can enforce a smaller tunnel MTU); each segment gets a copy of the IP and TCP headers
    with the length fields, IPv4 ID (+1 per segment, as ``inet_gso_segment``) and header checksum, the
    sequence number and the flags (FIN/PSH last only, CWR first only, as ``tcp_gso_segment``) fixed,
    and a complete TCP checksum computed from scratch — whatever partial value the kernel left in the
    field is ignored, so we do not depend on which length it folded into the pseudo-header.

    ``GSO_NONE`` with ``NEEDS_CSUM``: the kernel left the checksum to us (CHECKSUM_PARTIAL, as for a
    NIC with TX checksum offload): the sum from ``csum_start`` to the end, which includes the
    pseudo-header sum the stack stored in the field, is folded and complemented into
    ``csum_start + csum_offset`` (as ``skb_checksum_help``); a result of 0 is sent as 0xFFFF, which is
    equivalent for TCP and mandatory for UDP (RFC 768, RFC 8200 §8.1). ``GSO_NONE`` without it: the
    packet as is.

    Raises ParseError for a truncated header or packet, an unknown GSO type, wrong IP version for the
    GSO type, or inconsistent lengths.
    """
    hdr = VnetHeader.decode(vnet)
    gso = hdr.gso_type & ~GSO_ECN
    if gso == GSO_NONE:
        if not hdr.flags & NEEDS_CSUM:
            return [packet]
        at = hdr.csum_start + hdr.csum_offset
        if at + 2 > len(packet) or hdr.csum_start >= len(packet):
            raise ParseError("bad csum offset")
        c = csum(ones_sum(memoryview(packet)[hdr.csum_start :])) or 0xFFFF
        return [packet[:at] + U16.pack(c) + packet[at + 2 :]]
    if gso not in (GSO_TCPV4, GSO_TCPV6):
        raise ParseError("unsupported gso type")
    version, ihl, thl = parse_tcp(packet)
    if (version == 6) != (gso == GSO_TCPV6):
        raise ParseError("gso type mismatch")
    size = hdr.gso_size if mss is None else min(hdr.gso_size, mss)
    if size <= 0:
        raise ParseError("bad gso size")
    hl = ihl + thl
    n = len(packet)
    mv = memoryview(packet)
    tmpl = bytearray(mv[:hl])
    seq = U32.unpack_from(tmpl, ihl + 4)[0]
    flags = tmpl[ihl + 13]
    # Sum of the TCP header with seq, flags and checksum cleared, plus the pseudo-header without length:
    # per segment only the varying words are added (no per-segment pass over the header).
    tmpl[ihl + 4 : ihl + 8] = bytes(4)
    tmpl[ihl + 13] = 0
    tmpl[ihl + 16 : ihl + 18] = bytes(2)
    base = (pseudo_sum(tmpl, version) + int.from_bytes(tmpl[ihl:hl], "big")) % 0xFFFF
    out: list[bytes] = []
    off = hl
    ip_id = ip_base = 0
    if version == 4:
        ip_id = U16.unpack_from(tmpl, 4)[0]
        tmpl[10:12] = bytes(2)
        ip_base = (int.from_bytes(tmpl[:ihl], "big") - ip_id - U16.unpack_from(tmpl, 2)[0]) % 0xFFFF
    sums = segment_sums(mv[hl:], size)
    i = 0
    while True:
        end = min(off + size, n)
        last = end >= n
        f = flags
        if i:
            f &= ~CWR
        if not last:
            f &= ~(FIN | PSH)
        s = (seq + i * size) & 0xFFFFFFFF
        tcp_len = thl + end - off
        payload = mv[off:end]
        set_tcp_fields(tmpl, ihl, base, s, f, tcp_len, sums[i])
        if version == 6:
            U16.pack_into(tmpl, 4, tcp_len)
        else:
            iid = (ip_id + i) & 0xFFFF
            tot = ihl + tcp_len
            U16.pack_into(tmpl, 2, tot)
            U16.pack_into(tmpl, 4, iid)
            U16.pack_into(tmpl, 10, csum(ip_base + tot + iid))
        out.append(bytes(tmpl) + payload)
        if last:
            break
        off = end
        i += 1
    return out



try:
    import tunneld.fastpath._tcp6 as _tcp6
except ImportError:  # not built (no compiler): the NumPy form below runs
    _tcp6 = None  # type: ignore[assignment]

NATIVE_TCP6: Final = _tcp6 is not None
"""Whether the C segmenter and coalescer are built (`segment_run` and `coalesce_run` use them)."""

def complete(vnet: bytes | bytearray | memoryview, packet: bytes | bytearray | memoryview) -> bytes | None:
    """The fast form of `segment` for a packet that is not a superpacket (GSO_NONE): the packet with the
    checksum left to us completed (the C form), or as it is when none was left. None when this does not
    apply or cannot be done here: the caller then takes `segment`, the reference, which also says what
    is malformed (tests/unit/test_tcp6_native.py)."""
    if vnet[1]:
        return None
    if _tcp6 is not None:
        return _tcp6.complete(vnet, packet)
    return None if vnet[0] & NEEDS_CSUM else bytes(packet)


_STEPS: dict[tuple[int, int], np.ndarray] = {}  # (segments, size) -> sequence offsets 0, size, 2*size...


def segment_run(vnet: bytes | bytearray | memoryview, packet: bytes | bytearray | memoryview,
                layout: SealLayout, native: bool = True) -> TxRun | None:
    """`segment` for an IPv6 TCP superpacket, each segment laid out for sealing in place (a `TxRun`:
    `layout.head` bytes before it, its trailer `layout.trailer(length)` and `layout.tail` bytes after it).
    The segments are byte for byte those of `segment` (tests/unit/test_runs.py, test_tcp6_native.py).

    The C form (`tunneld.fastpath._tcp6`, where built; `native=False` skips it) does it in one call;
    the NumPy form writes all full-sized segments at a fixed stride and the per-segment fields (sequence
    number, payload length, flags, checksum) as columns, and builds the short last segment, if any, with
    the scalar code.

    Returns None when the packet is not an IPv6 TCP GSO packet of at least two full segments (the caller
    uses `segment`, which raises ParseError for anything malformed)."""
    if native and _tcp6 is not None:
        got = _tcp6.segment(vnet, packet, layout.head, layout.tail, layout.next_header)
        if got is None:
            return None
        buf, stride, count, last = got
        hl = 40 + (packet[52] >> 4) * 4
        return TxRun(bytes(packet[24:40]), buf, layout.head, layout.tail, stride, count, last,
                     len(packet) + (count - 1) * hl)
    return _segment_run_numpy(vnet, packet, layout)


def _segment_run_numpy(vnet: bytes | bytearray | memoryview, packet: bytes | bytearray | memoryview,
                       layout: SealLayout) -> TxRun | None:
    hdr = VnetHeader.decode(vnet)
    if hdr.gso_type & ~GSO_ECN != GSO_TCPV6:
        return None
    try:
        version, ihl, thl = parse_tcp(packet)
    except ParseError:
        return None
    size = hdr.gso_size
    hl = ihl + thl
    n = len(packet)
    k = (n - hl) // size if size > 0 else 0
    if version != 6 or k < 2 or size & 1:
        return None
    rem = n - hl - k * size
    length = hl + size
    trailer = layout.trailer
    tr = trailer(length)
    head = layout.head
    stride = head + length + len(tr) + layout.tail
    tcp_len = thl + size
    flags = packet[53]
    mid = flags & ~(CWR | FIN | PSH)
    first = flags & ~(FIN | PSH)
    last = flags & ~CWR
    tmpl = bytearray(packet[:hl])
    seq0 = U32.unpack_from(tmpl, 44)[0]
    U16.pack_into(tmpl, 4, tcp_len)
    tmpl[44:48] = bytes(4)
    tmpl[53] = 0
    tmpl[56:58] = bytes(2)
    base = (pseudo_sum(tmpl, 6) + int.from_bytes(tmpl[40:hl], "big")) % 0xFFFF
    tail_pt = b""
    if rem:
        payload = memoryview(packet)[hl + k * size :]
        end = bytearray(tmpl)
        U16.pack_into(end, 4, thl + rem)
        set_tcp_fields(end, 40, base, (seq0 + k * size) & 0xFFFFFFFF, last, thl + rem, ones_sum(payload))
        tail_pt = b"".join((end, payload, trailer(hl + rem)))
    count = k + (rem > 0)
    plast = len(tail_pt) if rem else length + len(tr)
    buf = np.empty((count - 1) * stride + head + plast + layout.tail, np.uint8)
    a = np.ndarray((k, stride), np.uint8, buf, 0)[:, head:]  # the full segments' rows, from the plaintext on
    a[:, :hl] = np.frombuffer(tmpl, np.uint8)
    pay = np.frombuffer(packet, np.uint8, k * size, hl).reshape(k, size)
    a[:, hl:length] = pay
    a[:, length:length + len(tr)] = np.frombuffer(tr, np.uint8)
    steps = _STEPS.get((k, size))
    if steps is None:
        if len(_STEPS) > 256:
            _STEPS.clear()
        steps = _STEPS[k, size] = np.arange(k, dtype=np.uint32) * np.uint32(size)
    seqs = steps + np.uint32(seq0)  # uint32: wraps mod 2**32 as TCP's
    np.ndarray((k,), ">u4", buf, head + 44, (stride,))[:] = seqs  # the column, written big-endian in place
    a[:, 53] = mid
    # Payload sums per row, plus sequence number (≡ its two 16-bit words, mod 0xFFFF) and the constants,
    # reduced once; each step in place (no temporaries).
    tot = row_sums(pay, size)
    tot += seqs
    tot += np.uint64(base + tcp_len + mid)
    if first != mid:
        a[0, 53] = first
        tot[0] += first - mid
    if not rem and last != mid:
        a[k - 1, 53] = last
        tot[k - 1] += last - mid
    tot %= np.uint64(0xFFFF)
    np.subtract(np.uint64(0xFFFF), tot, out=tot)
    tot %= np.uint64(0xFFFF)  # (-sum) mod 0xFFFF: 0, not 0xFFFF, for a sum ≡ 0 (as csum)
    np.ndarray((k,), ">u2", buf, head + 56, (stride,))[:] = tot
    if rem:
        buf[k * stride + head : k * stride + head + plast] = np.frombuffer(tail_pt, np.uint8)
    return TxRun(bytes(packet[24:40]), buf.data.cast("B"), head, layout.tail, stride, count, plast,
                 n + (count - 1) * hl)
