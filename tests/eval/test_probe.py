"""Linear probe: oracle is scikit-learn's LogisticRegression (lbfgs, multinomial) on the same features."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from dpcap.errors import ConfigError
from dpcap.eval.probe import (
    confusion_matrix,
    fit_logistic_regression,
    linear_probe,
    logistic_objective,
    save_accuracy_bars_png,
    save_confusion_png,
    sgd_probe,
    standardisation,
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Small problems run ~10x faster single-threaded on a shared 2-core machine (restored after)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(previous)


def blobs(n: int, dim: int, k: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs: class centres N(0, I), samples centre + spread · N(0, I), then an affine map."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim))
    y = rng.integers(0, k, size=n)
    x = centres[y] + spread * rng.normal(size=(n, dim))
    scale = rng.uniform(0.1, 10.0, size=dim)
    return x * scale + rng.normal(size=dim) * 5, y


def sklearn_fit(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[LogisticRegression, np.ndarray, np.ndarray]:
    mean, std = (t.numpy() for t in standardisation(torch.as_tensor(x)))
    clf = LogisticRegression(C=1.0 / (len(y) * l2), solver="lbfgs", max_iter=5000, tol=1e-10)
    return clf.fit((x - mean) / std, y), mean, std


@pytest.mark.parametrize("spread", [0.8, 2.5], ids=["separated", "overlapping"])
def test_matches_sklearn(spread: float) -> None:
    x, y = blobs(2500, 64, 10, spread, seed=1)
    xtr, ytr, xte, yte = x[:2000], y[:2000], x[2000:], y[2000:]
    l2 = 1e-3
    head = fit_logistic_regression(torch.as_tensor(xtr), ytr, l2=l2, num_classes=10, tolerance_grad=1e-9)
    clf, mean, std = sklearn_fit(xtr, ytr, l2)
    ours = (head.predict(torch.as_tensor(xte)).numpy() == yte).mean()
    ref = clf.score((xte - mean) / std, yte)
    assert abs(ours - ref) <= 0.005
    # Same strictly convex objective ⇒ same minimiser (sklearn's W is in the same standardised space).
    assert np.allclose(head.bias.numpy() - head.bias.numpy().mean(), clf.intercept_ - clf.intercept_.mean(), atol=2e-3)
    assert np.allclose(head.weight.numpy(), clf.coef_, atol=2e-3)
    if spread > 1:
        assert 0.2 < ours < 0.95  # genuinely overlapping: not a trivial set


def test_objective_not_worse_than_sklearn() -> None:
    x, y = blobs(600, 16, 4, 2.0, seed=3)
    l2 = 1e-2
    head = fit_logistic_regression(torch.as_tensor(x), y, l2=l2)
    clf, _, _ = sklearn_fit(x, y, l2)
    ref_head = type(head)(torch.as_tensor(clf.coef_), torch.as_tensor(clf.intercept_), head.mean, head.std)
    ours = logistic_objective(head, torch.as_tensor(x), torch.as_tensor(y), l2)
    ref = logistic_objective(ref_head, torch.as_tensor(x), torch.as_tensor(y), l2)
    assert float(ours) <= float(ref) + 1e-9


def test_deterministic() -> None:
    x, y = blobs(300, 8, 3, 1.5, seed=4)
    a = fit_logistic_regression(torch.as_tensor(x), y, l2=1e-3, tolerance_grad=1e-9)
    b = fit_logistic_regression(torch.as_tensor(x), y, l2=1e-3, tolerance_grad=1e-9)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    start = fit_logistic_regression(x, y, l2=1.0)
    warm = fit_logistic_regression(torch.as_tensor(x), y, l2=1e-3, init=start, tolerance_grad=1e-9)
    torch.testing.assert_close(warm.weight, a.weight, atol=1e-5, rtol=0)  # same convex minimiser
    single = fit_logistic_regression(torch.as_tensor(x), y, l2=1e-3, tolerance_grad=1e-9, mixed_precision=False)
    torch.testing.assert_close(single.weight, a.weight, atol=1e-5, rtol=0)


def autograd_gradient_max(head, x: np.ndarray, y: np.ndarray, l2: float) -> float:
    """max |∂J| by autograd through `logistic_objective`: independent of the fitter's closed form."""
    weight = head.weight.double().clone().requires_grad_(True)
    bias = head.bias.double().clone().requires_grad_(True)
    trial = type(head)(weight, bias, head.mean.double(), head.std.double())
    logistic_objective(trial, torch.as_tensor(x), torch.as_tensor(y), l2).backward()
    return float(torch.cat([weight.grad.flatten(), bias.grad]).abs().max())


