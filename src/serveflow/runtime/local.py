"""The embedded runtime: the control plane over a pool of worker processes on this
machine (`processes.ProcessEngine`)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Sequence
from numbers import Integral

from serveflow.runtime.control import HEARTBEAT_TIMEOUT_S, ControlPlane, check_pool
from serveflow.runtime.kvs import KVS, open_shared_kvs
from serveflow.runtime.processes import ProcessEngine

WORKER_NICENESS = 10  # see LocalRuntime's worker_niceness


@functools.cache
def detect_gpus() -> tuple[int, ...]:
    """The CUDA devices of this machine, as `nvidia-smi -L` lists them (none without
    the tool: importing torch here would cost seconds at every start)."""
    if shutil.which("nvidia-smi") is None:
        return ()
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ()
    if listed.returncode != 0:
        return ()
    return tuple(i for i, line in enumerate(listed.stdout.splitlines()) if line.startswith("GPU"))


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


class LocalRuntime(ControlPlane):
    """Runs plans on a pool of worker processes on this machine (the default runtime).

    min_workers / max_workers: CPU pool size limits (the pool has at least as many
        workers as the widest stage, within max_workers: competing replicas, an anyof's
        branches plus one).
    gpus: GPU devices, each owned by one worker (CUDA_VISIBLE_DEVICES set to it) that
        runs the `gpu=True` stages: None detects them (nvidia-smi), a count declares
        devices 0..n-1, a list declares those ids (e.g. for tests on a CPU machine).
        Without any, GPU stages run on CPU workers.
    kvs: store behind `lookup` and `app.kvs`: None (an LMDB store in a temporary
        directory, shared by the workers), "lmdb:///path", "redis://host:port/db", or a
        store object.
    max_in_flight: requests an app holds at once; more fail fast with OverloadError.
    worker_queue: stage runs routed to one worker before further requests wait at the
        driver for room (raised to fit batching stages' batches).
    retries: times a request is re-run when a worker dies under it (user functions
        should be idempotent).
    idle_s: a worker idle this long is retired (above min_workers).
    idle_unload_s: a stage unused this long on a worker is unloaded.
    cache_bytes: per-worker cache of looked-up values.
    worker_threads: threads each worker's native math libraries use (BLAS, OpenMP,
        MKL, numexpr; torch follows OMP_NUM_THREADS). A worker is one core's worth,
        as a Ray actor with one CPU is: with the libraries' default (every core per
        process) N workers start N x cores threads, and OpenBLAS's spin after each
        call takes the cores from the other workers. A variable already set in this
        process's environment (OMP_NUM_THREADS, OPENBLAS_NUM_THREADS, ...) is kept.
    target_in_flight: stage runs per worker above which the pool grows.
    stage_timeout_s: a worker running one batch longer than this is killed and its
        requests re-run (None: no limit). Guards against user code that hangs.
    heartbeat_timeout_s: a worker not heard from this long (it beats every 0.5 s) that
        is stopped (SIGSTOP) or still using the CPU (holding the GIL in native code) is
        taken for frozen: it is killed, its requests re-run on other workers and a new
        worker started. One silent without using the CPU (blocked, or starved by an
        overloaded machine) gets 4x as long; while a worker loads a stage (it says so
        first) the allowance is 30 s. None: never; silent workers are only routed
        around.
    worker_niceness: how much lower the workers' CPU priority is than this process's
        (`nice`, 0-19). This process admits, routes and answers every request: when
        the workers fill the cores (a flood), a driver waiting for a core behind them
        delays every answer and every refusal. Measured on 2 cores flooded at 3x with
        `--max-in-flight 32`: workers at the driver's priority gave admitted requests
        a median of 21-26 ms and refusals a p99 of 52-79 ms; at 10, 7-8 ms and 10-11
        ms (admitting 878-978 req/s against 990-1116; the sustainable rate moved
        between runs, and the quiet benchmark after it admitted 0.60 of it at 3x,
        against 0.58 before). Idle cores make it moot.
    """

    def __init__(
        self,
        *,
        min_workers: int = 1,
        max_workers: int | None = None,
        gpus: int | Sequence[int] | None = None,
        kvs: str | KVS | None = None,
        max_in_flight: int = 10_000,
        worker_queue: int = 8,
        retries: int = 2,
        idle_s: float = 10.0,
        idle_unload_s: float = 60.0,
        cache_bytes: int = 256 << 20,
        worker_threads: int = 1,
        target_in_flight: float = 2.0,
        stage_timeout_s: float | None = None,
        heartbeat_timeout_s: float | None = HEARTBEAT_TIMEOUT_S,
        worker_niceness: int = WORKER_NICENESS,
    ) -> None:
        max_workers = max_workers or max(4, 2 * (os.cpu_count() or 1))
        if gpus is None:
            devices = list(detect_gpus())
        elif _is_int(gpus):
            devices = list(range(gpus))
        elif isinstance(gpus, Sequence) and not isinstance(gpus, str | bytes):
            devices = list(gpus)
        else:
            devices = [-1]  # refused below
        if (
            not all(_is_int(d) for d in devices)
            or len(set(devices)) != len(devices)
            or any(d < 0 for d in devices)
            or (_is_int(gpus) and gpus < 0)
        ):
            raise ValueError(
                "gpus: None (detect), a count of devices or a list of distinct "
                f"non-negative device ids, got {gpus!r}"
            )
        devices = [int(d) for d in devices]
        check_pool(min_workers, max_workers)
        if isinstance(worker_threads, bool) or not isinstance(worker_threads, int):
            raise TypeError(f"worker_threads must be an int, got {worker_threads!r}")
        if worker_threads < 1:
            raise ValueError(f"worker_threads must be >= 1, got {worker_threads}")
        if isinstance(worker_niceness, bool) or not isinstance(worker_niceness, int):
            raise TypeError(f"worker_niceness must be an int, got {worker_niceness!r}")
        if not 0 <= worker_niceness <= 19:
            raise ValueError(f"worker_niceness must be within 0-19, got {worker_niceness}")
        store = open_shared_kvs(kvs, "None (LMDB), 'lmdb:///path' or 'redis://host:port/db'")
        options = {
            "cache_bytes": cache_bytes,
            "idle_unload_s": idle_unload_s,
            "niceness": worker_niceness,
        }
        super().__init__(
            ProcessEngine(
                store.address, options, gpus_declared=bool(devices), worker_threads=worker_threads
            ),
            store,
            min_workers=min_workers,
            max_workers=max_workers,
            gpus=devices,
            max_in_flight=max_in_flight,
            worker_queue=worker_queue,
            retries=retries,
            idle_s=idle_s,
            target_in_flight=target_in_flight,
            stage_timeout_s=stage_timeout_s,
            heartbeat_timeout_s=heartbeat_timeout_s,
        )
