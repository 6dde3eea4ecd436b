"""LLQ events rendered once per change for many watchers, and LLQ acks read without a full parse.

A zone change reaches every watcher of a name at once, and their events differ only in the message ID,
the LLQ option's LLQ-ID and lease, and the TSIG. :class:`Batch` (one per zone change, ack or restore)
looks each question's answer up once, renders each distinct diff once per question, EDNS size and TSIG
size (a template with zeros where those fields go), and per watcher patches the fields in and signs with
:class:`~tunneld.proto.tsig.TsigSigner`. The bytes are those the message rendered for that watcher alone
would have: the LLQ option is the last thing in an unsigned event. :func:`read_ack` reads the acks that
come back (one per watcher and event) from their frames, so the common one costs no dnspython parse.
docs/protocol.md, "LLQ server behaviour".
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from tunneld.dnsserver.core import DnsCore, Signer
from tunneld.dnsserver.llq_events import Records, diff, records, split
from tunneld.proto.dnsguard import ADDITIONAL, HEADER_SIZE
from tunneld.proto.dnswire import walk
from tunneld.proto.errors import ParseError
from tunneld.proto.llq_wire import (
    LLQ_ERR_NO_ERROR,
    LLQ_OP_EVENT,
    LLQ_OP_REFRESH,
    LLQ_OP_SETUP,
    LLQ_OPTION_CODE,
    LLQ_UDP_PAYLOAD,
    LLQ_VERSION,
    LLQOption,
)
from tunneld.proto.tsig import TsigKey, TsigRecord, TsigSigner, find_tsig, signed_size

__all__ = ["Ack", "Batch", "event_message", "llq_error", "llq_reply", "read_ack"]

_OPT: Final = 41  # RFC 6891 §6.1.1
_TSIG: Final = 250  # RFC 8945 §4.2
_LLQ_SIZE: Final = 18  # RFC 8764 §3.1: version, opcode, error (2 each), LLQ-ID (8), lease (4)
_OPTION_HEAD: Final = struct.pack("!HH", LLQ_OPTION_CODE, _LLQ_SIZE)
_PATCHED: Final = 12  # the LLQ-ID and lease: the last 12 bytes of an unsigned event


def llq_reply(core: DnsCore, msg: dns.message.Message, option: LLQOption | None, signer: Signer | None,
              now: float, answers: Iterable[dns.rrset.RRset] = (),
              rcode: dns.rcode.Rcode = dns.rcode.NOERROR) -> bytes:
    """The LLQ server's reply to a request: authoritative, the ``option`` (none: no EDNS), signed if the
    request was (:meth:`DnsCore.render`)."""
    resp = dns.message.make_response(msg)
    resp.use_edns(False)
    if option is not None:
        resp.use_edns(0, payload=LLQ_UDP_PAYLOAD, options=[option])
    resp.flags |= dns.flags.AA
    resp.set_rcode(rcode)
    resp.answer = list(answers)
    return core.render(msg, resp, signer, now, None)


def llq_error(core: DnsCore, msg: dns.message.Message, option: LLQOption, error: int, signer: Signer | None,
              now: float, rcode: dns.rcode.Rcode = dns.rcode.NOERROR) -> bytes:
    """A reply echoing the request's LLQ option with LLQ-ERROR ``error`` and lease 0."""
    opcode = option.opcode if option.opcode in (LLQ_OP_SETUP, LLQ_OP_REFRESH) else LLQ_OP_SETUP
    return llq_reply(core, msg, LLQOption(LLQ_VERSION, opcode, error, option.llq_id, 0), signer, now,
                     rcode=rcode)


def event_message(qname: dns.name.Name, qtype: int, answers: list[dns.rrset.RRset], llq_id: int, lease: int,
                  msg_id: int = 0) -> dns.message.Message:
    """An LLQ EVENT (RFC 8764 §7.1): our question, the changed records, the option with the LLQ-ID and
    the lease left."""
    msg = dns.message.Message(id=msg_id)
    msg.flags = dns.flags.QR | dns.flags.AA
    msg.find_rrset(msg.question, qname, dns.rdataclass.IN, dns.rdatatype.RdataType.make(qtype), create=True,
                   force_unique=True)
    msg.use_edns(0, payload=LLQ_UDP_PAYLOAD,
                 options=[LLQOption(LLQ_VERSION, LLQ_OP_EVENT, LLQ_ERR_NO_ERROR, llq_id, lease)])
    msg.answer = answers
    return msg


@dataclass(frozen=True, slots=True)
class _Parts:
    old: Records  # kept, so that its id() (the cache key) is not reused while the batch lives
    templates: list[bytes]


