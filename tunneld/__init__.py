"""tunneld: Back to My Mac for Linux.

Each machine gets a stable IPv6 ULA bound to its key; machines of one account reach each other through
ESP-in-UDP tunnels keyed by a Noise IKpsk2 handshake, and find each other through DNS.
"""

__version__ = "0.1.0"
