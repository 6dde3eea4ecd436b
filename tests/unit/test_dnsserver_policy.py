"""What the rendezvous server tells whom: device records only to queries signed with the account key, and
unsigned UDP replies no larger than about three times their request.

A stranger who knows the domain must learn nothing about the account's devices (which exist, their keys,
their addresses), and must not be able to use the server as an amplifier against a spoofed source. The
account's own clients sign every query and still learn everything, at the size their EDNS buffer asks.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import struct
import time
from collections import Counter

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import trio

from tunneld.crypto.kdf import derive_tsig_key
from tunneld.dnsserver.core import PUBLIC_SERIAL, UNSIGNED_UDP_MAX, DnsCore, account_key, unsigned_udp_limit
from tunneld.dnsserver.llq import LLQServer
from tunneld.dnsserver.store import AddRR, Lease, ZoneStore
from tunneld.proto import records
from tunneld.proto.errors import ParseError
from tunneld.proto.llq import LLQ_OP_SETUP, LLQ_VERSION, LLQOption
from tunneld.proto.srv import build_srv_query, pick_srv_target
from tunneld.proto.tsig import TsigKey, find_tsig, sign, verify
from tunneld.proto.watcher import Watcher
from tunneld.services.discover import UPDATE_SERVICE, find_server

DOMAIN = "example.com"
ZONE = dns.name.from_text(DOMAIN)
SECRET = bytes(range(32))
KEY = account_key(SECRET, DOMAIN)
SECRET_KEY = derive_tsig_key(SECRET, DOMAIN)  # the key's secret, as the daemon holds it
T0 = 1_800_000_000
SRC = ("198.51.100.7", 4242)
DEVICES = 50


def device(i: int) -> records.HostRecords:
    public_key = bytes([i + 1]) * 32
    return records.HostRecords.derive(f"host{i}", DOMAIN, public_key, 4500 + i,
                                      [ipaddress.ip_address(f"203.0.113.{i + 1}"),
                                       ipaddress.ip_address(f"2001:db8::{i + 1:x}")])


def zone_with_devices(n: int = DEVICES) -> DnsCore:
    core = DnsCore(ZoneStore(":memory:", ZONE, "ns.example.com.", 53, addresses=["192.0.2.53"]), [KEY])
    for i in range(n):
        changes = [AddRR(rrset.name, 120, rd) for rrset in records.build(device(i), 120) for rd in rrset]
        core.store.apply_update(changes, Lease(7200, 7200), T0)
    return core


@pytest.fixture(scope="module")
def core() -> DnsCore:
    return zone_with_devices()


def device_questions() -> list[tuple[dns.name.Name, dns.rdatatype.RdataType]]:
    """Every name and type a device publishes, and ANY at each of those names."""
    host = device(0)
    out: list[tuple[dns.name.Name, dns.rdatatype.RdataType]] = []
    for rrset in records.build(host, 120):
        out += [(rrset.name, rrset.rdtype), (rrset.name, dns.rdatatype.ANY)]
    return out


def ask(core: DnsCore, qname: dns.name.Name, rdtype: int, *, signed: bool, payload: int | None = None,
        tcp: bool = False, msg_id: int = 0x4242) -> tuple[bytes, dns.message.Message, bytes]:
    """(request wire, parsed reply, reply wire); a signed reply is verified with the request's MAC."""
    q = dns.message.make_query(qname, rdtype, id=msg_id, use_edns=payload is not None,
                               payload=payload or 512)
    wire, mac = q.to_wire(), b""
    if signed:
        wire, mac = sign(wire, KEY, T0)
    reply = core.handle(wire, SRC, T0, max_size=65535 if tcp else None)
    assert reply is not None
    if signed:
        verify(reply, KEY, mac, T0)
    return wire, dns.message.from_wire(reply, keyring=False), reply


def shape(msg: dns.message.Message) -> tuple[int, list[str], list[str], int]:
    """What a reply says: rcode, answer, authority and flags (the ID and question aside)."""
    return (msg.rcode(), [r.to_text() for r in msg.answer], [r.to_text() for r in msg.authority],
            msg.flags & ~dns.flags.TC)


# ---- privacy -----------------------------------------------------------------------------------------


