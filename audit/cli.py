"""`ctxaudit`: the command line, and the composition root that wires the packages together.

Commands stay thin: parse options, build objects, call one method. Exit codes:
0 success, 1 runtime error (store locked, corrupt, port taken...), 2 bad usage.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime

import click
from pydantic import ValidationError

from . import __version__
from .cli_params import Duration, Time, TimeOfDay, Zone, hostport, setting
from .settings import AUDIT_MEMORY_LIMIT, REPORT_SINCE, AuditSettings, ServeSettings, SettingsError, explain
from .store.errors import StoreError

log = logging.getLogger("ctxaudit")

DEFAULT_DB = "ctxaudit.duckdb"


def _fail(message: str) -> None:
    click.echo(f"ctxaudit: error: {message}", err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ctxaudit")
@click.option("-v", "--verbose", is_flag=True, help="Log debug detail to stderr.")
def main(verbose: bool) -> None:
    """Find where distributed-tracing context is lost, and what the loss costs.

    Point OTLP exporters (or a Collector tee) at `ctxaudit serve`; it stores every
    span in a DuckDB file that the other commands read.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@main.command()
@click.option(
    "--db", default=DEFAULT_DB, show_default=True, metavar="PATH", help="DuckDB file to create or append to."
)
@click.option(
    "--grpc",
    "grpc_address",
    default="127.0.0.1:4317",
    show_default=True,
    callback=hostport,
    metavar="HOST:PORT",
    help="OTLP/gRPC listen address, HOST:PORT; 'off' to disable.",
)
@click.option(
    "--http",
    "http_address",
    default="127.0.0.1:4318",
    show_default=True,
    callback=hostport,
    metavar="HOST:PORT",
    help="OTLP/HTTP listen address, HOST:PORT; 'off' to disable.",
)
@click.option(
    "--api",
    "api_address",
    default="127.0.0.1:4319",
    show_default=True,
    callback=hostport,
    metavar="HOST:PORT",
    help="Read API listen address (loopback only): the UI and `--server` commands read through it; "
    "'off' to disable.",
)
@setting(ServeSettings, "audit_every", metavar="SECONDS")
@setting(ServeSettings, "audit_settle", metavar="SECONDS")
@click.option(
    "--audit-config",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="YAML audit settings (the keys of `ctxaudit audit --config`: entrypoints, min_confidence, ...) "
    "for the periodic audits and the daily reports; --audit-settle overrides the file's settle_s.",
)
@setting(ServeSettings, "max_body_mib")
@setting(ServeSettings, "queue_spans")
@setting(ServeSettings, "inflight_mib")
@setting(ServeSettings, "staging_mib")
@setting(ServeSettings, "decoders")
@setting(ServeSettings, "memory_limit")
@setting(ServeSettings, "audit_max_rss_mib")
@setting(ServeSettings, "checkpoint_mib")
@setting(ServeSettings, "drain_timeout", metavar="SECONDS")
@setting(ServeSettings, "log_interval", metavar="SECONDS")
@setting(ServeSettings, "header_timeout", metavar="SECONDS")
@setting(ServeSettings, "idle_timeout", metavar="SECONDS")
@setting(ServeSettings, "stall_timeout", metavar="SECONDS")
@setting(ServeSettings, "max_connections")
@setting(ServeSettings, "metrics_public")
@setting(ServeSettings, "metrics_max_edges")
@setting(ServeSettings, "export_otlp", metavar="URL")
@setting(ServeSettings, "export_parquet", metavar="DIR")
@setting(ServeSettings, "export_every", type=Duration(), metavar="DURATION")
@setting(ServeSettings, "export_shard", metavar="NAME")
@click.option(
    "--report-at",
    type=TimeOfDay(),
    metavar="HH:MM[:SS]",
    help="Write a report (as `ctxaudit report`) every day at this time [default: never].",
)
@click.option(
    "--report-tz",
    type=Zone(),
    default="UTC",
    show_default=True,
    metavar="ZONE",
    help="The time zone of --report-at and of the reports' folder names (e.g. Europe/Paris).",
)
@click.option(
    "--report-dir",
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="Where the daily reports go, one folder per day [default: DB's name + '-reports'].",
)
@setting(ServeSettings, "report_keep_days")
@click.option(
    "--report-since",
    type=Duration(),
    default=REPORT_SINCE,
    show_default=True,
    metavar="DURATION",
    help="How far back each daily report reaches.",
)
@setting(ServeSettings, "retain_days", metavar="DAYS")
@setting(ServeSettings, "retain_gib", metavar="GIB")
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="Require this token (the file's first line) on every request to the receivers and the read "
    "API, as Authorization: Bearer <token> [default: $CTXAUDIT_TOKEN, else none].",
)
@click.option("--token-header", metavar="NAME", help="Also accept the token in this header (e.g. x-api-key).")
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="Serve TLS with this certificate chain (PEM), on the receivers and the read API.",
)
@click.option(
    "--tls-key", type=click.Path(dir_okay=False), metavar="FILE", help="The certificate's private key (PEM)."
)
@click.option(
    "--tls-client-ca",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="Mutual TLS: the receivers require a client certificate signed by this CA (PEM).",
)
def serve(
    db,
    grpc_address,
    http_address,
    api_address,
    report_at,
    report_tz,
    report_dir,
    report_since,
    token_file,
    token_header,
    tls_cert,
    tls_key,
    tls_client_ca,
    audit_config,
    **knobs,
) -> None:
    """Receive OTLP spans over gRPC and HTTP and store them in DB.

    Spans are acknowledged only after they are committed. SIGTERM or SIGINT stops
    accepting, lets requests in flight finish, commits, and exits 0.
    """
    from collector_ext.addresses import is_loopback, parse_hostport

    from .net.access import Access, AccessError, TlsFiles, TokenAuth
    from .server.serve import DailyReport, ServeConfig, ServeError, run

    if not grpc_address and not http_address:
        raise click.UsageError("both receivers are off: enable --grpc or --http")
    try:
        auth = TokenAuth.load(token_file, token_header)
    except AccessError as e:
        raise click.BadParameter(str(e), param_hint="--token-file") from None
    if token_header and not auth:
        raise click.UsageError("--token-header needs a token: --token-file or $CTXAUDIT_TOKEN")
    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("give --tls-cert and --tls-key together")
    if tls_client_ca and not tls_cert:
        raise click.UsageError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    tls = TlsFiles(tls_cert, tls_key, tls_client_ca) if tls_cert else None
    try:
        if tls:
            tls.ssl_context()  # unreadable or mismatched files: say so now, not at the first connection
    except AccessError as e:
        raise click.BadParameter(str(e), param_hint="--tls-cert") from None
    if api_address and not is_loopback(parse_hostport(api_address)[0]) and not auth:
        raise click.BadParameter(
            "the read API listens beyond loopback only with a token (--token-file or $CTXAUDIT_TOKEN)",
            param_hint="--api",
        )
    for address in (grpc_address, http_address, api_address):
        if address and not is_loopback(parse_hostport(address)[0]):
            if not auth:
                log.warning(
                    "listening on %s beyond loopback without a token: anyone who can reach it can write "
                    "spans; set --token-file",
                    address,
                )
            elif not tls:
                log.warning(
                    "listening on %s beyond loopback without TLS: the token and the spans cross the "
                    "network in clear; set --tls-cert and --tls-key",
                    address,
                )
    try:
        settings = ServeSettings(**knobs)
    except ValidationError as e:  # what click's types cannot check (--export-otlp's form)
        raise click.UsageError(str(explain(e, ServeSettings))) from None
    settle_given = click.get_current_context().get_parameter_source("audit_settle")
    try:
        audit_settings = AuditSettings.load(
            audit_config,
            settle_s=None if settle_given is click.core.ParameterSource.DEFAULT else settings.audit_settle,
        )
    except SettingsError as e:
        raise click.BadParameter(str(e), param_hint="--audit-config") from None
    report = DailyReport(report_at, report_tz, report_dir, settings.report_keep_days, report_since)
    config = ServeConfig(
        db,
        grpc_address,
        http_address,
        api_address,
        settings,
        report=report if report_at else None,
        access=Access(auth, tls),
        audit=audit_settings,
    )
    try:
        run(config, lambda line: click.echo(line, err=True))
    except ServeError as e:
        _fail(str(e))


