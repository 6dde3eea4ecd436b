"""A real systemd as PID 1 in namespaces of its own, to start the repository's units as an admin would.

The machine's own init need not be systemd (containers, CI). `booted()` starts /lib/systemd/systemd
in new PID, mount, network, UTS, IPC and cgroup namespaces, in a cgroup subtree of its own, with
private /run, /tmp and /var (tmpfs) and an overlay on /etc whose changes live in that /run: nothing it
writes reaches this machine's files, its network or its processes. Units that act on the kernel as a
whole (sysctl, modules, binfmt, udev) or on file systems outside those are masked. Systemd wants
shared mount propagation (it moves credential mounts out of a child namespace), which we give it
inside its own namespace only. Leaving kills PID 1, which ends every process of the namespace, and
removes the cgroup subtree.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from lab.netns import LabError, wait_for

SYSTEMD = Path("/lib/systemd/systemd")
CGROUP = Path("/sys/fs/cgroup")
TARGET = "lab.target"

# sysinit's units that would act beyond the namespaces (kernel settings, modules, devices, the real
# root file system) or that a container does not need.
MASKED = (
    "systemd-sysctl.service", "systemd-modules-load.service", "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount", "proc-sys-fs-binfmt_misc.mount", "systemd-remount-fs.service",
    "systemd-udevd.service", "systemd-udev-trigger.service", "systemd-udev-settle.service",
    "systemd-hwdb-update.service", "kmod-static-nodes.service", "systemd-random-seed.service",
    "systemd-firstboot.service", "systemd-machine-id-commit.service", "systemd-repart.service",
    "systemd-pstore.service", "systemd-timesyncd.service", "systemd-tmpfiles-setup-dev.service",
    "systemd-tmpfiles-setup.service", "systemd-tmpfiles-clean.timer", "systemd-sysusers.service",
    "systemd-update-utmp.service", "ldconfig.service", "systemd-pcrphase.service",
    "systemd-pcrphase-sysinit.service", "sys-kernel-config.mount", "sys-fs-fuse-connections.mount",
    "dbus.socket", "dbus.service",
)

_BOOT = """\
set -e
mount --make-rprivate /
mount -t tmpfs -o mode=0755 tmpfs /run
cp -a {stage}/etc /run/lab-stage-etc  # before /tmp, where the stage may be, is hidden
{keep_out}mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=0755 tmpfs /var
{keep_in}mkdir -p /var/tmp /var/log /var/lib && chmod 1777 /var/tmp
mkdir -p /run/lab-etc/upper /run/lab-etc/work
mount -t overlay overlay -o lowerdir=/etc,upperdir=/run/lab-etc/upper,workdir=/run/lab-etc/work /etc
mount -t tmpfs -o mode=0755 tmpfs /etc/systemd/system
cp -a /run/lab-stage-etc/. /etc/
ip link set lo up
mount --make-rshared /
export container=lab
exec {systemd} --unit={target} --log-target=console --log-level=warning
"""


@dataclass
class Booted:
    """A running contained systemd: run commands in its namespaces."""

    pid: int  # its PID 1, as this machine sees it
    log: Path

    def run(self, argv: list[str], timeout: float = 30,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = ["nsenter", "-t", str(self.pid), "-m", "-p", "-n", "-u", "-i", "-C", *argv]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if check and r.returncode != 0:
            raise LabError(f"{shlex.join(argv)}: exit {r.returncode}: {r.stdout.strip()} {r.stderr.strip()}")
        return r

    def show(self, unit: str, prop: str) -> str:
        return self.run(["systemctl", "show", unit, "-p", prop, "--value"]).stdout.strip()


def _cgroup_dirs(name: str) -> list[Path]:
    """Where a subtree of our own goes: the unified hierarchy's root, or the hybrid layout's two."""
    if (CGROUP / "cgroup.controllers").exists():
        return [CGROUP / name]
    return [CGROUP / h / name for h in ("systemd", "unified") if (CGROUP / h).is_dir()]


def _remove_tree(top: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while top.exists() and time.monotonic() < deadline:
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()
        if top.exists():
            time.sleep(0.05)
    if top.exists():
        raise LabError(f"cgroup {top} is still there after {timeout} s")


@contextlib.contextmanager
def booted(work: Path, files: Mapping[str, tuple[bytes, int]], units: Mapping[str, str],
           wants: tuple[str, ...] = (), timeout: float = 30,
           keep: tuple[Path, ...] = ()) -> Iterator[Booted]:
    """Boot systemd with ``files`` (path under /etc -> (content, mode)) and ``units`` (name -> text,
    installed in /etc/systemd/system); ``wants`` are started at boot by the lab's target. ``keep``: the
    directories (e.g. the checkout the units run from) that stay visible where they are, also when they
    lie under /tmp or /var, which the contained systemd gets fresh."""
    stage = work / "stage"
    etc = stage / "etc"
    system = etc / "systemd" / "system"
    system.mkdir(parents=True)
    for rel, (content, mode) in files.items():
        path = etc / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(mode)
    for name, text in units.items():
        (system / name).write_text(text)
    for name in MASKED:
        (system / name).symlink_to("/dev/null")
    (system / TARGET).write_text(f"[Unit]\nDescription=the lab's target\nWants={' '.join(wants)}\n")
    boot = work / "boot.sh"
    hidden = [shlex.quote(str(p)) for p in (k.resolve() for k in keep)
              if p.is_relative_to("/tmp") or p.is_relative_to("/var")]
    keep_out = "".join(f"mkdir -p /run/lab-keep/{i} && mount --bind {p} /run/lab-keep/{i}\n"
                       for i, p in enumerate(hidden))
    keep_in = "".join(f"mkdir -p {p} && mount --bind /run/lab-keep/{i} {p}\n" for i, p in enumerate(hidden))
    boot.write_text(_BOOT.format(stage=shlex.quote(str(stage)), systemd=SYSTEMD, target=TARGET,
                                 keep_out=keep_out, keep_in=keep_in))
    log = work / "systemd.log"
    cgroups = _cgroup_dirs(f"tunneld-lab-{secrets.token_hex(4)}")
    for c in cgroups:
        c.mkdir()
    enter = "".join(f"echo $$ > {shlex.quote(str(c / 'cgroup.procs'))}; " for c in cgroups)
    argv = ["sh", "-c", enter + 'exec "$@"', "lab-systemd", "unshare", "--pid", "--fork", "--mount",
            "--net", "--uts", "--ipc", "--cgroup", "--mount-proc", "sh", str(boot)]
    proc: subprocess.Popen[bytes] | None = None
    pid1: int | None = None
    try:
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)

        found: list[int] = []

        def systemd_started() -> bool:
            for p in cgroups[0].rglob("cgroup.procs"):
                for line in p.read_text().split():
                    with contextlib.suppress(OSError):
                        if Path(f"/proc/{line}/exe").resolve() == SYSTEMD.resolve():
                            found.append(int(line))
                            return True
            return False

        try:
            wait_for(systemd_started, timeout, what="systemd as PID 1 of its namespace")
        except LabError as e:
            raise LabError(f"{e}; its log: {log.read_text()[-2000:]}") from None
        pid1 = found[0]
        b = Booted(pid1, log)
        wait_for(lambda: b.run(["systemctl", "is-system-running"], check=False).stdout.strip()
                 in ("running", "degraded"), timeout, what="the contained systemd to finish booting")
        yield b
    finally:
        if pid1 is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid1, signal.SIGKILL)  # PID 1 of the namespace: the kernel ends every process in it
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        for c in cgroups:
            _remove_tree(c)
