"""Service time as a function of batch size, learned online: `a + b * size + c * size**2`
(all >= 0: a fixed cost per call, a cost per request, and the growth a large batch
shows on a real model, e.g. a transformer's padding and cache misses).

Warm-up explores a ladder of batch sizes; then a least-squares fit, in relative
terms, to the median of the last observations of each batch size, refitted every few
batches (a line, and the curve only once enough sizes show it). Keeping every size
seen (not just the latest batches, which under a steady plan all have about one size
and fit no slope) keeps the slope known; when recent times drift away from the older
ones (from the curve fitted to those alone; e.g. other load on the machine), the older
ones are scaled by the drift before the refit. Observed with their times (`at`), the
recent ones are those of the last `RECENT_S` seconds (at least `RECENT_MIN`), and a
refit is due every `REFIT_S` too: when few calls run (an admission refusing most
arrivals through a slow spell), a count of calls would judge the drift seconds late,
and scale every older batch by a spell that is already over. When many run, a count
refits at most every `REFIT_MIN_S`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable

import numpy as np
from scipy.optimize import nnls

log = logging.getLogger(__name__)

RECENT = 32  # the latest observations, judged for drift ...
RECENT_S = 1.0  # ... of the last this many seconds (observed with their times) ...
RECENT_MIN = 8  # ... at least this many
REFIT_S = 0.5  # observed with their times: a refit at least this often ...
# ... and, by count, at most this often: a refit takes 0.3-2.5 ms of the driver's
# receiving thread, and a stage of 1 + 0.2 ms per row at 3,300 requests/s ran 900
# calls a second (56 refits by count: 6% of the time the driver held the GIL)
REFIT_MIN_S = 0.05
FULL_WEIGHT_AT = 8  # observations of a size that give it its full weight in the fit


class ServiceProfile:
    """Learned batch service time. `observe(size, seconds)` after each batch;
    `predict(sizes)` gives seconds (an array), `residuals()` the spread around it;
    `ready` once fitted from at least two distinct sizes, or from size 1 alone when
    `max_size` is 1 (before that, a single size is extrapolated as `size * t(1)`).
    `history`: observations kept per batch size."""

    def __init__(
        self,
        max_size: int = 64,
        history: int = 32,
        refit_every: int = 16,
        drift: float = 0.25,
        a: float | None = None,
        b: float | None = None,
        c: float = 0.0,
    ) -> None:
        if max_size < 1 or history < 8:
            raise ValueError("ServiceProfile: max_size must be >= 1 and history >= 8")
        self.max_size = max_size
        self._history = history
        self._by_size: dict[int, deque[tuple[int, float]]] = {}  # size -> (seq, seconds)
        self._seq = 0
        self._times: deque[float] = deque(maxlen=RECENT)  # when the latest were observed
        self._fitted_at = -np.inf
        self._refit_every = refit_every
        self._drift = drift
        self._since_fit = 0
        self.a, self.b, self.c = a, b, c
        self.refits = 0

    @property
    def ready(self) -> bool:
        return self.a is not None and self.b is not None

    def explore_sizes(self) -> list[int]:
        """Batch sizes still worth trying in warm-up: a ladder 1, 2, 4, ... up to
        `max_size` minus the sizes already observed."""
        ladder, size = [], 1
        while size < self.max_size:
            ladder.append(size)
            size *= 2
        ladder.append(self.max_size)
        return [size for size in ladder if size not in self._by_size]

    def observe(self, size: int, seconds: float, at: float | None = None) -> None:
        """A call of `size` requests took `seconds`; `at`: when it ended (any clock,
        seconds), which makes the drift judged over time (see the module docstring)."""
        self.observe_all([(size, seconds, at)])

    def observe_all(self, calls: Iterable[tuple[int, float, float | None]]) -> None:
        """`observe` each of `calls` (size, seconds, at), in order; a refit is judged
        once, after the last: a worker reports its calls every quarter second, and a
        report of a fast stage's 90 calls had taken 5 refits (4-5 ms of the driver's
        receiving thread, that held arrivals and results behind it)."""
        at = None
        observed = False
        for size, seconds, at in calls:
            if size < 1 or not np.isfinite(seconds) or seconds < 0:
                continue
            bucket = self._by_size.setdefault(int(size), deque(maxlen=self._history))
            bucket.append((self._seq, float(seconds)))
            self._seq += 1
            self._since_fit += 1
            if at is not None:
                self._times.append(at)
            observed = True
        if not observed:
            return
        since = None if at is None else at - self._fitted_at
        counted = self._since_fit >= self._refit_every and (since is None or since >= REFIT_MIN_S)
        if not self.ready or counted or (since is not None and since >= REFIT_S):
            self._refit()
            if at is not None:
                self._fitted_at = at

    def _recent(self) -> int:
        """How many of the latest observations are judged for drift."""
        if len(self._times) < RECENT:  # not all timed
            return RECENT
        newest = self._times[-1]
        timed = sum(1 for t in self._times if t >= newest - RECENT_S)
        return max(RECENT_MIN, timed)

    def _data(self) -> np.ndarray:
        """(size, seq, seconds) rows, oldest first."""
        flat = [x for size, obs in self._by_size.items() for seq, t in obs for x in (size, seq, t)]
        data = np.array(flat, dtype=float).reshape(-1, 3)  # flat: 3x faster than rows
        return data[np.argsort(data[:, 1], kind="stable")]

    def _refit(self) -> None:
        self._since_fit = 0
        data = self._data()
        if len(data) == 0:
            return
        sizes, times = data[:, 0], data[:, 2]
        if self.ready and len(data) >= 2 * RECENT:
            # judged against the older batches (their own fit), not the current fit:
            # that one bends to the recent batches, and once a slow spell's end showed
            # at one size only (calls of 1, under the overload plan the spell brought
            # about), it fitted them at 18 ms per row from 0 ms, against the spell's
            # larger batches, instead of seeing 66% less: the plan stayed an overload
            # one, refusing a third of a half load, as long as it ran
            recent = self._recent()
            older = _per_size(sizes[:-recent], times[:-recent])
            a, b, c = _fit(*older) if len(older[0]) >= 2 else (self.a, self.b, self.c)
            s = sizes[-recent:]
            predicted = a + b * s + c * s**2
            gap = np.median(times[-recent:] / np.maximum(predicted, 1e-9)) - 1.0
            if abs(gap) > self._drift:
                log.info("service time drifted by %+.0f%%: rescaling older batches", gap * 100)
                times[:-recent] *= 1.0 + gap
                self._by_size = {}
                for size, seq, t in zip(sizes.astype(int), data[:, 1].astype(int), times):
                    bucket = self._by_size.setdefault(int(size), deque(maxlen=self._history))
                    bucket.append((int(seq), float(t)))
        per_size = _per_size(sizes, times)  # `times` rescaled in place, if at all
        if len(per_size[0]) < min(2, self.max_size):  # with max_size 1, one size is all
            return
        self.a, self.b, self.c = _fit(*per_size)
        self.refits += 1

    def predict(self, sizes: np.ndarray) -> np.ndarray:
        sizes = np.asarray(sizes, dtype=float)
        if self.ready:
            return self.a + self.b * sizes + self.c * sizes**2
        if self._by_size:  # one size seen: assume no batching gain (pessimistic)
            per_item = np.median([t / s for s, obs in self._by_size.items() for _, t in obs])
            return per_item * sizes
        return np.zeros_like(sizes)

    def residuals(self, last: int = 256) -> np.ndarray | None:
        """How far the last `last` observed times fell from the fitted curve (seconds;
        None before the fit): the spread the model adds to its service times."""
        if not self.ready or not self._by_size:
            return None
        data = self._data()[-last:]
        return data[:, 2] - self.predict(data[:, 0])

    def __call__(self, sizes: np.ndarray) -> np.ndarray:
        return self.predict(sizes)

    @property
    def observations(self) -> int:
        """Observations kept (at most `history` per size)."""
        return sum(len(obs) for obs in self._by_size.values())

    @property
    def seen(self) -> int:
        """Observations ever made."""
        return self._seq


def _per_size(sizes: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, ...]:
    """The sizes among `sizes`, the median of the `times` of each, and its weight in
    the fit (the square root of how often it was seen, up to `FULL_WEIGHT_AT`).
    Sorted once, not a median per size: those took three quarters of a refit (0.4 of
    0.55 ms with 16 sizes seen)."""
    order = np.lexsort((times, sizes))
    sizes, times = sizes[order], times[order]
    seen, first, counts = np.unique(sizes, return_index=True, return_counts=True)
    medians = 0.5 * (times[first + (counts - 1) // 2] + times[first + counts // 2])
    weights = np.sqrt(np.minimum(counts, FULL_WEIGHT_AT))
    return seen, np.maximum(medians, 1e-9), weights


def _fit(sizes: np.ndarray, medians: np.ndarray, weights: np.ndarray) -> tuple[float, ...]:
    """(a, b, c) fitted to each size's median (robust to a stalled batch), in relative
    terms (a large batch's time counts as much as a small one's: it is the one a busy
    plan extrapolates to), a size seen a few times counting less than one seen often."""
    w = weights / medians

    def fit(terms: int) -> tuple[np.ndarray, float]:
        """Non-negative least squares (Lawson-Hanson: 8 us here, where scipy's
        bounded `lsq_linear` took 2 ms on the driver's receiving thread, every
        16 batches, and held up the results behind it): coefficients, cost."""
        design = sizes[:, None] ** np.arange(terms)
        coefficients, norm = nnls(design * w[:, None], medians * w)
        return coefficients, 0.5 * norm**2

    # A curve only where it fits enough better than a line to be believed: from a
    # few small sizes, a curvature is noise, and extrapolated it is a large error.
    best = fit(2)
    if len(sizes) >= 5:
        curve = fit(3)
        if _aicc(*curve, len(sizes)) < _aicc(*best, len(sizes)):
            best = curve
    return (*map(float, best[0]), 0.0)[:3]


def _aicc(coefficients: np.ndarray, cost: float, n: int) -> float:
    """The corrected Akaike information criterion of a least-squares fit with `cost`
    (half the squared residuals) to `n` points (lower is better; n > k + 1)."""
    k = len(coefficients)
    return n * np.log(max(2 * cost, 1e-300) / n) + 2 * k + 2 * k * (k + 1) / (n - k - 1)