_SERVER = click.option(
    "--server",
    metavar="URL",
    help="Read through a running `ctxaudit serve`'s read API (e.g. http://127.0.0.1:4319) "
    "instead of opening --db; needed while a server holds the file.",
)


def _reader(db: str, server: str | None):
    """The reader for --server URL (a running serve), else for the file --db (opened read-only)."""
    ctx = click.get_current_context()
    if server and ctx.get_parameter_source("db") is not click.core.ParameterSource.DEFAULT:
        raise click.UsageError("give --db or --server, not both")
    from .read import open_reader

    return open_reader(db=db, server=server)


@main.command()
@click.option(
    "--db",
    default=DEFAULT_DB,
    show_default=True,
    metavar="PATH",
    help="DuckDB file written by `ctxaudit serve`.",
)
@_SERVER
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def stats(db: str, server: str | None, as_json: bool) -> None:
    """Print what the store holds: spans, traces, services and the time range."""
    try:
        reader = _reader(db, server)
        result = reader.stats()
        reader.close()
    except StoreError as e:
        _fail(str(e))
    db = server or db
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    click.echo(f"store      {db}")
    click.echo(f"spans      {result.spans}")
    click.echo(f"traces     {result.traces}")
    click.echo(f"services   {result.services}")
    click.echo(f"links      {result.links}")
    if result.first_span_start_ns is not None:
        click.echo(f"from       {_when(result.first_span_start_ns)}")
        click.echo(f"to         {_when(result.last_span_end_ns)}")
    if result.end_before_start:
        click.echo(f"warning    {result.end_before_start} span(s) end before they start (clock or SDK bug)")
    for row in result.by_service:
        click.echo(f"  {row.service:<32} {row.spans:>10} spans {row.traces:>9} traces")


