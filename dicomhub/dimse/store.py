"""C-STORE SCP: the received data set goes through the same store path as STOW (``domain/store.py``).

pynetdicom writes the data set as it arrives, P-DATA by P-DATA, to a file in the DICOM file format (its file meta
made from the command and the accepted transfer syntax; the data set bytes as received). That file is moved into
the blob store's staging area and stored from there, so no data set is held in memory, however big.

Status codes (PS3.4 B.2.3, the reason in Error Comment):

* 0000 stored; implicit VR little endian too (STOW's 45063 warning is an HTTP convention, not a storage warning);
* B006 stored, but attribute values failed validation and are not searchable (STOW v2's warning);
* 0111 duplicate SOP instance (PS3.7 C.4): already stored or being stored; the first instance is kept;
* A900 the data set cannot be stored (missing or invalid UIDs, UIDs other than the request's, unreadable, damaged):
  nothing stored;
* A700 the archive failed to make it durable (STOW's 272).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from dicomhub.blobs.base import Staged
from dicomhub.dimse.status import IDENTIFIER_MISMATCH, OUT_OF_RESOURCES, SUCCESS, status
from dicomhub.domain.attributes import SOP_CLASS_UID, SOP_UID
from dicomhub.domain.store import (
    INSTANCE_BEING_CREATED,
    INSTANCE_EXISTS,
    VALIDATION_FAILURE,
    VALIDATION_WARNING,
    StoreResult,
)
from dicomhub.index.records import Partition
from dicomhub.services import Services

log = logging.getLogger(__name__)

API_VERSION = 2  # the current STOW validation rules: invalid optional values are kept and reported, not refused
DUPLICATE = 0x0111
ELEMENTS_DISCARDED = 0xB006


def store_received(services: Services, partition: Partition, received: Path) -> StoreResult:
    """Stores the file pynetdicom wrote (moved into staging: a rename on the same file system)."""
    staging = services.blobs.new_staging_file()
    shutil.move(received, staging)
    return services.store.store(partition, Staged(staging), API_VERSION, None)


def command_mismatch(received: Path, sop_class: str, sop_uid: str) -> str | None:
    """Why the data set contradicts its C-STORE request (whose UIDs pynetdicom wrote into the file meta), or None.

    An unreadable data set is not judged here: the store path says what is wrong with it."""
    try:
        ds = pydicom.dcmread(received, stop_before_pixels=True, specific_tags=[SOP_CLASS_UID, SOP_UID])
    except Exception:
        return None
    for tag, expected, name in ((SOP_UID, sop_uid, "SOP Instance UID"), (SOP_CLASS_UID, sop_class, "SOP Class UID")):
        found = str(ds[tag].value or "").rstrip("\0 ") if tag in ds else ""
        if found and found != expected.rstrip("\0 "):
            return f"{name} differs from the C-STORE request."
    return None


def store_status(result: StoreResult) -> Dataset:
    """The C-STORE response status of a store outcome."""
    if result.stored:
        if result.warning == VALIDATION_WARNING:
            return status(ELEMENTS_DISCARDED, _first_comment(result, "Invalid values are not searchable."))
        return status(SUCCESS)
    if result.failure in (INSTANCE_EXISTS, INSTANCE_BEING_CREATED):
        return status(DUPLICATE, "Duplicate SOP instance: the first one is kept.")
    if result.failure == VALIDATION_FAILURE:
        return status(IDENTIFIER_MISMATCH, _first_comment(result, result.detail))
    return status(OUT_OF_RESOURCES, "The archive could not store the instance.")


def _first_comment(result: StoreResult, fallback: str) -> str:
    """The most specific reason: the first per-attribute comment (it names the tag), else the detail."""
    return result.comments[0].removeprefix("DICOM100: ") if result.comments else fallback
