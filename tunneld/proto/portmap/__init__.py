"""Port mapping on the home gateway, wire apart from state.

- :mod:`~tunneld.proto.portmap.natpmp_wire` -- NAT-PMP (RFC 6886) messages and constants.
- :mod:`~tunneld.proto.portmap.pcp_wire` -- PCP (RFC 6887) MAP and ANNOUNCE messages and constants.
- :mod:`~tunneld.proto.portmap.mapper` -- the :class:`~tunneld.proto.portmap.mapper.PortMapper` core.
- :mod:`~tunneld.proto.portmap.events` -- what the mapper reports; :mod:`~tunneld.proto.portmap.addresses`
  -- which IPv4 addresses are private or not public.
"""
