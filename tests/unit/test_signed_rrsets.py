"""Signed replies carrying RRsets of several records verify at the client, every time.

dnspython shuffles the records of an RRset each time it renders a message (round-robin), so a server that
renders a reply once to sign it and again to send it sends bytes that are not the bytes it signed: with two
records half of its answers fail verification, with ten nearly all. These tests ask 1000 times, with
RRsets of 2 to 10 records, for query answers and for LLQ events, and verify every reply twice: with our
own TSIG code and with dnspython's ``from_wire(keyring=...)`` (an independent implementation). Both
verifiers check the time against the real clock, so the server is given the real time too.
"""

from __future__ import annotations

import ipaddress
import random
import time

import dns.message
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.tsig

from tunneld.dnsserver.core import DnsCore, account_key
from tunneld.dnsserver.llq import LLQServer
from tunneld.dnsserver.store import AddRR, DeleteRR, Lease, ZoneStore
from tunneld.proto.llq import LLQ_OP_EVENT, LLQ_OP_SETUP, LLQ_VERSION, LLQOption
from tunneld.proto.tsig import sign, verify

DOMAIN = "example.com"
ZONE = dns.name.from_text(DOMAIN)
SECRET = bytes(range(32))
OUR_KEY = account_key(SECRET, DOMAIN)
KEY = OUR_KEY.dnspython()  # the same key, for the independent verifier
SRC = ("198.51.100.9", 40000)
ROUNDS = 1000
LEASE = Lease(7200, 7200)


def make_core() -> DnsCore:
    return DnsCore(ZoneStore(":memory:", ZONE, "ns.example.com.", 53, llq_port=5352), [KEY])


def addresses(n: int, base: int = 0) -> list[dns.rdata.Rdata]:
    return [dns.rdata.from_text("IN", "A", str(ipaddress.IPv4Address(0xC0000200 + base + i)))
            for i in range(n)]


def signed_query(qname: dns.name.Name, rdtype: dns.rdatatype.RdataType, now: float,
                 option: LLQOption | None = None) -> tuple[bytes, bytes]:
    """A query signed by our client code at ``now``: (wire, its MAC)."""
    msg = dns.message.make_query(qname, rdtype, id=random.getrandbits(16))
    if option is not None:
        msg.use_edns(0, payload=1440, options=[option])
    return sign(msg.to_wire(), OUR_KEY, int(now))


def verified(wire: bytes, request_mac: bytes) -> tuple[bool, bool]:
    """(ours, dnspython's): whether each verifier accepts ``wire`` as signed over ``request_mac``."""
    try:
        verify(wire, OUR_KEY, request_mac, time.time())
        ours = True
    except Exception:
        ours = False
    try:
        theirs = dns.message.from_wire(wire, keyring=KEY, request_mac=request_mac).had_tsig
    except dns.tsig.BadSignature:
        theirs = False
    return ours, theirs


def test_signed_answers_with_many_records_verify_every_time() -> None:
    core = make_core()
    now = time.time()
    names = {n: dns.name.from_text(f"n{n}", ZONE) for n in range(2, 11)}
    core.store.apply_update([AddRR(names[n], 60, rd) for n in names for rd in addresses(n, 16 * n)],
                            LEASE, now)
    ours = theirs = 0
    for i in range(ROUNDS):
        n = 2 + i % 9
        now = time.time()
        query, mac = signed_query(names[n], dns.rdatatype.A, now)
        reply = core.handle(query, SRC, now)
        assert reply is not None
        parsed = dns.message.from_wire(reply, keyring=False)
        assert len(parsed.answer) == 1 and len(parsed.answer[0]) == n
        ok_ours, ok_theirs = verified(reply, mac)
        ours += ok_ours
        theirs += ok_theirs
    print(f"signed answers verified: ours {ours}/{ROUNDS}, dnspython {theirs}/{ROUNDS}")
    assert (ours, theirs) == (ROUNDS, ROUNDS)


def test_signed_llq_acks_and_events_with_many_records_verify_every_time() -> None:
    core = make_core()
    server = LLQServer(core, random.Random(3).randbytes)
    qname = dns.name.from_text("watched", ZONE)
    now = time.time()
    core.store.apply_update([AddRR(qname, 60, rd) for rd in addresses(3, 200)], LEASE, now)
    # The handshake (its ACK carries the 3 records): setup, challenge, challenge response, ACK.
    setup, mac = signed_query(qname, dns.rdatatype.A, now, LLQOption(LLQ_VERSION, LLQ_OP_SETUP, 0, 0, 7200))
    [(_, challenge)] = server.handle(setup, SRC, now) or []
    assert verified(challenge, mac) == (True, True)
    granted = dns.message.from_wire(challenge, keyring=False).options[0]
    assert isinstance(granted, LLQOption)
    llq_id = granted.llq_id
    response, mac = signed_query(qname, dns.rdatatype.A, now,
                                 LLQOption(LLQ_VERSION, LLQ_OP_SETUP, 0, llq_id, granted.lease))
    [(_, ack)] = server.handle(response, SRC, now) or []
    assert verified(ack, mac) == (True, True)
    assert len(dns.message.from_wire(ack, keyring=False).answer[0]) == 3

    ours = theirs = 0
    held: list[dns.rdata.Rdata] = []
    for i in range(ROUNDS):
        n = 2 + i % 9
        now = time.time()
        if held:  # remove what the last event added: a removal event of len(held) records
            changes: list[AddRR | DeleteRR] = [DeleteRR(qname, rd) for rd in held]
            held = []
        else:
            held = addresses(n, 16 * (i % 11))
            changes = [AddRR(qname, 60, rd) for rd in held]
        core.store.apply_update(changes, LEASE, now)
        [(_, event)] = server.changes(changes, now)
        msg = dns.message.from_wire(event, keyring=False)
        option = msg.options[0]
        assert isinstance(option, LLQOption) and option.opcode == LLQ_OP_EVENT
        assert sum(len(rrset) for rrset in msg.answer) == len(changes) >= 2
        ok_ours, ok_theirs = verified(event, b"")  # unsolicited: signed without a request MAC
        ours += ok_ours
        theirs += ok_theirs
        # Acknowledge it (a response with the event's ID and its option), so the next event may leave.
        ack_msg = dns.message.make_response(dns.message.make_query(qname, dns.rdatatype.A, id=msg.id))
        ack_msg.use_edns(0, payload=1440, options=[option])
        ack_wire, _ = sign(ack_msg.to_wire(), OUR_KEY, int(now))
        assert server.handle(ack_wire, SRC, now) == []
    print(f"signed LLQ events verified: ours {ours}/{ROUNDS}, dnspython {theirs}/{ROUNDS}")
    assert (ours, theirs) == (ROUNDS, ROUNDS)
