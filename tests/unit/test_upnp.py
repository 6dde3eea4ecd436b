"""The UPnP IGD core and the protocol order (PCP, NAT-PMP, then UPnP), in memory and virtual time.

A fake IGD answers with miniupnpd 2.3.1's real replies (tests/data/upnp) unless told to fail an action
with a UPnP error. Checked: discovery, description, external address, mapping, renewal at half the lease,
delete on close; the fall-backs on 725, 718 and 724; retries and give-ups; what is ignored; and the
GatewayMapper's order between the PortMapper and the UpnpMapper.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tunneld.proto.portmap.chain import UPNP_AFTER, GatewayMapper
from tunneld.proto.portmap.events import Endpoint, EndpointChanged, Granted, Refused
from tunneld.proto.portmap.natpmp_wire import PORTMAP_SERVER_PORT
from tunneld.proto.portmap.pcp_wire import encode_pcp_map_response
from tunneld.proto.portmap.upnp import (
    HTTP_TIMEOUT,
    RETRY_MIN,
    SSDP_ATTEMPTS,
    HttpRequest,
    UpnpEvent,
    UpnpMapper,
    UpnpPhase,
)
from tunneld.proto.portmap.upnp_wire import SSDP_GROUP, SSDP_PORT, SSDP_SEARCH_TARGETS

DATA = json.loads((Path(__file__).parents[1] / "data" / "upnp" / "miniupnpd_2.3.1.json").read_text())
GW = "192.168.77.1"
ME = "192.168.77.2"
PUBLIC = "203.0.113.1"
SSDP = str(DATA["ssdp_igd1"]).encode("latin-1")

FAULT = ('HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/xml; charset="utf-8"\r\n'
         "Connection: close\r\n"
         'Content-Length: {n}\r\n\r\n{body}')
FAULT_BODY = ('<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><s:Fault>'
              "<faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>"
              '<UPnPError xmlns="urn:schemas-upnp-org:control-1-0"><errorCode>{code}</errorCode>'
              "<errorDescription>x</errorDescription></UPnPError></detail></s:Fault></s:Body></s:Envelope>")


def fault(code: int) -> bytes:
    body = FAULT_BODY.format(code=code)
    return FAULT.format(n=len(body), body=body).encode()


class FakeIgd:
    """Answers HttpRequests; ``errors`` maps an action to the UPnP error codes of its next answers."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, bytes]] = []
        self.errors: dict[str, list[int]] = {}

    def answer(self, request: HttpRequest) -> bytes:
        assert (request.host, request.port) == (GW, 45385)
        if request.payload.startswith(b"GET /rootDesc.xml "):
            self.requests.append(("description", b""))
            return str(DATA["description"]).encode("latin-1")
        m = re.search(rb'SOAPAction: "urn:schemas-upnp-org:service:WANIPConnection:2#(\w+)"', request.payload)
        assert m, request.payload
        action = m.group(1).decode()
        self.requests.append((action, request.payload.partition(b"\r\n\r\n")[2]))
        if self.errors.get(action):
            return fault(self.errors[action].pop(0))
        replies = {"GetExternalIPAddress": DATA["get_external_ip"],
                   "AddPortMapping": DATA["add_port_mapping_ok"],
                   "DeletePortMapping": DATA["delete_port_mapping_ok"]}
        return str(replies[action]).encode("latin-1")

    def actions(self) -> list[str]:
        return [a for a, _ in self.requests]

    def arg(self, index: int, name: str) -> str:
        m = re.search(rf"<{name}>([^<]*)</{name}>".encode(), self.requests[index][1])
        assert m
        return m.group(1).decode()


def run_http(core: UpnpMapper | GatewayMapper, igd: FakeIgd, now: float) -> list[UpnpEvent]:
    """Answer every HttpRequest at once (and the ones the answers cause); the other events."""
    others: list[UpnpEvent] = []
    for _ in range(20):
        events = core.events()
        requests = [e for e in events if isinstance(e, HttpRequest)]
        others += [e for e in events if not isinstance(e, HttpRequest)]
        if not requests:
            return others
        for request in requests:
            core.http_answer(request.request_id, igd.answer(request), now)
    raise AssertionError("request loop")


def mapped(lifetime: int = 3600) -> tuple[UpnpMapper, FakeIgd, list[UpnpEvent]]:
    core = UpnpMapper(ME, 4500, GW, lifetime, rand=lambda n: b"\x01" * n)
    igd = FakeIgd()
    core.start(0.0)
    core.map(0.0)
    core.receive(SSDP, (GW, SSDP_PORT), 0.1)
    return core, igd, run_http(core, igd, 0.1)


