"""The LLQ server under hostile traffic: replayed signed requests, half-open LLQs that never complete, one
source or one key trying to take the table, and unsigned acks (as Apple's mDNSResponder sends them)."""

from __future__ import annotations

import functools
import ipaddress
import random
import time

import dns.flags
import dns.message
import dns.name
import dns.rdatatype
import dns.tsig
import dns.update
import trio

from tests.unit import test_llq as canned
from tests.unit.dns_steps import ClientView, llq_client
from tests.unit.test_llq_server import (
    CSRC,
    KEY,
    QNAME,
    T0,
    USRC,
    ZONE,
    Hooks,
    clock,
    establish,
    lease_opt,
    make,
    make_client,
    option_of,
    send,
    targets,
    update,
)
from tunneld.crypto.kdf import derive_tsig_key
from tunneld.dnsserver.core import DnsCore, account_key
from tunneld.dnsserver.llq import LLQServer
from tunneld.dnsserver.llq_saver import SAVE_DELAY
from tunneld.dnsserver.serve import serve
from tunneld.dnsserver.store import AddRR, Lease, RRsetRemoval, ZoneStore
from tunneld.proto import records
from tunneld.proto.llq import LLQ_TCP_TIMEOUT, Added, Established, Fallback, LLQState, Removed, TcpQuery
from tunneld.proto.llq_wire import (
    LLQ_ERR_NO_ERROR,
    LLQ_ERR_SERV_FULL,
    LLQ_OP_EVENT,
    LLQ_OP_SETUP,
    UDP_PAYLOAD,
    LLQOption,
)
from tunneld.proto.tsig import TsigSession, check, sign
from tunneld.proto.watcher import MAX_HANDSHAKES, PeerLearned, Watcher, WatcherEvent
from tunneld.services.watcher import WatcherService

ATTACKER = "203.0.113.66"


def test_a_captured_setup_replayed_from_1250_ports_is_one_llq() -> None:
    """The issue: one captured signed SETUP replayed from 1,250 source ports filled the 1,000-entry table
    with half-open LLQs, and new devices got SERV-FULL."""
    server = make(require_tsig=True, max_llqs=1000)
    captured = make_client(tsig=Hooks()).start(T0).wire
    [challenge] = send(server, captured, T0)  # the device's own setup, seen on the wire
    replies = []
    for port in range(1250):
        replies += send(server, captured, T0 + 1, src=(ATTACKER, 10000 + port))
    assert replies == []  # a replay from another port is not a new LLQ, and draws no answer
    assert len(server.llq_ids()) == 1
    assert server.counters["replayed request"] == 1250
    # the device's own retransmission (same source) still gets the same answer, byte for byte
    assert send(server, captured, T0 + 2) == [challenge]
    # and a new device still gets its LLQ
    newcomer = llq_client("_autotunnel._udp.carol.example.com.", "SRV", rand=random.Random(9).randbytes,
                          tsig=Hooks())
    [reply] = send(server, newcomer.start(T0 + 3).wire, T0 + 3, src=("192.0.2.77", 5353))
    assert option_of(reply).error == LLQ_ERR_NO_ERROR and option_of(reply).llq_id != 0


def test_a_replayed_setup_from_the_same_source_does_not_restart_its_llq() -> None:
    server = make(require_tsig=True)
    client = make_client(tsig=Hooks())
    setup = client.start(T0).wire
    [challenge] = send(server, setup, T0)
    [response] = client.receive(challenge, T0).transmits
    [ack] = send(server, response.wire, T0)
    client.receive(ack, T0)
    assert send(server, setup, T0 + 5) == []  # the captured setup, even from the client's own address
    assert server.llq_ids() == [client.llq_id]


def test_request_macs_are_forgotten_when_their_window_closes() -> None:
    server = make(require_tsig=True)
    send(server, make_client(tsig=Hooks()).start(T0).wire, T0)
    assert len(server.replays) == 1
    server.replays.first(b"other", CSRC, int(T0) + 301, 300, T0 + 301)  # any later request
    assert len(server.replays) == 1  # the first one's window (T0 + 300) is over


def signed_setup(name: str, seed: int, key: dns.tsig.Key = KEY) -> bytes:
    client = llq_client(f"{name}.example.com.", "AAAA", rand=random.Random(seed).randbytes, tsig=Hooks(key))
    return client.start(T0).wire


