"""The TSIG signer of the LLQ server's fan-out (tunneld.proto.tsig.TsigSigner): byte for byte what
dnspython's own TSIG signing gives for the same message, key, time, fudge, request MAC, error and other
data, over many random inputs and under hypothesis; and what our verify accepts."""

from __future__ import annotations

import copy
import pickle
import random
import struct

import dns.flags
import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TSIG
import dns.tsig
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunneld.proto.llq_wire import LLQOption
from tunneld.proto.tsig import TsigKey, TsigSigner, find_tsig, sign, verify

KEYS = [
    TsigKey(dns.name.from_text("Account.Example.COM."), bytes(range(32))),
    TsigKey(dns.name.from_text("front.example.net."), b"k" * 7, "hmac-md5"),
    TsigKey(dns.name.from_text("x."), bytes(64), "hmac-sha256"),
]


def reference(wire: bytes, key: TsigKey, time_signed: int, fudge: int, request_mac: bytes, error: int,
              other: bytes) -> bytes:
    """dnspython's TSIG over ``wire``, appended as RFC 8945 §4.2 lays the RR out (names lower-cased, as
    ours writes them; dnspython would keep the algorithm name's case in the RR, outside the MAC)."""
    original_id = struct.unpack_from("!H", wire)[0]
    rdata = dns.rdtypes.ANY.TSIG.TSIG(dns.rdataclass.ANY, dns.rdatatype.TSIG,
                                      key.algorithm_name.canonicalize(), time_signed,
                                      fudge, b"", original_id, error, other)
    tsig, _ctx = dns.tsig.sign(wire, key.dnspython(), rdata, time_signed, request_mac or None)
    rd = tsig.to_digestable()
    rr = key.name.to_digestable() + struct.pack("!HHIH", 250, 255, 0, len(rd)) + rd
    arcount = struct.unpack_from("!H", wire, 10)[0] + 1
    return wire[:10] + struct.pack("!H", arcount) + wire[12:] + rr


def check_one(wire: bytes, key: TsigKey, time_signed: int, fudge: int, request_mac: bytes, error: int,
              other: bytes) -> None:
    want = reference(wire, key, time_signed, fudge, request_mac, error, other)
    signer = TsigSigner(key, time_signed, fudge, error, other)
    got, mac = signer.sign(wire, request_mac)
    assert got == want
    assert signer.sign(wire, request_mac) == (got, mac)  # the signer is reusable
    assert sign(wire, key, time_signed, request_mac, fudge, error, other) == (got, mac)


def random_wire(rnd: random.Random) -> bytes:
    """A header (any ID and flags, ARCOUNT below 65535) and a body of random bytes: sign reads no more."""
    header = struct.pack("!HHHHHH", rnd.randrange(65536), rnd.randrange(65536), rnd.randrange(3),
                         rnd.randrange(3), rnd.randrange(3), rnd.randrange(65535))
    return header + rnd.randbytes(rnd.randrange(0, 600))


def test_byte_for_byte_with_dnspython_over_random_inputs() -> None:
    rnd = random.Random(18)
    for _ in range(400):
        key = rnd.choice(KEYS)
        check_one(random_wire(rnd), key, rnd.randrange(1 << 48), rnd.randrange(65536),
                  rnd.choice([b"", rnd.randbytes(32), rnd.randbytes(16)]), rnd.choice([0, 0, 16, 18]),
                  rnd.choice([b"", b"", rnd.randbytes(6)]))


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=300), msg_id=st.integers(0, 65535), arcount=st.integers(0, 65534),
       time_signed=st.integers(0, (1 << 48) - 1), fudge=st.integers(0, 65535),
       request_mac=st.binary(max_size=40), other=st.binary(max_size=8), key_index=st.integers(0, 2))
def test_byte_for_byte_with_dnspython_hypothesis(body: bytes, msg_id: int, arcount: int, time_signed: int,
                                                 fudge: int, request_mac: bytes, other: bytes,
                                                 key_index: int) -> None:
    wire = struct.pack("!HHHHHH", msg_id, 0x8400, 1, 0, 0, arcount) + body
    check_one(wire, KEYS[key_index], time_signed, fudge, request_mac, 0, other)


def test_a_signed_event_verifies() -> None:
    """A real message (an LLQ event's layout) signed by the signer passes our verify."""
    msg = dns.message.Message(id=0x1234)
    msg.flags = dns.flags.QR | dns.flags.AA
    msg.find_rrset(msg.question, dns.name.from_text("a.example.com."), dns.rdataclass.IN, dns.rdatatype.AAAA,
                   create=True)
    msg.use_edns(0, payload=1232, options=[LLQOption(1, 3, 0, 0xABCDEF, 3600)])
    wire = msg.to_wire()
    for key in KEYS:
        got, mac = TsigSigner(key, 1_800_000_000, 300).sign(wire)
        assert got == reference(wire, key, 1_800_000_000, 300, b"", 0, b"")
        tsig = find_tsig(got)
        assert tsig is not None and tsig.mac == mac and tsig.original_id == 0x1234
        assert verify(got, key, b"", 1_800_000_100) == tsig


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="time signed"):
        TsigSigner(KEYS[0], 1 << 48)
    with pytest.raises(ValueError, match="not a DNS message"):
        TsigSigner(KEYS[0], 0).sign(b"\x00" * 11)
    with pytest.raises(ValueError, match="additional"):
        TsigSigner(KEYS[0], 0).sign(struct.pack("!6H", 1, 0, 0, 0, 0, 65535))


def test_a_key_context_is_fresh_each_time() -> None:
    """The keyed HMAC is copied, never shared: feeding one context leaves the next one clean."""
    key = KEYS[0]
    a = key.context(b"one")
    a.update(b"more")
    assert key.mac(b"one") == key.context(b"one").digest() != a.digest()
    for other in (copy.copy(key), copy.deepcopy(key), pickle.loads(pickle.dumps(key))):
        assert other == key and other.mac(b"one") == key.mac(b"one")
