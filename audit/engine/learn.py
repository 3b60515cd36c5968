"""What the audit learns from the calls that did propagate: which addresses belong to which
service, each edge's clock skew and network gaps, each topic's consumer lag. Everything here
is computed from aggregates in DuckDB and is small: a few rows per service, edge or topic."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import duckdb
import numpy as np

from .config import AuditConfig, AuditWindow
from .timing import LagModel, LogNormal, StudentT, SyncModel

_NS_PER_MS = 1_000_000
_MIN_PAIRS = 20  # fewer propagated calls than this on an edge: use a wider pool's model
_DOMINANT = 0.9  # an address belongs to a service when this share of its propagated calls land there


# at most 5,000 calls per edge, drawn from the whole window (by a hash): the first 5,000 stored
# are its first minutes, whose legs may not be the window's (Online Boutique's first minutes had
# a 94 ms median overhead where the window's is 6 ms)
_SYNC_GAPS = """
SELECT caller, callee, protocol, d_start, d_end FROM (
  SELECT *, row_number() OVER (PARTITION BY caller, callee, protocol ORDER BY hash(exit_rid), exit_rid) AS i
  FROM hops WHERE NOT via_link AND protocol IN ('http', 'grpc', 'rpc', 'none')) WHERE i <= 5000
"""
_LAGS = """
SELECT caller, callee, lag FROM (
  SELECT *, row_number() OVER (PARTITION BY caller, callee ORDER BY exit_rid) AS i
  FROM hops WHERE protocol = 'messaging') WHERE i <= 5000
"""
_PROPAGATED_ADDRESSES = """
SELECT e.server_address, e.server_port, h.callee, count(*)
FROM hops h JOIN exits e ON e.rid = h.exit_rid
WHERE NOT h.via_link AND e.server_address IS NOT NULL GROUP BY ALL
"""
_SELF_ADDRESSES = """
SELECT peer_host(server_address, url_full) AS host, peer_port(server_port, server_address, url_full),
  service_name,
       count(*)
FROM spans WHERE start_ns BETWEEN $lo AND $hi AND kind = 'SERVER' AND host IS NOT NULL GROUP BY ALL
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
# Per exit operation (caller service, exit span name, protocol): the services, and their
# operations, its propagated calls landed in. Client spans that name no target (no URL, address
# or peer.service, as the OTel Java agent's `HTTP GET` spans in TrainTicket) get their callee
# from these.
_OPERATION_CALLEES = """
SELECT e.service, e.name, e.protocol, h.callee, h.entry_name, count(*)
FROM hops h JOIN exits e ON e.rid = h.exit_rid
WHERE NOT h.via_link AND e.protocol NOT IN ('messaging', 'db') AND e.db_system IS NULL GROUP BY ALL
"""
_OPERATION_MIN_CALLS = 20  # propagated calls of an operation before its callee is trusted
_OPERATION_DOMINANT = 0.95  # ... and the share of them that must land in that one service
# An operation whose calls spread over several services: each of them with at least this share
# of its calls is a candidate target, at most this many (the most called first)
_SPREAD_MIN_SHARE = 0.01
_SPREAD_MAX_CALLEES = 8
_PROPAGATED_CALLEE_OPS = """
SELECT DISTINCT c.service, c.name FROM hops h JOIN w c ON c.rid = h.entry_rid
"""


@dataclass(frozen=True)
class Target:
    """Where an exit goes: an instrumented service, or a virtual node for a peer without spans."""

    name: str
    instrumented: bool
    how: str  # the evidence: "consumer", "peer.service", "address", "server address", "rpc.service", "peer"


@dataclass(frozen=True)
class OperationCallees:
    """Where an exit operation's propagated calls went, when no one service dominates:
    propagated calls per callee service, and per (callee service, callee span name)."""

    calls: int  # the operation's propagated calls, every callee counted
    services: dict[str, int]  # the candidate callees (at least _SPREAD_MIN_SHARE of the calls)
    operations: dict[tuple[str, str], int]  # (callee, its span name) -> calls, of those callees

    def share(self, callee: str) -> float:
        """The prior that one of the operation's calls went to `callee`, among the candidates."""
        return self.services[callee] / sum(self.services.values())


