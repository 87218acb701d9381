"""Reads from the key-value stores behind `lookup`: one `get` of an 8 KB or a 4 MB
numpy array, and a `get_many` of 16 8 KB arrays, sequential, from one thread.

Systems, all in this run on this machine:
- memory: `MemoryKVS` (in-process dict of pickles; the floor for unpickling).
- lmdb: `LMDBStore` (the default store; unpickles straight from the mapped pages).
- redis: `RedisStore` on a `redis-server` this benchmark starts on a loopback port.
- cached-lmdb / cached-redis: `CachedKVS` hits over those stores (a version check, no
  value transfer, no unpickling).

    python -m benchmarks.kvs_bench [--quick]

Writes benchmarks/results/kvs_bench.json (and kvs_bench.png with matplotlib).
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from benchmarks import common
from serveflow.runtime.cache import CachedKVS
from serveflow.runtime.kvs import KVS, LMDBStore, MemoryKVS, RedisStore

log = logging.getLogger("benchmarks.kvs_bench")

NAME = "kvs_bench"
SMALL = 8 * 1024
LARGE = 4 * 1024 * 1024
MANY = 16


@contextmanager
def redis_server(workdir: str) -> Iterator[str]:
    """A `redis-server` on a free loopback port, no persistence; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH: run `bash scripts/redis.sh` first")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
            "--loglevel",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while True:
            try:
                RedisStore(url).close()
                break
            except ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _array(nbytes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(nbytes // 8)


def _load(store: KVS) -> None:
    store.put("small", _array(SMALL, 1))
    store.put("large", _array(LARGE, 2))
    for i in range(MANY):
        store.put(f"many{i}", _array(SMALL, 10 + i))


def _scenarios(store: Any) -> dict[str, Callable[[], Any]]:
    many = [f"many{i}" for i in range(MANY)]
    return {
        "get 8KB": lambda: store.get("small"),
        "get 4MB": lambda: store.get("large"),
        f"get_many {MANY}x8KB": lambda: store.get_many(many),
    }


def main(argv: list[str] | None = None) -> list[common.Record]:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    n = 300 if args.quick else 3000
    n_large = 60 if args.quick else 400
    records: list[common.Record] = []
    with tempfile.TemporaryDirectory(prefix="kvs-bench-") as tmp, redis_server(tmp) as url:
        lmdb_store = LMDBStore(f"{tmp}/lmdb")
        redis_store = RedisStore(url)
        memory_store = MemoryKVS()
        for store in (lmdb_store, redis_store, memory_store):
            _load(store)
        systems: dict[str, Any] = {
            "memory": memory_store,
            "lmdb": lmdb_store,
            "redis": redis_store,
            "cached-lmdb": CachedKVS(lmdb_store, max_bytes=64 << 20),
            "cached-redis": CachedKVS(redis_store, max_bytes=64 << 20),
        }
        try:
            for scenario in _scenarios(memory_store):
                count = n_large if "4MB" in scenario else n
                calls = {name: _scenarios(store)[scenario] for name, store in systems.items()}
                for call in calls.values():  # warm up; fills the caches
                    for _ in range(5):
                        call()
                measure = {name: _measurer(call) for name, call in calls.items()}
                latencies = common.interleaved(measure, count)
                for name, lat in latencies.items():
                    throughput = 1e3 * len(lat) / sum(lat)  # one client, back to back
                    records.append(common.record(scenario, name, lat, throughput))
            hits = {name: s.hits for name, s in systems.items() if isinstance(s, CachedKVS)}
            log.info("cache hits: %s", hits)
        finally:
            for store in (lmdb_store, redis_store):
                store.close()
    common.print_table(records, title="key-value store reads (one thread, sequential)")
    common.write_json(NAME, records, args.out)
    _plot(records, args.out)
    return records


def _measurer(call: Callable[[], Any]) -> Callable[[int], list[float]]:
    return lambda k: common.sequential(call, k)


def _plot(records: list[common.Record], out_dir: Any) -> None:
    try:
        fig, axes = common.new_figure(1, 1, size=(9.0, 4.5))
    except ImportError:
        log.info("matplotlib not installed (the bench extra): no plot")
        return
    ax = axes[0][0]
    scenarios = list(dict.fromkeys(r["scenario"] for r in records))
    systems = list(dict.fromkeys(r["system"] for r in records))
    width = 0.8 / len(systems)
    for j, system in enumerate(systems):
        medians = [
            next(r["median_ms"] for r in records if r["scenario"] == s and r["system"] == system)
            for s in scenarios
        ]
        ax.bar([i + j * width for i in range(len(scenarios))], medians, width, label=system)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(scenarios))], scenarios)
    ax.set_yscale("log")
    ax.set_ylabel("median latency (ms, log)")
    ax.set_title("KVS reads")
    ax.legend()
    common.save_figure(fig, NAME, out_dir)


if __name__ == "__main__":
    main()
