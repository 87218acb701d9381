"""Every operator, run end to end under each rule set (see conftest.RULESETS)."""

import numpy as np
import pytest

import serveflow as sf
from serveflow.errors import DeadlineError
from serveflow.runtime.kvs import MemoryKVS
from serveflow.runtime.stage import StageExecutor

TIMEOUT = 10
# tests deploying through `deploy`/`serve` run on the embedded runtime and on Ray
RUNTIMES = ("local", "ray")


def ms(rows):
    """Rows (a list of dicts or a Table) as a multiset: an order-independent sorted list."""
    if isinstance(rows, sf.Table):
        rows = rows.to_rows()
    return sorted((dict(sorted(r.items())) for r in rows), key=repr)


AB = {"a": [1, 2, 3], "b": [10, 20, 30]}


# --- map, row mode -------------------------------------------------------------------


def test_map_row_single_name(serve):
    flow = sf.Flow("f")
    flow.map(lambda r: r["a"] + r["b"], names=["sum"])
    out = serve(flow, sf.Table(AB))
    assert list(out.columns) == ["sum"]
    assert ms(out) == ms([{"sum": 11}, {"sum": 22}, {"sum": 33}])


def test_map_row_single_name_tuple_is_one_cell(serve):
    flow = sf.Flow("f")
    flow.map(lambda r: (r["a"], r["b"]), names=["pair"])
    out = serve(flow, sf.Table(AB))
    assert list(out.columns) == ["pair"]
    assert sorted(tuple(v) for v in out.column("pair")) == [(1, 10), (2, 20), (3, 30)]


def test_map_row_tuple_with_names(serve):
    flow = sf.Flow("f")
    flow.map(lambda r: (r["a"] * 2, r["b"] + 1), names=["p", "q"])
    out = serve(flow, sf.Table(AB))
    assert list(out.columns) == ["p", "q"]
    assert ms(out) == ms([{"p": 2, "q": 11}, {"p": 4, "q": 21}, {"p": 6, "q": 31}])


def test_map_row_list_with_names(serve):
    flow = sf.Flow("f")
    flow.map(lambda r: [r["b"], r["a"]], names=["p", "q"])
    out = serve(flow, sf.Table(AB))
    assert ms(out) == ms([{"p": 10, "q": 1}, {"p": 20, "q": 2}, {"p": 30, "q": 3}])


def test_map_row_default_names_tuple(serve):
    flow = sf.Flow("f")
    flow.map(lambda r: (r["a"], -r["a"]))
    out = serve(flow, sf.Table(AB))
    assert list(out.columns) == ["0", "1"]
    assert ms(out) == ms([{"0": 1, "1": -1}, {"0": 2, "1": -2}, {"0": 3, "1": -3}])


