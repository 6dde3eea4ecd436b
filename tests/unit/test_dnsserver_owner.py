"""One front per zone: the lease-owner claim on the primary (RFC 2136 prerequisites), refused clearly for a
second front, taken over on request (records without a lease adopted), lost while serving (no more
forwards nor deletions), and the owner name closed to device updates.

The primary is a memory fake on dnspython: it verifies the front key's TSIG, evaluates the prerequisites
of RFC 2136 §3.2 on the owner's TXT RRset, applies the update section and signs its answers itself.
"""

from __future__ import annotations

import base64
import functools
import itertools
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from unittest import mock

import dns.edns
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.update
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunneld.dnsserver import owner as owner_module
from tunneld.dnsserver.core import DnsCore, Policy, account_key
from tunneld.dnsserver.front import Front
from tunneld.dnsserver.owner import (
    OWNER_META,
    ClaimFailed,
    LeaseOwner,
    OwnerConflict,
    claim,
    describe,
    owner_name,
    read_claims,
    reserved,
    watching,
)
from tunneld.dnsserver.serve import serve
from tunneld.dnsserver.store import AddRR, Lease, ZoneStore, canonical
from tunneld.proto.dnsframe import FrameBuffer, frame
from tunneld.proto.errors import ParseError
from tunneld.proto.tsig import TsigKey
from tunneld.proto.xfr import Full, ZoneRecord

from .test_dnsserver_tcp import free_port

DOMAIN = "example.com"
ZONE = dns.name.from_text(DOMAIN)
SECRET = bytes(range(32))
ACCOUNT = account_key(SECRET, DOMAIN).dnspython()
FRONT = TsigKey(dns.name.from_text("front.example.com."), bytes(range(100, 132)))
OWNER = owner_name(ZONE)
HOST = dns.name.from_text("host", ZONE)
T0 = 1_800_000_000


@contextmanager
def clock(at: float) -> Iterator[None]:
    with mock.patch("time.time", return_value=at):
        yield


def counter_rand(start: int = 0x1000) -> Any:
    ids = itertools.count(start)
    return lambda n: next(ids).to_bytes(n, "big")


class ClaimPrimary:
    """The owner name's TXT RRset of a primary, changed only as RFC 2136 says."""

    def __init__(self) -> None:
        self.txt: list[dns.rdata.Rdata] = []
        self.updates = 0
        self.queries = 0

    def answer(self, wire: bytes, at: float | None = None) -> bytes:
        with clock(at if at is not None else time.time()):
            msg = dns.message.from_wire(wire, keyring={FRONT.name: FRONT.dnspython()})
            resp = dns.message.make_response(msg)
            if isinstance(msg, dns.update.UpdateMessage):
                self.updates += 1
                resp.set_rcode(self._update(msg))
            else:
                self.queries += 1
                q = msg.question[0]
                assert (q.name, q.rdtype) == (OWNER, dns.rdatatype.TXT)
                if self.txt:
                    rrset = resp.find_rrset(resp.answer, OWNER, dns.rdataclass.IN, dns.rdatatype.TXT,
                                            create=True)
                    for rd in self.txt:
                        rrset.add(rd, 60)
                else:
                    resp.set_rcode(dns.rcode.NXDOMAIN)
                resp.flags |= dns.flags.AA
            return resp.to_wire()

    def _update(self, msg: dns.update.UpdateMessage) -> dns.rcode.Rcode:
        wanted: set[dns.rdata.Rdata] = set()
        for rrset in msg.prerequisite:
            assert rrset.name == OWNER and rrset.rdtype == dns.rdatatype.TXT
            if rrset.deleting == dns.rdataclass.NONE and self.txt:  # RRset does not exist
                return dns.rcode.YXRRSET
            if rrset.deleting == dns.rdataclass.ANY and not self.txt:  # RRset exists
                return dns.rcode.NXRRSET
            if rrset.deleting is None:
                wanted.update(rrset)
        if wanted and wanted != set(self.txt):  # RRset exists (value dependent)
            return dns.rcode.NXRRSET
        for rrset in msg.update:
            if rrset.deleting == dns.rdataclass.ANY:
                self.txt = []
            elif rrset.deleting is None:
                self.txt.extend(rd for rd in rrset if rd not in self.txt)
        return dns.rcode.NOERROR


