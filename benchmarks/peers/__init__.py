"""Peers measured beside serveflow: Ray Serve, Triton (via nvidia-pytriton) and the raw
pipe floor. Each exposes a small object with `call(payload)`, `submit(payload)` (a
concurrent.futures.Future) and `close()`."""
