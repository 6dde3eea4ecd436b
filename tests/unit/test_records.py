"""A device's DNS records: the contract's exact layout, and everything the watcher must refuse."""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import re
import string
from collections.abc import Callable
from pathlib import Path

import dns.message
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunneld.identity import iid_label, ula_for
from tunneld.proto.errors import ParseError
from tunneld.proto.records import (
    HostRecords,
    IPAddress,
    browse_name,
    build,
    check_name,
    host_from_browse_target,
    list_hosts,
    names_to_browse,
    names_to_watch,
    parse,
)

# The identity test vector (tests/unit/test_identity.py, docs/protocol.md).
DOMAIN = "Home.Example.NET."
PUBLIC_KEY = bytes(range(32))
PK_B64 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
ULA = ipaddress.IPv6Address("fd40:6e19:fbec:0:630d:cd29:66c4:3366")
LABEL = "AutoTunnel-63-0d-cd-29-66-c4-33-66"
V4 = ipaddress.IPv4Address("198.51.100.7")
V6 = ipaddress.IPv6Address("2001:db8::7")
TTL = 120

# Written by hand from docs/protocol.md "DNS records", not from the module.
EXPECTED_ZONE = f"""\
laptop.home.example.net. 120 IN AAAA {ULA}
_autotunnel._udp.laptop.home.example.net. 120 IN SRV 0 0 4500 {LABEL}.home.example.net.
_autotunnel._udp.laptop.home.example.net. 120 IN TXT "v=1" "pk={PK_B64}"
{LABEL}.home.example.net. 120 IN A 198.51.100.7
{LABEL}.home.example.net. 120 IN AAAA 2001:db8::7
_autotunnel._udp.home.example.net. 120 IN PTR _autotunnel._udp.laptop.home.example.net.
"""

SERVICE = "_autotunnel._udp.laptop.home.example.net."
TARGET = f"{LABEL}.home.example.net."
OTHER_KEY = bytes(range(1, 33))


def _host(**changes: object) -> HostRecords:
    host = HostRecords(
        name="laptop",
        domain=DOMAIN,
        public_key=PUBLIC_KEY,
        ula=ULA,
        port=4500,
        addresses=(V4, V6),
    )
    return dataclasses.replace(host, **changes)  # type: ignore[arg-type]


def _zone(rrsets: list[dns.rrset.RRset]) -> str:
    return "".join(rrset.to_text() + "\n" for rrset in rrsets)


def _rrset(name: str, rdtype: str, *rdatas: str) -> dns.rrset.RRset:
    return dns.rrset.from_text_list(name, TTL, "IN", rdtype, list(rdatas))


def _replace(rrsets: list[dns.rrset.RRset], name: str, rdtype: str, *rdatas: str) -> list[dns.rrset.RRset]:
    """``rrsets`` with the RRset at (name, rdtype) replaced by ``rdatas`` (removed when there are none)."""
    owner = dns.name.from_text(name)
    kind = dns.rdatatype.from_text(rdtype)
    kept = [r for r in rrsets if not (r.name == owner and r.rdtype == kind)]
    return [*kept, _rrset(name, rdtype, *rdatas)] if rdatas else kept


def _via_wire(rrsets: list[dns.rrset.RRset]) -> list[dns.rrset.RRset]:
    message = dns.message.Message(id=1)
    message.flags |= dns.flags.QR
    for rrset in rrsets:
        message.answer.append(rrset)
    return list(dns.message.from_wire(message.to_wire()).answer)


# --------------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------------


def test_build_matches_contract() -> None:
    assert _zone(build(_host(), TTL)) == EXPECTED_ZONE


def test_build_vector_inputs() -> None:
    # The vector's ULA and label are identity's; check we used them, not a copy of them.
    assert ula_for(DOMAIN, PUBLIC_KEY) == ULA
    assert iid_label(PUBLIC_KEY) == LABEL
    assert base64.b64encode(PUBLIC_KEY).decode() == PK_B64


