"""Reliability under faults, floods, bad input and time, probed from outside.

Each part starts `serveflow serve` in a child process and drives it over HTTP:

- chaos: closed-loop clients send requests with unique inputs; every `--kill-every`
  seconds one worker is SIGKILLed, then one is SIGSTOPped for `--stop-s` seconds.
  Every answer is checked against its input (no wrong, duplicate or missing answer);
  reported: errors, throughput vs the same clients without faults, and the slowest
  requests while a worker was stopped (the heartbeat timeout bounds them).
- overload: `wrk` (a load generator outside this process tree, with open_loop.lua: one
  connection per thread, each on its own Poisson schedule) finds the sustainable rate
  (closed loop with as many connections as the server admits), the unloaded p99 (at a
  quarter of it), then offers 3x the sustainable rate over 96 connections to a server
  with `--max-in-flight`: admitted throughput and p99 vs those, what a refusal costs
  the server, and the CPU the generator and the workers used in each phase. Flows: `work`
  (1 ms of CPU per request: the machine's cores bound it) and `wait` (2 ms asleep: the
  server process bounds it). After each, the bare 503 server of `peers.refusal` takes the
  same flood: the floor of a refusal, and from it `goodput_ceiling`, the most the flood
  could have admitted with refusals that cheap on this machine's cores. (`hey -q`
  is not used there: its connections tick at the same instants, so a flood arrives in
  bursts of 96 with nothing between them, and the admitted slots sit empty between
  bursts whatever the server does.)
- curve (not in the default parts): closed loops of 1 to 32 connections on a flow with
  the bound fixed at 32, and the unloaded p99 as above: throughput and p99 at each depth
  as shares of the sustainable rate and of the unloaded p99. No refusal and no flood
  costs anything there, so the best share of the sustainable rate any bound could admit
  within 1.5x the unloaded p99 is the curve's, an upper limit for the overload targets.
- fuzz: schemathesis against the live server's /openapi.json (every check, the
  server's token set), then hypothesis-built bodies: wrong types, huge values, deep
  nesting, NaN, unicode, compression bombs and lying `.npy` headers. No answer may be
  a 5xx; the server's memory and /healthz latency are sampled throughout.
- soak: `wrk` (open_loop.lua, Poisson arrivals over 16 connections) at half the
  sustainable rate for `--minutes`; every 5 s the RSS of every process of the server
  and its /dev/shm run directory; p99 per 10 s window.

    python -m benchmarks.reliability [--quick] [--parts chaos,overload,fuzz,soak]
        [--minutes 30] [--seconds 20] [--parts curve --connections 1,2,4,8,16,32]

Writes results/reliability.json (records per DESIGN.md) and results/reliability.png.
Exits 1 when a check fails (`--quick` is what CI runs, without the soak).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import itertools
import logging
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np

from benchmarks import common

NAME = "reliability"
SYSTEM = "serveflow"
TOKEN = "reliability-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SHM = Path("/dev/shm")
RUN_DIR_PREFIX = "serveflow-"
GOODPUT_TARGET = 0.9  # admitted throughput at 3x / sustainable
P99_TARGET = 1.5  # admitted p99 at 3x / unloaded p99
FROZEN_BOUND_S = 3.0  # requests on a stopped worker answered within (1.5 s timeout + re-run)
SCHEMATHESIS_CONFIG = Path(__file__).with_name("reliability_schemathesis.toml")

FLOWS = """
import time

import numpy as np
import serveflow as sf

chain = sf.Flow("chain", schema={"x": int})
stream = chain
for i in range(3):
    stream = stream.map(lambda v: v, col="x", name=f"identity{i + 1}")

def spin(x):  # about a millisecond of CPU: a service bound by its workers, not its ingress
    return sum(i * i for i in range(12_000)) * 0 + x


work = sf.Flow("work", schema={"x": int})
work.map(spin, col="x", name="spin")

def nap(x):  # 2 ms off the CPU: a model on an accelerator, or a remote call
    time.sleep(0.002)
    return x


wait = sf.Flow("wait", schema={"x": int})
wait.map(nap, col="x", name="nap")

arith = sf.Flow("arith", schema={"a": int, "b": int})
arith.map(lambda r: r["a"] + r["b"], names=["sum"], name="add")

text = sf.Flow("text", schema={"user": str, "text": str})
text.map(lambda r: (r["user"], len(r["text"])), names=["user", "chars"], name="measure")

