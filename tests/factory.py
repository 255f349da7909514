"""Generated DICOM test data: small valid instances with fresh UIDs and any attributes a test needs."""

from __future__ import annotations

import io
import uuid

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage


def new_uid() -> str:
    """A UID of digits and dots (2.25 + UUID as an integer), valid under Azure's rule."""
    return f"2.25.{uuid.uuid4().int}"


# make_dataset(**WITHOUT_IMAGE) is a data set with no Image Pixel module (documents, structured reports)
WITHOUT_IMAGE = dict.fromkeys(
    ("PixelData", "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored",
     "HighBit", "PixelRepresentation"),
)  # fmt: skip


def make_dataset(
    study: str | None = None,
    series: str | None = None,
    sop: str | None = None,
    rows: int = 16,
    columns: int = 16,
    frames: int = 1,
    transfer_syntax: str = ExplicitVRLittleEndian,
    **attributes,
) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop or new_uid()
    meta.TransferSyntaxUID = UID(transfer_syntax)
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study or new_uid()
    ds.SeriesInstanceUID = series or new_uid()
    ds.PatientID = "PID-" + uuid.uuid4().hex[:8]
    ds.PatientName = "Test^Patient"
    ds.StudyDate = "20240102"
    ds.Modality = "OT"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    pixels = (np.arange(rows * columns * frames, dtype=np.uint32) % 65536).astype(np.uint16)
    ds.PixelData = pixels.tobytes()
    for key, value in attributes.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


# The Azure service's sample files (an RGB shape on grey, 979 x 985): the colour and mask of each shape
RGB_SAMPLES = {
    "red-triangle": ((237, 28, 36), lambda y, x: (y >= 240) & (y <= 720) & (np.abs(x - 492) <= (y - 240) * 0.65)),
    "green-square": ((34, 177, 76), lambda y, x: (np.abs(y - 489) <= 250) & (np.abs(x - 492) <= 250)),
    "blue-circle": ((63, 72, 204), lambda y, x: (y - 489) ** 2 + (x - 492) ** 2 <= 300**2),
}


def make_rgb_sample(shape: str, study: str | None = None, series: str | None = None, **attributes) -> FileDataset:
    """An 8-bit RGB Secondary Capture like the Azure service's samples: 979 x 985 pixels make an odd number of bytes
    (2,892,945), so the file's Pixel Data carries one pad byte that a frame leaves out; about 2.9 MB."""
    colour, inside = RGB_SAMPLES[shape]
    rows, columns = 979, 985
    y, x = np.mgrid[:rows, :columns]
    pixels = np.full((rows, columns, 3), 195, np.uint8)
    pixels[inside(y, x)] = colour
    ds = make_dataset(
        study,
        series,
        rows=rows,
        columns=columns,
        SamplesPerPixel=3,
        PhotometricInterpretation="RGB",
        PlanarConfiguration=0,
        BitsAllocated=8,
        BitsStored=8,
        HighBit=7,
        PixelData=pixels.tobytes(),
        PatientName="Anony Mous",
        ImageComments=f"Fake DICOM - {shape.replace('-', ' ').title()}",
        **attributes,
    )
    ds["PixelData"].VR = "OB"  # make_dataset's 16-bit pixels made it OW
    return ds


def make_rgb_samples(study: str | None = None) -> list[FileDataset]:
    """The three samples as Azure ships them: one study, red and green in one series, blue in another."""
    study = study or new_uid()
    series = new_uid()
    return [
        make_rgb_sample("red-triangle", study, series, InstanceNumber=1),
        make_rgb_sample("green-square", study, series, InstanceNumber=2),
        make_rgb_sample("blue-circle", study, InstanceNumber=1),
    ]


def to_bytes(ds: FileDataset) -> bytes:
    buffer = io.BytesIO()
    ts = UID(ds.file_meta.TransferSyntaxUID)
    ds.save_as(buffer, implicit_vr=ts.is_implicit_VR, little_endian=ts.is_little_endian, enforce_file_format=True)
    return buffer.getvalue()


def make_instance(**kwargs) -> bytes:
    """A Part-10 file as bytes; keyword arguments as :func:`make_dataset`."""
    return to_bytes(make_dataset(**kwargs))


def multipart(
    parts: list[bytes], boundary: str = "dicomhub-test-boundary", part_type: str | None = "application/dicom"
):
    """(content type header, body) of a multipart/related STOW request."""
    chunks = []
    for part in parts:
        chunks.append(f"--{boundary}\r\n".encode())
        if part_type:
            chunks.append(f"Content-Type: {part_type}\r\n".encode())
        chunks.append(b"\r\n" + part + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return f'multipart/related; type="application/dicom"; boundary={boundary}', b"".join(chunks)
