"""`ctxaudit serve` put together: the store and its one writer, the ingestor and both OTLP
receivers, the read API, the server's own audits and its daily report; then the progress log
until SIGTERM or SIGINT, and an orderly stop (requests in flight finish, everything commits).
The composition root of the server: the CLI parses options into a ServeConfig and calls run."""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import time as time_of_day
from pathlib import Path
from zoneinfo import ZoneInfo

from collector_ext.addresses import parse_hostport
from collector_ext.ingest import Ingestor
from collector_ext.ingest_health import IngestHealth
from collector_ext.receivers import OtlpReceivers

from ..net.access import OPEN, Access
from ..net.connections import ConnectionLimits, fit_to_fd_limit, raise_fd_limit
from ..otlp_export import ExportError
from ..settings import AuditSettings, ServeSettings
from ..store.errors import StoreError
from ..store.reader import StoreReader
from ..store.retention import Retention
from ..store.staging import StagingLoader, StagingLog
from ..store.writer import SpanStore, SpanWriter
from .audits import ServerAudits
from .metrics import ServerMetrics
from .parquet_export import ScheduledParquetExport, ipc_chunks
from .periodic import Periodic
from .read_api import ReadApi

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DailyReport:
    at: time_of_day
    tz: ZoneInfo
    out_dir: str | None
    keep_days: int
    since_s: float


@dataclass(frozen=True)
class ServeConfig:
    db: str
    grpc_address: str | None
    http_address: str | None
    api_address: str | None
    settings: ServeSettings = ServeSettings()
    report: DailyReport | None = None
    access: Access = OPEN
    audit: AuditSettings = AuditSettings()  # the periodic audits' and daily reports' (--audit-config)


class ServeError(Exception):
    """serve could not start (the store or a port); the message says what to do."""


