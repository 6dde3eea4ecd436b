"""The control socket survives any input and is never taken over.

Bounded requests (size, nesting: 4 KB of "[" once killed the daemon with RecursionError), every failure
answered, a slow client blocking nobody; the path locked for the daemon's life, and only our own socket
unlinked. Real Unix sockets in a temporary directory. At the end, the request handler is fuzzed: any bytes
up to 64 KB give exactly one JSON object line, and the handler sees only bounded JSON objects.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunneld.services import control
from tunneld.services.control import MAX_DEPTH, MAX_REQUEST, ControlError, Listener, answer, parse_request

SECRET_WORD = "hunter2-in-the-request"


async def echo(req: dict[str, Any]) -> dict[str, Any]:
    if req.get("cmd") == "boom":
        raise RuntimeError(f"failed on {req.get('arg')}")
    if req.get("cmd") == "unserialisable":
        return {"x": object()}
    return {"ok": True, "cmd": req.get("cmd")}


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "c.sock"


@asynccontextmanager
async def serving(path: Path, read_timeout: float = control.READ_TIMEOUT) -> AsyncIterator[Listener]:
    listener = Listener.open(path)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda **kw: listener.serve(echo, read_timeout=read_timeout, **kw))
            yield listener
            nursery.cancel_scope.cancel()
    finally:
        listener.close()


async def exchange(path: Path, data: bytes, shut: bool = True) -> dict[str, Any]:
    """Send raw bytes, then read the one-line answer."""
    s = await trio.open_unix_socket(str(path))
    async with s:
        with trio.fail_after(5):
            await s.send_all(data)
            if shut:
                await s.send_eof()
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = await s.receive_some(65536)
                if not chunk:
                    break
                buf += chunk
    reply = json.loads(buf)
    assert isinstance(reply, dict) and buf.count(b"\n") == 1
    return reply


def run(fn: Callable[[], Any]) -> None:
    trio.run(fn)


# -- requests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "word"),
    [
        (b"[" * 4096, "deeper"),
        (b'{"cmd": ' + b"[" * 4096 + b"}\n", "deeper"),
        (b'{"a": ' * 100 + b"1" + b"}" * 100, "deeper"),
        (b"x" * (MAX_REQUEST + 1), "longer"),
        (b'{"cmd": "\xff"}\n', "UTF-8"),
        (b"1" * 5000 + b"\n", "not JSON"),
        (b"[1, 2]\n", "not a JSON object"),
        (b"", "not a JSON object"),
        (b"{\n", "not JSON"),
        (b'"\\', "not JSON"),
    ],
    ids=["brackets-4k", "deep-value", "objects-100", "oversize", "not-utf8", "huge-int", "array", "empty",
         "unterminated", "lone-escape"],
)
def test_bad_requests_are_refused_by_the_parser(data: bytes, word: str) -> None:
    with pytest.raises(control.BadRequest, match=word):
        parse_request(data)


def test_nesting_is_counted_outside_strings() -> None:
    inside = '{"cmd": "' + "[" * 1000 + '"}'
    assert control.nesting_depth(inside) == 1
    assert parse_request(inside.encode())["cmd"] == "[" * 1000
    escaped = '{"a": "\\"[[[", "b": [[1]]}'
    assert control.nesting_depth(escaped) == 3
    assert control.nesting_depth("[" * MAX_DEPTH + "]" * MAX_DEPTH) == MAX_DEPTH
    parse_request(("[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)).join(['{"a": ', "}"]).encode())


def test_a_failing_handler_is_answered_and_logged_without_the_request(
        caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        line = await answer(json.dumps({"cmd": "boom", "arg": SECRET_WORD}).encode(), echo)
        reply = json.loads(line)
        assert "internal error in boom (RuntimeError)" in reply["error"]
        assert SECRET_WORD not in line.decode()
        reply = json.loads(await answer(b'{"cmd": "unserialisable"}', echo))
        assert "TypeError" in reply["error"]

    with caplog.at_level(logging.ERROR, logger="tunneld.control"):
        trio.run(main)
    assert "boom failed: RuntimeError" in caplog.text
    assert SECRET_WORD not in caplog.text


# -- the socket --------------------------------------------------------------------------------------


def test_4k_of_brackets_is_answered_and_the_socket_lives_on(sock_path: Path) -> None:
    async def main() -> None:
        async with serving(sock_path):
            reply = await exchange(sock_path, b"[" * 4096)
            assert "deeper" in reply["error"]
            assert (await exchange(sock_path, b'{"cmd": "status"}\n')) == {"ok": True, "cmd": "status"}

    run(main)


def test_an_oversized_request_is_answered_with_an_error(sock_path: Path) -> None:
    async def main() -> None:
        async with serving(sock_path):
            reply = await exchange(sock_path, b"[" + b" " * (MAX_REQUEST + 100), shut=False)
            assert f"longer than {MAX_REQUEST}" in reply["error"]

    run(main)


def test_a_slow_client_blocks_nobody_and_is_cut_off(sock_path: Path) -> None:
    async def main() -> None:
        async with serving(sock_path, read_timeout=0.5) as listener:
            slow = await trio.open_unix_socket(str(sock_path))
            await slow.send_all(b'{"cmd": ')  # and nothing more
            with trio.fail_after(0.4):  # answered before the slow one's timeout
                assert (await exchange(sock_path, b'{"cmd": "status"}\n'))["ok"] is True
            with trio.fail_after(5):
                assert await slow.receive_some(100) == b""  # cut off, no answer
            await slow.aclose()
            with trio.fail_after(5):
                while listener.clients:
                    await trio.sleep(0.01)

    run(main)


def test_a_client_that_leaves_at_once_does_not_end_the_socket(sock_path: Path) -> None:
    async def main() -> None:
        async with serving(sock_path):
            for _ in range(10):  # fewer than the listen backlog: this thread is also the server's
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(str(sock_path))
                    s.sendall(b'{"cmd": "status"}\n')
                    # SO_LINGER 0: the close resets the connection, so the answer meets a reset
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            assert (await exchange(sock_path, b'{"cmd": "after"}\n'))["cmd"] == "after"

    run(main)


def test_too_many_clients_are_closed_not_queued(sock_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "MAX_CLIENTS", 2)

    async def main() -> None:
        async with serving(sock_path) as listener:
            held = [await trio.open_unix_socket(str(sock_path)) for _ in range(2)]
            with trio.fail_after(5):
                while listener.clients < 2:
                    await trio.sleep(0.01)
                extra = await trio.open_unix_socket(str(sock_path))
                assert await extra.receive_some(100) == b""
            await extra.aclose()
            for s in held:
                await s.aclose()
            with trio.fail_after(5):
                while listener.clients:
                    await trio.sleep(0.01)
            assert (await exchange(sock_path, b'{"cmd": "x"}\n'))["ok"] is True

    run(main)


def test_the_socket_is_0600_and_removed_on_close(sock_path: Path) -> None:
    async def main() -> None:
        async with serving(sock_path):
            assert sock_path.stat().st_mode & 0o777 == 0o600
        assert not sock_path.exists()

    run(main)


# -- the lock ----------------------------------------------------------------------------------------


def test_a_second_listener_on_the_same_path_is_refused(sock_path: Path) -> None:
    async def main() -> None:
        async with serving(sock_path):
            inode = sock_path.stat().st_ino
            with pytest.raises(ControlError, match="another running tunneld") as e:
                Listener.open(sock_path)
            assert "\n" not in str(e.value) and "control_socket" in str(e.value)
            assert sock_path.stat().st_ino == inode  # not unlinked, not replaced
            assert (await exchange(sock_path, b'{"cmd": "x"}\n'))["ok"] is True

    run(main)


def test_a_stale_socket_is_replaced(sock_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(sock_path))  # what a daemon killed by SIGKILL leaves: a socket nobody listens on

    async def main() -> None:
        async with serving(sock_path):
            assert (await exchange(sock_path, b'{"cmd": "x"}\n'))["ok"] is True

    run(main)


def test_a_live_socket_without_a_lock_is_not_taken_over(sock_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(sock_path))
        s.listen(1)
        with pytest.raises(ControlError, match="in use"):
            Listener.open(sock_path)
        assert sock_path.exists()


@pytest.mark.parametrize("kind", ["file", "symlink", "directory"])
def test_a_path_that_is_not_a_socket_is_refused_and_kept(sock_path: Path, tmp_path: Path, kind: str) -> None:
    if kind == "file":
        sock_path.write_text("precious")
    elif kind == "symlink":
        (tmp_path / "target").write_text("precious")
        sock_path.symlink_to(tmp_path / "target")
    else:
        sock_path.mkdir()
    with pytest.raises(ControlError, match="not a socket"):
        Listener.open(sock_path)
    assert sock_path.exists() or sock_path.is_symlink()
    if kind != "directory":
        assert sock_path.read_text() == "precious"


def test_a_symlinked_lock_file_is_refused(sock_path: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("x")
    (tmp_path / "c.sock.lock").symlink_to(victim)
    with pytest.raises(ControlError, match="symbolic link"):
        Listener.open(sock_path)
    assert victim.read_text() == "x"


def test_a_socket_replaced_under_us_is_not_unlinked(sock_path: Path) -> None:
    """Someone removed our socket and bound their own at the path: on exit, theirs stays."""
    async def main() -> None:
        async with serving(sock_path):
            sock_path.unlink()
            theirs.bind(str(sock_path))
        assert sock_path.exists()

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as theirs:
        run(main)


def test_the_lock_is_released_on_close(sock_path: Path) -> None:
    Listener.open(sock_path).close()
    Listener.open(sock_path).close()
    assert not sock_path.exists()


def test_another_process_holding_the_lock_refuses_us(sock_path: Path) -> None:
    """flock is per open file: a lock taken through another descriptor (another process's) refuses us."""
    import fcntl

    fd = os.open(str(sock_path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ControlError, match="another running tunneld"):
            Listener.open(sock_path)
    finally:
        os.close(fd)
    Listener.open(sock_path).close()


def test_request_reports_a_silent_daemon_as_value_error(sock_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(sock_path))
        s.listen(1)
        # accepted by the kernel, closed unanswered: the client sees the end of the stream
        import threading

        def accept_and_close() -> None:
            conn, _ = s.accept()
            conn.recv(100)
            conn.close()

        t = threading.Thread(target=accept_and_close)
        t.start()
        with pytest.raises(ValueError, match="without answering"):
            control.request(sock_path, {"cmd": "status"}, timeout=5)
        t.join(5)


# -- fuzzing the request handler -----------------------------------------------------------------------

TOKENS = ["[", "]", "{", "}", '{"cmd": ', '"status"', '"rebind"', '"port": ', ", ", ":", '"', "\\", '\\"',
          "1", "-0.5e999", "NaN", "true", "null", "\n", " ", "\u00e9", "\\ud800", "\x00", "\xff", "9" * 50]


def _structure(rnd: random.Random, depth: int) -> Any:
    kind = rnd.randrange(6) if depth < 12 else rnd.randrange(3)
    if kind == 0:
        return rnd.choice([None, True, 7, -1, 70000, 1e308, "status", "rebind", "\u2028", "\0"])
    if kind == 1:
        return rnd.random() * 10 ** rnd.randrange(-5, 300)
    if kind == 2:
        return "".join(rnd.choice(TOKENS) for _ in range(rnd.randrange(8)))
    if kind == 3:
        return [_structure(rnd, depth + 1) for _ in range(rnd.randrange(4))]
    d = {rnd.choice(["cmd", "port", "x", ""]): _structure(rnd, depth + 1) for _ in range(rnd.randrange(4))}
    if kind == 5:
        d["cmd"] = rnd.choice(["status", "rebind", "boom", "unserialisable", 1.5, 1, None])
    return d


def fuzz_input(seed: int, size: int, kind: int) -> bytes:
    """Cheap inputs up to 64 KB: random bytes, repeated token patterns (nesting bombs, strings, escapes),
    JSON structures padded to size, and those cut, bit-flipped or split by newlines."""
    rnd = random.Random(seed)
    if kind == 0:
        return rnd.randbytes(size)
    if kind == 1:
        pattern = "".join(rnd.choice(TOKENS) for _ in range(rnd.randrange(1, 12)))
        text = (pattern * (size // max(1, len(pattern)) + 1))[:size]
        return text.encode("utf-8", "surrogatepass")
    text = json.dumps(_structure(rnd, 0), allow_nan=True)
    if rnd.random() < 0.5:  # padded to size inside a string, so the line is big but valid
        text = '{"cmd": "status", "pad": "' + "a" * max(0, size - len(text) - 40) + '", "v": ' + text + "}"
    data = bytearray(text.encode("utf-8", "surrogatepass"))
    if kind == 3 and data:
        for _ in range(rnd.randrange(1, 8)):
            op, at = rnd.randrange(4), rnd.randrange(len(data))
            if op == 0:
                data[at] ^= 1 << rnd.randrange(8)
            elif op == 1:
                del data[at:]
            elif op == 2:
                data[at:at] = b"\n"
            else:
                data[at:at] = rnd.choice(TOKENS).encode("utf-8", "surrogatepass") * rnd.randrange(1, 2000)
            if not data:
                break
    return bytes(data)


seen: list[dict[str, Any]] = []


async def fuzz_handler(req: dict[str, Any]) -> dict[str, Any]:
    assert isinstance(req, dict)
    seen.append(req)
    cmd = req.get("cmd")
    if cmd == "boom":
        raise RuntimeError(f"boom on {req}")
    if isinstance(cmd, float):
        raise ValueError(cmd)
    if cmd == "unserialisable":
        return {"x": object()}
    return {"ok": True, "cmd": cmd if isinstance(cmd, str) else None}


def _answer_now(data: bytes) -> bytes:
    """Drive `answer` to completion without an event loop (the fuzz handler never awaits)."""
    coro = answer(data, fuzz_handler)
    try:
        coro.send(None)
    except StopIteration as stop:
        result: bytes = stop.value
        return result
    raise AssertionError("answer awaited something")


def _check(data: bytes) -> None:
    seen.clear()
    line = _answer_now(data)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    reply = json.loads(line)
    assert isinstance(reply, dict) and reply
    if "error" in reply:
        assert isinstance(reply["error"], str) and len(reply["error"]) < 300
    else:
        assert len(seen) == 1 and reply == {"ok": True, "cmd": reply["cmd"]}
    for req in seen:  # what reached the handler was bounded
        assert control.nesting_depth(json.dumps(req)) <= MAX_DEPTH
    assert len(seen) <= 1


fuzz_args = {"seed": st.integers(0, 2**32 - 1), "size": st.integers(0, MAX_REQUEST + 64),
             "kind": st.integers(0, 3)}


@pytest.mark.quick_twin
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**fuzz_args)
def test_any_request_gets_one_json_line(seed: int, size: int, kind: int) -> None:
    _check(fuzz_input(seed, size, kind))


@pytest.mark.slow
@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(**fuzz_args)
def test_any_request_gets_one_json_line_10k(seed: int, size: int, kind: int) -> None:
    _check(fuzz_input(seed, size, kind))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=4096))
def test_any_small_bytes_get_one_json_line(data: bytes) -> None:
    _check(data)
