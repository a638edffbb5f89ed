"""Widgets and workers: the only place that imports qtpy and magicgui widgets."""