def _when(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, tz=UTC).isoformat(timespec="milliseconds")


@main.command()
@click.option(
    "--db",
    default=DEFAULT_DB,
    show_default=True,
    metavar="PATH",
    help="DuckDB file written by `ctxaudit serve`.",
)
@click.option(
    "--since",
    type=Time(),
    help="Window start, ISO 8601 [default: where the last run ended, else the first span].",
)
@click.option(
    "--until",
    type=Time(),
    help="Window end, ISO 8601 [default: now minus --settle, at most the newest span].",
)
@click.option(
    "--all", "from_first", is_flag=True, help="Start at the first span, not where the last run ended."
)
@setting(AuditSettings, "settle_s", "--settle", metavar="SECONDS", default_from_file=True)
@setting(AuditSettings, "context_s", "--context", metavar="SECONDS", default_from_file=True)
@click.option(
    "--entrypoints",
    multiple=True,
    metavar="SVC[:OPERATION],...",
    help="Real entry points (their roots are not orphans), besides those learned; repeatable.",
)
@setting(AuditSettings, "min_confidence", default_from_file=True)
@setting(AuditSettings, "assume_sampling_probability", "--assume-probability", metavar="P")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help=f"YAML settings: {', '.join(AuditSettings.model_fields)} (docs/cli.md).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the result document (docs/audit-json.md) instead of text."
)
@click.option("--no-save", is_flag=True, help="Do not store the run (opens the file read-only).")
@click.option(
    "--memory-limit",
    default=AUDIT_MEMORY_LIMIT,
    show_default=True,
    help="DuckDB memory limit for the audit; beyond it, work spills to disk (slower). With --db only.",
)
@click.option(
    "--server",
    metavar="URL",
    help="Have a running `ctxaudit serve` (its read API, e.g. http://127.0.0.1:4319) run the audit "
    "on its store, instead of opening --db.",
)
@click.option(
    "--spark",
    metavar="MASTER",
    help="Run the audit on Apache Spark (local[N], spark://HOST:PORT, yarn, k8s://...) over the Parquet "
    "export of every shard in --parquet, instead of opening --db (docs/scale.md; needs the spark extra).",
)
@click.option("--parquet", metavar="DIR", help="With --spark: the folder `ctxaudit export` wrote.")
@click.option(
    "--slice",
    "slice_s",
    type=click.FloatRange(min=1),
    default=86_400.0,
    show_default=True,
    metavar="SECONDS",
    help="With --spark: audit the window in slices of this length, one Spark task each (docs/scale.md).",
)
@click.option(
    "--spark-temp",
    metavar="DIR",
    help="With --spark: the folder the Spark tasks write each slice's findings to for the driver to "
    "read (a run's own subfolder, removed afterwards); on a cluster, one the driver and every executor "
    "share [default: _audit-tmp in --parquet].",
)
@click.option(
    "--save-db",
    metavar="PATH",
    help="With --spark: save the run in this store (created if missing; no server may hold it), as "
    "`audit --db` saves its runs, for `ctxaudit report --run` and the explorer.",
)
def audit(
    db,
    since,
    until,
    from_first,
    settle_s,
    context_s,
    entrypoints,
    min_confidence,
    assume_sampling_probability,
    config_file,
    as_json,
    no_save,
    memory_limit,
    server,
    spark,
    parquet,
    slice_s,
    spark_temp,
    save_db,
) -> None:
    """Find where trace context is lost in DB's spans, stitch orphans to their probable
    parents, count every service edge, and save the run in DB.

    Each run audits a settled window and by default starts where the last one ended.
    With --server, the running server audits its own store (it holds the file).
    """
    from .audit_job import audit_store

    listed = ",".join(entrypoints) if entrypoints else None
    try:
        settings = AuditSettings.load(
            config_file,
            entrypoints=listed,
            min_confidence=min_confidence,
            assume_sampling_probability=assume_sampling_probability,
            settle_s=settle_s,
            context_s=context_s,
        )
    except SettingsError as e:
        raise click.BadParameter(str(e), param_hint="--config") from None
    if spark or parquet:
        _audit_on_spark(
            spark, parquet, settings, since, until, slice_s, memory_limit, as_json, save_db, spark_temp
        )
        return
    if save_db:
        raise click.UsageError("--save-db goes with --spark (`audit --db` saves its run in --db)")
    if server:
        _audit_in_server(
            server,
            {
                "settings": settings.to_dict(),
                "since_ns": since,
                "until_ns": until,
                "all": from_first,
                "save": not no_save,
            },
            as_json,
        )
        return
    started = time.monotonic()

    def progress(step: str) -> None:
        click.echo(f"audit: {step} ({time.monotonic() - started:.1f} s)", err=True)

    try:
        result = audit_store(
            db,
            settings,
            since_ns=since,
            until_ns=until,
            resume=not from_first and since is None,
            save=not no_save,
            memory_limit=memory_limit,
            progress=progress,
        )
    except StoreError as e:
        _fail(str(e))
    _print_result(result, as_json)


