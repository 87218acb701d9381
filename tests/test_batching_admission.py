"""Admission and plans of SLO batching stages at tight SLOs, under bursts and at
overload (issue 13): the controller in the loop of a simulated runtime (routing,
dispatch, service noise, hops), then the issue's three cases on the real runtime."""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

import serveflow as sf
from serveflow.batching import MAP, BatchingController, Decision
from serveflow.batching.admission import Lanes, StageLedger
from serveflow.batching.controller import search_here
from serveflow.batching.model import linear_service
from serveflow.batching.simulate import simulate_controlled


def _run(
    rate: float,
    slo_ms: float,
    a_ms: float,
    b_ms: float,
    *,
    bursty: bool = False,
    seconds: float = 10.0,
    workers: int = 2,
    seed: int = 3,
    quiet_s: float = 0.0,
    speeds: tuple[float, ...] | None = None,
    pace: Callable[[float], float] | None = None,
) -> dict:
    """The controller on a simulated stage of a + b * rows ms on `workers` workers,
    open-loop arrivals at `rate` (Poisson, or a 2-state MMPP of the same mean),
    with 0.2 ms hops each way and gamma service noise; figures after 3 s. `quiet_s`:
    the arrivals follow a deployment's warm-up: 16 requests at once, as many after
    `quiet_s` (its stage loaded) and again 0.1 s later. `speeds`: each worker's calls
    take that many times as long; `pace`: the machine's speed over time (see
    `simulate_controlled`)."""
    rng = np.random.default_rng(seed)
    process = MAP.mmpp2(rate / 3, 5 * rate / 3, 1.0, 1.0) if bursty else MAP.poisson(rate)
    times = process.sample(int(rate * seconds), rng)
    lead_s = 0.2 + quiet_s if quiet_s else 0.0  # when the arrivals begin
    if quiet_s:  # as `benchmarks.batching_regimes` warms a model stage up
        burst = np.arange(16) * 1e-5
        times = np.concatenate([burst, quiet_s + burst, quiet_s + 0.1 + burst, lead_s + times])
    controller = BatchingController(sf.Batching(slo_ms=slo_ms), workers, held_workers=workers)
    out = simulate_controlled(
        times,
        linear_service(a_ms / 1e3, b_ms / 1e3),
        controller,
        workers,
        send_s=0.0002,
        reply_s=0.0002,
        noise=lambda n: float(rng.gamma(2.0, 0.0002)),
        speeds=speeds,
        pace=pace,
    )
    steady = times > 3.0 + lead_s
    latencies = out.latencies[steady]
    answered = latencies[~np.isnan(latencies)]
    within = answered <= slo_ms / 1e3
    span = times[steady][-1] - times[steady][0]
    return {
        "within": within.sum() / len(latencies),
        "refused": 1.0 - len(answered) / len(latencies),
        "p99_over_slo": float(np.quantile(answered, 0.99)) * 1e3 / slo_ms,
        "goodput": within.sum() / span,
        "decision": out.decisions[-1][1],
    }


def _over_seeds(*args, seeds: tuple[int, ...] = (3, 4, 5), **kwargs) -> dict[str, np.ndarray]:
    """`_run` on each of `seeds`: each figure as an array, one per seed. A bound
    tuned on one draw of the arrivals and the noise sits inside their spread (p99
    0.87-0.97x the SLO by the seed in one test here): a test judges the median, or
    every seed where the bound is the SLO itself."""
    runs = [_run(*args, seed=seed, **kwargs) for seed in seeds]
    keys = ("within", "refused", "p99_over_slo", "goodput")
    return {key: np.array([float(run[key]) for run in runs]) for key in keys}


def _spells(slow: float) -> Callable[[float], float]:
    """The machine's speed for `_run`'s `pace`: calls started in every other 0.1 s take
    `slow` times as long."""
    return lambda t: slow if t // 0.1 % 2 else 1.0


# -- the ledger alone ---------------------------------------------------------------


def _ledger(size: int = 4, timeout_s: float = 0.01, merge: int = 8) -> StageLedger:
    ledger = StageLedger()
    ledger.plan(size, timeout_s, merge, [0.0] + [0.004 + 0.001 * n for n in range(1, merge + 1)], 0)
    return ledger


def test_a_request_joins_the_filling_batch_and_one_behind_a_busy_worker_waits_for_it() -> None:
    ledger = _ledger(timeout_s=0.002)
    first = ledger.admit(1, 0.0, 1.0, [0], 0)  # waits 2 ms for company, runs 5 ms
    assert first.admit and first.latency_s == pytest.approx(0.002 + 0.005 + 0.001)
    for rid in (2, 3, 4):  # fills the batch of 4 at 1 ms: it runs at once, until 9 ms
        ledger.admit(rid, 0.001, 1.0, [0], 0)
    # due at 4 ms, it runs once the worker is free: 9 ms + the typical 1 ms overhead
    behind = ledger.admit(5, 0.002, 1.0, [0], 0)
    assert behind.latency_s == pytest.approx(0.010 + 0.005 - 0.002 + 0.001)


def test_a_request_of_many_rows_is_timed_and_learned_by_its_rows() -> None:
    # Timed by requests, a request of 20 rows (24 ms of work) was a call of 1 (5 ms):
    # the one behind it was promised 19 ms too soon, and the call, seen ending after 24
    # ms, was learned as a call of 1 that ran 19 ms late
    ledger = _ledger(size=1, timeout_s=0.0, merge=32)
    assert ledger.admit(1, 0.0, 1.0, [0], 0, rows=20).latency_s == pytest.approx(0.024 + 0.001)
    behind = ledger.admit(2, 0.001, 1.0, [0], 0)  # after it and the 1 ms overhead
    assert behind.latency_s == pytest.approx(0.024 + 0.001 + 0.005 + 0.001 - 0.001)
    ledger.finished(1, 0.024)
    ledger.finished(2, 0.029)  # it started as the first was seen ending
    assert max(abs(r) for r in ledger.residuals()) < 1e-9
    # past the largest call planned, each row costs what the plan's last one did
    ledger.plan(1, 0.0, 1, [0.0, 0.005], 0, per_row=0.001)
    assert ledger.admit(3, 0.1, 1.0, [0], 0, rows=64).latency_s == pytest.approx(0.068 + 0.001)


def test_a_batch_planned_in_rows_is_full_once_its_requests_rows_fill_it() -> None:
    # A request of as many rows as the plan's batch waited its timeout for company (a
    # lone 16-row request, plan "2 within 9.5 ms", SLO 30 ms: 29.9 ms median at the
    # client, half of them late; 24.4 once it runs at once)
    from types import SimpleNamespace

    from serveflow.runtime.dispatch import BatchRule

    ledger = _ledger(size=4, timeout_s=0.010, merge=8)
    assert ledger.admit(1, 0.0, 1.0, [0], 0, rows=4).latency_s == pytest.approx(0.008 + 0.001)
    ledger = _ledger(size=4, timeout_s=0.010, merge=8)
    ledger.admit(1, 0.0, 1.0, [0], 0, rows=2)  # half a batch: it waits ...
    # ... until one of 2 rows more fills it at 3 ms: 4 rows run from then
    assert ledger.admit(2, 0.003, 1.0, [0], 0, rows=2).latency_s == pytest.approx(0.008 + 0.001)
    rule, stage = BatchRule(), SimpleNamespace(batching=sf.Batching(max_size=4, timeout_ms=10))
    rule.set_policy((0, 1), 4, 0.010)
    assert rule.due((0, 1), stage, 1, 0.0, 0.001, lambda: 4) == (1, 0.0)
    count, wait = rule.due((0, 1), stage, 1, 0.0, 0.001, lambda: 3)
    assert count == 0 and wait == pytest.approx(0.009)
    # a fixed policy's batch counts requests, as Ray Serve's does
    assert rule.due((0, 2), stage, 1, 0.0, 0.001, lambda: 4)[0] == 0


def test_an_arrival_that_would_miss_is_refused_and_not_entered() -> None:
    ledger = _ledger(size=1, timeout_s=0.0, merge=1)
    verdicts = [ledger.admit(rid, 0.0, 0.020, [0], 0) for rid in range(10)]
    # 5 ms calls one after another: ends at 5, 10, 15 ms (+1 ms overhead) fit in 20 ms
    assert [v.admit for v in verdicts] == [True] * 3 + [False] * 7
    ledger.finished(0, 0.006)  # the first call ended; the queue moves up
    assert ledger.admit(10, 0.006, 0.020, [0], 0).admit


def _calls(
    ledger: StageLedger, now: float, late_s: list[float], rid: int = 0, service_s: float = 0.005
) -> float:
    """One request at a time on worker 0, each call `late_s[i]` past its predicted
    end (`service_s`), the next 2 x `service_s` after the one before (or 1 ms after
    it ended, when it ran longer); returns the time after the last."""
    for late in late_s:
        ledger.admit(rid, now, 1.0, [0], 0)
        end = now + service_s + late
        ledger.finished(rid, end)
        now, rid = max(now + 2 * service_s, end + 0.001), rid + 1
    return now


def test_a_stage_sharing_a_worker_waits_for_the_other_stages_call_there() -> None:
    lanes = Lanes()
    mine, theirs = StageLedger(lanes=lanes), StageLedger(lanes=lanes)
    service = [0.0] + [0.004 + 0.001 * n for n in range(1, 9)]
    for ledger in (mine, theirs):
        ledger.plan(1, 0.0, 1, service, 0)
    theirs.admit(1, 0.0, 1.0, [0, 1], 0)  # a 5 ms call on worker 0, from 0 ms
    # on worker 0 it would wait for that call (and its typical 1 ms overhead) ...
    assert mine.admit(2, 0.001, 1.0, [0], 0).latency_s == pytest.approx(0.005 + 0.001 + 0.005)
    # ... and is entered on worker 1 instead where it would miss behind it
    spared = mine.admit(3, 0.001, 0.009, [0, 1], 0)
    assert spared.admit and spared.worker == 1
    # one sent after request 2 waits for its call on worker 0 too (6 to 11 ms); not
    # for a call of a stage after it in a flow (its ledger only predicts when that
    # one's inputs come: see `Lanes.ahead`), here a request sent at 1.5 ms
    after = StageLedger(lanes=lanes)
    after.plan(1, 0.0, 1, service, 0)
    theirs.later.add(id(after))
    after.admit(5, 0.0015, 1.0, [0], 0)
    assert theirs.admit(6, 0.002, 1.0, [0], 0).latency_s == pytest.approx(0.012 + 0.006 - 0.002)


