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
import subprocess
from pathlib import Path
from typing import Any

from lab.bind import DIG, ZONE, dig_query, key_files
from lab.netns import Host, Lab, LabError, read_log, wait_for
from tunneld.zoneconf import PDNS_SETTINGS, Server, key_stanza, pdns_primary_commands

PDNS_SERVER = shutil.which("pdns_server") or "/usr/sbin/pdns_server"
PDNSUTIL = shutil.which("pdnsutil") or "/usr/bin/pdnsutil"
SCHEMA = Path("/usr/share/pdns-backend-sqlite3/schema/schema.sqlite3.sql")


def available() -> bool:
    """Whether PowerDNS and its sqlite3 backend are installed (tools/install.sh installs both)."""
    return Path(PDNS_SERVER).exists() and Path(PDNSUTIL).exists() and SCHEMA.exists()


class PdnsPrimary:
    def __init__(self, lab: Lab, host: Host, domain: str, front_key: bytes, notify: list[Server],
                 workdir: Path, port: int = 53, address: str | None = None,
                 nameservers: tuple[str, ...] = ()) -> None:
        self.lab, self.host, self.domain = lab, host, domain.rstrip(".").lower()
        self.front_secret, self.notify, self.nameservers = front_key, notify, nameservers
        self.dir, self.port, self.address = Path(workdir), port, address or host.addr4
        self.proc: subprocess.Popen[Any] | None = None
        self.log = self.dir / "pdns.log"
        self.front_key = f"front.{self.domain}."  # the key's name, as BindPrimary's
        self.keys: dict[str, Path] = {}

    def __enter__(self) -> PdnsPrimary:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

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
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        (self.dir / "pdns.conf").write_text(self._conf())
        with sqlite3.connect(self.dir / "pdns.sqlite3") as db:
            db.executescript(SCHEMA.read_text())
        ns = "".join(f"@ IN NS ns{i}.{self.domain}.\n" for i in range(2, len(self.nameservers) + 2))
        glue = "".join(f"ns{i} IN A {a}\n" for i, a in enumerate(self.nameservers, start=2))
        zone = self.dir / f"{self.domain}.zone"
        zone.write_text(ZONE.format(domain=self.domain, address=self.address, extra=ns + glue))
        self._pdnsutil(["pdnsutil", "load-zone", self.domain, str(zone)])
        for argv in pdns_primary_commands(self.domain, self.front_secret, self.notify):
            self._pdnsutil(argv)
        self.keys = key_files(key_stanza(self.front_key, self.front_secret), self.dir)
        with open(self.log, "ab") as logf:
            self.proc = self.lab.spawn(self.host, [PDNS_SERVER, f"--config-dir={self.dir}"],
                                       stdout=logf, stderr=subprocess.STDOUT)
        try:
            wait_for(self._ready, timeout=20, interval=0.05, what=f"pdns_server in {self.host.name}")
        except LabError as e:
            self.stop()
            raise LabError(f"{e}:\n{self.log_text()[-3000:]}") from None

    def _pdnsutil(self, argv: list[str]) -> None:
        assert argv[0] == "pdnsutil"
        self.lab.run(self.host, [PDNSUTIL, f"--config-dir={self.dir}", *argv[1:]], timeout=30)

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise LabError(f"pdns_server exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
        return self.serial(self.front_key) is not None

    def stop(self) -> None:
        if self.proc is not None:
            self.lab.stop(self.proc)
            self.proc = None

    def log_text(self) -> str:
        return read_log(self.log)

    def query(self, name: str, rdtype: str, key: str | None = None,
              timeout: int = 2) -> tuple[str, list[str]]:
        key_file = self.keys[key] if key is not None else None
        return dig_query(self.lab, self.host, self.address, self.port, name, rdtype, timeout, key_file)

    def serial(self, key: str | None) -> int | None:
        rcode, answers = self.query(self.domain, "SOA", key, timeout=1)
        return int(answers[0].split()[2]) if rcode == "NOERROR" and answers else None

    def transfer(self, key: str | None = None, timeout: int = 5) -> list[str] | None:
        """The records of an AXFR of the zone (signed with `key`, or not), or None if it was refused."""
        signed = ["-k", str(self.keys[key])] if key is not None else []
        r = self.lab.run(self.host, [DIG, f"@{self.address}", "-p", str(self.port), *signed,
                                     f"+time={timeout}", "+tries=1", "AXFR", self.domain],
                         timeout=timeout + 10, check=False)
        if "Transfer failed" in r.stdout or r.returncode != 0:
            return None
        return [line for line in r.stdout.splitlines() if line and not line.startswith(";")]
