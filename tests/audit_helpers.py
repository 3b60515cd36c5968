"""Build real store files for audit tests: simulated scenarios (through the CLI) and hand-made spans."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from audit.cli import DbSink, main
from audit.engine import AuditWindow, run_audit
from audit.scenarios.output import read_truth


def simulated_store(tmp_path, scenario: str = "shop-small", seed: int = 1) -> tuple[str, list[dict]]:
    name = Path(scenario).stem  # a bundled name, or a scenario file
    db, truth = str(tmp_path / f"{name}.duckdb"), str(tmp_path / f"{name}-truth.jsonl")
    result = CliRunner().invoke(
        main, ["simulate", "--scenario", scenario, "--db", db, "--truth", truth, "--seed", str(seed)]
    )
    assert result.exit_code == 0, result.output
    return db, list(read_truth(truth))


def audited_store(tmp_path, scenario: str = "shop-small", seed: int = 1) -> str:
    """A simulated store with one saved audit run over all of it (what the read side shows)."""
    db, _ = simulated_store(tmp_path, scenario, seed)
    result = CliRunner().invoke(main, ["audit", "--db", db, "--all", "--settle", "0"])
    assert result.exit_code == 0, result.output
    return db


def store_requests(path: str, requests) -> str:
    """Append export requests to a store file the way the receivers would."""
    sink = DbSink(path)
    for r in requests:
        sink.send(r.SerializeToString())
    sink.close()
    return path


def audit_all(path: str, **config):
    """Audit a whole store file in one window."""
    import duckdb

    from audit.engine import AuditConfig

    con = duckdb.connect(path, read_only=True)
    lo, hi = con.execute("SELECT min(start_ns), max(start_ns) + 1 FROM spans").fetchone()
    result = run_audit(con, AuditWindow(lo, hi), AuditConfig(**config))
    con.close()
    return result


def candidates_over_store(con):
    """Run the engine's passes up to the stitching candidates over the whole store, as run_audit
    does; return (learned, audited orphan ids, skew ns, max lag ns) for stitch and calibrate."""
    import numpy as np

    from audit.engine import AuditConfig
    from audit.engine.learn import learn
    from audit.engine.scan import scan
    from audit.engine.skew import learn_unseen_offsets
    from audit.engine.stitch import build_candidates
    from audit.engine.targets import resolve_exits

    lo, hi = con.execute("SELECT min(start_ns), max(start_ns) + 1 FROM spans").fetchone()
    window, config = AuditWindow(lo, hi), AuditConfig()
    skew, lag = config.default_skew_ms * 1e6, config.default_max_lag_s * 1e9
    scan(con, window)
    learned = learn(con, window, config)
    resolve_exits(con, learned)
    learn_unseen_offsets(con, learned, skew)
    build_candidates(con, learned, skew, lag)
    audited = con.execute("SELECT oid FROM cand_orphans").fetchnumpy()["oid"].astype(np.int64)
    return learned, audited, skew, lag
