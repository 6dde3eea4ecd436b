"""The one exception type for malformed network input."""

from __future__ import annotations

__all__ = ["ParseError"]


class ParseError(Exception):
    """Network input that is not a well-formed message: truncated, oversized, wrong type, bad reserved bits.

    Every parser of network input in tunneld raises this and nothing else for bad input, so a receive path
    needs exactly one ``except`` clause. ``str(error)`` is a short, fixed reason (such as ``"truncated"``)
    suitable as a counter name; it never contains the offending bytes.
    """
