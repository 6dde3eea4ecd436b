"""Checked traffic between two lab nodes, run in the background while a test changes something.

`Blast` is a TCP stream whose two ends hash what crossed (lab.progs.tcpblast), `UdpFlow` numbered
datagrams checked byte for byte (lab.progs.traffic), `Ping` a `ping -6` summary. Each starts its
processes with the lab (ended by PID when it closes) and `result()` returns both ends' reports.
`Stream` is a rate-limited TCP stream whose receiver timestamps its progress (lab.progs.tcpgap), to
measure how long it stalls across a change.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import threading
from typing import Any

from lab import progs
from lab.netns import Host, Lab, LabError, wait_for
from lab.tunnel import Node


class Blast:
    """A checked TCP stream from one node to another's ULA, so that a test can rebind, move addresses
    or wait for rekeys while it flows."""

    def __init__(self, lab: Lab, src: Node, dst: Node, port: int = 5001, nbytes: int | None = None,
                 seconds: float | None = None) -> None:
        self.server = progs.spawn(lab, dst.host, "tcpblast", "serve", dst.ula, str(port),
                                  stdout=subprocess.PIPE, text=True)
        assert self.server.stdout is not None
        line = self.server.stdout.readline()
        if "listening" not in line:
            raise LabError(f"tcpblast server did not start: {line!r}")
        amount = ["--bytes", str(nbytes)] if nbytes is not None else ["--seconds", str(seconds)]
        self.client = progs.spawn(lab, src.host, "tcpblast", "send", dst.ula, str(port), *amount,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(self, timeout: float = 60) -> tuple[dict[str, Any], dict[str, Any]]:
        """(sender's report, receiver's report); raises if either failed."""
        out, err = self.client.communicate(timeout=timeout)
        if self.client.returncode != 0:
            raise LabError(f"tcpblast sender failed ({self.client.returncode}): {err.strip()[-2000:]}")
        assert self.server.stdout is not None
        sline = self.server.stdout.readline()
        self.server.wait(timeout=timeout)
        return progs.last_json(out), progs.last_json(sline)


class Stream:
    """A TCP stream of `rate` bytes/s from one node to another's ULA for at most `seconds`; keeps the
    receiver's progress samples (wall time, bytes so far) to measure how long the bytes stop."""

    def __init__(self, lab: Lab, src: Node, dst: Node, port: int, rate: float = 2e6,
                 seconds: float = 120, timeout: float = 60) -> None:
        self.lab, self.src, self.dst = lab, src, dst
        self.receiver = progs.spawn(lab, dst.host, "tcpgap", "recv", dst.ula, str(port),
                                    "--timeout", str(timeout),
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._lines = progs.Lines(self.receiver)
        try:
            self._lines.until(lambda o: "listening" in o, timeout=10)
        except (TimeoutError, EOFError) as e:
            raise LabError(f"tcpgap receiver on {dst.name} did not start: {e}") from None
        self.sender = progs.spawn(lab, src.host, "tcpgap", "send", dst.ula, str(port), "--rate", str(rate),
                                  "--seconds", str(seconds), "--timeout", str(timeout),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.samples: list[tuple[float, int]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        while True:
            try:
                obj = self._lines.next(timeout=3600)
            except (TimeoutError, EOFError):
                return
            if "t" in obj:
                with self._lock:
                    self.samples.append((float(obj["t"]), int(obj["bytes"])))

    def _times_after(self, t: float) -> list[float]:
        with self._lock:
            return [s for s, _ in self.samples if s > t]

    def wait_bytes_after(self, t: float, timeout: float) -> float:
        """The time of the first progress after wall time t (waiting at most `timeout` s)."""
        def got() -> bool:
            for p, who in ((self.receiver, "receiver"), (self.sender, "sender")):
                if p.poll() is not None:
                    raise LabError(f"tcpgap {who} {self.src.name} -> {self.dst.name} exited "
                                   f"({p.returncode})")
            return bool(self._times_after(t))
        wait_for(got, timeout=timeout, interval=0.02,
                 what=f"TCP bytes {self.src.name} -> {self.dst.name} after t={t:.2f}")
        return self._times_after(t)[0]

    def gap(self, began: float, end: float, timeout: float) -> float:
        """The longest time the receiver got no new bytes around a change that began at `began` and was
        over at `end`: the largest interval between consecutive progress samples that reaches past
        `began` and starts before `end` (waiting for the first progress after `end`)."""
        self.wait_bytes_after(end, timeout)
        with self._lock:
            times = [t for t, _ in self.samples]
        before = [t for t in times if t <= began]
        edges = [before[-1] if before else began] + [t for t in times if t > began]
        return max(b - a for a, b in itertools.pairwise(edges) if a < end)

    def bytes(self) -> int:
        with self._lock:
            return self.samples[-1][1] if self.samples else 0

    def timeouts(self) -> int:
        """The retransmission timeouts so far in the sender's namespace (TcpExt TCPTimeouts: every TCP
        connection there counts; in the roaming lab the stream's sender is the only one with data)."""
        return tcp_counter(self.lab, self.src.host, "TCPTimeouts")

    def stop(self) -> None:
        self.lab.stop(self.sender)
        self.lab.stop(self.receiver)


def tcp_counter(lab: Lab, host: Host, name: str) -> int:
    """One TcpExt counter of `host`'s namespace (/proc/net/netstat is per namespace)."""
    lines = [ln.split() for ln in lab.run(host, ["cat", "/proc/net/netstat"]).stdout.splitlines()]
    for head, values in itertools.pairwise(lines):
        if head and head[0] == "TcpExt:" and values and values[0] == "TcpExt:" and name in head:
            return int(values[head.index(name)])
    raise LabError(f"no TcpExt {name} in {host.name}'s /proc/net/netstat")


class UdpFlow:
    """A checked UDP flow from one node to another's ULA."""

    def __init__(self, lab: Lab, src: Node, dst: Node, port: int = 6001, count: int = 2000,
                 rate: float = 1000, timeout: float = 10) -> None:
        self.count = count
        self.receiver = progs.spawn(lab, dst.host, "traffic", "udp-recv", dst.ula, str(port),
                                    "--timeout", str(timeout),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.receiver.stdout is not None and self.receiver.stderr is not None
        line = self.receiver.stdout.readline()
        if "listening" not in line:
            raise LabError(f"udp receiver did not start: {line!r} {self.receiver.stderr.read()!r}")
        self.sender = progs.spawn(lab, src.host, "traffic", "udp-send", dst.ula, str(port),
                                  "--count", str(count), "--rate", str(rate),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(self, timeout: float = 60) -> tuple[dict[str, Any], dict[str, Any]]:
        """(sender's report, receiver's report); raises if either failed or did not finish in time."""
        out, err = self.sender.communicate(timeout=timeout)
        if self.sender.returncode != 0:
            raise LabError(f"udp sender failed ({self.sender.returncode}): {err[-2000:]}")
        rout, rerr = self.receiver.communicate(timeout=timeout)
        if self.receiver.returncode != 0:
            raise LabError(f"udp receiver failed ({self.receiver.returncode}): {rerr[-2000:]}")
        return progs.last_json(out), progs.last_json(rout)


_PING_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) received")


class Ping:
    """`ping -6` from one node to another's ULA; `result()` parses its summary."""

    def __init__(self, lab: Lab, src: Node, dst: Node, count: int = 100, interval: float = 0.02) -> None:
        self.proc = lab.spawn(src.host, ["ping", "-6", "-n", "-c", str(count), "-i", str(interval),
                                         "-W", "2", dst.ula],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(self, timeout: float = 60) -> tuple[int, int]:
        """(transmitted, received)."""
        out, err = self.proc.communicate(timeout=timeout)
        m = _PING_SUMMARY.search(out)
        if m is None:
            raise LabError(f"ping printed no summary (exit {self.proc.returncode}): {out[-1000:]} "
                           f"{err[-1000:]}")
        return int(m.group(1)), int(m.group(2))