def test_another_stages_older_call_runs_between_two_of_this_stages_calls() -> None:
    lanes = Lanes()
    mine, theirs = StageLedger(lanes=lanes), StageLedger(lanes=lanes)
    for ledger in (mine, theirs):
        ledger.plan(1, 0.0, 1, [0.0, 0.005], 0)  # one request a call, 5 ms
    mine.admit(1, 0.0, 1.0, [0], 0)  # runs from 0 to 5 ms
    mine.admit(2, 0.0005, 1.0, [0], 0)  # its next call: from 6 to 11 ms
    theirs.admit(10, 0.001, 1.0, [0], 0)  # sent before the next one: from 12 to 17 ms
    # so a request sent at 2 ms runs from 18 ms, not 12
    assert mine.admit(3, 0.002, 1.0, [0], 0).latency_s == pytest.approx(0.023 + 0.001 - 0.002)


def test_a_tighter_stages_call_runs_before_an_older_call_of_a_looser_one() -> None:
    # as the previous test, but this stage's SLO is 5 ms and the other's 100 ms: a
    # worker runs the call whose oldest request is due first (sent plus its SLO)
    lanes = Lanes()
    mine, theirs = StageLedger(lanes=lanes), StageLedger(lanes=lanes)
    for ledger, slack in ((mine, 0.005), (theirs, 0.1)):
        ledger.plan(1, 0.0, 1, [0.0, 0.005], 0)
        ledger.slack = slack
    mine.admit(1, 0.0, 1.0, [0], 0)
    mine.admit(2, 0.0005, 1.0, [0], 0)
    theirs.admit(10, 0.001, 1.0, [0], 0)  # due at 101 ms: it runs after request 3
    assert mine.admit(3, 0.002, 1.0, [0], 0).latency_s == pytest.approx(0.017 + 0.001 - 0.002)
    # and theirs: request 10 from 18 to 23 ms, one sent at 3 ms from 24 to 29 ms
    assert theirs.admit(12, 0.003, 1.0, [0], 0).latency_s == pytest.approx(0.029 + 0.001 - 0.003)


def test_a_tighter_stages_batch_still_filling_runs_first_where_it_would_be_late() -> None:
    # A worker runs a batch still filling, short of its size, before a ready call of
    # another stage due later, when that call would make it late (`Worker.run_ready`).
    # Mirrored as waiting its timeout, a stage of 10 + 2 ms per row, SLO 36 ms, beside
    # one of SLO 120 ms on 2 workers (133 and 400 requests/s) had its requests
    # predicted behind calls of the other that had not begun (p99 1.32-1.50x the SLO)
    def pair(loose_s: float) -> tuple[StageLedger, StageLedger]:
        lanes = Lanes()
        tight, loose = StageLedger(lanes=lanes), StageLedger(lanes=lanes)
        tight.plan(3, 0.010, 3, [0.0, 0.012, 0.014, 0.016], 0)
        loose.plan(1, 0.0, 1, [0.0, loose_s], 0)
        tight.slack, loose.slack = 0.036, 0.120
        tight.admit(1, 0.0, 1.0, [0], 0)  # a batch of 3 filling, due to run at 10 ms
        return tight, loose

    # a 30 ms call would end the tight batch's past 36 ms less the margin: it runs
    # first, from 1 ms (12 ms and the typical 1 ms overhead), then the loose call
    _, loose = pair(0.030)
    assert loose.admit(2, 0.001, 1.0, [0], 0).latency_s == pytest.approx(0.013 + 0.030 + 0.001)
    # a 10 ms call leaves it time: the loose call runs now
    _, loose = pair(0.010)
    assert loose.admit(2, 0.001, 1.0, [0], 0).latency_s == pytest.approx(0.010 + 0.001)


def test_a_worker_in_another_stages_call_takes_no_request_that_would_miss() -> None:
    # This stage's worker runs nothing of its own, but the other stage's call of 60 ms
    # runs there: a request of an SLO of 5 ms is refused, however long since the last
    # probe (the probe rule once took one every 24 ms, all answered 10-20x late)
    lanes = Lanes()
    mine, theirs = StageLedger(lanes=lanes), StageLedger(lanes=lanes)
    for ledger, service, slack in ((mine, 0.001, 0.005), (theirs, 0.06, 0.2)):
        ledger.plan(1, 0.0, 1, [0.0, service], 0)
        ledger.slack = slack
    theirs.admit(10, 0.0, 1.0, [0], 0)
    theirs.routed(10, 0, 0.0)
    refused = [not mine.admit(rid, 0.001 + 0.03 * rid, 0.005, [0], 0).admit for rid in (0, 1)]
    assert refused == [True, True]
    # once their call ended, one is in time
    theirs.finished(10, 0.061)
    assert mine.admit(2, 0.062, 0.005, [0], 0).admit


def test_a_request_a_later_stage_gets_once_the_first_ran_is_predicted_from_then() -> None:
    ledger = _ledger(size=1, timeout_s=0.0, merge=1)
    verdict = ledger.admit(1, 0.0, 0.020, [0], 0, arrives=0.012)
    # it runs when it gets there, and its latency counts from then
    assert verdict.admit and verdict.latency_s == pytest.approx(0.005 + 0.001)
    assert verdict.leaves == pytest.approx(0.012 + 0.005 + 0.001)
    # one sent now queues behind it there
    assert ledger.admit(2, 0.0, 0.030, [0], 0).latency_s == pytest.approx(0.012 + 0.012)


def test_a_call_taken_for_one_request_learns_the_requests_it_held() -> None:
    # An idle worker: a request opens a call, taken to run it alone (5 ms), and three
    # come after it. They reached the worker before its call began, and the four are
    # answered together 9 ms after the first came: one call of 4 (8 ms), 1 ms late.
    # Taken for a call of 1, it was 4 ms late: under overload (4 + 1 ms per row, SLO
    # 100 ms, 3x) 40% of the calls seemed 20 ms late, and the overhead quantile
    # admission adds was 39 ms.
    ledger = _ledger(size=8, timeout_s=0.0)
    now = _calls(ledger, 0.0, [0.001] * 50)
    ledger.admit(100, now, 1.0, [0], 0)
    for rid in (101, 102, 103):
        ledger.admit(rid, now + 0.001, 1.0, [0], 0)
    for k, rid in enumerate((100, 101, 102, 103)):
        ledger.finished(rid, now + 0.009 + 0.00005 * k)
    assert max(ledger.residuals()) == pytest.approx(0.001, abs=1e-4)
    assert ledger.admit(104, now + 0.010, 1.0, [0], 0).latency_s == pytest.approx(0.006, abs=5e-4)


def test_results_of_one_call_read_slowly_are_learned_as_that_call() -> None:
    # The same, the driver busy: the four results are read 3 ms apart, more than half
    # a request's service. Told which call each ran in (when it began), the ledger
    # learns one call of 4, 1 ms late; by timing alone, a call of 1 4 ms late and one
    # of 3 4 ms early (4 + 1 ms per row, SLO 100 ms, 3x overload: calls of 20-30
    # requests 30-70 ms late, each followed by a "call" of 2.7 ms)
    ledger = _ledger(size=8, timeout_s=0.0)
    now = _calls(ledger, 0.0, [0.001] * 50)
    for rid in (100, 101, 102, 103):
        ledger.admit(rid, now, 1.0, [0], 0)
    for k, rid in enumerate((100, 101, 102, 103)):
        ledger.finished(rid, now + 0.009 + 0.003 * k, call=now)
    learned = ledger.residuals()
    assert max(learned) == pytest.approx(0.001, abs=1e-4)
    assert min(learned) > 0.0005
    assert ledger.admit(104, now + 0.019, 1.0, [0], 0).latency_s == pytest.approx(0.006, abs=5e-4)


def test_a_result_of_a_call_before_a_plan_of_smaller_calls_is_taken_in() -> None:
    # A call of 12 runs (the plan's merge was 16) when a plan of calls of at most 4
    # comes; then a result of the call before it. Its end was computed from the new
    # plan's service times, which stop at 4: an IndexError in the driver, and the
    # request's load was never released from its worker.
    ledger = _ledger(size=8, timeout_s=0.0, merge=16)
    for rid in range(13):  # one call of 1 on the idle worker, 12 queued behind it
        ledger.admit(rid, 0.0, 1.0, [0], 0)
    ledger.finished(0, 0.0055, call="first")  # it ended: the 12 run from then
    ledger.plan(2, 0.0, 4, [0.0] + [0.004 + 0.001 * n for n in range(1, 5)], 0)
    ledger.finished(1, 0.0056, call="first")  # one more result of the first call
    # the call left (11) is timed past the new plan's sizes, on the line through its
    # last two: it ends at 5.5 + 15 ms, and one sent at 6 ms runs after it (the
    # typical 1 ms overhead each)
    behind = ledger.admit(20, 0.006, 1.0, [0], 0)
    assert behind.latency_s == pytest.approx(0.0205 + 0.001 + 0.005 + 0.001 - 0.006)


def test_a_call_not_learned_leaves_the_call_learned_before_it_as_it_was() -> None:
    # The first result of a call is of a request the mirror had queued (a call it did
    # not mirror as such: not learned); a later result of that call must not amend
    # the call learned before it, of 1 request 1 ms late, into one of 2 1 ms early
    ledger = _ledger(size=8, timeout_s=0.0)
    now = _calls(ledger, 0.0, [0.001] * 50)
    for rid in (100, 101, 102):
        ledger.admit(rid, now + 0.001 * (rid > 100), 1.0, [0], 0)
    ledger.finished(101, now + 0.012, call=now + 0.006)
    ledger.finished(102, now + 0.0121, call=now + 0.006)
    assert min(ledger.residuals()) == pytest.approx(0.001, abs=1e-4)


