"""serve-dns answers STUN: the responder (tunneld.dnsserver.stun) as a function, then the listeners on
loopback (the DNS port and a --stun port, DNS still answered, rate limits), driven by our own client."""

from __future__ import annotations

import functools
import random
import socket
from collections import Counter

import dns.message
import dns.rcode
import pytest
import trio

from tests.unit.test_dnsserver_tcp import free_port
from tunneld.dnsserver.core import DnsCore, Policy
from tunneld.dnsserver.rrl import RrlLimits
from tunneld.dnsserver.serve import serve
from tunneld.dnsserver.store import ZoneStore
from tunneld.dnsserver.stun import respond
from tunneld.proto import stun_wire as wire
from tunneld.proto.core import Address
from tunneld.proto.stun import ENDPOINT_INDEPENDENT, NatKind, StunClient, StunEvent
from tunneld.services.driver import Driver

TID = bytes(range(12))
SRC: Address = ("198.51.100.7", 40000)
ZONE = "example.com."


def request(attrs: list[wire.Attribute] | None = None, *, cls: int = wire.REQUEST, method: int = wire.BINDING,
            fingerprint: bool = True, tid: bytes = TID) -> bytes:
    return wire.encode(method, cls, tid, attrs or [], fingerprint=fingerprint)


@pytest.mark.parametrize(("source", "seen"), [
    (SRC, SRC),
    (("2001:db8::7", 5), ("2001:db8::7", 5)),
    (("::ffff:198.51.100.7", 40000), SRC),  # a dual-stack socket's view of an IPv4 client
])
def test_a_binding_request_gets_its_source_as_xor_mapped_address(source: Address, seen: Address) -> None:
    req = request()
    answer = respond(req, source)
    assert answer is not None
    msg = wire.decode(answer)
    assert (msg.method, msg.cls, msg.transaction_id) == (wire.BINDING, wire.SUCCESS, TID)
    assert msg.xor_mapped_address() == seen
    assert wire.check_fingerprint(msg) and msg.software() is None
    assert len(answer) <= len(req) + 32


def test_software_is_optional() -> None:
    answer = respond(request(fingerprint=False), SRC, software="tunneld 1")
    assert answer is not None and wire.decode(answer).software() == "tunneld 1"


def test_unknown_comprehension_required_attributes_get_a_420() -> None:
    change_request, priority = 0x0003, 0x0024  # RFC 5780 and ICE attributes we do not understand
    req = request([(change_request, b"\0\0\0\x06"), (priority, b"\0\0\0\x01"), (0x8077, b"ok"),
                   (wire.USERNAME, b"someone")])
    counters: Counter[str] = Counter()
    answer = respond(req, SRC, counters=counters)
    assert answer is not None
    msg = wire.decode(answer)
    assert (msg.cls, msg.transaction_id) == (wire.ERROR, TID)
    assert msg.error_code() == (420, "Unknown Attribute")
    assert msg.unknown_attributes() == (change_request, priority)  # not the optional one, not USERNAME
    assert wire.check_fingerprint(msg) and msg.xor_mapped_address() is None
    assert counters == Counter({"stun: 420 unknown attribute": 1})


def test_a_420_is_at_most_40_bytes_larger_than_its_request() -> None:
    for n in range(1, 12):
        req = request([(0x7000 + i, b"") for i in range(n)], fingerprint=False)
        answer = respond(req, ("2001:db8::7", 5))
        assert answer is not None and len(answer) <= len(req) + 40, n


@pytest.mark.parametrize("req", [
    request(cls=wire.INDICATION),  # §6.3.2: no answer to an indication
    request(cls=wire.SUCCESS),
    request(cls=wire.ERROR),
    request(method=wire.ALLOCATE),  # we are not a TURN server
    request()[:-1] + bytes([request()[-1] ^ 1]),  # a bad FINGERPRINT
    b"\x00\x01\x00\x00" + bytes(16),  # RFC 3489: no magic cookie
    b"",
])
def test_what_is_not_a_good_binding_request_is_dropped(req: bytes) -> None:
    counters: Counter[str] = Counter()
    assert respond(req, SRC, counters=counters) is None
    assert sum(counters.values()) == 1 and "stun: answered" not in counters


