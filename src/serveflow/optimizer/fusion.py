"""Operator fusion: merge a stage into its only producer when that producer feeds
nothing else, so the chain runs in one worker with no hop in between."""

from __future__ import annotations

import dataclasses

from serveflow.logical.flow import SOURCE_ID
from serveflow.optimizer.plan import Plan, Stage


def compatible(producer: Stage, consumer: Stage) -> bool:
    """Fusion keeps what each stage needs of the runtime: one placement, at most one
    batching policy, competing replicas alone, locality breakpoints as stage heads."""
    return (
        consumer.locality_key is None
        and producer.placement == consumer.placement
        and not (producer.batching and consumer.batching)
        and producer.replicas == consumer.replicas == 1
    )


def merge(first: Stage, second: Stage) -> Stage:
    return dataclasses.replace(
        first,
        ops=first.ops + second.ops,
        batching=first.batching or second.batching,
        gpu_requested=first.gpu_requested or second.gpu_requested,
    )


def _fusable_pair(plan: Plan) -> tuple[Stage, Stage] | None:
    for consumer in plan.stages:
        if len(consumer.inputs) != 1 or consumer.inputs[0] == SOURCE_ID:
            continue
        producer = plan.stage_of(consumer.inputs[0])
        if plan.consumers(producer.output) == [consumer] and compatible(producer, consumer):
            return producer, consumer
    return None


def fuse(plan: Plan) -> Plan:
    while pair := _fusable_pair(plan):
        producer, consumer = pair
        merged = merge(producer, consumer)
        stages = tuple(merged if s is producer else s for s in plan.stages if s is not consumer)
        plan = dataclasses.replace(plan, stages=stages)
    return plan
