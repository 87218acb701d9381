"""Per-stage live figures for `app.stats()`."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from itertools import takewhile
from typing import Any

import numpy as np


def percentile(values: Sequence[float], q: float) -> float:
    """The `q` quantile (a fraction, 0.5 for the median) of `values`; 0.0 when empty.

    Computed by `numpy.quantile` with method="linear" (numpy's default; type 7 of
    Hyndman & Fan, as in R and Excel's PERCENTILE.INC): linear interpolation between
    the two nearest ranks, so the median of [1, 2, 3, 4, 5, 6] is 3.5. `values` need not
    be sorted."""
    if len(values) == 0:
        return 0.0
    return float(np.quantile(np.asarray(values, dtype=float), q, method="linear"))


class StageStats:
    """Counters, batch sizes, and per-request stage latencies (queue + run) of the
    last `window_s` seconds, which the percentiles are taken over."""

    def __init__(self, window_s: float = 10.0, most: int = 16384) -> None:
        self._lock = threading.Lock()
        self._window_s = window_s
        self._latencies: deque[tuple[float, float]] = deque(maxlen=most)  # (when, seconds)
        self.batch_sizes: Counter[int] = Counter()
        # calls by the rows they ran: rows -> [calls, gather ns, run ns, scatter ns]
        self.executions: dict[int, list[int]] = {}
        self.requests = 0
        self.batches = 0
        self.cold_starts = 0
        self.latency_count = 0  # every latency reported, and their sum (for a summary)
        self.latency_sum_s = 0.0
        self.typical_s: float | None = None  # a moving average of calls' run times
        self.completed = 0  # calls that ran to the end (not cut short)
        self._runs: deque[tuple[float, float]] = deque(maxlen=most)  # (reported, run s)

    def add(
        self,
        requests: int,
        batches: int,
        cold_starts: int,
        latencies_s: list[float],
        batch_sizes: Iterable[int] = (),
        service_s: Iterable[float] = (),
        stopped_s: Iterable[float] = (),
        executions: Mapping[int, Sequence[int]] | None = None,
    ) -> None:
        """Record a report: `service_s` the run times of calls, `stopped_s` how long
        calls cut short (cancelled, past a deadline) had run: the typical run time
        is at least that; `executions` the calls by the rows they ran (`rows ->
        [calls, gather ns, run ns, scatter ns]`)."""
        now = time.monotonic()
        with self._lock:
            self.requests += requests
            self.batches += batches
            self.cold_starts += cold_starts
            self._latencies.extend((now, latency) for latency in latencies_s)
            self.latency_count += len(latencies_s)
            self.latency_sum_s += sum(latencies_s)
            for run_s in service_s:
                self.completed += 1
                self._runs.append((now, run_s))
                typical = self.typical_s
                self.typical_s = run_s if typical is None else typical + 0.2 * (run_s - typical)
            for least in stopped_s:
                if self.typical_s is None or self.typical_s < least:
                    self.typical_s = least
            self.batch_sizes.update(batch_sizes)
            for rows, figures in (executions or {}).items():
                total = self.executions.setdefault(int(rows), [0, 0, 0, 0])
                for i, value in enumerate(figures[:4]):
                    total[i] += int(value)

    def busy(self, now: float, over_s: float) -> float:
        """Workers its calls kept busy over the last `over_s` seconds, on average."""
        total = 0.0
        with self._lock:
            for at, run_s in reversed(self._runs):  # the latest first
                if at < now - over_s:
                    break
                total += run_s
        return total / over_s

    def busy_in(self, now: float, over_s: float, size: int) -> float | None:
        """Workers its requests of the last `over_s` seconds would keep busy in calls
        of `size` (one row each), from its calls' run time by rows fitted as a + b x
        rows; None until calls of two sizes ran."""
        with self._lock:
            runs = [(rows, f[2] / f[0] / 1e9, f[0]) for rows, f in self.executions.items() if f[0]]
            since = now - over_s  # the latest first, up to the first older one
            requests = sum(1 for _ in takewhile(lambda e: e[0] >= since, reversed(self._latencies)))
        if len({rows for rows, _, _ in runs}) < 2:
            return None
        rows, run_s, calls = (np.array(column, dtype=float) for column in zip(*runs))
        per_row, fixed = np.polyfit(rows, run_s, 1, w=np.sqrt(calls))
        return requests / over_s * (max(fixed, 0.0) / size + max(per_row, 0.0))

    def snapshot(self) -> dict[str, Any]:
        since = time.monotonic() - self._window_s
        with self._lock:
            while self._latencies and self._latencies[0][0] < since:
                self._latencies.popleft()
            window = [latency for _, latency in self._latencies]
            figures = {
                "requests": self.requests,
                "p50_ms": percentile(window, 0.50) * 1e3,
                "p99_ms": percentile(window, 0.99) * 1e3,
                "batch_mean": self.requests / self.batches if self.batches else 0.0,
                "cold_starts": self.cold_starts,
                "latency_count": self.latency_count,
                "latency_sum_s": self.latency_sum_s,
            }
            if self.batch_sizes:
                figures["batch_sizes"] = dict(sorted(self.batch_sizes.items()))
            figures["executions"] = {
                rows: dict(zip(("calls", "gather_ns", "run_ns", "scatter_ns"), totals))
                for rows, totals in sorted(self.executions.items())
            }
            return figures
