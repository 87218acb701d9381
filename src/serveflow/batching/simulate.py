"""Discrete-event simulation of a batching buffer and its workers (deterministic for
given arrival times): the ground truth the analytical model is checked against.

`pull` (the runtime's semantics): one buffer; a free worker takes up to `B` queued
requests once `B` are queued or the oldest has waited `T` (at once when `T` is 0).
`push` (the model's semantics, BATCH's): the buffer dispatches a batch at `B` or at
`T` after its first request whatever the workers do; batches then queue FIFO for one
of the `k` workers.
"""

from __future__ import annotations

import heapq
import math
from collections import deque

import numpy as np

from serveflow.batching.model import ServiceFn


def simulate(
    arrivals: np.ndarray,
    service: ServiceFn,
    max_size: int,
    timeout_s: float,
    workers: int = 1,
    mode: str = "pull",
) -> tuple[np.ndarray, np.ndarray]:
    """Per-request latencies (seconds, in arrival order) and the batch sizes served."""
    if mode not in ("pull", "push"):
        raise ValueError(f"simulate: mode must be 'pull' or 'push', got {mode!r}")
    if max_size < 1 or timeout_s < 0 or workers < 1:
        raise ValueError("simulate: max_size and workers must be >= 1, timeout_s >= 0")
    times = np.asarray(arrivals, dtype=float)
    svc = np.asarray(service(np.arange(1, max_size + 1)), dtype=float)
    if mode == "push":
        return _push(times, svc, max_size, timeout_s, workers)
    return _pull(times, svc, max_size, timeout_s, workers)


def _push(
    times: np.ndarray, svc: np.ndarray, big: int, timeout: float, workers: int
) -> tuple[np.ndarray, np.ndarray]:
    latency = np.empty(len(times))
    sizes = []
    free = [0.0] * workers
    i, n = 0, len(times)
    while i < n:
        opened = times[i]
        j = i + 1
        while j < n and j - i < big and times[j] <= opened + timeout:
            j += 1
        dispatch = times[j - 1] if j - i == big else opened + timeout
        start = max(dispatch, heapq.heappop(free))
        done = start + svc[j - i - 1]
        heapq.heappush(free, done)
        latency[i:j] = done - times[i:j]
        sizes.append(j - i)
        i = j
    return latency, np.array(sizes)


def _pull(
    times: np.ndarray, svc: np.ndarray, big: int, timeout: float, workers: int
) -> tuple[np.ndarray, np.ndarray]:
    latency = np.empty(len(times))
    sizes = []
    free = [0.0] * workers  # heap of the times workers become free
    queue: deque[int] = deque()
    i, n, now = 0, len(times), 0.0
    # Each step admits an arrival, dispatches a batch, or waits for a timeout or a
    # worker (then dispatches): at most 4 steps per request.
    for _ in range(4 * n + 4):
        if i >= n and not queue:
            break
        worker_free = free[0] <= now
        if queue and worker_free and (len(queue) >= big or now >= times[queue[0]] + timeout):
            size = min(big, len(queue))
            heapq.heappop(free)
            done = now + svc[size - 1]
            heapq.heappush(free, done)
            for _ in range(size):
                k = queue.popleft()
                latency[k] = done - times[k]
            sizes.append(size)
            continue
        next_arrival = times[i] if i < n else math.inf
        if queue and not worker_free:
            wake = free[0]
        elif queue:
            wake = times[queue[0]] + timeout
        else:
            wake = math.inf
        if next_arrival <= wake:
            now = max(now, next_arrival)
            queue.append(i)
            i += 1
        else:
            now = max(now, wake)
    if i < n or queue:
        raise RuntimeError("simulate: step bound reached before every request was served")
    return latency, np.array(sizes)
