"""The session timers and limits shared by the handshake and the peer state, with where they come from.

They are WireGuard's (whitepaper §6, wireguard-go device/constants.go), because our
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
