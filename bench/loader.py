"""The loader's DuckDB insert alone: µs per span at the staging loader's commit sizes.

    python -m bench.loader [--commit-spans 64000] [--commits 12] [--runs 3]

Decodes bench/payloads.py's 1000-span requests once (the serve decoder), then appends them into
a fresh DuckDB file (the store's settings: `checkpoint_threshold` 128 MiB, so checkpoints are
paid inside the run) in transactions of `--commit-spans` spans, one row layout per variant, the
variants interleaved so the machine's noise hits them alike:

- `store`: this build's `SpanStore.append` (what the staging loader runs), on the store's schema;
- `wide`: the row before issue 19 item 3: resource and scope columns in every row, `otlp_rest`;
- `wide - otlp_rest`: the same without `otlp_rest`;
- `ids`: resource and scope as two id columns (their attributes in tables of their own);
- `ids - otlp_rest`: the same without `otlp_rest`;
- `ids + whole otlp_rest`: `ids` with every attribute in `otlp_rest`, as before the attributes a
  column holds were left out of it (migration 0006_otlp_rest_slim); `store`, `wide` and `ids`
  leave them out.

Prints, per variant, the median wall and CPU µs per span over the runs, the ratio to `wide`
in the same run, and the file's bytes per span once closed (checkpointed); `--with-close` times the
close (its checkpoint) too, which bigger commits need for a fair comparison. Figures: docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import duckdb
import pyarrow as pa

from audit.store.batch import SpanBatch
from audit.store.rest import restore
from audit.store.writer import SpanStore, joined_columns
from bench.payloads import encoded_requests
from collector_ext import decoder
from collector_ext.decode import PROTOBUF

_RESOURCE_SCOPE = (
    "resource_attributes",
    "resource_dropped_attributes_count",
    "resource_schema_url",
    "scope_name",
    "scope_version",
    "scope_attributes",
    "scope_schema_url",
)
_IDS = ("resource_id", "scope_id")


def _layout(table: pa.Table, variant: str) -> pa.Table:
    """The batch's columns as one of the row layouts compared."""
    drop = set()
    if variant.endswith("- otlp_rest"):
        drop.update(("otlp_rest", "attributes_in_columns"))
    if variant.endswith("+ whole otlp_rest") and "attributes_in_columns" in table.column_names:
        rest = [restore(r["otlp_rest"], r["attributes_in_columns"], r) for r in table.to_pylist()]
        table = table.set_column(
            table.column_names.index("otlp_rest"), "otlp_rest", pa.array(rest, pa.binary())
        )
        drop.add("attributes_in_columns")
    if variant.startswith("wide"):
        drop.update(c for c in _IDS if c in table.column_names)
        if "resource_attributes" not in table.column_names:
            raise SystemExit("this build's batches carry no resource columns to compare against")
    else:
        drop.update(c for c in _RESOURCE_SCOPE if c in table.column_names)
        if "resource_id" not in table.column_names:  # a build before the ids: make some
            n = table.num_rows
            for name in _IDS:
                table = table.append_column(name, pa.array([7] * n, pa.uint64()))
    return table.drop_columns(sorted(c for c in drop if c in table.column_names))


def _one(
    variant: str, commits: list[list[SpanBatch]], tmp: str, with_close: bool = False
) -> tuple[float, float, float]:
    path = os.path.join(tmp, f"{variant.replace(' ', '')}.duckdb")
    spans = sum(b.accepted for c in commits for b in c)
    if variant == "store":
        store = SpanStore(path)
        t, c = time.perf_counter(), time.process_time()
        for batches in commits:
            store.append(batches)
        if with_close:
            store.close()
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        if not with_close:
            store.close()
    else:
        con = duckdb.connect(path, config={"checkpoint_threshold": "128MiB"})
        laid: dict[int, pa.Table] = {}  # the commits are one list of batches, repeated: lay it out once
        for c in commits:
            if id(c) not in laid:
                laid[id(c)] = pa.concat_tables([_layout(b.spans, variant) for b in c])
        tables = [laid[id(c)] for c in commits]
        columns = joined_columns(tables[0].schema)
        select = f"SELECT {', '.join(f'{e} AS {c}' for c, e in columns)} FROM batch"
        con.register("batch", tables[0].slice(0, 0))
        con.execute(f"CREATE TABLE spans AS {select}")
        insert = f"INSERT INTO spans {select}"
        t, c = time.perf_counter(), time.process_time()
        for table in tables:
            con.register("batch", table)
            con.execute(insert)
        if with_close:
            con.close()
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        if not with_close:
            con.close()
    size = 0
    for f in (path, path + ".wal"):
        if os.path.exists(f):
            size += os.path.getsize(f)  # after the close, which checkpoints
            os.remove(f)
    return wall / spans * 1e6, cpu / spans * 1e6, size / spans


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commit-spans", type=int, default=64_000)
    ap.add_argument("--commits", type=int, default=12)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--with-close",
        action="store_true",
        help="time the final close too: its checkpoint of what the WAL still holds, and of the row "
        "groups DuckDB wrote optimistically (commits of 122,880 spans or more)",
    )
    ap.add_argument(
        "--variants", default="store,wide,wide - otlp_rest,ids,ids - otlp_rest,ids + whole otlp_rest"
    )
    args = ap.parse_args()
    per = 1000
    n_requests = max(1, args.commit_spans // per)
    requests = encoded_requests(n_requests, per)
    batches = [decoder.to_span_batch(r, PROTOBUF, "auto") for r in requests]
    commits = [batches] * args.commits
    variants = [v.strip() for v in args.variants.split(",")]
    if "wide" in variants and "resource_attributes" not in batches[0].spans.column_names:
        variants = [v for v in variants if not v.startswith("wide")]
    print(
        f"{args.commits} commits of {n_requests * per} spans per variant, {args.runs} runs; "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    wall: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    disk: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="ctxaudit-loader-", dir=os.environ.get("BENCH_TMP")) as tmp:
        for run in range(args.runs):
            for v in variants:
                w, c, b = _one(v, commits, tmp, args.with_close)
                wall[v].append(w)
                cpu[v].append(c)
                disk[v].append(b)
                print(
                    f"run {run + 1} {v:<18} wall {w:6.2f} µs/span  CPU {c:6.2f} µs/span  "
                    f"{b:6.1f} B/span on disk",
                    flush=True,
                )
    print(f"\nmedians (load average at the end {os.getloadavg()[0]:.1f})")
    ref = "wide" if "wide" in variants else variants[0]
    for v in variants:
        ratio = statistics.median(a / b for a, b in zip(wall[v], wall[ref]))
        print(
            f"  {v:<18} wall {statistics.median(wall[v]):6.2f} µs/span (range {min(wall[v]):.2f}-"
            f"{max(wall[v]):.2f})  CPU {statistics.median(cpu[v]):6.2f}  wall / {ref}: {ratio:.2f}  "
            f"{statistics.median(disk[v]):6.1f} B/span on disk"
        )


if __name__ == "__main__":
    main()