def test_protocol_doc_example() -> None:
    # The example zone in the records section of docs/protocol.md is exactly what build() gives.
    doc = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
    blocks = re.findall(r"<!-- records-example -->\n```\n(.*?)```", doc.read_text(), re.S)
    assert blocks, "the records example (marked <!-- records-example -->) is missing from docs/protocol.md"
    assert blocks[0] == EXPECTED_ZONE


def test_build_ipv6_only() -> None:
    rrsets = build(_host(addresses=(V6,)), TTL)
    assert [(r.name.to_text(), dns.rdatatype.to_text(r.rdtype)) for r in rrsets] == [
        ("laptop.home.example.net.", "AAAA"),
        (SERVICE, "SRV"),
        (SERVICE, "TXT"),
        (TARGET, "AAAA"),
        ("_autotunnel._udp.home.example.net.", "PTR"),
    ]
    host = parse(DOMAIN, "laptop", rrsets)
    assert host.addresses == (V6,)
    assert host == _host(addresses=(V6,))


def test_build_ipv4_only_and_several_addresses() -> None:
    extra = ipaddress.IPv4Address("203.0.113.9")
    host = _host(addresses=(extra, V4, extra))
    assert host.addresses == (V4, extra)  # sorted, de-duplicated
    rrsets = build(host, TTL)
    a = [r for r in rrsets if r.rdtype == dns.rdatatype.A]
    assert len(a) == 1 and len(a[0]) == 2
    assert not [r for r in rrsets if r.name == dns.name.from_text(TARGET) and r.rdtype == dns.rdatatype.AAAA]
    assert parse(DOMAIN, "laptop", rrsets) == host


def test_build_keeps_name_case_lowers_domain() -> None:
    rrsets = build(_host(name="MacBook-Pro"), TTL)
    assert rrsets[0].name.to_text() == "MacBook-Pro.home.example.net."
    assert rrsets[0].name.labels[0] == b"MacBook-Pro"
    assert parse("home.example.net", "macbook-pro", rrsets).port == 4500


@pytest.mark.parametrize(
    "name",
    [
        "",
        "-laptop",
        "laptop-",
        "lap_top",
        "lap.top",
        "lap top",
        "a" * 64,
        "läptop",
        "AutoTunnel-1",
        "autotunnel-x",
    ],
)
def test_bad_names_rejected(name: str) -> None:
    with pytest.raises(ValueError):
        check_name(name)
    with pytest.raises(ValueError):
        _host(name=name)
    with pytest.raises(ValueError):
        names_to_watch(DOMAIN, name)


@pytest.mark.parametrize("name", ["a", "0", "laptop", "my-mac-2", "a" * 63, "9lives"])
def test_good_names_accepted(name: str) -> None:
    assert check_name(name) == name
    assert parse(DOMAIN, name, build(_host(name=name), TTL)).name == name


