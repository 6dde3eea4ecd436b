"""Fuzzing the two STUN endpoints of ours: the Binding client's receive and serve-dns's responder.

Invariants: the client's `receive` never raises and reports an observation only for an outstanding
transaction from its server; the responder returns None or a well-formed success or 420 that is at most
40 bytes longer than the request, and never raises.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunneld.dnsserver.stun import respond
from tunneld.proto import stun_wire as sw
from tunneld.proto.core import Address
from tunneld.proto.stun import Observed, StunClient

SERVER: Address = ("203.0.113.53", 3478)
TID = bytes([1]) * 12  # the client's first transaction ID (rand below)


def _answer(attrs: list[sw.Attribute], cls: int = sw.SUCCESS) -> bytes:
    return sw.encode(sw.BINDING, cls, TID, attrs, fingerprint=True)


GENUINE = [
    _answer([(sw.XOR_MAPPED_ADDRESS, sw.encode_xor_address(("198.51.100.7", 4500), TID))]),
    _answer([(sw.MAPPED_ADDRESS, sw.encode_address(("2001:db8::7", 9)))]),
    _answer([(sw.ERROR_CODE, sw.encode_error_code(420, "Unknown")),
             (sw.UNKNOWN_ATTRIBUTES, sw.encode_unknown_attributes([3]))], sw.ERROR),
    sw.encode(sw.BINDING, sw.REQUEST, TID, fingerprint=True),
    sw.encode(sw.BINDING, sw.REQUEST, TID, [(0x0024, b"\0\0\0\1"), (sw.SOFTWARE, b"x")]),
]


def _mutate(base: bytes, i: int, v: int) -> bytes:
    i %= len(base)
    return base[:i] + bytes([v]) + base[i + 1:]


payloads = st.one_of(
    st.binary(max_size=120),
    st.builds(lambda tail: GENUINE[0][:8] + TID + tail, st.binary(max_size=60)),
    st.builds(_mutate, st.sampled_from(GENUINE), st.integers(0, 10_000), st.integers(0, 255)),
    st.builds(lambda b, n: b[:n], st.sampled_from(GENUINE), st.integers(0, 80)),
)
sources = st.sampled_from([SERVER, ("::ffff:203.0.113.53", 3478), ("192.0.2.9", 3478), ("not an ip", 1)])


def _check(data: bytes, source: Address) -> None:
    c = StunClient([SERVER], lambda n: bytes([1]) * n)
    c.poll(0.0)
    c.transmits()
    c.receive(data, source, 0.1)
    for e in c.events():
        if isinstance(e, Observed):
            assert e.server == SERVER and sw.decode(data).transaction_id == TID
    answer = respond(data, source)
    if answer is not None:
        assert len(answer) <= len(data) + 40
        msg = sw.decode(answer)
        assert msg.cls in (sw.SUCCESS, sw.ERROR) and sw.check_fingerprint(msg)


# The decoder under both is fuzzed at 10k examples in test_stun_fuzz; here, what our two endpoints do
# with what it accepts, at a size the suite's time budget allows.
@settings(max_examples=1_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=payloads, source=sources)
def test_any_datagram_is_handled_or_dropped(data: bytes, source: Address) -> None:
    _check(data, source)
