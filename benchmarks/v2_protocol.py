"""The Open Inference Protocol (KServe V2): serveflow's 3 stages vs Triton's 1, 1/8/64 clients.

Systems, started in this run on this machine, each in its own processes:
- serveflow: `serveflow serve --grpc-port 0 --fixed-in-flight` on three unfused
  identity maps (`--rules fusion=off`, the flow of benchmarks.http_load) on the embedded
  runtime, measured over V2 gRPC and over V2 HTTP (binary tensor data); serveflow-fused:
  the same flow under the default rules, which fuse the three maps into one stage. The
  in-flight bound is held at its ceiling (100,000), as Triton refuses nothing either:
  this compares the protocol paths, not admission (benchmarks.reliability does);
- triton: Triton Inference Server (nvidia-pytriton, CPU, in benchmarks/.triton-venv)
  serving ONE Python identity model with dynamic batching (max batch 64), measured over
  the same two protocols.

Both run at once (idle while the other is measured). Every system gets the same client:
tritonclient's asyncio clients (grpc.aio; http.aio with binary data), in this process,
`clients` closed loops each sending its next request (one INT64 value) when the previous
one answered. Per protocol and level the systems take turns in alternating order, in
slices of the time per level, after the same warm-up. Prints a table and the ratios,
writes results/v2_protocol.json and .png.

    python -m benchmarks.v2_protocol [--quick] [--levels 1,8,64] [--seconds S]
        [--protocols grpc,http] [--no-fused] [--no-triton] [--baseline SRC]
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc.aio as grpcaio
import tritonclient.http.aio as httpaio

from benchmarks import common
from benchmarks.http_load import STAGES, ServeflowServer, TritonServer

log = logging.getLogger("benchmarks.v2_protocol")

NAME = "v2_protocol"
PROTOCOLS = ("grpc", "http")

Infer = Callable[[int], Awaitable[bool]]  # one request carrying a value; True if right


def _client(protocol: str, address: str, clients: int) -> Any:
    if protocol == "grpc":
        return grpcaio.InferenceServerClient(address)
    return httpaio.InferenceServerClient(address, conn_limit=clients)


def _infer(client: Any, protocol: str, model: str, batched: bool) -> Infer:
    """One V2 inference of [value] through `model`: shape [1] for serveflow (one row),
    [1, 1] for Triton (a batch of one, as its dynamic batcher expects)."""
    module = grpcaio if protocol == "grpc" else httpaio
    shape = [1, 1] if batched else [1]

    async def infer(value: int) -> bool:
        tensor = module.InferInput("x", shape, "INT64")
        tensor.set_data_from_numpy(np.full(shape, value, dtype=np.int64))
        result = await client.infer(model, [tensor])
        out = result.as_numpy("out" if batched else "x")
        return out is not None and out.reshape(-1).tolist() == [value]

    return infer


async def _closed_loop(
    protocol: str, address: str, model: str, batched: bool, clients: int, seconds: float
) -> tuple[list[float], int, float]:
    """`clients` closed loops for `seconds`: latencies (ms) of successes, errors, elapsed."""
    client = _client(protocol, address, clients)
    infer = _infer(client, protocol, model, batched)
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def loop(worker: int) -> None:
        nonlocal errors
        i = 0
        while time.perf_counter() < stop_at:
            sent = time.perf_counter()
            try:
                ok = await infer(worker * 1_000_000 + i)
            except Exception as error:  # an error is counted, the loop goes on
                log.debug("request failed: %s", error)
                ok = False
            if ok:
                latencies.append((time.perf_counter() - sent) * 1e3)
            else:
                errors += 1
            i += 1

    started = time.perf_counter()
    try:
        await asyncio.gather(*(loop(w) for w in range(clients)))
    finally:
        await client.close()
    return latencies, errors, time.perf_counter() - started


@dataclass(frozen=True)
class Target:
    """One system over one protocol: where to send, which model, batch dimension or not."""

    system: str
    protocol: str
    address: str
    model: str
    batched: bool

    @property
    def name(self) -> str:
        return f"{self.system}-{self.protocol}"

    def run(self, clients: int, seconds: float) -> tuple[list[float], int, float]:
        return asyncio.run(
            _closed_loop(self.protocol, self.address, self.model, self.batched, clients, seconds)
        )


def measure(
    targets: list[Target],
    levels: list[int],
    seconds: float,
    rounds: int,
    protocols: tuple[str, ...] | list[str] = PROTOCOLS,
) -> list[common.Record]:
    """Per protocol and client count, the systems take turns (`rounds` slices of
    `seconds / rounds` each, the order alternating), so that the machine's other load
    falls on all of them alike; a system's figures pool its slices."""
    for target in targets:
        target.run(4, min(2.0, seconds))  # warm-up: workers, connections, batchers
    records = []
    for protocol in protocols:
        peers = [t for t in targets if t.protocol == protocol]
        for clients in levels:
            pooled = {t.name: ([], 0, 0.0) for t in peers}
            for round_ in range(rounds):
                for target in peers if round_ % 2 == 0 else peers[::-1]:
                    latencies, errors, elapsed = target.run(clients, seconds / rounds)
                    seen, failed, spent = pooled[target.name]
                    pooled[target.name] = (seen + latencies, failed + errors, spent + elapsed)
            for target in peers:
                latencies, errors, elapsed = pooled[target.name]
                rps = len(latencies) / elapsed
                records.append(
                    common.record(
                        f"{clients} clients",
                        target.name,
                        latencies,
                        rps,
                        clients=clients,
                        protocol=protocol,
                        stages=STAGES if target.system.startswith("serveflow") else 1,
                        fused=target.system == "serveflow-fused",
                        errors=errors,
                        seconds=round(elapsed, 2),
                    )
                )
                log.info("%s @%d clients: %.0f req/s, %d errors", target.name, clients, rps,
                         errors)  # fmt: skip
    return records