def test_map_row_default_names_scalar(serve):
    flow = sf.Flow("f")
    flow.map(lambda r: r["b"] // 10)
    out = serve(flow, sf.Table(AB))
    assert list(out.columns) == ["0"]
    assert ms(out) == ms([{"0": 1}, {"0": 2}, {"0": 3}])


def test_map_chain(serve):
    flow = sf.Flow("f")
    flow.map(lambda r: r["a"] + 1, names=["x"]).map(lambda r: r["x"] * 10, names=["y"])
    out = serve(flow, sf.Table(AB))
    assert ms(out) == ms([{"y": 20}, {"y": 30}, {"y": 40}])


def test_map_numpy_cells(serve):
    flow = sf.Flow("f")
    flow.map(lambda r: (r["img"] * 2, float(r["img"].sum())), names=["img2", "total"])
    imgs = [np.arange(4.0), np.ones((2, 2))]
    out = serve(flow, sf.Table({"img": imgs}))
    got = sorted(out.to_rows(), key=lambda r: r["total"])
    assert [r["total"] for r in got] == [4.0, 6.0]
    np.testing.assert_array_equal(got[0]["img2"], np.full((2, 2), 2.0))
    np.testing.assert_array_equal(got[1]["img2"], np.arange(4.0) * 2)


# --- map, column mode ----------------------------------------------------------------


def test_map_col_replaces_column(serve):
    flow = sf.Flow("f")
    flow.map(lambda v: v * 100, col="a")
    out = serve(flow, sf.Table(AB))
    assert set(out.columns) == {"a", "b"}
    assert ms(out) == ms([{"a": 100, "b": 10}, {"a": 200, "b": 20}, {"a": 300, "b": 30}])


def test_map_col_renamed(serve):
    flow = sf.Flow("f")
    flow.map(lambda v: v * 100, col="a", names=["big"])
    out = serve(flow, sf.Table(AB))
    assert set(out.columns) == {"big", "b"}
    assert ms(out) == ms([{"big": 100, "b": 10}, {"big": 200, "b": 20}, {"big": 300, "b": 30}])


# --- map, batching -------------------------------------------------------------------


def test_map_batching_receives_table(serve):
    def double_all(table):
        assert isinstance(table, sf.Table), type(table)
        return [r["a"] * 2 for r in table]

    flow = sf.Flow("f")
    flow.map(double_all, names=["d"], batching=True)
    out = serve(flow, sf.Table(AB))
    assert ms(out) == ms([{"d": 2}, {"d": 4}, {"d": 6}])


def test_batching_off_calls_batch_fn_once_per_request(tmp_path, shared_runtime):
    log = str(tmp_path / "log")

    def record(table):
        with open(log, "a") as f:
            f.write(f"{len(table)}\n")
        return [r["x"] for r in table]

    flow = sf.Flow("f")
    flow.map(record, names=["x"], batching=sf.Batching(max_size=8, timeout_ms=20))
    with flow.deploy(rules=sf.Rules(batching=False), runtime=shared_runtime) as app:
        futures = [app.run(sf.Table({"x": [i, i]})) for i in range(20)]
        assert [f.result(timeout=TIMEOUT).column("x") for f in futures] == [
            [i, i] for i in range(20)
        ]
    with open(log) as f:
        assert f.read().split() == ["2"] * 20


def test_map_batching_may_return_numpy_array(serve):
    flow = sf.Flow("f")
    flow.map(lambda t: np.asarray(t.column("a")) + 1, names=["x"], batching=True)
    out = serve(flow, sf.Table(AB))
    assert sorted(int(v) for v in out.column("x")) == [2, 3, 4]


def test_map_batching_may_return_table(serve):
    flow = sf.Flow("f")
    flow.map(lambda t: sf.Table({"y": [r["b"] - r["a"] for r in t]}), batching=True)
    out = serve(flow, sf.Table(AB))
    assert ms(out) == ms([{"y": 9}, {"y": 18}, {"y": 27}])


def test_map_batching_col_mode(serve):
    def scale(values):
        return [v * 3 for v in values]

    flow = sf.Flow("f")
    flow.map(scale, col="a", batching=True)
    out = serve(flow, sf.Table(AB))
    assert ms(out) == ms([{"a": 3, "b": 10}, {"a": 6, "b": 20}, {"a": 9, "b": 30}])


def test_map_batching_policy_many_concurrent_requests(deploy):
    flow = sf.Flow("f")
    flow.map(
        lambda t: [r["x"] * 2 + 1 for r in t],
        names=["y"],
        batching=sf.Batching(max_size=4, timeout_ms=5),
    )
    inputs = [[i * 100 + j for j in range(i % 3 + 1)] for i in range(50)]
    with deploy(flow) as app:
        futures = [app.run(sf.Table({"x": xs})) for xs in inputs]
        results = [f.result(timeout=TIMEOUT) for f in futures]
    for xs, out in zip(inputs, results):
        assert sorted(out.column("y")) == [x * 2 + 1 for x in xs]


# --- class-based models --------------------------------------------------------------


def test_class_model_instantiated_per_worker_not_per_call(deploy, tmp_path):
    log = str(tmp_path / "log")

    class AddOffset:
        def __init__(self):
            self.offset = 1000
            with open(log, "a") as f:
                f.write("init\n")

        def __call__(self, row):
            with open(log, "a") as f:
                f.write("call\n")
            return row["a"] + self.offset

    flow = sf.Flow("f")
    flow.map(AddOffset, names=["y"])
    with deploy(flow) as app:
        for i in range(10):
            out = app.run(sf.Table({"a": [i, i + 1, i + 2]})).result(timeout=TIMEOUT)
            assert sorted(out.column("y")) == [1000 + i, 1001 + i, 1002 + i]
    with open(log) as f:
        lines = f.read().split()
    calls, inits = lines.count("call"), lines.count("init")
    assert calls >= 30
    assert 1 <= inits < calls


# --- filter --------------------------------------------------------------------------


def test_filter_rows(serve):
    flow = sf.Flow("f")
    flow.filter(lambda r: r["a"] % 2 == 1)
    out = serve(flow, sf.Table(AB))
    assert ms(out) == ms([{"a": 1, "b": 10}, {"a": 3, "b": 30}])


def test_map_then_filter_contract_example(serve):
    flow = sf.Flow("example")
    flow.map(lambda r: r["a"] + r["b"], names=["sum"]).filter(lambda r: r["sum"] % 2 == 0)
    out = serve(flow, sf.Table.from_rows([{"a": 1, "b": 10}, {"a": 2, "b": 20}]))
    assert out.to_rows() == [{"sum": 22}]


def test_filter_drops_everything(serve):
    flow = sf.Flow("f")
    flow.filter(lambda r: False)
    out = serve(flow, sf.Table(AB))
    assert len(out) == 0
    assert out.to_rows() == []


# --- groupby / agg -------------------------------------------------------------------

GV = {"g": ["x", "y", "x"], "v": [1, 2, 6]}

GROUPED = {
    "count": {"x": 2, "y": 1},
    "sum": {"x": 7, "y": 2},
    "min": {"x": 1, "y": 2},
    "max": {"x": 6, "y": 2},
    "avg": {"x": 3.5, "y": 2.0},
}
UNGROUPED = {"count": 3, "sum": 9, "min": 1, "max": 6, "avg": 3.0}
EMPTY = {"count": 0, "sum": 0, "min": None, "max": None, "avg": None}


@pytest.mark.parametrize("fn", list(GROUPED))
def test_groupby_agg(serve, fn):
    flow = sf.Flow("f")
    flow.groupby("g").agg(fn, "v")
    out = serve(flow, sf.Table(GV))
    assert list(out.columns) == ["g", "v"]
    assert ms(out) == ms([{"g": g, "v": v} for g, v in GROUPED[fn].items()])


@pytest.mark.parametrize("fn", list(UNGROUPED))
def test_agg_ungrouped(serve, fn):
    flow = sf.Flow("f")
    flow.agg(fn, "v")
    out = serve(flow, sf.Table(GV))
    assert list(out.columns) == ["v"]
    assert out.to_rows() == [{"v": UNGROUPED[fn]}]


@pytest.mark.parametrize("fn", list(EMPTY))
def test_agg_on_empty_input(serve, fn):
    flow = sf.Flow("f")
    flow.filter(lambda r: False).agg(fn, "v")
    out = serve(flow, sf.Table(GV))
    assert out.to_rows() == [{"v": EMPTY[fn]}]


def test_agg_on_group_column_is_renamed(serve):
    flow = sf.Flow("f")
    flow.groupby("g").agg("count", "g")
    out = serve(flow, sf.Table(GV))
    assert list(out.columns) == ["g", "count_g"]
    assert ms(out) == ms([{"g": "x", "count_g": 2}, {"g": "y", "count_g": 1}])


def test_groupby_after_map(serve):
    flow = sf.Flow("f")
    flow.map(lambda r: (r["v"] % 2, r["v"]), names=["parity", "v"]).groupby("parity").agg(
        "sum", "v"
    )
    out = serve(flow, sf.Table(GV))
    assert ms(out) == ms([{"parity": 0, "v": 8}, {"parity": 1, "v": 1}])


def test_agg_is_per_request(deploy):
    flow = sf.Flow("f")
    flow.groupby("g").agg("sum", "v")
    with deploy(flow) as app:
        f1 = app.run(sf.Table({"g": ["x", "x"], "v": [1, 2]}))
        f2 = app.run(sf.Table({"g": ["x", "y"], "v": [10, 20]}))
        assert ms(f1.result(timeout=TIMEOUT)) == ms([{"g": "x", "v": 3}])
        assert ms(f2.result(timeout=TIMEOUT)) == ms([{"g": "x", "v": 10}, {"g": "y", "v": 20}])


def test_group_filter_then_agg(serve):
    def big_group(table):
        assert isinstance(table, sf.Table), type(table)
        return len(table) >= 2

    flow = sf.Flow("f")
    flow.groupby("g").filter(big_group, group=True).agg("sum", "v")
    out = serve(flow, sf.Table({"g": ["x", "y", "x", "z", "z"], "v": [1, 2, 6, 4, 5]}))
    assert ms(out) == ms([{"g": "x", "v": 7}, {"g": "z", "v": 9}])


def test_group_filter_drops_all_groups(serve):
    flow = sf.Flow("f")
    flow.groupby("g").filter(lambda t: False, group=True).agg("sum", "v")
    out = serve(flow, sf.Table(GV))
    assert out.to_rows() == []


def test_group_filter_sees_whole_group(serve):
    flow = sf.Flow("f")
    flow.groupby("g").filter(lambda t: sum(t.column("v")) > 5, group=True).agg("count", "v")
    out = serve(flow, sf.Table({"g": ["x", "y", "x", "y"], "v": [1, 2, 6, 3]}))
    assert ms(out) == ms([{"g": "x", "v": 2}])


# --- lookup --------------------------------------------------------------------------


def test_lookup_static(serve):
    flow = sf.Flow("f")
    flow.lookup("k")
    out = serve(flow, sf.Table({"a": [1, 2]}), kvs={"k": 42})
    assert ms(out) == ms([{"a": 1, "k": 42}, {"a": 2, "k": 42}])


def test_lookup_static_into_and_missing(serve):
    flow = sf.Flow("f")
    flow.lookup("k", into="val").lookup("absent")
    out = serve(flow, sf.Table({"a": [1]}), kvs={"k": "hello"})
    assert out.to_rows() == [{"a": 1, "val": "hello", "absent": None}]


def test_kvs_put_get(deploy):
    flow = sf.Flow("f")
    flow.lookup("k")
    with deploy(flow) as app:
        app.kvs.put("k", [1, 2])
        assert app.kvs.get("k") == [1, 2]


def test_lookup_dynamic(serve):
    flow = sf.Flow("f")
    flow.lookup("uid", dynamic=True)
    out = serve(flow, sf.Table({"uid": [1, 2, 3]}), kvs={"1": "alice", "2": "bob", "99": "nobody"})
    assert ms(out) == ms(
        [
            {"uid": 1, "uid_value": "alice"},
            {"uid": 2, "uid_value": "bob"},
            {"uid": 3, "uid_value": None},
        ]
    )


def test_lookup_dynamic_into_after_map(serve):
    flow = sf.Flow("f")
    flow.map(lambda r: f"user{r['a']}", names=["user"]).lookup("user", dynamic=True, into="x")
    out = serve(flow, sf.Table({"a": [1, 2]}), kvs={"user1": 10, "user2": 20})
    assert ms(out) == ms([{"user": "user1", "x": 10}, {"user": "user2", "x": 20}])


# --- join ----------------------------------------------------------------------------


def test_join_qid_inner(serve):
    flow = sf.Flow("f")
    left = flow.map(lambda r: r["a"] * 2, names=["d"])
    right = flow.map(lambda r: r["a"] + 1, names=["p"])
    left.join(right)
    out = serve(flow, sf.Table(AB))
    assert ms(out) == ms([{"d": 2, "p": 2}, {"d": 4, "p": 3}, {"d": 6, "p": 4}])


def test_join_qid_inner_with_filter(serve):
    flow = sf.Flow("f")
    left = flow.map(lambda r: r["a"] * 2, names=["d"])
    right = flow.filter(lambda r: r["a"] != 2).map(lambda r: r["b"], names=["b"])
    left.join(right, how="inner")
    out = serve(flow, sf.Table(AB))
    assert ms(out) == ms([{"d": 2, "b": 10}, {"d": 6, "b": 30}])


def test_join_qid_left(serve):
    flow = sf.Flow("f")
    left = flow.map(lambda r: r["a"] * 2, names=["d"])
    right = flow.filter(lambda r: r["a"] > 1).map(lambda r: r["a"] + 1, names=["p"])
    left.join(right, how="left")
    out = serve(flow, sf.Table(AB))
    assert ms(out) == ms([{"d": 2, "p": None}, {"d": 4, "p": 3}, {"d": 6, "p": 4}])


def test_join_qid_outer(serve):
    flow = sf.Flow("f")
    left = flow.filter(lambda r: r["a"] > 1).map(lambda r: r["a"] * 2, names=["d"])
    right = flow.filter(lambda r: r["a"] < 3).map(lambda r: r["a"] + 1, names=["p"])
    left.join(right, how="outer")
    out = serve(flow, sf.Table(AB))
    assert ms(out) == ms([{"d": None, "p": 2}, {"d": 4, "p": 3}, {"d": 6, "p": None}])


def test_join_qid_shared_columns_from_left(serve):
    flow = sf.Flow("f")
    left = flow.map(lambda r: (r["a"], "L"), names=["a", "side"])
    right = flow.map(lambda r: ("R", r["b"]), names=["side", "b"])
    left.join(right)
    out = serve(flow, sf.Table(AB))
    assert ms(out) == ms([{"a": a, "side": "L", "b": b} for a, b in zip(AB["a"], AB["b"])])


def test_join_qid_lines_up_rows_from_same_input_row(serve):
    # Every row has the same "a": only the qid can line the two branches up.
    flow = sf.Flow("f")
    left = flow.filter(lambda r: r["b"] % 2 == 0).map(lambda r: r["a"] + r["b"], names=["s"])
    right = flow.map(lambda r: r["b"], names=["b"])
    left.join(right)
    out = serve(flow, sf.Table({"a": [5, 5, 5, 5], "b": [0, 1, 2, 3]}))
    assert ms(out) == ms([{"s": 5, "b": 0}, {"s": 7, "b": 2}])


def test_join_qid_after_col_map_and_lookup(serve):
    flow = sf.Flow("f")
    left = flow.map(lambda v: v * 0, col="a").filter(lambda r: r["b"] != 20)
    right = flow.lookup("k").map(lambda r: r["b"] + r["k"], names=["bk"])
    left.join(right)
    out = serve(flow, sf.Table(AB), kvs={"k": 5})
    assert ms(out) == ms([{"a": 0, "b": 10, "bk": 15}, {"a": 0, "b": 30, "bk": 35}])


KV = {"k": [1, 2, 3], "v": [10, 20, 30]}


def _col_join_branches(flow):
    left = flow.map(lambda r: (r["k"], r["v"]), names=["k", "v"])
    right = flow.map(lambda r: (r["k"] + 1, r["v"] * 100), names=["k", "w"])
    return left, right  # left keys 1,2,3; right keys 2,3,4


def test_join_on_column_inner(serve):
    flow = sf.Flow("f")
    left, right = _col_join_branches(flow)
    left.join(right, on="k")
    out = serve(flow, sf.Table(KV))
    assert ms(out) == ms([{"k": 2, "v": 20, "w": 1000}, {"k": 3, "v": 30, "w": 2000}])


def test_join_on_column_left(serve):
    flow = sf.Flow("f")
    left, right = _col_join_branches(flow)
    left.join(right, on="k", how="left")
    out = serve(flow, sf.Table(KV))
    assert ms(out) == ms(
        [
            {"k": 1, "v": 10, "w": None},
            {"k": 2, "v": 20, "w": 1000},
            {"k": 3, "v": 30, "w": 2000},
        ]
    )


def test_join_on_column_outer(serve):
    flow = sf.Flow("f")
    left, right = _col_join_branches(flow)
    left.join(right, on="k", how="outer")
    out = serve(flow, sf.Table(KV))
    assert ms(out) == ms(
        [
            {"k": 1, "v": 10, "w": None},
            {"k": 2, "v": 20, "w": 1000},
            {"k": 3, "v": 30, "w": 2000},
            {"k": 4, "v": None, "w": 3000},
        ]
    )


def test_join_on_column_many_to_many(serve):
    flow = sf.Flow("f")
    left = flow.map(lambda r: (r["g"], r["v"]), names=["g", "v"])
    right = flow.map(lambda r: (r["g"], r["v"] + 1), names=["g", "w"])
    left.join(right, on="g")
    out = serve(flow, sf.Table({"g": ["x", "x", "y"], "v": [1, 2, 3]}))
    assert ms(out) == ms(
        [
            {"g": "x", "v": 1, "w": 2},
            {"g": "x", "v": 1, "w": 3},
            {"g": "x", "v": 2, "w": 2},
            {"g": "x", "v": 2, "w": 3},
            {"g": "y", "v": 3, "w": 4},
        ]
    )


def test_join_on_column_shared_columns_from_left(serve):
    flow = sf.Flow("f")
    left = flow.map(lambda r: (r["k"], "L"), names=["k", "side"])
    right = flow.map(lambda r: (r["k"], "R", r["v"]), names=["k", "side", "v"])
    left.join(right, on="k")
    out = serve(flow, sf.Table(KV))
    assert ms(out) == ms([{"k": k, "side": "L", "v": v} for k, v in zip(KV["k"], KV["v"])])


# --- union / anyof / extend / fan-out ------------------------------------------------


def test_union_all_rows(serve):
    flow = sf.Flow("f")
    one = flow.map(lambda r: r["a"], names=["x"])
    two = flow.filter(lambda r: r["a"] >= 2).map(lambda r: r["a"] * 10, names=["x"])
    three = flow.map(lambda r: r["a"], names=["x"])
    one.union(two, three)
    out = serve(flow, sf.Table(AB))
    assert ms(out) == ms([{"x": x} for x in [1, 2, 3, 20, 30, 1, 2, 3]])


def test_union_fills_missing_columns_with_none(serve):
    flow = sf.Flow("f")
    left = flow.map(lambda r: r["a"], names=["x"])
    right = flow.filter(lambda r: r["a"] == 1).map(lambda r: (r["a"], r["b"]), names=["x", "y"])
    left.union(right)
    out = serve(flow, sf.Table(AB))
    assert set(out.columns) == {"x", "y"}
    assert ms(out) == ms(
        [{"x": 1, "y": None}, {"x": 2, "y": None}, {"x": 3, "y": None}, {"x": 1, "y": 10}]
    )


def test_anyof(serve):
    flow = sf.Flow("f")
    fast = flow.map(lambda r: r["a"] * 2, names=["y"])
    slow = flow.map(lambda r: r["a"] + r["a"], names=["y"])
    third = flow.map(lambda r: r["a"] * 3 - r["a"], names=["y"])
    fast.anyof(slow, third)
    out = serve(flow, sf.Table(AB))
    assert ms(out) == ms([{"y": 2}, {"y": 4}, {"y": 6}])


def test_anyof_then_map(serve):
    flow = sf.Flow("f")
    one = flow.map(lambda r: r["a"] * 2, names=["y"])
    two = flow.map(lambda r: r["a"] * 2, names=["y"])
    one.anyof(two).map(lambda r: r["y"] + 1, names=["z"])
    out = serve(flow, sf.Table(AB))
    assert ms(out) == ms([{"z": 3}, {"z": 5}, {"z": 7}])


def test_extend(serve):
    flow1 = sf.Flow("first")
    stream = flow1.map(lambda r: r["a"] + 1, names=["a"])
    flow2 = sf.Flow("second")
    flow2.map(lambda r: r["a"] * 10, names=["z"]).filter(lambda r: r["z"] > 20)
    stream.extend(flow2)
    out = serve(flow1, sf.Table(AB))
    assert ms(out) == ms([{"z": 30}, {"z": 40}])


def test_extend_result_is_a_stream(serve):
    flow1 = sf.Flow("first")
    flow2 = sf.Flow("second")
    flow2.map(lambda r: r["a"] * 10, names=["a"])
    flow1.filter(lambda r: r["a"] != 2).extend(flow2).map(lambda r: r["a"] + 1, names=["a"])
    out = serve(flow1, sf.Table(AB))
    assert ms(out) == ms([{"a": 11}, {"a": 31}])


def test_fan_out_joined(serve):
    flow = sf.Flow("f")
    shared = flow.map(lambda r: r["a"] * 10, names=["t"])
    plus = shared.map(lambda r: r["t"] + 1, names=["plus"])
    evens = shared.filter(lambda r: r["t"] % 20 == 0).map(lambda r: r["t"] // 2, names=["half"])
    plus.join(evens, how="left")
    out = serve(flow, sf.Table(AB))
    assert ms(out) == ms(
        [{"plus": 11, "half": None}, {"plus": 21, "half": 10}, {"plus": 31, "half": None}]
    )


def test_empty_request(serve):
    flow = sf.Flow("f")
    flow.map(lambda r: r["a"] + 1, names=["x"])
    out = serve(flow, sf.Table({"a": []}))
    assert len(out) == 0


def test_many_requests_on_one_app(deploy):
    flow = sf.Flow("f")
    flow.map(lambda r: r["a"] * 3, names=["x"]).filter(lambda r: r["x"] % 2 == 0)
    with deploy(flow) as app:
        futures = {i: app.run(sf.Table({"a": [i, i + 1]})) for i in range(20)}
        for i, fut in futures.items():
            expected = [x * 3 for x in (i, i + 1) if x * 3 % 2 == 0]
            assert list(fut.result(timeout=TIMEOUT).column("x")) == expected


def test_deploy_on_explicit_local_runtime():
    flow = sf.Flow("f")
    flow.lookup("k")
    runtime = sf.LocalRuntime()
    try:
        runtime.kvs.put("k", "v")
        with flow.deploy(runtime=runtime) as app:
            assert app.kvs.get("k") == "v"
            out = app.run(sf.Table({"a": [1]})).result(timeout=TIMEOUT)
        assert out.to_rows() == [{"a": 1, "k": "v"}]
        with flow.deploy(runtime=runtime) as app:  # the runtime outlives its apps
            assert app.run(sf.Table({"a": [2]})).result(timeout=TIMEOUT).to_rows() == [
                {"a": 2, "k": "v"}
            ]
    finally:
        runtime.stop()


def test_deploy_default_rules_and_stop():
    flow = sf.Flow("f")
    flow.map(lambda r: r["a"] + 1, names=["x"])
    app = flow.deploy()
    try:
        assert app.run(sf.Table({"a": [1]})).result(timeout=TIMEOUT).to_rows() == [{"x": 2}]
    finally:
        app.stop()


# --- StageExecutor.run(should_stop=...): cancellation inside a fused stage ------------


def _executor(flow):
    (stage,) = sf.optimize(flow).stages
    return StageExecutor(stage, MemoryKVS())


def test_should_stop_between_rows_fails_only_that_request():
    seen = {"first": [], "second": [], "third": []}

    def first(v):
        seen["first"].append(v)
        return v + 1

    def second(v):
        seen["second"].append(v)
        return v * 10

    def third(row):
        seen["third"].append(row["a"])
        return True

    flow = sf.Flow("f")
    flow.map(first, col="a", name="first").map(second, col="a", name="second").filter(
        third, name="third"
    )
    executor = _executor(flow)
    asked = []

    def should_stop(k):  # request 0 is stopped once "first" has done 2 of its rows
        asked.append(k)
        return k == 0 and len([v for v in seen["first"] if v < 10]) >= 2

    requests = [{0: sf.Table({"a": [1, 2, 3, 4]})}, {0: sf.Table({"a": [10, 20, 30]})}]
    stopped, done = executor.run(requests, should_stop=should_stop)

    assert isinstance(stopped, DeadlineError)
    assert "stopped: deadline passed or request cancelled" in str(stopped)
    assert "'first'" in str(stopped)
    assert [v for v in seen["first"] if v < 10] == [1, 2]  # the rest of its rows skipped
    assert all(v > 10 for v in seen["second"] + seen["third"])  # later ops never saw it
    assert done.to_rows() == [{"a": 110}, {"a": 210}, {"a": 310}]
    assert set(asked) == {0, 1}
    assert executor.run(requests)[0].to_rows() == [{"a": 20}, {"a": 30}, {"a": 40}, {"a": 50}]


def test_should_stop_before_an_operator_skips_it():
    calls = []
    flow = sf.Flow("f")
    flow.map(lambda v: calls.append(v) or v, col="a", name="one").map(
        lambda v: calls.append(-v) or v, col="a", name="two"
    )
    executor = _executor(flow)
    stopped_after_one = lambda k: len(calls) >= 2  # noqa: E731
    (out,) = executor.run([{0: sf.Table({"a": [1, 2]})}], should_stop=stopped_after_one)
    assert isinstance(out, DeadlineError)
    assert "'two'" in str(out)
    assert calls == [1, 2]


def test_should_stop_drops_stopped_requests_from_a_merged_batch():
    batches = []

    def double(values):
        batches.append(list(values))
        return [v * 2 for v in values]

    flow = sf.Flow("f")
    flow.map(double, col="a", batching=True, name="double")
    executor = _executor(flow)
    requests = [{0: sf.Table({"a": [i, i + 1]})} for i in (1, 10, 100)]
    outs = executor.run(requests, should_stop=lambda k: k == 1)
    assert batches == [[1, 2, 100, 101]]  # one call, without request 1's rows
    assert outs[0].to_rows() == [{"a": 2}, {"a": 4}]
    assert isinstance(outs[1], DeadlineError) and "'double'" in str(outs[1])
    assert outs[2].to_rows() == [{"a": 200}, {"a": 202}]