def test_a_slow_spell_raises_the_overhead_at_once_and_leaves_it_once_over() -> None:
    ledger = _ledger(size=1, timeout_s=0.0, merge=1)
    rng = np.random.default_rng(1)
    now = _calls(ledger, 0.0, list(rng.uniform(0.0, 0.002, 200)))
    assert ledger.overhead()[1] < 0.003
    # a spell: 30 calls each 50 ms late; within 20 calls the overhead has it
    now = _calls(ledger, now, [0.050] * 20, rid=1000)
    assert ledger.overhead()[1] > 0.040
    now = _calls(ledger, now, [0.050] * 10, rid=2000)
    # over: within 0.2 s, the spell's calls no longer weigh on the next prediction
    # (before: its 30 calls stayed in the high quantile for the 5 s window)
    _calls(ledger, now, list(rng.uniform(0.0, 0.002, 20)), rid=3000)
    assert ledger.overhead()[1] < 0.005


def test_a_spell_that_came_with_a_burst_is_charged_on_as_many_calls_as_it_was_seen_for() -> None:
    # A driver sent a burst from a thread of its own process reads the burst's first calls
    # late, and its workers share the cores with that thread: a spell, while it
    # sends. Charged on every call of a deep queue, it refused the deeper part of
    # bursts answered within a third of the SLO.
    def deep(spell: int, quiet: float = 1.0) -> float:
        """Calls of 5 ms; after `quiet` seconds, 200 requests at once; the first
        `spell` of them answered 20 ms late each: the predicted latency of one more."""
        ledger = _ledger(size=1, timeout_s=0.0, merge=1)
        rng = np.random.default_rng(1)
        now = _calls(ledger, 0.0, list(rng.uniform(0.0, 0.002, 200))) + quiet
        for rid in range(1000, 1200):
            ledger.admit(rid, now, 10.0, [0], 0)
        for rid in range(1000, 1000 + spell):
            now += 0.005 + 0.020
            ledger.finished(rid, now)
        return ledger.admit(2000, now, 10.0, [0], 0).latency_s

    # 10 late calls: charged on 10 of the 190 ahead (on all of them: 4.8 s)
    assert deep(10) == pytest.approx(190 * 0.005 + 10 * 0.020, abs=0.3)
    # 100: on the 100 ahead, all of them
    assert deep(100) == pytest.approx(100 * 0.025, abs=0.2)
    # and one through a load that never left the stage quiet: on all of them
    assert deep(10, quiet=0.0) == pytest.approx(190 * 0.025, abs=0.2)


def test_calls_that_end_before_any_service_time_is_known_are_not_taken_for_overhead() -> None:
    # a stage's first calls wait for it to load (MiniLM: 0.2-0.25 s): taken for the
    # runtime's overhead, they set the quantile at the SLO's percentile for seconds
    ledger = StageLedger()
    ledger.plan(1, 0.0, 1, [0.0, 0.0], 0)  # nothing measured yet
    ledger.admit(0, 0.0, 1.0, [0])
    ledger.finished(0, 0.25)
    ledger.plan(4, 0.0, 8, [0.0] + [0.004 + 0.001 * n for n in range(1, 9)], 0)
    for rid in range(1, 61):
        now = rid * 0.01
        assert ledger.admit(rid, now, 1.0, [0]).admit
        ledger.finished(rid, now + 0.0052)
    assert ledger.overhead(overloaded=True)[1] < 0.001


def test_a_call_that_waited_for_its_worker_to_load_the_stage_is_not_taken_for_overhead():
    # a worker loading the stage after the first one did (its module took 0.5 s to
    # import): that call's lateness was the overhead's tail for the next 50 calls
    ledger = _ledger(size=1, timeout_s=0.0, merge=1)
    now = _calls(ledger, 0.0, [0.0] * 60)
    ledger.loading(0)
    _calls(ledger, now, [0.5] + [0.0] * 8, rid=100)
    assert ledger.overhead(overloaded=True)[1] < 0.01


def test_a_fast_stage_refusing_everything_probes_every_few_calls_and_recovers() -> None:
    # 1 + 0.2 ms per row, requests sent one at a time under an SLO of 3.6 ms: a
    # deployment's first calls ran 5 ms, and an idle worker's every request was then
    # predicted to miss. Only a probe renews the residuals when all is refused: one
    # every 0.2 s refused every request for up to a second.
    ledger = StageLedger()
    ledger.plan(1, 0.0, 1, [0.0, 0.0012], 0)
    now = _calls(ledger, 0.0, [0.004] * 20, service_s=0.0012)  # each 4 ms late
    admitted = []
    for rid in range(1000, 1500):  # one every 2 ms, each 1.3 ms when run
        if ledger.admit(rid, now, 0.0036, [0], 0).admit:
            admitted.append(rid)
            ledger.finished(rid, now + 0.0013)
        now += 0.002
    # refused until the level has the probes' calls (within 0.3 s), then all served;
    # with a probe every 0.2 s, refused for 0.4 s
    assert set(range(1150, 1500)) <= set(admitted)


def test_a_late_call_moves_the_calls_queued_behind_it() -> None:
    ledger = _ledger(size=1, timeout_s=0.0, merge=1)
    for rid in range(3):
        ledger.admit(rid, 0.0, 1.0, [0], 0)
    before = ledger.admit(99, 0.0, 1.0, [0], 0, enter_anyway=False).latency_s
    ledger.forget(99)
    ledger.finished(0, 0.015)  # predicted at 5 ms, ended at 15: the rest are 10 ms later
    after = ledger.admit(100, 0.015, 1.0, [0], 0).latency_s
    assert after + 0.015 == pytest.approx(before + 0.010, abs=2e-3)


def test_a_workers_report_of_a_call_resolves_its_oldest_queued_calls() -> None:
    # a stage whose output is not the flow's: its ends come with the worker's report
    ledger = _ledger(size=1, timeout_s=0.0, merge=1)
    for rid in range(3):
        ledger.admit(rid, 0.0, 1.0, [0], 0)
    for rid in range(3):
        ledger.finished(rid, 0.1, ok=False)  # the request ended later, downstream
    ledger.observed(0, 1, 0.015)  # the first call (5 ms predicted) ended at 15 ms
    # the two queued behind it run from then, a typical 1 ms overhead apart: 15-20
    # and 21-26 ms, and a new call after them 27-32 ms (+1 ms overhead)
    after = ledger.admit(3, 0.015, 1.0, [0], 0).latency_s
    assert after == pytest.approx(0.032 - 0.015 + 0.001)
    assert not ledger.prompt


def test_a_late_report_moves_only_the_calls_that_would_have_waited_for_it() -> None:
    ledger = _ledger(size=1, timeout_s=0.0, merge=1)
    ledger.admit(1, 0.0, 1.0, [0], 0)  # taken to run 0-5 ms
    ledger.finished(1, 0.1, ok=False)  # ended downstream: its end comes with a report
    ledger.admit(2, 0.050, 1.0, [0], 0)  # the worker idle by then: from 50 to 55 ms
    ledger.admit(3, 0.051, 1.0, [0], 0)  # then 56 to 61 ms
    # the first call ended at 30 ms (it waited for the stage to load): the second,
    # sent at 50 ms, still ran from then (not 24 ms later), and so on
    ledger.observed(0, 1, 0.030)
    assert ledger.admit(4, 0.052, 1.0, [0], 0).latency_s == pytest.approx(0.067 - 0.052 + 0.001)


def test_a_workers_report_is_paired_with_the_call_taken_to_end_nearest_it() -> None:
    ledger = _ledger(size=1, timeout_s=0.0, merge=1)
    for rid in range(3):  # taken to run 0-5, 6-11 and 12-17 ms (1 ms apart)
        ledger.admit(rid, 0.0, 1.0, [0], 0)
    ledger.admit(3, 0.030, 1.0, [0], 0)  # by 30 ms all three are taken to have ended
    # the worker reports one call, ended at 17.5 ms (it ran the three as it saw fit):
    # it is the third, 0.5 ms late, not the first 12.5 ms late
    ledger.observed(0, 1, 0.0175)
    assert ledger.residuals() == pytest.approx([0.0005])


def test_a_workers_report_is_not_paired_with_a_call_taken_to_end_before_its_requests() -> None:
    ledger = _ledger(size=1, timeout_s=0.0, merge=1)
    for rid in range(2):  # taken to run 0-5 and 6-11 ms
        ledger.admit(rid, 0.0, 1.0, [0], 0)
        ledger.finished(rid, 0.1, ok=False)  # ended downstream: the ends come in reports
    ledger.observed(0, 2, 0.007, sent=0.0)  # the worker ran both in one call
    ledger.admit(2, 0.5, 1.0, [0], 0)  # after a quiet spell: 500-505 ms
    # its report is of that call, 1 ms late, not of the second taken above 0.5 s late
    ledger.observed(0, 1, 0.506, sent=0.5)
    assert max(ledger.residuals()) < 0.005


def test_a_call_running_past_its_end_holds_back_the_requests_behind_it() -> None:
    # ends are seen as they happen (a stage whose output is the flow's)
    ledger = _ledger(size=1, timeout_s=0.0, merge=1)
    ledger.admit(0, 0.0, 1.0, [0], 0)
    ledger.finished(0, 0.005)
    ledger.admit(1, 0.005, 1.0, [0], 0)  # predicted to run 5 -> 10 ms; it stalls
    # at 40 ms it has not been seen ending: it is still running, and a request behind
    # it runs after it, not at once (5 ms + the default 1 ms overhead)
    behind = ledger.admit(2, 0.040, 0.020, [0], 0)
    assert not behind.admit and behind.latency_s >= 0.005 + 0.001 + 0.001
    ledger.finished(1, 0.045)  # it ended at 45 ms: the queue is free from then
    after = ledger.admit(3, 0.046, 0.020, [0], 0)
    assert after.admit and after.latency_s == pytest.approx(0.005 + 0.001, abs=1e-3)