def run(c: ServeConfig, say: Callable[[str], None]) -> None:
    """Serve until SIGTERM or SIGINT. `say` prints the ready and stop lines (stderr)."""
    try:
        store = SpanStore(
            c.db, memory_limit=c.settings.memory_limit, checkpoint_mib=c.settings.checkpoint_mib
        )
    except StoreError as e:
        raise ServeError(str(e)) from None
    writer = SpanWriter(store, max_queued_spans=c.settings.queue_spans)
    try:
        loader = _staging(c, store, writer)
    except (OSError, StoreError) as e:
        writer.close()
        raise ServeError(f"cannot open the staging log {c.db}.staging: {e}") from None
    staging = loader.staging if loader else None

    def close_store() -> None:
        """Load the staging log into the store (see the stop line), then close it."""
        if loader:
            left = loader.close(c.settings.drain_timeout)
            staging.close()
            if left:
                say(f"ctxaudit serve: {left} acknowledged spans left in {staging.directory} for next start")
        writer.close()

    limits = _connection_limits(c)
    ingestor = Ingestor(
        writer,
        staging=staging,
        decoders=(os.cpu_count() or 1) if c.settings.decoders is None else c.settings.decoders,
        max_body_bytes=c.settings.max_body_bytes,
        max_inflight_bytes=c.settings.inflight_bytes,
    )
    receivers = OtlpReceivers(
        ingestor,
        grpc_address=c.grpc_address,
        http_address=c.http_address,
        drain_timeout=c.settings.drain_timeout,
        access=c.access,
        limits=limits,
    )
    health = IngestHealth(ingestor, writer, loader=loader)
    audits = ServerAudits(
        store,
        c.audit,
        c.settings.audit_every,
        max_rss_bytes=c.settings.audit_max_rss_mib << 20,
    )
    # the API and the daily report read on a connection of their own to the same database
    reader = StoreReader(store, c.db)
    try:
        export = _stitch_export(c, reader)
        parquet = _parquet_export(c, store)
    except ServeError:
        close_store()
        raise
    api = (
        ReadApi(
            reader,
            *parse_hostport(c.api_address),
            ingest_health=lambda: (
                health.snapshot()
                | {"audits": audits.status()}
                | ({"otlp_export": export.status()} if export else {})
                | ({"parquet_export": parquet.status()} if parquet else {})
            ),
            auditor=audits,
            access=c.access,
            limits=limits,
            metrics=ServerMetrics(
                reader,
                ingest_health=health.snapshot,
                audit_status=audits.status,
                audit_every_s=c.settings.audit_every,
                max_edges=c.settings.metrics_max_edges,
                parquet_export_status=parquet.status if parquet else None,
            ),
            metrics_public=c.settings.metrics_public,
            span_export=functools.partial(ipc_chunks, store),
        )
        if c.api_address
        else None
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        receivers.start()  # on failure it has stopped what it started
    except OSError as e:
        close_store()
        raise ServeError(str(e)) from None
    try:
        if api:
            api.start()
    except OSError as e:
        receivers.stop()
        close_store()
        raise ServeError(str(e)) from None

    print(f"ctxaudit serve: ready: {', '.join(_listening(c, receivers, api))}; store {c.db}", flush=True)
    audits.start()
    nightly = _daily_report(c, audits, reader)
    retention = _retention(c, store)
    if export:
        export.start()
    if parquet:
        parquet.start()
    while not stop.wait(c.settings.log_interval or None):
        h = health.snapshot()
        log.info(
            "stored %d spans (%.0f/s over the last minute), %d rejected, %d requests refused (retryable), "
            "%d invalid, %d unauthenticated, %d queued, %d staged (%.1f s behind)",
            h["committed_spans"],
            h["spans_per_s"],
            h["rejected_spans"],
            h["refused_requests"],
            h["invalid_requests"],
            h["unauthenticated_requests"],
            h["queued_spans"],
            h.get("staged_spans", 0),
            h.get("staging_lag_s", 0.0),
        )

    say("ctxaudit serve: stopping: draining requests in flight")
    for background in (nightly, retention, export, parquet):
        if background:
            background.stop()
    audits.stop()
    if api:
        api.stop()
    receivers.stop()
    close_store()
    s = ingestor.stats
    say(
        f"ctxaudit serve: stopped: {writer.stats.committed_spans} spans committed in {writer.stats.commits} "
        f"transactions, {s.rejected_spans} rejected, {s.end_before_start} ending before they start"
    )


def _staging(c: ServeConfig, store: SpanStore, writer: SpanWriter) -> StagingLoader | None:
    """The staging log beside the DB, and its loader started: it loads first what a crash left."""
    if not c.settings.staging_mib:
        return None
    staging = StagingLog(
        f"{c.db}.staging", max_bytes=c.settings.staging_bytes, loaded=store.loaded_segments()
    )
    loader = StagingLoader(staging, writer)
    loader.start()
    return loader


def _connection_limits(c: ServeConfig) -> ConnectionLimits:
    """Each listener's timeouts and cap, the cap lowered if the open files limit (raised to
    its hard limit first) cannot hold every listener full."""
    s = c.settings
    limits = ConnectionLimits(s.header_timeout, s.idle_timeout, s.stall_timeout, s.max_connections)
    listeners = sum(1 for address in (c.grpc_address, c.http_address, c.api_address) if address)
    return fit_to_fd_limit(limits, listeners, raise_fd_limit())


def _listening(c: ServeConfig, receivers: OtlpReceivers, api: ReadApi | None) -> list[str]:
    scheme = "https" if c.access.tls else "http"
    out = []
    if receivers.grpc:
        tls = " (TLS)" if c.access.tls else ""
        out.append(f"OTLP/gRPC {parse_hostport(c.grpc_address)[0]}:{receivers.grpc.port}{tls}")
    if receivers.http:
        out.append(
            f"OTLP/HTTP {scheme}://{parse_hostport(c.http_address)[0]}:{receivers.http.port}/v1/traces"
        )
    if api:
        out.append(f"read API {api.url}")
    return out


def _daily_report(c: ServeConfig, audits: ServerAudits, reader: StoreReader):
    if c.report is None:
        return None
    from .daily_report import NightlyReports

    r = c.report
    nightly = NightlyReports(
        Path(r.out_dir or f"{os.path.splitext(c.db)[0]}-reports"),
        r.at,
        r.tz,
        r.keep_days,
        r.since_s,
        audits.settings,
        reader.time_range,
        functools.partial(audits.audit, queue=True),  # the server's own: it waits its turn
        c.db,
    )
    nightly.start()
    return nightly


def _stitch_export(c: ServeConfig, reader: StoreReader):
    """--export-otlp: each saved run's stitched hops to the user's trace backend."""
    if not c.settings.export_otlp:
        return None
    from .stitch_export import ScheduledExport

    try:
        return ScheduledExport(reader, c.settings.export_otlp, f"{c.db}.otlp-export")
    except (ValueError, ExportError, StoreError) as e:
        raise ServeError(f"--export-otlp: {e}") from None


def _parquet_export(c: ServeConfig, store: SpanStore):
    """--export-parquet: each settled hour as Parquet, for the Spark audit over every shard."""
    if not c.settings.export_parquet:
        return None
    try:
        return ScheduledParquetExport(
            store,
            c.settings.export_parquet,
            c.settings.export_shard or socket.gethostname(),
            c.settings.export_every,
            c.settings.audit_settle,
        )
    except (OSError, StoreError) as e:
        raise ServeError(f"--export-parquet: {e}") from None


RETENTION_EVERY_S = 60.0


def _retention(c: ServeConfig, store: SpanStore) -> Periodic | None:
    """A pass soon after the start, then every minute."""
    if c.settings.retain_days is None and c.settings.retain_bytes is None:
        return None
    retention = Retention(store, c.db, days=c.settings.retain_days, max_bytes=c.settings.retain_bytes)
    delays = iter([1.0])

    def prune() -> None:
        try:
            pruned = retention.prune_once()
        except StoreError as e:
            log.error("retention pass failed: %s; the next one tries again", e)
            return
        if pruned.spans:
            log.info(
                "retention: deleted %d spans and %d links in %.1f s",
                pruned.spans,
                pruned.links,
                pruned.seconds,
            )

    background = Periodic("retention", lambda: next(delays, RETENTION_EVERY_S), prune)
    background.start()
    return background
