"""The primary's NOTIFY (RFC 1996) to the rendezvous front, and the front's SOA query that checks the serial.

The primary tells the front that the zone changed with a NOTIFY (``also-notify``); the front answers it and
fetches the change (:mod:`tunneld.proto.xfr`). A NOTIFY can be lost, so the front also asks the primary for
the zone's SOA every so often and compares serials. Both dialogues are signed with the front key (TSIG,
RFC 8945). Sans-I/O: :func:`read_notify` recognises a NOTIFY for our zone or raises
:class:`~tunneld.proto.errors.ParseError` (nothing else; a NOTIFY that fails is dropped unanswered: the
primary repeats it, and the serial check catches up), :func:`notify_response` builds the signed answer,
:func:`soa_query` and :func:`read_soa_answer` the serial check. docs/protocol.md, "Zone transfers and NOTIFY".
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rdataclass
import dns.rdatatype

from tunneld.proto.dnsguard import ANSWER, AUTHORITY, Record, check
from tunneld.proto.dnswire import SOA_NUMBERS, extended_rcode, question, read_name, soa_numbers
from tunneld.proto.errors import ParseError
from tunneld.proto.tsig import TsigError, TsigKey, TsigRecord, find_tsig, sign, verify

__all__ = [
    "MAX_NOTIFY",
    "MAX_SOA_ANSWER",
    "OPCODE_NOTIFY",
    "Notify",
    "SoaQuery",
    "notify_response",
    "read_notify",
    "read_soa_answer",
    "signed_answer",
    "signed_question",
    "soa_query",
]

OPCODE_NOTIFY: Final = 4  # RFC 1996 §3.1 (IANA DNS OpCodes: 4 = NOTIFY)
MAX_NOTIFY: Final = 1232
"""Bytes of a NOTIFY we read: one question, at most one SOA and a TSIG come to under 1,100 bytes even with
every name at its 255-byte limit (BIND's are about 200); the EDNS size of DNS Flag Day 2020."""
_HEADER: Final = struct.Struct("!HHHHHH")  # RFC 1035 §4.1.1
_COUNT: Final = struct.Struct("!H")
_TYPE_CLASS: Final = struct.Struct("!HH")
MAX_SOA_ANSWER: Final = 1232
"""Bytes of an answer to our SOA query: the question, one SOA and a TSIG (as :data:`MAX_NOTIFY`)."""


def _tsig(wire: bytes, records: list[Record], key: TsigKey, request_mac: bytes, now: float) -> TsigRecord:
    try:
        return verify(wire, key, request_mac, now, find_tsig(wire, records))
    except TsigError as e:
        raise ParseError(f"tsig: {e}") from None


def _question(wire: bytes, zone: dns.name.Name) -> None:
    """The message's one question is ``zone`` SOA IN (read in place: no dnspython parse of the message,
    which cost a NOTIFY some 0.2 ms, docs/perf-dns.md)."""
    if _COUNT.unpack_from(wire, 4)[0] != 1:
        raise ParseError("question count")
    if question(wire) != (zone, dns.rdatatype.SOA, dns.rdataclass.IN):
        raise ParseError("wrong question")


def _apex_soa(wire: bytes, records: list[Record], zone: dns.name.Name) -> int | None:
    """The serial of the answer section's one SOA of the zone; None for an empty answer. ParseError for
    an SOA whose RDATA is not two names and 20 octets (RFC 1035 §3.3.13)."""
    answers = [r for r in records if r.section == ANSWER]
    if not answers:
        return None
    if len(answers) != 1:
        raise ParseError("answer count")
    rr = answers[0]
    owner = read_name(wire, rr.offset)[0]
    if rr.rtype != dns.rdatatype.SOA or rr.rclass != dns.rdataclass.IN or owner != zone:
        raise ParseError("answer is not the zone's SOA")
    return int(SOA_NUMBERS.unpack_from(wire, soa_numbers(wire, rr))[0])


# -- NOTIFY ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Notify:
    """A checked NOTIFY for our zone: its ID, the serial of its SOA answer if it carried one (RFC 1996
    §3.7: a hint, to skip a transfer we need not make), and its TSIG MAC (the response is signed over it)."""

    msg_id: int
    zone: dns.name.Name
    serial: int | None
    mac: bytes


def read_notify(wire: bytes, zone: dns.name.Name, key: TsigKey, now: float) -> Notify:
    """A NOTIFY request (opcode 4, QR clear) for ``zone``: question ``zone`` SOA IN (RFC 1996 §3.7), an
    answer section empty or holding the zone's SOA, signed with ``key`` within its fudge of ``now``.
    ParseError for anything else, a NOTIFY's answer (QR set) included."""
    records = check(wire, max_size=MAX_NOTIFY, query=True)
    (flags,) = struct.unpack_from("!H", wire, 2)
    if flags & dns.flags.QR or dns.opcode.from_flags(flags) != OPCODE_NOTIFY:
        raise ParseError("not a NOTIFY")
    tsig = _tsig(wire, records, key, b"", now)
    if tsig.original_id != struct.unpack_from("!H", wire)[0]:  # the ID is outside the MAC (RFC 8945 §4.3.1)
        raise ParseError("original ID")
    _question(wire, zone)
    if any(r.section == AUTHORITY for r in records):
        raise ParseError("authority section")
    return Notify(tsig.original_id, zone, _apex_soa(wire, records, zone), tsig.mac)


def notify_response(notify: Notify, key: TsigKey, now: float) -> bytes:
    """The answer to a NOTIFY (RFC 1996 §4.7): its ID, QR and AA set, opcode NOTIFY, NOERROR, the question
    echoed and nothing else, signed with ``key`` over the NOTIFY's MAC."""
    flags = dns.flags.QR | dns.flags.AA | dns.opcode.to_flags(dns.opcode.Opcode(OPCODE_NOTIFY))
    header = _HEADER.pack(notify.msg_id, flags, 1, 0, 0, 0)
    name = notify.zone.to_wire()
    assert name is not None  # returned when no file is given
    question = name + _TYPE_CLASS.pack(dns.rdatatype.SOA, dns.rdataclass.IN)
    wire, _ = sign(header + question, key, int(now), notify.mac)
    return wire


# -- the serial check --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SoaQuery:
    """A signed SOA query: ``wire`` to send, its ID and MAC (the answer is verified over it), the zone."""

    wire: bytes
    msg_id: int
    mac: bytes
    zone: dns.name.Name


def signed_question(name: dns.name.Name, rdtype: int, key: TsigKey, msg_id: int,
                    now: float) -> tuple[bytes, bytes]:
    """The question ``name`` ``rdtype`` IN, without RD (an authority is asked), signed with ``key`` at
    ``now``: (wire, MAC); ``msg_id`` from the caller's randomness."""
    if not name.is_absolute():
        raise ValueError("name must be absolute")
    if not 0 <= msg_id <= 0xFFFF:
        raise ValueError("message ID out of range")
    msg = dns.message.Message(id=msg_id)
    msg.flags = dns.flags.Flag(0)
    msg.find_rrset(msg.question, name, dns.rdataclass.IN, dns.rdatatype.RdataType.make(rdtype), create=True)
    return sign(msg.to_wire(), key, int(now))


def signed_answer(wire: bytes, msg_id: int, request_mac: bytes, key: TsigKey, now: float,
                  max_size: int) -> tuple[list[Record], int]:
    """The checked records and the flags of an answer to our signed question ``msg_id``: the same ID, QR,
    opcode QUERY, signed with ``key`` over ``request_mac``. ParseError for anything else."""
    records = check(wire, max_size=max_size)
    got, flags = struct.unpack_from("!HH", wire)
    if got != msg_id:
        raise ParseError("message ID")
    _tsig(wire, records, key, request_mac, now)
    if not flags & dns.flags.QR or dns.opcode.from_flags(flags) != dns.opcode.QUERY:
        raise ParseError("not a query response")
    return records, flags


def soa_query(zone: dns.name.Name, key: TsigKey, msg_id: int, now: float) -> SoaQuery:
    """The question ``zone`` SOA IN, without RD (the primary is asked as the authority), signed with
    ``key`` at ``now``; ``msg_id`` from the caller's randomness."""
    wire, mac = signed_question(zone, dns.rdatatype.SOA, key, msg_id, now)
    return SoaQuery(wire, msg_id, mac, zone)


def read_soa_answer(wire: bytes, query: SoaQuery, key: TsigKey, now: float) -> int:
    """The zone's serial from the primary's answer to ``query``: same ID, QR and AA set, NOERROR, not
    truncated, the question echoed, exactly the zone's SOA in the answer, signed over the query's MAC.
    ParseError for anything else (a truncated answer: ask again over TCP)."""
    records, flags = signed_answer(wire, query.msg_id, query.mac, key, now, MAX_SOA_ANSWER)
    if flags & dns.flags.TC:
        raise ParseError("truncated")
    rcode = extended_rcode(wire, records)
    if rcode != 0:
        raise ParseError(f"rcode {rcode}")
    if not flags & dns.flags.AA:
        raise ParseError("not authoritative")
    _question(wire, query.zone)
    serial = _apex_soa(wire, records, query.zone)
    if serial is None:
        raise ParseError("no SOA")
    return serial
