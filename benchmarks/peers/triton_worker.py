"""Runs inside benchmarks/.triton-venv (Python 3.12, nvidia-pytriton): serves one
identity Python model on a Triton Inference Server (CPU) and measures it over gRPC
with tritonclient, on commands from the parent benchmark (benchmarks/peers/triton.py).

Protocol, one JSON object per line: the worker prints {"ready": true, ...} once the
server answers, then for each command read on stdin prints one reply:
  {"cmd": "seq", "n": N, "size": BYTES}              -> {"latencies_ms": [...]}
  {"cmd": "loop", "total": N, "in_flight": K, "size"} -> {"throughput_rps": x,
                                                          "latencies_ms": [...], "failures": f}
  {"cmd": "quit"}                                      -> server stopped, process exits
Logs go to stderr; stdout carries only the protocol.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from concurrent.futures import Future
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from pytriton.decorators import batch
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

log = logging.getLogger("triton_worker")

MODEL = "identity"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@batch
def _identity(data: np.ndarray) -> dict[str, np.ndarray]:
    return {"out": data}


_protocol = sys.stdout  # replaced in main() by a private copy of the original stdout


def _reply(obj: dict[str, Any]) -> None:
    _protocol.write(json.dumps(obj) + "\n")
    _protocol.flush()


class Client:
    def __init__(self, url: str) -> None:
        self.client = grpcclient.InferenceServerClient(url)
        self.output = [grpcclient.InferRequestedOutput("out")]

    def _inputs(self, size: int) -> list[Any]:
        data = np.zeros((1, size), dtype=np.uint8)
        tensor = grpcclient.InferInput("data", list(data.shape), "UINT8")
        tensor.set_data_from_numpy(data)
        return [tensor]

    def call(self, size: int) -> None:
        result = self.client.infer(MODEL, self._inputs(size), outputs=self.output)
        assert result.as_numpy("out").shape == (1, size)

    def submit(self, size: int) -> Future[Any]:
        future: Future[Any] = Future()

        def done(result: Any, error: Any) -> None:
            if error is not None:
                future.set_exception(RuntimeError(str(error)))
            else:
                future.set_result(result)

        self.client.async_infer(MODEL, self._inputs(size), done, outputs=self.output)
        return future


def sequential(client: Client, n: int, size: int) -> list[float]:
    latencies = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.call(size)
        latencies.append((time.perf_counter() - t0) * 1e3)
    return latencies


def closed_loop(client: Client, total: int, in_flight: int, size: int) -> dict[str, Any]:
    slots = threading.Semaphore(in_flight)
    lock = threading.Lock()
    finished = threading.Event()
    latencies: list[float] = []
    failures = [0]
    count = [0]

    def on_done(t0: float, future: Future[Any]) -> None:
        with lock:
            if future.exception() is None:
                latencies.append((time.perf_counter() - t0) * 1e3)
            else:
                failures[0] += 1
            count[0] += 1
            if count[0] >= total:
                finished.set()
        slots.release()

    start = time.perf_counter()
    deadline = start + 120
    for _ in range(total):
        if not slots.acquire(timeout=max(0.0, deadline - time.perf_counter())):
            break
        t0 = time.perf_counter()
        client.submit(size).add_done_callback(lambda f, t0=t0: on_done(t0, f))
    finished.wait(timeout=max(0.0, deadline - time.perf_counter()))
    elapsed = time.perf_counter() - start
    with lock:
        return {
            "throughput_rps": len(latencies) / elapsed,
            "latencies_ms": list(latencies),
            "failures": failures[0],
        }


def main() -> None:
    global _protocol
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    # tritonserver (a child) inherits fd 1 and logs there: keep the protocol on a
    # private duplicate of stdout and point fd 1 at stderr.
    _protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    grpc_port = _free_port()
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=_free_port(),
        grpc_address="127.0.0.1",
        grpc_port=grpc_port,
        metrics_address="127.0.0.1",
        metrics_port=_free_port(),
        allow_gpu_metrics=False,
        exit_timeout_secs=5,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name=MODEL,
            infer_func=_identity,
            inputs=[Tensor(name="data", dtype=np.uint8, shape=(-1,))],
            outputs=[Tensor(name="out", dtype=np.uint8, shape=(-1,))],
            config=ModelConfig(max_batch_size=64),
        )
        triton.run()  # serves in the background; the client runs in this process
        client = Client(f"127.0.0.1:{grpc_port}")
        client.call(16)
        _reply({"ready": True, "grpc_port": grpc_port})
        for line in sys.stdin:
            command = json.loads(line)
            if command["cmd"] == "quit":
                break
            if command["cmd"] == "seq":
                _reply({"latencies_ms": sequential(client, command["n"], command["size"])})
            elif command["cmd"] == "loop":
                _reply(closed_loop(client, command["total"], command["in_flight"], command["size"]))
            else:
                _reply({"error": f"unknown command {command!r}"})
        client.client.close()


if __name__ == "__main__":
    main()
