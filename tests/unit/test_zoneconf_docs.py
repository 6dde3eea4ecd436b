"""docs/rendezvous.md shows, under each `tunneld account primary-config` / `secondary-config` command, the
text it prints: run every such command and compare, the keys' secrets aside (shown there as `...`). The
lab runs the generator's text as it is (test_cli_account_zone.py), so the page, the CLI and the tests
cannot drift apart.
"""

from __future__ import annotations

import base64
import itertools
import re
import shlex
from pathlib import Path

import pytest

from tunneld.cli import main

DOC = Path(__file__).resolve().parents[2] / "docs" / "rendezvous.md"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.M | re.S)
_SECRET = re.compile(r'secret "[A-Za-z0-9+/=]+";')
_PDNS_KEY = re.compile(r"^(pdnsutil import-tsig-key \S+ \S+) \S+$", re.M)


def examples() -> list[tuple[list[str], str]]:
    """(argv after `tunneld`, the block below it) for every command block that prints a configuration."""
    blocks = [(m[1], m[2]) for m in _FENCE.finditer(DOC.read_text())]
    pairs = []
    for (lang, command), (_, shown) in itertools.pairwise(blocks):
        argv = shlex.split(command.replace("\\\n", " ")) if lang == "sh" else []
        if argv[:2] == ["tunneld", "account"] and argv[2].endswith("-config"):
            pairs.append((argv[1:], shown))
    return pairs


def test_the_page_has_the_three_configurations() -> None:
    kinds = sorted((argv[1], "--powerdns" in argv) for argv, _ in examples())
    assert kinds == [("primary-config", False), ("primary-config", True), ("secondary-config", False)]


@pytest.mark.parametrize("argv, shown", [pytest.param(a, b, id=" ".join(a[1:2] + a[-1:]))
                                         for a, b in examples()])
def test_each_block_is_what_its_command_prints(argv: list[str], shown: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "secret"
    secret.write_text(base64.b64encode(bytes(range(32))).decode() + "\n")
    secret.chmod(0o600)
    argv = [str(secret) if prev == "--secret-file" else a for prev, a in zip(["", *argv], argv, strict=False)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    printed = _PDNS_KEY.sub(r"\1 ...", _SECRET.sub('secret "...";', out))
    assert printed == shown
