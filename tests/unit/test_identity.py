"""Device identity: the ULA derivation (a protocol constant) and the device key file's safety rules."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import pickle
import stat
from pathlib import Path

import pytest

from tunneld.crypto.noise import public_key
from tunneld.identity import (
    DeviceIdentity,
    IdentityError,
    account_prefix,
    check_peer_ula,
    iid_label,
    ula_for,
)

# The vector in docs/protocol.md.
DOMAIN = "Home.Example.NET."
PUBLIC_KEY = bytes(range(32))
ULA = "fd40:6e19:fbec:0:630d:cd29:66c4:3366"
ULA_HEX = "fd406e19fbec0000630dcd2966c43366"
LABEL = "AutoTunnel-63-0d-cd-29-66-c4-33-66"


def _independent_ula(domain: str, key: bytes) -> ipaddress.IPv6Address:
    # Written out from the specification, not from the module: fd || SHA-256(domain)[:5] || 0000 ||
    # SHA-256(key)[:8], with the domain lower-cased and its trailing dot removed.
    name = domain.lower().removesuffix(".")
    gid = hashlib.sha256(name.encode("ascii")).digest()[:5]
    iid = hashlib.sha256(key).digest()[:8]
    return ipaddress.IPv6Address(int.from_bytes(b"\xfd" + gid + b"\x00\x00" + iid, "big"))


# --------------------------------------------------------------------------------------------------------
# Derivation
# --------------------------------------------------------------------------------------------------------


def test_ula_known_answer() -> None:
    ula = ula_for(DOMAIN, PUBLIC_KEY)
    assert ula == _independent_ula(DOMAIN, PUBLIC_KEY)
    assert str(ula) == ULA
    assert ula.packed.hex() == ULA_HEX
    assert ula.packed[:6].hex() == "fd" + hashlib.sha256(b"home.example.net").hexdigest()[:10]


def test_ula_spellings_of_domain_agree() -> None:
    assert ula_for("home.example.net", PUBLIC_KEY) == ula_for(DOMAIN, PUBLIC_KEY)
    assert ula_for("HOME.EXAMPLE.NET", PUBLIC_KEY) == ula_for(DOMAIN, PUBLIC_KEY)


@pytest.mark.parametrize("seed", range(5))
def test_ula_matches_independent_computation(seed: int) -> None:
    key = hashlib.sha256(bytes([seed])).digest()
    domain = f"d{seed}.example"
    ula = ula_for(domain, key)
    assert ula == _independent_ula(domain, key)
    assert ula in account_prefix(domain)
    assert ula.is_private and ula.packed[0] == 0xFD and ula.packed[6:8] == b"\x00\x00"


def test_account_prefix() -> None:
    prefix = account_prefix(DOMAIN)
    assert prefix == ipaddress.IPv6Network("fd40:6e19:fbec::/48")
    assert ula_for(DOMAIN, PUBLIC_KEY) in prefix
    assert ula_for("other.example", PUBLIC_KEY) not in prefix


def test_ula_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError):
        ula_for("a..b", PUBLIC_KEY)
    with pytest.raises(ValueError):
        ula_for(DOMAIN, PUBLIC_KEY[:31])


def test_iid_label() -> None:
    assert iid_label(PUBLIC_KEY) == LABEL
    iid = hashlib.sha256(PUBLIC_KEY).digest()[:8]
    assert "AutoTunnel-" + "-".join(f"{b:02x}" for b in iid) == LABEL
    # The label's pairs are the ULA's last 64 bits.
    assert LABEL.removeprefix("AutoTunnel-").replace("-", "") == ULA_HEX[16:]


def test_check_peer_ula_accepts_match() -> None:
    assert check_peer_ula(DOMAIN, PUBLIC_KEY, ULA) == ipaddress.IPv6Address(ULA)
    assert check_peer_ula(DOMAIN, PUBLIC_KEY, ipaddress.IPv6Address(ULA), peer="laptop")


def test_check_peer_ula_refuses_mismatch() -> None:
    with pytest.raises(IdentityError) as e:
        check_peer_ula(DOMAIN, PUBLIC_KEY, "fd40:6e19:fbec::1", peer="laptop")
    msg = str(e.value)
    assert "'laptop'" in msg and ULA in msg and "fd40:6e19:fbec::1" in msg and "\n" not in msg
    with pytest.raises(IdentityError) as e:
        check_peer_ula(DOMAIN, PUBLIC_KEY, "fd40:6e19:fbec::1")
    assert base64.b64encode(PUBLIC_KEY).decode() in str(e.value)
    with pytest.raises(IdentityError, match="not an IPv6 address"):
        check_peer_ula(DOMAIN, PUBLIC_KEY, "not-an-address", peer="laptop")


# --------------------------------------------------------------------------------------------------------
# The key file
# --------------------------------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_create_then_reload(tmp_path: Path) -> None:
    state = tmp_path / "state" / "tunneld"
    ident = DeviceIdentity.load_or_create(state)
    key_file = state / "device.key"
    assert _mode(key_file) == 0o600
    assert _mode(state) == 0o700
    content = key_file.read_bytes()
    assert content.endswith(b"\n") and content.count(b"\n") == 1
    assert base64.b64decode(content[:-1], validate=True) == ident.private_key
    assert public_key(ident.private_key) == ident.public_key
    again = DeviceIdentity.load_or_create(state)
    assert again.private_key == ident.private_key and again == ident
    assert again.ula(DOMAIN) == ula_for(DOMAIN, ident.public_key)
    assert again.iid_label() == iid_label(ident.public_key)
    # No temporary files left behind.
    assert sorted(p.name for p in state.iterdir()) == ["device.key"]


def test_existing_state_dir_is_used(tmp_path: Path) -> None:
    ident = DeviceIdentity.load_or_create(tmp_path)
    assert (tmp_path / "device.key").exists()
    assert DeviceIdentity.load_or_create(tmp_path) == ident


def test_two_directories_give_different_keys(tmp_path: Path) -> None:
    a = DeviceIdentity.load_or_create(tmp_path / "a")
    b = DeviceIdentity.load_or_create(tmp_path / "b")
    assert a.public_key != b.public_key


def test_loads_a_wg_genkey_style_file_without_newline(tmp_path: Path) -> None:
    private = bytes(range(1, 33))
    key_file = tmp_path / "device.key"
    key_file.write_bytes(base64.b64encode(private))
    key_file.chmod(0o600)
    assert DeviceIdentity.load_or_create(tmp_path).private_key == private


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o601])
def test_refuses_key_readable_by_others(tmp_path: Path, mode: int) -> None:
    DeviceIdentity.load_or_create(tmp_path)
    key_file = tmp_path / "device.key"
    key_file.chmod(mode)
    with pytest.raises(IdentityError) as e:
        DeviceIdentity.load_or_create(tmp_path)
    msg = str(e.value)
    assert str(key_file) in msg
    assert f"chmod 600 {key_file}" in msg
    assert f"{mode:04o}" in msg
    assert "\n" not in msg


def test_refuses_key_owned_by_someone_else(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    DeviceIdentity.load_or_create(tmp_path)
    key_file = tmp_path / "device.key"
    if os.geteuid() == 0:
        os.chown(key_file, 54321, -1)  # root can give the file away
    else:
        # Pretend to be another (non-root) user: the file's owner then differs from the effective uid.
        monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 1)
    with pytest.raises(IdentityError, match="chown") as e:
        DeviceIdentity.load_or_create(tmp_path)
    assert str(key_file) in str(e.value)


def test_root_owned_key_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Like ssh: a key owned by root cannot have been planted by another unprivileged user.
    ident = DeviceIdentity.load_or_create(tmp_path)
    monkeypatch.setattr(os, "fstat", lambda fd: _as_root(os.stat(tmp_path / "device.key")))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert DeviceIdentity.load_or_create(tmp_path) == ident


def _as_root(st: os.stat_result) -> os.stat_result:
    fields = list(st)
    fields[stat.ST_UID] = 0
    return os.stat_result(fields)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\n",
        b"not base64!!\n",
        base64.b64encode(bytes(31)) + b"\n",
        base64.b64encode(bytes(33)) + b"\n",
        base64.b64encode(bytes(range(32))) + b"\n" + base64.b64encode(bytes(range(32))) + b"\n",
        base64.b64encode(bytes(range(32))) + b"\n\n",
        b"\xff" * 44,
        b"A" * 5000,
    ],
)
def test_refuses_malformed_key(tmp_path: Path, content: bytes) -> None:
    key_file = tmp_path / "device.key"
    key_file.write_bytes(content)
    key_file.chmod(0o600)
    with pytest.raises(IdentityError) as e:
        DeviceIdentity.load_or_create(tmp_path)
    msg = str(e.value)
    assert str(key_file) in msg and "delete it" in msg and "\n" not in msg
    line = content.strip().decode("latin-1")
    assert len(line) < 10 or line[:10] not in msg  # the file's content is never echoed
    assert key_file.read_bytes() == content  # never overwritten


def test_refuses_directory_in_place_of_key(tmp_path: Path) -> None:
    (tmp_path / "device.key").mkdir(mode=0o700)
    with pytest.raises(IdentityError, match="not a regular file"):
        DeviceIdentity.load_or_create(tmp_path)


def test_unwritable_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def refuse_create(path: str, flags: int, mode: int = 0o777) -> int:
        # What a non-root user meets in a directory it cannot write (root would not, so simulate it).
        if flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", refuse_create)
    with pytest.raises(IdentityError) as e:
        DeviceIdentity.load_or_create(tmp_path)
    msg = str(e.value)
    assert "cannot create the device key: Permission denied" in msg and str(tmp_path) in msg
    assert list(tmp_path.iterdir()) == []


def test_state_dir_that_is_a_file(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "state"
    not_a_dir.write_text("")
    with pytest.raises(IdentityError) as e:
        DeviceIdentity.load_or_create(not_a_dir)
    assert str(not_a_dir) in str(e.value)


def test_lost_creation_race_loads_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    winner = DeviceIdentity.generate()
    real_link = os.link

    def link_after_rival(src: str, dst: str) -> None:
        # Another process publishes its key just before ours.
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, base64.b64encode(winner.private_key) + b"\n")
        os.close(fd)
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link_after_rival)
    assert DeviceIdentity.load_or_create(tmp_path) == winner
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device.key"]


def test_private_key_never_shown(tmp_path: Path) -> None:
    ident = DeviceIdentity.load_or_create(tmp_path)
    forms = [ident.private_key.hex(), base64.b64encode(ident.private_key).decode(), repr(ident.private_key)]
    for text in (repr(ident), str(ident), f"{ident}", f"{ident!r}"):
        assert ident.public_key_b64 in text
        for form in forms:
            assert form not in text
    with pytest.raises(TypeError):
        pickle.dumps(ident)
    # And not in the message about a readable file either.
    (tmp_path / "device.key").chmod(0o644)
    with pytest.raises(IdentityError) as e:
        DeviceIdentity.load_or_create(tmp_path)
    for form in forms:
        assert form not in str(e.value)


def test_constructor_checks_length() -> None:
    with pytest.raises(ValueError):
        DeviceIdentity(bytes(31))
    ident = DeviceIdentity(bytes(range(32)))
    assert ident.public_key == public_key(bytes(range(32)))
    assert len({ident, DeviceIdentity(bytes(range(32)))}) == 1
