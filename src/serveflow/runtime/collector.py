"""Python's cyclic garbage collector in the processes serveflow serves from: the workers,
`serveflow serve`'s driver, and the process that deploys a flow on an embedded or Ray
runtime (yours: the driver that admits, routes and answers runs in it).

A collection holds the GIL, and every request in flight in that process waits for it.
A full collection walks every object the process keeps, most of which (modules, models,
flows, the servers) live as long as it does: one over a MiniLM worker's heap took 211
ms; in a driver serving 200 closed-loop HTTP connections (`Server` in one process, the
defaults) they came every ~0.8 s and took 40-130 ms, and 10-12% of the answers missed an
SLO of 100 ms (0.8-1.7% with the heap frozen once set up). `settle` puts what exists
once a process is set up (a worker: once it loaded a stage) out of the collector's sight.

A process that deploys apps in turn (a test suite, a notebook) holds the cycles of the
runtimes it stopped until a full collection finds them: in a pytest process, one came
in 1 of 4-5 bursts of 1,000 requests to the next app, walked the whole heap and
~50,000 such objects for 55-90 ms, and 15-90% of the requests admitted under an SLO
of 100 ms were answered late. `deploying` collects them before an app serves.
"""

from __future__ import annotations

import gc
import threading

_settled = threading.Event()


def settle() -> None:
    """Collect once, then leave what exists now out of every later collection."""
    gc.collect()
    gc.freeze()


def deploying() -> None:
    """This process is about to serve an app: collect its garbage now, not while it
    serves; the first time, `settle` (it has set up what it serves from). Not every
    time: what is frozen is never collected, and the stopped runtimes of a process
    deploying in turn would never be."""
    if _settled.is_set():
        gc.collect()
    else:
        _settled.set()
        settle()
