"""DNS over TLS (RFC 7858) for the cores that talk to one server: a datagram port over a TLS connection.

The driver (tunneld.services.driver) runs a core over anything with ``sendto`` and ``recvfrom``; this port
gives it one TLS 1.3 connection to the account's server: each ``sendto`` is one message framed as RFC 7766
says, each ``recvfrom`` one whole message back (tunneld.proto.dnsframe). The connection opens at the first
send and again after the server closed it (idle timeout, restart): the core's own retransmissions are the
retry, and a failed connection attempt only waits ``RECONNECT_BACKOFF`` before the next may be tried, so a
server that is down costs one attempt per core retry, never a loop. The server is verified against the
account CA (tunneld.accountca) by name, and the system's CAs too when the account says its server has a
public CA's certificate (``[account] tls_public_ca``); the client may present its device's certificate
under the same CA (DNS Push membership). A session core that must know its connection's fate (the
watcher's DNS Push) is told through ``on_lost`` (a failed attempt, or an open connection lost) and may
``drop`` the connection.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Final

import trio

from tunneld.accountca import memory_file
from tunneld.proto.dnsframe import FrameBuffer, frame
from tunneld.proto.errors import ParseError

__all__ = ["CONNECT_TIMEOUT", "RECONNECT_BACKOFF", "TlsPort", "client_context", "failure_reason",
           "tls_connector"]

log = logging.getLogger("tunneld.tls")

CONNECT_TIMEOUT: Final = 5.0  # seconds for TCP and the TLS handshake together
RECONNECT_BACKOFF: Final = 2.0  # seconds after a failed attempt before the next one


class TlsPort:
    """A `DatagramPort` onto one DNS-over-TLS connection to ``server``, verified as ``hostname`` by
    ``context`` (or by the context a function gives at each connection: a client certificate renewed
    meanwhile). Messages from anything but the server cannot arrive: the source is always ``server``."""

    def __init__(self, server: tuple[str, int], context: ssl.SSLContext | Callable[[], ssl.SSLContext],
                 hostname: str) -> None:
        self.server = server
        self.context = context
        self.hostname = hostname
        self.connects = 0
        self.connect_errors = 0
        self._stream: trio.SSLStream[trio.SocketStream] | None = None
        self._frames = FrameBuffer()
        self._connected = trio.Event()
        self._failed_at = -float("inf")
        self._closed = False
        self._lock = trio.Lock()  # one connection attempt at a time
        self.on_lost: Callable[[str], None] | None = None
        """Called (synchronously) when a connection attempt fails or an open connection is lost; not
        for what the owner closes or drops."""

    def _lost(self, why: str) -> None:
        if self.on_lost is not None and not self._closed:
            self.on_lost(why)

    async def _connect(self) -> trio.SSLStream[trio.SocketStream]:
        async with self._lock:
            if self._stream is not None:
                return self._stream
            if self._closed:  # a send racing a reopen: the driver counts it as a send error, the core retries
                raise OSError("TLS port closed")
            if trio.current_time() - self._failed_at < RECONNECT_BACKOFF:
                raise OSError(f"no connection to {self.server[0]} port {self.server[1]} (backing off)")
            try:
                with trio.fail_after(CONNECT_TIMEOUT):
                    tcp = await trio.open_tcp_stream(*self.server)
                    context = self.context if isinstance(self.context, ssl.SSLContext) else self.context()
                    stream = trio.SSLStream(tcp, context, server_hostname=self.hostname)
                    try:
                        await stream.do_handshake()
                    except BaseException:
                        await trio.aclose_forcefully(stream)
                        raise
            except (OSError, trio.BrokenResourceError, trio.TooSlowError) as e:
                self._failed_at = trio.current_time()
                self.connect_errors += 1
                why = f"TLS to {self.server[0]} port {self.server[1]}: {failure_reason(e)}"
                self._lost(why)
                raise OSError(why) from None
            self.connects += 1
            self._stream = stream
            self._frames = FrameBuffer()
            self._connected.set()
            return stream

    async def _drop(self, stream: trio.SSLStream[trio.SocketStream], why: str) -> None:
        if self._stream is stream:  # lost, not dropped by the owner: say so
            self._stream = None
            self._connected = trio.Event()
            self._lost(why)
        await trio.aclose_forcefully(stream)

    def drop(self) -> None:
        """Close the current connection, if any (the next send opens a new one); ``on_lost`` is not
        called: the owner knows."""
        stream, self._stream = self._stream, None
        if stream is not None:
            self._connected = trio.Event()
            stream.transport_stream.socket.close()

    async def sendto(self, data: bytes, address: Any, /) -> int:
        stream = await self._connect()
        try:
            await stream.send_all(frame(data))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            why = f"TLS to {self.server[0]}: connection lost ({e})"
            await self._drop(stream, why)
            raise OSError(why) from None
        return len(data)

    async def recvfrom(self, bufsize: int, /) -> tuple[bytes, Any]:
        while True:
            if self._closed:
                raise trio.ClosedResourceError("closed")
            message = self._frames.next()
            if message is not None:
                return message, self.server
            stream = self._stream
            if stream is None:
                await self._connected.wait()
                continue
            try:
                data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:  # the server closed (its idle timeout): the next send reconnects
                await self._drop(stream, f"TLS to {self.server[0]}: closed by the server")
                continue
            try:
                self._frames.feed(bytes(data))
            except ParseError as e:  # a frame we refuse: the connection is no longer in step
                log.debug("TLS from %s: %s", self.server[0], e)
                await self._drop(stream, f"TLS from {self.server[0]}: {e}")

    def close(self) -> None:
        """Close the connection (the driver's receivers see ClosedResourceError)."""
        self._closed = True
        if self._stream is not None:
            self._stream.transport_stream.socket.close()
            self._stream = None
        self._connected.set()


def failure_reason(e: BaseException) -> str:
    """Why a connection failed, in words: trio's BrokenResourceError says nothing itself, its cause (an
    unverified certificate, say) does."""
    return str(e) or str(e.__cause__ or "") or type(e).__name__


def client_context(ca_pem: bytes, certificate: tuple[bytes, bytes] | None = None, *,
                   public_ca: bool = False) -> ssl.SSLContext:
    """A TLS 1.3 client context that trusts the account CA ``ca_pem``, names checked; with ``public_ca``
    (``[account] tls_public_ca``: a server with a public CA's certificate) the system's trust store too,
    else that CA alone. With ``certificate`` (PEM chain, PEM key: the device's, under the account CA) it
    presents that, the key loaded through memory only."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cadata=ca_pem.decode("ascii"))
    if public_ca:  # OpenSSL's default paths (SSL_CERT_FILE, SSL_CERT_DIR honoured)
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if certificate is not None:
        chain, key = certificate
        with memory_file(chain) as chain_path, memory_file(key) as key_path:
            ctx.load_cert_chain(chain_path, key_path)
    return ctx


def tls_connector(ca_pem: bytes, hostname: str, *,
                  public_ca: bool = False) -> Callable[[tuple[str, int]], Awaitable[TlsPort]]:
    """A ServerLink's ``connect`` for DNS over TLS: a port verified against the account CA (and with
    ``public_ca`` the system's trust store) as ``hostname`` (the account domain, which every serve-dns
    certificate names)."""
    ctx = client_context(ca_pem, public_ca=public_ca)

    async def connect(server: tuple[str, int]) -> TlsPort:
        return TlsPort(server, ctx, hostname)

    return connect
