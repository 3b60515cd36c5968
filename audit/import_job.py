"""`ctxaudit import`: capture files into the store, through the receivers' own write path
(OTLP request -> the receivers' decoder -> `SpanWriter`), skipping spans stored already.

The decoder is handed in by the CLI (the audit package does not import the receivers). A
batch is checked against the store only after the batch before it has committed, so copies
across batches and files are found too; the next batch is converted meanwhile."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import pyarrow as pa

from .capture import BadCapture, Payload
from .capture.convert import converted
from .store.batch import SpanBatch
from .store.dedup import drop_stored
from .store.writer import SpanWriter

Decode = Callable[[bytes, str], SpanBatch]  # (body, content type) -> spans; raises ValueError


@dataclass
class ImportStats:
    files: int = 0  # files read to the end
    stored: int = 0  # spans committed
    duplicates: int = 0  # spans skipped: stored already (or twice in what was read)
    formats: Counter = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def summary(self) -> str:
        formats = ", ".join(f"{k} {n}" for k, n in sorted(self.formats.items()))
        rate = self.stored / self.seconds if self.seconds > 0 else 0.0
        return (
            f"import: {self.stored:,} spans stored, {self.duplicates:,} skipped as already stored, "
            f"from {self.files} file(s) ({formats or 'none'}) in {self.seconds:.1f} s ({rate:,.0f} spans/s)"
        )


class Importer:
    """Owns nothing: the caller opens and closes the writer. Large imports convert in a worker
    process (`audit.capture.convert`) while this one decodes and stores."""

    def __init__(
        self,
        writer: SpanWriter,
        decode: Decode,
        *,
        batch_spans: int = 4000,
        progress: Callable[[str], None] | None = None,
        progress_every_s: float = 5.0,
        worker_from_bytes: int = 16 << 20,
    ):
        self.writer = writer
        self.decode = decode
        self.batch_spans = batch_spans
        self.progress = progress
        self.progress_every_s = progress_every_s
        self.worker_from_bytes = (
            worker_from_bytes  # convert in a worker process from this many bytes of files
        )
        self.stats = ImportStats()
        self._cursor = writer.store.cursor()
        self._pending: list[SpanBatch] = []
        self._pending_spans = 0
        self._inflight: tuple[Future, int] | None = None
        self._last_progress = time.monotonic()
        self._last_stored = 0

    def run(self, files: Sequence[str], fmt: str | None = None) -> ImportStats:
        """Import every file in turn. Raises `BadCapture` (naming the file and the position) at the
        first bad one, after committing everything read before that position."""
        in_worker = sum(os.path.getsize(f) for f in files) >= self.worker_from_bytes
        items = converted(files, fmt, self.batch_spans, in_worker=in_worker)
        try:
            for item in items:
                if item.payload is None:
                    self.stats.files += 1
                    self.stats.formats[item.format] += 1
                    continue
                self._add(files[item.index], item.payload)
                if self._pending_spans >= self.batch_spans:
                    self._flush()
                    self._report(f"{files[item.index]} ({item.index + 1}/{len(files)})")
        except (BadCapture, KeyboardInterrupt):
            items.close()  # stops the worker process, if any
            self._finish()  # what was read before stays
            raise
        finally:
            items.close()
        self._finish()
        return self.stats

    def _finish(self) -> None:
        self._flush()
        self._wait()

    def _add(self, path: str, payload: Payload) -> None:
        try:
            batch = self.decode(payload.body, payload.content_type)
        except ValueError as e:
            raise BadCapture(payload.position, str(e), path) from None
        if batch.rejected:
            raise BadCapture(payload.position, f"spans refused: {batch.rejection_message()}", path)
        self._pending.append(batch)
        self._pending_spans += batch.accepted

    def _flush(self) -> None:
        if not self._pending:
            return
        if len(self._pending) == 1:
            batch = self._pending[0]
        else:
            batch = SpanBatch(
                pa.concat_tables([b.spans for b in self._pending], promote_options="permissive"),
                pa.concat_tables([b.links for b in self._pending], promote_options="permissive"),
            )
        self._pending, self._pending_spans = [], 0
        self._wait()  # the check must see the batch before this one
        batch, duplicates = drop_stored(self._cursor, batch)
        self.stats.duplicates += duplicates
        if batch.accepted:
            self._inflight = (self.writer.submit(batch), batch.accepted)

    def _wait(self) -> None:
        if self._inflight is not None:
            future, n = self._inflight
            self._inflight = None
            future.result()  # raises the writer's StoreError
            self.stats.stored += n

    def _report(self, label: str) -> None:
        now = time.monotonic()
        if self.progress is None or now - self._last_progress < self.progress_every_s:
            return
        rate = (self.stats.stored - self._last_stored) / (now - self._last_progress)
        self._last_progress, self._last_stored = now, self.stats.stored
        self.progress(
            f"import: {self.stats.stored:,} spans stored, {self.stats.duplicates:,} already stored; "
            f"{rate:,.0f} spans/s; reading {label}"
        )
