"""The demo: two machines (network namespaces) on one link, each running `tunneld up`, then `ssh` from
one to the other's ULA through the tunnel, and `tunneld status` on both. Everything is removed at the
end, also on failure or Ctrl-C.

Run it with tools/demo.sh (which installs what is missing first), as root.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab.netns import Lab, LabError
from lab.topology import two_hosts
from lab.tunnel import TUNNELD, Node, ping6, setup_pair, ssh, start, start_sshd


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def show(lab: Lab, node: Node, argv: list[str]) -> None:
    print(f"[{node.name}]$ {' '.join(argv)}", flush=True)
    r = lab.run(node.host, argv, check=False)
    sys.stdout.write(r.stdout)
    if r.returncode != 0:
        sys.stdout.write(r.stderr)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="tunneld-demo-") as tmp, Lab() as lab:
        t0 = time.monotonic()
        say("two hosts, 'laptop' (192.0.2.1) and 'desktop' (192.0.2.2), on one link")
        ha, hb = two_hosts(lab)
        laptop = Node(ha, Path(tmp) / "laptop", ha.addr4, name="laptop")
        desktop = Node(hb, Path(tmp) / "desktop", hb.addr4, name="desktop")
        say("one account secret shared by both; each host creates its key and derives its ULA")
        setup_pair(lab, laptop, desktop)
        print(f"laptop : ULA {laptop.ula}  key {laptop.public_key}")
        print(f"desktop: ULA {desktop.ula}  key {desktop.public_key}")
        print(f"\nlaptop's config ({laptop.config}):\n{laptop.config.read_text()}")
        say("tunneld up on both")
        start(lab, laptop)
        start(lab, desktop)
        show(lab, laptop, ["ip", "-6", "addr", "show", "dev", "btmm0"])
        show(lab, laptop, ["ip", "-6", "route", "show", "dev", "btmm0"])
        say("ping6 the desktop's ULA (the first packet starts the handshake)")
        ping6(lab, laptop, desktop)
        show(lab, laptop, ["ping", "-6", "-c", "3", "-i", "0.2", desktop.ula])
        say("ssh laptop -> desktop's ULA, through the tunnel")
        key, known = start_sshd(lab, desktop, Path(tmp) / "ssh")
        cmd = "echo \"hello from $(hostname -s) over ssh; client $SSH_CLIENT\"; uname -sr"
        print(f"[laptop]$ ssh root@{desktop.ula} '{cmd}'")
        sys.stdout.write(ssh(lab, laptop, desktop, key, known, cmd).stdout)
        say("tunneld status")
        show(lab, laptop, [TUNNELD, "status", "--config", str(laptop.config)])
        show(lab, desktop, [TUNNELD, "status", "--config", str(desktop.config)])
        say(f"done in {time.monotonic() - t0:.1f} s; removing both hosts")
    print("cleaned up: namespaces, daemons, TUN devices and routes are gone")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (LabError, subprocess.SubprocessError) as e:
        print(f"demo failed: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
