"""HTTP load generators that run outside the servers' interpreters.

- `open_loop_in_process(url, bodies, rate, seconds)`: Poisson arrivals at `rate` req/s
  (seeded), each request sent on schedule whether or not earlier ones answered, from a
  spawned process (asyncio + aiohttp). Latency counts from the scheduled arrival, so a
  generator or server falling behind shows as latency, not as a lower offered load.
- `wrk(url, bodies, connections, seconds)`: Debian's wrk (C, closed loop) for
  saturation throughput, cycling through the same bodies with a Lua script; installed
  by scripts/wrk.sh.

A body is (bytes, content type); requests cycle through the bodies in order.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import re
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

Body = tuple[bytes, str]
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Outcome:
    latencies_ms: list[float]  # of 200 answers
    errors: int  # other statuses, timeouts, refused connections
    offered_rps: float  # arrivals actually sent per second
    seconds: float


async def open_loop(
    url: str, bodies: list[Body], rate: float, seconds: float, seed: int = 0
) -> Outcome:
    import aiohttp
    import numpy as np

    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=int(rate * seconds * 2) + 16)
    arrivals = np.cumsum(gaps)
    arrivals = arrivals[arrivals < seconds]
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=512)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(i: int, due: float) -> None:
            nonlocal errors
            body, content_type = bodies[i % len(bodies)]
            try:
                headers = {"Content-Type": content_type}
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    ok = response.status == 200
            except (TimeoutError, aiohttp.ClientError):
                ok = False
            if ok:
                latencies.append((time.perf_counter() - due) * 1e3)
            else:
                errors += 1

        start = time.perf_counter()
        tasks = []
        for i, at in enumerate(arrivals):
            due = start + float(at)
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, due)))
        sent_for = time.perf_counter() - start
        await asyncio.gather(*tasks)
    return Outcome(latencies, errors, len(arrivals) / max(sent_for, 1e-9), sent_for)


def _run_open_loop(url: str, bodies: list[Body], rate: float, seconds: float, seed: int) -> Outcome:
    return asyncio.run(open_loop(url, bodies, rate, seconds, seed))


def open_loop_in_process(
    url: str, bodies: list[Body], rate: float, seconds: float, seed: int = 0
) -> Outcome:
    """`open_loop` in a fresh (spawned) process."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_run_open_loop, url, bodies, rate, seconds, seed).result(
            timeout=seconds + 180
        )


WRK_SCRIPT = """
local bodies = {}
local counter = 0
init = function(args)
  local n = tonumber(args[2])
  for i = 0, n - 1 do
    local f = assert(io.open(args[1] .. "/" .. i .. ".body", "rb"))
    bodies[i + 1] = f:read("*all")
    f:close()
  end
  content_type = args[3]
end
request = function()
  counter = counter + 1
  return wrk.format("POST", nil, {["Content-Type"] = content_type}, bodies[counter % #bodies + 1])
end
"""


@dataclass
class WrkResult:
    throughput_rps: float
    median_ms: float
    p99_ms: float
    requests: int
    errors: int


def ensure_wrk() -> str:
    """The wrk binary, installed by scripts/wrk.sh when missing."""
    found = shutil.which("wrk")
    if found is None:
        subprocess.run(["bash", str(REPO / "scripts" / "wrk.sh")], check=True, timeout=600)
        found = shutil.which("wrk")
    if found is None:
        raise RuntimeError("wrk not found after scripts/wrk.sh")
    return found


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def parse_wrk(output: str) -> WrkResult:
    """Throughput of 2xx answers, p50 and p99 from `wrk --latency` output."""
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", output, re.M))
    if set(percentiles) != {"50", "99"}:
        raise RuntimeError(f"wrk printed no latency distribution:\n{output}")
    requests = int(re.search(r"(\d+) requests in ([\d.]+)(\w+)", output).group(1))  # type: ignore[union-attr]
    elapsed_match = re.search(r"requests in ([\d.]+\w+)", output)
    elapsed_s = _ms(elapsed_match.group(1)) / 1e3 if elapsed_match else float("nan")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    errors = int(non2xx.group(1)) if non2xx else 0
    errors += sum(int(n) for n in socket.groups()) if socket else 0
    return WrkResult(
        throughput_rps=(requests - errors) / elapsed_s,
        median_ms=_ms(percentiles["50"]),
        p99_ms=_ms(percentiles["99"]),
        requests=requests,
        errors=errors,
    )


def wrk(url: str, bodies: list[Body], connections: int, seconds: float) -> WrkResult:
    """wrk with one thread and `connections` connections for `seconds` (closed loop)."""
    binary = ensure_wrk()
    content_types = {content_type for _, content_type in bodies}
    if len(content_types) != 1:
        raise ValueError(f"wrk: one content type per run, got {content_types}")
    with tempfile.TemporaryDirectory(prefix="sf-wrk-") as folder:
        for i, (body, _) in enumerate(bodies):
            (Path(folder) / f"{i}.body").write_bytes(body)
        script = Path(folder) / "bodies.lua"
        script.write_text(WRK_SCRIPT)
        command = [binary, "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency",
                   "--timeout", "30s", "-s", str(script), url, "--",
                   folder, str(len(bodies)), content_types.pop()]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return parse_wrk(done.stdout)
