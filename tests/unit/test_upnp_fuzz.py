"""Fuzzing the UPnP IGD parsers (SSDP answers, HTTP responses, device descriptions, SOAP replies) and the
UPnP core's input paths.

Invariant: for any input, each parser returns or raises ParseError, nothing else; the framing check
:func:`http_response_complete` never raises; a :class:`UpnpMapper` fed any SSDP datagrams and HTTP answers
never raises and counts what it cannot use.

Examples are built from a seed: miniupnpd 2.3.1's real answers (tests/data/upnp) and generated ones
(other header orders and cases, chunked bodies, descriptions with URLBase, WANPPPConnection, deep
nesting, SOAP faults), then mutated (cuts, byte flips, insertions of DOCTYPE/ENTITY, entity and character
references, unbound prefixes, repeated headers and elements, oversizing), and random bytes.
"""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunneld.proto.errors import ParseError
from tunneld.proto.portmap.upnp import HttpRequest, UpnpMapper
from tunneld.proto.portmap.upnp_wire import (
    HttpResponse,
    HttpUrl,
    http_response_complete,
    parse_description,
    parse_http_response,
    parse_soap_reply,
    parse_ssdp_answer,
)

DATA = json.loads((Path(__file__).parents[1] / "data" / "upnp" / "miniupnpd_2.3.1.json").read_text())
REAL = {k: str(v).encode("latin-1") for k, v in DATA.items() if k != "source"}
LOCATION = HttpUrl("192.168.77.1", 45385, "/rootDesc.xml")
GW = "192.168.77.1"
ACTIONS = ("GetExternalIPAddress", "AddPortMapping", "DeletePortMapping")

SLOW = settings(max_examples=10_000, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
QUICK = settings(max_examples=300, deadline=None)
seeds = st.integers(0, 2**64 - 1)

INSERTS = [b"<!DOCTYPE x>", b"<!ENTITY a 'b'>", b"&amp;", b"&#0;", b"&#x110000;", b"&lol;",
           b"<![CDATA[x]]>", b"<x:y>", b"</", b"<?xml version='1.0' encoding='utf-16'?>", b"\x00", b"\xff",
           b"\r\n\r\n",
           b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n", b"<URLBase>http://1.2.3.4:9</URLBase>",
           b"<controlURL>http://[::1]/x</controlURL>", b"<errorCode>99999</errorCode>",
           b"HTTP/1.1 200 OK\r\n"]


def _generated(rnd: random.Random) -> bytes:
    kind = rnd.randrange(4)
    if kind == 0:  # an SSDP answer, headers shuffled, odd cases
        headers = [f"ST: {rnd.choice(['upnp:rootdevice', 'urn:x'])}", f"USN: uuid:{rnd.randrange(10**6)}",
                   f"LOCATION: http://{GW}:{rnd.randrange(1, 70000)}/{'d' * rnd.randrange(300)}",
                   "CACHE-CONTROL: max-age=120", "EXT:"]
        rnd.shuffle(headers)
        head = "\r\n".join(h.lower() if rnd.random() < 0.3 else h for h in headers)
        return f"HTTP/1.1 200 OK\r\n{head}\r\n\r\n".encode()
    if kind == 1:  # a description
        kinds = ["WANIPConnection", "WANPPPConnection", "X"]
        controls = ["/c", "c", "http://192.168.77.1:1/c", ""]
        services = "".join(
            f"<service><serviceType>urn:schemas-upnp-org:service:{rnd.choice(kinds)}:{rnd.randrange(3)}"
            f"</serviceType><controlURL>{rnd.choice(controls)}</controlURL></service>"
            for _ in range(rnd.randrange(4)))
        depth = rnd.choice([0, 1, 50, 1000])
        nested = "<device>" * depth + services + "</device>" * depth
        base = "<URLBase>http://192.168.77.1:8080/</URLBase>" if rnd.random() < 0.3 else ""
        body = (f'<?xml version="1.0"?><root xmlns="urn:schemas-upnp-org:device-1-0">{base}{nested}'
                "</root>").encode()
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    if kind == 2:  # a SOAP fault or response, maybe chunked
        inner = rnd.choice([
            f"<s:Fault><detail><UPnPError><errorCode>{rnd.randrange(10000)}</errorCode></UPnPError></detail>"
            "</s:Fault>",
            f"<u:{rnd.choice(ACTIONS)}Response xmlns:u='urn:x'>"
            f"<NewExternalIPAddress>{rnd.randrange(999)}.0.0.1"
            "</NewExternalIPAddress></u:AddPortMappingResponse>"])
        body = (f'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>{inner}</s:Body>'
                "</s:Envelope>").encode()
        status = rnd.choice([b"200 OK", b"500 Internal Server Error", b"404 Not Found"])
        if rnd.random() < 0.5:
            size = rnd.randrange(1, 40)
            chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                              for i in range(0, len(body), size))
            return b"HTTP/1.1 " + status + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
        return b"HTTP/1.1 " + status + b"\r\n\r\n" + body
    return rnd.randbytes(rnd.choice([0, 1, 20, 500, 3000]))


