"""Pure cryptographic cores of tunneld: no trio, no sockets, no clock.

ESP (RFC 4303) with AEAD suites (RFC 4106, RFC 7634), the anti-replay window (RFC 6479),
UDP encapsulation classification (RFC 3948), the Noise IKpsk2 handshake and HKDF derivations.
"""
