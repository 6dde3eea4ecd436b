"""The only code that touches the kernel: the TUN device, the outer UDP socket, links and routes."""