def _id(v: object) -> str:
    return v.to_text() if isinstance(v, dns.name.Name) else dns.rdatatype.to_text(v)  # type: ignore[arg-type]


@pytest.mark.parametrize(("qname", "rdtype"), device_questions(), ids=_id)
def test_unsigned_query_for_a_device_record_looks_like_a_name_that_does_not_exist(
        core: DnsCore, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> None:
    _, signed, _ = ask(core, qname, rdtype, signed=True, payload=65535)
    assert signed.rcode() == dns.rcode.NOERROR and signed.answer  # the account's clients see it
    _, stranger, _ = ask(core, qname, rdtype, signed=False)
    _, nowhere, _ = ask(core, dns.name.from_text("no-such-device", ZONE), rdtype, signed=False)
    assert stranger.rcode() == dns.rcode.NXDOMAIN and not stranger.answer
    assert shape(stranger) == shape(nowhere)


def test_unsigned_browse_lists_no_device_and_signed_lists_all(core: DnsCore) -> None:
    browse = records.browse_name(DOMAIN)
    _, stranger, _ = ask(core, browse, dns.rdatatype.PTR, signed=False, payload=65535)
    assert stranger.rcode() == dns.rcode.NXDOMAIN and not stranger.answer
    _, ours, _ = ask(core, browse, dns.rdatatype.PTR, signed=True, payload=65535)
    assert len(ours.answer[0]) == DEVICES


def test_unsigned_query_gets_only_the_servers_own_records(core: DnsCore) -> None:
    _, apex, _ = ask(core, ZONE, dns.rdatatype.ANY, signed=False)
    assert sorted(r.rdtype for r in apex.answer) == [dns.rdatatype.NS, dns.rdatatype.SOA]
    cases = [("_dns-update._udp", "SRV", "0 0 53 ns.example.com."),
             ("_dns-llq._udp", "SRV", "0 0 53 ns.example.com."),
             ("ns", "A", "192.0.2.53")]
    for name, rdtype, text in cases:
        _, reply, _ = ask(core, dns.name.from_text(name, ZONE), dns.rdatatype.from_text(rdtype), signed=False)
        assert reply.rcode() == dns.rcode.NOERROR
        assert [rd.to_text() for rrset in reply.answer for rd in rrset] == [text]
    # _udp.ZONE is an empty non-terminal above the SRV names: NODATA, as before.
    _, ent, _ = ask(core, dns.name.from_text("_udp", ZONE), dns.rdatatype.PTR, signed=False)
    assert ent.rcode() == dns.rcode.NOERROR and not ent.answer


def test_a_device_record_at_a_public_name_stays_private() -> None:
    core = zone_with_devices(0)
    core.store.apply_update([AddRR(ZONE, 120, dns.rdata.from_text("IN", "TXT", '"secret"'))],
                            Lease(7200, 7200), T0)
    _, stranger, _ = ask(core, ZONE, dns.rdatatype.TXT, signed=False)
    assert stranger.rcode() == dns.rcode.NOERROR and not stranger.answer  # the apex exists: NODATA
    _, ours, _ = ask(core, ZONE, dns.rdatatype.TXT, signed=True)
    assert [rd.to_text() for rd in ours.answer[0]] == ['"secret"']


def test_a_query_signed_with_another_key_reads_nothing(core: DnsCore) -> None:
    other = account_key(bytes(32), DOMAIN)
    q = dns.message.make_query(records.browse_name(DOMAIN), "PTR", id=7)
    wire, _ = sign(q.to_wire(), other, T0)
    reply = core.handle(wire, SRC, T0)
    assert reply is not None
    parsed = dns.message.from_wire(reply, keyring=False)
    assert parsed.rcode() == dns.rcode.NOTAUTH and not parsed.answer


# ---- amplification -----------------------------------------------------------------------------------


def test_unsigned_udp_replies_are_at_most_three_times_the_query(core: DnsCore) -> None:
    """The reflection that was measured: a small unsigned query with a 64 KB EDNS buffer drew a 53 KB
    reply (1,215x). Every question a stranger can ask now gets at most 3x its size over UDP."""
    questions = [*device_questions(), (ZONE, dns.rdatatype.ANY),
                 (records.browse_name(DOMAIN), dns.rdatatype.PTR)]
    for qname, rdtype in questions:
        wire, _, reply = ask(core, qname, rdtype, signed=False, payload=65535)
        assert len(reply) <= min(UNSIGNED_UDP_MAX, 3 * len(wire)), (qname, rdtype, len(wire), len(reply))


def test_a_large_unsigned_answer_is_truncated_to_the_cap(core: DnsCore) -> None:
    """The cap holds whatever the answer: render a big public reply as the core would."""
    q = dns.message.make_query(ZONE, "A", id=9, use_edns=0, payload=65535)
    wire = q.to_wire()
    resp = dns.message.make_response(q)
    resp.answer = [dns.rrset.from_text_list(ZONE, 60, "IN", "A", [f"10.0.{i // 250}.{i % 250}"
                                                                    for i in range(1000)])]
    reply = core.render(q, resp, None, T0, None, query_size=len(wire))
    assert len(reply) <= 3 * len(wire)
    parsed = dns.message.from_wire(reply)
    assert parsed.flags & dns.flags.TC and not parsed.answer


def test_unsigned_limit() -> None:
    assert unsigned_udp_limit(44) == 132
    assert unsigned_udp_limit(1000) == UNSIGNED_UDP_MAX
    assert unsigned_udp_limit(None) == 512


def test_small_public_answers_are_not_truncated(core: DnsCore) -> None:
    for qname, rdtype in [(ZONE, dns.rdatatype.SOA), (ZONE, dns.rdatatype.NS),
                          (dns.name.from_text("_dns-update._udp", ZONE), dns.rdatatype.SRV)]:
        for payload in (None, 1232):
            _, reply, _ = ask(core, qname, rdtype, signed=False, payload=payload)
            assert not reply.flags & dns.flags.TC and reply.answer, (qname, rdtype, payload)


def test_signed_udp_answer_keeps_the_clients_edns_size(core: DnsCore) -> None:
    browse = records.browse_name(DOMAIN)
    _, reply, raw = ask(core, browse, dns.rdatatype.ANY, signed=True, payload=65535)
    assert not reply.flags & dns.flags.TC and len(reply.answer[0]) == DEVICES
    assert len(raw) > UNSIGNED_UDP_MAX  # our own clients are no strangers
    _, small, raw = ask(core, browse, dns.rdatatype.PTR, signed=True, payload=1232)
    assert small.flags & dns.flags.TC and len(raw) <= 1232  # and their own limit holds


def test_unsigned_tcp_is_not_capped_but_still_private(core: DnsCore) -> None:
    _, reply, _ = ask(core, records.browse_name(DOMAIN), dns.rdatatype.PTR, signed=False, tcp=True)
    assert reply.rcode() == dns.rcode.NXDOMAIN and not reply.answer
    _, reply, raw = ask(core, records.browse_name(DOMAIN), dns.rdatatype.PTR, signed=True, tcp=True)
    assert len(reply.answer[0]) == DEVICES and struct.unpack("!H", raw[:2])[0] == 0x4242


# ---- our clients sign, and learn everything; an unsigned client learns nothing ------------------------


def watch(core: DnsCore, key: TsigKey | None, rounds: int = 200) -> tuple[list[str], Counter[str]]:
    """Run a Watcher against the server's cores in virtual wall-clock time, datagram by datagram: the
    names of the devices it learns, and how many requests reached the server signed and unsigned."""
    server_addr, client_addr = ("192.0.2.53", 53), ("198.51.100.20", 40000)
    llq = LLQServer(core, rand=random.Random(1).randbytes)
    watcher = Watcher(DOMAIN, "host0", server=server_addr, rand=random.Random(2).randbytes, key=key)
    now = float(T0)
    seen: Counter[str] = Counter()
    watcher.start(now)
    for _ in range(rounds):
        sent = watcher.transmits()
        for t in sent:
            seen["signed" if find_tsig(t.payload) else "unsigned"] += 1
            out = llq.handle(t.payload, client_addr, now)
            replies = [w for _, w in out] if out is not None else [core.handle(t.payload, client_addr, now)]
            for reply in replies:
                if reply is not None:
                    watcher.receive(reply, server_addr, now)
        deadline = watcher.deadline()
        if not sent and deadline is None:
            break
        if not sent:
            now = max(now, deadline or now)
            watcher.poll(now)
    return [p.name for p in watcher.peers()], seen


def test_the_watcher_signs_every_query_and_learns_every_device() -> None:
    core = zone_with_devices(5)
    names, seen = watch(core, KEY)
    assert names == [f"host{i}" for i in range(1, 5)]
    assert seen["signed"] > 5 and seen["unsigned"] == 0


def test_an_unsigned_watcher_learns_no_device() -> None:
    core = zone_with_devices(5)
    names, seen = watch(core, None)
    assert names == [] and seen["unsigned"] > 1  # it asked (LLQ refused, then polling), and learned nothing


def test_srv_query_is_signed_and_an_unsigned_answer_is_refused(core: DnsCore) -> None:
    query = build_srv_query(DOMAIN, random.Random(3).randbytes, key=KEY, now=T0)
    assert find_tsig(query.payload) is not None
    reply = core.handle(query.payload, SRC, T0)
    assert reply is not None
    assert pick_srv_target(reply, query, now=T0) == ("ns.example.com", 53)
    forged = dns.message.make_response(dns.message.from_wire(query.payload, keyring=False))
    forged.answer = [dns.rrset.from_text(dns.name.from_text("_dns-update._udp", ZONE), 60, "IN", "SRV",
                                         "0 0 53 evil.example.net.")]
    with pytest.raises(ParseError, match="tsig"):
        pick_srv_target(forged.to_wire(), query, now=T0)


async def _serve_udp(core: DnsCore, seen: list[bytes], task_status: trio.TaskStatus[tuple[str, int]]) -> None:
    """The core on a loopback UDP socket, on the real wall clock (the client signs with it)."""
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        task_status.started(sock.getsockname())
        while True:
            wire, src = await sock.recvfrom(65535)
            seen.append(wire)
            reply = core.handle(wire, src, time.time())
            if reply is not None:
                await sock.sendto(reply, src)


def test_discovery_signs_its_queries_with_the_account_key() -> None:
    core = DnsCore(ZoneStore(":memory:", ZONE, "ns.example.com.", 7777, addresses=["127.0.0.1"]), [KEY])
    seen: list[bytes] = []

    async def main() -> tuple[str, int]:
        async with trio.open_nursery() as nursery:
            addr = await nursery.start(_serve_udp, core, seen)
            with trio.fail_after(10):
                found = await find_server(addr, DOMAIN, UPDATE_SERVICE, SECRET_KEY, "hmac-sha256")
            nursery.cancel_scope.cancel()
        return found

    assert trio.run(main) == ("127.0.0.1", 7777)  # the SRV, then the target's address, both followed
    assert len(seen) == 2 and all(find_tsig(w) is not None for w in seen)


def test_an_unsigned_llq_setup_reads_nothing(core: DnsCore) -> None:
    llq = LLQServer(core, rand=random.Random(4).randbytes)  # as serve-dns runs it: TSIG required
    q = dns.message.make_query(records.browse_name(DOMAIN), "PTR", id=11, use_edns=0, payload=1440,
                               options=[LLQOption(LLQ_VERSION, LLQ_OP_SETUP, 0, 0, 3600)])
    out = llq.handle(q.to_wire(), SRC, T0)
    assert out is not None and len(out) == 1
    reply = dns.message.from_wire(out[0][1])
    assert reply.rcode() == dns.rcode.REFUSED and not reply.answer
    assert len(llq) == 0 and llq.counters["unsigned LLQ refused"] == 1


def test_the_soa_serial_does_not_tell_a_stranger_when_devices_publish() -> None:
    core = zone_with_devices(3)
    def serials(signed: bool) -> tuple[int, int]:
        _, apex, _ = ask(core, ZONE, dns.rdatatype.SOA, signed=signed)
        _, nx, _ = ask(core, dns.name.from_text("nothing", ZONE), dns.rdatatype.A, signed=signed)
        return apex.answer[0][0].serial, nx.authority[0][0].serial
    before = serials(False)
    core.store.apply_update([AddRR(dns.name.from_text("new", ZONE), 120,
                                   dns.rdata.from_text("IN", "AAAA", "fd00::99"))], Lease(7200, 7200), T0)
    assert serials(False) == before == (PUBLIC_SERIAL, PUBLIC_SERIAL)
    assert serials(True) == (core.store.serial, core.store.serial) and core.store.serial > PUBLIC_SERIAL
