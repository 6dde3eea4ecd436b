"""A device's DNS records: what the publisher writes and what the watcher accepts.

Sans-I/O and pure: :func:`build` turns a :class:`HostRecords` into dnspython RRsets for the publisher to put
in an RFC 2136 UPDATE, and :func:`parse` turns whatever RRsets the watcher has learned (from LLQ events, plain
queries or a response's answer section) back into a :class:`HostRecords`, or raises
:class:`~tunneld.proto.errors.ParseError`. The layout follows Back to My Mac's; docs/protocol.md
("DNS records") specifies it, with the rules :func:`parse` applies and a worked example.

Per device ``NAME`` of the account ``DOMAIN``::

    NAME.DOMAIN                      AAAA  <ULA>
    _autotunnel._udp.NAME.DOMAIN     SRV   0 0 <public UDP port> AutoTunnel-<IID>.DOMAIN
    _autotunnel._udp.NAME.DOMAIN     TXT   "v=1" "pk=<base64 public key>" ["nat=ei|pd"] ["relay=IP:PORT"]
    AutoTunnel-<IID>.DOMAIN          A     <public IPv4>      (and/or)
    AutoTunnel-<IID>.DOMAIN          AAAA  <public IPv6>
    _autotunnel._udp.DOMAIN          PTR   _autotunnel._udp.NAME.DOMAIN      (ours: discovery, optional)

Every ParseError message is ``<fixed reason>: <detail>``; the part before the first colon is a stable
counter name, the detail names the records involved (names and addresses, never key material beyond the
public key, which is public).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import ipaddress
import re
from collections.abc import Iterable
from typing import Final

import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.PTR
import dns.rdtypes.ANY.TXT
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.rdtypes.IN.SRV
import dns.rrset

from tunneld.crypto.kdf import normalize_domain
from tunneld.identity import IID_LABEL_PREFIX, iid_label, ula_for
from tunneld.proto.errors import ParseError

__all__ = [
    "MAX_RELAY_TEXT",
    "MAX_TTL",
    "NAT_KINDS",
    "PUBLIC_KEY_LEN",
    "SERVICE_LABELS",
    "SUPPORTED_VERSION",
    "HostRecords",
    "IPAddress",
    "browse_name",
    "build",
    "check_name",
    "format_relay",
    "host_from_browse_target",
    "host_name",
    "list_hosts",
    "names_to_browse",
    "names_to_watch",
    "parse",
    "parse_relay",
    "service_name",
    "target_name",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

SUPPORTED_VERSION: Final = 1
"""The record version this module writes by default and the only one :func:`parse` accepts (``v=1``)."""
PUBLIC_KEY_LEN: Final = 32
"""An X25519 public key, published raw in base64 as ``pk=``."""
SERVICE_LABELS: Final = (b"_autotunnel", b"_udp")
"""The service labels of the SRV/TXT owner and of the browse PTR owner (BTMM's ``_autotunnel._udp``)."""
MAX_TTL: Final = 2**31 - 1
"""RFC 2181 §8: a TTL is an unsigned 32-bit number whose top bit must be zero."""
NAT_KINDS: Final = ("ei", "pd")
"""The ``nat=`` TXT values: the published endpoint is a STUN-observed binding of an endpoint-independent NAT
(``ei``: punch it), or of a NAT that maps per destination (``pd``: only its address means something, for a
relay's permissions). Absent: a mapped or public endpoint."""
MAX_RELAY_TEXT: Final = 47
"""The longest ``relay=`` value: ``[`` IPv6 (at most 39) ``]:`` port (at most 5)."""

_IN: Final = dns.rdataclass.IN
_A: Final = dns.rdatatype.A
_AAAA: Final = dns.rdatatype.AAAA
_SRV: Final = dns.rdatatype.SRV
_TXT: Final = dns.rdatatype.TXT
_PTR: Final = dns.rdatatype.PTR

# RFC 1035 §2.3.1 as relaxed by RFC 1123 §2.1 (a label may start with a digit): letters, digits and hyphens,
# not beginning or ending with a hyphen, 1 to 63 characters.
_LDH_LABEL: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_RESERVED_PREFIX: Final = IID_LABEL_PREFIX.lower()


def check_name(name: str) -> str:
    """Return ``name`` if it can be a device's name: one LDH label of 1..63 characters; else ValueError.

    One label, because the device is addressed as ``NAME.DOMAIN`` and the service records sit one level
    below it; LDH, because the name is typed by users into ssh and URLs. Names beginning ``AutoTunnel-`` (any
    case) are reserved: ``NAME.DOMAIN AAAA`` would merge with some device's outer-address RRset.
    """
    if not isinstance(name, str) or _LDH_LABEL.fullmatch(name) is None:
        raise ValueError(
            f"device name {name!r} is not one DNS label: use 1 to 63 letters, digits and hyphens, "
            f"not beginning or ending with a hyphen"
        )
    if name.lower().startswith(_RESERVED_PREFIX):
        raise ValueError(f"device name {name!r} begins with the reserved prefix {IID_LABEL_PREFIX!r}")
    return name


def _domain_labels(domain: str) -> tuple[bytes, ...]:
    # Build names from labels, never with dns.name.from_text: a backslash or "@" in a configured domain must
    # not be interpreted as a zone-file escape. normalize_domain lower-cases and checks label lengths.
    return tuple(label.encode("ascii") for label in normalize_domain(domain).split("."))


def _name(*labels: bytes) -> dns.name.Name:
    try:
        return dns.name.Name((*labels, b""))
    except dns.exception.DNSException as e:  # NameTooLong, LabelTooLong, EmptyLabel
        raise ValueError(f"DNS name would be invalid: {e}") from None


def host_name(domain: str, name: str) -> dns.name.Name:
    """``NAME.DOMAIN``: the owner of the device's ULA (AAAA)."""
    return _name(check_name(name).encode("ascii"), *_domain_labels(domain))


def service_name(domain: str, name: str) -> dns.name.Name:
    """``_autotunnel._udp.NAME.DOMAIN``: the owner of the device's SRV and TXT."""
    return _name(*SERVICE_LABELS, check_name(name).encode("ascii"), *_domain_labels(domain))


def target_name(domain: str, public_key: bytes) -> dns.name.Name:
    """``AutoTunnel-<IID>.DOMAIN``: the SRV target, owner of the outer A/AAAA; derived from the key."""
    return _name(iid_label(public_key).encode("ascii"), *_domain_labels(domain))


def browse_name(domain: str) -> dns.name.Name:
    """``_autotunnel._udp.DOMAIN``: the owner of the browse PTRs, one per device (our discovery addition)."""
    return _name(*SERVICE_LABELS, *_domain_labels(domain))


def _sort_key(address: IPAddress) -> tuple[int, int]:
    return (address.version, int(address))


@dataclasses.dataclass(frozen=True)
class HostRecords:
    """Everything a peer needs to know about one device, as published in DNS.

    Construction canonicalizes and validates (ValueError), so a HostRecords is always publishable and two
    equal record sets compare equal: ``domain`` is normalized (lower case, no trailing dot), ``addresses``
    are de-duplicated and sorted (IPv4 first), and ``ula`` must be the one ``public_key`` gives in ``domain``,
    because peers refuse anything else. :meth:`derive` computes ``ula`` for you.
    """

    name: str
    """The device's DNS label (one LDH label, see :func:`check_name`); case is kept as given."""
    domain: str
    """The account domain, normalized by :func:`tunneld.crypto.kdf.normalize_domain`."""
    public_key: bytes
    """The device's raw 32-byte X25519 static public key."""
    ula: ipaddress.IPv6Address
    """The device's inner address, ``ula_for(domain, public_key)``."""
    port: int | None
    """The public (NAT-mapped) UDP port of the device's outer socket, 1..65535; None when the device has
    no endpoint to publish (behind a NAT that maps nothing): it is then a member by its identity alone."""
    addresses: tuple[IPAddress, ...]
    """The public outer addresses, IPv4 and/or IPv6; at least one with a port, none without."""
    version: int = SUPPORTED_VERSION
    """The ``v=`` TXT key. Only 1 is parsed; other values exist so tests can build what peers must refuse."""
    nat: str | None = None
    """The ``nat=`` TXT key (:data:`NAT_KINDS`), or None: how the published endpoint came about."""
    relay: tuple[str, int] | None = None
    """The ``relay=`` TXT key: the device's TURN relayed address (canonical address text, port), or None."""

    def __post_init__(self) -> None:
        check_name(self.name)
        object.__setattr__(self, "domain", normalize_domain(self.domain))
        if not isinstance(self.public_key, bytes) or len(self.public_key) != PUBLIC_KEY_LEN:
            raise ValueError(f"public_key must be {PUBLIC_KEY_LEN} bytes")
        if self.port is not None and (not isinstance(self.port, int) or not 1 <= self.port <= 0xFFFF):
            raise ValueError(f"port must be 1..65535 or None, got {self.port!r}")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 0:
            raise ValueError(f"version must be a non-negative integer, got {self.version!r}")
        addresses = tuple(self.addresses)
        for address in addresses:
            if not isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
                raise ValueError(f"outer address {address!r} is not an IPv4Address or IPv6Address")
        if not addresses and self.port is not None:
            raise ValueError("a host with a port needs at least one outer address (IPv4 or IPv6)")
        if addresses and self.port is None:
            raise ValueError("outer addresses need a port")
        object.__setattr__(self, "addresses", tuple(sorted(set(addresses), key=_sort_key)))
        if self.nat is not None and self.nat not in NAT_KINDS:
            raise ValueError(f"nat must be one of {NAT_KINDS} or None, got {self.nat!r}")
        if self.relay is not None:
            object.__setattr__(self, "relay", _check_relay(self.relay))
        expected = ula_for(self.domain, self.public_key)
        if self.ula != expected:
            raise ValueError(f"ula {self.ula} is not the one the key gives in {self.domain}: {expected}")
        # Every name must fit in 255 octets; fail here rather than in the publisher.
        service_name(self.domain, self.name)

    @classmethod
    def derive(
        cls,
        name: str,
        domain: str,
        public_key: bytes,
        port: int | None = None,
        addresses: Iterable[IPAddress] = (),
        nat: str | None = None,
        relay: tuple[str, int] | None = None,
    ) -> HostRecords:
        """The records of the device with ``public_key``, its ULA computed from the key."""
        return cls(
            name=name,
            domain=domain,
            public_key=public_key,
            ula=ula_for(domain, public_key),
            port=port,
            addresses=tuple(addresses),
            nat=nat,
            relay=relay,
        )

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        """The published outer (address, port) pairs, IPv4 first; empty for an identity alone."""
        port = self.port
        return [] if port is None else [(str(address), port) for address in self.addresses]

    @property
    def public_key_b64(self) -> str:
        """The ``pk=`` value: standard base64 with padding (RFC 4648 §4), 44 characters."""
        return base64.b64encode(self.public_key).decode("ascii")

    def txt_strings(self) -> tuple[bytes, ...]:
        """The TXT record's strings, in order: ``v``, ``pk``, then ``nat`` and ``relay`` when set."""
        strings = [f"v={self.version}".encode("ascii"), f"pk={self.public_key_b64}".encode("ascii")]
        if self.nat is not None:
            strings.append(f"nat={self.nat}".encode("ascii"))
        if self.relay is not None:
            strings.append(b"relay=" + format_relay(self.relay).encode("ascii"))
        return tuple(strings)


def _check_relay(relay: tuple[str, int]) -> tuple[str, int]:
    """(canonical address text, port) of a relayed address; ValueError if it is not one."""
    host, port = relay
    address = ipaddress.ip_address(host)  # ValueError
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise ValueError(f"relay address {host!r} has a scope: it means nothing to a peer")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 0xFFFF:
        raise ValueError(f"relay port must be 1..65535, got {port!r}")
    return str(address), port


def format_relay(relay: tuple[str, int]) -> str:
    """``IP:PORT``, IPv6 in brackets (``[2001:db8::1]:3478``), as the ``relay=`` TXT value."""
    host, port = _check_relay(relay)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_relay(value: bytes) -> tuple[str, int]:
    """The ``relay=`` TXT value back to (address, port); ParseError on anything but the one canonical
    spelling :func:`format_relay` writes (bounded first: at most :data:`MAX_RELAY_TEXT` bytes)."""
    if len(value) > MAX_RELAY_TEXT:
        raise ParseError(f"txt bad relay: {len(value)} bytes")
    try:
        text = value.decode("ascii")
        host, sep, port_text = text.rpartition(":")
        if not sep or not port_text.isdigit() or not port_text.isascii() or len(port_text) > 5:
            raise ValueError(text)
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        relay = _check_relay((host, int(port_text)))
    except (UnicodeDecodeError, ValueError):
        raise ParseError(f"txt bad relay: {_show(value)}") from None
    if format_relay(relay).encode("ascii") != value:
        raise ParseError(f"txt bad relay: not canonical {_show(value)}")  # one relay, one spelling
    return relay


# --------------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------------

# dnspython's A, AAAA, SRV and PTR constructors are not annotated (2.9); these wrappers confine the ignores.


def _rd_a(address: ipaddress.IPv4Address) -> dns.rdata.Rdata:
    return dns.rdtypes.IN.A.A(_IN, _A, str(address))  # type: ignore[no-untyped-call]


def _rd_aaaa(address: ipaddress.IPv6Address) -> dns.rdata.Rdata:
    return dns.rdtypes.IN.AAAA.AAAA(_IN, _AAAA, str(address))  # type: ignore[no-untyped-call]


def _rd_srv(port: int, target: dns.name.Name) -> dns.rdata.Rdata:
    # Priority and weight 0: there is exactly one target, so they carry nothing (RFC 2782).
    return dns.rdtypes.IN.SRV.SRV(_IN, _SRV, 0, 0, port, target)  # type: ignore[no-untyped-call]


def _rd_ptr(target: dns.name.Name) -> dns.rdata.Rdata:
    return dns.rdtypes.ANY.PTR.PTR(_IN, _PTR, target)  # type: ignore[no-untyped-call]


def build(host: HostRecords, ttl: int) -> list[dns.rrset.RRset]:
    """The device's RRsets, in a fixed order: AAAA, SRV, TXT, target A, target AAAA, browse PTR (without
    an endpoint, no SRV and no target addresses: the identity alone).

    Names are absolute; the domain is lower case (normalized), the device's label keeps its case and the
    target label is ``AutoTunnel-`` + lower-case hex. The target's A and AAAA RRsets are present only when
    the host has an address of that family. The browse PTR is the one RRset shared with other devices: a
    publisher must add and delete its single record (RFC 2136 class NONE), never replace the whole RRset,
    or it removes every other device from discovery. All other RRsets belong to this device alone.
    Raises ValueError for a TTL outside 0..2^31-1 (names were validated when ``host`` was made).
    """
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 <= ttl <= MAX_TTL:
        raise ValueError(f"ttl must be 0..{MAX_TTL}, got {ttl!r}")
    owner = host_name(host.domain, host.name)
    service = service_name(host.domain, host.name)
    target = target_name(host.domain, host.public_key)

    rrsets = [dns.rrset.from_rdata(owner, ttl, _rd_aaaa(host.ula))]
    if host.port is not None:
        rrsets.append(dns.rrset.from_rdata(service, ttl, _rd_srv(host.port, target)))
    rrsets += [
        dns.rrset.from_rdata(
            service,
            ttl,
            dns.rdtypes.ANY.TXT.TXT(_IN, _TXT, host.txt_strings()),
        ),
    ]
    v4 = [_rd_a(a) for a in host.addresses if isinstance(a, ipaddress.IPv4Address)]
    v6 = [_rd_aaaa(a) for a in host.addresses if isinstance(a, ipaddress.IPv6Address)]
    if v4:
        rrsets.append(dns.rrset.from_rdata_list(target, ttl, v4))
    if v6:
        rrsets.append(dns.rrset.from_rdata_list(target, ttl, v6))
    rrsets.append(dns.rrset.from_rdata(browse_name(host.domain), ttl, _rd_ptr(service)))
    return rrsets


# --------------------------------------------------------------------------------------------------------
# Watching and parsing
# --------------------------------------------------------------------------------------------------------


def names_to_watch(
    domain: str, name: str, public_key: bytes | None = None
) -> list[tuple[dns.name.Name, dns.rdatatype.RdataType]]:
    """The (qname, rdtype) pairs a watcher must follow to learn the device ``name`` completely.

    Without ``public_key`` these are the AAAA, SRV and TXT, whose names follow from the device's name. The
    outer addresses live under a name derived from the key, which the watcher learns from the TXT; with
    ``public_key`` the target's A and AAAA are included as well. (The SRV names the same target, but the
    watcher should derive it from the key: a forged SRV cannot then make it watch other names.)
    """
    service = service_name(domain, name)
    pairs = [(host_name(domain, name), _AAAA), (service, _SRV), (service, _TXT)]
    if public_key is not None:
        target = target_name(domain, public_key)
        pairs += [(target, _A), (target, _AAAA)]
    return pairs


def names_to_browse(domain: str) -> list[tuple[dns.name.Name, dns.rdatatype.RdataType]]:
    """The (qname, rdtype) pair a watcher follows to learn which devices the account has: the browse PTR."""
    return [(browse_name(domain), _PTR)]


def host_from_browse_target(domain: str, target: dns.name.Name) -> str:
    """The device name in a browse PTR's target ``_autotunnel._udp.NAME.DOMAIN``; ParseError otherwise."""
    suffix = _name(*_domain_labels(domain))
    if not target.is_subdomain(suffix):
        raise ParseError(f"browse target outside domain: {target}")
    relative = target.relativize(suffix).labels
    if len(relative) != 3 or tuple(label.lower() for label in relative[:2]) != SERVICE_LABELS:
        raise ParseError(f"browse target malformed: {target}")
    try:
        return check_name(relative[2].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ParseError(f"browse target malformed: {target}") from None


def list_hosts(domain: str, rrsets: Iterable[dns.rrset.RRset]) -> list[str]:
    """The names of the account's devices, from the browse PTRs among ``rrsets``, sorted, without repeats.

    A malformed PTR target is skipped, not raised: one bad record (a buggy or hostile device; they share the
    TSIG key) must not hide every other device. Names that differ only in case are one device (RFC 4343);
    the first spelling seen is kept. Use :func:`host_from_browse_target` to count or log the bad ones.
    """
    owner = browse_name(domain)
    seen: dict[str, str] = {}
    for rrset in rrsets:
        if rrset.rdclass != _IN or rrset.rdtype != _PTR or rrset.name != owner:
            continue
        for rdata in rrset:
            assert isinstance(rdata, dns.rdtypes.ANY.PTR.PTR)
            try:
                name = host_from_browse_target(domain, rdata.target)
            except ParseError:
                continue
            seen.setdefault(name.lower(), name)
    return sorted(seen.values(), key=str.lower)


def _collect(
    rrsets: Iterable[dns.rrset.RRset],
) -> dict[tuple[dns.name.Name, dns.rdatatype.RdataType], list[dns.rdata.Rdata]]:
    # Merge RRsets by (owner, type): the caller may hand us the same RRset in pieces (LLQ events, several
    # responses). Name equality and hashing in dnspython ignore ASCII case (RFC 4343). Exact duplicates are
    # one record, as in DNS (a dict keeps the order and keeps a large hostile response linear).
    merged: dict[tuple[dns.name.Name, dns.rdatatype.RdataType], dict[dns.rdata.Rdata, None]] = {}
    for rrset in rrsets:
        if rrset.rdclass != _IN:
            continue
        rdatas = merged.setdefault((rrset.name, rrset.rdtype), {})
        for rdata in rrset:
            rdatas[rdata] = None
    return {key: list(rdatas) for key, rdatas in merged.items()}


def _show(value: bytes) -> str:
    # TXT strings are up to 255 arbitrary bytes from the network: quote a short, printable prefix only.
    return repr(value[:16].decode("ascii", "replace")) + ("..." if len(value) > 16 else "")


def _parse_txt(rdata: dns.rdtypes.ANY.TXT.TXT) -> tuple[int, bytes, str | None, tuple[str, int] | None]:
    """(version, public key, nat, relay) from the TXT strings, per RFC 6763 §6."""
    keys: dict[bytes, bytes] = {}
    for string in rdata.strings:
        if not string or string.startswith(b"="):
            continue  # §6.1: an empty string means "no keys"; §6.4: a string without a key is ignored
        key, sep, value = string.partition(b"=")
        key = key.lower()  # §6.4: keys are case-insensitive
        if key in keys:
            raise ParseError(f"txt duplicate key: {_show(key)}")
        keys[key] = value if sep else b""
    if b"v" not in keys:
        raise ParseError("txt missing v: no v= key")
    if keys[b"v"] != str(SUPPORTED_VERSION).encode("ascii"):
        raise ParseError(f"txt unsupported version: v={_show(keys[b'v'])}")
    if b"pk" not in keys:
        raise ParseError("txt missing pk: no pk= key")
    encoded = keys[b"pk"]
    try:
        public_key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ParseError("txt bad pk: not base64") from None
    if len(public_key) != PUBLIC_KEY_LEN:
        raise ParseError(f"txt bad pk: {len(public_key)} bytes, expected {PUBLIC_KEY_LEN}")
    if base64.b64encode(public_key) != encoded:
        # One key, one spelling: non-zero padding bits would let two TXT strings carry the same key.
        raise ParseError("txt bad pk: not canonical base64")
    nat: str | None = None
    if b"nat" in keys:
        if keys[b"nat"] not in (b"ei", b"pd"):
            raise ParseError(f"txt bad nat: {_show(keys[b'nat'])}")
        nat = keys[b"nat"].decode("ascii")
    relay = parse_relay(keys[b"relay"]) if b"relay" in keys else None
    return SUPPORTED_VERSION, public_key, nat, relay


def _one(
    records: dict[tuple[dns.name.Name, dns.rdatatype.RdataType], list[dns.rdata.Rdata]],
    owner: dns.name.Name,
    rdtype: dns.rdatatype.RdataType,
) -> dns.rdata.Rdata:
    found = records.get((owner, rdtype), [])
    what = dns.rdatatype.to_text(rdtype).lower()
    if not found:
        raise ParseError(f"missing {what}: no {dns.rdatatype.to_text(rdtype)} at {owner}")
    if len(found) > 1:
        raise ParseError(f"ambiguous {what}: {len(found)} {dns.rdatatype.to_text(rdtype)} records at {owner}")
    return found[0]


def parse(domain: str, name: str, rrsets: Iterable[dns.rrset.RRset]) -> HostRecords:
    """The device ``name``'s records among ``rrsets``, checked complete and consistent; else ParseError.

    ``rrsets`` may hold anything else too (other devices, the browse PTR, other types): only the records of
    this device are read, class IN only, merged across RRsets of the same owner and type. Checks, in order:
    exactly one TXT with ``v=1`` and a ``pk`` of 32 bytes in canonical base64, no key twice; exactly one AAAA
    at ``NAME.DOMAIN``, equal to the ULA the key gives. The endpoint is optional (a device behind a NAT that
    maps nothing publishes its identity alone): if there is an SRV, exactly one, its target ``AutoTunnel-<IID
    of pk>.DOMAIN`` and its port 1..65535 (priority and weight ignored); with no A or AAAA at the target yet,
    the host has no endpoint.
    ``domain`` and ``name`` come from our own config or :func:`list_hosts`, so a bad one is a ValueError.
    """
    owner = host_name(domain, name)
    service = service_name(domain, name)
    records = _collect(rrsets)

    txt = _one(records, service, _TXT)
    assert isinstance(txt, dns.rdtypes.ANY.TXT.TXT)
    version, public_key, nat, relay = _parse_txt(txt)

    aaaa = _one(records, owner, _AAAA)
    assert isinstance(aaaa, dns.rdtypes.IN.AAAA.AAAA)
    claimed = ipaddress.IPv6Address(aaaa.address)
    expected = ula_for(domain, public_key)
    if claimed != expected:
        raise ParseError(f"ula mismatch: {owner} claims {claimed}, its public key gives {expected}")

    port: int | None = None
    addresses: list[IPAddress] = []
    if (service, _SRV) in records:
        srv = _one(records, service, _SRV)
        assert isinstance(srv, dns.rdtypes.IN.SRV.SRV)
        target = target_name(domain, public_key)
        if srv.target == dns.name.root:
            raise ParseError(f"srv no service: target of {service} is '.'")  # RFC 2782: not available
        if srv.target != target:
            raise ParseError(f"srv target mismatch: {service} points to {srv.target}, the key gives {target}")
        if not 1 <= srv.port <= 0xFFFF:
            raise ParseError(f"srv bad port: {srv.port} at {service}")
        for rdata in records.get((target, _A), []):
            assert isinstance(rdata, dns.rdtypes.IN.A.A)
            addresses.append(ipaddress.IPv4Address(rdata.address))
        for rdata in records.get((target, _AAAA), []):
            assert isinstance(rdata, dns.rdtypes.IN.AAAA.AAAA)
            addresses.append(ipaddress.IPv6Address(rdata.address))
        # A port without an address (records still arriving, or half withdrawn) is no endpoint yet.
        port = srv.port if addresses else None

    try:
        return HostRecords(
            name=name,
            domain=domain,
            public_key=public_key,
            ula=claimed,
            port=port,
            addresses=tuple(addresses),
            version=version,
            nat=nat,
            relay=relay,
        )
    except ValueError as e:  # every check above should have caught it; keep the one-exception promise
        raise ParseError(f"invalid host: {e}") from None