def _audit_on_spark(
    master, parquet, settings, since, until, slice_s, memory_limit, as_json, save_db, spark_temp
) -> None:
    """`audit --spark`: the same engine, per time slice in Spark tasks, over every shard's Parquet;
    with --save-db, the run saved in that store as `audit --db` saves one."""
    from .audit_job import save_result
    from .spark_audit import spark_audit
    from .store.writer import SpanStore

    if not (master and parquet):
        raise click.UsageError("--spark MASTER and --parquet DIR go together")
    started = time.monotonic()
    store = None
    try:
        if save_db:  # opened first: a store it cannot write to stops it before Spark starts
            store = SpanStore(save_db)
        result = spark_audit(
            master,
            parquet,
            settings,
            since_ns=since,
            until_ns=until,
            slice_s=slice_s,
            memory_limit=memory_limit,
            temp=spark_temp,
            progress=lambda step: click.echo(f"audit: {step} ({time.monotonic() - started:.1f} s)", err=True),
        )
        if store is not None and result is not None:
            save_result(store.connection, save_db, result, settings)
    except StoreError as e:
        _fail(str(e))
    finally:
        if store is not None:
            store.close()
    _print_result(result, as_json)


def _print_result(result, as_json: bool) -> None:
    """An audit's result: the document with --json, else the summary."""
    from .audit_job import summary_lines

    if result is None:
        _nothing_new(as_json)
    elif as_json:
        for chunk in result.document_chunks():
            sys.stdout.write(chunk)
        sys.stdout.flush()
    else:
        for line in summary_lines(result):
            click.echo(line)


def _nothing_new(as_json: bool) -> None:
    click.echo(
        "audit: nothing new to audit: no spans since the last run, or none older than the settle "
        "delay (--settle). Use --all or --since to audit again, or --settle 0 if no more spans "
        "will arrive.",
        err=True,
    )
    if as_json:
        click.echo(
            json.dumps({"schema_version": 1, "run": None, "edges": [], "sampling": {}, "findings": []})
        )


def _audit_in_server(server: str, request: dict, as_json: bool) -> None:
    """`audit --server`: the server runs it on its store, beside ingestion, and answers with the document."""
    from .read.remote import RemoteReader

    ctx = click.get_current_context()
    for option in ("db", "memory_limit"):
        if ctx.get_parameter_source(option) is not click.core.ParameterSource.DEFAULT:
            raise click.UsageError(
                f"--{option.replace('_', '-')} is for a file; with --server the server audits its own store"
            )
    click.echo(f"audit: running in the server at {server} (its log shows the run)", err=True)
    try:
        remote = RemoteReader(server)
        if as_json:
            remote.write_audit_document(request, sys.stdout.buffer)
            sys.stdout.buffer.flush()
            return
        doc = remote.audit(request)
    except StoreError as e:
        _fail(str(e))
    if doc["run"] is None:
        _nothing_new(False)
    for line in doc["summary"]:
        click.echo(line)


