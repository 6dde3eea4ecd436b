"""NAT-PMP (RFC 6886) and PCP (RFC 6887) on the wire: encoders, bounded parsers, result messages, addresses.

The hex fixtures are constructed examples (built by a script from the field layouts, then reviewed by hand
against RFC 6886 §3.2/§3.3/§3.5 and RFC 6887 §7.1/§7.2/§11.1): there are no public packet KATs for these
protocols. The PCP response and ANNOUNCE hex below were written by hand field by field in the same way.
"""

from __future__ import annotations

import contextlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunneld.proto.errors import ParseError
from tunneld.proto.portmap.addresses import external_address_problem, is_private_v4
from tunneld.proto.portmap.natpmp_wire import (
    NatPmpAddressResponse,
    NatPmpMapResponse,
    encode_natpmp_address_request,
    encode_natpmp_address_response,
    encode_natpmp_error,
    encode_natpmp_map_request,
    encode_natpmp_map_response,
    natpmp_result_message,
    parse_natpmp_response,
)
from tunneld.proto.portmap.pcp_wire import (
    PCP_MAX_MESSAGE_LEN,
    PCP_OP_ANNOUNCE,
    PcpMap,
    PcpResponse,
    encode_pcp_announce_request,
    encode_pcp_map_request,
    encode_pcp_map_response,
    encode_pcp_response,
    parse_pcp_response,
    pcp_result_message,
)

# -- constructed examples -----------------------------------------------------------------------------

HEX_ADDR_REQUEST = "0000"
HEX_ADDR_RESPONSE = "00800000000004d2c6336407"  # SSSoE 1234, 198.51.100.7
HEX_MAP_REQUEST = "000100001194119400001c20"  # UDP 4500 -> 4500, 7200 s
HEX_MAP_RESPONSE = "00810000000004d81194ee4900001c20"  # SSSoE 1240, 4500 -> 61001, 7200 s
HEX_DELETE = "000100001194000000000000"  # UDP 4500, lifetime 0, suggested port 0
HEX_UNSUPPORTED_VERSION = "00810001000004d8"  # 8 bytes: the answer of a NAT-PMP-only box to a PCP MAP
HEX_PCP_MAP_REQUEST = (
    "0201000000001c20" "00000000000000000000ffffc0000221"  # v2, MAP, lifetime 7200, client 192.0.2.33
    "0102030405060708090a0b0c" "11000000" "1194" "0000"  # nonce, UDP + reserved, port 4500, no suggestion
    "00000000000000000000ffff00000000"  # suggested external address ::ffff:0.0.0.0
)
# Hand-built: PCP MAP success response, lifetime 7200, epoch 1234, same nonce, 4500 -> 61001 @ 198.51.100.7.
HEX_PCP_MAP_RESPONSE = (
    "02810000" "00001c20" "000004d2" "000000000000000000000000"
    "0102030405060708090a0b0c" "11000000" "1194" "ee49" "00000000000000000000ffffc6336407"
)
HEX_PCP_ANNOUNCE = "02800000" "00000000" "000004d2" "000000000000000000000000"  # unsolicited, epoch 1234
HEX_PCP_ANNOUNCE_REQUEST = "0200000000000000" "00000000000000000000ffffc0000221"

NONCE = bytes(range(1, 13))
GW = "192.168.1.1"
ME = "192.168.1.20"
PORT = 4500
GW_SRC = (GW, 5351)
PUBLIC = "198.51.100.7"


# -- encoders against the fixtures -----------------------------------------------------------------------


def test_natpmp_encoders_match_fixtures() -> None:
    assert encode_natpmp_address_request().hex() == HEX_ADDR_REQUEST
    assert encode_natpmp_address_response(1234, PUBLIC).hex() == HEX_ADDR_RESPONSE
    assert encode_natpmp_map_request(4500, 4500, 7200).hex() == HEX_MAP_REQUEST
    assert encode_natpmp_map_response(1240, 4500, 61001, 7200).hex() == HEX_MAP_RESPONSE
    assert encode_natpmp_map_request(4500, 0, 0).hex() == HEX_DELETE
    assert encode_natpmp_error(1, 1, 1240).hex() == HEX_UNSUPPORTED_VERSION
    # TCP uses opcode 2 / 130; everything else is the same.
    assert encode_natpmp_map_request(4500, 4500, 7200, opcode=2).hex() == "0002" + HEX_MAP_REQUEST[4:]
    tcp = encode_natpmp_map_response(1240, 4500, 61001, 7200, opcode=2)
    assert tcp.hex() == "0082" + HEX_MAP_RESPONSE[4:]
    with pytest.raises(ValueError):
        encode_natpmp_map_request(4500, 4500, 7200, opcode=0)


