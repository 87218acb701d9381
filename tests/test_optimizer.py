"""sf.optimize: the physical plan chosen under each rule, and explain()."""

import shutil
import time

import pytest

import serveflow as sf

TIMEOUT = 10
NO_GPU = shutil.which("nvidia-smi") is None


def inc(row):
    return row["a"] + 1


def double(row):
    return row["a"] * 2


def square(row):
    return row["a"] ** 2


def chain3():
    flow = sf.Flow("chain")
    flow.map(inc, names=["a"]).map(double, names=["a"]).map(square, names=["a"])
    return flow


def test_plan_shape():
    plan = sf.optimize(chain3(), sf.Rules())
    assert isinstance(plan, sf.Plan)
    assert isinstance(plan.explain(), str) and plan.explain()
    assert len(plan.stages) >= 1
    for stage in plan.stages:
        assert isinstance(stage.name, str) and stage.name
        assert isinstance(stage.replicas, int) and stage.replicas >= 1


def test_fusion_of_linear_chain():
    plan = sf.optimize(chain3(), sf.Rules())
    assert "fused" in plan.explain().lower()
    assert len(plan.stages) == 1


def test_no_fusion():
    plan = sf.optimize(chain3(), sf.Rules(fusion=False))
    assert "fused" not in plan.explain().lower()
    assert len(plan.stages) == 3


def test_stage_names_use_operator_names():
    flow = sf.Flow("f")
    flow.map(inc, names=["a"]).map(double, names=["a"], name="twice")
    names = [s.name for s in sf.optimize(flow, sf.Rules(fusion=False)).stages]
    assert any("inc" in n for n in names)
    assert any("twice" in n for n in names)
    assert len(set(names)) == len(names)


def test_competitive_replicas():
    flow = sf.Flow("f")
    flow.map(inc, names=["a"], high_variance=True)
    plan = sf.optimize(flow, sf.Rules(compete=True, compete_replicas=2))
    assert "replicated" in plan.explain().lower()
    assert [s.replicas for s in plan.stages] == [3]


def test_no_replicas_without_compete():
    flow = sf.Flow("f")
    flow.map(inc, names=["a"], high_variance=True)
    plan = sf.optimize(flow, sf.Rules())
    assert "replicated" not in plan.explain().lower()
    assert [s.replicas for s in plan.stages] == [1]


def test_only_high_variance_stage_replicated():
    flow = sf.Flow("f")
    flow.map(inc, names=["a"]).map(double, names=["a"], high_variance=True).map(square, names=["a"])
    plan = sf.optimize(flow, sf.Rules(fusion=False, compete=True, compete_replicas=2))
    assert sorted(s.replicas for s in plan.stages) == [1, 1, 3]


def test_batching_marked():
    flow = sf.Flow("f")
    flow.map(lambda t: [r["a"] for r in t], names=["a"], batching=True)
    plan = sf.optimize(flow, sf.Rules())
    assert "batched" in plan.explain().lower()


@pytest.mark.skipif(not NO_GPU, reason="machine has a GPU")
def test_gpu_placed_on_cpu_without_gpu():
    flow = sf.Flow("f")
    flow.map(inc, names=["a"], gpu=True)
    text = sf.optimize(flow, sf.Rules()).explain().lower()
    assert "placed" in text
    assert "cpu" in text


def dyn_lookup_flow():
    flow = sf.Flow("f")
    flow.map(lambda r: str(r["a"]), names=["uid"]).lookup("uid", dynamic=True)
    return flow


def test_locality_breaks_stage_before_dynamic_lookup():
    assert len(sf.optimize(dyn_lookup_flow(), sf.Rules()).stages) == 2
    assert len(sf.optimize(dyn_lookup_flow(), sf.Rules(locality=False)).stages) == 1


def join_flow():
    flow = sf.Flow("f")
    left = flow.map(inc, names=["x"])
    right = flow.filter(lambda r: r["a"] > 1).map(double, names=["y"])
    left.join(right, how="left").map(lambda r: (r["x"], r["y"]), names=["x", "y"])
    return flow


def test_whole_gives_one_stage_even_with_join():
    assert len(sf.optimize(join_flow(), sf.Rules(whole=True)).stages) == 1
    assert len(sf.optimize(join_flow(), sf.Rules(fusion=False)).stages) > 1


def test_whole_gives_one_stage_with_dynamic_lookup():
    flow = dyn_lookup_flow()
    assert len(sf.optimize(flow, sf.Rules(whole=True)).stages) == 1


def test_optimize_does_not_mutate_flow(shared_runtime):
    flow = chain3()
    unfused = sf.optimize(flow, sf.Rules(fusion=False))
    fused = sf.optimize(flow, sf.Rules())
    again = sf.optimize(flow, sf.Rules(fusion=False))
    assert len(unfused.stages) == 3
    assert len(fused.stages) == 1
    assert len(again.stages) == 3
    assert "fused" not in unfused.explain().lower()
    with flow.deploy(rules=sf.Rules(fusion=False), runtime=shared_runtime) as app:
        out = app.run(sf.Table({"a": [1, 2]})).result(timeout=TIMEOUT)
    assert sorted(out.column("a")) == [16, 36]


def eventually(check, timeout=5.0):
    """Poll `check` until true or `timeout` seconds pass (stats are reported periodically)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_stats_keyed_by_stage_name(shared_runtime):
    flow = sf.Flow("f")
    flow.map(inc, names=["a"]).map(lambda t: [r["a"] for r in t], names=["a"], batching=True)
    rules = sf.Rules(fusion=False)
    names = {s.name for s in sf.optimize(flow, rules).stages}
    with flow.deploy(rules=rules, runtime=shared_runtime) as app:
        for i in range(3):
            app.run(sf.Table({"a": [i]})).result(timeout=TIMEOUT)
        assert eventually(lambda: all(f["requests"] == 3 for f in app.stats().values()))
        stats = app.stats()
    assert set(stats) == names
    for figures in stats.values():
        assert figures["requests"] == 3
        for key in ("p50_ms", "p99_ms", "workers", "queue", "batch_mean", "cold_starts"):
            assert key in figures
    assert sum("batch_size" in f and "timeout_ms" in f for f in stats.values()) == 1


def test_the_stages_a_refusal_loses_stop_at_an_anyof_another_branch_answers():
    flow = sf.Flow("lost")
    pre = flow.map(inc, names=["a"], name="pre")
    a = pre.map(inc, names=["a"], name="a1").map(inc, names=["a"], name="a2")
    b = pre.map(inc, names=["a"], name="b")
    inner = a.anyof(b).map(inc, names=["a"], name="inner")
    inner.anyof(flow.map(inc, names=["a"], name="c")).map(inc, names=["a"], name="post")
    plan = sf.optimize(flow, sf.Rules(fusion=False))
    index = {s.name: i for i, s in enumerate(plan.stages)}
    output = plan.index_of(plan.output)

    def lost(*names: str) -> set[str]:
        return {plan.stages[i].name for i in plan.lost_with(index[n] for n in names)}

    assert lost("a2") == {"a1", "a2"}  # its branch, not the anyof b still answers
    both = lost("a1", "b")  # the inner anyof and all that feeds only it; c answers
    assert {"pre", "a1", "a2", "b", "inner"} <= both and "c" not in both
    assert plan.stages[output].name not in both
    assert plan.stages[output].name in lost("a1", "b", "c")
    assert plan.stages[output].name in lost("post")
