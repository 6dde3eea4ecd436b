"""Network-namespace labs for tests, the demo and the benchmark.

A `Lab` owns everything it creates (namespaces, processes) and removes all of it on exit, in reverse
order, even when the body raised: processes are ended by PID (SIGTERM, then SIGKILL after a bounded
wait), then namespaces are deleted, which takes their veths, addresses, routes and nftables rules
with them. Every namespace name carries the lab's random prefix, so two labs (or a crashed earlier
run) never collide, and `sweep()` removes leftovers of crashed runs by that prefix.

Addresses are documentation ranges (RFC 5737, RFC 3849) and, behind a NAT, an RFC 1918 range: they
exist only inside the lab's namespaces, so nothing a test sends can leave the machine.

Usage (topologies such as `two_hosts` are in lab.topology):
    with Lab() as lab:
        a, b = two_hosts(lab)
        lab.run(a, ["ping", "-c1", b.addr4])
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NETNS_PREFIX = "tdl"  # every lab namespace starts with this, then the lab's own id


class LabError(Exception):
    """A lab command failed; the message carries the command and its stderr."""


@dataclass
class Host:
    """One namespace of the lab, with the addresses its topology gave it."""

    name: str
    netns: str
    addr4: str = ""
    addr6: str = ""
    ifname: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns]


def _sh(argv: Sequence[str], timeout: float = 20, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and r.returncode != 0:
        raise LabError(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()}")
    return r


class Lab:
    def __init__(self, stop_timeout: float = 5.0) -> None:
        """`stop_timeout`: how long closing waits for each process after SIGTERM before SIGKILL."""
        self.id = f"{NETNS_PREFIX}{secrets.token_hex(3)}"
        self.stop_timeout = stop_timeout
        self.hosts: list[Host] = []
        self.procs: list[subprocess.Popen[Any]] = []

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- building ---------------------------------------------------------------------------------

    def host(self, name: str) -> Host:
        netns = f"{self.id}-{name}"
        _sh(["ip", "netns", "add", netns])
        h = Host(name=name, netns=netns)
        self.hosts.append(h)
        self.ip(h, "link", "set", "lo", "up")
        return h

    def ip(self, h: Host, *args: str) -> str:
        return _sh(["ip", "-n", h.netns, *args]).stdout

    def sysctl(self, h: Host, key: str, value: str) -> None:
        self.run(h, ["sysctl", "-qw", f"{key}={value}"])

    def veth(self, a: Host, a_if: str, b: Host, b_if: str) -> None:
        """A veth pair between two namespaces (created in a, one end moved to b)."""
        _sh(["ip", "-n", a.netns, "link", "add", a_if, "type", "veth", "peer", "name", b_if,
             "netns", b.netns])
        self.ip(a, "link", "set", a_if, "up")
        self.ip(b, "link", "set", b_if, "up")

    def addr(self, h: Host, ifname: str, cidr: str) -> None:
        extra = ["nodad"] if ":" in cidr else []  # no DAD: bind() would fail for about 2 s
        self.ip(h, "addr", "add", cidr, "dev", ifname, *extra)

    def nft(self, h: Host, ruleset: str) -> None:
        r = subprocess.run(["ip", "netns", "exec", h.netns, "nft", "-f", "-"], input=ruleset,
                           capture_output=True, text=True, timeout=20, check=False)
        if r.returncode != 0:
            raise LabError(f"nft in {h.name}: {r.stderr.strip()}")

    # -- running ----------------------------------------------------------------------------------

    def run(self, h: Host, argv: Sequence[str], timeout: float = 30, check: bool = True,
            input: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([*h.exec_prefix(), *argv], capture_output=True, text=True, timeout=timeout,
                           check=False, input=input, cwd=cwd)
        if check and r.returncode != 0:
            raise LabError(f"[{h.name}] {' '.join(argv)}: exit {r.returncode}: "
                           f"{(r.stderr or r.stdout).strip()[-2000:]}")
        return r

    def spawn(self, h: Host, argv: Sequence[str], **popen: Any) -> subprocess.Popen[Any]:
        """Start a process in the namespace; it is ended by PID when the lab closes.

        `ip netns exec` execs the command after entering the namespace, so the PID is the command's.
        """
        popen.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen([*h.exec_prefix(), *argv], **popen)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 5) -> int:
        """End one process: `sig`, then SIGKILL if it has not exited within `timeout` seconds. The lab
        forgets it (closing will not stop it again)."""
        with contextlib.suppress(ValueError):
            self.procs.remove(p)
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        for f in (p.stdin, p.stdout, p.stderr):
            if f is not None:
                f.close()
        return int(p.returncode)

    # -- teardown ---------------------------------------------------------------------------------

    def close(self) -> None:
        errors: list[str] = []
        for p in reversed(list(self.procs)):
            try:
                self.stop(p, timeout=self.stop_timeout)
            except Exception as e:  # keep tearing down; report at the end
                errors.append(f"pid {p.pid}: {e}")
        self.procs.clear()
        for h in reversed(self.hosts):
            r = _sh(["ip", "netns", "del", h.netns], check=False)
            if r.returncode != 0 and h.netns in list_namespaces():
                errors.append(f"netns {h.netns}: {r.stderr.strip()}")
        self.hosts.clear()
        if errors:
            raise LabError("lab teardown incomplete: " + "; ".join(errors))


def list_namespaces(prefix: str = "") -> list[str]:
    out = _sh(["ip", "netns", "list"], check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix)]


def sweep() -> list[str]:
    """Delete namespaces left by crashed labs (any name with the lab prefix); returns what it deleted."""
    gone = []
    for n in list_namespaces(NETNS_PREFIX):
        if _sh(["ip", "netns", "del", n], check=False).returncode == 0:
            gone.append(n)
    return gone


def read_log(path: Path | None, last: int | None = None) -> str:
    """A log file's text (only its `last` characters if given); "" if there is none."""
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text if last is None else text[-last:]


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.02,
             what: str = "condition") -> None:
    """Poll a readiness check (never a bare sleep) until it holds, or raise after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            raise LabError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)


def ping_until(lab: Lab, h: Host, addr: str, timeout: float, what: str,
               alive: Callable[[], object] = lambda: True) -> None:
    """Ping `addr` from `h` until one answer arrives (each try waits at most 1 s), or raise after
    `timeout` s; `alive()` runs before each try and may raise (a daemon that died)."""
    fam = "-6" if ":" in addr else "-4"

    def answered() -> bool:
        alive()
        return lab.run(h, ["ping", fam, "-c1", "-W1", addr], check=False).returncode == 0

    wait_for(answered, timeout=timeout, interval=0.05, what=what)


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into SystemExit so the Lab tears down (Ctrl-C already raises)."""
    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def is_root() -> bool:
    return os.geteuid() == 0
