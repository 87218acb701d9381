"""The embedded serverless runtime: processes, faults, scaling, limits, cleanup."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

import serveflow as sf


def _shm_files(runtime: sf.LocalRuntime) -> list[str]:
    """The files of the runtime's private directory in /dev/shm (none once removed)."""
    directory = runtime.engine._dir.path
    return os.listdir(directory) if os.path.isdir(directory) else []


def _wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def runtime():
    rt = sf.LocalRuntime(min_workers=2, max_workers=4)
    yield rt
    rt.stop()


def test_stages_run_in_worker_processes(runtime):
    flow = sf.Flow("pids")
    flow.map(lambda r: os.getpid(), names=["pid"])
    app = flow.deploy(runtime=runtime)
    pids = {app.run({"a": [1]}).result(timeout=10).column("pid")[0] for _ in range(20)}
    assert os.getpid() not in pids
    assert pids <= set(runtime.worker_pids())


def test_model_class_loads_once_per_worker(runtime):
    class Model:
        def __init__(self):
            self.loaded_by = (os.getpid(), id(self))

        def __call__(self, row):
            return self.loaded_by

    flow = sf.Flow("model")
    flow.map(Model, names=["loaded_by"])
    app = flow.deploy(runtime=runtime)
    seen = {app.run({"a": [1]}).result(timeout=10).column("loaded_by")[0] for _ in range(30)}
    assert len({pid for pid, _ in seen}) == len(seen)  # one instance per worker process
    assert app.stats()["Model"]["cold_starts"] == len(seen)


def test_what_a_worker_loaded_is_out_of_its_garbage_collectors_sight(runtime):
    # a full collection walks every object and holds the GIL throughout: over a MiniLM
    # worker's heap (the model's objects) it took 211 ms, a pause in every call
    class Model:
        def __init__(self):
            self.weights = [[i] for i in range(10_000)]

        def __call__(self, row):
            import gc

            return gc.get_freeze_count() >= len(self.weights)

    flow = sf.Flow("frozen")
    flow.map(Model, names=["frozen"])
    app = flow.deploy(runtime=runtime)
    assert app.run({"a": [1]}).result(timeout=30).column("frozen") == [True]


def test_a_function_that_kills_its_worker_fails_only_its_request(runtime):
    def crash_on_13(row):
        if row["a"] == 13:
            os._exit(3)
        return row["a"]

    flow = sf.Flow("crash")
    flow.map(crash_on_13, names=["a"])
    app = flow.deploy(runtime=runtime)
    bad = app.run({"a": [13]})
    with pytest.raises(sf.OperatorError, match="died"):
        bad.result(timeout=30)
    assert app.run({"a": [1]}).result(timeout=10).to_rows() == [{"a": 1}]
    assert _wait_for(lambda: len(runtime.worker_pids()) >= 2)


def test_sigkill_of_a_worker_under_load_loses_no_request(runtime):
    flow = sf.Flow("load")
    slow = flow.map(lambda r: time.sleep(0.005) or r["a"] * 2, names=["b"])
    slow.map(lambda r: r["b"] + 1, names=["c"])
    app = flow.deploy(sf.Rules(fusion=False), runtime=runtime)
    app.run({"a": [0]}).result(timeout=10)
    futures = []

    def submit():
        for i in range(150):
            futures.append((i, app.run({"a": [i]})))
            time.sleep(0.001)

    sender = threading.Thread(target=submit)
    sender.start()
    time.sleep(0.05)
    os.kill(runtime.worker_pids()[0], signal.SIGKILL)
    sender.join()
    for i, future in futures:
        assert future.result(timeout=30).to_rows() == [{"c": i * 2 + 1}]
    assert _wait_for(lambda: len(runtime.worker_pids()) >= 2)


def test_pool_scales_out_under_load_and_back_in_when_idle():
    runtime = sf.LocalRuntime(min_workers=1, max_workers=4, idle_s=0.5, target_in_flight=1)
    try:
        flow = sf.Flow("waves")
        flow.map(lambda r: time.sleep(0.05) or r["a"], names=["a"], name="sleepy")
        app = flow.deploy(runtime=runtime)
        futures, peak = [], 0
        for i in range(60):  # 100 requests/s against 20/s per worker
            futures.append(app.run({"a": [i]}))
            peak = max(peak, len(runtime.worker_pids()))
            time.sleep(0.01)
        while not all(f.done() for f in futures):
            time.sleep(0.05)
        assert [f.result().column("a")[0] for f in futures] == list(range(60))
        assert peak > 1
        assert _wait_for(lambda: app.stats()["sleepy"]["cold_starts"] > 1)  # stats lag a little
        assert _wait_for(lambda: len(runtime.worker_pids()) == 1, timeout=15)
    finally:
        runtime.stop()


