"""The zone's DNS-over-TLS service records: `_dns-update-tls._tcp`, `_dns-query-tls._tcp`,
`_dns-push-tls._tcp` and `_dns-llq-tls._tcp` (Apple's LLQ over TLS) SRV at the TLS port when serve-dns has
one, protected always, and public (a client finds the server before it can sign)."""

from __future__ import annotations

import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.update
import pytest

from tunneld.dnsserver.core import DnsCore, account_key
from tunneld.dnsserver.store import TLS_SRV_SERVICES, AddRR, Lease, ZoneStore
from tunneld.proto.srv import (
    LLQ_TLS_SRV_SERVICE,
    PUSH_TLS_SRV_SERVICE,
    QUERY_TLS_SRV_SERVICE,
    UPDATE_TLS_SRV_SERVICE,
    build_srv_query,
    pick_srv_target,
)
from tunneld.proto.tsig import sign, verify

DOMAIN = "example.com"
ZONE = dns.name.from_text(DOMAIN)
SECRET = bytes(range(32))
KEY = account_key(SECRET, DOMAIN)
T0 = 1_800_000_000.0
SERVICES = (UPDATE_TLS_SRV_SERVICE, QUERY_TLS_SRV_SERVICE, PUSH_TLS_SRV_SERVICE, LLQ_TLS_SRV_SERVICE)


def n(text: str) -> dns.name.Name:
    return dns.name.from_text(text, ZONE)


def store_with(tls_port: int | None) -> ZoneStore:
    return ZoneStore(":memory:", ZONE, "ns.example.com.", 53, addresses=["192.0.2.53"], tls_port=tls_port)


def ask(core: DnsCore, qname: dns.name.Name, rdtype: int, *, signed: bool) -> dns.message.Message:
    wire, mac = dns.message.make_query(qname, rdtype, id=0x4242).to_wire(), b""
    if signed:
        wire, mac = sign(wire, KEY, int(T0))
    reply = core.handle(wire, ("198.51.100.7", 4242), T0)
    assert reply is not None
    if signed:
        verify(reply, KEY, mac, T0)
    return dns.message.from_wire(reply, keyring=False)


def test_the_service_names_are_the_ones_clients_look_for() -> None:
    assert SERVICES == ("_dns-update-tls._tcp", "_dns-query-tls._tcp", "_dns-push-tls._tcp",
                        "_dns-llq-tls._tcp")
    assert TLS_SRV_SERVICES == SERVICES


def test_with_a_tls_port_the_three_srv_records_name_it() -> None:
    store = store_with(853)
    for service in SERVICES:
        srv = store.rrset(n(service), dns.rdatatype.SRV, T0)
        assert [rr.rdata.to_text() for rr in srv] == ["0 0 853 ns.example.com."]
        assert store.is_protected(n(service), dns.rdatatype.SRV)
        assert store.is_protected(n(service), dns.rdatatype.ANY)
    # the UDP ones are unchanged: the DNS port
    assert [rr.rdata.to_text() for rr in store.rrset(n("_dns-update._udp"), dns.rdatatype.SRV, T0)] == [
        "0 0 53 ns.example.com."]
    assert store.name_exists(n("_tcp"), T0) and not store.name_in_use(n("_tcp"), T0)  # empty non-terminal


def test_without_a_tls_port_there_are_none_and_the_names_stay_reserved() -> None:
    store = store_with(None)
    for service in SERVICES:
        assert store.rrset(n(service), dns.rdatatype.SRV, T0) == []
        assert store.is_protected(n(service), dns.rdatatype.SRV)
        with pytest.raises(ValueError):  # no device may point the others' TLS elsewhere
            store.apply_update([AddRR(n(service), 60, dns.rdata.from_text(
                dns.rdataclass.IN, dns.rdatatype.SRV, "0 0 853 evil.example."))], Lease(3600, 3600), T0)
    assert not store.name_exists(n("_tcp"), T0)
    with pytest.raises(ValueError):
        ZoneStore(":memory:", ZONE, "ns.example.com.", 53, tls_port=0)


