"""Opening a capture file: gzip or not (by its first bytes), which format (given or detected),
and the converter that turns it into OTLP export requests."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

PROTOBUF = "application/x-protobuf"  # the two OTLP/HTTP content types: how a payload is decoded
JSON = "application/json"

FORMATS = ("jaeger", "zipkin", "otlp-json")
_GZIP_MAGIC = b"\x1f\x8b"
_HEAD_BYTES = 64 << 10


@dataclass(frozen=True)
class Payload:
    """One OTLP export request, as the receivers would get it, and where in the file it came from."""

    body: bytes
    content_type: str  # PROTOBUF or JSON (OTLP/JSON lines are passed on as they are)
    position: str  # e.g. "line 12", "data[40..79]": names the request in an error message


class BadCapture(ValueError):
    """The file cannot be read as its format; says where."""

    def __init__(self, position: str, message: str, file: str | None = None):
        super().__init__(message)
        self.position = position
        self.message = message
        self.file = file

    def __str__(self) -> str:
        where = ": ".join(p for p in (self.file, self.position) if p)
        return f"{where}: {self.message}" if where else self.message


class _Stream:
    """A binary stream that turns gzip and I/O failures into `BadCapture`, and closes its file."""

    def __init__(self, path: str):
        self.path = path
        self._raw = open(path, "rb")  # noqa: SIM115 - closed by close()
        gzipped = self._raw.read(2) == _GZIP_MAGIC
        self._raw.seek(0)
        self._f: BinaryIO = gzip.GzipFile(fileobj=self._raw, mode="rb") if gzipped else self._raw
        self.gzipped = gzipped

    def _guard(self, read: Callable, *args):
        try:
            return read(*args)
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise BadCapture("", f"not a valid gzip file ({e or 'truncated'})") from None

    def read(self, n: int = -1) -> bytes:
        return self._guard(self._f.read, n)

    def lines(self) -> Iterator[bytes]:
        while True:
            line = self._guard(self._f.readline)
            if not line:
                return
            yield line

    def close(self) -> None:
        if self._f is not self._raw:
            self._f.close()
        self._raw.close()


def load_json(stream: _Stream) -> object:
    """The whole document (Jaeger and Zipkin files are one JSON value each)."""
    data = stream.read()
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise BadCapture(f"line {e.lineno} column {e.colno}", f"not valid JSON ({e.msg})") from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise BadCapture("", f"not valid JSON ({e})") from None


class Capture:
    """An open capture file: `format`, then `payloads()` once. Use as a context manager."""

    def __init__(self, path: str, fmt: str | None = None, *, batch_spans: int = 4000):
        from .detect import detect

        self.path = path
        self.batch_spans = batch_spans
        self._stream = _Stream(path)
        try:
            self.format = fmt or detect(self._stream.read(_HEAD_BYTES))
        except BadCapture as e:
            self._stream.close()
            e.file = path
            raise
        except BaseException:
            self._stream.close()
            raise
        self._stream.close()
        self._stream = _Stream(path)  # from the start again, for the converter

    def payloads(self) -> Iterator[Payload]:
        from . import jaeger, otlp_json, zipkin

        convert = {"jaeger": jaeger.payloads, "zipkin": zipkin.payloads, "otlp-json": otlp_json.payloads}
        try:
            yield from convert[self.format](self._stream, self.batch_spans)
        except BadCapture as e:
            e.file = self.path
            raise

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_capture(path: str, fmt: str | None = None, *, batch_spans: int = 4000) -> Capture:
    """Open `path` (gzip or not); `fmt` None detects the format from the content."""
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown capture format {fmt!r}; one of {', '.join(FORMATS)}")
    return Capture(path, fmt, batch_spans=batch_spans)
