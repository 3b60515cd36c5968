"""HOST:PORT parsing for listen addresses, IPv6 in brackets."""

from __future__ import annotations


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
    return host in ("localhost", "::1") or host.startswith("127.")
