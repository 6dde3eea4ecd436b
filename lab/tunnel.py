"""Run real `tunneld up` daemons in lab namespaces: configs, identities, start, readiness, status.

Also the account's own DNS server (`serve_dns`) and a device set up by `tunneld join` (`joined`).

Used by the integration tests, the demo and the benchmark, so that all three exercise the daemon the
way a user runs it: the console script, a TOML config, the control socket.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab import sshd as lab_sshd
from lab.netns import Host, Lab, LabError, ping_until, wait_for
from lab.topology import two_hosts
from tunneld.config import load_account_secret, load_config
from tunneld.crypto.kdf import derive_tsig_key
from tunneld.identity import DeviceIdentity

TUNNELD = str(Path(sys.prefix) / "bin" / "tunneld")
DOMAIN = "lab.tunneld.test"
MTU = 1400
IFNAME = "btmm0"


@dataclass
class Node:
    host: Host
    dir: Path
    endpoint_host: str
    port: int = 4500
    public_key: str = ""
    ula: str = ""
    proc: subprocess.Popen[Any] | None = None
    log: Path = field(default_factory=Path)
    extra: str = ""  # more TOML appended to the config (e.g. a [timers] table)
    name: str = ""  # the name the other node's config gives this one (default: the host's)
    offload: bool = True  # [interface] offload: TUN segmentation offload (the default, as in tunneld)
    exe: str = TUNNELD  # the tunneld executable

    def __post_init__(self) -> None:
        self.name = self.name or self.host.name

    @property
    def config(self) -> Path:
        return self.dir / "tunneld.toml"

    @property
    def socket(self) -> Path:
        return self.dir / "control.sock"


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner may read (keys, secrets)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def write_secret(path: Path) -> None:
    """A fresh account secret file: 32 random bytes, base64."""
    write_private(path, base64.b64encode(os.urandom(32)).decode() + "\n")


def names_toml(directory: Path) -> str:
    """A [names] table keeping the daemon's hosts block in `directory`: a lab daemon never writes the
    machine's own /etc/hosts (a test that wants the namespace's /etc/hosts writes its own table)."""
    return f'[names]\nhosts_file = "{directory / "hosts"}"\n\n' + ssh_toml(directory)


def ssh_toml(directory: Path) -> str:
    """An [ssh] table keeping the daemon's host keys and known-hosts block in `directory`: a lab daemon
    never publishes the machine's host keys nor writes its /etc/ssh/ssh_known_hosts."""
    return (f'[ssh]\nhost_keys = "{directory / "ssh_host_*_key.pub"}"\n'
            f'known_hosts = "{directory / "ssh_known_hosts"}"\n\n')


def _interface_toml(n: Node, secret: Path) -> str:
    return (f'[interface]\nname = "{IFNAME}"\nlisten_port = {n.port}\nmtu = {MTU}\n'
            f'offload = {"true" if n.offload else "false"}\n'
            f'state_dir = "{n.dir / "state"}"\ncontrol_socket = "{n.socket}"\n\n'
            + names_toml(n.dir) +
            f'[account]\ndomain = "{DOMAIN}"\nsecret_file = "{secret}"\n')


def _peer_toml(name: str, other: Node, with_endpoint: bool = True) -> str:
    s = f'\n[[peer]]\nname = "{name}"\npublic_key = "{other.public_key}"\n'
    if with_endpoint:
        s += f'endpoint = "{other.endpoint_host}:{other.port}"\n'
    return s


def parse_identity(out: str) -> tuple[str, str]:
    """(public key, ULA) from `tunneld identity`, which prints `public_key <base64>` and `ula <address>`."""
    got: dict[str, str] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2:
            got[parts[0]] = parts[1]
    if "public_key" not in got or "ula" not in got:
        raise LabError(f"unexpected `tunneld identity` output: {out.strip()!r}")
    return got["public_key"], got["ula"]