@main.command()
@click.option(
    "--db", default=DEFAULT_DB, show_default=True, metavar="PATH", help="DuckDB file with audit runs."
)
@_SERVER
@click.option("--run", "run_id", type=int, help="Audit run id [default: the last run].")
@click.option(
    "--view",
    type=click.Choice(["repaired", "observed"]),
    default="repaired",
    show_default=True,
    help="repaired: every real call, with drops and stitches; observed: what a trace backend shows.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["json", "dot", "graphml"]),
    default="json",
    show_default=True,
    help="node-link JSON, Graphviz DOT, or GraphML.",
)
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, writable=True), help="Write here instead of stdout."
)
def graph(db, server, run_id, view, fmt, output) -> None:
    """Export the service graph of an audit run."""
    from graph.service_graph import build_graphs, to_dot, to_graphml, to_node_link_json

    try:
        reader = _reader(db, server)
        run = reader.audit_run(run_id)
        reader.close()
    except StoreError as e:
        _fail(str(e))
    if run is None:
        _fail(
            f"no audit run {run_id} in {db}"
            if run_id
            else f"no audit run in {db} yet: run `ctxaudit audit --db {db}`"
        )
    observed, repaired = build_graphs(run["edges"], run["roots"])
    g = repaired if view == "repaired" else observed
    text = {"json": to_node_link_json, "dot": to_dot, "graphml": to_graphml}[fmt](g)
    if output:
        with open(output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        click.echo(text)


@main.command()
@click.option(
    "--db",
    default=DEFAULT_DB,
    show_default=True,
    metavar="PATH",
    help="DuckDB file to explore (no server may hold it).",
)
@_SERVER
@click.option(
    "--port", type=click.IntRange(1, 65535), default=8501, show_default=True, help="Port of the explorer."
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the explorer listens on.")
def ui(db, server, port, host) -> None:
    """Open the explorer (Streamlit) on a store: overview, service graph, findings, traces, sampling.

    While `ctxaudit serve` holds the file, explore through it with --server.
    """
    import os

    import ui as ui_package

    try:
        _reader(db, server).stats()  # fail here, with the reader's message, not in the browser
    except StoreError as e:
        _fail(str(e))
    env = dict(
        os.environ, **({"CTXAUDIT_SERVER": server} if server else {"CTXAUDIT_DB": os.path.abspath(db)})
    )
    env.pop("CTXAUDIT_DB" if server else "CTXAUDIT_SERVER", None)
    app = os.path.join(os.path.dirname(ui_package.__file__), "app.py")
    click.echo(f"ctxaudit ui: http://{host}:{port} on {server or db}", err=True)
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        app,
        "--server.port",
        str(port),
        "--server.address",
        host,
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",  # for people reading findings: no deploy button, no developer menu
        "viewer",
    ]
    sys.stderr.flush()
    # become Streamlit: a signal to this process then reaches the server itself, and no child is left behind
    os.execve(sys.executable, command, env)


@main.command()
@click.option(
    "--db", default=DEFAULT_DB, show_default=True, metavar="PATH", help="The store (no server may hold it)."
)
@click.option(
    "--server",
    metavar="URL",
    help="Report through a running `ctxaudit serve` (its read API) instead of --db.",
)
@click.option(
    "--since",
    "since_s",
    type=Duration(),
    default=REPORT_SINCE,
    show_default=True,
    help="How far back from the newest settled span the report reaches.",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="Write report.html, report.md and report.json here, and add to DIR/history.jsonl.",
)
@click.option(
    "--fail-on",
    "fail_on",
    multiple=True,
    metavar="EXPR",
    help="Exit 3 if EXPR holds, e.g. orphan_rate>0.01, new_broken_hops>0, "
    "propagation_rate[orders->inventory]<0.99 (repeatable; docs/report.md). "
    "Exit 4 if one cannot be evaluated and none failed.",
)
@click.option(
    "--previous",
    type=click.Path(dir_okay=False, exists=True),
    metavar="FILE",
    help="Compare with this report.json [default: the newest report in the history].",
)
@click.option(
    "--history",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="The history file, for trends and the comparison [default: DIR/history.jsonl].",
)
@setting(AuditSettings, "settle_s", "--settle", metavar="SECONDS", default_from_file=True)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="The audit's YAML settings, as for `ctxaudit audit --config`.",
)
@click.option(
    "--memory-limit",
    default=AUDIT_MEMORY_LIMIT,
    show_default=True,
    help="DuckDB memory limit for the audit (--db only).",
)
@click.option(
    "--run",
    "run_id",
    type=click.IntRange(min=1),
    metavar="ID",
    help="Report this saved run of --db (e.g. a Spark audit saved with `audit --spark --save-db`) "
    "instead of auditing the last --since.",
)
def report(
    db, server, since_s, out_dir, fail_on, previous, history, settle_s, config_file, memory_limit, run_id
) -> None:
    """Audit the last --since of the store and write a report: the broken hops with cause and
    fix, what changed since the previous report, trends, the service graph and the sampling
    figures, as self-contained HTML, Markdown and JSON.

    As a CI gate, --fail-on thresholds set the exit code: 0 all passed, 3 one failed, 4 one
    could not be evaluated (1: runtime error, 2: bad usage).
    """
    from pathlib import Path

    from .report.command import ReportRequest, report_from_file, report_from_run, report_from_server
    from .report.gate import GateError, Threshold

    ctx = click.get_current_context()
    if server and ctx.get_parameter_source("db") is not click.core.ParameterSource.DEFAULT:
        raise click.UsageError("give --db or --server, not both")
    if server and run_id:
        raise click.UsageError("--run reports a run saved in --db; not with --server")
    try:
        thresholds = [Threshold.parse(t) for t in fail_on]
    except GateError as e:
        raise click.BadParameter(str(e), param_hint="--fail-on") from None
    try:
        settings = AuditSettings.load(config_file, settle_s=settle_s)
    except SettingsError as e:
        raise click.BadParameter(str(e), param_hint="--config") from None
    request = ReportRequest(
        Path(out_dir), since_s, settings, thresholds, Path(history) if history else None, previous
    )
    started = time.monotonic()

    def progress(step: str) -> None:
        click.echo(f"report: {step} ({time.monotonic() - started:.1f} s)", err=True)

    try:
        if server:
            click.echo(f"report: the server at {server} audits the last {since_s / 3600:g} h", err=True)
            result, written, code = report_from_server(request, server)
        elif run_id:
            result, written, code = report_from_run(request, db, run_id)
        else:
            result, written, code = report_from_file(request, db, memory_limit, progress)
    except (StoreError, ValueError, OSError) as e:
        _fail(str(e))
    f = result["figures"]
    health = "n/a" if f["context_health"] is None else f"{f['context_health']:.1%}"
    click.echo(
        f"report: {f['broken_hops']} broken hops, context health {health}, {f['findings']:,} findings; "
        f"wrote {', '.join(str(p) for p in written)}"
    )
    if result["comparison"]:
        n = result["comparison"]["counts"]
        click.echo(
            f"report: since the previous report: {n['new_broken_hops']} newly broken, "
            f"{n['fixed_hops']} fixed, "
            f"{n['worse_hops']} worse, {n['better_hops']} better"
        )
    from .report.build import verdicts

    for verdict in verdicts(result):
        click.echo(f"gate: {verdict.line()}")
    sys.exit(code)


