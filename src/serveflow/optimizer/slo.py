"""A flow-level latency SLO split across the batching stages (`flow.deploy(slo_ms=...)`)."""

from __future__ import annotations

import dataclasses

from serveflow.batching.controller import split_slo
from serveflow.optimizer.plan import Plan


def assign_slo(plan: Plan, slo_ms: float, service_ms: dict[int, float] | None = None) -> Plan:
    """Give every batching stage without its own SLO a share of `slo_ms`, in proportion
    to its service time (`service_ms` by stage index; equal shares when unknown). On a
    plan that already has a flow SLO, re-split it among the same stages.

    Batching stages are taken to be in sequence (the critical path of a pipeline of
    models); stages on parallel branches would each get less than they could.
    """
    indices = plan.slo_stages or [
        i for i, s in enumerate(plan.stages) if s.batching and not s.batching.slo_ms
    ]
    known = service_ms or {}
    shares = split_slo(slo_ms, {i: known.get(i, 1.0) for i in indices})
    stages = tuple(
        dataclasses.replace(s, batching=dataclasses.replace(s.batching, slo_ms=shares[i]))  # type: ignore[arg-type]
        if i in shares
        else s
        for i, s in enumerate(plan.stages)
    )
    return dataclasses.replace(plan, stages=stages, slo_ms=slo_ms, slo_stages=tuple(shares))