@dataclass
class Learned:
    callee_services: set[str]  # services with SERVER/CONSUMER spans
    propagated_callee_ops: set[tuple[str, str]]  # (service, span name) that some caller propagated to
    addresses: dict[tuple[str, int | None], str] = field(default_factory=dict)  # from propagated calls
    self_addresses: dict[tuple[str, int | None], str] = field(default_factory=dict)  # servers' own
    rpc_services: dict[str, str] = field(default_factory=dict)
    consumers: dict[str, list[str]] = field(default_factory=dict)  # destination -> consumer services
    # (caller, exit span name, protocol) -> (callee, propagated calls): where that operation's
    # propagated calls go, for its exits that name no target
    operation_targets: dict[tuple[str, str, str], tuple[str, int]] = field(default_factory=dict)
    # the operations whose propagated calls spread over several callees: their unpaired exits
    # may have gone to any of them (targets.py, "spread")
    operation_callees: dict[tuple[str, str, str], OperationCallees] = field(default_factory=dict)
    sync_models: dict[tuple[str, str, str], SyncModel] = field(default_factory=dict)
    callee_models: dict[tuple[str, str], SyncModel] = field(default_factory=dict)  # pooled, widened
    protocol_models: dict[str, SyncModel] = field(default_factory=dict)  # pooled, widened
    lag_models: dict[tuple[str, str], LagModel] = field(default_factory=dict)
    default_sync: SyncModel = None  # type: ignore[assignment]
    default_lag: LagModel = None  # type: ignore[assignment]

    def resolve(
        self,
        protocol: str,
        address: str | None,
        port: int | None,
        peer_service: str | None,
        rpc_service: str | None,
        destination: str | None,
        db_system: str | None,
    ) -> list[Target]:
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

    def sync_model(self, caller: str, callee: str, protocol: str) -> SyncModel:
        return (
            self.sync_models.get((caller, callee, protocol))
            or self.callee_models.get((callee, protocol))
            or self.protocol_models.get(protocol)
            or self.default_sync
        )

    def sync_reach_ns(self, default_skew_ns: float) -> float:
        """How far outside its client span any server span may plausibly start or end."""
        return max([default_skew_ns] + [m.reach_ns() for m in self.sync_models.values()])

    def lag_reach_ns(self) -> float:
        """The longest plausible producer-to-consumer lag on any topic."""
        return max([self.default_lag.reach_ns()] + [m.reach_ns() for m in self.lag_models.values()])

    def lag_model(self, caller: str, callee: str) -> LagModel:
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


def operation_targets(rows: list[tuple]) -> dict[tuple[str, str, str], tuple[str, int]]:
    """(caller, span name, protocol, callee, n) rows -> the callee of each exit operation whose
    propagated calls (at least _OPERATION_MIN_CALLS) land in one service (_OPERATION_DOMINANT)."""
    by_op: dict[tuple, Counter] = defaultdict(Counter)
    for caller, name, protocol, callee, n in rows:
        by_op[(caller, name, protocol)][callee] += n
    out = {}
    for op, counts in by_op.items():
        callee, n = counts.most_common(1)[0]
        total = sum(counts.values())
        if total >= _OPERATION_MIN_CALLS and n >= _OPERATION_DOMINANT * total:
            out[op] = (callee, total)
    return out


def operation_callees(rows: list[tuple]) -> dict[tuple[str, str, str], OperationCallees]:
    """(caller, span name, protocol, callee, callee span name, n) rows -> the candidate callees of
    each exit operation with at least _OPERATION_MIN_CALLS propagated calls that no one service
    dominates (`operation_targets` resolves those): every callee with at least _SPREAD_MIN_SHARE
    of the calls, the _SPREAD_MAX_CALLEES most called."""
    by_op: dict[tuple, Counter] = defaultdict(Counter)
    for caller, name, protocol, callee, callee_name, n in rows:
        by_op[(caller, name, protocol)][(callee, callee_name)] += n
    out = {}
    for op, counts in by_op.items():
        services: Counter = Counter()
        for (callee, _), n in counts.items():
            services[callee] += n
        total = sum(services.values())
        if total < _OPERATION_MIN_CALLS or services.most_common(1)[0][1] >= _OPERATION_DOMINANT * total:
            continue
        kept = dict(
            [(s, n) for s, n in services.most_common(_SPREAD_MAX_CALLEES) if n >= _SPREAD_MIN_SHARE * total]
        )
        if len(kept) >= 2:
            ops = {k: n for k, n in counts.items() if k[0] in kept}
            out[op] = OperationCallees(total, kept, ops)
    return out


