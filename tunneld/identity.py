"""Device identity: the X25519 key pair in the state directory, and the ULA every peer derives from it.

Why the address is a function of the key (docs/protocol.md, "Device identity and addresses"): BTMM built
its inner addresses from the MAC address, which leaked hardware identity and changed with the network
card. Here a device's ULA is ``fd`` + 40 bits from the account domain + subnet 0 + 64 bits from the
device's public key, so

- it is stable across reboots and hardware changes for as long as the key file lives;
- every device can compute every peer's address from the peer's public key alone, with no registry;
- a peer cannot claim someone else's address without their private key, because the handshake proves the
  key and the address is checked against it (:func:`check_peer_ula`).

The derivation is part of the protocol (docs/protocol.md has the test vector); changing a byte of it
renumbers every device, so it is pinned by ``tests/unit/test_identity.py``.

The private key is kept in ``<state_dir>/device.key`` as one line of base64 (the format of ``wg genkey``),
mode 0600. Like ssh, we refuse a key file that other users could read or that another user owns, rather than
silently use a key that may already be compromised. No message, repr or str in this module ever contains
private key bytes.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import ipaddress
import os
import stat
from pathlib import Path
from typing import Final

from tunneld.crypto.kdf import normalize_domain
from tunneld.crypto.noise import DHLEN, NoiseError, generate_keypair, public_key

__all__ = [
    "GLOBAL_ID_LEN",
    "IID_LEN",
    "KEY_FILE_NAME",
    "DeviceIdentity",
    "IdentityError",
    "account_prefix",
    "check_peer_ula",
    "iid_label",
    "interface_id",
    "ula_for",
]

KEY_FILE_NAME: Final = "device.key"
"""The private key file inside the state directory."""
GLOBAL_ID_LEN: Final = 5
"""RFC 4193 §3.1: the Global ID is 40 bits."""
IID_LEN: Final = 8
"""RFC 4291 §2.5.1: the interface identifier is 64 bits."""
IID_LABEL_PREFIX: Final = "AutoTunnel-"
"""Back to My Mac's host label prefix for a device's outer-address records (docs/protocol.md, "DNS
records")."""

_ULA_PREFIX: Final = b"\xfd"  # FC00::/7 with L = 1: locally assigned (RFC 4193 §3.1)
_SUBNET: Final = b"\x00\x00"  # subnet ID 0: one flat /64 per account
_MAX_KEY_FILE = 1024  # a key file is 45 bytes; anything much larger is not one


class IdentityError(Exception):
    """A key file that cannot be used, or a peer whose address does not match its key.

    The message is one line that names the file or the peer and says how to fix it; it never contains key
    bytes, so it can be printed and logged as is.
    """


# --------------------------------------------------------------------------------------------------------
# Address derivation
# --------------------------------------------------------------------------------------------------------


def _check_public_key(key: bytes) -> None:
    if len(key) != DHLEN:
        raise ValueError(f"X25519 public key must be {DHLEN} bytes, got {len(key)}")


def _global_id(domain: str) -> bytes:
    # RFC 4193 §3.2.2 takes the *last* 40 bits of a SHA-1 over time and an EUI-64, because it wants a random
    # prefix per site. We want the same prefix on every device of the account, computed independently, so
    # the input is the normalized domain; §3.2 only asks for pseudo-randomness, which SHA-256 gives. We take
    # the *first* bytes of the digest, the simplest rule to write down and to reimplement.
    return hashlib.sha256(normalize_domain(domain).encode("ascii")).digest()[:GLOBAL_ID_LEN]


def interface_id(public_key: bytes) -> bytes:
    """The 64-bit interface identifier of a device: the first 8 bytes of SHA-256(raw 32-byte public key).

    Hashing (rather than taking key bytes directly) spreads the bits evenly and keeps the IID meaningless;
    the universal/local and group bits have no meaning for an IID not built from an EUI-64 (RFC 7136).
    """
    _check_public_key(public_key)
    return hashlib.sha256(public_key).digest()[:IID_LEN]


def ula_for(domain: str, public_key: bytes) -> ipaddress.IPv6Address:
    """The ULA of the device with ``public_key`` in the account ``domain``.

    ``fd || SHA-256(normalize_domain(domain))[0:5] || 00 00 || SHA-256(public_key)[0:8]``, i.e. ``fd``, a
    40-bit global ID, subnet 0 and a 64-bit interface ID (RFC 4193 §3.1). The domain is normalized by
    crypto.kdf.normalize_domain (lower case, no trailing dot) so every spelling gives the same address.
    Raises ValueError for a malformed domain or a public key that is not 32 bytes.
    """
    return ipaddress.IPv6Address(_ULA_PREFIX + _global_id(domain) + _SUBNET + interface_id(public_key))


def account_prefix(domain: str) -> ipaddress.IPv6Network:
    """The account's /48 (``fd`` + global ID): the route the TUN device gets, and the only inner sources
    that may be accepted from peers of this account."""
    return ipaddress.IPv6Network((_ULA_PREFIX + _global_id(domain) + bytes(10), 48))


def iid_label(public_key: bytes) -> str:
    """The DNS label of a device's outer-address records: ``AutoTunnel-`` + the IID as 8 hex pairs.

    E.g. ``AutoTunnel-63-0d-cd-29-66-c4-33-66`` (lower-case hex, dash-separated, as Back to My Mac's).
    Derived from the key, not the name, so renaming a device does not move its SRV target.
    """
    return IID_LABEL_PREFIX + "-".join(f"{b:02x}" for b in interface_id(public_key))


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")


def check_peer_ula(
    domain: str,
    public_key: bytes,
    claimed_ula: ipaddress.IPv6Address | str,
    peer: str | None = None,
) -> ipaddress.IPv6Address:
    """Refuse a peer whose claimed ULA is not the one its public key gives; return the address otherwise.

    Addresses are bound to keys so that a device of the account cannot take over another device's address
    (docs/architecture.md: "A peer whose ULA does not match its key is refused"). ``peer`` names the peer
    in the message (its configured name); without it the peer is named by its public key, which is not secret.
    """
    who = f"peer {peer!r}" if peer is not None else f"peer with public key {_b64(public_key)}"
    expected = ula_for(domain, public_key)
    try:
        claimed = (
            claimed_ula
            if isinstance(claimed_ula, ipaddress.IPv6Address)
            else ipaddress.IPv6Address(claimed_ula)
        )
    except ValueError:
        raise IdentityError(
            f"{who} claims {str(claimed_ula)!r}, which is not an IPv6 address; its ULA is {expected}"
        ) from None
    if claimed != expected:
        raise IdentityError(
            f"{who} claims ULA {claimed} but its public key gives {expected} in {normalize_domain(domain)}; "
            f"refusing it (a stale or forged record, or the peer's key has changed)"
        )
    return expected


# --------------------------------------------------------------------------------------------------------
# The device key
# --------------------------------------------------------------------------------------------------------


class DeviceIdentity:
    """This device's X25519 static key pair.

    ``repr`` and ``str`` show only the public key: the object is passed around freely (logs, debuggers, test
    failures), and the private key must never leave it by accident.
    """

    __slots__ = ("_private_key", "_public_key")

    def __init__(self, private_key: bytes) -> None:
        try:
            pub = public_key(private_key)
        except NoiseError:
            raise ValueError(f"X25519 private key must be {DHLEN} bytes") from None
        self._private_key = bytes(private_key)
        self._public_key = pub

    @classmethod
    def generate(cls) -> DeviceIdentity:
        """A fresh random identity (not saved anywhere)."""
        return cls(generate_keypair()[0])

    @property
    def private_key(self) -> bytes:
        """The raw 32-byte X25519 private key, for the handshake only."""
        return self._private_key

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte X25519 public key."""
        return self._public_key

    @property
    def public_key_b64(self) -> str:
        """The public key in base64, as published in DNS (``pk=``) and written in peers' configs."""
        return _b64(self._public_key)

    def ula(self, domain: str) -> ipaddress.IPv6Address:
        """This device's address in ``domain`` (see :func:`ula_for`)."""
        return ula_for(domain, self._public_key)

    def iid_label(self) -> str:
        """This device's ``AutoTunnel-…`` label (see :func:`iid_label`)."""
        return iid_label(self._public_key)

    def __repr__(self) -> str:
        return f"DeviceIdentity(public_key={self.public_key_b64})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DeviceIdentity):
            return NotImplemented
        return self._public_key == other._public_key

    def __hash__(self) -> int:
        return hash(self._public_key)

    def __reduce__(self) -> str | tuple[object, ...]:
        # Pickling would copy the private key into wherever the pickle goes; nothing needs that.
        raise TypeError("DeviceIdentity cannot be pickled")

    @classmethod
    def load_or_create(cls, state_dir: Path) -> DeviceIdentity:
        """Load ``state_dir/device.key``, creating the directory (0700) and a fresh key (0600) if missing.

        The file is written to a temporary name with O_CREAT|O_EXCL and mode 0600, synced, then hard-linked
        into place, which fails if the name already exists: the key is never visible half-written or with
        looser permissions, and two processes starting at once end up with the same key (the loser loads
        the winner's). Raises IdentityError for a file that is unsafe (group/other permission bits, another
        owner, not a regular file), malformed, or unreadable.
        """
        state_dir = Path(state_dir)
        path = state_dir / KEY_FILE_NAME
        identity = _load(path)
        if identity is not None:
            return identity
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise IdentityError(
                f"{state_dir}: cannot create the state directory: {e.strerror}; "
                f"create it (mode 0700) or set interface.state_dir"
            ) from None
        created = cls.generate()
        if _publish(path, created):
            return created
        # Another process created the key between our look and our link: use theirs.
        loaded = _load(path)
        if loaded is None:
            raise IdentityError(f"{path}: vanished while being created; try again")
        return loaded


def _load(path: Path) -> DeviceIdentity | None:
    """The identity in ``path``, or None if there is no such file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise IdentityError(
            f"{path}: cannot read the device key: {e.strerror}; check its owner and mode"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IdentityError(f"{path}: the device key is not a regular file; remove it")
        if st.st_uid not in (os.geteuid(), 0):
            raise IdentityError(
                f"{path}: the device key is owned by uid {st.st_uid}, not by this user; "
                f"run `chown {os.geteuid()} {path}` if that is intended"
            )
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise IdentityError(
                f"{path}: permissions {mode:04o} are too open, the device key must not be accessible by "
                f"group or others; run `chmod 600 {path}` (and consider the key compromised if others "
                f"could read it)"
            )
        data = os.read(fd, _MAX_KEY_FILE + 1)
    except OSError as e:
        raise IdentityError(
            f"{path}: cannot read the device key: {e.strerror}; check its owner and mode"
        ) from None
    finally:
        os.close(fd)
    private_key = _parse_key(data)
    if private_key is None:
        raise IdentityError(
            f"{path}: not a device key (expected one line of base64 of {DHLEN} bytes); restore it from a "
            f"backup, or delete it to create a new identity (this changes the device's ULA)"
        )
    return DeviceIdentity(private_key)


def _parse_key(data: bytes) -> bytes | None:
    # One line of base64, the trailing newline optional (an editor or `wg genkey > file` may or may not add
    # one). Anything else is refused rather than guessed at. Never echo the content: it is the private key.
    if len(data) > _MAX_KEY_FILE:
        return None
    if data.endswith(b"\n"):
        data = data[:-1]
    if b"\n" in data or not data:
        return None
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == DHLEN else None


def _publish(path: Path, identity: DeviceIdentity) -> bool:
    """Create ``path`` holding ``identity``'s key; False if ``path`` already exists."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    line = (_b64(identity.private_key) + "\n").encode("ascii")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)  # the umask can only remove bits, but be explicit about the result
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        _fsync_dir(path.parent)
        return True
    except OSError as e:
        raise IdentityError(
            f"{path}: cannot create the device key: {e.strerror}; check that {path.parent} is writable"
        ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _fsync_dir(directory: Path) -> None:
    # Make the new name durable: a key that disappears after a crash would silently change the ULA.
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
