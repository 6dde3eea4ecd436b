"""The watcher over DNS Push (its questions as subscriptions on one session) against the in-memory server
of test_push_client: hosts are learned as over LLQ; a lost connection and the resubscription give no
PeerGone for a host still there (the resync answer replaces the records as a whole); a host that left
meanwhile is gone; a server without Push sends every question to LLQ over UDP, and Push is taken up again
when it comes back; the status says which is used."""

from __future__ import annotations

import random

import dns.name
import dns.rdatatype
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_push_client import PUSH_SERVER, FakeServer, Q
from tests.unit.test_watcher import BOB_KEY, CAROL_KEY, DOMAIN, host, ptr
from tunneld.proto import records
from tunneld.proto.core import Transmit
from tunneld.proto.dso_wire import RCODE_DSOTYPENI, DsoMessage, PushRecord, Subscribe, decode
from tunneld.proto.llq import LLQClient
from tunneld.proto.push_client import PUSH_RETRY_INTERVAL, DropConnection, PushClient, is_dso
from tunneld.proto.watcher import PeerGone, PeerLearned, QueryStatus, TransportStatus, Watcher

LLQ_SERVER = ("192.0.2.53", 53)


def zone_of(*hosts: records.HostRecords) -> dict[Q, list[dns.rdata.Rdata]]:
    zone: dict[Q, list[dns.rdata.Rdata]] = {}
    for rrset in [ptr(*(h.name for h in hosts))] + [r for h in hosts for r in records.build(h, 300)]:
        zone.setdefault((rrset.name, dns.rdatatype.RdataType.make(rrset.rdtype)), []).extend(rrset)
    return zone


class Run:
    """A watcher with Push, its server, and what came out (LLQ datagrams kept apart)."""

    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.watcher = Watcher(DOMAIN, "alice", server=LLQ_SERVER, rand=random.Random(3).randbytes,
                               push=PUSH_SERVER)
        self.udp: list[Transmit] = []
        self.events: list[object] = []
        self.now = 1000.0

    def pump(self) -> list[object]:
        """Carry Push messages both ways until quiet; the events since the last pump."""
        for _ in range(200):
            sent = self.watcher.transmits()
            self.events += self.watcher.events()
            if not sent:
                break
            for t in sent:
                if t.destination != PUSH_SERVER:
                    self.udp.append(t)
                    continue
                for reply in self.server.handle(t.payload):
                    self.watcher.receive(reply, PUSH_SERVER, self.now)
        else:
            raise AssertionError("did not settle")
        out, self.events = self.events, []
        return out


def peers(events: list[object], kind: type) -> list[str]:
    return [e.host.name if isinstance(e, PeerLearned) else e.name  # type: ignore[attr-defined]
            for e in events if isinstance(e, kind)]


def started(*hosts: records.HostRecords) -> Run:
    run = Run(FakeServer(zone_of(*hosts)))
    run.watcher.start(run.now)
    return run


def test_hosts_are_learned_over_push() -> None:
    run = started(host())
    events = run.pump()
    assert peers(events, PeerLearned) == ["bob"]
    assert TransportStatus("push") in events
    assert run.udp == []  # no LLQ at all
    assert all(isinstance(w.client, PushClient) for w in run.watcher._watches.values())
    state = run.watcher.state
    assert state["transport"] == "push" and state["push"] == "up"
    assert state["hosts"]["bob"]["complete"]


def test_a_resubscription_after_a_lost_connection_gives_no_peer_gone() -> None:
    run = started(host())
    run.pump()
    run.watcher.push_lost(run.now, "reset by peer")
    events = run.pump()
    assert not peers(events, PeerGone)
    assert any(isinstance(e, QueryStatus) and e.status == "failed" for e in events)
    run.server.received.clear()
    run.now = run.watcher.deadline() or 0.0
    run.watcher.poll(run.now)
    events = run.pump()
    assert not peers(events, PeerGone) and not peers(events, PeerLearned)  # the same host: nothing
    subscribed = {(m.primary.name, m.primary.rtype) for m in run.server.received
                  if isinstance(m, DsoMessage) and isinstance(m.primary, Subscribe)}
    assert subscribed == set(run.watcher._watches)  # every question again
    assert run.watcher.state["hosts"]["bob"]["complete"]


