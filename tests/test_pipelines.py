"""The Cloudflow pipelines of examples/pipelines, deployed on the embedded runtime.

Each pipeline runs small generated requests, all sent at once, under no rewrites, the
default rules and all rewrites (competitive replicas included), and under whole-flow
fusion; every request's rows must equal what the same functions give when called
directly in this process, so the rule sets agree with each other row for row.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from examples.pipelines import cascade, ensemble, models, recommender, translation, video

import serveflow as sf

RULE_SETS = {
    "no rewrites": sf.Rules(fusion=False, compete=False, locality=False, batching=False),
    "defaults": sf.Rules(),
    "all rewrites": sf.Rules(compete=True, compete_replicas=1),
    "whole": sf.Rules(whole=True, compete=True),
}
REQUESTS = 16
SMALL_STORE = {"users": 300, "categories": 12}


@pytest.fixture(scope="module")
def runtime() -> Iterator[sf.LocalRuntime]:
    """One pool for every deployment: workers import torch once."""
    pool = sf.LocalRuntime(min_workers=2, max_workers=2, stage_timeout_s=120)
    yield pool
    pool.stop()


def run_all(
    runtime: sf.LocalRuntime, module: Any, rules: sf.Rules, tables: list[sf.Table]
) -> list[list[dict[str, Any]]]:
    """Every request sent at once; each request's output rows."""
    with module.build_flow().deploy(rules=rules, runtime=runtime) as app:
        if hasattr(module, "load_store"):
            module.load_store(app.kvs, seed=5, **SMALL_STORE)
        futures = [app.run(table) for table in tables]
        return [future.result(timeout=120).to_rows() for future in futures]


def only_row(table: sf.Table) -> sf.Row:
    rows = list(table)
    assert len(rows) == 1
    return rows[0]


def row_of(**values: Any) -> sf.Row:
    return only_row(sf.Table({k: [v] for k, v in values.items()}))


def check_every_rule_set(
    runtime: sf.LocalRuntime, module: Any, tables: list[sf.Table], expected: list[list[dict]]
) -> None:
    for label, rules in RULE_SETS.items():
        got = run_all(runtime, module, rules, tables)
        assert got == expected, f"{module.__name__} under {label}"


# --- inputs and models -------------------------------------------------------------


def test_inputs_are_deterministic_and_shaped() -> None:
    for module in (cascade, video, translation, recommender, ensemble):
        first, again = module.make_inputs(3, seed=9), module.make_inputs(3, seed=9)
        assert len(first) == 3 and all(len(t) == 1 for t in first)
        for a, b in zip(first, again):
            for name in a.columns:
                assert np.array_equal(np.asarray(a.column(name)[0]), np.asarray(b.column(name)[0]))
    assert cascade.make_inputs(1, 0)[0].column("image")[0].shape == (64, 64, 3)
    clip = video.make_inputs(1, 0)[0].column("clip")[0]
    assert clip.shape == (video.FRAMES, 64, 64, 3) and clip.dtype == np.uint8
    assert ensemble.make_inputs(1, 0)[0].column("pixels")[0].shape == (8, 8)
    x = cascade.preprocess(cascade.make_inputs(1, 0)[0].column("image")[0])
    assert x.shape == (3, 64, 64) and x.dtype == np.float32
    with pytest.raises(ValueError, match="64x64x3"):
        cascade.preprocess(np.zeros((32, 32, 3), np.uint8))


def test_seeded_models_are_the_same_in_every_build() -> None:
    image = cascade.preprocess(cascade.make_inputs(1, 4)[0].column("image")[0])
    assert models.classify(models.resnet(7), image) == models.classify(models.resnet(7), image)
    assert models.classify(models.resnet(7), image) != models.classify(models.resnet(8), image)
    source = models.tokenize("der hund ist sehr gut")
    assert models.Seq2Seq(1).translate(source) == models.Seq2Seq(1).translate(source)


# --- the pipelines -----------------------------------------------------------------


def test_cascade_routes_unsure_images_to_inception_and_keeps_the_better_label(runtime) -> None:
    tables = cascade.make_inputs(REQUESTS, seed=11)
    resnet, inception = cascade.ResNet(), cascade.Inception()
    expected, unsure = [], 0
    for table in tables:
        x = cascade.preprocess(table.column("image")[0])
        _, label, conf = resnet(row_of(x=x))
        second = inception(x) if conf < cascade.THRESHOLD else None
        unsure += second is not None
        expected.append([dict(zip(["label", "conf", "model"], cascade.pick(
            row_of(label=label, conf=conf, inception=second))))])  # fmt: skip
    assert 0 < unsure < REQUESTS  # both routes taken
    assert any(rows[0]["model"] == "inception" for rows in expected)
    check_every_rule_set(runtime, cascade, tables, expected)


