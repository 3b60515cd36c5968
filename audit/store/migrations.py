"""Named, append-only schema migrations for the span store.

Each migration runs once, in order, inside a transaction; its name is recorded in
`_migrations`. Never edit or reorder a migration that has shipped: append a new one.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from .rest import restore_sql


@dataclass(frozen=True)
class Migration:
    name: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "0001_spans",
        """
        CREATE TABLE spans (
            -- identity: fixed-width so joins over millions of spans stay fast
            trace_id UHUGEINT NOT NULL,
            span_id UBIGINT NOT NULL,
            parent_span_id UBIGINT,              -- NULL for a root span
            trace_state VARCHAR,
            flags UINTEGER NOT NULL,
            name VARCHAR NOT NULL,
            kind VARCHAR NOT NULL,               -- UNSPECIFIED|INTERNAL|SERVER|CLIENT|PRODUCER|CONSUMER
            start_ns UBIGINT NOT NULL,           -- start_time_unix_nano
            end_ns UBIGINT NOT NULL,             -- end_time_unix_nano
            status_code VARCHAR NOT NULL,        -- UNSET|OK|ERROR
            status_message VARCHAR,
            dropped_attributes_count UINTEGER NOT NULL,
            event_count UINTEGER NOT NULL,
            dropped_events_count UINTEGER NOT NULL,
            link_count UINTEGER NOT NULL,        -- the links are also in span_links, for joins
            dropped_links_count UINTEGER NOT NULL,
            -- what no column holds: an OTLP `Span` protobuf with the attributes (every value type),
            -- the events, and any field newer than this schema; decode with otlp_attributes() etc.
            otlp_rest BLOB NOT NULL,
            -- resource and instrumentation scope
            service_name VARCHAR NOT NULL,
            resource_attributes JSON,
            resource_dropped_attributes_count UINTEGER NOT NULL,
            resource_schema_url VARCHAR,
            scope_name VARCHAR,
            scope_version VARCHAR,
            scope_attributes JSON,
            scope_schema_url VARCHAR,
            -- derived once at ingest for the audit
            parent_is_remote BOOLEAN,            -- from flags bits 0x100/0x200; NULL when unknown
            sampling_threshold UBIGINT,          -- tracestate ot=th, as a 56-bit rejection threshold
            sampling_rv UBIGINT,                 -- tracestate ot=rv, 56-bit randomness
            sampling_tracestate_invalid BOOLEAN NOT NULL,
            protocol VARCHAR NOT NULL,           -- http|grpc|messaging|rpc|db|none
            server_address VARCHAR,
            server_port INTEGER,
            peer_service VARCHAR,
            url_full VARCHAR,
            url_path VARCHAR,
            http_route VARCHAR,
            http_method VARCHAR,
            http_status_code INTEGER,
            messaging_system VARCHAR,
            messaging_destination VARCHAR,
            messaging_message_id VARCHAR,
            messaging_partition VARCHAR,
            messaging_offset BIGINT,
            rpc_system VARCHAR,
            rpc_service VARCHAR,
            rpc_method VARCHAR,
            db_system VARCHAR,
            ingested_at TIMESTAMPTZ NOT NULL     -- commit time: the audit settles on arrival, not span time
        );

        CREATE TABLE span_links (
            trace_id UHUGEINT NOT NULL,          -- the span that carries the link
            span_id UBIGINT NOT NULL,
            link_trace_id UHUGEINT NOT NULL,     -- the linked span context
            link_span_id UBIGINT NOT NULL,
            trace_state VARCHAR,
            flags UINTEGER NOT NULL,
            attributes JSON,
            dropped_attributes_count UINTEGER NOT NULL,
            ingested_at TIMESTAMPTZ NOT NULL
        );
        """,
    ),
    Migration(
        "0002_audit_runs",
        """
        -- one row per `ctxaudit audit` run (or periodic audit in serve)
        CREATE SEQUENCE audit_run_ids START 1;
        CREATE TABLE audit_runs (
            run_id BIGINT PRIMARY KEY,
            finished_at TIMESTAMPTZ NOT NULL,
            window_start_ns UBIGINT NOT NULL,    -- findings are spans starting in [start, end)
            window_end_ns UBIGINT NOT NULL,
            spans BIGINT NOT NULL,
            traces BIGINT NOT NULL,
            seconds DOUBLE NOT NULL,
            entrypoints VARCHAR[] NOT NULL,      -- "service:operation", learned or configured
            roots JSON NOT NULL,                 -- per service: entry, orphan, orphan_unattributed
            settings JSON NOT NULL
        );
        -- one row per finding (docs/audit-json.md); ids as in `spans`, so findings join to spans.
        -- The explanation and fix of a cause come from its code; `candidates` and `detail` are
        -- the evidence (candidate parents considered; a dangling parent's id, an exit's resolution)
        CREATE TABLE audit_findings (
            run_id BIGINT NOT NULL,
            kind VARCHAR NOT NULL,
            trace_id UHUGEINT NOT NULL,
            span_id UBIGINT NOT NULL,
            service VARCHAR NOT NULL,
            span_name VARCHAR NOT NULL,
            span_kind VARCHAR NOT NULL,
            start_ns UBIGINT NOT NULL,
            protocol VARCHAR NOT NULL,
            system VARCHAR,
            caller VARCHAR,
            callee VARCHAR,
            cause VARCHAR NOT NULL,
            candidates INTEGER NOT NULL,
            detail VARCHAR,
            parent_trace_id UHUGEINT,            -- the probable parent, when one is named
            parent_span_id UBIGINT,
            parent_service VARCHAR,
            confidence DOUBLE
        );
        CREATE TABLE audit_edges (
            run_id BIGINT NOT NULL,
            caller VARCHAR NOT NULL,
            callee VARCHAR NOT NULL,
            protocol VARCHAR NOT NULL,
            system VARCHAR,
            callee_instrumented BOOLEAN NOT NULL,
            calls BIGINT NOT NULL,
            propagated BIGINT NOT NULL,
            stitched BIGINT NOT NULL,
            cause VARCHAR
        );
        """,
    ),
    Migration(
        "0003_audit_sampling",
        """
        -- the run's sampling figures (docs/audit-json.md, `sampling`); NULL for earlier runs
        ALTER TABLE audit_runs ADD COLUMN sampling JSON;
        """,
    ),
    Migration(
        "0004_staging_segments",
        """
        -- staging log segments (audit/store/staging.py) whose spans are in `spans`: each row is
        -- written in the transaction that loads its segment, so a segment still on disk after a
        -- crash is loaded again only if its row is missing (exactly once). Rows below the oldest
        -- segment of a load are deleted by that load: their files are gone.
        CREATE TABLE staging_segments (
            segment BIGINT PRIMARY KEY,
            spans BIGINT NOT NULL,
            loaded_at TIMESTAMPTZ NOT NULL
        );
        """,
    ),
    Migration(
        "0005_span_resources",
        """
        -- slimmer rows (issue 19): a span's resource and scope are stored once, in tables of
        -- their own, and each span names them by an id hashed from their content
        -- (audit/store/batch.py: resource_id, scope_id), so a batch from one process stores its
        -- resource once. The view spans_full shows every column a span had before.
        CREATE TABLE span_resources (
            resource_id UBIGINT PRIMARY KEY,
            resource_attributes JSON,
            resource_dropped_attributes_count UINTEGER NOT NULL,
            resource_schema_url VARCHAR
        );
        CREATE TABLE span_scopes (
            scope_id UBIGINT PRIMARY KEY,
            scope_name VARCHAR,
            scope_version VARCHAR,
            scope_attributes JSON,
            scope_schema_url VARCHAR
        );
        ALTER TABLE spans ADD COLUMN resource_id UBIGINT;
        ALTER TABLE spans ADD COLUMN scope_id UBIGINT;
        UPDATE spans SET
            resource_id = md5_number_upper(concat(
                coalesce(resource_attributes::VARCHAR, ''), chr(31),
                resource_dropped_attributes_count::VARCHAR, chr(31), coalesce(resource_schema_url, ''))),
            scope_id = md5_number_upper(concat(
                coalesce(scope_name, ''), chr(31), coalesce(scope_version, ''), chr(31),
                coalesce(scope_attributes::VARCHAR, ''), chr(31), coalesce(scope_schema_url, '')));
        INSERT INTO span_resources
            SELECT resource_id, any_value(resource_attributes), any_value(resource_dropped_attributes_count),
                   any_value(resource_schema_url)
            FROM spans GROUP BY resource_id;
        INSERT INTO span_scopes
            SELECT scope_id, any_value(scope_name), any_value(scope_version), any_value(scope_attributes),
                   any_value(scope_schema_url)
            FROM spans GROUP BY scope_id;
        ALTER TABLE spans DROP COLUMN resource_attributes;
        ALTER TABLE spans DROP COLUMN resource_dropped_attributes_count;
        ALTER TABLE spans DROP COLUMN resource_schema_url;
        ALTER TABLE spans DROP COLUMN scope_name;
        ALTER TABLE spans DROP COLUMN scope_version;
        ALTER TABLE spans DROP COLUMN scope_attributes;
        ALTER TABLE spans DROP COLUMN scope_schema_url;
        CREATE VIEW spans_full AS
            SELECT s.* EXCLUDE (resource_id, scope_id), r.* EXCLUDE (resource_id), c.* EXCLUDE (scope_id)
            FROM spans s
            LEFT JOIN span_resources r USING (resource_id)
            LEFT JOIN span_scopes c USING (scope_id);
        """,
    ),
    Migration(
        "0006_otlp_rest_slim",
        """
        -- slimmer rows (issue 19): otlp_rest no longer repeats the attributes that a column holds
        -- exactly; attributes_in_columns says which ones were left out (bit i: entry i of
        -- audit/store/rest.py COLUMN_ATTRIBUTES; NULL for spans stored before). spans_full puts
        -- them back, so its otlp_rest is the whole span as before.
        ALTER TABLE spans ADD COLUMN attributes_in_columns UINTEGER;
        CREATE OR REPLACE VIEW spans_full AS
            SELECT s.* EXCLUDE (resource_id, scope_id, attributes_in_columns)
                       REPLACE ("""
        + restore_sql("s.otlp_rest", "s.attributes_in_columns", lambda c: f"s.{c}")
        + """ AS otlp_rest),
                   r.* EXCLUDE (resource_id), c.* EXCLUDE (scope_id)
            FROM spans s
            LEFT JOIN span_resources r USING (resource_id)
            LEFT JOIN span_scopes c USING (scope_id);
        """,
    ),
)

# spans with their resource and scope columns: a view since 0005_span_resources
SPANS_FULL = "spans_full"


def ensure_spans_full(con: duckdb.DuckDBPyConnection) -> str:
    """The relation with every span column: `spans_full`, or `spans` itself on a store opened
    read-only before `0005_span_resources` ran (no server has opened it since); on such a
    connection `spans_full` is also made a temporary view of `spans` (visible to this
    connection only, not to its cursors)."""
    (found,) = con.execute(
        "SELECT count(*) FROM duckdb_views() WHERE view_name = 'spans_full' AND database_name <> 'temp'"
    ).fetchone()
    if found:
        return SPANS_FULL
    (wide,) = con.execute(
        "SELECT count(*) FROM duckdb_columns() WHERE table_name = 'spans' AND column_name = "
        "'resource_attributes' AND database_name <> 'temp'"
    ).fetchone()
    if wide:
        con.execute("CREATE OR REPLACE TEMP VIEW spans_full AS SELECT * FROM spans")
        return "spans"
    return SPANS_FULL


def apply_migrations(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Apply every migration not yet recorded; return the names applied now."""
    con.execute(
        "CREATE TABLE IF NOT EXISTS _migrations (name VARCHAR PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL)"
    )
    done = {row[0] for row in con.execute("SELECT name FROM _migrations").fetchall()}
    applied = []
    for migration in MIGRATIONS:
        if migration.name in done:
            continue
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(migration.sql)
            con.execute("INSERT INTO _migrations VALUES (?, current_timestamp)", [migration.name])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        applied.append(migration.name)
    return applied
