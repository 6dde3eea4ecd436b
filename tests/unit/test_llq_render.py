"""The LLQ server's events rendered once per change (tunneld.dnsserver.llq_render): every watcher's event is
byte for byte the message rendered and signed for it alone, as the server did before (signed and unsigned
LLQs, two EDNS sizes with a diff split in parts, watchers that hold different answers); the message is
rendered once per distinct diff, not per watcher; acks are read from their frames (LLQServer.ack) with the
same outcome as the general path, and anything else is left to it."""

from __future__ import annotations

import math
import random
import struct
from unittest import mock

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.update

from tests.unit.dns_steps import ClientView, llq_client
from tunneld.dnsserver import llq_render
from tunneld.dnsserver.core import DnsCore, Signer, account_key
from tunneld.dnsserver.llq import LLQServer
from tunneld.dnsserver.llq_events import diff, records, split
from tunneld.dnsserver.store import Change, ZoneStore
from tunneld.proto.llq import Added, LLQState
from tunneld.proto.llq_wire import (
    LLQ_ERR_NO_ERROR,
    LLQ_OP_EVENT,
    LLQ_OP_REFRESH,
    LLQ_UDP_PAYLOAD,
    LLQ_VERSION,
    LLQOption,
    find_llq_option,
)
from tunneld.proto.tsig import TsigSession, signed_size

DOMAIN = "example.com"
ZONE = dns.name.from_text(DOMAIN)
KEY = account_key(bytes(range(32)), DOMAIN)
T0 = 1_800_000_000.0
QNAME = dns.name.from_text("watched.example.com.")
USRC = ("192.0.2.50", 5353)


def make() -> LLQServer:
    core = DnsCore(ZoneStore(":memory:", ZONE, "ns.example.com.", 53, llq_port=5352), [KEY])
    return LLQServer(core, random.Random(7).randbytes, require_tsig=False)


def update(server: LLQServer, at: float, add: list[str] = [], delete: list[str] = []) -> list[Change]:  # noqa: B006
    upd = dns.update.UpdateMessage(ZONE)
    for address in add:
        upd.add(QNAME, 60, "AAAA", address)
    for address in delete:
        upd.delete(QNAME, "AAAA", address)
    upd.use_edns(0, options=[dns.edns.GenericOption(dns.edns.OptionType(2), struct.pack("!I", 5400))])
    with mock.patch("time.time", return_value=at):
        upd.use_tsig(KEY.dnspython())
        wire = upd.to_wire(max_size=65535)
    reply = server.core.handle(wire, USRC, at)
    assert reply is not None and dns.message.from_wire(reply, keyring=False).rcode() == dns.rcode.NOERROR
    return list(server.core.last_changes)


def establish(server: LLQServer, client: ClientView, src: tuple[str, int], at: float) -> None:
    sent = client.start(at).wire
    for _ in range(2):  # setup -> challenge; challenge response -> ack
        out = server.handle(sent, src, at)
        assert out is not None
        [(_, reply)] = out
        step = client.receive(reply, at)
        sent = step.transmits[0].wire if step.transmits else b""
    assert client.state == LLQState.ESTABLISHED


def old_event_message(qname: dns.name.Name, qtype: int, answers: list[dns.rrset.RRset], llq_id: int,
                      lease: int, msg_id: int = 0) -> dns.message.Message:
    """The event as the server built it for each watcher before (a copy of that code)."""
    msg = dns.message.Message(id=msg_id)
    msg.flags = dns.flags.QR | dns.flags.AA
    msg.find_rrset(msg.question, qname, dns.rdataclass.IN, dns.rdatatype.RdataType.make(qtype), create=True,
                   force_unique=True)
    msg.use_edns(0, payload=LLQ_UDP_PAYLOAD, options=[
        LLQOption(LLQ_VERSION, LLQ_OP_EVENT, LLQ_ERR_NO_ERROR, llq_id, lease)])
    msg.answer = answers
    return msg


def old_events(server: LLQServer, llq: object, old: object, now: float, msg_ids: list[int]) -> list[bytes]:
    """What the server sent one watcher before: its diff split for its size, rendered and signed alone."""
    qname, qtype, key, payload = llq.qname, llq.qtype, llq.key, llq.payload  # type: ignore[attr-defined]
    llq_id, lease = llq.llq_id, max(1, min(math.ceil(llq.expires - now), 0xFFFFFFFF))  # type: ignore[attr-defined]
    changed = diff(old, records(server.core.answer(qname, qtype, now)[0]))  # type: ignore[arg-type]
    room = payload - (0 if key is None else signed_size(key))
    parts = split(changed, lambda a: len(old_event_message(qname, qtype, a, llq_id, lease).to_wire()), room)
    assert len(parts) == len(msg_ids)
    out = []
    for part, msg_id in zip(parts, msg_ids, strict=True):
        msg = old_event_message(qname, qtype, part, llq_id, lease, msg_id)
        if key is None:
            out.append(msg.to_wire())
        else:
            out.append(server.core.sign(msg, Signer(key, b"", int(now), server.core.policy.fudge), int(now)))
    return out


