"""The runtime's core contract, written before its rewrite: anyof races its branches,
locality scales, deploys are never lost, one busy worker blocks nothing else, a
request past its deadline frees its worker, `gpu=True` is a resource, the sockets
run no one else's code, a killed driver leaves nothing behind, and the CLI can
bound a stage's run time.

Every test goes through the public API (plus /proc and the file system to look at
what the runtime left on the machine), starts its own runtimes and stops them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import random
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import deque
from pathlib import Path

import httpx
import pytest

import serveflow as sf

RESULT_S = 30  # bound on any single .result(): a hang fails the test, never the suite


def _wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


class Pool:
    """Runtimes and apps a test makes; all stopped at teardown. Apps are stopped with
    a short drain first, so that a request the bug left hanging cannot hold the
    teardown for `App.stop`'s default 30 s."""

    def __init__(self) -> None:
        self.runtimes: list[sf.LocalRuntime] = []
        self.apps: list[sf.App] = []

    def runtime(self, **options) -> sf.LocalRuntime:
        rt = sf.LocalRuntime(**options)
        self.runtimes.append(rt)
        return rt

    def deploy(self, flow: sf.Flow, rt: sf.LocalRuntime, rules: sf.Rules | None = None):
        app = flow.deploy(rules=rules, runtime=rt)
        self.apps.append(app)
        return app

    def close(self) -> None:
        for app in self.apps:
            with contextlib.suppress(Exception):
                app.stop(drain_timeout=1.0)
        for rt in self.runtimes:
            rt.stop()


@pytest.fixture
def pool():
    made = Pool()
    yield made
    made.close()


# -- 1. anyof ---------------------------------------------------------------------------