@main.command()
@click.option(
    "--scenario",
    required=True,
    metavar="NAME|FILE",
    help="A scenario YAML file, or a bundled one by name (shop-small, shop-large).",
)
@click.option("--otlp", metavar="grpc://HOST:PORT", help="Send to this OTLP/gRPC endpoint (a running serve).")
@click.option("--db", metavar="PATH", help="Or write straight into this DuckDB file (no server may hold it).")
@click.option(
    "--truth", required=True, metavar="PATH", help="Ground truth, JSON Lines (gzip if it ends in .gz)."
)
@click.option("--seed", type=int, default=1, show_default=True, help="Same seed, same spans, same bytes.")
@click.option(
    "--spans", "max_spans", type=click.IntRange(min=1), help="Stop after exporting this many spans."
)
def simulate(scenario, otlp, db, truth, seed, max_spans) -> None:
    """Generate OTLP traffic from a scenario, with the ground truth of every span."""
    from .scenarios.model import ScenarioError, load_scenario
    from .scenarios.output import OtlpGrpcSender, SendError, TruthWriter
    from .scenarios.simulate import Simulator

    if (otlp is None) == (db is None):
        raise click.UsageError("give exactly one of --otlp grpc://HOST:PORT and --db PATH")
    if otlp is not None and not otlp.startswith("grpc://"):
        raise click.BadParameter("use the form grpc://HOST:PORT", param_hint="--otlp")
    try:
        sim = Simulator(load_scenario(scenario), seed=seed)
    except ScenarioError as e:
        _fail(str(e))
    sink = OtlpGrpcSender(otlp.removeprefix("grpc://")) if otlp else DbSink(db)
    truth_out = TruthWriter(truth)
    last = time.monotonic()
    try:
        for request, records in sim.run(max_spans):
            sink.send(request.SerializeToString())
            truth_out.write(records)
            if time.monotonic() - last > 2:
                last = time.monotonic()
                click.echo(
                    f"simulate: {sim.exported:,} spans exported of {sim.generated:,} generated", err=True
                )
    except (SendError, StoreError) as e:
        _fail(str(e))
    finally:
        truth_out.close()
        sink.close()
    click.echo(
        f"simulate: {sim.exported:,} spans exported ({sim.generated:,} generated, the rest unsampled); "
        f"truth in {truth}"
    )


