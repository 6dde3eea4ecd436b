"""tunneld.privdrop: parsing and refusals without root; the real drop in a forked child as root."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import in_forked_child
from tunneld import privdrop
from tunneld.privdrop import CAP_NET_ADMIN, CAP_NET_BIND_SERVICE, PrivilegeError

STATUS = """Name:\tpython3
Uid:\t999\t999\t999\t999
CapEff:\t0000000000001000
NoNewPrivs:\t1
"""


def test_parse_status_fields() -> None:
    fields = privdrop.parse_status(STATUS)
    assert fields["Uid"] == "999\t999\t999\t999" and fields["CapEff"] == "0000000000001000"
    assert fields["NoNewPrivs"] == "1" and "Nonsense" not in fields


def test_cap_names() -> None:
    assert privdrop.cap_names(1 << CAP_NET_ADMIN) == "CAP_NET_ADMIN"
    assert privdrop.cap_names(1 << CAP_NET_ADMIN | 1 << CAP_NET_BIND_SERVICE) == \
        "CAP_NET_BIND_SERVICE CAP_NET_ADMIN"
    assert privdrop.cap_names(1 << 33) == "CAP_33" and privdrop.cap_names(0) == "no capability"


def test_unprivileged_port_start(tmp_path: Path) -> None:
    f = tmp_path / "start"
    f.write_text("80\n")
    assert privdrop.unprivileged_port_start(f) == 80
    assert privdrop.unprivileged_port_start(tmp_path / "missing") == 1024
    f.write_text("x")
    assert privdrop.unprivileged_port_start(f) == 1024


def test_missing_user_names_the_fix() -> None:
    with pytest.raises(PrivilegeError) as e:
        privdrop.lookup("no-such-user-x")
    assert "useradd --system" in str(e.value) and '[service] user = "root"' in str(e.value)
    assert "\n" not in str(e.value)


def test_refuses_with_a_second_thread_and_changes_nothing() -> None:
    before = privdrop.capabilities(), os.getresuid()
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        # two or more: a test runner (xdist) has threads of its own
        with pytest.raises(PrivilegeError, match=r"with ([2-9]|[1-9][0-9]+) threads"):
            privdrop.drop_to(None, [CAP_NET_ADMIN])
    finally:
        stop.set()
        t.join()
    assert (privdrop.capabilities(), os.getresuid()) == before



def _me() -> dict[str, Any]:
    st = privdrop.parse_status(Path("/proc/self/status").read_text())
    return {"uid": st["Uid"].split(), "gid": st["Gid"].split(), "groups": st["Groups"],
            "eff": int(st["CapEff"], 16), "prm": int(st["CapPrm"], 16), "inh": int(st["CapInh"], 16),
            "amb": int(st["CapAmb"], 16), "bnd": int(st["CapBnd"], 16), "nnp": st["NoNewPrivs"]}


def _account() -> privdrop.Account:
    try:
        return privdrop.lookup("tunneld")
    except PrivilegeError:
        pytest.skip("no tunneld user (tools/install.sh creates it)")


root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@root
def test_drop_to_the_user_keeps_exactly_net_admin() -> None:
    acct = _account()

    def body() -> dict[str, Any]:
        privdrop.drop_to(acct, [CAP_NET_ADMIN])
        return _me()

    got = in_forked_child(body)["ok"]
    assert got["uid"] == [str(acct.uid)] * 4 and got["gid"] == [str(acct.gid)] * 4 and got["groups"] == ""
    assert got["eff"] == got["prm"] == 1 << CAP_NET_ADMIN
    assert got["inh"] == got["amb"] == 0 and got["nnp"] == "1"
    assert got["bnd"] == 1 << CAP_NET_ADMIN  # root here has CAP_SETPCAP: the bounding set is cut too


@root
def test_drop_keeps_net_bind_service_when_asked_and_then_cannot_regain() -> None:
    acct = _account()

    def body() -> dict[str, Any]:
        privdrop.drop_to(acct, [CAP_NET_ADMIN, CAP_NET_BIND_SERVICE])
        first = _me()
        try:
            privdrop.drop_to(None, [CAP_NET_ADMIN, 0])  # CAP_CHOWN is gone for good
        except PrivilegeError as e:
            first["again"] = str(e)
        privdrop.drop_to(None, [])  # non-root: only the capabilities are reduced
        first["last"] = _me()
        return first

    got = in_forked_child(body)["ok"]
    assert got["eff"] == 1 << CAP_NET_ADMIN | 1 << CAP_NET_BIND_SERVICE
    assert "cannot keep CAP_0" in got["again"]
    assert got["last"]["eff"] == got["last"]["prm"] == 0 and got["last"]["uid"] == [str(acct.uid)] * 4


@root
def test_drop_capabilities_keeps_uid_0_with_nothing() -> None:
    def body() -> dict[str, Any]:
        privdrop.drop_capabilities()
        me = _me()
        try:
            os.setuid(1)
        except PermissionError:
            me["setuid"] = "refused"
        return me

    got = in_forked_child(body)["ok"]
    assert got["uid"] == ["0"] * 4 and got["eff"] == got["prm"] == got["bnd"] == 0
    assert got["nnp"] == "1" and got["setuid"] == "refused"


@root
def test_without_setpcap_the_bounding_set_is_left_and_the_drop_still_holds() -> None:
    """As under the systemd unit: bounding set CAP_NET_ADMIN CAP_SETUID CAP_SETGID, no CAP_SETPCAP."""
    acct = _account()
    unit = {CAP_NET_ADMIN, privdrop.CAP_SETUID, privdrop.CAP_SETGID}

    def body() -> dict[str, Any]:
        for cap in range(privdrop._last_cap() + 1):
            if cap not in unit:
                privdrop._prctl(privdrop.PR_CAPBSET_DROP, cap)
        mask = sum(1 << c for c in unit)
        privdrop._capset(mask, mask)
        privdrop.drop_to(acct, [CAP_NET_ADMIN])
        return _me()

    got = in_forked_child(body)["ok"]
    assert got["eff"] == got["prm"] == 1 << CAP_NET_ADMIN and got["nnp"] == "1"
    assert got["bnd"] == sum(1 << c for c in unit) and got["uid"] == [str(acct.uid)] * 4


def test_plan_keeps_net_admin_and_bind_service_only_for_a_low_port() -> None:
    assert privdrop.plan("root", 53) is None
    if os.geteuid() != 0:
        pytest.skip("as root only: a non-root start keeps its own user")
    acct = _account()
    assert privdrop.plan("tunneld", 4500, port_start=1024) == privdrop.Plan(acct, frozenset({CAP_NET_ADMIN}))
    assert privdrop.plan("tunneld", 0, port_start=1024) == privdrop.Plan(acct, frozenset({CAP_NET_ADMIN}))
    low = privdrop.plan("tunneld", 500, port_start=1024)
    assert low is not None and low.keep == {CAP_NET_ADMIN, CAP_NET_BIND_SERVICE}
    assert low.describe() == "running as user tunneld with CAP_NET_BIND_SERVICE CAP_NET_ADMIN"
    with pytest.raises(PrivilegeError, match="useradd"):
        privdrop.plan("no-such-user-x", 4500)


@root
def test_plan_started_non_root_keeps_the_user_and_what_it_has() -> None:
    acct = _account()

    def body() -> list[Any]:
        privdrop.drop_to(acct, [CAP_NET_ADMIN])
        p = privdrop.plan("tunneld", 80, port_start=1024)
        assert p is not None
        return [p.account, sorted(p.keep), p.apply()]

    got = in_forked_child(body)["ok"]
    assert got == [None, [CAP_NET_ADMIN], f"running as uid {acct.uid} with CAP_NET_ADMIN"]


@root
def test_a_capability_the_unit_does_not_give_is_refused_before_anything_changes() -> None:
    acct = _account()

    def body() -> list[Any]:
        privdrop._prctl(privdrop.PR_CAPBSET_DROP, CAP_NET_BIND_SERVICE)
        eff, prm, _ = privdrop.capabilities()
        privdrop._capset(eff & ~(1 << CAP_NET_BIND_SERVICE), prm & ~(1 << CAP_NET_BIND_SERVICE))
        try:
            privdrop.drop_to(acct, [CAP_NET_ADMIN, CAP_NET_BIND_SERVICE])
        except PrivilegeError as e:
            return [str(e), os.getresuid(), _me()["nnp"]]
        return ["dropped"]

    got = in_forked_child(body)["ok"]
    assert got == ["cannot keep CAP_NET_BIND_SERVICE: the process does not have it", [0, 0, 0], "0"]


@root
def test_started_non_root_with_an_ambient_capability_drops_it_all() -> None:
    """As serve-dns under systemd's DynamicUser: a user with an ambient CAP_NET_BIND_SERVICE."""
    acct = _account()
    bind = 1 << CAP_NET_BIND_SERVICE
    pr_cap_ambient_raise = 2  # linux/prctl.h

    def body() -> list[Any]:
        privdrop.drop_to(acct, [CAP_NET_BIND_SERVICE])
        privdrop._capset(bind, bind, bind)
        privdrop._prctl(privdrop.PR_CAP_AMBIENT, pr_cap_ambient_raise, CAP_NET_BIND_SERVICE)
        before = _me()["amb"]
        privdrop.drop_to(None, ())
        return [before, _me()]

    before, after = in_forked_child(body)["ok"]
    assert before == bind
    assert after["amb"] == after["eff"] == after["prm"] == after["inh"] == 0 and after["nnp"] == "1"
    assert after["uid"] == [str(acct.uid)] * 4
