"""The archive's error hierarchy. ``api/errors.py`` maps each class to an HTTP status in one place."""

from __future__ import annotations


class DicomHubError(Exception):
    """Base class: ``message`` is safe to show to a client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(DicomHubError):
    """The request itself is malformed (bad UID, bad query, bad parameter)."""


class BodySyntaxInvalid(InvalidRequest):
    """A request body that is not JSON of the expected shape: Azure answers one message for all of them."""

    def __init__(self) -> None:
        super().__init__("The syntax of the request body is invalid.")


class ResourceNotFound(DicomHubError):
    """The addressed study, series, instance, frame or partition does not exist."""

    @classmethod
    def scope(cls, series: str | None, sop: str | None) -> ResourceNotFound:
        """Azure's message for a missing study, series or instance (the deepest level addressed)."""
        level = "instance" if sop is not None else "series" if series is not None else "study"
        return cls(f"The specified {level} cannot be found.")


class NotAcceptable(DicomHubError):
    """No representation the client accepts can be produced."""

    def __init__(self, message: str = "") -> None:
        super().__init__(message)


class UnsupportedMediaType(DicomHubError):
    """The request body is of a type this route does not take."""


class PayloadTooLarge(DicomHubError):
    """A request body or part is over the configured size limit."""


class Conflict(DicomHubError):
    """The request conflicts with the current state."""


class ServiceUnavailable(DicomHubError):
    """A storage dependency failed; the client may retry."""
