"""Replays of signed UPDATEs: remembered with the zone (across restarts), for the request's own TSIG
window, in the update's own transaction, within a bound; requests asking for a fudge over 300 s refused."""

from __future__ import annotations

import struct
from pathlib import Path

import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.update
import pytest

from tunneld.dnsserver.core import DnsCore, account_key
from tunneld.dnsserver.replay import MAX_KEPT
from tunneld.dnsserver.store import ZoneStore
from tunneld.proto.tsig import BADTIME, find_tsig, sign, verify

DOMAIN = "example.com"
ZONE = dns.name.from_text(DOMAIN)
KEY = account_key(bytes(range(32)), DOMAIN)
T0 = 1_800_000_000
SRC = ("192.0.2.50", 5353)


def open_core(path: Path | str) -> DnsCore:
    return DnsCore(ZoneStore(str(path), ZONE, "ns.example.com.", 53), [KEY])


def signed_update(name: str, addr: str, at: int, *, fudge: int = 300, msg_id: int = 1,
                  prereq_absent: bool = False) -> bytes:
    """A signed UPDATE replacing ``name``'s AAAA with ``addr`` (5400 s lease), signed at ``at``."""
    upd = dns.update.UpdateMessage(ZONE, id=msg_id)
    upd.use_edns(0, options=[dns.edns.GenericOption(2, struct.pack("!I", 5400))])  # type: ignore[arg-type]
    if prereq_absent:
        upd.absent(name)
    upd.replace(name, 120, "AAAA", addr)
    return sign(upd.to_wire(), KEY, at, fudge=fudge)[0]


def rcode(reply: bytes | None, request: bytes, at: int) -> dns.rcode.Rcode:
    """The reply's rcode after checking its TSIG over the request's MAC, as the client does."""
    assert reply is not None
    tsig = find_tsig(request)
    assert tsig is not None
    verify(reply, KEY, tsig.mac, at)
    return dns.message.from_wire(reply, keyring=False).rcode()


def aaaa(core: DnsCore, name: str, at: float) -> set[str]:
    return {rr.rdata.to_text() for rr in core.store.rrset(dns.name.from_text(name, ZONE),
                                                          dns.rdatatype.AAAA, at)}


def test_a_signed_update_replayed_after_a_restart_changes_nothing(tmp_path: Path) -> None:
    """The issue's case: a device moved (fd00::1, then fd00::2), the server restarted, and a captured copy
    of the first update, still inside its TSIG window, put the stale AAAA back."""
    db = tmp_path / "zone.sqlite"
    core = open_core(db)
    old = signed_update("host", "fd00::1", T0)
    first = core.handle(old, SRC, T0)
    assert rcode(first, old, T0) == dns.rcode.NOERROR
    new = signed_update("host", "fd00::2", T0 + 10, msg_id=2)
    assert rcode(core.handle(new, SRC, T0 + 10), new, T0 + 10) == dns.rcode.NOERROR
    core.store.close()

    restarted = open_core(db)
    assert aaaa(restarted, "host", T0 + 20) == {"fd00::2"}
    again = restarted.handle(old, SRC, T0 + 20)
    assert again == first  # the reply that was sent, as to a client retransmitting after a lost reply
    assert aaaa(restarted, "host", T0 + 20) == {"fd00::2"}
    assert restarted.replays == 1


def test_a_copy_with_another_id_gets_the_reply_under_its_own_id(tmp_path: Path) -> None:
    """The TSIG MAC covers the Original ID, not the header's: a copy whose header ID was changed still
    verifies, is still a replay, and its reply carries the ID it was sent with."""
    core = open_core(tmp_path / "zone.sqlite")
    req = signed_update("host", "fd00::1", T0, msg_id=7)
    first = core.handle(req, SRC, T0)
    assert first is not None
    copy = struct.pack("!H", 8) + req[2:]
    again = core.handle(copy, SRC, T0 + 1)
    assert again is not None and again[:2] == copy[:2] and again[2:] == first[2:]
    assert rcode(again, copy, T0 + 1) == dns.rcode.NOERROR
    assert core.replays == 1


def test_the_window_is_the_requests_own_fudge(tmp_path: Path) -> None:
    """A request signed with a 10 s fudge can only be accepted until time signed + 10: it is forgotten
    after that, not after the server's 300 s. One signed with 300 s is kept to its last second."""
    core = open_core(tmp_path / "zone.sqlite")
    short = signed_update("a", "fd00::1", T0, fudge=10)
    long = signed_update("b", "fd00::2", T0, fudge=300, msg_id=2)
    core.handle(short, SRC, T0)
    core.handle(long, SRC, T0)
    assert len(core._answered) == 2
    core.store.expire(T0 + 10)  # the lease sweep: T0 + 10 is still inside the short window
    assert len(core._answered) == 2
    core.store.expire(T0 + 11)
    assert len(core._answered) == 1
    assert core.handle(long, SRC, T0 + 300) is not None and core.replays == 1
    core.store.expire(T0 + 301)
    assert len(core._answered) == 0


