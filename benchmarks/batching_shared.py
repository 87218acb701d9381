"""SLO stages that share workers (issue 13): admission when a worker also runs other
stages' calls, of another flow or of the same flow.

Every stage is a sleeper of 4 + 1 ms per row (`batching_regimes.Sleeper`), on one
runtime of 2 workers, driven open loop (Poisson, one client thread) for `--warmup`
seconds, then `--seconds` measured. Scenarios (rates are totals, split evenly):
- `two-flows`: two flows of one stage each, SLO 25 ms;
- `tight-and-loose`: the same with SLOs of 20 and 100 ms;
- `flow-slo`: one flow of two such stages in a row, `flow.deploy(slo_ms=40)`;
- `busy`: a flow of one such stage, SLO 25 ms, and another flow of one 100 ms call
  per request (no batching) at `BUSY_RPS`, not counted in the rate;
- `long-calls`: a flow of a stage of 1 + 0.2 ms per row, SLO 5 ms, with 3/4 of the
  rate, and one of 20 + 5 ms per row, SLO 200 ms, with 1/4 (calls longer than the
  first one's SLO: see `ControlPlane._confine`).
Systems: `adaptive` (the SLO stages as above) and `fixed-cap/0ms` (every such stage
`sf.Batching(max_size=8, timeout_ms=0)` instead: what is queued, up to 8, no wait).
Per flow and cell: `within` (share of its offered requests answered within its SLO),
`refused`, answered p99 / SLO.

    python -m benchmarks.batching_shared [--quick] [--seconds 5] [--warmup 3]
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from typing import Any

import numpy as np

import serveflow as sf
from benchmarks import common
from benchmarks.batching_regimes import Sleeper, arrival_times

log = logging.getLogger("benchmarks.batching_shared")

NAME = "batching_shared"
ADAPTIVE, FIXED = "adaptive", "fixed-cap/0ms"
BUSY_RPS = 4.0
BUSY_MS = 100.0
SCENARIOS = {  # name: total rates
    "two-flows": (600.0, 800.0),
    "tight-and-loose": (800.0,),
    "flow-slo": (200.0, 300.0, 400.0),
    "busy": (400.0,),
    "long-calls": (400.0,),
}
LONG_CALLS = ((1.0, 0.2, 5.0), (20.0, 5.0, 200.0))  # each flow's stage: ms, ms per row, SLO
PATTERN = {"long-calls": (0, 0, 0, 1)}  # which flow each arrival is for, in turn


def _stage(
    flow: Any,
    system: str,
    slo_ms: float | None,
    col: str = "x",
    name: str = "s",
    curve: tuple[float, float] = (4.0, 1.0),
) -> Any:
    batching: Any = sf.Batching(max_size=8, timeout_ms=0)
    if system == ADAPTIVE:
        batching = sf.Batching(slo_ms=slo_ms) if slo_ms else True
    return flow.map(Sleeper(*curve), col=col, names=[col + "'"], batching=batching, name=name)


def deploy(scenario: str, system: str, runtime: Any) -> list[tuple[Any, float]]:
    """The scenario's flows, deployed, each with its SLO (ms): those driven, in turn."""
    if scenario in ("two-flows", "tight-and-loose", "busy"):
        slos = {"two-flows": (25.0, 25.0), "tight-and-loose": (20.0, 100.0), "busy": (25.0,)}
        flows = []
        for k, slo_ms in enumerate(slos[scenario]):
            flow = sf.Flow(f"shared-{k}")
            _stage(flow, system, slo_ms)
            flows.append((flow.deploy(runtime=runtime), slo_ms))
        return flows
    if scenario == "long-calls":
        flows = []
        for k, (a_ms, b_ms, slo_ms) in enumerate(LONG_CALLS):
            flow = sf.Flow(f"shared-{k}")
            _stage(flow, system, slo_ms, curve=(a_ms, b_ms))
            flows.append((flow.deploy(runtime=runtime), slo_ms))
        return flows
    flow = sf.Flow("two-stages")
    _stage(_stage(flow, system, None, name="first"), system, None, col="x'", name="second")
    slo_ms = 40.0
    app = flow.deploy(runtime=runtime, slo_ms=slo_ms if system == ADAPTIVE else None)
    return [(app, slo_ms)]


