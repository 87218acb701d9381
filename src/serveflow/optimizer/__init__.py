"""Optimizer: pure `Plan -> Plan` rewrites, one module per rule."""

from __future__ import annotations

from serveflow.errors import FlowError
from serveflow.logical.flow import Flow, Stream
from serveflow.optimizer.batching import mark_batching
from serveflow.optimizer.compete import replicate
from serveflow.optimizer.fusion import fuse
from serveflow.optimizer.locality import mark_locality
from serveflow.optimizer.placement import place
from serveflow.optimizer.plan import Plan, Stage, logical_plan
from serveflow.optimizer.rules import Rules
from serveflow.optimizer.whole import fuse_whole

__all__ = ["Plan", "Rules", "Stage", "optimize"]


def optimize(flow: Flow | Stream, rules: Rules | None = None, *, gpus: bool | None = None) -> Plan:
    """Validate `flow` and compile it to a physical plan under `rules` (default `Rules()`).
    A stream stands for the flow it belongs to. `gpus`: whether GPU workers exist
    (None: whether this machine has a GPU).

    Marks come first (locality, batching, placement, replicas) so that fusion can
    respect them; the flow itself is never modified.
    """
    if not isinstance(flow, Stream):
        raise FlowError(f"optimize: expected a sf.Flow, got {type(flow).__name__}")
    rules = rules or Rules()
    plan = logical_plan(flow.flow, rules)
    if rules.locality:
        plan = mark_locality(plan)
    if rules.batching:
        plan = mark_batching(plan)
    plan = place(plan, gpus)
    if rules.compete:
        plan = replicate(plan, rules.compete_replicas)
    if rules.whole:
        return fuse_whole(plan)
    if rules.fusion:
        plan = fuse(plan)
    return plan