def test_a_call_whose_requests_all_failed_holds_nothing_back() -> None:
    ledger = _ledger(size=4, timeout_s=0.0, merge=4)
    ledger.admit(0, 0.0, 1.0, [0], 0)
    ledger.finished(0, 0.005)  # ends are seen as they happen
    for rid in (1, 2, 3):
        ledger.admit(rid, 0.005, 1.0, [0], 0)
    for rid in (1, 2, 3):
        ledger.finished(rid, 0.008, ok=False)  # the operator raised: the call is over
    later = ledger.admit(4, 0.050, 0.020, [0], 0)
    assert later.admit and later.latency_s == pytest.approx(0.005 + 0.001, abs=1e-3)


def test_a_request_that_would_make_a_queued_call_late_for_its_requests_is_refused() -> None:
    # batches of 4 within 10 ms, 20 ms + 1 ms per row; a full batch runs until 24 ms
    ledger = StageLedger()
    ledger.plan(4, 0.010, 8, [0.0] + [0.020 + 0.001 * n for n in range(1, 9)], 100)
    for rid in range(4):
        ledger.admit(rid, 0.0, 1.0, [0], 0)
    # the next batch runs once the worker is free (24 ms + the typical 1 ms): alone,
    # until 46 ms (47 with the overhead); a 50 ms SLO leaves its first request 49 ms
    first = ledger.admit(4, 0.0, 0.050, [0], 0)
    assert first.admit and first.latency_s == pytest.approx(0.047)
    # three more fill it (4 rows: 25-49 ms); a fifth would join that call too (more
    # than a batch queued: the worker takes up to 8 as one) and make it end at 50 ms,
    # past what its first request accepts, though it would meet its own SLO
    assert all(ledger.admit(rid, 0.0, 0.050, [0], 0).admit for rid in (5, 6, 7))
    late = ledger.admit(8, 0.0, 0.060, [0], 0)
    assert not late.admit and late.latency_s == pytest.approx(0.051)


def test_after_a_refusal_arrivals_are_refused_outright_until_a_worker_could_take_one() -> None:
    ledger = _ledger(size=1, timeout_s=0.0, merge=1)
    slo = 0.022
    admitted = [ledger.admit(rid, 0.0, slo, [0], 0).admit for rid in range(4)]
    # 5 ms calls, 1 ms apart: ends at 5, 11, 17 ms (+1 ms overhead); a 4th at 23 + 1
    assert admitted == [True] * 3 + [False]
    # no arrival meets 22 ms before 2 ms
    assert ledger.closed(0.0015)
    assert not ledger.closed(0.0025)
    # what `closed` refuses, a prediction refuses too
    probe = _ledger(size=1, timeout_s=0.0, merge=1)
    for rid in range(3):
        probe.admit(rid, 0.0, slo, [0], 0)
    assert not probe.admit(9, 0.0015, slo, [0], 0).admit
    ledger.finished(0, 0.0008)  # a call ends (early): the queue moved, predict again
    assert not ledger.closed(0.0009)


def test_a_request_the_routers_worker_would_refuse_is_entered_on_one_that_serves_it() -> None:
    # the router picks worker 0 every time (it balances outstanding requests, blind
    # to when each worker's calls end): a 4th request would miss there, not on worker 1
    ledger = _ledger(size=1, timeout_s=0.0, merge=1)
    slo = 0.022
    verdicts = [ledger.admit(rid, 0.0, slo, [0, 1], 0) for rid in range(7)]
    assert [v.admit for v in verdicts] == [True] * 6 + [False]
    assert [v.worker for v in verdicts[:6]] == [0, 0, 0, 1, 1, 1]
    assert ledger.worker_of(3) == 1  # where the runtime routes it
    # both full: closed until either could take one (2 ms: 5 ms calls end at 23 + 1)
    assert ledger.closed(0.0015)
    assert not ledger.closed(0.0025)
    # with no pick known, the first worker free reopens it at once
    either = _ledger(size=1, timeout_s=0.0, merge=1)
    for rid in range(3):
        either.admit(rid, 0.0, slo, [0], 0)
    assert either.admit(3, 0.0, slo, [0, 1]).admit  # on worker 1


def test_a_request_the_planned_workers_would_refuse_spills_to_a_worker_past_the_plan() -> None:
    # a plan on 1 of 2 workers (cheaper: bigger calls): a 4th request would miss on
    # worker 0, and worker 1, which the plan leaves but has the stage loaded, serves it
    ledger = _ledger(size=1, timeout_s=0.0, merge=1)
    slo = 0.022
    verdicts = [ledger.admit(rid, 0.0, slo, [0], 0, spill=[1]) for rid in range(7)]
    assert [v.admit for v in verdicts] == [True] * 6 + [False]
    assert [v.worker for v in verdicts[:6]] == [0, 0, 0, 1, 1, 1]
    assert ledger.worker_of(3) == 1
    assert not ledger.closed(0.0025)  # reopened by worker 1's calls too
    alone = _ledger(size=1, timeout_s=0.0, merge=1)
    assert [alone.admit(rid, 0.0, slo, [0], 0).admit for rid in range(4)] == [True] * 3 + [False]


def _slow_ledger(rate: float) -> StageLedger:
    # calls of 20 ms + 1 ms per row, up to 8 rows: a worker serves 285 rows/s at most
    ledger = StageLedger()
    ledger.plan(8, 0.0, 8, [0.0] + [0.020 + 0.001 * n for n in range(1, 9)], rate)
    return ledger


def test_under_overload_a_call_is_left_to_the_last_arrivals_before_it_starts() -> None:
    slo = 0.050
    for rate, early_admitted in ((4000, False), (100, True)):
        ledger = _slow_ledger(rate)
        assert ledger.admit(0, 0.0, slo, [0], 0).admit  # runs 0-21 ms
        # opening the next call (22-43 ms, 44 with the overhead) 22 ms ahead meets
        # the SLO; but 4,000/s bring a full call's 8 rows in its last 21 ms (50 - 28 -
        # 1), and a call opened earlier would hold fewer of them in time
        early = ledger.admit(1, 0.0, slo, [0], 0)
        assert early.admit is early_admitted and early.latency_s < slo
    assert ledger.admit(2, 0.002, slo, [0], 0).admit  # 20 ms ahead: in the window
    overloaded = _slow_ledger(4000)
    overloaded.admit(0, 0.0, slo, [0], 0)
    assert not overloaded.admit(1, 0.0, slo, [0], 0).admit
    assert all(overloaded.admit(rid, 0.002, slo, [0], 0).admit for rid in range(2, 10))
    assert not overloaded.admit(10, 0.002, slo, [0], 0).admit  # 8 fill the call


@pytest.mark.parametrize(("late_s", "admitted"), [(0.0, True), (0.0125, False)])
def test_under_overload_a_request_behind_a_running_call_has_room_for_both_to_run_late(
    late_s, admitted
) -> None:
    # Calls of 25 ms; one in 20 ran `late_s` late (a spell of the machine slowing it
    # by half). Under overload a request is admitted behind a running call 5 ms
    # before its end: both calls ahead of its answer (50 ms of work, 30 ms from now)
    # can run that late. With an SLO of 50 ms it is refused when they ran late: 30 ms
    # + 50% of 50 ms > 50. Before, one call's residual at the SLO's percentile stood
    # for both (30 + 12.5 ms): MiniLM's calls of 200-300 ms in a row were 300 ms late
    # together, and at 4 + 1 ms per row, SLO 15 ms, 3x overload, the answered p99 was
    # 1.04-1.11x the SLO.
    ledger = StageLedger()
    ledger.plan(1, 0.0, 1, [0.0, 0.025], 0)
    now = _calls(ledger, 0.0, [late_s * (k % 20 == 7) for k in range(200)], service_s=0.025)
    ledger.arriving(1000.0)  # 25 times what a worker serves
    assert ledger.admit(1000, now, 1.0, [0], 0).admit  # runs from now to 25 ms
    assert ledger.admit(1001, now + 0.020, 0.050, [0], 0).admit == admitted
    assert ledger.admit(1002, now + 0.020, 0.060, [0], 0).admit


def test_a_burst_queued_deep_is_not_charged_short_calls_jitter_over_its_whole_wait() -> None:
    # Light load first: calls of 1 of 2.5 ms (2 + 0.5 ms per row), one in 20 seen 10 ms
    # late (the driver busy): per second of such a short call, the late ones run 4x
    # late. A burst then queues 600 requests at the worker, planned in calls of 128
    # (66 ms): 5 calls, the last ending at 0.34 s. Charged that stretch over the whole
    # queue, the deeper half of the burst was refused under an SLO of 1 s (a warm
    # stage refused 329-430 of a burst of 1,000 that its 2 workers answer within 0.3
    # s). A stretch is a slow spell's, on a few calls' time, at most doubling them.
    ledger = StageLedger()
    ledger.plan(1, 0.0, 1, [0.0, 0.0025], 0)
    now = _calls(ledger, 0.0, [0.010 * (k % 20 == 3) for k in range(200)], service_s=0.0025)
    ledger.plan(64, 0.0, 128, [0.0] + [0.002 + 0.0005 * n for n in range(1, 129)], 10_000.0)
    verdicts = [ledger.admit(rid, now, 1.0, [0], 0) for rid in range(1000, 1600)]
    assert all(v.admit for v in verdicts), sum(v.admit for v in verdicts)
    assert verdicts[-1].latency_s < 0.7


