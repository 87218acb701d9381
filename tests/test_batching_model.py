"""The BATCH analytical model, the MAP fit and the service profile, checked against
closed forms and the discrete-event simulation."""

import contextlib
import itertools
import math
import os
import threading
import time

import numpy as np
import pytest

import serveflow as sf
from serveflow.batching import MAP, ServiceProfile, buffer_law, fit_map, predict, simulate
from serveflow.batching.controller import BatchingController
from serveflow.batching.model import linear_service
from serveflow.batching.profile import REFIT_MIN_S
from serveflow.batching.simulate import greedy_streams, predict_simulated, simulate_controlled

SERVICE = linear_service(0.005, 0.001)  # 5 ms + 1 ms per request


def test_percentiles_are_monotone_in_q() -> None:
    pred = predict(MAP.mmpp2(30, 150, 1.0, 2.0), SERVICE, 8, 0.02, workers=1)
    values = [pred.percentile(q) for q in np.linspace(0.05, 0.995, 40)]
    assert all(b >= a - 1e-4 for a, b in itertools.pairwise(values))  # brentq tolerance (s)
    assert values[0] < values[-1]


def test_low_load_latency_is_timeout_plus_single_service() -> None:
    pred = predict(MAP.poisson(0.5), SERVICE, 16, 0.02, workers=1)
    assert pred.mean_batch == pytest.approx(1.0, abs=0.02)
    for q in (0.5, 0.9):
        assert pred.percentile(q) == pytest.approx(0.02 + 0.006, rel=0.02)


def test_high_load_fills_batches_before_the_timeout() -> None:
    law = buffer_law(MAP.poisson(5000), 8, 0.05)
    assert law.batch_pmf[-1] > 0.999
    assert law.mean_batch == pytest.approx(8, abs=0.01)


def test_batch_size_law_matches_poisson_counts() -> None:
    # With B large enough never to fill, batch size = 1 + Poisson(rate * T).
    law = buffer_law(MAP.poisson(100), 40, 0.02)
    k = np.arange(0, 8)
    expected = np.exp(-2.0) * 2.0**k / np.array([math.factorial(i) for i in k])
    assert np.allclose(law.batch_pmf[:8], expected, atol=1e-6)


def test_unstable_configuration_has_infinite_latency() -> None:
    pred = predict(MAP.poisson(1000), SERVICE, 2, 0.001, workers=1)  # 3.5 ms per request
    assert not pred.stable
    assert pred.percentile(0.99) == math.inf


@pytest.mark.parametrize(
    "arrivals",
    [MAP.poisson(200), MAP.mmpp2(20, 200, 0.5, 2.0)],
    ids=["poisson", "mmpp2"],
)
def test_model_matches_simulation(arrivals: MAP) -> None:
    times = arrivals.sample(30_000, np.random.default_rng(7))
    latencies, _ = simulate(times, SERVICE, 8, 0.02, workers=1)
    qs = np.arange(50, 100) / 100
    measured = np.quantile(latencies[500:], qs)
    pred = predict(arrivals, SERVICE, 8, 0.02, workers=1)
    predicted = np.array([pred.percentile(q) for q in qs])
    mape = float(np.mean(np.abs(predicted - measured) / measured))
    assert mape < 0.10


@pytest.mark.parametrize(
    ("rate", "size", "a", "b"),
    [(300, 2, 0.004, 0.001), (900, 8, 0.004, 0.001), (200, 8, 0.02, 0.005), (60, 4, 0.02, 0.005)],
)
def test_greedy_batching_law_matches_the_simulated_runtime(rate, size, a, b) -> None:
    # Greedy batching (no timeout: a free worker takes what is queued, up to the size)
    # on 2 workers, run as the runtime routes requests (to the least loaded worker)
    # with a fixed policy, against the law the search uses for it
    service = linear_service(a, b)
    times = MAP.poisson(rate).sample(int(rate * 20), np.random.default_rng(5))
    controller = BatchingController(sf.Batching(max_size=size, timeout_ms=0), 2)
    served = simulate_controlled(times, service, controller, 2)
    measured = served.latencies[times > 2.0]
    pred = predict_simulated(greedy_streams(MAP.poisson(rate)), service, size, 2, merge=size)
    for q in (0.5, 0.9, 0.99):
        assert pred.percentile(q) == pytest.approx(np.quantile(measured, q), rel=0.12)
    assert pred.mean_batch == pytest.approx(served.sizes.mean(), rel=0.1)
    # a rate that even full calls cannot serve has no law
    full = 2 * size / float(service(size))
    assert not predict_simulated(greedy_streams(MAP.poisson(1.1 * full)), service, size, 2).stable


