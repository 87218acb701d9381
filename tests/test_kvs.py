"""The key-value stores (memory, LMDB, Redis) and the worker-local cache, through their
public interface, with a real redis-server and real second processes."""

import multiprocessing
import os
import pickle
import select
import signal
import stat
import subprocess
import sys
import tempfile
import threading

import numpy as np
import pytest

import serveflow as sf
from redis_fixture import redis_server, redis_url  # noqa: F401  (fixtures)
from serveflow.runtime.cache import CachedKVS
from serveflow.runtime.kvs import LMDBFullError, LMDBStore, MemoryKVS, RedisStore, open_kvs

WAIT_S = 30  # generous bound on a child process's reply; a healthy run takes < 2 s
SPAWN = multiprocessing.get_context("spawn")


def _open(kind, request, tmp_path):
    if kind == "memory":
        return MemoryKVS()
    if kind == "lmdb":
        return LMDBStore(str(tmp_path / "kvs"))
    return RedisStore(request.getfixturevalue("redis_url"))


@pytest.fixture(params=["memory", "lmdb", "redis"])
def store(request, tmp_path):
    s = _open(request.param, request, tmp_path)
    yield s
    s.close()


@pytest.fixture(params=["lmdb", "redis"])
def shared_store(request, tmp_path):
    """A store another process can open by its address."""
    s = _open(request.param, request, tmp_path)
    yield s
    s.close()


# ------------------------------------------------------------------ every store


@pytest.mark.parametrize(
    "value",
    [0, -7, 2**70, "", "héllo", {"a": [1, 2.5, None], "b": ("x", b"\x00")}, [None, True]],
    ids=["zero", "neg", "bigint", "empty-str", "unicode", "dict", "list"],
)
def test_round_trip(store, value):
    store.put("k", value)
    assert store.get("k") == value
    assert store.get_many(["k"]) == [value]


def test_round_trip_numpy_1mb(store):
    array = np.arange(1 << 17, dtype=np.float64)  # 1 MiB
    store.put("arr", array)
    got = store.get("arr")
    assert got.dtype == array.dtype and got.shape == array.shape
    assert np.array_equal(got, array)
    array[0] = 42.0  # the store kept its own copy
    assert store.get("arr")[0] == 0.0


def test_missing_key_is_none(store):
    assert store.get("nope") is None
    assert store.get_many(["nope", "also-nope"]) == [None, None]
    assert store.get_versions(["nope"]) == [None]


def test_delete(store):
    store.put("k", 1)
    store.delete("k")
    assert store.get("k") is None
    store.delete("k")  # deleting a missing key is fine
    store.delete("never-there")
    store.put("k", 2)
    assert store.get("k") == 2


def test_get_many_keeps_order_and_duplicates(store):
    for i in range(5):
        store.put(f"k{i}", i * 10)
    keys = ["k3", "missing", "k0", "k3", "k4"]
    assert store.get_many(keys) == [30, None, 0, 30, 40]
    assert store.get_many([]) == []


def test_empty_and_unicode_keys(store):
    store.put("", "empty")
    store.put("ключ/🔑", "unicode")
    assert store.get_many(["", "ключ/🔑"]) == ["empty", "unicode"]


@pytest.mark.parametrize("bad", [1, b"k", None, ("a",)])
def test_non_str_key_is_type_error(store, bad):
    with pytest.raises(TypeError, match="strings"):
        store.get(bad)
    with pytest.raises(TypeError):
        store.put(bad, 1)
    with pytest.raises(TypeError):
        store.delete(bad)
    with pytest.raises(TypeError):
        store.get_many(["ok", bad])


def test_versions_bump_on_every_write(store):
    store.put("a", 1)
    (v1,) = store.get_versions(["a"])
    store.put("a", 1)
    (v2,) = store.get_versions(["a"])
    store.delete("a")
    (v3,) = store.get_versions(["a"])
    store.put("a", 1)
    (v4,) = store.get_versions(["a"])
    assert v1 < v2 < v3 < v4  # never reused, even across a delete
    assert store.get_versions(["a", "b"]) == [v4, None]


def test_address_reopens_same_store(shared_store):
    shared_store.put("k", [1, 2])
    other = open_kvs(shared_store.address)
    try:
        assert other.get("k") == [1, 2]
        other.put("k2", "x")
        assert shared_store.get("k2") == "x"
    finally:
        other.close()
    assert shared_store.get("k") == [1, 2]  # closing the second one left this one open


