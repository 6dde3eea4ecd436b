"""The untrusted DNS parsers raise ParseError and nothing else, at realistic sizes.

Invariant (stated first, as a fuzz harness should): for any bytes up to 64 KB -- well-formed messages
with many records and compression pointers, and those messages cut, bit-flipped, spliced or padded --
:func:`dnswire.walk`, :func:`tsig.find_tsig`, :func:`tsig.verify`, :func:`llq_wire.parse_message`,
:func:`dnswire.decode_update_lease` and the LLQ option parser either return or raise ParseError (TsigError
for a TSIG that does not verify); and the cores' ``receive`` never raises at all.
"""

from __future__ import annotations

import contextlib
import random

import dns.exception
import dns.message
import dns.name
import dns.rdata
import dns.rrset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunneld.proto import dnswire
from tunneld.proto.dnsupdate import Publisher
from tunneld.proto.errors import ParseError
from tunneld.proto.llq import (
    LLQClient,
)
from tunneld.proto.llq_wire import (
    parse_llq_option,
    parse_message,
)
from tunneld.proto.tsig import TsigError, TsigKey, find_tsig, sign, verify
from tunneld.proto.watcher import Watcher

ZONE = dns.name.from_text("example.com.")
KEY = TsigKey(ZONE, bytes(range(32)))
T = 1_700_000_000


def big_message(rnd: random.Random, records: int, txt_size: int) -> bytes:
    """A response with ``records`` TXT/A/SRV records under a few names (so names compress), up to 64 KB,
    signed or not."""
    msg = dns.message.make_response(dns.message.make_query("q.example.com.", "ANY", id=rnd.getrandbits(16)))
    names = [dns.name.from_text(f"h{i}.sub{rnd.randrange(3)}", ZONE) for i in range(1 + records // 8)]
    for _ in range(records):
        name = rnd.choice(names)
        kind = rnd.randrange(3)
        if kind == 0:
            text = "".join(rnd.choice("abcdef") for _ in range(rnd.randrange(txt_size + 1)))
            rd = dns.rdata.from_text("IN", "TXT", f'"{text}"')
        elif kind == 1:
            rd = dns.rdata.from_text("IN", "A", f"192.0.2.{rnd.randrange(256)}")
        else:
            rd = dns.rdata.from_text("IN", "SRV", f"0 0 {rnd.randrange(65536)} {rnd.choice(names)}")
        section = rnd.choice([msg.answer, msg.authority, msg.additional])
        section.append(dns.rrset.from_rdata(name, rnd.choice([0, 60, 0xFFFFFFFF]), rd))
    while True:
        try:
            wire = msg.to_wire(max_size=dnswire.MAX_MESSAGE - 200)  # room for a TSIG
            break
        except dns.exception.TooBig:
            for section in (msg.answer, msg.authority, msg.additional):
                del section[len(section) // 2:]
    if rnd.random() < 0.5:
        wire, _ = sign(wire, KEY, T)
    return wire


def mutate(rnd: random.Random, wire: bytes) -> bytes:
    data = bytearray(wire)
    for _ in range(rnd.randrange(4)):
        op = rnd.randrange(5)
        if op == 0 and data:
            del data[rnd.randrange(len(data)):]  # truncate
        elif op == 1 and data:
            i = rnd.randrange(len(data))
            data[i] ^= 1 << rnd.randrange(8)  # flip a bit
        elif op == 2 and data:
            i = rnd.randrange(len(data))
            data[i:i + 2] = bytes([0xC0 | rnd.randrange(64), rnd.randrange(256)])  # a (bad) pointer
        elif op == 3:
            data += rnd.randbytes(rnd.randrange(64))  # trailing junk
        elif op == 4 and len(data) > 12:
            data[4:12] = rnd.randbytes(8)  # section counts
    return bytes(data[:dnswire.MAX_MESSAGE + 16])


def only_parse_errors(data: bytes) -> None:
    for parser in (dnswire.walk, find_tsig, parse_message, dnswire.decode_update_lease, parse_llq_option):
        with contextlib.suppress(ParseError):
            parser(data)
    with contextlib.suppress(ParseError, TsigError):
        verify(data, KEY, b"", T)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), records=st.integers(0, 600), txt_size=st.integers(0, 200))
def test_big_and_mutated_messages_raise_only_parse_error(seed: int, records: int, txt_size: int) -> None:
    rnd = random.Random(seed)
    wire = big_message(rnd, records, txt_size)
    assert len(wire) <= dnswire.MAX_MESSAGE
    framed = dnswire.walk(wire)  # the well-formed message walks, its records all seen
    assert len(framed) == sum(int.from_bytes(wire[i:i + 2], "big") for i in (6, 8, 10))
    for _ in range(8):
        only_parse_errors(mutate(rnd, wire))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=4096))
def test_random_bytes_raise_only_parse_error(data: bytes) -> None:
    only_parse_errors(data)
    only_parse_errors(data + bytes(dnswire.MAX_MESSAGE))  # oversized


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), records=st.integers(0, 300))
def test_cores_never_raise_on_received_garbage(seed: int, records: int) -> None:
    rnd = random.Random(seed)
    server = ("192.0.2.53", 53)
    publisher = Publisher(ZONE, ZONE, KEY.secret, rand=rnd.randbytes, server=server)
    publisher.publish([dns.rrset.from_text("h.example.com.", 60, "IN", "A", "192.0.2.1")], T)
    client = LLQClient("q.example.com.", "ANY", server=server, rand=rnd.randbytes)
    client.start(T)
    watcher = Watcher("example.com", "me", server=server, rand=rnd.randbytes, key=KEY)
    watcher.start(T)
    wire = big_message(rnd, records, 40)
    for data in [wire] + [mutate(rnd, wire) for _ in range(4)]:
        publisher.receive(data, server, T)
        client.receive(data, server, T)
        watcher.receive(data, server, T)