def test_one_address_cannot_take_the_table() -> None:
    server = make(require_tsig=True, max_llqs=100)
    assert server.caps.per_address == 25
    errors = [option_of(r).error for i in range(40)
              for r in send(server, signed_setup(f"h{i}", i), T0, src=(ATTACKER, 20000 + i))]
    assert errors.count(LLQ_ERR_NO_ERROR) == 25 and errors.count(LLQ_ERR_SERV_FULL) == 15
    assert server.counters["address cap"] == 15
    [reply] = send(server, signed_setup("newcomer", 99), T0, src=("192.0.2.77", 5353))
    assert option_of(reply).error == LLQ_ERR_NO_ERROR
    server.poll(T0 + 30)  # the attacker's half-open LLQs time out, and its address may set up again
    assert server.llq_ids() == []
    [reply] = send(server, signed_setup("again", 100), T0 + 31, src=(ATTACKER, 30000))
    assert option_of(reply).error == LLQ_ERR_NO_ERROR


def test_one_key_cannot_take_the_table() -> None:
    other = dns.tsig.Key("other.example.com.", b"\x02" * 32, "hmac-sha256")
    core = DnsCore(ZoneStore(":memory:", ZONE, "ns.example.com.", 53, llq_port=5352), [KEY, other])
    server = LLQServer(core, random.Random(7).randbytes, max_llqs=8, per_address=8, per_key=6)
    errors = [option_of(r).error for i in range(8)
              for r in send(server, signed_setup(f"h{i}", i), T0, src=(f"198.51.100.{i}", 5353))]
    assert errors == [LLQ_ERR_NO_ERROR] * 6 + [LLQ_ERR_SERV_FULL] * 2
    assert server.counters["key cap"] == 2
    [reply] = send(server, signed_setup("o", 50, other), T0, src=("192.0.2.77", 5353))
    assert option_of(reply).error == LLQ_ERR_NO_ERROR


# ---- unsigned acks (mDNSResponder) ----------------------------------------------------------------------


def unsigned_ack_of(event: bytes) -> bytes:
    """An ack as Apple's client sends it: the event's ID, question and LLQ option, QR set, no TSIG."""
    msg = dns.message.from_wire(event, keyring=False)
    ack = dns.message.Message(id=msg.id)
    ack.flags = dns.flags.QR
    ack.question = list(msg.question)
    ack.use_edns(0, payload=1440, options=[option_of(event)])
    return ack.to_wire()


def test_an_unsigned_ack_from_the_llqs_address_stops_resends() -> None:
    server = make(require_tsig=True)
    client = make_client(tsig=Hooks())
    establish(server, client)
    [(_, event)] = server.changes(update(server, add="0 0 1 b.example.com."), T0)
    assert option_of(event).opcode == LLQ_OP_EVENT
    ack = unsigned_ack_of(event)
    for elsewhere in (("198.51.100.9", 40001), ("203.0.113.1", 40000)):  # another port, another host
        assert send(server, ack, T0, src=elsewhere) == []
    assert server.pending_events(client.llq_id) == 1
    [(_, again)] = server.poll(T0 + 2)
    assert again == event  # still resent
    assert send(server, ack, T0 + 2) == []  # from the LLQ's own address and port
    assert server.pending_events(client.llq_id) == 0
    assert server.counters["unsigned ack accepted"] == 1
    assert server.poll(T0 + 100) == [] and server.llq_ids() == [client.llq_id]


def test_a_signed_ack_with_another_key_is_still_refused() -> None:
    other = dns.tsig.Key("other.example.com.", b"\x02" * 32, "hmac-sha256")
    core = DnsCore(ZoneStore(":memory:", ZONE, "ns.example.com.", 53, llq_port=5352), [KEY, other])
    server = LLQServer(core, random.Random(7).randbytes)
    client = make_client(tsig=Hooks())
    establish(server, client)
    [(_, event)] = server.changes(update(server, add="0 0 1 b.example.com."), T0)
    assert send(server, Hooks(other).sign(unsigned_ack_of(event), T0), T0) == []
    assert server.pending_events(client.llq_id) == 1


# ---- events larger than a datagram ----------------------------------------------------------------------