tensor = sf.Flow("tensor", schema={"x": np.ndarray})
tensor.map(lambda r: (r["x"] * 2, float(r["x"].sum())), names=["y", "total"], name="double")
"""


# --- the server and its processes ---------------------------------------------------


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return found


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _is_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"serveflow.runtime.worker" in f.read()
    except OSError:
        return False


def _dir_mb(path: Path) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_size
    return total / 2**20


class Server:
    """`serveflow serve` on the flows above, in a child process."""

    def __init__(self, *options: str) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="sf-reliability-")
        path = Path(self._dir.name) / "flows.py"
        path.write_text(FLOWS)
        before = set(os.listdir(SHM)) if SHM.is_dir() else set()
        env = {"SERVEFLOW_TOKEN": TOKEN}
        self.process, self.url = common.serve(path, "--workers", "2", *options, env=env)
        self.wait_workers(2)
        new = set(os.listdir(SHM)) - before if SHM.is_dir() else set()
        self.shm_dirs = [SHM / n for n in new if n.startswith(RUN_DIR_PREFIX)]

    def workers(self) -> list[int]:
        return [pid for pid in _children(self.process.pid) if _is_worker(pid)]

    def wait_workers(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.workers()) < count and time.monotonic() < deadline:
            time.sleep(0.1)

    def rss_mb(self) -> dict[str, float]:
        """RSS of the server process and of each of its children (workers, planner)."""
        rss = {"server": _rss_mb(self.process.pid)}
        rss.update({f"pid {c}": _rss_mb(c) for c in _children(self.process.pid)})
        return rss

    def shm_mb(self) -> float:
        return sum(_dir_mb(d) for d in self.shm_dirs)

    def close(self) -> None:
        common.stop(self.process)
        self._dir.cleanup()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _predict_url(server: Server, flow: str) -> str:
    return f"{server.url}/v1/flows/{flow}/predict"


# --- chaos ------------------------------------------------------------------------------


async def _clients(
    url: str, clients: int, seconds: float, counter: Iterator[int]
) -> list[tuple[float, float, str]]:
    """Closed loops of `clients` for `seconds`: (sent at s, latency s, outcome) per
    request, outcome "ok", "wrong" (an answer that is not its input) or an HTTP status."""
    outcomes: list[tuple[float, float, str]] = []
    start = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(headers=AUTH, timeout=timeout) as session:

        async def loop() -> None:
            while time.perf_counter() - start < seconds:
                value = next(counter)
                sent = time.perf_counter()
                try:
                    async with session.post(url, json={"rows": [{"x": value}]}) as response:
                        body = await response.json() if response.status == 200 else None
                        ok = body == {"rows": [{"x": value}]}
                        outcome = ("ok" if ok else "wrong") if body else str(response.status)
                except (TimeoutError, aiohttp.ClientError) as error:
                    outcome = type(error).__name__
                outcomes.append((sent - start, time.perf_counter() - sent, outcome))

        await asyncio.gather(*(loop() for _ in range(clients)))
    return outcomes


def _chaos_record(scenario: str, outcomes: list[tuple[float, float, str]], seconds: float,
                  **extra: Any) -> common.Record:  # fmt: skip
    ok = [lat * 1e3 for _, lat, outcome in outcomes if outcome == "ok"]
    failed = [o for _, _, o in outcomes if o != "ok"]
    return common.record(
        scenario, SYSTEM, ok, len(ok) / seconds, requests=len(outcomes),
        errors=len(failed), wrong=failed.count("wrong"),
        failures=sorted(set(failed)), max_ms=max(ok, default=None), **extra,
    )  # fmt: skip


def run_chaos(seconds: float, kill_every: float, stop_s: float) -> list[common.Record]:
    records = []
    counter = itertools.count()
    with Server("--max-workers", "4") as server:
        url = _predict_url(server, "chain")
        asyncio.run(_clients(url, 8, 2.0, counter))  # warm every stage
        calm = asyncio.run(_clients(url, 8, seconds, counter))
        records.append(_chaos_record("chaos: no faults", calm, seconds))

        kills: list[float] = []
        stop = threading.Event()

        def killer() -> None:
            started = time.perf_counter()
            while not stop.wait(kill_every):
                workers = server.workers()
                if workers:
                    os.kill(random.choice(workers), signal.SIGKILL)
                    kills.append(time.perf_counter() - started)

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        killed = asyncio.run(_clients(url, 8, seconds, counter))
        stop.set()
        thread.join()
        records.append(_chaos_record(f"chaos: SIGKILL a worker every {kill_every:g} s",
                                     killed, seconds, kills=len(kills)))  # fmt: skip

        server.wait_workers(2)
        asyncio.run(_clients(url, 8, 1.0, counter))  # the replacements warm
        frozen = server.workers()[0]

        def freeze() -> None:
            time.sleep(1.0)
            os.kill(frozen, signal.SIGSTOP)
            time.sleep(stop_s)
            with contextlib.suppress(ProcessLookupError):  # killed as frozen, as it should be
                os.kill(frozen, signal.SIGCONT)

        thread = threading.Thread(target=freeze, daemon=True)
        thread.start()
        stopped = asyncio.run(_clients(url, 8, stop_s + 2.0, counter))
        thread.join()
        replaced = frozen not in server.workers()
        records.append(_chaos_record(f"chaos: SIGSTOP a worker for {stop_s:g} s", stopped,
                                     stop_s + 2.0, replaced=replaced))  # fmt: skip
    return records


def chaos_failures(records: list[common.Record]) -> list[str]:
    problems = []
    for r in records:
        if r["errors"]:
            problems.append(f"{r['scenario']}: {r['errors']} errors ({r['failures']})")
    stopped = records[-1]
    if not stopped.get("replaced"):
        problems.append("the SIGSTOPped worker was not replaced")
    if stopped["max_ms"] is not None and stopped["max_ms"] > FROZEN_BOUND_S * 1e3:
        problems.append(f"a request waited {stopped['max_ms']:.0f} ms on a stopped worker")
    return problems


# --- overload (wrk) -----------------------------------------------------------------------


OPEN_LOOP_SCRIPT = Path(__file__).with_name("open_loop.lua")


def open_loop(
    url: str,
    seconds: float,
    connections: int,
    rate: float | None = None,
    body: str = '{"rows": [{"x": 1}]}',
) -> dict:
    """Run `wrk` with open_loop.lua for `seconds` (whole: wrk takes no fraction):
    `connections` connections (a thread each), each sending on its own Poisson schedule
    (`rate` req/s in all), or a closed loop without `rate`, each request a POST of JSON
    `body`; rows of (offset s, latency ms, status), the CPU seconds wrk used, and each
    row's ms from its send (`from_send`)."""
    seconds = max(1, round(seconds))
    per_connection = 0.0 if rate is None else rate / connections
    # niced: on a machine shared with the server, the generator stands for clients on
    # other machines and should not take the server's CPU (every phase alike)
    command = ["nice", "-n", "10", "wrk", f"-t{connections}", f"-c{connections}",
               f"-d{seconds:g}s", "--timeout", "10s", "-s", str(OPEN_LOOP_SCRIPT), url,
               "--", f"{per_connection:.6f}", body, f"Bearer {TOKEN}",
               f"{time.monotonic():.6f}"]  # fmt: skip
    cpu = _children_cpu_s()
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    cpu = _children_cpu_s() - cpu
    rows, from_send = [], []
    for line in out.stdout.splitlines():
        if line.startswith("row,"):
            _, offset, latency, status, sent = line.split(",")
            rows.append((float(offset), float(latency), int(status)))
            from_send.append(float(sent))
    if not rows:
        raise RuntimeError(f"wrk gave no rows ({out.returncode}): {out.stderr.strip()[-500:]}")
    return {"rows": rows, "seconds": seconds, "client_cpu_s": cpu, "from_send": from_send}


