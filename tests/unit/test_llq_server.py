"""LLQServer (RFC 8764) driven by our own LLQClient, entirely in memory, over a DnsCore with an in-memory
ZoneStore. Zone changes go through the core (signed UPDATEs) or the store's lease expiry."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast
from unittest import mock

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.update
import pytest

from tests.unit.dns_steps import ClientView, llq_client
from tunneld.dnsserver import llq as llq_server
from tunneld.dnsserver.core import DnsCore, account_key
from tunneld.dnsserver.llq import LLQ_MAX_LEASE, LLQ_MIN_LEASE, LLQServer
from tunneld.dnsserver.store import Change, ZoneStore
from tunneld.proto.llq import (
    Added,
    Established,
    Failed,
    Fallback,
    LLQState,
    Refreshed,
    Removed,
)
from tunneld.proto.llq_wire import (
    LLQ_ERR_FORMAT,
    LLQ_ERR_NO_SUCH_LLQ,
    LLQ_ERR_SERV_FULL,
    LLQ_OP_EVENT,
    LLQ_OP_REFRESH,
    LLQ_OP_SETUP,
    LLQ_REMOVE_TTL,
    LLQOption,
    find_llq_option,
)
from tunneld.proto.tsig import TsigKey, TsigSession

DOMAIN = "example.com"
ZONE = dns.name.from_text(DOMAIN)
KEY = account_key(bytes(range(32)), DOMAIN).dnspython()  # dnspython signs the updates here
T0 = 1_800_000_000.0
QNAME = "_autotunnel._udp.bob.example.com."
CSRC = ("198.51.100.9", 40000)  # the LLQ client
USRC = ("192.0.2.50", 5353)  # the updating device


@contextmanager
def clock(at: float) -> Iterator[None]:
    """dnspython reads time.time() when signing and verifying; pin it."""
    with mock.patch("time.time", return_value=at):
        yield


def Hooks(key: dns.tsig.Key = KEY) -> TsigSession:
    """The client side's TSIG: our session, with the account key (or another)."""
    return TsigSession(TsigKey.of(key))


DaemonHooks = Hooks  # the daemon's watcher uses the same session: MACs kept by request ID


def event_ids_repeat(fixed: bytes = b"\x12\x34") -> Callable[[int], bytes]:
    """A server's ``rand`` under which every 2-byte draw (a message ID) is ``fixed``: random message IDs
    repeat sooner or later, this makes it at once."""
    rnd = random.Random(5)
    return lambda n: fixed if n == 2 else rnd.randbytes(n)


def lease_opt(seconds: int) -> dns.edns.GenericOption:
    """An RFC 9664 Update Lease option (4-byte form)."""
    return dns.edns.GenericOption(cast(dns.edns.OptionType, 2), struct.pack("!I", seconds))


def make(require_tsig: bool = False, max_llqs: int = 1000) -> LLQServer:
    core = DnsCore(ZoneStore(":memory:", ZONE, "ns.example.com.", 53, llq_port=5352), [KEY])
    return LLQServer(core, random.Random(7).randbytes, max_llqs=max_llqs, require_tsig=require_tsig)


def make_client(lease: int = 7200, tsig: TsigSession | None = None) -> ClientView:
    return llq_client(QNAME, "SRV", rand=random.Random(1).randbytes, lease=lease, tsig=tsig)


def update(server: LLQServer, *, add: str | None = None, delete: str | None = None, lease: int = 5400,
           at: float = T0, name: str = QNAME) -> list[Change]:
    """A signed UPDATE through the core; returns core.last_changes."""
    upd = dns.update.UpdateMessage(ZONE)
    if add is not None:
        upd.add(name, 300, "SRV", add)
    if delete is not None:
        upd.delete(name, "SRV", delete)
    upd.use_edns(0, options=[lease_opt(lease)])
    upd.use_tsig(KEY)
    with clock(at):
        wire = upd.to_wire()
    assert server.handle(wire, USRC, at) is None  # not an LLQ message: the core's
    reply = server.core.handle(wire, USRC, at)
    assert reply is not None
    assert dns.message.from_wire(reply, keyring=False).rcode() == dns.rcode.NOERROR
    return list(server.core.last_changes)


