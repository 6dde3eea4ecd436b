"""The systemd units in dist/systemd, checked statically: `systemd-analyze verify` finds nothing to say,
the security exposure stays at most 3.0, and the filter keeps the calls the daemon needs to drop itself.

No systemd runs as PID 1 on the test machines: the units are never installed or started here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "dist" / "systemd"
ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
NAMES = ("tunneld.service", "tunneld-dns.service")
MAX_EXPOSURE = 3.0
# The drop to the tunneld user after start-up: setgroups, setresgid/setresuid, capset, prctl (no-new-privs,
# the bounding set, keep-caps). The unit's SystemCallFilter must let every one of them through.
DROP_CALLS = ("setgroups", "setresgid", "setresuid", "capset", "prctl")


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=60, check=False)


def unit_text(name: str) -> str:
    return (UNITS / name).read_text(encoding="utf-8")


def installed_copy(name: str, directory: Path) -> Path:
    """The unit as an installer writes it: ExecStart pointing at this environment's tunneld script (verify
    checks that the binary exists; /usr/bin/tunneld does not on a test machine)."""
    script = Path(sys.executable).parent / "tunneld"
    assert script.exists(), "the tunneld console script is not installed in this environment"
    text = unit_text(name)
    assert "ExecStart=/usr/bin/tunneld " in text
    path = directory / name
    path.write_text(text.replace("/usr/bin/tunneld", str(script)), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", NAMES)
def test_verify_is_silent(name: str, tmp_path: Path) -> None:
    # verify exits 0 even for unknown keys and bad values: it only warns, so any output is a failure.
    r = analyze("verify", "--man=no", str(installed_copy(name, tmp_path)))
    assert r.returncode == 0, r.stderr
    assert r.stdout + r.stderr == ""


@pytest.mark.skipif(shutil.which("man") is None, reason="man is not installed")
def test_verify_finds_the_man_page_the_units_name(tmp_path: Path) -> None:
    # Documentation=man:tunneld(8) is the page tools/dist_files.py generates; verify runs `man` on it.
    root = Path(__file__).resolve().parents[2]
    gen = tmp_path / "gen"
    subprocess.run([sys.executable, str(root / "tools" / "dist_files.py"), str(gen)], check=True, timeout=60)
    (tmp_path / "man" / "man8").mkdir(parents=True)
    (gen / "tunneld.8").rename(tmp_path / "man" / "man8" / "tunneld.8")
    units = [str(installed_copy(name, tmp_path)) for name in NAMES]
    env = {**os.environ, "MANPATH": str(tmp_path / "man")}
    r = subprocess.run([str(ANALYZE), "verify", *units], capture_output=True, text=True, timeout=60, env=env,
                       check=False)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stderr
    r = subprocess.run([str(ANALYZE), "verify", *units], capture_output=True, text=True, timeout=60,
                       env={**env, "MANPATH": str(tmp_path / "nothing")}, check=False)
    assert "man tunneld(8)" in r.stdout + r.stderr  # without the page, verify says so


def test_verify_reports_a_mistake(tmp_path: Path) -> None:
    # The check above can fail: a misspelt key is reported.
    path = installed_copy("tunneld.service", tmp_path)
    path.write_text(path.read_text().replace("NoNewPrivileges=", "NoNewPrivilege="), encoding="utf-8")
    r = analyze("verify", "--man=no", str(path))
    assert "NoNewPrivilege" in r.stdout + r.stderr


def exposure(path: Path) -> float:
    r = analyze("security", "--offline=true", "--no-pager", str(path))
    assert r.returncode == 0, r.stderr
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m, r.stdout[-500:]
    return float(m.group(1))


@pytest.mark.parametrize("name", NAMES)
def test_exposure_at_most_3(name: str) -> None:
    assert exposure(UNITS / name) <= MAX_EXPOSURE


def test_exposure_parse_sees_a_weaker_unit(tmp_path: Path) -> None:
    # The parsed figure moves with the unit: without its hardening, a service scores far above 3.
    path = tmp_path / "bare.service"
    path.write_text("[Service]\nExecStart=/bin/true\n", encoding="utf-8")
    assert exposure(path) > 9.0


def syscalls(group: str, seen: set[str] | None = None) -> set[str]:
    """The system calls of a `systemd-analyze syscall-filter` group, its nested groups expanded."""
    seen = set() if seen is None else seen
    r = analyze("syscall-filter", "--no-pager", group)
    assert r.returncode == 0, r.stderr
    calls: set[str] = set()
    for line in r.stdout.splitlines()[1:]:  # the first line is the group's own name
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        if item.startswith("@"):
            if item not in seen:
                seen.add(item)
                calls |= syscalls(item, seen)
        else:
            calls.add(item)
    return calls


def directives(name: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in unit_text(name).splitlines() if line.startswith(f"{key}=")]


@pytest.mark.parametrize("name", NAMES)
def test_the_filter_keeps_the_privilege_drop(name: str) -> None:
    allowed: set[str] = set()
    for value in directives(name, "SystemCallFilter"):
        groups = value.removeprefix("~").split()
        calls = set().union(*(syscalls(g) if g.startswith("@") else {g} for g in groups))
        allowed = (allowed - calls) if value.startswith("~") else (allowed | calls)
    assert allowed, "no SystemCallFilter allow list"
    assert set(DROP_CALLS) <= allowed, set(DROP_CALLS) - allowed


def test_the_interfaces_shared_with_the_daemon() -> None:
    # What the daemon and the installers rely on (docs/packaging.md): root start with a small bounding set,
    # no User= (the hosts writer needs uid 0), the secret as a credential, readiness from the main process.
    up = unit_text("tunneld.service")
    exec_start = "/usr/bin/tunneld up --secret-file %d/account-secret"
    assert directives("tunneld.service", "ExecStart") == [exec_start]
    assert directives("tunneld.service", "CapabilityBoundingSet") == ["CAP_NET_ADMIN CAP_SETUID CAP_SETGID"]
    assert directives("tunneld.service", "LoadCredential") == ["account-secret:/etc/tunneld/secret"]
    assert directives("tunneld.service", "Type") == ["notify"]
    assert directives("tunneld.service", "NotifyAccess") == ["main"]
    assert directives("tunneld.service", "DeviceAllow") == ["/dev/net/tun rw"]
    for absent in ("User=", "Group=", "AmbientCapabilities=", "DynamicUser="):
        assert f"\n{absent}" not in up
    dns = unit_text("tunneld-dns.service")
    assert directives("tunneld-dns.service", "DynamicUser") == ["yes"]
    assert directives("tunneld-dns.service", "AmbientCapabilities") == ["CAP_NET_BIND_SERVICE"]
    assert directives("tunneld-dns.service", "CapabilityBoundingSet") == ["CAP_NET_BIND_SERVICE"]
    assert "--db /var/lib/tunneld-dns/dns.sqlite --secret-file %d/account-secret" in dns
