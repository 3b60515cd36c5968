"""What the audit learns from the calls that did propagate: which addresses belong to which
service, each edge's clock skew and network gaps, each topic's consumer lag. Everything here
is computed from aggregates in DuckDB and is small: a few rows per service, edge or topic."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import duckdb

from .config import AuditConfig, AuditWindow

SYNC_PROTOCOLS = ("http", "grpc", "rpc", "none")
_NS_PER_MS = 1_000_000
_MIN_PAIRS = 20  # fewer propagated calls than this on an edge: use a wider pool's model
_DOMINANT = 0.9  # an address belongs to a service when this share of its propagated calls land there


@dataclass(frozen=True)
class GapModel:
    """Log-normal gaps between a client span and the server span it contains (request leg,
    response leg), after removing the edge's clock skew; or a consumer's lag after the produce."""

    skew_ns: float  # callee clock minus caller clock
    mu: float  # of log(gap in ns)
    sigma: float
    spread_ns: float  # how far a gap plausibly reaches (its 99.9th percentile)
    pairs: int
    source: str  # "edge", "callee", "protocol" or "default": how specific the model is

    def nll(self, gap_ns):
        """Negative log-likelihood of gaps (numpy array or float), in nats, floored at 1 µs."""
        import numpy as np

        g = np.maximum(gap_ns, 1_000.0)
        z = (np.log(g) - self.mu) / self.sigma
        penalty = np.where(gap_ns < 0, (gap_ns / (self.spread_ns + 1.0)) ** 2 * 50.0, 0.0)
        return np.log(g) + math.log(self.sigma * math.sqrt(2 * math.pi)) + 0.5 * z * z + penalty


def _model(rows: list[tuple], source: str, skew_ns: float | None = None) -> GapModel | None:
    """From (gap_ns,) samples: fit a log-normal robustly (median and MAD of the log)."""
    gaps = [g for (g,) in rows if g is not None]
    if len(gaps) < _MIN_PAIRS:
        return None
    logs = sorted(math.log(max(g, 1_000.0)) for g in gaps)
    mu = logs[len(logs) // 2]
    mad = sorted(abs(x - mu) for x in logs)[len(logs) // 2]
    sigma = max(1.4826 * mad, 0.25)
    spread = math.exp(mu + 3.1 * sigma)
    return GapModel(skew_ns or 0.0, mu, sigma, spread, len(gaps), source)


_SKEW = """
SELECT caller, callee, protocol, median((d_start - d_end) / 2.0), count(*)
FROM hops WHERE NOT via_link AND protocol IN ('http', 'grpc', 'rpc', 'none') GROUP BY ALL
"""
_GAPS = """
SELECT h.caller, h.callee, h.protocol, g
FROM (SELECT *, row_number() OVER (PARTITION BY caller, callee, protocol ORDER BY exit_rid) AS i
      FROM hops WHERE NOT via_link AND protocol IN ('http', 'grpc', 'rpc', 'none')) h
JOIN skews s USING (caller, callee, protocol),
     unnest([h.d_start - s.skew, h.d_end + s.skew]) AS t(g)
WHERE h.i <= 5000
"""
_LAGS = """
SELECT caller, callee, lag FROM (
  SELECT *, row_number() OVER (PARTITION BY caller, callee ORDER BY exit_rid) AS i
  FROM hops WHERE protocol = 'messaging') WHERE i <= 5000
