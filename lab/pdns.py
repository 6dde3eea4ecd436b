"""A private PowerDNS Authoritative server in a lab namespace: the account zone's primary, gsqlite3 backend.

`PdnsPrimary` writes a fresh working directory (pdns.conf with tunneld.zoneconf.PDNS_SETTINGS, an SQLite
database from the backend's schema, the zone loaded from a zone file), runs the pdnsutil commands that
tunneld.zoneconf.pdns_primary_commands gives (the ones docs/rendezvous.md tells the user to run), starts
`pdns_server` in the foreground in the namespace and stops it by PID. Ready when it answers the SOA.

PowerDNS has no query ACL by key: the primary answers any query, so it stays hidden (reachable only by the
front and the secondaries). As a primary it answers IXFR with the whole zone (AXFR form).
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from lab.bind import LabDnsServer, key_files, zone_text
from lab.netns import Host, Lab, LabError
from tunneld.zoneconf import PDNS_SETTINGS, Server, key_stanza, pdns_primary_commands

PDNS_SERVER = shutil.which("pdns_server") or "/usr/sbin/pdns_server"
PDNSUTIL = shutil.which("pdnsutil") or "/usr/bin/pdnsutil"
SCHEMA = Path("/usr/share/pdns-backend-sqlite3/schema/schema.sqlite3.sql")


def available() -> bool:
    """Whether PowerDNS and its sqlite3 backend are installed (tools/install.sh installs both)."""
    return Path(PDNS_SERVER).exists() and Path(PDNSUTIL).exists() and SCHEMA.exists()


class PdnsPrimary(LabDnsServer):
    program = "pdns_server"
    role = "PowerDNS primary"

    def __init__(self, lab: Lab, host: Host, domain: str, front_key: bytes, notify: list[Server],
                 workdir: Path, port: int = 53, address: str | None = None,
                 nameservers: tuple[str, ...] = ()) -> None:
        super().__init__(lab, host, domain.lower(), workdir, port, address, "pdns.log")
        self.front_secret, self.notify, self.nameservers = front_key, notify, nameservers
        self.front_key = f"front.{self.domain}."  # the key's name, as BindPrimary's

    def _conf(self) -> str:
        lab_only = [
            "launch=gsqlite3", f"gsqlite3-database={self.dir / 'pdns.sqlite3'}", "gsqlite3-dnssec=yes",
            f"local-address={self.address}", f"local-port={self.port}", f"socket-dir={self.dir}",
            "daemon=no", "guardian=no", "disable-syslog=yes", "loglevel=6", "webserver=no", "api=no",
            "cache-ttl=0", "query-cache-ttl=0", "negquery-cache-ttl=0", "zone-cache-refresh-interval=0",
            "security-poll-suffix=",  # no look-up of PowerDNS's security status: the lab has no outside
        ]
        return "\n".join([*lab_only, *PDNS_SETTINGS]) + "\n"

    def start(self) -> None:
        if not available():
            raise LabError(f"{PDNS_SERVER} or its sqlite3 backend is missing: tools/install.sh installs them")
        self._fresh_dir()
        (self.dir / "pdns.conf").write_text(self._conf())
        with sqlite3.connect(self.dir / "pdns.sqlite3") as db:
            db.executescript(SCHEMA.read_text())
        zone = self.dir / f"{self.domain}.zone"
        zone.write_text(zone_text(self.domain, self.address, self.nameservers))
        self._pdnsutil(["pdnsutil", "load-zone", self.domain, str(zone)])
        for argv in pdns_primary_commands(self.domain, self.front_secret, self.notify):
            self._pdnsutil(argv)
        self.keys = key_files(key_stanza(self.front_key, self.front_secret), self.dir)
        self._spawn([PDNS_SERVER, f"--config-dir={self.dir}"], None)

    def _pdnsutil(self, argv: list[str]) -> None:
        assert argv[0] == "pdnsutil"
        self.lab.run(self.host, [PDNSUTIL, f"--config-dir={self.dir}", *argv[1:]], timeout=30)

    def ready(self) -> bool:
        return self.serial(self.front_key) is not None
