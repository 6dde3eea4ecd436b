"""Fuzzing every DNS input of the daemon: the guard and walk, the rendezvous server's handle path, the LLQ
client, the watcher and the publisher.

Invariant: for any bytes up to 64 KB, :func:`dnsguard.parse` and :func:`dnswire.walk` return or raise
ParseError; whatever the guard accepts breaks none of dnspython's name rules; the server's handle path
never raises and answers a request it cannot parse with FORMERR (or not at all); a client core's
``receive`` never raises, and counts every message the guard refuses under the guard's reason.

Structured inputs find more than random bytes, so the examples are drawn from: valid messages (queries,
responses, UPDATEs, LLQ messages, signed or not, a few near 64 KB), their mutations (cuts, bit flips,
pointers written over names, counts, splices), pointer tricks (the pointer bomb in owners and RDATA,
chains, loops, pointers at random offsets), huge section counts, and random bytes; the server also gets
UPDATEs signed at the wall clock's time, which it applies. Examples are built from a seed with
``random.Random``, cheaply; the 10,000-example runs are marked slow.
"""

from __future__ import annotations

import contextlib
import logging
import random
import struct
import time
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.update
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunneld.dnsserver.core import DnsCore, account_key
from tunneld.dnsserver.llq import LLQServer
from tunneld.dnsserver.serve import _Server
from tunneld.dnsserver.store import ZoneStore
from tunneld.proto import dnsguard, dnswire
from tunneld.proto.dnsupdate import Publisher
from tunneld.proto.errors import ParseError
from tunneld.proto.llq import LLQClient
from tunneld.proto.llq_wire import LLQ_OP_EVENT, LLQ_OP_SETUP, LLQOption
from tunneld.proto.tsig import find_tsig, sign
from tunneld.proto.watcher import Watcher

DOMAIN = "example.com"
ZONE = dns.name.from_text(DOMAIN)
KEY = account_key(bytes(range(32)), DOMAIN)
T = 1_700_000_000
SERVER = ("192.0.2.53", 53)
CLIENT = ("192.0.2.7", 5353)

