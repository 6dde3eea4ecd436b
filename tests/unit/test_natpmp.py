"""NAT-PMP (RFC 6886) and PCP (RFC 6887) port mapping: wire formats and the PortMapper state machine.

The hex fixtures are the constructed examples of PROTOCOLS.md §9 (built by a script from the field layouts,
then reviewed by hand against RFC 6886 §3.2/§3.3/§3.5 and RFC 6887 §7.1/§7.2/§11.1); there are no public
packet KATs for these protocols (PROTOCOLS.md §8). The PCP response and ANNOUNCE hex below were written by
hand field by field in the same way. Time is virtual: plain floats passed as ``now``.
"""

from __future__ import annotations

import contextlib
import random

import pytest

from tunneld.proto import constants as C
from tunneld.proto.errors import ParseError
from tunneld.proto.natpmp import (
    NATPMP,
    PCP,
    Endpoint,
    EndpointChanged,
    NatPmpAddressResponse,
    NatPmpMapResponse,
    PcpMap,
    PcpResponse,
    PortMapper,
    Transmit,
    encode_natpmp_address_request,
    encode_natpmp_address_response,
    encode_natpmp_error,
    encode_natpmp_map_request,
    encode_natpmp_map_response,
    encode_pcp_announce_request,
    encode_pcp_map_request,
    encode_pcp_map_response,
    encode_pcp_response,
    external_address_problem,
    natpmp_result_message,
    parse_natpmp_response,
    parse_pcp_response,
    pcp_result_message,
)

# -- PROTOCOLS.md §9 constructed examples ----------------------------------------------------------------

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


class FakeRand:
    """Deterministic ``rand``: 12-byte calls give nonces (queued ones first, then bytes([k]) * 12),
    4-byte calls give the fixed fraction (0.5: PCP's RAND is 0, renewal at 9/16, ANNOUNCE delay 2.5 s)."""

    def __init__(self, nonces: list[bytes] | None = None, fraction: float = 0.5) -> None:
        self.nonces = list(nonces or [])
        self.fraction = fraction
        self.count = 0

    def __call__(self, n: int) -> bytes:
        if n == 12:
            self.count += 1
            return self.nonces.pop(0) if self.nonces else bytes([self.count]) * 12
        assert n == 4
        return min(int(self.fraction * 2**32), 2**32 - 1).to_bytes(4, "big")


def mapper(**kw: object) -> PortMapper:
    args: dict[str, object] = {"internal_address": ME, "internal_port": PORT, "gateway": GW,
                               "rand": FakeRand()}
    args.update(kw)
    return PortMapper(**args)  # type: ignore[arg-type]


def payloads(out: list[Transmit]) -> list[bytes]:
    assert all(t.host == GW and t.port == 5351 for t in out)
    return [t.payload for t in out]


def natpmp_mapper(now: float = 0.0, epoch: int = 1000, **kw: object) -> PortMapper:
    """A mapper that fell back to NAT-PMP at `now` (no answers yet)."""
    m = mapper(**kw)
    m.start(now)
    out = m.receive(encode_natpmp_error(1, 1, epoch), GW_SRC, now)
    assert payloads(out) == [encode_natpmp_address_request(), encode_natpmp_map_request(PORT, PORT, 7200)]
    return m


def natpmp_mapped(now: float = 0.0, epoch: int = 1000, ext_port: int = 61001, lifetime: int = 7200,
                  **kw: object) -> PortMapper:
    m = natpmp_mapper(now, epoch, **kw)
    assert m.receive(encode_natpmp_address_response(epoch, PUBLIC), GW_SRC, now) == []
    assert m.receive(encode_natpmp_map_response(epoch, PORT, ext_port, lifetime), GW_SRC, now) == []
    return m