def test_video_branches_join_per_clip(runtime) -> None:
    tables = video.make_inputs(REQUESTS, seed=12)
    detector, person, vehicle = (
        video.Detector(),
        video.PersonClassifier(),
        video.VehicleClassifier(),
    )
    expected, kinds = [], set()
    for table in tables:
        camera, frame, people, vehicles = detector(only_row(table))
        row = {"camera": camera, "person": None, "people": people, "vehicles": vehicles}
        if people >= video.PEOPLE_MIN:
            row["person"] = person(frame)
        if vehicles >= video.VEHICLES_MIN:
            row["vehicle"] = vehicle(frame)
        kinds.add((row["person"] is not None, "vehicle" in row))
        row.setdefault("vehicle", None)
        # Neither branch took the clip: no row (the outer join has nothing to match).
        expected.append([row] if row["person"] or row["vehicle"] else [])
    assert kinds == {(True, True), (True, False), (False, True), (False, False)}
    check_every_rule_set(runtime, video, tables, expected)


def test_translation_by_language_and_unchanged_otherwise(runtime) -> None:
    tables = translation.make_inputs(REQUESTS, seed=13)
    langid = translation.LanguageId()
    translators = {"fr": translation.FrenchToEnglish(), "de": translation.GermanToEnglish()}
    expected = []
    for i, table in enumerate(tables):
        text, lang = langid(only_row(table))
        assert lang == list(translation.WORDS)[i % 4]  # the generated language, found
        if lang in translators:
            out = translators[lang](row_of(text=text, lang=lang))
            assert out[2] != text and out[2].startswith("w")
        else:
            out = (text, lang, text)
        expected.append([dict(zip(["text", "lang", "translation"], out))])
    plan = sf.optimize(translation.build_flow(), RULE_SETS["all rewrites"]).explain()
    assert "replicated" in plan
    check_every_rule_set(runtime, translation, tables, expected)


def test_recommender_top5_in_score_order(runtime) -> None:
    values: dict[str, Any] = {}

    class Store:
        def put(self, key: str, value: Any) -> None:
            values[key] = value

    recommender.load_store(Store(), seed=5, **SMALL_STORE)
    assert len([k for k in values if k.startswith("category:")]) == SMALL_STORE["categories"]
    tables = recommender.make_inputs(REQUESTS, seed=14, users=SMALL_STORE["users"])
    expected = []
    for table in tables:
        user = table.column("user")[0]
        embedding = values[user]
        category = int(np.argmax(values["centroids"] @ embedding))
        scores = values[f"category:{category}"] @ embedding
        best = sorted(range(len(scores)), key=lambda i: -scores[i])[: recommender.TOP]
        expected.append([{"user": user, "category": f"category:{category}", "top5": best,
                          "scores": [float(scores[i]) for i in best]}])  # fmt: skip
        assert all(a > b for a, b in itertools.pairwise(expected[-1][0]["scores"]))
    assert "locality" in sf.optimize(recommender.build_flow()).explain()
    check_every_rule_set(runtime, recommender, tables, expected)


def test_recommender_unknown_user_is_an_operator_error(runtime) -> None:
    with recommender.build_flow().deploy(runtime=runtime) as app:
        recommender.load_store(app.kvs, seed=5, **SMALL_STORE)
        with pytest.raises(sf.OperatorError, match=r"pick.*unknown user 'nobody'"):
            app.run(sf.Table({"user": ["nobody"]})).result(timeout=60)


def test_ensemble_averages_three_models(runtime) -> None:
    tables = ensemble.make_inputs(REQUESTS, seed=15)
    trained = [ensemble.LogisticModel(), ensemble.ForestModel(), ensemble.SVMModel()]
    expected, right = [], 0
    images, labels = ensemble.digits()
    for table in tables:
        pixels = table.column("pixels")[0]
        x = ensemble.preprocess(pixels)
        probs = [model(x) for model in trained]
        assert all(p.shape == (10,) for p in probs)
        label, conf = ensemble.average(row_of(logistic=probs[0], forest=probs[1], svm=probs[2]))
        expected.append([{"label": label, "conf": conf}])
        truth = labels[next(i for i in range(len(images)) if np.array_equal(images[i], pixels))]
        right += label == truth
    assert right >= 0.8 * REQUESTS  # real trained models: held-out digits mostly right
    check_every_rule_set(runtime, ensemble, tables, expected)


def test_malformed_inputs_fail_with_the_operator_named(runtime) -> None:
    bad = {
        cascade: (sf.Table({"image": [np.zeros((32, 32, 3), np.uint8)]}), "preprocess.*64x64x3"),
        video: (sf.Table({"camera": ["c"], "clip": [np.zeros((4, 8, 8), np.uint8)]}), "detect"),
        ensemble: (sf.Table({"pixels": [np.zeros((4, 4))]}), "preprocess.*8x8"),
    }
    for module, (table, message) in bad.items():
        with module.build_flow().deploy(runtime=runtime) as app:
            with pytest.raises(sf.OperatorError, match=message):
                app.run(table).result(timeout=60)
            good = module.make_inputs(1, seed=0)[0]
            app.run(good).result(timeout=60)  # and the deployment keeps serving
    with (
        translation.build_flow().deploy(runtime=runtime) as app,
        pytest.raises(sf.InputError, match="text"),
    ):
        app.run(sf.Table({"text": [42]})).result(timeout=60)
