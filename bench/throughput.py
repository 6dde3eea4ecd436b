"""Throughput benchmarks.

`crypto`: per-packet cost of ESP for 1400-byte packets: (a) the bare `cryptography` AEAD
encrypt+decrypt loop, the ceiling that no ESP implementation on this library can beat; (b) our
SecurityAssociation seal+open, one packet per call and batched; (c) the run forms `seal_run`+`open_run`
(the offload path) on the `cryptography` path and, for AES-GCM where it is built, on the batch AES-GCM
extension (one native call per run, the GIL released). All are measured in
interleaved rounds, so that noise from other work on the machine falls on all of them alike, and
reported as medians with the ratio (b)/(a).

`e2e`: TCP throughput through real tunnels between two network namespaces (bench/e2e.py): plain veth,
wireguard-go and tunneld, with the CPU the tunnel daemon uses on each side; needs root. `--rows`
adds round trip idle and under load, small-packet rate and cost per byte (bench/rows.py).

Usage: python -m bench.throughput crypto [--suite S] [--packets N] [--batch B] [--rounds R] [--json]
       python -m bench.throughput e2e [--duration 10] [--runs 3] [--streams 1,4]
                                      [--modes veth,wireguard-go,tunneld] [--profile DIR] [--json]
                                      [--rows tcp,latency,small,cost] [--quick]
       python -m bench.throughput scale [--modes tunneld,wireguard-go] [--peers 1000] [--duration 10]
                                        [--runs 3] [--rate 0] [--quick] [--json]
       python -m bench.throughput dns [--updates 500] [--window 32] [--rounds 3] [--watchers 100]
                                      [--events 20] [--json]

`scale`: one daemon (tunneld, wireguard-go) with 1,000 simulated peers: its RSS, the time to complete
their handshakes, its idle CPU, and one TCP stream beside them (bench/scale.py); needs root.

`dns`: signed DNS UPDATEs per second against `tunneld serve-dns` and BIND in the same run, and
update-to-event latency with many LLQ watchers (bench/dns.py); needs root and BIND 9.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from bench import dns, e2e, rows, scale
from tunneld.crypto.aead import SUITES
from tunneld.crypto.esp import NATIVE_GCM, SecurityAssociation, lay_out, trailer


def _bare(suite: str, payload: bytes, n: int) -> Callable[[], None]:
    key = os.urandom(SUITES[suite].key_len)
    ctx = ChaCha20Poly1305(key) if suite == "chacha20-poly1305" else AESGCM(key)
    enc, dec = ctx.encrypt, ctx.decrypt
    nonce, aad = os.urandom(12), os.urandom(12)

    def run() -> None:
        for _ in range(n):
            dec(nonce, enc(nonce, payload, aad), aad)

    return run


def _pair(suite: str, native: bool = True) -> tuple[SecurityAssociation, SecurityAssociation]:
    key, salt = os.urandom(SUITES[suite].key_len), os.urandom(4)
    return (SecurityAssociation(0x1000, key, salt, aead=suite, native=native),
            SecurityAssociation(0x1000, key, salt, aead=suite, native=native))


def _single(suite: str, payload: bytes, n: int) -> Callable[[], None]:
    tx, rx = _pair(suite)

    def run() -> None:
        seal, open_ = tx.seal, rx.open
        for _ in range(n):
            open_(seal(payload))

    return run


def _batched(suite: str, payload: bytes, n: int, batch: int) -> Callable[[], None]:
    tx, rx = _pair(suite)
    packets = [payload] * batch

    def run() -> None:
        for _ in range(n // batch):
            got = rx.open_many(tx.seal_many(packets))
            if len(got) != batch:
                raise RuntimeError("benchmark packets were rejected")

    return run


def _runs(suite: str, payload: bytes, n: int, batch: int, native: bool) -> Callable[[], None]:
    tx, rx = _pair(suite, native)
    # Laid out once: sealing in place turns the plaintexts into datagrams, and sealing those again (as
    # ciphertext taken for plaintext) costs the same, so every round seals and opens a valid run.
    layout = lay_out([payload + trailer(len(payload))] * batch)

    def run() -> None:
        for _ in range(n // batch):
            buf, size = tx.seal_run(*layout)
            if rx.open_run(buf, size) is None:
                raise RuntimeError("benchmark run was rejected")

    return run


def crypto_bench(suite: str, size: int, packets: int, batch: int, rounds: int) -> dict[str, Any]:
    payload = os.urandom(size)
    packets -= packets % batch
    cases = {
        "bare": _bare(suite, payload, packets),
        "single": _single(suite, payload, packets),
        "batched": _batched(suite, payload, packets, batch),
        "run": _runs(suite, payload, packets, batch, native=False),
    }
    if NATIVE_GCM and suite.startswith("aes-"):
        cases["run_native"] = _runs(suite, payload, packets, batch, native=True)
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():
        fn()  # warm up: allocator, caches, branch predictors
    for _ in range(rounds):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) / packets)
    result: dict[str, Any] = {"suite": suite, "packet_bytes": size, "packets": packets, "batch": batch,
                              "rounds": rounds, "rows": {}}
    base = statistics.median(samples["bare"])
    for name, s in samples.items():
        med = statistics.median(s)
        result["rows"][name] = {
            "us_per_packet": med * 1e6,
            "us_per_packet_min": min(s) * 1e6,
            "gbps": size * 8 / med / 1e9,  # payload bits through seal+open per second of one core
            "ratio_to_bare": med / base,
        }
    return result


def _print_crypto(r: dict[str, Any]) -> None:
    labels = {
        "bare": "(a) bare AEAD encrypt+decrypt (ceiling)",
        "single": "(b) ESP seal+open, one per call",
        "batched": f"(b) ESP seal_many+open_many, {r['batch']}/call",
        "run": f"(c) seal_run+open_run, cryptography, {r['batch']}/run",
        "run_native": f"(c) seal_run+open_run, batch GCM, {r['batch']}/run",
    }
    print(f"ESP crypto, {r['suite']}, {r['packet_bytes']}-byte packets, {r['packets']} packets x "
          f"{r['rounds']} interleaved rounds (medians)")
    print(f"| {'case':<44} | {'us/packet':>9} | {'min':>6} | {'Gb/s':>6} | {'(b)/(a)':>7} |")
    print(f"|{'-' * 46}|{'-' * 11}|{'-' * 8}|{'-' * 8}|{'-' * 9}|")
    for name, row in r["rows"].items():
        print(f"| {labels[name]:<44} | {row['us_per_packet']:>9.3f} | {row['us_per_packet_min']:>6.3f} | "
              f"{row['gbps']:>6.2f} | {row['ratio_to_bare']:>6.2f}x |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("crypto", help="ESP seal+open cost against the bare AEAD loop")
    c.add_argument("--suite", choices=sorted(SUITES), default="aes-256-gcm")
    c.add_argument("--size", type=int, default=1400, help="payload bytes per packet (default 1400)")
    c.add_argument("--packets", type=int, default=100_000, help="packets per round (default 100000)")
    c.add_argument("--batch", type=int, default=64, help="packets per seal_many/open_many call")
    c.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    c.add_argument("--json", action="store_true", help="print machine-readable JSON")
    e = sub.add_parser("e2e", help="iperf3 through veth, wireguard-go and tunneld (root)")
    e2e.add_arguments(e)
    rows.add_arguments(e)
    scale.add_arguments(sub.add_parser("scale", help="RSS, handshakes and a stream with 1,000 peers (root)"))
    dns.add_arguments(sub.add_parser("dns", help="signed UPDATEs/s vs BIND, LLQ event latency (root)"))
    args = parser.parse_args(argv)
    if args.mode == "e2e":
        return e2e.main(args) if args.rows == ["tcp"] else rows.main(args)
    if args.mode == "dns":
        return dns.main(args)
    if args.mode == "scale":
        return scale.main(args)
    for name in ("size", "packets", "batch", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    r = crypto_bench(args.suite, args.size, args.packets, args.batch, args.rounds)
    if args.json:
        json.dump(r, sys.stdout, indent=2)
        print()
    else:
        _print_crypto(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
