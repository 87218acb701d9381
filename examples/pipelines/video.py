"""Video streams: detect objects in each clip, then classify people and vehicles.

A YOLO-style detector runs on every frame of a clip (one row per clip: FRAMES frames of
64x64x3); clips with people go to a person classifier, clips with vehicles to a vehicle
classifier (two filtered branches that run in parallel), and the branches are
outer-joined per clip. All three networks are real architectures with seeded random
weights (see models.py).
"""

from __future__ import annotations

import numpy as np

import serveflow as sf
from examples.pipelines import models

FRAMES = 4
PEOPLE_MIN, VEHICLES_MIN = 5, 7  # person / vehicle cells over the clip (about half the clips each)
DETECTOR_SEED, PERSON_SEED, VEHICLE_SEED = 201, 202, 203


class Detector:
    def __init__(self) -> None:
        self.model = models.detector(DETECTOR_SEED)

    def __call__(self, row: sf.Row) -> tuple[str, np.ndarray, int, int]:
        clip = row["clip"]
        if not isinstance(clip, np.ndarray) or clip.shape[1:] != (models.IMAGE, models.IMAGE, 3):
            raise ValueError(
                f"clip: expected frames of 64x64x3, got {getattr(clip, 'shape', clip)}"
            )
        frames = [models.to_tensor(frame) for frame in clip]
        found = [kind for frame in frames for kind in models.detect(self.model, frame)]
        key_frame = frames[len(frames) // 2]
        return row["camera"], key_frame, found.count("person"), found.count("vehicle")


class PersonClassifier:
    """What the people in the clip are doing (a label of the key frame)."""

    def __init__(self) -> None:
        self.model = models.resnet(PERSON_SEED, classes=100)

    def __call__(self, frame: np.ndarray) -> tuple[int, float]:
        return models.classify(self.model, frame)


class VehicleClassifier:
    """Which kind of vehicle (a label of the key frame)."""

    def __init__(self) -> None:
        self.model = models.resnet(VEHICLE_SEED, classes=100)

    def __call__(self, frame: np.ndarray) -> tuple[int, float]:
        return models.classify(self.model, frame)


def has_people(row: sf.Row) -> bool:
    return row["people"] >= PEOPLE_MIN


def has_vehicles(row: sf.Row) -> bool:
    return row["vehicles"] >= VEHICLES_MIN


def build_flow() -> sf.Flow:
    flow = sf.Flow("video", schema={"camera": str, "clip": np.ndarray})
    detected = flow.map(Detector, names=["camera", "frame", "people", "vehicles"], name="detect")
    people = detected.filter(has_people, name="has_people").map(
        PersonClassifier, col="frame", names=["person"], name="person"
    )
    vehicles = detected.filter(has_vehicles, name="has_vehicles").map(
        VehicleClassifier, col="frame", names=["vehicle"], name="vehicle"
    )
    people.join(vehicles, how="outer")  # a clip with only one kind: the other is None
    return flow


def make_clip(rng: np.random.Generator) -> np.ndarray:
    """FRAMES frames of one scene drifting sideways, with fresh pixel noise each."""
    scene = models.synthetic_image(rng).astype(np.int16)
    frames = [
        np.roll(scene, 2 * t, axis=1) + rng.integers(-8, 9, scene.shape) for t in range(FRAMES)
    ]
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


def make_inputs(n: int, seed: int) -> list[sf.Table]:
    """`n` requests of one clip each, from 8 cameras in turn."""
    rng = np.random.default_rng(seed)
    return [sf.Table({"camera": [f"cam{i % 8}"], "clip": [make_clip(rng)]}) for i in range(n)]


if __name__ == "__main__":
    from examples.pipelines.demo import main

    main("video")
