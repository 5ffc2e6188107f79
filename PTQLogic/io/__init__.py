"""Reading volumes (NIfTI, NRRD, MHA, DICOM) and writing label maps with their label tables."""
