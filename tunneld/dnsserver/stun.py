"""The rendezvous server's STUN Binding responder (RFC 8489): a request and its source in, the answer out.

So that a self-hoster needs one public machine, ``tunneld serve-dns`` tells the endpoint a NAT gave a
device (XOR-MAPPED-ADDRESS), on its DNS port and on any ``--stun`` port. No authentication and no state:
an answer is at most 40 bytes longer than its request (a success adds at most an IPv6 XOR-MAPPED-ADDRESS
and FINGERPRINT, 32 bytes), and the listeners rate-limit it per source prefix as they do DNS replies, so
the server is no useful reflector. docs/nat.md, "STUN".
"""

from __future__ import annotations

from collections import Counter

from tunneld.proto import stun_wire as wire
from tunneld.proto.core import Address
from tunneld.proto.errors import ParseError
from tunneld.proto.stun import normal_address

__all__ = ["UNDERSTOOD", "respond"]

# The comprehension-required attributes of RFC 8489 §18.3 a Binding request may carry: understood in the
# sense of §6.3.1, ignored by a server without authentication. Anything else below 0x8000 (ICE's
# PRIORITY, RFC 5780's CHANGE-REQUEST, TURN's attributes) is answered with 420 Unknown Attribute.
UNDERSTOOD = frozenset({
    wire.MAPPED_ADDRESS, wire.USERNAME, wire.MESSAGE_INTEGRITY, wire.ERROR_CODE, wire.UNKNOWN_ATTRIBUTES,
    wire.REALM, wire.NONCE, wire.MESSAGE_INTEGRITY_SHA256, wire.PASSWORD_ALGORITHM, wire.USERHASH,
    wire.XOR_MAPPED_ADDRESS,
})
UNKNOWN_ATTRIBUTE = 420  # RFC 8489 §14.8
_MAX_UNKNOWN = 8  # types listed in a 420 (each cost the sender at least 4 bytes; the answer stays small)


def respond(request: bytes, source: Address, *, software: str | None = None,
            counters: Counter[str] | None = None) -> bytes | None:
    """The answer to one datagram from ``source``, or None (not a well-formed Binding request: dropped).

    A success carries XOR-MAPPED-ADDRESS (§14.2), SOFTWARE if given (§14.14) and FINGERPRINT (§14.7);
    unknown comprehension-required attributes get a 420 error with UNKNOWN-ATTRIBUTES (§6.3.1).
    What was dropped and why is counted in ``counters``."""
    count = counters if counters is not None else Counter()
    try:
        msg = wire.decode(request)
    except ParseError as e:
        count[f"stun parse error: {e}"] += 1
        return None
    if msg.cls != wire.REQUEST or msg.method != wire.BINDING:
        count["stun: not a binding request"] += 1  # indications get no answer (§6.3.2); nor do others
        return None
    if msg.get(wire.FINGERPRINT) is not None and not wire.check_fingerprint(msg):
        count["stun: bad fingerprint"] += 1
        return None
    try:
        client = normal_address(source)  # an IPv4 client of a dual-stack socket is told its IPv4 address
    except ValueError:
        count["stun: bad source"] += 1
        return None
    extra = [] if software is None else [(wire.SOFTWARE, software.encode()[: wire.MAX_TEXT - 1])]
    unknown = msg.unknown_required(UNDERSTOOD)
    if unknown:
        count["stun: 420 unknown attribute"] += 1
        attrs = [(wire.ERROR_CODE, wire.encode_error_code(UNKNOWN_ATTRIBUTE, "Unknown Attribute")),
                 (wire.UNKNOWN_ATTRIBUTES, wire.encode_unknown_attributes(unknown[:_MAX_UNKNOWN])), *extra]
        return wire.encode(wire.BINDING, wire.ERROR, msg.transaction_id, attrs, fingerprint=True)
    count["stun: answered"] += 1
    attrs = [(wire.XOR_MAPPED_ADDRESS, wire.encode_xor_address(client, msg.transaction_id)), *extra]
    return wire.encode(wire.BINDING, wire.SUCCESS, msg.transaction_id, attrs, fingerprint=True)
