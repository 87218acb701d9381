"""Ray Serve peer: a chain of identity deployments composed through handles.

`RayServeChain(stages=3)` starts a local Ray instance (loopback, no dashboard) and
deploys `stages` deployments, each holding a DeploymentHandle to the next (Ray Serve's
model composition): driver -> s1 -> s2 -> s3, results returned back up the chain. The
driver calls s1 through a DeploymentHandle. Each deployment gets `num_cpus=0` so all of
them fit on a 2-core machine, and `max_ongoing_requests` high enough not to throttle 32
requests in flight (its default, 5, would cap the throughput measurement).

Requires `ray[serve]` (the `bench` extra). `close()` runs serve.shutdown() and
ray.shutdown().
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

log = logging.getLogger(__name__)

MAX_ONGOING = 64


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_serve() -> tuple[Any, Any]:
    """A local Ray (started once per process) with Serve on a free loopback port;
    returns the `ray` and `ray.serve` modules."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(
            # a Ray of its own: never one another process on this machine started
            address="local",
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            object_store_memory=256 * 1024 * 1024,
            num_cpus=os.cpu_count() or 2,
        )
    serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
    return ray, serve


def _identity(payload: Any) -> Any:
    return payload


class RayServeChain:
    """`stages` composed identity deployments; `call(payload)` is one request."""

    def __init__(
        self,
        stages: int = 3,
        *,
        app_name: str = "serveflow-bench",
        steps: Sequence[Callable[..., Any]] | None = None,
    ) -> None:
        """`steps`: instead of identities, one function per deployment, applied to the
        payload in turn (a class is instantiated once per replica, then called)."""
        self._ray, self._serve = start_serve()
        serve = self._serve
        steps = list(steps) if steps is not None else [_identity] * stages

        @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=MAX_ONGOING)
        class Step:
            def __init__(self, step: Callable[..., Any], downstream: Any = None) -> None:
                self.fn = step() if isinstance(step, type) else step
                self.downstream = downstream

            async def __call__(self, payload: Any) -> Any:
                payload = self.fn(payload)
                if self.downstream is None:
                    return payload
                return await self.downstream.remote(payload)

        node = Step.options(name=f"s{len(steps)}").bind(steps[-1])
        for i in range(len(steps) - 1, 0, -1):
            node = Step.options(name=f"s{i}").bind(steps[i - 1], node)
        self.handle = serve.run(node, name=app_name, route_prefix=None)
        self._app_name = app_name
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None

    def call(self, payload: Any) -> Any:
        return self.handle.remote(payload).result(timeout_s=60)

    def submit(self, payload: Any) -> Future[Any]:
        """One request as a concurrent.futures.Future: awaited on an asyncio loop in a
        driver thread (the handle's async API), so many can be in flight cheaply."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._loop_thread = threading.Thread(
                target=self._loop.run_forever, daemon=True, name="ray-serve-client"
            )
            self._loop_thread.start()
        return asyncio.run_coroutine_threadsafe(self._acall(payload), self._loop)

    async def _acall(self, payload: Any) -> Any:
        return await self.handle.remote(payload)

    def close(self, *, shutdown: bool = True) -> None:
        """Stop the client loop; with `shutdown`, Serve and Ray too (else only this
        chain's application is deleted: another may still use them)."""
        if self._closed:
            return
        self._closed = True
        if self._loop is not None and self._loop_thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(timeout=10)
            self._loop.close()
        if not shutdown:
            self._serve.delete(self._app_name)
            return
        try:
            self._serve.shutdown()
        finally:
            self._ray.shutdown()

    def __enter__(self) -> RayServeChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
