"""Competitive execution: run a `high_variance` stage on several workers at once and
keep the first result, cutting the tail that one slow run would cause."""

from __future__ import annotations

import dataclasses

from serveflow.optimizer.plan import Plan


def replicate(plan: Plan, extra: int) -> Plan:
    stages = tuple(
        dataclasses.replace(s, replicas=1 + extra) if s.high_variance else s for s in plan.stages
    )
    return dataclasses.replace(plan, stages=stages)