def test_every_watchers_event_is_byte_for_byte_as_rendered_alone() -> None:
    server = make()
    update(server, T0, add=["2001:db8::1"])
    clients: dict[tuple[str, int], ClientView] = {}
    for i in range(24):
        src = ("198.51.100.7", 20_000 + i)
        tsig = TsigSession(KEY) if i % 3 else None  # a third unsigned
        clients[src] = llq_client(QNAME, "AAAA", rand=random.Random(i).randbytes, tsig=tsig)
        if i == 12:  # the second half holds another answer: their diff differs
            update(server, T0 + 1, add=["2001:db8::2"])
        establish(server, clients[src], src, T0 + 1)
    for i, llq in enumerate(server._llqs.values()):
        if i % 2:
            llq.payload = 512  # half at the smallest EDNS size: the big diff below is split for them
    held = {llq.src: (llq, llq.snapshot) for llq in server._llqs.values()}
    now = T0 + 30
    many = [f"2001:db8::{n:x}" for n in range(0x100, 0x100 + 40)]
    out = server.changes(update(server, now, add=many, delete=["2001:db8::1"]), now)
    by_dest: dict[object, list[bytes]] = {}
    for dest, wire in out:
        by_dest.setdefault(dest, []).append(wire)
    assert set(by_dest) == set(held)
    split_seen = 0
    for dest, wires in by_dest.items():
        llq, old = held[dest]
        ids = [struct.unpack_from("!H", w)[0] for w in wires]
        assert wires == old_events(server, llq, old, now, ids)
        split_seen += len(wires) > 1
        assert len(wires) > 1 or llq.payload > 512  # the small ones all need two datagrams
        client = clients[dest]  # type: ignore[index]
        added = set()
        for w in wires:
            step = client.receive(w, now)
            added |= {rd.to_text() for e in step.events if isinstance(e, Added) for rd in e.rrset}
            for ack in step.transmits:  # acks: read from their frames, nothing more to send
                assert server.ack(ack.wire, dest, now) == []
        assert set(many) <= added
    assert split_seen >= 12 and server.counters["event split"] == split_seen
    assert server.counters["event acked"] + server.counters["unsigned ack accepted"] == len(out)
    assert all(server.pending_events(i) == 0 for i in server.llq_ids())


def test_a_change_is_rendered_once_per_distinct_diff_not_per_watcher() -> None:
    server = make()
    update(server, T0, add=["2001:db8::1"])
    for i in range(50):
        src = ("198.51.100.8", 30_000 + i)
        establish(server, llq_client(QNAME, "AAAA", rand=random.Random(i).randbytes, tsig=TsigSession(KEY)),
                  src, T0 + 1)
    changes = update(server, T0 + 5, add=["2001:db8::5"])
    with mock.patch.object(llq_render, "event_message", wraps=llq_render.event_message) as rendered, \
            mock.patch.object(server.core, "answer", wraps=server.core.answer) as answered:
        out = server.changes(changes, T0 + 5)
    assert len(out) == 50
    assert answered.call_count == 1
    assert rendered.call_count <= 3  # split's two measures and the template, for all 50 (was 150)


def test_acks_read_from_frames_agree_with_the_general_path() -> None:
    server = make()
    update(server, T0, add=["2001:db8::1"])
    src = ("198.51.100.9", 40_000)
    client = llq_client(QNAME, "AAAA", rand=random.Random(3).randbytes, tsig=TsigSession(KEY))
    establish(server, client, src, T0)
    [(_, event)] = server.changes(update(server, T0 + 5, add=["2001:db8::5"]), T0 + 5)
    [ack] = client.receive(event, T0 + 5).transmits
    assert server.ack(ack.wire, ("198.51.100.9", 40_001), T0 + 5) is None  # another port: not its LLQ
    tampered = ack.wire[:-7] + bytes([ack.wire[-7] ^ 1]) + ack.wire[-6:]  # the MAC's last byte
    assert server.ack(tampered, src, T0 + 5) is None  # a bad TSIG: left to the general path, which rejects
    assert server.handle(tampered, src, T0 + 5) == []
    assert server.counters["ack tsig rejected"] == 1 and server.pending_events(client.llq_id) == 1
    assert server.ack(b"\x00" * 11, src, T0 + 5) is None and server.ack(event, src, T0 + 5) is None
    assert server.ack(ack.wire, src, T0 + 5) == []
    assert server.pending_events(client.llq_id) == 0 and server.counters["event acked"] == 1
    assert server.ack(ack.wire, src, T0 + 5) is None  # no pending event: the general path counts it
    assert server.handle(ack.wire, src, T0 + 5) == []
    assert server.counters["ack for no pending event"] == 1


