"""Arrival processes: a sliding-window log of arrival times and a Markovian arrival
process (MAP) fitted to it.

A MAP with `m` phases is a pair of `m x m` matrices: `d0` holds the rates of phase
changes without an arrival (its diagonal makes each row of `d0 + d1` sum to zero),
`d1` the rates of arrivals (and the phase they lead to). Poisson is the one-phase
MAP `d0 = [[-rate]]`, `d1 = [[rate]]`; a 2-state MMPP (bursty traffic switching
between a low and a high rate) has a diagonal `d1`.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from scipy.special import gammaln

log = logging.getLogger(__name__)

# Inter-arrival samples needed before fitting more than a Poisson process.
MIN_SAMPLES_FOR_MMPP = 200
MAX_LAG = 20
# The bursty fit counts arrivals in windows of about this many mean gaps.
COUNTS_PER_WINDOW = 8
MAX_WINDOWS = 600
SETTLED = 1e-3  # an EM round that moves no rate (relatively) or switch more: done
# Arrivals come in clumps a fit cannot see (see `ArrivalLog.clumped`) when at least this
# share of their gaps is under CLUMP_GAP of the mean gap (Poisson: 1 - exp(-0.1), 0.095;
# sent by one Python thread, Poisson and 2-state MMPP at 50-8,000/s, 0.10-0.29 in
# `benchmarks.batching_regimes`; `hey -c 10 -q 30` over HTTP, 0.78-0.89)
CLUMP_GAP = 0.1
# ... and a gap of at least CLUMP_SPLIT mean gaps parts two clumps (`hey -q`'s bursts of
# 10 every 33 ms, read by a server over 1-2 ms: parted at CLUMP_GAP, clumps of 3.7-5;
# at 0.3-1.0, 9.7-10)
CLUMP_SPLIT = 0.5
CLUMPED_SHARE = 0.5
CLUMP_TRACE = 5000  # arrivals kept as the trace of clumped arrivals, at most
CLUMP_MIN = 50  # ... and at least this many to tell (Poisson: 10% of gaps that short)
# clumped arrivals (`ArrivalLog.clumped`): their times, and what each spent before
Trace = tuple[tuple[float, ...], tuple[float, ...]]


@dataclass(frozen=True, eq=False)
class MAP:
    """A Markovian arrival process `(d0, d1)`; see the module docstring."""

    d0: np.ndarray
    d1: np.ndarray
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        d0 = np.atleast_2d(np.asarray(self.d0, dtype=float))
        d1 = np.atleast_2d(np.asarray(self.d1, dtype=float))
        if d0.shape != d1.shape or d0.shape[0] != d0.shape[1]:
            raise ValueError(f"MAP: d0 and d1 must be square and alike, got {d0.shape}, {d1.shape}")
        if np.any(d1 < 0) or not np.allclose((d0 + d1).sum(axis=1), 0.0, atol=1e-9 * abs(d0).max()):
            raise ValueError("MAP: d1 must be >= 0 and the rows of d0 + d1 must sum to 0")
        object.__setattr__(self, "d0", d0)
        object.__setattr__(self, "d1", d1)

    @staticmethod
    def poisson(rate: float) -> MAP:
        if rate <= 0:
            raise ValueError(f"MAP.poisson: rate must be > 0, got {rate}")
        return MAP(np.array([[-rate]]), np.array([[rate]]))

    @staticmethod
    def mmpp2(rate_low: float, rate_high: float, to_high: float, to_low: float) -> MAP:
        """Arrivals at `rate_low` or `rate_high`; the phase switches at `to_high` (low to
        high) and `to_low` (high to low) per second."""
        if min(rate_low, rate_high) < 0 or min(to_high, to_low) <= 0 or rate_low + rate_high <= 0:
            raise ValueError("MAP.mmpp2: rates must be >= 0 and switching rates > 0")
        d1 = np.diag([rate_low, rate_high])
        d0 = np.array([[-rate_low - to_high, to_high], [to_low, -rate_high - to_low]])
        return MAP(d0, d1)

    @property
    def phases(self) -> int:
        return self.d0.shape[0]

    @property
    def is_poisson(self) -> bool:
        return self.phases == 1

    def _stationary(self) -> np.ndarray:
        """Time-stationary phase distribution (of the generator d0 + d1)."""
        if "theta" not in self._cache:
            q = self.d0 + self.d1
            a = np.vstack([q.T, np.ones(self.phases)])
            b = np.zeros(self.phases + 1)
            b[-1] = 1.0
            self._cache["theta"] = np.linalg.lstsq(a, b, rcond=None)[0]
        return self._cache["theta"]

    @property
    def rate(self) -> float:
        """Mean arrivals per second."""
        return float(self._stationary() @ self.d1.sum(axis=1))

    @property
    def phase_rates(self) -> np.ndarray:
        """Arrival rate while in each phase."""
        return self.d1.sum(axis=1)

    @property
    def arrival_phase(self) -> np.ndarray:
        """Phase distribution just after an arrival, in steady state."""
        pi = self._stationary() @ self.d1
        return pi / pi.sum()

    def embedded(self) -> np.ndarray:
        """Phase-to-phase transition matrix from one arrival to the next."""
        return np.linalg.solve(-self.d0, self.d1)

    def moment(self, k: int) -> float:
        """k-th moment of the stationary inter-arrival time."""
        inv = np.linalg.inv(-self.d0)
        v = np.ones(self.phases)
        for _ in range(k):
            v = inv @ v
        return float(math.factorial(k) * self.arrival_phase @ v)

    @property
    def cv2(self) -> float:
        m1 = self.moment(1)
        return self.moment(2) / m1**2 - 1.0

    def autocorrelation(self, lag: int = 1) -> float:
        """Lag-`lag` autocorrelation of successive inter-arrival times."""
        inv = np.linalg.inv(-self.d0)
        m1 = self.moment(1)
        var = self.moment(2) - m1**2
        if var <= 0:
            return 0.0
        p = np.linalg.matrix_power(self.embedded(), lag)
        joint = float(self.arrival_phase @ inv @ p @ inv @ np.ones(self.phases))
        return (joint - m1**2) / var

    def sample(
        self, count: int, rng: np.random.Generator, start: float = 0.0, by_stays: bool = False
    ) -> np.ndarray:
        """`count` arrival times (seconds, increasing) drawn from this process, an
        event at a time; `by_stays`, a Markov-modulated Poisson process (a diagonal
        `d1`) a stay in a phase at a time: 5-10x faster, other draws for a seed (the
        tests' and recorded benchmarks' arrivals are drawn an event at a time)."""
        if by_stays and np.count_nonzero(self.d1 - np.diag(np.diag(self.d1))) == 0:
            return self._sample_modulated(count, rng, start)
        total = -np.diag(self.d0)
        phase = int(rng.choice(self.phases, p=self.arrival_phase))
        jumps = np.hstack([self.d0 - np.diag(np.diag(self.d0)), self.d1])  # m x 2m
        probs = jumps / jumps.sum(axis=1, keepdims=True)
        times = np.empty(count)
        now, n = start, 0
        # Bounded: every loop step either records an arrival or changes phase; phase
        # changes between arrivals are finite with probability 1, cap them anyway.
        for _ in range(count * 10_000):
            if n == count:
                break
            now += rng.exponential(1.0 / total[phase])
            target = int(rng.choice(2 * self.phases, p=probs[phase]))
            if target >= self.phases:
                times[n] = now
                n += 1
            phase = target % self.phases
        return times[:n]

    def _sample_modulated(self, count: int, rng: np.random.Generator, start: float) -> np.ndarray:
        """`sample` by stays: a stay's length, then its arrivals at once (a Poisson
        count, placed uniformly); arrivals leave the phase as it is. Poisson: one stay."""
        rates = np.diag(self.d1)
        moves = self.d0 - np.diag(np.diag(self.d0))  # phase changes
        leave = moves.sum(axis=1)
        phase = int(rng.choice(self.phases, p=self.arrival_phase))
        stays, n, now = [], 0, start
        while n < count:
            if leave[phase] <= 0:  # the process stays in this phase for good
                if rates[phase] <= 0:
                    break
                gaps = rng.exponential(1.0 / rates[phase], count - n)
                stays.append(now + np.cumsum(gaps))
                break
            length = rng.exponential(1.0 / leave[phase])
            k = int(rng.poisson(rates[phase] * length))
            stays.append(now + np.sort(rng.uniform(0.0, length, k)))
            now, n = now + length, n + k
            phase = int(rng.choice(self.phases, p=moves[phase] / leave[phase]))
        return np.concatenate(stays)[:count] if stays else np.empty(0)

    def describe(self) -> str:
        if self.is_poisson:
            return f"Poisson({self.rate:.3g}/s)"
        if self.phases == 2 and np.allclose(self.d1, np.diag(np.diag(self.d1))):
            lo, hi = np.diag(self.d1)
            return (
                f"MMPP2(rates {lo:.3g}/{hi:.3g}/s, switch {self.d0[0, 1]:.3g}/"
                f"{self.d0[1, 0]:.3g}/s, mean {self.rate:.3g}/s)"
            )
        return f"MAP({self.phases} phases, {self.rate:.3g}/s)"


def interarrival_stats(gaps: np.ndarray) -> dict[str, float]:
    """Mean, squared coefficient of variation, lag-1 autocorrelation and the decay
    factor of the autocorrelations of a sequence of inter-arrival times."""
    gaps = np.asarray(gaps, dtype=float)
    mean = float(gaps.mean())
    var = float(gaps.var())
    cv2 = var / mean**2 if mean > 0 else 1.0
    centred = gaps - mean
    lags = min(MAX_LAG, len(gaps) // 4)
    # products summed by numpy, not a BLAS dot: on 20,000 arrivals OpenBLAS spreads
    # the dot over its threads, which then spin between the driver's planning periods
    # (15% of the driver's CPU at 4,000 arrivals/s on 2 cores)
    rho = np.array(
        [
            float(np.multiply(centred[:-k], centred[k:]).sum()) / (len(gaps) * var)
            if var > 0
            else 0.0
            for k in range(1, lags + 1)
        ]
    )
    rho1 = float(rho[0]) if lags else 0.0
    # Autocorrelations of a 2-phase MAP decay geometrically: rho_k = rho_1 * decay^(k-1).
    decay = 0.0
    if lags >= 3 and rho1 > 0:
        decay = float(np.clip(rho[1:].sum() / max(rho[:-1].sum(), 1e-12), 0.0, 0.999))
    return {"mean": mean, "cv2": cv2, "rho1": rho1, "decay": decay}


def looks_poisson(stats: dict[str, float], samples: int) -> bool:
    """Smooth traffic: CV^2 of inter-arrivals near 1 (or below: modelled as Poisson,
    which is pessimistic for smoother traffic) and no correlation between gaps."""
    tolerance = max(0.15, 4.0 / math.sqrt(max(samples, 1)))
    corr_tolerance = max(0.05, 3.0 / math.sqrt(max(samples, 1)))
    return stats["cv2"] < 1.0 + tolerance and abs(stats["rho1"]) < corr_tolerance


def fit_map(gaps: np.ndarray) -> MAP:
    """Fit a MAP to consecutive inter-arrival times (seconds): Poisson when smooth,
    else a 2-state MMPP fitted by a few EM (Baum-Welch) iterations on arrival counts
    per short window, a Poisson hidden Markov model whose two states are the phases."""
    gaps = np.asarray(gaps, dtype=float)
    gaps = gaps[gaps >= 0]
    if len(gaps) == 0 or gaps.mean() <= 0:
        raise ValueError("fit_map: need at least one positive inter-arrival time")
    stats = interarrival_stats(gaps)
    rate = 1.0 / stats["mean"]
    if len(gaps) < MIN_SAMPLES_FOR_MMPP or looks_poisson(stats, len(gaps)):
        return MAP.poisson(rate)
    fitted = _fit_mmpp2(np.cumsum(gaps), rate)
    return fitted if fitted is not None else MAP.poisson(rate)


def _fit_mmpp2(times: np.ndarray, rate: float, iterations: int = 20) -> MAP | None:
    """Baum-Welch for a 2-state Poisson HMM on counts per window of ~8 mean gaps;
    None when the two states come out too alike to be worth a second phase."""
    span = float(times[-1] - times[0])
    windows = int(min(MAX_WINDOWS, max(20, len(times) // COUNTS_PER_WINDOW)))
    width = span / windows
    counts = np.histogram(times, bins=windows, range=(times[0], times[-1]))[0].astype(float)
    lo_guess = counts[counts <= np.median(counts)].mean()
    hi_guess = (
        counts[counts > np.median(counts)].mean() if np.any(counts > np.median(counts)) else 0
    )
    lam = np.array([max(lo_guess, 1e-3), max(hi_guess, lo_guess * 1.5, 1e-2)])
    trans = np.array([[0.9, 0.1], [0.1, 0.9]])
    start = np.array([0.5, 0.5])
    log_fact = gammaln(counts + 1.0)
    for _ in range(iterations):
        emit = np.exp(counts[:, None] * np.log(lam)[None, :] - lam[None, :] - log_fact[:, None])
        emit = np.maximum(emit, 1e-300)
        alpha, beta, scale = _forward_backward(start, trans, emit)
        gamma = alpha * beta
        gamma /= gamma.sum(axis=1, keepdims=True)
        xi = (
            alpha[:-1, :, None]
            * trans[None]
            * (emit[1:] * beta[1:])[:, None, :]
            / scale[1:, None, None]
        )
        start = gamma[0]
        before = lam, trans
        lam = np.maximum((gamma * counts[:, None]).sum(axis=0) / gamma.sum(axis=0), 1e-6)
        trans = xi.sum(axis=0) / np.maximum(xi.sum(axis=(0, 2))[:, None], 1e-300)
        # settled: further rounds take the planner's thread (and the GIL the requests'
        # threads share) for nothing
        if np.all(np.abs(lam - before[0]) <= SETTLED * lam) and np.all(
            np.abs(trans - before[1]) <= SETTLED
        ):
            break
    order = np.argsort(lam)
    lam, trans = lam[order], trans[np.ix_(order, order)]
    if lam[1] < 1.3 * lam[0] or min(trans[0, 1], trans[1, 0]) <= 0:
        return None
    # Per-window switch probabilities to rates; the mean rate is kept exactly.
    # At least one switch over the span: a phase seen once is not absorbing.
    to_high = max(-math.log(max(1.0 - trans[0, 1], 1e-9)) / width, 1.0 / span)
    to_low = max(-math.log(max(1.0 - trans[1, 0], 1e-9)) / width, 1.0 / span)
    share_high = to_high / (to_high + to_low)
    fitted_mean = (lam[0] * (1 - share_high) + lam[1] * share_high) / width
    scale_rates = rate / fitted_mean
    fitted = MAP.mmpp2(lam[0] / width * scale_rates, lam[1] / width * scale_rates, to_high, to_low)
    log.debug("fitted %s over %d windows", fitted.describe(), windows)
    return fitted


def _forward_backward(
    start: np.ndarray, trans: np.ndarray, emit: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scaled forward and backward variables of a 2-state HMM, and the scales. The
    recursions run on Python floats: per step, numpy's call overhead on arrays of two
    would cost several times the arithmetic (a fit ran for 100 ms, in a thread whose
    GIL the requests' threads share)."""
    (t00, t01), (t10, t11) = trans.tolist()
    e0, e1 = emit[:, 0].tolist(), emit[:, 1].tolist()
    n = len(e0)
    alpha, scale = [(0.0, 0.0)] * n, [0.0] * n
    a0, a1 = float(start[0]) * e0[0], float(start[1]) * e1[0]
    for t in range(n):
        if t:
            p0, p1 = alpha[t - 1]
            a0, a1 = (p0 * t00 + p1 * t10) * e0[t], (p0 * t01 + p1 * t11) * e1[t]
        s = a0 + a1
        scale[t], alpha[t] = s, (a0 / s, a1 / s)
    beta = [(1.0, 1.0)] * n
    b0 = b1 = 1.0
    for t in range(n - 2, -1, -1):
        x0, x1, s = e0[t + 1] * b0, e1[t + 1] * b1, scale[t + 1]
        b0, b1 = (t00 * x0 + t01 * x1) / s, (t10 * x0 + t11 * x1) / s
        beta[t] = (b0, b1)
    return np.array(alpha), np.array(beta), np.array(scale)