def test_store_pickles_as_its_address(shared_store):
    shared_store.put("k", 5)
    clone = pickle.loads(pickle.dumps(shared_store))
    try:
        assert clone.address == shared_store.address
        assert clone.get("k") == 5
    finally:
        clone.close()


# ------------------------------------------------------------------ across processes


def _child_exchange(address, conn):
    store = open_kvs(address)
    conn.send(store.get("from_parent"))
    store.put("from_child", {"n": 2})
    conn.send("put")
    conn.recv()
    conn.send(store.get("from_parent"))
    store.close()


def _reply(conn):
    assert conn.poll(WAIT_S), "child process did not answer"
    return conn.recv()


def test_second_process_sees_puts_both_ways(shared_store):
    shared_store.put("from_parent", 1)
    ours, theirs = SPAWN.Pipe()
    child = SPAWN.Process(target=_child_exchange, args=(shared_store.address, theirs))
    child.start()
    try:
        assert _reply(ours) == 1
        assert _reply(ours) == "put"
        assert shared_store.get("from_child") == {"n": 2}
        shared_store.put("from_parent", 3)  # after the child opened the store
        ours.send("go")
        assert _reply(ours) == 3
    finally:
        child.join(WAIT_S)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0


def _child_put(address, items, deletes=()):
    store = open_kvs(address)
    for key, value in items.items():
        store.put(key, value)
    for key in deletes:
        store.delete(key)
    store.close()


def _run_child(target, *args):
    child = SPAWN.Process(target=target, args=args)
    child.start()
    child.join(WAIT_S)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0


def test_forked_child_refuses_an_inherited_lmdb_store(tmp_path):
    store = LMDBStore(str(tmp_path / "kvs"))
    store.put("a", 1)
    fork = multiprocessing.get_context("fork")
    ours, theirs = fork.Pipe()

    def child():
        errors = []
        for attempt in (lambda: store.get("a"), lambda: open_kvs(store.address)):
            try:
                attempt()
                errors.append("no error")
            except RuntimeError as e:
                errors.append(str(e))
        store.close()  # harmless in the child: leaves the parent's environment alone
        theirs.send(errors)

    proc = fork.Process(target=child)
    proc.start()
    try:
        errors = _reply(ours)
    finally:
        proc.join(WAIT_S)
    assert proc.exitcode == 0
    assert all("spawn" in e and store.path in e for e in errors), errors
    store.put("b", 2)  # the parent's environment still works
    assert store.get_many(["a", "b"]) == [1, 2]
    store.close()


# ------------------------------------------------------------------ LMDB map size


def test_lmdb_default_map_is_large_and_the_file_grows_with_the_data(tmp_path):
    store = LMDBStore(str(tmp_path / "kvs"))
    if sys.maxsize > 2**32:
        assert store.map_size == 1 << 40  # only address space: nothing is resized
    for i in range(8):
        store.put(f"a{i}", np.full(1 << 17, i, dtype=np.float64))  # 8 x 1 MiB
    data = os.stat(tmp_path / "kvs" / "data.mdb")
    assert data.st_size < 64 << 20  # what `ls` shows: the data, not the map
    assert data.st_blocks * 512 < 64 << 20  # what `du` shows
    store.close()


def test_lmdb_write_past_the_map_names_the_key_and_the_size(tmp_path):
    store = LMDBStore(str(tmp_path / "kvs"), map_size=1 << 20)
    assert store.map_size == 1 << 20
    store.put("small", [1, 2, 3])
    with pytest.raises(LMDBFullError, match=r"'big'.*1048576 bytes"):
        store.put("big", np.zeros(1 << 18))  # 2 MiB
    with pytest.raises(LMDBFullError, match=r"'k0', 'k1', 'k2' and 1 more"):
        store.put_many({f"k{i}": np.zeros(1 << 16) for i in range(4)})
    assert store.get_many(["small", "big", "k0"]) == [[1, 2, 3], None, None]  # nothing half done
    store.put("small", "still writable")
    assert store.get("small") == "still writable"
    store.close()


