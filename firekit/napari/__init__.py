"""firekit's napari plugin (npe2; manifest ``napari.yaml``): a NIfTI reader placing layers in physical
space, demo brain sample data, and Register, Synthesis & features and Grad-CAM widgets.

A thin face: every computation is a function of :mod:`firekit.explain.layers`, tested without Qt.
Install with ``pip install "firekit[napari]"``.
"""