ANYOF_RULES = {
    "default": sf.Rules(),
    "no-fusion": sf.Rules(fusion=False),
    "whole": sf.Rules(whole=True),
    "compete": sf.Rules(compete=True),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rules", list(ANYOF_RULES.values()), ids=list(ANYOF_RULES))
def test_anyof_answers_with_its_fastest_branch_not_its_slowest(pool, rules):
    rt = pool.runtime()  # defaults: min_workers=1, the pool grows for the branches
    flow = sf.Flow("race")
    slow1 = flow.map(lambda r: time.sleep(2) or "slow1", names=["who"])
    slow2 = flow.map(lambda r: time.sleep(2) or "slow2", names=["who"])
    fast = flow.map(lambda r: "fast", names=["who"])
    slow1.anyof(slow2, fast)  # the fast branch last: "first input in order" cannot pass
    app = pool.deploy(flow, rt, rules)
    warm = app.run({"a": [0]}).result(timeout=RESULT_S).to_rows()  # cold starts
    assert warm in [[{"who": w}] for w in ("slow1", "slow2", "fast")]
    # Two in a row, with the losers of the previous request still sleeping: the
    # fast branch must not wait for them.
    for i in (1, 2):
        started = time.monotonic()
        out = app.run({"a": [i]}).result(timeout=RESULT_S).to_rows()
        took = time.monotonic() - started
        # (the stages' figures: where it waited, should this fail again; it failed in CI
        # at 2.00 s, stops 44, 60 and 65, and not in 20 runs here: see the narrow pool's
        # test below for the likely cause)
        figures = {
            name: (s["requests"], s["cold_starts"], s["workers"]) for name, s in app.stats().items()
        }
        assert out == [{"who": "fast"}], (i, out, took, warm, figures)
        assert took < 1.0, (
            f"request {i} took {took:.2f} s: anyof waited for a slow branch; {figures}"
        )


def _race_of_chains(pool, rt: sf.LocalRuntime, slow_s: float) -> sf.App:
    """Two branches of two stages each, one sleeping `slow_s`, into an anyof and a
    stage after it; deployed unfused, so that each stage runs on its own."""
    flow = sf.Flow("chains")
    slow = flow.map(lambda r: time.sleep(slow_s) or "slow", names=["who"]).map(
        lambda r: r["who"], names=["who"]
    )
    fast = flow.map(lambda r: "fast", names=["who"]).map(lambda r: r["who"], names=["who"])
    slow.anyof(fast).map(lambda r: r["who"].upper(), names=["who"])
    return pool.deploy(flow, rt, sf.Rules(fusion=False))


def _answer_fast(app: sf.App) -> None:
    for i in (1, 2, 3):
        started = time.monotonic()
        out = app.run({"a": [i]}).result(timeout=RESULT_S).to_rows()
        took = time.monotonic() - started
        assert out == [{"who": "FAST"}] and took < 1.0, (i, out, took)


@pytest.mark.timeout(60)
def test_anyof_branches_that_are_chains_race_as_wholes(pool):
    app = _race_of_chains(pool, pool.runtime(), 3.0)
    app.run({"a": [0]}).result(timeout=RESULT_S)
    _answer_fast(app)


@pytest.mark.timeout(60)
def test_anyof_chains_sharing_one_worker_run_the_fast_chain_through_first(pool):
    # One worker for both branches: once the slow branch has lost a race, the fast
    # chain is sent first, and its second stage must run before the slow chain's
    # first, though its input came later (that stage would then wait 2 s)
    app = _race_of_chains(pool, pool.runtime(max_workers=1), 2.0)
    app.run({"a": [0]}).result(timeout=RESULT_S)  # the branches' first race
    time.sleep(2.5)  # its loser done: the slow branch is known to lose
    _answer_fast(app)


@pytest.mark.timeout(90)
def test_anyof_on_a_pool_smaller_than_its_branches_learns_the_fast_one(pool):
    rt = pool.runtime(max_workers=2)
    flow = sf.Flow("narrow")
    slow1 = flow.map(lambda r: time.sleep(2) or "slow1", names=["who"])
    slow2 = flow.map(lambda r: time.sleep(1) or "slow2", names=["who"])
    fast = flow.map(lambda r: "fast", names=["who"])
    slow1.anyof(slow2, fast)
    app = pool.deploy(flow, rt)
    for i in range(3):  # the branches share workers: the first requests explore
        app.run({"a": [i]}).result(timeout=RESULT_S)
        time.sleep(0.5)  # stats reach the driver
    started = time.monotonic()
    outs = [app.run({"a": [i]}).result(timeout=RESULT_S).to_rows() for i in range(5)]
    took = time.monotonic() - started
    assert outs == [[{"who": "fast"}]] * 5 and took < 2.0, (outs, took)


@pytest.mark.timeout(90)
def test_anyof_on_a_narrow_pool_counts_a_branch_cut_short_as_slower_than_the_winner(pool):
    # The fast branch first: it wins the first race, and the slow ones are cut a moment
    # into their call. How long a cut call ran says nothing of its branch's speed: taken
    # for its run time (0.0 s against the winner's 0.1 ms), it put a slow branch first
    # on the worker it shares with the fast one (2 of 15 requests answered in 1 s).
    rt = pool.runtime(max_workers=2)
    flow = sf.Flow("narrow")
    fast = flow.map(lambda r: "fast", names=["who"])
    slow1 = flow.map(lambda r: time.sleep(1) or "slow1", names=["who"])
    slow2 = flow.map(lambda r: time.sleep(1) or "slow2", names=["who"])
    fast.anyof(slow1, slow2)
    app = pool.deploy(flow, rt)
    app.run({"a": [0]}).result(timeout=RESULT_S)
    time.sleep(0.5)  # stats reach the driver
    for i in range(1, 9):
        started = time.monotonic()
        out = app.run({"a": [i]}).result(timeout=RESULT_S).to_rows()
        took = time.monotonic() - started
        assert out == [{"who": "fast"}] and took < 0.5, (i, out, took)


# -- 2. locality that scales -----------------------------------------------------------


def _lookup_load(rules: sf.Rules, pool: Pool, keys: list[str]) -> tuple[float, list, object]:
    """300 requests, keys drawn from `keys`, 16 in flight, on a fresh runtime:
    (seconds, [(key, value, pid)], app)."""
    rt = pool.runtime(max_workers=4)
    flow = sf.Flow("lookups")
    flow.lookup("k", dynamic=True, into="v").map(
        lambda r: time.sleep(0.02) or (r["v"], os.getpid()), names=["v", "pid"]
    )
    app = pool.deploy(flow, rt, rules)
    for key in keys:
        app.kvs.put(key, key.upper())
    assert app.run({"k": [keys[0]]}).result(timeout=RESULT_S).to_rows()[0]["v"] == "K0"
    rng = random.Random(7)
    pending: deque = deque()
    rows: list[tuple[str, object, int]] = []

    def collect() -> None:
        key, future = pending.popleft()
        row = future.result(timeout=RESULT_S).to_rows()[0]
        rows.append((key, row["v"], row["pid"]))

    started = time.monotonic()
    for _ in range(300):
        if len(pending) >= 16:
            collect()
        key = rng.choice(keys)
        pending.append((key, app.run({"k": [key]})))
    while pending:
        collect()
    return time.monotonic() - started, rows, app


@pytest.mark.timeout(90)
def test_locality_spreads_keys_over_workers_and_keeps_each_key_on_one(pool):
    keys = [f"k{i}" for i in range(50)]
    spread_s, spread_rows, _ = _lookup_load(sf.Rules(locality=False), pool, keys)
    local_s, local_rows, app = _lookup_load(sf.Rules(locality=True), pool, keys)
    for rows in (spread_rows, local_rows):
        assert all(value == key.upper() for key, value, _ in rows)
    late_pids = {pid for _, _, pid in local_rows[150:]}  # once the pool has grown
    assert len(late_pids) >= 2, (
        f"with locality the lookup stage ran on one worker: {late_pids} "
        f"({local_s:.2f} s vs {spread_s:.2f} s without locality)"
    )
    assert local_s <= 1.6 * spread_s, (
        f"300 lookups took {local_s:.2f} s with locality vs {spread_s:.2f} s without"
    )
    # With the pool stable, one key keeps meeting the worker that caches it.
    pids = {app.run({"k": ["k3"]}).result(timeout=RESULT_S).column("pid")[0] for _ in range(10)}
    assert len(pids) == 1, pids


# -- 3. a deploy is never lost ---------------------------------------------------------


@pytest.mark.timeout(90)
def test_a_key_whose_worker_is_busy_with_a_long_call_goes_to_another(pool):
    rt = pool.runtime(min_workers=3, max_workers=3)
    flow = sf.Flow("busy-key")
    flow.lookup("k", dynamic=True, into="v").map(
        lambda r: (time.sleep(60) if r["v"] == "slow" else None, os.getpid())[1], names=["pid"]
    )
    app = pool.deploy(flow, rt)
    keys = [f"k{i}" for i in range(30)]
    for key in keys:
        app.kvs.put(key, key)
    app.kvs.put("slow", "slow")
    owner = {k: app.run({"k": [k]}).result(timeout=RESULT_S).column("pid")[0] for k in keys}
    stuck = app.run({"k": ["slow"]})  # holds its key's worker for 60 s
    time.sleep(0.5)
    for key in keys:  # every key answers, those of the busy worker's too
        answer = app.run({"k": [key]})
        with contextlib.suppress(TimeoutError):
            answer.result(timeout=RESULT_S)
        # one queued behind the busy worker answers only after the long call
        assert answer.done() and not stuck.done(), f"key {key} waited behind a busy worker"
    assert len(set(owner.values())) >= 2
    stuck.cancel()


def _slow_model(load_s: float):
    """A model class whose load (in `__init__`) takes `load_s` seconds (defined here,
    not at module level, so that it travels by value to the workers)."""

    class SlowModel:
        def __init__(self) -> None:
            time.sleep(load_s)

        def __call__(self, row):
            return "loaded"

    return SlowModel


@pytest.mark.timeout(90)
def test_a_large_plan_deployed_while_the_worker_is_busy_is_not_lost(pool):
    rt = pool.runtime(min_workers=1, max_workers=1)
    slow = sf.Flow("slow-load")
    slow.map(_slow_model(5.0), names=["status"])
    slow_app = pool.deploy(slow, rt)
    loading = slow_app.run({"a": [1]})
    time.sleep(0.5)  # the only worker is now surely inside the 5 s load, not reading

    blob = os.urandom(320_000)  # the plan of B is ~320 KB: over one datagram
    big = sf.Flow("big-plan")
    big.map(lambda r: len(blob), names=["n"])
    big_app = pool.deploy(big, rt)
    answer = big_app.run({"a": [1]})
    try:
        out = answer.result(timeout=RESULT_S)
    except TimeoutError:
        pytest.fail(f"no answer from the big-plan flow in {RESULT_S} s: its deploy was lost")
    assert out.to_rows() == [{"n": 320_000}]
    assert loading.result(timeout=RESULT_S).to_rows() == [{"status": "loaded"}]


# -- 4. one busy receiver blocks nothing else ------------------------------------------


@pytest.mark.timeout(90)
def test_a_worker_busy_loading_a_model_does_not_delay_other_flows(pool):
    rt = pool.runtime(min_workers=2, max_workers=2)
    slow = sf.Flow("slow-load")
    slow.map(_slow_model(6.0), names=["status"])
    slow_app = pool.deploy(slow, rt)
    loading = slow_app.run({"a": [1]})  # one of the two workers is now busy for 6 s
    time.sleep(0.2)
    for i in range(14):
        small = sf.Flow(f"small-{i}")
        small.map(lambda r, i=i: r["a"] + i, names=["b"])
        pool.deploy(small, rt)
    flow_b = sf.Flow("b")
    flow_b.map(lambda r: r["a"] * 2, names=["b"])
    app_b = pool.deploy(flow_b, rt)
    started = time.monotonic()
    out = app_b.run({"a": [21]}).result(timeout=RESULT_S).to_rows()
    took = time.monotonic() - started
    assert out == [{"b": 42}]
    assert took < 2.5, f"a request to an idle flow waited {took:.2f} s behind a busy worker"
    assert loading.result(timeout=RESULT_S).to_rows() == [{"status": "loaded"}]


@pytest.mark.timeout(90)
def test_requests_do_not_queue_behind_a_worker_busy_loading_a_model(pool):
    rt = pool.runtime(min_workers=1, max_workers=3)
    slow = sf.Flow("loading")
    slow.map(_slow_model(8.0), names=["x"])
    pool.deploy(slow, rt).run({"a": [1]})  # its worker is busy for 8 s
    time.sleep(1.5)
    flow = sf.Flow("other")
    flow.map(lambda r: r["a"], names=["a"])
    app = pool.deploy(flow, rt)
    started = time.monotonic()
    assert app.run({"a": [3]}).result(timeout=RESULT_S).to_rows() == [{"a": 3}]
    took = time.monotonic() - started
    assert took < 5.0, f"waited {took:.1f} s behind a worker busy loading a model"


@pytest.mark.timeout(90)
def test_stage_timeout_replaces_a_worker_that_stopped_answering(pool):
    rt = pool.runtime(min_workers=2, max_workers=2, stage_timeout_s=2.0)
    flow = sf.Flow("frozen")
    flow.map(lambda r: time.sleep(1) or os.getpid(), names=["pid"])
    app = pool.deploy(flow, rt)
    app.run({"a": [0]}).result(timeout=RESULT_S)
    running = app.run({"a": [1]})
    time.sleep(0.3)
    frozen = rt.worker_pids()
    for pid in frozen:  # no heartbeat can come: as when user code holds the GIL
        os.kill(pid, signal.SIGSTOP)
    try:
        out = running.result(timeout=RESULT_S).column("pid")[0]
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert out not in frozen  # re-run on a worker that replaced a frozen one


@pytest.mark.timeout(90)
def test_a_frozen_worker_is_replaced_within_seconds_by_default(pool):
    """SIGSTOP (no stage timeout set): the stopped worker's requests run again on
    another worker within the default heartbeat timeout, and the pool replaces it."""
    rt = pool.runtime(min_workers=2, max_workers=2)
    flow = sf.Flow("stopped")
    flow.map(lambda r: time.sleep(0.2) or os.getpid(), names=["pid"])
    app = pool.deploy(flow, rt)
    warm = [app.run({"a": [i]}) for i in range(8)]  # both workers load the stage
    assert {f.result(timeout=RESULT_S).column("pid")[0] for f in warm} == set(rt.worker_pids())
    frozen = rt.worker_pids()[0]
    os.kill(frozen, signal.SIGSTOP)
    try:
        started = time.monotonic()
        futures = [app.run({"a": [i]}) for i in range(6)]  # some go to the frozen one
        pids = [f.result(timeout=RESULT_S).column("pid")[0] for f in futures]
        took = time.monotonic() - started
        assert frozen not in pids
        assert took < 4.0, f"requests on a stopped worker took {took:.1f} s to be re-run"
        assert _wait_for(lambda: frozen not in rt.worker_pids() and len(rt.worker_pids()) == 2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGCONT)


@pytest.mark.timeout(90)
def test_a_worker_takes_other_stages_again_as_soon_as_its_model_is_loaded(pool):
    rt = pool.runtime(min_workers=1, max_workers=1)
    quick = sf.Flow("quick")
    quick.map(lambda r: r["a"], names=["a"])
    quick_app = pool.deploy(quick, rt)
    quick_app.run({"a": [0]}).result(timeout=RESULT_S)
    for i in range(3):  # loads that outlast a heartbeat, then a request right after
        slow = sf.Flow(f"loads-{i}")
        slow.map(_slow_model(0.8), names=["x"])
        pool.deploy(slow, rt).run({"a": [1]}).result(timeout=RESULT_S)
        started = time.monotonic()
        quick_app.run({"a": [i]}).result(timeout=RESULT_S)
        took = time.monotonic() - started
        # behind the load it would wait up to 0.8 s
        assert took < 0.6, f"after a model load, a request waited {took:.2f} s to be routed"


# -- 5. a timed-out request frees its worker -------------------------------------------


def _slow_rows_app(pool: Pool):
    rt = pool.runtime(min_workers=1, max_workers=1)
    flow = sf.Flow("slow-rows")
    flow.map(lambda r: time.sleep(0.1) or r["a"], names=["a"], name="nap")
    app = pool.deploy(flow, rt)
    assert app.run({"a": [0]}).result(timeout=RESULT_S).to_rows() == [{"a": 0}]  # warm
    return app


@pytest.mark.timeout(60)
def test_a_request_past_its_deadline_stops_occupying_its_worker(pool):
    app = _slow_rows_app(pool)
    long = app.run({"a": list(range(100))}, timeout=0.5)  # 10 s of work
    with pytest.raises(sf.DeadlineError):
        long.result(timeout=RESULT_S)
    started = time.monotonic()
    assert app.run({"a": [7]}).result(timeout=RESULT_S).to_rows() == [{"a": 7}]
    took = time.monotonic() - started
    assert took < 2.0, f"the next request waited {took:.2f} s for an expired one"


@pytest.mark.timeout(60)
def test_a_cancelled_future_stops_occupying_its_worker(pool):
    app = _slow_rows_app(pool)
    long = app.run({"a": list(range(100))})  # 10 s of work
    time.sleep(0.3)
    assert long.cancel() and long.cancelled()
    assert not long.cancel() or long.cancelled()  # cancelling twice changes nothing
    started = time.monotonic()
    assert app.run({"a": [7]}).result(timeout=RESULT_S).to_rows() == [{"a": 7}]
    took = time.monotonic() - started
    assert took < 2.0, f"the next request waited {took:.2f} s for a cancelled one"


@pytest.mark.timeout(60)
def test_futures_a_caller_keeps_stay_usable_and_light_for_the_garbage_collector(pool):
    # A caller keeping thousands of settled futures makes the cyclic collector's full
    # collections, which hold the driver's GIL, walk them all: 15 tracked objects each
    # (a condition, its lock, queue and bound methods) took 23-53 ms every 2 s with
    # 18,000 kept at 3,000 requests/s, and each made every request in flight late
    import gc
    from concurrent.futures import as_completed, wait

    rt = pool.runtime(min_workers=1, max_workers=1)
    flow = sf.Flow("kept")
    flow.map(lambda r: r["a"] + 1, names=["b"], name="inc")
    app = pool.deploy(flow, rt)
    app.run({"a": [0]}).result(timeout=RESULT_S)
    gc.collect()
    before = len(gc.get_objects())
    kept = [app.run({"a": [i]}) for i in range(1000)]
    done, _ = wait(kept, timeout=RESULT_S)
    assert len(done) == len(kept)
    assert len(list(as_completed(kept, timeout=RESULT_S))) == len(kept)  # settled ones too

    def tracked_per_future() -> float:
        gc.collect()
        return (len(gc.get_objects()) - before) / len(kept)

    # the runtime's own bookkeeping of the last requests may end just after they settle
    assert _wait_for(lambda: tracked_per_future() <= 8, timeout=2), tracked_per_future()
    called = []
    kept[0].add_done_callback(called.append)  # settled: called at once
    assert called == [kept[0]]
    assert not kept[0].cancel() and kept[0].done() and not kept[0].cancelled()
    assert [f.result(timeout=1).to_rows() for f in kept[:3]] == [[{"b": i + 1}] for i in range(3)]
    refused = app.run({"a": ["x"]})  # a failure settles its future the same way
    assert isinstance(refused.exception(timeout=RESULT_S), sf.OperatorError)
    assert wait([refused, kept[1]], timeout=1).not_done == set()


def test_requests_answered_within_their_deadline_leave_nothing_for_the_garbage_collector(pool):
    # each one's deadline timer stayed until its time: a tracked list per request for the
    # whole timeout, which every full collection of the driver walked with the GIL held
    import gc
    from concurrent.futures import wait

    rt = pool.runtime(min_workers=1, max_workers=1)
    flow = sf.Flow("timed")
    flow.map(lambda r: r["a"] + 1, names=["b"], name="inc")
    app = pool.deploy(flow, rt)
    app.run({"a": [0]}, timeout=600).result(timeout=RESULT_S)
    gc.collect()
    before = len(gc.get_objects())
    for _ in range(6):
        done, _ = wait([app.run({"a": [i]}, timeout=600) for i in range(500)], timeout=RESULT_S)
        assert len(done) == 500 and all(f.exception() is None for f in done)
    del done

    def left() -> int:
        gc.collect()
        return len(gc.get_objects()) - before

    assert _wait_for(lambda: left() < 500, timeout=2), left()


def test_a_deploy_collects_the_cycles_its_process_left_before_the_app_serves(pool):
    # A process deploying apps in turn (this suite) held the cycles of the runtimes it
    # stopped until a full collection found them, 55-90 ms into the next app's burst
    # of 1,000 requests under an SLO of 100 ms: 15-90% of those admitted answered late
    import gc
    import weakref

    class Cyclic:
        pass

    garbage = Cyclic()
    garbage.me = garbage
    gone = weakref.ref(garbage)
    gc.collect()  # old now: only a full collection finds it
    del garbage
    assert gone() is not None
    flow = sf.Flow("after")
    flow.map(lambda r: r["a"] + 1, names=["b"], name="inc")
    pool.deploy(flow, pool.runtime(min_workers=1, max_workers=1))
    assert gone() is None


@pytest.mark.timeout(60)
def test_a_request_whose_http_client_went_away_stops_occupying_its_worker(pool):
    from serveflow.serving import Server

    app = _slow_rows_app(pool)
    with Server({"slow": app}, port=0, stop_apps=False, drain_timeout=1) as server:
        url = f"{server.url}/v1/flows/slow/predict"
        with pytest.raises(httpx.TimeoutException):
            httpx.post(url, json={"columns": {"a": list(range(100))}}, timeout=0.5)
        started = time.monotonic()
        r = httpx.post(url, json={"rows": [{"a": 7}]}, timeout=RESULT_S)
        took = time.monotonic() - started
        assert r.status_code == 200 and r.json() == {"rows": [{"a": 7}]}, r.text
        assert took < 2.0, f"the next request waited {took:.2f} s for an abandoned one"


# -- 6. gpu=True is a resource ---------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "gpus, device", [(1, "0"), ([3], "3"), (0, None)], ids=["count", "ids", "none"]
)
def test_gpu_stages_run_on_a_worker_that_owns_a_device(pool, gpus, device):
    rt = pool.runtime(gpus=gpus)
    flow = sf.Flow("placed")
    a = flow.map(
        lambda r: (os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")),
        names=["cpu_pid", "cpu_env"],
    )
    a.map(
        lambda r: (r["cpu_pid"], r["cpu_env"], os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")),
        names=["cpu_pid", "cpu_env", "gpu_pid", "gpu_env"],
        gpu=True,
    )
    app = pool.deploy(flow, rt)
    rows = [app.run({"a": [i]}).result(timeout=RESULT_S).to_rows()[0] for i in range(8)]
    for row in rows:
        assert row["cpu_env"] in (None, ""), row  # CPU workers see no device
        if device is None:
            assert row["gpu_env"] in (None, ""), row
        else:
            assert row["gpu_env"] == device, row
            assert row["gpu_pid"] != row["cpu_pid"], row
    if device is None:
        assert "placed on cpu (gpu=True requested" in app.explain()
    else:
        assert "placed on gpu" in app.explain()


@pytest.mark.parametrize("gpus", [-1, True, 1.5, "01", [0, "a"], [-2], [1, 1], [False]])
def test_a_runtime_refuses_gpus_that_name_no_devices(gpus):
    with pytest.raises(ValueError, match=r"gpus: .*got"):
        sf.LocalRuntime(gpus=gpus)


# -- 7. the sockets run no one else's code ---------------------------------------------


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    with contextlib.suppress(FileNotFoundError, PermissionError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[len("socket:[") : -1])
    return inodes


def _unix_addresses(pids: list[int]) -> list[tuple[bytes, int]]:
    """(address, socket type) of every named Unix socket the processes hold; an
    abstract name ('@...' in /proc/net/unix) becomes b'\\0...'."""
    inodes = set().union(*(_socket_inodes(pid) for pid in pids))
    found = []
    with open("/proc/net/unix") as table:
        next(table)  # Num RefCount Protocol Flags Type St Inode Path
        for line in table:
            fields = line.split(None, 7)
            if len(fields) < 8 or fields[6] not in inodes:
                continue
            path = fields[7].rstrip("\n")
            addr = b"\0" + path[1:].encode() if path.startswith("@") else path.encode()
            found.append((addr, int(fields[4], 16)))
    return sorted(set(found))


class _Touch:
    """Unpickling this runs `touch PATH`."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def _malformed() -> list[bytes]:
    bodies = [
        pickle.dumps(42),
        pickle.dumps({"kind": "result"}),
        pickle.dumps(("result", 1)),
        pickle.dumps(("hello",)),
        pickle.dumps(("result", 1, 2, 3, 4, 5, 6)),
        pickle.dumps(()),
    ]
    datagrams = [b"", os.urandom(64), os.urandom(4096), b"I", b"S", b"\x80"]
    for body in bodies:
        datagrams += [b"I" + body, b"S" + body, body]
    return datagrams


def _crafted(marker: str) -> list[bytes]:
    evil = [pickle.dumps(_Touch(marker), protocol=p) for p in (2, 5)]
    datagrams = []
    for body in evil:
        for tagged in (b"I" + body, b"S" + body, body):
            # also framed, in case a stream socket expects a length first
            datagrams += [tagged, struct.pack("!I", len(tagged)) + tagged]
            datagrams += [struct.pack("<Q", len(tagged)) + tagged]
    return datagrams + _malformed()


INTRUDER = textwrap.dedent(
    """
    import json, socket, sys
    spec = json.load(sys.stdin)
    sent = []
    for addr, kind in spec["targets"]:
        addr = bytes.fromhex(addr)
        for data in spec["payloads"]:
            data = bytes.fromhex(data)
            sock = socket.socket(socket.AF_UNIX, kind)
            sock.settimeout(0.0 if kind == socket.SOCK_DGRAM else 0.5)  # a full queue: skip
            try:
                if kind == socket.SOCK_DGRAM:
                    sock.sendto(data, addr)
                else:
                    sock.connect(addr)
                    sock.sendall(data)
                sent.append(addr.hex())
            except OSError:
                pass
            finally:
                sock.close()
    print(json.dumps(sorted(set(sent))))
    """
)


def _send_all(targets: list[tuple[bytes, int]], payloads: list[bytes]) -> int:
    sent = 0
    for addr, kind in targets:
        for data in payloads:
            sock = socket.socket(socket.AF_UNIX, kind)
            sock.settimeout(0.0 if kind == socket.SOCK_DGRAM else 0.5)  # a full queue: skip
            try:
                if kind == socket.SOCK_DGRAM:
                    sock.sendto(data, addr)
                else:
                    sock.connect(addr)
                    sock.sendall(data)
                sent += 1
            except OSError:
                pass
            finally:
                sock.close()
    return sent


def _serving_app(pool: Pool):
    rt = pool.runtime(min_workers=2)
    flow = sf.Flow("victim")
    flow.map(lambda r: r["a"] + 1, names=["b"])
    app = pool.deploy(flow, rt)
    assert app.run({"a": [1]}).result(timeout=RESULT_S).to_rows() == [{"b": 2}]
    return rt, app


def _still_serves(app, n: int = 20) -> None:
    futures = [app.run({"a": [i]}) for i in range(n)]
    try:
        rows = [f.result(timeout=10).to_rows() for f in futures]
    except TimeoutError:
        pytest.fail("the app stopped answering after the crafted messages")
    assert rows == [[{"b": i + 1}] for i in range(n)]


INTRUDER_USER = "sf-intruder"


@pytest.mark.timeout(90)
@pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(c) for c in ("useradd", "userdel", "runuser")),
    reason="needs root and useradd/userdel/runuser to act as a second local user",
)
def test_a_second_local_user_cannot_make_the_runtime_run_code(pool):
    rt, app = _serving_app(pool)
    targets = _unix_addresses([os.getpid(), *rt.worker_pids()])
    assert targets, "found no Unix socket of the driver or its workers"
    marker = f"/tmp/sf-pwned-{secrets.token_hex(6)}"
    payloads = _crafted(marker)
    exists = subprocess.run(["id", "-u", INTRUDER_USER], capture_output=True).returncode == 0
    if not exists:
        subprocess.run(["useradd", "-M", INTRUDER_USER], check=True, capture_output=True)
    try:
        spec = {
            "targets": [[addr.hex(), kind] for addr, kind in targets],
            "payloads": [p.hex() for p in payloads],
        }
        intruder = subprocess.run(
            ["runuser", "-u", INTRUDER_USER, "--", "/usr/bin/python3", "-c", INTRUDER],
            input=json.dumps(spec),
            capture_output=True,
            text=True,
            cwd="/",
            timeout=60,
        )
        assert intruder.returncode == 0, intruder.stderr
        time.sleep(1.0)  # let the receivers read what got through
        reached = [bytes.fromhex(a).replace(b"\0", b"@") for a in json.loads(intruder.stdout)]
        assert not os.path.exists(marker), (
            f"a datagram from another user ran code in the runtime (it reached {reached})"
        )
        _still_serves(app)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(marker)
        subprocess.run(["userdel", INTRUDER_USER], capture_output=True)


@pytest.mark.timeout(60)
def test_messages_no_worker_sends_do_not_stop_the_driver(pool):
    from serveflow.runtime import codec
    from serveflow.runtime import messages as m

    rt, app = _serving_app(pool)
    shm = codec.SharedMemory(tempfile.mkdtemp())
    wrong = [m.Exit(), m.Beat(0, "x"), m.Beat("x", None), m.Stats(0, [], 5, None),
             m.Done([1], 2, 3, 4, 5), m.Result(1, [2], 0, None), m.Hello("x", 1)]  # fmt: skip
    for worker in [*rt._workers, "nobody"]:  # also as a worker that exists
        wrong += [m.Beat(worker, "x"), m.Stats(worker, [], 5, None)]
    targets = _unix_addresses([os.getpid()])
    assert _send_all(targets, [codec.encode(w, shm) for w in wrong]) > 0
    time.sleep(1.0)
    _still_serves(app)
    victim = rt.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)  # the monitor still replaces workers
    assert _wait_for(lambda: victim not in rt.worker_pids() and len(rt.worker_pids()) >= 2)
    _still_serves(app)


@pytest.mark.timeout(60)
def test_malformed_messages_to_the_driver_do_not_stop_it(pool):
    _, app = _serving_app(pool)
    targets = _unix_addresses([os.getpid()])
    assert targets, "found no Unix socket of the driver"
    assert _send_all(targets, _malformed()) > 0
    time.sleep(0.5)
    _still_serves(app)


@pytest.mark.timeout(60)
def test_wrongly_typed_messages_to_a_worker_do_not_stop_it(pool):
    """Messages of the right types with fields a worker cannot act on (sent as the
    runtime's own user, who alone can reach its sockets): each is dropped with a log
    line; no worker dies or spins, and the app keeps serving. (A batch size of -5
    once sent a worker into an endless loop, a deadline that was a string killed it,
    a plan "path" of 0 read its stdin.)"""
    from serveflow.runtime import codec
    from serveflow.runtime import messages as m

    rt, app = _serving_app(pool)
    pids = set(rt.worker_pids())
    shm = codec.SharedMemory(tempfile.mkdtemp())
    policies = [("big", None), (-5, -1.0), (0, 0.0), (2.5, 0.0), (4, math.nan)]
    wrong = [m.Policy(app.id, 0, size, timeout) for size, timeout in policies]
    wrong += [m.Deploy(90, 0), m.Load(90, 0), m.Deploy(91, "/dev/stdin"), m.Load(91, 0),
              m.Deploy(92, None), m.Load(92, 0)]  # fmt: skip
    good = dict(app=app.id, rid=10**9, attempt=0, stage=0, op=0, value=sf.Table({"a": [1]}),
                route=((0,),), deadline=None, sent=time.monotonic(), began=None)  # fmt: skip
    for field, value in [("rid", "x"), ("attempt", "a"), ("stage", "s"), ("op", None),
                         ("deadline", "soon"), ("sent", "now"), ("began", "then")]:  # fmt: skip
        wrong.append(m.Input(**{**good, field: value}))
    targets = _unix_addresses(sorted(pids))
    assert _send_all(targets, [codec.encode(w, shm) for w in wrong]) > 0
    time.sleep(1.0)
    _still_serves(app)
    assert pids <= set(rt.worker_pids()), "a worker died of a message"  # (a busy pool may grow)
    for _ in range(3):  # a worker stuck on one would leave some requests unanswered
        _still_serves(app)


# -- 8. a killed driver leaves no debris ----------------------------------------------

DRIVER = textwrap.dedent(
    """
    import json, time
    import numpy as np
    import serveflow as sf

    rt = sf.LocalRuntime(min_workers=3, heartbeat_timeout_s=None)  # the hog stays
    hog = sf.Flow("hog")  # holds the GIL: a thread of its worker cannot run
    hog.map(lambda r: sum(range(10**12)), names=["x"])
    held = [hog.deploy(runtime=rt).run({"a": [1]})]
    sleepy = sf.Flow("sleepy")
    sleepy.map(lambda r: time.sleep(60) or 1, names=["x"])
    held.append(sleepy.deploy(runtime=rt).run({"a": [1]}))
    arrays = sf.Flow("arrays")
    arrays.map(lambda x: x[::-1].copy(), col="x")
    big = np.arange(1_000_000, dtype=np.uint8)
    arrays.deploy(runtime=rt).run(sf.Table({"x": [big]})).result(timeout=60)
    holding = sf.Flow("holding")
    holding.map(lambda x: time.sleep(60) or x, col="x")
    held.append(holding.deploy(runtime=rt).run(sf.Table({"x": [big]})))
    time.sleep(1.0)
    print(json.dumps(rt.worker_pids()), flush=True)
    time.sleep(600)
    """
)


def _alive(pid: int) -> bool:
    """True for a process that exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _children(pid: int) -> set[int]:
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError), open(f"/proc/{name}/stat") as stat:
            if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(name))
    return found


def _held_entries(pids: set[int], parents: dict[str, str]) -> dict[str, set[str]]:
    """Top-level names under each parent folder that the processes hold: open files,
    mappings, named Unix sockets (what belonged to the runtime)."""
    paths: set[str] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    paths.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        with contextlib.suppress(OSError), open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                fields = line.split(None, 5)
                if len(fields) == 6:
                    paths.add(fields[5].strip())
    paths |= {a.decode(errors="replace") for a, _ in _unix_addresses(sorted(pids))}
    held: dict[str, set[str]] = {key: set() for key in parents}
    for path in paths:
        if path.endswith(" (deleted)"):
            continue
        for key, parent in parents.items():
            if path.startswith(parent + os.sep):
                held[key].add(path[len(parent) + 1 :].split(os.sep, 1)[0])
    return held


def _kill_driver() -> tuple[set[int], dict[str, set[str]]]:
    """Start a driver in a subprocess, SIGKILL it ~2 s after its workers are busy;
    return its worker pids and the new entries under /dev/shm and the temp dir that
    belonged to it."""
    parents = _parents()
    before = {key: set(os.listdir(parent)) for key, parent in parents.items()}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True)
    try:
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(driver.stdout.readline()))
        reader.start()
        reader.join(60)
        assert line and line[0].strip(), f"the driver printed no worker pids: {line}"
        pids = set(json.loads(line[0]))
        time.sleep(2.0)
        pids |= _children(driver.pid)
        held = _held_entries(pids | {driver.pid}, parents)
        after = {key: set(os.listdir(parent)) for key, parent in parents.items()}
        new = {key: (after[key] - before[key]) & held[key] for key in parents}
    finally:
        driver.kill()
        driver.wait()
    return pids, new


