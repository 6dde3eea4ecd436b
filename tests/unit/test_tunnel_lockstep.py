"""tunneld.proto.tunnel.TunnelCore, deterministic scenarios one datagram at a time: two cores without
trio, datagrams queued and delivered by hand, `now` a number (the network model is test_tunnel_core's)."""

from __future__ import annotations

from collections.abc import Callable

from tests.unit.test_tunnel_core import EPOCH, Net, Node, T, inner, is_initiation, seq_of
from tunneld.crypto.esp import Kind, classify
from tunneld.proto.tunnel import Output


class Pump:
    """Two cores, no trio: datagrams are queued and delivered by hand, `now` is a number."""

    def __init__(self) -> None:
        self.net = Net(0)
        self.queue: list[tuple[Node, Node, bytes]] = []  # (from, to, datagram)

    def push(self, src: Node, out: Output) -> None:
        for flight in out.sends:
            self.queue.extend((src, self.net.by_addr[flight.destination], d) for d in flight.all_datagrams())

    def take(self, pred: Callable[[Node, bytes], bool]) -> tuple[Node, Node, bytes]:
        (item,) = [q for q in self.queue if pred(q[0], q[2])]
        self.queue.remove(item)
        return item

    def deliver(self, item: tuple[Node, Node, bytes], now: float) -> list[bytes]:
        src, dst, data = item
        out = dst.core.inbound([(data, src.addr)], now, EPOCH + now)
        self.push(dst, out)
        return out.tun_in_order()

    def send(self, node: Node, seq: int, now: float) -> None:
        pkt = inner(node.ula, self.net.other(node).ula, seq)
        self.push(node, node.core.outbound([pkt], [], now, EPOCH + now))


def test_crossing_initiations_keep_both_sessions() -> None:
    """Regression (fixed): both apps send at the same time, so both sides initiate; each initiation arrives
    before the other side's response. Each side then holds a responder session (`next`) for the peer's
    handshake when its own response arrives. wireguard-go (BeginSymmetricSession, initiator branch)
    moves `next` to `previous`, so the packets the peer sends on the session it initiated are still
    accepted, and data flows both ways at once. Peer.add_session used to drop `next`; each side then sent on
    a session the other had discarded: every data packet was dropped as an unknown SPI until the
    new-handshake timer fires 15 s later (and the retry may cross again)."""
    pump = Pump()
    a, b = pump.net.a, pump.net.b
    pump.send(a, 0, 0.0)
    pump.send(b, 1_000_000, 0.0)
    init = lambda who: lambda src, d: src is who and is_initiation(d)  # noqa: E731
    resp = lambda who: lambda src, d: src is who and classify(d) is Kind.CONTROL  # noqa: E731
    pump.deliver(pump.take(init(a)), 0.01)  # b answers a's initiation
    pump.deliver(pump.take(init(b)), 0.01)  # a answers b's
    pump.deliver(pump.take(resp(b)), 0.02)  # a's handshake completes: a sends seq 0
    pump.deliver(pump.take(resp(a)), 0.02)  # b's completes: b sends seq 1_000_000
    got: dict[str, list[int]] = {"a": [], "b": []}
    while pump.queue:
        item = pump.queue[0]
        pump.queue.pop(0)
        got[item[1].name] += [seq_of(p) for p in pump.deliver(item, 0.03)]
    assert got == {"a": [1_000_000], "b": [0]}
    assert a.core.counters.rx_unknown_spi == b.core.counters.rx_unknown_spi == 0


