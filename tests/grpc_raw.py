"""A gRPC call written frame by frame over HTTP/2 (h2), for what grpcio's client will not send:
a message flagged compressed that is not valid gzip, another `grpc-encoding`, a JSON or missing
content-type, a message compressed once and sent many times without recompressing."""

from __future__ import annotations

import socket
import struct

import h2.config
import h2.connection
import h2.events

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def grpc_call(
    target: str,
    message: bytes,
    *,
    compressed: bool = False,
    encoding: str | None = None,
    content_type: str | None = "application/grpc",
    metadata: tuple[tuple[str, str], ...] = (),
    path: str = EXPORT,
    timeout: float = 30,
) -> dict[str, str]:
    """One unary call with `message` as its only message (its compressed flag set with
    `compressed`, `grpc-encoding` from `encoding`); the response's headers and trailers merged
    (`grpc-status`, `grpc-message`), or {} if the stream was reset without them."""
    host, _, port = target.rpartition(":")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    headers = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", target)]
    headers += [("te", "trailers")]
    headers += [("content-type", content_type)] if content_type else []
    headers += [("grpc-encoding", encoding)] if encoding else []
    headers += list(metadata)
    answer: dict[str, str] = {}
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, headers)
        frame = struct.pack(">BI", int(compressed), len(message)) + message
        while frame:  # within the peer's flow-control window: a refused call stops reading
            window = min(conn.local_flow_control_window(stream), conn.max_outbound_frame_size)
            if window:
                conn.send_data(stream, frame[:window], end_stream=len(frame) <= window)
                frame = frame[window:]
                sock.sendall(conn.data_to_send())
            elif not _receive(sock, conn, stream, answer):
                return answer
        while _receive(sock, conn, stream, answer):
            pass
        return answer


def _receive(sock: socket.socket, conn: h2.connection.H2Connection, stream: int, answer: dict) -> bool:
    """Read once; False when the stream has ended (or the connection has closed)."""
    data = sock.recv(65536)
    if not data:
        return False
    for event in conn.receive_data(data):
        if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
            answer.update(dict(event.headers))
        elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)) and event.stream_id == stream:
            return False
    sock.sendall(conn.data_to_send())
    return True
