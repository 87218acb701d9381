"""SLO-aware adaptive batching (after BATCH, Ali et al., SC20): the policy side.

Pure computation, no threads or processes: the runtime feeds a `BatchingController`
arrivals and finished batches and asks it for a `Decision`.

- `arrivals`: sliding-window arrival log, MAP fitting (Poisson or 2-state MMPP);
- `profile`: batch service time `a + b * size`, learned online;
- `model`: the analytical latency/cost model of a (B, T, workers) configuration;
- `controller`: `BatchingController`, `Decision`, `split_slo`;
- `simulate`: a discrete-event simulation of buffer + workers, to check the model.
"""

from serveflow.batching.arrivals import MAP, ArrivalLog, fit_map
from serveflow.batching.controller import BatchingController, Decision, split_slo
from serveflow.batching.model import LatencyDistribution, Prediction, buffer_law, predict
from serveflow.batching.profile import ServiceProfile
from serveflow.batching.simulate import simulate

__all__ = [
    "MAP",
    "ArrivalLog",
    "BatchingController",
    "Decision",
    "LatencyDistribution",
    "Prediction",
    "ServiceProfile",
    "buffer_law",
    "fit_map",
    "predict",
    "simulate",
    "split_slo",
]
