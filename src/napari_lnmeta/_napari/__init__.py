"""Reader, writer, sample data and layer builders: imports napari, never Qt."""
