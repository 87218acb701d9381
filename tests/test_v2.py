"""The Open Inference Protocol (KServe V2) with NVIDIA's own clients (tritonclient):
HTTP with binary data on and off, gRPC, and their asyncio clients under concurrency."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import httpx
import jsonschema
import numpy as np
import orjson
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from google.rpc import error_details_pb2, status_pb2
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

import serveflow as sf
from serveflow.serving import Server
from serveflow.serving.limits import Limits, MiB

TIMEOUT = 10
PROTOCOLS = ["http-binary", "http-json", "grpc"]


def arith_flow() -> sf.Flow:
    flow = sf.Flow("arith", schema={"a": int, "b": int})
    total = flow.map(lambda r: r["a"] + r["b"], names=["sum"], name="add")
    total.filter(lambda r: r["sum"] % 2 == 0, name="even")
    return flow


def tensor_flow() -> sf.Flow:
    flow = sf.Flow("tensor", schema={"x": np.ndarray})
    flow.map(lambda r: (r["x"] * 2, float(r["x"].sum())), names=["y", "total"], name="double")
    return flow


def text_flow() -> sf.Flow:
    flow = sf.Flow("text", schema={"s": str, "raw": bytes})
    flow.map(
        lambda r: (r["s"].upper(), len(r["raw"]), r["raw"][::-1], r["s"] == "yes"),
        names=["upper", "n", "reversed", "yes"],
        name="strings",
    )
    return flow


def explode(row):
    raise ValueError(f"cannot handle {row['x']}")


def failing_flow() -> sf.Flow:
    flow = sf.Flow("fails")
    flow.map(explode, names=["y"], name="explode")
    return flow


def slow_flow() -> sf.Flow:
    flow = sf.Flow("slow", schema={"s": float})
    flow.map(lambda r: time.sleep(r["s"]) or r["s"], names=["slept"], name="nap")
    return flow


@pytest.fixture(scope="module")
def server():
    runtime = sf.LocalRuntime()
    flows = (arith_flow(), tensor_flow(), text_flow(), failing_flow())
    apps = {f.name: f.deploy(runtime=runtime) for f in flows}
    slow_runtime = sf.LocalRuntime(max_in_flight=1)  # a second request is refused
    apps["slow"] = slow_flow().deploy(runtime=slow_runtime)
    with Server(apps, port=0, grpc_port=0, max_body_bytes=64 * 1024) as srv:
        yield srv
    runtime.stop()
    slow_runtime.stop()


class Client:
    """One tritonclient per protocol, with the input/output helpers of its module."""

    def __init__(self, server: Server, protocol: str, headers: dict[str, str] | None = None):
        self.protocol = protocol
        self.binary = protocol == "http-binary"
        self.module = grpcclient if protocol == "grpc" else httpclient
        if protocol == "grpc":
            self.client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        else:
            self.client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
        self.headers = headers

    def tensor(self, name: str, array: np.ndarray, datatype: str):
        tensor = self.module.InferInput(name, list(array.shape), datatype)
        if self.protocol == "grpc":
            tensor.set_data_from_numpy(array)
        else:
            tensor.set_data_from_numpy(array, binary_data=self.binary)
        return tensor

    def infer(self, model: str, inputs: dict, outputs: list[str] | None = None, **kwargs):
        tensors = [self.tensor(name, *spec) for name, spec in inputs.items()]
        requested = None
        if outputs is not None:
            if self.protocol == "grpc":
                requested = [grpcclient.InferRequestedOutput(n) for n in outputs]
            else:
                requested = [
                    httpclient.InferRequestedOutput(n, binary_data=self.binary) for n in outputs
                ]
        return self.client.infer(model, tensors, outputs=requested, headers=self.headers, **kwargs)

    def __getattr__(self, name):
        return getattr(self.client, name)


@pytest.fixture(params=PROTOCOLS)
def client(request, server):
    c = Client(server, request.param)
    yield c
    c.client.close()


def _status(error: InferenceServerException) -> str:
    return str(error.status())


def _expect_error(client: Client, http_status: int, grpc_code: str, call, *args, **kwargs):
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)
    expected = f"StatusCode.{grpc_code}" if client.protocol == "grpc" else str(http_status)
    assert _status(caught.value) == expected, caught.value
    return caught.value.message()


# --- health and metadata ---------------------------------------------------------------


def test_health_and_server_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("arith")
    assert client.is_model_ready("arith", "1")
    assert not client.is_model_ready("nope")
    assert not client.is_model_ready("arith", "2")
    metadata = (
        client.get_server_metadata(as_json=True)
        if client.protocol == "grpc"
        else (client.get_server_metadata())
    )
    assert metadata["name"] == "serveflow"
    assert metadata["version"] == sf.__version__
    assert {"binary_tensor_data", "model_configuration", "statistics"} <= set(
        metadata["extensions"]
    )


def _json(client: Client, call, *args):
    return call(*args, as_json=True) if client.protocol == "grpc" else call(*args)


def test_model_metadata_follows_the_schema_and_the_outputs_seen(client):
    meta = _json(client, client.get_model_metadata, "arith")
    assert meta["name"] == "arith" and meta["versions"] == ["1"]
    assert meta["platform"] == "serveflow"
    inputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]}
    assert inputs == {"a": ("INT64", [-1]), "b": ("INT64", [-1])}
    x = np.ones((2, 3, 4), dtype=np.float32)
    client.infer("tensor", {"x": (x, "FP32")})
    meta = _json(client, client.get_model_metadata, "tensor")
    outputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["outputs"]}
    assert outputs == {"y": ("FP32", [-1, 3, 4]), "total": ("FP64", [-1])}
    message = _expect_error(client, 404, "NOT_FOUND", client.get_model_metadata, "nope")
    assert "'nope'" in message and "arith" in message  # names the models served
    message = _expect_error(client, 404, "NOT_FOUND", client.get_model_metadata, "arith", "7")
    assert "version '7'" in message


def test_model_config(client):
    config = _json(client, client.get_model_config, "arith")
    config = config.get("config", config)  # gRPC wraps it in ModelConfigResponse
    assert config["name"] == "arith"
    assert [(t["name"], t["data_type"]) for t in config["input"]] == [
        ("a", "TYPE_INT64"),
        ("b", "TYPE_INT64"),
    ]
    assert "stage 1" in config["parameters"]["explain"]["string_value"]


# --- inference -------------------------------------------------------------------------


def test_numeric_tensors_run_through_the_flow(client):
    a = np.array([1, 2, 3, 4], dtype=np.int64)
    b = np.array([1, 1, 1, 10], dtype=np.int32)  # an INT32 tensor fills an int column too
    result = client.infer("arith", {"a": (a, "INT64"), "b": (b, "INT32")})
    total = result.as_numpy("sum")
    assert total.dtype == np.int64
    assert total.tolist() == [2, 4, 14]  # the filter kept the even sums


def test_tensor_cells_keep_their_shape_and_dtype(client):
    x = np.arange(24, dtype=np.float32).reshape(3, 2, 4)
    result = client.infer("tensor", {"x": (x, "FP32")})
    y = result.as_numpy("y")
    assert y.dtype == np.float32 and y.shape == (3, 2, 4)
    np.testing.assert_array_equal(y, x * 2)
    np.testing.assert_allclose(result.as_numpy("total"), x.reshape(3, -1).sum(axis=1))
    # A tensor of one row, and of other numeric types, round-trips too.
    for dtype, datatype in ((np.uint8, "UINT8"), (np.float64, "FP64"), (np.int16, "INT16")):
        x = np.arange(6, dtype=dtype).reshape(1, 2, 3)
        y = client.infer("tensor", {"x": (x, datatype)}).as_numpy("y")
        assert y.dtype == dtype
        np.testing.assert_array_equal(y, x * 2)


def test_bytes_are_str_or_bytes_as_the_schema_says(client):
    s = np.array(["héllo", "yes", ""], dtype=np.object_)
    raw = np.array([b"\xff\x00\x01", b"ab", b""], dtype=np.object_)
    if client.protocol == "http-json":
        raw = np.array(["xyz", "ab", ""], dtype=np.object_)  # JSON carries text only
    result = client.infer("text", {"s": (s, "BYTES"), "raw": (raw, "BYTES")})
    assert [v.decode() for v in result.as_numpy("upper")] == ["HÉLLO", "YES", ""]
    assert result.as_numpy("n").tolist() == [3, 2, 0]  # bytes in the flow: their length
    assert result.as_numpy("yes").tolist() == [False, True, False]
    if client.protocol != "http-json":
        assert result.as_numpy("reversed").tolist() == [b"\x01\x00\xff", b"ba", b""]


def test_non_utf8_bytes_need_binary_output_over_json(server):
    client = Client(server, "http-json")
    s = np.array(["a"], dtype=np.object_)
    raw = httpclient.InferInput("raw", [1], "BYTES")
    raw.set_data_from_numpy(np.array([b"\xff"], dtype=np.object_), binary_data=True)
    with pytest.raises(InferenceServerException) as caught:
        client.client.infer(
            "text",
            [client.tensor("s", s, "BYTES"), raw],
            outputs=[httpclient.InferRequestedOutput("reversed", binary_data=False)],
        )
    assert "binary" in caught.value.message() and "'reversed'" in caught.value.message()


def test_requested_outputs_only(client):
    x = np.ones((2, 2), dtype=np.float32)
    result = client.infer("tensor", {"x": (x, "FP32")}, outputs=["total"])
    assert result.as_numpy("total").tolist() == [2.0, 2.0]
    assert result.as_numpy("y") is None
    message = _expect_error(
        client, 400, "INVALID_ARGUMENT", client.infer, "tensor", {"x": (x, "FP32")}, ["nope"]
    )
    assert "'nope'" in message and "total" in message


# --- errors ----------------------------------------------------------------------------


def test_bad_input_is_invalid_argument_naming_it(client):
    a = np.array([1.5], dtype=np.float32)
    b = np.array([1], dtype=np.int64)
    message = _expect_error(
        client,
        400,
        "INVALID_ARGUMENT",
        client.infer,
        "arith",
        {"a": (a, "FP32"), "b": (b, "INT64")},
    )
    assert "'a'" in message and "int" in message  # the schema wants int
    message = _expect_error(
        client, 400, "INVALID_ARGUMENT", client.infer, "arith", {"a": (b, "INT64")}
    )
    assert "'b'" in message  # the missing column
    two = np.array([1, 2], dtype=np.int64)
    message = _expect_error(
        client,
        400,
        "INVALID_ARGUMENT",
        client.infer,
        "arith",
        {"a": (b, "INT64"), "b": (two, "INT64")},
    )
    assert "first dimension" in message


def test_failing_operator_is_internal_naming_it(client):
    message = _expect_error(
        client, 500, "INTERNAL", client.infer, "fails", {"x": (np.array([7]), "INT64")}
    )
    assert "explode" in message and "cannot handle 7" in message
    assert "Traceback" not in message


def test_unknown_model_is_not_found(client):
    message = _expect_error(
        client, 404, "NOT_FOUND", client.infer, "nope", {"x": (np.array([1]), "INT64")}
    )
    assert "'nope'" in message


def test_deadline_is_deadline_exceeded(client):
    s = np.array([0.5])
    # gRPC: the call's deadline; HTTP: Triton's request timeout parameter, in µs.
    kwargs = {"client_timeout": 0.1} if client.protocol == "grpc" else {"timeout": 100_000}
    _expect_error(
        client, 504, "DEADLINE_EXCEEDED", client.infer, "slow", {"s": (s, "FP64")}, **kwargs
    )
    time.sleep(0.5)  # let the nap end: the slow flow takes one request at a time


def test_malformed_http_bodies_are_400(server):
    url = f"{server.url}/v2/models/arith/infer"
    one = '{"inputs": [{"name": "a", "datatype": "%s", "shape": %s, "data": %s}]}'
    cases = {
        "{not json": "malformed JSON",
        '{"inputs": 3}': '"inputs"',
        one % ("INT128", "[1]", "[1]"): "INT128",
        one % ("INT64", "[-1]", "[1]"): "shape",
        one % ("INT64", "[2]", "[1]"): "2 elements",
        one % ("INT64", "[1]", '["x"]'): "INT64",
        one % ("BOOL", "[1]", "[1]"): "BOOL",
        # numpy would take them (as 1, 7, 1): the JSON API's int column refuses them too
        one % ("INT64", "[1]", "[1.9]"): "INT64 data must be integers, got float",
        one % ("INT64", "[1]", '["7"]'): "INT64 data must be integers, got str",
        one % ("UINT8", "[2]", "[1, true]"): "UINT8 data must be integers, got bool",
        one % ("FP32", "[1]", "[true]"): "FP32 data must be numbers, got bool",
        one % ("INT64", "[1]", "[1" + "0" * 400 + "]"): "INT64",  # (orjson: infinite)
        '{"parameters": {"timeout": 1%s}, "inputs": []}' % ("0" * 400): "timeout",
    }
    for body, needle in cases.items():
        r = httpx.post(url, content=body.encode(), timeout=TIMEOUT)
        assert r.status_code == 400, body
        assert needle in r.json()["error"], (body, r.json())
    # Binary data: a header length past the body, sizes past the data, bytes left over.
    size = {"binary_data_size": 16}
    head = orjson.dumps(
        {"inputs": [{"name": "a", "datatype": "INT64", "shape": [2], "parameters": size}]}
    )
    for length, tail, needle in (
        (len(head) + 100, b"", "Inference-Header-Content-Length"),
        (len(head), b"\0" * 8, "binary_data_size"),
        (len(head), b"\0" * 24, "belong to no input"),
    ):
        r = httpx.post(
            url,
            content=head + tail,
            headers={"Inference-Header-Content-Length": str(length)},
            timeout=TIMEOUT,
        )
        assert r.status_code == 400 and needle in r.json()["error"], r.text


def test_body_over_the_limit(client):
    x = np.zeros((1, 128 * 1024), dtype=np.uint8)  # 128 KB > the 64 KB limit
    message = _expect_error(
        client, 413, "RESOURCE_EXHAUSTED", client.infer, "tensor", {"x": (x, "UINT8")}
    )
    if client.protocol != "grpc":  # gRPC's own message, from its max_receive_message_length
        assert "--max-body-mb" in message, message


# --- request limits: each checked before the memory it guards is spent ----------------

LIMITS = Limits(
    max_body_bytes=1 * MiB,  # large enough not to hide the limits below
    max_decoded_bytes=4000,
    max_elements=1000,
    max_depth=8,
    max_string_chars=64,
    max_rows=100,
)


@pytest.fixture(scope="module")
def limited():
    runtime = sf.LocalRuntime()
    apps = {f.name: f.deploy(runtime=runtime) for f in (tensor_flow(), text_flow())}
    with Server(apps, port=0, grpc_port=0, limits=LIMITS) as srv:
        yield srv
    runtime.stop()


@pytest.fixture(params=PROTOCOLS)
def limited_client(request, limited):
    c = Client(limited, request.param)
    yield c
    c.client.close()


def _strings(values: list[str], shape: tuple[int, ...] | None = None) -> np.ndarray:
    array = np.array(values, dtype=object)
    return array.reshape(shape) if shape else array


def _at_the_limits(client: Client) -> None:
    """Requests exactly at every limit are served (and the server still serves)."""
    x = np.arange(500, dtype=np.float64).reshape(100, 5)  # 100 rows, 4,000 bytes
    assert np.array_equal(client.infer("tensor", {"x": (x, "FP64")}).as_numpy("y"), x * 2)
    s, raw = _strings(["s" * 64]), _strings(["r" * 64])
    result = client.infer("text", {"s": (s, "BYTES"), "raw": (raw, "BYTES")})
    assert result.as_numpy("upper").tolist() == [b"S" * 64]


@pytest.mark.parametrize(
    "model, inputs, option",
    [
        ("tensor", {"x": (np.zeros((101, 1), np.uint8), "UINT8")}, "max-rows"),
        ("tensor", {"x": (np.zeros((10, 101), np.uint8), "UINT8")}, "max-elements"),
        ("tensor", {"x": (np.zeros((5, 101)), "FP64")}, "max-decoded-mb"),  # 4,040 bytes
        (
            "text",
            {"s": (_strings(["s" * 65]), "BYTES"), "raw": (_strings(["r"]), "BYTES")},
            "max-string-chars",
        ),
        (
            "text",
            {"s": (_strings(["r"], (1,)), "BYTES"), "raw": (_strings(["r" * 65]), "BYTES")},
            "max-string-chars",
        ),
        (
            "text",  # 1,010 BYTES elements in 10 rows
            {
                "s": (_strings(["s"] * 505, (5, 101)), "BYTES"),
                "raw": (_strings(["r"] * 505, (5, 101)), "BYTES"),
            },
            "max-elements",
        ),
    ],
    ids=["rows", "elements", "decoded-bytes", "string", "bytes-element", "bytes-elements"],
)
def test_inputs_over_a_limit(limited_client, model, inputs, option):
    client = limited_client
    message = _expect_error(client, 413, "RESOURCE_EXHAUSTED", client.infer, model, inputs)
    assert f"--{option}" in message and "over the limit" in message, message
    _at_the_limits(client)


def test_json_nested_over_the_depth_limit(limited):
    data: list = [1.0]
    for _ in range(6):  # the outer object, "inputs", an input and 7 lists: 10 deep
        data = [data]
    tensor = {"name": "x", "datatype": "FP64", "shape": [1] * 7, "data": data}
    r = httpx.post(
        f"{limited.url}/v2/models/tensor/infer", json={"inputs": [tensor]}, timeout=TIMEOUT
    )
    assert r.status_code == 413 and "--max-depth" in r.json()["error"], r.text
    _at_the_limits(Client(limited, "http-json"))


def test_grpc_typed_contents_over_a_limit(limited):
    channel = grpc.insecure_channel(f"127.0.0.1:{limited.grpc_port}")
    call = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=grpcclient.service_pb2.ModelInferRequest.SerializeToString,
        response_deserializer=grpcclient.service_pb2.ModelInferResponse.FromString,
    )
    many = grpcclient.service_pb2.ModelInferRequest(model_name="tensor")
    # Declares one element and holds 1,001: judged by what it holds.
    many.inputs.add(name="x", datatype="FP64", shape=[1]).contents.fp64_contents.extend(
        [0.0] * 1001
    )
    rows = grpcclient.service_pb2.ModelInferRequest(model_name="tensor")
    rows.inputs.add(name="x", datatype="INT64", shape=[101]).contents.int64_contents.extend(
        [1] * 101
    )
    wide = grpcclient.service_pb2.ModelInferRequest(model_name="tensor")
    wide.inputs.add(name="x", datatype="INT64", shape=[1, 501]).contents.int64_contents.extend(
        [1] * 501
    )  # 501 small integers travel in ~500 bytes, decode to 4,008
    long = grpcclient.service_pb2.ModelInferRequest(model_name="text")
    long.inputs.add(name="s", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"s" * 65)
    long.inputs.add(name="raw", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"r")
    for request, option in (
        (many, "max-elements"),
        (rows, "max-rows"),
        (wide, "max-decoded-mb"),
        (long, "max-string-chars"),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call(request, timeout=TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value
        assert f"--{option}" in caught.value.details(), caught.value.details()
    channel.close()
    _at_the_limits(Client(limited, "grpc"))


def test_unsupported_grpc_calls_are_unimplemented(server):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    with pytest.raises(InferenceServerException) as caught:
        client.load_model("arith")
    assert _status(caught.value) == "StatusCode.UNIMPLEMENTED"
    assert "RepositoryModelLoad" in caught.value.message()
    client.close()


def test_unknown_http_paths_and_methods(server):
    assert httpx.get(f"{server.url}/v2/models/arith/nothing").status_code == 404
    r = httpx.get(f"{server.url}/v2/models/arith/infer")
    assert r.status_code == 405 and "POST" in r.json()["error"]


def test_overload_is_unavailable_with_retry_information(server):
    results = []

    def first():
        c = Client(server, "grpc")
        results.append(c.infer("slow", {"s": (np.array([0.6]), "FP64")}).as_numpy("slept"))

    thread = threading.Thread(target=first)
    thread.start()
    try:
        _wait_in_flight(server, "slow", 1)
        channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        request = grpcclient.service_pb2.ModelInferRequest(model_name="slow")
        tensor = request.inputs.add(name="s", datatype="FP64", shape=[1])
        tensor.contents.fp64_contents.append(0.0)
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=grpcclient.service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=grpcclient.service_pb2.ModelInferResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as caught:
            call(request, timeout=TIMEOUT)
        http = httpx.post(
            f"{server.url}/v2/models/slow/infer",
            json={"inputs": [{"name": "s", "datatype": "FP64", "shape": [1], "data": [0.0]}]},
            timeout=TIMEOUT,
        )
    finally:
        thread.join(TIMEOUT)
    error = caught.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    trailers = dict(error.trailing_metadata())
    assert int(trailers["grpc-retry-pushback-ms"]) >= 1000
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    retry = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(retry) and retry.retry_delay.seconds >= 1
    assert http.status_code == 503 and int(http.headers["Retry-After"]) >= 1
    assert results and results[0].tolist() == [0.6]
    channel.close()


def _wait_in_flight(server: Server, flow: str, count: int) -> None:
    for _ in range(500):
        text = httpx.get(f"{server.url}/metrics").text
        values = {
            s.labels["flow"]: s.value
            for f in text_string_to_metric_families(text)
            if f.name == "serveflow_requests_in_flight"
            for s in f.samples
        }
        if values.get(flow, 0) >= count:
            return
        time.sleep(0.01)
    raise AssertionError(f"{flow} never had {count} request(s) in flight")


def test_server_admission_bound_refuses_v2_requests_too():
    app = slow_flow().deploy()
    with Server({"slow": app}, port=0, grpc_port=0, max_in_flight=1) as srv:
        results = []
        first = threading.Thread(
            target=lambda: results.append(
                Client(srv, "http-binary").infer("slow", {"s": (np.array([1.5]), "FP64")})
            )
        )
        first.start()
        try:
            _wait_in_flight(srv, "slow", 1)
            grpc_client = Client(srv, "grpc")
            _expect_error(
                grpc_client, 503, "UNAVAILABLE", grpc_client.infer, "slow",
                {"s": (np.array([0.0]), "FP64")},
            )  # fmt: skip
            # over HTTP, refused by the HTTP protocol at its headers: counted as V2's
            http = Client(srv, "http")
            _expect_error(http, 503, "", http.infer, "slow", {"s": (np.array([0.0]), "FP64")})
            stage_requests = sum(s["requests"] for s in app.stats().values())
        finally:
            first.join(TIMEOUT)
        # (1.5 s: long enough to be seen in flight on a loaded machine)
        assert results and results[0].as_numpy("slept").tolist() == [1.5]
        assert stage_requests <= 1  # the refused request never reached the runtime
        families = text_string_to_metric_families(httpx.get(f"{srv.url}/metrics").text)
        answers = {(s.labels["route"], s.labels["status"]): s.value for f in families
                   for s in f.samples if s.name == "serveflow_http_responses_total"}  # fmt: skip
        assert answers[("/v2", "503")] == 1 and answers[("/v2", "200")] >= 1, answers
        assert not any(route.startswith("/v1") for route, _ in answers), answers
        stats = _model_stats(http, "slow")["inference_stats"]
        assert stats["fail"]["count"] == 2 and stats["success"]["count"] == 1, stats


# --- statistics and metrics ------------------------------------------------------------


def _model_stats(client: Client, name: str) -> dict:
    stats = _json(client, client.get_inference_statistics, name)
    (entry,) = stats["model_stats"]
    return entry


def test_statistics_count_inferences_and_failures(client):
    before = _model_stats(client, "arith")
    a = np.array([2, 4, 6], dtype=np.int64)
    for _ in range(3):
        client.infer("arith", {"a": (a, "INT64"), "b": (a, "INT64")})
    with pytest.raises(InferenceServerException):
        client.infer("arith", {"a": (a, "INT64")})
    after = _model_stats(client, "arith")
    assert after["name"] == "arith" and after["version"] == "1"

    def count(entry, *path):
        for key in path:
            entry = entry.get(key, {})
        return int(entry or 0)

    assert count(after, "inference_count") - count(before, "inference_count") == 9
    success = ("inference_stats", "success", "count")
    assert count(after, *success) - count(before, *success) == 3
    fail = ("inference_stats", "fail", "count")
    assert count(after, *fail) - count(before, *fail) == 1
    assert count(after, "inference_stats", "compute_infer", "ns") > 0
    assert int(after["last_inference"]) > 0
    everything = _json(client, client.get_inference_statistics)
    assert {m["name"] for m in everything["model_stats"]} >= {"arith", "tensor", "slow"}


def nap_flow() -> sf.Flow:
    flow = sf.Flow("nap", schema={"s": float})
    flow.map(lambda r: time.sleep(r["s"]) or r["s"], names=["slept"], name="nap")
    return flow


def _ns(entry: dict, kind: str, what: str) -> int:
    return int(entry["inference_stats"][kind].get(what, 0))  # gRPC's JSON: int64 as str


@pytest.mark.parametrize(
    ("protocol", "timeout_s"),
    [("grpc", None), ("http-binary", None), ("grpc", 30)],
    ids=["grpc-coalesced", "http-coalesced", "grpc-deadline"],  # a deadline: not coalesced
)
def test_statistics_count_the_time_queued_behind_a_busy_worker(protocol, timeout_s):
    """One worker; three requests of 0.3 s each sent 50 ms apart: the second waits
    about 0.25 s for the worker, the third about 0.5 s. Triton's `queue` says so, in
    ns, and `compute_infer` no longer holds that wait."""
    nap, spacing, sent = 0.3, 0.05, 3
    runtime = sf.LocalRuntime(max_workers=1)
    app = nap_flow().deploy(runtime=runtime)
    try:
        with Server({"nap": app}, port=0, grpc_port=0) as srv:
            Client(srv, protocol).infer("nap", {"s": (np.array([0.0]), "FP64")})  # warm

            def stats() -> dict[str, dict]:
                return {p: _model_stats(Client(srv, p), "nap") for p in ("grpc", "http-json")}

            before = stats()
            kwargs = {} if timeout_s is None else {"client_timeout": timeout_s}

            def one() -> None:
                Client(srv, protocol).infer("nap", {"s": (np.array([nap]), "FP64")}, **kwargs)

            threads = [threading.Thread(target=one) for _ in range(sent)]
            for thread in threads:
                thread.start()
                time.sleep(spacing)
            for thread in threads:
                thread.join(TIMEOUT)
            after = stats()
    finally:
        app.stop()
        runtime.stop()
    # the same figures over both protocols, counts and durations alike
    for kind in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        for what in ("count", "ns"):
            assert _ns(after["grpc"], kind, what) == _ns(after["http-json"], kind, what)
    delta = {
        kind: {
            what: _ns(after["grpc"], kind, what) - _ns(before["grpc"], kind, what)
            for what in ("count", "ns")
        }
        for kind in ("success", "queue", "compute_infer")
    }
    assert delta["success"]["count"] == delta["queue"]["count"] == sent
    queued_s = delta["queue"]["ns"] / 1e9
    expected_s = sum(i * (nap - spacing) for i in range(sent))  # 0 + 0.25 + 0.5
    assert expected_s * 0.7 <= queued_s < delta["success"]["ns"] / 1e9, delta
    infer_s = delta["compute_infer"]["ns"] / 1e9
    assert sent * nap * 0.9 <= infer_s < sent * nap + expected_s * 0.5, delta


KINDS = ("compute_input", "compute_infer", "compute_output")


def _batches(client: Client, name: str) -> dict[int, dict[str, tuple[int, int]]]:
    """batch_stats as {batch_size: {kind: (count, ns)}} (gRPC's JSON leaves out zeros
    and writes int64 as strings)."""
    return {
        int(entry.get("batch_size", 0)): {
            kind: (int(entry.get(kind, {}).get("count", 0)), int(entry.get(kind, {}).get("ns", 0)))
            for kind in KINDS
        }
        for entry in _model_stats(client, name).get("batch_stats", [])
    }


def _settled_batches(srv: Server, name: str, rows: int) -> dict[int, dict[str, tuple[int, int]]]:
    """The batch statistics once the calls of `rows` rows are reported (workers report
    every few hundred ms), the same over gRPC and HTTP."""
    for _ in range(100):
        seen = {p: _batches(Client(srv, p), name) for p in ("grpc", "http-json")}
        if sum(size * b["compute_infer"][0] for size, b in seen["grpc"].items()) >= rows:
            break
        time.sleep(0.05)
    assert seen["grpc"] == seen["http-json"]
    return seen["grpc"]


def batched_triple(table):
    time.sleep(0.02)  # a call's cost, which the statistics see
    return [3 * x for x in table.column("x")]


def test_batch_statistics_count_the_rows_each_call_ran():
    """Triton's batch_stats: one entry per batch size run. 32 one-row requests at once
    to a batching map run in the worker's batches of up to 8 rows; 2-row requests at once to a plain
    map are coalesced into calls of more rows; one-row requests one after another run
    as calls of 1 row. Counts add up to the calls and rows the workers ran."""
    batched = sf.Flow("batched", schema={"x": int})
    batched.map(
        batched_triple, names=["y"], batching=sf.Batching(max_size=8, timeout_ms=100),
        name="triple",
    )  # fmt: skip
    single = sf.Flow("single", schema={"x": int})
    single.map(lambda r: r["x"] + 1, names=["y"], name="increment")
    runtime = sf.LocalRuntime()
    apps = {f.name: f.deploy(runtime=runtime) for f in (batched, arith_flow(), single)}
    try:
        with Server(apps, port=0, grpc_port=0) as srv:
            client = Client(srv, "grpc")
            assert _batches(client, "batched") == {}

            async def together(count: int) -> list[list[int]]:
                aio = grpcaio.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")

                async def one(i: int) -> list[int]:
                    x = grpcaio.InferInput("x", [1], "INT64")
                    x.set_data_from_numpy(np.array([i], dtype=np.int64))
                    # a deadline: not coalesced, each request reaches the worker's batches
                    result = await aio.infer("batched", [x], client_timeout=30)
                    return result.as_numpy("y").tolist()

                try:
                    return await asyncio.gather(*(one(i) for i in range(count)))
                finally:
                    await aio.close()

            assert asyncio.run(together(32)) == [[3 * i] for i in range(32)]
            seen = _settled_batches(srv, "batched", 32)
            assert sum(size * b["compute_infer"][0] for size, b in seen.items()) == 32
            assert max(seen) > 1 and max(seen) <= 8, seen
            # one row per request: the runtime's own batch sizes (requests per call)
            runtime_sizes = apps["batched"].stats()["triple"]["batch_sizes"]
            assert {size: b["compute_infer"][0] for size, b in seen.items()} == {
                int(size): calls for size, calls in runtime_sizes.items()
            }
            for size, b in seen.items():
                calls = b["compute_infer"][0]
                assert b["compute_input"][0] == b["compute_output"][0] == calls
                assert b["compute_infer"][1] >= calls * 0.02e9, (size, b)  # each slept
                if size > 1:  # rows were merged into one table, then split
                    assert b["compute_input"][1] > 0 and b["compute_output"][1] > 0

            # coalesced: requests of 2 rows at once become runtime requests of more rows
            merged_before = srv.state.coalescers["arith"].merged_requests
            for _ in range(2):
                asyncio.run(_many(srv, "grpc", 64))
            assert srv.state.coalescers["arith"].merged_requests > merged_before
            seen = _settled_batches(srv, "arith", 2 * 64 * 2)
            assert sum(size * b["compute_infer"][0] for size, b in seen.items()) == 256
            assert max(seen) > 2, seen
            assert min(seen) >= 2, seen  # no request was split

            # one row at a time
            for i in range(5):
                result = client.infer("single", {"x": (np.array([i]), "INT64")})
                assert result.as_numpy("y").tolist() == [i + 1]
            seen = _settled_batches(srv, "single", 5)
            assert list(seen) == [1] and seen[1]["compute_infer"][0] == 5, seen
            assert seen[1]["compute_infer"][1] > 0
    finally:
        runtime.stop()


def test_v2_requests_count_in_the_prometheus_metrics(server):
    def ok_count() -> float:
        text = httpx.get(f"{server.url}/metrics").text
        for family in text_string_to_metric_families(text):
            if family.name == "serveflow_requests":
                for sample in family.samples:
                    if sample.labels == {"flow": "tensor", "status": "200"}:
                        return sample.value
        return 0.0

    before = ok_count()
    for protocol in PROTOCOLS:
        Client(server, protocol).infer("tensor", {"x": (np.ones((1, 2), np.float32), "FP32")})
    assert ok_count() - before == len(PROTOCOLS)


# --- the OpenAPI document ---------------------------------------------------------------


def test_openapi_lists_the_v2_endpoints_and_what_they_answer_matches_it(server):
    spec = httpx.get(f"{server.url}/openapi.json").json()
    paths = spec["paths"]
    assert {"/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/stats"} <= set(paths)
    assert {"get", "post"} <= set(paths["/v2/repository/index"])
    for name in server.state.apps:
        for base in (f"/v2/models/{name}", f"/v2/models/{name}/versions/{{version}}"):
            for suffix in ("", "/ready", "/config", "/stats"):
                assert "get" in paths[base + suffix], base + suffix
            assert "post" in paths[base + "/infer"]
    infer = paths["/v2/models/arith/infer"]["post"]
    assert {"200", "400", "413", "500", "503", "504"} <= set(infer["responses"])
    assert "`a` (INT64), `b` (INT64)" in infer["description"]

    def schema(path: str, method: str, status: str, media: str = "application/json") -> dict:
        operation = paths[path][method]
        where = operation["responses"][status] if status else operation["requestBody"]
        return {**where["content"][media]["schema"], "components": spec["components"]}

    def matches(path: str, method: str, answer: httpx.Response) -> None:
        assert answer.headers["content-type"] == "application/json"
        jsonschema.validate(answer.json(), schema(path, method, str(answer.status_code)))

    # What tritonclient sends is a valid request body; the example is one too, and runs.
    a = np.array([1, 2], dtype=np.int64)
    tensors = []
    for column in "ab":
        tensor = httpclient.InferInput(column, [2], "INT64")
        tensor.set_data_from_numpy(a, binary_data=False)
        tensors.append(tensor)
    body, _ = httpclient.InferenceServerClient.generate_request_body(
        tensors, [httpclient.InferRequestedOutput("sum", binary_data=False)], request_id="7"
    )
    jsonschema.validate(orjson.loads(body), schema("/v2/models/arith/infer", "post", ""))
    example = infer["requestBody"]["content"]["application/json"]["example"]
    for request in (orjson.loads(body), example):
        answer = httpx.post(f"{server.url}/v2/models/arith/infer", json=request)
        assert answer.status_code == 200, answer.text
        matches("/v2/models/arith/infer", "post", answer)
    bad = httpx.post(f"{server.url}/v2/models/arith/infer", json={"inputs": [{"name": "a"}]})
    assert bad.status_code == 400
    matches("/v2/models/arith/infer", "post", bad)
    binary = httpclient.InferRequestedOutput("sum", binary_data=True)
    body, length = httpclient.InferenceServerClient.generate_request_body(tensors, [binary])
    answer = httpx.post(
        f"{server.url}/v2/models/arith/infer",
        content=body,
        headers={"Inference-Header-Content-Length": str(length)},
    )
    assert answer.headers["content-type"] in paths["/v2/models/arith/infer"]["post"][
        "responses"]["200"]["content"]  # fmt: skip
    for path in (
        "/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/stats",
        "/v2/repository/index", "/v2/models/arith", "/v2/models/tensor", "/v2/models/arith/ready",
        "/v2/models/arith/config", "/v2/models/arith/stats",
    ):  # fmt: skip
        matches(path, "get", httpx.get(f"{server.url}{path}"))
    versioned = "/v2/models/arith/versions/{version}/stats"
    matches(versioned, "get", httpx.get(f"{server.url}/v2/models/arith/versions/1/stats"))
    matches(versioned, "get", httpx.get(f"{server.url}/v2/models/arith/versions/2/stats"))


@pytest.mark.parametrize(
    "tensor",
    [
        {"name": "a", "datatype": "INT64", "shape": [1], "data": "1"},  # data not a list
        {"name": "a", "datatype": "INT64", "shape": [1], "data": None},
        {"name": "a", "datatype": "INT64", "shape": [1], "data": [1], "parameters": False},
        {
            "name": "a",
            "datatype": "INT64",
            "shape": [0],
            "data": [],
            "parameters": {"binary_data_size": 0},
        },
        {"name": "a", "datatype": "INT64", "shape": [0], "parameters": {"binary_data_size": True}},
    ],
)
def test_v2_http_refuses_what_its_schema_does_not_allow(server, tensor):
    b = {"name": "b", "datatype": "INT64", "shape": [1], "data": [1]}
    r = httpx.post(f"{server.url}/v2/models/arith/infer", json={"inputs": [tensor, b]})
    assert r.status_code == 400, r.text


@pytest.mark.parametrize(
    "extra",
    [
        {"outputs": {}},
        {"outputs": 0},
        {"id": 7},
        {"parameters": {"binary_data_output": 1}},
        {"parameters": []},
        {"outputs": [{"name": "sum", "parameters": {"binary_data": "yes"}}]},
    ],
)
def test_v2_http_refuses_request_fields_of_the_wrong_type(server, extra):
    a = {"name": "a", "datatype": "INT64", "shape": [1], "data": [1]}
    b = {**a, "name": "b"}
    r = httpx.post(f"{server.url}/v2/models/arith/infer", json={"inputs": [a, b], **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]


def test_v2_http_header_length_must_be_ascii_digits(server):
    r = httpx.post(
        f"{server.url}/v2/models/arith/infer",
        content=b'{"inputs": []}',
        headers={"Inference-Header-Content-Length": b"\xb2"},  # latin-1 "²": isdigit() is true
    )
    assert r.status_code == 400, r.text


# --- concurrency with the asyncio clients ----------------------------------------------


async def _many(server: Server, protocol: str, requests: int) -> list[tuple[int, list[int]]]:
    if protocol == "grpc":
        module, client = grpcaio, grpcaio.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    else:
        module = httpaio
        client = httpaio.InferenceServerClient(server.url.removeprefix("http://"), conn_limit=64)

    async def one(i: int) -> tuple[int, list[int]]:
        a = np.array([i, i + 1], dtype=np.int64)
        b = np.array([i, i + 1], dtype=np.int64)
        tensors = []
        for name, value in (("a", a), ("b", b)):
            tensor = module.InferInput(name, [2], "INT64")
            tensor.set_data_from_numpy(value)
            tensors.append(tensor)
        result = await client.infer("arith", tensors)
        return i, result.as_numpy("sum").tolist()

    try:
        return await asyncio.gather(*(one(i) for i in range(requests)))
    finally:
        await client.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_async_clients_under_concurrency_get_their_own_rows(server, protocol):
    coalescer = server.state.coalescers["arith"]
    merged_before = coalescer.merged_requests
    for _ in range(2):
        results = asyncio.run(_many(server, protocol, 64))
        assert sorted(results) == [(i, [2 * i, 2 * i + 2]) for i in range(64)]
    # Requests arriving together were merged into runtime requests, as on /v1.
    assert coalescer.merged_requests > merged_before


# --- token -----------------------------------------------------------------------------


def test_token_guards_v2_but_health_checks():
    app = arith_flow().deploy()
    with Server({"arith": app}, port=0, grpc_port=0, token="s3cret") as srv:
        a = (np.array([1], dtype=np.int64), "INT64")
        for protocol in ("http-binary", "grpc"):
            anonymous = Client(srv, protocol)
            assert anonymous.is_server_live() and anonymous.is_server_ready()
            grpc_code = "UNAUTHENTICATED"
            message = _expect_error(
                anonymous, 401, grpc_code, anonymous.infer, "arith", {"a": a, "b": a}
            )
            assert "missing" in message
            _expect_error(anonymous, 401, grpc_code, anonymous.get_model_metadata, "arith")
            wrong = Client(srv, protocol, headers={"authorization": "Bearer nope"})
            assert "wrong" in _expect_error(
                wrong, 401, grpc_code, wrong.infer, "arith", {"a": a, "b": a}
            )
            right = Client(srv, protocol, headers={"authorization": "Bearer s3cret"})
            assert right.infer("arith", {"a": a, "b": a}).as_numpy("sum").tolist() == [2]


# --- the command line ------------------------------------------------------------------


def test_cli_serves_grpc_on_a_free_port(tmp_path):
    path = tmp_path / "flows.py"
    path.write_text(
        "import serveflow as sf\n"
        "double = sf.Flow('double', schema={'x': float})\n"
        "double.map(lambda r: 2 * r['x'], names=['y'])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(
        [sys.executable, "-m", "serveflow.serving.cli", "serve", str(path), "--port", "0",
         "--grpc-port", "0", "--log-level", "warning"],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline(), process.stdout.readline()]
        address = next(line for line in lines if "V2 gRPC on" in line).split()[-1]
        client = grpcclient.InferenceServerClient(address)
        x = grpcclient.InferInput("x", [2], "FP64")
        x.set_data_from_numpy(np.array([1.5, -2.0]))
        assert client.infer("double", [x]).as_numpy("y").tolist() == [3.0, -4.0]
        client.close()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0


def test_a_taken_grpc_port_fails_the_start_saying_so():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        app = arith_flow().deploy()
        server = Server({"arith": app}, port=0, grpc_port=taken.getsockname()[1])
        with pytest.raises(RuntimeError, match="cannot serve gRPC"):
            server.start()
        app.stop()


def batched_double(table):
    time.sleep(0.01)  # concurrent requests pile up meanwhile and form the next batch
    return [2 * x for x in table.column("x")]


def test_slo_batching_flows_see_every_v2_request():
    flow = sf.Flow("slo", schema={"x": int})
    flow.map(batched_double, names=["y"], batching=sf.Batching(slo_ms=500), name="double")
    app = flow.deploy()
    # loaded first: a stage's cold start under a busy machine may rightly shed some of
    # a burst that arrives during it (its SLO is 500 ms); what is tested is the burst
    assert app.run({"x": [0]}).result(timeout=60).to_rows() == [{"y": 0}]
    with Server({"slo": app}, port=0, grpc_port=0) as srv:

        async def run() -> list[list[int]]:
            client = grpcaio.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")

            async def one(i: int) -> list[int]:
                x = grpcaio.InferInput("x", [1], "INT64")
                x.set_data_from_numpy(np.array([i], dtype=np.int64))
                return (await client.infer("slo", [x])).as_numpy("y").tolist()

            try:
                return await asyncio.gather(*(one(i) for i in range(32)))
            finally:
                await client.close()

        assert asyncio.run(run()) == [[2 * i] for i in range(32)]
        assert "slo" not in srv.state.coalescers  # its controller batches, per request
        for _ in range(100):  # workers report their figures every few hundred ms
            stats = app.stats()["double"]
            if stats["requests"] >= 33:
                break
            time.sleep(0.05)
        assert stats["requests"] == 33  # each V2 request is one arrival to plan for
        assert max(int(size) for size in stats["batch_sizes"]) > 1  # and they were batched


@pytest.mark.parametrize("protocol", ["http", "http-binary"])
def test_slo_flows_run_v2_http_requests_from_the_parser_with_the_same_answers(protocol):
    # an SLO flow's V2 inference over HTTP is decoded and run by the HTTP protocol
    # (`infer_at_door`) once its body is read; what it answers must not change
    flow = sf.Flow("slo", schema={"x": int})
    doubled = flow.map(
        batched_double, names=["y"], batching=sf.Batching(slo_ms=5000), name="double"
    )
    doubled.map(lambda r: (r["y"], r["y"] + 1), names=["y", "z"], name="inc")
    app = flow.deploy()
    assert app.run({"x": [0]}).result(timeout=60).to_rows() == [{"y": 0, "z": 1}]
    with Server({"slo": app}, port=0) as srv:
        assert "slo" in srv.state.doors
        client = Client(srv, protocol)
        x = (np.arange(3, dtype=np.int64), "INT64")
        result = client.infer("slo", {"x": x}, outputs=["z"], request_id="r-1")
        assert result.as_numpy("z").tolist() == [1, 3, 5] and result.as_numpy("y") is None
        assert result.get_response()["id"] == "r-1"
        assert client.infer("slo", {"x": x}).as_numpy("y").tolist() == [0, 2, 4]
        versioned = client.infer("slo", {"x": x}, model_version="1")  # the door's too
        assert versioned.as_numpy("y").tolist() == [0, 2, 4]
        _expect_error(client, 404, "", client.infer, "slo", {"x": x}, model_version="2")
        message = _expect_error(client, 400, "", client.infer, "slo", {"w": x})
        assert "'x'" in message  # the input it lacks, named
        stats = client.get_inference_statistics("slo")["model_stats"][0]
        assert stats["inference_count"] == 9 and stats["execution_count"] == 3
        client.close()


def test_grpc_typed_contents_and_request_ids(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    infer = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=grpcclient.service_pb2.ModelInferRequest.SerializeToString,
        response_deserializer=grpcclient.service_pb2.ModelInferResponse.FromString,
    )
    request = grpcclient.service_pb2.ModelInferRequest(model_name="arith", id="req-7")
    for name in ("a", "b"):
        tensor = request.inputs.add(name=name, datatype="INT32", shape=[2])
        tensor.contents.int_contents.extend([3, 5])
    response = infer(request, timeout=TIMEOUT)
    assert response.id == "req-7" and response.model_name == "arith"
    assert response.outputs[0].name == "sum" and list(response.outputs[0].shape) == [2]
    assert np.frombuffer(response.raw_output_contents[0], "<i8").tolist() == [6, 10]
    request.raw_input_contents.append(b"\0" * 8)  # one raw entry for two inputs
    with pytest.raises(grpc.RpcError) as caught:
        infer(request, timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents" in caught.value.details()
    channel.close()
    # HTTP echoes the id too.
    client = Client(server, "http-json")
    a = (np.array([1], dtype=np.int64), "INT64")
    result = client.infer("arith", {"a": a, "b": a}, request_id="req-8")
    assert result.get_response()["id"] == "req-8"
