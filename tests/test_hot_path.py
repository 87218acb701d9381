"""The driver's hot path: routing plain plans in one pass gives what the general
path gives.
"""

from __future__ import annotations

import serveflow as sf


def test_routing_a_plain_plan_in_one_pass_picks_what_the_general_path_picks():
    """`Scheduler.route`'s one-pass path for plans whose stages each run once on one
    resource class gives the route and charges of the general path, whatever the
    loads, warm and loading stages of the workers."""
    import copy
    import dataclasses
    import random

    from serveflow.optimizer.placement import place
    from serveflow.runtime.scheduler import PlanFacts, Scheduler, WorkerLoad

    flow = sf.Flow("chain")
    stream = flow
    for i in range(4):
        stream = stream.map(lambda x: x, col="x", name=f"s{i}")
    plan = place(flow.optimize(sf.Rules(fusion=False)), False)
    assert PlanFacts.of(plan).plain is False  # the one-pass path applies
    rng = random.Random(0)
    for _ in range(300):
        workers = {}
        for w in rng.sample(range(10), rng.randint(1, 6)):
            warm = {(1, s) for s in range(4) if rng.random() < 0.6}
            loading = {k for k in warm if rng.random() < 0.2}
            workers[w] = WorkerLoad(rng.randint(0, 3), warm, loading, gpu=rng.random() < 0.2)
        if rng.random() < 0.1:
            rng.choice(list(workers.values())).silent = True
        fast, general = Scheduler(), Scheduler()
        general._facts[1] = dataclasses.replace(PlanFacts.of(plan), plain=None)
        before = copy.deepcopy(workers)
        routed = fast.route(1, plan, workers)
        assert routed == general.route(1, plan, before)
        assert workers == before  # the same loads counted, the same stages warm
