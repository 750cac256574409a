"""Start-up time of the ``firekit`` command: help, every subcommand's help, an argument error.

Each command runs ``--runs`` times as a user runs it (the console script, a fresh process) and the
median wall time is reported; a second run through :data:`PROBE` says whether torch got imported.
The last row imports torch through ``firekit.Fire``: what every call paid before start-up was lazy.

Usage:
    python -m bench.startup [--runs 7] [--out bench/startup.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

# Runs the CLI's main on argv (sys.argv[1:]) and prints, last, whether torch and numpy were imported.
PROBE = """
import json, sys
import firekit.cli
try:
    code = firekit.cli.main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "torch": "torch" in sys.modules, "numpy": "numpy" in sys.modules}))
"""
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def command_lines() -> list[list[str]]:
    """argv of ``--help``, of every subcommand's ``--help`` (nested too) and of one argument error."""
    from firekit.cli import build_parser

    lines = [["--help"], ["--version"]]
    stack = [([], build_parser())]
    while stack:
        prefix, parser = stack.pop(0)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    lines.append([*prefix, name, "--help"])
                    stack.append(([*prefix, name], sub))
    lines += [["register"], ["register", "--moving", "m.nii.gz", "--fixed", "f.nii.gz", "--out", "w.nii.gz",
                             "--refine", "-1"], ["train", "--out", "runs/never-made"], ["nonsense"]]
    return lines


def probe(argv: list[str]) -> dict:
    """Run the CLI's main in a fresh interpreter: ``{"code": exit status, "torch": bool, "numpy": bool}``."""
    result = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=ENV,
                            timeout=120)
    return json.loads(result.stdout.strip().splitlines()[-1])


def median_seconds(command: list[str], runs: int) -> float:
    """Median wall seconds of ``command`` (a fresh process each run, output discarded)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, timeout=120)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def firekit_script() -> list[str]:
    """The installed console script beside this interpreter, else ``python -m firekit.cli``."""
    script = Path(sys.executable).with_name("firekit")
    return [str(script)] if script.exists() else [sys.executable, "-m", "firekit.cli"]


def table(runs: int) -> list[str]:
    """Markdown lines: command, median seconds, exit status, torch imported."""
    rows = ["| command | median wall s | exit | torch imported |", "|---|---|---|---|"]
    for argv in command_lines():
        seconds = median_seconds([*firekit_script(), *argv], runs)
        seen = probe(argv)
        rows.append(f"| `firekit {' '.join(argv)}` | {seconds:.3f} | {seen['code']} | "
                    f"{'yes' if seen['torch'] else 'no'} |")
    for label, code in (("python -c 'import firekit'", "import firekit"),
                        ("python -c 'import firekit; firekit.Fire' (torch)", "import firekit; firekit.Fire")):
        seconds = median_seconds([sys.executable, "-c", code], runs)
        rows.append(f"| `{label}` | {seconds:.3f} | 0 | {'yes' if 'Fire' in code else 'no'} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="runs per command (median; default 7)")
    parser.add_argument("--out", default=None, help="also write the table (Markdown) here")
    args = parser.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [f"{platform.machine()}, {os.cpu_count()} cores (load {load:.1f} at start), Python "
             f"{platform.python_version()}, {date.today()}, median of {args.runs} runs, "
             f"`{' '.join(Path(c).name for c in firekit_script())}`", "", *table(args.runs), "",
             "The last row is what every command paid before start-up was lazy (torch imported first)."]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
