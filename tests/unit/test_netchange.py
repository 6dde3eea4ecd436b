"""Network changes (proto/netchange.py): snapshots from table rows, and debouncing in virtual time."""

from __future__ import annotations

import socket

from tunneld.proto.netchange import (
    IFA_F_DEPRECATED,
    IFA_F_TEMPORARY,
    IFA_F_TENTATIVE,
    IfAddr,
    NetSnapshot,
    NetWatch,
    Route,
    build_snapshot,
)

V4, V6 = socket.AF_INET, socket.AF_INET6
HOME = build_snapshot([Route(V4, "192.168.1.1", 2)], [IfAddr(2, V4, "192.168.1.20", 24)])
CAFE = build_snapshot([Route(V4, "10.0.0.1", 3)], [IfAddr(3, V4, "10.0.0.7", 24)])


def test_primary_address_is_the_one_on_the_gateways_subnet() -> None:
    snap = build_snapshot(
        [Route(V4, "192.168.1.1", 2)],
        [IfAddr(2, V4, "172.16.9.9", 16), IfAddr(2, V4, "192.168.1.20", 24),
         IfAddr(1, V4, "127.0.0.1", 8, 254)])
    assert snap.gateway4 == "192.168.1.1" and snap.ifindex4 == 2 and snap.address4 == "192.168.1.20"
    assert snap.addresses == {"172.16.9.9", "192.168.1.20"}  # host-scope loopback does not count


def test_prefsrc_and_lowest_metric_win_and_excluded_interfaces_do_not_count() -> None:
    snap = build_snapshot(
        [Route(V4, "10.0.0.1", 3, priority=600), Route(V4, "192.168.1.1", 2, "192.168.1.99", priority=100),
         Route(V6, None, 9)],
        [IfAddr(2, V4, "192.168.1.20", 24), IfAddr(9, V6, "fd00::1", 64)], excluded={9})
    assert (snap.gateway4, snap.address4) == ("192.168.1.1", "192.168.1.99")
    assert snap.address6 is None and snap.gateway6 is None  # the tunnel's route and ULA are excluded


def test_ipv6_reachability_needs_a_settled_global_address_and_prefers_a_stable_one() -> None:
    rows = [IfAddr(2, V6, "2001:db8::aaaa", 64, flags=IFA_F_TEMPORARY),
            IfAddr(2, V6, "2001:db8::1", 64),
            IfAddr(2, V6, "2001:db8::dead", 64, flags=IFA_F_DEPRECATED),
            IfAddr(2, V6, "fe80::1", 64, scope=253)]
    snap = build_snapshot([Route(V6, "fe80::1", 2)], rows)
    assert snap.address6 == "2001:db8::1" and snap.gateway6 == "fe80::1"
    tentative = build_snapshot([Route(V6, "fe80::1", 2)],
                               [IfAddr(2, V6, "2001:db8::1", 64, flags=IFA_F_TENTATIVE)])
    assert tentative.address6 is None and tentative.gateway6 is None


def test_changes_name_what_moved() -> None:
    assert CAFE.changes(HOME) == {"default-route", "gateway", "primary-address", "addresses"}
    assert HOME.changes(HOME) == frozenset()
    dhcp_renumber = build_snapshot([Route(V4, "192.168.1.1", 2)], [IfAddr(2, V4, "192.168.1.21", 24)])
    assert dhcp_renumber.changes(HOME) == {"primary-address", "addresses"}
    assert NetSnapshot().changes(HOME) == {"default-route", "gateway", "primary-address", "addresses"}


def test_a_move_of_several_events_is_one_change() -> None:
    w = NetWatch(HOME, now=0.0, quiet=0.25, max_delay=2.0)
    # link down: address and route gone; link up at the café: address, then route.
    w.observe(NetSnapshot(), 10.0)
    w.observe(build_snapshot([], [IfAddr(3, V4, "10.0.0.7", 24)]), 10.05)
    w.observe(CAFE, 10.1)
    assert w.deadline() == 10.35
    w.poll(10.3)
    assert w.events() == []
    w.poll(10.35)
    [ev] = w.events()
    assert ev.generation == 1 and ev.old == HOME and ev.new == CAFE and ev.at == 10.35
    assert ev.changed == {"default-route", "gateway", "primary-address", "addresses"}
    assert ev.vanished == {"192.168.1.20"}
    assert w.deadline() is None and w.current == CAFE


def test_a_burst_that_ends_where_it_began_is_no_change() -> None:
    w = NetWatch(HOME, now=0.0)
    w.observe(NetSnapshot(), 1.0)
    w.observe(HOME, 1.1)  # link flapped and came back the same
    w.poll(5.0)
    assert w.events() == [] and w.generation == 0


def test_a_busy_netlink_cannot_postpone_a_change_past_max_delay() -> None:
    w = NetWatch(HOME, now=0.0, quiet=0.25, max_delay=2.0)
    t = 1.0
    while t < 4.0:  # an event every 0.1 s for 3 s
        w.observe(CAFE, t)
        w.poll(t)
        t = round(t + 0.1, 3)
    [ev] = w.events()
    assert ev.at == 3.0  # first event at 1.0 + max_delay
    assert ev.new == CAFE


def test_home_cafe_home_is_two_changes_and_coming_back_is_seen() -> None:
    w = NetWatch(HOME, now=0.0)
    for snap, t in ((CAFE, 1.0), (HOME, 10.0)):
        w.observe(snap, t)
        w.poll(t + 1)
    first, second = w.events()
    assert (first.generation, first.new) == (1, CAFE)
    assert (second.generation, second.old, second.new) == (2, CAFE, HOME)
    assert second.vanished == {"10.0.0.7"}


def test_force_reports_a_change_at_once_even_when_nothing_differs() -> None:
    w = NetWatch(HOME, now=0.0)
    w.force(HOME, 7.0)
    assert w.deadline() is not None and w.deadline() <= 7.0  # type: ignore[operator]
    w.poll(7.0)
    [ev] = w.events()
    assert ev.changed == {"manual"} and ev.generation == 1 and ev.vanished == frozenset()


def test_only_a_move_asks_for_the_redo() -> None:
    w = NetWatch(HOME, now=0.0)
    more = build_snapshot([Route(V4, "192.168.1.1", 2)],
                          [IfAddr(2, V4, "192.168.1.20", 24), IfAddr(2, V6, "2001:db8::5", 64)])
    w.observe(more, 1.0)  # an address finished DAD, or a temporary one was added: no move
    w.poll(2.0)
    w.observe(HOME, 3.0)  # and it went away again: something may have used it
    w.poll(4.0)
    w.observe(CAFE, 5.0)
    w.poll(6.0)
    added, removed, moved = w.events()
    assert (added.changed, added.moved) == ({"addresses"}, False)
    assert removed.vanished == {"2001:db8::5"} and removed.moved
    assert moved.moved and moved.generation == 3
