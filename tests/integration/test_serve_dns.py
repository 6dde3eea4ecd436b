"""`tunneld serve-dns` as a user runs it, checked with independent clients (BIND's dig and nsupdate).

The server runs in lab host b on 192.0.2.2:5353, the clients in host a, so nothing leaves the lab's
namespaces. The account comes from `tunneld account new`, and nsupdate signs with the BIND key stanza it
prints. nsupdate cannot send the RFC 9664 Update Lease option, so the server runs with --default-lease.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lab.netns import Host, Lab, wait_for
from lab.topology import two_hosts
from lab.tunnel import TUNNELD
from tests.helpers import exit_on_signal
from tunneld.dnsserver.store import ZoneStore

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("dig") or not shutil.which("nsupdate"),
    reason="needs root, iproute2 and BIND's dig/nsupdate (bind9-dnsutils)",
)

ZONE = "lab.tunneld.test"
SERVER = "192.0.2.2"
PORT = 5353
LISTEN = f"{SERVER}:{PORT}"


@dataclass
class Account:
    secret: Path
    key: Path  # the BIND key stanza, for nsupdate -k
    secret_b64: str


def new_account(d: Path) -> Account:
    d.mkdir(parents=True, exist_ok=True)
    out = subprocess.run([TUNNELD, "account", "new", ZONE], capture_output=True, text=True, check=True,
                         timeout=30).stdout
    secret_line = out.splitlines()[0]
    secret = d / "secret"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret_line + "\n")
    key = d / "key.conf"
    key.write_text(out[out.index('key "'):])
    return Account(secret, key, secret_line)


@dataclass
class Served:
    lab: Lab
    a: Host
    b: Host
    account: Account
    db: Path
    proc: subprocess.Popen[Any]
    log: Path


def dig(lab: Lab, h: Host, *query: str, tcp: bool = False, key: Path | None = None,
        ) -> subprocess.CompletedProcess[str]:
    """dig at the server; signed with the BIND key stanza ``key`` if given (device records are answered
    to signed queries only)."""
    argv = ["dig", f"@{SERVER}", "-p", str(PORT), "+norec", "+tries=1", "+time=2", *query]
    if tcp:
        argv.append("+tcp")
    if key is not None:
        argv += ["-k", str(key)]
    return lab.run(h, argv, check=False, timeout=20)


def answer(lab: Lab, h: Host, name: str, rdtype: str, key: Path) -> list[str]:
    """The answer's records (dig +short) to a query signed with ``key``."""
    r = lab.run(h, ["dig", f"@{SERVER}", "-p", str(PORT), "+norec", "+tries=1", "+time=2", "+short",
                    "-k", str(key), name, rdtype], timeout=20)
    return sorted(r.stdout.split("\n")[:-1]) if r.stdout else []


def start_server(lab: Lab, b: Host, a: Host, account: Account, db: Path, log: Path) -> subprocess.Popen[Any]:
    with log.open("ab") as out:
        proc = lab.spawn(b, [TUNNELD, "serve-dns", "--zone", ZONE, "--secret-file", str(account.secret),
                             "--listen", LISTEN, "--db", str(db), "--default-lease", "7200",
                             "--user", "root"], stdout=out, stderr=out)

    def ready() -> bool:
        assert proc.poll() is None, f"serve-dns exited {proc.returncode}: {log.read_text()[-2000:]}"
        return "status: NOERROR" in dig(lab, a, "SOA", ZONE).stdout

    wait_for(ready, timeout=15, interval=0.05, what="serve-dns to answer")
    return proc


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    with Lab() as lab:
        a, b = two_hosts(lab)
        account = new_account(tmp_path / "account")
        db, log = tmp_path / "dns.sqlite", tmp_path / "serve-dns.log"
        proc = start_server(lab, b, a, account, db, log)
        yield Served(lab, a, b, account, db, proc, log)
        assert "Traceback" not in log.read_text(), log.read_text()[-2000:]


