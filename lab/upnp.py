"""A real NAT-PMP / PCP / UPnP IGD server for the lab: miniupnpd 2.3.1 (Debian `miniupnpd-nftables`).

Usage (the `behind_nat` topology of lab/topology.py):

    with Lab() as lab:
        host, router, peer = behind_nat(lab)
        with MiniUPnPd(lab, host, router, peer) as upnp:
            upnp.start()                       # returns seconds from exec to the first good answer
            lab.run(host, ["natpmpc", "-g", upnp.gateway, "-a", "4500", "4500", "udp", "3600"])
            assert Mapping("udp", 4500, "192.168.77.2", 4500) in upnp.list_mappings()
            upnp.restart(delete_leases=True)   # a router reboot that forgets its mappings
            upnp.sigusr1()                     # "public address changed": announcements go out

`MiniUPnPd(..., upnp_only=True)` serves UPnP IGD (SSDP + SOAP) with NAT-PMP and PCP disabled; `start()` then
waits for an SSDP answer instead of a NAT-PMP one.

Every process is started with `lab.spawn` (so the lab ends it by PID even if the test fails) and the
nftables objects live in the router namespace (deleted with it). The temporary directory (config,
lease file, pidfile, logs) is removed by `close()` / the context manager, or at garbage collection.

Why the setup is as it is (STUN for a "reserved" WAN address, the nft skeleton, the asymmetric
mappings, the ports below 1024 that make miniupnpd spin): docs/lab.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from lab import progs
from lab.netns import Host, Lab, LabError, read_log, wait_for

MINIUPNPD = "/usr/sbin/miniupnpd"
NATPMP_PORT = 5351
TABLE = "miniupnpd"
CHAINS = ("miniupnpd", "prerouting_miniupnpd", "postrouting_miniupnpd")

NFT_SKELETON = f"""
table inet {TABLE} {{
  chain forward {{
    type filter hook forward priority filter; policy accept;
    jump miniupnpd;
  }}
  chain miniupnpd {{ }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    jump prerouting_miniupnpd;
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat - 1; policy accept;
    jump postrouting_miniupnpd;
  }}
  chain prerouting_miniupnpd {{ }}
  chain postrouting_miniupnpd {{ }}
}}
"""

# One M-SEARCH to the gateway's port 1900 (unicast: miniupnpd answers any M-SEARCH that reaches its SSDP
# socket); prints the first answer, or nothing after the timeout.
SSDP_SEARCH = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(float(sys.argv[2]))
s.sendto(b"M-SEARCH * HTTP/1.1\\r\\nHOST: 239.255.255.250:1900\\r\\nMAN: \\"ssdp:discover\\"\\r\\nMX: 1\\r\\n"
         b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\\r\\n\\r\\n", (sys.argv[1], 1900))
try:
    print(s.recvfrom(2048)[0].decode("latin-1"), end="")
except OSError:
    pass
"""


class Mapping(NamedTuple):
    """One port mapping as installed in the router's nftables: external port -> internal addr:port."""

    proto: str  # "udp" or "tcp"
    external_port: int
    internal_addr: str
    internal_port: int


@dataclass(frozen=True)
class PublicAddress:
    """A NAT-PMP external-address answer."""

    result: int
    epoch: int
    address: str


