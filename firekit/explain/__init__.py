"""Explaining a model: Grad-CAM, latent features and invariance maps, pictures and widgets, napari layer data."""
