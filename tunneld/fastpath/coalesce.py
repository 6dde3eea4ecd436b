"""Coalescing: consecutive TCP segments of a flow, about to be written to the TUN, merge into one GSO
superpacket per write, by the rules of the kernel's ``tcp_gro_receive`` (and wireguard-go's
tun/offload_linux.go). `coalesce` works on any packets and is the reference; `coalesce_run` is the
vectorised form for an opened run that is one in-order IPv6 TCP flow."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tunneld.crypto.layout import strided
from tunneld.fastpath.headers import (
    CWR,
    FIN,
    MAX_COALESCE_SEGMENTS,
    MAX_IP_PAYLOAD,
    NO_MERGE_FLAGS,
    NONE_HDR,
    PROTO_TCP,
    PSH,
    U16,
    U32,
    superpacket_headers,
)
from tunneld.fastpath.runs import RxRun

try:
    import tunneld.fastpath._tcp6 as _tcp6
except ImportError:  # not built (no compiler): the NumPy form runs
    _tcp6 = None  # type: ignore[assignment]

__all__ = ["coalesce", "coalesce_run"]


@dataclass(slots=True)
class _Run:
    """Segments of one flow being merged: first packet's header, payload views, merge state."""

    key: bytes
    first: bytes
    ihl: int
    thl: int
    version: int
    size: int  # payload bytes of the first segment = gso_size
    next_seq: int
    length: int  # IP-length-field value the merged packet would have so far
    payloads: list[memoryview]
    packets: list[bytes]
    last_flags: int
    ip_id: int
    df: bool
    closed: bool
    verified: bool


def _tcp_valid(packet: bytes, version: int, ihl: int) -> bool:
    """Whether the TCP checksum (and, for IPv4, the header checksum) verifies: the kernel's GRO only
    merges checksum-verified segments, and a merged packet gets a fresh checksum, so merging a corrupt
    segment would launder it.

    Only called for packets without IP options or extension headers, so the pseudo-header addresses
    (IPv6 bytes 8-40, IPv4 bytes 12-20) run straight into the TCP header at an even offset: one integer
    conversion and one modulo cover addresses and segment together (about 0.5 µs less per segment than
    summing the parts separately).
    """
    mv = memoryview(packet)
    if version == 4:
        if int.from_bytes(mv[:ihl], "big") % 0xFFFF:
            return False
        r = int.from_bytes(mv[12:], "big") % 0xFFFF
    else:
        r = int.from_bytes(mv[8:], "big") % 0xFFFF
    if len(packet) & 1:
        r <<= 8  # an odd tail is padded with a zero byte: the whole integer shifts by 8 bits
    # Reduce before adding: arithmetic on the ~1400-byte integer costs ~0.4 µs per operation.
    return (r + len(packet) - ihl + PROTO_TCP) % 0xFFFF == 0


