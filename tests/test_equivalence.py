"""Optimizer invariant: every rule set gives the same results as no rewrites at all.

Random flows are built from a small program description (a list of op tuples, printed by
hypothesis on failure), deployed once under each rule set, and fed the same random tables.
"""

import os

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import serveflow as sf

TIMEOUT = 10
POOL = ["a", "b", "c", "d", "e"]
KVS = {str(i): i * 7 for i in range(-40, 41, 2)}  # even keys only: odd ones miss -> None

RULESETS = {
    "none": dict(fusion=False, compete=False, locality=False, batching=False, whole=False),
    "default": dict(),
    "all": dict(
        fusion=True, compete=True, compete_replicas=2, locality=True, batching=True, whole=True
    ),
    "all-but-whole": dict(compete=True, compete_replicas=2),
}


# --- program generation --------------------------------------------------------------
# A stream state is (cols, nonnull, unique): its columns in order, the columns that are
# never None (the only ones later ops may read), and whether each qid appears at most once
# (required for joins on qid).

START = (("a", "b"), frozenset({"a", "b"}), True)
small = st.integers(-3, 3)


@st.composite
def chain(draw, state, depth, min_ops=0):
    ops = []
    for _ in range(draw(st.integers(min_ops, 3))):
        cols, nonnull, unique = state
        if not nonnull:
            break
        readable = sorted(nonnull)
        kinds = ["map", "colmap", "filter", "lookup"] + (["fanout"] if depth < 2 else [])
        kind = draw(st.sampled_from(kinds))
        if kind == "map":
            names = draw(st.lists(st.sampled_from(POOL), min_size=1, max_size=2, unique=True))
            outs = tuple(
                (draw(st.sampled_from(readable)), draw(small), draw(small), name) for name in names
            )
            op = ("map", outs, draw(st.booleans()), draw(st.booleans()))
            state = (tuple(names), frozenset(names), unique)
        elif kind == "colmap":
            col = draw(st.sampled_from(readable))
            free = [c for c in POOL if c not in cols]
            new = draw(st.sampled_from([None, col, *free]))
            op = ("colmap", col, draw(small), draw(small), new, draw(st.booleans()))
            new = new or col
            state = (
                tuple(new if c == col else c for c in cols),
                (nonnull - {col}) | {new},
                unique,
            )
        elif kind == "filter":
            col = draw(st.sampled_from(readable))
            m = draw(st.integers(2, 3))
            op = ("filter", col, m, draw(st.integers(0, m - 1)))
        elif kind == "lookup":
            free = [c for c in POOL if c not in cols]
            if not free:
                continue
            into = draw(st.sampled_from(free))
            op = ("lookup", draw(st.sampled_from(readable)), into)
            state = ((*cols, into), nonnull, unique)
        else:
            how = draw(st.sampled_from(["inner", "left", "outer", "union", "anyof"]))
            if how == "anyof":
                lops, lstate = draw(chain(state, depth + 1, min_ops=1))
                rops, rstate = lops, lstate
            else:
                lops, lstate = draw(chain(state, depth + 1))
                rops, rstate = draw(chain(state, depth + 1, min_ops=1))
            if how in ("inner", "left", "outer") and not (lstate[2] and rstate[2]):
                how = "union"
            op = ("fanout", how, lops, rops)
            state = combine(how, lstate, rstate)
        ops.append(op)
    return ops, state


def combine(how, left, right):
    (lcols, lnn, _), (rcols, rnn, _) = left, right
    cols = lcols + tuple(c for c in rcols if c not in lcols)
    if how == "anyof":
        return left
    if how == "union":
        return cols, lnn & rnn, False
    nonnull = {
        "inner": lnn | (rnn - set(lcols)),
        "left": lnn,
        "outer": frozenset(),
    }[how]
    return cols, frozenset(nonnull), True


@st.composite
def programs(draw):
    ops, (_, nonnull, _) = draw(chain(START, 0, min_ops=1))
    terminal = None
    if nonnull and draw(st.booleans()):
        readable = sorted(nonnull)
        fn = draw(st.sampled_from(["count", "sum", "min", "max", "avg"]))
        col = draw(st.sampled_from(readable))
        kind = draw(st.sampled_from(["agg", "groupby", "groupfilter"]))
        terminal = (kind, draw(st.sampled_from(readable)), fn, col, draw(st.integers(1, 3)))
    return ops, terminal


