"""Slowloris against a real `ctxaudit serve` (issue 18): with the server's open files limit
low, an attacker keeps N connections per HTTP listener that send the start of a request head
and then nothing, reopening each one the server closes; meanwhile a normal client exports over
HTTP and gRPC and queries the read API once a second. Reports the normal client's latencies
and failures, how often the server closed the attacker's sockets, the server's descriptors,
and the size of its stderr.

    python -m bench.slowloris [--fd-limit 512] [--sockets 600] [--seconds 60] [serve options...]
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import resource
import selectors
import socket
import statistics
import tempfile
import threading
import time

import grpc

from audit.read.remote import RemoteReader
from audit.server.process import start_server, stop_server
from tests.otlp_builders import request, spans

PARTIAL_HEAD = b"POST /v1/traces HTTP/1.1\r\nHost: x\r\n"
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def _port(url: str) -> int:
    return int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


class Attacker:
    def __init__(self, ports: list[int], per_port: int):
        self.ports, self.per_port = ports, per_port
        self.sel = selectors.DefaultSelector()
        self.open = {p: 0 for p in ports}
        self.closed_by_server = 0
        self.connect_failures = 0

    def top_up(self) -> None:
        for port in self.ports:
            while self.open[port] < self.per_port:
                try:
                    s = socket.create_connection(("127.0.0.1", port), timeout=2)
                    s.sendall(PARTIAL_HEAD)
                except OSError:
                    self.connect_failures += 1
                    break
                s.setblocking(False)
                self.sel.register(s, selectors.EVENT_READ, port)
                self.open[port] += 1

    def reap(self) -> None:
        for key, _ in self.sel.select(timeout=0):
            s = key.fileobj
            try:
                data = s.recv(100)
            except OSError:
                data = b""
            if not data:
                self.sel.unregister(s)
                s.close()
                self.open[key.data] -= 1
                self.closed_by_server += 1

    def close(self) -> None:
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()


def _timed(fn) -> float | None:
    t = time.perf_counter()
    try:
        fn()
    except Exception:
        return None
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fd-limit", type=int, default=512)
    ap.add_argument("--sockets", type=int, default=600, help="attacker connections per HTTP listener")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument(
        "--normal-from",
        metavar="ADDRESS",
        help="the normal client's HTTP source address, e.g. 127.0.0.2 (gRPC's stays 127.0.0.1)",
    )
    args, serve_options = ap.parse_known_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the attacker's own sockets

    def low() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.fd_limit, args.fd_limit))

    with tempfile.TemporaryDirectory() as tmp:
        stderr_path = os.path.join(tmp, "stderr.txt")
        with open(stderr_path, "w") as stderr:
            proc, grpc_port, http_url = start_server(
                os.path.join(tmp, "s.duckdb"),
                "--audit-every",
                "0",
                *serve_options,
                preexec_fn=low,
                stderr=stderr,
            )
        body = request(spans(3, random.Random(1)), "normal").SerializeToString()
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        export_grpc = channel.unary_unary(EXPORT)
        attacker = Attacker([_port(http_url), _port(proc.api_url)], args.sockets)
        lat = {"http": [], "grpc": [], "api": []}
        failed = {k: 0 for k in lat}
        peak_fds = 0
        source = (args.normal_from, 0) if args.normal_from else None

        def http_call(url: str, method: str, data: bytes | None = None) -> None:
            host, port = url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)
            path = "/" + url.split("://", 1)[1].split("/", 1)[1] if url.count("/") > 2 else "/"
            c = http.client.HTTPConnection(host, int(port), timeout=10, source_address=source)
            try:
                c.request(method, path, body=data, headers={"Content-Type": "application/x-protobuf"})
                answer = c.getresponse()
                answer.read()
                if answer.status != 200:
                    raise RuntimeError(answer.status)
            finally:
                c.close()

        calls = {
            "http": lambda: http_call(http_url, "POST", body),
            "grpc": lambda: export_grpc(body, timeout=10),
            "api": lambda: http_call(proc.api_url + "/v1/ingest", "GET"),
        }
        end = time.monotonic() + args.seconds

        def attack() -> None:
            while time.monotonic() < end:
                attacker.top_up()
                attacker.reap()
                time.sleep(0.01)

        thread = threading.Thread(target=attack, daemon=True)
        thread.start()
        try:
            while time.monotonic() < end:
                for name, call in calls.items():
                    t = _timed(call)
                    if t is None:
                        failed[name] += 1
                    else:
                        lat[name].append(t)
                peak_fds = max(peak_fds, len(os.listdir(f"/proc/{proc.pid}/fd")))
                time.sleep(max(0.0, 1.0 - sum(x[-1] for x in lat.values() if x)))
            thread.join()
            stored = RemoteReader(proc.api_url).ingest()["committed_spans"]
        finally:
            attacker.close()
            channel.close()
            stop_server(proc)
        log = open(stderr_path, "rb").read()
    print(f"fd limit {args.fd_limit}, {args.sockets} attacker sockets per HTTP listener, {args.seconds:g} s")
    for name in lat:
        xs = lat[name]
        if xs:
            print(
                f"  {name}: {len(xs)} ok, {failed[name]} failed; "
                f"median {statistics.median(xs) * 1000:.1f} ms, "
                f"max {max(xs) * 1000:.0f} ms"
            )
        else:
            print(f"  {name}: 0 ok, {failed[name]} failed")
    print(f"  spans stored {stored}; the server closed {attacker.closed_by_server} attacker sockets")
    print(f"  attacker connects that failed {attacker.connect_failures}; server descriptors peak {peak_fds}")
    lines = len(log.splitlines())
    print(f"  server stderr: {len(log)} bytes, {lines} lines")
    if lines <= 20:
        print("    " + log.decode(errors="replace").replace("\n", "\n    "))


if __name__ == "__main__":
    main()