def _children_cpu_s() -> float:
    """CPU seconds (user + system) of this process's waited-for children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _hey_record(scenario: str, run: dict, **extra: Any) -> common.Record:
    rows, seconds = run["rows"], run["seconds"]
    admitted = [lat for _, lat, status in rows if status == 200]
    refused = [lat for _, lat, status in rows if status == 503]
    other = len(rows) - len(admitted) - len(refused)
    return common.record(
        scenario, SYSTEM, admitted, len(admitted) / seconds, offered_rps=len(rows) / seconds,
        refused_rps=len(refused) / seconds, refused_median_ms=common.percentile(refused, 50),
        refused_p99_ms=common.percentile(refused, 99), other_statuses=other, **extra,
    )  # fmt: skip


OVERLOAD_ROUNDS = 3  # the phases alternate this many times: drift on a shared machine hits all
UNLOADED_CONNECTIONS = 16  # at a quarter of the rate, one slow answer delays few others


def run_overload(
    seconds: float,
    max_in_flight: int,
    flow: str = "work",
    rounds: int = OVERLOAD_ROUNDS,
    fixed: bool = False,
) -> list[common.Record]:
    """Sustainable, unloaded and 3x phases of `seconds` each, measured as `rounds`
    alternating slices; each round's rates follow its own closed-loop slice. `fixed`:
    the server holds its bound at `max_in_flight` (--fixed-in-flight) instead of
    adapting it."""
    bound = f"{flow}, --max-in-flight {max_in_flight}" + (" --fixed-in-flight" if fixed else "")
    phases = {
        f"{bound}: sustainable (closed loop, as many connections)": (max_in_flight, None),
        f"{bound}: unloaded (0.25x sustainable)": (UNLOADED_CONNECTIONS, 0.25),
        f"{bound}: overload 3x sustainable, 96 connections": (96, 3.0),
    }
    runs: dict[str, list[dict]] = {name: [] for name in phases}
    options = ["--max-in-flight", str(max_in_flight)] + (["--fixed-in-flight"] if fixed else [])
    with Server(*options) as server:
        url = _predict_url(server, flow)
        open_loop(url, 2.0, max_in_flight)  # warm
        for _ in range(rounds):
            rate = None
            for name, (connections, share) in phases.items():
                cpu = _cpu_s(server.process.pid)
                worker_cpu = {pid: _cpu_s(pid) for pid in server.workers()}
                offered = None if share is None else share * rate
                run = open_loop(url, seconds / rounds, connections, offered)
                run["server_cpu_s"] = _cpu_s(server.process.pid) - cpu
                run["workers_cpu_s"] = sum(  # workers started meanwhile count from 0
                    _cpu_s(pid) - worker_cpu.get(pid, 0.0) for pid in server.workers()
                )
                runs[name].append(run)
                if share is None:
                    rate = sum(status == 200 for _, _, status in run["rows"]) / run["seconds"]
                    if not rate:
                        raise RuntimeError(f"{name}: no request answered")
    capacity, unloaded, flood = (_merged(name, runs[name]) for name in phases)
    flood["flow"], flood["max_in_flight"], flood["adaptive"] = flow, max_in_flight, not fixed
    sustainable = capacity["throughput_rps"]
    flood["goodput_ratio"] = common.ratio(flood["throughput_rps"], sustainable)
    flood["offered_ratio"] = common.ratio(flood["offered_rps"], sustainable)
    flood["p99_ratio_vs_unloaded"] = common.ratio(flood["p99_ms"], unloaded["p99_ms"])
    # the server process's CPU per admitted request, measured at the sustainable rate,
    # leaves what the refusals of the flood cost it
    per_admitted = capacity["server_cpu_s"] / max(1, capacity["n"])
    refusals = flood["refused_rps"] * flood["seconds"]
    refusing = flood["server_cpu_s"] - per_admitted * flood["n"]
    flood["server_cpu_per_admitted_us"] = per_admitted * 1e6
    flood["server_cpu_per_refusal_us"] = refusing / refusals * 1e6 if refusals else None
    return [capacity, unloaded, flood]


def run_curve(seconds: float, flow: str, depths: list[int]) -> list[common.Record]:
    """Closed loops of each of `depths` connections, then the unloaded phase at a
    quarter of the deepest one's rate; `seconds` each, in OVERLOAD_ROUNDS alternating
    slices. Ratios: throughput to the deepest one's, p99 to the unloaded one."""
    runs: dict[int, list[dict]] = {depth: [] for depth in [*depths, 0]}
    with Server("--max-in-flight", str(max(depths)), "--fixed-in-flight") as server:
        url = _predict_url(server, flow)
        open_loop(url, 2.0, max(depths))  # warm
        for _ in range(OVERLOAD_ROUNDS):
            for depth in depths:
                runs[depth].append(open_loop(url, seconds / OVERLOAD_ROUNDS, depth))
            top = sum(status == 200 for *_, status in runs[max(depths)][-1]["rows"])
            rate = 0.25 * top / runs[max(depths)][-1]["seconds"]
            runs[0].append(open_loop(url, seconds / OVERLOAD_ROUNDS, UNLOADED_CONNECTIONS, rate))

    def merged(scenario: str, depth: int) -> common.Record:
        rows = [row for run in runs[depth] for row in run["rows"]]
        total = sum(run["seconds"] for run in runs[depth])
        return _hey_record(scenario, {"rows": rows, "seconds": total}, flow=flow, depth=depth)

    unloaded = merged(f"{flow}: unloaded (0.25x the deepest)", 0)
    curve = [merged(f"{flow}: closed loop of {depth}", depth) for depth in depths]
    deepest = curve[-1]["throughput_rps"]
    for record in curve:
        record["goodput_ratio"] = common.ratio(record["throughput_rps"], deepest)
        record["p99_ratio_vs_unloaded"] = common.ratio(record["p99_ms"], unloaded["p99_ms"])
    return [unloaded, *curve]


