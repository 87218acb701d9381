"""Example pipeline: triage user comments.

A real language-identification model (py3langid, which ships its model inside the
PyPI package) runs as a batching stage beside a cheap feature branch; the branches are
joined per input row, each comment's author profile is looked up in the key-value
store, and comments the model is unsure about are dropped.

    python -m examples.comments [--requests N] [--concurrency C] [--port P] [--hold S]

serves the pipeline over HTTP on the embedded runtime (the dashboard is at the printed
address while it runs), drives a short load run through it and prints the figures.
`serveflow serve examples/comments.py:build_flow` serves the same pipeline from the CLI.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import aiohttp
import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import serveflow as sf
from serveflow.serving import Server

COMMENTS = [
    ("ana", "Das ist wirklich ein großartiges Produkt, danke!"),
    ("bo", "This is the best pipeline I have ever deployed."),
    ("chen", "Je ne comprends pas pourquoi la livraison est si lente."),
    ("dia", "Questo servizio funziona benissimo, lo consiglio a tutti."),
    ("eli", "ok"),
    ("fu", "¿Dónde puedo encontrar la documentación completa del sistema?"),
]
PROFILES = {"ana": "gold", "bo": "new", "chen": "gold", "dia": "new", "fu": "silver"}


class LanguageId:
    """Loaded once per worker; classifies a whole batch of texts per call."""

    def __init__(self) -> None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        self.model = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)

    def __call__(self, batch: sf.Table) -> list[tuple[str, float]]:
        return [self.model.classify(text) for text in batch.column("text")]


def normalize(text: str) -> str:
    return " ".join(text.split())


def build_flow() -> sf.Flow:
    flow = sf.Flow("comments", schema={"user": str, "text": str})
    clean = flow.map(normalize, col="text")
    lang = clean.map(LanguageId, names=["lang", "p"], batching=True)
    words = clean.map(
        lambda r: (r["user"], len(r["text"].split())), names=["user", "words"], name="features"
    )
    joined = words.join(lang)  # rows derived from the same comment line up by qid
    profiled = joined.lookup("user", dynamic=True, into="tier")
    profiled.filter(lambda r: r["p"] >= 0.9, name="confident")
    return flow


async def drive(
    url: str, requests: int, concurrency: int, label: str = "load run"
) -> tuple[list[float], dict[int, int]]:
    """Send `requests` one-comment requests from `concurrency` concurrent clients;
    return each successful request's latency (s) and the count of each HTTP status."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as session:
        with Progress(*columns) as progress:
            task = progress.add_task("requests", total=requests)

            async def client_loop() -> None:
                while not queue.empty():
                    user, text = COMMENTS[queue.get_nowait() % len(COMMENTS)]
                    sent = time.perf_counter()
                    body = {"rows": [{"user": user, "text": text}]}
                    async with session.post("/v1/flows/comments/predict", json=body) as response:
                        await response.read()
                    if response.status == 200:
                        latencies.append(time.perf_counter() - sent)
                    statuses[response.status] = statuses.get(response.status, 0) + 1
                    progress.advance(task)

            await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return latencies, statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="requests to send")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent HTTP clients")
    parser.add_argument("--port", type=int, default=0, help="HTTP port (default: a free one)")
    parser.add_argument(
        "--hold", type=float, default=0.0, help="seconds to keep serving after the load run"
    )
    args = parser.parse_args()
    console = Console(soft_wrap=True)

    flow = build_flow()
    console.print(sf.optimize(flow).explain(), end="\n\n", highlight=False, markup=False)
    # A fixed pool of one worker per core: the language model loads once per worker
    # (a cold start of about 1.5 s), so the warm-up below reaches every worker first.
    runtime = sf.LocalRuntime(min_workers=2, max_workers=2)
    app = flow.deploy(runtime=runtime)
    for user, tier in PROFILES.items():
        app.kvs.put(user, tier)
    with Server({flow.name: app}, port=args.port) as server:
        console.print(
            f"serving on {server.url}  dashboard: {server.url}/  metrics: {server.url}/metrics\n",
            highlight=False,
        )
        rows = [{"user": u, "text": t} for u, t in COMMENTS]
        reply = httpx.post(
            f"{server.url}/v1/flows/comments/predict", json={"rows": rows}, timeout=60
        )
        reply.raise_for_status()
        for row in reply.json()["rows"]:
            console.print(
                f"{row['user']:>5}  {row['tier'] or '-':>6}  lang={row['lang']}"
                f"  p={row['p']:.2f}  words={row['words']}",
                highlight=False,
            )
        console.print()

        asyncio.run(drive(server.url, 4 * args.concurrency, args.concurrency, "warm-up "))
        started = time.perf_counter()
        latencies, statuses = asyncio.run(drive(server.url, args.requests, args.concurrency))
        elapsed = time.perf_counter() - started

        summary = Table(
            title=f"HTTP load run: {args.requests} requests, {args.concurrency} concurrent clients"
        )
        for name in ("ok", "errors", "req/s", "median ms", "p90 ms", "p99 ms", "max ms"):
            summary.add_column(name, justify="right")
        ms = sorted(x * 1e3 for x in latencies) or [0.0]
        cuts = statistics.quantiles(ms, n=100) if len(ms) > 1 else [ms[0]] * 99
        summary.add_row(
            str(statuses.get(200, 0)), str(sum(n for s, n in statuses.items() if s != 200)),
            f"{len(latencies) / elapsed:.0f}", f"{statistics.median(ms):.1f}",
            f"{cuts[89]:.1f}", f"{cuts[98]:.1f}", f"{ms[-1]:.1f}",
        )  # fmt: skip
        console.print(summary)

        time.sleep(0.5)  # workers report their figures every 0.25 s
        stages = Table(title="per stage (app.stats(); latencies over the last 10 s)")
        for name in ("stage", "requests", "p50 ms", "p99 ms", "batch", "workers"):
            stages.add_column(name, justify="left" if name == "stage" else "right")
        for name, s in app.stats().items():
            stages.add_row(name, str(s["requests"]), f"{s['p50_ms']:.2f}", f"{s['p99_ms']:.2f}",
                           f"{s['batch_mean']:.1f}", str(s["workers"]))  # fmt: skip
        console.print(stages)
        if args.hold > 0:
            console.print(f"dashboard: {server.url}/ (serving {args.hold:g} s more)")
            time.sleep(args.hold)
        console.print("shutting down: draining requests, stopping workers")
    runtime.stop()
    console.print("stopped cleanly")


if __name__ == "__main__":
    main()
