"""Routing by expected work: a run avoids a worker busy with a long run even when
that worker has fewer runs outstanding, and a request's chain and branches stay on
one worker unless that worker has other work ahead."""

from __future__ import annotations

import math
import os
import time

import pytest

import serveflow as sf
from serveflow.runtime.scheduler import Scheduler, WorkerLoad

LONG_S, MEDIUM_S = 1.5, 0.1


def _sleep_long(row: sf.Row) -> int:
    time.sleep(LONG_S)
    return row["x"]


def _sleep_medium(row: sf.Row) -> int:
    time.sleep(MEDIUM_S)
    return row["x"]


def _flow(name: str, *steps) -> sf.Flow:
    flow = sf.Flow(name, schema={"x": int})
    table = flow
    for i, step in enumerate(steps):
        table = table.map(step, names=["x"], name=f"{name}{i}")
    return flow


@pytest.mark.timeout(120)
def test_a_cheap_request_avoids_the_worker_busy_with_a_long_run():
    runtime = sf.LocalRuntime(min_workers=2, max_workers=2)
    rules = sf.Rules(fusion=False)
    try:
        slow = _flow("slow", _sleep_long).deploy(runtime=runtime, rules=rules)
        chain = _flow("chain", *[_sleep_medium] * 3).deploy(runtime=runtime, rules=rules)
        cheap = _flow("cheap", lambda r: r["x"]).deploy(runtime=runtime, rules=rules)
        for app in (slow, chain, cheap):  # loaded, and their run times measured
            app.run({"x": [0]}).result(timeout=60)
        time.sleep(1.0)  # workers report run times every 0.25 s
        for _ in range(2):
            long_run = slow.run({"x": [1]})  # one worker: one run, LONG_S to go
            time.sleep(0.2)
            medium = chain.run({"x": [2]})  # the other: three runs, 3 * MEDIUM_S
            time.sleep(0.05)
            started = time.monotonic()
            assert cheap.run({"x": [3]}).result(timeout=60).to_rows() == [{"x": 3}]
            took = time.monotonic() - started
            # behind the long run it would take over 1 s
            assert took < LONG_S / 2, f"waited behind the long run: {took:.2f} s"
            medium.result(timeout=60)
            long_run.result(timeout=60)
    finally:
        runtime.stop()


def _sleep_as_asked(row: sf.Row) -> int:
    time.sleep(row["s"])
    return row["x"]


@pytest.mark.timeout(120)
def test_requests_avoid_a_worker_whose_call_runs_far_past_its_usual_time():
    """A stage whose calls take 20 ms, but one takes 10 s: its worker's expected work
    says 20 ms and it has one run, as the other has once it took the first of a pair,
    so only seeing the call run on (a heartbeat's `busy_since`) keeps the second off
    it."""
    runtime = sf.LocalRuntime(min_workers=2, max_workers=2)
    flow = sf.Flow("usual", schema={"x": int, "s": float})
    flow.map(_sleep_as_asked, names=["x"], name="usual")
    try:
        app = flow.deploy(runtime=runtime)
        warm = [app.run({"x": [i], "s": [0.02]}) for i in range(8)]  # both workers
        assert all(f.result(timeout=60) for f in warm)
        time.sleep(0.5)  # run times reported
        long_call = app.run({"x": [-1], "s": [10.0]})
        time.sleep(2.0)  # running past 1 s, as its worker's heartbeats say
        started = time.monotonic()
        for round_ in range(4):  # pairs: the second finds both workers with one run
            pair = [app.run({"x": [round_], "s": [0.02]}) for _ in range(2)]
            assert [f.result(timeout=60).to_rows() for f in pair] == [[{"x": round_}]] * 2
        took = time.monotonic() - started
        assert took < 3.0, f"requests waited behind the long call: {took:.2f} s"
        assert not long_call.done()
        long_call.result(timeout=60)
    finally:
        runtime.stop()


def _route(plan, workers, costs):
    for w in workers.values():
        w.warm |= {(0, i) for i in range(len(plan.stages))}
    route, _ = Scheduler().route(0, plan, workers, costs=costs)
    return [chosen[0] for chosen in route]


