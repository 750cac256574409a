"""Write docs/napari.png: the demo pair registered with the Register widget (run under a display,
e.g. `xvfb-run -a -s "-screen 0 1400x900x24" .venv/bin/python docs/make_napari_screenshot.py`)."""

import sys
import time
from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication


def main(out: Path) -> None:
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 850)
    viewer.open_sample("firekit", "demo_pair_2d")
    _, widget = viewer.window.add_plugin_dock_widget("firekit", "Register")
    widget.moving_labels.value = viewer.layers["moving labels"]
    widget.fixed_labels.value = viewer.layers["fixed labels"]
    widget.run()
    app, start = QApplication.instance(), time.time()
    while widget.report is None and not widget.status.value.startswith("error") and time.time() - start < 300:
        app.processEvents()
        time.sleep(0.05)
    for layer in viewer.layers:
        layer.visible = layer.name.startswith(("fixed T1", "warped moving", "deformation"))
    warped = next(layer for layer in viewer.layers if layer.name.startswith("warped moving"))
    viewer.layers.selection.active = warped
    warped.colormap, warped.blending, warped.opacity = "magenta", "additive", 0.8
    viewer.layers["fixed T1 (subject 0)"].colormap = "green"
    viewer.reset_view()
    for _ in range(20):
        app.processEvents()
        time.sleep(0.05)
    from PIL import Image

    Image.fromarray(viewer.screenshot(canvas_only=False)).save(out)
    print(f"{out}: {widget.status.value}")
    viewer.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("napari.png"))
