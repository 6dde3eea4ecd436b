"""Anti-replay window (RFC 4303 §3.4.3, RFC 6479) and ESN inference (RFC 4303 Appendix A2)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunneld.crypto.replay import ReplayWindow

W = ReplayWindow().window  # 8128 with the default 128 blocks
M32 = 0xFFFFFFFF


def feed(win: ReplayWindow, seq: int) -> bool:
    ok = win.check(seq)
    if ok:
        assert win.commit(seq)
    return ok


def test_window_is_at_least_2048() -> None:
    assert W >= 2048
    assert W == 127 * 64


@pytest.mark.parametrize(
    ("history", "seq", "accepted"),
    [
        pytest.param([], 1, True, id="first"),
        pytest.param([], 0, False, id="seq-zero-never-valid"),
        pytest.param([1, 2, 3], 3, False, id="duplicate-top"),
        pytest.param([10], 5, True, id="in-window-behind-top"),
        pytest.param([10, 5], 5, False, id="duplicate-in-window"),
        pytest.param([W + 100], 101, True, id="oldest-in-window"),
        pytest.param([W + 100], 100, False, id="just-too-old"),
        pytest.param([10], 10 + 10**6, True, id="far-ahead"),
        pytest.param([10, 10 + 10**6], 11, False, id="too-old-after-jump"),
        pytest.param([64, 128, 200], 130, True, id="other-block"),
        pytest.param([63, 64, 65], 64, False, id="duplicate-across-block-edge"),
        pytest.param([5 + 129 * 64], 5 + 128 * 64, True, id="ring-slot-reused-is-cleared"),
    ],
)
def test_table(history: list[int], seq: int, accepted: bool) -> None:
    win = ReplayWindow(esn=True)
    for s in history:
        assert feed(win, s)
    before = win.snapshot()
    assert win.check(seq) is accepted
    assert win.snapshot() == before, "check must not change the window"
    assert win.commit(seq) is accepted


def test_check_does_not_commit() -> None:
    win = ReplayWindow()
    assert win.check(7)
    assert win.check(7)
    assert win.top == 0


def test_limit_without_esn() -> None:
    win = ReplayWindow(esn=False)
    assert feed(win, M32)
    assert not win.check(M32 + 1)  # the 32-bit counter never cycles


@pytest.mark.parametrize(
    ("top", "lo", "expected"),
    [
        pytest.param(0, 1, 1, id="start"),
        pytest.param(100, 50, 50, id="same-subspace"),
        pytest.param((3 << 32) | 100_000, 5, (4 << 32) | 5, id="case-A-below-window-is-next-subspace"),
        pytest.param((3 << 32) | 100_000, 100_000 - W + 1, (3 << 32) | (100_000 - W + 1), id="case-A-bottom"),
        pytest.param((3 << 32) | 100_000, 100_000 - W, (4 << 32) | (100_000 - W), id="case-A-below-bottom"),
        pytest.param((3 << 32) | 10, M32 - 5, (2 << 32) | (M32 - 5), id="case-B-previous-subspace"),
        pytest.param((3 << 32) | 10, 20, (3 << 32) | 20, id="case-B-ahead"),
        pytest.param(M32 - 10, 5, (1 << 32) | 5, id="esn-wrap-of-low-half"),
        pytest.param(10, M32 - 5, M32 - 5, id="subspace-0-has-no-previous"),
    ],
)
def test_esn_inference(top: int, lo: int, expected: int) -> None:
    win = ReplayWindow(esn=True)
    win.top = top
    assert win.infer(lo) == expected


def test_esn_wrap_end_to_end() -> None:
    win = ReplayWindow(esn=True)
    assert feed(win, M32 - 3)
    for lo in (M32 - 1, 0, 1, 2, M32):  # 0 here is 2^32, a valid number: only seq 0 itself is not
        assert feed(win, win.infer(lo)), hex(lo)
    assert win.top == (1 << 32) | 2
    assert not feed(win, win.infer(M32 - 1))  # duplicate from the previous subspace
    assert not feed(win, win.infer(1))


def test_without_esn_infer_is_identity() -> None:
    win = ReplayWindow(esn=False)
    win.top = M32 - 1
    assert win.infer(5) == 5


class Reference:
    """The RFC's definition, written as plainly as possible: a set of seen numbers and the top."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.seen: set[int] = set()
        self.top = 0

    def accept(self, seq: int) -> bool:
        if seq == 0 or seq in self.seen or (seq <= self.top and self.top - seq >= self.window):
            return False
        self.seen.add(seq)
        self.top = max(self.top, seq)
        return True


@settings(max_examples=300, deadline=None)
@given(
    blocks=st.sampled_from([2, 4, 8]),
    base=st.sampled_from([0, 1000, (1 << 32) - 300]),
    arrivals=st.lists(st.integers(min_value=0, max_value=2000), min_size=1, max_size=300),
)
def test_differential_against_reference(blocks: int, base: int, arrivals: list[int]) -> None:
    win = ReplayWindow(esn=True, blocks=blocks)
    ref = Reference(win.window)
    for off in arrivals:
        seq = base + off
        assert feed(win, seq) == ref.accept(seq), (seq, win.top)
    assert win.top == ref.top