def identity(lab: Lab, n: Node) -> tuple[str, str]:
    """(public key, ULA) of n, its key created if missing: what `tunneld identity` prints, by the same
    library calls in this process (a `tunneld` process costs about 0.4 s of imports) unless n runs
    another executable."""
    if n.exe != TUNNELD:
        return parse_identity(lab.run(n.host, [n.exe, "identity", "--config", str(n.config)]).stdout)
    config = load_config(n.config)
    ident = DeviceIdentity.load_or_create(config.interface.state_dir)
    return ident.public_key_b64, str(ident.ula(config.account.domain))


def setup_pair(lab: Lab, a: Node, b: Node, secret: Path | None = None,
               a_knows_b_endpoint: bool = True, b_knows_a_endpoint: bool = True) -> None:
    """Write both configs with each other as peer (identities created by `tunneld identity`)."""
    if secret is None:
        secret = a.dir.parent / "secret"
        write_secret(secret)
    for n in (a, b):
        n.dir.mkdir(parents=True, exist_ok=True)
        n.config.write_text(_interface_toml(n, secret))
        n.public_key, n.ula = identity(lab, n)
    a.config.write_text(_interface_toml(a, secret) + _peer_toml(b.name, b, a_knows_b_endpoint) + a.extra)
    b.config.write_text(_interface_toml(b, secret) + _peer_toml(a.name, a, b_knows_a_endpoint) + b.extra)