def _fork_join() -> sf.Flow:
    flow = sf.Flow("fork", schema={"x": int})
    source = flow.map(lambda r: r["x"], names=["x"], name="source")
    left = source.filter(lambda r: r["x"] > 0).map(lambda r: r["x"], names=["left"], name="left")
    right = source.filter(lambda r: r["x"] < 0).map(lambda r: r["x"], names=["right"])
    left.join(right, how="outer")
    return flow


def test_a_request_stays_on_one_worker_unless_that_worker_has_work_ahead():
    plan = _fork_join().optimize(sf.Rules(fusion=False))
    costs = [1e-4] + [0.02] * (len(plan.stages) - 1)
    # idle workers: chain and branches together, no hop
    assert len(set(_route(plan, {0: WorkerLoad(), 1: WorkerLoad()}, costs))) == 1
    # the source goes to the worker with less work; a stage after it moves only if
    # its worker has more work ahead than the stage's input is away
    route = _route(plan, {0: WorkerLoad(work=0.5), 1: WorkerLoad(outstanding=4, work=0.01)}, costs)
    assert set(route) == {1}


def _one_stage():
    flow = sf.Flow("one", schema={"x": int})
    flow.map(lambda r: r["x"], name="cheap")
    return flow.optimize()


def test_a_run_avoids_the_worker_with_long_work_ahead_even_with_fewer_runs():
    plan = _one_stage()
    # worker 0: one 2 s run in progress; worker 1: three cheap runs of requests in flight
    workers = {0: WorkerLoad(outstanding=1, work=2.0), 1: WorkerLoad(outstanding=3, work=3e-4)}
    assert _route(plan, workers, [1e-4]) == [1]
    # without run times, as before: the fewest outstanding runs
    assert Scheduler().route(0, plan, workers)[0][0] == (0,)


def _race(chains: bool) -> sf.Flow:
    """Two slow branches and a fast one into an anyof; each a chain of two stages when
    `chains`, and a stage after the anyof."""
    flow = sf.Flow("race", schema={"x": int})
    branches = []
    for name in ("slow1", "slow2", "fast"):
        branch = flow.map(lambda r: r["x"], names=["x"], name=name)
        if chains:
            branch = branch.map(lambda r: r["x"], names=["x"], name=f"{name}_b")
        branches.append(branch)
    branches[0].anyof(*branches[1:]).map(lambda r: r["x"], names=["x"], name="after")
    return flow


def _race_route(plan, workers, slow_s: float | None) -> dict[str, int]:
    """Route one request of `_race`'s plan, its slow branches expected to take
    `slow_s` (math.inf: they lost a race and are still running; None: not measured)
    and its fast one a millisecond: {stage name: worker}."""
    for w in workers.values():
        w.warm |= {(0, i) for i in range(len(plan.stages))}
    expected = {}
    for _, branches in plan.anyof_races:
        for branch in branches:
            fast = plan.stages[branch[0]].name.startswith("fast")
            expected.update(dict.fromkeys(branch, 1e-3 if fast else slow_s))
    costs = [1e-3] * len(plan.stages)
    route, _ = Scheduler().route(0, plan, workers, expected=expected, costs=costs)
    return {stage.name: chosen[0] for stage, chosen in zip(plan.stages, route, strict=True)}


@pytest.mark.parametrize("chains", [False, True], ids=["stages", "chains"])
def test_an_anyof_avoids_the_worker_busy_with_an_earlier_requests_loser(chains):
    """The losers of an earlier request still run (their request was answered by the
    fast branch): one worker holds them, the others are idle. The anyof's own stage
    avoids its branches' workers; when the only other worker is the one running a
    loser, it goes to the fast branch's worker, free once that branch wins, not
    behind the loser (the CI failures of `test_anyof_*` in test_runtime_core: the
    request took the loser's 2-3 s). The stage after it avoids the loser too."""
    plan = _race(chains).optimize(sf.Rules(fusion=False))
    workers = {w: WorkerLoad() for w in range(3)}  # one per branch
    workers[3] = WorkerLoad(outstanding=1, losing=1)  # its run's cost was released
    route = _race_route(plan, workers, math.inf)
    assert 3 not in route.values(), route
    assert route["anyof"] == route["fast_b" if chains else "fast"], route
    # while the branches' run times are not known, the anyof keeps off them
    unknown = _race_route(plan, {w: WorkerLoad() for w in range(5)}, None)
    branch_workers = {w for name, w in unknown.items() if name not in ("anyof", "after")}
    assert unknown["anyof"] not in branch_workers, unknown


