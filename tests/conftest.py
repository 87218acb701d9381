"""Shared fixtures: the rule sets every operator test runs under, and deploy helpers.

Deployments share one `sf.LocalRuntime` per test session (generic warm workers, stages
loaded on demand, as in the serverless model), so that a deploy costs milliseconds
instead of a worker start. A few tests deploy on the default, fresh runtime on purpose.
Set SERVEFLOW_FRESH_RUNTIME=1 to give every deployment its own runtime instead.

A test module that sets `RUNTIMES = ("local", "ray")` runs its `deploy`/`serve` tests
on both runtimes: the Ray one on a two-node Ray cluster started once per session
(`ray_cluster`; test_ray.py places its own runtimes' workers on it).
"""

import os

import pytest

import serveflow as sf

TIMEOUT = 10

RULESETS = {
    "none": dict(fusion=False, compete=False, locality=False, batching=False, whole=False),
    "default": dict(),
    "all": dict(
        fusion=True, compete=True, compete_replicas=2, locality=True, batching=True, whole=True
    ),
    "all-but-whole": dict(compete=True, compete_replicas=2),
}


@pytest.fixture(params=list(RULESETS))
def rules(request):
    """Each test using this fixture runs once per rule set."""
    return sf.Rules(**RULESETS[request.param])


@pytest.fixture(scope="session")
def shared_runtime():
    """The runtime deployments share, or None for a fresh one per deployment."""
    if os.environ.get("SERVEFLOW_FRESH_RUNTIME"):
        yield None
        return
    shared = sf.LocalRuntime()
    yield shared
    shared.stop()


@pytest.fixture(scope="session")
def ray_cluster():
    """A two-node Ray cluster on this machine, started by the tests: a head node with
    2 logical CPUs and a second node with 2 CPUs and one logical GPU (`num_gpus=1`).
    This process is its driver for the whole session."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 2, "object_store_memory": 128 << 20, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=node)
    gpu_node = cluster.add_node(**{**node, "num_gpus": 1, "resources": {"gpu_node": 1}})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    yield cluster, gpu_node
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def ray_runtime(ray_cluster):
    """A `sf.RayRuntime` on the session's Ray cluster, shared like `shared_runtime`.
    Its workers reserve no CPU or GPU (`worker_cpus=0`, `gpus=0`): the cluster tests
    place their own runtimes' workers by the resources they ask for."""
    runtime = sf.RayRuntime(worker_cpus=0, max_workers=4, gpus=0)
    yield runtime
    runtime.stop()


def pytest_generate_tests(metafunc):
    """A module listing `RUNTIMES = ("local", "ray")` runs its tests that deploy through
    `deploy`/`serve` on each runtime."""
    if "runtime_name" in metafunc.fixturenames:
        names = getattr(metafunc.module, "RUNTIMES", ("local",))
        metafunc.parametrize("runtime_name", names, scope="session")


@pytest.fixture
def runtime(runtime_name, request):
    """The shared runtime of the current kind (None: a fresh local one per deploy)."""
    if runtime_name == "ray":
        return request.getfixturevalue("ray_runtime")
    return request.getfixturevalue("shared_runtime")


@pytest.fixture
def deploy(rules, runtime):
    """deploy(flow) -> App under the current rule set (use as a context manager)."""
    return lambda flow: flow.deploy(rules=rules, runtime=runtime)


@pytest.fixture
def serve(deploy):
    """serve(flow, table, kvs=None) -> output Table, deployed under the current rules."""

    def _serve(flow, table, kvs=None):
        with deploy(flow) as app:
            for key, value in (kvs or {}).items():
                app.kvs.put(key, value)
            return app.run(table).result(timeout=TIMEOUT)

    return _serve
