"""Training throughput and inference latency: iterations/s and peak memory per preset and image size.

    python -m bench.throughput [--device cpu|cuda] [--configs 2d-small 2d-paper 3d-small ...]
                               [--amp] [--channels-last] [--compile] [--steps 5] [--out bench/throughput.md]

Each configuration runs in its own process (clean peak memory): a few untimed warm-up training
steps (``train_step``: both directions, Eq. 1, one backward, the three optimisers), then timed
steps; then network inference (``Fire.register`` under ``torch.inference_mode``, one pair and a
batch) and ``firekit.register.register`` end to end (arrays in memory, refinement off). CPU peak
memory is the process's maximum resident set; CUDA's is ``torch.cuda.max_memory_allocated``.
Prints a table and appends it, with the settings, to ``--out``.
"""

from __future__ import annotations

import argparse
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


def measure(name: str, device: str, steps: int, amp: bool, channels_last: bool, compile_model: bool,
            batch: int) -> dict:
    """One configuration, in this process."""
    import numpy as np
    import torch

    from firekit.model import Fire, FireConfig
    from firekit.register import register
    from firekit.train import TrainConfig, make_optimizers, train_step

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
    for _ in range(2):  # warm-up (and compilation)
        train_step(net, optimizers, x_a, x_b, autocast=amp)
    _sync(device)
    tick = time.perf_counter()
    for _ in range(steps):
        train_step(net, optimizers, x_a, x_b, autocast=amp)
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
            "amp": amp, "channels_last": channels_last, "compile": compile_model,
            "step_s": step_s, "it_per_s": 1 / step_s, "hours_144k": PAPER_STEPS * step_s / 3600,
            "train_peak_mb": train_peak, "pair_ms": pair_ms, "batched_pair_ms": batched_ms,
            "register_ms": end_to_end_ms, "peak_mb": _peak_mb(device),
            "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6}


GOALS = {"2d": 50.0, "3d": 2000.0}  # ms per pair on 2 CPU cores (issue 9); 3D peak RAM under 4 GB


def inference(kind: str, repeats: int = 5) -> dict:
    """The shipped model registering one pair end to end (``register``, refinement off), as a user
    calls it: 2D 256 x 256 arrays at 1 mm (``spacing=None``: the network sees 256 x 256), or the
    demo brains' 3D volumes (128 x 160 x 128 at 1.28 mm; the 3D model runs at 2.56 mm)."""
    import numpy as np

    from firekit import register as reg

    if kind == "2d":
        model = reg.load("default")
        rng = np.random.default_rng(0)
        moving, fixed = rng.random((256, 256)).astype(np.float32), rng.random((256, 256)).astype(np.float32)
        options = {}  # the default 1.28 mm grid: the network sees 200 x 200
    else:
        from firekit.braindata import demo_subject

        model = reg.load(str(Path(reg.__file__).parent / "weights" / "fire3d_t1_t2like_small.pt"))
        moving, fixed = demo_subject(1)["T2"], demo_subject(0)["T1"]
        options = {}
    reg.register(model, moving, fixed, "b2a", **options)  # warm-up
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        reg.register(model, moving, fixed, "b2a", **options)
        times.append(time.perf_counter() - tick)
    batch_ms = full_ms = None
    if kind == "2d":
        tick = time.perf_counter()
        reg.register_pairs(model, [(moving, fixed)] * 16, "b2a")
        batch_ms = (time.perf_counter() - tick) / 16 * 1000
        full = []
        for _ in range(repeats):  # the network on the full 256 x 256 grid (spacing=None)
            tick = time.perf_counter()
            reg.register(model, moving, fixed, "b2a", spacing=None)
            full.append(time.perf_counter() - tick)
        full_ms = float(np.median(full)) * 1000
    return {"kind": kind, "median_ms": float(np.median(times)) * 1000, "batched_ms": batch_ms, "full_grid_ms": full_ms,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "goal_ms": GOALS[kind]}


def _run_isolated(args, name: str) -> dict:
    command = [sys.executable, "-m", "bench.throughput", "--one", name, "--device", args.device,
               "--steps", str(args.steps), "--batch", str(args.batch)]
    command += [flag for flag, on in (("--amp", args.amp), ("--channels-last", args.channels_last),
                                      ("--compile", args.compile)) if on]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", nargs="+", default=["2d-small", "2d-paper", "3d-small-half"], choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per configuration")
    parser.add_argument("--batch", type=int, default=1, help="pairs per training step")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--out", type=Path, default=HERE / "throughput.md")
    parser.add_argument("--inference", action="store_true",
                        help="also time the shipped models' register() on a 2D 256x256 and a 3D demo pair")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one config, print JSON
    parser.add_argument("--one-inference", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one_inference:
        print(json.dumps(inference(args.one_inference)))
        return 0
    if args.one:
        print(json.dumps(measure(args.one, args.device, args.steps, args.amp, args.channels_last, args.compile,
                                 args.batch)))
        return 0
    import torch

    rows = [_run_isolated(args, name) for name in args.configs]
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else \
        f"CPU {platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} cores"
    settings = (f"{date.today()}, {device}, torch {torch.__version__}; amp {args.amp}, channels_last "
                f"{args.channels_last}, compile {args.compile}; {args.steps} timed steps after 2 warm-up")
    text = "\n".join([settings, "", *table(rows)])
    if args.inference:
        lines = ["", "| shipped model, register() one pair (refinement off) | median ms | ms per pair, 16 batched "
                 "(register_pairs) | network on the full grid (spacing=None), ms | peak RSS (MB) | goal |",
                 "|---|---|---|---|---|---|"]
        for kind in ("2d", "3d"):
            done = subprocess.run([sys.executable, "-m", "bench.throughput", "--one-inference", kind],
                                  capture_output=True, text=True, cwd=HERE.parent)
            r = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
            if r is None:
                lines.append(f"| {kind} | failed: {done.stderr.strip().splitlines()[-1][:120]} | | | |")
                continue
            met = r["median_ms"] <= r["goal_ms"] and (kind == "2d" or r["peak_mb"] <= 4096)
            batched = f"{r['batched_ms']:.1f}" if r["batched_ms"] is not None else ""
            full = f"{r['full_grid_ms']:.1f}" if r["full_grid_ms"] is not None else ""
            goal = f"< {r['goal_ms']:.0f} ms" + (", < 4096 MB" if kind == "3d" else "")
            where = "256x256 at 1 mm; network grid 200x200 (1.28 mm)" if kind == "2d" else \
                "128x160x128 demo pair; 3D model at 2.56 mm"
            lines.append(f"| {kind}: {where} | {r['median_ms']:.1f} | {batched} | {full} | "
                         f"{r['peak_mb']:.0f} | {goal}: {'met' if met else '**missed**'} |")
        text += "\n" + "\n".join(lines)
    print(text)
    with open(args.out, "a") as handle:
        handle.write(f"\n### `python -m bench.throughput {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
                     f"{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
