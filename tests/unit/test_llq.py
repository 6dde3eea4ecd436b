"""LLQ (RFC 8764) option and sans-I/O client.

Vectors: an option built by hand from the RFC 8764 §3.2 layout, and the LLQ option data of BIND's
digdelv; the server side is built with dnspython."""

from __future__ import annotations

import base64
import itertools
import random
import time

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from tests.unit.dns_steps import SERVER, ClientView, llq_client
from tunneld.proto.errors import ParseError
from tunneld.proto.llq import (
    LLQ_POLL_INTERVAL,
    Added,
    Established,
    Failed,
    Fallback,
    LLQState,
    Refreshed,
    Removed,
)
from tunneld.proto.llq_wire import (
    LLQ_ERR_NO_SUCH_LLQ,
    LLQ_ERR_SERV_FULL,
    LLQ_OP_EVENT,
    LLQ_OP_REFRESH,
    LLQ_OP_SETUP,
    LLQ_REMOVE_TTL,
    LLQOption,
    find_llq_option,
    parse_llq_option,
    parse_message,
)
from tunneld.proto.tsig import TsigKey, TsigSession

QNAME = "_autotunnel._udp.bob.members.example."
RDTYPE = "SRV"
SERVER_ID = 0x0123456789ABCDEF
SETUP_OPTION_HEX = "00010012000100010000000000000000000000001c20"  # RFC 8764 §3.2 layout, by hand
SETUP_OPT_RR_HEX = "00002905a000000000001600010012000100010000000000000000000000001c20"  # in an OPT RR
BIND_LLQ_DATA_HEX = "0001000200001234567812345678fefefefe"  # BIND digdelv


def srv(target: str, port: int = 4500, ttl: int = 300, name: str = QNAME) -> dns.rrset.RRset:
    return dns.rrset.from_text(name, ttl, "IN", "SRV", f"0 0 {port} {target}")


def make_client(lease: int = 7200, seed: int = 1) -> ClientView:
    return llq_client(QNAME, RDTYPE, rand=random.Random(seed).randbytes, lease=lease)


def reply(query_wire: bytes, option: LLQOption | None = None, answers: tuple[dns.rrset.RRset, ...] = (),
          rcode: dns.rcode.Rcode = dns.rcode.NOERROR, msg_id: int | None = None) -> bytes:
    """A server response to ``query_wire`` (same message ID unless ``msg_id``)."""
    query = dns.message.from_wire(query_wire)
    response = dns.message.make_response(query)
    response.use_edns(False)
    if option is not None:
        response.use_edns(0, payload=1440, options=[option])
    response.set_rcode(rcode)
    for rrset in answers:
        response.answer.append(rrset)
    if msg_id is not None:
        response.id = msg_id
    return response.to_wire()


def event(llq_id: int, msg_id: int, answers: tuple[dns.rrset.RRset, ...], lease: int = 3000) -> bytes:
    msg = dns.message.Message(id=msg_id)
    msg.flags = dns.flags.QR | dns.flags.AA
    msg.find_rrset(msg.question, dns.name.from_text(QNAME), dns.rdataclass.IN, dns.rdatatype.SRV, create=True,
                   force_unique=True)
    msg.use_edns(0, payload=1440, options=[LLQOption(1, LLQ_OP_EVENT, 0, llq_id, lease)])
    for rrset in answers:
        msg.answer.append(rrset)
    return msg.to_wire()


def state(client: ClientView) -> LLQState:
    """The client's state (a call, so mypy does not narrow it across calls)."""
    return client.state


def llq_of(wire: bytes) -> LLQOption | None:
    return find_llq_option(dns.message.from_wire(wire))


