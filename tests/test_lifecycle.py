"""The server as users run it: a real `ctxaudit serve` process, stopped politely or killed."""

import os
import signal
import socket
import subprocess
import sys
import threading

import grpc
import psutil
import pytest

from audit.server.process import start_server, stop_server
from audit.store.reader import LocalReader
from tests.otlp_builders import request, spans

pytestmark = pytest.mark.slow  # every test starts `ctxaudit` processes

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def ctxaudit(*args, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "audit", *args], capture_output=True, text=True, timeout=timeout
    )


class Sender:
    """Threads exporting distinct traces until told to stop or the server goes away; records acks."""

    def __init__(self, target: str, rng, threads: int = 4, spans_per_request: int = 50):
        self.target, self.rng, self.n = target, rng, spans_per_request
        self.acked: set[int] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]
        self.first_ack = threading.Event()

    def _run(self):
        with grpc.insecure_channel(self.target) as channel:
            export = channel.unary_unary(EXPORT)
            while not self.stop.is_set():
                with self.lock:
                    tid = self.rng.randbytes(16)
                try:
                    export(request(spans(self.n, self.rng, tid)).SerializeToString(), timeout=30)
                except grpc.RpcError:
                    return  # server stopping or gone: whatever was not acknowledged may be lost
                with self.lock:
                    self.acked.add(int.from_bytes(tid, "big"))
                self.first_ack.set()

    def __enter__(self):
        for t in self.threads:
            t.start()
        assert self.first_ack.wait(30)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(60)


def stored_traces(db: str) -> dict[int, int]:
    reader = LocalReader(db)
    rows = reader._query("SELECT trace_id::VARCHAR, count(*) FROM spans GROUP BY 1")
    reader.close()
    return {int(t): n for t, n in rows}


def test_sigterm_drains_commits_and_exits_zero(tmp_path, rng):
    db = str(tmp_path / "s.duckdb")
    proc, grpc_port, _ = start_server(db)
    with Sender(f"127.0.0.1:{grpc_port}", rng) as sender:
        while len(sender.acked) < 20:
            sender.first_ack.wait(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    stored = stored_traces(db)
    assert sender.acked, "nothing was acknowledged"
    assert all(stored.get(t) == 50 for t in sender.acked), "an acknowledged trace is missing or partial"


def test_kill_9_loses_nothing_acknowledged(tmp_path, rng):
    db = str(tmp_path / "k.duckdb")
    acked_total: set[int] = set()
    for _round in range(3):  # restart on the same file each time: it must always reopen
        proc, grpc_port, _ = start_server(db)
        with Sender(f"127.0.0.1:{grpc_port}", rng) as sender:
            while len(sender.acked) < 10:
                sender.first_ack.wait(0.05)
            workers = psutil.Process(proc.pid).children()
            assert workers, "serve runs decode workers by default"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
        acked_total |= sender.acked
        # its decode workers, orphaned, notice and exit instead of lingering
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"{len(alive)} decode worker(s) outlived the killed server"
        # what was acknowledged is in the staging log, if not in the store yet: the next start
        # loads it (and a stop loads everything before it exits)
        proc, _, _ = start_server(db, "--audit-every", "0")
        assert stop_server(proc) == 0
        stored = stored_traces(db)
        missing = [t for t in acked_total if stored.get(t) != 50]
        assert not missing, f"{len(missing)} acknowledged traces lost (or stored twice) after kill -9"


def test_locked_file_gets_a_clear_error(tmp_path):
    db = str(tmp_path / "locked.duckdb")
    proc, _, _ = start_server(db)
    try:
        for args in (
            ["stats", "--db", db],
            ["serve", "--db", db, "--grpc", "127.0.0.1:0", "--http", "off", "--api", "off"],
        ):
            r = ctxaudit(*args)
            assert r.returncode == 1, r
            assert db in r.stderr and "locked" in r.stderr
            assert "Traceback" not in r.stderr
    finally:
        assert stop_server(proc) == 0


@pytest.mark.parametrize("command", ["stats", "serve"])
def test_corrupt_file_gets_a_clear_error(tmp_path, command):
    db = tmp_path / "corrupt.duckdb"
    db.write_bytes(b"this is not a database" * 1000)
    serve_args = ["--grpc", "127.0.0.1:0", "--http", "off", "--api", "off"]
    r = ctxaudit(command, "--db", str(db), *(serve_args if command == "serve" else []))
    assert r.returncode == 1
    assert "not a readable ctxaudit/DuckDB database" in r.stderr and "Traceback" not in r.stderr
    assert db.read_bytes() == b"this is not a database" * 1000  # untouched


def test_missing_file_for_stats(tmp_path):
    r = ctxaudit("stats", "--db", str(tmp_path / "nope.duckdb"))
    assert r.returncode == 1 and "does not exist" in r.stderr


def test_port_in_use_gets_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        for flag, others in (
            ("--grpc", ("--http", "off")),
            ("--http", ("--grpc", "off")),
            ("--api", ("--grpc", "127.0.0.1:0", "--http", "off")),
        ):
            r = ctxaudit("serve", "--db", str(tmp_path / "p.duckdb"), flag, f"127.0.0.1:{port}", *others)
            assert r.returncode == 1, r
            assert f"127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["serve", "--grpc", "nohost"], "is not HOST:PORT"),
        (["serve", "--http", "127.0.0.1:99999"], "out of range"),
        (["serve", "--grpc", "off", "--http", "off"], "both receivers are off"),
        (["serve", "--queue-spans", "0"], "--queue-spans"),
        (["serve", "--api", "0.0.0.0:4319"], "loopback only"),
        (["stats", "--bogus"], "No such option"),
    ],
)
def test_bad_arguments_are_usage_errors(tmp_path, args, message):
    r = ctxaudit(*args, "--db", str(tmp_path / "x.duckdb")) if args[0] == "serve" else ctxaudit(*args)
    assert r.returncode == 2 and message in r.stderr
