"""`Request`: the driver's record of one request in flight."""

from __future__ import annotations

import itertools
import time
from concurrent.futures import Future, InvalidStateError
from typing import Any

from serveflow.logical.table import Table

_ids = itertools.count(1)


class Request:
    """One request: its input, its future, and where it is being run.

    `route` (which workers run which stage) and `attempt` change when a worker dies
    and the request is run again."""

    def __init__(self, table: Table, timeout: float | None = None) -> None:
        self.id = next(_ids)
        self.table = table
        self.future: Future[Table] = Future()
        self.submitted = time.monotonic()
        self.deadline = None if timeout is None else self.submitted + timeout
        self.route: tuple[tuple[int, ...], ...] = ()
        self.charges: list[tuple[int, int]] = []  # (stage, worker) runs counted as load
        # (stage, worker) -> expected seconds of that run, counted until it is done
        self.work: dict[tuple[int, int], float] = {}
        self.attempt = 0

    def settle(self, result: Any) -> bool:
        """Resolve the future with a Table or an exception; False if already done."""
        try:
            if isinstance(result, Table):
                self.future.set_result(result)
            else:
                self.future.set_exception(result)
        except InvalidStateError:  # failed already (deadline, shutdown) or cancelled
            return False
        return True

    def workers(self) -> set[int]:
        return {w for chosen in self.route for w in chosen}
