"""Ensemble: three classifiers in parallel on the same input, joined, averaged.

Real models, trained when a worker loads them (under a second each) on the first
TRAIN of scikit-learn's shipped handwritten digits (8x8 images): a logistic regression,
a random forest and an RBF support-vector machine. Requests are held-out digits; the
answer is the label with the highest average probability. Each model is a stage of
its own, so the three run at once on distinct workers when the pool has room.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import serveflow as sf
from examples.pipelines import models

TRAIN = 1200  # digits 0..TRAIN-1 train the models; make_inputs draws from the rest


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 digits: (8x8 images with values 0..16, labels)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images, data.target


def preprocess(pixels: np.ndarray) -> np.ndarray:
    """8x8 image of 0..16 -> 64 features in 0..1."""
    pixels = np.asarray(pixels, dtype=np.float64)
    if pixels.shape != (8, 8):
        raise ValueError(f"expected an 8x8 digit image, got shape {pixels.shape}")
    return pixels.reshape(64) / 16.0


class _Trained:
    """A scikit-learn classifier fitted at load on the training digits; called on one
    preprocessed image, it returns the 10 class probabilities."""

    def make(self) -> Any:
        raise NotImplementedError

    def __init__(self) -> None:
        models.one_thread()
        images, labels = digits()
        self.model = self.make().fit(images[:TRAIN].reshape(TRAIN, 64) / 16.0, labels[:TRAIN])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict_proba(x.reshape(1, -1))[0]


class LogisticModel(_Trained):
    def make(self) -> Any:
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(max_iter=2000)


class ForestModel(_Trained):
    def make(self) -> Any:
        from sklearn.ensemble import RandomForestClassifier

        return RandomForestClassifier(n_estimators=50, random_state=0)


class SVMModel(_Trained):
    def make(self) -> Any:
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.svm import SVC

        return CalibratedClassifierCV(SVC(), ensemble=False, cv=3)  # the SVM's probabilities


def average(row: sf.Row) -> tuple[int, float]:
    mean = (row["logistic"] + row["forest"] + row["svm"]) / 3
    return int(np.argmax(mean)), float(mean.max())


def build_flow() -> sf.Flow:
    flow = sf.Flow("ensemble", schema={"pixels": np.ndarray})
    x = flow.map(preprocess, col="pixels", names=["x"])
    logistic = x.map(LogisticModel, col="x", names=["logistic"], name="logistic")
    forest = x.map(ForestModel, col="x", names=["forest"], name="forest")
    svm = x.map(SVMModel, col="x", names=["svm"], name="svm")
    logistic.join(forest).join(svm).map(average, names=["label", "conf"], name="average")
    return flow


def make_inputs(n: int, seed: int) -> list[sf.Table]:
    """`n` requests of one held-out digit image each (drawn with replacement)."""
    images, _ = digits()
    rng = np.random.default_rng(seed)
    picked = rng.integers(TRAIN, len(images), size=n)
    return [sf.Table({"pixels": [images[i]]}) for i in picked]


if __name__ == "__main__":
    from examples.pipelines.demo import main

    main("ensemble")
