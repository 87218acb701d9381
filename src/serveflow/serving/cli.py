"""`serveflow`: serve flows over HTTP, or print their optimized plans.

serveflow serve PATH.py[:NAME] [--host 127.0.0.1] [--port 8000] [--workers N] ...
serveflow explain PATH.py[:NAME] [--rules fusion=off,...]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import serveflow as sf
from serveflow.runtime import collector
from serveflow.serving.limits import Limits, MiB
from serveflow.serving.loader import LoadError, load_flows

log = logging.getLogger(__name__)

TARGET_HELP = (
    "a Python file defining flows: PATH.py serves every module-level sf.Flow; "
    "PATH.py:NAME picks one, NAME being a Flow or a function returning one "
    "(e.g. examples/comments.py:build_flow)"
)
DESCRIPTION = """\
serveflow serves prediction pipelines (sf.Flow) over HTTP on the embedded runtime.

HTTP API (see /openapi.json on a running server):
  POST /v1/flows/NAME/predict  body {"rows": [{...}]} or {"columns": {...}} (JSON), or a
                               .npz archive (Content-Type: application/x-npz, one array per
                               column); answers {"rows": [...]} (or .npz with
                               Accept: application/x-npz). Header X-Request-Timeout-Ms sets a
                               deadline (504 past it).
  GET  /v1/flows               flows with schema, SLO, explain() and plan graph
  GET  /v1/flows/NAME/stats    live per-stage figures
  GET  /healthz /readyz        liveness and readiness (never need a token)
  GET  /metrics                Prometheus text format
  GET  /                       live dashboard (with a token: open /#token=TOKEN)
  /v2/...                      the Open Inference Protocol (KServe V2, as Triton serves it):
                               /v2, /v2/health/live|ready, /v2/models/NAME[/versions/1]
                               [/ready|/infer|/config|/stats]; binary tensors with
                               Inference-Header-Content-Length; over gRPC with --grpc-port
Errors are JSON {"error": ...}: 400 malformed body, 401 token, 404 unknown flow,
413 over a request limit (--max-body-mb, --max-decoded-mb, --max-elements, --max-depth,
--max-string-chars, --max-rows), 422 wrong columns/types, 500 operator failed, 503 overloaded
(Retry-After), 504 deadline passed.
"""


def _parse_rules(text: str | None) -> sf.Rules | None:
    """`fusion=off,compete=on,compete_replicas=2` -> sf.Rules(...)."""
    if not text:
        return None
    fields = {f.name: f.type for f in dataclasses.fields(sf.Rules)}
    values: dict[str, object] = {}
    for item in text.split(","):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise argparse.ArgumentTypeError(
                f"--rules: expected KEY=VALUE with KEY in {sorted(fields)}, got {item!r}"
            )
        raw = raw.strip().lower()
        if key == "compete_replicas":
            values[key] = int(raw)
        elif raw in ("on", "true", "1", "yes"):
            values[key] = True
        elif raw in ("off", "false", "0", "no"):
            values[key] = False
        else:
            raise argparse.ArgumentTypeError(f"--rules: {key} must be on or off, got {raw!r}")
    return sf.Rules(**values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="serveflow",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"serveflow {sf.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="deploy flows on the embedded runtime (or Ray: --ray) and serve them over HTTP",
        description="Deploy the flows of a Python file and serve them over HTTP until "
        "SIGTERM/SIGINT (then: stop accepting, finish in-flight requests, stop workers).",
    )
    serve.add_argument("target", metavar="PATH.py[:NAME]", help=TARGET_HELP)
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine)"
    )
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    serve.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        metavar="N",
        help="also serve the Open Inference Protocol (KServe V2) over gRPC on port N of "
        "--host (0: a free port, printed); needs the grpc extra",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="worker processes kept warm (the runtime's min_workers; default 2)",
    )
    serve.add_argument(
        "--max-workers",
        type=int,
        default=None,
        metavar="N",
        help="most worker processes the autoscaler may run (default: the runtime's)",
    )
    serve.add_argument(
        "--max-in-flight",
        type=int,
        default=None,
        metavar="N",
        help="requests a flow holds at once; more get 503 with Retry-After at once, "
        "before their body is decoded. Fewer are admitted while they queue (the bound "
        "adapts to the latency of unqueued requests) unless --fixed-in-flight",
    )
    serve.add_argument(
        "--fixed-in-flight",
        action="store_true",
        help="hold the HTTP in-flight bound at --max-in-flight instead of adapting it",
    )
    serve.add_argument(
        "--stage-timeout",
        type=float,
        default=None,
        metavar="S",
        help="a worker running one stage call longer than S seconds is replaced and its "
        "requests re-run (or failed once out of retries; default: no limit)",
    )
    serve.add_argument(
        "--gpus",
        type=_gpus,
        default=None,
        metavar="N|ID,ID",
        help="GPU devices for gpu=True stages: a count or device ids (default: detect)",
    )
    serve.add_argument(
        "--ray",
        default=None,
        metavar="ADDRESS",
        help="serve on Ray (sf.RayRuntime) instead of the embedded runtime: 'auto' joins "
        "this machine's cluster, 'ray://HOST:10001' one through Ray Client, 'local' "
        "starts a Ray here (needs the ray extra)",
    )
    serve.add_argument(
        "--kvs",
        default=None,
        metavar="URL",
        help="key-value store behind lookups: 'redis://HOST:PORT/DB' or 'lmdb:///PATH' "
        "(default: an LMDB store in a temporary directory, one machine only)",
    )
    serve.add_argument(
        "--token",
        default=os.environ.get("SERVEFLOW_TOKEN") or None,
        help="require 'Authorization: Bearer TOKEN' on all but /healthz and /readyz "
        "(default: $SERVEFLOW_TOKEN; prefer the variable, a command line is visible to ps)",
    )
    defaults = Limits()
    serve.add_argument(
        "--max-body-mb",
        type=float,
        default=defaults.max_body_bytes / MiB,
        help=f"request body limit in MiB (default {defaults.max_body_bytes // MiB})",
    )
    serve.add_argument(
        "--max-decoded-mb",
        type=float,
        default=defaults.max_decoded_bytes / MiB,
        help="most MiB an .npz body's arrays (or V2 tensors) may decode to "
        f"(default {defaults.max_decoded_bytes // MiB})",
    )
    limits = (
        ("--max-elements", defaults.max_elements, "values in one request (array elements)"),
        ("--max-depth", defaults.max_depth, "nesting depth of a JSON body"),
        ("--max-string-chars", defaults.max_string_chars, "characters of one JSON string"),
        ("--max-rows", defaults.max_rows, "rows in one request"),
    )
    for option, default, what in limits:
        help_text = f"most {what} (default {default})"
        serve.add_argument(option, type=int, default=default, help=help_text)
    serve.add_argument(
        "--body-timeout",
        type=float,
        default=defaults.body_timeout_s,
        metavar="S",
        help="seconds a request body may stall (no byte read), and its headers may take "
        "to come whole, before the request gets 408 and its connection is closed "
        f"(default {defaults.body_timeout_s:g})",
    )
    serve.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds to let in-flight requests finish on shutdown (default 30)",
    )
    serve.add_argument(
        "--shutdown-delay",
        type=float,
        default=0.0,
        metavar="S",
        help="on SIGTERM, answer 503 on /readyz but keep serving for S seconds before "
        "closing the socket, so load balancers stop sending first (default 0)",
    )
    serve.add_argument(
        "--rules",
        default=None,
        metavar="K=V,...",
        help="optimizer rules, e.g. fusion=off,compete=on,compete_replicas=2",
    )
    serve.add_argument(
        "--loop",
        default="auto",
        choices=["auto", "asyncio", "uvloop"],
        help="event loop (default auto: uvloop when installed)",
    )
    serve.add_argument(
        "--http",
        default="auto",
        choices=["auto", "h11", "httptools"],
        help="HTTP/1.1 parser (default auto: httptools when installed)",
    )
    serve.add_argument(
        "--no-coalesce",
        dest="coalesce",
        action="store_false",
        help="run every HTTP request as its own runtime request (default: requests of a "
        "row-by-row flow that arrive together run as one)",
    )
    serve.add_argument("--debug", action="store_true", help="include tracebacks in 500 responses")
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level (default info)",
    )

    explain = commands.add_parser(
        "explain",
        help="print the optimized plan of each flow",
        description="Print sf.optimize(flow, rules).explain() for each flow of a file.",
    )
    explain.add_argument("target", metavar="PATH.py[:NAME]", help=TARGET_HELP)
    explain.add_argument("--rules", default=None, metavar="K=V,...", help="optimizer rules")
    return parser


def _gpus(text: str) -> int | list[int]:
    """--gpus: a count ("2") or device ids ("0,3")."""
    try:
        ids = [int(d) for d in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a count or comma-separated ids, got {text!r}") from None
    if any(d < 0 for d in ids):
        raise argparse.ArgumentTypeError(f"device ids are not negative, got {text!r}")
    return ids if "," in text else ids[0]


def _limit_option(field: re.Match[str]) -> str:
    """The option that sets a `Limits` field (in MiB, or named shorter for some)."""
    named = {"max_body_bytes": "--max-body-mb", "max_decoded_bytes": "--max-decoded-mb",
             "body_timeout_s": "--body-timeout"}  # fmt: skip
    return named.get(field[1], "--" + field[1].replace("_", "-"))


def _serve(args: argparse.Namespace, flows: list[sf.Flow], rules: sf.Rules | None) -> int:
    from serveflow.serving.server import Server

    try:
        limits = Limits(
            max_body_bytes=int(args.max_body_mb * MiB),
            max_decoded_bytes=int(args.max_decoded_mb * MiB),
            max_elements=args.max_elements,
            max_depth=args.max_depth,
            max_string_chars=args.max_string_chars,
            max_rows=args.max_rows,
            body_timeout_s=args.body_timeout,
        )
    except ValueError as error:
        message = re.sub(r"Limits\.(\w+)", _limit_option, str(error))
        raise argparse.ArgumentTypeError(message) from None
    options: dict[str, Any] = {}
    if args.workers is not None:
        options["min_workers"] = args.workers
    if args.max_workers is not None:
        options["max_workers"] = max(args.max_workers, args.workers or 1)
    if args.max_in_flight is not None:
        options["max_in_flight"] = args.max_in_flight
    if args.stage_timeout is not None:
        options["stage_timeout_s"] = args.stage_timeout
    if args.gpus is not None:
        options["gpus"] = args.gpus
    if args.kvs is not None:
        options["kvs"] = args.kvs
    try:
        if args.ray is None:
            runtime: Any = sf.LocalRuntime(**options)
        elif isinstance(options.get("gpus"), list):
            raise ValueError("with --ray, --gpus is a count (Ray assigns the devices)")
        else:
            runtime = sf.RayRuntime(None if args.ray == "local" else args.ray, **options)
    except (ValueError, ImportError) as error:  # options the runtime refused: exit 2
        raise argparse.ArgumentTypeError(str(error)) from error
    try:
        apps = {flow.name: flow.deploy(rules=rules, runtime=runtime) for flow in flows}
        server = Server(
            apps,
            host=args.host,
            port=args.port,
            token=args.token,
            debug=args.debug,
            limits=limits,
            drain_timeout=args.drain_timeout,
            log_level=args.log_level,
            loop=args.loop,
            http=args.http,
            max_in_flight=args.max_in_flight,
            adaptive_in_flight=not args.fixed_in_flight,
            shutdown_delay=args.shutdown_delay,
            coalesce=args.coalesce,
            grpc_port=args.grpc_port,
        )
        if args.host not in ("127.0.0.1", "localhost", "::1") and not args.token:
            log.warning(
                "serving on %s without a token: anyone who reaches it can call it", args.host
            )
        server.bind()  # now, so that with --port 0 the line below tells the port chosen
        print(
            f"serveflow: serving {', '.join(apps)} on {server.url} "
            f"(dashboard {server.url}/, metrics {server.url}/metrics)",
            flush=True,
        )
        server.run(on_started=lambda: _started(server))
    finally:
        runtime.stop()
    print("serveflow: stopped", flush=True)
    return 0


def _started(server: Any) -> None:
    # What exists now (modules, flows, the servers) lives as long as the process. Out of
    # the collector's sight, a full collection scans only what requests made since: over
    # the whole heap it stalled every call in flight for 40-95 ms (a p99 at 64 clients).
    collector.settle()
    if server.grpc_port is not None:
        host = f"[{server.host}]" if ":" in server.host else server.host
        print(f"serveflow: V2 gRPC on {host}:{server.grpc_port}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, getattr(args, "log_level", "info").upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        rules = _parse_rules(args.rules)
        flows = load_flows(args.target)
        if args.command == "explain":
            print("\n\n".join(sf.optimize(flow, rules).explain() for flow in flows))
            return 0
        return _serve(args, flows, rules)
    except (LoadError, argparse.ArgumentTypeError, sf.FlowError, OSError, ImportError) as error:
        print(f"serveflow: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
