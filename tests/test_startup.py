"""Start-up stays light: help, argument errors and ``import firekit`` import no torch; the public
names resolve lazily to the submodules' own objects. Behaviour only: nothing here is timed
(``python -m bench.startup`` measures the seconds)."""

import json
import os
import subprocess
import sys

import pytest

from bench.startup import PROBE, command_lines, probe

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_firekit_and_its_cli_import_no_torch():
    seen = run_python("import json, sys, firekit, firekit.cli, firekit.core.errors; "
                      "print(json.dumps({m: m in sys.modules for m in ('torch', 'numpy', 'nibabel')}))")
    assert seen == {"torch": False, "numpy": False, "nibabel": False}


@pytest.mark.parametrize("argv", command_lines(), ids=lambda argv: " ".join(argv))
def test_help_and_argument_errors_import_no_torch(argv):
    seen = probe(argv)
    assert seen["torch"] is False and seen["numpy"] is False, (argv, seen)
    is_error = argv[-1] not in ("--help", "--version")
    assert seen["code"] == (2 if is_error else 0), (argv, seen)


def test_every_subcommand_help_is_probed():
    from firekit.cli import build_parser

    helped = {tuple(argv[:-1]) for argv in command_lines() if argv[-1] == "--help"}
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert {(name,) for name in commands} <= helped
    assert {("data", "demo"), ("data", "cine-phantom")} <= helped


def test_probe_reports_torch_once_work_starts():
    # the probe itself must see torch when a command does import it (else the tests above prove nothing)
    result = subprocess.run([sys.executable, "-c", "import firekit.fire.model\n" + PROBE, "--version"],
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert json.loads(result.stdout.strip().splitlines()[-1])["torch"] is True


def test_argument_error_messages_are_unchanged():
    result = subprocess.run([sys.executable, "-c", PROBE, "train", "--out", "never-made"], capture_output=True,
                            text=True, env=ENV, timeout=300)
    assert result.stderr.strip() == ("firekit: error: train needs --a and --b (two modalities), "
                                     "or --cine (phases of cine series)")
    result = subprocess.run([sys.executable, "-c", PROBE, "register"], capture_output=True, text=True, env=ENV,
                            timeout=300)
    assert result.stderr.startswith("firekit register: error: the following arguments are required: --moving")
    assert result.stderr.strip().endswith("(see firekit register --help)") and result.stderr.count("\n") == 1


def test_lazy_names_are_the_submodules_objects_and_listed():
    import firekit

    code = ("import importlib, json, firekit\n"
            "names = [n for n in firekit.__all__ if n != '__version__']\n"
            "listed = set(dir(firekit))\n"
            "from firekit import Fire, load, register\n"
            "from firekit.fire import model\n"
            "from firekit.registration import pipeline\n"
            "home = lambda n: importlib.import_module('firekit.' + firekit._LAZY.get(n, 'core.errors'))\n"
            "same = {n: getattr(firekit, n) is getattr(home(n), n) for n in names}\n"
            "print(json.dumps({'missing': sorted(set(names) - listed), 'same': same, 'fire': Fire is model.Fire,"
            " 'load': load is pipeline.load, 'register': register is pipeline.register}))")
    seen = run_python(code)
    assert seen["missing"] == [] and all(seen["same"].values()), seen
    assert seen["fire"] and seen["load"] and seen["register"]
    assert set(firekit._LAZY) | {"FirekitError", "__version__"} == set(firekit.__all__)


def test_subpackages_resolve_as_attributes_and_unknown_names_raise():
    seen = run_python("import json, firekit\n"
                      "package = firekit.registration\n"
                      "import firekit.data.io\n"
                      "try:\n    firekit.no_such_thing\n    raised = False\n"
                      "except AttributeError:\n    raised = True\n"
                      "print(json.dumps({'package': package.__name__, 'io': firekit.data.io.Volume.__module__,"
                      " 'raised': raised, 'listed': 'registration' in dir(firekit)}))")
    assert seen == {"package": "firekit.registration", "io": "firekit.data.io", "raised": True, "listed": True}
