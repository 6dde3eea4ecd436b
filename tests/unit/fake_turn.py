"""An in-memory TURN server (RFC 8656) for unit tests of the client core: long-term credentials with a
realm and a rotating nonce, allocations per client address, permissions, channels, Send/Data indications.

Small and strict: every signed request is checked (USERNAME known, MESSAGE-INTEGRITY under the long-term
key, the current nonce) the way coturn checks it, and what it did is kept for the tests to look at.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunneld.proto import stun_wire as sw
from tunneld.proto.core import Address

REALM = "example.net"
RELAY: Address = ("203.0.113.9", 3478)


@dataclass
class Allocation:
    relayed: Address
    lifetime: int
    username: str
    permissions: set[str] = field(default_factory=set)
    channels: dict[int, Address] = field(default_factory=dict)


class FakeRelay:
    def __init__(self, users: dict[str, str], address: Address = RELAY) -> None:
        self.users = dict(users)
        self.address = address
        self.nonce = "nonce-1"
        self.allocations: dict[Address, Allocation] = {}
        self.requests: list[sw.Message] = []  # every request, in order
        self.sent: list[tuple[Address, bytes]] = []  # Send indications: (peer, data)
        self.max_lifetime = 3600
        self.next_port = 50000

    def handle(self, payload: bytes, source: Address) -> list[bytes]:
        """The answers to one datagram from ``source`` (empty for an indication)."""
        msg = sw.decode(payload)
        if msg.cls == sw.INDICATION:
            if msg.method == sw.SEND and source in self.allocations:
                peer, data = msg.xor_peer_address(), msg.data()
                assert peer is not None and data is not None
                self.sent.append((peer, data))
            return []
        assert msg.cls == sw.REQUEST
        self.requests.append(msg)
        username = msg.username()
        if username is None or msg.get(sw.MESSAGE_INTEGRITY) is None:
            return [self.error(msg, 401, "Unauthorized", challenge=True)]
        password = self.users.get(username)
        if password is None or not sw.check_integrity(msg, self.key(username)):
            return [self.error(msg, 401, "Unauthorized", challenge=True)]
        if msg.nonce() != self.nonce:
            return [self.error(msg, 438, "Stale Nonce", challenge=True)]
        key = self.key(username)
        alloc = self.allocations.get(source)
        if msg.method == sw.ALLOCATE:
            if alloc is not None:
                return [self.error(msg, 437, "Allocation Mismatch", key=key)]
            lifetime = min(msg.lifetime() or 600, self.max_lifetime)
            relayed = (self.address[0], self.next_port)
            self.next_port += 1
            self.allocations[source] = Allocation(relayed, lifetime, username)
            return [self.success(msg, key, [
                (sw.XOR_RELAYED_ADDRESS, sw.encode_xor_address(relayed, msg.transaction_id)),
                (sw.XOR_MAPPED_ADDRESS, sw.encode_xor_address(source, msg.transaction_id)),
                (sw.LIFETIME, sw.encode_u32(lifetime))])]
        if alloc is None:
            return [self.error(msg, 437, "Allocation Mismatch", key=key)]
        if username != alloc.username:
            return [self.error(msg, 441, "Wrong Credentials", key=key)]
        if msg.method == sw.REFRESH:
            asked = msg.lifetime()
            lifetime = min(600 if asked is None else asked, self.max_lifetime)
            if lifetime == 0:
                del self.allocations[source]
            else:
                alloc.lifetime = lifetime
            return [self.success(msg, key, [(sw.LIFETIME, sw.encode_u32(lifetime))])]
        peer = msg.xor_peer_address()
        assert peer is not None
        if msg.method == sw.CREATE_PERMISSION:
            alloc.permissions.add(peer[0])
            return [self.success(msg, key)]
        if msg.method == sw.CHANNEL_BIND:
            number = msg.channel_number()
            assert number is not None
            alloc.channels[number] = peer
            alloc.permissions.add(peer[0])
            return [self.success(msg, key)]
        return [self.error(msg, 400, "Bad Request", key=key)]

    def key(self, username: str) -> bytes:
        return sw.long_term_key(username, REALM, self.users[username])

    def success(self, msg: sw.Message, key: bytes, attrs: list[sw.Attribute] | None = None) -> bytes:
        return sw.encode(msg.method, sw.SUCCESS, msg.transaction_id, attrs or [], integrity_key=key)

    def error(self, msg: sw.Message, code: int, reason: str, *, challenge: bool = False,
              key: bytes | None = None) -> bytes:
        attrs: list[sw.Attribute] = [(sw.ERROR_CODE, sw.encode_error_code(code, reason))]
        if challenge:
            attrs += [(sw.REALM, REALM.encode()), (sw.NONCE, self.nonce.encode())]
        return sw.encode(msg.method, sw.ERROR, msg.transaction_id, attrs, integrity_key=key)

    def data_indication(self, peer: Address, data: bytes, tid: bytes = bytes(12)) -> bytes:
        return sw.encode(sw.DATA, sw.INDICATION, tid, [
            (sw.XOR_PEER_ADDRESS, sw.encode_xor_address(peer, tid)), (sw.DATA_ATTR, data)])
