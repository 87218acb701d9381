"""The engine interface: the mechanics under the control plane.

An engine starts and stops workers with their resources, carries the messages of
`messages.py` to them (load a stage, a stage run's input, a batching policy, a
cancellation), and reports what its workers say and which of them exited. It decides
nothing: every policy (routing, retries, admission, scaling, batching) is in
`control.ControlPlane`. `processes.ProcessEngine` runs workers as local processes;
a Ray engine runs them as actors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from serveflow.optimizer.plan import Plan
from serveflow.runtime import messages as m


@dataclass(frozen=True)
class ThreadTimes:
    """One thread of a worker's process as the engine saw it (`Engine.threads`);
    the counts are since the thread started."""

    cpu_s: float  # CPU time used
    waited_s: float | None  # time runnable but waiting for a core (None: not known)
    sleeps: int  # times it went to sleep (voluntary context switches)
    asleep: bool  # asleep now: neither running nor waiting for a core


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

    def threads(self, index: int) -> dict[int, ThreadTimes] | None:
        """The worker's threads (thread id -> what they used so far), or None if
        unknown: from two of these the control plane tells a silent worker wedged
        (native code holding the GIL) from one starved of CPU (`silence.wedged`)."""
        ...

    def caught_up_at(self) -> float:
        """When (time.monotonic()) the engine last had no message from its workers
        waiting to be handled: a heartbeat not seen since was not sent."""
        ...

    def sweep(self, keep: set[int]) -> None:
        """Free the data of requests not in `keep`."""

    def stop(self) -> None:
        """Ask every worker to exit, end those that do not, release everything."""
