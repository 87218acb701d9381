"""Why a worker that misses heartbeats is silent: wedged or starved.

A worker's heartbeat thread needs two things to run: a core and the GIL. A *wedged*
worker keeps it out with the GIL: native code holds it, computing (a C loop, a
regex, a ctypes call) or blocked (a native call that waits without releasing it). A
*starved* one keeps it out with the cores: on an oversubscribed machine its threads
wait in the run queue. Only the first is killed at the heartbeat timeout; the second
gets `control.WEDGED_FACTOR` times as long (killing it would only add a worker start
to a machine already short of CPU).

`wedged` decides from what the engine saw of the worker's threads at the start and
at the end of a window (`engine.ThreadTimes`). A pure function: no I/O.
"""

from __future__ import annotations

from serveflow.runtime.engine import ThreadTimes

# A thread that woke at least this often (per second of the window) asks for the GIL
# in vain: a thread waiting for the GIL wakes every switch interval (5 ms, 200 times a
# second on an idle core) to ask for it, where a Python thread holding it hands it over
# within one and then sleeps until it gets it back. A tenth of 200, for a busy machine.
GIL_WAITS_PER_S = 20
# ...while a thread used at least this share of a core without sleeping once: native
# code holding the GIL, computing. Holds however busy the machine is.
WEDGED_CPU_SHARE = 0.1
# A thread that waited for a core at least this share of the window is starved.
STARVED_WAIT_SHARE = 0.5
# Where no thread asks for the GIL, or the engine cannot count wake-ups: the process
# used at least WEDGED_CPU_SHARE of a core, or at most this share with every thread
# asleep (a call blocked holding the GIL), and no thread was starved.
BLOCKED_CPU_SHARE = 0.02


def wedged(
    before: dict[int, ThreadTimes], after: dict[int, ThreadTimes], seconds: float
) -> str | None:
    """Why a worker silent throughout a window of `seconds` is wedged, from its threads
    (id -> times) at the window's start and end; None if it is not (or may be starved).

    If a thread kept asking for the GIL, whoever holds it is wedged when it is a thread
    that computed without sleeping, or when every other thread is asleep without
    having waited for a core (a blocked holder). Otherwise, unless a thread waited
    for a core for STARVED_WAIT_SHARE of the window, the process used at least
    WEDGED_CPU_SHARE of a core, or next to none with every thread asleep."""
    threads = before.keys() & after.keys()
    cpu = {t: after[t].cpu_s - before[t].cpu_s for t in threads}
    sleeps = {t: after[t].sleeps - before[t].sleeps for t in threads}
    starved = {t for t in threads if _waited(before[t], after[t]) >= STARVED_WAIT_SHARE * seconds}
    waiters = {t for t in threads if sleeps[t] >= GIL_WAITS_PER_S * seconds}
    if waiters:
        waiter = max(waiters, key=sleeps.__getitem__)
        asking = f"thread {waiter} woke {sleeps[waiter]} times in {seconds:.2f} s"
        computing = [t for t in threads if sleeps[t] == 0 and cpu[t] >= WEDGED_CPU_SHARE * seconds]
        if computing:
            holder = max(computing, key=cpu.__getitem__)
            return (
                f"the GIL held: {asking} while thread {holder} used {cpu[holder]:.2f} s"
                " of CPU without sleeping"
            )
        if all(after[t].asleep and t not in starved for t in threads - waiters):
            return f"the GIL held by a blocked call: {asking} while no other thread ran"
    if starved:
        return None  # waiting for a core
    used = sum(cpu.values())
    if used >= WEDGED_CPU_SHARE * seconds:
        return f"{used:.2f} s of CPU in {seconds:.2f} s"
    if used <= BLOCKED_CPU_SHARE * seconds and all(times.asleep for times in after.values()):
        return f"blocked: {used:.2f} s of CPU in {seconds:.2f} s and no thread runnable"
    return None


def _waited(before: ThreadTimes, after: ThreadTimes) -> float:
    """How long a thread waited for a core between two looks (0 if not known)."""
    if before.waited_s is None or after.waited_s is None:
        return 0.0
    return after.waited_s - before.waited_s
