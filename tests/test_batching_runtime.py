"""Batching stages on the runtime: fixed dispatch rules, SLO-aware control, shedding."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import numpy as np
import pytest

import serveflow as sf
from serveflow.runtime.control import QUIET_S


@pytest.fixture
def runtime():
    rt = sf.LocalRuntime(min_workers=1, max_workers=2)
    yield rt
    rt.stop()


def _batch_sizes(table: sf.Table) -> list[int]:
    return [len(table)] * len(table)  # every row reports the size of its batch


def _drive(app: sf.App, n: int, rate: float) -> list:
    futures = []
    start = time.monotonic()
    for i in range(n):
        time.sleep(max(0.0, start + i / rate - time.monotonic()))
        futures.append(app.run({"a": [i]}))
    return futures


def _shed(futures: list) -> int:
    shed = 0
    for future in futures:
        try:
            future.result(timeout=30)
        except sf.OverloadError:
            shed += 1
    return shed


def _loads(app: sf.App, count: int, within_s: float = 20.0) -> int:
    """Wait until stage "model" has loaded `count` times (or `within_s` passed); the
    loads so far."""
    deadline = time.monotonic() + within_s
    while app.stats()["model"]["cold_starts"] < count and time.monotonic() < deadline:
        time.sleep(0.1)
    return app.stats()["model"]["cold_starts"]


def test_fixed_policy_dispatches_full_batches_and_partial_ones_at_the_timeout(runtime):
    flow = sf.Flow("fixed")
    flow.map(_batch_sizes, names=["size"], batching=sf.Batching(max_size=4, timeout_ms=300))
    app = flow.deploy(runtime=runtime)
    app.run({"a": [0]}).result(timeout=10)  # warm the stage
    full = [app.run({"a": [i]}) for i in range(8)]
    assert [f.result(timeout=10).column("size")[0] for f in full] == [4] * 8
    started = time.monotonic()
    alone = app.run({"a": [9]}).result(timeout=10)
    assert alone.column("size") == [1]
    assert time.monotonic() - started >= 0.25  # it waited for company until the timeout


def test_the_timeout_counts_from_when_a_request_was_sent_even_behind_a_running_batch():
    def slow(table: sf.Table) -> list[int]:
        time.sleep(0.6)
        return table.column("a")

    flow = sf.Flow("behind")
    flow.map(slow, names=["a"], batching=sf.Batching(max_size=8, timeout_ms=500))
    with flow.deploy(runtime=sf.LocalRuntime(min_workers=1, max_workers=1)) as app:
        app.run({"a": [0]}).result(timeout=10)  # warm the stage
        first = app.run({"a": [1]})  # runs alone from 0.5 s to 1.1 s
        time.sleep(0.55)
        second = app.run({"a": [2]})  # its 500 ms are up while the first batch runs
        answered: dict[str, float] = {}
        for name, future in (("first", first), ("second", second)):
            future.add_done_callback(lambda _, n=name: answered.setdefault(n, time.monotonic()))
        assert second.result(timeout=10).column("a") == [2]
        assert first.result(timeout=10).column("a") == [1]
        # Starts when the worker frees: answered one 0.6 s call after the first, not
        # 1.1 s after (waiting another 500 ms once the worker got to read it).
        assert answered["second"] - answered["first"] < 0.85, answered


class SlowToLoad:
    def __init__(self) -> None:
        time.sleep(0.5)

    def __call__(self, table: sf.Table) -> list[int]:
        return table.column("a")


def test_workers_a_plan_adds_load_the_stage_before_requests_reach_them():
    flow = sf.Flow("prewarm")
    flow.map(SlowToLoad, names=["a"], batching=sf.Batching(slo_ms=500), name="model")
    runtime = sf.LocalRuntime(min_workers=2, max_workers=2)
    try:
        with flow.deploy(runtime=runtime) as app:
            assert app.run({"a": [1]}).result(timeout=30).column("a") == [1]  # one worker
            with runtime._lock:  # what the planner does when a plan asks for 2 workers
                runtime._prewarm(app, 0, 2)
            assert _loads(app, 2) == 2  # loaded with no request
    finally:
        runtime.stop()


@contextlib.contextmanager
def _planned(fn, size: int, timeout_s: float, workers: int) -> Iterator[sf.App]:
    """Stage "model" running `fn` with an SLO whose plan is pinned to (size, timeout,
    workers) on a pool of `workers`, loaded on all of them."""
    from serveflow.batching.controller import Decision

    flow = sf.Flow("planned")
    flow.map(fn, names=["size"], batching=sf.Batching(slo_ms=5000), name="model")
    runtime = sf.LocalRuntime(min_workers=workers, max_workers=workers)
    try:
        with flow.deploy(runtime=runtime) as app:
            decision = Decision(size, timeout_s, workers)
            app.controllers[0].decision = lambda now: decision  # as if planned
            _loads(app, workers)
            yield app
    finally:
        runtime.stop()


def _sizes(futures: list) -> list[int]:
    return [f.result(timeout=10).column("size")[0] for f in futures]


def test_an_slo_stage_fills_one_batch_at_a_time_across_its_workers():
    # The batching model has one buffer feeding all workers; spread over 2 workers,
    # 6 requests would form two partial batches of 3, both waiting out the timeout.
    with _planned(_batch_sizes, 4, 2.0, workers=2) as app:
        sent = time.monotonic()
        futures = [app.run({"a": [i]}) for i in range(6)]
        assert _sizes(futures[:4]) == [4] * 4
        assert time.monotonic() - sent < 1.0  # full: dispatched without the 2 s timeout
        assert _sizes(futures[4:]) == [2, 2]


def _slow_batch_sizes(table: sf.Table) -> list[int]:
    time.sleep(0.3)
    return _batch_sizes(table)


def test_planned_batches_that_queue_up_behind_a_busy_worker_run_as_one_call():
    with _planned(_slow_batch_sizes, 2, 1.0, workers=1) as app:
        running = [app.run({"a": [i]}) for i in range(2)]
        time.sleep(0.1)  # the first batch runs; two more batches queue behind it
        queued = [app.run({"a": [i]}) for i in range(4)]
        assert _sizes(running) == [2, 2]
        assert _sizes(queued) == [4] * 4


def test_requests_avoid_a_worker_still_loading_the_stage():
    from serveflow.runtime.scheduler import Scheduler, WorkerLoad

    flow = sf.Flow("loading")
    flow.map(_batch_sizes, names=["size"], batching=sf.Batching(slo_ms=500))
    plan = flow.optimize()
    key = (0, 0)
    busy = WorkerLoad(outstanding=3, warm={key})
    loading = WorkerLoad(warm={key}, loading={key})  # idle, but seconds from ready
    workers = {0: busy, 1: loading}
    scheduler = Scheduler()
    assert scheduler.route(0, plan, workers)[0][0] == (0,)
    assert scheduler.route(0, plan, workers, packs={0: (4, 0.1)})[0][0] == (0,)
    # Held to one worker, a spare loading at a lower index does not take the stage.
    spare = {0: WorkerLoad(warm={key}, loading={key}), 1: WorkerLoad(outstanding=9, warm={key})}
    assert scheduler.route(0, plan, spare, caps={0: 1})[0][0] == (1,)
    loading.loading.clear()
    assert scheduler.route(0, plan, workers)[0][0] == (1,)


def _packing(name: str):
    """A scheduler packing an SLO stage in batches of 2 (10 s timeout) on two warm
    workers: (route(now, placed) -> the worker, ask(now) -> `next_pack`'s, workers)."""
    from serveflow.runtime.scheduler import Scheduler, WorkerLoad

    flow = sf.Flow(name)
    flow.map(_batch_sizes, names=["size"], batching=sf.Batching(slo_ms=500))
    plan = flow.optimize()
    workers = {0: WorkerLoad(warm={(0, 0)}), 1: WorkerLoad(warm={(0, 0)})}
    scheduler = Scheduler()

    def route(now: float, placed: int | None = None) -> int:
        hint = None if placed is None else {0: placed}
        routed = scheduler.route(0, plan, workers, packs={0: (2, 10.0)}, now=now, placed=hint)
        return routed[0][0][0]

    def ask(now: float) -> int | None:
        return scheduler.next_pack((0, 0), workers, None, 2, 10.0, now)

    return route, ask, workers


def test_a_new_batch_opens_on_the_worker_that_frees_first():
    route, _, workers = _packing("alternate")
    # batches of 2: the first on worker 0, the second on 1, the third behind the first
    assert [route(t) for t in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)] == [0, 0, 1, 1, 0, 0]
    workers[0].outstanding -= 2  # the first batch is done: both workers hold one batch
    assert route(0.6) == 1  # worker 1's batch started before worker 0's second one