def refusal_floor(seconds: float, rate: float) -> float:
    """Server CPU (us) per request of the bare 503 server (`peers.refusal`) flooded at
    `rate` over 96 connections: what a refusal costs any Python server here."""
    command = [sys.executable, "-m", "benchmarks.peers.refusal", "0"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as peer:
        try:
            port = int(peer.stdout.readline().split()[1])  # type: ignore[union-attr]
            cpu = _cpu_s(peer.pid)
            run = open_loop(f"http://127.0.0.1:{port}/v1/flows/work/predict", seconds, 96, rate)
            return (_cpu_s(peer.pid) - cpu) / len(run["rows"]) * 1e6
        finally:
            peer.kill()


def add_ceiling(records: list[common.Record], floor_us: float) -> None:
    """Give the flood of `records` the most it could admit (`goodput_ceiling`, as a share
    of the sustainable rate) were its refusals as cheap as the bare server's
    (`floor_us`): the machine's cores less what the generator used in the flood, shared
    by the server and workers at their CPU per admitted request at the sustainable
    rate; and at most one core for the server process (its event loop and the GIL)."""
    capacity, _, flood = records
    n, floor = max(1, capacity["n"]), floor_us / 1e6
    offered = flood["offered_rps"]
    server = capacity["server_cpu_s"] / n
    both = server + capacity["workers_cpu_s"] / n
    cores = (os.cpu_count() or 1) - flood["client_cpu_s"] / flood["seconds"]
    admitted = min(
        (cores - offered * floor) / (both - floor), (1 - offered * floor) / (server - floor)
    )
    flood["refusal_floor_us"] = floor_us
    flood["goodput_ceiling"] = common.ratio(max(0.0, admitted), capacity["throughput_rps"])


def _merged(scenario: str, runs: list[dict]) -> common.Record:
    """One record of a phase's slices: their requests together, CPU summed."""
    total = {"rows": [row for run in runs for row in run["rows"]],
             "seconds": sum(run["seconds"] for run in runs)}  # fmt: skip
    record = _hey_record(scenario, total, rounds=len(runs), seconds=total["seconds"])
    for key in ("server_cpu_s", "workers_cpu_s", "client_cpu_s"):
        record[key] = sum(run[key] for run in runs)
    return record


def overload_failures(records: list[common.Record]) -> list[str]:
    flood = records[-1]
    problems = []
    bound = f"{flood['flow']}, --max-in-flight {flood['max_in_flight']}" + (
        "" if flood["adaptive"] else " fixed"
    )
    if (flood["goodput_ratio"] or 0) < GOODPUT_TARGET:
        ceiling = flood.get("goodput_ceiling")
        problems.append(f"{bound}: admitted throughput at 3x is "
                        f"{flood['goodput_ratio']:.2f}x sustainable" + (
                        "" if ceiling is None else f"; at most {ceiling:.2f}x were refusals as "
                        "cheap as the bare 503 server's, on this machine's cores"))  # fmt: skip
    if (flood["p99_ratio_vs_unloaded"] or 99) > P99_TARGET:
        problems.append(f"{bound}: admitted p99 at 3x is "
                        f"{flood['p99_ratio_vs_unloaded']:.2f}x unloaded")  # fmt: skip
    if flood["other_statuses"]:
        problems.append(f"{bound}: {flood['other_statuses']} answers neither 200 nor 503 at 3x")
    return problems


# --- fuzz ---------------------------------------------------------------------------------


def _npz(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def _lying_npz(shape: tuple[int, ...]) -> bytes:
    """A .npz whose .npy header declares `shape` of float64 but holds 8 bytes."""
    header = io.BytesIO()
    descr = {"descr": "<f8", "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(header, descr)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("x.npy", header.getvalue() + b"\0" * 8)
    return buffer.getvalue()


def bombs() -> list[tuple[str, bytes]]:
    """Compressed bodies that inflate far beyond their size."""
    npy = io.BytesIO()
    np.save(npy, np.zeros(10))
    return [
        ("npz bomb 1 GiB of zeros", _npz(x=np.zeros(2**30, dtype=np.uint8))),
        ("npz bomb 8 columns x 128 MiB", _npz(**{f"c{i}": np.zeros(2**27, np.uint8)
                                                  for i in range(8)})),
        ("npz lying header 10^12 floats", _lying_npz((10**12,))),
        ("npz lying header 2-D 10^6 x 10^6", _lying_npz((10**6, 10**6))),
        ("bare .npy", npy.getvalue()),
        ("truncated zip", _npz(x=np.arange(100))[:50]),
    ]  # fmt: skip


def _fuzz_bodies(examples: int, predict: Any) -> dict[int, int]:
    """Hypothesis-built JSON bodies against every flow; counts by status. Raises
    AssertionError on a 5xx that is not 503/504."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=50),
    )  # fmt: skip

    def containers(inner: Any) -> Any:
        return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)

    values = st.recursive(scalars, containers, max_leaves=20)
    columns = st.sampled_from(["a", "b", "x", "user", "text", "", "é", "\x00"])
    rows = st.lists(st.dictionaries(columns, values, max_size=4), max_size=5)
    nested = st.integers(1, 3000).map(lambda d: '{"rows": [{"x": ' + "[" * d + "]" * d + "}]}")
    raw = st.one_of(
        rows.map(lambda r: ("json", {"rows": r})),
        st.dictionaries(columns, st.lists(values, max_size=4), max_size=3).map(
            lambda c: ("json", {"columns": c})),
        values.map(lambda v: ("json", v)),
        nested.map(lambda text: ("text", text)),
        st.sampled_from(['{"rows": [{"a": NaN, "b": 1}]}', '{"rows": [{"a": Infinity}]}',
                         '{"rows": [{"a": 1e999}]}', '{"rows": [{"user": "\\ud800", "text": ""}]}',
                         '{"rows": [', '\xff\xfe', '']).map(lambda t: ("text", t)),
        st.binary(max_size=200).map(lambda b: ("npz", b)),
    )  # fmt: skip
    statuses: dict[int, int] = {}

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(flow=st.sampled_from(["arith", "text", "tensor", "chain"]), body=raw)
    def probe(flow: str, body: tuple[str, Any]) -> None:
        status = predict(flow, *body)
        statuses[status] = statuses.get(status, 0) + 1
        assert status < 500 or status in (503, 504), f"{status} for {body!r:.200}"

    probe()
    return statuses


def run_fuzz(examples: int, schemathesis_examples: int) -> list[common.Record]:
    records = []
    with Server() as server, httpx.Client(headers=AUTH, timeout=30) as client:
        samples: list[tuple[float, float, float]] = []  # (t, server RSS MB, healthz ms)
        stop = threading.Event()
        started = time.perf_counter()

        def sample() -> None:
            probe = httpx.Client(base_url=server.url, timeout=30)  # one kept-alive connection
            while not stop.wait(0.1):
                t0 = time.perf_counter()
                with contextlib.suppress(httpx.HTTPError):
                    probe.get("/healthz")
                samples.append((t0 - started, _rss_mb(server.process.pid),
                                (time.perf_counter() - t0) * 1e3))  # fmt: skip
            probe.close()

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        rss_before = _rss_mb(server.process.pid)

        def predict(flow: str, kind: str, body: Any) -> int:
            url = _predict_url(server, flow)
            if kind == "json":
                return client.post(url, json=body).status_code
            media = "application/x-npz" if kind == "npz" else "application/json"
            content = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
            return client.post(url, content=content, headers={"Content-Type": media}).status_code

        for label, body in bombs():
            t0 = time.perf_counter()
            status = predict("tensor", "npz", body)
            took = (time.perf_counter() - t0) * 1e3
            records.append(common.record(f"fuzz: {label} ({len(body):,} B)", SYSTEM, [took],
                                         None, status=status))  # fmt: skip
        failure = ""
        try:
            statuses = _fuzz_bodies(examples, predict)
        except AssertionError as error:
            failure, statuses = str(error), {}
        stop.set()
        thread.join()
        health = [ms for _, _, ms in samples]
        records.append(common.record(
            "fuzz: hypothesis bodies", SYSTEM, None, None, examples=examples,
            statuses={str(k): v for k, v in sorted(statuses.items())}, failure=failure,
            rss_before_mb=rss_before, rss_max_mb=max((r for _, r, _ in samples), default=None),
            healthz_p99_ms=common.percentile(health, 99), healthz_max_ms=max(health, default=None),
        ))  # fmt: skip
        records.append(schemathesis(server, schemathesis_examples))
    return records


def schemathesis(server: Server, examples: int) -> common.Record:
    command = [str(Path(sys.executable).with_name("schemathesis")), "--config-file",
               str(SCHEMATHESIS_CONFIG), "run", f"{server.url}/openapi.json", "--checks", "all",
               "-H", f"Authorization: Bearer {TOKEN}", "--max-examples", str(examples),
               "--phases", "examples,coverage,fuzzing", "--no-color"]  # fmt: skip
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sf-schemathesis-") as cwd:  # its cache goes there
        out = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=cwd)
    lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    summary = next((line for line in reversed(lines) if " in " in line and "=" in line), "")
    cases = next((line for line in lines if "generated" in line), "")
    failures = [line for line in lines if line.startswith(("- ", "❌"))]
    return common.record("fuzz: schemathesis, every check", SYSTEM, None, None,
                         exit_code=out.returncode, summary=summary.strip("= "), cases=cases,
                         failures=failures[:20], seconds=time.perf_counter() - t0)  # fmt: skip


def fuzz_failures(records: list[common.Record]) -> list[str]:
    problems = []
    for r in records:
        if "status" in r and r["status"] not in (400, 413):
            problems.append(f"{r['scenario']}: answered {r['status']}")
        if r.get("failure"):
            problems.append(f"{r['scenario']}: {r['failure']}")
        if r.get("exit_code"):
            problems.append(f"{r['scenario']}: {r['summary']} {r['failures']}")
    return problems


# --- soak ---------------------------------------------------------------------------------


def run_soak(minutes: float, rate: float | None) -> list[common.Record]:
    seconds = minutes * 60
    with Server() as server:
        url = _predict_url(server, "chain")
        open_loop(url, 2.0, 8)
        if rate is None:
            capacity = _hey_record("soak: capacity", open_loop(url, 10.0, 16))
            rate = 0.5 * capacity["throughput_rps"]
        samples: list[dict[str, Any]] = []
        stop = threading.Event()
        started = time.perf_counter()

        def sample() -> None:
            while True:
                rss = server.rss_mb()
                t = time.perf_counter() - started
                samples.append({"t_s": t, "rss_mb": rss, "rss_total_mb": sum(rss.values()),
                                "shm_mb": server.shm_mb()})  # fmt: skip
                if stop.wait(5.0):
                    return

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        run = open_loop(url, seconds, 16, rate)  # Poisson arrivals, not lockstep bursts
        stop.set()
        thread.join()
    windows = []
    for start in range(0, int(seconds), 10):
        lats = [lat for t, lat, s in run["rows"] if start <= t < start + 10 and s == 200]
        windows.append({"t_s": start, "p99_ms": common.percentile(lats, 99), "n": len(lats)})
    record = _hey_record(f"soak: {minutes:g} min at {rate:.0f} req/s", run, rate_asked=rate)
    # flat: the last quarter against the second (the first warms caches and pools)
    quarter = max(1, len(samples) // 4)
    early, late = samples[quarter : 2 * quarter], samples[-quarter:]

    def mean(rows: list[dict[str, Any]], key: str) -> float:
        return sum(r[key] for r in rows) / len(rows) if rows else float("nan")

    # per process (the pool may grow or retire a worker meanwhile): late vs early
    growth = {}
    for key in set(early[0]["rss_mb"]) & set(late[-1]["rss_mb"]) if early and late else ():
        before = [r["rss_mb"][key] for r in early if key in r["rss_mb"]]
        after = [r["rss_mb"][key] for r in late if key in r["rss_mb"]]
        growth[key] = common.ratio(sum(after) / len(after), sum(before) / len(before))
    record.update(
        rss_growth_by_process=growth,
        rss_growth_max=max((g for g in growth.values() if g is not None), default=None),
        rss_early_mb=mean(early, "rss_total_mb"), rss_late_mb=mean(late, "rss_total_mb"),
        shm_early_mb=mean(early, "shm_mb"), shm_late_mb=mean(late, "shm_mb"),
        rss_growth=common.ratio(mean(late, "rss_total_mb"), mean(early, "rss_total_mb")),
        samples=samples, windows=windows,
    )  # fmt: skip
    return [record]


def soak_failures(records: list[common.Record]) -> list[str]:
    r = records[-1]
    problems = []
    if (r["rss_growth_max"] or 0) > 1.05:
        problems.append(f"a process's memory grew {r['rss_growth_max']:.3f}x over the soak")
    if r["shm_late_mb"] > r["shm_early_mb"] * 1.05 + 1.0:
        problems.append(f"/dev/shm grew {r['shm_early_mb']:.1f} -> {r['shm_late_mb']:.1f} MB")
    if r["other_statuses"] or r["refused_rps"]:
        problems.append("requests failed during the soak")
    return problems


# --- main -----------------------------------------------------------------------------------


def plot(records: list[common.Record], out: Path) -> None:
    fig, axes = common.new_figure(1, 2, size=(13, 4.5))
    soak = next((r for r in records if r["scenario"].startswith("soak: ") and "samples" in r), None)
    left, right = axes[0]
    if soak is not None:
        minutes = [s["t_s"] / 60 for s in soak["samples"]]
        left.plot(minutes, [s["rss_total_mb"] for s in soak["samples"]], label="RSS, all processes")
        left.plot(minutes, [s["shm_mb"] for s in soak["samples"]], label="/dev/shm run dir")
        left.set(xlabel="minutes", ylabel="MB", title=soak["scenario"])
        twin = left.twinx()
        twin.plot([w["t_s"] / 60 for w in soak["windows"]],
                  [w["p99_ms"] for w in soak["windows"]], "r.", label="p99 per 10 s")  # fmt: skip
        twin.set_ylabel("p99 ms")
        left.legend(loc="upper left")
        twin.legend(loc="upper right")
    bars = [r for r in records
            if r["scenario"].startswith("chaos") or ": sustainable" in r["scenario"]
            or ": overload" in r["scenario"]]  # fmt: skip
    right.barh([r["scenario"] for r in bars], [r["throughput_rps"] or 0 for r in bars])
    right.set(xlabel="answered req/s (200)", title="throughput under faults and overload")
    common.save_figure(fig, NAME, out)


def main(argv: list[str] | None = None) -> int:
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--parts", default=None,
                            help="comma-separated: chaos,overload,fuzz,soak,curve (default: "
                                 "all but curve; --quick: nor soak)")  # fmt: skip
        parser.add_argument("--seconds", type=float, default=None, help="per measured phase")
        parser.add_argument("--minutes", type=float, default=30.0, help="soak length")
        parser.add_argument("--soak-rate", type=float, default=None,
                            help="soak req/s (default: half the measured capacity)")  # fmt: skip
        parser.add_argument("--max-in-flight", default="32,8",
                            help="overload: the bounds to try, comma-separated (default "
                                 "32,8: 16 and 4 per worker)")  # fmt: skip
        parser.add_argument("--flows", default="work,wait",
                            help="overload: the flows flooded (default work,wait: 1 ms of "
                                 "CPU, 2 ms asleep per request)")  # fmt: skip
        parser.add_argument("--connections", default="1,2,3,4,6,8,12,16,32",
                            help="curve: the closed loops' sizes, the deepest last")  # fmt: skip
        parser.add_argument("--compare-fixed", action="store_true",
                            help="overload: each bound also with --fixed-in-flight")  # fmt: skip

    args = common.parse_args(__doc__.split("\n")[0], argv, configure)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per fuzzed request
    default_parts = "chaos,overload,fuzz" if args.quick else "chaos,overload,fuzz,soak"
    parts = (args.parts or default_parts).split(",")
    seconds = args.seconds or (6.0 if args.quick else 20.0)
    if {"overload", "soak"} & set(parts) and shutil.which("wrk") is None:
        print("`wrk` is missing: bash scripts/reliability_tools.sh", file=sys.stderr)
        return 2
    records: list[common.Record] = []
    problems: list[str] = []
    if "chaos" in parts:
        got = run_chaos(seconds, kill_every=2.0 if args.quick else 5.0,
                        stop_s=5.0 if args.quick else 20.0)  # fmt: skip
        records += got
        problems += chaos_failures(got)
    if "overload" in parts:
        for flow, bound in itertools.product(args.flows.split(","), args.max_in_flight.split(",")):
            for fixed in (False, True) if args.compare_fixed else (False,):
                got = run_overload(seconds, int(bound), flow=flow, fixed=fixed)
                add_ceiling(got, refusal_floor(seconds / OVERLOAD_ROUNDS, got[-1]["offered_rps"]))
                records += got
                if not fixed:  # the fixed bound is the reference, not a promise
                    problems += overload_failures(got)
    if "curve" in parts:
        for flow in args.flows.split(","):
            depths = [int(depth) for depth in args.connections.split(",")]
            records += run_curve(seconds, flow, depths)
    if "fuzz" in parts:
        got = run_fuzz(examples=150 if args.quick else 1000,
                       schemathesis_examples=20 if args.quick else 200)  # fmt: skip
        records += got
        problems += fuzz_failures(got)
    if "soak" in parts:
        got = run_soak(args.minutes, args.soak_rate)
        records += got
        problems += soak_failures(got)
    common.print_table(records, ("scenario", "median_ms", "p99_ms", "throughput_rps", "errors",
                                 "goodput_ratio", "goodput_ceiling", "p99_ratio_vs_unloaded",
                                 "status"))  # fmt: skip
    common.write_json(NAME, records, args.out)
    plot(records, args.out)
    for problem in problems:
        print(f"FAILED: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
