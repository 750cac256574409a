"""Session settings: Qt draws through X (Xvfb, started by pytest-xvfb) with Mesa's OpenGL; Qt's
`offscreen` platform fails inside vispy's OpenGL as soon as napari adds an image layer.
matplotlib draws with Agg in this process: left to choose, it picked Qt (PySide6 is installed
for napari) and once failed to open the display ("Invalid DISPLAY variable"). Notebook kernels
are other processes and keep their inline backend."""

import os

import matplotlib

os.environ.setdefault("QT_QPA_PLATFORM", "xcb")
matplotlib.use("Agg")

import json  # noqa: E402

import pytest  # noqa: E402

# A 3-subject demo dataset at 4 mm, one subject each in train/val/test (a few seconds to build).
TINY_DEMO = dict(subjects=3, splits=(1, 1, 1), spacing=4.0, shape=(44, 52, 44), seed=0, progress=False)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """``demo_data(**settings)``: the folder of a demo dataset built with :data:`TINY_DEMO` updated
    by ``settings``, once per session for each settings; shared, so read it and never write."""
    from firekit.data import braindata

    built = {}

    def build(**settings):
        settings = {**TINY_DEMO, **settings}
        key = json.dumps(settings, sort_keys=True)
        if key not in built:
            built[key] = tmp_path_factory.mktemp("demo") / "data"
            braindata.build_demo_dataset(built[key], **settings)
        return built[key]

    return build


@pytest.fixture(scope="session")
def tiny_demo(demo_data):
    """The :data:`TINY_DEMO` dataset's folder."""
    return demo_data()