class Batch:
    """The events of one zone change (or one ack, one restore) at ``now``: answers looked up once per
    question, diffs rendered once per question, old answer, EDNS size and key; signed with the core's
    fudge at ``int(now)``."""

    def __init__(self, core: DnsCore, now: float) -> None:
        self.core = core
        self.now = now
        # Keyed by id() of objects the batch keeps (a name hashes slowly, and so does a key with one):
        self._names: dict[int, tuple[dns.name.Name, int]] = {}  # id(qname) -> (qname, id of the first equal)
        self._firsts: dict[dns.name.Name, int] = {}
        self._answers: dict[tuple[int, int], Records] = {}
        self._parts: dict[tuple[int, int, int, int, int], _Parts] = {}
        self._last: dict[tuple[int, int, int, int], tuple[Records, _Parts]] = {}
        self._keys: dict[int, tuple[TsigKey, TsigSigner, int]] = {}  # id(key) -> (key, signer, its size)

    def _name(self, qname: dns.name.Name) -> int:
        """One number for all equal names in the batch."""
        seen = self._names.get(id(qname))
        if seen is None:
            seen = self._names[id(qname)] = (qname, self._firsts.setdefault(qname, id(qname)))
        return seen[1]

    def _key(self, key: TsigKey) -> tuple[TsigKey, TsigSigner, int]:
        got = self._keys.get(id(key))
        if got is None:
            signer = TsigSigner(key, int(self.now), self.core.policy.fudge)
            got = self._keys[id(key)] = (key, signer, signed_size(key))
        return got

    def answer(self, qname: dns.name.Name, qtype: int) -> Records:
        """The answer set of a question now (one lookup per batch). Never mutated: LLQs share it."""
        question = (self._name(qname), qtype)
        got = self._answers.get(question)
        if got is None:
            got = self._answers[question] = records(self.core.answer(qname, qtype, self.now)[0])
        return got

    def templates(self, qname: dns.name.Name, qtype: int, old: Records, new: Records, payload: int,
                  key: TsigKey | None) -> list[bytes]:
        """The unsigned events (message ID, LLQ-ID and lease zero) that turn ``old`` into ``new``, in as few
        datagrams of ``payload`` bytes as they fit once signed with ``key``; none if nothing changed."""
        tsig_room = 0 if key is None else self._key(key)[2]
        cache_key = (id(old), self._name(qname), qtype, payload, tsig_room)
        hit = self._parts.get(cache_key)
        if hit is not None and hit.old is old:
            return hit.templates
        last = self._last.get(cache_key[1:])  # LLQs set up or restored apart hold equal, distinct answers
        if last is not None and last[0] is new and last[1].old == old:
            self._parts[cache_key] = _Parts(old, last[1].templates)
            return last[1].templates
        changed = diff(old, new) if old is not new else []
        templates: list[bytes] = []
        if changed:
            def size_of(answers: list[dns.rrset.RRset]) -> int:
                return len(event_message(qname, qtype, answers, 0, 0).to_wire())

            for part in split(changed, size_of, payload - tsig_room):
                wire = event_message(qname, qtype, part, 0, 0).to_wire()
                if wire[-_LLQ_SIZE - 4:-_PATCHED] != _OPTION_HEAD + LLQOption(
                        LLQ_VERSION, LLQ_OP_EVENT, LLQ_ERR_NO_ERROR).to_bytes()[:6]:
                    raise AssertionError("an unsigned LLQ event does not end with its LLQ option")
                templates.append(wire)
        self._parts[cache_key] = parts = _Parts(old, templates)
        self._last[cache_key[1:]] = (new, parts)
        return templates

    def event(self, template: bytes, msg_id: int, llq_id: int, lease: int, key: TsigKey | None) -> bytes:
        """One watcher's event from a template: its message ID, LLQ-ID and lease patched in, signed."""
        wire = b"".join((msg_id.to_bytes(2, "big"), template[2:-_PATCHED], llq_id.to_bytes(8, "big"),
                         lease.to_bytes(4, "big")))
        if key is None:
            return wire
        return self._key(key)[1].sign(wire)[0]


@dataclass(frozen=True, slots=True)
class Ack:
    """What an LLQ server needs of an ack (RFC 8764 §7.2): its message ID, the option's opcode and LLQ-ID,
    and its TSIG (None: unsigned)."""

    msg_id: int
    opcode: int
    llq_id: int
    tsig: TsigRecord | None


def read_ack(wire: bytes) -> Ack | None:
    """The ack in ``wire`` if it is one in the plain form clients send: a response (QR), opcode QUERY,
    one question, no answer or authority records, then an OPT (EDNS version 0) carrying exactly one LLQ
    option, and at most a TSIG after it. None for anything else, malformed or not: the server's general
    path then parses it (this one only saves that parse)."""
    if len(wire) < HEADER_SIZE:
        return None
    msg_id, flags, qd, an, ns, ar = struct.unpack_from("!6H", wire)
    if not flags & dns.flags.QR or (flags >> 11) & 0xF != 0 or (qd, an, ns) != (1, 0, 0) or ar not in (1, 2):
        return None
    try:
        frames = walk(wire)
        opt = frames[0]
        if opt.section != ADDITIONAL or opt.rtype != _OPT or wire[opt.offset] != 0 or (opt.ttl >> 16) & 0xFF:
            return None
        if opt.rdlength != 4 + _LLQ_SIZE or wire[opt.rdata:opt.rdata + 4] != _OPTION_HEAD:
            return None
        version, opcode, _error, llq_id, _lease = struct.unpack_from("!HHHQI", wire, opt.rdata + 4)
        tsig = find_tsig(wire, frames) if ar == 2 else None
        if (ar == 2 and tsig is None) or version != LLQ_VERSION:
            return None
    except (ParseError, IndexError, struct.error):
        return None
    return Ack(msg_id, opcode, llq_id, tsig)
