"""serve's own audit: it audits the settled window and saves the run, which the read API (and
so the UI) then shows, while the server keeps ingesting."""

import subprocess
import sys
import time

import pytest

from audit.read.remote import RemoteReader
from audit.scenarios.output import read_truth
from audit.server.process import start_server, stop_server
from audit.store.reader import LocalReader
from tests.serve_helpers import wait_loaded

pytestmark = pytest.mark.slow  # a `ctxaudit serve` process


def _simulate(tmp_path, port: int, seed: int) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "audit",
            "simulate",
            "--scenario",
            "shop-small",
            "--seed",
            str(seed),
            "--otlp",
            f"grpc://127.0.0.1:{port}",
            "--truth",
            str(tmp_path / f"t{seed}.jsonl"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr


def _wait_for_a_run(remote: RemoteReader, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while not remote.audit_runs():
        assert time.monotonic() < deadline, f"no audit run after {timeout_s:.0f} s"
        time.sleep(0.5)


def test_serve_audits_the_settled_window_and_saves_the_run(tmp_path):
    db = str(tmp_path / "live.duckdb")
    # spans first, with no audit: the simulated traffic is in the past, so all of it is settled
    proc, port, _ = start_server(db, "--audit-every", "0")
    _simulate(tmp_path, port, 1)
    assert stop_server(proc) == 0
    proc, port, _ = start_server(db, "--audit-every", "1", "--audit-settle", "0")
    try:
        remote = RemoteReader(proc.api_url)
        _wait_for_a_run(remote)
        _simulate(tmp_path, port, 2)  # ingestion goes on beside the audits
        wait_loaded(remote)  # acknowledged, then loaded from the staging log
        run = remote.audit_run()
        assert {(e["caller"], e["callee"]) for e in run["edges"] if e["broken"]} >= {
            ("gateway", "recommendations")
        }
        assert run["sampling"]["edges"] and run["spans"] >= 774
        assert remote.findings(kind="orphan_root")["total"] > 0
        stored = remote.stats().spans
    finally:
        assert stop_server(proc) == 0
    reader = LocalReader(db)
    try:
        sent = sum(
            1 for seed in (1, 2) for t in read_truth(str(tmp_path / f"t{seed}.jsonl")) if t["exported"]
        )
        assert reader.stats().spans == stored == sent  # nothing lost while auditing
        runs = sorted(reader.audit_runs(), key=lambda r: r["run_id"])
        assert runs[0]["spans"] == 774  # the first run: every span of the first batch
        assert all(a["window_end_ns"] <= b["window_start_ns"] for a, b in zip(runs, runs[1:]))  # no overlap
    finally:
        reader.close()


def test_serve_audits_with_its_audit_config(tmp_path):
    """--audit-config: the periodic audits judge with the file's settings (here, an entry point)."""
    db = str(tmp_path / "live.duckdb")
    proc, port, _ = start_server(db, "--audit-every", "0")
    _simulate(tmp_path, port, 1)
    assert stop_server(proc) == 0
    config = tmp_path / "audit.yaml"
    config.write_text("entrypoints: [recommendations]\nsettle_s: 3600\n")
    # --audit-settle overrides the file's settle_s (3600 s would leave nothing settled)
    proc, port, _ = start_server(
        db, "--audit-every", "1", "--audit-settle", "0", "--audit-config", str(config)
    )
    try:
        remote = RemoteReader(proc.api_url)
        _wait_for_a_run(remote)
        run = remote.audit_run()
        assert any(e.startswith("recommendations:") for e in run["entrypoints"])
        orphans = remote.findings(kind="orphan_root")
        assert orphans["total"] > 0  # the other broken hops are still found
        assert remote.findings(kind="orphan_root", service="recommendations")["total"] == 0
    finally:
        assert stop_server(proc) == 0


def test_serve_refuses_a_bad_audit_config(tmp_path):
    config = tmp_path / "audit.yaml"
    config.write_text("min_confidence: 3\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "audit",
            "serve",
            "--db",
            str(tmp_path / "x.duckdb"),
            "--audit-config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "--audit-config" in r.stderr and "min_confidence" in r.stderr, r.stderr
    assert not (tmp_path / "x.duckdb").exists()
