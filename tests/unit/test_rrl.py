"""Response rate limiting of UDP replies: token buckets per source prefix and kind of reply, with slip,
on a fake clock; then the server on loopback under a query flood."""

from __future__ import annotations

import functools
import logging
import re
import socket
import struct
import time
from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rrset
import dns.update
import pytest
import trio

from tests.unit.test_dnsserver_tcp import free_port
from tunneld import cli
from tunneld.dnsserver.core import DnsCore, Policy, account_key
from tunneld.dnsserver.rrl import Kind, ResponseLimiter, RrlLimits, Verdict, kind_of, prefix_of, truncated
from tunneld.dnsserver.serve import serve
from tunneld.dnsserver.store import ZoneStore
from tunneld.proto.tsig import sign

DOMAIN = "example.com"
ZONE = dns.name.from_text(DOMAIN)
KEY = account_key(bytes(32), DOMAIN)
S, D, T = Verdict.SEND, Verdict.DROP, Verdict.SLIP


def verdicts(rrl: ResponseLimiter, n: int, source: str = "192.0.2.1", kind: Kind = Kind.ANSWER,
             now: float = 0.0) -> list[Verdict]:
    return [rrl.check((source, 53), kind, now) for _ in range(n)]


def test_burst_then_limited_with_every_second_reply_slipped() -> None:
    rrl = ResponseLimiter(RrlLimits(answers_per_second=5, burst=2, slip=2))
    assert verdicts(rrl, 14) == [S] * 10 + [D, T, D, T]
    assert rrl.counters["sent: answer"] == 10 and rrl.counters["dropped: answer"] == 2
    assert rrl.counters["slipped: answer"] == 2


def test_tokens_come_back_at_the_rate_up_to_the_burst() -> None:
    rrl = ResponseLimiter(RrlLimits(answers_per_second=5, burst=2, slip=0))
    assert verdicts(rrl, 11) == [S] * 10 + [D]
    assert verdicts(rrl, 2, now=0.2) == [S, D]  # 0.2 s at 5/s: one token
    assert verdicts(rrl, 12, now=100.0) == [S] * 10 + [D, D]  # capped at the burst; slip 0: all dropped


def test_slip_one_truncates_every_limited_reply() -> None:
    rrl = ResponseLimiter(RrlLimits(answers_per_second=1, burst=1, slip=1))
    assert verdicts(rrl, 3) == [S, T, T]


def test_sources_count_per_prefix() -> None:
    rrl = ResponseLimiter(RrlLimits(answers_per_second=1, burst=1, slip=0))
    assert verdicts(rrl, 1, "192.0.2.1") == [S]
    assert verdicts(rrl, 1, "192.0.2.200") == [D]  # the same /24
    assert verdicts(rrl, 1, "::ffff:192.0.2.7") == [D]  # IPv4-mapped: the same /24 again
    assert verdicts(rrl, 1, "192.0.3.1") == [S]
    assert verdicts(rrl, 1, "2001:db8:0:100::1") == [S]
    assert verdicts(rrl, 1, "2001:db8:0:1ff::2") == [D]  # the same /56
    assert verdicts(rrl, 1, "2001:db8:0:200::1") == [S]
    assert prefix_of(("2001:db8:0:1ff::2", 53, 0, 0)) == "2001:db8:0:100::/56"
    assert prefix_of(("192.0.2.200", 53)) == "192.0.2.0/24"


def test_kinds_have_their_own_buckets_and_rates() -> None:
    rrl = ResponseLimiter(RrlLimits(answers_per_second=2, errors_per_second=1, signed_per_second=50,
                                    burst=1, slip=0))
    assert verdicts(rrl, 2, kind=Kind.ERROR) == [S, D]
    assert verdicts(rrl, 3, kind=Kind.ANSWER) == [S, S, D]  # errors did not use the answers' tokens
    assert verdicts(rrl, 51, kind=Kind.SIGNED) == [S] * 50 + [D]  # much higher, yet bounded


def test_the_table_is_bounded_least_recently_used_first() -> None:
    rrl = ResponseLimiter(RrlLimits(answers_per_second=1, burst=1, slip=0, max_prefixes=3))
    for i in range(3):
        assert verdicts(rrl, 2, f"10.0.{i}.1") == [S, D]
    assert verdicts(rrl, 1, "10.0.0.1") == [D]  # 10.0.0.0/24 is now the most recently used
    assert verdicts(rrl, 1, "10.0.9.1") == [S]  # a fourth: 10.0.1.0/24 is forgotten
    assert len(rrl) == 3 and rrl.counters["forgotten"] == 1
    assert verdicts(rrl, 1, "10.0.0.1") == [D]  # still remembered, still limited
    assert verdicts(rrl, 1, "10.0.1.1") == [S]  # forgotten: a fresh bucket


def test_kind_of_replies() -> None:
    q = dns.message.make_query(ZONE, "SOA")
    ok = dns.message.make_response(q)
    nx = dns.message.make_response(q)
    nx.set_rcode(dns.rcode.NXDOMAIN)
    assert kind_of(ok.to_wire(), False) is Kind.ANSWER
    assert kind_of(nx.to_wire(), False) is Kind.ERROR
    assert kind_of(nx.to_wire(), True) is Kind.SIGNED


