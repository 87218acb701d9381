"""Python's cyclic garbage collector in serveflow's own processes: the workers and
`serveflow serve`'s driver (not yours: the embedded runtime's driver is your process).

A collection holds the GIL, and every request in flight in that process waits for it.
A full collection walks every object the process keeps, most of which (modules, models,
flows, the servers) live as long as it does: one over a MiniLM worker's heap took 211
ms; in a driver serving 200 closed-loop HTTP connections (`Server` in one process, the
defaults) they came every ~0.8 s and took 40-130 ms, and 10-12% of the answers missed an
SLO of 100 ms (0.8-1.7% with the heap frozen once set up). `settle` puts what exists
once a process is set up (a worker: once it loaded a stage) out of the collector's sight.
"""

from __future__ import annotations

import gc


def settle() -> None:
    """Collect once, then leave what exists now out of every later collection."""
    gc.collect()
    gc.freeze()