def test_search_targets_go_to_the_gateway_and_optionally_the_group() -> None:
    core = UpnpMapper(ME, 4500, GW, 3600)
    core.start(0.0)
    sent = core.transmits()
    assert [t.destination for t in sent] == [(GW, SSDP_PORT)] * 3
    targets = [re.findall(rb"\r\nST: (\S+)", t.payload) for t in sent]
    assert targets == [[st.encode()] for st in SSDP_SEARCH_TARGETS]
    core = UpnpMapper(ME, 4500, GW, 3600, multicast=True)
    core.start(0.0)
    assert {t.destination for t in core.transmits()} == {(GW, SSDP_PORT), (SSDP_GROUP, SSDP_PORT)}


def test_maps_publishes_renews_and_deletes() -> None:
    core, igd, events = mapped()
    assert igd.actions() == ["description", "GetExternalIPAddress", "AddPortMapping"]
    assert (igd.arg(2, "NewExternalPort"), igd.arg(2, "NewInternalPort"), igd.arg(2, "NewInternalClient"),
            igd.arg(2, "NewProtocol"), igd.arg(2, "NewLeaseDuration")) == ("4500", "4500", ME, "UDP", "3600")
    assert events == [EndpointChanged(None, Endpoint(PUBLIC, 4500), 0.1), Granted("upnp", 4500, 3600, 0.1)]
    st = core.state
    assert (st.protocol, st.external_address, st.external_port, st.lifetime, st.result_code) == (
        "upnp", PUBLIC, 4500, 3600, 0)
    assert core.deadline() == 0.1 + 1800  # renewal at half the lease

    core.poll(1800.1)
    assert run_http(core, igd, 1800.1) == [Granted("upnp", 4500, 3600, 1800.1)]
    assert igd.actions()[3:] == ["GetExternalIPAddress", "AddPortMapping"]
    assert igd.arg(4, "NewExternalPort") == "4500"

    core.close(1801.0)
    assert not core.finished()
    assert run_http(core, igd, 1801.0) == [EndpointChanged(Endpoint(PUBLIC, 4500), None, 1801.0)]
    assert igd.actions()[-1] == "DeletePortMapping" and igd.arg(5, "NewExternalPort") == "4500"
    assert core.finished() and core.delete_confirmed


def test_the_delete_is_marked_goodbye_and_bounded() -> None:
    core, _igd, _ = mapped()
    core.close(10.0)
    (request,) = [e for e in core.events() if isinstance(e, HttpRequest)]
    assert request.goodbye and b"#DeletePortMapping" in request.payload
    assert core.deadline() == 10.0 + HTTP_TIMEOUT
    core.poll(10.0 + HTTP_TIMEOUT)  # no answer: finished anyway, not confirmed
    assert core.finished() and not core.delete_confirmed


def test_only_permanent_leases_maps_with_lease_0_and_still_renews() -> None:
    core = UpnpMapper(ME, 4500, GW, 3600)
    igd = FakeIgd()
    igd.errors["AddPortMapping"] = [725]
    core.start(0.0)
    core.map(0.0)
    core.receive(SSDP, (GW, SSDP_PORT), 0.0)
    events = run_http(core, igd, 0.0)
    assert [igd.arg(i, "NewLeaseDuration") for i in (2, 3)] == ["3600", "0"]
    assert Granted("upnp", 4500, 0, 0.0) in events
    assert core.deadline() == 1800.0 and core.state.expires_at is None
    assert core.counters["only permanent leases: lease 0"] == 1


def test_conflict_tries_another_port_and_same_port_required_goes_back() -> None:
    core = UpnpMapper(ME, 4500, GW, 3600, rand=lambda n: b"\x10\x00"[:n])
    igd = FakeIgd()
    igd.errors["AddPortMapping"] = [718, 724]
    core.start(0.0)
    core.map(0.0)
    core.receive(SSDP, (GW, SSDP_PORT), 0.0)
    events = run_http(core, igd, 0.0)
    ports = [igd.arg(i, "NewExternalPort") for i in (2, 3, 4)]
    assert ports == ["4500", str(1024 + 0x1000 % (65536 - 1024)), "4500"]
    assert Granted("upnp", 4500, 3600, 0.0) in events


def test_refusal_is_reported_and_retried_after_30_s() -> None:
    core = UpnpMapper(ME, 4500, GW, 3600)
    igd = FakeIgd()
    igd.errors["AddPortMapping"] = [606]
    core.start(0.0)
    core.map(0.0)
    core.receive(SSDP, (GW, SSDP_PORT), 0.0)
    events = run_http(core, igd, 0.0)
    why = "UPnP AddPortMapping: UPnP error 606 (Action not authorized)"
    assert events == [Refused("upnp", 606, why, 0.0)]
    assert (core.state.result_code, core.state.protocol, core.phase) == (606, "upnp", UpnpPhase.WAIT)
    assert core.deadline() == RETRY_MIN
    core.poll(RETRY_MIN)
    assert any(isinstance(e, Granted) for e in run_http(core, igd, RETRY_MIN))


