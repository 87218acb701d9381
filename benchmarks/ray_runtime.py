"""serveflow on Ray (`sf.RayRuntime`) vs Ray Serve and Ray Compiled Graphs, one local Ray.

One Ray (`num_cpus=2`, started here) runs every system, in the same run:
- serveflow-ray: the flow deployed on `sf.RayRuntime` (workers are Ray actors, stage
  outputs go actor to actor), unfused (`sf.Rules(fusion=False)`: one stage per step,
  as the peers have one actor per step); serveflow-ray-fused: default rules;
- ray-serve: one deployment per step, composed through handles (Ray Serve's model
  composition), called through a DeploymentHandle;
- ray-cgraph: one actor per step chained in a Ray Compiled Graph (Ray's fastest path).
All actors ask for `num_cpus=0` (the peers' setting), so each system holds the same
pool of 3 actors on the 2 CPUs.

Scenarios:
- chain: 3 identity steps carrying 10 KB (benchmarks.overhead's chain);
- model: a comment through normalize -> py3langid language model -> confidence label.

Sequential latency (interleaved rounds; median, p99), then throughput with 32 requests
in flight. Prints the ratios to Ray Serve (targets: median at most 0.2x, throughput at
least 5x) and to Compiled Graphs (stretch: within 2x).

    python -m benchmarks.ray_runtime [--quick]
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import serveflow as sf
from benchmarks import common

log = logging.getLogger("benchmarks.ray_runtime")

NAME = "ray_runtime"
NUM_CPUS = 2
PAYLOAD_BYTES = 10 * 1024
IN_FLIGHT = 32
TARGET_MEDIAN_VS_SERVE = 0.2
TARGET_THROUGHPUT_VS_SERVE = 5.0
STRETCH_VS_CGRAPH = 2.0
COMMENT = "Je ne comprends pas pourquoi la livraison est si lente, aidez-moi."


# -- the model pipeline's steps: the same functions in every system ---------------------


def normalize(text: str) -> str:
    return " ".join(text.split())


class LanguageId:
    """py3langid's model (shipped in its package), loaded once per actor."""

    def __init__(self) -> None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        self.model = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)

    def __call__(self, text: str) -> tuple[str, float]:
        lang, p = self.model.classify(text)
        return str(lang), float(p)


def label(guess: tuple[str, float]) -> str:
    return guess[0] if guess[1] >= 0.9 else "unsure"


class LanguageIdRow:
    """`LanguageId` over a row (serveflow's row mode)."""

    def __init__(self) -> None:
        self.model = LanguageId()

    def __call__(self, row: Any) -> tuple[str, float]:
        return self.model(row["text"])


def model_flow() -> sf.Flow:
    flow = sf.Flow("model")
    clean = flow.map(normalize, col="text", name="normalize")
    guess = clean.map(LanguageIdRow, names=["lang", "p"], name="langid")
    guess.map(lambda r: label((r["lang"], r["p"])), names=["label"], name="label")
    return flow


def identity_flow() -> sf.Flow:
    flow = sf.Flow("chain")
    stream: Any = flow
    for i in range(3):
        stream = stream.map(_identity, col="x", name=f"identity{i + 1}")
    return flow


def _identity(value: Any) -> Any:
    return value


# -- systems ------------------------------------------------------------------------------


class System:
    """`call()` one request and check its answer; `submit()` a Future."""

    def __init__(self, call: Callable[[], Any], submit: Callable[[], Any], close: Any) -> None:
        self.call, self.submit, self.close = call, submit, close


def serveflow_system(runtime: Any, flow: sf.Flow, rules: sf.Rules, table: sf.Table, want: Any):
    app = flow.deploy(rules=rules, runtime=runtime)
    column = table.columns[0] if want is None else next(iter(want))
    expected = table.column(column) if want is None else want[column]
    out = app.run(table).result(timeout=60)
    if out.column(column) != expected:
        raise AssertionError(f"serveflow on Ray answered {out.to_rows()!r}")
    return System(lambda: app.run(table).result(timeout=60), lambda: app.run(table), app.stop)


