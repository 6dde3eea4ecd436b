"""The watcher with host keys: each host's SSHFP and host-key TXT followed, verified keys in PeerLearned."""

from __future__ import annotations

import random

import dns.rdatatype
import dns.rrset

from tests.unit.dns_steps import WatcherView
from tests.unit.dns_steps import watcher as make_watcher
from tests.unit.test_watcher import BROWSE, DOMAIN, FakeFactory, by_question, deliver, host, ptr, publish
from tunneld.proto import hostkeys, records
from tunneld.proto.llq import Added, Removed
from tunneld.proto.watcher import PeerLearned, PeerRejected

KEY_A = hostkeys.read_public_key(
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl")
KEY_B = hostkeys.read_public_key(
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGRLtUGgOxQOmHsmDO2z9ulCgnNyJlGbBlfYvOaGyUu2")
OWNER = records.host_name(DOMAIN, "bob")


def setup() -> tuple[WatcherView, FakeFactory]:
    factory = FakeFactory()
    watcher = make_watcher(DOMAIN, "alice", rand=random.Random(1).randbytes, client_factory=factory,
                           host_keys=True)
    watcher.start(0.0)
    return watcher, factory


def key_events(watcher: WatcherView, factory: FakeFactory, rrsets: list[dns.rrset.RRset],
               removed: list[dns.rrset.RRset] = ()) -> list[object]:  # type: ignore[assignment]
    events: list[object] = []
    old = by_question(list(removed))
    new = by_question(rrsets)
    for question in hostkeys.names_to_watch(DOMAIN, "bob"):
        changes = [Removed(r) for r in old.get(question, [])] + [Added(r) for r in new.get(question, [])]
        if changes:
            events += deliver(watcher, factory, question, changes)[1]
    return events


def test_host_key_questions_are_watched_and_keys_learned() -> None:
    watcher, factory = setup()
    deliver(watcher, factory, BROWSE, [Added(ptr("bob"))])
    assert (OWNER, dns.rdatatype.SSHFP) in factory.live() and (OWNER, dns.rdatatype.TXT) in factory.live()
    rec = host()
    published = hostkeys.build(DOMAIN, "bob", [KEY_A], 60)
    assert key_events(watcher, factory, published) == []  # the host's own records are not there yet
    events = publish(watcher, factory, rec)
    assert events == [PeerLearned(rec, (KEY_A,))]


def test_rotated_key_is_learned_again_and_a_forged_txt_refused() -> None:
    watcher, factory = setup()
    deliver(watcher, factory, BROWSE, [Added(ptr("bob"))])
    old = hostkeys.build(DOMAIN, "bob", [KEY_A], 60)
    key_events(watcher, factory, old)
    assert publish(watcher, factory, host()) == [PeerLearned(host(), (KEY_A,))]
    new = hostkeys.build(DOMAIN, "bob", [KEY_B], 60)
    events = key_events(watcher, factory, new, removed=old)
    assert events[-1] == PeerLearned(host(), (KEY_B,))
    # A TXT key without its SSHFP: refused once, reported, the verified key stays. (The rotation above
    # may have been refused for a moment: its SSHFP and TXT arrive on two questions, one after the other.)
    refused_before = watcher.core.counters["host keys refused"]
    forged = dns.rrset.from_text(OWNER, 60, "IN", "TXT", f'"ssh={KEY_A.line}"')
    events = key_events(watcher, factory, [forged])
    assert len(events) == 1 and isinstance(events[0], PeerRejected)
    assert events[0].reason.startswith("hostkey fingerprint mismatch")
    assert watcher.core.counters["host keys refused"] == refused_before + 1
    assert watcher.core.peers() == [host()]
    assert key_events(watcher, factory, [forged]) == []  # the same refusal is not reported again


def test_without_host_keys_nothing_more_is_watched() -> None:
    factory = FakeFactory()
    watcher = make_watcher(DOMAIN, "alice", rand=random.Random(1).randbytes, client_factory=factory)
    watcher.start(0.0)
    deliver(watcher, factory, BROWSE, [Added(ptr("bob"))])
    assert (OWNER, dns.rdatatype.SSHFP) not in factory.live()
