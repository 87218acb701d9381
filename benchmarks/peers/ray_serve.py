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
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            object_store_memory=256 * 1024 * 1024,
            num_cpus=os.cpu_count() or 2,
        )
    serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
    return ray, serve


class RayServeChain:
    """`stages` composed identity deployments; `call(payload)` is one request."""

    def __init__(self, stages: int = 3, *, app_name: str = "serveflow-bench") -> None:
        self._ray, self._serve = start_serve()
        serve = self._serve

        @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=MAX_ONGOING)
        class Identity:
            def __init__(self, downstream: Any = None) -> None:
                self.downstream = downstream

            async def __call__(self, payload: Any) -> Any:
                if self.downstream is None:
                    return payload
                return await self.downstream.remote(payload)

        node = Identity.options(name=f"s{stages}").bind()
        for i in range(stages - 1, 0, -1):
            node = Identity.options(name=f"s{i}").bind(node)
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

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._loop is not None and self._loop_thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(timeout=10)
            self._loop.close()
        try:
            self._serve.shutdown()
        finally:
            self._ray.shutdown()

    def __enter__(self) -> RayServeChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
