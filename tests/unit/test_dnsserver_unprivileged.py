"""serve-dns's drop: a database directory it created is handed over and stays writable; one the user
cannot write is found right after the drop, with the fix in one line. In forked children, as root."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.name
import pytest

from tests.helpers import in_forked_child
from tunneld import privdrop
from tunneld.dnsserver import unprivileged
from tunneld.dnsserver.store import ZoneStore

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (drops to the tunneld user)")



@pytest.fixture
def open_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tunneld-dns-") as d:
        os.chmod(d, 0o755)
        yield Path(d)


def _store(db: Path) -> ZoneStore:
    return ZoneStore(str(db), "z.example.", dns.name.from_text("ns.z.example."), 53)


def _account() -> privdrop.Account:
    try:
        return privdrop.lookup("tunneld")
    except privdrop.PrivilegeError:
        pytest.skip("no tunneld user (tools/install.sh creates it)")


def test_a_directory_serve_dns_created_is_handed_over_and_stays_writable(open_dir: Path) -> None:
    acct = _account()
    db = open_dir / "new" / "dns.sqlite"
    db.parent.mkdir(mode=0o700)
    store = _store(db)
    unprivileged.hand_over(acct, db)
    assert (db.parent.stat().st_uid, db.stat().st_uid) == (acct.uid, acct.uid)

    def body() -> list[Any]:
        unprivileged.drop(acct, "tunneld", store, db)
        st = privdrop.parse_status(Path("/proc/self/status").read_text())
        return [st["Uid"].split()[0], int(st["CapEff"], 16), st["NoNewPrivs"]]

    assert in_forked_child(body) == {"ok": [str(acct.uid), 0, "1"]}
    store.close()


def test_a_directory_the_user_cannot_write_is_one_line_naming_the_fix(open_dir: Path) -> None:
    acct = _account()
    db = open_dir / "dns.sqlite"  # open_dir is root's: the journal cannot be created there as tunneld
    store = _store(db)
    os.chown(db, acct.uid, acct.gid)  # the file alone is not enough
    got = in_forked_child(lambda: unprivileged.drop(acct, "tunneld", store, db))
    assert got["error"].startswith("DatabaseNotWritable: cannot write the zone database"), got
    assert "--user root" in got["error"] and "\n" not in got["error"]
    store.close()


def test_root_keeps_root() -> None:
    assert unprivileged.account_for("root") is None

    def body() -> int:
        unprivileged.drop(None, "root", None, Path("unused"))  # type: ignore[arg-type]
        return os.geteuid()

    assert in_forked_child(body) == {"ok": 0}