def store() -> ZoneStore:
    return ZoneStore(":memory:", ZONE, "ns.example.com.", 53)


def owner(s: ZoneStore, host: str = "alpha", take_over: bool = False, start: int = 0x1000) -> LeaseOwner:
    return LeaseOwner(s, FRONT, host=host, take_over=take_over, rand=counter_rand(start))


def run_claim(o: LeaseOwner, primary: ClaimPrimary) -> None:
    async def exchange(forward: Any) -> bytes | None:
        return primary.answer(forward.wire, T0)

    trio.run(claim, o, exchange, lambda: float(T0))


# ---- the claim -----------------------------------------------------------------------------------------


def test_a_first_claim_writes_our_id_and_a_restart_claims_it_again_without_a_change() -> None:
    primary, s = ClaimPrimary(), store()
    first = owner(s)
    run_claim(first, primary)
    assert first.claimed and primary.txt == [first.claim]
    assert describe(first.claim).startswith("front id ") and describe(first.claim).endswith("on host alpha")
    assert s.meta(OWNER_META) == first.claim.to_text()
    again = owner(s, host="renamed", start=0x9000)  # the same store: the same claim, whatever the host now
    assert again.claim == first.claim
    run_claim(again, primary)
    assert again.claimed and primary.txt == [first.claim] and primary.updates == 2


def test_a_second_front_is_refused_with_one_line_naming_the_zone_the_owner_and_the_fix() -> None:
    primary = ClaimPrimary()
    first = owner(store())
    run_claim(first, primary)
    second = owner(store(), host="beta", start=0x5000)
    with pytest.raises(OwnerConflict) as e:
        run_claim(second, primary)
    line = str(e.value)
    assert "\n" not in line and "example.com." in line and describe(first.claim) in line
    assert "stop that front" in line and "--take-over" in line
    assert primary.txt == [first.claim] and not second.claimed  # the first claim stands


def test_two_fronts_with_the_same_saved_claim_race_only_one_primary_state() -> None:
    """A claim is decided by the primary, not the front: a front whose saved claim was replaced is refused."""
    primary, s = ClaimPrimary(), store()
    run_claim(owner(s), primary)
    taker = owner(store(), host="beta", take_over=True, start=0x5000)
    run_claim(taker, primary)
    assert primary.txt == [taker.claim]
    with pytest.raises(OwnerConflict, match=r"front id \w+ on host beta"):
        run_claim(owner(s), primary)  # the first front restarted: its saved claim is no longer there


def test_a_primary_that_lost_the_claim_is_claimed_afresh() -> None:
    primary, s = ClaimPrimary(), store()
    run_claim(owner(s), primary)
    primary.txt = []  # e.g. the zone made anew on the primary
    again = owner(s)
    run_claim(again, primary)
    assert again.claimed and primary.txt == [again.claim] and primary.queries == 1


@pytest.mark.parametrize("answer", ["none", "refused", "garbage"])
def test_a_claim_not_taken_fails_with_the_reason(answer: str) -> None:
    o = owner(store())

    async def exchange(forward: Any) -> bytes | None:
        if answer == "none":
            return None
        if answer == "garbage":
            return b"\x00" * 5
        with clock(T0):
            msg = dns.message.from_wire(forward.wire, keyring={FRONT.name: FRONT.dnspython()})
            resp = dns.message.make_response(msg)
            resp.set_rcode(dns.rcode.REFUSED)
            return resp.to_wire()

    with pytest.raises(ClaimFailed, match={"none": "no answer", "refused": "REFUSED",
                                           "garbage": "bad answer"}[answer]):
        trio.run(claim, o, exchange, lambda: float(T0))
    assert not o.claimed


