"""Few-shot linear classification on frozen features (DP-Cap, Sander et al. 2024, Table 2).

For each shot count k and seed s, draw k training examples per class, fit the multinomial logistic
regression of :func:`dpcap.eval.probe.fit_logistic_regression` (L-BFGS on standardised features,
objective (1/n) Σ_i CE_i + (λ/2)‖W‖²_F) on those n = Σ_c min(k, n_c) examples only, and report
top-1 accuracy on the full test set; the mean and standard deviation over seeds are reported per k.

Sampling: with ``g = torch.Generator().manual_seed(s)`` one random permutation of the training set
orders the examples of every class; the k-shot sample takes the first k of each class in that order.
So for one seed the samples are nested (1-shot ⊂ 2-shot ⊂ …), which makes the accuracy-vs-k curve
of a seed compare like with like. A class with fewer than k training examples contributes all of
them and is listed under ``short_classes``.

Regularisation: there is no validation set at 1-shot, so λ is fixed (``DEFAULT_FEWSHOT_L2``). A
small λ is used on purpose: the k-shot training set is linearly separable as soon as D ≥ n, and as
λ → 0 the direction of the regularised logistic-regression solution tends to the hard-margin SVM
(Rosset, Zhu & Hastie, 2004), the usual few-shot classifier, while λ > 0 keeps the problem strictly
convex, so L-BFGS reaches one well-defined minimiser.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dpcap.errors import ConfigError, DataError
from dpcap.eval.probe import accuracy, encode_labels, fit_logistic_regression

DEFAULT_SHOTS: tuple[int, ...] = (1, 2, 5, 10)
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2)
DEFAULT_FEWSHOT_L2 = 1e-3
"""λ on standardised features; see the module docstring for why it is small and fixed."""


def shot_indices(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Sorted int64 indices of k examples per class (all of a class with fewer than k).

    ``labels`` holds (N,) int class ids. One permutation from ``torch.Generator().manual_seed(seed)``
    gives a random order; a stable sort by class keeps that order inside each class, and the first k
    of each class are taken. Samples of one seed are nested across k.
    """
    _check_positive_int("shot count", k)
    y = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if y.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    if int(y.min()) < 0:
        raise ConfigError("class ids must be >= 0")
    perm = torch.randperm(y.numel(), generator=torch.Generator().manual_seed(int(seed)))
    order = perm[torch.sort(y[perm], stable=True).indices]
    sorted_y = y[order]
    counts = torch.bincount(sorted_y)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_class = torch.arange(y.numel()) - starts[sorted_y]
    return order[rank_in_class < k].sort().values


def few_shot(
    x_train: Any,
    y_train: Any,
    x_test: Any,
    y_test: Any,
    *,
    shots: Sequence[int] = DEFAULT_SHOTS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    l2: float = DEFAULT_FEWSHOT_L2,
    max_iter: int = 500,
) -> dict[str, Any]:
    """k-shot top-1 accuracy of a logistic-regression probe, for every k in ``shots`` and seed in ``seeds``.

    Labels may be strings or ints. The classes are those of the training set; a test sample of any
    other class counts as an error. Returns a JSON-serialisable dict::

        {"shots": {k: {"mean", "std", "per_seed": [top-1 per seed], "num_train": [n per seed]}},
         "num_classes", "classes", "seeds", "l2", "num_train_pool", "num_test", "num_test_unseen",
         "short_classes": {k: {class: available examples}}  # classes with fewer than k examples}

    Accuracies are fractions in [0, 1]; ``std`` is the sample standard deviation over seeds
    (ddof = 1; 0 for a single seed).
    """
    x_tr, x_te = _features(x_train, "x_train"), _features(x_test, "x_test")
    y_tr, y_te = _labels(y_train, x_tr.shape[0], "y_train"), _labels(y_test, x_te.shape[0], "y_test")
    if not y_tr:
        raise DataError("few_shot needs at least one training example")
    if x_tr.shape[1] != x_te.shape[1]:
        raise ConfigError(f"x_train has {x_tr.shape[1]} features but x_test has {x_te.shape[1]}")
    shots, seeds = _check_shots(shots), _check_seeds(seeds)
    if l2 <= 0:
        raise ConfigError(f"few-shot l2 must be > 0 (the k-shot set is separable), got {l2}")
    classes, (ids_tr, ids_te) = encode_labels(y_tr, y_te)
    counts = torch.bincount(ids_tr, minlength=len(classes))
    report_shots: dict[int, dict[str, Any]] = {}
    for k in shots:
        per_seed, sizes = [], []
        for seed in seeds:
            idx = shot_indices(ids_tr, k, seed)
            head = fit_logistic_regression(x_tr[idx], ids_tr[idx], l2=l2, num_classes=len(classes), max_iter=max_iter)
            per_seed.append(accuracy(head, x_te, ids_te))
            sizes.append(int(idx.numel()))
        report_shots[k] = _summary(per_seed) | {"num_train": sizes}
    return {
        "shots": report_shots,
        "num_classes": len(classes),
        "classes": classes,
        "seeds": list(seeds),
        "l2": float(l2),
        "num_train_pool": len(y_tr),
        "num_test": len(y_te),
        "num_test_unseen": int((ids_te < 0).sum()),
        "short_classes": {
            k: {classes[c]: int(counts[c]) for c in (counts < k).nonzero().flatten().tolist()} for k in shots
        },
    }


def _summary(values: list[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return {"mean": float(arr.mean()), "std": std, "per_seed": [float(v) for v in arr]}


def _features(x: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 2:
        raise ConfigError(f"{name} must be a 2-D (N, D) array, got shape {tuple(t.shape)}")
    return t


def _labels(y: Any, n: int, name: str) -> list[Any]:
    values = y.tolist() if isinstance(y, (torch.Tensor, np.ndarray)) else list(y)
    if len(values) != n:
        raise ConfigError(f"got {len(values)} {name} labels for {n} feature rows")
    return values


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _check_shots(shots: Sequence[int]) -> list[int]:
    if isinstance(shots, (int, np.integer)) or not shots:
        raise ConfigError(f"shots must be a non-empty list of positive integers, got {shots!r}")
    for k in shots:
        _check_positive_int("shot count", k)
    return sorted({int(k) for k in shots})


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    if isinstance(seeds, (int, np.integer)) or not seeds:
        raise ConfigError(f"seeds must be a non-empty list of integers, got {seeds!r}")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
            raise ConfigError(f"seeds must be integers, got {s!r}")
    return [int(s) for s in seeds]