"""
_PROPAGATED_ADDRESSES = """
SELECT s.server_address, s.server_port, h.callee, count(*)
FROM hops h JOIN spans s ON s.rowid = h.exit_rid
WHERE NOT h.via_link AND s.server_address IS NOT NULL GROUP BY ALL
"""
_SELF_ADDRESSES = """
SELECT server_address, server_port, service_name, count(*) FROM spans
WHERE start_ns BETWEEN $lo AND $hi AND kind = 'SERVER' AND server_address IS NOT NULL GROUP BY ALL
"""
_RPC_SERVICES = """
SELECT rpc_service, service_name, count(*) FROM spans
WHERE start_ns BETWEEN $lo AND $hi AND kind = 'SERVER' AND rpc_service IS NOT NULL GROUP BY ALL
"""
_CONSUMERS = """
SELECT messaging_destination, service_name, count(*) FROM spans
WHERE start_ns BETWEEN $lo AND $hi AND kind = 'CONSUMER' AND messaging_destination IS NOT NULL GROUP BY ALL
"""
_SERVICES = "SELECT service, bool_or(kind IN ('SERVER', 'CONSUMER')) FROM w GROUP BY ALL"
_PROPAGATED_CALLEE_OPS = """
SELECT DISTINCT c.service, c.name FROM hops h JOIN w c ON c.rid = h.entry_rid
"""


@dataclass(frozen=True)
class Target:
    """Where an exit goes: an instrumented service, or a virtual node for a peer without spans."""

    name: str
    instrumented: bool
    how: str  # the evidence: "consumer", "peer.service", "address", "server address", "rpc.service", "peer"


@dataclass
class Learned:
    services: set[str]  # every service.name in the window
    callee_services: set[str]  # services with SERVER/CONSUMER spans
    propagated_callee_ops: set[tuple[str, str]]  # (service, span name) that some caller propagated to
    addresses: dict[tuple[str, int | None], str] = field(default_factory=dict)  # from propagated calls
    self_addresses: dict[tuple[str, int | None], str] = field(default_factory=dict)  # servers' own
    rpc_services: dict[str, str] = field(default_factory=dict)
    consumers: dict[str, list[str]] = field(default_factory=dict)  # destination -> consumer services
    sync_models: dict[tuple[str, str, str], GapModel] = field(default_factory=dict)
    callee_models: dict[tuple[str, str], GapModel] = field(default_factory=dict)
    protocol_models: dict[str, GapModel] = field(default_factory=dict)
    lag_models: dict[tuple[str, str], GapModel] = field(default_factory=dict)
    default_sync: GapModel = None  # type: ignore[assignment]
    default_lag: GapModel = None  # type: ignore[assignment]

    def resolve(self, protocol: str, address: str | None, port: int | None, peer_service: str | None,
                rpc_service: str | None, destination: str | None, db_system: str | None) -> list[Target]:  # fmt: skip
        """The callee(s) of an exit. Messages go to every consumer group of their destination."""
        if protocol == "messaging":
            if destination and destination in self.consumers:
                return [Target(s, True, "consumer") for s in self.consumers[destination]]
            return [Target(f"topic {destination or '?'}", False, "peer")]
        if db_system is not None or protocol == "db":
            return [Target(address or db_system or "database", False, "peer")]
        if peer_service and peer_service in self.callee_services:
            return [Target(peer_service, True, "peer.service")]
        if address is not None:
            for table, how in ((self.addresses, "address"), (self.self_addresses, "server address")):
                hit = table.get((address, port)) or (table.get((address, None)) if port is None else None)
                if hit:
                    return [Target(hit, True, how)]
        if rpc_service and rpc_service in self.rpc_services:
            return [Target(self.rpc_services[rpc_service], True, "rpc.service")]
        peer = address if port is None or address is None else f"{address}:{port}"
        return [Target(peer or peer_service or "unknown peer", False, "peer")]

    def sync_model(self, caller: str, callee: str, protocol: str) -> GapModel:
        return (self.sync_models.get((caller, callee, protocol)) or self.callee_models.get((callee, protocol))
                or self.protocol_models.get(protocol) or self.default_sync)  # fmt: skip

    def lag_model(self, caller: str, callee: str) -> GapModel:
        return self.lag_models.get((caller, callee)) or self.default_lag


def _dominant(rows: list[tuple]) -> dict[tuple, str]:
    """(address, port, service, n) rows -> the service an address belongs to, when one dominates.
    A port-less entry is kept too, for exits that name no port."""
    by_key: dict[tuple, Counter] = defaultdict(Counter)
    for address, port, service, n in rows:
        by_key[(address, port)][service] += n
        by_key[(address, None)][service] += n
    out = {}
    for key, counts in by_key.items():
        service, n = counts.most_common(1)[0]
        if n >= _DOMINANT * sum(counts.values()):
            out[key] = service
    return out


def learn(con: duckdb.DuckDBPyConnection, window: AuditWindow, config: AuditConfig) -> Learned:
    rng = {"lo": window.read_from_ns, "hi": window.read_to_ns}
    services = con.execute(_SERVICES).fetchall()
    learned = Learned(
        services={s for s, _ in services},
        callee_services={s for s, callee in services if callee},
        propagated_callee_ops=set(con.execute(_PROPAGATED_CALLEE_OPS).fetchall()),
    )
    learned.addresses = _dominant(con.execute(_PROPAGATED_ADDRESSES).fetchall())
    learned.self_addresses = _dominant(con.execute(_SELF_ADDRESSES, rng).fetchall())
    learned.rpc_services = {k: v for (k, _), v in _dominant(
        [(r, None, s, n) for r, s, n in con.execute(_RPC_SERVICES, rng).fetchall()]).items()}  # fmt: skip
    consumers: dict[str, list[str]] = defaultdict(list)
    for destination, service, _ in con.execute(_CONSUMERS, rng).fetchall():
        consumers[destination].append(service)
    learned.consumers = {d: sorted(s) for d, s in consumers.items()}
    _learn_timing(con, learned, config)
    return learned


def _learn_timing(con: duckdb.DuckDBPyConnection, learned: Learned, config: AuditConfig) -> None:
    con.execute("CREATE OR REPLACE TEMP TABLE skews AS SELECT caller, callee, protocol, skew, n FROM ("
                + _SKEW + ") t(caller, callee, protocol, skew, n)")  # fmt: skip
    skews = {(a, b, p): s for a, b, p, s, _ in con.execute("SELECT * FROM skews").fetchall()}
    gaps: dict[tuple, list] = defaultdict(list)
    for caller, callee, protocol, g in con.execute(_GAPS).fetchall():
        gaps[(caller, callee, protocol)].append((g,))
    by_callee: dict[tuple, list] = defaultdict(list)
    by_protocol: dict[str, list] = defaultdict(list)
    for (caller, callee, protocol), rows in gaps.items():
        model = _model(rows, "edge", skews[(caller, callee, protocol)])
        if model:
            learned.sync_models[(caller, callee, protocol)] = model
        by_callee[(callee, protocol)].extend(rows)
        by_protocol[protocol].extend(rows)
    # a callee's skew is only known per edge; pooled models keep skew 0 and widen by the default
    for key, rows in by_callee.items():
        if (m := _model(rows, "callee")) is not None:
            learned.callee_models[key] = m
    for protocol, rows in by_protocol.items():
        if (m := _model(rows, "protocol")) is not None:
            learned.protocol_models[protocol] = m
    all_sync = [r for rows in by_protocol.values() for r in rows]
    learned.default_sync = _model(all_sync, "default") or GapModel(
        0.0, math.log(2 * _NS_PER_MS), 1.5, config.default_skew_ms * _NS_PER_MS, 0, "default")  # fmt: skip
    lags: dict[tuple, list] = defaultdict(list)
    for caller, callee, lag in con.execute(_LAGS).fetchall():
        lags[(caller, callee)].append((lag,))
    for key, rows in lags.items():
        if (m := _model(rows, "edge")) is not None:
            learned.lag_models[key] = m
    all_lags = [r for rows in lags.values() for r in rows]
    learned.default_lag = _model(all_lags, "protocol") or GapModel(
        0.0, math.log(100 * _NS_PER_MS), 2.0, config.default_max_lag_s * 1e9, 0, "default")  # fmt: skip
