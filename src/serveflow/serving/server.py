"""Running the HTTP app on uvicorn: in the foreground (the CLI) or in a thread.

Shutdown (SIGTERM/SIGINT in the foreground, `stop()` in a thread): /readyz turns 503;
after `shutdown_delay` seconds of serving on (signals only; default 0) the listening
socket closes, in-flight requests finish (up to `drain_timeout`), then the ASGI
lifespan ends and every deployment is stopped (its workers drained).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import uvicorn

from serveflow.runtime.app import App
from serveflow.serving.app import ServingState, create_app
from serveflow.serving.limits import Limits

log = logging.getLogger(__name__)


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, marking the app not ready as soon as shutdown is asked for,
    and serving V2 gRPC on the same event loop when given a `grpc` server."""

    def __init__(
        self,
        config: uvicorn.Config,
        state: ServingState,
        shutdown_delay: float = 0.0,
        grpc: Any = None,
        drain_timeout: float = 30.0,
    ) -> None:
        super().__init__(config)
        self._state = state
        self._shutdown_delay = shutdown_delay
        self._delay: threading.Timer | None = None
        self._grpc = grpc  # serving.v2_grpc.GRPCServer, or None
        self._drain_timeout = drain_timeout
        self.on_started: Callable[[], None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if self._grpc is not None:
            await self._grpc.start()  # before HTTP: a port in use fails the start
        await super().startup(sockets)
        if self.started and self.on_started is not None:
            self.on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._grpc is not None:  # in-flight calls finish before the apps stop
            await self._grpc.stop(self._drain_timeout)
        await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        """First signal: not ready at once; after `shutdown_delay` s (still serving, so
        that a load balancer polling /readyz takes the server out of rotation first),
        uvicorn's graceful shutdown. A second signal during the delay shuts down now."""
        self._state.draining = True
        if self._shutdown_delay > 0 and self._delay is None:
            log.info("not ready; shutting down in %g s", self._shutdown_delay)
            self._delay = threading.Timer(self._shutdown_delay, super().handle_exit, (sig, frame))
            self._delay.daemon = True
            self._delay.start()
            return
        if self._delay is not None:
            self._delay.cancel()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Shut down gracefully on SIGINT/SIGTERM, then return normally (uvicorn would
        re-raise the signal, killing the process before its runtime is stopped)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _has_httptools() -> bool:
    try:
        import httptools  # noqa: F401
    except ImportError:
        return False
    return True


class Server:
    """Serve deployed flows (flow name -> App) over HTTP.

        server = Server(apps, port=8000); server.run()   # foreground, until SIGTERM
        with Server(apps, port=0) as server:             # background thread, any port
            httpx.get(server.url + "/healthz")

    The server stops the apps when it stops (`stop_apps=False` to keep them).
    `loop` ("auto", "asyncio", "uvloop") and `http` ("auto", "h11", "httptools") pick
    uvicorn's event loop and HTTP parser; "auto" takes uvloop and httptools if installed.
    `max_in_flight`: requests of one flow admitted at once; more are refused with 503
    before any work is done for them; fewer while they queue, unless
    `adaptive_in_flight` is False (see `create_app`). `shutdown_delay`: seconds
    between SIGTERM/SIGINT and the graceful shutdown during which /readyz answers 503
    while requests are still served (default 0). `coalesce`: run concurrent requests
    of a row-by-row flow as one runtime request (see serving.coalesce). `grpc_port`:
    also serve the Open Inference Protocol over gRPC on this port of `host` (0: a free
    one; `grpc_port` tells it once started; needs the `grpc` extra). `limits`: what one
    request may hold (serving.limits.Limits; `max_body_bytes` replaces its body limit
    when given).
    """

    def __init__(
        self,
        apps: Mapping[str, App],
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        token: str | None = None,
        debug: bool = False,
        max_body_bytes: int | None = None,
        drain_timeout: float = 30.0,
        stop_apps: bool = True,
        log_level: str = "warning",
        loop: str = "auto",
        http: str = "auto",
        max_in_flight: int | None = None,
        shutdown_delay: float = 0.0,
        coalesce: bool = True,
        grpc_port: int | None = None,
        limits: Limits | None = None,
        adaptive_in_flight: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.asgi = create_app(
            apps,
            token=token,
            debug=debug,
            max_body_bytes=max_body_bytes,
            stop_apps=stop_apps,
            max_in_flight=max_in_flight,
            coalesce=coalesce,
            limits=limits,
            adaptive_in_flight=adaptive_in_flight,
        )
        self.state: ServingState = self.asgi.state.serving
        protocol: Any = http
        # refusals before any ASGI work: of the in-flight bound, and of SLO batching
        # stages shedding every arrival for now (`App.refuses_outright`)
        slo = any(s.batching and s.batching.adaptive for a in apps.values() for s in a.plan.stages)
        sheds = max_in_flight is not None or slo
        if http in ("auto", "httptools") and _has_httptools():
            from serveflow.serving.shedding import shedding_protocol, timed_protocol

            # without refusals to make there, the headers' timeout alone
            protocol = shedding_protocol(self.state) if sheds else timed_protocol(self.state.limits)
        config = uvicorn.Config(
            self.asgi,
            host=host,
            port=port,
            log_level=log_level,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=max(1, round(drain_timeout)),
            loop=loop,  # "auto": uvloop when installed (the serve extra pins it)
            http=protocol,  # "auto": httptools when installed
        )
        self._grpc = None
        if grpc_port is not None:
            try:
                from serveflow.serving.v2_grpc import GRPCServer
            except ImportError as error:
                raise ImportError(
                    f"serving gRPC needs the grpc extra (pip install 'serveflow[grpc]'): {error}"
                ) from error
            self._grpc = GRPCServer(self.asgi.v2.models, host, grpc_port)
        self._uvicorn = _DrainingServer(
            config, self.state, shutdown_delay, self._grpc, drain_timeout
        )
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def grpc_port(self) -> int | None:
        """The V2 gRPC port (the one chosen, once started, when asked for 0)."""
        return None if self._grpc is None else self._grpc.port

    def bind(self) -> socket.socket:
        """Open the listening socket now (idempotent); `port=0` picks a free port,
        after which `port` and `url` tell the one chosen."""
        if self._socket is None:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on accepted sockets whose
            # proto says TCP; without it Nagle + delayed ACKs add ~40 ms per response
            # when uvicorn writes headers and body separately (h11 on asyncio).
            sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            self.port = sock.getsockname()[1]
            sock.listen(2048)  # early clients queue in the backlog instead of being refused
            self._socket = sock
        return self._socket

    def run(self, on_started: Callable[[], None] | None = None) -> None:
        """Serve in this thread until SIGTERM or SIGINT, then shut down gracefully.
        `on_started` is called once both fronts accept requests."""
        sock = self.bind()
        log.info("serving %s on %s", ", ".join(self.state.apps), self.url)
        self._uvicorn.on_started = on_started
        self._uvicorn.run(sockets=[sock])

    def start(self, startup_timeout: float = 30.0) -> Server:
        """Serve from a background thread; returns once the socket accepts requests."""
        sock = self.bind()
        failure: list[BaseException] = []

        def serve() -> None:
            try:
                asyncio.run(self._uvicorn.serve(sockets=[sock]))
            except BaseException as error:  # e.g. the gRPC port is taken: told by start()
                failure.append(error)

        self._thread = threading.Thread(
            target=serve, name=f"serveflow:http:{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + startup_timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                reason = f": {failure[0]}" if failure else ""
                raise RuntimeError(f"server on {self.url} did not start{reason}")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Graceful shutdown of a `start()`ed server: drain, stop apps, join the thread."""
        self.state.draining = True
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("HTTP server on %s did not stop within %s s", self.url, timeout)
            self._thread = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
