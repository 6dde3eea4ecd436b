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

`BindPrimary` and `BindSecondary` are the account zone past one machine (docs/rendezvous.md): the named.conf
statements are those `tunneld account primary-config` / `secondary-config` print (tunneld.zoneconf, the
same generator), after lab-only options. The primary is ready when it answers the SOA (signed with the front
key: only the front may query it); a secondary when its SOA, signed with the account key, carries the
primary's serial (the first transfer is done). `nsupdate` and `dig` with key files are the independent
clients.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Protocol, Self

from lab.netns import Host, Lab, LabError, read_log, wait_for
from tunneld.zoneconf import primary_stanza, secondary_stanza, server_options

NAMED = shutil.which("named") or "/usr/sbin/named"
DIG = shutil.which("dig") or "/usr/bin/dig"
NSUPDATE = shutil.which("nsupdate") or "/usr/bin/nsupdate"

OPTIONS = """\
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
{server_options}}};
controls {{ }};

"""
NAMED_CONF = OPTIONS + """{stanza}
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
                                          server_options="", stanza=self.stanza.strip(), domain=self.domain,
                                          key=self.key))
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
        return dig_query(self.lab, self.host, self.address, self.port, name, rdtype, timeout)


def dig_query(lab: Lab, host: Host, address: str, port: int, name: str, rdtype: str, timeout: int = 2,
              key_file: Path | None = None) -> tuple[str, list[str]]:
    """(RCODE, the answer section's record data) for `name` `rdtype`, asked from `host` of the server at
    `address`:`port`, signed with the key in `key_file` if given; ("", []) if nothing answered."""
    signed = ["-k", str(key_file)] if key_file is not None else []
    r = lab.run(host, [DIG, f"@{address}", "-p", str(port), *signed, "+norecurse", f"+time={timeout}",
                       "+tries=1", "+noall", "+comments", "+answer", name, rdtype],
                timeout=timeout + 10, check=False)
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


def key_files(stanza: str, directory: Path) -> dict[str, Path]:
    """Each `key "NAME" { ... };` statement of a named.conf text written alone to DIR/NAME.key (the form
    `dig -k` and `nsupdate -k` read), by key name (with its trailing dot)."""
    files: dict[str, Path] = {}
    lines = stanza.splitlines()
    for i, line in enumerate(lines):
        name = _key_name(line)
        if name is None:
            continue
        end = next((j for j in range(i, len(lines)) if lines[j].strip() == "};"), None)
        if end is None:
            raise LabError(f"key statement {name!r} is not closed")
        path = directory / f"{name}key"
        path.write_text("\n".join(lines[i:end + 1]) + "\n")
        path.chmod(0o600)
        files[name] = path
    return files


def _zone_file(stanza: str) -> Path:
    """The path of the zone statement's `file "PATH";`."""
    for line in stanza.splitlines():
        words = line.strip().split(None, 1)
        if len(words) == 2 and words[0] == "file":
            return Path(words[1].rstrip(";").strip('"'))
    raise LabError("no file statement in the zone stanza")


def zone_text(domain: str, address: str, nameservers: tuple[str, ...] = (), extra: str = "") -> str:
    """A primary's zone file: SOA and ns1 (the primary at `address`), then an NS record and glue for each
    of `nameservers` (ns2.. : the secondaries, notified at port 53 as NS records are), then `extra`."""
    ns = "".join(f"@ IN NS ns{i}.{domain}.\n" for i in range(2, len(nameservers) + 2))
    glue = "".join(f"ns{i} IN A {a}\n" for i, a in enumerate(nameservers, start=2))
    return ZONE.format(domain=domain, address=address, extra=ns + glue + extra)


class LabDnsServer:
    """What the lab's DNS servers (named, pdns_server) share: a fresh working directory, the process
    spawned in the host and awaited until `ready()`, stopped by PID; queries and transfers by dig with the
    key files in `keys`."""

    program = "server"  # for messages
    role = "server"

    def __init__(self, lab: Lab, host: Host, domain: str, workdir: Path, port: int,
                 address: str | None, log_name: str) -> None:
        self.lab, self.host, self.domain = lab, host, domain.rstrip(".")
        self.dir, self.port, self.address = Path(workdir), port, address or host.addr4
        self.proc: subprocess.Popen[Any] | None = None
        self.log = self.dir / log_name
        self.keys: dict[str, Path] = {}

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def _fresh_dir(self) -> None:
        """A fresh working directory: no journal, zone copy, database or log of an earlier run."""
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)

    def _spawn(self, argv: list[str], stdout: int | None) -> None:
        """Run `argv` in the host (its stderr, and `stdout` if None, to the log) until ready."""
        with open(self.log, "ab") as logf:  # the child keeps its own copy of the fd
            self.proc = self.lab.spawn(self.host, argv, stdout=logf if stdout is None else stdout,
                                       stderr=logf)
        try:
            wait_for(self._ready, timeout=20, interval=0.05, what=f"the {self.role} in {self.host.name}")
        except LabError as e:
            self.stop()
            raise LabError(f"{e}:\n{self.log_text()[-3000:]}") from None

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise LabError(f"{self.program} exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
        return self.ready()

    def stop(self) -> None:
        if self.proc is not None:
            self.lab.stop(self.proc)
            self.proc = None

    def log_text(self) -> str:
        return read_log(self.log)

    def query(self, name: str, rdtype: str, key: str | None = None,
              timeout: int = 2) -> tuple[str, list[str]]:
        """(RCODE, answers) from this server, signed with the key named `key` (None: unsigned)."""
        key_file = self.keys[key] if key is not None else None
        return dig_query(self.lab, self.host, self.address, self.port, name, rdtype, timeout, key_file)

    def serial(self, key: str | None) -> int | None:
        """The zone's SOA serial as this server answers it to a query signed with `key`."""
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


class _Named(LabDnsServer):
    """One named in a lab host, running a named.conf of lab options + `stanza`, stopped by PID. `workdir`
    is removed and made anew at each start (no journal, zone copy or log of an earlier run)."""

    program = "named"
    role = "named"

    def __init__(self, lab: Lab, host: Host, domain: str, stanza: str, workdir: Path, port: int = 53,
                 address: str | None = None) -> None:
        super().__init__(lab, host, domain, workdir, port, address, "named.log")
        self.stanza = stanza
        self.zone_file = _zone_file(stanza)

    def _prepare(self) -> None:
        """Write what named reads besides named.conf (the zone file, for a primary)."""

    def start(self) -> None:
        if not os.access(NAMED, os.X_OK):
            raise LabError(f"{NAMED} is missing: tools/install.sh installs Debian bind9")
        self._fresh_dir()
        self.keys = key_files(self.stanza, self.dir)
        conf = self.dir / "named.conf"
        # The server-wide options the printed text asks for (its closing comment), in our options block.
        wanted = "".join(f"    {o}\n" for o in server_options(self.stanza))
        conf.write_text(OPTIONS.format(dir=self.dir, port=self.port, address=self.address,
                                       server_options=wanted) + self.stanza)
        self._prepare()
        self._spawn([NAMED, "-g", "-n", "1", "-c", str(conf)], subprocess.DEVNULL)


class BindPrimary(_Named):
    """The zone's primary: `stanza` from primary_config / `tunneld account primary-config`, its zone file
    (SOA, the NS records of `nameservers`, `extra_zone`) written where the stanza's `file` says."""

    role = "primary"

    def __init__(self, lab: Lab, host: Host, domain: str, stanza: str, workdir: Path, port: int = 53,
                 address: str | None = None, nameservers: tuple[str, ...] = (), extra_zone: str = "") -> None:
        super().__init__(lab, host, domain, stanza, workdir, port, address)
        self.front_key = f"front.{self.domain}."
        self.nameservers, self.extra_zone = nameservers, extra_zone

    def _prepare(self) -> None:
        self.zone_file.write_text(zone_text(self.domain, self.address, self.nameservers, self.extra_zone))

    def ready(self) -> bool:
        return self.serial(self.front_key) is not None


class Primary(Protocol):
    """What a secondary's readiness asks of its primary (BindPrimary, lab.pdns.PdnsPrimary)."""

    front_key: str

    def serial(self, key: str) -> int | None: ...


class BindSecondary(_Named):
    """A secondary: `stanza` from secondary_config / `tunneld account secondary-config`; ready when its
    SOA (asked with the account key) carries `primary`'s serial."""

    role = "secondary"

    def __init__(self, lab: Lab, host: Host, domain: str, stanza: str, workdir: Path, primary: Primary,
                 port: int = 53, address: str | None = None) -> None:
        super().__init__(lab, host, domain, stanza, workdir, port, address)
        self.primary, self.account_key = primary, f"{self.domain}."

    def ready(self) -> bool:
        return self.in_sync()

    def in_sync(self) -> bool:
        mine = self.serial(self.account_key)
        return mine is not None and mine == self.primary.serial(self.primary.front_key)

    def wait_serial(self, serial: int, timeout: float = 10) -> None:
        """Wait until this secondary serves `serial` (or later), or raise LabError with its log."""
        def caught_up() -> bool:
            mine = self.serial(self.account_key)
            return mine is not None and mine >= serial
        try:
            wait_for(caught_up, timeout=timeout, interval=0.05, what=f"serial {serial} on the secondary")
        except LabError as e:
            raise LabError(f"{e}:\n{self.log_text()[-3000:]}") from None


def primary_config(domain: str, front_key: bytes, notify: list[tuple[str, int]], workdir: Path) -> str:
    """The primary's statements with a given front key (a test key, or the account's front key), its zone
    file in `workdir`: what `tunneld account primary-config --zone-file` prints for the same values."""
    return primary_stanza(domain, front_key, [(ipaddress.ip_address(a), p) for a, p in notify],
                          str(workdir / f"{domain.rstrip('.').lower()}.zone"))


def secondary_config(domain: str, account_key: bytes, front_key: bytes, primary: tuple[str, int],
                     workdir: Path) -> str:
    """A secondary's statements with given keys, its zone copy in `workdir`."""
    return secondary_stanza(domain, account_key, front_key, (ipaddress.ip_address(primary[0]), primary[1]),
                            str(workdir / f"{domain.rstrip('.').lower()}.zone"))


def nsupdate(lab: Lab, host: Host, address: str, port: int, key_file: Path, zone: str,
             commands: list[str], timeout: int = 5) -> subprocess.CompletedProcess[str]:
    """`nsupdate -k key_file` from `host`: `commands` (e.g. "update add x.zone. 60 A 192.0.2.9") sent to
    the server as one UPDATE of `zone`; a refused or failed UPDATE exits non-zero with the reason."""
    script = "".join(f"{c}\n" for c in [f"server {address} {port}", f"zone {zone}", *commands, "send"])
    return lab.run(host, [NSUPDATE, "-t", str(timeout), "-k", str(key_file)], input=script,
                   timeout=timeout + 10, check=False)
