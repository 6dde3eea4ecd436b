"""tunneld's wire protocols as pure, sans-I/O code: parsers and state machines that take bytes and the time
as arguments and return bytes and events, never touching a socket or a clock.

- :mod:`tunneld.proto.errors` -- :class:`~tunneld.proto.errors.ParseError`, raised by every parser of
  network input.
- :mod:`tunneld.proto.handshake` -- the Noise IKpsk2 handshake (WireGuard's messages behind the RFC 3948
  non-ESP marker) that keys the ESP security associations.
"""
