"""The fused Triton ghost-norm kernel against the torch reference: relative error and time per shape.

For x (B, T, d) and g (B, T, p), both compute ‖Σ_t g_t x_tᵀ‖²_F per sample. The torch path forms the two
B×T×T Gram matrices; the kernel (``dpcap/privacy/layers/ghost_kernel.py``) accumulates tiles of them in
registers and never writes them out. Shapes are the `base` captioner's Linear layers (ViT-B/16 at 224 px:
T = 197, width 768, FFN 3072; decoder: 40 tokens) at micro-batch 128, float32 (what the clipper feeds it)
and bf16. Errors are against a float64 reference on the same (rounded) inputs.

    python benchmarks/ghost_kernel.py --device cuda --out benchmarks/results/ghost_kernel.json
    TRITON_INTERPRET=1 python benchmarks/ghost_kernel.py --device cpu --small   # the interpreter: tiny shapes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from dpcap.privacy.layers.ghost_kernel import ghost_sq_norms_triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dp_step import write_json_atomic  # noqa: E402  (benchmarks/ is not a package: import its sibling by path)

# (name, B, T, d, p): the base captioner's layer shapes at micro-batch 128.
BASE_SHAPES = (
    ("encoder qkv", 128, 197, 768, 2304),
    ("encoder fc1", 128, 197, 768, 3072),
    ("encoder fc2", 128, 197, 3072, 768),
    ("decoder cross-attn kv", 128, 197, 768, 1536),
    ("decoder fc1", 128, 40, 768, 3072),
)
SMALL_SHAPES = (("odd", 3, 17, 33, 9), ("T=1", 2, 1, 8, 5), ("text-like", 2, 24, 32, 64))


def torch_reference(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return ((x @ x.transpose(1, 2)) * (g @ g.transpose(1, 2))).sum(dim=(1, 2))


def timed(fn, device: torch.device, iters: int) -> float:
    """Median seconds of ``fn()`` over ``iters`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device, iters: int) -> dict:
    b, t, d, p = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(b, t, d, generator=gen).to(device, dtype)
    g = torch.randn(b, t, p, generator=gen).to(device, dtype) / (t * p) ** 0.5
    exact = torch_reference(x.double(), g.double())
    kernel = ghost_sq_norms_triton(x, g)
    reference = torch_reference(x.float(), g.float())
    row = {
        "layer": name,
        "B": b,
        "T": t,
        "d": d,
        "p": p,
        "dtype": str(dtype).removeprefix("torch."),
        "kernel_max_rel_error": float(((kernel.double() - exact).abs() / exact.abs()).max()),
        "torch_max_rel_error": float(((reference.double() - exact).abs() / exact.abs()).max()),
        "gram_bytes_avoided": 2 * b * t * t * 4,
    }
    row["kernel_s"] = timed(lambda: ghost_sq_norms_triton(x, g), device, iters)
    row["torch_s"] = timed(lambda: torch_reference(x.float(), g.float()), device, iters)
    row["speedup"] = row["torch_s"] / row["kernel_s"] if row["kernel_s"] > 0 else None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny shapes (the interpreter on CPU is slow)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ghost_kernel.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("the kernel runs on CUDA, or on the CPU under TRITON_INTERPRET=1")
    shapes = SMALL_SHAPES if args.small else BASE_SHAPES
    iters = 1 if args.small else args.iters
    rows = [measure(name, shape, dtype, device, iters) for name, *shape in shapes
            for dtype in (torch.float32, torch.bfloat16)]  # fmt: skip
    for row in rows:
        print(f"{row['layer']:<22} {row['dtype']:<9} B={row['B']} T={row['T']} d={row['d']} p={row['p']}: "
              f"kernel {row['kernel_s'] * 1e3:.2f} ms, torch {row['torch_s'] * 1e3:.2f} ms, "
              f"rel err {row['kernel_max_rel_error']:.1e} (torch {row['torch_max_rel_error']:.1e})")  # fmt: skip
    report = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (TRITON_INTERPRET=1)",
        "torch": torch.__version__,
        "rows": rows,
    }
    write_json_atomic(args.out, report)
    print(json.dumps(report, separators=(",", ":")))


if __name__ == "__main__":
    main()
