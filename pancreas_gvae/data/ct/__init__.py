"""CT data: phantom cohort, TCIA download, DICOM/NIfTI reading and pairing."""