def report_ratios(records: list[common.Record], levels: list[int]) -> list[str]:
    """The issue's targets: serveflow's 3 stages at least Triton's 1-stage throughput at
    every concurrency, with a lower p99, per protocol."""
    by = {(r["system"], r.get("clients")): r for r in records if r.get("clients")}
    lines = []
    for system in ("serveflow", "serveflow-baseline", "serveflow-fused"):
        for protocol in PROTOCOLS:
            for clients in levels:
                s = by.get((f"{system}-{protocol}", clients))
                t = by.get((f"triton-{protocol}", clients))
                if not (s and t and s["throughput_rps"] and t["throughput_rps"]):
                    continue
                gain = common.ratio(s["throughput_rps"], t["throughput_rps"])
                p99 = common.ratio(s["p99_ms"], t["p99_ms"])
                met = gain is not None and gain >= 1 and p99 is not None and p99 < 1
                lines.append(
                    f"{system} {protocol} @{clients}: throughput / triton {common.fmt(gain)}x "
                    f"({s['throughput_rps']:.0f} vs {t['throughput_rps']:.0f} req/s), "
                    f"p99 {common.fmt(s['p99_ms'])} vs {common.fmt(t['p99_ms'])} ms "
                    f"(ratio {common.fmt(p99)}): target {'met' if met else 'NOT met'}"
                )
    return lines