def test_noise_adds_an_independent_latency() -> None:
    arrivals = MAP.poisson(200)
    qs = np.arange(50, 100) / 100
    plain = predict(arrivals, SERVICE, 8, 0.02)
    shifted = predict(arrivals, SERVICE, 8, 0.02, noise=np.full(10, 0.004))
    for q in qs:
        assert shifted.percentile(q) == pytest.approx(plain.percentile(q) + 0.004, abs=2e-4)
    # A skewed spread (say scheduling delays on a busy machine) moves the tail most.
    rng = np.random.default_rng(3)
    noise = rng.exponential(0.003, 5000)
    times = arrivals.sample(30_000, rng)
    latencies, _ = simulate(times, SERVICE, 8, 0.02, workers=1)
    measured = np.quantile(latencies[500:] + rng.choice(noise, len(latencies) - 500), qs)
    noisy = predict(arrivals, SERVICE, 8, 0.02, noise=noise)
    predicted = np.array([noisy.percentile(q) for q in qs])
    assert np.mean(np.abs(predicted - measured) / measured) < 0.03
    assert noisy.percentile(0.99) - plain.percentile(0.99) > 2 * 0.003  # twice the mean


def test_calls_that_vary_lengthen_the_queue_behind_them() -> None:
    # 2 workers at 0.8 of their throughput (11.3 + 2.1 ms per row, MiniLM's on a
    # 2-core machine), each call's time spread 25% around its curve: the calls that
    # run long hold the ones queued behind them. As noise added to a request alone,
    # the model said p99 48 ms where the simulation gave 56.
    service = linear_service(0.0113, 0.0021)
    rng = np.random.default_rng(0)
    spread = rng.gamma(16, 1 / 16, 20_000)
    times = MAP.poisson(375).sample(40_000, rng)
    latencies, sizes = simulate(times, service, 6, 0.0109, workers=2, spread=spread)
    noise = service(sizes[:4000]) * (spread[:4000] - 1.0)  # what admission measures
    model = predict(MAP.poisson(375), service, 6, 0.0109, workers=2, noise=noise)
    assert model.percentile(0.99) == pytest.approx(np.quantile(latencies[4000:], 0.99), rel=0.07)


def test_simulation_dispatch_rules() -> None:
    # Full batch: 4 arrivals within the timeout leave together at the 4th arrival.
    lat, sizes = simulate(np.array([0.0, 0.001, 0.002, 0.003]), SERVICE, 4, 0.1)
    assert list(sizes) == [4]
    assert lat[3] == pytest.approx(0.009)
    # Timeout: 2 arrivals, batch of 2 leaves 10 ms after the first.
    lat, sizes = simulate(np.array([0.0, 0.004]), SERVICE, 4, 0.01)
    assert list(sizes) == [2]
    assert lat[0] == pytest.approx(0.01 + 0.007)


def test_fit_recognizes_poisson() -> None:
    gaps = np.diff(MAP.poisson(80).sample(4000, np.random.default_rng(3)))
    fitted = fit_map(gaps)
    assert fitted.is_poisson
    assert fitted.rate == pytest.approx(80, rel=0.1)


def test_fit_recognizes_bursty_mmpp() -> None:
    truth = MAP.mmpp2(20, 200, 0.5, 2.0)
    gaps = np.diff(truth.sample(5000, np.random.default_rng(4)))
    fitted = fit_map(gaps)
    assert fitted.phases == 2
    low, high = sorted(fitted.phase_rates)
    assert low == pytest.approx(20, rel=0.4)
    assert high == pytest.approx(200, rel=0.4)
    assert fitted.rate == pytest.approx(1 / gaps.mean(), rel=1e-6)


def test_change_point_finds_a_step_and_no_step_in_a_steady_stream() -> None:
    from serveflow.batching import ArrivalLog

    def change_in_last_2s(times: np.ndarray) -> tuple[float, float]:
        log = ArrivalLog()
        for t in times:
            log.record(float(t))
        now = float(times[-1])
        return log.change_point(now, 2.0), now - 2.0  # (the change, the window's start)

    rng = np.random.default_rng(8)
    change, start = change_in_last_2s(MAP.poisson(300).sample(900, rng))
    assert change == start  # one rate explains it: no change claimed
    calm = MAP.poisson(50).sample(150, rng)
    stepped = np.concatenate([calm[calm < 2.0], 2.0 + MAP.poisson(500).sample(250, rng)])
    change, _ = change_in_last_2s(stepped)
    assert change == pytest.approx(2.0, abs=0.05)