def test_responder_does_not_initiate_right_after_answering() -> None:
    """Regression (fixed): b answers a's initiation and, before a's first packet confirms the session, b's
    app sends. wireguard-go sets lastSentHandshake in SendHandshakeResponse and SendHandshakeInitiation
    refuses to start a handshake within RekeyTimeout (5 s) of it, so b stages the packet and sends it
    when a's packet confirms the session a moment later. TunnelCore used to initiate at once (Peer.wants_rekey
    is true, no handshake "in progress"): a needless second handshake that crosses a's, the situation
    of test_crossing_initiations_keep_both_sessions."""
    pump = Pump()
    a, b = pump.net.a, pump.net.b
    pump.send(a, 0, 0.0)
    pump.deliver(pump.queue.pop(0), 0.01)  # b answers; its response is in flight
    pump.send(b, 1_000_000, 0.015)
    assert [d for src, _, d in pump.queue if src is b and is_initiation(d)] == []
    assert len(b.peer.staged) == 1
    pump.deliver(pump.take(lambda src, d: src is b), 0.02)  # the response: a completes, sends seq 0
    assert [seq_of(p) for p in pump.deliver(pump.take(lambda src, d: src is a), 0.03)] == [0]
    # the confirmation releases b's staged packet on the new session
    assert [seq_of(p) for p in pump.deliver(pump.take(lambda src, d: src is b), 0.04)] == [1_000_000]


def test_handshake_in_lockstep_delivers_staged_data_once() -> None:
    """The plain sequence: initiation, response, the staged packets as key confirmation."""
    pump = Pump()
    a, b = pump.net.a, pump.net.b
    for i in range(3):
        pump.send(a, i, 0.0)
    assert len(pump.queue) == 1 and is_initiation(pump.queue[0][2])
    assert a.peer.handshake_in_progress() and len(a.peer.staged) == 3
    assert pump.deliver(pump.queue.pop(0), 0.01) == []  # b answers
    assert b.peer.next is not None and b.peer.current is None
    assert pump.deliver(pump.queue.pop(0), 0.02) == []  # a completes and flushes its staged packets
    assert a.peer.handshakes == 1 and not a.peer.handshake_in_progress() and len(a.peer.staged) == 0
    items, pump.queue = pump.queue, []
    assert len(items) == 3 and all(classify(d) is Kind.ESP for _, _, d in items)  # one seal_many batch
    assert [seq_of(p) for p in pump.deliver(items[0], 0.03)] == [0]
    assert b.peer.current is not None and b.peer.current.confirmed and b.peer.next is None
    assert [seq_of(p) for p in pump.deliver(items[2], 0.03)] == [2]  # reordered: still accepted
    assert [seq_of(p) for p in pump.deliver(items[1], 0.03)] == [1]
    assert pump.deliver(items[1], 0.04) == []  # a duplicate is not
    assert a.peer.tx_packets == 3 and b.peer.rx_packets == 3
    assert b.status(0.04)["replayed"] == 1
    # b's answer needs no handshake: it goes out on the confirmed session at once.
    pump.send(b, 7, 0.05)
    (item,) = pump.queue
    pump.queue.clear()
    assert classify(item[2]) is Kind.ESP
    assert [seq_of(p) for p in pump.deliver(item, 0.06)] == [7]


def test_expired_session_is_not_accepted_on_receive() -> None:
    """Regression (fixed): a session older than reject_after_time is neither used nor *accepted*
    (WireGuard checks the keypair's age on receive). TunnelCore.inbound used to stop accepting only once
    poll() has expired the session; a caller that processes a datagram at `now` past the expiry before
    polling (the core is sans-I/O; nothing says poll must come first) still writes it to the TUN."""
    pump = Pump()
    a = pump.net.a
    pump.send(a, 0, 0.0)
    pump.deliver(pump.queue.pop(0), 0.0)
    pump.deliver(pump.queue.pop(0), 0.0)
    assert [seq_of(p) for p in pump.deliver(pump.queue.pop(0), 0.0)] == [0]
    # A packet sealed at 179 s (still valid then) is delivered at 181 s, before b has polled.
    pump.send(a, 1, 179.0)
    esp = [q for q in pump.queue if classify(q[2]) is Kind.ESP]
    assert len(esp) == 1
    assert pump.deliver(esp[0], T.reject_after_time + 1.0) == []
