"""The Parquet export and the audit on Spark: the same answers as `ctxaudit audit --db`, on one
store and on the same spans split over three shards by trace id (as the Collector's
loadbalancing exporter splits them); bad exports named by path, never audited in part."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow.dataset as ds
import pytest
from click.testing import CliRunner

from audit.cli import main
from audit.engine import AuditWindow, run_audit
from audit.settings import AuditSettings
from audit.store.migrations import apply_migrations
from audit.store.parquet import ExportError, check_export, export_store, memory_store
from tests.audit_helpers import simulated_store

SHARDS = 3


def _split(db: str, out_dir: Path) -> list[str]:
    """The store's spans in three stores by trace id; a link goes with the span that carries it."""
    paths = []
    for i in range(SHARDS):
        path = str(out_dir / f"shard{i}.duckdb")
        con = duckdb.connect(path)
        apply_migrations(con)
        con.execute(f"ATTACH '{db}' AS src (READ_ONLY)")
        con.execute(f"INSERT INTO spans SELECT * FROM src.spans WHERE hash(trace_id) % {SHARDS} = {i}")
        con.execute(
            f"INSERT INTO span_links SELECT * FROM src.span_links WHERE hash(trace_id) % {SHARDS} = {i}"
        )
        con.execute("INSERT INTO span_resources SELECT * FROM src.span_resources")
        con.execute("INSERT INTO span_scopes SELECT * FROM src.span_scopes")
        con.close()
        paths.append(path)
    return paths


