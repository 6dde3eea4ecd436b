"""The offload fast path, without I/O: TCP segmentation and receive coalescing for a TUN with
IFF_VNET_HDR, and runs (many packets of one flow handled as one object). docs/fastpath.md explains the
design and its measurements."""