def test_a_large_change_is_split_over_several_events_that_each_fit() -> None:
    server = make(require_tsig=True)
    client = make_client(tsig=Hooks())
    establish(server, client)
    upd = dns.update.UpdateMessage(ZONE)
    for i in range(120):
        upd.add(QNAME, 300, "SRV", f"0 0 {4500 + i} device-{i:03d}.example.com.")
    upd.use_edns(0, options=[lease_opt(5400)])
    upd.use_tsig(KEY)
    with clock(T0 + 1):
        assert server.core.handle(upd.to_wire(max_size=65535), USRC, T0 + 1) is not None
    out = server.changes(server.core.last_changes, T0 + 1)
    assert len(out) > 1 and all(len(wire) <= UDP_PAYLOAD for _, wire in out)
    assert server.counters["event split"] == 1
    # the next change waits until every part is acked
    assert server.changes(update(server, add="0 0 1 late.example.com.", at=T0 + 2), T0 + 2) == []
    nxt: list[bytes] = []
    for _, wire in out:
        step = client.receive(wire, T0 + 3)
        [ack] = step.transmits
        nxt += send(server, ack.wire, T0 + 3)
    assert len(targets(client)) == 120
    [last] = nxt  # released by the last ack
    client.receive(last, T0 + 3)
    assert len(targets(client)) == 121


# ---- the client: truncated answers come over TCP; every request offers a real EDNS size --------------------


def tc(wire: bytes) -> bytes:
    """``wire`` as a server that could not fit it sends it: TC set, no answers."""
    msg = dns.message.from_wire(wire, keyring=False)
    msg.flags |= dns.flags.TC
    msg.answer = []
    return msg.to_wire()


def handshake_to_ack(client: ClientView) -> bytes:
    """The client's challenge response (the ACK's request)."""
    setup = client.start(0.0).wire
    [response] = client.receive(canned.reply(setup, LLQOption(1, LLQ_OP_SETUP, 0, canned.SERVER_ID, 7200)),
                                0.1).transmits
    return response.wire


def test_requests_offer_a_real_edns_size() -> None:
    client = canned.make_client()
    setup = client.start(0.0).wire
    sent = [setup]
    [response] = client.receive(canned.reply(setup, LLQOption(1, LLQ_OP_SETUP, 0, canned.SERVER_ID, 7200)),
                                0.1).transmits
    sent.append(response.wire)
    client.receive(canned.reply(response.wire, LLQOption(1, LLQ_OP_SETUP, 0, canned.SERVER_ID, 7200)), 0.2)
    due = client.deadline()
    assert due is not None
    [refresh] = client.poll(due).transmits
    sent.append(refresh.wire)
    fallback = canned.make_client(seed=2)
    fallback.start(0.0)
    [poll] = [t for at in (2.0, 6.0, 14.0) for t in fallback.poll(at).transmits][-1:]
    assert canned.llq_of(poll.wire) is None  # the fallback query: no LLQ option, but EDNS
    sent.append(poll.wire)
    for wire in sent:
        msg = dns.message.from_wire(wire)
        assert msg.edns == 0 and msg.payload == UDP_PAYLOAD == 1232


def test_a_truncated_ack_is_fetched_over_tcp_and_events_meanwhile_are_kept() -> None:
    client = canned.make_client()
    response = handshake_to_ack(client)
    out = client.receive(tc(canned.reply(response, LLQOption(1, LLQ_OP_SETUP, 0, canned.SERVER_ID, 7200))),
                         0.2)
    [fetch] = out.events
    assert isinstance(fetch, TcpQuery) and out.transmits == []  # no Established yet: no answers yet
    assert client.state == LLQState.ESTABLISHED
    query = dns.message.from_wire(fetch.payload)
    assert canned.llq_of(fetch.payload) is None and query.payload == UDP_PAYLOAD
    # an event before the whole answer: acked at once, applied after it
    out = client.receive(canned.event(canned.SERVER_ID, 7, (canned.srv("new.example."),)), 0.3)
    assert len(out.transmits) == 1 and out.events == []
    whole = canned.reply(fetch.payload, None, tuple(canned.srv(f"d{i}.example.") for i in range(3)))
    out = client.receive(whole, 0.4)
    kinds = [type(e) for e in out.events]
    assert kinds == [Added, Added, Established]  # the whole answer (one RRset), then the held event
    established = out.events[-1]
    assert isinstance(established, Established) and len(established.answers[0]) == 4
    assert client.counters["truncated answer fetched over TCP"] == 1


def test_an_unanswered_tcp_fetch_is_retried_then_falls_back() -> None:
    client = canned.make_client()
    response = handshake_to_ack(client)
    [fetch] = client.receive(tc(canned.reply(response, LLQOption(1, LLQ_OP_SETUP, 0, canned.SERVER_ID,
                                                                 7200))), 0.2).events
    assert isinstance(fetch, TcpQuery)
    assert client.deadline() == 0.2 + LLQ_TCP_TIMEOUT
    assert client.poll(10.2).events == [fetch]
    assert client.poll(20.2).events == [fetch]
    out = client.poll(30.2)
    assert [type(e) for e in out.events] == [Fallback]
    assert client.counters["no answer over TCP"] == 1
    assert client.state == LLQState.POLLING


