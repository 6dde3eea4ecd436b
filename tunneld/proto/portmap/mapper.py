"""The port mapper: one UDP mapping on the default gateway, PCP (RFC 6887) first, NAT-PMP (RFC 6886) after.

A sans-I/O core (:mod:`tunneld.proto.core`): datagrams from the gateway -- answers and announcements alike,
told apart by content and state -- go to :meth:`PortMapper.receive`, timers to :meth:`PortMapper.poll`;
requests come out of ``transmits()`` and :mod:`~tunneld.proto.portmap.events` out of ``events()``.
Randomness (PCP nonces, jitter, renewal and ANNOUNCE delays) comes from ``rand``. The behaviour (fall-back,
retransmission, renewal, epochs, announcements, double NAT, shutdown) is described in docs/portmap.md.
"""

from __future__ import annotations

import ipaddress
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from tunneld.proto.core import Address, Outbox
from tunneld.proto.errors import ParseError
from tunneld.proto.portmap.addresses import external_address_problem
from tunneld.proto.portmap.events import (
    Endpoint,
    EndpointChanged,
    Granted,
    MapperState,
    PortmapEvent,
    Refused,
)
from tunneld.proto.portmap.natpmp_wire import (
    NATPMP_DEFAULT_LIFETIME,
    NATPMP_EPOCH_SLACK,
    NATPMP_INITIAL_RETRY,
    NATPMP_MAX_ATTEMPTS,
    NATPMP_OP_MAP_UDP,
    NATPMP_RESULT_SUCCESS,
    NATPMP_RESULT_UNSUPPORTED_VERSION,
    NATPMP_VERSION,
    PORTMAP_SERVER_PORT,
    NatPmpAddressResponse,
    NatPmpMapResponse,
    encode_natpmp_address_request,
    encode_natpmp_map_request,
    natpmp_result_message,
    parse_natpmp_response,
)
from tunneld.proto.portmap.pcp_wire import (
    PCP_ANNOUNCE_MAX_DELAY,
    PCP_EPOCH_BACKWARDS_TOLERANCE,
    PCP_EPOCH_SLACK,
    PCP_IRT,
    PCP_MRT,
    PCP_NONCE_LEN,
    PCP_OP_ANNOUNCE,
    PCP_OP_MAP,
    PCP_PROTO_UDP,
    PCP_RAND,
    PCP_RENEW_MAX_FRACTION,
    PCP_RENEW_MIN_FRACTION,
    PCP_RESULT_SUCCESS,
    PCP_VERSION,
    PcpResponse,
    encode_pcp_map_request,
    parse_pcp_response,
    pcp_result_message,
)

__all__ = ["NATPMP", "PCP", "PortMapper"]

NATPMP: Final = "nat-pmp"
PCP: Final = "pcp"

# Our choices (the RFCs leave them open); docs/portmap.md gives the reasons.
MAX_RETRY_INTERVAL: Final = 900.0  # mDNSResponder NATMAP_MAX_RETRY_INTERVAL: keep trying, 15 min cap
MIN_RENEW_INTERVAL: Final = 2.0  # mDNSResponder NATSetNextRenewalTime: renew no sooner than 2 s
ERROR_RETRY: Final = 30.0  # first retry after an error result (miniupnpd's short-error lifetime), doubling
ANNOUNCE_HOLDOFF: Final = 64.0  # repeats of one announcement (~10 over ~64 s, RFC 6886 §3.2.1) re-check once
ANNOUNCE_LOST_STATE_DELAY: Final = 1.0  # re-map within 0-1 s after an ANNOUNCE that shows a reboot
SILENT_FALLBACK_ATTEMPTS: Final = 2  # unanswered PCP requests before also trying NAT-PMP

Message = NatPmpAddressResponse | NatPmpMapResponse | PcpResponse


@dataclass
class _Retry:
    """One request under retransmission: what to send, how often it went, when next."""

    protocol: str
    payload: bytes
    attempts: int = 0
    interval: float = 0.0
    next_at: float = 0.0


@dataclass
class _Epoch:
    at: float  # our time when the previous packet arrived
    epoch: int  # its SSSoE / Epoch Time


@dataclass
class _Status:
    code: int | None = None
    message: str = "not started"
    no_answer: bool = False


