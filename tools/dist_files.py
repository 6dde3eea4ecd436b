#!/usr/bin/env python3
"""Generate the man page (section 8) and the bash and zsh completions from tunneld's argument parser.

Usage: python tools/dist_files.py OUTDIR   (tunneld and the `dist` extra installed: argparse-manpage, shtab)
Writes OUTDIR/tunneld.8, OUTDIR/tunneld.bash and OUTDIR/_tunneld. The installer's system mode and
tools/build-deb.sh run it; generated from the parser, the pages cannot drift from the options.
"""

from __future__ import annotations

import sys
from pathlib import Path

import shtab
from argparse_manpage.manpage import Manpage

from tunneld import __version__
from tunneld.cli import build_parser

DESCRIPTION = "Back to My Mac for Linux: stable IPv6 addresses and tunnels between an account's devices"

FILES = r""".TP
.I /etc/tunneld/tunneld.toml
The configuration, written by \fBtunneld join\fR.
.TP
.I /etc/tunneld/secret
The account secret (mode 0600), handed to the services as a systemd credential.
.TP
.I /etc/tunneld/dns.env
The zone and listen address of \fBtunneld\-dns.service\fR.
.TP
.I /var/lib/tunneld
The device key.
.TP
.I /run/tunneld/control.sock
The control socket of \fBtunneld status\fR, \fBping\fR and \fBrebind\fR."""

SEE_ALSO = r"""\fBsystemctl\fR(1), \fBjournalctl\fR(1), \fBsystemd.exec\fR(5)
.PP
The units \fBtunneld.service\fR (\fBtunneld up\fR) and \fBtunneld\-dns.service\fR
(\fBtunneld serve\-dns\fR)."""


def man_page() -> str:
    parser = build_parser()
    page = Manpage(parser, _data={"project_name": "tunneld", "version": __version__,
                                  "manual_title": "System Administration", "manual_section": 8,
                                  "description": DESCRIPTION})
    page.add_section("files", ">", FILES)
    page.add_section("see also", ">", SEE_ALSO)
    return str(page)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tools/dist_files.py OUTDIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    (out / "tunneld.8").write_text(man_page(), encoding="utf-8")
    (out / "tunneld.bash").write_text(shtab.complete(build_parser(), shell="bash"), encoding="utf-8")
    (out / "_tunneld").write_text(shtab.complete(build_parser(), shell="zsh"), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
