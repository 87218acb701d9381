"""The driver's hot path: requests end through one hook rather than done-callbacks,
and plain plans are routed in one pass. These hold the guarantees on that path:
deadlines, timeouts and cancellation reach a waiting caller on time, requests of
callers that never wait are answered beside one that does, and the one-pass routing
picks what the general path picks.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time

import pytest

import serveflow as sf

RESULT_S = 30


@pytest.fixture(scope="module")
def app():
    def nap(seconds: float) -> None:
        """Sleep, through interruptions too: a stage that no Cancel stops, so no
        message tells the driver when its request ends early."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            with contextlib.suppress(BaseException):  # the point of this stage
                time.sleep(left)

    runtime = sf.LocalRuntime(min_workers=2, max_workers=2)
    flow = sf.Flow("hot")
    flow.map(lambda r: nap(r["s"]) or r["a"], names=["a"], name="nap")
    deployed = flow.deploy(runtime=runtime)
    assert deployed.run({"a": [1], "s": [0.0]}).result(timeout=RESULT_S).to_rows() == [{"a": 1}]
    yield deployed
    deployed.stop(drain_timeout=5)
    runtime.stop()


def _request(a: int, s: float = 0.0) -> dict:
    return {"a": [a], "s": [s]}


def test_a_request_that_ended_is_not_held_until_its_deadline(app):
    """A request with a long timeout that is answered (or refused) early is freed once
    its caller drops it, not when the timeout would have passed: under load, every
    request of the last `timeout` seconds held alive made full garbage collections
    long enough to show in the p99."""
    import gc
    import weakref

    future = app.run(_request(7), timeout=600)
    assert future.result(timeout=RESULT_S).to_rows() == [{"a": 7}]
    gone = weakref.ref(future)
    del future
    gc.collect()
    assert gone() is None, "the answered request is still held"


def test_a_finished_request_is_freed_without_the_cycle_collector(app):
    """An answered or cancelled request is freed as its caller drops the future: no
    cycle between the two waits for the garbage collector, whose full collections
    grew to 30-190 ms at 4,000 requests/s and stalled every thread of the driver."""
    import gc
    import weakref

    gc.collect()
    gc.disable()
    try:
        answered = app.run(_request(3), timeout=600)
        assert answered.result(timeout=RESULT_S).to_rows() == [{"a": 3}]
        began = answered.began
        assert began is not None
        cancelled = app.run(_request(4, 1.0), timeout=600)
        assert cancelled.cancel()
        gone = [weakref.ref(answered), weakref.ref(cancelled)]
        del answered, cancelled
        assert [ref() for ref in gone] == [None, None], "a finished request is held"
    finally:
        gc.enable()


@pytest.mark.timeout(60)
def test_a_caller_waiting_alone_gets_its_deadline_error_on_time(app):
    started = time.monotonic()
    with pytest.raises(sf.DeadlineError):
        app.run(_request(1, 3.0), timeout=0.3).result(timeout=RESULT_S)
    took = time.monotonic() - started
    assert took < 1.0, f"the deadline error of 0.3 s reached the caller after {took:.2f} s"


@pytest.mark.timeout(60)
def test_a_caller_waiting_alone_times_out_on_time_and_can_wait_again(app):
    future = app.run(_request(2, 1.0))
    started = time.monotonic()
    with pytest.raises(concurrent.futures.TimeoutError):
        future.result(timeout=0.2)
    took = time.monotonic() - started
    assert took < 0.7, f"result(timeout=0.2) returned after {took:.2f} s"
    assert future.result(timeout=RESULT_S).to_rows() == [{"a": 2}]
    assert future.exception(timeout=0) is None


@pytest.mark.timeout(60)
def test_a_future_cancelled_by_another_thread_wakes_its_waiting_caller(app):
    future = app.run(_request(3, 3.0))
    threading.Timer(0.3, future.cancel).start()
    started = time.monotonic()
    with pytest.raises(concurrent.futures.CancelledError):
        future.result(timeout=RESULT_S)
    took = time.monotonic() - started
    assert took < 1.0, f"the cancelled caller woke after {took:.2f} s"


