"""Linear-probe fit time: dpcap's full-batch L-BFGS against scikit-learn's LogisticRegression.

Same standardised features, same objective (mean cross-entropy + λ/2·‖W‖², i.e. C = 1/(nλ)),
timed in interleaved rounds; prints one JSON object (accuracy of both and the time ratio).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from dpcap.eval.probe import accuracy, fit_logistic_regression


def blobs(n: int, dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 0.6
    labels = rng.integers(0, classes, size=n)
    return centres[labels] + rng.normal(size=(n, dim)), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=99)
    parser.add_argument("--l2", type=float, default=1e-3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    args = parser.parse_args()
    x, y = blobs(2 * args.n, args.dim, args.classes, seed=0)
    x = (x - x[: args.n].mean(0)) / x[: args.n].std(0)
    x_tr, y_tr, x_te, y_te = x[: args.n], y[: args.n], x[args.n :], y[args.n :]
    times = {"dpcap": [], "sklearn": []}
    for _ in range(args.rounds):
        start = time.perf_counter()
        head = fit_logistic_regression(
            torch.as_tensor(x_tr),
            torch.as_tensor(y_tr),
            l2=args.l2,
            num_classes=args.classes,
            dtype=getattr(torch, args.dtype),
        )
        times["dpcap"].append(time.perf_counter() - start)
        start = time.perf_counter()
        ref = LogisticRegression(C=1 / (args.n * args.l2), max_iter=1000, tol=1e-6).fit(x_tr, y_tr)
        times["sklearn"].append(time.perf_counter() - start)
    result = {
        "dpcap_seconds": statistics.median(times["dpcap"]),
        "sklearn_seconds": statistics.median(times["sklearn"]),
        "dpcap_top1": accuracy(head, torch.as_tensor(x_te), torch.as_tensor(y_te)),
        "sklearn_top1": float((ref.predict(x_te) == y_te).mean()),
        "config": vars(args) | {"threads": torch.get_num_threads()},
    }
    result["time_ratio_vs_sklearn"] = result["dpcap_seconds"] / result["sklearn_seconds"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
