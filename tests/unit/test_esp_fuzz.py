"""Fuzzing the receive path with arbitrary bytes.

Invariant: for any bytes, `classify` returns a Kind, `open` returns (next header, payload) or raises
ESPError, and `open_many` returns a list; nothing else is ever raised, and a packet that was not
accepted leaves the replay window as it was. Network input is untrusted: the one error type is what
lets the daemon drop, count and go on.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunneld.crypto.esp import ESPError, Kind, SecurityAssociation, classify

KEY = bytes(range(32))
SALT = b"\xa0\xa1\xa2\xa3"


def _sa(esn: bool) -> SecurityAssociation:
    sa = SecurityAssociation(0x1000, KEY, SALT, esn=esn)
    sa.replay.top = (1 << 32) + 100 if esn else 100
    return sa


def _genuine() -> bytes:
    tx = SecurityAssociation(0x1000, KEY, SALT)
    tx.seq = (1 << 32) + 150
    return tx.seal(b"\x60" + bytes(47))


# Arbitrary bytes, plus mutations of a genuine packet (which reach past the SPI and length checks
# into the replay window, the AEAD and the trailer check), plus our SPI glued to random tails.
GENUINE = _genuine()
payloads = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda tail: GENUINE[:4] + tail, st.binary(min_size=0, max_size=120)),
    st.builds(
        lambda i, v: GENUINE[:i] + bytes([v]) + GENUINE[i + 1:],
        st.integers(0, len(GENUINE) - 1), st.integers(0, 255),
    ),
    st.builds(lambda n: GENUINE[:n], st.integers(0, len(GENUINE))),
)


def _check(sa: SecurityAssociation, data: bytes) -> None:
    assert isinstance(classify(data), Kind)
    before = sa.replay.snapshot()
    try:
        nh, inner = sa.open(data)
    except ESPError:
        assert sa.replay.snapshot() == before
    else:
        assert isinstance(nh, int) and isinstance(inner, bytes)
    out = sa.open_many([data, data])
    assert isinstance(out, list) and len(out) <= 1  # the second copy is always a replay


@pytest.mark.quick_twin
@settings(max_examples=2000, deadline=None)
@given(data=payloads, esn=st.booleans())
def test_any_bytes_give_result_or_esperror(data: bytes, esn: bool) -> None:
    _check(_sa(esn), data)


@pytest.mark.slow
@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          database=None)
@given(data=payloads, esn=st.booleans())
def test_any_bytes_give_result_or_esperror_10k(data: bytes, esn: bool) -> None:
    _check(_sa(esn), data)
