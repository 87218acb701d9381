"""Operator fusion (the Cloudflow experiment): chains of 2..10 identity maps.

Each request carries one numpy uint8 array of 10 KB, 500 KB or 10 MB in a cell; each
map is `identity` on that column. Fused (`sf.Rules()`: the chain becomes one stage)
and unfused (`sf.Rules(fusion=False)`: one stage per map) deployments of the same chain
share one runtime and are measured in interleaved rounds, sequential requests.

    python -m benchmarks.fusion [--quick]
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import serveflow as sf
from benchmarks import common

log = logging.getLogger("benchmarks.fusion")

NAME = "fusion"
SIZES = {"10KB": 10 * 1024, "500KB": 500 * 1024, "10MB": 10 * 1024 * 1024}
VARIANTS = {"fused": sf.Rules(), "unfused": sf.Rules(fusion=False)}


def _identity(value: Any) -> Any:
    return value


def chain(length: int) -> sf.Flow:
    flow = sf.Flow(f"fusion{length}")
    stream: sf.Flow | sf.Stream = flow
    for i in range(length):
        stream = stream.map(_identity, col="x", name=f"identity{i + 1}")
    return flow


def measure_point(
    runtime: Any, length: int, payload: np.ndarray, n: int, budget_s: float, rounds: int
) -> dict[str, list[float]]:
    """Sequential latencies (ms) of the fused and unfused chain, interleaved."""
    table = sf.Table({"x": [payload]})
    apps = {v: chain(length).deploy(rules=r, runtime=runtime) for v, r in VARIANTS.items()}
    try:
        for app in apps.values():
            out = app.run(table).result(timeout=60)
            if not np.array_equal(out.column("x")[0], payload):
                raise AssertionError("identity chain changed the payload")
        calls = {v: _caller(app, table) for v, app in apps.items()}
        for call in calls.values():
            common.sequential(call, 3)  # warm every stage's worker
        per_round_budget = budget_s / (rounds * len(calls))
        return common.interleaved(
            {
                v: (lambda k, call=call: common.sequential(call, k, budget_s=per_round_budget))
                for v, call in calls.items()
            },
            n,
            rounds=rounds,
        )
    finally:
        for app in apps.values():
            app.stop()


def _caller(app: Any, table: sf.Table) -> Any:
    return lambda: app.run(table).result(timeout=60)


def main(argv: list[str] | None = None) -> int:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    lengths = [2, 6, 10] if args.quick else list(range(2, 11))
    n = 40 if args.quick else 200
    budget_s = 1.0 if args.quick else 4.0  # per (length, size) point, both variants
    rounds = 4 if args.quick else 5
    rng = np.random.default_rng(0)
    records: list[common.Record] = []
    started = time.perf_counter()
    runtime = sf.LocalRuntime()
    try:
        for size_name, size in SIZES.items():
            payload = rng.integers(0, 256, size, dtype=np.uint8)
            for length in lengths:
                latencies = measure_point(runtime, length, payload, n, budget_s, rounds)
                for variant, lat in latencies.items():
                    records.append(
                        common.record(
                            f"{length} maps, {size_name}",
                            "serveflow",
                            lat,
                            None,
                            variant=variant,
                            chain_length=length,
                            payload=size_name,
                            payload_bytes=size,
                        )
                    )
                log.info(
                    "%s x%d: fused %.3f ms, unfused %.3f ms",
                    size_name,
                    length,
                    records[-2]["median_ms"],
                    records[-1]["median_ms"],
                )
    finally:
        runtime.stop()
    log.info("done in %.0f s", time.perf_counter() - started)

    common.print_table(
        records,
        ("scenario", "variant", "median_ms", "p99_ms", "n"),
        title="fusion: identity chains, sequential requests",
    )
    by_key = {(r["payload"], r["chain_length"], r["variant"]): r for r in records}
    speedups = [
        {
            "payload": size_name,
            "chain_length": length,
            "unfused/fused median": common.ratio(
                by_key[(size_name, length, "unfused")]["median_ms"],
                by_key[(size_name, length, "fused")]["median_ms"],
            ),
        }
        for size_name in SIZES
        for length in lengths
    ]
    common.print_table(
        speedups, ("payload", "chain_length", "unfused/fused median"), title="fusion speed-up"
    )
    common.write_json(NAME, records, args.out)
    plot(records, args.out)
    return 0


def plot(records: list[common.Record], out_dir: Path) -> None:
    fig, axes = common.new_figure(1, len(SIZES), size=(14, 4.5))
    for ax, size_name in zip(axes[0], SIZES):
        for variant, color in (("fused", "tab:blue"), ("unfused", "tab:orange")):
            points = sorted(
                (r["chain_length"], r["median_ms"], r["p99_ms"])
                for r in records
                if r["payload"] == size_name and r["variant"] == variant
            )
            xs = [p[0] for p in points]
            ax.plot(xs, [p[1] for p in points], "o-", color=color, label=f"{variant} median")
            ax.plot(xs, [p[2] for p in points], "x--", color=color, label=f"{variant} p99")
        ax.set_title(f"payload {size_name}")
        ax.set_xlabel("chain length (identity maps)")
        ax.set_ylabel("latency (ms)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    common.save_figure(fig, NAME, out_dir)


if __name__ == "__main__":
    sys.exit(main())
