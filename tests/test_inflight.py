"""The adaptive in-flight bound, on a simulated service and on a real server."""

from __future__ import annotations

import asyncio
import heapq
import random
import statistics
import time

import httpx
import pytest

import serveflow as sf
from serveflow.serving import Server
from serveflow.serving.inflight import PROBE_EVERY_S, InFlightLimit


class Service:
    """`slots` requests served at once, `service_s` each, the rest queued in order;
    time is simulated. A flood keeps the bound full."""

    def __init__(self, slots: int, service_s: float, ceiling: int, adaptive: bool = True):
        self.now = 0.0
        self.slots, self.service_s = slots, service_s
        self.bound = InFlightLimit(ceiling, adaptive, clock=lambda: self.now)
        self.free_at = [0.0] * slots  # when each slot is next free
        self.ends: list[tuple[float, int, tuple[float, int]]] = []
        self.latencies: list[tuple[float, float]] = []  # (finished at, latency)
        self.count = 0

    def flood(self, seconds: float, rate: float | None = None) -> float:
        """Offer a request every 0.1 ms, or Poisson arrivals at `rate`, for `seconds`;
        the share refused."""
        rng = random.Random(1)
        until = self.now + seconds
        offered = refused = 0
        while self.now < until:
            while self.ends and self.ends[0][0] <= self.now:
                end, _, admission = heapq.heappop(self.ends)
                self.bound.release(admission)
                self.latencies.append((end, end - admission[0]))
            admission = self.bound.admit()
            offered += 1
            refused += admission is None
            if admission is not None:
                slot = min(range(self.slots), key=self.free_at.__getitem__)
                end = max(self.now, self.free_at[slot]) + self.service_s
                self.free_at[slot] = end
                self.count += 1
                heapq.heappush(self.ends, (end, self.count, admission))
            self.now += 1e-4 if rate is None else rng.expovariate(rate)
        return refused / offered

    def since(self, t: float) -> tuple[float, float]:
        """(median latency, answers per second) of requests finished after `t`."""
        recent = [lat for end, lat in self.latencies if end > t]
        return statistics.median(recent), len(recent) / (self.now - t)


def test_a_fixed_bound_admits_exactly_its_ceiling():
    bound = InFlightLimit(3, adaptive=False)
    admissions = [bound.admit() for _ in range(5)]
    assert [a is not None for a in admissions] == [True, True, True, False, False]
    bound.release(admissions[0])
    assert bound.admit() is not None and bound.admit() is None


@pytest.mark.parametrize("slots,service_ms", [(2, 1.0), (4, 5.0), (8, 20.0)])
def test_under_a_flood_the_bound_settles_where_requests_barely_queue(slots, service_ms):
    service = Service(slots, service_ms / 1000, ceiling=64)
    service.flood(5.0)
    median, throughput = service.since(2.0)
    capacity = slots / (service_ms / 1000)
    assert median <= 3.0 * service_ms / 1000  # a fixed bound of 64 waits 64 / slots times
    assert throughput >= 0.9 * capacity  # the workers stay busy
    fixed = Service(slots, service_ms / 1000, ceiling=64, adaptive=False)
    fixed.flood(2.0)
    assert fixed.since(1.0)[0] >= 6 * service_ms / 1000  # the case the bound is for


def test_the_bound_follows_a_service_that_slows_down_and_recovers():
    service = Service(4, 0.002, ceiling=64)
    service.flood(3.0)
    service.service_s = 0.010  # a slower model: latency rises; queued or not, unknown
    service.flood(PROBE_EVERY_S + 3.0)  # a probe measures the unqueued latency again
    median, throughput = service.since(service.now - 2.0)
    assert median <= 3.0 * 0.010 and throughput >= 0.85 * 4 / 0.010
    service.flood(0.5, rate=100)  # the flood's last admitted requests finish
    assert service.flood(5.0, rate=100) == 0  # light load: the bound is no hindrance


@pytest.mark.parametrize("slots,service_ms", [(2, 1.0), (4, 5.0)])
def test_a_flood_after_light_load_meets_a_bound_near_what_the_load_used(slots, service_ms):
    # Light load queues nothing, so the latency never told the bound to shrink: grown to
    # its ceiling, it let the first tenths of a second of a flood queue 64 deep.
    service = Service(slots, service_ms / 1000, ceiling=64)
    service.flood(5.0, rate=0.3 * slots / (service_ms / 1000))
    onset = service.now
    service.flood(1.0)
    latencies = sorted(lat for end, lat in service.latencies if end - lat >= onset)
    assert latencies[int(0.99 * len(latencies))] <= 8 * service_ms / 1000


@pytest.mark.parametrize("slots,service_ms", [(1, 10.0), (2, 2.0), (8, 20.0)])
def test_moderate_load_is_not_refused(slots, service_ms):
    capacity = slots / (service_ms / 1000)
    service = Service(slots, service_ms / 1000, ceiling=32)
    assert service.flood(20.0, rate=0.5 * capacity) == 0
    assert service.flood(20.0, rate=0.7 * capacity) < 0.01  # bursts queue, a little


def sleepy(x):
    time.sleep(0.02)
    return x


def _flood(adaptive: bool, clients: int) -> tuple[float, int]:
    """`clients` polite clients (their own connection each) keep sending for 3 s to
    one 20 ms worker behind `max_in_flight=16`: the median latency of the answered
    and how many were refused."""
    flow = sf.Flow("sleepy", schema={"x": int})
    flow.map(sleepy, col="x", name="nap")
    runtime = sf.LocalRuntime(min_workers=1, max_workers=1)
    app = flow.deploy(runtime=runtime)
    latencies: list[float] = []
    refused = 0

    async def client(url: str, until: float) -> None:
        nonlocal refused
        async with httpx.AsyncClient(timeout=10) as http:
            while time.monotonic() < until:
                started = time.monotonic()
                r = await http.post(url, json={"rows": [{"x": 1}]})
                if r.status_code == 200:
                    latencies.append(time.monotonic() - started)
                else:
                    assert r.status_code == 503 and "Retry-After" in r.headers
                    refused += 1
                    await asyncio.sleep(0.05)  # a polite client backs off

    async def flood(url: str) -> None:
        nonlocal refused
        await client(url, time.monotonic() + 1.0)  # warm: the bound learns the service
        latencies.clear()
        refused = 0
        until = time.monotonic() + 3.0
        await asyncio.gather(*(client(url, until) for _ in range(clients)))

    try:
        with Server(
            {"sleepy": app}, port=0, max_in_flight=16, coalesce=False, adaptive_in_flight=adaptive
        ) as srv:
            asyncio.run(flood(f"{srv.url}/v1/flows/sleepy/predict"))
    finally:
        runtime.stop()
    return statistics.median(latencies), refused


def test_a_flood_is_refused_rather_than_queued_inside_the_server():
    (adaptive, _), (fixed, _) = _flood(True, clients=32), _flood(False, clients=32)
    # one worker at 20 ms a request: the fixed bound keeps 16 admitted, each waiting
    # ~320 ms; the adaptive one admits two or three
    assert adaptive < 0.5 * fixed, (adaptive, fixed)


def test_clients_the_ceiling_can_hold_are_never_refused():
    """A closed loop of at most `max_in_flight` connections (a load test) queues as
    under a fixed bound: refused, each client would only send again at once."""
    median, refused = _flood(True, clients=12)
    assert refused == 0
    assert median > 0.1  # they wait behind each other: ~12 x 20 ms
