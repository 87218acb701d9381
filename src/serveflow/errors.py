"""The exceptions users catch: build-time, run-time and input errors."""

from __future__ import annotations


class ServeflowError(Exception):
    """Base class of every error serveflow raises on purpose."""


class FlowError(ServeflowError):
    """An invalid flow: raised at the call that adds the operator, or at optimize/deploy."""


class OperatorError(ServeflowError):
    """A user function raised, or returned the wrong shape; fails one request only.

    `operator` names the operator, `traceback` holds the original traceback text.
    """

    def __init__(self, message: str, operator: str = "", traceback: str = "") -> None:
        super().__init__(message)
        self.operator = operator
        self.traceback = traceback


class InputError(ServeflowError):
    """A request violates the flow's schema or lacks a column an operator reads."""

    def __init__(self, message: str, column: str | None = None) -> None:
        super().__init__(message)
        self.column = column


class MissingColumnError(InputError, KeyError):
    """Raised by `Row[...]`/`Table.column` for an absent column.

    A KeyError too, so `row.get(name)` and `name in row` behave like a mapping's.
    """

    def __init__(self, column: str, available: list[str] | None = None) -> None:
        have = f"; the table has {available}" if available is not None else ""
        super().__init__(f"missing column {column!r}{have}", column)

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])

    def __reduce__(self):
        return (_missing_column, (self.column, str(self)))


def _missing_column(column: str, message: str) -> MissingColumnError:
    error = MissingColumnError(column)
    error.args = (message,)
    return error


class OverloadError(ServeflowError):
    """The deployment refused a request it cannot serve in time: queues full, or the
    request would miss its SLO. Retry later (HTTP maps it to 429/503)."""


class DeadlineError(ServeflowError, TimeoutError):
    """A request's deadline (`app.run(table, timeout=...)`) passed before it finished;
    its queued work was cancelled."""
