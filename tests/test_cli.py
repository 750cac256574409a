"""The firekit console script, through subprocess as a user runs it."""

import subprocess
import sys


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "firekit.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_help_and_version():
    result = run("--help")
    assert result.returncode == 0 and "demo" in result.stdout
    assert run("--version").stdout.startswith("firekit ")
    assert run("demo", "--help").returncode == 0


def test_demo_writes_results(tmp_path):
    out = tmp_path / "results"
    result = run("demo", "--out", str(out), "--steps", "3", "--size", "32")
    assert result.returncode == 0, result.stderr
    for name in ("model.pt", "losses.csv", "metrics.txt", "registration.png"):
        assert (out / name).stat().st_size > 0, name
    assert len((out / "losses.csv").read_text().splitlines()) == 1 + 3
    assert "Dice after registration" in result.stdout
    assert (out / "registration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_argument_is_one_line_exit_2(tmp_path):
    result = run("demo", "--out", str(tmp_path), "--size", "30")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "multiple of 4" in result.stderr
    assert "Traceback" not in result.stderr
