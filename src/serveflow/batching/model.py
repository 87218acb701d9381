"""The BATCH analytical model: latency distribution and cost of a batching stage.

A buffer collects requests; a batch is dispatched when it holds `B` requests or when
its first request has waited `T`. Arrivals follow a MAP (`arrivals.MAP`). While a
batch forms, the buffer is a continuous-time Markov chain on (requests in buffer,
arrival phase), with generator `Q` (blocks `d0` on the diagonal, `d1` above it, the
full level absorbing). Its transient law `p(t) = p(0) expm(Q t)` gives the batch-size
distribution at dispatch (full before `T`, or partial at `T`) and, for every request,
the joint law of (its wait in the buffer, the size of its batch). A request's latency
is its wait + `service(batch size)` + the wait for a free worker, plus, going past
BATCH, an independent `noise` term drawn from measured samples (how far real service
times stray from the fitted curve, and the runtime's own per-request overhead): on a
shared machine that spread, not the buffer, sets much of the tail.

Worker queueing (all `k` workers busy) is an approximation: batches leave the buffer
as a renewal stream (rate `lambda / E[N]`, inter-batch variability from the idle +
forming time) into a FIFO G/G/k queue, solved with the Allen-Cunneen formula (Erlang C
times `(Ca^2 + Cs^2) / 2`, `Cs` of the service times and the noise), the wait taken
as 0 with probability `1 - P(wait)` and exponential otherwise. This is the "push"
semantics (a batch formed while all workers are busy waits whole); a runtime whose
free worker pulls up to `B` queued requests merges such batches, so the model is
pessimistic there at high utilization.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.linalg import expm
from scipy.optimize import brentq
from scipy.special import gammainc

from serveflow.batching.arrivals import MAP

ServiceFn = Callable[[np.ndarray], np.ndarray]
"""Batch sizes (int array) -> service seconds (float array)."""

DEFAULT_GRID = 160


def linear_service(a: float, b: float) -> ServiceFn:
    """Service time `a + b * size` seconds."""
    return lambda sizes: a + b * np.asarray(sizes, dtype=float)


@dataclass(frozen=True, eq=False)
class BufferLaw:
    """What the buffer alone determines, for one (arrivals, B, T).

    `waits`, `sizes`, `mass`: per-request joint law of (wait in buffer s, size of its
    batch), masses summing to 1. `batch_pmf[n - 1]`: probability a batch has n
    requests. `cycle_mean`, `cycle_cv2`: time between batch dispatches.
    """

    max_size: int
    timeout_s: float
    waits: np.ndarray
    sizes: np.ndarray
    mass: np.ndarray
    batch_pmf: np.ndarray
    cycle_mean: float
    cycle_cv2: float

    @property
    def mean_batch(self) -> float:
        return float(np.arange(1, self.max_size + 1) @ self.batch_pmf)


def _transient(arrivals: MAP, big: int, h: float, steps: int) -> np.ndarray:
    """c[j, g, level, phase]: law of the forming buffer at time g*h (g = 0..steps),
    starting from one request (level 0) in phase j; the full level B-1 absorbs."""
    d0, d1, m = arrivals.d0, arrivals.d1, arrivals.phases
    q = np.zeros((big * m, big * m))
    for level in range(big - 1):
        rows = slice(level * m, (level + 1) * m)
        q[rows, rows] = d0
        q[rows, (level + 1) * m : (level + 2) * m] = d1
    step = expm(q * h)
    c = np.empty((m, steps + 1, big * m))
    state = np.zeros((m, big * m))
    state[np.arange(m), np.arange(m)] = 1.0
    for g in range(steps + 1):
        c[:, g] = state
        state = state @ step
    return np.maximum(c, 0.0).reshape(m, steps + 1, big, m)


def buffer_laws(
    arrivals: MAP, max_size: int, timeouts: list[float], step_s: float
) -> dict[float, BufferLaw]:
    """`buffer_law` for several timeouts at once, sharing one matrix exponential: the
    time grid has step `step_s` (each timeout is rounded to a multiple of it, at least
    4 steps). Keys are the timeouts as given."""
    positive = [t for t in timeouts if t > 0]
    laws = {t: buffer_law(arrivals, max_size, t) for t in timeouts if t <= 0}
    if not positive or max_size == 1:
        return laws | {t: buffer_law(arrivals, max_size, t) for t in positive}
    steps = {t: max(4, round(t / step_s)) for t in positive}
    c = _transient(arrivals, max_size, step_s, max(steps.values()))
    for t in positive:
        laws[t] = buffer_law(arrivals, max_size, steps[t] * step_s, steps[t], transient=c)
    return laws


def buffer_law(
    arrivals: MAP,
    max_size: int,
    timeout_s: float,
    grid: int = DEFAULT_GRID,
    *,
    transient: np.ndarray | None = None,
) -> BufferLaw:
    """Solve the buffer chain for batch size `max_size` and timeout `timeout_s` on a
    time grid of `grid` steps (`transient`: a precomputed `_transient` with that step)."""
    if max_size < 1 or timeout_s < 0:
        raise ValueError("buffer_law: max_size must be >= 1 and timeout_s >= 0")
    d0, d1, m = arrivals.d0, arrivals.d1, arrivals.phases
    inv_d0 = np.linalg.inv(-d0)
    if max_size == 1 or timeout_s == 0:
        # Every request leaves at once, alone: inter-dispatch = inter-arrival.
        cv2 = arrivals.cv2
        return BufferLaw(
            max_size,
            timeout_s,
            np.zeros(1),
            np.ones(1, dtype=int),
            np.ones(1),
            _pmf_single(max_size),
            1.0 / arrivals.rate,
            cv2,
        )

    big, h = max_size, timeout_s / grid
    c = transient if transient is not None else _transient(arrivals, big, h, grid)
    c = c[:, : grid + 1]
    levels = c.sum(axis=3)  # (m, G+1, B): exactly `level` more arrivals (or full at B-1)
    tail = np.cumsum(levels[:, :, ::-1], axis=2)[:, :, ::-1]  # P(level >= d) = P(tau_d <= t)

    # Phase of the request opening a batch: the phase at the previous dispatch (frozen at
    # the full level, so c at T holds it) carried to the next arrival; a fixed point.
    at_dispatch = c[:, grid].sum(axis=1)  # (m, m)
    to_next = inv_d0 @ d1
    opener = _stationary(at_dispatch @ to_next) if m > 1 else np.ones(1)

    forward = np.einsum("j,jglp->glp", opener, c)  # (G+1, B, m)
    # Expected arrivals during cell g that move the buffer to level L (L >= 1), by phase.
    inflow = np.zeros((grid, big, m))
    inflow[:, 1:, :] = (0.5 * h) * (forward[:-1, :-1, :] + forward[1:, :-1, :]) @ d1

    # Outcomes counted over the time left after an arrival in cell g: between the grid
    # points G-g-1 and G-g, averaged.
    left = 0.5 * (levels[:, grid - np.arange(grid), :] + levels[:, grid - 1 - np.arange(grid), :])
    waits, sizes, mass = [], [], []

    # Partial batches: n = L + 1 + k requests, all dispatched at T.
    partial = np.einsum("glj,jgk->glk", inflow, left)  # (G, B, B)
    part_mass = np.zeros((grid, big + 1))
    for level in range(1, big - 1):
        extra = big - 1 - level  # k = 0 .. B-2-L keeps the batch partial
        part_mass[:, level + 1 : level + 1 + extra] += partial[:, level, :extra]
    cell_wait = (grid - np.arange(grid) - 0.5) * h
    for n in range(2, big):
        waits.append(cell_wait)
        sizes.append(np.full(grid, n))
        mass.append(part_mass[:, n])
    first_partial = opener @ levels[:, grid, : big - 1]  # k more arrivals by T, n = k + 1
    waits.append(np.full(big - 1, timeout_s))
    sizes.append(np.arange(1, big))
    mass.append(first_partial)

    # Full batches: the (B-1-L)-th later arrival fills the buffer r after this one.
    passage = np.diff(tail, axis=1)  # (m, G, B): P(tau_d in cell q)
    need = big - 1 - np.arange(1, big - 1)  # d for L = 1 .. B-2
    joint = np.einsum("glj,jql->gq", inflow[:, 1 : big - 1, :], passage[:, :, need])
    g_idx, q_idx = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    weight = np.where(q_idx < grid - g_idx - 1, 1.0, np.where(q_idx == grid - g_idx - 1, 0.5, 0.0))
    full_wait = (joint * weight).sum(axis=0) + opener @ passage[:, :, big - 1]
    waits.append((np.arange(grid) + 0.5) * h)
    sizes.append(np.full(grid, big))
    mass.append(full_wait)
    waits.append(np.zeros(1))  # the request that fills the buffer leaves at once
    sizes.append(np.full(1, big))
    mass.append(np.array([inflow[:, big - 1, :].sum()]))

    w, s, p = np.concatenate(waits), np.concatenate(sizes), np.maximum(np.concatenate(mass), 0)
    keep = p > 1e-14
    w, s, p = w[keep], s[keep], p[keep]
    p = p / p.sum()

    batch_pmf = np.empty(big)
    batch_pmf[: big - 1] = forward[grid, : big - 1, :].sum(axis=1)
    batch_pmf[big - 1] = forward[grid, big - 1, :].sum()
    batch_pmf = np.maximum(batch_pmf, 0.0)
    batch_pmf /= batch_pmf.sum()

    # Time between dispatches = idle (until the opener arrives) + forming time.
    fill = opener @ passage[:, :, big - 1]  # P(full in cell q)
    mid = (np.arange(grid) + 0.5) * h
    p_partial = max(0.0, 1.0 - fill.sum())
    form1 = float(fill @ mid + p_partial * timeout_s)
    form2 = float(fill @ mid**2 + p_partial * timeout_s**2)
    phase_at_dispatch = opener @ at_dispatch
    idle1 = float(phase_at_dispatch @ inv_d0 @ np.ones(m))
    idle2 = float(2.0 * phase_at_dispatch @ inv_d0 @ inv_d0 @ np.ones(m))
    cycle1 = idle1 + form1
    cycle_var = (idle2 - idle1**2) + (form2 - form1**2)
    return BufferLaw(max_size, timeout_s, w, s, p, batch_pmf, cycle1, max(cycle_var, 0) / cycle1**2)


@lru_cache(maxsize=1024)
def _poisson_law(rate: float, max_size: int, timeout_s: float, grid: int) -> BufferLaw:
    return buffer_law(MAP.poisson(rate), max_size, timeout_s, grid)


def _pmf_single(max_size: int) -> np.ndarray:
    pmf = np.zeros(max_size)
    pmf[0] = 1.0
    return pmf


def _stationary(matrix: np.ndarray) -> np.ndarray:
    size = matrix.shape[0]
    a = np.vstack([(matrix - np.eye(size)).T, np.ones(size)])
    b = np.zeros(size + 1)
    b[-1] = 1.0
    pi = np.maximum(np.linalg.lstsq(a, b, rcond=None)[0], 0.0)
    return pi / pi.sum()


def erlang_c(workers: int, offered: float) -> float:
    """Probability of waiting in an M/M/k queue with `offered` = arrival rate x mean
    service (in workers); 1 when `offered >= workers`."""
    if offered >= workers:
        return 1.0
    term, total = 1.0, 1.0  # a^i / i!, summed for i < k
    for i in range(1, workers):
        term *= offered / i
        total += term
    last = term * offered / workers * workers / (workers - offered)
    return last / (total + last)


@dataclass(frozen=True, eq=False)
class LatencyPart:
    """One component of a latency law: discrete (`values`, `masses`) plus,
    independently, a wait for a worker that is 0 with probability `1 - queue_prob`,
    else gamma distributed with mean `queue_mean` and squared CV `queue_cv2`."""

    values: np.ndarray
    masses: np.ndarray
    queue_prob: float = 0.0
    queue_mean: float = 0.0
    queue_cv2: float = 1.0

    def cdf(self, x: float) -> float:
        below = self.values <= x
        if self.queue_prob <= 0 or self.queue_mean <= 0:
            return float(self.masses[below].sum())
        shape = 1.0 / self.queue_cv2
        scale = self.queue_mean / shape
        waited = gammainc(shape, (x - self.values[below]) / scale)
        return float((self.masses[below] * (1.0 - self.queue_prob * (1.0 - waited))).sum())

    @property
    def mean(self) -> float:
        return float(
            self.values @ self.masses + self.masses.sum() * self.queue_prob * self.queue_mean
        )

    @property
    def upper(self) -> float:
        """A latency well beyond this part's 99.999th percentile."""
        tail = self.queue_mean * (1.0 + 12.0 * math.sqrt(self.queue_cv2)) if self.queue_prob else 0
        return float(self.values.max()) + tail


