"""Key-value stores behind `app.kvs` and `lookup`."""

from __future__ import annotations

import pickle
import threading
from typing import Any, Protocol


class KVS(Protocol):
    """What `lookup` and `app.kvs` need of a store. Keys are strings."""

    def get(self, key: str) -> Any: ...

    def put(self, key: str, value: Any) -> None: ...

    def delete(self, key: str) -> None: ...


class MemoryKVS:
    """An in-process store. Values are pickled once on `put`, so a reader never sees
    a later mutation of the object that was put, as with a networked store."""

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> Any:
        with self._lock:
            blob = self._data.get(_key(key))
        return None if blob is None else pickle.loads(blob)

    def put(self, key: str, value: Any) -> None:
        blob = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            self._data[_key(key)] = blob

    def delete(self, key: str) -> None:
        with self._lock:
            self._data.pop(_key(key), None)


def _key(key: str) -> str:
    if not isinstance(key, str):
        raise TypeError(f"KVS keys are strings, got {type(key).__name__}: {key!r}")
    return key
