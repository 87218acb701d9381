"""HTTP load: a trivial 3-stage pipeline behind an HTTP server, 1, 8 and 64 clients.

Systems, started in this run on this machine, each in its own processes:
- serveflow: `serveflow serve` (uvicorn with uvloop + httptools) on three unfused
  identity maps (`--rules fusion=off`) on the embedded runtime;
  serveflow-batched: the same maps with `batching=True` (each stage batches across
  concurrent requests); serveflow-fused: the three maps fused into one stage;
  serveflow-no-coalesce: every HTTP request its own runtime request (by default the
  server merges requests that arrive together, see serving/coalesce.py);
  serveflow-h11: no coalescing, on uvicorn's pure-Python stack (asyncio loop, h11).
- ray-serve: Ray Serve's HTTP ingress (a FastAPI-free Starlette ingress deployment)
  calling three composed identity deployments through handles.
- triton: Triton Inference Server (nvidia-pytriton, CPU, in benchmarks/.triton-venv)
  serving one Python identity model with dynamic batching (max batch 64) over its
  KServe v2 HTTP/JSON endpoint; triton-3-chained: three such models called one after
  the other by the client (pytriton cannot build an ensemble of Python models).

The load generator (this process, asyncio + aiohttp) runs closed loops: each client sends
its next request when the previous one answered. Every system gets the same warm-up, then
a fixed time per concurrency level. Prints a table, writes results/http_load.json and
results/http_load.png.

    python -m benchmarks.http_load [--quick] [--no-ray] [--no-triton] [--levels 1,8,64]
        [--systems serveflow,triton,...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import select
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks import common

log = logging.getLogger("benchmarks.http_load")

NAME = "http_load"
STAGES = 3
TARGET_THROUGHPUT_VS_RAY = 10.0  # serveflow req/s / ray-serve req/s at 64 clients
TRITON_MAX_BATCH = 64

FLOWS_FILE = """
import serveflow as sf


def identity(value):
    return value


def identities(values):
    return values


chain = sf.Flow("chain")
stream = chain
for i in range({stages}):
    if {batching}:
        stream = stream.map(identities, col="x", batching=True, name=f"identity{{i + 1}}")
    else:
        stream = stream.map(identity, col="x", name=f"identity{{i + 1}}")
"""

Call = Callable[[aiohttp.ClientSession, int], Awaitable[bool]]  # one request; True if right


def rows_call(url: str) -> Call:
    """POST {"rows": [{"x": value}]} and expect it back (serveflow, Ray Serve)."""

    async def call(session: aiohttp.ClientSession, value: int) -> bool:
        body = {"rows": [{"x": value}]}
        async with session.post(url, json=body) as response:
            return response.status == 200 and await response.json() == body

    return call


class ServeflowServer:
    """`serveflow serve` in a child process; `url` of its predict endpoint."""

    def __init__(
        self,
        fused: bool = False,
        batching: bool = False,
        extra: tuple[str, ...] = (),
        max_in_flight: int = 100_000,
        source: str | None = None,
    ) -> None:
        """`source`: the `src` folder of another serveflow tree to serve from (a
        baseline to compare with in the same run), instead of the installed one."""
        self._dir = tempfile.TemporaryDirectory(prefix="sf-http-load-")
        path = Path(self._dir.name) / "chain_flows.py"
        path.write_text(FLOWS_FILE.format(stages=STAGES, batching=batching))
        options = ["--max-in-flight", str(max_in_flight), *extra]
        if not fused:
            options += ["--rules", "fusion=off"]
        self.process, self.base = common.serve(path, *options, source=source)
        self.url = f"{self.base}/v1/flows/chain/predict"
        self.call = rows_call(self.url)

    def close(self) -> None:
        common.stop(self.process)
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
        self.call = rows_call(self.url)

    def close(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


TRITON_SERVER = """
import json, os, socket, sys

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@batch
def identity(x):
    return {{"out": x}}


protocol = os.fdopen(os.dup(1), "w", buffering=1)  # tritonserver logs to fd 1: keep
os.dup2(2, 1)                                      # the protocol on a private copy
http_port, grpc_port = free_port(), free_port()
config = TritonConfig(http_address="127.0.0.1", http_port=http_port,
                      grpc_address="127.0.0.1", grpc_port=grpc_port,
                      metrics_address="127.0.0.1", metrics_port=free_port(),
                      allow_gpu_metrics=False, exit_timeout_secs=5)
