"""Prometheus metrics over HTTP: ``GET /metrics`` on ``[metrics] listen`` (and ``serve-dns --metrics``).

The HTTP side is a few bounded lines of our own on a trio TCP listener: one request per connection, its
head at most :attr:`HttpLimits.max_head` bytes and read within :attr:`HttpLimits.timeout` seconds, at most
:attr:`HttpLimits.max_connections` at once (more are closed unanswered). ``/metrics`` answers 200 with
the text exposition format, any other path 404, any other method 405.

The body is prometheus-client's rendering of collectors that read the state when scraped, so nothing is
counted twice: the daemon's collector reads :meth:`Daemon.status` (the dict ``tunneld status --json``
shows); the DNS server's is in tunneld.dnsserver.metrics. Metric names and meanings:
docs/observability.md. This module is imported only when metrics are on (prometheus-client's import cost).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("tunneld.metrics")

# The text format every Prometheus reads (generate_latest's output with legal names, as ours are).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LINGER = 1.0  # seconds to read what a client still sends after its answer (so it gets the answer, no RST)

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error"}


class MetricsError(Exception):
    """The metrics listener could not be opened: one line for the command line."""


@dataclass(frozen=True)
class HttpLimits:
    max_head: int = 8192  # bytes of request line and headers
    timeout: float = 5.0  # seconds to read the request and write the answer
    max_connections: int = 8  # at once; a scraper needs one


class MetricsServer:
    """Serves ``render()`` (the exposition text) on GET /metrics at ``host:port``."""

    def __init__(self, render: Callable[[], bytes], host: str, port: int,
                 limits: HttpLimits | None = None) -> None:
        self.render = render
        self.host, self.port = host, port
        self.limits = limits or HttpLimits()
        self.active = 0
        self.counters: Counter[str] = Counter()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen (``task_status.started(port)`` once bound; MetricsError if it cannot) and serve."""
        try:
            listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        except OSError as e:
            where = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
            raise MetricsError(f"cannot serve metrics on {where}: {e.strerror or e}; choose another "
                               f"address or port ([metrics] listen, or serve-dns --metrics)") from None
        self.port = listeners[0].socket.getsockname()[1]
        log.info("metrics on http://%s/metrics",
                 f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}")
        await trio.serve_listeners(self.handle, listeners,
                                   task_status=_Started(task_status, self.port))

    async def handle(self, stream: trio.abc.Stream) -> None:
        """One connection: one request, one answer, then closed."""
        if self.active >= self.limits.max_connections:
            self.counters["refused: too many connections"] += 1
            await trio.aclose_forcefully(stream)
            return
        self.active += 1
        try:
            with trio.move_on_after(self.limits.timeout) as scope:
                status, body = await self._answer(stream)
                await stream.send_all(_response(status, body))
                self.counters[f"answered {status}"] += 1
                await _linger(stream)
            if scope.cancelled_caught:
                self.counters["timed out"] += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.counters["connection lost"] += 1
        finally:
            self.active -= 1
            await trio.aclose_forcefully(stream)

    async def _answer(self, stream: trio.abc.Stream) -> tuple[int, bytes]:
        head = bytearray()
        while b"\r\n\r\n" not in head and b"\n\n" not in head:
            if len(head) >= self.limits.max_head:
                return 431, b"request head too large\n"
            chunk = await stream.receive_some(self.limits.max_head - len(head))
            if not chunk:
                return 400, b"incomplete request\n"
            head += chunk
        parts = bytes(head.split(b"\n", 1)[0]).strip().split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return 400, b"bad request line\n"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method != b"GET":
            return 405, b"only GET\n"
        if target != b"/metrics":
            return 404, b"metrics are at /metrics\n"
        try:
            return 200, self.render()
        except Exception:  # a collector's bug must not take the daemon down with it
            log.exception("rendering the metrics failed")
            return 500, b"rendering the metrics failed; see the log\n"


async def _linger(stream: trio.abc.Stream) -> None:
    """Half-close, then discard what the client still sends (a bounded amount, for at most LINGER):
    closing with unread data would reset the connection, and the client could lose the answer."""
    if isinstance(stream, trio.SocketStream):
        await stream.send_eof()
    with trio.move_on_after(LINGER):
        for _ in range(16):
            if not await stream.receive_some(65536):
                break


class _Started:
    """Tells the starter the bound port, where trio.serve_listeners would tell the listeners."""

    def __init__(self, inner: Any, port: int) -> None:
        self.inner, self.port = inner, port

    def started(self, value: object = None) -> None:
        self.inner.started(self.port)


def _response(status: int, body: bytes) -> bytes:
    kind = CONTENT_TYPE if status == 200 else "text/plain; charset=utf-8"
    allow = "Allow: GET\r\n" if status == 405 else ""
    return (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
            f"{allow}Connection: close\r\n\r\n").encode() + body