def busy_flow(runtime: Any) -> Any:
    flow = sf.Flow("busy")
    flow.map(lambda x: (time.sleep(BUSY_MS / 1e3), x)[1], col="x", names=["y"], name="long")
    return flow.deploy(runtime=runtime)


def warm(app: Any) -> None:
    for _ in range(3):  # bursts: the stages load on both workers
        for future in [app.run(sf.Table({"x": [i]})) for i in range(16)]:
            with contextlib.suppress(sf.OverloadError):
                future.result(timeout=60)


def run_cell(
    scenario: str, system: str, rate: float, seconds: float, warmup: float, seed: int
) -> list[common.Record]:
    runtime = sf.LocalRuntime(min_workers=2, max_workers=2)
    try:
        flows = deploy(scenario, system, runtime)
        for app, _ in flows:
            warm(app)
        extra = busy_flow(runtime) if scenario == "busy" else None
        times = arrival_times("poisson", rate, warmup + seconds, seed)
        pattern = np.array(PATTERN.get(scenario, range(len(flows))))
        which = pattern[np.arange(len(times)) % len(pattern)]
        if extra is not None:  # the long calls, on their own schedule
            long_times = arrival_times("poisson", BUSY_RPS, warmup + seconds, seed + 1)
            times = np.concatenate([times, long_times])
            which = np.concatenate([which, np.full(len(long_times), -1)])
            order = np.argsort(times, kind="stable")
            times, which = times[order], which[order]
        gc.collect()
        sent, ended = np.zeros(len(times)), np.full(len(times), np.nan)
        futures = []
        start = time.perf_counter()
        for i, (t, k) in enumerate(zip(times, which)):
            time.sleep(max(0.0, start + t - time.perf_counter()))
            app = extra if k < 0 else flows[k][0]
            sent[i] = time.perf_counter()
            future = app.run(sf.Table({"x": [i]}), timeout=10)
            future.add_done_callback(lambda _, i=i: ended.__setitem__(i, time.perf_counter()))
            futures.append(future)
        for future in futures:
            with contextlib.suppress(Exception):
                future.result(timeout=30)
        records = []
        for k, (_, slo_ms) in enumerate(flows):
            mine = [i for i in range(len(times)) if which[i] == k and times[i] >= warmup]
            errors = [futures[i].exception() for i in mine]
            answered = np.array([i for i, e in zip(mine, errors) if e is None], dtype=int)
            refused = sum(isinstance(e, sf.OverloadError) for e in errors)
            latency_ms = (ended[answered] - sent[answered]) * 1e3
            records.append(
                {
                    "scenario": scenario,
                    "system": system,
                    "flow": k,
                    "slo_ms": slo_ms,
                    "offered_rps": rate * float(np.mean(pattern == k)),
                    "within": int((latency_ms <= slo_ms).sum()) / max(len(mine), 1),
                    "refused": refused / max(len(mine), 1),
                    "p99_over_slo": float(np.quantile(latency_ms, 0.99)) / slo_ms
                    if len(latency_ms)
                    else None,
                }
            )
        return records
    finally:
        runtime.stop()


def main(argv: list[str] | None = None) -> int:
    args = common.parse_args(__doc__.splitlines()[0], argv, configure)
    seconds = args.seconds or (3.0 if args.quick else 5.0)
    warmup = args.warmup if args.warmup is not None else 3.0
    records: list[common.Record] = []
    seed = 0
    for scenario, rates in SCENARIOS.items():
        for rate in rates[:1] if args.quick else rates:
            for system in (ADAPTIVE, FIXED):
                seed += 1
                for r in run_cell(scenario, system, rate, seconds, warmup, seed):
                    log.info(
                        "%-15s %-13s %4.0f/s flow %d (SLO %g ms): within %.3f refused %.3f"
                        " p99/slo %s",
                        scenario, system, rate, r["flow"], r["slo_ms"], r["within"],
                        r["refused"], common.fmt(r["p99_over_slo"]),
                    )  # fmt: skip
                    records.append(r | {"rate_rps": rate})
    common.write_json(NAME, records, args.out)
    common.print_table(
        records,
        ["scenario", "system", "rate_rps", "flow", "slo_ms", "within", "refused", "p99_over_slo"],
    )
    return 0


def configure(parser: Any) -> None:
    parser.add_argument("--seconds", type=float, default=None, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=None, help="lead-in seconds per cell")


if __name__ == "__main__":
    raise SystemExit(main())