def nsupdate(s: Served, key: Path, *commands: str) -> subprocess.CompletedProcess[str]:
    script = f"server {SERVER} {PORT}\nzone {ZONE}\n" + "".join(c + "\n" for c in commands) + "send\n"
    return s.lab.run(s.a, ["nsupdate", "-t", "5", "-k", str(key)], input=script, check=False, timeout=30)


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_zone_records_are_authoritative(served: Served, tcp: bool) -> None:
    s = served
    cases = [
        ("SOA", ZONE, f"ns.{ZONE}. hostmaster.{ZONE}."),
        ("NS", ZONE, f"ns.{ZONE}."),
        ("SRV", f"_dns-update._udp.{ZONE}", f"0 0 {PORT} ns.{ZONE}."),
        ("SRV", f"_dns-llq._udp.{ZONE}", f"0 0 {PORT} ns.{ZONE}."),
    ]
    for rdtype, name, rdata in cases:
        r = dig(s.lab, s.a, rdtype, name, tcp=tcp)
        assert "status: NOERROR" in r.stdout, r.stdout
        flags = r.stdout.split(";; flags:")[1].split(";")[0].split()
        assert "aa" in flags, r.stdout
        assert rdata in r.stdout, r.stdout
    r = dig(s.lab, s.a, "A", "www.example.com", tcp=tcp)
    assert "status: REFUSED" in r.stdout, r.stdout


def test_nsupdate_adds_and_deletes_records(served: Served) -> None:
    s = served
    name = f"laptop.{ZONE}"
    r = nsupdate(s, s.account.key, f"update add {name} 60 AAAA 2001:db8::42",
                 f'update add {name} 60 TXT "v=1" "pk=abc"')
    assert r.returncode == 0, r.stderr
    assert answer(s.lab, s.a, name, "AAAA", s.account.key) == ["2001:db8::42"]
    assert answer(s.lab, s.a, name, "TXT", s.account.key) == ['"v=1" "pk=abc"']
    r = dig(s.lab, s.a, "AAAA", name, tcp=True, key=s.account.key)
    assert "2001:db8::42" in r.stdout, r.stdout
    r = nsupdate(s, s.account.key, f"update delete {name} AAAA")
    assert r.returncode == 0, r.stderr
    assert answer(s.lab, s.a, name, "AAAA", s.account.key) == []
    assert answer(s.lab, s.a, name, "TXT", s.account.key) == ['"v=1" "pk=abc"']
    r = nsupdate(s, s.account.key, f"update delete {name}")
    assert r.returncode == 0, r.stderr
    assert "status: NXDOMAIN" in dig(s.lab, s.a, "TXT", name, key=s.account.key).stdout


def test_wrong_key_is_refused_and_changes_nothing(served: Served, tmp_path: Path) -> None:
    s = served
    other = new_account(tmp_path / "other")
    name = f"intruder.{ZONE}"
    serial = answer(s.lab, s.a, ZONE, "SOA", s.account.key)
    r = nsupdate(s, other.key, f"update add {name} 60 AAAA 2001:db8::66")
    assert r.returncode != 0
    assert "BADSIG" in r.stderr or "tsig" in r.stderr.lower(), r.stderr
    assert "status: NXDOMAIN" in dig(s.lab, s.a, "AAAA", name, key=s.account.key).stdout
    assert answer(s.lab, s.a, ZONE, "SOA", s.account.key) == serial


# Sent from inside host a with the project's interpreter: an update signed 1000 s in the past.
BADTIME_SNIPPET = r"""
import base64, json, socket, sys, time
from unittest import mock
import dns.message, dns.rcode, dns.update
from tunneld.dnsserver.core import account_key
zone, server, port, secret = sys.argv[1], sys.argv[2], int(sys.argv[3]), base64.b64decode(sys.argv[4])
key = account_key(secret, zone).dnspython()
upd = dns.update.UpdateMessage(zone)
upd.add("stale", 60, "AAAA", "2001:db8::99")
upd.use_tsig(key)
with mock.patch("time.time", return_value=time.time() - 1000):
    wire = upd.to_wire()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(wire, (server, port))
reply = dns.message.from_wire(s.recv(65535), keyring=False)
tsig = reply.tsig[0] if reply.tsig else None
print(json.dumps({"rcode": dns.rcode.to_text(reply.rcode()),
                  "tsig_error": None if tsig is None else dns.rcode.to_text(tsig.error),
                  "signed": bool(tsig is not None and tsig.mac)}))
"""


