"""Both OTLP receivers over one Ingestor, started and drained together."""

from __future__ import annotations

from audit.net.access import OPEN, Access
from audit.net.connections import ConnectionLimits

from .grpc_receiver import GrpcReceiver
from .http_receiver import HttpReceiver
from .ingest import Ingestor


class OtlpReceivers:
    def __init__(
        self,
        ingestor: Ingestor,
        *,
        grpc_address: str | None,
        http_address: str | None,
        drain_timeout: float = 30.0,
        access: Access = OPEN,
        limits: ConnectionLimits | None = None,
    ):
        self.ingestor = ingestor
        self.drain_timeout = drain_timeout
        self.grpc = (
            GrpcReceiver(ingestor, grpc_address, access=access, limits=limits) if grpc_address else None
        )
        self.http = (
            HttpReceiver(ingestor, http_address, drain_timeout=drain_timeout, access=access, limits=limits)
            if http_address
            else None
        )

    def start(self) -> None:
        self.ingestor.start()
        try:
            if self.grpc:
                self.grpc.start()
            if self.http:
                self.http.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop accepting on both transports, finish requests in flight, stop the decoders."""
        grpc_done = self.grpc.stop(self.drain_timeout) if self.grpc and self.grpc.port is not None else None
        if self.http and self.http.port is not None:
            self.http.stop()
        if grpc_done is not None:
            grpc_done.wait()
        self.ingestor.close()