def _while_threads_read(store, write, readers=3):
    """Run `write()` in a thread while `readers` threads read `store` in a loop, each
    read checked; fails (instead of hanging) if the writer or a reader is stuck."""
    store.put("steady", list(range(100)))
    errors, reads, written = [], [0] * readers, []
    done = threading.Event()
    reading = [threading.Event() for _ in range(readers)]

    def reader(n):
        try:
            while not done.is_set():
                assert store.get_many(["steady", "missing"]) == [list(range(100)), None]
                for key in written[-2:]:  # a large value written meanwhile, read whole
                    value = store.get(key)
                    assert value[0] == value[-1] == int(key[1:]), key
                reads[n] += 1
                reading[n].set()
        except Exception as e:  # reported below, in the test's thread
            errors.append(e)

    def writer():
        try:
            write(written)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(n,), daemon=True) for n in range(readers)]
    for thread in threads:
        thread.start()
    writing = threading.Thread(target=writer, daemon=True)
    try:
        assert all(r.wait(WAIT_S) for r in reading)
        before = list(reads)
        writing.start()
        writing.join(WAIT_S)
        assert not writing.is_alive(), "writer stuck while threads read"
    finally:
        done.set()
        for thread in threads:
            thread.join(WAIT_S)
    assert not any(t.is_alive() for t in threads), "reader stuck"
    assert errors == []
    assert all(after > b for after, b in zip(reads, before))  # readers ran during writes
    return written


def test_lmdb_large_writes_while_other_threads_read(tmp_path):
    store = LMDBStore(str(tmp_path / "kvs"))

    def write(written):
        for i in range(16):  # 64 MiB, in 4 MiB values
            store.put(f"a{i}", np.full(1 << 19, i, dtype=np.float64))
            written.append(f"a{i}")

    written = _while_threads_read(store, write)
    assert [a[0] for a in store.get_many(written)] == list(range(16))
    store.close()


def test_lmdb_full_while_other_threads_read(tmp_path):
    store = LMDBStore(str(tmp_path / "kvs"), map_size=8 << 20)
    full = []

    def write(written):
        for i in range(64):  # 1 MiB values into an 8 MiB map
            try:
                store.put(f"a{i}", np.full(1 << 17, i, dtype=np.float64))
            except LMDBFullError as e:
                full.append(str(e))
                return
            written.append(f"a{i}")

    written = _while_threads_read(store, write)
    assert len(full) == 1 and f"'a{len(written)}'" in full[0] and "8388608" in full[0]
    assert 0 < len(written) < 8
    assert [a[0] for a in store.get_many(written)] == list(range(len(written)))
    store.close()


def _child_small_map(path, conn):
    store = LMDBStore(path, map_size=1 << 20)
    conn.send(store.get("k0") is not None)  # opened before the parent wrote past 1 MiB
    conn.recv()
    try:
        store.get("k1")
        conn.send("no error")
    except RuntimeError as e:
        conn.send(str(e))
    store.close()
    store = LMDBStore(path)  # the default map
    conn.send(float(sum(store.get(f"k{i}").sum() for i in range(3))))
    for i in range(3, 6):
        store.put(f"k{i}", np.ones(1 << 17))
    conn.send(store.map_size)
    store.close()


def test_lmdb_data_past_a_process_map_is_a_clear_error_there(tmp_path):
    path = str(tmp_path / "kvs")
    store = LMDBStore(path)
    store.put("k0", np.ones(10))
    ours, theirs = SPAWN.Pipe()
    child = SPAWN.Process(target=_child_small_map, args=(path, theirs))
    child.start()
    try:
        assert _reply(ours) is True
        for i in range(3):
            store.put(f"k{i}", np.ones(1 << 17))  # 3 MiB > the child's 1 MiB map
        ours.send("written")
        error = _reply(ours)
        assert path in error and "1048576 bytes" in error and "map_size" in error
        assert _reply(ours) == 3.0 * (1 << 17)
        assert _reply(ours) == store.map_size
    finally:
        child.join(WAIT_S)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    assert store.get("k5").sum() == 1 << 17  # the child's writes, seen here
    store.close()


# ------------------------------------------------------------------ temporary LMDB stores

_MAKE_TEMPORARY_STORE = (
    "import sys\n"
    "from serveflow.runtime.kvs import LMDBStore\n"
    "store = LMDBStore()\n"
    "store.put('k', 1)\n"
    "print(store.path, flush=True)\n"
    "sys.stdin.read()\n"
)


