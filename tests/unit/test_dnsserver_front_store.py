"""The commit path's journal: the store turns to WAL (synced at every commit) at its first real write,
not when it creates the file nor in check_writable's probe, which serve-dns makes as root before it drops
privileges; a database in a directory the server cannot write stays as it was for the probe to report."""

from __future__ import annotations

import time
from pathlib import Path

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype

from tunneld.dnsserver.replay import Answered, ReplayCache
from tunneld.dnsserver.store import AddRR, Lease, ZoneStore

ZONE = dns.name.from_text("example.com.")


def mode(store: ZoneStore) -> tuple[str, int]:
    return (store._db.execute("PRAGMA journal_mode").fetchone()[0],
            store._db.execute("PRAGMA synchronous").fetchone()[0])


def test_the_first_update_turns_the_journal_to_wal_still_synced_at_each_commit(tmp_path: Path) -> None:
    path = tmp_path / "z.sqlite"
    store = ZoneStore(str(path), ZONE, "ns.example.com.", 53)
    store.check_writable()
    assert mode(store) == ("delete", 2)  # created and probed: not yet (root's files, before the drop)
    rd = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.AAAA, "fd00::1")
    now = time.time()
    assert store.apply_update([AddRR(dns.name.from_text("h", ZONE), 120, rd)], Lease(60, 60), now,
                              Answered(b"m" * 32, int(now) + 300, b"reply"))
    assert mode(store) == ("wal", 2)  # synchronous FULL: a taken update survives a power loss
    assert Path(f"{path}-wal").exists()
    store.close()
    again = ZoneStore(str(path), ZONE, "ns.example.com.", 53)
    assert ReplayCache(again).find(b"m" * 32, now) == b"reply" and again.serial == 2
    assert mode(again)[0] == "wal"  # kept in the file
