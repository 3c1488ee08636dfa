"""What an ImageNet-1K linear probe costs: feature extraction throughput and the DP-Cap fit, side by side.

Three measurements in one run, then an extrapolation to ImageNet-1K (1,281,167 train + 50,000 val):

1. **Extraction.** Images/s of `dpcap.eval.features.extract_features` for each encoder size of
   ``--sizes`` (`dpcap.model.registry.create_captioner`, seed 0), on random images in [-1, 1] at the
   size's native resolution, ``--batch-size`` images a batch, one warm-up batch, then ``--batches``
   timed batches (one ``extract_features`` call each, so the per-batch times are reported too). CPU:
   ``--threads`` torch threads. CUDA: bf16 autocast, ``torch.cuda.synchronize()`` around each timed
   batch. Decoding and resizing JPEGs is *not* included (the images are already tensors on the CPU;
   on CUDA the host-to-device copy is included). The pooling is ``--pool`` (default ``mean_all``, the
   DP-Cap protocol's).
2. **Fit.** The DP-Cap protocol fit (`dpcap.eval.probe.dpcap_probe`'s: rows centred and
   L2-normalised, no standardisation, no intercept, λ = ``--lambd``/n = 0.0025/n) at ImageNet-like
   shapes: ``--classes`` 1,000 classes, ``--dim`` features, n in ``--ns`` (balanced classes), test
   top-1 on ``--n-test`` rows. Gaussian-blob features (``benchmarks/probe.py``'s ``make_problem``)
   with centres scaled so test top-1 is realistic (50-80%). dpcap's fitter against scikit-learn's
   ``LogisticRegression(fit_intercept=False, C=1/(n·λ), tol, max_iter)`` (lbfgs, multinomial) on the
   same float64 features, same tolerance (max |∂J| ≤ ``--tol``) and iteration cap (``--max-iter``);
   plus dpcap's fitter on CUDA when ``--device cuda`` is given and available. One warm-up fit of each
   solver, then ``--rounds`` interleaved rounds with a rotating start; medians. Each fit reports
   seconds, iterations, the final objective and max |∂J| (both evaluated by the same float64 code for
   every solver) and test top-1. Shapes whose features (n × dim × 4 bytes) exceed ``--max-gb`` are
   skipped (the run holds float64 copies: about 2.5× that while it fits).
3. **Extrapolation** to ImageNet-1K: extraction hours per size at each measured rate, and the fit's
   hours per solver from its largest measured n, assuming the per-iteration cost is linear in n and
   the iteration count stays as measured at that n; the memory of the features (n × D × 4 bytes).

Prints one JSON object as its last stdout line and, with ``--out``, writes the same object
(atomically) to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

import dpcap.eval.probe as probe_lib
from dpcap.eval.features import extract_features
from dpcap.eval.probe import (
    DPCAP_LAMBDA,
    LinearHead,
    accuracy,
    center_and_normalize_rows,
    fit_logistic_regression,
    logistic_objective,
    torch_threads,
)
from dpcap.model.registry import create_captioner, get_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe import make_problem, write_report  # noqa: E402  (benchmarks/ is not a package: import its sibling by path)

IMAGENET_TRAIN, IMAGENET_VAL = 1_281_167, 50_000
CENTRE_SCALE = 0.27
"""Blob centres' std: after row centring + L2 normalisation, 384 dims, 1,000 classes, test top-1 is
52.5% at n = 10,000 (10 images a class) and rises with n, like a real probe rather than a separable toy."""

SOLVERS = ("dpcap", "sklearn", "dpcap_cuda")


class _Counting:
    """Wraps the fitter's objective to count evaluations (L-BFGS line-search steps included)."""

    def __init__(self, objective, counter: list[int]):
        self._objective, self._counter = objective, counter
        self.fit_intercept = getattr(objective, "fit_intercept", True)

    def __call__(self, weight, bias):
        self._counter[0] += 1
        return self._objective(weight, bias)


