"""Fuzzing the NAT-PMP and PCP reply parsers and the port mapper's receive path.

Invariant: for any bytes up to 64 KB, :func:`parse_natpmp_response` and :func:`parse_pcp_response`
return a response or raise ParseError; what they return is what the gateway encoded (round trip);
and a started :class:`PortMapper` fed any sequence of datagrams, answers and announcements, from its
gateway or elsewhere, never raises and counts every datagram it cannot parse under the parser's reason.

Examples are built from a seed: valid replies of both protocols (successes, errors in the short and
full forms, announcements, PCP options), their mutations (cuts, bit flips, a wrong version, opcode or
R bit, padding, options cut short), and random bytes up to 64 KB.
"""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunneld.proto.errors import ParseError
from tunneld.proto.portmap.mapper import PortMapper
from tunneld.proto.portmap.natpmp_wire import (
    NatPmpAddressResponse,
    NatPmpMapResponse,
    encode_natpmp_address_response,
    encode_natpmp_error,
    encode_natpmp_map_response,
    parse_natpmp_response,
)
from tunneld.proto.portmap.pcp_wire import (
    PCP_MAX_MESSAGE_LEN,
    PCP_OP_ANNOUNCE,
    PCP_OP_MAP,
    PcpResponse,
    encode_pcp_map_response,
    encode_pcp_response,
    parse_pcp_response,
)

GATEWAY = "192.168.1.1"
SERVER_PORT = 5351
INTERNAL = ("192.168.1.20", 4500)

