"""UPnP IGD wire formats: SSDP search and answer (HTTPU), the device description, SOAP requests and replies.

Text in, bytes out, no state: the :mod:`~tunneld.proto.portmap.upnp` core decides what to send. Everything
from the network is bounded before it is parsed (sizes, header counts, line lengths) and every parser raises
only :class:`~tunneld.proto.errors.ParseError`. XML is refused outright if it declares a DOCTYPE or an
ENTITY (billion laughs, external entities) and is then parsed by the stdlib's expat. Every value put into
XML is escaped. docs/portmap.md ("UPnP IGD") lists what is sent and accepted.
"""

from __future__ import annotations

import ipaddress
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Final
from xml.sax.saxutils import escape

from tunneld.proto.errors import ParseError

__all__ = [
    "HTTP_MAX_HEADER", "HTTP_MAX_RESPONSE", "IGD_SERVICE_TYPES", "SSDP_GROUP", "SSDP_MAX_RESPONSE",
    "SSDP_PORT", "SSDP_SEARCH_TARGETS", "UPNP_ERRORS", "UPNP_MAX_LEASE", "HttpResponse", "HttpUrl",
    "IgdService",
    "SoapReply", "SsdpAnswer", "encode_add_port_mapping", "encode_delete_port_mapping",
    "encode_description_request", "encode_get_external_ip", "encode_msearch", "http_response_complete",
    "parse_description", "parse_http_response", "parse_http_url", "parse_soap_reply", "parse_ssdp_answer",
    "upnp_error_message",
]

# -- SSDP (UPnP Device Architecture 1.1, §1.3: discovery) ----------------------------------------------------
SSDP_GROUP: Final = "239.255.255.250"  # UDA 1.1 §1.1.2: the SSDP multicast address
SSDP_PORT: Final = 1900  # UDA 1.1 §1.1.2
SSDP_MX: Final = 1  # UDA 1.1 §1.3.2: MX, the seconds a device may wait before answering (1-5)
SSDP_SEARCH_TARGETS: Final = (  # UDA 1.1 §1.3.2 ST: device and service types (IGD:1 §2.1, IGD:2 §2.1)
    "urn:schemas-upnp-org:device:InternetGatewayDevice:1",
    "urn:schemas-upnp-org:device:InternetGatewayDevice:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
)
# Our bounds (the spec sets none): an SSDP answer is a dozen short header lines.
SSDP_MAX_RESPONSE: Final = 2048
MAX_HEADERS: Final = 32
MAX_LINE: Final = 512
MAX_URL: Final = 256

# -- HTTP over TCP (the description and SOAP; UDA 1.1 §2.1, §3.2) --------------------------------------------
HTTP_MAX_HEADER: Final = 8192  # our bound on the status line and headers
HTTP_MAX_BODY: Final = 65536  # our bound on a description or SOAP reply (miniupnpd's description: 3 KB)
HTTP_MAX_RESPONSE: Final = HTTP_MAX_HEADER + HTTP_MAX_BODY
MAX_CHUNKS: Final = 256  # our bound on chunks of a chunked body (RFC 9112 §7.1)

# -- The connection services, in our order of preference (WANIPConnection:2 §1, :1 §1, WANPPPConnection:1) ---
IGD_SERVICE_TYPES: Final = (
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
)
UPNP_MAX_LEASE: Final = 604800  # WANIPConnection:2 §2.3.18: PortMappingLeaseDuration 1..604800 s (0: v1 only)
SOAP_ENVELOPE_NS: Final = "http://schemas.xmlsoap.org/soap/envelope/"  # UDA 1.1 §3.2.1
SOAP_ENCODING: Final = "http://schemas.xmlsoap.org/soap/encoding/"

# UPnP error codes (UDA 1.1 §3.2.2 Table 3-3; WANIPConnection:1 §2.4.16/§2.4.17, :2 §2.5).
UPNP_INVALID_ACTION: Final = 401
UPNP_INVALID_ARGS: Final = 402
UPNP_ACTION_FAILED: Final = 501
UPNP_NOT_AUTHORIZED: Final = 606
UPNP_NO_SUCH_ENTRY: Final = 714
UPNP_CONFLICT: Final = 718  # ConflictInMappingEntry: the external port is mapped to someone else
UPNP_SAME_PORT_REQUIRED: Final = 724  # SamePortValuesRequired: external port must equal internal port
UPNP_ONLY_PERMANENT: Final = 725  # OnlyPermanentLeasesSupported: the lease must be 0
UPNP_ERRORS: Final = {
    UPNP_INVALID_ACTION: "Invalid Action",
    UPNP_INVALID_ARGS: "Invalid Args",
    UPNP_ACTION_FAILED: "Action Failed",
    UPNP_NOT_AUTHORIZED: "Action not authorized",
    UPNP_NO_SUCH_ENTRY: "NoSuchEntryInArray",
    715: "WildCardNotPermittedInSrcIP",
    716: "WildCardNotPermittedInExtPort",
    UPNP_CONFLICT: "ConflictInMappingEntry",
    UPNP_SAME_PORT_REQUIRED: "SamePortValuesRequired",
    UPNP_ONLY_PERMANENT: "OnlyPermanentLeasesSupported",
    726: "RemoteHostOnlySupportsWildcard",
    727: "ExternalPortOnlySupportsWildcard",
    728: "NoPortMapsAvailable",
    729: "ConflictWithOtherMechanisms",
    732: "WildCardNotPermittedInIntPort",
}

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_PATH = re.compile(r"/[!-~]*")  # printable ASCII, no spaces


