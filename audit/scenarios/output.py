"""Where simulated traffic goes: an OTLP/gRPC endpoint, and the ground-truth file beside it."""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Iterable
from typing import IO

import grpc

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}


class SendError(RuntimeError):
    pass


class OtlpGrpcSender:
    """Sends pre-encoded export requests; retries what OTLP says is retryable, as exporters do."""

    def __init__(self, target: str, *, timeout: float = 30.0, max_attempts: int = 8):
        self.target = target
        self.timeout = timeout
        self.max_attempts = max_attempts
        self._channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)])
        self._export = self._channel.unary_unary(EXPORT)
        self.retries = 0

    def send(self, body: bytes) -> None:
        delay = 0.2
        for attempt in range(1, self.max_attempts + 1):
            try:
                self._export(body, timeout=self.timeout)
                return
            except grpc.RpcError as e:
                if e.code() not in _RETRYABLE or attempt == self.max_attempts:
                    raise SendError(
                        f"OTLP export to {self.target} failed: {e.code().name}: {e.details()}"
                    ) from None
                self.retries += 1
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def close(self) -> None:
        self._channel.close()


class TruthWriter:
    """Ground truth as JSON Lines, one record a span; gzip when the path ends in `.gz`."""

    def __init__(self, path: str):
        self.path = path
        opener = gzip.open if path.endswith(".gz") else open
        self._file: IO[str] = opener(path, "wt", encoding="utf-8")

    def write(self, records: Iterable) -> None:
        self._file.writelines(json.dumps(r.to_dict(), separators=(",", ":")) + "\n" for r in records)

    def close(self) -> None:
        self._file.close()


def read_truth(path: str) -> Iterable[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)
