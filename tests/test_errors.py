"""Errors: FlowError when building/optimizing, OperatorError and InputError at run time."""

import numpy as np
import pytest

import serveflow as sf

TIMEOUT = 10
# tests deploying through `deploy`/`serve` run on the embedded runtime and on Ray
RUNTIMES = ("local", "ray")


def assert_serves(app):
    """The deployment still answers a good request (every flow here maps "x" -> "y")."""
    out = app.run(sf.Table({"x": [1, 2]})).result(timeout=TIMEOUT)
    assert sorted(out.column("y")) == [2, 4]


# --- FlowError at the call that adds the operator ------------------------------------


def test_unknown_agg_function():
    flow = sf.Flow("f")
    with pytest.raises(sf.FlowError, match=r"(?i)agg"):
        flow.agg("median", "x")


def test_unknown_agg_function_grouped():
    flow = sf.Flow("f")
    with pytest.raises(sf.FlowError, match=r"(?i)agg"):
        flow.groupby("g").agg("median", "x")


def test_join_how_right():
    flow = sf.Flow("f")
    left = flow.map(lambda r: r["x"], names=["a"])
    right = flow.map(lambda r: r["x"], names=["b"])
    with pytest.raises(sf.FlowError, match=r"(?i)join"):
        left.join(right, how="right")


def test_group_filter_on_ungrouped_stream():
    flow = sf.Flow("f")
    with pytest.raises(sf.FlowError, match=r"(?i)filter"):
        flow.filter(lambda t: len(t) > 1, group=True)


@pytest.mark.parametrize(
    "add",
    [
        lambda g: g.map(lambda r: r["x"], names=["x"]),
        lambda g: g.lookup("k"),
        lambda g: g.groupby("x"),
        lambda g: g.union(g),
    ],
    ids=["map", "lookup", "groupby", "union"],
)
def test_other_operators_on_grouped_stream(add):
    grouped = sf.Flow("f").groupby("g")
    with pytest.raises(sf.FlowError):
        add(grouped)


def test_empty_flow_rejected_at_optimize_and_deploy():
    with pytest.raises(sf.FlowError):
        sf.optimize(sf.Flow("empty"), sf.Rules())
    with pytest.raises(sf.FlowError):
        sf.Flow("empty").deploy()


def test_two_sinks_rejected_at_optimize_and_deploy():
    flow = sf.Flow("f")
    flow.map(lambda r: r["x"], names=["a"])
    flow.filter(lambda r: r["x"] > 0)
    with pytest.raises(sf.FlowError):
        sf.optimize(flow, sf.Rules())
    with pytest.raises(sf.FlowError):
        flow.deploy()


def test_two_sinks_after_shared_prefix_rejected():
    flow = sf.Flow("f")
    shared = flow.map(lambda r: r["x"] + 1, names=["x"])
    shared.map(lambda r: r["x"], names=["a"])
    shared.map(lambda r: r["x"], names=["b"]).filter(lambda r: True)
    with pytest.raises(sf.FlowError):
        sf.optimize(flow, sf.Rules(fusion=False))


# --- OperatorError: a user function fails --------------------------------------------


def explode(row):
    if row["x"] < 0:
        raise ValueError("boom")
    return row["x"] * 2


def test_operator_error_names_operator_and_keeps_serving(deploy):
    flow = sf.Flow("f")
    flow.map(explode, names=["y"])
    with deploy(flow) as app:
        bad = app.run(sf.Table({"x": [1, -1, 2]}))
        goods = [app.run(sf.Table({"x": [i]})) for i in range(5)]
        with pytest.raises(sf.OperatorError) as info:
            bad.result(timeout=TIMEOUT)
        for i, fut in enumerate(goods):
            assert fut.result(timeout=TIMEOUT).to_rows() == [{"y": i * 2}]
        assert_serves(app)
    err = info.value
    assert "explode" in str(err)
    assert "boom" in str(err)
    assert err.operator == "explode"
    assert isinstance(err.traceback, str) and err.traceback.strip()


def test_operator_error_in_middle_of_chain(deploy):
    flow = sf.Flow("f")
    flow.map(lambda r: r["x"] - 10, names=["x"]).map(explode, names=["z"]).map(
        lambda r: r["z"], names=["y"]
    )
    with deploy(flow) as app:
        with pytest.raises(sf.OperatorError, match="explode") as info:
            app.run(sf.Table({"x": [1]})).result(timeout=TIMEOUT)
        assert "boom" in str(info.value)
        out = app.run(sf.Table({"x": [11, 12]})).result(timeout=TIMEOUT)
        assert sorted(out.column("y")) == [2, 4]