def test_read_claims_checks_id_and_tsig() -> None:
    primary = ClaimPrimary()
    o = owner(store())
    run_claim(o, primary)
    from tunneld.dnsserver.owner import claim_query
    q = claim_query(ZONE, 7, FRONT, T0)
    good = primary.answer(q.wire, T0)
    assert read_claims(good, q, ZONE, FRONT, T0) == [o.claim]
    other = TsigKey(FRONT.name, bytes(32))
    for bad in (good[:1] + bytes([good[1] ^ 1]) + good[2:], good[:-3], b"\x00"):
        with pytest.raises(ParseError):
            read_claims(bad, q, ZONE, FRONT, T0)
    with pytest.raises(ParseError):
        read_claims(good, q, ZONE, other, T0)


# ---- while serving, and the take-over ----------------------------------------------------------------


def replicate(s: ZoneStore, txt: list[dns.rdata.Rdata]) -> None:
    """What the change feed does when a transfer brings the owner's TXT RRset: the replica holds it."""
    def put(db: Any) -> bool:
        db.execute("DELETE FROM records WHERE owner=?", (OWNER.to_text(),))
        for rd in txt:
            db.execute("INSERT INTO records VALUES (?, ?, ?, 60, NULL)",
                       (OWNER.to_text(), dns.rdatatype.TXT, rd.to_digestable(ZONE)))
        return True
    s.replica_apply(put)


def test_the_feed_showing_another_claim_makes_the_front_stand_down_once(
        caplog: pytest.LogCaptureFixture) -> None:
    primary, s = ClaimPrimary(), store()
    o = owner(s)
    run_claim(o, primary)
    replicate(s, [o.claim])
    delivered: list[object] = []

    async def deliver(changes: Any, now: float) -> None:
        delivered.append(changes)

    checked = watching(o, deliver)
    trio.run(checked, [], float(T0))
    assert not o.lost
    taker = owner(store(), host="beta", take_over=True, start=0x5000)
    replicate(s, [taker.claim])
    trio.run(checked, [], float(T0))
    trio.run(checked, [], float(T0))
    assert o.lost and len(delivered) == 3  # the changes still reach the watchers
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "host beta" in errors[0].getMessage() and o.counters["claim lost"] == 1


def test_take_over_adopts_records_without_a_lease_and_leaves_the_rest() -> None:
    s = store()
    leased = dns.rdata.from_text("IN", "AAAA", "fd00::1")
    s.apply_update([AddRR(HOST, 60, leased)], Lease(600, 600), T0)
    claim_txt = dns.rdata.from_text("IN", "TXT", '"id=0" "host=gone"')
    replicate(s, [claim_txt])
    rr = functools.partial(dns.rdata.from_text, "IN")
    zone_data = [  # (owner, type, rdata) on the primary, all held by the replica without a lease
        ("old", "A", "192.0.2.9"),  # the other front's device record: adopted
        ("@", "MX", "10 mail.example.com."),  # the apex: the zone's own
        ("@", "NS", "ns2.example.com."), ("ns2", "A", "192.0.2.3"),  # a secondary and its glue
        ("sub", "NS", "ns.elsewhere.example."),  # a delegation
    ]
    records = [ZoneRecord(dns.name.from_text(o, ZONE), 60, rr(t, d)) for o, t, d in zone_data]

    def orphans(db: Any) -> bool:
        for rec in records:
            if rec.rdtype != dns.rdatatype.NS or rec.owner != ZONE:
                db.execute("INSERT INTO records VALUES (?, ?, ?, 60, NULL)",
                           (canonical(rec.owner), rec.rdtype, rec.rdata.to_digestable(ZONE)))
        return True

    s.replica_apply(orphans)
    everything = (*records, ZoneRecord(HOST, 60, leased), ZoneRecord(OWNER, 60, claim_txt))
    soa = ZoneRecord(ZONE, 60, rr("SOA", "ns1.example.com. h.example.com. 5 60 60 3600 60"))
    o = owner(s, take_over=True)
    assert o.adopt(Full(soa, everything), T0 + 10, 7200) == 1
    assert s.lease_expiry(records[0].owner, dns.rdatatype.A, records[0].rdata) == T0 + 10 + 7200
    for rec in records[1:]:
        assert s.lease_expiry(rec.owner, rec.rdtype, rec.rdata) is None, rec
    assert s.lease_expiry(HOST, dns.rdatatype.AAAA, leased) == T0 + 600  # its own lease stays
    assert s.lease_expiry(OWNER, dns.rdatatype.TXT, claim_txt) is None  # the claim is never a device's
    assert o.adopt(None, T0, 7200) == 0 and o.counters["adoption: no zone transfer"] == 1