def test_pcp_encoders_match_fixtures() -> None:
    assert encode_pcp_map_request(NONCE, "192.0.2.33", 4500, 7200).hex() == HEX_PCP_MAP_REQUEST
    assert len(bytes.fromhex(HEX_PCP_MAP_REQUEST)) == 60
    assert encode_pcp_map_response(NONCE, 4500, 61001, PUBLIC, 7200, 1234).hex() == HEX_PCP_MAP_RESPONSE
    assert encode_pcp_response(PCP_OP_ANNOUNCE, 0, 0, 1234).hex() == HEX_PCP_ANNOUNCE
    assert encode_pcp_announce_request("192.0.2.33").hex() == HEX_PCP_ANNOUNCE_REQUEST
    # A suggested external address is IPv4-mapped (RFC 6887 §5).
    suggested = encode_pcp_map_request(NONCE, "192.0.2.33", 4500, 7200, 61001, PUBLIC)
    assert suggested[-20:].hex() == "1194" "ee49" "00000000000000000000ffffc6336407"
    with pytest.raises(ValueError):
        encode_pcp_map_request(b"short", "192.0.2.33", 4500, 7200)

# -- parsers ---------------------------------------------------------------------------------------------


def test_parse_natpmp_responses() -> None:
    assert parse_natpmp_response(bytes.fromhex(HEX_ADDR_RESPONSE)) == NatPmpAddressResponse(0, 1234, PUBLIC)
    assert parse_natpmp_response(bytes.fromhex(HEX_MAP_RESPONSE)) == NatPmpMapResponse(
        1, 0, 1240, 4500, 61001, 7200)
    assert parse_natpmp_response(bytes.fromhex(HEX_UNSUPPORTED_VERSION)) == NatPmpMapResponse(
        1, 1, 1240, None, None, None)
    tcp = parse_natpmp_response(encode_natpmp_map_response(7, 22, 2222, 60, opcode=2))
    assert tcp == NatPmpMapResponse(2, 0, 7, 22, 2222, 60)
    # An error may also come in full size, or 8 bytes for the address request.
    assert parse_natpmp_response(encode_natpmp_map_response(9, 4500, 0, 0, result=2)).result == 2
    assert parse_natpmp_response(encode_natpmp_error(0, 3, 9)) == NatPmpAddressResponse(3, 9, None)
    # Delete answer: lifetime 0, external port 0.
    deleted = parse_natpmp_response(encode_natpmp_map_response(9, 4500, 0, 0))
    assert isinstance(deleted, NatPmpMapResponse)
    assert (deleted.lifetime, deleted.external_port) == (0, 0)


def test_parse_pcp_responses() -> None:
    r = parse_pcp_response(bytes.fromhex(HEX_PCP_MAP_RESPONSE))
    assert r == PcpResponse(1, 0, 7200, 1234, PcpMap(NONCE, 17, 4500, 61001, PUBLIC))
    assert parse_pcp_response(bytes.fromhex(HEX_PCP_ANNOUNCE)) == PcpResponse(0, 0, 0, 1234)
    # An error reply without the MAP body (header only) is accepted.
    assert parse_pcp_response(encode_pcp_response(1, 8, 30, 5)) == PcpResponse(1, 8, 30, 5)
    # Reserved fields are ignored on receipt (§7.2, §11.1).
    raw = bytearray(bytes.fromhex(HEX_PCP_MAP_RESPONSE))
    raw[2] = 0xFF
    raw[12:24] = b"\xff" * 12
    raw[37:40] = b"\xff\xff\xff"
    assert parse_pcp_response(bytes(raw)).map == r.map
    # Options after the body are framed and kept: code 0x80, length 5, padded to 8.
    opt = bytes.fromhex("80000005") + b"abcde" + b"\x00" * 3
    with_opt = parse_pcp_response(bytes.fromhex(HEX_PCP_MAP_RESPONSE) + opt)
    assert with_opt.options == ((0x80, b"abcde"),)
    # An IPv6 external address is reported as such.
    v6 = bytearray(bytes.fromhex(HEX_PCP_MAP_RESPONSE))
    v6[44:60] = bytes.fromhex("20010db8000000000000000000000001")
    assert parse_pcp_response(bytes(v6)).map.external_address == "2001:db8::1"  # type: ignore[union-attr]