@pytest.mark.parametrize("tolerance", [1e-6, 1e-8], ids=["default", "beyond-float32"])
def test_stopping_rule_holds_in_float64(tolerance: float) -> None:
    x, y = blobs(1500, 32, 12, 2.0, seed=9)
    float32_only = fit_logistic_regression(
        torch.as_tensor(x), y, l2=1e-3, tolerance_grad=tolerance, dtype=torch.float32
    )
    assert autograd_gradient_max(float32_only, x, y, 1e-3) > 1e-8  # float32 alone stalls short of 1e-8...
    head = fit_logistic_regression(torch.as_tensor(x), y, l2=1e-3, tolerance_grad=tolerance)
    assert head.weight.dtype == torch.float64
    assert autograd_gradient_max(head, x, y, 1e-3) <= tolerance  # ...so the float64 phase must finish the solve


def test_default_tolerance_matches_sklearn_accuracy_and_objective() -> None:
    x, y = blobs(3000, 48, 20, 2.5, seed=10)
    xtr, ytr, xte, yte = x[:2400], y[:2400], x[2400:], y[2400:]
    l2 = 1e-3
    head = fit_logistic_regression(torch.as_tensor(xtr), ytr, l2=l2)  # defaults: tol 1e-6, mixed precision
    clf, mean, std = sklearn_fit(xtr, ytr, l2)  # sklearn at tol 1e-10: the reference optimum
    ref_head = type(head)(torch.as_tensor(clf.coef_), torch.as_tensor(clf.intercept_), head.mean, head.std)
    ours = float(logistic_objective(head, torch.as_tensor(xtr), torch.as_tensor(ytr), l2))
    best = float(logistic_objective(ref_head, torch.as_tensor(xtr), torch.as_tensor(ytr), l2))
    # Strong convexity (modulus λ): J − J* ≤ ‖∇J‖² / (2λ) ≤ (#params · tol²) / (2λ).
    assert best - 1e-12 <= ours <= best + (head.weight.numel() + head.bias.numel()) * 1e-12 / (2 * l2)
    acc = (head.predict(torch.as_tensor(xte)).numpy() == yte).mean()
    assert abs(acc - clf.score((xte - mean) / std, yte)) <= 0.005
    assert 0.2 < acc < 0.95


def test_closed_form_gradient_over_row_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    import dpcap.eval.probe as probe

    x, y = blobs(257, 6, 5, 1.0, seed=11)
    mean, std = standardisation(torch.as_tensor(x))
    monkeypatch.setattr(probe, "_CHUNK_ELEMENTS", 40)  # 40 // max(6, 5) = 6 rows: 43 chunks, last one short
    objective = probe._SoftmaxObjective(torch.as_tensor(x), torch.as_tensor(y), mean, std, l2=0.1, num_classes=5)
    assert objective.rows == 6
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    bias = torch.randn(5, generator=gen, dtype=torch.float64)
    loss, grad_w, grad_b = objective(weight, bias)
    w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    ref = logistic_objective(probe.LinearHead(w, b, mean, std), torch.as_tensor(x), torch.as_tensor(y), 0.1)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_w, w.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_b, b.grad, rtol=1e-10, atol=1e-12)


