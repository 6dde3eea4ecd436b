"""The rendezvous DNS server's metrics (``tunneld serve-dns --metrics ADDR:PORT``), read at scrape time from
the counters the listeners, the core, the LLQ server and the rate limiters already keep; served by
tunneld.services.metrics. Names and meanings: docs/observability.md.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tunneld.services.metrics import MetricsServer, renderer

if TYPE_CHECKING:
    from tunneld.dnsserver.serve import _Server


class DnsCollector(Collector):
    def __init__(self, server: _Server) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        s = self.server
        for opcode, name, doc in (("QUERY", "tunneld_dns_queries", "Queries answered, by result (rcode)"),
                                  ("UPDATE", "tunneld_dns_updates", "Updates answered, by result (rcode)")):
            yield _labelled(name, doc, "result",
                            {rcode: n for (op, rcode), n in s.answers.items() if op == opcode})
        yield _labelled("tunneld_dns_other_requests", "Requests of other opcodes, by opcode", "opcode",
                        Counter({op: n for (op, _), n in s.answers.items() if op not in ("QUERY", "UPDATE")}))
        llqs = GaugeMetricFamily("tunneld_dns_llqs", "Long-lived queries established")
        llqs.add_metric([], len(s.llq._llqs) if s.llq is not None else 0)
        yield llqs
        yield _labelled("tunneld_dns_llq_messages", "The LLQ server's messages and refusals, by what "
                        "happened", "what", s.llq.counters if s.llq is not None else {})
        yield _labelled("tunneld_dns_malformed", "Requests refused as malformed (FORMERR), by reason",
                        "reason", s.core.parse_errors)
        replays = CounterMetricFamily("tunneld_dns_update_replays", "Signed updates answered from the replay "
                                      "cache (a client's retransmission or a replay)")
        replays.add_metric([], s.core.replays)
        yield replays
        yield _labelled("tunneld_dns_rate_limit", "UDP answers by rate-limiting outcome", "outcome",
                        s.rrl.counters)
        yield _labelled("tunneld_dns_tcp_connections", "TCP connections by outcome", "outcome",
                        s.tcp.counters)
        if s.tls is not None:
            yield _labelled("tunneld_dns_tls_connections", "TLS connections (and DNS Push sessions) by "
                            "outcome", "outcome", s.tls.counters)
        if s.push is not None:
            sessions = GaugeMetricFamily("tunneld_dns_push_sessions", "DNS Push sessions open")
            sessions.add_metric([], len(s.push.sessions))
            yield sessions
            subscriptions = GaugeMetricFamily("tunneld_dns_push_subscriptions", "DNS Push subscriptions held")
            subscriptions.add_metric([], s.push.subscriptions)
            yield subscriptions
            yield _labelled("tunneld_dns_push_messages", "The DNS Push server's messages, refusals and "
                            "aborted sessions, by what happened", "what", s.push.counters)
        yield _labelled("tunneld_dns_stun", "STUN requests by outcome", "outcome",
                        s.stun_counters + s.stun_rrl.counters)
        if s.front is not None and s.link is not None:  # front mode (serve-dns --primary)
            yield _labelled("tunneld_dns_front", "Front mode: forwarded updates and lease deletions, by the "
                            "primary's answer", "what", s.front.counters)
            yield _labelled("tunneld_dns_primary_link", "Front mode: the link to the primary, by outcome",
                            "outcome", s.link.counters)
        if s.feed is not None:
            yield _labelled("tunneld_dns_feed", "Front mode: the primary's changes (NOTIFY, serial checks, "
                            "transfers), by what happened", "what", s.feed.feed.counters)


def _labelled(name: str, doc: str, label: str, values: Counter[str] | dict[str, int]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([str(key)], value)
    return family


def dns_server(server: _Server, listen: tuple[str, int]) -> MetricsServer:
    """The DNS server's metrics listener on ``listen``."""
    return MetricsServer(renderer(DnsCollector(server)), *listen)