@pytest.mark.parametrize(("data", "reason"), [
    ("", "truncated"),
    ("00", "truncated"),
    ("00800000000004", "truncated"),  # 7 bytes
    ("00800000000004d2", None),  # 8 bytes with success: an address response must be 12
    ("00810000000004d81194ee49", "truncated"),  # 12-byte map success
    ("00810002000004d81194", "truncated"),  # a 10-byte error: neither 8 nor full size
    (HEX_ADDR_RESPONSE + "00", "oversized"),
    (HEX_MAP_RESPONSE + "0000", "oversized"),
    ("01" + HEX_ADDR_RESPONSE[2:], "version"),
    ("02" + HEX_ADDR_RESPONSE[2:], "version"),
    ("0000" + HEX_ADDR_RESPONSE[4:], "not a response"),
    ("0001" + HEX_MAP_RESPONSE[4:], "not a response"),
    ("0083" + HEX_MAP_RESPONSE[4:], "opcode"),
])
def test_natpmp_parse_errors(data: str, reason: str | None) -> None:
    with pytest.raises(ParseError) as info:
        parse_natpmp_response(bytes.fromhex(data))
    assert reason is None or str(info.value) == reason
    if reason is None:
        assert str(info.value) == "truncated"


@pytest.mark.parametrize(("data", "reason"), [
    (HEX_PCP_ANNOUNCE[:-8], "truncated"),  # 20 bytes
    (HEX_PCP_MAP_RESPONSE[:48], "truncated"),  # MAP success, header only
    (HEX_PCP_MAP_RESPONSE[:96], "truncated"),  # MAP error cut inside the body
    (HEX_PCP_MAP_RESPONSE + "00" * (1100 - 60 + 4), "oversized"),
    (HEX_PCP_MAP_RESPONSE + "0000", "length"),
    ("01" + HEX_PCP_MAP_RESPONSE[2:], "version"),
    ("0201" + HEX_PCP_MAP_RESPONSE[4:], "not a response"),
    ("0282" + HEX_PCP_MAP_RESPONSE[4:], "opcode"),  # PEER: not ours
    (HEX_PCP_MAP_RESPONSE + "80000008" + "00000000", "truncated option"),
    (HEX_PCP_ANNOUNCE + "8000", "length"),
])
def test_pcp_parse_errors(data: str, reason: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_pcp_response(bytes.fromhex(data))
    assert str(info.value) == reason


def test_pcp_error_body_truncated_differs_from_header_only() -> None:
    err = bytearray(bytes.fromhex(HEX_PCP_MAP_RESPONSE))
    err[3] = 2  # NOT_AUTHORIZED with the full body echoed
    assert parse_pcp_response(bytes(err)).result == 2
    assert parse_pcp_response(bytes(err[:24])).map is None


def test_parsers_raise_only_parse_error_on_random_input() -> None:
    rng = random.Random(6886)
    seeds = [bytes.fromhex(h) for h in (HEX_ADDR_RESPONSE, HEX_MAP_RESPONSE, HEX_UNSUPPORTED_VERSION,
                                        HEX_PCP_MAP_RESPONSE, HEX_PCP_ANNOUNCE)]
    for _ in range(3000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = data[:rng.randrange(len(data) + 1)] + bytes(rng.randrange(3) * rng.randrange(9))
        for parse in (parse_natpmp_response, parse_pcp_response):
            with contextlib.suppress(ParseError):
                parse(bytes(data))


# Realistic sizes: anything up to PCP's largest message and a little beyond, raw or behind a valid header.
SEEDS = [bytes.fromhex(h) for h in (HEX_ADDR_RESPONSE, HEX_MAP_RESPONSE, HEX_UNSUPPORTED_VERSION,
                                     HEX_PCP_MAP_RESPONSE, HEX_PCP_ANNOUNCE)]
DATAGRAMS = st.one_of(
    st.binary(max_size=PCP_MAX_MESSAGE_LEN + 4),
    st.tuples(st.sampled_from(SEEDS), st.integers(0, 60), st.binary(max_size=PCP_MAX_MESSAGE_LEN))
    .map(lambda t: t[0][:t[1]] + t[2]),
)


REASONS = {"truncated", "oversized", "length", "version", "not a response", "opcode", "truncated option"}


@settings(max_examples=500, deadline=None)
@given(data=DATAGRAMS)
def test_parsers_raise_only_parse_error_property(data: bytes) -> None:
    for parse in (parse_natpmp_response, parse_pcp_response):
        try:
            parse(data)
        except ParseError as e:
            assert str(e) in REASONS  # a short fixed reason, never the bytes


@settings(max_examples=200, deadline=None)
@given(options=st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=96)), max_size=14))
def test_pcp_options_are_framed_up_to_the_size_limit(options: list[tuple[int, bytes]]) -> None:
    raw = b"".join(bytes((code, 0)) + len(d).to_bytes(2, "big") + d + bytes(-len(d) % 4)
                   for code, d in options)
    data = bytes.fromhex(HEX_PCP_MAP_RESPONSE) + raw
    if len(data) > PCP_MAX_MESSAGE_LEN:
        with pytest.raises(ParseError, match="oversized"):
            parse_pcp_response(data)
    else:
        assert parse_pcp_response(data).options == tuple(options)