def establish(client: ClientView, answers: tuple[dns.rrset.RRset, ...] = (), lease: int = 7200,
              now: float = 0.0) -> list[object]:
    setup = client.start(now).wire
    challenge = reply(setup, LLQOption(1, LLQ_OP_SETUP, 0, SERVER_ID, lease))
    out = client.receive(challenge, now + 0.1)
    assert len(out.transmits) == 1
    ack = reply(out.transmits[0].wire, LLQOption(1, LLQ_OP_SETUP, 0, SERVER_ID, lease), answers)
    out = client.receive(ack, now + 0.2)
    assert state(client) == LLQState.ESTABLISHED
    assert out.transmits == []
    return list(out.events)


# -- the option --------------------------------------------------------------------------------------------


def test_option_setup_vector_both_ways() -> None:
    option = LLQOption(1, LLQ_OP_SETUP, 0, 0, 7200)
    data = bytes.fromhex(SETUP_OPTION_HEX)
    assert data[:4] == bytes.fromhex("00010012")  # code 1, length 18
    assert option.to_wire() == data[4:]
    assert option.to_bytes() == data[4:]
    parsed = parse_llq_option(data[4:])
    assert (parsed.version, parsed.opcode, parsed.error, parsed.llq_id, parsed.lease) == (1, 1, 0, 0, 7200)
    assert parsed == option


def test_option_inside_opt_rr_vector_both_ways() -> None:
    query = dns.message.make_query(QNAME, RDTYPE, id=0x1234, flags=0, use_edns=0, payload=1440,
                                   options=[LLQOption(1, LLQ_OP_SETUP, 0, 0, 7200)])
    wire = query.to_wire()
    assert wire.endswith(bytes.fromhex(SETUP_OPT_RR_HEX))
    parsed = dns.message.from_wire(wire)
    assert parsed.payload == 1440
    option = find_llq_option(parsed)
    assert isinstance(option, LLQOption)
    assert option.to_wire() == bytes.fromhex(SETUP_OPTION_HEX)[4:]


def test_option_bind_digdelv_vector_both_ways() -> None:
    data = bytes.fromhex(BIND_LLQ_DATA_HEX)
    option = parse_llq_option(data)
    assert option.version == 1
    assert option.opcode == LLQ_OP_REFRESH
    assert option.error == 0
    assert option.llq_id == 0x1234567812345678
    assert option.lease == 4278124286
    assert LLQOption(1, 2, 0, 0x1234567812345678, 4278124286).to_wire() == data
    # And through dnspython's generic path (registered for code 1).
    parsed = dns.edns.option_from_wire(dns.edns.OptionType.make(1), data, 0, len(data))
    assert isinstance(parsed, LLQOption) and parsed == option


@pytest.mark.parametrize("length", [0, 16, 17, 19, 22])
def test_option_wrong_length_is_parse_error(length: int) -> None:
    with pytest.raises(ParseError):
        parse_llq_option(bytes(length))
    bogus = dns.edns.GenericOption(dns.edns.OptionType.make(1), bytes(length))
    query = dns.message.make_query(QNAME, RDTYPE, use_edns=0, options=[bogus])
    with pytest.raises(ParseError):
        parse_message(query.to_wire())


def test_option_field_ranges() -> None:
    with pytest.raises(ValueError):
        LLQOption(lease=1 << 32)
    with pytest.raises(ValueError):
        LLQOption(llq_id=-1)


# -- handshake ---------------------------------------------------------------------------------------------