def test_a_clump_of_requests_sent_together_is_no_change_of_rate() -> None:
    # `hey -c 10 -q 10`: 10 requests within 2 ms every 100 ms. Judged right after a
    # burst, the burst alone was taken for a new rate (5,000/s), and planned for as a flood
    from serveflow.batching import ArrivalLog
    from serveflow.batching.controller import fit_arrivals

    log = ArrivalLog()
    for burst in range(40):
        for k in range(10):
            log.record(burst * 0.1 + k * 0.0002)
    now = 3.9 + 0.002
    assert log.change_point(now, 2.0) <= 2.0  # (its first arrival: the window's start)
    assert fit_arrivals(log, now, True).rate == pytest.approx(100, rel=0.1)


def test_a_large_step_up_is_a_shift_within_a_fraction_of_a_second_of_history() -> None:
    # At deploy: 1 s of lead-in at 650/s, then 3,350/s. Judged over 2 s, and only once
    # 2 s were logged, the step waited 1.6 s for its re-plan.
    from serveflow.batching import ArrivalLog

    rng = np.random.default_rng(4)
    log, planned = ArrivalLog(), MAP.poisson(650)
    lead = MAP.poisson(650).sample(650, rng)
    for t in lead:
        log.record(float(t))
    now = float(lead[-1])
    assert not log.rate_shift(now, planned)
    for t in now + MAP.poisson(3350).sample(1000, rng):
        if t > now + 0.3:
            break
        log.record(float(t))
    assert log.rate_shift(now + 0.3, planned)
    # bursts of 5/3 of the mean are no such step (judged over 2 s, as before, they may
    # be: over_s=1e9 leaves the short look alone)
    bursty = MAP.mmpp2(100, 500, 2.0, 2.0).sample(3000, rng)
    log = ArrivalLog()
    for t in bursty[bursty < 2.0]:
        log.record(float(t))
    steady = MAP.poisson(300)  # the mean, fitted as if steady
    fired = []
    for t in bursty[(bursty >= 2.0) & (bursty < 10.0)]:
        log.record(float(t))
        fired.append(log.rate_shift(float(t), steady, over_s=1e9))
    assert not any(fired)


def test_profile_learns_linear_service_through_noise() -> None:
    rng = np.random.default_rng(5)
    profile = ServiceProfile(max_size=32)
    assert profile.explore_sizes()[:3] == [1, 2, 4]
    for i in range(300):
        size = int(rng.integers(1, 33))
        noise = 1.0 + 0.05 * rng.standard_normal() + (3.0 if i % 50 == 0 else 0.0)  # outliers
        profile.observe(size, (0.004 + 0.0015 * size) * noise)
    assert profile.ready
    assert profile.a == pytest.approx(0.004, rel=0.2)
    assert profile.b == pytest.approx(0.0015, rel=0.1)


def test_profile_learns_the_growth_of_large_batches() -> None:
    # A real model slows per request past some batch size: a line through the small
    # sizes would promise a large batch too soon.
    rng = np.random.default_rng(7)
    profile = ServiceProfile(max_size=32)
    for _ in range(400):
        size = int(rng.integers(1, 33))
        true = 0.005 + 0.002 * size + 0.0001 * size**2
        profile.observe(size, true * (1.0 + 0.03 * rng.standard_normal()))
    for size in (1, 8, 32):
        true = 0.005 + 0.002 * size + 0.0001 * size**2
        assert profile.predict(np.array([size]))[0] == pytest.approx(true, rel=0.08)


def test_profile_fits_the_large_sizes_it_has_seen_a_few_times() -> None:
    # Warm-up and a light load form many small batches; the few large ones are what a
    # busier plan extrapolates to, so the curve must go through them.
    rng = np.random.default_rng(9)
    profile = ServiceProfile(max_size=32)

    def true(size: int) -> float:
        return 0.016 + 0.0025 * size + 0.0001 * size**2

    sizes = [size for size in (1, 2, 3, 4, 6) for _ in range(40)] + [8, 12, 16, 24, 32] * 3
    for size in rng.permutation(sizes):
        profile.observe(int(size), true(size) * (1.0 + 0.05 * rng.standard_normal()))
    for size in (16, 24, 32):
        assert profile.predict(np.array([size]))[0] == pytest.approx(true(size), rel=0.1)


@pytest.mark.parametrize("seed", range(5))
def test_profile_extrapolates_no_curvature_from_a_few_small_sizes(seed: int) -> None:
    # Sizes 1-5 seen at a light load: a curvature fitted to their noise would price a
    # batch of 16 far off, and the plan for a step in load with it.
    rng = np.random.default_rng(seed)
    profile = ServiceProfile(max_size=32)
    for _ in range(100):
        size = int(rng.integers(1, 6))
        profile.observe(size, (0.016 + 0.003 * size) * (1.0 + 0.08 * rng.standard_normal()))
    assert profile.predict(np.array([16]))[0] == pytest.approx(0.016 + 0.003 * 16, rel=0.25)


