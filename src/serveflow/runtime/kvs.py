"""Key-value stores behind `app.kvs` and `lookup`.

Three stores share one interface (`KVS`):

- `MemoryKVS`: in this process only (address "memory").
- `LMDBStore`: the default; an LMDB environment in one directory, shared by every worker
  process of this machine (address "lmdb:///abs/path").
- `RedisStore`: a Redis server, for several machines (address "redis://host:port/db";
  needs the `serveflow[redis]` extra).

Values are pickled once (protocol 5) on `put`, so a reader never sees a later mutation
of the object that was put. Every `put`/`delete` also bumps a per-key version in the
same transaction; `get_versions` reads only those, which lets a worker-local cache
(`serveflow.runtime.cache.CachedKVS`) check freshness without fetching values.

`open_kvs(address)` opens the same store in another process; stores also pickle as
their address, so a store handed to a spawned worker reopens there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import struct
import sys
import tempfile
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from serveflow.runtime import rundir

logger = logging.getLogger(__name__)

PICKLE_PROTOCOL = 5

# (value, version, pickled size in bytes) for one key, read consistently; version None
# means the key was never written, value None that it is missing now.
Versioned = tuple[Any, int | None, int]


@runtime_checkable
class KVS(Protocol):
    """What `lookup`, `app.kvs` and worker caches need of a store. Keys are `str`
    (anything else raises TypeError); a missing key reads as None."""

    address: str

    def get(self, key: str) -> Any: ...

    def put(self, key: str, value: Any) -> None: ...

    def delete(self, key: str) -> None: ...

    def get_many(self, keys: Sequence[str]) -> list[Any]: ...

    def get_versions(self, keys: Sequence[str]) -> list[int | None]: ...

    def close(self) -> None: ...


class MemoryKVS:
    """An in-process store. Values are pickled once on `put`, so a reader never sees
    a later mutation of the object that was put, as with a networked store.
    Its address, "memory", opens a new empty store: it is not shared across processes."""

    address = "memory"

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}
        self._versions: dict[str, int] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> Any:
        with self._lock:
            blob = self._data.get(_key(key))
        return None if blob is None else pickle.loads(blob)

    def put(self, key: str, value: Any) -> None:
        self.put_many({key: value})

    def put_many(self, items: Mapping[str, Any]) -> None:
        """Write several keys at once."""
        blobs = {_key(k): _dumps(v) for k, v in items.items()}
        with self._lock:
            for key, blob in blobs.items():
                self._data[key] = blob
                self._versions[key] = self._versions.get(key, 0) + 1

    def delete(self, key: str) -> None:
        key = _key(key)
        with self._lock:
            if self._data.pop(key, None) is not None:
                self._versions[key] += 1

    def get_many(self, keys: Sequence[str]) -> list[Any]:
        keys = _keys(keys)
        with self._lock:
            blobs = [self._data.get(k) for k in keys]
        return [None if b is None else pickle.loads(b) for b in blobs]

    def get_versions(self, keys: Sequence[str]) -> list[int | None]:
        keys = _keys(keys)
        with self._lock:
            return [self._versions.get(k) for k in keys]

    def get_many_versioned(self, keys: Sequence[str]) -> list[Versioned]:
        """(value, version, pickled size) per key, read at one instant."""
        keys = _keys(keys)
        with self._lock:
            rows = [(self._data.get(k), self._versions.get(k)) for k in keys]
        return [(_loads_or_none(b), v, 0 if b is None else len(b)) for b, v in rows]

    def close(self) -> None:
        """Nothing to release; the data stays readable."""


# --------------------------------------------------------------------------- LMDB

_VERSION = struct.Struct("<Q")
# The memory map is fixed when the environment is opened and never resized (resizing
# needs every transaction of the process closed, which races with reader threads).
# LMDB only reserves that much address space; the file grows with the data, never to
# the map size, so a map far larger than any store needs costs nothing.
_DEFAULT_MAP_SIZE = 1 << 40 if sys.maxsize > 2**32 else 1 << 30  # 1 TiB on 64-bit
# Where address space is capped (ulimit -v), the default map is halved until it opens.
_SMALLEST_DEFAULT_MAP_SIZE = 256 << 20


class LMDBFullError(RuntimeError):
    """A write to an `LMDBStore` does not fit in its memory map (`map_size` bytes)."""


def _open_env(path: str, map_size: int) -> Any:
    import lmdb

    size = map_size
    while True:
        try:
            env = lmdb.open(
                path,
                map_size=size,
                max_dbs=2,
                max_readers=1024,
                readahead=False,  # random lookups: do not read pages nobody asked for
            )
        except lmdb.MemoryError:
            if map_size != _DEFAULT_MAP_SIZE or size <= _SMALLEST_DEFAULT_MAP_SIZE:
                raise
            size = max(size // 2, _SMALLEST_DEFAULT_MAP_SIZE)
            continue
        if size != map_size:
            logger.warning("LMDB map of %s is %d MiB: no address space for more", path, size >> 20)
        return env


class _EnvHandle:
    """One open LMDB environment of this process, shared by every `LMDBStore` on the
    same directory (LMDB forbids opening one environment twice in a process)."""

    def __init__(self, path: str, map_size: int) -> None:
        self.path = path
        self.pid = os.getpid()
        self.refs = 0
        self.stale = False  # set in a forked child: this handle belongs to the parent
        self.env = _open_env(path, map_size)
        self.map_size: int = self.env.info()["map_size"]  # fixed from here on
        stale_readers = self.env.reader_check()  # slots left by killed processes
        if stale_readers:
            logger.info("cleared %d stale LMDB reader slots in %s", stale_readers, path)
        self.values = self.env.open_db(b"values")
        self.versions = self.env.open_db(b"versions")
        self.max_key = self.env.max_key_size() - 1  # one byte goes to the key prefix


_envs: dict[str, _EnvHandle] = {}
_envs_lock = threading.Lock()
# Environments inherited through fork: kept referenced, never used or closed in the child
# (closing one there would clear the parent's reader slots in the shared lock table).
_inherited: dict[str, _EnvHandle] = {}

_FORK_HINT = (
    "LMDB environment {path} was open in the parent when this process was forked: "
    "it cannot be used or reopened here (py-lmdb refuses to open an environment twice in "
    "one process, and closing the inherited one would break the parent's readers). "
    "Start workers with the 'spawn' or 'forkserver' method and open the store there "
    "by its address, or fork before opening it."
)


def _forget_envs_after_fork() -> None:
    for path, handle in _envs.items():
        handle.stale = True
        _inherited[path] = handle
    _envs.clear()
    global _envs_lock
    _envs_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_envs_after_fork)


def _acquire_env(path: str, map_size: int) -> _EnvHandle:
    with _envs_lock:
        handle = _envs.get(path)
        if handle is None:
            if path in _inherited:
                raise RuntimeError(_FORK_HINT.format(path=path))
            handle = _envs[path] = _EnvHandle(path, map_size)
        handle.refs += 1
        return handle


def _release_env(handle: _EnvHandle) -> None:
    with _envs_lock:
        if handle.stale:
            return
        handle.refs -= 1
        if handle.refs == 0:
            _envs.pop(handle.path, None)
            handle.env.close()


def _release_store(handle: _EnvHandle, run_dir: rundir.RunDir | None) -> None:
    _release_env(handle)
    if run_dir is not None and os.getpid() == handle.pid:
        run_dir.remove()


def _describe_keys(bkeys: Sequence[bytes]) -> str:
    names = [repr(k[1:].decode("utf-8")[:60]) for k in bkeys[:3]]
    more = f" and {len(bkeys) - 3} more" if len(bkeys) > 3 else ""
    return ("key " if len(bkeys) == 1 else "keys ") + ", ".join(names) + more


class LMDBStore:
    """An LMDB environment in directory `path`, safe to open from several processes at
    once: each process opens its own (a store pickles as its address, so a worker
    started with 'spawn' or 'forkserver' reopens it). A process forked while the
    environment was open here cannot use it: RuntimeError, with that advice.

    `path=None` makes a private temporary directory (`rundir.RunDir` of kind "kvs"),
    removed when this store is closed; directories left by processes that died without
    closing theirs are removed when the next temporary store is made.

    The memory map is `map_size` bytes (default 1 TiB on 64-bit systems), fixed for as
    long as the environment is open in this process: LMDB only reserves the address
    space, and the file grows with the data, so the map is never resized. A write that
    does not fit raises `LMDBFullError` naming the keys and the map size. Every process
    should use a map at least as large as the data others write (the default does):
    one that opened the environment with a smaller map cannot read past it
    (RuntimeError). Reads unpickle straight from the mapped pages, in a read transaction.
    """

    def __init__(self, path: str | None = None, *, map_size: int = _DEFAULT_MAP_SIZE) -> None:
        self._run_dir: rundir.RunDir | None = None
        if path is None:
            parent = tempfile.gettempdir()
            rundir.remove_stale(parent, "kvs")  # temporary stores of dead processes
            self._run_dir = rundir.RunDir(parent, "kvs")
            path = self._run_dir.path
        self.path = os.path.realpath(path)
        self._closed = False
        try:
            os.makedirs(self.path, exist_ok=True)
            self._handle = _acquire_env(self.path, map_size)
        except BaseException:
            if self._run_dir is not None:
                self._run_dir.remove()
            raise
        self._finalizer = weakref.finalize(self, _release_store, self._handle, self._run_dir)

    @property
    def address(self) -> str:
        return f"lmdb://{self.path}"

    @property
    def map_size(self) -> int:
        """Size of the memory map in bytes (fixed while the environment is open here)."""
        return self._env().map_size

    def __repr__(self) -> str:
        return f"LMDBStore({self.path!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (open_kvs, (self.address,))

    def get(self, key: str) -> Any:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[str]) -> list[Any]:
        handle = self._env()
        bkeys = [self._bkey(handle, k) for k in keys]

        def read(txn: Any) -> list[Any]:
            return [_loads_or_none(txn.get(k, db=handle.values)) for k in bkeys]

        return self._read(handle, read)

    def get_versions(self, keys: Sequence[str]) -> list[int | None]:
        handle = self._env()
        bkeys = [self._bkey(handle, k) for k in keys]

        def read(txn: Any) -> list[int | None]:
            return [_version_or_none(txn.get(k, db=handle.versions)) for k in bkeys]

        return self._read(handle, read)

    def get_many_versioned(self, keys: Sequence[str]) -> list[Versioned]:
        """(value, version, pickled size) per key, from one read transaction."""
        handle = self._env()
        bkeys = [self._bkey(handle, k) for k in keys]

        def read(txn: Any) -> list[Versioned]:
            rows: list[Versioned] = []
            for k in bkeys:
                blob = txn.get(k, db=handle.values)
                version = _version_or_none(txn.get(k, db=handle.versions))
                rows.append((_loads_or_none(blob), version, 0 if blob is None else len(blob)))
            return rows

        return self._read(handle, read)

    def put(self, key: str, value: Any) -> None:
        self.put_many({key: value})

    def put_many(self, items: Mapping[str, Any]) -> None:
        """Write several keys in one transaction."""
        handle = self._env()
        blobs = [(self._bkey(handle, k), _dumps(v)) for k, v in items.items()]

        def write(txn: Any) -> None:
            for bkey, blob in blobs:
                txn.put(bkey, blob, db=handle.values)
                _bump(txn, handle, bkey)

        self._write(handle, write, [bkey for bkey, _ in blobs])

    def delete(self, key: str) -> None:
        handle = self._env()
        bkey = self._bkey(handle, key)

        def write(txn: Any) -> None:
            if txn.delete(bkey, db=handle.values):
                _bump(txn, handle, bkey)

        self._write(handle, write, [bkey])

    def close(self) -> None:
        """Release this process's environment (when no other store here uses it)."""
        if self._closed:
            return
        self._closed = True
        self._finalizer()

    # -- internals

    def _env(self) -> _EnvHandle:
        handle = self._handle
        if handle.stale:
            raise RuntimeError(_FORK_HINT.format(path=self.path))
        if self._closed:
            raise ValueError(f"{self!r} is closed")
        return handle

    def _bkey(self, handle: _EnvHandle, key: str) -> bytes:
        # The prefix byte lets "" be a key (LMDB rejects empty keys).
        bkey = b"k" + _key(key).encode("utf-8")
        if len(bkey) > handle.max_key + 1:
            raise ValueError(f"LMDB keys are at most {handle.max_key} bytes, got {key[:40]!r}...")
        return bkey

    def _read(self, handle: _EnvHandle, fn: Any) -> Any:
        import lmdb

        try:
            with handle.env.begin(buffers=True) as txn:
                return fn(txn)
        except lmdb.MapResizedError as e:
            raise self._outgrown(handle) from e

    def _write(self, handle: _EnvHandle, fn: Any, bkeys: Sequence[bytes]) -> None:
        import lmdb

        try:
            txn = handle.env.begin(write=True)
        except lmdb.MapResizedError as e:
            raise self._outgrown(handle) from e
        try:
            fn(txn)
        except lmdb.MapFullError as e:
            # End the failed transaction with commit(), not abort(): LMDB has marked it
            # failed, so commit writes nothing, ends it and raises BadTxnError. py-lmdb's
            # abort() of a write transaction first waits until no operation of this
            # environment runs on any thread, which reader threads busy on the store can
            # put off indefinitely (the old resize-on-full livelocked there).
            with contextlib.suppress(lmdb.BadTxnError):
                txn.commit()
            raise self._full(handle, bkeys) from e
        except BaseException:
            txn.abort()
            raise
        try:
            txn.commit()
        except lmdb.MapFullError as e:  # LMDB ended the transaction itself
            raise self._full(handle, bkeys) from e

    def _full(self, handle: _EnvHandle, bkeys: Sequence[bytes]) -> LMDBFullError:
        return LMDBFullError(
            f"LMDB store {self.path} is full: writing {_describe_keys(bkeys)} does not fit "
            f"in its map of {handle.map_size} bytes ({handle.map_size / 2**20:g} MiB); "
            f"open it with a larger map_size"
        )

    def _outgrown(self, handle: _EnvHandle) -> RuntimeError:
        return RuntimeError(
            f"LMDB store {self.path} holds more data than this process's map of "
            f"{handle.map_size} bytes (another process, opened with a larger map_size, "
            f"wrote past it): open the store with a map_size at least as large as the "
            f"other processes' (the default is {_DEFAULT_MAP_SIZE} bytes)"
        )


