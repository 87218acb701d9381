"""The Cloudflow pipelines over HTTP: serveflow against Ray Serve, same machine, same run.

For each pipeline of examples/pipelines (cascade, video, translation, recommender,
ensemble), each system serves it from its own process tree:
- serveflow: the flow deployed with the default rules on `LocalRuntime(min_workers=W,
  max_workers=W)`, behind serveflow's HTTP server (uvicorn);
- ray-serve: the same functions and model classes as composed deployments
  (benchmarks/peers/ray_pipelines.py), W replicas per model, behind Ray Serve's proxy.
Every model runs one torch/BLAS thread per call in both.

Both get the same request bodies (64 generated requests: .npz for images, clips and
digits, JSON for text and users) and must answer them with the same rows (checked on
the first 16). Then, from a load generator in another process:
1. saturation: Debian's wrk (closed loop, CONNECTIONS connections each);
2. open loop: Poisson arrivals at LOAD_FRACTIONS of Ray Serve's saturation throughput,
   the same offered load for both systems; latency from each scheduled arrival.
Both systems are up together and each phase runs on one then the other, so that the
load other work puts on the machine falls on both alike.

Prints the table and the ratios, writes results/pipelines.json (scenario names hold
the pipeline's name) and results/pipelines_NAME.png per pipeline.

    python -m benchmarks.pipelines [--quick] [--pipelines cascade,video,...] [--workers 2]
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from examples.pipelines import PIPELINES

from benchmarks import common, loadgen

log = logging.getLogger("benchmarks.pipelines")

NAME = "pipelines"
SYSTEMS = ("ray-serve", "serveflow")  # the offered loads follow from the first one
BODIES = 64
CHECKED = 16  # bodies whose answers must be the same from both systems
LOAD_FRACTIONS = (0.3, 0.7)  # of Ray Serve's saturation throughput
CONNECTIONS = (8, 32)
STORE_SEED, INPUT_SEED = 0, 7
REPO = Path(__file__).resolve().parents[1]


# --- the servers (each in its own process) ---------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_serveflow(name: str, workers: int, store: str | None) -> None:
    import serveflow as sf
    from serveflow.serving import Server

    module = importlib.import_module(f"examples.pipelines.{name}")
    runtime = sf.LocalRuntime(min_workers=workers, max_workers=workers, kvs=store)
    try:
        app = module.build_flow().deploy(runtime=runtime)
        server = Server({name: app}, port=0, log_level="warning")
        server.bind()
        print(f"READY {server.url}/v1/flows/{name}/predict", flush=True)
        server.run()  # until SIGTERM
    finally:
        runtime.stop()


def serve_ray(name: str, replicas: int, store: str | None, ingress_replicas: int) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Blocked before Ray starts threads, so that only sigwait below receives them.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    import ray
    from ray import serve

    from benchmarks.peers.ray_pipelines import build_app

    ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False,
             log_to_driver=False,
             logging_level=logging.WARNING)  # fmt: skip
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(name, replicas, store, ingress_replicas), name=name, route_prefix="/")
        print(f"READY http://127.0.0.1:{port}/", flush=True)
        signal.sigwait({signal.SIGTERM, signal.SIGINT})
    finally:
        serve.shutdown()
        ray.shutdown()


class ServerProcess:
    """`python -m benchmarks.pipelines serve SYSTEM NAME ...` in a child process."""

    def __init__(self, system: str, name: str, args: argparse.Namespace, store: str | None):
        command = [sys.executable, "-m", "benchmarks.pipelines", "serve", system, name,
                   "--workers", str(args.workers),
                   "--ray-ingress-replicas", str(args.ray_ingress_replicas)]  # fmt: skip
        if store:
            command += ["--store", store]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env, start_new_session=True
        )
        assert self.process.stdout is not None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if select.select([self.process.stdout], [], [], 1.0)[0]:
                line = self.process.stdout.readline()
                if line.startswith("READY "):
                    self.url = line.split()[1]
                    return
                if not line:
                    break
            if self.process.poll() is not None:
                break
        self.close()
        raise RuntimeError(f"{system} did not start serving {name}")

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) so far of this server's processes, by role: its
        whole process tree (Ray's GCS, raylet and actors; serveflow's workers)."""
        return cpu_by_role(self.process.pid)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _role(cmdline: str) -> str:
    """Which part of a server a process is, from its command line."""
    if cmdline.startswith("ray::"):
        head = cmdline.split()[0][len("ray::") :]
        if head.startswith("ServeReplica:"):
            return "ray replica " + head.split(":")[2].split(".")[0]
        return {"ProxyActor": "ray proxy", "ServeController": "ray controller"}.get(
            head.split(".")[0], "ray other"
        )
    if "serveflow.runtime.worker" in cmdline:
        return "serveflow workers"
    if "serveflow.runtime.planner" in cmdline:
        return "serveflow planner"
    if "serve serveflow" in cmdline:
        return "serveflow driver + HTTP"
    if "serve ray-serve" in cmdline:
        return "ray driver"
    if "raylet" in cmdline or "gcs_server" in cmdline:
        return "ray core (raylet, gcs)"
    return "ray other" if "ray" in cmdline else "other"


