"""A private coturn (`turnserver`) in a lab namespace: the TURN relay (RFC 8656) of the relay tests.

`Coturn` starts Debian's turnserver in the foreground in the namespace, by PID, with the configuration a
self-hoster writes for an account (docs/nat.md, "TURN relay"): `use-auth-secret` with the
`static-auth-secret=` line of `tunneld account new`, a realm, one listening and one relay address, no
TLS/DTLS, no CLI, and everything it writes (pid file, log, user database) in a fresh working directory.
It is ready once a real Allocate, signed with TURN REST credentials from the secret, is answered (and
that allocation deleted again). It is stopped by PID. The gotchas met on the way are in docs/lab.md.

    with Lab() as lab:
        with Coturn(lab, relay_host, secret, tmp_path / "coturn", listen="198.51.100.1",
                    relay="203.0.113.1") as turn:
            user, password = turn.credentials("laptop")
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from lab import progs
from lab.netns import Host, Lab, LabError, read_log
from tunneld.proto.stun_wire import turn_rest_credentials

TURNSERVER = shutil.which("turnserver") or "/usr/bin/turnserver"
PORT = 3478
REALM = "lab.tunneld.test"
# coturn relays to any peer unless told otherwise (4.6 refuses only loopback and, with a flag, multicast
# peers); the lab's ranges are allowed explicitly so that a denied-peer-ip default in a later coturn or
# in a packaged turnserver.conf cannot silently turn a relay test into a timeout.
LAB_PEERS = ("192.0.2.0-192.0.2.255", "198.51.100.0-198.51.100.255", "203.0.113.0-203.0.113.255",
             "10.0.0.0-10.255.255.255", "172.16.0.0-172.31.255.255", "192.168.0.0-192.168.255.255",
             "2001:db8::-2001:db8:ffff:ffff:ffff:ffff:ffff:ffff")


class Coturn:
    def __init__(self, lab: Lab, host: Host, secret: str, workdir: Path, *, listen: str | None = None,
                 relay: str | None = None, port: int = PORT, realm: str = REALM) -> None:
        self.lab, self.host, self.secret, self.realm = lab, host, secret, realm
        self.dir = Path(workdir)
        self.listen = listen or host.addr4
        self.relay = relay or self.listen
        self.port = port
        self.log = self.dir / "turnserver.log"
        self.proc: subprocess.Popen[Any] | None = None

    def __enter__(self) -> Coturn:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        """Where clients send: the listening address and port."""
        return self.listen, self.port

    def credentials(self, user: str, ttl: int = 3600) -> tuple[str, str]:
        """TURN REST (username, password) for `user`, valid for `ttl` seconds from now."""
        return turn_rest_credentials(self.secret.encode(), user, int(time.time()) + ttl)

    def argv(self) -> list[str]:
        d = self.dir
        return [TURNSERVER, "-n",  # no turnserver.conf: the packaged one is not read
                "--listening-ip", self.listen, "--relay-ip", self.relay, "--listening-port", str(self.port),
                "--use-auth-secret", f"--static-auth-secret={self.secret}", "--realm", self.realm,
                "--no-tls", "--no-dtls", "--no-cli", "--fingerprint",
                "--pidfile", str(d / "turnserver.pid"), "--db", str(d / "turndb"),
                "--log-file", str(self.log), "--simple-log", "--no-stdout-log", "--verbose",
                *(f"--allowed-peer-ip={r}" for r in LAB_PEERS)]

    def start(self) -> None:
        if not os.access(TURNSERVER, os.X_OK):
            raise LabError(f"{TURNSERVER} is missing: tools/install.sh installs Debian coturn")
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "stderr.log", "ab") as errf:
            self.proc = self.lab.spawn(self.host, self.argv(), stdout=subprocess.DEVNULL, stderr=errf)
        try:
            self.wait_ready(timeout=15)
        except LabError as e:
            self.stop()
            raise LabError(f"turnserver did not start: {e}\n{self.log_text()[-3000:]}") from None

    def wait_ready(self, timeout: float) -> None:
        """Until a signed Allocate from the relay's own namespace is answered (and deleted again)."""
        end = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise LabError(f"turnserver exited with {self.proc.returncode}")
            user, password = self.credentials("lab-ready")
            try:
                out = progs.run(self.lab, self.host, "turn", "allocate", self.listen, str(self.port), user,
                                password, "--timeout", "2", timeout=30)
            except (LabError, ValueError) as e:  # no answer within the program's timeout: not up yet
                out = {"error": str(e)}
            if out.get("closed"):
                return
            if out.get("failed") not in (None, 0) or time.monotonic() >= end:
                raise LabError(f"no Allocate answered within {timeout:.0f} s: {out}")

    def stop(self) -> None:
        if self.proc is not None:
            self.lab.stop(self.proc)
            self.proc = None

    def log_text(self) -> str:
        return read_log(self.log) + read_log(self.dir / "stderr.log")
