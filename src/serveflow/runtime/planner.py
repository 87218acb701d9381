"""Batching plans searched, and arrivals fitted, in a process of their own.

A plan search is CPU-bound Python for up to a second, a fit of the arrival process
for 5-30 ms. In the driver they would hold the GIL that routing and result delivery
need: every request in flight would stall for their length, a tail-latency spike
every couple of seconds (a fit of 22 ms at 3,300 requests/s, SLO 6 ms: 57 requests
late or refused within 50 ms, a third of that run's misses). The planner process
runs them instead, below the workers' CPU priority from its first instruction, on one
BLAS thread; the driver's planner thread waits on a pipe, without the GIL.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import subprocess
import sys
import threading
from typing import Any

from serveflow.batching.arrivals import MAP, ArrivalLog
from serveflow.batching.controller import Decision, SearchSpace, fit_arrivals, search_here
from serveflow.batching.profile import ServiceProfile

log = logging.getLogger(__name__)

# Below the workers (10): a search takes 0.2-0.3 s of CPU every couple of seconds, and
# at the workers' priority it took half a core from a worker that kept one busy (MiniLM
# on 2 cores: spells of calls 2-2.7x slower, which admission's overhead quantile took
# in). At 19 a search waits for what the workers leave; planning a saturated stage is
# slower, serving it is not.
NICENESS = 19
# Where the process may leave it again, a job runs first at SCHED_IDLE, on the CPU no
# one else wants: at nice 19 a job still took 1/8 of the core it shared with a busy
# worker, and a search comes when the arrivals shift, in the bursts that keep both
# workers busy (MiniLM on 2 workers, SLO 186 ms, MMPP at 450/s: a search ran 1 s of
# the burst's seconds; greedy calls of 38 with a nice-19 busy loop beside them, 0.95
# of the requests within the SLO, with a SCHED_IDLE one 1.00, as with none). But a
# saturated stage leaves it no CPU at all (3x overload: the first plan came after 6.6
# s, against 1.3 s at nice 19), so a job still running after BOOST_AFTER_S goes on at
# nice 19 (`PlannerProcess._call`).
BOOST_AFTER_S = 0.5
_SCHEDULING = hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE")  # Linux
# niced before its imports: they take 0.7-1 s of CPU, which at the driver's priority
# went before the workers' when the first plan of a busy stage started it
PLANNER_MAIN = (
    f"import os; os.nice({NICENESS}); from serveflow.runtime.planner import serve; serve()"
)


def _can_leave_idle() -> bool:
    """Whether this process may take its threads out of SCHED_IDLE again (with
    CAP_SYS_NICE, which a container's root often lacks, or an RLIMIT_NICE that allows
    their nice value): tried on a thread of its own, as the policy is a thread's."""
    if not _SCHEDULING:
        return False
    outcome = []

    def trial() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            outcome.append(True)
        except OSError:
            outcome.append(False)

    thread = threading.Thread(target=trial)
    thread.start()
    thread.join()
    return outcome[0]


def _set_policy(pid: int, policy: int) -> None:
    try:
        os.sched_setscheduler(pid, policy, os.sched_param(0))
    except OSError as error:  # not ours to change: the job runs as it is
        log.debug("planner: scheduling policy %d not set (%r)", policy, error)


WORK = {"search": search_here, "fit": fit_arrivals}  # what the process runs, by name


class PlannerProcess:
    """`search(space, arrivals, service)` and `fit(window, now, shifted)` in a planner
    process, started by `start` or on first use (and again if it died: that call then
    runs here)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None

    def search(self, space: SearchSpace, arrivals: MAP, service: ServiceProfile) -> Decision:
        return self._call("search", space, arrivals, service)

    def fit(self, window: ArrivalLog, now: float, shifted: bool) -> MAP | None:
        return self._call("fit", window, now, shifted)

    def _call(self, name: str, *args: Any) -> Any:
        with self._lock:
            try:
                process = self._started()
                pickle.dump((name, args), process.stdin)
                process.stdin.flush()
                # a job still running after BOOST_AFTER_S goes on at nice 19
                if _SCHEDULING and not select.select([process.stdout], [], [], BOOST_AFTER_S)[0]:
                    _set_policy(process.pid, os.SCHED_OTHER)
                ok, value = pickle.load(process.stdout)
            except (OSError, EOFError, pickle.UnpicklingError) as error:
                log.warning("planner process failed (%r): running %s in the driver", error, name)
                self._kill()
                return WORK[name](*args)
        if not ok:
            raise value
        return value

    def start(self) -> None:
        """Start the process now (its imports take a second of CPU: better while a
        deployment loads its stages than under its first requests)."""
        with self._lock:
            self._started()

    def _started(self) -> subprocess.Popen:
        if self._process is None or self._process.poll() is not None:
            self._process = subprocess.Popen(
                [sys.executable, "-c", PLANNER_MAIN],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
            )
        return self._process

    def _kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def close(self) -> None:
        """Stop the planner process (it exits when its input closes)."""
        with self._lock:
            if self._process is None:
                return
            self._process.stdin.close()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._kill()
            self._process = None


def serve() -> None:
    """The planner process: answer (name, args) with (True, WORK[name](*args)) or
    (False, the exception) until its input closes (its input is the driver's pipe)."""
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the replies
    idle = _can_leave_idle()  # at nice 19 already
    while True:
        if idle:  # each job starts on idle CPU (the driver boosts a late one)
            _set_policy(0, os.SCHED_IDLE)
        try:
            name, args = pickle.load(requests)
        except EOFError:
            return
        try:
            reply = (True, WORK[name](*args))
        except Exception as error:
            reply = (False, error)
        pickle.dump(reply, replies)
        replies.flush()