def test_device_updates_may_not_touch_the_owner_name_nor_anything_under_tunneld() -> None:
    core = DnsCore(store(), [ACCOUNT], Policy(min_lease=1))
    assert reserved(OWNER, ZONE) and reserved(dns.name.from_text("x._tunneld", ZONE), ZONE)
    assert not reserved(dns.name.from_text("_tunnel._udp", ZONE), ZONE) and not reserved(HOST, ZONE)
    for build in (lambda u: u.add(OWNER, 60, "TXT", '"id=1"'), lambda u: u.delete(OWNER),
                  lambda u: u.add(dns.name.from_text("a._tunneld", ZONE), 60, "A", "192.0.2.1")):
        upd = dns.update.UpdateMessage(ZONE)
        build(upd)
        upd.use_edns(0, options=[dns.edns.GenericOption(2, struct.pack("!I", 600))])  # type: ignore[arg-type]
        upd.use_tsig(ACCOUNT)
        with clock(T0):
            wire = upd.to_wire()
        out = core.prepare(wire, ("192.0.2.50", 5353), T0)
        assert isinstance(out, bytes)
        with clock(T0):
            reply = dns.message.from_wire(out, keyring={ACCOUNT.name: ACCOUNT}, request_mac=upd.mac)
        assert reply.rcode() == dns.rcode.REFUSED


# ---- through the listeners ----------------------------------------------------------------------------


class TcpPrimary(ClaimPrimary):
    """The claim primary over TCP; device forwards (any other UPDATE) are counted and answered NOERROR,
    the change feed's SOA queries REFUSED."""

    def __init__(self) -> None:
        super().__init__()
        self.forwards = 0

    async def handler(self, stream: trio.SocketStream) -> None:
        frames = FrameBuffer()
        async with stream:
            while data := await stream.receive_some(65535):
                frames.feed(data)
                while (wire := frames.next()) is not None:
                    msg = dns.message.from_wire(wire, keyring={FRONT.name: FRONT.dnspython()})
                    touches_owner = any(r.name == OWNER for r in (*msg.question, *msg.answer, *msg.authority))
                    if touches_owner or (msg.question and msg.question[0].name == OWNER):
                        await stream.send_all(frame(self.answer(wire)))
                        continue
                    resp = dns.message.make_response(msg)
                    if isinstance(msg, dns.update.UpdateMessage):
                        self.forwards += 1
                    else:
                        resp.set_rcode(dns.rcode.REFUSED)
                    await stream.send_all(frame(resp.to_wire()))


async def _start(nursery: trio.Nursery, primary: TcpPrimary, s: ZoneStore, o: LeaseOwner,
                 down_at: int | None = None) -> int:
    """serve-dns's front for ``primary`` (``down_at``: a port where no primary listens yet)."""
    primary_port = down_at
    if primary_port is None:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, primary.handler, 0,
                                                          host="127.0.0.1"))
        primary_port = listeners[0].socket.getsockname()[1]
    core = DnsCore(s, [ACCOUNT], Policy(min_lease=1))
    front = Front(s, FRONT, ("127.0.0.1", primary_port))
    for _ in range(5):
        port = free_port()
        try:
            await nursery.start(functools.partial(serve, core, "127.0.0.1", port, front=front, owner=o))
        except OSError:
            continue
        return port
    raise AssertionError("could not bind")


