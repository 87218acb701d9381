"""Image cascade: a fast model first, a second model only for the images it is unsure of.

preprocess -> ResNet-style CNN -> filter (confidence < THRESHOLD) -> Inception-style CNN,
left-joined back onto the ResNet's rows; each image keeps the more confident label.
Both CNNs are real architectures with seeded random weights (see models.py).

    python -m examples.pipelines.cascade [--requests N] [--concurrency C]

serves the pipeline on the embedded runtime, sends generated images and prints the
latency table (end to end and per stage).
"""

from __future__ import annotations

import numpy as np

import serveflow as sf
from examples.pipelines import models

THRESHOLD = 0.15  # below this ResNet confidence, Inception is asked too (about half)
RESNET_SEED, INCEPTION_SEED = 101, 102


def preprocess(image: np.ndarray) -> np.ndarray:
    return models.to_tensor(image)


class ResNet:
    def __init__(self) -> None:
        self.model = models.resnet(RESNET_SEED)

    def __call__(self, row: sf.Row) -> tuple[np.ndarray, int, float]:
        label, conf = models.classify(self.model, row["x"])
        return row["x"], label, conf


class Inception:
    def __init__(self) -> None:
        self.model = models.inception(INCEPTION_SEED)

    def __call__(self, x: np.ndarray) -> tuple[int, float]:
        return models.classify(self.model, x)


def unsure(row: sf.Row) -> bool:
    return row["conf"] < THRESHOLD


def pick(row: sf.Row) -> tuple[int, float, str]:
    """The more confident of the two answers (Inception's only where it ran)."""
    if row["inception"] is not None and row["inception"][1] > row["conf"]:
        return row["inception"][0], row["inception"][1], "inception"
    return row["label"], row["conf"], "resnet"


def build_flow() -> sf.Flow:
    flow = sf.Flow("cascade", schema={"image": np.ndarray})
    pre = flow.map(preprocess, col="image", names=["x"])
    resnet = pre.map(ResNet, names=["x", "label", "conf"], name="resnet")
    second = resnet.filter(unsure, name="unsure").map(
        Inception, col="x", names=["inception"], name="inception"
    )
    joined = resnet.join(second, how="left")  # images ResNet was sure of: inception None
    joined.map(pick, names=["label", "conf", "model"], name="pick")
    return flow


def make_inputs(n: int, seed: int) -> list[sf.Table]:
    """`n` requests of one generated 64x64 image each."""
    rng = np.random.default_rng(seed)
    return [sf.Table({"image": [models.synthetic_image(rng)]}) for _ in range(n)]


if __name__ == "__main__":
    from examples.pipelines.demo import main

    main("cascade")
