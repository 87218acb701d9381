"""One pipeline end to end on the embedded runtime, with its latency table.

    python -m examples.pipelines.NAME [--requests N] [--concurrency C] [--workers W]

deploys the pipeline (default rules), loads the key-value store if it reads one,
sends a warm-up then N generated requests with C in flight, and prints the plan, a
few results, end-to-end latency and throughput, and the per-stage figures.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import threading
import time
from concurrent.futures import Future

import serveflow as sf


def _drive(app: sf.App, tables: list[sf.Table], concurrency: int) -> tuple[list[float], float]:
    """Run `tables` with `concurrency` in flight: latencies (ms) and elapsed seconds."""
    slots = threading.Semaphore(concurrency)
    latencies: list[float] = []
    futures: list[Future[sf.Table]] = []
    started = time.perf_counter()
    for table in tables:
        slots.acquire()
        sent = time.perf_counter()
        future = app.run(table)

        def done(f: Future[sf.Table], sent: float = sent) -> None:
            latencies.append((time.perf_counter() - sent) * 1e3)
            slots.release()

        future.add_done_callback(done)
        futures.append(future)
    for future in futures:
        future.result(timeout=120)
    return latencies, time.perf_counter() - started


def _cut(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def main(name: str) -> None:
    module = importlib.import_module(f"examples.pipelines.{name}")
    parser = argparse.ArgumentParser(description=(module.__doc__ or name).splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="requests to time")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    args = parser.parse_args()

    flow = module.build_flow()
    print(sf.optimize(flow).explain(), end="\n\n")
    runtime = sf.LocalRuntime(min_workers=args.workers, max_workers=args.workers)
    try:
        with flow.deploy(runtime=runtime) as app:
            if hasattr(module, "load_store"):
                print("loading the key-value store ...", flush=True)
                module.load_store(app.kvs, seed=0)
            print("warming up (models load on each worker) ...", flush=True)
            for table in module.make_inputs(3, seed=1):
                for row in app.run(table).result(timeout=300).to_rows():
                    shown = {k: v for k, v in row.items() if not hasattr(v, "shape")}
                    print("  ", shown)
            _drive(app, module.make_inputs(8 * args.concurrency, seed=2), args.concurrency)
            ms, elapsed = _drive(app, module.make_inputs(args.requests, seed=3), args.concurrency)
            print(f"\n{name}: {args.requests} requests, {args.concurrency} in flight, "
                  f"{args.workers} workers")  # fmt: skip
            print(f"{'req/s':>8} {'median ms':>10} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
            print(f"{len(ms) / elapsed:8.1f} {statistics.median(ms):10.2f} {_cut(ms, 90):8.2f} "
                  f"{_cut(ms, 99):8.2f} {max(ms):8.2f}")  # fmt: skip
            time.sleep(0.6)  # workers report their figures every 0.25 s
            print(f"\n{'stage':<40} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'workers':>7}")
            for stage, s in app.stats().items():
                print(f"{stage:<40} {s['requests']:>8} {s['p50_ms']:>8.2f} {s['p99_ms']:>8.2f} "
                      f"{s['workers']:>7}")  # fmt: skip
    finally:
        runtime.stop()