def test_update_signed_at_a_stale_time_is_badtime(served: Served) -> None:
    s = served
    r = s.lab.run(s.a, [sys.executable, "-c", BADTIME_SNIPPET, ZONE, SERVER, str(PORT), s.account.secret_b64],
                  timeout=30)
    out = json.loads(r.stdout)
    assert out == {"rcode": "NOTAUTH", "tsig_error": "BADTIME", "signed": True}, out
    assert "status: NXDOMAIN" in dig(s.lab, s.a, "AAAA", f"stale.{ZONE}", key=s.account.key).stdout


def test_records_survive_a_restart(served: Served) -> None:
    s = served
    name = f"desktop.{ZONE}"
    assert nsupdate(s, s.account.key, f"update add {name} 60 AAAA 2001:db8::7").returncode == 0
    exit_on_signal(s.proc, signal.SIGTERM, s.log, "serve-dns")
    assert dig(s.lab, s.a, "SOA", ZONE).returncode != 0  # really down (dig: no servers reached)
    s.proc = start_server(s.lab, s.b, s.a, s.account, s.db, s.log)
    assert answer(s.lab, s.a, name, "AAAA", s.account.key) == ["2001:db8::7"]


def test_port_in_use_exits_1_with_one_line(served: Served, tmp_path: Path) -> None:
    s = served
    r = s.lab.run(s.b, [TUNNELD, "serve-dns", "--zone", ZONE, "--secret-file", str(s.account.secret),
                        "--listen", LISTEN, "--db", str(tmp_path / "second.sqlite")], check=False, timeout=30)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tunneld: ") and "in use" in lines[0], r.stderr
    assert s.proc.poll() is None  # the first server is unharmed
    assert "status: NOERROR" in dig(s.lab, s.a, "SOA", ZONE).stdout


