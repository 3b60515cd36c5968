"""The command line as a user meets it: help, stats output, and the docs that describe it."""

import json
import re
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from audit.cli import main
from tests.otlp_builders import request, span

DOCS = Path(__file__).parent.parent / "docs"


def store_with_spans(make_server, rng) -> str:
    import grpc

    server = make_server()
    tid = rng.randbytes(16)
    reqs = [
        request(
            [
                span(tid, rng.randbytes(8), start=100, end=200),
                span(tid, rng.randbytes(8), start=300, end=250),
            ],
            service="orders",
        ),
        request([span(rng.randbytes(16), rng.randbytes(8), start=150, end=400)], service="payments"),
    ]
    with grpc.insecure_channel(server.grpc_target) as channel:
        export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
        for r in reqs:
            export(r.SerializeToString(), timeout=10)
    server.stop()
    return server.db


def test_stats_json(make_server, rng):
    db = store_with_spans(make_server, rng)
    result = CliRunner().invoke(main, ["stats", "--db", db, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert (doc["spans"], doc["traces"], doc["services"], doc["links"]) == (3, 2, 2, 0)
    assert (doc["first_span_start_ns"], doc["last_span_end_ns"], doc["end_before_start"]) == (100, 400, 1)
    assert doc["by_service"] == [
        {"service": "orders", "spans": 2, "traces": 1},
        {"service": "payments", "spans": 1, "traces": 1},
    ]


def test_stats_text(make_server, rng):
    db = store_with_spans(make_server, rng)
    out = CliRunner().invoke(main, ["stats", "--db", db]).output
    assert re.search(r"^spans\s+3$", out, re.M) and re.search(r"^services\s+2$", out, re.M)
    assert "1 span(s) end before they start" in out
    assert re.search(r"orders\s+2 spans\s+1 traces", out)


def test_stats_on_a_duckdb_file_that_is_not_a_store(tmp_path):
    import duckdb

    db = str(tmp_path / "other.duckdb")
    duckdb.connect(db).execute("CREATE TABLE x(a INT)").close()
    result = CliRunner().invoke(main, ["stats", "--db", db])
    assert result.exit_code == 1 and "not a ctxaudit store" in result.output


def commands():
    return {name: cmd for name, cmd in main.commands.items()}


@pytest.mark.parametrize("name", sorted(commands()))
def test_every_command_and_option_is_documented(name):
    """docs/cli.md is the reference: a command or option missing there fails this test."""
    doc = (DOCS / "cli.md").read_text()
    section = doc.split(f"## `ctxaudit {name}`", 1)
    assert len(section) == 2, f"docs/cli.md has no section for `ctxaudit {name}`"
    body = section[1].split("\n## ", 1)[0]
    for param in commands()[name].params:
        if isinstance(param, click.Option):
            assert any(f"`{opt}" in body for opt in param.opts), f"{name} {param.opts[0]} is not documented"


@pytest.mark.parametrize("name", sorted(commands()))
def test_every_command_has_help(name):
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output
    assert commands()[name].help


def test_otel_config_tees_traces_to_the_backend_and_ctxaudit():
    config = yaml.safe_load((Path(__file__).parent.parent / "otel-config.yaml").read_text())
    pipeline = config["service"]["pipelines"]["traces"]
    assert "otlp" in pipeline["receivers"]
    assert "otlp/ctxaudit" in pipeline["exporters"] and len(pipeline["exporters"]) == 2
    ctxaudit = config["exporters"]["otlp/ctxaudit"]
    assert ctxaudit["sending_queue"]["enabled"] and ctxaudit["retry_on_failure"]["enabled"]
    for name in pipeline["exporters"] + pipeline["processors"] + pipeline["receivers"]:
        assert name in config["exporters"] | config["processors"] | config["receivers"]