class _FitTrace:
    """Records the iterations of each L-BFGS phase (float32, then float64) and the evaluations of
    `fit_logistic_regression`, by wrapping the module's `_run_lbfgs` for the duration of a fit; the
    fit itself is unchanged (the wrapper only counts)."""

    def __enter__(self):
        self.phases: list[int] = []
        self.evaluations = [0]
        self._original = probe_lib._run_lbfgs

        def traced(objective, weight, bias, **kwargs):
            weight, bias, used = self._original(_Counting(objective, self.evaluations), weight, bias, **kwargs)
            self.phases.append(int(used))
            return weight, bias, used

        probe_lib._run_lbfgs = traced
        return self

    def __exit__(self, *exc):
        probe_lib._run_lbfgs = self._original
        return False


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def resolve_device(requested: str) -> tuple[str, str | None]:
    available = torch.cuda.is_available()
    if requested == "auto":
        return ("cuda" if available else "cpu"), None
    if requested == "cuda" and not available:
        return "cpu", "--device cuda was given but torch.cuda.is_available() is False: everything ran on the CPU"
    return requested, None


# ---------------------------------------------------------------------------------------------- 1.


def measure_extraction(size: str, args, device: str) -> dict:
    cfg = get_config(size)
    res = cfg.vision.image_size
    model = create_captioner(size, seed=0)
    encoder_params = sum(p.numel() for p in model.encoder.parameters())
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch_size, 3, res, res, generator=gen) * 2 - 1
    if device == "cuda":
        images = images.pin_memory()
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    )

    def one_batch() -> tuple[float, torch.Tensor]:
        _sync(device)
        start = time.perf_counter()
        with autocast:
            feats = extract_features(model, [images], pool=args.pool, device=device)
        _sync(device)
        return time.perf_counter() - start, feats

    warmup_seconds, feats = one_batch()
    times = [one_batch()[0] for _ in range(args.batches)]
    total = sum(times)
    result = {
        "image_size": res,
        "patch_size": cfg.vision.patch_size,
        "tokens": (res // cfg.vision.patch_size) ** 2 + 1,
        "feature_dim": int(feats.shape[1]),
        "encoder_parameters": int(encoder_params),
        "batch_size": args.batch_size,
        "batches_timed": args.batches,
        "warmup_seconds": warmup_seconds,
        "seconds_per_batch": times,
        "seconds_total": total,
        "images_per_s": args.batch_size * args.batches / total,
        "images_per_s_median_batch": args.batch_size / statistics.median(times),
        "device": device,
        "autocast": "bf16" if device == "cuda" else None,
        "pool": args.pool,
        "features_finite": bool(torch.isfinite(feats).all()),
    }
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------------------------------------- 2.


def make_features(n: int, args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blob features of n train rows (and --n-test test rows), DP-Cap preprocessed, float64."""
    n_make = max(n, args.n_test)  # make_problem draws n train and n test rows; keep --n-test of the latter
    x_tr, y_tr, x_te, y_te = make_problem(n_make, args.dim, args.classes, args.centre_scale)
    x_tr, y_tr = x_tr[:n], y_tr[:n]  # labels are a permutation of arange % K: any prefix is ~balanced
    x_te, y_te = x_te[: args.n_test], y_te[: args.n_test]
    z_tr, z_te = center_and_normalize_rows(x_tr), center_and_normalize_rows(x_te)  # per sample, as released
    del x_tr, x_te
    return z_tr, torch.as_tensor(y_tr), z_te, torch.as_tensor(y_te)


def fit_dpcap(x: torch.Tensor, y: torch.Tensor, l2: float, classes: int, args, device: str) -> tuple:
    with _FitTrace() as trace, torch_threads(args.threads if device == "cpu" else None):
        _sync(device)
        start = time.perf_counter()
        head = fit_logistic_regression(
            x,
            y,
            l2=l2,
            num_classes=classes,
            max_iter=args.max_iter,
            tolerance_grad=args.tol,
            standardize=False,
            fit_intercept=False,
        )
        _sync(device)
        seconds = time.perf_counter() - start
    weight = head.weight.double().cpu()
    return (
        seconds,
        weight,
        {"iterations": sum(trace.phases), "iterations_phases": trace.phases, "evaluations": trace.evaluations[0]},
    )


def fit_sklearn(x: np.ndarray, y: np.ndarray, l2: float, args) -> tuple:
    clf = LogisticRegression(fit_intercept=False, C=1.0 / (len(y) * l2), tol=args.tol, max_iter=args.max_iter)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported as "iterations" == max_iter instead
        clf.fit(x, y)
    seconds = time.perf_counter() - start
    return seconds, torch.as_tensor(clf.coef_, dtype=torch.float64), {"iterations": int(np.max(clf.n_iter_))}


def quality(weight: torch.Tensor, x_tr, y_tr, x_te, y_te, l2: float) -> dict:
    """Final objective, max |∂J| and top-1, by the same float64 code for every solver."""
    d = weight.shape[1]
    w = weight.clone().requires_grad_(True)
    head = LinearHead(
        w,
        torch.zeros(w.shape[0], dtype=torch.float64),
        torch.zeros(d, dtype=torch.float64),
        torch.ones(d, dtype=torch.float64),
    )
    objective = logistic_objective(head, x_tr, y_tr, l2)
    (grad,) = torch.autograd.grad(objective, w)
    head = LinearHead(weight, head.bias, head.mean, head.std)
    return {
        "objective": float(objective.detach()),
        "grad_max_abs": float(grad.abs().max()),
        "top1": accuracy(head, x_te, y_te),
        "train_top1": accuracy(head, x_tr, y_tr),
        "weight_norm": float(weight.norm()),
    }


def run_fit_shape(n: int, args, solvers: list[str]) -> dict:
    features_gb = n * args.dim * 4 / 1e9
    shape = {
        "n_train": n,
        "n_test": args.n_test,
        "dim": args.dim,
        "classes": args.classes,
        "centre_scale": args.centre_scale,
        "lambd": args.lambd,
        "l2": args.lambd / n,
        "sklearn_C": 1.0 / args.lambd,
        "features_gb_float32": features_gb,
    }
    if features_gb > args.max_gb:
        return shape | {"skipped": f"n × dim × 4 bytes = {features_gb:.3g} GB > --max-gb {args.max_gb}"}
    start = time.perf_counter()
    x_tr, y_tr, x_te, y_te = make_features(n, args)
    shape["make_features_seconds"] = time.perf_counter() - start
    l2 = shape["l2"]
    here = [s for s in solvers if s != "sklearn" or args.sklearn_max_n is None or n <= args.sklearn_max_n]
    inputs = {"dpcap": (x_tr, y_tr), "sklearn": (x_tr.numpy(), y_tr.numpy())}
    if "dpcap_cuda" in here:
        inputs["dpcap_cuda"] = (x_tr.cuda(), y_tr.cuda())
    times: dict[str, list[float]] = {s: [] for s in here}
    last: dict[str, tuple] = {}
    for r in range(args.rounds):
        order = here[r % len(here) :] + here[: r % len(here)]  # rotating start: ABC, BCA, CAB, ...
        for solver in order:
            x, y = inputs[solver]
            if solver == "sklearn":
                seconds, weight, info = fit_sklearn(x, y, l2, args)
            else:
                seconds, weight, info = fit_dpcap(
                    x, y, l2, args.classes, args, "cuda" if solver == "dpcap_cuda" else "cpu"
                )
            times[solver].append(seconds)
            last[solver] = (weight, info)
            print(f"  n={n} round {r} {solver}: {seconds:.2f} s, {info['iterations']} iterations", flush=True)
    del inputs
    for solver in here:
        weight, info = last[solver]
        seconds = statistics.median(times[solver])
        shape[solver] = {
            "seconds": seconds,
            "seconds_rounds": times[solver],
            **info,
            "seconds_per_iteration": seconds / max(1, info["iterations"]),
            "hit_max_iter": info["iterations"] >= args.max_iter,
            **quality(weight, x_tr, y_tr, x_te, y_te, l2),
        }
    for solver in ("dpcap", "dpcap_cuda"):
        if solver in shape and "sklearn" in shape:
            shape[f"time_ratio_{solver}_vs_sklearn"] = shape[solver]["seconds"] / shape["sklearn"]["seconds"]
    if "dpcap" in shape and "sklearn" in shape:
        shape["objective_diff_dpcap_minus_sklearn"] = shape["dpcap"]["objective"] - shape["sklearn"]["objective"]
        shape["top1_diff_dpcap_minus_sklearn"] = shape["dpcap"]["top1"] - shape["sklearn"]["top1"]
    return shape


def warm_up(solvers: list[str], args) -> None:
    """One small fit of each solver (thread pools, first calls, CUDA context), as probe.py does."""
    gen = torch.Generator().manual_seed(1)
    x = center_and_normalize_rows(torch.randn(500, args.dim, generator=gen, dtype=torch.float64))
    y = torch.arange(500) % 5
    for solver in solvers:
        if solver == "sklearn":
            fit_sklearn(x.numpy(), y.numpy(), 1e-3, args)
        elif solver == "dpcap":
            fit_dpcap(x, y, 1e-3, 5, args, "cpu")
        else:
            fit_dpcap(x.cuda(), y.cuda(), 1e-3, 5, args, "cuda")


# ---------------------------------------------------------------------------------------------- 3.


def extrapolate(extraction: dict, fits: dict, args) -> dict:
    n_images = IMAGENET_TRAIN + IMAGENET_VAL
    out: dict = {
        "imagenet_train": IMAGENET_TRAIN,
        "imagenet_val": IMAGENET_VAL,
        "assumptions": (
            "extraction: the measured images/s (random tensors: no JPEG decoding or resizing) held for all "
            f"{n_images:,} images; fit: on {IMAGENET_TRAIN:,} train rows of the measured --dim, seconds per "
            "iteration linear in n from the solver's largest measured n, iterations as measured at that n; "
            "CPU fits on one node with the measured thread count, CUDA fits on one GPU; hours_at_max_iter: the same "
            "per-iteration cost times --max-iter (an upper bound if real features run to the cap)"
        ),
        "extraction_hours": {},
        "features_gb": {},
        "fit_hours": {},
    }
    for size, e in extraction.items():
        out["extraction_hours"][size] = {
            "device": e["device"],
            "images_per_s": e["images_per_s"],
            "hours": n_images / e["images_per_s"] / 3600,
        }
        out["features_gb"][size] = {
            "feature_dim": e["feature_dim"],
            "train_gb_float32": IMAGENET_TRAIN * e["feature_dim"] * 4 / 1e9,
            "val_gb_float32": IMAGENET_VAL * e["feature_dim"] * 4 / 1e9,
        }
    out["features_gb"][f"dim{args.dim}_measured_fits"] = {
        "feature_dim": args.dim,
        "train_gb_float32": IMAGENET_TRAIN * args.dim * 4 / 1e9,
        "val_gb_float32": IMAGENET_VAL * args.dim * 4 / 1e9,
    }
    for solver in SOLVERS:
        measured = sorted((s["n_train"], s[solver]) for s in fits.values() if solver in s)
        if not measured:
            continue
        n, m = measured[-1]
        per_iteration = m["seconds_per_iteration"] * IMAGENET_TRAIN / n
        entry = {
            "from_n": n,
            "threads": args.threads if solver != "dpcap_cuda" else None,
            "iterations_assumed": m["iterations"],
            "seconds_per_iteration_measured": m["seconds_per_iteration"],
            "seconds_per_iteration_at_imagenet": per_iteration,
            "hours": per_iteration * max(1, m["iterations"]) / 3600,
            # Real features are worse conditioned than the blobs (probe.py's demo case runs to the cap):
            "hours_at_max_iter": per_iteration * args.max_iter / 3600,
        }
        if len(measured) >= 2:  # how linear the per-iteration cost was between the smallest and largest n
            n0, m0 = measured[0]
            entry["per_iteration_cost_ratio_vs_n_ratio"] = (
                m["seconds_per_iteration"] / m0["seconds_per_iteration"]
            ) / (n / n0)
            entry["iterations_by_n"] = {str(k): v["iterations"] for k, v in measured}
        out["fit_hours"][solver] = entry
    return out


# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=["extract", "fit"], default=["extract", "fit"])
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda", "auto"],
        default="cpu",
        help="extraction device, and adds dpcap's fitter on CUDA (cuda/auto, if available)",
    )
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=None,
        help="encoder sizes to extract with (default: nano tiny small; + base on CUDA)",
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=5, help="timed batches per size, after one warm-up batch")
    parser.add_argument("--pool", default="mean_all", help="encode_image pooling (mean_all: the DP-Cap protocol)")
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads on the CPU (recorded)")
    parser.add_argument("--dim", type=int, default=384, help="feature dimension of the fits")
    parser.add_argument("--ns", type=int, nargs="+", default=[10000, 20000], help="training rows of the fits")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=10000, help="test rows for top-1")
    parser.add_argument("--centre-scale", type=float, default=CENTRE_SCALE)
    parser.add_argument("--lambd", type=float, default=DPCAP_LAMBDA, help="λ = lambd / n (DP-Cap: 0.0025)")
    parser.add_argument("--tol", type=float, default=1e-6, help="max |gradient| stopping rule, both solvers")
    parser.add_argument("--max-iter", type=int, default=1000, help="iteration cap, both solvers (dpcap_probe: 1000)")
    parser.add_argument("--max-gb", type=float, default=4.0, help="skip fit shapes with n × dim × 4 bytes above this")
    parser.add_argument("--sklearn-max-n", type=int, default=None, help="fit sklearn only up to this n (default: all)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()

    device, device_note = resolve_device(args.device)
    if args.sizes is None:
        args.sizes = ["nano", "tiny", "small"] + (["base"] if device == "cuda" else [])
    solvers = ["dpcap", "sklearn"] + (["dpcap_cuda"] if device == "cuda" else [])

    start = time.perf_counter()
    fit_logistic_regression(torch.zeros(4, 2, dtype=torch.float64), torch.tensor([0, 1, 0, 1]), l2=1.0)
    cold_start = time.perf_counter() - start

    torch.set_num_threads(args.threads)
    extraction: dict = {}
    fits: dict = {}
    with threadpool_limits(limits=args.threads):
        if "extract" in args.parts:
            for size in args.sizes:
                extraction[size] = measure_extraction(size, args, device)
                print("extract", size, json.dumps(extraction[size]), flush=True)
        if "fit" in args.parts:
            warm_up(solvers, args)
            for n in args.ns:
                fits[f"n{n}"] = run_fit_shape(n, args, solvers)
                print("fit", n, json.dumps(fits[f"n{n}"]), flush=True)
    report = {
        "extraction": extraction,
        "fit": fits,
        "extrapolation": extrapolate(extraction, fits, args),
        "cold_start_seconds": cold_start,
        "config": vars(args)
        | {
            "out": str(args.out) if args.out else None,
            "threads": torch.get_num_threads(),
            "device_used": device,
            "device_note": device_note,
            "solvers": solvers,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        },
        "versions": {"torch": torch.__version__, "sklearn": __import__("sklearn").__version__},
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
