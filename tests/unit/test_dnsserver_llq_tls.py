"""LLQ set up over the TLS listener, as Apple's clients do it (dnsextd's `_dns-llq-tls._tcp`): the SETUP and
its challenge response go over TLS with the UDP port for the events in the LLQ-ERROR field; the handshake's
replies come back on the connection and the events go over UDP to the connection's own address at that
port. A SETUP over TLS that names no port is answered as the plain query it also is."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import trio

from tests.unit.test_dnsserver_push_tls import BOB, KEY, NAME, SECRET, Client, client_ctx, connect, update_udp
from tests.unit.test_dnsserver_tcp import DOMAIN, free_port, make_core
from tunneld.dnsserver.llq import LLQServer
from tunneld.dnsserver.serve import llq_event_port, serve
from tunneld.dnsserver.tls import server_context
from tunneld.proto.errors import ParseError
from tunneld.proto.llq_wire import LLQ_OP_EVENT, LLQ_OP_SETUP, LLQOption, find_llq_option

KEYRING = {KEY.name: KEY}


async def serve_with_llq(nursery: trio.Nursery) -> tuple[int, int]:
    ctx = server_context(SECRET, DOMAIN, [NAME], int(time.time()))
    for _ in range(5):
        port, tls_port = free_port(), free_port()
        core = make_core()
        try:
            await nursery.start(functools.partial(serve, core, "127.0.0.1", port, llq=LLQServer(core),
                                                  tls=("127.0.0.1", tls_port, ctx)))
        except OSError:
            continue
        return port, tls_port
    raise AssertionError("could not bind")


async def exchange(c: Client, option: LLQOption) -> tuple[dns.message.Message, LLQOption | None]:
    """A signed LLQ request for BOB A over the connection, and its verified reply."""
    query = dns.message.make_query(BOB, dns.rdatatype.A, use_edns=0, options=[option])
    query.use_tsig(KEYRING, KEY.name)
    await c.send(query.to_wire())
    wire = await c.receive()
    assert wire is not None
    reply = dns.message.from_wire(wire, keyring=KEYRING, request_mac=query.mac)
    return reply, find_llq_option(reply)


def test_an_llq_set_up_over_tls_sends_its_events_over_udp_to_the_port_it_named(tmp_path: Path) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port, tls_port = await serve_with_llq(nursery)
            events = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
            await events.bind(("127.0.0.1", 0))
            events_port = events.getsockname()[1]
            c = await connect(tls_port, client_ctx(tmp_path, device=None))
            _, challenge = await exchange(c, LLQOption(opcode=LLQ_OP_SETUP, error=events_port, lease=3600))
            assert challenge is not None and challenge.llq_id != 0
            ack, granted = await exchange(c, LLQOption(opcode=LLQ_OP_SETUP, error=events_port,
                                                       llq_id=challenge.llq_id, lease=challenge.lease))
            assert granted is not None and granted.llq_id == challenge.llq_id and ack.flags & dns.flags.QR
            await update_udp(port, add="192.0.2.7")
            with trio.fail_after(5):
                wire, src = await events.recvfrom(65535)
            assert src[1] == port  # from the server's UDP socket
            event = dns.message.from_wire(wire, keyring=KEYRING)  # signed with the account key
            option = find_llq_option(event)
            assert option is not None and option.opcode == LLQ_OP_EVENT and option.llq_id == challenge.llq_id
            assert [r.to_text() for rrset in event.answer for r in rrset] == ["192.0.2.7"]
            events.close()
            await trio.aclose_forcefully(c.stream)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_setup_over_tls_without_a_port_is_answered_as_a_query(tmp_path: Path) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            _, tls_port = await serve_with_llq(nursery)
            c = await connect(tls_port, client_ctx(tmp_path, device=None))
            reply, option = await exchange(c, LLQOption(opcode=LLQ_OP_SETUP, error=0, lease=3600))
            # the ordinary signed answer (bob has no records yet), without an LLQ option
            assert option is None and reply.had_tsig and reply.rcode() == dns.rcode.NXDOMAIN
            await trio.aclose_forcefully(c.stream)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_the_event_port_comes_only_from_a_request_over_a_connection() -> None:
    query = dns.message.make_query(BOB, dns.rdatatype.A, use_edns=0,
                                   options=[LLQOption(opcode=LLQ_OP_SETUP, error=5000, lease=3600)])
    assert llq_event_port(query, ("192.0.2.9", 40000)) == ("192.0.2.9", 5000)
    assert llq_event_port(query, "not a socket address") is None
    assert llq_event_port(ParseError("truncated"), ("192.0.2.9", 40000)) is None
    query.flags |= dns.flags.QR  # an acknowledgement, not a request
    assert llq_event_port(query, ("192.0.2.9", 40000)) is None