def _parents() -> dict[str, str]:
    return {"shm": "/dev/shm", "tmp": os.path.realpath(tempfile.gettempdir())}


def _remove(new: dict[str, set[str]]) -> None:
    parents = _parents()
    for key, names in new.items():
        for name in names:
            path = os.path.join(parents[key], name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)


def _kill_all(pids: set[int]) -> None:
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(90)
def test_workers_of_a_killed_driver_exit():
    pids, new = _kill_driver()
    try:
        assert pids
        # at once with the parent-death signal; the rest is a loaded machine's slack
        _wait_for(lambda: not any(_alive(p) for p in pids), timeout=15.0)
        survivors = sorted(p for p in pids if _alive(p))
        assert not survivors, f"workers {survivors} outlived their killed driver"
    finally:
        _kill_all(pids)
        _remove(new)


@pytest.mark.timeout(90)
def test_the_next_runtime_removes_what_a_killed_driver_left(pool):
    pids, new = _kill_driver()
    _kill_all(pids)  # this test is about the files, not the processes (see above)
    _wait_for(lambda: not any(_alive(p) for p in pids), timeout=5.0)
    try:
        _check_removed_by_next_runtime(pool, new)
    finally:
        _remove(new)  # what the bug left: the test itself leaves no debris


def _check_removed_by_next_runtime(pool: Pool, new: dict[str, set[str]]) -> None:
    rt = pool.runtime()
    flow = sf.Flow("next")
    flow.map(lambda r: r["a"], names=["a"])
    app = pool.deploy(flow, rt)
    assert app.run({"a": [1]}).result(timeout=RESULT_S).to_rows() == [{"a": 1}]
    parents = _parents()

    def left() -> dict[str, list[str]]:
        return {
            key: sorted(n for n in names if os.path.lexists(os.path.join(parents[key], n)))
            for key, names in new.items()
        }

    _wait_for(lambda: not any(left().values()), timeout=5.0)
    assert not any(left().values()), f"left behind by the killed driver: {left()}"


