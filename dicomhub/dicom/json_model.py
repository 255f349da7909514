"""Datasets as DICOM JSON (PS3.18 Annex F) with bulk-data VRs left out, as Azure's metadata does."""

from __future__ import annotations

from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_NO_BULK_HANDLER_THRESHOLD = 2**62


def element_to_json(elem: DataElement) -> dict[str, Any]:
    """One element as DICOM JSON; raises when its value cannot be represented."""
    if elem.VR == "SQ":
        items = [dataset_to_json(item)[0] for item in elem.value]
        return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
    return elem.to_json_dict(None, _NO_BULK_HANDLER_THRESHOLD)


def dataset_to_json(ds: Dataset, skip: frozenset[int] = frozenset()) -> tuple[dict[str, Any], list[int]]:
    """Returns the JSON model and the tags whose values could not be converted (left out of the model).

    Each element is decoded on its own: one damaged element (unknown VR, wrong byte count, bad text) is left out
    instead of failing the whole model.
    """
    out: dict[str, Any] = {}
    unconvertible: list[int] = []
    for tag in list(ds.keys()):
        tag = int(tag)
        if tag in skip or tag & 0xFFFF == 0:
            continue
        raw_vr = getattr(ds.get_item(tag), "VR", None)
        if raw_vr in BULK_VRS:
            continue  # known from the raw element: no need to decode bulk data just to leave it out
        try:
            elem = ds[tag]
            if elem.VR in BULK_VRS:
                continue
            out[f"{tag:08X}"] = element_to_json(elem)
        except Exception:  # pydicom raises many kinds (ValueError, BytesLengthException, NotImplementedError, ...)
            unconvertible.append(tag)
    return out, unconvertible