def test_a_request_placed_by_admission_joins_or_opens_the_batch_there():
    # Admission asks where a request would go (`next_pack`), predicts for that worker
    # and places it; routing then sends it there, and packs the next ones with it,
    # without choosing again.
    route, ask, _ = _packing("placed")
    assert ask(0.0) == 0
    assert route(0.0, placed=1) == 1  # placed elsewhere: a batch opens there
    assert ask(0.1) == 1 and route(0.1) == 1  # and the next request joins it
    assert ask(0.2) == 0  # full: the next one opens on the other worker
    assert route(0.2, placed=0) == 0 and ask(0.3) == 0


def test_the_planner_process_answers_as_the_driver_would_and_survives_a_crash():
    import numpy as np

    from serveflow.batching import MAP, BatchingController, ServiceProfile
    from serveflow.batching.arrivals import ArrivalLog
    from serveflow.batching.controller import fit_arrivals, search_here
    from serveflow.runtime.planner import PlannerProcess

    profile = ServiceProfile(a=0.005, b=0.001)
    space = BatchingController(sf.Batching(slo_ms=50), 2, profile=profile).space()
    arrivals = MAP.mmpp2(50, 400, 0.5, 1.0)
    here = search_here(space, arrivals, profile)
    times = np.cumsum(np.random.default_rng(3).exponential(1 / 300, 3000))  # 10 s
    window = ArrivalLog()
    for t in times:
        window.record(float(t))
    now = float(times[-1])
    fitted = fit_arrivals(window, now, False)
    planner = PlannerProcess()
    try:
        assert planner.search(space, arrivals, profile) == here
        # the arrivals are fitted there too (a fit held the driver's GIL 5-30 ms)
        there = planner.fit(window, now, False)
        assert np.allclose(there.d0, fitted.d0, rtol=1e-9) and np.allclose(
            there.d1, fitted.d1, rtol=1e-9
        )
        pid = planner._process.pid
        planner._process.kill()  # a crash between searches: the next one still answers
        planner._process.wait()
        assert planner.search(space, arrivals, profile) == here
        assert planner._process is None or planner._process.pid != pid
    finally:
        planner.close()