def plot(records: list[common.Record], out: Path) -> None:
    fig, axes = common.new_figure(1, 2, size=(11, 4.5))
    systems = list(dict.fromkeys(r["system"] for r in records))
    for index, system in enumerate(systems):
        rows = [r for r in records if r["system"] == system]
        clients = [r["clients"] for r in rows]
        style = "o-" if system.startswith("serveflow") else "s--"
        color = f"C{index}"
        axes[0][0].plot(clients, [r["throughput_rps"] for r in rows], style, color=color,
                        label=system)  # fmt: skip
        axes[0][1].plot(clients, [r["p99_ms"] for r in rows], style, color=color,
                        label=f"{system} p99")  # fmt: skip
        axes[0][1].plot(clients, [r["median_ms"] for r in rows], ":", color=color,
                        label=f"{system} median")  # fmt: skip
    for ax, label in ((axes[0][0], "throughput (req/s)"), (axes[0][1], "latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent tritonclient clients")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"KServe V2: serveflow {STAGES}-stage identity pipeline vs Triton 1 stage, "
                 "gRPC and HTTP (binary), same machine, same run")  # fmt: skip
    common.save_figure(fig, NAME, out)


def main(argv: list[str] | None = None) -> None:
    def configure(parser: Any) -> None:
        parser.add_argument("--levels", default="1,8,64", help="client counts (default 1,8,64)")
        parser.add_argument("--seconds", type=float, default=None, help="seconds per level")
        parser.add_argument("--no-triton", action="store_true", help="skip the Triton peer")
        parser.add_argument("--no-fused", action="store_true", help="skip serveflow-fused")
        parser.add_argument(
            "--baseline",
            metavar="SRC",
            help="also serve the unfused flow from this src folder of another serveflow "
            "tree (e.g. `git archive main src | tar -x -C /tmp/base`): serveflow-baseline, "
            "to compare a change with in the same run",
        )
        parser.add_argument(
            "--protocols", default=",".join(PROTOCOLS), help="grpc, http or both (default)"
        )

    args = common.parse_args(__doc__.splitlines()[0], argv, configure)
    levels = [int(n) for n in args.levels.split(",")]
    seconds = args.seconds or (4.0 if args.quick else 12.0)
    rounds = 2 if args.quick else 4
    protocols = [p for p in PROTOCOLS if p in args.protocols.split(",")]
    records: list[common.Record] = []
    with contextlib.ExitStack() as stack:
        targets = []
        systems = [("serveflow", False, None)]
        if args.baseline:
            systems.append(("serveflow-baseline", False, args.baseline))
        if not args.no_fused:
            systems.append(("serveflow-fused", True, None))
        for system, fused, source in systems:
            extra = ("--grpc-port", "0", "--fixed-in-flight")
            server = ServeflowServer(fused=fused, extra=extra, source=source)
            stack.callback(server.close)
            assert server.process.stdout is not None
            grpc_line = server.process.stdout.readline()  # "serveflow: V2 gRPC on HOST:PORT"
            targets += [
                Target(system, "grpc", grpc_line.split(" on ")[-1].strip(), "chain", False),
                Target(system, "http", server.base.removeprefix("http://"), "chain", False),
            ]
        if not args.no_triton:
            try:
                triton = TritonServer(chain=1)
            except Exception as error:  # a peer that cannot start is reported, not fatal
                log.warning("triton unavailable: %s", error)
                records.append(common.record("all", "triton", note=f"unavailable: {error}"))
            else:
                stack.callback(triton.close)
                targets += [
                    Target("triton", "grpc", f"127.0.0.1:{triton.grpc_port}", "identity1", True),
                    Target("triton", "http", triton.url.removeprefix("http://"), "identity1", True),
                ]
        targets = [t for t in targets if t.protocol in protocols]
        records += measure(targets, levels, seconds, rounds, protocols)

    measured = [r for r in records if r.get("clients")]
    common.print_table(
        measured,
        ("scenario", "system", "median_ms", "p99_ms", "throughput_rps", "errors"),
        title=f"KServe V2, serveflow {STAGES} stages vs Triton 1 stage, {seconds:g} s per level",
    )
    print()
    for line in report_ratios(records, levels):
        print(line)
    common.write_json(NAME, records, args.out)
    plot(measured, args.out)


if __name__ == "__main__":
    main()