def pcp_mapped(now: float = 0.0, epoch: int = 1000, ext_port: int = 61001, lifetime: int = 7200,
               **kw: object) -> PortMapper:
    m = mapper(**kw)
    m.start(now)
    reply = encode_pcp_map_response(m.nonce, PORT, ext_port, PUBLIC, lifetime, epoch)
    assert m.receive(reply, GW_SRC, now) == []
    return m


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
    assert encode_pcp_response(C.PCP_OP_ANNOUNCE, 0, 0, 1234).hex() == HEX_PCP_ANNOUNCE
    assert encode_pcp_announce_request("192.0.2.33").hex() == HEX_PCP_ANNOUNCE_REQUEST
    # A suggested external address is IPv4-mapped (RFC 6887 §5).
    suggested = encode_pcp_map_request(NONCE, "192.0.2.33", 4500, 7200, 61001, PUBLIC)
    assert suggested[-20:].hex() == "1194" "ee49" "00000000000000000000ffffc6336407"
    with pytest.raises(ValueError):
        encode_pcp_map_request(b"short", "192.0.2.33", 4500, 7200)


def test_state_machine_first_pcp_request_is_the_fixture() -> None:
    m = mapper(internal_address="192.0.2.33", suggested_external_port=0, rand=FakeRand([NONCE]))
    assert payloads(m.start(0.0)) == [bytes.fromhex(HEX_PCP_MAP_REQUEST)]


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


@pytest.mark.parametrize("code", range(1, 6))
def test_natpmp_error_result_reaches_status_and_retries_later(code: int) -> None:
    m = natpmp_mapper(now=0.0)
    m.receive(encode_natpmp_address_response(1000, PUBLIC), GW_SRC, 0.1)
    assert m.receive(encode_natpmp_map_response(1000, PORT, 0, 0, result=code), GW_SRC, 0.2) == []
    if code == 1:  # "unsupported version" while we speak NAT-PMP: a stale answer to a PCP request
        assert m.counters["stale unsupported-version reply"] == 1
        return
    assert m.state.result_code == code
    assert m.state.result_message == NATPMP_MESSAGES[code]
    assert m.state.endpoint is None
    assert m.deadline() == pytest.approx(30.2)  # 30 s, doubling to 15 min
    assert payloads(m.poll(30.2)) == [encode_natpmp_address_request(),
                                      encode_natpmp_map_request(PORT, PORT, 7200)]
    m.receive(encode_natpmp_map_response(1030, PORT, 0, 0, result=code), GW_SRC, 30.3)
    assert m.deadline() == pytest.approx(90.3)


@pytest.mark.parametrize("code", range(1, 14))
def test_pcp_error_result_reaches_status_and_obeys_lifetime(code: int) -> None:
    m = mapper()
    m.start(0.0)
    reply = encode_pcp_map_response(m.nonce, PORT, 0, "0.0.0.0", 1800, 1000, result=code)
    assert m.receive(reply, GW_SRC, 0.5) == []
    assert m.state.protocol == PCP
    assert m.state.result_code == code
    assert m.state.result_message == pcp_result_message(code)
    assert m.deadline() == pytest.approx(1800.5)  # the error's lifetime, being longer than 30 s
    # A short error (lifetime 0, as miniupnpd sends for long errors) waits our own 30 s.
    m2 = mapper()
    m2.start(0.0)
    m2.receive(encode_pcp_map_response(m2.nonce, PORT, 0, "0.0.0.0", 0, 1000, result=code), GW_SRC, 1.0)
    assert m2.deadline() == pytest.approx(31.0)


def test_success_with_zero_lifetime_or_port_is_a_failure() -> None:
    m = natpmp_mapper()
    m.receive(encode_natpmp_address_response(1000, PUBLIC), GW_SRC, 0.0)
    m.receive(encode_natpmp_map_response(1000, PORT, 61001, 0), GW_SRC, 0.1)
    assert m.state.endpoint is None and m.state.external_port is None
    assert "treated as a failure" in m.state.result_message
    p = mapper()
    p.start(0.0)
    p.receive(encode_pcp_map_response(p.nonce, PORT, 0, PUBLIC, 7200, 1000), GW_SRC, 0.1)
    assert p.state.endpoint is None
    assert "treated as a failure" in p.state.result_message


# -- schedules under virtual time ------------------------------------------------------------------------