@pytest.mark.timeout(60)
def test_requests_of_callers_that_never_wait_are_answered_beside_one_that_does(app):
    """One thread makes requests one after another (reading its results itself);
    another only adds callbacks, before, between and after them."""
    stop = threading.Event()
    sequential, sequential_took, took = [], [], []

    def one_by_one() -> None:
        i = 0
        while not stop.is_set():
            started = time.monotonic()
            sequential.append(app.run(_request(i)).result(timeout=RESULT_S).column("a")[0] == i)
            sequential_took.append(time.monotonic() - started)
            i += 1

    thread = threading.Thread(target=one_by_one)
    thread.start()
    i, give_up = 0, time.monotonic() + 20  # earlier tests' naps may hold a worker
    try:
        while (i < 200 or len(sequential) < 50) and time.monotonic() < give_up:
            answered = threading.Event()
            started = time.monotonic()
            future = app.run(_request(1000 + i))
            future.add_done_callback(lambda f, answered=answered: answered.set())
            assert answered.wait(RESULT_S), f"request {i} was never answered"
            assert future.result().column("a") == [1000 + i]
            took.append(time.monotonic() - started)
            if i % 50 == 0:
                time.sleep(0.05)
            i += 1
    finally:
        stop.set()
        thread.join(timeout=RESULT_S)
    assert i >= 200 and len(sequential) >= 50 and all(sequential)
    # as quick as the waiting caller's requests, run at the same time (a stall of a
    # loaded machine slows both), or under 1 s
    slowest = max(1.0, 2 * max(sequential_took))
    assert max(took) < slowest, f"a callback-only request waited {max(took):.2f} s"


@pytest.mark.timeout(60)
def test_a_lone_request_without_a_waiting_caller_is_answered_after_sequential_ones(app):
    for i in range(50):
        assert app.run(_request(i)).result(timeout=RESULT_S).column("a") == [i]
    answered = threading.Event()
    started = time.monotonic()
    app.run(_request(7)).add_done_callback(lambda f: answered.set())
    assert answered.wait(RESULT_S)
    took = time.monotonic() - started
    assert took < 0.5, f"a request nobody waited on took {took:.2f} s"


def test_routing_a_plain_plan_in_one_pass_picks_what_the_general_path_picks():
    """`Scheduler.route`'s one-pass path for plans whose stages each run once on one
    resource class gives the route and charges of the general path, whatever the
    loads, warm and loading stages of the workers."""
    import copy
    import dataclasses
    import random

    from serveflow.optimizer.placement import place
    from serveflow.runtime.scheduler import PlanFacts, Scheduler, WorkerLoad

    flow = sf.Flow("chain")
    stream = flow
    for i in range(4):
        stream = stream.map(lambda x: x, col="x", name=f"s{i}")
    plan = place(flow.optimize(sf.Rules(fusion=False)), False)
    assert PlanFacts.of(plan).plain is False  # the one-pass path applies
    rng = random.Random(0)
    for _ in range(300):
        workers = {}
        for w in rng.sample(range(10), rng.randint(1, 6)):
            warm = {(1, s) for s in range(4) if rng.random() < 0.6}
            loading = {k for k in warm if rng.random() < 0.2}
            workers[w] = WorkerLoad(rng.randint(0, 3), warm, loading, gpu=rng.random() < 0.2)
        if rng.random() < 0.1:
            rng.choice(list(workers.values())).silent = True
        fast, general = Scheduler(), Scheduler()
        general._facts[1] = dataclasses.replace(PlanFacts.of(plan), plain=None)
        before = copy.deepcopy(workers)
        routed = fast.route(1, plan, workers)
        assert routed == general.route(1, plan, before)
        assert workers == before  # the same loads counted, the same stages warm