class DbSink:
    """Export requests straight into a DuckDB file, through the receivers' own conversion
    (for `simulate --db`, and the benchmarks and tests that build stores)."""

    def __init__(self, path: str):
        from collector_ext.ingest import decode_batch

        from .store.writer import SpanStore, SpanWriter

        self._decode = decode_batch
        self._writer = SpanWriter(SpanStore(path))

    def send(self, body: bytes) -> None:
        batch = self._decode(body, "application/x-protobuf", False, len(body))
        self._writer.submit(batch).result()

    def close(self) -> None:
        self._writer.close()


@main.command()
@click.option(
    "--db",
    default="demo-data/ctxaudit-demo.duckdb",
    show_default=True,
    metavar="PATH",
    help="DuckDB file for the demo (created; an existing one is replaced).",
)
@click.option(
    "--truth",
    default="demo-data/ground-truth.jsonl",
    show_default=True,
    metavar="PATH",
    help="Where the fleet writes the ground truth (JSON Lines).",
)
@click.option(
    "--seconds", type=click.FloatRange(min=1), default=60, show_default=True, help="How long to drive load."
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0.1),
    default=10,
    show_default=True,
    help="Requests/s to the frontend.",
)
def demo(db: str, truth: str, seconds: float, rate: float) -> None:
    """Run `ctxaudit serve` and the demo fleet against it, then audit what was stored."""
    from pathlib import Path

    from .audit_job import audit_store, summary_lines
    from .demo import run_demo

    try:
        run_demo(db, truth, seconds, rate)
        # serve has stopped and drained: every span is in, nothing needs to settle
        result = audit_store(
            db,
            AuditSettings.load(None, settle_s=0),
            progress=lambda step: click.echo(f"audit: {step}", err=True),
        )
    except (StoreError, RuntimeError) as e:
        _fail(str(e))
    click.echo("")
    ctx = click.get_current_context()
    ctx.invoke(stats, db=db, as_json=False)
    click.echo("")
    for line in summary_lines(result) if result else ["audit: no spans were stored"]:
        click.echo(line)
    out = Path(db).parent / "report"
    try:
        from .report.command import ReportRequest, report_from_file

        settings = AuditSettings.load(None, settle_s=0)
        since = Duration().convert(REPORT_SINCE, None, None)
        report_from_file(ReportRequest(out, since, settings, []), db, AUDIT_MEMORY_LIMIT, lambda step: None)
        click.echo(f"\nreport: {out / 'report.html'} (and report.md, report.json)")
    except (StoreError, OSError) as e:
        click.echo(f"report: not written: {e}", err=True)
    click.echo(
        f"\nnext: ctxaudit ui --db {db};  ctxaudit report --db {db} --out {out};  "
        f"ctxaudit audit --db {db} --all --json | less"
    )


@main.command("import")
@click.option(
    "--db", default=DEFAULT_DB, show_default=True, metavar="PATH", help="DuckDB file to create or add to."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jaeger", "zipkin", "otlp-json"]),  # audit.capture.FORMATS
    default=None,
    help="The files' format [default: detected from each file's content].",
)
@click.option("--memory-limit", default="512MB", show_default=True, help="DuckDB memory limit.")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def import_captures(db: str, fmt: str | None, memory_limit: str, files: tuple[str, ...]) -> None:
    """Load trace captures (Jaeger JSON, Zipkin v2 JSON, OTLP/JSON lines; gzip or not) into a store.

    Spans go through the receivers' own decoding; spans stored already are skipped, so importing
    a file twice stores nothing new. At a bad file: what was read before it stays, exit 1."""
    from collector_ext.ingest import decode_batch

    from .capture import BadCapture
    from .import_job import Importer
    from .store.writer import SpanStore, SpanWriter

    def decode(body: bytes, content_type: str):
        return decode_batch(body, content_type, False, len(body))

    try:
        writer = SpanWriter(SpanStore(db, memory_limit=memory_limit))
    except StoreError as e:
        _fail(str(e))
    importer = Importer(writer, decode, progress=lambda line: click.echo(line, err=True))
    try:
        importer.run(files, fmt)
    except (BadCapture, StoreError) as e:
        click.echo(importer.stats.summary() + "; stopped at the error below (what was read before it stays)")
        _fail(str(e))
    finally:
        writer.close()
    click.echo(importer.stats.summary())


