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

import dns.name
import dns.rdatatype

from lab.progs import report
from tunneld.config import load_account_secret
from tunneld.crypto.kdf import derive_tsig_key
from tunneld.proto import llq
from tunneld.proto.tsig import TsigKey, TsigSession


def main() -> int:
    server, port, zone, qname, rdtype, secret_file, seconds = sys.argv[1:8]
    secret = load_account_secret(secret_file)  # type: ignore[arg-type]
    dest = (server, int(port))
    client = llq.LLQClient(dns.name.from_text(qname), dns.rdatatype.from_text(rdtype), server=dest,
                           rand=os.urandom,
                           tsig=TsigSession(TsigKey(dns.name.from_text(zone), derive_tsig_key(secret, zone))))
    t0 = time.time()  # the client signs with Unix time: it runs on the wall clock
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.start(t0)
    end = t0 + float(seconds)
    while (now := time.time()) < end:
        for tx in client.transmits():
            sock.sendto(tx.payload, tx.destination)
        deadline = client.deadline()
        wait = min(end - now, (deadline - now) if deadline is not None else end - now)
        sock.settimeout(max(wait, 0.01))
        try:
            wire, source = sock.recvfrom(65535)
            client.receive(wire, source[:2], time.time())
        except TimeoutError:
            client.poll(time.time())
        for tx in client.transmits():
            sock.sendto(tx.payload, tx.destination)
        for ev in client.events():
            recs = [r.to_text() for r in getattr(ev, "answers", ())] + \
                ([ev.rrset.to_text()] if hasattr(ev, "rrset") else [])
            report({"event": type(ev).__name__.lower(), "t": time.time() - t0, "records": recs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
