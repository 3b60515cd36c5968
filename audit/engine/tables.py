"""Small Python-made tables (decisions, assignments) as DuckDB temp tables the SQL can join."""

from __future__ import annotations

import duckdb
import pyarrow as pa


def temp_table(con: duckdb.DuckDBPyConnection, name: str, data: pa.Table | dict) -> None:
    """Create (or replace) temp table `name` from an Arrow table or a dict of columns."""
    con.register(f"{name}_arrow", data if isinstance(data, pa.Table) else pa.table(data))
    try:
        con.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS SELECT * FROM {name}_arrow")
    finally:
        con.unregister(f"{name}_arrow")
