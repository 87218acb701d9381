"""What Linux's /proc tells of a process: whether it is stopped, and where it lives.

`host()` names this kernel boot and PID namespace together: a process that reports the
same `host()` has a pid that means the same process here, so another engine's worker
on this machine (a Ray actor) can be watched like a child process.
"""

from __future__ import annotations

import functools
import os


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
