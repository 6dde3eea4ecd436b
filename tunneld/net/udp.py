"""The outer UDP socket: one dual-stack socket, drained and filled in batches, with GSO and GRO.

One `UDPTransport` owns the socket. Receive drains it until EAGAIN (bounded per wakeup) and hands up
each receive whole, with the segment size where the kernel coalesced datagrams with UDP GRO (the
tunnel core opens such a run in one piece, or splits it). Send hands runs of equal-sized datagrams to
the kernel as one UDP GSO `sendmsg`: a list of datagrams as its iovecs, or a sealed run's one buffer.
`rebind()` replaces the socket (new address or port), opening the new one first so that a failure leaves
the old one in place, without touching anything above it: security associations live elsewhere, and
peers learn the new endpoint from the next authenticated packet.

IPv4 peers appear as IPv4-mapped IPv6 addresses (::ffff:a.b.c.d) on the dual-stack socket; `endpoint`
helpers convert for display.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Iterator, Sequence
from typing import Final

import trio

SOL_UDP: Final = 17
UDP_SEGMENT: Final = 103  # linux/udp.h: GSO segment size for sendmsg (Linux 4.18)
UDP_GRO: Final = 104  # linux/udp.h: receive coalescing, cmsg carries the segment size (Linux 5.0)
MAX_GSO_BYTES: Final = 65000  # total payload of one GSO send stays under the 64 KiB UDP limit
MAX_GSO_SEGMENTS: Final = 64  # UDP_MAX_SEGMENTS in older kernels
RECV_BUF: Final = 65536 + 1024
SOCKET_BUFFER: Final = 4 << 20  # bytes: a burst of GSO sends must not overflow the peer's queue
SO_RCVBUFFORCE: Final = 33  # asm-generic/socket.h: as SO_RCVBUF, past net.core.rmem_max (root)
SO_SNDBUFFORCE: Final = 32
_GSO_CMSG_SPACE: Final = socket.CMSG_SPACE(4)

Addr = tuple[str, int]  # (IPv6 or IPv4-mapped address, port), as the dual-stack socket reports it


def to_socket_addr(host: str, port: int) -> Addr:
    """An address for the dual-stack socket: IPv4 becomes IPv4-mapped IPv6."""
    ip = ipaddress.ip_address(host)
    if ip.version == 4:
        return (f"::ffff:{ip}", port)
    return (str(ip), port)


def display_addr(addr: Addr) -> str:
    """host:port with IPv4-mapped addresses shown as IPv4 and IPv6 in brackets."""
    ip = ipaddress.IPv6Address(addr[0].split("%", 1)[0])
    if ip.ipv4_mapped is not None:
        return f"{ip.ipv4_mapped}:{addr[1]}"
    return f"[{ip}]:{addr[1]}"


def split_runs(datagrams: Sequence[bytes]) -> Iterator[tuple[int, int, int]]:
    """(start, end, size) runs that one GSO send can carry: equal sizes, the last one may be shorter."""
    n = len(datagrams)
    i = 0
    while i < n:
        size = len(datagrams[i])
        j = i + 1
        total = size
        limit = min(MAX_GSO_SEGMENTS, max(1, MAX_GSO_BYTES // max(size, 1)))
        while j < n and j - i < limit:
            s = len(datagrams[j])
            if s > size:
                break
            total += s
            j += 1
            if s < size:  # a shorter datagram ends a GSO run
                break
        yield i, j, size
        i = j


def set_buffers(s: socket.socket, size: int) -> None:
    """Large socket buffers. SO_RCVBUF is silently capped at net.core.rmem_max (about 208 KiB by
    default), which drops datagrams in bursts; as root the size is forced (the daemon, serve-dns before it
    drops its privileges), else it is what the cap allows."""
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            s.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, plain, size)


class UDPTransport:
    """Owns the outer socket. Not thread-safe; one trio task receives, any task may send."""

    def __init__(self, port: int, bind_host: str = "::", gso: bool = True, gro: bool = True) -> None:
        self.port = port
        self.bind_host = bind_host
        self.want_gso = gso
        self.want_gro = gro
        self.gso = False
        self.gro = False
        self.sock: socket.socket | None = None
        self.sent_datagrams = 0
        self.send_errors = 0
        self.generation = 0  # bumped by rebind, so a receiver parked on the old socket can notice
        self._open()

    def _open(self) -> None:
        self._install(self._bind(self.bind_host, self.port))

    def _bind(self, host: str, port: int) -> socket.socket:
        """A new socket bound to (host, port); the current one is not touched."""
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            set_buffers(s, SOCKET_BUFFER)
            s.bind((host, port))
            s.setblocking(False)
        except OSError:
            s.close()
            raise
        return s

    def _install(self, s: socket.socket) -> None:
        self.gro = False
        if self.want_gro:
            try:
                s.setsockopt(SOL_UDP, UDP_GRO, 1)
                self.gro = True
            except OSError:
                self.gro = False
        self.gso = self.want_gso  # proven on first send; turned off if the kernel refuses
        self.sock = s
        self.port = s.getsockname()[1]

    @property
    def local_port(self) -> int:
        return self.port

    def rebind(self, port: int | None = None, bind_host: str | None = None) -> None:
        """Replace the socket (another port or address); SAs are untouched.

        The new socket is opened before the old one is closed, so a port in use (OSError) or out of range
        (ValueError) leaves the old socket working. Only when our own socket holds the wanted port does it
        have to go first; if the port is then lost to someone else, the old address is taken back.
        """
        new_port = self.port if port is None else port
        new_host = self.bind_host if bind_host is None else bind_host
        if isinstance(new_port, bool) or not isinstance(new_port, int) or not 0 <= new_port <= 65535:
            raise ValueError(f"port {new_port!r} is out of range: give 0 (any free port) to 65535")
        try:
            s = self._bind(new_host, new_port)
        except OSError as e:
            if e.errno != errno.EADDRINUSE or new_port != self.port or self.sock is None:
                raise
            self._close_current()
            try:
                s = self._bind(new_host, new_port)
            except OSError:
                self._install(self._bind(self.bind_host, self.port))  # our old address, just freed
                self.generation += 1
                raise
        self._close_current()
        self.bind_host = new_host
        self._install(s)
        self.generation += 1

    def _close_current(self) -> None:
        old, self.sock = self.sock, None
        if old is not None:
            # Wake any task parked in wait_readable/wait_writable on the old socket (it gets
            # ClosedResourceError and moves to the new one); without this it would wait forever.
            trio.lowlevel.notify_closing(old)
            old.close()

    def close(self) -> None:
        self._close_current()

    # -- receive ----------------------------------------------------------------------------------

    async def wait_readable(self) -> None:
        assert self.sock is not None
        await trio.lowlevel.wait_readable(self.sock)

    def recv_runs(self, out: list[tuple[bytes, Addr, int]], max_datagrams: int = 256) -> int:
        """Drain the socket until EAGAIN or `max_datagrams`, appending (buffer, source, segment size) per
        receive: a GRO receive stays whole (datagrams of `segment size` back to back, the last may be
        shorter), a size of 0 means the buffer is one datagram. Returns the number of datagrams."""
        sock = self.sock
        if sock is None:
            return 0
        n = 0
        append = out.append
        recvmsg = sock.recvmsg
        while n < max_datagrams:
            try:
                data, anc, _flags, addr = recvmsg(RECV_BUF, _GSO_CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                # ICMP errors from earlier sends surface here (ECONNREFUSED and kin): not fatal.
                if e.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    continue
                raise
            seg = 0
            if anc:
                for level, typ, cdata in anc:
                    if level == SOL_UDP and typ == UDP_GRO and len(cdata) >= 4:
                        seg = struct.unpack_from("=i", cdata)[0]  # the kernel reports an int
            if seg and len(data) > seg:
                append((data, (addr[0], addr[1]), seg))
                n += -(-len(data) // seg)
            else:
                append((data, (addr[0], addr[1]), 0))
                n += 1
        return n

    # -- send -------------------------------------------------------------------------------------

    async def send_burst(self, buf: memoryview, size: int, dest: Addr) -> None:
        """Send datagrams laid back to back in `buf`, each `size` bytes but the last (a sealed run,
        `tunneld.fastpath.runs.Burst`): one GSO sendmsg of one iovec per 64 KB."""
        n = len(buf)
        if n <= size or not self.gso:
            for off in range(0, n, size):
                await self._send((buf[off:off + size],), dest, 0)
            return
        step = size * max(1, min(MAX_GSO_SEGMENTS, MAX_GSO_BYTES // size))
        for off in range(0, n, step):
            chunk = buf[off:off + step]
            await self._send((chunk,), dest, size if len(chunk) > size else 0)

    async def send_batch(self, datagrams: Sequence[bytes], dest: Addr) -> None:
        """Send datagrams to one destination in as few system calls as GSO allows."""
        if not self.gso or len(datagrams) == 1:
            for d in datagrams:
                await self._send((d,), dest, 0)
            return
        for start, end, size in split_runs(datagrams):
            await self._send(datagrams[start:end], dest, size if end - start > 1 else 0)

    def send_now(self, datagram: bytes, dest: Addr) -> bool:
        """Send without waiting, for handshake messages: if the socket is full the message is
        dropped (and counted), and the handshake timers retry it."""
        sock = self.sock
        if sock is None:
            return False
        try:
            sock.sendto(datagram, dest)
        except OSError:
            self.send_errors += 1
            return False
        self.sent_datagrams += 1
        return True

    async def send_one(self, datagram: bytes, dest: Addr) -> None:
        await self._send((datagram,), dest, 0)

    async def _send(self, bufs: Sequence[bytes | memoryview], dest: Addr, gso_size: int) -> None:
        """One sendmsg of `bufs` (concatenated), as GSO segments of `gso_size` if it is not 0."""
        anc = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", gso_size))] if gso_size else []
        for _ in range(100):  # bounded: a socket that stays unwritable is an error, not a hang
            sock = self.sock
            if sock is None:
                return
            try:
                sock.sendmsg(bufs, anc, 0, dest)
                self.sent_datagrams += -(-sum(map(len, bufs)) // gso_size) if gso_size else 1
                return
            except (BlockingIOError, InterruptedError):
                await trio.lowlevel.wait_writable(sock)
            except OSError as e:
                if gso_size and e.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                    # No GSO here (old kernel, or a device without checksum offload): fall back.
                    self.gso = False
                    data = b"".join(bufs)
                    for off in range(0, len(data), gso_size):
                        await self._send((data[off:off + gso_size],), dest, 0)
                    return
                # Unreachable peers, no route, and so on: count, drop, go on (the peer's timers
                # will retry the handshake; a dead endpoint must not kill the data plane).
                self.send_errors += 1
                return
        self.send_errors += 1