def test_autoscaler_grows_only_into_workers_the_stages_can_use():
    from serveflow.runtime.scheduler import Autoscaler

    scaler = Autoscaler(min_workers=1, max_workers=4, target_in_flight=2)
    assert scaler.plan([8], waiting=0, starting=0, idle_for={}) == (3, [])
    # Every stage held to 2 workers by its batching controller: no idle third, fourth.
    assert scaler.plan([8], waiting=0, starting=0, idle_for={}, usable=2) == (1, [])
    # Two workers still exiting count against max_workers until they are gone.
    assert scaler.plan([8], waiting=0, starting=0, idle_for={}, retiring=2) == (1, [])


def test_deadline_fails_the_request_and_drops_its_queued_work():
    runtime = sf.LocalRuntime(min_workers=1, max_workers=1)
    try:
        flow = sf.Flow("deadline")
        flow.map(lambda r: time.sleep(0.3) or r["a"], names=["a"], name="slow")
        app = flow.deploy(runtime=runtime)
        first = app.run({"a": [1]})
        late = [app.run({"a": [2]}, timeout=0.05) for _ in range(3)]
        for future in late:
            with pytest.raises(sf.DeadlineError):
                future.result(timeout=5)
        assert first.result(timeout=5).to_rows() == [{"a": 1}]
        time.sleep(0.8)  # the expired requests would have run by now
        assert app.stats()["slow"]["requests"] == 1
    finally:
        runtime.stop()


def test_a_future_says_when_its_first_stage_began_after_queueing():
    """`future.began`: when the request's first stage run began (the end of its time
    queued), not its last stage's; behind a busy worker, after that worker's call."""
    runtime = sf.LocalRuntime(min_workers=1, max_workers=1)
    try:
        flow = sf.Flow("queued")
        first = flow.map(lambda r: time.sleep(r["a"]) or r["a"], names=["a"], name="first")
        first.map(lambda r: time.sleep(0.2) or r["a"], names=["a"], name="second")
        app = flow.deploy(rules=sf.Rules(fusion=False), runtime=runtime)
        app.run({"a": [0.0]}).result(timeout=10)  # both stages loaded
        submitted = time.monotonic()
        busy = app.run({"a": [0.3]})
        time.sleep(0.05)
        waiting = app.run({"a": [0.0]})
        busy.result(timeout=10)
        waiting.result(timeout=10)
        # its first stage began at once; its second began 0.3 s later
        assert busy.began is not None and busy.began - submitted < 0.25
        # queued behind busy's first stage (0.3 s) and second (0.2 s) on the one worker
        assert waiting.began - busy.began > 0.45
    finally:
        runtime.stop()


def test_too_many_requests_in_flight_fail_fast_with_overload():
    runtime = sf.LocalRuntime(min_workers=1, max_workers=1, max_in_flight=2)
    try:
        flow = sf.Flow("busy")
        flow.map(lambda r: time.sleep(0.2) or 1, names=["x"])
        app = flow.deploy(runtime=runtime)
        admitted = [app.run({"a": [1]}) for _ in range(2)]
        started = time.monotonic()
        with pytest.raises(sf.OverloadError, match="in flight"):
            app.run({"a": [1]}).result(timeout=5)
        assert time.monotonic() - started < 0.1
        assert all(f.result(timeout=5).to_rows() == [{"x": 1}] for f in admitted)
    finally:
        runtime.stop()


def test_large_arrays_cross_stages_and_nothing_is_left_after_stop():
    runtime = sf.LocalRuntime(min_workers=2, max_workers=2)
    flow = sf.Flow("big")
    a = flow.map(lambda img: img, col="img")
    b = a.map(lambda img: img[::-1].copy(), col="img")
    b.map(lambda img: img, col="img")
    app = flow.deploy(sf.Rules(fusion=False), runtime=runtime)
    image = np.random.default_rng(0).integers(0, 255, 10_000_000, dtype=np.uint8)
    out = app.run(sf.Table({"img": [image]})).result(timeout=30).column("img")[0]
    assert np.array_equal(out, image[::-1])
    pids = runtime.worker_pids()
    runtime.stop()
    assert _shm_files(runtime) == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_competing_replicas_all_run_and_one_answer_is_kept(runtime):
    flow = sf.Flow("compete")
    rng = np.random.default_rng(1)
    waits = rng.gamma(3, 4, 200) / 1000
    flow.map(lambda r: time.sleep(waits[r["a"]]) or r["a"], names=["a"], high_variance=True)
    app = flow.deploy(sf.Rules(compete=True, compete_replicas=1), runtime=runtime)
    results = [app.run({"a": [i]}) for i in range(40)]
    assert [f.result(timeout=20).column("a")[0] for f in results] == list(range(40))
    assert _wait_for(lambda: app.stats()["map"]["requests"] > 40)