def example(seed: int) -> bytes:
    rnd = random.Random(seed)
    data = bytearray(rnd.choice(list(REAL.values())) if rnd.random() < 0.5 else _generated(rnd))
    for _ in range(rnd.choice([0, 1, 1, 2, 4])):
        op = rnd.randrange(5)
        pos = rnd.randrange(len(data) + 1)
        if op == 0:
            del data[pos:]
        elif op == 1 and data:
            data[min(pos, len(data) - 1)] ^= 1 << rnd.randrange(8)
        elif op == 2:
            data[pos:pos] = rnd.choice(INSERTS)
        elif op == 3:
            data[pos:pos] = data[pos:pos + rnd.randrange(1, 200)] * rnd.choice([2, 2, 20, 400])
        else:
            del data[pos:pos + rnd.randrange(1, 50)]
    return bytes(data[:200_000])


def check_parsers(data: bytes) -> None:
    with contextlib.suppress(ParseError):
        parse_ssdp_answer(data)
    http_response_complete(data)
    try:
        response = parse_http_response(data)
    except ParseError:
        response = HttpResponse(200, data)
    with contextlib.suppress(ParseError):
        parse_description(response.body, LOCATION)
    action = ACTIONS[len(data) % len(ACTIONS)]
    for reply in (response, HttpResponse(500, response.body)):
        with contextlib.suppress(ParseError):
            parse_soap_reply(reply, action)


def _real_reply(request: bytes) -> bytes:
    if request.startswith(b"GET "):
        return REAL["description"]
    for action, name in (("GetExternalIPAddress", "get_external_ip"),
                         ("AddPortMapping", "add_port_mapping_ok"),
                         ("DeletePortMapping", "delete_port_mapping_ok")):
        if f"#{action}".encode() in request:
            return REAL[name]
    return b""


def check_core(seed: int) -> bool:
    rnd = random.Random(seed)
    core = UpnpMapper("192.168.77.2", 4500, GW, 3600, rand=rnd.randbytes)
    core.start(0.0)
    core.map(0.0)
    now = 0.0
    mapped = False
    for _ in range(rnd.randrange(1, 5)):
        now += rnd.choice([0.0, 0.5, 3.0, 40.0])
        if rnd.random() < 0.4:
            source = (GW if rnd.random() < 0.8 else "10.9.9.9", 1900)
            datagram = REAL["ssdp_igd1"] if rnd.random() < 0.5 else example(rnd.getrandbits(64))
            core.receive(datagram, source, now)
        for event in core.events():
            if isinstance(event, HttpRequest):
                answer = None if rnd.random() < 0.1 else example(rnd.getrandbits(64))
                if rnd.random() < 0.6:  # the real reply to this request, mostly as it is
                    answer = _real_reply(event.payload)
                core.http_answer(event.request_id, answer, now)
        core.poll(now)
        mapped |= core.state.external_port is not None
    core.close(now)
    assert core.deadline() is None or core.deadline() >= now  # type: ignore[operator]
    return mapped


@QUICK
@given(seeds)
def test_upnp_parsers_raise_only_parse_error(seed: int) -> None:
    check_parsers(example(seed))


@pytest.mark.slow
@SLOW
@given(seeds)
def test_upnp_parsers_raise_only_parse_error_10k(seed: int) -> None:
    check_parsers(example(seed))


@QUICK
@given(st.binary(max_size=4096))
def test_upnp_parsers_on_hypothesis_bytes(data: bytes) -> None:
    check_parsers(data)


@QUICK
@given(seeds)
def test_upnp_core_never_raises(seed: int) -> None:
    check_core(seed)


@pytest.mark.slow
@SLOW
@given(seeds)
def test_upnp_core_never_raises_10k(seed: int) -> None:
    check_core(seed)


def test_the_mix_reaches_every_parser_outcome() -> None:
    """The generated examples are not all rejected early: each parser accepts some of them."""
    ok = {"ssdp": 0, "http": 0, "description": 0, "soap": 0}
    for seed in range(600):
        data = example(seed)
        try:
            parse_ssdp_answer(data)
            ok["ssdp"] += 1
        except ParseError:
            pass
        try:
            response = parse_http_response(data)
            ok["http"] += 1
        except ParseError:
            continue
        try:
            parse_description(response.body, LOCATION)
            ok["description"] += 1
        except ParseError:
            pass
        try:
            parse_soap_reply(response, "AddPortMapping")
            ok["soap"] += 1
        except ParseError:
            pass
    assert all(count >= 5 for count in ok.values()), ok
    assert sum(check_core(seed) for seed in range(300)) >= 10  # the core reaches a mapping now and then