@pytest.mark.parametrize("seed", range(24))
def test_an_arrival_predicted_from_the_kept_cut_of_its_workers_queue_meets_a_whole_recut(
    seed: int,
) -> None:
    # Bursts into backlogs, calls running late (the worker frees later at each
    # arrival) or reported early, requests reaching the stage later (a stage after
    # others), ends seen or reported, failures, requests forgotten and moved, plans
    # changed: each verdict is the one a ledger cutting every queue whole gives
    from benchmarks.admission_cost import WholeCut

    rng = np.random.default_rng(seed)
    ledgers = (StageLedger(), WholeCut())
    gap, together, ends = rng.choice([0.0005, 0.002, 0.01]), rng.random(), rng.random() / 4
    seen, later = rng.random() < 0.7, rng.random() / 2  # ends seen; requests arriving later

    def plan() -> None:
        size = int(rng.choice([1, 4, 16]))
        merge = size * int(rng.choice([1, 2, 8]))
        service = [0.0] + [0.002 + 0.0005 * n for n in range(1, merge + 1)]
        timeout, rate = float(rng.choice([0.0, 0.003])), float(rng.choice([100.0, 1e5]))
        for ledger in ledgers:
            ledger.plan(size, timeout, merge, service, rate)

    plan()
    now, entered = 0.0, []
    for rid in range(1500):
        now += float(rng.exponential(gap)) if rng.random() > together else 0.0
        slo, worker = float(rng.choice([0.02, 0.2, 1.0])), rng.choice([None, 0, 1])
        arrives = now + float(rng.exponential(0.01)) if rng.random() < later else None
        a, b = (ledger.admit(rid, now, slo, [0, 1], worker, False, arrives) for ledger in ledgers)
        assert (a.admit, a.worker) == (b.admit, b.worker), rid
        assert (a.latency_s, a.leaves) == pytest.approx((b.latency_s, b.leaves), abs=1e-9), rid
        if a.admit:
            entered.append((rid, a.worker))
        act = rng.random()
        if entered and act < ends:  # an end, often of the oldest
            done, on = entered.pop(0 if rng.random() < 0.8 else int(rng.integers(len(entered))))
            ok, size, early = rng.random() < 0.9, int(rng.integers(1, 9)), rng.random() < 0.5
            for ledger in ledgers:
                if seen:
                    ledger.finished(done, now, ok=ok)
                else:  # reported, as much as 5 ms early or late
                    ledger.observed(on, size, now + (-0.005 if early else 0.005), now - 0.01)
        elif entered and act < ends + 0.02:
            gone, _ = entered.pop(int(rng.integers(len(entered))))
            for ledger in ledgers:
                ledger.forget(gone)
        elif entered and act < ends + 0.04:
            k, to = int(rng.integers(len(entered))), int(rng.integers(2))
            entered[k] = (entered[k][0], to)
            for ledger in ledgers:
                ledger.routed(entered[k][0], to, now)
        elif act < ends + 0.045:
            plan()


def test_a_call_waiting_for_its_batch_timeout_stays_when_the_worker_frees_earlier() -> None:
    # Batches of 4 within 3 ms, 2 + 0.5 ms per row, the typical overhead 1 ms. A call
    # of 4 runs from 0 to 4 ms; request A (sent at 1 ms) is to run alone from 5 ms,
    # and B-E reach the stage at 6 ms. The running call is reported ended at 2 ms:
    # A's call is then due when its timeout is, at 4 ms, not at 2 (it ends at 6.5
    # ms), and B-E's call starts at 7.5 ms, ends at 11.5 ms: E answers 6.5 ms after it
    # arrives. (A queue cut kept from before the report must not move A's call.)
    ledger = StageLedger()
    ledger.plan(4, 0.003, 4, [0.0] + [0.002 + 0.0005 * n for n in range(1, 5)], 100.0)
    for rid in range(4):
        ledger.admit(rid, 0.0, 1.0, [0], 0)
    ledger.admit(4, 0.001, 1.0, [0], 0)
    for rid in (5, 6):
        ledger.admit(rid, 0.001, 1.0, [0], 0, arrives=0.006)
    ledger.observed(0, 4, 0.002, 0.0)
    ledger.admit(7, 0.002, 1.0, [0], 0, arrives=0.006)
    assert ledger.admit(8, 0.002, 1.0, [0], 0, arrives=0.006).latency_s == pytest.approx(0.0065)


def test_under_overload_admission_picks_the_worker_whose_call_is_filling() -> None:
    # the router picks worker 0, whose next call would open 21.5 ms ahead, before its
    # window; worker 1 is free: the request goes there, and the runtime routes it so
    slo = 0.050
    ledger = _slow_ledger(4000)
    ledger.admit(0, 0.0, slo, [0, 1], 0)
    verdict = ledger.admit(1, 0.0005, slo, [0, 1], 0)
    assert verdict.admit and verdict.worker == 1 and ledger.worker_of(1) == 1
    calm = _slow_ledger(100)  # not overloaded: the router's pick stands
    calm.admit(0, 0.0, slo, [0, 1], 0)
    assert calm.admit(1, 0.0005, slo, [0, 1], 0).worker == 0


def test_an_overload_is_planned_at_once_without_a_search() -> None:
    searched = []

    def searcher(space, arrivals, service):
        searched.append(arrivals.rate)
        return search_here(space, arrivals, service)

    def planned(rate: float) -> Decision:
        controller = BatchingController(
            sf.Batching(slo_ms=30), 2, held_workers=2, searcher=searcher
        )
        for n in (1, 2, 4, 8):
            for _ in range(4):
                controller.profile.observe(n, 0.004 + 0.001 * n)
        times = MAP.poisson(rate).sample(int(rate * 2), np.random.default_rng(1))
        for t in times:
            controller.on_arrival(float(t))
        return controller.decision(float(times[-1]))

    # 2 workers of 4 + 1 ms/row serve at most ~2 x 21 / 25 ms = 1,700/s in calls that
    # fit in the SLO planned against (25.5 ms): at 3,000/s no plan is feasible
    over = planned(3000)
    assert not over.feasible and not searched
    assert over.workers == 2 and over.timeout_s == 0.0
    # the largest batch waited for once and run within the SLO itself, not the target
    # planned against (admission holds each request to the SLO): 2 x (4 + 10) <= 30
    assert 9 <= over.max_size <= 11 and over.capacity_rps == pytest.approx(
        2 * over.max_size / (0.004 + 0.001 * over.max_size)
    )
    # below that ceiling the search decides, as before
    assert planned(400).feasible and searched


# -- the controller in a simulated runtime ----------------------------------------


def test_issue_case_400_per_s_slo_60_ms_holds_without_refusals() -> None:
    got = _run(400, 60, 4, 1)
    assert got["within"] >= 0.99 and got["refused"] <= 0.01


def test_issue_case_300_per_s_slo_15_ms_holds() -> None:
    got = _run(300, 15, 4, 1)
    assert got["within"] >= 0.99 and got["refused"] <= 0.01
    assert got["p99_over_slo"] <= 1.0


def test_issue_case_3000_per_s_slo_30_ms_refuses_the_excess_and_serves_the_rest_in_time() -> None:
    got = _run(3000, 30, 4, 1)
    assert not got["decision"].feasible
    assert got["p99_over_slo"] <= 1.1
    # 2 workers, 2 x service(n) <= 30 ms: n = 8 at most in time, 12 ms: ~1330/s
    assert got["goodput"] >= 0.9 * 1330
    assert 0.45 <= got["refused"] <= 0.65


def test_an_overload_is_served_in_full_calls_of_the_latest_arrivals() -> None:
    # 3x overload, SLO 5x a request's service: first come, first admitted alternated
    # calls of 7-11 and 2-5 (goodput 1,252-1,258/s in this simulation, seeds 3-5);
    # leaving each call to the last arrivals before it, and placing them on the
    # worker whose call is filling: 1,471-1,493/s
    got = _run(4000, 25, 4, 1)
    assert got["p99_over_slo"] <= 1.0
    assert got["goodput"] >= 1400, got
    slow = _run(800, 125, 20, 5)  # 266-269/s before, 294-303/s now
    assert slow["p99_over_slo"] <= 1.0
    assert slow["goodput"] >= 285, slow


@pytest.mark.parametrize("bursty", [False, True])
def test_an_overload_served_in_long_calls_is_held_below_the_slo_where_that_is_cheap(
    bursty,
) -> None:
    # 4 + 1 ms per row, SLO 100 ms, 3x overload: calls of ~68 requests, 94% of their
    # time per row, so answering them 10% sooner costs ~1% of the goodput, while one
    # late call is a large share of the answered p99. Before: p99 0.96-0.98x the SLO
    # here (and 0.99-1.18x on the machine), goodput 1,850-1,878/s; now 0.89-0.90x,
    # 1,830-1,861/s. (At SLO 25 ms, calls of ~9, the margin is ~3%: the test above.)
    # Under bursts the margin is smaller: p99 0.90-0.97x by the seed (1-8), 0.86-0.97x
    # without them, medians 0.97x and 0.90x.
    got = _over_seeds(5400, 100, 4, 1, bursty=bursty)
    assert np.median(got["p99_over_slo"]) <= (1.0 if bursty else 0.93), got
    assert np.median(got["goodput"]) >= 1780, got


def test_an_overload_at_a_tight_slo_is_answered_within_it() -> None:
    # 4 + 1 ms per row, SLO 15 ms (3x a request's service), 3x overload: 2 workers
    # serve 857/s within 15 ms. Before: answered p99 1.04-1.11x the SLO (seeds 3-5),
    # and 1.01-1.20x at 1 + 0.2 ms per row, SLO 6 ms, 12,000/s. Now 0.98-1.00x and
    # goodput 771-899/s by the seed (1-8)
    got = _over_seeds(2600, 15, 4, 1)
    assert np.median(got["p99_over_slo"]) <= 1.0, got
    assert np.median(got["goodput"]) >= 0.9 * 857, got
    fast = _run(12000, 6, 1, 0.2)
    assert fast["p99_over_slo"] <= 1.05, fast


def test_an_overload_on_a_worker_slower_than_the_other_is_predicted_worker_by_worker() -> None:
    # MiniLM's curve at 3x overload, SLO 5x, one worker's calls 1.3x as long (on a
    # 2-core machine MiniLM's two workers ran 7-12 ms per call apart, the slower one
    # changing every few seconds: the one sharing a core with the driver). Pooled
    # residuals: answered p99 1.14-1.15x the SLO, goodput 221-228/s (seeds 3-4).
    got = _run(1100, 72, 10.8, 3.64, speeds=(1.0, 1.3))
    assert got["p99_over_slo"] <= 1.05, got
    assert got["goodput"] >= 300, got