def send(server: LLQServer, wire: bytes, at: float, src: object = CSRC) -> list[bytes]:
    out = server.handle(wire, src, at)
    assert out is not None
    assert all(dest == src for dest, _ in out)
    return [w for _, w in out]


def establish(server: LLQServer, client: ClientView, at: float = T0) -> list[object]:
    [challenge] = send(server, client.start(at).wire, at)
    out = client.receive(challenge, at)
    [response] = out.transmits
    [ack] = send(server, response.wire, at)
    out = client.receive(ack, at)
    assert client.state == LLQState.ESTABLISHED
    assert out.transmits == []
    return list(out.events)


def option_of(wire: bytes) -> LLQOption:
    option = find_llq_option(dns.message.from_wire(wire, keyring=False))
    assert option is not None
    return option


def targets(client: ClientView) -> set[str]:
    return {rd.to_text() for rrset in client.records() for rd in rrset}


def test_four_way_handshake_gives_established_with_answers() -> None:
    server = make()
    update(server, add="0 0 4500 a.example.com.")
    client = make_client()
    setup = client.start(T0).wire
    [challenge] = send(server, setup, T0)
    c = dns.message.from_wire(challenge)
    s = dns.message.from_wire(setup)
    assert c.id == s.id and c.flags & dns.flags.QR and c.question == s.question and not c.answer
    opt = option_of(challenge)
    assert (opt.opcode, opt.error, opt.lease) == (LLQ_OP_SETUP, 0, 7200) and opt.llq_id != 0
    out = client.receive(challenge, T0 + 0.1)
    [response] = out.transmits
    [ack] = send(server, response.wire, T0 + 10)
    assert dns.message.from_wire(ack).id == dns.message.from_wire(response.wire).id
    assert option_of(ack).lease == 7190  # remaining
    events = client.receive(ack, T0 + 10).events
    est = [e for e in events if isinstance(e, Established)]
    assert len(est) == 1 and est[0].llq_id == opt.llq_id
    assert {rd.to_text() for rrset in est[0].answers for rd in rrset} == {"0 0 4500 a.example.com."}
    assert server.llq_ids() == [opt.llq_id]


@pytest.mark.parametrize(("asked", "granted"), [(60, LLQ_MIN_LEASE), (3600, 3600), (10**6, LLQ_MAX_LEASE)])
def test_granted_lease_is_clamped(asked: int, granted: int) -> None:
    server = make()
    [challenge] = send(server, make_client(lease=asked).start(T0).wire, T0)
    assert option_of(challenge).lease == granted


def test_update_event_is_acked_and_not_resent() -> None:
    server = make()
    client = make_client()
    establish(server, client)
    changes = update(server, add="0 0 4500 b.example.com.", at=T0 + 5)
    [(dest, event)] = server.changes(changes, T0 + 5)
    assert dest == CSRC
    msg = dns.message.from_wire(event)
    opt = option_of(event)
    assert msg.flags & dns.flags.QR and msg.opcode() == 0
    assert (opt.opcode, opt.llq_id) == (LLQ_OP_EVENT, client.llq_id)
    out = client.receive(event, T0 + 5)
    assert [type(e) for e in out.events] == [Added]
    assert targets(client) == {"0 0 4500 b.example.com."}
    [ack] = out.transmits
    assert send(server, ack.wire, T0 + 5) == []
    assert server.pending_events(client.llq_id) == 0
    assert server.poll(T0 + 30) == []
    # the same change reported again produces no event
    assert server.changes(changes, T0 + 6) == []


