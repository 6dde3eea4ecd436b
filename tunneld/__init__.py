"""tunneld: Back to My Mac for Linux.

Each machine gets a stable IPv6 ULA bound to its key; machines of one account reach each other through
ESP-in-UDP tunnels keyed by a Noise IKpsk2 handshake, and find each other through DNS.
"""

import os

__version__ = "0.1.0"

# numpy's OpenBLAS starts a worker thread per core when it is imported. tunneld does no linear algebra,
# and dropping root must happen while the process has one thread (capabilities are per thread):
# docs/privilege.md. Set before anything imports numpy.
os.environ["OPENBLAS_NUM_THREADS"] = "1"
