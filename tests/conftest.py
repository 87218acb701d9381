"""Shared fixtures: the rule sets every operator test runs under, and a deploy helper."""

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


def make_rules(name):
    return sf.Rules(**RULESETS[name])


@pytest.fixture(params=list(RULESETS))
def rules(request):
    """Each test using this fixture runs once per rule set."""
    return make_rules(request.param)


@pytest.fixture
def serve(rules):
    """serve(flow, table, kvs=None) -> output Table, deployed under the current rules."""

    def _serve(flow, table, kvs=None):
        with flow.deploy(rules=rules) as app:
            for key, value in (kvs or {}).items():
                app.kvs.put(key, value)
            return app.run(table).result(timeout=TIMEOUT)

    return _serve
