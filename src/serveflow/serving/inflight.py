"""The in-flight bound of a served flow, adapted to where requests start to queue.

A fixed bound is a guess. Set high (`--max-in-flight 32` on 2 workers), a flood keeps
32 requests inside the server at once: each waits behind the others, and the admitted
p99 was 20x the unloaded one while the refused were turned away fast. Set low, it
wastes capacity whenever the service is faster. So the bound a flow enforces moves
between a floor and the configured ceiling by the gradient rule of Envoy's adaptive
concurrency filter:

    limit <- limit * clamp(TOLERANCE * min_latency / recent_latency, 1/2, 2) + HEADROOM

`recent_latency` is the median latency (admission to answer) of the requests finished
in the last window; `min_latency` the median of requests that were alone in flight when
admitted, so queued behind nothing. Once requests queue so that the median takes more
than TOLERANCE unqueued latencies, the limit shrinks; below that it grows by the
headroom, one request, per window. Envoy's gradient has no tolerance and a headroom of
sqrt(limit): on a simulated worker that refused 5% of requests at 70% load and 14% at
90%, and settled one worker at 4 in flight; with 1.5 and 1, it refuses nothing at 70%
and 1-7% at 90%, and a flood's median is 2-3 service times (it was 32 with 32 admitted).

The adapted bound holds only while more HTTP connections are open than the ceiling
(`ServingState.crowded`): with fewer, no more requests than the ceiling can be in
flight, a fixed bound would refuse none, and the clients are a closed loop (each waits
for its answer before sending again: a load test of N connections, or the gRPC
clients of one channel); refused, they would send again at once, and the refusals
only take time from what is admitted. (Measured: 64 gRPC clients against an adaptive
bound of 64 had half their calls refused, as Triton refuses none.)

The limit also stays within twice the most requests the flow had in flight at once in
the last `USED_WINDOWS` windows, plus the headroom. Light load queues nothing, so
latency alone lets the limit grow to the ceiling; a flood arriving then found 32
admitted where the load before it had used 3 to 6: its first 0.2 s was answered at a
median of 17-20 ms, against 3 ms unqueued, until the gradient had halved the limit
thrice. (TCP does not grow a window the sender does not fill either, RFC 7661.)

When nothing has measured the unqueued latency for a while (a flood keeps every request
queued), the limit drops to one until `PROBE_SAMPLES` requests have measured it again:
a latency that rose for good (a slower model, a lost worker, an event loop busy
refusing a flood) is learnt within about a second. "A while" is `PROBE_EVERY` times the
unqueued latency, at least `PROBE_EVERY_S`: the probes hold one request in flight for
about 2.5% of the time at most.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable

FLOOR = 2  # the least a flow admits at once (but while a probe measures, one)
TOLERANCE = 1.5  # the median latency the bound lets requests have, in unqueued ones
HEADROOM = 1.0  # requests admitted beyond what the latency says runs without queueing
WINDOW_S = 0.1  # the limit moves at most this often
WINDOW_SAMPLES = 8  # ... and once at least this many requests finished
PROBE_EVERY_S = 1.0  # the unqueued latency is measured again after this long without
PROBE_EVERY = 200  # ... or this many times that latency, when longer
USED = 2.0  # the limit stays within this many times the most admitted at once
USED_WINDOWS = 10  # ... in this many windows
PROBE_SAMPLES = 5  # unqueued latencies: the median of this many recent ones counts

Admission = tuple[float, int]  # (when, requests in flight then, itself included)


class InFlightLimit:
    """How many requests of one flow the server admits at once: `ceiling` when
    `adaptive` is False, else between `FLOOR` and `ceiling` as requests queue or not.
    Event-loop only; `clock` is for tests."""

    def __init__(
        self, ceiling: int, adaptive: bool = True, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if ceiling < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {ceiling}")
        self.ceiling = ceiling
        self.adaptive = adaptive and ceiling > FLOOR
        self.admitted = 0  # requests in flight now
        self.value = ceiling  # the bound enforced now
        self._limit = float(ceiling)
        self._unqueued: deque[float] = deque(maxlen=PROBE_SAMPLES)
        self._min_latency: float | None = None
        self._clock = clock
        self._window: list[float] = []
        self._window_start = clock()
        self._measured_at = self._window_start  # when an unqueued latency last came in
        self._probing = False
        self._peak = 0  # the most admitted at once in the window
        self._peaks: deque[int] = deque(maxlen=USED_WINDOWS)  # ... in the last ones

    def bound(self, crowded: bool = True) -> int:
        """The requests admitted at once now: the adapted bound while `crowded` (more
        clients than the ceiling could be sending), else the ceiling. Clients that
        each wait for their answer before sending again (a closed loop, a load test of
        N connections) never meet a refusal they would not have met at the ceiling:
        refused, such a client sends again at once, and its refusals only take time
        from the requests admitted."""
        return self.value if crowded else self.ceiling

    def admit(self, crowded: bool = True) -> Admission | None:
        """Count one request in, or None (refuse it) when the bound is reached."""
        if self.admitted >= self.bound(crowded):
            return None
        self.admitted += 1
        self._peak = max(self._peak, self.admitted)
        return self._clock(), self.admitted

    def release(self, admission: Admission) -> None:
        """Count out an admitted request (answered, failed or gone)."""
        self.admitted -= 1
        if not self.adaptive:
            return
        admitted_at, depth = admission
        now = self._clock()
        latency = now - admitted_at
        if depth == 1:
            self._unqueued.append(latency)
            self._measured_at = now
            if self._probing and len(self._unqueued) == PROBE_SAMPLES:
                self._probing = False
                self._unqueued_latency()
                self.value = max(FLOOR, round(self._limit))
        self._window.append(latency)
        if now - self._window_start >= WINDOW_S and len(self._window) >= WINDOW_SAMPLES:
            self._adapt(now)

    def _unqueued_latency(self) -> float | None:
        if self._unqueued:
            self._min_latency = statistics.median(self._unqueued)
        return self._min_latency

    def _adapt(self, now: float) -> None:
        recent = statistics.median(self._window)
        self._peaks.append(self._peak)
        self._peak = self.admitted
        self._window.clear()
        self._window_start = now
        if self._probing:
            return  # the limit is held at one until the probe has its samples
        least = self._unqueued_latency()
        if least is None or now - self._measured_at > max(PROBE_EVERY_S, PROBE_EVERY * least):
            self._probing = True
            self._unqueued.clear()
            self.value = 1
            return
        gradient = min(2.0, max(0.5, TOLERANCE * least / recent)) if recent > 0 else 2.0
        limit = self._limit * gradient
        if len(self._peaks) == USED_WINDOWS:
            limit = min(limit, USED * max(self._peaks))
        limit += HEADROOM
        self._limit = min(self.ceiling, max(FLOOR, limit))
        self.value = round(self._limit)
