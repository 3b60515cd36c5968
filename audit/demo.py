"""`ctxaudit demo`: a real `ctxaudit serve` on a fresh DuckDB file, fed by the demo fleet
(audit/fleet/): real services exporting through the OpenTelemetry SDK, losing context in
the ways production does."""

from __future__ import annotations

import os
from pathlib import Path

from .fleet.runner import FleetRun, run_fleet
from .server.process import start_server, stop_server


def run_demo(db: str, truth: str, seconds: float, rate: float) -> FleetRun:
    """A fresh store, `ctxaudit serve` on it, the fleet under load for `seconds`, a clean stop."""
    path = Path(db)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, Path(f"{db}.wal")):
        if stale.exists():
            os.remove(stale)
    print(f"starting ctxaudit serve on {db} ...", flush=True)
    proc, grpc_port, _ = start_server(db)
    try:
        print(f"starting the fleet; {rate:g} requests/s to the frontend for {seconds:g}s", flush=True)
        run = run_fleet(
            f"127.0.0.1:{grpc_port}",
            truth,
            seconds=seconds,
            rate=rate,
            progress=lambda line: print(line, flush=True),
        )
    finally:
        code = stop_server(proc)
    if code != 0:
        raise RuntimeError(f"ctxaudit serve exited with {code}")
    print(
        f"fleet: {run.requests} requests ({run.failed} failed); "
        f"ground truth: {run.truth_records} spans in {truth}"
    )
    return run
