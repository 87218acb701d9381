"""`serveflow.runtime.stats`: percentiles as numpy defines them, and the stage figures."""

import time

import numpy as np
import pytest

from serveflow.runtime.stats import StageStats, percentile


def test_percentile_is_numpys_linear_quantile():
    assert percentile([1, 2, 3, 4, 5, 6], 0.50) == 3.5  # not a nearest rank (3 or 4)
    assert percentile([1, 2, 3, 4, 5, 6], 0.50) == np.percentile(np.arange(1, 7), 50)
    one_to_100 = list(range(1, 101))
    assert percentile(one_to_100, 0.99) == pytest.approx(99.01)
    assert percentile(one_to_100, 0.99) == np.percentile(one_to_100, 99)


def test_percentile_edges():
    assert percentile([], 0.5) == 0.0
    assert percentile([7.0], 0.99) == 7.0
    assert percentile([3, 1, 2], 0.5) == 2.0  # unsorted input is fine
    assert percentile([1, 2, 3], 0.0) == 1.0 and percentile([1, 2, 3], 1.0) == 3.0
    assert isinstance(percentile([1, 2], 0.5), float)


def test_stage_stats_snapshot_uses_it():
    stats = StageStats(window_s=60.0)
    stats.add(6, 2, 0, [0.001 * i for i in range(1, 7)], batch_sizes=[3, 3])
    figures = stats.snapshot()
    assert figures["p50_ms"] == pytest.approx(3.5)
    assert figures["p99_ms"] == pytest.approx(np.percentile(np.arange(1, 7), 99))
    assert figures["batch_mean"] == 3.0 and figures["batch_sizes"] == {3: 2}


def test_what_a_stages_calls_keep_busy_and_would_in_full_batches():
    stats = StageStats()
    now = time.monotonic()
    assert stats.busy(now, 2.0) == 0.0 and stats.busy_in(now, 2.0, 8) is None
    # 40 requests in calls of 1 and 2 rows: 20 + 5 ms per row
    runs = {1: [20, 0, 25_000_000 * 20, 0], 2: [10, 0, 30_000_000 * 10, 0]}
    stats.add(40, 30, 0, [0.03] * 40, service_s=[0.025] * 20 + [0.03] * 10, executions=runs)
    now = time.monotonic()
    assert stats.busy(now, 2.0) == pytest.approx((20 * 0.025 + 10 * 0.03) / 2.0)
    # the same 20 requests a second in calls of 8: 20 / 8 + 5 ms each
    assert stats.busy_in(now, 2.0, 8) == pytest.approx(20 * 0.0075)
    assert stats.busy(now + 3.0, 2.0) == 0.0  # older than the window
