"""DIMSE gateway: classic DICOM networking (pynetdicom) as another entry point beside ``api/``, on the same domain
services: C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET and Storage Commitment, plus the operator's SCU commands."""
