"""The port mapper's life after the first answer: epochs, announcements, expiry, close and its answer, events.

Time is virtual; the harness and helpers are those of test_portmap_mapper.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_portmap_mapper import (
    FakeRand,
    mapper,
    natpmp_mapped,
    payloads,
    pcp_mapped,
    run_until,
)
from tests.unit.test_portmap_wire import (
    DATAGRAMS,
    GW,
    GW_SRC,
    HEX_DELETE,
    HEX_MAP_RESPONSE,
    ME,
    PORT,
    PUBLIC,
)
from tunneld.proto.portmap.events import Endpoint, EndpointChanged, Granted, Refused
from tunneld.proto.portmap.mapper import PCP, PortMapper
from tunneld.proto.portmap.natpmp_wire import (
    encode_natpmp_address_request,
    encode_natpmp_address_response,
    encode_natpmp_map_request,
    encode_natpmp_map_response,
)
from tunneld.proto.portmap.pcp_wire import (
    encode_pcp_map_request,
    encode_pcp_map_response,
    encode_pcp_response,
    pcp_result_message,
)

# -- epoch: gateway lost its state ------------------------------------------------------------------------


def test_natpmp_epoch_regression_recreates_mapping_at_once_with_same_port() -> None:
    m = natpmp_mapped(now=0.0, epoch=1000, ext_port=61001)
    assert len(m.poll(3600.0)) == 2  # the renewal: address and mapping
    out = m.receive(encode_natpmp_address_response(5, PUBLIC), GW_SRC, 3600.1)  # went backwards
    assert payloads(out) == [encode_natpmp_map_request(PORT, 61001, 7200)]
    assert m.counters["gateway lost state"] == 1
    assert "lost its state" in m.state.result_message


def test_natpmp_announcement_with_lost_state_rechecks_address_and_mapping() -> None:
    # Unsolicited (no address request pending): an announcement, whose epoch shows a reboot.
    m = natpmp_mapped(now=0.0, epoch=1000, ext_port=61001)
    out = m.receive(encode_natpmp_address_response(5, PUBLIC), GW_SRC, 10.0)
    assert payloads(out) == [encode_natpmp_address_request(), encode_natpmp_map_request(PORT, 61001, 7200)]
    assert m.counters["gateway lost state"] == 1


@pytest.mark.parametrize(("their_elapsed", "lost"), [(697, True), (698, False), (800, False)])
def test_natpmp_epoch_seven_eighths_rule(their_elapsed: int, lost: bool) -> None:
    # our_elapsed 800 s: 7/8 of it is 700; lost if nat_elapsed + 2 < 700. The address answer is the
    # renewal's (granted 1600 s: renewed at 800 s).
    m = natpmp_mapped(now=0.0, epoch=1000, lifetime=1600)
    assert len(m.poll(800.0)) == 2
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
    out = m.receive(encode_natpmp_address_response(1010, "203.0.113.9"), (GW, 5351), 10.0)
    assert payloads(out) == [encode_natpmp_address_request(), encode_natpmp_map_request(PORT, 61001, 7200)]
    assert m.state.endpoint == Endpoint("203.0.113.9", 61001)
    assert m.changes[-1] == EndpointChanged(Endpoint(PUBLIC, 61001), Endpoint("203.0.113.9", 61001), 10.0)
    # A repeat while our re-check's address request is pending carries the same fact as its answer: it is
    # taken as the answer, nothing is sent.
    assert m.receive(encode_natpmp_address_response(1010, "203.0.113.9"), (GW, 5351), 10.25) == []
    assert m.receive(encode_natpmp_map_response(1010, PORT, 61001, 7200), GW_SRC, 10.3) == []
    assert m.deadline() == pytest.approx(10.3 + 3600)  # nothing pending but the renewal
    # The gateway's later repeats of the same announcement do not re-check again.
    assert m.receive(encode_natpmp_address_response(1010, "203.0.113.9"), (GW, 5351), 10.75) == []
    assert m.counters["repeated announcement"] == 1


def test_pcp_announce_rechecks_after_random_delay() -> None:
    m = pcp_mapped(now=0.0, epoch=1000)
    nonce = m.nonce
    assert m.receive(encode_pcp_response(0, 0, 0, 1100), (GW, 5351), 100.0) == []
    assert m.deadline() == pytest.approx(102.5)  # a random 0-5 s (fraction 0.5)
    assert payloads(m.poll(102.5)) == [encode_pcp_map_request(nonce, ME, PORT, 7200, 61001, PUBLIC)]


def test_pcp_announce_with_lost_state_uses_new_nonce_and_remaps_within_a_second() -> None:
    m = pcp_mapped(now=0.0, epoch=1000)
    old = m.nonce
    m.receive(encode_pcp_response(0, 0, 0, 2), (GW, 5351), 100.0)
    assert m.nonce != old
    # The epoch went backwards: the mapping is gone, so the re-map spreads over 0-1 s, not 0-5 s.
    assert m.deadline() == pytest.approx(100.5)  # fraction 0.5 of the 1 s spread
    assert payloads(m.poll(100.5)) == [encode_pcp_map_request(m.nonce, ME, PORT, 7200, 61001, PUBLIC)]


def test_pcp_announce_switches_natpmp_gateway_back_to_pcp() -> None:
    m = natpmp_mapped(now=0.0, epoch=1000)
    m.receive(encode_pcp_response(0, 0, 0, 5), (GW, 5351), 100.0)
    out = payloads(m.poll(102.5))
    assert len(out) == 1 and out[0][0] == 2


# -- expiry and shutdown ---------------------------------------------------------------------------------


def test_expiry_without_renewal_withdraws_endpoint_and_asks_same_port() -> None:
    m = natpmp_mapped(now=0.0, lifetime=100)
    run_until(m, 99.9)
    assert m.state.endpoint is not None
    m.poll(100.0)
    assert m.state.endpoint is None and m.changes[-1].new is None
    out = run_until(m, 200.0)
    assert encode_natpmp_map_request(PORT, 61001, 7200) in [p for _, p in out]


def test_close_deletes_natpmp_mapping() -> None:
    m = natpmp_mapped()
    out = m.close(5.0)
    assert payloads(out) == [bytes.fromhex(HEX_DELETE)]  # lifetime 0, suggested port 0
    assert m.state.endpoint is None
    assert m.changes[-1] == EndpointChanged(Endpoint(PUBLIC, 61001), None, 5.0)
    assert m.deadline() is None and m.poll(10.0) == [] and m.close(6.0) == []
    assert m.receive(bytes.fromhex(HEX_MAP_RESPONSE), GW_SRC, 6.0) == []


def test_close_deletes_pcp_mapping_with_its_nonce() -> None:
    m = pcp_mapped()
    nonce = m.nonce
    (t,) = m.close(5.0)
    assert t.payload == encode_pcp_map_request(nonce, ME, PORT, 0)
    assert t.payload[4:8] == b"\x00" * 4  # lifetime 0
    assert t.payload[42:44] == b"\x00\x00"  # suggested port 0
    assert t.payload[44:] == bytes.fromhex("00000000000000000000ffff00000000")


def test_close_waits_for_the_natpmp_delete_answer() -> None:
    m = natpmp_mapped()
    assert payloads(m.close(5.0)) == [bytes.fromhex(HEX_DELETE)]
    assert not m.finished()
    # A late answer to an earlier renewal is not the delete's answer; nor is one from another port.
    assert m.receive(bytes.fromhex(HEX_MAP_RESPONSE), GW_SRC, 5.1) == []
    assert m.receive(encode_natpmp_map_response(1005, PORT, 0, 0), (GW, 5350), 5.1) == []
    assert not m.finished() and not m.delete_confirmed
    assert m.receive(encode_natpmp_map_response(1005, PORT, 0, 0), GW_SRC, 5.2) == []
    assert m.finished() and m.delete_confirmed


def test_close_waits_for_the_pcp_delete_answer_with_its_nonce() -> None:
    m = pcp_mapped()
    m.close(5.0)
    assert not m.finished()
    m.receive(encode_pcp_map_response(b"\xee" * 12, PORT, 0, "0.0.0.0", 0, 1005), GW_SRC, 5.1)
    m.receive(encode_pcp_response(0, 0, 0, 1005), GW_SRC, 5.1)  # an ANNOUNCE (lifetime 0) is no answer
    assert not m.finished()
    m.receive(encode_pcp_map_response(m.nonce, PORT, 0, "0.0.0.0", 0, 1005), GW_SRC, 5.2)
    assert m.finished() and m.delete_confirmed


def test_a_refused_delete_is_answered_but_not_confirmed() -> None:
    m = pcp_mapped()
    m.close(5.0)
    m.receive(encode_pcp_map_response(m.nonce, PORT, 0, "0.0.0.0", 0, 1005, result=2), GW_SRC, 5.1)
    assert m.finished() and not m.delete_confirmed
    assert "refused to delete" in m.state.result_message and m.state.result_code == 2


def test_close_with_nothing_mapped_is_finished_at_once() -> None:
    idle = mapper()
    assert idle.close(0.0) == [] and idle.finished()  # never started: nothing to say
    m = mapper()
    m.start(0.0)
    (t,) = m.close(1.0)  # the delete still goes, in case a grant is on its way
    assert t.payload == encode_pcp_map_request(m.nonce, ME, PORT, 0)
    assert m.finished() and not m.delete_confirmed


def test_answers_become_granted_and_refused_events() -> None:
    m = mapper()
    m.start(0.0)
    m.receive(encode_pcp_map_response(m.nonce, PORT, 0, "0.0.0.0", 0, 1000, result=8), GW_SRC, 0.5)
    assert m.events == [Refused(PCP, 8, pcp_result_message(8), 0.5)]
    m.poll(30.5)
    m.receive(encode_pcp_map_response(m.nonce, PORT, 61001, PUBLIC, 7200, 1030), GW_SRC, 30.6)
    assert m.events[1:] == [EndpointChanged(None, Endpoint(PUBLIC, 61001), 30.6),
                            Granted(PCP, 61001, 7200, 30.6)]


def test_transmits_and_events_are_drained() -> None:
    core = PortMapper(ME, PORT, GW, rand=FakeRand())
    core.start(0.0)
    assert len(core.transmits()) == 1 and core.transmits() == []
    core.receive(encode_pcp_map_response(core.nonce, PORT, 61001, PUBLIC, 7200, 1000), GW_SRC, 0.1)
    assert len(core.events()) == 2 and core.events() == []


@settings(max_examples=300, deadline=None)
@given(data=DATAGRAMS, port=st.sampled_from([5351, 5350]), natpmp=st.booleans(), closed=st.booleans())
def test_receive_never_raises(data: bytes, port: int, natpmp: bool, closed: bool) -> None:
    m = natpmp_mapped() if natpmp else pcp_mapped()
    if closed:
        m.close(1.0)
    m.receive(data, (GW, port), 2.0)
    m.poll(3.0)
    assert m.deadline() is None or m.deadline() >= 2.0
