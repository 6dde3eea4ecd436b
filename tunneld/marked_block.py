"""A block of lines that tunneld owns inside a system file (/etc/hosts, ssh_known_hosts).

The block sits between ``# BEGIN tunneld DOMAIN`` and ``# END tunneld DOMAIN``. Everything outside it is the
user's and is kept byte for byte. ``replace_block`` is pure text; ``write_block`` writes a file safely: a
temporary file and a rename, or in place where the file is a bind mount (containers, ``ip netns exec``),
where a rename cannot replace it. See docs/names.md.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tunneld.crypto.kdf import normalize_domain

__all__ = ["begin_marker", "end_marker", "read_block", "replace_block", "write_block"]

_MARKER = "tunneld"
# One line of the block: printable ASCII only, so no newline, carriage return or other control character can
# reach the file, and nothing a shell or a parser of these files would read differently.
_SAFE_LINE = re.compile(r"[\x20-\x7e]+")
# The lines of a text, each with its own ending, so that joining them gives the text back exactly.
_LINES = re.compile(r"[^\n]*\n|[^\n]+\Z")
# A block larger than this is a bug upstream, not an account: refuse it rather than fill the file.
MAX_LINES = 10_000
# The files written are small; a larger one is a mistake in the configuration (say, /dev/zero), not read.
MAX_FILE = 16 << 20
_MOUNTINFO = "/proc/self/mountinfo"


def begin_marker(domain: str) -> str:
    """The line that opens the block of ``domain`` (without its newline)."""
    return f"# BEGIN {_MARKER} {normalize_domain(domain)}"


def end_marker(domain: str) -> str:
    """The line that closes the block of ``domain`` (without its newline)."""
    return f"# END {_MARKER} {normalize_domain(domain)}"


def _check_lines(lines: Sequence[str]) -> list[str]:
    if isinstance(lines, str):
        raise TypeError("lines must be a sequence of lines, not one string")
    if len(lines) > MAX_LINES:
        raise ValueError(f"a block holds at most {MAX_LINES} lines")
    checked: list[str] = []
    for line in lines:
        if not isinstance(line, str) or _SAFE_LINE.fullmatch(line) is None:
            raise ValueError(f"block line {line!r} is empty or holds a character other than printable ASCII")
        if line.startswith("# BEGIN ") or line.startswith("# END "):
            raise ValueError(f"block line {line!r} looks like a block marker")
        checked.append(line)
    return checked


def _split(text: str) -> list[str]:
    return _LINES.findall(text)


def _bare(line: str) -> str:
    return line.rstrip("\r\n")


def read_block(text: str, domain: str) -> list[str] | None:
    """The lines of the first complete block of ``domain`` in ``text``, or None if there is none."""
    begin, end = begin_marker(domain), end_marker(domain)
    inside: list[str] | None = None
    for line in _split(text):
        bare = _bare(line)
        if inside is None:
            if bare == begin:
                inside = []
        elif bare == end:
            return inside
        elif bare == begin:
            inside = []
        else:
            inside.append(bare)
    return None


def replace_block(text: str, domain: str, lines: Sequence[str]) -> str:
    """``text`` with the block of ``domain`` holding exactly ``lines``; with no lines, without the block.

    The new block takes the place of the first old one, or goes at the end. Every other line is kept as it
    was. A damaged block is handled without losing a user's line: a BEGIN with no END after it, or a stray
    END, is only a marker line to drop; the lines after it stay (they may be the user's).
    """
    body = _check_lines(lines)
    begin, end = begin_marker(domain), end_marker(domain)
    source = _split(text)
    # Find the complete blocks: (index of BEGIN, index of END). A BEGIN followed by another BEGIN before any
    # END is an orphan, as is one never closed.
    blocks: list[tuple[int, int]] = []
    orphans: set[int] = set()
    open_at: int | None = None
    for index, line in enumerate(source):
        bare = _bare(line)
        if bare == begin:
            if open_at is not None:
                orphans.add(open_at)
            open_at = index
        elif bare == end:
            if open_at is None:
                orphans.add(index)
            else:
                blocks.append((open_at, index))
                open_at = None
    if open_at is not None:
        orphans.add(open_at)

    inside: set[int] = set()
    for first, last in blocks:
        inside.update(range(first, last + 1))
    new_block = [begin + "\n", *(line + "\n" for line in body), end + "\n"] if body else []
    out: list[str] = []
    placed = False
    for index, line in enumerate(source):
        if index in orphans:
            continue
        if index in inside:
            if not placed and blocks and index == blocks[0][0]:
                out.extend(new_block)
                placed = True
            continue
        out.append(line)
    if not placed and new_block:
        if out and not out[-1].endswith("\n"):
            out[-1] += "\n"
        out.extend(new_block)
    return "".join(out)


def _read(path: Path) -> tuple[str, os.stat_result | None]:
    try:
        with open(path, "rb") as file:
            info = os.fstat(file.fileno())
            data = file.read(MAX_FILE + 1)
    except FileNotFoundError:
        return "", None
    if len(data) > MAX_FILE:
        raise ValueError(f"{path} is larger than {MAX_FILE} bytes: not a hosts or known-hosts file")
    # surrogateescape: bytes that are not UTF-8 in the user's lines come back out unchanged.
    return data.decode("utf-8", "surrogateescape"), info


def _write_in_place(path: Path, data: bytes) -> None:
    with open(path, "r+b") as file:
        file.truncate(0)
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _is_mount_point(path: Path, info: os.stat_result) -> bool:
    """True when ``path`` is a mount point (a bind mount a rename cannot replace): on another device than its
    directory, or listed in /proc/self/mountinfo (a file bind-mounted from the same filesystem)."""
    try:
        if os.stat(path.parent).st_dev != info.st_dev:
            return True
    except OSError:
        return False
    try:
        with open(_MOUNTINFO, encoding="utf-8", errors="replace") as mounts:
            # Field 5 is the mount point, with space, tab, newline and backslash octal-escaped.
            target = os.path.realpath(path)
            escaped = "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in target)
            return any(len(f := line.split(" ")) > 4 and f[4] == escaped for line in mounts)
    except OSError:
        return False


def _write_replacing(path: Path, data: bytes, info: os.stat_result | None) -> bool:
    """Write through a temporary file and a rename; False if the rename cannot replace ``path``."""
    try:
        handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.tunneld-", dir=path.parent)
    except PermissionError:
        return False
    temp = Path(temp_name)
    replaced = False
    try:
        with os.fdopen(handle, "wb") as file:
            if info is None:
                os.fchmod(file.fileno(), 0o644)
            else:
                os.fchmod(file.fileno(), info.st_mode & 0o7777)
                if (info.st_uid, info.st_gid) != (os.getuid(), os.getgid()):
                    try:
                        os.fchown(file.fileno(), info.st_uid, info.st_gid)
                    except PermissionError:
                        return False  # the owner would change: write in place instead
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        try:
            os.replace(temp, path)
        except OSError as error:
            if error.errno in (errno.EBUSY, errno.EXDEV, errno.EPERM, errno.EACCES):
                return False
            raise
        replaced = True
    finally:
        if not replaced:
            with contextlib.suppress(OSError):
                temp.unlink()
    with contextlib.suppress(OSError):
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    return True


def write_block(path: Path, domain: str, lines: Sequence[str]) -> bool:
    """Make the block of ``domain`` in the file at ``path`` hold ``lines``; False if nothing changed.

    No write at all when the text would be the same (so no needless inotify or mtime change). A missing file
    is created with mode 0644 (unless the block is empty). A file's mode and owner are kept.
    """
    path = Path(path)
    old, info = _read(path)
    new = replace_block(old, domain, lines)
    if new == old:
        return False
    data = new.encode("utf-8", "surrogateescape")
    if info is not None and _is_mount_point(path, info):
        _write_in_place(path, data)
        return True
    if not _write_replacing(path, data, info):
        if info is None:
            raise PermissionError(errno.EACCES, "cannot create the file", str(path))
        _write_in_place(path, data)
    return True
