"""DNS message framing on a byte stream (TCP, TLS): the 2-byte length prefix of RFC 1035 §4.2.2 / RFC 7766 §8.

Sans-I/O: :class:`FrameBuffer` is fed the bytes a stream delivered, in whatever pieces, and hands back whole
messages one at a time, so a connection's reader and its DNS Stateful Operations session (RFC 8490, which
pipelines many messages on one connection) share one implementation. A frame shorter than a DNS header or
longer than the cap is refused with :class:`~tunneld.proto.errors.ParseError` (the connection is then
closed: the stream cannot be resynchronised), and so is a peer that pipelines more bytes than the buffer cap
before the owner takes the messages out.
"""

from __future__ import annotations

import struct
from typing import Final

from tunneld.proto.dnsguard import HEADER_SIZE, MAX_MESSAGE
from tunneld.proto.errors import ParseError

__all__ = ["DOT_PORT", "LENGTH_SIZE", "MAX_BUFFERED", "FrameBuffer", "frame"]

DOT_PORT: Final = 853  # RFC 7858 §3.1: DNS over TLS, where a client finds it unless told otherwise
LENGTH_SIZE: Final = 2  # RFC 1035 §4.2.2: "the message is prefixed with a two byte length field"
_LENGTH: Final = struct.Struct("!H")
MAX_BUFFERED: Final = 4 * (LENGTH_SIZE + MAX_MESSAGE)
"""Default cap on bytes held (pipelined messages not yet taken out, and one partial message)."""


def frame(message: bytes) -> bytes:
    """``message`` with its length prefix (RFC 7766 §8: one write, so prefix and message leave together)."""
    if not HEADER_SIZE <= len(message) <= MAX_MESSAGE:
        raise ValueError("a framed DNS message is 12 to 65535 bytes long")
    return _LENGTH.pack(len(message)) + message


class FrameBuffer:
    """Reassembles length-prefixed DNS messages from stream bytes.

    ``feed`` adds bytes (ParseError if the peer has pipelined more than ``max_buffered`` bytes, or a frame's
    length is refused); ``next`` takes out the next whole message, or None while it is incomplete. A
    frame's length is checked as soon as its prefix arrives, before its body is waited for."""

    __slots__ = ("_buf", "_start", "max_buffered", "max_message")

    def __init__(self, *, max_message: int = MAX_MESSAGE, max_buffered: int = MAX_BUFFERED) -> None:
        if not HEADER_SIZE <= max_message <= MAX_MESSAGE:
            raise ValueError("max_message must be 12 to 65535")
        if max_buffered < LENGTH_SIZE + max_message:
            raise ValueError("max_buffered must hold at least one whole frame")
        self.max_message = max_message
        self.max_buffered = max_buffered
        self._buf = bytearray()
        self._start = 0  # where the unread bytes begin (compacted lazily: each byte is copied O(1) times)

    @property
    def buffered(self) -> int:
        """Bytes held: messages not yet taken out, and the partial one."""
        return len(self._buf) - self._start

    @property
    def at_boundary(self) -> bool:
        """Nothing is held: an end of stream now falls between messages (clean), not inside one."""
        return self.buffered == 0

    def feed(self, data: bytes) -> None:
        if self.buffered + len(data) > self.max_buffered:
            raise ParseError("stream buffer full")
        if self._start and self._start >= len(self._buf) // 2:
            del self._buf[:self._start]
            self._start = 0
        self._buf += data
        self._check_length()

    def next(self) -> bytes | None:
        """The next whole message, or None if it has not fully arrived."""
        if self.buffered < LENGTH_SIZE:
            return None
        (size,) = _LENGTH.unpack_from(self._buf, self._start)
        end = self._start + LENGTH_SIZE + size
        if end > len(self._buf):
            return None
        message = bytes(self._buf[self._start + LENGTH_SIZE:end])
        self._start = end
        self._check_length()
        return message

    def _check_length(self) -> None:
        """Refuse the pending frame as soon as its length is known to be out of bounds."""
        if self.buffered >= LENGTH_SIZE:
            (size,) = _LENGTH.unpack_from(self._buf, self._start)
            if size < HEADER_SIZE:
                raise ParseError("frame shorter than a DNS header")
            if size > self.max_message:
                raise ParseError("oversized")
