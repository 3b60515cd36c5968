"""Converting a sequence of capture files, here or in one worker process.

Parsing a JSON capture and building protobuf costs more Python time than decoding and storing
the result, so a large import converts in a worker process while this one decodes and stores:
both cores work. Payloads come back through a bounded queue, so the worker runs at most a few
batches ahead and memory stays bounded."""

from __future__ import annotations

import multiprocessing
import queue
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .source import BadCapture, Payload, open_capture

_AHEAD = 6  # batches the worker may convert ahead of the store


@dataclass(frozen=True)
class Converted:
    """One event of a conversion: a payload of file `index`, or (payload None) that file's end."""

    index: int
    format: str
    payload: Payload | None


def _convert(files: Sequence[str], fmt: str | None, batch_spans: int) -> Iterator[Converted]:
    for index, path in enumerate(files):
        with open_capture(path, fmt, batch_spans=batch_spans) as capture:
            for payload in capture.payloads():
                yield Converted(index, capture.format, payload)
            yield Converted(index, capture.format, None)


def _worker(files: Sequence[str], fmt: str | None, batch_spans: int, out) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the importing process, which stops this one
    try:
        for item in _convert(files, fmt, batch_spans):
            out.put(("item", item))
        out.put(("done", None))
    except BadCapture as e:
        out.put(("bad", (e.position, e.message, e.file)))
    except Exception as e:  # noqa: BLE001 - reported by the importing process
        out.put(("error", f"{type(e).__name__}: {e}"))


def converted(
    files: Sequence[str], fmt: str | None, batch_spans: int, *, in_worker: bool
) -> Iterator[Converted]:
    """The files' payloads, in order. Raises `BadCapture` where a file is bad (after the payloads
    before that position); `in_worker` converts in a separate process."""
    if not in_worker:
        yield from _convert(files, fmt, batch_spans)
        return
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue(maxsize=_AHEAD)
    proc = ctx.Process(target=_worker, args=(list(files), fmt, batch_spans, out), name="ctxaudit-import")
    proc.start()
    try:
        while True:
            try:
                kind, value = out.get(timeout=1.0)
            except queue.Empty:
                if not proc.is_alive():
                    raise RuntimeError(
                        f"the conversion process ended unexpectedly (exit code {proc.exitcode})"
                    ) from None
                continue
            if kind == "item":
                yield value
            elif kind == "done":
                return
            elif kind == "bad":
                raise BadCapture(*value)
            else:
                raise RuntimeError(f"converting failed: {value}")
    finally:
        if proc.is_alive():
            proc.terminate()  # stopped early (an error, Ctrl-C): the worker may wait on a full queue
        proc.join()
        out.close()
        out.join_thread()