def test_a_host_that_left_during_the_outage_is_gone_after_the_resync() -> None:
    run = started(host(), host("carol", CAROL_KEY))
    assert sorted(peers(run.pump(), PeerLearned)) == ["bob", "carol"]
    run.watcher.push_lost(run.now, "reset by peer")
    run.pump()
    run.server.zone = zone_of(host())  # carol withdrew her records meanwhile
    run.now = run.watcher.deadline() or 0.0
    run.watcher.poll(run.now)
    events = run.pump()
    assert peers(events, PeerGone) == ["carol"]
    assert [e.public_key for e in events if isinstance(e, PeerGone)] == [CAROL_KEY]


def test_pushes_after_the_resync_change_hosts() -> None:
    run = started(host())
    run.pump()
    gone = [PushRecord.delete_rrset(records.names_to_browse(DOMAIN)[0][0], dns.rdatatype.PTR)]
    run.watcher.receive(FakeServer.push(gone), PUSH_SERVER, run.now)
    events = run.pump()
    assert peers(events, PeerGone) == ["bob"]
    assert [e.public_key for e in events if isinstance(e, PeerGone)] == [BOB_KEY]


def test_a_server_without_push_sends_the_watcher_to_llq_and_push_comes_back() -> None:
    server = FakeServer(zone_of(host()), keepalive_rcode=RCODE_DSOTYPENI)
    run = Run(server)
    run.watcher.start(run.now)
    events = run.pump()
    assert TransportStatus("llq", "the server answered KEEPALIVE with DSOTYPENI") in events
    assert run.watcher.state["transport"] == "llq"
    watches = run.watcher._watches
    assert len(watches) == 1 and all(isinstance(w.client, LLQClient) for w in watches.values())
    assert len(run.udp) == 1 and not is_dso(run.udp[0].payload)  # the browse LLQ's SETUP, over UDP
    # Five minutes later Push is tried again; the server does it now: the questions move back.
    server.keepalive_rcode = 0
    run.now += PUSH_RETRY_INTERVAL
    assert run.watcher.deadline() is not None and run.watcher.deadline() <= run.now  # type: ignore[operator]
    run.watcher.poll(run.now)
    events = run.pump()
    assert TransportStatus("push") in events
    assert peers(events, PeerLearned) == ["bob"]
    assert all(isinstance(w.client, PushClient) for w in run.watcher._watches.values())
    assert run.watcher.state["transport"] == "push"


def test_a_refused_subscription_alone_falls_back_to_llq() -> None:
    run = started(host())
    run.server.subscribe_rcode = 5  # REFUSED (over the per-session limit, say)
    events = run.pump()
    assert any(isinstance(e, QueryStatus) and e.status == "fallback" for e in events)
    watches = run.watcher._watches
    assert all(isinstance(w.client, LLQClient) for w in watches.values())
    assert run.watcher.state["push"] == "up"  # the session itself is fine
    assert run.udp  # the LLQ SETUP left over UDP


def test_a_connection_that_cannot_be_made_falls_back_to_llq() -> None:
    run = started(host())
    run.watcher.transmits()  # the KEEPALIVE the port could not send
    run.watcher.push_lost(run.now, "TLS to 192.0.2.53 port 853: connection refused")
    events = run.pump()
    assert TransportStatus("llq", "TLS to 192.0.2.53 port 853: connection refused") in events
    assert not any(isinstance(e, DropConnection) for e in events)  # the port knows already
    assert all(isinstance(w.client, LLQClient) for w in run.watcher._watches.values())


def test_dso_messages_from_elsewhere_are_not_taken() -> None:
    run = started(host())
    run.pump()
    wire = FakeServer.push([PushRecord.delete_name(dns.name.from_text("bob." + DOMAIN))])
    run.watcher.receive(wire, ("198.51.100.1", 853), run.now)
    assert run.watcher.counters["not from the server"] == 1
    assert decode(wire).unidirectional


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=80), st.builds(
    lambda i, r, body: bytes([i >> 8, i & 0xFF, (r << 7) | 0x30, 0]) + bytes(8) + body,
    st.integers(0, 0xFFFF), st.integers(0, 1), st.binary(max_size=40))), max_size=5))
def test_the_watchers_receive_from_the_push_server_never_raises(messages: list[bytes]) -> None:
    """Garbage and near-DSO messages (OPCODE 6 headers, random TLVs) from the Push server: counted and
    dropped, or the connection given up on; never an exception, and bob stays learned."""
    run = started(host())
    run.pump()
    for wire in messages:
        run.watcher.receive(wire, PUSH_SERVER, run.now)
        run.watcher.poll(run.now)
    events = run.pump()
    assert not peers(events, PeerGone)
