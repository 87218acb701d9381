"""The per-stage batching controller: what batch size, timeout and number of workers a
batching stage should use now, and whether to admit an arrival.

The runtime drives it (no threads here; calls are serialized by a lock):

- `on_arrival(now)` for every request offered to the stage, then
  `admit(now, rid, workers, worker)` for that same request (False: refuse it),
  and `routed(rid, worker, now)` once the router placed it;
- `finished(rid, now, ok)` when an admitted request's result reached the driver (a
  stage whose output is the flow's), and `on_batch_done(size, service_s, now,
  latencies_s, worker)` after each batch (service time of the call, each request's
  latency);
- `decision(now)` whenever it forms a batch (cheap: re-plans every `replan_s` seconds
  (every `SHIFT_CHECK_S` until the first plan) or on a rate shift, otherwise returns
  the cached decision);
- `snapshot()` for `app.stats()`.

Admission (`admission.StageLedger`) predicts each arrival's latency from the stage's
state: the calls queued on each worker, the batch filling, the service profile and
the runtime's measured overhead. Measured latencies come with each finished batch
(the runtime reports every request's latency at the stage), or are inferred assuming
first-in first-out batches. Two loops close over them: the planning target
(`target_scale`, while plans hold) and, under overload, the share of the SLO admission
holds requests to (`admit_scale`: see ADMIT_CHECK_S).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from serveflow.batching.admission import Lanes, StageLedger
from serveflow.batching.arrivals import CLUMP_SPLIT, MAP, STEP_S, ArrivalLog, Trace
from serveflow.batching.model import (
    Prediction,
    buffer_laws,
    noise_points,
    predict,
    slow_switching,
)
from serveflow.batching.profile import ServiceProfile
from serveflow.batching.simulate import Stream, greedy_streams, predict_simulated
from serveflow.logical.operators import Batching

log = logging.getLogger(__name__)

SIZE_LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
TIMEOUT_SHARES = (0.0, 0.03, 0.06, 0.1, 0.15, 0.25, 0.4, 0.6)  # of the SLO ...
# ... up to MAX_WAIT_S, unless the policy's own `timeout_ms` says more; in warm-up a fifth
# of the SLO up to WARMUP_WAIT_S. Shares alone made a loose SLO a long wait: at 20 s,
# each of a deployment's first requests sent one at a time waited 4 s for company,
# and at 1e12 ms a batch short of its size was never run.
MAX_WAIT_S = 1.0
WARMUP_WAIT_S = 0.05
MIN_ARRIVALS_TO_PLAN = 20
SHIFT_CHECK_S = 0.25
SHIFT_WINDOW_S = 2.0  # a rate shift is judged, and then the arrivals fitted, over this
MIN_FOR_CORRECTION = 50  # latencies measured before the planning target moves
MIN_TARGET_SCALE = 0.3
INITIAL_TARGET_SCALE = 0.85  # headroom for what the model does not see, until measured
MAX_TARGET_SCALE = 0.9  # planned at the SLO itself, noise alone would miss it half the time
RELAX_BELOW = 0.75  # measured percentile under this share of the SLO: relax the target
TIGHTEN_MARGIN = 0.95
MOST_TIGHTEN = 0.8  # per correction: an overshoot of several times the SLO is a backlog
# (a plan the workers could not keep up with), not a model error to scale by
RELAX_STEP = 1.1
PREMISE_RATE_SLACK = 1.2  # arrivals above this x the planned peak rate void a correction
PREMISE_SPELL = 0.1  # ... and so does a slow spell of the machine (the ledger's residuals
# rose by this share of the SLO beyond their spread)
REPLAN_CHANGE = 0.1  # a periodic re-plan searches only when the basis moved more than this
SERVICE_SHIFT = 0.25  # service times moved by more than this since the plan: re-plan now
SPARE_AT = 0.5  # peak-phase utilization of the planned workers past which one more is loaded
COST_TOLERANCE = 0.15  # the cost objective takes the fastest plan within this of the cheapest
ROOM = 0.9  # a plan predicted within this share of the target leaves admission room ...
ROOM_COST = 1.5  # ... and is preferred while it costs at most this x the cheapest plan
CHECKS = 4  # waiting plans a search simulates where bursts outrun them (`search`)
BACKLOG_MERGE = 2  # planned batches a worker runs as one call when they queue (BatchRule)
OVERLOAD_WAIT = 0.7  # near capacity, the overload plan's timeout: this share of the room,
FILL_GAIN = 0.02  # ... where one more request a call serves this much more (see `overload`)
TRACE_S = 10.0  # clumped arrivals: a search simulates the last seconds of them, at most
OVERHEAD_POINTS = 32  # measured runtime overhead, as quantiles, handed to each search
# Admission's arrival rate (overload or not, and how many arrivals fill a call): that of
# the latest RATE_ARRIVALS arrivals, taken every RATE_EVERY_S. Not the fitted process's
# mean: fitted to 30 s that began with the idle seconds a deployment waited for its
# model, it averaged 290-620/s while 1,200/s arrived, and admission took a 3x overload
# for a load served first come, first admitted (MiniLM, SLO 46 ms: goodput 0.3-0.6 of
# the sustainable rate).
RATE_ARRIVALS = 256
RATE_EVERY_S = 0.05
# ... and sooner, over the arrivals since, when RATE_SURGE x as many arrived as that
# rate said (at least RATE_SURGE_MIN, over RATE_SURGE_S): a burst of 1,000 sent in 40 ms after a
# quiet second was judged at the quiet rate throughout, not an overload: under an SLO
# of 100 ms, 82-295 of the 390-480 it admitted answered late in 5 of 9 bursts (2 + 0.5
# ms per row, 2 workers: the requests reached the workers later than the driver sent
# them, from a busy GIL)
RATE_SURGE = 4.0
RATE_SURGE_MIN = 32
RATE_SURGE_S = 0.005  # ... over this long at least: HTTP requests come in clumps (a
# closed-loop client's answers to a call of 64 come back at once, and so do its next 64),
# and, where arrivals come in clumps (the plan's `_clumps`), more than one merged call on
# each worker holds: such a clump is no rate (`hey -q` bursts of 40 every 100 ms, 400/s
# on 2 workers of 4 + 1 ms per row, SLO 60 ms, judged at 8,000/s: requests that opened a
# call, refused as if overloaded, 0-13%). Not else: an MMPP's burst is seen as late as
# that many arrivals (4 + 1 ms per row, SLO 20x, 3x: p99 1.23x the SLO)
# Under overload admission keeps every admitted request near the SLO, and what its
# model misses (a model's calls slowed by the driver and the client sharing 2 cores:
# MiniLM at 20x, 3x overload, calls ran 1.6-1.75x their service time at the 90th
# percentile, and the answered p99 was 1.1-1.3x the SLO) is missed by the tail. So
# admission holds requests to a share of the SLO (`admit_scale`), judged on the
# latencies answered in the last ADMIT_WINDOW_S, every ADMIT_CHECK_S (at least
# ADMIT_MIN of them: a stage answering fewer per second is not corrected): their
# percentile above the SLO tightens it (by the overshoot, at most ADMIT_STEP a time),
# below ADMIT_RELAX_BELOW of it relaxes it (by the room, at most ADMIT_RELAX a time),
# and it is back at 1 while admission refuses less than ADMIT_SHEDDING of the arrivals,
# or fewer arrive than an overload plan serves within the SLO (no overload: a plan's
# own model errors are the planning target's to correct). MiniLM on 2 workers, SLO
# 47-52 ms, 351-393/s (half what they serve within it): in its first seconds,
# refusals passed ADMIT_SHEDDING, admission held requests to 0.61-0.72 of the SLO,
# and refused 37-75% of the arrivals for 2 s (a request that opens a call waits for
# it to fill, past that share).
# The percentile is held below the SLO by a margin, where that is cheap: by up to
# ADMIT_MARGIN, as far as it costs at most ADMIT_COST of the throughput. Shorter
# latencies mean smaller calls, and a call's fixed cost is spread over fewer requests:
# a margin of x costs about x times the fixed share of a call's time. At 4 + 1 ms per
# row, SLO 100 ms, calls of ~68 took 72 ms (fixed share 6%): 8 requests of 100 were
# answered in one call, so the answered p99 of 10 s was that of its 2-3 latest calls,
# and it missed 1.1x the SLO in 2 runs of 8 (p99 0.99-1.18, mean 1.06, goodput 0.94 of
# the sustainable rate); held to 0.9 of it, 1 of 8 (0.91-1.12, mean 0.95, goodput 0.94).
# But at SLO 25 ms (calls of ~9, fixed share 30%) that margin cut the goodput from
# 0.91-0.96 of the sustainable rate to 0.87-0.91; this rule's 3% there: 0.94 (3 runs).
ADMIT_MARGIN = 0.1
ADMIT_COST = 0.01
ADMIT_CHECK_S = 0.5
ADMIT_WINDOW_S = 1.0
ADMIT_MIN = 100
ADMIT_STEP = 0.85
ADMIT_RELAX_BELOW = 0.95
ADMIT_RELAX = 1.25
ADMIT_TIGHTEST = 0.5
ADMIT_SHEDDING = 0.05
ADMITTED_KEPT = 65_536  # admitted requests awaiting their end, at most (the oldest go)


@dataclass(frozen=True)
class Decision:
    """What a batching stage should do now. `predicted_ms`: the model's `percentile`
    latency for it (None before anything is known); `feasible`: the SLO is predicted
    to hold; `cost_ms`: worker-milliseconds per request (busy, plus idle at its price);
    `spare`: workers to keep loaded beyond `workers`, sent nothing until a plan uses them
    (a burst past the planned rate then finds them warm, not seconds from ready);
    `capacity_rps`: for an overload plan, the requests per second it serves within
    the SLO."""

    max_size: int
    timeout_s: float
    workers: int
    predicted_ms: float | None = None
    feasible: bool = True
    cost_ms: float | None = None
    spare: int = 0
    capacity_rps: float | None = None  # an overload plan's: what it serves within the SLO

    @property
    def timeout_ms(self) -> float:
        return self.timeout_s * 1e3

    @property
    def held(self) -> int:
        """Workers to keep loaded: the planned ones and the spare."""
        return self.workers + self.spare


class BatchingController:
    """Chooses (batch size, timeout, workers) for one batching stage.

    Fixed policy (`policy.slo_ms` is None): always `policy.size`, `policy.timeout_ms`
    and `max_workers`. SLO policy: the cheapest configuration (worker-seconds per
    request; `idle_price` weighs an idle worker against a busy one, and the first
    `held_workers`, which the pool keeps anyway, are free to hold) whose predicted
    `policy.percentile` latency is within `policy.slo_ms`, or with
    `objective="latency"` the lowest latency within the cost budget. Candidates:
    batch sizes up to `policy.max_size` (else 64), timeouts up to `policy.timeout_ms`
    (else 60% of the SLO) or none (greedy: what is queued, up to the size; simulated,
    `simulate.predict_simulated`), 1..`max_workers` workers. `searcher` runs each search
    (default `search_here`) and `fitter` each periodic re-plan's fit of the arrivals
    (default `fit_arrivals`): a runtime may run them in another process.
    """

    def __init__(
        self,
        policy: Batching,
        max_workers: int = 1,
        *,
        held_workers: int = 1,
        replan_s: float = 2.0,
        window_s: float = 30.0,
        idle_price: float = 0.1,
        grid: int = 120,
        profile: ServiceProfile | None = None,
        searcher: Searcher | None = None,
        fitter: Fitter | None = None,
        lanes: Lanes | None = None,
    ) -> None:
        if max_workers < 1:
            raise ValueError(f"BatchingController: max_workers must be >= 1, got {max_workers}")
        self.policy = policy
        self.max_workers = max_workers
        self.held_workers = held_workers
        # the most workers it plans on while a tighter stage shares them (None: no
        # limit), unless no plan on that many meets its SLO (see `confine`)
        self.confined_to: int | None = None
        self.replan_s = replan_s
        self.idle_price = idle_price
        self.grid = grid
        self._searcher = searcher or search_here
        self._fitter = fitter
        self._cap = policy.max_size or (SIZE_LADDER[-1] if policy.adaptive else policy.size)
        self.arrivals = ArrivalLog(window_s)
        self.profile = profile or ServiceProfile(max_size=self._cap)
        self._lock = threading.Lock()
        self._pending: deque[float] = deque(maxlen=100_000)
        self._latencies: deque[float] = deque(maxlen=4096)
        self._fitted: MAP | None = None
        self._planned_at = -math.inf
        self._shift_checked_at = -math.inf
        self._cache: dict[tuple, Decision] = {}
        self._basis: np.ndarray | None = None  # what the current plan was made for
        self._clumps = 0.0  # the arrivals' mean clump (`_clump_size`) it was made for
        self.arrived = 0
        self.shed = 0
        self.late = 0
        self.late_predicted = 0
        self.plans = 0
        # Closed loop over the model: the SLO the search plans against, as a share of
        # the real one, lowered when the measured percentile overshoots (the model
        # misses costs of the real runtime: hops, routing, other load) and raised back
        # slowly while there is room.
        self.target_scale = INITIAL_TARGET_SCALE
        self._recent: list[float] = []
        # when the arrival rate last stepped up: plans leave out the arrivals before
        # it (see `decision`)
        self._changed_at = -math.inf
        # Closed loop over admission under overload (see ADMIT_CHECK_S)
        self.admit_scale = 1.0
        self._admitted: dict[int, float] = {}  # admitted request -> when
        self._answered: list[tuple[float, float]] = []  # (end, latency) since judged
        # they are the driver's, from arrival to answer (`finished` with `call`: the
        # stage's output is the flow's and its input the request's); else the
        # workers' reports' (from send to the call's end)
        self._whole = False
        # the flow's SLO, when this stage is the last of those sharing it: requests
        # admitted on what the stages before left them (see `admit_at`) are judged by
        # their whole latency against it, not by this stage's against its share
        self.flow_slo_s: float | None = None
        self._judged_at = -math.inf
        self._judged_counts = (0, 0)  # (arrived, shed) then
        self._decision = self._initial_decision()
        self.ledger = StageLedger(policy.percentile, lanes)
        self.ledger.slack = (policy.slo_ms or 0.0) / 1e3  # as the workers' plan has it
        self._ledger_basis: tuple | None = None  # what the ledger was last told
        self._rated_at = -math.inf  # when the ledger was last told the arrival rate
        self._rated_count = 0  # ... and `arrived` then

    # --- runtime hooks -------------------------------------------------------------

    def on_arrival(self, now: float, before: float = 0.0) -> None:
        """A request offered to the stage at `now`, which spent `before` seconds of its
        latency before (an HTTP request unread in its socket)."""
        with self._lock:
            self.arrivals.record(now, before)
            self.arrived += 1
            self._pending.append(now)

    def on_batch_done(
        self,
        size: int,
        service_s: float,
        now: float,
        latencies_s: Sequence[float] | None = None,
        worker: int | None = None,
        rows: int | None = None,
    ) -> None:
        """A batch of `size` requests (`rows` rows; None: one each) finished at `now`
        after `service_s` in the model. With
        `latencies_s` (each request's measured latency, as the runtime reports it),
        those are recorded; without, they are inferred from the arrivals, oldest
        first (exact only while no request is dropped on the way). With `worker`, the
        admission ledger learns when that worker's call ended (for a stage whose
        requests' ends the driver does not see itself: see `finished`)."""
        rows = size if rows is None else rows
        self.on_batches_done([(size, service_s, now, latencies_s, rows)], worker)

    def on_batches_done(
        self,
        batches: Sequence[tuple[int, float, float, Sequence[float] | None, int]],
        worker: int | None = None,
    ) -> None:
        """`on_batch_done` for each of `batches` (size, service_s, now, latencies_s,
        rows), in order (a worker's report): the profile judges a refit once, after the
        last. Service times are learned by rows: a call of one request of 64 rows taken
        for a call of 1 made every one-row request seem 64 rows' work, and refused."""
        with self._lock:
            self.profile.observe_all((rows, seconds, now) for _, seconds, now, _, rows in batches)
            slo_s = self.policy.slo_ms / 1e3 if self.policy.slo_ms else math.inf
            for size, _, now, latencies_s, rows in batches:
                if latencies_s and not self._whole:
                    self._answered.extend((now, latency) for latency in latencies_s)
                if size and worker is not None:
                    sent = now - max(latencies_s) if latencies_s else -math.inf
                    self.ledger.observed(worker, size, now, sent, rows)
                popped = [self._pending.popleft() for _ in range(min(size, len(self._pending)))]
                if latencies_s is None:
                    latencies_s = [now - arrived for arrived in popped]
                for latency in latencies_s:
                    self._latencies.append(latency)
                    self._recent.append(latency)
                    if latency > slo_s:
                        self.late += 1

    def admit(
        self,
        now: float,
        rid: int,
        workers: Sequence[int],
        worker: int | None = None,
    ) -> bool:
        """Whether to accept request `rid`, just reported by `on_arrival`: False only
        with an SLO, `on_overload="shed"`, and a predicted latency past the SLO on
        `worker` (where the router will send it; None: the first of the stage's
        `workers` to free), from the calls queued there (see `admission`). Admitted
        requests are entered in the ledger."""
        return self.admit_at(now, rid, workers, worker) is not None

    def admit_at(
        self,
        now: float,
        rid: int,
        workers: Sequence[int],
        worker: int | None = None,
        arrives: float | None = None,
        budget_s: float | None = None,
        rows: int = 1,
        spill: Sequence[int] = (),
    ) -> float | None:
        """`admit` for a request that reaches the stage at `arrives` (after the
        stages before it), not now, and may take `budget_s` from then (its share of
        a flow's SLO left to it: see `ControlPlane._admit`) instead of the stage's
        SLO, with `rows` rows: None when refused, else when its output is expected to
        leave the stage (with the typical overhead). `spill`: workers past the plan's
        where it may go when none of `workers` serves it in time."""
        if not self.policy.adaptive:
            return now if arrives is None else arrives
        with self._lock:
            self._sync_ledger(now)
            serve = self.policy.on_overload == "serve"
            slo_s = self._admit_slo_s(budget_s)
            verdict = self.ledger.admit(
                rid, now, slo_s, workers, worker, serve, arrives, rows, spill
            )
            if verdict.admit:
                if len(self._admitted) >= ADMITTED_KEPT:
                    del self._admitted[next(iter(self._admitted))]
                self._admitted[rid] = now
                return verdict.leaves
            if serve:
                self.late_predicted += 1
                return verdict.leaves
            self._shed()
            return None

    def refuses_rows(self, rows: int, budget_s: float | None = None) -> bool:
        """Whether a request of `rows` rows is refused for them alone, whatever the
        queue (counted as a refusal; then not `admit_at`): a call of that many rows
        outlasts the SLO (or `budget_s`, see `admit_at`) by the fitted curve. The
        stage's calls are planned and predicted in requests (of a row each,
        typically), so a request of many rows is judged as one: admitted, one of
        5,000 rows held a worker of a 30 ms stage (4 + 1 ms per row) 5 s. Only with
        `on_overload="shed"`, and once the curve is fitted."""
        if rows < 2 or self.policy.on_overload != "shed" or not self.profile.ready:
            return False
        with self._lock:
            if self.profile(np.array([rows]))[0] <= self._admit_slo_s(budget_s):
                return False
            self._shed()
            return True

    def _admit_slo_s(self, budget_s: float | None) -> float:
        """What admission plans a request's latency against (see `admit_at`)."""
        return (self.policy.slo_ms / 1e3 if budget_s is None else budget_s) * self.admit_scale

    def _shed(self) -> None:
        self.shed += 1
        if self._pending:
            self._pending.pop()  # it will never finish

    def first_free(self, workers: Sequence[int], now: float) -> int | None:
        """Of `workers`, the one expected to be through its queued calls first, where
        a batch opened now would start soonest (`StageLedger.first_free`); None under
        overload, where admission places requests itself (by where a call fills), and
        the router's pick by outstanding requests served more (4 + 1 ms per row, SLO
        15 ms, 3x, simulated: goodput 751-776/s placed by this, over 800 by that)."""
        if not self.policy.adaptive or self._overloaded(now):
            return None
        with self._lock:
            return self.ledger.first_free(workers, now)

    def _overloaded(self, now: float) -> bool:
        """Admission found more arriving than the workers serve in the last
        ADMIT_WINDOW_S (`StageLedger.overloaded_at`: a float read, no lock)."""
        return self.ledger.overloaded_at >= now - ADMIT_WINDOW_S

    def placed(self, rid: int, worker: int) -> int:
        """The worker admitted request `rid` is to run on: `worker` (the router's
        pick, as given to `admit`), unless admission entered it on another (under
        overload it places requests where a call is filling: see `admission`)."""
        with self._lock:
            placed = self.ledger.worker_of(rid)
        return worker if placed is None else placed

    def refuses_outright(self, now: float) -> bool:
        """Whether an arrival now is refused without a prediction of its own: the
        last refusal showed that no worker can take one in time before a later
        moment, unless a call ends or the plan changes first (`StageLedger.closed`).
        Counted as an arrival and a refusal; then neither `on_arrival` nor `admit`."""
        if not self.policy.adaptive or self.policy.on_overload != "shed":
            return False
        if not self.ledger.closed(now):  # a float read: no lock on the common path
            return False
        with self._lock:
            if not self.ledger.closed(now):
                return False
            self._refused(now)
        return True

    def awaits_timing(self, now: float, workers: Sequence[int], hold: Callable[[], None]) -> bool:
        """Whether an arrival now, to be placed on one of `workers`, had better wait
        for the stage's first timed call than be judged: admission would refuse it
        for want of a timing (see `StageLedger.awaits_timing`), not for a predicted
        miss; neither counted nor entered. Then `hold()` is called, under the lock
        the stage's calls and ends are learned under. Only with `on_overload="shed"`."""
        if self.timed:
            return False
        with self._lock:
            self._sync_ledger(now)
            if not self.ledger.awaits_timing(now, workers):
                return False
            hold()
            return True

    @property
    def timed(self) -> bool:
        """Whether admission judges arrivals by timed calls (or never waits for one:
        see `awaits_timing`): a float read, no lock on the common path."""
        return not self.policy.adaptive or self.policy.on_overload != "shed" or self.ledger.timed

    def refused_waiting(self, now: float) -> None:
        """An arrival that waited for a first timed call (`awaits_timing`) for longer
        than its SLO was refused: counted as an arrival and a refusal."""
        with self._lock:
            self._refused(now)

    def _refused(self, now: float) -> None:
        self.arrivals.record(now)
        self.arrived += 1
        self.shed += 1

    def routed(self, rid: int, worker: int, now: float) -> None:
        """The router sent admitted request `rid` to `worker`."""
        with self._lock:
            self.ledger.routed(rid, worker, now)

    def finished(
        self, rid: int, now: float, ok: bool = True, passed: bool = False, call: object = None
    ) -> None:
        """Admitted request `rid` ended at `now`; `ok`: it ran (its result came back),
        so its call's end is observed (for a stage whose output is the flow's, the
        driver sees that end itself, without waiting for the worker's report);
        `passed`: it was answered by later stages, so its call here had ended;
        `call`: which call of its worker it ran in, when known (when it began)."""
        with self._lock:
            self.ledger.finished(rid, now, ok, passed, call)
            admitted = self._admitted.pop(rid, None)
            if admitted is not None and ok and (call is not None or self.flow_slo_s):
                if not self._whole:
                    self._whole, self._answered = True, []
                self._answered.append((now, now - admitted))
            if now - self._judged_at >= ADMIT_CHECK_S:
                self._judge_admission(now)

    def loading(self, worker: int) -> None:
        """Worker `worker` is loading the stage (see `StageLedger.loading`)."""
        with self._lock:
            self.ledger.loading(worker)

    def forget(self, rid: int) -> None:
        """Admitted request `rid` will not run after all (another stage refused it)."""
        with self._lock:
            self.ledger.forget(rid)
            self._admitted.pop(rid, None)

    def _judge_admission(self, now: float) -> None:
        """Correct `admit_scale` from the latencies answered lately (see
        ADMIT_CHECK_S); every ADMIT_CHECK_S."""
        arrived, shed = self._judged_counts
        refused = self.shed - shed
        shedding = refused > 0 and refused >= ADMIT_SHEDDING * (self.arrived - arrived)
        # more arrive than the workers serve, or than the plan serves within the SLO
        # (bursts count); a feasible plan's is the rate it was planned for
        capacity = self._decision.capacity_rps
        peak = float(self._fitted.phase_rates.max()) if self._fitted is not None else 0.0
        overloaded = self._overloaded(now) or (
            capacity is not None and max(self.ledger.rate, peak) > capacity
        )
        shedding = shedding and overloaded
        self._judged_at, self._judged_counts = now, (self.arrived, self.shed)
        if not shedding:
            self.admit_scale, self._answered = 1.0, []
            return
        self._answered = [(end, x) for end, x in self._answered if end >= now - ADMIT_WINDOW_S]
        if len(self._answered) < ADMIT_MIN:
            return
        answered, self._answered = self._answered, []  # each overshoot corrected once
        target = (self.flow_slo_s or self.policy.slo_ms / 1e3) * (1.0 - self._margin(now))
        measured = float(np.quantile([x for _, x in answered], self.policy.percentile))
        if measured > target:
            scale = self.admit_scale * max(ADMIT_STEP, target / measured)
            self.admit_scale = max(ADMIT_TIGHTEST, scale)
        elif measured < ADMIT_RELAX_BELOW * target:
            room = min(ADMIT_RELAX, ADMIT_RELAX_BELOW * target / max(measured, 1e-9))
            self.admit_scale = min(1.0, self.admit_scale * room)

    def _margin(self, now: float) -> float:
        """The share of the SLO `_judge_admission` holds the percentile below it (see
        ADMIT_MARGIN): ADMIT_COST over the fixed share of the typical call's time; none
        unless more arrived than the stage serves within the latencies judged (bursts
        of an MMPP: its lulls alone would lose the margin). Below that, admission
        refuses in spells only, and a plan's p99 may run close to the SLO: a target
        under it kept the loop tightening, and refusing, once a spell had started it
        (two flows of 4 + 1 ms per row sharing 2 workers, SLO 25 ms, 300/s each: 4%
        refused; none with the margin so confined)."""
        n = self.ledger.call_size()
        overloaded = self._overloaded(now)
        if n < 2 or not self.profile.ready or not overloaded:
            return 0.0
        shorter, typical = (float(s) for s in self.profile.predict(np.array([n - 1, n])))
        fixed = 1.0 - n * (typical - shorter) / max(typical, 1e-9)
        return min(ADMIT_MARGIN, ADMIT_COST / max(fixed, 1e-9))

    def _sync_ledger(self, now: float) -> None:
        """Tell the ledger the batching in force and the service times (when changed),
        and the arrival rate now (every RATE_EVERY_S)."""
        d = self._decision
        # before the first fit, the service times are a single size's extrapolated,
        # and move with each call: the first call's alone (a slow one: 27 ms of a
        # 15 ms stage, in the simulator; a model's first call, 0.2 s) stood for as long
        # as one size ran, and admission refused half of a half load for seconds
        p = self.profile
        basis = (d.max_size, d.timeout_s, p.refits, p.ready or p.seen)
        since = self.arrived - self._rated_count
        if now - self._rated_at >= RATE_EVERY_S:
            self._rated_at, self._rated_count = now, self.arrived
            self.ledger.arriving(self.arrivals.recent_rate(now, RATE_ARRIVALS))
        elif (
            now - self._rated_at >= RATE_SURGE_S
            and since >= max(RATE_SURGE_MIN, RATE_SURGE * self.ledger.rate * (now - self._rated_at))
            and (not self._clumps or since > d.workers * _merged(d.max_size, self.policy))
        ):
            self.ledger.arriving(since / (now - self._rated_at))
            self._rated_at, self._rated_count = now, self.arrived
        if basis == self._ledger_basis:
            return
        self._ledger_basis = basis
        merge = _merged(d.max_size, self.policy)
        service = self.profile.predict(np.arange(merge + 2))
        service[0] = 0.0
        per_row = service[-1] - service[-2]  # past the sizes planned for (a request of rows)
        self.ledger.plan(d.max_size, d.timeout_s, merge, service[:-1], self.ledger.rate, per_row)

    def decision(self, now: float) -> Decision:
        with self._lock:
            if not self.policy.adaptive:
                return self._decision
            # until a first plan (warm-up), one as soon as the arrivals and the service
            # times allow: the warm-up plan (small, merged batches) served 200/s at
            # 20 + 5 ms per row, 0.75 of 2 workers' capacity, and refused 12% of
            # the arrivals of the second second while the first plan waited 2 s
            every = self.replan_s if self._fitted is not None else SHIFT_CHECK_S
            due = now - self._planned_at >= every
            check = self._fitted is not None and (
                due or now - self._shift_checked_at >= SHIFT_CHECK_S
            )
            if not due and not check:
                return self._decision
            if check:
                self._shift_checked_at = now
                # the service times the plan rests on moved (a slow spell began or
                # ended): re-plan now, not at the next period
                due = due or self._service_moved()
            window, planned_for = self.arrivals.snapshot(now), self._fitted
            clumps, changed_at = self._clumps, self._changed_at
        # Arrivals are fitted on a copy, outside the lock: a fit takes a core for tens
        # of milliseconds, and every arrival and every result needs the lock. The
        # arrivals before the rate last stepped up are another process, left out:
        # fitted with them (a deployment's first requests, sent while its model
        # loaded, then seconds of quiet), a steady 330/s read 130/s and rose by a tenth
        # or more at every periodic re-plan for the 30 s of the window, each a new
        # search (MiniLM on 2 workers, SLO 58 ms: a search every 2 s, each on idle CPU
        # but slowing the workers' calls beside it, median 18 -> 22 ms, p99 23 -> 33:
        # the late answers of that cell came in those spells); and in the shift check
        # the last 2 s, holding the quiet before the step, read as a step down (3 more
        # searches in the step's first second).
        current = window.snapshot(now, changed_at, MIN_ARRIVALS_TO_PLAN)
        shifted = planned_for is not None and current.rate_shift(now, planned_for, SHIFT_WINDOW_S)
        if shifted:
            log.info("arrival rate shift detected: re-planning")
            # A step down brings all the window back: the quiet may be a lull between
            # bursts (2 s at 500/s, 2 s of silence: fitted to the bursts alone, every
            # lull read as a shift, 5 a second), and a plan for the busier rate is safe.
            up = current.rate(now, STEP_S) > planned_for.rate
            changed_at = window.change_point(now, SHIFT_WINDOW_S) if up else -math.inf
            current = window.snapshot(now, changed_at, MIN_ARRIVALS_TO_PLAN)
        elif not due and (clumps or not current.clumped(now, TRACE_S)[0]):
            # (arrivals seen to come in clumps since the plan: re-planned now, not at
            # the next period; `hey -c 10 -q 10` on a fresh stage, 4 + 1 ms per row,
            # SLO 15 ms: 40-60% of its bursts of 10 refused for 2 s)
            return self._decision
        fitted, trace = None, ((), ())
        if len(current) >= MIN_ARRIVALS_TO_PLAN:
            # A periodic re-plan's fit goes to `fitter` (another process, below the
            # workers' priority); a first plan's, or a shift's, is wanted at once.
            periodic = planned_for is not None and not shifted
            fitter = self._fitter if periodic and self._fitter else fit_arrivals
            fitted = fitter(current, now, shifted)
            trace = current.clumped(now, TRACE_S)
        with self._lock:
            self._changed_at = changed_at
            if shifted:
                self._recent = []  # the old plan's latencies say nothing of the model
            work = self._start_plan(now, shifted, window, fitted, trace)
        if work is not None:  # the search runs outside the lock: admissions go on
            key, fitted, profile, space = work
            found = self._searcher(space, fitted, profile)
            if not self._keeps(found) and space.max_workers < self.max_workers:
                space = dataclasses.replace(space, max_workers=self.max_workers)
                found = self._searcher(space, fitted, profile)
            with self._lock:
                if len(self._cache) > 256:
                    self._cache.clear()
                self._cache[key] = self._decision = found
                self._basis = self._basis_of(fitted)
                self.plans += 1
            log.debug("plan for %s: %s", fitted.describe(), found)
        return self._decision

    def _keeps(self, found: Decision) -> bool:
        """Whether a plan on the workers `confine` leaves will do: one feasible at the
        planning target, or predicted within the SLO itself."""
        if found.feasible:
            return True
        return found.predicted_ms is not None and found.predicted_ms <= self.policy.slo_ms

    def idle_for(self, now: float) -> float:
        """Seconds since the last arrival (inf: none yet)."""
        with self._lock:
            last = self.arrivals.last
        return math.inf if last is None else now - last

    def confine(self, workers: int | None) -> None:
        """Plan on at most `workers` workers (None: all) when a plan on that many is
        feasible, or predicted within the SLO itself short of the planning target's
        headroom (admission refuses what would miss it); re-plan at the next call when
        that changes. Within the SLO, not the target: a flow of 20 + 5 ms per row,
        SLO 200 ms, at 110-140/s, whose plan on 1 of 2 workers missed the target, went
        back to both, and the flow of 1 + 0.2 ms per row, SLO 5 ms, next to it answered
        0.56-0.94 in time; held to one, 0.74-1.0 (12 of 16 runs 0.94-1.0), and the
        slow flow 0.96-1.0 (2-3% refused at 140/s)."""
        with self._lock:
            if workers != self.confined_to:
                self.confined_to = workers
                self._planned_at = -math.inf

    def single_s(self) -> float | None:
        """How long a call of one request takes (None: not known yet)."""
        with self._lock:
            if not self.policy.adaptive or not self.profile.ready:
                return None
            return float(self.profile.predict(np.array([1]))[0])

    def retarget(self, slo_ms: float) -> None:
        """Adopt a new SLO (a flow-level budget re-split) and re-plan at the next call."""
        with self._lock:
            self.policy = dataclasses.replace(self.policy, slo_ms=slo_ms)
            self._planned_at = -math.inf
            self._cache.clear()
            self._basis = None

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            d = self._decision
            measured = (
                float(np.quantile(np.fromiter(self._latencies, float), self.policy.percentile))
                * 1e3
                if self._latencies
                else None
            )
            last = self.arrivals.times(self.arrivals._times[-1]) if len(self.arrivals) else None
            rate = (
                len(last) / max(last[-1] - last[0], 1e-9)
                if last is not None and len(last) > 1
                else 0.0
            )
            return {
                "batch_size": d.max_size,
                "timeout_ms": d.timeout_ms,
                "workers": d.workers,
                "spare_workers": d.spare,
                "arrival_rate": rate,
                "arrivals": self._fitted.describe() if self._fitted else None,
                "planned_rate": self._fitted.rate if self._fitted else None,
                "predicted_p_ms": d.predicted_ms,
                "measured_p_ms": measured,
                "percentile": self.policy.percentile,
                "slo_ms": self.policy.slo_ms,
                "feasible": d.feasible,
                "cost_ms": d.cost_ms,
                "clumps": self._clumps,  # arrivals a clump held, as last planned (0: none)
                "service_ms": (
                    {
                        "a": self.profile.a * 1e3,
                        "b": self.profile.b * 1e3,
                        "c": self.profile.c * 1e3,
                    }
                    if self.profile.ready
                    else None
                ),
                "overhead_ms": {  # the runtime's own, measured by the admission ledger
                    "median": self.ledger.overhead()[0] * 1e3,
                    "percentile": self.ledger.overhead()[1] * 1e3,
                },
                "shed": self.shed,
                "late": self.late,
                "late_predicted": self.late_predicted,
                "plans": self.plans,
                "target_scale": self.target_scale,
                "admit_scale": self.admit_scale,
            }

    # --- planning --------------------------------------------------------------------

    def _initial_decision(self) -> Decision:
        if not self.policy.adaptive:
            return Decision(
                self.policy.size, (self.policy.timeout_ms or 0.0) / 1e3, self.max_workers
            )
        return self._warmup_decision()

    def _warmup_decision(self) -> Decision:
        # Explore: the next untried size of the ladder, a modest wait so batches vary,
        # on the workers the pool holds anyway (a request queued behind the first cold
        # start is no reason to start another worker; the first plan comes in seconds).
        # Under a backlog (an overload) a worker runs BACKLOG_MERGE planned batches as
        # one call, so a size whose merged calls the profile has seen teaches it
        # nothing: at 3x, a planned 2 ran only as calls of 4, the profile never had
        # two sizes to fit, and this plan stood for good (20 + 5b ms, SLO 125 ms:
        # 0.6 of the goodput). Ladder sizes merge into ladder sizes. Size 1 is planned
        # as 2 (with the wait, calls of 1 and 2), so it is no new size once 2 was seen:
        # requests that fill each batch of 2 within the wait (2 + 0.5 ms per row, SLO
        # 1 s, 100/s) ran only calls of 2 while the plan for the untried 1 stood.
        untried = self.profile.explore_sizes()
        planned = [max(s, 2) if self._cap > 1 else s for s in untried]
        new = [s for s in planned if s in untried]
        fresh = [s for s in new if min(BACKLOG_MERGE * s, self._cap) in untried]
        size = (fresh or new or planned or [self._cap])[0]
        wait = min(self.policy.slo_ms / 1e3 * 0.2, WARMUP_WAIT_S)
        if self.policy.timeout_ms is not None:
            wait = min(wait, self.policy.timeout_ms / 1e3)
        workers = max(1, min(self.held_workers, self.max_workers))
        return Decision(size, wait, workers, feasible=True)

    def _correct(self, now: float, since: float, window: ArrivalLog) -> None:
        """Adjust `target_scale` from the percentile measured since the last plan (at
        `since`); `window`: the arrivals."""
        recent, self._recent = self._recent, []
        if len(recent) < MIN_FOR_CORRECTION:
            self._recent = recent  # keep collecting
            return
        slo_s = self.policy.slo_ms / 1e3
        measured = float(np.quantile(recent, self.policy.percentile))
        # An overshoot is a model error only when the plan's premises held: it was
        # predicted feasible, no more arrived than the process it was planned for
        # produces (a rate it did not plan for, or an overload, is no model error),
        # and the calls ran as long as planned: a slow spell of a shared machine
        # (the admission ledger's residuals rose in a spell) passes, and a target
        # tightened for it would stay tight long after it, refusing in vain.
        planned_for = self._fitted.phase_rates.max() if self._fitted is not None else math.inf
        spell = self.ledger.spell_excess() > PREMISE_SPELL * slo_s
        premises = (
            self._decision.predicted_ms is not None  # a plan, not warm-up exploration
            and self._decision.feasible
            and not spell
            and window.rate(now, now - since) <= PREMISE_RATE_SLACK * planned_for
        )
        if measured > slo_s and premises:
            shrink = max(MOST_TIGHTEN, TIGHTEN_MARGIN * slo_s / measured)  # past the overshoot
            self.target_scale = max(MIN_TARGET_SCALE, self.target_scale * shrink)
        elif measured < RELAX_BELOW * slo_s:
            self.target_scale = min(MAX_TARGET_SCALE, self.target_scale * RELAX_STEP)

    @property
    def _planned_on(self) -> int:
        """The most workers a plan searches (see `confine`)."""
        return min(self.max_workers, self.confined_to or self.max_workers)

    @property
    def _slo_s(self) -> float:
        """The SLO the search plans against (seconds)."""
        return self.policy.slo_ms / 1e3 * self.target_scale

    def _start_plan(
        self,
        now: float,
        shifted: bool,
        window: ArrivalLog,
        fitted: MAP | None,
        trace: Trace = ((), ()),
    ) -> tuple[tuple, MAP, ServiceProfile, SearchSpace] | None:
        """Under the lock: correct the target and, given the arrival process `fitted` to
        `window` (`shifted`: the rate has left the planned process; `trace`: its
        arrivals, when they come in clumps), either settle the decision (warm-up,
        cached plan) or return what a search needs."""
        since, self._planned_at = self._planned_at, now
        self._shift_checked_at = now
        self._correct(now, since, window)
        if fitted is None or not self.profile.ready:
            self._decision = self._warmup_decision()
            self._basis = None
            return None
        self._clumps = _clump_size(trace[0])
        if (
            not shifted
            and self._basis is not None
            and np.allclose(self._basis_of(fitted), self._basis, rtol=REPLAN_CHANGE, atol=0.0)
        ):
            # Nothing material changed since the plan was made: keep it. A search takes
            # a core for a fraction of a second, from a machine whose workers need it.
            return None
        self._fitted = fitted
        space = self.space(trace)
        if fitted.rate >= space.ceiling(self.profile) and self.confined_to is not None:
            space = dataclasses.replace(space, max_workers=self.max_workers)  # see `confine`
        if fitted.rate >= space.ceiling(self.profile):
            # More arrive than all workers can serve at any batch size that runs within
            # the SLO: no search would find a feasible plan (it would take a core for
            # up to a second, seconds at low priority on a busy machine, while the
            # warm-up plan served the overload). Admission refuses the excess.
            self._decision = space.overload(fitted, self.profile)
            self._basis = self._basis_of(fitted)
            return None
        key = (
            _rounded(fitted.d0.ravel()),
            _rounded(fitted.d1.ravel()),
            _rounded([self.profile.a, self.profile.b, self.profile.c, self.target_scale]),
            _rounded(space.overhead[OVERHEAD_POINTS // 2 :: OVERHEAD_POINTS // 4]),
            space.max_workers,
            self._clumps,
        )
        if key in self._cache:
            self._decision = self._cache[key]
            self._basis = self._basis_of(fitted)
            return None
        return key, fitted, copy.deepcopy(self.profile), space

    def _basis_of(self, fitted: MAP) -> np.ndarray:
        """What a plan rests on: the arrival rate (mean and peak phase), the service
        times of one request and of the planned batch, the planning target, the
        workers, and the runtime overhead's tail (one plus its top quantile as a share
        of the SLO, 0 while unmeasured: a first plan is made without it, and the
        overload plan's timeout rests on it), and the arrivals' mean clump (0: none)."""
        service = self.profile.predict(np.array([1, self._decision.max_size]))
        points = self._overhead_points()
        tail = 1.0 + points[-1] / self._slo_s if points else 0.0
        planned = [fitted.rate, fitted.phase_rates.max(), *service, self.target_scale]
        return np.array([*planned, self._planned_on, tail, self._clumps])

    def _service_moved(self) -> bool:
        """Whether the service times of one request or of the planned batch moved by
        more than `SERVICE_SHIFT` since the plan was made."""
        if self._basis is None:
            return False
        now = self.profile.predict(np.array([1, self._decision.max_size]))
        then = self._basis[2:4]
        return bool(np.any(np.abs(now - then) > SERVICE_SHIFT * np.maximum(then, 1e-9)))

    def space(self, trace: Trace = ((), ())) -> SearchSpace:
        """What a plan searches now (the planning target as it stands); `trace`: the
        arrivals, when they come in clumps, and what each spent before (see
        `SearchSpace.trace`)."""
        return SearchSpace(
            self.policy,
            self._slo_s,
            self._cap,
            self._planned_on,
            self.held_workers,
            self.idle_price,
            self.grid,
            self._overhead_points(),
            self.ledger.rate,
            *trace,
        )

    def _overhead_points(self) -> tuple[float, ...]:
        """The admission ledger's residuals as `OVERHEAD_POINTS` quantiles (none until
        it has enough to say)."""
        residuals = self.ledger.residuals()
        if len(residuals) < 4 * OVERHEAD_POINTS:
            return ()
        points = np.quantile(residuals, (np.arange(OVERHEAD_POINTS) + 0.5) / OVERHEAD_POINTS)
        return tuple(round(float(p), 5) for p in points)


@dataclass(frozen=True)
class SearchSpace:
    """One plan's search: configurations of at most `cap` requests per batch and
    `max_workers` workers, judged against `slo_s` (the SLO planned against) and priced
    as `BatchingController` describes. Plain data, so that a runtime can run the
    search in another process (it is CPU-bound Python for up to a second)."""

    policy: Batching
    slo_s: float
    cap: int
    max_workers: int
    held_workers: int
    idle_price: float
    grid: int
    overhead: tuple[float, ...] = ()  # measured runtime overhead, seconds (quantiles)
    recent_rps: float = 0.0  # the latest arrivals' rate, as admission takes it (0: unknown)
    trace: tuple[float, ...] = ()  # arrival times that come in clumps (`ArrivalLog.clumped`)
    before: tuple[float, ...] = ()  # ... and what each spent before, in its latency

    def candidates(self, service: ServiceProfile) -> list[tuple[int, float]]:
        """(batch size, timeout) pairs worth evaluating under the SLO."""
        slo_s = self.slo_s
        cap_t = self.longest_wait
        one = float(service.predict(np.array([1]))[0])
        pairs = []
        for size in sorted({s for s in SIZE_LADDER if s <= self.cap} | {self.cap}):
            if float(service.predict(np.array([size]))[0]) >= slo_s:
                continue
            if size & (size - 1) == 0 or size == self.cap:
                # greedy (what is queued, no waiting): its law is simulated, and changes
                # little with the size (calls grow with the queue), so every other size
                pairs.append((size, 0.0))
            for share in TIMEOUT_SHARES[1:]:
                timeout = min(share * slo_s, cap_t)
                if size == 1 or timeout <= 0 or timeout + one >= slo_s:
                    continue
                pairs.append((size, timeout))
        return sorted(set(pairs))

    @property
    def longest_wait(self) -> float:
        """The longest timeout a plan may have (seconds): see MAX_WAIT_S."""
        return self.policy.timeout_ms / 1e3 if self.policy.timeout_ms is not None else MAX_WAIT_S

    def merge(self, size: int) -> int:
        """The most requests a worker runs in one call under batch size `size`: two
        batches when more than one waits (`BatchRule`), within the policy's cap."""
        return _merged(size, self.policy)

    def ceiling(self, service: ServiceProfile) -> float:
        """The most requests per second all workers serve with batches whose call
        fits in the SLO (busy all the time): no plan is feasible at a higher rate."""
        sizes = np.arange(1, self.cap + 1)
        times = np.asarray(service.predict(sizes), dtype=float)
        fits = times < self.slo_s
        if not fits.any():
            return 0.0
        return float(self.max_workers * (sizes[fits] / times[fits]).max())

    def search(self, arrivals: MAP, service: ServiceProfile) -> Decision:
        """The best configuration for `arrivals` and `service`."""
        slo_s = self.slo_s
        rate = arrivals.rate
        evaluated: list[tuple[Prediction, float, float]] = []  # (prediction, p_s, cost)
        per_phase = slow_switching(arrivals)
        pairs = self.candidates(service)
        # What the model does not hold: the measured spread of real calls around the
        # fitted service times and the runtime's own costs (the admission ledger's
        # residuals hold both), else the service spread alone.
        residuals = np.array(self.overhead) if self.overhead else service.residuals()
        # Their median is the runtime's own time per call (a worker sends a call's
        # results and takes the next one's inputs between calls: 0.2-0.5 ms at 1 +
        # 0.2 ms per row), which keeps the worker as its service does: queueing waits
        # for it, and plans of small calls pay it most (taken as noise alone, batches
        # of 6 with a 2.55 ms wait were predicted at 7 ms at 4,167/s and SLO 12 ms;
        # run as a fixed policy, p99 318 ms: the backlog grew while it ran).
        per_call = max(float(np.median(self.overhead)), 0.0) if self.overhead else 0.0
        occupied: Any = service
        if per_call:
            occupied, residuals = _Occupied(service, per_call), residuals - per_call
        noise = noise_points(residuals)[0] if residuals is not None else None
        # One matrix exponential per (batch size, process): all timeouts share its grid.
        processes = (
            [MAP.poisson(float(r)) if r > 0 else None for r in arrivals.phase_rates]
            if per_phase
            else [arrivals]
        )
        laws: dict[tuple[int, int, float], Any] = {}
        waiting = [(s, t) for s, t in pairs if t > 0]
        if waiting and not self.trace:
            step = max(t for _, t in waiting) / self.grid
            for size in sorted({s for s, _ in waiting}):
                timeouts = [t for s, t in waiting if s == size]
                for index, process in enumerate(processes):
                    if process is not None:
                        for t, law in buffer_laws(process, size, timeouts, step).items():
                            laws[index, size, t] = law
        # Greedy batching (no timeout) has no law in the buffer model: it is simulated,
        # on the same draws of the arrivals for every candidate. So are waiting plans
        # the model finds feasible under bursts that are short (not `per_phase`) but
        # outrun the plan's calls: its renewal approximation averages such bursts away
        # (MiniLM's curve, 2 workers, bursts of 893/s between 114/s, switching
        # 1.1/5.1 a second: batches of 24 within 42 ms predicted at a p99 of 96 ms,
        # simulated on 400,000 arrivals at 205 ms, as greedy ones, 195 ms).
        peak = float(arrivals.phase_rates.max())
        streams = greedy_streams(arrivals)
        # Arrivals in clumps the fitted process does not hold (`trace`; a clump outruns
        # calls planned for a Poisson stream at its mean rate, and fills a waiting
        # plan's batch at once): every plan is simulated on the arrivals themselves.
        clumps = None
        if self.trace:
            times = np.asarray(self.trace)
            rate, before = len(times) / max(float(times[-1]), 1e-9), np.asarray(self.before)
            clumps = [Stream(rate, 1.0, 1.0, times, before if len(before) else None)]
        unchecked: dict[int, int] = {}  # such plans (id of the prediction): their index

        def simulated(
            size: int, workers: int, timeout: float = 0.0, on: list[Stream] | None = None
        ) -> Prediction:
            return predict_simulated(
                on or streams,
                occupied,
                size,
                workers,
                timeout_s=timeout,
                merge=self.merge(size),
                noise=noise,
            )

        uncapped: set[int] = set()  # worker counts whose greedy calls stayed below the size
        for size, timeout in pairs:
            law, by_phase = None, None
            if timeout > 0 and clumps is None and per_phase:
                by_phase = {
                    i: laws[i, size, timeout] for i in range(len(processes)) if processes[i]
                }
            elif timeout > 0 and clumps is None:
                law = laws[0, size, timeout]
            for workers in range(1, self.max_workers + 1):
                if timeout == 0 or clumps is not None:
                    if timeout == 0 and workers in uncapped:
                        continue  # a larger size runs the very same calls: the same plan
                    pred = simulated(size, workers, timeout, on=clumps)
                    if timeout == 0 and not pred.batch_pmf[size - 1 :].any():
                        uncapped.add(workers)
                else:
                    pred = predict(
                        arrivals,
                        occupied,
                        size,
                        timeout,
                        workers,
                        law=law,
                        phase_laws=by_phase,
                        noise=noise,
                    )
                if not pred.stable or (timeout > 0 and pred.utilization >= 1.0):
                    continue
                entry = self._entry(pred, rate)
                evaluated.append(entry)
                outrun = peak * float(occupied(np.array([size]))[0]) >= workers * size
                if timeout > 0 and outrun and not (per_phase or clumps) and entry[1] <= slo_s:
                    unchecked[id(pred)] = len(evaluated) - 1
                elif entry[1] <= slo_s and workers >= self.held_workers:
                    break  # more workers only cost more for this (size, timeout)
        # The plan chosen, once its simulation (where the model is unchecked) agrees;
        # after CHECKS disagreements, none of the model's such plans is taken.
        checks = 0
        while feasible := [e for e in evaluated if e[1] <= slo_s]:
            best = self._pick(feasible)
            index = unchecked.pop(id(best[0]), None)
            pred = best[0]
            if index is None:
                busiest = peak * pred.busy_per_request_s / pred.workers
                spare = int(busiest > SPARE_AT and pred.workers < self.max_workers)
                return dataclasses.replace(_decision(best, True), spare=spare)
            if checks == CHECKS:
                for k in (index, *unchecked.values()):
                    evaluated[k] = (evaluated[k][0], math.inf, evaluated[k][2])
                unchecked.clear()
                continue
            checks += 1
            evaluated[index] = self._entry(
                simulated(pred.max_size, pred.workers, pred.timeout_s), rate
            )
        if clumps is not None:
            on_clumps = functools.partial(simulated, on=clumps)
            return self.best_on(evaluated, arrivals, service, on_clumps)
        return self.best_effort(evaluated, arrivals, service)

    def _entry(self, pred: Prediction, rate: float) -> tuple[Prediction, float, float]:
        """(prediction, its latency at the policy's percentile, its cost per request)."""
        busy = pred.busy_per_request_s
        idle = max(pred.workers - max(rate * busy, self.held_workers), 0.0)
        return pred, pred.percentile(self.policy.percentile), busy + self.idle_price * idle / rate

    def _pick(
        self, feasible: list[tuple[Prediction, float, float]]
    ) -> tuple[Prediction, float, float]:
        """The plan of `feasible` entries (`_entry`) the policy's objective prefers."""
        slo_s = self.slo_s
        cheapest = min(e[2] for e in feasible)
        if self.policy.objective == "cost":
            # Admission refuses each request predicted to miss, and its predictions
            # err by a few percent of the SLO: a plan predicted at the target leaves
            # it no room, and refuses what a plan with room would serve. So the
            # plans with room, unless they cost much more. Of those, the fastest of
            # the nearly cheapest: a little cost buys headroom (the cheapest plan
            # waits as long as the SLO allows, and noise then misses it).
            roomy = [e for e in feasible if e[1] <= ROOM * slo_s and e[2] <= ROOM_COST * cheapest]
            pool = roomy or feasible
            least = min(e[2] for e in pool)
            near = [e for e in pool if e[2] <= least * (1 + COST_TOLERANCE)]
            return min(near, key=lambda e: (e[1], e[2]))
        budget = self.policy.cost_budget_ms / 1e3 if self.policy.cost_budget_ms else 1.5 * cheapest
        within = [e for e in feasible if e[2] <= budget] or feasible
        return min(within, key=lambda e: (e[1], e[2]))

    def best_on(
        self,
        evaluated: list[tuple[Prediction, float, float]],
        arrivals: MAP,
        service: ServiceProfile,
        simulated: Callable[[int, int, float], Prediction],
    ) -> Decision:
        """`best_effort` for arrivals in clumps (`trace`): of the plans on all workers,
        and the overload plan, the one that answers the most requests within the SLO
        `simulated` on them (its `predicted_ms` as if all were served). Waiting plans
        too: a clump fills a batch at once. A clump too big for the SLO is the overload
        here, not the mean rate: bursts of 30 every 100 ms (300/s, 4 + 1 ms per row, 2
        workers, SLO 15 ms) want one call of 8 on each worker, the rest refused (53%
        answered); under the overload plan (calls of 2-3, made for a backlog at the
        mean rate) 29% were answered through `app.run` (15-19% over HTTP), under this
        one (calls of 8 within 1.3-1.9 ms) 39% (19-28%): admission keeps fewer than the
        plan's calls hold, a batch's later requests predicted in the call after it."""
        slo_s = self.policy.slo_ms / 1e3
        fallback = self.overload(arrivals, service)
        # the search simulated most of them on all workers already
        everyone = [p for p, *_ in evaluated if p.workers == self.max_workers]
        done = {(p.max_size, p.timeout_s): p for p in everyone}
        plans = {(e[0].max_size, e[0].timeout_s) for e in evaluated}
        plans.add((fallback.max_size, fallback.timeout_s))
        best, most = fallback, 0.0  # none answers any in time (a backlog): the overload plan
        for size, timeout in sorted(plans):
            pred = done.get((size, timeout)) or simulated(size, self.max_workers, timeout)
            share = pred.latency.cdf(slo_s) if pred.latency is not None else 0.0
            if share > most:
                most, met = share, share >= self.policy.percentile  # met: no overload
                best = Decision(
                    size, timeout, self.max_workers, pred.percentile(self.policy.percentile) * 1e3,
                    False, capacity_rps=None if met else arrivals.rate * share,
                )  # fmt: skip
        return best

    def best_effort(
        self,
        evaluated: list[tuple[Prediction, float, float]],
        arrivals: MAP,
        service: ServiceProfile,
    ) -> Decision:
        """The plan when no candidate meets the SLO planned against: of the greedy
        ones the workers keep up with, the one predicted to answer the most requests
        within the SLO itself (admission refuses the rest), unless the overload plan
        is predicted to answer more. Planned with headroom for what the model does
        not see, a load can be infeasible on paper and yet served within the SLO by
        a plan that leaves it little room (say, greedy batches at a p99 of 0.9x the
        SLO): such a plan, not the overload plan, then refuses the fewest. Greedy
        only: admission predicts each request from the queue ahead of it, and under
        a plan with a timeout, a request that opens a batch waits all of it (the
        model's share in time counts the ones that fill it early): near the SLO,
        admission would refuse nearly every one that opens a batch.

        Where even the arrivals' peak phase is below what the overload plan serves
        within the SLO, the plan predicted fastest (of all), when that is within the
        SLO: the overload plan is made for more than its workers serve, and waits
        for calls to fill (MiniLM on 2 workers, SLO 56 ms, 330/s, half what they
        serve within it: its calls of 7 waited 13 ms, predicted p99 at the SLO,
        measured 1.12x it, where calls of 10 within 10 ms ran at 0.77x)."""
        fallback = self.overload(arrivals, service)
        if not fallback.capacity_rps:
            # not even one request waited for and run fits: noise and overhead take
            # the SLO, and no plan's share in time says more than its model's error
            return fallback
        slo_s = self.policy.slo_ms / 1e3
        if float(arrivals.phase_rates.max()) < fallback.capacity_rps:
            fastest = min(evaluated, key=lambda e: (e[1], e[2]), default=None)
            if fastest is not None and fastest[1] <= slo_s:
                return dataclasses.replace(
                    _decision(fastest, False), capacity_rps=fallback.capacity_rps
                )
        scored = [
            (e[0].latency.cdf(slo_s), -e[2], e)
            for e in evaluated
            if e[0].stable and e[0].timeout_s == 0
        ]
        if not scored:
            return fallback
        share, _, entry = max(scored, key=lambda x: x[:2])  # the most in time, then cheapest
        goodput = arrivals.rate * share
        if goodput <= min(arrivals.rate, fallback.capacity_rps):
            return fallback
        return dataclasses.replace(_decision(entry, False), capacity_rps=goodput)

    def overload(self, arrivals: MAP, service: ServiceProfile) -> Decision:
        """The plan when no configuration meets the SLO at the offered rate: admission
        then refuses the excess, and the plan serves as many requests within the SLO
        as it can (goodput). All workers; the largest batch size n a request can wait
        for and still meet the SLO (a request arriving as a call starts waits for it,
        then runs in the next: 2 x service(n) + overhead), which has the most
        throughput (k * n / service(n)) of those. The SLO itself, not the
        tighter target searches plan against (`target_scale`, a correction of the
        queueing model): admission holds each request to the SLO, and a smaller batch
        would only refuse more (20 + 5 ms/row, SLO 125 ms, 3x load: batches of 3
        against 5-7, goodput 0.71-0.89 against 0.95-1.0 of sustainable).

        Near capacity, a free worker often finds fewer than n queued, and a call
        started at once is short of them: the plan waits for them, up to
        OVERLOAD_WAIT of the room the SLO leaves a call's first request (the SLO less
        service(n) and the overhead's tail). Simulated, 2 workers, 3 seeds, share of
        the offered requests answered within the SLO: 4 + 1 ms per row, SLO 15 ms,
        700/s 0.91 -> 0.95, 867/s (1.07x the sustainable rate) 0.77 -> 0.83; 20 + 5
        ms per row, SLO 75 ms, 172/s 0.88 -> 0.91; 1 + 0.2 ms per row, SLO 6 ms,
        6,000/s 0.87 -> 0.88. Waiting all the room missed: openers came too close to
        the SLO, refused (4 + 1 ms per row, SLO 50 ms, 1,684/s: 0.95 -> 0.69).
        No wait where one more request a call adds less than FILL_GAIN to what a
        worker serves (SLO 10x, 4 + 1 and 20 + 5 ms per row, calls of 20-21, 1.05x
        the sustainable rate, in the runtime: goodput 0.92-0.97 of it with a wait,
        0.94-0.98 without; calls of 3 at SLO 3x: 17% more a request). Nor past the
        rate the workers' most efficient calls serve: admission then keeps only the
        requests that come just before a call starts (see `StageLedger._window`),
        and a wait would keep the worker idle for the rest (4 + 1 ms per row, SLO 50
        ms, 3x: goodput 0.35 of the offered, 0.30 waiting half the room). That rate
        is the fitted arrivals' peak phase (bursts count), or the latest arrivals'
        where lower: the fit holds 30 s, and after 4 s at 3x, 800/s was served with
        no wait for as long (630-669 answers in time a second, 668-696 with it)."""
        workers = self.max_workers
        slack = float(np.median(self.overhead)) if self.overhead else 0.0
        sizes = np.arange(1, self.cap + 1)
        times = np.asarray(service.predict(sizes), dtype=float)
        fits = 2 * times + slack <= self.policy.slo_ms / 1e3
        best = int(sizes[fits][-1]) if fits.any() else 1
        predicted = 2e3 * float(times[best - 1]) + slack * 1e3
        capacity = workers * best / float(times[best - 1]) if fits.any() else 0.0
        merged = sizes[: self.merge(best)]
        rates = merged / times[: len(merged)]  # one worker's requests per second, by call
        fuller = rates[best] / rates[best - 1] - 1.0 if best < len(rates) else 0.0
        wait = 0.0
        peak = float(arrivals.phase_rates.max())
        if self.recent_rps > 0:  # the fit holds an overload's phase long after it ended
            peak = min(peak, self.recent_rps)
        if fuller >= FILL_GAIN and peak <= workers * float(rates.max()):
            tail = np.quantile(self.overhead, self.policy.percentile) if self.overhead else 0.0
            wait = max(OVERLOAD_WAIT * (self.policy.slo_ms / 1e3 - times[best - 1] - tail), 0.0)
            wait = min(wait, self.longest_wait)
        return Decision(best, float(wait), workers, predicted, False, capacity_rps=capacity)


@dataclasses.dataclass(frozen=True)
class _Occupied:
    """A worker's time taken by a call of each size: its service time and the
    runtime's own time per call (see `SearchSpace.search`)."""

    service: ServiceProfile
    per_call_s: float

    def __call__(self, sizes: np.ndarray) -> np.ndarray:
        return self.service(sizes) + self.per_call_s


Searcher = Callable[[SearchSpace, MAP, ServiceProfile], Decision]
Fitter = Callable[[ArrivalLog, float, bool], MAP | None]


def fit_arrivals(window: ArrivalLog, now: float, shifted: bool) -> MAP | None:
    """The arrival process to plan for: fitted to the whole `window` (where a bursty
    one shows its bursts), or to the arrivals since the rate changed when it has left
    the planned process (`shifted`) or is far from what the window's process produces
    (a burst longer than it knows, or a new level)."""
    fitted = window.fit(now)
    if fitted is not None and (shifted or window.rate_shift(now, fitted, SHIFT_WINDOW_S)):
        # from the change on: arrivals before it would hold the estimate back
        since = window.change_point(now, SHIFT_WINDOW_S)
        return window.fit(now, now - since) or fitted
    return fitted


def search_here(space: SearchSpace, arrivals: MAP, service: ServiceProfile) -> Decision:
    """Run a search in this process, on one BLAS thread (the matrices are small, and
    the other cores serve requests)."""
    with threadpool_limits(1):
        return space.search(arrivals, service)


def _decision(entry: tuple[Prediction, float, float], feasible: bool) -> Decision:
    pred, p_s, cost = entry
    return Decision(
        pred.max_size, pred.timeout_s, pred.workers, float(p_s) * 1e3, feasible, float(cost) * 1e3
    )


def _merged(size: int, policy: Batching) -> int:
    """The most requests a worker runs in one call under batch size `size`: two
    batches when more than one waits (`BatchRule`), within `policy`'s cap."""
    merge = BACKLOG_MERGE * size
    if policy.max_size:
        merge = min(merge, policy.max_size)
    return max(merge, size)


def _clump_size(trace: tuple[float, ...]) -> float:
    """The mean number of arrivals a clump of `trace` holds, to 2 digits (0: none)."""
    if not trace:
        return 0.0
    gaps = np.diff(trace)
    clumps = 1 + int(np.count_nonzero(gaps >= CLUMP_SPLIT * float(gaps.mean())))
    return float(f"{len(trace) / clumps:.2g}")


def _rounded(values: Any) -> tuple[float, ...]:
    return tuple(float(f"{v:.2g}") for v in values)


def split_slo(slo_ms: float, stage_service_ms: dict[str, float]) -> dict[str, float]:
    """Split a flow's latency budget across the batching stages of its critical path,
    in proportion to their measured service times (equal shares when none is known)."""
    if not slo_ms > 0:
        raise ValueError(f"split_slo: slo_ms must be > 0, got {slo_ms!r}")
    if not stage_service_ms:
        return {}
    times = {name: max(float(ms), 0.0) for name, ms in stage_service_ms.items()}
    total = sum(times.values())
    if total <= 0:
        return {name: slo_ms / len(times) for name in times}
    return {name: slo_ms * ms / total for name, ms in times.items()}
