"""What Linux's /proc tells of a process: whether it is stopped, what its threads
used and waited for (to tell a wedged worker from a starved one), and where it lives.

`host()` names this kernel boot and PID namespace together: a process that reports the
same `host()` has a pid that means the same process here, so another engine's worker
on this machine (a Ray actor) can be watched like a child process.
"""

from __future__ import annotations

import contextlib
import functools
import os

from serveflow.runtime.engine import ThreadTimes

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # the unit of CPU times in /proc


@functools.cache
def host() -> str:
    """This kernel boot and PID namespace ("" where /proc does not say)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{f.read().strip()}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def stopped(pid: int) -> bool:
    """Whether process `pid` is stopped (SIGSTOP, or a tracer); False if unknown."""
    try:  # the state field follows the parenthesised command name
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def threads(pid: int) -> dict[int, ThreadTimes] | None:
    """Process `pid`'s threads (id -> what each used so far); None if unknown (not
    Linux, or the process is gone)."""
    task = f"/proc/{pid}/task"
    try:
        tids = os.listdir(task)
    except OSError:
        return None
    found = {}
    for tid in tids:
        with contextlib.suppress(OSError, IndexError, ValueError):  # a thread gone
            found[int(tid)] = _thread(f"{task}/{tid}")
    return found or None


def _thread(path: str) -> ThreadTimes:
    """Linux, one thread (/proc/PID/task/TID): its state and CPU time (`stat`: the
    state follows the parenthesised command name, utime and stime are the 12th and
    13th fields after it), its voluntary context switches (`status`) and its time
    waiting for a core (`schedstat`'s second field, where the kernel keeps it: it
    writes "0 0 0" where it does not)."""
    with open(f"{path}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    with open(f"{path}/status") as f:
        sleeps = int(f.read().partition("\nvoluntary_ctxt_switches:")[2].split()[0])
    waited = None
    with contextlib.suppress(OSError, ValueError):
        with open(f"{path}/schedstat") as f:
            ran_ns, waited_ns, _ = (int(x) for x in f.read().split())
        waited = waited_ns / 1e9 if ran_ns else None
    return ThreadTimes(
        cpu_s=(int(fields[11]) + int(fields[12])) / _CLOCK_TICKS,
        waited_s=waited,
        sleeps=sleeps,
        asleep=fields[0] in ("S", "D"),
    )
