"""Client spans that name no target, of an operation whose propagated calls reach several
callees (TrainTicket's `HTTP GET` / `HTTP POST`): each of the callees is a candidate target,
weighed by its share of the operation's calls (audit/engine/learn.py `operation_callees`,
targets.py "spread", stitch.py `prior` and `slot`), and the edges count such an exit once."""

import random
import re

from audit.engine.learn import OperationCallees, operation_callees
from tests.audit_helpers import audit_all, store_requests
from tests.otlp_builders import request, span

US = 1_000
MS = 1_000_000
T0 = 1_764_115_200 * 10**9
CLIENT, SERVER = 3, 2
# where `seat`'s two client operations send their calls: mostly one callee each, not enough to
# resolve either to one service (95%)
MIX = {"HTTP POST": {"order": 0.8, "price": 0.2}, "HTTP PUT": {"order": 0.2, "price": 0.8}}


class Capture:
    """`seat` handles requests; each makes one call with a client span that carries nothing but
    its name; the callee's server span has an `http.route`. `truth`: orphan span id -> (trace,
    exit span id) of its real parent."""

    def __init__(self) -> None:
        self.rnd = random.Random(3)
        self.spans: dict[str, list] = {"seat": [], "order": [], "price": []}
        self.truth: dict[bytes, tuple[bytes, bytes]] = {}
        self.exits: list[bytes] = []  # every exit span id

    def call(
        self, at: int, name: str, callee: str, *, lost: bool, stored: bool = True, lead: int = 0, timing=None
    ) -> bytes:
        """A request at `at` whose call (`name`, to `callee`) starts `lead` ns before the usual
        0.1 ms after the request's start. `lost`: the server span starts a trace of its own;
        `stored`: whether that server span is stored at all. `timing`: (d1, d2, work) in ns, else
        drawn. Returns the server span's id."""
        trace, root, exit_id, server_id = (self.rnd.randbytes(n) for n in (16, 8, 8, 8))
        self.timing = timing or (
            int(self.rnd.uniform(150, 250)) * US,
            int(self.rnd.uniform(150, 250)) * US,
            int(self.rnd.uniform(300, 900)) * US,
        )
        d1, d2, work = self.timing
        start = at + 100 * US - lead
        server_start = at + 100 * US + d1
        end = server_start + work + d2
        self.spans["seat"].append(span(trace, root, b"", name="/api/v1/seat", kind=SERVER, start=at, end=end))
        method = {"http.request.method": name.split()[1]}  # as the capture's OTel Java agent records
        self.spans["seat"].append(
            span(trace, exit_id, root, name=name, kind=CLIENT, start=start, end=end, attrs=method)
        )
        self.exits.append(exit_id)
        if stored:
            self.spans[callee].append(
                span(
                    self.rnd.randbytes(16) if lost else trace,
                    server_id,
                    b"" if lost else exit_id,
                    name=f"/api/v1/{callee}",
                    kind=SERVER,
                    start=server_start,
                    end=server_start + work,
                    attrs={"http.route": f"/api/v1/{callee}"},
                )
            )
        if lost and stored:
            self.truth[server_id] = (trace, exit_id)
        return server_id

    def train(self, t: int, n: int = 300) -> int:
        """`n` propagated calls, one every 5 ms, the callees drawn by MIX; returns the time after."""
        for _ in range(n):
            name = self.rnd.choice(list(MIX))
            callee = "order" if self.rnd.random() < MIX[name]["order"] else "price"
            self.call(t, name, callee, lost=False)
            t += 5 * MS
        return t

    def store(self, tmp_path) -> str:
        return store_requests(
            str(tmp_path / "spread.duckdb"), [request(s, service=k) for k, s in self.spans.items()]
        )


def _parents(result) -> dict[bytes, tuple[tuple[bytes, bytes] | None, float | None, int]]:
    """Per orphan: its parent named (trace id, span id) or None, the confidence, the candidates."""
    out = {}
    for f in result.iter_findings():
        if f["kind"] == "orphan_root":
            p = f["probable_parent"]
            named = (bytes.fromhex(p["trace_id"]), bytes.fromhex(p["span_id"])) if p else None
            candidates = int(re.search(r"(\d+) candidate exit span", f["evidence"]).group(1))
            out[bytes.fromhex(f["span_id"])] = (named, p["confidence"] if p else None, candidates)
    return out


