#!/usr/bin/env bash
# Install what tunneld and its tests need, idempotently: Debian packages (only those missing) and the
# Python virtual environment in .venv (rebuilt only when pyproject.toml changed).
# Usage: tools/install.sh   (as root on Debian 12; a second run changes nothing and takes about a second)
#
# System mode: tools/install.sh --system   installs tunneld as a service (docs/packaging.md): a virtual
# environment in /usr/local/lib/tunneld, /usr/local/bin/tunneld, the units in /etc/systemd/system, the man
# page and the bash and zsh completions, the tunneld user and /etc/tunneld (0700); then `systemctl
# daemon-reload` where systemd runs. It enables and starts nothing. DESTDIR=DIR installs under DIR instead
# of / (for packaging and tests): no user is created and systemd is not told.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

SYSTEM=0
case "${1-}" in
  "") ;;
  --system) SYSTEM=1 ;;
  *) echo "tools/install.sh: unknown argument ${1}; use no argument (development) or --system" >&2; exit 2 ;;
esac
DESTDIR=${DESTDIR-}
if ((SYSTEM)) && [ -n "$DESTDIR" ]; then
  mkdir -p "$DESTDIR"
  DESTDIR=$(cd "$DESTDIR" && pwd)
fi
if ((SYSTEM)) && [ -z "$DESTDIR" ] && [ "$(id -u)" -ne 0 ]; then
  echo "tools/install.sh: --system installs into / and needs root (sudo), or set DESTDIR=DIR" >&2
  exit 2
fi

# Debian packages: the interpreter and a compiler for python-pytun's C extension; the kernel tools
# the tunnel and the lab drive; the real peers the tests and the benchmark run (sshd, iperf3,
# wireguard-go as the baseline, tshark to decrypt captures, miniupnpd as the NAT-PMP/PCP server
# and natpmpc as an independent client). miniupnpd-nftables is only the binary (no maintainer
# scripts, no service): Debian's `miniupnpd` package, which adds the init script, is not needed.
# bind9 is the DNS UPDATE server the publishing tests run (lab/bind.py, in a namespace, in the
# foreground) and bind9-dnsutils gives dig/nsupdate to check it independently; pdns-server with
# pdns-backend-sqlite3 is the other primary the rendezvous tests run (lab/pdns.py); knot-dnsutils gives
# Knot's kdig, a second independent client of serve-dns's DNS over TLS. coturn is the TURN
# relay the relay tests run (lab/coturn.py, likewise in a namespace, in the foreground).
# systemd gives systemd-analyze (the units are verified and scored statically; nothing is started)
# and man-db renders the generated man page in the tests. libssl-dev: OpenSSL's headers, for the
# optional batch AES-GCM extension (setup.py). System mode needs only the first six.
APT_PKGS=(python3 python3-venv python3-dev gcc libc6-dev libssl-dev iproute2 nftables iputils-ping
          openssh-server openssh-client iperf3 wireguard-go wireguard-tools tshark tcpdump
          miniupnpd-nftables natpmpc bind9 bind9-dnsutils pdns-server pdns-backend-sqlite3 knot-dnsutils
          coturn systemd man-db)
if ((SYSTEM)); then APT_PKGS=(python3 python3-venv python3-dev gcc libc6-dev libssl-dev); fi

missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "tools/install.sh: missing Debian packages: ${missing[*]}; run as root (sudo tools/install.sh)" >&2
    exit 2
  fi
  echo "installing Debian packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The interpreter: Debian's own python3 first. It is built with PGO and LTO, and the data path is
# interpreter-bound: ESP batches measured 5-7 % faster than on a plain source build (such as a
# pyenv one) of the same 3.11. Otherwise the first python3 on PATH that is 3.11 or newer.
PY=""
for cand in /usr/bin/python3 python3 python3.13 python3.12 python3.11; do
  if command -v "$cand" >/dev/null 2>&1 &&
     "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null &&
     "$cand" -c 'import venv, ensurepip' 2>/dev/null; then
    PY=$(command -v "$cand"); break
  fi
