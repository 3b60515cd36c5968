"""A crowd-aware "no parent" price, tried and not adopted (issue 14, item 2): run a benchmark with
each candidate pair scored against a background of unrelated exits, to reproduce the figures in
docs/accuracy.md ("A price for a crowded field").

    python -m bench.crowd_price [--variant lr|crowd-only] [--all-edges] [--no-free]
                                -- bench.reliability --runs 12 --seed 1
    python -m bench.crowd_price -- bench.realdata PATH --shape attrs ...

The engine prices "no parent" per edge as a constant (timing.py, `SyncModel.null`). Against a
background of unrelated exits, the posterior of "exit j is the parent" is proportional to
p * f(x_j) / lambda(x_j), and of "no parent" to 1 - p, where f is the true pairs' density of the
gaps x = (d1, d2), p the chance the parent was stored, and lambda the density of unrelated exits
at x. An unrelated exit with gaps (d1, d2) started at o_start - d1 and lasted
o_end - o_start + d1 + d2, so lambda(x_j) = r * g(D_j): the rate r of the edge's unpaired exits
around the orphan (within 1 s) times the density g of their durations at the candidate's own
duration D_j (a smoothed histogram of log durations). Exits that are other orphans' parents are
not unrelated: the assignment's one-to-one competition counts them already, so lambda is
scaled by the share of the edge's unpaired exits that no orphan can claim,
1 - orphans * p / exits (at least 1%; `--no-free` leaves it out).

Variants, as a shift of each pair's cost by its background price against the edge's price
(-ln lambda_j - null; likelihoods of borrowed or inferred models count for half, and so does
their background):

- `lr`: the whole shift (the likelihood ratio replaces the constant price); by default only on
  edges scored with their own model (`--all-edges`: every edge);
- `crowd-only`: only where the field is more crowded than the price assumes (the shift's
  negative part): the confidence can only fall;
- `none`: nothing patched, the control (bench.realdata's audit runs in this process either way).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys

import numpy as np
from scipy.ndimage import gaussian_filter1d

import audit.engine.findings as findings
import audit.engine.stitch as stitch_module
from audit.engine.estimate import stored_probability

_RATE_WINDOW_NS = 1e9
_FREE_FLOOR = 0.01
_BINS = 256


def edge_exits(exits: dict, caller: str, callee: str, protocol: str) -> dict:
    """The unpaired exits that can be on the edge, from `exits` (cand_exits' columns, read before
    stitch: the engine's costs run while the pairs' stream holds the connection)."""
    keep = (exits["service"] == caller) & (exits["protocol"] == protocol)
    keep &= ~exits["instrumented"] | (exits["target"] == callee)
    return {"s": exits["s"][keep], "d": exits["d"][keep]}


def background_price(rows: dict, o_start, e_start, e_end) -> np.ndarray:
    """-ln lambda per pair: unrelated exits of the edge (`edge_exits`) per ns of start time per ns
    of duration at the candidate's duration, around the orphan's start."""
    starts, logd = np.sort(rows["s"].astype(float)), np.log(rows["d"].astype(float))
    if len(starts) < 2:
        return np.full(len(o_start), np.inf)
    t = o_start.astype(float)
    n = np.searchsorted(starts, t + _RATE_WINDOW_NS) - np.searchsorted(starts, t - _RATE_WINDOW_NS)
    span = np.minimum(t + _RATE_WINDOW_NS, starts[-1]) - np.maximum(t - _RATE_WINDOW_NS, starts[0])
    rate = n / np.maximum(span, 1e8)
    iqr = float(np.subtract(*np.percentile(logd, [75, 25]))) / 1.349
    h = max(0.9 * min(float(logd.std()), iqr or float(logd.std())) * len(logd) ** -0.2, 0.05)
    lo, hi = logd.min() - 4 * h, logd.max() + 4 * h
    counts, _ = np.histogram(logd, bins=_BINS, range=(lo, hi))
    step = (hi - lo) / _BINS
    density = gaussian_filter1d(counts.astype(float), h / step, mode="constant") / (len(logd) * step)
    d = np.maximum(e_end - e_start, 1000).astype(float)
    i = np.clip(((np.log(d) - lo) / step).astype(int), 0, _BINS - 1)
    lam = rate * np.maximum(density[i], 1e-12) / d
    return -np.log(np.maximum(lam, 1e-300))


# the pairs stitch assigns, in its order within an edge (orphan, exit)
_EDGE_PAIRS = """
SELECT e.service AS caller, o.service AS callee, e.protocol, p.oid, coalesce(e.th, 0)::DOUBLE AS e_th
FROM cand_pairs p JOIN cand_orphans o USING (oid) JOIN cand_exits e USING (eid)
WHERE p.oid IN (SELECT unnest($ids::BIGINT[]))
ORDER BY caller, callee, protocol, p.oid, p.eid
"""


def install(variant: str, all_edges: bool, free: bool) -> None:
    """Patch the engine's pair costs (stitch._costs) for this process."""
    state: dict = {}
    original_stitch, original_costs = stitch_module.stitch, stitch_module._costs

    def keep_connection(con, learned, ids):
        cols = con.execute(
            "SELECT service, protocol, instrumented, target, start_ns::BIGINT AS s,"
            " greatest(end_ns::BIGINT - start_ns::BIGINT, 1000) AS d FROM cand_exits"
        ).fetchnumpy()
        # NULLs as SQL compares them: a NULL string equals nothing but NULL (protocol IS NOT DISTINCT
        # FROM), a NULL `instrumented` keeps only exits to the callee
        state["exits"] = {
            n: np.ma.filled(c, None) if c.dtype == object else np.ma.filled(c, n == "instrumented")
            for n, c in cols.items()
        }
        # per edge, the orphans that can claim its exits (their count times the mean chance their
        # candidate exit was stored), over all the edge's pairs: the engine costs them in batches
        state["claimed"] = {}
        if free:
            pairs = con.execute(_EDGE_PAIRS, {"ids": np.asarray(ids).tolist()}).fetchnumpy()
            edge = list(zip(pairs["caller"], pairs["callee"], np.ma.filled(pairs["protocol"], None)))
            cuts = [0] + [j for j in range(1, len(edge)) if edge[j] != edge[j - 1]] + [len(edge)]
            for a, b in zip(cuts[:-1], cuts[1:]):  # the rows are sorted by edge
                p = float(np.mean(stored_probability(pairs["e_th"][a:b])))
                state["claimed"][edge[a]] = len(np.unique(pairs["oid"][a:b])) * p
        return original_stitch(con, learned, ids)

    def costs(cols, learned, edges):
        cost, null = original_costs(cols, learned, edges)
        shift = np.zeros(len(cost))
        for g in np.unique(cols["edge"]):
            i = np.nonzero(cols["edge"] == g)[0]
            caller, callee, protocol = edges[int(g)]
            if protocol == "messaging":
                continue
            m = learned.sync_model(caller, callee, protocol)
            if m.source != "edge" and not all_edges:
                continue
            rows = edge_exits(state["exits"], caller, callee, protocol)
            price = background_price(rows, cols["o_start"][i], cols["e_start"][i], cols["e_end"][i])
            if free:
                exits = len(rows["s"])
                claimed = state["claimed"][(caller, callee, protocol)]
                price = price - np.log(min(max(1.0 - claimed / max(exits, 1), _FREE_FLOOR), 1.0))
            w = 1.0 if m.source == "edge" else stitch_module._BORROWED
            shift[i] = np.where(np.isfinite(price), w * price - null[i], 0.0)
        return cost - (shift if variant == "lr" else np.minimum(shift, 0.0)), null

    stitch_module.stitch = findings.stitch = keep_connection
    stitch_module._costs = costs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=("lr", "crowd-only", "none"), default="lr")
    ap.add_argument("--all-edges", action="store_true", help="also edges scored with a borrowed model")
    ap.add_argument("--no-free", action="store_true", help="count every unpaired exit as unrelated")
    ap.add_argument("module", nargs=argparse.REMAINDER, help="-- then a bench module and its arguments")
    args = ap.parse_args()
    rest = args.module[1:] if args.module[:1] == ["--"] else args.module
    if not rest:
        ap.error("name a bench module after --")
    if args.variant != "none":  # "none": the engine as it is, audited the same way (the control)
        install(args.variant, args.all_edges, not args.no_free)
    module = importlib.import_module(rest[0])
    if hasattr(module, "run_audit") and hasattr(module, "_CTXAUDIT"):  # bench.realdata: audit in-process
        module.run_audit = _audit_in_process
    sys.argv = rest
    module.main()


def _audit_in_process(db: str, min_confidence: float, memory_limit: str, out: str) -> dict:
    """bench.realdata's audit (a `ctxaudit audit` subprocess there) in this process, patched."""
    from audit.cli import main as cli

    cmd = ["audit", "--db", db, "--all", "--settle", "0", "--json", "--no-save"]
    cmd += ["--min-confidence", str(min_confidence), "--memory-limit", memory_limit]
    with open(out, "w") as f, contextlib.redirect_stdout(f):
        cli.main(cmd, standalone_mode=False)
    with open(out) as f:
        return json.load(f)


if __name__ == "__main__":
    main()
