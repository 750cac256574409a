"""Session settings: Qt draws through X (Xvfb, started by pytest-xvfb) with Mesa's OpenGL; Qt's
`offscreen` platform fails inside vispy's OpenGL as soon as napari adds an image layer."""

import os

os.environ.setdefault("QT_QPA_PLATFORM", "xcb")
