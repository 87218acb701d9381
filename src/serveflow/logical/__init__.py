"""Logical layer: tables, rows, flows and operator nodes. A plain DAG; nothing runs here."""

from serveflow.logical.flow import SOURCE_ID, Flow, Stream
from serveflow.logical.operators import Batching, Op
from serveflow.logical.table import Row, Table

__all__ = ["SOURCE_ID", "Batching", "Flow", "Op", "Row", "Stream", "Table"]