def run_until(m: PortMapper, end: float) -> list[tuple[float, bytes]]:
    sent: list[tuple[float, bytes]] = []
    while (t := m.deadline()) is not None and t <= end:
        sent += [(t, p) for p in payloads(m.poll(t))]
    return sent


def test_natpmp_schedule_250ms_doubling_nine_tries_then_long_backoff() -> None:
    m = natpmp_mapper(now=0.0)
    sent = run_until(m, 4000.0)
    map_times = [t for t, p in sent if p == encode_natpmp_map_request(PORT, PORT, 7200)]
    addr_times = [t for t, p in sent if p == encode_natpmp_address_request()]
    nine = [0.25, 0.75, 1.75, 3.75, 7.75, 15.75, 31.75, 63.75]  # attempts 2..9 (the 1st went at 0)
    after = [127.75, 255.75, 511.75, 1023.75, 1923.75, 2823.75, 3723.75]  # still doubling, 15 min cap
    assert map_times == pytest.approx(nine + after)
    assert addr_times == pytest.approx(nine + after)


def test_natpmp_declares_no_natpmp_after_ninth_attempt_and_64s() -> None:
    m = natpmp_mapper(now=0.0)
    run_until(m, 127.0)
    assert not m.state.no_answer
    m.poll(127.75)
    assert m.state.no_answer
    assert m.state.result_message.startswith("no NAT-PMP")


def test_pcp_schedule_irt_3s_doubling_mrt_1024() -> None:
    # RFC 6887 §8.1.1 with RAND = 0: retransmissions 3, 6, 12, ... s apart, capped at MRT = 1024 s,
    # for a gateway known to speak PCP (one that never answered gets NAT-PMP after two tries, below).
    m = mapper()  # fraction 0.5: RAND = 0
    first = m.start(0.0)
    assert len(first) == 1
    m.protocol = "pcp"  # it answered in PCP before (a renewal, say)
    sent = run_until(m, 6000.0)
    times = [t for t, _ in sent]
    intervals = [3, 6, 12, 24, 48, 96, 192, 384, 768, 1024, 1024, 1024]
    expected = [sum(intervals[:i + 1]) for i in range(len(intervals))]
    assert times[:len(expected)] == pytest.approx(expected)
    assert all(p == first[0].payload for _, p in sent)  # same nonce, same request


def test_pcp_silence_falls_back_to_natpmp_after_two_requests() -> None:
    m = mapper()  # fraction 0.5: RAND = 0
    first = m.start(0.0)
    assert payloads(m.poll(3.0)) == [first[0].payload]  # the PCP retransmission
    out = payloads(m.poll(9.0))  # still silence: ask in NAT-PMP, at once
    assert out == [encode_natpmp_address_request(), encode_natpmp_map_request(PORT, PORT, 7200)]
    assert m.wire == "nat-pmp" and "NAT-PMP" in m.state.result_message
    m.receive(encode_natpmp_address_response(1000, PUBLIC), GW_SRC, 9.1)
    m.receive(encode_natpmp_map_response(1000, PORT, 61001, 7200), GW_SRC, 9.1)
    assert m.state.protocol == "nat-pmp" and m.state.endpoint == Endpoint(PUBLIC, 61001)


def test_pcp_schedule_randomisation_bounds() -> None:
    low = mapper(rand=FakeRand(fraction=0.0))  # RAND = -0.1
    low.start(0.0)
    assert low.deadline() == pytest.approx(2.7)
    low.poll(2.7)
    assert low.deadline() == pytest.approx(2.7 + 2 * 2.7 * 0.9)
    high = mapper(rand=FakeRand(fraction=1.0))  # RAND -> +0.1
    high.start(0.0)
    assert high.deadline() == pytest.approx(3.3)


# -- renewal, granted port, double NAT -------------------------------------------------------------------


def test_natpmp_renewal_at_half_granted_lifetime_with_granted_port() -> None:
    m = natpmp_mapped(now=1.0, lifetime=3600)  # requested 7200, granted 3600
    st = m.state
    assert (st.protocol, st.lifetime, st.expires_at) == (NATPMP, 3600, 3601.0)
    assert m.deadline() == pytest.approx(1801.0)
    assert payloads(m.poll(1801.0)) == [encode_natpmp_address_request(),
                                        encode_natpmp_map_request(PORT, 61001, 7200)]


