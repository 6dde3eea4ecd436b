#!/usr/bin/env bash
# Build the Debian package in one command: dist/tunneld_VERSION_ARCH.deb (prints its path).
# Usage: tools/build-deb.sh   (on Debian 12 with python3-venv, gcc and python3-dev: tools/install.sh has them)
#
# The package carries tunneld's Python dependencies privately in /usr/lib/tunneld (a virtual environment
# made with Debian's /usr/bin/python3, as dh-virtualenv does), since Debian 12's python3-cryptography,
# python3-dnspython and numpy are older than tunneld needs and python-pytun is not packaged; see
# docs/packaging.md. It installs /usr/bin/tunneld, the units, the man page and the bash and zsh completion.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
# shellcheck source=tools/system_layout.sh
source tools/system_layout.sh

PY=/usr/bin/python3  # the interpreter of the system the package installs on: the venv links to it
[ -x "$PY" ] || { echo "tools/build-deb.sh: $PY is missing; build on Debian with python3-venv" >&2; exit 2; }
command -v dpkg-deb >/dev/null || { echo "tools/build-deb.sh: dpkg-deb is missing; build on Debian" >&2; exit 2; }
VERSION=$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
ARCH=$(dpkg --print-architecture)
PYMINOR=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
PYNEXT=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
PKG=$STAGE/pkg
mkdir -p "$PKG"
stage_system "$PKG" /usr/lib/tunneld /usr/bin /lib/systemd/system /usr/share/man/man8 \
    /usr/share/bash-completion/completions /usr/share/zsh/vendor-completions "$PY"
install -d "$PKG/usr/share/doc/tunneld"
install -m 0644 README.md "$PKG/usr/share/doc/tunneld/README.md"
cat > "$PKG/usr/share/doc/tunneld/copyright" <<'COPYRIGHT'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: tunneld
License: MIT
Comment: /usr/lib/tunneld holds tunneld's Python dependencies, each under its own licence (see each
 *.dist-info directory in /usr/lib/tunneld/lib/python3*/site-packages).
COPYRIGHT

install -d -m 0755 "$PKG/DEBIAN"
install -m 0755 dist/debian/postinst dist/debian/prerm dist/debian/postrm "$PKG/DEBIAN/"
SIZE=$(du -sk --exclude=DEBIAN "$PKG" | cut -f1)
# (An unquoted here-document: $VARIABLES expand, so it must hold no backquote.)
cat > "$PKG/DEBIAN/control" <<CONTROL
Package: tunneld
Version: $VERSION
Architecture: $ARCH
Maintainer: tunneld maintainers <root@localhost>
Installed-Size: $SIZE
Depends: python3 (>= $PYMINOR~), python3 (<< $PYNEXT), libc6, libssl3, adduser
Section: net
Priority: optional
Description: Back to My Mac for Linux: stable IPv6 addresses and tunnels between devices
 tunneld gives each device of an account a stable IPv6 ULA and end-to-end ESP-in-UDP tunnels
 (Noise IKpsk2 handshakes), finds its peers through signed DNS UPDATE and long-lived queries, maps
 ports with PCP, NAT-PMP or UPnP, and relays through TURN when no direct path works.
 .
 The package installs the tunneld.service and tunneld-dns.service units but enables neither: write
 the configuration with "tunneld join", then run "systemctl enable --now tunneld".
CONTROL

mkdir -p dist
OUT=dist/tunneld_${VERSION}_${ARCH}.deb
dpkg-deb --root-owner-group -Zzstd --build "$PKG" "$OUT" >/dev/null
echo "$ROOT/$OUT"
