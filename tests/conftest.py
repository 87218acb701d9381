"""Shared fixtures: the rule sets every operator test runs under, and deploy helpers.

Deployments share one `sf.LocalRuntime` per test session (generic warm workers, stages
loaded on demand, as in the serverless model), so that a deploy costs milliseconds
instead of a worker start. A few tests deploy on the default, fresh runtime on purpose.
Set SERVEFLOW_FRESH_RUNTIME=1 to give every deployment its own runtime instead.
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


@pytest.fixture
def deploy(rules, shared_runtime):
    """deploy(flow) -> App under the current rule set (use as a context manager)."""
    return lambda flow: flow.deploy(rules=rules, runtime=shared_runtime)


@pytest.fixture
def serve(deploy):
    """serve(flow, table, kvs=None) -> output Table, deployed under the current rules."""

    def _serve(flow, table, kvs=None):
        with deploy(flow) as app:
            for key, value in (kvs or {}).items():
                app.kvs.put(key, value)
            return app.run(table).result(timeout=TIMEOUT)

    return _serve
