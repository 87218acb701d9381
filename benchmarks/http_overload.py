"""HTTP overload: the 3-stage pipeline driven open-loop at 3x its sustainable rate.

1. capacity: `serveflow serve` (3 unfused identity maps, as in http_load) under closed
   loops of 64 clients; unloaded: one closed-loop client.
2. sustainable rate: open-loop arrivals at 0.25, 0.5, 0.75 and 1x the capacity; the
   highest step whose requests are all answered with p99 under 50 ms. The p99 at 0.25x
   is the unloaded p99 an admitted request should keep.
3. overload: a fresh server with a bounded `--max-in-flight`, open-loop arrivals at 3x
   the sustainable rate for `--seconds` (20). Admitted requests (200) keep their latency;
   the rest are refused (503 + Retry-After) without queueing. The server's memory (RSS of
   the server process, and with its worker processes) is sampled every 0.5 s.

Arrivals are on a fixed schedule; each request's latency is measured from when it was
sent. The generator (this process, asyncio + aiohttp) and the server share the machine's
cores, so the offered rate it reached is reported next to the one asked for.

    python -m benchmarks.http_overload [--quick] [--seconds 20] [--max-in-flight 8]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks import common
from benchmarks.http_load import ServeflowServer, _closed_loop

log = logging.getLogger("benchmarks.http_overload")

NAME = "http_overload"
SYSTEM = "serveflow"
OVERLOAD_FACTOR = 3.0
MAX_OUTSTANDING = 4096  # the generator's own bound on requests it has open
RSS_EVERY_S = 0.5
RSS_MAX_SAMPLES = 2000
GENERATORS = 2  # load generator processes for the open loops
STEPS = (0.25, 0.5, 0.75, 1.0)  # open-loop rates tried, as fractions of the capacity
SUSTAINABLE_P99_MS = 50.0  # a rate is sustained while its p99 stays under this
UNLOADED = f"open loop at {STEPS[0]:g}x capacity"  # the reference p99
CONNECTIONS = 128  # keep-alive connections of all generators together (like a client pool)


# --- memory -----------------------------------------------------------------------


def _rss_bytes(pid: int) -> int:
    """Resident memory of one process (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    """Direct children of a process (Linux /proc)."""
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return found


class RSSSampler:
    """Samples (t, server RSS, server + workers RSS) in a thread, at most `limit` times."""

    def __init__(self, pid: int, every_s: float = RSS_EVERY_S, limit: int = RSS_MAX_SAMPLES):
        self.pid = pid
        self.samples: list[tuple[float, int, int]] = []
        self._every_s = every_s
        self._limit = limit
        self._stop = threading.Event()
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.samples) < self._limit:
            own = _rss_bytes(self.pid)
            total = own + sum(_rss_bytes(child) for child in _children(self.pid))
            self.samples.append((time.perf_counter() - self._start, own, total))
            self._stop.wait(self._every_s)

    def __enter__(self) -> RSSSampler:
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


# --- open-loop load ---------------------------------------------------------------


Outcome = tuple[float, float, int]  # (sent at, s from start; latency ms; HTTP status or 0)


