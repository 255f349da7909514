"""Pure DICOM knowledge: UIDs, tags, the JSON model, validation, frame offsets, transcoding. No I/O of ours."""