def test_lost_ack_resends_three_tries_then_drops() -> None:
    server = make()
    client = make_client()
    establish(server, client)
    changes = update(server, add="0 0 4500 b.example.com.", at=T0 + 1)
    [(_, event)] = server.changes(changes, T0 + 1)
    assert len(client.receive(event, T0 + 1).transmits) == 1  # the ack, dropped
    assert server.deadline() == T0 + 3
    assert server.poll(T0 + 2.9) == []
    [(_, again)] = server.poll(T0 + 3)
    assert again == event
    out = client.receive(again, T0 + 3)
    assert out.events == [] and len(out.transmits) == 1  # deduplicated, acked again (dropped again)
    assert client.counters["duplicate or no-op event"] == 1
    assert server.poll(T0 + 6.9) == []
    [(_, third)] = server.poll(T0 + 7)
    assert third == event
    assert server.poll(T0 + 14.9) == []
    assert server.poll(T0 + 15) == []
    assert server.llq_ids() == []  # 3 unacknowledged tries: the LLQ is gone


def test_ack_after_resend_stops_it() -> None:
    server = make()
    client = make_client()
    establish(server, client)
    [(_, event)] = server.changes(update(server, add="0 0 1 c.example.com."), T0)
    client.receive(event, T0)
    [(_, again)] = server.poll(T0 + 2)
    [ack] = client.receive(again, T0 + 2).transmits
    assert send(server, ack.wire, T0 + 2, src=("203.0.113.1", 1)) == []  # wrong source: not an ack
    assert server.pending_events(client.llq_id) == 1
    send(server, ack.wire, T0 + 2)
    assert server.pending_events(client.llq_id) == 0
    assert server.poll(T0 + 100) == []


def test_lease_expiry_in_store_gives_removed() -> None:
    server = make()
    update(server, add="0 0 4500 a.example.com.", lease=1800)
    client = make_client()
    establish(server, client, T0 + 1)
    assert targets(client) == {"0 0 4500 a.example.com."}
    removals = server.core.store.expire(T0 + 1800)
    assert removals
    [(_, event)] = server.changes(removals, T0 + 1800)
    wire_ttls = [rd.ttl for rd in dns.message.from_wire(event).answer]  # dnspython shows 0xFFFFFFFF as 0
    assert len(wire_ttls) == 1 and struct.pack("!I", LLQ_REMOVE_TTL) in event
    events = client.receive(event, T0 + 1800).events
    assert [type(e) for e in events] == [Removed]
    assert client.records() == []


def test_delete_through_update_gives_removed() -> None:
    server = make()
    update(server, add="0 0 4500 a.example.com.")
    update(server, add="0 0 4500 b.example.com.")
    client = make_client()
    establish(server, client)
    changes = update(server, delete="0 0 4500 a.example.com.", at=T0 + 1)
    [(_, event)] = server.changes(changes, T0 + 1)
    events = client.receive(event, T0 + 1).events
    assert [type(e) for e in events] == [Removed]
    assert targets(client) == {"0 0 4500 b.example.com."}


def test_other_names_get_no_event() -> None:
    server = make()
    client = make_client()
    establish(server, client)
    upd = dns.update.UpdateMessage(ZONE)
    upd.add("other.example.com.", 300, "A", "192.0.2.1")
    upd.use_edns(0, options=[lease_opt(3600)])
    upd.use_tsig(KEY)
    with clock(T0):
        server.core.handle(upd.to_wire(), USRC, T0)
    assert server.changes(server.core.last_changes, T0) == []


def test_duplicate_setup_gets_identical_challenge() -> None:
    server = make()
    client = make_client()
    setup = client.start(T0).wire
    [first] = send(server, setup, T0)
    [second] = send(server, setup, T0 + 2)
    assert first == second
    assert len(server.llq_ids()) == 1
    out = client.receive(second, T0 + 2)
    assert len(out.transmits) == 1


def test_duplicate_challenge_response_gets_fresh_ack() -> None:
    server = make()
    client = make_client()
    [challenge] = send(server, client.start(T0).wire, T0)
    [response] = client.receive(challenge, T0).transmits
    send(server, response.wire, T0)  # ACK lost
    update(server, add="0 0 4500 late.example.com.", at=T0 + 1)
    [ack] = send(server, response.wire, T0 + 2)  # the client's retransmission
    events = client.receive(ack, T0 + 2).events
    assert any(isinstance(e, Established) for e in events)
    assert targets(client) == {"0 0 4500 late.example.com."}