def test_expired_entries_also_go_lazily(tmp_path: Path) -> None:
    core = open_core(tmp_path / "zone.sqlite")
    for i in range(5):
        core.handle(signed_update(f"h{i}", "fd00::1", T0 + i, msg_id=i), SRC, T0 + i)
    assert len(core._answered) == 5
    core.handle(signed_update("later", "fd00::1", T0 + 1000, msg_id=9), SRC, T0 + 1000)
    assert len(core._answered) == 1


@pytest.mark.parametrize("fudge", [301, 0xFFFF])
def test_a_fudge_over_300_s_is_refused_with_badtime(tmp_path: Path, fudge: int) -> None:
    """RFC 8945 §5.2.3: a request outside the time window the server accepts gets BADTIME, signed. A
    fudge over 300 s would stretch the window (and the replay memory) up to 18 hours."""
    core = open_core(tmp_path / "zone.sqlite")
    req = signed_update("host", "fd00::1", T0, fudge=fudge)
    reply = core.handle(req, SRC, T0)
    assert reply is not None
    assert dns.message.from_wire(reply, keyring=False).rcode() == dns.rcode.NOTAUTH
    tsig = find_tsig(reply)
    assert tsig is not None and tsig.error == BADTIME and tsig.mac  # signed
    assert aaaa(core, "host", T0) == set()
    assert len(core._answered) == 0
    ok = signed_update("host", "fd00::1", T0, fudge=300, msg_id=2)
    assert rcode(core.handle(ok, SRC, T0), ok, T0) == dns.rcode.NOERROR


def test_a_refused_update_replayed_later_still_changes_nothing(tmp_path: Path) -> None:
    """A conditional update refused (the name was in use) must not apply when replayed after the name
    was freed: its reply is remembered too."""
    core = open_core(tmp_path / "zone.sqlite")
    core.handle(signed_update("host", "fd00::1", T0, msg_id=1), SRC, T0)
    cond = signed_update("host", "fd00::9", T0 + 1, msg_id=2, prereq_absent=True)
    first = core.handle(cond, SRC, T0 + 1)
    assert rcode(first, cond, T0 + 1) == dns.rcode.YXDOMAIN
    delete = dns.update.UpdateMessage(ZONE, id=3)
    delete.delete("host")
    wire = sign(delete.to_wire(), KEY, T0 + 2)[0]
    assert rcode(core.handle(wire, SRC, T0 + 2), wire, T0 + 2) == dns.rcode.NOERROR
    assert core.handle(cond, SRC, T0 + 3) == first
    assert aaaa(core, "host", T0 + 3) == set()


def test_an_update_is_never_applied_without_being_remembered(tmp_path: Path) -> None:
    """The replay entry is written in the update's own transaction: if recording it fails (here a
    trigger stands for a crash at that moment), the update is rolled back and answered SERVFAIL."""
    core = open_core(tmp_path / "zone.sqlite")
    core.store._db.execute(
        "CREATE TEMP TRIGGER crash BEFORE INSERT ON main.replays BEGIN SELECT RAISE(ABORT, 'crash'); END")
    req = signed_update("host", "fd00::1", T0)
    assert rcode(core.handle(req, SRC, T0), req, T0) == dns.rcode.SERVFAIL
    assert aaaa(core, "host", T0) == set()
    core.store._db.execute("DROP TRIGGER crash")
    # Nothing was remembered either, so the client's retransmission is applied now.
    assert rcode(core.handle(req, SRC, T0 + 1), req, T0 + 1) == dns.rcode.NOERROR
    assert aaaa(core, "host", T0 + 1) == {"fd00::1"}


def test_the_table_is_bounded_and_forgets_the_oldest(tmp_path: Path) -> None:
    core = open_core(tmp_path / "zone.sqlite")
    core._answered.kept = 3
    wires = [signed_update(f"h{i}", "fd00::1", T0, msg_id=i) for i in range(5)]
    replies = [core.handle(w, SRC, T0) for w in wires]
    assert len(core._answered) == 3
    assert core.handle(wires[4], SRC, T0 + 1) == replies[4]  # the newest are remembered
    assert core.handle(wires[2], SRC, T0 + 1) == replies[2]
    assert core.replays == 2
    forgotten = core.handle(wires[0], SRC, T0 + 1)  # the oldest went: applied again, a new reply
    assert forgotten != replies[0] and rcode(forgotten, wires[0], T0 + 1) == dns.rcode.NOERROR
    assert core.replays == 2 and len(core._answered) == 3
    core.store.close()
    assert MAX_KEPT >= 10_000  # the real bound leaves room for a large account's updates in a window