@dataclass(frozen=True)
class HttpUrl:
    """An ``http://`` URL on an IPv4 literal host (we talk only to the gateway, by address)."""

    host: str
    port: int
    path: str

    def __str__(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"


@dataclass(frozen=True)
class SsdpAnswer:
    """An M-SEARCH answer: where the device description is, and what answered."""

    location: HttpUrl
    st: str
    usn: str


@dataclass(frozen=True)
class IgdService:
    """The connection service to send SOAP to: its type and its control URL."""

    service_type: str
    control: HttpUrl


@dataclass(frozen=True)
class HttpResponse:
    status: int
    body: bytes


@dataclass(frozen=True)
class SoapReply:
    """A SOAP reply: the action's out-arguments, or a UPnPError (``error_code``; ``error`` says what)."""

    args: dict[str, str] = field(default_factory=dict)
    error_code: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def upnp_error_message(code: int, description: str = "") -> str:
    name = UPNP_ERRORS.get(code) or description or "unknown error"
    return f"UPnP error {code} ({name})"


# -- SSDP ----------------------------------------------------------------------------------------------------

def encode_msearch(st: str) -> bytes:
    """An M-SEARCH request (UDA 1.1 §1.3.2) for search target ``st``."""
    return (f"M-SEARCH * HTTP/1.1\r\nHOST: {SSDP_GROUP}:{SSDP_PORT}\r\nMAN: \"ssdp:discover\"\r\n"
            f"MX: {SSDP_MX}\r\nST: {st}\r\n\r\n").encode("ascii")


def _header_lines(head: bytes) -> tuple[bytes, dict[str, str]]:
    """Status line and headers (names lower-cased; a repeated header keeps its first value), bounded."""
    lines = head.split(b"\r\n")
    if len(lines) > MAX_HEADERS + 1:
        raise ParseError("too many header lines")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if len(line) > MAX_LINE:
            raise ParseError("header line too long")
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            raise ParseError("bad header line")
        try:
            text = value.strip(b" \t").decode("ascii")
        except UnicodeDecodeError:
            raise ParseError("non-ASCII header value") from None
        headers.setdefault(name.decode("ascii").lower(), text)
    if len(lines[0]) > MAX_LINE:
        raise ParseError("status line too long")
    return lines[0], headers


def parse_ssdp_answer(data: bytes) -> SsdpAnswer:
    """An HTTPU answer to M-SEARCH (UDA 1.1 §1.3.3): ``HTTP/1.1 200 OK`` with LOCATION, ST and USN."""
    if len(data) > SSDP_MAX_RESPONSE:
        raise ParseError("SSDP answer too large")
    head, sep, _ = data.partition(b"\r\n\r\n")
    if not sep:
        raise ParseError("SSDP answer without an end of headers")
    status, headers = _header_lines(head)
    if _status_code(status) != 200:
        raise ParseError("SSDP answer is not 200 OK")
    if "location" not in headers or "st" not in headers:
        raise ParseError("SSDP answer without LOCATION or ST")
    return SsdpAnswer(parse_http_url(headers["location"]), headers["st"], headers.get("usn", ""))


def _status_code(line: bytes) -> int:
    parts = line.split(b" ", 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") \
            or not re.fullmatch(rb"[1-5]\d\d", parts[1]):
        raise ParseError("bad HTTP status line")
    return int(parts[1])


def parse_http_url(url: str) -> HttpUrl:
    """``http://A.B.C.D[:PORT]/PATH`` only: the gateway is addressed by its IPv4 literal."""
    if len(url) > MAX_URL:
        raise ParseError("URL too long")
    m = re.fullmatch(r"http://([0-9.]+)(?::([0-9]{1,5}))?(/[!-~]*)?", url, flags=re.IGNORECASE | re.ASCII)
    if m is None:
        raise ParseError("not an http:// URL on an IPv4 address")
    try:
        host = str(ipaddress.IPv4Address(m.group(1)))
    except ValueError:
        raise ParseError("bad IPv4 address in URL") from None
    port = int(m.group(2)) if m.group(2) else 80
    if not 0 < port < 65536:
        raise ParseError("bad port in URL")
    return HttpUrl(host, port, m.group(3) or "/")


# -- HTTP over TCP -------------------------------------------------------------------------------------------

def encode_description_request(url: HttpUrl) -> bytes:
    """GET the device description (UDA 1.1 §2.11)."""
    return (f"GET {url.path} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\nConnection: close\r\n"
            "Accept: text/xml\r\n\r\n").encode("ascii")


def _split_head(data: bytes) -> tuple[int, dict[str, str], bytes]:
    if len(data) > HTTP_MAX_RESPONSE:
        raise ParseError("HTTP response too large")
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        if len(data) > HTTP_MAX_HEADER:
            raise ParseError("HTTP headers too large")
        raise ParseError("HTTP response without an end of headers")
    if len(head) > HTTP_MAX_HEADER:
        raise ParseError("HTTP headers too large")
    status, headers = _header_lines(head)
    return _status_code(status), headers, rest


def _content_length(headers: dict[str, str]) -> int | None:
    value = headers.get("content-length")
    if value is None:
        return None
    if not value.isdigit() or len(value) > 6:
        raise ParseError("bad Content-Length")
    if int(value) > HTTP_MAX_BODY:
        raise ParseError("body too large")
    return int(value)


def _dechunk(data: bytes) -> tuple[bytes, bool]:
    """A chunked body (RFC 9112 §7.1): (the body so far, whether the last chunk was seen)."""
    body, pos = bytearray(), 0
    for _ in range(MAX_CHUNKS):
        end = data.find(b"\r\n", pos, pos + 64)
        if end < 0:
            if len(data) - pos >= 64:
                raise ParseError("bad chunk size line")
            return bytes(body), False
        size_text = data[pos:end].split(b";", 1)[0].strip()
        if not re.fullmatch(rb"[0-9A-Fa-f]{1,6}", size_text):
            raise ParseError("bad chunk size")
        size = int(size_text, 16)
        if size == 0:
            return bytes(body), True
        if len(body) + size > HTTP_MAX_BODY:
            raise ParseError("body too large")
        start = end + 2
        if len(data) < start + size + 2:
            return bytes(body), False
        if data[start + size:start + size + 2] != b"\r\n":
            raise ParseError("chunk without its CRLF")
        body += data[start:start + size]
        pos = start + size + 2
    raise ParseError("too many chunks")


def http_response_complete(data: bytes) -> bool:
    """Whether ``data`` holds a whole response by its own framing (Content-Length, or chunked with its last
    chunk); False while more may come (a body until close is complete only at the end of the stream).
    A malformed response is "complete": nothing more helps, and the parse reports it."""
    try:
        _, headers, rest = _split_head(data)
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return _dechunk(rest)[1]
        length = _content_length(headers)
    except ParseError as e:
        return "without an end of headers" not in str(e)
    return length is not None and len(rest) >= length


def parse_http_response(data: bytes) -> HttpResponse:
    """A whole HTTP/1.x response as read until the server closed (or the framing said it was whole)."""
    status, headers, rest = _split_head(data)
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body, done = _dechunk(rest)
        if not done:
            raise ParseError("chunked body cut short")
        return HttpResponse(status, body)
    length = _content_length(headers)
    if length is None:
        if len(rest) > HTTP_MAX_BODY:
            raise ParseError("body too large")
        return HttpResponse(status, rest)
    if len(rest) < length:
        raise ParseError("body shorter than its Content-Length")
    return HttpResponse(status, rest[:length])


# -- XML -----------------------------------------------------------------------------------------------------

def _xml(body: bytes) -> ET.Element:
    """Parse bounded XML that declares no DOCTYPE or ENTITY (refused before parsing)."""
    if len(body) > HTTP_MAX_BODY:
        raise ParseError("XML too large")
    lowered = body.lower()
    if b"<!doctype" in lowered or b"<!entity" in lowered:
        raise ParseError("XML with a DOCTYPE or ENTITY declaration")
    try:
        return ET.fromstring(body)
    except (ET.ParseError, ValueError, LookupError, RecursionError):
        raise ParseError("bad XML") from None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child_text(element: ET.Element, name: str) -> str | None:
    for child in element:
        if _local(child.tag) == name:
            return (child.text or "").strip()
    return None


def parse_description(body: bytes, location: HttpUrl) -> IgdService:
    """The device description (UDA 1.1 §2.3): the preferred connection service and its control URL,
    resolved against URLBase (UPnP 1.0) or else the description's own location."""
    root = _xml(body)
    base = location
    url_base = _child_text(root, "URLBase")
    if url_base:
        base = parse_http_url(url_base.rstrip("/") + "/")
    found: dict[str, str] = {}
    for element in root.iter():
        if _local(element.tag) != "service":
            continue
        service_type, control = _child_text(element, "serviceType"), _child_text(element, "controlURL")
        if service_type in IGD_SERVICE_TYPES and control and service_type not in found:
            found[service_type] = control
    for service_type in IGD_SERVICE_TYPES:
        if service_type in found:
            return IgdService(service_type, _resolve(base, found[service_type]))
    raise ParseError("no WANIPConnection or WANPPPConnection service in the description")


def _resolve(base: HttpUrl, ref: str) -> HttpUrl:
    if ref.lower().startswith("http://"):
        return parse_http_url(ref)
    path = ref if ref.startswith("/") else "/" + ref
    if len(path) > MAX_URL or not _PATH.fullmatch(path):
        raise ParseError("bad control URL")
    return HttpUrl(base.host, base.port, path)


# -- SOAP (UDA 1.1 §3.2) -------------------------------------------------------------------------------------

def _soap_request(service: IgdService, action: str, args: list[tuple[str, str]]) -> bytes:
    inner = "".join(f"<{name}>{escape(value)}</{name}>" for name, value in args)
    body = (f'<?xml version="1.0"?>\r\n<s:Envelope xmlns:s="{SOAP_ENVELOPE_NS}" '
            f's:encodingStyle="{SOAP_ENCODING}"><s:Body><u:{action} '
            f'xmlns:u="{escape(service.service_type, {chr(34): "&quot;"})}">{inner}</u:{action}>'
            "</s:Body></s:Envelope>\r\n").encode()
    url = service.control
    head = (f"POST {url.path} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
            'Content-Type: text/xml; charset="utf-8"\r\n'
            f'SOAPAction: "{service.service_type}#{action}"\r\nContent-Length: {len(body)}\r\n'
            "Connection: close\r\n\r\n")
    return head.encode("ascii") + body


def encode_get_external_ip(service: IgdService) -> bytes:
    """GetExternalIPAddress (WANIPConnection:1 §2.4.18): no in-arguments."""
    return _soap_request(service, "GetExternalIPAddress", [])


def encode_add_port_mapping(service: IgdService, external_port: int, internal_port: int,
                            internal_client: str, lease: int, description: str) -> bytes:
    """AddPortMapping of UDP ``external_port`` to ``internal_client``:``internal_port`` (WANIPConnection:1
    §2.4.16): any remote host (""), enabled, ``lease`` seconds (0: permanent, IGD:1 only)."""
    return _soap_request(service, "AddPortMapping", [
        ("NewRemoteHost", ""), ("NewExternalPort", str(external_port)), ("NewProtocol", "UDP"),
        ("NewInternalPort", str(internal_port)), ("NewInternalClient", internal_client),
        ("NewEnabled", "1"), ("NewPortMappingDescription", description), ("NewLeaseDuration", str(lease))])


def encode_delete_port_mapping(service: IgdService, external_port: int) -> bytes:
    """DeletePortMapping of UDP ``external_port`` (WANIPConnection:1 §2.4.17)."""
    return _soap_request(service, "DeletePortMapping", [
        ("NewRemoteHost", ""), ("NewExternalPort", str(external_port)), ("NewProtocol", "UDP")])


def parse_soap_reply(response: HttpResponse, action: str) -> SoapReply:
    """200 with ``<u:ACTIONResponse>``: its out-arguments; 500 with a UPnPError fault (UDA 1.1 §3.2.2):
    its code; any other status: an error without a code."""
    if response.status not in (200, 500):
        return SoapReply(error=f"HTTP status {response.status}")
    root = _xml(response.body)
    if _local(root.tag) != "Envelope":
        raise ParseError("SOAP reply is not an Envelope")
    body = next((child for child in root if _local(child.tag) == "Body"), None)
    if body is None:
        raise ParseError("SOAP reply without a Body")
    for element in body:
        name = _local(element.tag)
        if name == f"{action}Response" and response.status == 200:
            args = {_local(child.tag): (child.text or "").strip() for child in element}
            return SoapReply(args=args)
        if name == "Fault":
            return _fault(element)
    raise ParseError(f"SOAP reply without {action}Response or a Fault")


def _fault(fault: ET.Element) -> SoapReply:
    for element in fault.iter():
        if _local(element.tag) == "UPnPError":
            code_text = _child_text(element, "errorCode") or ""
            if not code_text.isdigit() or len(code_text) > 4:
                raise ParseError("UPnPError without a numeric errorCode")
            code = int(code_text)
            description = (_child_text(element, "errorDescription") or "")[:80]
            return SoapReply(error_code=code, error=upnp_error_message(code, description))
    return SoapReply(error="SOAP fault without a UPnPError")
