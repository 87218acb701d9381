"""The HTTP API over real loopback HTTP: every endpoint and every error code."""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import serveflow as sf
from serveflow.serving import Server, coalesce
from serveflow.serving.app import LoopTurns
from serveflow.serving.coalesce import PROBE_EVERY_S, Coalescer
from serveflow.serving.limits import Limits

TIMEOUT = 10


def arith_flow() -> sf.Flow:
    flow = sf.Flow("arith", schema={"a": int, "b": int})
    total = flow.map(lambda r: r["a"] + r["b"], names=["sum"], name="add")
    total.filter(lambda r: r["sum"] % 2 == 0, name="even")
    return flow


def explode(row):
    raise ValueError(f"cannot handle {row['a']}")


def failing_flow() -> sf.Flow:
    flow = sf.Flow("fails")
    flow.map(explode, names=["x"], name="explode")
    return flow


def slow_flow(slo_ms: float | None = None) -> sf.Flow:
    """Rows that sleep `s` seconds; with `slo_ms`, in one SLO batching stage."""
    flow = sf.Flow("slow", schema={"s": float})
    if slo_ms is None:
        flow.map(lambda r: time.sleep(r["s"]) or r["s"], names=["slept"], name="nap")
    else:
        flow.map(_nap_rows, names=["slept"], name="nap", batching=sf.Batching(slo_ms=slo_ms))
    return flow


def _nap_rows(table: sf.Table) -> list[float]:
    time.sleep(max(table.column("s")))
    return table.column("s")


def tensor_flow() -> sf.Flow:
    flow = sf.Flow("tensor", schema={"x": np.ndarray})
    flow.map(lambda r: (r["x"] * 2, float(r["x"].sum())), names=["y", "total"], name="double")
    return flow


@pytest.fixture(scope="module")
def server():
    runtime = sf.LocalRuntime()
    apps = {
        f.name: f.deploy(runtime=runtime) for f in (arith_flow(), failing_flow(), tensor_flow())
    }
    slow_runtime = sf.LocalRuntime(max_in_flight=1)
    apps["slow"] = slow_flow().deploy(runtime=slow_runtime)
    with Server(apps, port=0, max_body_bytes=64 * 1024) as srv:
        yield srv
    runtime.stop()
    slow_runtime.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        yield c


def predict(client, flow, **kwargs):
    return client.post(f"/v1/flows/{flow}/predict", **kwargs)


def test_predict_rows_and_columns(client):
    r = predict(client, "arith", json={"rows": [{"a": 1, "b": 1}, {"a": 1, "b": 2}]})
    assert r.status_code == 200, r.text
    assert r.json() == {"rows": [{"sum": 2}]}
    r = predict(client, "arith", json={"columns": {"a": [1, 2, 3], "b": [1, 2, 4]}})
    assert r.status_code == 200
    assert r.json() == {"rows": [{"sum": 2}, {"sum": 4}]}


def test_numpy_outputs_become_nested_lists(client):
    r = predict(client, "tensor", json={"rows": [{"x": [[1, 2], [3, 4]]}]})
    assert r.status_code == 200, r.text
    assert r.json() == {"rows": [{"y": [[2, 4], [6, 8]], "total": 10.0}]}