done
[ -n "$PY" ] || { echo "tools/install.sh: no Python >= 3.11 with venv found; install python3-venv" >&2; exit 2; }

if ((SYSTEM)); then
  # shellcheck source=tools/system_layout.sh
  source tools/system_layout.sh
  stage_system "$DESTDIR" /usr/local/lib/tunneld /usr/local/bin /etc/systemd/system \
      /usr/local/share/man/man8 /usr/local/share/bash-completion/completions \
      /usr/local/share/zsh/site-functions "$PY"
  install -d -m 0700 "$DESTDIR/etc/tunneld"
  if [ -z "$DESTDIR" ]; then
    if ! getent passwd tunneld >/dev/null; then
      useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin tunneld
    fi
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
      systemctl daemon-reload
    fi
  fi
  echo "installed tunneld in ${DESTDIR}/usr/local (units in ${DESTDIR}/etc/systemd/system, enabled: none)" >&2
  echo "next: tunneld join DOMAIN --server HOST --secret-file /etc/tunneld/secret; systemctl enable --now tunneld" >&2
  exit 0
fi

# bind9 ships a named service. The tests start their own named in a namespace; a system-wide one
# would hold port 53 on the host and outlive the tests. Machines with a policy-rc.d that exits 101
# (containers) never start it; elsewhere, stop and disable it: this machine is not a DNS server.
if [ "$(id -u)" -eq 0 ] && dpkg-query -W -f='${Status}' bind9 2>/dev/null | grep -q "install ok installed"; then
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now named.service >/dev/null 2>&1 || true
  elif [ -x /etc/init.d/named ]; then
    # Not `/etc/init.d/named stop`: without the service's rndc it falls back to killing every
    # /usr/sbin/named, the labs' included. The service's own instance is the one in its pid file.
    pid=$(cat /run/named/named.pid 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill "$pid" || true; fi
    if command -v update-rc.d >/dev/null 2>&1; then update-rc.d named disable >/dev/null 2>&1 || true; fi
  fi
fi

# pdns-server ships a service too (port 53 on the host): off, as named is (lab/pdns.py starts its own
# pdns_server by PID). Debian's package has a systemd unit only, no init script.
if [ "$(id -u)" -eq 0 ] && dpkg-query -W -f='${Status}' pdns-server 2>/dev/null | grep -q "install ok installed"; then
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now pdns.service >/dev/null 2>&1 || true
  fi
fi

# coturn ships a service too, which would hold port 3478 on the host: off, as named is (the lab starts
# its own turnserver by PID; `systemctl disable --now` only stops the service's own process).
if [ "$(id -u)" -eq 0 ] && dpkg-query -W -f='${Status}' coturn 2>/dev/null | grep -q "install ok installed"; then
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now coturn.service >/dev/null 2>&1 || true
  elif command -v update-rc.d >/dev/null 2>&1 && [ -x /etc/init.d/coturn ]; then
    update-rc.d coturn disable >/dev/null 2>&1 || true
  fi
fi

# The system user the daemons drop to after start-up (`tunneld up` keeps only CAP_NET_ADMIN as it;
# serve-dns keeps nothing), and whose group may read `tunneld status`. The Debian package's postinst
# creates the same one.
if [ "$(id -u)" -eq 0 ] && ! getent passwd tunneld >/dev/null; then
  useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin tunneld
fi

stamp=.venv/.installed
want="$( (cat pyproject.toml setup.py tunneld/crypto/_gcm.c tunneld/fastpath/_tcp6.c; "$PY" -c 'import sys; print(sys.executable, sys.version)') | sha256sum | cut -d' ' -f1)"
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# A venv made by another interpreter is rebuilt rather than patched.
if [ -x .venv/bin/python ] && [ "$(.venv/bin/python -c 'import os, sys; print(os.path.realpath(sys._base_executable))')" != "$(realpath "$PY")" ]; then
  rm -rf .venv
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,bench]'
echo "$want" > "$stamp"
echo "installed the Python environment in $ROOT/.venv" >&2
