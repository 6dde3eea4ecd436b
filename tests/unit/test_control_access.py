"""Who may do what on the control socket: mode 0660 with the daemon's group, SO_PEERCRED, read-only
commands for the group, one line for a user without access."""

from __future__ import annotations

import functools
import grp
import os
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tunneld.services import control
from tunneld.services.control import Listener, answer, peer_privileged

NOBODY = 65534


async def handler(req: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "cmd": req.get("cmd")}


@pytest.mark.parametrize("cmd", sorted(control.READ_ONLY))
def test_read_only_commands_are_answered_for_anyone(cmd: str) -> None:
    reply = trio.run(functools.partial(answer, privileged=False), f'{{"cmd": "{cmd}"}}\n'.encode(), handler)
    assert b'"ok": true' in reply, reply


@pytest.mark.parametrize(("cmd", "said"), [('"rebind"', "rebind needs root"), ('"frobnicate"', "needs root"),
                                           ("5", "? needs root")])
def test_other_commands_need_root(cmd: str, said: str) -> None:
    reply = trio.run(functools.partial(answer, privileged=False), f'{{"cmd": {cmd}}}\n'.encode(), handler)
    assert said.encode() in reply and b'"ok"' not in reply, reply
    assert b'"ok": true' in trio.run(answer, f'{{"cmd": {cmd}}}\n'.encode(), handler)


def test_our_own_user_is_privileged() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert peer_privileged(a) is True


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory other users can traverse (pytest's tmp_path is not)."""
    with tempfile.TemporaryDirectory(prefix="tunneld-control-") as d:
        os.chmod(d, 0o755)
        yield Path(d)


def _tunneld_gid() -> int:
    try:
        return grp.getgrnam("tunneld").gr_gid
    except KeyError:
        pytest.skip("no tunneld group (tools/install.sh creates it)")


CLIENT = ("import json, sys; from tunneld.services.control import request; "
          "print(json.dumps(request(sys.argv[1], {'cmd': sys.argv[2]})))")


async def _as(uid: int, gid: int, *argv: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                                   sys.executable, *argv], capture_stdout=True, capture_stderr=True,
                                  check=False, cwd=Path(__file__).parents[2])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a socket of another group, other users)")
def test_the_group_reads_and_others_are_refused(open_dir: Path) -> None:
    gid = _tunneld_gid()
    path = open_dir / "control.sock"

    async def main() -> None:
        egid = os.getegid()
        listener = Listener.open(path, group=gid)
        try:
            assert os.getegid() == egid  # back after the bind
            st = os.stat(path)
            assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == gid and st.st_uid == 0
            async with trio.open_nursery() as nursery:
                await nursery.start(listener.serve, handler)
                member = await _as(NOBODY, gid, "-c", CLIENT, str(path), "status")
                assert member.returncode == 0 and b'"ok": true' in member.stdout, member
                member = await _as(NOBODY, gid, "-c", CLIENT, str(path), "rebind")
                assert b"rebind needs root" in member.stdout, member
                cli = await _as(NOBODY, NOBODY, "-m", "tunneld", "status", "--socket", str(path))
                assert cli.returncode == 1 and cli.stdout == b"", cli
                assert cli.stderr.decode() == (f"tunneld: permission denied on {path}: run as root or join "
                                               f"the group tunneld (`usermod -aG tunneld USER`)\n")
                nursery.cancel_scope.cancel()
        finally:
            listener.close()

    trio.run(main)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (another user's view of a 0700 config directory)")
def test_a_member_who_cannot_read_the_config_asks_the_default_socket(open_dir: Path) -> None:
    """/etc/tunneld is 0700 in the package layout: a member of the group cannot read the config that names
    the socket, so status asks the default path; any other config problem is still the usual exit 2."""
    from tunneld.config import DEFAULT_CONTROL_SOCKET

    gid = _tunneld_gid()
    private = open_dir / "etc"
    private.mkdir(mode=0o700)
    (private / "tunneld.toml").write_text("[account]\n")
    (open_dir / "broken.toml").write_text("[account\n")
    os.chmod(open_dir / "broken.toml", 0o644)

    async def main() -> None:
        config = str(private / "tunneld.toml")
        unreadable = await _as(NOBODY, gid, "-m", "tunneld", "status", "--config", config)
        assert unreadable.returncode == 1, unreadable
        assert str(DEFAULT_CONTROL_SOCKET) in unreadable.stderr.decode(), unreadable
        broken = await _as(NOBODY, gid, "-m", "tunneld", "status", "--config", str(open_dir / "broken.toml"))
        assert broken.returncode == 2 and str(DEFAULT_CONTROL_SOCKET) not in broken.stderr.decode(), broken

    trio.run(main)
