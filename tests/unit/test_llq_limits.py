"""The LLQ server under hostile traffic: replayed signed requests, half-open LLQs that never complete, one
source or one key trying to take the table, and unsigned acks (as Apple's mDNSResponder sends them)."""

from __future__ import annotations

import random

import dns.message

from tests.unit.dns_steps import llq_client
from tests.unit.test_llq_server import (
    CSRC,
    QNAME,
    T0,
    Hooks,
    establish,
    make,
    make_client,
    option_of,
    send,
    update,
)
from tunneld.proto.llq_wire import LLQ_ERR_NO_ERROR, LLQ_ERR_SERV_FULL, LLQ_OP_SETUP

ATTACKER = "203.0.113.66"


def test_a_captured_setup_replayed_from_1250_ports_is_one_llq() -> None:
    """The issue: one captured signed SETUP replayed from 1,250 source ports filled the 1,000-entry table
    with half-open LLQs, and new devices got SERV-FULL."""
    server = make(require_tsig=True, max_llqs=1000)
    captured = make_client(tsig=Hooks()).start(T0).wire
    [challenge] = send(server, captured, T0)  # the device's own setup, seen on the wire
    replies = []
    for port in range(1250):
        replies += send(server, captured, T0 + 1, src=(ATTACKER, 10000 + port))
    assert replies == []  # a replay from another port is not a new LLQ, and draws no answer
    assert len(server.llq_ids()) == 1
    assert server.counters["replayed request"] == 1250
    # the device's own retransmission (same source) still gets the same answer, byte for byte
    assert send(server, captured, T0 + 2) == [challenge]
    # and a new device still gets its LLQ
    newcomer = llq_client("_autotunnel._udp.carol.example.com.", "SRV", rand=random.Random(9).randbytes,
                          tsig=Hooks())
    [reply] = send(server, newcomer.start(T0 + 3).wire, T0 + 3, src=("192.0.2.77", 5353))
    assert option_of(reply).error == LLQ_ERR_NO_ERROR and option_of(reply).llq_id != 0
