"""Small helpers shared by the unit tests."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path


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
    import os
    import signal
    import subprocess

    import pytest

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
