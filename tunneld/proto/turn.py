"""The TURN client (RFC 8656): one UDP allocation on a relay, its permissions and channels, and the framing
of peer data (Send/Data indications, ChannelData).

A sans-I/O core (:mod:`tunneld.proto.core`, monotonic ``now``) on the wire code of
:mod:`tunneld.proto.stun_wire`. Requests use the long-term credential (RFC 8489 §9.2): the first Allocate
is sent bare, the 401 gives REALM and NONCE, and from then on every request carries USERNAME, REALM,
NONCE and MESSAGE-INTEGRITY; a 438 brings a fresh nonce. Responses count only from ``server`` with the
transaction ID of a request still outstanding, and only with a correct MESSAGE-INTEGRITY where they carry
one (a success to a signed request must). Anything else is counted in :attr:`TurnClient.counters` and
dropped: nothing from the network raises. Timers, credentials and the reasons behind them: docs/nat.md,
"TURN relay".
"""

from __future__ import annotations

import ipaddress
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from tunneld.proto import stun_wire as sw
from tunneld.proto.core import Address, Outbox
from tunneld.proto.errors import ParseError

__all__ = [
    "Allocated",
    "AllocationFailed",
    "AllocationLost",
    "PermissionFailed",
    "TurnClient",
    "TurnEvent",
    "rest_credentials",
]

# Retransmission of requests over UDP, RFC 8489 §6.2.1: RTO 500 ms doubling, Rc = 7 sends, then Rm * RTO.
RTO: Final = 0.5
RC: Final = 7
RM: Final = 16
PERMISSION_LIFETIME: Final = 300.0  # RFC 8656 §9: a permission lasts 300 s
PERMISSION_REFRESH: Final = 240.0  # ours: refresh a minute before it lapses
CHANNEL_LIFETIME: Final = 600.0  # RFC 8656 §12: a channel binding lasts 10 minutes
CHANNEL_REFRESH: Final = 540.0  # ours: refresh a minute before
MIN_REFRESH: Final = 60.0  # ours: refresh the allocation at lifetime / 2, not sooner than this (if it fits)
FAILED_PERMISSION_RETRY: Final = 60.0  # ours: ask again for a refused permission still wanted
MAX_AUTH_RETRIES: Final = 3  # ours: 401/438 answers followed per request (a nonce that keeps going stale)
REST_TTL: Final = 86400  # ours: relay credentials are minted for a day (docs/nat.md, "TURN relay")
MAX_REASON: Final = 80  # ours: characters of a relay's reason phrase kept for events
MAX_REDIRECTS: Final = 2  # ours: 300 Try Alternate followed per start (RFC 8489 §10 leaves it open)

# Error codes (RFC 8489 §14.8, RFC 8656 §19).
TRY_ALTERNATE: Final = 300
UNAUTHORIZED: Final = 401
ALLOCATION_MISMATCH: Final = 437
STALE_NONCE: Final = 438
NO_ANSWER: Final = 0  # ours, in events: the request was never answered (RFC 8489 §6.2.1 timeout)


@dataclass(frozen=True)
class Allocated:
    """The relay allocated ``relayed`` for ``lifetime`` seconds; it sees us as ``mapped``."""

    relayed: Address
    mapped: Address
    lifetime: int


@dataclass(frozen=True)
class AllocationFailed:
    """The relay refused the Allocate (``code`` from ERROR-CODE), or never answered (code 0)."""

    code: int
    reason: str


@dataclass(frozen=True)
class AllocationLost:
    """A live allocation is gone: a Refresh was refused (437: the relay forgot it) or went unanswered."""

    reason: str


@dataclass(frozen=True)
class PermissionFailed:
    """CreatePermission (or ChannelBind) for ``ip`` was refused with ``code`` (0: no answer)."""

    ip: str
    code: int


TurnEvent = Allocated | AllocationFailed | AllocationLost | PermissionFailed

# What a transaction is for: the allocation's own requests, a permission (by IP), a channel (by peer).
_ALLOCATE, _REFRESH, _DELETE, _CLEAR = "allocate", "refresh", "delete", "clear"


