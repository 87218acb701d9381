"""Batching marks: a stage holding a `batching` map merges concurrent requests."""

from __future__ import annotations

import dataclasses

from serveflow.logical.operators import Map
from serveflow.optimizer.plan import Plan, Stage


def _policy(stage: Stage):
    return next((op.batching for op in stage.ops if isinstance(op, Map) and op.batching), None)


def mark_batching(plan: Plan) -> Plan:
    stages = tuple(dataclasses.replace(s, batching=_policy(s)) for s in plan.stages)
    return dataclasses.replace(plan, stages=stages)
