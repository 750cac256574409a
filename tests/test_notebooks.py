"""The teaching notebooks: each runs headless with small settings and draws in every section; one is
served by Voila and driven in headless Chromium; environment.yml names what they import."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import yaml

from tests.notebook_tools import NOTEBOOKS, ROOT, execute, section_figures, small_settings

NAMES = ["01_quickstart", "02_inside_fire", "03_explainability", "04_train_your_own", "05_fire_vs_ants",
         "06_cardiac_4d"]
# The demo dataset at a coarser grid (2 mm): the notebooks' code paths at a fraction of the cost.
SMALL_DATA = dict(subjects=4, splits=(2, 1, 1), spacing=2.0, shape=(84, 100, 84))


@pytest.fixture(scope="module")
def data(demo_data):
    return demo_data(**SMALL_DATA)


def _notebook(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def test_every_notebook_is_there_clean_and_parameterised():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == NAMES
    for name in NAMES:
        notebook = _notebook(name)
        nbformat.validate(notebook)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert all(not cell.outputs and cell.execution_count is None for cell in code), f"{name}: outputs committed"
        assert "parameters" in code[0].metadata.get("tags", []), f"{name}: first code cell is not tagged parameters"
        for variable in ("FIREKIT_NOTEBOOK_FAST", "FIREKIT_NOTEBOOK_OUT"):
            assert variable in code[0].source, f"{name}: parameters cell does not read {variable}"
        assert "FIREKIT_DATA" in code[0].source or "FIREKIT_CINE_DATA" in code[0].source


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_and_draws_in_every_section(name, data, tmp_path):
    env = small_settings(data, tmp_path / "out")
    if name == "05_fire_vs_ants":
        env["FIREKIT_BENCH_RESULTS"] = str(tmp_path / "absent.json")  # the tiny-run path, not the stored table
    notebook = execute(NOTEBOOKS / f"{name}.ipynb", env)
    figures = section_figures(notebook)
    assert len(figures) >= 4, f"{name}: sections {list(figures)}"
    empty = [section for section, count in figures.items() if count == 0]
    assert not empty, f"{name}: no figure in sections {empty}"
    errors = [out for cell in notebook.cells for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors


def _imports(notebook) -> set[str]:
    """Top-level modules imported by the notebook's code cells (IPython magics dropped)."""
    modules = set()
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        source = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
    return modules


def _environment_packages(path: Path) -> set[str]:
    spec = yaml.safe_load(path.read_text())
    names = set()
    for entry in spec["dependencies"]:
        for item in entry["pip"] if isinstance(entry, dict) else [entry]:
            if not item.startswith("-"):
                names.add(re.split(r"[<>=!~\[ ]", item, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_environment_yml_names_every_runtime_dependency_of_the_notebooks():
    assert (ROOT / "binder" / "environment.yml").read_text() == (ROOT / "environment.yml").read_text()
    named = _environment_packages(ROOT / "environment.yml")
    distributions = importlib.metadata.packages_distributions()
    local = {"firekit", "bench", "tests"}
    needed = {}
    for name in NAMES:
        for module in _imports(_notebook(name)) - local - set(sys.stdlib_module_names):
            assert module in distributions, f"{name} imports {module}, which no installed distribution provides"
            for dist in distributions[module]:
                needed.setdefault(dist.lower().replace("_", "-"), name)
    # firekit itself is installed by binder/postBuild: its own runtime requirements must be there too
    for requirement in importlib.metadata.requires("firekit"):
        if "extra ==" not in requirement or "extra == \"notebooks\"" in requirement:
            needed.setdefault(re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-"), "firekit")
    missing = {dist: by for dist, by in needed.items() if dist not in named}
    assert not missing, f"environment.yml lacks {missing} (package: needed by)"
    assert {"python", "pip", "jupyterlab", "ipywidgets", "ipykernel", "itkwidgets"} <= named
    post_build = (ROOT / "binder" / "postBuild").read_text()
    assert "pip install --no-deps -e ." in post_build and os.access(ROOT / "binder" / "postBuild", os.X_OK)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


def test_voila_serves_the_quickstart_and_a_slider_redraws_the_picture(data, tmp_path):
    """Voila on 127.0.0.1 runs 01_quickstart; in Chromium, dragging the axial slider of the first
    viewer sends the value to the kernel, which draws a new slice into the page."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} missing: `make test` installs Debian's chromium"
    port = _free_port()
    env = {**os.environ, **small_settings(data, tmp_path / "out")}
    voila = Path(sys.executable).with_name("voila")
    log = open(tmp_path / "voila.log", "w")
    server = subprocess.Popen([str(voila), str(NOTEBOOKS / "01_quickstart.ipynb"), f"--port={port}", "--no-browser",
                               "--Voila.ip=127.0.0.1", f"--Voila.root_dir={NOTEBOOKS}"],
                              env=env, stdout=log, stderr=subprocess.STDOUT, cwd=NOTEBOOKS)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, (tmp_path / "voila.log").read_text()
                time.sleep(0.3)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/", timeout=240_000)
            page.wait_for_selector("h3:has-text('Next')", timeout=240_000)  # the last cell has run
            viewer = page.locator(".widget-vbox", has=page.locator(".widget-slider")).first
            picture = viewer.locator(".widget-output img").first
            before = picture.get_attribute("src")
            assert before.startswith("data:image/png")
            readouts = viewer.locator(".widget-readout")
            z_before = readouts.last.inner_text()
            handle = viewer.locator(".noUi-handle").last  # sliders x, y, z: the axial one
            box = handle.bounding_box()
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] / 2 + 30, box["y"] + box["height"] / 2, steps=5)
            page.mouse.up()
            assert readouts.last.inner_text() != z_before
            after, deadline = before, time.time() + 60
            while after == before and time.time() < deadline:
                page.wait_for_timeout(250)
                after = picture.get_attribute("src")
            page.screenshot(path=str(tmp_path / "voila.png"))
            browser.close()
        assert after != before and after.startswith("data:image/png"), "the picture did not change"
    finally:
        server.terminate()
        server.wait(timeout=20)
        log.close()
