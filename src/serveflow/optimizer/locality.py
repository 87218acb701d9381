"""Locality breakpoints: a dynamic lookup starts its own stage, so the scheduler can
send it to a worker that already caches the looked-up key (Cloudflow's locality rule)."""

from __future__ import annotations

import dataclasses

from serveflow.logical.operators import Lookup
from serveflow.optimizer.plan import Plan


def mark_locality(plan: Plan) -> Plan:
    stages = tuple(
        dataclasses.replace(stage, locality_key=head.key)
        if isinstance(head := stage.ops[0], Lookup) and head.dynamic
        else stage
        for stage in plan.stages
    )
    return dataclasses.replace(plan, stages=stages)