def test_planner_jobs_take_idle_cpu_and_a_late_one_goes_on_at_nice_19(monkeypatch):
    # At nice 19 a search still took 1/8 of the core a busy worker shared with it, in
    # the bursts that made it search; on idle CPU alone a saturated stage's first plan
    # waited 6.6 s. Here busy loops at the workers' priority hold every core.
    import subprocess
    import sys
    import threading

    from serveflow.batching import MAP, BatchingController, ServiceProfile
    from serveflow.runtime import planner as planning
    from serveflow.runtime.local import WORKER_NICENESS

    if not planning._can_leave_idle():
        pytest.skip("this process may not take a thread out of SCHED_IDLE")
    profile = ServiceProfile(a=0.005, b=0.001)
    space = BatchingController(sf.Batching(slo_ms=50), 2, profile=profile).space()
    arrivals = MAP.mmpp2(50, 400, 0.5, 1.0)
    planner = planning.PlannerProcess()
    hog = f"import os; os.nice({WORKER_NICENESS})\nwhile True: pass"
    hogs = []
    try:
        expected = planner.search(space, arrivals, profile)  # started, imports done
        pid = planner._process.pid

        def search_while_busy(boost_after_s: float, watch_s: float) -> tuple[list[int], bool]:
            """The planner's scheduling policies seen while it searched, for at most
            `watch_s` (then the busy loops end), and whether it was done by then."""
            monkeypatch.setattr(planning, "BOOST_AFTER_S", boost_after_s)
            found = []
            thread = threading.Thread(
                target=lambda: found.append(planner.search(space, arrivals, profile))
            )
            thread.start()
            seen = []
            deadline = time.monotonic() + watch_s
            while thread.is_alive() and time.monotonic() < deadline:
                seen.append(os.sched_getscheduler(pid))
                time.sleep(0.01)
            done = not thread.is_alive()
            for process in hogs:  # let a starved job end
                process.kill()
            thread.join(timeout=30)
            assert found == [expected]
            return seen, done

        hogs.extend(
            subprocess.Popen([sys.executable, "-c", hog])
            for _ in range(len(os.sched_getaffinity(0)))
        )
        seen, _ = search_while_busy(60.0, watch_s=1.0)
        assert set(seen) == {os.SCHED_IDLE}
        hogs[:] = [
            subprocess.Popen([sys.executable, "-c", hog])
            for _ in range(len(os.sched_getaffinity(0)))
        ]
        seen, done = search_while_busy(0.2, watch_s=30.0)
        # boosted while it ran (a last look may come after the job ended and the
        # process went back to idle for the next one, before its caller woke)
        assert done and seen[0] == os.SCHED_IDLE and os.SCHED_OTHER in seen, seen
        assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, os.nice(0) + planning.NICENESS)
    finally:
        for process in hogs:
            process.kill()
            process.wait()
        planner.close()


def test_deploying_an_slo_stage_starts_its_planner_at_once_below_the_workers(runtime):
    # Started by the first search, its imports (a second of CPU) fell on a busy stage's
    # first requests; and at the workers' priority each search (0.2-0.3 s of CPU)
    # halved a worker whose model kept a core busy
    from serveflow.runtime.local import WORKER_NICENESS
    from serveflow.runtime.planner import NICENESS

    flow = sf.Flow("planned")
    flow.map(_model_4_plus_1_per_row, names=["a"], batching=sf.Batching(slo_ms=80))
    app = flow.deploy(runtime=runtime)
    try:
        process = runtime.planner()._process
        assert process is not None and process.poll() is None
        ours = os.getpriority(os.PRIO_PROCESS, 0)
        deadline = time.monotonic() + 10  # it nices itself first thing
        while os.getpriority(os.PRIO_PROCESS, process.pid) == ours and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.getpriority(os.PRIO_PROCESS, process.pid) == min(19, ours + NICENESS)
        assert NICENESS > WORKER_NICENESS
    finally:
        app.stop()