@pytest.mark.parametrize(
    "changes",
    [
        {"public_key": bytes(31)},
        {"ula": ipaddress.IPv6Address("fd00::1")},  # not the key's ULA: peers would refuse it
        {"port": 0},
        {"port": 65536},
        {"addresses": ()},  # a port needs an address
        {"port": None},  # and addresses need a port
        {"addresses": ("198.51.100.7",)},
        {"domain": "bad..domain"},
        {"domain": "a" * 60 + "." + "b" * 60 + "." + "c" * 60 + "." + "d" * 60},  # too long with labels
    ],
)
def test_bad_host_rejected(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _host(**changes)


@pytest.mark.parametrize("ttl", [-1, 2**31, True])
def test_bad_ttl_rejected(ttl: int) -> None:
    with pytest.raises(ValueError):
        build(_host(), ttl)


def test_derive_computes_ula() -> None:
    host = HostRecords.derive("laptop", DOMAIN, PUBLIC_KEY, 4500, [V6, V4])
    assert host == _host()
    assert host.domain == "home.example.net"
    assert host.public_key_b64 == PK_B64


# --------------------------------------------------------------------------------------------------------
# Parsing: accepted
# --------------------------------------------------------------------------------------------------------


def test_round_trip() -> None:
    assert parse(DOMAIN, "laptop", build(_host(), TTL)) == _host()


def test_round_trip_through_wire() -> None:
    wired = _via_wire(build(_host(), TTL))
    assert parse(DOMAIN, "laptop", wired) == _host()
    assert list_hosts(DOMAIN, wired) == ["laptop"]


def test_browse_ptr_not_required() -> None:
    rrsets = _replace(build(_host(), TTL), "_autotunnel._udp.home.example.net.", "PTR")
    assert len(rrsets) == 5
    assert parse(DOMAIN, "laptop", rrsets) == _host()


def test_unrelated_records_ignored() -> None:
    other = build(_host(name="desktop", public_key=OTHER_KEY, ula=ula_for(DOMAIN, OTHER_KEY)), TTL)
    noise = [
        _rrset("laptop.home.example.net.", "A", "192.0.2.1"),
        _rrset("home.example.net.", "TXT", '"hello"'),
        dns.rrset.from_text(SERVICE, TTL, "CH", "TXT", '"v=1" "pk=other"'),  # class CH: not ours
    ]
    assert parse(DOMAIN, "laptop", [*other, *noise, *build(_host(), TTL)]) == _host()


def test_srv_priority_weight_ignored() -> None:
    rrsets = _replace(build(_host(), TTL), SERVICE, "SRV", f"10 60 4500 {TARGET}")
    assert parse(DOMAIN, "laptop", rrsets) == _host()


@pytest.mark.parametrize(
    "txt",
    [
        f'"v=1" "pk={PK_B64}" "caps=esp,chacha" "flag"',  # more keys may follow, booleans too
        f'"pk={PK_B64}" "v=1"',  # order does not matter
        f'"" "V=1" "PK={PK_B64}"',  # §6.1 empty string skipped; §6.4 keys are case-insensitive
        f'"v=1" "=orphan" "pk={PK_B64}"',  # §6.4 a string without a key is ignored
    ],
)
def test_txt_lenient(txt: str) -> None:
    rrsets = _replace(build(_host(), TTL), SERVICE, "TXT", txt)
    assert parse(DOMAIN, "laptop", rrsets) == _host()


def test_split_rrsets_merged_and_case_insensitive() -> None:
    # The watcher may learn the target's addresses in pieces, and a server may change the case of names.
    rrsets = _replace(build(_host(), TTL), TARGET, "AAAA")
    rrsets = _replace(rrsets, TARGET, "A")
    rrsets += [_rrset(TARGET.upper(), "A", str(V4)), _rrset(TARGET.lower(), "AAAA", str(V6))]
    rrsets += [_rrset(TARGET, "A", str(V4))]  # a repeat is one record
    assert parse(DOMAIN.lower(), "LAPTOP", rrsets) == _host(name="LAPTOP")


# --------------------------------------------------------------------------------------------------------
# Parsing: refused
# --------------------------------------------------------------------------------------------------------

BAD_TXT = {
    "missing txt": None,
    "missing pk": '"v=1"',
    "missing v": f'"pk={PK_B64}"',
    "pk wrong length": f'"v=1" "pk={base64.b64encode(bytes(31)).decode()}"',
    "pk too long": f'"v=1" "pk={base64.b64encode(bytes(33)).decode()}"',
    "pk bad base64": '"v=1" "pk=not*base64!"',
    "pk unpadded": f'"v=1" "pk={PK_B64.rstrip("=")}"',
    "pk non-canonical": f'"v=1" "pk={PK_B64[:-2]}9="',
    "pk empty": '"v=1" "pk="',
    "pk boolean": '"v=1" "pk"',
    "v=2": f'"v=2" "pk={PK_B64}"',
    "v=01": f'"v=01" "pk={PK_B64}"',
    "duplicate v": f'"v=1" "v=1" "pk={PK_B64}"',
    "duplicate pk": f'"v=1" "pk={PK_B64}" "pk={PK_B64}"',
    "duplicate key any case": f'"v=1" "pk={PK_B64}" "Pk={PK_B64}"',
    "duplicate unknown key": f'"v=1" "pk={PK_B64}" "x=1" "x=2"',
}


@pytest.mark.parametrize("txt", BAD_TXT.values(), ids=BAD_TXT.keys())
def test_bad_txt(txt: str | None) -> None:
    args = (txt,) if txt is not None else ()
    rrsets = _replace(build(_host(), TTL), SERVICE, "TXT", *args)
    with pytest.raises(ParseError):
        parse(DOMAIN, "laptop", rrsets)


def test_two_txt_records() -> None:
    rrsets = _replace(build(_host(), TTL), SERVICE, "TXT", f'"v=1" "pk={PK_B64}"', '"v=1" "extra=1"')
    with pytest.raises(ParseError, match=r"^ambiguous txt"):
        parse(DOMAIN, "laptop", rrsets)


def test_wrong_ula_names_both() -> None:
    rrsets = _replace(build(_host(), TTL), "laptop.home.example.net.", "AAAA", "fd40:6e19:fbec::1")
    with pytest.raises(ParseError, match=r"^ula mismatch") as info:
        parse(DOMAIN, "laptop", rrsets)
    assert "fd40:6e19:fbec::1" in str(info.value)
    assert str(ULA) in str(info.value)


def test_ula_of_another_key() -> None:
    # A TXT carrying someone else's key: the published ULA no longer follows from it.
    other = base64.b64encode(OTHER_KEY).decode()
    rrsets = _replace(build(_host(), TTL), SERVICE, "TXT", f'"v=1" "pk={other}"')
    with pytest.raises(ParseError, match=r"^ula mismatch"):
        parse(DOMAIN, "laptop", rrsets)


def test_ula_in_other_domain() -> None:
    with pytest.raises(ParseError):
        parse("other.example.net", "laptop", _via_wire(build(_host(), TTL)))


@pytest.mark.parametrize(
    ("reason", "edit"),
    [
        ("missing aaaa", lambda r: _replace(r, "laptop.home.example.net.", "AAAA")),
        ("ambiguous aaaa", lambda r: _replace(r, "laptop.home.example.net.", "AAAA", str(ULA), "fd00::1")),
        ("ambiguous srv", lambda r: _replace(r, SERVICE, "SRV", f"0 0 4500 {TARGET}", f"0 0 4501 {TARGET}")),
        ("ambiguous srv", lambda r: _replace(r, SERVICE, "SRV", f"0 0 4500 {TARGET}", f"1 0 4500 {TARGET}")),
        (
            "srv target mismatch",
            lambda r: _replace(r, SERVICE, "SRV", f"0 0 4500 {iid_label(OTHER_KEY)}.home.example.net."),
        ),
        ("srv target mismatch", lambda r: _replace(r, SERVICE, "SRV", "0 0 4500 laptop.home.example.net.")),
        ("srv target mismatch", lambda r: _replace(r, SERVICE, "SRV", f"0 0 4500 {LABEL}.example.net.")),
        ("srv no service", lambda r: _replace(r, SERVICE, "SRV", "0 0 4500 .")),
        ("srv bad port", lambda r: _replace(r, SERVICE, "SRV", f"0 0 0 {TARGET}")),
    ],
)
def test_inconsistent(reason: str, edit: Callable[[list[dns.rrset.RRset]], list[dns.rrset.RRset]]) -> None:
    rrsets = edit(build(_host(), TTL))
    with pytest.raises(ParseError, match=f"^{reason}:"):
        parse(DOMAIN, "laptop", rrsets)
    with pytest.raises(ParseError, match=f"^{reason}:"):
        parse(DOMAIN, "laptop", _via_wire(rrsets))


def test_srv_split_across_rrsets_is_ambiguous() -> None:
    rrsets = [*build(_host(), TTL), _rrset(SERVICE, "SRV", f"0 0 4501 {TARGET}")]
    with pytest.raises(ParseError, match=r"^ambiguous srv"):
        parse(DOMAIN, "laptop", rrsets)


def test_addresses_of_other_target_not_used() -> None:
    rrsets = _replace(_replace(build(_host(), TTL), TARGET, "A"), TARGET, "AAAA")
    rrsets.append(_rrset(f"{iid_label(OTHER_KEY)}.home.example.net.", "A", str(V4)))
    host = parse(DOMAIN, "laptop", rrsets)
    assert host.port is None and host.addresses == () and host.endpoints == []


def test_identity_alone_is_a_member_without_endpoint() -> None:
    """A device behind a NAT that maps nothing publishes its AAAA, TXT and browse PTR only."""
    host = HostRecords.derive("laptop", DOMAIN, PUBLIC_KEY)
    rrsets = build(host, TTL)
    assert [(str(r.name), dns.rdatatype.to_text(r.rdtype)) for r in rrsets] == [
        ("laptop.home.example.net.", "AAAA"), (SERVICE, "TXT"), ("_autotunnel._udp.home.example.net.", "PTR")]
    for got in (parse(DOMAIN, "laptop", rrsets), parse(DOMAIN, "laptop", _via_wire(rrsets))):
        assert got == host and got.port is None and got.endpoints == [] and got.ula == ULA


@pytest.mark.parametrize("edit", [
    lambda r: _replace(r, SERVICE, "SRV"),  # no SRV: no endpoint
    lambda r: _replace(_replace(r, TARGET, "A"), TARGET, "AAAA"),  # SRV, no address (yet): no endpoint
])
def test_endpoint_records_missing_leave_the_identity(
        edit: Callable[[list[dns.rrset.RRset]], list[dns.rrset.RRset]]) -> None:
    rrsets = edit(build(_host(), TTL))
    for got in (parse(DOMAIN, "laptop", rrsets), parse(DOMAIN, "laptop", _via_wire(rrsets))):
        assert got.public_key == PUBLIC_KEY and got.port is None and got.addresses == ()


def test_empty_input() -> None:
    with pytest.raises(ParseError):
        parse(DOMAIN, "laptop", [])


def test_bad_name_is_caller_error() -> None:
    with pytest.raises(ValueError):
        parse(DOMAIN, "bad_name", build(_host(), TTL))


# --------------------------------------------------------------------------------------------------------
# Watching and browsing
# --------------------------------------------------------------------------------------------------------


def test_names_to_watch() -> None:
    def text(pairs: list[tuple[dns.name.Name, dns.rdatatype.RdataType]]) -> list[str]:
        return [f"{name} {dns.rdatatype.to_text(rdtype)}" for name, rdtype in pairs]

    assert text(names_to_watch(DOMAIN, "laptop")) == [
        "laptop.home.example.net. AAAA",
        f"{SERVICE} SRV",
        f"{SERVICE} TXT",
    ]
    assert text(names_to_watch(DOMAIN, "laptop", PUBLIC_KEY))[3:] == [f"{TARGET} A", f"{TARGET} AAAA"]
    assert text(names_to_browse(DOMAIN)) == ["_autotunnel._udp.home.example.net. PTR"]


def test_watched_names_cover_build() -> None:
    # Everything parse() needs is among what names_to_watch() asks for, plus the browse PTR.
    rrsets = build(_host(), TTL)
    watched = set(names_to_watch(DOMAIN, "laptop", PUBLIC_KEY)) | set(names_to_browse(DOMAIN))
    assert {(r.name, r.rdtype) for r in rrsets} <= watched
    assert parse(DOMAIN, "laptop", [r for r in rrsets if (r.name, r.rdtype) in watched]) == _host()


def test_list_hosts() -> None:
    hosts = [
        _host(name=name, public_key=key, ula=ula_for(DOMAIN, key))
        for name, key in [("laptop", PUBLIC_KEY), ("Desktop", OTHER_KEY), ("nas", bytes(32))]
    ]
    rrsets = [r for host in hosts for r in build(host, TTL)]
    assert list_hosts(DOMAIN, rrsets) == ["Desktop", "laptop", "nas"]
    # As a server would return them: one merged PTR RRset.
    assert list_hosts(DOMAIN, _via_wire(rrsets)) == ["Desktop", "laptop", "nas"]
    for name in list_hosts(DOMAIN, rrsets):
        assert parse(DOMAIN, name, rrsets).name == name


def test_list_hosts_skips_malformed() -> None:
    browse = "_autotunnel._udp.home.example.net."
    rrsets = [
        _rrset(
            browse,
            "PTR",
            "_autotunnel._udp.laptop.home.example.net.",
            "_autotunnel._udp.LAPTOP.home.example.net.",  # the same device (RFC 4343)
            "_autotunnel._udp.nas.other.example.",  # outside the domain
            "_autotunnel._udp.a.b.home.example.net.",  # not one label
            "laptop.home.example.net.",  # not the service name
            "_autotunnel._tcp.x.home.example.net.",  # wrong protocol
            "_autotunnel._udp.bad_name.home.example.net.",  # not LDH
            "_autotunnel._udp.autotunnel-x.home.example.net.",  # reserved
            "_AutoTunnel._UDP.desk.home.example.net.",  # case does not matter
        ),
        _rrset("_other._udp.home.example.net.", "PTR", "_autotunnel._udp.evil.home.example.net."),
    ]
    assert list_hosts(DOMAIN, rrsets) == ["desk", "laptop"]
    with pytest.raises(ParseError):
        host_from_browse_target(DOMAIN, dns.name.from_text("_autotunnel._udp.a.b.home.example.net."))
    assert browse_name(DOMAIN) == dns.name.from_text(browse)


# --------------------------------------------------------------------------------------------------------
# Property: every valid host round-trips
# --------------------------------------------------------------------------------------------------------

_LDH = string.ascii_letters + string.digits
_labels = st.text(_LDH + "-", min_size=0, max_size=20).flatmap(
    lambda middle: st.tuples(st.sampled_from(_LDH), st.sampled_from(_LDH)).map(
        lambda ends: (ends[0] + middle + ends[1]) if middle else ends[0]
    )
)
_names = _labels.filter(lambda n: not n.lower().startswith("autotunnel-"))
_domains = (
    st.lists(_labels, min_size=1, max_size=4)
    .map(".".join)
    .flatmap(lambda d: st.sampled_from([d, d + ".", d.upper()]))
)
_addresses: st.SearchStrategy[IPAddress] = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))


@st.composite
def _hosts(draw: st.DrawFn) -> HostRecords:
    domain = draw(_domains)
    key = draw(st.binary(min_size=32, max_size=32))
    return HostRecords.derive(
        name=draw(_names),
        domain=domain,
        public_key=key,
        port=draw(st.integers(1, 65535)),
        addresses=draw(st.lists(_addresses, min_size=1, max_size=4)),
    )


@settings(max_examples=200, deadline=None)
@given(host=_hosts(), ttl=st.integers(0, 2**31 - 1))
def test_property_round_trip(host: HostRecords, ttl: int) -> None:
    rrsets = build(host, ttl)
    assert parse(host.domain, host.name, rrsets) == host
    assert parse(host.domain.upper() + ".", host.name.swapcase(), _via_wire(rrsets)) == dataclasses.replace(
        host, name=host.name.swapcase()
    )
    assert list_hosts(host.domain, rrsets) == [host.name]
