"""Connections are bounded (issue 18, item 2): a client that never finishes its request head,
idles, or trickles its body is closed; a listener holds at most its cap of connections, and a
slowloris at the cap does not keep normal clients out; accept errors are logged once per
interval, not once per attempt. Against a real `ctxaudit serve` with a low open files limit,
and against the aiohttp host both HTTP listeners run on."""

from __future__ import annotations

import http.client
import json
import random
import resource
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import grpc
import pytest
from aiohttp import web

from audit.net.aio_host import ThreadedAioServer
from audit.net.connections import GRACE_S, ConnectionLimits
from audit.read.remote import RemoteReader
from audit.server.process import start_server, stop_server
from tests.otlp_builders import request, spans

PARTIAL_HEAD = b"POST /v1/traces HTTP/1.1\r\nHost: x\r\n"
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
FD_LIMIT = 1024  # room for 192 connections per listener: the caps below decide


def _fd_limit():  # in the child, before exec
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def _port(url: str) -> int:
    return int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


def _partial_heads(port: int, n: int) -> list[socket.socket]:
    """`n` connections that send the start of a request head, then nothing."""
    out = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            s.sendall(PARTIAL_HEAD)
        except OSError:  # already closed to make room: it counts as held all the same
            pass
        out.append(s)
    return out


def _closed_by_server(s: socket.socket, deadline: float) -> bool:
    """Whether the server closes `s` before `deadline` (recv gives b'' or a reset)."""
    s.settimeout(max(0.05, deadline - time.monotonic()))
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _export_http(url: str, service: str) -> int:
    body = request(spans(3, random.Random(1)), service).SerializeToString()
    r = urllib.request.Request(url, data=body, headers={"Content-Type": "application/x-protobuf"})
    with urllib.request.urlopen(r, timeout=30) as answer:
        return answer.status


def _export_grpc(port: int, service: str) -> None:
    body = request(spans(3, random.Random(2)), service).SerializeToString()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        channel.unary_unary(EXPORT)(body, timeout=30)


@pytest.mark.slow
def test_slow_clients_are_closed_and_normal_clients_served(tmp_path):
    db = str(tmp_path / "limits.duckdb")
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "w") as stderr:
        proc, grpc_port, http_url = start_server(
            db,
            *("--header-timeout", "2", "--idle-timeout", "30", "--stall-timeout", "30"),
            *("--max-connections", "60", "--decoders", "0", "--audit-every", "0"),
            preexec_fn=_fd_limit,
            stderr=stderr,
        )
    api_url = proc.api_url
    held: list[socket.socket] = []
    try:
        # below the cap: each is closed by the server once the header timeout has passed
        slow = _partial_heads(_port(http_url), 40) + _partial_heads(_port(api_url), 40)
        held += slow
        assert _export_http(http_url, "http-meanwhile") == 200
        _export_grpc(grpc_port, "grpc-meanwhile")
        assert RemoteReader(api_url).ingest()["requests"] == 2
        deadline = time.monotonic() + 60
        assert all(_closed_by_server(s, deadline) for s in slow)

        # far over the cap, and more than the open files limit allows in all: the listeners make
        # room (the oldest unfinished head goes) and keep answering
        for _ in range(3):
            held += _partial_heads(_port(http_url), 300) + _partial_heads(_port(api_url), 300)
            time.sleep(2 * GRACE_S)  # from the same address, a connection this young is spared
            assert _export_http(http_url, "http-flood") == 200
            _export_grpc(grpc_port, "grpc-flood")
            health = RemoteReader(api_url).ingest()
        assert health["requests"] == 2 + 3 * 2 and health["invalid_requests"] == 0
        expected = {"http-meanwhile", "grpc-meanwhile", "http-flood", "grpc-flood"}
        assert _poll(lambda: expected <= {row.service for row in RemoteReader(api_url).stats().by_service})
        assert proc.poll() is None
    finally:
        for s in held:
            s.close()
        assert stop_server(proc) == 0
    log = stderr_path.read_text()
    assert "out of system resource" not in log and "Traceback" not in log
    assert len(log.splitlines()) < 20, log[-3000:]


async def _echo(request: web.Request) -> web.Response:
    return web.Response(body=await request.read())


@pytest.fixture
def host():
    """The aiohttp host alone, with short limits, answering POST /echo with the body."""
    app = web.Application()
    app.router.add_post("/echo", _echo)
    server = ThreadedAioServer(
        "test-host",
        "127.0.0.1",
        0,
        threads=2,
        limits=ConnectionLimits(header_timeout=1.0, idle_timeout=2.0, stall_timeout=1.5, max_connections=10),
    )
    server.start(app, "the test host")
    yield server
    server.stop()


