"""A real OpenSSH server in a lab namespace, and the client command that logs into it.

`start_sshd` writes a throwaway config, host key and client key into a work directory, starts
`sshd -D` in the host's namespace (ended by PID with the lab, or by `Sshd.close`), and returns once it
listens. `Sshd.ssh` runs one command over ssh from another namespace, in batch mode, checking the host
key against the names the server was started for (a ULA through a tunnel, a LAN address, ...).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.netns import Host, Lab, LabError, wait_for

SSHD = "/usr/sbin/sshd"
CONFIG = """\
ListenAddress ::
ListenAddress 0.0.0.0
Port {port}
HostKey {dir}/host_ed25519
AuthorizedKeysFile {dir}/authorized_keys
PidFile none
UsePAM no
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
Subsystem sftp internal-sftp
"""


@dataclass
class Sshd:
    lab: Lab
    host: Host
    dir: Path
    port: int
    proc: subprocess.Popen[Any]
    owns_dir: bool = False

    @property
    def client_key(self) -> Path:
        return self.dir / "client_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def log(self) -> Path:
        return self.dir / "sshd.log"

    def ssh(self, src: Host, address: str, command: str,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """`command` run by root on this server, logged in from `src` to `address` (one of the names
        given to start_sshd); raises LabError if ssh or the command fails."""
        return ssh(self.lab, src, address, self.client_key, self.known_hosts, command, self.port, timeout)

    def close(self) -> None:
        """Stop sshd (by PID) and remove the work directory if start_sshd made it."""
        self.lab.stop(self.proc)
        if self.owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Sshd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_sshd(lab: Lab, host: Host, names: Sequence[str], workdir: Path | None = None,
               port: int = 22, timeout: float = 10) -> Sshd:
    """sshd in `host`'s namespace on every address (IPv6 and IPv4) at `port`, with fresh keys in
    `workdir` (a new temporary directory if None); clients must reach it by one of `names`."""
    owns = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="lab-sshd-")) if workdir is None else workdir
    workdir.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    for name in ("host_ed25519", "client_ed25519"):
        (workdir / name).unlink(missing_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(workdir / name)],
                       check=True, timeout=30, capture_output=True)
    (workdir / "authorized_keys").write_text((workdir / "client_ed25519.pub").read_text())
    (workdir / "sshd_config").write_text(CONFIG.format(dir=workdir, port=port))
    kind, key = (workdir / "host_ed25519.pub").read_text().split()[:2]
    hosts = ",".join(n if port == 22 else f"[{n}]:{port}" for n in names)
    (workdir / "known_hosts").write_text(f"{hosts} {kind} {key}\n")
    with open(workdir / "sshd.log", "ab") as logf:  # the child keeps its own copy of the fd
        proc = lab.spawn(host, [SSHD, "-D", "-e", "-f", str(workdir / "sshd_config")],
                         stdout=subprocess.DEVNULL, stderr=logf)
    server = Sshd(lab, host, workdir, port, proc, owns)

    def listening() -> bool:
        if proc.poll() is not None:
            raise LabError(f"sshd in {host.name} exited: {server.log.read_text()[-2000:]}")
        return f":{port} " in lab.run(host, ["ss", "-ltnH", f"sport = :{port}"]).stdout

    try:
        wait_for(listening, timeout=timeout, what=f"sshd in {host.name} to listen")
    except LabError:
        server.close()
        raise
    return server


def ssh(lab: Lab, src: Host, address: str, key: Path, known_hosts: Path, command: str, port: int = 22,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`ssh root@address command` from `src`'s namespace: batch mode (no prompt ever), the host key
    checked strictly against `known_hosts`, a bounded connect."""
    fam = "-6" if ":" in address else "-4"
    return lab.run(src, ["ssh", fam, "-p", str(port), "-i", str(key),
                         "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
                         "-o", "BatchMode=yes",
                         "-o", "ConnectTimeout=10", f"root@{address}", command], timeout=timeout)
