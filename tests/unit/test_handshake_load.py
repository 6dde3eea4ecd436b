"""The tunnel port under a handshake flood (tunneld.proto.handshake_load through TunnelCore), in fake time.

A flood is made the cheap way an attacker would: one initiation, its sender index changed and mac1
recomputed for each copy, so each copy passes mac1 and would cost the responder the full X25519 work.
mac1 needs the account PSK, so this attacker is an insider: a key that holds the account secret but is no
longer (or not yet) a peer. A stranger fails mac1 (tests/unit/test_handshake.py); a replayed capture of a
genuine initiation passes it too, and costs the same work before its timestamp is found old.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterator

import pytest

from tests.helpers import drbg
from tunneld.crypto.esp import Kind, classify
from tunneld.crypto.noise import MAC, generate_keypair
from tunneld.proto import handshake as hs
from tunneld.proto.handshake_load import (
    COOKIES_PER_BATCH,
    SOURCE_BURST,
    SOURCE_RATE,
    UNDER_LOAD_AFTER_TIME,
    UNDER_LOAD_RATE,
    WORK_PER_BATCH,
    HandshakeLoad,
    LoadMeter,
    SourceLimiter,
    source_key,
)
from tunneld.proto.tunnel import Output, TunnelCore

PSK = bytes(range(32))
A_ULA = ipaddress.IPv6Address("fd00:1::a")
B_ULA = ipaddress.IPv6Address("fd00:1::b")
A_ADDR = ("::ffff:192.0.2.1", 4500)
B_ADDR = ("::ffff:192.0.2.2", 4500)
WALL = 1e9
# Reasons a message is dropped only after the X25519 work was done on it.
WORKED = ("unknown-peer", "decrypt-failed", "replay", "rate-limited")


def packet(src: ipaddress.IPv6Address, dst: ipaddress.IPv6Address, n: int = 0) -> bytes:
    return bytes.fromhex("6000000000083b40") + src.packed + dst.packed + n.to_bytes(8, "big")


def pair() -> tuple[TunnelCore, TunnelCore]:
    a_priv, a_pub = generate_keypair()
    b_priv, b_pub = generate_keypair()
    a = TunnelCore(a_priv, PSK, rand=drbg(1))
    b = TunnelCore(b_priv, PSK, rand=drbg(2))
    a.add_peer("b", b_pub, B_ULA, B_ADDR)
    b.add_peer("a", a_pub, A_ULA, A_ADDR)
    return a, b


def datagrams(out: Output) -> list[bytes]:
    return [d for f in out.sends for d in f.all_datagrams()]


def msg_type(datagram: bytes) -> int | None:
    return datagram[4] if classify(datagram) is Kind.CONTROL else None


def flood(receiver: TunnelCore, seed: int = 7) -> Iterator[bytes]:
    """Endless valid-mac1 initiations to ``receiver`` from a key that is no peer (unknown-peer after the
    X25519 work)."""
    stranger_priv, _ = generate_keypair()
    stranger = hs.Handshaker(stranger_priv, PSK, {receiver.handshaker.public_key}, rand=drbg(seed))
    template = hs.unframe(stranger.initiate(receiver.handshaker.public_key, 0.0, WALL)[0])
    key = hs.mac1_key(receiver.handshaker.public_key, PSK)
    rng = random.Random(seed)
    while True:
        body = template[:4] + rng.randrange(256, 1 << 32).to_bytes(4, "little") + template[8:116]
        yield hs.frame(body + MAC(key, body) + bytes(16))


def overload(meter: LoadMeter, now: float, after: float = UNDER_LOAD_AFTER_TIME) -> None:
    """Put ``meter`` under load at ``now`` the honest way (UNDER_LOAD_RATE + 1 arrivals at once)."""
    meter.after = after
    for _ in range(UNDER_LOAD_RATE + 1):
        meter.arrived(now)
    assert meter.under_load(now)


def worked(core: TunnelCore) -> int:
    return sum(core.handshaker.drops.get(r, 0) for r in WORKED)


def test_a_flood_in_small_batches_engages_cookies() -> None:
    """5,000 initiations a second in batches of 50 (below the old 64-per-batch trigger): cookies engage
    once the rate passes UNDER_LOAD_RATE, and from then on nothing gets the X25519 work. Each of the
    flood's 50 addresses gets cookie replies at its bucket's rate, the rest are dropped."""
    _, b = pair()
    gen = flood(b)
    cookies = 0
    for k in range(100):  # one second: a batch of 50 every 10 ms, each from its own address and port
        now = 10.0 + k * 0.01
        batch = [(next(gen), (f"203.0.113.{i % 250 + 1}", 40000 + k)) for i in range(50)]
        out = b.inbound(batch, now, WALL + now)
        cookies += sum(1 for d in datagrams(out) if msg_type(d) == hs.MSG_COOKIE_REPLY)
    # Before the load is seen (the first UNDER_LOAD_RATE), the per-batch budget holds the work down.
    busy = b.handshaker.drops.get("busy", 0)
    assert worked(b) + busy == UNDER_LOAD_RATE and worked(b) <= 3 * WORK_PER_BATCH
    cookie_busy = b.handshaker.drops.get("cookie-busy", 0)
    assert cookies + cookie_busy == 5000 - worked(b) - busy
    assert 50 * SOURCE_BURST <= cookies <= 50 * (SOURCE_BURST + SOURCE_RATE * 1.0)
    status = b.handshaker.load.status(10.99)
    assert status["under_load"] and status["cookie_replies"] == cookies and status["under_load_episodes"] == 1
    # A second after the flood stops, the port is out of load: a message gets the work again.
    later = 10.99 + UNDER_LOAD_AFTER_TIME + 0.01
    assert not b.handshaker.load.meter.under_load(later)
    before = worked(b)
    b.inbound([(next(gen), ("203.0.113.1", 1))], later, WALL + later)
    assert worked(b) == before + 1


def test_load_meter_counts_over_time_and_stays_a_second() -> None:
    meter = LoadMeter(rate=10, window=1.0, after=1.0)
    # Just under 10 a second, evenly: never more than 10 in any second.
    assert not any(meter.arrived(t * 0.101) for t in range(50))
    # An 11th within the same second: under load, until a second after the last excess.
    meter2 = LoadMeter(rate=10, window=1.0, after=1.0)
    results = [meter2.arrived(0.05 * i) for i in range(11)]
    assert results == [False] * 10 + [True]
    assert meter2.under_load(1.49) and not meter2.under_load(1.5 + 1e-9)
    assert meter2.episodes == 1 and meter2.recent(0.5) == 11


def test_source_limiter_is_wireguards_bucket() -> None:
    lim = SourceLimiter()
    # A burst of SOURCE_BURST at once, then one per 1/SOURCE_RATE s.
    burst = [lim.allow("198.51.100.7", 0.0) for _ in range(SOURCE_BURST + 2)]
    assert burst == [True] * SOURCE_BURST + [False] * 2
    assert not lim.allow("198.51.100.7", 0.5 / SOURCE_RATE)
    assert lim.allow("198.51.100.7", 1.5 / SOURCE_RATE)
    # Over a long stretch at 100 a second, about SOURCE_RATE a second get through.
    lim2 = SourceLimiter()
    got = sum(lim2.allow("198.51.100.8", i / 100) for i in range(1000))
    assert SOURCE_RATE * 10 <= got <= SOURCE_RATE * 10 + SOURCE_BURST
    # Other sources have their own bucket; an IPv6 /64 is one source, IPv4-mapped is IPv4.
    assert lim.allow("198.51.100.9", 0.0)
    assert source_key("2001:db8:1:2::1") == source_key("2001:db8:1:2:ffff::9")
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("::ffff:192.0.2.1") == source_key("192.0.2.1") == bytes([192, 0, 2, 1])
    assert source_key("not an address") is None and not lim.allow("not an address", 0.0)


def test_source_table_is_bounded() -> None:
    lim = SourceLimiter(size=100)
    for i in range(1000):
        assert lim.allow(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(lim) == 100 and lim.evictions == 900
    # The most recent sources are still tracked (their buckets are not full again).
    for _ in range(SOURCE_BURST - 1):
        assert lim.allow("10.0.3.231", 0.0)
    assert not lim.allow("10.0.3.231", 0.0)


def test_a_peer_completes_its_handshake_during_a_flood_from_other_sources() -> None:
    """b is under a flood; a's initiation earns a cookie, and a retries with mac2 at once (not a
    rekey_timeout later), so the handshake takes two round trips instead of five seconds."""
    a, b = pair()
    gen = flood(b)
    t = 10.0
    for _ in range(40):  # 0.4 s of a 5,000/s flood puts b under load
        b.inbound([(next(gen), (f"203.0.113.{i + 1}", 5000)) for i in range(50)], t, WALL + t)
        t += 0.01
    assert b.handshaker.load.meter.under_load(t)
    # The flood goes on in every batch; a's messages arrive last in theirs.
    init = a.outbound([packet(A_ULA, B_ULA, 1)], [], t, WALL + t)
    batch = [(next(gen), ("203.0.113.99", 5000)) for _ in range(49)] + [(datagrams(init)[0], A_ADDR)]
    reply = b.inbound(batch, t, WALL + t)
    cookie = [d for f in reply.sends if f.destination == A_ADDR for d in f.datagrams]
    assert [msg_type(d) for d in cookie] == [hs.MSG_COOKIE_REPLY]
    t += 0.001
    retry = datagrams(a.inbound([(d, B_ADDR) for d in cookie], t, WALL + t))
    assert [msg_type(d) for d in retry] == [hs.MSG_INITIATION]
    assert hs.unframe(retry[0])[-16:] != bytes(16), "the retry carries mac2"
    t += 0.001
    resp = b.inbound([(next(gen), ("203.0.113.97", 5000)) for _ in range(49)] + [(retry[0], A_ADDR)], t,
                     WALL + t)
    to_a = [d for f in resp.sends if f.destination == A_ADDR for d in f.datagrams]
    assert [msg_type(d) for d in to_a] == [hs.MSG_RESPONSE]
    t += 0.001
    data = a.inbound([(to_a[0], B_ADDR)], t, WALL + t)
    tun = b.inbound([(d, A_ADDR) for d in datagrams(data)], t, WALL + t).tun_in_order()
    assert tun == [packet(A_ULA, B_ULA, 1)]
    assert b.handshaker.drops.get("unknown-peer", 0) <= UNDER_LOAD_RATE  # the flood did little work
    assert b.handshaker.load.status(t)["under_load"]


def test_per_source_limit_after_mac2() -> None:
    """Under load, a source that holds a valid cookie gets SOURCE_BURST messages of work at once, then
    SOURCE_RATE a second; the rest are dropped and counted."""
    core = TunnelCore(generate_keypair()[0], PSK, rand=drbg(3))
    stranger_priv, _ = generate_keypair()
    stranger = hs.Handshaker(stranger_priv, PSK, {core.handshaker.public_key}, rand=drbg(4))
    src = ("198.51.100.5", 777)
    overload(core.handshaker.load.meter, 0.0, after=1e9)  # under load throughout
    first = hs.unframe(stranger.initiate(core.handshaker.public_key, 0.0, WALL)[0])
    ev = core.handshaker.receive(first, src, 0.0)
    assert isinstance(ev, hs.SendCookie)
    assert isinstance(stranger.receive(hs.unframe(ev.datagram), src, 0.0), hs.CookieReceived)
    # The stranger now holds a cookie and sends 40 initiations in one second, each with mac2.
    messages = []
    for i in range(40):
        messages.append(hs.unframe(stranger.initiate(core.handshaker.public_key, i / 40, WALL + i)[0]))
    results = [core.handshaker.receive(m, src, i / 40) for i, m in enumerate(messages)]
    limited = sum(1 for r in results if r == hs.Dropped("source-rate-limited"))
    done = sum(1 for r in results if r == hs.Dropped("unknown-peer"))
    assert done + limited == 40
    assert SOURCE_BURST + SOURCE_RATE - 2 <= done <= SOURCE_BURST + SOURCE_RATE
    assert core.handshaker.drops["source-rate-limited"] == limited
    # Another source is not held back by this one (it gets a cookie reply of its own first).
    assert isinstance(core.handshaker.receive(messages[-1], ("198.51.100.6", 777), 1.0), hs.SendCookie)


def test_data_keeps_flowing_with_a_bounded_handshake_share() -> None:
    """Every batch carries data and more handshake messages than WORK_PER_BATCH: the data is delivered,
    at most WORK_PER_BATCH messages per batch get the work, and the rest are dropped as busy."""
    a, b = pair()
    init = a.outbound([packet(A_ULA, B_ULA, 0)], [], 0.0, WALL)
    resp = b.inbound([(d, A_ADDR) for d in datagrams(init)], 0.0, WALL)
    first = a.inbound([(d, B_ADDR) for d in datagrams(resp)], 0.0, WALL)
    assert b.inbound([(d, A_ADDR) for d in datagrams(first)], 0.0, WALL).tun_in_order()
    # A slow flood (below UNDER_LOAD_RATE a second, so no cookies) but in large bursts: 60 every 2 s.
    gen = flood(b)
    delivered = 0
    for k in range(10):
        t = 1.0 + 2.0 * k
        sealed = datagrams(a.outbound([packet(A_ULA, B_ULA, k * 10 + j + 1) for j in range(10)], [], t,
                                      WALL + t))
        before = worked(b)
        batch = [(d, A_ADDR) for d in sealed] + [(next(gen), ("203.0.113.5", 9)) for _ in range(60)]
        out = b.inbound(batch, t, WALL + t)
        delivered += len(out.tun_in_order())
        assert worked(b) - before == WORK_PER_BATCH
    assert delivered == 100
    assert b.handshaker.drops["busy"] == 10 * (60 - WORK_PER_BATCH)
    assert b.handshaker.load.status(21.0)["under_load_episodes"] == 0


def test_inbound_gro_shares_one_budget_per_receive() -> None:
    _, b = pair()
    gen = flood(b)
    batch = [(next(gen), ("203.0.113.5", 9), 0) for _ in range(3 * WORK_PER_BATCH)]
    b.inbound_gro(batch, 1.0, WALL + 1.0)
    assert worked(b) == WORK_PER_BATCH
    assert b.handshaker.drops["busy"] == 2 * WORK_PER_BATCH


def test_cookie_replies_per_batch_are_bounded_too() -> None:
    """Under load, a batch of 200 valid-mac1 initiations (a replayed capture from spoofed sources, say)
    gets COOKIES_PER_BATCH cookie replies; the rest are dropped, and no X25519 work is done."""
    _, b = pair()
    gen = flood(b)
    overload(b.handshaker.load.meter, 1.0)
    out = b.inbound([(next(gen), (f"203.0.113.{i % 200 + 1}", 9)) for i in range(200)], 1.0, WALL + 1.0)
    assert [msg_type(d) for d in datagrams(out)] == [hs.MSG_COOKIE_REPLY] * COOKIES_PER_BATCH
    assert b.handshaker.drops == {"cookie-busy": 200 - COOKIES_PER_BATCH}
    assert b.handshaker.load.cookie_replies == COOKIES_PER_BATCH and b.handshaker.load.worked == 0


def test_a_handshaker_on_its_own_has_no_batch_budget() -> None:
    load = HandshakeLoad(work_per_batch=2, cookies_per_batch=1)
    assert all(load.take_work() for _ in range(10))
    assert all(load.take_cookie(f"192.0.2.{i}", 1.0) for i in range(10))
    load.begin_batch()
    assert [load.take_work() for _ in range(3)] == [True, True, False]
    assert [load.take_cookie(f"198.51.100.{i}", 1.0) for i in range(2)] == [True, False]
    load.end_batch()
    assert load.take_work() and load.take_cookie("203.0.113.1", 1.0) and load.worked == 13


def test_cookie_replies_are_limited_per_source() -> None:
    """Under load, one address flooding from many ports gets its bucket's cookie replies (a burst, then
    SOURCE_RATE a second), whatever the batches; another address still gets its own."""
    _, b = pair()
    gen = flood(b)
    overload(b.handshaker.load.meter, 1.0, after=10.0)
    cookies = 0
    for k in range(100):  # one second, 20 messages every 10 ms, each from a new port of one address
        now = 1.0 + k * 0.01
        batch = [(next(gen), ("198.51.100.7", 1000 + 20 * k + i)) for i in range(20)]
        out = b.inbound(batch, now, WALL + now)
        cookies += sum(1 for d in datagrams(out) if msg_type(d) == hs.MSG_COOKIE_REPLY)
    assert SOURCE_BURST <= cookies <= SOURCE_BURST + SOURCE_RATE * 1.0 + 1
    assert b.handshaker.drops["cookie-busy"] == 2000 - cookies
    out = b.inbound([(next(gen), ("198.51.100.8", 1000))], 2.0, WALL + 2.0)
    assert [msg_type(d) for d in datagrams(out)] == [hs.MSG_COOKIE_REPLY]


@pytest.mark.parametrize("forced", [False, True])
def test_handshaker_counts_only_valid_mac1_towards_load(forced: bool) -> None:
    core = TunnelCore(generate_keypair()[0], PSK, rand=drbg(5))
    junk = bytes([1, 0, 0, 0, 0, 1, 0, 0]) + bytes(140)
    for i in range(UNDER_LOAD_RATE * 2):
        assert core.handshaker.receive(junk, ("192.0.2.9", 1), i * 0.001, under_load=forced) == hs.Dropped(
            "bad-mac1")
    assert not core.handshaker.load.meter.under_load(0.3)
    assert core.handshaker.load.status(0.3)["recent"] == 0