def test_renewal_failure_keeps_the_mapping_until_it_expires() -> None:
    core, _igd, _ = mapped(lifetime=100)
    core.poll(50.1)
    request = next(e for e in core.events() if isinstance(e, HttpRequest))
    core.http_answer(request.request_id, None, 50.1)  # the exchange failed
    assert core.state.endpoint == Endpoint(PUBLIC, 4500)
    assert core.deadline() is not None and core.deadline() < 100.1  # type: ignore[operator]
    core.poll(100.1)
    assert EndpointChanged(Endpoint(PUBLIC, 4500), None, 100.1) in core.events()


def test_search_gives_up_after_three_and_tries_again_later() -> None:
    core = UpnpMapper(ME, 4500, GW, 3600)
    core.start(0.0)
    core.transmits()
    t = 0.0
    for _ in range(SSDP_ATTEMPTS):
        t = core.deadline()  # type: ignore[assignment]
        core.poll(t)
        assert len(core.transmits()) == (len(SSDP_SEARCH_TARGETS) if t < 3.5 else 0)
    assert core.gave_up_search and core.state.no_answer and not core.transmits()
    assert core.deadline() == t + RETRY_MIN
    core.poll(t + RETRY_MIN)
    assert len(core.transmits()) == len(SSDP_SEARCH_TARGETS)


def test_ignored_input_is_counted() -> None:
    core = UpnpMapper(ME, 4500, GW, 3600)
    core.receive(SSDP, (GW, SSDP_PORT), 0.0)
    core.start(0.0)
    core.receive(SSDP, ("192.168.77.9", SSDP_PORT), 0.0)
    core.receive(SSDP.replace(b"192.168.77.1:45385", b"192.0.2.1:80"), (GW, SSDP_PORT), 0.0)
    core.receive(b"HTTP/1.1 200 OK\r\n\r\n", (GW, SSDP_PORT), 0.0)
    core.http_answer(99, b"", 0.0)
    assert core.phase is UpnpPhase.DISCOVER and not core.events()
    assert set(core.counters) == {"SSDP answer not awaited", "wrong source", "description not on the gateway",
                                  "parse error: SSDP answer without LOCATION or ST", "stale HTTP answer"}


def test_bad_description_waits_and_searches_again() -> None:
    core = UpnpMapper(ME, 4500, GW, 3600)
    core.start(0.0)
    core.receive(SSDP, (GW, SSDP_PORT), 0.0)
    (request,) = core.events()
    assert isinstance(request, HttpRequest)
    core.http_answer(request.request_id, b"HTTP/1.1 200 OK\r\n\r\n<!DOCTYPE x><root/>", 0.0)
    assert core.phase is UpnpPhase.WAIT and not core.ready
    assert core.counters["parse error: XML with a DOCTYPE or ENTITY declaration"] == 1
    core.poll(RETRY_MIN)
    assert core.phase.value == UpnpPhase.DISCOVER.value


def test_http_timeout_makes_late_answers_stale() -> None:
    core = UpnpMapper(ME, 4500, GW, 3600)
    core.start(0.0)
    core.receive(SSDP, (GW, SSDP_PORT), 0.0)
    (request,) = core.events()
    assert isinstance(request, HttpRequest)
    core.poll(HTTP_TIMEOUT)
    core.http_answer(request.request_id, FakeIgd().answer(request), HTTP_TIMEOUT + 1)
    assert core.counters["stale HTTP answer"] == 1 and not core.ready


def test_double_nat_maps_but_publishes_nothing() -> None:
    core = UpnpMapper(ME, 4500, GW, 3600)
    igd = FakeIgd()
    real = igd.answer
    head, _, body = str(DATA["get_external_ip"]).partition("\r\n\r\n")
    body = body.replace(PUBLIC, "100.64.0.1")
    private = re.sub(r"Content-Length: \d+", f"Content-Length: {len(body)}", head) + "\r\n\r\n" + body

    def answer(request: HttpRequest) -> bytes:
        return private.encode() if b"#GetExternalIPAddress" in request.payload else real(request)

    igd.answer = answer  # type: ignore[method-assign]
    core.start(0.0)
    core.map(0.0)
    core.receive(SSDP, (GW, SSDP_PORT), 0.0)
    events = run_http(core, igd, 0.0)
    assert any(isinstance(e, Granted) for e in events) and core.state.endpoint is None
    assert core.state.external_address == "100.64.0.1"
    assert core.state.double_nat and "RFC 6598" in (core.state.double_nat_message or "")