def test_an_anyof_with_a_worker_for_each_branch_and_none_more_goes_after_the_winner():
    """As many workers as branches: the anyof's stage cannot keep off them all, and went
    to the least loaded, the worker where it ran before (warm) as likely as any: here a
    slow branch's, whose call it waited for (the pool had grown, and the branches moved)."""
    plan = _race(False).optimize(sf.Rules(fusion=False))
    anyof = next(i for i, stage in enumerate(plan.stages) if stage.name == "anyof")
    workers = {w: WorkerLoad() for w in range(3)}
    for w, load in workers.items():
        load.warm |= {(0, i) for i in range(len(plan.stages)) if i != anyof or w == 2}
    expected = {}
    for _, branches in plan.anyof_races:
        for branch in branches:
            fast = plan.stages[branch[0]].name == "fast"
            expected.update(dict.fromkeys(branch, 1e-3 if fast else math.inf))
    costs = [1e-3] * len(plan.stages)
    route, _ = Scheduler().route(0, plan, workers, expected=expected, costs=costs)
    names = {stage.name: chosen[0] for stage, chosen in zip(plan.stages, route, strict=True)}
    assert names["anyof"] == names["fast"], names


def test_a_run_avoids_a_worker_running_a_loser_whatever_its_counts():
    # worker 0 runs a loser (its expected work released with its request); worker 1
    # has two cheap runs queued
    plan = _one_stage()
    workers = {0: WorkerLoad(outstanding=1, losing=1), 1: WorkerLoad(outstanding=2, work=2e-3)}
    assert _route(plan, workers, [1e-3]) == [1]
    workers[0].losing = 0  # its loser is done: worker 0 is the less busy
    assert _route(plan, workers, [1e-3]) == [0]


LOAD_S, CALL_S = 3.0, 0.05


class _SlowLoadingModel:
    """A model whose load takes LOAD_S (weights read, a graph built) and calls CALL_S."""

    def __init__(self) -> None:
        time.sleep(LOAD_S)

    def __call__(self, row: sf.Row) -> int:
        time.sleep(CALL_S)
        return os.getpid()


def _bursts_wait_for_the_warm_worker(flow: sf.Flow, load_s: float, what: str) -> sf.App:
    """Deploy `flow` (one stage whose load takes `load_s`) on two workers, load it on
    one, and check that a burst stays on that worker while the other loads it, then
    that the other takes its share. Returns the app (its runtime: the caller's)."""
    runtime = sf.LocalRuntime(min_workers=2, max_workers=2)
    app = flow.deploy(runtime=runtime)
    try:
        app.run({"x": [0]}).result(timeout=60)  # loaded on one worker only
        time.sleep(1.0)  # its run time reported
        started = time.monotonic()
        burst = [app.run({"x": [i]}) for i in range(6)]
        waited = [f.result(timeout=60) and time.monotonic() - started for f in burst]
        assert max(waited) < load_s / 2, f"a request waited for a {what} load: {waited}"
        time.sleep(load_s + 1.0)  # the other worker has loaded it by now
        pids = set()
        for _ in range(3):
            burst = [app.run({"x": [i]}) for i in range(6)]
            pids |= {f.result(timeout=60).column("pid")[0] for f in burst}
        assert len(pids) == 2, f"the second worker never took the {what}'s runs"
    except BaseException:
        runtime.stop()
        raise
    return app


@pytest.mark.timeout(120)
def test_requests_wait_for_no_model_load_while_a_worker_has_the_model_loaded():
    # Two workers, the model loaded on one: a burst must not be routed onto the other
    # (it would wait LOAD_S for the load there); the other loads it meanwhile and then
    # takes its share.
    flow = sf.Flow("model", schema={"x": int})
    flow.map(_SlowLoadingModel, names=["pid"])
    app = _bursts_wait_for_the_warm_worker(flow, LOAD_S, "model")
    try:
        assert app.stats()["_SlowLoadingModel"]["cold_starts"] == 2
    finally:
        app.runtime.stop()