@pytest.mark.parametrize(("case", "named"), [
    ("bad zone", ("--zone", "lab..tunneld.test")),
    ("missing secret file", ("no-such-secret",)),
    ("bad listen", ("--listen", "nowhere")),
    ("bad default lease", ("--default-lease", "5")),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path: Path, case: str, named: tuple[str, ...]) -> None:
    account = new_account(tmp_path / "account")
    args = {"--zone": ZONE, "--secret-file": str(account.secret), "--listen": LISTEN,
            "--db": str(tmp_path / "dns.sqlite")}
    extra: list[str] = []
    if case == "bad zone":
        args["--zone"] = "lab..tunneld.test"
    elif case == "missing secret file":
        args["--secret-file"] = str(tmp_path / "no-such-secret")
    elif case == "bad listen":
        args["--listen"] = "nowhere"
    else:
        extra = ["--default-lease", "5"]
    argv = [TUNNELD, "serve-dns", *(x for kv in args.items() for x in kv), *extra]
    with Lab() as lab:
        h = lab.host("dns")
        r = lab.run(h, argv, check=False, timeout=30)
    lines = r.stderr.splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("tunneld: ") and "Traceback" not in lines[0]
    for word in named:
        assert word in lines[0], lines[0]
    assert account.secret_b64 not in r.stderr
    assert not (tmp_path / "dns.sqlite").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_the_server_with_exit_0(served: Served, sig: signal.Signals) -> None:
    s = served
    exit_on_signal(s.proc, sig, s.log, "serve-dns")


# From inside host a: a stalled TCP client (half a message) must not hold up a second connection, which
# sends two framed queries back to back and reads two framed replies.
TCP_SNIPPET = r"""
import json, socket, struct, sys
import dns.message
zone, server, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
def framed(m):
    w = m.to_wire()
    return struct.pack("!H", len(w)) + w
def recv_exactly(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf
stalled = socket.create_connection((server, port), timeout=5)
q = dns.message.make_query(zone, "SOA")
stalled.sendall(framed(q)[:7])
s = socket.create_connection((server, port), timeout=5)
q1, q2 = dns.message.make_query(zone, "SOA"), dns.message.make_query("_dns-llq._udp." + zone, "SRV")
s.sendall(framed(q1) + framed(q2))
out = []
for q in (q1, q2):
    (n,) = struct.unpack("!H", recv_exactly(s, 2))
    r = dns.message.from_wire(recv_exactly(s, n))
    out.append([r.id == q.id, dns.rcode.to_text(r.rcode()), len(r.answer)])
print(json.dumps(out))
"""


def test_tcp_framing_and_a_stalled_client(served: Served) -> None:
    s = served
    r = s.lab.run(s.a, [sys.executable, "-c", TCP_SNIPPET, ZONE, SERVER, str(PORT)], timeout=30)
    assert json.loads(r.stdout) == [[True, "NOERROR", 1], [True, "NOERROR", 1]], r.stdout


def test_wildcard_listen_is_dual_stack(tmp_path: Path) -> None:
    account = new_account(tmp_path / "account")
    with Lab() as lab:
        a, b = two_hosts(lab)
        log = tmp_path / "serve-dns.log"
        with log.open("ab") as out:
            proc = lab.spawn(b, [TUNNELD, "serve-dns", "--zone", ZONE, "--secret-file", str(account.secret),
                                 "--listen", f"[::]:{PORT}", "--db", str(tmp_path / "dns.sqlite"),
                                 "--user", "root"], stdout=out, stderr=out)
        for addr in (b.addr4, b.addr6):
            for tcp in ([], ["+tcp"]):
                def ready(addr: str = addr, tcp: list[str] = tcp) -> bool:
                    assert proc.poll() is None, log.read_text()[-2000:]
                    r = lab.run(a, ["dig", f"@{addr}", "-p", str(PORT), "+tries=1", "+time=2", *tcp,
                                    "SOA", ZONE], check=False, timeout=20)
                    return "status: NOERROR" in r.stdout
                wait_for(ready, timeout=15, interval=0.05, what=f"serve-dns to answer on {addr} {tcp}")


# ---- replays of signed updates across a restart; the database's disk ---------------------------------

# From inside host a: "capture" sends a signed update (host's AAAA := 2001:db8::1) and prints it with its
# reply; "replay" sends the captured bytes again, as an attacker would, and prints the reply.
REPLAY_SNIPPET = r"""
import base64, json, socket, sys
import dns.message, dns.rcode, dns.update
from tunneld.dnsserver.core import account_key
zone, server, port, secret, mode = sys.argv[1:6]
if mode == "capture":
    upd = dns.update.UpdateMessage(zone)
    upd.replace("roamer", 60, "AAAA", "2001:db8::1")
    upd.use_tsig(account_key(base64.b64decode(secret), zone).dnspython())
    wire = upd.to_wire()
else:
    wire = bytes.fromhex(sys.argv[6])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(wire, (server, int(port)))
reply = s.recv(65535)
print(json.dumps({"wire": wire.hex(), "reply": reply.hex(),
                  "rcode": dns.rcode.to_text(dns.message.from_wire(reply, keyring=False).rcode())}))
"""


def replay_snippet(s: Served, *args: str) -> dict[str, str]:
    r = s.lab.run(s.a, [sys.executable, "-c", REPLAY_SNIPPET, ZONE, SERVER, str(PORT), s.account.secret_b64,
                        *args], timeout=30)
    out: dict[str, str] = json.loads(r.stdout)
    return out


def test_a_signed_update_replayed_after_a_restart_changes_nothing(served: Served) -> None:
    """The issue's case: a device's update is captured, the device moves, the server is killed (no clean
    shutdown) and restarted, and the captured update is replayed within its TSIG window. The stale AAAA
    must not come back, and the copy gets the reply the original got."""
    s = served
    name = f"roamer.{ZONE}"
    captured = replay_snippet(s, "capture")
    assert captured["rcode"] == "NOERROR"
    assert answer(s.lab, s.a, name, "AAAA", s.account.key) == ["2001:db8::1"]
    moved = nsupdate(s, s.account.key, f"update delete {name} AAAA", f"update add {name} 60 AAAA 2001:db8::2")
    assert moved.returncode == 0, moved.stderr
    s.proc.kill()
    s.proc.wait(timeout=10)
    s.proc = start_server(s.lab, s.b, s.a, s.account, s.db, s.log)
    replayed = replay_snippet(s, "replay", captured["wire"])
    assert replayed["reply"] == captured["reply"]
    assert answer(s.lab, s.a, name, "AAAA", s.account.key) == ["2001:db8::2"]


@contextmanager
def tiny_tmpfs(where: Path, size: str = "512k") -> Iterator[Path]:
    """A small file system of our own, unmounted afterwards, to fill or make read-only."""
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tunneld-test", str(where)],
                   check=True, timeout=10)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, timeout=10)


