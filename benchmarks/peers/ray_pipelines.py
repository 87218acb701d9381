"""Ray Serve peers of the Cloudflow pipelines: the same functions as composed deployments.

Each pipeline is written as Ray Serve users write one: an HTTP ingress deployment that
decodes the body, does the light steps (preprocess, filters, join, pick, average)
itself and calls one deployment per model through handles, awaiting parallel branches
with `asyncio.gather`. The model classes and functions are those of
examples/pipelines, so both systems compute the very same rows (the benchmark checks
it). The recommender's ranking deployment is multiplexed by category
(`@serve.multiplexed`, Ray Serve's way to route a key to the replica holding its
value) and keeps as many product matrices per replica as serveflow's worker cache
holds (256 MB).

Every model deployment has `replicas` replicas and runs one torch/BLAS thread per
call, as serveflow's workers do; Ray Serve's defaults otherwise (sync model methods
in its thread pool, `max_ongoing_requests` 5). The ingress takes up to
INGRESS_ONGOING requests at once per replica so that it never caps throughput.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from typing import Any

import numpy as np
from examples.pipelines import cascade, ensemble, models, recommender, translation, video

INGRESS_ONGOING = 256
CACHE_BYTES = 256 << 20  # serveflow's LocalRuntime(cache_bytes=...) default
PRODUCT_BYTES = recommender.PRODUCTS * recommender.DIM * 4


def decode_rows(body: bytes, content_type: str) -> list[dict[str, Any]]:
    """JSON {"rows": [...]} or a .npz of columns (first axis rows), as serveflow reads them."""
    if content_type.startswith("application/x-npz"):
        with np.load(io.BytesIO(body), allow_pickle=False) as archive:
            columns = {
                name: archive[name].tolist() if archive[name].ndim == 1 else list(archive[name])
                for name in archive.files
            }
        n = len(next(iter(columns.values()), []))
        return [{name: values[i] for name, values in columns.items()} for i in range(n)]
    import orjson

    return orjson.loads(body)["rows"]


def build_app(name: str, replicas: int, store: str | None, ingress_replicas: int = 1) -> Any:
    """The Ray Serve application (ingress bound to its model deployments) of pipeline `name`."""
    from ray import serve

    model_options = {"num_replicas": replicas, "ray_actor_options": {"num_cpus": 0}}

    @serve.deployment(**model_options)
    class Model:
        """One model of examples/pipelines: `factory()` loaded once, then called."""

        def __init__(self, factory: Callable[[], Any]) -> None:
            models.one_thread()
            self.model = factory()

        def __call__(self, value: Any) -> Any:
            return self.model(value)

    @serve.deployment(
        num_replicas=ingress_replicas,
        max_ongoing_requests=INGRESS_ONGOING,
        ray_actor_options={"num_cpus": 0},
    )
    class Ingress:
        def __init__(self, **handles: Any) -> None:
            import orjson

            models.one_thread()
            self.handles = handles
            self.dumps = orjson.dumps
            self.numpy_option = orjson.OPT_SERIALIZE_NUMPY
            self.store = None
            if store is not None:
                from serveflow.runtime.kvs import open_kvs

                self.store = open_kvs(store)
                self.centroids = self.store.get("centroids")

        async def __call__(self, request: Any) -> Any:
            from starlette.responses import Response

            rows = decode_rows(await request.body(), request.headers.get("content-type", ""))
            out = await asyncio.gather(*(PIPELINES[name](self, row) for row in rows))
            body = {"rows": [row for rows_of_one in out for row in rows_of_one]}
            data = self.dumps(body, option=self.numpy_option)
            return Response(data, media_type="application/json")

    handles = {key: Model.options(name=key).bind(factory) for key, factory in MODELS[name].items()}
    if name == "recommender":
        handles["ranker"] = _ranker(serve, replicas, store).bind()
    return Ingress.bind(**handles)


def _ranker(serve: Any, replicas: int, store: str | None) -> Any:
    per_replica = max(1, CACHE_BYTES // PRODUCT_BYTES)

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 0})
    class Ranker:
        """Scores one category's products; requests routed by category (multiplexed)."""

        def __init__(self) -> None:
            from serveflow.runtime.kvs import open_kvs

            models.one_thread()
            self.store = open_kvs(store)

        @serve.multiplexed(max_num_models_per_replica=per_replica)
        async def products(self, category: str) -> np.ndarray:
            return self.store.get(category)

        async def __call__(self, row: dict[str, Any]) -> tuple[Any, ...]:
            products = await self.products(serve.get_multiplexed_model_id())
            return recommender.top_products({**row, "products": products})

    return Ranker


