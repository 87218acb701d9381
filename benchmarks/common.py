"""Helpers shared by the benchmarks: timing loops, percentiles, result files, tables.

A benchmark measures with `sequential` (one request at a time: latency) and
`closed_loop` (a fixed number of requests in flight: throughput), builds records
with `record`, then calls `write_json`, `print_table` and a plot helper. Records follow
DESIGN.md: {"scenario", "system", "median_ms", "p99_ms", "throughput_rps", ...extra}.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parent / "results"

Record = dict[str, Any]


def parse_args(
    description: str,
    argv: Sequence[str] | None = None,
    configure: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """The flags every benchmark takes: `--quick` (a short run) and `--out` (folder);
    `configure` adds a benchmark's own flags."""
    parser = argparse.ArgumentParser(description=description)
    if configure is not None:
        configure(parser)
    parser.add_argument("--quick", action="store_true", help="a short run (about a minute)")
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help=f"results folder (default {RESULTS_DIR})"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return args


# --- statistics -----------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of unsorted values; nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(latencies_ms: Sequence[float]) -> dict[str, float]:
    """median_ms, p99_ms, mean_ms, min_ms and the sample count of latencies in ms."""
    return {
        "median_ms": percentile(latencies_ms, 50),
        "p99_ms": percentile(latencies_ms, 99),
        "mean_ms": sum(latencies_ms) / len(latencies_ms) if latencies_ms else math.nan,
        "min_ms": min(latencies_ms) if latencies_ms else math.nan,
        "n": len(latencies_ms),
    }


def record(
    scenario: str,
    system: str,
    latencies_ms: Sequence[float] | None = None,
    throughput_rps: float | None = None,
    **extra: Any,
) -> Record:
    """One result record; fields a measurement did not produce are None (null in JSON)."""
    stats: dict[str, Any] = (
        summarize(latencies_ms)
        if latencies_ms
        else {"median_ms": None, "p99_ms": None, "mean_ms": None, "min_ms": None, "n": 0}
    )
    return {
        "scenario": scenario,
        "system": system,
        "median_ms": stats.pop("median_ms"),
        "p99_ms": stats.pop("p99_ms"),
        "throughput_rps": throughput_rps,
        **stats,
        **extra,
    }


# --- measurement loops ------------------------------------------------------------


def sequential(
    call: Callable[[], Any],
    n: int,
    *,
    warmup: int = 0,
    budget_s: float | None = None,
    min_n: int = 5,
) -> list[float]:
    """Latencies in ms of `n` back-to-back `call()`s after `warmup` unmeasured ones.

    With `budget_s`, stop early once that many seconds passed and `min_n` calls were
    measured (so a slow configuration cannot make a run unbounded)."""
    for _ in range(warmup):
        call()
    latencies: list[float] = []
    start = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        latencies.append((time.perf_counter() - t0) * 1e3)
        over_budget = budget_s is not None and time.perf_counter() - start > budget_s
        if over_budget and len(latencies) >= min_n:
            break
    return latencies


def closed_loop(
    submit: Callable[[], Future[Any]],
    total: int,
    in_flight: int,
    *,
    timeout_s: float = 120.0,
) -> tuple[float, list[float], int]:
    """Keep `in_flight` requests outstanding until `total` completed.

    `submit()` starts one request and returns a concurrent.futures.Future. Returns
    (throughput in req/s, per-request latencies in ms, failures). Gives up after
    `timeout_s` seconds and reports what completed by then.

    The submitting thread refills every free slot each time it wakes, so completions
    that land together cost the client one wake-up, as an event-loop client's would
    (one wake per completion made this client the bottleneck of the fastest peers)."""
    done = threading.Condition()
    latencies: list[float] = []
    failures = [0]
    finished = [0]

    def on_done(t0: float, future: Future[Any]) -> None:
        elapsed = (time.perf_counter() - t0) * 1e3
        with done:
            if future.cancelled() or future.exception() is not None:
                failures[0] += 1
            else:
                latencies.append(elapsed)
            finished[0] += 1
            done.notify()

    start = time.perf_counter()
    deadline = start + timeout_s
    sent = 0
    while True:
        with done:
            free = in_flight - (sent - finished[0])
            while not free and time.perf_counter() < deadline:
                done.wait(timeout=max(0.0, deadline - time.perf_counter()))
                free = in_flight - (sent - finished[0])
            if finished[0] >= total or time.perf_counter() >= deadline:
                break
        for _ in range(min(free, total - sent)):
            t0 = time.perf_counter()
            future = submit()
            future.add_done_callback(lambda f, t0=t0: on_done(t0, f))
            sent += 1
        if sent >= total:
            with done:
                while finished[0] < total and time.perf_counter() < deadline:
                    done.wait(timeout=max(0.0, deadline - time.perf_counter()))
            break
    if time.perf_counter() >= deadline:
        log.warning("closed loop: timed out after %.0f s", timeout_s)
    elapsed = time.perf_counter() - start
    with done:
        return len(latencies) / elapsed if elapsed > 0 else 0.0, list(latencies), failures[0]