@dataclass
class _Tx:
    """One request under retransmission. ``attrs`` are the request's own attributes, without the
    credential ones, so that a 401/438 can rebuild it with a new nonce under a new transaction ID."""

    method: int
    attrs: tuple[sw.Attribute, ...]
    purpose: str | Address
    peer: Address | None  # XOR-PEER-ADDRESS, added last (its IPv6 form depends on the transaction ID)
    payload: bytes
    key: bytes | None  # what it was signed with, which its answer must be signed with too
    next_at: float
    interval: float = RTO
    sends: int = 1
    retries: int = 0


@dataclass
class _Permission:
    installed: bool = False
    next_at: float = 0.0  # when to (re)send CreatePermission
    pending: bool = False


@dataclass
class _Channel:
    number: int
    confirmed: bool = False
    next_at: float = 0.0
    pending: bool = False


def _canonical(address: Address) -> Address:
    host, port = address
    return str(ipaddress.ip_address(host)), int(port)


class TurnClient(Outbox[TurnEvent]):
    """A TURN client for one allocation on ``server`` (an IP literal and port).

    :meth:`start` sends the Allocate; :meth:`permit` and :meth:`bind_channel` say which peers may send to
    the relayed address; :meth:`wrap` frames a datagram for a peer; :meth:`unwrap` and :meth:`received`
    give back what peers sent; :meth:`close` deletes the allocation (Refresh with LIFETIME 0).

    :meth:`unwrap` must only be given datagrams from ``server`` that the caller cannot otherwise place:
    a ChannelData header (first byte 0x40-0x4F) is indistinguishable from the start of an ESP SPI, so the
    tunnel tells them apart by the source address before it asks here.
    """

    def __init__(self, server: Address, username: str, password: str,
                 rand: Callable[[int], bytes] = os.urandom, *, lifetime: int = 600,
                 software: str = "tunneld") -> None:
        super().__init__()
        self.server: Address = _canonical(server)
        self.relayed: Address | None = None
        self.mapped: Address | None = None
        self.lifetime = lifetime
        self.counters: Counter[str] = Counter()
        self._rand = rand
        self._software = software.encode()
        self._username = username
        self._password = password
        self._next_credentials: tuple[str, str] | None = None
        self._realm: str | None = None
        self._nonce: str | None = None
        self._key: bytes | None = None
        self._state = "idle"  # idle, allocating, allocated, closing, closed, failed, lost
        self._txs: dict[bytes, _Tx] = {}
        self._refresh_at: float | None = None
        self._redirects = 0
        self._cleared = False
        self._wanted: set[str] = set()
        self._permissions: dict[str, _Permission] = {}
        self._channels: dict[Address, _Channel] = {}
        self._by_number: dict[int, Address] = {}
        self._next_channel = sw.CHANNEL_MIN
        self._received: list[tuple[Address, bytes]] = []

    # -- the face ---------------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """idle, allocating, allocated, closing, closed, failed or lost."""
        return self._state

    def start(self, now: float) -> None:
        """Send the Allocate (again, after a failure or loss: channels are bound anew)."""
        self._txs.clear()
        self._adopt_credentials()
        self._state, self.relayed, self.mapped, self._refresh_at = "allocating", None, None, None
        self._redirects, self._cleared = 0, False
        self._forget_bindings()
        self._allocate(now)

    def set_credentials(self, username: str, password: str) -> None:
        """New TURN REST credentials, for the next allocation (:meth:`start`): a live one keeps the
        username it was made with, which the relay requires of its Refreshes (RFC 8656 §7.2, 441)."""
        self._next_credentials = (username, password)
        if self._state not in ("allocating", "allocated", "closing"):
            self._adopt_credentials()

    def _adopt_credentials(self) -> None:
        if self._next_credentials is not None:
            self._username, self._password = self._next_credentials
            self._next_credentials = None
            self._key = None if self._realm is None else sw.long_term_key(
                self._username, self._realm, self._password)

    def permit(self, ips: Iterable[str], now: float) -> None:
        """The IPs that may send to the relayed address (besides bound channels' peers): permissions are
        created for new ones and refreshed while they stay in the set. ValueError for a non-IP."""
        self._wanted = {str(ipaddress.ip_address(ip)) for ip in ips}
        self._service(now)

    def bind_channel(self, peer: Address, now: float) -> None:
        """Bind a channel to ``peer`` (and keep a permission for its IP); :meth:`wrap` uses it once the
        relay confirms. Nothing happens once the 4096 channel numbers are spent (Send still works)."""
        peer = _canonical(peer)
        if peer in self._channels or self._next_channel > sw.CHANNEL_MAX:
            return
        self._channels[peer] = _Channel(self._next_channel)
        self._by_number[self._next_channel] = peer
        self._next_channel += 1
        self._service(now)

    def permitted(self) -> frozenset[str]:
        """The IPs whose permission the relay has confirmed (for this allocation)."""
        return frozenset(ip for ip, p in self._permissions.items() if p.installed)

    def bound(self) -> frozenset[Address]:
        """The peers whose channel the relay has confirmed: :meth:`wrap` frames for them as ChannelData."""
        return frozenset(peer for peer, c in self._channels.items() if c.confirmed)

    def wrap(self, peer: Address, payload: bytes) -> bytes:
        """``payload`` framed for ``peer`` through the relay: ChannelData on a confirmed channel, else a
        Send indication. ``peer`` is compared as given: the canonical spelling (``str(ip_address(...))``),
        as :meth:`unwrap` gives peers back. ValueError if it cannot fit one message (about 2000 bytes)."""
        channel = self._channels.get(peer)
        if channel is not None and channel.confirmed:
            return sw.encode_channel_data(channel.number, payload)
        tid = self._rand(sw.TRANSACTION_ID_LEN)
        return sw.encode(sw.SEND, sw.INDICATION, tid, [
            (sw.XOR_PEER_ADDRESS, sw.encode_xor_address(peer, tid)), (sw.DATA_ATTR, payload)])

    def unwrap(self, data: bytes, source: Address, now: float) -> tuple[Address, bytes] | None:
        """(peer, payload) of a ChannelData message on one of our channels or of a Data indication from a
        permitted peer, if ``data`` came from ``server``; None otherwise (not relay data: counted)."""
        if not self._from_server(source):
            return None
        if sw.is_channel_data(data):
            return self._channel_data(data)
        try:
            msg = sw.decode(data)
        except ParseError as e:
            self.counters[f"parse error: {e}"] += 1
            return None
        return self._data_indication(msg)

    def received(self) -> list[tuple[Address, bytes]]:
        """(peer, payload) of the relay data that came through :meth:`receive`; drained."""
        out, self._received = self._received, []
        return out

    def receive(self, data: bytes, source: Address, now: float) -> None:
        if not self._from_server(source):
            return
        if sw.is_channel_data(data):
            got = self._channel_data(data)
            if got is not None:
                self._received.append(got)
            return
        try:
            msg = sw.decode(data)
        except ParseError as e:
            self.counters[f"parse error: {e}"] += 1
            return
        if msg.cls == sw.INDICATION:
            got = self._data_indication(msg)
            if got is not None:
                self._received.append(got)
            return
        tx = self._txs.get(msg.transaction_id)
        if msg.cls == sw.REQUEST or tx is None or tx.method != msg.method:
            self.counters["not an answer of ours"] += 1
            return
        error = msg.error_code() if msg.cls == sw.ERROR else None
        if msg.cls == sw.ERROR and error is None:
            self.counters["error without a code"] += 1
            return
        if error is not None:  # the reason goes into events and logs: printable, short
            error = (error[0], "".join(c if c.isprintable() else "?" for c in error[1][:MAX_REASON]))
        code = 0 if error is None else error[0]
        # RFC 8489 §9.2.5: the answer to a signed request is checked, except 400, 401 and 438 (the server
        # may not know our key); a success must be signed.
        if tx.key is not None and code not in (400, UNAUTHORIZED, STALE_NONCE):
            if msg.get(sw.MESSAGE_INTEGRITY) is not None:
                if not sw.check_integrity(msg, tx.key):
                    self.counters["bad integrity"] += 1
                    return
            elif msg.cls == sw.SUCCESS or code == TRY_ALTERNATE:  # RFC 8489 §10: a redirect, too
                self.counters["unsigned success" if code == 0 else "unsigned redirect"] += 1
                return
        del self._txs[msg.transaction_id]
        if error is not None and self._retry_auth(tx, msg, code, now):
            return
        self._answer(tx, msg, error, now)
        self._service(now)

    def poll(self, now: float) -> None:
        for tid, tx in list(self._txs.items()):
            if tx.next_at > now:
                continue
            if tx.sends >= RC:
                del self._txs[tid]
                self._answer(tx, None, (NO_ANSWER, "no answer from the relay"), now)
                continue
            self._send(self.server, tx.payload)
            tx.sends += 1
            tx.interval *= 2
            tx.next_at = now + (RM * RTO if tx.sends >= RC else tx.interval)
        if self._state == "allocated" and self._refresh_at is not None and self._refresh_at <= now:
            self._refresh_at = None
            self._request(sw.REFRESH, [(sw.LIFETIME, sw.encode_u32(self.lifetime))], _REFRESH, now)
        self._service(now)

    def deadline(self) -> float | None:
        times = [tx.next_at for tx in self._txs.values()]
        if self._state == "allocated":
            if self._refresh_at is not None:
                times.append(self._refresh_at)
            times += [p.next_at for ip, p in self._permissions.items() if not p.pending]
            times += [c.next_at for c in self._channels.values() if not c.pending]
        return min(times, default=None)

    def close(self, now: float) -> None:
        """Delete the allocation (Refresh with LIFETIME 0); an Allocate still in flight is deleted when it
        is answered. Renews nothing from here on."""
        if self._state == "allocated":
            self._txs.clear()
            self._request(sw.REFRESH, [(sw.LIFETIME, sw.encode_u32(0))], _DELETE, now)
        elif self._state != "allocating" or all(tx.key is None for tx in self._txs.values()):
            self._txs.clear()  # nothing, or only the bare Allocate (never granted) is in flight
        self._state = "closing" if self._txs else "closed"

    def finished(self) -> bool:
        return self._state != "closing"

    # -- requests ---------------------------------------------------------------------------------------

    def _allocate(self, now: float) -> None:
        attrs = [(sw.REQUESTED_TRANSPORT, sw.encode_requested_transport()),
                 (sw.LIFETIME, sw.encode_u32(self.lifetime))]
        if self._key is None:  # the first, bare Allocate: its 401 names the realm and the nonce
            attrs.append((sw.SOFTWARE, self._software))
        self._request(sw.ALLOCATE, attrs, _ALLOCATE, now)

    def _request(self, method: int, attrs: Iterable[sw.Attribute], purpose: str | Address, now: float,
                 peer: Address | None = None, retries: int = 0) -> None:
        attrs = tuple(attrs)
        tid = self._rand(sw.TRANSACTION_ID_LEN)
        body = list(attrs)
        if peer is not None:
            body.append((sw.XOR_PEER_ADDRESS, sw.encode_xor_address(peer, tid)))
        key = self._key
        if key is not None:
            assert self._realm is not None and self._nonce is not None
            body += [(sw.USERNAME, self._username.encode()), (sw.REALM, self._realm.encode()),
                     (sw.NONCE, self._nonce.encode())]
        payload = sw.encode(method, sw.REQUEST, tid, body, integrity_key=key)
        self._txs[tid] = _Tx(method, attrs, purpose, peer, payload, key, now + RTO, retries=retries)
        self._send(self.server, payload)

    def _retry_auth(self, tx: _Tx, msg: sw.Message, code: int, now: float) -> bool:
        """Follow a 401 (the realm and nonce to sign with) or a 438 (a fresh nonce): send the request again,
        signed, under a new transaction ID. False if it is neither, or we have followed enough."""
        realm, nonce = msg.realm(), msg.nonce()
        if code == UNAUTHORIZED and realm is not None and nonce is not None:
            self._realm, self._nonce = realm, nonce
            self._key = sw.long_term_key(self._username, realm, self._password)
        elif code == STALE_NONCE and nonce is not None and self._key is not None:
            self._nonce = nonce
        else:
            return False
        if tx.retries >= MAX_AUTH_RETRIES:
            return False
        self._request(tx.method, tx.attrs, tx.purpose, now, tx.peer, tx.retries + 1)
        return True

    # -- answers ----------------------------------------------------------------------------------------

    def _answer(self, tx: _Tx, msg: sw.Message | None, error: tuple[int, str] | None, now: float) -> None:
        """A final answer to ``tx`` (``msg`` None: it timed out, ``error`` says so)."""
        purpose = tx.purpose
        if purpose == _ALLOCATE:
            self._allocate_answered(msg, error, now)
        elif purpose == _CLEAR:  # the stale allocation is gone (or never was): allocate afresh
            if self._state == "allocating":
                self._allocate(now)
        elif purpose == _DELETE:
            pass  # closed below (_service) once nothing is in flight
        elif purpose == _REFRESH:
            if self._state != "allocated":
                return
            if error is None and msg is not None:
                self._allocated_for(msg.lifetime() or self.lifetime, now)
            else:
                self._lose(f"refresh refused: {error[1]} ({error[0]})" if error and error[0] else
                           "refresh unanswered")
        elif isinstance(purpose, str):
            self._permission_answered(purpose, error, now)
        else:
            self._channel_answered(purpose, error, now)

    def _allocate_answered(self, msg: sw.Message | None, error: tuple[int, str] | None,
                           now: float) -> None:
        if self._state == "closing":
            if error is None:  # allocated after all: delete it at once
                self._request(sw.REFRESH, [(sw.LIFETIME, sw.encode_u32(0))], _DELETE, now)
            return
        if self._state != "allocating":
            return
        if error is None and msg is not None:
            relayed, mapped, lifetime = msg.xor_relayed_address(), msg.xor_mapped_address(), msg.lifetime()
            if relayed is None or mapped is None or lifetime is None:
                self._fail(400, "allocate answer without a relayed or mapped address or a lifetime")
                return
            self._state, self.relayed, self.mapped = "allocated", relayed, mapped
            self._allocated_for(lifetime, now)
            self._emit(Allocated(relayed, mapped, lifetime))
            return
        code, reason = error or (NO_ANSWER, "no answer")
        if code == ALLOCATION_MISMATCH and not self._cleared and self._key is not None:
            # Our 5-tuple still has an allocation (a restart within its lifetime): delete it, then allocate.
            self._cleared = True
            self._request(sw.REFRESH, [(sw.LIFETIME, sw.encode_u32(0))], _CLEAR, now)
            return
        alternate = None if msg is None else msg.get(sw.ALTERNATE_SERVER)
        if code == TRY_ALTERNATE and alternate is not None and self._redirects < MAX_REDIRECTS:
            try:
                host, port = sw.decode_address(alternate)
            except ParseError:
                host = ""
            if host and ipaddress.ip_address(host).version == ipaddress.ip_address(self.server[0]).version:
                self._redirects += 1
                self.server = (host, port)
                self._realm = self._nonce = self._key = None
                self._allocate(now)
                return
        self._fail(code, reason)

    def _allocated_for(self, lifetime: int, now: float) -> None:
        self._refresh_at = now + max(lifetime / 2, min(MIN_REFRESH, 0.9 * lifetime))

    def _fail(self, code: int, reason: str) -> None:
        self._state = "failed"
        self._emit(AllocationFailed(code, reason))

    def _lose(self, reason: str) -> None:
        self._state, self.relayed, self._refresh_at = "lost", None, None
        self._txs.clear()
        self._forget_bindings()
        self._emit(AllocationLost(reason))

    def _forget_bindings(self) -> None:
        for p in self._permissions.values():
            p.installed, p.pending, p.next_at = False, False, 0.0
        for c in self._channels.values():
            c.confirmed, c.pending, c.next_at = False, False, 0.0

    def _permission_answered(self, ip: str, error: tuple[int, str] | None, now: float) -> None:
        p = self._permissions.get(ip)
        if p is None:
            return
        p.pending = False
        if error is None:
            p.installed, p.next_at = True, now + PERMISSION_REFRESH
        else:
            p.next_at = now + FAILED_PERMISSION_RETRY
            self._emit(PermissionFailed(ip, error[0]))

    def _channel_answered(self, peer: Address, error: tuple[int, str] | None, now: float) -> None:
        c = self._channels.get(peer)
        if c is None:
            return
        c.pending = False
        if error is None:
            c.confirmed, c.next_at = True, now + CHANNEL_REFRESH
        else:  # unbound: Send indications carry the peer's data, the permission goes on by itself
            del self._channels[peer]
            self._by_number.pop(c.number, None)
            self._emit(PermissionFailed(peer[0], error[0]))

    # -- permissions and channels ---------------------------------------------------------------------

    def _service(self, now: float) -> None:
        """Create or refresh what is due: permissions for the wanted IPs and the channels' peers, and
        channel bindings. Only while allocated. Closing ends when nothing is in flight."""
        if self._state == "closing" and not self._txs:
            self._state = "closed"
        wanted = self._wanted | {peer[0] for peer in self._channels}
        for ip in [ip for ip, p in self._permissions.items() if ip not in wanted and not p.pending]:
            del self._permissions[ip]  # left to lapse at the relay (RFC 8656 has no delete)
        for ip in wanted:
            self._permissions.setdefault(ip, _Permission())
        if self._state != "allocated":
            return
        for ip, p in self._permissions.items():
            if not p.pending and p.next_at <= now:
                p.pending = True
                self._request(sw.CREATE_PERMISSION, (), ip, now, (ip, 0))
        for peer, c in self._channels.items():
            if not c.pending and c.next_at <= now:
                c.pending = True
                self._request(sw.CHANNEL_BIND, [(sw.CHANNEL_NUMBER, sw.encode_channel_number(c.number))],
                              peer, now, peer)

    # -- relay data --------------------------------------------------------------------------------------

    def _from_server(self, source: Address) -> bool:
        if source[0] == self.server[0] and source[1] == self.server[1]:
            return True
        self.counters["wrong source"] += 1
        return False

    def _channel_data(self, data: bytes) -> tuple[Address, bytes] | None:
        try:
            number, payload = sw.decode_channel_data(data)
        except ParseError as e:  # pragma: no cover - is_channel_data was checked
            self.counters[f"parse error: {e}"] += 1
            return None
        peer = self._by_number.get(number)
        if peer is None:
            self.counters["unknown channel"] += 1
            return None
        return peer, payload

    def _data_indication(self, msg: sw.Message) -> tuple[Address, bytes] | None:
        if msg.method != sw.DATA or msg.cls != sw.INDICATION:
            self.counters["not relay data"] += 1
            return None
        peer, payload = msg.xor_peer_address(), msg.data()
        if peer is None or payload is None:
            self.counters["data indication incomplete"] += 1
            return None
        if peer[0] not in self._permissions:  # RFC 8656 §11.6: only from peers we permitted
            self.counters["data from an unpermitted peer"] += 1
            return None
        return peer, payload


def rest_credentials(turn_secret: bytes, name: str, unix_now: float, ttl: int = REST_TTL) -> tuple[str, str]:
    """TURN REST (username, password) for device ``name``, valid for ``ttl`` seconds from ``unix_now`` (the
    wall clock: the relay compares the expiry with its own), keyed with the account's relay secret
    (:attr:`tunneld.config_model.Config.turn_secret`)."""
    return sw.turn_rest_credentials(turn_secret, name, int(unix_now) + ttl)