def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_npz_in_and_out(client):
    x = np.arange(24, dtype=np.float32).reshape(3, 2, 4)
    r = predict(
        client,
        "tensor",
        content=_npz(x=x),
        headers={"Content-Type": "application/x-npz", "Accept": "application/x-npz"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-npz"
    with np.load(io.BytesIO(r.content), allow_pickle=False) as out:
        np.testing.assert_array_equal(out["y"], x * 2)
        np.testing.assert_allclose(out["total"], x.reshape(3, -1).sum(axis=1))
    # .npz in, JSON out
    r = predict(
        client, "tensor", content=_npz(x=x[:1]), headers={"Content-Type": "application/x-npz"}
    )
    assert r.json()["rows"][0]["y"] == (x[0] * 2).tolist()


def test_npz_is_never_unpickled(client):
    pickled = io.BytesIO()
    np.savez(pickled, x=np.array([{"evil": 1}, None], dtype=object))  # needs pickle to load
    r = predict(client, "tensor", content=pickled.getvalue(),
                headers={"Content-Type": "application/x-npz"})  # fmt: skip
    assert r.status_code == 400
    assert "pickle" in r.json()["error"].lower()
    r = predict(client, "tensor", content=b"PK\x03\x04 not a zip",
                headers={"Content-Type": "application/x-npz"})  # fmt: skip
    assert r.status_code == 400
    assert "npz" in r.json()["error"]


def test_malformed_json_is_400(client):
    r = predict(
        client, "arith", content=b'{"rows": [', headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400
    assert "malformed JSON" in r.json()["error"]
    r = predict(client, "arith", content=b"a=1", headers={"Content-Type": "text/csv"})
    assert r.status_code == 400
    assert "Content-Type" in r.json()["error"]


def test_integers_past_64_bits_stay_whole_or_are_named():
    # orjson reads them as floats, rounded: a flow without a schema got 1.18e21
    echo = sf.Flow("echo")
    echo.map(lambda r: r["a"] + 1, names=["next"])
    big = 2**70 + 1
    apps = {"echo": echo.deploy(), "arith": arith_flow().deploy()}
    with Server(apps, port=0) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
        for body in ({"rows": [{"a": big}]}, {"columns": {"a": [big]}}):
            r = predict(c, "echo", json=body)
            assert r.status_code == 200 and r.json() == {"rows": [{"next": big + 1}]}, r.text
        huge = 10**400  # orjson reads it as an infinite double, and refuses it
        r = predict(c, "echo", json={"rows": [{"a": huge}]})
        assert r.status_code == 200 and r.json() == {"rows": [{"next": huge + 1}]}, r.text
        r = predict(c, "echo", content=b'{"rows": [{"a": 1e400}]}')  # a float past doubles
        assert r.status_code == 400 and "1e400" in r.json()["error"], r.text
        # ... read by `json` then, which took a lone surrogate that orjson refuses
        lone = b'{"rows": [{"a": %d}, {"a": "\\ud800"}]}' % huge
        assert predict(c, "echo", content=lone).status_code == 400
        # V2: UINT64 past int64 beside a 0 came back FP64, rounded (numpy's promotion)
        v2 = {"inputs": [{"name": "a", "shape": [2], "datatype": "UINT64",
                          "data": [2**64 - 2, 0]}]}  # fmt: skip
        (out,) = c.post("/v2/models/echo/infer", json=v2).json()["outputs"]
        assert out["datatype"] == "UINT64" and out["data"] == [2**64 - 1, 1], out
        # an int column is the API's int64 (its OpenAPI schema says so)
        r = predict(c, "arith", json={"rows": [{"a": 1, "b": 2**64}]})
        assert r.status_code == 422 and r.json()["column"] == "b", r.text
        assert "64 bits" in r.json()["error"]
        r = predict(c, "arith", json={"rows": [{"a": 2**64 - 1, "b": -(2**63)}]})
        assert r.status_code == 200 and r.json() == {"rows": []}, r.text  # odd: filtered


def test_wrong_columns_or_types_are_422(client):
    r = predict(client, "arith", json={"rows": [{"a": 1, "b": "two"}]})
    assert r.status_code == 422
    assert r.json()["column"] == "b"
    assert "'b'" in r.json()["error"]
    r = predict(client, "arith", json={"rows": [{"a": 1}]})
    assert r.status_code == 422
    assert r.json()["column"] == "b"
    r = predict(client, "arith", json={"columns": {"a": [1, 2], "b": [1]}})
    assert r.status_code == 422
    assert "equal lengths" in r.json()["error"]
    r = predict(client, "arith", json={"data": []})
    assert r.status_code == 422
    assert '"rows"' in r.json()["error"]


def test_unknown_flow_is_404(client):
    r = predict(client, "nope", json={"rows": []})
    assert r.status_code == 404
    assert "'nope'" in r.json()["error"] and "arith" in r.json()["error"]
    assert client.get("/v1/flows/nope").status_code == 404
    assert client.get("/v1/flows/nope/stats").status_code == 404
    r = client.get("/no/such/path")
    assert r.status_code == 404 and "error" in r.json()


def test_failing_operator_is_500_naming_it_without_traceback(client):
    r = predict(client, "fails", json={"rows": [{"a": 7}]})
    assert r.status_code == 500
    body = r.json()
    assert body["operator"] == "explode"
    assert "cannot handle 7" in body["error"]
    assert "traceback" not in body and "Traceback" not in r.text


def test_a_bug_in_admission_is_500_and_the_server_goes_on(monkeypatch):
    # an exception of ours where an SLO request is admitted, as the HTTP protocol
    # runs it from its parser's callback: the client was told its request was invalid
    # (400 "Invalid HTTP request received") and its connection closed
    from serveflow.batching.admission import StageLedger

    admit = StageLedger.admit

    def broken(*args, **kwargs):
        raise AttributeError("a bug in admission")

    runtime = sf.LocalRuntime(min_workers=1, max_workers=1)
    try:
        app = slow_flow(slo_ms=500).deploy(runtime=runtime)
        with Server({"slow": app}, port=0) as srv, httpx.Client(base_url=srv.url) as c:
            assert predict(c, "slow", json={"rows": [{"s": 0.001}]}).status_code == 200
            monkeypatch.setattr(StageLedger, "admit", broken)
            r = predict(c, "slow", json={"rows": [{"s": 0.001}]})
            assert r.status_code == 500 and "internal error" in r.json()["error"]
            monkeypatch.setattr(StageLedger, "admit", admit)
            assert predict(c, "slow", json={"rows": [{"s": 0.001}]}).status_code == 200
    finally:
        runtime.stop()


def test_debug_adds_the_traceback():
    with Server({"fails": failing_flow().deploy()}, port=0, debug=True) as srv:
        r = httpx.post(
            f"{srv.url}/v1/flows/fails/predict", json={"rows": [{"a": 1}]}, timeout=TIMEOUT
        )
    assert r.status_code == 500
    assert "Traceback" in r.json()["traceback"]
    assert "explode" in r.json()["traceback"]


def test_body_over_the_limit_is_413(client):
    big = {"rows": [{"a": 1, "b": 1, "pad": "x" * 70_000}]}
    r = predict(client, "arith", json=big)
    assert r.status_code == 413
    assert "limit" in r.json()["error"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        yield b'{"rows": [{"pad": "'
        for _ in range(20):
            yield b"x" * 8192

    r = predict(client, "arith", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_deadline_is_504(client):
    r = predict(client, "slow", json={"rows": [{"s": 0.4}]}, headers={"X-Request-Timeout-Ms": "50"})
    assert r.status_code == 504
    assert "0.05" in r.json()["error"]
    r = predict(client, "arith", json={"rows": []}, headers={"X-Request-Timeout-Ms": "soon"})
    assert r.status_code == 400
    assert "X-Request-Timeout-Ms" in r.json()["error"]
    r = predict(client, "arith", json={"rows": []}, headers={"X-Request-Timeout-Ms": "0"})
    assert r.status_code == 400
    time.sleep(0.45)  # let the nap finish so the slow flow is free for the next test


def _wait_in_flight(client, flow: str, count: int) -> None:
    for _ in range(200):
        families = text_string_to_metric_families(client.get("/metrics").text)
        values = {
            s.labels["flow"]: s.value
            for f in families
            if f.name == "serveflow_requests_in_flight"
            for s in f.samples
        }
        if values.get(flow, 0) >= count:
            return
        time.sleep(0.01)
    raise AssertionError(f"{flow} never had {count} request(s) in flight")


def test_overload_is_503_with_retry_after(client, server):
    results = []
    first = threading.Thread(
        target=lambda: results.append(predict(client, "slow", json={"rows": [{"s": 0.5}]}))
    )
    first.start()
    try:
        _wait_in_flight(client, "slow", 1)
        started = time.perf_counter()
        r = predict(client, "slow", json={"rows": [{"s": 0.0}]})
        shed_s = time.perf_counter() - started
    finally:
        first.join(TIMEOUT)
    assert r.status_code == 503
    assert int(r.headers["Retry-After"]) >= 1
    assert "in flight" in r.json()["error"]
    assert shed_s < 0.4  # refused at once, not after the first request finished
    assert results[0].status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    shed = [s for s in families["serveflow_shed_requests"].samples if s.labels["flow"] == "slow"]
    assert shed[0].value >= 1


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json()["flows"] == ["arith", "fails", "slow", "tensor"]


def test_flows_listing_and_stats(client):
    predict(client, "arith", json={"rows": [{"a": 2, "b": 2}]})
    flows = {f["name"]: f for f in client.get("/v1/flows").json()["flows"]}
    assert set(flows) == {"arith", "fails", "slow", "tensor"}
    arith = flows["arith"]
    assert arith["explain"] == sf.optimize(arith_flow()).explain()
    assert arith["schema"] == {"a": "int", "b": "int"}
    assert "slo" in arith
    assert arith["graph"]["stages"][0]["inputs"] == ["request"]
    assert client.get("/v1/flows/arith").json() == arith
    stats = client.get("/v1/flows/arith/stats").json()
    assert stats["flow"] == "arith"
    (stage,) = stats["stages"].values()
    assert stage["requests"] >= 1 and stage["workers"] >= 1
    assert stats["http"]["by_status"]["200"] >= 1
    assert stats["http"]["p50_ms"] > 0


def test_plan_graph_maps_stage_inputs_to_stages():
    flow = sf.Flow("diamond")
    left = flow.map(lambda r: r["a"], names=["l"], name="left")
    right = flow.map(lambda r: -r["a"], names=["r"], name="right", batching=False)
    left.join(right)
    rules = sf.Rules(fusion=False)
    with Server({"diamond": flow.deploy(rules=rules)}, port=0) as srv:
        graph = httpx.get(f"{srv.url}/v1/flows/diamond").json()["graph"]
    stages = {s["name"]: s for s in graph["stages"]}
    assert stages["left"]["inputs"] == ["request"]
    join = next(s for s in graph["stages"] if s["ops"][0].startswith("join"))
    assert sorted(join["inputs"]) == sorted([stages["left"]["id"], stages["right"]["id"]])
    assert graph["output"] == join["id"]


def test_metrics_follow_prometheus_conventions(client):
    for _ in range(3):
        predict(client, "arith", json={"rows": [{"a": 1, "b": 1}]})
    predict(client, "fails", json={"rows": [{"a": 1}]})
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    requests = {
        (s.labels["flow"], s.labels["status"]): s.value
        for s in families["serveflow_requests"].samples
        if s.name == "serveflow_requests_total"
    }
    assert requests[("arith", "200")] >= 3
    assert requests[("fails", "500")] >= 1
    assert families["serveflow_request_duration_seconds"].type == "histogram"
    count = [
        s.value
        for s in families["serveflow_request_duration_seconds"].samples
        if s.name.endswith("_count") and s.labels["flow"] == "arith"
    ]
    assert count[0] >= 3
    for name in (
        "serveflow_stage_requests",
        "serveflow_stage_latency_seconds",
        "serveflow_stage_queue_length",
        "serveflow_stage_workers",
        "serveflow_stage_cold_starts",
        "serveflow_stage_batch_size_mean",
        "serveflow_shed_requests",
    ):
        assert name in families, name
    stage = [s for s in families["serveflow_stage_requests"].samples if s.labels["flow"] == "arith"]
    assert stage[0].labels["stage"] == "add+even" and stage[0].value >= 3
    latency = families["serveflow_stage_latency_seconds"]
    assert latency.type == "summary"
    arith = [s for s in latency.samples if s.labels["flow"] == "arith"]
    assert {s.labels["quantile"] for s in arith if "quantile" in s.labels} == {"0.5", "0.99"}
    count = next(s.value for s in arith if s.name.endswith("_count"))
    assert count >= 3


def test_openapi_describes_the_endpoints(client):
    spec = client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    paths = spec["paths"]
    for path in ("/v1/flows/arith/predict", "/v1/flows", "/v1/flows/arith/stats",
                 "/v1/flows/tensor/predict", "/healthz", "/readyz", "/metrics", "/"):  # fmt: skip
        assert path in paths, path
    responses = paths["/v1/flows/arith/predict"]["post"]["responses"]
    assert {"200", "400", "413", "422", "500", "503", "504"} <= set(responses)
    assert "401" not in responses  # this server has no token
    assert (
        "application/x-npz" in paths["/v1/flows/tensor/predict"]["post"]["requestBody"]["content"]
    )


def test_dashboard_page_is_served(client):
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "/v1/flows" in r.text and "<svg" not in r.text.split("<script>")[0]


def test_token_guards_everything_but_health_checks():
    token = "s3cret-token"
    with Server({"arith": arith_flow().deploy()}, port=0, token=token) as srv:
        _check_token(srv.url, token)


def _check_token(url: str, token: str) -> None:
    with httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        body = {"rows": [{"a": 1, "b": 1}]}
        r = c.post("/v1/flows/arith/predict", json=body)
        assert r.status_code == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert "missing" in r.json()["error"]
        wrong = {"Authorization": "Bearer nope"}
        assert c.post("/v1/flows/arith/predict", json=body, headers=wrong).status_code == 401
        for path in ("/metrics", "/v1/flows", "/openapi.json", "/v1/flows/arith/stats"):
            assert c.get(path).status_code == 401, path
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 200
        good = {"Authorization": f"Bearer {token}"}
        r = c.post("/v1/flows/arith/predict", json=body, headers=good)
        assert r.status_code == 200 and r.json() == {"rows": [{"sum": 2}]}
        assert c.get("/metrics", headers=good).status_code == 200
        lower = {"Authorization": f"bearer {token}"}  # the scheme is case-insensitive
        assert c.post("/v1/flows/arith/predict", json=body, headers=lower).status_code == 200
        assert c.get("/metrics", headers=lower).status_code == 200


@pytest.mark.parametrize("slo_ms", [None, 5000.0])
def test_two_authorization_headers_are_refused_whichever_is_right(slo_ms):
    # each front takes the request the same way: the plain ASGI path, the fast predict
    # path, and with an SLO stage the parser's own (which reads all the headers)
    app = slow_flow(slo_ms).deploy()
    with Server({"slow": app}, port=0, token="secret") as srv:
        body = {"rows": [{"s": 0.0}]}
        good, bad = ("Authorization", "Bearer secret"), ("Authorization", "Bearer wrong")
        with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
            assert c.post("/v1/flows/slow/predict", json=body, headers=[good]).status_code == 200
            for pair in ([good, bad], [bad, good], [good, good]):
                for path in ("/v1/flows/slow/predict", "/v2/models/slow/infer", "/metrics"):
                    r = c.request("GET" if path == "/metrics" else "POST", path, json=body,
                                  headers=pair)  # fmt: skip
                    assert r.status_code == 401, (path, pair)
                    assert "2 Authorization headers" in r.json()["error"], r.text


def test_stop_drains_in_flight_requests_then_stops_the_app():
    app = slow_flow().deploy()
    srv = Server({"slow": app}, port=0).start()
    results = []
    url = f"{srv.url}/v1/flows/slow/predict"
    worker = threading.Thread(
        target=lambda: results.append(httpx.post(url, json={"rows": [{"s": 0.5}]}, timeout=10))
    )
    worker.start()
    try:
        with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
            _wait_in_flight(c, "slow", 1)
    finally:
        srv.stop()
        worker.join(TIMEOUT)
    assert results[0].status_code == 200
    assert results[0].json() == {"rows": [{"slept": 0.5}]}
    with pytest.raises(RuntimeError, match="stopped"):
        app.run({"s": [0.0]})
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{srv.url}/healthz")


def ones(table):
    return [1] * len(table)


def test_flows_listing_shows_slos():
    flow = sf.Flow("slo")
    flow.map(ones, names=["y"], batching=sf.Batching(slo_ms=50), name="ones")
    with Server({"slo": flow.deploy(slo_ms=80)}, port=0) as srv:
        info = httpx.get(f"{srv.url}/v1/flows/slo", timeout=TIMEOUT).json()
        r = httpx.post(
            f"{srv.url}/v1/flows/slo/predict", json={"rows": [{"x": 1}]}, timeout=TIMEOUT
        )
    assert info["slo"]["flow_ms"] == 80
    assert info["slo"]["stages"]["ones"]["percentile"] == 0.99
    assert info["graph"]["stages"][0]["batching"]["slo_ms"] > 0
    assert r.status_code == 200 and r.json() == {"rows": [{"y": 1}]}


def test_http_admission_bound_refuses_before_the_runtime():
    app = slow_flow().deploy()
    with Server({"slow": app}, port=0, max_in_flight=1) as srv:
        url = f"{srv.url}/v1/flows/slow/predict"
        results = []
        first = threading.Thread(
            target=lambda: results.append(httpx.post(url, json={"rows": [{"s": 0.5}]}, timeout=10))
        )
        first.start()
        try:
            with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
                _wait_in_flight(c, "slow", 1)
                refused = c.post("/v1/flows/slow/predict", json={"rows": [{"s": 0.0}]})
                malformed = c.post("/v1/flows/slow/predict", content=b"{not json")
                stage_requests = sum(s["requests"] for s in app.stats().values())
        finally:
            first.join(TIMEOUT)
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
        assert "in flight" in refused.json()["error"]
        assert malformed.status_code == 503  # refused before its body was even decoded
        assert results[0].status_code == 200
        assert stage_requests <= 1  # the refused requests never reached the runtime
        again = httpx.post(url, json={"rows": [{"s": 0.0}]}, timeout=TIMEOUT)
        assert again.status_code == 200  # the slot is free again


def _answers(sock: socket.socket, count: int) -> list[bytes]:
    """The next `count` HTTP responses on `sock` (status line and headers; bodies skipped)."""
    data, heads = b"", []
    while len(heads) < count:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            continue
        head = data[:end]
        length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), b"0"))  # fmt: skip
        while len(data) < end + 4 + length:
            data += sock.recv(65536)
        heads.append(head)
        data = data[end + 4 + length :]
    return heads


def test_a_refusal_at_the_limit_answers_every_form_of_request_as_http_says():
    app = slow_flow().deploy()
    with Server({"slow": app}, port=0, max_in_flight=1, token="secret") as srv:
        url = f"{srv.url}/v1/flows/slow/predict"
        host, port = srv.url.removeprefix("http://").split(":")
        body = b'{"rows": [{"s": 0.0}]}'

        def request(*headers: str, auth: str = "Bearer secret", data: bytes = body) -> bytes:
            lines = ["POST /v1/flows/slow/predict HTTP/1.1", "Host: x", *headers,
                     f"Authorization: {auth}", f"Content-Length: {len(data)}"]  # fmt: skip
            return "\r\n".join(lines).encode() + b"\r\n\r\n" + data

        auth = {"Authorization": "Bearer secret"}
        slow = threading.Thread(
            target=httpx.post, args=(url,), kwargs={"json": {"rows": [{"s": 1.5}]}, "headers": auth}
        )
        slow.start()
        with httpx.Client(base_url=srv.url, timeout=TIMEOUT, headers=auth) as c:
            _wait_in_flight(c, "slow", 1)
        kept = socket.create_connection((host, int(port)), timeout=TIMEOUT)
        kept.sendall(request())
        assert _answers(kept, 1)[0].startswith(b"HTTP/1.1 503")
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
            sock.sendall(request("Connection: close"))
            assert _answers(sock, 1)[0].startswith(b"HTTP/1.1 503")
            assert sock.recv(1) == b""  # closed, as asked
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
            whole = request()
            sock.sendall(whole[:40])  # in two reads: the parser judges it, the same way
            time.sleep(0.05)
            sock.sendall(whole[40:])
            statuses = [h.split(b" ")[1] for h in _answers(sock, 1)]
            sock.sendall(request() + request())  # pipelined: answered in order
            statuses += [h.split(b" ")[1] for h in _answers(sock, 2)]
            sock.sendall(request(auth="Bearer wrong"))
            statuses += [h.split(b" ")[1] for h in _answers(sock, 1)]
            sock.sendall(request("Content-Length: 3"))  # two lengths: malformed
            statuses += [h.split(b" ")[1] for h in _answers(sock, 1)]
        assert statuses == [b"503", b"503", b"503", b"401", b"400"]
        slow.join(TIMEOUT)
        kept.sendall(request())  # the refused connection was kept open and serves
        assert _answers(kept, 1)[0].startswith(b"HTTP/1.1 200")
        kept.close()
        with httpx.Client(base_url=srv.url, timeout=TIMEOUT, headers=auth) as c:
            families = text_string_to_metric_families(c.get("/metrics").text)
        shed = {f.name: s.value for f in families for s in f.samples
                if f.name == "serveflow_shed_requests" and s.name.endswith("_total")}  # fmt: skip
        assert shed == {"serveflow_shed_requests": 5}


def _model_of_100_ms(table: sf.Table) -> list[int]:
    time.sleep(0.1)
    return table.column("x")


def test_an_slo_stage_shedding_every_arrival_is_refused_before_the_body_is_read():
    """Under a flood an SLO stage sheds every arrival until a call ends (`closed`):
    those are answered 503 naming the stage once their headers are parsed (a refusal
    through the ASGI app cost 300 us of the server's event loop), and counted as the
    stage's arrivals and refusals as if run."""
    flow = sf.Flow("slo")
    flow.map(_model_of_100_ms, names=["y"], batching=sf.Batching(slo_ms=150), name="model")
    runtime = sf.LocalRuntime(min_workers=1, max_workers=1)
    app = flow.deploy(runtime=runtime)
    body = b'{"rows": [{"x": 1}]}'
    head = f"POST /v1/flows/slo/predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    statuses: list[int] = []
    flooding = True
    with Server({"slo": app}, port=0) as srv:
        url = f"{srv.url}/v1/flows/slo/predict"
        host, port = srv.url.removeprefix("http://").split(":")
        for _ in range(5):  # its calls timed
            httpx.post(url, json={"rows": [{"x": 1}]}, timeout=TIMEOUT)

        def flood() -> None:
            with httpx.Client(timeout=TIMEOUT) as c:
                while flooding:
                    statuses.append(c.post(url, json={"rows": [{"x": 1}]}).status_code)

        threads = [threading.Thread(target=flood) for _ in range(4)]
        for thread in threads:
            thread.start()
        refused = None
        deadline = time.monotonic() + 20
        try:
            while refused is None and time.monotonic() < deadline:
                with socket.create_connection((host, int(port)), timeout=0.2) as sock:
                    sock.sendall(head.encode())  # no body yet
                    try:
                        refused = _answers(sock, 1)[0]
                    except TimeoutError:  # not shedding every arrival at that moment
                        continue
                    sock.settimeout(TIMEOUT)
                    sock.sendall(body + head.encode() + body)  # the body is dropped
                    statuses.append(int(_answers(sock, 1)[0].split(b" ")[1]))
        finally:
            flooding = False
            for thread in threads:
                thread.join(TIMEOUT)
        assert refused is not None and refused.startswith(b"HTTP/1.1 503"), refused
        assert b"retry-after" in refused.lower()
        answered = app.stats()["model"]
        assert set(statuses) <= {200, 503} and 503 in statuses
        # every refusal counted by the stage (the probes answered 503 before their body too)
        assert answered["shed"] == statuses.count(503) + 1, (answered["shed"], statuses.count(503))


def test_a_connection_refused_at_the_limit_is_closed_only_once_idle_for_the_keep_alive_timeout():
    # uvicorn's keep-alive timeout is 5 s, counted from a connection's last answer
    app = slow_flow().deploy()
    with Server({"slow": app}, port=0, max_in_flight=1) as srv:
        url = f"{srv.url}/v1/flows/slow/predict"
        host, port = srv.url.removeprefix("http://").split(":")
        body = b'{"rows": [{"s": 0.0}]}'
        request = (b"POST /v1/flows/slow/predict HTTP/1.1\r\nHost: x\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        slow = threading.Thread(target=httpx.post, args=(url,),
                                kwargs={"json": {"rows": [{"s": 8.0}]}, "timeout": 30})  # fmt: skip
        slow.start()
        with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
            _wait_in_flight(c, "slow", 1)
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
            for pause in (0.0, 3.0, 3.0):  # the last 6 s after the first answer
                time.sleep(pause)
                sock.sendall(request)
                assert _answers(sock, 1)[0].startswith(b"HTTP/1.1 503")
            answered = time.monotonic()
            sock.settimeout(15)
            assert sock.recv(1) == b""  # closed by the server once idle
            assert 4.5 < time.monotonic() - answered < 7.0
        slow.join(TIMEOUT)


def _send_and_leave(url: str, request: bytes) -> None:
    """Send `request` bytes on a fresh connection and close it without reading."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        time.sleep(0.05)  # the server parses the headers before the connection closes


@pytest.mark.parametrize("slo_ms", [None, 5000.0])
def test_every_way_a_request_ends_frees_its_admission_slot(slo_ms):
    # with an SLO stage, a request read whole is run from the HTTP parser (`run_at_door`),
    # its task started only then: one whose body never comes has no task to free its slot
    app = slow_flow(slo_ms).deploy()
    with Server({"slow": app}, port=0, max_in_flight=2) as srv:
        url = f"{srv.url}/v1/flows/slow/predict"
        head = "POST /v1/flows/slow/predict HTTP/1.1\r\nHost: x\r\n"
        host, port = srv.url.removeprefix("http://").split(":")
        body = b'{"rows": [{"s": 0.0}]}'
        for _ in range(3):  # a leaked slot per round would leave none after two rounds
            # the client leaves after the headers, its body never sent
            _send_and_leave(srv.url, (head + "Content-Length: 100\r\n\r\n").encode())
            # ... after half its body
            _send_and_leave(
                srv.url, (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body[:9]
            )
            # bodies that come later, in chunks, or once the server says to send them
            with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
                sock.sendall((head + f"Content-Length: {len(body)}\r\n\r\n").encode())
                time.sleep(0.05)
                sock.sendall(body)
                chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
                sock.sendall((head + "Transfer-Encoding: chunked\r\n\r\n").encode() + chunked)
                expect = f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n"
                sock.sendall((head + expect).encode())
                answers = _answers(sock, 3)
                assert answers[-1].startswith(b"HTTP/1.1 100"), answers  # (no body yet)
                sock.sendall(body)
                answers += _answers(sock, 1)
                assert [a.split(b" ")[1] for a in answers] == [b"200", b"200", b"100", b"200"]
            # an upgrade request: the server may take it off the HTTP request path
            upgrade = head + (
                "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nContent-Length: 2\r\n\r\n{}"
            )
            _send_and_leave(srv.url, upgrade.encode())
            assert httpx.post(url, content=b"{not json", timeout=TIMEOUT).status_code == 400
            assert httpx.post(url, json={"rows": [{"t": 1}]}, timeout=TIMEOUT).status_code == 422
            late = httpx.post(
                url,
                json={"rows": [{"s": 0.3}]},
                headers={"X-Request-Timeout-Ms": "20"},
                timeout=TIMEOUT,
            )
            assert late.status_code == 504
        time.sleep(0.5)  # the timed-out runs end; the slots of leavers are freed meanwhile
        statuses: list[int] = []

        def send() -> None:
            r = httpx.post(url, json={"rows": [{"s": 0.3}]}, timeout=TIMEOUT)
            statuses.append(r.status_code)

        pair = [threading.Thread(target=send) for _ in range(2)]
        for thread in pair:
            thread.start()
        for thread in pair:
            thread.join(TIMEOUT)
    assert statuses == [200, 200]  # both slots are free


@pytest.mark.parametrize("slo_ms", [None, 300.0])
def test_a_body_that_stalls_is_answered_408_and_frees_its_slot(slo_ms):
    app = slow_flow(slo_ms).deploy()
    limits = Limits(body_timeout_s=0.5)
    with Server({"slow": app}, port=0, max_in_flight=1, limits=limits) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        body = b'{"rows": [{"s": 0.0}]}'
        head = f"POST /v1/flows/slow/predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}"
        v2 = "POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100"
        for start, sent in ((head, b""), (head, body[:5]), (v2, b'{"inputs"')):
            with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
                sock.sendall(start.encode() + b"\r\n\r\n" + sent)
                began = time.monotonic()
                answer = _answers(sock, 1)[0]
                assert answer.startswith(b"HTTP/1.1 408"), answer
                assert 0.4 < time.monotonic() - began < 5
                assert sock.recv(1) == b""  # closed: the rest of the body is not awaited
        # a body sent in parts, each within the timeout, is read whole (it stalls, not
        # lasts), and its SLO counts from when it is whole (at the parser, it had been
        # timed out at 0.5 s in all, then counted late from its headers)
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
            sock.sendall(head.encode() + b"\r\n\r\n")
            for i in range(0, len(body), 8):
                time.sleep(0.3)
                sock.sendall(body[i : i + 8])
            assert _answers(sock, 1)[0].startswith(b"HTTP/1.1 200")
            # so too a chunked one (the ASGI path reads it: it counted from the headers)
            chunked = "POST /v1/flows/slow/predict HTTP/1.1\r\nHost: x\r\n"
            sock.sendall(chunked.encode() + b"Transfer-Encoding: chunked\r\n\r\n")
            for i in range(0, len(body), 8):
                time.sleep(0.3)
                part = body[i : i + 8]
                sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
            sock.sendall(b"0\r\n\r\n")
            assert _answers(sock, 1)[0].startswith(b"HTTP/1.1 200")
        url = f"{srv.url}/v1/flows/slow/predict"
        assert httpx.post(url, content=body, timeout=TIMEOUT).status_code == 200  # slot free
        with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
            families = list(text_string_to_metric_families(c.get("/metrics").text))
        answers = {s.labels["status"]: s.value for f in families for s in f.samples
                   if s.name == "serveflow_requests_total"}  # fmt: skip
        routes = {(s.labels["route"], s.labels["status"]): s.value for f in families
                  for s in f.samples if s.name == "serveflow_http_responses_total"}  # fmt: skip
        assert answers.get("408") == 3, answers
        assert routes.get(("/v2", "408")) == 1, routes


@pytest.mark.parametrize("max_in_flight", [None, 4])  # uvicorn's protocol, or the shedding one
def test_headers_that_stall_are_answered_408_and_headers_sent_in_parts_are_read(max_in_flight):
    # uvicorn times out neither: a connection holding half a request line stayed open
    app = slow_flow(None).deploy()
    limits = Limits(body_timeout_s=0.5)
    with Server({"slow": app}, port=0, max_in_flight=max_in_flight, limits=limits) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        for begun in (b"POST /v1/flows/sl", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"):
            with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
                sock.sendall(begun)
                began, answer = time.monotonic(), b""
                while chunk := sock.recv(4096):  # until closed
                    answer += chunk
                assert answer.startswith(b"HTTP/1.1 408") and b"--body-timeout" in answer
                assert 0.4 < time.monotonic() - began < 5
        body = b'{"rows": [{"s": 0.0}]}'
        request = b"POST /v1/flows/slow/predict HTTP/1.1\r\nHost: x\r\n"
        request += b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
            for i in range(0, len(request), 40):  # in 0.4 s, under the 0.5 s
                sock.sendall(request[i : i + 40])
                time.sleep(0.05)
            assert _answers(sock, 1)[0].startswith(b"HTTP/1.1 200")
            time.sleep(0.7)  # between requests: keep-alive's timeout (5 s), not this one
            sock.sendall(request)
            assert _answers(sock, 1)[0].startswith(b"HTTP/1.1 200")


def batched_ones(table):
    time.sleep(0.02)  # concurrent requests pile up meanwhile and form the next batch
    return [1] * len(table)


def test_batch_size_histogram_per_stage_under_concurrent_requests():
    flow = sf.Flow("batched")
    flow.map(batched_ones, names=["one"], batching=True, name="ones")
    requests = 24
    # coalesce=False: one runtime request per HTTP request, so the sizes add up to them
    with Server({"batched": flow.deploy()}, port=0, coalesce=False) as srv:
        url = f"{srv.url}/v1/flows/batched/predict"
        statuses: list[int] = []

        def send() -> None:
            statuses.append(httpx.post(url, json={"rows": [{"x": 1}]}, timeout=TIMEOUT).status_code)

        threads = [threading.Thread(target=send) for _ in range(requests)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
        assert statuses == [200] * requests
        samples: dict[tuple[str, str], float] = {}
        for _ in range(100):  # stage figures reach the driver a little later
            text = httpx.get(f"{srv.url}/metrics", timeout=TIMEOUT).text
            families = {f.name: f for f in text_string_to_metric_families(text)}
            family = families.get("serveflow_stage_batch_size")
            samples = {
                (s.name, s.labels.get("le", "")): s.value
                for s in (family.samples if family else [])
                if s.labels["flow"] == "batched" and s.labels["stage"] == "ones"
            }
            if samples.get(("serveflow_stage_batch_size_sum", "")) == requests:
                break
            time.sleep(0.05)
    assert family is not None and family.type == "histogram"
    bounds = ["1", "2", "4", "8", "16", "32", "64", "+Inf"]
    buckets = [samples[("serveflow_stage_batch_size_bucket", le)] for le in bounds]
    assert buckets == sorted(buckets)  # cumulative
    batches = samples[("serveflow_stage_batch_size_count", "")]
    assert buckets[-1] == batches
    assert samples[("serveflow_stage_batch_size_sum", "")] == requests  # one row per request
    assert batches < requests  # some calls took several requests at once
    assert buckets[0] < batches  # so not every batch had size 1


def unlucky(row):
    if row["x"] % 100 == 13:
        raise ValueError(f"{row['x']} is unlucky")
    return row["x"] * 2


def _concurrently(url: str, bodies: list[dict]) -> list[httpx.Response]:
    """POST every body at the same moment, one thread each."""
    start = threading.Barrier(len(bodies))
    responses: list[httpx.Response | None] = [None] * len(bodies)

    def send(index: int) -> None:
        start.wait(TIMEOUT)
        responses[index] = httpx.post(url, json=bodies[index], timeout=TIMEOUT)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert all(r is not None for r in responses)
    return responses  # type: ignore[return-value]


def test_coalesced_requests_each_get_their_own_rows_and_errors():
    flow = sf.Flow("rows")
    doubled = flow.map(unlucky, names=["y"], name="double")
    doubled.filter(lambda r: r["y"] % 4 == 0, name="by4")
    app = flow.deploy()
    app.run({"x": [0]}).result(timeout=3 * TIMEOUT)  # workers started, the stage loaded
    bodies = [{"rows": [{"x": 100 * i + k} for k in range(1 + i % 3)]} for i in range(32)]
    failing = (5, 18, 27)
    for i in failing:  # each fails, alone
        bodies[i] = {"rows": [{"x": 100 * i + 12}, {"x": 100 * i + 13}]}
    with Server({"rows": app}, port=0) as srv:
        coalescer = srv.state.coalescers["rows"]
        sent, deadline = 0, time.monotonic() + 3 * TIMEOUT
        # Rounds until a merged request held a failing one: it failed, and each of its
        # requests ran again alone (which of them are read together is up to timing).
        while coalescer.requests == sent and time.monotonic() < deadline:
            responses = _concurrently(f"{srv.url}/v1/flows/rows/predict", bodies)
            sent += len(bodies)
            for index, (body, response) in enumerate(zip(bodies, responses, strict=True)):
                if index in failing:
                    assert response.status_code == 500, response.text
                    assert f"{100 * index + 13} is unlucky" in response.json()["error"]
                    continue
                expected = [{"y": 2 * r["x"]} for r in body["rows"] if (2 * r["x"]) % 4 == 0]
                assert response.status_code == 200, response.text
                assert response.json() == {"rows": expected}
        assert coalescer.merged_requests >= 1
        assert coalescer.requests > sent, "no merged request held a failing one"


def test_whole_request_operators_and_slo_batching_are_never_coalesced():
    slo = sf.Flow("slo")
    slo.map(lambda t: t.column("x"), names=["y"], batching=sf.Batching(slo_ms=500))
    with Server({"slo": slo.deploy()}, port=0) as srv:
        assert not srv.state.coalescers  # the controller batches, one arrival per request
    flow = sf.Flow("counts")
    flow.agg("count", "x")
    with Server({"counts": flow.deploy()}, port=0) as srv:
        assert not srv.state.coalescers  # agg sees a request as a whole
        bodies = [{"rows": [{"x": k} for k in range(1 + i % 4)]} for i in range(16)]
        responses = _concurrently(f"{srv.url}/v1/flows/counts/predict", bodies)
    for body, response in zip(bodies, responses, strict=True):
        assert response.json() == {"rows": [{"x": len(body["rows"])}]}


def slow_double(row):
    time.sleep(0.01)  # a model's worth of work per row
    return 2 * row["x"]


def test_rows_that_cost_milliseconds_are_not_coalesced():
    """Merged rows run one after another on one worker: once rows are measured to cost
    milliseconds, concurrent requests go apart (bar a probe a second) and use the pool."""
    flow = sf.Flow("slow")
    flow.map(slow_double, names=["x"], name="double").map(slow_double, names=["y"])
    cheap = sf.Flow("cheap")
    cheap.map(lambda r: r["x"], names=["x"])
    runtime = sf.LocalRuntime(min_workers=2, max_workers=2)
    apps = {"slow": flow.deploy(runtime=runtime), "cheap": cheap.deploy(runtime=runtime)}
    try:
        with Server(apps, port=0) as srv:
            for name in apps:  # warm: stages loaded, a cost measured
                for x in range(3):
                    httpx.post(f"{srv.url}/v1/flows/{name}/predict",
                               json={"rows": [{"x": x}]}, timeout=TIMEOUT)  # fmt: skip
            coalescers = srv.state.coalescers
            merged = {name: coalescers[name].merged_requests for name in apps}
            probes = coalescers["slow"].probes
            started = time.monotonic()
            for _ in range(4):
                for name in apps:
                    bodies = [{"rows": [{"x": i}]} for i in range(16)]
                    responses = _concurrently(f"{srv.url}/v1/flows/{name}/predict", bodies)
                    assert all(r.status_code == 200 for r in responses), responses[0].text
            elapsed = time.monotonic() - started
            added = {n: coalescers[n].merged_requests - merged[n] for n in apps}
            probes = coalescers["slow"].probes - probes
    finally:
        runtime.stop()
    # merged in probes only (each one merged request per worker), and probes are rare
    assert probes <= 1 + elapsed / PROBE_EVERY_S
    assert added["slow"] <= 2 * probes
    assert added["cheap"] >= 1  # cheap rows still merge


def _busy(x, ms):
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        pass
    return x


def _load_on_both_workers(app: sf.App, stage: str) -> None:
    """Run requests until both workers of the runtime have loaded `stage`."""
    deadline = time.monotonic() + TIMEOUT
    while app.stats()[stage]["workers"] < 2 and time.monotonic() < deadline:
        for future in [app.run({"x": [i]}) for i in range(8)]:
            future.result(timeout=TIMEOUT)


def test_rows_of_next_to_no_cost_read_together_go_as_one_runtime_request():
    """Once the coalescer has seen requests of several sizes, 16 requests of an
    identity map read together go as one runtime request: cut per worker, each part
    would cost a request's fixed time for no parallel gain (dear rows are still cut per
    worker: the test below, and the fit's own test). Of 3 groups, a spell of a busy
    machine may have one cut: on a 2-core machine with 2 CPU hogs, 1 run in 4 did; and
    two in one run of the whole suite in CI."""
    flow = sf.Flow("rows")
    flow.map(lambda r: r["x"], names=["x"], name="rows")
    runtime = sf.LocalRuntime(min_workers=2, max_workers=2)
    try:
        app = flow.deploy(runtime=runtime)
        _load_on_both_workers(app, "rows")
        coalescer = Coalescer(app)

        async def together(count: int) -> list[sf.Table]:
            return await asyncio.gather(
                *(coalescer.run(sf.Table({"x": [i]})) for i in range(count))
            )

        # what a row costs against a request: parts of 1 to 4 rows, 2 at a time (a
        # lone request, faster on a busy machine, would read as rows that cost time)
        for _ in range(5):
            for count in range(2, 9):
                asyncio.run(together(count))
        time.sleep(1.2)  # the coalescer fits its figures at most once a second
        before = app.stats()["rows"]["requests"]
        for _ in range(3):  # each after a fit that has the group before it
            outputs = asyncio.run(together(16))
            assert [out.column("x")[0] for out in outputs] == list(range(16))
            time.sleep(1.1)  # (workers report their figures every 0.25 s while busy)
        # 3 if each group went as one; cut per worker, 6
        assert app.stats()["rows"]["requests"] - before <= 5
    finally:
        runtime.stop()


def test_the_fit_of_a_rows_cost_against_a_requests_fixed_cost():
    fixed, per_row = 1.0, 0.5
    trips = [(rows, fixed + per_row * rows) for rows in (1, 2, 4, 8)] * 3
    assert coalesce._row_share(trips) == pytest.approx(per_row / fixed)
    # time queued, the same whatever the size, counts as fixed: fewer parts
    queued = [(rows, ms + 4.0) for rows, ms in trips]
    assert coalesce._row_share(queued) == pytest.approx(per_row / (fixed + 4.0))
    cheap = [(rows, 0.8 + 0.002 * rows) for rows in (1, 3, 5, 7)] * 2
    assert coalesce._row_share(cheap) < 0.01  # 16 rows: one part
    held = [*cheap[:-1], (7, 5.0)]  # one request held by the machine: still one part
    assert coalesce._row_share(held) < 0.01
    assert coalesce._row_share([(4, 2.0)] * 10) is None  # one size: no slope to read
    assert coalesce._row_share(trips[:4]) is None  # too few requests yet


def test_requests_read_together_are_merged_into_one_runtime_request_per_worker():
    """One merged request runs on one worker while the others idle: 16 requests read in
    one event-loop iteration go as one runtime request per worker of the first stage."""
    flow = sf.Flow("cheap")
    flow.map(lambda r: r["x"], names=["x"], name="same")
    runtime = sf.LocalRuntime(min_workers=2, max_workers=2)
    try:
        app = flow.deploy(runtime=runtime)
        _load_on_both_workers(app, "same")
        assert app.stats()["same"]["workers"] == 2
        coalescer = Coalescer(app)

        async def together() -> list[sf.Table]:
            return await asyncio.gather(*(coalescer.run(sf.Table({"x": [i]})) for i in range(16)))

        time.sleep(0.5)  # the warm-up's figures reported
        before = app.stats()["same"]["requests"]
        outputs = asyncio.run(together())
        assert [out.column("x")[0] for out in outputs] == list(range(16))
        time.sleep(1.0)  # workers report their figures every 0.25 s while busy
        assert app.stats()["same"]["requests"] - before == 2
    finally:
        runtime.stop()


def test_a_request_goes_at_once_to_an_idle_worker_and_waits_for_company_only_when_none_is():
    """While a request runs on one of two workers, the next goes at once to the other
    (waiting for company whenever anything ran had 2 closed-loop clients wait 2 ms a
    round); once both workers run one, requests wait the busy window and go merged."""
    flow = sf.Flow("rows")
    flow.map(lambda r: _busy(r["x"], 0.5), names=["x"], name="rows")  # cheap rows: merged
    runtime = sf.LocalRuntime(min_workers=2, max_workers=2)
    try:
        app = flow.deploy(runtime=runtime)
        _load_on_both_workers(app, "rows")
        coalescer = Coalescer(app, busy_window_s=2.0)

        async def scenario() -> tuple[list[str], int]:
            finished: list[str] = []

            async def request(name: str, rows: int) -> None:
                await coalescer.run(sf.Table({"x": list(range(rows))}))
                finished.append(name)

            long = asyncio.create_task(request("long", 600))  # 0.3 s on one worker
            await asyncio.sleep(0.05)
            await request("short", 1)  # the other worker is idle: no 2 s wait
            other = asyncio.create_task(request("other long", 600))
            await asyncio.sleep(0.05)
            merged = coalescer.merged_requests
            # both workers busy: these wait the window, and go merged, one part a worker
            await asyncio.gather(*(request(name, 1) for name in "abcd"))
            await asyncio.gather(long, other)
            return finished, coalescer.merged_requests - merged

        finished, merged = asyncio.run(scenario())
        assert finished.index("short") < finished.index("long")
        assert merged == 2
    finally:
        runtime.stop()


def test_the_wait_for_the_event_loop_after_an_answer_is_its_recent_median() -> None:
    from serveflow.serving.app import LAG_WINDOW_S, DeliveryLag

    lag = DeliveryLag()
    assert lag.expected(0.0) == 0.0  # nothing answered yet
    for i in range(99):
        lag.observe(0.5 + i * 1e-3, 0.001 if i % 3 else 0.05)
    assert lag.expected(0.6) == pytest.approx(0.001)  # a third waited long: not the median
    for i in range(150):
        lag.observe(0.6 + i * 1e-3, 0.05 if i % 3 else 0.001)
    assert lag.expected(0.75) == pytest.approx(0.05)  # the loop got busy
    # the loop went quiet: what it waited a second ago says nothing of the next answer
    assert lag.expected(0.75 + LAG_WINDOW_S) == 0.0


def test_a_request_read_after_a_long_turn_of_the_event_loop_counts_it_as_waited():
    """Its bytes may have come as that turn began: the server counts the wait against
    the SLO (`LoopTurns.since`). An idle loop stops marking turns: nothing is owed."""
    turns = LoopTurns()

    async def turns_of_a_busy_loop() -> tuple[float, float, bool]:
        loop = asyncio.get_running_loop()
        turns.reading(loop)  # a request read: turns are marked from now
        await asyncio.sleep(0)
        time.sleep(0.05)  # this turn runs 50 ms (the other requests' work)
        turns.reading(loop)  # ... and reads another request
        await asyncio.sleep(0)
        now = time.monotonic()
        waited = now - turns.since(now)
        for _ in range(3):  # turns that read nothing
            await asyncio.sleep(0)
        now = time.monotonic()
        return waited, now - turns.since(now), turns.ticking

    waited, idle, ticking = asyncio.run(turns_of_a_busy_loop())
    assert waited >= 0.05
    assert idle == 0.0 and not ticking


def test_a_refusal_on_a_connection_the_server_closes_says_so():
    """SLO 20 ms, calls of 100 ms: after the first timed call, arrivals are refused
    (but a probe every 0.2 s) as they are read, the connection closed when the client
    asked for it, or spoke HTTP/1.0, with `Connection: close` in the 503."""
    flow = sf.Flow("slo")
    flow.map(_model_of_100_ms, names=["y"], batching=sf.Batching(slo_ms=20), name="model")
    app = flow.deploy(runtime=sf.LocalRuntime(min_workers=1, max_workers=1))
    body = b'{"rows": [{"x": 1}]}'
    refusals = []
    with Server({"slo": app}, port=0) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        for version, close in [("1.1", "Connection: close\r\n"), ("1.0", "")] * 10:
            head = f"POST /v1/flows/slo/predict HTTP/{version}\r\nHost: x\r\n{close}"
            head += f"Content-Length: {len(body)}\r\n\r\n"
            with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
                sock.sendall(head.encode() + body)
                answer = _answers(sock, 1)[0]
                assert sock.recv(1) == b""  # closed
            if b" 503 " in answer.split(b"\r\n")[0]:
                refusals.append(answer.lower())
    assert refusals
    # (a head as `_answers` reads it ends without its last line's CRLF: uvicorn's 503
    # puts the header last)
    assert all(b"\r\nconnection: close\r\n" in answer + b"\r\n" for answer in refusals), refusals
