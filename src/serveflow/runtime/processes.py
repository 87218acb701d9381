"""`ProcessEngine`: workers as local processes, messages as Unix datagrams.

Everything lives in one private run directory (mode 0700) under /dev/shm: the
sockets, the shared-memory files of large values and the published plans. Other
users can neither connect to the sockets nor read the files; only this user's
processes can send a message, so decoding one (pickle) runs nobody else's code.
A worker reads its configuration from stdin and exits when stdin closes: the driver
dying, even by SIGKILL, ends every worker within moments. A new engine removes the
directories of engines whose process is gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from typing import Any

import cloudpickle

from serveflow.optimizer.plan import Plan
from serveflow.runtime import codec, procfs, rundir
from serveflow.runtime import messages as m
from serveflow.runtime.engine import Events, ThreadTimes
from serveflow.runtime.transport import Endpoint, PeerGone
from serveflow.runtime.worker import DRIVER, socket_path

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
# Lowered first (`LocalRuntime`'s worker_niceness): the interpreter's start and imports take
# ~0.5 s of CPU, and a pool growing in a surge starts several at once next to the driver
WORKER_MAIN = "import os; os.nice({niceness}); from serveflow.runtime.worker import main; main()"
FROM_WORKERS = (m.Hello, m.Result, m.Done, m.Located, m.Beat, m.Stats)
_PING = b""  # the engine to its own receiver (no message encodes to nothing)
# The thread-count variables of the native math libraries user code loads (OpenMP,
# OpenBLAS, MKL, BLIS, Apple Accelerate, numexpr; torch follows OMP_NUM_THREADS). They
# are read when a library loads, so they are set in a worker's environment at spawn.
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


def worker_environment(threads: int, device: int | None, hide_gpus: bool) -> dict[str, str]:
    """A worker's environment: ours, with `threads` for every math library whose
    variable the user did not set, and the CUDA device it may see."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    for name in THREAD_VARIABLES:
        env.setdefault(name, str(threads))
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(device)
    elif hide_gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


