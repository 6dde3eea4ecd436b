"""serve-dns without privileges: bind port 53, then run as ``--user`` (default ``tunneld``) with no
capability and no-new-privs.

The zone database must stay writable after the drop, and SQLite creates its journal next to it: a directory
serve-dns creates is handed to the user (with the database in it); an existing one must already be
writable by the user, which is checked right after the drop (one line naming the fix otherwise). Started
non-root (systemd's DynamicUser with an ambient CAP_NET_BIND_SERVICE), only the capabilities go.
docs/privilege.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from tunneld import privdrop
from tunneld.dnsserver.store import NotWritable, ZoneStore

__all__ = ["DatabaseNotWritable", "account_for", "drop", "hand_over"]

log = logging.getLogger("tunneld.dnsserver")

_COMPANIONS = ("", "-journal", "-wal", "-shm")  # SQLite's files beside the database


class DatabaseNotWritable(Exception):
    """The zone database cannot be written as the user serve-dns dropped to: one line with the fix."""


def account_for(user: str) -> privdrop.Account | None:
    """The account to drop to: None for "root" or when not started as root (nothing to change);
    PrivilegeError naming the fix if the user does not exist."""
    if user == "root" or os.geteuid() != 0:
        return None
    return privdrop.lookup(user)


def hand_over(account: privdrop.Account | None, db: Path) -> None:
    """Give the directory serve-dns just created for ``db``, and the database files in it, to the user."""
    if account is None:
        return
    os.chown(db.parent, account.uid, account.gid)
    for suffix in _COMPANIONS:
        with contextlib.suppress(FileNotFoundError):
            os.chown(f"{db}{suffix}", account.uid, account.gid)


def drop(account: privdrop.Account | None, user: str, store: ZoneStore, db: Path) -> None:
    """After every listener is bound: drop every capability (and root, to ``account``), then check the
    database can still be written. PrivilegeError or DatabaseNotWritable otherwise."""
    if account is None and user == "root" and os.geteuid() == 0:
        log.debug("--user root: serve-dns keeps root")  # asked for by name: no warning
        return
    privdrop.drop_to(account, ())
    try:
        store.check_writable()
    except NotWritable as e:
        who = account.name if account else f"uid {os.geteuid()}"
        raise DatabaseNotWritable(
            f"cannot write the zone database --db {db} as {who}: {e}; give a --db in a directory {who} "
            f"can write (serve-dns hands over a directory it creates), or run with --user root") from None
    log.info("running as %s with no capability", account.name if account else f"uid {os.geteuid()}")
