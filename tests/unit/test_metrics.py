"""tunneld.services.metrics and tunneld.dnsserver.metrics: the bounded HTTP side (one request per
connection, 404/405, head size, slow clients, the connection cap) and the collectors read at scrape time."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import dns.tsig
import dns.update
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tunneld.config_values import Problem, listen_address
from tunneld.dnsserver.core import DnsCore
from tunneld.dnsserver.llq import LLQServer
from tunneld.dnsserver.metrics import DnsCollector
from tunneld.dnsserver.serve import _Server
from tunneld.dnsserver.store import ZoneStore
from tunneld.services.metrics import DaemonCollector, HttpLimits, MetricsServer, renderer

BODY = b"# HELP x y\n"


async def _exchange(port: int, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        out = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                out += chunk
        return out


def _run(test: Any, limits: HttpLimits | None = None) -> MetricsServer:
    server = MetricsServer(lambda: BODY, "127.0.0.1", 0, limits)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.run)
            assert isinstance(port, int) and port > 0 and server.port == port
            await test(port, server)
            nursery.cancel_scope.cancel()

    trio.run(main)
    return server


def test_get_metrics_is_answered_and_the_connection_closed() -> None:
    async def test(port: int, server: MetricsServer) -> None:
        reply = await _exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"Content-Type: text/plain; version=0.0.4" in head and b"Connection: close" in head
        assert f"Content-Length: {len(BODY)}".encode() in head and body == BODY
        reply = await _exchange(port, b"GET /metrics?name[]=x HTTP/1.0\n\n")  # a query; bare newlines
        assert reply.startswith(b"HTTP/1.1 200 ")

    server = _run(test)
    assert server.counters["answered 200"] == 2 and server.active == 0


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GET / HTTP/1.1\r\n\r\n", b"404"),
    (b"GET /metricsx HTTP/1.1\r\n\r\n", b"404"),
    (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b"405"),
    (b"HEAD /metrics HTTP/1.1\r\n\r\n", b"405"),
    (b"GET /metrics\r\n\r\n", b"400"),
    (b"\r\n\r\n", b"400"),
    (b"GET /metrics SMTP/1\r\n\r\n", b"400"),
])
def test_other_paths_methods_and_garbage(request_bytes: bytes, status: bytes) -> None:
    async def test(port: int, server: MetricsServer) -> None:
        reply = await _exchange(port, request_bytes)
        assert reply.startswith(b"HTTP/1.1 " + status + b" "), reply
        assert BODY not in reply
        if status == b"405":
            assert b"\r\nAllow: GET\r\n" in reply

    _run(test)


def test_a_head_over_the_limit_is_refused_unread() -> None:
    async def test(port: int, server: MetricsServer) -> None:
        reply = await _exchange(port, b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 431 ")
        ok = b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n"  # 8 KB and a little less
        assert len(ok) <= 8192 and (await _exchange(port, ok)).startswith(b"HTTP/1.1 200 ")

    _run(test)


def test_a_client_that_stops_half_way_is_told_so() -> None:
    async def test(port: int, server: MetricsServer) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /metrics HTTP/1.1\r\n")
            await stream.send_eof()
            with trio.fail_after(5):
                assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 400 ")

    _run(test)


def test_a_slow_client_is_dropped_after_the_timeout() -> None:
    async def test(port: int, server: MetricsServer) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /metr")  # and nothing more
            start = trio.current_time()
            with trio.fail_after(5):
                assert await stream.receive_some(4096) == b""  # closed without an answer
            assert 0.2 <= trio.current_time() - start < 3

    server = _run(test, HttpLimits(timeout=0.3))
    assert server.counters["timed out"] == 1


def test_connections_beyond_the_cap_are_closed_at_once() -> None:
    async def test(port: int, server: MetricsServer) -> None:
        idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        with trio.fail_after(5):
            while server.active < 2:  # both accepted and waiting for their request
                await trio.sleep(0.01)
        extra = await trio.open_tcp_stream("127.0.0.1", port)
        async with extra:
            with trio.fail_after(5):
                assert await extra.receive_some(4096) == b""
        assert server.counters["refused: too many connections"] == 1
        await idle[0].aclose()  # a slot frees: the next scrape is answered
        with trio.fail_after(5):
            while server.active > 1:
                await trio.sleep(0.01)
        assert (await _exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        await idle[1].aclose()

    _run(test, HttpLimits(max_connections=2, timeout=10))


def test_a_failing_collector_is_a_500_and_the_server_stays(caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def render() -> bytes:
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("peers")
        return BODY

    async def main() -> None:
        server = MetricsServer(render, "127.0.0.1", 0)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.run)
            assert (await _exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 500 ")
            reply = await _exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(BODY)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert "rendering the metrics failed" in caplog.text


def test_a_port_in_use_is_one_line() -> None:
    from tunneld.services.metrics import MetricsError

    async def main() -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        with pytest.raises(MetricsError, match=rf"cannot serve metrics on 127\.0\.0\.1:{port}: .*in use"):
            await MetricsServer(lambda: BODY, "127.0.0.1", port).run()
        await listeners[0].aclose()

    trio.run(main)


# -- the daemon's collector --------------------------------------------------------------------------------

def _peer(name: str, **kw: Any) -> dict[str, Any]:
    p = {"name": name, "rx_bytes": 0, "tx_bytes": 0, "rx_packets": 0, "tx_packets": 0, "handshakes": 0,
         "last_handshake": None, "session_age": None, "path": "direct", "dropped_spoofed": 0,
         "dropped_inbound": 0, "replayed": 0}
    return {**p, **kw}


STATUS: dict[str, Any] = {
    "state": "up",
    "peers": [_peer("desk", rx_bytes=1500, tx_bytes=3000, rx_packets=10, tx_packets=20, handshakes=2,
                    last_handshake=1000.0, session_age=3.0, path="relay", replayed=4),
              _peer("phone")],
    "counters": {"rx_datagrams": 33, "rx_malformed": 1, "tx_no_route": 2, "handshake_drops": {"bad mac": 5}},
    "publish": {"state": "published", "lease_left": 5000.5},
    "watch": {"state": "watching", "browse": {"_autotunnel._udp PTR": "established"},
              "hosts": {"desk": {"complete": True, "clients": {"desk AAAA": "established",
                                                              "desk TXT": "polling"}},
                        "odd": {"complete": False, "clients": {}}}},
    "portmap": {"state": "mapping", "protocol": "pcp", "lifetime_left": 7000.0},
}


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def test_the_daemon_collector_reads_the_status_at_each_scrape() -> None:
    status = {**STATUS}
    render = renderer(DaemonCollector(lambda: status, wall=lambda: 1012.5))
    m = _samples(render())
    desk, phone = (("peer", "desk"),), (("peer", "phone"),)
    assert m["tunneld_up", ()] == 1 and m["tunneld_peers", ()] == 2
    assert m["tunneld_peer_rx_bytes_total", desk] == 1500 and m["tunneld_peer_tx_bytes_total", desk] == 3000
    assert m["tunneld_peer_rx_packets_total", desk] == 10 and m["tunneld_peer_tx_packets_total", desk] == 20
    assert m["tunneld_peer_handshakes_total", desk] == 2 and m["tunneld_peer_handshakes_total", phone] == 0
    assert m["tunneld_peer_last_handshake_age_seconds", desk] == 12.5
    assert ("tunneld_peer_last_handshake_age_seconds", phone) not in m  # none yet: no sample
    assert m["tunneld_peer_session", desk] == 1 and m["tunneld_peer_session", phone] == 0
    assert m["tunneld_peer_path", (("path", "relay"), ("peer", "desk"))] == 1
    assert m["tunneld_peer_path", (("path", "direct"), ("peer", "phone"))] == 1
    assert m["tunneld_peer_dropped_total", (("peer", "desk"), ("reason", "replayed"))] == 4
    assert m["tunneld_rx_datagrams_total", ()] == 33
    assert m["tunneld_dropped_total", (("reason", "rx_malformed"),)] == 1
    assert m["tunneld_dropped_total", (("reason", "tx_no_route"),)] == 2
    assert m["tunneld_dropped_total", (("reason", "udp_send_errors"),)] == 0
    assert m["tunneld_handshake_drops_total", (("reason", "bad mac"),)] == 5
    assert m["tunneld_publish_state", (("state", "published"),)] == 1
    assert m["tunneld_publish_lease_left_seconds", ()] == 5000.5
    assert m["tunneld_watch_state", (("state", "watching"),)] == 1
    assert m["tunneld_watch_devices", ()] == 2 and m["tunneld_watch_devices_complete", ()] == 1
    assert m["tunneld_watch_llqs", (("state", "established"),)] == 2
    assert m["tunneld_watch_llqs", (("state", "polling"),)] == 1
    assert m["tunneld_portmap_state", (("protocol", "pcp"), ("state", "mapping"))] == 1
    assert m["tunneld_portmap_lifetime_left_seconds", ()] == 7000
    status["peers"] = [_peer("desk", rx_bytes=9000)]  # read again at the next scrape
    status["publish"] = {"state": "failed", "lease_left": None}
    m = _samples(render())
    assert m["tunneld_peer_rx_bytes_total", desk] == 9000 and m["tunneld_peers", ()] == 1
    assert m["tunneld_publish_state", (("state", "failed"),)] == 1
    assert "tunneld_publish_lease_left_seconds" not in {name for name, _ in m}


def test_a_starting_daemon_without_services() -> None:
    bare = {"state": "starting", "peers": [], "counters": {}, "publish": {"state": "disabled"},
            "watch": {"state": "disabled"}, "portmap": {"state": "disabled", "protocol": None}}
    m = _samples(renderer(DaemonCollector(lambda: bare))())
    assert m["tunneld_up", ()] == 0 and m["tunneld_peers", ()] == 0
    assert m["tunneld_portmap_state", (("protocol", "none"), ("state", "disabled"))] == 1


# -- the DNS server's collector ----------------------------------------------------------------------------

ZONE = "example.com."
KEY = dns.tsig.Key(ZONE, b"k" * 32, dns.tsig.HMAC_SHA256)


def test_the_dns_collector_counts_queries_updates_and_refusals(tmp_path: Path) -> None:
    store = ZoneStore(str(tmp_path / "zone.db"), ZONE, "ns." + ZONE, 53, addresses=["192.0.2.53"])
    core = DnsCore(store, [KEY])
    server = _Server(core, LLQServer(core))
    src = ("192.0.2.1", 5353)
    query = dns.message.make_query(ZONE, "SOA").to_wire()
    server.handle(query, src, None)
    server.handle(query, src, None)
    unsigned = dns.update.UpdateMessage(ZONE)
    unsigned.add("x." + ZONE, 60, "A", "192.0.2.9")
    reply, _ = server.handle(unsigned.to_wire(), src, None)
    assert reply is not None and dns.message.from_wire(reply).rcode() == dns.rcode.REFUSED
    signed = dns.update.UpdateMessage(ZONE, keyring={KEY.name: KEY}, keyname=KEY.name,
                                      keyalgorithm=KEY.algorithm)
    signed.add("x." + ZONE, 60, "A", "192.0.2.9")
    signed.use_edns(0, options=[])
    server.handle(signed.to_wire(), src, None)
    server.handle(b"\x00\x01\x00\x00\x00\x01" + bytes(6), src, None)  # a question missing: FORMERR
    server.rrl.counters["dropped: answer"] += 3
    m = _samples(renderer(DnsCollector(server))())
    assert m["tunneld_dns_queries_total", (("result", "NOERROR"),)] == 2
    # both refused: unsigned, and signed without a lease option (no --default-lease)
    assert m["tunneld_dns_updates_total", (("result", "REFUSED"),)] == 2
    assert sum(v for (name, _), v in m.items() if name == "tunneld_dns_malformed_total") == 1
    assert m["tunneld_dns_llqs", ()] == 0
    assert m["tunneld_dns_rate_limit_total", (("outcome", "dropped: answer"),)] == 3
    store.close()


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:9586", ("127.0.0.1", 9586)), ("[::1]:9586", ("::1", 9586)),
])
def test_listen_addresses(text: str, expected: tuple[str, int]) -> None:
    assert listen_address(text) == expected


@pytest.mark.parametrize(("text", "problem"), [
    ("localhost:9586", "not an IP address"), ("127.0.0.1", "no port"), ("127.0.0.1:0", "not a port"),
    ("::1:9586", "without brackets"),
])
def test_bad_listen_addresses(text: str, problem: str) -> None:
    with pytest.raises(Problem, match=problem):
        listen_address(text)


def test_metrics_config(tmp_path: Path) -> None:
    from tests.helpers import account_toml, load_toml
    from tunneld.config import ConfigError

    account = account_toml(tmp_path, bytes(32), "home.example.net")
    assert load_toml(tmp_path, account).metrics.listen is None
    loaded = load_toml(tmp_path, account + '\n[metrics]\nlisten = "127.0.0.1:9586"\n')
    assert loaded.metrics.listen == ("127.0.0.1", 9586)
    with pytest.raises(ConfigError, match=r"metrics\.listen.*not an IP address"):
        load_toml(tmp_path, account + '\n[metrics]\nlisten = "metrics.example:9586"\n')
    with pytest.raises(ConfigError, match="unknown"):
        load_toml(tmp_path, account + '\n[metrics]\nport = 9586\n')


def test_time_is_wall_clock_by_default() -> None:
    collector = DaemonCollector(lambda: STATUS)
    assert abs(collector.wall() - time.time()) < 5


def test_the_dns_collector_shows_front_mode(tmp_path: Path) -> None:
    """In front mode (serve-dns --primary) the forwards, the link to the primary and the change feed are
    exported; without it, none of the three families appears."""
    from collections import Counter
    from types import SimpleNamespace

    store = ZoneStore(str(tmp_path / "zone.db"), ZONE, "ns." + ZONE, 53, addresses=["192.0.2.53"])
    server = _Server(DnsCore(store, [KEY]), None)
    names = {name for name, _ in _samples(renderer(DnsCollector(server))())}
    assert not {n for n in names if n.startswith(("tunneld_dns_front", "tunneld_dns_primary_link",
                                                  "tunneld_dns_feed"))}
    server.front = SimpleNamespace(counters=Counter({"update: primary NOERROR": 4}))
    server.link = SimpleNamespace(counters=Counter({"connections": 1}))
    server.feed = SimpleNamespace(feed=SimpleNamespace(counters=Counter({"transfer: IXFR": 2})))
    m = _samples(renderer(DnsCollector(server))())
    assert m["tunneld_dns_front_total", (("what", "update: primary NOERROR"),)] == 4
    assert m["tunneld_dns_primary_link_total", (("outcome", "connections"),)] == 1
    assert m["tunneld_dns_feed_total", (("what", "transfer: IXFR"),)] == 2
    store.close()