def test_operator_error_uses_name_keyword(deploy):
    flow = sf.Flow("f")
    flow.map(explode, names=["y"], name="detonator")
    with deploy(flow) as app:
        with pytest.raises(sf.OperatorError, match="detonator") as info:
            app.run(sf.Table({"x": [-1]})).result(timeout=TIMEOUT)
        assert info.value.operator == "detonator"
        assert_serves(app)


def test_operator_error_lambda_named_by_kind(deploy):
    flow = sf.Flow("f")
    flow.map(lambda r: 2 * r["x"] if r["x"] else 1 / 0, names=["y"])
    with deploy(flow) as app:
        with pytest.raises(sf.OperatorError) as info:
            app.run(sf.Table({"x": [0]})).result(timeout=TIMEOUT)
        assert info.value.operator == "map"
        assert "map" in str(info.value)
        assert_serves(app)


def test_operator_error_in_competing_replicas(deploy):
    flow = sf.Flow("f")
    flow.map(explode, names=["y"], high_variance=True)
    with deploy(flow) as app:
        with pytest.raises(sf.OperatorError, match="explode"):
            app.run(sf.Table({"x": [-1]})).result(timeout=TIMEOUT)
        assert_serves(app)


def test_operator_error_before_competing_replicas_fails_the_request(deploy):
    """A failure reaching competing replicas fails the request: each copy fails, and
    the stage after them runs where each copy ran, so each of its runs sees one
    failure (it once waited for one per replica, and the request hung)."""
    flow = sf.Flow("f")
    failed = flow.map(explode, names=["x"]).map(lambda r: r["x"], names=["x"], high_variance=True)
    failed.map(lambda r: r["x"], names=["y"])
    with deploy(flow) as app:
        with pytest.raises(sf.OperatorError, match="explode"):
            app.run(sf.Table({"x": [-1]})).result(timeout=TIMEOUT)
        assert_serves(app)


def bad_dict_lookup(row):
    return {"k": 1}["nope"] if row["x"] < 0 else row["x"] * 2


def test_user_keyerror_is_operator_error_not_input_error(deploy):
    flow = sf.Flow("f")
    flow.map(bad_dict_lookup, names=["y"])
    with deploy(flow) as app:
        with pytest.raises(sf.OperatorError, match="bad_dict_lookup"):
            app.run(sf.Table({"x": [-1]})).result(timeout=TIMEOUT)
        assert_serves(app)


def failing_pred(row):
    raise RuntimeError("pred exploded")


def test_operator_error_in_filter(deploy):
    flow = sf.Flow("f")
    flow.map(lambda r: r["x"] * 2, names=["y"]).filter(failing_pred)
    with deploy(flow) as app, pytest.raises(sf.OperatorError) as info:
        app.run(sf.Table({"x": [1]})).result(timeout=TIMEOUT)
    assert "failing_pred" in str(info.value)
    assert "pred exploded" in str(info.value)


def test_operator_error_in_batching_map(deploy):
    def bad_batch(table):
        raise ValueError("batch boom")

    flow = sf.Flow("f")
    flow.map(bad_batch, names=["y"], batching=True)
    with deploy(flow) as app, pytest.raises(sf.OperatorError) as info:
        app.run(sf.Table({"x": [1]})).result(timeout=TIMEOUT)
    assert "bad_batch" in str(info.value)
    assert "batch boom" in str(info.value)


def pair_or_scalar(row):
    return row["x"] * 2 if row["x"] < 0 else (row["x"] * 2, 0)


@pytest.mark.parametrize(
    "fn",
    [pair_or_scalar, lambda r: (r["x"], 1, 2) if r["x"] < 0 else (r["x"] * 2, 0)],
    ids=["scalar", "3-tuple"],
)
def test_wrong_number_of_values_for_names(deploy, fn):
    flow = sf.Flow("f")
    flow.map(fn, names=["y", "zero"])
    with deploy(flow) as app:
        with pytest.raises(sf.OperatorError):
            app.run(sf.Table({"x": [-1]})).result(timeout=TIMEOUT)
        out = app.run(sf.Table({"x": [1, 2]})).result(timeout=TIMEOUT)
        assert sorted(out.column("y")) == [2, 4]


def test_batching_map_wrong_number_of_results(deploy):
    flow = sf.Flow("f")
    flow.map(lambda t: [1], names=["y"], batching=True)
    with deploy(flow) as app, pytest.raises(sf.OperatorError):
        app.run(sf.Table({"x": [1, 2, 3]})).result(timeout=TIMEOUT)


# --- InputError: schema violations and missing columns -------------------------------


def schema_flow():
    flow = sf.Flow("typed", schema={"x": int})
    flow.map(lambda r: r["x"] * 2, names=["y"])
    return flow


