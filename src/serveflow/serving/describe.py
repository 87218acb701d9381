"""A deployed flow as JSON: its plan as a graph of stages, schema and SLOs."""

from __future__ import annotations

from typing import Any

from serveflow.logical.flow import SOURCE_ID
from serveflow.optimizer.plan import Plan
from serveflow.runtime.app import App

REQUEST = "request"  # the graph node every stage reading the request table points to


def plan_graph(plan: Plan) -> dict[str, Any]:
    """Stages in topological order, each with the stages (or "request") it reads from.

    Stage ids are the plan's; `output` is the id of the stage whose output is the
    response.
    """
    stages = []
    for stage in plan.stages:
        batching = stage.batching
        stages.append(
            {
                "id": stage.id,
                "name": stage.name,
                "ops": [op.describe() for op in stage.ops],
                "inputs": [
                    REQUEST if op_id == SOURCE_ID else plan.stage_of(op_id).id
                    for op_id in stage.inputs
                ],
                "replicas": stage.replicas,
                "batching": None if batching is None else _batching(batching),
                "placement": stage.placement,
                "gpu_requested": stage.gpu_requested,
                "locality_key": stage.locality_key,
            }
        )
    return {"stages": stages, "output": plan.output_stage.id}


def _batching(policy: Any) -> dict[str, Any]:
    entry = {"max_size": policy.size, "timeout_ms": policy.timeout_ms or 0.0}
    if getattr(policy, "slo_ms", None):
        entry |= {"slo_ms": policy.slo_ms, "percentile": policy.percentile,
                  "objective": policy.objective}  # fmt: skip
    return entry


def _slos(plan: Plan) -> dict[str, Any] | None:
    """The flow's latency budget and each batching stage's SLO; None without any."""
    stages = {
        stage.name: {
            "slo_ms": stage.batching.slo_ms,
            "percentile": stage.batching.percentile,
            "objective": stage.batching.objective,
        }
        for stage in plan.stages
        if stage.batching is not None and getattr(stage.batching, "slo_ms", None)
    }
    flow_ms = getattr(plan, "slo_ms", None)
    if not stages and not flow_ms:
        return None
    return {"flow_ms": flow_ms, "stages": stages}


def _type_name(expected: Any) -> str:
    if isinstance(expected, tuple):
        return " | ".join(_type_name(t) for t in expected)
    module = getattr(expected, "__module__", "builtins")
    name = getattr(expected, "__qualname__", repr(expected))
    return name if module == "builtins" else f"{module}.{name}"


def flow_info(app: App) -> dict[str, Any]:
    """What `GET /v1/flows` says about one deployed flow."""
    plan = app.plan
    schema = plan.schema
    return {
        "name": app.name,
        "schema": {col: _type_name(t) for col, t in schema.items()} if schema else None,
        "slo": _slos(plan),
        "explain": app.explain(),
        "graph": plan_graph(plan),
        "predict": f"/v1/flows/{app.name}/predict",
    }
