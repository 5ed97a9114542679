"""An edge DICOM appliance: receive, cache, route and forward images; print films."""

__version__ = "0.1.0"