# --- the pipelines, as ingress code ---------------------------------------------------


async def _cascade(self: Any, row: dict[str, Any]) -> list[dict[str, Any]]:
    x = cascade.preprocess(row["image"])
    x, label, conf = await self.handles["resnet"].remote({"x": x})
    second = None
    if cascade.unsure({"conf": conf}):
        second = await self.handles["inception"].remote(x)
    picked = cascade.pick({"label": label, "conf": conf, "inception": second})
    return [dict(zip(["label", "conf", "model"], picked))]


async def _video(self: Any, row: dict[str, Any]) -> list[dict[str, Any]]:
    camera, frame, people, vehicles = await self.handles["detect"].remote(row)
    seen = {"camera": camera, "people": people, "vehicles": vehicles}
    branches = {"person": video.has_people(seen), "vehicle": video.has_vehicles(seen)}
    calls = [self.handles[kind].remote(frame) for kind, taken in branches.items() if taken]
    if not calls:
        return []
    answers = iter(await asyncio.gather(*calls))
    return [
        {**seen, **{kind: next(answers) if taken else None for kind, taken in branches.items()}}
    ]


async def _translation(self: Any, row: dict[str, Any]) -> list[dict[str, Any]]:
    text, lang = await self.handles["langid"].remote(row)
    tagged = {"text": text, "lang": lang}
    if lang in translation.TRANSLATED:
        out = await self.handles[f"{lang}_en"].remote(tagged)
    else:
        out = translation.untranslated(tagged)
    return [dict(zip(["text", "lang", "translation"], out))]


async def _recommender(self: Any, row: dict[str, Any]) -> list[dict[str, Any]]:
    embedding = self.store.get(row["user"])
    user, embedding, category = recommender.pick_category(
        {"user": row["user"], "embedding": embedding, "centroids": self.centroids}
    )
    ranker = self.handles["ranker"].options(multiplexed_model_id=category)
    out = await ranker.remote({"user": user, "embedding": embedding, "category": category})
    return [dict(zip(["user", "category", "top5", "scores"], out))]


async def _ensemble(self: Any, row: dict[str, Any]) -> list[dict[str, Any]]:
    x = ensemble.preprocess(row["pixels"])
    names = ("logistic", "forest", "svm")
    probs = await asyncio.gather(*(self.handles[n].remote(x) for n in names))
    label, conf = ensemble.average(dict(zip(names, probs)))
    return [{"label": label, "conf": conf}]


PIPELINES = {
    "cascade": _cascade,
    "video": _video,
    "translation": _translation,
    "recommender": _recommender,
    "ensemble": _ensemble,
}
MODELS: dict[str, dict[str, Callable[[], Any]]] = {
    "cascade": {"resnet": cascade.ResNet, "inception": cascade.Inception},
    "video": {
        "detect": video.Detector,
        "person": video.PersonClassifier,
        "vehicle": video.VehicleClassifier,
    },
    "translation": {
        "langid": translation.LanguageId,
        "fr_en": translation.FrenchToEnglish,
        "de_en": translation.GermanToEnglish,
    },
    "recommender": {},
    "ensemble": {
        "logistic": ensemble.LogisticModel,
        "forest": ensemble.ForestModel,
        "svm": ensemble.SVMModel,
    },
}