def test_a_truncated_poll_answer_is_fetched_over_tcp() -> None:
    client = canned.make_client()
    setup = client.start(0.0).wire
    out = client.receive(tc(canned.reply(setup, None, (canned.srv("a.example."),))), 0.1)
    fetch = out.events[-1]
    assert [type(e) for e in out.events] == [Fallback, TcpQuery] and isinstance(fetch, TcpQuery)
    out = client.receive(canned.reply(fetch.payload, None, (canned.srv("a.example."),)), 0.2)
    assert [type(e) for e in out.events] == [Added]
    [poll] = client.poll(0.1 + 900).transmits
    out = client.receive(tc(canned.reply(poll.wire, None, ())), 901.0)
    [again] = out.events
    assert isinstance(again, TcpQuery)
    out = client.receive(canned.reply(again.payload, None, ()), 901.1)
    assert [type(e) for e in out.events] == [Removed]


# ---- an account of 100 devices: the real server core and the real watcher, in memory ----------------------

ACCOUNT = "fleet.example"
WATCHER_SRC = ("198.51.100.9", 40000)


def publish_devices(store: ZoneStore, count: int, now: float) -> None:
    changes: list[AddRR] = []
    for i in range(count):
        address = ipaddress.ip_address(f"192.0.2.{i % 250}")
        host = records.HostRecords.derive(f"dev{i:03d}", ACCOUNT, bytes([i % 256, i // 256]) + bytes(30),
                                          port=4500 + i, addresses=[address])
        changes += [AddRR(rrset.name, 300, rd) for rrset in records.build(host, 300) for rd in rrset]
    assert store.apply_update(changes, Lease(5400, 5400), now)


def exchange(watcher: Watcher, server: LLQServer, now: float) -> tuple[set[str], int, int]:
    """Carry everything between the watcher and the server until both are quiet (bounded): UDP through
    the LLQ server or the core, TcpQuery through the core with TCP's size. The peers learned, how many
    queries went over TCP, and the most setup requests sent at once."""
    core = server.core
    learned: set[str] = set()
    tcp = most = 0
    for _round in range(200):  # the watcher runs 32 handshakes at a time
        sent = [t.payload for t in watcher.transmits()]
        events = watcher.events()
        if not sent and not events:
            return learned, tcp, most
        challenges = server.counters["challenge sent"]
        for wire in sent:
            assert len(wire) <= UDP_PAYLOAD
            out = server.handle(wire, WATCHER_SRC, now)
            if out is None:  # not an LLQ message: the core's (UDP rules)
                reply = core.handle(wire, WATCHER_SRC, now)
                out = [] if reply is None else [(WATCHER_SRC, reply)]
            for dest, reply in out:
                assert dest == WATCHER_SRC and len(reply) <= UDP_PAYLOAD
                watcher.receive(reply, canned.SERVER, now)
        most = max(most, server.counters["challenge sent"] - challenges)  # setup requests in this round
        for event in events:
            if isinstance(event, TcpQuery):  # what the service does: the same core, over TCP
                tcp += 1
                reply = core.handle(event.payload, WATCHER_SRC, now, max_size=65535)
                assert reply is not None
                watcher.receive(reply, canned.SERVER, now)
            elif isinstance(event, PeerLearned):
                learned.add(event.host.name)
    raise AssertionError("the watcher and the server never went quiet")


def test_an_account_of_100_devices_is_learned_whole() -> None:
    """With 50 devices the browse answer no longer fit the LLQ's UDP ACK: it came truncated and empty,
    and the watcher learned no peer."""
    zone = dns.name.from_text(ACCOUNT)
    key = account_key(bytes(range(32)), ACCOUNT)
    core = DnsCore(ZoneStore(":memory:", zone, f"ns.{ACCOUNT}.", 53, llq_port=5352), [key])
    server = LLQServer(core, random.Random(7).randbytes)
    publish_devices(core.store, 100, T0)
    watcher = Watcher(ACCOUNT, "me", server=canned.SERVER, rand=random.Random(3).randbytes, key=key)
    watcher.start(T0)
    learned, tcp, most = exchange(watcher, server, T0)
    assert len(learned) == 100 == len(watcher.peers())
    assert most == MAX_HANDSHAKES == 32  # not some 300 setups in one burst
    assert tcp >= 1  # the browse answer did not fit a datagram
    assert len(server) == 1 + 5 * 100  # the browse PTR, and each device's AAAA, SRV, TXT, A and AAAA
    assert server.counters["table full"] == server.counters["address cap"] == 0
    # a 101st device arrives by an event (it fits a datagram), and is learned too
    publish_devices(core.store, 101, T0 + 1)
    browse = RRsetRemoval(records.browse_name(ACCOUNT), dns.rdatatype.PTR)  # which name changed
    for _dest, wire in server.changes([browse], T0 + 1):
        watcher.receive(wire, canned.SERVER, T0 + 1)
    learned, _tcp, _most = exchange(watcher, server, T0 + 1)
    assert learned == {"dev100"} and len(watcher.peers()) == 101
    # the network moved: every LLQ is set up again, 32 at a time, and nothing is lost meanwhile
    watcher.renew(T0 + 2)
    learned, tcp, most = exchange(watcher, server, T0 + 2)
    assert most == MAX_HANDSHAKES and tcp == 1 and len(watcher.peers()) == 101
    assert len(server) == 1 + 5 * 101 and server.counters["dropped: restarted by a new setup request"] == 506


def test_replies_to_two_requests_with_one_message_id_both_verify() -> None:
    """Hundreds of LLQs share one TSIG session on one socket: their random IDs meet (in the test above,
    one ACK in 500 was refused, and its question fell back to polling every 15 minutes)."""
    key = account_key(bytes(range(32)), ACCOUNT)
    session, server_keys = TsigSession(key), {key.name: key}
    first = dns.message.make_query("a.fleet.example.", "AAAA", id=77).to_wire()
    second = dns.message.make_query("b.fleet.example.", "AAAA", id=77).to_wire()
    signed = [session.sign(first, T0), session.sign(second, T0)]
    for request in signed:
        _key, tsig = check(request, server_keys, T0)
        reply = dns.message.make_response(dns.message.from_wire(request, keyring=False))
        reply.tsig = None
        wire, _mac = sign(reply.to_wire(), key, int(T0), tsig.mac)
        session.verify(wire, T0)  # raises if it is checked against the other request's MAC only


def test_a_burst_of_setups_is_saved_in_a_few_writes() -> None:
    """Each established LLQ is kept in the database; one disk sync per LLQ made 500 setups take seconds."""
    server = make()
    first = make_client()
    establish(server, first)
    assert server.saver.writes == 1 and len(server.core.store.llq_all()) == 1  # alone: written at once
    clients = [llq_client(f"h{i}.example.com.", "AAAA", rand=random.Random(i).randbytes) for i in range(50)]
    for client in clients:
        establish(server, client, T0 + 0.1)
    assert server.saver.writes == 1 and server.deadline() == T0 + SAVE_DELAY
    server.poll(T0 + SAVE_DELAY)
    assert server.saver.writes == 2
    assert {i for i, _state in server.core.store.llq_all()} == {first.llq_id} | {c.llq_id for c in clients}


# ---- the watching service against the real listeners, on loopback ---------------------------------------


def test_the_watching_service_fetches_a_truncated_answer_over_tcp() -> None:
    """The service makes the core's TcpQuery with trio and hands the reply back (serve-dns on loopback)."""
    secret = bytes(range(32))
    core = DnsCore(ZoneStore(":memory:", ACCOUNT + ".", f"ns.{ACCOUNT}.", 53), [account_key(secret, ACCOUNT)])
    publish_devices(core.store, 60, time.time())
    learned: set[str] = set()
    counters: dict[str, int] = {}

    def on_event(event: WatcherEvent) -> None:
        assert not isinstance(event, TcpQuery)  # the service's business, never the daemon's
        if isinstance(event, PeerLearned):
            learned.add(event.host.name)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _attempt in range(5):  # one port for UDP and TCP: find one free for both
                with trio.socket.socket() as probe:
                    await probe.bind(("127.0.0.1", 0))
                    port = probe.getsockname()[1]
                try:
                    await nursery.start(functools.partial(serve, core, "127.0.0.1", port,
                                                          llq=LLQServer(core)))
                    break
                except OSError:
                    continue
            key = derive_tsig_key(secret, ACCOUNT)
            service = WatcherService(("127.0.0.1", port), ACCOUNT, "me", key, on_event)
            await nursery.start(service.run)
            with trio.fail_after(20):
                while len(learned) < 60:
                    await trio.sleep(0.05)
            counters.update(service.watcher.state["counters"])
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert len(learned) == 60
    assert counters["truncated answer fetched over TCP"] >= 1
