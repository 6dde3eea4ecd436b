"""The config file as `tunneld join` writes it: every value through one TOML string encoder, written
atomically, and never over something that is not a regular file.

tomllib only reads, so the encoder is here (TOML 1.0 basic strings). Names and paths come from the user:
a quote and a newline in a path once put `lease = 1800` into the written file. The file is written to
``<path>.tmp`` (O_EXCL, O_NOFOLLOW) and renamed over ``path``; a device, FIFO, directory or symbolic
link at ``path`` is refused, even with --force, because the rename would replace it.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

# TOML 1.0, "Basic strings": the quotation mark, the backslash and the control characters U+0000..U+001F
# and U+007F must be escaped; every other Unicode scalar value may appear as itself.
_TOML_ESCAPES = {
    **{c: f"\\u{c:04X}" for c in (*range(0x20), 0x7F)},
    ord('"'): '\\"', ord("\\"): "\\\\", ord("\b"): "\\b", ord("\t"): "\\t", ord("\n"): "\\n",
    ord("\f"): "\\f", ord("\r"): "\\r",
}


class WriteRefused(Exception):
    """``path`` must not be written (it exists, or is not a regular file): one line with the fix."""


def toml_string(value: str) -> str:
    """``value`` as a TOML basic string, quotes included, on one line; ValueError for text that is not
    Unicode (a file name's undecodable bytes, which a UTF-8 TOML file cannot hold)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid UTF-8 (a TOML file is UTF-8 text)") from None
    return '"' + value.translate(_TOML_ESCAPES) + '"'


def join_config(domain: str, secret_file: Path, server: str, name: str, state_dir: Path | None,
                tls: bool = False, public_ca: bool = False) -> str:
    """The TOML `tunneld join` writes; every value is encoded, none is pasted in. ``public_ca`` (with
    ``tls``): the server has a public CA's certificate, so the system's CAs are trusted too."""
    state = f"state_dir = {toml_string(str(state_dir))}\n" if state_dir else ""
    transport = 'transport = "tls"\n' if tls else ""
    if tls and public_ca:
        transport += "tls_public_ca = true\n"
    return (f'# Written by `tunneld join`.\n[interface]\nname = "btmm0"\n{state}\n'
            f"[account]\ndomain = {toml_string(domain)}\nsecret_file = {toml_string(str(secret_file))}\n"
            f"server = {toml_string(server)}\nname = {toml_string(name)}\n{transport}")


def check_target(path: Path, force: bool) -> None:
    """WriteRefused unless ``path`` is free, or (with ``force``) a regular file; OSError if it cannot be
    looked at."""
    if not path.name or path.name in (".", ".."):
        raise WriteRefused(f"{path} is not a file name; pass --config PATH")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise WriteRefused(f"{path} exists and is not a regular file (a link, directory or device); "
                           f"remove it, or pass --config PATH to write elsewhere")
    if not force:
        raise WriteRefused(f"{path} exists; pass --force to replace it, or --config PATH to write elsewhere")


def write_config(path: Path, text: str, force: bool) -> None:
    """Write ``text`` to ``path`` atomically (see the module docstring); WriteRefused or OSError."""
    check_target(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # left by a join that was interrupted (a link is removed, not followed)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        check_target(path, force)  # once more, just before the rename
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