def test_slo_policy_batches_more_under_load_and_reports_its_choices(runtime):
    def model(table: sf.Table) -> list[int]:
        time.sleep(0.004 + 0.0005 * len(table))
        return table.column("a")

    flow = sf.Flow("adaptive")
    # served even when a stall of the shared machine would refuse some (admission is
    # tested in test_batching_admission): this is about the batch sizes chosen
    flow.map(model, names=["a"], batching=sf.Batching(slo_ms=80, on_overload="serve"))
    app = flow.deploy(runtime=runtime)
    futures = _drive(app, 600, rate=300)
    assert [f.result(timeout=30).column("a")[0] for f in futures] == list(range(600))
    figures = app.stats()["model"]
    assert figures["batch_mean"] > 1.5
    assert figures["arrival_rate"] > 0
    assert figures["slo_ms"] == 80
    assert "live: stage 1 'model'" in app.explain()


def test_an_slo_that_cannot_be_met_sheds_requests_with_an_overload_error(runtime):
    def slow(table: sf.Table) -> list[int]:
        time.sleep(0.03)
        return table.column("a")

    flow = sf.Flow("hopeless")
    flow.map(slow, names=["a"], batching=sf.Batching(slo_ms=10, max_size=1))
    app = flow.deploy(runtime=runtime)
    futures = _drive(app, 200, rate=200)
    shed = served = 0
    for future in futures:
        try:
            future.result(timeout=30)
            served += 1
        except sf.OverloadError as error:
            assert "SLO of 10 ms" in str(error)
            shed += 1
    assert shed > 0 and served > 0
    assert app.stats()["slow"]["shed"] == shed


def _model_4_plus_1_per_row(table: sf.Table) -> list[int]:
    time.sleep(0.004 + 0.001 * len(table))
    return table.column("a")


def test_a_request_whose_rows_alone_outlast_the_slo_is_refused_and_the_stage_stays_open(
    runtime,
):
    """Calls are planned in requests (of a row each here): one of 500 rows would hold a
    worker of a 4 + 1 ms per row stage half a second, past the SLO of every request."""
    flow = sf.Flow("rows")
    flow.map(_model_4_plus_1_per_row, names=["a"], batching=sf.Batching(slo_ms=50))
    app = flow.deploy(runtime=runtime)
    for _ in range(100):  # calls of several sizes, until the curve is fitted
        for future in [app.run({"a": [i]}) for i in range(8)]:
            with contextlib.suppress(sf.OverloadError):  # (while its workers start)
                future.result(timeout=30)
        time.sleep(0.05)
        (figures,) = app.stats().values()
        if figures.get("service_ms") is not None:  # (a busy machine may take longer)
            break
    started = time.monotonic()
    with pytest.raises(sf.OverloadError, match="cannot run 500 rows within its SLO of 50 ms"):
        app.run({"a": list(range(500))}).result(timeout=30)
    assert time.monotonic() - started < 0.4  # refused, not run (0.5 s)
    assert app.run({"a": list(range(5))}).result(timeout=30).column("a") == list(range(5))
    assert app.run({"a": [7]}).result(timeout=30).column("a") == [7]


def test_a_request_of_many_rows_leaves_the_stage_open_to_requests_of_one():
    """A fresh stage's first call, of one request of 64 rows (68 ms), was learned as a
    call of 1 (68 ms): 18 of 30 one-row requests sent 10 ms apart after it were refused
    under an SLO of 30 ms. Learned by its rows, a call of 1 is 5 ms."""
    flow = sf.Flow("rows")
    flow.map(_model_4_plus_1_per_row, names=["a"], batching=sf.Batching(slo_ms=30))
    rt = sf.LocalRuntime(min_workers=1, max_workers=1)
    try:
        app = flow.deploy(runtime=rt)
        assert len(app.run({"a": list(range(64))}).result(timeout=30)) == 64
        refused = 0
        for i in range(30):
            try:
                app.run({"a": [i]}).result(timeout=30)
            except sf.OverloadError:
                refused += 1
            time.sleep(0.01)
        assert refused <= 2, refused
    finally:
        rt.stop()


def test_an_slo_stage_inside_a_chain_serves_a_load_it_can_take():
    """An SLO stage whose output is not the flow's learns its calls' ends from its
    workers' reports, later: at a third of what it can do, it refuses (almost)
    nothing (a report once paired with the wrong call refused 98% here)."""
    flow = sf.Flow("chain")
    pre = flow.map(lambda r: r["a"], names=["a"], name="pre")
    model = pre.map(
        _model_4_plus_1_per_row, names=["a"], batching=sf.Batching(slo_ms=80), name="model"
    )
    model.map(lambda r: r["a"], names=["a"], name="post")
    rt = sf.LocalRuntime(min_workers=2, max_workers=2)
    try:
        app = flow.deploy(sf.Rules(fusion=False), runtime=rt)
        # a call of it timed first (its worker's report comes within 0.25 s): until
        # then a fresh stage queues one merged call per worker (see admission), and
        # arrivals while it loads are refused
        _loads(app, 2)
        app.run({"a": [0]}).result(timeout=30)
        time.sleep(0.6)
        futures = _drive(app, 600, rate=200)  # 3 s
        shed = _shed(futures)
    finally:
        rt.stop()
    assert shed <= 0.05 * len(futures), shed


