"""napari-lnmeta: lymph-node metastasis detection in whole-slide images."""

__version__ = "0.1.0"