def test_hostile_datagrams_never_raise() -> None:
    rng = random.Random(7)
    seeds = [request(), request([(0x0003, b"\0\0\0\0")]), request(fingerprint=False)]
    answered = 0
    for i in range(3000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if i % 4 == 0:
            data = data[: rng.randrange(len(data) + 1)]
        answer = respond(bytes(data), SRC)
        if answer is not None:
            answered += 1
            assert wire.decode(answer).cls in (wire.SUCCESS, wire.ERROR)
    assert answered < 3000


# ---- the listeners, on loopback --------------------------------------------------------------------------


def _core() -> DnsCore:
    return DnsCore(ZoneStore(":memory:", ZONE, "ns.example.com.", 53), [], Policy(default_lease=3600))


def _free_udp() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_answers_stun_on_the_dns_port_and_a_stun_port_and_dns_still_works() -> None:
    async def main() -> None:
        port, extra = free_port(), _free_udp()
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve, _core(), "127.0.0.1", port, stun_ports=[extra]))
            with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                await sock.bind(("127.0.0.1", 0))
                me = sock.getsockname()
                # Our client core over the one driver: two servers (two ports), so a verdict.
                kinds: list[NatKind] = []
                done = trio.Event()

                def on_event(e: StunEvent) -> None:
                    if isinstance(e, NatKind):
                        kinds.append(e)
                        done.set()

                client = StunClient([("127.0.0.1", port), ("127.0.0.1", extra)])
                driver = Driver(client, [sock], on_event=on_event, name="stun")
                async with trio.open_nursery() as inner:
                    await inner.start(driver.run)
                    with trio.fail_after(5):
                        await done.wait()
                    inner.cancel_scope.cancel()
                assert kinds == [NatKind(ENDPOINT_INDEPENDENT, (me[0], me[1]))]
                assert client.observed == {("127.0.0.1", port): me, ("127.0.0.1", extra): me}
                # DNS on the same port as ever.
                await sock.sendto(dns.message.make_query(ZONE, "SOA").to_wire(), ("127.0.0.1", port))
                with trio.fail_after(5):
                    reply = dns.message.from_wire(await sock.recv(65535))
                assert reply.rcode() == dns.rcode.NOERROR and reply.answer
                # The STUN-only port ignores DNS: a STUN request sent after it is the next answer.
                await sock.sendto(dns.message.make_query(ZONE, "SOA").to_wire(), ("127.0.0.1", extra))
                await sock.sendto(request(), ("127.0.0.1", extra))
                with trio.fail_after(5):
                    assert wire.decode(await sock.recv(65535)).xor_mapped_address() == me
            nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.mark.parametrize(("attrs", "limits", "cls"), [
    ([], RrlLimits(answers_per_second=1, errors_per_second=100, burst=5, slip=2), wire.SUCCESS),
    ([(0x0003, b"\0\0\0\0")], RrlLimits(answers_per_second=100, errors_per_second=1, burst=5, slip=2),
     wire.ERROR),  # 420s count as errors
])
def test_stun_answers_are_rate_limited_per_source(attrs: list[wire.Attribute], limits: RrlLimits,
                                                  cls: int) -> None:
    async def main() -> list[bytes]:
        port = free_port()
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve, _core(), "127.0.0.1", port, rrl=limits))
            replies: list[bytes] = []
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, \
                    trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as last:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                sock.setblocking(False)
                sock.bind(("127.0.0.1", 0))
                sock.connect(("127.0.0.1", port))
                for i in range(60):
                    sock.send(request(attrs, tid=i.to_bytes(12, "big")))
                # Answered in arrival order: once another /24's request is answered, the flood's are sent.
                await last.bind(("127.0.9.1", 0))
                await last.sendto(request(), ("127.0.0.1", port))
                with trio.fail_after(5):
                    await last.recv(65535)
                while True:
                    try:
                        replies.append(sock.recv(65535))
                    except BlockingIOError:
                        break
            nursery.cancel_scope.cancel()
        return replies

    replies = trio.run(main)
    assert 5 <= len(replies) <= 8  # the burst (a token or two more on a slow machine); no slips for STUN
    assert all(wire.decode(r).cls == cls for r in replies)


def test_a_stun_port_in_use_is_named() -> None:
    async def main() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
            taken.bind(("127.0.0.1", 0))
            with pytest.raises(OSError) as e:
                await serve(_core(), "127.0.0.1", free_port(), stun_ports=[taken.getsockname()[1]])
            assert e.value.filename == f"127.0.0.1:{taken.getsockname()[1]}"

    trio.run(main)