def test_challenge_response_checks() -> None:
    server = make()
    client = make_client()
    [challenge] = send(server, client.start(T0).wire, T0)
    llq_id = option_of(challenge).llq_id
    query = dns.message.make_query(QNAME, "SRV", use_edns=0, payload=1440,
                                   options=[LLQOption(1, LLQ_OP_SETUP, 0, llq_id, 7200 + 61)])
    [bad_lease] = send(server, query.to_wire(), T0)
    assert option_of(bad_lease).error == LLQ_ERR_FORMAT
    query = dns.message.make_query(QNAME, "SRV", use_edns=0, payload=1440,
                                   options=[LLQOption(1, LLQ_OP_SETUP, 0, llq_id, 7200 - 60)])
    [other_src] = send(server, query.to_wire(), T0, src=("203.0.113.1", 1))
    assert option_of(other_src).error == LLQ_ERR_NO_SUCH_LLQ
    [ok] = send(server, query.to_wire(), T0)
    assert option_of(ok).error == 0 and option_of(ok).llq_id == llq_id


def test_refresh_and_cancel() -> None:
    server = make()
    client = make_client()
    establish(server, client)
    at = client.deadline()
    assert at is not None
    [refresh] = client.poll(at).transmits
    assert option_of(refresh.wire).opcode == LLQ_OP_REFRESH
    [reply] = send(server, refresh.wire, at)
    assert option_of(reply).lease == 7200 and not dns.message.from_wire(reply).answer
    assert client.receive(reply, at).events == [Refreshed(7200)]
    # the server's lease now runs from the refresh
    assert server.poll(T0 + 7200) == [] and server.llq_ids() == [client.llq_id]
    [cancel] = client.stop(at + 1)
    [reply] = send(server, cancel.wire, at + 1)
    assert option_of(reply).lease == 0 and option_of(reply).error == 0
    assert server.llq_ids() == []


def test_refresh_lease_clamped_to_maximum() -> None:
    server = make()
    client = make_client()
    establish(server, client)
    query = dns.message.make_query(QNAME, "SRV", use_edns=0, payload=1440,
                                   options=[LLQOption(1, LLQ_OP_REFRESH, 0, client.llq_id, 99999)])
    [reply] = send(server, query.to_wire(), T0 + 1)
    assert option_of(reply).lease == LLQ_MAX_LEASE  # not dnsextd's clamp-to-minimum


def test_unknown_id_is_no_such_llq_and_client_resets() -> None:
    server = make()
    client = make_client()
    establish(server, client)
    query = dns.message.make_query(QNAME, "SRV", use_edns=0, payload=1440,
                                   options=[LLQOption(1, LLQ_OP_REFRESH, 0, 12345, 7200)])
    [reply] = send(server, query.to_wire(), T0)
    assert option_of(reply).error == LLQ_ERR_NO_SUCH_LLQ
    fresh = make()  # a restarted server knows no LLQs
    at = client.deadline()
    assert at is not None
    [refresh] = client.poll(at).transmits
    [reply] = send(fresh, refresh.wire, at)
    assert option_of(reply).error == LLQ_ERR_NO_SUCH_LLQ
    out = client.receive(reply, at)
    assert isinstance(out.events[0], Failed) and len(out.transmits) == 1  # a new setup request


def test_half_open_expires_after_the_challenge_timeout() -> None:
    """Not at its granted lease (RFC 8764 §5.1 has it kept that long): an unanswered challenge held a
    table entry for two hours, and a flood of setups filled the table."""
    server = make()
    client = make_client(lease=1000)
    [challenge] = send(server, client.start(T0).wire, T0)
    assert option_of(challenge).lease == 1000
    assert server.deadline() == T0 + llq_server.CHALLENGE_TIMEOUT == T0 + 30
    assert server.poll(T0 + 29.9) == [] and len(server.llq_ids()) == 1  # never retransmitted
    server.poll(T0 + 30)
    assert server.llq_ids() == []
    assert server.counters["dropped: challenge not answered"] == 1
    [response] = client.receive(challenge, T0).transmits
    [late] = send(server, response.wire, T0 + 30)
    assert option_of(late).error == LLQ_ERR_NO_SUCH_LLQ


