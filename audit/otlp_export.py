"""Stitched hops in the user's own trace backend: for each orphan root (or in-process break) that
an audit run stitched to a probable parent, one small span sent over OTLP into the parent's
trace. Its parent is the probable parent span; it links to the orphan root's span, so Jaeger and
Tempo show that the call continues in another trace; its `ctxaudit.*` attributes say why.

Span ids are derived from the hop itself (the orphan's trace and span id and the parent's span
id), never from the run: an orphan audited twice gives the same span, which a backend that keys
spans by id keeps once. A state file records what each target took, so exporting the same run
again sends nothing. The transport is the OpenTelemetry SDK's OTLP exporter, which retries with
backoff (and honours Retry-After) until its timeout; a batch it could not deliver is reported and
left unrecorded, so the next export sends it again."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from . import __version__
from .contract.reader import Reader
from .store.errors import StoreError

log = logging.getLogger(__name__)

STITCHED_KINDS = ("orphan_root", "in_process_break")
SERVICE_NAME = "ctxaudit"
SCOPE_NAME = "ctxaudit.otlp_export"
_ID_NAMESPACE = b"ctxaudit stitched hop v1\0"
PAGE = 5_000  # findings read per query
BATCH = 512  # spans per OTLP request


class ExportError(Exception):
    """The target did not take a batch (after the exporter's retries), or the state file failed;
    the message says which, and what was sent before."""


def hop_span_id(orphan_trace_id: str, orphan_span_id: str, parent_span_id: str) -> int:
    """The exported span's id: a hash of the hop's identity, the same in every run (never 0)."""
    digest = hashlib.sha256(
        _ID_NAMESPACE
        + bytes.fromhex(orphan_trace_id)
        + bytes.fromhex(orphan_span_id)
        + bytes.fromhex(parent_span_id)
    ).digest()
    return int.from_bytes(digest[:8], "big") or 1


@dataclass(frozen=True)
class HopSpan:
    """One span to send: in the parent's trace, under the parent span, linking to the orphan."""

    trace_id: int
    span_id: int
    parent_span_id: int
    link_trace_id: int
    link_span_id: int
    name: str
    start_ns: int
    end_ns: int
    attributes: dict = field(hash=False)


def hop_span(finding: dict, run_id: int, end_ns: int | None) -> HopSpan:
    """The span for one stitched finding (a result document's finding object, docs/audit-json.md);
    it lasts as long as the orphan's span (`end_ns`, None when the span is gone: then no time)."""
    parent = finding["probable_parent"]
    start = finding["start_time_unix_nano"]
    attributes = {
        "ctxaudit.kind": finding["kind"],
        "ctxaudit.cause": finding["cause"],
        "ctxaudit.confidence": float(parent["confidence"]),
        "ctxaudit.explanation": finding["explanation"],
        "ctxaudit.fix": finding["fix"],
        "ctxaudit.protocol": finding["protocol"],
        "ctxaudit.orphan.trace_id": finding["trace_id"],
        "ctxaudit.orphan.span_id": finding["span_id"],
        "ctxaudit.orphan.service": finding["service"],
        "ctxaudit.orphan.span_name": finding["span_name"],
        "ctxaudit.parent.service": parent["service"],
        "ctxaudit.run_id": run_id,
    }
    for key in ("caller", "callee", "system"):
        if finding.get(key) is not None:
            attributes[f"ctxaudit.{key}"] = finding[key]
    callee = finding.get("callee") or finding["service"]
    what = "context lost in" if finding["kind"] == "in_process_break" else "context lost calling"
    return HopSpan(
        trace_id=int(parent["trace_id"], 16),
        span_id=hop_span_id(finding["trace_id"], finding["span_id"], parent["span_id"]),
        parent_span_id=int(parent["span_id"], 16),
        link_trace_id=int(finding["trace_id"], 16),
        link_span_id=int(finding["span_id"], 16),
        name=f"ctxaudit: {what} {callee}",
        start_ns=start,
        end_ns=max(end_ns, start) if end_ns is not None else start,
        attributes=attributes,
    )


def stitched_findings(
    reader: Reader,
    run_id: int | None,
    *,
    min_confidence: float | None = None,
    since_ns: int | None = None,
) -> tuple[int | None, Iterator[dict]]:
    """The run (the last by default) and its findings that name a probable parent at
    `min_confidence` or above, read a page at a time."""
    run = reader.audit_run(run_id)
    run_id = None if run is None else run["run_id"]

    def pages() -> Iterator[dict]:
        if run_id is None:
            return
        for kind in STITCHED_KINDS:
            offset = 0
            while True:
                page = reader.findings(run_id, kind=kind, since_ns=since_ns, limit=PAGE, offset=offset)
                for f in page["findings"]:
                    parent = f["probable_parent"]
                    if parent and (min_confidence is None or parent["confidence"] >= min_confidence):
                        yield f
                offset += len(page["findings"])
                if not page["findings"] or offset >= page["total"]:
                    break

    return run_id, pages()


def target_key(url: str) -> str:
    """A target's name in the state file: its URL without a trailing slash."""
    return url.rstrip("/")


class ExportRecord:
    """What each target took, by span id: a small SQLite file beside the store (or wherever
    --state says). A span is recorded only once its batch was accepted."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._con = sqlite3.connect(path, check_same_thread=False)
            self._con.execute(
                "CREATE TABLE IF NOT EXISTS exported (target TEXT NOT NULL, span_id TEXT NOT NULL, "
                "trace_id TEXT NOT NULL, orphan_trace_id TEXT NOT NULL, orphan_span_id TEXT NOT NULL, "
                "run_id INTEGER NOT NULL, exported_at REAL NOT NULL, PRIMARY KEY (target, span_id)) "
                "WITHOUT ROWID"
            )
            self._con.commit()
        except sqlite3.Error as e:
            raise ExportError(f"cannot use the export state file {path}: {e}") from None
        self._lock = threading.Lock()

    def sent(self, target: str, span_ids: list[int]) -> set[int]:
        """Which of `span_ids` the target took already."""
        found: set[int] = set()
        with self._lock:
            for i in range(0, len(span_ids), 500):
                chunk = [f"{s:016x}" for s in span_ids[i : i + 500]]
                marks = ",".join("?" * len(chunk))
                rows = self._con.execute(
                    f"SELECT span_id FROM exported WHERE target = ? AND span_id IN ({marks})",
                    [target, *chunk],
                ).fetchall()
                found.update(int(r[0], 16) for r in rows)
        return found

    def add(self, target: str, spans: list[HopSpan], run_id: int) -> None:
        now = time.time()
        rows = [
            (
                target,
                f"{s.span_id:016x}",
                f"{s.trace_id:032x}",
                f"{s.link_trace_id:032x}",
                f"{s.link_span_id:016x}",
                run_id,
                now,
            )
            for s in spans
        ]
        try:
            with self._lock, self._con:
                self._con.executemany("INSERT OR IGNORE INTO exported VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        except sqlite3.Error as e:
            raise ExportError(f"cannot record the export in {self.path}: {e}") from None

    def count(self, target: str) -> int:
        with self._lock:
            return self._con.execute("SELECT count(*) FROM exported WHERE target = ?", [target]).fetchone()[0]

    def close(self) -> None:
        self._con.close()


class OtlpTarget:
    """An OTLP endpoint, through the SDK's exporter: grpc://HOST:PORT (grpcs:// for TLS) or
    http(s)://HOST:PORT[/path] (OTLP/HTTP protobuf; /v1/traces when no path is given).
    Headers (a token) come from $OTEL_EXPORTER_OTLP_TRACES_HEADERS / $OTEL_EXPORTER_OTLP_HEADERS,
    as for any OTel exporter."""

    def __init__(self, url: str, *, timeout_s: float = 30.0):
        self.url = url
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("grpc", "grpcs", "http", "https") or not parsed.netloc:
            raise ValueError(
                f"{url!r} is not an OTLP URL such as grpc://127.0.0.1:4317 or http://127.0.0.1:4318"
            )
        if parsed.scheme.startswith("grpc"):
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            self._exporter = OTLPSpanExporter(
                endpoint=parsed.netloc, insecure=parsed.scheme == "grpc", timeout=timeout_s
            )
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            endpoint = url if parsed.path.strip("/") else f"{url.rstrip('/')}/v1/traces"
            self._exporter = OTLPSpanExporter(endpoint=endpoint, timeout=timeout_s)
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        self._resource = Resource.create({"service.name": SERVICE_NAME, "service.version": __version__})
        self._scope = InstrumentationScope(SCOPE_NAME, __version__)

    def send(self, spans: list[HopSpan]) -> bool:
        """True if the target took the batch (the exporter retried transient failures)."""
        from opentelemetry.sdk.trace.export import SpanExportResult

        return self._exporter.export([self._readable(s) for s in spans]) == SpanExportResult.SUCCESS

    def _readable(self, s: HopSpan):
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags

        sampled = TraceFlags(TraceFlags.SAMPLED)
        return ReadableSpan(
            name=s.name,
            context=SpanContext(s.trace_id, s.span_id, is_remote=False, trace_flags=sampled),
            parent=SpanContext(s.trace_id, s.parent_span_id, is_remote=False, trace_flags=sampled),
            resource=self._resource,
            attributes=s.attributes,
            links=[
                Link(
                    SpanContext(s.link_trace_id, s.link_span_id, is_remote=True, trace_flags=sampled),
                    {
                        "ctxaudit.link": "orphan_root",
                        "ctxaudit.confidence": s.attributes["ctxaudit.confidence"],
                    },
                )
            ],
            kind=SpanKind.INTERNAL,
            start_time=s.start_ns,
            end_time=s.end_ns,
            instrumentation_scope=self._scope,
        )

    def close(self) -> None:
        """Stops the exporter; a retry waiting in its backoff gives up now."""
        self._exporter.shutdown()


@dataclass
class ExportStats:
    run_id: int | None = None
    stitched: int = 0  # findings with a probable parent at the confidence asked for
    sent: int = 0  # spans the target took in this export
    already: int = 0  # spans it had taken before (recorded), not sent again

    def summary(self, url: str) -> str:
        if self.run_id is None:
            return "export: no audit run in the store yet"
        return (
            f"export: run {self.run_id}: {self.stitched:,} stitched hop(s); sent {self.sent:,} span(s) "
            f"to {url}, {self.already:,} sent before"
        )


class StitchExporter:
    """Exports runs' stitched hops from `reader` to `target`, recording them in `record`."""

    def __init__(self, reader: Reader, target: OtlpTarget, record: ExportRecord, *, batch: int = BATCH):
        self.reader, self.target, self.record, self.batch = reader, target, record, batch
        self._key = target_key(target.url)

    def export_run(
        self,
        run_id: int | None = None,
        *,
        min_confidence: float | None = None,
        since_ns: int | None = None,
        progress: Callable[[str], None] = lambda line: None,
    ) -> ExportStats:
        """Send the run's (the last by default) stitched hops the target has not taken yet.
        ExportError when a batch was refused after the exporter's retries: what was sent before
        is recorded (and stays in the stats of the error's message)."""
        run_id, findings = stitched_findings(
            self.reader, run_id, min_confidence=min_confidence, since_ns=since_ns
        )
        stats = ExportStats(run_id)
        pending: list[dict] = []
        for finding in findings:
            stats.stitched += 1
            pending.append(finding)
            if len(pending) == self.batch:
                self._flush(pending, stats, progress)
                pending = []
        if pending:
            self._flush(pending, stats, progress)
        return stats

    def _flush(self, findings: list[dict], stats: ExportStats, progress: Callable[[str], None]) -> None:
        ids = [hop_span_id(f["trace_id"], f["span_id"], f["probable_parent"]["span_id"]) for f in findings]
        done = self.record.sent(self._key, ids)
        fresh = {i: f for i, f in zip(ids, findings) if i not in done}  # a hop twice in a page: once
        stats.already += len(findings) - len(fresh)
        if not fresh:
            return
        spans = [hop_span(f, stats.run_id, self._end_ns(f)) for f in fresh.values()]
        if not self.target.send(spans):
            raise ExportError(
                f"the OTLP target {self.target.url} did not take {len(spans)} span(s) (the exporter retried "
                f"with backoff until its timeout); {stats.sent:,} were sent before and are recorded; "
                "export again to send the rest"
            )
        self.record.add(self._key, spans, stats.run_id)
        stats.sent += len(spans)
        progress(f"{stats.sent:,} span(s) sent")

    def _end_ns(self, finding: dict) -> int | None:
        """The orphan's end, from its trace (None when retention deleted it)."""
        span_id = int(finding["span_id"], 16)
        try:
            spans = self.reader.trace(int(finding["trace_id"], 16))
        except StoreError as e:
            log.warning("the orphan span %s is unreadable (%s); its hop span gets no duration", span_id, e)
            return None
        return next((int(s["end_ns"]) for s in spans if int(s["span_id"]) == span_id), None)
