"""dicomhub: an open-source DICOMweb archive."""

__version__ = "0.1.0"
