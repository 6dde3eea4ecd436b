"""The man page and the bash and zsh completions generated from the argument parser (tools/dist_files.py):
they render, parse, and carry the options, so a new option reaches them without anyone editing them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, str(ROOT / "tools" / "dist_files.py"), str(out)], check=True, timeout=60)
    return out


def test_writes_the_three_files(generated: Path) -> None:
    assert sorted(p.name for p in generated.iterdir()) == ["_tunneld", "tunneld.8", "tunneld.bash"]


@pytest.mark.skipif(shutil.which("man") is None, reason="man is not installed")
def test_man_renders_the_page(generated: Path) -> None:
    env = {**os.environ, "MANWIDTH": "100"}
    r = subprocess.run(["man", "--warnings", "-l", str(generated / "tunneld.8")], capture_output=True,
                       text=True, timeout=60, env=env, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # groff's warnings (bad requests, unknown escapes) would land here
    text = re.sub(".\b", "", r.stdout)  # bold and underline are overstruck characters in a pipe
    assert text.startswith("TUNNELD(8)")
    for needle in ("tunneld up", "--secret-file PATH", "tunneld serve-dns", "FILES", "/etc/tunneld/secret"):
        assert needle in text, needle


def test_the_bash_completion_parses_and_completes(generated: Path) -> None:
    script = generated / "tunneld.bash"
    assert subprocess.run(["bash", "-n", str(script)], timeout=30, check=False).returncode == 0
    # Loaded, it registers itself for `tunneld` and offers the subcommands and `up`'s options.
    probe = (f"source {script}; complete -p tunneld; COMP_WORDS=(tunneld u); COMP_CWORD=1; "
             f"$(complete -p tunneld | sed -E 's/.*-F ([^ ]+).*/\\1/') tunneld u tunneld; "
             f"printf 'word:%s\\n' \"${{COMPREPLY[@]}}\"; "
             f"COMP_WORDS=(tunneld up --sec); COMP_CWORD=2; "
             f"$(complete -p tunneld | sed -E 's/.*-F ([^ ]+).*/\\1/') tunneld --sec up; "
             f"printf 'word:%s\\n' \"${{COMPREPLY[@]}}\"")
    r = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    words = {line.removeprefix("word:").strip() for line in r.stdout.splitlines() if line.startswith("word:")}
    assert "up" in words, r.stdout
    assert "--secret-file" in words, r.stdout


def test_the_zsh_completion(generated: Path) -> None:
    text = (generated / "_tunneld").read_text()
    assert text.startswith("#compdef tunneld")
    assert "--secret-file" in text and "serve-dns" in text
    if shutil.which("zsh") is not None:
        r = subprocess.run(["zsh", "-n", str(generated / "_tunneld")], timeout=30, check=False)
        assert r.returncode == 0