def test_a_challenge_answered_in_time_gets_its_whole_lease() -> None:
    server = make()
    client = make_client(lease=1000)
    [challenge] = send(server, client.start(T0).wire, T0)
    [response] = client.receive(challenge, T0 + 29).transmits
    [ack] = send(server, response.wire, T0 + 29)
    assert option_of(ack).error == 0 and option_of(ack).lease == 971  # the lease runs from the setup
    assert server.poll(T0 + 999) == [] and server.llq_ids() == [client.llq_id]
    assert server.deadline() == T0 + 1000


def test_server_full() -> None:
    server = make(max_llqs=1)
    send(server, make_client().start(T0).wire, T0)
    other = llq_client("x.example.com.", "A", rand=random.Random(5).randbytes)
    [reply] = send(server, other.start(T0).wire, T0)
    assert option_of(reply).error == LLQ_ERR_SERV_FULL
    assert any(isinstance(e, Fallback) for e in other.receive(reply, T0).events)


def test_unsigned_setup_refused_when_tsig_required() -> None:
    server = make(require_tsig=True)
    client = make_client()
    [reply] = send(server, client.start(T0).wire, T0)
    assert dns.message.from_wire(reply).rcode() == dns.rcode.REFUSED
    assert server.llq_ids() == []
    assert any(isinstance(e, Fallback) for e in client.receive(reply, T0).events)


def test_signed_llq_end_to_end() -> None:
    server = make(require_tsig=True)
    update(server, add="0 0 4500 a.example.com.")
    hooks = Hooks()
    client = make_client(tsig=hooks)
    events = establish(server, client)
    assert any(isinstance(e, Established) for e in events)
    assert client.counters["tsig rejected"] == 0
    [(_, event)] = server.changes(update(server, add="0 0 1 b.example.com.", at=T0 + 1), T0 + 1)
    out = client.receive(event, T0 + 1)
    assert [type(e) for e in out.events] == [Added]
    [ack] = out.transmits
    send(server, ack.wire, T0 + 1)
    assert server.pending_events(client.llq_id) == 0
    # an unsigned refresh for a signed LLQ is refused; an unsigned ack does not count
    query = dns.message.make_query(QNAME, "SRV", use_edns=0, payload=1440,
                                   options=[LLQOption(1, LLQ_OP_REFRESH, 0, client.llq_id, 0)])
    [reply] = send(server, query.to_wire(), T0 + 2)
    assert dns.message.from_wire(reply, keyring=False).rcode() == dns.rcode.REFUSED
    assert server.llq_ids() == [client.llq_id]


def test_signed_with_wrong_key_is_notauth() -> None:
    server = make(require_tsig=True)
    wrong = account_key(b"\x01" * 32, DOMAIN).dnspython()
    client = make_client(tsig=Hooks(wrong))
    [reply] = send(server, client.start(T0).wire, T0)
    assert dns.message.from_wire(reply, keyring=False).rcode() == dns.rcode.NOTAUTH
    assert server.llq_ids() == []


def test_non_llq_messages_are_none() -> None:
    server = make()
    plain = dns.message.make_query(QNAME, "SRV").to_wire()
    assert server.handle(plain, CSRC, T0) is None
    assert server.handle(dns.message.make_query(QNAME, "SRV"), CSRC, T0) is None
    parsed = dns.message.make_query(QNAME, "SRV", use_edns=0,
                                    options=[LLQOption(1, LLQ_OP_SETUP, 0, 0, 7200)])
    out = server.handle(parsed, CSRC, T0)
    assert out is not None and option_of(out[0][1]).llq_id != 0


