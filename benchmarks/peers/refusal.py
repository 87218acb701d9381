"""The refusal floor: a bare uvloop + httptools server that answers every request with a
prebuilt 503 the moment its headers are parsed (no ASGI, no metrics, no admission).

What refusing a flood costs any Python server on this machine: the read, the parse and
the write that wakes the client over loopback. `python -m benchmarks.peers.refusal PORT`
serves on 127.0.0.1:PORT (0: a free one) and prints `ready PORT` once it listens.
"""

from __future__ import annotations

import asyncio
import sys

import httptools
import uvloop

BODY = b'{"error": "overloaded; retry later"}'
RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"retry-after: 1\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY)
)


class Refusing(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_headers_complete(self) -> None:
        self.transport.write(RESPONSE)  # type: ignore[attr-defined]


async def serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(
        Refusing, "127.0.0.1", port, backlog=2048
    )
    print("ready", server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1])))
