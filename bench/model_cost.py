"""Parameters, CPU training-step and inference time of the FIRE presets; prints a table.

Usage:
    python bench/model_cost.py [--sizes 64x64 128x160] [--repeats 3] [--out bench/model_cost.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import date
from pathlib import Path

import torch

from firekit import Fire, FireConfig, TrainConfig, make_optimizers, train_step


def measure(preset: str, shape: tuple[int, ...], repeats: int, batch: int) -> dict:
    torch.manual_seed(0)
    model = Fire(FireConfig.from_preset(preset, len(shape)))
    optimizers = make_optimizers(model, TrainConfig.from_preset(preset))
    x_a = torch.rand(batch, 1, *shape) * 2 - 1
    x_b = torch.rand(batch, 1, *shape) * 2 - 1
    train_step(model, optimizers, x_a, x_b)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        train_step(model, optimizers, x_a, x_b)
    step = (time.perf_counter() - start) / repeats
    model.eval()
    with torch.inference_mode():
        model.register(x_a[:1], x_b[:1])
        start = time.perf_counter()
        for _ in range(repeats):
            model.register(x_a[:1], x_b[:1])
        infer = (time.perf_counter() - start) / repeats
    params = sum(p.numel() for p in model.parameters())
    return {"preset": preset, "shape": "x".join(map(str, shape)), "batch": batch, "params_M": params / 1e6,
            "step_s": step, "register_ms": infer * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["64x64", "128x160"])
    parser.add_argument("--presets", nargs="+", default=["small", "paper"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the table (Markdown) here")
    args = parser.parse_args()
    rows = [measure(p, tuple(int(v) for v in s.split("x")), args.repeats, args.batch)
            for s in args.sizes for p in args.presets]
    header = "| preset | image | batch | parameters (M) | training step (s) | register one pair (ms) |"
    lines = [
        f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {date.today()}",
        "",
        header,
        "|---|---|---|---|---|---|",
        *[f"| {r['preset']} | {r['shape']} | {r['batch']} | {r['params_M']:.2f} | {r['step_s']:.2f} | "
          f"{r['register_ms']:.0f} |" for r in rows],
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
