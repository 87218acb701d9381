"""`Request`: the driver's record of one request in flight."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from serveflow.logical.table import Table

_ids = itertools.count(1)
_SETTLED = threading.Condition()  # what settled futures lock (see `RequestFuture._slim`)


class RequestFuture(Future):
    """A request's future. Cancelling it ends the request (its workers drop it) like
    any other failure."""

    def __init__(self, request: Request) -> None:
        super().__init__()
        # while pending: a request and its future referring to each other would be
        # freed by the cyclic garbage collector only, whose pauses grow with the load
        self._request: Request | None = request
        self._began: float | None = None

    def cancel(self) -> bool:
        request = self._request
        if request is None or not request.claim():
            return self.cancelled()
        cancelled = super().cancel()  # pending until claimed: always True
        request.end(True)
        self._let_go()
        self.set_running_or_notify_cancel()  # else `wait` and `as_completed` never see it
        self._slim()
        return cancelled

    def _let_go(self) -> None:
        """The request ended: keep what is read of it, not the request."""
        request, self._request = self._request, None
        if request is not None:
            self._began = request.began

    def _slim(self) -> None:
        """Settled: nothing waits on this future again, nor is a callback added to it
        (`add_done_callback` calls it at once), so its own condition (a lock, a queue
        and bound methods) and callback list give way to shared ones. A caller keeping
        its futures then keeps 6 objects each for the cyclic garbage collector to walk,
        not 15: its full collections hold the GIL (the driver's admission and routing
        with it), and with 18,000 futures kept at 3,000 requests/s they took 23-53 ms
        every 2 s, each one making every request in flight late at a 30 ms SLO."""
        self._condition = _SETTLED
        self._done_callbacks = ()  # type: ignore[assignment]  # never appended to once settled

    @property
    def began(self) -> float | None:
        """When the request's first stage run began (`time.monotonic`; on Ray, the
        worker's clock), known once the future is done; None if no stage ran. Before
        it, the request was queued: at the driver, in a worker's queue or batch."""
        request = self._request
        return self._began if request is None else request.began


class Request:
    """One request: its input, its future, and where it is being run.

    `route` (which workers run which stage) and `attempt` change when a worker dies
    and the request is run again.

    `on_end(request, failed)` is the owner's book-keeping, run once when the request ends, by
    whoever ends it: the thread settling it (before the future is resolved, so the
    caller it wakes finds the books done) or the caller cancelling its future. It
    replaces done-callbacks, which cost a lock and a call each on the hot path."""

    def __init__(
        self,
        table: Table,
        timeout: float | None = None,
        on_end: Callable[[Request, bool], None] | None = None,
    ) -> None:
        self.id = next(_ids)
        self.table = table
        self.future = RequestFuture(self)
        self.submitted = time.monotonic()
        self.outside = 0.0  # seconds its caller spends on it outside the runtime (`App.run`)
        self.deadline = None if timeout is None else self.submitted + timeout
        self.route: tuple[tuple[int, ...], ...] = ()
        self.charges: list[tuple[int, int]] = []  # (stage, worker) runs counted as load
        # (stage, worker) -> expected seconds of that run, counted until it is done
        self.work: dict[tuple[int, int], float] = {}
        self.attempt = 0
        # stages it no longer runs: an anyof branch that shed it (`shed`, its refusal)
        self.lost: frozenset[int] = frozenset()
        self.shed: Exception | None = None
        # SLO stages whose admission picked a worker (stage -> worker): routed there
        self.placed: dict[int, int] | None = None
        self.began: float | None = None  # when its first stage run began (a worker says)
        self.on_end = on_end
        self.timer: list | None = None  # its deadline's entry (`Deadlines.add`)
        self.held: int | None = None  # the stage it waited for a first timed call of ...
        self.hold_timer: list | None = None  # ... until refused by this entry (`Deadlines`)
        self._unclaimed = [True]  # popped (atomically) by the one that ends the request

    def claim(self) -> bool:
        """Whether the caller is the one to end the request (exactly one is)."""
        try:
            self._unclaimed.pop()
        except IndexError:
            return False
        return True

    @property
    def ended(self) -> bool:
        return not self._unclaimed

    def end(self, failed: bool) -> None:
        if self.on_end is not None:
            self.on_end(self, failed)

    def settle(self, result: Any) -> bool:
        """Resolve the future with a Table or an exception; False if already done."""
        if not self.claim():  # failed already (deadline, shutdown) or cancelled
            return False
        table = isinstance(result, Table)
        try:
            self.end(not table)
        finally:
            self.future._let_go()
            if table:
                self.future.set_result(result)
            else:
                self.future.set_exception(result)
            self.future._slim()
        return True

    def workers(self) -> set[int]:
        return {w for chosen in self.route for w in chosen}
