"""A legitimate device of the account, run in the lab's client namespace while (or before) an attack runs.

  python -m lab.progs.legit run SERVER PORT ZONE SECRET_FILE --seconds S --rate R [--ops query,update,llq]
      [--tcp] [--name NAME]: operations round-robin, started at R per second for S seconds (each in
      its own thread, so a stuck one does not hold up the next), each within OP_TIMEOUT: a signed
      query for the device's AAAA (over TCP with --tcp), a signed UPDATE that replaces it, an LLQ set
      up (our LLQClient, signed) until established and then cancelled. Reports per operation and
      overall: count, successes, p50/p95 latency (a failure counts at the time it took, a timeout at
      OP_TIMEOUT).
  ... publish ... --devices K       K devices' full record sets (lab addresses), one signed UPDATE each
  ... update ... --name N (--add ADDR | --delete)   one signed UPDATE of N's AAAA; its wire in hex too
  ... setup ... --name N            a signed LLQ SETUP for N AAAA, built and not sent (what a wire
                                    capture of a device's SETUP holds), in hex
  ... read ... --name N --type T [--unsigned]       one query; rcode and answer records
  python -m lab.progs.legit stranger SERVER PORT ZONE
      what an unsigned stranger reads: the browse PTR, then each device's AAAA, SRV, TXT and the SRV
      targets' A/AAAA; the count of records of each kind

Every report is one JSON line. The account key is the TSIG key every device holds (account_key).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import dns.update

from lab.progs import cli
from tunneld.config import load_account_secret
from tunneld.dnsserver.core import account_key
from tunneld.proto import llq, records
from tunneld.proto.tsig import TsigKey, TsigSession

OP_TIMEOUT = 2.0  # seconds one operation may take
TTL = 60


class Device:
    def __init__(self, a: argparse.Namespace) -> None:
        self.server, self.port, self.zone = a.server, a.port, a.zone
        self.origin = dns.name.from_text(a.zone)
        self.key: TsigKey = account_key(load_account_secret(Path(a.secret_file)), a.zone)
        self.keyring = {self.key.name: self.key.dnspython()}

    def name(self, label: str) -> dns.name.Name:
        return dns.name.from_text(label, self.origin)

    def query(self, qname: dns.name.Name, rdtype: str, tcp: bool = False, signed: bool = True,
              timeout: float = OP_TIMEOUT) -> dns.message.Message:
        q = dns.message.make_query(qname, dns.rdatatype.from_text(rdtype), use_edns=0, payload=1232)
        q.flags = 0
        if signed:
            q.use_tsig(self.keyring, self.key.name)
        send = dns.query.tcp if tcp else dns.query.udp
        return send(q, self.server, timeout=timeout, port=self.port)

    def update(self, rrsets: list[dns.rrset.RRset], replace: bool = False, delete: str = "",
               timeout: float = OP_TIMEOUT) -> tuple[str, bytes]:
        """(rcode, request wire) of one signed UPDATE over UDP."""
        upd = dns.update.UpdateMessage(self.origin)
        for rrset in rrsets:
            (upd.replace if replace else upd.add)(rrset.name, rrset)
        if delete:
            upd.delete(self.name(delete), "AAAA")
        upd.use_tsig(self.keyring, self.key.name)
        wire = upd.to_wire()
        sock = socket.socket(socket.AF_INET6 if ":" in self.server else socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            sock.settimeout(timeout)
            sock.sendto(wire, (self.server, self.port))
            end = time.monotonic() + timeout
            while (left := end - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    data = sock.recv(65535)
                except (TimeoutError, ConnectionRefusedError):
                    break
                if data[:2] == wire[:2]:
                    reply = dns.message.from_wire(data, keyring=self.keyring, request_mac=upd.mac or b"")
                    return dns.rcode.to_text(reply.rcode()), wire
        return "timeout", wire

    def aaaa(self, label: str, address: str) -> dns.rrset.RRset:
        return dns.rrset.from_text(self.name(label), TTL, "IN", "AAAA", address)

    def llq_client(self, label: str) -> llq.LLQClient:
        return llq.LLQClient(self.name(label), dns.rdatatype.AAAA, server=(self.server, self.port),
                             rand=os.urandom, tsig=TsigSession(self.key))

    def llq_setup(self, label: str, timeout: float = OP_TIMEOUT) -> str:
        """Set up an LLQ for label AAAA: 'ok' once established (then cancelled), else why not."""
        c = self.llq_client(label)
        dest = (self.server, self.port)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        outcome = "timeout"
        with sock:
            sock.connect(dest)
            c.start(time.time())
            end = time.monotonic() + timeout
            while outcome == "timeout" and (left := end - time.monotonic()) > 0:
                for tx in c.transmits():
                    sock.send(tx.payload)
                d = c.deadline()
                sock.settimeout(max(0.001, min(left, (d - time.time()) if d is not None else left)))
                try:
                    c.receive(sock.recv(65535), dest, time.time())
                except TimeoutError:
                    c.poll(time.time())
                except ConnectionRefusedError:
                    outcome = "refused"
                for ev in c.events():
                    if isinstance(ev, llq.Established):
                        outcome = "ok"
                    elif isinstance(ev, llq.Fallback):
                        outcome = f"fallback: {ev.reason}"
            c.close(time.time())
            for tx in c.transmits():
                sock.send(tx.payload)
        return outcome


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] * 1e3 if s else 0.0


def summary(samples: list[tuple[bool, float]]) -> dict[str, Any]:
    lat = [t for _, t in samples]
    ok = sum(1 for good, _ in samples if good)
    return {"n": len(samples), "ok": ok, "success": ok / len(samples) if samples else 0.0,
            "p50_ms": _pct(lat, 0.5), "p95_ms": _pct(lat, 0.95)}


def _op(dev: Device, op: str, label: str, i: int, tcp: bool) -> tuple[str, str, float]:
    """(operation, "ok" or what went wrong, seconds it took; a timeout counts OP_TIMEOUT)."""
    start = time.monotonic()
    try:
        if op == "query":
            r = dev.query(dev.name(label), "AAAA", tcp=tcp)
            outcome = "ok" if r.rcode() == dns.rcode.NOERROR and r.answer else \
                f"query {dns.rcode.to_text(r.rcode())}{' TC' if r.flags & 0x200 else ''}"
        elif op == "update":
            rc, _ = dev.update([dev.aaaa(label, f"2001:db8:77::{i % 65000 + 2:x}")], replace=True)
            outcome = "ok" if rc == "NOERROR" else f"update {rc}"
        else:
            outcome = dev.llq_setup(label)
            outcome = outcome if outcome == "ok" else f"llq {outcome}"
    except dns.exception.Timeout:
        outcome = f"{op} timeout"
    except Exception as e:  # anything else (EOF, a bad reply): a failed operation, by its kind
        outcome = f"{op} {type(e).__name__}"
    elapsed = time.monotonic() - start
    return op, outcome, min(elapsed, OP_TIMEOUT) if outcome.endswith("timeout") else elapsed


def _run(a: argparse.Namespace) -> dict[str, Any]:
    """Operations start on schedule, each in its own thread, so a slow or failing one does not delay
    the next: the success rate is over what the device tried at its own pace."""
    dev = Device(a)
    ops = [o for o in a.ops.split(",") if o]
    label = a.name
    first, _ = dev.update([dev.aaaa(label, "2001:db8:77::1")], replace=True)
    t0 = time.monotonic()
    futures = []
    with ThreadPoolExecutor(max_workers=64) as pool:
        i = 0
        while (due := t0 + i / a.rate) < t0 + a.seconds:
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            futures.append(pool.submit(_op, dev, ops[i % len(ops)], label, i, a.tcp))
            i += 1
    samples: dict[str, list[tuple[bool, float]]] = {o: [] for o in ops}
    failures: dict[str, int] = {}
    for f in futures:
        op, outcome, elapsed = f.result()
        samples[op].append((outcome == "ok", elapsed))
        if outcome != "ok":
            failures[outcome] = failures.get(outcome, 0) + 1
    every = [s for v in samples.values() for s in v]
    return {"first_update": first, **summary(every), "ops": {o: summary(v) for o, v in samples.items()},
            "failures": failures, "seconds": time.monotonic() - t0}


def _publish(a: argparse.Namespace) -> dict[str, Any]:
    dev = Device(a)
    failed: dict[str, int] = {}
    for k in range(a.devices):
        host = records.HostRecords.derive(f"dev{k}", a.zone, os.urandom(32), port=4500 + k,
                                          addresses=[ipaddress.ip_address(f"198.51.100.{k % 250 + 1}"),
                                                     ipaddress.ip_address(f"2001:db8:99::{k + 1:x}")])
        rc, _ = dev.update(records.build(host, TTL))
        if rc != "NOERROR":
            failed[rc] = failed.get(rc, 0) + 1
    return {"published": a.devices - sum(failed.values()), "failures": failed}


def _update(a: argparse.Namespace) -> dict[str, Any]:
    dev = Device(a)
    if a.add:
        rc, wire = dev.update([dev.aaaa(a.name, a.add)])
    else:
        rc, wire = dev.update([], delete=a.name)
    return {"rcode": rc, "wire": wire.hex()}


def _setup(a: argparse.Namespace) -> dict[str, Any]:
    c = Device(a).llq_client(a.name)
    c.start(time.time())
    return {"wire": c.transmits()[0].payload.hex()}


def _read(a: argparse.Namespace) -> dict[str, Any]:
    dev = Device(a)
    r = dev.query(dev.name(a.name), a.type, signed=not a.unsigned)
    return {"rcode": dns.rcode.to_text(r.rcode()), "records": [rr.to_text() for rr in r.answer]}


def _stranger(a: argparse.Namespace) -> dict[str, Any]:
    def ask(qname: dns.name.Name, rdtype: str) -> list[Any]:
        q = dns.message.make_query(qname, dns.rdatatype.from_text(rdtype), use_edns=0, payload=4096)
        q.flags = 0
        try:
            r = dns.query.udp(q, a.server, timeout=OP_TIMEOUT, port=a.port)
            if r.flags & 0x200:
                r = dns.query.tcp(q, a.server, timeout=OP_TIMEOUT, port=a.port)
        except (OSError, dns.exception.DNSException):
            return []
        return [rd for rrset in r.answer for rd in rrset]

    counts = {"browse PTR": 0, "AAAA (ULA)": 0, "TXT (public key)": 0, "SRV": 0, "endpoint A/AAAA": 0}
    services = ask(records.browse_name(a.zone), "PTR")
    counts["browse PTR"] = len(services)
    names = []
    for ptr in services:
        service = ptr.target
        names.append(service.labels[2].decode())
        counts["AAAA (ULA)"] += len(ask(dns.name.Name(service.labels[2:]), "AAAA"))
        counts["TXT (public key)"] += len(ask(service, "TXT"))
        for srv in ask(service, "SRV"):
            counts["SRV"] += 1
            counts["endpoint A/AAAA"] += len(ask(srv.target, "A")) + len(ask(srv.target, "AAAA"))
    return {"records": sum(counts.values()), "counts": counts, "devices": sorted(names)}


def _common(p: argparse.ArgumentParser, secret: bool = True) -> None:
    p.add_argument("server")
    p.add_argument("port", type=int)
    p.add_argument("zone")
    if secret:
        p.add_argument("secret_file")


def _run_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--rate", type=float, default=6.0)
    p.add_argument("--ops", default="query,update,llq")
    p.add_argument("--tcp", action="store_true")
    p.add_argument("--name", default="legit")


def _publish_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--devices", type=int, required=True)


def _update_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--name", required=True)
    p.add_argument("--add", default="")


def _setup_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--name", required=True)


def _read_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--name", required=True)
    p.add_argument("--type", default="AAAA")
    p.add_argument("--unsigned", action="store_true")


def main(argv: list[str] | None = None) -> int:
    return cli("legit", {"run": (_run_args, _run), "publish": (_publish_args, _publish),
                         "update": (_update_args, _update), "setup": (_setup_args, _setup),
                         "read": (_read_args, _read),
                         "stranger": (lambda p: _common(p, secret=False), _stranger)}, argv)


if __name__ == "__main__":
    sys.exit(main())