def test_four_way_handshake() -> None:
    client = make_client()
    setup = dns.message.from_wire(client.start(0.0).wire)
    assert not setup.flags & dns.flags.QR and setup.opcode() == 0
    assert setup.question[0].name == dns.name.from_text(QNAME)
    assert setup.question[0].rdtype == dns.rdatatype.SRV
    assert setup.payload == 1232  # DNS Flag Day 2020, not Apple's 1440
    opt = find_llq_option(setup)
    assert opt is not None
    assert (opt.version, opt.opcode, opt.error, opt.llq_id, opt.lease) == (1, 1, 0, 0, 7200)

    # Step 2: challenge, same message ID, no answers, server ID and a granted (shorter) lease.
    out = client.receive(reply(setup.to_wire(), LLQOption(1, LLQ_OP_SETUP, 0, SERVER_ID, 3600)), 0.05)
    assert out.events == [] and client.records() == []
    assert state(client) == LLQState.CHALLENGE_SENT
    (challenge_response,) = out.transmits
    cr = dns.message.from_wire(challenge_response.wire)
    cr_opt = find_llq_option(cr)
    assert cr_opt is not None
    assert (cr_opt.opcode, cr_opt.error, cr_opt.llq_id, cr_opt.lease) == (LLQ_OP_SETUP, 0, SERVER_ID, 3600)
    assert cr.question == setup.question and not cr.flags & dns.flags.QR

    # Step 4: ACK + answers.
    answers = (srv("AutoTunnel-a.bob.members.example."),)
    out = client.receive(reply(challenge_response.wire, LLQOption(1, LLQ_OP_SETUP, 0, SERVER_ID, 3600),
                               answers), 0.1)
    assert out.transmits == []
    added = [e for e in out.events if isinstance(e, Added)]
    established = [e for e in out.events if isinstance(e, Established)]
    assert len(added) == 1 and added[0].rrset == answers[0]
    assert len(established) == 1
    assert established[0].llq_id == SERVER_ID and established[0].lease == 3600
    assert list(established[0].answers) == list(answers)
    assert client.records() == list(answers)
    assert state(client) == LLQState.ESTABLISHED


def test_challenge_and_ack_told_apart_by_state() -> None:
    client = make_client()
    setup = client.start(0.0).wire
    challenge = reply(setup, LLQOption(1, LLQ_OP_SETUP, 0, SERVER_ID, 7200))
    out = client.receive(challenge, 0.1)
    cr_wire = out.transmits[0].wire
    # The server re-sends the challenge (to a retransmitted SETUP request): not an ACK, nothing changes.
    out = client.receive(challenge, 0.2)
    assert out.events == [] and out.transmits == []
    assert state(client) == LLQState.CHALLENGE_SENT
    assert client.counters["duplicate challenge"] == 1
    # An ACK with an empty answer set is still the ACK (authoritative: the set is empty).
    out = client.receive(reply(cr_wire, LLQOption(1, LLQ_OP_SETUP, 0, SERVER_ID, 7200)), 0.3)
    assert [type(e) for e in out.events] == [Established]
    assert client.records() == []


def test_ack_for_other_llq_id_ignored() -> None:
    client = make_client()
    setup = client.start(0.0).wire
    cr = client.receive(reply(setup, LLQOption(1, LLQ_OP_SETUP, 0, SERVER_ID, 7200)), 0.1).transmits[0].wire
    out = client.receive(reply(cr, LLQOption(1, LLQ_OP_SETUP, 0, SERVER_ID + 1, 7200), (srv("x."),)), 0.2)
    assert out.events == [] and client.state == LLQState.CHALLENGE_SENT
    assert client.counters["ACK for another LLQ-ID"] == 1


def test_new_ack_replaces_cache() -> None:
    client = make_client()
    old = srv("old.example.")
    kept = srv("kept.example.", port=1)
    establish(client, (old, kept))
    # The LLQ is lost; the new handshake's ACK is authoritative and flushes the stale record.
    now = client.deadline()
    assert now is not None
    refresh = client.poll(now).transmits[0].wire
    out = client.receive(reply(refresh, LLQOption(1, LLQ_OP_REFRESH, LLQ_ERR_NO_SUCH_LLQ, SERVER_ID, 0)), now)
    setup = out.transmits[0].wire
    new = srv("new.example.", port=2)
    cr = client.receive(reply(setup, LLQOption(1, LLQ_OP_SETUP, 0, SERVER_ID + 7, 7200)), now).transmits[0]
    out = client.receive(reply(cr.wire, LLQOption(1, LLQ_OP_SETUP, 0, SERVER_ID + 7, 7200), (kept, new)), now)
    removed = [e.rrset for e in out.events if isinstance(e, Removed)]
    added = [e.rrset for e in out.events if isinstance(e, Added)]
    assert [r[0].target.to_text() for r in removed] == ["old.example."]
    assert [r[0].target.to_text() for r in added] == ["new.example."]
    targets = sorted(rd.target.to_text() for rrset in client.records() for rd in rrset)
    assert targets == ["kept.example.", "new.example."]