def test_garbage_never_raises() -> None:
    server = make()
    setup = make_client().start(T0).wire
    # the wrong 16-byte layout (no LLQ-ERROR): OPT RDLEN 20, option code 1, length 16
    bad_option = setup[:-24] + struct.pack("!H", 20) + bytes.fromhex("00010010") + bytes(16)
    assert server.handle(bad_option, CSRC, T0) is None
    formerr = server.core.handle(bad_option, CSRC, T0)
    assert formerr is not None and formerr[3] & 0xF == dns.rcode.FORMERR
    for wire in (b"", b"\x00", bytes(11), bytes(12), setup[:20], b"\xff" * 40):
        out = server.handle(wire, CSRC, T0)
        assert out is None or isinstance(out, list)
    rng = random.Random(11)
    for _ in range(500):
        data = bytearray(setup)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        out = server.handle(bytes(data[: rng.randint(0, len(data))]), CSRC, T0)
        assert out is None or all(isinstance(w, bytes) for _, w in out)
    assert server.counters["internal error"] == 0


def test_signed_llq_refuses_unsigned_requests() -> None:
    """(Unsigned acks are accepted from the LLQ's own address: test_llq_limits.)"""
    server = make(require_tsig=False)
    hooks = Hooks()
    client = make_client(tsig=hooks)
    establish(server, client)
    [(_, event)] = server.changes(update(server, add="0 0 1 b.example.com."), T0)
    with clock(T0):
        assert dns.message.from_wire(event, keyring=KEY).had_tsig  # events signed with the account key
    query = dns.message.make_query(QNAME, "SRV", use_edns=0, payload=1440,
                                   options=[LLQOption(1, LLQ_OP_REFRESH, 0, client.llq_id, 0)])
    [reply] = send(server, query.to_wire(), T0)
    assert option_of(reply).error == LLQ_ERR_NO_SUCH_LLQ
    assert server.llq_ids() == [client.llq_id]


def test_new_setup_restarts_llq() -> None:
    server = make()
    first = make_client()
    establish(server, first)
    old = first.llq_id
    second = llq_client(QNAME, "SRV", rand=random.Random(99).randbytes)
    establish(server, second, T0 + 5)
    assert server.llq_ids() == [second.llq_id] and second.llq_id != old


def test_changes_during_an_unacked_event_are_coalesced_and_sent_on_ack() -> None:
    server = make()
    update(server, add="0 0 4500 a.example.com.")
    client = make_client()
    establish(server, client)
    [(_, first)] = server.changes(update(server, add="0 0 1 b.example.com.", at=T0 + 1), T0 + 1)
    # while it is unacknowledged: b goes away again and c arrives
    assert server.changes(update(server, delete="0 0 1 b.example.com.", at=T0 + 2), T0 + 2) == []
    assert server.changes(update(server, add="0 0 2 c.example.com.", at=T0 + 2), T0 + 2) == []
    out = client.receive(first, T0 + 3)
    [ack] = out.transmits
    [second] = send(server, ack.wire, T0 + 3)  # the ack releases the coalesced diff
    assert option_of(second).opcode == LLQ_OP_EVENT
    events = client.receive(second, T0 + 3).events
    assert {type(e) for e in events} == {Added, Removed}
    assert targets(client) == {"0 0 4500 a.example.com.", "0 0 2 c.example.com."}


def test_parsed_signed_message_is_refused_not_trusted() -> None:
    server = make(require_tsig=True)
    wire = make_client(tsig=Hooks()).start(T0).wire
    with clock(T0):
        parsed = dns.message.from_wire(wire, keyring=KEY)
    [(dest, reply)] = server.handle(parsed, CSRC, T0) or []
    assert dest == CSRC and dns.message.from_wire(reply).rcode() == dns.rcode.REFUSED
    assert server.handle(wire, CSRC, T0) is not None and len(server.llq_ids()) == 1  # the wire is fine