class ThreadedSubmitter:
    """A fixed pool of threads running a blocking `call()`; `submit()` gives a Future.

    Cheaper than a thread per request when a peer's client only offers blocking calls."""

    def __init__(self, call: Callable[[], Any], threads: int) -> None:
        self._call = call
        self._jobs: list[Future[Any]] = []
        self._cv = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, daemon=True, name=f"bench-client-{i}")
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self) -> Future[Any]:
        future: Future[Any] = Future()
        with self._cv:
            self._jobs.append(future)
            self._cv.notify()
        return future

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and not self._closed:
                    self._cv.wait()
                if self._closed and not self._jobs:
                    return
                future = self._jobs.pop(0)
            try:
                future.set_result(self._call())
            except BaseException as error:
                future.set_exception(error)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)


def interleaved(
    measure: dict[str, Callable[[int], list[float]]], n: int, *, rounds: int = 10
) -> dict[str, list[float]]:
    """Latencies (ms) of several systems measured in alternating rounds, so background
    noise on a shared machine falls on all of them alike. `measure[name](k)` measures
    k sequential requests of that system and returns their latencies."""
    out: dict[str, list[float]] = {name: [] for name in measure}
    per_round = max(1, n // rounds)
    for _ in range(rounds):
        for name, run in measure.items():
            out[name].extend(run(per_round))
    return out


# --- environment ------------------------------------------------------------------


def serve(
    path: Path, *options: str, source: str | None = None, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    """Start `serveflow serve PATH --port 0 --log-level warning OPTIONS` as a child
    process: (it, its base URL, from the line it prints once it serves). `source`: the
    `src` of another serveflow tree to serve from; `env`: variables to add."""
    env = {**os.environ, **(env or {})}
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "serveflow.serving.cli", "serve", str(path),
               "--port", "0", "--log-level", "warning", *options]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    line = process.stdout.readline() if process.stdout else ""
    if " on http://" not in line:
        stop(process)
        raise RuntimeError(f"serveflow serve did not start: {line!r}")
    return process, line.split(" on ")[1].split()[0]


def stop(process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Stop a server started as a child process: SIGTERM (it drains and exits), then
    SIGKILL if it is still there after `timeout_s`."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on, stored with every result file."""
    try:
        load = os.getloadavg()
    except OSError:
        load = (math.nan, math.nan, math.nan)
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_1m": round(load[0], 2),
        **serveflow_info(),
    }


def serveflow_info() -> dict[str, Any]:
    """Which serveflow was measured: git HEAD, whether src/ had uncommitted changes (a
    runtime in progress), and whether LocalRuntime takes min/max_workers."""
    import inspect

    import serveflow as sf

    repo = Path(__file__).resolve().parents[1]

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(
                ["git", *cmd], cwd=repo, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    params = inspect.signature(sf.LocalRuntime).parameters
    return {
        "git_head": git("rev-parse", "--short", "HEAD"),
        "src_dirty": bool(git("status", "--porcelain", "--", "src")),
        "local_runtime_autoscaling": "max_workers" in params,
    }


def local_runtime(**autoscaling: int) -> Any:
    """`sf.LocalRuntime(**autoscaling)` when it takes min/max_workers, else the default
    runtime (logged): benchmarks must run against the threaded and process runtimes."""
    import inspect

    import serveflow as sf

    params = inspect.signature(sf.LocalRuntime).parameters
    if all(k in params for k in autoscaling):
        return sf.LocalRuntime(**autoscaling)
    log.warning("LocalRuntime has no %s: using the default runtime", ", ".join(autoscaling))
    return sf.LocalRuntime()


# --- output -----------------------------------------------------------------------


def write_json(name: str, records: list[Record], out_dir: Path = RESULTS_DIR) -> Path:
    """Write `out_dir/NAME.json`: the list of records, each with a "machine" field
    (cpus, python, load average) saying what it was measured on."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    machine = machine_info()
    rows = [{**r, "machine": r.get("machine", machine)} for r in records]
    path.write_text(json.dumps([_jsonable(r) for r in rows], indent=1) + "\n")
    log.info("wrote %s", path)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else round(value, 4)
    if hasattr(value, "item"):  # numpy scalars
        return _jsonable(value.item())
    return value


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:.{digits + 1}g}"
    return str(value)


def print_table(
    records: Iterable[Record],
    columns: Sequence[str] = ("scenario", "system", "median_ms", "p99_ms", "throughput_rps"),
    title: str | None = None,
) -> None:
    """Print records as an aligned text table (benchmark CLI output)."""
    rows = [[fmt(r.get(c)) for c in columns] for r in records]
    widths = [max([len(c)] + [len(row[i]) for row in rows]) for i, c in enumerate(columns)]
    if title:
        print(f"\n== {title} ==")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))


def new_figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (8.0, 5.0)) -> Any:
    """A matplotlib (figure, axes) on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=size, squeeze=False)


def save_figure(fig: Any, name: str, out_dir: Path = RESULTS_DIR) -> Path:
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log.info("wrote %s", path)
    return path


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b
