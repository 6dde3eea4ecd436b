"""The device TXT's NAT keys (docs/protocol.md "DNS records"): ``nat=ei|pd`` and ``relay=IP:PORT``, built and
parsed strictly; the rest of v=1 unchanged."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_records import DOMAIN, PK_B64, SERVICE, TTL, _host, _replace, _via_wire
from tunneld.proto.errors import ParseError
from tunneld.proto.records import MAX_RELAY_TEXT, HostRecords, build, format_relay, parse, parse_relay


def test_nat_and_relay_are_published_after_v_and_pk_and_parsed_back() -> None:
    host = _host(nat="ei", relay=("203.0.113.9", 49160))
    [txt] = [r for r in build(host, TTL) if r.rdtype == 16]
    assert txt.to_text().endswith(f'TXT "v=1" "pk={PK_B64}" "nat=ei" "relay=203.0.113.9:49160"')
    assert parse(DOMAIN, "laptop", build(host, TTL)) == host
    assert parse(DOMAIN, "laptop", _via_wire(build(host, TTL))) == host
    v6 = _host(nat="pd", relay=("2001:db8:0::9", 3478))
    assert v6.relay == ("2001:db8::9", 3478)  # canonical text
    assert format_relay(v6.relay) == "[2001:db8::9]:3478"
    assert parse(DOMAIN, "laptop", build(v6, TTL)) == v6


def test_without_the_keys_nothing_changes() -> None:
    host = _host()
    assert (host.nat, host.relay) == (None, None)
    assert host.txt_strings() == (b"v=1", b"pk=" + PK_B64.encode())


@pytest.mark.parametrize("txt,value", [
    (f'"v=1" "pk={PK_B64}" "NAT=ei"', ("ei", None)),  # keys are case-insensitive (RFC 6763 §6.4)
    (f'"v=1" "pk={PK_B64}" "relay=192.0.2.1:1"', (None, ("192.0.2.1", 1))),
    (f'"v=1" "pk={PK_B64}" "nat=pd" "relay=[2001:db8::1]:65535"', ("pd", ("2001:db8::1", 65535))),
])
def test_good_nat_keys(txt: str, value: tuple[object, object]) -> None:
    host = parse(DOMAIN, "laptop", _replace(build(_host(), TTL), SERVICE, "TXT", txt))
    assert (host.nat, host.relay) == value


BAD = {
    "nat unknown": '"nat=full-cone"',
    "nat upper case value": '"nat=EI"',
    "nat empty": '"nat="',
    "nat boolean": '"nat"',
    "nat twice": '"nat=ei" "nat=pd"',
    "relay no port": '"relay=192.0.2.1"',
    "relay port 0": '"relay=192.0.2.1:0"',
    "relay port too big": '"relay=192.0.2.1:65536"',
    "relay leading zero": '"relay=192.0.2.1:0443"',
    "relay sign": '"relay=192.0.2.1:+443"',
    "relay name": '"relay=turn.example.net:3478"',
    "relay v6 without brackets": '"relay=2001:db8::1:3478"',
    "relay v6 not canonical": '"relay=[2001:DB8::1]:3478"',
    "relay v4 zero-padded": '"relay=192.0.2.01:3478"',
    "relay empty": '"relay="',
    "relay v6 scope": '"relay=[fe80::1%eth0]:3478"',
    "relay too long": '"relay=' + "1" * (MAX_RELAY_TEXT + 1) + '"',
    "relay twice": '"relay=192.0.2.1:1" "relay=192.0.2.1:1"',
    "relay not ascii": '"relay=192.0.2.1:\\229"',
}


@pytest.mark.parametrize("extra", BAD.values(), ids=BAD.keys())
def test_bad_nat_keys_refuse_the_host(extra: str) -> None:
    rrsets = _replace(build(_host(), TTL), SERVICE, "TXT", f'"v=1" "pk={PK_B64}" {extra}')
    with pytest.raises(ParseError, match=r"^txt (bad|duplicate) "):
        parse(DOMAIN, "laptop", rrsets)


@pytest.mark.parametrize("changes", [{"nat": "full"}, {"relay": ("not an address", 1)},
                                     {"relay": ("192.0.2.1", 0)}, {"relay": ("192.0.2.1", True)}])
def test_bad_nat_fields_are_a_value_error(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _host(**changes)


# Near misses: an address (bracketed or not), a colon, a port text that may be out of range or padded.
_NEAR_RELAY = st.builds(
    lambda a, br, port, pad: (f"[{a}]" if br else str(a)) + ":" + pad + str(port),
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), st.booleans(), st.integers(-1, 70000),
    st.sampled_from(["", "0", "+", " "]),
).map(str.encode)


@settings(max_examples=1_000, deadline=None)
@given(st.one_of(st.binary(max_size=60), _NEAR_RELAY))
def test_parse_relay_raises_only_parse_error_and_round_trips(value: bytes) -> None:
    try:
        relay = parse_relay(value)
    except ParseError:
        return
    assert format_relay(relay).encode() == value


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), st.integers(1, 65535),
       st.sampled_from([None, "ei", "pd"]))
def test_relay_round_trip(address: object, port: int, nat: str | None) -> None:
    host = dataclasses.replace(_host(), relay=(str(address), port), nat=nat)
    assert isinstance(host, HostRecords)
    assert parse_relay(format_relay((str(address), port)).encode()) == host.relay
    assert parse(DOMAIN, "laptop", build(host, TTL)) == host


def test_host_records_publishes_the_nat_keys_and_the_watcher_event_carries_them() -> None:
    from tunneld.proto.records import parse as parse_records
    from tunneld.proto.watcher import PeerLearned
    from tunneld.services.publisher import host_records

    key = bytes(range(2, 34))
    rrsets = host_records("desk", "home.example.net", key, "198.51.100.4:40001", nat="ei",
                          relay=("203.0.113.9", 49152))
    learned = PeerLearned(parse_records("home.example.net", "desk", rrsets))
    relay = ("203.0.113.9", 49152)
    assert (learned.endpoint, learned.nat, learned.relay) == (("198.51.100.4", 40001), "ei", relay)
    alone = PeerLearned(parse_records("home.example.net", "desk", host_records(
        "desk", "home.example.net", key, None, relay=("203.0.113.9", 49152))))
    assert (alone.endpoint, alone.nat, alone.relay) == (None, None, ("203.0.113.9", 49152))
    plain_rrsets = host_records("desk", "home.example.net", key, "198.51.100.4:4500")
    plain = PeerLearned(parse_records("home.example.net", "desk", plain_rrsets))
    assert (plain.nat, plain.relay) == (None, None)
