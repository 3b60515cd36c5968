"""The staging log: requests are acknowledged once their spans are on disk here, and a loader
moves them into DuckDB in large transactions.

Why: acknowledging after the DuckDB commit ties every request to a commit of a few thousand
spans, where DuckDB costs 17-30 µs/span, and stops acknowledgements for each checkpoint
(seconds). An fsync'd append costs about 1 µs/span. This is how Tempo's ingester WAL and the
Collector's persistent queue behave.

On disk, `<db>.staging/` holds numbered segment files. A segment is a sequence of frames, one
per request: a header (magic, span count, the two payload lengths, a CRC-32 of the payload),
then the spans and the links as Arrow IPC streams. One thread appends: it takes every frame
queued, writes them, and fsyncs once for all of them (group commit), then acknowledges them.
A frame cut short by a crash, or whose CRC does not match, ends its segment when read: it was
never acknowledged. Segments are sealed at `segment_spans` spans, when the loader asks (every
second), or after a failed write; a new one is created at the next append.

The loader reads sealed segments in order and appends them to the store in one transaction
with their ids (`staging_segments`); only after the commit are the files deleted. On start,
segments whose ids are recorded are deleted, the others are loaded: every acknowledged span
is stored exactly once. The log's bytes on disk are bounded: beyond `max_bytes` requests are
refused (`StagingFull`, retryable), as are requests whose append fails (disk full).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import struct
import threading
import time
import zlib
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass

import pyarrow as pa

from .batch import LINK_SCHEMA, SpanBatch
from .errors import StoreError, StoreUnavailable
from .writer import QueueFull, SpanWriter

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<4sIQQI")  # magic, spans, spans bytes, links bytes, CRC-32 of both
_MAGIC = b"CXS1"
_SUFFIX = ".seg"
SEGMENT_SPANS = 65_536
SEGMENT_BYTES = 64 << 20


# --- crash points, for tests/test_staging.py: CTXAUDIT_STAGING_CRASH=point:n kills this process
# (SIGKILL) the n-th time it passes `point`. Unset (always, outside those tests), they cost a
# comparison.
_CRASH = os.environ.get("CTXAUDIT_STAGING_CRASH", "")
_crash_point, _, _crash_n = _CRASH.partition(":")
_crash_left = [int(_crash_n or 1)]


def _crashing(point: str) -> bool:
    """True the n-th time `point` is passed (then the caller kills the process)."""
    if point != _crash_point:
        return False
    _crash_left[0] -= 1
    return _crash_left[0] == 0


def _crash(point: str) -> None:
    if _crashing(point):
        os.kill(os.getpid(), signal.SIGKILL)


class StagingFull(QueueFull):
    """The staging log is at its size bound; the client should retry."""


@dataclass
class Segment:
    id: int
    path: str
    bytes: int = 0
    spans: int = 0
    first_at: float | None = None  # wall time of its first frame (a found segment: its mtime)
    sealed: bool = False


@dataclass
class _Frame:
    buffers: list
    size: int
    spans: int
    done: Future


@dataclass
class _Seal:
    done: Future


_STOP = object()


def encode_frame(batch: SpanBatch) -> list:
    """A batch as the buffers of one frame (header, spans IPC stream, links IPC stream)."""
    if batch.ipc is not None:
        spans, links = batch.ipc
    else:
        spans = _ipc(batch.spans)
        links = _ipc(batch.links) if batch.links.num_rows else b""
    crc = zlib.crc32(links, zlib.crc32(spans))
    header = _HEADER.pack(_MAGIC, batch.accepted, len(spans), len(links), crc)
    return [header, spans, links] if links else [header, spans]


def _ipc(table: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def read_segment(path: str, *, headers_only: bool = False) -> tuple[list[SpanBatch], int, int, int]:
    """The frames of a segment file up to the first incomplete or damaged one: (batches, spans,
    bytes read, file size). With `headers_only`, no batch is decoded and no CRC checked."""
    with pa.memory_map(path) as mm:
        data = mm.read_buffer()
    view = memoryview(data)
    batches, spans, off, size = [], 0, 0, len(data)
    while off + _HEADER.size <= size:
        magic, n, ls, ll, crc = _HEADER.unpack_from(view, off)
        end = off + _HEADER.size + ls + ll
        if magic != _MAGIC or end > size:
            break
        if not headers_only:
            start = off + _HEADER.size
            if zlib.crc32(view[start + ls : end], zlib.crc32(view[start : start + ls])) != crc:
                break
            table = pa.ipc.open_stream(data.slice(start, ls)).read_all()
            links = (
                pa.ipc.open_stream(data.slice(start + ls, ll)).read_all() if ll else LINK_SCHEMA.empty_table()
            )
            batches.append(SpanBatch(table, links))
        spans += n
        off = end
    return batches, spans, off, size


def _write_all(fd: int, buffers: list) -> None:
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    while views:
        n = os.writev(fd, views[:1024])
        while n:
            if n >= len(views[0]):
                n -= len(views.pop(0))
            else:
                views[0], n = views[0][n:], 0


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class StagingStats:
    appended_spans: int = 0
    appends: int = 0  # fsyncs: each acknowledges every frame written since the previous one
    refused_batches: int = 0
    failed_batches: int = 0
    loaded_spans: int = 0
    loads: int = 0
    failed_loads: int = 0
    replayed_segments: int = 0  # found on disk at the start, not loaded yet
    damaged_bytes: int = 0  # bytes after an incomplete or damaged frame (never acknowledged)


class StagingLog:
    """Thread-safe. `submit` returns a future resolved once the batch is fsync'd."""

    def __init__(
        self,
        directory: str,
        *,
        max_bytes: int,
        loaded: Iterable[int] = (),
        segment_spans: int = SEGMENT_SPANS,
        segment_bytes: int = SEGMENT_BYTES,
        clock=time.time,
    ):
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_spans, self.segment_bytes, self._clock = segment_spans, segment_bytes, clock
        self.stats = StagingStats()
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)  # a write, a seal or a removal happened
        self._segments: dict[int, Segment] = {}  # not yet loaded, in id order
        self._bytes = self._spans = 0  # of those segments
        self._reserved = 0  # bytes admitted, not yet written
        self._open: Segment | None = None
        self._fd: int | None = None
        self._failing_since: float | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        os.makedirs(directory, exist_ok=True)
        self._next_id = self._recover(set(loaded))
        self._thread = threading.Thread(target=self._run, name="ctxaudit-staging", daemon=True)
        self._thread.start()

    # --- figures

    @property
    def bytes(self) -> int:
        """Bytes on disk of the segments not yet loaded."""
        return self._bytes

    @property
    def spans(self) -> int:
        """Acknowledged spans not yet loaded into the store."""
        return self._spans

    @property
    def segments(self) -> int:
        return len(self._segments)

    def lag_s(self) -> float:
        """Age of the oldest acknowledged span not yet loaded: how far behind readers are."""
        with self._lock:
            first = [s.first_at for s in self._segments.values() if s.first_at is not None]
        return max(0.0, self._clock() - min(first)) if first else 0.0

    # --- appending

    def submit(self, batch: SpanBatch) -> Future:
        """Queue a batch for the next fsync; raises StagingFull beyond the size bound."""
        buffers = encode_frame(batch)
        size = sum(len(b) for b in buffers)
        with self._lock:
            used = self._bytes + self._reserved
            if used and used + size > self.max_bytes:  # an empty log takes one batch, whatever its size
                self.stats.refused_batches += 1
                raise StagingFull(
                    f"staging log is full ({used >> 20} MiB of {self.max_bytes >> 20} MiB waiting to be "
                    f"loaded{self.stalled_because})"
                )
            self._reserved += size
        frame = _Frame(buffers, size, batch.accepted, Future())
        self._queue.put(frame)
        return frame.done

    stalled_because = ""  # set by the loader while loads fail, for the refusals' message

    def seal(self) -> None:
        """Close the segment being appended to, so the loader can take it; returns once done."""
        seal = _Seal(Future())
        self._queue.put(seal)
        seal.done.result()

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            frames: list[_Frame] = []
            for item in items:
                if isinstance(item, _Frame):
                    frames.append(item)
                    continue
                if frames:
                    self._append(frames)
                    frames = []
                if item is _STOP:
                    self._seal_open()
                    return
                self._seal_open()
                item.done.set_result(None)
            if frames:
                self._append(frames)

    def _append(self, frames: list[_Frame]) -> None:
        size, spans = sum(f.size for f in frames), sum(f.spans for f in frames)
        segment = None
        try:
            segment = self._open or self._new_segment()
            _crash("append.write")
            buffers = [b for f in frames for b in f.buffers]
            if _crashing("append.torn"):  # half of the group written, then killed
                _write_all(self._fd, [b"".join(bytes(memoryview(b)) for b in buffers)[: size // 2]])
                os.kill(os.getpid(), signal.SIGKILL)
            _write_all(self._fd, buffers)
            _crash("append.fsync")
            os.fdatasync(self._fd)
        except Exception as e:  # OSError: disk full, I/O error; anything else is a bug, refused the same
            self._failed(frames, segment, e)
            return
        _crash("append.ack")
        now = self._clock()
        with self._lock:
            self._reserved -= size
            segment.bytes += size
            segment.spans += spans
            self._bytes += size
            self._spans += spans
            if segment.first_at is None:
                segment.first_at = now
            self.stats.appends += 1
            self.stats.appended_spans += spans
            self.changed.notify_all()
        if self._failing_since is not None:
            log.warning(
                "writes to the staging log %s resumed after %.0f s",
                self.directory,
                time.monotonic() - self._failing_since,
            )
            self._failing_since = None
        for f in frames:
            f.done.set_result(None)
        if segment.spans >= self.segment_spans or segment.bytes >= self.segment_bytes:
            self._seal_open()

    def _failed(self, frames: list[_Frame], segment: Segment | None, error: Exception) -> None:
        # The frames may be partly on disk: cut them off (a reader would stop at them anyway,
        # but whole ones would be loaded though refused), and start a new segment next time.
        if segment is not None and self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, segment.bytes)
                os.fdatasync(self._fd)
            self._seal_open()
        with self._lock:
            self._reserved -= sum(f.size for f in frames)
            self.stats.failed_batches += len(frames)
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.error(
                "writing the staging log %s failed (%s): refusing spans, retryably, until writes "
                "succeed again",
                self.directory,
                error,
            )
        why = getattr(error, "strerror", None) or error
        refusal = StoreUnavailable(
            f"cannot write the staging log {self.directory} ({why}); free disk space or fix the I/O "
            "error: writes resume by themselves"
        )
        for f in frames:
            f.done.set_exception(refusal)

    def _new_segment(self) -> Segment:
        segment_id = self._next_id
        path = os.path.join(self.directory, f"{segment_id:020d}{_SUFFIX}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self._next_id += 1
        try:
            _crash("segment.create")
            _fsync_dir(self.directory)  # the file's name must survive a crash as its frames do
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        segment = Segment(segment_id, path)
        with self._lock:
            self._segments[segment_id] = segment
        self._open, self._fd = segment, fd
        return segment

    def _seal_open(self) -> None:
        if self._open is None:
            return
        with contextlib.suppress(OSError):
            os.close(self._fd)
        with self._lock:
            self._open.sealed = True
            self._open, self._fd = None, None
            self.changed.notify_all()

    # --- for the loader

    def open_segment(self) -> Segment | None:
        return self._open

    def sealed(self) -> list[Segment]:
        """Sealed segments not yet loaded, oldest first."""
        with self._lock:
            return [s for s in self._segments.values() if s.sealed]

    def remove(self, segments: list[Segment]) -> int | None:
        """Delete loaded segments (after the commit that recorded them). Returns the oldest id
        whose file may still be there, if a deletion failed: its row must then be kept."""
        kept = None
        for s in segments:
            _crash("delete")
            try:
                os.unlink(s.path)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.error(
                    "cannot delete the loaded staging segment %s (%s); it is deleted at the start", s.path, e
                )
                kept = s.id if kept is None else kept
            with self._lock:
                del self._segments[s.id]
                self._bytes -= s.bytes
                self._spans -= s.spans
                self.changed.notify_all()
        try:
            _fsync_dir(self.directory)  # before a later load forgets their rows
        except OSError as e:
            log.error("cannot sync the staging directory %s (%s)", self.directory, e)
            kept = segments[0].id
        return kept

    def _recover(self, loaded: set[int]) -> int:
        """Delete the segments found whose spans are stored; keep the others (sealed) to load.
        Returns the next segment id: above every id seen, on disk or recorded."""
        found = []
        for name in os.listdir(self.directory):
            stem, suffix = os.path.splitext(name)
            if suffix == _SUFFIX and stem.isdigit():
                found.append(int(stem))
        for segment_id in sorted(found):
            path = os.path.join(self.directory, f"{segment_id:020d}{_SUFFIX}")
            if segment_id in loaded:
                os.unlink(path)
                continue
            _, spans, _, size = read_segment(path, headers_only=True)
            self._segments[segment_id] = Segment(
                segment_id, path, size, spans, os.stat(path).st_mtime if spans else None, sealed=True
            )
            self._bytes += size
            self._spans += spans
            self.stats.replayed_segments += 1
        if found:
            _fsync_dir(self.directory)
        if self._segments:
            log.info(
                "staging log %s: %d segment(s) with %d acknowledged spans to load",
                self.directory,
                len(self._segments),
                self.spans,
            )
        return max([*found, *loaded, 0]) + 1


class StagingLoader:
    """Moves sealed segments into the store through the writer: at least `load_spans` spans per
    transaction when that many wait, else whatever the last `interval_s` brought."""

    def __init__(
        self,
        staging: StagingLog,
        writer: SpanWriter,
        *,
        load_spans: int = SEGMENT_SPANS,
        interval_s: float = 1.0,
        retry_s: float = 1.0,
    ):
        self.staging, self.writer = staging, writer
        self.load_spans, self.interval_s, self.retry_s = load_spans, interval_s, retry_s
        self.last_lag_s = 0.0  # at the last load: the age of its oldest span when it committed
        self._draining = False
        self._drain_deadline = float("inf")
        self._keep_rows_from: int | None = None  # a segment whose file could not be deleted
        self._thread = threading.Thread(target=self._run, name="ctxaudit-loader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 60.0) -> int:
        """Load everything staged (new requests must have stopped), then stop. Gives up after
        `timeout` seconds of failing loads; returns the spans left in the log (loaded at the
        next start)."""
        self._drain_deadline = time.monotonic() + timeout
        self._draining = True
        with self.staging.changed:
            self.staging.changed.notify_all()
        self._thread.join()
        return self.staging.spans

    def _run(self) -> None:
        while True:
            draining = self._draining
            if draining:
                self.staging.seal()
            segments = self._next_load()
            if segments is None:
                if draining and not self.staging.segments:
                    return
                continue
            try:
                loaded = self._load(segments)
            except Exception:  # a bug must not stop the loader: the log would fill and refuse forever
                log.exception("unexpected error while loading the staging log; retrying")
                self.staging.stats.failed_loads += 1
                time.sleep(self.retry_s)
                loaded = False
            if not loaded and draining and time.monotonic() > self._drain_deadline:
                return

    def _next_load(self) -> list[Segment] | None:
        """Wait for work (at most until the open segment is `interval_s` old); the segments of
        the next load, or None to look again."""
        staging = self.staging
        with staging.changed:
            sealed = [s for s in staging._segments.values() if s.sealed]
            open_ = staging.open_segment()
            if not sealed and not self._draining:
                if open_ is None or open_.first_at is None:
                    staging.changed.wait(self.interval_s)
                    return None
                age = staging._clock() - open_.first_at
                if age < self.interval_s:
                    staging.changed.wait(self.interval_s - age)
                    return None
        if not sealed:
            if open_ is not None and not self._draining:
                staging.seal()
            return None
        take, spans = [], 0
        for s in sealed:
            take.append(s)
            spans += s.spans
            if spans >= self.load_spans:
                break
        return take

    def _load(self, segments: list[Segment]) -> bool:
        staging = self.staging
        batches, counts = [], []
        for s in segments:
            try:
                got, spans, read, size = read_segment(s.path)
            except FileNotFoundError:  # removed by someone else: nothing to load, record it all the same
                log.error("staging segment %s has disappeared: its %d spans are lost", s.path, s.spans)
                got, spans, read, size = [], 0, 0, 0
            if read < size:
                staging.stats.damaged_bytes += size - read
                log.warning(
                    "staging segment %s: %d bytes after its last whole frame were never acknowledged "
                    "(cut short by a crash, or damaged); they are not loaded",
                    s.path,
                    size - read,
                )
            batches += [b for b in got if b.accepted]
            counts.append(spans)
        spans = sum(counts)
        first = segments[0].id
        forget_below = min(first, self._keep_rows_from) if self._keep_rows_from is not None else first
        table = pa.table(
            {
                "segment": pa.array([s.id for s in segments], pa.int64()),
                "spans": pa.array(counts, pa.int64()),
                "forget_below": pa.array([forget_below] * len(segments), pa.int64()),
            }
        )
        _crash("load.commit")
        try:
            if batches:
                self.writer.submit_load(batches, table).result()
            else:  # nothing whole in them: record them all the same
                self.writer.submit_load(
                    [SpanBatch(_empty_spans(), LINK_SCHEMA.empty_table())], table
                ).result()
        except StoreError as e:
            staging.stats.failed_loads += 1
            if not staging.stalled_because:
                log.error("loading the staging log into the store failed: %s; retrying every second", e)
            staging.stalled_because = f"; the store is not taking them: {e}"
            time.sleep(self.retry_s)
            return False
        _crash("load.committed")
        oldest = min((s.first_at for s in segments if s.first_at is not None), default=None)
        if oldest is not None:
            self.last_lag_s = staging._clock() - oldest
        if staging.stalled_because:
            log.warning("loading the staging log into the store resumed")
            staging.stalled_because = ""
        staging.stats.loads += 1
        staging.stats.loaded_spans += spans
        kept = staging.remove(segments)
        if kept is not None:  # until the restart, which deletes that file
            self._keep_rows_from = min(kept, self._keep_rows_from or kept)
        return True


def _empty_spans() -> pa.Table:
    from .batch import SPAN_SCHEMA

    return SPAN_SCHEMA.empty_table()
