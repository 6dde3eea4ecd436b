"""The UPnP IGD client: one UDP port mapping on the gateway by SSDP discovery and WANIPConnection SOAP.

A sans-I/O core (:mod:`tunneld.proto.core`). SSDP is datagrams: M-SEARCH goes out of ``transmits()`` and
the gateway's answers come into :meth:`UpnpMapper.receive`. The description and the SOAP actions are HTTP
over TCP, which a core cannot do: it emits an :class:`HttpRequest` (address, bytes) and the service runs
one bounded exchange and hands the whole response (or None for a failure) to :meth:`UpnpMapper.http_answer`,
as the LLQ client does with its TCP queries. One request is in flight at a time. The behaviour (discovery,
fall-backs on UPnP errors, renewal at half the lease, delete on close) is in docs/portmap.md ("UPnP IGD").
"""

from __future__ import annotations

import enum
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from tunneld.proto.core import Address, Outbox
from tunneld.proto.errors import ParseError
from tunneld.proto.portmap.addresses import external_address_problem
from tunneld.proto.portmap.events import (
    Endpoint,
    EndpointChanged,
    Granted,
    MapperState,
    PortmapEvent,
    Refused,
)
from tunneld.proto.portmap.upnp_wire import (
    SSDP_GROUP,
    SSDP_PORT,
    SSDP_SEARCH_TARGETS,
    UPNP_CONFLICT,
    UPNP_MAX_LEASE,
    UPNP_ONLY_PERMANENT,
    UPNP_SAME_PORT_REQUIRED,
    HttpUrl,
    IgdService,
    SoapReply,
    encode_add_port_mapping,
    encode_delete_port_mapping,
    encode_description_request,
    encode_get_external_ip,
    encode_msearch,
    parse_description,
    parse_http_response,
    parse_soap_reply,
    parse_ssdp_answer,
)

__all__ = ["UPNP", "HttpRequest", "UpnpMapper", "UpnpPhase"]

UPNP: Final = "upnp"

# Our choices (the specs leave them open); docs/portmap.md gives the reasons.
SSDP_RETRY: Final = 1.0  # first M-SEARCH retry (the MX we ask for is 1 s), doubling
SSDP_ATTEMPTS: Final = 3  # searches (0, 1, 3 s) before "no IGD answered"
HTTP_TIMEOUT: Final = 5.0  # one description or SOAP exchange; the service bounds it too
RETRY_MIN: Final = 30.0  # retry after a failure: 30 s doubling to 15 min (as the PCP/NAT-PMP mapper)
RETRY_MAX: Final = 900.0
MIN_RENEW: Final = 2.0
CONFLICT_TRIES: Final = 4  # 718 ConflictInMappingEntry: try this many other external ports
DESCRIPTION: Final = "tunneld"  # NewPortMappingDescription


@dataclass(frozen=True)
class HttpRequest:
    """Send ``payload`` to ``host``:``port`` over TCP, read the response to the end (bounded), and hand it
    to :meth:`UpnpMapper.http_answer` with ``request_id`` (None if the exchange failed). ``goodbye``
    marks the delete sent by :meth:`UpnpMapper.close`: it must run even while the service stops."""

    request_id: int
    host: str
    port: int
    payload: bytes
    goodbye: bool = False


UpnpEvent = PortmapEvent | HttpRequest


class UpnpPhase(enum.Enum):
    IDLE = "idle"
    DISCOVER = "searching (SSDP)"
    DESCRIBE = "reading the device description"
    READY = "IGD found"
    ADDRESS = "asking for the external address"
    MAP = "asking for the mapping"
    MAPPED = "mapped"
    WAIT = "waiting to retry"
    CLOSED = "closed"