def test_dynamic_lookups_of_one_key_go_to_one_worker():
    runtime = sf.LocalRuntime(min_workers=3, max_workers=3)
    try:
        flow = sf.Flow("locality")
        flow.lookup("user", dynamic=True).map(
            lambda r: (r["user_value"], os.getpid()), names=["value", "pid"]
        )
        app = flow.deploy(runtime=runtime)
        for user in "abcdef":
            app.kvs.put(user, user.upper())
        pids: dict[str, set[int]] = {}
        for i in range(60):
            user = "abcdef"[i % 6]
            row = app.run({"user": [user]}).result(timeout=10).to_rows()[0]
            assert row["value"] == user.upper()
            pids.setdefault(user, set()).add(row["pid"])
        assert all(len(p) == 1 for p in pids.values())
        assert len(set().union(*pids.values())) > 1  # keys are spread over workers
    finally:
        runtime.stop()


def test_a_hung_stage_is_killed_after_the_stage_timeout_and_others_keep_going():
    runtime = sf.LocalRuntime(min_workers=2, max_workers=2, stage_timeout_s=1.0, retries=1)
    try:
        flow = sf.Flow("hang")
        flow.map(lambda r: time.sleep(3600) if r["a"] < 0 else r["a"], names=["a"])
        app = flow.deploy(runtime=runtime)
        hung = app.run({"a": [-1]})
        assert app.run({"a": [5]}).result(timeout=10).to_rows() == [{"a": 5}]
        with pytest.raises(sf.OperatorError, match="stage_timeout_s"):
            hung.result(timeout=30)
        assert app.run({"a": [6]}).result(timeout=10).to_rows() == [{"a": 6}]
    finally:
        runtime.stop()


def _math_threads(row: sf.Row) -> tuple[int, str, str]:
    """What a stage sees: numpy's BLAS thread count and the two variables setting it."""
    from threadpoolctl import threadpool_info

    blas = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    variables = (os.environ.get(name, "") for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"))
    return blas[0], *variables


def _threads_seen(runtime: sf.LocalRuntime) -> tuple[int, str, str]:
    flow = sf.Flow("math_threads")
    flow.map(_math_threads, names=["blas", "omp", "openblas"])
    app = flow.deploy(runtime=runtime)
    try:
        row = app.run({"a": [1]}).result(timeout=30).to_rows()[0]
        return row["blas"], row["omp"], row["openblas"]
    finally:
        app.stop()


def test_a_worker_runs_its_math_libraries_on_one_thread_unless_told_otherwise(monkeypatch):
    # One BLAS thread per worker, as a one-CPU Ray actor has: with every core per worker,
    # OpenBLAS's threads spin after each call and take the cores from the other workers.
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    runtime = sf.LocalRuntime(min_workers=1, max_workers=1)
    try:
        assert _threads_seen(runtime) == (1, "1", "1")
    finally:
        runtime.stop()
    # A count asked for is given; a variable the user set is theirs and wins.
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    runtime = sf.LocalRuntime(min_workers=1, max_workers=1, worker_threads=2)
    try:
        assert _threads_seen(runtime) == (1, "2", "1")
    finally:
        runtime.stop()
    with pytest.raises(ValueError, match="worker_threads"):
        sf.LocalRuntime(worker_threads=0)


def _niceness_seen(runtime: sf.LocalRuntime) -> int:
    flow = sf.Flow("nice", schema={"x": int})
    flow.map(lambda x: os.getpriority(os.PRIO_PROCESS, 0), col="x", names=["n"])
    try:
        with flow.deploy(runtime=runtime) as app:
            return app.run(sf.Table.from_rows([{"x": 1}])).result(timeout=60).to_rows()[0]["n"]
    finally:
        runtime.stop()


def test_workers_run_below_the_driver_s_cpu_priority_unless_told_otherwise():
    # The driver admits and answers every request: in a flood it must not wait for a
    # core behind the workers it feeds.
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    assert _niceness_seen(sf.LocalRuntime(min_workers=1, max_workers=1)) == min(19, mine + 10)
    equal = sf.LocalRuntime(min_workers=1, max_workers=1, worker_niceness=0)
    assert _niceness_seen(equal) == mine
    for wrong in (-1, 20):
        with pytest.raises(ValueError, match="worker_niceness"):
            sf.LocalRuntime(worker_niceness=wrong)
