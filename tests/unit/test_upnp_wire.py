"""UPnP IGD wire: miniupnpd 2.3.1's real answers parse (tests/data/upnp), our requests have the shapes the
specs give, every value put into XML is escaped, and the bounds and the DOCTYPE/ENTITY refusal hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunneld.proto.errors import ParseError
from tunneld.proto.portmap.upnp_wire import (
    HTTP_MAX_RESPONSE,
    SSDP_MAX_RESPONSE,
    HttpResponse,
    HttpUrl,
    IgdService,
    encode_add_port_mapping,
    encode_delete_port_mapping,
    encode_description_request,
    encode_get_external_ip,
    encode_msearch,
    http_response_complete,
    parse_description,
    parse_http_response,
    parse_http_url,
    parse_soap_reply,
    parse_ssdp_answer,
)

DATA = json.loads((Path(__file__).parents[1] / "data" / "upnp" / "miniupnpd_2.3.1.json").read_text())
LOCATION = HttpUrl("192.168.77.1", 45385, "/rootDesc.xml")
WANIP2 = "urn:schemas-upnp-org:service:WANIPConnection:2"
SERVICE = IgdService(WANIP2, HttpUrl("192.168.77.1", 45385, "/ctl/IPConn"))


def raw(name: str) -> bytes:
    return str(DATA[name]).encode("latin-1")


def desc(services: str, extra: str = "") -> bytes:
    return (f'<?xml version="1.0"?><root xmlns="urn:schemas-upnp-org:device-1-0">{extra}<device>'
            f"<serviceList>{services}</serviceList></device></root>").encode()


def service(st: str, control: str) -> str:
    return f"<service><serviceType>{st}</serviceType><controlURL>{control}</controlURL></service>"


# -- the real miniupnpd --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,st", [
    ("ssdp_igd1", "urn:schemas-upnp-org:device:InternetGatewayDevice:1"),
    ("ssdp_igd2", "urn:schemas-upnp-org:device:InternetGatewayDevice:2"),
    ("ssdp_wanip1", "urn:schemas-upnp-org:service:WANIPConnection:1"),
])
def test_miniupnpd_ssdp_answers(name: str, st: str) -> None:
    answer = parse_ssdp_answer(raw(name))
    assert answer.location == LOCATION and str(answer.location) == "http://192.168.77.1:45385/rootDesc.xml"
    assert answer.st == st and answer.usn == f"uuid:00000000-0000-0000-0000-000000000000::{st}"


def test_miniupnpd_description_gives_wanipconnection2() -> None:
    response = parse_http_response(raw("description"))
    assert response.status == 200 and len(response.body) == 3093
    assert http_response_complete(raw("description"))
    assert parse_description(response.body, LOCATION) == SERVICE


def test_miniupnpd_soap_answers() -> None:
    def reply(name: str, action: str) -> tuple[bool, dict[str, str], int | None, str | None]:
        r = parse_soap_reply(parse_http_response(raw(name)), action)
        return r.ok, r.args, r.error_code, r.error

    assert reply("get_external_ip", "GetExternalIPAddress") == (
        True, {"NewExternalIPAddress": "203.0.113.1"}, None, None)
    assert reply("add_port_mapping_ok", "AddPortMapping") == (True, {}, None, None)
    assert reply("delete_port_mapping_ok", "DeletePortMapping") == (True, {}, None, None)
    assert reply("add_port_mapping_718", "AddPortMapping") == (
        False, {}, 718, "UPnP error 718 (ConflictInMappingEntry)")
    assert reply("add_port_mapping_606", "AddPortMapping") == (
        False, {}, 606, "UPnP error 606 (Action not authorized)")
    assert reply("invalid_action_401", "NoSuchAction")[2] == 401


# -- what we send --------------------------------------------------------------------------------------------

def test_msearch_shape() -> None:
    assert encode_msearch("urn:schemas-upnp-org:device:InternetGatewayDevice:1") == (
        b'M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: "ssdp:discover"\r\nMX: 1\r\n'
        b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\r\n")


def test_description_request() -> None:
    assert encode_description_request(LOCATION) == (
        b"GET /rootDesc.xml HTTP/1.1\r\nHost: 192.168.77.1:45385\r\nConnection: close\r\n"
        b"Accept: text/xml\r\n\r\n")


def _split(request: bytes) -> tuple[dict[str, str], bytes]:
    head, _, body = request.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /ctl/IPConn HTTP/1.1"
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert int(headers["Content-Length"]) == len(body)
    return headers, body


def test_add_port_mapping_request_escapes_values() -> None:
    headers, body = _split(encode_add_port_mapping(SERVICE, 40000, 4500, "192.168.77.2", 3600, 'a<b>&"c'))
    assert headers["SOAPAction"] == '"urn:schemas-upnp-org:service:WANIPConnection:2#AddPortMapping"'
    assert headers["Host"] == "192.168.77.1:45385"
    assert b"<NewPortMappingDescription>a&lt;b&gt;&amp;\"c</NewPortMappingDescription>" in body
    for part in (b"<NewRemoteHost></NewRemoteHost>", b"<NewExternalPort>40000</NewExternalPort>",
                 b"<NewProtocol>UDP</NewProtocol>", b"<NewInternalPort>4500</NewInternalPort>",
                 b"<NewInternalClient>192.168.77.2</NewInternalClient>", b"<NewEnabled>1</NewEnabled>",
                 b"<NewLeaseDuration>3600</NewLeaseDuration>"):
        assert part in body
    # The body is well-formed XML whose action element carries the values back unescaped.
    import xml.etree.ElementTree as ET
    action = ET.fromstring(body).find(f".//{{{WANIP2}}}AddPortMapping")
    assert action is not None
    assert [(c.tag, c.text or "") for c in action][6] == ("NewPortMappingDescription", 'a<b>&"c')


def test_delete_and_external_ip_requests() -> None:
    headers, body = _split(encode_delete_port_mapping(SERVICE, 40000))
    assert headers["SOAPAction"].endswith('#DeletePortMapping"')
    assert b"<NewExternalPort>40000</NewExternalPort><NewProtocol>UDP</NewProtocol>" in body
    headers, body = _split(encode_get_external_ip(SERVICE))
    assert headers["SOAPAction"].endswith('#GetExternalIPAddress"')
    assert b"<u:GetExternalIPAddress " in body


# -- descriptions --------------------------------------------------------------------------------------------

def test_description_prefers_wanip2_then_wanip1_then_ppp() -> None:
    ppp = service("urn:schemas-upnp-org:service:WANPPPConnection:1", "/ppp")
    ip1 = service("urn:schemas-upnp-org:service:WANIPConnection:1", "ip1")  # relative, no slash
    ip2 = service("urn:schemas-upnp-org:service:WANIPConnection:2", "/ip2")
    assert parse_description(desc(ppp + ip1 + ip2), LOCATION).control.path == "/ip2"
    got = parse_description(desc(ppp + ip1), LOCATION)
    assert got == IgdService("urn:schemas-upnp-org:service:WANIPConnection:1",
                             HttpUrl("192.168.77.1", 45385, "/ip1"))
    assert parse_description(desc(ppp), LOCATION).service_type.endswith("WANPPPConnection:1")
    with pytest.raises(ParseError, match="no WANIPConnection"):
        parse_description(desc(service("urn:schemas-upnp-org:service:Layer3Forwarding:1", "/l3f")), LOCATION)


def test_description_url_base_and_absolute_control() -> None:
    ip1 = service("urn:schemas-upnp-org:service:WANIPConnection:1", "/ctl")
    got = parse_description(desc(ip1, "<URLBase>http://192.168.77.1:5000</URLBase>"), LOCATION)
    assert got.control == HttpUrl("192.168.77.1", 5000, "/ctl")
    absolute = service("urn:schemas-upnp-org:service:WANIPConnection:1", "http://192.168.77.1:6000/x")
    assert parse_description(desc(absolute), LOCATION).control == HttpUrl("192.168.77.1", 6000, "/x")


@pytest.mark.parametrize("body", [
    b'<?xml version="1.0"?><!DOCTYPE lol [<!ENTITY a "aaaa">]><root>&a;</root>',
    b'<!doctype root SYSTEM "http://192.0.2.1/x.dtd"><root/>',
    b'<root><!ENTITY x SYSTEM "file:///etc/passwd"></root>',
])
def test_doctype_and_entities_refused_before_parsing(body: bytes) -> None:
    with pytest.raises(ParseError, match="DOCTYPE or ENTITY"):
        parse_description(body, LOCATION)


@pytest.mark.parametrize("body", [b"", b"<root>", b"<a></b>", b"\xff\xfe<",
                                  b'<?xml version="1.0" encoding="nope"?><a/>', b"<root>" * 50_000])
def test_bad_xml_is_a_parse_error(body: bytes) -> None:
    with pytest.raises(ParseError):
        parse_description(body, LOCATION)


# -- SSDP bounds ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("data,why", [
    (raw("ssdp_igd1") + b"x" * SSDP_MAX_RESPONSE, "too large"),
    (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 40 + b"LOCATION: http://192.168.77.1/\r\nST: x\r\n\r\n",
     "too many"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 600 + b"\r\nLOCATION: http://192.168.77.1/\r\nST: x\r\n\r\n",
     "too long"),
    (b"HTTP/1.1 404 Not Found\r\nLOCATION: http://192.168.77.1/\r\nST: x\r\n\r\n", "not 200"),
    (b"HTTP/1.1 200 OK\r\nST: x\r\n\r\n", "without LOCATION"),
    (b"HTTP/1.1 200 OK\r\nLOCATION: http://192.168.77.1/\r\nST: x\r\n", "end of headers"),
    (b"NOTIFY * HTTP/1.1\r\nLOCATION: http://192.168.77.1/\r\nST: x\r\n\r\n", "status line"),
    (b"HTTP/1.1 200 OK\r\nbad line\r\nLOCATION: http://192.168.77.1/\r\nST: x\r\n\r\n", "bad header"),
    (b"HTTP/1.1 200 OK\r\nLOCATION: http://gw.example/\r\nST: x\r\n\r\n", "IPv4"),
])
def test_ssdp_bounds(data: bytes, why: str) -> None:
    with pytest.raises(ParseError, match=why):
        parse_ssdp_answer(data)


@pytest.mark.parametrize("url", ["https://192.168.1.1/", "http://192.168.1.1:0/", "http://192.168.1.1:70000/",
                                 "http://300.1.1.1/", "http://192.168.1.1/a b", "http://[::1]/",
                                 "x" * 300])
def test_bad_urls(url: str) -> None:
    with pytest.raises(ParseError):
        parse_http_url(url)


def test_url_defaults() -> None:
    assert parse_http_url("HTTP://10.0.0.1") == HttpUrl("10.0.0.1", 80, "/")


# -- HTTP framing --------------------------------------------------------------------------------------------

def test_chunked_and_close_delimited_bodies() -> None:
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n")
    assert http_response_complete(chunked)
    assert not http_response_complete(chunked[:-7])
    assert parse_http_response(chunked) == HttpResponse(200, b"hello world")
    with pytest.raises(ParseError, match="cut short"):
        parse_http_response(chunked[:-7])
    close = b"HTTP/1.0 500 Internal Server Error\r\n\r\nbody until close"
    assert not http_response_complete(close)  # the end of the stream ends it
    assert parse_http_response(close) == HttpResponse(500, b"body until close")
    assert not http_response_complete(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
    assert not http_response_complete(b"HTTP/1.1 200 OK\r\nContent-")
    with pytest.raises(ParseError, match="shorter"):
        parse_http_response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")


@pytest.mark.parametrize("data,why", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 70000\r\n\r\n", "too large"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n", "CRLF"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1\r\na\r\n" * 300 + b"0\r\n\r\n",
     "many chunks"),
    (b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * HTTP_MAX_RESPONSE, "too large"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 9000 + b"\r\n\r\n", "headers too large"),
])
def test_http_bounds(data: bytes, why: str) -> None:
    with pytest.raises(ParseError, match=why):
        parse_http_response(data)
    assert http_response_complete(data)  # malformed: nothing more to read


def test_soap_reply_shapes() -> None:
    env = '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>{}</s:Body></s:Envelope>'
    assert parse_soap_reply(HttpResponse(404, b""), "AddPortMapping").error == "HTTP status 404"
    fault = env.format("<s:Fault><faultcode>s:Client</faultcode></s:Fault>").encode()
    assert parse_soap_reply(HttpResponse(500, fault), "AddPortMapping").error == \
        "SOAP fault without a UPnPError"
    bad_code = env.format("<s:Fault><detail><UPnPError><errorCode>x</errorCode></UPnPError></detail>"
                          "</s:Fault>")
    with pytest.raises(ParseError, match="errorCode"):
        parse_soap_reply(HttpResponse(500, bad_code.encode()), "AddPortMapping")
    with pytest.raises(ParseError, match="without AddPortMappingResponse"):
        parse_soap_reply(HttpResponse(200, env.format("<Other/>").encode()), "AddPortMapping")
    with pytest.raises(ParseError, match="Envelope"):
        parse_soap_reply(HttpResponse(200, b"<root/>"), "AddPortMapping")
    unknown = env.format("<s:Fault><detail><UPnPError><errorCode>899</errorCode><errorDescription>Mine"
                         "</errorDescription></UPnPError></detail></s:Fault>")
    assert parse_soap_reply(HttpResponse(500, unknown.encode()), "X").error == "UPnP error 899 (Mine)"