class PortMapper(Outbox[PortmapEvent]):
    """PCP/NAT-PMP client state for one UDP mapping of ``internal_address``:``internal_port``.

    :meth:`start` queues the first request; :meth:`close` the delete. ``rand(n)`` returns n random bytes.
    Bad input is counted in :attr:`counters` and dropped; nothing from the network raises.
    """

    def __init__(self, internal_address: str, internal_port: int, gateway: str,
                 lifetime: int = NATPMP_DEFAULT_LIFETIME, rand: Callable[[int], bytes] = os.urandom,
                 suggested_external_port: int | None = None) -> None:
        super().__init__()
        ipaddress.IPv4Address(internal_address)  # ValueError early for a bad configuration
        ipaddress.IPv4Address(gateway)
        if not 0 < internal_port < 65536:
            raise ValueError("internal port out of range")
        if lifetime <= 0:
            raise ValueError("requested lifetime must be positive (0 deletes)")
        self.internal_address = internal_address
        self.internal_port = internal_port
        self.gateway = gateway
        self.requested_lifetime = lifetime
        self.rand = rand
        self.counters: Counter[str] = Counter()
        self.wire: str = PCP  # the protocol we send
        self.protocol: str | None = None  # the protocol the gateway has answered in
        self._suggested_port = internal_port if suggested_external_port is None else suggested_external_port
        self._nonce = self._new_nonce()
        self._map: _Retry | None = None
        self._addr: _Retry | None = None  # NAT-PMP only: PCP's MAP answer carries the address
        self._next_attempt: float | None = None  # renewal, or retry after an error
        self._expires_at: float | None = None
        self._recheck_at: float | None = None  # delayed re-check after a PCP ANNOUNCE
        self._last_recheck: float | None = None
        self._error_backoff = 0.0
        self._epochs: dict[str, _Epoch] = {}
        self._external_address: str | None = None
        self._external_port: int | None = None
        self._lifetime: int | None = None
        self._double_nat: str | None = None
        self._endpoint: Endpoint | None = None
        self._status = _Status()
        self._started = False
        self._closed = False
        self._delete_pending = False  # closed with a mapping held: the delete awaits its answer
        self._delete_confirmed = False

    # -- public API --------------------------------------------------------------------------------------

    @property
    def nonce(self) -> bytes:
        """The current PCP mapping nonce (§11.1)."""
        return self._nonce

    @property
    def delete_confirmed(self) -> bool:
        """True once the gateway answered the delete sent by :meth:`close` with success."""
        return self._delete_confirmed

    @property
    def state(self) -> MapperState:
        s = self._status
        return MapperState(
            protocol=self.protocol, gateway=self.gateway, internal_port=self.internal_port,
            external_address=self._external_address, external_port=self._external_port,
            lifetime=self._lifetime, expires_at=self._expires_at, endpoint=self._endpoint,
            result_code=s.code, result_message=s.message, double_nat=self._double_nat is not None,
            double_nat_message=self._double_nat, no_answer=s.no_answer)

    def start(self, now: float) -> None:
        """Queue the first request (PCP MAP)."""
        if self._started:
            return
        self._started = True
        self._set_status(None, f"asking gateway {self.gateway} for a mapping (PCP)")
        self._begin(now)

    def receive(self, data: bytes, source: Address, now: float) -> None:
        """A datagram from the gateway: an answer (from its port 5351) or an announcement."""
        if not self._started:
            self.counters["not running"] += 1
            return
        if source[0] != self.gateway:
            self.counters["wrong source"] += 1
            return
        try:
            msg = _parse(data)
        except ParseError as e:
            self.counters[f"parse error: {e}"] += 1
            return
        if not self._closed:
            if isinstance(msg, PcpResponse) and msg.opcode == PCP_OP_ANNOUNCE:
                self._on_pcp_announce(msg, now)
                return
            if isinstance(msg, NatPmpAddressResponse) and self._unsolicited(msg):
                self._on_natpmp_announce(msg, now)
                return
        if source[1] != PORTMAP_SERVER_PORT:  # answers come from the port the requests went to
            self.counters["wrong source"] += 1
        elif self._closed:
            self._on_closed(msg)
        elif isinstance(msg, PcpResponse):
            self._on_pcp_map(msg, now)
        else:
            self._on_natpmp(msg, now)

    def poll(self, now: float) -> None:
        """Run the timers that are due: expiry, re-check, renewal or error retry, retransmissions."""
        if not self._started or self._closed:
            return
        if self._expires_at is not None and now >= self._expires_at:
            self._expire(now)
        recheck = self._recheck_at is not None and now >= self._recheck_at
        if recheck:
            self._recheck_at = None
            self._last_recheck = now
        if recheck or (self._next_attempt is not None and now >= self._next_attempt):
            self._begin(now)
        for retry in (self._addr, self._map):
            if retry is not None and now >= retry.next_at:
                if retry.protocol == PCP and self.protocol is None and \
                        retry.attempts >= SILENT_FALLBACK_ATTEMPTS:
                    # Some NAT-PMP-only routers drop PCP silently instead of answering version 0
                    # (RFC 6886 §3.5 says they should): after two unanswered PCP requests from a
                    # gateway that never answered anything, ask in NAT-PMP too. A PCP ANNOUNCE
                    # switches back.
                    self.wire = NATPMP
                    self.counters["fell back to NAT-PMP after PCP silence"] += 1
                    self._set_status(None, f"no answer to PCP from {self.gateway}; trying NAT-PMP")
                    self._begin(now)
                    break
                self._on_timeout(retry)
                self._transmit(retry, now)

    def deadline(self) -> float | None:
        """When :meth:`poll` next has work, or None."""
        if not self._started or self._closed:
            return None
        times = [t for t in (self._expires_at, self._recheck_at, self._next_attempt) if t is not None]
        times += [r.next_at for r in (self._addr, self._map) if r is not None]
        return min(times, default=None)

    def close(self, now: float) -> None:
        """Delete the mapping (lifetime 0, suggested port 0) in the protocol in use; sent once. The
        endpoint is withdrawn at once; :meth:`finished` waits for the answer if a mapping was held."""
        if not self._started or self._closed:
            return
        self._closed = True
        self._delete_pending = self._external_port is not None
        if self.wire == PCP:
            payload = encode_pcp_map_request(self._nonce, self.internal_address, self.internal_port, 0)
        else:
            payload = encode_natpmp_map_request(self.internal_port, 0, 0)
        self._map = self._addr = None
        self._next_attempt = self._expires_at = self._recheck_at = None
        self._external_port = self._lifetime = None
        self._set_status(None, "mapping deleted (shutting down)")
        self._update_endpoint(now)
        self._send((self.gateway, PORTMAP_SERVER_PORT), payload)

    def finished(self) -> bool:
        """True when nothing was started, or once closed and the delete needs nothing more: answered, or
        no mapping was held."""
        return not self._started or (self._closed and not self._delete_pending)

    # -- sending -----------------------------------------------------------------------------------------

    def _new_nonce(self) -> bytes:
        nonce = self.rand(PCP_NONCE_LEN)
        if len(nonce) != PCP_NONCE_LEN:
            raise ValueError("rand returned the wrong number of bytes")
        return nonce

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * int.from_bytes(self.rand(4), "big") / 2**32

    def _map_payload(self) -> bytes:
        if self.wire == PCP:
            suggested = self._external_address if self._double_nat is None else None
            return encode_pcp_map_request(self._nonce, self.internal_address, self.internal_port,
                                          self.requested_lifetime, self._suggested_port, suggested)
        return encode_natpmp_map_request(self.internal_port, self._suggested_port, self.requested_lifetime)

    def _begin(self, now: float, map_: bool = True, addr: bool = True) -> None:
        """Start fresh requests (first attempt now): the mapping and, for NAT-PMP, the public address."""
        if self.wire == PCP:
            self._addr = None
        elif addr:
            self._addr = _Retry(NATPMP, encode_natpmp_address_request())
            self._transmit(self._addr, now)
        if map_:
            self._next_attempt = None  # the answer schedules the renewal (or the retry after an error)
            self._map = _Retry(self.wire, self._map_payload())
            self._transmit(self._map, now)

    def _transmit(self, retry: _Retry, now: float) -> None:
        retry.attempts += 1
        if retry.protocol == NATPMP:
            # RFC 6886 §3.1: 250 ms, doubling; mDNSResponder keeps doubling after the 9th attempt, to 15 min.
            retry.interval = min(NATPMP_INITIAL_RETRY * 2 ** (retry.attempts - 1), MAX_RETRY_INTERVAL)
        else:
            # RFC 6887 §8.1.1: RT = (1 + RAND) * IRT, then RT = (1 + RAND) * MIN(2 * RTprev, MRT).
            base = PCP_IRT if retry.attempts == 1 else min(2 * retry.interval, PCP_MRT)
            retry.interval = base * (1 + self._uniform(-PCP_RAND, PCP_RAND))
        retry.next_at = now + retry.interval
        self._send((self.gateway, PORTMAP_SERVER_PORT), retry.payload)

    def _on_timeout(self, retry: _Retry) -> None:
        """A retransmission timer fired without an answer: update the status before re-sending."""
        if retry.protocol == NATPMP and retry.attempts == NATPMP_MAX_ATTEMPTS:
            self._status = _Status(None, f"no NAT-PMP: gateway {self.gateway} did not answer "
                                   f"{NATPMP_MAX_ATTEMPTS} attempts over 64 s; still retrying, "
                                   "at most every 15 min", no_answer=True)
        elif retry.protocol == PCP and retry.attempts >= 3 and self.protocol is None:
            self._status = _Status(None, f"no answer from gateway {self.gateway} to {retry.attempts} PCP "
                                   "requests; still retrying", no_answer=True)

    # -- receiving ---------------------------------------------------------------------------------------

    def _unsolicited(self, msg: NatPmpAddressResponse) -> bool:
        """An address response that answers nothing we asked: an announcement (RFC 6886 §3.2.1). One
        arriving while our own address request is pending is taken as its answer: it carries the same fact."""
        return self._addr is None and msg.result != NATPMP_RESULT_UNSUPPORTED_VERSION

    def _epoch_lost(self, protocol: str, epoch: int, now: float) -> bool:
        """Record this packet's epoch; True if it shows the gateway lost state (NAT-PMP §3.6, PCP §8.5)."""
        prev = self._epochs.get(protocol)
        self._epochs[protocol] = _Epoch(now, epoch)
        if prev is None:
            return False
        ours = now - prev.at
        theirs = epoch - prev.epoch
        if protocol == NATPMP:
            return epoch < prev.epoch or theirs + NATPMP_EPOCH_SLACK < ours - ours / 8
        if epoch + PCP_EPOCH_BACKWARDS_TOLERANCE < prev.epoch:
            return True
        return (ours + PCP_EPOCH_SLACK < theirs - theirs / 16
                or theirs + PCP_EPOCH_SLACK < ours - ours / 16)

    def _on_natpmp(self, msg: NatPmpAddressResponse | NatPmpMapResponse, now: float) -> None:
        if msg.result == NATPMP_RESULT_UNSUPPORTED_VERSION:
            if self.wire != PCP:
                # We speak version 0 now: this is a late answer to an earlier PCP retransmission.
                self.counters["stale unsupported-version reply"] += 1
                return
            # RFC 6887 §9: a NAT-PMP-only gateway. Re-send every pending operation as NAT-PMP, now.
            self.wire = NATPMP
            self.counters["fell back to NAT-PMP"] += 1
            self._epochs.pop(NATPMP, None)
            self._epoch_lost(NATPMP, msg.epoch, now)
            self._set_status(None, f"gateway {self.gateway} does not speak PCP; using NAT-PMP")
            self._begin(now)
            return
        if self.wire != NATPMP:
            self.counters["stale NAT-PMP reply"] += 1
            return
        if isinstance(msg, NatPmpMapResponse) and (
                msg.opcode != NATPMP_OP_MAP_UDP or msg.internal_port not in (None, self.internal_port)):
            self.counters["other mapping"] += 1
            return
        lost = self._epoch_lost(NATPMP, msg.epoch, now)
        self.protocol = NATPMP
        if isinstance(msg, NatPmpAddressResponse):
            ok = self._on_natpmp_address(msg, now)
            if lost:
                self._recreate(now, addr=not ok)
            return
        ok = self._on_natpmp_map(msg, now)
        if lost:
            self._recreate(now, map_=not ok)

    def _on_natpmp_address(self, msg: NatPmpAddressResponse, now: float) -> bool:
        self._addr = None
        if msg.result != NATPMP_RESULT_SUCCESS or msg.external_address is None:
            self._fail(now, msg.result, natpmp_result_message(msg.result))
            return False
        self._set_external_address(msg.external_address, now)
        return True

    def _on_natpmp_map(self, msg: NatPmpMapResponse, now: float) -> bool:
        self._map = None
        if msg.result != NATPMP_RESULT_SUCCESS or msg.external_port is None or msg.lifetime is None:
            self._fail(now, msg.result, natpmp_result_message(msg.result))
            return False
        if msg.lifetime == 0 or msg.external_port == 0:
            self._fail(now, msg.result, "NAT-PMP result 0 but no mapping granted (lifetime or external "
                       "port 0): treated as a failure")
            return False
        self._granted(now, msg.external_port, msg.lifetime)
        return True

    def _on_pcp_map(self, msg: PcpResponse, now: float) -> None:
        if self.wire != PCP:
            self.counters["stale PCP reply"] += 1
            return
        if msg.map is not None:
            if msg.map.nonce != self._nonce:
                self.counters["nonce mismatch"] += 1
                return
            if msg.map.protocol != PCP_PROTO_UDP or msg.map.internal_port != self.internal_port:
                self.counters["other mapping"] += 1
                return
        lost = self._epoch_lost(PCP, msg.epoch, now)
        self.protocol = PCP
        self._map = None
        if msg.result != PCP_RESULT_SUCCESS or msg.map is None:
            self._fail(now, msg.result, pcp_result_message(msg.result), hint=msg.lifetime)
        elif msg.lifetime == 0 or msg.map.external_port == 0:
            self._fail(now, msg.result, "PCP result 0 but no mapping granted (lifetime or external port 0): "
                       "treated as a failure")
        else:
            if lost:
                # The gateway lost its state, but this answer is a mapping it holds now: keep it
                # (§8.5, §11.3).
                self.counters["gateway lost state"] += 1
            self._set_external_address(msg.map.external_address, now)
            self._granted(now, msg.map.external_port, msg.lifetime)
            return
        if lost:
            self._recreate(now)

    def _on_natpmp_announce(self, msg: NatPmpAddressResponse, now: float) -> None:
        if msg.result != NATPMP_RESULT_SUCCESS or msg.external_address is None:
            self.counters["announcement with error"] += 1
            return
        lost = self._epoch_lost(NATPMP, msg.epoch, now)
        news = lost or msg.external_address != self._external_address
        if self.wire == NATPMP:
            self._set_external_address(msg.external_address, now)  # an announcement is authoritative
        if lost:
            self.counters["gateway lost state"] += 1
            self._nonce = self._new_nonce()
        if not news and self._recently_rechecked(now):
            self.counters["repeated announcement"] += 1
            return
        self._last_recheck = now
        self._recheck_at = None
        self._begin(now)

    def _on_pcp_announce(self, msg: PcpResponse, now: float) -> None:
        lost = self._epoch_lost(PCP, msg.epoch, now)
        if self.wire != PCP:
            # The gateway speaks PCP now (a firmware update?): use it from the next request.
            self.wire = PCP
            self._epochs.pop(NATPMP, None)
            lost = True
        if lost:
            self.counters["gateway lost state"] += 1
            self._nonce = self._new_nonce()
        elif self._recheck_at is not None or self._recently_rechecked(now):
            self.counters["repeated announcement"] += 1
            return
        # §14.1.3: wait a random 0-5 s so that the gateway's clients do not all answer at once. When
        # the epoch proves the gateway lost its state, our mapping is already gone and inbound
        # traffic is failing: spread over 0-1 s only (our choice; a home gateway has few clients).
        spread = ANNOUNCE_LOST_STATE_DELAY if lost else PCP_ANNOUNCE_MAX_DELAY
        at = now + self._uniform(0.0, spread)
        self._recheck_at = at if self._recheck_at is None else min(at, self._recheck_at)
        self._last_recheck = now

    def _recently_rechecked(self, now: float) -> bool:
        return self._last_recheck is not None and now - self._last_recheck < ANNOUNCE_HOLDOFF

    def _on_closed(self, msg: Message) -> None:
        """After :meth:`close`: only the answer to the delete matters (an error answers it too)."""
        if not self._delete_pending or not self._answers_delete(msg):
            self.counters["not running"] += 1
            return
        self._delete_pending = False
        self._delete_confirmed = msg.result == 0
        if not self._delete_confirmed:
            failed = (natpmp_result_message(msg.result) if self.wire == NATPMP
                      else pcp_result_message(msg.result))
            self._set_status(msg.result, f"the gateway refused to delete the mapping: {failed}")

    def _answers_delete(self, msg: Message) -> bool:
        """The answer to our delete in the protocol in use: an error, or a success with lifetime 0."""
        if self.wire == NATPMP:
            return (isinstance(msg, NatPmpMapResponse) and msg.opcode == NATPMP_OP_MAP_UDP
                    and msg.internal_port in (None, self.internal_port)
                    and (msg.result != NATPMP_RESULT_SUCCESS or msg.lifetime == 0))
        if not isinstance(msg, PcpResponse) or msg.opcode != PCP_OP_MAP:
            return False
        if msg.map is not None and (msg.map.nonce != self._nonce or msg.map.protocol != PCP_PROTO_UDP
                                    or msg.map.internal_port != self.internal_port):
            return False
        return msg.result != PCP_RESULT_SUCCESS or msg.lifetime == 0

    # -- outcomes ----------------------------------------------------------------------------------------

    def _recreate(self, now: float, map_: bool = True, addr: bool = True) -> None:
        """The gateway lost its state: re-create at once, suggesting the port it granted before."""
        self.counters["gateway lost state"] += 1
        if map_:
            self._nonce = self._new_nonce()
            what = f"re-creating the mapping on external port {self._suggested_port}"
        else:
            what = "the mapping was just granted again; re-reading the external address"
        self._set_status(self._status.code, f"gateway {self.gateway} lost its state (epoch check); {what}")
        self._begin(now, map_=map_, addr=addr)

    def _granted(self, now: float, external_port: int, lifetime: int) -> None:
        self._external_port = external_port
        self._suggested_port = external_port  # renewals and re-creations ask for the same port
        self._lifetime = lifetime
        self._expires_at = now + lifetime
        self._error_backoff = 0.0
        if self.wire == NATPMP:
            renew = lifetime / 2
        else:
            renew = lifetime * self._uniform(PCP_RENEW_MIN_FRACTION, PCP_RENEW_MAX_FRACTION)
        self._next_attempt = now + max(renew, MIN_RENEW_INTERVAL)
        name = "PCP" if self.wire == PCP else "NAT-PMP"
        self._set_status(0, f"{name}: UDP port {self.internal_port} mapped to external port {external_port} "
                         f"for {lifetime} s")
        self._update_endpoint(now)
        self._emit(Granted(self.wire, external_port, lifetime, now))

    def _fail(self, now: float, code: int, message: str, hint: int = 0) -> None:
        """An error answer: report it, stop the pending requests, retry later (30 s doubling to 15 min)."""
        self._map = self._addr = None
        self._error_backoff = min(max(self._error_backoff * 2, ERROR_RETRY), MAX_RETRY_INTERVAL)
        self._next_attempt = now + max(float(hint), self._error_backoff)
        self._set_status(code, message)
        self._emit(Refused(self.wire, code, message, now))

    def _expire(self, now: float) -> None:
        self._expires_at = None
        self._external_port = self._lifetime = None
        self._set_status(self._status.code, "the mapping expired without being renewed; re-requesting "
                         f"external port {self._suggested_port}")
        self._update_endpoint(now)

    def _set_external_address(self, address: str, now: float) -> None:
        self._external_address = address
        self._double_nat = external_address_problem(address)
        self._update_endpoint(now)

    def _set_status(self, code: int | None, message: str) -> None:
        self._status = _Status(code, message)

    def _update_endpoint(self, now: float) -> None:
        endpoint = None
        if (self._external_address is not None and self._external_port is not None
                and self._double_nat is None and not self._closed):
            endpoint = Endpoint(self._external_address, self._external_port)
        if endpoint != self._endpoint:
            event = EndpointChanged(self._endpoint, endpoint, now)
            self._endpoint = endpoint
            self._emit(event)


def _parse(data: bytes) -> Message:
    """NAT-PMP (version 0) or PCP (version 2), by the first byte; ParseError for anything else."""
    if data[:1] == bytes((NATPMP_VERSION,)):
        return parse_natpmp_response(data)
    if data[:1] == bytes((PCP_VERSION,)):
        return parse_pcp_response(data)
    raise ParseError("truncated" if not data else "version")
