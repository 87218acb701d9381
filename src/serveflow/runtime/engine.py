"""The engine interface: the mechanics under the control plane.

An engine starts and stops workers with their resources, carries the messages of
`messages.py` to them (load a stage, a stage run's input, a batching policy, a
cancellation), and reports what its workers say and which of them exited. It decides
nothing: every policy (routing, retries, admission, scaling, batching) is in
`control.ControlPlane`. `processes.ProcessEngine` runs workers as local processes;
a Ray engine runs them as actors.
"""

from __future__ import annotations

from typing import Any, Protocol

from serveflow.optimizer.plan import Plan
from serveflow.runtime import messages as m


class Events(Protocol):
    """What an engine reports to the control plane (from any thread)."""

    def on_message(self, message: Any) -> None:
        """A worker's `Hello`, `Result`, `Done`, `Located`, `Beat` or `Stats`."""


class Engine(Protocol):
    def start(self, events: Events) -> None:
        """Begin reporting to `events`."""

    def start_worker(self, index: int, device: int | None) -> None:
        """Start worker `index` (it says `Hello` when ready); `device`: the GPU it owns."""

    def send(self, worker: int, message: Any, rid: int = 0) -> None:
        """Deliver `message` to a worker without blocking; `rid` names the request
        whose data it carries (freed by `sweep` once the request is over). A worker
        that is gone drops it (`exited` will report the worker)."""

    def publish(self, app: int, plan: Plan) -> m.Deploy:
        """Make `plan` readable by every worker, now and later: the `Deploy` to send."""

    def unpublish(self, app: int) -> None: ...

    def kill(self, index: int) -> None:
        """End a worker at once (it is stuck, or the runtime gives up on it)."""

    def exited(self) -> dict[int, str]:
        """Workers that ended since the last call, each with why."""

    def worker_pids(self) -> list[int]: ...

    def suspended(self, index: int) -> bool:
        """Whether the worker is known to be stopped (e.g. by SIGSTOP) rather than busy:
        the control plane then kills it as soon as its heartbeats are late. An engine
        that cannot tell answers False (late heartbeats are then given longer)."""
        ...

    def cpu_seconds(self, index: int) -> float | None:
        """CPU time the worker's process has used so far (every thread), or None if
        unknown: a worker silent while it keeps using the CPU is running code that
        keeps its heartbeat thread out (the GIL held in native code), not starved."""
        ...

    def blocked(self, index: int) -> bool:
        """Whether every thread of the worker is asleep now (none running or waiting
        for a core): silent and using no CPU, it is blocked, e.g. in a native call
        that holds the GIL, not starved by a busy machine. An engine that cannot tell
        answers False."""
        ...

    def caught_up_at(self) -> float:
        """When (time.monotonic()) the engine last had no message from its workers
        waiting to be handled: a heartbeat not seen since was not sent."""
        ...

    def sweep(self, keep: set[int]) -> None:
        """Free the data of requests not in `keep`."""

    def stop(self) -> None:
        """Ask every worker to exit, end those that do not, release everything."""
