"""Error classes, one small family per layer.

HTTP faults carry Nova's fault name for their status code, so that every error body has
Nova's shape: ``{"<faultName>": {"code": <status>, "message": "<text>"}}``.
"""

from __future__ import annotations


class FastpathError(Exception):
    """Base of every error fastpath raises on purpose."""


class SettingsError(FastpathError):
    """A setting is unknown or has a value outside what is allowed."""


class CoreBuildError(ImportError):
    """The compiled extension is missing or was built from other sources."""


class MasterError(FastpathError):
    """The master cannot start or keep its workers running."""


# Nova's fault names by status code (nova/api/openstack/wsgi.py, class Fault).
FAULT_NAMES: dict[int, str] = {
    400: "badRequest",
    401: "unauthorized",
    403: "forbidden",
    404: "itemNotFound",
    405: "badMethod",
    409: "conflictingRequest",
    413: "overLimit",
    415: "badMediaType",
    429: "overLimit",
    501: "notImplemented",
    503: "serviceUnavailable",
}


def fault_name(status: int) -> str:
    return FAULT_NAMES.get(status, "computeFault")


class HTTPFault(FastpathError):
    """Raised by a request handler to answer with a Nova-style error body."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class BadRequest(HTTPFault):
    def __init__(self, message: str):
        super().__init__(400, message)


class Forbidden(HTTPFault):
    def __init__(self, message: str):
        super().__init__(403, message)


class NotFound(HTTPFault):
    def __init__(self, message: str):
        super().__init__(404, message)


class Conflict(HTTPFault):
    def __init__(self, message: str):
        super().__init__(409, message)