int_rows = st.lists(st.tuples(st.integers(-10, 10), st.integers(-10, 10)), max_size=8)
tables = st.lists(int_rows, min_size=1, max_size=3)


# --- building flows from programs ----------------------------------------------------


def row_fn(outs):
    def one(r):
        vals = tuple(r[src] * k + c for src, k, c, _ in outs)
        return vals[0] if len(vals) == 1 else vals

    return one


def batch_fn(one):
    def many(table):
        return [one(r) for r in table]

    return many


def col_fn(k, c):
    return lambda v: v * k + c


def build(stream, ops):
    for op in ops:
        kind = op[0]
        if kind == "map":
            _, outs, hv, batching = op
            one = row_fn(outs)
            names = [name for *_, name in outs]
            fn = batch_fn(one) if batching else one
            stream = stream.map(fn, names=names, high_variance=hv, batching=batching)
        elif kind == "colmap":
            _, col, k, c, new, batching = op
            one = col_fn(k, c)
            fn = (lambda values, one=one: [one(v) for v in values]) if batching else one
            names = [new] if new else None
            stream = stream.map(fn, col=col, names=names, batching=batching)
        elif kind == "filter":
            _, col, m, rem = op
            stream = stream.filter(lambda r, col=col, m=m, rem=rem: r[col] % m == rem)
        elif kind == "lookup":
            _, col, into = op
            stream = stream.lookup(col, dynamic=True, into=into)
        else:
            _, how, lops, rops = op
            left, right = build(stream, lops), build(stream, rops)
            if how == "union":
                stream = left.union(right)
            elif how == "anyof":
                stream = left.anyof(right)
            else:
                stream = left.join(right, how=how)
    return stream


def build_flow(program, head=None):
    """The flow of `program`; `head(flow)`, if given, is the stream its ops start from."""
    ops, terminal = program
    flow = sf.Flow("generated")
    stream = build(flow if head is None else head(flow), ops)
    if terminal is not None:
        kind, gcol, fn, col, size = terminal
        if kind == "agg":
            stream.agg(fn, col)
        elif kind == "groupby":
            stream.groupby(gcol).agg(fn, col)
        else:
            grouped = stream.groupby(gcol)
            grouped.filter(lambda t, size=size: len(t) >= size, group=True).agg(fn, col)
    return flow


# --- running -------------------------------------------------------------------------


def canon(table):
    rows = sorted((dict(sorted(r.items())) for r in table.to_rows()), key=repr)
    return sorted(table.columns) if rows else None, rows


def to_table(rows):
    return sf.Table({"a": [a for a, _ in rows], "b": [b for _, b in rows]})


@pytest.fixture(scope="module")
def runtime():
    """One runtime for all generated deployments (a deploy then costs milliseconds)."""
    shared = sf.LocalRuntime()
    yield shared
    shared.stop()


def run_all(flow, inputs, rules_name, runtime):
    with flow.deploy(rules=sf.Rules(**RULESETS[rules_name]), runtime=runtime) as app:
        for key, value in KVS.items():
            app.kvs.put(key, value)
        futures = [app.run(to_table(rows)) for rows in inputs]
        return [canon(f.result(timeout=TIMEOUT)) for f in futures]


JOIN_UNION_AGG = (
    [
        ("map", (("a", 2, 1, "c"), ("b", 1, 0, "b")), True, False),
        ("fanout", "left", [("filter", "c", 2, 1)], [("filter", "b", 3, 0), ("lookup", "b", "d")]),
        ("fanout", "union", [], [("colmap", "c", -1, 0, "e", True)]),
    ],
    ("groupfilter", "b", "sum", "b", 2),
)


# SERVEFLOW_EXAMPLES=1000 for a longer bug hunt.
EXAMPLES = int(os.environ.get("SERVEFLOW_EXAMPLES", "30"))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(program=programs(), inputs=tables)
@example(program=JOIN_UNION_AGG, inputs=[[(1, 3), (2, 6), (3, 4), (4, 0)], []])
def test_optimized_plans_match_unoptimized(runtime, program, inputs):
    flow = build_flow(program)
    expected = run_all(flow, inputs, "none", runtime)
    for name in ("default", "all", "all-but-whole"):
        assert run_all(flow, inputs, name, runtime) == expected, name
