"""Protocol constants, in one place, with where they come from.

Timers and limits are WireGuard's (whitepaper §6, wireguard-go device/constants.go), because our
handshake is WireGuard's construction and the same reasoning about key lifetime applies.
"""

from __future__ import annotations

from typing import Final

REKEY_AFTER_MESSAGES: Final = 1 << 60  # start a new handshake after this many packets on a key
REKEY_AFTER_TIME: Final = 120.0  # seconds: the initiator of a session starts a new handshake
REJECT_AFTER_TIME: Final = 180.0  # seconds: a session is neither used nor accepted after this
REKEY_ATTEMPT_TIME: Final = 90.0  # seconds: give up retrying a handshake after this
REKEY_TIMEOUT: Final = 5.0  # seconds between handshake initiation retries
REKEY_TIMEOUT_JITTER_MAX: Final = 1.0 / 3  # seconds of random jitter added to each retry
KEEPALIVE_TIMEOUT: Final = 10.0  # seconds: answer received data with a keepalive if nothing else left
COOKIE_REFRESH_TIME: Final = 120.0  # seconds: lifetime of a cookie and of the cookie secret
HANDSHAKE_INITIATIONS_PER_SECOND: Final = 50  # initiations accepted from one peer per second

MAX_STAGED_PACKETS: Final = 128  # packets held per peer while its handshake is in progress

DEFAULT_PORT: Final = 4500  # RFC 3948 §1: UDP-encapsulated ESP (and the non-ESP marker) share it
DEFAULT_MTU: Final = 1400
# Outer overhead of one tunnelled packet: IPv6 40 + UDP 8 + ESP header 16 + at most 3 pad + 2 trailer
# + ICV 16 = 85 bytes; 1400 leaves room on a 1500-byte path for either outer family.
OUTER_OVERHEAD_V6: Final = 40 + 8 + 16 + 3 + 2 + 16

# ---------------------------------------------------------------------------------------------------------
# NAT-PMP (RFC 6886) and PCP (RFC 6887): port mapping on the default gateway. Used by tunneld.proto.natpmp.
# Facts and their sources: /work/shared/PROTOCOLS.md section 2.
# ---------------------------------------------------------------------------------------------------------

PORTMAP_SERVER_PORT: Final = 5351  # RFC 6886 §3.1, RFC 6887 §19.1: the gateway listens here (both protocols)
PORTMAP_CLIENT_PORT: Final = 5350  # RFC 6886 §3.2.1, RFC 6887 §14.1.3: announcements arrive here
PORTMAP_ANNOUNCE_GROUP: Final = "224.0.0.1"  # all-hosts group the announcements are multicast to

NATPMP_VERSION: Final = 0  # RFC 6886 §3
NATPMP_OP_ADDRESS: Final = 0  # §3.2 public address request
NATPMP_OP_MAP_UDP: Final = 1  # §3.3
NATPMP_OP_MAP_TCP: Final = 2  # §3.3
NATPMP_OP_RESPONSE: Final = 128  # §3.2: a response's opcode is 128 + the request's
NATPMP_ADDRESS_RESPONSE_LEN: Final = 12  # §3.2
NATPMP_MAP_REQUEST_LEN: Final = 12  # §3.3
NATPMP_MAP_RESPONSE_LEN: Final = 16  # §3.3
NATPMP_ERROR_RESPONSE_LEN: Final = 8  # §3.5: vers, op, result, SSSoE only (miniupnpd resplen=8)
NATPMP_RESULT_SUCCESS: Final = 0  # §3.5 result codes
NATPMP_RESULT_UNSUPPORTED_VERSION: Final = 1
NATPMP_RESULT_NOT_AUTHORIZED: Final = 2
NATPMP_RESULT_NETWORK_FAILURE: Final = 3
NATPMP_RESULT_OUT_OF_RESOURCES: Final = 4
NATPMP_RESULT_UNSUPPORTED_OPCODE: Final = 5
NATPMP_INITIAL_RETRY: Final = 0.250  # §3.1: first wait 250 ms, doubling each time
NATPMP_MAX_ATTEMPTS: Final = 9  # §3.1: after the 9th attempt (and its 64 s wait) there is no NAT-PMP
NATPMP_MAX_RETRY_INTERVAL: Final = 900.0  # mDNSResponder NATMAP_MAX_RETRY_INTERVAL: keep trying, 15 min cap
NATPMP_DEFAULT_LIFETIME: Final = 7200  # §3.3 recommended requested lifetime (Apple NATMAP_DEFAULT_LEASE)
NATPMP_MIN_RENEW_INTERVAL: Final = 2.0  # mDNSResponder NATSetNextRenewalTime: renew no sooner than 2 s
NATPMP_EPOCH_SLACK: Final = 2.0  # §3.6: seconds of slack in the 7/8 elapsed-time rule