def test_pcp_renewal_between_half_and_five_eighths() -> None:
    for fraction, at in ((0.0, 1800.0), (0.5, 2025.0), (1.0, 2250.0)):
        m = pcp_mapped(lifetime=3600, rand=FakeRand(fraction=fraction))
        assert m.deadline() == pytest.approx(at, abs=1e-3)
    m = pcp_mapped(lifetime=3600)
    nonce = m.nonce
    out = payloads(m.poll(2025.0))
    assert out == [encode_pcp_map_request(nonce, ME, PORT, 7200, 61001, PUBLIC)]  # same nonce and port


def test_renewal_never_sooner_than_two_seconds() -> None:
    m = natpmp_mapped(lifetime=1)
    assert m.deadline() == pytest.approx(1.0)  # expiry comes first
    m.poll(1.0)
    assert m.deadline() == pytest.approx(2.0)


def test_granted_port_differs_from_requested_and_is_published() -> None:
    seen: list[EndpointChanged] = []
    m = natpmp_mapped(ext_port=61001, on_change=seen.append)
    assert m.state.endpoint == Endpoint(PUBLIC, 61001)
    assert m.state.external_port == 61001
    assert m.events == seen == [EndpointChanged(None, Endpoint(PUBLIC, 61001), 0.0)]
    p = pcp_mapped(ext_port=50000)
    assert p.state.endpoint == Endpoint(PUBLIC, 50000)


@pytest.mark.parametrize("address", ["10.1.2.3", "172.16.0.1", "172.31.255.254", "192.168.7.1",
                                     "100.64.0.1", "100.127.255.255", "127.0.0.1", "169.254.1.1",
                                     "0.0.0.0", "0.1.2.3"])
def test_double_nat_refused(address: str) -> None:
    assert external_address_problem(address) is not None
    m = natpmp_mapper()
    m.receive(encode_natpmp_address_response(1000, address), GW_SRC, 0.0)
    m.receive(encode_natpmp_map_response(1000, PORT, 61001, 7200), GW_SRC, 0.0)
    st = m.state
    assert st.double_nat and st.endpoint is None and m.events == []
    assert st.double_nat_message is not None and "double NAT" in st.double_nat_message
    assert st.external_port == 61001  # the mapping itself is kept and renewed
    p = mapper()
    p.start(0.0)
    p.receive(encode_pcp_map_response(p.nonce, PORT, 61001, address, 7200, 1000), GW_SRC, 0.0)
    assert p.state.double_nat and p.state.endpoint is None


@pytest.mark.parametrize("address", ["198.51.100.7", "100.128.0.1", "172.32.0.1", "8.8.8.8"])
def test_public_addresses_accepted(address: str) -> None:
    assert external_address_problem(address) is None


def test_double_nat_clears_when_the_address_becomes_public() -> None:
    m = natpmp_mapper()
    m.receive(encode_natpmp_address_response(1000, "100.64.3.4"), GW_SRC, 0.0)
    m.receive(encode_natpmp_map_response(1000, PORT, 61001, 7200), GW_SRC, 0.0)
    assert m.state.double_nat
    m.announcement(encode_natpmp_address_response(1001, PUBLIC), (GW, 5351), 1.0)
    assert not m.state.double_nat
    assert m.events == [EndpointChanged(None, Endpoint(PUBLIC, 61001), 1.0)]


# -- nonce, sources, parse errors in the state machine ---------------------------------------------------


def test_pcp_nonce_mismatch_dropped() -> None:
    m = mapper()
    m.start(0.0)
    wrong = encode_pcp_map_response(b"\xee" * 12, PORT, 61001, PUBLIC, 7200, 1000)
    assert m.receive(wrong, GW_SRC, 0.1) == []
    assert m.counters["nonce mismatch"] == 1
    assert m.state.protocol is None and m.state.endpoint is None
    assert m.deadline() == pytest.approx(3.0)  # still retransmitting
    m.receive(encode_pcp_map_response(m.nonce, PORT, 61001, PUBLIC, 7200, 1000), GW_SRC, 0.2)
    assert m.state.endpoint == Endpoint(PUBLIC, 61001)


