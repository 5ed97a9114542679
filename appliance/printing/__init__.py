"""The DICOM Print SCP: film sessions to PostScript on a printer."""