def _db_document(db: str, *extra: str) -> dict:
    result = CliRunner().invoke(
        main, ["audit", "--db", db, "--all", "--settle", "0", "--no-save", "--json", *extra]
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _finding_keys(doc: dict) -> list[tuple]:
    return sorted(
        (
            f["kind"],
            f["trace_id"],
            f["span_id"],
            (f["probable_parent"] or {}).get("trace_id"),
            (f["probable_parent"] or {}).get("span_id"),
        )
        for f in doc["findings"]
    )


def _estimates(sampling):
    """The sampling figures' point estimates (and sample sizes), without the intervals."""
    if isinstance(sampling, dict):
        if "value" in sampling:
            return {k: _estimates(v) for k, v in sampling.items() if k not in ("ci_low", "ci_high")}
        return {k: _estimates(v) for k, v in sampling.items()}
    if isinstance(sampling, list):
        return [_estimates(v) for v in sampling]
    return sampling


def _assert_same(spark_doc: dict, db_doc: dict) -> None:
    assert spark_doc["run"]["counts"] == db_doc["run"]["counts"]
    assert _finding_keys(spark_doc) == _finding_keys(db_doc)
    assert spark_doc["edges"] == db_doc["edges"]  # calls, propagated, dropped, stitched, cause
    assert _estimates(spark_doc["sampling"]) == _estimates(db_doc["sampling"])
    assert spark_doc["run"]["entrypoints"] == db_doc["run"]["entrypoints"]
    assert spark_doc["run"]["roots"] == db_doc["run"]["roots"]
    assert spark_doc["run"]["spans"] == db_doc["run"]["spans"]


# --- the export (no Spark) ---


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    db, _ = simulated_store(tmp_path_factory.mktemp("spark"))
    return db


def test_export_round_trip_gives_the_same_audit(store, tmp_path):
    export_store(store, str(tmp_path / "pq"), shard="a")
    spans = ds.dataset(tmp_path / "pq" / "spans", partitioning="hive").to_table()
    links = ds.dataset(tmp_path / "pq" / "links", partitioning="hive").to_table()
    assert (
        spans.num_rows
        == duckdb.connect(store, read_only=True).execute("SELECT count(*) FROM spans").fetchone()[0]
    )
    con = memory_store(spans, links)
    lo, hi = con.execute("SELECT min(start_ns), max(start_ns) + 1 FROM spans").fetchone()
    back = run_audit(con, AuditWindow(lo, hi))
    original = _db_document(store)
    keys = _finding_keys({"findings": list(back.iter_findings())})
    assert keys == _finding_keys(original) and keys
    assert [e.to_dict() for e in back.edges] == original["edges"]


def test_re_export_replaces_the_hours(store, tmp_path):
    out = tmp_path / "pq"
    first = export_store(store, str(out), shard="a")
    files = sorted(out.rglob("*.parquet"))
    again = export_store(store, str(out), shard="a")
    assert len(sorted(out.rglob("*.parquet"))) == len(files)  # replaced, not added
    assert sorted(out.rglob("*.parquet")) != files
    assert first["last_export"]["spans"] == again["last_export"]["spans"] > 0
    assert not [p for p in out.iterdir() if p.name.startswith(".export-")]
    check_export(out, again["last_export"]["from_ns"], again["last_export"]["until_ns"])


def _exported(store, tmp_path) -> tuple[Path, dict]:
    out = tmp_path / "pq"
    return out, export_store(store, str(out), shard="a")


def test_a_missing_file_is_named(store, tmp_path):
    out, m = _exported(store, tmp_path)
    victim = next((out / "spans").rglob("*.parquet"))
    victim.unlink()
    with pytest.raises(ExportError, match=str(victim)):
        check_export(out, m["last_export"]["from_ns"], m["last_export"]["until_ns"])


def test_a_cut_file_is_named(store, tmp_path):
    out, m = _exported(store, tmp_path)
    victim = next((out / "links").rglob("*.parquet"))
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(ExportError, match=str(victim)):
        check_export(out, m["last_export"]["from_ns"], m["last_export"]["until_ns"])


def test_an_hour_never_exported_is_named(store, tmp_path):
    out, m = _exported(store, tmp_path)
    later = m["last_export"]["until_ns"] + 3_600_000_000_000
    with pytest.raises(ExportError, match="never exported hour"):
        check_export(out, m["last_export"]["from_ns"], later)


def test_an_older_format_is_named(store, tmp_path):
    out, m = _exported(store, tmp_path)
    manifest = out / "_shards" / "a.json"
    old = json.loads(manifest.read_text())
    old["version"] = 0
    manifest.write_text(json.dumps(old))
    with pytest.raises(ExportError, match=str(manifest)):
        check_export(out, m["last_export"]["from_ns"], m["last_export"]["until_ns"])


def test_foreign_parquet_is_named(tmp_path):
    foreign = tmp_path / "foreign" / "spans" / "date=2024-01-01"
    foreign.mkdir(parents=True)
    duckdb.sql(f"COPY (SELECT 1 AS x) TO '{foreign / 'a.parquet'}' (FORMAT parquet)")
    result = CliRunner().invoke(
        main, ["audit", "--spark", "local[1]", "--parquet", str(tmp_path / "foreign")]
    )
    assert result.exit_code == 1
    assert (
        str(tmp_path / "foreign") in result.output and "Parquet without ctxaudit manifests" in result.output
    )
    assert '"findings"' not in result.output


def test_foreign_files_under_a_shard_are_named(store, tmp_path):
    out, m = _exported(store, tmp_path)
    hour = next((out / "spans").rglob("*.parquet")).parent
    duckdb.sql(f"COPY (SELECT 1 AS x) TO '{hour / 'stray.parquet'}' (FORMAT parquet)")
    manifest = json.loads((out / "_shards" / "a.json").read_text())
    key = next(iter(manifest["hours"]))
    manifest["hours"][key]["spans_files"]["stray.parquet"] = 1
    (out / "_shards" / "a.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="stray.parquet: not written by `ctxaudit export`"):
        check_export(out, m["last_export"]["from_ns"], m["last_export"]["until_ns"])


def test_a_file_the_manifest_does_not_list_is_named(store, tmp_path):
    """Spark reads every file of an hour's folder: one the manifest does not list would be
    audited too, so it stops the audit."""
    out, m = _exported(store, tmp_path)
    listed = next((out / "spans").rglob("*.parquet"))
    extra = listed.parent / "part-extra.parquet"
    extra.write_bytes(listed.read_bytes())
    with pytest.raises(ExportError, match=f"{extra}: .*not in the manifest"):
        check_export(out, m["last_export"]["from_ns"], m["last_export"]["until_ns"])


def test_parquet_rewritten_by_another_writer_is_named(store, tmp_path):
    """Same columns and rows, but not written by `ctxaudit export` (no format tag)."""
    import pyarrow.parquet as pq

    out, m = _exported(store, tmp_path)
    victim = next((out / "spans").rglob("*.parquet"))
    pq.write_table(pq.read_table(victim).replace_schema_metadata(None), victim)
    with pytest.raises(ExportError, match=f"{victim}: not written by `ctxaudit export`"):
        check_export(out, m["last_export"]["from_ns"], m["last_export"]["until_ns"])


def test_a_shard_whose_column_types_differ_is_named(store, tmp_path):
    """A shard exported by another store version: the same column names, another type."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "pq"
    for i, path in enumerate(_split(store, tmp_path)):
        export_store(path, str(out), shard=f"s{i}")
    victim = next((out / "spans" / "shard=s2").rglob("*.parquet"))
    table = pq.read_table(victim)
    older = table.set_column(
        table.schema.get_field_index("start_ns"), "start_ns", table.column("start_ns").cast(pa.string())
    )
    pq.write_table(older.replace_schema_metadata({"format": "ctxaudit-parquet/1"}), victim)
    m = json.loads((out / "_shards" / "s2.json").read_text())
    with pytest.raises(ExportError, match=f"{victim}: column types differ .*start_ns: string vs int64"):
        check_export(out, m["last_export"]["from_ns"], m["last_export"]["until_ns"])


@pytest.mark.parametrize("damage", ["missing hour", "older store schema", "cut file"])
def test_a_bad_export_prints_no_document_and_saves_no_run(store, tmp_path, damage):
    """Checked before Spark starts: exit 1 naming the path, nothing on stdout, no run saved."""
    out, m = _exported(store, tmp_path)
    args = ["audit", "--spark", "local[1]", "--parquet", str(out), "--json", "--save-db"]
    runs = str(tmp_path / "runs.duckdb")
    if damage == "missing hour":
        named = str(out / "spans" / "shard=a")
        later = datetime.fromtimestamp(m["last_export"]["until_ns"] / 1e9 + 1800, tz=UTC).isoformat()
        args += [runs, "--until", later]
    elif damage == "older store schema":
        named = str(out / "_shards" / "a.json")
        old = json.loads(Path(named).read_text())
        old["store_schema"] = "0000_spans"
        Path(named).write_text(json.dumps(old))
        args += [runs]
    else:
        victim = next((out / "spans").rglob("*.parquet"))
        victim.write_bytes(victim.read_bytes()[:100])
        named = str(victim)
        args += [runs]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert named in result.stderr and result.stdout == ""
    from audit.store.reader import LocalReader

    reader = LocalReader(runs)
    try:
        assert reader.audit_run() is None
    finally:
        reader.close()


# --- on Spark (local mode) ---


@pytest.fixture(scope="module")
def spark():
    pytest.importorskip("pyspark")
    from audit.spark_audit import spark_session

    session = spark_session("local[2]", {"spark.sql.shuffle.partitions": "4"})
    yield session
    session.stop()


def _spark_document(spark, parquet: Path, **options) -> dict:
    from audit.spark_audit import spark_audit

    result = spark_audit("local[2]", str(parquet), AuditSettings(), session=spark, **options)
    return json.loads("".join(result.document_chunks()))


@pytest.mark.slow
def test_spark_gives_the_single_process_answers(store, tmp_path, spark):
    export_store(store, str(tmp_path / "one"), shard="all")
    db_doc = _db_document(store)
    spark_doc = _spark_document(spark, tmp_path / "one")
    assert db_doc["findings"] and any(e["stitched"] for e in db_doc["edges"])
    _assert_same(spark_doc, db_doc)


@pytest.mark.slow
def test_spark_over_three_shards_gives_the_single_process_answers(store, tmp_path, spark):
    out = tmp_path / "three"
    for i, path in enumerate(_split(store, tmp_path)):
        export_store(path, str(out), shard=f"s{i}")
    shard_spans = [len(list((out / "spans" / f"shard=s{i}").rglob("*.parquet"))) for i in range(SHARDS)]
    assert all(shard_spans)
    db_doc = _db_document(store)
    spark_doc = _spark_document(spark, out)
    # stitched parents mostly sit in another shard than their orphan: the global step is needed
    parents = [f for f in db_doc["findings"] if f["probable_parent"]]
    assert parents
    _assert_same(spark_doc, db_doc)


@pytest.mark.slow
def test_spark_slices_are_the_single_process_windows(store, tmp_path, spark):
    """Several slices: each slice's findings and edges are what `audit --db --since --until`
    finds in that window (the engine with its context margin, as serve's periodic audits run)."""
    export_store(store, str(tmp_path / "pq"), shard="all")
    con = duckdb.connect(store, read_only=True)
    lo, hi = con.execute("SELECT min(start_ns), max(start_ns) + 1 FROM spans").fetchone()
    con.close()
    slice_s = (hi - lo) / 3 / 1e9 + 0.001
    spark_doc = _spark_document(spark, tmp_path / "pq", slice_s=slice_s)
    from audit.spark_audit import slices

    keys, edges, stats, services = [], {}, [], {}
    con = duckdb.connect(store, read_only=True)
    for window in slices(AuditWindow(lo, hi, int(AuditSettings().context_s * 1e9)), int(slice_s * 1e9)):
        result = run_audit(con, window, AuditSettings().config)  # what `audit --db --since --until` runs
        keys += _finding_keys({"findings": list(result.iter_findings())})
        stats.append(result.sampling_stats)
        for s in result.sampling["services"]:
            acc = services.setdefault(s["service"], [0, 0])
            acc[0], acc[1] = acc[0] + s["orphan_roots"], acc[1] + s["roots"]
        for e in result.edges:
            acc = edges.setdefault((e.caller, e.callee, e.protocol, e.system), [0, 0, 0])
            acc[0], acc[1], acc[2] = acc[0] + e.calls, acc[1] + e.propagated, acc[2] + e.stitched
    con.close()
    assert _finding_keys(spark_doc) == sorted(keys)
    # sampling: every figure from the three windows' pooled sufficient statistics
    from audit.engine.sampling_merge import merge_sampling, strip

    assert _estimates(spark_doc["sampling"]) == _estimates(strip(merge_sampling(stats)))
    assert spark_doc["sampling"]["overall"]["spans"] == spark_doc["run"]["spans"]
    for s in spark_doc["sampling"]["services"]:  # e.g. root inflation: orphan roots over roots, pooled
        orphans, roots = services[s["service"]]
        assert s["root_inflation"]["value"] == (round(orphans / roots, 6) if roots else None)
    assert any(s["root_inflation"]["value"] for s in spark_doc["sampling"]["services"])
    got = {
        (e["caller"], e["callee"], e["protocol"], e["system"]): [e["calls"], e["propagated"], e["stitched"]]
        for e in spark_doc["edges"]
    }
    assert got == edges


def test_make_demo_needs_no_java():
    """The Spark audit is optional: the CLI, the store and the demo import no pyspark."""
    code = "import sys, audit.cli, audit.demo, audit.store.parquet; print('pyspark' in sys.modules)"
    out = os.popen(f'{Path(__file__).parents[1] / ".venv/bin/python"} -c "{code}"').read().strip()
    assert out == "False"


# --- a run saved in a store (`audit --spark --save-db`), read back as `report` and the explorer read it ---


def _saved(db: str, run_id: int) -> dict:
    """What the explorer and `report --run` read of a saved run, minus when and how long it ran."""
    from audit.audit_job import saved_result
    from audit.store.reader import LocalReader

    reader = LocalReader(db)
    try:
        run = reader.audit_run(run_id)
        findings = reader.findings(run_id, limit=1_000_000)
        counts = reader.finding_counts(run_id)
    finally:
        reader.close()
    for key in ("run_id", "finished_at", "seconds", "settings"):
        run.pop(key)
    confidences = []  # they may differ in the fourth decimal (docs/scale.md): compared apart
    for f in findings["findings"]:
        if f.get("probable_parent"):
            confidences.append(f["probable_parent"].pop("confidence"))
    doc = json.loads("".join(saved_result(db, run_id).document_chunks()))
    return {
        "run": run,
        "findings": findings["findings"],
        "total": findings["total"],
        "counts": counts,
        "confidences": confidences,
        "document": {"run": {k: v for k, v in doc["run"].items() if k not in ("id", "seconds")}}
        | {"edges": doc["edges"], "sampling": _estimates(doc["sampling"]), "keys": _finding_keys(doc)},
    }


def test_a_saved_run_reads_back_as_the_document_it_was_saved_from(store, tmp_path):
    """The file audit's saved run, rebuilt (audit_job.saved_result), is the document it printed."""
    db = str(tmp_path / "copy.duckdb")
    Path(db).write_bytes(Path(store).read_bytes())
    printed = CliRunner().invoke(main, ["audit", "--db", db, "--all", "--settle", "0", "--json"])
    assert printed.exit_code == 0, printed.output
    printed = json.loads(printed.stdout)
    from audit.audit_job import saved_result

    back = json.loads("".join(saved_result(db, printed["run"]["id"]).document_chunks()))
    assert back["run"] | {"seconds": 0} == printed["run"] | {"seconds": 0, "degraded": []}
    assert back["edges"] == printed["edges"] and back["sampling"] == printed["sampling"]
    assert back["findings"] == printed["findings"] and back["findings"]
    assert saved_result(db, 99) is None


def test_save_db_only_with_spark(store):
    result = CliRunner().invoke(main, ["audit", "--db", store, "--save-db", "x.duckdb"])
    assert result.exit_code == 2 and "--save-db goes with --spark" in result.output


@pytest.mark.slow
def test_a_saved_spark_run_reads_back_like_a_single_process_run(store, tmp_path, spark):
    export_store(store, str(tmp_path / "pq"), shard="all")
    runs = str(tmp_path / "spark-runs.duckdb")  # a store of runs only: the spans are in the shards
    printed = CliRunner().invoke(
        main,
        ["audit", "--spark", "local[2]", "--parquet", str(tmp_path / "pq"), "--save-db", runs, "--json"],
    )
    assert printed.exit_code == 0, printed.output
    assert json.loads(printed.stdout)["run"]["id"] == 1
    db = str(tmp_path / "copy.duckdb")
    Path(db).write_bytes(Path(store).read_bytes())
    single = CliRunner().invoke(main, ["audit", "--db", db, "--all", "--settle", "0"])
    assert single.exit_code == 0 and single.stdout.startswith("audit run 1:"), single.output
    spark_run, db_run = _saved(runs, 1), _saved(db, 1)
    assert spark_run["total"] > 0 and spark_run["run"]["edges"]
    assert spark_run.pop("confidences") == pytest.approx(db_run.pop("confidences"), abs=1e-3)
    assert spark_run == db_run
    # the report of each saved run: the same figures and hops
    reports = {}
    for name, path in (("spark", runs), ("db", db)):
        out = tmp_path / f"report-{name}"
        r = CliRunner().invoke(main, ["report", "--db", path, "--run", "1", "--out", str(out)])
        assert r.exit_code == 0, r.output
        reports[name] = json.loads((out / "report.json").read_text())
    assert reports["spark"]["figures"] == reports["db"]["figures"]
    assert reports["spark"]["hops"] == reports["db"]["hops"]


# --- the tasks' temporary folder: each slice's findings go through files, not the driver's JVM ---


@pytest.mark.parametrize("where", ["--spark-temp", "default"])
def test_a_temporary_folder_that_cannot_be_written_is_named(store, tmp_path, where):
    """Checked before Spark starts: exit 1 naming the folder, and no document."""
    out, _ = _exported(store, tmp_path)
    blocker = tmp_path / "a-file"  # a file where the folder should be (root writes through chmod)
    blocker.write_text("")
    args = ["audit", "--spark", "local[1]", "--parquet", str(out), "--json"]
    if where == "--spark-temp":
        named = str(blocker / "tmp")
        args += ["--spark-temp", named]
    else:
        named = str(out / "_audit-tmp")
        Path(named).write_text("")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert f"{named}: the Spark tasks' temporary folder is not writable" in result.stderr
    assert "--spark-temp" in result.stderr and result.stdout == ""


@pytest.mark.slow
def test_the_tasks_files_are_read_and_removed(store, tmp_path, spark):
    """The findings come back through files in a run's own folder, which is gone afterwards; the
    default folder inside the export too."""
    export_store(store, str(tmp_path / "pq"), shard="all")
    seen = []
    from audit.spark_audit import spark_audit

    result = spark_audit(
        "local[2]", str(tmp_path / "pq"), AuditSettings(), session=spark, progress=seen.append
    )
    assert result.findings.num_rows > 0
    assert any(str(tmp_path / "pq" / "_audit-tmp" / "run-") in step for step in seen)
    assert not (tmp_path / "pq" / "_audit-tmp").exists()
    # a given folder keeps only what was there; a failing task leaves no files behind either
    temp = tmp_path / "temp"
    temp.mkdir()
    (temp / "other").write_text("not ours")
    with pytest.raises(ExportError, match="the Spark audit failed"):
        spark_audit(
            "local[2]",
            str(tmp_path / "pq"),
            AuditSettings(),
            session=spark,
            temp=str(temp),
            memory_limit="lots",
        )
    assert [p.name for p in temp.iterdir()] == ["other"]