async def _update(port: int, addr: str, lease: int = 3600) -> dns.message.Message:
    upd = dns.update.UpdateMessage(ZONE)
    upd.add(HOST, 60, "AAAA", addr)
    upd.use_edns(0, options=[dns.edns.GenericOption(2, struct.pack("!I", lease))])  # type: ignore[arg-type]
    upd.use_tsig(ACCOUNT)
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        await sock.connect(("127.0.0.1", port))
        await sock.send(upd.to_wire())
        reply = await sock.recv(65535)
    return dns.message.from_wire(reply, keyring={ACCOUNT.name: ACCOUNT}, request_mac=upd.mac)


def test_serve_claims_first_and_a_front_that_lost_its_claim_forwards_and_deletes_nothing() -> None:
    async def main() -> None:
        primary, s = TcpPrimary(), store()
        o = owner(s)
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                port = await _start(nursery, primary, s, o)
                assert o.claimed and primary.txt == [o.claim]  # before the listeners were ready
                assert (await _update(port, "fd00::1", lease=1)).rcode() == dns.rcode.NOERROR
                assert primary.forwards == 1
                replicate(s, [dns.rdata.from_text("IN", "TXT", '"id=ff" "host=beta"')])
                assert not o.check(time.time()) and o.lost
                assert (await _update(port, "fd00::2")).rcode() == dns.rcode.SERVFAIL
                # A negative: the 1 s lease of fd00::1 ends, and no deletion may reach the primary.
                await trio.sleep(1.5)
                assert primary.forwards == 1 and o.counters["update refused: not the lease owner"] == 1
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_front_whose_primary_is_down_at_start_serves_refusing_updates_and_claims_once_it_answers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(owner_module, "CLAIM_RETRY_FIRST", 0.1)

    async def main() -> None:
        primary, s = TcpPrimary(), store()
        o = owner(s)
        down = free_port()
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                port = await _start(nursery, primary, s, o, down_at=down)
                assert not o.claimed and not o.serving  # started all the same
                assert (await _update(port, "fd00::1")).rcode() == dns.rcode.SERVFAIL
                assert o.counters["update refused: the claim not answered yet"] == 1 and primary.forwards == 0
                assert o.check(time.time()) and not o.lost  # a feed delivery before the claim loses nothing
                await nursery.start(functools.partial(trio.serve_tcp, primary.handler, down,
                                                      host="127.0.0.1"))
                while not o.claimed:  # asked again with the backoff (bounded by fail_after)
                    await trio.sleep(0.05)
                assert primary.txt == [o.claim] and o.serving
                assert (await _update(port, "fd00::2")).rcode() == dns.rcode.NOERROR
                assert primary.forwards == 1
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_serve_refuses_to_start_when_another_front_owns_the_zone() -> None:
    async def main() -> None:
        primary = TcpPrimary()
        primary.txt = [dns.rdata.from_text("IN", "TXT", '"id=0000000000005000" "host=beta"')]
        s = store()
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                with pytest.raises(OwnerConflict, match="front id 0000000000005000 on host beta"):
                    await _start(nursery, primary, s, owner(s))
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_failed_prerequisite_with_our_own_claim_there_is_ours() -> None:
    """A primary that compares TXT prerequisites in its own way: what it holds decides."""
    primary, s = ClaimPrimary(), store()
    o = owner(s)
    run_claim(o, primary)
    strict = ClaimPrimary()
    strict.txt = list(primary.txt)
    strict._update = lambda msg: dns.rcode.NXRRSET  # type: ignore[method-assign]
    again = owner(s)
    run_claim(again, strict)
    assert again.claimed and strict.queries == 1 and again.counters["claimed (held already)"] == 1


# ---- serve-dns: the owner handed to the server, and its refusals as exit codes -------------------------


