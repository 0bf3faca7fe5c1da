"""Data: sources, the manifest, image validation, splitting, the cache and the DataModule."""