def test_a_flow_slo_is_split_across_its_batching_stages(runtime):
    flow = sf.Flow("two-models")
    first = flow.map(lambda t: t.column("a"), names=["a"], batching=True, name="first")
    first.map(lambda t: t.column("a"), names=["a"], batching=True, name="second")
    app = flow.deploy(sf.Rules(fusion=False), runtime=runtime, slo_ms=100)
    assert [s.batching.slo_ms for s in app.plan.stages] == [50, 50]
    assert "flow SLO: 100 ms" in app.explain()
    assert app.run({"a": [1]}).result(timeout=10).to_rows() == [{"a": 1}]


def _warm(app: sf.App) -> None:
    for _ in range(3):  # bursts: the stages load on both workers
        for future in [app.run({"a": [i]}) for i in range(16)]:
            with contextlib.suppress(sf.OverloadError):
                future.result(timeout=30)
    time.sleep(0.6)


def test_a_flow_slo_over_two_models_serves_a_light_load_in_full():
    """The second model's admission predicts a request's latency from when it gets
    there (after the first) and holds it to what the first left of the flow's SLO:
    it was taken to wait there from the flow's arrival, the first model's latency was
    taken for its overhead, and 57-96% of a light load was refused. Then 0-1% in most
    runs, but 30-64% in 3 of 42: the first model's report of its first call after the
    warm-up was paired with a call taken to end before it, 0.6 s earlier, and taken
    for 0.6 s of overhead. Now at most 30 in 130 runs of 131 (0 in the 49 counted
    exactly), and 103 in one (not understood; right after a CI run on the same
    machine): the bound leaves room for that, not for a spiral."""
    flow = sf.Flow("two-models")
    first = flow.map(_model_4_plus_1_per_row, names=["a"], batching=True, name="first")
    first.map(_model_4_plus_1_per_row, names=["a"], batching=True, name="second")
    rt = sf.LocalRuntime(min_workers=2, max_workers=2)
    try:
        app = flow.deploy(sf.Rules(fusion=False), runtime=rt, slo_ms=40)
        _warm(app)
        shed = _shed(_drive(app, 600, rate=200))  # 3 s
    finally:
        rt.stop()
    assert shed <= 0.25 * 600, shed


def test_two_flows_on_the_same_workers_serve_a_load_both_slos_allow():
    """Each SLO stage's admission sees the other's calls on the workers they share:
    it took them for its own overhead (median 5-7 ms, not 0.2) and refused 1-5% of
    what both could serve in time. Now its overhead stays at its own; what it refuses
    is 0-1% in most runs, but up to 12% in some on a busy 2-core machine (one flow,
    mostly the first deployed: its plan had gone to one of the two workers, cheaper,
    and a burst there was refused while the other had room; now admission places
    such a request there: `benchmarks.batching_shared`'s two flows at 600/s, that
    flow refused 0-3.8% in 9 runs, now 0-0.2% in 8). Overhead medians: before, 5.3-7.7 ms;
    now 0.6-0.8 (3 runs each)."""
    rt = sf.LocalRuntime(min_workers=2, max_workers=2)
    try:
        apps = []
        for name in ("one", "two"):
            flow = sf.Flow(name)
            flow.map(
                _model_4_plus_1_per_row, names=["a"], batching=sf.Batching(slo_ms=25), name="model"
            )
            apps.append(flow.deploy(runtime=rt))
            _warm(apps[-1])
        futures = []
        start = time.monotonic()
        for i in range(2100):  # 3 s at 700/s, alternating
            time.sleep(max(0.0, start + i / 700 - time.monotonic()))
            futures.append(apps[i % 2].run({"a": [i]}))
        shed = _shed(futures)
        overheads = [app.stats()["model"]["overhead_ms"]["median"] for app in apps]
    finally:
        rt.stop()
    assert max(overheads) <= 2.5, overheads
    assert shed <= 0.15 * len(futures), shed


def _model_1_plus_02_per_row(table: sf.Table) -> list[int]:
    time.sleep(0.001 + 0.0002 * len(table))
    return table.column("a")


def _model_20_plus_5_per_row_where(table: sf.Table) -> list[int]:
    time.sleep(0.02 + 0.005 * len(table))
    return [os.getpid()] * len(table)


def _fast_and_slow(rt: sf.LocalRuntime) -> list[sf.App]:
    """A flow of 1 + 0.2 ms per row, SLO 5 ms, and one of 20 + 5 ms per row, SLO 200
    ms, on `rt`, warmed."""
    apps = []
    for name, fn, slo_ms in (
        ("fast", _model_1_plus_02_per_row, 5),
        ("slow", _model_20_plus_5_per_row_where, 200),
    ):
        flow = sf.Flow(name)
        flow.map(fn, names=["a"], batching=sf.Batching(slo_ms=slo_ms), name="model")
        apps.append(flow.deploy(runtime=rt))
        _warm(apps[-1])
    return apps


def _model_10_plus_2_per_row(table: sf.Table) -> list[int]:
    time.sleep(0.01 + 0.002 * len(table))
    return table.column("a")


