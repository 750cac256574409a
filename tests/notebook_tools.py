"""Run a teaching notebook headless and read what each section drew (used by test_notebooks.py).

``python -m tests.notebook_tools NOTEBOOK [DATA]`` runs one with the tests' small settings, prints
the figures per section and keeps the executed copy in ``$TMPDIR/nb_NAME/``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def small_settings(data: Path, out: Path) -> dict[str, str]:
    """Environment variables the notebooks read for a quick run (their parameters cell)."""
    return {"FIREKIT_NOTEBOOK_FAST": "1", "FIREKIT_DATA": str(data), "FIREKIT_NOTEBOOK_OUT": str(out),
            "FIREKIT_CINE_DATA": str(out / "cine_phantom"),
            "FIREKIT_VIEW3D": "slices", "MPLBACKEND": "module://matplotlib_inline.backend_inline",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}


def execute(path: Path, env: dict[str, str], timeout: int = 600) -> nbformat.NotebookNode:
    """Execute a notebook in its folder with ``env`` added to the kernel's environment; raises on
    the first failing cell (nbclient's ``CellExecutionError``)."""
    notebook = nbformat.read(path, as_version=4)
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the kernel inherits the environment of the process that starts it
    try:
        NotebookClient(notebook, timeout=timeout, kernel_name="python3", store_widget_state=True,
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return notebook


def _widget_pictures(notebook) -> dict[str, int]:
    """Output widgets' PNG counts by model id, from the stored widget state."""
    state = notebook.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    return {key: sum("image/png" in out.get("data", {}) for out in model["state"].get("outputs", []))
            for key, model in state.items() if model.get("model_name") == "OutputModel"}


def _widget_children(notebook) -> dict[str, list[str]]:
    state = notebook.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    children = {}
    for key, model in state.items():
        refs = model["state"].get("children", [])
        children[key] = [ref.removeprefix("IPY_MODEL_") for ref in refs]
    return children


def section_figures(notebook) -> dict[str, int]:
    """Pictures drawn under each ``## `` heading: PNG outputs, plus PNGs inside displayed widgets."""
    pictures, children = _widget_pictures(notebook), _widget_children(notebook)

    def in_widget(model_id: str, seen=()) -> int:
        if model_id in seen:
            return 0
        return pictures.get(model_id, 0) + sum(in_widget(c, (*seen, model_id)) for c in children.get(model_id, []))

    counts: dict[str, int] = {}
    section = None
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("## "):
                    section = line[3:].strip()
                    counts.setdefault(section, 0)
        elif cell.cell_type == "code" and section is not None:
            for out in cell.get("outputs", []):
                data = out.get("data", {})
                counts[section] += "image/png" in data
                if WIDGET_VIEW in data:
                    counts[section] += in_widget(data[WIDGET_VIEW]["model_id"])
    return counts


def main(argv: list[str]) -> int:
    path = Path(argv[0]).resolve()
    data = Path(argv[1] if len(argv) > 1 else ROOT / "data" / "demo").resolve()
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"nb_{path.stem}"
    tick = time.perf_counter()
    notebook = execute(path, small_settings(data, out))
    out.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, out / path.name)
    print(json.dumps(section_figures(notebook), indent=1))
    print(f"executed notebook: {out / path.name}")
    print(f"{path.name}: {time.perf_counter() - tick:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