class MiniUPnPd:
    """miniupnpd serving NAT-PMP/PCP on the router's LAN side, as in `behind_nat` (see module doc)."""

    def __init__(self, lab: Lab, host: Host, router: Host, peer: Host, *, lan_if: str = "lan0",
                 wan_if: str = "wan0", lan_net: str = "192.168.77.0/24", stun_port: int = 3478,
                 min_lifetime: int = 120, max_lifetime: int = 86400,
                 extra_conf: tuple[str, ...] = (), upnp_only: bool = False) -> None:
        self.lab, self.host, self.router, self.peer = lab, host, router, peer
        self.lan_if, self.wan_if, self.lan_net = lan_if, wan_if, lan_net
        self.gateway = router.extra.get("lan4", "192.168.77.1")
        self.public_addr = router.addr4
        self.stun_port = stun_port
        self.min_lifetime, self.max_lifetime = min_lifetime, max_lifetime
        self.extra_conf = extra_conf
        self.upnp_only = upnp_only
        self.dir = Path(tempfile.mkdtemp(prefix="tdl-upnp-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.dir), True)
        self.conf_path = self.dir / "miniupnpd.conf"
        self.lease_path = self.dir / "upnp.leases"
        self.pid_path = self.dir / "miniupnpd.pid"
        self.log_path = self.dir / "miniupnpd.log"
        self.stun_log_path = self.dir / "stun.log"
        self.proc: subprocess.Popen[Any] | None = None
        self.stun: subprocess.Popen[Any] | None = None
        self._nft_loaded = False
        self._starts = 0

    # -- context manager --------------------------------------------------------------------------

    def __enter__(self) -> MiniUPnPd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop miniupnpd and the STUN server and remove the temporary directory."""
        try:
            self.stop()
            if self.stun is not None:
                self.lab.stop(self.stun)
                self.stun = None
        finally:
            self._cleanup()

    # -- configuration ----------------------------------------------------------------------------

    def config(self) -> str:
        lines = [
            f"ext_ifname={self.wan_if}",
            f"listening_ip={self.lan_if}",
            # 203.0.113.1 is "reserved" for miniupnpd: learn it from our STUN server instead.
            "ext_perform_stun=yes",
            f"ext_stun_host={self.peer.addr4}",
            f"ext_stun_port={self.stun_port}",
            # enable_natpmp covers NAT-PMP and PCP alike in miniupnpd.
            f"enable_natpmp={'no' if self.upnp_only else 'yes'}",
            f"enable_upnp={'yes' if self.upnp_only else 'no'}",
            "secure_mode=yes",  # mappings only to the requester's own address
            "ipv6_disable=yes",  # the router has no IPv6
            f"lease_file={self.lease_path}",
            f"min_lifetime={self.min_lifetime}",
            f"max_lifetime={self.max_lifetime}",
            f"upnp_table_name={TABLE}",
            f"upnp_nat_table_name={TABLE}",
            "upnp_forward_chain=miniupnpd",
            "upnp_nat_chain=prerouting_miniupnpd",
            "upnp_nat_postrouting_chain=postrouting_miniupnpd",
            *self.extra_conf,
            f"allow 1024-65535 {self.lan_net} 1024-65535",
            "deny 0-65535 0.0.0.0/0 0-65535",
        ]
        return "\n".join(lines) + "\n"

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self, timeout: float = 12.0) -> float:
        """Start miniupnpd (and, first, the nft skeleton and the STUN server) and wait until it
        answers a NAT-PMP external-address request from the host with result 0 and the router's
        public address. Returns the seconds from exec to that answer."""
        if self.proc is not None and self.proc.poll() is None:
            raise LabError("miniupnpd is already running")
        if not os.access(MINIUPNPD, os.X_OK):
            raise LabError(f"{MINIUPNPD} is missing: run tools/install.sh (Debian miniupnpd-nftables)")
        if not self._nft_loaded:
            self.lab.nft(self.router, NFT_SKELETON)
            self._nft_loaded = True
        self._start_stun()
        self.conf_path.write_text(self.config())
        self._starts += 1
        with self.log_path.open("a") as log:
            log.write(f"--- start {self._starts} ---\n")
            log.flush()
            t0 = time.monotonic()
            self.proc = self.lab.spawn(self.router, [MINIUPNPD, "-d", "-f", str(self.conf_path),
                                                     "-P", str(self.pid_path)],
                                       stdout=log, stderr=subprocess.STDOUT)
        # The probe runs in the host namespace; check now and then that miniupnpd is still alive,
        # so a crash fails fast with its log instead of after the whole timeout.
        deadline = t0 + timeout
        if self.upnp_only:
            return self._wait_ssdp(t0, deadline, timeout)
        while True:
            answer = self.external_address(timeout=min(1.0, max(0.05, deadline - time.monotonic())))
            if answer is not None and answer.result == 0 and answer.address == self.public_addr:
                return time.monotonic() - t0
            if self.proc.poll() is not None:
                rc = self.stop()
                raise LabError(f"miniupnpd exited with {rc}:\n{self.log_text()}")
            if time.monotonic() >= deadline:
                # Leave nothing half-started behind (the caller may retry). While it performs STUN,
                # miniupnpd defers SIGTERM until STUN gives up (up to 9 s): don't wait that long.
                self.stop(timeout=0.5)
                raise LabError(f"miniupnpd gave no good NAT-PMP answer within {timeout:.1f} s "
                               f"(last: {answer}):\n{self.log_text()}")

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` s. Its nft rules stay (miniupnpd leaves them).

        A running miniupnpd exits on SIGTERM in about 10 ms; one still performing its startup STUN
        exchange defers the signal until STUN is over, so it gets the SIGKILL."""
        if self.proc is None:
            return None
        rc = self.lab.stop(self.proc, timeout=timeout)
        self.proc = None
        return rc

    def restart(self, delete_leases: bool, timeout: float = 12.0) -> float:
        """A router reboot: stop, flush miniupnpd's chains (kernel state is lost), optionally delete
        the lease file (a router that forgets its mappings), start. With the lease file kept,
        miniupnpd re-installs the mappings at start. The NAT-PMP epoch starts again at 0.
        Returns the seconds from the stop request to the first good answer."""
        t0 = time.monotonic()
        self.stop()
        self.flush_rules()
        if delete_leases:
            self.lease_path.unlink(missing_ok=True)
        self.start(timeout=timeout)
        return time.monotonic() - t0

    def sigusr1(self) -> None:
        """"Public address changed": miniupnpd redoes STUN and multicasts, once each, a NAT-PMP
        opcode-128 announcement to 224.0.0.1:5350 and :5351 and a PCP ANNOUNCE to :5350."""
        if self.proc is None or self.proc.poll() is not None:
            raise LabError("miniupnpd is not running")
        self.proc.send_signal(signal.SIGUSR1)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    # -- observing --------------------------------------------------------------------------------

    def external_address(self, timeout: float = 2.0) -> PublicAddress | None:
        """Ask, from the host namespace, for the external address (NAT-PMP opcode 0), retrying every
        20 ms for up to `timeout` s; the first answer with result 0 (or the last answer, or None)."""
        r = self.lab.run(self.host, progs.argv("natpmp_probe", self.gateway, f"{timeout:.3f}"),
                         timeout=timeout + 10, check=False, cwd=progs.REPO)
        try:
            last = json.loads(r.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError) as e:
            raise LabError(f"NAT-PMP probe failed: {r.stderr.strip()}") from e
        return None if last is None else PublicAddress(**last)

    def list_mappings(self) -> list[Mapping]:
        """The port mappings miniupnpd installed: the DNAT rules of its prerouting chain."""
        r = self.lab.run(self.router, ["nft", "-j", "list", "chain", "inet", TABLE, "prerouting_miniupnpd"])
        out: list[Mapping] = []
        for item in json.loads(r.stdout)["nftables"]:
            rule = item.get("rule")
            if rule is None:
                continue
            proto = eport = None
            dnat: dict[str, Any] | None = None
            for expr in rule["expr"]:
                if "dnat" in expr:
                    dnat = expr["dnat"]
                    continue
                match = expr.get("match")
                if not match or match.get("op") != "==":
                    continue
                left, right = match["left"], match["right"]
                payload = left.get("payload", {}) if isinstance(left, dict) else {}
                # miniupnpd matches the IPv4 protocol byte raw (@nh,72,8) and the port as `th dport`.
                if payload.get("base") == "nh" and payload.get("offset") == 72 and payload.get("len") == 8:
                    proto = {6: "tcp", 17: "udp"}.get(right, str(right))
                elif payload.get("field") == "dport":
                    eport = int(right)
                    if payload.get("protocol") in ("tcp", "udp"):
                        proto = payload["protocol"]
                elif "meta" in left and left["meta"].get("key") == "l4proto":
                    proto = str(right)
            if dnat is not None and proto is not None and eport is not None:
                out.append(Mapping(proto, eport, str(dnat["addr"]), int(dnat.get("port", eport))))
        return out

    def flush_rules(self) -> None:
        """Empty miniupnpd's three chains (what a reboot does to its rules)."""
        if self._nft_loaded:
            self.lab.nft(self.router, "".join(f"flush chain inet {TABLE} {c}\n" for c in CHAINS))

    def log_text(self) -> str:
        """miniupnpd's log (all starts, each after a `--- start N ---` line)."""
        return read_log(self.log_path)

    def stun_log_text(self) -> str:
        return read_log(self.stun_log_path)

    def natpmpc(self, *args: str, timeout: float = 10.0, check: bool = True) -> str:
        """Run natpmpc (an independent NAT-PMP client) in the host namespace against our gateway.

        Refuses `-a PUBLIC PRIVATE ...` with a private port below 1024: the allow rule denies it and
        miniupnpd 2.3.1 then spins over all 65,535 ports for 40+ s without answering."""
        if "-a" in args:
            i = args.index("-a")
            if len(args) > i + 2 and args[i + 2].isdigit() and 0 < int(args[i + 2]) < 1024:
                raise ValueError("internal ports below 1024 make miniupnpd spin for 40+ s: use >= 1024")
        r = self.lab.run(self.host, ["natpmpc", "-g", self.gateway, *args], timeout=timeout, check=check)
        return r.stdout

    def ssdp_search(self, timeout: float = 1.0) -> str | None:
        """One SSDP M-SEARCH (IGD:1) from the host to the gateway; the first answer's text, or None."""
        r = self.lab.run(self.host, [sys.executable, "-c", SSDP_SEARCH, self.gateway, f"{timeout:.3f}"],
                         timeout=timeout + 10, check=False)
        return r.stdout or None

    # -- internals --------------------------------------------------------------------------------

    def _wait_ssdp(self, t0: float, deadline: float, timeout: float) -> float:
        """UPnP only: wait until an M-SEARCH is answered (miniupnpd first does its STUN exchange)."""
        assert self.proc is not None
        while True:
            answer = self.ssdp_search(timeout=min(0.5, max(0.05, deadline - time.monotonic())))
            if answer is not None and "LOCATION:" in answer.upper():
                return time.monotonic() - t0
            if self.proc.poll() is not None:
                rc = self.stop()
                raise LabError(f"miniupnpd exited with {rc}:\n{self.log_text()}")
            if time.monotonic() >= deadline:
                self.stop(timeout=0.5)
                raise LabError(f"miniupnpd gave no SSDP answer within {timeout:.1f} s:\n{self.log_text()}")

    def _start_stun(self) -> None:
        if self.stun is not None and self.stun.poll() is None:
            return
        self.stun_log_path.unlink(missing_ok=True)
        with self.stun_log_path.open("w") as log:
            self.stun = progs.spawn(self.lab, self.peer, "stun", self.peer.addr4, str(self.stun_port),
                                    stdout=log, stderr=subprocess.STDOUT)
        stun = self.stun

        def ready() -> bool:
            if stun.poll() is not None:
                raise LabError(f"STUN server exited with {stun.returncode}: {self.stun_log_text()}")
            return "stun listening" in self.stun_log_text()

        wait_for(ready, timeout=10, interval=0.01, what="the STUN server to listen")

