"""The SAM 3 image model (one file per component) and SAM3-I's instruction adapters."""
