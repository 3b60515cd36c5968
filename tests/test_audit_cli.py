"""`ctxaudit audit` and `ctxaudit graph` as a user runs them: saved runs, windows that resume,
the exports, and clear errors."""

import json
from datetime import UTC, datetime

import duckdb
import networkx as nx
import pydot
import pytest
from click.testing import CliRunner

from audit.cli import main
from audit.store.reader import LocalReader
from tests.audit_helpers import simulated_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    db, _ = simulated_store(tmp_path_factory.mktemp("cli"))
    return db


def run(*args):
    return CliRunner().invoke(main, list(args))


def iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, tz=UTC).isoformat()


def copy(store, tmp_path) -> str:
    db = str(tmp_path / "copy.duckdb")
    with open(store, "rb") as src, open(db, "wb") as dst:
        dst.write(src.read())
    return db


def test_audit_prints_a_summary_and_saves_the_run(store, tmp_path):
    db = copy(store, tmp_path)
    result = run("audit", "--db", db)
    assert result.exit_code == 0, result.output
    assert "audit run 1:" in result.output and "broken edges:" in result.output
    assert "gateway -> recommendations (http)" in result.output
    assert (
        "fragments per request" in result.output
        and "edges whose callee side is not always stored" in result.output
    )
    con = duckdb.connect(db, read_only=True)
    (runs,) = con.execute("SELECT count(*) FROM audit_runs").fetchone()
    findings = dict(con.execute("SELECT kind, count(*) FROM audit_findings GROUP BY kind").fetchall())
    (edges,) = con.execute("SELECT count(*) FROM audit_edges WHERE run_id = 1").fetchone()
    con.close()
    assert runs == 1 and findings["orphan_root"] > 0 and findings["in_process_break"] > 0 and edges > 5
    again = run("audit", "--db", db)
    assert again.exit_code == 0 and "nothing new to audit" in again.output