def fill(fs: Path) -> Path:
    """Fill the file system to its last byte; the filler file, to delete for room again."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(1_000_000):  # bounded; a 512 KB tmpfs is full after 128 blocks
            os.write(fd, bytes(4096))
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    else:
        raise AssertionError("the file system never filled")
    finally:
        os.close(fd)
    return filler


@pytest.mark.parametrize("case", ["read-only", "full"])
def test_an_unwritable_database_exits_2_with_one_line(tmp_path: Path, case: str) -> None:
    account = new_account(tmp_path / "account")
    with tiny_tmpfs(tmp_path / "fs") as fs:
        db = fs / "dns.sqlite"
        ZoneStore(str(db), ZONE + ".", f"ns.{ZONE}.", PORT).close()
        if case == "full":
            fill(fs)
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True, timeout=10)
        with Lab() as lab:
            h = lab.host("dns")
            r = lab.run(h, [TUNNELD, "serve-dns", "--zone", ZONE, "--secret-file", str(account.secret),
                            "--listen", LISTEN, "--db", str(db)], check=False, timeout=30)
    lines = r.stderr.splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("tunneld: cannot write the zone database"), r.stderr
    assert ("disk is full" if case == "full" else "read-only") in lines[0], lines[0]


def test_a_full_disk_is_reported_once_and_queries_are_still_answered(tmp_path: Path) -> None:
    account = new_account(tmp_path / "account")
    log = tmp_path / "serve-dns.log"
    with tiny_tmpfs(tmp_path / "fs", "1m") as fs, Lab() as lab:
        a, b = two_hosts(lab)
        s = Served(lab, a, b, account, fs / "dns.sqlite", start_server(lab, b, a, account, fs / "dns.sqlite",
                                                                       log), log)
        assert nsupdate(s, account.key, f"update add before.{ZONE} 60 AAAA 2001:db8::1").returncode == 0
        filler = fill(fs)
        for i in range(3):
            r = nsupdate(s, account.key, f"update add full{i}.{ZONE} 60 TXT {'x' * 200}")
            assert r.returncode != 0 and "SERVFAIL" in r.stderr, r.stderr
            assert answer(lab, a, f"before.{ZONE}", "AAAA", account.key) == ["2001:db8::1"]
        assert s.proc.poll() is None
        text = log.read_text()
        assert text.count("disk is full") == 1, text
        filler.unlink()
        assert nsupdate(s, account.key, f"update add after.{ZONE} 60 AAAA 2001:db8::3").returncode == 0
        assert answer(lab, a, f"after.{ZONE}", "AAAA", account.key) == ["2001:db8::3"]
        assert answer(lab, a, f"full0.{ZONE}", "TXT", account.key) == []
        text = log.read_text()
        assert text.count("disk is full") == 1 and text.count("writable again") == 1, text
        assert "Traceback" not in text, text
        exit_on_signal(s.proc, signal.SIGTERM, log, "serve-dns")