def _poll(condition, deadline_s: float = 30.0) -> bool:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _read_response(s: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data or not data.endswith(b"hello"):
        chunk = s.recv(1000)
        if not chunk:
            break
        data += chunk
    return data


def test_idle_connections_are_closed_after_the_idle_timeout(host):
    s = socket.create_connection(("127.0.0.1", host.port), timeout=30)
    s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
    assert _read_response(s).startswith(b"HTTP/1.1 200")
    assert _closed_by_server(s, time.monotonic() + 30)
    assert _poll(lambda: host.guard.counts.idle_timeouts == 1)
    assert host.guard.counts.head_timeouts == 0


def test_a_body_that_stops_arriving_is_closed_and_one_that_keeps_coming_is_not(host):
    stalled = socket.create_connection(("127.0.0.1", host.port), timeout=30)
    stalled.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
    assert _closed_by_server(stalled, time.monotonic() + 30)
    assert _poll(lambda: host.guard.counts.stalls == 1)

    # a slow body that keeps coming, for longer than the stall timeout in all, is served
    steady = socket.create_connection(("127.0.0.1", host.port), timeout=30)
    steady.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
    started = time.monotonic()
    for byte in b"hello":
        time.sleep(0.5)
        steady.sendall(bytes([byte]))
    answer = _read_response(steady)
    assert time.monotonic() - started > 1.5  # longer in all than the stall timeout
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"hello")
    assert host.guard.counts.stalls == 1
    steady.close()


def test_at_the_cap_the_oldest_unfinished_head_makes_room(host):
    slow = [socket.create_connection(("127.0.0.1", host.port), timeout=30) for _ in range(10)]
    for s in slow:
        s.sendall(b"POST /echo HTTP/1.1\r\n")
    assert _poll(lambda: host.guard.counts.open == 10)
    time.sleep(2 * GRACE_S)  # from the same address, a connection this young is spared
    body = urllib.request.urlopen(
        urllib.request.Request(f"http://127.0.0.1:{host.port}/echo", data=b"hello"), timeout=30
    ).read()
    assert body == b"hello"
    counts = host.guard.counts
    assert counts.evicted >= 1 and counts.refused == 0 and counts.open <= 10
    assert _closed_by_server(slow[0], time.monotonic() + 30)  # the oldest went first
    for s in slow:
        s.close()


def test_at_the_cap_the_address_holding_the_most_gives_way(tmp_path):
    """An address flooding the listener loses its own connections, not another's, even its
    newest (which from its own address a new connection would spare)."""
    app = web.Application()
    app.router.add_post("/echo", _echo)
    server = ThreadedAioServer(
        "test-host",
        "127.0.0.1",
        0,
        threads=2,
        limits=ConnectionLimits(header_timeout=30.0, max_connections=10),
    )
    server.start(app, "the test host")
    try:
        bystander = socket.create_connection(
            ("127.0.0.1", server.port), timeout=30, source_address=("127.0.0.3", 0)
        )
        bystander.sendall(b"POST /echo HTTP/1.1\r\n")  # the oldest unfinished head, from elsewhere
        assert _poll(lambda: server.guard.counts.open == 1)
        flood = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(9)]
        for s in flood:
            s.sendall(b"POST /echo HTTP/1.1\r\n")
        assert _poll(lambda: server.guard.counts.open == 10)
        normal = http.client.HTTPConnection(
            "127.0.0.1", server.port, timeout=30, source_address=("127.0.0.2", 0)
        )
        normal.request("POST", "/echo", body=b"hello")
        assert normal.getresponse().read() == b"hello"
        normal.close()
        assert server.guard.counts.evicted == 1
        bystander.settimeout(0.3)
        with pytest.raises(TimeoutError):  # still open: the flood's oldest went instead
            bystander.recv(100)
        assert _closed_by_server(flood[0], time.monotonic() + 30)
        for s in [bystander, *flood]:
            s.close()
    finally:
        server.stop()


# A host alone in a child process whose open files limit is far below its connection cap: the
# process runs out of descriptors, and accept errors must be said once a minute, not per attempt.
_CHILD = textwrap.dedent(
    """
    import json, logging, resource, sys
    from aiohttp import web
    from audit.net.aio_host import ThreadedAioServer
    from audit.net.connections import ConnectionLimits

    logging.basicConfig(level=logging.INFO)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    async def ok(request):
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/ok", ok)
    server = ThreadedAioServer(
        "tiny", "127.0.0.1", 0, threads=1, limits=ConnectionLimits(header_timeout=2.0, max_connections=1000)
    )
    print(server.start(app, "the tiny host"), flush=True)
    sys.stdin.read()  # until the test closes it
    print(json.dumps(vars(server.guard.counts)), flush=True)
    server.stop()
    """
)


@pytest.mark.slow
def test_accept_errors_are_logged_once_per_interval(tmp_path):
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "w") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        port = int(child.stdout.readline())
        held = []
        for _ in range(150):  # the kernel queues what the process cannot accept
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"GET /ok HTTP/1.1\r\n")
            held.append(s)
        # the header timeout frees descriptors, the queue drains, and a normal request is answered
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/ok", timeout=60).read() == b"ok"
        deadline = time.monotonic() + 60
        assert all(_closed_by_server(s, deadline) for s in held)
        for s in held:
            s.close()
        child.stdin.close()
        counts = json.loads(child.stdout.readline())
        assert child.wait(30) == 0
    finally:
        if child.poll() is None:
            child.kill()
    assert counts["accept_errors"] >= 1  # the limit was really hit
    log = stderr_path.read_text()
    lines = [line for line in log.splitlines() if "cannot accept connections" in line]
    assert 1 <= len(lines) <= 2, log[-3000:]
    assert "Traceback" not in log and len(log.splitlines()) < 10, log[-3000:]