# -- result codes ----------------------------------------------------------------------------------------


NATPMP_MESSAGES = {
    0: "NAT-PMP result 0: success",
    1: "NAT-PMP result 1: unsupported version — the router does not speak this NAT-PMP version",
    2: "NAT-PMP result 2: not authorized — port mapping is disabled on the router",
    3: "NAT-PMP result 3: network failure — the router has no external address yet "
       "(its Internet connection may be down)",
    4: "NAT-PMP result 4: out of resources — the router cannot create more mappings",
    5: "NAT-PMP result 5: unsupported opcode — the router does not support this request",
    6: "NAT-PMP result 6: unknown result code",
}

PCP_NAMES = ["SUCCESS", "UNSUPP_VERSION", "NOT_AUTHORIZED", "MALFORMED_REQUEST", "UNSUPP_OPCODE",
             "UNSUPP_OPTION", "MALFORMED_OPTION", "NETWORK_FAILURE", "NO_RESOURCES", "UNSUPP_PROTOCOL",
             "USER_EX_QUOTA", "CANNOT_PROVIDE_EXTERNAL", "ADDRESS_MISMATCH", "EXCESSIVE_REMOTE_PEERS"]


@pytest.mark.parametrize(("code", "message"), sorted(NATPMP_MESSAGES.items()))
def test_natpmp_result_messages(code: int, message: str) -> None:
    assert natpmp_result_message(code) == message


@pytest.mark.parametrize(("code", "name"), [*enumerate(PCP_NAMES), (14, "UNKNOWN")])
def test_pcp_result_messages(code: int, name: str) -> None:
    message = pcp_result_message(code)
    assert message.startswith(f"PCP result {code} ({name}): ")
    assert len(message) > len(f"PCP result {code} ({name}): ") + 5


def test_pcp_result_messages_are_distinct() -> None:
    texts = {pcp_result_message(code).split(": ", 1)[1] for code in range(14)}
    assert len(texts) == 14
    assert "disabled on the router" in pcp_result_message(2)
    assert "no external address" in pcp_result_message(7)



# -- addresses -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("address", ["198.51.100.7", "100.128.0.1", "172.32.0.1", "8.8.8.8"])
def test_public_addresses_accepted(address: str) -> None:
    assert external_address_problem(address) is None


def test_private_space_is_never_a_public_external_address() -> None:
    for address in ("10.0.0.1", "172.16.0.1", "192.168.0.1", "100.64.0.1"):
        assert is_private_v4(address)
        assert external_address_problem(address) is not None
    assert not is_private_v4("127.0.0.1") and external_address_problem("127.0.0.1") is not None
