"""Every stage run the runtime charges to a worker (an outstanding run, its expected
seconds of work) is released once its request has ended, however it ended: answered,
failed, past its deadline, cancelled, its anyof branch lost, its input emptied by a
filter, re-run after its worker died. A charge that outlives its request is a slow
leak: a long-lived runtime fills its workers' queues with phantom runs, then holds
every new request at the driver for good (`test_runtime_core` shows that through
the public API).

White-box: `charges_left` reads the control plane's books, where a leak shows long
before it is large enough to hang the runtime. The workloads are the equivalence
test's random flows, plus requests that fail, time out or are cancelled.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import signal
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import serveflow as sf
from test_equivalence import KVS, RULESETS, TIMEOUT, build_flow, programs, tables, to_table

RELEASE_S = 5.0  # orphaned competing runs go with their worker's next heartbeats (0.5 s)
EXAMPLES = int(os.environ.get("SERVEFLOW_EXAMPLES", "15"))

# Competing copies (replicas of the high-variance map) each run the stages behind
# them, lookups included, on the worker the key hashes to: several runs of one stage
# of one request on one worker. Each was charged, but the books kept one entry per
# (request, stage, worker), so a request left runs counted (or counted some twice).
INNER = [("colmap", "a", 2, -1, "a", True), ("lookup", "b", "d"), ("lookup", "b", "e")]
BRANCH = [
    ("filter", "b", 3, 0),
    ("map", (("b", 1, -3, "b"), ("b", 1, 2, "a")), True, True),
    ("fanout", "anyof", INNER, INNER),
]
COPIES_INTO_LOOKUPS = (
    [("map", (("a", 2, -1, "b"),), False, False), ("fanout", "anyof", BRANCH, BRANCH)],
    None,
)
ROWS = [[(-3, 2), (-8, -6), (1, -8), (2, 4), (-8, 7), (-1, 2), (10, 2), (-6, 5)]] * 2


def charges_left(rt: sf.LocalRuntime) -> dict:
    """What `rt` still counts against its workers or keeps waiting (empty: nothing)."""
    with rt._lock:
        left: dict = {
            f"worker {i}": (w.load.outstanding, w.load.work)
            for i, w in rt._workers.items()
            if w.load.outstanding or w.load.work
        }
        if rt._competing:
            left["competing runs"] = dict(rt._competing)
        if rt._orphaned:
            left["orphaned runs"] = dict(rt._orphaned)
        if rt._unrouted:
            left["waiting requests"] = [r.id for _, r in rt._unrouted]
        active = {app.name: list(app.active) for app in rt._apps.values() if app.active}
        if active:
            left["active requests"] = active
    return left


def assert_released(rt: sf.LocalRuntime, after: str) -> None:
    deadline = time.monotonic() + RELEASE_S
    while charges_left(rt) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = charges_left(rt)
    assert not left, f"after {after}, with no request in flight, the runtime still holds {left}"


@pytest.fixture(scope="module")
def runtime():
    shared = sf.LocalRuntime()
    yield shared
    shared.stop()


def _slow_or_failing(r):
    """Takes a moment (so deadlines and cancellations catch requests in flight); a
    row with a == 10 fails its request."""
    if r["a"] == 10:
        raise ValueError("a row with a == 10")
    time.sleep(0.002)
    return r["a"], r["b"]


def _head(flow: sf.Flow) -> sf.Stream:
    return flow.map(_slow_or_failing, names=["a", "b"])


def _run(app, inputs, endings) -> None:
    """Run every input, ending each as told: waited for, a timeout (seconds), or
    cancelled at once; every request must end."""
    futures = {}
    for rows, ending in zip(inputs, itertools.cycle(endings), strict=False):
        future = app.run(to_table(rows), timeout=ending if isinstance(ending, float) else None)
        if ending == "cancel":
            future.cancel()
        futures[future] = (ending, rows)
    _, pending = concurrent.futures.wait(futures, timeout=TIMEOUT)
    never = [futures[f] for f in pending]
    assert not never, f"requests (ending, rows) that never ended: {never} of {len(futures)}"


def test_runs_behind_competing_copies_are_each_released(runtime):
    for attempt in range(4):
        for name in ("all", "all-but-whole"):
            flow = build_flow(COPIES_INTO_LOOKUPS)
            with flow.deploy(rules=sf.Rules(**RULESETS[name]), runtime=runtime) as app:
                for key, value in KVS.items():
                    app.kvs.put(key, value)
                _run(app, ROWS, ["wait"])
            assert_released(runtime, f"run {attempt} under rules {name!r}")


endings = st.lists(
    st.sampled_from(["wait", "wait", "cancel", 0.001, 0.005, 0.02]), min_size=1, max_size=3
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(program=programs(), inputs=tables, endings=endings)
def test_requests_release_their_runs_however_they_end(runtime, program, inputs, endings):
    flow = build_flow(program, head=_head)
    for name, rules in RULESETS.items():
        with flow.deploy(rules=sf.Rules(**rules), runtime=runtime) as app:
            for key, value in KVS.items():
                app.kvs.put(key, value)
            _run(app, inputs * 2, endings)
        assert_released(runtime, f"rules {name!r}")


def test_runs_of_requests_rerun_after_their_worker_died_are_released():
    """Requests in flight on a worker that is killed run again elsewhere; neither the
    runs on the dead worker nor the first attempt's runs elsewhere stay counted."""
    rt = sf.LocalRuntime(min_workers=3, max_workers=3)
    try:
        flow = sf.Flow("rerun")
        slow = flow.map(lambda r: time.sleep(0.2) or r["a"], names=["a"])
        quick = flow.map(lambda r: r["a"], names=["a"])
        slow.map(lambda r: r["a"] + 1, names=["a"]).anyof(quick.map(lambda r: r["a"], names=["a"]))
        for rules in (sf.Rules(fusion=False), sf.Rules(compete=True, compete_replicas=2)):
            with flow.deploy(rules=rules, runtime=rt) as app:
                app.run({"a": [0]}).result(timeout=TIMEOUT)  # loaded everywhere it runs
                futures = [app.run({"a": [i]}) for i in range(12)]
                time.sleep(0.1)
                os.kill(rt.worker_pids()[0], signal.SIGKILL)
                for future in futures:
                    future.exception(timeout=TIMEOUT)  # answered, or failed after retries
            assert_released(rt, f"a worker died under {rules.describe()}")
    finally:
        rt.stop()
