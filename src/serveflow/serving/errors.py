"""HTTP problems: every error response is JSON `{"error": message, ...}`."""

from __future__ import annotations

import logging
import traceback
from typing import Any

from serveflow.errors import DeadlineError, InputError, OperatorError, OverloadError

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what overloaded responses tell clients to wait


class HTTPProblem(Exception):
    """Raised by handlers; rendered as a JSON error response with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        **fields: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.fields = fields

    def body(self) -> dict[str, Any]:
        return {"error": self.message, **self.fields}


def problem_from(error: BaseException, flow: str, *, debug: bool) -> HTTPProblem:
    """The HTTP answer to a request's failure inside the deployment."""
    if isinstance(error, InputError):
        return HTTPProblem(422, str(error), column=error.column)
    if isinstance(error, OperatorError):
        extra = {"traceback": error.traceback} if debug else {}
        return HTTPProblem(500, str(error), operator=error.operator, **extra)
    if isinstance(error, OverloadError):
        return HTTPProblem(503, str(error), headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(error, DeadlineError):
        return HTTPProblem(504, str(error))
    log.error("flow %r failed a request", flow, exc_info=error)
    extra = {"traceback": "".join(traceback.format_exception(error))} if debug else {}
    return HTTPProblem(500, f"internal error in flow {flow!r}: {type(error).__name__}", **extra)
