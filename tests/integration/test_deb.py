"""The Debian package (tools/build-deb.sh): it builds in one command, installs with `dpkg -i`, runs as
/usr/bin/tunneld from anywhere, puts the units, man page and completions where Debian looks, creates the
tunneld user and /etc/tunneld (0700), enables nothing, and is purged again, even when an assertion fails
(the tunneld user stays: other packages' files or a reinstall may own files by its uid).

Root only; skipped where tunneld is already installed system-wide (never replaced by a test). About 30 s.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("dpkg-deb") is None
                                or not Path("/usr/bin/python3").exists(),
                                reason="needs root on Debian (dpkg, /usr/bin/python3); CI runs as root")

UNITS = ("/lib/systemd/system/tunneld.service", "/lib/systemd/system/tunneld-dns.service")
PATHS = ("/usr/bin/tunneld", *UNITS, "/usr/share/man/man8/tunneld.8.gz",
         "/usr/share/bash-completion/completions/tunneld", "/usr/share/zsh/vendor-completions/_tunneld")


def run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/", check=False)


@pytest.fixture(scope="module")
def installed() -> Iterator[Path]:
    if run(["dpkg-query", "-W", "-f=${Status}", "tunneld"]).stdout.endswith("installed") \
            or Path("/usr/bin/tunneld").exists():
        pytest.skip("tunneld is installed on this machine: a test does not replace it")
    built = run([str(ROOT / "tools" / "build-deb.sh")], timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    deb = Path(built.stdout.strip().splitlines()[-1])
    assert deb.name.startswith("tunneld_") and deb.suffix == ".deb" and deb.exists(), built.stdout
    etc_existed = Path("/etc/tunneld").exists()
    try:
        r = run(["dpkg", "-i", str(deb)])
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        yield deb
    finally:
        run(["dpkg", "--purge", "tunneld"])
        if not etc_existed:
            with_contents = Path("/etc/tunneld").exists() and any(Path("/etc/tunneld").iterdir())
            if not with_contents:
                shutil.rmtree("/etc/tunneld", ignore_errors=True)
    assert not Path("/usr/bin/tunneld").exists()  # the purge removed what the package installed


def test_the_package_lists_its_files(installed: Path) -> None:
    listed = set(run(["dpkg", "-L", "tunneld"]).stdout.splitlines())
    assert set(PATHS) <= listed
    assert any(re.fullmatch(r"/usr/lib/tunneld/lib/python3\.\d+/site-packages/tunneld/cli\.py", p)
               for p in listed)
    info = run(["dpkg-deb", "-f", str(installed), "Depends"]).stdout
    assert "python3 (>= 3." in info


def test_tunneld_runs_from_usr_bin(installed: Path) -> None:
    r = run(["/usr/bin/tunneld", "--help"])
    assert r.returncode == 0 and "serve-dns" in r.stdout, r.stderr
    r = run(["/usr/bin/tunneld", "account", "new", "example.net"])
    assert r.returncode == 0 and 'key "example.net." {' in r.stdout, r.stderr
    # It runs on the package's own environment, linked to Debian's interpreter.
    r = run(["/usr/lib/tunneld/bin/python", "-c", "import sys, tunneld; print(tunneld.__file__, sys.prefix)"])
    module, prefix = r.stdout.split()
    assert re.fullmatch(r"/usr/lib/tunneld/lib/python3\.\d+/site-packages/tunneld/__init__\.py", module)
    assert prefix == "/usr/lib/tunneld"


def test_the_units_point_at_usr_bin_and_nothing_is_enabled(installed: Path) -> None:
    for unit in UNITS:
        assert "ExecStart=/usr/bin/tunneld " in Path(unit).read_text()
    wants = Path("/etc/systemd/system/multi-user.target.wants")
    assert not (wants / "tunneld.service").exists() and not (wants / "tunneld-dns.service").exists()


def test_the_user_and_the_config_directory(installed: Path) -> None:
    assert run(["getent", "passwd", "tunneld"]).returncode == 0
    assert run(["getent", "group", "tunneld"]).returncode == 0
    st = os.stat("/etc/tunneld")
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == 0


@pytest.mark.skipif(shutil.which("man") is None, reason="man is not installed")
def test_man_finds_the_page(installed: Path) -> None:
    r = subprocess.run(["man", "-w", "8", "tunneld"], capture_output=True, text=True, timeout=60, check=False)
    assert r.stdout.strip() == "/usr/share/man/man8/tunneld.8.gz", r.stderr
    r = run(["bash", "-n", "/usr/share/bash-completion/completions/tunneld"])
    assert r.returncode == 0, r.stderr
