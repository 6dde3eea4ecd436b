"""Programs that run inside lab namespaces, each as `python -m lab.progs.NAME ...`.

They print JSON lines on stdout. `spawn` and `run` start one in a namespace with this interpreter and
the repository as working directory (so `lab` and `tunneld` import from any caller's directory);
`cli` is the subcommand dispatch their mains share.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lab.netns import Host, Lab

REPO = Path(__file__).resolve().parents[2]
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; Python 3.11 does not export it


def kernel_stamp(ancillary: list[tuple[int, int, bytes]]) -> float:
    """The kernel's receive time (CLOCK_REALTIME seconds) in a recvmsg's ancillary data on a socket with
    SO_TIMESTAMPNS on (UDP, and TCP: the last segment read), else the time now."""
    for level, kind, cdata in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(cdata) >= 16:
            sec, nsec = struct.unpack("@qq", cdata[:16])
            return float(sec + nsec / 1e9)
    return time.time()


def argv(name: str, *args: str) -> list[str]:
    """The command line that runs program `name` with this interpreter."""
    return [sys.executable, "-m", f"lab.progs.{name}", *args]


def spawn(lab: Lab, host: Host, name: str, *args: str, **popen: Any) -> subprocess.Popen[Any]:
    """Start program `name` in `host`'s namespace (ended by PID when the lab closes)."""
    popen.setdefault("cwd", REPO)
    return lab.spawn(host, argv(name, *args), **popen)


def run(lab: Lab, host: Host, name: str, *args: str, timeout: float = 30) -> dict[str, Any]:
    """Run program `name` to completion in `host`'s namespace; its last JSON line."""
    r = lab.run(host, argv(name, *args), timeout=timeout, cwd=REPO)
    return last_json(r.stdout)


def finish(lab: Lab, p: subprocess.Popen[str], timeout: float, what: str) -> dict[str, Any]:
    """The last JSON line of a program started with text pipes; LabError naming `what` if it exits
    with an error or overruns `timeout` (it is then stopped by PID)."""
    from lab.netns import LabError  # here: the programs run inside namespaces need none of lab.netns

    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        lab.stop(p)
        raise LabError(f"{what} did not finish within {timeout:.0f} s") from None
    if p.returncode != 0:
        raise LabError(f"{what} exited {p.returncode}: {(err or out).strip()[-2000:]}")
    return last_json(out)


def last_json(out: str) -> dict[str, Any]:
    """The last line of a program's output, parsed as a JSON object."""
    return dict(json.loads(out.strip().splitlines()[-1]))


def report(obj: dict[str, Any]) -> None:
    """Print one JSON line and flush it (a caller reads it while the program runs on)."""
    print(json.dumps(obj), flush=True)


Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], dict[str, Any]]]


def cli(prog: str, commands: dict[str, Command], args: list[str] | None = None) -> int:
    """Parse `prog COMMAND ...`: each command adds its arguments, then runs and returns the JSON report
    that is printed as the last line."""
    p = argparse.ArgumentParser(prog=f"python -m lab.progs.{prog}")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (add, _) in commands.items():
        add(sub.add_parser(name))
    a = p.parse_args(args)
    report(commands[a.command][1](a))
    return 0


def accept_one(addr: str, port: int, timeout: float) -> socket.socket:
    """Listen on ADDR:PORT, say {"listening": true} (the caller's readiness check), accept one TCP
    connection within ``timeout`` and return it with the same timeout on its reads."""
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as ls:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((addr, port))
        ls.listen(1)
        ls.settimeout(timeout)
        report({"listening": True})
        conn, _ = ls.accept()
    conn.settimeout(timeout)
    return conn


def endpoint(p: argparse.ArgumentParser) -> None:
    """The ADDR PORT positionals most commands take."""
    p.add_argument("addr")
    p.add_argument("port", type=int)


class Lines:
    """The JSON lines a spawned program prints, read by a thread so that every wait is bounded."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.seen: list[dict[str, Any]] = []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        stdout = proc.stdout

        def read() -> None:
            for line in stdout:
                with contextlib.suppress(ValueError):
                    self._queue.put(dict(json.loads(line)))
            self._queue.put(None)

        threading.Thread(target=read, daemon=True).start()

    def next(self, timeout: float) -> dict[str, Any]:
        try:
            obj = self._queue.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            raise TimeoutError(f"no line in {timeout:.1f} s; seen: {self.seen}") from None
        if obj is None:
            raise EOFError(f"the program ended (rc {self.proc.poll()}); seen: {self.seen}")
        self.seen.append(obj)
        return obj

    def until(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            obj = self.next(end - time.monotonic())
            if predicate(obj):
                return obj

    def quiet(self, seconds: float) -> list[dict[str, Any]]:
        """Whatever arrives within ``seconds`` (to show that nothing more does)."""
        out = []
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            try:
                out.append(self.next(left))
            except TimeoutError:
                break
        return out
