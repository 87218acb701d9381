"""Triton Inference Server peer (through nvidia-pytriton), driven from this process.

Triton and its Python client live in benchmarks/.triton-venv (Python 3.12; made by
scripts/triton_env.sh) because nvidia-pytriton pins numpy<2 and its server needs
libpython3.12. `TritonPeer()` starts benchmarks/peers/triton_worker.py there as a
subprocess (LD_LIBRARY_PATH set to that Python's lib), which serves one identity model
on CPU and measures it over gRPC on our commands, so its rounds can be interleaved with
serveflow's. Raises `TritonUnavailable` with the reason when it cannot start.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
VENV_PYTHON = REPO / "benchmarks" / ".triton-venv" / "bin" / "python"


class TritonUnavailable(RuntimeError):
    """Triton could not be started here; the message says why."""


def _python_lib_dir(python: Path) -> Path | None:
    """The `lib` folder of the interpreter a venv was made from (holds libpython3.12)."""
    cfg = python.parent.parent / "pyvenv.cfg"
    if not cfg.exists():
        return None
    for line in cfg.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "home":
            return Path(value.strip()).parent / "lib"
    return None


class TritonPeer:
    """One identity model on a Triton server in a subprocess; measured on request."""

    def __init__(self, start_timeout_s: float = 120.0) -> None:
        if not VENV_PYTHON.exists():
            raise TritonUnavailable(
                f"{VENV_PYTHON} missing: run `bash scripts/triton_env.sh` first"
            )
        env = dict(os.environ)
        lib = _python_lib_dir(VENV_PYTHON)
        if lib is not None:
            env["LD_LIBRARY_PATH"] = (
                f"{lib}:{env['LD_LIBRARY_PATH']}" if env.get("LD_LIBRARY_PATH") else str(lib)
            )
        env.pop("PYTHONPATH", None)
        # Server logs go to a file: a pipe nobody reads could fill and stall the worker.
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed in close())
            mode="w+", prefix="serveflow-triton-", suffix=".log", delete=False
        )
        self._proc = subprocess.Popen(
            [str(VENV_PYTHON), "-m", "benchmarks.peers.triton_worker"],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
        )
        try:
            ready = self._read(start_timeout_s)
        except BaseException:
            self.close()
            raise
        log.info("triton ready on grpc port %s", ready.get("grpc_port"))

    def _log_tail(self, lines: int = 40) -> str:
        with open(self._log.name, errors="replace") as f:
            return "\n".join(deque(f, maxlen=lines)).rstrip()

    def _read(self, timeout_s: float) -> dict[str, Any]:
        assert self._proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            readable = select.select([self._proc.stdout], [], [], 0.5)[0]
            if readable:
                line = self._proc.stdout.readline()
                if line.startswith("{"):
                    return json.loads(line)
                if line:
                    log.debug("triton worker stdout: %s", line.rstrip())
            if self._proc.poll() is not None:
                tail = self._log_tail()
                raise TritonUnavailable(
                    f"triton worker exited with code {self._proc.returncode}:\n{tail}"
                )
        raise TritonUnavailable(f"triton worker gave no answer in {timeout_s:.0f} s")

    def _ask(self, command: dict[str, Any], timeout_s: float = 180.0) -> dict[str, Any]:
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(command) + "\n")
        self._proc.stdin.flush()
        reply = self._read(timeout_s)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def sequential(self, n: int, size: int) -> list[float]:
        """Latencies (ms) of `n` back-to-back requests carrying `size` bytes."""
        return list(self._ask({"cmd": "seq", "n": n, "size": size})["latencies_ms"])

    def closed_loop(self, total: int, in_flight: int, size: int) -> dict[str, Any]:
        """{"throughput_rps", "latencies_ms", "failures"} with `in_flight` outstanding."""
        return self._ask({"cmd": "loop", "total": total, "in_flight": in_flight, "size": size})

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self._proc.stdin.flush()
                self._proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                log.warning("triton worker did not stop; terminating it")
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(timeout=10)
        for stream in (self._proc.stdin, self._proc.stdout):
            if stream is not None:
                stream.close()
        self._log.close()
        os.unlink(self._log.name)

    def __enter__(self) -> TritonPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
