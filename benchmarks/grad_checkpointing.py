"""Peak memory of one DP micro-batch step with and without activation checkpointing.

One step is what `dpcap.train.step.logical_step` does per micro-batch: ``per_sample_loss`` forward, then
``Clipper.backward`` (per-sample norms and the clipped sum into ``.grad``). The same model, batch and
clipper are measured with ``set_grad_checkpointing(False)`` and ``(True)``; the clipped gradients of the
two are compared as a sanity check. Memory is the peak of live tensor bytes above the level at the
start of the step: on CUDA ``torch.cuda.max_memory_allocated`` minus ``memory_allocated``; on CPU the
allocation/free events of ``torch.profiler`` (``profile_memory=True``) replayed in time order (every
tensor the CPU allocator hands out; not allocator caching or non-tensor memory). The result names the
method. ``captured_bytes`` is what the clipper's hooks hold after the forward (each covered layer's
input, unique storages) and ``output_grad_bytes`` the output gradients its one backward returns for
them: the book-keeping clipper holds both at once after that backward, and checkpointing shrinks
neither, so for the DP step it lowers the forward's retained bytes but not (or barely) the peak; the
non-private step (no clipper) gets the usual saving. The ``nonprivate`` rows measure that path.

    .venv/bin/python benchmarks/grad_checkpointing.py --size nano --batch-size 32
    .venv/bin/python benchmarks/grad_checkpointing.py --size tiny --batch-size 32 image_size=112
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from dpcap.model import create_captioner, get_tokenizer
from dpcap.privacy import Clipper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dp_step import cpu_step_memory, write_json_atomic  # noqa: E402  (benchmarks/ is not a package: import its sibling by path)

CAPTIONS = ("a red square on a dark background", "a dog", "two people walking along a beach at sunset", "a cat")
CPU_METHOD = "torch.profiler CPU allocator events (profile_memory=True), peak above the step's start"
CUDA_METHOD = "torch.cuda.max_memory_allocated - memory_allocated at the step's start"


MARK = "dpcap::after_forward"


def _cuda_memory(step: Callable[[], None], device: torch.device, marks: list[int]) -> tuple[int, int]:
    """(peak, live at the end of the forward) bytes above the start; ``step`` appends the latter to ``marks``."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base, marks[-1] - base


def _captured_bytes(clipper: Clipper | None) -> tuple[int, int]:
    """(bytes of the inputs the clipper's hooks hold, unique storages; bytes of the output gradients its
    backward will return for those captures, in the outputs' dtypes): both are alive together once its
    autograd.grad returns, whatever the checkpointing, so their sum is a floor under the DP peak."""
    storages, outputs = {}, 0
    for captures in clipper._captures.values() if clipper is not None else ():
        for capture in captures:
            outputs += capture.output_shape.numel() * torch.empty((), dtype=capture.output_dtype).element_size()
            for t in capture.inputs:
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()), outputs


def checkpointing_memory(
    size: str = "nano",
    *,
    batch_size: int = 32,
    device: str = "cpu",
    precision: str = "fp32",
    max_grad_norm: float = 1.0,
    seed: int = 0,
    **overrides: object,
) -> dict:
    """Peak bytes of one micro-batch step with activation checkpointing off and on, DP and non-private.

    ``dp``: forward + `Clipper.backward` (clipped sum into ``.grad``); ``nonprivate``: forward +
    ``autograd.grad(Σℓ_i, params)`` into ``.grad`` with no clipper attached (the σ = 0 path).
    `overrides` are `dpcap.model.create_captioner` overrides (e.g. ``image_size=112``). Returns a dict
    with ``method`` (how memory was measured) and, for ``dp`` and ``nonprivate``, ``off`` / ``on`` each
    ``{peak_bytes, after_forward_bytes, captured_bytes, output_grad_bytes, seconds}``
    (``after_forward_bytes``: live at the end of the forward, what the backward starts from;
    ``captured_bytes`` + ``output_grad_bytes``: see `_captured_bytes`), ``saving`` (1 − peak on/off) and
    ``max_abs_grad_diff`` between the gradients of the two (0 up to recomputation round-off).
    """
    dev = torch.device(device)
    model = create_captioner(size, seed=seed, **overrides).to(dev).train()
    tokenizer = get_tokenizer(size, **overrides)
    generator = torch.Generator().manual_seed(seed)
    images = (torch.rand(batch_size, 3, model.image_size, model.image_size, generator=generator) * 2 - 1).to(dev)
    tokens = tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(batch_size)]).to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    clipper: Clipper | None = None
    captured: list[tuple[int, int]] = []
    cuda_marks: list[int] = []  # CUDA bytes allocated at the end of each forward

    def step() -> None:
        with autocast:
            losses = model.per_sample_loss(images, tokens)
        captured.append(_captured_bytes(clipper))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            cuda_marks.append(torch.cuda.memory_allocated(dev))
        with torch.profiler.record_function(MARK):
            pass
        if clipper is not None:
            clipper.backward(losses)
            return
        for p, g in zip(params, torch.autograd.grad(losses.sum(), params)):
            p.grad = g if p.grad is None else p.grad.add_(g)

    result: dict = {
        "method": CUDA_METHOD if dev.type == "cuda" else CPU_METHOD,
        "size": size,
        "overrides": dict(overrides),
        "batch_size": batch_size,
        "device": str(dev),
        "precision": precision,
        "torch": torch.__version__,
    }
    for path in ("dp", "nonprivate"):
        clipper = Clipper(model, max_grad_norm) if path == "dp" else None
        row, grads = {}, {}
        for label, enable in (("off", False), ("on", True)):
            model.set_grad_checkpointing(enable)
            model.zero_grad(set_to_none=True)
            step()  # warm-up: lazy initialisation is not counted
            model.zero_grad(set_to_none=True)
            captured.clear()
            gc.collect()
            start = time.perf_counter()
            peak, after_forward = (
                _cuda_memory(step, dev, cuda_marks) if dev.type == "cuda" else cpu_step_memory(step, MARK)
            )
            seconds = time.perf_counter() - start
            row[label] = {
                "peak_bytes": peak,
                "after_forward_bytes": after_forward,
                "captured_bytes": captured[-1][0],
                "output_grad_bytes": captured[-1][1],
                "seconds": round(seconds, 4),
            }
            grads[label] = [p.grad.detach().clone() for p in params]
        row["saving"] = round(1 - row["on"]["peak_bytes"] / row["off"]["peak_bytes"], 4)
        row["max_abs_grad_diff"] = max(float((a - b).abs().max()) for a, b in zip(grads["off"], grads["on"]))
        result[path] = row
        if clipper is not None:
            clipper.remove()
    model.set_grad_checkpointing(False)
    return result


def _override(text: str) -> tuple[str, object]:
    key, _, raw = text.partition("=")
    for kind in (int, float):
        try:
            return key, kind(raw)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(raw.lower(), raw)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="nano")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("overrides", nargs="*", help="model overrides key=value, e.g. image_size=112")
    args = parser.parse_args(argv)
    result = checkpointing_memory(
        args.size,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        **dict(_override(o) for o in args.overrides),
    )
    if args.out is not None:
        write_json_atomic(args.out, result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