async def open_loop(
    url: str,
    rate: float,
    seconds: float,
    start_at: float | None = None,
    phase: float = 0.0,
    connections: int = CONNECTIONS,
) -> tuple[list[Outcome], float, int]:
    """Requests at `rate`/s on a fixed schedule for `seconds` (from wall-clock `start_at`,
    shifted by `phase` of an interval), each answered or not: outcomes, the offered rate
    reached, and arrivals skipped because MAX_OUTSTANDING requests were open. A request
    waiting for one of the `connections` counts that wait in its latency: arrivals do
    not slow down when the server does."""
    outcomes: list[Outcome] = []
    skipped = 0
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if start_at is not None:
            await asyncio.sleep(max(0.0, start_at - time.time()))
        start = time.perf_counter()

        async def one(value: int) -> None:
            sent = time.perf_counter()
            body = {"rows": [{"x": value}]}
            try:
                async with session.post(url, json=body) as response:
                    await response.read()
                    status = response.status
            except (TimeoutError, aiohttp.ClientError):
                status = 0
            outcomes.append((sent - start, (time.perf_counter() - sent) * 1e3, status))

        tasks: set[asyncio.Task[None]] = set()
        total = int(rate * seconds)
        for i in range(total):
            delay = start + (i + phase) / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(tasks) >= MAX_OUTSTANDING:
                skipped += 1
                continue
            task = asyncio.create_task(one(i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        sent_for = time.perf_counter() - start
        await asyncio.gather(*list(tasks))
    return outcomes, (total - skipped) / sent_for, skipped


def _open_loop_process(
    url: str, rate: float, seconds: float, start_at: float, phase: float, connections: int
) -> tuple[list[Outcome], float, int]:
    return asyncio.run(open_loop(url, rate, seconds, start_at, phase, connections))


def open_loop_parallel(
    url: str, rate: float, seconds: float, processes: int = GENERATORS
) -> tuple[list[Outcome], float, int]:
    """`open_loop` split over `processes` generator processes (one asyncio loop cannot
    offer a few thousand req/s), interleaved, started together; outcomes merged."""
    context = multiprocessing.get_context("spawn")
    start_at = time.time() + 3.0  # room for the processes to start
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        futures = [
            pool.submit(
                _open_loop_process,
                url,
                rate / processes,
                seconds,
                start_at,
                k / processes,
                max(1, CONNECTIONS // processes),
            )
            for k in range(processes)
        ]
        parts = [f.result(timeout=seconds + 120) for f in futures]
    outcomes = sorted(o for part in parts for o in part[0])
    return outcomes, sum(part[1] for part in parts), sum(part[2] for part in parts)


def _per_second(outcomes: list[Outcome], seconds: float) -> list[dict[str, Any]]:
    """Per-second bins: admitted and refused counts, admitted p50/p99, refusal p99."""
    bins: list[dict[str, Any]] = []
    for second in range(int(seconds + 0.999)):
        inside = [o for o in outcomes if second <= o[0] < second + 1]
        ok = [ms for _, ms, status in inside if status == 200]
        refused = [ms for _, ms, status in inside if status in (429, 503)]
        bins.append(
            {
                "t_s": second,
                "sent": len(inside),
                "admitted": len(ok),
                "refused": len(refused),
                "other": len(inside) - len(ok) - len(refused),
                "admitted_p50_ms": common.percentile(ok, 50) if ok else None,
                "admitted_p99_ms": common.percentile(ok, 99) if ok else None,
                "refused_p99_ms": common.percentile(refused, 99) if refused else None,
            }
        )
    return bins


# --- the run ----------------------------------------------------------------------


def run(args: argparse.Namespace) -> list[common.Record]:
    quick = args.quick
    warm_s = 2.0 if quick else 5.0
    overload_s = args.seconds or (8.0 if quick else 20.0)
    records: list[common.Record] = []

    server = ServeflowServer(batching=args.batching)
    try:
        asyncio.run(_closed_loop(server.call, 4, 2.0))  # warm-up
        latencies, errors, elapsed = asyncio.run(_closed_loop(server.call, 64, warm_s))
        capacity = len(latencies) / elapsed
        records.append(
            common.record(
                "capacity: closed loop, 64 clients", SYSTEM, latencies, capacity, errors=errors
            )
        )
        latencies, errors, elapsed = asyncio.run(_closed_loop(server.call, 1, warm_s))
        records.append(
            common.record(
                "unloaded: closed loop, 1 client",
                SYSTEM,
                latencies,
                len(latencies) / elapsed,
                errors=errors,
            )
        )
        # The sustainable rate: the highest open-loop step whose arrivals are all
        # answered with a p99 under SUSTAINABLE_P99_MS.
        sustainable = None
        for fraction in STEPS:
            step_rate = fraction * capacity
            outcomes, offered, _ = open_loop_parallel(server.url, step_rate, warm_s)
            ok = [ms for _, ms, status in outcomes if status == 200]
            record = common.record(
                f"open loop at {fraction:g}x capacity",
                SYSTEM,
                ok,
                len(ok) / warm_s,
                rate_asked=round(step_rate, 1),
                rate_offered=round(offered, 1),
                failed=len(outcomes) - len(ok),
            )
            records.append(record)
            kept = (
                len(ok) == len(outcomes)
                and offered >= 0.9 * step_rate
                and record["p99_ms"] is not None
                and record["p99_ms"] <= SUSTAINABLE_P99_MS
            )
            log.info("open loop %.0f req/s: p99 %s ms, kept: %s", step_rate, record["p99_ms"], kept)
            if kept or sustainable is None:
                sustainable = step_rate
            if not kept:
                break
        assert sustainable is not None
        records.append(common.record("sustainable rate", SYSTEM, None, sustainable))
        log.info("sustainable rate: %.0f req/s", sustainable)
    finally:
        server.close()

    rate = OVERLOAD_FACTOR * sustainable
    server = ServeflowServer(batching=args.batching, max_in_flight=args.max_in_flight)
    try:
        asyncio.run(_closed_loop(server.call, 4, 2.0))
        with RSSSampler(server.process.pid) as sampler:
            # memory before the overload starts: the generators start 3 s from now
            outcomes, offered, skipped = open_loop_parallel(server.url, rate, overload_s)
            time.sleep(2.0)  # and after it
    finally:
        server.close()
    ok = [ms for _, ms, status in outcomes if status == 200]
    refused = [ms for _, ms, status in outcomes if status in (429, 503)]
    other = len(outcomes) - len(ok) - len(refused)
    common_fields = {
        "rate_asked": round(rate, 1),
        "rate_offered": round(offered, 1),
        "max_in_flight": args.max_in_flight,
        "seconds": overload_s,
        "generator_skipped": skipped,
        "other_failures": other,
    }
    records.append(
        common.record(
            f"overload {OVERLOAD_FACTOR:g}x: admitted (200)",
            SYSTEM,
            ok,
            len(ok) / overload_s,
            **common_fields,
        )
    )
    records.append(
        common.record(
            f"overload {OVERLOAD_FACTOR:g}x: refused (503/429)",
            SYSTEM,
            refused,
            len(refused) / overload_s,
            **common_fields,
        )
    )
    rss = sampler.samples
    records.append(
        common.record(
            "overload: server memory",
            SYSTEM,
            rss_server_mb=[round(own / 2**20, 1) for _, own, _ in rss],
            rss_with_workers_mb=[round(total / 2**20, 1) for _, _, total in rss],
            rss_t_s=[round(t, 2) for t, _, _ in rss],
            rss_server_max_mb=round(max((own for _, own, _ in rss), default=0) / 2**20, 1),
            rss_server_first_mb=round(rss[0][1] / 2**20, 1) if rss else None,
            rss_server_last_mb=round(rss[-1][1] / 2**20, 1) if rss else None,
            per_second=_per_second(outcomes, overload_s),
        )
    )
    return records


def plot(records: list[common.Record], out: Path) -> None:
    by = {r["scenario"]: r for r in records}
    memory = by["overload: server memory"]
    bins = memory["per_second"]
    fig, axes = common.new_figure(1, 3, size=(15, 4.5))
    ax = axes[0][0]
    t = [b["t_s"] + 0.5 for b in bins]
    ax.plot(t, [b["sent"] for b in bins], "k.-", label="sent")
    ax.plot(t, [b["admitted"] for b in bins], "o-", color="C0", label="admitted (200)")
    ax.plot(t, [b["refused"] for b in bins], "s-", color="C3", label="refused (503)")
    ax.set_xlabel("time in overload (s)")
    ax.set_ylabel("requests per second")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    ax.plot(t, [b["admitted_p99_ms"] for b in bins], "o-", color="C0", label="admitted p99")
    ax.plot(t, [b["admitted_p50_ms"] for b in bins], ".--", color="C0", label="admitted p50")
    ax.plot(t, [b["refused_p99_ms"] for b in bins], "s-", color="C3", label="refusal p99")
    unloaded = by.get(UNLOADED)
    if unloaded and unloaded["p99_ms"]:
        ax.axhline(unloaded["p99_ms"], color="C2", ls=":", label=f"unloaded p99 ({UNLOADED})")
    ax.set_yscale("log")
    ax.set_xlabel("time in overload (s)")
    ax.set_ylabel("latency (ms)")
    ax.legend(fontsize=8)
    ax = axes[0][2]
    ax.plot(memory["rss_t_s"], memory["rss_server_mb"], "-", color="C1", label="server process")
    ax.plot(memory["rss_t_s"], memory["rss_with_workers_mb"], "--", color="C4",
            label="server + workers")  # fmt: skip
    ax.set_ylim(bottom=0)
    ax.set_xlabel("time (s; overload from 3 s)")
    ax.set_ylabel("RSS (MB)")
    ax.legend(fontsize=8)
    for row in axes:
        for a in row:
            a.grid(True, alpha=0.3)
    admitted = by[f"overload {OVERLOAD_FACTOR:g}x: admitted (200)"]
    fig.suptitle(
        f"3-stage pipeline over HTTP at {OVERLOAD_FACTOR:g}x its sustainable rate "
        f"({admitted['rate_asked']:.0f} req/s asked, {admitted['rate_offered']:.0f} offered), "
        f"--max-in-flight {admitted['max_in_flight']}"
    )
    common.save_figure(fig, NAME, out)


def main(argv: list[str] | None = None) -> None:
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--seconds", type=float, default=None, help="overload seconds (20)")
        parser.add_argument(
            "--max-in-flight", type=int, default=8, help="the server's bound (default 8)"
        )
        parser.add_argument(
            "--batching", action="store_true", help="batching=True stages (serveflow-batched)"
        )

    args = common.parse_args(__doc__.splitlines()[0], argv, configure)
    records = run(args)
    table = [r for r in records if r.get("n")]
    common.print_table(
        table,
        ("scenario", "median_ms", "p99_ms", "throughput_rps", "n"),
        title="HTTP overload, 3-stage identity pipeline (serveflow)",
    )
    by = {r["scenario"]: r for r in records}
    admitted = by[f"overload {OVERLOAD_FACTOR:g}x: admitted (200)"]
    refused = by[f"overload {OVERLOAD_FACTOR:g}x: refused (503/429)"]
    unloaded = by[UNLOADED]
    memory = by["overload: server memory"]
    capacity = by["capacity: closed loop, 64 clients"]["throughput_rps"]
    print(
        f"\nsustainable rate {by['sustainable rate']['throughput_rps']:.0f} req/s (p99 under "
        f"{SUSTAINABLE_P99_MS:g} ms), capacity {capacity:.0f} req/s"
    )
    print(
        f"offered {admitted['rate_offered']:.0f} req/s (asked {admitted['rate_asked']:.0f}); "
        f"admitted p99 {common.fmt(admitted['p99_ms'])} ms vs unloaded p99 "
        f"{common.fmt(unloaded['p99_ms'])} ms "
        f"({common.fmt(common.ratio(admitted['p99_ms'], unloaded['p99_ms']))}x); "
        f"refusals: median {common.fmt(refused['median_ms'])} ms, p99 "
        f"{common.fmt(refused['p99_ms'])} ms; other failures {admitted['other_failures']}"
    )
    print(
        f"server RSS: {memory['rss_server_first_mb']} MB before, max "
        f"{memory['rss_server_max_mb']} MB, {memory['rss_server_last_mb']} MB after"
    )
    common.write_json(NAME, records, args.out)
    plot(records, args.out)


if __name__ == "__main__":
    main()