# -- 9. serveflow serve --stage-timeout ------------------------------------------------

HANGING = textwrap.dedent(
    """
    import time
    import serveflow as sf

    hang = sf.Flow("hang")
    hang.map(lambda r: time.sleep(r["s"]) or "done", names=["status"], name="nap")
    """
)


@pytest.mark.timeout(120)
def test_serve_stage_timeout_fails_a_hung_stage(tmp_path: Path):
    help_text = subprocess.run(
        [sys.executable, "-m", "serveflow.serving.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "--stage-timeout" in help_text
    flows = tmp_path / "hang.py"
    flows.write_text(HANGING)
    command = [sys.executable, "-m", "serveflow.serving.cli", "serve", str(flows),
               "--port", "0", "--log-level", "warning", "--stage-timeout", "1"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert " on http://" in line, line
        url = line.split(" on ")[1].split()[0]
        assert _wait_for(lambda: _ready(url), timeout=30)
        predict = f"{url}/v1/flows/hang/predict"
        started = time.monotonic()
        hung = httpx.post(predict, json={"rows": [{"s": 3600}]}, timeout=60)
        took = time.monotonic() - started
        assert hung.status_code == 500, hung.text
        assert took < 30, took
        ok = httpx.post(predict, json={"rows": [{"s": 0}]}, timeout=30)
        assert ok.status_code == 200 and ok.json() == {"rows": [{"status": "done"}]}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


# -- values that cannot travel between processes ----------------------------------------


@pytest.mark.timeout(60)
def test_values_that_cannot_be_sent_fail_their_request_with_a_clear_error(pool):
    rt = pool.runtime(min_workers=2)
    flow = sf.Flow("unsendable")
    flow.map(lambda r: threading.Lock() if r["a"] == 1 else r["a"], names=["b"], name="makes")
    app = pool.deploy(flow, rt)
    with pytest.raises(sf.OperatorError, match=r"'makes'.*pickle"):
        app.run({"a": [1]}).result(timeout=RESULT_S)
    with pytest.raises(sf.InputError, match="cannot be sent"):
        app.run({"a": [lambda: 0]}).result(timeout=RESULT_S)
    assert app.run({"a": [2]}).result(timeout=RESULT_S).to_rows() == [{"b": 2}]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("hop", ["to-the-driver", "to-another-worker"])
def test_values_the_receiver_cannot_read_fail_their_request_with_a_clear_error(pool, hop):
    """A value that pickles but does not unpickle where it arrives (here it rebuilds
    as int('one'); also a class the receiver cannot import) fails its request with an
    OperatorError, never a silent drop that leaves the request hanging."""

    class Unreadable:
        def __init__(self, a: int) -> None:
            self.a = a

        def __reduce__(self):
            return int, ("one" if self.a == 1 else str(self.a),)

    rt = pool.runtime(min_workers=2, gpus=1)  # the gpu stage runs on another worker
    flow = sf.Flow("unreadable")
    made = flow.map(lambda r: Unreadable(r["a"]), names=["u"], name="makes")
    if hop == "to-another-worker":
        made.map(lambda r: r["u"] + 1, names=["u"], gpu=True)
    app = pool.deploy(flow, rt, sf.Rules(fusion=False))
    expected = 3 if hop == "to-another-worker" else 2
    assert app.run({"a": [2]}).result(timeout=RESULT_S).to_rows() == [{"u": expected}]
    with pytest.raises(sf.OperatorError, match=r"'makes'.*cannot be read.*ValueError"):
        app.run({"a": [1]}).result(timeout=RESULT_S)
    assert app.run({"a": [2]}).result(timeout=RESULT_S).to_rows() == [{"u": expected}]


@pytest.mark.timeout(120)
def test_anyof_losers_do_not_leave_their_workers_counted_busy(pool):
    """Every run of a lost branch is released, also the runs it never reached: a
    long-lived runtime serving an anyof keeps routing (it once filled up with losers'
    charges and then held every new request at the driver for good)."""
    rt = pool.runtime(max_workers=2, worker_queue=4)
    flow = sf.Flow("losers")
    slow = flow.map(lambda r: time.sleep(0.05) or "slow", names=["who"])
    slow = slow.map(lambda r: r["who"], names=["who"]).map(lambda r: r["who"], names=["who"])
    fast = flow.map(lambda r: "fast", names=["who"])
    slow.anyof(fast)
    app = pool.deploy(flow, rt, sf.Rules(fusion=False))
    for i in range(40):
        out = app.run({"a": [i]}).result(timeout=RESULT_S).to_rows()
        assert out in ([{"who": "fast"}], [{"who": "slow"}]), (i, out)


def _copies_into_lookups() -> sf.Flow:
    """Competing copies of a high-variance stage each feed the lookups behind them:
    one request runs a lookup stage several times on the worker its key hashes to."""
    flow = sf.Flow("copies")
    keyed = flow.map(lambda r: r["a"] % 6, names=["k"])

    def copies(stream: sf.Stream) -> sf.Stream:
        copied = stream.map(lambda r: (r["k"], r["k"] + 1), names=["k", "v"], high_variance=True)
        return copied.lookup("k", dynamic=True, into="d").lookup("k", dynamic=True, into="e")

    copies(keyed).anyof(copies(keyed))
    return flow


@pytest.mark.timeout(180)
def test_a_runtime_that_served_competing_copies_shrinks_back_once_idle(pool):
    """Each run of a stage behind competing copies is released, however many copies
    reach it: once its requests are done and the app stopped, an idle runtime
    retires its extra workers. (Phantom runs once stayed counted for good: 34 on one
    worker after 60 requests here. That worker never counted as idle, the pool
    never shrank, and a runtime whose workers all filled up so held every new
    request at the driver forever.)"""
    rt = pool.runtime(max_workers=3, worker_queue=4, idle_s=0.5)
    copies = pool.deploy(_copies_into_lookups(), rt, sf.Rules(compete=True))
    for key in range(6):
        copies.kvs.put(str(key), key * 7)
    for i in range(60):
        out = copies.run({"a": [i]}).result(timeout=RESULT_S).to_rows()
        k = i % 6
        assert out == [{"k": k, "v": k + 1, "d": k * 7, "e": k * 7}], (i, out)
    assert len(rt.worker_pids()) > 1  # an anyof's branches run on workers of their own
    copies.stop()
    assert _wait_for(lambda: len(rt.worker_pids()) == 1, timeout=20), rt.worker_pids()
    plain = sf.Flow("plain")
    plain.map(lambda r: r["a"] + 1, names=["b"])
    plain = pool.deploy(plain, rt)
    burst = [plain.run({"a": [i]}) for i in range(40)]
    assert [f.result(timeout=RESULT_S).to_rows() for f in burst] == [
        [{"b": i + 1}] for i in range(40)
    ]
