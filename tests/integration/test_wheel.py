"""The distribution as a user gets it: a wheel built from the repository's tracked files alone (a clean
clone), installed into a fresh virtual environment with its dependencies from the package index, runs from
anywhere.

Needs no root; 10 to 30 s with a warm pip cache (the index and a build of python-pytun otherwise).
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                                reason="needs a git checkout (the tracked files are the clean clone)")


def clean_copy(dest: Path) -> Path:
    """The tracked files (with their working-tree content): what a fresh clone of this commit would hold."""
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True,
                           timeout=60).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def run(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env,
                          check=False)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    src = clean_copy(work / "src")
    out = work / "out"
    r = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)], work)
    assert r.returncode == 0, r.stderr[-2000:]
    [whl] = (work / "out").glob("tunneld-*.whl")
    return whl


def test_the_wheel_holds_the_package_alone_with_its_data(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"tunneld"}  # no top-level crypto, lab, tests or bench
    assert {"tunneld/py.typed", "tunneld/crypto/py.typed"} <= set(names)
    assert "tunneld = tunneld.cli:main" in entry_points
    # The native forms of the fast path are built into the wheel where the build machine can (a compiler
    # and OpenSSL's headers, which tools/install.sh installs): a wheel without them is correct but slow.
    if shutil.which("cc") and Path("/usr/include/openssl/evp.h").exists():
        built = {n.split(".")[0] for n in names if n.endswith(".so")}
        assert built == {"tunneld/crypto/_gcm", "tunneld/fastpath/_tcp6"}


def test_the_wheel_runs_from_a_fresh_venv(wheel: Path, tmp_path: Path) -> None:
    base = Path(sys.base_prefix) / "bin" / "python3"
    venv = tmp_path / "venv"
    assert run([str(base), "-m", "venv", str(venv)], tmp_path).returncode == 0
    r = run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(wheel)], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"  # not the repository: nothing may come from its layout
    elsewhere.mkdir()
    r = run([str(venv / "bin" / "python"), "-c", "import tunneld; print(tunneld.__file__)"], elsewhere)
    assert r.stdout.startswith(str(venv)), r.stdout + r.stderr
    r = run([str(venv / "bin" / "tunneld"), "--help"], elsewhere, timeout=60)
    assert r.returncode == 0 and "serve-dns" in r.stdout, r.stderr
    r = run([str(venv / "bin" / "tunneld"), "account", "new", "example.net"], elsewhere, timeout=60)
    assert r.returncode == 0, r.stderr
    first, *rest = r.stdout.splitlines()
    assert len(base64.b64decode(first, validate=True)) == 32
    assert 'key "example.net." {' in rest and "\talgorithm hmac-sha256;" in rest
