"""The Ray runtime: the control plane over workers that are Ray actors
(`actors.RayEngine`), on a local Ray or a cluster. Needs the `ray` extra."""

from __future__ import annotations

import logging
import os
from typing import Any

from serveflow.runtime.control import ControlPlane, check_pool
from serveflow.runtime.kvs import KVS, open_shared_kvs

log = logging.getLogger(__name__)


def _import_ray() -> Any:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError as error:
        raise ImportError("sf.RayRuntime needs Ray: pip install 'serveflow[ray]'") from error
    return ray


def connect(address: str | None, namespace: str, runtime_env: dict | None) -> bool:
    """Join Ray as `address` says (None: the Ray this process already uses, else a new
    local one); True when this call connected (the runtime then disconnects)."""
    ray = _import_ray()
    if ray.is_initialized():
        return False
    if address is not None and not isinstance(address, str):
        raise TypeError(f"address: None, 'auto' or 'ray://host:port', got {address!r}")
    options: dict[str, Any] = {"namespace": namespace, "logging_level": logging.WARNING}
    if runtime_env is not None:
        options["runtime_env"] = runtime_env
    if address is None:
        options["include_dashboard"] = False
    ray.init(address=address, **options)
    return True


def _single_host(ray: Any) -> bool:
    """Whether every live node of the cluster is this machine."""
    here = ray.util.get_node_ip_address()
    return all(n["NodeManagerAddress"] == here for n in ray.nodes() if n.get("Alive"))


class RayRuntime(ControlPlane):
    """Runs plans on Ray actors, with the same control plane (routing, batching,
    autoscaling, admission, retries) as `sf.LocalRuntime`.

    address: None uses the Ray this process already initialized, or starts a local
        one; "auto" joins the cluster this machine belongs to; "ray://host:port" joins
        one through Ray Client.
    namespace: the Ray namespace of the worker actors.
    worker_cpus: the `num_cpus` each worker actor asks for (0 lets any number share a
        node); a GPU worker also asks for `num_gpus=1`.
    max_workers: CPU workers at most (default: the cluster's CPUs / worker_cpus).
    gpus: GPU workers, one per GPU, that run the `gpu=True` stages (None: as many as
        the cluster has GPUs). Without any, GPU stages run on CPU workers.
    kvs: the store behind `lookup` and `app.kvs`, reachable from every node:
        "redis://host:port/db", or a store object; None is an LMDB store in a
        temporary directory, allowed only when every node is this machine.
    runtime_env: Ray's runtime environment for the job (when this runtime connects).
    The other options are `sf.LocalRuntime`'s.
    """

    def __init__(
        self,
        address: str | None = None,
        namespace: str = "serveflow",
        *,
        min_workers: int = 1,
        max_workers: int | None = None,
        worker_cpus: float = 1.0,
        gpus: int | None = None,
        kvs: str | KVS | None = None,
        runtime_env: dict | None = None,
        max_in_flight: int = 10_000,
        worker_queue: int = 8,
        retries: int = 2,
        idle_s: float = 10.0,
        idle_unload_s: float = 60.0,
        cache_bytes: int = 256 << 20,
        target_in_flight: float = 2.0,
        stage_timeout_s: float | None = None,
    ) -> None:
        if worker_cpus < 0:
            raise ValueError(f"worker_cpus: a number of CPUs >= 0, got {worker_cpus!r}")
        if gpus is not None and (not isinstance(gpus, int) or gpus < 0):
            raise ValueError(f"gpus: None (as the cluster has) or a count >= 0, got {gpus!r}")
        owns_ray = connect(address, namespace, runtime_env)
        ray = _import_ray()
        try:
            resources = ray.cluster_resources()
            if max_workers is None:
                cpus = resources.get("CPU", 1.0)
                max_workers = max(1, int(cpus // worker_cpus)) if worker_cpus else 4 * int(cpus)
                max_workers = max(max_workers, min_workers)
            check_pool(min_workers, max_workers)
            if gpus is None:
                gpus = int(resources.get("GPU", 0))
            if kvs is None and not _single_host(ray):
                raise ValueError(
                    "kvs: this Ray cluster spans several machines; name a store every "
                    "node reaches, e.g. kvs='redis://host:6379/0'"
                )
            store = open_shared_kvs(kvs, "'redis://host:port/db' (or None on a one-machine Ray)")
            from serveflow.runtime.actors import RayEngine

            options = {"cache_bytes": cache_bytes, "idle_unload_s": idle_unload_s}
            engine = RayEngine(
                store.address, options, namespace=namespace, num_cpus=worker_cpus,
                owns_ray=owns_ray,
            )  # fmt: skip
        except BaseException:
            if owns_ray:
                ray.shutdown()
            raise
        super().__init__(
            engine,
            store,
            min_workers=min_workers,
            max_workers=max_workers,
            gpus=list(range(gpus)),
            max_in_flight=max_in_flight,
            worker_queue=worker_queue,
            retries=retries,
            idle_s=idle_s,
            target_in_flight=target_in_flight,
            stage_timeout_s=stage_timeout_s,
        )