class UpnpMapper(Outbox[UpnpEvent]):
    """UPnP IGD client state for one UDP mapping of ``internal_address``:``internal_port``.

    :meth:`start` searches and reads the description; mapping begins with :meth:`map` (at once if called
    before the IGD is found). ``multicast`` adds the SSDP group to the gateway as a search destination.
    """

    def __init__(self, internal_address: str, internal_port: int, gateway: str, lifetime: int,
                 rand: Callable[[int], bytes] = os.urandom, multicast: bool = False) -> None:
        super().__init__()
        if not 0 < internal_port < 65536 or lifetime <= 0:
            raise ValueError("internal port out of range or lifetime not positive")
        self.internal_address = internal_address
        self.internal_port = internal_port
        self.gateway = gateway
        self.lease = min(lifetime, UPNP_MAX_LEASE)
        self.rand = rand
        self.multicast = multicast
        self.counters: Counter[str] = Counter()
        self.phase = UpnpPhase.IDLE
        self.service: IgdService | None = None
        self.answered = False  # the IGD answered a SOAP action (success or UPnPError)
        self.gave_up_search = False  # SSDP_ATTEMPTS searches went unanswered (searching goes on, slower)
        self._want_map = False
        self._external_port = internal_port  # the port we ask for
        self._granted_port: int | None = None
        self._granted_lease: int | None = None
        self._permanent = False  # 725: the IGD accepts lease 0 only
        self._conflicts = 0
        self._external_address: str | None = None
        self._double_nat: str | None = None
        self._endpoint: Endpoint | None = None
        self._expires_at: float | None = None
        self._timer: float | None = None  # next search, retry, renewal, or HTTP timeout
        self._searches = 0
        self._search_interval = SSDP_RETRY
        self._backoff = 0.0
        self._request_id = 0
        self._pending: str | None = None  # the action (or "description") awaiting its answer
        self._location: HttpUrl | None = None
        self._delete_pending = False
        self._delete_confirmed = False
        self._code: int | None = None
        self._message = "not started"

    # -- the public face ---------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """An IGD with a connection service is known."""
        return self.service is not None

    @property
    def delete_confirmed(self) -> bool:
        return self._delete_confirmed

    @property
    def state(self) -> MapperState:
        return MapperState(
            protocol=UPNP if self.answered else None, gateway=self.gateway, internal_port=self.internal_port,
            external_address=self._external_address, external_port=self._granted_port,
            lifetime=self._granted_lease, expires_at=self._expires_at, endpoint=self._endpoint,
            result_code=self._code, result_message=self._message, double_nat=self._double_nat is not None,
            double_nat_message=self._double_nat, no_answer=self.gave_up_search and not self.ready)

    def start(self, now: float) -> None:
        """Search for the IGD (and read its description)."""
        if self.phase is not UpnpPhase.IDLE:
            return
        self._search(now)

    def map(self, now: float) -> None:
        """Map the port: now if the IGD is known, else as soon as it is."""
        if self._want_map or self.phase is UpnpPhase.CLOSED:
            return
        self._want_map = True
        if self.phase is UpnpPhase.IDLE:
            self._search(now)
        elif self.phase is UpnpPhase.READY:
            self._ask_address(now)

    def receive(self, data: bytes, source: Address, now: float) -> None:
        """An SSDP answer (from the gateway; its LOCATION must be on the gateway too)."""
        if self.phase is not UpnpPhase.DISCOVER:
            self.counters["SSDP answer not awaited"] += 1
            return
        if source[0] != self.gateway:
            self.counters["wrong source"] += 1
            return
        try:
            answer = parse_ssdp_answer(data)
        except ParseError as e:
            self.counters[f"parse error: {e}"] += 1
            return
        if answer.location.host != self.gateway:
            self.counters["description not on the gateway"] += 1
            return
        self._location = answer.location
        self.phase = UpnpPhase.DESCRIBE
        self._set_status(None, f"UPnP: IGD at {answer.location}; reading its description")
        self._request(now, "description", answer.location, encode_description_request(answer.location))

    def http_answer(self, request_id: int, data: bytes | None, now: float) -> None:
        """The response to :class:`HttpRequest` ``request_id`` (None: connection failed or timed out)."""
        if request_id != self._request_id or self._pending is None:
            self.counters["stale HTTP answer"] += 1
            return
        what, self._pending = self._pending, None
        self._timer = None
        if data is None:
            self._http_failed(what, now, "no answer over HTTP")
            return
        try:
            response = parse_http_response(data)
            if what == "description":
                if response.status != 200:
                    raise ParseError(f"HTTP status {response.status} for the description")
                assert self._location is not None
                service = parse_description(response.body, self._location)
                if service.control.host != self.gateway:
                    raise ParseError("control URL not on the gateway")
                self._described(service, now)
                return
            reply = parse_soap_reply(response, what)
        except ParseError as e:
            self.counters[f"parse error: {e}"] += 1
            self._http_failed(what, now, f"bad answer ({e})")
            return
        if reply.error_code is not None:
            self.answered = True
        self._on_reply(what, reply, now)

    def poll(self, now: float) -> None:
        if self._expires_at is not None and now >= self._expires_at:
            self._expire(now)
        if self._timer is None or now < self._timer:
            return
        self._timer = None
        if self._pending is not None:  # the service did not answer in time: treat as a failure
            what, self._pending = self._pending, None
            self._request_id += 1
            self._http_failed(what, now, "HTTP exchange timed out")
        elif self.phase is UpnpPhase.DISCOVER:
            self._send_search(now)
        elif self.phase in (UpnpPhase.WAIT, UpnpPhase.MAPPED):
            if self.service is None:
                self._search(now)
            else:
                self._ask_address(now)

    def deadline(self) -> float | None:
        if self.phase in (UpnpPhase.IDLE, UpnpPhase.CLOSED) and not self._delete_pending:
            return None
        times = [t for t in (self._timer, self._expires_at) if t is not None]
        return min(times, default=None)

    def close(self, now: float) -> None:
        """Delete the mapping if one is held (one DeletePortMapping); the endpoint is withdrawn at once."""
        if self.phase in (UpnpPhase.IDLE, UpnpPhase.CLOSED):
            self.phase = UpnpPhase.CLOSED
            return
        held = self._granted_port
        if held is None and self._pending == "AddPortMapping":
            held = self._external_port  # it may have been granted already: delete it too
        self.phase = UpnpPhase.CLOSED
        self._pending = None
        self._timer = self._expires_at = None
        self._granted_port = self._granted_lease = None
        self._update_endpoint(now)
        if held is not None and self.service is not None:
            self._delete_pending = True
            self._set_status(None, "deleting the mapping (shutting down)")
            self._request(now, "DeletePortMapping", self.service.control,
                          encode_delete_port_mapping(self.service, held))
        else:
            self._set_status(None, "stopped")

    def finished(self) -> bool:
        return self.phase in (UpnpPhase.IDLE, UpnpPhase.CLOSED) and not self._delete_pending

    # -- steps -------------------------------------------------------------------------------------------

    def _search(self, now: float) -> None:
        self.phase = UpnpPhase.DISCOVER
        self._searches = 0
        self._search_interval = SSDP_RETRY
        self._set_status(None, f"UPnP: searching for an IGD at {self.gateway} (SSDP)")
        self._send_search(now)

    def _send_search(self, now: float) -> None:
        if self._searches >= SSDP_ATTEMPTS:
            self.gave_up_search = True
            self.counters["SSDP search unanswered"] += 1
            self._wait(now, None, f"UPnP: no IGD answered {SSDP_ATTEMPTS} searches at {self.gateway}")
            return
        self._searches += 1
        destinations = [(self.gateway, SSDP_PORT)] + ([(SSDP_GROUP, SSDP_PORT)] if self.multicast else [])
        for destination in destinations:
            for st in SSDP_SEARCH_TARGETS:
                self._send(destination, encode_msearch(st))
        self._timer = now + self._search_interval
        self._search_interval *= 2

    def _request(self, now: float, what: str, url: HttpUrl, payload: bytes) -> None:
        self._request_id += 1
        self._pending = what
        self._timer = now + HTTP_TIMEOUT
        self._emit(HttpRequest(self._request_id, url.host, url.port, payload,
                               goodbye=self.phase is UpnpPhase.CLOSED))

    def _described(self, service: IgdService, now: float) -> None:
        self.service = service
        self.gave_up_search = False
        self.phase = UpnpPhase.READY
        self._set_status(None, f"UPnP: IGD found ({service.service_type.rsplit(':', 2)[-2]} at "
                         f"{service.control})")
        if self._want_map:
            self._ask_address(now)

    def _ask_address(self, now: float) -> None:
        assert self.service is not None
        if self._granted_port is None:
            self.phase = UpnpPhase.ADDRESS
        self._request(now, "GetExternalIPAddress", self.service.control, encode_get_external_ip(self.service))

    def _ask_mapping(self, now: float) -> None:
        assert self.service is not None
        if self._granted_port is None:
            self.phase = UpnpPhase.MAP
        lease = 0 if self._permanent else self.lease
        self._request(now, "AddPortMapping", self.service.control, encode_add_port_mapping(
            self.service, self._external_port, self.internal_port, self.internal_address, lease, DESCRIPTION))

    def _on_reply(self, what: str, reply: SoapReply, now: float) -> None:
        if what == "DeletePortMapping":
            self._delete_pending = False
            self._delete_confirmed = reply.ok
            self._set_status(reply.error_code, "mapping deleted (shutting down)" if reply.ok
                             else f"the IGD refused to delete the mapping: {reply.error}")
            return
        if self.phase is UpnpPhase.CLOSED:
            return
        if what == "GetExternalIPAddress":
            if not reply.ok:
                self._fail(now, reply.error_code, f"UPnP GetExternalIPAddress: {reply.error}")
                return
            self.answered = True
            address = reply.args.get("NewExternalIPAddress", "")
            try:
                self._double_nat = external_address_problem(address)
                self._external_address = address
            except ValueError:  # none, or not an address: map anyway, publish nothing
                self._external_address = self._double_nat = None
                self.counters["no usable external address"] += 1
            self._update_endpoint(now)
            self._ask_mapping(now)
            return
        if reply.ok:
            self.answered = True
            self._granted(now)
            return
        code = reply.error_code
        if code == UPNP_ONLY_PERMANENT and not self._permanent:
            self._permanent = True  # IGD:1 §2.4.16: retry with lease 0, and renew anyway
            self.counters["only permanent leases: lease 0"] += 1
            self._ask_mapping(now)
        elif code == UPNP_CONFLICT and self._granted_port is None and self._conflicts < CONFLICT_TRIES:
            self._conflicts += 1
            self._external_port = 1024 + int.from_bytes(self.rand(2), "big") % (65536 - 1024)
            self.counters["external port taken: another port"] += 1
            self._ask_mapping(now)
        elif code == UPNP_SAME_PORT_REQUIRED and self._external_port != self.internal_port:
            self._external_port = self.internal_port
            self._ask_mapping(now)
        else:
            self._fail(now, code, f"UPnP AddPortMapping: {reply.error}")

    def _http_failed(self, what: str, now: float, why: str) -> None:
        if what == "DeletePortMapping":
            self._delete_pending = False
            self._set_status(None, f"the delete got no answer: {why} (the mapping expires by itself)")
            return
        if what == "description":
            self.service = None
            self._wait(now, None, f"UPnP: cannot read the IGD's description at {self._location}: {why}")
            return
        self._fail(now, None, f"UPnP {what}: {why}")

    # -- outcomes ----------------------------------------------------------------------------------------

    def _granted(self, now: float) -> None:
        self._granted_port = self._external_port
        self._granted_lease = 0 if self._permanent else self.lease
        self._conflicts = 0
        self._backoff = 0.0
        self.phase = UpnpPhase.MAPPED
        self._expires_at = None if self._permanent else now + self.lease
        self._timer = now + max(self.lease / 2, MIN_RENEW)  # renew at half the lease, permanent or not
        self._set_status(0, f"UPnP: UDP port {self.internal_port} mapped to external port "
                         f"{self._granted_port} for {'ever' if self._permanent else f'{self.lease} s'}")
        self._update_endpoint(now)
        self._emit(Granted(UPNP, self._granted_port, self._granted_lease, now))

    def _fail(self, now: float, code: int | None, message: str) -> None:
        """A refused or failed action: report it, retry from the external address after a backoff."""
        self._wait(now, code, message)
        self._emit(Refused(UPNP, code or 0, message, now))

    def _wait(self, now: float, code: int | None, message: str) -> None:
        if self._granted_port is None:
            self.phase = UpnpPhase.WAIT
        self._backoff = min(max(self._backoff * 2, RETRY_MIN), RETRY_MAX)
        self._timer = now + self._backoff
        if self._expires_at is not None:
            self._timer = min(self._timer, max(now + MIN_RENEW, (now + self._expires_at) / 2))
        self._set_status(code, message)

    def _expire(self, now: float) -> None:
        self._expires_at = None
        self._granted_port = self._granted_lease = None
        self.phase = UpnpPhase.WAIT
        self._set_status(self._code, "UPnP: the mapping expired without being renewed; asking again")
        self._update_endpoint(now)

    def _set_status(self, code: int | None, message: str) -> None:
        self._code, self._message = code, message

    def _update_endpoint(self, now: float) -> None:
        endpoint = None
        if (self._external_address is not None and self._granted_port is not None
                and self._double_nat is None and self.phase is not UpnpPhase.CLOSED):
            endpoint = Endpoint(self._external_address, self._granted_port)
        if endpoint != self._endpoint:
            event = EndpointChanged(self._endpoint, endpoint, now)
            self._endpoint = endpoint
            self._emit(event)