def cpu_by_role(root: int) -> dict[str, float]:
    """CPU seconds of `root` and its descendants (Linux /proc), summed by `_role`."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    roles: dict[str, float] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        role = _role(cmdline)
        roles[role] = roles.get(role, 0.0) + cpu.get(pid, 0.0)
    return roles


def cpu_fields(before: dict[str, float], after: dict[str, float], done: int) -> dict[str, Any]:
    """CPU milliseconds per answered request, in all and by role (a profile that
    other work on the machine does not distort the way it does latencies)."""
    spent = {role: after.get(role, 0.0) - before.get(role, 0.0) for role in after}
    per = {role: round(1e3 * s / max(done, 1), 3) for role, s in spent.items() if s > 0}
    return {"cpu_ms_per_request": round(sum(per.values()), 3), "cpu_ms_by_role": per}


# --- requests ----------------------------------------------------------------------


def encode(table: Any) -> loadgen.Body:
    """A request table as the body both systems take: .npz when it holds arrays."""
    columns = {name: table.column(name) for name in table.columns}
    if any(isinstance(values[0], np.ndarray) for values in columns.values()):
        buffer = io.BytesIO()
        arrays = {
            name: np.stack(values) if isinstance(values[0], np.ndarray) else np.asarray(values)
            for name, values in columns.items()
        }
        np.savez(buffer, **arrays)
        return buffer.getvalue(), "application/x-npz"
    return json.dumps({"rows": table.to_rows()}).encode(), "application/json"


def answers(url: str, bodies: list[loadgen.Body]) -> list[Any]:
    """Each body's answer, one request at a time (also the warm-up)."""
    import httpx

    out = []
    with httpx.Client(timeout=120) as client:
        for body, content_type in bodies:
            response = client.post(url, content=body, headers={"Content-Type": content_type})
            response.raise_for_status()
            out.append(response.json()["rows"])
    return out


# --- measuring -----------------------------------------------------------------------


def _saturation_record(name: str, system: str, connections: int, result: Any) -> common.Record:
    return {
        "scenario": f"{name}: saturation, {connections} connections (wrk)",
        "system": system,
        "pipeline": name,
        "kind": "saturation",
        "connections": connections,
        "median_ms": result.median_ms,
        "p99_ms": result.p99_ms,
        "throughput_rps": result.throughput_rps,
        "errors": result.errors,
        "requests": result.requests,
    }


