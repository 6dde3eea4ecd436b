"""The device's TLS client certificate under the account CA, kept fresh for as long as the daemon runs.

A DNS Push server checks the device's certificate at each TLS handshake, so a daemon that outlives one
certificate must bring a new one to its next connection. :meth:`DeviceCertificates.current` issues a new
leaf, with a new P-256 key, once less than :data:`RENEW_REMAINING` of the old one's life is left. The
account CA's key stays in memory for this, as the account's TSIG key does (either lets its holder act as
a device of the account); nothing is written to disk and no repr shows a key.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tunneld.accountca import AccountCA, issue_client, new_serial
from tunneld.config_model import ClientCertificate

__all__ = ["LIFETIME", "RENEW_REMAINING", "SKEW", "DeviceCertificates"]

LIFETIME: Final = 30 * 86400
"""Seconds a device certificate is valid: short, because its key lives only in one process's memory and a
new one costs about a millisecond."""
RENEW_REMAINING: Final = 10 * 86400
"""A certificate with less than this left is replaced at the next connection (a third of its life: a
laptop suspended for a week still wakes up with a valid one)."""
SKEW: Final = 3600
"""Seconds a certificate is valid before it was made, for a server whose clock runs behind."""


class DeviceCertificates:
    """The client certificates of one device (``<device>.<domain>``, clientAuth) under the account CA
    ``ca``. The first is issued at construction, so a bad device name is found when the config loads."""

    def __init__(self, ca: AccountCA, device: str, now: float,
                 rand: Callable[[int], bytes] = os.urandom) -> None:
        self.ca = ca
        self.device = device
        self._rand = rand
        self.issued = 0
        self._current, self._not_after = self._issue(now)

    def current(self, now: float) -> ClientCertificate:
        """The certificate to present at a connection made at ``now`` (Unix time): the one held, or a new
        one when the held one has less than :data:`RENEW_REMAINING` left (or the clock went back before
        its start)."""
        not_before = self._not_after - LIFETIME - SKEW
        if not (not_before <= now <= self._not_after - RENEW_REMAINING):
            self._current, self._not_after = self._issue(now)
        return self._current

    def _issue(self, now: float) -> tuple[ClientCertificate, int]:
        key = ec.generate_private_key(ec.SECP256R1())
        start = int(now)
        leaf = issue_client(self.ca, self.device, key.public_key(), start - SKEW, start + LIFETIME,
                            new_serial(self._rand))
        pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        self.issued += 1
        chain = leaf.public_bytes(serialization.Encoding.PEM) + self.ca.pem
        return ClientCertificate(chain, pem_key), start + LIFETIME

    def __repr__(self) -> str:
        return f"DeviceCertificates({self.device!r}, {self.ca!r})"

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("DeviceCertificates holds the account CA's private key and cannot be pickled")