@pytest.mark.parametrize(
    "table",
    [sf.Table({"z": [1]}), sf.Table({"x": ["str"]}), sf.Table({"x": [1, "2"]})],
    ids=["missing", "wrong-type", "one-bad-value"],
)
def test_schema_violation_fails_future_with_input_error(deploy, table):
    with deploy(schema_flow()) as app:
        fut = app.run(table)  # must not raise synchronously
        with pytest.raises(sf.InputError, match="x") as info:
            fut.result(timeout=TIMEOUT)
        assert info.value.column == "x"
        assert not isinstance(info.value, sf.OperatorError)
        assert_serves(app)


def test_schema_with_numpy_and_str_types(deploy):
    flow = sf.Flow("typed", schema={"img": np.ndarray, "user": str})
    flow.map(lambda r: (r["user"], float(r["img"].sum())), names=["user", "total"])
    with deploy(flow) as app:
        good = sf.Table({"img": [np.ones(3)], "user": ["ann"]})
        assert app.run(good).result(timeout=TIMEOUT).to_rows() == [{"user": "ann", "total": 3.0}]
        bad = sf.Table({"img": [[1.0, 2.0]], "user": ["ann"]})
        with pytest.raises(sf.InputError, match="img") as info:
            app.run(bad).result(timeout=TIMEOUT)
        assert info.value.column == "img"


def test_schema_extra_columns_allowed(deploy):
    with deploy(schema_flow()) as app:
        out = app.run(sf.Table({"x": [3], "extra": ["e"]})).result(timeout=TIMEOUT)
        assert out.to_rows() == [{"y": 6}]


def test_schema_validated_before_any_work(deploy, tmp_path):
    log = str(tmp_path / "log")

    def record(row):
        with open(log, "a") as f:
            f.write("called\n")
        return row["x"]

    flow = sf.Flow("typed", schema={"x": int})
    flow.map(record, names=["y"])
    with deploy(flow) as app, pytest.raises(sf.InputError):
        app.run(sf.Table({"x": [1, "bad"]})).result(timeout=TIMEOUT)
    assert not (tmp_path / "log").exists()


def read_nope_in_batch(table):
    return [r["x"] * 2 if r["x"] > 0 else table.column("nope") for r in table]


@pytest.mark.parametrize("op", ["map", "filter", "batching"])
def test_missing_column_in_operator_is_input_error(deploy, op):
    flow = sf.Flow("f")
    if op == "map":
        flow.map(lambda r: r["nope"] if r["x"] < 0 else r["x"] * 2, names=["y"])
    elif op == "filter":
        flow.filter(lambda r: r["x"] > 0 or r["nope"]).map(lambda r: r["x"] * 2, names=["y"])
    else:
        flow.map(read_nope_in_batch, names=["y"], batching=True)
    with deploy(flow) as app:
        with pytest.raises(sf.InputError, match="nope") as info:
            app.run(sf.Table({"x": [-1]})).result(timeout=TIMEOUT)
        assert info.value.column == "nope"
        assert not isinstance(info.value, sf.OperatorError)
        assert_serves(app)


def test_missing_column_after_upstream_map(deploy):
    flow = sf.Flow("f")
    flow.map(lambda r: r["x"], names=["a"]).map(lambda r: r["x"], names=["y"])
    with deploy(flow) as app:
        with pytest.raises(sf.InputError, match="x") as info:
            app.run(sf.Table({"x": [1]})).result(timeout=TIMEOUT)
        assert info.value.column == "x"


def test_errors_are_distinct_exception_types():
    assert issubclass(sf.FlowError, Exception)
    assert issubclass(sf.OperatorError, Exception)
    assert issubclass(sf.InputError, Exception)
    assert not issubclass(sf.InputError, sf.OperatorError)


def test_a_failure_before_parallel_branches_and_joins_fails_the_request():
    """A failure passes through parallel branches to the joins that meet them; a join
    runs as soon as one input failed, and its other input, still missing, must not
    stand in for the failure (the request used to succeed with None). Two workers, so
    that the branches' failures arrive in any order."""
    flow = sf.Flow("branches")
    doubled = flow.map(explode, names=["y"], name="explode")
    a = doubled.map(lambda r: r["y"], names=["y"], name="a")
    b = doubled.map(lambda r: r["y"], names=["b"], name="b")
    c = doubled.map(lambda r: r["y"], names=["c"], name="c")
    a.join(b).join(c).map(lambda r: r["y"], names=["y"], name="after")
    runtime = sf.LocalRuntime(min_workers=2, max_workers=2)
    try:
        with flow.deploy(runtime=runtime) as app:
            assert_serves(app)  # every stage loaded
            for _ in range(8):
                with pytest.raises(sf.OperatorError, match=r"explode.*boom"):
                    app.run(sf.Table({"x": [-1]})).result(timeout=TIMEOUT)
            assert_serves(app)
    finally:
        runtime.stop()
