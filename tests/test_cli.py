"""The `serveflow` command: help, explain, loading flows, serving and SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import httpx
import pytest

import serveflow as sf
from serveflow.serving.cli import main
from serveflow.serving.loader import load_flows

FLOWS = textwrap.dedent(
    """
    import time
    import serveflow as sf

    adder = sf.Flow("adder", schema={"a": int})
    adder.map(lambda r: r["a"] + 1, names=["b"], name="inc")

    sleeper = sf.Flow("sleeper")
    sleeper.map(lambda r: time.sleep(r["s"]) or "done", names=["status"], name="nap")

    def build_flow():
        flow = sf.Flow("built")
        flow.map(lambda r: r["x"] * 2, names=["y"], name="double")
        return flow
    """
)


@pytest.fixture
def flows_file(tmp_path: Path) -> Path:
    path = tmp_path / "myflows.py"
    path.write_text(FLOWS)
    return path


def test_help_documents_commands_and_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ("serve", "explain", "/v1/flows/NAME/predict", "/metrics", "X-Request-Timeout-Ms"):
        assert word in text, word
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    for option in ("--host", "--port", "--workers", "--token", "--debug", "SERVEFLOW_TOKEN"):
        assert option in text, option


def test_the_installed_script_runs():
    script = Path(sys.executable).parent / "serveflow"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"serveflow {sf.__version__}"


def test_explain_prints_every_optimized_plan(flows_file, capsys):
    assert main(["explain", str(flows_file)]) == 0
    out = capsys.readouterr().out
    flows = load_flows(str(flows_file))
    assert [f.name for f in flows] == ["adder", "sleeper"]
    assert out.strip() == "\n\n".join(sf.optimize(f).explain() for f in flows)


def test_explain_picks_a_flow_or_factory_by_name(flows_file, capsys):
    assert main(["explain", f"{flows_file}:build_flow", "--rules", "fusion=off"]) == 0
    out = capsys.readouterr().out
    assert "plan for flow 'built'" in out and "fusion off" in out
    assert main(["explain", f"{flows_file}:adder"]) == 0
    out = capsys.readouterr().out
    assert "'adder'" in out and "'sleeper'" not in out


def test_load_errors_exit_2_with_a_message(tmp_path, flows_file, capsys):
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    assert main(["explain", str(empty)]) == 2
    assert "defines no module-level sf.Flow" in capsys.readouterr().err
    assert main(["explain", str(tmp_path / "missing.py")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["explain", f"{flows_file}:nothing"]) == 2
    assert "defines no 'nothing'" in capsys.readouterr().err
    assert main(["explain", f"{flows_file}:time"]) == 2
    assert "not a sf.Flow" in capsys.readouterr().err
    assert main(["explain", str(flows_file), "--rules", "speed=max"]) == 2
    assert "--rules" in capsys.readouterr().err
    for option, value in (("--body-timeout", "0"), ("--max-string-chars", "-1")):
        assert main(["serve", str(flows_file), option, value]) == 2
        assert f"{option} must be a positive" in capsys.readouterr().err


def _start(flows_file: Path, *args: str, env: dict[str, str] | None = None):
    command = [sys.executable, "-m", "serveflow.serving.cli", "serve", str(flows_file),
               "--port", "0", "--log-level", "warning", *args]  # fmt: skip
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    line = process.stdout.readline()  # "serveflow: serving ... on http://127.0.0.1:PORT (...)"
    if " on http://" not in line:
        process.kill()
        raise AssertionError(f"no URL printed: {line!r} {process.stderr.read()}")
    url = line.split(" on ")[1].split()[0]
    return process, url


def _wait_ready(url: str, headers: dict[str, str] | None = None) -> None:
    for _ in range(300):
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        threading.Event().wait(0.05)
    raise AssertionError("server never became ready")


def _slow_request_in_flight(url: str, seconds: float, results: list) -> threading.Thread:
    """Send a request to the `sleeper` flow from a thread (its response goes to
    `results`) and return once the server counts it in flight."""
    slow = threading.Thread(
        target=lambda: results.append(
            httpx.post(
                f"{url}/v1/flows/sleeper/predict",
                json={"rows": [{"s": seconds}]},
                timeout=seconds + 15,
            )
        )
    )
    slow.start()
    for _ in range(200):
        metrics = httpx.get(f"{url}/metrics", timeout=5).text
        if 'serveflow_requests_in_flight{flow="sleeper"} 1.0' in metrics:
            break
        threading.Event().wait(0.02)
    return slow


def test_serve_answers_then_drains_on_sigterm(flows_file):
    process, url = _start(flows_file)
    try:
        _wait_ready(url)
        r = httpx.post(f"{url}/v1/flows/adder/predict", json={"rows": [{"a": 41}]}, timeout=10)
        assert r.status_code == 200 and r.json() == {"rows": [{"b": 42}]}

        results: list[httpx.Response] = []
        slow = _slow_request_in_flight(url, 1.0, results)
        process.send_signal(signal.SIGTERM)
        slow.join(15)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert results and results[0].status_code == 200, err
    assert results[0].json() == {"rows": [{"status": "done"}]}
    assert process.returncode == 0, err
    assert "stopped" in out


def test_serve_reads_the_token_from_the_environment(flows_file):
    process, url = _start(flows_file, env={"SERVEFLOW_TOKEN": "t0k"})
    try:
        _wait_ready(url)
        body = {"rows": [{"a": 1}]}
        assert httpx.post(f"{url}/v1/flows/adder/predict", json=body, timeout=10).status_code == 401
        ok = httpx.post(
            f"{url}/v1/flows/adder/predict",
            json=body,
            headers={"Authorization": "Bearer t0k"},
            timeout=10,
        )
        assert ok.status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_the_example_pipeline_loads_from_the_cli(capsys):
    example = Path(__file__).parent.parent / "examples" / "comments.py"
    assert main(["explain", f"{example}:build_flow"]) == 0
    from examples.comments import build_flow

    assert capsys.readouterr().out.strip() == sf.optimize(build_flow()).explain()


def test_readyz_turns_503_while_draining(flows_file):
    """SIGTERM with a slow request in flight: during --shutdown-delay /readyz answers 503
    while the server still serves; then the request finishes and the process exits."""
    process, url = _start(flows_file, "--shutdown-delay", "1.5")
    readiness: list[int | str] = []
    stop_polling = threading.Event()

    def poll() -> None:  # fresh connections, as a load balancer's health checks
        while not stop_polling.is_set() and len(readiness) < 2000:
            try:
                readiness.append(httpx.get(f"{url}/readyz", timeout=2).status_code)
            except httpx.TransportError:
                readiness.append("closed")
            stop_polling.wait(0.02)

    try:
        _wait_ready(url)
        results: list[httpx.Response] = []
        slow = _slow_request_in_flight(url, 2.5, results)
        poller = threading.Thread(target=poll)
        poller.start()
        process.send_signal(signal.SIGTERM)
        slow.join(20)
        stop_polling.set()
        poller.join(10)
        out, err = process.communicate(timeout=30)
    finally:
        stop_polling.set()
        if process.poll() is None:
            process.kill()
            process.wait()
    assert 503 in readiness, readiness[:20]
    first_503 = readiness.index(503)
    assert 200 not in readiness[first_503:], readiness  # never ready again once draining
    assert results and results[0].status_code == 200, err
    assert results[0].json() == {"rows": [{"status": "done"}]}
    assert process.returncode == 0, err
    assert "stopped" in out