def test_answers_for_other_mappings_dropped() -> None:
    m = mapper()
    m.start(0.0)
    m.receive(encode_pcp_map_response(m.nonce, 4501, 61001, PUBLIC, 7200, 1000), GW_SRC, 0.1)
    m.receive(encode_pcp_map_response(m.nonce, PORT, 61001, PUBLIC, 7200, 1000, protocol=6), GW_SRC, 0.1)
    assert m.counters["other mapping"] == 2 and m.state.endpoint is None
    n = natpmp_mapper()
    n.receive(encode_natpmp_map_response(1000, 4501, 61001, 7200), GW_SRC, 0.1)
    n.receive(encode_natpmp_map_response(1000, PORT, 61001, 7200, opcode=2), GW_SRC, 0.1)
    assert n.counters["other mapping"] == 2 and n.state.external_port is None


def test_source_not_gateway_dropped() -> None:
    m = mapper()
    m.start(0.0)
    good = encode_pcp_map_response(m.nonce, PORT, 61001, PUBLIC, 7200, 1000)
    assert m.receive(good, ("192.168.1.99", 5351), 0.1) == []
    assert m.receive(good, (GW, 5350), 0.1) == []
    assert m.announcement(bytes.fromhex(HEX_PCP_ANNOUNCE), ("192.168.1.99", 5350), 0.1) == []
    assert m.counters["wrong source"] == 3
    assert m.state.endpoint is None


def test_parse_errors_counted_never_raised() -> None:
    m = mapper()
    m.start(0.0)
    for junk in (b"", b"\x02", b"\x07" * 24, bytes.fromhex(HEX_PCP_MAP_RESPONSE)[:50],
                 bytes.fromhex(HEX_PCP_MAP_RESPONSE) + b"\x00" * 1100, bytes.fromhex(HEX_ADDR_RESPONSE)[:5]):
        assert m.receive(junk, GW_SRC, 0.1) == []
        assert m.announcement(junk, (GW, 5351), 0.1) == []
    assert sum(v for k, v in m.counters.items() if k.startswith("parse error")) == 12
    assert m.counters["parse error: oversized"] == 2
    assert m.counters["parse error: version"] == 2


# -- PCP -> NAT-PMP fall-back ----------------------------------------------------------------------------


def test_fallback_from_pcp_to_natpmp() -> None:
    m = mapper()
    first = payloads(m.start(0.0))
    assert first[0][0] == 2  # PCP first
    out = m.receive(bytes.fromhex(HEX_UNSUPPORTED_VERSION), GW_SRC, 0.05)
    # At once, without waiting for PCP's 3 s timer: the address request and the map request.
    assert payloads(out) == [bytes.fromhex(HEX_ADDR_REQUEST), bytes.fromhex(HEX_MAP_REQUEST)]
    assert m.wire == NATPMP and m.state.protocol is None
    assert m.deadline() == pytest.approx(0.3)  # NAT-PMP's 250 ms, not PCP's 3 s
    m.receive(bytes.fromhex(HEX_ADDR_RESPONSE), GW_SRC, 0.06)
    m.receive(bytes.fromhex(HEX_MAP_RESPONSE), GW_SRC, 0.07)
    assert m.state.protocol == NATPMP
    assert m.state.endpoint == Endpoint(PUBLIC, 61001)
    # A second "unsupported version" (the answer to a PCP retransmission) changes nothing.
    assert m.receive(bytes.fromhex(HEX_UNSUPPORTED_VERSION), GW_SRC, 0.1) == []
    assert m.state.endpoint == Endpoint(PUBLIC, 61001) and m.state.result_code == 0
    # A late PCP answer after the fall-back is stale.
    assert m.receive(bytes.fromhex(HEX_PCP_MAP_RESPONSE), GW_SRC, 0.2) == []
    assert m.counters["stale PCP reply"] == 1


