"""Routing by expected finish time: a request's parallel branches run at once on
distinct workers, a chain stays on one worker, and a run avoids a worker with long
work ahead of it."""

from __future__ import annotations

import time

import pytest

import serveflow as sf
from serveflow.runtime.scheduler import Scheduler, WorkerLoad

BRANCH_S = 0.4


def _slow_left(row: sf.Row) -> int:
    time.sleep(BRANCH_S)
    return row["x"] + 1


def _slow_right(row: sf.Row) -> int:
    time.sleep(BRANCH_S)
    return row["x"] * 2


def _fork_join() -> sf.Flow:
    flow = sf.Flow("fork", schema={"x": int})
    source = flow.map(lambda r: r["x"], names=["x"], name="source")
    left = source.map(_slow_left, names=["left"], name="left")
    right = source.map(_slow_right, names=["right"], name="right")
    left.join(right)
    return flow


@pytest.mark.timeout(120)
def test_parallel_branches_of_one_request_run_at_once_on_distinct_workers():
    runtime = sf.LocalRuntime(min_workers=2, max_workers=2)
    try:
        app = _fork_join().deploy(runtime=runtime)
        for x in range(3):  # warm: both branches loaded, run times measured
            app.run({"x": [x]}).result(timeout=60)
        for x in range(3):
            started = time.monotonic()
            out = app.run({"x": [x]}).result(timeout=60)
            took = time.monotonic() - started
            assert out.to_rows() == [{"left": x + 1, "right": 2 * x}]
            # one after the other they would take 2 * BRANCH_S
            assert took < 1.6 * BRANCH_S, f"branches ran one after the other: {took:.2f} s"
    finally:
        runtime.stop()


def _route(plan, workers, costs):
    for w in workers.values():
        w.warm |= {(0, i) for i in range(len(plan.stages))}
    route, _ = Scheduler().route(0, plan, workers, costs=costs)
    return [chosen[0] for chosen in route]


def test_a_chain_stays_on_one_worker_and_branches_split_when_run_times_are_known():
    plan = _fork_join().optimize(sf.Rules(fusion=False))
    names = [stage.name for stage in plan.stages]
    assert names[:3] == ["source", "left", "right"]
    costs = [1e-4, 0.4, 0.4] + [1e-4] * (len(names) - 3)
    route = _route(plan, {0: WorkerLoad(), 1: WorkerLoad()}, costs)
    assert route[1] != route[2]  # the two slow branches in parallel
    assert route[0] in (route[1], route[2])  # the source next to one, not a hop away

    chain = sf.Flow("chain", schema={"x": int})
    chain.map(lambda r: r["x"], name="a").map(lambda r: r["x"], name="b")
    chain_plan = chain.optimize(sf.Rules(fusion=False))
    route = _route(chain_plan, {0: WorkerLoad(), 1: WorkerLoad()}, [0.01, 0.01])
    assert route[0] == route[1]


def test_a_run_avoids_the_worker_with_long_work_ahead_even_with_fewer_runs():
    flow = sf.Flow("one", schema={"x": int})
    flow.map(lambda r: r["x"], name="cheap")
    plan = flow.optimize()
    # worker 0: one 2 s run in progress; worker 1: three cheap runs of requests in flight
    workers = {0: WorkerLoad(outstanding=1, work=2.0), 1: WorkerLoad(outstanding=3, work=3e-4)}
    assert _route(plan, workers, [1e-4]) == [1]
    # without run times, as before: the fewest outstanding runs
    assert Scheduler().route(0, plan, workers)[0][0] == (0,)