def test_the_deadline_is_kept_not_found_over_the_table_at_each_message() -> None:
    """The listener asks deadline() and calls poll() after every LLQ message: neither may walk the whole
    table then (10,000 LLQs made each message cost milliseconds), yet neither may miss what is due."""
    server = make()
    update(server, T0, add=["2001:db8::1"])
    clients = {}
    for i in range(30):
        src = ("198.51.100.10", 50_000 + i)
        clients[src] = llq_client(QNAME, "AAAA", rand=random.Random(i).randbytes, tsig=TsigSession(KEY))
        establish(server, clients[src], src, T0)
    assert server.poll(T0 + 30) == [] and server.deadline() == T0 + 7200  # half-open times gone
    now = T0 + 40
    out = server.changes(update(server, now, add=["2001:db8::2"]), now)
    assert len(out) == 30 and server.deadline() == now + 2.0
    with mock.patch.object(server, "_earliest", wraps=server._earliest) as scans:
        for dest, wire in out[:29]:  # every ack but one, each followed by what the listener does
            [ack] = clients[dest].receive(wire, now).transmits  # type: ignore[index]
            assert server.ack(ack.wire, dest, now + 0.5) == []
            assert (server.deadline() or math.inf) <= now + 2.0  # the saver's next write may come first
            assert server.poll(now + 0.5) == []
        assert scans.call_count == 0
        [(dest, resent)] = server.poll(now + 2.0)  # the one unacknowledged event, resent when due
        assert resent == out[29][1] and dest == out[29][0] and scans.call_count == 1
    assert server._due == now + 2.0 + 4.0  # the resend's next wait; the saver's writes aside
    [ack] = clients[dest].receive(resent, now + 2.5).transmits  # type: ignore[index]
    assert server.ack(ack.wire, dest, now + 2.5) == []
    assert server.poll(now + 6.0) == [] and server._due == T0 + 7200  # found again once due
    # A refresh that shortens a lease moves the deadline earlier at once.
    src, client = next(iter(clients.items()))
    client.core._refresh_lease = 15 * 60  # what its refreshes ask for
    at = client.deadline()  # its refresh, about half way through the lease
    assert at is not None and at < T0 + 7200 - 15 * 60
    [request] = client.poll(at).transmits
    option = find_llq_option(dns.message.from_wire(request.wire, keyring=False))
    assert option is not None and (option.opcode, option.lease) == (LLQ_OP_REFRESH, 15 * 60), option
    assert server.handle(request.wire, src, at) and server._due == at + 15 * 60 < T0 + 7200


def test_a_late_ack_makes_the_duplicate_the_watchers_counted() -> None:
    """The front's watchers' "duplicate or no-op event" were the server's resends: an ack that comes after
    the 2 s (counted from the change) crosses the resent copy, whose own ack then finds nothing pending."""
    server = make()
    update(server, T0, add=["2001:db8::1"])
    src = ("198.51.100.11", 60_000)
    client = llq_client(QNAME, "AAAA", rand=random.Random(4).randbytes, tsig=TsigSession(KEY))
    establish(server, client, src, T0)
    now = T0 + 10
    [(_, event)] = server.changes(update(server, now, add=["2001:db8::2"]), now)
    [ack] = client.receive(event, now + 1.9).transmits  # the watcher acks in time...
    [(_, resent)] = server.poll(now + 2.0)  # ...but the server reads the ack after the 2 s
    assert resent == event and server.counters["event resent"] == 1
    assert server.ack(ack.wire, src, now + 2.1) == []
    [again] = client.receive(resent, now + 2.2).transmits
    assert client.counters["duplicate or no-op event"] == 1
    assert server.handle(again.wire, src, now + 2.3) == []
    assert server.counters["ack for no pending event"] == 1 and server.counters["event acked"] == 1


def test_a_change_visits_only_the_llqs_of_its_names() -> None:
    """The table is indexed by name: a change elsewhere in the zone costs nothing per LLQ, and an LLQ
    dropped leaves the index."""
    server = make()
    other = dns.name.from_text("other.example.com.")
    clients = {}
    for i, qname in enumerate([QNAME] * 3 + [other] * 2):
        src = ("198.51.100.12", 61_000 + i)
        clients[src] = llq_client(qname, "AAAA", rand=random.Random(i).randbytes, tsig=TsigSession(KEY))
        establish(server, clients[src], src, T0)
    assert {n: len(v) for n, v in server._by_name.items()} == {QNAME: 3, other: 2}
    out = server.changes(update(server, T0 + 5, add=["2001:db8::9"]), T0 + 5)
    assert sorted(dest[1] for dest, _ in out) == [61_000, 61_001, 61_002]  # type: ignore[index]
    src = ("198.51.100.12", 61_003)
    [cancel] = clients[src].stop(T0 + 6)
    assert server.handle(cancel.wire, src, T0 + 6)
    assert {n: len(v) for n, v in server._by_name.items()} == {QNAME: 3, other: 1}
    assert len(server) == 4