STEP_S = 0.5  # a step up is judged over the last this many seconds too (`rate_shift`) ...
STEP_UP = 2.0  # ... beyond this many times the fitted process's fastest phase
CHANGE_EVIDENCE = 5.0  # log-likelihood gain a change point needs (about p < 0.01)


class ArrivalLog:
    """Arrival times of the last `window_s` seconds (at most `max_events`)."""

    def __init__(self, window_s: float = 30.0, max_events: int = 20_000) -> None:
        if window_s <= 0 or max_events < 2:
            raise ValueError("ArrivalLog: window_s must be > 0 and max_events >= 2")
        self.window_s = window_s
        self._times: deque[float] = deque(maxlen=max_events)
        self._before: deque[float] = deque(maxlen=max_events)  # see `record`
        self.total = 0

    def record(self, now: float, before: float = 0.0) -> None:
        """An arrival at `now`, which spent `before` seconds of its latency on its way
        (an HTTP request read late from its socket)."""
        self._times.append(now)
        self._before.append(before)
        self.total += 1

    def _trim(self, now: float) -> None:
        while self._times and self._times[0] < now - self.window_s:
            self._times.popleft()
            self._before.popleft()

    def __len__(self) -> int:
        return len(self._times)

    @property
    def last(self) -> float | None:
        """The latest arrival (None: none in the log)."""
        return self._times[-1] if self._times else None

    def snapshot(self, now: float, since: float = -math.inf, keep: int = 0) -> ArrivalLog:
        """A copy of the window as it is at `now`, to compute on without the lock;
        without the arrivals before `since`, but never with fewer than the latest
        `keep`."""
        self._trim(now)
        copy = ArrivalLog(self.window_s, self._times.maxlen or 2)
        copy._times.extend(self._times)
        copy._before.extend(self._before)
        copy.total = self.total
        while len(copy._times) > keep and copy._times[0] < since:
            copy._times.popleft()
            copy._before.popleft()
        return copy

    def times(self, now: float) -> np.ndarray:
        self._trim(now)
        return np.fromiter(self._times, dtype=float, count=len(self._times))

    def rate(self, now: float, over_s: float | None = None) -> float:
        """Arrivals per second over the last `over_s` seconds (default: the window,
        or the span of the log when shorter)."""
        self._trim(now)
        if not self._times:
            return 0.0
        span = over_s if over_s is not None else min(self.window_s, now - self._times[0])
        if span <= 0:
            return 0.0
        if not over_s:
            return len(self._times) / span
        cutoff, count = now - span, 0
        for t in reversed(self._times):  # in order: from the newest back to the cutoff
            if t < cutoff:
                break
            count += 1
        return count / span

    def recent_rate(self, now: float, count: int) -> float:
        """Arrivals per second over the latest `count` arrivals (all, when fewer):
        their number over the time from the oldest of them to `now`. A count, not a
        time span: as precise at 9,000/s as at 100/s, over 28 ms or 2.6 s."""
        self._trim(now)
        n = min(count, len(self._times))
        if not n:
            return 0.0
        return n / max(now - self._times[-n], 1e-9)

    def clumped(self, now: float, over_s: float) -> Trace:
        """The arrival times of the last `over_s` seconds (from 0, the latest
        CLUMP_TRACE) and what each spent before (`record`), when they come in clumps;
        else two (). A fit counts arrivals in windows of several mean gaps, so it takes
        requests sent together (`hey -q`'s connections tick in lockstep: bursts of 10
        every 33 ms) for a Poisson stream at their mean rate, and plans for it: calls
        of 3 at 300/s, 4 + 1 ms per row, SLO 15 ms, where the bursts of 10 wanted 5 on
        each of 2 workers (37% refused). The plan search simulates its candidates on
        such a trace (`SearchSpace.trace`)."""
        times = self.times(now)
        kept = np.flatnonzero(times >= now - over_s)[-CLUMP_TRACE:]
        times = times[kept]
        if len(times) < CLUMP_MIN:
            return (), ()
        gaps = np.diff(times)
        mean = float(gaps.mean())
        if mean <= 0 or float(np.mean(gaps < CLUMP_GAP * mean)) < CLUMPED_SHARE:
            return (), ()
        before = np.fromiter(self._before, dtype=float, count=len(self._before))[kept]
        return tuple((times - times[0]).tolist()), tuple(before.tolist())

    def fit(self, now: float, over_s: float | None = None) -> MAP | None:
        """A MAP fitted to the window (or to its last `over_s` seconds), or None with
        fewer than 3 arrivals."""
        times = self.times(now)
        if over_s is not None:
            times = times[times >= now - over_s]
        if len(times) < 3:
            return None
        gaps = np.diff(times)
        if gaps.mean() <= 0:
            return None
        return fit_map(gaps)

    def change_point(self, now: float, over_s: float, least: int = 10) -> float:
        """When the rate of the last `over_s` seconds most likely changed: the split
        that maximizes the likelihood of a Poisson rate before it and another after it
        (with at least `least` arrivals after, and at least `least` mean gaps of them
        all: a clump of `least` requests sent together is no new rate; `hey -c 10 -q
        10`'s last burst, 10 requests within 1-2 ms, was taken for a flood of 5,000/s,
        and a fresh stage kept an overload plan for 3 s); `now - over_s` when one rate
        explains them about as well (a log-likelihood gain under `CHANGE_EVIDENCE`)."""
        start = now - over_s
        times = self.times(now)
        times = times[times >= start]
        n = len(times)
        if n < 2 * least:
            return start
        # the change at an arrival, `least` or more after, and `least` mean gaps ago
        splits = times[: n - least + 1]
        splits = splits[splits <= now - least * over_s / n]
        if not len(splits):
            return start
        before = np.arange(len(splits), dtype=float)
        after = n - before
        t_before = np.maximum(splits - start, 1e-9)
        t_after = np.maximum(now - splits, 1e-9)
        with np.errstate(divide="ignore", invalid="ignore"):
            loglik = np.where(before > 0, before * np.log(before / t_before), 0.0) + after * np.log(
                after / t_after
            )
        best = int(np.argmax(loglik))
        if loglik[best] - n * math.log(n / over_s) < CHANGE_EVIDENCE:
            return start
        return float(splits[best])

    def rate_shift(self, now: float, fitted: MAP, over_s: float = 2.0) -> bool:
        """True when the rate of the last `over_s` seconds is far outside what the
        fitted process produces (above 1.5x its fastest phase or below 2/3 of its
        slowest), and the count is large enough to tell; or when the last `STEP_S`
        already run above `STEP_UP` times its fastest phase. That needs `STEP_S` logged,
        not `over_s`: a step at deploy, from a lead-in of 650/s to 3,350/s, waited
        1.6 s for its re-plan while the plan for 650/s refused 30-50% of arrivals."""
        self._trim(now)
        if not self._times:
            return False
        expected_hi = float(fitted.phase_rates.max())
        expected_lo = float(fitted.phase_rates.min())
        logged = now - self._times[0]
        if logged >= STEP_S:
            step = self.rate(now, STEP_S)
            if step > STEP_UP * expected_hi and _far(step, expected_hi, STEP_S):
                return True
        if logged < over_s:
            return False
        recent = self.rate(now, over_s)
        if recent > 1.5 * expected_hi:
            return _far(recent, expected_hi, over_s)
        return recent < expected_lo / 1.5 and _far(recent, expected_lo, over_s)


def _far(rate: float, expected: float, over_s: float) -> bool:
    """Whether `over_s` seconds at `rate` per second are further from `expected` per
    second than chance takes a Poisson count: 4 standard deviations."""
    return abs(rate - expected) * over_s / math.sqrt(max(expected * over_s, 1.0)) > 4.0
