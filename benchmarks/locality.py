"""Locality for dynamic lookups (the Cloudflow experiment).

100 distinct objects (numpy uint8 arrays) of 8 KB, 4 MB or 8 MB are stored with
`app.kvs.put`; each request names one key, drawn from a Zipf-like distribution
(P(rank r) ~ 1 / r**s over the 100 keys), and the flow

    parse (map on "key") -> lookup("key", dynamic=True, into="obj") -> use (map)

reads the object and returns a small summary of it. Locality on (`sf.Rules()`: a stage
starts at the lookup, scheduled where the key is cached) vs off
(`sf.Rules(locality=False)`: the lookup is fused with `parse` and runs anywhere), both
each on a runtime of its own, warmed up, then measured with sequential requests.

The runtime has WORKERS workers, each with a CACHE_MB cache of looked-up values, so
that the objects do not fit in one worker's cache: with locality each worker sees only
its share of the keys. Two stores: the embedded LMDB store (reads are memory-mapped,
already cheap) and a Redis server on loopback (a networked store, as in Cloudflow).

    python -m benchmarks.locality [--quick] [--zipf S] [--store lmdb|redis|both]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

import serveflow as sf
from benchmarks import common
from benchmarks.kvs_bench import redis_server

log = logging.getLogger("benchmarks.locality")

NAME = "locality"
OBJECTS = 100
SIZES = {"8KB": 8 * 1024, "4MB": 4 * 1024 * 1024, "8MB": 8 * 1024 * 1024}
VARIANTS = {"locality on": sf.Rules(), "locality off": sf.Rules(locality=False)}
WORKERS = 3
CACHE_MB = 64
WARM_UP = 300  # requests before measuring, so that caches reach their steady state


def _parse(key: Any) -> str:
    return str(key)


def _use(row: Any) -> int:
    obj = row["obj"]
    return int(obj[0]) + int(obj[-1]) + len(obj)


def flow() -> sf.Flow:
    f = sf.Flow("locality")
    f.map(_parse, col="key", name="parse").lookup("key", dynamic=True, into="obj").map(
        _use, names=["summary"], name="use"
    )
    return f


def zipf_keys(rng: np.random.Generator, n: int, s: float, prefix: str) -> list[str]:
    """`n` keys over OBJECTS ranks with P(rank r) proportional to 1 / r**s."""
    weights = 1.0 / np.arange(1, OBJECTS + 1) ** s
    ranks = rng.choice(OBJECTS, size=n, p=weights / weights.sum())
    return [f"{prefix}-{r}" for r in ranks]


def main(argv: list[str] | None = None) -> int:
    def flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent s")
        parser.add_argument("--store", choices=("lmdb", "redis", "both"), default="both")

    args = common.parse_args(__doc__.splitlines()[0], argv, flags)
    n = 100 if args.quick else 300
    rng = np.random.default_rng(7)
    records: list[common.Record] = []
    stores = ("lmdb", "redis") if args.store == "both" else (args.store,)
    for store in stores:
        with contextlib.ExitStack() as stack:
            if store == "redis":
                kvs = stack.enter_context(
                    redis_server(stack.enter_context(tempfile.TemporaryDirectory()))
                )
            else:
                kvs = None
            records += measure_store(store, kvs, n, rng, args.zipf)

    by = {(r["store"], r["object"], r["variant"]): r for r in records}
    for r in records:
        off = by[(r["store"], r["object"], "locality off")]
        r["median_vs_off"] = common.ratio(r["median_ms"], off["median_ms"])
        r["p99_vs_off"] = common.ratio(r["p99_ms"], off["p99_ms"])
    common.print_table(
        records,
        ("scenario", "store", "variant", "median_ms", "p99_ms", "median_vs_off", "p99_vs_off"),
        title="locality: dynamic lookups, sequential requests",
    )
    common.write_json(NAME, records, args.out)
    plot(records, args.out)
    return 0


def measure_store(
    store: str, kvs: str | None, n: int, rng: np.random.Generator, zipf: float
) -> list[common.Record]:
    """Each variant on a runtime of its own (own workers, own caches: caches are the
    point, so variants must not share them), warmed up, then `n` sequential requests."""
    records: list[common.Record] = []
    started = time.perf_counter()
    for size_name, size in SIZES.items():
        prefix = f"obj{size_name}"
        base = rng.integers(0, 256, size, dtype=np.uint8)
        warm = zipf_keys(rng, WARM_UP, zipf, prefix)
        keys = zipf_keys(rng, n, zipf, prefix)
        for variant, rules in VARIANTS.items():
            runtime = sf.LocalRuntime(
                min_workers=WORKERS, max_workers=WORKERS, kvs=kvs, cache_bytes=CACHE_MB << 20
            )
            try:
                app = flow().deploy(rules=rules, runtime=runtime)
                for i in range(OBJECTS):
                    obj = base.copy()
                    obj[:8] = i  # distinct objects, no RNG cost per object
                    app.kvs.put(f"{prefix}-{i}", obj)
                expected = int(base[-1]) + size  # obj[0] == 0 for key 0
                out = app.run(sf.Table({"key": [f"{prefix}-0"]})).result(timeout=60)
                if out.column("summary") != [expected]:
                    raise AssertionError(f"lookup returned {out.to_rows()}, not {expected}")
                for key in warm:
                    app.run(sf.Table({"key": [key]})).result(timeout=60)
                tables = iter([sf.Table({"key": [key]}) for key in keys])
                call = functools.partial(_request, app, tables)
                lat = common.sequential(call, n)
            finally:
                runtime.stop()
            records.append(
                common.record(
                    f"{OBJECTS} objects of {size_name}, zipf s={zipf:g}",
                    "serveflow",
                    lat,
                    None,
                    store=store,
                    variant=variant,
                    locality=variant == "locality on",
                    object=size_name,
                    object_bytes=size,
                    zipf_s=zipf,
                    workers=WORKERS,
                    cache_mb=CACHE_MB,
                    warm_up=WARM_UP,
                )
            )
        log.info("%s %s done (%.0f s so far)", store, size_name, time.perf_counter() - started)
    return records


def _request(app: sf.App, tables: Iterator[sf.Table]) -> sf.Table:
    return app.run(next(tables)).result(timeout=60)


def plot(records: list[common.Record], out_dir: Path) -> None:
    fig, axes = common.new_figure(1, 1, size=(8, 4.5))
    ax = axes[0][0]
    sizes = list(SIZES)
    xs = np.arange(len(sizes))
    for offset, variant in ((-0.2, "locality on"), (0.2, "locality off")):
        rows = [
            next(r for r in records if r["object"] == s and r["variant"] == variant) for s in sizes
        ]
        ax.bar(xs + offset, [r["median_ms"] for r in rows], 0.4, label=f"{variant} median")
        ax.scatter(xs + offset, [r["p99_ms"] for r in rows], marker="_", s=400, color="black")
    ax.set_xticks(xs, sizes)
    ax.set_xlabel("object size (bars: median; black marks: p99)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title("dynamic lookups of 100 objects, Zipf-like keys")
    ax.legend()
    common.save_figure(fig, NAME, out_dir)


if __name__ == "__main__":
    sys.exit(main())