def _temporary_store_in_child():
    """A child process holding `LMDBStore()` until its stdin closes; and its store's path."""
    child = subprocess.Popen(
        [sys.executable, "-c", _MAKE_TEMPORARY_STORE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    ready, _, _ = select.select([child.stdout], [], [], WAIT_S)
    if not ready:
        child.kill()
        pytest.fail("child process did not print its store's path")
    path = child.stdout.readline().strip()
    assert os.path.isfile(os.path.join(path, "data.mdb")), path
    return child, path


def test_temporary_store_of_a_killed_process_is_removed_by_the_next_one():
    child, path = _temporary_store_in_child()
    assert os.path.dirname(path) == os.path.realpath(tempfile.gettempdir())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    child.send_signal(signal.SIGKILL)
    child.wait(WAIT_S)
    child.stdout.close()
    child.stdin.close()
    assert os.path.isdir(path)  # a killed process cannot clean up
    store = LMDBStore()
    try:
        assert not os.path.exists(path)
        assert os.path.isdir(store.path)
    finally:
        store.close()
    assert not os.path.exists(store.path)


def test_temporary_store_of_a_live_process_is_kept():
    ours = LMDBStore()
    child, path = _temporary_store_in_child()
    try:
        store = LMDBStore()  # removes stale stores only
        store.close()
        assert os.path.isdir(path) and os.path.isdir(ours.path)
        other = open_kvs(f"lmdb://{path}")
        assert other.get("k") == 1
        other.close()
        assert os.path.isdir(path)  # opened by address: not ours to remove
    finally:
        child.stdin.close()  # the child exits normally, closing its store
        child.wait(WAIT_S)
        child.stdout.close()
    assert child.returncode == 0
    assert not os.path.exists(path)
    assert ours.get("k") is None
    ours.close()


# ------------------------------------------------------------------ open_kvs


def test_open_kvs_specs(tmp_path, redis_url):  # noqa: F811
    assert isinstance(open_kvs("memory"), MemoryKVS)
    default = open_kvs(None, default_dir=str(tmp_path / "d"))
    assert isinstance(default, LMDBStore)
    assert default.address == f"lmdb://{tmp_path / 'd'}"
    default.close()
    lmdb_store = open_kvs(f"lmdb://{tmp_path / 'e'}")
    assert isinstance(lmdb_store, LMDBStore)
    assert open_kvs(lmdb_store) is lmdb_store
    lmdb_store.close()
    redis_store = open_kvs(redis_url)
    assert isinstance(redis_store, RedisStore) and redis_store.address == redis_url
    redis_store.close()


def test_open_kvs_without_dir_uses_a_temporary_one():
    store = open_kvs(None)
    store.put("k", 1)
    other = open_kvs(store.address)
    assert other.get("k") == 1
    other.close()
    store.close()


@pytest.mark.parametrize("spec", ["", "lmdb://", "lmbd:///tmp/x", "mem", "http://x"])
def test_open_kvs_bad_spec_names_it(spec):
    with pytest.raises(ValueError, match=repr(spec).replace("/", ".")):
        open_kvs(spec)


def test_redis_unreachable_is_connection_error():
    port = _closed_port()
    with pytest.raises(ConnectionError, match=str(port)):
        open_kvs(f"redis://127.0.0.1:{port}/0")


def _closed_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------ CachedKVS


def _size(value):
    return len(pickle.dumps(value, protocol=5))


def test_cache_hits_and_misses(store):
    store.put("a", "x" * 100)
    store.put("b", {"n": 1})
    cache = CachedKVS(store, max_bytes=1 << 20)
    assert cache.get_many(["a", "b", "missing"]) == ["x" * 100, {"n": 1}, None]
    assert (cache.hits, cache.misses) == (0, 3)
    assert cache.get_many(["b", "a", "b"]) == [{"n": 1}, "x" * 100, {"n": 1}]
    assert (cache.hits, cache.misses) == (3, 3)
    assert cache.get("missing") is None  # missing keys are not cached
    assert (cache.hits, cache.misses) == (3, 4)
    assert cache.cached_keys() == {"a", "b"}
    assert cache.bytes_used == _size("x" * 100) + _size({"n": 1})


def test_cache_evicts_least_recently_used_by_bytes(store):
    values = {k: k.encode() * 1000 for k in "abcd"}
    for key, value in values.items():
        store.put(key, value)
    one = _size(values["a"])
    cache = CachedKVS(store, max_bytes=3 * one)
    cache.get_many(["a", "b", "c"])
    assert cache.cached_keys() == {"a", "b", "c"} and cache.bytes_used == 3 * one
    cache.get("a")  # a is now the most recently used
    cache.get("d")  # evicts b, the least recently used
    assert cache.cached_keys() == {"a", "c", "d"}
    assert cache.bytes_used == 3 * one <= cache.max_bytes
    store.put("huge", b"z" * (4 * one))
    assert cache.get("huge") == b"z" * (4 * one)  # returned but too big to keep
    assert cache.cached_keys() == {"a", "c", "d"}


def test_cache_sees_writes_to_the_store(store):
    store.put("k", 1)
    cache = CachedKVS(store, max_bytes=1 << 20)
    assert cache.get("k") == 1
    store.put("k", 2)  # not through the cache
    assert cache.get_many(["k"]) == [2]
    assert (cache.hits, cache.misses) == (0, 2)
    store.delete("k")
    assert cache.get("k") is None
    assert "k" not in cache.cached_keys() and cache.bytes_used == 0


def test_cache_write_through(store):
    cache = CachedKVS(store, max_bytes=1 << 20)
    cache.put("k", [1])
    assert store.get("k") == [1]
    assert cache.get("k") == [1]
    cache.delete("k")
    assert store.get("k") is None and cache.get("k") is None


def test_cached_arrays_are_read_only(store):
    store.put("arr", np.zeros(4))
    cache = CachedKVS(store, max_bytes=1 << 20)
    with pytest.raises(ValueError, match="read-only"):
        cache.get("arr")[0] = 1.0
    assert cache.get("arr")[0] == 0.0


def test_cache_invalidated_by_put_from_other_process(shared_store):
    shared_store.put("k", "old")
    shared_store.put("same", "kept")
    cache = CachedKVS(shared_store, max_bytes=1 << 20)
    assert cache.get_many(["k", "same"]) == ["old", "kept"]
    assert cache.get_many(["k", "same"]) == ["old", "kept"]
    assert (cache.hits, cache.misses) == (2, 2)
    _run_child(_child_put, shared_store.address, {"k": "new"}, ["gone"])
    assert cache.get_many(["k", "same"]) == ["new", "kept"]
    assert (cache.hits, cache.misses) == (3, 3)  # only the changed key was fetched again
    _run_child(_child_put, shared_store.address, {}, ["k"])
    assert cache.get_many(["k", "same"]) == [None, "kept"]
    assert cache.cached_keys() == {"same"}


# ------------------------------------------------------------------ end to end


def _lookup_flow():
    flow = sf.Flow("kvs-e2e")
    return flow.lookup("user", dynamic=True, into="profile"), flow


def _check_lookup(runtime):
    _, flow = _lookup_flow()
    with flow.deploy(runtime=runtime) as app:
        app.kvs.put("alice", {"age": 31})
        app.kvs.put("7", np.arange(3))
        out = app.run(sf.Table({"user": ["alice", 7, "bob"]})).result(timeout=10)
    rows = out.to_rows()
    assert rows[0]["profile"] == {"age": 31}
    assert list(rows[1]["profile"]) == [0, 1, 2]
    assert rows[2]["profile"] is None


def test_lookup_through_redis_store_object(redis_url):  # noqa: F811
    store = open_kvs(redis_url)
    _check_lookup(sf.LocalRuntime(kvs=store))
    assert store.get("alice") == {"age": 31}  # the app wrote to the real server
    store.close()


def test_lookup_through_lmdb_store_object(tmp_path):
    store = open_kvs(f"lmdb://{tmp_path / 'kvs'}")
    _check_lookup(sf.LocalRuntime(kvs=store))
    store.close()


def test_lookup_through_redis_spec_string(redis_url):  # noqa: F811
    _check_lookup(sf.LocalRuntime(kvs=redis_url))
    store = open_kvs(redis_url)
    assert store.get("alice") == {"age": 31}
    store.close()