def test_version0_other_results_do_not_trigger_fallback() -> None:
    m = mapper()
    m.start(0.0)
    assert m.receive(encode_natpmp_error(1, 2, 5), GW_SRC, 0.1) == []
    assert m.wire == PCP and m.counters["stale NAT-PMP reply"] == 1


# -- epoch: gateway lost its state ------------------------------------------------------------------------


def test_natpmp_epoch_regression_recreates_mapping_at_once_with_same_port() -> None:
    m = natpmp_mapped(now=0.0, epoch=1000, ext_port=61001)
    out = m.receive(encode_natpmp_address_response(5, PUBLIC), GW_SRC, 10.0)  # went backwards
    assert payloads(out) == [encode_natpmp_map_request(PORT, 61001, 7200)]
    assert m.counters["gateway lost state"] == 1
    assert "lost its state" in m.state.result_message


@pytest.mark.parametrize(("their_elapsed", "lost"), [(697, True), (698, False), (800, False)])
def test_natpmp_epoch_seven_eighths_rule(their_elapsed: int, lost: bool) -> None:
    # our_elapsed 800 s: 7/8 of it is 700; lost if nat_elapsed + 2 < 700.
    m = natpmp_mapped(now=0.0, epoch=1000)
    out = m.receive(encode_natpmp_address_response(1000 + their_elapsed, PUBLIC), GW_SRC, 800.0)
    assert bool(out) is lost


def test_natpmp_epoch_loss_seen_on_map_answer_rereads_address_only() -> None:
    m = natpmp_mapped(now=0.0, epoch=1000)
    out = m.receive(encode_natpmp_map_response(3, PORT, 61001, 7200), GW_SRC, 50.0)
    assert payloads(out) == [encode_natpmp_address_request()]
    assert m.state.endpoint == Endpoint(PUBLIC, 61001)


def test_pcp_epoch_regression_recreates_with_new_nonce_and_same_port() -> None:
    m = pcp_mapped(now=0.0, epoch=1000, ext_port=61001)
    old = m.nonce
    t = m.deadline()
    assert t is not None
    m.poll(t)  # renewal goes out
    out = m.receive(encode_pcp_map_response(old, PORT, 0, "0.0.0.0", 30, 7, result=7), GW_SRC, t + 0.1)
    assert m.nonce != old
    assert payloads(out) == [encode_pcp_map_request(m.nonce, ME, PORT, 7200, 61001, PUBLIC)]
    assert m.counters["gateway lost state"] == 1


@pytest.mark.parametrize(("client", "server", "lost"), [
    (10.0, 100, True),  # server too fast: 12 < 100 - 6.25
    (10.0, 14, True),  # 12 < 14 - 0.875: only 2 s slack plus 1/16
    (10.0, 12, False),  # 12 < 12 - 0.75 is false
    (100.0, 10, True),  # server too slow: 12 < 100 - 6.25
    (100.0, 92, False),  # 94 < 93.75 is false
    (0.5, -1, False),  # backwards by one second is tolerated
    (0.5, -2, True),  # by more is not
])
def test_pcp_epoch_rules(client: float, server: int, lost: bool) -> None:
    m = pcp_mapped(now=0.0, epoch=1000)
    old = m.nonce
    reply = encode_pcp_map_response(old, PORT, 61001, PUBLIC, 0, 1000 + server, result=8)
    out = m.receive(reply, GW_SRC, client)
    assert bool(out) is lost
    assert (m.nonce != old) is lost


def test_pcp_epoch_loss_on_success_keeps_the_fresh_mapping() -> None:
    m = pcp_mapped(now=0.0, epoch=1000)
    nonce = m.nonce
    out = m.receive(encode_pcp_map_response(nonce, PORT, 61002, PUBLIC, 7200, 3), GW_SRC, 100.0)
    assert out == [] and m.nonce == nonce
    assert m.state.endpoint == Endpoint(PUBLIC, 61002)
    assert m.counters["gateway lost state"] == 1


# -- announcements ---------------------------------------------------------------------------------------


