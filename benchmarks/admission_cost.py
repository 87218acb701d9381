"""What admission costs the driver per arrival, by how deep the queue is (issue 13).

An SLO batching stage's ledger (`serveflow.batching.admission.StageLedger`) predicts
each arrival's latency from its workers' queues, cut into calls. A burst of requests
sent 50 us apart is admitted on 2 workers (2 + 0.5 ms per row, calls of up to 128,
the running call late: the worker frees later at each arrival) under a loose SLO, so
every request is admitted and the queues grow to half the burst each. Timed per
arrival, by quarter of the burst: the ledger as it runs (each worker's queue kept cut
into calls between arrivals) and, in the same run, the same ledger made to cut every
queue whole for each arrival (the peer: how admission worked before).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

from benchmarks import common
from serveflow.batching.admission import StageLedger

SYSTEM = "serveflow admission"
SERVICE_S = [0.0] + [0.002 + 0.0005 * n for n in range(1, 129)]
QUARTERS = 4


class WholeCut(StageLedger):
    """Cuts each worker's whole queue for every prediction (also the tests' reference)."""

    def _closed(self, w, *args):  # type: ignore[no-untyped-def]
        w.cut = None
        return super()._closed(w, *args)


def _burst(ledger: StageLedger, n: int, slo_s: float) -> list[float]:
    """Seconds each of `n` arrivals' admission took, after a light load."""
    ledger.plan(1, 0.0, 1, [0.0, 0.0025], 0.0)
    now = 0.0
    for rid in range(200):  # 1 request at a time, calls of 1 seen ending
        ledger.admit(rid, now, 1.0, [0, 1], 0)
        ledger.finished(rid, now + 0.0026)
        now += 0.006
    ledger.plan(64, 0.0, 128, SERVICE_S, 20_000.0)
    took = []
    for rid in range(200, 200 + n):
        start = time.perf_counter()
        ledger.admit(rid, now, slo_s, [0, 1])
        took.append(time.perf_counter() - start)
        now += 5e-5
    return took


def main(argv: Sequence[str] | None = None) -> None:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    bursts = [(2000, 1.0)] if args.quick else [(1000, 0.5), (2000, 1.0), (4000, 2.0)]
    records = []
    for n, slo_s in bursts:
        runs = {"kept": _burst(StageLedger(), n, slo_s), "whole": _burst(WholeCut(), n, slo_s)}
        for q in range(QUARTERS):
            part = slice(q * n // QUARTERS, (q + 1) * n // QUARTERS)
            us = {name: statistics.fmean(t[part]) * 1e6 for name, t in runs.items()}
            records.append(
                common.record(
                    f"burst of {n}, SLO {slo_s:g} s, quarter {q + 1}",
                    SYSTEM,
                    queued_per_worker=(q + 0.5) * n / QUARTERS / 2,
                    kept_us=us["kept"],
                    whole_us=us["whole"],
                    whole_over_kept=us["whole"] / us["kept"],
                )
            )
    common.print_table(
        records,
        ("scenario", "queued_per_worker", "kept_us", "whole_us", "whole_over_kept"),
        title="admission: mean us per arrival",
    )
    common.write_json("admission_cost", records, args.out)


if __name__ == "__main__":
    main()