def test_the_callee_prior_picks_the_exit_whose_operation_usually_calls_the_orphan(tmp_path):
    # an `order` orphan nested alike in two unpaired exits, an `HTTP POST` (80% of its calls go
    # to order) and an `HTTP PUT` (20%): timing cannot tell them apart, the prior can
    c = Capture()
    t = c.train(T0)
    picked = []
    for _ in range(8):
        t += 100 * MS
        picked.append(c.call(t, "HTTP POST", "order", lost=True))
        # the same times, and its server span was not sampled
        c.call(t, "HTTP PUT", "order", lost=True, stored=False, timing=c.timing)
    result = audit_all(c.store(tmp_path))
    parents = _parents(result)
    for orphan in picked:
        named, confidence, candidates = parents[orphan]
        assert candidates == 2 and named == c.truth[orphan]
        assert confidence >= 0.6


def test_the_callee_timing_picks_the_exit_the_orphan_nests_in_as_calls_usually_do(tmp_path):
    # two unpaired `HTTP POST` exits contain a `price` orphan; one started 0.2 ms before it (as
    # its calls do), the other 8 ms before
    c = Capture()
    t = c.train(T0)
    picked = []
    for _ in range(8):
        t += 100 * MS
        picked.append(c.call(t, "HTTP POST", "price", lost=True))
        c.call(t, "HTTP POST", "price", lost=True, stored=False, lead=8 * MS, timing=c.timing)
    parents = _parents(audit_all(c.store(tmp_path)))
    for orphan in picked:
        named, confidence, candidates = parents[orphan]
        assert candidates == 2 and named == c.truth[orphan] and confidence >= 0.6


def test_it_abstains_when_neither_timing_nor_prior_separates_the_exits(tmp_path):
    # two `HTTP POST` exits at the same times, one `order` orphan in both: a coin toss
    c = Capture()
    t = c.train(T0)
    tossed = []
    for _ in range(8):
        t += 100 * MS
        tossed.append(c.call(t, "HTTP POST", "order", lost=True))
        # the same call's twin from another request, at exactly the same times
        c.call(t, "HTTP POST", "order", lost=True, stored=False, timing=c.timing)
    parents = _parents(audit_all(c.store(tmp_path)))
    # both exits are candidates, and neither is named
    assert all(parents[orphan][2] == 2 and parents[orphan][0] is None for orphan in tossed)


def test_an_unpaired_exit_is_counted_once_in_the_edges_and_the_findings(tmp_path):
    c = Capture()
    t = c.train(T0, 200)
    for i in range(60):  # calls that lost their context: 40 stitched, 20 whose server was not stored
        t += 20 * MS
        c.call(
            t, "HTTP POST" if i % 2 else "HTTP PUT", "order" if i % 3 else "price", lost=True, stored=i < 40
        )
    result = audit_all(c.store(tmp_path))
    seat = [e for e in result.edges if e.caller == "seat"]
    # every exit once, on a real callee: no edge to an unknown peer, and no exit counted twice
    assert {e.callee for e in seat} == {"order", "price"}
    assert sum(e.calls for e in seat) == len(c.exits) == 260
    assert sum(e.propagated for e in seat) == 200
    assert sum(e.stitched for e in seat) >= 38
    unpaired = [f for f in result.iter_findings() if f["kind"] == "unpaired_exit"]
    assert sorted(bytes.fromhex(f["span_id"]) for f in unpaired) == sorted(c.exits[200:])
    # each says which callee it was counted on, and why
    stitched = [f for f in unpaired if "its orphan was stitched here" in f["evidence"]]
    drawn = [f for f in unpaired if "% share" in f["evidence"]]
    assert len(stitched) >= 38 and len(stitched) + len(drawn) == 60
    assert all("one of 2 callees" in f["evidence"] for f in unpaired)


def test_an_operation_spread_over_callees_keeps_the_few_it_mostly_reaches():
    rows = [("gw", "HTTP POST", "http", "a", "/a", 60), ("gw", "HTTP POST", "http", "a", "/a2", 20)]
    rows += [("gw", "HTTP POST", "http", "b", "/b", 19), ("gw", "HTTP POST", "http", "c", "/c", 1)]
    rows += [("seat", "HTTP GET", "http", "config", "/c", 96), ("seat", "HTTP GET", "http", "x", "/x", 4)]
    rows += [("few", "HTTP GET", "http", "a", "/a", 10), ("few", "HTTP GET", "http", "b", "/b", 9)]
    got = operation_callees(rows)
    # one callee dominates `seat`'s calls (operation_targets resolves it); `few` has too few calls
    assert list(got) == [("gw", "HTTP POST", "http")]
    m = got[("gw", "HTTP POST", "http")]
    assert m == OperationCallees(
        100, {"a": 80, "b": 19, "c": 1}, {("a", "/a"): 60, ("a", "/a2"): 20, ("b", "/b"): 19, ("c", "/c"): 1}
    )
    assert abs(m.share("a") - 0.8) < 1e-9