PCP_VERSION: Final = 2  # RFC 6887 §7 (NAT-PMP is version 0, §9)
PCP_OP_ANNOUNCE: Final = 0  # §14.1
PCP_OP_MAP: Final = 1  # §11
PCP_R_BIT: Final = 0x80  # §7.1/§7.2: set in responses
PCP_HEADER_LEN: Final = 24  # §7.1 request header and §7.2 response header
PCP_MAP_BODY_LEN: Final = 36  # §11.1
PCP_MAX_MESSAGE_LEN: Final = 1100  # §7, §8.3: longer responses are invalid
PCP_NONCE_LEN: Final = 12  # §11.1: 96-bit mapping nonce
PCP_PROTO_TCP: Final = 6  # §11.1 protocol field (IANA protocol numbers)
PCP_PROTO_UDP: Final = 17
PCP_RESULT_SUCCESS: Final = 0  # §7.4 result codes
PCP_RESULT_UNSUPP_VERSION: Final = 1
PCP_RESULT_NOT_AUTHORIZED: Final = 2
PCP_RESULT_MALFORMED_REQUEST: Final = 3
PCP_RESULT_UNSUPP_OPCODE: Final = 4
PCP_RESULT_UNSUPP_OPTION: Final = 5
PCP_RESULT_MALFORMED_OPTION: Final = 6
PCP_RESULT_NETWORK_FAILURE: Final = 7
PCP_RESULT_NO_RESOURCES: Final = 8
PCP_RESULT_UNSUPP_PROTOCOL: Final = 9
PCP_RESULT_USER_EX_QUOTA: Final = 10
PCP_RESULT_CANNOT_PROVIDE_EXTERNAL: Final = 11
PCP_RESULT_ADDRESS_MISMATCH: Final = 12
PCP_RESULT_EXCESSIVE_REMOTE_PEERS: Final = 13
PCP_IRT: Final = 3.0  # §8.1.1: initial retransmission time, doubling
PCP_MRT: Final = 1024.0  # §8.1.1: maximum retransmission time (MRC = MRD = 0: no count or duration limit)
PCP_RAND: Final = 0.1  # §8.1.1: each interval randomised by ±10%
PCP_RENEW_MIN_FRACTION: Final = 0.5  # §11.2.1: renew between 1/2 ...
PCP_RENEW_MAX_FRACTION: Final = 0.625  # ... and 5/8 of the lifetime
PCP_ANNOUNCE_MAX_DELAY: Final = 5.0  # §14.1.3: wait a random 0-5 s before re-checking after an ANNOUNCE
# Our choice: after an ANNOUNCE whose epoch shows the gateway rebooted, re-map within 0-1 s.
PCP_ANNOUNCE_LOST_STATE_DELAY: Final = 1.0
PCP_EPOCH_SLACK: Final = 2.0  # §8.5: seconds of slack in both elapsed-time rules (plus 1/16 drift)
PCP_EPOCH_BACKWARDS_TOLERANCE: Final = 1  # §8.5: going backwards by up to one second is not invalid

PORTMAP_ERROR_RETRY: Final = 30.0  # our choice: first retry after an error result (miniupnpd's short-error
# lifetime); doubles up to NATPMP_MAX_RETRY_INTERVAL. A PCP error's lifetime, when longer, is obeyed.
PORTMAP_ANNOUNCE_HOLDOFF: Final = 64.0  # our choice: a gateway repeats an announcement ~10 times over ~64 s
# (RFC 6886 §3.2.1); repeats within this window re-check only if they carry news (new address or epoch)
# Our choice: after this many unanswered PCP requests from a gateway that never answered anything
# (3 s and about 6 s more), also try NAT-PMP: some NAT-PMP-only routers drop PCP silently.
PCP_SILENT_FALLBACK_ATTEMPTS: Final = 2
