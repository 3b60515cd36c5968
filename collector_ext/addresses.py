"""HOST:PORT parsing for listen addresses, IPv6 in brackets."""

from __future__ import annotations

import ipaddress


def parse_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:4317 or [::1]:4317)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    n = int(port)
    if not 0 <= n <= 65535:
        raise ValueError(f"port {n} in {value!r} is out of range")
    return host, n


def is_loopback(host: str) -> bool:
    """Whether a listen host is loopback: a literal loopback address, or `localhost`. Any other
    name counts as beyond loopback, whatever it resolves to now: `127.0.0.1.example.com` may
    resolve elsewhere tomorrow, or to several addresses, and the bind resolves it again."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # a name
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return address.is_loopback or bool(mapped and mapped.is_loopback)
