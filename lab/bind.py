"""A private BIND 9 (named) in a lab namespace: the account's DNS UPDATE server for tests.

`Bind` writes a fresh working directory (named.conf, the zone file, room for the journal), starts
`named -g` in the foreground in the namespace (it runs as root there: no `-u`), waits until it answers
the zone's SOA, and stops it by PID. The configuration is the one a user would write for their account:
the key stanza printed by `tunneld account new` and

    zone "DOMAIN" { type primary; update-policy { grant DOMAIN. zonesub ANY; }; };

so anything signed with the account's TSIG key may change any name in the zone, and nothing else may.
BIND 9.18 ignores the Update Lease option (records never expire), has no control channel here
(`controls { };`), and keeps its journal next to the zone file, which is fresh for every instance.

    with Lab() as lab:
        a, b = two_hosts(lab)
        with Bind(lab, b, "lab.tunneld.test", stanza, tmp_path / "bind", port=5353) as bind:
            bind.dig("laptop.lab.tunneld.test", "AAAA")
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from lab.netns import Host, Lab, LabError, read_log, wait_for

NAMED = shutil.which("named") or "/usr/sbin/named"
DIG = shutil.which("dig") or "/usr/bin/dig"

NAMED_CONF = """\
options {{
    directory "{dir}";
    pid-file "{dir}/named.pid";
    lock-file "{dir}/named.lock";
    session-keyfile "{dir}/session.key";
    managed-keys-directory "{dir}";
    listen-on port {port} {{ {address}; }};
    listen-on-v6 {{ none; }};
    recursion no;
    dnssec-validation no;
    allow-transfer {{ none; }};
    notify no;
}};
controls {{ }};

{stanza}
zone "{domain}" {{
    type primary;
    file "{dir}/{domain}.zone";
    update-policy {{ grant {key} zonesub ANY; }};
}};
"""

ZONE = """\
$TTL 60
@       IN SOA  ns1.{domain}. hostmaster.{domain}. ( 1 60 60 3600 60 )
        IN NS   ns1.{domain}.
ns1     IN A    {address}
{extra}"""


class Bind:
    def __init__(self, lab: Lab, host: Host, domain: str, stanza: str, workdir: Path, port: int = 53,
                 address: str | None = None, extra_zone: str = "") -> None:
        self.extra_zone = extra_zone  # more zone-file lines (records already there when BIND starts)
        self.lab, self.host, self.domain, self.stanza = lab, host, domain.rstrip("."), stanza
        self.dir = Path(workdir)
        self.port = port
        self.address = address or host.addr4
        self.proc: subprocess.Popen[Any] | None = None
        self.log = self.dir / "named.log"
        key = _key_name(stanza)
        if key is None:
            raise LabError(f"no key statement in the TSIG stanza: {stanza!r}")
        self.key = key

    def __enter__(self) -> Bind:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if not os.access(NAMED, os.X_OK):
            raise LabError(f"{NAMED} is missing: tools/install.sh installs Debian bind9")
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob("*.jnl"):  # a journal would replay old updates over the fresh zone
            stale.unlink()
        conf = self.dir / "named.conf"
        conf.write_text(NAMED_CONF.format(dir=self.dir, port=self.port, address=self.address,
                                          stanza=self.stanza.strip(), domain=self.domain, key=self.key))
        (self.dir / f"{self.domain}.zone").write_text(ZONE.format(domain=self.domain, address=self.address,
                                                                  extra=self.extra_zone))
        with open(self.log, "ab") as logf:  # the child keeps its own copy of the fd
            self.proc = self.lab.spawn(self.host, [NAMED, "-g", "-n", "1", "-c", str(conf)],
                                       stdout=subprocess.DEVNULL, stderr=logf)
        try:
            wait_for(self._answers, timeout=15, interval=0.05, what=f"named in {self.host.name} to answer")
        except LabError:
            self.stop()
            raise LabError(f"named did not start:\n{self.log_text()[-3000:]}") from None

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise LabError(f"named exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
        return bool(self.dig(self.domain, "SOA", timeout=1))

    def stop(self) -> None:
        if self.proc is not None:
            self.lab.stop(self.proc)
            self.proc = None

    def log_text(self) -> str:
        return read_log(self.log)

    def dig(self, name: str, rdtype: str, timeout: int = 2) -> list[str]:
        """The answer's records, as dig +short prints them (empty for NXDOMAIN or NODATA)."""
        return self.dig_full(name, rdtype, timeout)[1]

    def dig_full(self, name: str, rdtype: str, timeout: int = 2) -> tuple[str, list[str]]:
        """(RCODE, the answer section's record data) for `name` `rdtype`, asked of this server."""
        r = self.lab.run(self.host, [DIG, f"@{self.address}", "-p", str(self.port), "+norecurse",
                                     f"+time={timeout}", "+tries=1", "+noall", "+comments", "+answer",
                                     name, rdtype], timeout=timeout + 10, check=False)
        rcode = ""
        answers: list[str] = []
        for line in r.stdout.splitlines():
            if "status:" in line:
                rcode = line.split("status:", 1)[1].split(",", 1)[0].strip()
            elif line and not line.startswith(";"):
                fields = line.split(None, 4)
                if len(fields) == 5 and fields[3].upper() == rdtype.upper():
                    answers.append(fields[4])
        return rcode, answers


def _key_name(stanza: str) -> str | None:
    """The key's name in a `key "NAME" { ... };` stanza, as written (with its trailing dot)."""
    for line in stanza.splitlines():
        words = line.strip().split()
        if len(words) >= 2 and words[0] == "key":
            return words[1].strip('"')
    return None