# -- events ------------------------------------------------------------------------------------------------


def test_event_added_and_removed_with_ack() -> None:
    client = make_client()
    a = srv("a.example.")
    establish(client, (a,))
    b = srv("b.example.", port=4501)
    gone = srv("a.example.", ttl=LLQ_REMOVE_TTL)
    wire = event(SERVER_ID, 0xBEEF, (b, gone))
    out = client.receive(wire, 10.0)
    assert [type(e) for e in out.events] == [Removed, Added]
    removed, added = out.events
    assert isinstance(removed, Removed) and removed.rrset[0].target.to_text() == "a.example."
    assert isinstance(added, Added) and added.rrset[0].target.to_text() == "b.example."
    assert added.rrset.ttl == 300
    assert [rd.target.to_text() for rrset in client.records() for rd in rrset] == ["b.example."]
    (ack,) = out.transmits
    ack_msg = dns.message.from_wire(ack.wire)
    assert ack_msg.id == 0xBEEF
    assert ack_msg.flags & dns.flags.QR
    assert ack_msg.question[0].name == dns.name.from_text(QNAME)
    assert ack_msg.answer == []
    opt = find_llq_option(ack_msg)
    assert opt is not None and (opt.version, opt.opcode, opt.error, opt.llq_id, opt.lease) == (
        1, LLQ_OP_EVENT, 0, SERVER_ID, 3000)


def test_duplicate_event_acked_again_without_events() -> None:
    client = make_client()
    establish(client)
    wire = event(SERVER_ID, 0x0101, (srv("b.example."),))
    first = client.receive(wire, 1.0)
    assert [type(e) for e in first.events] == [Added]
    again = client.receive(wire, 3.0)
    assert again.events == []
    assert len(again.transmits) == 1
    assert dns.message.from_wire(again.transmits[0].wire).id == 0x0101
    assert client.counters["duplicate or no-op event"] == 1
    assert len(client.records()) == 1


def test_event_matched_on_llq_id_not_message_id() -> None:
    client = make_client()
    establish(client)
    # Another LLQ's event, even with the message ID of our own last request: ignored, not acked.
    out = client.receive(event(SERVER_ID + 1, 0x0202, (srv("c.example."),)), 1.0)
    assert out.events == [] and out.transmits == []
    assert client.counters["event for another LLQ-ID"] == 1
    assert client.records() == []
    # Ours with any message ID is accepted.
    out = client.receive(event(SERVER_ID, 0xFFFF, (srv("c.example."),)), 1.0)
    assert [type(e) for e in out.events] == [Added]


def test_removal_of_unknown_record_is_noop() -> None:
    client = make_client()
    establish(client)
    out = client.receive(event(SERVER_ID, 7, (srv("x.example.", ttl=LLQ_REMOVE_TTL),)), 1.0)
    assert out.events == [] and len(out.transmits) == 1