SLOW = settings(max_examples=10_000, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
QUICK = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- valid messages -----------------------------------------------------------------------------------------

_LABEL_CHARS = bytes(b"abcdefgh-_0123"[i % 14] for i in range(256))  # a translation table: any byte -> one


def _name(rnd: random.Random, names: list[dns.name.Name]) -> dns.name.Name:
    if names and rnd.random() < 0.6:
        return rnd.choice(names)  # repeats, so names compress
    depth = rnd.choice([0, 1, 1, 2, 3, 5, 12, 40, 120])
    labels = [rnd.randbytes(rnd.choice([1, 1, 2, 5, 12, 63])).translate(_LABEL_CHARS) for _ in range(depth)]
    try:
        name = dns.name.Name(labels + list(ZONE.labels))
    except dns.name.NameTooLong:
        name = ZONE
    names.append(name)
    return name


def _rdata(rnd: random.Random, names: list[dns.name.Name]) -> dns.rdata.Rdata:
    kind = rnd.randrange(10)
    n = lambda: _name(rnd, names).to_text()  # noqa: E731
    text = {
        0: ("A", f"192.0.2.{rnd.randrange(256)}"),
        1: ("AAAA", f"fd00::{rnd.randrange(65536):x}"),
        2: ("TXT", " ".join(f'"{"x" * rnd.choice([0, 3, 40, 255])}"' for _ in range(rnd.randrange(1, 4)))),
        3: ("SRV", f"{rnd.randrange(3)} {rnd.randrange(3)} {rnd.randrange(65536)} {n()}"),
        4: ("PTR", n()),
        5: ("SOA", f"{n()} {n()} 1 2 3 4 5"),
        6: ("MX", f"10 {n()}"),
        7: ("NS", n()),
        8: ("CNAME", n()),
        9: ("NAPTR", f'1 2 "u" "E2U+sip" "" {n()}'),
    }[kind]
    return dns.rdata.from_text("IN", *text)


def _fill(rnd: random.Random, msg: dns.message.Message, records: int, names: list[dns.name.Name]) -> None:
    sections = [msg.answer, msg.authority, msg.additional]
    for _ in range(records):
        rd, ttl = _rdata(rnd, names), rnd.choice([0, 60, 0xFFFFFFFF])
        rnd.choice(sections).append(dns.rrset.from_rdata(_name(rnd, names), ttl, rd))


def _wire(msg: dns.message.Message) -> bytes:
    """The message rendered, halving its sections until it fits (with room for a TSIG)."""
    while True:
        try:
            return msg.to_wire(max_size=dnsguard.MAX_MESSAGE - 200)
        except dns.exception.TooBig:
            for section in (msg.answer, msg.authority, msg.additional):
                del section[len(section) // 2:]


def _render(rnd: random.Random, msg: dns.message.Message, request_mac: bytes = b"") -> bytes:
    wire = _wire(msg)
    if rnd.random() < 0.3:
        wire, _ = sign(wire, KEY, T, request_mac)
    return wire


def _records(rnd: random.Random) -> int:
    """Mostly a few records, sometimes dozens, rarely thousands (then the guard's budget refuses them:
    their names are deep; :func:`big` makes the large messages it accepts)."""
    r = rnd.random()
    return rnd.randrange(4) if r < 0.85 else rnd.randrange(24) if r < 0.995 else rnd.randrange(600, 3000)


def big(rnd: random.Random) -> bytes:
    """An answer of 20 to 64 KB as a server sends them: A, AAAA, TXT, SRV and PTR records of a few
    hundred devices, within the guard's budget."""
    msg = dns.message.make_response(dns.message.make_query(ZONE, "ANY"))
    for i in range(rnd.randrange(150, 600)):
        host = dns.name.from_text(f"d{i}", ZONE)
        msg.answer.append(dns.rrset.from_text(host, 60, "IN", "AAAA", f"fd00::{i:x}"))
        msg.answer.append(dns.rrset.from_text(host, 60, "IN", "TXT", f'"v=1" "pk={"x" * 44}"'))
        if rnd.random() < 0.5:
            msg.answer.append(dns.rrset.from_text(ZONE, 60, "IN", "PTR", host.to_text()))
    return _wire(msg)


def valid(rnd: random.Random) -> bytes:
    names: list[dns.name.Name] = [ZONE]
    kind = rnd.randrange(4)
    if kind == 0:  # a query, maybe with EDNS options (an LLQ, an Update Lease, anything)
        qtype = rnd.choice(["A", "AAAA", "PTR", "SRV", "ANY", "TXT"])
        msg = dns.message.make_query(_name(rnd, names), qtype)
        if rnd.random() < 0.5:
            llq_op = rnd.choice([LLQ_OP_SETUP, LLQ_OP_EVENT, 2])
            options = [LLQOption(1, llq_op, 0, rnd.getrandbits(64), 3600),
                       dnswire.UpdateLeaseOption(rnd.randrange(1 << 32)),
                       dns.edns.GenericOption(rnd.randrange(65536), rnd.randbytes(rnd.randrange(20)))]
            payload = rnd.choice([512, 1232, 4096])
            msg.use_edns(0, payload=payload, options=rnd.sample(options, rnd.randrange(4)))
        _fill(rnd, msg, rnd.randrange(3) if rnd.random() < 0.1 else 0, names)
    elif kind == 1:  # a response
        msg = dns.message.make_response(dns.message.make_query(_name(rnd, names), "ANY"))
        _fill(rnd, msg, _records(rnd), names)
    elif kind == 2:  # an UPDATE: prerequisites, additions, deletions, a lease
        upd = dns.update.UpdateMessage(ZONE)
        for _ in range(_records(rnd)):
            op = rnd.randrange(4)
            if op == 0:
                upd.add(_name(rnd, names), 60, _rdata(rnd, names))
            elif op == 1:
                upd.delete(_name(rnd, names), _rdata(rnd, names))
            elif op == 2:
                upd.delete(_name(rnd, names), rnd.choice(["A", "TXT", "SRV"]))
            else:
                upd.present(_name(rnd, names))
        upd.use_edns(0, options=[dnswire.UpdateLeaseOption(rnd.choice([60, 1800, 7200]))])
        msg = upd
    else:  # an LLQ event or its ack
        msg = dns.message.make_query(_name(rnd, names), "PTR")
        msg.flags |= dns.flags.QR
        msg.use_edns(0, payload=1232, options=[LLQOption(1, LLQ_OP_EVENT, 0, rnd.getrandbits(64), 3600)])
        _fill(rnd, msg, _records(rnd), names)
    return _render(rnd, msg)


# -- mutations and tricks ----------------------------------------------------------------------------------


def mutate(rnd: random.Random, wire: bytes) -> bytes:
    data = bytearray(wire)
    for _ in range(rnd.randrange(1, 5)):
        op = rnd.randrange(7)
        if op == 0 and data:
            del data[rnd.randrange(len(data)):]  # cut
        elif op == 1 and data:
            data[rnd.randrange(len(data))] ^= 1 << rnd.randrange(8)  # a bit
        elif op == 2 and len(data) > 14:
            i = rnd.randrange(12, len(data) - 1)  # a pointer anywhere, to anywhere
            data[i:i + 2] = struct.pack("!H", 0xC000 | rnd.randrange(min(len(data), 0x3FFF)))
        elif op == 3 and len(data) >= 12:
            i = rnd.choice([4, 6, 8, 10])  # a count
            count = int.from_bytes(data[i:i + 2], "big")
            data[i:i + 2] = struct.pack("!H", rnd.choice([0, 1, 2, 255, 65535, min(count + 1, 65535)]))
        elif op == 4:
            data += rnd.randbytes(rnd.randrange(64))  # trailing junk
        elif op == 5 and len(data) > 20:
            a, b = sorted(rnd.sample(range(12, len(data)), 2))
            data[b:b] = data[a:b]  # a stretch repeated
        elif op == 6 and len(data) >= 4:
            data[2] = rnd.randrange(256)  # QR, opcode, flags
            data[3] = rnd.randrange(256)
    return bytes(data[:dnsguard.MAX_MESSAGE + 16])


_LONG = b"\x01a" * 126 + b"\x00"
_RDATA_FRAMES = [  # RDATA around a name: (type, before, after)
    (12, b"", b""), (2, b"", b""), (15, b"\x00\x01", b""), (33, bytes(6), b""), (6, b"\x00", bytes(20)),
    (35, b"\x00\x01\x00\x01\x01u\x00\x00", b""), (46, bytes(18), b""), (250, b"", bytes(16)),
]


def tricks(rnd: random.Random) -> bytes:
    size = rnd.choice([60, 300, 1400, 8000, 30000, 65535])
    flags = rnd.choice([0, 0x8000, 0x2800])
    kind = rnd.randrange(5)
    if kind == 0:  # the bomb: pointers to a long question name, as owners or in RDATA
        rtype, before, after = rnd.choice(_RDATA_FRAMES)
        if rnd.random() < 0.5:
            owner, rdata = b"\xc0\x0c", b"\x00\x00\x00\x01"
        else:
            owner, rdata = b"\x00", before + b"\xc0\x0c" + after
        one = owner + struct.pack("!HHIH", rtype, 1, 0, len(rdata)) + rdata
        n = max(0, (size - 12 - 257) // len(one))
        return struct.pack("!HHHHHH", 1, flags, 1, n, 0, 0) + _LONG + b"\x00\x01\x00\x01" + one * n
    if kind == 1:  # chains: each owner a label and a pointer to the one before
        body, previous, n = b"\x00\x00\x01\x00\x01", None, rnd.randrange(1, 40)
        for _ in range(n):
            offset = 12 + len(body)
            body += b"\x01a" + (b"\x00" if previous is None else struct.pack("!H", 0xC000 | previous))
            body += struct.pack("!HHIH", 1, 1, 0, 4) + bytes(4)
            previous = offset if rnd.random() < 0.95 else None
        return struct.pack("!HHHHHH", 2, flags, 1, n, 0, 0) + body
    if kind == 2:  # pointer soup: owners and RDATA names pointing at random offsets, some forwards
        body = b"\x03abc\x00\x00\x01\x00\x01"
        n = rnd.randrange(1, 200)
        for _ in range(n):
            ptr = struct.pack("!H", 0xC000 | rnd.randrange(12 + len(body) + 8))
            owner = ptr if rnd.random() < 0.7 else bytes([1, 97]) + ptr
            rdata = rnd.choice([ptr, bytes([1, 98]) + ptr, rnd.randbytes(4)])
            body += owner + struct.pack("!HHIH", rnd.choice([12, 2, 5, 1]), 1, 0, len(rdata)) + rdata
        return struct.pack("!HHHHHH", 3, flags, 1, n, 0, 0) + body
    if kind == 3:  # huge counts over a little body
        counts = [rnd.choice([0, 1, 2, 100, 5957, 65535]) for _ in range(4)]
        return struct.pack("!HHHHHH", 4, flags, *counts) + rnd.randbytes(rnd.randrange(size))
    n = (size - 12) // 11  # the most records that fit, each the cheapest possible
    body = b"".join(b"\x00" + struct.pack("!HHIH", rnd.randrange(1, 300), 1, 0, 0) for _ in range(n))
    return struct.pack("!HHHHHH", 5, flags, 0, n, 0, 0) + body


def random_bytes(rnd: random.Random) -> bytes:
    return rnd.randbytes(rnd.choice([0, 2, 11, 12, 13, 40, 300, 1400, 9000, 65535, 65536]))


_POOL = [valid(random.Random(i)) for i in range(300)]  # built once: dnspython's rendering is not cheap
_BIG = [big(random.Random(i)) for i in range(3)]


def message(rnd: random.Random) -> bytes:
    if rnd.random() < 0.002:  # one in 500: parsing 64 KB costs a hundred times more than the rest
        return rnd.choice(_BIG) if rnd.random() < 0.5 else mutate(rnd, rnd.choice(_BIG))
    kind = rnd.randrange(10)
    if kind < 2:
        return rnd.choice(_POOL)
    if kind < 6:
        return mutate(rnd, rnd.choice(_POOL))
    if kind == 6:  # a splice of two
        a, b = rnd.choice(_POOL), rnd.choice(_POOL)
        return (a[:rnd.randrange(len(a) + 1)] + b[rnd.randrange(len(b) + 1):])[:dnsguard.MAX_MESSAGE]
    if kind < 9:
        return tricks(rnd) if rnd.random() < 0.8 else mutate(rnd, tricks(rnd))
    return random_bytes(rnd)


seeds = st.integers(0, 2**64 - 1)
_NAME_ERRORS = (dns.name.BadPointer, dns.name.BadLabelType, dns.name.NameTooLong)


# -- the guard and walk ------------------------------------------------------------------------------------


def guard_property(wire: bytes) -> None:
    try:
        frames = dnswire.walk(wire)  # the guard's own pass
    except ParseError:
        with pytest.raises(ParseError):
            dnsguard.parse(wire)
        return
    assert len(wire) <= dnsguard.MAX_MESSAGE
    assert len(frames) == sum(int.from_bytes(wire[i:i + 2], "big") for i in (6, 8, 10))
    # dnspython once per message (it is most of the time here), as the LLQ side calls it; parse() maps
    # its other refusals (bad RDATA, OPT placement...) to ParseError, with dnspython's error as the cause.
    try:
        dnsguard.parse(wire, one_rr_per_rrset=True)
    except ParseError as e:
        if isinstance(e.__cause__, _NAME_ERRORS):
            raise AssertionError(f"the guard let through what dnspython refuses: {e.__cause__!r}") from e
    # The server's call differs only in the guard's query check (then the same dnspython parse).
    with contextlib.suppress(ParseError):
        dnsguard.check(wire, query=True)


@pytest.mark.quick_twin
@QUICK
@given(seed=seeds)
def test_guard_and_walk_raise_only_parse_error(seed: int) -> None:
    guard_property(message(random.Random(seed)))


@pytest.mark.slow
@SLOW
@given(seed=seeds)
def test_guard_and_walk_raise_only_parse_error_10k(seed: int) -> None:
    guard_property(message(random.Random(seed)))


@QUICK
@given(data=st.binary(max_size=2048))
def test_guard_on_hypothesis_bytes(data: bytes) -> None:
    guard_property(data)
    guard_property(bytes(12) + data)  # past an all-zero header


# -- the rendezvous server ---------------------------------------------------------------------------------


def _server(path: Path) -> _Server:
    store = ZoneStore(str(path / "zone.db"), DOMAIN + ".", "ns." + DOMAIN + ".", 53)
    core = DnsCore(store, [KEY])
    return _Server(core, LLQServer(core, rand=random.Random(0).randbytes))


def signed_update(rnd: random.Random) -> bytes:
    """An UPDATE signed with the account key at the wall clock's time, so that the server applies it."""
    names: list[dns.name.Name] = [ZONE]
    upd = dns.update.UpdateMessage(ZONE, id=rnd.getrandbits(16))
    for _ in range(rnd.randrange(1, 6)):
        name, rd = _name(rnd, names), _rdata(rnd, names)
        if rnd.random() < 0.7:
            upd.add(name, 60, rd)
        else:
            upd.delete(name, rd.rdtype)
    upd.use_edns(0, options=[dnswire.UpdateLeaseOption(1800)])
    wire, _ = sign(_wire(upd), KEY, int(time.time()))
    return wire


def server_property(server: _Server, wire: bytes, tcp: bool) -> None:
    refused = sum(server.core.parse_errors.values())
    reply, events = server.handle(wire, CLIENT, 65535 if tcp else None)  # UDP goes by the LLQ server first
    refused = sum(server.core.parse_errors.values()) - refused
    assert isinstance(events, list) and refused in (0, 1)
    if reply is None:
        return
    header = struct.unpack_from("!HHHHHH", reply)
    assert header[0] == int.from_bytes(wire[:2], "big") and header[1] & dns.flags.QR
    if refused:  # FORMERR from the header alone
        assert header[1] & 0xF == 1 and header[2:] == (0, 0, 0, 0)
    else:
        dns.message.from_wire(reply, keyring=False)  # what we answer parses


def _fuzz_server(tmp_path: Path, profile: settings) -> tuple[_Server, int]:
    """The server fed hypothesis' messages under `profile`; how many of them changed the zone."""
    server = _server(tmp_path)
    applied = [0]

    @profile
    @given(seed=seeds)
    def run(seed: int) -> None:
        rnd = random.Random(seed)
        wire = message(rnd) if rnd.random() < 0.9 else signed_update(rnd)
        server_property(server, wire if rnd.random() < 0.7 else mutate(rnd, wire), tcp=rnd.random() < 0.3)
        applied[0] += bool(server.core.last_changes)

    run()
    return server, applied[0]


@pytest.mark.quick_twin
def test_server_handles_any_message(tmp_path: Path) -> None:
    server, _ = _fuzz_server(tmp_path, QUICK)
    server.store.close()


@pytest.mark.slow
def test_server_handles_any_message_10k(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, logger="tunneld")  # not 10,000 kept records: the property is enough
    server, applied = _fuzz_server(tmp_path, SLOW)
    assert sum(server.core.parse_errors.values()) > 1000  # the guard refused many, each counted
    assert applied > 100  # and signed updates changed the zone
    server.store.close()


# -- the client cores ----------------------------------------------------------------------------------------


_REPLIES: dict[bytes, list[bytes]] = {}


def _reply_to(rnd: random.Random, request: bytes) -> bytes:
    """A response to one of a core's requests, often mutated (from 100 built once per request)."""
    pool = _REPLIES.get(request)
    if pool is None:
        pool = _REPLIES[request] = [_build_reply(random.Random(i), request) for i in range(100)]
    wire = rnd.choice(pool)
    return mutate(rnd, wire) if rnd.random() < 0.6 else wire


def _build_reply(rnd: random.Random, request: bytes) -> bytes:
    """A response to ``request``: its ID and question, signed over its MAC if it was signed, with
    random records, and an LLQ option as the request had."""
    req = dns.message.from_wire(request, keyring=False)
    resp = dns.message.make_response(req)
    resp.set_rcode(rnd.choice([0, 0, 0, 2, 5, 9]))
    names: list[dns.name.Name] = [ZONE, req.question[0].name] if req.question else [ZONE]
    _fill(rnd, resp, rnd.randrange(24) if rnd.random() < 0.15 else rnd.randrange(4), names)
    for option in req.options:
        if isinstance(option, LLQOption):
            resp.use_edns(0, payload=1232, options=[
                LLQOption(1, option.opcode, rnd.choice([0, 0, 1, 5]), rnd.getrandbits(64), 3600)])
    wire = _wire(resp)
    tsig = find_tsig(request)
    if tsig is not None and rnd.random() < 0.8:
        wire, _ = sign(wire, KEY, T, tsig.mac)
    return wire


class Clients:
    """A publisher, an LLQ client and a watcher with their first requests sent, fed the same inputs."""

    def __init__(self) -> None:
        rnd = random.Random(1)
        self.publisher = Publisher(ZONE, ZONE, KEY.secret, rand=rnd.randbytes, server=SERVER)
        self.publisher.publish([dns.rrset.from_text("h.example.com.", 60, "IN", "A", "192.0.2.1")], T)
        self.llq = LLQClient("q.example.com.", "PTR", server=SERVER, rand=rnd.randbytes)
        self.llq.start(T)
        self.watcher = Watcher(DOMAIN, "me", server=SERVER, rand=rnd.randbytes, key=KEY)
        self.watcher.start(T)
        self.requests = [t.payload for core in (self.publisher, self.llq, self.watcher)
                         for t in core.transmits()]

    def counters(self) -> list[dict[str, int]]:
        return [dict(self.publisher.counters), dict(self.llq.counters),
                dict(self.watcher.state["counters"])]


def clients_property(clients: Clients, rnd: random.Random) -> None:
    wire = _reply_to(rnd, rnd.choice(clients.requests)) if rnd.random() < 0.5 else message(rnd)
    try:
        dnsguard.check(wire)
        reason = None
    except ParseError as e:
        reason = f"parse error: {e}"
    before = clients.counters()
    clients.publisher.receive(wire, SERVER, T)
    clients.llq.receive(wire, SERVER, T)
    clients.watcher.receive(wire, SERVER, T)
    for core in (clients.publisher, clients.llq, clients.watcher):
        core.transmits()
        core.events()
    if reason is not None:  # each core counted it under the guard's reason
        after = clients.counters()
        for core_before, core_after in zip(before, after, strict=True):
            assert core_after.get(reason, 0) == core_before.get(reason, 0) + 1, reason


@QUICK
@given(seed=seeds)
def test_client_cores_count_what_they_drop(seed: int) -> None:
    clients_property(Clients(), random.Random(seed))


@pytest.mark.slow
def test_client_cores_count_what_they_drop_10k() -> None:
    clients = Clients()

    @SLOW
    @given(seed=seeds)
    def run(seed: int) -> None:
        clients_property(clients, random.Random(seed))

    run()
    refused = sum(v for k, v in clients.counters()[0].items() if k.startswith("parse error"))
    assert refused > 1000


def test_generators_reach_every_part_of_the_guard() -> None:
    """The example mix is not vacuous: it yields accepted messages and each of the guard's refusals."""
    reasons: dict[str, int] = {}
    accepted = 0
    for seed in range(3000):
        try:
            dnsguard.check(message(random.Random(seed)))
            accepted += 1
        except ParseError as e:
            reasons[str(e)] = reasons.get(str(e), 0) + 1
    assert accepted > 300
    assert all(dnsguard.check(wire) and len(wire) > 20000 for wire in _BIG)
    expected = {"truncated", "trailing data", "bad pointer", "too many pointers", "over the parse budget",
                "counts beyond the message", "question count", "bad label type", "oversized"}
    assert expected <= set(reasons), reasons

