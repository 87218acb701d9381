"""HTTP load: a trivial 3-stage pipeline behind an HTTP server, 1, 8 and 64 clients.

Systems, started in this run on this machine, each in its own processes:
- serveflow: `serveflow serve` (uvicorn) on three unfused identity maps
  (`--rules fusion=off`) on the embedded runtime; serveflow-fused for reference.
- ray-serve: Ray Serve's HTTP ingress (a FastAPI-free Starlette ingress deployment)
  calling three composed identity deployments through handles.

The load generator (this process, asyncio + aiohttp) runs closed loops: each client sends
its next request when the previous one answered. Every system gets the same warm-up, then
a fixed time per concurrency level. Prints a table, writes results/http_load.json and
results/http_load.png.

    python -m benchmarks.http_load [--quick] [--no-ray] [--levels 1,8,64]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks import common

log = logging.getLogger("benchmarks.http_load")

NAME = "http_load"
STAGES = 3
TARGET_THROUGHPUT_VS_RAY = 10.0  # serveflow req/s / ray-serve req/s at 64 clients

FLOWS_FILE = """
import serveflow as sf


def identity(value):
    return value


chain = sf.Flow("chain")
stream = chain
for i in range({stages}):
    stream = stream.map(identity, col="x", name=f"identity{{i + 1}}")
