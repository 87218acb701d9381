"""serveflow: prediction pipelines as dataflows, optimized and served with low latency.

import serveflow as sf
flow = sf.Flow("example")
flow.map(lambda r: r["a"] + r["b"], names=["sum"]).filter(lambda r: r["sum"] % 2 == 0)
with flow.deploy() as app:
    print(app.run(sf.Table({"a": [1, 2], "b": [10, 20]})).result().to_rows())
"""

from serveflow.errors import (
    DeadlineError,
    FlowError,
    InputError,
    OperatorError,
    OverloadError,
    ServeflowError,
)
from serveflow.logical import Batching, Flow, Row, Stream, Table
from serveflow.optimizer import Plan, Rules, Stage, optimize
from serveflow.runtime.app import App
from serveflow.runtime.cluster import RayRuntime
from serveflow.runtime.local import LocalRuntime

__all__ = [
    "App",
    "Batching",
    "DeadlineError",
    "Flow",
    "FlowError",
    "InputError",
    "LocalRuntime",
    "OperatorError",
    "OverloadError",
    "Plan",
    "RayRuntime",
    "Row",
    "Rules",
    "ServeflowError",
    "Stage",
    "Stream",
    "Table",
    "optimize",
]
__version__ = "0.1.0"