def test_restart_keeps_established_llqs(tmp_path: Path) -> None:
    """The LLQ table is kept in the zone database: after a restart the same LLQ keeps delivering events,
    and a change made while the server was down is sent at once, diffed against what the client held."""
    db = str(tmp_path / "zone.sqlite")

    def server_on_disk() -> LLQServer:
        core = DnsCore(ZoneStore(db, ZONE, "ns.example.com.", 53, llq_port=5352), [KEY])
        return LLQServer(core, random.Random(7).randbytes, require_tsig=False)

    first = server_on_disk()
    update(first, add="0 0 4500 a.example.com.")
    client = make_client()
    establish(first, client)
    llq_id = client.llq_id
    first.core.store.close()  # the server stops

    down = server_on_disk()  # a change while no LLQ server runs (another instance, or an admin)
    update(down, add="0 0 4500 b.example.com.", at=T0 + 20)
    down.core.store.close()

    second = server_on_disk()
    [(dest, event)] = second.restore(T0 + 30)  # what the client missed: the change above
    assert dest == CSRC and option_of(event).llq_id == llq_id
    out = client.receive(event, T0 + 30)
    assert [type(e) for e in out.events] == [Added]
    assert targets(client) == {"0 0 4500 a.example.com.", "0 0 4500 b.example.com."}
    [ack] = out.transmits
    assert send(second, ack.wire, T0 + 30) == []
    # and later changes keep flowing on the same LLQ
    changes = update(second, delete="0 0 4500 a.example.com.", at=T0 + 40)
    [(_, event)] = second.changes(changes, T0 + 40)
    assert [type(e) for e in client.receive(event, T0 + 40).events] == [Removed]
    assert targets(client) == {"0 0 4500 b.example.com."}


def test_restore_drops_expired_llqs(tmp_path: Path) -> None:
    db = str(tmp_path / "zone.sqlite")
    core = DnsCore(ZoneStore(db, ZONE, "ns.example.com.", 53, llq_port=5352), [KEY])
    first = LLQServer(core, random.Random(7).randbytes, require_tsig=False)
    establish(first, make_client())
    core.store.close()
    again = LLQServer(DnsCore(ZoneStore(db, ZONE, "ns.example.com.", 53, llq_port=5352), [KEY]),
                      random.Random(7).randbytes, require_tsig=False)
    assert again.restore(T0 + 7201) == [] and again.llq_ids() == []
    assert again.core.store.llq_all() == []


# ---- event message IDs: a client that keeps a MAC per message ID must never see an ID it used again ------


def deliver(server: LLQServer, client: ClientView, hooks: TsigSession, changes: list[Change], at: float,
            ids: list[int]) -> list[object]:
    """The event for ``changes`` to ``client`` and its ack back; the client's events. Records the ID."""
    [(_, event)] = server.changes(changes, at)
    ids.append(dns.message.from_wire(event, keyring=False).id)
    out = client.receive(event, at)
    for ack in out.transmits:
        assert send(server, ack.wire, at) == []
    return list(out.events)


def test_events_reach_a_client_that_keeps_macs_by_message_id() -> None:
    """The benchmark's lost events: with random IDs an event sometimes drew the ID of an earlier event,
    whose ack MAC the daemon's TSIG hooks held under that ID, so the event (and each resend) failed its
    TSIG check, went unacknowledged, held back every later change and finally cost the LLQ."""
    server = LLQServer(make().core, event_ids_repeat(), require_tsig=True)
    hooks = DaemonHooks()
    client = make_client(tsig=hooks)
    establish(server, client)
    ids: list[int] = []
    for k in range(30):
        at = T0 + 1 + k
        events = deliver(server, client, hooks, update(server, add=f"0 0 {k + 1} b.example.com.", at=at), at,
                         ids)
        assert [type(e) for e in events] == [Added], (k, client.counters)
        assert server.pending_events(client.llq_id) == 0
    assert client.counters["tsig rejected"] == 0
    assert len(set(ids)) == len(ids)