# -- the order: PCP, NAT-PMP, then UPnP ----------------------------------------------------------------------

def chain() -> tuple[GatewayMapper, FakeIgd]:
    mapper = GatewayMapper(ME, 4500, GW, 3600, rand=lambda n: b"\x02" * n)
    mapper.start(0.0)
    return mapper, FakeIgd()


def test_pcp_answer_wins_and_upnp_never_maps() -> None:
    mapper, igd = chain()
    sent = mapper.transmits()
    assert {t.destination for t in sent} == {(GW, PORTMAP_SERVER_PORT), (GW, SSDP_PORT)}
    mapper.receive(SSDP, (GW, SSDP_PORT), 0.01)
    run_http(mapper, igd, 0.01)  # the description only
    answer = encode_pcp_map_response(mapper.pmp.nonce, 4500, 40000, PUBLIC, 3600, 100)
    mapper.receive(answer, (GW, PORTMAP_SERVER_PORT), 0.02)
    assert Granted("pcp", 40000, 3600, 0.02) in mapper.events()
    mapper.poll(UPNP_AFTER + 1)
    assert igd.actions() == ["description"] and mapper.state.protocol == "pcp"
    assert mapper.chosen == "pcp/nat-pmp"


def test_silence_from_pcp_and_natpmp_maps_by_upnp_after_the_wait() -> None:
    mapper, igd = chain()
    mapper.transmits()
    mapper.receive(SSDP, (GW, SSDP_PORT), 0.01)
    assert run_http(mapper, igd, 0.01) == []
    mapper.poll(UPNP_AFTER - 0.01)  # PCP's retransmission, no UPnP mapping yet
    assert run_http(mapper, igd, UPNP_AFTER - 0.01) == [] and igd.actions() == ["description"]
    assert mapper.deadline() == UPNP_AFTER
    mapper.poll(UPNP_AFTER)
    events = run_http(mapper, igd, UPNP_AFTER)
    assert Granted("upnp", 4500, 3600, UPNP_AFTER) in events
    assert EndpointChanged(None, Endpoint(PUBLIC, 4500), UPNP_AFTER) in events
    assert (mapper.chosen, mapper.state.protocol) == ("upnp", "upnp")
    # PCP is dropped: it sends nothing more.
    mapper.transmits()
    mapper.poll(100.0)
    assert all(t.destination[1] != PORTMAP_SERVER_PORT for t in mapper.transmits())
    mapper.close(101.0)
    run_http(mapper, igd, 101.0)
    assert igd.actions()[-1] == "DeletePortMapping" and mapper.finished() and mapper.delete_confirmed


def test_pcp_refusal_goes_to_upnp_at_once() -> None:
    mapper, igd = chain()
    mapper.transmits()
    # result 2: NOT_AUTHORIZED
    refusal = encode_pcp_map_response(mapper.pmp.nonce, 4500, 0, "0.0.0.0", 30, 100, result=2)
    mapper.receive(refusal, (GW, PORTMAP_SERVER_PORT), 0.01)
    assert not [e for e in mapper.events() if isinstance(e, Refused)]  # held while UPnP may map
    mapper.receive(SSDP, (GW, SSDP_PORT), 0.02)
    assert Granted("upnp", 4500, 3600, 0.02) in run_http(mapper, igd, 0.02)


def test_refusal_is_reported_once_no_igd_answers() -> None:
    mapper, _ = chain()
    mapper.transmits()
    refusal = encode_pcp_map_response(mapper.pmp.nonce, 4500, 0, "0.0.0.0", 30, 100, result=2)
    mapper.receive(refusal, (GW, PORTMAP_SERVER_PORT), 0.01)
    assert mapper.events() == []
    t = 0.01
    while not (mapper.upnp and mapper.upnp.gave_up_search):
        t = mapper.deadline()  # type: ignore[assignment]
        mapper.poll(t)
    assert [e.protocol for e in mapper.events() if isinstance(e, Refused)] == ["pcp"]


def test_without_upnp_the_chain_is_the_port_mapper() -> None:
    mapper = GatewayMapper(ME, 4500, GW, 3600, upnp=False)
    mapper.start(0.0)
    assert {t.destination for t in mapper.transmits()} == {(GW, PORTMAP_SERVER_PORT)}
    mapper.receive(SSDP, (GW, SSDP_PORT), 0.0)
    assert mapper.counters["for the protocol not in use"] == 1
