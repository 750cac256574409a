"""The project's own files: CI entry, Binder environment, packaging."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~\[ ]", spec.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_ci_runs_make_test_only():
    lines = [l for l in (ROOT / ".ci" / "run").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert lines[-1].strip() == "make test"


def test_binder_environment_matches_root_and_names_runtime_dependencies():
    root_env = (ROOT / "environment.yml").read_text()
    assert (ROOT / "binder" / "environment.yml").read_text() == root_env
    env = yaml.safe_load(root_env)
    names = set()
    for dep in env["dependencies"]:
        if isinstance(dep, str):
            names.add(requirement_name(dep.split("=")[0]))
        else:
            names |= {requirement_name(d) for d in dep["pip"] if not d.startswith("-")}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {requirement_name(d) for d in project["dependencies"]}
    assert runtime <= names, f"environment.yml lacks {runtime - names}"
    assert "pip install --no-deps -e ." in (ROOT / "binder" / "postBuild").read_text()


def test_console_script_and_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["firekit"] == "firekit.cli:main"
    assert {"dev", "notebooks", "napari"} <= set(project["optional-dependencies"])
    assert not any("pyqt5" in d.lower() for d in project["optional-dependencies"]["napari"])
