"""The TUN device carrying the host's ULA, and its address, route and MTU (through netlink).

Reads drain the device until EAGAIN (bounded per wakeup) so one wakeup serves a whole burst; with
offload (IFF_VNET_HDR) superpackets are segmented on read and segments coalesced on write by the pure
code of `tunneld.fastpath`. Loose packets and runs come and go in separate lists.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
from typing import Final

import pytun
import trio
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from tunneld.crypto.layout import SealLayout
from tunneld.fastpath.coalesce import coalesce, coalesce_run
from tunneld.fastpath.headers import VNET_HDR_LEN
from tunneld.fastpath.runs import RxRun, TxRun
from tunneld.fastpath.segment import complete, segment, segment_run
from tunneld.net.udp import MAX_GSO_BYTES, MAX_GSO_SEGMENTS
from tunneld.proto.errors import ParseError

MAX_PACKET: Final = 65535
# Packets the kernel queues for us before dropping (the TUN ring, sized by txqueuelen; 500 by
# default, about 5 ms at 1 Gb/s): enough to ride out the daemon being descheduled for a moment.
TX_QUEUE_LEN: Final = 1000

# Superpackets read per wakeup at most (each ~44 segments, ~58 KB): a bulk flow's batch stays about a
# megabyte, which the loop seals and sends before it reads again.
MAX_SUPERPACKETS_PER_WAKEUP: Final = 16

MAX_TCP_HEADERS: Final = 40 + 60  # IPv6 header and the longest TCP header (RFC 9293 §3.1: 15 words)


def gso_max_size_for(mtu: int, overhead: int) -> int:
    """The largest superpacket the kernel may hand us, so that all its segments, sealed, fit one UDP GSO
    send (`MAX_GSO_BYTES`): then one superpacket is one sendmsg, one GRO receive at the peer, one run
    and one TUN write there, instead of a full batch and a small remainder with the per-run costs twice.

    With S = MAX_GSO_BYTES // (mtu + overhead) datagrams per send (`overhead`: the most that sealing
    adds to a packet, `SealLayout.overhead`), a superpacket of G bytes with
    h bytes of headers has ceil((G - h) / (mtu - h)) segments, at most S for every h up to
    MAX_TCP_HEADERS when G = S * mtu - (S - 1) * MAX_TCP_HEADERS (58600 for MTU 1400: 44 segments of
    1328 bytes with TCP timestamps, the Linux default, instead of 49 that need two sends)."""
    per_send = min(MAX_GSO_SEGMENTS, MAX_GSO_BYTES // (mtu + overhead))
    return max(mtu, per_send * mtu - (per_send - 1) * MAX_TCP_HEADERS)


class TunError(Exception):
    """The TUN device could not be created or configured; the message says what to check."""


# linux/if_tun.h: TUNSETOFFLOAD = _IOW('T', 208, unsigned int) and its feature bits.
TUNSETOFFLOAD: Final = 0x400454D0
TUN_F_CSUM: Final = 0x01
TUN_F_TSO4: Final = 0x02
TUN_F_TSO6: Final = 0x04


class Tun:
    """With `offload`, the device is opened IFF_VNET_HDR with checksum and TSO offload: reads return TCP
    superpackets (up to 64 KB) that are split into standard packets here, and writes coalesce consecutive
    segments of a flow into one superpacket, so the kernel runs its TCP code once per superpacket
    instead of once per packet. If the kernel refuses, the device is plain (`offload_error` says why).
    `layout` is what the seal expects of a run's plaintexts (from the security associations)."""

    def __init__(self, name: str, mtu: int, layout: SealLayout, offload: bool = False) -> None:
        self.layout = layout
        self.offload = False
        self.offload_error: str | None = None if offload else "off in the config"
        dev = None
        if offload:
            try:
                flags = pytun.IFF_TUN | pytun.IFF_NO_PI | pytun.IFF_VNET_HDR
                dev = pytun.TunTapDevice(name=name, flags=flags)
                fcntl.ioctl(dev.fileno(), TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
                self.offload = True
            except (pytun.Error, OSError) as e:
                self.offload_error = f"the kernel refused TUN offload: {e}"
                if dev is not None:
                    dev.close()
                    dev = None
        try:
            self.dev = dev or pytun.TunTapDevice(name=name, flags=pytun.IFF_TUN | pytun.IFF_NO_PI)
        except pytun.Error as e:
            raise TunError(f"cannot create TUN device {name!r}: {e} (run as root; is /dev/net/tun there?)") \
                from None
        self.name: str = self.dev.name
        self.fd: int = self.dev.fileno()
        os.set_blocking(self.fd, False)
        self.mtu = mtu
        self.read_errors = 0
        self.offload_errors = 0  # superpackets that could not be segmented (dropped)
        self.superpackets_written = 0  # coalesced writes (GSO) with offload, runs or not
        self.gso_max_size: int | None = None  # what we limited the kernel's superpackets to, if we could
        self._vnet = bytearray(VNET_HDR_LEN)
        self._packet = bytearray(MAX_PACKET)
        self._view = memoryview(self._packet)

    def configure(self, address: ipaddress.IPv6Address, prefix: ipaddress.IPv6Network) -> None:
        """Address /128, the account's prefix routed to us, MTU, link up (via netlink)."""
        try:
            self._configure(address, prefix)
        except NetlinkError as e:
            what = "the route to the account's prefix already exists" if e.code == errno.EEXIST else e
            raise TunError(f"cannot configure {self.name} ({address}, {prefix}): {what}; is another "
                           f"tunneld of this account running on this host?") from None

    def _configure(self, address: ipaddress.IPv6Address, prefix: ipaddress.IPv6Network) -> None:
        with IPRoute() as ip:
            idx = ip.link_lookup(ifname=self.name)
            if not idx:
                raise TunError(f"TUN device {self.name} vanished")
            index = idx[0]
            ip.link("set", index=index, mtu=self.mtu, txqlen=TX_QUEUE_LEN)
            if self.offload:
                try:
                    size = gso_max_size_for(self.mtu, self.layout.overhead)
                    ip.link("set", index=index, gso_max_size=size)
                    self.gso_max_size = size
                except NetlinkError:
                    pass  # an older kernel: superpackets then sometimes take two sends, and still work
            ip.addr("add", index=index, address=str(address), prefixlen=128, flags=0x02)  # IFA_F_NODAD
            ip.link("set", index=index, state="up")
            ip.route("add", dst=str(prefix.network_address), dst_len=prefix.prefixlen, oif=index)

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self.fd)

    def read_batch(self, packets: list[bytes], runs: list[TxRun], max_packets: int = 128) -> int:
        """Drain the device into `packets`, and with offload into `runs` one `TxRun` per IPv6 TCP
        superpacket (its segments laid out for sealing, after the first `run.at` packets); returns how
        many packets that is in all."""
        if self.offload:
            return self._read_offload(packets, runs, max_packets)
        fd = self.fd
        read = os.read
        n = 0
        append = packets.append
        while n < max_packets:
            try:
                append(read(fd, MAX_PACKET))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno == errno.EBADF:
                    break
                self.read_errors += 1
                break
            n += 1
        return n

    def _read_offload(self, packets: list[bytes], runs: list[TxRun], max_reads: int) -> int:
        fd = self.fd
        layout = self.layout
        n = 0
        # Up to `max_reads` reads per wakeup, as without offload, but at most MAX_SUPERPACKETS_PER_WAKEUP
        # superpackets (each up to ~44 segments): small packets batch as well as on a plain TUN, and a
        # bulk flow's batch stays about a megabyte.
        for _ in range(max_reads):
            if len(runs) >= MAX_SUPERPACKETS_PER_WAKEUP or n >= max_reads * 8:
                break
            try:
                # Into buffers kept across reads: a superpacket is copied once more at most (into its
                # run's buffer), never allocated per read and sliced off its header.
                got = os.readv(fd, (self._vnet, self._packet)) - VNET_HDR_LEN
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.read_errors += 1
                break
            try:
                if got < 0:
                    raise ParseError("truncated")
                vnet = self._vnet
                if not vnet[1]:  # the GSO type: not a superpacket (ACKs, UDP, ICMP)
                    if (done := complete(vnet, self._view[:got])) is not None:
                        packets.append(done)
                        n += 1
                        continue
                elif (run := segment_run(vnet, self._view[:got], layout)) is not None:
                    run.at = len(packets)
                    runs.append(run)
                    n += run.count
                    continue
                segments = segment(bytes(vnet), bytes(self._view[:got]))
            except ParseError:
                self.offload_errors += 1
                continue
            packets.extend(segments)
            n += len(segments)
        return n

    def write_batch(self, packets: list[bytes], runs: list[RxRun]) -> int:
        """Write packets and runs (each after the first `run.at` packets), in order; returns how many
        writes the kernel refused (a full queue, EINVAL on a malformed header): those are dropped, as a
        NIC would."""
        if self.offload:
            return self._write_offload(packets, runs)
        writes: list[bytes] | list[bytes | memoryview] = packets
        if runs:  # runs opened for a plain TUN: packet by packet
            mixed: list[bytes | memoryview] = []
            writes = mixed
            prev = 0
            for run in runs:
                mixed += packets[prev : run.at]
                mixed += run.views()
                prev = max(prev, run.at)
            mixed += packets[prev:]
        fd = self.fd
        write = os.write
        dropped = 0
        for p in writes:
            try:
                write(fd, p)
            except OSError:
                dropped += 1  # the kernel's queue is full, or it refused the packet: drop, as a NIC would
        return dropped

    def _write_offload(self, packets: list[bytes], runs: list[RxRun]) -> int:
        # The packets came through ESP, which authenticated them and whose sender completed their
        # checksums: no need to verify them again before merging (the kernel completes the merged
        # packet's partial checksum itself).
        dropped = 0
        prev = 0
        for run in runs:
            if run.at > prev:
                dropped += self._write_coalesced(packets[prev : run.at])
                prev = run.at
            iov = coalesce_run(run)
            if iov is None:
                dropped += self._write_coalesced(run.packets())  # not one in-order flow: merge what can be
                continue
            try:
                os.writev(self.fd, iov)
                self.superpackets_written += 1
            except OSError:
                dropped += 1
        if prev < len(packets):
            dropped += self._write_coalesced(packets[prev:])
        return dropped

    def _write_coalesced(self, packets: list[bytes]) -> int:
        dropped = 0
        for hdr, pkt in coalesce(packets, verify=False):
            try:
                os.writev(self.fd, (hdr, pkt))
                self.superpackets_written += hdr[1] != 0  # [1]: the GSO type
            except OSError:
                dropped += 1
        return dropped

    def close(self) -> None:
        """Closing the only fd of a non-persistent TUN deletes the device, its address and routes."""
        with contextlib.suppress(OSError):
            self.dev.close()
