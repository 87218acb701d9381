"""`BatchRule`: when a worker runs a stage's queued requests, and how many per call.

Every engine's workers use it (local processes, Ray actors): it is policy, so it has
no I/O and is tested alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from serveflow.optimizer.plan import Stage

BACKLOG_MERGE = 2  # planned batches a worker may run as one call when they queue up
# A batch still filling runs before a ready one due later when the two calls, one after
# the other, would end past its due less this share of its SLO (`Worker.run_ready`;
# admission mirrors it): its answer has the driver's way still to go, and calls run
# past their average
FILLING_MARGIN = 0.1


@dataclass
class BatchRule:
    """Per (app, stage): the batch size and timeout, from the stage's policy or a
    batching controller's latest choice (`set_policy`)."""

    planned: dict[tuple[int, int], tuple[int, float]] = field(default_factory=dict)

    def set_policy(self, key: tuple[int, int], size: int, timeout_s: float) -> None:
        self.planned[key] = (size, timeout_s)

    def forget(self, app: int) -> None:
        for key in [k for k in self.planned if k[0] == app]:
            del self.planned[key]

    def limits(self, key: tuple[int, int], stage: Stage) -> tuple[int, float]:
        """(most requests per call, longest wait for a batch to fill)."""
        if key in self.planned:
            return self.planned[key]
        policy = stage.batching
        return (policy.size, (policy.timeout_ms or 0) / 1e3) if policy else (1, 0.0)

    def due(
        self,
        key: tuple[int, int],
        stage: Stage,
        queued: int,
        oldest_sent: float,
        now: float,
        rows: Callable[[], int] | None = None,
    ) -> tuple[int, float]:
        """(requests to run now, 0 for none; seconds until a partial batch is due).
        `rows`: the queued requests' rows, asked while fewer requests than a batch wait.

        A batch runs when full (of requests; of a controller-planned stage, of their
        rows too: it plans sizes in rows), or once its oldest request has waited the
        timeout since it was sent (as in the model: also while it sat unread behind a running
        batch). A controller-planned stage with more than a batch queued (a step in
        load, a slow spell) takes up to `BACKLOG_MERGE` batches in one call, which
        drains the backlog faster: one call's fixed cost for several batches."""
        limit, timeout_s = self.limits(key, stage)
        if (
            timeout_s
            and queued < limit
            and not (key in self.planned and rows is not None and rows() >= limit)
        ):
            remaining = oldest_sent + timeout_s - now
            if remaining > 0:
                return 0, remaining
        if key in self.planned and queued > limit:
            most = BACKLOG_MERGE * limit
            if stage.batching is not None and stage.batching.max_size:
                most = min(most, stage.batching.max_size)
            return min(queued, most), 0.0
        return min(limit, queued), 0.0