class ProcessEngine:
    def __init__(
        self,
        kvs_address: str,
        options: dict[str, Any],
        gpus_declared: bool,
        worker_threads: int = 1,
    ) -> None:
        rundir.remove_stale(SHM_DIR, "run")
        self._dir = rundir.RunDir(SHM_DIR, "run")
        self._kvs_address = kvs_address
        self._options = options
        self._hide_gpus = gpus_declared  # CPU workers then see no device
        self._worker_threads = worker_threads
        self._shm = codec.SharedMemory(self._dir.path)
        self._endpoint = Endpoint(socket_path(self._dir.path, DRIVER))
        self._processes: dict[int, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._receiver: threading.Thread | None = None
        self._closing = False
        self._failed: dict[int, str] = {}  # workers that could not start
        self._caught_up_at = time.monotonic()  # see caught_up_at
        self._ping_sent: float | None = None  # a ping on its way to the receiver since
        self._spawns: queue.SimpleQueue[tuple[int, int | None] | None] = queue.SimpleQueue()
        self._spawn_thread = threading.Thread(
            target=self._spawner, name="serveflow:spawner", daemon=True
        )
        self._spawn_thread.start()

    def start(self, events: Events) -> None:
        self._receiver = threading.Thread(
            target=self._receive, args=(events,), name="serveflow:receiver", daemon=True
        )
        self._receiver.start()

    def start_worker(self, index: int, device: int | None) -> None:
        """Start worker `index` (from the engine's spawner thread: a worker is
        killed when the thread that started it ends, see `worker.die_with_parent`)."""
        self._spawns.put((index, device))

    def _spawner(self) -> None:
        while (job := self._spawns.get()) is not None:
            index, device = job
            try:
                process = self._popen(index, device)
            except Exception as error:  # reported as a worker that exited
                log.exception("cannot start worker %d", index)
                with self._lock:
                    self._failed[index] = f"could not start: {error}"
                continue
            with self._lock:
                self._processes[index] = process

    def _popen(self, index: int, device: int | None) -> subprocess.Popen:
        """A fresh interpreter (never a re-import of the user's main module, unlike
        multiprocessing) that finds the user's modules on our sys.path."""
        env = worker_environment(self._worker_threads, device, self._hide_gpus)
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER_MAIN.format(niceness=int(self._options.get("niceness", 0))),
            ],
            stdin=subprocess.PIPE,
            env=env,
        )
        config = {
            "index": index,
            "dir": self._dir.path,
            "kvs": self._kvs_address,
            "options": self._options,
            "parent": os.getpid(),
        }
        assert process.stdin is not None
        process.stdin.write(json.dumps(config).encode() + b"\n")
        process.stdin.flush()  # stdin stays open: its end of file tells the worker we died
        return process

    def send(self, worker: int, message: Any, rid: int = 0) -> None:
        try:
            data = codec.encode(message, self._shm, rid)
            self._endpoint.send(socket_path(self._dir.path, worker, message), data)
        except PeerGone:  # `exited` reports the death; its requests are re-run
            log.debug("worker %d is gone", worker)

    def publish(self, app: int, plan: Plan) -> m.Deploy:
        path = self._dir.join(f"plan-{app}")
        with open(path, "wb") as file:
            cloudpickle.dump(plan, file)
        return m.Deploy(app, path)

    def unpublish(self, app: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._dir.join(f"plan-{app}"))

    def kill(self, index: int) -> None:
        with self._lock:
            process = self._processes.get(index)
        if process is not None:
            process.kill()

    def exited(self) -> dict[int, str]:
        with self._lock:
            gone, self._failed = self._failed, {}
            for index, process in list(self._processes.items()):
                if process.poll() is not None:
                    del self._processes[index]
                    self._close_stdin(process)
                    gone[index] = f"exit code {process.returncode}"
        return gone

    def worker_pids(self) -> list[int]:
        with self._lock:
            return [p.pid for p in self._processes.values() if p.poll() is None]

    def suspended(self, index: int) -> bool:
        with self._lock:
            process = self._processes.get(index)
        return process is not None and procfs.stopped(process.pid)

    def threads(self, index: int) -> dict[int, ThreadTimes] | None:
        with self._lock:
            process = self._processes.get(index)
        return None if process is None else procfs.threads(process.pid)

    def caught_up_at(self) -> float:
        """When the last ping the engine sent itself was sent, once the receiver got
        it: datagrams queue in order, so every message sent before it was handled.
        Sends the next ping if none is on its way (called each monitor round)."""
        if self._ping_sent is None:
            self._ping_sent = time.monotonic()
            try:
                self._endpoint.send(self._endpoint.path, _PING)
            except OSError:  # closing
                self._ping_sent = None
        return self._caught_up_at

    def sweep(self, keep: set[int]) -> None:
        codec.sweep(self._dir.path, keep)
        self._shm.forget_older_than(codec.FORWARD_WINDOW_S)

    def stop(self) -> None:
        with self._lock:
            processes = list(self._processes.items())
        for index, _ in processes:
            self.send(index, m.Exit())
        for _, process in processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            self._close_stdin(process)
        # last: the workers die with the thread that started them (any started since)
        self._spawns.put(None)
        self._spawn_thread.join()
        with self._lock:
            for process in self._processes.values():
                process.wait()
        if self._receiver is not None:
            self._closing = True
            self.send(DRIVER, m.Exit())  # wakes the receiver thread
            self._receiver.join()
        self._endpoint.close()
        self._dir.remove()

    @staticmethod
    def _close_stdin(process: subprocess.Popen) -> None:
        with contextlib.suppress(OSError):
            if process.stdin is not None:
                process.stdin.close()

    def _receive(self, events: Events) -> None:
        while True:
            try:
                data = self._endpoint.recv(None)
            except OSError:
                return  # closed by stop()
            if data is None:
                continue
            if data == _PING:
                self._caught_up_at = self._ping_sent or self._caught_up_at
                self._ping_sent = None
                continue
            try:
                message = codec.decode(data, self._shm)
            except Exception:  # a request already swept; nothing waits for it
                log.debug("undecodable message", exc_info=True)
                continue
            if isinstance(message, m.Exit) and self._closing:
                return
            if not isinstance(message, FROM_WORKERS):
                log.warning("dropping a %s message: not from a worker", type(message).__name__)
                continue
            try:
                events.on_message(message)
            except Exception:  # never let one bad message stop every request
                log.exception("failed to handle %s from a worker", type(message).__name__)
