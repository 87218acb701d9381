"""Serving layer: HTTP front (Starlette on uvicorn), CLI, Prometheus metrics, dashboard.

    from serveflow.serving import create_app, Server
    with Server({"example": flow.deploy()}) as server:   # uvicorn in a thread
        print(server.url)                                 # http://127.0.0.1:PORT

`serveflow serve PATH.py` (see `serveflow --help`) does the same from the command line.
Needs the `serve` extra: `pip install serveflow[serve]`.
"""

from serveflow.serving.app import create_app
from serveflow.serving.server import Server

__all__ = ["Server", "create_app"]
