"""Dropping root: become an unprivileged user keeping only the capabilities named (Linux, libc via ctypes).

`tunneld up` starts as root, opens its TUN device and sockets, then calls :func:`drop_to` to run as the
``tunneld`` user with CAP_NET_ADMIN alone (routes, netlink, socket buffers); ``serve-dns`` binds port 53
and keeps nothing. capset(2) and PR_SET_KEEPCAPS act on the calling thread only, so the drop refuses to run
while the process has more than one thread. Every step is read back; anything that did not take is an
error (fail closed). The reasons and the capability table: docs/privilege.md.
"""

from __future__ import annotations

import ctypes
import dataclasses
import grp
import os
import pwd
from collections.abc import Iterable
from pathlib import Path
from typing import Final

__all__ = ["CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE", "Account", "Plan", "PrivilegeError", "cap_names",
           "capabilities", "drop_capabilities", "drop_to", "group_id", "lookup", "parse_status", "plan",
           "thread_count", "unprivileged_port_start"]

# linux/capability.h
CAP_SETGID: Final = 6
CAP_SETUID: Final = 7
CAP_SETPCAP: Final = 8
CAP_NET_BIND_SERVICE: Final = 10
CAP_NET_ADMIN: Final = 12
_LINUX_CAPABILITY_VERSION_3: Final = 0x20080522
_NAMES: Final = {CAP_SETGID: "CAP_SETGID", CAP_SETUID: "CAP_SETUID", CAP_SETPCAP: "CAP_SETPCAP",
                 CAP_NET_BIND_SERVICE: "CAP_NET_BIND_SERVICE", CAP_NET_ADMIN: "CAP_NET_ADMIN"}

# linux/prctl.h
PR_SET_KEEPCAPS: Final = 8
PR_CAPBSET_READ: Final = 23
PR_CAPBSET_DROP: Final = 24
PR_SET_NO_NEW_PRIVS: Final = 38
PR_GET_NO_NEW_PRIVS: Final = 39
PR_CAP_AMBIENT: Final = 47
PR_CAP_AMBIENT_CLEAR_ALL: Final = 4

_CAP_LAST_CAP = Path("/proc/sys/kernel/cap_last_cap")
_UNPRIVILEGED_PORT_START = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")


class PrivilegeError(Exception):
    """The drop cannot be done, or did not take: one line naming the problem."""


@dataclasses.dataclass(frozen=True)
class Account:
    """The user to run as: its name, uid and primary gid (from the passwd database)."""

    name: str
    uid: int
    gid: int


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL("libc.so.6", use_errno=True)  # Linux only (glibc, as the daemon's mallopt)
    return _libc


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    r = int(_c().prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(0),
                       ctypes.c_ulong(0)))
    if r < 0:
        err = ctypes.get_errno()
        raise PrivilegeError(f"prctl({option}) failed: {os.strerror(err)}")
    return r


def _mask(caps: Iterable[int]) -> int:
    m = 0
    for c in caps:
        m |= 1 << c
    return m


def capabilities() -> tuple[int, int, int]:
    """This thread's (effective, permitted, inheritable) capability sets as bit masks (capget(2))."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if _c().capget(ctypes.byref(header), data) != 0:
        raise PrivilegeError(f"capget failed: {os.strerror(ctypes.get_errno())}")
    lo, hi = data[0], data[1]
    return (lo.effective | hi.effective << 32, lo.permitted | hi.permitted << 32,
            lo.inheritable | hi.inheritable << 32)


def _capset(effective: int, permitted: int, inheritable: int = 0) -> None:
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in (0, 1):
        data[i].effective = (effective >> (32 * i)) & 0xFFFFFFFF
        data[i].permitted = (permitted >> (32 * i)) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> (32 * i)) & 0xFFFFFFFF
    if _c().capset(ctypes.byref(header), data) != 0:
        raise PrivilegeError(f"capset failed: {os.strerror(ctypes.get_errno())}")


def cap_names(mask: int) -> str:
    """``CAP_NET_ADMIN`` (or ``CAP_12`` for one without a name here), joined by spaces; "no capability"."""
    names = [_NAMES.get(c, f"CAP_{c}") for c in range(64) if mask >> c & 1]
    return " ".join(names) or "no capability"


def thread_count() -> int:
    """The threads of this process, from /proc/self/task."""
    return len(os.listdir("/proc/self/task"))


def unprivileged_port_start(path: Path = _UNPRIVILEGED_PORT_START) -> int:
    """The lowest port an unprivileged process may bind (1024 where the file cannot be read)."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 1024


