"""Per-stage live figures for `app.stats()`."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list; 0.0 when empty."""
    if not sorted_values:
        return 0.0
    rank = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


class StageStats:
    """Counters and a sliding window of per-request stage latencies (queue + run)."""

    def __init__(self, window: int = 4096) -> None:
        self._lock = threading.Lock()
        self._latencies: deque[float] = deque(maxlen=window)
        self.requests = 0
        self.batches = 0
        self.cold_starts = 0

    def add(self, requests: int, batches: int, cold_starts: int, latencies_s: list[float]) -> None:
        with self._lock:
            self.requests += requests
            self.batches += batches
            self.cold_starts += cold_starts
            self._latencies.extend(latencies_s)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            window = sorted(self._latencies)
            return {
                "requests": self.requests,
                "p50_ms": percentile(window, 0.50) * 1e3,
                "p99_ms": percentile(window, 0.99) * 1e3,
                "batch_mean": self.requests / self.batches if self.batches else 0.0,
                "cold_starts": self.cold_starts,
            }
