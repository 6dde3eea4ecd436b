"""A tiny STUN (RFC 5389) Binding responder, stdlib only, for the NAT lab's miniupnpd (docs/lab.md:
with the lab's TEST-NET-3 WAN address it forwards nothing unless STUN tells it its public address).

Every Binding request gets a success response with XOR-MAPPED-ADDRESS (the request's source), plus
MAPPED-ADDRESS for an RFC 3489 client (no magic cookie), sent back from the port it came to.
CHANGE-REQUEST (RFC 5780) is ignored on purpose: miniupnpd calls the NAT "restrictive" unless all four
of its requests are answered with its own address and port. Anything else is dropped silently.

Usage: python -m lab.progs.stun BIND_ADDR [PORT]   (default port 3478). It prints one line
"stun listening on ADDR:PORT" once bound, then one line per answered request, and runs until killed.
"""

from __future__ import annotations

import socket
import struct
import sys

MAGIC_COOKIE = 0x2112A442
BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
ATTR_MAPPED_ADDRESS = 0x0001
ATTR_XOR_MAPPED_ADDRESS = 0x0020
FAMILY_IPV4 = 0x01


def binding_response(request: bytes, src: tuple[str, int]) -> bytes | None:
    """The response to one datagram, or None if it is not a well-formed Binding request."""
    if len(request) < 20:
        return None
    mtype, length, cookie = struct.unpack("!HHI", request[:8])
    if mtype != BINDING_REQUEST or length % 4 or 20 + length > len(request):
        return None  # (the top two bits of a STUN message are 0, so mtype == 1 also checks them)
    txid = request[8:20]
    addr = socket.inet_aton(src[0])
    port = src[1]
    cookie_bytes = struct.pack("!I", MAGIC_COOKIE)
    xaddr = bytes(a ^ c for a, c in zip(addr, cookie_bytes, strict=True))
    xport = port ^ (MAGIC_COOKIE >> 16)
    body = struct.pack("!HHBBH4s", ATTR_XOR_MAPPED_ADDRESS, 8, 0, FAMILY_IPV4, xport, xaddr)
    if cookie != MAGIC_COOKIE:  # RFC 3489 client: it only understands MAPPED-ADDRESS
        body += struct.pack("!HHBBH4s", ATTR_MAPPED_ADDRESS, 8, 0, FAMILY_IPV4, port, addr)
    return struct.pack("!HHI", BINDING_SUCCESS, len(body), cookie) + txid + body


def serve(bind_addr: str, port: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((bind_addr, port))
    print(f"stun listening on {bind_addr}:{port}", flush=True)
    while True:
        data, src = s.recvfrom(2048)
        reply = binding_response(data, src)
        if reply is not None:
            s.sendto(reply, src)
            print(f"answered {src[0]}:{src[1]}", flush=True)


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    serve(argv[1], int(argv[2]) if len(argv) == 3 else 3478)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
