"""Overhead of the runtime: a 3-stage identity chain carrying a 10 KB payload.

Systems, all started in this run on this machine:
- serveflow: three identity maps, unfused (`sf.Rules(fusion=False)`), sequential
  `app.run(table).result()` through the Python API; serveflow-fused for reference.
- ray-serve: three composed deployments (each holds a handle to the next), called from
  the driver through a DeploymentHandle.
- ray-cgraph: Ray Compiled Graphs (`ray.dag`), Ray's fastest path: three identity actors
  chained with `.bind()` from an `InputNode`, `experimental_compile()`d; a request is
  `ray.get(dag.execute(payload))`. Its throughput runs with 32 requests in flight when
  `_max_inflight_executions=32` is accepted (else at Ray's limit; the record says so).
- pipe-floor: the same 3 hops as raw pipe round trips between 3 identity processes.
- triton: one identity Python model on Triton Inference Server (nvidia-pytriton, CPU),
  over gRPC; skipped with the reason when benchmarks/.triton-venv is missing or broken.

Sequential latencies are measured in interleaved rounds; then throughput with 32
requests in flight for each system. Prints the ratios the targets are stated in.
For serveflow, the records also give the CPU time per request at 32 in flight of the
driver (this process: the runtime's control plane and the benchmark's client) and of
its workers together: what bounds throughput on a machine of few cores.

    python -m benchmarks.overhead [--quick] [--no-ray] [--no-cgraph] [--no-triton]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import serveflow as sf
from benchmarks import common

log = logging.getLogger("benchmarks.overhead")

NAME = "overhead"
PAYLOAD_BYTES = 10 * 1024
STAGES = 3
IN_FLIGHT = 32

TARGET_VS_RAY = 1 / 20  # serveflow median / ray-serve median
TARGET_VS_FLOOR = 3.0  # serveflow median / pipe-floor median
TARGET_THROUGHPUT = 10.0  # serveflow req/s / ray-serve req/s at 32 in flight
# serveflow / ray-cgraph has no target: printed for reference.


def identity_chain(stages: int, name: str = "overhead") -> sf.Flow:
    """`stages` identity maps over column "x"."""
    flow = sf.Flow(name)
    stream: sf.Stream | sf.Flow = flow
    for i in range(stages):
        stream = stream.map(_identity, col="x", name=f"identity{i + 1}")
    return flow


def _identity(value: Any) -> Any:
    return value


class ServeflowSystem:
    """A deployed identity chain: `call()` one request, `submit()` a future."""

    def __init__(self, rules: sf.Rules, payload: bytes) -> None:
        self.app = identity_chain(STAGES).deploy(rules=rules)
        self.table = sf.Table({"x": [payload]})
        out = self.app.run(self.table).result(timeout=30)
        if out.column("x") != [payload]:
            raise AssertionError("serveflow identity chain changed the payload")

    def call(self) -> None:
        self.app.run(self.table).result(timeout=30)

    def submit(self) -> Any:
        return self.app.run(self.table)

    def close(self) -> None:
        self.app.stop()


def _cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) the processes `pids` have used, from /proc."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:  # exited meanwhile
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def main(argv: list[str] | None = None) -> int:
    def flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--no-ray", action="store_true", help="skip the Ray Serve peer")
        parser.add_argument(
            "--no-cgraph", action="store_true", help="skip the Ray Compiled Graphs peer"
        )
        parser.add_argument("--no-triton", action="store_true", help="skip the Triton peer")

    args = common.parse_args(__doc__.splitlines()[0], argv, flags)
    own = args

    n_seq = 300 if args.quick else 2000
    n_loop = 400 if args.quick else 3000
    warmup = 30 if args.quick else 200
    payload = bytes(range(256)) * (PAYLOAD_BYTES // 256)

    closers: list[Callable[[], None]] = []
    seq: dict[str, Callable[[int], list[float]]] = {}
    submitters: dict[str, Callable[[], Any]] = {}
    worker_pids: dict[str, Callable[[], list[int]]] = {}  # systems whose CPU is counted
    cpu: dict[str, dict[str, float]] = {}
    notes: dict[str, str] = {}
    triton: Any = None
    cgraph: Any = None
    try:
        from benchmarks.peers.pipes import PipeChain

        floor = PipeChain(STAGES)
        closers.append(floor.close)
        seq["pipe-floor"] = lambda k: common.sequential(lambda: floor.call(payload), k)
        submitters["pipe-floor"] = lambda: floor.submit(payload)

        unfused = ServeflowSystem(sf.Rules(fusion=False), payload)
        closers.append(unfused.close)
        seq["serveflow"] = lambda k: common.sequential(unfused.call, k)
        submitters["serveflow"] = unfused.submit
        worker_pids["serveflow"] = unfused.app.runtime.worker_pids

        fused = ServeflowSystem(sf.Rules(), payload)
        closers.append(fused.close)
        seq["serveflow-fused"] = lambda k: common.sequential(fused.call, k)
        submitters["serveflow-fused"] = fused.submit
        worker_pids["serveflow-fused"] = fused.app.runtime.worker_pids

        if own.no_triton:
            notes["triton"] = "skipped (--no-triton)"
        else:
            from benchmarks.peers.triton import TritonPeer, TritonUnavailable

            try:
                triton = TritonPeer()
                closers.append(triton.close)
                seq["triton"] = lambda k: triton.sequential(k, PAYLOAD_BYTES)
            except TritonUnavailable as error:
                notes["triton"] = f"unavailable: {error}"
                log.warning("triton peer unavailable: %s", error)

        if own.no_ray:
            notes["ray-serve"] = "skipped (--no-ray)"
        else:
            try:
                from benchmarks.peers.ray_serve import RayServeChain

                log.info("starting Ray Serve (takes ~20 s here)")
                ray_chain = RayServeChain(STAGES)
                closers.append(ray_chain.close)
                if ray_chain.call(payload) != payload:
                    raise AssertionError("ray serve chain changed the payload")
                seq["ray-serve"] = lambda k: common.sequential(lambda: ray_chain.call(payload), k)
                submitters["ray-serve"] = lambda: ray_chain.submit(payload)
            except ImportError as error:
                notes["ray-serve"] = f"unavailable: {error} (pip install -e '.[bench]')"
                log.warning("ray serve peer unavailable: %s", error)

        # After Ray Serve: closers run in reverse, so the graph is torn down before
        # Serve's close shuts down the Ray they share.
        if own.no_cgraph:
            notes["ray-cgraph"] = "skipped (--no-cgraph)"
        else:
            try:
                from benchmarks.peers.ray_cgraph import RayCompiledChain

                log.info("compiling the Ray compiled graph")
                cgraph = RayCompiledChain(STAGES, max_inflight=IN_FLIGHT)
                closers.append(cgraph.close)
                if cgraph.call(payload) != payload:
                    raise AssertionError("ray compiled graph changed the payload")
                seq["ray-cgraph"] = lambda k: common.sequential(lambda: cgraph.call(payload), k)
                submitters["ray-cgraph"] = lambda: cgraph.submit(payload)
                if cgraph.note:
                    notes["ray-cgraph"] = cgraph.note
            except ImportError as error:
                notes["ray-cgraph"] = f"unavailable: {error} (pip install -e '.[bench]')"
                log.warning("ray compiled graph peer unavailable: %s", error)

        log.info("warm-up: %d requests each", warmup)
        for run in seq.values():
            run(warmup)
        # Ray is ~100x slower per request: fewer samples keep the run short, and the
        # rounds still interleave it with the others.
        log.info("sequential: %d requests each, interleaved", n_seq)
        slow = {k: v for k, v in seq.items() if k == "ray-serve"}
        fast = {k: v for k, v in seq.items() if k != "ray-serve"}
        rounds = 10
        latencies: dict[str, list[float]] = {k: [] for k in seq}
        for _ in range(rounds):
            part = common.interleaved(fast, n_seq // rounds, rounds=1)
            part |= common.interleaved(slow, max(1, n_seq // (4 * rounds)), rounds=1)
            for k, v in part.items():
                latencies[k].extend(v)

        log.info("throughput: %d requests each, %d in flight", n_loop, IN_FLIGHT)
        throughput: dict[str, float] = {}
        loop_latencies: dict[str, list[float]] = {}
        for name, submit in submitters.items():
            total = n_loop // 3 if name == "ray-serve" else n_loop
            common.closed_loop(submit, min(total, 100), IN_FLIGHT)  # warm the pool
            pids = worker_pids[name]() if name in worker_pids else []
            before = os.times(), _cpu_seconds(pids)
            rps, lat, failures = common.closed_loop(submit, total, IN_FLIGHT)
            if pids:
                driver = os.times()
                cpu[name] = {
                    "driver_cpu_us_per_request": 1e6
                    * (driver.user + driver.system - before[0].user - before[0].system)
                    / total,
                    "workers_cpu_us_per_request": 1e6 * (_cpu_seconds(pids) - before[1]) / total,
                }
            throughput[name] = rps
            loop_latencies[name] = lat
            if failures:
                notes[name] = f"{failures} failed requests at {IN_FLIGHT} in flight"
        if triton is not None:
            result = triton.closed_loop(n_loop, IN_FLIGHT, PAYLOAD_BYTES)
            throughput["triton"] = result["throughput_rps"]
            loop_latencies["triton"] = result["latencies_ms"]
    finally:
        for close in reversed(closers):
            try:
                close()
            except Exception:
                log.exception("closing a system failed")

    scenario = f"{STAGES}-stage identity chain, {PAYLOAD_BYTES // 1024} KB, sequential"
    records = []
    for name, lat in latencies.items():
        loop = loop_latencies.get(name, [])
        extra: dict[str, Any] = {}
        if name == "ray-cgraph" and cgraph is not None:
            extra = {
                "max_inflight_executions": cgraph.max_inflight,
                "ray_version": cgraph.ray_version,
                "ray_num_cpus": cgraph.ray_cpus,
            }
        records.append(
            common.record(
                "1-stage identity, 10 KB, sequential (gRPC)" if name == "triton" else scenario,
                name,
                lat,
                throughput.get(name),
                stages=1 if name == "triton" else STAGES,
                fused=name == "serveflow-fused",
                in_flight=min(IN_FLIGHT, cgraph.max_inflight)
                if name == "ray-cgraph" and cgraph is not None
                else IN_FLIGHT,
                median_ms_at_32=common.percentile(loop, 50) if loop else None,
                p99_ms_at_32=common.percentile(loop, 99) if loop else None,
                payload_bytes=PAYLOAD_BYTES,
                note=notes.get(name),
                **extra,
                **cpu.get(name, {}),
            )
        )
    for name, note in notes.items():
        if name not in latencies:
            records.append(common.record(scenario, name, None, None, note=note))

    by = {r["system"]: r for r in records}
    sf_rec = by.get("serveflow", {})
    ratios = []
    for label, other, key, target, better in (
        ("serveflow / ray-serve median", "ray-serve", "median_ms", TARGET_VS_RAY, "le"),
        ("serveflow / pipe-floor median", "pipe-floor", "median_ms", TARGET_VS_FLOOR, "le"),
        ("serveflow / triton (1 stage) median", "triton", "median_ms", 1.0, "le"),
        (
            "serveflow / ray-serve throughput@32",
            "ray-serve",
            "throughput_rps",
            TARGET_THROUGHPUT,
            "ge",
        ),
        ("serveflow / ray-cgraph median", "ray-cgraph", "median_ms", None, "le"),
        ("serveflow / ray-cgraph throughput@32", "ray-cgraph", "throughput_rps", None, "ge"),
    ):
        value = common.ratio(sf_rec.get(key), by.get(other, {}).get(key))
        sign = "<=" if better == "le" else ">="
        if target is None:  # for reference only
            met, shown = None, "-"
        else:
            met = (
                None if value is None else (value <= target if better == "le" else value >= target)
            )
            shown = f"{sign} {target:g}"
        ratios.append({"ratio": label, "value": value, "target": shown, "met": met})
        sf_rec[f"ratio_{other}_{key}"] = value

    common.print_table(
        records,
        (
            "scenario",
            "system",
            "median_ms",
            "p99_ms",
            "throughput_rps",
            "median_ms_at_32",
            "p99_ms_at_32",
            "n",
        ),
        title="overhead: 3 identity stages, 10 KB",
    )
    common.print_table(ratios, ("ratio", "value", "target", "met"), title="ratios")
    for name, figures in cpu.items():
        print(
            f"cpu at {IN_FLIGHT} in flight, {name}: driver "
            f"{figures['driver_cpu_us_per_request']:.0f} us + workers "
            f"{figures['workers_cpu_us_per_request']:.0f} us per request"
        )
    for name, note in notes.items():
        print(f"note: {name}: {note}")
    common.write_json(NAME, records, args.out)
    plot(records, args.out)
    return 0


def plot(records: list[common.Record], out_dir: Any) -> None:
    measured = [r for r in records if r["median_ms"] is not None]
    fig, axes = common.new_figure(1, 2, size=(11, 4.5))
    names = [r["system"] for r in measured]
    xs = range(len(measured))
    ax = axes[0][0]
    ax.bar([x - 0.2 for x in xs], [r["median_ms"] for r in measured], 0.4, label="median")
    ax.bar([x + 0.2 for x in xs], [r["p99_ms"] for r in measured], 0.4, label="p99")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), names, rotation=20)
    ax.set_ylabel("latency per request (ms, log)")
    ax.set_title("sequential, 10 KB (triton: 1 stage; others: 3)")
    ax.legend()
    ax = axes[0][1]
    with_tp = [r for r in measured if r["throughput_rps"]]
    ax.bar([r["system"] for r in with_tp], [r["throughput_rps"] for r in with_tp])
    ax.set_yscale("log")
    ax.set_ylabel("requests/s (log)")
    ax.set_title(f"throughput, {IN_FLIGHT} in flight")
    ax.tick_params(axis="x", rotation=20)
    common.save_figure(fig, NAME, out_dir)


if __name__ == "__main__":
    sys.exit(main())
