"""Encapsulated files decoded to explicit VR little endian with their dataset bytes kept (``native_file``).

The result must be what re-encoding the whole file gives (``transcode``), and the stored bytes before the Pixel Data
must come through unchanged; files whose decoding changes more than the pixels are left to ``transcode``.
"""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid

from dicomhub.dicom.frames import index_frames
from dicomhub.dicom.transcode import native_file, transcode

EXPLICIT = "1.2.840.10008.1.2.1"


def encapsulated(syntax: str, frames: int = 1, samples: int = 1, trailer: bool = False) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = EXPLICIT
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.PatientName = "Splice^Test"
    ds.ImageComments = "odd length"  # 10 characters, padded: the stored padding must stay
    ds.Rows, ds.Columns, ds.NumberOfFrames = 64, 48, frames
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = "RGB" if samples == 3 else "MONOCHROME2"
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    shape = (frames, 64, 48, samples) if samples == 3 else (frames, 64, 48)
    ds.PixelData = np.random.default_rng(7).integers(0, 4095, shape, dtype=np.uint16).tobytes()
    if samples == 3:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = np.random.default_rng(7).integers(0, 255, shape, dtype=np.uint8).tobytes()
    ds.compress(syntax, encoding_plugin="pylibjpeg" if syntax == JPEG2000Lossless else None)
    if trailer:
        ds.DataSetTrailingPadding = b"\0\0"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def spliced(data: bytes) -> bytes | None:
    f = io.BytesIO(data)
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    ranges = index_frames(f, f.tell(), len(data), ds, ds.file_meta.TransferSyntaxUID)
    assert ranges, "the test file must be indexable"
    return native_file(f, len(data), ranges)


@pytest.mark.parametrize(("syntax", "frames"), [(JPEG2000Lossless, 1), (RLELossless, 3)])
def test_same_as_transcoding_the_whole_file(syntax, frames):
    data = encapsulated(syntax, frames)
    out = spliced(data)
    assert out is not None
    got = pydicom.dcmread(io.BytesIO(out))
    whole = pydicom.dcmread(io.BytesIO(transcode(pydicom.dcmread(io.BytesIO(data)), EXPLICIT)))
    assert got.file_meta.TransferSyntaxUID == EXPLICIT
    assert got.file_meta.MediaStorageSOPInstanceUID == whole.file_meta.MediaStorageSOPInstanceUID
    assert [e.tag for e in got] == [e.tag for e in whole]
    for elem in whole:
        assert got[elem.tag].value == elem.value, elem.keyword
    assert got.PixelData == whole.PixelData and len(got.PixelData) == 64 * 48 * 2 * frames
    # the stored dataset bytes (after the file meta, before Pixel Data) come through as they are
    source = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    start = 132 + 12 + source.file_meta.FileMetaInformationGroupLength
    end = data.index(b"\xe0\x7f\x10\x00")
    assert data[start:end] in out


def test_colour_space_changes_and_trailing_elements_are_left_to_transcode():
    # RLE keeps RGB as RGB, so a colour file is spliced; an element after the Pixel Data is not
    assert spliced(encapsulated(RLELossless, samples=3)) is not None
    assert spliced(encapsulated(JPEG2000Lossless, trailer=True)) is None
