"""DICOMcast: follows an archive's change feed and keeps a FHIR R4 server in step (Patient, Endpoint, ImagingStudy,
dose Observations). An entry point beside ``api/``: ``dicomhub cast``, or a thread of ``dicomhub serve``."""
