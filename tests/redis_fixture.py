"""A real `redis-server` for the tests: one per session, on a free loopback port.

Import the fixtures into a test module (`from redis_fixture import redis_url`).
`scripts/redis.sh` installs the server binary when it is missing.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(workdir: str) -> tuple[subprocess.Popen[bytes], int]:
    """Start `redis-server` on a free loopback port, without persistence, and wait
    until it answers PING. Returns the process and its port; the caller stops it."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not on PATH: run `bash scripts/redis.sh` first")
    for _attempt in range(3):  # the free port can be taken between probe and bind
        port = _free_port()
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                workdir,
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            if _answers_ping(port):
                logger.info("redis-server pid %d on port %d", proc.pid, port)
                return proc, port
            time.sleep(0.02)
        stop_redis(proc)
    pytest.fail("redis-server did not start (3 attempts)")


def stop_redis(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL, "redis://127.0.0.1:PORT", of a redis-server living for the session."""
    proc, port = start_redis(str(tmp_path_factory.mktemp("redis")))
    try:
        yield f"redis://127.0.0.1:{port}"
    finally:
        stop_redis(proc)


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """The URL of database 0 on the session's server, emptied for this test."""
    import redis

    client = redis.Redis.from_url(f"{redis_server}/0")
    try:
        client.flushdb()
    finally:
        client.close()
    return f"{redis_server}/0"
