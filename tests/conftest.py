"""Shared fixtures: real servers on loopback ports over real DuckDB files."""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass

import pytest
from hypothesis import settings

from audit.settings import ServeSettings
from audit.store.reader import LocalReader
from audit.store.staging import StagingLoader, StagingLog
from audit.store.writer import SpanStore, SpanWriter
from collector_ext.ingest import Ingestor
from collector_ext.receivers import OtlpReceivers

DEFAULTS = ServeSettings()

# The same examples on every run and every machine: no random seed, no example database carried
# between runs, and no per-example deadline (a busy 2-core machine would trip it). A local hunt
# for new failures: HYPOTHESIS_PROFILE=explore.
settings.register_profile("ci", derandomize=True, database=None, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@dataclass
class RunningServer:
    db: str
    writer: SpanWriter
    ingestor: Ingestor
    receivers: OtlpReceivers
    loader: StagingLoader | None = None
    stopped: bool = False

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.receivers.grpc.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.receivers.http.port}/v1/traces"

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.receivers.stop()
            if self.loader:  # as serve does: what was acknowledged is loaded before the close
                self.loader.close()
                self.loader.staging.close()
            self.writer.close()

    def reader(self) -> LocalReader:
        self.stop()
        return LocalReader(self.db)


@pytest.fixture
def make_server(tmp_path):
    """Start an in-process server (both receivers on free ports); stopped at teardown."""
    servers: list[RunningServer] = []

    def start(
        *,
        decoders: int = 0,
        max_body_bytes: int = DEFAULTS.max_body_bytes,
        queue_spans: int = DEFAULTS.queue_spans,
        inflight_bytes: int = DEFAULTS.inflight_bytes,
        staging_bytes: int | None = None,
        name: str = "store.duckdb",
    ) -> RunningServer:
        """`staging_bytes`: acknowledge after the append to a staging log of this size, as serve
        does by default; None: after the commit."""
        db = str(tmp_path / name)
        store = SpanStore(db)
        writer = SpanWriter(store, max_queued_spans=queue_spans)
        loader = None
        if staging_bytes is not None:
            staging = StagingLog(db + ".staging", max_bytes=staging_bytes, loaded=store.loaded_segments())
            loader = StagingLoader(staging, writer)
            loader.start()
        ingestor = Ingestor(
            writer,
            staging=loader.staging if loader else None,
            decoders=decoders,
            max_body_bytes=max_body_bytes,
            max_inflight_bytes=inflight_bytes,
        )
        receivers = OtlpReceivers(
            ingestor, grpc_address="127.0.0.1:0", http_address="127.0.0.1:0", drain_timeout=10
        )
        receivers.start()
        server = RunningServer(db, writer, ingestor, receivers, loader)
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless, for the tests that open the explorer (tests/browser_helpers.py)."""
    from tests.browser_helpers import chromium

    with chromium() as b:
        yield b


@pytest.fixture
def rng():
    return random.Random(42)


@pytest.fixture(autouse=True)
def _keep_main_module():
    """Streamlit's AppTest runs a page as `__main__` and leaves it there; processes started
    later with multiprocessing's spawn would then re-run that page. Put pytest's back."""
    main = sys.modules.get("__main__")
    yield
    if main is not None:
        sys.modules["__main__"] = main
