"""The dashboard in a real headless Chromium (Debian's chromium + chromium-driver,
installed by scripts/browser.sh): the plan graph renders and the numbers move under load."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

import serveflow as sf
from serveflow.serving import Server

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
TOKEN = "dash-token"

# CI installs the browser (scripts/test.sh runs scripts/browser.sh): never skip there.
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER) and not os.environ.get("CI"),
    reason="no chromium/chromedriver: run scripts/browser.sh",
)


def score(texts: list[str]) -> list[float]:
    return [0.5 + 0.01 * len(t) for t in texts]


def pipeline() -> sf.Flow:
    flow = sf.Flow("triage", schema={"text": str})
    clean = flow.map(lambda t: t.strip().lower(), col="text", name="clean")
    scored = clean.map(score, col="text", names=["score"], batching=True, name="score")
    length = clean.map(lambda r: len(r["text"]), names=["chars"], name="length", high_variance=True)
    scored.join(length).filter(lambda r: r["score"] > 0, name="keep")
    return flow


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="serveflow-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--window-size=1500,1000", f"--user-data-dir={profile}",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(predicate, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_dashboard_draws_the_plan_and_updates_under_load(browser):
    rules = sf.Rules(compete=True, compete_replicas=1)
    app = pipeline().deploy(rules=rules)
    plan = app.plan
    stop_load = threading.Event()
    with Server({"triage": app}, port=0, token=TOKEN) as server:
        browser.get(f"{server.url}/#token={TOKEN}")
        wait_for(lambda: browser.execute_script("return document.body.dataset.ready"), "page")
        stages = browser.find_elements("css selector", "g.stage")
        assert sorted(s.get_attribute("data-stage") for s in stages) == sorted(
            s.name for s in plan.stages
        )
        edges = browser.find_elements("css selector", "path.edge")
        assert len(edges) == sum(len(s.inputs) for s in plan.stages) + 1  # + to the response
        badges = " ".join(b.text for b in browser.find_elements("css selector", ".badge text"))
        assert "batch ≤32" in badges and "\u00d72 replicas" in badges and "cpu" in badges
        graph_text = browser.find_element("css selector", "svg.graph").text
        assert "request" in graph_text and "response" in graph_text

        def load() -> None:
            with httpx.Client(base_url=server.url, timeout=10) as client:
                headers = {"Authorization": f"Bearer {TOKEN}"}
                for i in range(2000):  # bounded; stopped once the page has moved
                    if stop_load.is_set():
                        return
                    body = {"rows": [{"text": f" Comment number {i} "}]}
                    # a request slowed past the timeout on a loaded machine ends not the load
                    with contextlib.suppress(httpx.TimeoutException):
                        client.post("/v1/flows/triage/predict", json=body, headers=headers)

        loader = threading.Thread(target=load)
        loader.start()
        try:

            def moved() -> bool:
                ok = browser.find_element("css selector", ".value.ok").text
                rps = browser.find_element("css selector", ".value.rps").text
                rates = [e.text for e in browser.find_elements("css selector", "text.rate")]
                return (
                    ok.isdigit()
                    and int(ok) >= 20
                    and float(rps) > 0
                    and all(r and not r.startswith("0.0 req/s") for r in rates)
                )

            wait_for(moved, "ok count, throughput and per-stage rates to move")
            time.sleep(1.5)  # a little history for the throughput sparkline
            latencies = [e.text for e in browser.find_elements("css selector", "text.latency")]
            assert all(t.startswith("p50 ") and "p99" in t for t in latencies), latencies
            loads = [e.text for e in browser.find_elements("css selector", "text.load")]
            assert all(t.startswith("workers ") for t in loads), loads
            status = browser.find_element("id", "status").text
            assert status.startswith("live"), status
            ARTIFACTS.mkdir(exist_ok=True)
            assert browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))
        finally:
            stop_load.set()
            loader.join(30)


def test_dashboard_without_the_token_says_so(browser):
    with Server({"triage": pipeline().deploy()}, port=0, token=TOKEN) as server:
        browser.get(f"{server.url}/")
        wait_for(lambda: "401" in browser.find_element("id", "status").text, "the 401 to be shown")
        assert browser.find_elements("css selector", "g.stage") == []