with Triton(config=config) as triton:
    for name in sys.argv[1:]:
        triton.bind(model_name=name, infer_func=identity,
                    inputs=[Tensor(name="x", dtype=np.int64, shape=(1,))],
                    outputs=[Tensor(name="out", dtype=np.int64, shape=(1,))],
                    config=ModelConfig(max_batch_size={max_batch}, batcher=DynamicBatcher()))
    triton.run()
    protocol.write(json.dumps({{"http_port": http_port, "grpc_port": grpc_port}}) + "\\n")
    sys.stdin.read()  # until the parent closes our stdin
"""


def triton_call(base: str, models: list[str]) -> Call:
    """KServe v2 JSON inference: the value through each model in turn."""
    urls = [f"{base}/v2/models/{model}/infer" for model in models]

    async def call(session: aiohttp.ClientSession, value: int) -> bool:
        data = [value]
        for url in urls:
            body = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "INT64", "data": data}]}
            async with session.post(url, json=body) as response:
                if response.status != 200:
                    return False
                data = (await response.json())["outputs"][0]["data"]
        return data == [value]

    return call


class TritonServer:
    """Triton (nvidia-pytriton) in benchmarks/.triton-venv serving identity models over
    HTTP (and gRPC, on `grpc_port`); `call` sends one request through `chain` of them
    (1: one model)."""

    def __init__(self, chain: int, start_timeout_s: float = 180.0) -> None:
        from benchmarks.peers.triton import VENV_PYTHON, TritonUnavailable, _python_lib_dir

        if not VENV_PYTHON.exists():
            raise TritonUnavailable(f"{VENV_PYTHON} missing: run `bash scripts/triton_env.sh`")
        env = dict(os.environ)
        lib = _python_lib_dir(VENV_PYTHON)
        if lib is not None:
            env["LD_LIBRARY_PATH"] = ":".join(filter(None, [str(lib), env.get("LD_LIBRARY_PATH")]))
        env.pop("PYTHONPATH", None)
        self._dir = tempfile.TemporaryDirectory(prefix="sf-http-load-triton-")
        script = Path(self._dir.name) / "triton_http.py"
        script.write_text(TRITON_SERVER.format(max_batch=TRITON_MAX_BATCH))
        self._log = open(Path(self._dir.name) / "triton.log", "w+")  # noqa: SIM115
        models = [f"identity{i + 1}" for i in range(chain)]
        self.process = subprocess.Popen(
            [str(VENV_PYTHON), str(script), *models],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            text=True,
        )
        try:
            port, self.grpc_port = self._wait_ready(start_timeout_s)
        except BaseException:
            self.close()
            raise
        self.url = f"http://127.0.0.1:{port}"
        self.call = triton_call(self.url, models)

    def _wait_ready(self, timeout_s: float) -> tuple[int, int]:
        from benchmarks.peers.triton import TritonUnavailable

        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if select.select([self.process.stdout], [], [], 0.5)[0]:
                line = self.process.stdout.readline()
                if line.startswith("{"):
                    ports = json.loads(line)
                    return int(ports["http_port"]), int(ports["grpc_port"])
            if self.process.poll() is not None:
                self._log.seek(0)
                tail = self._log.read()[-3000:]
                raise TritonUnavailable(f"triton exited with {self.process.returncode}: {tail}")
        raise TritonUnavailable(f"triton not ready in {timeout_s:.0f} s")

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()  # the script returns, Triton stops
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.terminate()
                try:
                    self.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()
        self._dir.cleanup()


async def _closed_loop(call: Call, clients: int, seconds: float) -> tuple[list[float], int, float]:
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
                sent = time.perf_counter()
                try:
                    ok = await call(session, worker * 1_000_000 + i)
                except (TimeoutError, aiohttp.ClientError, KeyError, ValueError):
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


def measure(system: str, call: Call, levels: list[int], seconds: float) -> list[common.Record]:
    asyncio.run(_closed_loop(call, 4, min(2.0, seconds)))  # warm-up: workers, connections
    records = []
    for clients in levels:
        latencies, errors, elapsed = asyncio.run(_closed_loop(call, clients, seconds))
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
    fig.suptitle(f"{STAGES}-stage identity pipeline over HTTP (triton: 1 stage; "
                 "triton-3-chained: 3 calls), same machine, same run")  # fmt: skip
    common.save_figure(fig, NAME, out)


SYSTEMS: dict[str, Callable[[argparse.Namespace], Any]] = {
    "serveflow": lambda args: ServeflowServer(),
    "serveflow-batched": lambda args: ServeflowServer(batching=True),
    "serveflow-fused": lambda args: ServeflowServer(fused=True),
    "serveflow-no-coalesce": lambda args: ServeflowServer(extra=("--no-coalesce",)),
    "serveflow-h11": lambda args: ServeflowServer(
        extra=("--loop", "asyncio", "--http", "h11", "--no-coalesce")
    ),
    "ray-serve": lambda args: RayServeServer(args.ray_port),
    "triton": lambda args: TritonServer(chain=1),
    "triton-3-chained": lambda args: TritonServer(chain=STAGES),
}


def report_ratios(records: list[common.Record], levels: list[int]) -> list[str]:
    """The comparisons the issue asks for, one line each."""
    by = {(r["system"], r.get("clients")): r for r in records if r.get("clients")}
    lines = []
    top = max(levels)
    sf_top, ray_top = by.get(("serveflow", top)), by.get(("ray-serve", top))
    if sf_top and ray_top:
        gain = common.ratio(sf_top["throughput_rps"], ray_top["throughput_rps"])
        lines.append(f"throughput at {top} clients, serveflow / ray-serve: {common.fmt(gain)}x "
                     f"(target >= {TARGET_THROUGHPUT_VS_RAY:g}x)")  # fmt: skip
        for clients in levels:
            s, r = by.get(("serveflow", clients)), by.get(("ray-serve", clients))
            if s and r:
                verdict = "lower" if (s["p99_ms"] or 0) < (r["p99_ms"] or 0) else "NOT lower"
                lines.append(f"p99 at {clients} clients: serveflow {common.fmt(s['p99_ms'])} ms, "
                             f"ray-serve {common.fmt(r['p99_ms'])} ms ({verdict})")  # fmt: skip
    for system in ("serveflow", "serveflow-batched", "serveflow-fused", "serveflow-no-coalesce"):
        for peer in ("triton", "triton-3-chained"):
            cells = []
            for clients in levels:
                s, t = by.get((system, clients)), by.get((peer, clients))
                if s and t:
                    gain = common.ratio(s["throughput_rps"], t["throughput_rps"])
                    cells.append(f"{clients}: {common.fmt(gain)}x")
            if cells:
                lines.append(f"throughput {system} (3 stages) / {peer}: " + ", ".join(cells))
    t_top = by.get(("triton", top))
    for system in ("serveflow", "serveflow-batched", "serveflow-no-coalesce"):
        s = by.get((system, top))
        if s and t_top:
            ok = s["throughput_rps"] >= t_top["throughput_rps"]
            lines.append(f"target: {system} 3 stages at {top} clients >= triton 1 stage: "
                         f"{s['throughput_rps']:.0f} vs {t_top['throughput_rps']:.0f} req/s "
                         f"({'met' if ok else 'NOT met'})")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> None:
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--no-ray", action="store_true", help="skip the Ray Serve peer")
        parser.add_argument("--no-triton", action="store_true", help="skip the Triton peers")
        parser.add_argument("--levels", default="1,8,64", help="client counts (default 1,8,64)")
        parser.add_argument("--seconds", type=float, default=None, help="seconds per level")
        parser.add_argument("--ray-port", type=int, default=8127, help="Ray Serve HTTP port")
        parser.add_argument(
            "--systems", default=",".join(SYSTEMS), help=f"subset of {','.join(SYSTEMS)}"
        )

    args = common.parse_args(__doc__.splitlines()[0], argv, configure)
    levels = [int(n) for n in args.levels.split(",")]
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    chosen = [name.strip() for name in args.systems.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; known: {list(SYSTEMS)}")
    if args.no_ray:
        chosen = [name for name in chosen if name != "ray-serve"]
    if args.no_triton:
        chosen = [name for name in chosen if not name.startswith("triton")]
    records: list[common.Record] = []
    for system in chosen:
        try:
            server = SYSTEMS[system](args)
        except Exception as error:  # a peer that cannot start is reported, not fatal
            log.warning("%s unavailable: %s", system, error)
            records.append(common.record("all", system, note=f"unavailable: {error}"))
            continue
        try:
            records += measure(system, server.call, levels, seconds)
        finally:
            server.close()
    common.print_table(
        [r for r in records if r.get("clients")],
        ("scenario", "system", "median_ms", "p99_ms", "throughput_rps", "errors"),
        title=f"HTTP load, {STAGES}-stage identity pipeline (triton: 1 stage), "
        f"{seconds:g} s per level",
    )
    print()
    for line in report_ratios(records, levels):
        print(line)
    common.write_json(NAME, records, args.out)
    plot([r for r in records if r.get("clients")], args.out)


if __name__ == "__main__":
    main()
