"""`tools/install.sh --system` into a temporary root (DESTDIR): the environment, the command, the units with
ExecStart rewritten to it, the man page, the completions and /etc/tunneld (0700), and nothing outside DESTDIR.

The system mode is never run into this machine's real root by a test. Root only (the installer checks the
Debian packages as root); about 20 s with a warm pip cache.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "tools" / "install.sh"
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/dpkg-query").exists(),
                                reason="needs root on Debian (CI runs as root)")
HOST_PATHS = ("/usr/local/bin/tunneld", "/usr/local/lib/tunneld", "/etc/systemd/system/tunneld.service",
              "/etc/systemd/system/tunneld-dns.service", "/usr/local/share/man/man8/tunneld.8.gz")


def test_an_unknown_argument_is_refused() -> None:
    r = subprocess.run([str(INSTALL), "--sytem"], capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 2 and "--system" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_system_mode_into_destdir(tmp_path: Path) -> None:
    before = {p: os.path.lexists(p) for p in HOST_PATHS}
    dest = tmp_path / "root"
    env = {**os.environ, "DESTDIR": str(dest)}
    r = subprocess.run([str(INSTALL), "--system"], capture_output=True, text=True, timeout=300, env=env,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p: os.path.lexists(p) for p in HOST_PATHS} == before  # nothing written outside DESTDIR

    command = dest / "usr/local/bin/tunneld"
    assert os.readlink(command) == "/usr/local/lib/tunneld/bin/tunneld"
    script = dest / "usr/local/lib/tunneld/bin/tunneld"
    assert script.read_text().splitlines()[0] == "#!/usr/local/lib/tunneld/bin/python"
    assert str(dest) not in (dest / "usr/local/lib/tunneld/pyvenv.cfg").read_text()
    for unit in ("tunneld.service", "tunneld-dns.service"):
        text = (dest / "etc/systemd/system" / unit).read_text()
        assert re.search(r"^ExecStart=/usr/local/bin/tunneld (up|serve-dns) ", text, re.M), unit
        assert "/usr/bin/tunneld" not in text
    assert (dest / "usr/local/share/man/man8/tunneld.8.gz").stat().st_size > 1000
    bash_completion = (dest / "usr/local/share/bash-completion/completions/tunneld").read_text()
    assert bash_completion.rstrip().endswith("complete -o bashdefault -F _shtab_tunneld tunneld")
    assert (dest / "usr/local/share/zsh/site-functions/_tunneld").read_text().startswith("#compdef tunneld")
    etc = (dest / "etc/tunneld").stat()
    assert stat.S_IMODE(etc.st_mode) == 0o700

    # The environment runs from its staged place (a venv finds its packages beside pyvenv.cfg), on its own
    # packages, not the repository's.
    python = dest / "usr/local/lib/tunneld/bin/python"
    r = subprocess.run([str(python), "-c", "import sys, tunneld.cli; print(tunneld.cli.__file__); "
                        "sys.exit(tunneld.cli.main(['--help']))"], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(str(dest / "usr/local/lib/tunneld/lib/")) and "serve-dns" in r.stdout
    # No pip, no build tools, no byte code naming the staging root.
    assert not list((dest / "usr/local/lib/tunneld/bin").glob("pip*"))
    lib = dest / "usr/local/lib/tunneld/lib"
    pyc = next(lib.glob("python3*/site-packages/tunneld/__pycache__/cli.*.pyc"))
    assert str(dest).encode() not in pyc.read_bytes()
