"""The marked block: its text, and the safe writer (unchanged -> no write, user lines kept, bind mounts)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tunneld import marked_block
from tunneld.marked_block import read_block, replace_block, write_block

DOMAIN = "home.example.net"
BEGIN = "# BEGIN tunneld home.example.net\n"
END = "# END tunneld home.example.net\n"
USER = "127.0.0.1 localhost\n::1 localhost ip6-localhost\n"


def test_block_appended_after_user_lines() -> None:
    text = replace_block(USER, DOMAIN, ["fd00::1 desk.home.example.net desk"])
    assert text == USER + BEGIN + "fd00::1 desk.home.example.net desk\n" + END
    assert read_block(text, DOMAIN) == ["fd00::1 desk.home.example.net desk"]


def test_missing_final_newline_is_completed_before_the_block() -> None:
    text = replace_block("127.0.0.1 localhost", DOMAIN, ["fd00::1 a.home.example.net a"])
    assert text.startswith("127.0.0.1 localhost\n" + BEGIN)


def test_block_replaced_in_place_and_user_lines_kept_byte_for_byte() -> None:
    before = "# my hosts\r\n10.0.0.1 nas\t# tab\n"
    after = "\xe9t\xe9 192.0.2.9 other\n"
    text = before + BEGIN + "fd00::1 old.home.example.net old\n" + END + after
    new = replace_block(text, DOMAIN, ["fd00::2 new.home.example.net new"])
    assert new == before + BEGIN + "fd00::2 new.home.example.net new\n" + END + after


def test_empty_lines_remove_the_block_and_nothing_else() -> None:
    text = USER + BEGIN + "fd00::1 a.home.example.net a\n" + END + "10.0.0.2 printer\n"
    assert replace_block(text, DOMAIN, []) == USER + "10.0.0.2 printer\n"
    assert replace_block(USER, DOMAIN, []) == USER


def test_other_domains_blocks_untouched() -> None:
    other = "# BEGIN tunneld other.example\nfd00::9 x.other.example x\n# END tunneld other.example\n"
    text = replace_block(other, DOMAIN, ["fd00::1 a.home.example.net a"])
    assert text.startswith(other)
    assert replace_block(text, DOMAIN, []) == other


def test_domain_is_normalised() -> None:
    text = replace_block("", "Home.Example.NET.", ["fd00::1 a.home.example.net a"])
    assert text.startswith(BEGIN)
    assert replace_block(text, DOMAIN, []) == ""


def test_begin_without_end_loses_no_user_line() -> None:
    text = USER + BEGIN + "fd00::1 stale.home.example.net stale\n10.0.0.3 users-own\n"
    new = replace_block(text, DOMAIN, ["fd00::2 b.home.example.net b"])
    assert "10.0.0.3 users-own\n" in new
    assert new.count(BEGIN) == 1 and new.count(END) == 1
    assert read_block(new, DOMAIN) == ["fd00::2 b.home.example.net b"]


def test_stray_end_and_duplicate_blocks_are_cleaned() -> None:
    block = BEGIN + "fd00::1 a.home.example.net a\n" + END
    text = END + USER + block + "10.0.0.4 mine\n" + block
    new = replace_block(text, DOMAIN, ["fd00::5 c.home.example.net c"])
    assert new == USER + BEGIN + "fd00::5 c.home.example.net c\n" + END + "10.0.0.4 mine\n"


@pytest.mark.parametrize(
    "line",
    [
        "",
        "a\nb",
        "a\rb",
        "a\x00b",
        "a\x1bb",
        "tab\there",
        "caf\xe9",
        "# END tunneld home.example.net",
        "# BEGIN x",
    ],
)
def test_unsafe_lines_refused(line: str) -> None:
    with pytest.raises(ValueError):
        replace_block(USER, DOMAIN, [line])


@pytest.mark.parametrize("domain", ["", "a..b", "bad domain", "x\n# BEGIN", "-a.example", "_x.example"])
def test_bad_domains_refused(domain: str) -> None:
    with pytest.raises(ValueError):
        replace_block(USER, domain, ["fd00::1 a"])


def test_one_string_is_not_a_sequence_of_lines() -> None:
    with pytest.raises(TypeError):
        replace_block(USER, DOMAIN, "fd00::1 a")  # type: ignore[arg-type]


def test_writer_creates_a_missing_file_0644(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    old_umask = os.umask(0o077)
    try:
        assert write_block(path, DOMAIN, ["fd00::1 a.home.example.net a"])
    finally:
        os.umask(old_umask)
    assert path.read_text() == BEGIN + "fd00::1 a.home.example.net a\n" + END
    assert path.stat().st_mode & 0o777 == 0o644
    assert not write_block(tmp_path / "absent", DOMAIN, [])
    assert not (tmp_path / "absent").exists()


def test_writer_unchanged_means_no_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "hosts"
    path.write_text(USER)
    assert write_block(path, DOMAIN, ["fd00::1 a.home.example.net a"])
    inode = path.stat().st_ino

    def no_write(*args: object, **kwargs: object) -> None:
        raise AssertionError("wrote an unchanged file")

    monkeypatch.setattr(marked_block, "_write_replacing", no_write)
    monkeypatch.setattr(marked_block, "_write_in_place", no_write)
    assert not write_block(path, DOMAIN, ["fd00::1 a.home.example.net a"])
    assert path.stat().st_ino == inode


def test_writer_keeps_user_lines_mode_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    raw = b"127.0.0.1 localhost\n10.0.0.1 caf\xe9-latin1\n"
    path.write_bytes(raw)
    path.chmod(0o640)
    assert write_block(path, DOMAIN, ["fd00::1 a.home.example.net a"])
    assert path.read_bytes().startswith(raw)
    assert path.stat().st_mode & 0o777 == 0o640
    assert write_block(path, DOMAIN, [])
    assert path.read_bytes() == raw
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hosts"]


@pytest.mark.parametrize("code", [errno.EBUSY, errno.EXDEV])
def test_writer_falls_back_to_in_place_when_rename_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    path = tmp_path / "hosts"
    path.write_text(USER)
    path.chmod(0o600)
    inode = path.stat().st_ino

    def busy(src: object, dst: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(marked_block.os, "replace", busy)
    assert write_block(path, DOMAIN, ["fd00::1 a.home.example.net a"])
    assert path.read_text() == USER + BEGIN + "fd00::1 a.home.example.net a\n" + END
    assert path.stat().st_ino == inode  # the same file, written in place
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hosts"]  # the temporary file is gone
    assert write_block(path, DOMAIN, [])
    assert path.read_text() == USER


def test_writer_writes_in_place_on_another_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "hosts"
    path.write_text(USER)
    inode = path.stat().st_ino

    def renamed(src: object, dst: object) -> None:
        raise AssertionError("a bind-mounted file must not be renamed over")

    monkeypatch.setattr(marked_block.os, "replace", renamed)
    monkeypatch.setattr(marked_block, "_is_mount_point", lambda path, info: True)
    assert write_block(path, DOMAIN, ["fd00::1 a.home.example.net a"])
    assert path.stat().st_ino == inode
    assert read_block(path.read_text(), DOMAIN) == ["fd00::1 a.home.example.net a"]


def test_writer_other_rename_errors_propagate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "hosts"
    path.write_text(USER)

    def full(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, "no space")

    monkeypatch.setattr(marked_block.os, "replace", full)
    with pytest.raises(OSError):
        write_block(path, DOMAIN, ["fd00::1 a.home.example.net a"])
    assert path.read_text() == USER
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hosts"]


def test_writer_refuses_a_file_too_large(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "hosts"
    path.write_text(USER * 10)
    monkeypatch.setattr(marked_block, "MAX_FILE", len(USER) * 10 - 1)
    with pytest.raises(ValueError, match="larger than"):
        write_block(path, DOMAIN, ["fd00::1 a.home.example.net a"])
    assert path.read_text() == USER * 10


def test_a_file_listed_as_a_mount_point_is_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ip netns exec bind-mounts a file from the same filesystem: only mountinfo tells (spaces escaped)."""
    path = tmp_path / "my hosts"
    path.write_text(USER)
    mountinfo = tmp_path / "mountinfo"
    escaped = str(path.resolve()).replace(" ", "\\040")
    mountinfo.write_text(f"36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw\n"
                         f"99 35 8:1 /etc/netns/x/hosts {escaped} rw shared:1 - ext4 /dev/sda1 rw\n")
    monkeypatch.setattr(marked_block, "_MOUNTINFO", str(mountinfo))
    assert marked_block._is_mount_point(path, path.stat())
    other = tmp_path / "other"
    other.write_text(USER)
    assert not marked_block._is_mount_point(other, other.stat())