def test_an_overload_whose_work_runs_late_still_fills_its_calls() -> None:
    # 4 + 1 ms per row, SLO 15 ms (calls of 3 fit, 7 ms), 1.5x overload, every other
    # 0.1 s the calls 1.2x as long, so that admission holds the running call to run
    # late too (`StageLedger._stretch`). A request opening the next call as one began
    # left room for 2 only: goodput 482-535/s (seeds 1-6); now 547-588/s. (The test
    # below, slow spells at SLO 25 ms, where the room is taken only where it costs no
    # call size: 780-885/s before, 754-877/s now.)
    got = _over_seeds(1286, 15, 4, 1, seconds=8.0, seeds=(1, 2, 3), pace=_spells(1.2))
    assert max(got["p99_over_slo"]) <= 1.0, got
    assert np.median(got["goodput"]) >= 550, got


def test_an_overload_through_short_slow_spells_is_answered_within_the_slo() -> None:
    # 4 + 1 ms per row, SLO 25 ms, 3x overload, the calls started in every other 0.1 s
    # 1.5x as long: spells too short for the ledger's level (LEVEL_S) to follow, so
    # its predictions for the admitted requests, all near the SLO, miss by a tail.
    # Before admission's closed loop (`admit_scale`): answered p99 1.15-1.20x the
    # SLO, goodput 693-736/s; with it 0.94-1.02x, 754-859/s by the seed (1-8).
    got = _over_seeds(4000, 25, 4, 1, seconds=8.0, seeds=(1, 2, 3), pace=_spells(1.5))
    assert max(got["p99_over_slo"]) <= 1.1, got
    assert np.median(got["goodput"]) >= 800, got


def test_an_overload_after_a_quiet_spell_is_taken_for_one_from_its_first_seconds() -> None:
    # The arrival process is fitted to 30 s: the warm-up, 5 s of quiet, the overload.
    # Its mean rate (990/s at times here, 290-620/s at 1,200/s in the MiniLM cells of
    # `batching_regimes`) took the 3x overload for a load served first come, first
    # admitted: goodput 1,332/s. Admission takes the rate of the latest arrivals.
    got = _run(4000, 25, 4, 1, quiet_s=5.0, seconds=6)
    assert got["p99_over_slo"] <= 1.0
    assert got["goodput"] >= 1430, got


def test_a_load_only_greedy_batches_serve_in_time_is_served_not_refused() -> None:
    # 4 + 1 ms/row on 2 workers, SLO 15 ms (3x one request's service) at 430/s: past
    # what single requests serve (400/s), and batches that wait for company miss the
    # SLO; taking what is queued, up to 2 (4 when more wait), serves it within 15 ms
    # at a p99 of 0.93x the SLO. Before: an overload plan of single requests, 3.0%
    # refused.
    got = _run(430, 15, 4, 1)
    assert got["within"] >= 0.985 and got["refused"] <= 0.015, got


def test_at_capacity_a_tight_slo_fills_its_calls_rather_than_refusing() -> None:
    # the same stage at 857/s, its capacity within 15 ms (2 x service(n) <= 15 ms):
    # nothing meets the SLO planned against. Before: 30% refused; a plan with a
    # timeout there (its model's share in time counts the batches that fill early)
    # had admission refuse 97%, every request that opened a batch. Then greedy
    # batches: 0.81 within, 18% refused, a free worker often starting a call of
    # fewer than it could. Now the overload plan waits for them, a share of the
    # room the SLO leaves a call's first request: 0.84.
    got = _run(857, 15, 4, 1)
    assert got["within"] >= 0.83 and got["refused"] <= 0.17, got
    plan = got["decision"]
    assert plan.max_size >= 2 and 0 < plan.timeout_s <= 0.015 - 0.004 - plan.max_size * 0.001
    assert got["p99_over_slo"] <= 1.1


def test_the_overload_plan_waits_only_where_fuller_calls_serve_markedly_more() -> None:
    # 4 + 1 ms/row: near capacity at SLO 50 ms (1,684/s, calls of 20), one more
    # request a call serves 0.8% more, and in the runtime waiting for it lost
    # goodput; at 3x the capacity within 15 ms, admission keeps the requests that
    # come just before a call starts, and a wait would idle the worker for the rest.
    near = _run(1684, 50, 4, 1)
    assert not near["decision"].feasible and near["decision"].timeout_s == 0, near
    assert near["within"] >= 0.93
    far = _run(2600, 15, 4, 1)
    assert not far["decision"].feasible and far["decision"].timeout_s == 0, far
    assert far["goodput"] >= 800


def test_the_wait_comes_back_when_an_overload_ends() -> None:
    # 4 + 1 ms/row, SLO 15 ms: 800/s, 2,600/s from 4 s to 8 s, 800/s again. The
    # fitted arrivals hold the overload's phase for 30 s; judged by it, the plan
    # went on without a wait: 630 answers in time a second from 9 s to 12 s, 717
    # before the overload.
    rng = np.random.default_rng(1)
    phases = [
        start + MAP.poisson(rate).sample(int(rate * 4), rng)
        for start, rate in ((0.0, 800), (4.0, 2600), (8.0, 800))
    ]
    times = np.concatenate([t[t < start + 4.0] for t, start in zip(phases, (0.0, 4.0, 8.0))])
    controller = BatchingController(sf.Batching(slo_ms=15), 2, held_workers=2)
    out = simulate_controlled(
        times,
        linear_service(0.004, 0.001),
        controller,
        2,
        send_s=0.0002,
        reply_s=0.0002,
        noise=lambda n: float(rng.gamma(2.0, 0.0002)),
    )
    assert out.decisions[-1][1].timeout_s > 0, out.decisions[-3:]
    after = (times >= 9.0) & (times < 12.0)
    assert np.sum(out.latencies[after] <= 0.015) / 3.0 >= 655


@pytest.mark.parametrize(
    ("rate", "slo_ms", "a_ms", "b_ms", "bound"),
    [(1000, 25, 4, 1, 0.92), (375, 54, 11.3, 2.1, 0.88)],  # the second: MiniLM's curve
)
def test_a_batch_opens_on_the_worker_through_its_queue_first(rate, slo_ms, a_ms, b_ms, bound):
    # Opened on the worker with the fewest requests, a batch waited for it while the
    # other one freed first: p99 0.93-0.94x the SLO at 1,000/s and 0.91-0.94x on
    # MiniLM's curve (seeds 3-5), where the model plans for a free worker taking it;
    # now 0.90-0.91x and 0.79-0.88x.
    p99 = [_run(rate, slo_ms, a_ms, b_ms, seed=seed)["p99_over_slo"] for seed in (3, 4, 5)]
    assert np.mean(p99) <= bound, p99


def test_a_plan_near_its_target_leaves_room_for_admission() -> None:
    # 20 + 5 ms/row on 2 workers, SLO 150 ms (6x) at 235/s, 0.8 of the capacity: the
    # plans that serve it run at a p99 of 0.92-0.96x the SLO. Before: admission's
    # predictions took every later arrival to join a call waiting for its worker,
    # and refused 4.6% of what the plan served in time.
    got = _run(235, 150, 20, 5)
    assert got["within"] >= 0.985 and got["refused"] <= 0.015, got


def _after_a_slow_spell(slo_x: float, seed: int) -> dict:
    """A stage of 10.8 + 3.64 ms per row (MiniLM's curve here) on 2 workers, Poisson
    arrivals at half the capacity within an SLO of `slo_x` x one request's service,
    lognormal service noise, and one slow spell of the machine: calls started from
    4 s to 5.5 s take 3x as long. Figures over the requests sent from 1 s to 3 s after
    the spell ended."""
    a, b, seconds = 10.8, 3.64, 9.0
    slo_s = slo_x * (a + b) / 1e3
    sizes = np.arange(1, 65)
    times = (a + b * sizes) / 1e3
    capacity = float((2 * sizes / times)[2 * times <= slo_s].max())
    rng = np.random.default_rng(seed)
    arrivals = MAP.poisson(0.5 * capacity).sample(int(0.5 * capacity * seconds), rng)
    controller = BatchingController(sf.Batching(slo_ms=slo_s * 1e3), 2, held_workers=2)
    out = simulate_controlled(
        arrivals,
        linear_service(a / 1e3, b / 1e3),
        controller,
        2,
        send_s=0.001,
        reply_s=0.001,
        noise=lambda n: float(rng.lognormal(np.log(0.1 * (a + b * n) / 1e3), 0.8)),
        pace=lambda t: 3.0 if 4.0 <= t < 5.5 else 1.0,
    )
    after = (arrivals >= 6.5) & (arrivals < 8.5)
    latencies = out.latencies[after]
    answered = latencies[~np.isnan(latencies)]
    return {
        "within": float((answered <= slo_s).sum() / len(latencies)),
        "refused": 1.0 - len(answered) / len(latencies),
    }


@pytest.mark.parametrize("slo_x", [3, 5, 10])
def test_after_a_slow_spell_of_the_machine_admission_serves_again_within_a_second(
    slo_x,
) -> None:
    # Fixed (10, 10 ms) batching answers 96-100% of these requests in time. Before:
    # adaptive refused 17-96% of them, seconds after the spell: the overhead quantile
    # held the spell's residuals for 5 s on top of a profile refitted to the spell, the
    # planning target was tightened for it, and refusing most arrivals left too few
    # calls to see it was over (MiniLM at 5x on a shared machine: 37% refused). Over
    # four arrival samples: one sample's share moves with when the plans fall (3x, seed
    # 3: 5.4% refused, 9.5% with the first plan made 1.75 s sooner); and at 3x, seed 7
    # refused 54% (the ledger kept the first call's time, 27 ms of a 15 ms stage, as
    # the service times while only single requests ran).
    got = [_after_a_slow_spell(slo_x, seed) for seed in (3, 5, 7, 9)]
    assert max(g["refused"] for g in got) <= 0.15, got
    assert np.mean([g["refused"] for g in got]) <= 0.05, got
    assert np.mean([g["within"] for g in got]) >= 0.93, got


