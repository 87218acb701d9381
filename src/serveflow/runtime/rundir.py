"""Private run directories: a runtime's sockets, shared-memory files and temporary
store live in directories only its user can enter (mode 0700), each holding a lock
that the creating process keeps while it lives.

A process that dies without cleaning up (SIGKILL, a crash) leaves its directories
behind with their lock released; the next runtime to start removes them
(`remove_stale`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import stat
import tempfile
import time

log = logging.getLogger(__name__)

LOCK = ".owner"
PREFIX = "serveflow-"
YOUNG_S = 30.0  # a directory without its lock file yet may be one being created


class RunDir:
    """A fresh directory `<parent>/serveflow-<kind>-<random>` (mode 0700) locked by
    this process until `remove()`."""

    def __init__(self, parent: str, kind: str) -> None:
        self.path = tempfile.mkdtemp(prefix=f"{PREFIX}{kind}-", dir=parent)
        # locked before it takes its name: `remove_stale` never sees it unlocked
        creating = os.path.join(self.path, LOCK + ".new")
        self._lock = os.open(creating, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(creating, os.path.join(self.path, LOCK))

    def join(self, name: str) -> str:
        return os.path.join(self.path, name)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.close(self._lock)


def remove_stale(parent: str, kind: str) -> int:
    """Remove this user's `serveflow-<kind>-*` directories under `parent` whose owner
    process is gone (their lock is free). Returns how many were removed."""
    removed = 0
    try:
        names = os.listdir(parent)
    except OSError:
        return 0
    for name in names:
        if not name.startswith(f"{PREFIX}{kind}-"):
            continue
        path = os.path.join(parent, name)
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if info.st_uid != os.getuid() or not stat.S_ISDIR(info.st_mode):
            continue
        try:
            fd = os.open(os.path.join(path, LOCK), os.O_RDWR)
        except FileNotFoundError:
            if time.time() - info.st_mtime > YOUNG_S:
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its owner lives
        finally:
            os.close(fd)
        log.info("removing %s, left by a runtime that is gone", path)
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    return removed