def measure_pipeline(
    name: str, args: argparse.Namespace, store: str | None, bodies: list[loadgen.Body]
) -> list[common.Record]:
    """Both systems serve `name` at once; every phase runs on one, then on the other,
    so that the load other work puts on this machine falls on both alike."""
    servers: dict[str, ServerProcess] = {}
    records: list[common.Record] = []
    try:
        for system in SYSTEMS:
            servers[system] = ServerProcess(system, name, args, store)
        got = {system: answers(server.url, bodies[:CHECKED]) for system, server in servers.items()}
        first, second = (got[system] for system in SYSTEMS)
        if first != second:
            bad = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
            raise AssertionError(f"{name}: request {bad} answered {first[bad]} by {SYSTEMS[0]}, "
                                 f"{second[bad]} by {SYSTEMS[1]}")  # fmt: skip
        for system, server in servers.items():
            answers(server.url, bodies[CHECKED:])
            warm = loadgen.wrk(server.url, bodies, CONNECTIONS[-1], 3 if args.quick else 5)
            log.info("%s %s warm-up: %.1f req/s", name, system, warm.throughput_rps)
        for connections in CONNECTIONS:
            for system, server in servers.items():
                before = server.cpu_seconds()
                result = loadgen.wrk(server.url, bodies, connections, args.seconds)
                records.append(_saturation_record(name, system, connections, result))
                done = result.requests - result.errors
                records[-1] |= cpu_fields(before, server.cpu_seconds(), done)
                log.info("%s %s saturation c=%d: %.1f req/s, p50 %.1f ms, p99 %.1f ms", name,
                         system, connections, result.throughput_rps, result.median_ms,
                         result.p99_ms)  # fmt: skip
        peer = max(r["throughput_rps"] for r in records if r["system"] == SYSTEMS[0])
        for fraction in LOAD_FRACTIONS:
            rate = round(fraction * peer, 1)
            for system, server in servers.items():
                before = server.cpu_seconds()
                outcome = loadgen.open_loop_in_process(server.url, bodies, rate, 2 * args.seconds)
                records.append(common.record(
                    f"{name}: open loop, {rate:g} req/s offered", system,
                    outcome.latencies_ms, len(outcome.latencies_ms) / outcome.seconds,
                    pipeline=name, kind="open loop", rate_asked=rate, load_fraction=fraction,
                    rate_offered=round(outcome.offered_rps, 1), errors=outcome.errors,
                    **cpu_fields(before, server.cpu_seconds(), len(outcome.latencies_ms)),
                ))  # fmt: skip
                log.info("%s %s open loop %.1f req/s: p50 %.1f ms, p99 %.1f ms, %d errors",
                         name, system, rate, records[-1]["median_ms"] or -1,
                         records[-1]["p99_ms"] or -1, outcome.errors)  # fmt: skip
    finally:
        for server in servers.values():
            server.close()
    return records


def ratio_lines(records: list[common.Record]) -> list[str]:
    """Per pipeline: serveflow / ray-serve at each offered load and at saturation."""
    lines = []
    for name in dict.fromkeys(r["pipeline"] for r in records if "pipeline" in r):
        by = {(r["system"], r["scenario"]): r for r in records if r.get("pipeline") == name}
        for scenario in dict.fromkeys(s for _, s in by):
            sf_, ray = by.get(("serveflow", scenario)), by.get(("ray-serve", scenario))
            if not (sf_ and ray):
                continue
            if sf_["kind"] == "open loop":
                med = common.ratio(sf_["median_ms"], ray["median_ms"])
                p99 = common.ratio(sf_["p99_ms"], ray["p99_ms"])
                met = med is not None and p99 is not None and med <= 0.5 and p99 <= 0.5
                lines.append(f"{scenario}: serveflow/ray-serve median {common.fmt(med)}, "
                             f"p99 {common.fmt(p99)} (target <= 0.5: "
                             f"{'met' if met else 'NOT met'})")  # fmt: skip
        sat = {
            system: max((r for r in by.values() if r["system"] == system
                         and r["kind"] == "saturation"), key=lambda r: r["throughput_rps"],
                        default=None)
            for system in SYSTEMS
        }  # fmt: skip
        if sat["serveflow"] and sat["ray-serve"]:
            gain = common.ratio(
                sat["serveflow"]["throughput_rps"], sat["ray-serve"]["throughput_rps"]
            )
            verdict = "met" if (gain or 0) > 1 else "NOT met"
            lines.append(
                f"{name}: saturation throughput serveflow "
                f"{sat['serveflow']['throughput_rps']:.1f} vs ray-serve "
                f"{sat['ray-serve']['throughput_rps']:.1f} req/s "
                f"({common.fmt(gain)}x, target > 1: {verdict})"
            )
        for system, best in sat.items():
            roles = (best or {}).get("cpu_ms_by_role") or {}
            if roles:
                parts = ", ".join(f"{role} {ms:.2f}" for role, ms in
                                  sorted(roles.items(), key=lambda kv: -kv[1]))  # fmt: skip
                lines.append(f"{name}: {system} CPU ms per request at saturation "
                             f"{best['cpu_ms_per_request']:.2f} ({parts})")  # fmt: skip
    return lines