class _Served(Exception):
    """The fake serve's way out of serve-dns once started."""


def _serve_dns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *extra: str,
               raises: BaseException | None = None) -> tuple[int, dict[str, Any]]:
    import tunneld.dnsserver.serve
    from tunneld.cli import main, tsig_stanza

    seen: dict[str, Any] = {}

    async def fake(*args: object, owner: Any = None, task_status: Any = trio.TASK_STATUS_IGNORED,
                   **kwargs: object) -> None:
        seen["owner"] = owner
        if raises is not None:
            raise raises  # before readiness, as the claim does
        task_status.started()
        raise _Served

    monkeypatch.setattr(tunneld.dnsserver.serve, "serve", fake)
    secret = tmp_path / "secret"
    secret.write_text(base64.b64encode(bytes(32)).decode() + "\n")
    secret.chmod(0o600)
    key = tmp_path / "front.key"
    key.write_text(tsig_stanza(f"front.{DOMAIN}", bytes(range(100, 132))))
    argv = ["serve-dns", "--zone", DOMAIN, "--secret-file", str(secret), "--db", str(tmp_path / "db.sqlite"),
            "--listen", "127.0.0.1:5353", "--user", "root", *extra]
    try:
        return main(argv), seen
    except BaseException as e:
        if isinstance(e, _Served) or (isinstance(e, BaseExceptionGroup) and e.subgroup(_Served) is not None):
            return -1, seen
        raise


def primary_args(tmp_path: Path) -> list[str]:
    return ["--primary", "127.0.0.1:53", "--primary-key", str(tmp_path / "front.key")]


def test_serve_dns_hands_the_owner_over_with_take_over(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    code, seen = _serve_dns(tmp_path, monkeypatch, *primary_args(tmp_path), "--take-over")
    assert code == -1 and isinstance(seen["owner"], LeaseOwner) and seen["owner"].take_over
    code, seen = _serve_dns(tmp_path, monkeypatch, *primary_args(tmp_path))
    assert code == -1 and not seen["owner"].take_over
    code, seen = _serve_dns(tmp_path, monkeypatch)
    assert code == -1 and seen["owner"] is None  # not a front: no claim


def test_serve_dns_conflict_is_one_line_exit_2_and_a_failed_claim_exit_1(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = _serve_dns(tmp_path, monkeypatch, *primary_args(tmp_path),
                         raises=OwnerConflict("zone example.com. has another front (front id 1 on host b)"))
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and err[-1] == "tunneld: zone example.com. has another front (front id 1 on host b)"
    code, _ = _serve_dns(tmp_path, monkeypatch, *primary_args(tmp_path), raises=ClaimFailed("no answer"))
    err = capsys.readouterr().err.splitlines()
    assert code == 1 and "the primary 127.0.0.1:53 did not take this front's claim" in err[-1]
    assert err[-1].startswith("tunneld: ") and "no answer" in err[-1]
    code, _ = _serve_dns(tmp_path, monkeypatch, "--take-over")
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and err[-1].startswith("tunneld: --take-over without --primary")


def _genuine_answer() -> tuple[Any, bytes]:
    from tunneld.dnsserver.owner import claim_query
    primary = ClaimPrimary()
    primary.txt = [dns.rdata.from_text("IN", "TXT", '"id=00" "host=a"')]
    q = claim_query(ZONE, 7, FRONT, T0)
    return q, primary.answer(q.wire, T0)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_read_claims_raises_only_parse_error(data: st.DataObject) -> None:
    q, good = _genuine_answer()
    wire = data.draw(st.one_of(
        st.binary(max_size=600),
        st.builds(lambda i, b: good[:i] + bytes([b]) + good[i + 1:],
                  st.integers(0, len(good) - 1), st.integers(0, 255)),
        st.integers(0, len(good)).map(lambda n: good[:n])))
    with suppress(ParseError):
        read_claims(wire, q, ZONE, FRONT, T0)
