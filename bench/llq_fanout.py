"""The LLQ server's fan-out cost, in one process without a network: CPU per watcher for an event and an ack.

  python -m bench.llq_fanout [--watchers 1000] [--events 20]

K LLQ clients (our LLQClient, TSIG-signed, in memory) watch one name AAAA on a serve-dns core (a ZoneStore
in a temporary directory, as serve-dns keeps it); then M signed UPDATEs replace the name's AAAA. For each,
the CPU time (process time) of ``LLQServer.changes`` (rendering and signing every watcher's event) and of
handling the K acks (as the UDP listener does: the LLQ server's ack reader, else a parse and the
LLQ server) is divided by K; so is that of the K setups (the setup request and the challenge response,
parsed as the listener does). Every
event is checked by its client (TSIG, an Added event) before its ack counts. Prints medians over the M.
"""

from __future__ import annotations

import argparse
import random
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import dns.edns
import dns.name
import dns.rdatatype
import dns.tsig
import dns.update

from tunneld.dnsserver.core import DnsCore, account_key
from tunneld.dnsserver.llq import LLQServer
from tunneld.dnsserver.store import ZoneStore
from tunneld.proto.dnsguard import try_parse
from tunneld.proto.llq import Added, LLQClient
from tunneld.proto.tsig import TsigSession

ZONE = dns.name.from_text("bench.example.")
NAME = dns.name.from_text("watched.bench.example.")
T0 = 1_800_000_000.0
DEVICE = ("192.0.2.50", 5353)


def _update(key: dns.tsig.Key, target: str, at: float) -> bytes:
    upd = dns.update.UpdateMessage(ZONE)
    upd.replace(NAME, 60, "AAAA", target)
    upd.use_edns(0, options=[dns.edns.GenericOption(dns.edns.OptionType(2), struct.pack("!I", 7200))])
    upd.use_tsig(key)
    with mock.patch("time.time", return_value=at):  # dnspython signs at time.time()
        return upd.to_wire()


def _rand(i: int) -> Callable[[int], bytes]:
    """Client i's randomness: its message IDs are all i (one signed setup from two sources in the same
    second would be a replay, and random IDs meet by the birthday bound)."""
    rnd = random.Random(i)
    return lambda n: i.to_bytes(2, "big") if n == 2 else rnd.randbytes(n)


def run(watchers: int, events: int) -> dict[str, float]:
    key = account_key(bytes(range(32)), "bench.example")
    with tempfile.TemporaryDirectory(prefix="llq-fanout-") as tmp:
        store = ZoneStore(str(Path(tmp) / "zone.sqlite"), ZONE, "ns.bench.example.", 53)
        core = DnsCore(store, [key])
        server = LLQServer(core, random.Random(1).randbytes, max_llqs=max(10_000, watchers))
        now = T0
        core.handle(_update(key.dnspython(), "2001:db8::1", now), DEVICE, now)
        clients: list[LLQClient] = []
        setup = 0.0
        for i in range(watchers):
            src = ("198.51.100.1", 10_000 + i)
            c = LLQClient(NAME, dns.rdatatype.AAAA, server=src, tsig=TsigSession(key), rand=_rand(i))
            clients.append(c)
            at = now  # a burst, as a watcher's restart: message IDs are the clients' own (one signed setup
            c.start(at)  # twice from two sources would be a replay)
            for _ in range(4):  # setup, challenge response
                for tx in c.transmits():
                    t = time.process_time()
                    answers = server.handle(tx.payload, src, at, msg=try_parse(tx.payload, query=True)) or []
                    setup += time.process_time() - t
                    for _dest, wire in answers:
                        c.receive(wire, src, at)
            c.events()
        server.poll(now + 1.0)  # the setups' states saved
        if len(server) != watchers:
            raise SystemExit(f"{len(server)} of {watchers} LLQs established: {dict(server.counters)}")
        fan: list[float] = []
        acks: list[float] = []
        for k in range(events):
            now += 1.0
            core.handle(_update(key.dnspython(), f"2001:db8::{k + 2:x}", now), DEVICE, now)
            t = time.process_time()
            out = server.changes(core.last_changes, now)
            fan.append((time.process_time() - t) / watchers)
            replies: list[tuple[object, bytes]] = []
            for to, wire in out:
                assert isinstance(to, tuple)
                dest: tuple[str, int] = to
                c = clients[dest[1] - 10_000]
                c.receive(wire, dest, now)
                if not any(isinstance(e, Added) for e in c.events()):
                    raise SystemExit(f"watcher {dest} got no Added event")
                replies.extend((dest, tx.payload) for tx in c.transmits())
            t = time.process_time()
            for peer, wire in replies:
                if server.ack(wire, peer, now) is None:  # as serve-dns's UDP listener does
                    server.handle(wire, peer, now, msg=try_parse(wire, query=True))
            acks.append((time.process_time() - t) / max(1, len(replies)))
            if sum(server.pending_events(i) for i in server.llq_ids()):
                raise SystemExit("events left unacknowledged")
        store.close()
    return {"watchers": watchers, "events": events, "setup_us_per_llq": setup / watchers * 1e6,
            "event_us_per_watcher": statistics.median(fan) * 1e6,
            "ack_us": statistics.median(acks) * 1e6}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.llq_fanout", description=__doc__.split("\n")[0])
    p.add_argument("--watchers", type=int, default=1000)
    p.add_argument("--events", type=int, default=20)
    a = p.parse_args(argv)
    if not 1 <= a.watchers <= 65536 or a.events < 1:
        print("llq_fanout: --watchers must be 1 to 65536 (one message ID each), --events at least 1",
              file=sys.stderr)
        return 2
    r = run(a.watchers, a.events)
    print(f"{r['watchers']} watchers, {r['events']} events (medians): event {r['event_us_per_watcher']:.1f} "
          f"us of server CPU per watcher, ack {r['ack_us']:.1f} us per ack; setup (both requests) "
          f"{r['setup_us_per_llq']:.0f} us per LLQ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
