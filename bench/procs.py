"""The processes a benchmark starts: their PIDs (so that a caller can check they are gone) and the CPU
time they and the whole machine use, read from /proc."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lab.netns import Host, Lab, LabError, read_log, terminate_as_exit

CLK_TCK = os.sysconf("SC_CLK_TCK")


def log_tail(path: Path | None, n: int = 2000) -> str:
    """The end of a log, for an error message."""
    return read_log(path, n).strip()


class Recorder:
    """Keeps every PID the benchmark started, so the caller (and the test) can check they are gone."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def spawn(self, lab: Lab, h: Host, argv: Sequence[str], **popen: Any) -> subprocess.Popen[Any]:
        p = lab.spawn(h, argv, **popen)
        self.pids.append(p.pid)
        return p


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (the state) on, after "pid (comm) "; None if the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def _proc_ticks(pid: int) -> int:
    """utime+stime of one process (all its threads), in clock ticks; 0 if it is gone."""
    fields = _stat_fields(pid)
    return 0 if fields is None else int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def still_running(pids: Sequence[int]) -> list[int]:
    """Those of `pids` whose processes still run (zombies count as gone), for a benchmark's clean-up check."""
    return [pid for pid in pids if (fields := _stat_fields(pid)) is not None and fields[0] != "Z"]


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs of the machine spent not idle so far (/proc/stat), to tell whether a run
    was limited by the machine's cores or by something else."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by a process and its live descendants."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        total += _proc_ticks(p)
        todo += _children(p)
    return total / CLK_TCK


def run_in_lab(name: str, work: Callable[[Path], dict[str, Any]], as_json: bool,
               table: Callable[[dict[str, Any]], None]) -> int:
    """The end of a namespace benchmark's main: run ``work`` in a temporary directory (SIGTERM acts as
    an interrupt, so the lab is torn down), then print JSON or the table. Exit 0, 1 (failed) or 130."""
    try:
        with terminate_as_exit(), tempfile.TemporaryDirectory(prefix=f"tdl-{name}-") as tmp:
            r = work(Path(tmp))
    except KeyboardInterrupt:
        print(f"bench {name}: interrupted; every namespace and process it started has been removed",
              file=sys.stderr)
        return 130
    except (LabError, subprocess.SubprocessError, OSError, ValueError, EOFError) as e:
        print(f"bench {name}: failed: {e}", file=sys.stderr)
        return 1
    if as_json:
        json.dump(r, sys.stdout, indent=2)
        print()
    else:
        table(r)
    return 0