@dataclass(frozen=True, eq=False)
class LatencyDistribution:
    """Request latency law: a mixture of `parts` (their masses sum to 1 - `lost`),
    plus mass `lost` at infinity (arrivals of phases the workers cannot keep up with)."""

    parts: tuple[LatencyPart, ...]
    lost: float = 0.0

    @property
    def mean(self) -> float:
        if self.lost > 0:
            return math.inf
        return sum(part.mean for part in self.parts)

    def cdf(self, x: float) -> float:
        return sum(part.cdf(x) for part in self.parts)

    def percentile(self, q: float) -> float:
        """Latency (seconds) below which a fraction `q` of requests fall."""
        if not 0.0 < q < 1.0:
            raise ValueError(f"percentile: q must be in (0, 1), got {q}")
        if q >= 1.0 - self.lost - 1e-12:
            return math.inf
        values = np.concatenate([part.values for part in self.parts])
        if all(part.queue_prob <= 0 for part in self.parts):
            masses = np.concatenate([part.masses for part in self.parts])
            order = np.argsort(values)
            cum = np.cumsum(masses[order])
            index = int(np.searchsorted(cum, q))
            return float(values[order][min(index, len(values) - 1)])
        lo, hi = float(values.min()), max(part.upper for part in self.parts)
        if self.cdf(lo) >= q:
            return lo
        if self.cdf(hi) < q:
            return hi
        return float(brentq(lambda x: self.cdf(x) - q, lo, hi, xtol=1e-5, rtol=1e-4))


