"""`Rules`: which rewrites `optimize` applies."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rules:
    """Rewrite switches.

    fusion: fuse linear chains of compatible operators into one stage.
    compete: run `high_variance` maps on `1 + compete_replicas` workers, first wins.
    locality: start a stage at each dynamic lookup so it runs where the key is cached.
    batching: let `batching` maps merge concurrent requests into one call.
    whole: fuse the entire flow into one stage (overrides fusion).
    """

    fusion: bool = True
    compete: bool = False
    compete_replicas: int = 1
    locality: bool = True
    batching: bool = True
    whole: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.compete_replicas, int) or self.compete_replicas < 0:
            raise ValueError(f"compete_replicas must be an int >= 0, got {self.compete_replicas!r}")

    def describe(self) -> str:
        flags = ("fusion", "whole", "compete", "locality", "batching")
        text = ", ".join(f"{f} {'on' if getattr(self, f) else 'off'}" for f in flags)
        return f"{text} (compete_replicas={self.compete_replicas})" if self.compete else text
