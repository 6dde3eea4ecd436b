"""The LLQ server under hostile traffic: replayed signed requests, half-open LLQs that never complete, one
source or one key trying to take the table, and unsigned acks (as Apple's mDNSResponder sends them)."""

from __future__ import annotations

import random

import dns.flags
import dns.message
import dns.tsig
import dns.update

from tests.unit.dns_steps import llq_client
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
from tunneld.dnsserver.core import DnsCore
from tunneld.dnsserver.llq import LLQServer
from tunneld.dnsserver.store import ZoneStore
from tunneld.proto.llq_wire import LLQ_ERR_NO_ERROR, LLQ_ERR_SERV_FULL, LLQ_OP_EVENT, UDP_PAYLOAD

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
