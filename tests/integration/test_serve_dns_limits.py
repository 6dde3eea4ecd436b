"""`tunneld serve-dns` facing strangers, in the lab: private records, small unsigned replies, and TCP that
a slow-loris cannot lock.

The server runs in host b (192.0.2.2:5353) as test_serve_dns runs it; the clients, legitimate or not, in
host a. Every flood here is bounded: it stops by itself after a fixed time.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.integration.test_serve_dns import (
    PORT,
    SERVER,
    ZONE,
    Served,
    dig,
    nsupdate,
    pytestmark,  # noqa: F401 (the same requirements: root, iproute2, dig, nsupdate)
    served,  # noqa: F401 (the fixture)
)

# ruff: noqa: F811 (the tests take the imported fixture by name)

DEVICES = 40
BROWSE = f"_autotunnel._udp.{ZONE}"


def publish_devices(s: Served) -> None:
    commands = []
    for i in range(DEVICES):
        commands += [f"update add {BROWSE} 600 PTR host{i}._autotunnel._udp.{ZONE}",
                     f"update add host{i}.{ZONE} 600 AAAA fd00::{i + 1:x}"]
    r = nsupdate(s, s.account.key, *commands)
    assert r.returncode == 0, r.stderr


def test_strangers_learn_nothing_and_get_small_replies(served: Served) -> None:
    s = served
    publish_devices(s)
    # The account's clients (signed) see every device, over UDP at the size they ask.
    ours = dig(s.lab, s.a, "+bufsize=65535", "PTR", BROWSE, key=s.account.key)
    assert f"ANSWER: {DEVICES}," in ours.stdout and ";; flags: qr aa;" in ours.stdout, ours.stdout
    # A stranger: the browse name and a device name look like names that do not exist.
    for name, rdtype in [(BROWSE, "PTR"), (f"host3.{ZONE}", "AAAA"), (f"nothing.{ZONE}", "AAAA")]:
        r = dig(s.lab, s.a, "+bufsize=65535", rdtype, name)
        assert "status: NXDOMAIN" in r.stdout and "ANSWER: 0" in r.stdout, r.stdout
    # No amplification: the largest reply a stranger can draw is at most 3x its query.
    for name, rdtype in [(BROWSE, "ANY"), (ZONE, "ANY"), (f"host3.{ZONE}", "ANY")]:
        r = dig(s.lab, s.a, "+bufsize=65535", "+qr", rdtype, name)
        sizes = re.findall(r"MSG SIZE\s+(?:sent|rcvd): (\d+)", r.stdout)
        sent, rcvd = int(sizes[0]), int(sizes[-1])
        assert rcvd <= 3 * sent, (name, rdtype, sent, rcvd)
    # The zone's own records stay public (resolvers and unsigned SRV lookups need them).
    assert "status: NOERROR" in dig(s.lab, s.a, "SRV", f"_dns-update._udp.{ZONE}").stdout


# Inside host a: a bounded slow-loris. It opens PER connections from each of its source addresses, sends
# half a length prefix on every other one, reopens any the server closes, and stops after SECONDS. It
# prints "ready" once all are open, and at the end what the server did to them.
SLOWLORIS = r"""
import json, selectors, socket, sys, time
server, port, seconds, per = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
sources = sys.argv[5:]
sel = selectors.DefaultSelector()
stats = {"opened": 0, "closed_by_server": 0, "connect_failed": 0}
def open_one(src, n):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(2)
    s.bind((src, 0))
    try:
        s.connect((server, port))
        if n % 2:
            s.send(b"\x00")
    except OSError:
        stats["connect_failed"] += 1
        s.close()
        return
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ, (src, n))
    stats["opened"] += 1
for src in sources:
    for n in range(per):
        open_one(src, n)
print("ready", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    for key, _ in sel.select(timeout=0.1):
        s = key.fileobj
        try:
            data = s.recv(4096)
        except OSError:
            data = b""
        if not data:
            sel.unregister(s)
            s.close()
            stats["closed_by_server"] += 1
            open_one(*key.data)
print(json.dumps(stats), flush=True)
"""

# Inside host a: a legitimate TCP client, one SOA query per new connection every 0.25 s.
CLIENT = r"""
import json, socket, struct, sys, time
import dns.message
server, port, zone, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
def recv_exactly(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf
ok, latencies = 0, []
for _ in range(rounds):
    t0 = time.monotonic()
    try:
        with socket.create_connection((server, port), timeout=3, source_address=("192.0.2.1", 0)) as s:
            q = dns.message.make_query(zone, "SOA")
            w = q.to_wire()
            s.sendall(struct.pack("!H", len(w)) + w)
            (n,) = struct.unpack("!H", recv_exactly(s, 2))
            if dns.message.from_wire(recv_exactly(s, n)).id == q.id:
                ok += 1
                latencies.append(time.monotonic() - t0)
    except (OSError, EOFError):
        pass
    time.sleep(0.25)
print(json.dumps({"ok": ok, "rounds": rounds, "max_latency": max(latencies, default=None)}))
"""

SOURCES = 20
PER_SOURCE = 15  # 300 connections: more than the server's 256 in all, and 16 a source


def test_a_legitimate_tcp_client_is_served_during_a_slow_loris(served: Served) -> None:
    s = served
    sources = [f"192.0.2.{101 + i}" for i in range(SOURCES)]
    for src in sources:
        s.lab.addr(s.a, s.a.ifname, f"{src}/24")
    attack = s.lab.spawn(s.a, [sys.executable, "-c", SLOWLORIS, SERVER, str(PORT), "15", str(PER_SOURCE),
                               *sources], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert attack.stdout is not None
        assert attack.stdout.readline().strip() == "ready", attack.stderr.read() if attack.stderr else ""
        r = s.lab.run(s.a, [sys.executable, "-c", CLIENT, SERVER, str(PORT), ZONE, "20"], timeout=60)
        out, err = attack.communicate(timeout=30)
    finally:
        if attack.poll() is None:
            s.lab.stop(attack)
    client = json.loads(r.stdout)
    stats = json.loads(out.strip().splitlines()[-1])
    assert client["ok"] == client["rounds"], (client, stats, err)
    assert client["max_latency"] < 2.0, (client, stats)
    assert stats["opened"] >= SOURCES * PER_SOURCE, stats
    assert stats["closed_by_server"] > 0, stats  # idle connections were timed out or evicted
    assert s.proc.poll() is None
