"""For tests that read through a running `ctxaudit serve`: acknowledged spans are in its
staging log first and readable once its loader has moved them into the store (within about a
second), so a test waits for that instead of assuming it."""

from __future__ import annotations

import time

from audit.read.remote import RemoteReader


def wait_loaded(api: RemoteReader | str, timeout: float = 60.0, **reader_args) -> dict:
    """Poll the server's ingest figures until nothing acknowledged waits in the staging log;
    returns the last figures."""
    reader = RemoteReader(api, **reader_args) if isinstance(api, str) else api
    deadline = time.monotonic() + timeout
    try:
        while True:
            health = reader.ingest()
            if not health.get("staged_spans"):
                return health
            assert time.monotonic() < deadline, (
                f"{health['staged_spans']} spans still staged after {timeout} s"
            )
            time.sleep(0.05)
    finally:
        if reader is not api:
            reader.close()
