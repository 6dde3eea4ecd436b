"""The namespace tests that must run alone: they time real traffic or count CPU seconds (throughput,
latency percentiles against a baseline, a flood's CPU share), which a second test sharing this
machine's two cores would skew. tools/test.sh runs every other namespace test on two workers (they
mostly wait: on leases, NAT timeouts, retransmissions), then these one at a time."""

from __future__ import annotations

import pytest

EXCLUSIVE = frozenset({
    "test_attacks.py",  # CPU share of a handshake flood, p95 latency against a baseline
    "test_bench_attack.py", "test_bench_dns.py", "test_bench_e2e.py", "test_bench_relay.py",
    "test_bench_roam.py", "test_bench_rows.py",  # benchmark runs: rates and latencies
    "test_offload_traffic.py", "test_offload_capture.py",  # 1 GB transfers, GSO/GRO batching
    "test_tunnel.py",  # 200 MB transfers and streams across a rebind
    "test_tunnel_rekey.py",  # a stream across a rekey every second
    "test_llq_e2e.py",  # a watcher learning 100 devices within its time bound (500 DNS clients)
    "test_bench_scale.py",  # a daemon with 100 simulated peers: handshake times, RSS and a stream
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in EXCLUSIVE:
            item.add_marker(pytest.mark.exclusive)