def test_truncated_reply_is_the_header_and_question_with_tc() -> None:
    q = dns.message.make_query("host.example.com.", "AAAA", use_edns=0)
    resp = dns.message.make_response(q)
    resp.answer = [dns.rrset.from_text("host.example.com.", 60, "IN", "AAAA", "2001:db8::1")]
    wire = truncated(resp.to_wire())
    parsed = dns.message.from_wire(wire)
    assert parsed.id == q.id and parsed.flags & dns.flags.TC and parsed.flags & dns.flags.QR
    assert parsed.question == q.question and not parsed.answer and parsed.edns < 0
    assert len(wire) <= len(q.to_wire())
    header_only = struct.pack("!HHHHHH", 7, 0x8180, 0, 0, 0, 0)
    assert truncated(header_only) == struct.pack("!HHHHHH", 7, 0x8380, 0, 0, 0, 0)
    assert truncated(b"\x00\x01") == b"\x00\x01"


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        RrlLimits(answers_per_second=0)
    with pytest.raises(ValueError):
        RrlLimits(slip=-1)


# ---- the server under a flood, on loopback -------------------------------------------------------------


def flood(limits: RrlLimits, wires: list[bytes]) -> list[bytes]:
    """Send ``wires`` back to back to a server on loopback and collect the replies. The server answers in
    arrival order, so once a last query from another /24 is answered every reply to the flood has been
    sent (loopback delivers at once): what is queued then is all there will be."""
    core = DnsCore(ZoneStore(":memory:", ZONE, "ns.example.com.", 53), [KEY], Policy(default_lease=3600))

    async def main() -> list[bytes]:
        async with trio.open_nursery() as nursery:
            port = free_port()
            await nursery.start(functools.partial(serve, core, "127.0.0.1", port, rrl=limits))
            replies: list[bytes] = []
            # The flood's socket is a plain non-blocking one: sending UDP does not block, and what is
            # queued is drained without waiting.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, \
                    trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as last:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                sock.setblocking(False)
                sock.bind(("127.0.0.1", 0))
                sock.connect(("127.0.0.1", port))
                await last.bind(("127.0.9.1", 0))
                await last.connect(("127.0.0.1", port))
                for w in wires:
                    sock.send(w)
                await last.send(dns.message.make_query(ZONE, "SOA").to_wire())
                with trio.fail_after(5):
                    await last.recv(65535)
                while True:
                    try:
                        replies.append(sock.recv(65535))
                    except BlockingIOError:
                        break
            nursery.cancel_scope.cancel()
        return replies

    return trio.run(main)


def test_a_flood_of_unsigned_queries_is_limited_with_truncated_slips(
        caplog: pytest.LogCaptureFixture) -> None:
    wires = [dns.message.make_query(ZONE, "SOA", id=i).to_wire() for i in range(60)]
    caplog.set_level(logging.INFO, logger="tunneld.dnsserver")
    replies = flood(RrlLimits(answers_per_second=1, burst=5, slip=2), wires)
    assert re.search(r"udp rate limiting: dropped: answer \d+, sent: answer \d+, slipped: answer \d+",
                     caplog.text), caplog.text  # the counters, said when the server stops
    full = [r for r in replies if not dns.message.from_wire(r).flags & dns.flags.TC]
    slipped = [r for r in replies if dns.message.from_wire(r).flags & dns.flags.TC]
    assert 5 <= len(full) <= 8  # the burst (and a token or two if the machine is slow)
    assert 20 <= len(slipped) <= 30  # every second limited reply, truncated
    assert all(len(r) <= len(wires[0]) for r in slipped)


def test_the_accounts_signed_updates_are_not_limited() -> None:
    wires = []
    now = int(time.time())  # the server checks TSIG times against the wall clock
    for i in range(60):
        upd = dns.update.UpdateMessage(ZONE, id=i)
        upd.add(f"h{i}", 60, "AAAA", "2001:db8::1")
        wires.append(sign(upd.to_wire(), KEY, now)[0])
    replies = flood(RrlLimits(answers_per_second=1, signed_per_second=1, burst=1, slip=0), wires)
    assert len(replies) == 60
    assert all(dns.message.from_wire(r, keyring=False).rcode() == dns.rcode.NOERROR for r in replies)


def test_signed_queries_that_draw_larger_replies_have_their_own_bounded_rate() -> None:
    """A captured signed query replayed from forged sources must not amplify without bound."""
    now = int(time.time())
    wires = [sign(dns.message.make_query(ZONE, "SOA", id=i).to_wire(), KEY, now)[0] for i in range(30)]
    replies = flood(RrlLimits(answers_per_second=1000, signed_per_second=1, burst=3, slip=0), wires)
    assert 3 <= len(replies) <= 5
    assert all(len(r) > len(wires[0]) for r in replies)


def test_rate_limiting_can_be_turned_off() -> None:
    rrl = ResponseLimiter(RrlLimits(answers_per_second=1, burst=1, enabled=False))
    assert verdicts(rrl, 100) == [S] * 100


def test_serve_dns_rate_limit_option(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["serve-dns", "--zone", DOMAIN, "--secret-file", str(tmp_path / "none"), "--db",
            str(tmp_path / "db.sqlite"), "--rate-limit", "-1"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "--rate-limit -1" in err[0]