def test_a_tight_flow_is_not_made_late_by_a_call_begun_while_its_batch_filled():
    """Two flows of 10 + 2 ms per row on 2 workers, SLO 36 ms at 80/s and SLO 120 ms
    at 150/s (calls of 5-12: 20-34 ms): a worker began the loose flow's ready call
    while the tight flow's batch, due first, waited its last few milliseconds to
    fill, and the tight request waited the whole call (not cut short). Of the tight
    flow's answers, 2.2-5.2% were past its SLO (p99 1.12-1.14x); now 0-1.1%."""
    rt = sf.LocalRuntime(min_workers=2, max_workers=2)
    try:
        apps = {}
        for name, slo_ms in (("tight", 36), ("loose", 120)):
            flow = sf.Flow(name)
            batching = sf.Batching(slo_ms=slo_ms)
            flow.map(_model_10_plus_2_per_row, names=["a"], batching=batching, name="model")
            apps[name] = flow.deploy(runtime=rt)
            _warm(apps[name])
        rng = np.random.default_rng(7)
        arrivals = sorted(
            [(t, "tight") for t in np.cumsum(rng.exponential(1 / 80, 600))]
            + [(t, "loose") for t in np.cumsum(rng.exponential(1 / 150, 1100))]
        )
        sent: dict[str, list] = {"tight": [], "loose": []}
        start = time.monotonic()
        for t, name in (a for a in arrivals if a[0] < 6.0):
            time.sleep(max(0.0, start + t - time.monotonic()))
            began = time.monotonic()
            future = apps[name].run({"a": [1]})
            future.add_done_callback(lambda f, b=began: setattr(f, "took", time.monotonic() - b))
            sent[name].append((t, future))
        late, answered, refused = {}, {}, {}
        for name, slo_ms in (("tight", 36), ("loose", 120)):
            took = []
            refused[name] = _shed([f for _, f in sent[name]])
            for t, future in sent[name]:
                # after a second's planning (a callback may still be running: not yet)
                if t >= 1.0 and future.exception() is None and hasattr(future, "took"):
                    took.append(future.took * 1e3)
            answered[name] = len(took)
            late[name] = sum(ms > slo_ms for ms in took)
    finally:
        rt.stop()
    assert refused["tight"] <= 0.02 * len(sent["tight"]), refused
    assert late["tight"] <= 0.015 * answered["tight"], (late, answered)
    assert late["loose"] <= 0.015 * answered["loose"], (late, answered)