def main(argv: list[str] | None = None) -> int:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    n_seq = 200 if args.quick else 1000
    n_loop = 300 if args.quick else 2000
    warmup = 20 if args.quick else 100

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # a graph's first run on a busy 2-core machine can exceed Ray's default 10 s
    os.environ.setdefault("RAY_CGRAPH_get_timeout", "120")
    import ray

    ray.init(
        num_cpus=NUM_CPUS,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        object_store_memory=256 << 20,
    )
    from benchmarks.peers.ray_cgraph import RayCompiledChain
    from benchmarks.peers.ray_serve import RayServeChain

    payload = bytes(range(256)) * (PAYLOAD_BYTES // 256)
    model_answer = label(LanguageId()(normalize(COMMENT)))
    scenarios: dict[str, dict[str, Any]] = {
        "chain": {
            "title": "3 identity steps, 10 KB",
            "flow": identity_flow,
            "table": sf.Table({"x": [payload]}),
            "want": None,
            "steps": None,
            "payload": payload,
            "answer": payload,
        },
        "model": {
            "title": "normalize -> py3langid -> label, 1 comment",
            "flow": model_flow,
            "table": sf.Table({"text": [COMMENT]}),
            "want": {"label": [model_answer]},
            "steps": [normalize, LanguageId, label],
            "payload": COMMENT,
            "answer": model_answer,
        },
    }
    runtime = sf.RayRuntime(worker_cpus=0, min_workers=3, max_workers=3, gpus=0)
    systems: dict[tuple[str, str], System] = {}
    closers: list[Callable[[], None]] = []
    records: list[common.Record] = []
    try:
        for name, sc in scenarios.items():
            for system, rules in (
                ("serveflow-ray", sf.Rules(fusion=False)),
                ("serveflow-ray-fused", sf.Rules()),
            ):
                s = serveflow_system(runtime, sc["flow"](), rules, sc["table"], sc["want"])
                systems[(name, system)] = s
                closers.append(s.close)

            log.info("%s: starting Ray Serve", name)
            chain = RayServeChain(3, app_name=f"bench-{name}", steps=sc["steps"])
            closers.append(lambda chain=chain: chain.close(shutdown=False))
            systems[(name, "ray-serve")] = _peer(chain, sc["payload"], sc["answer"])

            log.info("%s: compiling the Ray compiled graph", name)
            graph = RayCompiledChain(3, max_inflight=IN_FLIGHT, steps=sc["steps"])
            closers.append(graph.close)
            systems[(name, "ray-cgraph")] = _peer(graph, sc["payload"], sc["answer"])

            records += measure(name, sc["title"], systems, n_seq, n_loop, warmup)
            for close in reversed(closers):  # free the CPUs for the next scenario
                close()
            closers.clear()
    finally:
        for close in reversed(closers):
            try:
                close()
            except Exception:
                log.exception("closing a system failed")
        runtime.stop()
        ray.shutdown()

    ratios = ratio_rows(records)
    common.print_table(
        records,
        ("scenario", "system", "median_ms", "p99_ms", "throughput_rps", "p99_ms_at_32", "n"),
        title=f"serveflow on Ray vs Ray Serve vs Compiled Graphs (num_cpus={NUM_CPUS})",
    )
    common.print_table(ratios, ("scenario", "ratio", "value", "target", "met"), title="ratios")
    for r in ratios:
        records_by = {(x["scenario"], x["system"]): x for x in records}
        records_by[(r["scenario_full"], "serveflow-ray")][r["key"]] = r["value"]
    common.write_json(NAME, records, args.out)
    plot(records, args.out)
    return 0


def _peer(peer: Any, payload: Any, answer: Any) -> System:
    if peer.call(payload) != answer:
        raise AssertionError(f"{type(peer).__name__} answered {peer.call(payload)!r}")
    return System(lambda: peer.call(payload), lambda: peer.submit(payload), peer.close)


def measure(
    name: str,
    title: str,
    systems: dict[tuple[str, str], System],
    n_seq: int,
    n_loop: int,
    warmup: int,
) -> list[common.Record]:
    mine = {k[1]: s for k, s in systems.items() if k[0] == name}
    for s in mine.values():
        common.sequential(s.call, warmup)
    # Ray Serve is ~20x slower per request: fewer samples, still interleaved
    fast = {
        k: (lambda n, s=s: common.sequential(s.call, n))
        for k, s in mine.items()
        if k != "ray-serve"
    }
    slow = {"ray-serve": lambda n: common.sequential(mine["ray-serve"].call, n)}
    rounds = 10
    latencies: dict[str, list[float]] = {k: [] for k in mine}
    log.info("%s: sequential, %d requests each, interleaved", name, n_seq)
    for _ in range(rounds):
        part = common.interleaved(fast, n_seq // rounds, rounds=1)
        part |= common.interleaved(slow, max(1, n_seq // (4 * rounds)), rounds=1)
        for k, v in part.items():
            latencies[k].extend(v)
    records = []
    log.info("%s: throughput, %d requests each, %d in flight", name, n_loop, IN_FLIGHT)
    for system, s in mine.items():
        total = n_loop // 3 if system == "ray-serve" else n_loop
        common.closed_loop(s.submit, min(total, 100), IN_FLIGHT)  # warm the pool
        rps, lat, failures = common.closed_loop(s.submit, total, IN_FLIGHT)
        records.append(
            common.record(
                f"{name}: {title}",
                system,
                latencies[system],
                rps,
                in_flight=IN_FLIGHT,
                median_ms_at_32=common.percentile(lat, 50) if lat else None,
                p99_ms_at_32=common.percentile(lat, 99) if lat else None,
                failures_at_32=failures,
                ray_num_cpus=NUM_CPUS,
            )
        )
    return records


def ratio_rows(records: list[common.Record]) -> list[dict[str, Any]]:
    rows = []
    by = {(r["scenario"], r["system"]): r for r in records}
    for scenario in dict.fromkeys(r["scenario"] for r in records):
        mine = by[(scenario, "serveflow-ray")]
        for label_, other, key, target, le in (
            ("median / ray-serve", "ray-serve", "median_ms", TARGET_MEDIAN_VS_SERVE, True),
            (
                "throughput / ray-serve",
                "ray-serve",
                "throughput_rps",
                TARGET_THROUGHPUT_VS_SERVE,
                False,
            ),
            ("median / ray-cgraph", "ray-cgraph", "median_ms", STRETCH_VS_CGRAPH, True),
            ("throughput / ray-cgraph", "ray-cgraph", "throughput_rps", None, False),
        ):
            value = common.ratio(mine.get(key), by.get((scenario, other), {}).get(key))
            met = None
            if value is not None and target is not None:
                met = value <= target if le else value >= target
            rows.append(
                {
                    "scenario": scenario.split(":")[0],
                    "scenario_full": scenario,
                    "ratio": label_,
                    "value": value,
                    "target": "-"
                    if target is None
                    else f"{'<=' if le else '>='} {target:g}"
                    + (" (stretch)" if other == "ray-cgraph" else ""),
                    "met": met,
                    "key": f"ratio_{other}_{key}",
                }
            )
    return rows


def plot(records: list[common.Record], out_dir: Any) -> None:
    scenarios = list(dict.fromkeys(r["scenario"] for r in records))
    fig, axes = common.new_figure(len(scenarios), 2, size=(11, 4.2 * len(scenarios)))
    for row, scenario in enumerate(scenarios):
        measured = [r for r in records if r["scenario"] == scenario and r["median_ms"]]
        names = [r["system"] for r in measured]
        xs = range(len(measured))
        ax = axes[row][0]
        ax.bar([x - 0.2 for x in xs], [r["median_ms"] for r in measured], 0.4, label="median")
        ax.bar([x + 0.2 for x in xs], [r["p99_ms"] for r in measured], 0.4, label="p99")
        ax.set_yscale("log")
        ax.set_xticks(list(xs), names, rotation=15)
        ax.set_ylabel("ms per request, sequential (log)")
        ax.set_title(scenario, fontsize=9)
        ax.legend()
        ax = axes[row][1]
        ax.bar(names, [r["throughput_rps"] or 0 for r in measured])
        ax.set_yscale("log")
        ax.set_ylabel(f"requests/s, {IN_FLIGHT} in flight (log)")
        ax.tick_params(axis="x", rotation=15)
    common.save_figure(fig, NAME, out_dir)


if __name__ == "__main__":
    sys.exit(main())