@pytest.mark.parametrize(
    ("rate", "slo_ms", "a_ms", "b_ms", "bursty"),
    [
        (2000, 6, 1, 0.2, False),  # tight: 5x single service, ~50% of capacity
        (4000, 6, 1, 0.2, True),  # bursts above capacity at a tight SLO
        (30, 75, 20, 5, False),  # slow model, low load
        (150, 250, 20, 5, True),  # slow model, bursty
    ],
)
def test_admitted_requests_meet_the_slo_across_regimes(rate, slo_ms, a_ms, b_ms, bursty) -> None:
    got = _run(rate, slo_ms, a_ms, b_ms, bursty=bursty, seconds=8.0)
    assert got["p99_over_slo"] <= 1.1
    if not bursty:
        assert got["within"] >= 0.98 and got["refused"] <= 0.02


# -- the real runtime ----------------------------------------------------------------


def _stage(table: sf.Table) -> list[int]:
    time.sleep(0.004 + 0.001 * len(table))  # 4 ms + 1 ms per row
    return table.column("a")


LATE_SEND_S = 0.05


def _drive(rate: float, slo_ms: float, seconds: float) -> dict:
    """Open-loop Poisson arrivals at `rate` from one client thread to a 4 ms + 1
    ms/row stage on 2 workers; latency from each request's call (on a loaded machine
    the client itself falls behind its schedule: that lag is no latency of the
    runtime's)."""
    flow = sf.Flow("issue13")
    flow.map(_stage, names=["a"], batching=sf.Batching(slo_ms=slo_ms), name="model")
    runtime = sf.LocalRuntime(min_workers=2, max_workers=2)
    try:
        with flow.deploy(runtime=runtime) as app:
            app.run({"a": [0]}).result(timeout=30)
            gaps = np.random.default_rng(7).exponential(1 / rate, int(rate * seconds))
            ends: dict[int, float] = {}
            sent, called, futures, settled = [], [], [], []
            start = time.monotonic()
            for i, when in enumerate(start + np.cumsum(gaps)):
                time.sleep(max(0.0, when - time.monotonic()))
                if time.monotonic() - when > LATE_SEND_S:
                    continue  # a starved client skips, not bursts: the offered rate holds
                called.append(time.monotonic())
                future = app.run({"a": [i]})
                settled.append(future.done())  # a refusal is decided inside app.run
                k = len(futures)
                future.add_done_callback(lambda _, k=k: ends.__setitem__(k, time.monotonic()))
                sent.append(when)
                futures.append(future)
            answered, refused, refused_later = [], [], 0
            for i, future in enumerate(futures):
                try:
                    future.result(timeout=60)
                    answered.append(ends[i] - called[i])
                except sf.OverloadError:
                    refused.append(ends[i] - called[i])
                    refused_later += not settled[i]
            figures = app.stats()["model"]
    finally:
        runtime.stop()
    answered_ms = np.array(answered) * 1e3
    return {
        "within": float((answered_ms <= slo_ms).sum()) / len(futures),
        "refused": len(refused) / len(futures),
        "p99_ms": float(np.quantile(answered_ms, 0.99)) if len(answered) else 0.0,
        "refusal_p99_ms": float(np.quantile(refused, 0.99)) * 1e3 if refused else 0.0,
        "refused_later": refused_later,
        "goodput": float((answered_ms <= slo_ms).sum()) / seconds,
        "stats": figures,
        "client_lag_ms": float(np.max(np.array(called) - np.array(sent))) * 1e3,
    }


# The real runtime: behaviour, with bounds generous enough for a shared 2-core machine
# at a load average of 20 (the whole run, warm-up included; the client and the driver
# share one process), and still far from the runtime before issue 13 (measured here at
# a load average of 9-10, the overload case: answered p99 1.5 s and 8 answers/s within
# 30 ms). How close each regime comes to its SLO is `benchmarks.batching_regimes`'.


def _drive_again_if(missed, rate: float, slo_ms: float, seconds: float) -> list[dict]:
    """`_drive`'s figures, and those of a second run if the first one's `missed` their
    bounds: a burst of other processes can starve a 6 s window of a shared 2-core
    machine (measured: both runtime tests missed at a load average of 7-11 with two
    busy loops running), while a runtime that misses them misses them twice."""
    runs = [_drive(rate, slo_ms, seconds)]
    if missed(runs[0]):
        runs.append(_drive(rate, slo_ms, seconds))
    return runs


def test_runtime_a_load_the_slo_allows_is_served_not_refused() -> None:
    *_, got = _drive_again_if(
        lambda got: got["refused"] > 0.1 or got["within"] < 0.75, 400, 60, 6.0
    )  # the issue's first case
    assert got["refused"] <= 0.1, got
    assert got["within"] >= 0.75, got


def test_runtime_an_overload_is_refused_at_arrival_and_the_rest_served_in_time() -> None:
    runs = _drive_again_if(  # the issue's third case: far beyond 2 workers
        lambda got: got["p99_ms"] > 1000 or got["goodput"] < 250, 3000, 30, 6.0
    )
    for got in runs:  # in every run, whatever the machine's load
        assert got["refused"] >= 0.3, got
        assert got["refused_later"] == 0, got  # every refusal was decided inside app.run
    got = runs[-1]
    assert got["p99_ms"] <= 1000, got  # not queued: before, seconds, growing with the run
    assert got["goodput"] >= 250, got  # 2 workers serve ~1,300/s within 30 ms at best


def test_runtime_an_overload_of_large_calls_keeps_the_filling_call_at_its_worker() -> None:
    # 3x overload of 20 + 5 ms per row at an SLO of 500 ms, as the benchmark drives it:
    # each worker runs calls of up to ~65 while the next fills behind it. With room at
    # a worker for one such call, the next one's requests waited at the driver, and
    # 18-43% of those answered were late (by up to 170 ms); with room for both, 4%
    from benchmarks import batching_regimes as br

    curve = br.synthetic("20+5b")
    system = br.ServeflowSystem(br.ADAPTIVE, curve)
    try:
        for seed in (6, 7):  # a second run if a burst of other processes starved one
            system.deploy(500.0)
            try:
                times = br.arrival_times("poisson", 1100, 6.0, seed)
                got = br.run_cell(system, curve, times, 500.0, 1.0)
            finally:
                system.undeploy()
            late = 1.0 - got["within"] / max(1.0 - got["refused"], 1e-9)
            if late <= 0.1:
                break
        assert late <= 0.1, got
    finally:
        system.close()


def _quick_stage(values: list[int]) -> list[int]:
    time.sleep(0.001)
    return list(values)


class _LoadsSlowly:
    """A model that takes 1.5 s to load (a stage class: loaded on each worker)."""

    def __init__(self) -> None:
        time.sleep(1.5)

    def __call__(self, values: list[int]) -> list[int]:
        return list(values)


def _burst(app: sf.App, n: int, gaps: np.ndarray | None = None) -> tuple[list[float], list[float]]:
    """`n` requests sent to `app` at once (or `gaps` seconds apart): (seconds from each
    call to its answer, to its refusal)."""
    called, futures, ends = [], [], {}
    due = time.monotonic() + (np.zeros(n) if gaps is None else np.cumsum(gaps))
    for i in range(n):
        if (wait := due[i] - time.monotonic()) > 0:
            time.sleep(wait)
        called.append(time.monotonic())
        futures.append(app.run({"a": [i]}, timeout=30))
        futures[-1].add_done_callback(lambda _, i=i: ends.__setitem__(i, time.monotonic()))
    answered, refused = [], []
    for i, future in enumerate(futures):
        try:
            future.result(timeout=30)
            kept = answered
        except sf.OverloadError:
            kept = refused
        for _ in range(1000):  # its callback runs once it is settled, maybe not yet
            if i in ends:
                break
            time.sleep(0.001)
        kept.append(ends[i] - called[i])
    return answered, refused


def _burst_at_deploy(
    stage: Callable, slo_ms: float, n: int, then: Callable | None = None
) -> tuple[list[float], list[float]]:
    """`n` requests sent at once to a stage just deployed on 2 workers (and `then` a
    second one of the same SLO, when given): (seconds from each call to its answer,
    to its refusal)."""
    flow = sf.Flow("fresh")
    policy = sf.Batching(slo_ms=slo_ms)
    first = flow.map(stage, names=["a"], col="a", batching=policy, name="model")
    if then is not None:
        first.map(then, names=["b"], col="a", batching=policy, name="then")
    runtime = sf.LocalRuntime(min_workers=2, max_workers=2)
    try:
        with flow.deploy(sf.Rules(fusion=False), runtime=runtime) as app:
            return _burst(app, n)
    finally:
        runtime.stop()


def test_runtime_a_burst_at_a_fresh_deployment_is_judged_once_a_call_is_timed() -> None:
    # Before a stage's first call is timed, admission cannot predict a latency. Judged
    # blind, a burst sent as the app was deployed was refused but for one merged
    # call's worth per worker: 12 of 200 answered, under an SLO of 3 s for calls of a
    # millisecond (the workers load the stage first: 0.6 s here). The burst waits
    # for the first timed call instead.
    answered, refused = _burst_at_deploy(_quick_stage, 3000, 200)
    assert len(answered) >= 190, (len(answered), len(refused))
    # and so at a second SLO stage, behind the first (10 of 200 answered when only
    # the first stage's requests waited)
    answered, refused = _burst_at_deploy(_quick_stage, 3000, 200, then=_quick_stage)
    assert len(answered) >= 190, (len(answered), len(refused))


def test_runtime_a_lone_request_under_a_loose_slo_is_not_kept_waiting_for_company() -> None:
    # a deployment's first requests explore batch sizes, each call waiting for more:
    # for a fifth of the SLO, which at 20 s was 4 s a request sent alone
    flow = sf.Flow("loose")
    flow.map(_quick_stage, names=["y"], col="a", batching=sf.Batching(slo_ms=20_000))
    runtime = sf.LocalRuntime(min_workers=1, max_workers=1)
    try:
        with flow.deploy(runtime=runtime) as app:
            app.run({"a": [0]}).result(timeout=30)  # the stage loads on its worker
            took = []
            for i in range(5):
                start = time.monotonic()
                app.run({"a": [i]}).result(timeout=30)
                took.append(time.monotonic() - start)
    finally:
        runtime.stop()
    assert max(took) < 1.0, took


