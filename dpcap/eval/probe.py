"""Linear probes on frozen features.

The standard way to judge a representation (DP-Cap, Sander et al. 2024, §4; CLIP, Radford et al.
2021, App. A.3): freeze the encoder, extract one feature vector per image, and fit a multinomial
logistic regression on top. Two fitters share one head type:

- `fit_logistic_regression`: full-batch L-BFGS (strong-Wolfe line search) on features
  standardised with the training mean and standard deviation. The objective is

      J(W, b) = (1/n) Σ_i CE(softmax(W x_i + b), y_i) + (λ/2)‖W‖²_F     (bias unregularised),

  which is exactly scikit-learn's ``LogisticRegression(C=1/(n·λ), solver="lbfgs")`` objective
  ``(1/2)‖W‖² + C Σ_i CE_i`` divided by ``n·C``; both are strictly convex for λ > 0 so the two
  solvers reach the same minimiser. The stopping rule is sklearn's too: max |∂J| ≤ tol (sklearn
  hands ``tol`` to scipy's L-BFGS-B as ``gtol`` on the same 1/n-scaled objective).

  Why it is faster than sklearn (``benchmarks/probe.py``): the loss and gradient are computed in
  closed form (two matmuls and one softmax per evaluation, no autograd graph), the matmuls run in
  float32 for most of the iterations, and a final float64 phase re-checks the stopping rule and
  finishes the solve if float32 stalled, so the returned head meets the tolerance in float64.
  Rows are processed in chunks, so memory beyond the features is O(chunk · max(D, K)).
- `sgd_probe`: minibatch AdamW over an iterable of (x, y) chunks, for feature sets that do not fit
  in memory (same objective, stochastic).

`linear_probe` selects λ on a validation split, refits on train + validation, and reports test
top-1 accuracy (the ``sweep`` protocol). `dpcap_probe` is DP-Cap's released recipe instead (the
``dpcap`` protocol, see its docstring): no sweep, no validation, λ = 0.0025/n, no intercept, on
row-centred, L2-normalised features. Everything is deterministic: zero initialisation, explicit
generators.
"""

from __future__ import annotations

import os
import tempfile
import textwrap
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dpcap.errors import ConfigError, DataError

DEFAULT_L2_GRID: tuple[float, ...] = tuple(float(10.0**k) for k in range(-6, 1))
"""λ candidates 1e-6 … 1 (one per decade); features are standardised, so the scale is comparable."""

_STD_FLOOR = 1e-8

DPCAP_LAMBDA = 0.0025
"""DP-Cap's linear-probe constant (``run_linear_prob.sh``: ``--lambd 0.0025``), divided by n in the fit."""

PROTOCOLS = ("sweep", "dpcap")
"""``sweep``: λ chosen on validation over a grid (`linear_probe`); ``dpcap``: DP-Cap's recipe (`dpcap_probe`)."""


@dataclass(frozen=True)
class LinearHead:
    """A linear classifier on standardised features: logits = ((x − mean) / std) Wᵀ + b.

    A head fitted without standardisation has mean 0 and std 1; one without intercept has b = 0.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) raw features → (N, K) logits, in the head's dtype and device."""
        x = _as_float(x, self.weight.dtype).to(self.weight.device)
        return ((x - self.mean) / self.std) @ self.weight.T + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) raw features → (N,) int64 class ids (argmax of the logits)."""
        return self.logits(x).argmax(dim=1)


def _as_float(x: Any, dtype: torch.dtype) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 2:
        raise ConfigError(f"features must be a 2-D (N, D) array, got shape {tuple(t.shape)}")
    return t.to(dtype)


def _as_labels(y: Any, n: int) -> torch.Tensor:
    t = torch.as_tensor(y, dtype=torch.int64).reshape(-1)
    if t.numel() != n:
        raise ConfigError(f"got {t.numel()} labels for {n} feature rows")
    return t


def standardisation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and (population) standard deviation; constant features get std 1."""
    mean = x.mean(dim=0)
    std = x.std(dim=0, correction=0)
    return mean, torch.where(std > _STD_FLOOR, std, torch.ones_like(std))


