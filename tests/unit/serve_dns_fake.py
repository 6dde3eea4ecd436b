"""`tunneld serve-dns` run with its server faked: the keywords it would give the server, nothing bound."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import trio


class Served(Exception):
    """The fake server's way out of serve-dns."""


def fake_serve(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Replace the server; the dict returned gets every keyword serve-dns gives it (front, llq, ...)."""
    import tunneld.dnsserver.serve

    seen: dict[str, Any] = {}

    async def serve(*args: object, task_status: Any = trio.TASK_STATUS_IGNORED, **kwargs: Any) -> None:
        seen.update(kwargs)
        task_status.started()
        raise Served

    monkeypatch.setattr(tunneld.dnsserver.serve, "serve", serve)
    return seen


def serve_dns(tmp_path: Path, *extra: str, zone: str = "example.com") -> int:
    """serve-dns's exit code (-1: it reached the faked server) with ``extra`` arguments."""
    from tunneld.cli import main

    secret = tmp_path / "secret"
    secret.write_text(base64.b64encode(bytes(32)).decode() + "\n")
    secret.chmod(0o600)
    try:
        return main(["serve-dns", "--zone", zone, "--secret-file", str(secret), "--db",
                     str(tmp_path / "db.sqlite"), "--listen", "127.0.0.1:5353", "--user", "root", *extra])
    except BaseException as e:
        if isinstance(e, Served) or (isinstance(e, BaseExceptionGroup) and e.subgroup(Served) is not None):
            return -1
        raise
