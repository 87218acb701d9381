"""A worker-local cache in front of a shared key-value store.

Each worker process keeps the values it looked up recently, up to `max_bytes` (counted
as the size of the pickled value). A read first asks the store for the keys' versions,
which is cheap, and fetches values only for keys not cached or cached at an older
version, so a `put` from any other process is seen by the next read here.
"""

from __future__ import annotations

import logging
import pickle
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from serveflow.runtime.kvs import KVS, Versioned

logger = logging.getLogger(__name__)


class CachedKVS:
    """An LRU cache bounded by bytes over `store`, with the store's interface.

    Cached values are shared by every reader of this process: treat them as read-only
    (numpy arrays are returned with `writeable=False` to make that an error).
    A value larger than `max_bytes` is returned but not cached. Writes go to the store.
    """

    def __init__(self, store: KVS, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.store = store
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self.bytes_used = 0
        # key -> (value, version, size); least recently used first
        self._entries: OrderedDict[str, tuple[Any, int, int]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        return self.store.address

    def __repr__(self) -> str:
        return f"CachedKVS({self.store!r}, max_bytes={self.max_bytes})"

    def cached_keys(self) -> frozenset[str]:
        """The keys cached now (for the scheduler's locality decisions)."""
        with self._lock:
            return frozenset(self._entries)

    def get(self, key: str) -> Any:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[str]) -> list[Any]:
        keys = list(keys)
        for key in keys:
            if not isinstance(key, str):
                raise TypeError(f"KVS keys are strings, got {type(key).__name__}: {key!r}")
        unique = list(dict.fromkeys(keys))
        with self._lock:
            cached = [k for k in unique if k in self._entries]
        found: dict[str, Any] = {}
        if cached:
            for key, version in zip(cached, self.store.get_versions(cached)):
                with self._lock:
                    entry = self._entries.get(key)
                    if entry is not None and version is not None and entry[1] == version:
                        self._entries.move_to_end(key)
                        found[key] = entry[0]
        stale = [k for k in unique if k not in found]
        fetched = dict(zip(stale, self._fetch(stale))) if stale else {}
        with self._lock:
            for key, (value, version, size) in fetched.items():
                found[key] = value
                self._remember(key, value, version, size)
            for key in keys:
                if key in fetched:
                    self.misses += 1
                    fetched.pop(key)  # a repeated key is a hit after its first miss
                else:
                    self.hits += 1
        return [found[k] for k in keys]

    def get_versions(self, keys: Sequence[str]) -> list[int | None]:
        return self.store.get_versions(keys)

    def put(self, key: str, value: Any) -> None:
        self.store.put(key, value)
        self._forget(key)

    def delete(self, key: str) -> None:
        self.store.delete(key)
        self._forget(key)

    def clear(self) -> None:
        """Drop every cached value (counters are kept)."""
        with self._lock:
            self._entries.clear()
            self.bytes_used = 0

    def close(self) -> None:
        self.clear()
        self.store.close()

    # -- internals

    def _fetch(self, keys: list[str]) -> list[Versioned]:
        reader = getattr(self.store, "get_many_versioned", None)
        if reader is not None:
            return reader(keys)
        # A store without consistent (value, version) reads: versions first, so a put
        # racing with us leaves an older version beside the newer value (refetched later),
        # never the reverse.
        versions = self.store.get_versions(keys)
        values = self.store.get_many(keys)
        return [
            (v, ver, 0 if v is None else len(pickle.dumps(v, protocol=5)))
            for v, ver in zip(values, versions)
        ]

    def _remember(self, key: str, value: Any, version: int | None, size: int) -> None:
        """Cache one fetched value; caller holds the lock."""
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes_used -= old[2]
        if value is None or version is None or size > self.max_bytes:
            return
        _freeze(value)
        while self._entries and self.bytes_used + size > self.max_bytes:
            _, (_, _, evicted) = self._entries.popitem(last=False)
            self.bytes_used -= evicted
        self._entries[key] = (value, version, size)
        self.bytes_used += size

    def _forget(self, key: str) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes_used -= old[2]


def _freeze(value: Any) -> None:
    """Make a cached numpy array read-only, so an in-place change fails loudly instead
    of silently changing what later readers of this worker get."""
    if type(value).__module__ == "numpy" and hasattr(value, "setflags"):
        value.setflags(write=False)