@dataclass(frozen=True, eq=False)
class Prediction:
    """The model's answer for one configuration."""

    max_size: int
    timeout_s: float
    workers: int
    latency: LatencyDistribution | None  # None when the workers cannot keep up at all
    batch_pmf: np.ndarray
    mean_batch: float
    busy_per_request_s: float  # worker-seconds of service per request
    utilization: float  # busy share of each worker

    @property
    def stable(self) -> bool:
        return self.latency is not None

    def percentile(self, q: float) -> float:
        return self.latency.percentile(q) if self.latency is not None else math.inf

    @property
    def mean(self) -> float:
        return self.latency.mean if self.latency is not None else math.inf


def slow_switching(arrivals: MAP, arrivals_per_phase: float = 50.0) -> bool:
    """True when every phase lasts long enough (on average `arrivals_per_phase`
    arrivals at the mean rate) for the stage to reach its steady state within it."""
    if arrivals.phases == 1:
        return False
    leave = -np.diag(arrivals.d0) - np.diag(arrivals.d1)  # phase-change rate out of each phase
    return bool(np.all(arrivals.rate / np.maximum(leave, 1e-12) >= arrivals_per_phase))


def predict(
    arrivals: MAP,
    service: ServiceFn,
    max_size: int,
    timeout_s: float,
    workers: int = 1,
    *,
    grid: int = DEFAULT_GRID,
    law: BufferLaw | None = None,
    phase_laws: dict[int, BufferLaw] | None = None,
    noise: np.ndarray | None = None,
) -> Prediction:
    """Latency distribution and cost of (max_size, timeout_s, workers) under `arrivals`
    with batch service time `service(sizes)`; `law` reuses a solved buffer
    (`phase_laws`, by phase index, the solved Poisson buffers of a per-phase solution);
    `noise`: samples (seconds) of an extra latency added to every request.

    A multi-phase MAP whose phases are long (`slow_switching`) is solved phase by
    phase, as a Poisson stream at the phase's rate, and the laws mixed by the share of
    arrivals in each phase: queues built in a burst are then seen (the renewal queue
    approximation alone would average them away). A phase the workers cannot keep up
    with puts its share of requests at infinite latency.
    """
    if workers < 1:
        raise ValueError(f"predict: workers must be >= 1, got {workers}")
    noise = noise_points(noise)
    if law is None and slow_switching(arrivals):
        return _predict_by_phase(
            arrivals, service, max_size, timeout_s, workers, grid, phase_laws, noise
        )
    law = law if law is not None else buffer_law(arrivals, max_size, timeout_s, grid)
    svc = np.asarray(service(np.arange(1, max_size + 1)), dtype=float)
    part, busy, utilization = _queued_part(arrivals.rate, law, svc, workers, noise)
    latency = LatencyDistribution((part,)) if part is not None else None
    return Prediction(
        max_size, timeout_s, workers, latency, law.batch_pmf, law.mean_batch, busy, utilization
    )


