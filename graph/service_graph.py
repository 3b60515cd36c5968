"""The service graph of one audit run, in two views, and its exports.

- observed: what a trace backend shows. Calls appear only where the context propagated, and
  every fragment's root hangs off a virtual "(entry)" node, as if users called that service.
- repaired: what really calls what. Every call the callers' exits made, including the ones
  that lost context, with how many were dropped and stitched; "(entry)" keeps only real entry
  points and orphans whose caller could not be found.

Nodes carry `kind`: service, database/peer (no spans of its own) or entry. Edges carry, per
protocol: calls, propagated, dropped, stitched, propagation_rate.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import networkx as nx

from audit.contract.figures import propagation_rate

ENTRY = "(entry)"


def _add_node(g: nx.DiGraph, name: str, kind: str) -> None:
    if name not in g:
        g.add_node(name, kind=kind)


def _merge(g: nx.DiGraph, a: str, b: str, protocol: str, **counts) -> None:
    """Edges are keyed by (caller, callee); several protocols on one pair are summed, and listed."""
    if g.has_edge(a, b):
        data = g.edges[a, b]
        for k, v in counts.items():
            data[k] = data.get(k, 0) + v
        data["protocols"] = ",".join(sorted(set(data["protocols"].split(",")) | {protocol}))
    else:
        g.add_edge(a, b, protocols=protocol, **counts)
    data = g.edges[a, b]
    if "calls" in data:
        data["dropped"] = data["calls"] - data["propagated"]
        rate = propagation_rate(data["propagated"], data["calls"])
        if rate is None:  # no stored call: no rate (GraphML has no null)
            data.pop("propagation_rate", None)
        else:
            data["propagation_rate"] = round(rate, 4)


def build_graphs(edges: Iterable[dict], roots: dict[str, dict[str, int]]) -> tuple[nx.DiGraph, nx.DiGraph]:
    """`edges`: the audit's edge objects (caller, callee, protocol, callee_instrumented, calls,
    propagated, stitched). `roots`: per service, {"entry": n, "orphan": n, "orphan_unattributed": n}.
    Returns (observed, repaired)."""
    edges = list(edges)
    observed, repaired = nx.DiGraph(view="observed"), nx.DiGraph(view="repaired")
    for g in (observed, repaired):
        _add_node(g, ENTRY, "entry")
    for e in edges:
        callee_kind = (
            "service" if e["callee_instrumented"] else ("database" if e["protocol"] == "db" else "peer")
        )
        for g in (observed, repaired):
            _add_node(g, e["caller"], "service")
            _add_node(g, e["callee"], callee_kind)
        if e["propagated"]:
            _merge(
                observed,
                e["caller"],
                e["callee"],
                e["protocol"],
                calls=e["propagated"],
                propagated=e["propagated"],
                stitched=0,
            )
        _merge(
            repaired,
            e["caller"],
            e["callee"],
            e["protocol"],
            calls=e["calls"],
            propagated=e["propagated"],
            stitched=e["stitched"],
        )
    for service, n in roots.items():
        for g in (observed, repaired):
            _add_node(g, service, "service")
        fragments = n.get("entry", 0) + n.get("orphan", 0)
        if fragments:  # every root looks like an entry in a trace backend
            _merge(observed, ENTRY, service, "entry", calls=fragments, propagated=fragments, stitched=0)
        real = n.get("entry", 0) + n.get("orphan_unattributed", 0)
        if real:
            _merge(repaired, ENTRY, service, "entry", calls=real, propagated=real, stitched=0)
    return observed, repaired


def false_edges(observed: nx.DiGraph, repaired: nx.DiGraph) -> list[tuple[str, str]]:
    """Edges a trace backend shows that do not exist: "(entry)" -> a service no user calls."""
    return sorted((a, b) for a, b in observed.edges if not repaired.has_edge(a, b))


def to_node_link_json(g: nx.DiGraph) -> str:
    return json.dumps(nx.node_link_data(g, edges="edges"), indent=1, sort_keys=True)


def to_dot(g: nx.DiGraph, highlight: tuple[str, str] | None = None) -> str:
    """Graphviz DOT; broken edges are red and labelled with their propagation rate; the
    `highlight` edge (caller, callee), if any, is drawn bold."""
    h = nx.DiGraph(**g.graph)
    for n, data in g.nodes(data=True):
        shape = {"entry": "point", "database": "cylinder", "peer": "box"}.get(data["kind"], "ellipse")
        h.add_node(_quote(n), shape=shape, kind=data["kind"], label=_label(n))
    for a, b, data in g.edges(data=True):
        label = f"{data['protocols']} {data['calls']}"
        attrs = {"label": _label(label)}
        if data.get("dropped"):
            attrs |= {"color": "red", "label": _label(f"{label}, {data['propagation_rate']:.0%} propagated")}
        if (a, b) == highlight:
            attrs |= {"penwidth": 4, "fontcolor": "blue"}
        h.add_edge(_quote(a), _quote(b), **attrs)
    return nx.nx_pydot.to_pydot(h).to_string()


def _quote(s: str) -> str:
    """A DOT ID: always quoted, so a name cannot end the statement or add attributes."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _label(s: str) -> str:
    """A label that reads as the name does. Names come from span data: quoted (never
    an HTML-like <label>), backslashes doubled so Graphviz's \\N, \\G, \\l... escapes stay text,
    and & as &amp; because Graphviz passes entities through to the SVG as they are."""
    return _quote(s.replace("&", "&amp;"))


def to_graphml(g: nx.DiGraph) -> str:
    return "\n".join(nx.generate_graphml(g))