def coalesce(packets: Sequence[bytes], *, verify: bool = True) -> list[tuple[bytes, bytes]]:
    """Merge consecutive TCP segments of each flow into GSO superpackets for one TUN write each.

    Returns ``(vnet_header, packet)`` pairs in arrival order of each output's first segment (order within a
    flow is kept; order between flows may change, as with the kernel's GRO). A segment joins the open run of
    its flow (same addresses and ports, same ACK number, same window, same TCP options bytes and data
    offset, same flags except FIN/PSH allowed on the last and CWR on the first, same IPv4 TOS/TTL/DF or IPv6
    traffic class/flow label/hop limit, IPv4 ID +1 per segment unless DF is set) when its sequence number is
    contiguous, its payload is no longer than the first's, the run has not ended (a shorter segment, PSH or
    FIN ends it) and the caps (``MAX_COALESCE_SEGMENTS`` segments, 65535 in the IP length field) hold. Only
    segments whose checksums verify are merged (``verify=False`` skips that check, about 2 µs per 1400-byte
    segment, for a caller that already knows the checksums are complete — but a merged packet gets a fresh
    checksum, so a segment that was corrupt before ESP sealed it would then be accepted by TCP; the default
    matches the kernel's GRO). SYN/RST/URG segments, empty segments, IP options, IPv6 extension headers,
    non-TCP and unparseable packets pass through unchanged with a ``GSO_NONE`` header (the kernel's own
    stack validates and drops garbage).

    A merged packet's TCP checksum field holds the pseudo-header sum (addresses, protocol and the merged
    TCP length; folded, not complemented) and the header says ``NEEDS_CSUM`` with ``csum_start`` at the
    TCP header and ``csum_offset`` 16. That is what a GSO write needs: ``tun_get_user`` →
    ``virtio_net_hdr_to_skb`` turns ``NEEDS_CSUM`` into CHECKSUM_PARTIAL via ``skb_partial_csum_set``,
    exactly the state the kernel's own GRO leaves a merged skb in (``tcp_gro_complete``), and
    ``tcp_gso_segment`` adjusts that pseudo-header value when it re-splits the packet for forwarding,
    while local delivery trusts CHECKSUM_PARTIAL. wireguard-go writes the same to its TUN. Constraints
    from ``virtio_net_hdr_to_skb`` that this satisfies: ``csum_offset`` must be 16 (the TCP checksum)
    for a TCP GSO type, ``csum_start + csum_offset + 2`` must lie within ``hdr_len``/the packet, and a
    packet whose payload is not larger than ``gso_size`` is silently treated as non-GSO (a merged packet
    always has at least two segments). ``GSO_ECN`` is set when the first segment carries CWR, so the
    kernel's re-segmentation keeps CWR on the first segment only (``SKB_GSO_TCP_ECN``).
    """
    if len(packets) == 1:  # merges with nothing (a lone ACK, mostly): no parsing
        return [(NONE_HDR, packets[0])]
    out: list[tuple[bytes, bytes]] = []  # a run's first packet alone until the run is merged below
    started: list[tuple[int, _Run]] = []  # (place in out, run)
    open_runs: dict[bytes, _Run] = {}
    for pkt in packets:
        n = len(pkt)
        if n < 40:
            out.append((NONE_HDR, pkt))
            continue
        b0 = pkt[0]
        if b0 == 0x45:
            if pkt[9] != PROTO_TCP or U16.unpack_from(pkt, 2)[0] != n:
                out.append((NONE_HDR, pkt))
                continue
            frag = U16.unpack_from(pkt, 6)[0]
            if frag & 0xBFFF:  # MF or a fragment offset (or the reserved bit)
                out.append((NONE_HDR, pkt))
                continue
            ihl = 20
            version = 4
        elif b0 >> 4 == 6:
            if pkt[6] != PROTO_TCP or U16.unpack_from(pkt, 4)[0] != n - 40:
                out.append((NONE_HDR, pkt))
                continue
            ihl = 40
            version = 6
        else:
            out.append((NONE_HDR, pkt))
            continue
        if n < ihl + 20:
            out.append((NONE_HDR, pkt))
            continue
        thl = (pkt[ihl + 12] >> 4) * 4
        flags = pkt[ihl + 13]
        plen = n - ihl - thl
        if thl < 20 or plen <= 0 or flags & NO_MERGE_FLAGS:
            out.append((NONE_HDR, pkt))
            continue
        if version == 4:
            # ver/ihl, TOS, DF, TTL, addresses | ports, ACK, data offset, flags w/o FIN/PSH/CWR, window,
            # options (the window is in tcp_gro_receive's flag word: a change flushes)
            key = (
                pkt[0:2]
                + bytes((pkt[6] & 0x40, pkt[8]))
                + pkt[12:24]
                + pkt[28:33]
                + bytes((flags & ~(FIN | PSH | CWR),))
                + pkt[34:36]
                + pkt[40 : 20 + thl]
            )
        else:
            # version/traffic class/flow label, hop limit, addresses | ports, ACK, data offset, flags,
            # window, options
            key = (
                pkt[0:4]
                + pkt[7:44]
                + pkt[48:53]
                + bytes((flags & ~(FIN | PSH | CWR),))
                + pkt[54:56]
                + pkt[60 : 40 + thl]
            )
        seq = U32.unpack_from(pkt, ihl + 4)[0]
        run = open_runs.get(key)
        if run is not None and not run.closed and _can_append(run, pkt, seq, plen, flags):
            if not run.verified and verify:
                if not _tcp_valid(run.first, version, ihl):
                    # The held segment is corrupt: it stays a lone pass-through; start afresh below.
                    run.closed = True
                    run = None
                else:
                    run.verified = True
            if run is not None:
                if not verify or _tcp_valid(pkt, version, ihl):
                    run.payloads.append(memoryview(pkt)[ihl + thl :])
                    run.packets.append(pkt)
                    run.next_seq = (seq + plen) & 0xFFFFFFFF
                    run.length += plen
                    run.last_flags = flags
                    if plen < run.size or flags & (FIN | PSH) or len(run.packets) >= MAX_COALESCE_SEGMENTS:
                        run.closed = True
                    continue
                run.closed = True  # this segment is corrupt: pass it through, the flow restarts after it
                out.append((NONE_HDR, pkt))
                continue
        run = _Run(
            key=key,
            first=pkt,
            ihl=ihl,
            thl=thl,
            version=version,
            size=plen,
            next_seq=(seq + plen) & 0xFFFFFFFF,
            length=n if version == 4 else n - 40,
            payloads=[memoryview(pkt)[ihl + thl :]],
            packets=[pkt],
            last_flags=flags,
            ip_id=U16.unpack_from(pkt, 4)[0] if version == 4 else 0,
            df=version == 4 and bool(pkt[6] & 0x40),
            closed=bool(flags & (FIN | PSH)),
            verified=False,
        )
        open_runs[key] = run
        started.append((len(out), run))
        out.append((NONE_HDR, pkt))
    for i, run in started:
        if len(run.packets) > 1:
            out[i] = _merge(run)
    return out


