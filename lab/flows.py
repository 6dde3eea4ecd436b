"""Checked traffic between two lab nodes, run in the background while a test changes something.

`Blast` is a TCP stream whose two ends hash what crossed (lab.progs.tcpblast), `UdpFlow` numbered
datagrams checked byte for byte (lab.progs.traffic), `Ping` a `ping -6` summary. Each starts its
processes with the lab (ended by PID when it closes) and `result()` returns both ends' reports.
"""

from __future__ import annotations

import re
import subprocess
from typing import Any

from lab import progs
from lab.netns import Lab, LabError
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
