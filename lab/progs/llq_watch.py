"""Watch one name by DNS long-lived query and print each event as a JSON line (for the LLQ tests).

  python -m lab.progs.llq_watch SERVER PORT ZONE QNAME RDTYPE SECRET_FILE SECONDS

Runs our LLQClient over a UDP socket, signing with the account's TSIG key (as tunneld will); prints
{"event": "established"|"added"|"removed"|..., "t": seconds since start, "records": [...]}.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import dns.message
import dns.name
import dns.rdatatype
import dns.tsig
import dns.tsigkeyring

from crypto.kdf import derive_tsig_key
from lab.progs import report
from tunneld.config import load_account_secret
from tunneld.proto import llq
from tunneld.services.watcher import AccountTsig


def main() -> int:
    server, port, zone, qname, rdtype, secret_file, seconds = sys.argv[1:8]
    secret = load_account_secret(secret_file)  # type: ignore[arg-type]
    client = llq.LLQClient(dns.name.from_text(qname), dns.rdatatype.from_text(rdtype), rand=os.urandom,
                           tsig=AccountTsig(zone, derive_tsig_key(secret, zone)))
    t0 = time.monotonic()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dest = (server, int(port))
    sock.sendto(client.start(0.0).wire, dest)
    end = t0 + float(seconds)
    while (now := time.monotonic()) < end:
        deadline = client.deadline()
        wait = min(end - now, (t0 + deadline - now) if deadline is not None else end - now)
        sock.settimeout(max(wait, 0.01))
        try:
            wire, _ = sock.recvfrom(65535)
            out = client.receive(wire, time.monotonic() - t0)
        except TimeoutError:
            out = client.poll(time.monotonic() - t0)
        for tx in out.transmits:
            sock.sendto(tx.wire, dest)
        for ev in out.events:
            recs = [r.to_text() for r in getattr(ev, "answers", ())] + \
                ([ev.rrset.to_text()] if hasattr(ev, "rrset") else [])
            report({"event": type(ev).__name__.lower(), "t": time.monotonic() - t0, "records": recs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