def start(lab: Lab, n: Node, *args: str, env: dict[str, str] | None = None, timeout: float = 15) -> None:
    """`tunneld up` in n's namespace (log in n.log), waiting until its control socket says it is up."""
    _refuse_machine_hosts(n)
    n.log = n.dir / "tunneld.log"
    with open(n.log, "ab") as logf:  # the child keeps its own copy of the fd
        n.proc = lab.spawn(n.host, [n.exe, "up", "--config", str(n.config), *args], stdout=logf,
                           stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        wait_for(lambda: _ready(n), timeout=timeout, what=f"tunneld in {n.host.name} to answer status")
    except LabError:
        raise LabError(f"tunneld in {n.host.name} did not start:\n{n.log.read_text()[-3000:]}") from None


def _refuse_machine_hosts(n: Node) -> None:
    """A lab daemon must never write this machine's /etc/hosts: only a namespace's own, which `ip netns
    exec` bind-mounts over /etc/hosts when /etc/netns/NETNS/hosts exists."""
    config = load_config(n.config)
    names = config.names
    known = config.ssh.known_hosts
    if (known is not None and known.resolve() == Path("/etc/ssh/ssh_known_hosts")
            and not (Path("/etc/netns") / n.host.netns / "ssh" / "ssh_known_hosts").is_file()):
        raise LabError(f"{n.config} would write the machine's /etc/ssh/ssh_known_hosts: set [ssh] "
                       f"known_hosts (lab.tunnel.ssh_toml) or create /etc/netns/{n.host.netns}/ssh first")
    if (names.enabled and names.hosts_file.resolve() == Path("/etc/hosts")
            and not (Path("/etc/netns") / n.host.netns / "hosts").is_file()):
        raise LabError(f"{n.config} would write the machine's /etc/hosts: set [names] hosts_file "
                       f"(lab.tunnel.names_toml) or create /etc/netns/{n.host.netns}/hosts first")


def _ready(n: Node) -> bool:
    if n.proc is not None and n.proc.poll() is not None:
        raise LabError(f"tunneld in {n.host.name} exited with {n.proc.returncode}:\n"
                       f"{n.log.read_text()[-3000:]}")
    if not n.socket.exists():
        return False
    try:
        st = status(n)
    except (OSError, ValueError):
        return False
    return st.get("state") == "up"  # the control socket answers while the services still start


def status(n: Node) -> dict[str, Any]:
    from tunneld.services.control import request

    return request(n.socket, {"cmd": "status"})


def control(n: Node, req: dict[str, Any]) -> dict[str, Any]:
    from tunneld.services.control import request

    return request(n.socket, req)


def ping6(lab: Lab, src: Node, dst: Node, count: int = 1, timeout: float = 15) -> None:
    """Ping until one answer arrives (the first packets trigger the handshake), bounded."""
    ping_until(lab, src.host, dst.ula, timeout, f"ping6 {src.host.name} -> {dst.ula}")
    if count > 1:
        lab.run(src.host, ["ping", "-6", "-c", str(count), "-i", "0.01", "-W2", dst.ula])


def peer_status(n: Node, name: str) -> dict[str, Any]:
    st = status(n)
    for p in st["peers"]:
        if p["name"] == name:
            return dict(p)
    raise KeyError(name)


def dump(n: Node) -> str:
    return json.dumps(status(n), indent=1)


def start_sshd(lab: Lab, n: Node, workdir: Path) -> tuple[Path, Path]:
    """A real sshd in n's namespace (lab.sshd); returns (client key, known_hosts for n's ULA)."""
    server = lab_sshd.start_sshd(lab, n.host, [n.ula], workdir)
    return server.client_key, server.known_hosts


def ssh(lab: Lab, src: Node, dst: Node, key: Path, known: Path,
        command: str) -> subprocess.CompletedProcess[str]:
    return lab_sshd.ssh(lab, src.host, dst.ula, key, known, command)


@contextlib.contextmanager
def running_pair(workdir: Path, extra: str = "", start_b: bool = True, offload: bool = True,
                 a_args: Sequence[str] = (),
                 b_args: Sequence[str] = (), b_env: dict[str, str] | None = None,
                 before_start: Callable[[Lab, Node, Node], None] | None = None,
                 ) -> Iterator[tuple[Lab, Node, Node]]:
    """Two hosts on a link, each other's peer, `tunneld up` in a (and b unless start_b is False).

    `extra` is TOML appended to both configs; `before_start(lab, a, b)` may change the configs
    before the daemons start. Everything is removed on exit.
    """
    with Lab() as lab:
        ha, hb = two_hosts(lab)
        a = Node(ha, workdir / "a", ha.addr4, extra=extra, offload=offload)
        b = Node(hb, workdir / "b", hb.addr4, extra=extra, offload=offload)
        setup_pair(lab, a, b)
        if before_start is not None:
            before_start(lab, a, b)
        start(lab, a, *a_args)
        if start_b:
            start(lab, b, *b_args, env=b_env)
        yield lab, a, b


def serve_dns(lab: Lab, n: Node, secret: Path, workdir: Path,
              at: tuple[str, int], db: Path | None = None, tls: bool = False,
              extra: Sequence[str] = ()) -> subprocess.Popen[Any]:
    """`tunneld serve-dns` for the account's zone in n's namespace at `at` (log in workdir), waiting
    until it answers an SOA query. Without `db` the database is workdir/dns.sqlite and the server keeps
    root (`--user root`: the tunneld user cannot reach pytest's root-only directories); with one, it drops
    to the tunneld user as by default. `tls`: DNS over TLS too, on port 853 of `at`'s address; `extra`:
    more serve-dns arguments (--tls-cert FILE, say)."""
    log = workdir / "serve-dns.log"
    where = ["--db", str(db)] if db is not None else ["--db", str(workdir / "dns.sqlite"), "--user", "root"]
    with log.open("ab") as out:
        proc = lab.spawn(n.host, [TUNNELD, "serve-dns", "--zone", DOMAIN, "--secret-file", str(secret),
                                  "--listen", f"{at[0]}:{at[1]}", *where, *(["--tls"] if tls else []),
                                  *extra],
                         stdout=out, stderr=out)

    def answers() -> bool:
        if proc.poll() is not None:
            raise LabError(f"serve-dns exited: {log.read_text()[-2000:]}")
        r = lab.run(n.host, ["dig", f"@{at[0]}", "-p", str(at[1]), "+short", "+tries=1", "+time=1",
                             "SOA", DOMAIN], check=False)
        # (dig prints its errors, ";; connection refused" too, on stdout: an answer is a line without)
        return r.returncode == 0 and any(not x.startswith(";") for x in r.stdout.split("\n") if x.strip())

    wait_for(answers, timeout=15, what="serve-dns to answer")
    return proc


def account_node(lab: Lab, h: Host, workdir: Path, name: str, secret: Path, server: tuple[str, int],
                 port: int, account_extra: str = "") -> Node:
    """A device's config written by hand (not by `tunneld join`): the interface on `port`, the test's
    control socket and hosts block, and an [account] for `name` with `server` (plus `account_extra`
    lines); its identity read back with `tunneld identity`. Not started."""
    n = Node(h, workdir, h.addr4, port=port)
    n.dir.mkdir(parents=True, exist_ok=True)
    n.config.write_text(
        f'[interface]\nname = "{IFNAME}"\nlisten_port = {port}\nmtu = {MTU}\n'
        f'state_dir = "{n.dir / "state"}"\ncontrol_socket = "{n.socket}"\n\n'
        + names_toml(n.dir) +
        f'[account]\ndomain = "{DOMAIN}"\nsecret_file = "{secret}"\n'
        f'server = "{server[0]}:{server[1]}"\nname = "{name}"\n{account_extra}')
    out = lab.run(h, [TUNNELD, "identity", "--config", str(n.config)]).stdout.split()
    n.public_key, n.ula = out[1], out[3]
    return n


def joined(lab: Lab, h: Host, name: str, secret: Path, dns_at: tuple[str, int], workdir: Path,
           run: bool = True, args: Sequence[str] = (), tls: bool = False, join_args: Sequence[str] = (),
           env: dict[str, str] | None = None) -> Node:
    """A host set up as a user would: `tunneld join` (no [[peer]] at all: the account's DNS server is the
    only way to find the others; `tls`: `join --tls`; `join_args`: more of join's), then `tunneld up ARGS`
    (with `env` added to its environment) unless `run` is False."""
    n = Node(h, workdir / name, h.addr4, name=name)
    out = lab.run(h, [TUNNELD, "join", DOMAIN, "--server", f"{dns_at[0]}:{dns_at[1]}", "--secret-file",
                      str(secret), "--name", name, "--config", str(n.config),
                      "--state-dir", str(n.dir / "state"), *(["--tls"] if tls else []), *join_args]).stdout
    fields = dict(line.split(" ", 1) for line in out.splitlines())
    n.public_key, n.ula = fields["public_key"], fields["ula"]
    # Test-only: the control socket and the hosts block next to the config (the defaults are /run/tunneld
    # and the machine's /etc/hosts).
    n.config.write_text(n.config.read_text().replace(
        "[interface]\n", f'[interface]\ncontrol_socket = "{n.socket}"\n') + "\n" + names_toml(n.dir))
    if run:
        start(lab, n, *args, env=env)
    return n


def dig_key(secret: Path) -> str:
    """dig's `-y` argument for the account's TSIG key (the server answers device records to signed
    queries only)."""
    tsig = derive_tsig_key(load_account_secret(secret), DOMAIN)
    return f"hmac-sha256:{DOMAIN}.:{base64.b64encode(tsig).decode()}"


def dig(lab: Lab, h: Host, server: tuple[str, int], qtype: str, name: str,
        secret: Path | None = None) -> list[str]:
    """The answer lines (`dig +short`) for one query to the account's server, from h; signed with the
    account key of the secret file `secret` if given."""
    key = [] if secret is None else ["-y", dig_key(secret)]
    r = lab.run(h, ["dig", f"@{server[0]}", "-p", str(server[1]), "+short", "+tries=1", "+time=1",
                    *key, qtype, name], check=False)
    return [line for line in r.stdout.splitlines() if line.strip() and not line.startswith(";")]