def lookup(user: str) -> Account:
    """The passwd entry of ``user``; PrivilegeError (one line naming the fix) if there is none."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(
            f"no user {user!r} to run as: create it (useradd --system --user-group --no-create-home "
            f"--shell /usr/sbin/nologin {user}), or keep root with [service] user = \"root\"") from None
    return Account(user, pw.pw_uid, pw.pw_gid)


def group_id(name: str) -> int | None:
    """The gid of group ``name``, or None if there is none."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def parse_status(text: str) -> dict[str, str]:
    """The ``Key: value`` fields of a /proc/PID/status text."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key] = value.strip()
    return fields


def _last_cap() -> int:
    try:
        return int(_CAP_LAST_CAP.read_text())
    except (OSError, ValueError):
        return 40


def _single_threaded() -> None:
    n = thread_count()
    if n != 1:
        raise PrivilegeError(f"cannot drop privileges with {n} threads running (capabilities are per "
                             f"thread): the drop must come before anything starts a thread")


def _limit_bounding_and_ambient(keep: int) -> None:
    """Clear the ambient set; drop the rest of the bounding set where CAP_SETPCAP allows it (under the
    systemd unit it does not, and the unit's bounding set is already small)."""
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    if capabilities()[0] >> CAP_SETPCAP & 1:
        for cap in range(_last_cap() + 1):
            if not keep >> cap & 1 and _prctl(PR_CAPBSET_READ, cap) == 1:
                _prctl(PR_CAPBSET_DROP, cap)


def _verify(keep: int, account: Account | None) -> None:
    effective, permitted, inheritable = capabilities()
    status = parse_status(Path("/proc/self/status").read_text())
    if (effective, permitted, inheritable) != (keep, keep, 0):
        raise PrivilegeError(f"capabilities did not drop: effective {cap_names(effective)}, permitted "
                             f"{cap_names(permitted)} (wanted {cap_names(keep)})")
    if int(status.get("CapAmb", "0"), 16) != 0:
        raise PrivilegeError("the ambient capabilities did not clear")
    if _prctl(PR_GET_NO_NEW_PRIVS) != 1:
        raise PrivilegeError("no-new-privs did not take")
    if account is not None and (os.getresuid() != (account.uid,) * 3 or os.getresgid() != (account.gid,) * 3
                                or os.getgroups()):
        raise PrivilegeError(f"the user did not change: uids {os.getresuid()}, gids {os.getresgid()}, "
                             f"groups {os.getgroups()}")


def drop_to(account: Account | None, keep: Iterable[int]) -> None:
    """Run as ``account`` (None: stay who we are) with exactly the capabilities ``keep``, none inheritable
    or ambient, and no-new-privs. Started non-root, only the capabilities are reduced (the user cannot
    change). PrivilegeError if it cannot be done or does not take; the process is then in an unknown state
    and must exit."""
    _single_threaded()
    wanted = _mask(keep)
    missing = wanted & ~capabilities()[1]
    if missing:  # e.g. a unit's CapabilityBoundingSet= without it
        raise PrivilegeError(f"cannot keep {cap_names(missing)}: the process does not have it")
    if os.geteuid() != 0 or account is None or account.uid == 0:
        _limit_bounding_and_ambient(wanted)
        _capset(wanted, wanted)
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        _verify(wanted, None)
        return
    _limit_bounding_and_ambient(wanted)
    os.setgroups([])
    _prctl(PR_SET_KEEPCAPS, 1)
    os.setresgid(account.gid, account.gid, account.gid)
    os.setresuid(account.uid, account.uid, account.uid)
    _prctl(PR_SET_KEEPCAPS, 0)
    _capset(wanted, wanted)  # keepcaps kept the permitted set; the effective one was cleared
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    _verify(wanted, account)


def drop_capabilities() -> None:
    """Keep our user (root, for the names writer) but no capability at all, with no-new-privs."""
    drop_to(None, ())


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `tunneld up` becomes once its devices and sockets are open: ``account`` (None: stay who we
    are) with the capabilities ``keep``."""

    account: Account | None
    keep: frozenset[int]

    def describe(self) -> str:
        who = f"user {self.account.name}" if self.account else f"uid {os.geteuid()}"
        return f"running as {who} with {cap_names(_mask(self.keep))}"

    def apply(self) -> str:
        """Drop (PrivilegeError if it fails) and say what we run as, for the log."""
        drop_to(self.account, self.keep)
        return self.describe()


def plan(user: str, listen_port: int, port_start: int | None = None) -> Plan | None:
    """The drop for ``[service] user`` and ``[interface] listen_port``: None for "root" (no drop at all);
    CAP_NET_ADMIN always (routes, netlink, the TUN, socket buffers), CAP_NET_BIND_SERVICE too when the port
    is a privileged one (a rebind binds it again). Started non-root, the user stays and only what the
    process has is kept. PrivilegeError (naming the fix) if the user does not exist."""
    if user == "root":
        return None
    start = unprivileged_port_start() if port_start is None else port_start
    keep = {CAP_NET_ADMIN} | ({CAP_NET_BIND_SERVICE} if 0 < listen_port < start else set())
    if os.geteuid() != 0:
        permitted = capabilities()[1]
        return Plan(None, frozenset(c for c in keep if permitted >> c & 1))
    return Plan(lookup(user), frozenset(keep))