def _bump(txn: Any, handle: _EnvHandle, bkey: bytes) -> None:
    old = txn.get(bkey, db=handle.versions)
    version = 1 if old is None else _VERSION.unpack(old)[0] + 1
    txn.put(bkey, _VERSION.pack(version), db=handle.versions)


def _version_or_none(raw: Any) -> int | None:
    return None if raw is None else _VERSION.unpack(raw)[0]


# --------------------------------------------------------------------------- Redis

_VALUE_PREFIX = "sf:val:"
_VERSION_PREFIX = "sf:ver:"


class RedisStore:
    """A Redis database at `url` ("redis://host:port/db"). Values are pickled and kept
    under "sf:val:<key>", versions under "sf:ver:<key>" (INCR in the same MULTI as the
    write). The connection pool reconnects by itself in a forked child.
    Raises ConnectionError at once when the server does not answer."""

    def __init__(self, url: str) -> None:
        try:
            import redis
        except ImportError as e:  # an optional extra
            raise ImportError(
                f"{url!r} needs the redis client: pip install 'serveflow[redis]'"
            ) from e
        self.url = url
        try:
            self._client = redis.Redis.from_url(url)
            self._client.ping()
        except ValueError as e:
            raise ValueError(f"bad Redis URL {url!r}: {e}") from e
        except redis.RedisError as e:
            raise ConnectionError(f"cannot reach Redis at {url!r}: {e}") from e

    @property
    def address(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (open_kvs, (self.address,))

    def get(self, key: str) -> Any:
        return _loads_or_none(self._client.get(_VALUE_PREFIX + _key(key)))

    def get_many(self, keys: Sequence[str]) -> list[Any]:
        keys = _keys(keys)
        if not keys:
            return []
        blobs = self._client.mget([_VALUE_PREFIX + k for k in keys])
        return [_loads_or_none(b) for b in blobs]

    def get_versions(self, keys: Sequence[str]) -> list[int | None]:
        keys = _keys(keys)
        if not keys:
            return []
        raw = self._client.mget([_VERSION_PREFIX + k for k in keys])
        return [None if v is None else int(v) for v in raw]

    def get_many_versioned(self, keys: Sequence[str]) -> list[Versioned]:
        """(value, version, pickled size) per key, from one MULTI/EXEC round trip."""
        keys = _keys(keys)
        if not keys:
            return []
        pipe = self._client.pipeline(transaction=True)
        pipe.mget([_VALUE_PREFIX + k for k in keys])
        pipe.mget([_VERSION_PREFIX + k for k in keys])
        blobs, versions = pipe.execute()
        return [
            (_loads_or_none(b), None if v is None else int(v), 0 if b is None else len(b))
            for b, v in zip(blobs, versions)
        ]

    def put(self, key: str, value: Any) -> None:
        self.put_many({key: value})

    def put_many(self, items: Mapping[str, Any]) -> None:
        """Write several keys in one MULTI/EXEC round trip."""
        blobs = [(_key(k), _dumps(v)) for k, v in items.items()]
        pipe = self._client.pipeline(transaction=True)
        for key, blob in blobs:
            pipe.set(_VALUE_PREFIX + key, blob)
            pipe.incr(_VERSION_PREFIX + key)
        pipe.execute()

    def delete(self, key: str) -> None:
        # Bump the version only if something was deleted, atomically.
        self._client.eval(
            "if redis.call('DEL', KEYS[1]) == 1 then redis.call('INCR', KEYS[2]) end",
            2,
            _VALUE_PREFIX + _key(key),
            _VERSION_PREFIX + key,
        )

    def close(self) -> None:
        self._client.close()


# --------------------------------------------------------------------------- opening


def open_kvs(spec: str | KVS | None, *, default_dir: str | None = None) -> KVS:
    """Open the store named by `spec`:

    - None: an `LMDBStore` in `default_dir` (a temporary directory when that is None);
    - "memory": a new `MemoryKVS` (this process only);
    - "lmdb://PATH" (e.g. "lmdb:///tmp/x"): an `LMDBStore` in directory PATH;
    - "redis://host:port/db" or "rediss://...": a `RedisStore`;
    - a store object: returned as it is.

    Every store's `address` is such a string. Raises ValueError naming a bad spec.
    """
    if spec is None:
        return LMDBStore(default_dir)
    if not isinstance(spec, str):
        if all(hasattr(spec, m) for m in ("get", "put", "delete")):
            return spec
        raise TypeError(f"a KVS spec is a string or a store, got {type(spec).__name__}")
    if spec == "memory":
        return MemoryKVS()
    if spec.startswith("lmdb://"):
        path = spec[len("lmdb://") :]
        if not path:
            raise ValueError(f"KVS spec {spec!r} names no directory (e.g. 'lmdb:///tmp/kvs')")
        return LMDBStore(path)
    if spec.startswith(("redis://", "rediss://")):
        return RedisStore(spec)
    raise ValueError(
        f"unknown KVS spec {spec!r}: expected 'memory', 'lmdb://PATH' or 'redis://host:port/db'"
    )


def open_shared_kvs(spec: str | KVS | None, choices: str) -> KVS:
    """`open_kvs` for a runtime whose workers are other processes: a store they all
    reach (not "memory"). `choices` names the ones that work there, for the error."""
    store = open_kvs(spec)
    if store.address == "memory":
        raise ValueError(
            f"kvs='memory' is private to one process; workers need a shared store: {choices}"
        )
    return store


# --------------------------------------------------------------------------- helpers


def _key(key: str) -> str:
    if not isinstance(key, str):
        raise TypeError(f"KVS keys are strings, got {type(key).__name__}: {key!r}")
    return key


def _keys(keys: Sequence[str]) -> list[str]:
    return [_key(k) for k in keys]


def _dumps(value: Any) -> bytes:
    return pickle.dumps(value, protocol=PICKLE_PROTOCOL)


def _loads_or_none(blob: Any) -> Any:
    # `blob` may be a buffer over LMDB's mapped pages: unpickling copies out of it once.
    return None if blob is None else pickle.loads(blob)
