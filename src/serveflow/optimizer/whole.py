"""Whole-flow fusion: the entire DAG runs as one stage in one worker."""

from __future__ import annotations

import dataclasses
import functools

from serveflow.optimizer.fusion import fuse, merge
from serveflow.optimizer.plan import Plan


def fuse_whole(plan: Plan) -> Plan:
    """One stage, unless the flow has an anyof between stages: one stage would run its
    branches one after another, so then the chains around them are fused instead."""
    if plan.anyof_groups:
        return fuse(plan)
    whole = functools.reduce(merge, plan.stages)
    whole = dataclasses.replace(
        whole,
        ops=tuple(sorted(whole.ops, key=lambda op: op.id)),
        replicas=max(s.replicas for s in plan.stages),
        placement="gpu" if any(s.placement == "gpu" for s in plan.stages) else "cpu",
        locality_key=None,
    )
    return dataclasses.replace(plan, stages=(whole,))