def test_natpmp_announcement_updates_address_and_rechecks() -> None:
    m = natpmp_mapped(now=0.0, epoch=1000)
    out = m.announcement(encode_natpmp_address_response(1010, "203.0.113.9"), (GW, 5351), 10.0)
    assert payloads(out) == [encode_natpmp_address_request(), encode_natpmp_map_request(PORT, 61001, 7200)]
    assert m.state.endpoint == Endpoint("203.0.113.9", 61001)
    assert m.events[-1] == EndpointChanged(Endpoint(PUBLIC, 61001), Endpoint("203.0.113.9", 61001), 10.0)
    # The gateway's repeats of the same announcement do not re-check again.
    assert m.announcement(encode_natpmp_address_response(1010, "203.0.113.9"), (GW, 5351), 10.25) == []
    assert m.counters["repeated announcement"] == 1


def test_pcp_announce_rechecks_after_random_delay() -> None:
    m = pcp_mapped(now=0.0, epoch=1000)
    nonce = m.nonce
    assert m.announcement(encode_pcp_response(0, 0, 0, 1100), (GW, 5351), 100.0) == []
    assert m.deadline() == pytest.approx(102.5)  # a random 0-5 s (fraction 0.5)
    assert payloads(m.poll(102.5)) == [encode_pcp_map_request(nonce, ME, PORT, 7200, 61001, PUBLIC)]


def test_pcp_announce_with_lost_state_uses_new_nonce_and_remaps_within_a_second() -> None:
    m = pcp_mapped(now=0.0, epoch=1000)
    old = m.nonce
    m.announcement(encode_pcp_response(0, 0, 0, 2), (GW, 5351), 100.0)
    assert m.nonce != old
    # The epoch went backwards: the mapping is gone, so the re-map spreads over 0-1 s, not 0-5 s.
    assert m.deadline() == pytest.approx(100.5)  # fraction 0.5 of the 1 s spread
    assert payloads(m.poll(100.5)) == [encode_pcp_map_request(m.nonce, ME, PORT, 7200, 61001, PUBLIC)]


def test_pcp_announce_switches_natpmp_gateway_back_to_pcp() -> None:
    m = natpmp_mapped(now=0.0, epoch=1000)
    m.announcement(encode_pcp_response(0, 0, 0, 5), (GW, 5351), 100.0)
    out = payloads(m.poll(102.5))
    assert len(out) == 1 and out[0][0] == 2


# -- expiry and shutdown ---------------------------------------------------------------------------------


def test_expiry_without_renewal_withdraws_endpoint_and_asks_same_port() -> None:
    m = natpmp_mapped(now=0.0, lifetime=100)
    run_until(m, 99.9)
    assert m.state.endpoint is not None
    m.poll(100.0)
    assert m.state.endpoint is None and m.events[-1].new is None
    out = run_until(m, 200.0)
    assert encode_natpmp_map_request(PORT, 61001, 7200) in [p for _, p in out]


def test_stop_deletes_natpmp_mapping() -> None:
    m = natpmp_mapped()
    out = m.stop(5.0)
    assert payloads(out) == [bytes.fromhex(HEX_DELETE)]  # lifetime 0, suggested port 0
    assert m.state.endpoint is None
    assert m.events[-1] == EndpointChanged(Endpoint(PUBLIC, 61001), None, 5.0)
    assert m.deadline() is None and m.poll(10.0) == [] and m.stop(6.0) == []
    assert m.receive(bytes.fromhex(HEX_MAP_RESPONSE), GW_SRC, 6.0) == []


def test_stop_deletes_pcp_mapping_with_its_nonce() -> None:
    m = pcp_mapped()
    nonce = m.nonce
    (t,) = m.stop(5.0)
    assert t.payload == encode_pcp_map_request(nonce, ME, PORT, 0)
    assert t.payload[4:8] == b"\x00" * 4  # lifetime 0
    assert t.payload[42:44] == b"\x00\x00"  # suggested port 0
    assert t.payload[44:] == bytes.fromhex("00000000000000000000ffff00000000")


def test_bad_configuration_rejected() -> None:
    with pytest.raises(ValueError):
        mapper(internal_port=0)
    with pytest.raises(ValueError):
        mapper(lifetime=0)
    with pytest.raises(ValueError):
        mapper(gateway="not-an-address")