IMPORT_S = 1.5


class _SlowToUnpickle:
    """Takes IMPORT_S to unpickle, as a function whose module imports big libraries
    takes to load (unpickling it imports them)."""

    def __reduce__(self):
        return (time.sleep, (IMPORT_S,))


def _slow_to_load():
    """A plain function (no class: no model) whose load takes IMPORT_S."""
    imported = _SlowToUnpickle()

    def pid(row: sf.Row) -> int:
        time.sleep(CALL_S if imported is None else 0.0)  # None once unpickled
        return os.getpid()

    return pid


@pytest.mark.timeout(120)
def test_requests_wait_for_no_function_load_while_a_worker_has_the_function_loaded():
    # As for a model: the burst stays on the worker that has the function loaded
    # while the other loads it, then the other takes its share.
    flow = sf.Flow("function", schema={"x": int})
    flow.map(_slow_to_load(), names=["pid"])
    _bursts_wait_for_the_warm_worker(flow, IMPORT_S, "function").runtime.stop()


@pytest.mark.timeout(120)
def test_no_request_waits_for_a_load_in_the_background():
    # A plain stage then a model, unfused, on two workers that have both loaded on
    # one. Requests reach the other worker for the plain stage while it is asked to
    # load the model in the background; neither they nor later requests wait for it
    # (the worker used to load it before running the inputs already sent to it).
    runtime = sf.LocalRuntime(min_workers=2, max_workers=2)
    try:
        flow = sf.Flow("pair", schema={"x": int})
        plain = flow.map(lambda r: r["x"], names=["x"], name="plain")
        plain.map(_SlowLoadingModel, names=["pid"])
        app = flow.deploy(runtime=runtime, rules=sf.Rules(fusion=False))
        app.run({"x": [0]}).result(timeout=60)  # both loaded on one worker
        waited = []
        for _ in range(4):
            time.sleep(1.0)  # loads and run times reported
            started = time.monotonic()
            burst = [app.run({"x": [i]}) for i in range(6)]
            waited += [f.result(timeout=60) and time.monotonic() - started for f in burst]
        assert max(waited) < LOAD_S / 2, f"a request waited for a load: {max(waited):.2f} s"
    finally:
        runtime.stop()


def _pid_after(row: sf.Row) -> int:
    time.sleep(row["x"])
    return os.getpid()


@pytest.mark.timeout(120)
def test_a_burst_waits_for_room_instead_of_piling_onto_the_worker_not_in_a_long_call():
    # Worker A in a long call takes no new runs, and B takes only the runs it has room
    # for (worker_queue): the rest of a burst waits at the driver, so A takes it once
    # its call ends. Before, the room A had let the whole burst be routed onto B, to
    # wait there behind B's own long run while A sat idle.
    runtime = sf.LocalRuntime(min_workers=2, max_workers=2, worker_queue=4)
    try:
        flow = sf.Flow("sleepy", schema={"x": float})
        flow.map(_pid_after, names=["pid"])
        app = flow.deploy(runtime=runtime)
        warm = [app.run({"x": [0.2]}) for _ in range(4)]
        assert len({f.result(timeout=60).column("pid")[0] for f in warm}) == 2
        time.sleep(1.0)  # run times reported
        a = app.run({"x": [2.0]})
        time.sleep(1.4)  # A's call has run past a second, and a heartbeat said so
        burst = [app.run({"x": [1.5]})] + [app.run({"x": [0.02]}) for _ in range(30)]
        a_pid = a.result(timeout=60).column("pid")[0]
        pids = [f.result(timeout=60).column("pid")[0] for f in burst]
        assert pids[0] != a_pid  # the burst's long run went to B
        on_a = sum(pid == a_pid for pid in pids)
        assert on_a >= len(pids) // 3, f"A took {on_a} of {len(pids)} after its long call"
    finally:
        runtime.stop()