def _predict_by_phase(
    arrivals: MAP,
    service: ServiceFn,
    max_size: int,
    timeout_s: float,
    workers: int,
    grid: int,
    phase_laws: dict[int, BufferLaw] | None,
    noise: tuple[np.ndarray, np.ndarray] | None,
) -> Prediction:
    svc = np.asarray(service(np.arange(1, max_size + 1)), dtype=float)
    theta = arrivals._stationary()
    rates = arrivals.phase_rates
    shares = theta * rates / float(theta @ rates)
    parts, lost, busy, utilization = [], 0.0, 0.0, 0.0
    pmf = np.zeros(max_size)
    for phase, (rate, share, time_share) in enumerate(zip(rates, shares, theta)):
        if rate <= 0 or share <= 0:
            continue
        law = (phase_laws or {}).get(phase) or _poisson_law(float(rate), max_size, timeout_s, grid)
        part, phase_busy, phase_util = _queued_part(float(rate), law, svc, workers, noise)
        busy += share * phase_busy
        utilization += time_share * min(phase_util, 1.0)
        pmf += share / law.mean_batch * law.batch_pmf  # batches, not requests, per phase
        if part is None:
            lost += share
        else:
            parts.append(
                LatencyPart(
                    part.values,
                    part.masses * share,
                    part.queue_prob,
                    part.queue_mean,
                    part.queue_cv2,
                )
            )
    pmf /= pmf.sum()
    mean_batch = float(np.arange(1, max_size + 1) @ pmf)
    latency = LatencyDistribution(tuple(parts), lost) if parts else None
    return Prediction(max_size, timeout_s, workers, latency, pmf, mean_batch, busy, utilization)