def test_a_stage_whose_calls_outlast_a_tighter_slo_keeps_off_one_worker():
    """A stage of 20 + 5 ms per row (SLO 200 ms) and one of 1 + 0.2 ms (SLO 5 ms) on
    the same 2 workers: no request of the fast one is in time behind a call of the
    slow one, and both workers were often in one (the fast flow answered 64-90% in
    time). The slow stage now plans on one worker (its calls run there alone), also
    at 140 requests/s, where its plan there misses the planning target (not the SLO):
    going back to both, as it did, left the fast flow 0.56-0.82 in time."""
    rt = sf.LocalRuntime(min_workers=2, max_workers=2)
    try:
        apps = _fast_and_slow(rt)
        fast, slow, ended = [], [], {}
        start = time.monotonic()
        for i in range(2450):  # 5 s: the fast flow at 350/s, the slow one at 140/s
            time.sleep(max(0.0, start + i / 490 - time.monotonic()))
            sent = time.monotonic()
            future = apps[i % 7 in (2, 5)].run({"a": [i]})
            future.add_done_callback(lambda _, i=i: ended.setdefault(i, time.monotonic()))
            (slow if i % 7 in (2, 5) else fast).append((i, sent, future))
        last = fast[len(fast) // 2 :]  # the last 2.5 s
        answered = {i for i, _, future in last if not future.exception(timeout=30)}
        time.sleep(0.1)  # a future's callbacks run after its waiters wake
        in_time = sum(ended[i] - sent <= 0.005 for i, sent, _ in last if i in answered)
        where = {
            future.result(timeout=30).column("a")[0]
            for _, _, future in slow[len(slow) // 2 :]
            if not future.exception(timeout=30)
        }
        target = apps[1].stats()["model"]["workers_target"]
    finally:
        rt.stop()
    assert target == 1 and len(where) == 1, (target, where)
    assert in_time >= 0.8 * len(last), (in_time, len(last))


def _sleep_60ms_where(row: dict) -> int:
    time.sleep(0.06)
    return os.getpid()


@pytest.mark.parametrize(
    "every, longs, pids, batched",
    [(64, 1, 1, False), (16, 1, 2, False), (19, 2, 2, False), (5, 1, 1, True)],
)
def test_a_stage_without_an_slo_whose_calls_outlast_a_tighter_slo_keeps_off_one_worker(
    every: int, longs: int, pids: int, batched: bool
):
    """The same for stages without an SLO (no batching: they have no plan of their
    own), while their calls together keep less than 70% of the workers left busy (they
    have no admission: past them, their requests would queue without bound). A 25 ms
    SLO flow next to one of 100 ms calls at 4/s answered 0.90-0.96 in time; held off,
    0.99. Here calls of 60 ms at 5/s are held off (0.3 of a worker), at 20/s not (1.2),
    nor two flows of them at 8.4/s each (1.0 together; each alone would fit). A stage
    of 20 + 5 ms per row in batches of up to 8 with no wait, at 64/s, is held off: spread,
    its calls of 1-2 rows keep about a worker busy, but in batches of 8 it needs 0.5."""
    rt = sf.LocalRuntime(min_workers=2, max_workers=2)
    try:
        fast = sf.Flow("fast")
        fast.map(_model_1_plus_02_per_row, names=["a"], batching=sf.Batching(slo_ms=5))
        apps = [fast.deploy(runtime=rt)]
        for k in range(longs):
            slow = sf.Flow(f"slow-{k}")
            if batched:
                batching = sf.Batching(max_size=8, timeout_ms=0)
                slow.map(_model_20_plus_5_per_row_where, names=["pid"], batching=batching)
            else:
                slow.map(_sleep_60ms_where, names=["pid"], name="long")
            apps.append(slow.deploy(runtime=rt))
        for app in apps:
            _warm(app)
        quick, long, ended = [], [], {}
        start = time.monotonic()
        for i in range(1600):  # 5 s at 320/s, one in `every` for the long flows in turn
            time.sleep(max(0.0, start + i / 320 - time.monotonic()))
            sent = time.monotonic()
            if i % every == every - 1:
                long.append(apps[1 + i // every % longs].run({"a": [i]}))
                continue
            future = apps[0].run({"a": [i]})
            future.add_done_callback(lambda _, i=i: ended.setdefault(i, time.monotonic()))
            quick.append((i, sent, future))
        last = quick[len(quick) // 2 :]
        answered = {i for i, _, future in last if not future.exception(timeout=30)}
        time.sleep(0.1)  # a future's callbacks run after its waiters wake
        in_time = sum(ended[i] - sent <= 0.005 for i, sent, _ in last if i in answered)
        # the last 2 s: the warm-up's calls (48 of 60 ms) count for 4 s in the load that
        # decides the hold; with the first calls sent they passed it, and the long flow
        # went to both workers from 1.9 to 2.5 s
        late = long[len(long) * 3 // 5 :]
        where = {future.result(timeout=30).column("pid")[0] for future in late}
    finally:
        rt.stop()
    assert len(where) == pids, where
    if pids == 1:
        assert in_time >= 0.9 * len(last), (in_time, len(last))


def test_a_tighter_stage_without_traffic_holds_no_stage_off_its_workers():
    """Held to one worker at 140 requests/s, the slow stage refused 2-3% of its
    requests; with the fast flow quiet, it has both and refuses none."""
    rt = sf.LocalRuntime(min_workers=2, max_workers=2)
    try:
        apps = _fast_and_slow(rt)
        time.sleep(QUIET_S + 0.5)  # the fast flow's warm-up is past
        futures = []
        start = time.monotonic()
        for i in range(560):  # 4 s at 140/s
            time.sleep(max(0.0, start + i / 140 - time.monotonic()))
            futures.append(apps[1].run({"a": [i]}))
        refused = sum(isinstance(f.exception(timeout=30), sf.OverloadError) for f in futures)
        where = {f.result(timeout=30).column("a")[0] for f in futures[-200:]}
        target = apps[1].stats()["model"]["workers_target"]
    finally:
        rt.stop()
    assert target == 2 and len(where) == 2, (target, where)
    assert refused == 0, refused


def test_the_next_call_takes_the_requests_sent_during_the_last_one():
    """A worker reads no message while its stage runs: the requests left over from
    the last read and those sent meanwhile make up the next call together (before,
    the leftovers ran alone and the others waited a whole call more)."""

    def sized(table: sf.Table) -> list[int]:
        time.sleep(0.3)
        return [len(table)] * len(table)

    flow = sf.Flow("after")
    flow.map(sized, names=["size"], batching=sf.Batching(max_size=4, timeout_ms=1))
    with flow.deploy(runtime=sf.LocalRuntime(min_workers=1, max_workers=1)) as app:
        app.run({"a": [0]}).result(timeout=10)  # warm the stage
        first = app.run({"a": [0]})  # a call of 1, to 0.3 s
        time.sleep(0.1)
        six = [app.run({"a": [i]}) for i in range(6)]  # 4 run from 0.3 s, 2 are left
        time.sleep(0.35)
        two = [app.run({"a": [i]}) for i in range(2)]  # sent during that call
        sizes = [f.result(timeout=10).column("size")[0] for f in [first, *six, *two]]
    assert sizes == [1, 4, 4, 4, 4, 4, 4, 4, 4], sizes


def test_a_worker_reports_its_batching_calls_during_a_flood():
    """The worker reads what came during each batching call; a flood that never lets
    the queue empty must not hold off its stats reports until it ends (the driver's
    counts and the batching controller's observations stood still meanwhile)."""

    def slow(table: sf.Table) -> list[int]:
        time.sleep(0.05)
        return [len(table)] * len(table)

    flow = sf.Flow("flood")
    flow.map(slow, names=["size"], batching=sf.Batching(max_size=4, timeout_ms=1), name="model")
    with flow.deploy(runtime=sf.LocalRuntime(min_workers=1, max_workers=1)) as app:
        app.run({"a": [0]}).result(timeout=10)  # warm the stage
        futures = _drive(app, 300, rate=250.0)  # 1.2 s at 3x the 80/s it can do
        counted = app.stats()["model"]["requests"]  # before the queue emptied
        for future in futures:
            future.result(timeout=30)
    assert counted >= 20, counted


HOPELESS = sf.Batching(slo_ms=10, max_size=1)  # 30 ms calls


def _hopeless(table: sf.Table) -> list[str]:
    time.sleep(0.03)
    return ["slo"] * len(table)


def _shed_count(futures: list) -> tuple[int, list]:
    """(requests refused with OverloadError, the answers of the others)."""
    shed, answers = 0, []
    for future in futures:
        try:
            answers.append(future.result(timeout=30).column("who")[0])
        except sf.OverloadError:
            shed += 1
    return shed, answers


def _quick_but_the_first(row: dict) -> str:
    """The other branch: slower than `_hopeless` for the first requests, so that the
    SLO stage runs some calls to the end (learns how long they take) rather than
    being cancelled in each by this branch's answer."""
    if row["a"] < 5:
        time.sleep(0.05)
    return "quick"


@pytest.mark.parametrize("chain", [False, True], ids=["stage", "chain"])
def test_an_anyof_branch_that_sheds_leaves_the_request_to_the_other_branches(chain):
    """A refusal at an SLO stage in one branch of an anyof drops that branch for the
    request, not the request: another branch answers it (it used to be refused)."""
    flow = sf.Flow("shed-branch")
    head = flow.map(lambda r: r["a"], names=["a"], name="pre") if chain else flow
    slo = head.map(_hopeless, names=["who"], batching=HOPELESS, name="slo")
    quick = flow.map(_quick_but_the_first, names=["who"], name="quick")
    slo.anyof(quick)
    rt = sf.LocalRuntime(min_workers=3, max_workers=3)
    try:
        app = flow.deploy(sf.Rules(fusion=False), runtime=rt)
        shed, answers = _shed_count(_drive(app, 200, rate=200))
        stats = app.stats()
    finally:
        rt.stop()
    assert shed == 0 and len(answers) == 200 and "quick" in answers
    assert stats["slo"]["shed"] > 0  # the SLO stage did refuse (its branch)


def test_an_anyof_whose_every_branch_sheds_refuses_the_request():
    flow = sf.Flow("shed-both")
    one = flow.map(_hopeless, names=["who"], batching=HOPELESS, name="one")
    two = flow.map(_hopeless, names=["who"], batching=HOPELESS, name="two")
    one.anyof(two)
    rt = sf.LocalRuntime(min_workers=3, max_workers=3)
    try:
        app = flow.deploy(sf.Rules(fusion=False), runtime=rt)
        shed, answers = _shed_count(_drive(app, 200, rate=200))
    finally:
        rt.stop()
    assert shed > 0 and len(answers) == 200 - shed
    assert set(answers) <= {"slo"}


def _model_20_plus_5_per_row(table: sf.Table) -> list[int]:
    time.sleep(0.020 + 0.005 * len(table))
    return table.column("a")


def test_a_flood_on_a_fresh_stage_is_refused_not_queued():
    """At 5x what 2 workers serve within the SLO, from the moment of deploy: before
    its first call is timed the stage cannot predict, yet what it admits then must
    not be a hidden backlog the later requests wait behind (all of them were answered
    0.6-3 s late, SLO 125 ms, for as long as the flood lasted)."""
    flow = sf.Flow("flooded")
    flow.map(_model_20_plus_5_per_row, names=["a"], batching=sf.Batching(slo_ms=125), name="model")
    rt = sf.LocalRuntime(min_workers=2, max_workers=2)
    latencies: list[tuple[float, float]] = []  # (sent, latency) of the answered
    try:
        app = flow.deploy(runtime=rt)
        start = time.monotonic()
        futures = []
        for i in range(3000):  # 1,500/s for 2 s
            time.sleep(max(0.0, start + i / 1500 - time.monotonic()))
            sent = time.monotonic()
            future = app.run({"a": [i]})
            future.add_done_callback(
                lambda f, sent=sent: (
                    f.exception() or latencies.append((sent, time.monotonic() - sent))
                )
            )
            futures.append(future)
        for future in futures:
            with contextlib.suppress(sf.OverloadError):
                future.result(timeout=30)
    finally:
        rt.stop()
    late = sorted(latency for sent, latency in latencies if sent >= start + 0.5)
    assert len(latencies) < 0.5 * len(futures)  # refused, not queued
    assert late[int(0.99 * len(late))] <= 2 * 0.125, late[-10:]