def plot(records: list[common.Record], out: Path) -> None:
    for name in dict.fromkeys(r["pipeline"] for r in records if "pipeline" in r):
        rows = [r for r in records if r.get("pipeline") == name]
        fig, axes = common.new_figure(1, 2, size=(11, 4.2))
        left, right = axes[0]
        for index, system in enumerate(SYSTEMS):
            color = f"C{index}"
            loads = [r for r in rows if r["system"] == system and r["kind"] == "open loop"]
            rates = [r["rate_asked"] for r in loads]
            left.plot(rates, [r["median_ms"] for r in loads], "o-", color=color,
                      label=f"{system} median")  # fmt: skip
            left.plot(rates, [r["p99_ms"] for r in loads], "s--", color=color,
                      label=f"{system} p99")  # fmt: skip
            sat = [r for r in rows if r["system"] == system and r["kind"] == "saturation"]
            xs = [i + 0.4 * index for i in range(len(sat))]
            right.bar(xs, [r["throughput_rps"] for r in sat], width=0.4, color=color,
                      label=system)  # fmt: skip
            right.set_xticks([i + 0.2 for i in range(len(sat))],
                             [f"{r['connections']} conns" for r in sat])  # fmt: skip
        left.set_xlabel("offered load (req/s, Poisson)")
        left.set_ylabel("latency (ms)")
        left.set_yscale("log")
        left.grid(True, which="both", alpha=0.3)
        left.legend(fontsize=8)
        right.set_ylabel("saturation throughput (req/s, wrk)")
        right.grid(True, axis="y", alpha=0.3)
        right.legend(fontsize=8)
        fig.suptitle(f"{name} pipeline over HTTP: serveflow vs Ray Serve (same machine, same run)")
        common.save_figure(fig, f"{NAME}_{name}", out)


def run(args: argparse.Namespace) -> list[common.Record]:
    chosen = [p.strip() for p in args.pipelines.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in PIPELINES]
    if unknown:
        raise SystemExit(f"unknown pipelines {unknown}; known: {list(PIPELINES)}")
    loadgen.ensure_wrk()
    records: list[common.Record] = []
    with tempfile.TemporaryDirectory(prefix="sf-pipelines-store-") as folder:
        store = None
        if "recommender" in chosen:
            from examples.pipelines import recommender

            from serveflow.runtime.kvs import open_kvs

            store = f"lmdb://{folder}"
            kvs = open_kvs(store)
            log.info("loading the recommender's store (%d users, %d categories)",
                     recommender.USERS, recommender.CATEGORIES)  # fmt: skip
            recommender.load_store(kvs, STORE_SEED)
            kvs.close()
        for name in chosen:
            module = importlib.import_module(f"examples.pipelines.{name}")
            bodies = [encode(t) for t in module.make_inputs(BODIES, INPUT_SEED)]
            try:
                records += measure_pipeline(
                    name, args, store if name == "recommender" else None, bodies
                )
            except Exception as error:  # reported, and the other pipelines still run
                log.exception("%s failed", name)
                records.append(common.record(f"{name}: failed", "-", pipeline=name,
                                             kind="failed", note=str(error)))  # fmt: skip
    return records


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        parser = argparse.ArgumentParser(prog="benchmarks.pipelines serve")
        parser.add_argument("system", choices=SYSTEMS)
        parser.add_argument("name", choices=PIPELINES)
        parser.add_argument("--workers", type=int, default=2)
        parser.add_argument("--ray-ingress-replicas", type=int, default=1)
        parser.add_argument("--store", default=None)
        args = parser.parse_args(argv[1:])
        logging.basicConfig(level=logging.WARNING)
        if args.system == "serveflow":
            serve_serveflow(args.name, args.workers, args.store)
        else:
            serve_ray(args.name, args.workers, args.store, args.ray_ingress_replicas)
        return

    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--pipelines",
            default=",".join(PIPELINES),
            help="comma-separated subset of " + ",".join(PIPELINES),
        )
        parser.add_argument(
            "--workers",
            type=int,
            default=2,
            help="serveflow workers = Ray Serve replicas per model (default 2)",
        )
        parser.add_argument(
            "--ray-ingress-replicas",
            type=int,
            default=1,
            help="Ray Serve ingress replicas (default 1: serveflow has one HTTP process)",
        )
        parser.add_argument(
            "--seconds",
            type=float,
            default=None,
            help="seconds per wrk run; open-loop runs last twice as long",
        )

    args = common.parse_args(__doc__.splitlines()[0], argv, configure)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args.seconds = args.seconds or (4.0 if args.quick else 10.0)
    records = run(args)
    columns = ("scenario", "system", "median_ms", "p99_ms", "throughput_rps", "errors",
               "cpu_ms_per_request")  # fmt: skip
    common.print_table(records, columns, title="Cloudflow pipelines over HTTP")
    print()
    for line in ratio_lines(records):
        print(line)
    common.write_json(NAME, records, args.out)
    plot([r for r in records if r.get("kind") != "failed"], args.out)


if __name__ == "__main__":
    main()
