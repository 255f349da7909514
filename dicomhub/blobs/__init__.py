"""Blob stores: where DICOM files live. One small interface, one module per backend."""

from dicomhub.blobs.base import BlobStore, Staged
from dicomhub.blobs.filesystem import FileSystemBlobStore

__all__ = ["BlobStore", "FileSystemBlobStore", "Staged"]