def learn(con: duckdb.DuckDBPyConnection, window: AuditWindow, config: AuditConfig) -> Learned:
    rng = {"lo": window.read_from_ns, "hi": window.read_to_ns}
    services = con.execute(_SERVICES).fetchall()
    learned = Learned(
        callee_services={s for s, callee in services if callee},
        propagated_callee_ops=set(con.execute(_PROPAGATED_CALLEE_OPS).fetchall()),
    )
    learned.addresses = _dominant(con.execute(_PROPAGATED_ADDRESSES).fetchall())
    learned.self_addresses = _dominant(con.execute(_SELF_ADDRESSES, rng).fetchall())
    learned.rpc_services = {
        k: v
        for (k, _), v in _dominant(
            [(r, None, s, n) for r, s, n in con.execute(_RPC_SERVICES, rng).fetchall()]
        ).items()
    }
    consumers: dict[str, list[str]] = defaultdict(list)
    for destination, service, _ in con.execute(_CONSUMERS, rng).fetchall():
        consumers[destination].append(service)
    learned.consumers = {d: sorted(s) for d, s in consumers.items()}
    by_callee_op = con.execute(_OPERATION_CALLEES).fetchall()
    learned.operation_targets = operation_targets([(*r[:4], r[5]) for r in by_callee_op])
    learned.operation_callees = operation_callees(by_callee_op)
    _learn_timing(con, learned, config)
    return learned


def _learn_timing(con: duckdb.DuckDBPyConnection, learned: Learned, config: AuditConfig) -> None:
    skew_ns = config.default_skew_ms * _NS_PER_MS
    rows = con.execute(_SYNC_GAPS).fetchnumpy()
    by_edge: dict[tuple, list[int]] = defaultdict(list)
    for i, key in enumerate(zip(rows["caller"], rows["callee"], rows["protocol"])):
        by_edge[key].append(i)
    d1_all, d2_all = rows["d_start"].astype(float), rows["d_end"].astype(float)

    def fit(idx: list[int], source: str) -> SyncModel | None:
        return SyncModel.fit(d1_all[idx], d2_all[idx], source) if len(idx) >= _MIN_PAIRS else None

    by_callee: dict[tuple, list[int]] = defaultdict(list)
    by_protocol: dict[str, list[int]] = defaultdict(list)
    for (caller, callee, protocol), idx in by_edge.items():
        if (m := fit(idx, "edge")) is not None:
            learned.sync_models[(caller, callee, protocol)] = m
        by_callee[(callee, protocol)] += idx
        by_protocol[protocol] += idx
    for key, idx in by_callee.items():
        if (m := fit(idx, "callee")) is not None:
            learned.callee_models[key] = m.pooled(skew_ns, "callee")
    for protocol, idx in by_protocol.items():
        if (m := fit(idx, "protocol")) is not None:
            learned.protocol_models[protocol] = m.pooled(skew_ns, "protocol")
    everything = fit(list(range(len(d1_all))), "default")
    learned.default_sync = (
        everything.pooled(skew_ns, "default")
        if everything
        else SyncModel(LogNormal(math.log(2 * _NS_PER_MS), 1.5), StudentT(0.0, skew_ns), 0, "default")
    )

    lags: dict[tuple, list[float]] = defaultdict(list)
    for caller, callee, lag in con.execute(_LAGS).fetchall():
        lags[(caller, callee)].append(lag)
    for key, values in lags.items():
        if len(values) >= _MIN_PAIRS:
            learned.lag_models[key] = LagModel(
                LogNormal.fit(np.asarray(values, dtype=float)), len(values), "edge"
            )
    pooled = [v for values in lags.values() for v in values]
    learned.default_lag = (
        LagModel(LogNormal.fit(np.asarray(pooled, dtype=float)), len(pooled), "protocol").pooled("protocol")
        if len(pooled) >= _MIN_PAIRS
        else LagModel(LogNormal(math.log(100 * _NS_PER_MS), 2.0), 0, "default")
    )
