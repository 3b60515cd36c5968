"""`ctxaudit serve` as a child process on free loopback ports: for the demo, tests and benchmarks."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

_READY = re.compile(r"OTLP/gRPC [^:]+:(\d+)(?: \(TLS\))?, OTLP/HTTP (https?://\S+/v1/traces)")
_API = re.compile(r"read API (https?://[^;,\s]+)")


def start_server(db: str, *extra: str, **popen) -> tuple[subprocess.Popen, int, str]:
    """Start `ctxaudit serve` on free loopback ports; return (process, grpc port, http url). The
    read API's URL, when it is on, is `process.api_url`. `popen`: more subprocess.Popen
    arguments (stderr, preexec_fn...)."""
    api = () if "--api" in extra else ("--api", "127.0.0.1:0")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "audit",
            "serve",
            "--db",
            db,
            "--grpc",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--log-interval",
            "0",
            *api,
            *extra,
        ],
        stdout=subprocess.PIPE,
        text=True,
        **popen,
    )
    line = proc.stdout.readline()
    m = _READY.search(line)
    if not m:
        proc.kill()
        raise RuntimeError(f"ctxaudit serve did not start (it printed {line!r}); see the errors above")
    api_url = _API.search(line)
    proc.api_url = api_url.group(1) if api_url else None
    return proc, int(m.group(1)), m.group(2)


def stop_server(proc: subprocess.Popen, timeout: float = 60) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout)
