"""Training throughput and inference latency: iterations/s and peak memory per preset and image size.

    python -m bench.throughput [--device cpu|cuda] [--configs 2d-small 2d-paper 3d-small ...]
                               [--amp] [--channels-last] [--compile] [--steps 5] [--out bench/throughput.md]
    python -m bench.throughput --changes [--device cuda] [--configs ...]   # each change, before/after
    python -m bench.throughput --inference                                 # the CPU goals, beside ANTs SyN

Each configuration runs in its own process (clean peak memory): a few untimed warm-up training
steps (``train_step``: both directions, Eq. 1, one backward, the three optimisers), then timed
steps; then network inference (``Fire.register`` under ``torch.inference_mode``, one pair and a
batch) and ``firekit.registration.pipeline.register`` end to end (arrays in memory, refinement off). CPU peak
memory is the process's maximum resident set; CUDA's is ``torch.cuda.max_memory_allocated``.
On CUDA the host syncs of a training step are counted (``torch.cuda.set_sync_debug_mode``).

``--changes`` measures the GPU-path changes one on top of the other, on the same machine:
fp32 with the loss read back each step (a host sync: what ``train`` does on the CPU), then no
read-back (``train``'s default on a GPU: ``sync_every`` 25), + bf16 autocast, + channels_last,
+ ``torch.compile``. ``--inference`` times the shipped models on a 2D 256 x 256 and a 3D demo
pair (real brains) and ANTs SyN on the same pairs, and writes ``bench/throughput.json``, which
``python -m bench.vs_ants --report-only`` puts into ``bench/results.md``.
Prints tables and appends them, with the settings, to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = {  # name -> (preset, spatial shape); 3D at the paper's 1.28 mm grid of the demo brains
    "2d-tiny": ("small", (32, 32)),  # a smoke check of the bench itself
    "2d-small": ("small", (256, 256)),
    "2d-paper": ("paper", (256, 256)),
    "3d-small-half": ("small", (64, 80, 64)),
    "3d-small": ("small", (128, 160, 128)),
    "3d-paper": ("paper", (128, 160, 128)),
}
PAPER_STEPS = 144_000


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _count_syncs(step, device) -> int | None:
    """Host syncs in one call of ``step`` on CUDA (None elsewhere: nothing to wait for)."""
    import warnings

    import torch

    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def measure(name: str, device: str, steps: int, amp: bool, channels_last: bool, compile_model: bool,
            batch: int, read_back: bool = False) -> dict:
    """One configuration, in this process."""
    import numpy as np
    import torch

    from firekit.fire.model import Fire, FireConfig
    from firekit.registration.pipeline import register
    from firekit.training.config import TrainConfig
    from firekit.training.optim import make_optimizers
    from firekit.training.step import train_step

    preset, shape = CONFIGS[name]
    device = torch.device(device)
    torch.manual_seed(0)
    model = Fire(FireConfig.from_preset(preset, ndim=len(shape))).to(device)
    memory_format = {2: torch.channels_last, 3: torch.channels_last_3d}[len(shape)]
    if channels_last:
        model = model.to(memory_format=memory_format)
    net = torch.compile(model) if compile_model else model
    optimizers = make_optimizers(model, TrainConfig.from_preset(preset))
    x_a = torch.rand(batch, 1, *shape, device=device) * 2 - 1
    x_b = torch.roll(x_a, 3, dims=2)
    if channels_last:
        x_a, x_b = x_a.contiguous(memory_format=memory_format), x_b.contiguous(memory_format=memory_format)

    def step() -> None:  # read_back: the loss is checked on the host each step (a sync on a GPU)
        train_step(net, optimizers, x_a, x_b, autocast=amp, check_finite=read_back)

    for _ in range(2):  # warm-up (and compilation)
        step()
    _sync(device)
    syncs = _count_syncs(step, device)
    _sync(device)
    tick = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    step_s = (time.perf_counter() - tick) / steps
    train_peak = _peak_mb(device)

    model.eval()
    with torch.inference_mode():
        model.register(x_a[:1], x_b[:1])
        _sync(device)
        tick = time.perf_counter()
        for _ in range(steps):
            model.register(x_a[:1], x_b[:1])
        _sync(device)
        pair_ms = (time.perf_counter() - tick) / steps * 1000
        many = 8 if len(shape) == 2 else 2
        xs_a, xs_b = x_a[:1].expand(many, *x_a.shape[1:]).contiguous(), x_b[:1].expand(many, *x_b.shape[1:]).contiguous()
        model.register(xs_a, xs_b)
        _sync(device)
        tick = time.perf_counter()
        model.register(xs_a, xs_b)
        _sync(device)
        batched_ms = (time.perf_counter() - tick) / many * 1000
    moving = np.random.default_rng(0).random(shape).astype(np.float32)
    fixed = np.roll(moving, 3, axis=0)
    register(model, moving, fixed, spacing=None, device=device)  # warm-up
    tick = time.perf_counter()
    register(model, moving, fixed, spacing=None, device=device)
    end_to_end_ms = (time.perf_counter() - tick) * 1000
    return {"config": name, "preset": preset, "shape": list(shape), "batch": batch, "device": str(device),
            "amp": amp, "channels_last": channels_last, "compile": compile_model, "read_back": read_back,
            "syncs_per_step": syncs, "step_s": step_s, "it_per_s": 1 / step_s, "hours_144k": PAPER_STEPS * step_s / 3600,
            "train_peak_mb": train_peak, "pair_ms": pair_ms, "batched_pair_ms": batched_ms,
            "register_ms": end_to_end_ms, "peak_mb": _peak_mb(device),
            "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6}


GOALS = {"2d": 50.0, "3d": 2000.0}  # ms per pair on 2 CPU cores (issue 9); 3D peak RAM under 4 GB
PAIRS = {  # what --inference times, for the table and results.md
    "2d": "2D 256x256 at 1 mm: the middle axial slice of two demo brains (T2-like onto T1); network grid 200x200",
    "3d": "3D 128x160x128 at 1.28 mm: two demo brains (T2-like onto T1); the 3D model runs at 2.56 mm",
}


def demo_pair(kind: str):
    """(moving, fixed) Volumes: T2-like of demo subject 1 onto T1 of subject 0. 3D: the demo grid;
    2D: the middle axial slice resampled to 1 mm and centred on a 256 x 256 grid."""
    import numpy as np
    from scipy import ndimage

    from firekit.data import io
    from firekit.data.braindata import demo_subject

    moving, fixed = demo_subject(1)["T2"], demo_subject(0)["T1"]
    if kind == "3d":
        return moving, fixed
    pair = []
    for volume in (moving, fixed):
        k = volume.shape[2] // 2
        zoom = io.spacing(volume.affine)[:2]
        plane = ndimage.zoom(volume.data[:, :, k].astype(np.float32), zoom, order=1)
        canvas = np.full((256, 256), float(plane.min()), np.float32)
        start = [(256 - n) // 2 for n in plane.shape]
        canvas[start[0]:start[0] + plane.shape[0], start[1]:start[1] + plane.shape[1]] = plane
        pair.append(io.Volume(canvas, np.diag([1.0, 1.0, 1.0])))
    return tuple(pair)


def inference(kind: str, repeats: int = 5, ants_repeats: int = 1) -> dict:
    """The shipped model registering one demo pair end to end (``register``, refinement off), as a
    user calls it, and ANTs SyN (``ants.registration(type_of_transform="SyN")``, Mattes MI affine
    stage, as in bench/vs_ants) on the same pair, each timed as the median of its repeats."""
    import numpy as np

    from firekit.registration import pipeline as reg

    moving, fixed = demo_pair(kind)
    model = reg.load("default" if kind == "2d" else
                     str(Path(reg.__file__).parents[1] / "weights" / "fire3d_t1_t2like_small.pt"))

    def median_ms(function, n: int) -> float:
        times = []
        for _ in range(n):
            tick = time.perf_counter()
            function()
            times.append(time.perf_counter() - tick)
        return float(np.median(times)) * 1000

    reg.register(model, moving, fixed, "b2a")  # warm-up
    out = {"kind": kind, "pair": PAIRS[kind], "goal_ms": GOALS[kind],
           "median_ms": median_ms(lambda: reg.register(model, moving, fixed, "b2a"), repeats)}
    if kind == "2d":
        out["batched_ms"] = median_ms(lambda: reg.register_pairs(model, [(moving, fixed)] * 16, "b2a"), 1) / 16
        # the network on the full 256 x 256 grid
        out["full_grid_ms"] = median_ms(lambda: reg.register(model, moving, fixed, "b2a", spacing=None), repeats)
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # ITK reads its thread count when ants is first imported: as many as torch uses.
    import torch

    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(torch.get_num_threads()))
    if importlib.util.find_spec("ants") is None:
        return out  # antspyx is in the bench extra: no SyN column without it
    from bench.ants_runs import run_ants

    out["syn_ms"] = float(np.median([run_ants("SyN", moving, fixed, seed=0)["wall"] for _ in range(ants_repeats)])) * 1000
    return out


CHANGES = [  # --changes: each row adds one change to the row above
    ("fp32, loss read back each step", dict(read_back=True)),
    ("no host sync in the step", dict()),
    ("+ bf16 autocast", dict(amp=True)),
    ("+ channels_last", dict(amp=True, channels_last=True)),
    ("+ torch.compile", dict(amp=True, channels_last=True, compile=True)),
]


def _run_isolated(args, name: str, **settings) -> dict:
    """:func:`measure` in a fresh process (its own peak memory); ``settings`` override ``args``'."""
    flags = {"amp": args.amp, "channels_last": args.channels_last, "compile": args.compile, "read_back": False,
             **settings}
    command = [sys.executable, "-m", "bench.throughput", "--one", name, "--device", args.device,
               "--steps", str(args.steps), "--batch", str(args.batch)]
    command += [f"--{flag.replace('_', '-')}" for flag, on in flags.items() if on]
    done = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent)
    if done.returncode != 0:
        return {"config": name, "error": (done.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> list[str]:
    lines = ["| config | preset | image | batch | params (M) | train it/s | 144k steps (h) | train peak (MB) | "
             "network, 1 pair (ms) | per pair in a batch (ms) | register() end to end (ms) | peak (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | failed: {r['error']} |" + " |" * 10)
            continue
        lines.append(f"| {r['config']} | {r['preset']} | {'x'.join(map(str, r['shape']))} | {r['batch']} | "
                     f"{r['parameters_m']:.2f} | {r['it_per_s']:.2f} | {r['hours_144k']:.1f} | {r['train_peak_mb']:.0f} | "
                     f"{r['pair_ms']:.1f} | {r['batched_pair_ms']:.1f} | {r['register_ms']:.0f} | {r['peak_mb']:.0f} |")
    return lines


def changes_table(rows: list[tuple[str, str, dict]]) -> list[str]:
    """Rows of (config, change, measurement): it/s, the speed-up over the row above and over the
    first row of the config, peak memory, host syncs per step."""
    lines = ["| config | change | train it/s | vs row above | vs first row | 144k steps (h) | train peak (MB) | "
             "host syncs per step |", "|---|---|---|---|---|---|---|---|"]
    first = previous = None
    for config, change, r in rows:
        if change == CHANGES[0][0]:
            first = previous = None
        if "error" in r:
            lines.append(f"| {config} | {change} | failed: {r['error']} | | | | | |")
            continue
        above = f"{r['it_per_s'] / previous:.2f}x" if previous else ""
        base = f"{r['it_per_s'] / first:.2f}x" if first else ""
        syncs = "" if r.get("syncs_per_step") is None else str(r["syncs_per_step"])
        lines.append(f"| {config} | {change} | {r['it_per_s']:.2f} | {above} | {base} | {r['hours_144k']:.1f} | "
                     f"{r['train_peak_mb']:.0f} | {syncs} |")
        first = first or r["it_per_s"]
        previous = r["it_per_s"]
    return lines


def inference_table(results: list[dict]) -> list[str]:
    """The CPU goals of issue 9, with ANTs SyN on the same pairs (also in bench/results.md)."""
    lines = ["| pair | firekit register(), refinement off (ms, median) | 16 pairs batched, per pair (ms) | "
             "network on the full grid (ms) | peak RSS (MB) | ANTs SyN, same pair (ms) | SyN ÷ firekit | goal |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['kind']} | failed: {r['error']} | | | | | | |")
            continue
        met = r["median_ms"] <= r["goal_ms"] and (r["kind"] == "2d" or r["peak_mb"] <= 4096)
        goal = f"< {r['goal_ms']:.0f} ms" + (", < 4096 MB" if r["kind"] == "3d" else "")
        number = lambda key: f"{r[key]:.1f}" if r.get(key) is not None else "—"  # noqa: E731
        ratio = f"{r['syn_ms'] / r['median_ms']:.0f}x" if r.get("syn_ms") else "—"
        lines.append(f"| {r['pair']} | {r['median_ms']:.1f} | {number('batched_ms')} | {number('full_grid_ms')} | "
                     f"{r['peak_mb']:.0f} | {number('syn_ms')} | {ratio} | {goal}: {'met' if met else '**missed**'} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", nargs="*", default=["2d-small", "2d-paper", "3d-small-half"], choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per configuration")
    parser.add_argument("--batch", type=int, default=1, help="pairs per training step")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--read-back", action="store_true", help="check the loss on the host every step (a sync)")
    parser.add_argument("--changes", action="store_true",
                        help="measure each GPU-path change on top of the one before (see CHANGES)")
    parser.add_argument("--out", type=Path, default=HERE / "throughput.md")
    parser.add_argument("--inference", action="store_true",
                        help="time the shipped models' register() on a 2D 256x256 and a 3D demo pair, and ANTs SyN "
                             "on the same pairs; writes bench/throughput.json")
    parser.add_argument("--json", type=Path, default=HERE / "throughput.json", help=argparse.SUPPRESS)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one config, print JSON
    parser.add_argument("--one-inference", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one_inference:
        print(json.dumps(inference(args.one_inference)))
        return 0
    if args.one:
        print(json.dumps(measure(args.one, args.device, args.steps, args.amp, args.channels_last, args.compile,
                                 args.batch, args.read_back)))
        return 0
    import torch

    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else \
        f"CPU {platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} cores"
    text = ""
    if args.changes:
        rows = [(name, change, _run_isolated(args, name, **settings))
                for name in args.configs for change, settings in CHANGES]
        text = "\n".join([f"{date.today()}, {device}, torch {torch.__version__}; {args.steps} timed steps after 2 "
                          "warm-up; each change on top of the row above", "", *changes_table(rows)])
    elif args.configs:
        rows = [_run_isolated(args, name) for name in args.configs]
        settings = (f"{date.today()}, {device}, torch {torch.__version__}; amp {args.amp}, channels_last "
                    f"{args.channels_last}, compile {args.compile}; {args.steps} timed steps after 2 warm-up")
        text = "\n".join([settings, "", *table(rows)])
    if args.inference:
        results = []
        for kind in ("2d", "3d"):
            done = subprocess.run([sys.executable, "-m", "bench.throughput", "--one-inference", kind],
                                  capture_output=True, text=True, cwd=HERE.parent)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else
                           {"kind": kind, "error": (done.stderr.strip().splitlines() or ["failed"])[-1][:120]})
        args.json.write_text(json.dumps({"date": str(date.today()), "machine": device, "torch": torch.__version__,
                                         "pairs": results}, indent=1))
        text = "\n\n".join(part for part in (text, f"{date.today()}, {device}", "\n".join(inference_table(results)))
                           if part)
    print(text)
    with open(args.out, "a") as handle:
        handle.write(f"\n### `python -m bench.throughput {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
                     f"{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
