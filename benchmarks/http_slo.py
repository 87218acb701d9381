"""SLO-aware batching over HTTP, as clients outside the server see it (issue 13).

`serveflow serve` with one SLO stage of 4 + 1 ms per row (it sleeps: a stage that waits
on a device) on 2 workers, driven by load generators outside its process tree, each
request's latency as its client measured it:
- `wrk` with open_loop.lua: 96 connections, each on its own Poisson schedule; latency
  from the send (`from send`: one connection has one request open, so an arrival due
  while it waits goes late, which is the generator's, not the server's);
- `hey -q`: connections that tick in lockstep, a burst of all of them every 1 / q s;
- `hey` without `-q`: a closed-loop flood over 64 connections.
Cases: the issue's three (SLO 60 ms at 400/s, 15 ms at 300/s, 30 ms at 3,000/s, far
beyond 2 workers at any batch size), each Poisson and in bursts, and the flood at SLO
30 ms. Per case: sent per second, share refused, share of sent answered within the
SLO, answered p50 / p99 (and p99 / SLO), refusal p50 / p99, goodput (answers within
the SLO per second). The generators share the machine's 2 cores with the server:
a flood's client takes one. `--baseline SRC`: the same cases, alternating, served
from another serveflow tree's `src` (e.g. the commit before, `git archive`d).

    python -m benchmarks.http_slo [--quick] [--seconds 6] [--baseline /tmp/old/src]
"""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import common
from benchmarks.reliability import open_loop

NAME = "http_slo"
FLOWS = """
import time
import serveflow as sf

def rows(xs):
    time.sleep(0.004 + 0.001 * len(xs))
    return [x * 2 for x in xs]

def flow(slo):
    flow = sf.Flow(f"slo{slo}")
    flow.map(rows, col="x", names=["y"], batching=sf.Batching(slo_ms=slo))
    return flow

slo15, slo30, slo60 = flow(15), flow(30), flow(60)
"""
BODY = '{"rows": [{"x": 1}]}'
V2_BODY = '{"inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [1]}]}'
# (case, SLO ms, client, rate or hey's -c and -q)
CASES = (
    ("400/s, SLO 60 ms", 60, "poisson", 400),
    ("400/s, SLO 60 ms", 60, "bursts", (40, 10)),
    ("300/s, SLO 15 ms", 15, "poisson", 300),
    ("300/s, SLO 15 ms", 15, "bursts", (30, 10)),
    ("3,000/s, SLO 30 ms", 30, "poisson", 3000),
    ("3,000/s, SLO 30 ms", 30, "bursts", (100, 30)),
    ("flood, SLO 30 ms", 30, "closed loop", (64, 0)),
)
POISSON_CONNECTIONS = 96


class Served:
    """`serveflow serve` of FLOWS on 2 workers in a child process; `source`: the `src`
    of another serveflow tree to serve from."""

    def __init__(self, source: str | None = None, v2: bool = False) -> None:
        self.v2 = v2
        self.body = V2_BODY if v2 else BODY
        self._dir = tempfile.TemporaryDirectory(prefix="sf-http-slo-")
        path = Path(self._dir.name) / "slo_flows.py"
        path.write_text(FLOWS)
        options = ("--workers", "2", "--max-workers", "2")
        self.process, self.base = common.serve(path, *options, source=source)

    def url(self, slo: int) -> str:
        if self.v2:
            return f"{self.base}/v2/models/slo{slo}/infer"
        return f"{self.base}/v1/flows/slo{slo}/predict"

    def close(self) -> None:
        common.stop(self.process)
        self._dir.cleanup()


def hey(
    url: str, body: str, seconds: float, connections: int, per_connection: float
) -> list[tuple]:
    """`hey` POSTing JSON `body` for `seconds`: (latency ms, status, seconds from the
    start) per request (its CSV)."""
    command = ["hey", "-z", f"{max(1, round(seconds))}s", "-c", str(connections),
               "-q", f"{per_connection:g}", "-m", "POST", "-T", "application/json",
               "-d", body, "-o", "csv", url]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    if not rows:
        raise RuntimeError(f"hey gave no rows ({out.returncode}): {out.stderr.strip()[-500:]}")
    return [
        (float(r["response-time"]) * 1e3, int(r["status-code"]), float(r["offset"])) for r in rows
    ]


def run_case(served: Served, case: tuple, seconds: float, system: str) -> common.Record:
    name, slo, client, load = case
    url = served.url(slo)
    hey(url, served.body, 2.0, 10, 10.0)  # a fresh stage learns its calls
    if client == "poisson":
        run = open_loop(url, seconds, POISSON_CONNECTIONS, float(load), served.body)
        rows = [(ms, status) for ms, (_, _, status) in zip(run["from_send"], run["rows"])]
    else:
        rows = [(ms, status) for ms, status, _ in hey(url, served.body, seconds, *load)]
    seconds = max(1, round(seconds))
    answered = [ms for ms, status in rows if status == 200]
    refused = [ms for ms, status in rows if status == 503]
    within = sum(ms <= slo for ms in answered)
    p99 = common.percentile(answered, 99)
    return common.record(
        f"{name}, {client}", system, answered, len(answered) / seconds,
        slo_ms=slo, sent_rps=len(rows) / seconds, refused=len(refused) / len(rows),
        within_slo=within / len(rows), goodput_rps=within / seconds,
        p99_over_slo=p99 / slo if answered else None,
        refused_median_ms=common.percentile(refused, 50),
        refused_p99_ms=common.percentile(refused, 99),
        other_statuses=len(rows) - len(answered) - len(refused),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    def configure(parser):  # type: ignore[no-untyped-def]
        parser.add_argument("--seconds", type=float, default=6.0, help="measured per case")
        parser.add_argument("--baseline", default=None, help="src of a serveflow to compare")
        parser.add_argument("--v2", action="store_true", help="as V2 inferences (Triton's)")

    args = common.parse_args(__doc__ or NAME, argv, configure)
    missing = [tool for tool in ("hey", "wrk") if shutil.which(tool) is None]
    if missing:
        print(f"missing {', '.join(missing)}: bash scripts/wrk.sh", file=sys.stderr)
        return 1
    seconds = 3.0 if args.quick else args.seconds
    systems = {"serveflow": None}
    if args.baseline:
        systems["baseline"] = args.baseline
    records = []
    for case in CASES:
        for system, source in systems.items():  # alternating: drift hits both
            served = Served(source, args.v2)
            try:
                records.append(run_case(served, case, seconds, system))
            finally:
                served.close()
    common.write_json(NAME, records, args.out)
    columns = ["scenario", "system", "sent_rps", "refused", "within_slo", "median_ms",
               "p99_ms", "p99_over_slo", "refused_median_ms", "refused_p99_ms",
               "goodput_rps"]  # fmt: skip
    common.print_table(records, columns)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