# -- refresh -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_refresh_at_about_half_the_lease(seed: int) -> None:
    client = make_client(seed=seed)
    establish(client, lease=3600, now=100.0)
    due = client.deadline()
    assert due is not None
    assert 100.2 + 0.5 * 3600 <= due <= 100.2 + 0.6 * 3600
    assert client.poll(due - 1).transmits == []
    (refresh,) = client.poll(due).transmits
    msg = dns.message.from_wire(refresh.wire)
    opt = find_llq_option(msg)
    assert opt is not None and (opt.opcode, opt.llq_id, opt.lease) == (LLQ_OP_REFRESH, SERVER_ID, 3600)
    out = client.receive(reply(refresh.wire, LLQOption(1, LLQ_OP_REFRESH, 0, SERVER_ID, 3500)), due + 0.1)
    assert out.events == [Refreshed(3500)]
    nxt = client.deadline()
    assert nxt is not None and due + 0.1 + 0.5 * 3500 <= nxt <= due + 0.1 + 0.6 * 3500


def test_refresh_no_such_llq_resets_up() -> None:
    client = make_client()
    establish(client, (srv("a.example."),))
    due = client.deadline()
    assert due is not None
    (refresh,) = client.poll(due).transmits
    out = client.receive(reply(refresh.wire, LLQOption(1, LLQ_OP_REFRESH, LLQ_ERR_NO_SUCH_LLQ, SERVER_ID, 0)),
                         due)
    assert len(out.events) == 1 and isinstance(out.events[0], Failed)
    assert "NO-SUCH-LLQ" in out.events[0].reason
    (setup,) = out.transmits
    opt = llq_of(setup.wire)
    assert opt is not None and (opt.opcode, opt.llq_id, opt.lease) == (LLQ_OP_SETUP, 0, 7200)
    assert state(client) == LLQState.SETUP_SENT
    assert len(client.records()) == 1  # kept until the new ACK says otherwise


def test_unanswered_refreshes_reset_up() -> None:
    client = make_client()
    establish(client)
    due = client.deadline()
    assert due is not None
    sent = [client.poll(due).transmits[0].wire]
    sent += [t.wire for t in client.poll(due + 2).transmits]
    sent += [t.wire for t in client.poll(due + 6).transmits]
    assert len(sent) == 3 and len(set(sent)) == 1
    out = client.poll(due + 14)
    assert [type(e) for e in out.events] == [Failed]
    opt = llq_of(out.transmits[0].wire)
    assert opt is not None and opt.opcode == LLQ_OP_SETUP and opt.llq_id == 0


def test_stop_cancels_with_lease_zero() -> None:
    client = make_client()
    establish(client)
    (cancel,) = client.stop(5.0)
    opt = llq_of(cancel.wire)
    assert opt is not None and (opt.opcode, opt.llq_id, opt.lease) == (LLQ_OP_REFRESH, SERVER_ID, 0)
    assert client.deadline() is None
    assert client.receive(event(SERVER_ID, 1, (srv("a."),)), 6.0).events == []


# -- retransmission and fallback ---------------------------------------------------------------------------


def test_retransmission_schedule_and_fallback() -> None:
    client = make_client()
    first = client.start(0.0).wire
    assert client.deadline() == 2.0
    assert client.poll(1.99).transmits == []
    (second,) = client.poll(2.0).transmits
    assert second.wire == first  # same message, same ID
    assert client.deadline() == 6.0  # >= 4 s before the second retransmission
    assert client.poll(5.9).transmits == []
    (third,) = client.poll(6.0).transmits
    assert third.wire == first
    assert client.deadline() == 14.0  # listen 8 s after the third
    assert client.poll(13.9) == ([], [])
    out = client.poll(14.0)
    assert len(out.events) == 1 and isinstance(out.events[0], Fallback)
    assert out.events[0].poll_interval == LLQ_POLL_INTERVAL == 900.0
    assert state(client) == LLQState.POLLING
    (plain,) = out.transmits
    assert llq_of(plain.wire) is None  # polling uses ordinary queries
    # Polls every 15 min, no retransmission; setup re-tried after an hour, not sooner.
    assert client.deadline() == 14.0 + 900
    answers = (srv("p.example."),)
    out = client.receive(reply(plain.wire, None, answers), 15.0)
    assert [type(e) for e in out.events] == [Added]
    polls = []
    while True:
        due = client.deadline()
        assert due is not None
        txs = client.poll(due).transmits
        assert len(txs) == 1
        if llq_of(txs[0].wire) is not None:
            break
        polls.append(due)
    assert polls == [14.0 + 900, 14.0 + 1800, 14.0 + 2700]
    assert due == 14.0 + 3600
    assert state(client) == LLQState.SETUP_SENT


