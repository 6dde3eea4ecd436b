"""The port mapper (NAT-PMP RFC 6886, PCP RFC 6887) as a sans-I/O core: requests, answers, schedules, sources.

Time is virtual: plain floats passed as ``now``. :class:`Harness` calls the core the way the driver does and
returns what it queued after each input, so each step's sends are asserted where they happen.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.test_portmap_wire import (
    GW,
    GW_SRC,
    HEX_ADDR_REQUEST,
    HEX_ADDR_RESPONSE,
    HEX_MAP_REQUEST,
    HEX_MAP_RESPONSE,
    HEX_PCP_ANNOUNCE,
    HEX_PCP_MAP_REQUEST,
    HEX_PCP_MAP_RESPONSE,
    HEX_UNSUPPORTED_VERSION,
    ME,
    NATPMP_MESSAGES,
    NONCE,
    PORT,
    PUBLIC,
)
from tunneld.proto.core import Transmit
from tunneld.proto.portmap.addresses import external_address_problem
from tunneld.proto.portmap.events import Endpoint, EndpointChanged, Granted, PortmapEvent
from tunneld.proto.portmap.mapper import NATPMP, PCP, PortMapper
from tunneld.proto.portmap.natpmp_wire import (
    encode_natpmp_address_request,
    encode_natpmp_address_response,
    encode_natpmp_error,
    encode_natpmp_map_request,
    encode_natpmp_map_response,
)
from tunneld.proto.portmap.pcp_wire import (
    encode_pcp_map_request,
    encode_pcp_map_response,
    pcp_result_message,
)


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


class Harness:
    """A PortMapper driven as the driver drives it: after each call, what it queued to send is returned and
    its events are collected (all in ``events``, the endpoint changes in ``changes``)."""

    def __init__(self, core: PortMapper) -> None:
        self.core = core
        self.events: list[PortmapEvent] = []

    def _drain(self) -> list[Transmit]:
        self.events += self.core.events()
        return self.core.transmits()

    def start(self, now: float) -> list[Transmit]:
        self.core.start(now)
        return self._drain()

    def receive(self, data: bytes, source: tuple[str, int], now: float) -> list[Transmit]:
        self.core.receive(data, source, now)
        return self._drain()

    def poll(self, now: float) -> list[Transmit]:
        self.core.poll(now)
        return self._drain()

    def close(self, now: float) -> list[Transmit]:
        self.core.close(now)
        return self._drain()

    @property
    def changes(self) -> list[EndpointChanged]:
        return [e for e in self.events if isinstance(e, EndpointChanged)]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.core, name)


def mapper(**kw: object) -> Harness:
    args: dict[str, object] = {"internal_address": ME, "internal_port": PORT, "gateway": GW,
                               "rand": FakeRand()}
    args.update(kw)
    return Harness(PortMapper(**args))  # type: ignore[arg-type]


def payloads(out: list[Transmit]) -> list[bytes]:
    assert all(t.destination == GW_SRC for t in out)
    return [t.payload for t in out]


def natpmp_mapper(now: float = 0.0, epoch: int = 1000, **kw: object) -> Harness:
    """A mapper that fell back to NAT-PMP at `now` (no answers yet)."""
    m = mapper(**kw)
    m.start(now)
    out = m.receive(encode_natpmp_error(1, 1, epoch), GW_SRC, now)
    assert payloads(out) == [encode_natpmp_address_request(), encode_natpmp_map_request(PORT, PORT, 7200)]
    return m


def natpmp_mapped(now: float = 0.0, epoch: int = 1000, ext_port: int = 61001, lifetime: int = 7200,
                  **kw: object) -> Harness:
    m = natpmp_mapper(now, epoch, **kw)
    assert m.receive(encode_natpmp_address_response(epoch, PUBLIC), GW_SRC, now) == []
    assert m.receive(encode_natpmp_map_response(epoch, PORT, ext_port, lifetime), GW_SRC, now) == []
    return m


def pcp_mapped(now: float = 0.0, epoch: int = 1000, ext_port: int = 61001, lifetime: int = 7200,
               **kw: object) -> Harness:
    m = mapper(**kw)
    m.start(now)
    reply = encode_pcp_map_response(m.nonce, PORT, ext_port, PUBLIC, lifetime, epoch)
    assert m.receive(reply, GW_SRC, now) == []
    return m


def test_state_machine_first_pcp_request_is_the_fixture() -> None:
    m = mapper(internal_address="192.0.2.33", suggested_external_port=0, rand=FakeRand([NONCE]))
    assert payloads(m.start(0.0)) == [bytes.fromhex(HEX_PCP_MAP_REQUEST)]

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


def run_until(m: Harness, end: float) -> list[tuple[float, bytes]]:
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
    m.core.protocol = "pcp"  # it answered in PCP before (a renewal, say)
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
    m = natpmp_mapped(ext_port=61001)
    assert m.state.endpoint == Endpoint(PUBLIC, 61001)
    assert m.state.external_port == 61001
    assert m.changes == [EndpointChanged(None, Endpoint(PUBLIC, 61001), 0.0)]
    assert m.events[-1] == Granted(NATPMP, 61001, 7200, 0.0)
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
    assert st.double_nat and st.endpoint is None and m.changes == []
    assert st.double_nat_message is not None and "double NAT" in st.double_nat_message
    assert st.external_port == 61001  # the mapping itself is kept and renewed
    p = mapper()
    p.start(0.0)
    p.receive(encode_pcp_map_response(p.nonce, PORT, 61001, address, 7200, 1000), GW_SRC, 0.0)
    assert p.state.double_nat and p.state.endpoint is None



def test_double_nat_clears_when_the_address_becomes_public() -> None:
    m = natpmp_mapper()
    m.receive(encode_natpmp_address_response(1000, "100.64.3.4"), GW_SRC, 0.0)
    m.receive(encode_natpmp_map_response(1000, PORT, 61001, 7200), GW_SRC, 0.0)
    assert m.state.double_nat
    m.receive(encode_natpmp_address_response(1001, PUBLIC), (GW, 5351), 1.0)
    assert not m.state.double_nat
    assert m.changes == [EndpointChanged(None, Endpoint(PUBLIC, 61001), 1.0)]


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
    assert m.receive(bytes.fromhex(HEX_PCP_ANNOUNCE), ("192.168.1.99", 5350), 0.1) == []
    assert m.counters["wrong source"] == 3
    assert m.state.endpoint is None


def test_parse_errors_counted_never_raised() -> None:
    m = mapper()
    m.start(0.0)
    for junk in (b"", b"\x02", b"\x07" * 24, bytes.fromhex(HEX_PCP_MAP_RESPONSE)[:50],
                 bytes.fromhex(HEX_PCP_MAP_RESPONSE) + b"\x00" * 1100, bytes.fromhex(HEX_ADDR_RESPONSE)[:5]):
        assert m.receive(junk, GW_SRC, 0.1) == []
        assert m.receive(junk, (GW, 5351), 0.1) == []
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


def test_bad_configuration_rejected() -> None:
    with pytest.raises(ValueError):
        mapper(internal_port=0)
    with pytest.raises(ValueError):
        mapper(lifetime=0)
    with pytest.raises(ValueError):
        mapper(gateway="not-an-address")

