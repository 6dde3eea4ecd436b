"""Small helpers shared by the unit tests."""

from __future__ import annotations

import hashlib
from collections.abc import Callable


def drbg(seed: int) -> Callable[[int], bytes]:
    """A reproducible stand-in for os.urandom: the same seed gives the same byte stream, so sans-I/O
    cores that take `rand` (keys, indices, nonces, jitter) behave the same on every run."""
    counter = 0

    def rand(n: int) -> bytes:
        nonlocal counter
        counter += 1
        return hashlib.shake_256(f"{seed}/{counter}".encode()).digest(n)

    return rand