def test_l2_selection_prefers_more_regularisation_on_tiny_noisy_data() -> None:
    # Two isotropic Gaussian classes ±mu (the Bayes direction is mu, which a strongly regularised fit
    # approaches), n = 2d noisy training points: a weakly regularised fit chases the noise.
    rng = np.random.default_rng(1)
    mu = 0.25 * rng.normal(size=50)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 2, size=n)
        return rng.normal(size=(n, 50)) + np.outer(2 * y - 1, mu), y

    (xtr, ytr), (xva, yva), (xte, yte) = make(100), make(2000), make(200)
    grid = (1e-6, 1e-3, 1e-1, 1.0)
    report = linear_probe(xtr, ytr, xte, yte, x_val=xva, y_val=yva, l2_grid=grid)
    assert report["l2"] >= 0.1
    assert report["val_top1"] >= report["per_l2"][1e-6] + 0.02
    # Independent check of the ordering with sklearn on the same split.
    mean, std = (t.numpy() for t in standardisation(torch.as_tensor(xtr)))
    sk = {l2: sklearn_fit(xtr, ytr, l2)[0].score((xva - mean) / std, yva) for l2 in grid}
    assert sk[report["l2"]] >= sk[1e-6] + 0.02
    assert all(abs(sk[l2] - report["per_l2"][l2]) <= 0.005 for l2 in grid)


def test_string_labels_and_unseen_test_class() -> None:
    x, y = blobs(700, 12, 3, 0.5, seed=5)
    names = np.array(["cat", "dog", "emu"])
    ytr = [str(v) for v in names[y[:600]]]
    yte = [str(v) for v in names[y[600:]]]
    yte[:10] = ["yak"] * 10  # a class absent from training: always an error
    report = linear_probe(x[:600], ytr, x[600:], yte, seed=3, l2_grid=(1e-4, 1e-2))
    assert report["classes"] == ["cat", "dog", "emu"]
    assert report["num_classes"] == 3 and report["num_test_unseen"] == 10
    assert report["num_train"] == 600 and report["num_test"] == 100
    assert report["top1"] <= 0.9 + 1e-12  # the 10 unseen ones cannot be right
    assert report["top1"] >= 0.85
    assert set(report["per_l2"]) == {1e-4, 1e-2}
    int_report = linear_probe(x[:600], y[:600], x[600:], y[600:], seed=3, l2_grid=(1e-4, 1e-2))
    assert int_report["top1"] >= report["top1"]
    assert int_report["classes"] == [0, 1, 2]


def test_holdout_split_depends_on_seed_only() -> None:
    x, y = blobs(300, 8, 3, 2.0, seed=6)
    a = linear_probe(x[:200], y[:200], x[200:], y[200:], seed=1, l2_grid=(1e-3, 1e-1))
    b = linear_probe(x[:200], y[:200], x[200:], y[200:], seed=1, l2_grid=(1e-3, 1e-1))
    assert a == b
    assert a["num_train"] == 200  # refit on train + held-out validation


def test_small_cpu_fits_run_on_one_thread_and_restore_the_count(monkeypatch: pytest.MonkeyPatch) -> None:
    import dpcap.eval.probe as probe

    seen = []
    run_lbfgs = probe._run_lbfgs

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return run_lbfgs(*args, **kwargs)

    monkeypatch.setattr(probe, "_run_lbfgs", recording)
    x, y = blobs(200, 8, 3, 2.0, seed=6)
    torch.set_num_threads(2)  # the autouse fixture restores the session's count afterwards
    fit_logistic_regression(x, y, l2=1e-2, num_classes=3)
    assert seen == [1, 1] and torch.get_num_threads() == 2  # both phases on one thread, then restored
    monkeypatch.setattr(probe, "SINGLE_THREAD_WORK", 0)  # as if the problem were large
    seen.clear()
    fit_logistic_regression(x, y, l2=1e-2, num_classes=3)
    assert seen == [2, 2]


def test_on_fit_reports_every_lambda_then_the_refit() -> None:
    x, y = blobs(300, 8, 3, 2.0, seed=6)
    calls = []
    report = linear_probe(x[:200], y[:200], x[200:], y[200:], l2_grid=(1e-1, 1e-3), on_fit=lambda *a: calls.append(a))
    assert calls == [(1e-1, report["per_l2"][1e-1]), (1e-3, report["per_l2"][1e-3]), (report["l2"], None)]