def test_setup_retried_once_per_hour() -> None:
    client = make_client()
    client.start(0.0)
    for t in (2.0, 6.0, 14.0):
        client.poll(t)
    assert state(client) == LLQState.POLLING
    sent_setup_at: list[float] = []
    seen: set[bytes] = set()
    t = 14.0
    while t < 14.0 + 2 * 3600 + 100:
        due = client.deadline()
        assert due is not None
        t = due
        for tx in client.poll(t).transmits:
            opt = llq_of(tx.wire)
            if opt is not None and opt.opcode == LLQ_OP_SETUP and tx.wire not in seen:
                seen.add(tx.wire)
                sent_setup_at.append(t)
    # Each setup retry is retransmitted at +2/+6 and given up at +14 (same wire, recorded once per retry).
    assert sent_setup_at, "setup was never retried"
    assert sent_setup_at[0] == pytest.approx(14.0 + 3600)
    assert len(sent_setup_at) == 2
    assert all(b - a >= 3600 for a, b in itertools.pairwise(sent_setup_at))


def test_server_without_llq_falls_back() -> None:
    client = make_client()
    setup = client.start(0.0).wire
    answers = (srv("plain.example."),)
    out = client.receive(reply(setup, None, answers), 0.1)
    kinds = [type(e) for e in out.events]
    assert kinds == [Added, Fallback]
    fb = out.events[1]
    assert isinstance(fb, Fallback) and fb.poll_interval == 900.0
    assert out.transmits == []  # the answer is the first poll result
    assert client.records() == list(answers)
    assert client.deadline() == pytest.approx(0.1 + 900)
    # A poll answer that drops the record removes it.
    (poll,) = client.poll(0.1 + 900).transmits
    out = client.receive(reply(poll.wire, None, (), rcode=dns.rcode.NXDOMAIN), 901.0)
    assert [type(e) for e in out.events] == [Removed]
    assert client.records() == []


def test_challenge_with_error_falls_back() -> None:
    client = make_client()
    setup = client.start(0.0).wire
    out = client.receive(reply(setup, LLQOption(1, LLQ_OP_SETUP, LLQ_ERR_SERV_FULL, SERVER_ID, 0)), 0.1)
    assert [type(e) for e in out.events] == [Fallback]
    assert "SERV-FULL" in out.events[0].reason  # type: ignore[union-attr]
    assert state(client) == LLQState.POLLING
    assert len(out.transmits) == 1 and llq_of(out.transmits[0].wire) is None


def test_refused_setup_falls_back() -> None:
    client = make_client()
    setup = client.start(0.0).wire
    out = client.receive(reply(setup, None, (), rcode=dns.rcode.REFUSED), 0.1)
    assert [type(e) for e in out.events] == [Fallback]


# -- robustness --------------------------------------------------------------------------------------------


def test_garbage_and_truncated_are_counted_not_raised() -> None:
    client = make_client()
    setup = client.start(0.0).wire
    good = reply(setup, LLQOption(1, LLQ_OP_SETUP, 0, SERVER_ID, 7200), (srv("a.example."),))
    rng = random.Random(7)
    inputs = [b"", b"\x00", bytes(11), bytes(12) + b"\xff", b"\xff" * 40, good[:-1], good[:-18], good[:20]]
    inputs += [rng.randbytes(rng.randrange(0, 120)) for _ in range(300)]
    inputs += [bytes(b ^ (1 << rng.randrange(8)) if i == pos else b for i, b in enumerate(good))
               for pos in range(len(good)) for _ in range(1)]
    for data in inputs:
        client.receive(data, 0.5)  # must not raise
    assert sum(v for k, v in client.counters.items() if k.startswith("parse error")) > 0
    # A bad LLQ option length inside an otherwise valid response.
    bad = dns.message.from_wire(setup)
    resp = dns.message.make_response(bad)
    resp.use_edns(0, payload=1440, options=[dns.edns.GenericOption(dns.edns.OptionType.make(1), bytes(16))])
    before = client.counters["parse error: malformed DNS message"]
    client.receive(resp.to_wire(), 0.6)
    assert client.counters["parse error: malformed DNS message"] == before + 1


