"""Tissue, tiling, stain, registration, masks, inference, heatmaps, lesions: pure functions."""
