"""How a decode worker hands a batch back to the server: as Arrow IPC streams, through a shared
memory file when there is one, instead of pickling the tables.

Pickling a `SpanBatch` and unpickling it costs 2.4 µs a span; writing and mapping its IPC
streams, 0.3 (bench/decode.py --handoff, docs/performance.md). The worker writes both streams
into one file under /dev/shm and returns its name; the server maps the file, unlinks it at once
and reads the tables from the mapping without a copy (the pages go when the tables do). Where
there is no /dev/shm, or it is full, the streams travel in the pickle as bytes.
"""

from __future__ import annotations

import gc
import itertools
import os
from dataclasses import dataclass, field

import pyarrow as pa

from audit.store.batch import LINK_SCHEMA, SpanBatch

SHM_DIR = "/dev/shm"
_PREFIX = "ctxaudit-batch-"
_serial = itertools.count()


@dataclass
class Shipped:
    """A SpanBatch on its way from a worker: IPC bytes, or the shared memory file holding them."""

    path: str | None
    data: bytes | None
    spans_size: int
    links_size: int
    rejected: int = 0
    rejection_reasons: dict[str, int] = field(default_factory=dict)
    end_before_start: int = 0


def _ipc(table: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def ship(batch: SpanBatch, shm_dir: str | None = SHM_DIR) -> Shipped:
    """In the worker: the batch as IPC streams, in a shared memory file if `shm_dir` allows."""
    spans = _ipc(batch.spans)
    links = _ipc(batch.links) if batch.links.num_rows else b""
    meta = dict(
        spans_size=len(spans),
        links_size=len(links),
        rejected=batch.rejected,
        rejection_reasons=batch.rejection_reasons,
        end_before_start=batch.end_before_start,
    )
    if shm_dir is not None and os.path.isdir(shm_dir):
        path = os.path.join(shm_dir, f"{_PREFIX}{os.getppid()}-{os.getpid()}-{next(_serial)}")
        try:
            _write(path, spans, links)
        except OSError:  # full, or not writable: the bytes go in the pickle instead
            pass
        else:
            return Shipped(path=path, data=None, **meta)
    return Shipped(path=None, data=spans.to_pybytes() + bytes(links), **meta)


def _write(path: str, *buffers) -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        for b in buffers:
            view = memoryview(b).cast("B")
            while view:
                view = view[os.write(fd, view) :]
    except OSError:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def receive(shipped: Shipped) -> SpanBatch:
    """In the server: the batch back, read without a copy from the file (unlinked here) or bytes."""
    if shipped.path is not None:
        with pa.memory_map(shipped.path) as mapped:
            data = mapped.read_buffer()  # keeps the mapping alive as long as the tables use it
        os.unlink(shipped.path)
    else:
        data = pa.py_buffer(shipped.data)
    spans = pa.ipc.open_stream(data.slice(0, shipped.spans_size)).read_all()
    if shipped.links_size:
        links = pa.ipc.open_stream(data.slice(shipped.spans_size, shipped.links_size)).read_all()
    else:
        links = LINK_SCHEMA.empty_table()
    return SpanBatch(
        spans=spans,
        links=links,
        rejected=shipped.rejected,
        rejection_reasons=shipped.rejection_reasons,
        end_before_start=shipped.end_before_start,
        # the staging log writes these streams as they are (audit/store/staging.py)
        ipc=(data.slice(0, shipped.spans_size), data.slice(shipped.spans_size, shipped.links_size)),
    )


def sweep(shm_dir: str = SHM_DIR) -> int:
    """Remove the files no one will receive: those whose worker or server process is gone (a
    worker killed mid-request, a server killed outright). Returns how many."""
    removed = 0
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return 0
    for name in names:
        if not name.startswith(_PREFIX):
            continue
        try:
            server_pid, worker_pid = (int(p) for p in name[len(_PREFIX) :].split("-")[:2])
        except ValueError:
            continue
        if _alive(server_pid) and _alive(worker_pid):
            continue
        try:
            os.unlink(os.path.join(shm_dir, name))
            removed += 1
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def freeze_imports() -> None:
    """In a new worker: load the decoders, then move every object made so far out of the
    collector's sight, so its full collections stop walking the imported modules."""
    from . import arrow_columns, decoder  # noqa: F401  (imported for their side effect)

    arrow_columns.available()  # builds the ptars handlers
    gc.collect()
    gc.freeze()
