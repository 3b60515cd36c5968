"""What `ctxaudit serve` shows Prometheus at the read API's /metrics: ingestion as it goes,
the latest saved audit run (per edge, per finding kind and cause, the sampling figures) and
the audit loop itself. A custom collector: every scrape builds its metric families from
snapshots (the ingest figures, the audits' status, the store's latest run), so there is no
global mutable state to keep in step. A run's families are built once per run id and reused:
runs are saved in one transaction, so a scrape during an audit reads the last complete run.

Cardinality is bounded by construction: edge series are capped (`max_edges`, broken and busiest
edges first, what was left out counted), findings are per kind and cause code (a fixed set),
and nothing is ever labelled by trace or span. Names follow Prometheus' conventions (base
units, `_total` for counters, `_seconds`, `_bytes`, `_ratio`); docs/getting-data-out.md lists
them all."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import __version__
from ..contract.figures import context_health, orphan_rate
from ..contract.reader import Reader
from ..store.errors import StoreError

log = logging.getLogger(__name__)

EDGE_LABELS = ("caller", "callee", "protocol")
# the overall sampling figures: (key in the result document's sampling.overall, metric, help)
SAMPLING_FIGURES = (
    ("fragmentation_factor", "ctxaudit_fragmentation_factor", "Traces per logical request (1 = whole)."),
    (
        "trace_completeness",
        "ctxaudit_trace_completeness_ratio",
        "Share of stored entry traces that hold their whole request.",
    ),
    (
        "hidden_error_share",
        "ctxaudit_hidden_error_ratio",
        "Share of error spans that sit in fragments, invisible from the entry trace.",
    ),
)
REFUSAL_REASONS = (  # the ingest snapshot's counter of requests turned away, per reason label
    ("invalid", "invalid_requests"),  # permanent: bad body, too large, wrong content type
    ("unavailable", "refused_requests"),  # retryable: queue or staging full, store busy, stopping
    ("unauthenticated", "unauthenticated_requests"),
)


def _gauge(name: str, doc: str, value: float | None) -> list[Metric]:
    """One unlabelled gauge, or none when the value is unknown (a figure over nothing)."""
    return [] if value is None else [GaugeMetricFamily(name, doc, value=value)]


def _counter(name: str, doc: str, value: float | None) -> list[Metric]:
    return [] if value is None else [CounterMetricFamily(name, doc, value=value)]


def _unix_s(finished_at: object) -> float | None:
    if isinstance(finished_at, datetime):
        return finished_at.timestamp()
    if isinstance(finished_at, str):  # the read API sends ISO 8601 text
        return datetime.fromisoformat(finished_at).timestamp()
    return None


def _edge_order(edge: dict) -> tuple:
    """Broken edges first, then the busiest: the series kept when there are too many."""
    return (
        edge["calls"] <= edge["propagated"],
        -edge["calls"],
        edge["caller"],
        edge["callee"],
        edge["protocol"],
    )


def run_families(run: dict, finding_counts: Iterable[dict], max_edges: int) -> list[Metric]:
    """The families of one saved run (`Reader.audit_run` and `Reader.finding_counts`)."""
    edges = sorted(run["edges"], key=_edge_order)
    kept, omitted = edges[:max_edges], edges[max_edges:]
    per_edge = {
        "calls": GaugeMetricFamily(
            "ctxaudit_edge_calls", "The caller's stored exit spans towards the callee.", labels=EDGE_LABELS
        ),
        "propagated": GaugeMetricFamily(
            "ctxaudit_edge_propagated_calls",
            "Of those, calls whose context reached the callee (a child span, or a span link).",
            labels=EDGE_LABELS,
        ),
        "dropped": GaugeMetricFamily(
            "ctxaudit_edge_dropped_calls",
            "Calls whose context the callee did not continue.",
            labels=EDGE_LABELS,
        ),
        "stitched": GaugeMetricFamily(
            "ctxaudit_edge_stitched_calls",
            "Orphan roots of the callee whose probable parent is one of these calls.",
            labels=EDGE_LABELS,
        ),
    }
    ratio = GaugeMetricFamily(
        "ctxaudit_edge_propagation_ratio",
        "propagated / calls: the share of the hop's calls that kept their context (absent with no calls).",
        labels=EDGE_LABELS,
    )
    for e in kept:
        labels = [str(e[k]) for k in EDGE_LABELS]
        for key, family in per_edge.items():
            family.add_metric(labels, e["calls"] - e["propagated"] if key == "dropped" else e[key])
        if e["calls"]:
            ratio.add_metric(labels, e["propagated"] / e["calls"])
    findings = GaugeMetricFamily(
        "ctxaudit_findings", "The run's findings per kind and cause code.", labels=("kind", "cause")
    )
    for row in finding_counts:
        findings.add_metric([row["kind"], row["cause"]], row["findings"])
    overall = (run.get("sampling") or {}).get("overall") or {}
    families: list[Metric] = [*per_edge.values(), ratio, findings]
    families += _gauge(
        "ctxaudit_edges_omitted",
        "Edges of the run left out of the edge series (beyond --metrics-max-edges).",
        len(omitted),
    )
    families += _gauge("ctxaudit_audit_run_edges", "Edges (caller, callee, protocol) in the run.", len(edges))
    families += _gauge(
        "ctxaudit_audit_broken_edges",
        "Edges of the run with at least one dropped call.",
        sum(e["calls"] > e["propagated"] for e in edges),
    )
    families += _gauge(
        "ctxaudit_orphan_root_ratio",
        "Orphan roots / all roots (entry roots and orphan roots) in the run.",
        orphan_rate(run.get("roots") or {}),
    )
    families += _gauge(
        "ctxaudit_context_health_ratio",
        "Propagated / calls over every stored call between instrumented services.",
        context_health(run["edges"]) if run["edges"] else None,
    )
    for key, name, doc in SAMPLING_FIGURES:
        families += _gauge(name, doc, (overall.get(key) or {}).get("value"))
    families += _gauge("ctxaudit_audit_run_id", "The latest saved run's id.", run["run_id"])
    families += _gauge(
        "ctxaudit_audit_run_end_timestamp_seconds",
        "When the latest saved run finished (Unix time).",
        _unix_s(run.get("finished_at")),
    )
    families += _gauge(
        "ctxaudit_audit_run_window_end_timestamp_seconds",
        "The end of the window the latest run audited (Unix time): its spans started before it.",
        run["window_end_ns"] / 1e9,
    )
    families += _gauge("ctxaudit_audit_run_duration_seconds", "How long the latest run took.", run["seconds"])
    families += _gauge("ctxaudit_audit_run_spans", "Spans the latest run audited.", run["spans"])
    families += _gauge("ctxaudit_audit_run_traces", "Traces the latest run audited.", run["traces"])
    return families


def ingest_families(h: dict) -> list[Metric]:
    """From IngestHealth.snapshot() (collector_ext/ingest_health.py)."""
    accepted, rejected = h.get("accepted_spans"), h.get("rejected_spans")
    families = _counter(
        "ctxaudit_ingest_spans_received",
        "Spans decoded from accepted requests (accepted + rejected).",
        None if accepted is None or rejected is None else accepted + rejected,
    )
    families += _counter(
        "ctxaudit_ingest_spans_accepted",
        "Spans made durable (staged or committed) and acknowledged.",
        accepted,
    )
    families += _counter(
        "ctxaudit_ingest_spans_committed", "Spans committed to the store.", h.get("committed_spans")
    )
    families += _counter(
        "ctxaudit_ingest_spans_rejected",
        "Spans rejected inside accepted requests (partial_success): invalid ids, for example.",
        rejected,
    )
    families += _counter("ctxaudit_ingest_requests", "OTLP export requests received.", h.get("requests"))
    refused = CounterMetricFamily(
        "ctxaudit_ingest_requests_refused",
        "Requests turned away, by reason: invalid (permanent), unavailable (retryable: full or busy), "
        "unauthenticated.",
        labels=("reason",),
    )
    for reason, key in REFUSAL_REASONS:
        if key in h:
            refused.add_metric([reason], h[key])
    families.append(refused)
    for key, name, doc in (
        ("queued_spans", "ctxaudit_ingest_queue_spans", "Spans waiting in the write queue for commit."),
        (
            "queue_capacity_spans",
            "ctxaudit_ingest_queue_capacity_spans",
            "Write-queue capacity; requests are refused (retryable) beyond it.",
        ),
        ("inflight_bytes", "ctxaudit_ingest_inflight_bytes", "Request bytes being decoded or committed."),
        (
            "inflight_capacity_bytes",
            "ctxaudit_ingest_inflight_capacity_bytes",
            "Bytes in flight at which requests are refused (retryable).",
        ),
        ("staged_spans", "ctxaudit_staging_spans", "Acknowledged spans in the staging log, not yet loaded."),
        ("staging_bytes", "ctxaudit_staging_bytes", "Disk used by the staging log."),
        (
            "staging_capacity_bytes",
            "ctxaudit_staging_capacity_bytes",
            "Staging log size at which requests are refused (retryable).",
        ),
        (
            "staging_lag_s",
            "ctxaudit_staging_lag_seconds",
            "Age of the oldest staged span not yet in the store.",
        ),
        (
            "spans_per_s",
            "ctxaudit_ingest_committed_spans_per_second",
            "Committed spans/s over the last minute.",
        ),
    ):
        families += _gauge(name, doc, h.get(key))
    families += _counter(
        "ctxaudit_staging_failed_loads", "Staging log loads that failed.", h.get("failed_loads")
    )
    return families


def audit_loop_families(status: dict, every_s: float) -> list[Metric]:
    """From ServerAudits.status() (audit/server/audits.py)."""
    families = _counter(
        "ctxaudit_audit_successes",
        "Audits the server ran to the end (scheduled and requested).",
        status["succeeded"],
    )
    families += _counter("ctxaudit_audit_failures", "Audits that failed.", status["failed"])
    families += _counter(
        "ctxaudit_audit_refused",
        "Requested audits refused because another was waiting.",
        status["refused_busy"],
    )
    families += _gauge("ctxaudit_audit_running", "Audits running or waiting to.", status["busy"])
    families += _gauge(
        "ctxaudit_audit_last_success_timestamp_seconds",
        "When an audit last succeeded (Unix time); absent until one has.",
        status["last_success_unix_s"],
    )
    families += _gauge(
        "ctxaudit_audit_interval_seconds", "The scheduled audits' period (--audit-every); 0: none.", every_s
    )
    return families


def parquet_export_families(status: dict) -> list[Metric]:
    """From ScheduledParquetExport.status() (audit/server/parquet_export.py): serve --export-parquet."""
    families = _counter(
        "ctxaudit_parquet_export_successes",
        "Parquet exports of settled hours that succeeded.",
        status["exports"],
    )
    families += _counter(
        "ctxaudit_parquet_export_failures", "Parquet exports that failed.", status["failures"]
    )
    until = status["exported_until_ns"]
    families += _gauge(
        "ctxaudit_parquet_export_until_timestamp_seconds",
        "The end of the last hour exported (Unix time): later spans are not in the Parquet yet.",
        None if until is None else until / 1e9,
    )
    families += _gauge(
        "ctxaudit_parquet_export_last_success_timestamp_seconds",
        "When a Parquet export last succeeded (Unix time); absent until one has.",
        status["last_success_unix_s"],
    )
    return families


class ServerMetrics(Collector):
    """The collector: `reader` for the latest saved run, `ingest_health` for the ingest snapshot,
    `audit_status` for ServerAudits.status(), each optional."""

    def __init__(
        self,
        reader: Reader,
        *,
        ingest_health: Callable[[], dict] | None = None,
        audit_status: Callable[[], dict] | None = None,
        audit_every_s: float = 0.0,
        max_edges: int = 1000,
        parquet_export_status: Callable[[], dict] | None = None,
    ):
        self.reader, self.ingest_health, self.audit_status = reader, ingest_health, audit_status
        self.parquet_export_status = parquet_export_status
        self.audit_every_s, self.max_edges = audit_every_s, max_edges
        self._started = time.time()
        self._lock = threading.Lock()
        self._run: tuple[int, list[Metric]] | None = None  # (run id, its families)
        self._store_errors = 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def render(self) -> bytes:
        """The text exposition of one scrape (blocking: it may read the store)."""
        return generate_latest(self.registry)

    def collect(self) -> Iterable[Metric]:
        yield InfoMetricFamily("ctxaudit_build", "The running ctxaudit.", value={"version": __version__})
        yield GaugeMetricFamily(
            "ctxaudit_start_time_seconds", "When this server started (Unix time).", value=self._started
        )
        if self.ingest_health is not None:
            yield from ingest_families(self.ingest_health())
        if self.audit_status is not None:
            yield from audit_loop_families(self.audit_status(), self.audit_every_s)
        if self.parquet_export_status is not None:
            yield from parquet_export_families(self.parquet_export_status())
        yield from self._latest_run()
        yield CounterMetricFamily(
            "ctxaudit_metrics_store_errors",
            "Scrapes that could not read the latest run from the store (the last one read was served).",
            value=self._store_errors,
        )

    def _latest_run(self) -> list[Metric]:
        with self._lock:  # concurrent scrapes build a new run's families once
            try:
                run = self.reader.audit_run()
                if run is None:
                    return []
                if self._run is None or self._run[0] != run["run_id"]:
                    counts = self.reader.finding_counts(run["run_id"])
                    self._run = (run["run_id"], run_families(run, counts, self.max_edges))
            except StoreError as e:
                self._store_errors += 1
                log.warning("/metrics: the latest audit run could not be read: %s", e)
            return self._run[1] if self._run else []
