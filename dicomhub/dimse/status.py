"""DIMSE status datasets shared by the services."""

from __future__ import annotations

from pydicom.dataset import Dataset

SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00
NOT_AUTHORIZED = 0x0124  # PS3.7 C.4: Refused: Not Authorized
PROCESSING_FAILURE = 0x0110
NO_SUCH_ACTION = 0x0123
IDENTIFIER_MISMATCH = 0xA900  # C-FIND / C-STORE: Identifier or Data Set does not match SOP Class
OUT_OF_RESOURCES = 0xA700
ERROR_COMMENT_LENGTH = 64  # LO


def status(code: int, comment: str | None = None) -> Dataset:
    """A status with its Error Comment (LO: at most 64 characters, no backslash, ASCII)."""
    ds = Dataset()
    ds.Status = code
    if comment:
        text = comment.replace("\\", "/").encode("ascii", "replace").decode("ascii")
        ds.ErrorComment = text[:ERROR_COMMENT_LENGTH]
    return ds


def not_authorized(operation: str) -> Dataset:
    return status(NOT_AUTHORIZED, f"The calling AE title may not {operation}.")