def _compact(
    values: np.ndarray, masses: np.ndarray, bins: int = 400
) -> tuple[np.ndarray, np.ndarray]:
    """Merge a discrete law onto at most `bins` points (mass-weighted positions), so
    that evaluating its CDF stays cheap; percentiles move by at most a bin width."""
    if len(values) <= bins:
        return values, masses
    lo = values.min()
    width = (values.max() - lo) / bins or 1.0
    index = np.minimum(((values - lo) / width).astype(np.intp), bins - 1)
    mass = np.bincount(index, weights=masses, minlength=bins)
    moment = np.bincount(index, weights=masses * values, minlength=bins)
    keep = mass > 0
    return moment[keep] / mass[keep], mass[keep]


def noise_points(
    samples: np.ndarray | None, points: int = 32
) -> tuple[np.ndarray, np.ndarray] | None:
    """Samples of an additive latency as a discrete law on at most `points` values
    (equal-mass quantiles)."""
    if samples is None or len(samples) == 0:
        return None
    samples = np.asarray(samples, dtype=float)
    if len(samples) > points:
        samples = np.quantile(samples, (np.arange(points) + 0.5) / points)
    return samples, np.full(len(samples), 1.0 / len(samples))


def _queued_part(
    rate: float,
    law: BufferLaw,
    svc: np.ndarray,
    workers: int,
    noise: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[LatencyPart | None, float, float]:
    """The buffer law with service, `noise` and worker queueing added; None when
    unstable."""
    mean_batch = law.mean_batch
    svc1 = float(law.batch_pmf @ svc)
    svc2 = float(law.batch_pmf @ svc**2)
    svc3 = float(law.batch_pmf @ svc**3)
    if noise is not None:
        # The noise's spread is a call's too: a call that runs long holds the ones
        # queued behind it. Without it in the queue's moments, the model said p99 48 ms
        # where a simulation of such calls gave 53-57 (2 workers at 0.8 of their
        # throughput, 11 + 2 ms per row, call times spread 25%); with it, 54-55.
        spread = noise[0] - float(noise[0] @ noise[1])
        var, skew = float(spread**2 @ noise[1]), float(spread**3 @ noise[1])
        svc2, svc3 = svc2 + var, svc3 + 3.0 * svc1 * var + skew
    busy = svc1 / mean_batch
    batch_rate = rate / mean_batch
    offered = batch_rate * svc1
    utilization = offered / workers
    values, masses = law.waits + svc[law.sizes - 1], law.mass
    if noise is not None:  # independent: the law of the sum is the outer product
        values = (values[:, None] + noise[0][None, :]).ravel()
        masses = (masses[:, None] * noise[1][None, :]).ravel()
    values, masses = _compact(values, masses)
    if utilization >= 1.0:
        return None, busy, utilization
    wait_prob = erlang_c(workers, offered)
    cs2 = max(svc2 - svc1**2, 0.0) / svc1**2 if svc1 > 0 else 0.0
    mean_wait = wait_prob * svc1 / (workers - offered) * (law.cycle_cv2 + cs2) / 2.0
    if wait_prob <= 0 or mean_wait <= 0:
        return LatencyPart(values, masses), busy, utilization
    # Shape of the wait given waiting: from the M/G/1 moments (Takacs) of a server k
    # times faster, which gives the residual-service shape at low load and an
    # exponential-like tail near saturation.
    s1, s2, s3 = svc1 / workers, svc2 / workers**2, svc3 / workers**3
    rho = batch_rate * s1
    w1 = batch_rate * s2 / (2 * (1 - rho))
    w2 = 2 * w1**2 + batch_rate * s3 / (3 * (1 - rho))
    cv2 = float(np.clip((w2 / rho) / (w1 / rho) ** 2 - 1.0, 0.1, 4.0)) if w1 > 0 else 1.0
    return LatencyPart(values, masses, wait_prob, mean_wait / wait_prob, cv2), busy, utilization