def test_profile_follows_drift() -> None:
    profile = ServiceProfile(max_size=16, history=128)
    for i in range(200):
        profile.observe(1 + i % 16, 0.002 + 0.001 * (1 + i % 16))
    for i in range(200):
        profile.observe(1 + i % 16, 2 * (0.002 + 0.001 * (1 + i % 16)))
    assert profile.b == pytest.approx(0.002, rel=0.15)


def test_profile_keeps_its_slope_when_drift_shows_at_few_sizes() -> None:
    # A slowdown seen only at the sizes the current plan forms (5 and 6) says how much
    # slower, not how the time grows with the batch: the older batches give the slope.
    rng = np.random.default_rng(6)
    profile = ServiceProfile(max_size=16)
    for i in range(200):
        profile.observe(1 + i % 16, 0.002 + 0.001 * (1 + i % 16))
    for i in range(200):
        size = 5 + i % 2
        profile.observe(size, 2 * (0.002 + 0.001 * size) * (1 + 0.05 * rng.standard_normal()))
    assert profile.a == pytest.approx(0.004, rel=0.3)
    assert profile.b == pytest.approx(0.002, rel=0.2)


def test_profile_refits_a_fast_stage_at_most_every_few_tens_of_ms_and_still_follows_it() -> None:
    # 1 + 0.2 ms per row at 3,300 requests/s: 900 calls a second. Refitting every 16
    # of them took the driver's receiving thread 56 times a second.
    profile = ServiceProfile(max_size=16)
    calls = [(i / 900, 1 + i % 8) for i in range(900)]  # one second
    for at, size in calls:
        profile.observe(size, 0.001 + 0.0002 * size, at)
    before = profile.refits
    for at, size in calls:  # the next second, twice as slow
        profile.observe(size, 2 * (0.001 + 0.0002 * size), 1.0 + at)
    assert profile.refits - before <= 1.0 / REFIT_MIN_S + 1
    assert profile.b == pytest.approx(0.0004, rel=0.15)


def test_profile_refits_once_per_report_of_many_calls_and_still_follows_them() -> None:
    # A worker reports its calls every quarter second: at 1 + 0.2 ms per row, 90 of
    # them. Judged call by call, a report took 5 refits at once on the driver.
    profile = ServiceProfile(max_size=16)
    for i in range(900):
        profile.observe(1 + i % 8, 0.001 + 0.0002 * (1 + i % 8), i / 900)
    for report in range(4):  # the next second, twice as slow
        start = 1.0 + 0.25 * report
        calls = [
            (1 + i % 8, 2 * (0.001 + 0.0002 * (1 + i % 8)), start + i / 360) for i in range(90)
        ]
        before = profile.refits
        profile.observe_all(calls)
        assert profile.refits - before == 1
    assert profile.b == pytest.approx(0.0004, rel=0.15)


def test_batching_policy_validation_and_describe() -> None:
    assert sf.Batching().size == 32
    assert sf.Batching(max_size=8, timeout_ms=5).describe() == "max_size=8, timeout_ms=5"
    assert "SLO p99 <= 50 ms" in sf.Batching(slo_ms=50).describe()
    for bad, field in [
        ({"max_size": 0}, "max_size"),
        ({"timeout_ms": -1}, "timeout_ms"),
        ({"slo_ms": 0}, "slo_ms"),
        # infinite: the plan's wait was too, no worker took it and requests hung
        ({"slo_ms": float("inf")}, "slo_ms"),
        ({"timeout_ms": float("inf")}, "timeout_ms"),
        ({"slo_ms": 50, "cost_budget_ms": float("inf")}, "cost_budget_ms"),
        ({"percentile": 1.5}, "percentile"),
        ({"objective": "speed"}, "objective"),
        ({"on_overload": "drop"}, "on_overload"),
    ]:
        with pytest.raises(ValueError, match=field):
            sf.Batching(**bad)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads Linux's /proc")
def test_fitting_many_arrivals_keeps_its_work_on_the_calling_thread() -> None:
    # The driver fits a busy stage's arrivals every planning period. A BLAS dot over
    # 20,000 gaps had OpenBLAS spread it over its threads, which then spin between
    # calls: 0.41 s of CPU in 0.4 s here, a core of the machine's two.
    def native_threads_cpu_s() -> float:
        python = {t.native_id for t in threading.enumerate()}
        total = 0
        for tid in os.listdir("/proc/self/task"):
            if int(tid) in python:
                continue
            with contextlib.suppress(FileNotFoundError):
                with open(f"/proc/self/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    gaps = np.random.default_rng(1).exponential(0.00025, 20_000)
    before = native_threads_cpu_s()
    for _ in range(20):
        fit_map(gaps)
        time.sleep(0.02)
    assert native_threads_cpu_s() - before < 0.1
