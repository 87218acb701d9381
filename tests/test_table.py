"""sf.Table and sf.Row: construction, access, qids."""

from collections.abc import Mapping

import numpy as np
import pytest

import serveflow as sf


def test_table_from_columns():
    t = sf.Table({"a": [1, 2, 3], "b": [10, 20, 30]})
    assert len(t) == 3
    assert list(t.columns) == ["a", "b"]
    assert list(t.column("a")) == [1, 2, 3]
    assert list(t.column("b")) == [10, 20, 30]


def test_table_from_rows():
    t = sf.Table.from_rows([{"a": 1, "b": 10}, {"a": 2, "b": 20}])
    assert len(t) == 2
    assert list(t.columns) == ["a", "b"]
    assert list(t.column("a")) == [1, 2]
    assert t.to_rows() == [{"a": 1, "b": 10}, {"a": 2, "b": 20}]


def test_to_rows_gives_plain_dicts_without_qid():
    rows = sf.Table({"a": [1, 2], "b": ["x", "y"]}).to_rows()
    assert rows == [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]
    assert all(type(r) is dict for r in rows)
    assert all("qid" not in r for r in rows)


def test_empty_table():
    t = sf.Table({"a": []})
    assert len(t) == 0
    assert list(t.columns) == ["a"]
    assert t.to_rows() == []


def test_iteration_gives_rows():
    t = sf.Table({"a": [1, 2], "b": [10, 20]})
    rows = list(t)
    assert len(rows) == 2
    assert all(isinstance(r, sf.Row) for r in rows)
    assert all(isinstance(r, Mapping) for r in rows)
    assert [r["a"] for r in rows] == [1, 2]
    assert dict(rows[1]) == {"a": 2, "b": 20}
    assert len(rows[0]) == 2
    assert set(rows[0].keys()) == {"a", "b"}


def test_row_is_read_only():
    row = next(iter(sf.Table({"a": [1]})))
    with pytest.raises(TypeError):
        row["a"] = 5
    with pytest.raises(TypeError):
        row["new"] = 5
    assert row["a"] == 1


def test_row_missing_key_raises_keyerror():
    row = next(iter(sf.Table({"a": [1]})))
    with pytest.raises(KeyError):
        row["nope"]
    assert row.get("nope") is None


def test_qids_are_ints_unique_within_and_across_tables():
    t1 = sf.Table({"a": [1, 2, 3]})
    t2 = sf.Table.from_rows([{"a": 1}, {"a": 2}])
    q1 = [r.qid for r in t1]
    q2 = [r.qid for r in t2]
    assert all(isinstance(q, int) for q in q1 + q2)
    assert len(set(q1)) == 3
    assert len(set(q2)) == 2
    assert not set(q1) & set(q2)


def test_qids_stable_on_repeated_iteration():
    t = sf.Table({"a": [1, 2, 3]})
    assert [r.qid for r in t] == [r.qid for r in t]


def test_numpy_cells_survive():
    imgs = [np.arange(6).reshape(2, 3), np.ones(4)]
    t = sf.Table({"img": imgs, "id": [1, 2]})
    col = t.column("img")
    assert isinstance(col[0], np.ndarray)
    np.testing.assert_array_equal(col[0], imgs[0])
    np.testing.assert_array_equal(col[1], imgs[1])
    rows = t.to_rows()
    assert rows[0]["img"].shape == (2, 3)
    np.testing.assert_array_equal(rows[1]["img"], np.ones(4))
    np.testing.assert_array_equal(next(iter(t))["img"], imgs[0])


def test_unequal_column_lengths_raise_value_error():
    with pytest.raises(ValueError):
        sf.Table({"a": [1, 2], "b": [1]})