@pytest.mark.parametrize("service", SERVICES)
def test_the_public_view_shows_them_to_unsigned_queries(service: str) -> None:
    core = DnsCore(store_with(8853), [KEY])
    reply = ask(core, n(service), dns.rdatatype.SRV, signed=False)
    assert reply.rcode() == dns.rcode.NOERROR
    assert [rd.to_text() for rrset in reply.answer for rd in rrset] == ["0 0 8853 ns.example.com."]
    # the name they target has its address in the public view too
    reply = ask(core, n("ns"), dns.rdatatype.A, signed=False)
    assert [rd.to_text() for rrset in reply.answer for rd in rrset] == ["192.0.2.53"]
    # _tcp.ZONE is the empty non-terminal above them: NODATA, not NXDOMAIN
    ent = ask(core, n("_tcp"), dns.rdatatype.PTR, signed=False)
    assert ent.rcode() == dns.rcode.NOERROR and not ent.answer


def test_without_tls_an_unsigned_query_finds_no_such_name() -> None:
    core = DnsCore(store_with(None), [KEY])
    for service in SERVICES:
        reply = ask(core, n(service), dns.rdatatype.SRV, signed=False)
        assert reply.rcode() == dns.rcode.NXDOMAIN and not reply.answer
    assert ask(core, n("_tcp"), dns.rdatatype.PTR, signed=False).rcode() == dns.rcode.NXDOMAIN


def test_a_signed_update_at_a_tls_service_name_is_refused() -> None:
    core = DnsCore(store_with(853), [KEY])
    upd = dns.update.UpdateMessage(ZONE)
    upd.add(n(PUSH_TLS_SRV_SERVICE), 60, "SRV", "0 0 853 evil.example.")
    wire, mac = sign(upd.to_wire(), KEY, int(T0))
    reply = core.handle(wire, ("198.51.100.7", 4242), T0)
    assert reply is not None
    verify(reply, KEY, mac, T0)
    assert dns.message.from_wire(reply, keyring=False).rcode() == dns.rcode.REFUSED
    kept = core.store.rrset(n(PUSH_TLS_SRV_SERVICE), dns.rdatatype.SRV, T0)
    assert [rr.rdata.to_text() for rr in kept] == ["0 0 853 ns.example.com."]


def test_a_signed_srv_lookup_picks_the_tls_port() -> None:
    """The client's side (tunneld.proto.srv) against the server's: the signed lookup finds the TLS port."""
    core = DnsCore(store_with(853), [KEY])
    query = build_srv_query(DOMAIN, service=UPDATE_TLS_SRV_SERVICE, key=KEY, now=T0)
    reply = core.handle(query.payload, ("198.51.100.7", 4242), T0)
    assert reply is not None
    assert pick_srv_target(reply, query, now=T0) == ("ns.example.com", 853)


def test_serve_dns_names_its_tls_port_only_where_the_server_name_leads() -> None:
    """The SRV records target the server name, whose address is the --listen one: a TLS listener on
    another specific address gets none (clients keep their configured server); otherwise its port."""
    from tunneld.config import parse_endpoint
    from tunneld.serve_dns_cmd import tls_srv_port

    listen = parse_endpoint("192.0.2.53:53")
    assert tls_srv_port(listen, None, addressed=True) is None
    assert tls_srv_port(listen, parse_endpoint("192.0.2.53:853"), addressed=True) == 853
    assert tls_srv_port(listen, parse_endpoint("0.0.0.0:8853"), addressed=True) == 8853  # every address
    assert tls_srv_port(listen, parse_endpoint("192.0.2.54:853"), addressed=True) is None
    # no address published for the name: clients go to their configured server's host anyway
    assert tls_srv_port(parse_endpoint("[::]:53"), parse_endpoint("192.0.2.54:853"), addressed=False) == 853