@main.command()
@click.option("--db", default=DEFAULT_DB, show_default=True, metavar="PATH", help="DuckDB file to export.")
@_SERVER
@click.option(
    "--parquet",
    "out",
    metavar="DIR",
    help="Folder of the export (shared by every shard): DIR/spans, DIR/links, DIR/_shards.",
)
@click.option(
    "--otlp",
    metavar="URL",
    help="Instead: send each stitched hop of an audit run as a span into its probable parent's trace, to "
    "this OTLP endpoint (grpc://HOST:4317, http://HOST:4318; docs/getting-data-out.md).",
)
@click.option(
    "--since",
    type=Time(),
    help="First hour to export, ISO 8601 [default: the first span]; with --otlp: only hops whose orphan "
    "starts there or later.",
)
@click.option("--until", type=Time(), help="Export up to here, ISO 8601 [default: past the newest span].")
@click.option(
    "--shard",
    default="0",
    show_default=True,
    metavar="NAME",
    help="This store's name among the shards: its files go under shard=NAME.",
)
@click.option(
    "--run",
    "run_id",
    type=click.IntRange(min=1),
    metavar="ID",
    help="With --otlp: the audit run [default: the last].",
)
@click.option(
    "--min-confidence",
    type=click.FloatRange(0, 1),
    metavar="C",
    help="With --otlp: only hops whose probable parent has this confidence or more "
    "[default: every one the run named].",
)
@click.option(
    "--state",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="With --otlp: what each target took already, so nothing is sent twice "
    "[default: DB + '.otlp-export', or ctxaudit-otlp-export in the current folder with --server].",
)
@click.option(
    "--otlp-timeout",
    type=click.FloatRange(min=0.1),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="With --otlp: how long a batch is retried (with backoff) before the export stops and says so.",
)
def export(db, server, out, otlp, since, until, shard, run_id, min_confidence, state, otlp_timeout) -> None:
    """Export the store: its spans as Parquet (--parquet), or its stitched hops into a trace backend (--otlp).

    With --parquet DIR: DB's spans and links (or, with --server, those of the store a running
    serve holds) as Hive-partitioned Parquet (shard, date, hour of span start), in whole hours.
    Exporting hours again replaces them (docs/scale.md).

    With --otlp URL: show an audit run's stitched hops in your own trace backend (Jaeger,
    Tempo...): one span per stitched orphan, in its probable parent's trace, linking to the orphan.
    Exporting the same run again sends nothing new."""
    if (out is None) == (otlp is None):
        raise click.UsageError("give exactly one of --parquet DIR and --otlp URL")
    if otlp:
        _export_otlp(db, server, otlp, since, run_id, min_confidence, state, otlp_timeout)
        return
    from .store.parquet import StreamSource, export_spans, export_store

    progress = lambda s: click.echo(f"export: {s}", err=True)  # noqa: E731
    try:
        if server:  # the server holds the file: its read API streams the rows (GET /v1/export)
            remote = _reader(db, server)
            source = StreamSource(server, lambda: _extent(remote.time_range()), remote.export_batches)
            manifest = export_spans(
                source, out, shard=shard, since_ns=since, until_ns=until, progress=progress
            )
        else:
            manifest = export_store(db, out, shard=shard, since_ns=since, until_ns=until, progress=progress)
    except StoreError as e:
        _fail(str(e))
    done = manifest["last_export"]
    click.echo(f"exported {done['spans']:,} spans in {done['hours']} hour(s) to {out} (shard={shard})")


def _extent(time_range: dict) -> tuple[int | None, int | None]:
    return time_range["first_start_ns"], time_range["last_start_ns"]


def _export_otlp(db, server, url, since, run_id, min_confidence, state, timeout_s) -> None:
    """`export --otlp`: the run's stitched hops as spans in their parents' traces."""
    from .otlp_export import ExportError, ExportRecord, OtlpTarget, StitchExporter

    try:
        target = OtlpTarget(url, timeout_s=timeout_s)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--otlp") from None
    try:
        reader = _reader(db, server)
        record = ExportRecord(state or ("ctxaudit-otlp-export" if server else f"{db}.otlp-export"))
    except (StoreError, ExportError) as e:
        _fail(str(e))
    try:
        stats = StitchExporter(reader, target, record).export_run(
            run_id,
            min_confidence=min_confidence,
            since_ns=since,
            progress=lambda line: click.echo(f"export: {line}", err=True),
        )
    except (StoreError, ExportError) as e:
        _fail(str(e))
    finally:
        target.close()
        record.close()
        reader.close()
    if stats.run_id is None and run_id is not None:
        _fail(f"no audit run {run_id} in {server or db}")
    click.echo(stats.summary(url))


if __name__ == "__main__":
    main()
