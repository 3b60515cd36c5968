"""The one `Export` both transports call: admit, decode, queue for commit, acknowledge.

Decoding and conversion to columns run in worker processes, so ingest uses every core
(one Python process tops out at about 35k spans/s, DESIGN.md). The request is
acknowledged only once its spans are durable: fsync'd to the staging log (audit/store/staging.py),
or, without one, committed by the writer. Every way of refusing a
request is a `Refused` subclass carrying its wire codes: this is the one table that
gives errors their retry meaning (OTLP spec, "Failures" and "Retryable response codes").
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from audit.settings import ServeSettings
from audit.store.batch import SpanBatch
from audit.store.errors import StoreError
from audit.store.staging import StagingLog
from audit.store.writer import QueueFull, SpanWriter

from . import decoder, worker
from .decode import JSON, PROTOBUF, BadRequest, TooLarge, gunzip

_DEFAULTS = ServeSettings()  # declared in audit/settings.py
log = logging.getLogger(__name__)

CONTENT_TYPES = (PROTOBUF, JSON)


class Refused(Exception):
    """The request was not accepted; the subclass says whether the client may retry."""

    http_status = 500
    grpc_status = "INTERNAL"
    retry_after: int | None = None


class InvalidRequest(Refused):  # permanent: the same bytes will never be accepted
    http_status = 400
    grpc_status = "INVALID_ARGUMENT"


class PayloadTooLarge(Refused):  # permanent
    http_status = 413
    grpc_status = "RESOURCE_EXHAUSTED"


class UnsupportedMediaType(Refused):  # permanent; only HTTP can send one
    http_status = 415
    grpc_status = "INVALID_ARGUMENT"


class Unauthenticated(Refused):  # permanent until the client sends the token
    http_status = 401
    grpc_status = "UNAUTHENTICATED"


class Unavailable(Refused):  # transient: queue full, store busy, worker restarting
    http_status = 503
    grpc_status = "UNAVAILABLE"
    retry_after = 1


@dataclass(frozen=True)
class ExportResult:
    accepted: int
    rejected: int
    message: str


@dataclass
class IngestStats:
    requests: int = 0
    accepted_spans: int = 0
    rejected_spans: int = 0
    invalid_requests: int = 0
    refused_requests: int = 0
    unauthenticated_requests: int = 0
    end_before_start: int = 0


def decode_batch(body: bytes, content_type: str, gzipped: bool, max_bytes: int) -> SpanBatch:
    """Body bytes -> SpanBatch. Pure; runs in a worker process (or inline with 0 workers)."""
    if gzipped:
        body = gunzip(body, max_bytes)
    return decoder.to_span_batch(body, content_type)


def _decode_in_worker(body: bytes, content_type: str, gzipped: bool, max_bytes: int) -> worker.Shipped:
    # handed back as Arrow IPC through shared memory, not pickled (collector_ext/worker.py)
    return worker.ship(decode_batch(body, content_type, gzipped, max_bytes))


def _worker_init() -> None:
    # Ctrl-C and SIGTERM are for the server process, which drains and then stops the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # A server killed outright (kill -9, the OOM killer) cannot stop its pool: the worker would
    # wait on its queue forever. It watches for being orphaned and goes too.
    parent = os.getppid()

    def watch_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()


class Ingestor:
    """Thread-safe; one per server. `export` blocks until the spans are durable: fsync'd to the
    staging log when there is one (a loader moves them into the store), else committed."""

    def __init__(
        self,
        writer: SpanWriter,
        *,
        staging: StagingLog | None = None,
        decoders: int = os.cpu_count() or 1,
        max_body_bytes: int = _DEFAULTS.max_body_bytes,
        max_inflight_bytes: int = _DEFAULTS.inflight_bytes,
        commit_timeout: float = 30.0,
    ):
        self.writer = writer
        self.staging = staging
        self.decoders = decoders
        self.max_body_bytes = max_body_bytes
        self.max_inflight_bytes = max_inflight_bytes
        self.commit_timeout = commit_timeout
        self.stats = IngestStats()
        self._lock = threading.Lock()
        self._restart_lock = threading.Lock()
        self._inflight_bytes = 0
        self._pool: ProcessPoolExecutor | None = None

    @property
    def inflight_bytes(self) -> int:
        """Request bytes being decoded or committed now (refusals start at max_inflight_bytes)."""
        return self._inflight_bytes

    def start(self) -> None:
        """Start the decode workers and wait until each has imported the decoder."""
        if self.decoders > 0:
            self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(
            max_workers=self.decoders,
            mp_context=multiprocessing.get_context("spawn"),  # never fork a process that runs gRPC threads
            initializer=_worker_init,
        )
        warmups = [pool.submit(decode_batch, b"", PROTOBUF, False, 1) for _ in range(self.decoders)]
        for f in warmups:
            f.result()
        return pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            worker.sweep()

    def export(self, body: bytes, content_type: str, gzipped: bool = False) -> ExportResult:
        if content_type not in CONTENT_TYPES:
            self._count(invalid=True)
            raise UnsupportedMediaType(f"unsupported content type {content_type!r}: use {PROTOBUF} or {JSON}")
        if len(body) > self.max_body_bytes:
            self._count(invalid=True)
            raise PayloadTooLarge(f"body of {len(body)} bytes exceeds the maximum of {self.max_body_bytes}")
        self._admit(len(body))
        try:
            batch = self._decode(body, content_type, gzipped)
            if batch.accepted:
                self._commit(batch)
        finally:
            with self._lock:
                self._inflight_bytes -= len(body)
        with self._lock:
            s = self.stats
            s.requests += 1
            s.accepted_spans += batch.accepted
            s.rejected_spans += batch.rejected
            s.end_before_start += batch.end_before_start
        return ExportResult(batch.accepted, batch.rejected, batch.rejection_message())

    def count_unauthenticated(self) -> None:
        """A request turned away for want of the token (the receivers check it, before decoding)."""
        with self._lock:
            self.stats.requests += 1
            self.stats.unauthenticated_requests += 1

    def _count(self, *, invalid: bool = False, refused: bool = False) -> None:
        with self._lock:
            self.stats.requests += 1
            self.stats.invalid_requests += invalid
            self.stats.refused_requests += refused

    def _admit(self, size: int) -> None:
        with self._lock:
            # an idle server always admits one request, however large (it passed max_body_bytes)
            if self._inflight_bytes and self._inflight_bytes + size > self.max_inflight_bytes:
                self.stats.requests += 1
                self.stats.refused_requests += 1
                raise Unavailable(
                    f"ingest queue is full ({self._inflight_bytes} bytes in flight); retry later"
                )
            self._inflight_bytes += size

    def _decode(self, body: bytes, content_type: str, gzipped: bool) -> SpanBatch:
        pool = self._pool
        try:
            if pool is None:
                return decode_batch(body, content_type, gzipped, self.max_body_bytes)
            shipped = pool.submit(
                _decode_in_worker, body, content_type, gzipped, self.max_body_bytes
            ).result()
            return worker.receive(shipped)
        except TooLarge as e:
            self._count(invalid=True)
            raise PayloadTooLarge(str(e)) from None
        except BadRequest as e:
            self._count(invalid=True)
            raise InvalidRequest(str(e)) from None
        except BrokenProcessPool:
            self._count(refused=True)
            self._replace_pool(pool)
            raise Unavailable("a decode worker died; it has been restarted, retry") from None
        except RuntimeError as e:  # pool shut down: the server is stopping
            self._count(refused=True)
            raise Unavailable(f"server is shutting down: {e}") from None

    def _replace_pool(self, broken: ProcessPoolExecutor) -> None:
        with self._restart_lock:
            if self._pool is not broken:  # another request already replaced it
                return
            log.error("a decode worker process died; starting a new pool")
            broken.shutdown(wait=False, cancel_futures=True)
            worker.sweep()  # the dead worker's unreceived batches
            self._pool = self._new_pool()

    def _commit(self, batch: SpanBatch) -> None:
        try:
            done = (self.staging or self.writer).submit(batch)
        except QueueFull as e:  # the write queue, or the staging log (StagingFull)
            self._count(refused=True)
            raise Unavailable(f"{e}; retry later") from None
        started = time.monotonic()
        try:
            done.result(timeout=self.commit_timeout)
        except FutureTimeout:
            self._count(refused=True)
            raise Unavailable(
                f"commit did not finish within {time.monotonic() - started:.0f}s; retry later"
            ) from None
        except StoreError as e:
            self._count(refused=True)
            raise Unavailable(f"spans were not stored: {e}") from None