SLOW = settings(max_examples=10_000, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
QUICK = settings(max_examples=300, deadline=None)
seeds = st.integers(0, 2**64 - 1)


def _address(rnd: random.Random) -> str:
    return rnd.choice(["203.0.113.7", "100.64.0.9", "10.0.0.1", "0.0.0.0", "255.255.255.255",
                       f"198.51.100.{rnd.randrange(256)}"])


def _options(rnd: random.Random) -> bytes:
    out = b""
    for _ in range(rnd.choice([0, 0, 0, 1, 2, 5])):
        data = rnd.randbytes(rnd.choice([0, 1, 4, 7, 20]))
        out += struct.pack("!BBH", rnd.randrange(256), 0, len(data)) + data + bytes(-len(data) % 4)
    return out


def valid(rnd: random.Random, nonce: bytes = bytes(12)) -> bytes:
    """A gateway's reply: NAT-PMP or PCP, success or error, announcement or answer."""
    epoch, port = rnd.randrange(1 << 32), rnd.randrange(65536)
    lifetime = rnd.choice([0, 1, 120, 7200, 1 << 31])
    result = rnd.choice([0, 0, 0, 1, 2, 3, 4, 5, 8, 11, 200])
    kind = rnd.randrange(6)
    if kind == 0:
        return encode_natpmp_address_response(epoch, _address(rnd), result)
    if kind == 1:
        return encode_natpmp_map_response(epoch, INTERNAL[1], port, lifetime, result, rnd.choice([1, 2]))
    if kind == 2:
        return encode_natpmp_error(rnd.choice([0, 1, 2]), result or 3, epoch)
    if kind == 3:
        return encode_pcp_response(PCP_OP_ANNOUNCE, result, 0, epoch, _options(rnd))
    if kind == 4:
        return encode_pcp_response(PCP_OP_MAP, result or 2, lifetime, epoch)  # an error without the body
    reply = encode_pcp_map_response(nonce if rnd.random() < 0.7 else rnd.randbytes(12), INTERNAL[1], port,
                                    _address(rnd), lifetime, epoch, result, rnd.choice([17, 17, 6]))
    return reply + _options(rnd)


def mutate(rnd: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rnd.randrange(1, 4)):
        op = rnd.randrange(6)
        if op == 0 and out:
            del out[rnd.randrange(len(out)):]
        elif op == 1 and out:
            out[rnd.randrange(len(out))] ^= 1 << rnd.randrange(8)
        elif op == 2 and out:
            out[0] = rnd.choice([0, 1, 2, 3, 255])  # version
        elif op == 3 and len(out) > 1:
            out[1] = rnd.choice([0, 1, 2, 3, 0x80, 0x81, 0x82, 0x83, 0xFF])  # opcode and R bit
        elif op == 4:
            out += bytes(rnd.choice([1, 2, 4, 8, 1100]))
        elif op == 5 and len(out) > 64:
            out[62:64] = struct.pack("!H", rnd.choice([3, 1000, 65535]))  # an option's length
    return bytes(out)


def datagram(rnd: random.Random, nonce: bytes = bytes(12)) -> bytes:
    r = rnd.random()
    if r < 0.35:
        return valid(rnd, nonce)
    if r < 0.85:
        return mutate(rnd, valid(rnd, nonce))
    return rnd.randbytes(rnd.choice([0, 1, 2, 8, 12, 16, 24, 60, 1100, 1104, 9000, 65535]))


# -- the parsers -------------------------------------------------------------------------------------------


def parsers_property(data: bytes) -> None:
    try:
        natpmp = parse_natpmp_response(data)
    except ParseError:
        pass
    else:
        assert isinstance(natpmp, NatPmpAddressResponse | NatPmpMapResponse) and len(data) in (8, 12, 16)
    try:
        pcp = parse_pcp_response(data)
    except ParseError:
        pass
    else:
        assert isinstance(pcp, PcpResponse) and 24 <= len(data) <= PCP_MAX_MESSAGE_LEN
        assert pcp.opcode in (PCP_OP_ANNOUNCE, PCP_OP_MAP)


@QUICK
@given(seed=seeds)
def test_parsers_raise_only_parse_error(seed: int) -> None:
    parsers_property(datagram(random.Random(seed)))


@pytest.mark.slow
@SLOW
@given(seed=seeds)
def test_parsers_raise_only_parse_error_10k(seed: int) -> None:
    parsers_property(datagram(random.Random(seed)))


@settings(max_examples=2000, deadline=None)  # the 10k run above covers random bytes up to 64 KB
@given(data=st.binary(max_size=1200))
def test_parsers_on_hypothesis_bytes(data: bytes) -> None:
    parsers_property(data)
    parsers_property(b"\x00" + data)  # NAT-PMP's version
    parsers_property(b"\x02\x81" + data)  # a PCP MAP response header's start


@QUICK
@given(epoch=st.integers(0, 2**32 - 1), lifetime=st.integers(0, 2**32 - 1), port=st.integers(0, 65535),
       result=st.integers(0, 255), address=st.ip_addresses(v=4).map(str), nonce=st.binary(min_size=12,
                                                                                         max_size=12))
def test_replies_round_trip(epoch: int, lifetime: int, port: int, result: int, address: str,
                            nonce: bytes) -> None:
    assert parse_natpmp_response(encode_natpmp_address_response(epoch, address, result)) == \
        NatPmpAddressResponse(result, epoch, address)
    assert parse_natpmp_response(encode_natpmp_map_response(epoch, 4500, port, lifetime, result)) == \
        NatPmpMapResponse(1, result, epoch, 4500, port, lifetime)
    pcp = parse_pcp_response(encode_pcp_map_response(nonce, 4500, port, address, lifetime, epoch, result))
    assert (pcp.result, pcp.lifetime, pcp.epoch) == (result, lifetime, epoch)
    assert pcp.map is not None and (pcp.map.nonce, pcp.map.external_port, pcp.map.external_address) == \
        (nonce, port, address)


# -- the mapper ----------------------------------------------------------------------------------------------


def _reason(data: bytes) -> str | None:
    """The mapper's counter for a datagram it cannot parse (it picks the parser by the version byte)."""
    parser = {0: parse_natpmp_response, 2: parse_pcp_response}.get(data[0]) if data else None
    if parser is None:
        return "parse error: truncated" if not data else "parse error: version"
    try:
        parser(data)
    except ParseError as e:
        return f"parse error: {e}"
    return None


def mapper_property(rnd: random.Random) -> None:
    mapper = PortMapper(INTERNAL[0], INTERNAL[1], GATEWAY, rand=random.Random(rnd.random()).randbytes)
    now = 1000.0
    mapper.start(now)
    for _ in range(rnd.randrange(1, 12)):
        data = datagram(rnd, mapper.nonce)
        source = (GATEWAY, SERVER_PORT) if rnd.random() < 0.8 else rnd.choice(
            [(GATEWAY, 5350), (GATEWAY, 9999), ("192.168.1.2", SERVER_PORT)])
        reason = _reason(data) if source[0] == GATEWAY else None
        before = mapper.counters[reason] if reason else 0
        mapper.receive(data, source, now)
        if reason:
            assert mapper.counters[reason] == before + 1
        mapper.transmits()
        mapper.events()
        now += rnd.choice([0.0, 0.3, 5.0, 4000.0])
        if rnd.random() < 0.3:
            mapper.poll(now)
        if rnd.random() < 0.05:
            mapper.close(now)
        deadline = mapper.deadline()
        assert deadline is None or isinstance(deadline, float)
        assert mapper.state.gateway == GATEWAY


@QUICK
@given(seed=seeds)
def test_mapper_receive_never_raises_and_counts(seed: int) -> None:
    mapper_property(random.Random(seed))


@pytest.mark.slow
@SLOW
@given(seed=seeds)
def test_mapper_receive_never_raises_and_counts_10k(seed: int) -> None:
    mapper_property(random.Random(seed))


def test_the_mix_reaches_answers_the_mapper_takes() -> None:
    """Not vacuous: valid answers with the mapper's nonce map a port, and mutations hit every refusal."""
    granted = 0
    reasons: set[str] = set()
    for seed in range(400):
        rnd = random.Random(seed)
        mapper = PortMapper(INTERNAL[0], INTERNAL[1], GATEWAY, rand=rnd.randbytes)
        mapper.start(1000.0)
        for _ in range(5):
            data = datagram(rnd, mapper.nonce)
            reason = _reason(data)
            if reason:
                reasons.add(reason)
            mapper.receive(data, (GATEWAY, SERVER_PORT), 1000.0)
        granted += mapper.state.external_port is not None
    assert granted > 10
    assert {"parse error: truncated", "parse error: oversized", "parse error: version",
            "parse error: not a response", "parse error: opcode", "parse error: length"} <= reasons, reasons