def _can_append(run: _Run, pkt: bytes, seq: int, plen: int, flags: int) -> bool:
    """GRO admission for a segment whose flow key already matches ``run`` (see ``coalesce``)."""
    if seq != run.next_seq or plen > run.size or flags & CWR:
        return False
    if len(run.packets) >= MAX_COALESCE_SEGMENTS or run.length + plen > MAX_IP_PAYLOAD:
        return False
    if run.version == 4 and not run.df:
        ip_id: int = U16.unpack_from(pkt, 4)[0]
        return ip_id == (run.ip_id + len(run.packets)) & 0xFFFF
    return True


def _merge(run: _Run) -> tuple[bytes, bytes]:
    """One superpacket from a run: first segment's headers with lengths, flags and checksums fixed."""
    tcp_len = run.thl + sum(len(p) for p in run.payloads)
    vnet, hdr = superpacket_headers(run.first, run.version, run.ihl, run.thl, tcp_len, run.last_flags,
                                     run.size)
    return vnet, b"".join([hdr, *run.payloads])




_INVARIANT: dict[int, np.ndarray] = {}  # header columns every segment of a run repeats, by header length


def coalesce_run(run: RxRun, native: bool = True) -> list[bytes | bytearray | memoryview] | None:
    """`coalesce` for an `RxRun` that is one in-order IPv6 TCP flow: the iovecs of one TUN write.

    With the C form (`tunneld.fastpath._tcp6`, where built; `native=False` skips it) the arena is
    rewritten in place, merged headers then the payloads back to back, and the iovecs are the virtio-net
    header and one view of the arena: the run cannot be used again afterwards. The NumPy form leaves the
    arena alone and returns the virtio-net header, the merged headers and each segment's payload as a
    view of the arena (no copy); both write the same bytes (tests/unit/test_tcp6_native.py).

    The merge rules are `coalesce`'s (the kernel's GRO): same addresses, ports, ACK number, data offset,
    window and options, traffic class, flow label and hop limit; contiguous sequence numbers; every
    payload as long as the first but the last, which may be shorter; FIN/PSH only on the last, CWR only
    on the first; no SYN/RST/URG; at most 64 segments and 65535 bytes. Checksums are not verified
    (the run came through ESP, as with ``coalesce(verify=False)``). Returns None when the run breaks a
    rule anywhere; the caller then falls back to `coalesce` on its packets.
    """
    arena, stride, lengths = run.arena, run.stride, run.lengths
    k = len(lengths)
    if native and _tcp6 is not None and k > 1:
        full = lengths[0]
        if lengths.count(full) < k - 1 + (lengths[-1] == full):  # all but the last are `full` long
            return None
        merged = _tcp6.coalesce(arena, stride, k, full, lengths[-1])
        if merged is None:
            return None
        vnet, n = merged
        return [vnet, memoryview(arena)[:n]]
    if k < 2 or k > MAX_COALESCE_SEGMENTS or arena[0] >> 4 != 6 or arena[6] != PROTO_TCP:
        return None
    thl = (arena[52] >> 4) * 4
    hl = 40 + thl
    full = lengths[0]
    size = full - hl
    tail = lengths[-1] - hl
    total = size * (k - 1) + tail
    if thl < 20 or size <= 0 or tail <= 0 or tail > size or thl + total > MAX_IP_PAYLOAD:
        return None
    if k > 2 and lengths.count(full) < k - 1:
        return None
    h = np.ndarray((k, hl), np.uint8, arena, 0, (stride, 1))
    cols = _INVARIANT.get(hl)
    if cols is None:
        cols = _INVARIANT[hl] = np.r_[0:4, 6:44, 48:53, 54:56, 60:hl]
    same = h[:, cols]  # compared as bytes: one C call instead of a NumPy comparison and reduction
    if same.tobytes() != same[0].tobytes() * k:
        return None
    f0 = arena[53]
    base = f0 & ~CWR
    fl = h[:, 53]
    if base & (NO_MERGE_FLAGS | FIN | PSH) or fl[1:-1].tobytes() != bytes((base,)) * (k - 2):
        return None
    fk = arena[(k - 1) * stride + 53]
    if fk & ~(FIN | PSH) != base:
        return None
    plens = np.ndarray((k,), ">u2", arena, 4, (stride,))
    if plens.tobytes() != U16.pack(full - 40) * (k - 1) + U16.pack(lengths[-1] - 40):
        return None
    seqs = np.ndarray((k,), ">u4", arena, 44, (stride,))
    want = np.arange(k, dtype=np.uint32) * np.uint32(size) + seqs[0]  # wraps mod 2**32 as TCP's
    if seqs.tobytes() != want.astype(">u4").tobytes():
        return None
    vnet, hdr = superpacket_headers(arena, 6, 40, thl, thl + total, fk, size)
    mv = memoryview(arena)
    iov: list[bytes | bytearray | memoryview] = [vnet, hdr]
    iov += map(mv.__getitem__, strided(hl, stride, size, k - 1))
    iov.append(mv[(k - 1) * stride + hl : (k - 1) * stride + lengths[-1]])
    return iov
