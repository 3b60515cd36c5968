"""otel-config.yaml, the Collector config that tees traces to the backend and to ctxaudit: its
pipeline wiring, and its ctxaudit exporter's settings accepted by a real `ctxaudit serve` (the
OTel SDK's OTLP exporter, configured as the Collector's would be, delivers to it)."""

import socket
from pathlib import Path

import pytest
import yaml
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import Compression, OTLPSpanExporter

from audit.server.process import start_server, stop_server
from audit.store.reader import LocalReader
from tests.test_roundtrip_sdk import emit

CONFIG = Path(__file__).parent.parent / "otel-config.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def _defined(config: dict, kind: str, name: str) -> bool:
    return name in (config.get(kind) or {})


def test_every_component_in_the_pipeline_is_defined(config):
    pipelines = config["service"]["pipelines"]
    assert set(pipelines) == {"traces"}
    traces = pipelines["traces"]
    for kind in ("receivers", "processors", "exporters"):
        for name in traces[kind]:
            assert _defined(config, kind, name), f"{kind} {name} is used but not defined"
        assert set(config[kind]) == set(traces[kind]), f"{kind} defined but unused"


def test_the_pipeline_tees_to_the_backend_and_ctxaudit(config):
    traces = config["service"]["pipelines"]["traces"]
    assert traces["receivers"] == ["otlp"]
    assert traces["processors"][0] == "memory_limiter"  # first: refuse before running out of memory
    assert "batch" in traces["processors"]
    assert traces["processors"].index("batch") > traces["processors"].index("memory_limiter")
    assert sorted(traces["exporters"]) == ["otlp/backend", "otlp/ctxaudit"]
    limiter = config["processors"]["memory_limiter"]
    assert limiter["check_interval"] and (limiter.get("limit_mib") or limiter.get("limit_percentage"))


def test_ctxaudit_is_decoupled_from_the_backend(config):
    for name in ("otlp/backend", "otlp/ctxaudit"):
        exporter = config["exporters"][name]
        assert exporter["sending_queue"]["enabled"] is True, name  # each exporter drains its own queue
        assert exporter["sending_queue"].get("blocking", False) is False, name  # never blocks the pipeline
        assert exporter["retry_on_failure"]["enabled"] is True, name
    ctx = config["exporters"]["otlp/ctxaudit"]
    assert ctx["sending_queue"]["queue_size"] >= 1000
    assert ctx["retry_on_failure"]["max_elapsed_time"].endswith("s")  # gives up: never retries forever
    assert ctx["endpoint"].startswith("127.0.0.1:")


@pytest.mark.slow
def test_the_ctxaudit_exporter_settings_reach_a_real_server(config, tmp_path):
    """The endpoint, gzip compression and plaintext of otlp/ctxaudit, as the Collector's exporter
    would use them, against `ctxaudit serve --grpc <that endpoint>`."""
    ctx = config["exporters"]["otlp/ctxaudit"]
    host, port = ctx["endpoint"].rsplit(":", 1)
    with socket.socket() as s:
        if s.connect_ex((host, int(port))) == 0:
            pytest.skip(f"{ctx['endpoint']} is taken on this machine")
    db = str(tmp_path / "tee.duckdb")
    proc, grpc_port, _ = start_server(db, "--grpc", ctx["endpoint"], "--audit-every", "0")
    try:
        assert grpc_port == int(port)
        exporter = OTLPSpanExporter(
            endpoint=ctx["endpoint"],
            insecure=ctx["tls"]["insecure"],
            compression=Compression.Gzip if ctx["compression"] == "gzip" else None,
        )
        trace_id, _, _ = emit(exporter, "tee-test")
    finally:
        assert stop_server(proc) == 0
    reader = LocalReader(db)
    try:
        assert {r["service_name"] for r in reader.trace(trace_id)} == {"tee-test"}
    finally:
        reader.close()
