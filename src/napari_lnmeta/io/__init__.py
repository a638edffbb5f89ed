"""Slides, pyramids, OME-Zarr results and annotations. No Qt, no napari."""