"""


class ServeflowServer:
    """`serveflow serve` in a child process; `url` of its predict endpoint."""

    def __init__(self, fused: bool) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="sf-http-load-")
        path = Path(self._dir.name) / "chain_flows.py"
        path.write_text(FLOWS_FILE.format(stages=STAGES))
        command = [
            sys.executable,
            "-m",
            "serveflow.serving.cli",
            "serve",
            str(path),
            "--port",
            "0",
            "--log-level",
            "warning",
            "--max-in-flight",
            "100000",
        ]
        if not fused:
            command += ["--rules", "fusion=off"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline() if self.process.stdout else ""
        if " on http://" not in line:
            self.close()
            raise RuntimeError(f"serveflow serve did not start: {line!r}")
        base = line.split(" on ")[1].split()[0]
        self.url = f"{base}/v1/flows/chain/predict"

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._dir.cleanup()


class RayServeServer:
    """Ray Serve: an HTTP ingress deployment and three identity deployments."""

    def __init__(self, port: int) -> None:
        import ray
        from ray import serve
        from starlette.requests import Request

        ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)  # fmt: skip

        # Replicas ask for 1 CPU each by default: 4 would never all be placed on 2 cores.
        @serve.deployment(ray_actor_options={"num_cpus": 0})
        class Identity:
            async def __call__(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
                return rows

        @serve.deployment(ray_actor_options={"num_cpus": 0})
        class Ingress:
            def __init__(self, *stages: Any) -> None:
                self.stages = stages

            async def __call__(self, request: Request) -> dict[str, Any]:
                rows = (await request.json())["rows"]
                for stage in self.stages:
                    rows = await stage.remote(rows)
                return {"rows": rows}

        serve.start(http_options={"host": "127.0.0.1", "port": port})
        stages = [Identity.options(name=f"identity{i + 1}").bind() for i in range(STAGES)]
        serve.run(Ingress.bind(*stages), name="chain", route_prefix="/chain")
        self.url = f"http://127.0.0.1:{port}/chain"

    def close(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


async def _closed_loop(url: str, clients: int, seconds: float) -> tuple[list[float], int, float]:
    """`clients` closed loops for `seconds`: latencies (ms) of 200s, errors, elapsed.

    aiohttp, not httpx: httpx's async client itself collapses at 64 concurrent
    connections here (about 40 req/s against an endpoint that serves 1,100).
    """
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        stop_at = time.perf_counter() + seconds

        async def loop(worker: int) -> None:
            nonlocal errors
            i = 0
            while time.perf_counter() < stop_at:
                body = {"rows": [{"x": worker * 1_000_000 + i}]}
                sent = time.perf_counter()
                try:
                    async with session.post(url, json=body) as response:
                        ok = response.status == 200 and await response.json() == body
                except (TimeoutError, aiohttp.ClientError):
                    ok = False
                if ok:
                    latencies.append((time.perf_counter() - sent) * 1e3)
                else:
                    errors += 1
                i += 1

        started = time.perf_counter()
        await asyncio.gather(*(loop(w) for w in range(clients)))
        elapsed = time.perf_counter() - started
    return latencies, errors, elapsed


def measure(system: str, url: str, levels: list[int], seconds: float) -> list[common.Record]:
    asyncio.run(_closed_loop(url, 4, min(2.0, seconds)))  # warm-up: workers, connections
    records = []
    for clients in levels:
        latencies, errors, elapsed = asyncio.run(_closed_loop(url, clients, seconds))
        rps = len(latencies) / elapsed
        records.append(
            common.record(
                f"{clients} clients",
                system,
                latencies,
                rps,
                clients=clients,
                errors=errors,
                seconds=round(elapsed, 2),
            )
        )
        log.info("%s @%d clients: %.0f req/s, %d errors", system, clients, rps, errors)
    return records


def plot(records: list[common.Record], out: Path) -> None:
    fig, axes = common.new_figure(1, 2, size=(11, 4.5))
    systems = list(dict.fromkeys(r["system"] for r in records))
    for index, system in enumerate(systems):
        rows = [r for r in records if r["system"] == system]
        clients = [r["clients"] for r in rows]
        color = f"C{index}"  # one colour per system in both panels
        axes[0][0].plot(clients, [r["throughput_rps"] for r in rows], "o-", color=color,
                        label=system)  # fmt: skip
        axes[0][1].plot(clients, [r["p99_ms"] for r in rows], "o-", color=color,
                        label=f"{system} p99")  # fmt: skip
        axes[0][1].plot(clients, [r["median_ms"] for r in rows], ".--", color=color,
                        label=f"{system} median")  # fmt: skip
    for ax, label in ((axes[0][0], "throughput (req/s)"), (axes[0][1], "latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent HTTP clients")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{STAGES}-stage identity pipeline over HTTP (same machine, same run)")
    common.save_figure(fig, NAME, out)


def main(argv: list[str] | None = None) -> None:
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--no-ray", action="store_true", help="skip the Ray Serve peer")
        parser.add_argument("--levels", default="1,8,64", help="client counts (default 1,8,64)")
        parser.add_argument("--seconds", type=float, default=None, help="seconds per level")
        parser.add_argument("--ray-port", type=int, default=8127, help="Ray Serve HTTP port")

    args = common.parse_args(__doc__.splitlines()[0], argv, configure)
    levels = [int(n) for n in args.levels.split(",")]
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    systems: list[tuple[str, Callable[[], Any]]] = [
        ("serveflow", lambda: ServeflowServer(fused=False)),
        ("serveflow-fused", lambda: ServeflowServer(fused=True)),
    ]
    if not args.no_ray:
        systems.append(("ray-serve", lambda: RayServeServer(args.ray_port)))
    records: list[common.Record] = []
    for system, start in systems:
        try:
            server = start()
        except Exception as error:  # a peer that cannot start is reported, not fatal
            log.warning("%s unavailable: %s", system, error)
            records.append(common.record("all", system, note=f"unavailable: {error}"))
            continue
        try:
            records += measure(system, server.url, levels, seconds)
        finally:
            server.close()
    common.print_table(
        [r for r in records if r.get("clients")],
        ("scenario", "system", "median_ms", "p99_ms", "throughput_rps", "errors"),
        title=f"HTTP load, {STAGES}-stage identity pipeline, {seconds:g} s per level",
    )
    by = {(r["system"], r.get("clients")): r for r in records}
    top = max(levels)
    sf_top, ray_top = by.get(("serveflow", top)), by.get(("ray-serve", top))
    if sf_top and ray_top:
        gain = common.ratio(sf_top["throughput_rps"], ray_top["throughput_rps"])
        print(f"\nthroughput at {top} clients, serveflow / ray-serve: {common.fmt(gain)}x "
              f"(target >= {TARGET_THROUGHPUT_VS_RAY:g}x)")  # fmt: skip
        for clients in levels:
            s, r = by.get(("serveflow", clients)), by.get(("ray-serve", clients))
            if s and r:
                verdict = "lower" if (s["p99_ms"] or 0) < (r["p99_ms"] or 0) else "NOT lower"
                print(f"p99 at {clients} clients: serveflow {common.fmt(s['p99_ms'])} ms, "
                      f"ray-serve {common.fmt(r['p99_ms'])} ms ({verdict})")  # fmt: skip
    common.write_json(NAME, records, args.out)
    plot([r for r in records if r.get("clients")], args.out)


if __name__ == "__main__":
    main()
