"""Example pipeline: triage user comments.

A real language-identification model (py3langid, which ships its model inside the
PyPI package) runs as a batching stage beside a cheap feature branch; the branches are
joined per input row, each comment's author profile is looked up in the key-value
store, and comments the model is unsure about are dropped.

    python -m examples.comments [--requests N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import serveflow as sf

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="requests to send")
    args = parser.parse_args()

    flow = build_flow()
    print(sf.optimize(flow).explain(), end="\n\n")
    with flow.deploy() as app:
        for user, tier in PROFILES.items():
            app.kvs.put(user, tier)
        table = sf.Table.from_rows({"user": u, "text": t} for u, t in COMMENTS)
        for row in app.run(table).result(timeout=30).to_rows():
            print(f"{row['user']:>5}  {row['tier'] or '-':>6}  lang={row['lang']}"
                  f"  p={row['p']:.2f}  words={row['words']}")

        started = time.perf_counter()
        futures = []
        for i in range(args.requests):
            user, text = COMMENTS[i % len(COMMENTS)]
            futures.append((time.perf_counter(), app.run({"user": [user], "text": [text]})))
        latencies = []
        for sent, future in futures:
            future.result(timeout=60)
            latencies.append(time.perf_counter() - sent)
        elapsed = time.perf_counter() - started

        print(f"\n{args.requests} requests, all in flight at once: "
              f"{args.requests / elapsed:.0f} req/s, "
              f"median {statistics.median(latencies) * 1e3:.1f} ms, "
              f"p99 {statistics.quantiles(latencies, n=100)[98] * 1e3:.1f} ms\n")
        print(f"{'stage':<28}{'requests':>9}{'p50 ms':>9}{'p99 ms':>9}{'batch':>7}{'workers':>8}")
        for name, s in app.stats().items():
            print(f"{name:<28}{s['requests']:>9}{s['p50_ms']:>9.2f}{s['p99_ms']:>9.2f}"
                  f"{s['batch_mean']:>7.1f}{s['workers']:>8}")


if __name__ == "__main__":
    main()