def test_json_document_streams_and_matches_the_saved_run(store, tmp_path):
    db = copy(store, tmp_path)
    result = run("audit", "--db", db, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["schema_version"] == 1 and doc["run"]["id"] == 1
    con = duckdb.connect(db, read_only=True)
    (saved,) = con.execute("SELECT count(*) FROM audit_findings").fetchone()
    con.close()
    assert len(doc["findings"]) == saved == sum(doc["run"]["counts"].values())
    assert set(doc["sampling"]) == {"services", "edges", "overall"}
    edge = next(
        e for e in doc["sampling"]["edges"] if (e["caller"], e["callee"]) == ("gateway", "recommendations")
    )
    assert set(edge["propagation_rate"]) == {"value", "ci_low", "ci_high", "n"}


def test_a_resumed_run_reads_only_the_new_window_and_together_they_find_the_same(store, tmp_path):
    db = copy(store, tmp_path)
    whole = json.loads(run("audit", "--db", db, "--json", "--no-save").stdout)
    middle = (whole["run"]["window_start"] + whole["run"]["window_end"]) // 2
    first = json.loads(run("audit", "--db", db, "--json", "--until", iso(middle)).stdout)
    second = json.loads(run("audit", "--db", db, "--json").stdout)
    assert first["run"]["window_end"] == second["run"]["window_start"]
    assert second["run"]["window_end"] == whole["run"]["window_end"]
    assert first["run"]["spans"] + second["run"]["spans"] == whole["run"]["spans"]

    def orphans(doc):
        return {f["span_id"] for f in doc["findings"] if f["kind"] == "orphan_root"}

    assert orphans(first) | orphans(second) == orphans(whole)
    assert not orphans(first) & orphans(second)


def test_settle_holds_back_spans_that_may_still_have_company_coming(tmp_path, store):
    db = copy(store, tmp_path)
    con = duckdb.connect(db)
    con.execute(
        "UPDATE spans SET start_ns = start_ns + (epoch_ns(now()) - 1764115200000000000), "
        "end_ns = end_ns + (epoch_ns(now()) - 1764115200000000000)"
    )  # as if they arrived just now
    con.close()
    result = run("audit", "--db", db)
    assert result.exit_code == 0 and "nothing new to audit" in result.output
    assert "--settle" in result.output
    assert run("audit", "--db", db, "--settle", "0").exit_code == 0


@pytest.mark.parametrize("fmt", ["json", "dot", "graphml"])
def test_graph_exports_parse_back(store, tmp_path, fmt):
    db = copy(store, tmp_path)
    assert run("audit", "--db", db).exit_code == 0
    for view in ("repaired", "observed"):
        result = run("graph", "--db", db, "--format", fmt, "--view", view)
        assert result.exit_code == 0, result.output
        if fmt == "json":
            g = nx.node_link_graph(json.loads(result.output), edges="edges")
        elif fmt == "graphml":
            g = nx.parse_graphml(result.output)
        else:
            g = nx.DiGraph(nx.nx_pydot.from_pydot(pydot.graph_from_dot_data(result.output)[0]))
        names = {str(n).strip('"') for n in g.nodes}
        assert {"gateway", "recommendations", "payments", "(entry)"} <= names
        edges = {(str(a).strip('"'), str(b).strip('"')) for a, b in g.edges}
        # a trace backend shows users calling recommendations; the repaired graph shows the gateway
        assert (("(entry)", "recommendations") in edges) == (view == "observed")
        assert ("gateway", "recommendations") in edges


def test_graph_without_a_run_says_what_to_do(store, tmp_path):
    db = copy(store, tmp_path)
    result = run("graph", "--db", db)
    assert result.exit_code == 1 and "ctxaudit audit --db" in result.output


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--since", "yesterday"], 2, "ISO 8601"),
        (["--min-confidence", "2"], 2, "--min-confidence"),
        (["--assume-probability", "0"], 2, "--assume-probability"),
        (["--entrypoints", "gateway", "--config", "/nonexistent.yaml"], 2, "cannot read"),
    ],
)
def test_bad_arguments_are_usage_errors(store, tmp_path, args, code, message):
    result = run("audit", "--db", copy(store, tmp_path), *args)
    assert result.exit_code == code and message in result.output


def test_config_file_sets_entry_points(store, tmp_path):
    db = copy(store, tmp_path)
    config = tmp_path / "audit.yaml"
    config.write_text("entrypoints: [recommendations]\nmin_confidence: 0.9\n")
    doc = json.loads(run("audit", "--db", db, "--json", "--config", str(config)).stdout)
    assert "recommendations" not in {f["service"] for f in doc["findings"] if f["kind"] == "orphan_root"}
    assert all(f["probable_parent"]["confidence"] >= 0.9 for f in doc["findings"] if f["probable_parent"])
    config.write_text("assume_sampling_probability: 1.5\n")
    bad = run("audit", "--db", db, "--config", str(config))
    assert bad.exit_code == 2 and "assume_sampling_probability" in bad.output
    config.write_text("entrypionts: [x]\n")
    bad = run("audit", "--db", db, "--config", str(config))
    assert bad.exit_code == 2 and "entrypionts" in bad.output


def test_missing_and_corrupt_files_get_a_clear_error(tmp_path):
    result = run("audit", "--db", str(tmp_path / "nope.duckdb"))
    assert result.exit_code == 1 and "does not exist" in result.output
    junk = tmp_path / "junk.duckdb"
    junk.write_bytes(b"not a database" * 100)
    result = run("audit", "--db", str(junk))
    assert result.exit_code == 1 and "error" in result.output and "Traceback" not in result.output


def test_saved_run_keeps_its_sampling_figures(store, tmp_path):
    db = copy(store, tmp_path)
    doc = json.loads(run("audit", "--db", db, "--json").stdout)
    reader = LocalReader(db)
    try:
        saved = reader.audit_run()
    finally:
        reader.close()
    assert saved["sampling"] == doc["sampling"]
