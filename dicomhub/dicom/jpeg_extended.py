"""JPEG Extended (process 2 & 4, 1.2.840.10008.1.2.4.51) decoding with GDCM's IJG codecs, as a pydicom decoding
plugin (registered and pinned in transcode.py).

pydicom's own GDCM plugin refuses 12-bit samples, Pillow decodes 8 bits only, and libjpeg (pylibjpeg) rejects scans
whose spectral selection is not 0..63, which older CT/MR encoders wrote and IJG tolerates. IJG is also the codec
DCMTK and Orthanc decode these files with, so the values match theirs exactly. Colour stays as encoded (YCbCr):
pydicom converts it to RGB when asked, as for its own GDCM plugin.
"""

from __future__ import annotations

from pydicom.pixels.decoders.base import DecodeRunner
from pydicom.uid import JPEGExtended12Bit

DECODER_DEPENDENCIES = {JPEGExtended12Bit: ("gdcm>=3.0.10",)}


def is_available(uid: str) -> bool:
    """pydicom's plugin check: the syntax is ours and GDCM can be imported."""
    if uid != JPEGExtended12Bit:
        return False
    try:
        import gdcm  # noqa: F401
    except ImportError:
        return False
    return True


def decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """One frame's codestream decoded to native little-endian samples (16 bits allocated for 12-bit data)."""
    import gdcm

    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(src)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetValue(fragments.__ref__())
    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((runner.columns, runner.rows, 1))
    image.SetDataElement(element)
    kind = gdcm.PhotometricInterpretation.GetPIType(str(runner.photometric_interpretation))
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(kind))
    if runner.samples_per_pixel > 1:
        image.SetPlanarConfiguration(runner.planar_configuration)
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGExtendedProcess2_4))
    bits_stored = runner.bits_stored
    image.SetPixelFormat(
        gdcm.PixelFormat(
            runner.samples_per_pixel, runner.bits_allocated, bits_stored, bits_stored - 1, runner.pixel_representation
        )
    )
    buffer = image.GetBuffer()
    if buffer is None:  # IJG reported the error (corrupt or truncated codestream); GDCM only returns nothing
        raise ValueError("GDCM could not decode the JPEG Extended codestream.")
    return buffer.encode("utf-8", "surrogateescape")
