"""The publishing service: the :class:`~tunneld.proto.dnsupdate.Publisher` core over one UDP socket
connected to the account's DNS UPDATE server, run by the :class:`Driver` on the wall clock.

The daemon hands it our records (:meth:`PublisherService.set_records`, when the public endpoint moves). The
first registration waits RFC 9664's random start-up delay (in the core), so devices that boot together do
not all hit the server at once. On cancellation (clean shutdown) the driver closes the core, which
withdraws our records, and waits for the answer at most :data:`STOP_GRACE`: a stopped device does not stay
published until its lease runs out -- or forever, on a server that ignores leases, as BIND does.

The browse PTR (``_autotunnel._udp.DOMAIN PTR``) is the one RRset shared by every device of the account:
it is declared shared to the publisher, which adds and deletes only our record there (class NONE), so
publishing or withdrawing never removes another device from discovery.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import dns.rdatatype
import dns.rrset
import trio

from tunneld.proto import hostkeys, records
from tunneld.proto.dnsupdate import Event, Failed, Published, Publisher, Withdrawn, startup_delay
from tunneld.services.driver import Driver, ServerLink, ServerPort, connect_udp

log = logging.getLogger("tunneld.publish")

RECORD_TTL = 60  # seconds: endpoints move, so peers must not cache them for long
STOP_GRACE = 2.0  # seconds to wait for the withdrawal's answer on shutdown


def host_records(name: str, domain: str, public_key: bytes, endpoint: str | None, *, nat: str | None = None,
                 relay: tuple[str, int] | None = None,
                 host_keys: Sequence[hostkeys.HostKey] = ()) -> list[dns.rrset.RRset]:
    """Our RRsets for the public endpoint ``"a.b.c.d:port"`` (or ``"[v6]:port"``), the browse PTR to us
    included (see the module docstring); with no endpoint, our identity alone (AAAA, TXT, PTR): peers then
    know our key and accept us when we reach them first. ``nat`` ("ei"/"pd": the endpoint is a STUN-observed
    binding) and ``relay`` (our TURN relayed address) go into the TXT (docs/protocol.md, "DNS records").
    ``host_keys`` (our SSH host keys) add their SSHFP and TXT at ``NAME.DOMAIN`` (tunneld.proto.hostkeys)."""
    keys = hostkeys.build(domain, name, host_keys, RECORD_TTL)
    if endpoint is None:
        rec = records.HostRecords.derive(name, domain, public_key, nat=nat, relay=relay)
        return records.build(rec, RECORD_TTL) + keys
    host, _, port = endpoint.rpartition(":")
    address = ipaddress.ip_address(host.strip("[]"))
    rec = records.HostRecords.derive(name, domain, public_key, int(port), [address], nat=nat, relay=relay)
    return records.build(rec, RECORD_TTL) + keys


class PublisherService(ServerLink[Event]):
    def __init__(self, server: tuple[str, int], zone: str, key_secret: bytes, lease: int,
                 start_delay: float | None = None, algorithm: str = "hmac-sha256",
                 connect: Callable[[tuple[str, int]], Awaitable[ServerPort]] = connect_udp) -> None:
        # `tunneld account new` prints the key as "DOMAIN.": the key is named after the account's zone.
        self.publisher = Publisher(zone, zone, key_secret, algorithm=algorithm, lease=lease,
                                   shared=[(records.browse_name(zone), dns.rdatatype.PTR)], server=server,
                                   start_delay=startup_delay() if start_delay is None else start_delay)
        super().__init__(self.publisher, server, grace=STOP_GRACE, name="publish", connect=connect)
        self._rrsets: list[dns.rrset.RRset] | None = None  # what we should publish; None: nothing yet
        self._started = False  # the first publication was handed to the core
        self.answered = trio.Event()  # the server answered (or the core gave up on) a first publication

    # -- the daemon's side -------------------------------------------------------------------------------

    def set_records(self, rrsets: Sequence[dns.rrset.RRset] | None) -> None:
        """New records to publish (the public endpoint moved); None keeps what is published."""
        if rrsets is None:
            return
        new = list(rrsets)
        if self._rrsets is not None and _same(new, self._rrsets):
            return
        self._rrsets = new
        self._hand_over()

    def ready(self, driver: Driver[Event]) -> None:
        self._hand_over()

    def _hand_over(self) -> None:
        driver = self.driver
        if driver is None or self._rrsets is None:
            return  # run() hands them over once the socket is up
        if self._started:
            self.publisher.endpoint_changed(self._rrsets, driver.now())
        else:
            self._started = True
            self.publisher.publish(self._rrsets, driver.now())
        driver.wake()

    def status(self, now: float | None = None) -> dict[str, Any]:
        """``tunneld status``'s publish object. The core runs on the wall clock, so the times left are
        counted from ``time.time()`` (``now`` is accepted for the daemon's call and not used)."""
        wall = time.time()
        st = self.publisher.state
        if st.withdrawn:
            state = "withdrawn"
        elif st.pending:
            state = "publishing"
        elif st.published:
            state = "published"
        elif self._rrsets is None:
            state = "waiting"
        elif st.rcode not in (None, "NOERROR"):
            state = "failed"
        else:
            state = "publishing"
        message = st.message
        if state == "waiting":
            message = "no public endpoint yet: nothing to publish"
        lease = st.lease_granted if st.lease_granted is not None else st.lease_requested
        lease_left = round(st.expires_at - wall, 1) if st.published and st.expires_at is not None else None
        return {
            "state": state,
            "server": _show_server(self.server),
            "zone": st.zone,
            "rcode": st.rcode,
            "message": message,
            "unsigned_error": st.unsigned_error,
            "lease": lease,
            "lease_requested": st.lease_requested,
            "lease_granted": st.lease_granted,
            "server_ignores_lease": st.server_ignores_lease,
            "lease_left": lease_left,
            "next_refresh_in": (round(st.next_refresh_at - wall, 1)
                                if st.next_refresh_at is not None and not st.withdrawn else None),
            "published": st.published,
            "records": [line for r in (self._rrsets or []) for line in r.to_text().splitlines()],
            "dropped": dict(self.publisher.counters),
        }

    def on_event(self, event: Event) -> None:
        if isinstance(event, Published | Failed):
            self.answered.set()
        if isinstance(event, Published):
            log.info("published our records on %s (lease %d s%s)", _show_server(self.server), event.lease,
                     "" if event.granted else ", server ignores leases")
        elif isinstance(event, Withdrawn):
            log.info("withdrew our records from %s", _show_server(self.server))
        elif isinstance(event, Failed):
            log.warning("publishing on %s failed: %s", _show_server(self.server), event.message)


def _same(a: Sequence[dns.rrset.RRset], b: Sequence[dns.rrset.RRset]) -> bool:
    return len(a) == len(b) and all(x == y and x.ttl == y.ttl for x, y in zip(a, b, strict=True))


def _show_server(server: tuple[str, int]) -> str:
    host, port = server
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def disabled_status(message: str) -> dict[str, Any]:
    """The `publish` object of `tunneld status` when there is no publisher: the same keys."""
    return {
        "state": "disabled", "server": None, "zone": None, "rcode": None, "message": message,
        "unsigned_error": False, "lease": None, "lease_requested": None, "lease_granted": None,
        "server_ignores_lease": False, "lease_left": None, "next_refresh_in": None, "published": False,
        "records": [], "dropped": {},
    }
