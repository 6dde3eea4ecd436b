"""The outer socket's pure helpers: GSO run splitting and address forms."""

from __future__ import annotations

import pytest

from tunneld.net.udp import MAX_GSO_BYTES, MAX_GSO_SEGMENTS, display_addr, split_runs, to_socket_addr


def runs(sizes: list[int]) -> list[tuple[int, int, int]]:
    return list(split_runs([bytes(n) for n in sizes]))


def test_equal_sizes_are_one_run() -> None:
    assert runs([1452] * 10) == [(0, 10, 1452)]


def test_a_shorter_datagram_ends_a_run() -> None:
    # GSO segments are all gso_size bytes except the last, which may be shorter (UDP_SEGMENT).
    assert runs([1452, 1452, 900, 1452]) == [(0, 3, 1452), (3, 4, 1452)]


def test_a_longer_datagram_starts_a_new_run() -> None:
    assert runs([100, 100, 1452, 1452]) == [(0, 2, 100), (2, 4, 1452)]


def test_runs_respect_kernel_limits() -> None:
    rs = runs([1452] * 200)
    assert sum(e - s for s, e, _ in rs) == 200
    for s, e, size in rs:
        assert e - s <= MAX_GSO_SEGMENTS
        assert (e - s) * size <= MAX_GSO_BYTES
    small = runs([20] * 200)
    assert all(e - s <= MAX_GSO_SEGMENTS for s, e, _ in small)


def test_runs_cover_everything_in_order() -> None:
    sizes = [1452, 1452, 60, 1452, 800, 800, 800, 1400, 1452]
    rs = runs(sizes)
    assert [i for s, e, _ in rs for i in range(s, e)] == list(range(len(sizes)))
    for s, e, size in rs:
        assert all(n <= size for n in sizes[s:e]) and all(n == size for n in sizes[s:e - 1])


@pytest.mark.parametrize(
    ("host", "port", "sock", "shown"),
    [
        ("192.0.2.1", 4500, ("::ffff:192.0.2.1", 4500), "192.0.2.1:4500"),
        ("2001:db8::1", 4501, ("2001:db8::1", 4501), "[2001:db8::1]:4501"),
    ],
)
def test_address_forms(host: str, port: int, sock: tuple[str, int], shown: str) -> None:
    assert to_socket_addr(host, port) == sock
    assert display_addr(sock) == shown