def logistic_objective(head: LinearHead, x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    """J(W, b) = mean_i CE(W z_i + b, y_i) + (λ/2)‖W‖²_F on standardised z (the fitted objective)."""
    return F.cross_entropy(head.logits(x), y.to(head.weight.device)) + 0.5 * l2 * head.weight.pow(2).sum()


_CHUNK_ELEMENTS = 1 << 22
"""Rows per chunk · max(D, K) stays under this (4M values: 16 MB of float32 logits per chunk)."""

_TOLERANCE_CHANGE = {torch.float32: 1e-12, torch.float64: 1e-15}
"""L-BFGS stops when the loss (always summed in float64) or the step changes by less than this; the
float64 value sits a few ulps above the loss's own rounding, so float64 can refine past float32."""


def fit_logistic_regression(
    x_train: torch.Tensor,
    y_train: Any,
    *,
    l2: float,
    num_classes: int | None = None,
    max_iter: int = 500,
    tolerance_grad: float = 1e-6,
    dtype: torch.dtype = torch.float64,
    mixed_precision: bool = True,
    init: LinearHead | None = None,
    standardize: bool = True,
    fit_intercept: bool = True,
) -> LinearHead:
    """Multinomial logistic regression by full-batch L-BFGS with a strong-Wolfe line search.

    Minimises (1/n) Σ_i CE(W z_i + b, y_i) + (λ/2)‖W‖²_F, z = standardised x (train mean/std stored
    in the head), from W = 0, b = 0, until max |∂J| ≤ ``tolerance_grad`` (sklearn's ``tol``), the
    loss stops changing at the precision of the arithmetic, or ``max_iter`` L-BFGS iterations (both
    phases together; the float64 phase always gets at least ``max_iter // 10``).
    ``y_train`` holds int class ids in [0, num_classes). The head is returned in ``dtype`` (float32
    or float64) on the device of ``x_train``; with ``mixed_precision`` and float64, the iterations
    run in float32 first and float64 only verifies (and, where float32 stalled short of the
    tolerance, completes) the solve. ``init`` warm-starts from another head
    fitted on the same features (e.g. the neighbouring λ of a regularisation path); the problem is
    strictly convex for λ > 0, so the start changes the cost, not the minimiser.

    ``standardize=False`` fits on x as given (z = x; the head stores mean 0, std 1) and
    ``fit_intercept=False`` fixes b = 0 (it is neither optimised nor part of the stopping rule):
    together, sklearn's ``LogisticRegression(fit_intercept=False, C=1/(n·λ))`` on x itself.
    """
    if l2 < 0:
        raise ConfigError(f"l2 must be >= 0, got {l2}")
    if dtype not in _TOLERANCE_CHANGE:
        raise ConfigError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    x = torch.as_tensor(x_train)
    if x.ndim != 2:
        raise ConfigError(f"features must be a 2-D (N, D) array, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.to(dtype)
    y = _as_labels(y_train, x.shape[0]).to(x.device)
    if x.shape[0] == 0:
        raise DataError("cannot fit a linear probe on an empty training set")
    k = int(num_classes if num_classes is not None else int(y.max()) + 1)
    if int(y.min()) < 0 or int(y.max()) >= k:
        raise ConfigError(f"labels must lie in [0, {k}), got range [{int(y.min())}, {int(y.max())}]")
    with _cpu_threads_for(x, k):
        if standardize:
            mean, std = standardisation(x.to(torch.float64))
        else:
            mean = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            std = torch.ones_like(mean)
        objective = _SoftmaxObjective(
            x, y, mean, std, l2=l2, num_classes=k, standardize=standardize, fit_intercept=fit_intercept
        )
        weight, bias = _initial_parameters(init, k, x.shape[1], dtype, x.device)
        if not fit_intercept:
            bias = torch.zeros_like(bias)
        budget = max_iter
        if mixed_precision and dtype == torch.float64:
            weight, bias, used = _run_lbfgs(
                objective, weight.float(), bias.float(), max_iter=max_iter, tolerance_grad=tolerance_grad
            )
            weight, bias = weight.to(dtype), bias.to(dtype)
            # One budget for both phases, so mixed precision never costs more iterations than float64
            # alone; the float64 phase always gets a tenth of it to verify and polish.
            budget = max(max_iter - used, max(1, max_iter // 10))
        weight, bias, _ = _run_lbfgs(objective, weight, bias, max_iter=budget, tolerance_grad=tolerance_grad)
    return LinearHead(weight, bias, mean.to(dtype), std.to(dtype))


SINGLE_THREAD_WORK = 1 << 27
"""Problems with N·D·K below this (134M multiply-adds per matmul) are fitted on one CPU thread."""

_FIT_THREADS: ContextVar[int | None] = ContextVar("dpcap_probe_fit_threads", default=None)
"""Set by `torch_threads`: the thread count every fit inside uses (overriding the small-problem rule)."""


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` for the block, restored afterwards (``None``: no change).

    Fits inside the block use exactly ``threads`` too, instead of `_cpu_threads_for`'s one thread
    for small problems: an explicit choice (``dpcap probe --threads N``) wins over the heuristic.
    """
    if threads is None:
        yield
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    previous = torch.get_num_threads()
    token = _FIT_THREADS.set(threads)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        _FIT_THREADS.reset(token)
        torch.set_num_threads(previous)


@contextmanager
def _cpu_threads_for(x: torch.Tensor, num_classes: int) -> Iterator[None]:
    """One intra-op thread for a small CPU fit, restored afterwards.

    Each L-BFGS evaluation of a small problem is a few millisecond-sized matmuls; torch's OpenMP
    threads then spend their time waiting on each other, and on a busy machine they wait on other
    processes too: the demo's probe (2,535 × 128 features, 99 classes, on 2 cores shared with
    another job) took 162 s per fit with 2 threads and 1.5 s with one. Large fits keep every thread.
    Inside `torch_threads(n)` every fit uses n threads instead.
    """
    previous = torch.get_num_threads()
    forced = _FIT_THREADS.get()
    if forced is not None:
        target = forced
    else:
        small = x.device.type == "cpu" and x.shape[0] * x.shape[1] * num_classes < SINGLE_THREAD_WORK
        target = 1 if small and previous > 1 else previous
    if target != previous:
        torch.set_num_threads(target)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def _initial_parameters(
    init: LinearHead | None, k: int, d: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    if init is None:
        return torch.zeros(k, d, dtype=dtype, device=device), torch.zeros(k, dtype=dtype, device=device)
    if tuple(init.weight.shape) != (k, d):
        raise ConfigError(f"init head has shape {tuple(init.weight.shape)}, expected {(k, d)}")
    return init.weight.to(device, dtype).clone(), init.bias.to(device, dtype).clone()


class _SoftmaxObjective:
    """J(W, b) and its gradient in closed form, over row chunks, in the parameters' dtype.

    With P = softmax(Z Wᵀ + b) and Y one-hot: ∂J/∂W = (P − Y)ᵀ Z / n + λW, ∂J/∂b = Σ_i (P − Y)_i / n.
    Features are standardised chunk by chunk, so no standardised copy of the whole set is kept
    (``standardize=False``: Z = X). With ``fit_intercept=False`` b stays 0 and ∂J/∂b is reported as 0.
    The loss is summed in float64 whatever the dtype: the line search compares loss values.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        *,
        l2: float,
        num_classes: int,
        standardize: bool = True,
        fit_intercept: bool = True,
    ):
        self.x, self.y, self.mean, self.std, self.l2 = x, y, mean, std, l2
        self.standardize, self.fit_intercept = standardize, fit_intercept
        self.rows = max(1, _CHUNK_ELEMENTS // max(x.shape[1], num_classes))

    def __call__(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.x.shape[0]
        mean, std = self.mean.to(weight.dtype), self.std.to(weight.dtype)
        loss = torch.zeros((), dtype=torch.float64, device=weight.device)
        grad_w, grad_b = torch.zeros_like(weight), torch.zeros_like(bias)
        for start in range(0, n, self.rows):
            z = self.x[start : start + self.rows].to(weight.dtype)
            if self.standardize:
                z = (z - mean) / std
            y = self.y[start : start + self.rows]
            logits = torch.addmm(bias, z, weight.T)
            lse = torch.logsumexp(logits, dim=1)
            loss += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum(dtype=torch.float64)
            residual = logits.sub_(lse[:, None]).exp_()  # P, in place of the logits
            residual[torch.arange(y.numel(), device=y.device), y] -= 1.0  # P − Y
            grad_w.addmm_(residual.T, z)
            if self.fit_intercept:
                grad_b += residual.sum(dim=0)
        loss = loss / n + 0.5 * self.l2 * weight.to(torch.float64).pow(2).sum()
        return loss, grad_w.div_(n).add_(weight, alpha=self.l2), grad_b.div_(n)


def _run_lbfgs(
    objective: _SoftmaxObjective,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    max_iter: int,
    tolerance_grad: float,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """L-BFGS from (weight, bias); returns the result and the number of iterations it took.

    Without an intercept (``objective.fit_intercept`` False) only the weight is optimised: the bias
    is returned as given (zero) and takes no part in the stopping rule.
    """
    fit_intercept = getattr(objective, "fit_intercept", True)
    weight = weight.clone().requires_grad_(True)
    bias = bias.clone().requires_grad_(True) if fit_intercept else bias.clone()
    optimizer = torch.optim.LBFGS(
        [weight, bias] if fit_intercept else [weight],
        lr=1.0,
        max_iter=max_iter,
        max_eval=2 * max_iter,
        history_size=20,
        tolerance_grad=tolerance_grad,
        tolerance_change=_TOLERANCE_CHANGE[weight.dtype],
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:  # gradients in closed form: no autograd graph is built
        loss, weight.grad, grad_b = objective(weight.detach(), bias.detach())
        if fit_intercept:
            bias.grad = grad_b
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach(), int(optimizer.state[weight].get("n_iter", 0))


def accuracy(head: LinearHead, x: torch.Tensor, y: Any) -> float:
    """Top-1 accuracy in [0, 1]; labels outside [0, K) (classes unseen in training) count as errors."""
    y = _as_labels(y, torch.as_tensor(x).shape[0])
    if y.numel() == 0:
        return float("nan")
    return float((head.predict(x).cpu() == y).double().mean())


def encode_labels(*label_lists: Sequence[Any]) -> tuple[list[Any], list[torch.Tensor]]:
    """Map labels (str or int) to contiguous ids over the sorted classes of the FIRST list.

    Returns (classes, [ids per list]); a label absent from the first list gets id −1, so it can never
    be predicted and always counts as an error.
    """
    classes = sorted({_label_key(v) for v in label_lists[0]}, key=lambda v: (type(v).__name__, v))
    lookup = {c: i for i, c in enumerate(classes)}
    ids = [torch.tensor([lookup.get(_label_key(v), -1) for v in lst], dtype=torch.int64) for lst in label_lists]
    return classes, ids


def _label_key(v: Any) -> Any:
    if isinstance(v, (np.generic, torch.Tensor)):
        return v.item()
    return v


def _to_list(y: Any) -> list[Any]:
    if isinstance(y, (torch.Tensor, np.ndarray)):
        return y.tolist()
    return list(y)


def holdout_split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (train_idx, val_idx) split of range(n) from ``torch.Generator().manual_seed(seed)``."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if n < 2:
        raise DataError(f"need at least 2 training samples to hold out a validation split, got {n}")
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def linear_probe(
    x_train: Any,
    y_train: Any,
    x_test: Any,
    y_test: Any,
    *,
    x_val: Any = None,
    y_val: Any = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    max_iter: int = 500,
    return_predictions: bool = False,
    on_fit: Callable[[float, float | None], None] | None = None,
) -> dict[str, Any]:
    """Select λ on validation accuracy, refit on train + validation, report test top-1.

    If ``x_val`` is None, ``val_fraction`` of the training set is held out with an explicit
    generator seeded by ``seed``. Ties in validation accuracy go to the larger λ (the simpler model).
    Labels may be strings or ints; classes are those of the training (+ validation) set, and test
    samples of other classes count as errors. Returns a JSON-serialisable dict: top1, l2, val_top1,
    num_train, num_test, num_classes, num_test_unseen, per_l2 {λ: val acc}, classes (and
    ``predictions``, the predicted original labels, when ``return_predictions``). ``on_fit(λ, val_top1)``,
    if given, is called after each λ of the grid, then ``on_fit(best λ, None)`` after the final refit
    (a progress hook: a fit on ~100 classes takes seconds).
    """
    x_tr, y_tr, x_va, y_va = _train_val(x_train, y_train, x_val, y_val, val_fraction, seed)
    if not l2_grid:
        raise ConfigError("l2_grid must hold at least one value")
    classes, (ids_tr, ids_va) = encode_labels(y_tr, y_va)
    per_l2, head = {}, None
    for l2 in sorted((float(v) for v in l2_grid), reverse=True):  # strong → weak, each warm-starting the next
        head = fit_logistic_regression(x_tr, ids_tr, l2=l2, num_classes=len(classes), max_iter=max_iter, init=head)
        per_l2[l2] = accuracy(head, x_va, ids_va)
        if on_fit is not None:
            on_fit(l2, per_l2[l2])
    per_l2 = dict(sorted(per_l2.items()))
    best_l2 = max(per_l2, key=lambda v: (per_l2[v], v))
    x_all = torch.cat([torch.as_tensor(x_tr), torch.as_tensor(x_va)])
    classes, (ids_all, ids_te) = encode_labels(y_tr + y_va, _to_list(y_test))
    head = fit_logistic_regression(x_all, ids_all, l2=best_l2, num_classes=len(classes), max_iter=max_iter)
    if on_fit is not None:
        on_fit(best_l2, None)
    report = {
        "top1": accuracy(head, x_test, ids_te),
        "l2": best_l2,
        "val_top1": per_l2[best_l2],
        "num_train": int(ids_all.numel()),
        "num_test": int(ids_te.numel()),
        "num_classes": len(classes),
        "num_test_unseen": int((ids_te < 0).sum()),
        "per_l2": per_l2,
        "classes": classes,
    }
    if return_predictions:
        report["predictions"] = [classes[i] for i in head.predict(x_test).tolist()]
    return report


def center_and_normalize_rows(x: Any, mean: torch.Tensor | None = None) -> torch.Tensor:
    """DP-Cap's feature preprocessing: centre, then divide each row by its L2 norm (float64).

    ``mean=None`` centres each row by its own mean over the features: what DP-Cap's released probe
    runs, cyanure's ``preprocess(X, centering=True, normalize=True, columns=False)`` (columns=False:
    the operations act on rows, i.e. on samples), applied to train and test separately. A ``mean``
    vector (D,) is subtracted from every row instead (e.g. the training features' mean, reused for
    test). A row that is zero after centring stays zero.
    """
    x = _as_float(x, torch.float64)
    x = x - (x.mean(dim=1, keepdim=True) if mean is None else torch.as_tensor(mean, dtype=torch.float64))
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


DPCAP_CENTERINGS = ("sample", "train")
"""`dpcap_probe`'s centring: each sample by its own feature mean (released code), or by the train mean."""


def dpcap_probe(
    x_train: Any,
    y_train: Any,
    x_test: Any,
    y_test: Any,
    *,
    lambd: float = DPCAP_LAMBDA,
    centering: str = "sample",
    max_iter: int = 1000,
    tolerance_grad: float = 1e-6,
    return_predictions: bool = False,
    on_fit: Callable[[float, float | None], None] | None = None,
) -> dict[str, Any]:
    """DP-Cap's linear probe (Sander et al. 2024; the MSN ``logistic_eval.py`` patched by
    facebookresearch/dpcap): one fit on train, top-1 on test. No λ sweep, no validation split.

    Features go through `center_and_normalize_rows` (``centering="sample"``: each row by its own mean,
    as the released code; ``"train"``: every split by the training mean), then the fitter minimises,
    with no intercept (b ≡ 0) and no standardisation,

        J(W) = (1/n) Σ_i CE(softmax(W x̃_i), y_i) + (λ/2)‖W‖²_F,   λ = lambd / n  (0.0025 / n),

    which is cyanure's ``Classifier(loss="multiclass-logistic", penalty="l2", lambda_1=λ,
    fit_intercept=False)`` objective (mean loss + (λ/2)‖W‖²), the same form as `fit_logistic_regression`,
    and scikit-learn's ``LogisticRegression(fit_intercept=False, C=1/(n·λ) = 1/lambd = 400)``.
    Returns the `linear_probe` keys (``val_top1`` None, ``per_l2`` {λ: None}) plus ``lambd``,
    ``train_top1`` and ``centering``; ``on_fit(λ, None)`` is called once, after the fit.
    """
    if centering not in DPCAP_CENTERINGS:
        raise ConfigError(f"unknown centering {centering!r}; valid: {', '.join(DPCAP_CENTERINGS)}")
    if not lambd > 0:
        raise ConfigError(f"lambd must be > 0, got {lambd}")
    x_tr, y_tr = torch.as_tensor(x_train), _to_list(y_train)
    if len(y_tr) != x_tr.shape[0]:
        raise ConfigError(f"got {len(y_tr)} training labels for {x_tr.shape[0]} feature rows")
    if not y_tr:
        raise DataError("cannot fit a linear probe on an empty training set")
    mean = _as_float(x_tr, torch.float64).mean(dim=0) if centering == "train" else None
    z_tr = center_and_normalize_rows(x_tr, mean)
    z_te = center_and_normalize_rows(x_test, mean)
    classes, (ids_tr, ids_te) = encode_labels(y_tr, _to_list(y_test))
    l2 = float(lambd) / len(y_tr)
    head = fit_logistic_regression(
        z_tr,
        ids_tr,
        l2=l2,
        num_classes=len(classes),
        max_iter=max_iter,
        tolerance_grad=tolerance_grad,
        standardize=False,
        fit_intercept=False,
    )
    if on_fit is not None:
        on_fit(l2, None)
    report = {
        "top1": accuracy(head, z_te, ids_te),
        "l2": l2,
        "val_top1": None,
        "train_top1": accuracy(head, z_tr, ids_tr),
        "lambd": float(lambd),
        "centering": centering,
        "num_train": int(ids_tr.numel()),
        "num_test": int(ids_te.numel()),
        "num_classes": len(classes),
        "num_test_unseen": int((ids_te < 0).sum()),
        "per_l2": {l2: None},
        "classes": classes,
    }
    if return_predictions:
        report["predictions"] = [classes[i] for i in head.predict(z_te).tolist()]
    return report


def l2_edge_warning(l2: float, grid: Sequence[float]) -> str | None:
    """A warning when the chosen λ is the smallest or largest of a grid of ≥ 2 values, else None."""
    values = sorted(float(v) for v in grid)
    if len(values) < 2 or values[0] < l2 < values[-1]:
        return None
    side, hint = ("largest", "more") if l2 >= values[-1] else ("smallest", "less")
    return (
        f"the chosen λ = {l2:.0e} is the {side} value of the grid ({values[0]:.0e} … {values[-1]:.0e}): "
        f"the best λ may lie beyond it ({hint} regularisation); the probe may be under-tuned"
    )


def _train_val(
    x_train: Any, y_train: Any, x_val: Any, y_val: Any, val_fraction: float, seed: int
) -> tuple[torch.Tensor, list[Any], torch.Tensor, list[Any]]:
    x_tr, y_tr = torch.as_tensor(x_train), _to_list(y_train)
    if len(y_tr) != x_tr.shape[0]:
        raise ConfigError(f"got {len(y_tr)} training labels for {x_tr.shape[0]} feature rows")
    if (x_val is None) != (y_val is None):
        raise ConfigError("give both x_val and y_val, or neither")
    if x_val is not None:
        return x_tr, y_tr, torch.as_tensor(x_val), _to_list(y_val)
    tr_idx, va_idx = holdout_split(len(y_tr), val_fraction, seed)
    return x_tr[tr_idx], [y_tr[i] for i in tr_idx], x_tr[va_idx], [y_tr[i] for i in va_idx]


ChunkSource = Iterable[tuple[torch.Tensor, torch.Tensor]] | Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


def _chunks(source: ChunkSource) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    return source() if callable(source) else source


def streaming_standardisation(source: ChunkSource) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One pass of float64 sums: mean = Σx/n, std = sqrt(Σx²/n − mean²) (constant features → 1)."""
    total, total_sq, n = None, None, 0
    for x, _ in _chunks(source):
        x = _as_float(x, torch.float64)
        total = x.sum(0) if total is None else total + x.sum(0)
        total_sq = x.pow(2).sum(0) if total_sq is None else total_sq + x.pow(2).sum(0)
        n += x.shape[0]
    if n == 0:
        raise DataError("the feature chunks are empty")
    mean = total / n
    std = (total_sq / n - mean.pow(2)).clamp_min(0).sqrt()
    return mean, torch.where(std > _STD_FLOOR, std, torch.ones_like(std)), n


def sgd_probe(
    chunks: ChunkSource,
    *,
    num_classes: int,
    l2: float = 1e-4,
    epochs: int = 5,
    batch_size: int = 1024,
    lr: float = 1e-2,
    seed: int = 0,
) -> LinearHead:
    """Minibatch AdamW on (1/n) Σ CE + (λ/2)‖W‖² for features that do not fit in memory.

    ``chunks`` is a re-iterable of (x (n, D), y (n,) int ids) pairs — a list, an object whose
    ``__iter__`` restarts, or a zero-argument callable returning a fresh iterable (e.g. one reading
    feature shards from disk). One pass computes the standardisation, then ``epochs`` passes update
    the head; within a chunk the rows are shuffled with ``torch.Generator().manual_seed(seed)``.
    The L2 term is added to the loss (coupled), so it is the same objective as the L-BFGS fitter.
    """
    mean, std, _ = streaming_standardisation(chunks)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.zeros(num_classes, mean.numel(), dtype=torch.float32, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=0.0)
    for _ in range(epochs):
        seen = _sgd_epoch(chunks, weight, bias, optimizer, mean.float(), std.float(), l2, batch_size, gen)
        if seen == 0:
            raise DataError("the feature chunks yielded nothing on a later epoch: pass a re-iterable or a callable")
    return LinearHead(weight.detach(), bias.detach(), mean.float(), std.float())


def _sgd_epoch(
    chunks: ChunkSource,
    weight: torch.Tensor,
    bias: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    mean: torch.Tensor,
    std: torch.Tensor,
    l2: float,
    batch_size: int,
    gen: torch.Generator,
) -> int:
    seen = 0
    for x, y in _chunks(chunks):
        z = (_as_float(x, torch.float32) - mean) / std
        y = _as_labels(y, z.shape[0])
        perm = torch.randperm(z.shape[0], generator=gen)
        for start in range(0, z.shape[0], batch_size):
            idx = perm[start : start + batch_size]
            optimizer.zero_grad()
            loss = F.cross_entropy(z[idx] @ weight.T + bias, y[idx]) + 0.5 * l2 * weight.pow(2).sum()
            loss.backward()
            optimizer.step()
        seen += z.shape[0]
    return seen


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int) -> torch.Tensor:
    """(K, K) int64 counts, rows = true class, columns = predicted class (ids in [0, K))."""
    t = torch.as_tensor(y_true, dtype=torch.int64).reshape(-1)
    p = torch.as_tensor(y_pred, dtype=torch.int64).reshape(-1)
    if t.numel() != p.numel():
        raise ConfigError(f"y_true has {t.numel()} entries but y_pred has {p.numel()}")
    for name, v in (("y_true", t), ("y_pred", p)):
        if v.numel() and (int(v.min()) < 0 or int(v.max()) >= num_classes):
            raise ConfigError(f"{name} holds ids outside [0, {num_classes})")
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, -1)


CONFUSION_FULL_CLASSES = 30
"""Up to this many classes `save_confusion_png` always draws the whole matrix."""

_LABEL_CHARS = 28
"""Tick labels longer than this are cut (with "…") so that the matrix keeps its room."""


def most_confused_classes(cm: Any, count: int) -> list[int]:
    """Ids of the ``count`` classes with the most errors (misclassified samples of the true class, row
    off-diagonal sum), ties to the smaller id, in ascending id order."""
    counts = torch.as_tensor(cm).long()
    errors = counts.sum(dim=1) - counts.diagonal()
    order = sorted(range(counts.shape[0]), key=lambda i: (-int(errors[i]), i))
    return sorted(order[:count])


def save_confusion_png(
    cm: Any,
    path: str | os.PathLike,
    labels: Sequence[str] | None = None,
    *,
    title: str | None = None,
    top_classes: int | None = None,
) -> Path:
    """Plot a row-normalised confusion matrix to a PNG (matplotlib Agg canvas, no pyplot, atomic).

    The figure grows with the class count (about 0.2 inch per class, capped at 40 inches) so that
    every class keeps a tick at 6-9 pt; beyond ~180 classes only every n-th class is labelled.
    ``title`` (e.g. the encoder and its top-1) goes above the matrix. With ``top_classes`` and more
    than `CONFUSION_FULL_CLASSES` classes, only the ``top_classes`` classes with the most errors are
    drawn (rows and columns; each cell still the fraction of its whole true class), and the title
    says so. Labels longer than 28 characters are shortened.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = torch.as_tensor(cm).double()
    rates = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    total = counts.shape[0]
    if top_classes is not None and total > CONFUSION_FULL_CLASSES and top_classes < total:
        keep = most_confused_classes(counts, top_classes)
        rates = rates[keep][:, keep]
        labels = [labels[i] for i in keep] if labels is not None else [str(i) for i in keep]
        note = f"the {len(keep)} of {total} classes with the most errors"
        title = f"{title}\n({note})" if title else note
    k = rates.shape[0]
    names_all = [_short_label(v) for v in labels] if labels is not None else None
    longest = max((len(v) for v in names_all), default=0) if names_all is not None else 0
    # Room for the rotated x labels and the y labels: ~0.07 inch per character at 7 pt.
    margin = 1.5 + 0.07 * longest
    size = min(4 + 0.2 * k, 40)
    fig = Figure(figsize=(size + margin, size + margin))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(rates.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label="fraction of the true class")
    if names_all is not None:
        every = max(1, -(-k // 180))  # 40 inches hold ~180 ticks of 7 pt text
        ticks = list(range(0, k, every))
        names = [names_all[i] for i in ticks]
        fontsize = 9 if k <= 30 else 7 if k <= 120 else 6
        ax.set_xticks(ticks, names, rotation=90, fontsize=fontsize)
        ax.set_yticks(ticks, names, fontsize=fontsize)
    ax.set_xlabel("predicted", fontsize=10 if k <= 30 else 14)
    ax.set_ylabel("true", fontsize=10 if k <= 30 else 14)
    if title:
        fontsize = 11 if k <= 30 else 20
        width = max(20, int((size + margin) * 130 / fontsize))  # ~characters per line at that size
        ax.set_title("\n".join(textwrap.fill(line, width) for line in title.split("\n")), fontsize=fontsize)
    fig.tight_layout()
    return save_figure_atomically(fig, Path(path))


def _short_label(value: Any) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= _LABEL_CHARS else text[: _LABEL_CHARS - 1] + "…"


def save_accuracy_bars_png(
    values: Mapping[str, float], path: str | os.PathLike, *, title: str | None = None, ylabel: str = "top-1"
) -> Path:
    """Bar chart of accuracies in [0, 1] (one bar per name, in order), each value printed on its bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not values:
        raise ConfigError("save_accuracy_bars_png needs at least one value")
    names = list(values)
    heights = [100 * float(values[n]) for n in names]
    fig = Figure(figsize=(max(4.0, 1.4 * len(names) + 1.5), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = ["tab:blue", "tab:orange", "tab:gray", "tab:green", "tab:red", "tab:purple"]
    bars = ax.bar(names, heights, color=[colours[i % len(colours)] for i in range(len(names))])
    ax.bar_label(bars, labels=[f"{h:.1f}%" for h in heights], padding=2, fontsize=10)
    top = max([h for h in heights if np.isfinite(h)], default=100.0)
    ax.set_ylim(0, min(100.0, top * 1.15 + 2) if top > 0 else 1)
    ax.set_ylabel(f"{ylabel} (%)")
    if title:
        ax.set_title(title, fontsize=11)
    fig.tight_layout()
    return save_figure_atomically(fig, Path(path))


def save_figure_atomically(fig: Any, path: Path) -> Path:
    """Write a matplotlib figure as PNG under a temporary name, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; a figure gets the usual file mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    """The process umask (read by setting it, then restoring it: there is no getter)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
