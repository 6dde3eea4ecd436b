"""TSIG (RFC 8945): sign the exact bytes sent, verify what arrives, with the time passed in.

One implementation for the publisher, the LLQ client and the rendezvous server. dnspython builds and
parses the messages but never signs: ``Message.to_wire()`` with a TSIG reads the clock, and rendering
shuffles the records of an RRset, so a message rendered twice is not the message signed. Here a message is
rendered once, the MAC is computed over those bytes (stdlib ``hmac``) and the TSIG RR appended to them.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import dns.exception
import dns.name
import dns.tsig

from tunneld.proto.dnswire import ADDITIONAL, HEADER_SIZE, Record, walk
from tunneld.proto.errors import ParseError

__all__ = [
    "ALGORITHMS",
    "BADKEY",
    "BADSIG",
    "BADTIME",
    "BADTRUNC",
    "ERROR_NAMES",
    "FUDGE",
    "MAX_FUDGE",
    "TsigError",
    "TsigKey",
    "TsigRecord",
    "TsigSession",
    "TsigSigner",
    "TsigStream",
    "check",
    "find_tsig",
    "sign",
    "signed_size",
    "unsigned_error",
    "verify",
]

FUDGE: Final = 300  # RFC 8945 §10: the recommended fudge
MAX_FUDGE: Final = 300
"""The widest window a server accepts (RFC 8945 §5.2.3 answers a request outside the accepted time
window with BADTIME): a request signed with a fudge of up to 65535 s could be replayed, and would have
to be remembered, for up to 36 hours."""
TSIG_TYPE: Final = 250  # §4.2
CLASS_ANY: Final = 255  # §4.2: TSIG RRs are class ANY, TTL 0

# §4.3 and IANA "TSIG Error values" (the low 4 bits of the RCODE are NOTAUTH on the message)
BADSIG: Final = 16
BADKEY: Final = 17
BADTIME: Final = 18
BADTRUNC: Final = 22
ERROR_NAMES: Final = {BADSIG: "BADSIG", BADKEY: "BADKEY", BADTIME: "BADTIME", BADTRUNC: "BADTRUNC"}

ALGORITHMS: Final[dict[str, tuple[dns.name.Name, Callable[..., object]]]] = {
    # our name: (TSIG algorithm name, hash). §6: hmac-sha256 is mandatory to implement; HMAC-MD5 only
    # for old servers that know nothing else.
    "hmac-sha256": (dns.name.from_text("hmac-sha256"), hashlib.sha256),
    "hmac-md5": (dns.name.from_text("HMAC-MD5.SIG-ALG.REG.INT"), hashlib.md5),
}
_ALIASES: Final = {"hmac-md5.sig-alg.reg.int": "hmac-md5"}


@dataclass(frozen=True)
class TsigKey:
    """A TSIG key. ``algorithm`` is ``"hmac-sha256"`` or ``"hmac-md5"``. The secret is left out of repr
    (unlike ``dns.tsig.Key``'s)."""

    name: dns.name.Name
    secret: bytes = field(repr=False)
    algorithm: str = "hmac-sha256"

    def __post_init__(self) -> None:
        alg = self.algorithm.lower().rstrip(".")
        alg = _ALIASES.get(alg, alg)
        if alg not in ALGORITHMS:
            raise ValueError(f"unsupported TSIG algorithm {self.algorithm!r} (use hmac-sha256 or hmac-md5)")
        if not self.secret:
            raise ValueError("empty TSIG secret")
        object.__setattr__(self, "algorithm", alg)
        if not self.name.is_absolute():
            object.__setattr__(self, "name", self.name.concatenate(dns.name.root))

    @classmethod
    def of(cls, key: TsigKey | dns.tsig.Key) -> TsigKey:
        """Ours, from a dnspython key (as tools and tests hold them) or ours."""
        if isinstance(key, TsigKey):
            return key
        return cls(key.name, key.secret, key.algorithm.to_text())

    def dnspython(self) -> dns.tsig.Key:
        """The same key for dnspython (tests and tools that sign with it). Never log its repr."""
        return dns.tsig.Key(self.name, self.secret, self.algorithm_name)

    @property
    def algorithm_name(self) -> dns.name.Name:
        return ALGORITHMS[self.algorithm][0]

    def __getstate__(self) -> dict[str, object]:  # copies and pickles leave the keyed HMAC behind
        return {k: v for k, v in self.__dict__.items() if k != "_base"}

    def mac(self, data: bytes) -> bytes:
        return self.context(data).digest()

    def context(self, data: bytes = b"") -> hmac.HMAC:
        """An HMAC under this key, fed ``data`` so far (a multi-message MAC is fed message by message):
        a copy of one keyed once, which costs a fraction of keying anew (two hash blocks saved)."""
        base: hmac.HMAC | None = self.__dict__.get("_base")
        if base is None:
            base = hmac.new(self.secret, b"", ALGORITHMS[self.algorithm][1])  # type: ignore[arg-type]
            object.__setattr__(self, "_base", base)
        ctx = base.copy()
        if data:
            ctx.update(data)
        return ctx


class TsigError(Exception):
    """A TSIG that does not verify. ``str()`` is a short fixed reason usable as a counter name ("no tsig",
    "key", "algorithm", "mac", "time", "peer error"); ``error`` the TSIG error a server answers with."""

    def __init__(self, reason: str, error: int = 0, tsig: TsigRecord | None = None) -> None:
        super().__init__(reason)
        self.error = error
        self.tsig = tsig


@dataclass(frozen=True)
class TsigRecord:
    """The fields of a TSIG RR (§4.2) and where the RR starts in the message."""

    name: dns.name.Name
    algorithm: dns.name.Name
    time_signed: int
    fudge: int
    mac: bytes
    original_id: int
    error: int
    other: bytes
    start: int


def _variables(key_name: dns.name.Name, algorithm: dns.name.Name, time_signed: int, fudge: int,
               error: int, other: bytes) -> bytes:
    """§4.3.3: the TSIG variables, names in canonical (lower-case, uncompressed) wire form."""
    return (key_name.to_digestable() + struct.pack("!HI", CLASS_ANY, 0) + algorithm.to_digestable()
            + struct.pack("!HIHHH", time_signed >> 32, time_signed & 0xFFFFFFFF, fudge, error, len(other))
            + other)


def _mac_input(message: bytes, original_id: int, request_mac: bytes, variables: bytes) -> bytes:
    """§4.3.1-4.3.3. ``message`` is without the TSIG RR, its ARCOUNT already excluding it; its ID is
    replaced by the Original ID."""
    prefix = struct.pack("!H", len(request_mac)) + request_mac if request_mac else b""
    return prefix + struct.pack("!H", original_id) + message[2:] + variables


def _rr(key_name: dns.name.Name, algorithm: dns.name.Name, time_signed: int, fudge: int, mac: bytes,
        original_id: int, error: int, other: bytes) -> bytes:
    rdata = (algorithm.to_digestable()
             + struct.pack("!HIHH", time_signed >> 32, time_signed & 0xFFFFFFFF, fudge, len(mac)) + mac
             + struct.pack("!HHH", original_id, error, len(other)) + other)
    return key_name.to_digestable() + struct.pack("!HHIH", TSIG_TYPE, CLASS_ANY, 0, len(rdata)) + rdata


def _append(wire: bytes, rr: bytes) -> bytes:
    (arcount,) = struct.unpack_from("!H", wire, 10)
    return wire[:10] + struct.pack("!H", arcount + 1) + wire[12:] + rr


def signed_size(key: TsigKey, other_len: int = 0) -> int:
    """How many bytes :func:`sign` adds: room to keep free when rendering a message of bounded size."""
    return len(_rr(key.name, key.algorithm_name, 0, 0, key.mac(b""), 0, 0, bytes(other_len)))


def sign(wire: bytes, key: TsigKey, time_signed: int, request_mac: bytes = b"", fudge: int = FUDGE,
         error: int = 0, other: bytes = b"") -> tuple[bytes, bytes]:
    """Append a TSIG RR to the unsigned, rendered message ``wire``: (the signed message, its MAC).

    ``time_signed`` is the caller's wall clock (Unix seconds). ``request_mac`` is the MAC of the request
    when signing its reply (§4.3.1); b"" for a request or an unsolicited message (an LLQ event). The
    Original ID is the message's ID. Names are written lower-cased and uncompressed."""
    return TsigSigner(key, time_signed, fudge, error, other).sign(wire, request_mac)


class TsigSigner:
    """Signatures with one key at one time, fudge, error and other data: what :func:`sign` does, with the
    TSIG variables and the TSIG RR laid out once, so that signing many messages (an LLQ server's events
    of one change, to many watchers) costs one copy of a keyed HMAC over each message.

    The MAC input (§4.3.1-4.3.3) is the request MAC (length-prefixed, if any), the message with its
    Original ID in place of its ID -- the same bytes, as the Original ID is the message's ID -- and the
    TSIG variables."""

    def __init__(self, key: TsigKey, time_signed: int, fudge: int = FUDGE, error: int = 0,
                 other: bytes = b"") -> None:
        if not 0 <= time_signed < 1 << 48:
            raise ValueError("time signed out of range")
        self.key = key
        self._variables = _variables(key.name, key.algorithm_name, time_signed, fudge, error, other)
        mac_size = key.context().digest_size
        # The RR as _rr lays it out, split around the two parts each message fills in: MAC, Original ID.
        rr = _rr(key.name, key.algorithm_name, time_signed, fudge, bytes(mac_size), 0, error, other)
        self._tail = rr[len(rr) - 4 - len(other):]
        self._head = rr[:len(rr) - len(self._tail) - 2 - mac_size]

    def sign(self, wire: bytes, request_mac: bytes = b"") -> tuple[bytes, bytes]:
        """``wire`` signed (the TSIG RR appended, ARCOUNT one more), and its MAC."""
        if len(wire) < HEADER_SIZE:
            raise ValueError("not a DNS message")
        ctx = self.key.context()
        if request_mac:
            ctx.update(struct.pack("!H", len(request_mac)) + request_mac)
        ctx.update(wire)
        ctx.update(self._variables)
        mac = ctx.digest()
        arcount = ((wire[10] << 8) | wire[11]) + 1
        if arcount > 0xFFFF:
            raise ValueError("too many additional records")
        signed = b"".join((wire[:10], arcount.to_bytes(2, "big"), wire[12:], self._head, mac, wire[:2],
                           self._tail))
        return signed, mac


def unsigned_error(wire: bytes, tsig: TsigRecord, error: int) -> bytes:
    """Append the unsigned TSIG of a BADKEY or BADSIG answer (§5.3.2: MAC size 0, never signed) to the
    rendered answer ``wire``, echoing the request's key and algorithm names."""
    (original_id,) = struct.unpack_from("!H", wire, 0)
    return _append(wire, _rr(tsig.name, tsig.algorithm, 0, tsig.fudge, b"", original_id, error, b""))


def find_tsig(wire: bytes, records: Sequence[Record] | None = None) -> TsigRecord | None:
    """The TSIG RR of a message, or None if its last additional record is not one (§5.1: it must be
    the last). Raises ParseError for a message that does not frame, or a malformed TSIG RR. ``records``:
    the message's frames, if the caller has checked it already (under bounds of its own)."""
    if records is None:
        records = walk(wire)
    if not records or records[-1].section != ADDITIONAL or records[-1].rtype != TSIG_TYPE:
        return None
    last = records[-1]
    if last.rclass != CLASS_ANY or last.ttl != 0:  # §4.2; neither is in the MAC input
        raise ParseError("malformed tsig")
    end = last.rdata + last.rdlength
    try:
        name, _ = dns.name.from_wire(wire, last.offset)
        algorithm, used = dns.name.from_wire(wire, last.rdata)
        p = last.rdata + used
        hi, lo, fudge, mac_size = struct.unpack_from("!HIHH", wire, p)
        p += 10
        mac = wire[p:p + mac_size]
        p += mac_size
        original_id, error, other_len = struct.unpack_from("!HHH", wire, p)
        p += 6
        other = wire[p:p + other_len]
        p += other_len
    except (struct.error, dns.exception.DNSException) as e:
        raise ParseError("malformed tsig") from e
    if len(mac) != mac_size or len(other) != other_len or p != end:
        raise ParseError("malformed tsig")
    return TsigRecord(name, algorithm, (hi << 32) | lo, fudge, mac, original_id, error, other, last.offset)


def verify(wire: bytes, key: TsigKey, request_mac: bytes, now: float | None,
           tsig: TsigRecord | None = None) -> TsigRecord:
    """Verify the TSIG of ``wire`` with ``key``, in §5.2 order: key, then MAC, then time.

    ``request_mac`` is the MAC of our request when ``wire`` is its reply (b"" otherwise). ``now`` is the
    wall clock in Unix seconds; None skips the time check (a BADTIME answer carries the peer's clock, not
    ours). Returns the TSIG; raises TsigError (with the TSIG error to answer) or ParseError."""
    if tsig is None:
        tsig = find_tsig(wire)
    if tsig is None:
        raise TsigError("no tsig")
    if tsig.name != key.name:  # dns.name.Name compares case-insensitively
        raise TsigError("key", BADKEY, tsig)
    if tsig.algorithm != key.algorithm_name:
        raise TsigError("algorithm", BADKEY, tsig)
    if len(tsig.mac) < max(10, key.context().digest_size // 2):  # §5.2.2.1: too short for a truncation
        raise TsigError("mac", BADSIG, tsig)
    message = wire[:tsig.start]
    (arcount,) = struct.unpack_from("!H", message, 10)
    message = message[:10] + struct.pack("!H", arcount - 1) + message[12:]
    variables = _variables(key.name, key.algorithm_name, tsig.time_signed, tsig.fudge, tsig.error,
                           tsig.other)
    expected = key.mac(_mac_input(message, tsig.original_id, request_mac, variables))
    if not hmac.compare_digest(expected[:len(tsig.mac)], tsig.mac):
        raise TsigError("mac", BADSIG, tsig)
    if now is not None and abs(int(now) - tsig.time_signed) > tsig.fudge:
        raise TsigError("time", BADTIME, tsig)
    return tsig


def check(wire: bytes, keys: Mapping[dns.name.Name, TsigKey], now: float) -> tuple[TsigKey, TsigRecord]:
    """A server's check of a signed request (§5.2) against its ``keys`` (by canonical name): the key
    and the TSIG, or TsigError whose ``error`` says how to answer (BADKEY, BADSIG, BADTIME). A request
    that carries a TSIG error itself is refused with reason "peer error" (error 0: FORMERR); one that
    asks for a fudge over :data:`MAX_FUDGE` with reason "fudge" (BADTIME)."""
    tsig = find_tsig(wire)
    if tsig is None:
        raise TsigError("no tsig")
    key = keys.get(tsig.name.canonicalize())
    if key is None:
        raise TsigError("key", BADKEY, tsig)
    if tsig.error:
        raise TsigError("peer error", 0, tsig)
    verify(wire, key, b"", now, tsig)
    if tsig.fudge > MAX_FUDGE:  # after the MAC (§5.2 order), so that the BADTIME answer is signed
        raise TsigError("fudge", BADTIME, tsig)
    return key, tsig


class TsigSession:
    """A client's TSIG state on one socket: requests signed with ``key``, and the MAC of each kept by
    message ID, so its reply is verified over it (§5.3).

    Only requests are remembered: acks of LLQ events are responses and nothing answers them. The LLQ
    server's events are unsolicited and signed without a request MAC, and their IDs are the server's
    choice: an event whose ID equals one of our requests' fails the check against that request's MAC and
    is then checked as the unsolicited message it is."""

    KEPT: Final = 4096  # request IDs whose MACs are kept (the oldest quarter is dropped beyond)
    PER_ID: Final = 4  # MACs kept per ID: hundreds of LLQs on one socket draw the same random ID at times

    def __init__(self, key: TsigKey) -> None:
        self.key = key
        self._macs: dict[int, list[bytes]] = {}

    def __repr__(self) -> str:
        return f"<TsigSession key={self.key.name} {self.key.algorithm}>"

    def sign(self, wire: bytes, now: float) -> bytes:
        signed, mac = sign(wire, self.key, int(now))
        if len(wire) >= 3 and not wire[2] & 0x80:  # QR clear: a request
            (msg_id,) = struct.unpack_from("!H", wire)
            macs = self._macs.pop(msg_id, [])
            self._macs[msg_id] = [*macs[-(self.PER_ID - 1):], mac]
            if len(self._macs) > self.KEPT:
                for old in list(self._macs)[:self.KEPT // 4]:
                    del self._macs[old]
        return signed

    def verify(self, wire: bytes, now: float) -> TsigRecord:
        """Check an incoming datagram; raises TsigError or ParseError."""
        tsig = find_tsig(wire)
        for mac in reversed(self._macs.get(struct.unpack_from("!H", wire)[0], [])):
            try:
                return verify(wire, self.key, mac, now, tsig)
            except TsigError as e:
                if str(e) != "mac":
                    raise
        return verify(wire, self.key, b"", now, tsig)


class TsigStream:
    """The check of a multi-message answer to one signed request (a zone transfer), RFC 8945 §5.3.1.

    The first message is verified as any reply, over ``request_mac``. Each later signed message's MAC
    covers the previous MAC (length-prefixed), every unsigned message since then (whole, as received),
    this message without its TSIG (Original ID in place of the ID, ARCOUNT less one) and the timers only
    (time signed, fudge): key name, algorithm, error and other data are not repeated. The first message
    must be signed, and so must one of every :data:`EVERY` and the last (:meth:`finish`).

    ``feed`` raises TsigError (the stream is then dead) or ParseError. The unsigned messages are hashed as
    they come, never kept."""

    EVERY: Final = 100  # §5.3.1: "at least every 100th message"

    def __init__(self, key: TsigKey, request_mac: bytes) -> None:
        self.key = key
        self._request_mac = request_mac
        self._ctx: hmac.HMAC | None = None  # the next signed message's digest so far; None before the first
        self.unsigned = 0  # messages since the last signed one
        self.messages = 0

    def feed(self, wire: bytes, now: float | None, tsig: TsigRecord | None = None) -> TsigRecord | None:
        """Check the next message of the answer; its TSIG, or None for an unsigned message (allowed
        between signed ones). ``tsig`` is the message's TSIG if the caller found it already."""
        if tsig is None:
            tsig = find_tsig(wire)
        self.messages += 1
        if self._ctx is None:
            tsig = verify(wire, self.key, self._request_mac, now, tsig)  # "no tsig" for an unsigned first
            if tsig.error:
                raise TsigError("peer error", 0, tsig)
        elif tsig is None:
            self.unsigned += 1
            if self.unsigned >= self.EVERY:
                raise TsigError("no tsig")
            self._ctx.update(wire)
            return None
        else:
            self._verify_next(wire, tsig, now)
        self.unsigned = 0
        self._ctx = self.key.context(struct.pack("!H", len(tsig.mac)) + tsig.mac)
        return tsig

    def finish(self) -> None:
        """The answer has ended: its last message must have been signed (§5.3.1)."""
        if self._ctx is None or self.unsigned:
            raise TsigError("no tsig")

    def _verify_next(self, wire: bytes, tsig: TsigRecord, now: float | None) -> None:
        assert self._ctx is not None
        if tsig.name != self.key.name:
            raise TsigError("key", BADKEY, tsig)
        if tsig.algorithm != self.key.algorithm_name:
            raise TsigError("algorithm", BADKEY, tsig)
        if tsig.error:
            raise TsigError("peer error", 0, tsig)
        if len(tsig.mac) < max(10, self.key.context().digest_size // 2):  # §5.2.2.1, as in verify
            raise TsigError("mac", BADSIG, tsig)
        message = wire[:tsig.start]
        (arcount,) = struct.unpack_from("!H", message, 10)
        ctx = self._ctx
        ctx.update(struct.pack("!H", tsig.original_id) + message[2:10] + struct.pack("!H", arcount - 1)
                   + message[12:])
        ctx.update(struct.pack("!HIH", tsig.time_signed >> 32, tsig.time_signed & 0xFFFFFFFF, tsig.fudge))
        if not hmac.compare_digest(ctx.digest()[:len(tsig.mac)], tsig.mac):
            raise TsigError("mac", BADSIG, tsig)
        if now is not None and abs(int(now) - tsig.time_signed) > tsig.fudge:
            raise TsigError("time", BADTIME, tsig)