def test_runtime_a_request_waiting_for_a_first_timed_call_is_refused_once_its_slo_passed():
    # the stage loads for 1.5 s: the requests that wait for its first call cannot meet
    # an SLO of 100 ms, and are refused when it has passed, not when the load is done
    answered, refused = _burst_at_deploy(_LoadsSlowly, 100, 60)
    assert len(refused) >= 40, (len(answered), len(refused))
    assert max(refused) < 1.0, refused


class _Rows:
    """2 + 0.5 ms per row."""

    def __call__(self, values: list[int]) -> list[int]:
        time.sleep(0.002 + 0.0005 * len(values))
        return list(values)


def _warm_bursts(
    slo_ms: float, n: int, bursts: int, load: bool = True
) -> list[tuple[list[float], int]]:
    """`_Rows` on 2 workers under an SLO (with `load`, loaded on both first), a second
    at 100/s, then `bursts` bursts of `n` requests at once, 1 s apart: for each,
    (seconds from each answered request's call to its answer, how many were refused)."""
    flow = sf.Flow("warm")
    flow.map(_Rows(), names=["y"], col="a", batching=sf.Batching(slo_ms=slo_ms), name="model")
    runtime = sf.LocalRuntime(min_workers=2, max_workers=2)
    got = []
    try:
        with flow.deploy(runtime=runtime) as app:
            for _ in range(3 if load else 0):  # the stage loads on both workers (a
                # worker loading it in a burst, 0.5 s to import this module, answers late)
                for future in [app.run({"a": [i]}) for i in range(16)]:
                    with contextlib.suppress(sf.OverloadError):
                        future.result(timeout=30)
            for i in range(100):
                app.run({"a": [i]})
                time.sleep(0.01)
            for _ in range(bursts):
                time.sleep(0.5 if not got else 1.0)
                answered, refused = _burst(app, n)
                got.append((answered, len(refused)))
    finally:
        runtime.stop()
    return got


def test_runtime_a_burst_a_warm_stage_serves_within_its_slo_is_not_refused() -> None:
    # After a second at 100/s (calls of 1-2), 1,000 requests at once under an SLO of
    # 1 s: 2 workers answer them all in ~0.3 s. Charged the light load's jitter over
    # their whole wait in the queue, 329-430 of them were refused (3 runs of 3); and
    # with a worker's cold start taken for overhead (its load in the second at 100/s)
    [(_, refused)] = _warm_bursts(1000, 1000, 1, load=False)
    assert refused <= 50, refused


def test_runtime_a_burst_past_what_a_tight_slo_allows_is_refused_not_answered_late() -> None:
    # 1,000 at once under an SLO of 100 ms: 2 workers answer ~300 within it. Judged at
    # the quiet rate before it (taken every 50 ms), not as an overload, 82-295 of those
    # admitted answered late in 5 of 9 bursts (p99 1.09-1.28x the SLO); here, in the
    # later burst of 2, 12-29% (3 runs). Now 0-10%: the surge is judged as one once 5 ms
    # of it came. A second run if a burst of other processes starved the first.

    def lates() -> list[tuple[int, int]]:
        got = _warm_bursts(100, 1000, 2)
        return [
            (sum(latency > 0.100 for latency in answered), len(answered)) for answered, _ in got
        ]

    got = lates()
    if any(late > 0.15 * answered for late, answered in got):
        got = lates()
    assert all(late <= 0.15 * answered for late, answered in got), got


def _slow_stage(values: list[int]) -> list[int]:
    time.sleep(0.02 + 0.001 * len(values))
    return list(values)


def test_http_requests_arriving_together_are_each_an_arrival_and_refused_alone() -> None:
    import httpx

    from serveflow.serving import Server

    flow = sf.Flow("http13")
    flow.map(_slow_stage, names=["y"], col="a", batching=sf.Batching(slo_ms=60), name="model")
    runtime = sf.LocalRuntime(min_workers=1, max_workers=1)
    try:
        with Server({"f": flow.deploy(runtime=runtime)}, port=0) as server:
            url = f"{server.url}/v1/flows/f/predict"
            assert httpx.post(url, json={"rows": [{"a": 0}]}, timeout=30).status_code == 200
            n = 40
            barrier = threading.Barrier(n)
            codes: list[int] = [0] * n

            def send(i: int) -> None:
                barrier.wait(30)
                codes[i] = httpx.post(url, json={"rows": [{"a": i}]}, timeout=30).status_code

            threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            time.sleep(1.0)  # workers report their counts every 0.25 s
            figures = server.state.apps["f"].stats()["model"]
    finally:
        runtime.stop()
    # one worker, 20 ms + 1 ms per row within 60 ms: not 40 at once; each refused alone
    assert set(codes) == {200, 503}, codes
    assert figures["shed"] == codes.count(503)
    assert figures["requests"] == 1 + codes.count(200)  # one runtime request per HTTP one


def _tick_rows(values: list[int]) -> list[int]:
    time.sleep(0.004 + 0.001 * len(values))
    return list(values)


@pytest.mark.skipif(shutil.which("hey") is None, reason="hey: scripts/reliability_tools.sh")
def test_http_lockstep_bursts_two_workers_serve_within_the_slo_are_not_refused() -> None:
    # `hey -q` (an outside client): 10 connections that tick together, a burst of 10
    # every 33 ms (300/s), on 2 workers of 4 + 1 ms per row: calls of 5 or 6 answer a
    # burst in 10-11 ms, the driver reading its last request 1-4 ms after its first.
    # Planned for a Poisson stream at 300/s (calls of 3 within 3.4 ms; the fit did not
    # see the bursts), 37-43% were refused under an SLO of 15 ms. That SLO is the edge
    # of what this machine does: served unrefused, the stage's p99 was 14.9-17.3 ms
    # alone, 17.9-18.4 with another process holding one of the 2 cores (where
    # admission refused 12-71%, and more were in time than unrefused: 28-64% against
    # 15-34%). Under 20 ms, 0-3% were refused alone, 0.2-0.9% so held.
    from benchmarks.http_slo import hey

    from serveflow.serving import Server

    slo_ms = 20
    flow = sf.Flow("tick")
    flow.map(_tick_rows, names=["y"], col="a", batching=sf.Batching(slo_ms=slo_ms), name="model")
    runtime = sf.LocalRuntime(min_workers=2, max_workers=2)
    body = '{"rows": [{"a": 1}]}'
    try:
        app = flow.deploy(runtime=runtime)
        with Server({"f": app}, port=0) as server:
            url = f"{server.url}/v1/flows/f/predict"
            hey(url, body, 2, 10, 10)  # the stage loads on both workers, and its calls are timed
            got = [(ms, status) for ms, status, at in hey(url, body, 6, 10, 30) if at >= 2]
            clumps, stage_p99_ms = (app.stats()["model"][k] for k in ("clumps", "p99_ms"))
    finally:
        runtime.stop()
    if clumps < 6:
        # a machine this busy read each burst over milliseconds (at half its speed, 2x
        # the CPU a refusal takes: clumps of 4), where the SLO's time went in the socket
        pytest.skip(f"the bursts reached the stage spread out (clumps of {clumps})")
    refused = sum(status == 503 for _, status in got)
    within = sum(ms <= slo_ms and status == 200 for ms, status in got)
    assert refused <= 0.05 * len(got), (refused, len(got))
    assert stage_p99_ms <= 1.1 * slo_ms, stage_p99_ms  # 14.2-16.1 ms
    # and as the client sees it, up to 4 ms later (the server reads a burst's requests
    # and writes their answers one at a time; hey shares the 2 cores): 0.97-1.0
    assert within >= 0.9 * len(got), (within, refused, len(got))


def test_runtime_what_a_caller_spent_on_a_request_counts_against_its_slo() -> None:
    # a server whose event loop read a request late, and will deliver its answer late,
    # says so (`outside`): the stage has the rest of the SLO to answer in
    flow = sf.Flow("outside")
    flow.map(_quick_stage, names=["y"], col="a", batching=sf.Batching(slo_ms=200), name="m")
    runtime = sf.LocalRuntime(min_workers=1, max_workers=1)
    try:
        with flow.deploy(runtime=runtime) as app:
            for i in range(20):  # the stage loads, and its calls are timed
                app.run({"a": [i]}).result(timeout=30)
            time.sleep(0.3)  # past the idle worker's probe interval
            spent = app.run({"a": [0]}, outside=0.25)
            assert spent.done()  # refused inside app.run
            with pytest.raises(sf.OverloadError):
                spent.result()
            assert app.run({"a": [1]}, outside=0.1).result(timeout=30).column("y") == [1]
            with pytest.raises(ValueError, match="outside"):
                app.run({"a": [2]}, outside=-0.1)
    finally:
        runtime.stop()


class _LoadsIn2s:
    """A model that takes 2 s to load, then 2 + 0.5 ms per row."""

    def __init__(self) -> None:
        time.sleep(2.0)

    def __call__(self, values: list[int]) -> list[int]:
        time.sleep(0.002 + 0.0005 * len(values))
        return list(values)


def test_runtime_a_pool_that_grows_under_load_answers_none_after_a_workers_model_load():
    # 3x what one worker serves within 100 ms, from a pool of 1 that may grow to 3: a
    # request sent to a worker that had not loaded the model waited for its load
    flow = sf.Flow("grows")
    flow.map(_LoadsIn2s, names=["y"], col="a", batching=sf.Batching(slo_ms=100), name="m")
    runtime = sf.LocalRuntime(min_workers=1, max_workers=3)
    try:
        with flow.deploy(runtime=runtime) as app:
            for i in range(50):  # the model loads on the first worker; calls are timed
                app.run({"a": [i]}).result(timeout=30)
            gaps = np.random.default_rng(3).exponential(1 / 1500, 4500)
            answered, _ = _burst(app, len(gaps), gaps)
            grew = app.stats()["m"]["workers"]
    finally:
        runtime.stop()
    assert grew > 1, grew  # the pool grew meanwhile
    assert len(answered) >= 1000, len(answered)
    assert max(answered) < 1.0, sorted(answered)[-5:]  # not a model's load of 2 s