def test_wrong_question_and_not_response_ignored() -> None:
    client = make_client()
    setup = client.start(0.0).wire
    assert client.receive(setup, 0.1).events == []  # a query, not a response
    assert client.counters["not a query response"] == 1
    other = dns.message.make_query("other.example.", "SRV", id=dns.message.from_wire(setup).id)
    resp = dns.message.make_response(other)
    resp.use_edns(0, payload=1440, options=[LLQOption(1, LLQ_OP_SETUP, 0, SERVER_ID, 7200)])
    assert client.receive(resp.to_wire(), 0.1) == ([], [])
    assert client.counters["other question"] == 1
    assert state(client) == LLQState.SETUP_SENT


def test_tsig_session_signs_requests_and_verifies_replies() -> None:
    """Requests are signed at ``now``; a reply is verified over its request's MAC before it is parsed,
    and refused (counted) when it does not verify. dnspython is the independent other side."""
    import dns.tsigkeyring

    keyring = dns.tsigkeyring.from_text({"llq-key.": "NoTCJU+DMqFWywaPyxSijrDEA/eC3nK0xi3AMEZuPVk="})
    key = TsigKey(dns.name.from_text("llq-key."),
                  base64.b64decode("NoTCJU+DMqFWywaPyxSijrDEA/eC3nK0xi3AMEZuPVk="))
    now = time.time()  # dnspython checks the time against its own clock
    client = llq_client(QNAME, RDTYPE, rand=random.Random(4).randbytes, tsig=TsigSession(key))
    setup = client.start(now).wire
    query = dns.message.from_wire(setup, keyring=keyring)
    assert query.had_tsig
    response = dns.message.make_response(query)  # signed with the request MAC, as a server does
    response.use_edns(0, payload=1440, options=[LLQOption(1, LLQ_OP_SETUP, 0, SERVER_ID, 7200)])
    wire = response.to_wire()
    tampered = wire[:-1] + bytes([wire[-1] ^ 1])
    assert client.receive(tampered, now + 0.1) == ([], [])
    assert client.counters["tsig rejected"] == 1
    assert client.receive(wire, now + 400) == ([], [])  # outside the fudge of our clock
    assert client.counters["tsig rejected"] == 2
    out = client.receive(wire, now + 0.1)
    assert state(client) == LLQState.CHALLENGE_SENT
    assert dns.message.from_wire(out.transmits[0].wire, keyring=keyring).had_tsig


def test_datagrams_from_anywhere_but_the_server_are_dropped() -> None:
    """A reply must come from where the request went: the same challenge from another address or port
    changes nothing; from the server (its address written another way too) it is taken."""
    client = make_client()
    setup = client.start(0.0).wire
    challenge = reply(setup, LLQOption(1, LLQ_OP_SETUP, 0, SERVER_ID, 7200))
    host, port = SERVER
    for source in (("203.0.113.1", port), (host, port + 1)):
        assert client.receive(challenge, 0.1, source=source) == ([], [])
    assert client.counters["not from the server"] == 2 and state(client) == LLQState.SETUP_SENT
    out = client.receive(challenge, 0.1, source=(f"::ffff:{host}", port))
    assert len(out.transmits) == 1 and state(client) == LLQState.CHALLENGE_SENT
