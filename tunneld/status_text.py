"""`tunneld status` as text: the daemon's status (the control socket's JSON) in a few lines per section
and per peer, for people; scripts read `--json`."""

from __future__ import annotations

import time
from typing import Any

from tunneld.ping import path_line

__all__ = ["render_status"]


def _offload_line(st: dict[str, Any]) -> str:
    """Whether TUN offload is on, and how much of the traffic took the fast path (runs)."""
    if not st.get("offload"):
        return f"offload: off ({st.get('offload_error') or 'unknown reason'})"
    c = st.get("counters") or {}
    got = c.get("rx_datagrams", 0)
    share = f", {100 * c.get('rx_run_datagrams', 0) / got:.0f}% of received datagrams opened in runs" \
        if got else ""
    return f"offload: on ({c.get('tx_runs', 0)} superpackets sealed as runs{share})"


def _endpoint_origin(p: dict[str, Any]) -> str:
    source, age = p.get("endpoint_source"), p.get("endpoint_age")
    if not p.get("endpoint") or not source:
        return ""
    return f" (from {source}" + (f", {age:g} s ago)" if age is not None else ")")


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.2f} TiB"


def render_status(st: dict[str, Any]) -> str:
    """The text of `tunneld status` for the daemon's status ``st``."""
    starting = " (starting)" if st.get("state") == "starting" else ""
    out = [f"interface: {st['interface']}{starting}", f"  ula: {st['ula']}",
           f"  public key: {st['public_key']}",
           f"  listening port: {st['listen_port']} (GSO {'on' if st['gso'] else 'off'}, "
           f"GRO {'on' if st['gro'] else 'off'})", "  " + _offload_line(st)]
    net = st.get("network") or {}
    if net.get("generation"):
        out.append(f"  network: moved {net['generation']} time(s), last {net.get('last_change_ago')} s ago "
                   f"({', '.join(net.get('changed') or [])}); redone: {', '.join(net.get('redone') or [])}")
    if net.get("keepalive"):
        out.append(f"  keepalive: every {net['keepalive']:g} s (no public endpoint: NAT bindings held open)")
    pm = st.get("portmap") or {}
    if pm.get("state") not in (None, "disabled"):
        proto = f" ({pm['protocol']})" if pm.get("protocol") else ""
        out.append(f"  nat: {pm['state']}{proto}: {pm.get('result', '')}"
                   + (f" (public {pm['endpoint']})" if pm.get("endpoint") else ""))
    nat = st.get("nat") or {}
    if nat.get("state") not in (None, "disabled"):
        seen = ", ".join(f"{m} (from {s})" for s, m in (nat.get("observed") or {}).items()) or "nothing yet"
        out.append(f"  traversal: {nat.get('state')}; STUN: {seen}, {nat.get('kind')}; relay "
                   f"{nat.get('relay_state')}" + (f" at {nat['relayed']}" if nat.get("relayed") else ""))
    pub = st.get("publish") or {}
    if pub.get("state") not in (None, "disabled"):
        out.append(f"  dns publish: {pub.get('state')}: {pub.get('message', '')}")
    watch = st.get("watch") or {}
    if watch.get("state") not in (None, "disabled"):
        if watch.get("transport") == "push":
            how = f"by DNS Push over TLS via {watch.get('push_server', '?')}"
        else:
            how = f"by LLQ via {watch.get('server', '?')}"
            if watch.get("push_server"):
                how += f" (DNS Push at {watch['push_server']}: {watch.get('push', '?')})"
        out.append(f"  dns watch: {watch.get('state')} {how}")
    for p in st["peers"]:
        hs = p["last_handshake"]
        ago = f"{max(0, int(time.time() - hs))} s ago" if hs else "never"
        out += ["", f"peer: {p['name']} (from {p.get('source', 'config')})", f"  ula: {p['ula']}",
                f"  endpoint: {p['endpoint'] or '(none)'}{_endpoint_origin(p)}", path_line(p),
                f"  latest handshake: {ago}",
                f"  transfer: {_human(p['rx_bytes'])} received, {_human(p['tx_bytes'])} sent"]
    return "\n".join(out) + "\n"