def test_sgd_probe_separable() -> None:
    x, y = blobs(1200, 16, 4, 0.3, seed=7)
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)
    chunks = [(xt[i : i + 250], yt[i : i + 250]) for i in range(0, 1000, 250)]
    head = sgd_probe(chunks, num_classes=4, epochs=3, batch_size=64, lr=0.05)
    acc = (head.predict(xt[1000:]) == yt[1000:]).double().mean()
    assert acc >= 0.98
    mean, std = standardisation(xt[:1000].double())
    assert torch.allclose(head.mean.double(), mean, atol=1e-4) and torch.allclose(head.std.double(), std, rtol=1e-4)


def test_sgd_probe_rejects_one_shot_generator() -> None:
    x = torch.randn(20, 3)
    y = torch.zeros(20, dtype=torch.int64)
    with pytest.raises(Exception, match="re-iterable"):
        sgd_probe(((x, y) for _ in range(1)), num_classes=2, epochs=2)


def test_confusion_matrix_against_loop(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    t, p = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    cm = confusion_matrix(t, p, 5)
    ref = np.zeros((5, 5), dtype=np.int64)
    for a, b in zip(t, p):
        ref[a, b] += 1
    assert np.array_equal(cm.numpy(), ref)
    with pytest.raises(ConfigError):
        confusion_matrix([0, 5], [0, 1], 5)
    out = save_confusion_png(cm, tmp_path / "sub" / "cm.png", labels=list("abcde"))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [f.name for f in out.parent.iterdir()] == ["cm.png"]  # no temporary left behind


def test_confusion_png_scales_with_classes_and_bars_png(tmp_path: Path) -> None:
    from PIL import Image

    k = 99
    cm = confusion_matrix(np.arange(3 * k) % k, (np.arange(3 * k) * 7) % k, k)
    labels = [f"subgroup-name-{i}" for i in range(k)]
    small = save_confusion_png(confusion_matrix([0, 1], [0, 1], 2), tmp_path / "small.png", ["a", "b"])
    big = save_confusion_png(cm, tmp_path / "big.png", labels, title="DP encoder: linear probe top-1 3.0%")
    with Image.open(small) as a, Image.open(big) as b:
        assert b.size[0] > 3 * a.size[0] and b.size[0] >= 100 * 0.2 * k  # ≥ 0.2 inch per class at 100 dpi
    bars = save_accuracy_bars_png({"DP": 0.45, "non-private": 0.5, "random init": 0.3}, tmp_path / "p.png", title="ε")
    with Image.open(bars) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1]
    with pytest.raises(ConfigError):
        save_accuracy_bars_png({}, tmp_path / "none.png")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["big.png", "p.png", "small.png"]


def test_float32_and_float64_phases_share_one_iteration_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    import dpcap.eval.probe as probe

    calls = []
    run_lbfgs = probe._run_lbfgs

    def recording(objective, weight, bias, *, max_iter, tolerance_grad):
        result = run_lbfgs(objective, weight, bias, max_iter=max_iter, tolerance_grad=tolerance_grad)
        calls.append((weight.dtype, max_iter, result[2]))
        return result

    monkeypatch.setattr(probe, "_run_lbfgs", recording)
    x, y = blobs(400, 16, 6, 0.3, seed=12)  # separable, λ tiny: far from 1e-12 after 30 iterations
    fit_logistic_regression(torch.as_tensor(x), y, l2=1e-8, max_iter=30, tolerance_grad=1e-12)
    (dtype32, budget32, used32), (dtype64, budget64, used64) = calls
    assert (dtype32, dtype64) == (torch.float32, torch.float64)
    assert budget32 == 30 and 20 <= used32 <= 30  # the float32 phase spent most of the budget...
    assert budget64 == max(30 - used32, 3) and used64 <= budget64  # ...float64 gets the rest, at least a tenth
