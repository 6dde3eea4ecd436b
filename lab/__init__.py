"""Network-namespace labs for the integration tests, the demo and the benchmarks.

`netns` (Lab, Host: namespaces and the processes in them, removed on exit), `topology` (the lab
networks), `tunnel` (real `tunneld up` daemons in them), `flows` (checked traffic between them),
`capture` (tcpdump and pcap reading), `upnp` (miniupnpd), `bind` (BIND 9), `coturn` (the TURN relay);
`progs` holds the small programs that run inside the namespaces.
"""
