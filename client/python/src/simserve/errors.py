"""Errors raised by the simserve client: one `Error` subclass per gRPC status code.

Every error carries the gRPC status `code` (a `grpc.StatusCode`) and the server's message
(`details`), so callers can branch on the class or on the code.
"""

from __future__ import annotations

from typing import Dict, Optional, Type

import grpc


class Error(Exception):
    """Base class of every simserve client error.

    Attributes:
        code: the gRPC status code (`grpc.StatusCode`).
        details: the server's (or client's) message.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: Optional[grpc.StatusCode] = None) -> None:
        if code is not None:
            self.code = code
        self.details = details
        super().__init__(f"{self.code.name}: {details}")


class InvalidArgumentError(Error):
    """The request was malformed (shapes, dtypes, NaN/Inf, top_k > M, ...)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhaustedError(Error):
    """A server limit was exceeded (elements, flops, output bytes, queue full, message size)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceededError(Error):
    """The call's deadline (`timeout=`) passed before the result was complete."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class CancelledError(Error):
    """The call was cancelled."""

    code = grpc.StatusCode.CANCELLED


class UnavailableError(Error):
    """The server could not be reached or is draining (retried with backoff first)."""

    code = grpc.StatusCode.UNAVAILABLE


class NotFoundError(Error):
    """A named object does not exist on the server (e.g. an unknown or evicted gallery)."""

    code = grpc.StatusCode.NOT_FOUND


class UnimplementedError(Error):
    """The server does not implement this RPC or option."""

    code = grpc.StatusCode.UNIMPLEMENTED


class FailedPreconditionError(Error):
    """The server is not in a state to run the request (e.g. a pinned gallery version that
    is no longer current, or deleting a directory gallery)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class UnauthenticatedError(Error):
    """The server requires a bearer token (its --auth_token_file) and the call carried none,
    a malformed one or one it does not accept (`token=`). Not retried."""

    code = grpc.StatusCode.UNAUTHENTICATED


class InternalError(Error):
    """The server failed internally."""

    code = grpc.StatusCode.INTERNAL


class ProtocolError(InternalError):
    """The server's answer broke the wire contract (missing, overlapping or misshaped tiles)."""


_BY_CODE: Dict[grpc.StatusCode, Type[Error]] = {
    cls.code: cls
    for cls in (InvalidArgumentError, ResourceExhaustedError, DeadlineExceededError,
                CancelledError, UnavailableError, NotFoundError, UnimplementedError,
                FailedPreconditionError, UnauthenticatedError, InternalError)
}


def from_rpc_error(err: grpc.RpcError) -> Error:
    """Converts a grpc.RpcError (sync or aio) into the matching `Error` subclass."""
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    cls = _BY_CODE.get(code, Error)
    return cls(details or "", code)
