"""Autoscaling (the Cloudflow experiment): load in waves on a 100 ms stage.

One map sleeps 100 ms. Requests arrive open-loop (Poisson, seeded) in phases of
10 -> 60 -> 10 req/s on `sf.LocalRuntime(min_workers=1, max_workers=8)` (the default
runtime, noted in the results, where LocalRuntime has no such parameters). `app.stats()`
is sampled every 0.5 s. Each request has a 30 s deadline so an overloaded runtime
cannot make the run unbounded. Per phase: latency of the requests sent in it, achieved
throughput, workers (mean/max); the plot shows load, workers and latency over time.

    python -m benchmarks.autoscale [--quick]
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

import serveflow as sf
from benchmarks import common

log = logging.getLogger("benchmarks.autoscale")

NAME = "autoscale"
STAGE = "sleep100"
SLEEP_S = 0.100
SAMPLE_EVERY_S = 0.5
DEADLINE_S = 30.0
MIN_WORKERS, MAX_WORKERS = 1, 8


def sleep100(value: Any) -> Any:
    time.sleep(SLEEP_S)
    return value


class Sampler:
    """Samples `app.stats()[STAGE]` every SAMPLE_EVERY_S on a thread until stopped."""

    def __init__(self, app: Any, t0: float) -> None:
        self.samples: list[dict[str, Any]] = []
        self._app = app
        self._t0 = t0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="stats-sampler")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            try:
                stats = self._app.stats()
            except Exception:
                log.exception("app.stats() failed")
                continue
            entry = stats.get(STAGE) or next(iter(stats.values()), {})
            self.samples.append({"t_s": time.perf_counter() - self._t0, **entry})

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def main(argv: list[str] | None = None) -> int:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    phases = (
        [(10.0, 8.0), (60.0, 14.0), (10.0, 14.0)]
        if args.quick
        else [
            (10.0, 30.0),
            (60.0, 45.0),
            (10.0, 45.0),
            (60.0, 30.0),
            (10.0, 30.0),
        ]
    )
    rng = np.random.default_rng(3)
    runtime = common.local_runtime(min_workers=MIN_WORKERS, max_workers=MAX_WORKERS)
    autoscaling = common.serveflow_info()["local_runtime_autoscaling"]
    flow = sf.Flow("autoscale")
    flow.map(sleep100, col="x", name=STAGE)
    table = sf.Table({"x": [0]})

    sent: list[tuple[float, int]] = []  # (send time, phase)
    done: list[tuple[float, float, int, bool]] = []  # (send time, latency ms, phase, ok)
    lock = threading.Lock()
    app = flow.deploy(runtime=runtime)
    try:
        app.run(table).result(timeout=60)  # cold start before the clock starts
        t0 = time.perf_counter()
        sampler = Sampler(app, t0)

        def finished(sent_at: float, phase: int, future: Future[Any]) -> None:
            latency = (time.perf_counter() - t0 - sent_at) * 1e3
            ok = not future.cancelled() and future.exception() is None
            with lock:
                done.append((sent_at, latency, phase, ok))

        next_at = 0.0
        phase_start = 0.0
        for index, (rate, duration) in enumerate(phases):
            log.info("phase %d: %g req/s for %g s", index, rate, duration)
            phase_end = phase_start + duration
            next_at = max(next_at, phase_start)
            while next_at < phase_end:
                delay = t0 + next_at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                sent_at = time.perf_counter() - t0
                future = app.run(table, timeout=DEADLINE_S)
                future.add_done_callback(lambda f, s=sent_at, p=index: finished(s, p, f))
                with lock:
                    sent.append((sent_at, index))
                next_at += rng.exponential(1.0 / rate)
            phase_start = phase_end
        wait_until = time.perf_counter() + DEADLINE_S + 5
        while time.perf_counter() < wait_until:
            with lock:
                if len(done) >= len(sent):
                    break
            time.sleep(0.1)
        time.sleep(2 * SAMPLE_EVERY_S)  # a last sample or two after the drain
        sampler.stop()
    finally:
        app.stop(drain_timeout=10)
        runtime.stop()

    note = None if autoscaling else "LocalRuntime has no min/max_workers: default runtime"
    records: list[common.Record] = []
    phase_start = 0.0
    for index, (rate, duration) in enumerate(phases):
        mine = [d for d in done if d[2] == index]
        ok = [d[1] for d in mine if d[3]]
        window = [s for s in sampler.samples if phase_start <= s["t_s"] < phase_start + duration]
        workers = [s.get("workers", 0) for s in window]
        records.append(
            common.record(
                f"phase {index}: {rate:g} req/s for {duration:g} s",
                "serveflow",
                ok,
                len(ok) / duration,
                offered_rps=rate,
                sent=sum(1 for s in sent if s[1] == index),
                failed=sum(1 for d in mine if not d[3]),
                workers_mean=float(np.mean(workers)) if workers else None,
                workers_max=max(workers) if workers else None,
                min_workers=MIN_WORKERS if autoscaling else None,
                max_workers=MAX_WORKERS if autoscaling else None,
                note=note,
            )
        )
        phase_start += duration
    all_ok = [d[1] for d in done if d[3]]
    records.append(
        common.record(
            "whole run",
            "serveflow",
            all_ok,
            len(all_ok) / sum(d for _, d in phases),
            failed=sum(1 for d in done if not d[3]),
            note=note,
            samples=sampler.samples,
            per_second=per_second(done, sum(d for _, d in phases)),
        )
    )
    common.print_table(
        records,
        (
            "scenario",
            "median_ms",
            "p99_ms",
            "throughput_rps",
            "sent",
            "failed",
            "workers_mean",
            "workers_max",
        ),
        title=f"autoscaling: {STAGE} stage, open-loop waves",
    )
    if note:
        print(f"note: {note}")
    common.write_json(NAME, records, args.out)
    plot(phases, sampler.samples, done, args.out)
    return 0


def per_second(done: list[tuple[float, float, int, bool]], end_s: float) -> list[dict[str, Any]]:
    """Requests binned by send second: count, failures, median and p99 latency (ms)."""
    bins: list[dict[str, Any]] = []
    for second in range(int(np.ceil(end_s))):
        mine = [d for d in done if second <= d[0] < second + 1]
        ok = [d[1] for d in mine if d[3]]
        bins.append(
            {
                "t_s": second,
                "sent": len(mine),
                "failed": len(mine) - len(ok),
                "median_ms": common.percentile(ok, 50) if ok else None,
                "p99_ms": common.percentile(ok, 99) if ok else None,
            }
        )
    return bins


def plot(
    phases: list[tuple[float, float]],
    samples: list[dict[str, Any]],
    done: list[tuple[float, float, int, bool]],
    out_dir: Path,
) -> None:
    fig, axes = common.new_figure(3, 1, size=(10, 9))
    end = sum(d for _, d in phases)
    ax = axes[0][0]
    edges, rates, t = [0.0], [], 0.0
    for rate, duration in phases:
        t += duration
        edges.append(t)
        rates.append(rate)
    ax.stairs(rates, edges, label="offered req/s", color="gray")
    bins = np.arange(0, end + 1.0, 1.0)
    sent_times = [d[0] for d in done if d[3]]
    if sent_times:
        counts, _ = np.histogram(sent_times, bins=bins)
        ax.plot(bins[:-1] + 0.5, counts, label="completed req/s (by send time)")
    ax.set_ylabel("req/s")
    ax.legend()
    ax = axes[1][0]
    ts = [s["t_s"] for s in samples]
    ax.step(ts, [s.get("workers", 0) for s in samples], where="post", label="workers")
    ax.step(ts, [s.get("queue", 0) for s in samples], where="post", label="queue", alpha=0.6)
    ax.set_ylabel("app.stats()")
    ax.legend()
    ax = axes[2][0]
    ok = [(d[0], d[1]) for d in done if d[3]]
    if ok:
        ax.scatter([p[0] for p in ok], [p[1] for p in ok], s=3, alpha=0.4, label="request")
    if ok:
        idx = np.digitize([p[0] for p in ok], bins)
        per_bin = [[p[1] for p, i in zip(ok, idx) if i == b] for b in range(1, len(bins))]
        centers = [bins[b] + 0.5 for b, lat in enumerate(per_bin) if lat]
        ax.plot(centers, [np.median(lat) for lat in per_bin if lat], "k-", label="median per 1 s")
    ax.plot(ts, [s.get("p50_ms", 0) for s in samples], label="stage p50 (stats)")
    ax.plot(ts, [s.get("p99_ms", 0) for s in samples], label="stage p99 (stats)")
    ax.set_yscale("log")
    ax.set_ylabel("latency (ms)")
    ax.set_xlabel("time (s)")
    ax.legend()
    for row in axes:
        row[0].set_xlim(0, end + DEADLINE_S / 6)
    common.save_figure(fig, NAME, out_dir)


if __name__ == "__main__":
    sys.exit(main())