def renderer(collector: Collector) -> Callable[[], bytes]:
    """The exposition text of ``collector``, rendered by prometheus-client at each call."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return lambda: generate_latest(registry)


# -- the daemon's metrics -----------------------------------------------------------------------------------

_PEER_COUNTERS = (("rx_bytes", "tunneld_peer_rx_bytes", "Bytes received from the peer (inner packets)"),
                  ("tx_bytes", "tunneld_peer_tx_bytes", "Bytes sent to the peer (inner packets)"),
                  ("rx_packets", "tunneld_peer_rx_packets", "Packets received from the peer"),
                  ("tx_packets", "tunneld_peer_tx_packets", "Packets sent to the peer"),
                  ("handshakes", "tunneld_peer_handshakes", "Handshakes completed with the peer"))
_PEER_DROPS = (("dropped_spoofed", "spoofed source"), ("dropped_inbound", "failed to open"),
               ("replayed", "replayed"))
_DROPS = ("rx_malformed", "rx_unknown_spi", "tx_no_route", "tx_no_endpoint", "tun_write_drops",
          "udp_send_errors")


class DaemonCollector(Collector):
    """The daemon's state at scrape time, from ``status()`` (the dict of ``tunneld status --json``)."""

    def __init__(self, status: Callable[[], Mapping[str, Any]],
                 wall: Callable[[], float] = time.time) -> None:
        self.status = status
        self.wall = wall

    def collect(self) -> Iterator[Metric]:
        st = self.status()
        yield _gauge("tunneld_up", "1 once every service started", 1 if st.get("state") == "up" else 0)
        yield from self._peers(st.get("peers", []))
        c = st.get("counters", {})
        yield _counter("tunneld_rx_datagrams", "UDP datagrams received on the tunnel socket",
                       c.get("rx_datagrams", 0))
        drops = CounterMetricFamily("tunneld_dropped", "Datagrams and packets dropped, by reason",
                                    labels=["reason"])
        for key in _DROPS:
            drops.add_metric([key], c.get(key, 0))
        yield drops
        yield _by_label("tunneld_handshake_drops", "Handshake messages refused, by reason", "reason",
                        c.get("handshake_drops", {}))
        yield from self._services(st)

    def _peers(self, peers: list[dict[str, Any]]) -> Iterator[Metric]:
        yield _gauge("tunneld_peers", "Peers in the table", len(peers))
        for key, name, doc in _PEER_COUNTERS:
            family = CounterMetricFamily(name, doc, labels=["peer"])
            for p in peers:
                family.add_metric([p["name"]], p.get(key) or 0)
            yield family
        age = GaugeMetricFamily("tunneld_peer_last_handshake_age_seconds",
                                "Seconds since the last completed handshake (absent before the first)",
                                labels=["peer"])
        session = GaugeMetricFamily("tunneld_peer_session", "1 while the peer has a session", labels=["peer"])
        path = GaugeMetricFamily("tunneld_peer_path", "1 for the path the peer's packets take",
                                 labels=["peer", "path"])
        dropped = CounterMetricFamily("tunneld_peer_dropped", "The peer's packets dropped, by reason",
                                      labels=["peer", "reason"])
        now = self.wall()
        for p in peers:
            if p.get("last_handshake") is not None:
                age.add_metric([p["name"]], max(0.0, now - p["last_handshake"]))
            session.add_metric([p["name"]], 0 if p.get("session_age") is None else 1)
            if p.get("path"):
                path.add_metric([p["name"], str(p["path"])], 1)
            for key, reason in _PEER_DROPS:
                dropped.add_metric([p["name"], reason], p.get(key) or 0)
        yield from (age, session, path, dropped)

    def _services(self, st: Mapping[str, Any]) -> Iterator[Metric]:
        pub = st.get("publish", {})
        yield _state("tunneld_publish_state", "1 for the publisher's state", pub.get("state"))
        if pub.get("lease_left") is not None:
            yield _gauge("tunneld_publish_lease_left_seconds", "Seconds left on the published lease",
                         pub["lease_left"])
        watch = st.get("watch", {})
        yield _state("tunneld_watch_state", "1 for the watcher's state", watch.get("state"))
        hosts = watch.get("hosts", {})
        yield _gauge("tunneld_watch_devices", "The account's devices seen through DNS", len(hosts))
        yield _gauge("tunneld_watch_devices_complete", "Devices whose records are complete and valid",
                     sum(1 for h in hosts.values() if h.get("complete")))
        llqs: Counter[str] = Counter(watch.get("browse", {}).values())
        for h in hosts.values():
            llqs.update(h.get("clients", {}).values())
        yield _by_label("tunneld_watch_llqs", "Long-lived queries, by state", "state", llqs, gauge=True)
        pm = st.get("portmap", {})
        family = GaugeMetricFamily("tunneld_portmap_state", "1 for the port mapping's state and protocol",
                                   labels=["state", "protocol"])
        family.add_metric([str(pm.get("state")), str(pm.get("protocol") or "none")], 1)
        yield family
        if pm.get("lifetime_left") is not None:
            yield _gauge("tunneld_portmap_lifetime_left_seconds", "Seconds left on the gateway's mapping",
                         pm["lifetime_left"])


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _state(name: str, doc: str, state: object) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=["state"])
    family.add_metric([str(state)], 1)
    return family


def _by_label(name: str, doc: str, label: str, values: Mapping[str, float],
              gauge: bool = False) -> Metric:
    if gauge:
        g = GaugeMetricFamily(name, doc, labels=[label])
        for key, value in sorted(values.items()):
            g.add_metric([str(key)], value)
        return g
    c = CounterMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        c.add_metric([str(key)], value)
    return c


def daemon_server(status: Callable[[], Mapping[str, Any]], listen: tuple[str, int]) -> MetricsServer:
    """The daemon's metrics listener on ``listen``."""
    return MetricsServer(renderer(DaemonCollector(status)), *listen)
