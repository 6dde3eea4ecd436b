"""`serve-dns --primary ADDR:PORT --primary-key FILE`: the front given to the server, and one line with exit
2 for each bad argument (the server itself faked: nothing binds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dns.name
import pytest

from tests.unit.serve_dns_fake import fake_serve
from tests.unit.serve_dns_fake import serve_dns as run_serve_dns
from tunneld.cli import tsig_stanza

ZONE = "example.com"
FRONT_SECRET = bytes(range(100, 132))


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    return fake_serve(monkeypatch)


def serve_dns(tmp_path: Path, *extra: str) -> int:
    return run_serve_dns(tmp_path, *extra, zone=ZONE)


def key_file(tmp_path: Path, text: str | bytes | None = None, name: str = "front.key") -> str:
    path = tmp_path / name
    data = tsig_stanza(f"front.{ZONE}", FRONT_SECRET) if text is None else text
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


def test_the_front_gets_the_primary_and_its_key(tmp_path: Path, served: dict[str, Any]) -> None:
    assert serve_dns(tmp_path, "--primary", "192.0.2.53:5300", "--primary-key", key_file(tmp_path)) == -1
    front = served["front"]
    assert front.primary == ("192.0.2.53", 5300)
    assert front.key.name == dns.name.from_text(f"front.{ZONE}.") and front.key.secret == FRONT_SECRET
    assert serve_dns(tmp_path) == -1 and served["front"] is None  # without: no front


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("primary-only", "--primary without --primary-key"),
        ("key-only", "--primary-key without --primary"),
        ("name", "bad --primary"),
        ("port-0", "not a port number"),
        ("missing", "cannot read --primary-key"),
        ("not-a-stanza", "not one key statement"),
        ("algorithm", "unsupported TSIG algorithm"),
        ("huge", "larger than"),
        ("binary", "bad --primary-key"),
        ("account-key", f"named {ZONE}., not front.{ZONE}.; give the front key, which `tunneld account "
                        f"primary-config` prints"),
        ("other-zone", "named front.example.net., not front.example.com."),
    ],
)
def test_bad_primary_arguments_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   served: dict[str, Any], case: str, words: str) -> None:
    good = key_file(tmp_path)
    args = {
        "primary-only": ["--primary", "192.0.2.53:53"],
        "key-only": ["--primary-key", good],
        "name": ["--primary", "primary.example.net:53", "--primary-key", good],
        "port-0": ["--primary", "192.0.2.53:0", "--primary-key", good],
        "missing": ["--primary", "192.0.2.53:53", "--primary-key", str(tmp_path / "nonexistent")],
        "not-a-stanza": ["--primary", "192.0.2.53:53", "--primary-key", key_file(tmp_path, "secret\n", "a")],
        "algorithm": ["--primary", "192.0.2.53:53", "--primary-key",
                      key_file(tmp_path, 'key "f." { algorithm hmac-sha3; secret "AAAA"; };', "b")],
        "huge": ["--primary", "192.0.2.53:53", "--primary-key", key_file(tmp_path, " " * 10000, "c")],
        "binary": ["--primary", "192.0.2.53:53", "--primary-key", key_file(tmp_path, b"\xff\xfe", "d")],
        "account-key": ["--primary", "192.0.2.53:53", "--primary-key",
                        key_file(tmp_path, tsig_stanza(ZONE, FRONT_SECRET), "e")],
        "other-zone": ["--primary", "192.0.2.53:53", "--primary-key",
                       key_file(tmp_path, tsig_stanza("front.example.net", FRONT_SECRET), "f")],
    }[case]
    rc = serve_dns(tmp_path, *args)
    out, err = capsys.readouterr()
    assert rc == 2, err
    assert out == "" and err.count("\n") == 1 and err.startswith("tunneld: ") and words in err, err
    assert "Traceback" not in err and "front" not in served
