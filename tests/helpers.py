"""Small helpers shared by the tests."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest


def drbg(seed: int) -> Callable[[int], bytes]:
    """A reproducible stand-in for os.urandom: the same seed gives the same byte stream, so sans-I/O
    cores that take `rand` (keys, indices, nonces, jitter) behave the same on every run."""
    counter = 0

    def rand(n: int) -> bytes:
        nonlocal counter
        counter += 1
        return hashlib.shake_256(f"{seed}/{counter}".encode()).digest(n)

    return rand


def run_bench(argv: list[str], cwd: Path, timeout: float) -> tuple[str, str]:
    """Run a benchmark command to completion, bounded: on timeout SIGINT lets it tear its labs down,
    SIGKILL follows if that hangs too, and the test fails. Returns (stdout, stderr) of a zero exit."""
    p = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGINT)
        try:
            out, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
        pytest.fail(f"benchmark did not finish within {timeout} s; stderr: {err[-2000:]}")
    assert p.returncode == 0, f"exit {p.returncode}; stderr: {err[-2000:]}"
    return out, err


def exit_on_signal(proc: subprocess.Popen[Any], sig: signal.Signals, log: Path, what: str,
                   timeout: float = 5) -> None:
    """Send `sig` to a daemon and require that it exits with 0 within `timeout` seconds and that its
    log has no traceback."""
    proc.send_signal(sig)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} did not exit within {timeout:g} s of {sig.name}:\n{log.read_text()[-2000:]}")
    assert rc == 0, log.read_text()[-2000:]
    assert "Traceback" not in log.read_text(), log.read_text()[-2000:]


def account_toml(directory: Path, secret: bytes, domain: str = "home.example.net") -> str:
    """An ``[account]`` table whose secret file (0600, in ``directory``) holds ``secret``."""
    path = directory / "account.secret"
    path.write_text(base64.b64encode(secret).decode() + "\n")
    path.chmod(0o600)
    return f'[account]\ndomain = "{domain}"\nsecret_file = "{path}"\n'


def load_toml(directory: Path, text: str) -> Any:
    """The Config that ``text``, written to ``directory``/tunneld.toml, loads to."""
    from tunneld.config import load_config

    path = directory / "tunneld.toml"
    path.write_text(text)
    return load_config(path)


# Session timers short enough to see rekeys within a test (reject_after_time must exceed
# rekey_after_time + rekey_timeout: the config checks it).
SHORT_TIMERS = """
[timers]
rekey_after_time = 1.0
rekey_timeout = 0.5
reject_after_time = 3.0
keepalive_timeout = 1.0
"""


def in_forked_child(body: Callable[[], Any]) -> Any:
    """Run ``body`` in a forked child (for what cannot be undone, such as dropping privileges); its JSON
    result as ``{"ok": value}`` or its error as ``{"error": "Type: text"}``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            try:
                out: Any = {"ok": body()}
            except Exception as e:
                out = {"error": f"{type(e).__name__}: {e}"}
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


TUNNELD_EXE = Path(sys.prefix) / "bin" / "tunneld"


def bench_marks(tools: Sequence[str], packages: str, *, tunneld: bool = True) -> list[pytest.MarkDecorator]:
    """The marks of a test that runs a namespace benchmark: root, the tools it runs (``packages`` says
    which Debian packages hold them), and with ``tunneld`` the daemon installed in this venv."""
    marks = [
        pytest.mark.root,
        pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the benchmark builds network namespaces"),
        pytest.mark.skipif(any(shutil.which(t) is None for t in tools),
                           reason=f"needs {', '.join(tools)} (Debian: {packages})"),
    ]
    if tunneld:
        marks.append(pytest.mark.skipif(not TUNNELD_EXE.exists(),
                                        reason=f"needs {TUNNELD_EXE} (pip install -e .)"))
    return marks
