"""The physical plan: stages (fused operator sub-DAGs) and their resource needs."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from serveflow.logical.flow import SOURCE_ID, Flow
from serveflow.logical.operators import AnyOf, Batching, Map, Op
from serveflow.optimizer.rules import Rules


@dataclass(frozen=True)
class Stage:
    """Operators that run together in one worker, with no serialization between them.

    `ops` is in topological order and the last op is the stage's output. Only that
    output is read by other stages; `inputs` are the op ids the stage reads from
    outside (0 is the request table).
    """

    id: int
    ops: tuple[Op, ...]
    replicas: int = 1
    batching: Batching | None = None
    placement: str = "cpu"
    gpu_requested: bool = False
    locality_key: str | None = None

    @functools.cached_property  # read per request (an overload's error names it)
    def name(self) -> str:
        return "+".join(op.name for op in self.ops)

    @property
    def output(self) -> int:
        return self.ops[-1].id

    @property
    def inputs(self) -> tuple[int, ...]:
        inside = {op.id for op in self.ops}
        seen = [i for op in self.ops for i in op.inputs if i not in inside]
        return tuple(dict.fromkeys(seen))

    @property
    def high_variance(self) -> bool:
        return any(isinstance(op, Map) and op.high_variance for op in self.ops)


@dataclass(frozen=True)
class Plan:
    """What a runtime executes: stages in topological order and the flow's output op."""

    flow_name: str
    stages: tuple[Stage, ...]
    output: int
    rules: Rules
    schema: Mapping[str, Any] | None = None
    slo_ms: float | None = None  # a flow-level budget, shared by `slo_stages`
    slo_stages: tuple[int, ...] = ()

    def stage_of(self, op_id: int) -> Stage:
        """The stage whose output is `op_id`."""
        return self.stages[self._index_of_output[op_id]]

    def index_of(self, op_id: int) -> int:
        """The index of the stage whose output is `op_id`."""
        return self._index_of_output[op_id]

    def feeds_from_request(self, index: int) -> bool:
        """Whether stage `index` reads the request table alone."""
        return self.stages[index].inputs == (SOURCE_ID,)

    def located(self, index: int) -> bool:
        """Whether stage `index`'s worker is known only once its lookup key is: a
        locality stage reading more than the request table (see `Located`)."""
        return bool(self.stages[index].locality_key) and not self.feeds_from_request(index)

    def consumers(self, op_id: int) -> list[Stage]:
        return [s for s in self.stages if op_id in s.inputs]

    def consumer_indices(self, index: int) -> tuple[int, ...]:
        """Indices of the stages reading stage `index`'s output."""
        return self._consumer_indices[index]

    @functools.cached_property
    def _index_of_output(self) -> dict[int, int]:
        return {stage.output: i for i, stage in enumerate(self.stages)}

    @functools.cached_property
    def _consumer_indices(self) -> list[tuple[int, ...]]:
        return [
            tuple(i for i, s in enumerate(self.stages) if stage.output in s.inputs)
            for stage in self.stages
        ]

    @functools.cached_property
    def anyof_races(self) -> tuple[tuple[int, tuple[tuple[int, ...], ...]], ...]:
        """For each anyof whose inputs come from other stages: (the index of its
        stage, its branches). A branch is the stages only it uses, in order, the one
        feeding the anyof last. Branches run concurrently, on distinct workers, and the
        anyof's stage on none of theirs."""
        races = []
        for index, stage in enumerate(self.stages):
            for op in stage.ops:
                if isinstance(op, AnyOf):
                    outputs = self._index_of_output
                    heads = dict.fromkeys(outputs[i] for i in op.inputs if i in outputs)
                    if len(heads) > 1:
                        races.append((index, tuple(self._branch(head) for head in heads)))
        return tuple(races)

    def _branch(self, head: int) -> tuple[int, ...]:
        """Stage `head` and the stages upstream of it that feed nothing else."""
        chain, frontier = {head}, [head]
        while frontier:
            for op in self.stages[frontier.pop()].inputs:
                if op != SOURCE_ID:
                    producer = self._index_of_output[op]
                    if producer not in chain and all(
                        c in chain for c in self._consumer_indices[producer]
                    ):
                        chain.add(producer)
                        frontier.append(producer)
        return tuple(sorted(chain))

    def lost_with(self, refused: Iterable[int]) -> frozenset[int]:
        """The stages a request no longer runs once stages `refused` turned it away
        (shedding at an SLO): those downstream of one, except an anyof that another
        input can still answer, and every stage of an anyof branch so lost. The
        request fails if the output's stage is among them."""
        lost = set(refused)
        for index, stage in enumerate(self.stages):  # in topological order
            first = stage.ops[0]
            if isinstance(first, AnyOf):
                gone = all(self._index_of_output.get(i) in lost for i in first.inputs)
            else:
                gone = any(self._index_of_output.get(i) in lost for i in stage.inputs)
            if gone:
                lost.add(index)
        for _, branches in self.anyof_races:  # a lost branch's stages feed only it
            for branch in branches:
                if branch[-1] in lost:
                    lost.update(branch)
        return frozenset(lost)

    @property
    def anyof_groups(self) -> tuple[tuple[int, ...], ...]:
        """For each anyof race, the stages feeding the anyof (the branches' heads)."""
        return tuple(tuple(b[-1] for b in branches) for _, branches in self.anyof_races)

    @functools.cached_property
    def _racing(self) -> frozenset[int]:
        return frozenset(i for _, branches in self.anyof_races for b in branches for i in b)

    def competing(self, index: int) -> bool:
        """Whether runs of stage `index` race others for one result (competing
        replicas, anyof branches): losers are cancelled or their results dropped."""
        return self.stages[index].replicas > 1 or index in self._racing

    @property
    def output_stage(self) -> Stage:
        return self.stage_of(self.output)

    def explain(self) -> str:
        """The physical plan in words: stages, fused operators, replicas, batching,
        placement and locality."""
        number = {stage.output: i for i, stage in enumerate(self.stages, 1)}
        number[SOURCE_ID] = 0
        lines = [
            f"plan for flow {self.flow_name!r}: {len(self.stages)} stage(s), "
            f"output from stage {number[self.output]}",
            f"rules: {self.rules.describe()}",
        ]
        if self.rules.whole and len(self.stages) > 1:
            lines.append("whole-flow fusion keeps anyof branches in stages of their own")
        if self.slo_ms:
            lines.append(f"flow SLO: {self.slo_ms:g} ms, split across the batching stages")
        for i, stage in enumerate(self.stages, 1):
            sources = ", ".join(
                "request" if n == SOURCE_ID else f"stage {number[n]}" for n in stage.inputs
            )
            lines.append(f"stage {i} {stage.name!r} <- {sources}")
            chain = " -> ".join(op.describe() for op in stage.ops)
            if len(stage.ops) > 1:
                lines.append(f"    fused {len(stage.ops)} operators: {chain}")
            else:
                lines.append(f"    operator: {chain}")
            if stage.batching:
                lines.append(f"    batched across requests: {stage.batching.describe()}")
            if i - 1 in self._racing:
                lines.append("    anyof branch: runs concurrently with the others, own worker")
            if stage.replicas > 1:
                lines.append(
                    f"    replicated: {stage.replicas} competing replicas, first result wins"
                )
            if stage.gpu_requested and stage.placement != "gpu":
                lines.append("    placed on cpu (gpu=True requested; no GPU available)")
            else:
                lines.append(f"    placed on {stage.placement}")
            if stage.locality_key:
                key = stage.locality_key
                lines.append(f"    locality: starts at a dynamic lookup; routed by column {key!r}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.explain()


def logical_plan(flow: Flow, rules: Rules) -> Plan:
    """One stage per operator: the unoptimized plan every rule starts from."""
    output = flow.output_op()
    stages = tuple(Stage(id=op.id, ops=(op,)) for op in flow.ops.values() if op.id != SOURCE_ID)
    return Plan(flow.name, stages, output, rules, flow.schema)