def test_event_ids_skip_the_message_ids_of_the_clients_requests() -> None:
    """The client signed its setup request under ID 0x1234 (the ID the server would draw for its first
    event) and keeps that MAC: an event with that ID would fail its check."""
    server = LLQServer(make().core, event_ids_repeat(), require_tsig=True)
    hooks = DaemonHooks()
    draws = iter([b"\x12\x34"])
    rnd = random.Random(3)
    client = llq_client(QNAME, "SRV", rand=lambda n: next(draws, None) or rnd.randbytes(n), lease=7200,
                       tsig=hooks)
    establish(server, client)
    ids: list[int] = []
    changes = update(server, add="0 0 1 b.example.com.", at=T0 + 1)
    events = deliver(server, client, hooks, changes, T0 + 1, ids)
    assert [type(e) for e in events] == [Added] and client.counters["tsig rejected"] == 0
    assert ids != [0x1234]
    # a later request with the next ID in line (a refresh) is skipped too
    nxt = (ids[-1] + 1) & 0xFFFF
    refresh = dns.message.make_query(QNAME, "SRV", use_edns=0, payload=1440, id=nxt,
                                     options=[LLQOption(1, LLQ_OP_REFRESH, 0, client.llq_id, 7200)])
    [reply] = send(server, hooks.sign(refresh.to_wire(), T0 + 2), T0 + 2)
    assert option_of(reply).error == 0
    changes = update(server, add="0 0 2 b.example.com.", at=T0 + 3)
    events = deliver(server, client, hooks, changes, T0 + 3, ids)
    assert [type(e) for e in events] == [Added] and client.counters["tsig rejected"] == 0
    assert nxt not in ids


def test_llqs_on_one_socket_share_the_event_id_sequence() -> None:
    """The daemon's watcher runs one LLQ per peer name on one socket with one set of TSIG hooks."""
    other = "_autotunnel._udp.carol.example.com."
    server = LLQServer(make().core, event_ids_repeat(), require_tsig=True)
    hooks = DaemonHooks()
    bob = make_client(tsig=hooks)
    carol = llq_client(other, "SRV", rand=random.Random(2).randbytes, lease=7200, tsig=hooks)
    establish(server, bob)
    establish(server, carol)
    ids: list[int] = []
    for k in range(10):
        at = T0 + 1 + k
        for name, client in ((QNAME, bob), (other, carol)):
            changes = update(server, add=f"0 0 {k + 1} b.example.com.", at=at, name=name)
            assert [type(e) for e in deliver(server, client, hooks, changes, at, ids)] == [Added]
    assert bob.counters["tsig rejected"] == carol.counters["tsig rejected"] == 0
    assert len(set(ids)) == len(ids) == 20


def test_event_ids_continue_after_a_restart(tmp_path: Path) -> None:
    db = str(tmp_path / "zone.sqlite")

    def server_on_disk() -> LLQServer:
        core = DnsCore(ZoneStore(db, ZONE, "ns.example.com.", 53, llq_port=5352), [KEY])
        return LLQServer(core, event_ids_repeat(), require_tsig=True)

    first = server_on_disk()
    hooks = DaemonHooks()
    client = make_client(tsig=hooks)
    establish(first, client)
    ids: list[int] = []
    deliver(first, client, hooks, update(first, add="0 0 1 b.example.com.", at=T0 + 1), T0 + 1, ids)
    first.core.store.close()

    second = server_on_disk()
    assert second.restore(T0 + 10) == []
    events = deliver(second, client, hooks, update(second, add="0 0 2 b.example.com.", at=T0 + 11), T0 + 11,
                     ids)
    assert [type(e) for e in events] == [Added] and client.counters["tsig rejected"] == 0
    assert len(set(ids)) == len(ids) == 2
    second.core.store.close()


def test_id_state_of_sources_without_llqs_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llq_server, "IDLE_SOURCES_KEPT", 3)
    server = make(max_llqs=2)
    keeper = make_client()
    establish(server, keeper)
    for port in range(10):  # LLQs set up and cancelled from ten other sources
        src = ("198.51.100.20", 50000 + port)
        c = llq_client(QNAME, "SRV", rand=random.Random(port).randbytes)
        [challenge] = send(server, c.start(T0).wire, T0, src=src)
        [response] = c.receive(challenge, T0).transmits
        [ack] = send(server, response.wire, T0, src=src)
        c.receive(ack, T0)
        [cancel] = c.stop(T0)
        send(server, cancel.wire, T0, src=src)
    assert server.llq_ids() == [keeper.llq_id]
    assert len(server._sources) <= 2 + 3 and CSRC in server._sources
    [(_, event)] = server.changes(update(server, add="0 0 1 b.example.com.", at=T0 + 1), T0 + 1)
    assert [type(e) for e in keeper.receive(event, T0 + 1).events] == [Added]
